//! The backup pipeline, one for every hypervisor (`VmHandle`).
//!
//! Its phases, each recorded in the journal before it starts (`journal::Phase`):
//! 1. pre-flight: finish what an interrupted run of this VM left (`VmHandle::recover` and the
//!    journal's leftovers), describe the VM, check the limits, make the overlay files;
//! 2. freeze the guest's filesystems through the agent (libvirt: inside the snapshot call);
//! 3. snapshot every disk at one instant: the VM runs on the overlays from now on;
//! 4. thaw; after a freeze or thaw that went wrong, ask the agent until the guest is thawed;
//! 5. copy the now read-only images into the repository;
//! 6. publish the manifest (only when every disk was copied);
//! 7. commit the overlays back, checked (live and persistent definition on the images);
//! 8. clean up: delete the overlays, or a failed run's unpublished objects.
//!
//! The commit back runs whatever happened to the copy, so a failure in any phase before it
//! leaves the VM on its original images and publishes nothing. A commit that fails after a
//! good copy keeps the published backup (its data was read from the frozen images) and
//! leaves the VM, safely, on its overlay: the next run or `recover` finishes it.
//!
//! A shut-off VM is read without a snapshot, under a lock that keeps QEMU from opening its
//! images for writing until the read is over.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::changes::{self, full_read_marker};
use crate::error::{chain, Error, Result};
use crate::hypervisor::vm::{GuestInterface, VmSpec};
use crate::hypervisor::{bitmap_name, Description, Freeze, Overlay, Tracked, VmHandle, VmShape};
use crate::image::{self, ImageReader};
use crate::journal::{Journal, Phase};
use crate::locks::lock_vm;
use crate::preflight::{self, Facts, Report, Space};
use crate::qcow2_bitmaps;
use crate::repository::disk::{backup_disk, backup_disk_changes, DiskIndex};
use crate::repository::maintain::RepoLock;
use crate::repository::manifest::{
    new_backup_id, DiskEntry, DiskRead, FileState, Manifest, NicEntry,
};
use crate::repository::Repository;
use crate::settings::{BackupSettings, Quiesce};
use crate::vm_ref::VmRef;
use crate::vm_state::{self, Captured};

fn check_interrupted() -> Result<()> {
    if crate::interrupt::requested() {
        return Err(Error::Interrupted);
    }
    Ok(())
}

/// The free space of each distinct filesystem among the folders the overlays go into, and
/// each distinct folder (who owns it, who may write to it).
fn overlay_spaces(
    overlays: impl IntoIterator<Item = PathBuf>,
) -> Result<(Vec<Space>, Vec<preflight::Folder>)> {
    let mut seen: Vec<u64> = Vec::new();
    let mut spaces = Vec::new();
    let mut folders: Vec<preflight::Folder> = Vec::new();
    for ov in overlays {
        let dir = ov.parent().map(Path::to_path_buf).unwrap_or_default();
        if !folders.iter().any(|f| Path::new(&f.path) == dir) {
            // A folder that does not exist yet fails later, when the overlay is created.
            if let Ok(f) = preflight::Folder::of(&dir) {
                folders.push(f);
            }
        }
        if let Some(dev) = crate::space::device_of(&dir) {
            if !seen.contains(&dev) {
                seen.push(dev);
                spaces.push(crate::space::free_space(&dir)?);
            }
        }
    }
    Ok((spaces, folders))
}

/// Longest file name (bytes) most Linux file systems take.
const NAME_MAX: usize = 255;

/// Where the overlay of disk `target` (image `image`) of backup `id` goes:
/// `<vm>.<target>.vmbackup-<id without its VM stem>.qcow2`, which names the VM once only so
/// that names of up to 200 characters fit into a file name. A name that is still too long
/// (a very long disk target) is bad input.
fn overlay_path(
    s: &BackupSettings,
    vm: &VmRef,
    target: &str,
    image: &str,
    id: &str,
) -> Result<PathBuf> {
    let dir = match &s.overlay_dir {
        Some(d) => d.clone(),
        None => Path::new(image)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/")),
    };
    let stem = format!("{}-", vm.stem());
    let when = id.strip_prefix(&stem).unwrap_or(id);
    let file = format!("{}.{target}.vmbackup-{when}.qcow2", vm.name());
    if file.len() > NAME_MAX {
        return Err(Error::Invalid(format!(
            "the overlay file name of disk {target} of {vm} would have {} bytes, more than \
             {NAME_MAX}: the VM name or the disk target is too long",
            file.len()
        )));
    }
    Ok(dir.join(file))
}

/// A VM's shape and the pre-flight verdict on it.
pub struct Survey {
    pub shape: VmShape,
    pub report: Report,
}

/// Describes the VM and runs the pre-flight checks; nothing is changed. `--quiesce
/// required` on a running VM without a guest agent is a refusal too.
/// `repo_dir`: the repository's folder, `None` for one on an object store (no free space to
/// check).
pub fn survey(vm: &dyn VmHandle, repo_dir: Option<&Path>, s: &BackupSettings) -> Result<Survey> {
    let shape = vm.describe()?;
    // An id as long as the real one, so that an overlay name that would not fit is refused
    // before anything is touched.
    let id = new_backup_id(&vm.vm().stem(), 0);
    let overlays = shape
        .disks
        .iter()
        .filter(|d| shape.running && matches!(preflight::disk_rule(&d.facts), Ok(None)))
        .filter_map(|d| {
            let src = d.facts.source.as_deref()?;
            Some(overlay_path(s, vm.vm(), &d.facts.target, src, &id))
        })
        .collect::<Result<Vec<_>>>()?;
    let (overlay_spaces, overlay_folders) = overlay_spaces(overlays)?;
    let facts = Facts {
        vm: vm.vm().to_string(),
        memory_bytes: shape.memory_bytes,
        disks: shape.disks.iter().map(|d| d.facts.clone()).collect(),
        overlay_spaces,
        overlay_folders,
        repository: repo_dir.map(crate::space::free_space).transpose()?,
    };
    let mut report = preflight::evaluate(&facts, &s.limits);
    if s.quiesce == Quiesce::Required && shape.running && !shape.agent {
        report.ok = false;
        report.checks.push(preflight::Check {
            name: "quiesce".into(),
            ok: false,
            found: 0,
            limit: 1,
            message: format!("--quiesce required, but {}", shape.no_agent),
        });
    }
    Ok(Survey { shape, report })
}

/// What a finished backup reports.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Outcome {
    pub id: String,
    pub vm: String,
    pub consistency: String,
    pub consistency_reason: Option<String>,
    pub freeze_ms: Option<u64>,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    pub duration_ms: u64,
    /// Of which the copy phase: reading the disks and storing their chunks.
    pub copy_ms: u64,
    pub skipped_disks: Vec<preflight::SkippedDisk>,
    /// How each disk was read.
    pub disks: Vec<DiskOutcome>,
    /// The requests this backup made to an object store, by kind (none for a folder).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<crate::repository::storage::RequestCounts>,
}

/// How one disk of a backup was read.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct DiskOutcome {
    pub target: String,
    /// Bytes this disk added to the repository.
    pub stored_bytes: u64,
    #[serde(flatten)]
    pub read: Option<DiskRead>,
}

impl Outcome {
    /// Bytes read from the disks' images.
    pub fn bytes_read(&self) -> u64 {
        self.disks
            .iter()
            .filter_map(|d| d.read.as_ref())
            .map(|r| r.bytes_read)
            .sum()
    }
}

fn now_utc() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Millisecond)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// One disk that is backed up.
struct Work {
    target: String,
    image: String,
    format: String,
    virtual_size: u64,
    allocated_size: u64,
}

/// The journal of one run: every phase is recorded before it starts.
struct Run<'a> {
    journal: &'a dyn Journal,
    state_dir: &'a Path,
    id: String,
    vm: &'a dyn VmHandle,
    overlays: Vec<PathBuf>,
    /// The run leaves something for `recover` or the next run to finish (overlays it could
    /// not tell the VM is off): its journal entry stays open.
    unfinished: bool,
}

impl Run<'_> {
    /// Records `phase` before it starts. Only the first record (before anything is touched)
    /// is required; a later one that fails is logged, and the run goes on: stopping half-way
    /// (with the guest frozen, or on overlays) would be worse than an older phase on record.
    fn enter(&self, phase: Phase) -> Result<()> {
        tracing::debug!(vm = %self.vm.vm(), id = %self.id, phase = phase.as_str(), "phase");
        match self
            .journal
            .enter(&self.id, self.vm.vm(), phase, &self.overlays)
        {
            Ok(()) => Ok(()),
            Err(e) if phase == Phase::Preflight => Err(e),
            Err(e) => {
                tracing::warn!(vm = %self.vm.vm(), id = %self.id, phase = phase.as_str(), error = %chain(&e), "cannot record the phase");
                Ok(())
            }
        }
    }
}

/// Overlay files made ahead of the snapshot; deleted when dropped unless kept.
struct OverlayFiles {
    paths: Vec<PathBuf>,
}

impl OverlayFiles {
    fn create(overlays: &[Overlay], work: &[Work]) -> Result<OverlayFiles> {
        let mut made = OverlayFiles { paths: Vec::new() };
        for o in overlays {
            let size = work
                .iter()
                .find(|w| w.target == o.target)
                .map_or(0, |w| w.virtual_size);
            image::create_overlay(&o.overlay, &o.image, &o.format, size)?;
            made.paths.push(o.overlay.clone());
        }
        Ok(made)
    }

    fn keep(mut self) {
        self.paths.clear();
    }
}

impl Drop for OverlayFiles {
    fn drop(&mut self) {
        // A panic between the snapshot and `keep` (in the snapshot call, say) may leave the
        // VM running on them: left to `recover`, which deletes only those the VM does not
        // use (the journal names them).
        if std::thread::panicking() {
            return;
        }
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// How the guest was frozen for the snapshot, or why not.
struct Consistency {
    application: bool,
    reason: Option<String>,
    freeze_ms: Option<u64>,
}

/// Backs up `vm` into `repo`. The pre-flight report is returned in the error when it refuses.
pub fn backup(
    vm: &dyn VmHandle,
    repo: &Repository,
    state_dir: &Path,
    journal: &dyn Journal,
    s: &BackupSettings,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<Outcome> {
    let started = Instant::now();
    let started_at = now_utc();
    let requests_before = repo.store().requests().unwrap_or_default();
    let vm_ref = vm.vm();
    let _lock = lock_vm(state_dir, vm_ref)?;
    crate::instant::refuse_while_unfinished(state_dir, vm_ref)?;
    crate::fault::point("backup-locked");
    // A run killed part-way left the VM frozen or on overlays: finish it first.
    let recovered = crate::recover::recover_locked(vm, journal, s)?;
    if !recovered.disks.is_empty() || recovered.thawed {
        tracing::warn!(vm = %vm_ref, disks = recovered.disks.len(), thawed = recovered.thawed, "finished what an interrupted backup left");
    }
    let id = new_backup_id(
        &vm_ref.stem(),
        jiff::Timestamp::now().as_second().max(0) as u64,
    );
    let mut run = Run {
        journal,
        state_dir,
        id: id.clone(),
        vm,
        overlays: Vec::new(),
        unfinished: false,
    };
    run.enter(Phase::Preflight)?;
    let result = run_phases(&mut run, repo, s, progress, started_at, started);
    if let Err(e) = &result {
        tracing::debug!(vm = %vm_ref, id = %id, error = %chain(e), "backup failed");
    }
    // Unless the commit back failed (the VM stays on overlays the journal names, for recover
    // or the next run), the VM is on its images again and the run is over. A run that could
    // not tell whether the VM runs on its overlays, or a failed run that left overlay files
    // (the snapshot call failed and libvirtd went away, say), stays in the journal too, so
    // that `recover` commits back what the VM runs on and removes the rest.
    let left_overlays = result.is_err() && run.overlays.iter().any(|o| o.exists());
    if !run.unfinished && !left_overlays && !matches!(result, Err(Error::CommitBack(_))) {
        if let Err(e) = journal.end(&id) {
            tracing::warn!(vm = %vm_ref, id = %id, error = %chain(&e), "cannot close the run's journal entry");
        }
    }
    result.map(|mut o| {
        o.requests = repo
            .store()
            .requests()
            .map(|now| now.since(&requests_before));
        o
    })
}

fn run_phases(
    run: &mut Run,
    repo: &Repository,
    s: &BackupSettings,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
    started_at: String,
    started: Instant,
) -> Result<Outcome> {
    let vm = run.vm;
    let vm_ref = vm.vm();
    let Survey { shape, report } = survey(vm, repo.remote().is_none().then(|| repo.path()), s)?;
    if !report.ok {
        return Err(Error::Refused(Box::new(report)));
    }
    let repo_lock = repo
        .try_lock_for_backup(&vm_ref.to_string())?
        .map_err(|holders| Error::RepoLocked { holders })?;
    check_interrupted()?;
    let work: Vec<Work> = report
        .disks
        .iter()
        .filter_map(|t| shape.disks.iter().find(|d| &d.facts.target == t))
        .map(|d| Work {
            target: d.facts.target.clone(),
            image: d.facts.source.clone().unwrap_or_default(),
            format: d.format.clone(),
            virtual_size: d.facts.virtual_size,
            allocated_size: d.facts.allocated_size,
        })
        .collect();
    let overlays: Vec<Overlay> = if shape.running {
        work.iter()
            .map(|w| {
                Ok(Overlay {
                    target: w.target.clone(),
                    image: PathBuf::from(&w.image),
                    format: w.format.clone(),
                    overlay: overlay_path(s, vm_ref, &w.target, &w.image, &run.id)?,
                    node: shape
                        .disks
                        .iter()
                        .find(|d| d.facts.target == w.target)
                        .and_then(|d| d.node.clone()),
                })
            })
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    // The definition to restore from, read before the snapshot: afterwards libvirt's
    // persistent definition names the overlays until the commit back.
    let description = vm.description()?;
    // Guest addresses, while the agent still answers.
    let guest_ifs = if shape.running && shape.agent {
        vm.guest_interfaces()
    } else {
        Vec::new()
    };

    let mut _no_writers = Vec::new();
    let (consistency, tracked) = if shape.running {
        run.overlays = overlays.iter().map(|o| o.overlay.clone()).collect();
        run.enter(Phase::Preflight)?;
        let files = OverlayFiles::create(&overlays, &work)?;
        crate::fault::point("backup-overlays-created");
        match snapshot(run, &shape, &overlays, s) {
            Ok(c) => {
                crate::fault::point("backup-snapshot-done");
                // The VM runs on the overlays now: they go with the commit back.
                files.keep();
                c
            }
            Err(e) => {
                // The snapshot may have been applied although the call failed: never delete
                // an overlay the VM runs on.
                match vm.running_on(&overlays) {
                    Ok(on) if on.is_empty() => {}
                    Ok(on) => {
                        files.keep();
                        run.enter(Phase::Commit)?;
                        vm.commit_back(&on, s)?;
                        remove_overlays(&overlays);
                    }
                    Err(on) => {
                        // The VM may run on them (a snapshot whose reply was lost): kept,
                        // and the journal that names them stays open. `recover` and the
                        // next run commit back what the VM runs on and delete the rest.
                        tracing::warn!(vm = %vm_ref, error = %chain(&on), "cannot tell whether the VM runs on its overlays: they are kept for recover");
                        files.keep();
                        run.unfinished = true;
                    }
                }
                return Err(e);
            }
        }
    } else {
        for w in &work {
            _no_writers.push(image::forbid_writers(Path::new(&w.image))?);
        }
        if !vm.is_shut_off()? {
            return Err(Error::Busy(format!(
                "{vm_ref} was started while the backup began"
            )));
        }
        (
            Consistency {
                application: true,
                reason: Some("the VM was shut off".into()),
                freeze_ms: None,
            },
            Tracked::default(),
        )
    };

    // The NVRAM and TPM state, right after the snapshot (or with the VM off): see
    // `vm_state`. A VM that names them while they cannot be read fails the backup (after
    // the commit back below), before any disk is copied.
    let state = read_vm_state(&description);

    run.enter(Phase::Copy)?;
    crate::fault::point("backup-copy");
    let copy_started = Instant::now();
    let copied = state.and_then(|st| {
        copy_disks(
            repo,
            &run.id,
            vm_ref,
            run.state_dir,
            &work,
            !shape.running,
            &tracked,
            s,
            progress,
        )
        .map(|c| (c, st))
    });
    let copy_ms = copy_started.elapsed().as_millis() as u64;
    // A stop signal ends the copy at its next chunk, whatever the reader reported then.
    let copied = match copied {
        Err(e) if crate::interrupt::requested() => {
            tracing::warn!(vm = %vm_ref, id = %run.id, error = %chain(&e), "copy stopped by the interrupt");
            Err(Error::Interrupted)
        }
        c => c,
    };
    let published = match copied {
        Ok((c, st)) => {
            run.enter(Phase::Publish)?;
            publish(
                repo,
                &repo_lock,
                vm,
                &run.id,
                &shape,
                &description,
                &guest_ifs,
                c,
                st.as_ref(),
                &consistency,
                s,
                started_at,
            )
        }
        Err(e) => Err(e),
    };
    if published.is_ok() {
        crate::fault::point("backup-published");
    }
    let committed = if shape.running {
        run.enter(Phase::Commit)?;
        vm.commit_back(&overlays, s)
    } else {
        Ok(())
    };
    if committed.is_ok() {
        crate::fault::point("backup-committed");
    }
    run.enter(Phase::Cleanup)?;
    if committed.is_ok() {
        remove_overlays(&overlays);
        if shape.running {
            // The VM is on its images again: bitmaps can go. After a published backup, every
            // older one of vmbackup's (the previous backup's, and any a failed run left);
            // after a failure, the one this run started.
            let current = bitmap_name(&run.id);
            let published_ok = published.is_ok();
            let drop = |name: &str| (name == current) != published_ok;
            match vm.drop_bitmaps(&drop) {
                Ok(gone) if !gone.is_empty() => {
                    tracing::info!(vm = %vm_ref, removed = ?gone, "removed dirty bitmaps")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(vm = %vm_ref, error = %chain(&e), "cannot remove old dirty bitmaps; the next backup tries again")
                }
            }
        }
    }
    let manifest = match (published, committed) {
        (Ok(m), Ok(())) => m,
        (Ok(m), Err(e)) => {
            forget_full_read_requests(run.state_dir, vm_ref, &m);
            tracing::error!(vm = %vm_ref, id = %m.id, "the backup is stored, but the VM stays on its overlays until the next run: {}", chain(&e));
            return Err(Error::CommitBack(format!(
                "backup {} is stored, but {}",
                m.id,
                chain(&e)
            )));
        }
        (Err(e), committed) => {
            if let Err(d) = repo.discard_unpublished(&run.id) {
                tracing::warn!(vm = %vm_ref, id = %run.id, error = %chain(&d), "cannot discard the failed backup's objects");
            }
            if let Err(c) = committed {
                tracing::error!(vm = %vm_ref, "commit back failed too: {}", chain(&c));
            }
            return Err(e);
        }
    };
    tracing::info!(vm = %vm_ref, id = %manifest.id, consistency = %manifest.consistency, "backup published");
    forget_full_read_requests(run.state_dir, vm_ref, &manifest);
    Ok(Outcome {
        id: manifest.id,
        vm: manifest.vm_name,
        consistency: manifest.consistency,
        consistency_reason: manifest.consistency_reason,
        freeze_ms: manifest.freeze_ms,
        logical_bytes: manifest.logical_bytes,
        stored_bytes: manifest.stored_bytes,
        duration_ms: started.elapsed().as_millis() as u64,
        copy_ms,
        skipped_disks: report.skipped_disks,
        disks: manifest
            .disks
            .iter()
            .map(|d| DiskOutcome {
                target: d.target.clone(),
                stored_bytes: d.stored_bytes,
                read: d.read.clone(),
            })
            .collect(),
        requests: None,
    })
}

/// A published backup read these disks whole: earlier requests to do so are met.
fn forget_full_read_requests(state_dir: &Path, vm: &VmRef, m: &Manifest) {
    for d in &m.disks {
        if d.read.as_ref().is_some_and(|r| r.mode == "full") {
            let _ = std::fs::remove_file(full_read_marker(state_dir, vm, &d.target));
        }
    }
}

fn remove_overlays(overlays: &[Overlay]) {
    if !overlays.is_empty() {
        crate::fault::point("commit-before-overlay-unlink");
    }
    for o in overlays {
        match std::fs::remove_file(&o.overlay) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(overlay = %o.overlay.display(), error = %e, "cannot remove an overlay")
            }
        }
    }
}

/// Freeze (if asked and possible), snapshot, thaw. On every path out of here the guest is
/// thawed, or the pipeline has asked the agent until it said so.
fn snapshot(
    run: &Run,
    shape: &VmShape,
    overlays: &[Overlay],
    s: &BackupSettings,
) -> Result<(Consistency, Tracked)> {
    let vm = run.vm;
    // From the freeze to the end of the thaw, an abandoning second signal waits.
    let _thaw_pending = crate::interrupt::ThawPending::start();
    let mut c = Consistency {
        application: false,
        reason: None,
        freeze_ms: None,
    };
    let freeze = match s.quiesce {
        Quiesce::Off => {
            c.reason = Some("--quiesce off".into());
            None
        }
        _ if !shape.agent => {
            c.reason = Some(shape.no_agent.into());
            None
        }
        _ => {
            run.enter(Phase::Freeze)?;
            match vm.freeze(s) {
                Ok(f) => Some(f),
                Err(e) => {
                    // A freeze that timed out may still complete in the guest.
                    let late = thaw_for_sure(vm, s)?;
                    if s.quiesce == Quiesce::Required {
                        return Err(e);
                    }
                    tracing::warn!(vm = %vm.vm(), error = %chain(&e), "cannot freeze; the backup is crash-consistent");
                    c.reason = Some(freeze_failed(&e, late));
                    None
                }
            }
        }
    };
    run.enter(Phase::Snapshot)?;
    crate::fault::point("backup-snapshot");
    let t = Instant::now();
    let in_snapshot = matches!(freeze, Some(Freeze::InSnapshot));
    let bitmap = bitmap_name(&run.id);
    let mut snap = vm.snapshot(overlays, in_snapshot, Some(&bitmap), s);
    if in_snapshot {
        if let Err(e) = &snap {
            // libvirt thaws only after a freeze it saw succeed.
            let late = thaw_for_sure(vm, s)?;
            if runs_on_all(vm, overlays) {
                // libvirt reports a thaw that failed (an agent stuck while thawing) as a
                // failed snapshot call, though it took the snapshot, after a freeze that
                // worked: the VM runs on the overlays. The guest is thawed now (above), and
                // the images hold the frozen state.
                let ms = t.elapsed().as_millis() as u64;
                tracing::warn!(vm = %vm.vm(), error = %chain(e), "the quiesced snapshot was taken, but its thaw failed; the guest is thawed now");
                c.application = true;
                c.freeze_ms = Some(ms);
                c.reason = Some(format!(
                    "the thaw failed ({}); the guest was seen thawed {ms} ms after the freeze began",
                    chain(e)
                ));
                snap = Ok(Tracked {
                    targets: Vec::new(),
                    failed: Some(format!("the snapshot call failed: {}", chain(e))),
                    snapshot_ms: None,
                });
            } else if s.quiesce == Quiesce::Required {
                return Err(snap.unwrap_err());
            } else {
                tracing::warn!(vm = %vm.vm(), error = %chain(e), "cannot take a quiesced snapshot; the backup is crash-consistent");
                c.reason = Some(freeze_failed(e, late));
                check_interrupted()?;
                snap = vm.snapshot(overlays, false, Some(&bitmap), s);
            }
        } else {
            // Freeze, snapshot and thaw happened inside libvirt's one snapshot call: its
            // duration bounds how long the guest was frozen (the checkpoint the adapter
            // creates before it is not part of the freeze).
            let whole = t.elapsed().as_millis() as u64;
            c.freeze_ms = Some(
                snap.as_ref()
                    .ok()
                    .and_then(|tr| tr.snapshot_ms)
                    .unwrap_or(whole),
            );
            c.application = true;
        }
    }
    if let Some(Freeze::Now(since)) = freeze {
        // Thaw before anything else, whether the snapshot worked or not.
        run.enter(Phase::Thaw)?;
        match vm.thaw(s) {
            Ok(()) => {
                c.freeze_ms = Some(since.elapsed().as_millis() as u64);
                c.application = true;
            }
            Err(e) => {
                thaw_for_sure(vm, s)?;
                c.reason = Some(format!("thaw failed: {}", chain(&e)));
                if s.quiesce == Quiesce::Required {
                    snap?;
                    return Err(e);
                }
            }
        }
    }
    let tracked = snap?;
    if let Some(why) = &tracked.failed {
        tracing::warn!(vm = %vm.vm(), "cannot start the dirty bitmap {bitmap}: the next backup reads everything: {why}");
    }
    tracing::info!(vm = %vm.vm(), freeze_ms = c.freeze_ms, tracked = ?tracked.targets, "snapshot taken");
    Ok((c, tracked))
}

/// Whether the VM runs on every one of `overlays` (there is at least one).
fn runs_on_all(vm: &dyn VmHandle, overlays: &[Overlay]) -> bool {
    !overlays.is_empty() && matches!(vm.running_on(overlays), Ok(on) if on.len() == overlays.len())
}

/// Asks the agent until the guest is thawed; an agent that never says so fails the run.
/// Returns whether the guest had frozen late (and was thawed).
fn thaw_for_sure(vm: &dyn VmHandle, s: &BackupSettings) -> Result<bool> {
    let _thaw_pending = crate::interrupt::ThawPending::start();
    match vm.ensure_thawed(s) {
        Ok(late) => {
            if late {
                tracing::warn!(vm = %vm.vm(), "the guest froze after the freeze had failed: thawed it");
            }
            Ok(late)
        }
        Err(e) => {
            tracing::error!(vm = %vm.vm(), "the guest may still be frozen: {}", chain(&e));
            Err(e)
        }
    }
}

/// The recorded reason of a crash-consistent backup whose freeze failed.
fn freeze_failed(e: &Error, froze_late: bool) -> String {
    let late = if froze_late {
        "; the guest froze late and was thawed"
    } else {
        ""
    };
    format!("freeze failed: {}{late}", chain(e))
}

type Copied = (Vec<DiskEntry>, u64, u64);

/// Reads a few chunks (chosen at random, none of `changed`) again and compares them with
/// `index`, the base backup's: they must not have changed. A mismatch fails the run loudly and
/// leaves a request for the next backup to read the disk whole. Returns the bytes read.
#[allow(clippy::too_many_arguments)]
fn check_unchanged(
    namer: &crate::repository::chunk::Namer,
    reader: &ImageReader,
    index: &DiskIndex,
    changed: &[u64],
    based_on: &str,
    target: &str,
    vm: &VmRef,
    state_dir: &Path,
) -> Result<u64> {
    let picks = changes::pick(index, changes::SPOT_CHECKS, changed);
    let (bytes_read, mismatch) = changes::spot_check(namer, reader, index, &picks)?;
    if let Some(m) = mismatch {
        let why = format!(
            "chunk {} of {target} differs from backup {based_on}, though nothing recorded a change to it",
            m.chunk
        );
        if let Err(e) = changes::request_full_read(state_dir, vm, target, &why) {
            tracing::warn!(vm = %vm, disk = %target, error = %e, "cannot leave the request to read the disk whole");
        }
        tracing::error!(vm = %vm, disk = %target, "{why}: the next backup reads everything");
        return Err(Error::Invalid(format!(
            "{why}; the next backup of {vm} reads the disk whole"
        )));
    }
    Ok(bytes_read)
}

/// Copies every disk into backup `id`: a disk proven unchanged since an earlier backup takes
/// that backup's index, one with a usable bitmap is read where it marks, every other disk is
/// read whole; the first two are spot-checked.
#[allow(clippy::too_many_arguments)]
/// An incremental plan without the base index it was checked to have (never happens).
fn no_base() -> Error {
    Error::Invalid("the previous backup's index was not read".into())
}

#[allow(clippy::too_many_arguments)]
fn copy_disks(
    repo: &Repository,
    id: &str,
    vm: &VmRef,
    state_dir: &Path,
    work: &[Work],
    shut_off: bool,
    tracked: &Tracked,
    s: &BackupSettings,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<Copied> {
    // A repository whose earlier backups cannot all be read is no reason to fail this one:
    // every disk is then read whole, and the log and manifest say why.
    let (mut previous, unlisted) = match repo.list() {
        Ok(all) => (
            all.into_iter()
                .filter(|m| vm.is(&m.vm_name))
                .collect::<Vec<Manifest>>(),
            None,
        ),
        Err(e) => {
            tracing::warn!(vm = %vm, error = %chain(&e), "cannot read the earlier backups");
            (
                Vec::new(),
                Some(format!("cannot read the earlier backups: {}", chain(&e))),
            )
        }
    };
    previous.reverse();
    let mut entries = Vec::new();
    let (mut logical, mut stored) = (0, 0);
    for w in work {
        check_interrupted()?;
        let reader = ImageReader::open(Path::new(&w.image), &w.format)?;
        let label = format!("{vm} {}", w.target);
        let file = if shut_off {
            Some(
                FileState::of(Path::new(&w.image))
                    .map_err(|e| Error::io("read image state", &w.image, e))?,
            )
        } else {
            None
        };
        let marker = full_read_marker(state_dir, vm, &w.target);
        let forced = std::fs::read_to_string(&marker).ok().or(unlisted.clone());
        // After the snapshot (or with the VM off) the image is read-only: its bitmaps are
        // as QEMU saved them.
        let listed = qcow2_bitmaps::list(Path::new(&w.image)).map_err(|e| e.to_string());
        let now = changes::DiskNow {
            target: &w.target,
            image: &w.image,
            virtual_size: w.virtual_size,
            chunk_size: s.chunk_size,
            file,
            bitmaps: listed.as_ref().map_err(Clone::clone),
        };
        let rules = changes::Rules {
            full: s.full,
            full_every: s.full_every,
            forced: forced.as_deref(),
            now: jiff::Timestamp::now(),
        };
        // The bitmap that records this disk's writes from this backup's read on.
        let tracking = if shut_off {
            None
        } else {
            tracked.targets.contains(&w.target).then(|| bitmap_name(id))
        };
        let mut plan = changes::plan(&previous, &now, rules);
        // The regions the previous backup's bitmap marks, when the plan is to read them.
        let mut changed = None;
        if let changes::Plan::Changed { bitmap, .. } = &plan {
            match qcow2_bitmaps::dirty_ranges(Path::new(&w.image), bitmap) {
                Ok(map) => changed = Some(map.chunks_touched(s.chunk_size)),
                Err(e) => {
                    plan = changes::Plan::Full {
                        reason: format!("cannot read bitmap {bitmap}: {e}"),
                    }
                }
            }
        }
        // The previous backup's index, read now: that backup may have been deleted since the
        // listing (delete and prune take no lock), and then this disk is read whole.
        let mut base_index = None;
        if let changes::Plan::Unchanged { index_object, .. }
        | changes::Plan::Changed { index_object, .. } = &plan
        {
            let loaded = repo
                .store()
                .get(index_object)
                .and_then(|b| DiskIndex::decode(&b));
            match loaded {
                Ok(i) => base_index = Some(i),
                Err(e) => {
                    plan = changes::Plan::Full {
                        reason: format!("cannot read the previous backup's index: {}", chain(&e)),
                    }
                }
            }
        }
        // The chunks the previous backup of this disk refers to are in the store (this backup
        // holds its lock: no gc runs): reused without a request each. `--full` checks every
        // chunk it reuses, and writes a damaged one again.
        if !s.full {
            match (&plan, &base_index) {
                (changes::Plan::Unchanged { .. }, _) => {}
                (_, Some(base)) => repo.seed_known(base),
                (_, None) => {
                    repo.seed_known_from(&previous, &w.target);
                }
            }
        }
        let (index, read, disk_logical, disk_stored) = match plan {
            changes::Plan::Unchanged {
                based_on,
                index_object,
                logical_bytes,
                full_at,
                bitmap,
            } => {
                let _ = index_object;
                let index = base_index.take().ok_or_else(no_base)?;
                let bytes_read = check_unchanged(
                    repo.namer(),
                    &reader,
                    &index,
                    &[],
                    &based_on,
                    &w.target,
                    vm,
                    state_dir,
                )?;
                tracing::info!(vm = %vm, disk = %w.target, based_on = %based_on, "unchanged since the last backup: not read");
                progress(&label, w.virtual_size, w.virtual_size);
                let read = DiskRead {
                    mode: "incremental".into(),
                    based_on: Some(based_on),
                    full_reason: None,
                    bytes_read,
                    checked_bytes: bytes_read,
                    full_at,
                    file,
                    bitmap: tracking.clone().or(bitmap),
                };
                (index, read, logical_bytes, 0)
            }
            changes::Plan::Changed {
                based_on,
                index_object,
                full_at,
                bitmap,
            } => {
                let changed = changed.unwrap_or_default();
                let _ = index_object;
                let base = base_index.take().ok_or_else(no_base)?;
                let checked = check_unchanged(
                    repo.namer(),
                    &reader,
                    &base,
                    &changed,
                    &based_on,
                    &w.target,
                    vm,
                    state_dir,
                )?;
                tracing::info!(vm = %vm, disk = %w.target, based_on = %based_on, bitmap = %bitmap, chunks = changed.len(), "reading the chunks changed since the last backup");
                let b = backup_disk_changes(
                    repo,
                    &reader,
                    &base,
                    &changed,
                    s.threads,
                    &|done, total| progress(&label, done, total),
                )?;
                if changed.is_empty() {
                    progress(&label, w.virtual_size, w.virtual_size);
                }
                let read = DiskRead {
                    mode: "incremental".into(),
                    based_on: Some(based_on),
                    full_reason: None,
                    bytes_read: b.bytes_read + checked,
                    checked_bytes: checked,
                    full_at,
                    file,
                    // A shut-off VM's image keeps recording in the same bitmap when it runs.
                    bitmap: tracking.clone().or(shut_off.then_some(bitmap)),
                };
                (
                    b.index.clone(),
                    read,
                    b.index.data_bytes(),
                    b.stored_bytes_new,
                )
            }
            changes::Plan::Full { reason } => {
                tracing::info!(vm = %vm, disk = %w.target, reason = %reason, "reading the whole disk");
                let b = backup_disk(repo, &reader, s.chunk_size, s.threads, &|done, total| {
                    progress(&label, done, total)
                })?;
                let read = DiskRead {
                    mode: "full".into(),
                    based_on: None,
                    full_reason: Some(reason),
                    bytes_read: b.bytes_read,
                    checked_bytes: 0,
                    full_at: now_utc(),
                    file,
                    bitmap: tracking.clone(),
                };
                (b.index, read, b.logical_bytes, b.stored_bytes_new)
            }
        };
        let index_object = repo.put_index(id, &w.target, &index)?;
        crate::fault::point("backup-published-index");
        logical += disk_logical;
        stored += disk_stored;
        entries.push(DiskEntry {
            target: w.target.clone(),
            format: w.format.clone(),
            virtual_size: w.virtual_size,
            allocated_size: w.allocated_size,
            source: w.image.clone(),
            chunk_size: s.chunk_size,
            index_object,
            logical_bytes: disk_logical,
            stored_bytes: disk_stored,
            read: Some(read),
        });
        crate::fault::point("backup-between-disks");
    }
    Ok((entries, logical, stored))
}

/// The NVRAM and TPM state of a libvirt VM described by `d` (its domain XML), read now, and
/// when; `None` for a VM that has no domain XML (plain QEMU).
fn read_vm_state(d: &Description) -> Result<Option<(Captured, String)>> {
    if d.file != "domain.xml" {
        return Ok(None);
    }
    let spec = VmSpec::from_xml(&String::from_utf8_lossy(&d.bytes))?;
    let read_at = now_utc();
    let captured = vm_state::capture(&spec)?;
    if captured.nvram.is_some() || captured.tpm.is_some() {
        tracing::info!(vm = %spec.name, nvram = captured.nvram.is_some(), tpm = captured.tpm.is_some(), "NVRAM / TPM state read");
    }
    Ok(Some((captured, read_at)))
}

/// Stores the VM's description and publishes the manifest: the backup becomes visible.
#[allow(clippy::too_many_arguments)]
fn publish(
    repo: &Repository,
    lock: &RepoLock,
    vm: &dyn VmHandle,
    id: &str,
    shape: &VmShape,
    description: &Description,
    guest_ifs: &[GuestInterface],
    (disks, logical, stored): Copied,
    state: Option<&(Captured, String)>,
    c: &Consistency,
    s: &BackupSettings,
    started_at: String,
) -> Result<Manifest> {
    let object = format!("backups/{id}/{}", description.file);
    repo.store().put_new(&object, &description.bytes)?;
    let vm_state = match state {
        Some((captured, read_at)) => Some(vm_state::store(repo, id, captured, read_at.clone())?),
        None => None,
    };
    let manifest = Manifest {
        format_version: 1,
        id: id.to_string(),
        vm_name: vm.vm().to_string(),
        vm_uuid: shape.uuid.clone(),
        started_at,
        ended_at: now_utc(),
        consistency: if c.application {
            "application"
        } else {
            "crash"
        }
        .into(),
        consistency_reason: c.reason.clone(),
        freeze_ms: c.freeze_ms,
        vcpus: shape.vcpus,
        memory_bytes: shape.memory_bytes,
        disks,
        nics: shape
            .nics
            .iter()
            .map(|n| NicEntry {
                mac: n.mac.clone(),
                model: n.model.clone(),
                kind: n.kind.clone(),
                source: n.source.clone(),
                ips: GuestInterface::ips_of(guest_ifs, n.mac.as_deref()),
            })
            .collect(),
        domain_xml_object: object,
        schedule: s.schedule.clone(),
        scheduled_for: s.scheduled_for.clone(),
        tags: s.tags.clone(),
        stored_bytes: stored,
        logical_bytes: logical,
        vm_state,
    };
    // Right before the manifest: a lock that another host took for stale (this process was
    // paused, or cut off from the store) may have let a gc free chunks this backup reuses.
    lock.check()?;
    repo.publish(&manifest)?;
    Ok(manifest)
}

/// A manual backup's result for its report (`started`: `notify::now()` before it); `None`
/// for bad input (nothing is reported).
pub fn report_result(
    vm: &str,
    started: &str,
    r: &Result<Outcome, crate::Error>,
) -> Option<crate::notify::VmResult> {
    use crate::notify::VmResult;
    if matches!(r, Err(e) if e.exit_code() == crate::error::exit::BAD_INPUT) {
        return None;
    }
    let mut v = match r {
        Ok(o) => {
            let mut v = VmResult::new(vm, "ok");
            v.backup_id = Some(o.id.clone());
            v.consistency = Some(o.consistency.clone());
            v.freeze_ms = o.freeze_ms;
            v.stored_bytes = Some(o.stored_bytes);
            v
        }
        Err(e) => {
            let mut v = VmResult::new(vm, "failed");
            v.error = Some(crate::error::chain(e));
            v
        }
    };
    v.started = Some(started.to_string());
    v.ended = Some(crate::notify::now());
    Some(v)
}

#[cfg(test)]
mod tests {
    //! The pipeline over a fake VM: phases in order, the guest thawed and the VM back on its
    //! images on every error path, nothing published unless every disk was copied.

    use std::cell::RefCell;

    use super::*;

    #[test]
    fn overlay_names_fit_into_a_file_name_or_are_bad_input() {
        let s = BackupSettings::default();
        let vm = VmRef::libvirt(&"n".repeat(200)).unwrap();
        let id = new_backup_id(&vm.stem(), 0);
        let p = overlay_path(&s, &vm, "vdb", "/img/a.qcow2", &id).unwrap();
        let file = p.file_name().unwrap().to_str().unwrap();
        assert!(file.len() <= NAME_MAX, "{file}");
        assert!(crate::hypervisor::is_overlay(
            vm.name(),
            p.to_str().unwrap()
        ));
        assert!(file.ends_with(&format!(
            ".vdb.vmbackup-{}.qcow2",
            id.strip_prefix(&format!("{}-", vm.stem())).unwrap()
        )));
        let e = overlay_path(&s, &vm, &"t".repeat(20), "/img/a.qcow2", &id).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::exit::BAD_INPUT, "{e}");
    }
    use crate::hypervisor::vm::NicSpec;
    use crate::hypervisor::{Description, DiskShape, Recovery, Tracked};
    use crate::journal::Run as JournalRun;
    use crate::preflight::DiskFacts;
    use crate::vm_ref::VmRef;

    const MIB: u64 = 1 << 20;

    #[derive(Default)]
    struct FakeState {
        frozen: bool,
        on_overlays: bool,
        calls: Vec<&'static str>,
        /// The dirty bitmaps on the disk.
        bitmaps: Vec<String>,
    }

    /// A running VM with one raw disk and an agent; `fail` names the call that fails.
    struct FakeVm {
        vm: VmRef,
        image: PathBuf,
        /// `qcow2` (bitmaps really started in the image with qemu-img) or `raw`.
        format: &'static str,
        fail: Option<&'static str>,
        st: RefCell<FakeState>,
    }

    impl FakeVm {
        fn new(dir: &Path, fail: Option<&'static str>) -> FakeVm {
            let image = dir.join("fake-vda.raw");
            let mut data = vec![0u8; 8 * MIB as usize];
            for (i, b) in data.iter_mut().enumerate().take(5 * MIB as usize) {
                *b = (i % 251) as u8;
            }
            std::fs::write(&image, &data).unwrap();
            FakeVm {
                vm: VmRef::libvirt("fake").unwrap(),
                image,
                format: "raw",
                fail,
                st: RefCell::new(FakeState::default()),
            }
        }

        fn call(&self, name: &'static str) -> Result<()> {
            self.st.borrow_mut().calls.push(name);
            if self.fail == Some(name) {
                return Err(Error::Invalid(format!("fake {name} failure")));
            }
            Ok(())
        }
    }

    impl VmHandle for FakeVm {
        fn vm(&self) -> &VmRef {
            &self.vm
        }
        fn recover(&self, _s: &BackupSettings) -> Result<Recovery> {
            Ok(Recovery::default())
        }
        fn describe(&self) -> Result<VmShape> {
            let image = if self.fail == Some("copy") {
                self.image.with_extension("missing")
            } else {
                self.image.clone()
            };
            Ok(VmShape {
                uuid: "00000000-0000-0000-0000-00000000fa6e".into(),
                vcpus: 2,
                memory_bytes: 64 * MIB,
                running: true,
                agent: true,
                no_agent: "",
                disks: vec![DiskShape {
                    facts: DiskFacts {
                        target: "vda".into(),
                        device: "disk".into(),
                        kind: "file".into(),
                        source: Some(image.to_string_lossy().into_owned()),
                        readonly: false,
                        shareable: false,
                        virtual_size: 8 * MIB,
                        allocated_size: 8 * MIB,
                        backing_file: None,
                        missing: false,
                    },
                    format: self.format.into(),
                    node: None,
                }],
                nics: vec![NicSpec {
                    mac: Some("52:54:00:00:00:01".into()),
                    model: None,
                    kind: "user".into(),
                    source: None,
                }],
            })
        }
        fn description(&self) -> Result<Description> {
            // Like libvirt's persistent definition, it names the overlays after the snapshot.
            let on = self.st.borrow().on_overlays;
            Ok(Description {
                // An object name the repository refuses: storing it fails in the publish phase.
                file: if self.fail == Some("publish") {
                    "bad name"
                } else {
                    "domain.xml"
                },
                bytes: if on {
                    &b"<domain><name>fake</name>on overlays</domain>"[..]
                } else {
                    b"<domain><name>fake</name></domain>"
                }
                .to_vec(),
            })
        }
        fn guest_interfaces(&self) -> Vec<GuestInterface> {
            Vec::new()
        }
        fn freeze(&self, _s: &BackupSettings) -> Result<Freeze> {
            // A failed freeze may still complete in the guest.
            self.st.borrow_mut().frozen = true;
            self.call("freeze")?;
            Ok(Freeze::Now(Instant::now()))
        }
        fn snapshot(
            &self,
            overlays: &[Overlay],
            _q: bool,
            bitmap: Option<&str>,
            _s: &BackupSettings,
        ) -> Result<Tracked> {
            assert!(
                overlays.iter().all(|o| o.overlay.exists()),
                "overlay files first"
            );
            self.call("snapshot")?;
            let mut st = self.st.borrow_mut();
            st.on_overlays = true;
            Ok(match bitmap {
                Some(b) => {
                    if self.format == "qcow2" {
                        qemu_img(&["bitmap", "--add", &self.image.to_string_lossy(), b]);
                    }
                    st.bitmaps.push(b.to_string());
                    Tracked {
                        targets: overlays.iter().map(|o| o.target.clone()).collect(),
                        failed: None,
                        snapshot_ms: None,
                    }
                }
                None => Tracked::default(),
            })
        }
        fn thaw(&self, _s: &BackupSettings) -> Result<()> {
            self.call("thaw")?;
            self.st.borrow_mut().frozen = false;
            Ok(())
        }
        fn ensure_thawed(&self, _s: &BackupSettings) -> Result<bool> {
            self.st.borrow_mut().calls.push("ensure_thawed");
            let was = std::mem::replace(&mut self.st.borrow_mut().frozen, false);
            Ok(was)
        }
        fn running_on(&self, overlays: &[Overlay]) -> Result<Vec<Overlay>> {
            Ok(if self.st.borrow().on_overlays {
                overlays.to_vec()
            } else {
                Vec::new()
            })
        }
        fn commit_back(&self, _overlays: &[Overlay], _s: &BackupSettings) -> Result<()> {
            self.call("commit")?;
            self.st.borrow_mut().on_overlays = false;
            Ok(())
        }
        fn is_shut_off(&self) -> Result<bool> {
            Ok(false)
        }
        fn drop_bitmaps(&self, drop: &dyn Fn(&str) -> bool) -> Result<Vec<String>> {
            let mut st = self.st.borrow_mut();
            let (gone, kept) = st
                .bitmaps
                .iter()
                .cloned()
                .partition(|b| b.starts_with(crate::hypervisor::BITMAP_PREFIX) && drop(b));
            st.bitmaps = kept;
            if self.format == "qcow2" {
                for b in &gone {
                    qemu_img(&["bitmap", "--remove", &self.image.to_string_lossy(), b]);
                }
            }
            Ok(gone)
        }
    }

    #[derive(Default)]
    struct Recorder {
        phases: RefCell<Vec<Phase>>,
        ended: RefCell<Vec<String>>,
    }

    impl Journal for Recorder {
        fn enter(&self, _id: &str, _vm: &VmRef, phase: Phase, _o: &[PathBuf]) -> Result<()> {
            self.phases.borrow_mut().push(phase);
            Ok(())
        }
        fn end(&self, id: &str) -> Result<()> {
            self.ended.borrow_mut().push(id.to_string());
            Ok(())
        }
        fn unfinished(&self, _vm: &VmRef) -> Result<Vec<JournalRun>> {
            Ok(Vec::new())
        }
    }

    struct Setup {
        dir: tempfile::TempDir,
        repo: Repository,
        journal: Recorder,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(&dir.path().join("repo")).unwrap();
        Setup {
            dir,
            repo,
            journal: Recorder::default(),
        }
    }

    fn settings(quiesce: Quiesce) -> BackupSettings {
        BackupSettings {
            quiesce,
            chunk_size: MIB,
            threads: 2,
            ..Default::default()
        }
    }

    fn run(t: &Setup, vm: &FakeVm, q: Quiesce) -> Result<Outcome> {
        let state = t.dir.path().join("state");
        backup(vm, &t.repo, &state, &t.journal, &settings(q), &|_, _, _| {})
    }

    fn overlay_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".vmbackup-"))
            .collect()
    }

    #[test]
    fn the_phases_run_in_order_and_the_backup_holds_the_disk() {
        let t = setup();
        let vm = FakeVm::new(t.dir.path(), None);
        let o = run(&t, &vm, Quiesce::Preferred).unwrap();
        use Phase::*;
        assert_eq!(
            *t.journal.phases.borrow(),
            [Preflight, Preflight, Freeze, Snapshot, Thaw, Copy, Publish, Commit, Cleanup]
        );
        assert_eq!(*t.journal.ended.borrow(), std::slice::from_ref(&o.id));
        assert_eq!(o.consistency, "application");
        let st = vm.st.borrow();
        assert!(!st.frozen && !st.on_overlays);
        assert!(overlay_files(t.dir.path()).is_empty());
        let m = t.repo.load(&o.id).unwrap();
        assert_eq!(m.vm_name, "fake");
        // A VM defined without NVRAM and TPM records that it has none.
        let st = m.vm_state.as_ref().expect("state recorded");
        assert_eq!((&st.nvram, &st.tpm), (&None, &None));
        assert_eq!(
            t.repo.store().get(&m.domain_xml_object).unwrap(),
            b"<domain><name>fake</name></domain>",
            "the definition is the one from before the snapshot"
        );
        let index = crate::repository::disk::DiskIndex::decode(
            &t.repo.store().get(&m.disks[0].index_object).unwrap(),
        )
        .unwrap();
        let out = t.dir.path().join("restored.raw");
        crate::repository::disk::restore_disk(&t.repo, &index, &out, 2, &|_, _| {}).unwrap();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(&vm.image).unwrap()
        );
    }

    #[test]
    fn a_failure_in_any_phase_thaws_puts_the_vm_back_and_publishes_nothing() {
        for (fail, q) in [
            ("freeze", Quiesce::Required),
            ("snapshot", Quiesce::Preferred),
            ("thaw", Quiesce::Required),
            ("copy", Quiesce::Preferred),
            ("publish", Quiesce::Preferred),
        ] {
            let t = setup();
            let vm = FakeVm::new(t.dir.path(), Some(fail));
            let r = run(&t, &vm, q);
            assert!(r.is_err(), "{fail}: the backup succeeded");
            let st = vm.st.borrow();
            assert!(
                !st.frozen,
                "{fail}: the guest was left frozen ({:?})",
                st.calls
            );
            assert!(!st.on_overlays, "{fail}: the VM was left on its overlays");
            assert!(
                t.repo.list().unwrap().is_empty(),
                "{fail}: a backup was published"
            );
            assert!(
                overlay_files(t.dir.path()).is_empty(),
                "{fail}: overlays left: {:?}",
                overlay_files(t.dir.path())
            );
            assert_eq!(
                t.journal.ended.borrow().len(),
                1,
                "{fail}: the run is still open"
            );
        }
    }

    #[test]
    fn a_failed_freeze_with_quiesce_preferred_thaws_and_goes_on_crash_consistent() {
        let t = setup();
        let vm = FakeVm::new(t.dir.path(), Some("freeze"));
        let o = run(&t, &vm, Quiesce::Preferred).unwrap();
        assert_eq!(o.consistency, "crash");
        assert!(o.consistency_reason.unwrap().contains("freeze failed"));
        let st = vm.st.borrow();
        assert!(!st.frozen);
        assert!(st.calls.contains(&"ensure_thawed"));
    }

    #[test]
    fn a_failed_commit_keeps_the_backup_and_the_run_open_for_recover() {
        let t = setup();
        let vm = FakeVm::new(t.dir.path(), Some("commit"));
        let r = run(&t, &vm, Quiesce::Preferred);
        assert!(matches!(r, Err(Error::CommitBack(_))), "{r:?}");
        assert!(!vm.st.borrow().frozen);
        assert_eq!(t.repo.list().unwrap().len(), 1, "the copied backup is kept");
        assert!(
            t.journal.ended.borrow().is_empty(),
            "recover finishes the run"
        );
        assert_eq!(
            overlay_files(t.dir.path()).len(),
            1,
            "the VM runs on its overlay"
        );
    }

    #[test]
    fn each_backup_starts_a_bitmap_and_only_the_newest_published_ones_stays() {
        let t = setup();
        let vm = FakeVm::new(t.dir.path(), None);
        vm.st.borrow_mut().bitmaps.push("not-ours".into());
        let a = run(&t, &vm, Quiesce::Preferred).unwrap();
        assert_eq!(
            a.disks[0].read.as_ref().unwrap().bitmap,
            Some(format!("vmbackup-{}", a.id))
        );
        let b = run(&t, &vm, Quiesce::Preferred).unwrap();
        assert_eq!(
            vm.st.borrow().bitmaps,
            ["not-ours".to_string(), format!("vmbackup-{}", b.id)]
        );
        // The raw image cannot hold the bitmap: the second backup read everything, saying why.
        let read = b.disks[0].read.clone().unwrap();
        assert_eq!(read.mode, "full");
        assert!(
            read.full_reason.unwrap().contains("not in the image"),
            "{:?}",
            b.disks[0]
        );
        // A run that fails removes only the bitmap it started.
        let failing = FakeVm {
            fail: Some("publish"),
            ..FakeVm::new(t.dir.path(), None)
        };
        failing.st.borrow_mut().bitmaps = vm.st.borrow().bitmaps.clone();
        assert!(run(&t, &failing, Quiesce::Preferred).is_err());
        assert_eq!(failing.st.borrow().bitmaps, vm.st.borrow().bitmaps);
        // A commit that fails removes none: the VM is still on its overlays.
        let stuck = FakeVm {
            fail: Some("commit"),
            ..FakeVm::new(t.dir.path(), None)
        };
        assert!(run(&t, &stuck, Quiesce::Preferred).is_err());
        assert_eq!(stuck.st.borrow().bitmaps.len(), 1);
    }

    fn qemu_img(args: &[&str]) {
        let st = std::process::Command::new("qemu-img")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img {args:?}");
    }

    /// Writes `len` bytes of `byte` at `offset` into the qcow2 image, as a guest would (QEMU
    /// records the write in the image's enabled bitmaps).
    fn guest_write(image: &Path, offset: u64, len: u64, byte: u8) {
        let cmd = format!("write -P {byte} {offset} {len}");
        let st = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &cmd])
            .arg(image)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "qemu-io {cmd}");
    }

    fn restored(t: &Setup, id: &str) -> Vec<u8> {
        let m = t.repo.load(id).unwrap();
        let index = crate::repository::disk::DiskIndex::decode(
            &t.repo.store().get(&m.disks[0].index_object).unwrap(),
        )
        .unwrap();
        let out = t.dir.path().join(format!("{id}.raw"));
        crate::repository::disk::restore_disk(&t.repo, &index, &out, 2, &|_, _| {}).unwrap();
        std::fs::read(&out).unwrap()
    }

    fn content(image: &Path) -> Vec<u8> {
        let out = image.with_extension("now.raw");
        let _ = std::fs::remove_file(&out);
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            &image.to_string_lossy(),
            &out.to_string_lossy(),
        ]);
        std::fs::read(&out).unwrap()
    }

    #[test]
    fn an_incremental_reads_only_the_chunks_the_previous_bitmap_marks() {
        let t = setup();
        let mut vm = FakeVm::new(t.dir.path(), None);
        let image = t.dir.path().join("fake-vda.qcow2");
        qemu_img(&[
            "convert",
            "-O",
            "qcow2",
            &vm.image.to_string_lossy(),
            &image.to_string_lossy(),
        ]);
        vm.image = image.clone();
        vm.format = "qcow2";
        let a = run(&t, &vm, Quiesce::Preferred).unwrap();
        assert_eq!(a.disks[0].read.as_ref().unwrap().mode, "full");
        // A write straddling the chunk boundary at 2 MiB, one into a never-written chunk.
        guest_write(&image, 2 * MIB - 4096, 8192, 0x11);
        guest_write(&image, 6 * MIB + 100 * 1024, 4096, 0x22);
        let b = run(&t, &vm, Quiesce::Preferred).unwrap();
        let read = b.disks[0].read.clone().unwrap();
        assert_eq!(
            (read.mode.as_str(), read.based_on.as_deref()),
            ("incremental", Some(&*a.id)),
            "{read:?}"
        );
        // Chunks 1, 2 and 6 (1 MiB chunks) plus at most the three spot checks.
        assert!(
            read.bytes_read >= 3 * MIB && read.bytes_read <= 6 * MIB,
            "{read:?}"
        );
        assert_eq!(restored(&t, &b.id), content(&image));
        assert_eq!(
            restored(&t, &a.id),
            std::fs::read(t.dir.path().join("fake-vda.raw")).unwrap()
        );
        // Unchanged: only the spot checks are read.
        let c = run(&t, &vm, Quiesce::Preferred).unwrap();
        let read = c.disks[0].read.clone().unwrap();
        assert_eq!(read.mode, "incremental");
        assert!(read.bytes_read <= 3 * MIB, "{read:?}");
        assert_eq!(restored(&t, &c.id), content(&image));
        assert_eq!(vm.st.borrow().bitmaps, [format!("vmbackup-{}", c.id)]);
        // A chunk changed behind the bitmap's back (it was removed and added again empty) is
        // caught by a spot check sooner or later; here every data chunk is changed, so the
        // first check fails the run and the next one reads everything.
        let bm = format!("vmbackup-{}", c.id);
        qemu_img(&["bitmap", "--remove", &image.to_string_lossy(), &bm]);
        for i in 0..5 {
            guest_write(&image, i * MIB, 512, 0x33);
        }
        qemu_img(&["bitmap", "--add", &image.to_string_lossy(), &bm]);
        let e = run(&t, &vm, Quiesce::Preferred).unwrap_err();
        assert!(e.to_string().contains("differs from backup"), "{e}");
        let d = run(&t, &vm, Quiesce::Preferred).unwrap();
        let read = d.disks[0].read.clone().unwrap();
        assert_eq!(read.mode, "full");
        assert!(read.full_reason.unwrap().contains("earlier run"));
        assert_eq!(restored(&t, &d.id), content(&image));
    }
}
