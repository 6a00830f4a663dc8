//! The QMP path on a real plain QEMU (not managed by libvirt) running the test guest.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
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
