//! For unit tests: a store that counts requests, and one whose `list` shows new objects
//! only after a while (an eventually consistent listing), both around a `LocalDir`; and a
//! published one-disk backup of a source in memory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::storage::{LocalDir, ObjectStore};
use crate::{RepoError, Result};

/// Requests made to a store, by kind.
#[derive(Default, Debug)]
pub struct Counts {
    pub put: AtomicUsize,
    pub get: AtomicUsize,
    pub exists: AtomicUsize,
    pub list: AtomicUsize,
    pub delete: AtomicUsize,
}

impl Counts {
    /// Every request that reaches the store (a `sync` of a local folder is no request).
    pub fn total(&self) -> usize {
        [&self.put, &self.get, &self.exists, &self.list, &self.delete]
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .sum()
    }

    pub fn reset(&self) {
        for c in [&self.put, &self.get, &self.exists, &self.list, &self.delete] {
            c.store(0, Ordering::SeqCst);
        }
    }
}

/// A `LocalDir` that counts requests, hides objects from `list` for `lag` after they were
/// written (and says so in `list_lag` only if `honest`), and can fail its `put`s.
pub struct TestStore {
    inner: LocalDir,
    pub counts: Arc<Counts>,
    lag: Duration,
    honest: bool,
    written: Mutex<HashMap<String, Instant>>,
    pub fail_puts: Arc<AtomicBool>,
    /// What `delete_batch` says (a folder's 1 when `None`).
    batch: Option<usize>,
}

impl TestStore {
    pub fn new(root: &Path) -> TestStore {
        TestStore {
            inner: LocalDir::new(root),
            counts: Arc::default(),
            lag: Duration::ZERO,
            honest: true,
            written: Mutex::default(),
            fail_puts: Arc::default(),
            batch: None,
        }
    }

    /// Says it deletes `batch` objects per `delete_many` request (as S3's bulk delete).
    pub fn batched(root: &Path, batch: usize) -> TestStore {
        TestStore {
            batch: Some(batch),
            ..TestStore::new(root)
        }
    }

    /// `list` shows an object only `lag` after its last `put`; `honest`: `list_lag` says so.
    pub fn lagging(root: &Path, lag: Duration, honest: bool) -> TestStore {
        TestStore {
            lag,
            honest,
            ..TestStore::new(root)
        }
    }

    fn count(&self, c: &AtomicUsize, _name: &str) {
        c.fetch_add(1, Ordering::SeqCst);
    }

    fn wrote(&self, name: &str) {
        if let Ok(mut w) = self.written.lock() {
            w.insert(name.to_string(), Instant::now());
        }
    }

    /// Whether `list` shows `name` yet.
    fn listed(&self, name: &str) -> bool {
        let w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        w.get(name).is_none_or(|t| t.elapsed() >= self.lag)
    }

    fn put_allowed(&self, name: &str) -> Result<()> {
        if self.fail_puts.load(Ordering::SeqCst) {
            return Err(RepoError::Io {
                what: "put",
                path: name.into(),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        Ok(())
    }
}

impl ObjectStore for TestStore {
    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        self.count(&self.counts.put, name);
        self.put_allowed(name)?;
        self.inner.put(name, data)?;
        self.wrote(name);
        Ok(())
    }

    fn put_new(&self, name: &str, data: &[u8]) -> Result<()> {
        self.count(&self.counts.put, name);
        self.put_allowed(name)?;
        self.inner.put_new(name, data)?;
        self.wrote(name);
        Ok(())
    }

    fn put_unsynced(&self, name: &str, data: &[u8]) -> Result<()> {
        self.count(&self.counts.put, name);
        self.put_allowed(name)?;
        self.inner.put_unsynced(name, data)?;
        self.wrote(name);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    fn forget_unsynced(&self) {
        self.inner.forget_unsynced()
    }

    fn remove_temporaries(&self) -> Result<usize> {
        self.inner.remove_temporaries()
    }

    fn get(&self, name: &str) -> Result<Vec<u8>> {
        self.count(&self.counts.get, name);
        self.inner.get(name)
    }

    fn exists(&self, name: &str) -> Result<bool> {
        self.count(&self.counts.exists, name);
        self.inner.exists(name)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.count(&self.counts.list, prefix);
        let all = self.inner.list(prefix)?;
        Ok(all.into_iter().filter(|n| self.listed(n)).collect())
    }

    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        self.count(&self.counts.list, prefix);
        let all = self.inner.list_sized(prefix)?;
        Ok(all.into_iter().filter(|(n, _)| self.listed(n)).collect())
    }

    fn delete(&self, name: &str) -> Result<()> {
        self.count(&self.counts.delete, name);
        self.inner.delete(name)
    }

    /// One request per call (as a bulk delete), none for no names.
    fn delete_many(&self, names: &[String]) -> Result<()> {
        if !names.is_empty() {
            self.count(&self.counts.delete, "");
        }
        self.inner.delete_many(names)
    }

    fn delete_batch(&self) -> usize {
        self.batch.unwrap_or_else(|| self.inner.delete_batch())
    }

    fn listing_has_sizes(&self) -> bool {
        self.inner.listing_has_sizes()
    }

    fn list_lag(&self) -> Duration {
        if self.honest {
            // A little more than the lag: `list` runs after the wait.
            self.lag + self.lag / 4
        } else {
            Duration::ZERO
        }
    }
}

/// Backs `src` up (chunks of `chunk_size`) as the one disk `vda` of backup `id` of VM `vm`,
/// started at `started`, and publishes it.
pub fn publish_backup(
    repo: &crate::Repository,
    id: &str,
    vm: &str,
    started: &str,
    src: &crate::source::memory::MemorySource,
    chunk_size: u64,
) {
    use crate::manifest::{DiskEntry, Manifest};
    let b = crate::disk::backup_disk(repo, src, chunk_size, 2, &|_, _| {}).unwrap();
    let index_object = repo.put_index(id, "vda", &b.index).unwrap();
    let domain_xml_object = repo
        .put_domain_xml(id, &format!("<domain><name>{vm}</name></domain>"))
        .unwrap();
    repo.publish(&Manifest {
        format_version: 1,
        id: id.into(),
        vm_name: vm.into(),
        vm_uuid: "u".into(),
        started_at: started.into(),
        ended_at: started.into(),
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
            chunk_size,
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
    })
    .unwrap();
}
