//! Backups of the real Debian 12 guest (`vm-images/build-debian`: systemd, udev,
//! qemu-guest-agent with an fsfreeze hook, ext4 root on qcow2) and of its UEFI + TPM variant.
//! Each test boots one VM (about 16 s to the agent under TCG, 25 s with OVMF) and goes through
//! several steps on it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::json;
use vmbackup::repository::disk::{restore_disk, DiskIndex};
use vmbackup::repository::Repository;
use vmbackup_testkit::firmware;
use vmbackup_testkit::libvirt_vm::{check_records, TestVm, TestVmBuilder};

const RECORDS: &str = "/root/records";
const HOOK_LOG: &str = "/var/log/vmb-fsfreeze.log";

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

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The guest's clock minus the host's, in seconds (to place guest timestamps on the host's
/// time line).
fn guest_clock_offset(vm: &TestVm) -> f64 {
    let before = now_secs();
    let guest: f64 = vm.sh("date +%s.%N").unwrap().trim().parse().unwrap();
    let after = now_secs();
    guest - (before + after) / 2.0
}

/// One line of the guest's hook log: what ran, when (guest clock), and how many records the
/// writer's file had then.
#[derive(Debug)]
struct HookEvent {
    what: String,
    at: f64,
    records: Option<u64>,
}

fn hook_log(vm: &TestVm) -> Vec<HookEvent> {
    let text = vm.sh(&format!("cat {HOOK_LOG} 2>/dev/null; true")).unwrap();
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 3, "hook log line {l:?}");
            HookEvent {
                what: f[0].to_string(),
                at: f[1].parse().unwrap(),
                records: f[2].parse().ok(),
            }
        })
        .collect()
}

fn freeze_status(vm: &TestVm) -> String {
    vm.dom()
        .agent_command(
            &json!({"execute": "guest-fsfreeze-status"}),
            Duration::from_secs(10),
        )
        .unwrap()
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// (Part of the test above, on its VM.) A failing application hook stops the freeze: `--quiesce required` fails with exit 1 and
/// says why, leaving the guest thawed; `--quiesce preferred` makes a crash-consistent backup
/// that records why.
fn a_failing_freeze_hook_is_reported(place: &Place, vm: &TestVm) {
    let t0 = Instant::now();
    vm.sh(&format!(": > {HOOK_LOG} && touch /run/vmb-hook-fail"))
        .unwrap();

    let r = vmbackup(place, &["backup", vm.name(), "--quiesce", "required"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stderr, r.json);
    let said = format!("{}\n{}", r.stderr, r.json);
    assert!(
        said.contains("hook"),
        "the failure does not name the hook:\n{said}"
    );
    assert_eq!(freeze_status(vm), "thawed");
    // The guest writes (it would block on a frozen file system).
    vm.write_file("/root/after-failed-freeze", b"ok\n").unwrap();
    let events = hook_log(vm);
    assert!(
        !events.is_empty() && events.iter().all(|e| e.what == "freeze-failed"),
        "{events:?}"
    );
    assert_eq!(
        vmbackup(place, &["list"]).json["backups"]
            .as_array()
            .map_or(0, Vec::len),
        1,
        "a refused backup published something"
    );

    let b = vmbackup(place, &["backup", vm.name(), "--quiesce", "preferred"]);
    assert_eq!(b.code, 0, "{}", b.stderr);
    let result = &b.json["results"][0]["backup"];
    assert_eq!(result["consistency"], "crash", "{result}");
    let reason = result["consistency_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("hook"), "reason: {reason:?}");
    let id = result["id"].as_str().unwrap();
    let show = vmbackup(place, &["show", id]);
    assert_eq!(show.code, 0, "{}", show.stderr);
    let shown = show.json.to_string();
    assert!(
        shown.contains(reason),
        "show does not give the reason: {}",
        show.json
    );
    assert_eq!(freeze_status(vm), "thawed");
    vm.sh("rm /run/vmb-hook-fail").unwrap();
    eprintln!(
        "hook failure test: {:.1} s; required said: {}; preferred recorded: {reason}",
        t0.elapsed().as_secs_f64(),
        r.stderr.trim()
    );
}

/// Restores one disk of a backup into a raw file with the library.
fn restore_disk_of(repo_dir: &Path, id: &str, target: &str, out: &Path) {
    let repo = Repository::open(repo_dir).unwrap();
    let m = repo.load(id).unwrap();
    let d = m.disks.iter().find(|d| d.target == target).unwrap();
    let bytes = repo.store().get(&d.index_object).unwrap();
    let index = DiskIndex::decode(&bytes).unwrap();
    restore_disk(&repo, &index, out, 2, &|_, _| {}).unwrap();
}

fn host(program: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(program).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Restores the backup onto its VM (stopped at once first, as a VM that broke: a clean
/// shutdown of systemd under TCG takes long), starts it and waits for its agent. Returns how
/// long the restore and the boot took, in seconds.
fn restore_and_boot(place: &Place, vm: &mut TestVm, id: &str) -> (f64, f64) {
    vm.dom().destroy().unwrap();
    let t = Instant::now();
    let r = vmbackup(place, &["restore", id, "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let restored = t.elapsed().as_secs_f64();
    vm.reconnect().unwrap();
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(240)).unwrap();
    (restored, t.elapsed().as_secs_f64() - restored)
}

/// Under a steady write load in the guest, a quiesced backup runs the guest's application
/// hook around the freeze (freeze, then thaw, the snapshot between them), its root file
/// system needs no journal recovery and passes `e2fsck -fn`; a failing hook is reported (see
/// `a_failing_freeze_hook_is_reported`); and the quiesced backup restored onto the VM boots and
/// reads what was written before the backup.
#[test]
fn quiesced_backup_under_load_is_clean_runs_the_hooks_and_restores() {
    let t0 = Instant::now();
    let place = Place::new();
    let mut vm = TestVmBuilder::new("deb-load").debian().start().unwrap();
    let booted = t0.elapsed();
    vm.write_file("/root/before", b"written before the backup\n")
        .unwrap();
    vm.sh(&format!(
        "echo {RECORDS} > /run/vmb-hook-watch && : > {HOOK_LOG} && vmb-writer start {RECORDS}"
    ))
    .unwrap();
    wait_records(&vm, RECORDS, 20);
    let offset = guest_clock_offset(&vm);

    let h0 = now_secs();
    let b = vmbackup(&place, &["backup", vm.name(), "--quiesce", "required"]);
    let h1 = now_secs();
    let backup_secs = h1 - h0;
    assert_eq!(b.code, 0, "{}", b.stderr);
    let result = &b.json["results"][0]["backup"];
    let id = result["id"].as_str().unwrap().to_string();
    assert_eq!(result["consistency"], "application", "{result}");
    let freeze_ms = result["freeze_ms"].as_u64().expect("freeze_ms");

    // The load goes on after the backup; the guest is thawed.
    assert_eq!(freeze_status(&vm), "thawed");
    let after = record_count(&vm, RECORDS);
    wait_records(&vm, RECORDS, after + 5);

    // The hook ran once on freeze and once on thaw, in that order, both within the backup
    // run, the thaw no later after the freeze than the snapshot call took.
    let events = hook_log(&vm);
    let names: Vec<&str> = events.iter().map(|e| e.what.as_str()).collect();
    assert_eq!(names, ["freeze", "thaw"], "{events:?}");
    let (freeze, thaw) = (&events[0], &events[1]);
    assert!(freeze.at <= thaw.at, "{events:?}");
    assert!(
        freeze.at - offset >= h0 - 0.5 && thaw.at - offset <= h1 + 0.5,
        "hook events {events:?} (guest clock {offset:+.3} s) outside the backup run {h0:.3}..{h1:.3}"
    );
    assert!(
        thaw.at - freeze.at <= freeze_ms as f64 / 1000.0 + 0.5,
        "freeze hook to thaw hook {:.3} s, snapshot call {freeze_ms} ms",
        thaw.at - freeze.at
    );

    // The root file system of the backup: clean, and its records are those the writer had
    // completed between the freeze hook and the thaw hook: the snapshot was taken inside the
    // hook's window.
    let out = place.dir.path().join("vda.raw");
    restore_disk_of(&place.repo(), &id, "vda", &out);
    let out_s = out.to_str().unwrap();
    let (code, header) = host("dumpe2fs", &["-h", out_s]);
    assert_eq!(code, 0, "{header}");
    let features = header
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .expect("a features line");
    assert!(
        !features.contains("needs_recovery"),
        "the quiesced backup's journal needs recovery: {features}"
    );
    let (code, fsck) = host("e2fsck", &["-fn", out_s]);
    assert_eq!(code, 0, "e2fsck -fn of the backup's root:\n{fsck}");
    let records = check_records(&read_from_ext4(&out, RECORDS));
    assert!(records.bad.is_empty(), "{records:?}");
    let (at_freeze, at_thaw) = (freeze.records.unwrap(), thaw.records.unwrap());
    assert!(
        at_freeze <= records.valid && records.valid <= at_thaw,
        "the backup holds {} records; the hook counted {at_freeze} at freeze, {at_thaw} at thaw",
        records.valid
    );
    std::fs::remove_file(&out).unwrap();

    a_failing_freeze_hook_is_reported(&place, &vm);

    // Restored onto the VM, the guest boots (systemd, its agent) and reads what it wrote.
    let t_restore = Instant::now();
    let (restore_secs, boot_secs) = restore_and_boot(&place, &mut vm, &id);
    let rebooted = t_restore.elapsed();
    assert_eq!(
        vm.read_file("/root/before").unwrap(),
        b"written before the backup\n"
    );
    let restored = check_records(&vm.read_file(RECORDS).unwrap());
    assert!(restored.bad.is_empty(), "{restored:?}");
    assert_eq!(restored.valid, records.valid);
    eprintln!(
        "debian guest: booted in {:.1} s, backup {backup_secs:.1} s, restored in {restore_secs:.1} s \
         and booted again in {boot_secs:.1} s ({:.1} s), test {:.1} s",
        booted.as_secs_f64(),
        rebooted.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// The UEFI + TPM variant boots (OVMF, efivarfs, /dev/tpm0); the test kit sets a UEFI
/// variable and makes a persistent TPM object in it; a backup restored onto the VM (after
/// both were changed) boots again with UEFI, the TPM, and the backup's variable and objects;
/// a `restore --as` copy runs beside the original with the same, in NVRAM and TPM state of
/// its own.
#[test]
fn uefi_tpm_guest_boots_backs_up_and_restores() {
    let t0 = Instant::now();
    let place = Place::new();
    let mut vm = TestVmBuilder::new("deb-uefi")
        .debian_uefi_tpm()
        .start()
        .unwrap();
    let booted = t0.elapsed();
    assert_eq!(firmware::has_uefi_and_tpm(&vm).unwrap(), (true, true));
    let xml = vm.dom().inactive_xml().unwrap();
    assert!(xml.contains("<nvram"), "{xml}");

    // The kit's helpers, on their own.
    assert_eq!(firmware::uefi_var(&vm, "VmbTest").unwrap(), None);
    firmware::set_uefi_var(&vm, "VmbTest", b"set before the backup").unwrap();
    assert_eq!(
        firmware::uefi_var(&vm, "VmbTest").unwrap().as_deref(),
        Some(&b"set before the backup"[..])
    );
    firmware::create_persistent_tpm_object(&vm, 0x8100_0010).unwrap();
    assert!(firmware::persistent_tpm_handles(&vm)
        .unwrap()
        .contains(&0x8100_0010));

    let id = backup_id(&place, &[vm.name()]);
    // Changed after the backup: the restore must bring back the backup's variable and TPM.
    // (efivarfs makes an existing variable immutable: a second one stands for the change.)
    firmware::set_uefi_var(&vm, "VmbAfter", b"set after the backup").unwrap();
    firmware::create_persistent_tpm_object(&vm, 0x8100_0011).unwrap();
    let (restore_secs, boot_secs) = restore_and_boot(&place, &mut vm, &id);
    assert_eq!(firmware::has_uefi_and_tpm(&vm).unwrap(), (true, true));
    assert_eq!(
        firmware::uefi_var(&vm, "VmbTest").unwrap().as_deref(),
        Some(&b"set before the backup"[..]),
        "the UEFI variable is the backup's"
    );
    assert_eq!(
        firmware::uefi_var(&vm, "VmbAfter").unwrap(),
        None,
        "the variable set after the backup is gone"
    );
    let handles = firmware::persistent_tpm_handles(&vm).unwrap();
    assert!(
        handles.contains(&0x8100_0010) && !handles.contains(&0x8100_0011),
        "the TPM's persistent objects are the backup's: {handles:x?}"
    );

    // A copy beside the original: its own NVRAM file and TPM state, the backup's variable
    // and persistent object in them, both VMs running at once.
    let copy_name = format!("{}-c", vm.name());
    let t = Instant::now();
    let r = vmbackup(&place, &["restore", &id, "--as", &copy_name, "--new-macs"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let copy = vm.copy_named(&copy_name).unwrap();
    let copy_xml = copy.dom().inactive_xml().unwrap();
    assert!(
        copy_xml.contains(&format!("{copy_name}_VARS.fd")),
        "the copy has its own NVRAM file: {copy_xml}"
    );
    copy.dom().start().unwrap();
    copy.wait_agent(Duration::from_secs(300)).unwrap();
    let copy_secs = t.elapsed().as_secs_f64();
    assert!(vm.dom().is_active().unwrap(), "the original still runs");
    vm.wait_agent(Duration::from_secs(30)).unwrap();
    assert_eq!(firmware::has_uefi_and_tpm(&copy).unwrap(), (true, true));
    assert_eq!(
        firmware::uefi_var(&copy, "VmbTest").unwrap().as_deref(),
        Some(&b"set before the backup"[..]),
        "the copy has the backup's UEFI variable"
    );
    assert_eq!(firmware::uefi_var(&copy, "VmbAfter").unwrap(), None);
    let copy_handles = firmware::persistent_tpm_handles(&copy).unwrap();
    assert!(
        copy_handles.contains(&0x8100_0010) && !copy_handles.contains(&0x8100_0011),
        "the copy's TPM has the backup's persistent objects: {copy_handles:x?}"
    );
    // The copy's firmware state is its own: a variable set in it is not in the original.
    firmware::set_uefi_var(&copy, "VmbCopy", b"set in the copy").unwrap();
    assert_eq!(firmware::uefi_var(&vm, "VmbCopy").unwrap(), None);
    assert!(firmware::uefi_var(&copy, "VmbCopy").unwrap().is_some());
    eprintln!(
        "uefi+tpm guest: booted in {:.1} s, restored in {restore_secs:.1} s, booted again in \
         {boot_secs:.1} s, copy restored and booted beside it in {copy_secs:.1} s, test {:.1} s; \
         after the restore the variable is {:?}, the TPM's persistent handles {:x?}; the \
         copy's handles {copy_handles:x?}",
        booted.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        firmware::uefi_var(&vm, "VmbTest")
            .unwrap()
            .map(|v| String::from_utf8_lossy(&v).into_owned()),
        firmware::persistent_tpm_handles(&vm).unwrap(),
    );
    drop(copy);
}
