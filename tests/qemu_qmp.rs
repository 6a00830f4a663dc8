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
