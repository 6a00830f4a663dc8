//! The rules that make a backup of a running libvirt VM read everything instead of only what
//! the previous backup's dirty bitmap marks: each one shown on a real VM, with the reason the
//! backup records, and the restore still holding every change. Also: vmbackup's checkpoints
//! live beside someone else's without touching them, and only the newest one stays.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use vmbackup::repository::disk::{restore_disk, DiskIndex};
use vmbackup::repository::Repository;
use vmbackup_testkit::libvirt_vm::{Format, TestVm, TestVmBuilder};

fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("run virsh");
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn checkpoints(vm: &TestVm) -> Vec<String> {
    let mut v: Vec<String> = virsh(&["checkpoint-list", vm.name(), "--name"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    v.sort();
    v
}

/// One backup of the VM, which must succeed: its id and its disks' read records.
fn backup(place: &Place, vm: &TestVm, extra: &[&str]) -> (String, Value) {
    let r = vmbackup(place, &[&["backup", vm.name()][..], extra].concat());
    assert_eq!(r.code, 0, "backup failed: {}", r.stderr);
    let b = &r.json["results"][0]["backup"];
    (b["id"].as_str().unwrap().to_string(), b["disks"].clone())
}

fn disk<'a>(disks: &'a Value, target: &str) -> &'a Value {
    disks
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["target"] == target)
        .unwrap_or_else(|| panic!("no disk {target} in {disks}"))
}

fn assert_full(disks: &Value, target: &str, reason: &str) {
    let d = disk(disks, target);
    assert_eq!(d["mode"], "full", "{d}");
    let r = d["full_reason"].as_str().unwrap_or_default();
    assert!(r.contains(reason), "reason {r:?} lacks {reason:?}: {d}");
}

fn assert_incremental(disks: &Value, target: &str, based_on: &str, max_read: u64) {
    let d = disk(disks, target);
    assert_eq!(d["mode"], "incremental", "{d}");
    assert_eq!(d["based_on"], based_on, "{d}");
    assert!(d["bytes_read"].as_u64().unwrap() <= max_read, "{d}");
}

fn restored(place: &Place, id: &str, target: &str) -> std::path::PathBuf {
    let repo = Repository::open(&place.repo()).unwrap();
    let m = repo.load(id).unwrap();
    let d = m.disks.iter().find(|d| d.target == target).unwrap();
    let index = DiskIndex::decode(&repo.store().get(&d.index_object).unwrap()).unwrap();
    let out = place.dir.path().join(format!("{id}.{target}.raw"));
    restore_disk(&repo, &index, &out, 2, &|_, _| {}).unwrap();
    out
}

fn write(vm: &TestVm, file: &str, text: &str) {
    vm.sh(&format!("echo {text} > /mnt/vdb/{file} && sync"))
        .unwrap();
}

fn has_file(image: &Path, file: &str, text: &str) {
    assert_eq!(
        String::from_utf8_lossy(&read_from_ext4(image, &format!("/{file}"))).trim(),
        text
    );
}

fn restart(vm: &TestVm) {
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(120)).unwrap();
}

const CHUNK: u64 = 4 * MIB;

#[test]
fn every_doubt_reads_the_whole_disk_says_why_and_loses_no_change() {
    let (_fill, spec) = filled_disk("vdb", 96 * MIB, 8);
    let vm = TestVmBuilder::new("inc-rules")
        .disk_spec(spec)
        .disk("vdc", Format::Raw, 16 * MIB)
        .start()
        .expect("guest boots");
    let place = Place::new();

    let (b1, d) = backup(&place, &vm, &[]);
    assert_full(&d, "vdb", "first backup");
    assert_eq!(checkpoints(&vm), [format!("vmbackup-{b1}")]);

    // An incremental, beside a checkpoint that is not vmbackup's.
    virsh(&[
        "checkpoint-create-as",
        vm.name(),
        "--name",
        "foreign-1",
        "--diskspec",
        "vdc,checkpoint=no",
    ]);
    write(&vm, "a", "one");
    let (b2, d) = backup(&place, &vm, &[]);
    assert_incremental(&d, "vdb", &b1, 4 * CHUNK + 3 * CHUNK);
    assert_full(&d, "vdc", "started no bitmap");
    assert_eq!(disk(&d, "vdb")["bitmap"], format!("vmbackup-{b2}"));
    assert_eq!(
        checkpoints(&vm),
        ["foreign-1".to_string(), format!("vmbackup-{b2}")],
        "the older checkpoint of vmbackup is gone, the foreign one stays"
    );
    has_file(&restored(&place, &b2, "vdb"), "a", "one");

    // --full.
    let (b3, d) = backup(&place, &vm, &["--full"]);
    assert_full(&d, "vdb", "--full");

    // Someone removed vmbackup's checkpoint (and with it the bitmap).
    virsh(&["checkpoint-delete", vm.name(), &format!("vmbackup-{b3}")]);
    write(&vm, "b", "two");
    let (b4, d) = backup(&place, &vm, &[]);
    assert_full(&d, "vdb", "not in the image");
    has_file(&restored(&place, &b4, "vdb"), "b", "two");

    // The previous backup was deleted: the newest remaining one's bitmap is gone too.
    let del = vmbackup(&place, &["delete", &b4]);
    assert_eq!(del.code, 0, "{}", del.stderr);
    let (b5, d) = backup(&place, &vm, &[]);
    assert_full(&d, "vdb", "not in the image");

    // `virsh destroy` (SIGTERM: QEMU still saves its bitmaps): the write made before is in
    // the next backup, whichever way it reads the disk.
    write(&vm, "c", "three");
    virsh(&["destroy", vm.name()]);
    restart(&vm);
    let (b6, d) = backup(&place, &vm, &[]);
    eprintln!("after virsh destroy: {}", disk(&d, "vdb"));
    has_file(&restored(&place, &b6, "vdb"), "c", "three");
    let _ = b5;

    // QEMU killed (SIGKILL) with the image open: the bitmap stays marked in use, so it is
    // inconsistent. The write made before is in the next backup.
    write(&vm, "c2", "three-b");
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", vm.name())).unwrap();
    let st = Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .unwrap();
    assert!(st.success());
    let start = std::time::Instant::now();
    while vm.dom().is_active().unwrap() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "QEMU did not die"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    restart(&vm);
    let (b6b, d) = backup(&place, &vm, &[]);
    assert_full(&d, "vdb", "inconsistent");
    has_file(&restored(&place, &b6b, "vdb"), "c2", "three-b");

    // The disk grew.
    virsh(&["blockresize", vm.name(), "vdb", "112M"]);
    let (b7, d) = backup(&place, &vm, &[]);
    assert_full(&d, "vdb", "size");

    // Shut off: the bitmap the last backup started, saved cleanly at shutdown, says what
    // changed since; the backup reads only that, and the bitmap goes on standing for the disk.
    write(&vm, "d", "four");
    vm.shutdown(Duration::from_secs(120)).unwrap();
    let (b8, d) = backup(&place, &vm, &[]);
    assert_incremental(&d, "vdb", &b7, 4 * CHUNK + 3 * CHUNK);
    assert_eq!(disk(&d, "vdb")["bitmap"], format!("vmbackup-{b7}"));
    let image = vm.disk_paths()[0].clone();
    let out = restored(&place, &b8, "vdb");
    has_file(&out, "d", "four");
    let now = place.dir.path().join("now.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&image)
        .arg(&now)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&now).unwrap(),
        "the shut-off incremental differs from the image"
    );

    // An internal snapshot in the image: a revert would change it unseen.
    let st = Command::new("qemu-img")
        .args(["snapshot", "-c", "s1"])
        .arg(&image)
        .status()
        .unwrap();
    assert!(st.success());
    restart(&vm);
    let (_b9, d) = backup(&place, &vm, &[]);
    assert_full(&d, "vdb", "internal snapshot");
    assert!(checkpoints(&vm).contains(&"foreign-1".to_string()));
}
