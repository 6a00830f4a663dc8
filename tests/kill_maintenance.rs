//! SIGKILL outside the backup pipeline (issue 13, "Kill"): of the process group, at a fail
//! point of a prune, a delete, a gc and a restore, then `recover`, then the invariants:
//! - mid-prune, mid-delete, mid-gc: `list`, `verify` and `gc` pass, and after `gc` (or
//!   `recover`) no temporary file and no backup folder without a manifest is left;
//! - mid-restore, after its temporaries, before its definition, after the first of two
//!   renames: the old state is intact, or the restore runs again to the end (the guest boots
//!   with the restored bytes); `recover` removes the restore's temporaries and kept-aside
//!   images.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use jiff::Timestamp;
use vmbackup::schedule::calendar::vm_offset_secs;
use vmbackup_testkit::faults::{repo_violations, vm_violations, FaultRun, Reached};
use vmbackup_testkit::libvirt_vm::{Format, TestVm, TestVmBuilder};

/// The 02:00 UTC occurrence on `day` for `vm`, one minute late.
fn due(day: &str, vm: &str) -> String {
    let slot: Timestamp = format!("{day}T02:00:00Z").parse().unwrap();
    Timestamp::from_second(slot.as_second() + vm_offset_secs(vm) + 60)
        .unwrap()
        .to_string()
}

/// Runs `vmbackup ARGS` until it reaches `point`, then SIGKILLs its process group.
fn kill_at(place: &Place, point: &str, args: &[&str]) {
    let mut run = FaultRun::start(binary(), place, args, &format!("{point}=kill"), &[]);
    let reached = run.wait_marker(Duration::from_secs(180));
    let log = run.stderr();
    run.kill_group();
    assert_eq!(reached, Reached::Point(point.into()), "{args:?}: {log}");
}

/// Writes `len` bytes of `byte` at `offset` into a shut-off VM's qcow2 image.
fn write_image(image: &Path, byte: u8, offset: &str, len: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P {byte} {offset} {len}"))
        .arg(image)
        .output()
        .expect("run qemu-io");
    assert!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn listed(place: &Place) -> Vec<String> {
    let l = vmbackup(place, &["list"]);
    assert_eq!(l.code, 0, "{}", l.stderr);
    l.json["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

fn folders(place: &Place) -> Vec<String> {
    files_in(&place.repo().join("backups"))
}

fn recover(place: &Place, vm: &TestVm) -> serde_json::Value {
    let r = vmbackup(place, &["recover", vm.name()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.json["recover"].clone()
}

/// Killed in a prune (of `run-due`), in a `delete`, in a gc: the repository stays
/// consistent, and what the killed command left is cleaned by `recover` and by `gc`.
#[test]
fn a_prune_a_delete_and_a_gc_killed_half_way_leave_a_consistent_repository() {
    // Shut off: backups need no snapshot; its image changes through qemu-io.
    let vm = TestVmBuilder::new("km-maint")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .define()
        .expect("VM defined");
    let image = vm.disk_paths()[0].clone();
    let place = Place::new();
    let add = vmbackup(
        &place,
        &[
            "schedule",
            "add",
            "daily",
            "--vm",
            vm.name(),
            "--type",
            "daily",
            "--slot",
            "2",
            "--tz",
            "UTC",
            "--start",
            "2027-01-05",
            "--keep",
            "1",
        ],
    );
    assert_eq!(add.code, 0, "{}", add.stderr);
    let r = vmbackup(&place, &["run-due", "--now", &due("2027-01-05", vm.name())]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let first = listed(&place);
    assert_eq!(first.len(), 1);

    // Mid-prune: the run-due's retention pass, after the first manifest went.
    write_image(&image, 0x11, "32M", "8M");
    kill_at(
        &place,
        "prune-deleted-one",
        &["run-due", "--now", &due("2027-01-06", vm.name())],
    );
    let second = listed(&place);
    assert_eq!(second.len(), 1, "the pruned one is not listed");
    assert_ne!(second, first);
    assert_eq!(folders(&place).len(), 2, "the pruned one's folder is left");
    let rec = recover(&place, &vm);
    assert!(rec["removed_objects"].as_u64().unwrap() > 0, "{rec}");
    assert_eq!(folders(&place), second);
    let (ids, bad) = repo_violations(binary(), &place);
    assert_eq!(bad, Vec::<String>::new());
    assert_eq!(ids, second);

    // Mid-delete, then gc alone: the half-deleted backup's folder goes with its chunks.
    write_image(&image, 0x22, "32M", "8M");
    let m1 = backup_id(&place, &[vm.name()]);
    write_image(&image, 0x33, "32M", "8M");
    let m2 = backup_id(&place, &[vm.name()]);
    kill_at(&place, "prune-deleted-one", &["delete", &m1]);
    assert!(folders(&place).contains(&m1));
    assert!(!listed(&place).contains(&m1));
    let gc = vmbackup(&place, &["gc"]);
    assert_eq!(gc.code, 0, "{}", gc.stderr);
    assert!(
        gc.json["gc"]["removed_chunks"].as_u64().unwrap() > 0,
        "{}",
        gc.json
    );
    assert!(!folders(&place).contains(&m1), "{:?}", folders(&place));

    // Mid-gc: killed after it removed its first chunk.
    write_image(&image, 0x44, "32M", "8M");
    let m3 = backup_id(&place, &[vm.name()]);
    let d = vmbackup(&place, &["delete", &m2]);
    assert_eq!(d.code, 0, "{}", d.stderr);
    kill_at(&place, "gc-deleted-some", &["gc"]);
    recover(&place, &vm);
    let (ids, bad) = repo_violations(binary(), &place);
    assert_eq!(bad, Vec::<String>::new());
    assert_eq!(ids, [second[0].clone(), m3]);
}

fn left_beside(vm: &TestVm) -> Vec<String> {
    files_in(vm.dir())
        .into_iter()
        .filter(|f| f.contains(".vmbackup-"))
        .collect()
}

/// A restore of a two-disk VM killed after its temporary files, before its definition, and
/// after the first of its two renames: the old state is intact in the first two (the guest
/// reads what it had), the restore runs again to the end after the third (the guest reads
/// the backup's bytes on both disks), and `recover` removes what the killed restores left.
#[test]
fn a_restore_killed_half_way_leaves_the_old_state_or_runs_again() {
    let vm = TestVmBuilder::new("km-restore")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .disk("vdc", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let images: Vec<String> = vm
        .disk_paths()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let place = Place::new();
    vm.write_file("/mnt/vdb/f", b"backed up vdb").unwrap();
    vm.write_file("/mnt/vdc/f", b"backed up vdc").unwrap();
    vm.sh("sync").unwrap();
    let id = backup_id(&place, &[vm.name(), "--quiesce", "required"]);
    vm.write_file("/mnt/vdb/f", b"changed vdb").unwrap();
    vm.write_file("/mnt/vdc/f", b"changed vdc").unwrap();
    vm.sh("sync").unwrap();
    let definition = vm.dom().inactive_xml().unwrap();
    let reads = |a: &[u8], b: &[u8]| {
        assert_eq!(vm.read_file("/mnt/vdb/f").unwrap(), a);
        assert_eq!(vm.read_file("/mnt/vdc/f").unwrap(), b);
    };

    // After its temporaries: the VM still runs, on its unchanged disks.
    kill_at(
        &place,
        "restore-temporaries",
        &["restore", &id, "--force", "--power-off"],
    );
    let left = left_beside(&vm);
    assert!(
        left.len() == 2 && left.iter().all(|f| f.contains(".vmbackup-restore-")),
        "{left:?}"
    );
    let rec = recover(&place, &vm);
    assert_eq!(
        rec["restore_leftovers"].as_array().unwrap().len(),
        2,
        "{rec}"
    );
    assert_eq!(left_beside(&vm), Vec::<String>::new());
    assert!(vm.dom().is_active().unwrap());
    reads(b"changed vdb", b"changed vdc");
    assert_eq!(vm.dom().inactive_xml().unwrap(), definition);
    assert_eq!(vm_violations(&vm, &images), Vec::<String>::new());

    // Before its definition: the VM was shut down; definition and disks as they were.
    kill_at(
        &place,
        "restore-before-define",
        &["restore", &id, "--force", "--power-off"],
    );
    assert!(!vm.dom().is_active().unwrap());
    assert_eq!(left_beside(&vm).len(), 2, "{:?}", left_beside(&vm));
    recover(&place, &vm);
    assert_eq!(left_beside(&vm), Vec::<String>::new());
    assert_eq!(vm.dom().inactive_xml().unwrap(), definition);
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    reads(b"changed vdb", b"changed vdc");

    // After the first of two renames: vdb is the backup's, vdc not yet; vdb's old image is
    // kept aside. recover removes it and the other temporary; the restore runs again.
    vm.shutdown(Duration::from_secs(120)).unwrap();
    kill_at(&place, "restore-renamed-one", &["restore", &id, "--force"]);
    let left = left_beside(&vm);
    assert!(
        left.iter().any(|f| f.contains(".vmbackup-old-")),
        "{left:?}"
    );
    let rec = recover(&place, &vm);
    assert!(
        !rec["restore_leftovers"].as_array().unwrap().is_empty(),
        "{rec}"
    );
    assert_eq!(left_beside(&vm), Vec::<String>::new());
    let r = vmbackup(&place, &["restore", &id, "--force"]);
    assert_eq!(r.code, 0, "the restore runs again: {}", r.stderr);
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    reads(b"backed up vdb", b"backed up vdc");
    assert_eq!(vm_violations(&vm, &images), Vec::<String>::new());
    let (_, bad) = repo_violations(binary(), &place);
    assert_eq!(bad, Vec::<String>::new());
}
