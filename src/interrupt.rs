//! SIGINT and SIGTERM: what they ask of a running command, and the state the binary's signal
//! thread and the pipelines share.
//!
//! - The first signal asks for a stop at the next safe point (`requested`): the copy stops
//!   at its next chunk, the pipeline thaws the guest (it always does), commits the overlays
//!   back, discards the unpublished backup and returns `Error::Interrupted`. The command then
//!   exits with 128 + the signal's number: 130 after SIGINT, 143 after SIGTERM.
//! - A second signal abandons the run at once (`abandon`): the process exits as soon as no
//!   thaw is pending (`ThawPending`), without waiting for the copy, the commit back or the
//!   clean-up. The guest is never left frozen: a thaw in progress is waited for (it is bounded
//!   by the thaw deadline), and a freeze libvirt or the thaw guard holds is undone by them. The
//!   VM may be left on its overlays and the repository with unpublished objects; the journal
//!   keeps the run, so `recover`, the next backup or `run-due` finishes it, as after a kill.
//!   The exit code is still that of the first signal.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

/// SIGINT's number, for callers without a signal crate.
pub const SIGINT: i32 = 2;
/// SIGTERM's number.
pub const SIGTERM: i32 = 15;

/// The stop signals a process received.
struct Stops {
    /// The number of the first one, 0 while none came.
    first: AtomicI32,
    /// How many came.
    count: AtomicUsize,
}

impl Stops {
    const fn new() -> Stops {
        Stops {
            first: AtomicI32::new(0),
            count: AtomicUsize::new(0),
        }
    }

    fn received(&self, signal: i32) -> bool {
        let _ = self
            .first
            .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
        self.count.fetch_add(1, Ordering::SeqCst) == 0
    }

    fn requested(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }

    fn signal(&self) -> Option<i32> {
        match self.first.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    fn exit_code(&self) -> i32 {
        128 + self.signal().unwrap_or(SIGINT)
    }
}

static STOPS: Stops = Stops::new();
/// Thaws in progress (see `ThawPending`).
static THAWING: AtomicUsize = AtomicUsize::new(0);

/// Records stop signal `signal` (its number). Returns true for the first one (stop at the
/// next safe point), false for every later one (abandon).
pub fn received(signal: i32) -> bool {
    STOPS.received(signal)
}

/// Asks every running operation to stop at its next safe point, as a SIGINT would.
pub fn request_stop() {
    received(SIGINT);
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    STOPS.requested()
}

/// The first stop signal's number, if one came.
pub fn signal() -> Option<i32> {
    STOPS.signal()
}

/// The exit code of an interrupted command: 128 + the first signal's number (130 when no
/// signal came, as for an interrupt asked for by `request_stop`).
pub fn exit_code() -> i32 {
    STOPS.exit_code()
}

/// Marks a thaw in progress while alive: an abandoning signal waits until none is.
pub struct ThawPending(());

impl ThawPending {
    pub fn start() -> ThawPending {
        THAWING.fetch_add(1, Ordering::SeqCst);
        ThawPending(())
    }
}

impl Drop for ThawPending {
    fn drop(&mut self) {
        THAWING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether a thaw is in progress.
pub fn thaw_pending() -> bool {
    THAWING.load(Ordering::SeqCst) > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_signal_stops_later_ones_abandon_and_the_code_is_the_first_signals() {
        // A state of its own: the process-wide one would stop every other test's reads.
        let stops = Stops::new();
        assert!(!stops.requested());
        assert_eq!(stops.exit_code(), 130);
        assert!(stops.received(SIGTERM), "the first signal asks for a stop");
        assert!(stops.requested());
        assert!(!stops.received(SIGINT), "the second abandons");
        assert_eq!(stops.signal(), Some(SIGTERM));
        assert_eq!(stops.exit_code(), 143);
    }

    #[test]
    fn a_thaw_is_pending_while_its_guard_lives() {
        {
            let _t = ThawPending::start();
            let _u = ThawPending::start();
            assert!(thaw_pending());
        }
        assert!(!thaw_pending());
    }
}
