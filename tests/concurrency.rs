//! Commands racing each other (issue 13, "Concurrency"), against real libvirt domains: one
//! command is held at a fail point (`stop`: SIGSTOP, then SIGCONT) while another runs, so the
//! race is certain rather than likely.
//! - two backups of one VM, gc during a backup, a backup during gc, recover during a backup:
//!   the second one exits 4 (busy) and changes nothing; a scheduled occurrence that found its
//!   VM or the repository busy is run by the next `run-due` inside its window;
//! - `delete` and `prune` during `list`, `verify`, `gc` and the retention pass of `run-due`:
//!   none of them aborts, nor reports the deleted backup as damaged;
//! - `run-due` killed after claiming an occurrence: the next `run-due` runs it (inside its
//!   window) or reports it missed (outside), and the killed job shows as interrupted.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use jiff::Timestamp;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use vmbackup::schedule::calendar::vm_offset_secs;
use vmbackup_testkit::faults::{repo_violations, vm_violations, FaultRun, Reached};
use vmbackup_testkit::libvirt_vm::{Format, TestVm, TestVmBuilder};

/// The occurrence of the 02:00 UTC slot on `day` for `vm`, plus `minutes`.
fn due(day: &str, vm: &str, minutes: i64) -> String {
    let slot: Timestamp = format!("{day}T02:00:00Z").parse().unwrap();
    Timestamp::from_second(slot.as_second() + vm_offset_secs(vm) + minutes * 60)
        .unwrap()
        .to_string()
}

fn images(vm: &TestVm) -> Vec<String> {
    vm.disk_paths()
        .iter()
        .map(|p| p.display().to_string())
        .collect()
}

/// A daily schedule `name` of `vm` at 02:00 UTC from 2027-01-05, with `extra` options.
fn add_schedule(place: &Place, name: &str, vm: &TestVm, extra: &[&str]) {
    let args = [
        &[
            "schedule",
            "add",
            name,
            "--vm",
            vm.name(),
            "--type",
            "daily",
            "--slot",
            "2",
            "--tz",
            "UTC",
            "--start",
            "2027-01-05",
        ][..],
        extra,
    ]
    .concat();
    let r = vmbackup(place, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// `run-due --now NOW`; its one VM result of schedule `schedule` (`Null` when none).
fn run_due(place: &Place, now: &str) -> Run {
    vmbackup(place, &["run-due", "--now", now])
}

fn results(r: &Run) -> Vec<Value> {
    r.json["run"]["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .flat_map(|j| j["results"].as_array().cloned().unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

/// `vmbackup --json ... ARGS` that stops itself (SIGSTOP) at fail point `point` (`NAME` or
/// `NAME@N`, the Nth time), with its stdout kept; returns once it is stopped there.
#[allow(clippy::zombie_processes)]
fn stopped_at(place: &Place, point: &str, args: &[&str]) -> Child {
    let failpoints = match point.split_once('@') {
        Some((name, n)) => format!("{name}=stop@{n}"),
        None => format!("{point}=stop"),
    };
    let mut child = Command::new(binary())
        .arg("--json")
        .arg("--repo")
        .arg(place.repo())
        .arg("--state-dir")
        .arg(place.state())
        .args(args)
        .env_remove("VMBACKUP_CONFIG")
        .env("VMBACKUP_LOG", "warn")
        .env("VMBACKUP_FAILPOINTS", failpoints)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?} ended ({status}) before {point}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if start.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} never reached {point} within 180 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lets a stopped run go on, and waits for its end: exit code, JSON document, stderr.
fn resume(child: Child) -> (i32, Value, String) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v: Value = vmbackup_testkit::cli::parse_one_document(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout:?}\n{stderr}"));
    (out.status.code().unwrap_or(-1), v, stderr)
}

fn listed(place: &Place) -> Vec<String> {
    let l = vmbackup(place, &["list"]);
    assert_eq!(l.code, 0, "{}", l.stderr);
    ids_of(&l.json)
}

fn ids_of(v: &Value) -> Vec<String> {
    v["backups"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn history(place: &Place) -> Vec<Value> {
    let h = vmbackup(place, &["history", "--all"]);
    assert_eq!(h.code, 0, "{}", h.stderr);
    h.json["jobs"].as_array().unwrap().clone()
}

/// A backup holds its VM and, shared, the repository; gc holds the repository alone. What
/// comes second exits 4 and changes nothing: a second backup of the VM, gc, `recover` of the
/// VM (skipped as busy: the VM stays on the running backup's overlay), a backup during gc.
/// A scheduled occurrence that finds the repository busy is skipped, and the next `run-due`
/// inside its window runs it.
#[test]
fn busy_vms_and_repositories_exit_4_and_a_busy_occurrence_is_run_by_the_next_run_due() {
    let vm = TestVmBuilder::new("cc-busy")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let images = images(&vm);
    let place = Place::new();
    add_schedule(&place, "nightly", &vm, &[]);

    // A backup held in its copy: the VM is on its overlay.
    let first = stopped_at(&place, "backup-copy", &["backup", vm.name()]);
    let b = vmbackup(&place, &["backup", vm.name()]);
    assert_eq!(b.code, 4, "a second backup of the VM: {}", b.stderr);
    let g = vmbackup(&place, &["gc"]);
    assert_eq!(g.code, 4, "gc during a backup: {}", g.stderr);
    let on_overlay = vm.dom().live_xml().unwrap();
    let r = vmbackup(&place, &["recover", vm.name()]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert_eq!(
        r.json["recover"]["busy"],
        serde_json::json!([vm.name()]),
        "{}",
        r.json
    );
    assert!(
        r.json["recover"]["disks"].as_array().unwrap().is_empty(),
        "{}",
        r.json
    );
    assert_eq!(
        vm.dom().live_xml().unwrap(),
        on_overlay,
        "recover left the running backup's VM alone"
    );
    let (code, v, err) = resume(first);
    assert_eq!(code, 0, "the held backup finishes: {v} {err}");
    assert_eq!(vm_violations(&vm, &images), Vec::<String>::new());
    assert_eq!(listed(&place).len(), 1);

    // gc held with the repository locked: a backup, and a scheduled one, are busy.
    let gc = stopped_at(&place, "gc-locked", &["gc"]);
    let b = vmbackup(&place, &["backup", vm.name()]);
    assert_eq!(b.code, 4, "a backup during gc: {}", b.stderr);
    let occurrence = due("2027-01-05", vm.name(), 0);
    let r = run_due(&place, &due("2027-01-05", vm.name(), 1));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let res = results(&r);
    assert_eq!(res.len(), 1, "{}", r.json);
    assert_eq!(res[0]["status"], "skipped", "{}", r.json);
    assert_eq!(res[0]["due"], occurrence.as_str());
    let (code, v, err) = resume(gc);
    assert_eq!(code, 0, "{v} {err}");
    // The next run-due, minutes later and inside the window, runs the occurrence.
    let r = run_due(&place, &due("2027-01-05", vm.name(), 3));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let res = results(&r);
    assert_eq!(res.len(), 1, "{}", r.json);
    assert_eq!(res[0]["status"], "ok", "{}", r.json);
    assert_eq!(res[0]["due"], occurrence.as_str());
    // Once only.
    let r = run_due(&place, &due("2027-01-05", vm.name(), 4));
    assert!(results(&r).is_empty(), "{}", r.json);
    let jobs: Vec<String> = history(&place)
        .iter()
        .filter(|j| j["schedule"] == "nightly")
        .map(|j| format!("{} {}", j["due"].as_str().unwrap_or(""), j["status"]))
        .collect();
    assert_eq!(
        jobs,
        [
            format!("{occurrence} \"skipped\""),
            format!("{occurrence} \"ok\"")
        ]
    );
    assert_eq!(vm_violations(&vm, &images), Vec::<String>::new());
    let (ids, bad) = repo_violations(binary(), &place);
    assert_eq!(bad, Vec::<String>::new());
    assert_eq!(ids.len(), 2);
}

/// `delete` and `prune` take no lock: a backup deleted while `list`, `verify`, `gc` or the
/// retention pass of `run-due` looks at the repository is gone for them, never an abort nor
/// a damaged backup.
#[test]
fn delete_and_prune_during_list_verify_gc_and_run_due_abort_nothing() {
    // Shut off: its backups need no snapshot, and are quick.
    let vm = TestVmBuilder::new("cc-prune")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .define()
        .expect("VM defined");
    let place = Place::new();
    add_schedule(&place, "daily", &vm, &["--keep", "3"]);
    for day in ["2027-01-05", "2027-01-06", "2027-01-07"] {
        let r = run_due(&place, &due(day, vm.name(), 1));
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(results(&r)[0]["status"], "ok", "{}", r.json);
    }
    backup_id(&place, &[vm.name()]);
    backup_id(&place, &[vm.name()]);
    let all = listed(&place);
    assert_eq!(all.len(), 5);

    // list: a backup deleted between the listing of names and the reading of manifests.
    let list = stopped_at(&place, "list-listed", &["list"]);
    let d = vmbackup(&place, &["delete", &all[3]]);
    assert_eq!(d.code, 0, "{}", d.stderr);
    let (code, v, err) = resume(list);
    assert_eq!(code, 0, "list: {err}");
    let ids = ids_of(&v);
    assert!(!ids.contains(&all[3]), "{ids:?}");
    assert_eq!(ids.len(), 4, "{ids:?}");

    // verify: the backup it is verifying is deleted under it.
    let verify = stopped_at(&place, "verify-loaded@1", &["verify"]);
    let d = vmbackup(&place, &["delete", &all[0]]);
    assert_eq!(d.code, 0, "{}", d.stderr);
    let (code, v, err) = resume(verify);
    assert_eq!(code, 0, "verify reports no damage: {v} {err}");
    let verified: Vec<&str> = v["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(verified, [&all[1], &all[2], &all[4]], "{v}");

    // gc: a prune deletes a backup it has listed.
    let edit = vmbackup(&place, &["schedule", "edit", "daily", "--keep", "1"]);
    assert_eq!(edit.code, 0, "{}", edit.stderr);
    let gc = stopped_at(&place, "gc-listed", &["gc"]);
    let p = vmbackup(&place, &["prune"]);
    assert_eq!(p.code, 0, "prune during gc: {}", p.stderr);
    assert_eq!(listed(&place), [all[2].clone(), all[4].clone()]);
    let (code, v, err) = resume(gc);
    assert_eq!(code, 0, "gc: {v} {err}");

    // run-due's retention pass: what it planned to delete is deleted by someone else first.
    let rd = stopped_at(
        &place,
        "prune-planned",
        &["run-due", "--now", &due("2027-01-08", vm.name(), 1)],
    );
    let d = vmbackup(&place, &["delete", &all[2]]);
    assert_eq!(d.code, 0, "{}", d.stderr);
    let (code, v, err) = resume(rd);
    assert_eq!(code, 0, "run-due: {v} {err}");
    let res = &v["run"]["jobs"][0]["results"][0];
    assert_eq!(res["status"], "ok", "{v}");
    assert_eq!(res["prune_errors"], serde_json::json!([]), "{v}");
    let now = listed(&place);
    assert_eq!(now.len(), 2, "{now:?}");
    assert_eq!(now[0], all[4]);

    let (_, bad) = repo_violations(binary(), &place);
    assert_eq!(bad, Vec::<String>::new());
}

/// A `run-due` killed right after it claimed an occurrence: the occurrence is not lost. The
/// next `run-due` inside the window runs it; one after the window reports it missed. The
/// killed job shows as interrupted.
#[test]
fn an_occurrence_claimed_by_a_killed_run_due_is_retried_or_reported_missed() {
    let vm = TestVmBuilder::new("cc-claim")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .define()
        .expect("VM defined");
    let place = Place::new();
    add_schedule(&place, "nightly", &vm, &[]);
    let kill_after_claim = |now: &str| {
        let mut run = FaultRun::start(
            binary(),
            &place,
            &["run-due", "--now", now],
            "run-due-claimed=kill",
            &[],
        );
        assert_eq!(
            run.wait_marker(Duration::from_secs(120)),
            Reached::Point("run-due-claimed".into()),
            "{}",
            run.stderr()
        );
        run.kill_group();
    };

    // Inside the window: retried.
    let d1 = due("2027-01-05", vm.name(), 0);
    kill_after_claim(&due("2027-01-05", vm.name(), 1));
    let h = history(&place);
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0]["status"], "interrupted", "{h:?}");
    let r = run_due(&place, &due("2027-01-05", vm.name(), 2));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let res = results(&r);
    assert_eq!(res.len(), 1, "{}", r.json);
    assert_eq!(
        (res[0]["due"].as_str(), res[0]["status"].as_str()),
        (Some(d1.as_str()), Some("ok")),
        "{}",
        r.json
    );
    let h = history(&place);
    assert_eq!(h[0]["status"], "interrupted", "{h:?}");
    assert!(
        h[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("took the occurrence over")),
        "{h:?}"
    );
    assert_eq!(h[1]["status"], "ok", "{h:?}");

    // Killed again the next day, and no run-due before the day after: reported missed.
    let d2 = due("2027-01-06", vm.name(), 0);
    kill_after_claim(&due("2027-01-06", vm.name(), 1));
    let r = run_due(&place, &due("2027-01-07", vm.name(), 1));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let res: Vec<(String, String)> = results(&r)
        .iter()
        .map(|x| {
            (
                x["due"].as_str().unwrap().to_string(),
                x["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        res,
        [
            (d2.clone(), "missed".to_string()),
            (due("2027-01-07", vm.name(), 0), "ok".to_string())
        ],
        "{}",
        r.json
    );
    // Nothing left over: a later run-due has nothing to do for those days.
    let r = run_due(&place, &due("2027-01-07", vm.name(), 5));
    assert!(results(&r).is_empty(), "{}", r.json);
    let h = history(&place);
    let statuses: Vec<&str> = h.iter().map(|j| j["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses,
        ["interrupted", "ok", "interrupted", "missed", "ok"],
        "{h:?}"
    );
    assert_eq!(listed(&place).len(), 2);
    let (_, bad) = repo_violations(binary(), &place);
    assert_eq!(bad, Vec::<String>::new());
}
