//! A plain QEMU VM (`VmRef::Qemu`) as a `VmHandle`, through its QMP and guest-agent sockets.
//!
//! No libvirtd freezes and thaws for it, so this adapter does: before the freeze it starts a
//! thaw guard process (`thaw_guard`), which thaws the guest if this process dies while the
//! guest is frozen; it is disarmed once the guest is known to be thawed. The snapshot is one
//! QMP `transaction` of `blockdev-snapshot-sync` for every disk, preceded, when a dirty bitmap
//! is asked for, by a persistent `block-dirty-bitmap-add` on each qcow2 disk's top node (the
//! node being snapshotted, which stays below the overlay); the commit back an active
//! `block-commit` and `block-job-complete` per disk, checked with `query-block`.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::qmp::{QemuVm, QmpError};
use super::vm::{GuestInterface, NicSpec};
use super::{
    backing_of, is_overlay, Description, DiskShape, Freeze, Overlay, Recovered, Recovery, Tracked,
    VmHandle, VmShape, BITMAP_PREFIX,
};
use crate::error::{Error, Result};
use crate::image;
use crate::preflight::{self, DiskFacts};
use crate::settings::BackupSettings;
use crate::thaw_guard::ThawGuard;
use crate::vm_ref::VmRef;

/// How long a probe waits for the guest agent: one that does not answer in this time is
/// taken to be absent.
const AGENT_PROBE: Duration = Duration::from_secs(5);

/// A plain QEMU VM, connected to its QMP socket.
pub struct QemuVmHandle {
    vm: VmRef,
    q: QemuVm,
    /// Whether the agent answered, once probed.
    agent: Cell<Option<bool>>,
    guard: RefCell<Option<ThawGuard>>,
}

/// Checks that plain QEMU VM `name` has a QMP socket in `qemu_dir` (bad input otherwise),
/// and that the folder is to be trusted (refused otherwise): whoever can create `NAME.qmp`
/// there could pose as the VM's QEMU and have root read or delete files.
pub fn check_exists(qemu_dir: &Path, name: &str) -> Result<()> {
    if let Some(why) = preflight::Folder::of(qemu_dir)
        .ok()
        .and_then(|f| f.untrusted())
    {
        return Err(Error::Refused(Box::new(preflight::Report {
            vm: format!("qemu:{name}"),
            ok: false,
            checks: vec![preflight::Check {
                name: "socket-folder".into(),
                ok: false,
                found: 0,
                limit: 0,
                message: format!(
                    "the QMP and guest agent sockets' folder cannot be trusted: {why}"
                ),
            }],
            skipped_disks: Vec::new(),
            disks: Vec::new(),
        })));
    }
    let qmp_path = qemu_dir.join(format!("{name}.qmp"));
    if !qmp_path.exists() {
        return Err(Error::NoQemu {
            name: name.to_string(),
            path: qmp_path,
        });
    }
    Ok(())
}

impl QemuVmHandle {
    /// Connects to the plain QEMU VM `vm` (sockets `NAME.qmp`, `NAME.qga` in `qemu_dir`).
    pub fn open(qemu_dir: &Path, vm: &VmRef) -> Result<QemuVmHandle> {
        check_exists(qemu_dir, vm.name())?;
        Ok(QemuVmHandle {
            vm: vm.clone(),
            q: QemuVm::open(qemu_dir, vm.name())?,
            agent: Cell::new(None),
            guard: RefCell::new(None),
        })
    }

    fn agent_answers(&self) -> bool {
        if let Some(a) = self.agent.get() {
            return a;
        }
        let a = self.q.freeze_status(AGENT_PROBE).is_ok();
        self.agent.set(Some(a));
        a
    }

    fn disarm_guard(&self) {
        if let Some(g) = self.guard.borrow_mut().take() {
            g.disarm();
        }
    }
}

impl VmHandle for QemuVmHandle {
    fn vm(&self) -> &VmRef {
        &self.vm
    }

    fn recover(&self, s: &BackupSettings) -> Result<Recovery> {
        let mut r = Recovery::default();
        if let Ok(status) = self.q.freeze_status(AGENT_PROBE) {
            self.agent.set(Some(true));
            if status == "frozen" {
                tracing::warn!(vm = %self.vm, "the guest was left frozen (an interrupted backup?): thawing it");
                self.ensure_thawed(s)?;
                r.thawed = true;
            }
        } else {
            self.agent.set(Some(false));
        }
        // Newest overlay first: a run killed on a VM already left on an overlay adds another.
        for _ in 0..16 {
            let disks = self.q.disks()?;
            let Some(d) = disks.iter().find(|d| is_overlay(self.vm.name(), &d.file)) else {
                break;
            };
            let image = match &d.backing {
                Some(b) => b.clone(),
                None => backing_of(&d.file)?,
            };
            tracing::warn!(vm = %self.vm, disk = %d.device, overlay = %d.file, "an interrupted backup left the disk on its overlay: committing it back");
            self.q.cancel_commit(&d.device, s.commit_stall_timeout)?;
            self.q
                .commit_back(&d.device, Path::new(&image), s.commit_stall_timeout)?;
            std::fs::remove_file(&d.file).map_err(|e| Error::io("remove overlay", &d.file, e))?;
            r.disks.push(Recovered {
                vm: self.vm.to_string(),
                disk: d.device.clone(),
                overlay: d.file.clone(),
                image,
            });
        }
        Ok(r)
    }

    fn describe(&self) -> Result<VmShape> {
        let (uuid, vcpus, memory_bytes) = self.q.shape()?;
        let mut disks = Vec::new();
        for d in self.q.disks()? {
            let mut facts = DiskFacts {
                target: d.device.clone(),
                device: if d.removable { "cdrom" } else { "disk" }.into(),
                kind: "file".into(),
                source: Some(d.file.clone()),
                readonly: d.read_only,
                shareable: false,
                virtual_size: d.virtual_size,
                allocated_size: 0,
                backing_file: None,
                missing: std::fs::symlink_metadata(&d.file).is_err(),
            };
            if let (Ok(None), false) = (preflight::disk_rule(&facts), facts.missing) {
                let info = image::info(Path::new(&d.file))?;
                facts.virtual_size = info.virtual_size;
                facts.allocated_size = info.actual_size;
                facts.backing_file = info.full_backing_file.or(info.backing_file);
            }
            disks.push(DiskShape {
                facts,
                format: d.format.clone(),
                node: Some(d.node_name.clone()),
            });
        }
        let guest = self.guest_interfaces();
        Ok(VmShape {
            uuid,
            vcpus,
            memory_bytes,
            // The QEMU process is there: its disks are in use, whether the guest runs or not.
            running: true,
            agent: self.agent_answers(),
            no_agent: "the guest agent does not answer",
            disks,
            nics: guest
                .iter()
                .map(|g| NicSpec {
                    mac: g.mac.clone(),
                    model: None,
                    kind: "qemu".into(),
                    source: None,
                })
                .collect(),
        })
    }

    fn description(&self) -> Result<Description> {
        Ok(Description {
            file: "qemu-block.json",
            bytes: self.q.block_json()?.to_string().into_bytes(),
        })
    }

    fn guest_interfaces(&self) -> Vec<GuestInterface> {
        if !self.agent_answers() {
            return Vec::new();
        }
        self.q.guest_interfaces().unwrap_or_default()
    }

    fn freeze(&self, s: &BackupSettings) -> Result<Freeze> {
        // Started before the freeze: thaws the guest if this process dies while it is frozen.
        if let Some(program) = &s.thaw_guard {
            *self.guard.borrow_mut() = Some(ThawGuard::spawn(
                program,
                self.q.qga_path(),
                s.freeze_timeout,
            )?);
        }
        let since = Instant::now();
        self.q.freeze(s.freeze_timeout)?;
        crate::fault::point("qemu-frozen");
        Ok(Freeze::Now(since))
    }

    fn snapshot(
        &self,
        overlays: &[Overlay],
        _quiesce: bool,
        bitmap: Option<&str>,
        _s: &BackupSettings,
    ) -> Result<Tracked> {
        let pairs: Vec<(String, PathBuf)> = overlays
            .iter()
            .map(|o| (o.node.clone().unwrap_or_default(), o.overlay.clone()))
            .collect();
        // Raw images cannot hold persistent bitmaps: only qcow2 disks are tracked.
        let tracked: Vec<&Overlay> = match bitmap {
            Some(_) => overlays.iter().filter(|o| o.format == "qcow2").collect(),
            None => Vec::new(),
        };
        let (Some(name), false) = (bitmap, tracked.is_empty()) else {
            self.q.snapshot(&pairs, &[])?;
            return Ok(Tracked::default());
        };
        let adds: Vec<(String, String)> = tracked
            .iter()
            .map(|o| (o.node.clone().unwrap_or_default(), name.to_string()))
            .collect();
        match self.q.snapshot(&pairs, &adds) {
            Ok(()) => Ok(Tracked {
                targets: tracked.iter().map(|o| o.target.clone()).collect(),
                failed: None,
                snapshot_ms: None,
            }),
            // QEMU refused the transaction, so none of it happened: the guest may be frozen,
            // take the snapshot at once without the bitmaps. (After a timeout or a broken
            // connection QEMU may have run it: no retry then.)
            Err(e @ QmpError::Command { .. }) => {
                let reason = e.to_string();
                tracing::warn!(vm = %self.vm, bitmap = name, error = %reason, "the snapshot with dirty bitmaps failed: snapshotting without them");
                self.q.snapshot(&pairs, &[])?;
                Ok(Tracked {
                    targets: Vec::new(),
                    failed: Some(reason),
                    snapshot_ms: None,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn thaw(&self, s: &BackupSettings) -> Result<()> {
        self.q.thaw(s.freeze_timeout)?;
        self.disarm_guard();
        Ok(())
    }

    fn ensure_thawed(&self, s: &BackupSettings) -> Result<bool> {
        let _thaw_pending = crate::interrupt::ThawPending::start();
        let start = Instant::now();
        let deadline = s.thaw_deadline();
        let mut thawed_some = false;
        let mut pause = Duration::from_millis(100);
        loop {
            let last = match self.q.freeze_status(AGENT_PROBE) {
                Ok(st) if st == "thawed" => {
                    self.disarm_guard();
                    return Ok(thawed_some);
                }
                Ok(_) => match self.q.thaw(s.freeze_timeout) {
                    Ok(_) => {
                        thawed_some = true;
                        continue;
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if start.elapsed() >= deadline {
                // Left armed: dropping it below makes the guard try once more.
                drop(self.guard.borrow_mut().take());
                return Err(last.into());
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    fn running_on(&self, overlays: &[Overlay]) -> Result<Vec<Overlay>> {
        let disks = self.q.disks()?;
        Ok(overlays
            .iter()
            .filter(|o| {
                disks
                    .iter()
                    .any(|d| d.device == o.target && Path::new(&d.file) == o.overlay)
            })
            .cloned()
            .collect())
    }

    fn commit_back(&self, overlays: &[Overlay], s: &BackupSettings) -> Result<()> {
        let mut first_err = None;
        for o in overlays {
            let r = self
                .q
                .cancel_commit(&o.target, s.commit_stall_timeout)
                .and_then(|_| {
                    self.q
                        .commit_back(&o.target, &o.image, s.commit_stall_timeout)
                });
            if let Err(e) = r {
                let e = Error::from(e);
                tracing::error!(vm = %self.vm, disk = %o.target, error = %crate::error::chain(&e), "commit back failed");
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn is_shut_off(&self) -> Result<bool> {
        Ok(false)
    }

    fn drop_bitmaps(&self, drop: &dyn Fn(&str) -> bool) -> Result<Vec<String>> {
        // The disks' top nodes now: after a commit back, each disk's own image's node again.
        let tops: Vec<String> = self.q.disks()?.into_iter().map(|d| d.node_name).collect();
        let mut removed: Vec<String> = Vec::new();
        let mut first_err = None;
        for b in self.q.bitmaps()? {
            if !tops.contains(&b.node) || !b.name.starts_with(BITMAP_PREFIX) || !drop(&b.name) {
                continue;
            }
            match self.q.remove_bitmap(&b.node, &b.name) {
                Ok(()) => {
                    if !removed.contains(&b.name) {
                        removed.push(b.name);
                    }
                }
                Err(e) => {
                    tracing::warn!(vm = %self.vm, node = %b.node, bitmap = %b.name, error = %e, "cannot remove a dirty bitmap");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e.into()),
            None => Ok(removed),
        }
    }
}
