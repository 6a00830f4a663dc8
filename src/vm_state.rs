//! A VM's files besides its disks: the UEFI variables (the NVRAM file of `<os><nvram>`) and
//! the emulated TPM's state (libvirt's swtpm folder of the VM, `/var/lib/libvirt/swtpm/<uuid>`).
//!
//! Both are small files that the running QEMU (NVRAM, through its pflash device) and swtpm
//! (TPM) write whenever the guest changes a variable or the TPM's persistent state: rare
//! events (a boot entry, a key, a sealed secret), which a guest file-system freeze does not
//! stop (it freezes file systems only; variables and TPM commands go on). They are read right
//! after the disk snapshot (libvirt thaws the guest within its snapshot call, so there is no
//! frozen instant to read them in), or with the VM shut off. A read is consistent when two
//! reads in a row agree on every file of the set (the NVRAM file; all the TPM's files
//! together): otherwise it is read again, a few times, and the backup fails if they never
//! agree.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::hypervisor::vm::VmSpec;
use crate::repository::manifest::{Owner, StateDir, StateFile, TpmState, VmState};
use crate::repository::{RepoError, Repository};

/// Where libvirt (system instance) keeps the state of each VM's emulated TPM, by UUID.
pub const SWTPM_DIR: &str = "/var/lib/libvirt/swtpm";

/// The largest state file read (OVMF's variables are 128 KiB to 4 MiB, TPM state a few KiB).
const MAX_FILE: u64 = 64 << 20;
/// Reads of a set before it is given up as changing all the time.
const ATTEMPTS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error(
        "the VM's NVRAM file {} (UEFI variables, <os><nvram>) is missing: a VM that never \
         started has none yet (libvirt makes it from its template at the first start); start \
         the VM once, or remove <nvram> from its definition",
        .0.display()
    )]
    NvramMissing(PathBuf),
    #[error(
        "the VM's emulated TPM has no state in {}: a VM that never started has none yet \
         (libvirt makes it at the first start); start the VM once",
        .0.display()
    )]
    TpmMissing(PathBuf),
    #[error("cannot read the VM's {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM's {what} {} is larger than {MAX_FILE} bytes", path.display())]
    TooLarge { what: &'static str, path: PathBuf },
    #[error("the VM's {what} {} is not a regular file", path.display())]
    NotAFile { what: &'static str, path: PathBuf },
    #[error(
        "the VM's {what} kept changing while it was read ({ATTEMPTS} reads in a row differed)"
    )]
    Unstable { what: &'static str },
    #[error("the VM's TPM state file {} has a name that cannot be stored", .0.display())]
    BadName(PathBuf),
    #[error("the VM has no UUID: its TPM state folder is unknown")]
    NoUuid,
    #[error("repository")]
    Repo(#[from] RepoError),
}

type Result<T, E = VmStateError> = std::result::Result<T, E>;

/// A file of the VM's state, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedFile {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub owner: Owner,
}

/// The emulated TPM's state folder, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedTpm {
    pub model: Option<String>,
    pub version: Option<String>,
    pub dir: PathBuf,
    pub dirs: Vec<(PathBuf, Owner)>,
    pub files: Vec<CapturedFile>,
}

/// What a backup read of the VM's state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Captured {
    pub nvram: Option<CapturedFile>,
    pub tpm: Option<CapturedTpm>,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VmStateError + 'a {
    move |source| VmStateError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn owner_of(m: &std::fs::Metadata) -> Owner {
    let user = nix::unistd::User::from_uid(m.uid().into())
        .ok()
        .flatten()
        .map(|u| u.name);
    let group = nix::unistd::Group::from_gid(m.gid().into())
        .ok()
        .flatten()
        .map(|g| g.name);
    Owner {
        uid: m.uid(),
        gid: m.gid(),
        user,
        group,
        mode: m.mode() & 0o7777,
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<CapturedFile> {
    let m = std::fs::symlink_metadata(path).map_err(io(what, path))?;
    if !m.is_file() {
        return Err(VmStateError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    if m.len() > MAX_FILE {
        return Err(VmStateError::TooLarge {
            what,
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(io(what, path))?;
    Ok(CapturedFile {
        path: path.to_path_buf(),
        bytes,
        owner: owner_of(&m),
    })
}

/// The TPM state folder of the VM with UUID `uuid`.
pub fn tpm_dir(uuid: &str) -> PathBuf {
    Path::new(SWTPM_DIR).join(uuid.to_ascii_lowercase())
}

/// Reads the TPM state folder `dir` once: its folders (itself first) and files. swtpm's lock
/// file (`.lock`) and other hidden files are no state.
/// A TPM state folder as read: its folders (with owners) and its files.
type TpmRead = (Vec<(PathBuf, Owner)>, Vec<CapturedFile>);

fn read_tpm_once(dir: &Path) -> Result<TpmRead> {
    const WHAT: &str = "TPM state";
    let m = std::fs::symlink_metadata(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => VmStateError::TpmMissing(dir.to_path_buf()),
        _ => io(WHAT, dir)(e),
    })?;
    if !m.is_dir() {
        return Err(VmStateError::TpmMissing(dir.to_path_buf()));
    }
    let mut dirs = vec![(dir.to_path_buf(), owner_of(&m))];
    let mut files = Vec::new();
    let mut i = 0;
    while i < dirs.len() {
        let d = dirs[i].0.clone();
        i += 1;
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .map_err(io(WHAT, &d))?
            .collect::<std::io::Result<_>>()
            .map_err(io(WHAT, &d))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).map_err(io(WHAT, &p))?;
            if m.is_dir() {
                // swtpm keeps its files one level down (`tpm2/`, `tpm1.2/`); deeper is not its.
                if dirs.len() < 16 {
                    dirs.push((p, owner_of(&m)));
                }
            } else if m.is_file() {
                files.push(read_file(WHAT, &p)?);
            }
        }
    }
    if files.is_empty() {
        return Err(VmStateError::TpmMissing(dir.to_path_buf()));
    }
    Ok((dirs, files))
}

/// Reads with `read` until two reads in a row agree.
fn stable<T: PartialEq>(what: &'static str, mut read: impl FnMut() -> Result<T>) -> Result<T> {
    let mut last = read()?;
    for _ in 0..ATTEMPTS {
        let next = read()?;
        if next == last {
            return Ok(next);
        }
        tracing::debug!(what, "changed while read: reading again");
        std::thread::sleep(Duration::from_millis(50));
        last = next;
    }
    Err(VmStateError::Unstable { what })
}

/// Reads the NVRAM file and the emulated TPM's state of the VM that `spec` (its definition)
/// describes, each consistently (see the module documentation). A VM defined without them
/// gives `Captured::default()`; one that names them while they are missing or unreadable is
/// an error. A TPM whose state libvirt does not keep (passthrough, external) is not read.
pub fn capture(spec: &VmSpec) -> Result<Captured> {
    let mut out = Captured::default();
    if let Some(p) = &spec.nvram {
        let path = PathBuf::from(p);
        out.nvram = Some(stable("NVRAM file", || {
            read_file("NVRAM file", &path).map_err(|e| match e {
                VmStateError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    VmStateError::NvramMissing(path.clone())
                }
                e => e,
            })
        })?);
    }
    if let Some(t) = spec.tpm.as_ref().filter(|t| t.backend == "emulator") {
        if spec.uuid.is_empty() {
            return Err(VmStateError::NoUuid);
        }
        let dir = tpm_dir(&spec.uuid);
        let (dirs, files) = stable("TPM state", || read_tpm_once(&dir))?;
        out.tpm = Some(CapturedTpm {
            model: t.model.clone(),
            version: t.version.clone(),
            dir,
            dirs,
            files,
        });
    }
    Ok(out)
}

/// The object name (one component, below the backup's folder) of TPM state file `path` of
/// state folder `dir`: `tpm+` and its path below `dir`, `/` written `+`.
fn tpm_object(dir: &Path, path: &Path) -> Result<String> {
    let rel = path
        .strip_prefix(dir)
        .map_err(|_| VmStateError::BadName(path.to_path_buf()))?;
    let mut name = String::from("tpm");
    for c in rel.components() {
        let c = c.as_os_str().to_str().unwrap_or("");
        let ok = !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
        if !ok {
            return Err(VmStateError::BadName(path.to_path_buf()));
        }
        name.push('+');
        name.push_str(c);
    }
    Ok(name)
}

/// The object name of the NVRAM file.
pub const NVRAM_OBJECT: &str = "nvram";

fn entry(repo: &Repository, id: &str, object: &str, f: &CapturedFile) -> Result<StateFile> {
    let object = repo.put_state_file(id, object, &f.bytes)?;
    Ok(StateFile {
        path: f.path.to_string_lossy().into_owned(),
        size: f.bytes.len() as u64,
        sha256: crate::digest::sha256_hex(&f.bytes),
        object,
        owner: f.owner.clone(),
    })
}

/// Stores what `capture` read as objects of backup `id`; returns the manifest's record.
pub fn store(repo: &Repository, id: &str, c: &Captured, read_at: String) -> Result<VmState> {
    let nvram = match &c.nvram {
        Some(f) => Some(entry(repo, id, NVRAM_OBJECT, f)?),
        None => None,
    };
    let tpm = match &c.tpm {
        Some(t) => {
            let mut files = Vec::new();
            for f in &t.files {
                let object = tpm_object(&t.dir, &f.path)?;
                files.push(entry(repo, id, &object, f)?);
            }
            Some(TpmState {
                model: t.model.clone(),
                version: t.version.clone(),
                dir: t.dir.to_string_lossy().into_owned(),
                dirs: t
                    .dirs
                    .iter()
                    .map(|(p, o)| StateDir {
                        path: p.to_string_lossy().into_owned(),
                        owner: o.clone(),
                    })
                    .collect(),
                files,
            })
        }
        None => None,
    };
    Ok(VmState {
        read_at,
        nvram,
        tpm,
    })
}

/// One line per state file of a backup, for `show`; old backups say they hold none.
pub fn describe(m: &crate::repository::manifest::Manifest) -> Vec<String> {
    let Some(s) = &m.vm_state else {
        return vec![
            "NVRAM / TPM state: none recorded (the backup was made before vmbackup backed \
             them up)"
                .into(),
        ];
    };
    let file = |f: &StateFile| {
        format!(
            "{} ({} bytes, sha256 {}, owner {}:{}, mode {:04o})",
            f.path,
            f.size,
            f.sha256,
            f.owner
                .user
                .clone()
                .unwrap_or_else(|| f.owner.uid.to_string()),
            f.owner
                .group
                .clone()
                .unwrap_or_else(|| f.owner.gid.to_string()),
            f.owner.mode
        )
    };
    let mut out = Vec::new();
    match &s.nvram {
        Some(f) => out.push(format!("NVRAM: {}", file(f))),
        None => out.push("NVRAM: none (the VM has no <nvram>)".into()),
    }
    match &s.tpm {
        Some(t) => {
            out.push(format!(
                "TPM: {} {} state in {}",
                t.model.as_deref().unwrap_or("tpm"),
                t.version.as_deref().unwrap_or(""),
                t.dir
            ));
            for f in &t.files {
                out.push(format!("  {}", file(f)));
            }
        }
        None => out.push("TPM: none (the VM has no emulated TPM)".into()),
    }
    out.push(format!("read at {}", s.read_at));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consistent_read_waits_for_two_equal_reads() {
        let mut n = 0;
        let v = stable("x", || {
            n += 1;
            Ok(n.min(3))
        })
        .unwrap();
        assert_eq!(v, 3);
        let mut n = 0;
        assert!(matches!(
            stable("x", || {
                n += 1;
                Ok(n)
            }),
            Err(VmStateError::Unstable { .. })
        ));
    }

    #[test]
    fn tpm_objects_are_flat_names() {
        let d = Path::new("/var/lib/libvirt/swtpm/u");
        assert_eq!(
            tpm_object(d, &d.join("tpm2/tpm2-00.permall")).unwrap(),
            "tpm+tpm2+tpm2-00.permall"
        );
        assert!(tpm_object(d, &d.join("tpm2/a b")).is_err());
        assert!(tpm_object(d, Path::new("/elsewhere/x")).is_err());
    }

    #[test]
    fn reads_a_tpm_folder_without_its_lock_and_fails_on_missing_state() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("u");
        std::fs::create_dir_all(dir.join("tpm2")).unwrap();
        assert!(matches!(
            read_tpm_once(&dir),
            Err(VmStateError::TpmMissing(_))
        ));
        std::fs::write(dir.join("tpm2/.lock"), b"").unwrap();
        std::fs::write(dir.join("tpm2/tpm2-00.permall"), b"state").unwrap();
        let (dirs, files) = read_tpm_once(&dir).unwrap();
        assert_eq!(dirs.len(), 2);
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].bytes, b"state");
        assert!(matches!(
            read_tpm_once(&t.path().join("none")),
            Err(VmStateError::TpmMissing(_))
        ));
    }
}
