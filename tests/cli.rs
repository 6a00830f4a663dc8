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
    // Names no backup (a path is never made of it).
    assert_eq!(r.json["error"]["kind"], "not_found", "{}", r.json);
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

/// `completions` and `man` with `--json`: the script and the page in one document.
#[test]
fn completions_and_man_page_come_as_json_documents_too() {
    let place = Place::new();
    let c = vmbackup(&place, &["completions", "bash"]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    assert_eq!(c.json["shell"], "bash");
    assert!(c.json["script"].as_str().unwrap().contains("vmbackup"));
    let m = vmbackup(&place, &["man"]);
    assert_eq!(m.code, 0, "{}", m.stderr);
    assert!(
        m.json["page"].as_str().unwrap().contains(".TH vmbackup"),
        "{}",
        m.json
    );
    let dir = place.dir.path().join("man");
    std::fs::create_dir(&dir).unwrap();
    let m = vmbackup(&place, &["man", "--dir", dir.to_str().unwrap()]);
    assert_eq!(m.code, 0, "{}", m.stderr);
    let written = m.json["written"].as_array().unwrap();
    assert!(written.len() > 20, "{}", m.json);
    assert!(written
        .iter()
        .all(|w| std::path::Path::new(w.as_str().unwrap()).exists()));
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

/// Terminal polish: progress bars only on a terminal, `-q`/`-v`, clap's colour,
/// suggestions and wrapping, `config show`, tables and durations.
mod terminal {
    use std::io::Read;
    use std::os::fd::OwnedFd;
    use std::process::{Command, Stdio};

    use super::common::*;
    use serde_json::json;
    use vmbackup::repository::disk::backup_disk;
    use vmbackup::repository::manifest::{DiskEntry, Manifest};
    use vmbackup::repository::source::{ChunkKind, ChunkSource};
    use vmbackup::repository::Repository;

    /// `size` bytes of noise, in memory.
    struct Noise(Vec<u8>);

    impl ChunkSource for Noise {
        type Error = std::io::Error;
        fn virtual_size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_chunk(&self, i: u64, size: u64, buf: &mut Vec<u8>) -> std::io::Result<ChunkKind> {
            let end = ((i + 1) * size).min(self.virtual_size());
            buf.clear();
            buf.extend_from_slice(&self.0[(i * size) as usize..end as usize]);
            Ok(ChunkKind::Data)
        }
    }

    /// Publishes backup `id` of VM `vm`: one raw disk of `mib` MiB of noise.
    fn memory_backup(repo: &Repository, id: &str, vm: &str, mib: u64) {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let src = Noise(
            (0..mib * MIB)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect(),
        );
        let b = backup_disk(repo, &src, MIB, 2, &|_, _| {}).unwrap();
        let index_object = repo.put_index(id, "vda", &b.index).unwrap();
        let domain_xml_object = repo
            .put_domain_xml(id, &format!("<domain><name>{vm}</name></domain>"))
            .unwrap();
        repo.publish(&Manifest {
            format_version: 1,
            id: id.into(),
            vm_name: vm.into(),
            vm_uuid: "6d1c5c52-5d3c-4a53-9d3a-000000000001".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            ended_at: "2026-01-01T01:27:14Z".into(),
            consistency: "crash".into(),
            consistency_reason: None,
            freeze_ms: None,
            vcpus: 1,
            memory_bytes: 64 << 20,
            disks: vec![DiskEntry {
                target: "vda".into(),
                format: "raw".into(),
                virtual_size: src.virtual_size(),
                allocated_size: src.virtual_size(),
                source: "/var/lib/libvirt/images/vda.raw".into(),
                chunk_size: MIB,
                index_object,
                logical_bytes: b.logical_bytes,
                stored_bytes: b.stored_bytes_new,
                read: None,
            }],
            nics: vec![],
            domain_xml_object,
            schedule: None,
            scheduled_for: None,
            tags: Vec::new(),
            stored_bytes: b.stored_bytes_new,
            logical_bytes: b.logical_bytes,
            vm_state: None,
        })
        .unwrap();
    }

    /// What a run printed.
    struct Printed {
        code: i32,
        stdout: String,
        stderr: String,
    }

    /// Runs the binary with `args` against `place`, no config file, logging left to the
    /// flags; with `tty`, its stderr (only) is a pseudo-terminal of 120 columns.
    fn run(place: &Place, args: &[&str], env: &[(&str, &str)], tty: bool) -> Printed {
        let mut cmd = Command::new(binary());
        cmd.arg("--repo")
            .arg(place.repo())
            .arg("--state-dir")
            .arg(place.state())
            .args(args)
            .env_remove("VMBACKUP_CONFIG")
            .env_remove("VMBACKUP_LOG")
            .env_remove("VMBACKUP_JSON")
            .env_remove("NO_COLOR")
            .env("TERM", "xterm")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let (child, master) = if tty {
            let size = nix::pty::Winsize {
                ws_row: 40,
                ws_col: 120,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pty = nix::pty::openpty(Some(&size), None).expect("a pseudo-terminal");
            cmd.stderr(Stdio::from(pty.slave));
            // `cmd` holds the slave until it is dropped: the reader's EOF needs it gone.
            let child = cmd.spawn().unwrap();
            drop(cmd);
            (child, Some(pty.master))
        } else {
            (cmd.stderr(Stdio::piped()).spawn().unwrap(), None)
        };
        let reader = master.map(|m: OwnedFd| {
            std::thread::spawn(move || {
                let mut f = std::fs::File::from(m);
                let mut out = Vec::new();
                let mut buf = [0u8; 4096];
                // EIO: every slave closed (the child exited).
                while let Ok(n) = f.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(&buf[..n]);
                }
                out
            })
        });
        let out = child.wait_with_output().unwrap();
        let stderr = match reader {
            Some(r) => r.join().unwrap(),
            None => out.stderr,
        };
        Printed {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    const ID: &str = "vmbt-term-20260101T000000Z-0001";

    fn place_with_backup(mib: u64) -> Place {
        let place = Place::new();
        let repo = Repository::open(&place.repo()).unwrap();
        memory_backup(&repo, ID, "vmbt-term", mib);
        place
    }

    #[test]
    fn verify_and_gc_draw_progress_on_a_terminal_only() {
        let place = place_with_backup(96);
        // On a terminal: the bar (bytes, rate, ETA) and the line it leaves, on stderr; the
        // result alone on stdout.
        let p = run(&place, &["verify"], &[], true);
        assert_eq!(p.code, 0, "{}", p.stderr);
        assert_eq!(p.stdout, format!("{ID}: ok (96 chunks intact)\n"));
        for part in [
            "ETA ",
            "MiB/s",
            "/96.0 MiB",
            &format!("verify {ID}: 96.0 MiB in "),
        ] {
            assert!(p.stderr.contains(part), "no {part:?} in {:?}", p.stderr);
        }
        // Not a terminal, or --json, or -q: no bar.
        for (args, tty) in [
            (&["verify"][..], false),
            (&["--json", "verify"], true),
            (&["-q", "verify"], true),
        ] {
            let p = run(&place, args, &[], tty);
            assert_eq!(p.code, 0, "{args:?}: {}", p.stderr);
            assert!(!p.stderr.contains("ETA"), "{args:?}: {:?}", p.stderr);
            assert!(!p.stderr.contains("MiB"), "{args:?}: {:?}", p.stderr);
        }
        let p = run(&place, &["--json", "verify"], &[], true);
        let doc = vmbackup_testkit::cli::parse_one_document(&p.stdout).unwrap();
        assert_eq!(doc["ok"], json!(true));
        // gc after a delete: its bar counts the bytes it frees.
        let p = run(&place, &["delete", ID], &[], true);
        assert_eq!(p.code, 0, "{}", p.stderr);
        let p = run(&place, &["gc"], &[], true);
        assert_eq!(p.code, 0, "{}", p.stderr);
        assert!(p.stdout.starts_with("removed 96 chunks"), "{}", p.stdout);
        assert!(p.stderr.contains("gc: 96."), "{:?}", p.stderr);
    }

    #[test]
    fn quiet_prints_errors_only_and_verbose_more() {
        let place = place_with_backup(1);
        // A warning (a backup whose manifest cannot be read, skipped by list) is shown by
        // default and hidden by -q; an error is shown either way.
        let m = place.repo().join(format!("backups/{ID}/manifest.json"));
        std::fs::write(&m, b"{not json").unwrap();
        let p = run(&place, &["-q", "gc"], &[], false);
        assert_ne!(p.code, 0);
        assert!(p.stderr.starts_with("error: "), "{:?}", p.stderr);
        let p = run(&place, &["-q", "list"], &[], false);
        assert_eq!(p.code, 0);
        assert_eq!(p.stderr, "", "-q printed more than errors");
        // -v and -q together: bad usage.
        let p = run(&place, &["-q", "-v", "list"], &[], false);
        assert_eq!(p.code, 2, "{}", p.stderr);
        // -v: vmbackup's debug lines; -vv: every crate's, with their targets; VMBACKUP_LOG
        // still wins.
        let p = run(&place, &["list"], &[], false);
        assert!(!p.stderr.contains("DEBUG"), "{:?}", p.stderr);
        let p = run(&place, &["-v", "list"], &[], false);
        assert_eq!(p.code, 0, "{}", p.stderr);
        assert!(p.stderr.contains("DEBUG settings"), "{:?}", p.stderr);
        let p = run(&place, &["-vv", "list"], &[], false);
        assert!(
            p.stderr.contains("DEBUG vmbackup: settings"),
            "{:?}",
            p.stderr
        );
        let p = run(
            &place,
            &["-vv", "list"],
            &[("VMBACKUP_LOG", "error")],
            false,
        );
        assert!(!p.stderr.contains("DEBUG"), "{:?}", p.stderr);
    }

    #[test]
    fn clap_colours_a_terminal_suggests_and_wraps() {
        let place = Place::new();
        // A typo: clap names the command meant.
        let p = run(&place, &["bakup", "x"], &[], false);
        assert_eq!(p.code, 2);
        assert!(
            p.stderr.contains("similar") && p.stderr.contains("backup"),
            "{}",
            p.stderr
        );
        // Help wraps to the terminal's width (COLUMNS here).
        let p = run(&place, &["backup", "--help"], &[("COLUMNS", "60")], false);
        assert_eq!(p.code, 0);
        assert!(
            p.stdout.lines().all(|l| l.chars().count() <= 60),
            "{}",
            p.stdout
        );
        // Colour on a terminal (errors go to stderr), none under NO_COLOR or into a pipe.
        let p = run(&place, &["bakup"], &[], true);
        assert!(p.stderr.contains("\x1b["), "{:?}", p.stderr);
        let p = run(&place, &["bakup"], &[("NO_COLOR", "1")], true);
        assert!(!p.stderr.contains("\x1b["), "{:?}", p.stderr);
        let p = run(&place, &["bakup"], &[], false);
        assert!(!p.stderr.contains("\x1b["), "{:?}", p.stderr);
        // -c is --connect, as in virsh.
        let p = run(
            &place,
            &["-c", "test:///default", "--json", "config", "show"],
            &[],
            false,
        );
        let doc = vmbackup_testkit::cli::parse_one_document(&p.stdout).unwrap();
        let connect = find(&doc, "connect");
        assert_eq!(connect["value"], json!("test:///default"));
        assert_eq!(connect["flag"], json!("--connect"));
    }

    fn find<'a>(doc: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
        doc["config"]["settings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["key"] == json!(key))
            .unwrap_or_else(|| panic!("no {key} in {doc}"))
    }

    #[test]
    fn config_show_says_where_each_setting_came_from_and_hides_secrets() {
        let place = Place::new();
        let config = place.dir.path().join("config.toml");
        std::fs::write(&config, "max_disk_gib = 100\nthreads = 3\n").unwrap();
        let config = config.to_str().unwrap();
        let env = [
            ("VMBACKUP_SLOT_CAPACITY", "3"),
            ("AWS_SECRET_ACCESS_KEY", "very-secret-value-42"),
            (
                "VMBACKUP_PASSPHRASE_COMMAND",
                "echo passphrase-in-a-command",
            ),
        ];
        let args = ["--config", config, "config", "show"];
        let p = run(&place, &[&["--json"][..], &args].concat(), &env, false);
        assert_eq!(p.code, 0, "{}", p.stderr);
        let doc = vmbackup_testkit::cli::parse_one_document(&p.stdout).unwrap();
        let repo = find(&doc, "repo");
        assert_eq!(repo["source"], json!("flag"));
        assert_eq!(repo["value"], json!(place.repo().to_str().unwrap()));
        let slots = find(&doc, "slot_capacity");
        assert_eq!(
            (&slots["source"], &slots["env"]),
            (&json!("env"), &json!("VMBACKUP_SLOT_CAPACITY"))
        );
        assert_eq!(slots["value"], json!(3));
        let disk = find(&doc, "max_disk_gib");
        assert_eq!(
            (&disk["source"], &disk["file"]),
            (&json!("file"), &json!(config))
        );
        assert_eq!(find(&doc, "threads")["value"], json!(3));
        let total = find(&doc, "max_total_gib");
        assert_eq!(
            (&total["source"], &total["value"]),
            (&json!("default"), &json!(4000))
        );
        let secret = find(&doc, "s3.secret_access_key");
        assert_eq!(
            (&secret["value"], &secret["secret"]),
            (&json!("(set)"), &json!(true))
        );
        assert_eq!(doc["config"]["config_file"], json!(config));
        let text = run(&place, &args, &env, false);
        assert_eq!(text.code, 0, "{}", text.stderr);
        for out in [&p.stdout, &p.stderr, &text.stdout, &text.stderr] {
            assert!(!out.contains("very-secret-value-42"), "{out}");
            assert!(!out.contains("passphrase-in-a-command"), "{out}");
        }
        let line = |key: &str| -> String {
            text.stdout
                .lines()
                .find(|l| l.split_whitespace().next() == Some(key))
                .unwrap_or_else(|| panic!("no {key}: {}", text.stdout))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            line("slot_capacity"),
            "slot_capacity 3 env VMBACKUP_SLOT_CAPACITY"
        );
        assert_eq!(
            line("max_disk_gib"),
            format!("max_disk_gib 100 file {config}")
        );
        assert_eq!(line("max_total_gib"), "max_total_gib 4000 default");
        assert!(line("repo").ends_with("flag --repo"), "{}", text.stdout);
        assert_eq!(
            line("s3.secret_access_key"),
            "s3.secret_access_key (set) env AWS_SECRET_ACCESS_KEY"
        );
    }

    #[test]
    fn tables_fit_their_content_and_show_reads_as_text() {
        let place = place_with_backup(1);
        let p = run(&place, &["list"], &[], false);
        assert_eq!(p.code, 0, "{}", p.stderr);
        let lines: Vec<&str> = p.stdout.lines().collect();
        assert_eq!(lines.len(), 2, "{}", p.stdout);
        // The ID column is as wide as the id, two spaces before the next.
        assert!(
            lines[0].starts_with(&format!("ID{}  VM", " ".repeat(ID.len() - 2))),
            "{}",
            p.stdout
        );
        assert!(
            lines[1].starts_with(&format!("{ID}  vmbt-term  2026-01-01T00:00:00Z")),
            "{}",
            p.stdout
        );
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{}", p.stdout);
        let p = run(&place, &["show", ID], &[], false);
        assert_eq!(p.code, 0, "{}", p.stderr);
        assert!(!p.stdout.trim_start().starts_with('{'), "{}", p.stdout);
        for part in [
            &format!("backup:         {ID}\n"),
            "ended:          2026-01-01T01:27:14Z UTC (1h 27m 14s)\n",
            "last boot test: none\n",
            "DISK  FORMAT     SIZE     DATA",
        ] {
            assert!(p.stdout.contains(part), "no {part:?} in\n{}", p.stdout);
        }
    }
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
    let err = r.json["error"]["message"].as_str().unwrap();
    let me = format!("backup of web (pid {} on ", std::process::id());
    assert!(
        err.contains("busy: the repository is locked by") && err.contains(&me),
        "{err}"
    );
    // The error document names the holder as fields too.
    assert_eq!(r.json["error"]["kind"], "busy", "{}", r.json);
    let h = &r.json["error"]["holders"][0];
    assert_eq!(
        (&h["job"], &h["vm"], &h["pid"]),
        (&json!("backup"), &json!("web"), &json!(std::process::id())),
        "{}",
        r.json
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
