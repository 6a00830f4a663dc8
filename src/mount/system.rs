//! The host tools `mount` drives (util-linux: `blkid`, `losetup`, `mount`, `umount`; never
//! through a shell) and the pure decisions around them: how to mount a file system type,
//! where, and what `/proc/self/mountinfo` and `blkid -o export` say.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::MountError;

/// Runs `program args` and returns its stdout; its stderr is the error when it fails.
pub fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<String, MountError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| MountError::Tool {
            program: program.into(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        let args: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
        return Err(MountError::Tool {
            program: format!("{program} {}", args.join(" ")),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The options every file system of a backup is mounted with besides its own: no set-uid
/// bits, no device nodes, nothing executed from it.
pub const HOST_SAFE: &str = "nosuid,nodev,noexec";

/// How to mount a file system of type `fstype` (as `blkid` names it): the kernel's type and
/// the options; or why it is not mounted. Always read-only, and the journal is never replayed
/// (it would write): ext3/ext4 `noload`, xfs `norecovery` (and `nouuid`: two backups of one
/// VM have the same UUID), btrfs `rescue=nologreplay`.
pub fn how_to_mount(fstype: &str) -> Result<(&'static str, &'static str), String> {
    Ok(match fstype {
        "ext4" => ("ext4", "ro,noload"),
        "ext3" => ("ext3", "ro,noload"),
        "ext2" => ("ext2", "ro"),
        "xfs" => ("xfs", "ro,norecovery,nouuid"),
        "btrfs" => ("btrfs", "ro,rescue=nologreplay"),
        "vfat" => ("vfat", "ro"),
        "exfat" => ("exfat", "ro"),
        "ntfs" => ("ntfs3", "ro"),
        "iso9660" => ("iso9660", "ro"),
        "udf" => ("udf", "ro"),
        "f2fs" => ("f2fs", "ro"),
        "swap" => return Err("swap space".into()),
        "LVM2_member" => {
            return Err("an LVM physical volume (its logical volumes are not mounted)".into())
        }
        "crypto_LUKS" => return Err("encrypted (LUKS)".into()),
        "linux_raid_member" => return Err("a software RAID member".into()),
        "zfs_member" => return Err("a ZFS pool member".into()),
        other => {
            return Err(format!(
                "a {other} file system, which this host cannot mount"
            ))
        }
    })
}

/// The folder a file system is mounted at, under DIR: `vdb` for a whole disk, `vdap1` for
/// partition 1 of `vda`.
pub fn mount_name(target: &str, partition: Option<u32>) -> String {
    match partition {
        Some(n) => format!("{target}p{n}"),
        None => target.to_string(),
    }
}

/// A disk target safe as a file name (`vda`, `sdb`, `hdc`): letters, digits, `_`, `-`.
pub fn safe_target(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 32
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `blkid -o export`'s `KEY=value` lines.
pub fn parse_export(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// What `blkid -p` finds in `file` (from `offset`, `size` bytes): its `TYPE` or `PTTYPE`
/// and the rest; empty when it finds nothing (its exit status 2).
pub fn probe(file: &Path, at: Option<(u64, u64)>) -> Result<BTreeMap<String, String>, MountError> {
    let mut cmd = Command::new("blkid");
    cmd.args(["-p", "-o", "export"]);
    if let Some((offset, size)) = at {
        cmd.arg("-O")
            .arg(offset.to_string())
            .arg("-S")
            .arg(size.to_string());
    }
    let out = cmd.arg(file).output().map_err(|e| MountError::Tool {
        program: "blkid".into(),
        detail: e.to_string(),
    })?;
    match out.status.code() {
        Some(0) => Ok(parse_export(&String::from_utf8_lossy(&out.stdout))),
        Some(2) => Ok(BTreeMap::new()),
        _ => Err(MountError::Tool {
            program: format!("blkid -p {}", file.display()),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }),
    }
}

/// Unescapes a field of `/proc/self/mountinfo` (`\040` for a space, and so on).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let n = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(n);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount points in `mountinfo` (the text of `/proc/self/mountinfo`) with their file
/// system type.
pub fn mount_points(mountinfo: &str) -> Vec<(PathBuf, String)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((
                PathBuf::from(unescape(f.get(4)?)),
                f.get(sep + 1)?.to_string(),
            ))
        })
        .collect()
}

/// The current mount points.
pub fn current_mounts() -> Vec<(PathBuf, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| mount_points(&s))
        .unwrap_or_default()
}

pub fn is_mounted(path: &Path) -> bool {
    current_mounts().iter().any(|(p, _)| p == path)
}

/// The loop devices whose backing file is under `folder` (from sysfs), as `/dev/loopN`.
pub fn loops_under(folder: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(b.trim_end_matches('\n')).starts_with(folder) {
            out.push(PathBuf::from("/dev").join(name));
        }
    }
    out.sort();
    out
}

/// Whether loop device `dev` is backed by a file under `folder`.
pub fn loop_backed_under(dev: &Path, folder: &Path) -> bool {
    let Some(name) = dev.file_name() else {
        return false;
    };
    std::fs::read_to_string(Path::new("/sys/block").join(name).join("loop/backing_file"))
        .is_ok_and(|b| Path::new(b.trim_end_matches('\n')).starts_with(folder))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_systems_mount_read_only_without_replaying_journals() {
        assert_eq!(how_to_mount("ext4"), Ok(("ext4", "ro,noload")));
        assert_eq!(how_to_mount("xfs"), Ok(("xfs", "ro,norecovery,nouuid")));
        assert_eq!(how_to_mount("vfat"), Ok(("vfat", "ro")));
        for t in ["swap", "LVM2_member", "crypto_LUKS", "weirdfs"] {
            let why = how_to_mount(t).unwrap_err();
            assert!(!why.is_empty(), "{t}");
        }
        for (_, (_, opts)) in ["ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "ntfs"]
            .iter()
            .map(|t| (t, how_to_mount(t).unwrap()))
        {
            assert!(opts.starts_with("ro"), "{opts}");
        }
    }

    #[test]
    fn names_of_mount_folders_and_targets() {
        assert_eq!(mount_name("vdb", None), "vdb");
        assert_eq!(mount_name("vda", Some(5)), "vdap5");
        assert!(safe_target("vda") && safe_target("sd_b-1"));
        for bad in ["", "..", "a/b", "x y", &"a".repeat(33)] {
            assert!(!safe_target(bad), "{bad}");
        }
    }

    #[test]
    fn blkid_export_and_mountinfo_are_read() {
        let m = parse_export("DEVNAME=/x\nTYPE=ext4\nUUID=ab-cd\nPTTYPE=gpt\n");
        assert_eq!(m["TYPE"], "ext4");
        assert_eq!(m["PTTYPE"], "gpt");
        let info = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    40 22 0:50 / /mnt/my\\040dir rw,nosuid - fuse.vmbackup vmbackup ro\n\
                    41 22 7:0 / /mnt/x/vdb ro master:3 - ext4 /dev/loop0 ro,noload\n";
        assert_eq!(
            mount_points(info),
            vec![
                (PathBuf::from("/"), "ext4".to_string()),
                (PathBuf::from("/mnt/my dir"), "fuse.vmbackup".to_string()),
                (PathBuf::from("/mnt/x/vdb"), "ext4".to_string()),
            ]
        );
    }
}
