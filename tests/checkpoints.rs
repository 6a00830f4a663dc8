//! Changed-block tracking on libvirt domains: checkpoints made with the backup's snapshot,
//! whose dirty bitmaps end up in the disks' own images, removed again by `drop_bitmaps`, by a
//! restore, and by the removal of the domain. Real libvirt, real QEMU, real guests.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use vmbackup::hypervisor::libvirt_vm::LibvirtVm;
use vmbackup::hypervisor::{Overlay, VmHandle};
use vmbackup::qcow2_bitmaps::{self, ImageFormat};
use vmbackup::settings::BackupSettings;
use vmbackup::vm_ref::VmRef;
use vmbackup_testkit::libvirt_vm::{Format, TestVm, TestVmBuilder};

fn vm_ref(vm: &TestVm) -> VmRef {
    VmRef::libvirt(vm.name()).unwrap()
}

fn image(vm: &TestVm, target: &str) -> PathBuf {
    vm.disk_paths()
        .iter()
        .find(|p| p.file_stem().is_some_and(|s| s == target))
        .unwrap_or_else(|| panic!("no disk {target}"))
        .clone()
}

/// Empty overlays for `targets` (`(target, format)`), named as a backup `tag` names them.
fn overlays(vm: &TestVm, targets: &[(&str, &str)], tag: &str) -> Vec<Overlay> {
    targets
        .iter()
        .map(|&(target, format)| {
            let image = image(vm, target);
            let overlay = vm
                .dir()
                .join(format!("{}.{target}.vmbackup-{tag}.qcow2", vm.name()));
            let size = vmbackup::image::info(&image).unwrap().virtual_size;
            vmbackup::image::create_overlay(&overlay, &image, format, size).unwrap();
            Overlay {
                target: target.to_string(),
                image,
                format: format.to_string(),
                overlay,
                node: None,
            }
        })
        .collect()
}

fn commit_back(h: &LibvirtVm, ov: &[Overlay]) {
    h.commit_back(ov, &BackupSettings::default()).unwrap();
    for o in ov {
        std::fs::remove_file(&o.overlay).unwrap();
    }
}

/// The guest's block device whose serial is `target`.
fn guest_dev(vm: &TestVm, target: &str) -> String {
    let dev = vm
        .sh(&format!(
            "for b in /sys/block/vd*; do [ \"$(cat $b/serial 2>/dev/null)\" = {target} ] && echo /dev/${{b##*/}}; done; true"
        ))
        .unwrap();
    let dev = dev.trim().to_string();
    assert!(dev.starts_with("/dev/vd"), "no guest device for {target}");
    dev
}

/// Writes `mib` MiB of random bytes at `at_mib` MiB of the guest's disk `target`, past the
/// guest's page cache and flushed.
fn guest_write(vm: &TestVm, target: &str, at_mib: u64, mib: u64) {
    let dev = guest_dev(vm, target);
    vm.sh(&format!(
        "busybox dd if=/dev/urandom of={dev} bs=1M seek={at_mib} count={mib} oflag=direct conv=fsync 2>&1"
    ))
    .unwrap();
}

/// Whether one dirty range holds all of `[at, at + len)`.
fn covers(ranges: &[(u64, u64)], at: u64, len: u64) -> bool {
    ranges.iter().any(|&(o, l)| o <= at && at + len <= o + l)
}

fn touches(ranges: &[(u64, u64)], at: u64, len: u64) -> bool {
    ranges.iter().any(|&(o, l)| o < at + len && at < o + l)
}

fn names_in_image(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = qcow2_bitmaps::list(path)
        .unwrap()
        .bitmaps
        .into_iter()
        .map(|b| b.name)
        .collect();
    v.sort();
    v
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// A checkpoint with a bitmap on `targets`, made as another tool would make it.
fn foreign_checkpoint(vm: &TestVm, name: &str, targets: &[&str]) {
    let disks: String = targets
        .iter()
        .map(|t| format!("<disk name='{t}' checkpoint='bitmap' bitmap='{name}'/>"))
        .collect();
    vm.dom()
        .checkpoint_create(&format!(
            "<domaincheckpoint><name>{name}</name><disks>{disks}</disks></domaincheckpoint>"
        ))
        .unwrap();
}

#[test]
fn the_snapshot_starts_a_bitmap_in_the_qcow2_image_that_records_every_later_write() {
    let vm = TestVmBuilder::new("cp-track")
        .blank_disk("vdb", Format::Qcow2, 64 * MIB)
        .blank_disk("vdc", Format::Raw, 64 * MIB)
        .start()
        .expect("guest boots");
    let lv = vm.libvirt();
    let h = LibvirtVm::open(lv, &vm_ref(&vm)).unwrap();
    let s = BackupSettings::default();
    let (vdb, vdc) = (image(&vm, "vdb"), image(&vm, "vdc"));

    let ov = overlays(&vm, &[("vdb", "qcow2"), ("vdc", "raw")], "one");
    let t = h.snapshot(&ov, false, Some("vmbackup-x"), &s).unwrap();
    assert_eq!(
        (t.targets.as_slice(), t.failed.as_deref()),
        (&["vdb".to_string()][..], None)
    );
    assert!(t.snapshot_ms.is_some(), "the snapshot call is timed apart");
    assert_eq!(
        h.running_on(&ov).unwrap(),
        ov,
        "the VM is not on its overlays"
    );
    // The base image the VM left holds the bitmap, saved cleanly and recording.
    let bitmaps = qcow2_bitmaps::list(&vdb).unwrap();
    let b = bitmaps
        .get("vmbackup-x")
        .expect("the bitmap is in the image");
    assert!(!b.in_use, "{b:?}");
    assert!(b.auto, "the bitmap is not enabled: {b:?}");
    assert!(bitmaps.consistent);
    let raw = qcow2_bitmaps::list(&vdc).unwrap();
    assert_eq!(raw.format, ImageFormat::NotQcow2);
    assert!(raw.bitmaps.is_empty());
    assert_eq!(h.dom().checkpoints().unwrap(), ["vmbackup-x"]);
    // Nothing written yet, as the image says.
    let clean = qcow2_bitmaps::dirty_ranges(&vdb, "vmbackup-x").unwrap();
    assert!(!touches(clean.ranges(), 8 * MIB, 40 * MIB), "{clean:?}");

    // A write while the VM runs on the overlay, the commit back, a write on the image.
    guest_write(&vm, "vdb", 8, 1);
    commit_back(&h, &ov);
    guest_write(&vm, "vdb", 20, 2);

    let ov = overlays(&vm, &[("vdb", "qcow2"), ("vdc", "raw")], "two");
    let t = h.snapshot(&ov, false, Some("vmbackup-y"), &s).unwrap();
    assert_eq!(t.targets, ["vdb"]);
    assert_eq!(names_in_image(&vdb), ["vmbackup-x", "vmbackup-y"]);
    let dirty = qcow2_bitmaps::dirty_ranges(&vdb, "vmbackup-x").unwrap();
    let r = dirty.ranges();
    assert!(
        covers(r, 8 * MIB, MIB),
        "the write on the overlay is missing: {r:?}"
    );
    assert!(
        covers(r, 20 * MIB, 2 * MIB),
        "the write on the image is missing: {r:?}"
    );
    assert!(
        !touches(r, 40 * MIB, 8 * MIB),
        "an unwritten range is dirty: {r:?}"
    );
    // The new bitmap starts clean.
    let fresh = qcow2_bitmaps::dirty_ranges(&vdb, "vmbackup-y").unwrap();
    assert!(!touches(fresh.ranges(), 8 * MIB, 40 * MIB), "{fresh:?}");
    commit_back(&h, &ov);
    assert_eq!(
        sorted(h.dom().checkpoints().unwrap()),
        ["vmbackup-x", "vmbackup-y"]
    );
}

#[test]
fn a_vm_without_qcow2_disks_is_snapshotted_without_a_checkpoint() {
    let vm = TestVmBuilder::new("cp-raw")
        .blank_disk("vdb", Format::Raw, 32 * MIB)
        .start()
        .expect("guest boots");
    let h = LibvirtVm::open(vm.libvirt(), &vm_ref(&vm)).unwrap();
    let ov = overlays(&vm, &[("vdb", "raw")], "one");
    let t = h
        .snapshot(&ov, false, Some("vmbackup-x"), &BackupSettings::default())
        .unwrap();
    assert!(t.targets.is_empty() && t.failed.is_none(), "{t:?}");
    assert!(h.dom().checkpoints().unwrap().is_empty());
    commit_back(&h, &ov);
}

#[test]
fn a_checkpoint_that_cannot_be_made_leaves_the_snapshot_taken_and_says_why() {
    let vm = TestVmBuilder::new("cp-fail")
        .blank_disk("vdb", Format::Qcow2, 32 * MIB)
        .start()
        .expect("guest boots");
    let h = LibvirtVm::open(vm.libvirt(), &vm_ref(&vm)).unwrap();
    let s = BackupSettings::default();
    // A checkpoint of that name exists already.
    foreign_checkpoint(&vm, "vmbackup-x", &["vdb"]);
    let ov = overlays(&vm, &[("vdb", "qcow2")], "one");
    let t = h.snapshot(&ov, false, Some("vmbackup-x"), &s).unwrap();
    assert!(t.targets.is_empty(), "{t:?}");
    assert!(t.failed.is_some(), "{t:?}");
    assert_eq!(h.running_on(&ov).unwrap(), ov, "no snapshot was taken");
    commit_back(&h, &ov);
}

#[test]
fn a_failed_snapshot_takes_its_checkpoint_back() {
    let vm = TestVmBuilder::new("cp-snapfail")
        .blank_disk("vdb", Format::Qcow2, 32 * MIB)
        .start()
        .expect("guest boots");
    let h = LibvirtVm::open(vm.libvirt(), &vm_ref(&vm)).unwrap();
    let mut ov = overlays(&vm, &[("vdb", "qcow2")], "one");
    // The overlay file is gone: the snapshot (which reuses it) fails.
    std::fs::remove_file(&ov[0].overlay).unwrap();
    ov[0].overlay = vm.dir().join("missing").join("overlay.qcow2");
    let r = h.snapshot(&ov, false, Some("vmbackup-x"), &BackupSettings::default());
    assert!(r.is_err(), "{r:?}");
    assert!(h.dom().checkpoints().unwrap().is_empty());
    assert!(h.running_on(&ov).unwrap().is_empty());
}

#[test]
fn drop_bitmaps_removes_the_chosen_vmbackup_checkpoints_and_never_another() {
    let vm = TestVmBuilder::new("cp-drop")
        .blank_disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let h = LibvirtVm::open(vm.libvirt(), &vm_ref(&vm)).unwrap();
    let s = BackupSettings::default();
    let vdb = image(&vm, "vdb");
    for tag in ["a", "b"] {
        let ov = overlays(&vm, &[("vdb", "qcow2")], tag);
        let name = format!("vmbackup-{tag}");
        assert_eq!(
            h.snapshot(&ov, false, Some(&name), &s).unwrap().targets,
            ["vdb"]
        );
        commit_back(&h, &ov);
        if tag == "a" {
            // A checkpoint of another tool's, between vmbackup's.
            foreign_checkpoint(&vm, "other-1", &["vdb"]);
        }
    }
    foreign_checkpoint(&vm, "vmbackupish", &["vdb"]);
    assert_eq!(
        sorted(h.dom().checkpoints().unwrap()),
        ["other-1", "vmbackup-a", "vmbackup-b", "vmbackupish"]
    );

    // Everything but the newest of vmbackup's: a predicate that says yes to all the others.
    let asked = std::cell::RefCell::new(Vec::new());
    let removed = h
        .drop_bitmaps(&|n| {
            asked.borrow_mut().push(n.to_string());
            n != "vmbackup-b"
        })
        .unwrap();
    assert_eq!(removed, ["vmbackup-a"]);
    assert_eq!(sorted(asked.into_inner()), ["vmbackup-a", "vmbackup-b"]);
    assert_eq!(
        sorted(h.dom().checkpoints().unwrap()),
        ["other-1", "vmbackup-b", "vmbackupish"]
    );
    // A later write is still recorded by the bitmaps that are left.
    guest_write(&vm, "vdb", 4, 1);
    // QEMU writes the bitmaps into the image when it closes it.
    vm.shutdown(Duration::from_secs(60)).unwrap();
    assert_eq!(
        names_in_image(&vdb),
        ["other-1", "vmbackup-b", "vmbackupish"]
    );
    for b in ["other-1", "vmbackup-b"] {
        let d = qcow2_bitmaps::dirty_ranges(&vdb, b).unwrap();
        assert!(covers(d.ranges(), 4 * MIB, MIB), "{b}: {d:?}");
    }

    // All of vmbackup's, the bitmaps with them.
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    let removed = h.drop_bitmaps(&|_| true).unwrap();
    assert_eq!(removed, ["vmbackup-b"]);
    assert_eq!(
        sorted(h.dom().checkpoints().unwrap()),
        ["other-1", "vmbackupish"]
    );
    vm.shutdown(Duration::from_secs(60)).unwrap();
    assert_eq!(names_in_image(&vdb), ["other-1", "vmbackupish"]);
}

#[test]
fn a_vmbackup_checkpoint_whose_bitmap_is_gone_is_still_dropped() {
    let vm = TestVmBuilder::new("cp-gone")
        .blank_disk("vdb", Format::Qcow2, 32 * MIB)
        .start()
        .expect("guest boots");
    let h = LibvirtVm::open(vm.libvirt(), &vm_ref(&vm)).unwrap();
    let vdb = image(&vm, "vdb");
    foreign_checkpoint(&vm, "vmbackup-a", &["vdb"]);
    foreign_checkpoint(&vm, "other-1", &["vdb"]);
    vm.shutdown(Duration::from_secs(60)).unwrap();
    // Someone removed the bitmap from the image behind libvirt's back.
    let out = std::process::Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(&vdb)
        .arg("vmbackup-a")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(names_in_image(&vdb), ["other-1"]);
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    assert_eq!(h.drop_bitmaps(&|_| true).unwrap(), ["vmbackup-a"]);
    assert_eq!(h.dom().checkpoints().unwrap(), ["other-1"]);
}

#[test]
fn a_vm_with_checkpoints_is_undefined_running_or_shut_off() {
    let running = TestVmBuilder::new("cp-undef")
        .blank_disk("vdb", Format::Qcow2, 32 * MIB)
        .start()
        .expect("guest boots");
    let stopped = TestVmBuilder::new("cp-undef-off")
        .blank_disk("vdb", Format::Qcow2, 32 * MIB)
        .start()
        .expect("guest boots");
    for vm in [&running, &stopped] {
        foreign_checkpoint(vm, "vmbackup-a", &["vdb"]);
        foreign_checkpoint(vm, "other-1", &["vdb"]);
    }
    stopped.shutdown(Duration::from_secs(60)).unwrap();
    let lv = running.libvirt();
    for vm in [&running, &stopped] {
        assert_eq!(vm.dom().checkpoints().unwrap().len(), 2);
        vm.dom().destroy().unwrap();
        vm.dom().undefine().unwrap();
        assert!(lv.find_domain(vm.name()).unwrap().is_none());
    }
}

#[test]
fn restore_forgets_vmbackup_checkpoints_and_asks_for_a_full_read() {
    let vm = TestVmBuilder::new("cp-restore")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    vm.write_file("/mnt/vdb/data", b"kept by the backup")
        .unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    let vr = vm_ref(&vm);
    let h = LibvirtVm::open(vm.libvirt(), &vr).unwrap();
    let ov = overlays(&vm, &[("vdb", "qcow2")], "a");
    h.snapshot(&ov, false, Some("vmbackup-a"), &BackupSettings::default())
        .unwrap();
    commit_back(&h, &ov);
    foreign_checkpoint(&vm, "other-1", &["vdb"]);
    vm.write_file("/mnt/vdb/data", b"changed after the backup")
        .unwrap();

    let r = vmbackup(&place, &["restore", &id, "--force", "--power-off"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("other-1"),
        "no warning about the foreign checkpoint: {}",
        r.stderr
    );
    assert_eq!(vm.dom().checkpoints().unwrap(), ["other-1"]);
    let marker = vmbackup::changes::full_read_marker(&place.state(), &vr, "vdb");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        format!("restored from backup {id}")
    );
    assert!(names_in_image(&image(&vm, "vdb")).is_empty());

    // The VM runs on the restored disk, and a new checkpoint can be made.
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    assert_eq!(
        vm.read_file("/mnt/vdb/data").unwrap(),
        b"kept by the backup"
    );
    let ov = overlays(&vm, &[("vdb", "qcow2")], "b");
    let t = h
        .snapshot(&ov, false, Some("vmbackup-b"), &BackupSettings::default())
        .unwrap();
    assert_eq!(t.targets, ["vdb"], "{t:?}");
    commit_back(&h, &ov);
}

#[test]
fn drop_bitmaps_on_a_shut_off_vm_removes_the_bitmaps_from_its_images() {
    let vm = TestVmBuilder::new("cp-dropoff")
        .blank_disk("vdb", Format::Qcow2, 32 * MIB)
        .start()
        .expect("guest boots");
    let h = LibvirtVm::open(vm.libvirt(), &vm_ref(&vm)).unwrap();
    let vdb = image(&vm, "vdb");
    foreign_checkpoint(&vm, "vmbackup-a", &["vdb"]);
    foreign_checkpoint(&vm, "other-1", &["vdb"]);
    vm.shutdown(Duration::from_secs(60)).unwrap();
    assert_eq!(names_in_image(&vdb), ["other-1", "vmbackup-a"]);
    assert_eq!(h.drop_bitmaps(&|_| true).unwrap(), ["vmbackup-a"]);
    assert_eq!(h.dom().checkpoints().unwrap(), ["other-1"]);
    assert_eq!(names_in_image(&vdb), ["other-1"]);
}
