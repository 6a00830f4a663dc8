//! Security (issue 13): the modes and owners of overlays and restored images, folders others
//! may write to, the report hook's timeout and the report mail's sanitising, against a real
//! libvirt VM, a real SMTP server on loopback and the real binary.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vmbackup_testkit::faults::{repo_violations, vm_violations};
use vmbackup_testkit::libvirt_vm::{Format, TestVmBuilder};
use vmbackup_testkit::smtp::Smtp;

/// (uid, gid, permission bits) of a file.
fn owner_mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The overlays (`*.vmbackup-*.qcow2`) in `dir`.
fn overlays_in(dir: &Path) -> Vec<PathBuf> {
    files_in(dir)
        .into_iter()
        .filter(|f| f.contains(".vmbackup-") && f.ends_with(".qcow2"))
        .map(|f| dir.join(f))
        .collect()
}

struct Undefine(String);

impl Drop for Undefine {
    fn drop(&mut self) {
        let lv = vmbackup::hypervisor::libvirt::Libvirt::open("qemu:///system").unwrap();
        if let Ok(Some(d)) = lv.find_domain(&self.0) {
            let _ = d.destroy();
            let _ = d.undefine();
        }
    }
}

/// One VM, in turn: the overlay while a backup copies; a world-writable overlay folder; a
/// restore onto the VM (owner and mode of the image it replaces) and a restore as a new VM
/// (0600); then `run-due` with a report command that never ends.
#[test]
fn overlays_and_restored_images_keep_the_images_owner_and_mode_and_a_hung_hook_is_killed() {
    let vm = TestVmBuilder::new("sec-modes")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest starts");
    let image = vm.disk_paths()[0].clone();
    let images = vec![image.to_string_lossy().into_owned()];
    vm.write_file("/mnt/vdb/data", b"kept by the backup")
        .unwrap();
    let place = Place::new();

    // 1. The overlay, looked at while the backup copies (a fail point holds it there 4 s):
    // the image's owner as it is now (libvirt's dynamic ownership: QEMU's user) and its mode.
    chmod(&image, 0o640);
    let running_owner = owner_mode(&image);
    assert_eq!(running_owner.2, 0o640);
    let child = Command::new(binary())
        .arg("--json")
        .arg("--repo")
        .arg(place.repo())
        .arg("--state-dir")
        .arg(place.state())
        .args(["backup", vm.name(), "--quiesce", "required"])
        .env_remove("VMBACKUP_CONFIG")
        .env("VMBACKUP_FAILPOINTS", "backup-copy=sleep(4000)")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let overlay = loop {
        if let Some(o) = overlays_in(vm.dir()).into_iter().next() {
            break o;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no overlay appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The VM runs on it (the snapshot is taken) well within the fail point's 4 s.
    std::thread::sleep(Duration::from_millis(500));
    let (uid, gid, mode) = owner_mode(&overlay);
    assert_eq!(mode, 0o640, "overlay {}", overlay.display());
    assert_eq!((uid, gid), (running_owner.0, running_owner.1));
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v =
        vmbackup_testkit::cli::parse_one_document(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let id = v["results"][0]["backup"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(vm_violations(&vm, &images).is_empty());

    // 2. A world-writable (even sticky) overlay folder: refused before anything is touched.
    let open = tempfile::tempdir_in("/var/tmp").unwrap();
    chmod(open.path(), 0o1777);
    let dir = open.path().to_string_lossy().into_owned();
    let r = vmbackup(&place, &["--overlay-dir", &dir, "backup", vm.name()]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let msg = r.json["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
        + &r.json.to_string();
    assert!(msg.contains("world-writable"), "{msg}");
    assert!(files_in(open.path()).is_empty());
    let c = vmbackup(&place, &["--overlay-dir", &dir, "check", vm.name()]);
    assert_eq!(c.code, 3, "{}", c.stderr);
    assert!(vm_violations(&vm, &images).is_empty());
    assert_eq!(
        vmbackup(&place, &["list"]).json["backups"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // 3. Restore onto the VM, off: the new image gets the owner and mode of the image it
    // replaces, read with the VM off (the owner libvirt put back at shutdown).
    vm.shutdown(Duration::from_secs(60)).unwrap();
    std::os::unix::fs::chown(&image, Some(4242), Some(4243)).unwrap();
    chmod(&image, 0o640);
    let r = vmbackup(&place, &["restore", &id, "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(owner_mode(&image), (4242, 4243, 0o640));
    let raw = place.dir.path().join("restored.raw");
    let conv = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&image)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(conv.success());
    assert_eq!(read_from_ext4(&raw, "/data"), b"kept by the backup");
    std::fs::remove_file(&raw).unwrap();
    // As a new VM: new files are 0600, root's.
    let new = format!("{}-new", vm.name());
    let _undefine = Undefine(new.clone());
    let r = vmbackup(&place, &["restore", &id, "--as", &new, "--new-macs"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let made = vm.dir().join(format!("{new}-vdb.qcow2"));
    assert_eq!(owner_mode(&made), (0, 0, 0o600));
    assert!(
        files_in(vm.dir()).iter().all(|f| !f.contains("vmbackup-")),
        "{:?}",
        files_in(vm.dir())
    );

    // 4. run-due with a report command that never ends (it and the child it started are
    // killed after command_timeout_secs), and a mail through a real SMTP server.
    let smtp = Smtp::start();
    let hook_pid = place.dir.path().join("hook.pid");
    let config = place.dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[report]\nsmtp = \"127.0.0.1:{}\"\nfrom = \"vmbackup@test.invalid\"\n\
             to = [\"ops@test.invalid\"]\ncommand = [\"/bin/sh\", \"-c\", \
             \"sleep 100000 & echo $! > {}; wait\"]\ncommand_timeout_secs = 2\n",
            smtp.port,
            hook_pid.display()
        ),
    )
    .unwrap();
    let cfg = config.to_string_lossy().into_owned();
    let add = vmbackup(
        &place,
        &[
            "schedule",
            "add",
            "hung",
            "--vm",
            vm.name(),
            "--type",
            "daily",
            "--slot",
            "3",
            "--tz",
            "UTC",
            "--start",
            "2027-02-01",
        ],
    );
    assert_eq!(add.code, 0, "{}", add.stderr);
    let t = Instant::now();
    let r = vmbackup(
        &place,
        &["--config", &cfg, "run-due", "--now", "2027-02-01T04:00:00Z"],
    );
    let took = t.elapsed();
    let results = &r.json["run"]["jobs"][0]["results"];
    assert_eq!(results[0]["status"], "ok", "{}\n{}", r.json, r.stderr);
    let errors = r.json["run"]["report_errors"].to_string();
    assert!(errors.contains("killed"), "{errors}");
    assert!(took < Duration::from_secs(60), "run-due took {took:?}");
    let pid = std::fs::read_to_string(&hook_pid).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    let t = Instant::now();
    while std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z ")) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the hook's child lives on"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mails = smtp.wait_messages(1);
    let mail = String::from_utf8_lossy(&mails[0]).into_owned();
    assert!(
        mail.contains("Subject: vmbackup hung: 1 ok, 0 failed"),
        "{mail}"
    );
    let (_, violations) = repo_violations(binary(), &place);
    assert!(violations.is_empty(), "{violations:?}");
}

/// A report body with what would end the DATA early or smuggle a second message, through
/// the real client to a real SMTP server: one message arrives, with the text as text.
#[test]
fn a_hostile_report_body_arrives_as_one_message_without_bare_cr_or_lone_dot() {
    let smtp = Smtp::start();
    let body = "VM web01 failed: agent said \"x\r.\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<a@b>\
                \r\nDATA\r\nsmuggled\r\n.\r\n\" then\n.\nand\r.\rend\n";
    let cfg = vmbackup::notify::ReportConfig {
        smtp: Some(format!("127.0.0.1:{}", smtp.port)),
        from: Some("vmbackup@test.invalid".into()),
        to: vec!["ops@test.invalid".into()],
        ..Default::default()
    };
    vmbackup::notify::send_mail(&cfg, "report\r\nBcc: evil@x", body).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mails = smtp.wait_messages(1);
    assert_eq!(mails.len(), 1, "one message, nothing smuggled");
    let raw = &mails[0];
    let text = vmbackup_testkit::smtp::decoded(raw);
    assert!(text.contains("MAIL FROM:<evil@x>"), "kept as text: {text}");
    assert!(text.contains("smuggled"));
    assert!(!text.contains("\nBcc:"), "no header injected: {text}");
    for (i, &c) in raw.iter().enumerate() {
        if c == b'\r' {
            assert_eq!(raw.get(i + 1), Some(&b'\n'), "a bare CR at {i}: {text:?}");
        }
    }
    // The server removed the dot-stuffing: what were lone dots arrive as lone dots of text,
    // each of which went over the wire as "..".
    assert!(
        text.contains("x .\r\n") || text.contains("x .\n"),
        "{text:?}"
    );
}

/// A QMP socket folder others may write to: refused (exit 3) for every command that would
/// talk to a plain QEMU VM there, before any socket is opened.
#[test]
fn a_socket_folder_others_may_write_to_is_refused() {
    let place = Place::new();
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    // A socket someone planted: never connected to.
    let _planted = std::os::unix::net::UnixListener::bind(d.path().join("web.qmp")).unwrap();
    let dir = d.path().to_string_lossy().into_owned();
    for mode in [0o777, 0o1777, 0o770] {
        chmod(d.path(), mode);
        for cmd in [
            &["backup", "qemu:web"][..],
            &["check", "qemu:web"],
            &["recover", "qemu:web"],
        ] {
            let r = vmbackup(&place, &[&["--qemu-dir", &dir][..], cmd].concat());
            assert_eq!(r.code, 3, "{mode:o} {cmd:?}: {}", r.stderr);
            let all = r.json.to_string() + &r.stderr;
            assert!(
                all.contains("-writable") && all.contains(&dir),
                "{mode:o} {cmd:?}: {all}"
            );
        }
    }
    // Only its owner may write: the usual answer (no such VM is listening: not exit 3).
    chmod(d.path(), 0o755);
    let r = vmbackup(&place, &["--qemu-dir", &dir, "check", "qemu:web"]);
    assert_ne!(r.code, 3, "{}", r.stderr);
}
