//! The QMP path on a real plain QEMU (not managed by libvirt) running the test guest.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use vmbackup::testqemu::TestQemu;
use vmbackup::testvm::{make_disk, DiskSpec, Format};

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
    q.snapshot(&overlays).unwrap();
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
    let r = vmbackup(
        &place,
        &[
            "--qemu-dir",
            &dir,
            "backup",
            &target,
            "--quiesce",
            "required",
        ],
    );
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
