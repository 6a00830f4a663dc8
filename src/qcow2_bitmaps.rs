//! Reads the persistent dirty bitmaps stored inside a qcow2 image file, for incremental
//! backups: which guest ranges were written since a bitmap was added.
//!
//! Written from QEMU's public qcow2 specification (`docs/interop/qcow2.txt`: "Header",
//! "Header extensions" -> "Bitmaps extension", and "Bitmaps"). All numbers in the metadata
//! are big-endian. Only version 3 images can hold bitmaps. The file is only read, never
//! locked or written; a bitmap that QEMU holds open (or held when it died) has its `in_use`
//! flag set on disk and is refused.
//!
//! Layout, in short: the header extension of type `0x23852875` gives the bitmap directory
//! (offset, size, count). Each directory entry gives a bitmap's name, flags, granularity and
//! its bitmap table: one u64 per cluster of bitmap data, either the host offset of a data
//! cluster, or 0 (the cluster reads as all zeros) or 1 (it reads as all ones). Bit `n` of the
//! bitmap data covers guest bytes `[n * granularity, (n + 1) * granularity)`; within a byte,
//! bit 0 is the least significant one (the spec's `bit_offset` formula: byte `n / 8`, bit
//! `n % 8`).
//!
//! Hostile files: every offset and size is checked against the file length before anything
//! is read or allocated, a bitmap table must have exactly the size the virtual disk implies,
//! and each data cluster may be referenced once, so the work and memory are bounded by the
//! file's size (at most four ranges per byte of bitmap data, for alternating bits).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"QFI\xfb";
const V2_HEADER_LEN: u64 = 72;
const V3_HEADER_LEN: u64 = 104;

/// Incompatible feature bits: dirty (0), corrupt (1), external data file (2), compression
/// type (3), extended L2 entries (4). None of them changes where or how bitmaps are stored;
/// the corrupt bit makes the image untrustworthy.
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_KNOWN: u64 = 0x1f;
/// Autoclear bit 0: the bitmaps extension is consistent.
const AUTOCLEAR_BITMAPS: u64 = 1;

const EXT_END: u32 = 0;
const EXT_BITMAPS: u32 = 0x2385_2875;
const BITMAPS_EXT_LEN: usize = 24;

const DIR_ENTRY_FIXED: usize = 24;
const FLAG_IN_USE: u32 = 1 << 0;
const FLAG_AUTO: u32 = 1 << 1;
const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const FLAGS_KNOWN: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// Bitmap type 1: dirty tracking bitmap (the only one defined).
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// Bitmap table entry: bits 9-55 are the host offset of a data cluster; bit 0, only when
/// the offset is 0, says the cluster reads as all ones; bits 1-8 and 56-63 are reserved.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_ALL_ONES: u64 = 1;
const TABLE_RESERVED: u64 = !(TABLE_OFFSET_MASK | TABLE_ALL_ONES);

/// QEMU cannot open images with clusters over 2 MiB; neither does this reader (a cluster is
/// the unit it reads in).
const MAX_CLUSTER_BITS: u32 = 21;
const MIN_CLUSTER_BITS: u32 = 9;

#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("malformed qcow2 image: {0}")]
    Malformed(&'static str),
    #[error("unsupported qcow2 version {0}")]
    Version(u32),
    #[error("qcow2 image has unknown incompatible features {0:#x}")]
    UnknownFeatures(u64),
    #[error("qcow2 image is marked corrupt")]
    Corrupt,
    #[error("the image's bitmaps are marked inconsistent")]
    Inconsistent,
    #[error("no bitmap {0:?}")]
    NotFound(String),
    #[error("bitmap {0:?} is in use or was not saved cleanly")]
    InUse(String),
    #[error("bitmap {name:?} cannot be used: {what}")]
    Unusable { name: String, what: &'static str },
}

/// What kind of file `list` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// No qcow2 magic: a raw image (or anything else). It has no bitmaps.
    NotQcow2,
    /// A qcow2 image of this version (2 or 3; only 3 can hold bitmaps).
    Qcow2 { version: u32 },
}

/// The bitmaps of an image, as `list` reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmaps {
    pub format: ImageFormat,
    /// The virtual disk size in bytes from the qcow2 header; `None` when not qcow2.
    pub virtual_size: Option<u64>,
    /// `false` when the image has a bitmaps extension whose "consistent" autoclear bit is
    /// clear (some program that does not know bitmaps wrote to the image): then `bitmaps` is
    /// empty, but not because there are none; none of them may be trusted. `true` otherwise.
    pub consistent: bool,
    /// Internal snapshots in the image (header field `nb_snapshots`): a revert to one of them
    /// changes the disk without any write a bitmap would see.
    pub snapshots: u32,
    pub bitmaps: Vec<BitmapInfo>,
}

impl Bitmaps {
    /// The bitmap called `name`, if any.
    pub fn get(&self, name: &str) -> Option<&BitmapInfo> {
        self.bitmaps.iter().find(|b| b.raw_name == name.as_bytes())
    }
}

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The name (not UTF-8 names are shown lossily, and no `&str` finds them).
    pub name: String,
    /// Bytes of the virtual disk one bit covers (`1 << granularity_bits`).
    pub granularity: u64,
    /// Flag bit 0: not saved cleanly (QEMU has the image open with this bitmap, or died with
    /// it open); its contents and metadata may be outdated.
    pub in_use: bool,
    /// Flag bit 1: the bitmap is enabled, i.e. whoever opens the image must record every
    /// write in it. A bitmap without it is disabled: frozen, it records nothing more.
    pub auto: bool,
    /// Flag bit 2: the bitmap may be used even though its extra data is not understood.
    pub extra_data_compatible: bool,
    /// Flag bits 3-31 (reserved; must be 0).
    pub reserved_flags: u32,
    /// The bitmap type; 1 (`TYPE_DIRTY_TRACKING`) is the only one defined.
    pub bitmap_type: u8,
    /// Bytes of type-specific extra data (none is defined).
    pub extra_data_size: u32,
    raw_name: Vec<u8>,
    table_offset: u64,
    table_size: u32,
}

impl BitmapInfo {
    /// A directory entry as the tests of other modules need one (nothing behind it to read).
    #[cfg(test)]
    pub fn for_test(name: &str, in_use: bool, auto: bool) -> BitmapInfo {
        BitmapInfo {
            name: name.into(),
            granularity: 65536,
            in_use,
            auto,
            extra_data_compatible: false,
            reserved_flags: 0,
            bitmap_type: TYPE_DIRTY_TRACKING,
            extra_data_size: 0,
            raw_name: name.as_bytes().to_vec(),
            table_offset: 0,
            table_size: 0,
        }
    }

    /// Whether `dirty_ranges` may read this bitmap: a dirty tracking bitmap, not in use,
    /// with no flag or extra data this reader does not know.
    pub fn check_usable(&self) -> Result<(), BitmapError> {
        let unusable = |what| BitmapError::Unusable {
            name: self.name.clone(),
            what,
        };
        if self.in_use {
            return Err(BitmapError::InUse(self.name.clone()));
        }
        if self.bitmap_type != TYPE_DIRTY_TRACKING {
            return Err(unusable("not a dirty tracking bitmap"));
        }
        if self.reserved_flags != 0 {
            return Err(unusable("unknown flags"));
        }
        if self.extra_data_size != 0 && !self.extra_data_compatible {
            return Err(unusable("incompatible extra data"));
        }
        Ok(())
    }
}

/// The dirty regions of a bitmap: sorted, merged, non-empty `(offset, length)` byte ranges
/// of the virtual disk, clipped to its size. Each range is a whole number of granules except
/// one that ends at the end of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    pub granularity: u64,
    pub virtual_size: u64,
    ranges: Vec<(u64, u64)>,
}

impl DirtyMap {
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    pub fn into_ranges(self) -> Vec<(u64, u64)> {
        self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Total bytes in the dirty ranges.
    pub fn dirty_bytes(&self) -> u64 {
        self.ranges.iter().map(|&(_, len)| len).sum()
    }

    /// Indexes (ascending, unique) of the chunks of `chunk_size` bytes, counted from offset
    /// 0, that intersect a dirty range. A `chunk_size` of 0 touches nothing.
    pub fn chunks_touched(&self, chunk_size: u64) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        if chunk_size == 0 {
            return out;
        }
        for &(offset, len) in &self.ranges {
            let first = offset / chunk_size;
            let last = (offset + (len - 1)) / chunk_size;
            let from = match out.last() {
                Some(&prev) if prev >= first => prev + 1,
                _ => first,
            };
            out.extend(from..=last);
        }
        out
    }

    /// Appends the bits `[start_bit, end_bit)` as bytes, merging with the last range.
    fn push_bits(&mut self, start_bit: u64, end_bit: u64) {
        let to_bytes = |bit: u64| {
            (u128::from(bit) * u128::from(self.granularity)).min(u128::from(self.virtual_size))
                as u64
        };
        let (start, end) = (to_bytes(start_bit), to_bytes(end_bit));
        if start >= end {
            return;
        }
        if let Some(last) = self.ranges.last_mut() {
            if last.0 + last.1 >= start {
                last.1 = end.max(last.0 + last.1) - last.0;
                return;
            }
        }
        self.ranges.push((start, end - start));
    }
}

/// The bitmaps in the image at `path`. A file that is not qcow2, a version 2 image and a
/// version 3 image without the bitmaps extension have none (an empty list, `consistent`).
/// A bitmaps extension marked inconsistent gives an empty list with `consistent: false`.
/// Errors: a malformed or corrupt qcow2 image, an unsupported version, unknown
/// incompatible features.
pub fn list(path: &Path) -> Result<Bitmaps, BitmapError> {
    Ok(open(path)?.bitmaps)
}

/// The dirty regions of bitmap `name` of the image at `path`, in guest coordinates.
/// Refuses a bitmap that is in use (`InUse`), one of an inconsistent extension
/// (`Inconsistent`), one this reader cannot interpret (`Unusable`).
pub fn dirty_ranges(path: &Path, name: &str) -> Result<DirtyMap, BitmapError> {
    let img = open(path)?;
    if !img.bitmaps.consistent {
        return Err(BitmapError::Inconsistent);
    }
    let info = img
        .bitmaps
        .get(name)
        .ok_or_else(|| BitmapError::NotFound(name.to_string()))?;
    info.check_usable()?;
    read_bitmap(&img, info)
}

/// A file being read, with its length (all bounds are checked against it).
struct Reader {
    file: File,
    len: u64,
    path: PathBuf,
}

impl Reader {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BitmapError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(BitmapError::Malformed("offset overflows"))?;
        if end > self.len {
            return Err(BitmapError::Malformed("truncated (offset beyond the end)"));
        }
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                BitmapError::Malformed("truncated (offset beyond the end)")
            } else {
                self.io(e)
            }
        })
    }

    /// Reads `len` bytes at `offset`, allocating only once they are known to be in the file.
    fn read_vec(&self, offset: u64, len: u64) -> Result<Vec<u8>, BitmapError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => return Err(BitmapError::Malformed("truncated (offset beyond the end)")),
        }
        let mut buf = vec![0u8; len as usize];
        self.read_at(offset, &mut buf)?;
        Ok(buf)
    }

    fn io(&self, source: io::Error) -> BitmapError {
        BitmapError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

struct Image {
    reader: Reader,
    cluster_size: u64,
    bitmaps: Bitmaps,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn align8(n: u64) -> u64 {
    n.div_ceil(8) * 8
}

fn open(path: &Path) -> Result<Image, BitmapError> {
    let io_err = |source| BitmapError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    let reader = Reader {
        file,
        len,
        path: path.to_path_buf(),
    };
    let mut magic = [0u8; 4];
    if len >= 4 {
        reader.read_at(0, &mut magic)?;
    }
    if &magic != MAGIC {
        return Ok(Image {
            reader,
            cluster_size: 0,
            bitmaps: Bitmaps {
                format: ImageFormat::NotQcow2,
                virtual_size: None,
                consistent: true,
                snapshots: 0,
                bitmaps: Vec::new(),
            },
        });
    }
    if len < 8 {
        return Err(BitmapError::Malformed("truncated header"));
    }
    let head = reader.read_vec(0, 8)?;
    let version = be32(&head, 4);
    if version != 2 && version != 3 {
        return Err(BitmapError::Version(version));
    }
    let min_len = if version == 2 {
        V2_HEADER_LEN
    } else {
        V3_HEADER_LEN
    };
    if len < min_len {
        return Err(BitmapError::Malformed("truncated header"));
    }
    let head = reader.read_vec(0, min_len)?;
    let cluster_bits = be32(&head, 20);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(BitmapError::Malformed("cluster size out of range"));
    }
    let cluster_size = 1u64 << cluster_bits;
    let virtual_size = be64(&head, 24);
    if virtual_size > i64::MAX as u64 {
        return Err(BitmapError::Malformed("virtual size out of range"));
    }
    let backing_file_offset = be64(&head, 8);
    let mut bitmaps = Bitmaps {
        format: ImageFormat::Qcow2 { version },
        virtual_size: Some(virtual_size),
        consistent: true,
        snapshots: be32(&head, 60),
        bitmaps: Vec::new(),
    };
    if version == 2 {
        return Ok(Image {
            reader,
            cluster_size,
            bitmaps,
        });
    }

    let incompatible = be64(&head, 72);
    if incompatible & !INCOMPAT_KNOWN != 0 {
        return Err(BitmapError::UnknownFeatures(incompatible & !INCOMPAT_KNOWN));
    }
    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(BitmapError::Corrupt);
    }
    let autoclear = be64(&head, 88);
    let header_length = u64::from(be32(&head, 100));
    if header_length < V3_HEADER_LEN
        || !header_length.is_multiple_of(8)
        || header_length > cluster_size
    {
        return Err(BitmapError::Malformed("bad header length"));
    }

    // Header extensions: from the end of the header to the end of the first cluster (or to
    // the backing file name, stored after them).
    let mut ext_end = cluster_size;
    if backing_file_offset != 0 {
        ext_end = ext_end.min(backing_file_offset);
    }
    let ext_end = ext_end.min(len);
    let area = if ext_end > header_length {
        reader.read_vec(header_length, ext_end - header_length)?
    } else {
        Vec::new()
    };
    let mut bitmaps_ext: Option<[u8; BITMAPS_EXT_LEN]> = None;
    let mut at = 0usize;
    while at < area.len() {
        if area.len() - at < 8 {
            return Err(BitmapError::Malformed("truncated header extension"));
        }
        let kind = be32(&area, at);
        if kind == EXT_END {
            break;
        }
        let data_len = be32(&area, at + 4) as usize;
        let data = at + 8;
        if area.len() - data < data_len {
            return Err(BitmapError::Malformed("header extension beyond the header"));
        }
        if kind == EXT_BITMAPS {
            if bitmaps_ext.is_some() {
                return Err(BitmapError::Malformed("two bitmaps extensions"));
            }
            if data_len < BITMAPS_EXT_LEN {
                return Err(BitmapError::Malformed("bitmaps extension too short"));
            }
            let mut ext = [0u8; BITMAPS_EXT_LEN];
            ext.copy_from_slice(&area[data..data + BITMAPS_EXT_LEN]);
            bitmaps_ext = Some(ext);
        }
        // The data is padded to a multiple of 8; padding past the area ends the loop.
        at = data.saturating_add(align8(data_len as u64) as usize);
    }

    let Some(ext) = bitmaps_ext else {
        if autoclear & AUTOCLEAR_BITMAPS != 0 {
            return Err(BitmapError::Malformed(
                "bitmaps marked consistent but no bitmaps extension",
            ));
        }
        return Ok(Image {
            reader,
            cluster_size,
            bitmaps,
        });
    };
    if autoclear & AUTOCLEAR_BITMAPS == 0 {
        // Written by a program that does not know bitmaps: the extension is not to be read.
        bitmaps.consistent = false;
        return Ok(Image {
            reader,
            cluster_size,
            bitmaps,
        });
    }

    let nb_bitmaps = be32(&ext, 0);
    let dir_size = be64(&ext, 8);
    let dir_offset = be64(&ext, 16);
    if nb_bitmaps == 0 {
        return Err(BitmapError::Malformed("bitmaps extension with no bitmaps"));
    }
    if be32(&ext, 4) != 0 {
        return Err(BitmapError::Malformed(
            "bitmaps extension reserved field set",
        ));
    }
    if !dir_offset.is_multiple_of(cluster_size) || dir_offset == 0 {
        return Err(BitmapError::Malformed("bad bitmap directory offset"));
    }
    // Each entry takes at least 32 bytes (24 fixed, a name, padding to 8).
    if dir_size / 32 < u64::from(nb_bitmaps) {
        return Err(BitmapError::Malformed("bitmap directory too small"));
    }
    let dir = reader.read_vec(dir_offset, dir_size)?;
    bitmaps.bitmaps = parse_directory(&dir, nb_bitmaps)?;
    Ok(Image {
        reader,
        cluster_size,
        bitmaps,
    })
}

fn parse_directory(dir: &[u8], nb_bitmaps: u32) -> Result<Vec<BitmapInfo>, BitmapError> {
    let mut out: Vec<BitmapInfo> = Vec::new();
    let mut names: HashSet<&[u8]> = HashSet::new();
    let mut at = 0usize;
    for _ in 0..nb_bitmaps {
        if dir.len() - at < DIR_ENTRY_FIXED {
            return Err(BitmapError::Malformed("truncated bitmap directory"));
        }
        let e = &dir[at..];
        let table_offset = be64(e, 0);
        let table_size = be32(e, 8);
        let flags = be32(e, 12);
        let bitmap_type = e[16];
        let granularity_bits = e[17];
        let name_size = usize::from(be16(e, 18));
        let extra_data_size = be32(e, 20);
        if name_size == 0 {
            return Err(BitmapError::Malformed("bitmap with an empty name"));
        }
        if granularity_bits > 63 {
            return Err(BitmapError::Malformed("bitmap granularity out of range"));
        }
        let extra = extra_data_size as usize;
        let entry_len = align8((DIR_ENTRY_FIXED + extra + name_size) as u64);
        if entry_len > e.len() as u64 {
            return Err(BitmapError::Malformed("truncated bitmap directory"));
        }
        let name_at = DIR_ENTRY_FIXED + extra;
        let raw_name = &e[name_at..name_at + name_size];
        if !names.insert(raw_name) {
            return Err(BitmapError::Malformed("two bitmaps of the same name"));
        }
        out.push(BitmapInfo {
            name: String::from_utf8_lossy(raw_name).into_owned(),
            granularity: 1u64 << granularity_bits,
            in_use: flags & FLAG_IN_USE != 0,
            auto: flags & FLAG_AUTO != 0,
            extra_data_compatible: flags & FLAG_EXTRA_DATA_COMPATIBLE != 0,
            reserved_flags: flags & !FLAGS_KNOWN,
            bitmap_type,
            extra_data_size,
            raw_name: raw_name.to_vec(),
            table_offset,
            table_size,
        });
        at += entry_len as usize;
    }
    if at != dir.len() {
        return Err(BitmapError::Malformed("bitmap directory size mismatch"));
    }
    Ok(out)
}

fn read_bitmap(img: &Image, info: &BitmapInfo) -> Result<DirtyMap, BitmapError> {
    let reader = &img.reader;
    let cluster_size = img.cluster_size;
    let virtual_size = img.bitmaps.virtual_size.unwrap_or(0);
    let granularity = info.granularity;
    let nbits = virtual_size.div_ceil(granularity);
    let data_bytes = nbits.div_ceil(8);
    let nclusters = data_bytes.div_ceil(cluster_size);
    if u64::from(info.table_size) != nclusters {
        return Err(BitmapError::Malformed(
            "bitmap table size does not match the disk size",
        ));
    }
    if !info.table_offset.is_multiple_of(cluster_size) || (nclusters != 0 && info.table_offset == 0)
    {
        return Err(BitmapError::Malformed("bad bitmap table offset"));
    }
    let table = reader.read_vec(info.table_offset, nclusters * 8)?;

    let mut map = DirtyMap {
        granularity,
        virtual_size,
        ranges: Vec::new(),
    };
    let bits_per_cluster = cluster_size * 8;
    let mut seen: HashSet<u64> = HashSet::new();
    let mut buf = vec![0u8; cluster_size.min(data_bytes) as usize];
    for (i, raw) in table.chunks_exact(8).enumerate() {
        let entry = be64(raw, 0);
        let first_bit = i as u64 * bits_per_cluster;
        if entry & TABLE_RESERVED != 0 {
            return Err(BitmapError::Malformed(
                "bitmap table entry reserved bits set",
            ));
        }
        let offset = entry & TABLE_OFFSET_MASK;
        if offset == 0 {
            if entry & TABLE_ALL_ONES != 0 {
                map.push_bits(first_bit, (first_bit + bits_per_cluster).min(nbits));
            }
            continue;
        }
        if entry & TABLE_ALL_ONES != 0 {
            return Err(BitmapError::Malformed(
                "bitmap table entry has both an offset and bit 0",
            ));
        }
        if !offset.is_multiple_of(cluster_size) {
            return Err(BitmapError::Malformed("bitmap data not cluster-aligned"));
        }
        if !seen.insert(offset) {
            return Err(BitmapError::Malformed("bitmap data cluster used twice"));
        }
        let len = (data_bytes - i as u64 * cluster_size).min(cluster_size) as usize;
        let data = &mut buf[..len];
        reader.read_at(offset, data)?;
        scan_bits(&mut map, data, first_bit);
    }
    Ok(map)
}

/// Adds the runs of set bits of `data` (bit 0 of each byte first) to `map`; bit 0 of
/// `data[0]` is bitmap bit `first_bit`. Bits past the disk (the unused tail of the last
/// cluster, which should be 0) are clipped away by `push_bits`.
fn scan_bits(map: &mut DirtyMap, data: &[u8], first_bit: u64) {
    let mut run: Option<u64> = None;
    for (k, &byte) in data.iter().enumerate() {
        let base = first_bit + k as u64 * 8;
        match byte {
            0x00 => {
                if let Some(start) = run.take() {
                    map.push_bits(start, base);
                }
            }
            0xff => {
                run.get_or_insert(base);
            }
            _ => {
                for b in 0..8 {
                    let bit = base + b;
                    if byte & (1 << b) != 0 {
                        run.get_or_insert(bit);
                    } else if let Some(start) = run.take() {
                        map.push_bits(start, bit);
                    }
                }
            }
        }
    }
    if let Some(start) = run {
        map.push_bits(start, first_bit + data.len() as u64 * 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;

    fn run(args: &[&str]) {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    /// A new qcow2 image `name` in `dir` of `size` bytes (`opts`: `-o` options or none).
    fn create(dir: &Path, name: &str, size: u64, opts: &str) -> PathBuf {
        let img = dir.join(name);
        let size = size.to_string();
        let mut args = vec!["qemu-img", "create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&img), size.as_str()]);
        run(&args);
        img
    }

    /// `qemu-img bitmap --add` (plus `extra`, e.g. `--granularity N`).
    fn add_bitmap(img: &Path, name: &str, extra: &[&str]) {
        let mut args = vec!["qemu-img", "bitmap", "--add"];
        args.extend(extra);
        args.extend([s(img), name]);
        run(&args);
    }

    /// Writes through `qemu-io`: it opens the image read-write, loads its enabled bitmaps,
    /// records the writes in them and stores them back on exit.
    fn qemu_io(img: &Path, cmds: &[&str]) {
        let mut args = vec!["qemu-io", "-f", "qcow2"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(s(img));
        run(&args);
    }

    /// QEMU's own view of a bitmap: `nbdinfo --map=qemu:dirty-bitmap:NAME` of a `qemu-nbd`
    /// that exports it (started by nbdinfo through socket activation). nbdinfo (Debian package
    /// libnbd-bin, installed by scripts/setup-host) is required: a missing tool fails the test.
    fn qemu_dirty(img: &Path, bitmap: &str) -> Vec<(u64, u64)> {
        let map = format!("--map=qemu:dirty-bitmap:{bitmap}");
        let export = format!("--bitmap={bitmap}");
        let out = match Command::new("nbdinfo")
            .args(["--json", &map, "--", "[", "qemu-nbd", "-r", &export])
            .args(["-f", "qcow2", s(img), "]"])
            .output()
        {
            Ok(out) => out,
            Err(e) => panic!("nbdinfo (package libnbd-bin, see scripts/setup-host): {e}"),
        };
        assert!(
            out.status.success(),
            "nbdinfo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let extents: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let mut dirty: Vec<(u64, u64)> = Vec::new();
        for e in extents {
            let (off, len) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            if e["type"].as_u64().unwrap() & 1 == 0 {
                continue;
            }
            match dirty.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += len,
                _ => dirty.push((off, len)),
            }
        }
        dirty
    }

    fn patch(img: &Path, offset: u64, bytes: &[u8]) {
        let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
        f.write_all_at(bytes, offset).unwrap();
    }

    fn copy(img: &Path, name: &str) -> PathBuf {
        let to = img.with_file_name(name);
        std::fs::copy(img, &to).unwrap();
        to
    }

    #[test]
    fn reads_the_writes_qemu_recorded() {
        let dir = tempfile::tempdir().unwrap();
        // 64 MiB + 512: the last granule is cut short by the end of the disk.
        let size = 64 * M + 512;
        let img = create(dir.path(), "x.qcow2", size, "");
        add_bitmap(&img, "b0", &[]);
        add_bitmap(&img, "b1", &["--granularity", "1048576"]);
        add_bitmap(&img, "frozen", &[]);
        run(&["qemu-img", "bitmap", "--disable", s(&img), "frozen"]);
        qemu_io(
            &img,
            &[
                "write -P 0xab 1M 3M",
                "write 192k 64k",
                "write 40M 64k",
                "write 52429800 512", // 50 MiB + 1000: inside one granule
                "write 67108864 512", // the last 512 bytes
            ],
        );

        let listed = list(&img).unwrap();
        assert_eq!(listed.format, ImageFormat::Qcow2 { version: 3 });
        assert_eq!(listed.virtual_size, Some(size));
        assert!(listed.consistent);
        let names: Vec<&str> = listed.bitmaps.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["b0", "b1", "frozen"]);
        let b1 = listed.get("b1").unwrap();
        assert_eq!(b1.granularity, M);
        assert!(b1.auto && !b1.in_use && !b1.extra_data_compatible);
        assert_eq!(
            (b1.bitmap_type, b1.reserved_flags, b1.extra_data_size),
            (1, 0, 0)
        );
        // qemu-img's default granularity for 64 KiB clusters.
        assert_eq!(listed.get("b0").unwrap().granularity, 64 * K);
        let frozen = listed.get("frozen").unwrap();
        assert!(!frozen.auto && !frozen.in_use);
        assert!(listed.get("b2").is_none());

        let b0 = dirty_ranges(&img, "b0").unwrap();
        let want_b0 = [
            (192 * K, 64 * K),
            (M, 3 * M),
            (40 * M, 64 * K),
            (50 * M, 64 * K),
            (64 * M, 512),
        ];
        assert_eq!(b0.ranges(), want_b0);
        assert_eq!((b0.granularity, b0.virtual_size), (64 * K, size));
        assert_eq!(b0.dirty_bytes(), 3 * M + 3 * 64 * K + 512);
        let b1 = dirty_ranges(&img, "b1").unwrap();
        let want_b1 = [(0, 4 * M), (40 * M, M), (50 * M, M), (64 * M, 512)];
        assert_eq!(b1.ranges(), want_b1);
        // A disabled bitmap records nothing.
        assert!(dirty_ranges(&img, "frozen").unwrap().is_empty());
        assert!(matches!(
            dirty_ranges(&img, "b2"),
            Err(BitmapError::NotFound(n)) if n == "b2"
        ));

        for (name, want) in [("b0", &want_b0[..]), ("b1", &want_b1[..]), ("frozen", &[])] {
            {
                let qemu = qemu_dirty(&img, name);
                assert_eq!(qemu, want, "bitmap {name}");
            }
        }
    }

    #[test]
    fn chunks_touched_by_writes_across_a_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let img = create(dir.path(), "x.qcow2", 64 * M, "");
        add_bitmap(&img, "b0", &["--granularity", "65536"]);
        // 64 KiB on each side of 4 MiB, and 4 KiB inside chunk 3.
        qemu_io(&img, &["write 4032k 128k", "write 12292k 4k"]);
        let map = dirty_ranges(&img, "b0").unwrap();
        assert_eq!(map.ranges(), [(4 * M - 64 * K, 128 * K), (12 * M, 64 * K)]);
        {
            let qemu = qemu_dirty(&img, "b0");
            assert_eq!(qemu, map.ranges());
        }
        assert_eq!(map.chunks_touched(4 * M), [0, 1, 3]);
        assert_eq!(map.chunks_touched(64 * M), [0]);
        assert_eq!(map.dirty_bytes(), 192 * K);
    }

    #[test]
    fn chunks_touched_and_dirty_bytes() {
        let map = DirtyMap {
            granularity: 1,
            virtual_size: 64 * M,
            ranges: vec![(0, 1), (4 * M - 1, 2), (8 * M, 4 * M), (20 * M, 1)],
        };
        assert_eq!(map.chunks_touched(4 * M), [0, 1, 2, 5]);
        assert_eq!(map.chunks_touched(M), [0, 3, 4, 8, 9, 10, 11, 20]);
        assert!(map.chunks_touched(0).is_empty());
        assert_eq!(map.dirty_bytes(), 4 * M + 4);
    }

    #[test]
    fn small_clusters_and_a_table_entry_of_all_ones() {
        let dir = tempfile::tempdir().unwrap();
        // 512-byte clusters and 4 KiB granules: 16384 bits, 2048 bytes, 4 table entries,
        // each covering 512 * 8 * 4 KiB = 16 MiB of the disk.
        let img = create(dir.path(), "x.qcow2", 64 * M, "cluster_size=512");
        add_bitmap(&img, "b0", &["--granularity", "4096"]);
        qemu_io(&img, &["write 1M 8k", "write 192k 4k"]);
        let info = list(&img).unwrap().get("b0").unwrap().clone();
        assert_eq!(info.table_size, 4);
        let want = [(192 * K, 4 * K), (M, 8 * K)];
        assert_eq!(dirty_ranges(&img, "b0").unwrap().ranges(), want);

        // QEMU writes clusters of zeros as entry 0 and never writes 1 ("all ones", offset 0
        // with bit 0 set); set it by hand in the third entry: guest bytes 32-48 MiB.
        let table = info.table_offset;
        let mut entry = [0u8; 8];
        File::open(&img)
            .unwrap()
            .read_exact_at(&mut entry, table + 16)
            .unwrap();
        assert_eq!(u64::from_be_bytes(entry), 0);
        patch(&img, table + 16, &1u64.to_be_bytes());
        let want = [(192 * K, 4 * K), (M, 8 * K), (32 * M, 16 * M)];
        assert_eq!(dirty_ranges(&img, "b0").unwrap().ranges(), want);
        {
            let qemu = qemu_dirty(&img, "b0");
            assert_eq!(qemu, want);
        }

        // Reserved bits, and bit 0 together with an offset, are refused.
        let mut first = [0u8; 8];
        File::open(&img)
            .unwrap()
            .read_exact_at(&mut first, table)
            .unwrap();
        let first = u64::from_be_bytes(first);
        assert_ne!(first, 0);
        for bad in [3u64, 1 << 56, first | 1] {
            let copy = copy(&img, "bad.qcow2");
            let at = if bad == first | 1 { table } else { table + 16 };
            patch(&copy, at, &bad.to_be_bytes());
            assert!(matches!(
                dirty_ranges(&copy, "b0"),
                Err(BitmapError::Malformed(_))
            ));
        }
    }

    #[test]
    fn a_bitmap_left_in_use_by_a_killed_qemu_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = create(dir.path(), "x.qcow2", 64 * M, "");
        add_bitmap(&img, "b0", &[]);
        qemu_io(&img, &["write 1M 64k"]);
        assert!(!list(&img).unwrap().get("b0").unwrap().in_use);

        // qemu-io opens the image read-write and loads the bitmap, which marks it in use on
        // disk; killed, it never stores it back.
        let mut child = Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write 8M 64k",
                "-c",
                "sleep 60000",
                s(&img),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen_in_use = false;
        while Instant::now() < deadline {
            // The file may be caught mid-update: errors are fine here.
            if let Ok(b) = list(&img) {
                if b.get("b0").is_some_and(|b| b.in_use) {
                    seen_in_use = true;
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Open in a running QEMU: refused too.
        let while_open = dirty_ranges(&img, "b0");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(seen_in_use, "qemu-io never marked the bitmap in use");
        assert!(matches!(while_open, Err(BitmapError::InUse(_))));

        let b = list(&img).unwrap();
        let b0 = b.get("b0").unwrap();
        assert!(b0.in_use && b0.auto);
        assert!(matches!(b0.check_usable(), Err(BitmapError::InUse(_))));
        assert!(matches!(
            dirty_ranges(&img, "b0"),
            Err(BitmapError::InUse(n)) if n == "b0"
        ));
    }

    #[test]
    fn raw_and_plain_images_have_no_bitmaps() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("x.raw");
        run(&["qemu-img", "create", "-q", "-f", "raw", s(&raw), "1M"]);
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, b"QF").unwrap();
        for file in [&raw, &empty, &short] {
            let b = list(file).unwrap();
            assert_eq!(b.format, ImageFormat::NotQcow2);
            assert_eq!(b.virtual_size, None);
            assert!(b.consistent && b.bitmaps.is_empty());
            assert!(matches!(
                dirty_ranges(file, "b0"),
                Err(BitmapError::NotFound(_))
            ));
        }

        let v2 = create(dir.path(), "v2.qcow2", 8 * M, "compat=0.10");
        let b = list(&v2).unwrap();
        assert_eq!(b.format, ImageFormat::Qcow2 { version: 2 });
        assert_eq!(b.virtual_size, Some(8 * M));
        assert!(b.consistent && b.bitmaps.is_empty());

        let v3 = create(dir.path(), "v3.qcow2", 8 * M, "");
        let b = list(&v3).unwrap();
        assert_eq!(b.format, ImageFormat::Qcow2 { version: 3 });
        assert!(b.consistent && b.bitmaps.is_empty());
        // The "bitmaps consistent" autoclear bit without the extension is an error.
        patch(&v3, 95, &[1]);
        assert!(matches!(list(&v3), Err(BitmapError::Malformed(_))));

        let missing = dir.path().join("missing");
        assert!(matches!(list(&missing), Err(BitmapError::Io { .. })));
    }

    #[test]
    fn an_inconsistent_extension_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let img = create(dir.path(), "x.qcow2", 64 * M, "");
        add_bitmap(&img, "b0", &[]);
        qemu_io(&img, &["write 1M 64k"]);
        // What a program that knows no bitmaps leaves: autoclear bit 0 cleared.
        patch(&img, 95, &[0]);
        let b = list(&img).unwrap();
        assert_eq!(b.format, ImageFormat::Qcow2 { version: 3 });
        assert!(!b.consistent && b.bitmaps.is_empty());
        assert!(matches!(
            dirty_ranges(&img, "b0"),
            Err(BitmapError::Inconsistent)
        ));
    }

    /// An image with two bitmaps and some writes; the offsets of its directory entry for
    /// `b0`, of b0's bitmap table and of its first data cluster.
    fn sample(dir: &Path) -> (PathBuf, u64, u64, u64) {
        let img = create(dir, "x.qcow2", 64 * M, "");
        add_bitmap(&img, "b0", &[]);
        add_bitmap(&img, "b1", &["--granularity", "4096"]);
        qemu_io(&img, &["write 1M 64k", "write 33M 3M"]);
        let info = list(&img).unwrap().get("b0").unwrap().clone();
        let bytes = std::fs::read(&img).unwrap();
        // The directory entry starts with the table offset and size.
        let mut key = info.table_offset.to_be_bytes().to_vec();
        key.extend(info.table_size.to_be_bytes());
        let entry = bytes.windows(12).position(|w| w == key).unwrap() as u64;
        let t = info.table_offset as usize;
        let data = u64::from_be_bytes(bytes[t..t + 8].try_into().unwrap());
        assert_ne!(data, 0);
        (img, entry, info.table_offset, data)
    }

    #[test]
    fn truncated_images_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (img, entry, table, data) = sample(dir.path());
        assert_eq!(
            dirty_ranges(&img, "b0").unwrap().dirty_bytes(),
            3 * M + 64 * K
        );
        let full = std::fs::read(&img).unwrap();
        let cut = dir.path().join("cut.qcow2");
        for len in [
            4,
            7,
            8,
            50,
            72,
            100,
            104,
            111,
            112,
            200,
            4096,
            entry + 10,
            table + 4,
            data + 100,
        ] {
            std::fs::write(&cut, &full[..len as usize]).unwrap();
            let _ = list(&cut);
            assert!(
                matches!(dirty_ranges(&cut, "b0"), Err(BitmapError::Malformed(_))),
                "cut at {len}"
            );
        }
    }

    #[test]
    fn hostile_fields_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (img, entry, _, _) = sample(dir.path());
        let be32 = |v: u32| v.to_be_bytes().to_vec();
        let be64 = |v: u64| v.to_be_bytes().to_vec();
        let cases: Vec<(u64, Vec<u8>)> = vec![
            (4, be32(4)),                   // version
            (4, be32(1)),                   // qcow (version 1)
            (20, be32(40)),                 // cluster_bits
            (20, be32(8)),                  // cluster_bits
            (24, be64(u64::MAX)),           // virtual size
            (72, be64(1 << 5)),             // unknown incompatible feature
            (72, be64(1 << 1)),             // corrupt
            (100, be32(0xffff_fff8)),       // header_length
            (100, be32(100)),               // header_length
            (entry, be64(!0xffff)),         // table offset far beyond the file
            (entry, be64(0x1234)),          // table offset not aligned
            (entry + 8, be32(u32::MAX)),    // table size
            (entry + 16, vec![2]),          // type
            (entry + 15, vec![0x0a]),       // flags: a reserved bit
            (entry + 17, vec![64]),         // granularity bits
            (entry + 17, vec![6]),          // 64-byte granules: the table is too short
            (entry + 18, vec![0xff, 0xff]), // name size
            (entry + 18, vec![0, 0]),       // name size
            (entry + 20, be32(u32::MAX)),   // extra data size
            (entry + 20, be32(8)),          // extra data, not compatible
        ];
        for (i, (at, bytes)) in cases.iter().enumerate() {
            let bad = copy(&img, "bad.qcow2");
            patch(&bad, *at, bytes);
            let r = dirty_ranges(&bad, "b0");
            assert!(r.is_err(), "case {i}: {r:?}");
            eprintln!("case {i}: {}", r.unwrap_err());
        }

        // A table of 2^31 entries (16 GiB) that the virtual size would justify: refused by
        // the file's length before anything is allocated.
        let bad = copy(&img, "bad.qcow2");
        // With 4 KiB granules, an entry covers 64 KiB * 8 * 4 KiB = 2 GiB of the disk.
        patch(&bad, entry + 17, &[12]);
        patch(&bad, 24, &be64((1u64 << 31) * (2 << 30)));
        patch(&bad, entry + 8, &be32(1 << 31));
        assert!(matches!(
            dirty_ranges(&bad, "b0"),
            Err(BitmapError::Malformed(_))
        ));

        // Random bytes after the magic, and random bytes at all.
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let garbage = dir.path().join("garbage");
        for round in 0..200 {
            let mut bytes: Vec<u8> = (0..8192).map(|_| next() as u8).collect();
            if round % 2 == 0 {
                bytes[..4].copy_from_slice(MAGIC);
                bytes[4..8].copy_from_slice(&[0, 0, 0, 3]);
                bytes[20..24].copy_from_slice(&[0, 0, 0, 12]);
                bytes[100..104].copy_from_slice(&[0, 0, 0, 104]);
            }
            std::fs::write(&garbage, &bytes).unwrap();
            let _ = list(&garbage);
            let _ = dirty_ranges(&garbage, "b0");
        }
    }

    #[test]
    fn flipped_bytes_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (img, entry, table, data) = sample(dir.path());
        let full = std::fs::read(&img).unwrap();
        let header_ext = 1024u64;
        let regions = [(0, header_ext), (entry, 64), (table, 16), (data, 1024)];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        for _ in 0..3000 {
            let mut touched = Vec::new();
            for _ in 0..(1 + next() % 4) {
                let (start, len) = regions[(next() % regions.len() as u64) as usize];
                let at = start + next() % len;
                f.write_all_at(&[next() as u8], at).unwrap();
                touched.push(at);
            }
            let _ = list(&img);
            let _ = dirty_ranges(&img, "b0");
            let _ = dirty_ranges(&img, "b1");
            for at in touched {
                f.write_all_at(&full[at as usize..at as usize + 1], at)
                    .unwrap();
            }
        }
        assert_eq!(
            dirty_ranges(&img, "b0").unwrap().dirty_bytes(),
            3 * M + 64 * K
        );
    }
}
