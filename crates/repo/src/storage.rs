//! The narrow storage interface the repository is built on (put, get, exists, list, delete of
//! named objects), so that another backend (an S3-compatible object store) is a new file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{RepoError, Result};

pub trait ObjectStore: Send + Sync {
    /// Stores `data` under `name`, atomically and durably.
    fn put(&self, name: &str, data: &[u8]) -> Result<()>;
    /// Like `put`, but only if nothing has that name yet (`RepoError::Exists` otherwise; the
    /// existing object is untouched). For objects that are written once and never replaced.
    fn put_new(&self, name: &str, data: &[u8]) -> Result<()>;
    /// Stores `data` for `name`; it is visible to this store at once (`exists`, `get`), and
    /// under its name to everyone else only after the next `sync`, which makes it durable
    /// first. So an object that others can see is never half-written, even after a crash.
    fn put_unsynced(&self, name: &str, data: &[u8]) -> Result<()>;
    /// Makes everything stored so far durable, and visible under its name. When it fails,
    /// what was not named yet never will be (as after `forget_unsynced`).
    fn sync(&self) -> Result<()>;
    /// Drops every write not yet synced: none of them will ever be visible.
    fn forget_unsynced(&self);
    /// Removes what writes that never reached their `sync` left behind (a killed process, a
    /// crash, a write or sync that failed), except what this store will still name at its
    /// next `sync`. Only while nobody else writes to the store.
    fn remove_temporaries(&self) -> Result<usize>;
    fn get(&self, name: &str) -> Result<Vec<u8>>;
    fn exists(&self, name: &str) -> Result<bool>;
    /// The names directly or indirectly under `prefix` (a folder, '/'-terminated or empty).
    fn list(&self, prefix: &str) -> Result<Vec<String>>;
    fn delete(&self, name: &str) -> Result<()>;
    /// The names under `prefix` (as `list`), each with the size of its object as stored: for
    /// a wrapper that changes what it stores (the encryption's `Sealed`), the size in the
    /// store beneath it. The default reads every object; a store that knows sizes from its
    /// listing (a folder, S3) says so, and a wrapper forwards it.
    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for name in self.list(prefix)? {
            match self.get(&name) {
                Ok(data) => out.push((name, data.len() as u64)),
                // Deleted since the listing.
                Err(RepoError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
    /// Deletes every object of `names` (a missing one is no error), in requests of up to
    /// `delete_batch` names. On an error some may be deleted already. The default deletes
    /// them one by one.
    fn delete_many(&self, names: &[String]) -> Result<()> {
        for name in names {
            self.delete(name)?;
        }
        Ok(())
    }
    /// Whether `list_sized` costs no more than `list`: the sizes come with the listing (S3).
    /// In a folder they cost a stat of every object, which a gc of 1,000,000 chunks should
    /// not pay for the few it deletes.
    fn listing_has_sizes(&self) -> bool {
        false
    }
    /// How many objects one request of `delete_many` deletes at most (1: a request each).
    fn delete_batch(&self) -> usize {
        1
    }
    /// How long a new object may stay missing from `list` after its `put` returned (an
    /// eventually consistent listing). The repository locks wait this long before they list.
    /// Cautious by default; a store that lists what it wrote at once says zero.
    fn list_lag(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }
    /// The requests this store made to a remote service so far, by kind (`None`: a local
    /// store, which makes none).
    fn requests(&self) -> Option<RequestCounts> {
        None
    }
    /// How many reads a reader such as a restore should keep in flight: a remote store
    /// answers each after a round trip, so more than the CPUs pay off.
    fn parallel_reads(&self) -> usize {
        1
    }
}

/// Requests made to an object store, by kind; retries count as requests. `delete` counts the
/// deletes of one object and the bulk deletes (S3 DeleteObjects, up to 1000 objects each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct RequestCounts {
    pub get: u64,
    pub put: u64,
    pub head: u64,
    pub list: u64,
    pub delete: u64,
}

impl RequestCounts {
    /// What was made between `earlier` and `self`.
    pub fn since(&self, earlier: &RequestCounts) -> RequestCounts {
        RequestCounts {
            get: self.get.saturating_sub(earlier.get),
            put: self.put.saturating_sub(earlier.put),
            head: self.head.saturating_sub(earlier.head),
            list: self.list.saturating_sub(earlier.list),
            delete: self.delete.saturating_sub(earlier.delete),
        }
    }
}

/// Object names are relative '/'-separated paths of `[A-Za-z0-9._+@-]` components (`@`: the
/// backup ids of plain QEMU VMs, `<name>@qemu-...`).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('/')
        && name.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars().all(|ch| {
                    ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-' | '+' | '@')
                })
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
    /// Written by `put_unsynced`, not yet synced: object name -> its temporary file.
    pending: Mutex<HashMap<String, PathBuf>>,
    /// Folders this store created whose entry in their parent is not yet durable: the
    /// parent is fsynced before anything in them counts as durable.
    new_folders: Mutex<std::collections::BTreeSet<PathBuf>>,
    #[cfg(any(test, feature = "fault-injection"))]
    flush_hook: Option<FlushHook>,
}

/// A flush a store is about to make (for tests that model what a power cut keeps).
#[derive(Debug, Clone, Copy)]
pub enum Flush<'a> {
    /// An fsync of this file's data.
    File(&'a Path),
    /// An fsync of this folder (its entries).
    Folder(&'a Path),
}

/// Called before every flush of a `LocalDir`; `false` fails that flush with EIO.
#[cfg(any(test, feature = "fault-injection"))]
pub type FlushHook = std::sync::Arc<dyn Fn(Flush<'_>) -> bool + Send + Sync>;

/// Temporary files start with this; `list` never shows them.
const TEMPORARY: &str = ".tmp-";

/// Runs `f` on every item, on several threads: the kernel merges concurrent fsyncs into
/// fewer journal commits. The first error is returned, after all items were tried.
fn each_in_parallel<T: Sync>(items: &[T], f: impl Fn(&T) -> Result<()> + Sync) -> Result<()> {
    let next = AtomicUsize::new(0);
    let threads = items.len().clamp(1, 8);
    let errors: Vec<RepoError> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut first = None;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        if let Err(e) = f(item) {
                            first.get_or_insert(e);
                        }
                    }
                    first
                })
            })
            .collect();
        workers
            .into_iter()
            .filter_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
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
            pending: Mutex::new(HashMap::new()),
            new_folders: Mutex::new(Default::default()),
            root: root.to_path_buf(),
            #[cfg(any(test, feature = "fault-injection"))]
            flush_hook: None,
        }
    }

    /// A store that tells `hook` of every flush before it makes it (fault injection).
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn with_flush_hook(root: &Path, hook: FlushHook) -> LocalDir {
        let mut store = LocalDir::new(root);
        store.flush_hook = Some(hook);
        store
    }

    #[allow(unused_variables)]
    fn before_flush(&self, what: Flush<'_>) -> std::io::Result<()> {
        #[cfg(any(test, feature = "fault-injection"))]
        if let Some(hook) = &self.flush_hook {
            if !hook(what) {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
        }
        Ok(())
    }

    /// fsync (`all`) or fdatasync of `file`, at `path`.
    fn sync_file(&self, path: &Path, file: &File, all: bool) -> Result<()> {
        self.before_flush(Flush::File(path))
            .and_then(|()| {
                if all {
                    file.sync_all()
                } else {
                    file.sync_data()
                }
            })
            .map_err(io("sync", path))
    }

    fn sync_dir(&self, dir: &Path) -> Result<()> {
        self.before_flush(Flush::Folder(dir))
            .and_then(|()| File::open(dir))
            .and_then(|d| d.sync_all())
            .map_err(io("sync folder", dir))
    }

    /// Creates `dir` and its missing parents below the root, remembering each as new.
    fn create_folders(&self, dir: &Path) -> Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        let missing: Vec<&Path> = dir
            .ancestors()
            .take_while(|d| *d != self.root && !d.is_dir())
            .collect();
        for d in missing.into_iter().rev() {
            match std::fs::create_dir(d) {
                Ok(()) => {
                    self.new_folders().insert(d.to_path_buf());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("create folder", d)(e)),
            }
        }
        Ok(())
    }

    fn new_folders(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<PathBuf>> {
        self.new_folders.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the entries of the folders this store created durable in their parents,
    /// deepest first (a folder's own entries are its caller's business).
    fn sync_new_folders(&self) -> Result<()> {
        let new: Vec<PathBuf> = self.new_folders().iter().rev().cloned().collect();
        let mut parents = std::collections::BTreeSet::new();
        for d in &new {
            if let Some(p) = d.parent() {
                parents.insert(p.to_path_buf());
            }
        }
        // Deepest first: a parent that is itself new gets its own entry synced after.
        for p in parents.iter().rev() {
            self.sync_dir(p)?;
        }
        let mut set = self.new_folders();
        for d in &new {
            set.remove(d);
        }
        Ok(())
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        check_name(name)?;
        Ok(self.root.join(name))
    }

    /// Calls `visit(path, file name)` for every file below `base` (none when it is missing).
    fn walk(&self, base: PathBuf, mut visit: impl FnMut(&Path, &str) -> Result<()>) -> Result<()> {
        let mut stack = vec![base];
        while let Some(dir) = stack.pop() {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("list", &dir)(e)),
            };
            for e in rd {
                let e = e.map_err(io("list", &dir))?;
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                } else {
                    visit(&e.path(), &e.file_name().to_string_lossy())?;
                }
            }
        }
        Ok(())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, PathBuf>> {
        // The map is consistent after every statement: a panic elsewhere does not spoil it.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LocalDir {
    fn write(&self, name: &str, data: &[u8], mode: Mode) -> Result<()> {
        let path = self.path(name)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        self.create_folders(&dir)?;
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(
            "{TEMPORARY}{}-{seq}-{}",
            std::process::id(),
            path.file_name()
                .map(|f| f.to_string_lossy())
                .unwrap_or_default()
        ));
        match self.write_tmp(&tmp, &path, &dir, name, data, mode) {
            Ok(()) => Ok(()),
            Err(e) => {
                // A full file system, an I/O error: the partial temporary is of no use.
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn write_tmp(
        &self,
        tmp: &Path,
        path: &Path,
        dir: &Path,
        name: &str,
        data: &[u8],
        mode: Mode,
    ) -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(tmp)
            .map_err(io("create", tmp))?;
        f.write_all(data).map_err(io("write", tmp))?;
        if mode != Mode::Unsynced {
            self.sync_file(tmp, &f, true)?;
        } else {
            // Start the writeback now, without waiting for it, so that the `sync` that makes
            // a backup durable has little left to do.
            let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
            // SAFETY: `fd` is the open descriptor of `f`, which lives past the call; the call
            // only starts writeback of the file's dirty pages and touches no memory of ours.
            // Its result is advisory: `sync` is what guarantees durability.
            let _ = unsafe { libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
            drop(f);
            // The name is given by `sync`, once the data is durable.
            let mut pending = self.pending();
            if pending.contains_key(name) {
                // Another thread stored the same object meanwhile.
                let _ = std::fs::remove_file(tmp);
            } else {
                pending.insert(name.to_string(), tmp.to_path_buf());
            }
            return Ok(());
        }
        drop(f);
        if mode == Mode::New {
            // link(2) fails when the name exists: no window in which an existing object
            // could be replaced.
            if self.pending().contains_key(name) {
                return Err(RepoError::Exists(name.to_string()));
            }
            match std::fs::hard_link(tmp, path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(RepoError::Exists(name.to_string()))
                }
                Err(e) => return Err(io("rename", path)(e)),
            }
            let _ = std::fs::remove_file(tmp);
        } else {
            std::fs::rename(tmp, path).map_err(io("rename", path))?;
        }
        self.sync_dir(dir)?;
        // The new folders on the way to it, if any, so that the name survives a power cut.
        self.sync_new_folders()?;
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Durable, replacing what had the name.
    Replace,
    /// Durable, only if nothing has the name.
    New,
    /// Named at the next `sync`.
    Unsynced,
}

impl Drop for LocalDir {
    /// Objects never synced belong to a backup that failed: nothing refers to them.
    fn drop(&mut self) {
        for (_, tmp) in self.pending().drain() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

impl ObjectStore for LocalDir {
    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        self.write(name, data, Mode::Replace)
    }

    fn put_new(&self, name: &str, data: &[u8]) -> Result<()> {
        self.write(name, data, Mode::New)
    }

    fn put_unsynced(&self, name: &str, data: &[u8]) -> Result<()> {
        self.write(name, data, Mode::Unsynced)
    }

    fn sync(&self) -> Result<()> {
        // Per file, not syncfs: other writers on the same filesystem (VM images, logs) are
        // not this backup's to wait for. The data first, then the names, then the folders
        // that hold the names, so that no name ever points at data that is not durable.
        let batch: Vec<(String, PathBuf)> =
            std::mem::take(&mut *self.pending()).into_iter().collect();
        // After a failed fsync the data's state is unknown (the kernel may have dropped the
        // dirty pages): the temporaries not yet named are removed, never named later. The
        // backup that wrote them fails; the next one writes them again.
        let forget = |from: usize| {
            for (_, tmp) in &batch[from..] {
                let _ = std::fs::remove_file(tmp);
            }
        };
        if let Err(e) = each_in_parallel(&batch, |(_, tmp)| {
            let f = File::open(tmp).map_err(io("sync", tmp))?;
            self.sync_file(tmp, &f, false)
        }) {
            forget(0);
            return Err(e);
        }
        let mut folders = std::collections::BTreeSet::new();
        for (i, (name, tmp)) in batch.iter().enumerate() {
            let renamed = self.path(name).and_then(|path| {
                std::fs::rename(tmp, &path)
                    .map_err(io("rename", &path))
                    .map(|()| path)
            });
            match renamed {
                Ok(path) => {
                    if let Some(dir) = path.parent() {
                        folders.insert(dir.to_path_buf());
                    }
                }
                Err(e) => {
                    forget(i);
                    return Err(e);
                }
            }
        }
        let folders: Vec<PathBuf> = folders.into_iter().collect();
        each_in_parallel(&folders, |dir| self.sync_dir(dir))?;
        self.sync_new_folders()
    }

    fn forget_unsynced(&self) {
        for (_, tmp) in self.pending().drain() {
            let _ = std::fs::remove_file(tmp);
        }
    }

    fn remove_temporaries(&self) -> Result<usize> {
        let mut removed = 0;
        self.walk(self.root.clone(), |path, file| {
            let Some(rest) = file.strip_prefix(TEMPORARY) else {
                return Ok(());
            };
            // `.tmp-PID-...`: a process that is still alive may still sync it; this one
            // names only what it holds as pending.
            let pid = rest.split('-').next().unwrap_or_default();
            if pid == std::process::id().to_string() {
                if self.pending().values().any(|p| p == path) {
                    return Ok(());
                }
            } else if !pid.is_empty() && Path::new("/proc").join(pid).exists() {
                return Ok(());
            }
            match std::fs::remove_file(path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("delete", path)(e)),
            }
            Ok(())
        })?;
        Ok(removed)
    }

    fn get(&self, name: &str) -> Result<Vec<u8>> {
        if let Some(tmp) = self.pending().get(name).cloned() {
            return std::fs::read(&tmp).map_err(io("read", &tmp));
        }
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
        let path = self.path(name)?;
        Ok(self.pending().contains_key(name) || path.exists())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let base = if prefix.is_empty() {
            self.root.clone()
        } else {
            self.path(prefix.trim_end_matches('/'))?
        };
        let mut out = Vec::new();
        self.walk(base, |path, file| {
            if !file.starts_with(TEMPORARY) {
                if let Ok(rel) = path.strip_prefix(&self.root) {
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
            Ok(())
        })?;
        out.sort();
        Ok(out)
    }

    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for name in self.list(prefix)? {
            let path = self.path(&name)?;
            match std::fs::symlink_metadata(&path) {
                Ok(m) => out.push((name, m.len())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("list", &path)(e)),
            }
        }
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        if let Some(tmp) = self.pending().remove(name) {
            let _ = std::fs::remove_file(tmp);
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("delete", &path)(e)),
        }
        // A backup's folder goes with its last object (it fails while others remain).
        if name.starts_with("backups/") {
            if let Some(dir) = path.parent().filter(|d| *d != self.root.join("backups")) {
                let _ = std::fs::remove_dir(dir);
            }
        }
        Ok(())
    }

    /// A folder lists what it holds at once.
    fn list_lag(&self) -> std::time::Duration {
        std::time::Duration::ZERO
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

    /// A store that implements only what it must, to try the trait's defaults.
    struct Plain(LocalDir);

    impl ObjectStore for Plain {
        fn put(&self, name: &str, data: &[u8]) -> Result<()> {
            self.0.put(name, data)
        }
        fn put_new(&self, name: &str, data: &[u8]) -> Result<()> {
            self.0.put_new(name, data)
        }
        fn put_unsynced(&self, name: &str, data: &[u8]) -> Result<()> {
            self.0.put_unsynced(name, data)
        }
        fn sync(&self) -> Result<()> {
            self.0.sync()
        }
        fn forget_unsynced(&self) {
            self.0.forget_unsynced()
        }
        fn remove_temporaries(&self) -> Result<usize> {
            self.0.remove_temporaries()
        }
        fn get(&self, name: &str) -> Result<Vec<u8>> {
            self.0.get(name)
        }
        fn exists(&self, name: &str) -> Result<bool> {
            self.0.exists(name)
        }
        fn list(&self, prefix: &str) -> Result<Vec<String>> {
            self.0.list(prefix)
        }
        fn delete(&self, name: &str) -> Result<()> {
            self.0.delete(name)
        }
    }

    /// `list_sized` gives each object's size as stored, `delete_many` deletes all it is given
    /// (missing names too), for a folder, the trait's defaults, and the test wrappers.
    #[test]
    fn sized_listings_and_deletes_of_many() {
        let d = tempfile::tempdir().unwrap();
        for f in ["a", "b", "c", "e"] {
            std::fs::create_dir(d.path().join(f)).unwrap();
        }
        let stores: Vec<(&str, Box<dyn ObjectStore>)> = vec![
            ("folder", Box::new(LocalDir::new(&d.path().join("a")))),
            (
                "defaults",
                Box::new(Plain(LocalDir::new(&d.path().join("b")))),
            ),
            (
                "test store",
                Box::new(crate::teststores::TestStore::new(&d.path().join("c"))),
            ),
            (
                "faulty",
                Box::new(crate::faults::FaultyStore::new(
                    LocalDir::new(&d.path().join("e")),
                    "manifest.json",
                )),
            ),
        ];
        for (what, s) in stores {
            s.put("chunks/00/a", b"1").unwrap();
            s.put("chunks/01/b", &[7; 300]).unwrap();
            s.put_unsynced("chunks/02/c", &[1; 20]).unwrap();
            s.sync().unwrap();
            s.put("other/x", b"xx").unwrap();
            assert_eq!(
                s.list_sized("chunks/").unwrap(),
                [
                    ("chunks/00/a".to_string(), 1),
                    ("chunks/01/b".to_string(), 300),
                    ("chunks/02/c".to_string(), 20)
                ],
                "{what}"
            );
            assert_eq!(s.list_sized("none/").unwrap(), [], "{what}");
            assert_eq!(s.delete_batch(), 1, "{what}: one at a time");
            let names = ["chunks/00/a", "chunks/02/c", "chunks/09/missing"].map(String::from);
            s.delete_many(&names).unwrap();
            s.delete_many(&[]).unwrap();
            assert_eq!(s.list("").unwrap(), ["chunks/01/b", "other/x"], "{what}");
            assert!(
                matches!(
                    s.delete_many(&["../x".to_string()]),
                    Err(RepoError::BadName(_))
                ),
                "{what}"
            );
        }
    }

    fn temporaries(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else if e.file_name().to_string_lossy().starts_with(TEMPORARY) {
                    out.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        out
    }

    #[test]
    fn unsynced_objects_are_named_only_once_durable() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalDir::new(d.path());
        s.put_unsynced("chunks/ab/x", b"data").unwrap();
        s.put_unsynced("chunks/cd/y", b"more").unwrap();
        // This store sees them (so it deduplicates against them) ...
        assert!(s.exists("chunks/ab/x").unwrap());
        assert_eq!(s.get("chunks/ab/x").unwrap(), b"data");
        // ... nobody else does: no file has the name yet, and another store does not see it.
        assert!(!d.path().join("chunks/ab/x").exists());
        assert!(s.list("chunks/").unwrap().is_empty());
        assert!(!LocalDir::new(d.path()).exists("chunks/ab/x").unwrap());
        s.sync().unwrap();
        assert_eq!(
            std::fs::read(d.path().join("chunks/ab/x")).unwrap(),
            b"data"
        );
        assert_eq!(s.list("chunks/").unwrap(), ["chunks/ab/x", "chunks/cd/y"]);
        assert_eq!(LocalDir::new(d.path()).get("chunks/cd/y").unwrap(), b"more");
        assert!(temporaries(d.path()).is_empty());
        // The same object stored twice before a sync is one file.
        s.put_unsynced("chunks/ef/z", b"z").unwrap();
        s.put_unsynced("chunks/ef/z", b"z").unwrap();
        assert_eq!(temporaries(d.path()).len(), 1);
        s.sync().unwrap();
        assert!(temporaries(d.path()).is_empty());
    }

    #[test]
    fn writes_that_never_reach_their_sync_leave_nothing_behind() {
        let d = tempfile::tempdir().unwrap();
        // A store dropped before its sync (a failed backup): its objects are gone.
        let s = LocalDir::new(d.path());
        s.put_unsynced("chunks/ab/x", b"data").unwrap();
        drop(s);
        assert!(temporaries(d.path()).is_empty());
        let s = LocalDir::new(d.path());
        assert!(!s.exists("chunks/ab/x").unwrap());
        // A killed writer's temporary (its process is gone) is removed; a live one's is not.
        std::fs::create_dir_all(d.path().join("chunks/ab")).unwrap();
        let dead = d.path().join("chunks/ab/.tmp-999999999-0-x");
        std::fs::write(&dead, b"torn").unwrap();
        s.put_unsynced("chunks/ab/y", b"live").unwrap();
        assert_eq!(s.remove_temporaries().unwrap(), 1);
        assert!(!dead.exists());
        s.sync().unwrap();
        assert_eq!(s.get("chunks/ab/y").unwrap(), b"live");
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
            "a/b:c",
            "a\\b",
        ] {
            assert!(check_name(n).is_err(), "{n:?}");
        }
        assert!(check_name("backups/vm-1/manifest.json").is_ok());
        assert!(check_name("backups/web@qemu-20261130T050000Z-ab12/manifest.json").is_ok());
        assert!(check_name("web@qemu-20261130T050000Z-ab12").is_ok());
    }
}
