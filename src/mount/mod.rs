//! `vmbackup mount ID DIR` and `vmbackup umount DIR`: the file systems of a backup, mounted
//! read-only under DIR, so an administrator copies files out with ordinary tools.
//!
//! `mount` checks its input first and changes nothing when it is bad (an unknown backup or
//! disk; DIR missing, not a folder, not empty or a mount point already). Then:
//! 1. it writes a record (`STATE_DIR/mount-KEY.json`, 0600; KEY from the canonical DIR) and
//!    makes a private folder (`STATE_DIR/mount-KEY/`, 0700);
//! 2. it starts a detached background process (this binary's hidden `mount-daemon`, its own
//!    session, its log `daemon.log` in the private folder) that holds the repository's
//!    shared lock and exposes each disk as a read-only file at `STATE_DIR/mount-KEY/disks/`
//!    (FUSE, `fuse::daemon`);
//! 3. for each disk it finds the file systems (`blkid -p`: a whole-disk one, or a partition
//!    table read by `table`, each partition probed at its offset), attaches each mountable
//!    one read-only (`losetup --offset --sizelimit`: no partition device nodes needed) and
//!    mounts it read-only, the journal never replayed, at `DIR/vdb` (whole disk) or
//!    `DIR/vdap1` (partition 1). What is not mountable (swap, LVM, unknown) is listed.
//!
//! The record is written after each step, so that `umount DIR` (and a `mount` that fails or
//! is interrupted half-way, and `cleanup_now` after a second signal) undoes exactly what was
//! done: unmount the file systems, detach the loop devices (only those backed by the private
//! folder's files), unmount the FUSE file system (lazily when its daemon died), stop the
//! daemon (only the process the record names, checked by its start time and command line),
//! remove the private folder, the mount folders made in DIR and the record.

pub mod error;
pub mod fuse;
pub mod system;
pub mod table;

use std::ffi::OsStr;
use std::io::{BufRead, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::repository::Repository;
pub use error::MountError;
use system::run;

/// The prefix of a mount's record and private folder in the state folder.
pub const PREFIX: &str = "mount-";
/// The hidden subcommand of the background process.
pub const DAEMON_COMMAND: &str = "mount-daemon";
/// How long the background process has to mount its FUSE file system.
const DAEMON_START: Duration = Duration::from_secs(60);

/// What `mount` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub id: String,
    pub dir: PathBuf,
    /// Only these disks (targets); all when empty.
    pub disks: Vec<String>,
    /// The arguments that give the background process the same repository and state folder
    /// (`--repo R --state-dir S ...`), before its subcommand.
    pub global_args: Vec<std::ffi::OsString>,
}

/// The background process.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Daemon {
    pub pid: i32,
    /// Its start time (`/proc/PID/stat`, field 22): a pid reused by another process is not it.
    pub start_time: u64,
}

/// One disk, as a file of the FUSE file system.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DiskFile {
    pub target: String,
    pub file: PathBuf,
    pub size: u64,
}

/// One file system, mounted (or being mounted).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Mounted {
    pub disk: String,
    /// Its partition's number; `None` for a file system on the whole disk.
    pub partition: Option<u32>,
    pub offset: u64,
    pub size: u64,
    pub fstype: String,
    pub options: String,
    pub loop_device: Option<PathBuf>,
    pub mountpoint: PathBuf,
    /// The mount folder was made (so it is removed).
    pub made_folder: bool,
    pub mounted: bool,
}

/// Something found that is not mounted, and why.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Skipped {
    pub disk: String,
    pub partition: Option<u32>,
    pub what: String,
}

/// A mount, as recorded in the state folder.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Record {
    pub dir: PathBuf,
    pub private: PathBuf,
    pub backup: String,
    pub vm: String,
    pub daemon: Option<Daemon>,
    pub log: PathBuf,
    pub disks: Vec<DiskFile>,
    pub filesystems: Vec<Mounted>,
    pub skipped: Vec<Skipped>,
}

/// The key of a mount folder: the start of the SHA-256 of its canonical path.
fn key(dir: &Path) -> String {
    crate::digest::sha256_hex(dir.as_os_str().as_encoded_bytes())[..16].to_string()
}

fn record_path(state_dir: &Path, dir: &Path) -> PathBuf {
    state_dir.join(format!("{PREFIX}{}.json", key(dir)))
}

fn private_path(state_dir: &Path, dir: &Path) -> PathBuf {
    state_dir.join(format!("{PREFIX}{}", key(dir)))
}

/// Writes `rec` at `path` atomically, 0600.
fn save(path: &Path, rec: &Record) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(rec).expect("a record serializes");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io("write", &tmp, e))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("write", path, e))
}

fn load(path: &Path) -> Result<Record> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Invalid(format!("{}: not a mount record ({e})", path.display())))
}

/// The canonical form of mount folder `dir`, which must exist and be a folder.
fn canonical_dir(dir: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(dir)
        .map_err(|e| Error::Invalid(format!("{}: no such folder ({e})", dir.display())))?;
    if !meta.is_dir() {
        return Err(Error::Invalid(format!("{}: not a folder", dir.display())));
    }
    std::fs::canonicalize(dir).map_err(|e| Error::io("resolve", dir, e))
}

/// Checks mount folder `dir` (canonical): empty, not a mount point, no record for it.
fn check_dir(state_dir: &Path, dir: &Path) -> Result<()> {
    let mut rd = std::fs::read_dir(dir).map_err(|e| Error::io("read", dir, e))?;
    if rd.next().is_some() {
        return Err(Error::Invalid(format!(
            "{}: not empty (mount into an empty folder)",
            dir.display()
        )));
    }
    let own = std::fs::metadata(dir).map_err(|e| Error::io("read", dir, e))?;
    let parent_dev = dir
        .parent()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.dev());
    if system::is_mounted(dir) || parent_dev.is_some_and(|d| d != own.dev()) {
        return Err(Error::Invalid(format!(
            "{}: a mount point already",
            dir.display()
        )));
    }
    if record_path(state_dir, dir).exists() {
        return Err(Error::Invalid(format!(
            "{}: a vmbackup mount is recorded there already (`vmbackup umount {}`)",
            dir.display(),
            dir.display()
        )));
    }
    if dir.starts_with(state_dir) {
        return Err(Error::Invalid(format!(
            "{}: inside the state folder",
            dir.display()
        )));
    }
    Ok(())
}

/// The record of the mount being made, for `cleanup_now`: (its path, its state folder).
static CURRENT: Mutex<Option<PathBuf>> = Mutex::new(None);

fn set_current(p: Option<PathBuf>) {
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = p;
}

/// Undoes the mount being made: for a process about to exit without unwinding (a second
/// stop signal).
pub fn cleanup_now() {
    let Some(path) = CURRENT.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    if let Ok(rec) = load(&path) {
        let _ = teardown(&path, &rec, true);
    }
}

/// Undoes a `mount` that did not complete, when dropped armed.
struct Undo {
    path: PathBuf,
    rec: Record,
    armed: bool,
}

impl Undo {
    fn save(&self) -> Result<()> {
        save(&self.path, &self.rec)
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if self.armed {
            tracing::warn!(dir = %self.rec.dir.display(), "undoing the mount");
            if let Err(e) = teardown(&self.path, &self.rec, true) {
                tracing::error!(
                    "could not undo everything: {} (`vmbackup umount {}` retries)",
                    crate::error::chain(&e),
                    self.rec.dir.display()
                );
            }
        }
        set_current(None);
    }
}

fn interrupted() -> Result<()> {
    if crate::interrupt::requested() {
        return Err(Error::Interrupted);
    }
    Ok(())
}

/// Mounts backup `opts.id` of `repo` under `opts.dir`. The repository is opened by the
/// caller only to check the input; the background process opens it again and holds it.
pub fn mount(repo: &Repository, state_dir: &Path, opts: &Options) -> Result<Record> {
    let m = repo.load(&opts.id)?;
    let chosen = crate::serve::chosen_disks(&m, &opts.disks)?;
    if let Some(d) = chosen.iter().find(|d| !system::safe_target(&d.target)) {
        return Err(Error::Invalid(format!(
            "backup {}: disk target {:?} is not a safe file name",
            m.id, d.target
        )));
    }
    let dir = canonical_dir(&opts.dir)?;
    std::fs::create_dir_all(state_dir).map_err(|e| Error::io("create", state_dir, e))?;
    let state_dir =
        std::fs::canonicalize(state_dir).map_err(|e| Error::io("resolve", state_dir, e))?;
    check_dir(&state_dir, &dir)?;
    repo.check_complete(&m)?;
    interrupted()?;

    let private = private_path(&state_dir, &dir);
    let path = record_path(&state_dir, &dir);
    let mut undo = Undo {
        path: path.clone(),
        rec: Record {
            dir: dir.clone(),
            private: private.clone(),
            backup: m.id.clone(),
            vm: m.vm_name.clone(),
            daemon: None,
            log: private.join("daemon.log"),
            disks: Vec::new(),
            filesystems: Vec::new(),
            skipped: Vec::new(),
        },
        armed: true,
    };
    undo.save()?;
    set_current(Some(path.clone()));
    std::fs::create_dir(&private).map_err(|e| Error::io("create", &private, e))?;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("set the mode of", &private, e))?;
    let disks_dir = private.join("disks");
    std::fs::create_dir(&disks_dir).map_err(|e| Error::io("create", &disks_dir, e))?;

    start_daemon(&mut undo, opts, &chosen, &disks_dir)?;
    for d in &chosen {
        let file = disks_dir.join(&d.target);
        let size = std::fs::metadata(&file)
            .map_err(|e| Error::io("read", &file, e))?
            .len();
        undo.rec.disks.push(DiskFile {
            target: d.target.clone(),
            file,
            size,
        });
    }
    undo.save()?;

    for i in 0..undo.rec.disks.len() {
        interrupted()?;
        let d = undo.rec.disks[i].clone();
        for (partition, offset, size, found) in find(&d)? {
            interrupted()?;
            match found.and_then(|t| system::how_to_mount(&t).map(|h| (t, h))) {
                Ok((fstype, (kernel_type, options))) => {
                    if let Err(e) = attach_and_mount(
                        &mut undo,
                        &d,
                        partition,
                        (offset, size),
                        (&fstype, kernel_type, options),
                    ) {
                        if matches!(e, Error::Interrupted) {
                            return Err(e);
                        }
                        // A file system the kernel refuses: listed, the others mounted.
                        tracing::warn!(disk = %d.target, ?partition, "not mounted: {}", crate::error::chain(&e));
                        undo.rec.skipped.push(Skipped {
                            disk: d.target.clone(),
                            partition,
                            what: format!("{fstype}: {}", crate::error::chain(&e)),
                        });
                        undo.save()?;
                    }
                }
                Err(why) => {
                    undo.rec.skipped.push(Skipped {
                        disk: d.target.clone(),
                        partition,
                        what: why,
                    });
                    undo.save()?;
                }
            }
        }
    }
    if !undo.rec.filesystems.iter().any(|f| f.mounted) {
        let found: Vec<String> = undo.rec.skipped.iter().map(describe_skipped).collect();
        return Err(MountError::NothingMountable {
            id: m.id.clone(),
            found: found.join("; "),
        }
        .into());
    }
    interrupted()?;
    undo.armed = false;
    let rec = undo.rec.clone();
    drop(undo);
    Ok(rec)
}

/// A skipped thing in words: `vda partition 2: swap space`.
pub fn describe_skipped(s: &Skipped) -> String {
    match s.partition {
        Some(n) => format!("{} partition {n}: {}", s.disk, s.what),
        None => format!("{}: {}", s.disk, s.what),
    }
}

/// What the file systems of disk `d` are: (partition, offset, size, its type or why none).
type Found = (Option<u32>, u64, u64, std::result::Result<String, String>);

fn find(d: &DiskFile) -> Result<Vec<Found>> {
    let whole = system::probe(&d.file, None)?;
    if let Some(t) = whole.get("TYPE") {
        return Ok(vec![(None, 0, d.size, Ok(t.clone()))]);
    }
    if !whole.contains_key("PTTYPE") {
        return Ok(vec![(
            None,
            0,
            d.size,
            Err("no file system or partition table found".into()),
        )]);
    }
    let mut f = std::fs::File::open(&d.file).map_err(|e| Error::io("open", &d.file, e))?;
    let mut read = |off: u64, buf: &mut [u8]| {
        use std::io::{Read, Seek, SeekFrom};
        f.seek(SeekFrom::Start(off))?;
        f.read_exact(buf)
    };
    let t = match table::read_table(&mut read, d.size) {
        Ok(t) => t,
        Err(e) => {
            return Ok(vec![(None, 0, d.size, Err(crate::error::chain(&e)))]);
        }
    };
    let mut out = Vec::new();
    for p in t.partitions() {
        let probe = system::probe(&d.file, Some((p.offset, p.size)))?;
        let found = match probe.get("TYPE") {
            Some(t) => Ok(t.clone()),
            None => Err("no file system found".into()),
        };
        out.push((Some(p.number), p.offset, p.size, found));
    }
    if out.is_empty() {
        out.push((None, 0, d.size, Err("an empty partition table".into())));
    }
    Ok(out)
}

/// Attaches a file system read-only to a loop device and mounts it under DIR.
fn attach_and_mount(
    undo: &mut Undo,
    d: &DiskFile,
    partition: Option<u32>,
    (offset, size): (u64, u64),
    (fstype, kernel_type, options): (&str, &str, &str),
) -> Result<()> {
    let mountpoint = undo.rec.dir.join(system::mount_name(&d.target, partition));
    // The guest's files are data to copy, never host programs or devices: no set-uid bits,
    // device nodes or execution from a backup (a guest may have planted them).
    let options = format!("{options},{}", system::HOST_SAFE);
    let i = undo.rec.filesystems.len();
    undo.rec.filesystems.push(Mounted {
        disk: d.target.clone(),
        partition,
        offset,
        size,
        fstype: fstype.to_string(),
        options: options.to_string(),
        loop_device: None,
        mountpoint: mountpoint.clone(),
        made_folder: false,
        mounted: false,
    });
    let r = (|| {
        let dev = run(
            "losetup",
            &[
                OsStr::new("--find"),
                OsStr::new("--show"),
                OsStr::new("--read-only"),
                OsStr::new("--offset"),
                OsStr::new(&offset.to_string()),
                OsStr::new("--sizelimit"),
                OsStr::new(&size.to_string()),
                d.file.as_os_str(),
            ],
        )?;
        let dev = PathBuf::from(dev.trim());
        undo.rec.filesystems[i].loop_device = Some(dev.clone());
        undo.save()?;
        std::fs::create_dir(&mountpoint).map_err(|e| Error::io("create", &mountpoint, e))?;
        undo.rec.filesystems[i].made_folder = true;
        undo.save()?;
        interrupted()?;
        run(
            "mount",
            &[
                OsStr::new("-t"),
                OsStr::new(kernel_type),
                OsStr::new("-o"),
                OsStr::new(&options),
                dev.as_os_str(),
                mountpoint.as_os_str(),
            ],
        )?;
        undo.rec.filesystems[i].mounted = true;
        undo.save()?;
        tracing::info!(disk = %d.target, ?partition, fstype, at = %mountpoint.display(), "mounted read-only");
        Ok(())
    })();
    if r.is_err() {
        // This one undone at once; the others stay.
        let f = undo.rec.filesystems.remove(i);
        undo_fs(&f, &undo.rec.private, true, &mut Vec::new())?;
        undo.save()?;
    }
    r
}

/// /proc/PID/stat's start time, when PID runs.
fn start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name's closing parenthesis: field 3 on; the start time is field 22.
    let rest = &s[s.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether the recorded daemon still runs (the same process: start time and command line).
fn daemon_alive(d: &Daemon, private: &Path) -> bool {
    if start_time(d.pid) != Some(d.start_time) {
        return false;
    }
    std::fs::read(format!("/proc/{}/cmdline", d.pid)).is_ok_and(|c| {
        let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
        args.contains(&DAEMON_COMMAND.as_bytes())
            && args.contains(&private.join("disks").as_os_str().as_encoded_bytes())
    })
}

/// Starts the background process and waits until its FUSE file system is mounted.
fn start_daemon(
    undo: &mut Undo,
    opts: &Options,
    chosen: &[&crate::repository::manifest::DiskEntry],
    at: &Path,
) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("find", "the vmbackup binary", e))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&undo.rec.log)
        .map_err(|e| Error::io("create", &undo.rec.log, e))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&opts.global_args)
        .arg(DAEMON_COMMAND)
        .arg("--at")
        .arg(at)
        .arg(&undo.rec.backup);
    for d in chosen {
        cmd.arg("--disk").arg(&d.target);
    }
    cmd.current_dir("/")
        .env_remove("VMBACKUP_JSON")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log);
    // SAFETY: `setsid` is async-signal-safe and touches no memory of this process; the child
    // becomes the leader of a new session, so the terminal's signals do not reach it.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io("start", "the background process", e))?;
    let pid = child.id() as i32;
    undo.rec.daemon = start_time(pid).map(|start_time| Daemon { pid, start_time });
    undo.save()?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let t0 = Instant::now();
    loop {
        interrupted()?;
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.trim() == fuse::READY => return Ok(()),
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().ok();
                let why = last_error(&undo.rec.log);
                let code = status.and_then(|s| s.code());
                return Err(match code {
                    Some(2) => Error::Invalid(why),
                    Some(4) => Error::Busy(why),
                    _ => MountError::Daemon(why).into(),
                });
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if t0.elapsed() > DAEMON_START {
                    return Err(MountError::Daemon(format!(
                        "no FUSE file system within {} s (see {})",
                        DAEMON_START.as_secs(),
                        undo.rec.log.display()
                    ))
                    .into());
                }
            }
        }
    }
}

/// The last `error:` line of a daemon's log (or its last line).
fn last_error(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.starts_with("error: "))
        .map(|l| l.trim_start_matches("error: ").to_string())
        .or_else(|| text.lines().last().map(str::to_string))
        .unwrap_or_else(|| "it exited without a word".into())
}

/// What `umount` did.
#[derive(Debug, Clone, Default, Serialize, schemars::JsonSchema)]
pub struct Cleaned {
    pub dir: PathBuf,
    /// The backup's id.
    #[serde(rename = "backup_id")]
    pub backup: String,
    pub done: Vec<String>,
}

/// `vmbackup umount DIR`: undoes the mount recorded for DIR. Bad input (no such folder, no
/// vmbackup mount there) changes nothing.
pub fn umount(state_dir: &Path, dir: &Path) -> Result<Cleaned> {
    let dir = canonical_dir(dir)?;
    let state_dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let path = record_path(&state_dir, &dir);
    if !path.exists() {
        return Err(Error::Invalid(format!(
            "{}: not a vmbackup mount (no record of one in {})",
            dir.display(),
            state_dir.display()
        )));
    }
    let rec = load(&path)?;
    let done = teardown(&path, &rec, false)?;
    Ok(Cleaned {
        dir,
        backup: rec.backup,
        done,
    })
}

/// Unmounts one file system, detaches its loop device and removes its mount folder.
fn undo_fs(f: &Mounted, private: &Path, lazy: bool, done: &mut Vec<String>) -> Result<()> {
    if system::is_mounted(&f.mountpoint) {
        if let Err(e) = run("umount", &[f.mountpoint.as_os_str()]) {
            if !lazy {
                return Err(MountError::Busy {
                    path: f.mountpoint.clone(),
                    detail: e.to_string(),
                }
                .into());
            }
            run("umount", &[OsStr::new("-l"), f.mountpoint.as_os_str()])?;
        }
        done.push(format!("unmounted {}", f.mountpoint.display()));
    }
    if let Some(dev) = &f.loop_device {
        if system::loop_backed_under(dev, private) {
            run("losetup", &[OsStr::new("-d"), dev.as_os_str()])?;
            done.push(format!("detached {}", dev.display()));
        }
    }
    if f.made_folder && f.mountpoint.is_dir() {
        std::fs::remove_dir(&f.mountpoint).map_err(|e| Error::io("remove", &f.mountpoint, e))?;
    }
    Ok(())
}

/// Undoes everything `rec` records (and any loop device backed by its private folder), then
/// removes the record. `lazy`: busy file systems are detached lazily (undoing a failed
/// mount) rather than refused (`umount`).
fn teardown(path: &Path, rec: &Record, lazy: bool) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for f in rec.filesystems.iter().rev() {
        undo_fs(f, &rec.private, lazy, &mut done)?;
    }
    // Loop devices attached but not recorded (a kill between losetup and the record).
    for dev in system::loops_under(&rec.private) {
        run("losetup", &[OsStr::new("-d"), dev.as_os_str()])?;
        done.push(format!("detached {}", dev.display()));
    }
    let fuse_at = rec.private.join("disks");
    let alive = rec
        .daemon
        .as_ref()
        .is_some_and(|d| daemon_alive(d, &rec.private));
    let fuse_mounted = system::is_mounted(&fuse_at);
    if fuse_mounted {
        if run("umount", &[fuse_at.as_os_str()]).is_err() {
            run("umount", &[OsStr::new("-l"), fuse_at.as_os_str()])?;
        }
        done.push(format!(
            "unmounted the backup's disks ({}){}",
            fuse_at.display(),
            if alive {
                ""
            } else {
                ": their process had died"
            }
        ));
    }
    if let Some(d) = rec.daemon.as_ref().filter(|_| alive) {
        // Once its file system is unmounted it ends by itself; before (a mount being
        // undone early), it is asked to.
        stop_daemon(d, &rec.private, fuse_mounted);
        done.push(format!("stopped the background process {}", d.pid));
    }
    if rec.private.exists() {
        if system::is_mounted(&fuse_at) {
            return Err(MountError::Busy {
                path: fuse_at,
                detail: "still mounted".into(),
            }
            .into());
        }
        std::fs::remove_dir_all(&rec.private).map_err(|e| Error::io("remove", &rec.private, e))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io("remove", path, e))
        }
        _ => {}
    }
    Ok(done)
}

/// Waits for the daemon to end (`ends_itself`: its file system was just unmounted), then
/// SIGTERM, then SIGKILL.
fn stop_daemon(d: &Daemon, private: &Path, ends_itself: bool) {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(d.pid);
    if !ends_itself {
        let _ = kill(pid, Signal::SIGTERM);
    }
    for (wait, then) in [
        (Duration::from_secs(5), Some(Signal::SIGTERM)),
        (Duration::from_secs(5), Some(Signal::SIGKILL)),
        (Duration::from_secs(5), None),
    ] {
        let t0 = Instant::now();
        while t0.elapsed() < wait {
            // A child of this process (a mount being undone) is reaped here.
            let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            if !daemon_alive(d, private) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(s) = then {
            tracing::warn!(pid = d.pid, "the background process did not end: {s}");
            let _ = kill(pid, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_keyed_by_the_folder_and_stay_in_the_state_folder() {
        let s = Path::new("/var/lib/vmbackup");
        let a = record_path(s, Path::new("/mnt/a"));
        assert_ne!(a, record_path(s, Path::new("/mnt/b")));
        assert_eq!(a.parent(), Some(s));
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(PREFIX) && name.ends_with(".json"),
            "{name}"
        );
        assert_eq!(
            private_path(s, Path::new("/mnt/a")).with_extension("json"),
            a
        );
    }

    #[test]
    fn a_folder_must_exist_be_empty_and_not_be_a_mount_point() {
        let state = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        let dir = canonical_dir(d.path()).unwrap();
        check_dir(state.path(), &dir).unwrap();
        std::fs::write(dir.join("x"), b"x").unwrap();
        let e = check_dir(state.path(), &dir).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
        assert_eq!(e.exit_code(), 2);
        assert_eq!(
            canonical_dir(&dir.join("x")).unwrap_err().exit_code(),
            2,
            "a file"
        );
        assert_eq!(canonical_dir(&dir.join("nope")).unwrap_err().exit_code(), 2);
        let e = check_dir(state.path(), Path::new("/proc")).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn the_daemons_start_time_is_read_from_proc() {
        let me = std::process::id() as i32;
        let t = start_time(me).unwrap();
        assert!(t > 0);
        assert_eq!(start_time(me), Some(t));
        assert_eq!(start_time(i32::MAX), None);
    }

    #[test]
    fn the_last_error_of_a_log() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "info: x\nerror: busy: a gc holds it\nthen\n").unwrap();
        assert_eq!(last_error(f.path()), "busy: a gc holds it");
    }
}
