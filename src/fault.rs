//! Fault injection for the tests that kill a run at a given point: when the environment
//! variable `VMBACKUP_FAULT_STOP` names a stop point the run reaches, the process stops itself
//! there (SIGSTOP), so that a test can kill it (SIGKILL) in exactly that state. Never set in
//! production; a stop point costs one environment look-up. Points: `snapshot` (just before
//! it), `copy` (the VM runs on its overlays, thawed, nothing read yet), `commit-started`.

/// Stops this process (SIGSTOP) if `VMBACKUP_FAULT_STOP` is `point`.
pub fn stop_point(point: &str) {
    if std::env::var_os("VMBACKUP_FAULT_STOP").is_some_and(|v| v == point) {
        tracing::warn!(point, "fault injection: stopping here");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}
