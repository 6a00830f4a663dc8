//! Finishing what an interrupted backup left, for one VM (`recover_locked`, also the first
//! thing every backup does) or for many (`vmbackup recover`):
//! - the VM side, through `VmHandle::recover`: a guest left frozen is thawed; a disk left on
//!   one of vmbackup's overlays (`<vm>.<target>.vmbackup-<backup id>.qcow2`) is committed
//!   back, a block job a killed run left being taken over or redone, and pivoted onto its
//!   image (offline with `qemu-img commit` when the VM is shut off); the persistent definition
//!   is pointed at the images again;
//! - the journal's side: a run that never ended may have made overlay files the VM never ran
//!   on (killed before its snapshot): once the VM is back on its images they are deleted,
//!   and the run is forgotten;
//! - the repository's side (`vmbackup recover` only): objects of backups that were never
//!   published are removed when no backup is writing;
//! - the restores' side (`vmbackup recover` only): temporary files and kept-aside images of
//!   restores whose process is gone are cleaned (`restore_leftovers`).

use std::path::Path;

use serde::Serialize;

use crate::error::{chain, Error, Result};
use crate::hypervisor::libvirt::Libvirt;
use crate::hypervisor::libvirt_vm::LibvirtVm;
use crate::hypervisor::qemu_vm::{self, QemuVmHandle};
use crate::hypervisor::qmp::QmpError;
use crate::hypervisor::{Recovered, Recovery, VmHandle};
use crate::journal::Journal;
use crate::locks::{lock_vm, LockError};
use crate::repository::Repository;
use crate::settings::BackupSettings;
use crate::vm_ref::VmRef;

/// A backup run that never ended, and the phase it had entered (from the journal).
#[derive(Debug, Clone, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct Interrupted {
    pub vm: String,
    pub backup_id: String,
    pub phase: String,
}

/// What `recover` did.
#[derive(Debug, Clone, Serialize, Default, schemars::JsonSchema)]
pub struct Report {
    /// Runs that were killed, with the phase they were in.
    pub interrupted: Vec<Interrupted>,
    pub disks: Vec<Recovered>,
    /// VMs left alone because an operation holds them.
    pub busy: Vec<String>,
    /// Plain QEMU VMs whose socket was found but whose QEMU does not answer.
    pub unreachable: Vec<String>,
    /// VMs whose guest was found frozen, and thawed.
    pub thawed: Vec<String>,
    /// Overlay files of interrupted runs that the VM never ran on, deleted.
    pub orphan_overlays: Vec<String>,
    pub errors: Vec<String>,
    /// Objects of unpublished backups removed from the repository.
    pub removed_objects: usize,
    /// What restores that were killed left beside the images, removed (or a kept-aside
    /// image put back): see `restore_leftovers`.
    pub restore_leftovers: Vec<String>,
    /// Interrupted instant restores finished (`instant::recover`), or what state they left.
    pub instant_restores: Vec<String>,
}

/// What `recover_locked` did for one VM.
#[derive(Debug, Default)]
pub struct VmRecovery {
    pub interrupted: Vec<Interrupted>,
    pub disks: Vec<Recovered>,
    pub thawed: bool,
    pub orphan_overlays: Vec<String>,
}

/// Puts `vm` back into the state a finished backup leaves, from what the VM shows and what
/// the journal recorded. The caller holds the VM's lock, so no run of this VM is alive.
pub fn recover_locked(
    vm: &dyn VmHandle,
    journal: &dyn Journal,
    s: &BackupSettings,
) -> Result<VmRecovery> {
    let runs = journal.unfinished(vm.vm())?;
    let Recovery { disks, thawed, .. } = vm.recover(s)?;
    let mut out = VmRecovery {
        interrupted: Vec::new(),
        disks,
        thawed,
        orphan_overlays: Vec::new(),
    };
    // The VM is on its images now: what the runs made and it does not use is left over.
    for run in runs {
        tracing::info!(vm = %vm.vm(), id = %run.backup_id, phase = %run.phase, "an interrupted run is finished");
        out.interrupted.push(Interrupted {
            vm: vm.vm().to_string(),
            backup_id: run.backup_id.clone(),
            phase: run.phase.clone(),
        });
        for o in &run.overlays {
            match std::fs::remove_file(o) {
                Ok(()) => out.orphan_overlays.push(o.to_string_lossy().into_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove overlay", o, e)),
            }
        }
        journal.end(&run.backup_id)?;
    }
    Ok(out)
}

/// Checks the VMs given to `recover`: an unknown one is bad input, before anything is
/// touched.
pub fn check_names(lv: &Libvirt, qemu_dir: &Path, vms: &[VmRef]) -> Result<()> {
    for vm in vms {
        match vm {
            VmRef::Qemu(name) => qemu_vm::check_exists(qemu_dir, name)?,
            VmRef::Libvirt(_) => {
                LibvirtVm::open(lv, vm)?;
            }
        }
    }
    Ok(())
}

/// `vmbackup recover`: every libvirt VM and every plain QEMU VM with a socket in `qemu_dir`
/// (or the VMs named), then the repository.
pub fn recover(
    lv: &Libvirt,
    repo: &Repository,
    state_dir: &Path,
    journal: &dyn Journal,
    qemu_dir: &Path,
    vms: &[VmRef],
    s: &BackupSettings,
) -> Result<Report> {
    let mut r = Report::default();
    check_names(lv, qemu_dir, vms)?;
    let scanned = vms.is_empty();
    let vms = if scanned {
        let mut all: Vec<VmRef> = lv
            .domain_names()?
            .iter()
            .filter_map(|n| VmRef::libvirt(n).ok())
            .collect();
        all.extend(plain_qemu_vms(qemu_dir));
        all
    } else {
        vms.to_vec()
    };
    for vm in vms {
        let _lock = match lock_vm(state_dir, &vm) {
            Ok(l) => l,
            Err(LockError::Busy { .. }) => {
                r.busy.push(vm.to_string());
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let done = match &vm {
            VmRef::Libvirt(_) => {
                LibvirtVm::open(lv, &vm).and_then(|h| recover_locked(&h, journal, s))
            }
            VmRef::Qemu(_) => match QemuVmHandle::open(qemu_dir, &vm) {
                // A socket found by the scan whose QEMU is gone (a stale file): nothing runs
                // there to put back.
                Err(Error::Qmp(QmpError::Connect { .. })) if scanned => {
                    tracing::info!(vm = %vm, "no QEMU answers on its socket: skipped");
                    r.unreachable.push(vm.to_string());
                    continue;
                }
                h => h.and_then(|h| recover_locked(&h, journal, s)),
            },
        };
        match done {
            Ok(d) => {
                if d.thawed {
                    r.thawed.push(vm.to_string());
                }
                r.interrupted.extend(d.interrupted);
                r.disks.extend(d.disks);
                r.orphan_overlays.extend(d.orphan_overlays);
            }
            Err(e) => {
                tracing::error!(vm = %vm, "recover failed: {}", chain(&e));
                r.errors.push(format!("{vm}: {}", chain(&e)));
            }
        }
    }
    restore_leftovers(state_dir, &mut r);
    if let Some(_lock) = repo.lock_exclusive()? {
        r.removed_objects = repo.remove_incomplete(&[])?;
    } else {
        tracing::info!("a backup is writing: unfinished backups' objects are left for later");
    }
    Ok(r)
}

/// The plain QEMU VMs with a QMP socket in `qemu_dir`.
fn plain_qemu_vms(qemu_dir: &Path) -> Vec<VmRef> {
    let Ok(entries) = std::fs::read_dir(qemu_dir) else {
        return Vec::new();
    };
    let mut out: Vec<VmRef> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            VmRef::qemu(name.strip_suffix(".qmp")?).ok()
        })
        .collect();
    out.sort();
    out
}

/// The restores' side: the temporary files and kept-aside images of restores whose process is
/// gone (killed, or the host went down) are cleaned (`restore::remove_leftovers`); a failure
/// is reported, and the rest of `recover` goes on.
fn restore_leftovers(state_dir: &Path, r: &mut Report) {
    match crate::restore::remove_leftovers(state_dir) {
        Ok(done) => {
            for d in &done {
                tracing::info!("interrupted restore: {d}");
            }
            r.restore_leftovers.extend(done);
        }
        Err(e) => {
            tracing::error!(
                "cannot clean what an interrupted restore left: {}",
                chain(&e)
            );
            r.errors.push(format!("restore leftovers: {}", chain(&e)));
        }
    }
}
