//! The QMP path on a real plain QEMU (not managed by libvirt) running the test guest.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use vmbackup::hypervisor::qemu_vm::QemuVmHandle;
use vmbackup::hypervisor::qmp::QemuVm;
use vmbackup::hypervisor::{Overlay, Tracked, VmHandle};
use vmbackup::qcow2_bitmaps;
use vmbackup::settings::BackupSettings;
use vmbackup::vm_ref::VmRef;
use vmbackup_testkit::libvirt_vm::{make_disk, DiskSpec, Format};
use vmbackup_testkit::qemu_vm::TestQemu;

fn disk(dir: &std::path::Path, target: &str, format: Format) -> PathBuf {
    let p = dir.join(format!("{target}.{}", format.as_str()));
    make_disk(
        &p,
        &DiskSpec {
            target: target.into(),
            format,
            size: 64 * MIB,
            ext4: true,
            fill_from: None,
        },
    )
    .unwrap();
    p
}

/// `vmbackup --qemu-dir DIR backup TARGET --quiesce required`.
fn backup_quiesced(place: &Place, dir: &str, target: &str) -> Run {
    vmbackup(
        place,
        &["--qemu-dir", dir, "backup", target, "--quiesce", "required"],
    )
}

#[test]
fn freeze_snapshot_thaw_and_commit_back_through_qmp() {
    let place = Place::new();
    let vdb = disk(place.dir.path(), "vdb", Format::Qcow2);
    let vdc = disk(place.dir.path(), "vdc", Format::Raw);
    let t = TestQemu::start(
        "qmp",
        &[(vdb.clone(), "qcow2"), (vdc.clone(), "raw")],
        Duration::from_secs(180),
    )
    .expect("plain QEMU guest boots");
    let q = t.qemu();
    assert!(q.running().unwrap());
    let disks = q.disks().unwrap();
    let files: Vec<(String, String, String)> = disks
        .iter()
        .map(|d| (d.device.clone(), d.file.clone(), d.format.clone()))
        .collect();
    assert_eq!(
        files,
        [
            (
                "vdb".into(),
                vdb.to_string_lossy().into_owned(),
                "qcow2".into()
            ),
            (
                "vdc".into(),
                vdc.to_string_lossy().into_owned(),
                "raw".into()
            )
        ]
    );
    let (rc, _) = q
        .exec_sh(
            "echo before > /mnt/vdb/f && sync /mnt/vdb/f",
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(rc, 0);

    assert!(q.freeze(Duration::from_secs(10)).unwrap() >= 2);
    let overlays: Vec<(String, PathBuf)> = disks
        .iter()
        .map(|d| {
            (
                d.node_name.clone(),
                t.dir().join(format!("{}.overlay.qcow2", d.device)),
            )
        })
        .collect();
    q.snapshot(&overlays, &[]).unwrap();
    q.thaw(Duration::from_secs(10)).unwrap();
    assert_eq!(q.freeze_status(Duration::from_secs(10)).unwrap(), "thawed");
    let now: Vec<String> = q.disks().unwrap().into_iter().map(|d| d.file).collect();
    assert_eq!(
        now,
        overlays
            .iter()
            .map(|(_, p)| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
    );
    // The frozen base is readable while the VM runs on the overlay.
    vmbackup::image::info(&vdb).unwrap();
    let (rc, _) = q
        .exec_sh(
            "echo during > /mnt/vdb/g && sync /mnt/vdb/g",
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(rc, 0);

    q.commit_back("vdb", &vdb, Duration::from_secs(120))
        .unwrap();
    q.commit_back("vdc", &vdc, Duration::from_secs(120))
        .unwrap();
    for (_, ov) in &overlays {
        std::fs::remove_file(ov).unwrap();
    }
    let (rc, out) = q
        .exec_sh("cat /mnt/vdb/f /mnt/vdb/g", Duration::from_secs(60))
        .unwrap();
    assert_eq!((rc, out.as_str()), (0, "before\nduring\n"));
}

#[test]
fn vmbackup_backs_up_a_plain_qemu_vm_through_qmp() {
    let place = Place::new();
    let vdb = disk(place.dir.path(), "vdb", Format::Qcow2);
    let t = TestQemu::start(
        "qmp-cli",
        &[(vdb.clone(), "qcow2")],
        Duration::from_secs(180),
    )
    .expect("plain QEMU guest boots");
    let q = t.qemu();
    let (rc, _) = q
        .exec_sh(
            "echo in-the-backup > /mnt/vdb/f && sync /mnt/vdb/f",
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(rc, 0);
    let dir = t.dir().to_string_lossy().into_owned();
    let target = format!("qemu:{}", t.name());

    // The pre-flight checks alone, with their figures; a refusal changes nothing.
    let r = vmbackup(&place, &["--qemu-dir", &dir, "check", &target]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let vm = &r.json["vms"][0];
    assert_eq!(
        (vm["vm"].as_str(), vm["ok"].as_bool()),
        (Some(target.as_str()), Some(true)),
        "{vm}"
    );
    let checks = vm["report"]["checks"].as_array().unwrap();
    assert!(checks.iter().all(|c| c["ok"] == true), "{vm}");
    assert!(checks.len() >= 4, "{vm}");
    // The disk's folder (where overlays would go), without the repository and state folders.
    let vm_files = || {
        let mut f = files_in(place.dir.path());
        f.retain(|n| n != "repo" && n != "state");
        f
    };
    let before = vm_files();
    for cmd in ["check", "backup"] {
        let r = vmbackup(
            &place,
            &["--qemu-dir", &dir, "--max-total-gib", "0", cmd, &target],
        );
        assert_eq!(r.code, 3, "{cmd}: {}", r.stderr);
        assert!(
            r.stderr.contains("GiB") || r.json.to_string().contains("GiB"),
            "{cmd}: {}",
            r.json
        );
        assert_eq!(vm_files(), before, "{cmd} changed files");
        assert_eq!(q.disks().unwrap()[0].file, vdb.to_string_lossy());
    }
    let r = vmbackup(&place, &["list"]);
    assert_eq!(r.json["backups"], serde_json::json!([]), "{}", r.json);
    let r = vmbackup(&place, &["--qemu-dir", &dir, "check", "qemu:no-such-vm"]);
    assert_eq!(r.code, 2, "{}", r.stderr);

    let r = backup_quiesced(&place, &dir, &target);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let b = &r.json["results"][0]["backup"];
    assert_eq!(b["consistency"], "application", "{b}");
    assert!(b["freeze_ms"].as_u64().is_some());
    // Back on its original image, thawed, no overlay left.
    let files: Vec<String> = q.disks().unwrap().into_iter().map(|d| d.file).collect();
    assert_eq!(files, [vdb.to_string_lossy().into_owned()]);
    assert_eq!(q.freeze_status(Duration::from_secs(10)).unwrap(), "thawed");
    assert!(
        !std::fs::read_dir(place.dir.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("vmbackup-")),
        "an overlay was left"
    );
    q.exec_sh(
        "echo after > /mnt/vdb/f && sync /mnt/vdb/f",
        Duration::from_secs(60),
    )
    .unwrap();
    // The backup holds what the guest had written before it.
    let id = b["id"].as_str().unwrap();
    let repo = vmbackup::repository::Repository::open(&place.repo()).unwrap();
    let m = repo.load(id).unwrap();
    assert_eq!(m.vm_name, target);
    let idx = vmbackup::repository::disk::DiskIndex::decode(
        &repo.store().get(&m.disks[0].index_object).unwrap(),
    )
    .unwrap();
    let out = place.dir.path().join("restored.raw");
    vmbackup::repository::disk::restore_disk(&repo, &idx, &out, 2, &|_, _| {}).unwrap();
    assert_eq!(read_from_ext4(&out, "/f"), b"in-the-backup\n");
    // An unknown plain QEMU VM is bad input.
    let r = vmbackup(&place, &["--qemu-dir", &dir, "backup", "qemu:no-such-vm"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

#[test]
fn a_plain_qemu_vm_left_frozen_on_an_overlay_is_put_back_by_recover_and_by_the_next_backup() {
    let place = Place::new();
    let vdb = disk(place.dir.path(), "vdb", Format::Qcow2);
    let t = TestQemu::start(
        "qmp-recover",
        &[(vdb.clone(), "qcow2")],
        Duration::from_secs(180),
    )
    .expect("plain QEMU guest boots");
    let q = t.qemu();
    let sh = |script: &str| {
        let (rc, out) = q.exec_sh(script, Duration::from_secs(60)).unwrap();
        assert_eq!(rc, 0, "{script}: {out}");
        out
    };
    let dir = t.dir().to_string_lossy().into_owned();
    let target = format!("qemu:{}", t.name());
    let image = vdb.to_string_lossy().into_owned();
    sh("echo before > /mnt/vdb/f && sync /mnt/vdb/f");

    // What a vmbackup killed between its freeze and its commit leaves (SIGKILL: no handler
    // runs): the disk on an overlay named as vmbackup names them, written to by the guest,
    // and the guest frozen.
    let leave = |tag: &str, file: &str| -> PathBuf {
        let node = q.disks().unwrap()[0].node_name.clone();
        let ov = place.dir.path().join(format!(
            "{}.vdb.vmbackup-{}-{tag}.qcow2",
            t.name(),
            t.name()
        ));
        q.snapshot(&[(node, ov.clone())], &[]).unwrap();
        sh(&format!(
            "echo {tag} > /mnt/vdb/{file} && sync /mnt/vdb/{file}"
        ));
        q.freeze(Duration::from_secs(10)).unwrap();
        assert_eq!(q.freeze_status(Duration::from_secs(10)).unwrap(), "frozen");
        assert_eq!(q.disks().unwrap()[0].file, ov.to_string_lossy());
        ov
    };
    let back_on_image_and_thawed = |ov: &PathBuf| {
        assert_eq!(q.freeze_status(Duration::from_secs(10)).unwrap(), "thawed");
        assert_eq!(q.disks().unwrap()[0].file, image);
        assert!(!ov.exists(), "the overlay {} is still there", ov.display());
    };

    // `recover qemu:NAME`: thawed, committed back, overlay gone, the guest's writes kept.
    let ov = leave("first", "g");
    let r = vmbackup(&place, &["--qemu-dir", &dir, "recover", &target]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rec = &r.json["recover"];
    assert_eq!(rec["thawed"], serde_json::json!([target]), "{rec}");
    assert_eq!(
        rec["disks"][0]["overlay"],
        ov.to_string_lossy().as_ref(),
        "{rec}"
    );
    assert_eq!(rec["disks"][0]["image"], image.as_str(), "{rec}");
    back_on_image_and_thawed(&ov);
    assert_eq!(sh("cat /mnt/vdb/f /mnt/vdb/g"), "before\nfirst\n");

    // The next backup does the same first, then backs up quiesced what the guest wrote.
    let ov = leave("second", "h");
    let r = backup_quiesced(&place, &dir, &target);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let b = &r.json["results"][0]["backup"];
    assert_eq!(b["consistency"], "application", "{b}");
    back_on_image_and_thawed(&ov);
    assert!(
        !files_in(place.dir.path())
            .iter()
            .any(|f| f.contains("vmbackup-")),
        "an overlay was left: {:?}",
        files_in(place.dir.path())
    );
    let repo = vmbackup::repository::Repository::open(&place.repo()).unwrap();
    let m = repo.load(b["id"].as_str().unwrap()).unwrap();
    let idx = vmbackup::repository::disk::DiskIndex::decode(
        &repo.store().get(&m.disks[0].index_object).unwrap(),
    )
    .unwrap();
    let out = place.dir.path().join("restored.raw");
    vmbackup::repository::disk::restore_disk(&repo, &idx, &out, 2, &|_, _| {}).unwrap();
    assert_eq!(read_from_ext4(&out, "/h"), b"second\n");
    sh("echo after > /mnt/vdb/f && sync /mnt/vdb/f");

    // Unknown or invalid plain QEMU VMs are bad input.
    for bad in ["qemu:no-such-vm", "qemu:../x"] {
        let r = vmbackup(&place, &["--qemu-dir", &dir, "recover", bad]);
        assert_eq!(r.code, 2, "{bad}: {}", r.stderr);
    }
}

#[test]
fn the_thaw_guard_thaws_a_frozen_guest_unless_told_it_was_thawed() {
    let place = Place::new();
    let vdb = disk(place.dir.path(), "vdb", Format::Qcow2);
    let t = TestQemu::start("qmp-guard", &[(vdb, "qcow2")], Duration::from_secs(180))
        .expect("plain QEMU guest boots");
    let q = t.qemu();
    let qga = t.dir().join(format!("{}.qga", t.name()));
    let program = std::path::Path::new(env!("CARGO_BIN_EXE_vmbackup"));
    let status = || q.freeze_status(Duration::from_secs(10)).unwrap();
    let spawn =
        || vmbackup::thaw_guard::ThawGuard::spawn(program, &qga, Duration::from_secs(10)).unwrap();

    // The backup thawed the guest and says so: the guard leaves the guest alone (here it
    // is still frozen, so a guard that thawed anyway would show).
    let guard = spawn();
    q.freeze(Duration::from_secs(10)).unwrap();
    guard.disarm();
    assert_eq!(status(), "frozen");

    // Its input ends without that word, as when the backup is killed (SIGKILL included):
    // the guard thaws the guest before it exits.
    let guard = spawn();
    drop(guard);
    assert_eq!(status(), "thawed");
    let (rc, _) = q
        .exec_sh(
            "echo ok > /mnt/vdb/f && sync /mnt/vdb/f",
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(rc, 0);
}

// ----- Changed-block tracking: persistent dirty bitmaps through `VmHandle` -----

/// A data disk without a filesystem: nothing in the guest writes to it unless told.
fn blank_disk(dir: &std::path::Path, target: &str, format: Format) -> PathBuf {
    let p = dir.join(format!("{target}.{}", format.as_str()));
    make_disk(
        &p,
        &DiskSpec {
            target: target.into(),
            format,
            size: 64 * MIB,
            ext4: false,
            fill_from: None,
        },
    )
    .unwrap();
    p
}

/// The `VmHandle` vmbackup uses for the plain QEMU VM of `t` (on its own QMP socket).
fn handle(t: &TestQemu) -> QemuVmHandle {
    QemuVmHandle::open(t.dir(), &VmRef::qemu(t.name()).unwrap()).unwrap()
}

/// An overlay for every disk of the VM, as a backup makes them, in the VM's folder.
fn overlays_of(h: &QemuVmHandle, dir: &std::path::Path, tag: &str) -> Vec<Overlay> {
    h.describe()
        .unwrap()
        .disks
        .into_iter()
        .map(|d| Overlay {
            overlay: dir.join(format!("{}.{tag}.qcow2", d.facts.target)),
            image: PathBuf::from(d.facts.source.unwrap()),
            format: d.format,
            node: d.node,
            target: d.facts.target,
        })
        .collect()
}

fn commit_back(h: &QemuVmHandle, overlays: &[Overlay]) {
    h.commit_back(overlays, &BackupSettings::default()).unwrap();
    for o in overlays {
        std::fs::remove_file(&o.overlay).unwrap();
    }
}

/// Writes `len` bytes at `offset` straight to the guest's disk with serial `serial`,
/// bypassing the page cache.
fn guest_write(q: &QemuVm, serial: &str, offset: u64, len: u64) {
    assert!(offset.is_multiple_of(4096) && len.is_multiple_of(4096));
    let script = format!(
        "for b in /sys/block/vd*; do [ \"$(cat $b/serial)\" = {serial} ] && dev=/dev/${{b##*/}}; done; \
         [ -n \"$dev\" ] && dd if=/dev/urandom of=$dev bs=4096 seek={} count={} oflag=direct conv=notrunc,fsync",
        offset / 4096,
        len / 4096
    );
    let (rc, out) = q.exec_sh(&script, Duration::from_secs(60)).unwrap();
    assert_eq!(rc, 0, "{script}: {out}");
}

/// Whether `[offset, offset + len)` lies inside the dirty ranges.
fn covered(ranges: &[(u64, u64)], offset: u64, len: u64) -> bool {
    ranges
        .iter()
        .any(|&(o, l)| o <= offset && offset + len <= o + l)
}

/// QEMU's own view of bitmap `name` of a qcow2 image (a copy, read-only): `qemu-nbd -r
/// --bitmap=NAME` started by `nbdinfo --map=qemu:dirty-bitmap:NAME`; merged dirty ranges.
fn qemu_dirty_ranges(img: &std::path::Path, name: &str) -> Vec<(u64, u64)> {
    let out = std::process::Command::new("nbdinfo")
        .arg("--json")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .args(["--", "[", "qemu-nbd", "-r", "-f", "qcow2"])
        .arg(format!("--bitmap={name}"))
        .arg(img)
        .arg("]")
        .output()
        .expect("nbdinfo (package libnbd-bin, see scripts/setup-host)");
    assert!(
        out.status.success(),
        "nbdinfo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let extents: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut dirty: Vec<(u64, u64)> = Vec::new();
    for e in extents {
        if e["type"].as_u64().unwrap() & 1 == 0 {
            continue;
        }
        let (off, len) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match dirty.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => dirty.push((off, len)),
        }
    }
    dirty
}

#[test]
fn a_snapshot_starts_a_persistent_bitmap_in_the_image_the_vm_leaves_that_records_every_later_write()
{
    let place = Place::new();
    let vdb = blank_disk(place.dir.path(), "vdb", Format::Qcow2);
    let vdc = blank_disk(place.dir.path(), "vdc", Format::Raw);
    let t = TestQemu::start(
        "qmp-bitmap",
        &[(vdb.clone(), "qcow2"), (vdc.clone(), "raw")],
        Duration::from_secs(180),
    )
    .expect("plain QEMU guest boots");
    let q = t.qemu();
    let h = handle(&t);
    let s = BackupSettings::default();

    // First backup's snapshot: the bitmap goes on the qcow2 disk only.
    let first = overlays_of(&h, t.dir(), "first");
    let tracked = h.snapshot(&first, false, Some("vmbackup-x"), &s).unwrap();
    assert_eq!(
        tracked,
        Tracked {
            targets: vec!["vdb".into()],
            failed: None,
            snapshot_ms: None,
        }
    );
    assert_eq!(h.running_on(&first).unwrap(), first);
    // The base file, which the VM left, holds the bitmap, saved (usable) and recording.
    let listed = qcow2_bitmaps::list(&vdb).unwrap();
    assert!(listed.consistent);
    let names: Vec<&str> = listed.bitmaps.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["vmbackup-x"]);
    let x = listed.get("vmbackup-x").unwrap();
    x.check_usable().unwrap();
    assert!(x.auto, "{x:?}");
    assert!(qcow2_bitmaps::dirty_ranges(&vdb, "vmbackup-x")
        .unwrap()
        .is_empty());
    // A raw image holds none.
    let raw = qcow2_bitmaps::list(&vdc).unwrap();
    assert_eq!(raw.format, qcow2_bitmaps::ImageFormat::NotQcow2);
    assert!(raw.bitmaps.is_empty());

    // A write while the VM runs on the overlay, committed back, and one after the commit.
    let (a, a_len) = (8 * MIB, 64 * 1024);
    let (b, b_len) = (40 * MIB + 4096, 8192);
    guest_write(q, "vdb", a, a_len);
    guest_write(q, "vdc", a, a_len);
    commit_back(&h, &first);
    guest_write(q, "vdb", b, b_len);

    // Second backup's snapshot, with its own bitmap.
    let second = overlays_of(&h, t.dir(), "second");
    let tracked = h.snapshot(&second, false, Some("vmbackup-y"), &s).unwrap();
    assert_eq!(tracked.targets, ["vdb"]);
    let listed = qcow2_bitmaps::list(&vdb).unwrap();
    let names: Vec<&str> = listed.bitmaps.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["vmbackup-x", "vmbackup-y"]);
    let dirty = qcow2_bitmaps::dirty_ranges(&vdb, "vmbackup-x").unwrap();
    let ranges = dirty.ranges().to_vec();
    // Both writes, whole granules around them, and nothing else (the commit copies the
    // overlay's 64 KiB clusters: within the default granule, the image's cluster size).
    let g = dirty.granularity;
    assert_eq!(g, 64 * 1024);
    let granules = |o: u64, l: u64| (o / g * g, (o + l).div_ceil(g) * g - o / g * g);
    assert_eq!(ranges, [granules(a, a_len), granules(b, b_len)]);
    assert!(covered(&ranges, a, a_len) && covered(&ranges, b, b_len));
    assert!(qcow2_bitmaps::dirty_ranges(&vdb, "vmbackup-y")
        .unwrap()
        .is_empty());
    // QEMU's own reading of the same bitmap, from a copy of the (read-only) base file.
    let copy = place.dir.path().join("vdb-copy.qcow2");
    std::fs::copy(&vdb, &copy).unwrap();
    assert_eq!(qemu_dirty_ranges(&copy, "vmbackup-x"), ranges);
    assert_eq!(qemu_dirty_ranges(&copy, "vmbackup-y"), []);

    commit_back(&h, &second);
    let files: Vec<String> = q.disks().unwrap().into_iter().map(|d| d.file).collect();
    assert_eq!(
        files,
        [
            vdb.to_string_lossy().into_owned(),
            vdc.to_string_lossy().into_owned()
        ]
    );
}

#[test]
fn drop_bitmaps_removes_only_the_chosen_vmbackup_bitmaps() {
    let place = Place::new();
    let vdb = blank_disk(place.dir.path(), "vdb", Format::Qcow2);
    let t = TestQemu::start(
        "qmp-dropbm",
        &[(vdb.clone(), "qcow2")],
        Duration::from_secs(180),
    )
    .expect("plain QEMU guest boots");
    let q = t.qemu();
    let h = handle(&t);
    let s = BackupSettings::default();
    let node = q.disks().unwrap()[0].node_name.clone();
    // Someone else's bitmap, one with our prefix on another node, and two backups'.
    q.add_bitmap(&node, "other").unwrap();
    for (i, id) in ["vmbackup-a", "vmbackup-b"].iter().enumerate() {
        let ov = overlays_of(&h, t.dir(), &format!("b{i}"));
        let tracked = h.snapshot(&ov, false, Some(id), &s).unwrap();
        assert_eq!(tracked.targets, ["vdb"]);
        guest_write(q, "vdb", (i as u64 + 1) * MIB, 4096);
        commit_back(&h, &ov);
        // Back on the original image's node: the one the bitmaps are on.
        assert_eq!(q.disks().unwrap()[0].node_name, node);
    }
    let on_node = |q: &QemuVm| {
        let mut n: Vec<String> = q
            .bitmaps()
            .unwrap()
            .into_iter()
            .filter(|b| b.node == node)
            .map(|b| b.name)
            .collect();
        n.sort();
        n
    };
    assert_eq!(on_node(q), ["other", "vmbackup-a", "vmbackup-b"]);
    assert!(q
        .bitmaps()
        .unwrap()
        .iter()
        .all(|b| b.persistent && b.recording && !b.inconsistent));

    let asked = std::cell::RefCell::new(Vec::new());
    let removed = h
        .drop_bitmaps(&|name| {
            asked.borrow_mut().push(name.to_string());
            name != "vmbackup-b"
        })
        .unwrap();
    assert_eq!(removed, ["vmbackup-a"]);
    let mut asked = asked.into_inner();
    asked.sort();
    assert_eq!(
        asked,
        ["vmbackup-a", "vmbackup-b"],
        "asked about a foreign bitmap"
    );
    assert_eq!(on_node(q), ["other", "vmbackup-b"]);
    // Dropping everything of ours still leaves the foreign one.
    assert_eq!(h.drop_bitmaps(&|_| true).unwrap(), ["vmbackup-b"]);
    assert_eq!(on_node(q), ["other"]);
    assert_eq!(h.drop_bitmaps(&|_| true).unwrap(), Vec::<String>::new());

    // The image file agrees once QEMU has saved it (a snapshot leaves it read-only).
    let ov = overlays_of(&h, t.dir(), "last");
    h.snapshot(&ov, false, None, &s).unwrap();
    let listed = qcow2_bitmaps::list(&vdb).unwrap();
    let names: Vec<&str> = listed.bitmaps.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["other"]);
    listed.get("other").unwrap().check_usable().unwrap();
    commit_back(&h, &ov);
}

#[test]
fn a_bitmap_that_cannot_be_started_leaves_an_untracked_snapshot_that_commits_back() {
    let place = Place::new();
    let vdb = disk(place.dir.path(), "vdb", Format::Qcow2);
    let t = TestQemu::start(
        "qmp-bmfail",
        &[(vdb.clone(), "qcow2")],
        Duration::from_secs(180),
    )
    .expect("plain QEMU guest boots");
    let q = t.qemu();
    let h = handle(&t);
    let s = BackupSettings::default();
    // A bitmap of that name is already on the disk: the transaction with it fails.
    let node = q.disks().unwrap()[0].node_name.clone();
    q.add_bitmap(&node, "vmbackup-dup").unwrap();

    let ov = overlays_of(&h, t.dir(), "dup");
    let tracked = h.snapshot(&ov, false, Some("vmbackup-dup"), &s).unwrap();
    assert!(tracked.targets.is_empty(), "{tracked:?}");
    let why = tracked.failed.expect("the reason the bitmap failed");
    assert!(why.contains("vmbackup-dup"), "{why}");
    // Snapshotted all the same: the VM runs on its overlay, the base has only the old bitmap.
    assert_eq!(h.running_on(&ov).unwrap(), ov);
    let (rc, out) = q
        .exec_sh(
            "echo during > /mnt/vdb/g && sync /mnt/vdb/g",
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(rc, 0, "{out}");
    commit_back(&h, &ov);
    assert_eq!(q.disks().unwrap()[0].file, vdb.to_string_lossy());
    let names: Vec<String> = q.bitmaps().unwrap().into_iter().map(|b| b.name).collect();
    assert_eq!(names, ["vmbackup-dup"]);
    let (rc, out) = q
        .exec_sh("cat /mnt/vdb/g", Duration::from_secs(60))
        .unwrap();
    assert_eq!((rc, out.as_str()), (0, "during\n"));
}
