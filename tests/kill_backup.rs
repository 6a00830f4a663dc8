//! Issue 13, "Kill (SIGKILL)", libvirt: a backup killed (its whole process group) at every
//! phase of its pipeline, then finished once by `recover` and once by the next `backup`.
//!
//! Each table of cases runs in a loop on ONE long-lived two-disk VM (cases are sequential:
//! each leaves the VM as a finished backup does, which the case checks before the next). After
//! every kill, before the finishing command, the guest writes a file: it must be on its disk
//! afterwards. The invariants of issue 13 are checked after every finishing command: exit 0;
//! `vm_violations` empty (live and inactive XML on the images, no block job, no overlay file,
//! guest thawed); the guest's write read back from the disk; no new backup listed (or the
//! killed run's, complete, when it had published before the kill, plus the finishing
//! backup's); `repo_violations` empty (list, verify, gc, no temporary, no backup folder
//! without a manifest).

mod common;

use std::time::{Duration, Instant};

use common::*;
use vmbackup_testkit::faults::{brief, repo_violations, vm_violations, FaultRun, Reached};
use vmbackup_testkit::libvirt_vm::{Format, TestVm, TestVmBuilder};

/// What finishes the killed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    Recover,
    Backup,
}

/// Where the run is killed.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// At this fail point's marker (a `kill` action in the case's list).
    At(&'static str),
    /// `after` once the run logged that it reached fail point `point` (a `sleep` action in
    /// the case's list), that is while the call that follows the point is in flight.
    After {
        point: &'static str,
        after: Duration,
    },
}

/// What the killed run left published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Published {
    /// Nothing: the killed run's backup is never listed.
    Nothing,
    /// Its backup (the run was killed in its commit back, after publishing).
    Its,
}

struct Case {
    name: &'static str,
    /// `VMBACKUP_FAILPOINTS` of the killed run.
    failpoints: &'static str,
    kill: Kill,
    published: Published,
    /// The phase `recover` reports for the killed run (`None`: it had no journal entry yet).
    phase: Option<&'static str>,
    /// Seconds the guest's fsfreeze hook holds the freeze (`vmbackup.freezehook`).
    freeze_delay: Option<u32>,
}

const fn at(
    name: &'static str,
    failpoints: &'static str,
    point: &'static str,
    published: Published,
    phase: Option<&'static str>,
) -> Case {
    Case {
        name,
        failpoints,
        kill: Kill::At(point),
        published,
        phase,
        freeze_delay: None,
    }
}

/// Before the commit back: the lock, pre-flight, the snapshot, the copy, the publish.
const BEFORE_COMMIT: &[Case] = &[
    at(
        "after the lock, before pre-flight",
        "backup-locked=kill",
        "backup-locked",
        Published::Nothing,
        None,
    ),
    at(
        "after the overlay files, before the snapshot",
        "backup-overlays-created=kill",
        "backup-overlays-created",
        Published::Nothing,
        Some("preflight"),
    ),
    Case {
        name: "while the quiesced snapshot call is in flight",
        failpoints: "backup-snapshot=sleep(200)",
        kill: Kill::After {
            point: "backup-snapshot",
            after: Duration::from_millis(1500),
        },
        published: Published::Nothing,
        phase: Some("snapshot"),
        freeze_delay: Some(4),
    },
    at(
        "after the snapshot, before the copy",
        "backup-snapshot-done=kill",
        "backup-snapshot-done",
        Published::Nothing,
        Some("snapshot"),
    ),
    at(
        "in the copy, chunks not yet synced",
        "backup-chunk-written=kill@1",
        "backup-chunk-written",
        Published::Nothing,
        Some("copy"),
    ),
    at(
        "between two disks",
        "backup-between-disks=kill@1",
        "backup-between-disks",
        Published::Nothing,
        Some("copy"),
    ),
    at(
        "after the domain XML, before the manifest rename",
        "backup-before-manifest-rename=kill",
        "backup-before-manifest-rename",
        Published::Nothing,
        Some("publish"),
    ),
];

/// In the commit back, after the backup was published.
const IN_COMMIT: &[Case] = &[
    at(
        "in the commit while the job runs",
        "commit-started=kill@1",
        "commit-started",
        Published::Its,
        Some("commit"),
    ),
    at(
        "in the commit, ready but not pivoted",
        "commit-ready=kill@1",
        "commit-ready",
        Published::Its,
        Some("commit"),
    ),
    at(
        "after the pivot of disk 1, before disk 2",
        "commit-pivoted=kill@1",
        "commit-pivoted",
        Published::Its,
        Some("commit"),
    ),
    at(
        "before the inactive XML fix",
        "commit-before-inactive-xml=kill",
        "commit-before-inactive-xml",
        Published::Its,
        Some("commit"),
    ),
    at(
        "before the overlay unlink",
        "commit-before-overlay-unlink=kill",
        "commit-before-overlay-unlink",
        Published::Its,
        Some("cleanup"),
    ),
];

fn kill_vm(hint: &str) -> TestVm {
    TestVmBuilder::new(hint)
        .cmdline("vmbackup.freezehook")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .disk("vdc", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots")
}

fn listed(place: &Place) -> Vec<String> {
    let l = vmbackup(place, &["list"]);
    assert_eq!(l.code, 0, "list: {}", l.stderr);
    l.json["backups"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["id"].as_str().map(str::to_string))
        .collect()
}

/// Waits until the run's log names fail point `point` (its `sleep` action logs it).
fn wait_logged(run: &mut FaultRun, point: &str, what: &str) {
    let start = Instant::now();
    let needle = format!("point=\"{point}\"");
    loop {
        let log = run.stderr();
        if log.contains(&needle) || log.contains(&format!("point={point} ")) {
            return;
        }
        if let Ok(Some(st)) = run.child.try_wait() {
            panic!("{what}: the run ended ({st}) before {point}:\n{log}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{what}: {point} not reached within 180 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs every case of `cases` twice on `vm` (finished by `recover`, then by `backup`),
/// checking the invariants after each.
fn run_table(vm: &TestVm, cases: &[Case]) {
    let images: Vec<String> = vm
        .disk_paths()
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let place = Place::new();
    // A first backup: the killed runs are incremental ones, as in real life.
    let first = vmbackup(&place, &["backup", vm.name(), "--quiesce", "required"]);
    assert_eq!(first.code, 0, "first backup: {}", first.stderr);
    let total = Instant::now();
    for (n, case) in cases.iter().enumerate() {
        for finish in [Finish::Recover, Finish::Backup] {
            let what = format!("case {:?} finished by {finish:?}", case.name);
            let t = Instant::now();
            one_case(
                vm,
                &images,
                &place,
                case,
                finish,
                &format!("k{n}{finish:?}"),
                &what,
            );
            eprintln!("--- {what}: ok in {:.1?}", t.elapsed());
        }
    }
    eprintln!("--- {} cases in {:.1?}", cases.len() * 2, total.elapsed());
}

fn one_case(
    vm: &TestVm,
    images: &[String],
    place: &Place,
    case: &Case,
    finish: Finish,
    tag: &str,
    what: &str,
) {
    let before = listed(place);
    // New data on both disks: the run has chunks to write on each.
    vm.sh(
        "for d in vdb vdc; do dd if=/dev/urandom of=/mnt/$d/fresh bs=64k count=8 2>/dev/null; done; sync",
    )
    .unwrap_or_else(|e| panic!("{what}: guest write before the run: {e}"));
    if let Some(s) = case.freeze_delay {
        vm.sh(&format!("echo {s} > /run/vmb-freeze-delay")).unwrap();
    }
    let mut run = FaultRun::start(
        binary(),
        place,
        &[
            "--freeze-timeout",
            "20",
            "backup",
            vm.name(),
            "--quiesce",
            "required",
        ],
        case.failpoints,
        &[],
    );
    match case.kill {
        Kill::At(point) => {
            let reached = run.wait_marker(Duration::from_secs(180));
            assert_eq!(
                reached,
                Reached::Point(point.to_string()),
                "{what}: stderr:\n{}",
                run.stderr()
            );
        }
        Kill::After { point, after } => {
            wait_logged(&mut run, point, what);
            std::thread::sleep(after);
            assert!(
                run.child.try_wait().ok().flatten().is_none(),
                "{what}: the run ended before the kill:\n{}",
                run.stderr()
            );
        }
    }
    run.kill_group();
    let killed_log = run.stderr();
    if case.freeze_delay.is_some() {
        // Through the agent, which refuses it while the guest is frozen (the snapshot the
        // killed run asked for may be under way in libvirtd): retried until thawed.
        let start = Instant::now();
        while let Err(e) = vm.sh("rm -f /run/vmb-freeze-delay") {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{what}: the guest stays frozen: {e}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    // Invisible: a run killed before its manifest was written lists nothing.
    let mid = listed(place);
    let its: Vec<&String> = mid.iter().filter(|id| !before.contains(id)).collect();
    match case.published {
        Published::Nothing => assert!(its.is_empty(), "{what}: listed after the kill: {its:?}"),
        Published::Its => assert_eq!(its.len(), 1, "{what}: listed after the kill: {its:?}"),
    }

    // The guest writes in the window between the kill and the finishing command.
    let file = format!("/mnt/vdb/window-{tag}");
    vm.write_file(&file, tag.as_bytes())
        .unwrap_or_else(|e| panic!("{what}: guest write after the kill: {e}"));

    let r = match finish {
        Finish::Recover => vmbackup(place, &["recover", vm.name()]),
        Finish::Backup => vmbackup(place, &["backup", vm.name(), "--quiesce", "required"]),
    };
    assert_eq!(
        r.code,
        0,
        "{what}: {}\n{}\nkilled run's log:\n{killed_log}",
        brief(&r.json),
        r.stderr
    );
    if finish == Finish::Recover {
        let phases: Vec<&str> = r.json["recover"]["interrupted"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["phase"].as_str())
            .collect();
        assert_eq!(
            phases,
            case.phase.into_iter().collect::<Vec<_>>(),
            "{what}: the interrupted run's phase: {}",
            brief(&r.json)
        );
    }

    let bad = vm_violations(vm, images);
    assert!(
        bad.is_empty(),
        "{what}: {bad:?}\nfinishing run:\n{}\nkilled run's log:\n{killed_log}",
        r.stderr
    );
    // On the disk, not only in the guest's page cache.
    let back = vm
        .sh(&format!(
            "sync; echo 3 > /proc/sys/vm/drop_caches; cat {file}"
        ))
        .unwrap_or_else(|e| panic!("{what}: read back: {e}"));
    assert_eq!(back, tag, "{what}: the guest's write of the window");

    let (ids, bad) = repo_violations(binary(), place);
    assert!(bad.is_empty(), "{what}: repository: {bad:?}");
    let new = ids.iter().filter(|id| !before.contains(id)).count();
    let expected =
        usize::from(case.published == Published::Its) + usize::from(finish == Finish::Backup);
    assert_eq!(new, expected, "{what}: new backups listed: {ids:?}");
}

#[test]
fn a_backup_killed_before_its_commit_is_finished_by_recover_and_by_the_next_backup() {
    let vm = kill_vm("kill-pre");
    run_table(&vm, BEFORE_COMMIT);
}

#[test]
fn a_backup_killed_in_its_commit_is_finished_by_recover_and_by_the_next_backup() {
    let vm = kill_vm("kill-commit");
    run_table(&vm, IN_COMMIT);
}
