//! `vmbackup boot-test`: a backup of a real, running test VM booted in a throwaway VM (real
//! libvirtd, QEMU, guest agent), its disks overlays on the backup served over NBD.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::*;
use vmbackup_testkit::libvirt_vm::{Format, TestVm, TestVmBuilder};

/// What a boot test may leave: none of it, ever.
fn leftovers(vm: &TestVm) -> (Vec<String>, Vec<PathBuf>) {
    // This VM's only: the tests run side by side.
    let prefix = format!("vmbackup-boottest-{}-", vm.name());
    let domains = vm
        .libvirt()
        .domain_names()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    let folders = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&prefix)
        })
        .collect();
    (domains, folders)
}

fn assert_nothing_left(vm: &TestVm) {
    let (d, f) = leftovers(vm);
    assert!(d.is_empty(), "throwaway domains left: {d:?}");
    assert!(f.is_empty(), "temporary folders left: {f:?}");
}

/// The original VM: running, same definition, its marker file as written.
fn assert_untouched(vm: &TestVm, xml_before: &str, marker: &str) {
    assert!(vm.dom().is_active().unwrap(), "the original VM stopped");
    assert_eq!(vm.dom().inactive_xml().unwrap(), xml_before);
    assert_eq!(vm.sh("cat /mnt/vdb/marker").unwrap(), marker);
}

#[test]
fn a_backup_of_a_running_vm_boots_beside_it_and_failures_leave_nothing_behind() {
    let t = Instant::now();
    let vm = TestVmBuilder::new("boottest")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let normal_boot = t.elapsed();
    let marker = "written before the backup\n";
    vm.write_file("/mnt/vdb/marker", marker.as_bytes()).unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    // Changed after the backup: the boot test sees the backed-up content.
    vm.write_file("/mnt/vdb/marker2", b"after").unwrap();
    let xml_before = vm.dom().inactive_xml().unwrap();
    let repo_before = files_in(&place.repo().join("backups").join(&id));

    // Boots, the agent answers, the command reads the file as it was at the backup.
    let t = Instant::now();
    let r = vmbackup(
        &place,
        &[
            "boot-test",
            &id,
            "--timeout",
            "120",
            "--command",
            "cat /mnt/vdb/marker; test ! -e /mnt/vdb/marker2",
        ],
    );
    let took = t.elapsed();
    assert_eq!(r.code, 0, "{}\n{}", r.json, r.stderr);
    let b = &r.json["boot_test"];
    assert_eq!(r.json["ok"], true);
    assert_eq!(b["booted"], true, "{b}");
    assert_eq!(b["backup_id"], id.as_str());
    assert_eq!(b["vm"], vm.name());
    assert!(b["domain"]
        .as_str()
        .unwrap()
        .starts_with("vmbackup-boottest-"));
    assert_eq!(b["command"]["exit_code"], 0, "{b}");
    assert_eq!(b["command"]["stdout"], marker);
    assert!(b["error"].is_null(), "{b}");
    assert!(b["os"].is_object(), "guest-get-osinfo: {b}");
    let to_agent = b["seconds_to_agent"].as_f64().unwrap();
    eprintln!(
        "boot test: agent after {to_agent:.1} s, whole command {:.1} s; the guest's own \
         start (define, boot, agent) took {:.1} s",
        took.as_secs_f64(),
        normal_boot.as_secs_f64()
    );
    assert!(to_agent > 0.0 && to_agent < 120.0);
    assert_untouched(&vm, &xml_before, marker);
    assert_nothing_left(&vm);

    // The result is kept with the backup (beside its manifest, which is unchanged), shown by
    // show and list, and in the job history.
    let mut after = files_in(&place.repo().join("backups").join(&id));
    after.retain(|f| f != "boot-test.json");
    assert_eq!(after, repo_before);
    let show = vmbackup(&place, &["show", &id]);
    assert_eq!(show.code, 0);
    let rec = &show.json["boot_test"];
    assert_eq!(rec["booted"], true, "{}", show.json);
    assert_eq!(rec["command_exit_code"], 0);
    assert!(rec["at"].as_str().unwrap().ends_with('Z'));
    let list = vmbackup(&place, &["list"]);
    assert_eq!(list.json["backups"][0]["boot_test"]["booted"], true);
    let hist = vmbackup(&place, &["history", "--all"]);
    assert!(hist.json.to_string().contains("boot-test"), "{}", hist.json);

    // A command that fails: exit 1 with its status; nothing left; the record says so.
    let r = vmbackup(
        &place,
        &["boot-test", &id, "--timeout", "120", "--command", "exit 3"],
    );
    assert_eq!(r.code, 1, "{}\n{}", r.json, r.stderr);
    assert_eq!(r.json["ok"], false);
    assert_eq!(r.json["boot_test"]["booted"], true);
    assert_eq!(r.json["boot_test"]["command"]["exit_code"], 3);
    assert!(r.json["boot_test"]["error"]
        .as_str()
        .unwrap()
        .contains("exited with 3"));
    assert_nothing_left(&vm);
    let show = vmbackup(&place, &["show", &id]);
    assert_eq!(show.json["boot_test"]["command_exit_code"], 3);

    // No agent within the timeout: exit 1, nothing left.
    let r = vmbackup(&place, &["boot-test", &id, "--timeout", "1"]);
    assert_eq!(r.code, 1, "{}\n{}", r.json, r.stderr);
    assert_eq!(r.json["boot_test"]["booted"], false);
    assert!(
        r.json["boot_test"]["error"]
            .as_str()
            .unwrap()
            .contains("no answer from the guest agent within 1 s"),
        "{}",
        r.json
    );
    assert_nothing_left(&vm);
    let list = vmbackup(&place, &["list"]);
    assert_eq!(list.json["backups"][0]["boot_test"]["booted"], false);
    assert_untouched(&vm, &xml_before, marker);

    // Bad input: exit 2, nothing made, the record unchanged.
    for args in [
        &["boot-test", "nosuch-20260101T000000Z-0000"][..],
        &["boot-test", &id, "--timeout", "0"][..],
        &["boot-test", &id, "--timeout", "soon"][..],
        // No video device: no screen to take.
        &[
            "boot-test",
            &id,
            "--screenshot",
            "/var/tmp/vmbt-no-screen.ppm",
        ][..],
    ] {
        let r = vmbackup(&place, args);
        assert_eq!(r.code, 2, "{args:?}: {}\n{}", r.json, r.stderr);
        assert_nothing_left(&vm);
    }
    let show = vmbackup(&place, &["show", &id]);
    assert_eq!(show.json["boot_test"]["booted"], false);
}

#[test]
fn a_stop_signal_during_a_boot_test_removes_the_throwaway_vm() {
    let vm = TestVmBuilder::new("boottest-sig")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    let child = std::process::Command::new(binary())
        .arg("--json")
        .arg("--repo")
        .arg(place.repo())
        .arg("--state-dir")
        .arg(place.state())
        .args(["boot-test", &id, "--timeout", "120"])
        .env_remove("VMBACKUP_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Once the throwaway VM exists, SIGTERM.
    let start = Instant::now();
    while leftovers(&vm).0.is_empty() {
        assert!(start.elapsed().as_secs() < 60, "no throwaway VM appeared");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143));
    let doc =
        vmbackup_testkit::cli::parse_one_document(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(doc["ok"], false, "{doc}");
    assert_nothing_left(&vm);
    assert!(vm.dom().is_active().unwrap());
}

/// Every file under `dir` with its content.
fn tree(dir: &std::path::Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(tree(&p));
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_uefi_tpm_vm_boot_tests_on_copies_of_its_nvram_and_tpm_state() {
    let t = Instant::now();
    let vm = TestVmBuilder::new("boottest-uefi")
        .uefi_tpm()
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let normal_boot = t.elapsed();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    let show = vmbackup(&place, &["show", &id]);
    let st = &show.json["manifest"]["vm_state"];
    assert!(st["nvram"].is_object() && st["tpm"].is_object(), "{st}");
    let xml = vm.dom().inactive_xml().unwrap();
    let nvram = PathBuf::from(st["nvram"]["path"].as_str().unwrap());
    let tpm_dir = PathBuf::from(st["tpm"]["dir"].as_str().unwrap());
    let swtpm = tpm_dir.parent().unwrap().to_path_buf();
    let nvram_before = std::fs::read(&nvram).unwrap();
    let tpm_before = tree(&tpm_dir);
    let swtpm_before = files_in(&swtpm);

    let r = vmbackup(
        &place,
        &[
            "boot-test",
            &id,
            "--timeout",
            "180",
            "--command",
            "test -d /sys/firmware/efi",
        ],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.json, r.stderr);
    assert_eq!(r.json["boot_test"]["command"]["exit_code"], 0);
    eprintln!(
        "UEFI boot test: agent after {} s; the guest's own start took {:.1} s",
        r.json["boot_test"]["seconds_to_agent"],
        normal_boot.as_secs_f64()
    );
    // The original's NVRAM and TPM state are as they were; no TPM state folder is left.
    assert!(vm.dom().is_active().unwrap());
    assert_eq!(vm.dom().inactive_xml().unwrap(), xml);
    assert_eq!(std::fs::read(&nvram).unwrap(), nvram_before);
    assert_eq!(tree(&tpm_dir), tpm_before);
    assert_eq!(files_in(&swtpm), swtpm_before);
    assert_nothing_left(&vm);
}

/// The size of a PNG image (its IHDR) or a PPM one (`P6\n<width> <height>\n...`): what
/// libvirt gives depends on QEMU's version.
fn image_size(b: &[u8]) -> (u32, u32) {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        assert_eq!(&b[12..16], b"IHDR");
        let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
        return (be(16), be(20));
    }
    let head = String::from_utf8_lossy(&b[..b.len().min(64)]).into_owned();
    let mut w = head.split_ascii_whitespace();
    assert_eq!(w.next(), Some("P6"), "neither PNG nor PPM: {head:?}");
    let width: u32 = w.next().unwrap().parse().unwrap();
    let height: u32 = w.next().unwrap().parse().unwrap();
    (width, height)
}

#[test]
fn a_screenshot_is_saved_whether_the_vm_passes_or_not() {
    let vm = TestVmBuilder::new("boottest-shot")
        .video()
        .disk("vdb", Format::Qcow2, 32 * MIB)
        .start()
        .expect("guest boots");
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let shot = work.path().join("screen.png");
    let r = vmbackup(
        &place,
        &[
            "boot-test",
            &id,
            "--timeout",
            "120",
            "--screenshot",
            &shot.to_string_lossy(),
        ],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.json, r.stderr);
    let s = &r.json["boot_test"]["screenshot"];
    let mime = s["mime"].as_str().unwrap_or_default();
    assert!(
        ["image/png", "image/x-portable-pixmap"].contains(&mime),
        "{}",
        r.json
    );
    let bytes = std::fs::read(&shot).unwrap();
    assert_eq!(s["bytes"].as_u64(), Some(bytes.len() as u64));
    let (w, h) = image_size(&bytes);
    assert!(w >= 640 && h >= 400, "{w}x{h}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&shot).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_nothing_left(&vm);

    // A test that fails (no agent within 1 s) still leaves its screen, replacing the file.
    std::fs::remove_file(&shot).unwrap();
    let r = vmbackup(
        &place,
        &[
            "boot-test",
            &id,
            "--timeout",
            "1",
            "--screenshot",
            &shot.to_string_lossy(),
        ],
    );
    assert_eq!(r.code, 1, "{}\n{}", r.json, r.stderr);
    assert!(
        r.json["boot_test"]["screenshot"]["bytes"].as_u64().unwrap() > 0,
        "{}",
        r.json
    );
    image_size(&std::fs::read(&shot).unwrap());
    assert_nothing_left(&vm);

    // A folder that does not exist: exit 2, nothing made.
    let r = vmbackup(
        &place,
        &[
            "boot-test",
            &id,
            "--screenshot",
            "/nonexistent-folder/screen.ppm",
        ],
    );
    assert_eq!(r.code, 2, "{}\n{}", r.json, r.stderr);
    assert_nothing_left(&vm);
}
