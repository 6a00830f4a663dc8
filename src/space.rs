//! Free space of file systems, for the pre-flight checks of backups and restores.

use std::path::Path;

use crate::error::{Error, Result};
use crate::preflight::Space;

/// Free space of the filesystem holding `path` (or its nearest existing ancestor).
pub fn free_space(path: &Path) -> Result<Space> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            break;
        }
    }
    let st = nix::sys::statvfs::statvfs(&p).map_err(|e| {
        Error::io(
            "free space",
            &p,
            std::io::Error::from_raw_os_error(e as i32),
        )
    })?;
    Ok(Space {
        path: path.display().to_string(),
        free_bytes: (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64),
        device: device_of(&p),
    })
}

/// The device of `path` (or of its nearest existing ancestor).
pub fn device_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut p = path.to_path_buf();
    loop {
        if let Ok(m) = std::fs::metadata(&p) {
            return Some(m.dev());
        }
        if !p.pop() {
            return None;
        }
    }
}
