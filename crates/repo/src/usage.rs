//! What a repository's backups take, per VM and in all: the figures `vmbackup usage` shows.
//!
//! Per VM: its backups, the newest one's disk size and data, the bytes only its backups use
//! (what deleting all of them frees once a gc ran), the bytes they share with other VMs'
//! backups, what its backups of the last 30 days added, and its storage in GiB-hours over a
//! period. GiB-hours are counted the way the providers this product is drawn from bill image
//! storage: by the backed-up disks' size, from the backup's start, per hour begun (each
//! backup's hours rounded up), over the hours of the period in which the backup existed.
//! Only backups that still exist are counted (the repository keeps nothing of deleted ones).
//!
//! One pass over the indexes (as a gc's mark phase) and one listing of the chunks with their
//! stored sizes (one stat per chunk in a folder; sizes come with an S3 listing).

use std::collections::HashMap;

use jiff::Timestamp;
use serde::Serialize;

use crate::chunk::{self, Digest};
use crate::{manifest_name, RepoError, Repository, Result};

const GIB: f64 = (1u64 << 30) as f64;
const DAY_SECS: i64 = 86_400;

/// One VM's figures.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct VmUsage {
    pub vm: String,
    pub backups: usize,
    /// The newest backup's id and start (RFC 3339, UTC).
    pub newest: Option<String>,
    pub newest_at: Option<String>,
    /// The newest backup's disks' virtual sizes, together.
    pub newest_disk_bytes: u64,
    /// The data (non-zero chunks) its newest backup read.
    pub newest_logical_bytes: u64,
    /// Stored bytes of the chunks only this VM's backups use.
    pub exclusive_bytes: u64,
    /// Stored bytes of the chunks its backups share with other VMs' backups.
    pub shared_bytes: u64,
    /// What its backups started in the 30 days before the period's end added.
    pub added_30d_bytes: u64,
    /// Disk GiB times hours begun, over the period.
    pub gib_hours: f64,
}

/// The repository's figures.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct RepoUsage {
    pub backups: usize,
    pub vms: usize,
    /// Chunk objects stored, and their bytes as stored (compressed; sealed when encrypted).
    pub chunks: u64,
    pub stored_bytes: u64,
    /// Stored bytes of chunks no backup uses (a gc frees them).
    pub unreferenced_bytes: u64,
    /// The data of every backup, counted per backup.
    pub logical_bytes: u64,
    /// The data of the distinct chunks the backups use.
    pub unique_bytes: u64,
    /// `logical_bytes / unique_bytes`: what deduplication saves.
    pub dedup_ratio: f64,
    /// `unique_bytes / referenced stored bytes`: what compression saves.
    pub compression_ratio: f64,
    /// Free space where a folder repository lives; `None` on an object store.
    pub free_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Usage {
    /// The period of `gib_hours` (RFC 3339, UTC).
    pub from: String,
    pub to: String,
    pub vms: Vec<VmUsage>,
    pub repository: RepoUsage,
    /// Backups whose manifest or index could not be read: not counted (logged).
    pub unreadable: Vec<String>,
}

/// Which VMs' backups use a chunk (indexes into the VM list), and its size.
struct ChunkUse {
    owners: Owners,
    /// The chunk's data (the last chunk of a disk may be short).
    len: u64,
    stored: u64,
}

enum Owners {
    One(u32),
    Many(Vec<u32>),
}

impl Owners {
    fn add(&mut self, vm: u32) {
        match self {
            Owners::One(v) if *v == vm => {}
            Owners::One(v) => *self = Owners::Many(vec![*v, vm]),
            Owners::Many(vs) => {
                if !vs.contains(&vm) {
                    vs.push(vm);
                }
            }
        }
    }
}

/// Hours begun between `start` and `end` (none when `end` is not after `start`).
pub fn hours_begun(start: Timestamp, end: Timestamp) -> i64 {
    let secs = end.as_second() - start.as_second();
    if secs <= 0 {
        0
    } else {
        (secs + 3599) / 3600
    }
}

/// GiB-hours of a backup of `disk_bytes` started at `started`, still there at `now`, over
/// `[from, to)`: billed from its start, per hour begun.
pub fn gib_hours(
    disk_bytes: u64,
    started: Timestamp,
    from: Timestamp,
    to: Timestamp,
    now: Timestamp,
) -> f64 {
    let start = started.max(from);
    let end = to.min(now);
    disk_bytes as f64 / GIB * hours_begun(start, end) as f64
}

impl Repository {
    /// The usage figures, with GiB-hours over `[from, to)` as of `now`. Reads every index
    /// and lists every chunk; takes no lock (a backup or gc meanwhile makes the figures a
    /// little off, never wrong about a backup it counted).
    pub fn usage(&self, from: Timestamp, to: Timestamp, now: Timestamp) -> Result<Usage> {
        let listing = self.scan()?;
        let mut unreadable: Vec<String> =
            listing.unreadable.into_iter().map(|(id, _)| id).collect();
        let mut names: Vec<String> = Vec::new();
        let mut vm_of: HashMap<String, u32> = HashMap::new();
        let mut chunks: HashMap<Digest, ChunkUse> = HashMap::new();
        let mut counted = Vec::new();
        for m in listing.backups {
            let vm = *vm_of.entry(m.vm_name.clone()).or_insert_with(|| {
                names.push(m.vm_name.clone());
                (names.len() - 1) as u32
            });
            let mut indexes = Vec::new();
            let mut readable = true;
            for d in &m.disks {
                match self.get_index(&m.id, d) {
                    Ok(i) => indexes.push(i),
                    // Deleted since the listing.
                    Err(_) if !self.store().exists(&manifest_name(&m.id))? => {
                        readable = false;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(id = %m.id, error = %crate::error_chain(&e), "usage: an index cannot be read; the backup is not counted");
                        unreadable.push(m.id.clone());
                        readable = false;
                        break;
                    }
                }
            }
            if !readable {
                continue;
            }
            for index in &indexes {
                for (i, c) in index.chunks.iter().enumerate() {
                    let Some(d) = c else { continue };
                    let offset = i as u64 * index.chunk_size;
                    let len = index
                        .chunk_size
                        .min(index.virtual_size.saturating_sub(offset));
                    chunks
                        .entry(*d)
                        .and_modify(|u| u.owners.add(vm))
                        .or_insert(ChunkUse {
                            owners: Owners::One(vm),
                            len,
                            stored: 0,
                        });
                }
            }
            counted.push((vm, m));
        }
        // Stored sizes, from one listing of the chunks.
        let (mut total_chunks, mut stored_bytes, mut unreferenced) = (0u64, 0u64, 0u64);
        for (name, size) in self.store().list_sized("chunks/")? {
            let Some(d) = chunk::digest_of_object(&name) else {
                continue;
            };
            total_chunks += 1;
            stored_bytes += size;
            match chunks.get_mut(&d) {
                Some(u) => u.stored = size,
                None => unreferenced += size,
            }
        }
        let mut vms: Vec<VmUsage> = names
            .iter()
            .map(|n| VmUsage {
                vm: n.clone(),
                backups: 0,
                newest: None,
                newest_at: None,
                newest_disk_bytes: 0,
                newest_logical_bytes: 0,
                exclusive_bytes: 0,
                shared_bytes: 0,
                added_30d_bytes: 0,
                gib_hours: 0.0,
            })
            .collect();
        let mut unique_bytes = 0u64;
        let mut referenced_stored = 0u64;
        for u in chunks.values() {
            unique_bytes += u.len;
            referenced_stored += u.stored;
            match &u.owners {
                Owners::One(v) => vms[*v as usize].exclusive_bytes += u.stored,
                Owners::Many(vs) => {
                    for v in vs {
                        vms[*v as usize].shared_bytes += u.stored;
                    }
                }
            }
        }
        let recent = Timestamp::from_second(to.as_second() - 30 * DAY_SECS).unwrap_or(from);
        let mut logical_bytes = 0u64;
        let backups = counted.len();
        for (vm, m) in counted {
            let v = &mut vms[vm as usize];
            let started: Option<Timestamp> = m.started_at.parse().ok();
            let disk_bytes: u64 = m.disks.iter().map(|d| d.virtual_size).sum();
            logical_bytes += m.logical_bytes;
            v.backups += 1;
            // Oldest first: the last one seen is the newest.
            v.newest = Some(m.id.clone());
            v.newest_at = Some(m.started_at.clone());
            v.newest_disk_bytes = disk_bytes;
            v.newest_logical_bytes = m.logical_bytes;
            if let Some(t) = started {
                if t >= recent && t < to {
                    v.added_30d_bytes += m.stored_bytes;
                }
                v.gib_hours += gib_hours(disk_bytes, t, from, to, now);
            }
        }
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        let free_bytes = match self.remote() {
            Some(_) => None,
            None => Some(
                nix::sys::statvfs::statvfs(self.path())
                    .map(|s| s.blocks_available() * s.fragment_size())
                    .map_err(|e| RepoError::Io {
                        what: "free space of",
                        path: self.path().to_path_buf(),
                        source: e.into(),
                    })?,
            ),
        };
        vms.sort_by(|a, b| a.vm.cmp(&b.vm));
        Ok(Usage {
            from: from.to_string(),
            to: to.to_string(),
            repository: RepoUsage {
                backups,
                vms: vms.len(),
                chunks: total_chunks,
                stored_bytes,
                unreferenced_bytes: unreferenced,
                logical_bytes,
                unique_bytes,
                dedup_ratio: ratio(logical_bytes, unique_bytes),
                compression_ratio: ratio(unique_bytes, referenced_stored),
                free_bytes,
            },
            vms,
            unreadable,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::memory::MemorySource;
    use crate::teststores::publish_backup;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn hours_are_counted_from_the_backup_start_per_hour_begun_inside_the_period() {
        let from = t("2027-01-01T00:00:00Z");
        let to = t("2027-02-01T00:00:00Z");
        let now = t("2027-03-01T00:00:00Z");
        // Started at 02:10 on Jan 31: 21 h 50 min to the period's end -> 22 hours begun.
        let g = gib_hours(2 << 30, t("2027-01-31T02:10:00Z"), from, to, now);
        assert_eq!(g, 44.0);
        // Started before the period: from its start; made after it: nothing.
        assert_eq!(
            gib_hours(1 << 30, t("2026-12-15T00:00:00Z"), from, to, now),
            31.0 * 24.0
        );
        assert_eq!(
            gib_hours(1 << 30, t("2027-02-02T00:00:00Z"), from, to, now),
            0.0
        );
        // A period not over yet ends now.
        assert_eq!(
            gib_hours(1 << 30, from, from, to, t("2027-01-01T00:00:01Z")),
            1.0
        );
        assert_eq!(hours_begun(from, from), 0);
        assert_eq!(hours_begun(from, t("2027-01-01T01:00:00Z")), 1);
        assert_eq!(hours_begun(from, t("2027-01-01T01:00:01Z")), 2);
    }

    #[test]
    fn exclusive_and_shared_bytes_add_up_to_what_the_backups_use() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::open(d.path()).unwrap();
        let cs = 4096u64;
        // a: chunks 1 2 3 (twice); b: chunks 3 4, and a zero chunk. Chunk 3 is shared.
        let chunk = |n: u8| {
            let mut v = vec![n; cs as usize];
            v[1] = n.wrapping_mul(7);
            v
        };
        let disk = |ns: &[u8]| MemorySource {
            data: ns
                .iter()
                .flat_map(|&n| {
                    if n == 0 {
                        vec![0; cs as usize]
                    } else {
                        chunk(n)
                    }
                })
                .collect(),
            zero: vec![],
        };
        publish_backup(
            &repo,
            "a-1",
            "a",
            "2027-01-10T00:00:00Z",
            &disk(&[1, 2, 3]),
            cs,
        );
        publish_backup(
            &repo,
            "a-2",
            "a",
            "2027-01-20T00:00:00Z",
            &disk(&[1, 2, 3]),
            cs,
        );
        publish_backup(
            &repo,
            "b-1",
            "b",
            "2027-01-20T00:00:00Z",
            &disk(&[3, 4, 0]),
            cs,
        );
        // A chunk no backup uses any more.
        publish_backup(&repo, "c-1", "c", "2027-01-20T00:00:00Z", &disk(&[9]), cs);
        repo.delete("c-1").unwrap();
        let size_of = |n: u8| {
            let name = crate::chunk::object_name(&repo.namer().digest(&chunk(n)));
            repo.store().get(&name).unwrap().len() as u64
        };
        let u = repo
            .usage(
                t("2027-01-01T00:00:00Z"),
                t("2027-02-01T00:00:00Z"),
                t("2027-02-01T00:00:00Z"),
            )
            .unwrap();
        assert_eq!(u.vms.len(), 2);
        let (a, b) = (&u.vms[0], &u.vms[1]);
        assert_eq!((a.vm.as_str(), a.backups), ("a", 2));
        assert_eq!(a.newest.as_deref(), Some("a-2"));
        assert_eq!(a.newest_disk_bytes, 3 * cs);
        assert_eq!(a.exclusive_bytes, size_of(1) + size_of(2));
        assert_eq!(a.shared_bytes, size_of(3));
        assert_eq!(b.exclusive_bytes, size_of(4));
        assert_eq!(b.shared_bytes, size_of(3));
        let r = &u.repository;
        assert_eq!((r.backups, r.vms, r.chunks), (3, 2, 5));
        assert_eq!(r.unreferenced_bytes, size_of(9));
        assert_eq!(
            r.stored_bytes,
            (1..=4).map(size_of).sum::<u64>() + size_of(9)
        );
        // 8 data chunks in the backups, 4 distinct.
        assert_eq!(r.unique_bytes, 4 * cs);
        assert_eq!(r.dedup_ratio, 2.0);
        assert!(r.free_bytes.is_some_and(|f| f > 0));
        // a-1: 22 days of 3 chunks; a-2 and b-1: 12 days each.
        let gib = cs as f64 * 3.0 / GIB;
        assert!(
            (a.gib_hours - gib * 24.0 * (22.0 + 12.0)).abs() < 1e-9,
            "{}",
            a.gib_hours
        );
        assert!(u.unreadable.is_empty());
    }
}
