//! `run-due`: every schedule occurrence that is due runs once, then retention, then reports.
//!
//! For each enabled schedule and each of its VMs, the occurrences since the schedule was created
//! (at most `LOOKBACK_DAYS` back) up to `now` that no earlier run claimed are:
//! - run, for the latest one whose start is at most the catch-up window old;
//! - recorded as `missed`, for older ones (the host was down, or the timer did not fire);
//!   several occurrences missed inside the window run once, the older ones recorded as missed.
//!
//! An occurrence is claimed in the state database right before it runs, together with its
//! job row (one transaction), so two `run-due` started at the same moment share the work and
//! never run one occurrence twice. A claim whose process is gone before its job ended (a
//! `run-due` killed, the host down) is taken over by the next `run-due`: the occurrence runs
//! then if it is still inside its window, and is recorded as missed otherwise; the killed job
//! shows as `interrupted`. A VM or repository that is busy (the VM's previous job, a restore,
//! a gc) makes the occurrence `skipped` and gives its claim back: the next `run-due` inside the
//! window runs it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;

use super::report::{JobReport, VmResult};
use super::retention::{self, Kept};
use super::{BootTestRule, Spec};
use crate::backup;
use crate::boot_test;
use crate::config::Config;
use crate::error::{chain, Error, Result};
use crate::hypervisor::open::Hypervisors;
use crate::repository::{BootTestRecord, Repository};
use crate::settings::Quiesce;
use crate::state::{fmt_ms, NewJob, State};
use crate::vm_ref::VmRef;

/// Oldest occurrence `run-due` looks at (missed ones older than this are not recorded).
pub const LOOKBACK_DAYS: i64 = 35;

/// What one `run-due` did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct RunDue {
    pub now: String,
    pub dry_run: bool,
    /// Runs of earlier backups that were interrupted (killed, the host went down) and that
    /// this `run-due` finished first: `<vm>: backup <id>, interrupted in its <phase> phase`.
    pub recovered: Vec<String>,
    /// Interrupted runs it could not finish (they are tried again next time).
    pub recover_errors: Vec<String>,
    pub jobs: Vec<JobReport>,
    pub report_errors: Vec<String>,
}

impl RunDue {
    pub fn failed(&self) -> usize {
        self.jobs.iter().map(|j| j.count("failed")).sum()
    }
    pub fn succeeded(&self) -> usize {
        self.jobs.iter().map(|j| j.count("ok")).sum()
    }
    /// Boot tests that ran and failed (their backups count as succeeded).
    pub fn boot_tests_failed(&self) -> usize {
        self.jobs.iter().map(JobReport::boot_tests_failed).sum()
    }
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct Options {
    pub now: Timestamp,
    pub catch_up: Duration,
    pub dry_run: bool,
}

/// What one schedule has to do now, per VM.
struct Plan {
    missed: Vec<(VmRef, i64, String)>,
    run: Vec<(VmRef, i64)>,
}

fn plan(state: &State, spec: &Spec, created_ms: i64, o: &Options) -> Result<Plan> {
    let now_ms = o.now.as_millisecond();
    let lower = created_ms.max(now_ms - LOOKBACK_DAYS * 86_400_000);
    let from = Timestamp::from_millisecond(lower).unwrap_or(Timestamp::MIN);
    let window_ms = o.catch_up.as_millis() as i64;
    let mut p = Plan {
        missed: Vec::new(),
        run: Vec::new(),
    };
    for vm in &spec.vms {
        let mut pending = Vec::new();
        for occ in spec.occurrences(&vm.to_string(), from, o.now) {
            let due = occ.at.as_millisecond();
            if !state.is_settled(&spec.name, &vm.to_string(), due)? {
                pending.push(due);
            }
        }
        let latest_in_window = pending
            .iter()
            .copied()
            .filter(|d| now_ms - d <= window_ms)
            .max();
        for due in pending {
            match latest_in_window {
                Some(l) if l == due => p.run.push((vm.clone(), due)),
                Some(l) if due > now_ms - window_ms => p.missed.push((
                    vm.clone(),
                    due,
                    format!("superseded by the occurrence due {}", fmt_ms(l)),
                )),
                _ => p.missed.push((
                    vm.clone(),
                    due,
                    format!(
                        "not run within the catch-up window of {} min",
                        o.catch_up.as_secs() / 60
                    ),
                )),
            }
        }
    }
    Ok(p)
}

fn empty_result(vm: &VmRef, due: i64, status: &str) -> VmResult {
    VmResult {
        due: Some(fmt_ms(due)),
        ..VmResult::new(&vm.to_string(), status)
    }
}

fn quiesce_of(spec: &Spec) -> Quiesce {
    Quiesce::parse(&spec.quiesce).unwrap_or(Quiesce::Preferred)
}

/// Finishes the runs the journal records as never ended (a backup killed, or the host down,
/// part-way), so that no VM is left on an overlay or frozen until its next occurrence, which
/// may be weeks away. A VM whose run is still alive (its lock is held) is left alone. The
/// journal query is all it costs when nothing was interrupted.
fn finish_interrupted(
    cfg: &Config,
    state: &State,
    hv: &Hypervisors,
    out: &mut RunDue,
) -> Result<()> {
    for text in state.vms_with_runs()? {
        let vm = match text.parse::<VmRef>() {
            Ok(v) => v,
            Err(e) => {
                out.recover_errors.push(format!("{text}: {e}"));
                continue;
            }
        };
        let _lock = match crate::locks::lock_vm(&cfg.state_dir, &vm) {
            Ok(l) => l,
            Err(crate::locks::LockError::Busy { .. }) => continue,
            Err(e) => {
                out.recover_errors.push(format!("{vm}: {e}"));
                continue;
            }
        };
        match hv.with_vm(&vm, |h| {
            crate::recover::recover_locked(h, state, &cfg.backup)
        }) {
            Ok(r) => {
                for i in r.interrupted {
                    tracing::warn!(vm = %vm, id = %i.backup_id, phase = %i.phase, "finished an interrupted backup");
                    out.recovered.push(format!(
                        "{vm}: backup {}, interrupted in its {} phase",
                        i.backup_id, i.phase
                    ));
                }
            }
            Err(e) => {
                tracing::error!(vm = %vm, "cannot finish an interrupted backup: {}", chain(&e));
                out.recover_errors.push(format!("{vm}: {}", chain(&e)));
            }
        }
    }
    Ok(())
}

/// Runs every due occurrence. `progress` as for a backup.
pub fn run_due(
    cfg: &Config,
    o: &Options,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<RunDue> {
    let state = State::open(&cfg.state_dir)?;
    let mut out = RunDue {
        now: o.now.to_string(),
        dry_run: o.dry_run,
        recovered: Vec::new(),
        recover_errors: Vec::new(),
        jobs: Vec::new(),
        report_errors: Vec::new(),
    };
    // Connected on first need: a minute with nothing due touches neither libvirt nor the
    // repository.
    let hv = Hypervisors::new(&cfg.connect, &cfg.qemu_dir);
    if !o.dry_run {
        finish_interrupted(cfg, &state, &hv, &mut out)?;
    }
    // Shared: a boot test serves the backup from it on its own threads.
    let mut repo: Option<Arc<Repository>> = None;
    for (spec, created_ms) in state.schedules()? {
        if !spec.enabled {
            continue;
        }
        let p = plan(&state, &spec, created_ms, o)?;
        if p.missed.is_empty() && p.run.is_empty() {
            continue;
        }
        let mut job = JobReport {
            schedule: spec.name.clone(),
            recurrence: spec.recurrence.describe(),
            slot: spec.slot_label(),
            run_at: o.now.to_string(),
            results: Vec::new(),
        };
        for (vm, due, why) in &p.missed {
            if o.dry_run {
                job.results.push(empty_result(vm, *due, "missed"));
                continue;
            }
            let vm_text = vm.to_string();
            let j = NewJob {
                kind: "backup",
                vm: Some(&vm_text),
                schedule: Some(&spec.name),
                due_ms: Some(*due),
            };
            if let Some(job_id) = state.claim_job(&j)? {
                tracing::warn!(schedule = %spec.name, vm = %vm, due = %fmt_ms(*due), "missed: {why}");
                state.finish_job(job_id, "missed", None, Some(why), None)?;
                let mut r = empty_result(vm, *due, "missed");
                r.error = Some(why.clone());
                job.results.push(r);
            }
        }
        for (vm, due) in &p.run {
            if o.dry_run {
                job.results.push(empty_result(vm, *due, "due"));
                continue;
            }
            // Opened before the claim: a repository that cannot be opened fails this run-due
            // with nothing claimed, so the next one tries the occurrence again.
            if repo.is_none() {
                repo = Some(Arc::new(crate::unlock::open_repo(cfg)?));
            }
            let repo = repo.as_ref().expect("opened above");
            let vm_text = vm.to_string();
            let j = NewJob {
                kind: "backup",
                vm: Some(&vm_text),
                schedule: Some(&spec.name),
                due_ms: Some(*due),
            };
            let Some(job_id) = state.claim_job(&j)? else {
                continue; // another run-due has it
            };
            crate::fault::point("run-due-claimed");
            let r = run_one(
                cfg,
                &state,
                &hv,
                repo,
                &spec,
                vm,
                (*due, job_id),
                o,
                progress,
            )?;
            job.results.push(r);
            if crate::interrupt::requested() {
                break;
            }
        }
        if !job.results.is_empty() {
            out.jobs.push(job);
        }
        if crate::interrupt::requested() {
            break;
        }
    }
    if !o.dry_run {
        for job in &out.jobs {
            let report = crate::notify::Report::scheduled(job);
            if let Err(e) = crate::notify::send(&cfg.report, &report) {
                tracing::error!(schedule = %job.schedule, "report not sent: {}", chain(&e));
                out.report_errors
                    .push(format!("{}: {}", job.schedule, chain(&e)));
            }
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    cfg: &Config,
    state: &State,
    hv: &Hypervisors,
    repo: &Arc<Repository>,
    spec: &Spec,
    vm: &VmRef,
    (due, job_id): (i64, i64),
    o: &Options,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<VmResult> {
    let vm_text = vm.to_string();
    let j = NewJob {
        kind: "backup",
        vm: Some(&vm_text),
        schedule: Some(&spec.name),
        due_ms: Some(due),
    };
    let mut opts = cfg.backup.clone();
    opts.quiesce = quiesce_of(spec);
    opts.schedule = Some(spec.name.clone());
    opts.scheduled_for = Some(fmt_ms(due));
    let started = Timestamp::now();
    tracing::info!(schedule = %spec.name, vm = %vm, due = %fmt_ms(due), "scheduled backup");
    let result = hv.with_vm(vm, |h| {
        backup::backup(h, repo, &cfg.state_dir, state, &opts, progress)
    });
    let mut r = empty_result(vm, due, "ok");
    r.started = Some(started.to_string());
    match result {
        Ok(b) => {
            state.finish_job(job_id, "ok", Some(&b.id), None, None)?;
            r.backup_id = Some(b.id.clone());
            r.consistency = Some(b.consistency.clone());
            r.freeze_ms = b.freeze_ms;
            r.stored_bytes = Some(b.stored_bytes);
            r.ended = Some(Timestamp::now().to_string());
            if let Some(rule) = &spec.boot_test {
                r.boot_test = boot_test_after(cfg, state, repo, spec, vm, &b.id, rule)?;
            }
            let failed_boot = r.boot_test.as_ref().is_some_and(|t| t.error.is_some());
            if failed_boot && spec.retention.is_some() {
                // The older backups may be the last ones that boot: none is deleted for one
                // that does not.
                let msg = format!(
                    "retention not applied: backup {} failed its boot test, so no older backup \
                     is deleted",
                    b.id
                );
                tracing::warn!(schedule = %spec.name, vm = %vm, "{msg}");
                r.prune_errors.push(msg);
            } else if let Some(rule) = spec.retention {
                // A retention pass that fails is reported with this result; it never stops
                // the run-due (the other schedules, the reports).
                match prune(state, repo, &spec.name, vm, rule, o.now, false) {
                    Ok(p) => {
                        r.pruned = p.deleted;
                        r.prune_errors = p.errors;
                    }
                    Err(e) => {
                        let msg = format!("retention not applied: {}", chain(&e));
                        tracing::error!(schedule = %spec.name, vm = %vm, "{msg}");
                        r.prune_errors.push(msg);
                    }
                }
            }
        }
        Err(e) if e.is_busy() => {
            let msg = format!(
                "skipped: busy ({}); the next run-due inside the catch-up window runs it",
                chain(&e)
            );
            tracing::warn!(schedule = %spec.name, vm = %vm, "{msg}");
            state.release_claim(job_id, &j, "skipped", &msg)?;
            r.status = "skipped".into();
            r.error = Some(msg);
            r.ended = Some(Timestamp::now().to_string());
        }
        Err(e) => {
            let msg = chain(&e);
            tracing::error!(schedule = %spec.name, vm = %vm, "scheduled backup failed: {msg}");
            state.finish_job(job_id, "failed", None, Some(&msg), None)?;
            r.status = "failed".into();
            r.error = Some(msg);
            r.ended = Some(Timestamp::now().to_string());
        }
    }
    Ok(r)
}

/// Boot-tests backup `id` of `vm` when `rule` says it is time (its `every`-th successful
/// backup since the last boot test): kept with the backup and recorded as a `boot-test` job.
/// A boot test that cannot start (the VM has no agent channel, say) is a failed boot test;
/// only an interruption is an error.
fn boot_test_after(
    cfg: &Config,
    state: &State,
    repo: &Arc<Repository>,
    spec: &Spec,
    vm: &VmRef,
    id: &str,
    rule: &BootTestRule,
) -> Result<Option<BootTestRecord>> {
    let vm_text = vm.to_string();
    let since = state.backups_since_boot_test(&spec.name, &vm_text)?;
    if since < rule.every {
        tracing::info!(schedule = %spec.name, vm = %vm, "boot test: {since} of every {} backups made", rule.every);
        return Ok(None);
    }
    let job = state.start_job(&NewJob {
        kind: "boot-test",
        vm: Some(&vm_text),
        schedule: Some(&spec.name),
        due_ms: None,
    })?;
    tracing::info!(schedule = %spec.name, vm = %vm, id, "boot test");
    let opts = boot_test::Options {
        id: id.to_string(),
        timeout: Duration::from_secs(rule.timeout_secs),
        command: rule.command.clone(),
        connect: cfg.connect.clone(),
        screenshot: None,
    };
    let at = || {
        Timestamp::now()
            .round(jiff::Unit::Second)
            .unwrap_or(Timestamp::now())
            .to_string()
    };
    let record = match boot_test::boot_test(repo.clone(), &opts) {
        Ok(t) => t.record(at()),
        Err(Error::Interrupted) => {
            state.finish_job(job, "interrupted", Some(id), Some("interrupted"), None)?;
            return Err(Error::Interrupted);
        }
        Err(e) => BootTestRecord {
            at: at(),
            booted: false,
            seconds_to_agent: None,
            command: rule.command.clone(),
            command_exit_code: None,
            error: Some(chain(&e)),
        },
    };
    if let Err(e) = repo.put_boot_test(id, &record) {
        tracing::warn!(
            id,
            "the boot test was not recorded with the backup: {}",
            chain(&e)
        );
    }
    match &record.error {
        None => {
            tracing::info!(schedule = %spec.name, vm = %vm, id, "boot test passed");
            state.finish_job(job, "ok", Some(id), None, None)?;
        }
        Some(e) => {
            tracing::error!(schedule = %spec.name, vm = %vm, id, "boot test failed: {e}");
            state.finish_job(job, "failed", Some(id), Some(e), None)?;
        }
    }
    Ok(Some(record))
}

/// What a retention pass removed, and what it could not.
#[derive(Debug, Clone, Default, Serialize, schemars::JsonSchema)]
pub struct Pruned {
    pub deleted: Vec<String>,
    pub errors: Vec<String>,
}

/// Applies `rule` to schedule `schedule`'s backups of `vm`, at time `now`. Every deletion is
/// tried; the errors are collected. Recorded as one `prune` job when it deletes or fails.
pub fn prune(
    state: &State,
    repo: &Repository,
    schedule: &str,
    vm: &VmRef,
    rule: retention::Retention,
    now: Timestamp,
    dry_run: bool,
) -> Result<Pruned> {
    let scope = PruneScope {
        vm: vm.to_string(),
        schedule: Some(schedule),
        note: None,
    };
    prune_where(
        state,
        repo,
        &scope,
        &[rule],
        &|m| m.schedule.as_deref() == Some(schedule) && vm.is(&m.vm_name),
        now,
        dry_run,
    )
}

/// What a prune works on, for its log lines and its job.
pub struct PruneScope<'a> {
    /// The VM, as the job records it.
    pub vm: String,
    pub schedule: Option<&'a str>,
    /// Added to the job's detail (e.g. `tag nightly`).
    pub note: Option<String>,
}

/// Applies `rules` (a backup goes when every rule lets it go; pinned backups never go) to the
/// backups `select` picks, as one VM's, at time `now`. Every deletion is tried; the errors are
/// collected. Recorded as one `prune` job when it deletes or fails.
pub fn prune_where(
    state: &State,
    repo: &Repository,
    scope: &PruneScope,
    rules: &[retention::Retention],
    select: &dyn Fn(&crate::repository::manifest::Manifest) -> bool,
    now: Timestamp,
    dry_run: bool,
) -> Result<Pruned> {
    let pinned = state.pinned()?;
    let kept: Vec<Kept> = repo
        .list()?
        .into_iter()
        .filter(|m| select(m))
        .filter_map(|m| {
            let when = m.scheduled_for.as_deref().unwrap_or(&m.started_at);
            let time = when.parse::<Timestamp>().ok()?;
            Some(Kept {
                pinned: pinned.contains(&m.id),
                id: m.id,
                time,
            })
        })
        .collect();
    let doomed = retention::to_delete_all(&kept, rules, now);
    let mut out = Pruned::default();
    if doomed.is_empty() {
        return Ok(out);
    }
    if dry_run {
        // What would go, nothing deleted and no job recorded.
        out.deleted = doomed;
        return Ok(out);
    }
    crate::fault::point("prune-planned");
    let schedule = scope.schedule.unwrap_or("-");
    let vm = &scope.vm;
    let job = state.start_job(&NewJob {
        kind: "prune",
        vm: Some(vm),
        schedule: scope.schedule,
        due_ms: None,
    })?;
    for id in doomed {
        match repo.delete(&id) {
            Ok(()) => {
                tracing::info!(schedule, vm = %vm, id = %id, "retention: deleted");
                out.deleted.push(id);
            }
            // Deleted meanwhile by another process (a `delete`, another prune): gone, as
            // the rule wants.
            Err(crate::repository::RepoError::NotFound(_)) => {
                tracing::info!(schedule, vm = %vm, id = %id, "retention: deleted by another process");
            }
            Err(e) => {
                let msg = format!("{id}: {}", chain(&e));
                tracing::error!(schedule, vm = %vm, "retention: cannot delete {msg}");
                out.errors.push(msg);
            }
        }
    }
    let rules_text: Vec<String> = rules.iter().map(|r| r.describe()).collect();
    let detail = format!(
        "{}{}; deleted: {}",
        rules_text.join(" and "),
        scope
            .note
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default(),
        out.deleted.join(", ")
    );
    let err = (!out.errors.is_empty()).then(|| out.errors.join("; "));
    state.finish_job(
        job,
        if out.errors.is_empty() {
            "ok"
        } else {
            "failed"
        },
        None,
        err.as_deref(),
        Some(&detail),
    )?;
    Ok(out)
}

/// `prune`: every schedule's retention over its VMs, at time `now`; with `dry_run`, what it
/// would delete.
pub fn prune_all(
    state_dir: &Path,
    repo: &Repository,
    now: Timestamp,
    dry_run: bool,
) -> Result<Vec<(String, Pruned)>> {
    let state = State::open(state_dir)?;
    let mut all = Vec::new();
    for (spec, _) in state.schedules()? {
        let Some(rule) = spec.retention else { continue };
        for vm in &spec.vms {
            let p = prune(&state, repo, &spec.name, vm, rule, now, dry_run)?;
            all.push((vm.to_string(), p));
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec::example("nightly")
    }

    fn opts(now: &str, window_h: u64) -> Options {
        Options {
            now: now.parse().unwrap(),
            catch_up: Duration::from_secs(window_h * 3600),
            dry_run: false,
        }
    }

    #[test]
    fn missed_occurrences_run_once_inside_the_window_and_are_recorded_outside_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(dir.path()).unwrap();
        let created = "2026-12-01T00:00:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_millisecond();
        // Down from the 3rd to the 5th, 12:00; a 3-day window: the 5th runs, the 3rd and
        // 4th are superseded; the 1st and 2nd are older than the window: missed.
        let p = plan(&state, &spec(), created, &opts("2027-01-05T12:00:00Z", 72)).unwrap();
        assert_eq!(p.run.len(), 1);
        assert_eq!(
            fmt_ms(p.run[0].1).get(..10),
            Some("2027-01-05"),
            "{:?}",
            p.run
        );
        assert_eq!(p.missed.len(), 4);
        assert_eq!(
            p.missed
                .iter()
                .filter(|m| m.2.starts_with("superseded"))
                .count(),
            2
        );
        // A 6-hour window: the 5th (10 hours late) is missed too.
        let p = plan(&state, &spec(), created, &opts("2027-01-05T12:00:00Z", 6)).unwrap();
        assert!(p.run.is_empty());
        assert_eq!(p.missed.len(), 5);
        // Claimed occurrences are not planned again.
        for (vm, due, _) in &p.missed {
            let vm = vm.to_string();
            let j = NewJob {
                kind: "backup",
                vm: Some(&vm),
                schedule: Some("nightly"),
                due_ms: Some(*due),
            };
            let job = state.claim_job(&j).unwrap().unwrap();
            state.finish_job(job, "missed", None, None, None).unwrap();
        }
        let p = plan(&state, &spec(), created, &opts("2027-01-05T12:00:00Z", 6)).unwrap();
        assert!(p.run.is_empty() && p.missed.is_empty());
        // Nothing before the schedule was created.
        let late = "2027-01-04T00:00:00Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_millisecond();
        let dir2 = tempfile::tempdir().unwrap();
        let state2 = State::open(dir2.path()).unwrap();
        let p = plan(&state2, &spec(), late, &opts("2027-01-05T12:00:00Z", 6)).unwrap();
        assert_eq!(p.missed.len() + p.run.len(), 2, "the 4th and the 5th only");
    }
}
