//! Schedules, `run-due`, retention, history and job reports, against real libvirt domains
//! running real guests, driven by `run-due --now` over a simulated week.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use jiff::Timestamp;
use serde_json::Value;
use vmbackup::repository::Repository;
use vmbackup::schedule::calendar::vm_offset_secs;
use vmbackup_testkit::libvirt_vm::{Format, TestVmBuilder};
use vmbackup_testkit::smtp::Smtp;

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn plus_hours(t: Timestamp, h: i64) -> Timestamp {
    Timestamp::from_second(t.as_second() + h * 3600).unwrap()
}

/// Starts `vmbackup --json ... run-due --now NOW` without waiting.
fn spawn_run_due(place: &Place, now: Timestamp, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vmbackup"))
        .arg("--json")
        .arg("--repo")
        .arg(place.repo())
        .arg("--state-dir")
        .arg(place.state())
        .args(extra)
        .args(["run-due", "--now", &now.to_string()])
        .env_remove("VMBACKUP_CONFIG")
        .env("VMBACKUP_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vmbackup")
}

fn finish(child: Child) -> (i32, Value, String) {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v: Value = vmbackup_testkit::cli::parse_one_document(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout:?}\n{stderr}"));
    (out.status.code().unwrap_or(-1), v, stderr)
}

/// The history, all of it.
fn history(place: &Place) -> Vec<Value> {
    let h = vmbackup(place, &["history", "--all"]);
    assert_eq!(h.code, 0, "{}", h.stderr);
    h.json["jobs"].as_array().unwrap().clone()
}

fn jobs_where<'a>(jobs: &'a [Value], kind: &str, status: &str) -> Vec<&'a Value> {
    jobs.iter()
        .filter(|j| j["kind"] == kind && j["status"] == status)
        .collect()
}

/// The occurrence of the 02:00 UTC slot on `day` for `vm`.
fn due_of(day: &str, vm: &str) -> Timestamp {
    due_at(day, 2, vm)
}

/// The occurrence of the `hour`:00 UTC slot on `day` for `vm`.
fn due_at(day: &str, hour: u8, vm: &str) -> Timestamp {
    let slot = ts(&format!("{day}T{hour:02}:00:00Z"));
    Timestamp::from_second(slot.as_second() + vm_offset_secs(vm)).unwrap()
}

#[test]
fn a_simulated_week_runs_each_occurrence_once_keeps_the_newest_n_and_records_what_was_missed() {
    let a = TestVmBuilder::new("sch-a")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest a boots");
    let b = TestVmBuilder::new("sch-b")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest b boots");
    let place = Place::new();
    let add = vmbackup(
        &place,
        &[
            "schedule",
            "add",
            "nightly",
            "--vm",
            a.name(),
            "--vm",
            b.name(),
            "--type",
            "daily",
            "--slot",
            "2",
            "--tz",
            "UTC",
            "--start",
            "2027-01-04",
            "--keep",
            "3",
        ],
    );
    assert_eq!(add.code, 0, "{}", add.stderr);
    let add = vmbackup(
        &place,
        &[
            "schedule",
            "add",
            "weekly",
            "--vm",
            b.name(),
            "--type",
            "weekly",
            "--weekday",
            "wednesday",
            "--slot",
            "5",
            "--tz",
            "UTC",
            "--start",
            "2027-01-04",
        ],
    );
    assert_eq!(add.code, 0, "{}", add.stderr);

    // Monday 2027-01-04 to Sunday 2027-01-10, a run-due every hour, two of them at once each
    // time. The host is "down" on Thursday from 00:00 to 12:00: that night's occurrences are
    // more than the catch-up window (6 h) late when the timer comes back.
    let start = ts("2027-01-04T00:00:00Z");
    let down = (ts("2027-01-07T00:00:00Z"), ts("2027-01-07T12:00:00Z"));
    let mut ran_per_step = Vec::new();
    // VM a's first backup is pinned: retention neither deletes nor counts it.
    let mut pinned: Option<String> = None;
    for h in 0..(7 * 24) {
        let now = plus_hours(start, h);
        if now >= down.0 && now < down.1 {
            continue;
        }
        let first = spawn_run_due(&place, now, &[]);
        let second = spawn_run_due(&place, now, &[]);
        let mut ok_ids = Vec::new();
        for child in [first, second] {
            let (code, v, stderr) = finish(child);
            assert_eq!(code, 0, "run-due at {now}: {v}\n{stderr}");
            for job in v["run"]["jobs"].as_array().unwrap() {
                for r in job["results"].as_array().unwrap() {
                    if r["status"] == "ok" {
                        ok_ids.push(r["backup_id"].as_str().unwrap().to_string());
                    }
                }
            }
        }
        if pinned.is_none() {
            if let Some(id) = ok_ids
                .iter()
                .find(|i| i.starts_with(&format!("{}-", a.name())))
            {
                let p = vmbackup(&place, &["pin", id]);
                assert_eq!(p.code, 0, "{}", p.stderr);
                pinned = Some(id.clone());
            }
        }
        if !ok_ids.is_empty() {
            ran_per_step.push((now, ok_ids));
        }
    }

    let jobs = history(&place);
    let ok = jobs_where(&jobs, "backup", "ok");
    // Per (schedule, VM): the occurrences that ran, each exactly once.
    let mut ran: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for j in &ok {
        ran.entry((
            j["schedule"].as_str().unwrap().to_string(),
            j["vm"].as_str().unwrap().to_string(),
        ))
        .or_default()
        .push(j["due"].as_str().unwrap().to_string());
    }
    let days_run = [
        "2027-01-04",
        "2027-01-05",
        "2027-01-06",
        "2027-01-08",
        "2027-01-09",
        "2027-01-10",
    ];
    for vm in [a.name(), b.name()] {
        let want: Vec<String> = days_run.iter().map(|d| due_of(d, vm).to_string()).collect();
        assert_eq!(ran[&("nightly".to_string(), vm.to_string())], want, "{vm}");
    }
    assert_eq!(
        ran[&("weekly".to_string(), b.name().to_string())],
        vec![due_at("2027-01-06", 5, b.name()).to_string()]
    );
    assert_eq!(
        ok.len(),
        13,
        "every occurrence ran once, none twice: {ran:?}"
    );

    // Thursday's occurrences are recorded as missed, not run.
    let missed = jobs_where(&jobs, "backup", "missed");
    let missed: BTreeSet<(String, String)> = missed
        .iter()
        .map(|j| {
            (
                j["vm"].as_str().unwrap().into(),
                j["due"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = [a.name(), b.name()]
        .iter()
        .map(|vm| (vm.to_string(), due_of("2027-01-07", vm).to_string()))
        .collect();
    assert_eq!(missed, want);

    // Retention: the newest 3 of each VM's nightly backups stay (and a's pinned first one);
    // the weekly one too.
    let repo = Repository::open(&place.repo()).unwrap();
    let mut kept: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for m in repo.list().unwrap() {
        kept.entry((m.schedule.clone().unwrap(), m.vm_name.clone()))
            .or_default()
            .push(m.scheduled_for.clone().unwrap());
    }
    for vm in [a.name(), b.name()] {
        let mut got = kept[&("nightly".to_string(), vm.to_string())].clone();
        got.sort();
        let days: &[&str] = if vm == a.name() {
            &["2027-01-04", "2027-01-08", "2027-01-09", "2027-01-10"]
        } else {
            &["2027-01-08", "2027-01-09", "2027-01-10"]
        };
        let want: Vec<String> = days.iter().map(|d| due_of(d, vm).to_string()).collect();
        assert_eq!(got, want, "{vm}");
    }
    let list = vmbackup(&place, &["list", a.name()]);
    let pinned_rows: Vec<&Value> = list.json["backups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["pinned"] == true)
        .collect();
    assert_eq!(pinned_rows.len(), 1);
    assert_eq!(pinned_rows[0]["id"].as_str(), pinned.as_deref());
    assert_eq!(kept[&("weekly".to_string(), b.name().to_string())].len(), 1);
    assert_eq!(kept.len(), 3);
    // Each prune ran after a successful backup and removed exactly the ones beyond the count:
    // a's after the 9th and 10th (its pinned one does not count), b's after the 8th to 10th.
    let prunes = jobs_where(&jobs, "prune", "ok");
    assert_eq!(prunes.len(), 5, "{prunes:?}");
    // Two run-due at once shared the work: no step produced the same backup twice.
    for (now, ids) in &ran_per_step {
        let set: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(set.len(), ids.len(), "{now}: {ids:?}");
    }
    // The guests were thawed: their agents answer and the disk takes writes.
    for vm in [&a, &b] {
        vm.sh("echo after > /mnt/vdb/after && sync").unwrap();
    }
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_failing_scheduled_backup_is_recorded_deletes_nothing_and_is_reported_by_mail() {
    let vm = TestVmBuilder::new("sch-fail")
        .no_agent()
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest starts");
    let place = Place::new();
    let smtp = Smtp::start();
    let hook_out = place.dir.path().join("hook.json");
    let config = place.dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[report]\nsmtp = \"127.0.0.1:{}\"\nfrom = \"vmbackup@test.invalid\"\nto = [\"ops@test.invalid\"]\ncommand = [\"/usr/bin/tee\", \"{}\"]\n",
            smtp.port,
            hook_out.display()
        ),
    )
    .unwrap();
    let cfg = config.to_string_lossy().into_owned();
    let add = vmbackup(
        &place,
        &[
            "schedule",
            "add",
            "keep1",
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
            "--keep",
            "1",
            "--quiesce",
            "preferred",
        ],
    );
    assert_eq!(add.code, 0, "{}", add.stderr);

    // Day 1: no agent, `preferred`: a crash-consistent backup.
    let r = run_due_at(&place, &cfg, "2027-02-01T04:00:00Z");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let first = &r.json["run"]["jobs"][0]["results"][0];
    assert_eq!(first["status"], "ok", "{}", r.json);
    assert_eq!(first["consistency"], "crash");
    let first_id = first["backup_id"].as_str().unwrap().to_string();

    // Day 2: the schedule now requires the agent: the backup fails and deletes nothing.
    let edit = vmbackup(
        &place,
        &["schedule", "edit", "keep1", "--quiesce", "required"],
    );
    assert_eq!(edit.code, 0, "{}", edit.stderr);
    let r = run_due_at(&place, &cfg, "2027-02-02T04:00:00Z");
    assert_eq!(r.code, 1, "a run whose only job failed: {}", r.json);
    let second = &r.json["run"]["jobs"][0]["results"][0];
    assert_eq!(second["status"], "failed");
    assert!(second["pruned"].as_array().unwrap().is_empty());
    let list = vmbackup(&place, &["list"]);
    let ids: Vec<&str> = list.json["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![first_id.as_str()]);
    let jobs = history(&place);
    let failed = jobs_where(&jobs, "backup", "failed");
    assert_eq!(failed.len(), 1, "{jobs:?}");
    assert_eq!(failed[0]["vm"], vm.name());
    assert_eq!(failed[0]["schedule"], "keep1");
    let err = failed[0]["error"].as_str().unwrap();
    assert!(err.contains("agent"), "{err}");
    assert!(jobs_where(&jobs, "prune", "ok").is_empty());
    assert!(jobs_where(&jobs, "prune", "failed").is_empty());

    // Each run-due sent one report per job: a mail with the per-VM table, and the JSON to
    // the command.
    let mails = wait_for("two mails", || {
        let m = smtp.texts();
        (m.len() == 2).then_some(m)
    });
    let failed_mail = mails
        .iter()
        .find(|m| m.contains("Subject: vmbackup keep1: 0 ok, 1 failed"))
        .unwrap_or_else(|| panic!("{mails:?}"));
    assert!(failed_mail.contains(vm.name()));
    assert!(failed_mail.contains("failed"));
    assert!(
        failed_mail.contains("2027-02-02T03:"),
        "the due time in UTC: {failed_mail}"
    );
    assert!(failed_mail.contains("agent"), "{failed_mail}");
    // The day-1 backup fell back to crash-consistent (no agent): the subject counts it.
    let ok_mail = mails
        .iter()
        .find(|m| m.contains("Subject: vmbackup keep1: 1 ok (1 crash-consistent), 0 failed"))
        .unwrap_or_else(|| panic!("{mails:?}"));
    assert!(ok_mail.contains(&first_id));
    let hook: Value = serde_json::from_slice(&std::fs::read(&hook_out).unwrap()).unwrap();
    assert_eq!(hook["schedule"], "keep1");
    assert_eq!(
        (&hook["kind"], &hook["status"]),
        (&"schedule".into(), &"failed".into())
    );
    assert_eq!(hook["results"][0]["status"], "failed");

    // The history has both jobs, with start, end and duration.
    let h = vmbackup(&place, &["history", "--all", "--vm", vm.name()]);
    let jobs = h.json["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    for j in jobs {
        assert!(
            j["started_at"].is_string() && j["ended_at"].is_string() && j["duration_ms"].is_i64()
        );
    }
}

#[test]
fn a_schedule_boot_tests_every_nth_backup_and_keeps_older_backups_when_one_does_not_pass() {
    let vm = TestVmBuilder::new("sch-boot")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest starts");
    vm.write_file("/mnt/vdb/marker", b"scheduled\n").unwrap();
    let place = Place::new();
    let hook_out = place.dir.path().join("hook.json");
    let config = place.dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[report]\ncommand = [\"/usr/bin/tee\", \"{}\"]\n",
            hook_out.display()
        ),
    )
    .unwrap();
    let cfg = config.to_string_lossy().into_owned();
    let add = vmbackup(
        &place,
        &[
            "schedule",
            "add",
            "tested",
            "--vm",
            vm.name(),
            "--type",
            "daily",
            "--slot",
            "3",
            "--tz",
            "UTC",
            "--start",
            "2027-03-01",
            "--keep",
            "1",
            "--boot-test-every",
            "2",
            "--boot-test-timeout",
            "120",
            "--boot-test-command",
            "grep -q scheduled /mnt/vdb/marker",
        ],
    );
    assert_eq!(add.code, 0, "{}", add.stderr);
    let rule = &add.json["schedule"]["boot_test"];
    assert_eq!(rule["every"], 2, "{rule}");
    assert_eq!(rule["timeout_secs"], 120);

    // Day 1: the first backup of two: no boot test yet.
    let r = run_due_at(&place, &cfg, "2027-03-01T04:00:00Z");
    assert_eq!(r.code, 0, "{}", r.stderr);
    let first = &r.json["run"]["jobs"][0]["results"][0];
    assert_eq!(first["status"], "ok", "{first}");
    assert!(first["boot_test"].is_null(), "{first}");

    // Day 2: the second: boot-tested (the command reads the backed-up file), kept with the
    // backup, in the history and the report; retention then deletes the first.
    let r = run_due_at(&place, &cfg, "2027-03-02T04:00:00Z");
    assert_eq!(r.code, 0, "{}\n{}", r.json, r.stderr);
    let second = &r.json["run"]["jobs"][0]["results"][0];
    assert_eq!(second["boot_test"]["booted"], true, "{second}");
    assert!(second["boot_test"]["error"].is_null(), "{second}");
    assert_eq!(second["boot_test"]["command_exit_code"], 0);
    assert_eq!(second["pruned"].as_array().unwrap().len(), 1, "{second}");
    let second_id = second["backup_id"].as_str().unwrap().to_string();
    let show = vmbackup(&place, &["show", &second_id]);
    assert_eq!(show.json["boot_test"]["booted"], true, "{}", show.json);
    let hook: Value = serde_json::from_slice(&std::fs::read(&hook_out).unwrap()).unwrap();
    assert_eq!(hook["results"][0]["boot_test"]["booted"], true, "{hook}");
    let jobs = history(&place);
    let tests = jobs_where(&jobs, "boot-test", "ok");
    assert_eq!(tests.len(), 1, "{jobs:?}");
    assert_eq!(tests[0]["schedule"], "tested");
    assert_eq!(tests[0]["backup_id"], second_id.as_str());

    // Day 3, every backup tested, with a command that fails: the backup is made and kept,
    // the run is partial (exit 5), and retention deletes nothing (the older backup may be
    // the last one that boots).
    let edit = vmbackup(
        &place,
        &[
            "schedule",
            "edit",
            "tested",
            "--boot-test-every",
            "1",
            "--boot-test-command",
            "exit 3",
        ],
    );
    assert_eq!(edit.code, 0, "{}", edit.stderr);
    let r = run_due_at(&place, &cfg, "2027-03-03T04:00:00Z");
    assert_eq!(r.code, 5, "{}\n{}", r.json, r.stderr);
    let third = &r.json["run"]["jobs"][0]["results"][0];
    assert_eq!(third["status"], "ok", "{third}");
    assert_eq!(third["boot_test"]["command_exit_code"], 3, "{third}");
    assert!(third["pruned"].as_array().unwrap().is_empty(), "{third}");
    let why = third["prune_errors"][0].as_str().unwrap_or_default();
    assert!(why.contains("boot test"), "{third}");
    let list = vmbackup(&place, &["list"]);
    assert_eq!(list.json["backups"].as_array().unwrap().len(), 2);
    let hook: Value = serde_json::from_slice(&std::fs::read(&hook_out).unwrap()).unwrap();
    assert!(
        hook["results"][0]["boot_test"]["error"].is_string(),
        "{hook}"
    );
    let jobs = history(&place);
    assert_eq!(
        jobs_where(&jobs, "boot-test", "failed").len(),
        1,
        "{jobs:?}"
    );
    // The throwaway VMs are gone.
    let prefix = format!("vmbackup-boottest-{}-", vm.name());
    let left: Vec<String> = vm
        .libvirt()
        .domain_names()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // `--no-boot-test` drops the rule; a rule with a plain QEMU VM, or every 0, is refused.
    let edit = vmbackup(&place, &["schedule", "edit", "tested", "--no-boot-test"]);
    assert_eq!(edit.code, 0, "{}", edit.stderr);
    assert!(edit.json["schedule"]["boot_test"].is_null());
    for bad in [
        &[
            "schedule",
            "add",
            "q",
            "--vm",
            "qemu:x",
            "--type",
            "daily",
            "--slot",
            "1",
            "--boot-test",
        ][..],
        &["schedule", "edit", "tested", "--boot-test-every", "0"][..],
        &["schedule", "edit", "tested", "--boot-test-timeout", "0"][..],
    ] {
        let r = vmbackup(&place, bad);
        assert_eq!(r.code, 2, "{bad:?}: {}", r.stderr);
    }
    let show = vmbackup(&place, &["schedule", "show", "tested"]);
    assert!(show.json["schedule"]["boot_test"].is_null(), "unchanged");
    assert_eq!(schedule_names(&place), vec!["tested".to_string()]);
}

fn run_due_at(place: &Place, config: &str, now: &str) -> Run {
    vmbackup(place, &["--config", config, "run-due", "--now", now])
}

fn schedule_names(place: &Place) -> Vec<String> {
    let l = vmbackup(place, &["schedule", "list"]);
    assert_eq!(l.code, 0, "{}", l.stderr);
    l.json["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_schedule_for_a_full_slot_is_refused_with_the_nearest_free_slots() {
    let place = Place::new();
    let cap = ["--slot-capacity", "2"];
    let add = |name: &str, vms: &[&str], slot: &str| {
        let mut args: Vec<&str> = cap.to_vec();
        args.extend([
            "schedule", "add", name, "--type", "daily", "--tz", "UTC", "--slot", slot,
        ]);
        for v in vms {
            args.extend(["--vm", v]);
        }
        vmbackup(&place, &args)
    };
    assert_eq!(add("one", &["qemu:a", "qemu:b"], "2").code, 0);
    assert_eq!(add("two", &["qemu:c"], "3").code, 0);
    let before = schedule_names(&place);
    let r = add("three", &["qemu:d"], "2");
    assert_eq!(r.code, 3, "{}", r.stderr);
    let msg = r.json["error"]["message"].as_str().unwrap();
    assert!(msg.contains("slot 02:00-03:00 UTC is full"), "{msg}");
    assert!(msg.contains("2 of 2 VMs"), "{msg}");
    assert!(
        msg.contains("nearest slots with room: 01:00-02:00, 03:00-04:00, 00:00-01:00"),
        "{msg}"
    );
    assert_eq!(schedule_names(&place), before, "nothing changed");
    // `--slot auto` finds room; a disabled schedule takes none, and enabling it is checked.
    let auto = add("three", &["qemu:d"], "auto");
    assert_eq!(auto.code, 0, "{}", auto.stderr);
    assert_eq!(auto.json["schedule"]["hour"], 0);
    let mut args: Vec<&str> = cap.to_vec();
    args.extend([
        "schedule",
        "add",
        "four",
        "--type",
        "daily",
        "--tz",
        "UTC",
        "--slot",
        "2",
        "--vm",
        "qemu:e",
        "--disabled",
    ]);
    assert_eq!(vmbackup(&place, &args).code, 0);
    let mut args: Vec<&str> = cap.to_vec();
    args.extend(["schedule", "enable", "four"]);
    assert_eq!(vmbackup(&place, &args).code, 3);
    // An edit into the full slot is refused the same way.
    let mut args: Vec<&str> = cap.to_vec();
    args.extend(["schedule", "edit", "two", "--slot", "2"]);
    let r = vmbackup(&place, &args);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let show = vmbackup(&place, &["schedule", "show", "two"]);
    assert_eq!(show.json["schedule"]["hour"], 3);
}

#[test]
fn bad_schedules_are_refused_with_exit_code_2_and_change_nothing() {
    let place = Place::new();
    let bad: [&[&str]; 7] = [
        &[
            "schedule",
            "add",
            "x",
            "--vm",
            "vmbt-no-such-vm",
            "--type",
            "daily",
            "--slot",
            "1",
        ],
        &[
            "schedule", "add", "x", "--vm", "qemu:a", "--type", "weekly", "--slot", "1",
        ],
        &[
            "schedule", "add", "x", "--vm", "qemu:a", "--type", "daily", "--slot", "24",
        ],
        &[
            "schedule",
            "add",
            "x",
            "--vm",
            "qemu:a",
            "--type",
            "daily",
            "--slot",
            "1",
            "--tz",
            "Mars/Base",
        ],
        &[
            "schedule", "add", "../x", "--vm", "qemu:a", "--type", "daily", "--slot", "1",
        ],
        &[
            "schedule", "add", "x", "--vm", "qemu:a", "--type", "monthly", "--day", "32", "--slot",
            "1",
        ],
        &["schedule", "edit", "nope", "--slot", "1"],
    ];
    for args in bad {
        let r = vmbackup(&place, args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.json["error"]["message"]
            .as_str()
            .is_some_and(|e| !e.is_empty()));
    }
    assert!(schedule_names(&place).is_empty());
    let r = vmbackup(&place, &["run-due", "--now", "yesterday"]);
    assert_eq!(r.code, 2);
    assert!(
        !Path::new(&place.repo()).exists(),
        "no repository was created"
    );
}

/// A libvirt VM and a plain QEMU VM of the same name in one schedule: each is its own VM.
/// Retention prunes the plain QEMU VM's scheduled backups by the schedule's rule, and prunes
/// each VM's backups only after a successful backup of that VM: while the libvirt VM's
/// backups are skipped (busy), its older backups stay, whatever the plain QEMU VM does.
#[test]
fn a_schedule_with_a_libvirt_and_a_plain_qemu_vm_of_one_name_prunes_each_after_its_own_backup() {
    let lv = TestVmBuilder::new("ret-lv")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("libvirt guest boots");
    let place = Place::new();
    let vdb = place.dir.path().join("q-vdb.qcow2");
    vmbackup_testkit::libvirt_vm::make_disk(
        &vdb,
        &vmbackup_testkit::libvirt_vm::DiskSpec {
            target: "vdb".into(),
            format: Format::Qcow2,
            size: 64 * MIB,
            ext4: true,
            fill_from: None,
        },
    )
    .unwrap();
    let q = vmbackup_testkit::qemu_vm::TestQemu::start(
        "ret-q",
        &[(vdb.clone(), "qcow2")],
        Duration::from_secs(180),
    )
    .expect("plain QEMU guest boots");
    // The plain QEMU VM answers to the libvirt VM's name in its own socket folder.
    let name = lv.name().to_string();
    let qdir = place.dir.path().join("qemu");
    std::fs::create_dir_all(&qdir).unwrap();
    for ext in ["qmp", "qga"] {
        std::os::unix::fs::symlink(
            q.dir().join(format!("{}.{ext}", q.name())),
            qdir.join(format!("{name}.{ext}")),
        )
        .unwrap();
    }
    let qemu_vm = vmbackup::vm_ref::VmRef::qemu(&name).unwrap().to_string();
    let qd = qdir.to_string_lossy().into_owned();
    let add = vmbackup(
        &place,
        &[
            "schedule",
            "add",
            "mixed",
            "--vm",
            &name,
            "--vm",
            &qemu_vm,
            "--type",
            "daily",
            "--slot",
            "2",
            "--tz",
            "UTC",
            "--start",
            "2027-01-04",
            "--keep-days",
            "2",
        ],
    );
    assert_eq!(add.code, 0, "{}", add.stderr);

    let backups_of = |vm: &str| -> Vec<String> {
        let r = vmbackup(&place, &["list", vm]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        r.json["backups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["scheduled_for"].as_str().unwrap()[..10].to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    let mut held = None;
    for day in 4..=8 {
        // From the third day on, the libvirt VM is busy: its backups are skipped.
        if day == 6 {
            held = Some(vmbackup::locks::lock_vm(&place.state(), &name.parse().unwrap()).unwrap());
        }
        let now = ts(&format!("2027-01-{day:02}T03:00:00Z"));
        let (code, v, stderr) = finish(spawn_run_due(&place, now, &["--qemu-dir", &qd]));
        let statuses: BTreeMap<String, String> = v["run"]["jobs"][0]["results"]
            .as_array()
            .unwrap_or_else(|| panic!("day {day}: exit {code}: {v}\n{stderr}"))
            .iter()
            .map(|r| {
                (
                    r["vm"].as_str().unwrap().to_string(),
                    r["status"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let lv_status = if day >= 6 { "skipped" } else { "ok" };
        assert_eq!(
            statuses.get(&name).map(String::as_str),
            Some(lv_status),
            "day {day}: {v}\n{stderr}"
        );
        assert_eq!(
            statuses.get(&qemu_vm).map(String::as_str),
            Some("ok"),
            "day {day}: {v}\n{stderr}"
        );
        assert!(code == 0 || code == 5, "day {day}: exit {code}\n{stderr}");
    }
    drop(held);
    // The plain QEMU VM's own rule ran after each of its backups: nothing older than two
    // days (before the 6th, 03:00) is left (before, its backups were never pruned).
    assert_eq!(
        backups_of(&qemu_vm),
        ["2027-01-07", "2027-01-08"],
        "plain QEMU VM's backups"
    );
    // The libvirt VM has had no successful backup since the 5th: nothing of it was pruned,
    // although the plain QEMU VM of the same name was pruned every day.
    assert_eq!(
        backups_of(&name),
        ["2027-01-04", "2027-01-05"],
        "libvirt VM's backups"
    );
}

#[test]
fn a_prune_that_deletes_some_and_a_run_due_whose_report_fails_exit_5() {
    let vm = TestVmBuilder::new("sch-partial")
        .disk("vdb", Format::Qcow2, 16 * MIB)
        .define()
        .expect("VM defined");
    let place = Place::new();
    let add = vmbackup(
        &place,
        &[
            "schedule",
            "add",
            "p",
            "--vm",
            vm.name(),
            "--type",
            "daily",
            "--slot",
            "3",
            "--tz",
            "UTC",
            "--start",
            "2027-04-01",
        ],
    );
    assert_eq!(add.code, 0, "{}", add.stderr);
    let none = place.dir.path().join("none.toml");
    std::fs::write(&none, "").unwrap();
    let none = none.to_string_lossy().into_owned();
    for day in ["2027-04-01", "2027-04-02"] {
        let r = run_due_at(&place, &none, &format!("{day}T04:00:00Z"));
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    // Day 3: the backup is made, but its report cannot be delivered: exit 5, said in JSON.
    let failing = place.dir.path().join("failing.toml");
    std::fs::write(&failing, "[report]\ncommand = [\"/bin/false\"]\n").unwrap();
    let r = run_due_at(&place, &failing.to_string_lossy(), "2027-04-03T04:00:00Z");
    assert_eq!(r.code, 5, "{}\n{}", r.json, r.stderr);
    assert_eq!(r.json["run"]["jobs"][0]["results"][0]["status"], "ok");
    assert_eq!(
        r.json["run"]["report_errors"].as_array().unwrap().len(),
        1,
        "{}",
        r.json
    );

    // Keep 1 of 3: of the two to delete, one cannot be (its manifest immutable): exit 5,
    // the other is deleted; then the second prune deletes the rest, exit 0.
    let edit = vmbackup(&place, &["schedule", "edit", "p", "--keep", "1"]);
    assert_eq!(edit.code, 0, "{}", edit.stderr);
    let ids: Vec<String> = vmbackup(&place, &["list"]).json["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    let oldest = place
        .repo()
        .join("backups")
        .join(&ids[0])
        .join("manifest.json");
    let chattr = |flag: &str| {
        let st = Command::new("chattr")
            .arg(flag)
            .arg(&oldest)
            .status()
            .unwrap();
        assert!(st.success());
    };
    // A dry run names both and deletes nothing.
    let dry = vmbackup(&place, &["prune", "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert_eq!(dry.json["deleted"], serde_json::json!([ids[0], ids[1]]));
    assert_eq!(
        vmbackup(&place, &["list"]).json["backups"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    // Prunes report by `on = "failure"`: the one that fails in part does, the other not.
    let hook_out = place.dir.path().join("prune-reports.jsonl");
    let on_failure = place.dir.path().join("on-failure.toml");
    std::fs::write(
        &on_failure,
        format!(
            "[report]\non = \"failure\"\ncommand = [\"/bin/sh\", \"-c\", \"cat >> '{}'; echo >> '{}'\"]\n",
            hook_out.display(),
            hook_out.display()
        ),
    )
    .unwrap();
    let on_failure = on_failure.to_string_lossy().into_owned();
    chattr("+i");
    let p = vmbackup(&place, &["--config", &on_failure, "prune"]);
    chattr("-i");
    assert_eq!(p.code, 5, "{}\n{}", p.json, p.stderr);
    assert_eq!(p.json["deleted"], serde_json::json!([ids[1]]));
    assert!(
        p.json["errors"][0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&ids[0]),
        "{}",
        p.json
    );
    let p = vmbackup(&place, &["--config", &on_failure, "prune"]);
    assert_eq!(p.code, 0, "{}", p.stderr);
    assert_eq!(p.json["deleted"], serde_json::json!([ids[0]]));
    let reports: Vec<Value> = std::fs::read_to_string(&hook_out)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let r = &reports[0];
    assert_eq!(
        (&r["kind"], &r["status"]),
        (&"prune".into(), &"failed".into()),
        "{r}"
    );
    assert_eq!(r["results"][0]["vm"], vm.name());
    assert_eq!(r["results"][0]["pruned"], serde_json::json!([ids[1]]));
    assert!(
        r["results"][0]["prune_errors"][0]
            .as_str()
            .unwrap()
            .contains(&ids[0]),
        "{r}"
    );
    assert_eq!(
        r["subject"],
        "vmbackup prune: 1 ok, 0 failed, 1 with retention errors"
    );
}
