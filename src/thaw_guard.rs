//! A guard for a guest that vmbackup freezes itself (plain QEMU VMs: for libvirt VMs,
//! libvirtd freezes and thaws inside one call and thaws even if vmbackup dies).
//!
//! Before the freeze, the backup starts `vmbackup thaw-guard` (its own binary, in its own
//! process group so that a Ctrl-C meant for the backup does not reach it) with a pipe on its
//! standard input. Once the guest is thawed the backup writes `thawed` into the pipe and the
//! guard exits without touching the guest. If the pipe closes without that word (the backup
//! was killed, even with SIGKILL, or could not thaw), the guard thaws the guest through its
//! agent. The next backup or `recover` also thaws a guest it finds frozen.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::hypervisor::qmp::QmpError;

#[derive(Debug, thiserror::Error)]
pub enum ThawGuardError {
    #[error("cannot start {program} thaw-guard")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot thaw the guest")]
    Thaw(#[from] QmpError),
}

type Result<T> = std::result::Result<T, ThawGuardError>;

const THAWED: &[u8] = b"thawed\n";

/// The backup's side: a running guard process.
pub struct ThawGuard {
    child: Option<Child>,
}

impl ThawGuard {
    /// Starts `program thaw-guard` for the guest whose agent listens on `qga`.
    pub fn spawn(program: &Path, qga: &Path, timeout: Duration) -> Result<ThawGuard> {
        let child = Command::new(program)
            .arg("thaw-guard")
            .arg("--qga")
            .arg(qga)
            .arg("--timeout")
            .arg(timeout.as_secs().max(1).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(|source| ThawGuardError::Spawn {
                program: program.display().to_string(),
                source,
            })?;
        tracing::debug!(pid = child.id(), "thaw guard started");
        Ok(ThawGuard { child: Some(child) })
    }

    /// The guest is thawed: the guard exits without touching it.
    pub fn disarm(mut self) {
        self.finish(true);
    }

    fn finish(&mut self, thawed: bool) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(mut pipe) = child.stdin.take() {
            if thawed {
                let _ = pipe.write_all(THAWED);
            }
            // Dropped here: the guard sees the end of its input.
        }
        let status = child.wait();
        tracing::debug!(disarmed = thawed, ?status, "thaw guard ended");
    }
}

impl Drop for ThawGuard {
    /// Not disarmed: the guard thaws the guest, and this waits until it has tried.
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// The guard's side (`vmbackup thaw-guard`): waits until its standard input ends, then
/// thaws the guest unless it was told that the guest is thawed. Returns whether it thawed.
pub fn watch(input: &mut impl Read, qga: &Path, timeout: Duration) -> Result<bool> {
    let mut said = Vec::new();
    // An error reading is an end of input too: nobody is left to thaw the guest.
    let _ = input.take(64).read_to_end(&mut said);
    if said == THAWED {
        return Ok(false);
    }
    tracing::warn!(agent = %qga.display(), "the backup that froze the guest is gone: thawing it");
    crate::hypervisor::qmp::thaw_guest_at(qga, timeout)?;
    Ok(true)
}
