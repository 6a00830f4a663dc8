//! What a backup must read of a disk: everything, only what changed since the previous
//! backup, or nothing but a check.
//!
//! Two proofs let a backup read less than everything:
//! - a shut-off VM's image file whose identity (device, inode), size, and both change times
//!   (mtime, and ctime, which no write or `touch` can set back) equal what the previous backup
//!   recorded: that backup's index stands for this one;
//! - the persistent dirty bitmap the previous backup started in the image at its snapshot
//!   instant (`vmbackup-<id>`), read from the image file after this backup's snapshot made it
//!   read-only (or with the VM shut off): only the chunks it marks are read, the rest of the
//!   index is the previous backup's.
//!
//! Either way a few unchanged chunks, chosen at random, are read again and compared with their
//! recorded digests. Whenever there is any doubt, everything is read, and the reason is
//! recorded: the first backup, `--full`, the chain's last full read older than `full_every`, the
//! disk's source, size or chunk size changed, no bitmap from the previous backup, the bitmap
//! gone (removed, the disk replaced or restored), in use (QEMU died with the image open),
//! disabled or unreadable, internal snapshots in the image, or a failed check or a restore
//! since (a request left in the state folder).

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;

use crate::image::{ChunkKind, ImageError, ImageReader};
use crate::qcow2_bitmaps::Bitmaps;
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
    /// The persistent bitmaps in the image file, read after the snapshot (a running VM) or
    /// with the VM shut off; `Err` says why they cannot be read.
    pub bitmaps: Result<&'a Bitmaps, String>,
}

/// Why everything is read, or what stands for the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Full {
        reason: String,
    },
    /// The disk is unchanged since backup `based_on`: its index stands for this one.
    Unchanged {
        based_on: String,
        index_object: String,
        logical_bytes: u64,
        full_at: String,
        /// The bitmap that went on recording the disk's writes since then.
        bitmap: Option<String>,
    },
    /// Only the regions that bitmap `bitmap` of the image marks changed since backup
    /// `based_on`: read those, take the rest from its index.
    Changed {
        based_on: String,
        index_object: String,
        full_at: String,
        bitmap: String,
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

/// Decides how to read disk `now`, given the VM's earlier backups, newest first. The base is
/// always the newest backup holding the disk: its bitmap (started at its snapshot) is the one
/// that recorded every write since; an older backup's bitmap was removed after it.
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
    let Some(read) = &d.read else {
        return full(format!(
            "backup {} recorded no state of the image and no bitmap",
            m.id
        ));
    };
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
    if let (Some(now_file), Some(then_file)) = (now.file, read.file) {
        if now_file == then_file {
            return Plan::Unchanged {
                based_on: m.id.clone(),
                index_object: d.index_object.clone(),
                logical_bytes: d.logical_bytes,
                full_at: read.full_at.clone(),
                bitmap: read.bitmap.clone(),
            };
        }
    }
    let Some(name) = &read.bitmap else {
        return full(match now.file {
            Some(_) if read.file.is_some() => format!(
                "the image changed since backup {}, which started no bitmap on the disk",
                m.id
            ),
            _ => format!("backup {} started no bitmap on the disk", m.id),
        });
    };
    let bitmaps = match &now.bitmaps {
        Ok(b) => b,
        Err(why) => return full(format!("cannot read the image's bitmaps: {why}")),
    };
    if bitmaps.snapshots > 0 {
        return full(format!(
            "the image has {} internal snapshot(s): a revert would change it unseen",
            bitmaps.snapshots
        ));
    }
    if !bitmaps.consistent {
        return full("the image's bitmaps are marked inconsistent (written by a program that does not keep them)".into());
    }
    let Some(info) = bitmaps.get(name) else {
        return full(format!(
            "bitmap {name} of backup {} is not in the image (removed, or the disk was replaced or restored)",
            m.id
        ));
    };
    if info.in_use {
        return full(format!(
            "bitmap {name} is inconsistent: QEMU did not save it (killed, crashed or destroyed with the image open)"
        ));
    }
    if !info.auto {
        return full(format!("bitmap {name} is disabled: it stopped recording"));
    }
    if let Err(e) = info.check_usable() {
        return full(e.to_string());
    }
    Plan::Changed {
        based_on: m.id.clone(),
        index_object: d.index_object.clone(),
        full_at: read.full_at.clone(),
        bitmap: name.clone(),
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
    namer: &chunk::Namer,
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
            Some(Some(d)) => !zero && namer.digest(&buf) == *d,
            None => false,
        };
        if !same {
            return Ok((read, Some(Mismatch { chunk: i })));
        }
    }
    Ok((read, None))
}

/// `n` chunk indexes of `index`, chosen at random (data chunks first, so that the check
/// reads something), without repeats, none of them in `skip` (ascending).
pub fn pick(index: &DiskIndex, n: usize, skip: &[u64]) -> Vec<u64> {
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
    let eligible: Vec<u64> = (0..index.chunks.len() as u64)
        .filter(|i| skip.binary_search(i).is_err())
        .collect();
    let data: Vec<u64> = eligible
        .iter()
        .copied()
        .filter(|&i| index.chunks[i as usize].is_some())
        .collect();
    let pool: Vec<u64> = if data.is_empty() { eligible } else { data };
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
    use crate::qcow2_bitmaps::{BitmapInfo, ImageFormat};
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
                    checked_bytes: 0,
                    full_at: full_at.into(),
                    file: state,
                    bitmap: None,
                }),
            }],
            nics: vec![],
            domain_xml_object: String::new(),
            schedule: None,
            scheduled_for: None,
            tags: Vec::new(),
            stored_bytes: 5,
            logical_bytes: 5,
            vm_state: None,
        }
    }

    fn now(state: Option<FileState>) -> DiskNow<'static> {
        DiskNow {
            target: "vda",
            image: "/v/web.raw",
            virtual_size: 8 << 20,
            chunk_size: 4 << 20,
            file: state,
            bitmaps: Err("not read".into()),
        }
    }

    fn bitmaps(list: Vec<BitmapInfo>, snapshots: u32, consistent: bool) -> &'static Bitmaps {
        Box::leak(Box::new(Bitmaps {
            format: ImageFormat::Qcow2 { version: 3 },
            virtual_size: Some(8 << 20),
            consistent,
            snapshots,
            bitmaps: list,
        }))
    }

    fn with_bitmap(mut m: Manifest, name: &str) -> Manifest {
        m.disks[0].read.as_mut().unwrap().bitmap = Some(name.into());
        m
    }

    #[test]
    fn a_running_disk_with_the_previous_backups_bitmap_reads_what_it_marks() {
        let t = "2027-01-05T00:00:00Z";
        let prev = [
            with_bitmap(manifest("b2", t, None), "vmbackup-b2"),
            with_bitmap(manifest("b1", t, None), "vmbackup-b1"),
        ];
        let mut n = now(None);
        n.bitmaps = Ok(bitmaps(
            vec![
                BitmapInfo::for_test("vmbackup-b2", false, true),
                BitmapInfo::for_test("other", true, false),
            ],
            0,
            true,
        ));
        let p = plan(&prev, &n, rules(false, None));
        assert_eq!(
            p,
            Plan::Changed {
                based_on: "b2".into(),
                index_object: "backups/b2/vda.index".into(),
                full_at: t.into(),
                bitmap: "vmbackup-b2".into(),
            }
        );
        // A shut-off VM whose image changed uses the bitmap too; an unchanged one is not read,
        // and the bitmap goes on standing for the disk.
        let prev_off = [with_bitmap(manifest("b3", t, Some(file(9))), "vmbackup-b2")];
        let mut off = now(Some(file(10)));
        off.bitmaps = n.bitmaps.clone();
        assert!(
            matches!(plan(&prev_off, &off, rules(false, None)), Plan::Changed { based_on, bitmap, .. } if based_on == "b3" && bitmap == "vmbackup-b2")
        );
        off.file = Some(file(9));
        assert!(
            matches!(plan(&prev_off, &off, rules(false, None)), Plan::Unchanged { based_on, bitmap: Some(b), .. } if based_on == "b3" && b == "vmbackup-b2")
        );
    }

    #[test]
    fn every_doubt_about_the_bitmap_reads_everything_and_says_why() {
        let t = "2027-01-05T00:00:00Z";
        let prev = [with_bitmap(manifest("b2", t, None), "vmbackup-b2")];
        let good = BitmapInfo::for_test("vmbackup-b2", false, true);
        let cases: Vec<(&'static Bitmaps, &str)> = vec![
            (bitmaps(vec![], 0, true), "not in the image"),
            (
                bitmaps(
                    vec![BitmapInfo::for_test("vmbackup-b1", false, true)],
                    0,
                    true,
                ),
                "not in the image",
            ),
            (
                bitmaps(
                    vec![BitmapInfo::for_test("vmbackup-b2", true, true)],
                    0,
                    true,
                ),
                "inconsistent",
            ),
            (
                bitmaps(
                    vec![BitmapInfo::for_test("vmbackup-b2", false, false)],
                    0,
                    true,
                ),
                "disabled",
            ),
            (bitmaps(vec![good.clone()], 1, true), "internal snapshot"),
            (bitmaps(vec![good.clone()], 0, false), "marked inconsistent"),
        ];
        for (b, want) in cases {
            let mut n = now(None);
            n.bitmaps = Ok(b);
            let r = reason(plan(&prev, &n, rules(false, None)));
            assert!(r.contains(want), "{r:?} lacks {want:?}");
        }
        let mut n = now(None);
        n.bitmaps = Err("no such file".into());
        assert!(reason(plan(&prev, &n, rules(false, None))).contains("no such file"));
        n.bitmaps = Ok(bitmaps(vec![good], 0, true));
        assert!(reason(plan(&prev, &n, rules(true, None))).contains("--full"));
        let r = reason(plan(
            &prev,
            &n,
            rules(false, Some("restored from backup b1")),
        ));
        assert!(r.contains("restored from backup b1"), "{r}");
        let old = [with_bitmap(
            manifest("b0", "2026-11-01T00:00:00Z", None),
            "vmbackup-b0",
        )];
        assert!(reason(plan(&old, &n, rules(false, None))).contains("full_every_days"));
        // A backup that started no bitmap on the disk (raw, or the bitmap failed).
        assert!(
            reason(plan(&[manifest("b2", t, None)], &n, rules(false, None)))
                .contains("started no bitmap")
        );
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
                "the image changed since backup b2, which started no bitmap",
            ),
            (
                plan(&prev, &now(None), rules(false, None)),
                "started no bitmap",
            ),
            (
                plan(
                    &[manifest("b1", t, None)],
                    &now(Some(file(9))),
                    rules(false, None),
                ),
                "started no bitmap",
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
        let p = pick(&index, 3, &[]);
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|i| i % 2 == 0), "{p:?}");
        let mut d = p.clone();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), 3);
        assert_eq!(pick(&index, 99, &[]).len(), 5);
        let p = pick(&index, 99, &[0, 4, 5]);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(!p.contains(&0) && !p.contains(&4), "{p:?}");
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
        let (read, bad) = spot_check(&chunk::Namer::Sha256, &reader, &index, &[0, 1, 2]).unwrap();
        assert_eq!((read, bad), (3 * MIB as u64, None));
        data[MIB + 7] ^= 0xff;
        data[2 * MIB + 9] = 1;
        std::fs::write(&path, &data).unwrap();
        let reader = ImageReader::open(&path, "raw").unwrap();
        assert_eq!(
            spot_check(&chunk::Namer::Sha256, &reader, &index, &[0, 1])
                .unwrap()
                .1,
            Some(Mismatch { chunk: 1 })
        );
        assert_eq!(
            spot_check(&chunk::Namer::Sha256, &reader, &index, &[2])
                .unwrap()
                .1,
            Some(Mismatch { chunk: 2 })
        );
    }
}
