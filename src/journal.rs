//! The journal of backup runs in flight: before each phase of a backup starts, the phase and
//! the overlay files the run made are recorded in the state database, so that `recover` (and
//! the next backup of the VM) knows where a killed run stopped and what it left.

use std::path::PathBuf;

use serde::Serialize;

use crate::error::Result;
use crate::state::{RunRow, State};
use crate::vm_ref::VmRef;

/// The phases of a backup, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Looking at the VM, checking the limits, making the overlay files.
    Preflight,
    /// Freezing the guest's filesystems.
    Freeze,
    /// The snapshot of every disk at one instant: the VM moves onto the overlays.
    Snapshot,
    /// Thawing the guest.
    Thaw,
    /// Copying the frozen images into the repository.
    Copy,
    /// Writing the manifest: the backup becomes visible.
    Publish,
    /// Committing the overlays back: the VM moves back onto its images.
    Commit,
    /// Deleting the overlays and what a failed run wrote.
    Cleanup,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preflight => "preflight",
            Phase::Freeze => "freeze",
            Phase::Snapshot => "snapshot",
            Phase::Thaw => "thaw",
            Phase::Copy => "copy",
            Phase::Publish => "publish",
            Phase::Commit => "commit",
            Phase::Cleanup => "cleanup",
        }
    }
}

/// A run as the journal knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub backup_id: String,
    pub vm: VmRef,
    pub phase: String,
    pub overlays: Vec<PathBuf>,
}

/// Where a backup records its phases.
pub trait Journal {
    /// Run `backup_id` of `vm` is about to enter `phase`; it made `overlays`.
    fn enter(&self, backup_id: &str, vm: &VmRef, phase: Phase, overlays: &[PathBuf]) -> Result<()>;
    /// Run `backup_id` is over (or what it left has been put back).
    fn end(&self, backup_id: &str) -> Result<()>;
    /// The runs of `vm` that never ended.
    fn unfinished(&self, vm: &VmRef) -> Result<Vec<Run>>;
}

impl Journal for State {
    fn enter(&self, backup_id: &str, vm: &VmRef, phase: Phase, overlays: &[PathBuf]) -> Result<()> {
        Ok(self.run_enter(&RunRow {
            backup_id: backup_id.to_string(),
            vm: vm.to_string(),
            phase: phase.as_str().to_string(),
            overlays: overlays
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
            pid: std::process::id() as i64,
        })?)
    }

    fn end(&self, backup_id: &str) -> Result<()> {
        Ok(self.run_end(backup_id)?)
    }

    fn unfinished(&self, vm: &VmRef) -> Result<Vec<Run>> {
        Ok(self
            .runs_of(&vm.to_string())?
            .into_iter()
            .map(|r| Run {
                backup_id: r.backup_id,
                vm: vm.clone(),
                phase: r.phase,
                overlays: r.overlays.into_iter().map(PathBuf::from).collect(),
            })
            .collect())
    }
}
