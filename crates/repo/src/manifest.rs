//! One manifest per backup: what was backed up, when, how consistently, and where its data is.

use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Manifest {
    pub format_version: u32,
    pub id: String,
    pub vm_name: String,
    pub vm_uuid: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub ended_at: String,
    /// `application` (frozen through the agent, or the VM was off) or `crash`.
    pub consistency: String,
    pub consistency_reason: Option<String>,
    pub freeze_ms: Option<u64>,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub disks: Vec<DiskEntry>,
    pub nics: Vec<NicEntry>,
    /// The object holding the verbatim inactive domain XML (mode 0600).
    pub domain_xml_object: String,
    pub schedule: Option<String>,
    /// The schedule occurrence this backup was made for (RFC 3339, UTC); retention orders and
    /// ages a schedule's backups by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_for: Option<String>,
    /// Labels given with `backup --tag` (short names: letters, digits, `.`, `-`, `_`, `+`),
    /// by which `list --tag` and `prune --tag` pick backups. Absent in older manifests and
    /// when none was given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Bytes this backup added to the repository.
    pub stored_bytes: u64,
    /// Bytes of data (non-zero chunks) read from the disks.
    pub logical_bytes: u64,
    /// The VM's files besides its disks: UEFI NVRAM and TPM state. Absent in backups made
    /// before they were recorded (and for plain QEMU VMs): such a backup holds neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_state: Option<VmState>,
}

/// The VM's firmware variables and TPM state as they were when the backup read them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VmState {
    /// When they were read (RFC 3339, UTC): right after the disk snapshot, or with the VM
    /// shut off.
    pub read_at: String,
    /// The NVRAM file of `<os><nvram>` (OVMF variables); `None`: the VM has none.
    pub nvram: Option<StateFile>,
    /// The emulated TPM's state; `None`: the VM has no emulated TPM.
    pub tpm: Option<TpmState>,
}

/// The state folder of an emulated TPM (libvirt's `swtpm/<uuid>`), its folders and files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TpmState {
    /// `<tpm model=...>`, e.g. `tpm-crb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `<backend version=...>`, e.g. `2.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The VM's state folder, e.g. `/var/lib/libvirt/swtpm/<uuid>`.
    pub dir: String,
    /// That folder and the folders in it (e.g. its `tpm2`), parents first.
    pub dirs: Vec<StateDir>,
    /// The state files (e.g. `tpm2/tpm2-00.permall`); paths are absolute.
    pub files: Vec<StateFile>,
}

/// A folder of the VM's state, with its owner and mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StateDir {
    pub path: String,
    pub owner: Owner,
}

/// A file of the VM's state: where it was, its content (an object) and its owner and mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StateFile {
    pub path: String,
    pub size: u64,
    /// SHA-256 of the content, lower-case hex.
    pub sha256: String,
    /// The object holding the content.
    pub object: String,
    pub owner: Owner,
}

/// Owner and permission bits of a file or folder; the names (when the host knew them) are
/// preferred over the numbers when it is put back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Permission bits, e.g. `0o600` (shown in octal by `show`).
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DiskEntry {
    pub target: String,
    pub format: String,
    pub virtual_size: u64,
    pub allocated_size: u64,
    pub source: String,
    pub chunk_size: u64,
    pub index_object: String,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    /// How the disk was read (absent in backups made before this was recorded: full reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<DiskRead>,
}

/// How a disk was read for a backup: all of it, or only what changed since an earlier backup
/// (the rest of its index taken from that backup's). Either way the index is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DiskRead {
    /// `full` or `incremental`.
    pub mode: String,
    /// The backup whose index an incremental read started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub based_on: Option<String>,
    /// Why everything was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    /// Bytes read from the image (data and zero regions alike are counted only when read).
    pub bytes_read: u64,
    /// Of which unchanged chunks read again to check them against the base backup's digests.
    #[serde(default)]
    pub checked_bytes: u64,
    /// When the last full read of this disk's chain was made (RFC 3339, UTC).
    pub full_at: String,
    /// The image file as it was read, when the VM was shut off: an unchanged file needs no
    /// read next time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileState>,
    /// The persistent dirty bitmap in the disk's image that records every write since this
    /// backup's read: the next backup may read only the regions it marks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<String>,
}

/// What tells an image file unchanged: its identity, size and both change times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FileState {
    pub dev: u64,
    pub inode: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl FileState {
    /// The state of the file at `path` now.
    pub fn of(path: &std::path::Path) -> std::io::Result<FileState> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Ok(FileState {
            dev: m.dev(),
            inode: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NicEntry {
    pub mac: Option<String>,
    pub model: Option<String>,
    pub kind: String,
    pub source: Option<String>,
    pub ips: Vec<String>,
}

/// `<vm>-<yyyymmddThhmmssZ>-<4 hex>`: sortable by time, unique across quick successions.
pub fn new_backup_id(vm_name: &str, started_unix: u64) -> String {
    let ts = jiff::Timestamp::from_second(started_unix as i64)
        .map(|t| t.strftime("%Y%m%dT%H%M%SZ").to_string())
        .unwrap_or_else(|_| started_unix.to_string());
    let mut r = [0u8; 2];
    if getrandom(&mut r).is_err() {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id();
        r = [(n >> 8) as u8, n as u8];
    }
    format!("{vm_name}-{ts}-{:02x}{:02x}", r[0], r[1])
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_carry_the_utc_time_and_differ() {
        let a = super::new_backup_id("web01", 1_795_000_000);
        assert!(a.starts_with("web01-20261118T110640Z-"), "{a}");
        let ids: std::collections::HashSet<String> =
            (0..20).map(|_| super::new_backup_id("x", 0)).collect();
        assert!(ids.len() > 1);
        assert!(super::new_backup_id("x", 0).starts_with("x-19700101T000000Z-"));
    }
}
