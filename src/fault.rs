//! Fault injection for the tests that break a run at a chosen place: the named fail points of
//! `vmbackup_repo::failpoint` (compiled in only with the `fault-injection` feature, switched on
//! by `VMBACKUP_FAILPOINTS`; see that module for the actions: panic, exit, sleep, stop, kill).

pub use vmbackup_repo::failpoint::{init, point, ENABLED, POINTS};

/// Checks `VMBACKUP_FAILPOINTS` at start-up: set in a build without fail points, the run would
/// test nothing, so it is refused (exit 70) rather than run as if nothing were asked.
pub fn check_environment() -> Result<(), String> {
    match std::env::var_os("VMBACKUP_FAILPOINTS") {
        Some(v) if !v.is_empty() && !ENABLED => Err(
            "VMBACKUP_FAILPOINTS is set but this build has no fail points (feature fault-injection)"
                .into(),
        ),
        _ => {
            init();
            Ok(())
        }
    }
}

/// The deadline of a QMP command's reply: `default`, or in a build with fail points the
/// milliseconds in `VMBACKUP_QMP_DEADLINE_MS`, so that a test can hold a reply past it
/// without waiting the real deadline out.
pub fn qmp_deadline(default: std::time::Duration) -> std::time::Duration {
    if !ENABLED {
        return default;
    }
    std::env::var("VMBACKUP_QMP_DEADLINE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(default, std::time::Duration::from_millis)
}
