//! `vmbackup check` and `vmbackup backup` against real libvirt domains running real guests.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use vmbackup::hypervisor::vm::VmSpec;
use vmbackup::repository::disk::{restore_disk, DiskIndex};
use vmbackup::repository::Repository;
use vmbackup_testkit::libvirt_vm::{self, Format, TestVm, TestVmBuilder};

fn disk_sources(xml: &str) -> Vec<String> {
    VmSpec::from_xml(xml)
        .unwrap()
        .disks
        .into_iter()
        .map(|d| d.source.unwrap_or_default())
        .collect()
}

fn vm_paths(vm: &TestVm) -> Vec<String> {
    vm.disk_paths()
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

fn record_count(vm: &TestVm, file: &str) -> u64 {
    vm.sh(&format!("cat {file} 2>/dev/null | wc -l"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn wait_records(vm: &TestVm, file: &str, n: u64) {
    let start = Instant::now();
    while record_count(vm, file) < n {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the writer did not reach {n} records"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Restores one disk of a backup into a raw file with the library (the restore command is
/// another issue's), so the test can look inside it.
fn restore_disk_of(repo_dir: &Path, id: &str, target: &str, out: &Path) {
    let repo = Repository::open(repo_dir).unwrap();
    let m = repo.load(id).unwrap();
    let d = m.disks.iter().find(|d| d.target == target).unwrap();
    let bytes = repo.store().get(&d.index_object).unwrap();
    let index = DiskIndex::decode(&bytes).unwrap();
    restore_disk(&repo, &index, out, 2, &|_, _| {}).unwrap();
}

/// A state that a refused backup must leave exactly as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    inactive_xml: String,
    live_xml: String,
    files: Vec<String>,
    backups: Value,
}

fn snapshot(vm: &TestVm, place: &Place) -> Snapshot {
    Snapshot {
        inactive_xml: vm.dom().inactive_xml().unwrap(),
        live_xml: vm.dom().live_xml().unwrap(),
        files: files_in(vm.dir()),
        backups: vmbackup(place, &["list"]).json["backups"].clone(),
    }
}

fn failed_checks(run: &Run) -> Vec<String> {
    let mut v = Vec::new();
    for vm in run.json["vms"].as_array().into_iter().flatten() {
        for c in vm["report"]["checks"].as_array().into_iter().flatten() {
            if c["ok"] == json!(false) {
                v.push(c["name"].as_str().unwrap().to_string());
            }
        }
    }
    v
}

#[test]
fn live_quiesced_backup_holds_a_prefix_of_the_records_and_leaves_the_vm_as_it_was() {
    let vm = TestVmBuilder::new("bk-live")
        .disk("vdb", Format::Qcow2, 256 * MIB)
        .disk("vdc", Format::Raw, 128 * MIB)
        .start()
        .expect("guest boots");
    vm.sh("dd if=/dev/urandom of=/mnt/vdc/random bs=1M count=8 2>/dev/null && sync")
        .unwrap();
    let random_sum = vm.sh("sha256sum < /mnt/vdc/random").unwrap();
    vm.sh("vmb-writer start /mnt/vdb/records").unwrap();
    wait_records(&vm, "/mnt/vdb/records", 20);

    let place = Place::new();
    let r = vmbackup(&place, &["backup", vm.name(), "--quiesce", "required"]);
    assert_eq!(r.code, 0, "backup failed: {}", r.stderr);
    eprintln!("vmbackup said:\n{}\n{}", r.stderr, r.json);
    let b = &r.json["results"][0]["backup"];
    assert_eq!(b["consistency"], "application", "{b}");
    assert!(
        b["freeze_ms"].as_u64().is_some(),
        "no freeze duration in {b}"
    );
    let id = b["id"].as_str().unwrap().to_string();

    // The guest was thawed: the agent says so, and the writer goes on writing.
    let status = vm
        .dom()
        .agent_command(
            &json!({"execute": "guest-fsfreeze-status"}),
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(status, json!("thawed"));
    let n1 = record_count(&vm, "/mnt/vdb/records");
    wait_records(&vm, "/mnt/vdb/records", n1 + 5);

    // The VM runs on its original images again, in both definitions; no overlay is left.
    assert_eq!(disk_sources(&vm.dom().live_xml().unwrap()), vm_paths(&vm));
    assert_eq!(
        disk_sources(&vm.dom().inactive_xml().unwrap()),
        vm_paths(&vm)
    );
    assert_eq!(
        files_in(vm.dir()),
        ["console.log", "vdb.qcow2", "vdc.raw"],
        "files besides the VM's own were left"
    );

    // The backup holds a prefix of what the guest wrote, with no torn record.
    vm.sh("vmb-writer stop").unwrap();
    let written = vm.read_file("/mnt/vdb/records").unwrap();
    let out = place.dir.path().join("vdb.raw");
    restore_disk_of(&place.repo(), &id, "vdb", &out);
    let held = read_from_ext4(&out, "/records");
    let check = libvirt_vm::check_records(&held);
    assert!(
        check.bad.is_empty(),
        "torn or bad records in the backup: {:?}",
        check.bad
    );
    assert!(
        check.valid >= 20,
        "only {} records in the backup",
        check.valid
    );
    assert!(
        written.starts_with(&held),
        "the backup's records are not a prefix of the guest's"
    );
    // The second disk came along, byte for byte.
    let out_c = place.dir.path().join("vdc.raw");
    restore_disk_of(&place.repo(), &id, "vdc", &out_c);
    let random = read_from_ext4(&out_c, "/random");
    assert_eq!(
        vmbackup::digest::sha256_hex(&random),
        random_sum.split_whitespace().next().unwrap()
    );

    // list and show describe it.
    let l = vmbackup(&place, &["list", vm.name()]);
    assert_eq!(l.code, 0);
    let row = &l.json["backups"][0];
    assert_eq!(row["id"], json!(id));
    assert_eq!(row["disks"], json!(["vdb", "vdc"]));
    assert_eq!(row["vm_uuid"], json!(vm.dom().uuid().unwrap()));
    let s = vmbackup(&place, &["show", &id]);
    assert_eq!(s.code, 0);
    assert_eq!(s.json["manifest"]["vm_name"], json!(vm.name()));
    assert_eq!(s.json["manifest"]["disks"][0]["format"], json!("qcow2"));
}

#[test]
fn a_disk_over_2032_gib_is_refused_and_nothing_changes() {
    let vm = TestVmBuilder::new("bk-2033")
        .blank_disk("vdb", Format::Qcow2, 2033 * GIB)
        .define()
        .unwrap();
    let place = Place::new();
    let before = snapshot(&vm, &place);
    let c = vmbackup(&place, &["check", vm.name()]);
    assert_eq!(c.code, 3, "{}", c.stderr);
    assert_eq!(failed_checks(&c), ["disk-size:vdb"]);
    let chk = &c.json["vms"][0]["report"]["checks"][0];
    assert_eq!(chk["found"], json!(2033 * GIB));
    assert_eq!(chk["limit"], json!(2032 * GIB));
    let b = vmbackup(&place, &["backup", vm.name()]);
    assert_eq!(b.code, 3, "{}", b.stderr);
    assert!(b.json["results"][0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("exceeds the limit of 2032.00 GiB"));
    assert_eq!(snapshot(&vm, &place), before);
}

#[test]
fn disks_plus_memory_over_4000_gib_are_refused() {
    let vm = TestVmBuilder::new("bk-4000")
        .blank_disk("vdb", Format::Qcow2, 2000 * GIB)
        .blank_disk("vdc", Format::Qcow2, 2000 * GIB)
        .define()
        .unwrap();
    let place = Place::new();
    let before = snapshot(&vm, &place);
    let c = vmbackup(&place, &["check", vm.name()]);
    assert_eq!(c.code, 3);
    assert_eq!(failed_checks(&c), ["total-size"]);
    assert_eq!(vmbackup(&place, &["backup", vm.name()]).code, 3);
    assert_eq!(snapshot(&vm, &place), before);
}

/// A small tmpfs, unmounted when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn new(dir: PathBuf, size: &str) -> SmallFs {
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            // mode=0755: a tmpfs root is 1777, and an overlay folder others may write to is
            // refused.
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        SmallFs(dir)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn too_little_room_for_overlays_is_refused_and_the_vm_keeps_running_unchanged() {
    let vm = TestVmBuilder::new("bk-headroom")
        .disk("vdb", Format::Qcow2, GIB)
        .start()
        .expect("guest boots");
    let place = Place::new();
    let small = SmallFs::new(place.dir.path().join("overlays"), "64m");
    let before = snapshot(&vm, &place);
    let ov = small.0.to_string_lossy().into_owned();
    let c = vmbackup(&place, &["--overlay-dir", &ov, "check", vm.name()]);
    assert_eq!(c.code, 3, "{}", c.stderr);
    assert_eq!(failed_checks(&c), ["overlay-space"]);
    let b = vmbackup(&place, &["--overlay-dir", &ov, "backup", vm.name()]);
    assert_eq!(b.code, 3);
    assert_eq!(snapshot(&vm, &place), before);
    assert!(files_in(&small.0).is_empty());
    // With the default headroom check satisfied elsewhere, the same VM passes.
    assert_eq!(vmbackup(&place, &["check", vm.name()]).code, 0);
}

#[test]
fn a_repository_too_small_for_the_data_is_refused() {
    let (_fill, spec) = filled_disk("vdb", 128 * MIB, 24);
    let vm = TestVmBuilder::new("bk-reposize")
        .disk_spec(spec)
        .define()
        .unwrap();
    let place = Place::new();
    let small = SmallFs::new(place.dir.path().join("small-repo"), "8m");
    let repo = small.0.join("repo");
    let c = vmbackup_at(&repo, &place.state(), &["check", vm.name()]);
    assert_eq!(c.code, 3, "{}", c.stderr);
    assert_eq!(failed_checks(&c), ["repository-space"]);
    let before_xml = vm.dom().inactive_xml().unwrap();
    let b = vmbackup_at(&repo, &place.state(), &["backup", vm.name()]);
    assert_eq!(b.code, 3);
    assert_eq!(vm.dom().inactive_xml().unwrap(), before_xml);
    assert!(!repo.join("backups").exists() || files_in(&repo.join("backups")).is_empty());
}

#[test]
fn without_an_agent_channel_required_refuses_and_preferred_is_crash_consistent() {
    let vm = TestVmBuilder::new("bk-noagent")
        .no_agent()
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest starts");
    let place = Place::new();
    let before = snapshot(&vm, &place);
    let r = vmbackup(&place, &["backup", vm.name(), "--quiesce", "required"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(snapshot(&vm, &place), before);

    let r = vmbackup(&place, &["backup", vm.name(), "--quiesce", "preferred"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let b = &r.json["results"][0]["backup"];
    assert_eq!(b["consistency"], "crash");
    assert!(b["consistency_reason"]
        .as_str()
        .unwrap()
        .contains("no guest agent channel"));
    assert_eq!(disk_sources(&vm.dom().live_xml().unwrap()), vm_paths(&vm));
    assert_eq!(
        disk_sources(&vm.dom().inactive_xml().unwrap()),
        vm_paths(&vm)
    );
}

#[test]
fn an_agent_that_does_not_answer_does_not_hold_the_backup_past_the_freeze_deadline() {
    let vm = TestVmBuilder::new("bk-deadagent")
        .cmdline("vmbackup.noagent")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .define()
        .unwrap();
    vm.dom().start().unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(vm.console_path())
        .unwrap_or_default()
        .contains("no guest agent")
    {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "guest did not boot\n{}",
            vm.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let place = Place::new();
    let before = snapshot(&vm, &place);
    let r = vmbackup(
        &place,
        &[
            "--freeze-timeout",
            "3",
            "backup",
            vm.name(),
            "--quiesce",
            "required",
        ],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(snapshot(&vm, &place), before);

    let t = Instant::now();
    let r = vmbackup(
        &place,
        &[
            "--freeze-timeout",
            "3",
            "backup",
            vm.name(),
            "--quiesce",
            "preferred",
        ],
    );
    let took = t.elapsed();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let b = &r.json["results"][0]["backup"];
    assert_eq!(b["consistency"], "crash");
    assert!(b["freeze_ms"].is_null());
    assert!(b["consistency_reason"].as_str().unwrap().contains("freeze"));
    // The whole backup (64 MiB disk) ends well before a hung agent call would (libvirt's
    // default waits without end).
    assert!(took < Duration::from_secs(60), "the backup took {took:?}");
}

#[test]
fn a_second_backup_of_an_unchanged_vm_adds_under_one_percent() {
    let (_fill, spec) = filled_disk("vdb", 256 * MIB, 48);
    let vm = TestVmBuilder::new("bk-dedup")
        .disk_spec(spec)
        .disk("vdc", Format::Raw, 64 * MIB)
        .start()
        .expect("guest boots");
    let place = Place::new();
    let first = vmbackup(&place, &["backup", vm.name(), "--quiesce", "required"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let second = vmbackup(&place, &["backup", vm.name(), "--quiesce", "required"]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    let id = second.json["results"][0]["backup"]["id"].as_str().unwrap();
    let m = vmbackup(&place, &["show", id]).json["manifest"].clone();
    let allocated: u64 = m["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["allocated_size"].as_u64().unwrap())
        .sum();
    let added = second.json["results"][0]["backup"]["stored_bytes"]
        .as_u64()
        .unwrap();
    assert!(allocated > 48 * MIB, "allocated {allocated}");
    assert!(
        added * 100 < allocated,
        "the second backup added {added} bytes of {allocated} allocated"
    );
}

#[test]
fn a_shut_off_vm_is_backed_up_without_snapshot_and_cannot_start_on_a_disk_being_read() {
    let vm = TestVmBuilder::new("bk-off")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .define()
        .unwrap();
    let place = Place::new();
    let r = vmbackup(&place, &["backup", vm.name(), "--quiesce", "required"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let b = &r.json["results"][0]["backup"];
    assert_eq!(b["consistency"], "application");
    assert!(b["consistency_reason"]
        .as_str()
        .unwrap()
        .contains("shut off"));
    assert_eq!(
        files_in(vm.dir()),
        ["vdb.qcow2"],
        "a snapshot overlay was made"
    );

    // While vmbackup reads the image, QEMU cannot open it for writing: the VM does not start.
    let held = vmbackup::image::forbid_writers(&vm.disk_paths()[0]).unwrap();
    assert!(
        vm.dom().start().is_err(),
        "the VM started on a disk being read"
    );
    drop(held);
    // Under load, a TCG QEMU right after a failed start sometimes exits while libvirt connects
    // to its monitor, without a word; one more try is allowed for that, never for a lock error.
    let mut started = vm.dom().start();
    if let Err(e) = &started {
        let msg = vmbackup::error::chain(e);
        assert!(!msg.contains("lock"), "the image is still locked: {msg}");
        eprintln!("start failed ({msg}); trying once more");
        std::thread::sleep(Duration::from_secs(2));
        started = vm.dom().start();
    }
    started.expect("the VM starts once the read is over");
    // And a running VM's image cannot be taken for a shut-off backup read.
    assert!(vmbackup::image::forbid_writers(&vm.disk_paths()[0]).is_err());
}

/// What a backup killed between its snapshot and its commit back leaves: the VM running on a
/// vmbackup overlay (named as vmbackup names them), made here with virsh.
fn leave_on_overlay(vm: &TestVm, tag: &str) -> PathBuf {
    let overlay = vm.dir().join(format!(
        "{}.vdb.vmbackup-{}-{tag}.qcow2",
        vm.name(),
        vm.name()
    ));
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system", "snapshot-create-as", vm.name()])
        .args(["--disk-only", "--no-metadata", "--atomic", "--diskspec"])
        .arg(format!("vdb,snapshot=external,file={}", overlay.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let live = vm.dom().live_xml().unwrap();
    assert_eq!(
        disk_sources(&live),
        vec![overlay.to_string_lossy().into_owned()]
    );
    overlay
}

#[test]
fn a_backup_killed_between_snapshot_and_commit_is_finished_by_recover_and_by_the_next_backup() {
    let vm = TestVmBuilder::new("bk-recover")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let image = vm_paths(&vm);
    let place = Place::new();

    // `recover` commits the overlay back, pivots, fixes the definition, deletes the overlay.
    let ov = leave_on_overlay(&vm, "first");
    vm.write_file("/mnt/vdb/on-overlay", b"written while on the overlay")
        .unwrap();
    let r = vmbackup(&place, &["recover", vm.name()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json["recover"]["disks"][0]["disk"], "vdb");
    assert_eq!(disk_sources(&vm.dom().live_xml().unwrap()), image);
    assert_eq!(disk_sources(&vm.dom().inactive_xml().unwrap()), image);
    assert!(!ov.exists(), "the overlay is deleted");
    assert_eq!(
        vm.read_file("/mnt/vdb/on-overlay").unwrap(),
        b"written while on the overlay"
    );

    // The next backup of the VM does the same first, then backs up what the guest wrote.
    let ov = leave_on_overlay(&vm, "second");
    vm.write_file("/mnt/vdb/second", b"second overlay").unwrap();
    vm.sh("sync").unwrap();
    let b = vmbackup(&place, &["backup", vm.name(), "--quiesce", "required"]);
    assert_eq!(b.code, 0, "{}", b.stderr);
    assert_eq!(disk_sources(&vm.dom().live_xml().unwrap()), image);
    assert_eq!(disk_sources(&vm.dom().inactive_xml().unwrap()), image);
    assert!(!ov.exists());
    assert!(
        files_in(vm.dir()).iter().all(|f| !f.contains(".vmbackup-")),
        "{:?}",
        files_in(vm.dir())
    );
    let id = b.json["results"][0]["backup"]["id"].as_str().unwrap();
    let out = place.dir.path().join("vdb.raw");
    restore_disk_of(&place.repo(), id, "vdb", &out);
    assert_eq!(read_from_ext4(&out, "/second"), b"second overlay");
    assert_eq!(
        read_from_ext4(&out, "/on-overlay"),
        b"written while on the overlay"
    );

    // Nothing is left to recover.
    let r = vmbackup(&place, &["recover", vm.name()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.json["recover"]["disks"].as_array().unwrap().is_empty());
}

#[test]
fn recover_commits_the_overlay_of_a_vm_shut_off_since_offline() {
    let vm = TestVmBuilder::new("bk-recover-off")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let image = vm_paths(&vm);
    let ov = leave_on_overlay(&vm, "off");
    vm.write_file("/mnt/vdb/on-overlay", b"written before the power cut")
        .unwrap();
    vm.sh("sync").unwrap();
    vm.dom().destroy().unwrap();
    assert_eq!(
        disk_sources(&vm.dom().inactive_xml().unwrap()),
        vec![ov.to_string_lossy().into_owned()],
        "the shut-off VM's definition names the overlay"
    );
    let place = Place::new();
    let r = vmbackup(&place, &["recover", vm.name()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json["recover"]["disks"][0]["image"], image[0].as_str());
    assert_eq!(disk_sources(&vm.dom().inactive_xml().unwrap()), image);
    assert!(!ov.exists(), "the overlay is deleted");
    let raw = place.dir.path().join("vdb.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw", &image[0]])
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        read_from_ext4(&raw, "/on-overlay"),
        b"written before the power cut"
    );
}

/// Starts `vmbackup --json ... ARGS` that stops itself (SIGSTOP) at fault point `point`, and
/// waits until it has. Returns the stopped process, for the caller to kill and wait for.
#[allow(clippy::zombie_processes)]
fn spawn_stopped_at(place: &Place, point: &str, args: &[&str]) -> std::process::Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmbackup"))
        .arg("--json")
        .arg("--repo")
        .arg(place.repo())
        .arg("--state-dir")
        .arg(place.state())
        .args(args)
        .env_remove("VMBACKUP_CONFIG")
        .env("VMBACKUP_LOG", "info")
        .env("VMBACKUP_FAILPOINTS", format!("{point}=stop"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run vmbackup");
    let stat = format!("/proc/{}/stat", child.id());
    let start = Instant::now();
    loop {
        let s = std::fs::read_to_string(&stat).unwrap_or_default();
        // "pid (comm) STATE ...": T is stopped.
        if s.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('T'))
        {
            return child;
        }
        if s.is_empty() || start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let status = child.wait();
            panic!("vmbackup never reached {point} within 120 s ({status:?})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGKILL in the middle of the commit back leaves an active block commit job on the disk
/// and the VM on its overlay. `recover` takes the job over and finishes it (libvirt refuses a
/// second commit while one is active), and the next backup works.
#[test]
fn a_backup_killed_during_its_commit_is_finished_by_recover_and_the_next_backup_works() {
    let vm = TestVmBuilder::new("bk-killcommit")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let image = vm_paths(&vm);
    let place = Place::new();
    vm.write_file("/mnt/vdb/before", b"before the backup")
        .unwrap();
    vm.sh("sync").unwrap();

    let mut child = spawn_stopped_at(
        &place,
        "commit-started",
        &["backup", vm.name(), "--quiesce", "required"],
    );
    let job = vm.dom().block_job("vdb").unwrap();
    assert!(
        job.is_some_and(|j| j.active_commit),
        "an active commit runs: {job:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_ne!(
        disk_sources(&vm.dom().live_xml().unwrap()),
        image,
        "on its overlay"
    );
    vm.write_file("/mnt/vdb/after-kill", b"written after the kill")
        .unwrap();

    let r = vmbackup(&place, &["recover", vm.name()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json["recover"]["disks"][0]["disk"], "vdb", "{}", r.json);
    assert_eq!(
        r.json["recover"]["interrupted"][0]["phase"], "commit",
        "the journal knows where the run stopped: {}",
        r.json
    );
    assert_eq!(disk_sources(&vm.dom().live_xml().unwrap()), image);
    assert_eq!(disk_sources(&vm.dom().inactive_xml().unwrap()), image);
    assert!(vm.dom().block_job("vdb").unwrap().is_none(), "no job left");
    assert!(
        files_in(vm.dir()).iter().all(|f| !f.contains(".vmbackup-")),
        "{:?}",
        files_in(vm.dir())
    );
    assert_eq!(
        vm.read_file("/mnt/vdb/after-kill").unwrap(),
        b"written after the kill"
    );
    // The killed run had published its backup before the commit: it restores.
    let list = vmbackup(&place, &["list", vm.name()]);
    let killed = list.json["backups"][0]["id"]
        .as_str()
        .expect("the killed run's backup");
    let out = place.dir.path().join("killed-vdb.raw");
    restore_disk_of(&place.repo(), killed, "vdb", &out);
    assert_eq!(read_from_ext4(&out, "/before"), b"before the backup");

    let b = vmbackup(&place, &["backup", vm.name(), "--quiesce", "required"]);
    assert_eq!(b.code, 0, "{}", b.stderr);
    assert_eq!(disk_sources(&vm.dom().live_xml().unwrap()), image);
    let r = vmbackup(&place, &["recover", vm.name()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.json["recover"]["disks"].as_array().unwrap().is_empty());
}

/// SIGKILL after the snapshot, before the copy: the VM runs on its overlay. The next
/// `run-due` (minutely, from the timer), with nothing due, finishes the run before anything
/// else: the VM is back on its images, the overlay gone, the guest's writes kept, and the next
/// backup reads only what changed since the last good one.
#[test]
fn run_due_finishes_a_backup_killed_after_its_snapshot() {
    let vm = TestVmBuilder::new("bk-killcopy")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let image = vm_paths(&vm);
    let place = Place::new();
    let first = backup_id(&place, &[vm.name()]);
    let mut child = spawn_stopped_at(&place, "backup-copy", &["backup", vm.name()]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_ne!(
        disk_sources(&vm.dom().live_xml().unwrap()),
        image,
        "on its overlay"
    );
    vm.write_file("/mnt/vdb/on-overlay", b"written on the overlay")
        .unwrap();
    vm.sh("sync").unwrap();

    let r = vmbackup(&place, &["run-due"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rec = r.json["run"]["recovered"].as_array().unwrap();
    assert_eq!(rec.len(), 1, "{}", r.json);
    assert!(rec[0].as_str().unwrap().contains("copy phase"), "{rec:?}");
    assert_eq!(disk_sources(&vm.dom().live_xml().unwrap()), image);
    assert_eq!(disk_sources(&vm.dom().inactive_xml().unwrap()), image);
    assert!(
        files_in(vm.dir()).iter().all(|f| !f.contains(".vmbackup-")),
        "{:?}",
        files_in(vm.dir())
    );
    // Nothing left to finish: the next run-due says so by saying nothing.
    let r = vmbackup(&place, &["run-due"]);
    assert_eq!(
        r.json["run"]["recovered"],
        serde_json::json!([]),
        "{}",
        r.json
    );

    let b = vmbackup(&place, &["backup", vm.name()]);
    let d = &b.json["results"][0]["backup"]["disks"][0];
    assert_eq!(d["mode"], "incremental", "{d}");
    assert_eq!(d["based_on"], first.as_str(), "{d}");
    let id = b.json["results"][0]["backup"]["id"].as_str().unwrap();
    let out = place.dir.path().join("after.raw");
    restore_disk_of(&place.repo(), id, "vdb", &out);
    assert_eq!(
        read_from_ext4(&out, "/on-overlay"),
        b"written on the overlay"
    );
}

/// SIGKILL after the overlay files were made but before the snapshot: the VM never ran on
/// them. The journal names them: `recover` deletes them and reports the run's phase.
#[test]
fn overlays_of_a_run_killed_before_its_snapshot_are_removed_by_recover() {
    let vm = TestVmBuilder::new("bk-killsnap")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let image = vm_paths(&vm);
    let place = Place::new();
    let mut child = spawn_stopped_at(
        &place,
        "backup-snapshot",
        &["backup", vm.name(), "--quiesce", "required"],
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let made: Vec<String> = files_in(vm.dir())
        .into_iter()
        .filter(|f| f.contains(".vmbackup-"))
        .collect();
    assert_eq!(made.len(), 1, "the run made its overlay: {made:?}");
    assert_eq!(disk_sources(&vm.dom().live_xml().unwrap()), image);

    let r = vmbackup(&place, &["recover", vm.name()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rec = &r.json["recover"];
    assert_eq!(rec["interrupted"][0]["phase"], "snapshot", "{rec}");
    assert!(
        rec["orphan_overlays"][0]
            .as_str()
            .unwrap()
            .ends_with(&made[0]),
        "{rec}"
    );
    assert!(rec["disks"].as_array().unwrap().is_empty(), "{rec}");
    assert!(
        files_in(vm.dir()).iter().all(|f| !f.contains(".vmbackup-")),
        "{:?}",
        files_in(vm.dir())
    );
    // The guest was never frozen by the killed run (libvirt freezes inside the snapshot).
    assert_eq!(
        vm.sh("echo ok > /mnt/vdb/f && sync && cat /mnt/vdb/f")
            .unwrap(),
        "ok\n"
    );
    let r = vmbackup(&place, &["recover", vm.name()]);
    assert!(r.json["recover"]["interrupted"]
        .as_array()
        .unwrap()
        .is_empty());
}

/// What the guest agent says of the freeze (`thawed` or `frozen`) once it answers: while a
/// freeze is still in the guest's fsfreeze hook, the agent answers nothing.
fn freeze_status(vm: &TestVm, within: Duration) -> String {
    let start = Instant::now();
    loop {
        match vm.dom().agent_command(
            &json!({"execute": "guest-fsfreeze-status"}),
            Duration::from_secs(2),
        ) {
            Ok(v) => return v.as_str().unwrap_or_default().to_string(),
            Err(e) => assert!(
                start.elapsed() < within,
                "the guest agent did not answer: {}",
                vmbackup::error::chain(&e)
            ),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A write into the guest's data filesystem that must finish within 10 s (it hangs on a
/// frozen filesystem).
fn assert_guest_writes(vm: &TestVm) {
    let out = vm
        .exec_sh("timeout 10 sh -c 'echo x > /mnt/vdb/after-freeze && sync' && echo written")
        .unwrap();
    assert_eq!(
        out.stdout_text().trim(),
        "written",
        "a write into the guest did not complete: {}",
        out.stderr_text()
    );
}

#[test]
fn a_freeze_that_outlasts_its_deadline_is_thawed_and_preferred_goes_on_crash_consistent() {
    let vm = TestVmBuilder::new("bk-slowfreeze")
        .cmdline("vmbackup.freezehook")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    // The guest's fsfreeze hook holds the next freeze for 6 s, well past the 1 s deadline:
    // libvirt gives up on it, and the agent freezes the filesystems later all the same.
    vm.sh("echo 6 > /run/vmb-freeze-delay").unwrap();
    let place = Place::new();
    let started = Instant::now();
    let r = vmbackup(
        &place,
        &[
            "--freeze-timeout",
            "1",
            "backup",
            vm.name(),
            "--quiesce",
            "preferred",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let b = &r.json["results"][0]["backup"];
    assert_eq!(b["consistency"], "crash", "{b}");
    assert!(b["freeze_ms"].is_null(), "{b}");
    let reason = b["consistency_reason"].as_str().unwrap_or_default();
    eprintln!("backup took {:?}: {reason}", started.elapsed());
    assert!(reason.contains("freeze"), "{reason}");
    assert_eq!(disk_sources(&vm.dom().live_xml().unwrap()), vm_paths(&vm));

    // By now the held freeze has reached the guest's filesystems, if it was going to.
    let settle = Duration::from_secs(8);
    if let Some(rest) = settle.checked_sub(started.elapsed()) {
        std::thread::sleep(rest);
    }
    assert_eq!(
        freeze_status(&vm, Duration::from_secs(60)),
        "thawed",
        "the guest was left frozen after the backup (reason recorded: {reason})"
    );
    assert!(
        reason.contains("thawed"),
        "the reason says the guest was thawed: {reason}"
    );
    vm.sh("rm -f /run/vmb-freeze-delay").unwrap();
    assert_guest_writes(&vm);
}

#[test]
fn recover_thaws_a_libvirt_guest_left_frozen() {
    let vm = TestVmBuilder::new("bk-frozen")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    vm.dom()
        .agent_command(
            &json!({"execute": "guest-fsfreeze-freeze"}),
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(freeze_status(&vm, Duration::from_secs(30)), "frozen");
    let place = Place::new();
    let r = vmbackup(&place, &["recover", vm.name()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        freeze_status(&vm, Duration::from_secs(30)),
        "thawed",
        "recover left the guest frozen: {}",
        r.json
    );
    assert_eq!(
        r.json["recover"]["thawed"],
        json!([vm.name()]),
        "{}",
        r.json
    );
    assert_guest_writes(&vm);
}

/// `qemu-img convert` of `image` to raw: the guest-visible bytes, to compare a restore with.
fn guest_bytes(image: &Path, format: &str, out: &Path) -> Vec<u8> {
    let st = Command::new("qemu-img")
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(image)
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(out).unwrap()
}

/// The read record of disk `target` in a `backup --json` result.
fn disk_read(run: &Run, target: &str) -> Value {
    assert_eq!(run.code, 0, "{}", run.stderr);
    run.json["results"][0]["backup"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["target"] == target)
        .cloned()
        .unwrap_or_else(|| panic!("no disk {target}: {}", run.json))
}

/// A shut-off VM's image that has not changed since the last backup is not read again (a
/// spot check of a few chunks aside), and the backup is still a complete restore point. A
/// changed image, `--full`, or the first backup read everything, and say why.
#[test]
fn an_unchanged_shut_off_disk_is_not_read_again_and_every_doubt_reads_it_whole() {
    let (_fill, spec) = filled_disk("vdb", 256 * MIB, 24);
    let vm = TestVmBuilder::new("bk-unchanged")
        .disk_spec(spec)
        .start()
        .expect("guest boots");
    vm.write_file("/mnt/vdb/f", b"before").unwrap();
    vm.shutdown(Duration::from_secs(120)).unwrap();
    let image = vm.disk_paths()[0].clone();
    let place = Place::new();
    let id_of = |r: &Run| {
        r.json["results"][0]["backup"]["id"]
            .as_str()
            .unwrap()
            .to_string()
    };

    let first = vmbackup(&place, &["backup", vm.name()]);
    let d = disk_read(&first, "vdb");
    assert_eq!(d["mode"], "full", "{d}");
    assert!(
        d["full_reason"].as_str().unwrap().contains("first backup"),
        "{d}"
    );
    assert!(d["bytes_read"].as_u64().unwrap() >= 24 * MIB, "{d}");

    let second = vmbackup(&place, &["backup", vm.name()]);
    let d = disk_read(&second, "vdb");
    assert_eq!(d["mode"], "incremental", "{d}");
    assert_eq!(d["based_on"], id_of(&first).as_str(), "{d}");
    assert!(
        d["bytes_read"].as_u64().unwrap() <= 3 * 4 * MIB,
        "only the spot checks are read: {d}"
    );
    // A complete restore point: the index stands for the whole disk.
    let want = guest_bytes(&image, "qcow2", &place.dir.path().join("want.raw"));
    let out = place.dir.path().join("second.raw");
    restore_disk_of(&place.repo(), &id_of(&second), "vdb", &out);
    assert!(std::fs::read(&out).unwrap() == want, "the restore differs");
    let shown = vmbackup(&place, &["show", &id_of(&second)]);
    assert_eq!(
        shown.json["manifest"]["disks"][0]["read"]["mode"], "incremental",
        "{}",
        shown.json
    );

    let full = vmbackup(&place, &["backup", vm.name(), "--full"]);
    let d = disk_read(&full, "vdb");
    assert_eq!(
        (d["mode"].as_str(), d["full_reason"].as_str()),
        (Some("full"), Some("--full"))
    );

    // The image changes (written offline): read whole again, and the restore has the change.
    let st = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 200M 64k"])
        .arg(&image)
        .status()
        .unwrap();
    assert!(st.success());
    let changed = vmbackup(&place, &["backup", vm.name()]);
    let d = disk_read(&changed, "vdb");
    assert_eq!(d["mode"], "full", "{d}");
    assert!(
        d["full_reason"].as_str().unwrap().contains("image changed"),
        "{d}"
    );
    let want = guest_bytes(&image, "qcow2", &place.dir.path().join("want2.raw"));
    let out = place.dir.path().join("changed.raw");
    restore_disk_of(&place.repo(), &id_of(&changed), "vdb", &out);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "the restore misses the change"
    );
    assert_eq!(read_from_ext4(&out, "/f"), b"before");
}
