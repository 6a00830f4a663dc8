//! What a scheduled run reports, per schedule and VM: the data job reports are made of.

use serde::Serialize;

use crate::repository::BootTestRecord;

/// The outcome of one VM's occurrence.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct VmResult {
    pub vm: String,
    /// When the occurrence was due (UTC); `None` for a job that was not scheduled.
    pub due: Option<String>,
    /// `ok`, `failed`, `skipped`, `missed` (or `due` in a dry run).
    pub status: String,
    pub backup_id: Option<String>,
    pub consistency: Option<String>,
    pub freeze_ms: Option<u64>,
    pub stored_bytes: Option<u64>,
    #[serde(rename = "started_at")]
    pub started: Option<String>,
    #[serde(rename = "ended_at")]
    pub ended: Option<String>,
    pub error: Option<String>,
    /// Backups removed by retention after this one succeeded.
    pub pruned: Vec<String>,
    pub prune_errors: Vec<String>,
    /// The boot test run after this backup (the schedule's `boot_test` rule), if one ran.
    pub boot_test: Option<BootTestRecord>,
}

/// One schedule's part of a run: the job a report is sent for.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct JobReport {
    pub schedule: String,
    pub recurrence: String,
    pub slot: String,
    pub run_at: String,
    pub results: Vec<VmResult>,
}

impl JobReport {
    pub fn count(&self, status: &str) -> usize {
        self.results.iter().filter(|r| r.status == status).count()
    }
    pub fn boot_tests_failed(&self) -> usize {
        self.results
            .iter()
            .filter(|r| r.boot_test.as_ref().is_some_and(|t| t.error.is_some()))
            .count()
    }
}
