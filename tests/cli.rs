//! The command-line contract for bad input: a clear message, exit code 2, one JSON document
//! with `--json`, and nothing changed.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;

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

/// The timer's service is stopped (shutdown, `systemctl stop`) the way vmbackup stops
/// safely: SIGTERM to vmbackup alone (its helpers live until it is done with them), and time
/// for a commit back before systemd kills everything.
#[test]
fn the_run_due_service_gives_a_stop_time_for_the_commit_back() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/systemd/vmbackup-run-due.service"),
    )
    .unwrap();
    let service: Vec<(&str, &str)> = unit
        .split("[Service]")
        .nth(1)
        .expect("a [Service] section")
        .split("\n[")
        .next()
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let get = |k: &str| {
        service
            .iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {k}= in [Service]"))
    };
    assert_eq!(get("KillMode"), "mixed");
    assert_eq!(get("KillSignal"), "SIGTERM");
    let stop = get("TimeoutStopSec");
    let minutes: u64 = stop
        .strip_suffix("min")
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("TimeoutStopSec={stop}: minutes expected"));
    assert!(minutes >= 10, "TimeoutStopSec={stop}");
}

#[test]
fn retry_lock_takes_a_duration_with_its_unit() {
    let place = Place::new();
    for args in [
        &["backup", "vmbt-no-such-vm", "--retry-lock", "30"][..],
        &["gc", "--retry-lock", "soon"],
        &["restore", "x", "--retry-lock", "-5s"],
        &["prune", "--retry-lock"],
    ] {
        let r = vmbackup(&place, args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(!place.repo().exists(), "{args:?} created the repository");
    }
}

/// A timer calls `run-due` every minute: with nothing due it says nothing (text), while
/// `--json` still prints its document.
#[test]
fn run_due_with_nothing_due_prints_nothing() {
    let place = Place::new();
    let out = std::process::Command::new(binary())
        .arg("--repo")
        .arg(place.repo())
        .arg("--state-dir")
        .arg(place.state())
        .arg("run-due")
        .env_remove("VMBACKUP_CONFIG")
        .env_remove("VMBACKUP_JSON")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    let r = vmbackup(&place, &["run-due"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json["ok"], json!(true));
    assert_eq!(r.json["run"]["jobs"], json!([]));
}

/// A gc while a backup holds the repository: busy (4), naming the holder; with
/// `--retry-lock` it waits for the backup to let go, then runs.
#[test]
fn gc_names_the_repository_lock_holder_and_waits_with_retry_lock() {
    use std::time::{Duration, Instant};
    let place = Place::new();
    ok(&vmbackup(&place, &["init"]), "init");
    let repo = vmbackup::repository::Repository::open(&place.repo()).unwrap();
    vmbackup::locks::set_job("backup");
    let held = repo.try_lock_for_backup("web").unwrap().expect("taken");
    let r = vmbackup(&place, &["gc"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    let err = r.json["error"].as_str().unwrap();
    let me = format!("backup of web (pid {} on ", std::process::id());
    assert!(
        err.contains("busy: the repository is locked by") && err.contains(&me),
        "{err}"
    );
    // Too short a wait: still busy, after the wait.
    let started = Instant::now();
    let r = vmbackup(&place, &["gc", "--retry-lock", "2s"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(started.elapsed() >= Duration::from_secs(2));
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        drop(held);
    });
    let started = Instant::now();
    let r = vmbackup(&place, &["gc", "--retry-lock", "20s"]);
    let took = started.elapsed();
    release.join().unwrap();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(15),
        "{took:?}"
    );
    assert!(r.stderr.contains("trying again"), "{}", r.stderr);
}
