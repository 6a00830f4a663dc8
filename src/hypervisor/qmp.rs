//! Plain QEMU VMs that libvirt does not manage, through their QMP monitor and guest-agent
//! sockets, with the `qapi` crate.
//!
//! Naming: a plain QEMU VM called NAME (`VmRef::Qemu`, see `vm_ref` for its text form); its
//! sockets are `NAME.qmp` (QMP, e.g. `-qmp unix:DIR/NAME.qmp,server=on,wait=off`) and
//! `NAME.qga` (the guest agent's chardev, e.g. `-chardev socket,path=DIR/NAME.qga,
//! server=on,wait=off,id=qga0 -device virtio-serial -device virtserialport,chardev=qga0,
//! name=org.qemu.guest_agent.0`) in one folder, `/run/vmbackup/qemu` unless `--qemu-dir`
//! says otherwise.
//!
//! The API is blocking; inside, a current-thread tokio runtime drives qapi's streams. Commands
//! use qapi's transport with replies read as JSON values, so that a QEMU older than the schema
//! qapi was generated from (9.1; Debian 12 has 7.2) does not trip over fields it lacks. Every
//! call has a timeout.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::vm::GuestInterface;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU (or the guest agent) answered with an error.
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
    /// The monitor connection failed during the command: whether QEMU ran it is unknown.
    #[error("{command}: the QMP connection failed")]
    Io {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {secs}s: {what}")]
    Timeout { what: String, secs: u64 },
    #[error("unexpected reply to {command}: {detail}")]
    Reply { command: String, detail: String },
    #[error("commit back of {device}: {detail}")]
    Commit { device: String, detail: String },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

type Result<T> = std::result::Result<T, QmpError>;

/// Declares a command whose arguments are a JSON object and whose reply is read as JSON.
macro_rules! raw_command {
    ($ty:ident, $name:literal, $kind:path) => {
        #[derive(serde::Serialize)]
        #[serde(transparent)]
        struct $ty(Value);
        impl qapi::Command for $ty {
            type Ok = Value;
            const NAME: &'static str = $name;
            const ALLOW_OOB: bool = false;
        }
        impl $kind for $ty {}
    };
}

raw_command!(QueryStatus, "query-status", qapi::qmp::QmpCommand);
raw_command!(QueryBlock, "query-block", qapi::qmp::QmpCommand);
raw_command!(QueryUuid, "query-uuid", qapi::qmp::QmpCommand);
raw_command!(QueryCpus, "query-cpus-fast", qapi::qmp::QmpCommand);
raw_command!(
    QueryMemory,
    "query-memory-size-summary",
    qapi::qmp::QmpCommand
);
raw_command!(QueryBlockJobs, "query-block-jobs", qapi::qmp::QmpCommand);
raw_command!(
    QueryNamedBlockNodes,
    "query-named-block-nodes",
    qapi::qmp::QmpCommand
);
raw_command!(Transaction, "transaction", qapi::qmp::QmpCommand);
raw_command!(BitmapAdd, "block-dirty-bitmap-add", qapi::qmp::QmpCommand);
raw_command!(
    BitmapRemove,
    "block-dirty-bitmap-remove",
    qapi::qmp::QmpCommand
);
raw_command!(BlockCommit, "block-commit", qapi::qmp::QmpCommand);
raw_command!(
    BlockJobComplete,
    "block-job-complete",
    qapi::qmp::QmpCommand
);
raw_command!(BlockJobCancel, "block-job-cancel", qapi::qmp::QmpCommand);
raw_command!(GuestPing, "guest-ping", qapi::qga::QgaCommand);
raw_command!(GuestFreeze, "guest-fsfreeze-freeze", qapi::qga::QgaCommand);
raw_command!(GuestThaw, "guest-fsfreeze-thaw", qapi::qga::QgaCommand);
raw_command!(
    GuestFreezeStatus,
    "guest-fsfreeze-status",
    qapi::qga::QgaCommand
);
raw_command!(
    GuestInterfaces,
    "guest-network-get-interfaces",
    qapi::qga::QgaCommand
);
raw_command!(GuestExec, "guest-exec", qapi::qga::QgaCommand);
raw_command!(GuestExecStatus, "guest-exec-status", qapi::qga::QgaCommand);

type QmpService = qapi::futures::QapiService<
    qapi::futures::QmpStreamTokio<tokio::io::WriteHalf<tokio::net::UnixStream>>,
>;

/// A disk of a plain QEMU VM, from `query-block`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuDisk {
    /// The qdev id (or the legacy drive name).
    pub device: String,
    /// The node at the top of the disk's chain, attached to the device.
    pub node_name: String,
    pub file: String,
    pub format: String,
    pub virtual_size: u64,
    pub read_only: bool,
    pub removable: bool,
    /// The image below `file` in the chain, when there is one.
    pub backing: Option<String>,
}

/// A dirty bitmap on a block node, from `query-named-block-nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeBitmap {
    /// The node the bitmap belongs to (a format node for a persistent one).
    pub node: String,
    pub name: String,
    /// Whether it records writes now (false when disabled, or while a job holds it frozen).
    pub recording: bool,
    /// Saved into the image file when QEMU closes the image (or reopens it read-only).
    pub persistent: bool,
    /// QEMU found it not saved cleanly when it loaded it: its contents are not to be trusted.
    pub inconsistent: bool,
    /// A block job or export is using it.
    pub busy: bool,
}

pub struct QemuVm {
    name: String,
    qmp_path: PathBuf,
    qga_path: PathBuf,
    rt: tokio::runtime::Runtime,
    /// The QMP session; `None` after one that a command left in doubt (see `qmp`), until
    /// the next command opens a new one.
    conn: std::sync::Mutex<Option<QmpConn>>,
}

/// One QMP session: its command side, and the task that reads its replies and events.
struct QmpConn {
    service: QmpService,
    reader: tokio::task::JoinHandle<()>,
}

const CALL: Duration = Duration::from_secs(30);

fn qapi_err(command: &str, e: impl std::fmt::Display) -> QmpError {
    QmpError::Command {
        command: command.to_string(),
        detail: e.to_string(),
    }
}

/// One guest-agent command on a fresh connection to the agent's socket `path` (synced
/// first), so that a stale reply from an earlier timed-out call can never be taken for this
/// one's.
fn qga_call<C>(
    rt: &tokio::runtime::Runtime,
    path: &Path,
    cmd: C,
    timeout: Duration,
) -> Result<Value>
where
    C: qapi::qga::QgaCommand + qapi::Command<Ok = Value> + 'static,
{
    let name = C::NAME;
    let path = path.to_path_buf();
    rt.block_on(async move {
        let connect = async {
            qapi::futures::QgaStreamTokio::open_uds(&path)
                .await
                .map_err(|source| QmpError::Connect {
                    path: path.clone(),
                    source,
                })
        };
        let stream =
            tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| QmpError::Timeout {
                    what: format!("connecting to the guest agent for {name}"),
                    secs: timeout.as_secs(),
                })??;
        let (service, task) = stream.spawn_tokio();
        let work = async {
            let sync = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as i32)
                .unwrap_or(1)
                ^ std::process::id() as i32;
            service
                .guest_sync(sync)
                .await
                .map_err(|e| qapi_err("guest-sync", e))?;
            service.execute(cmd).await.map_err(|e| qapi_err(name, e))
        };
        let result = tokio::time::timeout(timeout, work).await;
        // The agent's socket serves one client at a time: close this connection now, on
        // every path, so that the next client (this process or another) gets through.
        drop(service);
        task.abort();
        let _ = task.await;
        result.map_err(|_| QmpError::Timeout {
            what: format!("guest agent {name}"),
            secs: timeout.as_secs(),
        })?
    })
}

/// Thaws the guest whose agent listens on `qga`, without QMP: what the thaw guard does when
/// the backup that froze the guest is gone.
pub fn thaw_guest_at(qga: &Path, timeout: Duration) -> Result<u32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(QmpError::Runtime)?;
    let v = qga_call(&rt, qga, GuestThaw(json!({})), timeout)?;
    Ok(v.as_u64().unwrap_or(0) as u32)
}

/// Opens a QMP session on the socket `path` and negotiates it.
fn connect(rt: &tokio::runtime::Runtime, path: &Path) -> Result<QmpConn> {
    rt.block_on(async {
        let connect = async {
            let stream = qapi::futures::QmpStreamTokio::open_uds(path).await?;
            stream.negotiate().await
        };
        let stream = tokio::time::timeout(CALL, connect)
            .await
            .map_err(|_| QmpError::Timeout {
                what: format!("QMP handshake on {}", path.display()),
                secs: CALL.as_secs(),
            })?
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (service, events) = stream.into_parts();
        // The event stream must be polled or replies never arrive.
        let reader = tokio::spawn(events.into_future());
        Ok::<_, QmpError>(QmpConn { service, reader })
    })
}

/// Closes a QMP session: a QMP socket serves one client at a time, so the next session
/// gets through only once this one's socket is closed.
fn close(rt: &tokio::runtime::Runtime, conn: QmpConn) {
    let QmpConn { service, reader } = conn;
    drop(service);
    reader.abort();
    rt.block_on(async {
        let _ = reader.await;
    });
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        let conn = self.conn.get_mut().map(Option::take).unwrap_or(None);
        if let Some(c) = conn {
            close(&self.rt, c);
        }
    }
}

impl QemuVm {
    /// Connects to `DIR/NAME.qmp` and negotiates QMP. A QMP socket serves one client at a
    /// time: nothing else may be connected to it.
    pub fn open(dir: &Path, name: &str) -> Result<QemuVm> {
        Self::open_paths(
            name,
            &dir.join(format!("{name}.qmp")),
            &dir.join(format!("{name}.qga")),
        )
    }

    /// Connects to the QMP socket `qmp`; the guest agent is at `qga`.
    pub fn open_paths(name: &str, qmp: &Path, qga: &Path) -> Result<QemuVm> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(QmpError::Runtime)?;
        let conn = connect(&rt, qmp)?;
        Ok(QemuVm {
            name: name.to_string(),
            qmp_path: qmp.to_path_buf(),
            qga_path: qga.to_path_buf(),
            rt,
            conn: std::sync::Mutex::new(Some(conn)),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest agent's socket.
    pub fn qga_path(&self) -> &Path {
        &self.qga_path
    }

    fn qmp<C>(&self, cmd: C) -> Result<Value>
    where
        C: qapi::qmp::QmpCommand + qapi::Command<Ok = Value> + 'static,
    {
        let name = C::NAME;
        let deadline = crate::fault::qmp_deadline(CALL);
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(connect(&self.rt, &self.qmp_path)?);
        }
        let conn = slot.as_ref().expect("connected above");
        let result = self.rt.block_on(async {
            tokio::time::timeout(deadline, conn.service.execute(cmd))
                .await
                .map_err(|_| QmpError::Timeout {
                    what: name.to_string(),
                    secs: deadline.as_secs(),
                })?
                .map_err(|e| match e {
                    qapi::ExecuteError::Io(source) => QmpError::Io {
                        command: name.to_string(),
                        source,
                    },
                    e => qapi_err(name, e),
                })
        });
        if matches!(result, Err(QmpError::Timeout { .. } | QmpError::Io { .. })) {
            // Without out-of-band ids QMP replies are matched by their order: the reply this
            // command did not get may still come, and would be taken for the next command's
            // (a stale `query-block` saying the VM is not on its overlays, say). The session
            // is closed; the next command opens a new one, which QEMU answers only after the
            // command in doubt has run or been dropped.
            if let Some(old) = slot.take() {
                close(&self.rt, old);
            }
        }
        result
    }

    fn qga<C>(&self, cmd: C, timeout: Duration) -> Result<Value>
    where
        C: qapi::qga::QgaCommand + qapi::Command<Ok = Value> + 'static,
    {
        qga_call(&self.rt, &self.qga_path, cmd, timeout)
    }

    pub fn running(&self) -> Result<bool> {
        let v = self.qmp(QueryStatus(json!({})))?;
        Ok(v["running"].as_bool().unwrap_or(false))
    }

    /// The VM's UUID, vCPU count and memory in bytes.
    pub fn shape(&self) -> Result<(String, u32, u64)> {
        let uuid = self.qmp(QueryUuid(json!({})))?["UUID"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let cpus = self
            .qmp(QueryCpus(json!({})))?
            .as_array()
            .map_or(0, Vec::len) as u32;
        let mem = self.qmp(QueryMemory(json!({})))?["base-memory"]
            .as_u64()
            .unwrap_or(0);
        Ok((uuid, cpus, mem))
    }

    /// The raw `query-block` reply, kept with a backup as the VM's description.
    pub fn block_json(&self) -> Result<Value> {
        self.qmp(QueryBlock(json!({})))
    }

    pub fn disks(&self) -> Result<Vec<QemuDisk>> {
        let v = self.qmp(QueryBlock(json!({})))?;
        let list = v.as_array().ok_or_else(|| QmpError::Reply {
            command: "query-block".into(),
            detail: "not a list".into(),
        })?;
        let mut out = Vec::new();
        for b in list {
            let Some(ins) = b.get("inserted") else {
                continue;
            };
            let qdev = b["qdev"].as_str().unwrap_or_default();
            // "/machine/peripheral/vdb/virtio-backend" -> "vdb"
            let device = match b["device"].as_str() {
                Some(d) if !d.is_empty() => d.to_string(),
                _ => qdev
                    .strip_prefix("/machine/peripheral/")
                    .and_then(|r| r.split('/').next())
                    .unwrap_or(qdev)
                    .to_string(),
            };
            out.push(QemuDisk {
                device,
                node_name: ins["node-name"].as_str().unwrap_or_default().to_string(),
                file: ins["file"].as_str().unwrap_or_default().to_string(),
                format: ins["drv"].as_str().unwrap_or_default().to_string(),
                virtual_size: ins["image"]["virtual-size"].as_u64().unwrap_or(0),
                read_only: ins["ro"].as_bool().unwrap_or(false),
                removable: b["removable"].as_bool().unwrap_or(false),
                backing: ins["image"]["full-backing-filename"]
                    .as_str()
                    .or(ins["backing_file"].as_str())
                    .map(str::to_string),
            });
        }
        Ok(out)
    }

    pub fn agent_ping(&self, timeout: Duration) -> Result<()> {
        self.qga(GuestPing(json!({})), timeout).map(|_| ())
    }

    pub fn freeze(&self, timeout: Duration) -> Result<u32> {
        let v = self.qga(GuestFreeze(json!({})), timeout)?;
        Ok(v.as_u64().unwrap_or(0) as u32)
    }

    pub fn thaw(&self, timeout: Duration) -> Result<u32> {
        let v = self.qga(GuestThaw(json!({})), timeout)?;
        Ok(v.as_u64().unwrap_or(0) as u32)
    }

    pub fn freeze_status(&self, timeout: Duration) -> Result<String> {
        let v = self.qga(GuestFreezeStatus(json!({})), timeout)?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// The guest's interfaces and addresses (loopback left out).
    pub fn guest_interfaces(&self) -> Result<Vec<GuestInterface>> {
        let v = self.qga(GuestInterfaces(json!({})), CALL)?;
        Ok(GuestInterface::from_agent_reply(&v))
    }

    /// Runs `sh -c script` in the guest; returns its exit code and stdout.
    pub fn exec_sh(&self, script: &str, timeout: Duration) -> Result<(i32, String)> {
        use base64::Engine as _;
        let v = self.qga(
            GuestExec(json!({"path": "/bin/sh", "arg": ["-c", script], "capture-output": true})),
            CALL,
        )?;
        let pid = v["pid"].as_i64().ok_or_else(|| QmpError::Reply {
            command: "guest-exec".into(),
            detail: v.to_string(),
        })?;
        let start = Instant::now();
        loop {
            let s = self.qga(GuestExecStatus(json!({ "pid": pid })), CALL)?;
            if s["exited"].as_bool() == Some(true) {
                let out = s["out-data"]
                    .as_str()
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .unwrap_or_default();
                return Ok((
                    s["exitcode"].as_i64().unwrap_or(-1) as i32,
                    String::from_utf8_lossy(&out).into_owned(),
                ));
            }
            if start.elapsed() > timeout {
                return Err(QmpError::Timeout {
                    what: format!("guest command {script}"),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Snapshots every listed node into its overlay file, all in one `transaction`. Before
    /// the snapshot actions, in the same transaction, `bitmaps` (node, name) adds a persistent
    /// dirty bitmap (default granularity) to each of those nodes: the nodes being
    /// snapshotted, which stay below the overlays, so that the bitmaps record every write
    /// from this instant on into the images the VM leaves. Any failing action (a bitmap
    /// included) fails the whole transaction and nothing changes.
    pub fn snapshot(
        &self,
        overlays: &[(String, PathBuf)],
        bitmaps: &[(String, String)],
    ) -> Result<()> {
        let adds = bitmaps.iter().map(|(node, name)| {
            json!({"type": "block-dirty-bitmap-add", "data": {
                "node": node,
                "name": name,
                "persistent": true,
            }})
        });
        let snaps = overlays.iter().map(|(node, file)| {
            json!({"type": "blockdev-snapshot-sync", "data": {
                "node-name": node,
                "snapshot-file": file.to_string_lossy(),
                "snapshot-node-name": format!("vmbackup-overlay-{node}"),
                "format": "qcow2",
                "mode": "absolute-paths",
            }})
        });
        let actions: Vec<Value> = adds.chain(snaps).collect();
        self.qmp(Transaction(json!({ "actions": actions })))
            .map(|_| ())
    }

    /// The dirty bitmaps of every named block node.
    pub fn bitmaps(&self) -> Result<Vec<NodeBitmap>> {
        let v = self.qmp(QueryNamedBlockNodes(json!({ "flat": true })))?;
        let nodes = v.as_array().ok_or_else(|| QmpError::Reply {
            command: "query-named-block-nodes".into(),
            detail: "not a list".into(),
        })?;
        let mut out = Vec::new();
        for n in nodes {
            let node = n["node-name"].as_str().unwrap_or_default();
            for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
                let Some(name) = b["name"].as_str() else {
                    // Anonymous bitmaps are QEMU's own (jobs').
                    continue;
                };
                let flag = |f: &str| b[f].as_bool().unwrap_or(false);
                out.push(NodeBitmap {
                    node: node.to_string(),
                    name: name.to_string(),
                    recording: flag("recording"),
                    persistent: flag("persistent"),
                    inconsistent: flag("inconsistent"),
                    busy: flag("busy"),
                });
            }
        }
        Ok(out)
    }

    /// Adds a persistent dirty bitmap `name` to `node` (outside any snapshot).
    pub fn add_bitmap(&self, node: &str, name: &str) -> Result<()> {
        self.qmp(BitmapAdd(
            json!({"node": node, "name": name, "persistent": true}),
        ))
        .map(|_| ())
    }

    /// Removes dirty bitmap `name` from `node`, from the image file too when persistent.
    pub fn remove_bitmap(&self, node: &str, name: &str) -> Result<()> {
        self.qmp(BitmapRemove(json!({"node": node, "name": name})))
            .map(|_| ())
    }

    /// The block job with id `job`, if there is one.
    fn block_job(&self, job: &str) -> Result<Option<Value>> {
        let jobs = self.qmp(QueryBlockJobs(json!({})))?;
        Ok(jobs
            .as_array()
            .into_iter()
            .flatten()
            .find(|j| j["device"].as_str() == Some(job))
            .cloned())
    }

    /// Cancels the commit of `device` an interrupted run may have left (the disk stays on
    /// its overlay) and waits until the job is gone.
    pub fn cancel_commit(&self, device: &str, timeout: Duration) -> Result<bool> {
        let job = format!("vmbackup-commit-{device}");
        if self.block_job(&job)?.is_none() {
            return Ok(false);
        }
        self.qmp(BlockJobCancel(json!({ "device": job, "force": true })))?;
        let start = Instant::now();
        while self.block_job(&job)?.is_some() {
            if start.elapsed() > timeout {
                return Err(QmpError::Timeout {
                    what: format!("cancelling {job}"),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(true)
    }

    /// Commits the active layer of `device` back into its backing image `original`: starts an
    /// active block commit, waits until it is ready, completes it, waits until the job is gone,
    /// and checks that the device runs on `original` again. When the job makes no progress
    /// for `stall` it is cancelled and the VM stays, safely, on its overlay.
    pub fn commit_back(&self, device: &str, original: &Path, stall: Duration) -> Result<()> {
        let top = self
            .disks()?
            .into_iter()
            .find(|d| d.device == device)
            .ok_or_else(|| QmpError::Commit {
                device: device.into(),
                detail: "no such device".into(),
            })?;
        let job = format!("vmbackup-commit-{device}");
        self.qmp(BlockCommit(json!({"job-id": job, "device": top.node_name})))?;
        crate::fault::point("commit-started");
        let mut completed = false;
        let mut progress = Value::Null;
        let mut progressed_at = Instant::now();
        loop {
            match self.block_job(&job)? {
                Some(j) if !completed && j["ready"].as_bool() == Some(true) => {
                    crate::fault::point("commit-ready");
                    self.qmp(BlockJobComplete(json!({ "device": job })))?;
                    completed = true;
                }
                Some(j) => {
                    let now = json!([j["offset"], j["len"]]);
                    if now != progress {
                        progress = now;
                        progressed_at = Instant::now();
                    }
                }
                None if completed => break,
                None => {
                    return Err(QmpError::Commit {
                        device: device.into(),
                        detail: format!(
                            "the job ended before it was completed; the VM runs on {}",
                            top.file
                        ),
                    })
                }
            }
            if progressed_at.elapsed() > stall {
                let _ = self.qmp(BlockJobCancel(json!({ "device": job })));
                return Err(QmpError::Commit {
                    device: device.into(),
                    detail: format!(
                        "no progress for {}s; the VM stays on {}",
                        stall.as_secs(),
                        top.file
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let now = self
            .disks()?
            .into_iter()
            .find(|d| d.device == device)
            .map(|d| d.file)
            .unwrap_or_default();
        if Path::new(&now) != original {
            return Err(QmpError::Commit {
                device: device.into(),
                detail: format!(
                    "after the commit the VM runs on {now}, not {}",
                    original.display()
                ),
            });
        }
        Ok(())
    }
}
