//! Finding backups from the command line: backup arguments (`latest`, `VM@latest`,
//! `VM@TIME`, id prefixes; see `vmbackup::selector`), `list` and its filters, the filters of
//! `history`, and `prune --vm` (retention for backups an external scheduler made).

use std::collections::HashSet;

use clap::Args;
use jiff::Timestamp;
use vmbackup::config::Config;
use vmbackup::contract;
use vmbackup::error::exit;
use vmbackup::repository::manifest::Manifest;
use vmbackup::schedule::run::{self, PruneScope, Pruned};
use vmbackup::schedule::Retention;
use vmbackup::selector::{check_tag, parse_time, ListFilter, Resolver, VmFilter};
use vmbackup::state::{JobQuery, State, JOB_KINDS, JOB_STATUSES};
use vmbackup::unlock::open_repo;
use vmbackup::Error;

use crate::{human_bytes, Output};

/// The backup `input` names (a full id, a unique prefix, `latest`, `VM@latest`, `VM@TIME`).
pub fn resolve_id(cfg: &Config, input: &str) -> anyhow::Result<String> {
    let repo = open_repo(cfg)?;
    Ok(Resolver::new(&repo).resolve(input)?)
}

/// The backups `inputs` name, each once; all of them resolved before anything is done.
pub fn resolve_ids(cfg: &Config, inputs: &[String]) -> anyhow::Result<Vec<String>> {
    let repo = open_repo(cfg)?;
    Ok(Resolver::new(&repo).resolve_all(inputs)?)
}

/// The filters of `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this VM's backups (its name, `qemu:NAME`, or its UUID)
    #[arg(long, value_name = "NAME|UUID", conflicts_with = "domain")]
    pub vm: Option<String>,
    /// Only backups started at or after TIME (RFC 3339, or UTC YYYY-MM-DD[THH:MM[:SS]]; a
    /// date alone: from its start)
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only backups started at or before TIME (as --since; a date alone: to its end)
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Only backups made by this schedule
    #[arg(long, value_name = "NAME")]
    pub schedule: Option<String>,
    /// Only pinned backups
    #[arg(long)]
    pub pinned: bool,
    /// Only backups with this tag (repeat: with every one of them)
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Only the newest N of those (still listed oldest first)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub last: Option<u32>,
}

/// The filters of `history` besides --days, --all and --vm.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Only jobs with this status
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(JOB_STATUSES))]
    pub status: Option<String>,
    /// Only jobs of this kind
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(JOB_KINDS))]
    pub kind: Option<String>,
    /// Only jobs of this schedule
    #[arg(long, value_name = "NAME")]
    pub schedule: Option<String>,
    /// Only the newest N of those (still listed oldest first)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,
}

impl HistoryArgs {
    /// The query of `history --days D | --all [--vm NAME]` with these filters.
    pub fn query(&self, days: u32, all: bool, vm: Option<&str>) -> JobQuery {
        JobQuery {
            since_ms: (!all).then(|| vmbackup::state::now_ms() - i64::from(days) * 86_400_000),
            vm: vm.map(str::to_string),
            kind: self.kind.clone(),
            schedule: self.schedule.clone(),
            status: self.status.clone(),
            limit: self.limit.map(|n| n as usize),
        }
    }
}

/// `prune --vm`: retention over one VM's backups, whatever made them.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Prune this VM's backups (its name, `qemu:NAME`, or its UUID) by --keep and/or
    /// --keep-days instead of applying the schedules' retention
    #[arg(long, value_name = "NAME|UUID")]
    pub vm: Option<String>,
    /// With --vm: keep the newest N unpinned backups
    #[arg(long, value_name = "N", requires = "vm")]
    pub keep: Option<u32>,
    /// With --vm: keep backups younger than D days (with --keep too: a backup goes only when
    /// both let it go)
    #[arg(long, value_name = "D", requires = "vm")]
    pub keep_days: Option<u32>,
    /// With --vm: only backups with this tag are considered
    #[arg(long, value_name = "TAG", requires = "vm")]
    pub tag: Option<String>,
}

/// `prune --vm`: `None` when no --vm was given (the schedules' retention applies).
pub fn prune_vm(cfg: &Config, a: &PruneArgs, dry_run: bool) -> anyhow::Result<Option<Pruned>> {
    let Some(vm_text) = &a.vm else {
        return Ok(None);
    };
    let vm = VmFilter::parse(vm_text)?;
    let tag = a.tag.as_deref().map(check_tag).transpose()?;
    let mut rules = Vec::new();
    match a.keep {
        Some(0) => return Err(Error::Invalid("--keep must be at least 1".into()).into()),
        Some(keep) => rules.push(Retention::Count { keep }),
        None => {}
    }
    match a.keep_days {
        Some(0) => return Err(Error::Invalid("--keep-days must be at least 1".into()).into()),
        Some(days) => rules.push(Retention::Days { days }),
        None => {}
    }
    if rules.is_empty() {
        return Err(Error::Invalid("prune --vm needs --keep N and/or --keep-days D".into()).into());
    }
    let repo = open_repo(cfg)?;
    let state = State::open(&cfg.state_dir).map_err(Error::from)?;
    // The job names the VM as its backups do (a UUID given finds their name).
    let name = repo
        .list()
        .map_err(Error::from)?
        .into_iter()
        .rev()
        .find(|m| vm.matches_manifest(m))
        .map(|m| m.vm_name)
        .unwrap_or_else(|| vm_text.clone());
    let scope = PruneScope {
        vm: name,
        schedule: None,
        note: tag.map(|t| format!("tag {t}")),
    };
    let select =
        |m: &Manifest| vm.matches_manifest(m) && tag.is_none_or(|t| m.tags.iter().any(|x| x == t));
    let p = run::prune_where(
        &state,
        &repo,
        &scope,
        &rules,
        &select,
        Timestamp::now(),
        dry_run,
    )?;
    Ok(Some(p))
}

fn list_filter(domain: Option<&str>, a: &ListArgs) -> Result<ListFilter, Error> {
    let time = |s: &Option<String>, flag: &str| {
        s.as_deref()
            .map(|s| parse_time(s).map_err(|e| Error::Invalid(format!("{flag}: {e}"))))
            .transpose()
    };
    for t in &a.tags {
        check_tag(t)?;
    }
    Ok(ListFilter {
        vm: domain
            .or(a.vm.as_deref())
            .map(VmFilter::parse)
            .transpose()?,
        since: time(&a.since, "--since")?.map(|t| t.first),
        until: time(&a.until, "--until")?.map(|t| t.last),
        schedule: a.schedule.clone(),
        pinned: a.pinned,
        tags: a.tags.clone(),
        last: a.last.map(|n| n as usize),
    })
}

/// `list [DOMAIN] [filters]`. Backups whose manifest does not read are listed apart (under
/// `unreadable`, whatever the filters: nothing says whose they are) and warned about.
pub fn cmd_list(cfg: &Config, domain: Option<&str>, a: &ListArgs) -> anyhow::Result<Output> {
    let filter = list_filter(domain, a)?;
    let repo = open_repo(cfg)?;
    let scan = repo.scan()?;
    // Pins live in the state database; listing does not create one.
    let pinned: HashSet<String> = if cfg.state_dir.join("state.db").exists() {
        State::open(&cfg.state_dir)
            .and_then(|s| s.pinned())
            .unwrap_or_default()
    } else {
        Default::default()
    };
    let list = filter.apply(scan.backups, &pinned);
    let mut table = vmbackup::render::Table::new(&[
        "ID",
        "VM",
        "START (UTC)",
        "END (UTC)",
        "LOGICAL",
        "STORED",
        "DISKS",
        "CONSISTENCY",
        "NOTES",
    ])
    .right(&["LOGICAL", "STORED"]);
    // The backups that have a boot test: one listing, then one read per such backup.
    let tested: HashSet<String> = repo
        .store()
        .list("backups/")
        .map_err(Error::from)?
        .into_iter()
        .filter_map(|n| {
            n.strip_prefix("backups/")?
                .strip_suffix("/boot-test.json")
                .map(str::to_string)
        })
        .collect();
    let mut rows = Vec::new();
    for m in &list {
        let boot = if tested.contains(&m.id) {
            repo.boot_test(&m.id).map_err(Error::from)?
        } else {
            None
        };
        let mut notes = Vec::new();
        if pinned.contains(&m.id) {
            notes.push("pinned".to_string());
        }
        if !m.tags.is_empty() {
            notes.push(format!("tags: {}", m.tags.join(", ")));
        }
        if let Some(b) = &boot {
            let ok = b.booted && b.error.is_none();
            notes.push(format!("boot test: {}", if ok { "ok" } else { "FAILED" }));
        }
        table.row([
            m.id.clone(),
            m.vm_name.clone(),
            m.started_at.clone(),
            m.ended_at.clone(),
            human_bytes(m.logical_bytes),
            human_bytes(m.stored_bytes),
            m.disks
                .iter()
                .map(|d| d.target.as_str())
                .collect::<Vec<_>>()
                .join(","),
            m.consistency.clone(),
            notes.join(", "),
        ]);
        rows.push(contract::BackupRow::of(m, pinned.contains(&m.id), boot));
    }
    let mut text = table.render();
    // Backups whose manifest cannot be read: listed apart (whatever VM they were of).
    let mut unreadable = Vec::new();
    for (id, why) in &scan.unreadable {
        text.push_str(&format!("{id:<40} UNREADABLE: {why}\n"));
        unreadable.push(contract::Unreadable {
            id: id.clone(),
            error: why.clone(),
        });
    }
    Ok(Output {
        json: crate::body(contract::ListBody {
            backups: rows,
            unreadable,
        }),
        text,
        code: exit::OK,
    })
}
