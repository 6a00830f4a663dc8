//! The narrow storage interface the repository is built on (put, get, exists, list, delete of
//! named objects), so that another backend (an S3-compatible object store) is a new file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::{RepoError, Result};

pub trait ObjectStore: Send + Sync {
    /// Stores `data` under `name`, atomically and durably.
    fn put(&self, name: &str, data: &[u8]) -> Result<()>;
    /// Stores `data` under `name` atomically; durable only after the next `sync`.
    fn put_unsynced(&self, name: &str, data: &[u8]) -> Result<()>;
    /// Makes everything stored so far durable.
    fn sync(&self) -> Result<()>;
    fn get(&self, name: &str) -> Result<Vec<u8>>;
    fn exists(&self, name: &str) -> Result<bool>;
    /// The names directly or indirectly under `prefix` (a folder, '/'-terminated or empty).
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    fn delete(&self, name: &str) -> Result<()>;
}

/// Object names are relative '/'-separated paths of `[A-Za-z0-9._+-]` components.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('/')
        && name.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-' | '+'))
        });
    if ok {
        Ok(())
    } else {
        Err(RepoError::BadName(name.to_string()))
    }
}

/// Objects as files below a directory.
pub struct LocalDir {
    root: PathBuf,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RepoError + 'a {
    move |source| RepoError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

impl LocalDir {
    pub fn new(root: &Path) -> LocalDir {
        LocalDir {
            root: root.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join(name))
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync folder", dir))
}

impl LocalDir {
    fn write(&self, name: &str, data: &[u8], durable: bool) -> Result<()> {
        let path = self.path(name)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io("create folder", &dir))?;
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(
            ".tmp-{}-{seq}-{}",
            std::process::id(),
            path.file_name()
                .map(|f| f.to_string_lossy())
                .unwrap_or_default()
        ));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(data).map_err(io("write", &tmp))?;
        if durable {
            f.sync_all().map_err(io("sync", &tmp))?;
        } else {
            // Start the writeback now, without waiting for it, so that the `sync` that makes
            // a backup durable has little left to do.
            let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
            // SAFETY: `fd` is the open descriptor of `f`, which lives past the call; the call
            // only starts writeback of the file's dirty pages and touches no memory of ours.
            // Its result is advisory: `sync` below is what guarantees durability.
            let _ = unsafe { libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        }
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io("rename", &path))?;
        if durable {
            sync_dir(&dir)?;
        }
        Ok(())
    }
}

impl ObjectStore for LocalDir {
    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        self.write(name, data, true)
    }

    fn put_unsynced(&self, name: &str, data: &[u8]) -> Result<()> {
        self.write(name, data, false)
    }

    fn sync(&self) -> Result<()> {
        // One syncfs of the repository's filesystem instead of an fsync per object: data and
        // directory entries of everything written so far become durable together.
        let d = File::open(&self.root).map_err(io("open", &self.root))?;
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d)).map_err(|e| RepoError::Io {
            what: "syncfs",
            path: self.root.clone(),
            source: std::io::Error::from_raw_os_error(e as i32),
        })
    }

    fn get(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.path(name)?;
        std::fs::read(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                RepoError::NotFound(name.to_string())
            } else {
                RepoError::Io {
                    what: "read",
                    path,
                    source,
                }
            }
        })
    }

    fn exists(&self, name: &str) -> Result<bool> {
        Ok(self.path(name)?.exists())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let base = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path(prefix.trim_end_matches('/'))?
        };
        let mut out = Vec::new();
        let mut stack = vec![base];
        while let Some(dir) = stack.pop() {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("list", &dir)(e)),
            };
            for e in rd {
                let e = e.map_err(io("list", &dir))?;
                let p = e.path();
                let fname = e.file_name().to_string_lossy().into_owned();
                if fname.starts_with(".tmp-") {
                    continue;
                }
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&self.root) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("delete", &path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn put_get_list_delete_and_mode() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalDir::new(d.path());
        s.put("a/b/c.json", b"x").unwrap();
        assert_eq!(s.get("a/b/c.json").unwrap(), b"x");
        assert!(s.exists("a/b/c.json").unwrap());
        assert_eq!(s.list("a/").unwrap(), ["a/b/c.json"]);
        let mode = std::fs::metadata(d.path().join("a/b/c.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        s.delete("a/b/c.json").unwrap();
        assert!(matches!(s.get("a/b/c.json"), Err(RepoError::NotFound(_))));
    }

    #[test]
    fn names_cannot_escape() {
        for n in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a/./b",
            "a b",
        ] {
            assert!(check_name(n).is_err(), "{n:?}");
        }
        assert!(check_name("backups/vm-1/manifest.json").is_ok());
    }
}
