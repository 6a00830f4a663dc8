//! Space faults (issue 13) on real small file systems (tmpfs mounts with `size=`): the
//! repository fills up in the middle of the copy; the repository and the overlays share one
//! file system too small for both.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use vmbackup_testkit::faults::{repo_violations, vm_violations, FaultRun};
use vmbackup_testkit::libvirt_vm::TestVmBuilder;

/// A tmpfs of `bytes` at a new folder, unmounted when dropped.
struct SmallFs {
    at: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(bytes: u64) -> SmallFs {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let at = dir.path().join("fs");
        std::fs::create_dir(&at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={bytes},mode=0755"))
            .arg("vmbt-space")
            .arg(&at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {}", at.display());
        SmallFs { at, _dir: dir }
    }

    fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.at).unwrap();
        st.blocks_available() as u64 * st.fragment_size() as u64
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// Every file below `dir` whose name starts with `.tmp-`.
fn temporaries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with(".tmp-") {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

fn wait_stopped(run: &mut FaultRun) {
    let stat = format!("/proc/{}/stat", run.child.id());
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(&stat).is_ok_and(|s| s.contains(") T ")) {
        assert!(
            t.elapsed() < Duration::from_secs(120) && run.child.try_wait().unwrap().is_none(),
            "the run did not stop at its fail point: {}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The repository on a small file system that fills up while the disk is copied (pre-flight
/// saw enough room; a ballast file takes it once the copy starts): exit 1, the VM on its
/// images, nothing published, no temporary left; with room again the next backup works.
/// Then the repository moves next to overlays on one file system that cannot hold both:
/// refused by pre-flight (exit 3) before any overlay exists.
#[test]
fn a_full_repository_mid_copy_fails_cleanly_and_a_shared_file_system_is_refused() {
    let (_fill, spec) = filled_disk("vdb", 64 * MIB, 24);
    let vm = TestVmBuilder::new("space")
        .disk_spec(spec)
        .start()
        .expect("guest starts");
    let image = vm.disk_paths()[0].clone();
    let images = vec![image.to_string_lossy().into_owned()];
    vm.write_file("/mnt/vdb/during", b"written before the backup")
        .unwrap();

    let fs = SmallFs::mount(96 * MIB);
    // The place's repository is a link to a folder on the small file system.
    let place = Place::new();
    let repo = fs.at.join("repo");
    std::fs::create_dir(&repo).unwrap();
    std::os::unix::fs::symlink(&repo, place.repo()).unwrap();
    let args = ["backup", vm.name(), "--quiesce", "required"];
    let mut run = FaultRun::start(binary(), &place, &args, "backup-copy=stop", &[]);
    wait_stopped(&mut run);
    // Leave 8 MiB: the 24 MiB of incompressible data cannot fit.
    let ballast = fs.at.join("ballast");
    let room = fs.free().saturating_sub(8 * MIB);
    let mut f = std::fs::File::create(&ballast).unwrap();
    std::io::Write::write_all(&mut f, &vec![0xA5u8; room as usize]).unwrap();
    drop(f);
    run.signal(Signal::SIGCONT);
    let code = run.wait(Duration::from_secs(120));
    let log = run.stderr();
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("No space left") || log.contains("os error 28"),
        "{log}"
    );
    assert_eq!(
        temporaries(&repo),
        Vec::<String>::new(),
        "right after the failed run"
    );
    assert!(
        vm_violations(&vm, &images).is_empty(),
        "{:?}",
        vm_violations(&vm, &images)
    );
    let list = vmbackup(&place, &["list"]);
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert!(list.json["backups"].as_array().unwrap().is_empty());
    assert_eq!(
        vm.read_file("/mnt/vdb/during").unwrap(),
        b"written before the backup"
    );
    // Room again: the same VM backs up and verifies.
    std::fs::remove_file(&ballast).unwrap();
    let b = vmbackup(&place, &["backup", vm.name()]);
    assert_eq!(b.code, 0, "{}", b.stderr);
    let v = vmbackup(&place, &["verify"]);
    assert_eq!(v.code, 0, "{}", v.stderr);
    let (_, violations) = repo_violations(binary(), &place);
    assert!(violations.is_empty(), "{violations:?}");
    drop(fs);
    let place = Place::new();

    // Repository and overlays on one file system: each alone would fit, both do not.
    let probe = vmbackup(&place, &["check", vm.name()]);
    assert_eq!(probe.code, 0, "{}", probe.stderr);
    let checks = probe.json["vms"][0]["report"]["checks"]
        .as_array()
        .unwrap()
        .clone();
    let limit = |name: &str| {
        checks.iter().find(|c| c["name"] == name).unwrap()["limit"]
            .as_u64()
            .unwrap()
    };
    let (headroom, estimate) = (limit("overlay-space"), limit("repository-space"));
    let size = headroom.max(estimate) + headroom.min(estimate) / 2;
    let fs = SmallFs::mount(size);
    let overlays = fs.at.join("overlays");
    std::fs::create_dir(&overlays).unwrap();
    let repo = fs.at.join("repo");
    let ov_s = overlays.to_string_lossy().into_owned();
    let r = vmbackup_at(
        &repo,
        &place.state(),
        &[
            "--overlay-dir",
            &ov_s,
            "backup",
            vm.name(),
            "--quiesce",
            "required",
        ],
    );
    assert_eq!(r.code, 3, "{}", r.stderr);
    let all = r.json.to_string();
    assert!(all.contains("share one file system"), "{all}");
    assert!(files_in(&overlays).is_empty());
    assert!(vm_violations(&vm, &images).is_empty());
    // With the repository elsewhere, pre-flight passes for the same overlay folder. (Not
    // backed up there: QEMU runs in libvirt's own mount namespace and cannot see a file
    // system mounted after it started.)
    let other = Place::new();
    let c = vmbackup(&other, &["--overlay-dir", &ov_s, "check", vm.name()]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    assert!(files_in(&overlays).is_empty());
    let (_, violations) = repo_violations(binary(), &place);
    assert!(violations.is_empty(), "{violations:?}");
}
