//! Bad input (issue 13): odd VM names and image paths, images that are not whole disks,
//! nonsense settings and backups that cannot be restored. Each is either handled (backup and
//! restore round-trip) or refused with a clear message before anything is touched: never a
//! late failure after a snapshot.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use vmbackup::hypervisor::vm::VmSpec;
use vmbackup_testkit::libvirt_vm::{make_disk, DiskSpec, Format, TestVm, TestVmBuilder};
use vmbackup_testkit::qemu_vm::TestQemu;

fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// What a refused command must leave as it was: the definition, the files beside the
/// images (no overlay), the image files' bytes and the VM's checkpoints.
#[derive(Debug, PartialEq)]
struct Untouched {
    xml: String,
    files: Vec<String>,
    digests: Vec<String>,
    checkpoints: Vec<String>,
}

fn untouched(vm: &TestVm) -> Untouched {
    Untouched {
        xml: vm.dom().inactive_xml().unwrap(),
        files: files_in(vm.dir()),
        digests: vm
            .disk_paths()
            .iter()
            .map(|p| vmbackup::digest::sha256_hex(&std::fs::read(p).unwrap()))
            .collect(),
        checkpoints: vm.dom().checkpoints().unwrap(),
    }
}

/// The backup ids `vmbackup list` shows.
fn listed(place: &Place) -> Vec<String> {
    let r = vmbackup(place, &["list"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.json["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// The JSON document and the standard error of a run.
fn error_text(r: &Run) -> String {
    format!("{} {}", r.json, r.stderr)
}

/// libvirt takes domain names far longer than ours (it shortens them itself where it makes
/// files); vmbackup takes names of up to 200 characters. The overlay file name names the VM
/// once, so a 200-character name still fits into NAME_MAX (255 bytes); a 201-character name
/// is refused (exit 2) before the VM or the repository is touched. 106 and 107 are the
/// lengths where an overlay name that named the VM twice stopped fitting.
#[test]
fn long_vm_names_are_backed_up_or_refused_before_anything_is_touched() {
    for len in [106, 107, 200, 201] {
        let vm = TestVmBuilder::new("long")
            .name_len(len)
            .blank_disk("vdb", Format::Qcow2, 32 * MIB)
            .start()
            .expect("guest boots");
        assert_eq!(vm.name().len(), len);
        let place = Place::new();
        let before = untouched(&vm);
        let check = vmbackup(&place, &["check", vm.name()]);
        let backup = vmbackup(&place, &["backup", vm.name(), "--quiesce", "required"]);
        if len > 200 {
            for r in [&check, &backup] {
                assert_eq!(r.code, 2, "{len}: {}", r.stderr);
                assert!(
                    error_text(r).contains("longer than 200 characters"),
                    "{len}: {}",
                    error_text(r)
                );
            }
            assert_eq!(untouched(&vm), before, "{len}: the refusal changed the VM");
            assert!(!place.repo().join("backups").exists());
            continue;
        }
        assert_eq!(check.code, 0, "{len}: {}", check.stderr);
        assert_eq!(backup.code, 0, "{len}: {}", backup.stderr);
        let id = backup.json["results"][0]["backup"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        // A second, incremental backup reads the first one's bitmap, named after its id.
        let second = backup_id(&place, &[vm.name(), "--quiesce", "required"]);
        let mut ids = listed(&place);
        ids.sort();
        let mut want = vec![id.clone(), second.clone()];
        want.sort();
        assert_eq!(ids, want, "{len}");
        // The VM is back on its image, and no overlay is left.
        assert_eq!(files_in(vm.dir()), before.files, "{len}");
        let live = VmSpec::from_xml(&vm.dom().live_xml().unwrap()).unwrap();
        assert_eq!(
            live.disks[0].source.as_deref(),
            Some(path_str(&vm.disk_paths()[0])),
            "{len}"
        );
        let r = vmbackup(&place, &["verify"]);
        assert_eq!(r.code, 0, "{len}: {}", r.stderr);
    }
}

/// File names with a space, quotes, a comma, a colon and `&` (all of them legal in paths,
/// and each special to XML, QEMU's option syntax or a shell): a shut-off VM with such disks
/// is backed up, and restored onto the same files with their contents of the backup; then,
/// running, it is backed up twice (snapshot, checkpoint, incremental read, commit back).
#[test]
fn odd_image_paths_round_trip_through_backup_and_restore() {
    let names = [
        ("vdb", "with space.qcow2", Format::Qcow2),
        ("vdc", "it's \"quoted\".raw", Format::Raw),
        ("vdd", "com,ma.qcow2", Format::Qcow2),
        ("vde", "co:lon.raw", Format::Raw),
        ("vdf", "a&b <c>.qcow2", Format::Qcow2),
    ];
    let mut b = TestVmBuilder::new("paths");
    for (t, f, fmt) in names {
        b = b.disk(t, fmt, 16 * MIB).disk_file_name(t, f);
    }
    let vm = b.define().expect("domain defined");
    for ((_, f, _), p) in names.iter().zip(vm.disk_paths()) {
        assert_eq!(p.file_name().unwrap().to_str(), Some(*f));
    }
    let place = Place::new();
    // Copies of the images as backed up, to compare the restored ones with.
    let copies: Vec<PathBuf> = (0..names.len())
        .map(|i| place.dir.path().join(format!("copy{i}")))
        .collect();
    for ((p, c), (t, _, fmt)) in vm.disk_paths().iter().zip(&copies).zip(&names) {
        std::fs::copy(p, c).unwrap();
        // Something recognisable at 1 MiB in each disk.
        run_ok(
            "qemu-io",
            &[
                "-f",
                fmt.as_str(),
                "-c",
                &format!("write -P 0x{:02x} 1M 64k", t.as_bytes()[2]),
                path_str(p),
            ],
        );
        std::fs::copy(p, c).unwrap();
    }
    let id = backup_id(&place, &[vm.name()]);
    let before = vm.dom().inactive_xml().unwrap();

    // Change every disk, then restore.
    for (p, (_, _, fmt)) in vm.disk_paths().iter().zip(&names) {
        run_ok(
            "qemu-io",
            &["-f", fmt.as_str(), "-c", "write -P 0x55 0 2M", path_str(p)],
        );
    }
    let r = vmbackup(&place, &["restore", &id, "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for ((p, c), (_, _, fmt)) in vm.disk_paths().iter().zip(&copies).zip(&names) {
        run_ok(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                fmt.as_str(),
                "-F",
                fmt.as_str(),
                path_str(c),
                path_str(p),
            ],
        );
    }
    let spec = VmSpec::from_xml(&vm.dom().inactive_xml().unwrap()).unwrap();
    let sources: Vec<Option<&str>> = spec.disks.iter().map(|d| d.source.as_deref()).collect();
    let want: Vec<Option<&str>> = vm.disk_paths().iter().map(|p| p.to_str()).collect();
    assert_eq!(sources, want);
    assert_eq!(
        VmSpec::from_xml(&before).unwrap().uuid,
        spec.uuid,
        "the restore defined another VM"
    );
    // No temporary or overlay is left beside the images.
    let mut want_files: Vec<String> = names.iter().map(|(_, f, _)| f.to_string()).collect();
    want_files.sort();
    let mut files = files_in(vm.dir());
    files.retain(|f| f != "console.log");
    assert_eq!(files, want_files);

    // Running, the same paths go through the snapshot, the checkpoint and the commit back.
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    backup_id(&place, &[vm.name(), "--quiesce", "required"]);
    backup_id(&place, &[vm.name(), "--quiesce", "required"]);
    let live = VmSpec::from_xml(&vm.dom().live_xml().unwrap()).unwrap();
    let sources: Vec<Option<&str>> = live.disks.iter().map(|d| d.source.as_deref()).collect();
    assert_eq!(sources, want, "the VM was left on an overlay");
    let mut files = files_in(vm.dir());
    files.retain(|f| f != "console.log");
    assert_eq!(files, want_files, "an overlay was left");
    let r = vmbackup(&place, &["verify"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// A qcow2 image with a backing file (a template's overlay) is not a whole disk: `check`
/// and `backup` refuse it in pre-flight (exit 3), before any freeze or snapshot; the
/// definition, the files and the checkpoints stay as they were.
#[test]
fn a_disk_with_a_backing_file_is_refused_before_any_snapshot() {
    let vm = TestVmBuilder::new("backing")
        .blank_disk("vdb", Format::Qcow2, 32 * MIB)
        .define()
        .expect("domain defined");
    // vdb becomes an overlay of a base image beside it.
    let image = vm.disk_paths()[0].clone();
    let base = vm.dir().join("base.qcow2");
    std::fs::rename(&image, &base).unwrap();
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            path_str(&base),
            "-F",
            "qcow2",
            path_str(&image),
        ],
    );
    let place = Place::new();
    let check_both = |vm: &TestVm, how: &str| {
        let before = untouched(vm);
        let base_digest = vmbackup::digest::sha256_hex(&std::fs::read(&base).unwrap());
        for cmd in ["check", "backup"] {
            let r = vmbackup(&place, &[cmd, vm.name()]);
            assert_eq!(r.code, 3, "{how} {cmd}: {}", r.stderr);
            let text = r.json.to_string();
            assert!(text.contains("backing file"), "{how} {cmd}: {text}");
        }
        assert_eq!(untouched(vm), before, "{how}: the refusal changed the VM");
        assert_eq!(
            vmbackup::digest::sha256_hex(&std::fs::read(&base).unwrap()),
            base_digest
        );
        assert!(listed(&place).is_empty());
    };
    check_both(&vm, "shut off");
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    check_both(&vm, "running");
    let live = VmSpec::from_xml(&vm.dom().live_xml().unwrap()).unwrap();
    assert_eq!(live.disks[0].source.as_deref(), Some(path_str(&image)));
}

/// Zero or negative timeouts, catch-up windows and slot capacities, in the config file or
/// as flags: exit 2 naming the setting, and neither the VM nor the repository nor the
/// schedules change. The same commands with sane settings succeed (so the refusals are the
/// settings' doing).
#[test]
fn zero_or_negative_timeouts_catch_up_and_capacity_are_bad_input() {
    let vm = TestVmBuilder::new("settings")
        .blank_disk("vdb", Format::Qcow2, 16 * MIB)
        .no_agent()
        .define()
        .expect("domain defined");
    let place = Place::new();
    let config = place.dir.path().join("config.toml");
    let cfg = config.to_str().unwrap().to_string();
    let backup = |extra: &[&str]| {
        let mut a = vec!["--config", cfg.as_str()];
        a.extend(extra);
        a.extend(["backup", vm.name()]);
        vmbackup(&place, &a)
    };
    let schedule = |extra: &[&str]| {
        let mut a = vec!["--config", cfg.as_str()];
        a.extend(extra);
        a.extend([
            "schedule", "add", "nightly", "--type", "daily", "--tz", "UTC", "--slot", "2", "--vm",
        ]);
        a.push(vm.name());
        vmbackup(&place, &a)
    };
    let run_due = |extra: &[&str]| {
        let mut a = vec!["--config", cfg.as_str()];
        a.extend(extra);
        a.push("run-due");
        vmbackup(&place, &a)
    };
    let schedules = || {
        let r = vmbackup(&place, &["schedule", "list"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        r.json["schedules"].as_array().map_or(0, Vec::len)
    };
    let before = untouched(&vm);
    let file_cases = [
        ("commit_timeout_secs = 0", "commit_timeout_secs"),
        ("commit_timeout_secs = -1", "commit_timeout_secs"),
        ("freeze_timeout_secs = 0", "freeze_timeout_secs"),
        ("freeze_timeout_secs = -10", "freeze_timeout_secs"),
        ("slot_capacity = 0", "slot_capacity"),
        ("slot_capacity = -2", "slot_capacity"),
        ("catch_up_minutes = 0", "catch_up_minutes"),
        ("catch_up_minutes = -60", "catch_up_minutes"),
    ];
    for (line, key) in file_cases {
        std::fs::write(&config, line).unwrap();
        for (what, r) in [
            ("backup", backup(&[])),
            ("schedule add", schedule(&[])),
            ("run-due", run_due(&[])),
        ] {
            assert_eq!(r.code, 2, "{line}: {what}: {}", r.stderr);
            assert!(r.stderr.contains(key), "{line}: {what}: {}", r.stderr);
        }
    }
    std::fs::write(&config, "").unwrap();
    let flag_cases: [&[&str]; 6] = [
        &["--freeze-timeout", "0"],
        &["--freeze-timeout=-1"],
        &["--slot-capacity", "0"],
        &["--slot-capacity=-1"],
        &["--catch-up-minutes", "0"],
        &["--catch-up-minutes=-5"],
    ];
    for flags in flag_cases {
        for (what, r) in [
            ("backup", backup(flags)),
            ("schedule add", schedule(flags)),
            ("run-due", run_due(flags)),
        ] {
            assert_eq!(r.code, 2, "{flags:?}: {what}: {}", r.stderr);
        }
    }
    assert_eq!(untouched(&vm), before, "a refusal changed the VM");
    assert!(listed(&place).is_empty());
    assert_eq!(schedules(), 0);

    // Sane values: the same commands succeed.
    std::fs::write(
        &config,
        "commit_timeout_secs = 60\nfreeze_timeout_secs = 5\nslot_capacity = 1\ncatch_up_minutes = 1",
    )
    .unwrap();
    let r = schedule(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = backup(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(listed(&place).len(), 1);
    assert_eq!(schedules(), 1);
}

/// A plain QEMU VM's backup keeps QEMU's block graph, not a domain XML: restoring it as a
/// libvirt VM is refused as bad input (exit 2, the request cannot be carried out for this
/// kind of backup) with a message that says so, with or without `--as`, and nothing is
/// defined or written.
#[test]
fn restoring_a_plain_qemu_backup_onto_libvirt_is_refused_clearly() {
    let place = Place::new();
    let vdb = place.dir.path().join("vdb.qcow2");
    make_disk(
        &vdb,
        &DiskSpec {
            target: "vdb".into(),
            format: Format::Qcow2,
            size: 32 * MIB,
            ext4: true,
            fill_from: None,
        },
    )
    .unwrap();
    let t = TestQemu::start(
        "restore",
        &[(vdb.clone(), "qcow2")],
        Duration::from_secs(180),
    )
    .expect("plain QEMU guest boots");
    let dir = t.dir().to_string_lossy().into_owned();
    let target = format!("qemu:{}", t.name());
    let id = backup_id(&place, &["--qemu-dir", &dir, &target]);
    let as_name = format!("{}-as", t.name());
    let lv = vmbackup::hypervisor::libvirt::Libvirt::open("qemu:///system").unwrap();
    let before = files_in(place.dir.path());
    for args in [
        &["restore", id.as_str(), "--force"][..],
        &["restore", id.as_str(), "--force", "--power-off"],
        &["restore", id.as_str(), "--as", as_name.as_str()],
        &[
            "restore",
            id.as_str(),
            "--force",
            "--instant",
            "--power-off",
        ],
    ] {
        let r = vmbackup(&place, args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("plain QEMU") && !r.stderr.contains("XML:"),
            "{args:?}: {}",
            r.stderr
        );
        assert!(lv.find_domain(t.name()).unwrap().is_none());
        assert!(lv.find_domain(&as_name).unwrap().is_none());
    }
    // No restore temporary beside the image, and the plain QEMU VM still runs on it.
    assert_eq!(files_in(place.dir.path()), before);
    let disks = t.qemu().disks().unwrap();
    assert_eq!(disks[0].file, path_str(&vdb));
}

/// A newline in an image path does not survive libvirt: its XML writer keeps the newline
/// raw, and every XML reader (libvirt's own after a restart, vmbackup's) reads it back as a
/// space. vmbackup therefore sees a path that does not exist, and refuses the VM in
/// pre-flight (exit 3, naming the disk) instead of failing half-way.
#[test]
fn a_newline_in_an_image_path_is_refused_in_pre_flight() {
    let vm = TestVmBuilder::new("newline")
        .disk("vdb", Format::Raw, 16 * MIB)
        .disk_file_name("vdb", "new\nline.raw")
        .define()
        .expect("domain defined");
    let place = Place::new();
    let before = untouched(&vm);
    for cmd in ["check", "backup"] {
        let r = vmbackup(&place, &[cmd, vm.name()]);
        assert_eq!(r.code, 3, "{cmd}: {}", r.stderr);
        let text = error_text(&r);
        assert!(
            text.contains("vdb") && text.contains("does not exist"),
            "{cmd}: {text}"
        );
    }
    assert_eq!(untouched(&vm), before);
    assert!(listed(&place).is_empty());
}
