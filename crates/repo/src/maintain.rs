//! Image management: delete a backup, verify backups against their digests, and collect the
//! chunks no backup references. Garbage collection excludes running backups, on every host,
//! through the repository locks (`locks.rs`): backups hold shared ones, gc an exclusive one.
//!
//! `delete` (and the prunes made of it) take no lock: they only remove references, which is
//! safe against everything else, and every reader of the repository treats a backup deleted
//! under its feet as gone, not as damage: `list` leaves it out, `verify` says `NotFound`, gc
//! does not count it.

use std::collections::HashSet;
use std::path::Path;

use serde::Serialize;

use super::chunk::Digest;
use super::disk::verify_disk_with;
use super::{error_chain, manifest_name, storage, RepoError, Repository, Result};

pub use crate::locks::{Holder, RepoLock};

fn lock(repo: &Repository, exclusive: bool) -> Result<Option<RepoLock>> {
    crate::locks::Locker::default().acquire(repo.shared_store(), exclusive)
}

/// A lock, or who holds the locks that refused it.
pub type Locked = std::result::Result<RepoLock, Vec<Holder>>;

impl Repository {
    /// Held by every backup while it writes (a shared lock in `locks/`, see `locks.rs`): gc
    /// runs only without them, on any host. `None` while a gc holds the repository.
    /// Empties the set of chunks known to be present: what was known under an earlier
    /// lock may have been collected since.
    pub fn lock_for_backup(&self) -> Result<Option<RepoLock>> {
        self.forget_known();
        lock(self, false)
    }

    /// `lock_for_backup` of VM `vm` (recorded in the lock), saying who holds the repository
    /// when it is refused.
    pub fn try_lock_for_backup(&self, vm: &str) -> Result<Locked> {
        self.forget_known();
        let locker = crate::locks::Locker {
            vm: Some(vm.to_string()),
            ..Default::default()
        };
        locker.try_acquire(self.shared_store(), false)
    }

    /// The repository to itself (no backup writing, on any host); `None` while one does.
    pub fn lock_exclusive(&self) -> Result<Option<RepoLock>> {
        lock(self, true)
    }

    /// Deletes backup `id`: its manifest first (it disappears from lists at once), then the
    /// rest of its objects. Its chunks stay until `gc`. A backup whose manifest cannot be
    /// read can be deleted too.
    pub fn delete(&self, id: &str) -> Result<()> {
        storage::check_name(id)?;
        let manifest = manifest_name(id);
        if !self.store().exists(&manifest)? {
            return Err(RepoError::NotFound(id.to_string()));
        }
        self.store().delete(&manifest)?;
        crate::failpoint::point("prune-deleted-one");
        let rest = self.store().list(&format!("backups/{id}/"))?;
        self.store().delete_many(&rest)
    }

    /// Re-reads every chunk of backup `id` and checks it against its digest; checks that
    /// its manifest, domain XML and indexes are there and intact.
    /// A backup deleted while it was being verified is `RepoError::NotFound`, not damaged.
    pub fn verify(&self, id: &str) -> Result<Verified> {
        self.verify_with(id, &mut |_, _| {})
    }

    /// `verify`, telling `progress` how many of the backup's disk bytes are checked so far,
    /// of how many (`done`, `total`).
    pub fn verify_with(&self, id: &str, progress: &mut dyn FnMut(u64, u64)) -> Result<Verified> {
        let v = self.verify_once(id, progress)?;
        if !v.ok && !self.store().exists(&manifest_name(id))? {
            return Err(RepoError::NotFound(id.to_string()));
        }
        Ok(v)
    }

    fn verify_once(&self, id: &str, progress: &mut dyn FnMut(u64, u64)) -> Result<Verified> {
        let m = match self.load(id) {
            Ok(m) => m,
            Err(e @ RepoError::BadManifest { .. }) => {
                return Ok(Verified {
                    id: id.to_string(),
                    vm: String::new(),
                    ok: false,
                    chunks: 0,
                    damaged: vec![error_chain(&e)],
                })
            }
            Err(e) => return Err(e),
        };
        crate::failpoint::point("verify-loaded");
        let mut damaged = Vec::new();
        if m.domain_xml_object.is_empty() {
            damaged.push("domain XML  is missing".to_string());
        } else {
            // Read whole: in an encrypted repository that checks it was not changed.
            match self.store().get(&m.domain_xml_object) {
                Ok(_) => {}
                Err(RepoError::NotFound(_)) => {
                    damaged.push(format!("domain XML {} is missing", m.domain_xml_object))
                }
                Err(e @ RepoError::Tampered { .. }) => damaged.push(format!("domain XML: {e}")),
                Err(e) => return Err(e),
            }
        }
        for f in Repository::state_files(&m) {
            match self.get_state_file(&m.id, f) {
                Ok(_) => {}
                Err(RepoError::Damaged { problems, .. }) => damaged.extend(problems),
                Err(e) => return Err(e),
            }
        }
        let mut chunks = 0;
        let total: u64 = m.disks.iter().map(|d| d.virtual_size).sum();
        let mut before = 0;
        progress(0, total);
        for d in &m.disks {
            let index = match self.get_index(&m.id, d) {
                Ok(i) => i,
                Err(RepoError::Damaged { problems, .. }) => {
                    damaged.extend(problems);
                    continue;
                }
                Err(e) => return Err(e),
            };
            chunks += index.chunks.iter().flatten().count();
            let bad = verify_disk_with(self, &index, &mut |done| {
                progress((before + done).min(total), total)
            })?;
            for digest in bad {
                damaged.push(format!("{}: chunk {digest}", d.target));
            }
            before += d.virtual_size;
        }
        progress(total, total);
        Ok(Verified {
            id: m.id,
            vm: m.vm_name,
            ok: damaged.is_empty(),
            chunks,
            damaged,
        })
    }

    /// Removes the chunks no published backup references, and what backups that never
    /// published (killed, failed) or were deleted half-way left: temporary files and backup
    /// folders without a manifest. Runs only while no backup holds the repository lock
    /// (`Ok(None)` otherwise: busy), so none of those is being written.
    pub fn gc(&self) -> Result<Option<Collected>> {
        self.try_gc_with(&mut |_, _| {}).map(|r| r.ok())
    }

    /// `gc`, telling `progress` how many of the bytes to remove are removed so far, of how
    /// many (`done`, `total`), once the chunks to remove are known.
    pub fn gc_with(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<Option<Collected>> {
        self.try_gc_with(progress).map(|r| r.ok())
    }

    /// `gc`, saying who holds the repository when it cannot run (`Err`).
    pub fn try_gc(&self) -> Result<std::result::Result<Collected, Vec<Holder>>> {
        self.try_gc_with(&mut |_, _| {})
    }

    /// `try_gc` with `gc_with`'s progress.
    pub fn try_gc_with(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<std::result::Result<Collected, Vec<Holder>>> {
        let lock = match crate::locks::Locker::default().try_acquire(self.shared_store(), true)? {
            Ok(l) => l,
            Err(holders) => return Ok(Err(holders)),
        };
        crate::failpoint::point("gc-locked");
        // Every chunk a backup uses must be known: a backup whose manifest or index cannot
        // be read stops gc, which could otherwise free its chunks.
        let listing = self.scan()?;
        if !listing.unreadable.is_empty() {
            return Err(RepoError::UnreadableManifests {
                ids: listing.unreadable.into_iter().map(|(id, _)| id).collect(),
            });
        }
        // Chunks written by backups that died before their sync never got a name; objects of
        // backups that never published, or whose delete was cut short, have no manifest.
        let leftovers = self.remove_incomplete(&[])?;
        if leftovers > 0 {
            tracing::info!(files = leftovers, "removed what unfinished backups left");
        }
        crate::failpoint::point("gc-listed");
        let plan = self.gc_plan(&listing.backups)?;
        let (garbage, sizes) = (plan.garbage, plan.sizes);
        // In the store's batches (one request each: up to 1000 chunks on S3, one in a folder).
        // The lock is checked again every 1000 chunks or so: a gc that lost it (paused past
        // the stale time, its lock taken over by a backup that may reuse these chunks)
        // deletes nothing more.
        let batch = self.store().delete_batch().clamp(1, 1000);
        let check_every = (1000 / batch).max(1);
        let (mut removed, mut bytes) = (0u64, 0u64);
        let total: u64 = sizes.iter().sum();
        progress(0, total);
        for (i, (names, sizes)) in garbage.chunks(batch).zip(sizes.chunks(batch)).enumerate() {
            if i % check_every == 0 {
                lock.check()?;
            }
            self.store().delete_many(names)?;
            removed += names.len() as u64;
            bytes += sizes.iter().sum::<u64>();
            progress(bytes, total);
            crate::failpoint::point("gc-deleted-some");
        }
        progress(total, total);
        Ok(Ok(Collected {
            removed_chunks: removed,
            removed_bytes: bytes,
            kept_chunks: plan.kept,
        }))
    }

    /// What a gc would remove now, removing nothing and taking no lock. Every chunk a
    /// published backup names is kept; the chunks of a backup still being written count as
    /// removable (a real gc waits for it to publish). A backup whose manifest cannot be read
    /// fails it, as it fails a gc.
    pub fn gc_dry_run(&self) -> Result<Collected> {
        let listing = self.scan()?;
        if !listing.unreadable.is_empty() {
            return Err(RepoError::UnreadableManifests {
                ids: listing.unreadable.into_iter().map(|(id, _)| id).collect(),
            });
        }
        let plan = self.gc_plan(&listing.backups)?;
        Ok(Collected {
            removed_chunks: plan.garbage.len() as u64,
            removed_bytes: plan.sizes.iter().sum(),
            kept_chunks: plan.kept,
        })
    }

    /// The chunks no backup of `backups` uses, with their stored sizes, and how many are used.
    fn gc_plan(&self, backups: &[crate::manifest::Manifest]) -> Result<GcPlan> {
        let mut live: HashSet<Digest> = HashSet::new();
        for m in backups {
            for d in &m.disks {
                let index = match self.get_index(&m.id, d) {
                    Ok(i) => i,
                    // Deleted since the listing (a delete or prune takes no lock): its
                    // chunks need not be kept for it.
                    Err(_) if !self.store().exists(&manifest_name(&m.id))? => break,
                    Err(e) => return Err(e),
                };
                live.extend(index.chunks.iter().flatten().copied());
            }
        }
        // Names are matched as digests: a set of 1,000,000 names would take ~100 MiB more.
        // The sizes are as stored (sealed, in an encrypted repository): from the listing
        // where it has them (S3), else of the chunks to delete only (a folder: one stat each).
        let store = self.store();
        let (mut garbage, mut sizes) = (Vec::new(), Vec::new());
        let mut consider = |name: String, size: Option<u64>| {
            let used = crate::chunk::digest_of_object(&name).is_some_and(|d| live.contains(&d));
            if !used {
                garbage.push(name);
                sizes.push(size);
            }
        };
        if store.listing_has_sizes() {
            for (name, size) in store.list_sized("chunks/")? {
                consider(name, Some(size));
            }
        } else {
            for name in store.list("chunks/")? {
                consider(name, None);
            }
        }
        let sizes: Vec<u64> = sizes
            .into_iter()
            .zip(&garbage)
            .map(|(size, name)| {
                size.unwrap_or_else(|| {
                    std::fs::symlink_metadata(self.path().join(name)).map_or(0, |m| m.len())
                })
            })
            .collect();
        Ok(GcPlan {
            garbage,
            sizes,
            kept: live.len() as u64,
        })
    }
}

/// What a gc removes: chunk names and their stored sizes; and how many chunks stay.
struct GcPlan {
    garbage: Vec<String>,
    sizes: Vec<u64>,
    kept: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Verified {
    pub id: String,
    pub vm: String,
    pub ok: bool,
    pub chunks: usize,
    /// What is damaged or missing, one line each.
    pub damaged: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Collected {
    pub removed_chunks: u64,
    pub removed_bytes: u64,
    pub kept_chunks: u64,
}

/// Whether `path` is a repository (has its config file).
pub fn is_repository(path: &Path) -> bool {
    path.join("config.json").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk;
    use crate::disk::backup_disk;
    use crate::manifest::Manifest;
    use crate::source::memory::MemorySource;

    /// An 8 MiB disk: 2 MiB of `pattern`, then zeros.
    fn disk(pattern: u8) -> MemorySource {
        let mut data = vec![0u8; 8 << 20];
        data[..2 << 20].fill(pattern);
        MemorySource {
            data,
            zero: std::iter::once(2 << 20..8 << 20).collect(),
        }
    }

    fn back_up(repo: &Repository, id: &str, src: &MemorySource) {
        let started = format!("2026-01-01T00:00:0{}Z", id.len());
        crate::teststores::publish_backup(repo, id, "vm", &started, src, 1 << 20);
    }

    #[test]
    fn state_files_are_checked_by_verify_and_restore_and_go_with_their_backup() {
        use crate::manifest::{Owner, StateFile, VmState};
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::open(&d.path().join("repo")).unwrap();
        let domain_xml_object = repo.put_domain_xml("s1", "<domain/>").unwrap();
        let content = b"uefi variables".to_vec();
        let object = repo.put_state_file("s1", "nvram", &content).unwrap();
        let f = StateFile {
            path: "/var/lib/libvirt/qemu/nvram/vm_VARS.fd".into(),
            size: content.len() as u64,
            sha256: crate::digest::sha256_hex(&content),
            object: object.clone(),
            owner: Owner {
                uid: 0,
                gid: 0,
                user: Some("root".into()),
                group: None,
                mode: 0o600,
            },
        };
        let m = Manifest {
            format_version: 1,
            id: "s1".into(),
            vm_name: "vm".into(),
            vm_uuid: "u".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            ended_at: String::new(),
            consistency: "application".into(),
            consistency_reason: None,
            freeze_ms: None,
            vcpus: 1,
            memory_bytes: 1,
            disks: vec![],
            nics: vec![],
            domain_xml_object,
            schedule: None,
            scheduled_for: None,
            tags: Vec::new(),
            stored_bytes: 0,
            logical_bytes: 0,
            vm_state: Some(VmState {
                read_at: "2026-01-01T00:00:00Z".into(),
                nvram: Some(f.clone()),
                tpm: None,
            }),
        };
        repo.publish(&m).unwrap();
        let back = repo.load("s1").unwrap();
        assert_eq!(back, m, "the state survives the manifest's round trip");
        assert!(repo.verify("s1").unwrap().ok);
        assert_eq!(repo.get_state_file("s1", &f).unwrap(), content);
        // Damaged: verify names it and a restore would refuse it; missing: `problems` too.
        let path = d.path().join("repo").join(&object);
        std::fs::write(&path, b"uefi variablez").unwrap();
        let v = repo.verify("s1").unwrap();
        assert!(!v.ok && v.damaged[0].contains("vm_VARS.fd"), "{v:?}");
        assert!(matches!(
            repo.get_state_file("s1", &f),
            Err(RepoError::Damaged { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(repo.problems(&m).unwrap().len(), 1);
        // A manifest without `vm_state` (older backups) still reads.
        let mut old = serde_json::to_value(&m).unwrap();
        old.as_object_mut().unwrap().remove("vm_state");
        let old: Manifest = serde_json::from_value(old).unwrap();
        assert_eq!(old.vm_state, None);
        assert!(Repository::state_files(&old).is_empty());
        // Deleting the backup removes its state objects and its folder.
        repo.put_state_file("s1", "tpm+tpm2+tpm2-00.permall", b"t")
            .unwrap();
        repo.delete("s1").unwrap();
        assert!(!d.path().join("repo/backups/s1").exists());
    }

    #[test]
    fn verify_names_the_damaged_backup_delete_and_gc_free_only_unreferenced_chunks() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::open(&d.path().join("repo")).unwrap();
        let a = disk(0x11);
        let b = disk(0x22);
        back_up(&repo, "a1", &a);
        back_up(&repo, "b1", &b);
        assert!(repo.verify("a1").unwrap().ok);
        assert_eq!(repo.verify("a1").unwrap().chunks, 2);

        // Damage b's chunk: only b1 is named.
        let chunks = repo.store().list("chunks/").unwrap();
        assert_eq!(chunks.len(), 2);
        let data =
            crate::disk::DiskIndex::decode(&repo.store().get("backups/b1/vda.index").unwrap())
                .unwrap();
        let name = chunk::object_name(data.chunks[0].as_ref().unwrap());
        let path = d.path().join("repo").join(&name);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert!(repo.verify("a1").unwrap().ok);
        let v = repo.verify("b1").unwrap();
        assert!(!v.ok);
        assert_eq!(v.damaged.len(), 1);

        // gc keeps what is referenced; after deleting b1, its chunk goes.
        assert_eq!(repo.gc().unwrap().unwrap().removed_chunks, 0);
        repo.delete("b1").unwrap();
        assert!(matches!(repo.load("b1"), Err(RepoError::NotFound(_))));
        assert!(repo.store().list("backups/b1/").unwrap().is_empty());
        let c = repo.gc().unwrap().unwrap();
        assert_eq!((c.removed_chunks, c.kept_chunks), (1, 1));
        assert!(repo.verify("a1").unwrap().ok);

        // gc refuses while a backup holds the lock.
        let held = repo.lock_for_backup().unwrap().unwrap();
        assert!(repo.gc().unwrap().is_none());
        drop(held);
        assert!(repo.gc().unwrap().is_some());
        assert!(matches!(repo.delete("nope"), Err(RepoError::NotFound(_))));
    }

    /// What a backup killed before its manifest leaves (its domain XML and index, a chunk
    /// written but never synced, or only an empty folder) is removed by gc; published
    /// backups stay whole.
    #[test]
    fn gc_removes_the_leftovers_of_backups_that_were_never_published() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let repo = Repository::open(&root).unwrap();
        back_up(&repo, "a1", &disk(0x11));
        let half = backup_disk(&repo, &disk(0x33), 1 << 20, 2, &|_, _| {}).unwrap();
        repo.put_index("half", "vda", &half.index).unwrap();
        repo.put_domain_xml("half", "<domain/>").unwrap();
        std::fs::create_dir(root.join("backups/empty")).unwrap();
        // A temporary of a process that is gone (pid 0 is never a user process's).
        std::fs::create_dir(root.join("backups/tmp-only")).unwrap();
        std::fs::write(root.join("backups/tmp-only/.tmp-0-x"), b"x").unwrap();
        let c = repo.gc().unwrap().unwrap();
        assert_eq!(c.removed_chunks, 1, "the unpublished backup's chunk");
        let mut left: Vec<String> = std::fs::read_dir(root.join("backups"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["a1"]);
        assert!(repo.verify("a1").unwrap().ok);
    }

    #[test]
    fn gc_removes_what_unpublished_and_half_deleted_backups_left() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::open(&d.path().join("repo")).unwrap();
        back_up(&repo, "a1", &disk(0x11));
        back_up(&repo, "b1", &disk(0x22));
        // A delete cut short after the manifest; a backup killed before its publish.
        repo.store().delete(&manifest_name("b1")).unwrap();
        let b = backup_disk(&repo, &disk(0x33), 1 << 20, 2, &|_, _| {}).unwrap();
        repo.put_index("c1", "vda", &b.index).unwrap();
        assert!(d.path().join("repo/backups/b1").is_dir());
        assert!(d.path().join("repo/backups/c1").is_dir());
        let c = repo.gc().unwrap().unwrap();
        assert_eq!((c.removed_chunks, c.kept_chunks), (2, 1));
        assert!(!d.path().join("repo/backups/b1").exists());
        assert!(!d.path().join("repo/backups/c1").exists());
        assert!(repo.verify("a1").unwrap().ok);
        // A backup that is not there is NotFound for verify.
        assert!(matches!(repo.verify("b1"), Err(RepoError::NotFound(_))));
    }

    /// A disk of `n` 64 KiB chunks, each of its own content.
    fn chunks(n: usize) -> MemorySource {
        let mut data = vec![0u8; n << 16];
        for (i, c) in data.chunks_mut(1 << 16).enumerate() {
            c.fill(i as u8 + 1);
            c[..8].copy_from_slice(&(i as u64).to_le_bytes());
        }
        MemorySource { data, zero: vec![] }
    }

    fn publish_disk(repo: &Repository, id: &str, src: &MemorySource, started: &str) {
        crate::teststores::publish_backup(repo, id, "vm", started, src, 1 << 16);
    }

    /// The bytes gc reports freed are what the deleted chunks took in the store: their files'
    /// sizes, sealed ones in an encrypted repository; the stored bytes of the backup deleted.
    #[test]
    fn gc_reports_the_bytes_the_deleted_chunks_took_plain_and_encrypted() {
        for encrypted in [false, true] {
            let d = tempfile::tempdir().unwrap();
            let root = d.path().join("repo");
            let repo = if encrypted {
                let key = d.path().join("key");
                let o = crate::InitOptions {
                    encrypt: true,
                    key_file: Some(key.clone()),
                    passphrase: None,
                };
                Repository::init(&root, &o).unwrap();
                Repository::open_unlocked(&root, &crate::Unlock::key_file(&key)).unwrap()
            } else {
                Repository::open(&root).unwrap()
            };
            publish_disk(&repo, "keep", &chunks(3), "2026-01-01T00:00:00Z");
            // Its first 3 chunks are keep's; 5 are its own.
            publish_disk(&repo, "drop", &chunks(8), "2026-01-02T00:00:00Z");
            let stored = repo.load("drop").unwrap().stored_bytes;
            let before: Vec<(String, u64)> = repo
                .store()
                .list("chunks/")
                .unwrap()
                .into_iter()
                .map(|n| {
                    let len = std::fs::metadata(root.join(&n)).unwrap().len();
                    (n, len)
                })
                .collect();
            repo.delete("drop").unwrap();
            let c = repo.gc().unwrap().unwrap();
            let after = repo.store().list("chunks/").unwrap();
            let freed: u64 = before
                .iter()
                .filter(|(n, _)| !after.contains(n))
                .map(|(_, len)| len)
                .sum();
            assert_eq!((c.removed_chunks, c.kept_chunks), (5, 3));
            assert!(freed > 0);
            assert_eq!(c.removed_bytes, freed, "encrypted: {encrypted}");
            // It stored its 5 own chunks (keep's 3 were reused).
            assert_eq!(c.removed_bytes, stored, "encrypted: {encrypted}");
            assert!(repo.verify("keep").unwrap().ok);
        }
    }

    /// gc deletes in the store's batches, one request each, and stops at the first that fails.
    #[test]
    fn gc_deletes_in_the_stores_batches() {
        use crate::teststores::TestStore;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        std::fs::create_dir(&root).unwrap();
        let store = TestStore::batched(&root, 3);
        let counts = store.counts.clone();
        let repo = Repository::open_with(&root, Box::new(store)).unwrap();
        publish_disk(&repo, "drop", &chunks(8), "2026-01-01T00:00:00Z");
        repo.delete("drop").unwrap();
        counts.reset();
        let c = repo.gc().unwrap().unwrap();
        assert_eq!(c.removed_chunks, 8);
        assert!(repo.store().list("chunks/").unwrap().is_empty());
        // 3 + 3 + 2 chunks, and the lock's own object when it is released.
        assert_eq!(
            counts.delete.load(std::sync::atomic::Ordering::SeqCst),
            3 + 1
        );
    }

    /// The store requests of a whole-disk backup of an unchanged `n`-chunk disk, made by a new
    /// process (nothing checked yet) under its backup lock; `seed`: with the known set.
    fn requests_of_a_second_backup(n: usize, seed: bool) -> usize {
        use crate::teststores::TestStore;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let src = chunks(n);
        publish_disk(
            &Repository::open(&root).unwrap(),
            "first",
            &src,
            "2026-01-01T00:00:00Z",
        );
        let store = TestStore::new(&root);
        let counts = store.counts.clone();
        let repo = Repository::open_with(&root, Box::new(store)).unwrap();
        let _lock = repo.lock_for_backup().unwrap().unwrap();
        counts.reset();
        let mut previous = repo.list().unwrap();
        previous.reverse();
        if seed {
            assert_eq!(repo.seed_known_from(&previous, "vda"), n);
        }
        let b = backup_disk(&repo, &src, 1 << 16, 2, &|_, _| {}).unwrap();
        assert_eq!((b.reused_chunks, b.stored_bytes_new), (n as u64, 0));
        counts.total()
    }

    #[test]
    fn a_backup_of_an_unchanged_disk_asks_the_store_per_manifest_not_per_chunk() {
        let (small, large) = (
            requests_of_a_second_backup(8, true),
            requests_of_a_second_backup(64, true),
        );
        assert_eq!(small, large, "independent of the number of chunks");
        assert!(small <= 4, "list, the manifest, the index: {small}");
        // Without the known set: a lookup and a read-back per chunk.
        assert!(requests_of_a_second_backup(64, false) >= 2 * 64);
    }

    /// The known set holds only under one backup lock: taking the next one empties it, so a
    /// chunk collected in between is looked up (and written again), never trusted blindly.
    #[test]
    fn the_known_set_is_emptied_by_the_next_backup_lock() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::open(&d.path().join("repo")).unwrap();
        let src = chunks(4);
        publish_disk(&repo, "first", &src, "2026-01-01T00:00:00Z");
        let lock = repo.lock_for_backup().unwrap().unwrap();
        let previous = repo.list().unwrap();
        repo.seed_known_from(&previous, "vda");
        drop(lock);
        repo.delete("first").unwrap();
        assert_eq!(repo.gc().unwrap().unwrap().removed_chunks, 4);
        let _lock = repo.lock_for_backup().unwrap().unwrap();
        let b = backup_disk(&repo, &src, 1 << 16, 2, &|_, _| {}).unwrap();
        assert_eq!(
            (b.reused_chunks, b.data_chunks),
            (0, 4),
            "all written again"
        );
    }
}
