//! The per-VM operation lock: a backup, a restore and a recover of one VM exclude each other.
//! An exclusive `flock` on `STATE_DIR/locks/<stem>.lock`, released by the kernel when the
//! holder exits, however it exits. The stem comes from `VmRef::stem`, so a libvirt domain and
//! a plain QEMU VM never share a lock.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::vm_ref::VmRef;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another backup, restore or recover of {0} is running")]
    Busy(String),
    #[error("cannot take the lock {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Holds a VM's operation lock until dropped.
pub struct VmLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Takes the operation lock of `vm` in `state_dir`; `LockError::Busy` when another operation
/// holds it.
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
        .write(true)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(VmLock { _lock: lock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(LockError::Busy(vm.to_string())),
        Err((_, e)) => Err(io(&path, std::io::Error::from_raw_os_error(e as i32))),
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
        assert!(matches!(lock_vm(dir.path(), &web), Err(LockError::Busy(_))));
        let _q =
            lock_vm(dir.path(), &qweb).expect("a plain QEMU VM of the same name is another VM");
        drop(held);
        lock_vm(dir.path(), &web).expect("free again once dropped");
    }
}
