//! Settings of the operations, as data: what `config` resolves and the pipelines read. No I/O.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::preflight::Limits;

/// `--quiesce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Quiesce {
    /// Fail unless the guest's filesystems can be frozen.
    Required,
    /// Freeze when the agent answers; otherwise a crash-consistent backup, recorded so.
    Preferred,
    /// Never freeze: crash-consistent.
    Off,
}

impl Quiesce {
    /// The text form of schedules and the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Quiesce::Required => "required",
            Quiesce::Preferred => "preferred",
            Quiesce::Off => "off",
        }
    }

    pub fn parse(s: &str) -> Option<Quiesce> {
        match s {
            "required" => Some(Quiesce::Required),
            "preferred" => Some(Quiesce::Preferred),
            "off" => Some(Quiesce::Off),
            _ => None,
        }
    }
}

/// Settings of a backup run.
#[derive(Debug, Clone)]
pub struct BackupSettings {
    pub quiesce: Quiesce,
    pub limits: Limits,
    /// Where overlays are created; `None`: beside each disk image.
    pub overlay_dir: Option<PathBuf>,
    /// Longest the guest may stay frozen waiting for the agent (freeze and thaw calls).
    pub freeze_timeout: Duration,
    /// Longest a commit back may go on without progress before the VM is left, safely, on
    /// its overlay (recorded, and finished by the next run).
    pub commit_stall_timeout: Duration,
    pub chunk_size: u64,
    pub threads: usize,
    /// The schedule that asked for this backup.
    pub schedule: Option<String>,
    /// The schedule occurrence it is made for (RFC 3339, UTC).
    pub scheduled_for: Option<String>,
    /// `backup --tag`: labels recorded in the manifest (checked by `selector::check_tag`).
    pub tags: Vec<String>,
    /// `--full`: read every disk whole, whatever an earlier backup recorded.
    pub full: bool,
    /// A disk is read whole at least this often, whatever an earlier backup recorded.
    pub full_every: Duration,
    /// The `vmbackup` binary, started as a thaw guard (`thaw_guard`) while a plain QEMU
    /// guest is frozen; `None`: no guard.
    pub thaw_guard: Option<PathBuf>,
}

impl Default for BackupSettings {
    fn default() -> Self {
        BackupSettings {
            quiesce: Quiesce::Preferred,
            limits: Limits::default(),
            overlay_dir: None,
            freeze_timeout: Duration::from_secs(10),
            commit_stall_timeout: Duration::from_secs(600),
            chunk_size: 4 << 20,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            schedule: None,
            scheduled_for: None,
            tags: Vec::new(),
            full: false,
            full_every: Duration::from_secs(30 * 86_400),
            thaw_guard: None,
        }
    }
}

impl BackupSettings {
    /// How long the pipeline keeps asking the guest agent to thaw after a freeze went wrong:
    /// an agent still busy with a late freeze answers only once that freeze is done.
    pub fn thaw_deadline(&self) -> Duration {
        (self.freeze_timeout * 6).max(Duration::from_secs(60))
    }
}
