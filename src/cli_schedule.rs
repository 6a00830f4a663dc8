//! The scheduling commands of the binary: `schedule ...`, `run-due`, `history`, `pin`,
//! `unpin`, `prune`.

use jiff::Timestamp;
use vmbackup::config::Config;
use vmbackup::contract;
use vmbackup::error::exit;
use vmbackup::notify::{self, VmResult};
use vmbackup::schedule::calendar::{parse_ordinal, parse_weekday, weekday_name};
use vmbackup::schedule::{self, run, BootTestRule, Recurrence, Retention, Spec};
use vmbackup::state::State;
use vmbackup::Error;

use crate::cli::{Kind, Quiesce, ScheduleCommand, ScheduleFields};
use crate::{human_bytes, Output, Progress};
use vmbackup::hypervisor::libvirt::LibvirtError;
use vmbackup::vm_ref::VmRef;

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

fn default_tz() -> String {
    jiff::tz::TimeZone::system()
        .iana_name()
        .map(str::to_string)
        .unwrap_or_else(|| "UTC".into())
}

fn weekday(s: &str) -> Result<String, Error> {
    parse_weekday(s)
        .map(|w| weekday_name(w).to_string())
        .ok_or_else(|| invalid(format!("bad weekday {s:?} (monday ... sunday)")))
}

/// The recurrence the fields describe, taking what they leave out from `old`.
fn recurrence(f: &ScheduleFields, old: Option<&Recurrence>) -> Result<Recurrence, Error> {
    let old_kind = old.map(|r| match r {
        Recurrence::Once { .. } => Kind::Once,
        Recurrence::Daily => Kind::Daily,
        Recurrence::Weekly { .. } => Kind::Weekly,
        Recurrence::MonthlyDay { .. } | Recurrence::MonthlyWeekday { .. } => Kind::Monthly,
    });
    let kind = f
        .kind
        .or(old_kind)
        .ok_or_else(|| invalid("--type once|daily|weekly|monthly is required"))?;
    let old_weekday = match old {
        Some(Recurrence::Weekly { weekday }) | Some(Recurrence::MonthlyWeekday { weekday, .. }) => {
            Some(weekday.clone())
        }
        _ => None,
    };
    let wd = || -> Result<String, Error> {
        match (&f.weekday, &old_weekday) {
            (Some(w), _) => weekday(w),
            (None, Some(w)) => Ok(w.clone()),
            (None, None) => Err(invalid("--weekday is required")),
        }
    };
    Ok(match kind {
        Kind::Once => Recurrence::Once {
            date: match (&f.date, old) {
                (Some(d), _) => d.clone(),
                (None, Some(Recurrence::Once { date })) => date.clone(),
                _ => return Err(invalid("--type once needs --date YYYY-MM-DD")),
            },
        },
        Kind::Daily => Recurrence::Daily,
        Kind::Weekly => Recurrence::Weekly { weekday: wd()? },
        Kind::Monthly => {
            let nth = match &f.week {
                Some(w) => Some(parse_ordinal(w).ok_or_else(|| {
                    invalid(format!(
                        "bad --week {w:?} (first, second, third, fourth, fifth, last)"
                    ))
                })?),
                None => None,
            };
            match (f.day, nth, old) {
                (Some(_), Some(_), _) => {
                    return Err(invalid("give --day or --week with --weekday, not both"))
                }
                (Some(day), None, _) => Recurrence::MonthlyDay { day },
                (None, Some(nth), _) => Recurrence::MonthlyWeekday {
                    nth,
                    weekday: wd()?,
                },
                (None, None, Some(Recurrence::MonthlyDay { day })) if f.weekday.is_none() => {
                    Recurrence::MonthlyDay { day: *day }
                }
                (None, None, Some(Recurrence::MonthlyWeekday { nth, .. })) => {
                    Recurrence::MonthlyWeekday {
                        nth: *nth,
                        weekday: wd()?,
                    }
                }
                _ => {
                    return Err(invalid(
                        "--type monthly needs --day N, or --week ORDINAL --weekday DAY",
                    ))
                }
            }
        }
    })
}

/// Applies the fields to `old` (or builds a new schedule); returns it and whether the slot
/// is to be chosen automatically.
fn build(
    name: &str,
    f: &ScheduleFields,
    old: Option<Spec>,
    now: Timestamp,
) -> Result<(Spec, bool), Error> {
    let tz =
        f.tz.clone()
            .or_else(|| old.as_ref().map(|o| o.tz.clone()))
            .unwrap_or_else(default_tz);
    let zone = jiff::tz::TimeZone::get(&tz)
        .map_err(|e| invalid(format!("unknown time zone {tz:?}: {e}")))?;
    let (hour, auto) = match f.slot.as_deref() {
        Some("auto") => (0, true),
        Some(s) => {
            let h = s.strip_suffix(":00").unwrap_or(s);
            let h: u8 = h
                .parse()
                .ok()
                .filter(|h| *h < 24)
                .ok_or_else(|| invalid(format!("bad --slot {s:?}: an hour 0-23, or auto")))?;
            (h, false)
        }
        None => match &old {
            Some(o) => (o.hour, false),
            None => return Err(invalid("--slot HOUR (0-23) or --slot auto is required")),
        },
    };
    let retention = if f.keep_all {
        None
    } else if let Some(n) = f.keep {
        Some(Retention::Count { keep: n })
    } else if let Some(d) = f.keep_days {
        Some(Retention::Days { days: d })
    } else {
        old.as_ref().and_then(|o| o.retention)
    };
    let quiesce = match f.quiesce {
        Some(Quiesce::Required) => "required".to_string(),
        Some(Quiesce::Preferred) => "preferred".to_string(),
        Some(Quiesce::Off) => "off".to_string(),
        None => old
            .as_ref()
            .map(|o| o.quiesce.clone())
            .unwrap_or_else(|| "preferred".into()),
    };
    let boot_test = boot_test_rule(f, old.as_ref().and_then(|o| o.boot_test.as_ref()));
    let vms = if f.vms.is_empty() {
        old.as_ref().map(|o| o.vms.clone()).unwrap_or_default()
    } else {
        f.vms
            .iter()
            .map(|v| v.parse::<VmRef>().map_err(|e| invalid(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?
    };
    let spec = Spec {
        name: name.to_string(),
        vms,
        recurrence: recurrence(f, old.as_ref().map(|o| &o.recurrence))?,
        start_date: f
            .start
            .clone()
            .or_else(|| old.as_ref().map(|o| o.start_date.clone()))
            .unwrap_or_else(|| now.to_zoned(zone).date().to_string()),
        hour,
        tz,
        retention,
        enabled: old.as_ref().is_none_or(|o| o.enabled),
        quiesce,
        boot_test,
    };
    spec.validate().map_err(invalid)?;
    Ok((spec, auto))
}

/// The boot test rule the fields describe, taking what they leave out from `old`: any
/// `--boot-test*` option turns it on; `--no-boot-test` off.
fn boot_test_rule(f: &ScheduleFields, old: Option<&BootTestRule>) -> Option<BootTestRule> {
    if f.no_boot_test {
        return None;
    }
    let asked = f.boot_test
        || f.boot_test_every.is_some()
        || f.boot_test_timeout.is_some()
        || f.boot_test_command.is_some();
    if !asked {
        return old.cloned();
    }
    Some(BootTestRule {
        every: f.boot_test_every.or(old.map(|o| o.every)).unwrap_or(1),
        timeout_secs: f
            .boot_test_timeout
            .or(old.map(|o| o.timeout_secs))
            .unwrap_or(BootTestRule::TIMEOUT_SECS),
        command: f
            .boot_test_command
            .clone()
            .or_else(|| old.and_then(|o| o.command.clone())),
    })
}

/// Refuses VM names libvirt does not know (plain QEMU VMs are checked when they run).
fn check_vms_exist(cfg: &Config, spec: &Spec) -> Result<(), Error> {
    let libvirt_vms: Vec<&VmRef> = spec.vms.iter().filter(|v| !v.is_qemu()).collect();
    if libvirt_vms.is_empty() {
        return Ok(());
    }
    match vmbackup::hypervisor::libvirt::Libvirt::open(&cfg.connect) {
        Ok(lv) => {
            for vm in libvirt_vms {
                if lv.find_domain(vm.name())?.is_none() {
                    return Err(LibvirtError::NoDomain(vm.to_string()).into());
                }
            }
            Ok(())
        }
        Err(e) => {
            tracing::warn!(
                "cannot check that the VMs exist: {}",
                vmbackup::error::chain(&e)
            );
            Ok(())
        }
    }
}

fn spec_json(spec: &Spec, now: Timestamp) -> contract::ScheduleView {
    contract::ScheduleView {
        spec: spec.clone(),
        slot: spec.slot_label(),
        description: spec.recurrence.describe(),
        next_run: spec
            .enabled
            .then(|| spec.next_after(now))
            .flatten()
            .map(|t| t.to_string()),
    }
}

/// Schedules as a table sized to its content.
fn spec_table<'a>(specs: impl IntoIterator<Item = &'a Spec>, now: Timestamp) -> String {
    let mut t = vmbackup::render::Table::new(&[
        "NAME",
        "STATE",
        "RECURRENCE",
        "SLOT",
        "RETENTION",
        "NEXT (UTC)",
        "VMS",
    ]);
    for spec in specs {
        t.row([
            spec.name.clone(),
            if spec.enabled { "enabled" } else { "disabled" }.to_string(),
            spec.recurrence.describe(),
            spec.slot_label(),
            spec.retention
                .map(|r| r.describe())
                .unwrap_or_else(|| "keep all".into()),
            spec.enabled
                .then(|| spec.next_after(now))
                .flatten()
                .map(|t| t.strftime("%Y-%m-%d %H:%M").to_string())
                .unwrap_or_else(|| "-".into()),
            spec.vms
                .iter()
                .map(VmRef::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ]);
    }
    t.render()
}

pub fn cmd_schedule(cfg: &Config, c: &ScheduleCommand) -> anyhow::Result<Output> {
    let state = State::open(&cfg.state_dir).map_err(Error::from)?;
    let now = Timestamp::now();
    let others = |name: &str| -> Result<Vec<Spec>, Error> {
        Ok(state
            .schedules()?
            .into_iter()
            .map(|(s, _)| s)
            .filter(|s| s.name != name)
            .collect())
    };
    let saved = |verb: &str, spec: &Spec| Output {
        text: verb.to_string()
            + &spec_table([spec], now)
            + &spec
                .boot_test
                .as_ref()
                .map(|b| format!("{}\n", b.describe()))
                .unwrap_or_default(),
        json: crate::body(contract::ScheduleBody {
            schedule: spec_json(spec, now),
        }),
        code: exit::OK,
    };
    match c {
        ScheduleCommand::Add {
            name,
            fields,
            disabled,
        } => {
            let (mut spec, auto) = build(name, fields, None, now)?;
            spec.enabled = !disabled;
            if state.schedule(name).is_ok() {
                return Err(
                    Error::from(vmbackup::state::StateError::ScheduleExists(name.clone())).into(),
                );
            }
            check_vms_exist(cfg, &spec)?;
            schedule::place(&others(name)?, &mut spec, auto, cfg.slot_capacity, now)?;
            state.add_schedule(&spec).map_err(Error::from)?;
            Ok(saved("added:\n", &spec))
        }
        ScheduleCommand::Edit { name, fields } => {
            let (old, _) = state.schedule(name).map_err(Error::from)?;
            let (mut spec, auto) = build(name, fields, Some(old), now)?;
            if !fields.vms.is_empty() {
                check_vms_exist(cfg, &spec)?;
            }
            schedule::place(&others(name)?, &mut spec, auto, cfg.slot_capacity, now)?;
            state.update_schedule(&spec).map_err(Error::from)?;
            Ok(saved("changed:\n", &spec))
        }
        ScheduleCommand::Enable { name } | ScheduleCommand::Disable { name } => {
            let (mut spec, _) = state.schedule(name).map_err(Error::from)?;
            spec.enabled = matches!(c, ScheduleCommand::Enable { .. });
            schedule::place(&others(name)?, &mut spec, false, cfg.slot_capacity, now)?;
            state.update_schedule(&spec).map_err(Error::from)?;
            let verb = if spec.enabled {
                "enabled:\n"
            } else {
                "disabled:\n"
            };
            Ok(saved(verb, &spec))
        }
        ScheduleCommand::Remove { name } => {
            state.remove_schedule(name).map_err(Error::from)?;
            Ok(Output {
                text: format!("removed schedule {name} (its backups stay)\n"),
                json: crate::body(contract::RemovedBody {
                    removed: name.clone(),
                }),
                code: exit::OK,
            })
        }
        ScheduleCommand::Show { name } => {
            let (spec, _) = state.schedule(name).map_err(Error::from)?;
            let v = spec_json(&spec, now);
            let next = spec.enabled.then(|| spec.next_after(now)).flatten();
            Ok(Output {
                text: crate::cli_show::schedule_text(&spec, next),
                json: crate::body(contract::ScheduleBody { schedule: v }),
                code: exit::OK,
            })
        }
        ScheduleCommand::List => {
            let all = state.schedules().map_err(Error::from)?;
            let text = spec_table(all.iter().map(|(s, _)| s), now);
            let mut rows = Vec::new();
            for (s, _) in &all {
                rows.push(spec_json(s, now));
            }
            Ok(Output {
                text,
                json: crate::body(contract::SchedulesBody { schedules: rows }),
                code: exit::OK,
            })
        }
    }
}

pub fn cmd_run_due(cfg: &Config, now: Option<&str>, dry_run: bool) -> anyhow::Result<Output> {
    let now = match now {
        Some(s) => s.parse::<Timestamp>().map_err(|e| {
            invalid(format!(
                "bad --now {s:?} (RFC 3339, e.g. 2027-01-04T02:30:00Z): {e}"
            ))
        })?,
        None => Timestamp::now(),
    };
    let progress = Progress::new();
    let o = run::Options {
        now,
        catch_up: cfg.catch_up,
        dry_run,
    };
    let r = run::run_due(cfg, &o, &|l, d, t| progress.show(l, d, t))?;
    let mut text = String::new();
    for line in &r.recovered {
        text.push_str(&format!("finished first: {line}\n"));
    }
    for e in &r.recover_errors {
        text.push_str(&format!("cannot finish an interrupted backup: {e}\n"));
    }
    for j in &r.jobs {
        text.push_str(&format!("schedule {}:\n", j.schedule));
        for v in &j.results {
            let what = match (&v.backup_id, &v.error) {
                (Some(id), _) => format!(
                    "{id}, {} stored{}{}",
                    human_bytes(v.stored_bytes.unwrap_or(0)),
                    match &v.boot_test {
                        None => String::new(),
                        Some(t) => match (&t.error, t.seconds_to_agent) {
                            (None, s) => format!(
                                ", boot test passed (agent after {:.1} s)",
                                s.unwrap_or_default()
                            ),
                            (Some(e), _) => format!(", boot test FAILED: {e}"),
                        },
                    },
                    if v.pruned.is_empty() {
                        String::new()
                    } else {
                        format!(", pruned {}", v.pruned.join(" "))
                    }
                ),
                (None, Some(e)) => e.clone(),
                _ => String::new(),
            };
            text.push_str(&format!(
                "  {:<20} due {}  {:<8} {what}\n",
                v.vm,
                v.due.as_deref().unwrap_or("-"),
                v.status
            ));
        }
    }
    if r.jobs.is_empty() {
        // Silence for a timer that calls every minute: said at debug level only.
        tracing::debug!("nothing due at {}", r.now);
    }
    for e in &r.report_errors {
        text.push_str(&format!("report not sent: {e}\n"));
    }
    let failed = r.failed();
    // A backup that does not boot is made, but the job did not do what was asked: a run with
    // only such failures is partial, like one with a failed backup beside good ones. So is
    // a run whose report could not be sent (nobody was told), or that could not finish an
    // interrupted run.
    let undone = r.boot_tests_failed() + r.report_errors.len() + r.recover_errors.len();
    let code = match (failed, r.succeeded(), undone) {
        (0, _, 0) => exit::OK,
        (_, 0, _) if failed > 0 => exit::FAILED,
        _ => exit::PARTIAL,
    };
    Ok(Output {
        json: crate::body(contract::RunDueBody { run: r }),
        text,
        code,
    })
}

pub fn cmd_history(cfg: &Config, q: &vmbackup::state::JobQuery) -> anyhow::Result<Output> {
    let state = State::open(&cfg.state_dir).map_err(Error::from)?;
    let jobs = state.jobs_matching(q).map_err(Error::from)?;
    let mut t = vmbackup::render::Table::new(&[
        "ID",
        "START (UTC)",
        "TYPE",
        "STATUS",
        "DURATION",
        "VM",
        "SCHEDULE",
        "BACKUP / ERROR",
    ])
    .right(&["ID", "DURATION"]);
    for j in &jobs {
        t.row([
            j.id.to_string(),
            j.started.to_string(),
            j.kind.to_string(),
            j.status.to_string(),
            j.duration_ms
                .map(|d| vmbackup::render::duration_ms(d.max(0) as u64))
                .unwrap_or_else(|| "-".into()),
            j.vm.as_deref().unwrap_or("-").to_string(),
            j.schedule.as_deref().unwrap_or("-").to_string(),
            j.error
                .as_deref()
                .or(j.backup_id.as_deref())
                .or(j.detail.as_deref())
                .unwrap_or("")
                .to_string(),
        ]);
    }
    let text = t.render();
    Ok(Output {
        json: crate::body(contract::HistoryBody { jobs }),
        text,
        code: exit::OK,
    })
}

pub fn cmd_pin(cfg: &Config, id: &str, pin: bool) -> anyhow::Result<Output> {
    let repo = vmbackup::unlock::open_repo(cfg)?;
    repo.load(id).map_err(Error::from)?;
    let state = State::open(&cfg.state_dir).map_err(Error::from)?;
    if pin {
        state.pin(id).map_err(Error::from)?;
    } else {
        state.unpin(id).map_err(Error::from)?;
    }
    Ok(Output {
        text: format!(
            "{id} {}\n",
            if pin {
                "pinned: retention keeps it"
            } else {
                "unpinned"
            }
        ),
        json: crate::body(contract::PinBody {
            id: id.to_string(),
            pinned: pin,
        }),
        code: exit::OK,
    })
}

pub fn cmd_prune(
    cfg: &Config,
    dry_run: bool,
    vm: &crate::cli_find::PruneArgs,
) -> anyhow::Result<Output> {
    let all = match crate::cli_find::prune_vm(cfg, vm, dry_run)? {
        Some(p) => vec![(vm.vm.clone().unwrap_or_default(), p)],
        None => {
            let repo = vmbackup::unlock::open_repo(cfg)?;
            run::prune_all(&cfg.state_dir, &repo, Timestamp::now(), dry_run)?
        }
    };
    let deleted: Vec<String> = all.iter().flat_map(|(_, p)| p.deleted.clone()).collect();
    let errors: Vec<String> = all.iter().flat_map(|(_, p)| p.errors.clone()).collect();
    let item_errors = || -> Vec<contract::ItemError> {
        errors
            .iter()
            .map(|e| contract::ItemError {
                id: None,
                error: contract::ErrorDoc::failed(e.clone()),
            })
            .collect()
    };
    if dry_run {
        let mut text = format!("would delete {} backups (dry run)\n", deleted.len());
        for d in &deleted {
            text.push_str(&format!("  {d}\n"));
        }
        return Ok(Output {
            json: crate::body(contract::DeletedBody {
                dry_run: true,
                errors: item_errors(),
                deleted,
            }),
            text,
            code: exit::OK,
        });
    }
    let pruned = all
        .iter()
        .filter_map(|(vm, p)| VmResult::pruned(vm, &p.deleted, &p.errors));
    notify::job_done(&cfg.report, notify::JobKind::Prune, pruned.collect());
    let mut text = format!("deleted {} backups\n", deleted.len());
    for d in &deleted {
        text.push_str(&format!("  {d}\n"));
    }
    for e in &errors {
        text.push_str(&format!("  error: {e}\n"));
    }
    // Some deleted and some not: partly done (5); none of several: failed (1).
    let code = match (errors.is_empty(), deleted.is_empty()) {
        (true, _) => exit::OK,
        (false, true) => exit::FAILED,
        (false, false) => exit::PARTIAL,
    };
    Ok(Output {
        json: crate::body(contract::DeletedBody {
            dry_run: false,
            errors: item_errors(),
            deleted,
        }),
        text,
        code,
    })
}
