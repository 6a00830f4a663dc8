//! The command-line contract for bad input: a clear message, exit code 2, one JSON document
//! with `--json`, and nothing changed.

mod common;

use common::*;
use serde_json::json;

#[test]
fn unknown_vm_invalid_name_and_unknown_backup_are_bad_input() {
    let place = Place::new();
    // recover checks every name before it touches anything, the repository included.
    for bad in [
        &["vmbt-no-such-vm"][..],
        &["qemu:../x"],
        &["qemu:vmbt-no-such-vm"],
    ] {
        let r = vmbackup(&place, &[&["recover"][..], bad].concat());
        assert_eq!(r.code, 2, "{bad:?}: {}", r.stderr);
        assert!(!place.repo().exists(), "{bad:?} created the repository");
    }
    let r = vmbackup(&place, &["backup", "vmbt-no-such-vm"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.json["results"][0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no domain named"));
    assert_eq!(r.json["results"][0]["error"]["kind"], "not_found");
    assert_eq!(r.json["results"][0]["error"]["exit_code"], 2);
    let r = vmbackup(&place, &["check", "../etc"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = vmbackup(&place, &["show", "no-such-backup"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.json["ok"], json!(false));
    assert_eq!(r.json["error"]["kind"], "not_found", "{}", r.json);
    let r = vmbackup(&place, &["show", "../../etc/passwd"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.json["error"]["kind"], "invalid", "{}", r.json);
    // Nothing was written for any of them but the empty repository itself.
    assert!(!place.repo().join("backups").exists());
}

#[test]
fn usage_errors_exit_2_with_one_json_document() {
    let place = Place::new();
    let r = vmbackup(&place, &["backup", "x", "--quiesce", "sometimes"]);
    assert_eq!(r.code, 2);
    assert_eq!(r.json["ok"], json!(false));
    assert_eq!(r.json["schema_version"], 1);
    assert_eq!(r.json["exit_code"], 2);
    // clap's whole message: what is wrong, the choices, where to read more.
    let e = &r.json["error"];
    assert_eq!(e["kind"], "invalid", "{e}");
    assert_eq!(e["exit_code"], 2, "{e}");
    let msg = e["message"].as_str().unwrap();
    for part in ["'sometimes'", "--quiesce", "possible values", "--help"] {
        assert!(msg.contains(part), "{part:?} not in {msg:?}");
    }
    let r = vmbackup(&place, &["no-such-command"]);
    assert_eq!(r.code, 2);
    let msg = r.json["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("unrecognized subcommand 'no-such-command'"),
        "{msg}"
    );
}

#[test]
fn an_empty_repository_lists_nothing() {
    let place = Place::new();
    let r = vmbackup(&place, &["list"]);
    assert_eq!(r.code, 0);
    assert_eq!(
        r.json,
        json!({"schema_version": 1, "command": "list", "ok": true, "exit_code": 0,
               "backups": [], "unreadable": []})
    );
}

/// `--full` takes no value, and `full_every_days` must be a whole number of days, at least 1:
/// anything else is bad input (exit 2) that touches neither the repository nor any VM.
#[test]
fn nonsense_full_read_settings_are_bad_input() {
    let place = Place::new();
    for args in [
        &["backup", "vmbt-no-such-vm", "--full=yes"][..],
        &["backup", "--full", "--full", "vmbt-no-such-vm"],
    ] {
        let r = vmbackup(&place, args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert_eq!(r.json["ok"], json!(false), "{args:?}");
    }
    for bad in [
        "full_every_days = 0",
        "full_every_days = -3",
        "full_every_days = \"weekly\"",
        "full_every_days = 1.5",
    ] {
        let config = place.dir.path().join("config.toml");
        std::fs::write(&config, bad).unwrap();
        let r = vmbackup(
            &place,
            &[
                "--config",
                config.to_str().unwrap(),
                "backup",
                "vmbt-no-such-vm",
            ],
        );
        assert_eq!(r.code, 2, "{bad}: {}", r.stderr);
        assert!(r.stderr.contains("full_every_days"), "{bad}: {}", r.stderr);
    }
    assert!(!place.repo().join("backups").exists());
}

#[test]
fn completions_and_man_pages_come_from_the_command_definitions() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    // bash: a script bash accepts, completing the commands and their options.
    let out = Command::new(binary())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    for word in [
        "boot-test",
        "restore",
        "--instant",
        "--boot-test-every",
        "usage",
    ] {
        assert!(script.contains(word), "bash completion lacks {word}");
    }
    let file = dir.path().join("vmbackup.bash");
    std::fs::write(&file, &script).unwrap();
    let check = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    for shell in ["zsh", "fish"] {
        let out = Command::new(binary())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
    let bad = Command::new(binary())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));

    // Man pages: one per command (nested ones too), each rendered by man(1) without a
    // complaint; the main page names every command.
    let pages = dir.path().join("man");
    std::fs::create_dir(&pages).unwrap();
    let out = Command::new(binary())
        .args(["man", "--dir"])
        .arg(&pages)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<String> = std::fs::read_dir(&pages)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for page in [
        "vmbackup.1",
        "vmbackup-backup.1",
        "vmbackup-restore.1",
        "vmbackup-schedule-add.1",
        "vmbackup-mount.1",
    ] {
        assert!(names.contains(&page.to_string()), "{page} not in {names:?}");
    }
    assert!(
        !names
            .iter()
            .any(|n| n.contains("help") || n.contains("daemon")),
        "{names:?}"
    );
    for page in ["vmbackup.1", "vmbackup-schedule-add.1"] {
        let r = Command::new("man")
            .arg("-l")
            .arg(pages.join(page))
            .env("MANWIDTH", "100")
            .env("MANPAGER", "cat")
            .output()
            .unwrap();
        assert!(r.status.success(), "{page}");
        assert!(
            r.stderr.is_empty(),
            "{page}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        let text = String::from_utf8_lossy(&r.stdout);
        assert!(text.contains("NAME") && text.contains("OPTIONS"), "{text}");
        if page == "vmbackup.1" {
            for cmd in ["boot-test", "mount", "usage", "completions"] {
                assert!(text.contains(cmd), "vmbackup(1) lacks {cmd}");
            }
        }
    }
    let r = vmbackup(&Place::new(), &["man", "--dir", "/nonexistent-folder"]);
    assert_eq!(r.code, 2, "{}", r.stderr);

    // A reader that stops early (`| head -1`): no panic, exit 0.
    let mut child = Command::new(binary())
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// A schedule's life through every `schedule` command (a plain QEMU VM's name: nothing is
/// checked against libvirt), each document checked against its schema by the test kit.
#[test]
fn a_schedule_is_added_shown_listed_disabled_enabled_edited_and_removed() {
    let place = Place::new();
    let add = vmbackup(
        &place,
        &[
            "schedule",
            "add",
            "nightly",
            "--vm",
            "qemu:vmbt-none",
            "--type",
            "daily",
            "--slot",
            "3",
            "--tz",
            "UTC",
        ],
    );
    assert_eq!(add.code, 0, "{}", add.stderr);
    assert_eq!(add.json["schedule"]["name"], "nightly");
    assert!(add.json["schedule"]["next_run"].is_string(), "{}", add.json);
    let dis = vmbackup(&place, &["schedule", "disable", "nightly"]);
    assert_eq!(dis.code, 0, "{}", dis.stderr);
    assert_eq!(dis.json["schedule"]["enabled"], false);
    assert!(dis.json["schedule"]["next_run"].is_null(), "{}", dis.json);
    let show = vmbackup(&place, &["schedule", "show", "nightly"]);
    assert_eq!(show.json["schedule"]["enabled"], false);
    let en = vmbackup(&place, &["schedule", "enable", "nightly"]);
    assert_eq!(en.json["schedule"]["enabled"], true, "{}", en.json);
    let ed = vmbackup(&place, &["schedule", "edit", "nightly", "--slot", "4"]);
    assert_eq!(ed.code, 0, "{}", ed.stderr);
    assert_eq!(ed.json["schedule"]["hour"], 4, "{}", ed.json);
    let list = vmbackup(&place, &["schedule", "list"]);
    assert_eq!(list.json["schedules"].as_array().unwrap().len(), 1);
    let rm = vmbackup(&place, &["schedule", "remove", "nightly"]);
    assert_eq!((rm.code, &rm.json["removed"]), (0, &json!("nightly")));
    let list = vmbackup(&place, &["schedule", "list"]);
    assert_eq!(list.json["schedules"], json!([]));
    let gone = vmbackup(&place, &["schedule", "show", "nightly"]);
    assert_eq!(gone.code, 2);
    assert_eq!(gone.json["error"]["kind"], "not_found", "{}", gone.json);
}

/// Each command's `--help` (and so its man page) ends with its own exit codes.
#[test]
fn each_command_help_lists_its_exit_codes() {
    let help = |args: &[&str]| -> String {
        let out = std::process::Command::new(binary())
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    for (args, line) in [
        (&["delete"][..], "3  refused: a backup is pinned"),
        (&["backup"], "5  partly done: some of several VMs failed"),
        (&["verify"], "1  a backup is damaged"),
        (&["restore"], "3  refused: the VM is running"),
        (&["schedule", "add"], "3  refused: the slot is full"),
        (&["list"], "2  bad usage or input"),
    ] {
        let h = help(args);
        assert!(h.contains("Exit codes:"), "{args:?}: {h}");
        assert!(h.contains(line), "{args:?} lacks {line:?}: {h}");
        assert!(h.contains("130/143  interrupted"), "{args:?}: {h}");
    }
}
