//! The backup pipeline for libvirt domains.
//!
//! Running VM: pre-flight, then one atomic disk-only external snapshot of every disk with
//! libvirt's quiesce flag: libvirtd freezes the guest's filesystems through the agent, takes
//! the snapshot and thaws, all inside one call, so the freeze covers only the snapshot, every
//! agent call has a deadline (the agent response timeout), and the thaw happens even if this
//! process dies meanwhile. The call's duration is recorded as the freeze time (an upper
//! bound). Then copy the now read-only images into the repository; commit the overlays back with an active commit and pivot, check that the
//! live and the inactive XML point at the original images again, and delete the overlays. The
//! commit back runs whatever happened to the copy.
//!
//! Shut-off VM: no snapshot; the images are read under a lock that keeps QEMU from opening
//! them for writing, so the VM cannot be started on a half-read disk.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{chain, Error, Result};
use crate::guest_agent;
use crate::hypervisor::libvirt::{Dom, Libvirt, PowerState};
use crate::hypervisor::vm::VmSpec;
use crate::hypervisor::xml_edit;
use crate::image::{self, ImageReader};
use crate::names;
use crate::preflight::{self, DiskFacts, Facts, Limits, Report, Space};
use crate::repository::disk::backup_disk;
use crate::repository::manifest::{new_backup_id, DiskEntry, Manifest, NicEntry};
use crate::repository::Repository;

/// `--quiesce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Quiesce {
    /// Fail unless the guest's filesystems can be frozen.
    Required,
    /// Freeze when the agent answers; otherwise a crash-consistent backup, recorded so.
    Preferred,
    /// Never freeze: crash-consistent.
    Off,
}

/// Settings of a backup run.
#[derive(Debug, Clone)]
pub struct Options {
    pub quiesce: Quiesce,
    pub limits: Limits,
    /// Where overlays are created; `None`: beside each disk image.
    pub overlay_dir: Option<PathBuf>,
    /// Longest the guest may stay frozen waiting for the agent (freeze and thaw calls).
    pub freeze_timeout: Duration,
    /// Longest a commit back may take before the VM is left, safely, on its overlay.
    pub commit_timeout: Duration,
    pub chunk_size: u64,
    pub threads: usize,
    /// The schedule that asked for this backup.
    pub schedule: Option<String>,
    /// The schedule occurrence it is made for (RFC 3339, UTC).
    pub scheduled_for: Option<String>,
    /// The `vmbackup` binary, started as a thaw guard (`thaw_guard`) while a plain QEMU
    /// guest is frozen; `None`: no guard.
    pub thaw_guard: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            quiesce: Quiesce::Preferred,
            limits: Limits::default(),
            overlay_dir: None,
            freeze_timeout: Duration::from_secs(10),
            commit_timeout: Duration::from_secs(600),
            chunk_size: 4 << 20,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            schedule: None,
            scheduled_for: None,
            thaw_guard: None,
        }
    }
}

/// Set by the signal handler of the binary: stop at the next safe point.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(Error::Interrupted);
    }
    Ok(())
}

/// Free space of the filesystem holding `path` (or its nearest existing ancestor).
pub fn free_space(path: &Path) -> Result<Space> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            break;
        }
    }
    let st = nix::sys::statvfs::statvfs(&p).map_err(|e| {
        Error::io(
            "free space",
            &p,
            std::io::Error::from_raw_os_error(e as i32),
        )
    })?;
    Ok(Space {
        path: path.display().to_string(),
        free_bytes: (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64),
    })
}

fn device_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut p = path.to_path_buf();
    loop {
        if let Ok(m) = std::fs::metadata(&p) {
            return Some(m.dev());
        }
        if !p.pop() {
            return None;
        }
    }
}

/// The free space of each distinct filesystem among the folders the overlays go into.
fn overlay_spaces(overlays: impl IntoIterator<Item = PathBuf>) -> Result<Vec<Space>> {
    let mut seen: Vec<u64> = Vec::new();
    let mut spaces = Vec::new();
    for ov in overlays {
        let dir = ov.parent().map(Path::to_path_buf).unwrap_or_default();
        if let Some(dev) = device_of(&dir) {
            if !seen.contains(&dev) {
                seen.push(dev);
                spaces.push(free_space(&dir)?);
            }
        }
    }
    Ok(spaces)
}

/// Where the overlay of `disk_source` goes.
fn overlay_path(opts: &Options, vm: &str, target: &str, source: &str, id: &str) -> PathBuf {
    let dir = match &opts.overlay_dir {
        Some(d) => d.clone(),
        None => Path::new(source)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/")),
    };
    dir.join(format!("{vm}.{target}.vmbackup-{id}.qcow2"))
}

/// The domain, its parsed definition and the facts the pre-flight checks look at.
pub struct Subject {
    pub dom: Dom,
    pub spec: VmSpec,
    pub inactive_xml: String,
    pub running: bool,
    pub facts: Facts,
}

/// Looks the VM up and gathers the figures of the pre-flight checks.
pub fn survey(lv: &Libvirt, name: &str, repo_dir: &Path, opts: &Options) -> Result<Subject> {
    names::check_component(name)?;
    let dom = lv.domain(name)?;
    let running = dom.state()? != PowerState::ShutOff;
    let inactive_xml = dom.inactive_xml()?;
    // The running definition names the images in use now.
    let spec = VmSpec::from_xml(&if running {
        dom.live_xml()?
    } else {
        inactive_xml.clone()
    })?;
    let mut disks = Vec::new();
    let mut overlays = Vec::new();
    for d in &spec.disks {
        let mut f = DiskFacts {
            target: d.target.clone(),
            device: d.device.clone(),
            kind: d.kind.clone(),
            source: d.source.clone(),
            readonly: d.readonly,
            shareable: d.shareable,
            virtual_size: 0,
            allocated_size: 0,
        };
        if let (Ok(None), Some(src)) = (preflight::disk_rule(&f), &d.source) {
            let info = image::info(Path::new(src))?;
            f.virtual_size = info.virtual_size;
            f.allocated_size = info.actual_size;
            if running {
                overlays.push(overlay_path(opts, name, &d.target, src, "x"));
            }
        }
        disks.push(f);
    }
    let overlay_spaces = overlay_spaces(overlays)?;
    let facts = Facts {
        vm: name.to_string(),
        memory_bytes: spec.memory_bytes,
        disks,
        overlay_spaces,
        repository: free_space(repo_dir)?,
    };
    Ok(Subject {
        dom,
        spec,
        inactive_xml,
        running,
        facts,
    })
}

/// The pre-flight verdict, with `--quiesce required` on a VM without an agent channel counted
/// as a refusal too.
pub fn preflight(subject: &Subject, opts: &Options) -> Report {
    let mut report = preflight::evaluate(&subject.facts, &opts.limits);
    if opts.quiesce == Quiesce::Required && subject.running && !subject.spec.agent_channel {
        report.ok = false;
        report.checks.push(preflight::Check {
            name: "quiesce".into(),
            ok: false,
            found: 0,
            limit: 1,
            message: "--quiesce required, but the VM has no guest agent channel".into(),
        });
    }
    report
}

/// Holds a VM's operation lock (backup or restore) until dropped.
pub struct VmLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Takes the operation lock of VM `name` in `state_dir`; `Error::Busy` when another
/// operation holds it.
pub fn lock_vm(state_dir: &Path, name: &str) -> Result<VmLock> {
    names::check_component(name)?;
    let dir = state_dir.join("locks");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create lock folder", &dir, e))?;
    let path = dir.join(format!("{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("open lock", &path, e))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(VmLock { _lock: lock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(Error::Busy(format!(
            "another backup or restore of {name} is running"
        ))),
        Err((_, e)) => Err(Error::io(
            "lock",
            &path,
            std::io::Error::from_raw_os_error(e as i32),
        )),
    }
}

/// The repository's shared lock, so that no gc runs while this backup writes.
fn lock_repo(repo: &Repository) -> Result<crate::repository::maintain::RepoLock> {
    repo.lock_for_backup()?
        .ok_or_else(|| Error::Busy("a gc of the repository is running".into()))
}

/// Keeps QEMU from opening an image for writing while it is read: QEMU's own image locking
/// refuses the write permission while another process holds a shared lock on byte 201
/// ("write is not shared"). Released when dropped.
pub struct NoWriters {
    _file: File,
}

fn ofd_lock(kind: libc::c_int, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

/// Takes the lock of `NoWriters` on an image; `Error::Busy` when a process (a running QEMU)
/// already has the image open for writing, which it shows by a lock on byte 101.
pub fn forbid_writers(path: &Path) -> Result<NoWriters> {
    use nix::fcntl::{fcntl, FcntlArg};
    let file = File::open(path).map_err(|e| Error::io("open image", path, e))?;
    let busy = |why: String| Error::Busy(format!("{} is in use: {why}", path.display()));
    fcntl(
        file.as_raw_fd(),
        FcntlArg::F_OFD_SETLK(&ofd_lock(libc::F_RDLCK, 201)),
    )
    .map_err(|e| busy(e.to_string()))?;
    let mut probe = ofd_lock(libc::F_WRLCK, 101);
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut probe)).map_err(|e| busy(e.to_string()))?;
    if probe.l_type != libc::F_UNLCK as libc::c_short {
        return Err(busy("another process has it open for writing".into()));
    }
    Ok(NoWriters { _file: file })
}

/// What a finished backup reports.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub id: String,
    pub vm: String,
    pub consistency: String,
    pub consistency_reason: Option<String>,
    pub freeze_ms: Option<u64>,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    pub duration_ms: u64,
    pub skipped_disks: Vec<preflight::SkippedDisk>,
}

fn now_utc() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Millisecond)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// One disk that is backed up: its target, image and format, and its overlay while the VM runs
/// on one.
struct Work {
    target: String,
    source: String,
    format: String,
    overlay: Option<PathBuf>,
}

/// Backs up VM `name` into `repo`. The pre-flight report is returned in the error when it
/// refuses.
pub fn backup(
    lv: &Libvirt,
    repo: &Repository,
    state_dir: &Path,
    name: &str,
    opts: &Options,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<Outcome> {
    let started = Instant::now();
    let started_at = now_utc();
    names::check_component(name)?;
    let dom = lv.domain(name)?;
    let _lock = lock_vm(state_dir, name)?;
    // A run killed between its snapshot and its commit left the VM on overlays: finish it.
    let recovered = crate::recover::recover_vm(lv, &dom, opts)?.disks;
    if !recovered.is_empty() {
        tracing::warn!(
            vm = name,
            disks = recovered.len(),
            "finished an interrupted backup's commit back"
        );
    }
    drop(dom);
    let subject = survey(lv, name, repo.path(), opts)?;
    let report = preflight(&subject, opts);
    if !report.ok {
        return Err(Error::Refused(Box::new(report)));
    }
    let _repo_lock = lock_repo(repo)?;
    check_interrupted()?;
    let id = new_backup_id(name, jiff::Timestamp::now().as_second().max(0) as u64);
    let dom = &subject.dom;
    let mut work: Vec<Work> = Vec::new();
    for t in &report.disks {
        let d = subject
            .spec
            .disks
            .iter()
            .find(|d| &d.target == t)
            .expect("pre-flight lists only the VM's disks");
        let source = d.source.clone().unwrap_or_default();
        work.push(Work {
            target: t.clone(),
            format: d.format.clone().unwrap_or_else(|| "raw".into()),
            overlay: subject
                .running
                .then(|| overlay_path(opts, name, t, &source, &id)),
            source,
        });
    }

    // Guest addresses, while the agent still answers.
    let guest_ifs = if subject.running && subject.spec.agent_channel {
        guest_agent::interfaces(dom).unwrap_or_default()
    } else {
        Vec::new()
    };

    let mut consistency = "crash".to_string();
    let mut reason: Option<String> = None;
    let mut freeze_ms = None;
    let mut _no_writers = Vec::new();
    if subject.running {
        let snap = snapshot_xml(&id, &subject.spec, &work);
        let overlays = OverlayFiles::create(&work, &subject.facts)?;
        let quiesce = match opts.quiesce {
            Quiesce::Off => {
                reason = Some("--quiesce off".into());
                false
            }
            _ if !subject.spec.agent_channel => {
                reason = Some("the VM has no guest agent channel".into());
                false
            }
            _ => true,
        };
        if quiesce {
            // Bounds every agent call libvirt makes for the freeze and the thaw.
            dom.set_agent_timeout(opts.freeze_timeout)?;
            let t = Instant::now();
            match dom.snapshot_disk_only(&snap, true) {
                Ok(()) => {
                    // Freeze, snapshot and thaw happen inside this one call: its duration
                    // bounds how long the guest was frozen.
                    freeze_ms = Some(t.elapsed().as_millis() as u64);
                    consistency = "application".into();
                }
                Err(e) => {
                    // libvirt thaws only after a freeze it saw succeed; one it gave up on may
                    // still be completed by the agent: make sure the guest is thawed first.
                    tracing::warn!(vm = name, error = %chain(&e), "the quiesced snapshot failed");
                    let deadline = guest_agent::thaw_deadline(opts.freeze_timeout);
                    let was_frozen = guest_agent::ensure_thawed(dom, deadline)?;
                    if opts.quiesce != Quiesce::Preferred {
                        return Err(e);
                    }
                    tracing::warn!(vm = name, "cannot freeze; the backup is crash-consistent");
                    let thawed = if was_frozen {
                        "; the guest froze late and was thawed"
                    } else {
                        ""
                    };
                    reason = Some(format!("freeze failed: {}{thawed}", chain(&e)));
                    check_interrupted()?;
                    dom.snapshot_disk_only(&snap, false)?;
                }
            }
        } else {
            dom.snapshot_disk_only(&snap, false)?;
        }
        // The VM runs on the overlays now: they are removed by the commit back, not here.
        overlays.keep();
        tracing::info!(vm = name, freeze_ms, "snapshot taken");
    } else {
        consistency = "application".into();
        reason = Some("the VM was shut off".into());
        for w in &work {
            _no_writers.push(forbid_writers(Path::new(&w.source))?);
        }
        if dom.state()? != PowerState::ShutOff {
            return Err(Error::Busy(format!(
                "{name} was started while the backup began"
            )));
        }
    }

    let copy = copy_disks(repo, &id, name, &subject.facts, &work, opts, progress);
    let commit = if subject.running {
        commit_back(lv, dom, &work, opts)
    } else {
        Ok(())
    };
    let (entries, logical, stored) = match (copy, commit) {
        (Ok(c), Ok(())) => c,
        (Err(e), _) | (Ok(_), Err(e)) => {
            if let Err(d) = repo.discard_unpublished(&id) {
                tracing::warn!(vm = name, id = %id, error = %d, "cannot discard the failed backup's objects");
            }
            return Err(e);
        }
    };

    let nics = subject
        .spec
        .nics
        .iter()
        .map(|n| NicEntry {
            mac: n.mac.clone(),
            model: n.model.clone(),
            kind: n.kind.clone(),
            source: n.source.clone(),
            ips: ips_of(&guest_ifs, n.mac.as_deref()),
        })
        .collect();
    let description = repo.put_domain_xml(&id, &subject.inactive_xml)?;
    finish(
        repo,
        Manifest {
            format_version: 1,
            id,
            vm_name: name.to_string(),
            vm_uuid: subject.spec.uuid.clone(),
            started_at,
            ended_at: now_utc(),
            consistency,
            consistency_reason: reason,
            freeze_ms,
            vcpus: subject.spec.vcpus,
            memory_bytes: subject.spec.memory_bytes,
            disks: entries,
            nics,
            domain_xml_object: description,
            schedule: opts.schedule.clone(),
            scheduled_for: opts.scheduled_for.clone(),
            stored_bytes: stored,
            logical_bytes: logical,
        },
        started,
        report.skipped_disks,
    )
}

/// The guest addresses recorded for the vNIC with `mac` (link-local ones left out).
fn ips_of(ifs: &[guest_agent::GuestInterface], mac: Option<&str>) -> Vec<String> {
    ifs.iter()
        .filter(|g| mac.is_some() && g.mac.as_deref() == mac)
        .flat_map(|g| g.ips.iter().filter(|ip| !ip.starts_with("fe80:")).cloned())
        .collect()
}

/// Publishes the manifest (the backup becomes visible) and reports.
fn finish(
    repo: &Repository,
    manifest: Manifest,
    started: Instant,
    skipped_disks: Vec<preflight::SkippedDisk>,
) -> Result<Outcome> {
    repo.publish(&manifest)?;
    tracing::info!(vm = %manifest.vm_name, id = %manifest.id, consistency = %manifest.consistency, "backup published");
    Ok(Outcome {
        id: manifest.id,
        vm: manifest.vm_name,
        consistency: manifest.consistency,
        consistency_reason: manifest.consistency_reason,
        freeze_ms: manifest.freeze_ms,
        logical_bytes: manifest.logical_bytes,
        stored_bytes: manifest.stored_bytes,
        duration_ms: started.elapsed().as_millis() as u64,
        skipped_disks,
    })
}

/// A plain QEMU VM as a backup sees it: its shape, the pre-flight facts, and (node name,
/// work) for each disk to back up.
struct QemuSubject {
    uuid: String,
    vcpus: u32,
    memory: u64,
    facts: Facts,
    work: Vec<(String, Work)>,
}

/// Checks that `name` is a plain QEMU VM of `qemu_dir`: a valid name with a QMP socket
/// there (bad input otherwise).
pub fn check_qemu_name(qemu_dir: &Path, name: &str) -> Result<()> {
    names::check_component(name)?;
    let qmp_path = qemu_dir.join(format!("{name}.qmp"));
    if !qmp_path.exists() {
        return Err(Error::NoQemu {
            name: name.to_string(),
            path: qmp_path,
        });
    }
    Ok(())
}

/// Connects to the plain QEMU VM `name` of `qemu_dir`.
fn open_qemu(qemu_dir: &Path, name: &str) -> Result<crate::hypervisor::qmp::QemuVm> {
    check_qemu_name(qemu_dir, name)?;
    Ok(crate::hypervisor::qmp::QemuVm::open(qemu_dir, name)?)
}

/// Gathers what the pre-flight checks of plain QEMU VM `q` look at; overlays are named
/// after backup `id`.
fn survey_qemu(
    q: &crate::hypervisor::qmp::QemuVm,
    repo_dir: &Path,
    opts: &Options,
    id: &str,
) -> Result<QemuSubject> {
    let name = q.name();
    let (uuid, vcpus, memory) = q.shape()?;
    let qdisks = q.disks()?;
    let mut disks = Vec::new();
    for d in &qdisks {
        let mut f = DiskFacts {
            target: d.device.clone(),
            device: if d.removable { "cdrom" } else { "disk" }.into(),
            kind: "file".into(),
            source: Some(d.file.clone()),
            readonly: d.read_only,
            shareable: false,
            virtual_size: d.virtual_size,
            allocated_size: 0,
        };
        if let Ok(None) = preflight::disk_rule(&f) {
            let info = image::info(Path::new(&d.file))?;
            f.virtual_size = info.virtual_size;
            f.allocated_size = info.actual_size;
        }
        disks.push(f);
    }
    let mut work = Vec::new();
    for (d, f) in qdisks.iter().zip(&disks) {
        if !matches!(preflight::disk_rule(f), Ok(None)) {
            continue;
        }
        let ov = overlay_path(opts, name, &d.device, &d.file, id);
        work.push((
            d.node_name.clone(),
            Work {
                target: d.device.clone(),
                source: d.file.clone(),
                format: d.format.clone(),
                overlay: Some(ov),
            },
        ));
    }
    let overlay_spaces = overlay_spaces(
        work.iter()
            .filter_map(|(_, w): &(String, Work)| w.overlay.clone()),
    )?;
    let facts = Facts {
        vm: format!("qemu:{name}"),
        memory_bytes: memory,
        disks,
        overlay_spaces,
        repository: free_space(repo_dir)?,
    };
    Ok(QemuSubject {
        uuid,
        vcpus,
        memory,
        facts,
        work,
    })
}

/// `check qemu:NAME`: the pre-flight checks of a plain QEMU VM, alone; nothing is changed.
pub fn check_qemu(qemu_dir: &Path, name: &str, repo_dir: &Path, opts: &Options) -> Result<Report> {
    let q = open_qemu(qemu_dir, name)?;
    let subject = survey_qemu(&q, repo_dir, opts, "check")?;
    Ok(preflight::evaluate(&subject.facts, &opts.limits))
}

/// Backs up the plain QEMU VM `name` (sockets `NAME.qmp` and `NAME.qga` in `qemu_dir`):
/// freeze through its agent, one `transaction` snapshot of all disks, thaw, copy, commit
/// back. Same pre-flight checks, lock and repository as for libvirt VMs.
pub fn backup_qemu(
    repo: &Repository,
    state_dir: &Path,
    qemu_dir: &Path,
    name: &str,
    opts: &Options,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<Outcome> {
    let started = Instant::now();
    let started_at = now_utc();
    let q = open_qemu(qemu_dir, name)?;
    let label = format!("qemu:{name}");
    let _lock = lock_vm(state_dir, &format!("qemu-{name}"))?;
    // First finish what an interrupted run left: guest frozen, disks on overlays. This also
    // tells whether the agent answers.
    let recovered = crate::recover::recover_qemu(&q, opts)?;
    let id = new_backup_id(name, jiff::Timestamp::now().as_second().max(0) as u64);
    let QemuSubject {
        uuid,
        vcpus,
        memory,
        facts,
        work,
    } = survey_qemu(&q, repo.path(), opts, &id)?;
    let mut report = preflight::evaluate(&facts, &opts.limits);
    let agent = opts.quiesce != Quiesce::Off && recovered.agent;
    if opts.quiesce == Quiesce::Required && !agent {
        report.ok = false;
        report.checks.push(preflight::Check {
            name: "quiesce".into(),
            ok: false,
            found: 0,
            limit: 1,
            message: "--quiesce required, but the guest agent does not answer".into(),
        });
    }
    if !report.ok {
        return Err(Error::Refused(Box::new(report)));
    }
    let _repo_lock = lock_repo(repo)?;
    check_interrupted()?;
    let guest_ifs = if agent {
        q.guest_interfaces().unwrap_or_default()
    } else {
        Vec::new()
    };

    let (mut consistency, mut reason, mut freeze_ms) = ("crash".to_string(), None, None);
    let overlays: Vec<(String, PathBuf)> = work
        .iter()
        .filter_map(|(node, w)| w.overlay.clone().map(|o| (node.clone(), o)))
        .collect();
    // Started before the freeze: thaws the guest if this process dies while it is frozen
    // (no libvirtd does it here). Disarmed once the guest is thawed.
    let mut guard = match (&opts.thaw_guard, agent) {
        (Some(program), true) => Some(crate::thaw_guard::ThawGuard::spawn(
            program,
            q.qga_path(),
            opts.freeze_timeout,
        )?),
        _ => None,
    };
    let disarm = |g: &mut Option<crate::thaw_guard::ThawGuard>| {
        if let Some(g) = g.take() {
            g.disarm();
        }
    };
    let t = Instant::now();
    let frozen = if agent {
        match q.freeze(opts.freeze_timeout) {
            Ok(_) => true,
            Err(e) => {
                // A freeze that timed out may still complete in the guest: thaw regardless.
                if q.thaw(opts.freeze_timeout).is_ok() {
                    disarm(&mut guard);
                }
                if opts.quiesce == Quiesce::Required {
                    return Err(e.into());
                }
                reason = Some(format!("freeze failed: {}", chain(&e)));
                false
            }
        }
    } else {
        reason = Some(match opts.quiesce {
            Quiesce::Off => "--quiesce off".to_string(),
            _ => "the guest agent does not answer".to_string(),
        });
        false
    };
    let snap = q.snapshot(&overlays);
    if frozen {
        // Thaw before anything else, whether the snapshot worked or not.
        match q.thaw(opts.freeze_timeout) {
            Ok(_) => {
                freeze_ms = Some(t.elapsed().as_millis() as u64);
                consistency = "application".into();
                disarm(&mut guard);
            }
            Err(e) => reason = Some(format!("thaw failed: {}", chain(&e))),
        }
    }
    // Not disarmed: the guest may still be frozen; the guard tries to thaw it now.
    drop(guard);
    if let Err(e) = snap {
        for (_, o) in &overlays {
            let _ = std::fs::remove_file(o);
        }
        return Err(e.into());
    }
    let plain: Vec<Work> = work.into_iter().map(|(_, w)| w).collect();
    let copy = copy_disks(repo, &id, &label, &facts, &plain, opts, progress);
    let mut commit: Result<()> = Ok(());
    for w in &plain {
        let r = q
            .commit_back(&w.target, Path::new(&w.source), opts.commit_timeout)
            .map_err(Error::from)
            .and_then(|()| match &w.overlay {
                Some(o) => std::fs::remove_file(o).map_err(|e| Error::io("remove overlay", o, e)),
                None => Ok(()),
            });
        if let Err(e) = r {
            tracing::error!(vm = %label, disk = %w.target, error = %chain(&e), "commit back failed");
            if commit.is_ok() {
                commit = Err(e);
            }
        }
    }
    let (entries, logical, stored) = match (copy, commit) {
        (Ok(c), Ok(())) => c,
        (Err(e), _) | (Ok(_), Err(e)) => {
            let _ = repo.discard_unpublished(&id);
            return Err(e);
        }
    };
    let nics = guest_ifs
        .iter()
        .map(|g| NicEntry {
            mac: g.mac.clone(),
            model: None,
            kind: "qemu".into(),
            source: None,
            ips: ips_of(&guest_ifs, g.mac.as_deref()),
        })
        .collect();
    let description = format!("backups/{id}/qemu-block.json");
    repo.store()
        .put(&description, q.block_json()?.to_string().as_bytes())?;
    finish(
        repo,
        Manifest {
            format_version: 1,
            id,
            vm_name: label,
            vm_uuid: uuid,
            started_at,
            ended_at: now_utc(),
            consistency,
            consistency_reason: reason,
            freeze_ms,
            vcpus,
            memory_bytes: memory,
            disks: entries,
            nics,
            domain_xml_object: description,
            schedule: opts.schedule.clone(),
            scheduled_for: opts.scheduled_for.clone(),
            stored_bytes: stored,
            logical_bytes: logical,
        },
        started,
        report.skipped_disks,
    )
}

/// Overlay files made ahead of the snapshot; removed again unless the snapshot took them.
struct OverlayFiles {
    paths: Vec<PathBuf>,
}

impl OverlayFiles {
    fn create(work: &[Work], facts: &Facts) -> Result<OverlayFiles> {
        let mut made = OverlayFiles { paths: Vec::new() };
        for w in work {
            let Some(ov) = &w.overlay else { continue };
            let size = facts
                .disks
                .iter()
                .find(|d| d.target == w.target)
                .map(|d| d.virtual_size)
                .unwrap_or(0);
            // -u: the backing image is in use by QEMU; its size is known already.
            let out = std::process::Command::new("qemu-img")
                .args([
                    "create", "-q", "-u", "-f", "qcow2", "-F", &w.format, "-b", &w.source,
                ])
                .arg(ov)
                .arg(size.to_string())
                .output()
                .map_err(|e| Error::Command {
                    program: "qemu-img create".into(),
                    detail: e.to_string(),
                })?;
            if !out.status.success() {
                return Err(Error::Command {
                    program: format!("qemu-img create {}", ov.display()),
                    detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
            made.paths.push(ov.clone());
        }
        Ok(made)
    }

    fn keep(mut self) {
        self.paths.clear();
    }
}

impl Drop for OverlayFiles {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn snapshot_xml(id: &str, spec: &VmSpec, work: &[Work]) -> String {
    let esc = xml_edit::escape_attr;
    let mut x = format!("<domainsnapshot><name>vmbackup-{}</name><disks>", esc(id));
    for d in &spec.disks {
        match work.iter().find(|w| w.target == d.target) {
            Some(Work {
                overlay: Some(ov), ..
            }) => x.push_str(&format!(
                "<disk name='{}' snapshot='external'><driver type='qcow2'/><source file='{}'/></disk>",
                esc(&d.target),
                esc(&ov.to_string_lossy())
            )),
            _ => x.push_str(&format!("<disk name='{}' snapshot='no'/>", esc(&d.target))),
        }
    }
    x.push_str("</disks></domainsnapshot>");
    x
}

type Copied = (Vec<DiskEntry>, u64, u64);

fn copy_disks(
    repo: &Repository,
    id: &str,
    vm: &str,
    facts: &Facts,
    work: &[Work],
    opts: &Options,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<Copied> {
    let mut entries = Vec::new();
    let (mut logical, mut stored) = (0, 0);
    for w in work {
        check_interrupted()?;
        let reader = ImageReader::open(Path::new(&w.source), &w.format)?;
        let facts = facts
            .disks
            .iter()
            .find(|d| d.target == w.target)
            .expect("surveyed");
        let label = format!("{vm} {}", w.target);
        let b = backup_disk(
            repo,
            &reader,
            opts.chunk_size,
            opts.threads,
            &|done, total| progress(&label, done, total),
        )?;
        let index_object = repo.put_index(id, &w.target, &b.index)?;
        logical += b.logical_bytes;
        stored += b.stored_bytes_new;
        entries.push(DiskEntry {
            target: w.target.clone(),
            format: w.format.clone(),
            virtual_size: facts.virtual_size,
            allocated_size: facts.allocated_size,
            source: w.source.clone(),
            chunk_size: opts.chunk_size,
            index_object,
            logical_bytes: b.logical_bytes,
            stored_bytes: b.stored_bytes_new,
        });
    }
    Ok((entries, logical, stored))
}

/// Commits every overlay back into its original image, pivots, checks the live and inactive
/// definitions, and deletes the overlays. Tries every disk even when one fails.
/// Commits overlays `(target, overlay, original image)` of running VM `dom` back, as at the
/// end of a backup (for `recover`).
pub fn commit_overlays(
    lv: &Libvirt,
    dom: &Dom,
    disks: &[(String, String, String)],
    opts: &Options,
) -> Result<()> {
    let work: Vec<Work> = disks
        .iter()
        .map(|(target, overlay, image)| Work {
            target: target.clone(),
            source: image.clone(),
            format: String::new(),
            overlay: Some(PathBuf::from(overlay)),
        })
        .collect();
    commit_back(lv, dom, &work, opts)
}

fn commit_back(lv: &Libvirt, dom: &Dom, work: &[Work], opts: &Options) -> Result<()> {
    let mut first_err = None;
    for w in work {
        if let Some(ov) = &w.overlay {
            if let Err(e) = commit_one(dom, &w.target, &w.source, ov, opts.commit_timeout) {
                tracing::error!(vm = dom.name(), disk = %w.target, error = %e, "commit back failed");
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    // libvirt may leave the persistent definition pointing at the overlays.
    let mut inactive = dom.inactive_xml()?;
    let mut changed = false;
    for w in work {
        if xml_edit::disk_source(&inactive, &w.target)?.as_deref() != Some(w.source.as_str()) {
            inactive = xml_edit::set_disk_source(&inactive, &w.target, &w.source)?;
            changed = true;
        }
    }
    if changed {
        tracing::info!(
            vm = dom.name(),
            "restoring the persistent definition's disk paths"
        );
        lv.define(&inactive)?;
    }
    let live = dom.live_xml()?;
    let inactive = dom.inactive_xml()?;
    for w in work {
        for (which, xml) in [("live", &live), ("inactive", &inactive)] {
            let src = xml_edit::disk_source(xml, &w.target)?;
            if src.as_deref() != Some(w.source.as_str()) {
                return Err(Error::CommitBack(format!(
                    "after the commit, the {which} definition of {} disk {} points at {:?}, not {}",
                    dom.name(),
                    w.target,
                    src,
                    w.source
                )));
            }
        }
        if let Some(ov) = &w.overlay {
            std::fs::remove_file(ov).map_err(|e| Error::io("remove overlay", ov, e))?;
        }
    }
    Ok(())
}

fn commit_one(
    dom: &Dom,
    target: &str,
    original: &str,
    overlay: &Path,
    timeout: Duration,
) -> Result<()> {
    let start = Instant::now();
    dom.block_commit_active(target)?;
    let mut pause = Duration::from_millis(20);
    let mut pivoted = false;
    loop {
        match dom.block_job(target)? {
            Some((cur, end)) if !pivoted && end > 0 && cur == end => {
                pivoted = dom.block_job_pivot(target)?;
            }
            Some(_) => {}
            None if pivoted => break,
            None => {
                // The job ended without our pivot: only fine if the disk is back on its image.
                let live = dom.live_xml()?;
                if xml_edit::disk_source(&live, target)?.as_deref() == Some(original) {
                    break;
                }
                return Err(Error::CommitBack(format!(
                    "the commit of {} disk {target} ended without a pivot; the VM runs on {}",
                    dom.name(),
                    overlay.display()
                )));
            }
        }
        if start.elapsed() > timeout {
            let _ = dom.block_job_abort(target);
            return Err(Error::CommitBack(format!(
                "the commit of {} disk {target} took over {}s; the VM stays on {} until the next run",
                dom.name(),
                timeout.as_secs(),
                overlay.display()
            )));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    tracing::info!(
        vm = dom.name(),
        disk = target,
        ms = start.elapsed().as_millis() as u64,
        "committed back"
    );
    Ok(())
}
