//! The test guest that `vm-images/build` makes, and the copy of it that QEMU boots.
//!
//! libvirt runs QEMU as `libvirt-qemu`, which cannot open a kernel inside a folder it cannot
//! traverse (a clone in root's home, mode 0700). So before a guest boots, its kernel and
//! initramfs are staged into a folder every user can traverse, by default
//! `/var/lib/vmbackup-testkit/guest/<key>/` (folders 0755, files 0644), where `<key>` is
//! derived from the files' contents: a changed image gets a new folder, an unchanged one is
//! copied once. A file is copied under a temporary name and renamed into place, so processes
//! staging at the same time never see (or boot) a half-written file.
//!
//! Environment: `VMBACKUP_GUEST_DIR` (the folder holding `guest.env`, `vmlinuz` and
//! `initramfs.img`; default `vm-images/out` of the checkout), `VMBACKUP_GUEST_STAGE_DIR`
//! (default `/var/lib/vmbackup-testkit/guest`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::error::{KitError, Result};

/// Staged folders not used for this long are removed when another image is staged.
const STALE_AFTER: Duration = Duration::from_secs(3 * 24 * 3600);

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

/// Where staged guests go.
pub fn stage_root() -> PathBuf {
    std::env::var_os("VMBACKUP_GUEST_STAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/vmbackup-testkit/guest"))
}

/// The kernel and initramfs a test guest boots, at paths QEMU can open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// A source file as last seen: size and mtime, and the hash of its content then.
#[derive(Clone, PartialEq, Eq)]
struct Seen {
    size: u64,
    mtime_ns: i128,
    sha256: String,
}

/// Per source file, what it was when this process last hashed it.
static SEEN: Mutex<Option<HashMap<PathBuf, Seen>>> = Mutex::new(None);
static TMP_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The folder `vm-images/build-debian` writes the Debian guest into:
/// `VMBACKUP_DEBIAN_GUEST_DIR`, else `vm-images/out-debian` of the checkout (found as for
/// `guest_dir()`).
pub fn debian_guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VMBACKUP_DEBIAN_GUEST_DIR") {
        return PathBuf::from(d);
    }
    let checkout = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|d| d.join("vm-images").is_dir())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
    checkout.join("vm-images/out-debian")
}

/// The Debian guest: its kernel and initramfs staged where QEMU can read them, and the
/// built root image (each VM boots a copy of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianImage {
    pub boot: GuestImage,
    pub root: PathBuf,
}

/// Stages the Debian guest of `debian_guest_dir()` and returns it.
pub fn staged_debian_guest() -> Result<DebianImage> {
    let dir = debian_guest_dir();
    let hint = "build it with vm-images/build-debian, or set VMBACKUP_DEBIAN_GUEST_DIR";
    let (kernel, initrd) =
        env_files(&dir, hint, &["KERNEL", "INITRD"]).map(|v| (v[0].clone(), v[1].clone()))?;
    let root = env_files(&dir, hint, &["ROOT"])?.remove(0);
    if !root.is_file() {
        return Err(KitError::Setup(format!(
            "{} is missing ({hint})",
            root.display()
        )));
    }
    let boot = stage_boot_files(&kernel, &initrd, "initrd.img")?;
    Ok(DebianImage { boot, root })
}

/// Stages the guest of `guest_dir()` (when missing or changed) and returns the staged paths.
pub fn staged_guest() -> Result<GuestImage> {
    let dir = guest_dir();
    let (kernel, initrd) = guest_files(&dir)?;
    stage_boot_files(&kernel, &initrd, "initramfs.img")
}

/// Stages a kernel and an initramfs (as `vmlinuz` and `initrd_name`) into the folder of
/// `stage_root()` named after their contents.
fn stage_boot_files(kernel: &Path, initrd: &Path, initrd_name: &str) -> Result<GuestImage> {
    let (kernel, initrd) = (kernel.to_path_buf(), initrd.to_path_buf());
    let root = stage_root();
    let kernel_sum = content_hash(&kernel)?;
    let initrd_sum = content_hash(&initrd)?;
    let key = sha256_hex(format!("{kernel_sum} {initrd_sum}").as_bytes())[..16].to_string();
    let folder = root.join(&key);
    make_public_dir(&root)?;
    make_public_dir(&folder)?;
    check_traversable(&folder)?;
    let image = GuestImage {
        kernel: folder.join("vmlinuz"),
        initrd: folder.join(initrd_name),
    };
    stage_file(&kernel, &image.kernel, &kernel_sum)?;
    stage_file(&initrd, &image.initrd, &initrd_sum)?;
    // Marks the folder as used (for the removal of stale ones below).
    if let Ok(f) = std::fs::File::open(&folder) {
        let _ = f.set_modified(SystemTime::now());
    }
    remove_stale(&root, &key);
    Ok(image)
}

/// The kernel and initramfs that `guest.env` in `dir` names.
fn guest_files(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let hint = "build it with vm-images/build, or set VMBACKUP_GUEST_DIR";
    let v = env_files(dir, hint, &["KERNEL", "INITRD"])?;
    Ok((v[0].clone(), v[1].clone()))
}

/// The files that `guest.env` in `dir` names under `keys` (relative to `dir`).
fn env_files(dir: &Path, hint: &str, keys: &[&str]) -> Result<Vec<PathBuf>> {
    let env_path = dir.join("guest.env");
    let env = std::fs::read_to_string(&env_path)
        .map_err(|e| KitError::io(format!("read the test guest ({hint})"), &env_path, e))?;
    keys.iter()
        .map(|key| {
            env.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(|v| dir.join(v))
                .ok_or_else(|| KitError::Setup(format!("{} has no {key}", env_path.display())))
        })
        .collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn size_mtime(path: &Path) -> Result<(u64, i128)> {
    let m = std::fs::metadata(path).map_err(|e| KitError::io("stat", path, e))?;
    Ok((
        m.size(),
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    ))
}

/// The SHA-256 of a file's content; hashed again only when its size or mtime changed since
/// this process last hashed it.
fn content_hash(path: &Path) -> Result<String> {
    let (size, mtime_ns) = size_mtime(path)?;
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let seen = seen.get_or_insert_with(HashMap::new);
    if let Some(s) = seen.get(path) {
        if s.size == size && s.mtime_ns == mtime_ns {
            return Ok(s.sha256.clone());
        }
    }
    let sha256 = hash_file(path, None)?;
    seen.insert(
        path.to_path_buf(),
        Seen {
            size,
            mtime_ns,
            sha256: sha256.clone(),
        },
    );
    Ok(sha256)
}

/// Hashes a file, copying it to `copy_to` on the way when given.
fn hash_file(path: &Path, mut copy_to: Option<&mut std::fs::File>) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| KitError::io("open", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| KitError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        if let Some(out) = copy_to.as_mut() {
            out.write_all(&buf[..n])
                .map_err(|e| KitError::io("write a copy of", path, e))?;
        }
    }
    Ok(hex(&h.finalize()))
}

/// Copies `src` to `dst` unless `dst` is already there: under a temporary name in the same
/// folder, checked against `sha256` (the content the folder's name was derived from), made
/// 0644 and synced, then renamed into place. Two processes doing this at once both write
/// their own temporary file; whichever rename comes last replaces an identical file.
fn stage_file(src: &Path, dst: &Path, sha256: &str) -> Result<()> {
    if dst.is_file() {
        return Ok(());
    }
    let folder = dst.parent().expect("a staged file has a folder");
    let name = dst.file_name().expect("a file name").to_string_lossy();
    let tmp = folder.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    let result = (|| {
        let mut out = std::fs::File::create(&tmp).map_err(|e| KitError::io("create", &tmp, e))?;
        let got = hash_file(src, Some(&mut out))?;
        if got != sha256 {
            return Err(KitError::Setup(format!(
                "{} changed while it was being staged (rebuilt?); try again",
                src.display()
            )));
        }
        out.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| KitError::io("chmod", &tmp, e))?;
        out.sync_all().map_err(|e| KitError::io("sync", &tmp, e))?;
        std::fs::rename(&tmp, dst).map_err(|e| KitError::io("rename into place", dst, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` and the parents it lacks, each 0755 whatever the umask, and makes `dir`
/// itself 0755.
pub fn make_public_dir(dir: &Path) -> Result<()> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    let chmod = |d: &Path| {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| KitError::io("chmod 0755", d, e))
    };
    for d in missing.iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => chmod(d)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(KitError::io("create", *d, e)),
        }
    }
    chmod(dir)
}

/// Fails when another user (QEMU's) cannot traverse every folder down to `dir`.
pub fn check_traversable(dir: &Path) -> Result<()> {
    let dir = std::fs::canonicalize(dir).map_err(|e| KitError::io("resolve", dir, e))?;
    for d in dir.ancestors() {
        let m = std::fs::metadata(d).map_err(|e| KitError::io("stat", d, e))?;
        if m.permissions().mode() & 0o001 == 0 {
            return Err(KitError::Setup(format!(
                "{} (mode {:04o}) cannot be traversed by QEMU's user, so {} cannot be used \
                 for test VM files",
                d.display(),
                m.permissions().mode() & 0o7777,
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Removes the staged folders (other than `keep`) not used for `STALE_AFTER`, and temporary
/// files left in `keep` by processes that are gone.
fn remove_stale(root: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if name == keep {
            remove_dead_temporaries(&path);
            continue;
        }
        let unused = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if unused && path.is_dir() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn remove_dead_temporaries(folder: &Path) {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .rsplit_once(".tmp-")
            .and_then(|(_, rest)| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_once_by_content_and_replaces_nothing_in_place() {
        let src = tempfile::tempdir().unwrap();
        let stage = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("vmlinuz"), b"kernel").unwrap();
        std::fs::write(src.path().join("initramfs.img"), b"initrd").unwrap();
        std::fs::write(
            src.path().join("guest.env"),
            format!(
                "KERNEL={0}/vmlinuz\nINITRD={0}/initramfs.img\n",
                src.path().display()
            ),
        )
        .unwrap();
        let (kernel, initrd) = guest_files(src.path()).unwrap();
        let ks = content_hash(&kernel).unwrap();
        let dst = stage.path().join("k");
        stage_file(&kernel, &dst, &ks).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"kernel");
        let mode = std::fs::metadata(&dst).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // Already there: not copied again.
        let before = std::fs::metadata(&dst).unwrap().ino();
        stage_file(&kernel, &dst, &ks).unwrap();
        assert_eq!(std::fs::metadata(&dst).unwrap().ino(), before);
        // A source that no longer matches the hash is refused, and leaves no temporary.
        let is = content_hash(&initrd).unwrap();
        let err = stage_file(&kernel, &stage.path().join("i"), &is).unwrap_err();
        assert!(err.to_string().contains("changed while"), "{err}");
        assert_eq!(std::fs::read_dir(stage.path()).unwrap().count(), 1);
        // Stagers racing for one file all succeed, and only the finished file is left.
        let raced = stage.path().join("raced");
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| stage_file(&kernel, &raced, &ks).unwrap());
            }
        });
        assert_eq!(std::fs::read(&raced).unwrap(), b"kernel");
        assert_eq!(std::fs::read_dir(stage.path()).unwrap().count(), 2);
    }

    #[test]
    fn made_folders_are_0755_whatever_the_umask() {
        let base = tempfile::tempdir().unwrap();
        let deep = base.path().join("a/b/c");
        use nix::sys::stat::{umask, Mode};
        let old = umask(Mode::from_bits_truncate(0o077));
        let made = make_public_dir(&deep);
        umask(old);
        made.unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            let mode = std::fs::metadata(base.path().join(d))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o755, "{d}");
        }
        check_traversable(&deep).unwrap();
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = check_traversable(&deep).unwrap_err().to_string();
        assert!(err.contains("cannot be traversed"), "{err}");
    }
}
