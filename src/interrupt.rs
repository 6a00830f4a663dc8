//! The stop request of SIGINT and SIGTERM: the binary's signal thread sets it, long
//! operations look at it at their safe points (the guest thawed, the VM back on its images).

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks every running operation to stop at its next safe point.
pub fn request_stop() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
