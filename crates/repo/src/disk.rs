//! One disk in the repository: its index (one entry per fixed-size chunk, aligned to guest
//! offsets, so unchanged regions deduplicate across backups) and the pipelines that fill it
//! from an image and write it back out.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};

use super::chunk::{self, ChunkStore, Digest};
use super::source::{ChunkKind, ChunkSource};
use super::{RepoError, Repository, Result};

const MAGIC: &[u8; 4] = b"VMBI";
const VERSION: u32 = 1;
const ZERO: Digest = [0; 32];

/// Which chunk holds what: `None` for a chunk that reads as zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskIndex {
    pub chunk_size: u64,
    pub virtual_size: u64,
    pub chunks: Vec<Option<Digest>>,
}

impl DiskIndex {
    /// `VMBI`, u32 version, u64 chunk size, u64 virtual size, u64 count, 32 bytes per chunk
    /// (all zero for a zero chunk), then the SHA-256 of everything before it. Integers LE.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32 + self.chunks.len() * 32 + 32);
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&VERSION.to_le_bytes());
        v.extend_from_slice(&self.chunk_size.to_le_bytes());
        v.extend_from_slice(&self.virtual_size.to_le_bytes());
        v.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            v.extend_from_slice(c.as_ref().unwrap_or(&ZERO));
        }
        let sum: [u8; 32] = Sha256::digest(&v).into();
        v.extend_from_slice(&sum);
        v
    }

    /// Bytes of the chunks that hold data (the last chunk may be shorter).
    pub fn data_bytes(&self) -> u64 {
        let size = self.virtual_size;
        let cs = self.chunk_size;
        self.chunks
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_some())
            .map(|(i, _)| {
                ((i as u64 + 1) * cs)
                    .min(size)
                    .saturating_sub(i as u64 * cs)
            })
            .sum()
    }

    pub fn decode(b: &[u8]) -> Result<DiskIndex> {
        let bad = |why: &str| RepoError::BadIndex(why.to_string());
        if b.len() < 64 || &b[..4] != MAGIC {
            return Err(bad("not a disk index"));
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if Sha256::digest(body).as_slice() != sum {
            return Err(bad("checksum mismatch"));
        }
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap_or([0; 8]));
        if u32::from_le_bytes(body[4..8].try_into().unwrap_or([0; 4])) != VERSION {
            return Err(bad("unknown version"));
        }
        let (chunk_size, virtual_size, count) = (u64_at(8), u64_at(16), u64_at(24) as usize);
        if chunk_size == 0
            || body.len() != 32 + count * 32
            || virtual_size.div_ceil(chunk_size) as usize != count
        {
            return Err(bad("inconsistent sizes"));
        }
        let chunks = body[32..]
            .chunks_exact(32)
            .map(|c| {
                let d: Digest = c.try_into().unwrap_or(ZERO);
                (d != ZERO).then_some(d)
            })
            .collect();
        Ok(DiskIndex {
            chunk_size,
            virtual_size,
            chunks,
        })
    }
}

/// Runs `work(i)` for every `i` in `0..count` on `threads` threads, which take the next index
/// as they go; stops early at the first error and returns it.
fn for_each_parallel(
    count: usize,
    threads: usize,
    work: impl Fn(usize) -> Result<()> + Sync,
) -> Result<()> {
    let next = AtomicU64::new(0);
    let failed: Mutex<Option<RepoError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                if i >= count || failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                    break;
                }
                if let Err(e) = work(i) {
                    if let Ok(mut f) = failed.lock() {
                        f.get_or_insert(e);
                    }
                    break;
                }
            });
        }
    });
    match failed.into_inner().ok().flatten() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskBackup {
    pub index: DiskIndex,
    /// Bytes of the non-zero chunks.
    pub logical_bytes: u64,
    /// Bytes this disk added to storage.
    pub stored_bytes_new: u64,
    pub zero_chunks: u64,
    pub data_chunks: u64,
    pub reused_chunks: u64,
    /// Chunks that existed damaged and were written again.
    pub repaired_chunks: u64,
    /// Bytes read from the source (chunks known to be zeros without reading are not counted).
    pub bytes_read: u64,
}

/// Stores the disk `source` reads as chunks with `threads` workers, each holding one chunk
/// buffer at a time. Every chunk is durable when this returns.
pub fn backup_disk<S: ChunkSource + ?Sized>(
    repo: &Repository,
    source: &S,
    chunk_size: u64,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<DiskBackup> {
    backup_chunks(repo, source, chunk_size, threads, None, progress)
}

/// Like `backup_disk`, but reads only the chunks `changed` (ascending indexes) and takes every
/// other chunk's entry from `base`, an earlier backup's index of the same disk: the result is
/// a complete index. `base` must have the source's size and `chunk_size`.
pub fn backup_disk_changes<S: ChunkSource + ?Sized>(
    repo: &Repository,
    source: &S,
    base: &DiskIndex,
    changed: &[u64],
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<DiskBackup> {
    if base.virtual_size != source.virtual_size() || base.chunk_size == 0 {
        return Err(RepoError::BadIndex(format!(
            "the base index covers {} bytes, the disk has {}",
            base.virtual_size,
            source.virtual_size()
        )));
    }
    if let Some(&c) = changed.iter().find(|&&c| c as usize >= base.chunks.len()) {
        return Err(RepoError::BadIndex(format!(
            "changed chunk {c} is beyond the disk's {} chunks",
            base.chunks.len()
        )));
    }
    backup_chunks(
        repo,
        source,
        base.chunk_size,
        threads,
        Some((base, changed)),
        progress,
    )
}

fn backup_chunks<S: ChunkSource + ?Sized>(
    repo: &Repository,
    source: &S,
    chunk_size: u64,
    threads: usize,
    base: Option<(&DiskIndex, &[u64])>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<DiskBackup> {
    let size = source.virtual_size();
    let count = size.div_ceil(chunk_size) as usize;
    let chunk_len = |i: u64| ((i + 1) * chunk_size).min(size) - i * chunk_size;
    let (slots, todo): (Vec<Option<Digest>>, Vec<u64>) = match base {
        None => (vec![None; count], (0..count as u64).collect()),
        Some((b, changed)) => (b.chunks.clone(), changed.to_vec()),
    };
    let total: u64 = match base {
        None => size,
        Some(_) => todo.iter().map(|&i| chunk_len(i)).sum(),
    };
    let done = AtomicU64::new(0);
    let slots = Mutex::new(slots);
    let (logical, stored, zeros, datas, reused, repaired, read) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    let chunks = repo.chunks();
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let copied = for_each_parallel(todo.len(), threads, |n| {
        BUF.with_borrow_mut(|buf| {
            let i = todo[n];
            let kind = source
                .read_chunk(i, chunk_size, buf)
                .map_err(|e| RepoError::Source(Box::new(e)))?;
            let digest = if kind == ChunkKind::Zero {
                zeros.fetch_add(1, Ordering::Relaxed);
                None
            } else {
                read.fetch_add(buf.len() as u64, Ordering::Relaxed);
                if buf.iter().all(|&b| b == 0) {
                    zeros.fetch_add(1, Ordering::Relaxed);
                    None
                } else {
                    let out = chunks.put(buf)?;
                    logical.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    stored.fetch_add(out.stored_bytes, Ordering::Relaxed);
                    datas.fetch_add(1, Ordering::Relaxed);
                    if out.new {
                        crate::failpoint::point("backup-chunk-written");
                    } else {
                        reused.fetch_add(1, Ordering::Relaxed);
                    }
                    if out.repaired {
                        repaired.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(out.digest)
                }
            };
            if let Ok(mut sl) = slots.lock() {
                sl[i as usize] = digest;
            }
            let len = chunk_len(i);
            progress(done.fetch_add(len, Ordering::Relaxed) + len, total);
            Ok(())
        })
    });
    if let Err(e) = copied.and_then(|()| repo.store().sync()) {
        // This disk's backup failed: what it wrote is never named, and its temporaries go now.
        repo.forget_unsynced();
        return Err(e);
    }
    Ok(DiskBackup {
        index: DiskIndex {
            chunk_size,
            virtual_size: size,
            chunks: slots.into_inner().unwrap_or_default(),
        },
        logical_bytes: logical.into_inner(),
        stored_bytes_new: stored.into_inner(),
        zero_chunks: zeros.into_inner(),
        data_chunks: datas.into_inner(),
        reused_chunks: reused.into_inner(),
        repaired_chunks: repaired.into_inner(),
        bytes_read: read.into_inner(),
    })
}

/// Reads every data chunk of `index` (checked against its digest) and hands it to `write`
/// with its guest offset, on `threads` threads; zero chunks are skipped.
fn for_each_data_chunk(
    repo: &Repository,
    index: &DiskIndex,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
    write: impl Fn(u64, &[u8]) -> Result<()> + Sync,
) -> Result<()> {
    let done = AtomicU64::new(0);
    let chunks = ChunkStore::new(repo.store(), repo.namer());
    let threads = threads.max(repo.store().parallel_reads());
    for_each_parallel(index.chunks.len(), threads, |i| {
        if let Some(d) = &index.chunks[i] {
            write(i as u64 * index.chunk_size, &chunks.get(d)?)?;
        }
        let d = done.fetch_add(1, Ordering::Relaxed) + 1;
        progress(
            (d * index.chunk_size).min(index.virtual_size),
            index.virtual_size,
        );
        Ok(())
    })
}

/// A new file for a restored disk: 0600 (guest data), whatever the umask; the caller gives it
/// the owner and mode of the image it replaces.
fn create_new(out: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|source| RepoError::Io {
            what: "create",
            path: out.to_path_buf(),
            source,
        })
}

fn write_error(out: &Path) -> impl Fn(std::io::Error) -> RepoError + '_ {
    move |source| RepoError::Io {
        what: "write",
        path: out.to_path_buf(),
        source,
    }
}

/// Writes a stored disk into a new raw file (zero chunks stay holes), checking every chunk.
/// The file is not synced: the caller makes the final image durable (it may convert first).
pub fn restore_disk(
    repo: &Repository,
    index: &DiskIndex,
    out: &Path,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<()> {
    let file = create_new(out)?;
    file.set_len(index.virtual_size).map_err(write_error(out))?;
    for_each_data_chunk(repo, index, threads, progress, |at, data| {
        file.write_all_at(data, at).map_err(write_error(out))
    })
}

/// Writes a stored disk into a new qcow2 image in one pass (zero clusters unallocated),
/// checking every chunk. The chunk size must be a multiple of `qcow2::CLUSTER`. Not synced.
pub fn restore_disk_qcow2(
    repo: &Repository,
    index: &DiskIndex,
    out: &Path,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<()> {
    if !index.chunk_size.is_multiple_of(crate::qcow2::CLUSTER) {
        return Err(RepoError::BadIndex(format!(
            "chunk size {} is not a multiple of the qcow2 cluster size",
            index.chunk_size
        )));
    }
    let writer = crate::qcow2::Qcow2Writer::new(create_new(out)?, index.virtual_size);
    for_each_data_chunk(repo, index, threads, progress, |at, data| {
        writer.write_at(at, data).map_err(write_error(out))
    })?;
    writer.finish().map_err(write_error(out))?;
    Ok(())
}

/// The digests of the distinct chunks of `index` that are missing or damaged.
pub fn verify_disk(repo: &Repository, index: &DiskIndex) -> Result<Vec<String>> {
    verify_disk_with(repo, index, &mut |_| {})
}

/// `verify_disk`, telling `progress` how many bytes of the disk are checked so far (a chunk
/// used again, or a zero one, counts at once: it needs no reading).
pub fn verify_disk_with(
    repo: &Repository,
    index: &DiskIndex,
    progress: &mut dyn FnMut(u64),
) -> Result<Vec<String>> {
    let chunks = ChunkStore::new(repo.store(), repo.namer());
    let mut bad = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Each distinct chunk once, however often the disk uses it.
    for (i, d) in index.chunks.iter().enumerate() {
        if let Some(d) = d.as_ref().filter(|d| seen.insert(**d)) {
            match chunks.get(d) {
                Ok(_) => {}
                Err(RepoError::Corrupt { .. }) | Err(RepoError::NotFound(_)) => {
                    bad.push(chunk::hex(d))
                }
                Err(e) => return Err(e),
            }
        }
        progress(((i as u64 + 1) * index.chunk_size).min(index.virtual_size));
    }
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::memory::MemorySource;
    use std::process::Command;

    fn run(args: &[&str]) {
        assert!(
            Command::new(args[0])
                .args(&args[1..])
                .status()
                .unwrap()
                .success(),
            "{args:?}"
        );
    }

    #[test]
    fn index_round_trip_and_damage() {
        let i = DiskIndex {
            chunk_size: 4,
            virtual_size: 10,
            chunks: vec![Some([7; 32]), None, Some([9; 32])],
        };
        let b = i.encode();
        assert_eq!(DiskIndex::decode(&b).unwrap(), i);
        let mut bad = b.clone();
        bad[40] ^= 1;
        assert!(DiskIndex::decode(&bad).is_err());
    }

    /// 20 MiB and 4 KiB: 3 MiB of 0x5a, a MiB the map calls data that holds zeros, 100 KiB of
    /// 0x33 in chunk 17, 0x7f filling the short last chunk; the rest is known to be zeros.
    fn disk() -> MemorySource {
        const M: usize = 1 << 20;
        let mut data = vec![0u8; 20 * M + 4096];
        data[..3 * M].fill(0x5a);
        data[17 * M..17 * M + 100 * 1024].fill(0x33);
        data[20 * M..].fill(0x7f);
        let m = M as u64;
        MemorySource {
            data,
            zero: vec![3 * m..8 * m, 9 * m..17 * m, 18 * m..20 * m],
        }
    }

    #[test]
    fn a_changes_backup_reads_only_the_changed_chunks_and_gives_a_complete_index() {
        const M: usize = 1 << 20;
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::open(&d.path().join("repo")).unwrap();
        let src = disk();
        let first = backup_disk(&repo, &src, 1 << 20, 2, &|_, _| {}).unwrap();
        assert_eq!(
            first.bytes_read,
            5 * (1 << 20) + 4096,
            "the 5 data chunks and the MiB of zeros the map calls data"
        );
        // Changes: chunk 1 overwritten, chunk 2 zeroed (a discard), chunk 12 written for
        // the first time (it was in a known-zero region), the last chunk changed.
        let mut now = disk();
        now.data[M..M + 10].fill(0x11);
        now.data[2 * M..3 * M].fill(0);
        now.data[12 * M + 5..12 * M + 9].fill(0x22);
        now.zero = vec![3 << 20..8 << 20, 9 << 20..12 << 20, 13 << 20..17 << 20];
        let last = now.data.len() - 1;
        now.data[last] = 0x01;
        let changed = [1, 2, 12, 20];
        let read_chunks = std::sync::Mutex::new(Vec::new());
        let inc = backup_disk_changes(&repo, &now, &first.index, &changed, 2, &|done, total| {
            read_chunks.lock().unwrap().push((done, total));
        })
        .unwrap();
        let full = backup_disk(&repo, &now, 1 << 20, 2, &|_, _| {}).unwrap();
        assert_eq!(inc.index, full.index, "the same index as a whole read");
        assert_eq!(inc.bytes_read, 3 * (1 << 20) + 4096);
        assert_eq!(
            inc.index.chunks[2], None,
            "the zeroed chunk is a zero chunk again"
        );
        let p = read_chunks.into_inner().unwrap();
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|&(_, t)| t == 3 * (1 << 20) + 4096));
        let out = d.path().join("out.raw");
        restore_disk(&repo, &inc.index, &out, 2, &|_, _| {}).unwrap();
        assert!(std::fs::read(&out).unwrap() == now.data);
        assert_eq!(inc.index.data_bytes(), full.logical_bytes);

        // Nothing changed: nothing read, the base index as it was.
        let same = backup_disk_changes(&repo, &now, &inc.index, &[], 2, &|_, _| {}).unwrap();
        assert_eq!((same.bytes_read, &same.index), (0, &inc.index));
        // A base of another size, or a chunk out of range, is refused.
        let mut other = inc.index.clone();
        other.virtual_size += 1;
        assert!(backup_disk_changes(&repo, &now, &other, &[1], 2, &|_, _| {}).is_err());
        assert!(backup_disk_changes(&repo, &now, &inc.index, &[21], 2, &|_, _| {}).is_err());
    }

    #[test]
    fn backup_dedups_skips_zeros_and_restores_exactly() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::open(&d.path().join("repo")).unwrap();
        let src = disk();
        let b = backup_disk(&repo, &src, 1 << 20, 2, &|_, _| {}).unwrap();
        assert_eq!(b.index.chunks.len(), 21);
        assert_eq!(b.index.virtual_size, src.data.len() as u64);
        assert_eq!(b.data_chunks, 5, "3 MiB of 0x5a, chunk 17, the last chunk");
        assert_eq!(b.logical_bytes, (4 << 20) + 4096);
        assert_eq!(
            repo.store().list("chunks/").unwrap().len(),
            3,
            "the 3 identical 0x5a chunks are stored once"
        );
        assert_eq!(b.zero_chunks, 16, "including the MiB of data that is zeros");
        assert_eq!(b.index.chunks[8], None);
        let again = backup_disk(&repo, &src, 1 << 20, 2, &|_, _| {}).unwrap();
        assert_eq!(again.stored_bytes_new, 0);
        assert_eq!(again.index, b.index);

        let out = d.path().join("out.raw");
        restore_disk(&repo, &b.index, &out, 2, &|_, _| {}).unwrap();
        assert!(std::fs::read(&out).unwrap() == src.data);
        let outq = d.path().join("out.qcow2");
        restore_disk_qcow2(&repo, &b.index, &outq, 2, &|_, _| {}).unwrap();
        run(&["qemu-img", "check", "-q", outq.to_str().unwrap()]);
        run(&[
            "qemu-img",
            "compare",
            "-q",
            "-F",
            "raw",
            outq.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert!(verify_disk(&repo, &b.index).unwrap().is_empty());

        // Damage one chunk: verify names it and restore refuses.
        let name = chunk::object_name(b.index.chunks[17].as_ref().unwrap());
        let path = d.path().join("repo").join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len() - 1;
        bytes[n] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(verify_disk(&repo, &b.index).unwrap().len(), 1);
        let out2 = d.path().join("out2.raw");
        assert!(matches!(
            restore_disk(&repo, &b.index, &out2, 2, &|_, _| {}),
            Err(RepoError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_source_that_fails_fails_the_backup() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::open(d.path()).unwrap();
        struct Broken;
        impl ChunkSource for Broken {
            type Error = std::io::Error;
            fn virtual_size(&self) -> u64 {
                4 << 20
            }
            fn read_chunk(&self, i: u64, _: u64, _: &mut Vec<u8>) -> std::io::Result<ChunkKind> {
                match i {
                    2 => Err(std::io::Error::other("bad sector")),
                    _ => Ok(ChunkKind::Zero),
                }
            }
        }
        let e = backup_disk(&repo, &Broken, 1 << 20, 2, &|_, _| {}).unwrap_err();
        assert!(matches!(e, RepoError::Source(_)), "{e:?}");
        let cause = std::error::Error::source(&e).map(|c| c.to_string());
        assert_eq!(cause.as_deref(), Some("bad sector"));
    }
}
