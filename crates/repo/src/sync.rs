//! Copying backups between repositories (`vmbackup sync --from A --to B`): a fast local
//! repository on the host, copied nightly to a shared one, say.
//!
//! Each backup the target lacks is copied as a backup is written: its chunks first (read from
//! the source and checked against their digests on the way, written only when the target
//! lacks them), made durable; then its indexes, domain XML and state files; its manifest
//! last. An interrupted sync leaves nothing listed half-copied (what it wrote without a
//! manifest is removed by the next sync of that backup, or by `gc`), and running it again
//! copies only what is still missing. Both repositories are held with the shared lock a
//! backup takes, so neither's gc runs meanwhile. A backup already in the target (same id) is
//! left as it is: ids are unique (VM name and start time).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::chunk::{self, Digest};
use super::manifest::Manifest;
use super::{RepoError, Repository, Result};

/// Which backups of the source to copy.
#[derive(Debug, Default, Clone)]
pub struct SyncFilter {
    /// Only this VM's backups.
    pub vm: Option<String>,
    /// Only backups started at or after this instant.
    pub since: Option<jiff::Timestamp>,
}

impl SyncFilter {
    fn wants(&self, m: &Manifest) -> bool {
        if self.vm.as_deref().is_some_and(|vm| vm != m.vm_name) {
            return false;
        }
        match self.since {
            None => true,
            Some(since) => m
                .started_at
                .parse::<jiff::Timestamp>()
                .is_ok_and(|t| t >= since),
        }
    }
}

/// What a sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Synced {
    /// The backups copied, oldest first.
    pub copied: Vec<String>,
    /// The backups the filter chose that the target had already.
    pub present: Vec<String>,
    /// Chunks written to the target, and their stored bytes.
    pub chunks_copied: u64,
    pub bytes_copied: u64,
    /// Chunks the copied backups use that the target had already.
    pub chunks_present: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("a gc runs on the {0} repository; try again when it is done")]
    Busy(&'static str),
    #[error("copying backup {id}")]
    Copy {
        id: String,
        #[source]
        source: RepoError,
    },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// Copies the backups of `from` that `filter` chooses and `to` lacks; see the module's
/// comment. `progress` is told of each backup as it starts being copied.
pub fn sync(
    from: &Repository,
    to: &Repository,
    filter: &SyncFilter,
    progress: &dyn Fn(&Manifest),
) -> Result<Synced, SyncError> {
    let _from_lock = from.lock_for_backup()?.ok_or(SyncError::Busy("source"))?;
    let to_lock = to.lock_for_backup()?.ok_or(SyncError::Busy("target"))?;
    let source = from.scan()?;
    for (id, why) in &source.unreadable {
        tracing::warn!(backup = %id, "not copied: its manifest cannot be read: {why}");
    }
    let target: HashSet<String> = to.scan()?.backups.into_iter().map(|m| m.id).collect();
    // One listing of the target's chunks instead of a question per chunk; kept up to date
    // with what this sync writes.
    let mut have = to.stored_chunks()?;
    let mut out = Synced::default();
    for m in source.backups.iter().filter(|m| filter.wants(m)) {
        if target.contains(&m.id) {
            out.present.push(m.id.clone());
            continue;
        }
        progress(m);
        copy_backup(from, to, m, &to_lock, &mut have, &mut out).map_err(|source| {
            to.forget_unsynced();
            SyncError::Copy {
                id: m.id.clone(),
                source,
            }
        })?;
        out.copied.push(m.id.clone());
    }
    Ok(out)
}

fn copy_backup(
    from: &Repository,
    to: &Repository,
    m: &Manifest,
    lock: &crate::locks::RepoLock,
    have: &mut HashSet<Digest>,
    out: &mut Synced,
) -> Result<()> {
    // What an earlier, interrupted sync of it left (no manifest: never listed).
    to.discard_unpublished(&m.id)?;
    from.check_complete(m)?;
    let source_chunks = from.chunks();
    let target_chunks = to.chunks();
    // The target may name chunks otherwise (another key): then every chunk is read and the
    // indexes are written with the target's names.
    let same_names = from.chunk_naming() == to.chunk_naming();
    let mut renamed: HashMap<Digest, Digest> = HashMap::new();
    let mut indexes = Vec::with_capacity(m.disks.len());
    for d in &m.disks {
        let mut index = from.get_index(&m.id, d)?;
        for slot in index.chunks.iter_mut().flatten() {
            if same_names && have.contains(slot) {
                out.chunks_present += 1;
                continue;
            }
            if let Some(new) = renamed.get(slot) {
                *slot = *new;
                continue;
            }
            let data = source_chunks.get(slot)?;
            let name = to.chunk_digest(&data);
            if !have.contains(&name) {
                let put = target_chunks.put_with_digest(&data, name)?;
                out.chunks_copied += 1;
                out.bytes_copied += put.stored_bytes;
                have.insert(name);
            } else {
                out.chunks_present += 1;
            }
            if !same_names {
                renamed.insert(*slot, name);
                *slot = name;
            }
        }
        indexes.push(index);
    }
    crate::failpoint::point("sync-chunks-written");
    to.store().sync()?;
    for (d, index) in m.disks.iter().zip(&indexes) {
        to.store().put_new(&d.index_object, &index.encode())?;
    }
    let xml = from.store().get(&m.domain_xml_object)?;
    to.store().put_new(&m.domain_xml_object, &xml)?;
    for f in Repository::state_files(m) {
        let bytes = from.get_state_file(&m.id, f)?;
        to.store().put_new(&f.object, &bytes)?;
    }
    crate::failpoint::point("sync-before-manifest");
    // Still held (not gone stale while paused): a gc may have run otherwise.
    lock.check()?;
    to.publish(m)?;
    tracing::info!(backup = %m.id, "copied");
    Ok(())
}

impl Repository {
    /// Which function names this repository's chunks: two repositories with the same one
    /// (both unencrypted, or encrypted with the same key) share chunk names. Not secret: a
    /// keyed name of a constant.
    pub fn chunk_naming(&self) -> String {
        match self.namer() {
            chunk::Namer::Sha256 => "sha256".into(),
            chunk::Namer::Keyed(_) => format!(
                "hmac-sha256:{}",
                chunk::hex(&self.chunk_digest(b"vmbackup: the key that names chunks"))
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::memory::MemorySource;

    fn back_up(repo: &Repository, id: &str, vm: &str, started: &str, pattern: u8) {
        let mut data = vec![0u8; 4 << 20];
        data[..1 << 20].fill(pattern);
        data[1 << 20..2 << 20].fill(7);
        let src = MemorySource {
            data,
            zero: std::iter::once(2 << 20..4 << 20).collect(),
        };
        crate::teststores::publish_backup(repo, id, vm, started, &src, 1 << 20);
    }

    fn disk_bytes(repo: &Repository, id: &str) -> Vec<u8> {
        let m = repo.load(id).unwrap();
        let index = repo.get_index(id, &m.disks[0]).unwrap();
        let mut out = Vec::new();
        for c in &index.chunks {
            match c {
                Some(d) => out.extend(repo.chunks().get(d).unwrap()),
                None => out.extend(std::iter::repeat_n(0u8, 1 << 20)),
            }
        }
        out
    }

    #[test]
    fn copies_what_the_target_lacks_chunks_once_and_again_nothing() {
        let d = tempfile::tempdir().unwrap();
        let a = Repository::open(&d.path().join("a")).unwrap();
        let b = Repository::open(&d.path().join("b")).unwrap();
        back_up(&a, "web-1", "web", "2026-11-01T00:00:00Z", 1);
        back_up(&a, "web-2", "web", "2026-11-02T00:00:00Z", 2);
        back_up(&a, "db-1", "db", "2026-11-02T00:00:00Z", 3);
        let none = |_: &Manifest| {};

        // One VM since a time: only web-2; its two chunks are copied.
        let f = SyncFilter {
            vm: Some("web".into()),
            since: Some("2026-11-01T12:00:00Z".parse().unwrap()),
        };
        let s = sync(&a, &b, &f, &none).unwrap();
        assert_eq!(s.copied, vec!["web-2"]);
        assert_eq!((s.chunks_copied, s.chunks_present), (2, 0));
        assert_eq!(disk_bytes(&b, "web-2"), disk_bytes(&a, "web-2"));
        assert_eq!(b.verify("web-2").unwrap().damaged, Vec::<String>::new());
        assert_eq!(
            b.get_domain_xml("web-2").unwrap(),
            a.get_domain_xml("web-2").unwrap()
        );

        // Everything: the other two; the chunk of 7s is there already.
        let s = sync(&a, &b, &SyncFilter::default(), &none).unwrap();
        assert_eq!(s.copied, vec!["web-1", "db-1"]);
        assert_eq!(s.present, vec!["web-2"]);
        assert_eq!((s.chunks_copied, s.chunks_present), (2, 2));
        let ids: Vec<String> = b.list().unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(ids, vec!["web-1", "db-1", "web-2"]);
        assert_eq!(b.list().unwrap(), a.list().unwrap());

        // Again: nothing to do.
        let s = sync(&a, &b, &SyncFilter::default(), &none).unwrap();
        assert!(s.copied.is_empty() && s.chunks_copied == 0, "{s:?}");
        assert_eq!(s.present.len(), 3);
    }

    fn encrypted(dir: &std::path::Path, name: &str) -> Repository {
        let repo = dir.join(name);
        let key = dir.join(format!("{name}.key"));
        Repository::init(
            &repo,
            &crate::InitOptions {
                encrypt: true,
                key_file: Some(key.clone()),
                passphrase: None,
            },
        )
        .unwrap();
        Repository::open_unlocked(&repo, &crate::crypt::Unlock::key_file(&key)).unwrap()
    }

    /// Between repositories that name chunks otherwise (another key, or none), every chunk is
    /// read, named the target's way, and the indexes written with those names.
    #[test]
    fn copies_between_keys_rename_chunks_and_restore_the_same_bytes() {
        let d = tempfile::tempdir().unwrap();
        let plain = Repository::open(&d.path().join("plain")).unwrap();
        let k1 = encrypted(d.path(), "k1");
        let k2 = encrypted(d.path(), "k2");
        assert_ne!(k1.chunk_naming(), k2.chunk_naming());
        assert_ne!(k1.chunk_naming(), plain.chunk_naming());
        back_up(&plain, "web-1", "web", "2026-11-01T00:00:00Z", 1);
        back_up(&plain, "web-2", "web", "2026-11-02T00:00:00Z", 2);
        let want = disk_bytes(&plain, "web-1");
        let all = SyncFilter::default();
        let s = sync(&plain, &k1, &all, &|_| {}).unwrap();
        assert_eq!(s.copied.len(), 2);
        // The chunk of 7s both share is written once.
        assert_eq!((s.chunks_copied, s.chunks_present), (3, 1));
        let s = sync(&k1, &k2, &all, &|_| {}).unwrap();
        assert_eq!((s.copied.len(), s.chunks_copied), (2, 3));
        let back = Repository::open(&d.path().join("back")).unwrap();
        sync(&k2, &back, &all, &|_| {}).unwrap();
        for r in [&k1, &k2, &back] {
            assert_eq!(disk_bytes(r, "web-1"), want);
            assert!(r.verify("web-2").unwrap().ok);
        }
        // Back unencrypted, the chunks have their plain names again.
        let idx = |r: &Repository| {
            let m = r.load("web-1").unwrap();
            r.get_index("web-1", &m.disks[0]).unwrap().chunks
        };
        assert_eq!(idx(&back), idx(&plain));
        assert_ne!(idx(&k1), idx(&plain));
        assert_ne!(idx(&k1), idx(&k2));
    }

    #[test]
    fn an_interrupted_copy_is_never_listed_and_the_next_sync_finishes_it() {
        let d = tempfile::tempdir().unwrap();
        let a = Repository::open(&d.path().join("a")).unwrap();
        let b = Repository::open(&d.path().join("b")).unwrap();
        back_up(&a, "web-1", "web", "2026-11-01T00:00:00Z", 1);
        // What a sync killed before the manifest leaves: the backup's other objects.
        let m = a.load("web-1").unwrap();
        let xml = a.store().get(&m.domain_xml_object).unwrap();
        b.store().put_new(&m.domain_xml_object, &xml).unwrap();
        b.store()
            .put_new(&m.disks[0].index_object, b"half")
            .unwrap();
        assert!(b.list().unwrap().is_empty());
        let s = sync(&a, &b, &SyncFilter::default(), &|_| {}).unwrap();
        assert_eq!(s.copied, vec!["web-1"]);
        assert!(b.verify("web-1").unwrap().ok);
    }

    #[test]
    fn a_damaged_source_chunk_stops_the_copy_of_its_backup_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let a = Repository::open(&d.path().join("a")).unwrap();
        let b = Repository::open(&d.path().join("b")).unwrap();
        back_up(&a, "web-1", "web", "2026-11-01T00:00:00Z", 1);
        let m = a.load("web-1").unwrap();
        let index = a.get_index("web-1", &m.disks[0]).unwrap();
        let first = index.chunks[0].unwrap();
        let path = d.path().join("a").join(chunk::object_name(&first));
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let e = sync(&a, &b, &SyncFilter::default(), &|_| {}).unwrap_err();
        let text = crate::error_chain(&e);
        assert!(
            text.contains("web-1") && text.contains(&chunk::hex(&first)),
            "{text}"
        );
        assert!(b.list().unwrap().is_empty());
    }
}
