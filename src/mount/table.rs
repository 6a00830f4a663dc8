//! Partition tables read as pure logic: an MBR (primary partitions 1-4, logical ones from 5
//! through the chain of extended boot records) or a GPT (entry N is partition N, as Linux
//! numbers them). Each partition is an offset and a size in bytes within the disk, which is
//! how `mount` attaches it (`losetup --offset --sizelimit`: no partition device nodes needed).

use serde::Serialize;

/// The sector size partition tables are read with.
pub const SECTOR: u64 = 512;
/// The most GPT entries read (the standard table has 128).
const MAX_GPT_ENTRIES: u64 = 4096;
/// The most logical partitions followed in an extended partition's chain.
const MAX_LOGICAL: usize = 256;

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Partition {
    /// Its number as Linux gives it (`vda1`, `vda5`).
    pub number: u32,
    pub offset: u64,
    pub size: u64,
}

/// A disk's partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Table {
    Mbr(Vec<Partition>),
    Gpt(Vec<Partition>),
}

impl Table {
    pub fn partitions(&self) -> &[Partition] {
        match self {
            Table::Mbr(p) | Table::Gpt(p) => p,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("no partition table (no MBR signature)")]
    None,
    #[error("a damaged partition table: {0}")]
    Damaged(String),
    #[error("read at offset {offset}")]
    Read {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Reads `buf.len()` bytes at an offset of the disk.
pub type ReadAt<'a> = dyn FnMut(u64, &mut [u8]) -> std::io::Result<()> + 'a;

fn read(r: &mut ReadAt, offset: u64, len: usize) -> Result<Vec<u8>, TableError> {
    let mut buf = vec![0u8; len];
    r(offset, &mut buf).map_err(|source| TableError::Read { offset, source })?;
    Ok(buf)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// An MBR entry: (type, first sector, sectors).
fn mbr_entries(sector: &[u8]) -> [(u8, u64, u64); 4] {
    let mut out = [(0u8, 0u64, 0u64); 4];
    for (i, e) in out.iter_mut().enumerate() {
        let at = 446 + 16 * i;
        *e = (
            sector[at + 4],
            u32_at(sector, at + 8) as u64,
            u32_at(sector, at + 12) as u64,
        );
    }
    out
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

fn has_signature(sector: &[u8]) -> bool {
    sector.len() >= 512 && sector[510] == 0x55 && sector[511] == 0xaa
}

/// The partition table of a disk of `disk_size` bytes read through `r`.
pub fn read_table(r: &mut ReadAt, disk_size: u64) -> Result<Table, TableError> {
    let mbr = read(r, 0, SECTOR as usize)?;
    if !has_signature(&mbr) {
        return Err(TableError::None);
    }
    let entries = mbr_entries(&mbr);
    if entries.iter().any(|e| e.0 == 0xee) {
        return gpt(r, disk_size);
    }
    let inside =
        |p: &Partition| p.size > 0 && p.offset.checked_add(p.size).is_some_and(|e| e <= disk_size);
    let mut parts = Vec::new();
    for (i, &(kind, start, sectors)) in entries.iter().enumerate() {
        if kind == 0 || sectors == 0 {
            continue;
        }
        let p = Partition {
            number: i as u32 + 1,
            offset: start * SECTOR,
            size: sectors * SECTOR,
        };
        if !inside(&p) {
            return Err(TableError::Damaged(format!(
                "partition {} ends past the disk's end",
                p.number
            )));
        }
        if is_extended(kind) {
            let logical = logical(r, start, sectors)?;
            if let Some(l) = logical.iter().find(|l| !inside(l)) {
                return Err(TableError::Damaged(format!(
                    "partition {} ends past the disk's end",
                    l.number
                )));
            }
            parts.extend(logical);
        } else {
            parts.push(p);
        }
    }
    parts.sort_by_key(|p| p.number);
    Ok(Table::Mbr(parts))
}

/// The logical partitions of the extended partition at sector `ext` (of `ext_len` sectors):
/// each extended boot record holds one, and the link to the next record (relative to `ext`).
fn logical(r: &mut ReadAt, ext: u64, ext_len: u64) -> Result<Vec<Partition>, TableError> {
    let mut out = Vec::new();
    let mut ebr = ext;
    let mut seen = std::collections::HashSet::new();
    loop {
        if !seen.insert(ebr) || out.len() >= MAX_LOGICAL {
            return Err(TableError::Damaged(
                "the chain of logical partitions loops".into(),
            ));
        }
        if ebr < ext || ebr >= ext + ext_len {
            return Err(TableError::Damaged(
                "a logical partition's record is outside its extended partition".into(),
            ));
        }
        let sector = read(r, ebr * SECTOR, SECTOR as usize)?;
        if !has_signature(&sector) {
            return Err(TableError::Damaged(format!(
                "no signature in the extended boot record at sector {ebr}"
            )));
        }
        let e = mbr_entries(&sector);
        let (kind, start, sectors) = e[0];
        if kind != 0 && sectors > 0 {
            out.push(Partition {
                number: 5 + out.len() as u32,
                offset: (ebr + start) * SECTOR,
                size: sectors * SECTOR,
            });
        }
        let (next_kind, next, _) = e[1];
        if next_kind == 0 || !is_extended(next_kind) {
            return Ok(out);
        }
        ebr = ext + next;
    }
}

/// A GPT: its header at LBA 1 (512-byte sectors, or 4096-byte ones), its entries where the
/// header says. Unused entries (a zero type) are skipped; numbers are entry indexes + 1.
fn gpt(r: &mut ReadAt, disk_size: u64) -> Result<Table, TableError> {
    for sector in [SECTOR, 4096] {
        if disk_size < 2 * sector {
            continue;
        }
        let h = read(r, sector, 92)?;
        if &h[..8] != b"EFI PART" {
            continue;
        }
        let entries_lba = u64_at(&h, 72);
        let count = u32_at(&h, 80) as u64;
        let entry_size = u32_at(&h, 84) as u64;
        if !(128..=4096).contains(&entry_size) || count > MAX_GPT_ENTRIES {
            return Err(TableError::Damaged(format!(
                "GPT header: {count} entries of {entry_size} bytes"
            )));
        }
        let at = entries_lba
            .checked_mul(sector)
            .filter(|a| a.saturating_add(count * entry_size) <= disk_size)
            .ok_or_else(|| TableError::Damaged("GPT entries past the disk's end".into()))?;
        let table = read(r, at, (count * entry_size) as usize)?;
        let mut parts = Vec::new();
        for i in 0..count as usize {
            let e = &table[i * entry_size as usize..][..entry_size as usize];
            if e[..16].iter().all(|&b| b == 0) {
                continue;
            }
            let (first, last) = (u64_at(e, 32), u64_at(e, 40));
            let end = last
                .checked_add(1)
                .and_then(|l| l.checked_mul(sector))
                .filter(|&end| last >= first && end <= disk_size)
                .ok_or_else(|| {
                    TableError::Damaged(format!("GPT partition {} is out of the disk", i + 1))
                })?;
            parts.push(Partition {
                number: i as u32 + 1,
                offset: first * sector,
                size: end - first * sector,
            });
        }
        return Ok(Table::Gpt(parts));
    }
    Err(TableError::Damaged(
        "a protective MBR without a GPT header".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(disk: &[u8]) -> impl FnMut(u64, &mut [u8]) -> std::io::Result<()> + '_ {
        move |off, buf| {
            let off = off as usize;
            if off + buf.len() > disk.len() {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            buf.copy_from_slice(&disk[off..off + buf.len()]);
            Ok(())
        }
    }

    fn entry(sector: &mut [u8], i: usize, kind: u8, start: u32, len: u32) {
        let at = 446 + 16 * i;
        sector[at + 4] = kind;
        sector[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
        sector[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
        sector[510] = 0x55;
        sector[511] = 0xaa;
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn an_mbr_with_primary_and_logical_partitions_numbers_them_as_linux_does() {
        let mut disk = vec![0u8; (64 * MIB) as usize];
        // 1: sectors 2048..+8192; 2: extended 20480..+100000; 4: 122880..+2048.
        entry(&mut disk, 0, 0x83, 2048, 8192);
        entry(&mut disk, 1, 0x05, 20480, 100000);
        entry(&mut disk, 3, 0x82, 122880, 2048);
        // Logical 5 at 20480+2048, link to the next record at ext+40960; logical 6 there.
        let ebr1 = 20480 * 512;
        entry(&mut disk[ebr1..ebr1 + 512], 0, 0x83, 2048, 4096);
        entry(&mut disk[ebr1..ebr1 + 512], 1, 0x05, 40960, 10000);
        let ebr2 = (20480 + 40960) * 512;
        entry(&mut disk[ebr2..ebr2 + 512], 0, 0x83, 2048, 6000);
        let t = read_table(&mut reader(&disk), disk.len() as u64).unwrap();
        let p = |number, offset: u64, size: u64| Partition {
            number,
            offset: offset * 512,
            size: size * 512,
        };
        assert_eq!(
            t,
            Table::Mbr(vec![
                p(1, 2048, 8192),
                p(4, 122880, 2048),
                p(5, 20480 + 2048, 4096),
                p(6, 20480 + 40960 + 2048, 6000),
            ])
        );
    }

    #[test]
    fn bad_tables_are_errors_not_guesses() {
        let mut disk = vec![0u8; (8 * MIB) as usize];
        assert!(matches!(
            read_table(&mut reader(&disk), disk.len() as u64),
            Err(TableError::None)
        ));
        // Past the end of the disk.
        entry(&mut disk, 0, 0x83, 2048, 1 << 20);
        assert!(matches!(
            read_table(&mut reader(&disk), disk.len() as u64),
            Err(TableError::Damaged(_))
        ));
        // A chain of extended records that loops.
        let mut disk = vec![0u8; (8 * MIB) as usize];
        entry(&mut disk, 0, 0x05, 2048, 8192);
        let ebr = 2048 * 512;
        entry(&mut disk[ebr..ebr + 512], 0, 0x83, 63, 100);
        entry(&mut disk[ebr..ebr + 512], 1, 0x05, 0, 100);
        let e = read_table(&mut reader(&disk), disk.len() as u64).unwrap_err();
        assert!(e.to_string().contains("loops"), "{e}");
        // A protective MBR without a GPT.
        let mut disk = vec![0u8; (8 * MIB) as usize];
        entry(&mut disk, 0, 0xee, 1, 16383);
        assert!(matches!(
            read_table(&mut reader(&disk), disk.len() as u64),
            Err(TableError::Damaged(_))
        ));
    }

    fn gpt_disk(size: u64, parts: &[(usize, u64, u64)]) -> Vec<u8> {
        let mut disk = vec![0u8; size as usize];
        entry(&mut disk, 0, 0xee, 1, (size / 512 - 1) as u32);
        let h = 512;
        disk[h..h + 8].copy_from_slice(b"EFI PART");
        disk[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
        disk[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
        disk[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
        for &(i, first, last) in parts {
            let e = 1024 + 128 * i;
            disk[e..e + 16].copy_from_slice(&[0xaf; 16]);
            disk[e + 32..e + 40].copy_from_slice(&first.to_le_bytes());
            disk[e + 40..e + 48].copy_from_slice(&last.to_le_bytes());
        }
        disk
    }

    #[test]
    fn a_gpt_gives_its_used_entries_by_index() {
        let disk = gpt_disk(16 * MIB, &[(0, 2048, 4095), (2, 8192, 16383)]);
        let t = read_table(&mut reader(&disk), disk.len() as u64).unwrap();
        assert_eq!(
            t,
            Table::Gpt(vec![
                Partition {
                    number: 1,
                    offset: MIB,
                    size: MIB
                },
                Partition {
                    number: 3,
                    offset: 4 * MIB,
                    size: 4 * MIB
                },
            ])
        );
        let bad = gpt_disk(16 * MIB, &[(0, 2048, 1 << 40)]);
        let e = read_table(&mut reader(&bad), bad.len() as u64).unwrap_err();
        assert!(e.to_string().contains("out of the disk"), "{e}");
    }

    /// A table `sfdisk` wrote (a real tool, not this module's idea of the format).
    #[test]
    fn tables_written_by_sfdisk_read_as_sfdisk_lists_them() {
        for (label, script) in [
            (
                "gpt",
                "label: gpt\nstart=2048, size=4096\nstart=8192, size=8192\n",
            ),
            (
                "dos",
                "label: dos\nstart=2048, size=4096\nstart=8192, type=5\nstart=10240, size=2048\nstart=14336, size=1024\n",
            ),
        ] {
            let f = tempfile::NamedTempFile::new().unwrap();
            f.as_file().set_len(16 * MIB).unwrap();
            let mut child = std::process::Command::new("sfdisk")
                .arg("--quiet")
                .arg(f.path())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("sfdisk (package fdisk) runs");
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            assert!(child.wait().unwrap().success(), "{label}");
            let listed = std::process::Command::new("sfdisk")
                .arg("--json")
                .arg(f.path())
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
            let mut want: Vec<(u32, u64, u64)> = v["partitiontable"]["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| !matches!(p["type"].as_str(), Some("5" | "f" | "85")))
                .map(|p| {
                    let node = p["node"].as_str().unwrap();
                    let n: u32 = node
                        .rsplit(|c: char| !c.is_ascii_digit())
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap();
                    (
                        n,
                        p["start"].as_u64().unwrap() * 512,
                        p["size"].as_u64().unwrap() * 512,
                    )
                })
                .collect();
            want.sort();
            let disk = std::fs::read(f.path()).unwrap();
            let t = read_table(&mut reader(&disk), disk.len() as u64).unwrap();
            let got: Vec<(u32, u64, u64)> = t
                .partitions()
                .iter()
                .map(|p| (p.number, p.offset, p.size))
                .collect();
            assert_eq!(got, want, "{label}");
            assert_eq!(matches!(t, Table::Gpt(_)), label == "gpt");
            if label == "dos" {
                assert!(got.iter().any(|p| p.0 == 5) && got.iter().any(|p| p.0 == 6));
            }
        }
    }
}
