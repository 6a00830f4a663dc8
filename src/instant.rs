//! `vmbackup restore ID --instant`: the VM runs again within seconds, whatever its size, and
//! ends up exactly as a plain restore leaves it (same images, paths, formats, owners),
//! independent of the backup.
//!
//! How:
//! 1. The checks of a restore (`restore::restore_with`, exit 2/3/4 and nothing changed).
//! 2. Each restored image is made empty (its size and format) where a restore puts it.
//! 3. A detached `vmbackup serve ID --socket DIR/nbd.sock` (its own session, its log in
//!    `STATE_DIR/instant/`) serves the backup; `DIR` is a private folder
//!    (`TMPDIR/vmbackup-instant-<vm>-…`, 0700, owned by QEMU's user) holding the socket and
//!    one qcow2 overlay per disk backed by its NBD export.
//! 4. The VM is defined with its disks on the overlays (the backing store an NBD network
//!    source) and started at once.
//! 5. A libvirt block copy of each disk (full: the whole chain, flattened) into its empty
//!    image; once each is mirrored, a pivot puts the VM on it. Then the final definition (the
//!    plain restore's) is defined, the server stopped, the folder removed.
//!
//! Block copy rather than block pull: a pull leaves the overlay (qcow2) as the disk, so a raw
//! disk would change format and the images would be elsewhere than a plain restore puts them.
//! libvirt allows a block copy on a persistent domain since it uses `-blockdev` (6.0).
//!
//! A record (`STATE_DIR/instant/<vm>.json`) names the folder, the server's pid and the final
//! definition until the end: `vmbackup recover` finishes an interrupted instant restore (the
//! server restarted when it died, a copy started again when its job is gone; the overlays
//! copied offline with `qemu-img convert` when the VM was shut down meanwhile), or reports
//! what state the VM is in.

use std::ffi::OsString;
use std::io::BufRead;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::boot_test::{chown, qemu_img_create, qemu_owner, set_overlay, Overlay};
use crate::error::{chain, Error, Result};
use crate::hypervisor::libvirt::{Dom, Libvirt};
use crate::hypervisor::xml_edit::escape_attr;
use crate::repository::Repository;
use crate::restore::{process_alive, restore_with, FinalDisk, InstantHooks, Restored};
use crate::vm_ref::VmRef;

/// The prefix of every instant restore's private folder (in the temporary folder).
pub const DIR_PREFIX: &str = "vmbackup-instant-";

/// How to start `vmbackup serve` with the configuration of the running command: this binary
/// and the global options it was given (the environment is inherited).
#[derive(Debug, Clone)]
pub struct ServeCommand {
    pub exe: PathBuf,
    pub global_args: Vec<OsString>,
}

/// One disk of an instant restore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct RecordDisk {
    pub target: String,
    /// The qcow2 overlay the VM starts on.
    pub overlay: PathBuf,
    /// The image it ends on.
    pub path: PathBuf,
    pub format: String,
}

/// An instant restore in flight (`STATE_DIR/instant/<vm>.json`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Record {
    pub vm: String,
    pub backup: String,
    /// The `restore --instant` process.
    pub pid: u32,
    /// The `serve` process, once started.
    pub serve_pid: Option<u32>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// The definition the VM ends with (a plain restore's).
    pub final_xml: String,
    pub disks: Vec<RecordDisk>,
}

/// What an instant restore did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct InstantRestored {
    #[serde(flatten)]
    pub restore: Restored,
    /// From the command's start until the VM was started on the backup.
    pub seconds_to_start: f64,
    /// From the command's start until every disk was local and the VM on it.
    pub seconds_to_local: f64,
    /// The bytes the block copies moved (the disks' sizes).
    pub bytes: u64,
}

fn records_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("instant")
}

/// A file-name-safe form of a VM's name.
fn safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(60)
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

/// A VM's file name in the records folder: its readable part, then a hash of the whole name,
/// so that names `safe` maps alike (`a.b`, `a_b`) or cuts short never share a record.
fn file_stem(vm: &str) -> String {
    let readable: String = safe(vm).chars().take(40).collect();
    let hash = crate::digest::sha256_hex(vm.as_bytes());
    format!("{readable}-{}", &hash[..12])
}

fn record_path(state_dir: &Path, vm: &str) -> PathBuf {
    records_dir(state_dir).join(format!("{}.json", file_stem(vm)))
}

fn log_path(state_dir: &Path, vm: &str) -> PathBuf {
    records_dir(state_dir).join(format!("{}.serve.log", file_stem(vm)))
}

impl Record {
    fn save(&self, state_dir: &Path) -> Result<()> {
        let dir = records_dir(state_dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create folder", &dir, e))?;
        let path = record_path(state_dir, &self.vm);
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Invalid(format!("instant restore record: {e}")))?;
        // 0600: it holds the domain XML, which may hold secrets (a VNC password).
        let _ = std::fs::remove_file(&tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &body))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::io("write the instant restore record", &path, e))
    }

    fn forget(&self, state_dir: &Path) {
        let _ = std::fs::remove_file(record_path(state_dir, &self.vm));
    }
}

/// The instant restores in flight (or interrupted).
pub fn records(state_dir: &Path) -> Vec<Record> {
    let Ok(entries) = std::fs::read_dir(records_dir(state_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<Record> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let r = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if r.is_none() {
                tracing::warn!(file = %e.path().display(), "unreadable instant restore record");
            }
            r
        })
        .collect();
    out.sort_by(|a, b| a.vm.cmp(&b.vm));
    out
}

/// A backup of `vm` while an instant restore of it is unfinished (its disks on overlays over
/// the backup) is refused: busy, until `recover` finishes the restore.
pub fn refuse_while_unfinished(state_dir: &Path, vm: &VmRef) -> Result<()> {
    if vm.is_qemu() {
        return Ok(());
    }
    match records(state_dir).into_iter().find(|r| r.vm == vm.name()) {
        Some(r) => Err(Error::Busy(format!(
            "an instant restore of {} (backup {}) is not finished: `vmbackup recover` \
             finishes it",
            r.vm, r.backup
        ))),
        None => Ok(()),
    }
}

/// The private folder of an instant restore of `vm`: 0700, owned by QEMU's user.
fn make_dir(vm: &str, owner: Option<(u32, u32)>) -> Result<PathBuf> {
    let vm: String = safe(vm).chars().take(40).collect();
    crate::boot_test::private_dir(&format!("{DIR_PREFIX}{vm}-"), owner)
}

/// An export as `serve --json` announced it.
#[derive(Debug, Deserialize)]
struct Export {
    name: String,
    size: u64,
}

/// Starts `vmbackup serve ID --socket SOCKET` in its own session, its log appended to `log`,
/// and waits until it listens; returns it and its exports.
fn spawn_serve(
    cmd: &ServeCommand,
    id: &str,
    socket: &Path,
    log: &Path,
) -> Result<(Child, Vec<Export>)> {
    if let Some(d) = log.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io("create folder", d, e))?;
    }
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(|e| Error::io("open", log, e))?;
    let mut c = Command::new(&cmd.exe);
    c.args(&cmd.global_args)
        .args(["--json", "serve", id, "--socket"])
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf);
    // SAFETY: between fork and exec the child only calls setsid(2), which is
    // async-signal-safe, and touches no memory of the parent.
    unsafe {
        c.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = c.spawn().map_err(|e| Error::io("run", &cmd.exe, e))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    let doc: Option<serde_json::Value> = serde_json::from_str(line.trim()).ok();
    let exports = doc
        .as_ref()
        .filter(|d| d["ok"] == true)
        .and_then(|d| serde_json::from_value::<Vec<Export>>(d["serve"]["exports"].clone()).ok());
    match exports {
        Some(e) => {
            tracing::info!(pid = child.id(), socket = %socket.display(), "serving the backup over NBD");
            Ok((child, e))
        }
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(3).collect();
            Err(Error::Instant(format!(
                "the NBD server did not start ({}): {}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            )))
        }
    }
}

/// Whether process `pid` is the `serve` of socket `socket` (not a reused pid).
fn is_our_server(pid: u32, socket: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let sock = socket.as_os_str().as_encoded_bytes();
    args.contains(&b"serve".as_slice()) && args.contains(&sock)
}

/// Whether process `pid` is alive and a `restore --instant` (not a reused pid).
fn restore_running(pid: u32) -> bool {
    if !process_alive(pid) {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => c.split(|b| *b == 0).any(|a| a == b"--instant"),
        // Not readable: assumed to be it.
        Err(_) => true,
    }
}

/// Stops the server of `rec` (SIGTERM; it removes its socket and releases the repository)
/// and waits for it, at most 30 s.
fn stop_server(rec: &Record, child: Option<&mut Child>) {
    let Some(pid) = rec.serve_pid else { return };
    if !is_our_server(pid, &rec.socket) {
        return;
    }
    let Ok(p) = i32::try_from(pid) else { return };
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p),
        nix::sys::signal::Signal::SIGTERM,
    );
    match child {
        Some(c) => {
            let _ = c.wait();
        }
        None => {
            let t = Instant::now();
            while is_our_server(pid, &rec.socket) && t.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    tracing::info!(pid, "the NBD server stopped");
}

/// Removes what an instant restore made besides the VM: the server, the folder, the record,
/// the server's log (kept when `keep_log`).
fn clean_up(state_dir: &Path, rec: &Record, child: Option<&mut Child>, keep_log: bool) {
    stop_server(rec, child);
    if let Err(e) = std::fs::remove_dir_all(&rec.dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", rec.dir.display());
        }
    }
    if !keep_log {
        let _ = std::fs::remove_file(log_path(state_dir, &rec.vm));
    }
    rec.forget(state_dir);
}

/// The source file of disk `target` in domain `xml`.
fn disk_source(xml: &str, target: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let disk = doc.descendants().find(|n| {
        n.has_tag_name("disk")
            && n.parent().is_some_and(|p| p.has_tag_name("devices"))
            && n.children()
                .any(|c| c.has_tag_name("target") && c.attribute("dev") == Some(target))
    })?;
    disk.children()
        .find(|c| c.has_tag_name("source"))
        .and_then(|s| s.attribute("file"))
        .map(str::to_string)
}

/// The disks of `rec` that domain `xml` still has on their overlays.
fn on_overlays<'a>(rec: &'a Record, xml: &str) -> Vec<&'a RecordDisk> {
    rec.disks
        .iter()
        .filter(|d| disk_source(xml, &d.target).is_some_and(|s| Path::new(&s) == d.overlay))
        .collect()
}

/// The `<disk>` a block copy writes into: the existing image `d.path`.
fn dest_xml(d: &RecordDisk) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='{}'/><source file='{}'/></disk>",
        escape_attr(&d.format),
        escape_attr(&d.path.to_string_lossy())
    )
}

/// How to go on, for an error message.
fn resume_hint(rec: &Record) -> String {
    format!(
        "the VM {} runs on the backup (served by process {}, socket {}); `vmbackup recover` \
         finishes the restore",
        rec.vm,
        rec.serve_pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into()),
        rec.socket.display()
    )
}

/// With the VM running on the overlays: block-copies every disk still on its overlay into its
/// image (a job found running is waited for), pivots, defines the final definition. Returns
/// the bytes copied. A stop signal leaves everything running (`Error::Interrupted`).
fn copy_and_pivot(
    dom: &Dom,
    rec: &Record,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<u64> {
    let pending: Vec<RecordDisk> = on_overlays(rec, &dom.live_xml()?)
        .into_iter()
        .cloned()
        .collect();
    for d in &pending {
        if dom.block_job(&d.target)?.is_none() {
            tracing::info!(vm = %rec.vm, disk = %d.target, dest = %d.path.display(), "block copy");
            dom.block_copy_reuse(&d.target, &dest_xml(d))?;
        } else {
            tracing::info!(vm = %rec.vm, disk = %d.target, "a block job runs on the disk: waited for");
        }
    }
    crate::fault::point("instant-copying");
    let mut bytes = 0u64;
    let mut left = pending;
    let mut logged = Instant::now();
    while !left.is_empty() {
        if crate::interrupt::requested() {
            tracing::warn!(
                "interrupted: the VM {} keeps running on the backup and the copy goes on; \
                 `vmbackup recover` finishes the restore",
                rec.vm
            );
            return Err(Error::Interrupted);
        }
        let mut still = Vec::new();
        for d in left {
            let label = format!("instant restore {} {}", rec.vm, d.target);
            match dom.block_job(&d.target)? {
                Some(j) => {
                    progress(&label, j.cur, j.end);
                    if logged.elapsed() > Duration::from_secs(10) {
                        tracing::info!(disk = %d.target, done = j.cur, of = j.end, "copying");
                        logged = Instant::now();
                    }
                    if j.end > 0 && j.cur == j.end && dom.block_job_pivot(&d.target)? {
                        tracing::info!(vm = %rec.vm, disk = %d.target, "the disk is local");
                        bytes += j.end;
                        continue;
                    }
                    still.push(d);
                }
                None => {
                    let live = dom.live_xml()?;
                    if disk_source(&live, &d.target).is_some_and(|s| Path::new(&s) == d.overlay) {
                        return Err(Error::Instant(format!(
                            "the block copy of disk {} into {} stopped before it was done \
                             (see libvirt's log of the VM): {}",
                            d.target,
                            d.path.display(),
                            resume_hint(rec)
                        )));
                    }
                    // Pivoted by another process meanwhile.
                    continue;
                }
            }
        }
        left = still;
        if !left.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(bytes)
}

/// The VM is on its images: the final definition (no overlay, no backing store).
fn define_final(lv: &Libvirt, rec: &Record) -> Result<()> {
    lv.define(&rec.final_xml)?;
    Ok(())
}

/// The instant restore's part of `restore_with`: the server, the overlays, the start.
struct Hooks<'a> {
    state_dir: &'a Path,
    serve: &'a ServeCommand,
    id: &'a str,
    vm: String,
    record: Option<Record>,
    child: Option<Child>,
    started: Option<Instant>,
    /// The VM runs on the overlays: nothing is undone any more.
    committed: bool,
}

impl InstantHooks for Hooks<'_> {
    fn prepare(&mut self, xml: &str, disks: &[FinalDisk]) -> Result<String> {
        let owner = qemu_owner();
        let dir = make_dir(&self.vm, owner)?;
        let socket = dir.join("nbd.sock");
        let rec = self.record.insert(Record {
            vm: self.vm.clone(),
            backup: self.id.to_string(),
            pid: std::process::id(),
            serve_pid: None,
            dir: dir.clone(),
            socket: socket.clone(),
            final_xml: xml.to_string(),
            disks: disks
                .iter()
                .map(|d| RecordDisk {
                    target: d.target.clone(),
                    overlay: dir.join(format!("{}.qcow2", safe(&d.target))),
                    path: d.path.clone(),
                    format: d.format.clone(),
                })
                .collect(),
        });
        rec.save(self.state_dir)?;
        let (child, exports) = spawn_serve(
            self.serve,
            self.id,
            &socket,
            &log_path(self.state_dir, &self.vm),
        )?;
        rec.serve_pid = Some(child.id());
        self.child = Some(child);
        rec.save(self.state_dir)?;
        chown(&socket, owner)?;
        let mut xml = xml.to_string();
        for d in &rec.disks {
            let size = exports
                .iter()
                .find(|e| e.name == d.target)
                .map(|e| e.size)
                .ok_or_else(|| {
                    Error::Instant(format!("the server has no export for disk {}", d.target))
                })?;
            let uri = format!("nbd+unix:///{}?socket={}", d.target, socket.display());
            qemu_img_create(&d.overlay, &uri, size)?;
            chown(&d.overlay, owner)?;
            xml = set_overlay(
                &xml,
                &Overlay {
                    target: d.target.clone(),
                    overlay: d.overlay.clone(),
                    socket: socket.clone(),
                },
            )?;
        }
        Ok(xml)
    }

    fn start(&mut self, dom: &Dom) -> Result<()> {
        crate::fault::point("instant-before-start");
        dom.start()?;
        self.started = Some(Instant::now());
        tracing::info!(vm = %self.vm, "the VM runs on the backup");
        Ok(())
    }
}

impl Drop for Hooks<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if let Some(rec) = self.record.take() {
            clean_up(self.state_dir, &rec, self.child.as_mut(), false);
        }
    }
}

/// `vmbackup restore ID --instant`.
pub fn instant_restore(
    lv: &Libvirt,
    repo: &Repository,
    state_dir: &Path,
    id: &str,
    opts: &crate::restore::Options,
    serve: &ServeCommand,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<InstantRestored> {
    let t0 = Instant::now();
    let m = repo.load(id)?;
    if m.vm_name.parse::<VmRef>().is_ok_and(|v| v.is_qemu()) {
        return Err(Error::Invalid(format!(
            "backup {id} is of plain QEMU VM {}: an instant restore is for libvirt VMs only \
             (it defines a libvirt domain on the backup)",
            m.vm_name
        )));
    }
    let vm = opts.as_name.clone().unwrap_or_else(|| m.vm_name.clone());
    refuse_while_unfinished(state_dir, &VmRef::libvirt(&vm)?)?;
    let mut hooks = Hooks {
        state_dir,
        serve,
        id,
        vm,
        record: None,
        child: None,
        started: None,
        committed: false,
    };
    let (restored, _lock, dom) =
        restore_with(lv, repo, state_dir, id, opts, progress, Some(&mut hooks))?;
    hooks.committed = true;
    let rec = hooks
        .record
        .take()
        .ok_or_else(|| Error::Instant("no record".into()))?;
    // The server: reaped when stopped here; dropped (not killed) it goes on serving.
    let mut child = hooks.child.take();
    let started = hooks.started.unwrap_or_else(Instant::now);
    let seconds_to_start = started.duration_since(t0).as_secs_f64();
    // From here on, an error leaves the VM running on the backup, the server with it.
    let bytes = match copy_and_pivot(&dom, &rec, progress) {
        Ok(b) => b,
        Err(e @ (Error::Interrupted | Error::Instant(_))) => return Err(e),
        Err(e) => {
            return Err(Error::Instant(format!(
                "{}: {}",
                chain(&e),
                resume_hint(&rec)
            )))
        }
    };
    define_final(lv, &rec).map_err(|e| {
        Error::Instant(format!(
            "the disks are local but the final definition was refused: {}; `vmbackup \
             recover` defines it again",
            chain(&e)
        ))
    })?;
    clean_up(state_dir, &rec, child.as_mut(), false);
    let seconds_to_local = t0.elapsed().as_secs_f64();
    tracing::info!(vm = %rec.vm, seconds = seconds_to_local, "instant restore done: the VM runs on its own images");
    Ok(InstantRestored {
        restore: restored,
        seconds_to_start: (seconds_to_start * 10.0).round() / 10.0,
        seconds_to_local: (seconds_to_local * 10.0).round() / 10.0,
        bytes,
    })
}

/// `vmbackup recover`'s part: finishes every instant restore whose process is gone. Returns
/// what was done, and errors (each saying what state the VM is in and what to run).
pub fn recover(
    lv: &Libvirt,
    state_dir: &Path,
    serve: &ServeCommand,
    wanted: impl Fn(&str) -> bool,
) -> (Vec<String>, Vec<String>) {
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for rec in records(state_dir).into_iter().filter(|r| wanted(&r.vm)) {
        if rec.pid != std::process::id() && restore_running(rec.pid) {
            tracing::info!(vm = %rec.vm, pid = rec.pid, "an instant restore is running: left alone");
            continue;
        }
        let vm = match VmRef::libvirt(&rec.vm) {
            Ok(v) => v,
            Err(e) => {
                errors.push(format!("{}: {e}", rec.vm));
                continue;
            }
        };
        let _lock = match crate::locks::lock_vm(state_dir, &vm) {
            Ok(l) => l,
            Err(e) => {
                errors.push(format!(
                    "instant restore of {}: {}; run `vmbackup recover` again later",
                    rec.vm,
                    crate::error::chain(&Error::from(e))
                ));
                continue;
            }
        };
        match recover_one(lv, state_dir, serve, rec.clone()) {
            Ok(what) => {
                tracing::info!(vm = %rec.vm, "instant restore: {what}");
                done.push(format!("{}: {what}", rec.vm));
            }
            Err(e) => {
                tracing::error!(vm = %rec.vm, "instant restore: {}", chain(&e));
                errors.push(format!("instant restore of {}: {}", rec.vm, chain(&e)));
            }
        }
    }
    (done, errors)
}

fn recover_one(
    lv: &Libvirt,
    state_dir: &Path,
    serve: &ServeCommand,
    mut rec: Record,
) -> Result<String> {
    let Some(dom) = lv.find_domain(&rec.vm)? else {
        clean_up(state_dir, &rec, None, false);
        return Ok(format!(
            "the VM is not defined (the restore stopped before it was, or it was removed): \
             nothing to finish; `vmbackup restore {}` restores it",
            rec.backup
        ));
    };
    let active = dom.is_active()?;
    let xml = if active {
        dom.live_xml()?
    } else {
        dom.inactive_xml()?
    };
    let pending: Vec<RecordDisk> = on_overlays(&rec, &xml).into_iter().cloned().collect();
    if pending.is_empty() && on_overlays(&rec, &dom.inactive_xml()?).is_empty() {
        clean_up(state_dir, &rec, None, false);
        return Ok("the VM is on its own images: nothing left to do".into());
    }
    if !pending.is_empty() {
        // The server: still the one started, or a new one on the same socket.
        let alive =
            rec.serve_pid.is_some_and(|p| is_our_server(p, &rec.socket)) && rec.socket.exists();
        if !alive {
            stop_server(&rec, None);
            let _ = std::fs::remove_file(&rec.socket);
            let (child, _) = spawn_serve(
                serve,
                &rec.backup,
                &rec.socket,
                &log_path(state_dir, &rec.vm),
            )?;
            rec.serve_pid = Some(child.id());
            rec.pid = std::process::id();
            rec.save(state_dir)?;
            chown(&rec.socket, qemu_owner())?;
            // Stopped by pid below; its exit is reaped by init once this process ends.
            drop(child);
        }
    }
    let how = if active {
        let noop = |_: &str, _: u64, _: u64| {};
        copy_and_pivot(&dom, &rec, &noop).map_err(|e| match e {
            Error::Instant(_) => e,
            e => Error::Instant(format!("{}: {}", chain(&e), resume_hint(&rec))),
        })?;
        "the block copies finished and the VM pivoted onto its images"
    } else {
        for d in &pending {
            tracing::info!(disk = %d.target, "the VM is shut off: copying its overlay offline");
            let out = Command::new("qemu-img")
                .args(["convert", "-q", "-n", "-f", "qcow2", "-O", &d.format])
                .arg(&d.overlay)
                .arg(&d.path)
                .output()
                .map_err(|e| Error::io("run", "qemu-img", e))?;
            if !out.status.success() {
                return Err(Error::Instant(format!(
                    "the VM {} is shut off, defined on its overlays in {}; copying disk {} \
                     failed: {}; fix that and run `vmbackup recover` again",
                    rec.vm,
                    rec.dir.display(),
                    d.target,
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        "the VM was shut off: its overlays were copied into its images offline"
    };
    define_final(lv, &rec)?;
    clean_up(state_dir, &rec, None, false);
    Ok(how.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_file_safe_and_disks_are_found_by_target() {
        assert_eq!(safe("web/../x y"), "web_.._x_y");
        assert_eq!(safe("..a"), "a");
        let (a, b) = (file_stem("a.b"), file_stem("a_b"));
        assert!(a.starts_with("a.b-") && b.starts_with("a_b-") && a != b);
        assert_ne!(file_stem(&"x".repeat(70)), file_stem(&"x".repeat(71)));
        let xml = "<domain><devices>\
            <disk type='file'><source file='/t/vda.qcow2'/><target dev='vda'/></disk>\
            <disk type='file'><source file='/vms/b.raw'/><target dev='vdb'/></disk>\
            </devices></domain>";
        assert_eq!(disk_source(xml, "vda").as_deref(), Some("/t/vda.qcow2"));
        assert_eq!(disk_source(xml, "vdc"), None);
        let rec = Record {
            vm: "w".into(),
            backup: "b".into(),
            pid: 1,
            serve_pid: None,
            dir: "/t".into(),
            socket: "/t/nbd.sock".into(),
            final_xml: String::new(),
            disks: vec![
                RecordDisk {
                    target: "vda".into(),
                    overlay: "/t/vda.qcow2".into(),
                    path: "/vms/a.qcow2".into(),
                    format: "qcow2".into(),
                },
                RecordDisk {
                    target: "vdb".into(),
                    overlay: "/t/vdb.qcow2".into(),
                    path: "/vms/b.raw".into(),
                    format: "raw".into(),
                },
            ],
        };
        let on: Vec<&str> = on_overlays(&rec, xml)
            .iter()
            .map(|d| d.target.as_str())
            .collect();
        assert_eq!(on, ["vda"]);
        let d = dest_xml(&rec.disks[1]);
        assert!(
            d.contains("type='raw'") && d.contains("file='/vms/b.raw'"),
            "{d}"
        );
    }
}
