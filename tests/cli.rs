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
    assert!(r.json["results"][0]["error"]["error"]
        .as_str()
        .unwrap()
        .contains("no domain named"));
    let r = vmbackup(&place, &["check", "../etc"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = vmbackup(&place, &["show", "no-such-backup"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(r.json["ok"], json!(false));
    let r = vmbackup(&place, &["show", "../../etc/passwd"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    // Nothing was written for any of them but the empty repository itself.
    assert!(!place.repo().join("backups").exists());
}

#[test]
fn usage_errors_exit_2_with_one_json_document() {
    let place = Place::new();
    let r = vmbackup(&place, &["backup", "x", "--quiesce", "sometimes"]);
    assert_eq!(r.code, 2);
    assert_eq!(r.json["ok"], json!(false));
    let r = vmbackup(&place, &["no-such-command"]);
    assert_eq!(r.code, 2);
}

#[test]
fn an_empty_repository_lists_nothing() {
    let place = Place::new();
    let r = vmbackup(&place, &["list"]);
    assert_eq!(r.code, 0);
    assert_eq!(r.json, json!({"ok": true, "backups": [], "unreadable": []}));
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
