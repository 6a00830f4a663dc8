//! Pre-flight: what is refused before anything is touched. Each check carries the figure that
//! was found and the limit it was held against, so a refusal says both.
//!
//! Disk rules: CD-ROMs, floppies and read-only disks are skipped (reported, not backed up);
//! disks that cannot be snapshotted to a file overlay (block devices, network and volume
//! disks, shareable disks, LUN passthrough) refuse the whole VM.

use std::path::Path;

use serde::Serialize;

pub const GIB: u64 = 1 << 30;

/// Limits and ratios; the defaults are the product's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Limits {
    /// No single disk's virtual size above this.
    pub max_disk_bytes: u64,
    /// All disks' virtual sizes plus memory at most this.
    pub max_total_bytes: u64,
    /// Free space needed where the overlays go, as a share of disks plus memory.
    pub overlay_headroom_ratio: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_disk_bytes: 2032 * GIB,
            max_total_bytes: 4000 * GIB,
            overlay_headroom_ratio: 0.20,
        }
    }
}

/// What is known of one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct DiskFacts {
    pub target: String,
    /// `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// `file`, `block`, `network`, `volume`, ...
    pub kind: String,
    pub source: Option<String>,
    pub readonly: bool,
    pub shareable: bool,
    pub virtual_size: u64,
    pub allocated_size: u64,
    /// The backing file named in the image's header: an image that is not a whole disk.
    pub backing_file: Option<String>,
    /// The source file does not exist (nothing else about it is known).
    pub missing: bool,
}

/// A place on the host and its free space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Space {
    pub path: String,
    pub free_bytes: u64,
    /// The file system's device number (`st_dev`): what goes onto one file system is added up.
    #[serde(skip)]
    pub device: Option<u64>,
}

/// A folder vmbackup creates files in (overlays) or talks to sockets in (plain QEMU VMs), as
/// root: who owns it and who may write to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Folder {
    pub path: String,
    pub owner: u32,
    /// The permission bits (e.g. 0o755).
    pub mode: u32,
}

impl Folder {
    pub fn of(path: &Path) -> std::io::Result<Folder> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Folder {
            path: path.display().to_string(),
            owner: m.uid(),
            mode: m.mode() & 0o7777,
        })
    }

    /// Why files vmbackup makes or opens here as root cannot be trusted, if they cannot: the
    /// folder is writable by its group or by everyone (the sticky bit does not help: anyone
    /// could plant a file or a symlink under a name vmbackup is about to use, or pose as a
    /// VM's QMP socket), or it belongs to another user than root or this process's.
    pub fn untrusted(&self) -> Option<String> {
        let me = nix::unistd::geteuid().as_raw();
        if self.mode & 0o022 != 0 {
            Some(format!(
                "{} is {}-writable (mode {:04o}); only its owner may write to it",
                self.path,
                if self.mode & 0o002 != 0 {
                    "world"
                } else {
                    "group"
                },
                self.mode
            ))
        } else if self.owner != 0 && self.owner != me {
            Some(format!(
                "{} belongs to user {}, not to root (or uid {me}, which runs vmbackup)",
                self.path, self.owner
            ))
        } else {
            None
        }
    }
}

/// Everything the checks look at.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Facts {
    pub vm: String,
    pub memory_bytes: u64,
    pub disks: Vec<DiskFacts>,
    /// Each distinct filesystem the overlays will be created on (empty for a VM that is off:
    /// it is backed up without a snapshot).
    pub overlay_spaces: Vec<Space>,
    /// Each distinct folder the overlays will be created in (as `overlay_spaces`).
    pub overlay_folders: Vec<Folder>,
    /// `None` for a repository on an object store.
    pub repository: Option<Space>,
}

#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub found: u64,
    pub limit: u64,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct SkippedDisk {
    pub target: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Report {
    pub vm: String,
    pub ok: bool,
    pub checks: Vec<Check>,
    pub skipped_disks: Vec<SkippedDisk>,
    /// The disks that will be backed up.
    pub disks: Vec<String>,
}

impl Report {
    /// The failed checks, one line each.
    pub fn refusals(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.message.as_str())
            .collect()
    }
}

/// Bytes as GiB with two decimals, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB as f64)
}

/// Why a disk is skipped (`Ok(Some)`), refused (`Err`), or backed up (`Ok(None)`).
pub fn disk_rule(d: &DiskFacts) -> Result<Option<String>, String> {
    match d.device.as_str() {
        "cdrom" | "floppy" => return Ok(Some(format!("{}: skipped ({})", d.target, d.device))),
        "lun" => {
            return Err(format!(
                "{}: LUN passthrough disks cannot be snapshotted",
                d.target
            ))
        }
        _ => {}
    }
    if d.readonly {
        return Ok(Some(format!("{}: skipped (read-only)", d.target)));
    }
    if d.shareable {
        return Err(format!(
            "{}: shareable disks cannot be snapshotted consistently",
            d.target
        ));
    }
    if d.kind != "file" {
        return Err(format!(
            "{}: {} disks cannot be snapshotted (only file-backed disks are supported)",
            d.target, d.kind
        ));
    }
    if d.source.is_none() {
        return Err(format!("{}: the disk has no source file", d.target));
    }
    Ok(None)
}

pub fn evaluate(f: &Facts, limits: &Limits) -> Report {
    let mut checks = Vec::new();
    let mut skipped = Vec::new();
    let mut backed_up = Vec::new();
    for d in &f.disks {
        match disk_rule(d) {
            Ok(Some(reason)) => skipped.push(SkippedDisk {
                target: d.target.clone(),
                reason,
            }),
            Ok(None) => {
                if d.missing {
                    checks.push(Check {
                        name: format!("disk-supported:{}", d.target),
                        ok: false,
                        found: 0,
                        limit: 0,
                        message: format!(
                            "{}: the image {:?} does not exist (libvirt's XML keeps no newline \
                             in a path: it reads back as a space)",
                            d.target,
                            d.source.as_deref().unwrap_or_default()
                        ),
                    });
                }
                if let Some(b) = &d.backing_file {
                    // A vmbackup overlay an interrupted run left: `recover` (and every
                    // backup, first) puts the VM back on its image.
                    let leftover = d.source.as_deref().is_some_and(|src| {
                        Path::new(src)
                            .file_name()
                            .and_then(|f| f.to_str())
                            .is_some_and(|f| f.contains(".vmbackup-") && f.ends_with(".qcow2"))
                    });
                    checks.push(Check {
                        name: format!("disk-supported:{}", d.target),
                        ok: false,
                        found: 0,
                        limit: 0,
                        message: if leftover {
                            format!(
                                "{}: the VM runs on an overlay an interrupted backup left ({}); \
                                 `vmbackup recover` or the next backup puts it back on {b}",
                                d.target,
                                d.source.as_deref().unwrap_or_default()
                            )
                        } else {
                            format!(
                                "{}: the image has a backing file ({b}); only whole images \
                                 (no backing chain) are supported",
                                d.target
                            )
                        },
                    });
                }
                backed_up.push(d)
            }
            Err(message) => checks.push(Check {
                name: format!("disk-supported:{}", d.target),
                ok: false,
                found: 0,
                limit: 0,
                message,
            }),
        }
    }
    for d in &backed_up {
        let ok = d.virtual_size <= limits.max_disk_bytes;
        checks.push(Check {
            name: format!("disk-size:{}", d.target),
            ok,
            found: d.virtual_size,
            limit: limits.max_disk_bytes,
            message: format!(
                "disk {}: virtual size {} {} the limit of {}",
                d.target,
                gib(d.virtual_size),
                if ok { "is within" } else { "exceeds" },
                gib(limits.max_disk_bytes)
            ),
        });
    }
    let disks_total: u64 = backed_up.iter().map(|d| d.virtual_size).sum();
    let total = disks_total.saturating_add(f.memory_bytes);
    let ok = total <= limits.max_total_bytes;
    checks.push(Check {
        name: "total-size".into(),
        ok,
        found: total,
        limit: limits.max_total_bytes,
        message: format!(
            "disks ({}) plus memory ({}) = {} {} the limit of {}",
            gib(disks_total),
            gib(f.memory_bytes),
            gib(total),
            if ok { "is within" } else { "exceeds" },
            gib(limits.max_total_bytes)
        ),
    });
    let headroom = (total as f64 * limits.overlay_headroom_ratio).ceil() as u64;
    for s in &f.overlay_spaces {
        let ok = s.free_bytes >= headroom;
        checks.push(Check {
            name: "overlay-space".into(),
            ok,
            found: s.free_bytes,
            limit: headroom,
            message: format!(
                "free space for snapshot overlays in {}: {}, {} {} ({:.0}% of disks plus memory)",
                s.path,
                gib(s.free_bytes),
                if ok { "needs" } else { "less than the" },
                gib(headroom),
                limits.overlay_headroom_ratio * 100.0
            ),
        });
    }
    for folder in &f.overlay_folders {
        let why = folder.untrusted();
        checks.push(Check {
            name: "overlay-folder".into(),
            ok: why.is_none(),
            found: folder.mode as u64,
            limit: 0o755,
            message: match why {
                Some(why) => format!("snapshot overlays cannot be created safely: {why}"),
                None => format!(
                    "snapshot overlays go into {} (mode {:04o}, owner {})",
                    folder.path, folder.mode, folder.owner
                ),
            },
        });
    }
    let estimate: u64 = backed_up.iter().map(|d| d.allocated_size).sum();
    // The repository on the file system of overlays: the copy fills what the overlays need
    // to grow into (and a full overlay pauses the VM), so both must fit at once.
    let Some(repository) = &f.repository else {
        return Report {
            vm: f.vm.clone(),
            ok: checks.iter().all(|c| c.ok),
            checks,
            skipped_disks: skipped,
            disks: backed_up.iter().map(|d| d.target.clone()).collect(),
        };
    };
    for s in &f.overlay_spaces {
        if s.device.is_none() || s.device != repository.device {
            continue;
        }
        let need = headroom.saturating_add(estimate);
        let ok = s.free_bytes >= need;
        checks.push(Check {
            name: "shared-space".into(),
            ok,
            found: s.free_bytes,
            limit: need,
            message: format!(
                "the repository {} and the snapshot overlays in {} share one file system with \
                 {} free, {} the {} they need together ({} of overlay headroom plus {} for \
                 the backup)",
                repository.path,
                s.path,
                gib(s.free_bytes),
                if ok { "within" } else { "less than" },
                gib(need),
                gib(headroom),
                gib(estimate)
            ),
        });
    }
    let ok = repository.free_bytes >= estimate;
    checks.push(Check {
        name: "repository-space".into(),
        ok,
        found: repository.free_bytes,
        limit: estimate,
        message: format!(
            "free space in the repository {}: {}, {} {} (the disks' allocated size)",
            repository.path,
            gib(repository.free_bytes),
            if ok { "needs at most" } else { "less than the" },
            gib(estimate)
        ),
    });
    Report {
        vm: f.vm.clone(),
        ok: checks.iter().all(|c| c.ok),
        checks,
        skipped_disks: skipped,
        disks: backed_up.iter().map(|d| d.target.clone()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(target: &str, size: u64) -> DiskFacts {
        DiskFacts {
            target: target.into(),
            device: "disk".into(),
            kind: "file".into(),
            source: Some(format!("/images/{target}.qcow2")),
            readonly: false,
            shareable: false,
            virtual_size: size,
            allocated_size: size / 10,
            backing_file: None,
            missing: false,
        }
    }

    fn facts(disks: Vec<DiskFacts>, memory: u64) -> Facts {
        Facts {
            vm: "vm1".into(),
            memory_bytes: memory,
            disks,
            overlay_spaces: vec![Space {
                path: "/images".into(),
                free_bytes: 10_000 * GIB,
                device: Some(1),
            }],
            overlay_folders: vec![Folder {
                path: "/images".into(),
                owner: 0,
                mode: 0o711,
            }],
            repository: Some(Space {
                path: "/repo".into(),
                free_bytes: 10_000 * GIB,
                device: Some(2),
            }),
        }
    }

    fn failed(r: &Report) -> Vec<String> {
        r.checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.clone())
            .collect()
    }

    #[test]
    fn a_backing_file_is_refused_and_a_leftover_overlay_says_how_to_put_it_back() {
        let mut chained = disk("vda", GIB);
        chained.backing_file = Some("/images/base.qcow2".into());
        let mut leftover = disk("vdb", GIB);
        leftover.source = Some("/images/vm1.vdb.vmbackup-20270101T000000Z-ab12.qcow2".into());
        leftover.backing_file = Some("/images/vdb.qcow2".into());
        let r = evaluate(&facts(vec![chained, leftover], GIB), &Limits::default());
        assert_eq!(failed(&r), ["disk-supported:vda", "disk-supported:vdb"]);
        let why = r.refusals();
        assert!(
            why[0].contains("backing file (/images/base.qcow2)"),
            "{why:?}"
        );
        assert!(why[1].contains("vmbackup recover"), "{why:?}");
    }

    #[test]
    fn disk_size_limit_is_inclusive() {
        let r = evaluate(
            &facts(vec![disk("vda", 2032 * GIB)], GIB),
            &Limits::default(),
        );
        assert!(r.ok, "{:?}", r.refusals());
        let r = evaluate(
            &facts(vec![disk("vda", 2032 * GIB + 1)], GIB),
            &Limits::default(),
        );
        assert_eq!(failed(&r), ["disk-size:vda"]);
        assert!(r.refusals()[0].contains("exceeds the limit of 2032.00 GiB"));
    }

    #[test]
    fn disks_plus_memory_limit() {
        let d = vec![disk("vda", 2000 * GIB), disk("vdb", 1999 * GIB)];
        assert!(evaluate(&facts(d.clone(), GIB), &Limits::default()).ok);
        let r = evaluate(&facts(d, GIB + 1), &Limits::default());
        assert_eq!(failed(&r), ["total-size"]);
        assert!(
            r.refusals()[0].contains("4000.00 GiB"),
            "{:?}",
            r.refusals()
        );
    }

    #[test]
    fn overlay_headroom_is_a_share_of_disks_plus_memory() {
        let mut f = facts(vec![disk("vda", 8 * GIB)], 2 * GIB);
        f.overlay_spaces[0].free_bytes = 2 * GIB; // exactly 20% of 10 GiB
        assert!(evaluate(&f, &Limits::default()).ok);
        f.overlay_spaces[0].free_bytes = 2 * GIB - 1;
        let r = evaluate(&f, &Limits::default());
        assert_eq!(failed(&r), ["overlay-space"]);
        let l = Limits {
            overlay_headroom_ratio: 0.1,
            ..Limits::default()
        };
        assert!(evaluate(&f, &l).ok);
    }

    #[test]
    fn repository_space_uses_allocated_sizes() {
        let mut f = facts(vec![disk("vda", 100 * GIB)], GIB);
        f.repository.as_mut().unwrap().free_bytes = 10 * GIB;
        assert!(evaluate(&f, &Limits::default()).ok);
        f.repository.as_mut().unwrap().free_bytes = 10 * GIB - 1;
        assert_eq!(
            failed(&evaluate(&f, &Limits::default())),
            ["repository-space"]
        );
    }

    #[test]
    fn overlays_and_repository_on_one_file_system_need_their_space_together() {
        // 10 GiB of disks, 1 GiB allocated, 2 GiB of memory: 2.4 GiB headroom, 1 GiB copy.
        let mut f = facts(vec![disk("vda", 10 * GIB)], 2 * GIB);
        let headroom = (12 * GIB) as f64 * 0.2;
        let need = headroom.ceil() as u64 + GIB;
        f.overlay_spaces[0].free_bytes = need - 1;
        f.repository.as_mut().unwrap().free_bytes = need - 1;
        // Apart, each has enough.
        assert!(evaluate(&f, &Limits::default()).ok);
        // On one file system, the sum does not fit.
        f.repository.as_mut().unwrap().device = f.overlay_spaces[0].device;
        let r = evaluate(&f, &Limits::default());
        assert_eq!(failed(&r), ["shared-space"]);
        assert!(
            r.refusals()[0].contains("share one file system"),
            "{:?}",
            r.refusals()
        );
        f.overlay_spaces[0].free_bytes = need;
        assert!(evaluate(&f, &Limits::default()).ok);
        // An unknown file system is not taken for the repository's.
        f.overlay_spaces[0].free_bytes = need - 1;
        f.overlay_spaces[0].device = None;
        f.repository.as_mut().unwrap().device = None;
        assert!(evaluate(&f, &Limits::default()).ok);
    }

    #[test]
    fn overlay_folders_others_may_write_to_are_refused() {
        let me = nix::unistd::geteuid().as_raw();
        for (mode, owner, ok) in [
            (0o711, 0, true),
            (0o755, me, true),
            (0o700, 0, true),
            (0o777, 0, false),
            (0o1777, 0, false),
            (0o775, 0, false),
            (0o755, 4242, me == 4242),
        ] {
            let mut f = facts(vec![disk("vda", GIB)], GIB);
            f.overlay_folders[0].mode = mode;
            f.overlay_folders[0].owner = owner;
            let r = evaluate(&f, &Limits::default());
            assert_eq!(r.ok, ok, "{mode:o} {owner}: {:?}", r.refusals());
            if !ok {
                assert_eq!(failed(&r), ["overlay-folder"]);
                assert!(r.refusals()[0].contains("/images"), "{:?}", r.refusals());
            }
        }
        let d = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let why = Folder::of(d.path()).unwrap().untrusted().unwrap();
        assert!(why.contains("world-writable (mode 1777)"), "{why}");
    }

    #[test]
    fn cdroms_and_readonly_disks_are_skipped_and_do_not_count() {
        let mut cd = disk("sda", 3000 * GIB);
        cd.device = "cdrom".into();
        let mut ro = disk("vdc", 3000 * GIB);
        ro.readonly = true;
        let r = evaluate(
            &facts(vec![disk("vda", GIB), cd, ro], GIB),
            &Limits::default(),
        );
        assert!(r.ok, "{:?}", r.refusals());
        assert_eq!(r.disks, ["vda"]);
        assert_eq!(r.skipped_disks.len(), 2);
    }

    #[test]
    fn block_network_and_shareable_disks_refuse_the_vm() {
        for (kind, shareable) in [("block", false), ("network", false), ("file", true)] {
            let mut d = disk("vdb", GIB);
            d.kind = kind.into();
            d.shareable = shareable;
            let r = evaluate(&facts(vec![disk("vda", GIB), d], GIB), &Limits::default());
            assert!(!r.ok, "{kind} shareable={shareable} was accepted");
            assert_eq!(failed(&r), ["disk-supported:vdb"]);
        }
    }
}
