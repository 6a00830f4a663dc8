//! What a backup must read of a disk: everything, or nothing but a check, because the disk is
//! provably the one an earlier backup read.
//!
//! Today the only proof is the image file of a shut-off VM: its identity (device, inode),
//! size, and both change times (mtime, and ctime, which no write or `touch` can set back) equal
//! to what the previous backup of the disk recorded. Then the previous backup's index stands
//! for this one, after a few of its chunks, chosen at random, are read again and compared with
//! their recorded digests. Whenever there is any doubt, everything is read, and the reason is
//! recorded: the first backup, `--full`, the chain's last full read older than `full_every`, the
//! disk's source, size or chunk size changed, no recorded file state, a changed file, or a
//! failed check in an earlier run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;

use crate::image::{ChunkKind, ImageError, ImageReader};
use crate::repository::chunk;
use crate::repository::disk::DiskIndex;
use crate::repository::manifest::{FileState, Manifest};
use crate::vm_ref::VmRef;

/// Where a request to read a disk whole next time is left (a spot check of unchanged chunks
/// failed, the disk was restored): `STATE_DIR/full-read/<vm stem>.<target>`, holding the reason.
pub fn full_read_marker(state_dir: &Path, vm: &VmRef, target: &str) -> PathBuf {
    state_dir
        .join("full-read")
        .join(format!("{}.{target}", vm.stem()))
}

/// Asks the next backup of `vm` to read disk `target` whole, because of `why`.
pub fn request_full_read(
    state_dir: &Path,
    vm: &VmRef,
    target: &str,
    why: &str,
) -> std::io::Result<()> {
    let marker = full_read_marker(state_dir, vm, target);
    if let Some(dir) = marker.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&marker, why)
}

/// How many unchanged chunks are read again and compared with their recorded digests.
pub const SPOT_CHECKS: usize = 3;

/// A disk as the backup finds it now.
#[derive(Debug, Clone)]
pub struct DiskNow<'a> {
    pub target: &'a str,
    pub image: &'a str,
    pub virtual_size: u64,
    pub chunk_size: u64,
    /// The image file's state, when the VM is shut off (a running VM's image changes).
    pub file: Option<FileState>,
}

/// Why everything is read, or what stands for the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Full {
        reason: String,
    },
    /// The disk is unchanged since backup `based_on`.
    Unchanged {
        based_on: String,
        index_object: String,
        logical_bytes: u64,
        full_at: String,
    },
}

/// What the backup asks for.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// `--full`.
    pub full: bool,
    pub full_every: Duration,
    /// Why an earlier run asked for a full read, if it did.
    pub forced: Option<&'a str>,
    pub now: Timestamp,
}

/// Decides how to read disk `now`, given the VM's earlier backups, newest first.
pub fn plan(previous: &[Manifest], now: &DiskNow, rules: Rules) -> Plan {
    let full = |reason: String| Plan::Full { reason };
    if rules.full {
        return full("--full".into());
    }
    if let Some(why) = rules.forced {
        return full(format!("an earlier run asked for it: {why}"));
    }
    let Some((m, d)) = previous.iter().find_map(|m| {
        m.disks
            .iter()
            .find(|d| d.target == now.target)
            .map(|d| (m, d))
    }) else {
        return full("the first backup of this disk".into());
    };
    if d.source != now.image || d.virtual_size != now.virtual_size || d.chunk_size != now.chunk_size
    {
        return full(format!(
            "the disk's source, size or chunk size changed since backup {}",
            m.id
        ));
    }
    let Some(now_file) = now.file else {
        return full(
            "the VM runs: only a shut-off VM's unchanged image is proven unchanged".into(),
        );
    };
    let Some(read) = &d.read else {
        return full(format!("backup {} recorded no state of the image", m.id));
    };
    let Some(then_file) = read.file else {
        return full(format!("backup {} recorded no state of the image", m.id));
    };
    if then_file != now_file {
        return full(format!("the image changed since backup {}", m.id));
    }
    let full_at = read.full_at.parse::<Timestamp>().ok();
    let age_ok = full_at.is_some_and(|t| {
        rules.now.as_second().saturating_sub(t.as_second()) <= rules.full_every.as_secs() as i64
    });
    if !age_ok {
        return full(format!(
            "the chain's last full read ({}) is older than full_every_days ({})",
            read.full_at,
            rules.full_every.as_secs() / 86_400
        ));
    }
    Plan::Unchanged {
        based_on: m.id.clone(),
        index_object: d.index_object.clone(),
        logical_bytes: d.logical_bytes,
        full_at: read.full_at.clone(),
    }
}

/// A chunk whose content is not what the index recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub chunk: u64,
}

/// Reads `picks` chunks of `reader` again and compares them with `index`; returns the bytes
/// read and the first chunk that differs.
pub fn spot_check(
    reader: &ImageReader,
    index: &DiskIndex,
    picks: &[u64],
) -> Result<(u64, Option<Mismatch>), ImageError> {
    let mut buf = Vec::new();
    let mut read = 0;
    for &i in picks {
        let kind = reader.read_chunk(i, index.chunk_size, &mut buf)?;
        read += buf.len() as u64;
        let zero = kind == ChunkKind::Zero || buf.iter().all(|&b| b == 0);
        let same = match index.chunks.get(i as usize) {
            Some(None) => zero,
            Some(Some(d)) => !zero && chunk::digest(&buf) == *d,
            None => false,
        };
        if !same {
            return Ok((read, Some(Mismatch { chunk: i })));
        }
    }
    Ok((read, None))
}

/// `n` chunk indexes out of `count`, chosen at random (data chunks first, so that the check
/// reads something), without repeats.
pub fn pick(index: &DiskIndex, n: usize) -> Vec<u64> {
    let mut seed = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed));
    let mut x = u64::from_le_bytes(seed) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let data: Vec<u64> = (0..index.chunks.len() as u64)
        .filter(|&i| index.chunks[i as usize].is_some())
        .collect();
    let pool: Vec<u64> = if data.is_empty() {
        (0..index.chunks.len() as u64).collect()
    } else {
        data
    };
    let mut out = Vec::new();
    while out.len() < n.min(pool.len()) {
        let c = pool[(next() % pool.len() as u64) as usize];
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::manifest::{DiskEntry, DiskRead};

    const DAY: u64 = 86_400;

    fn file(ctime: i64) -> FileState {
        FileState {
            dev: 1,
            inode: 2,
            size: 3,
            mtime_ns: 4,
            ctime_ns: ctime,
        }
    }

    fn manifest(id: &str, full_at: &str, state: Option<FileState>) -> Manifest {
        Manifest {
            format_version: 1,
            id: id.into(),
            vm_name: "web".into(),
            vm_uuid: String::new(),
            started_at: full_at.into(),
            ended_at: full_at.into(),
            consistency: "application".into(),
            consistency_reason: None,
            freeze_ms: None,
            vcpus: 1,
            memory_bytes: 0,
            disks: vec![DiskEntry {
                target: "vda".into(),
                format: "raw".into(),
                virtual_size: 8 << 20,
                allocated_size: 0,
                source: "/v/web.raw".into(),
                chunk_size: 4 << 20,
                index_object: format!("backups/{id}/vda.index"),
                logical_bytes: 5,
                stored_bytes: 5,
                read: Some(DiskRead {
                    mode: "full".into(),
                    based_on: None,
                    full_reason: Some("the first backup of this disk".into()),
                    bytes_read: 5,
                    full_at: full_at.into(),
                    file: state,
                    bitmap: None,
                }),
            }],
            nics: vec![],
            domain_xml_object: String::new(),
            schedule: None,
            scheduled_for: None,
            stored_bytes: 5,
            logical_bytes: 5,
        }
    }

    fn now(state: Option<FileState>) -> DiskNow<'static> {
        DiskNow {
            target: "vda",
            image: "/v/web.raw",
            virtual_size: 8 << 20,
            chunk_size: 4 << 20,
            file: state,
        }
    }

    fn rules(full: bool, forced: Option<&str>) -> Rules<'_> {
        Rules {
            full,
            full_every: Duration::from_secs(30 * DAY),
            forced,
            now: "2027-01-10T00:00:00Z".parse().unwrap(),
        }
    }

    fn reason(p: Plan) -> String {
        match p {
            Plan::Full { reason } => reason,
            p => panic!("not a full read: {p:?}"),
        }
    }

    #[test]
    fn an_unchanged_shut_off_image_reuses_the_newest_backup() {
        let prev = [manifest("b2", "2027-01-05T00:00:00Z", Some(file(9)))];
        let p = plan(&prev, &now(Some(file(9))), rules(false, None));
        assert!(
            matches!(&p, Plan::Unchanged { based_on, .. } if based_on == "b2"),
            "{p:?}"
        );
    }

    #[test]
    fn every_doubt_reads_everything_and_says_why() {
        let t = "2027-01-05T00:00:00Z";
        let prev = [manifest("b2", t, Some(file(9)))];
        let cases: Vec<(Plan, &str)> = vec![
            (
                plan(&[], &now(Some(file(9))), rules(false, None)),
                "first backup",
            ),
            (
                plan(&prev, &now(Some(file(9))), rules(true, None)),
                "--full",
            ),
            (
                plan(
                    &prev,
                    &now(Some(file(9))),
                    rules(false, Some("check failed")),
                ),
                "earlier run",
            ),
            (
                plan(&prev, &now(Some(file(10))), rules(false, None)),
                "image changed",
            ),
            (plan(&prev, &now(None), rules(false, None)), "VM runs"),
            (
                plan(
                    &[manifest("b1", t, None)],
                    &now(Some(file(9))),
                    rules(false, None),
                ),
                "no state",
            ),
            (
                plan(
                    &[manifest("b0", "2026-11-01T00:00:00Z", Some(file(9)))],
                    &now(Some(file(9))),
                    rules(false, None),
                ),
                "older than full_every_days",
            ),
        ];
        for (p, want) in cases {
            let r = reason(p);
            assert!(r.contains(want), "{r:?} lacks {want:?}");
        }
        let mut resized = now(Some(file(9)));
        resized.virtual_size *= 2;
        assert!(reason(plan(&prev, &resized, rules(false, None))).contains("size"));
        let mut moved = now(Some(file(9)));
        moved.image = "/v/other.raw";
        assert!(reason(plan(&prev, &moved, rules(false, None))).contains("source"));
    }

    #[test]
    fn spot_checks_pick_distinct_data_chunks() {
        let index = DiskIndex {
            chunk_size: 1,
            virtual_size: 10,
            chunks: (0..10)
                .map(|i| (i % 2 == 0).then_some([i as u8; 32]))
                .collect(),
        };
        let p = pick(&index, 3);
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|i| i % 2 == 0), "{p:?}");
        let mut d = p.clone();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), 3);
        assert_eq!(pick(&index, 99).len(), 5);
    }

    #[test]
    fn a_spot_check_finds_a_chunk_that_is_not_what_the_index_says() {
        const MIB: usize = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let mut data = vec![0u8; 3 * MIB];
        for (i, b) in data[..2 * MIB].iter_mut().enumerate() {
            *b = (i % 253) as u8 + 1;
        }
        std::fs::write(&path, &data).unwrap();
        let index = DiskIndex {
            chunk_size: MIB as u64,
            virtual_size: data.len() as u64,
            chunks: vec![
                Some(chunk::digest(&data[..MIB])),
                Some(chunk::digest(&data[MIB..2 * MIB])),
                None,
            ],
        };
        let reader = ImageReader::open(&path, "raw").unwrap();
        let (read, bad) = spot_check(&reader, &index, &[0, 1, 2]).unwrap();
        assert_eq!((read, bad), (3 * MIB as u64, None));
        data[MIB + 7] ^= 0xff;
        data[2 * MIB + 9] = 1;
        std::fs::write(&path, &data).unwrap();
        let reader = ImageReader::open(&path, "raw").unwrap();
        assert_eq!(
            spot_check(&reader, &index, &[0, 1]).unwrap().1,
            Some(Mismatch { chunk: 1 })
        );
        assert_eq!(
            spot_check(&reader, &index, &[2]).unwrap().1,
            Some(Mismatch { chunk: 2 })
        );
    }
}
