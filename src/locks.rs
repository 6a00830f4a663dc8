//! The per-VM operation lock: a backup, a restore and a recover of one VM exclude each other.
//! An exclusive `flock` on `STATE_DIR/locks/<stem>.lock`, released by the kernel when the
//! holder exits, however it exits. The stem comes from `VmRef::stem`, so a libvirt domain and
//! a plain QEMU VM never share a lock.
//!
//! The holder writes who it is into the file (one JSON line: `pid`, `job`, `vm`, `since`) once
//! it has the lock, and empties it when it lets go, so that a refused locker can name it.
//! Only the `flock` excludes: older versions, which leave the file empty, still exclude and
//! are excluded; a file that names a process that is gone (killed) names nobody.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

pub use crate::repository::locks::{set_job, Holder};
use crate::vm_ref::VmRef;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("busy: VM {vm} is locked by {}", holder_words(.holder.as_deref()))]
    Busy {
        vm: String,
        /// Who holds it, when the lock file says so (boxed: errors stay small).
        holder: Option<Box<Holder>>,
    },
    #[error("cannot take the lock {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The holder in words: `backup (pid 1234, since 2026-11-30T22:01:05Z)`; the VM is left out
/// (the message names it already).
fn holder_words(h: Option<&Holder>) -> String {
    match h {
        Some(h) => Holder {
            vm: None,
            ..h.clone()
        }
        .describe(),
        None => "another backup, restore or recover".into(),
    }
}

/// Holds a VM's operation lock until dropped.
pub struct VmLock {
    lock: nix::fcntl::Flock<File>,
}

impl Drop for VmLock {
    fn drop(&mut self) {
        // Still ours: nobody reads a holder that let go.
        let _ = self.lock.set_len(0);
    }
}

/// Takes the operation lock of `vm` in `state_dir`; `LockError::Busy` (naming the holder
/// when it can) when another operation holds it.
pub fn lock_vm(state_dir: &Path, vm: &VmRef) -> Result<VmLock, LockError> {
    let dir = state_dir.join("locks");
    let io = |path: &Path, source| LockError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let path = dir.join(format!("{}.lock", vm.stem()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            let me = Holder {
                pid: std::process::id(),
                job: crate::repository::locks::job(),
                vm: Some(vm.to_string()),
                host: None,
                since: jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
            };
            let mut line = serde_json::to_vec(&me).expect("a holder serializes");
            line.push(b'\n');
            // Who holds it is a courtesy to others: a file that cannot be written still locks.
            let written = lock
                .set_len(0)
                .and_then(|_| lock.rewind())
                .and_then(|_| lock.write_all(&line));
            if let Err(e) = written {
                tracing::debug!(path = %path.display(), "cannot record the lock's holder: {e}");
            }
            Ok(VmLock { lock })
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => Err(LockError::Busy {
            vm: vm.to_string(),
            holder: read_holder(&mut file).map(Box::new),
        }),
        Err((_, e)) => Err(io(&path, std::io::Error::from_raw_os_error(e as i32))),
    }
}

/// The holder a lock file names, if it names one whose process is alive.
fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.take(4096).read_to_string(&mut text).ok()?;
    let h: Holder = serde_json::from_str(text.lines().next()?).ok()?;
    process_alive(h.pid).then_some(h)
}

/// Whether process `pid` exists (a lock's or a record's holder).
pub fn process_alive(pid: impl TryInto<i32>) -> bool {
    let Ok(pid) = pid.try_into() else {
        return false;
    };
    // Signal 0 checks existence only; EPERM: it exists, under another user.
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_per_vm_and_kinds_do_not_share_a_lock() {
        let dir = tempfile::tempdir().unwrap();
        let web = VmRef::libvirt("web").unwrap();
        let qweb = VmRef::qemu("web").unwrap();
        let held = lock_vm(dir.path(), &web).unwrap();
        assert!(matches!(
            lock_vm(dir.path(), &web),
            Err(LockError::Busy { .. })
        ));
        let _q =
            lock_vm(dir.path(), &qweb).expect("a plain QEMU VM of the same name is another VM");
        drop(held);
        lock_vm(dir.path(), &web).expect("free again once dropped");
    }

    #[test]
    fn a_refused_locker_names_the_holder_and_a_released_lock_names_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let web = VmRef::libvirt("web").unwrap();
        let held = lock_vm(dir.path(), &web).unwrap();
        let Err(e @ LockError::Busy { .. }) = lock_vm(dir.path(), &web) else {
            panic!("not busy");
        };
        let LockError::Busy { holder, vm } = &e else {
            unreachable!()
        };
        let h = holder.as_ref().expect("the holder is named");
        assert_eq!(vm, "web");
        assert_eq!(h.pid, std::process::id());
        assert_eq!(h.vm.as_deref(), Some("web"));
        assert!(
            h.since.ends_with('Z') && !h.since.contains('.'),
            "{}",
            h.since
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with("busy: VM web is locked by ")
                && msg.contains(&format!("(pid {}, since {})", h.pid, h.since)),
            "{msg}"
        );
        drop(held);
        let path = dir
            .path()
            .join("locks")
            .join(format!("{}.lock", web.stem()));
        assert_eq!(std::fs::read(&path).unwrap(), b"", "emptied on release");
    }

    #[test]
    fn a_file_naming_a_gone_process_or_garbage_names_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let web = VmRef::libvirt("web").unwrap();
        let path = dir
            .path()
            .join("locks")
            .join(format!("{}.lock", web.stem()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        for text in [
            format!(r#"{{"pid":{dead},"job":"backup","vm":"web","since":"2026-01-01T00:00:00Z"}}"#),
            "garbage".to_string(),
        ] {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &text).unwrap();
            // Held by another open file description, as by another process.
            let other = File::open(&path).unwrap();
            let _held = nix::fcntl::Flock::lock(other, nix::fcntl::FlockArg::LockExclusiveNonblock)
                .unwrap();
            let e = lock_vm(dir.path(), &web).err().unwrap();
            assert!(matches!(&e, LockError::Busy { holder: None, .. }), "{e:?}");
            assert!(e.to_string().contains("another backup, restore or recover"));
        }
    }
}
