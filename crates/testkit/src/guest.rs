//! The test guest that `vm-images/build` makes.
//!
//! Environment: `VMBACKUP_GUEST_DIR` (the folder holding `guest.env`, `vmlinuz` and
//! `initramfs.img`; default `vm-images/out` of the checkout).

use std::path::{Path, PathBuf};

use crate::error::{KitError, Result};

/// The folder `vm-images/build` writes the guest into: `VMBACKUP_GUEST_DIR`, else
/// `vm-images/out` of the checkout being tested (`CARGO_MANIFEST_DIR` as cargo sets it when
/// it runs a test or an example), else of the checkout this kit was built from.
pub fn guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VMBACKUP_GUEST_DIR") {
        return PathBuf::from(d);
    }
    let checkout = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|d| d.join("vm-images").is_dir())
        .unwrap_or_else(|| {
            // crates/testkit -> the workspace root.
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
        });
    checkout.join("vm-images/out")
}

/// The kernel and initramfs a test guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The guest of `guest_dir()`, as `vm-images/build` left it.
pub fn guest_image() -> Result<GuestImage> {
    let (kernel, initrd) = guest_files(&guest_dir())?;
    Ok(GuestImage { kernel, initrd })
}

/// The kernel and initramfs that `guest.env` in `dir` names.
fn guest_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let env_path = dir.join("guest.env");
    let env = std::fs::read_to_string(&env_path).map_err(|e| {
        KitError::io(
            "read the test guest (build it with vm-images/build, or set VMBACKUP_GUEST_DIR)",
            &env_path,
            e,
        )
    })?;
    let get = |key: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .map(|v| dir.join(v))
            .ok_or_else(|| KitError::Setup(format!("{} has no {key}", env_path.display())))
    };
    Ok((get("KERNEL")?, get("INITRD")?))
}
