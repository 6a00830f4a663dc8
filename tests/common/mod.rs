//! What the integration tests share: running the `vmbackup` binary as a caller would, and
//! throwaway repositories.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// A repository and state directory of one test, removed when dropped.
pub struct Place {
    pub dir: tempfile::TempDir,
}

impl Place {
    pub fn new() -> Place {
        std::fs::create_dir_all("/var/tmp/vmbackup-tests").unwrap();
        Place {
            dir: tempfile::Builder::new()
                .prefix("vmbt-repo-")
                .tempdir_in("/var/tmp")
                .expect("temporary folder"),
        }
    }
    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

/// The result of one run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub json: Value,
    pub stderr: String,
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

pub fn vmbackup_at(repo: &Path, state: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_vmbackup"))
        .arg("--json")
        .arg("--repo")
        .arg(repo)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("VMBACKUP_CONFIG")
        .env("VMBACKUP_LOG", "info")
        .output()
        .expect("run vmbackup");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("stdout is not one JSON document ({e}): {stdout:?}\nstderr: {stderr}")
    });
    Run {
        code: out.status.code().unwrap_or(-1),
        json,
        stderr,
    }
}

/// A qcow2 data disk whose ext4 filesystem holds `data_mib` MiB of incompressible bytes in
/// `/data`. Keep the returned folder alive until the VM is defined.
pub fn filled_disk(
    target: &str,
    size: u64,
    data_mib: u64,
) -> (tempfile::TempDir, vmbackup_testkit::libvirt_vm::DiskSpec) {
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
    let spec = vmbackup_testkit::libvirt_vm::DiskSpec {
        target: target.into(),
        format: vmbackup_testkit::libvirt_vm::Format::Qcow2,
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
