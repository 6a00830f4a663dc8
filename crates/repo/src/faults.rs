//! A fault-injecting object store, for tests only (compiled in with the `fault-injection`
//! feature): it wraps another store and makes chosen operations fail the way a file system
//! does (ENOSPC once a number of bytes was written, EIO on a sync, EIO when an object is
//! named) or silently tears writes (what a device that loses writes leaves).
//!
//! `PowerCut` is the power cut: where the kernel has no `dm-log-writes` to replay a real
//! device's flushes (this project's machines have no device mapper), it models what a
//! file system is bound to keep (POSIX, nothing more): a file's data as of its last fsync,
//! a folder's entries as of its last fsync. It watches every flush of a `LocalDir` (its flush
//! hook), and at the chosen one cuts: that flush and every later one fail, and `restore`
//! rewrites the directory as the cut left it: unsynced temporaries, renames into folders
//! not fsynced since, folders whose parent was never fsynced, and data never fsynced
//! (kept as empty files) are gone.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::storage::{Flush, FlushHook, ObjectStore};
use crate::{RepoError, Result};

/// What to break. Every field may be changed while the store is in use.
#[derive(Debug, Default)]
pub struct Faults {
    /// Writes fail with ENOSPC once they would take the bytes written past this.
    pub space: AtomicU64,
    /// `sync` fails with EIO (nothing of the batch gets a name).
    pub eio_on_sync: AtomicBool,
    /// Durable writes (`put`, `put_new`: write, fsync, rename) of names that contain the
    /// store's `eio_on_name` fail with EIO, as a failed rename or folder fsync would.
    pub eio_on_publish: AtomicBool,
    /// Unsynced writes (chunks) keep only their first half, and report success.
    pub torn: AtomicBool,
}

pub struct FaultyStore<S> {
    inner: S,
    /// Shared: keep a clone to change the faults once the store is in a repository.
    pub faults: Arc<Faults>,
    written: AtomicU64,
    eio_on_name: String,
}

fn os_error(what: &'static str, name: &str, errno: i32) -> RepoError {
    RepoError::Io {
        what,
        path: name.into(),
        source: std::io::Error::from_raw_os_error(errno),
    }
}

impl<S: ObjectStore> FaultyStore<S> {
    /// A store that breaks nothing yet; `eio_on_publish` applies to names containing
    /// `eio_on_name` (e.g. `manifest.json`).
    pub fn new(inner: S, eio_on_name: &str) -> Self {
        FaultyStore {
            inner,
            faults: Arc::new(Faults {
                space: AtomicU64::new(u64::MAX),
                ..Faults::default()
            }),
            written: AtomicU64::new(0),
            eio_on_name: eio_on_name.to_string(),
        }
    }

    /// Bytes written through this store so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    fn take_space(&self, name: &str, n: usize) -> Result<()> {
        let limit = self.faults.space.load(Ordering::SeqCst);
        let before = self.written.fetch_add(n as u64, Ordering::SeqCst);
        if before.saturating_add(n as u64) > limit {
            self.written.fetch_sub(n as u64, Ordering::SeqCst);
            return Err(os_error("write", name, libc::ENOSPC));
        }
        Ok(())
    }

    fn durable(&self, name: &str, data: &[u8]) -> Result<()> {
        self.take_space(name, data.len())?;
        if self.faults.eio_on_publish.load(Ordering::SeqCst) && name.contains(&self.eio_on_name) {
            return Err(os_error("rename", name, libc::EIO));
        }
        Ok(())
    }
}

impl<S: ObjectStore> ObjectStore for FaultyStore<S> {
    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        self.durable(name, data)?;
        self.inner.put(name, data)
    }

    fn put_new(&self, name: &str, data: &[u8]) -> Result<()> {
        self.durable(name, data)?;
        self.inner.put_new(name, data)
    }

    fn put_unsynced(&self, name: &str, data: &[u8]) -> Result<()> {
        self.take_space(name, data.len())?;
        if self.faults.torn.load(Ordering::SeqCst) {
            return self.inner.put_unsynced(name, &data[..data.len() / 2]);
        }
        self.inner.put_unsynced(name, data)
    }

    fn sync(&self) -> Result<()> {
        if self.faults.eio_on_sync.load(Ordering::SeqCst) {
            // As a failed fsync: the written data is in an unknown state, and not named.
            self.inner.forget_unsynced();
            return Err(os_error("sync", "pending objects", libc::EIO));
        }
        self.inner.sync()
    }

    fn forget_unsynced(&self) {
        self.inner.forget_unsynced()
    }

    fn remove_temporaries(&self) -> Result<usize> {
        self.inner.remove_temporaries()
    }

    fn get(&self, name: &str) -> Result<Vec<u8>> {
        self.inner.get(name)
    }

    fn exists(&self, name: &str) -> Result<bool> {
        self.inner.exists(name)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list(prefix)
    }

    fn delete(&self, name: &str) -> Result<()> {
        self.inner.delete(name)
    }

    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        self.inner.list_sized(prefix)
    }

    fn delete_many(&self, names: &[String]) -> Result<()> {
        self.inner.delete_many(names)
    }

    fn delete_batch(&self) -> usize {
        self.inner.delete_batch()
    }

    fn listing_has_sizes(&self) -> bool {
        self.inner.listing_has_sizes()
    }

    fn requests(&self) -> Option<crate::storage::RequestCounts> {
        self.inner.requests()
    }

    fn list_lag(&self) -> std::time::Duration {
        self.inner.list_lag()
    }

    fn parallel_reads(&self) -> usize {
        self.inner.parallel_reads()
    }
}

/// What a power cut keeps of a folder tree: see the module's documentation.
pub struct PowerCut {
    root: PathBuf,
    cut_at: Option<usize>,
    model: Mutex<Durable>,
}

#[derive(Default)]
struct Durable {
    /// Each folder's entries as of its last fsync (or the start): name -> (inode, folder?).
    entries: HashMap<PathBuf, BTreeMap<OsString, (u64, bool)>>,
    /// Each file's data (by inode) as of its last fsync (or the start).
    data: HashMap<u64, Vec<u8>>,
    flushes: usize,
    /// The tree the cut left, once it happened.
    kept: Option<Tree>,
}

enum Tree {
    File(Vec<u8>),
    Folder(BTreeMap<OsString, Tree>),
}

fn listing(dir: &Path) -> BTreeMap<OsString, (u64, bool)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(m) = e.metadata() {
            out.insert(e.file_name(), (m.ino(), m.is_dir()));
        }
    }
    out
}

impl Durable {
    fn record_folder(&mut self, dir: &Path) {
        self.entries.insert(dir.to_path_buf(), listing(dir));
    }

    fn record_file(&mut self, file: &Path) {
        if let (Ok(m), Ok(bytes)) = (std::fs::metadata(file), std::fs::read(file)) {
            self.data.insert(m.ino(), bytes);
        }
    }

    /// The tree below `dir` as durable now. A folder never fsynced since it was made keeps
    /// no entry; a file whose data was never fsynced is empty.
    fn tree(&self, dir: &Path) -> Tree {
        let mut out = BTreeMap::new();
        for (name, (ino, is_dir)) in self.entries.get(dir).into_iter().flatten() {
            let t = if *is_dir {
                self.tree(&dir.join(name))
            } else {
                Tree::File(self.data.get(ino).cloned().unwrap_or_default())
            };
            out.insert(name.clone(), t);
        }
        Tree::Folder(out)
    }
}

fn write_tree(dir: &Path, entries: &BTreeMap<OsString, Tree>) -> std::io::Result<()> {
    for (name, t) in entries {
        let p = dir.join(name);
        match t {
            Tree::File(bytes) => std::fs::write(&p, bytes)?,
            Tree::Folder(sub) => {
                std::fs::create_dir(&p)?;
                write_tree(&p, sub)?;
            }
        }
    }
    Ok(())
}

impl PowerCut {
    /// Watches the tree below `root` from now on (all of it durable now); cuts the power at
    /// flush number `cut_at` (from 0), or never (to count the flushes).
    pub fn start(root: &Path, cut_at: Option<usize>) -> Arc<PowerCut> {
        let mut d = Durable::default();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            d.record_folder(&dir);
            for (name, (_, is_dir)) in d.entries[&dir].clone() {
                let p = dir.join(name);
                if is_dir {
                    stack.push(p);
                } else {
                    d.record_file(&p);
                }
            }
        }
        Arc::new(PowerCut {
            root: root.to_path_buf(),
            cut_at,
            model: Mutex::new(d),
        })
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Durable> {
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hook to give `LocalDir::with_flush_hook`.
    pub fn hook(self: &Arc<Self>) -> FlushHook {
        let me = self.clone();
        Arc::new(move |f: Flush<'_>| {
            let mut d = me.model();
            if d.kept.is_some() {
                return false; // the power is off
            }
            let n = d.flushes;
            d.flushes += 1;
            if Some(n) == me.cut_at {
                d.kept = Some(d.tree(&me.root));
                return false;
            }
            // The flush is taken as done now: a cut at a later one keeps what it flushes.
            match f {
                Flush::File(p) => d.record_file(p),
                Flush::Folder(p) => d.record_folder(p),
            }
            true
        })
    }

    /// Flushes seen so far (the cut one included).
    pub fn flushes(&self) -> usize {
        self.model().flushes
    }

    /// Whether the power was cut.
    pub fn cut(&self) -> bool {
        self.model().kept.is_some()
    }

    /// Rewrites the tree as the cut left it (once whatever wrote to it is gone).
    pub fn restore(&self) -> std::io::Result<()> {
        let d = self.model();
        let Some(Tree::Folder(entries)) = &d.kept else {
            return Ok(());
        };
        for e in std::fs::read_dir(&self.root)? {
            let p = e?.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
        write_tree(&self.root, entries)
    }
}

#[cfg(test)]
mod tests {
    //! The repository under storage faults: a failing backup publishes nothing and leaves
    //! nothing behind once cleaned up; damage is found, reported and repaired.

    use std::path::Path;

    use super::*;
    use crate::chunk::object_name;
    use crate::disk::{backup_disk, DiskIndex};
    use crate::manifest::{DiskEntry, Manifest};
    use crate::source::memory::MemorySource;
    use crate::storage::LocalDir;
    use crate::Repository;

    const M: usize = 1 << 20;

    /// 8 MiB: 6 MiB of incompressible bytes (6 distinct 1 MiB chunks), then zeros.
    fn disk(seed: u64) -> MemorySource {
        let mut x = 0x9E37_79B9_7F4A_7C15 ^ seed;
        let mut data: Vec<u8> = (0..6 * M)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        data.resize(8 * M, 0);
        MemorySource {
            data,
            zero: std::iter::once(6 * M as u64..8 * M as u64).collect(),
        }
    }

    /// A backup as the pipeline makes one: chunks (synced), index, domain XML, manifest.
    fn back_up(repo: &Repository, id: &str, src: &MemorySource) -> crate::Result<u64> {
        let b = backup_disk(repo, src, M as u64, 2, &|_, _| {})?;
        let index_object = repo.put_index(id, "vda", &b.index)?;
        let domain_xml_object = repo.put_domain_xml(id, "<domain/>")?;
        repo.publish(&Manifest {
            format_version: 1,
            id: id.into(),
            vm_name: "vm".into(),
            vm_uuid: "u".into(),
            started_at: format!("2026-01-01T00:00:{:02}Z", id.len()),
            ended_at: String::new(),
            consistency: "crash".into(),
            consistency_reason: None,
            freeze_ms: None,
            vcpus: 1,
            memory_bytes: 1,
            disks: vec![DiskEntry {
                target: "vda".into(),
                format: "raw".into(),
                virtual_size: src.data.len() as u64,
                allocated_size: 0,
                source: "memory".into(),
                chunk_size: M as u64,
                index_object,
                logical_bytes: b.logical_bytes,
                stored_bytes: b.stored_bytes_new,
                read: None,
            }],
            nics: vec![],
            domain_xml_object,
            schedule: None,
            scheduled_for: None,
            tags: Vec::new(),
            stored_bytes: b.stored_bytes_new,
            logical_bytes: b.logical_bytes,
            vm_state: None,
        })?;
        Ok(b.repaired_chunks)
    }

    fn faulty(dir: &Path) -> (Repository, Arc<Faults>) {
        std::fs::create_dir_all(dir).unwrap();
        let store = FaultyStore::new(LocalDir::new(dir), "manifest.json");
        let faults = store.faults.clone();
        (Repository::open_with(dir, Box::new(store)).unwrap(), faults)
    }

    /// Temporary files, and folders under `backups/` without a manifest.
    fn leftovers(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if e.file_type().unwrap().is_dir() {
                    if p.parent() == Some(&root.join("backups"))
                        && !p.join("manifest.json").exists()
                    {
                        out.push(p.display().to_string());
                    }
                    stack.push(p);
                } else if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    out.push(p.display().to_string());
                }
            }
        }
        out
    }

    /// A backup that failed: nothing listed; the failing run's cleanup (`discard_unpublished`)
    /// and then recover's or gc's (`remove_temporaries`) leave nothing; the same data then
    /// backs up and verifies.
    fn fails_cleanly(root: &Path, repo: Repository, id: &str, e: crate::RepoError, errno: i32) {
        match &e {
            crate::RepoError::Io { source, .. } => {
                assert_eq!(source.raw_os_error(), Some(errno), "{e:?}")
            }
            e => panic!("{e:?}"),
        }
        assert!(repo.list().unwrap().is_empty(), "nothing is published");
        assert!(!repo.store().exists(&crate::manifest_name(id)).unwrap());
        repo.discard_unpublished(id).unwrap();
        repo.store().remove_temporaries().unwrap();
        assert_eq!(leftovers(root), Vec::<String>::new());
        drop(repo);
        assert_eq!(leftovers(root), Vec::<String>::new());
        let repo = Repository::open(root).unwrap();
        assert_eq!(repo.remove_incomplete(&[]).unwrap(), 0);
        back_up(&repo, "again", &disk(1)).unwrap();
        assert!(repo.verify("again").unwrap().ok);
        assert_eq!(repo.list().unwrap().len(), 1);
    }

    /// Every flush of a backup (on top of a published one) in turn: the power is cut there,
    /// the repository is reopened as the cut left it, every listed backup verifies, the
    /// cleanup leaves nothing, and a backup of the same data succeeds and verifies.
    #[test]
    fn a_power_cut_at_every_flush_of_a_backup_leaves_only_whole_backups() {
        use crate::storage::LocalDir;
        let prepare = |root: &Path| {
            let repo = Repository::open(root).unwrap();
            back_up(&repo, "before", &disk(1)).unwrap();
        };
        let open_cut = |root: &Path, cut: &Arc<PowerCut>| {
            let store = LocalDir::with_flush_hook(root, cut.hook());
            Repository::open_with(root, Box::new(store)).unwrap()
        };
        // Half of the new backup's chunks are the old one's.
        let mut during = disk(2);
        during.data[..3 * M].copy_from_slice(&disk(1).data[..3 * M]);
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("count");
        prepare(&root);
        let cut = PowerCut::start(&root, None);
        back_up(&open_cut(&root, &cut), "during", &during).unwrap();
        let flushes = cut.flushes();
        // 3 new chunks (data, folders), the index, the domain XML, the manifest, new folders.
        assert!(flushes >= 12, "{flushes} flushes");
        // The last cut comes after the backup returned, at the next write's first flush.
        for k in 0..=flushes {
            let root = d.path().join(format!("cut-{k}"));
            prepare(&root);
            let cut = PowerCut::start(&root, Some(k));
            let repo = open_cut(&root, &cut);
            let r = back_up(&repo, "during", &during);
            if k < flushes {
                assert!(r.is_err(), "cut {k}");
            } else {
                r.unwrap();
                assert!(repo.store().put("later", b"x").is_err());
            }
            assert!(cut.cut(), "cut {k}");
            drop(repo);
            cut.restore().unwrap();
            let repo = Repository::open(&root).unwrap();
            let listed: Vec<String> = repo.list().unwrap().into_iter().map(|m| m.id).collect();
            assert!(
                listed.contains(&"before".to_string()),
                "cut {k}: {listed:?}"
            );
            if k == flushes {
                assert!(
                    listed.contains(&"during".to_string()),
                    "a backup that returned is durable: {listed:?}"
                );
            }
            for id in &listed {
                let v = repo.verify(id).unwrap();
                assert!(
                    v.ok,
                    "cut at flush {k} of {flushes}: {id} is listed but {v:?}"
                );
            }
            // What recover and gc do, then the same data again.
            repo.remove_incomplete(&[]).unwrap();
            repo.store().remove_temporaries().unwrap();
            repo.gc().unwrap().unwrap();
            assert_eq!(leftovers(&root), Vec::<String>::new(), "cut {k}");
            back_up(&repo, "after", &during).unwrap();
            assert!(repo.verify("after").unwrap().ok, "cut {k}");
            assert!(repo.verify("before").unwrap().ok, "cut {k}");
            drop(repo);
            std::fs::remove_dir_all(&root).unwrap();
        }
    }

    #[test]
    fn a_power_cut_keeps_only_what_was_flushed() {
        use crate::storage::LocalDir;
        let d = tempfile::tempdir().unwrap();
        // How many flushes one durable put into new folders makes.
        let count = PowerCut::start(d.path(), None);
        LocalDir::with_flush_hook(d.path(), count.hook())
            .put("a/b/durable", b"kept")
            .unwrap();
        let n = count.flushes();
        assert_eq!(
            n, 4,
            "the file, its folder, the new folders' parents a and the root"
        );
        let root = d.path().join("cut");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("old"), b"old").unwrap();
        let cut = PowerCut::start(&root, Some(n));
        let s = LocalDir::with_flush_hook(&root, cut.hook());
        s.put("a/b/durable", b"kept").unwrap();
        // Written behind the store's back after a/b's last fsync: lost.
        std::fs::write(root.join("a/b/unflushed"), b"lost").unwrap();
        s.put_unsynced("c/d/pending", b"lost").unwrap();
        assert!(s.sync().is_err(), "the power is off");
        assert!(cut.cut());
        drop(s);
        cut.restore().unwrap();
        let s = LocalDir::new(&root);
        assert_eq!(s.get("a/b/durable").unwrap(), b"kept");
        assert_eq!(s.get("old").unwrap(), b"old");
        assert!(!s.exists("c/d/pending").unwrap());
        assert!(!s.exists("a/b/unflushed").unwrap());
        assert!(
            !root.join("c").exists(),
            "a folder never synced into its parent"
        );
    }

    #[test]
    fn a_full_repository_in_the_middle_of_a_disk_fails_the_backup_cleanly() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let (repo, faults) = faulty(&root);
        // Room for about three of the six chunks.
        faults.space.store(3 * M as u64 + 100, Ordering::SeqCst);
        let e = back_up(&repo, "full", &disk(1)).unwrap_err();
        fails_cleanly(&root, repo, "full", e, libc::ENOSPC);
        // Room for the chunks but not the index: the chunks are named, the backup is not.
        let (repo, faults) = faulty(&d.path().join("repo2"));
        faults
            .space
            .store(6 * (M as u64 + 12) + 100, Ordering::SeqCst);
        let e = back_up(&repo, "noindex", &disk(1)).unwrap_err();
        fails_cleanly(&d.path().join("repo2"), repo, "noindex", e, libc::ENOSPC);
    }

    #[test]
    fn eio_on_sync_fails_the_backup_cleanly() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let (repo, faults) = faulty(&root);
        faults.eio_on_sync.store(true, Ordering::SeqCst);
        let e = back_up(&repo, "eio", &disk(1)).unwrap_err();
        // The failed sync named nothing: no chunk is visible.
        assert!(repo.store().list("chunks/").unwrap().is_empty());
        fails_cleanly(&root, repo, "eio", e, libc::EIO);
    }

    #[test]
    fn eio_when_the_manifest_is_named_publishes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let (repo, faults) = faulty(&root);
        faults.eio_on_publish.store(true, Ordering::SeqCst);
        let e = back_up(&repo, "eio", &disk(1)).unwrap_err();
        assert!(repo.store().exists("backups/eio/vda.index").unwrap());
        fails_cleanly(&root, repo, "eio", e, libc::EIO);
    }

    #[test]
    fn torn_chunk_writes_are_found_by_verify_and_written_again_by_the_next_backup() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let (repo, faults) = faulty(&root);
        faults.torn.store(true, Ordering::SeqCst);
        back_up(&repo, "torn", &disk(1)).unwrap();
        let v = repo.verify("torn").unwrap();
        assert_eq!((v.ok, v.damaged.len()), (false, 6), "{v:?}");
        drop(repo);
        // The next run (a new process) reads every existing chunk back before reusing it.
        let repo = Repository::open(&root).unwrap();
        assert_eq!(back_up(&repo, "next", &disk(1)).unwrap(), 6, "6 repaired");
        assert!(repo.verify("next").unwrap().ok);
        assert!(
            repo.verify("torn").unwrap().ok,
            "the same chunks: repaired too"
        );
    }

    #[test]
    fn a_damaged_or_empty_existing_chunk_is_written_again_not_trusted() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let repo = Repository::open(&root).unwrap();
        let src = disk(7);
        assert_eq!(back_up(&repo, "first", &src).unwrap(), 0);
        drop(repo);
        let index =
            DiskIndex::decode(&std::fs::read(root.join("backups/first/vda.index")).unwrap())
                .unwrap();
        let chunk = |i: usize| root.join(object_name(index.chunks[i].as_ref().unwrap()));
        // A flipped bit in one chunk, an empty file in another.
        let mut bytes = std::fs::read(chunk(1)).unwrap();
        bytes[M / 2] ^= 0x04;
        std::fs::write(chunk(1), bytes).unwrap();
        std::fs::write(chunk(4), b"").unwrap();
        let repo = Repository::open(&root).unwrap();
        assert!(!repo.verify("first").unwrap().ok);
        assert_eq!(back_up(&repo, "second", &src).unwrap(), 2);
        assert!(repo.verify("second").unwrap().ok);
        assert!(repo.verify("first").unwrap().ok);
        // Checked once per run: a third backup in the same process reads nothing back.
        let b = backup_disk(&repo, &src, M as u64, 2, &|_, _| {}).unwrap();
        assert_eq!((b.reused_chunks, b.repaired_chunks), (6, 0));
    }

    #[test]
    fn an_id_collision_never_replaces_a_published_backup() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::open(&d.path().join("repo")).unwrap();
        back_up(&repo, "same", &disk(1)).unwrap();
        let before = repo.load("same").unwrap();
        let index = repo.store().get("backups/same/vda.index").unwrap();
        let e = back_up(&repo, "same", &disk(2)).unwrap_err();
        assert!(matches!(e, crate::RepoError::Exists(_)), "{e:?}");
        // The failing run's cleanup does not touch the published backup either.
        repo.discard_unpublished("same").unwrap();
        assert_eq!(repo.load("same").unwrap(), before);
        assert_eq!(repo.store().get("backups/same/vda.index").unwrap(), index);
        assert!(repo.verify("same").unwrap().ok);
        // Nor does a second publish of the manifest alone.
        let mut other = before.clone();
        other.vm_name = "other".into();
        assert!(matches!(
            repo.publish(&other),
            Err(crate::RepoError::Exists(_))
        ));
        assert_eq!(repo.load("same").unwrap(), before);
    }

    #[test]
    fn a_folder_with_other_content_is_refused_and_left_alone() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("notes.txt"), "mine").unwrap();
        let e = Repository::open(d.path()).err().expect("refused");
        assert!(matches!(e, crate::RepoError::NotARepository(_)), "{e:?}");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "nothing written");
        // An empty folder (or one with only lost+found) becomes a repository.
        let empty = d.path().join("empty");
        std::fs::create_dir_all(empty.join("lost+found")).unwrap();
        Repository::open(&empty).unwrap();
        Repository::open(&empty).unwrap();
    }

    #[test]
    fn an_unreadable_manifest_is_named_apart_gc_refuses_verify_reports_delete_removes() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let repo = Repository::open(&root).unwrap();
        back_up(&repo, "a", &disk(1)).unwrap();
        back_up(&repo, "bb", &disk(2)).unwrap();
        back_up(&repo, "ccc", &disk(3)).unwrap();
        let m = root.join("backups/bb/manifest.json");
        let text = std::fs::read(&m).unwrap();
        std::fs::write(&m, &text[..text.len() / 2]).unwrap();
        let ids: Vec<String> = repo.list().unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(ids, ["a", "ccc"]);
        let scan = repo.scan().unwrap();
        assert_eq!(scan.unreadable.len(), 1);
        assert_eq!(scan.unreadable[0].0, "bb");
        let e = repo.gc().unwrap_err();
        assert!(
            matches!(&e, crate::RepoError::UnreadableManifests { ids } if ids == &["bb"]),
            "{e:?}"
        );
        let chunks = repo.store().list("chunks/").unwrap().len();
        assert_eq!(chunks, 18, "gc removed nothing");
        let v = repo.verify("bb").unwrap();
        assert!(!v.ok && v.damaged[0].contains("manifest"), "{v:?}");
        assert!(repo.verify("a").unwrap().ok);
        repo.delete("bb").unwrap();
        assert!(!root.join("backups/bb").exists());
        let c = repo.gc().unwrap().unwrap();
        assert_eq!((c.removed_chunks, c.kept_chunks), (6, 12));
    }

    #[test]
    fn a_missing_domain_xml_or_index_is_reported_and_refused() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let repo = Repository::open(&root).unwrap();
        back_up(&repo, "x", &disk(1)).unwrap();
        back_up(&repo, "y", &disk(2)).unwrap();
        std::fs::remove_file(root.join("backups/x/domain.xml")).unwrap();
        std::fs::remove_file(root.join("backups/y/vda.index")).unwrap();
        let v = repo.verify("x").unwrap();
        assert!(!v.ok && v.damaged[0].contains("domain XML"), "{v:?}");
        let v = repo.verify("y").unwrap();
        assert!(!v.ok && v.damaged[0].contains("index"), "{v:?}");
        for id in ["x", "y"] {
            let m = repo.load(id).unwrap();
            let e = repo.check_complete(&m).unwrap_err();
            assert!(matches!(e, crate::RepoError::Damaged { .. }), "{e:?}");
        }
        assert!(matches!(
            repo.get_domain_xml("x"),
            Err(crate::RepoError::Damaged { .. })
        ));
        // gc cannot know y's chunks: it refuses, and frees nothing.
        assert!(matches!(repo.gc(), Err(crate::RepoError::Damaged { .. })));
        assert_eq!(repo.store().list("chunks/").unwrap().len(), 12);
    }
}

#[cfg(test)]
mod cost {
    //! What checking reused chunks costs: `cargo test --release -p vmbackup-repo --
    //! --ignored --nocapture reuse_check_cost`.

    use std::time::Instant;

    use crate::disk::backup_disk;
    use crate::source::memory::MemorySource;
    use crate::Repository;

    #[test]
    #[ignore = "a measurement, not a check"]
    fn reuse_check_cost() {
        let n = 512usize << 20;
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let data: Vec<u8> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let src = MemorySource { data, zero: vec![] };
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let root = d.path().join("repo");
        let time = |repo: &Repository| {
            let t = Instant::now();
            backup_disk(repo, &src, 4 << 20, 2, &|_, _| {}).unwrap();
            t.elapsed().as_secs_f64()
        };
        let first = time(&Repository::open(&root).unwrap());
        let repo = Repository::open(&root).unwrap();
        let checked = time(&repo);
        let trusted = time(&repo);
        println!(
            "512 MiB, 4 MiB chunks, 2 threads: first backup {first:.2}s; again, every chunk \
             read back and compared {checked:.2}s; again, reused unread (as before) {trusted:.2}s"
        );
    }
}
