//! What can go wrong in `mount` and `umount` beyond the crate's common errors.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{program}: {detail}")]
    Tool { program: String, detail: String },
    #[error("the background process did not start: {0}")]
    Daemon(String),
    #[error("nothing mountable in backup {id}: {found}")]
    NothingMountable { id: String, found: String },
    #[error("{} is busy: {detail} (close what uses it, then run `vmbackup umount` again)", path.display())]
    Busy { path: PathBuf, detail: String },
}
