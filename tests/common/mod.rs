//! What the integration tests share: the test kit's `vmbackup` runner bound to this package's
//! binary (`CARGO_BIN_EXE_vmbackup` exists only in integration tests), and disk helpers.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub use vmbackup_testkit::cli::{Place, Run};
use vmbackup_testkit::libvirt_vm::{DiskSpec, Format};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// The `vmbackup` binary of this package.
pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vmbackup"))
}

/// Runs `vmbackup --json --repo R --state-dir S ARGS...` and parses its one JSON document.
pub fn vmbackup(place: &Place, args: &[&str]) -> Run {
    vmbackup_at(&place.repo(), &place.state(), args)
}

/// Runs `vmbackup backup ARGS...`, which must succeed, and returns the id of its one backup.
pub fn backup_id(place: &Place, args: &[&str]) -> String {
    let b = vmbackup(place, &[&["backup"][..], args].concat());
    assert_eq!(b.code, 0, "{}", b.stderr);
    b.json["results"][0]["backup"]["id"]
        .as_str()
        .expect("a backup id")
        .to_string()
}

/// Asserts that run `r` (of `what`) succeeded.
pub fn ok(r: &Run, what: &str) {
    assert_eq!(r.code, 0, "{what}: {}\n{}", r.json, r.stderr);
}

/// The ids of a `list --json`.
pub fn ids(list: &Run) -> Vec<String> {
    list.json["backups"]
        .as_array()
        .expect("a list of backups")
        .iter()
        .map(|b| b["id"].as_str().expect("a backup id").to_string())
        .collect()
}

pub fn vmbackup_at(repo: &Path, state: &Path, args: &[&str]) -> Run {
    vmbackup_testkit::cli::run_json(binary(), repo, state, args)
}

/// A qcow2 data disk whose ext4 filesystem holds `data_mib` MiB of incompressible bytes in
/// `/data`. Keep the returned folder alive until the VM is defined.
pub fn filled_disk(target: &str, size: u64, data_mib: u64) -> (tempfile::TempDir, DiskSpec) {
    let fill = tempfile::tempdir_in("/var/tmp").expect("temporary folder");
    let mut x: u64 = 0x9E3779B97F4A7C15 ^ data_mib;
    let data: Vec<u8> = (0..data_mib * MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(fill.path().join("data"), data).expect("write fill data");
    let spec = DiskSpec {
        target: target.into(),
        format: Format::Qcow2,
        size,
        ext4: true,
        fill_from: Some(fill.path().to_path_buf()),
    };
    (fill, spec)
}

/// Reads a file out of an ext4 image on the host, without mounting it.
pub fn read_from_ext4(image: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .output()
        .expect("run debugfs");
    assert!(
        out.status.success(),
        "debugfs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Every file in `dir`, sorted (to show that nothing was added or removed).
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
