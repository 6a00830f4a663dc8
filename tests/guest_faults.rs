//! Guest and libvirtd faults during a backup (issue 13, "Guest"), against real libvirt VMs:
//! a freeze that completes after its deadline, an agent stuck while thawing, a guest that shuts
//! down during the copy, a guest writing fast during the commit, and libvirtd restarted during
//! the snapshot and during the commit.
//!
//! The tests of stuck freezes and thaws need the test guest's fsfreeze hook
//! (`vm-images/guest/fsfreeze-hook`, on with `vmbackup.freezehook`), which sleeps
//! `/run/vmb-freeze-delay` seconds before a freeze and `/run/vmb-thaw-delay` seconds after a
//! thaw. `the_libvirtd_restarts` restarts the host's libvirtd (as `scripts/setup-host` starts
//! it): other tests' libvirt connections break meanwhile.

mod common;

use std::sync::{RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use vmbackup_testkit::faults::{freeze_status, repo_violations, vm_violations, FaultRun};
use vmbackup_testkit::libvirt_vm::{self, Format, TestVm, TestVmBuilder};

/// The libvirtd restart breaks every libvirt connection: the other tests of this target hold
/// this for reading, the restarting one for writing, so that it runs alone.
static LIBVIRTD: RwLock<()> = RwLock::new(());

fn libvirtd_stays() -> RwLockReadGuard<'static, ()> {
    LIBVIRTD.read().unwrap_or_else(|e| e.into_inner())
}

fn images(vm: &TestVm) -> Vec<String> {
    vm.disk_paths()
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

fn assert_vm_clean(vm: &TestVm, what: &str) {
    let bad = vm_violations(vm, &images(vm));
    assert!(bad.is_empty(), "{what}: the VM was left {bad:?}");
}

fn assert_repo_clean(place: &Place, what: &str) -> Vec<String> {
    let (ids, bad) = repo_violations(binary(), place);
    assert!(bad.is_empty(), "{what}: the repository was left {bad:?}");
    ids
}

/// The guest's freeze status right now: the agent must answer within a few seconds (it is
/// not busy with a freeze or thaw any more once the backup has returned).
fn status_now(vm: &TestVm) -> String {
    freeze_status(vm, Duration::from_secs(3)).unwrap_or_else(|e| e)
}

/// A write into the guest's data filesystem that must finish within 10 s (it hangs on a
/// frozen filesystem).
fn assert_guest_writes(vm: &TestVm) {
    let out = vm
        .exec_sh("timeout 10 sh -c 'echo x > /mnt/vdb/after && sync' && echo written")
        .unwrap();
    assert_eq!(
        out.stdout_text().trim(),
        "written",
        "a write into the guest did not complete: {}",
        out.stderr_text()
    );
}

/// tests/backup.rs (`a_freeze_that_outlasts_its_deadline_...`) covers a late freeze with
/// `--quiesce preferred`, checked after the freeze had surely landed. Here: with `--quiesce
/// required` (the run fails), the guest is thawed at the moment the backup returns, with
/// nothing published and the VM on its images. Then, in the same guest, an agent stuck for 8 s
/// after each thaw (the freeze deadline is 2 s): libvirt reports the thaw as failed, the
/// pipeline asks the agent until it says thawed, and the backup, taken while frozen, succeeds
/// application-consistent.
#[test]
fn a_late_freeze_and_a_stuck_thaw_leave_the_guest_thawed_when_the_backup_returns() {
    let _libvirtd = libvirtd_stays();
    let vm = TestVmBuilder::new("gf-freeze")
        .cmdline("vmbackup.freezehook")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let place = Place::new();

    vm.sh("echo 6 > /run/vmb-freeze-delay").unwrap();
    let t = Instant::now();
    let r = vmbackup(
        &place,
        &[
            "--freeze-timeout",
            "1",
            "backup",
            vm.name(),
            "--quiesce",
            "required",
        ],
    );
    let took = t.elapsed();
    let now = status_now(&vm);
    eprintln!("late freeze, required: exit {} after {took:?}", r.code);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(
        now, "thawed",
        "the guest was frozen when the backup returned"
    );
    assert!(r.stderr.contains("froze"), "{}", r.stderr);
    assert_vm_clean(&vm, "late freeze");
    assert!(assert_repo_clean(&place, "late freeze").is_empty());
    vm.sh("rm -f /run/vmb-freeze-delay").unwrap();
    assert_guest_writes(&vm);

    vm.sh("echo 8 > /run/vmb-thaw-delay").unwrap();
    let t = Instant::now();
    let r = vmbackup(
        &place,
        &[
            "--freeze-timeout",
            "2",
            "backup",
            vm.name(),
            "--quiesce",
            "required",
        ],
    );
    let took = t.elapsed();
    let now = status_now(&vm);
    eprintln!(
        "stuck thaw: exit {} after {took:?}: {}",
        r.code, r.json["results"][0]
    );
    assert_eq!(
        now, "thawed",
        "the guest was frozen when the backup returned"
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let b = &r.json["results"][0]["backup"];
    assert_eq!(b["consistency"], "application", "{b}");
    assert!(
        b["consistency_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("thaw"),
        "{b}"
    );
    vm.sh("rm -f /run/vmb-thaw-delay").unwrap();
    assert_vm_clean(&vm, "stuck thaw");
    assert_eq!(assert_repo_clean(&place, "stuck thaw").len(), 1);
    assert_guest_writes(&vm);
}

/// Whether process `pid` is stopped (SIGSTOP).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_default()
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('T'))
}

/// The guest powers itself off while the backup copies: the backup ends (here it has the
/// data: it read the frozen images) with the VM's definition on its images and no overlay
/// left, and the VM boots afterwards on its images, its data intact.
#[test]
fn a_guest_that_shuts_down_during_the_copy_boots_afterwards_on_its_images() {
    let _libvirtd = libvirtd_stays();
    let vm = TestVmBuilder::new("gf-shutdown")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    vm.sh("echo before > /mnt/vdb/mark && sync").unwrap();
    let place = Place::new();
    let mut run = FaultRun::start(
        binary(),
        &place,
        &["backup", vm.name()],
        "backup-copy=stop",
        &[],
    );
    let start = Instant::now();
    while !stopped(run.child.id()) {
        assert!(
            matches!(run.child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(120),
            "the run never reached its copy:\n{}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // On the overlay now; this write goes there.
    vm.sh("echo during > /mnt/vdb/mark && sync").unwrap();
    vm.shutdown(Duration::from_secs(60)).unwrap();
    run.signal(Signal::SIGCONT);
    let exit = run.wait(Duration::from_secs(120));
    let log = run.stderr();
    eprintln!("backup of a guest shut down during its copy: exit {exit}");
    assert!(exit == 0 || exit == 1, "exit {exit}:\n{log}");
    let inactive = vm.dom().inactive_xml().unwrap();
    assert_eq!(
        vmbackup_testkit::faults::disk_sources(&inactive),
        images(&vm),
        "{log}"
    );
    let left: Vec<String> = files_in(vm.dir())
        .into_iter()
        .filter(|f| f.contains(".vmbackup-"))
        .collect();
    assert!(left.is_empty(), "left beside the images: {left:?}\n{log}");
    let ids = assert_repo_clean(&place, "shutdown");
    assert_eq!(ids.len(), usize::from(exit == 0), "{ids:?}\n{log}");

    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    assert_vm_clean(&vm, "after boot");
    assert_eq!(vm.sh("cat /mnt/vdb/mark").unwrap().trim(), "during");
}

/// The guest writes as fast as it can while the backup commits its overlay back (the writes
/// pile up on the overlay during a copy held 3 s). The commit converges, or the VM stays
/// safely on its overlay and the next run finishes it; every record the guest wrote is on
/// its disk afterwards.
#[test]
fn a_guest_writing_fast_during_the_commit_ends_on_its_images_with_its_writes() {
    let _libvirtd = libvirtd_stays();
    let vm = TestVmBuilder::new("gf-fastwrite")
        .disk("vdb", Format::Qcow2, 256 * MIB)
        .start()
        .expect("guest boots");
    vm.sh("vmb-writer start /mnt/vdb/records").unwrap();
    vm.sh(
        "(while [ ! -f /run/stop-fast ]; do dd if=/dev/urandom of=/mnt/vdb/fast bs=1M count=64 \
         conv=fsync 2>/dev/null; done; rm -f /mnt/vdb/fast; touch /run/fast-stopped) \
         </dev/null >/dev/null 2>&1 &",
    )
    .unwrap();
    let place = Place::new();
    let mut run = FaultRun::start(
        binary(),
        &place,
        &["backup", vm.name()],
        "backup-copy=sleep(3000)",
        &[],
    );
    let exit = run.wait(Duration::from_secs(600));
    let log = run.stderr();
    let commits: Vec<&str> = log.lines().filter(|l| l.contains("commit")).collect();
    eprintln!("backup during fast writes: exit {exit}; {commits:#?}");
    let first_exit = exit;
    if exit != 0 {
        // Only a commit that could not converge may fail it: the VM stays on its overlay.
        assert_eq!(exit, 1, "{log}");
        assert!(log.contains("commit"), "{log}");
    }
    vm.sh("touch /run/stop-fast; while [ ! -f /run/fast-stopped ]; do sleep 0.2; done")
        .unwrap();
    // The writer is stopped by a signal, maybe between a record's write and its fsync: the
    // records it wrote are all made durable before they are compared after a power cut.
    vm.sh("vmb-writer stop && sync /mnt/vdb/records").unwrap();
    if first_exit != 0 {
        let r = vmbackup(&place, &["backup", vm.name()]);
        assert_eq!(r.code, 0, "the next run: {}", r.stderr);
    }
    assert_vm_clean(&vm, "after the commit");
    assert!(!assert_repo_clean(&place, "after the commit").is_empty());
    let written = vm.read_file("/mnt/vdb/records").unwrap();
    // A power cut, then the guest reads what its disk holds (its journal replayed).
    vm.dom().destroy().unwrap();
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    assert_vm_clean(&vm, "after a power cut");
    let on_disk = vm.read_file("/mnt/vdb/records").unwrap();
    let check = libvirt_vm::check_records(&on_disk);
    assert!(check.bad.is_empty(), "bad records: {:?}", check.bad);
    assert!(
        on_disk == written,
        "the disk holds {} records, the guest wrote {}",
        check.valid,
        libvirt_vm::check_records(&written).valid
    );
}

/// Kills the host's libvirtd and starts it again as `scripts/setup-host` does, then waits
/// until it answers.
fn restart_libvirtd() {
    let pid: i32 = std::fs::read_to_string("/run/libvirtd.pid")
        .expect("libvirtd's pid file")
        .trim()
        .parse()
        .expect("a pid");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    let start = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        // Reaped by init, or a zombie of ours: the state says.
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if st
            .rsplit_once(") ")
            .is_some_and(|(_, r)| r.starts_with('Z'))
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "libvirtd lives on"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = std::process::Command::new("libvirtd")
        .arg("-d")
        .status()
        .expect("start libvirtd");
    assert!(st.success(), "libvirtd -d: {st}");
    let start = Instant::now();
    loop {
        let ok = std::process::Command::new("virsh")
            .args(["-c", "qemu:///system", "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "libvirtd does not answer"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("libvirtd restarted in {:?}", start.elapsed());
}

/// Waits until `cond` holds or the run ends (a panic with its log then).
fn wait_for(run: &mut FaultRun, what: &str, cond: impl Fn(&FaultRun) -> bool) {
    let start = Instant::now();
    while !cond(run) {
        if let Ok(Some(st)) = run.child.try_wait() {
            panic!("the run ended ({st}) before {what}:\n{}", run.stderr());
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no {what}:\n{}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn recover(place: &Place, vm: &TestVm) -> Value {
    let r = vmbackup(place, &["recover", vm.name()]);
    assert_eq!(r.code, 0, "recover: {}", r.stderr);
    r.json
}

/// libvirtd is killed and started again while the quiesced snapshot call is in flight (the
/// guest's freeze hook holds it 4 s), then while the commit back runs (held 3 s at a fail
/// point). The runs fail; `recover` puts the VM back on its images with the guest thawed, the
/// repository is consistent, and the next backup works.
#[test]
fn the_libvirtd_restarts_during_the_snapshot_and_the_commit_are_recovered() {
    let _alone = LIBVIRTD.write().unwrap_or_else(|e| e.into_inner());
    let mut vm = TestVmBuilder::new("gf-libvirtd")
        .cmdline("vmbackup.freezehook")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let place = Place::new();

    vm.sh("echo 4 > /run/vmb-freeze-delay").unwrap();
    let mut run = FaultRun::start(
        binary(),
        &place,
        &["backup", vm.name()],
        "",
        &[("VMBACKUP_LOG", "debug")],
    );
    wait_for(&mut run, "the snapshot phase", |r| {
        r.stderr().contains("phase=\"snapshot\"") || r.stderr().contains("phase=snapshot")
    });
    std::thread::sleep(Duration::from_secs(1));
    restart_libvirtd();
    vm.reconnect().unwrap();
    let exit = run.wait(Duration::from_secs(180));
    // The freeze libvirtd had sent went through after it died: the run thawed the guest
    // through a new connection before it returned.
    let now = status_now(&vm);
    eprintln!("libvirtd restarted in the snapshot: exit {exit}");
    assert_ne!(exit, 0, "{}", run.stderr());
    assert_eq!(now, "thawed", "{}", run.stderr());
    vm.sh("rm -f /run/vmb-freeze-delay").unwrap();
    let r = recover(&place, &vm);
    eprintln!("recover: {r}");
    assert_vm_clean(&vm, "libvirtd restarted in the snapshot");
    assert_repo_clean(&place, "libvirtd restarted in the snapshot");
    assert_guest_writes(&vm);

    let mut run = FaultRun::start(
        binary(),
        &place,
        &["backup", vm.name()],
        "commit-started=sleep(3000)",
        &[],
    );
    wait_for(&mut run, "the commit", |_| {
        matches!(vm.dom().block_job("vdb"), Ok(Some(_)))
    });
    restart_libvirtd();
    vm.reconnect().unwrap();
    let exit = run.wait(Duration::from_secs(180));
    eprintln!("libvirtd restarted in the commit: exit {exit}");
    let r = recover(&place, &vm);
    eprintln!("recover: {r}");
    assert_vm_clean(&vm, "libvirtd restarted in the commit");
    let ids = assert_repo_clean(&place, "libvirtd restarted in the commit");
    assert!(!ids.is_empty(), "the backup published before its commit");

    let r = vmbackup(&place, &["backup", vm.name()]);
    assert_eq!(r.code, 0, "the next backup: {}", r.stderr);
    assert_vm_clean(&vm, "the next backup");
}
