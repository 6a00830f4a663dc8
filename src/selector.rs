//! Finding backups and VMs from what a user types.
//!
//! Wherever a command takes a backup id, it also takes:
//! - `latest`: the newest backup in the repository, of any VM;
//! - `VM@latest`: the newest backup of VM (a name, `qemu:NAME`, or the VM's UUID);
//! - `VM@TIME`: the newest backup of VM started at TIME or before. TIME is an RFC 3339 time
//!   (`2026-03-01T12:00:00Z`, `2026-03-01T14:00:00+02:00`) or a UTC date and time without
//!   an offset: `2026-03-01`, `2026-03-01T12:00`, `2026-03-01T12:00:30`. A date alone covers
//!   its whole day: `web@2026-03-01` is web's last backup started on March 1st (UTC) or
//!   earlier;
//! - a unique prefix of an id. A prefix that several ids start with is refused, naming them.
//!
//! A full id is taken as it is (one existence check, no listing). Everything here is bad
//! input (`Error::NotFound`, exit 2; `Error::Invalid` when ambiguous) when it names no backup, and is settled before a command
//! takes a lock or changes anything.
//!
//! Also here: VM filters (`--vm NAME|UUID` on stored backups), `--since`/`--until` times,
//! backup tags, and the filter of `list`.

use std::cell::OnceCell;
use std::collections::HashSet;

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use crate::error::Error;
use crate::repository::manifest::Manifest;
use crate::repository::{Listing, Repository};
use crate::vm_ref::{is_uuid, VmRef};

type Result<T, E = Error> = std::result::Result<T, E>;

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

/// Names no backup: exit 2, kind `not_found`.
fn not_found(msg: impl Into<String>) -> Error {
    Error::NotFound(msg.into())
}

/// A VM as a user names it on stored backups: its name (`qemu:NAME` for a plain QEMU VM)
/// or its UUID (matched against the UUID recorded in each backup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFilter {
    text: String,
    vm: Option<VmRef>,
    uuid: Option<String>,
}

impl VmFilter {
    pub fn parse(s: &str) -> Result<VmFilter> {
        let uuid = is_uuid(s).then(|| s.to_ascii_lowercase());
        let vm = match s.parse::<VmRef>() {
            Ok(v) => Some(v),
            Err(_) if uuid.is_some() => None,
            Err(e) => return Err(e.into()),
        };
        Ok(VmFilter {
            text: s.to_string(),
            vm,
            uuid,
        })
    }

    /// Whether a backup of the VM named `vm_name` with UUID `vm_uuid` is this VM's.
    pub fn matches(&self, vm_name: &str, vm_uuid: &str) -> bool {
        self.vm.as_ref().is_some_and(|v| v.is(vm_name))
            || self
                .uuid
                .as_ref()
                .is_some_and(|u| u.eq_ignore_ascii_case(vm_uuid))
    }

    pub fn matches_manifest(&self, m: &Manifest) -> bool {
        self.matches(&m.vm_name, &m.vm_uuid)
    }

    /// As the user gave it.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// A time from the command line: the span it covers, `first` to `last` inclusive (one
/// instant, or a whole UTC day for a date alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeArg {
    pub first: Timestamp,
    pub last: Timestamp,
}

/// Parses an RFC 3339 time, or a UTC `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM` or
/// `YYYY-MM-DDTHH:MM:SS`.
pub fn parse_time(s: &str) -> Result<TimeArg> {
    let bad = || {
        invalid(format!(
            "bad time {s:?}: give an RFC 3339 time (2026-03-01T12:00:00Z) or a UTC date and \
             time (2026-03-01, 2026-03-01T12:00, 2026-03-01T12:00:30)"
        ))
    };
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(TimeArg { first: t, last: t });
    }
    let utc = |dt: DateTime| {
        dt.to_zoned(TimeZone::UTC)
            .map(|z| z.timestamp())
            .map_err(|_| bad())
    };
    let b = s.as_bytes();
    let shaped = |len: usize| {
        b.len() == len
            && b.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                10 => *c == b'T' || *c == b't',
                13 | 16 => *c == b':',
                _ => c.is_ascii_digit(),
            })
    };
    if shaped(10) {
        let d: Date = s.parse().map_err(|_| bad())?;
        let first = utc(d.to_datetime(jiff::civil::Time::midnight()))?;
        let last = first + SignedDuration::from_hours(24) - SignedDuration::from_nanos(1);
        return Ok(TimeArg { first, last });
    }
    if shaped(16) || shaped(19) {
        let dt: DateTime = s.parse().map_err(|_| bad())?;
        let t = utc(dt)?;
        return Ok(TimeArg { first: t, last: t });
    }
    Err(bad())
}

/// Checks a backup tag: 1 to 64 letters, digits, `.`, `-`, `_`, `+`, not starting with `.`
/// or `-`.
pub fn check_tag(tag: &str) -> Result<&str> {
    if tag.len() > 64 {
        return Err(invalid(format!(
            "invalid tag {tag:?}: longer than 64 characters"
        )));
    }
    crate::names::check_component(tag)
        .map_err(|e| invalid(format!("invalid tag {:?}: {}", e.name, e.why)))
}

/// What a backup argument asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// `latest`: the newest backup of all.
    Latest,
    /// `VM@latest` (`at` is `None`) or `VM@TIME` (the newest started at `at` or before).
    Newest { vm: VmFilter, at: Option<Timestamp> },
    /// A full id or a prefix of one.
    Id(String),
}

impl Selector {
    pub fn parse(s: &str) -> Result<Selector> {
        if s.is_empty() {
            return Err(invalid("empty backup id"));
        }
        if s == "latest" {
            return Ok(Selector::Latest);
        }
        // `@` also ends a plain QEMU VM's id stem (`web@qemu-2026...`): only `latest` or
        // something that starts like a date after the last `@` selects by VM.
        if let Some((vm, when)) = s.rsplit_once('@') {
            let dated = when.len() >= 4 && when.bytes().take(4).all(|c| c.is_ascii_digit());
            if when == "latest" || dated {
                let vm = VmFilter::parse(vm)?;
                let at = if when == "latest" {
                    None
                } else {
                    Some(parse_time(when)?.last)
                };
                return Ok(Selector::Newest { vm, at });
            }
        }
        Ok(Selector::Id(s.to_string()))
    }
}

/// One readable backup as the resolver sees it.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub id: &'a str,
    pub vm_name: &'a str,
    pub vm_uuid: &'a str,
    /// `None`: its start time does not parse (never picked by time).
    pub started: Option<Timestamp>,
}

impl<'a> Entry<'a> {
    pub fn of(m: &'a Manifest) -> Entry<'a> {
        Entry {
            id: &m.id,
            vm_name: &m.vm_name,
            vm_uuid: &m.vm_uuid,
            started: m.started_at.parse().ok(),
        }
    }
}

/// Picks the backup `sel` names: among `ids` (every published backup, readable or not) for
/// an id or prefix, among `backups` (the readable ones) otherwise.
pub fn pick(sel: &Selector, ids: &[&str], backups: &[Entry]) -> Result<String> {
    let newest = |keep: &dyn Fn(&Entry) -> bool| {
        backups
            .iter()
            .filter(|e| e.started.is_some() && keep(e))
            .max_by(|a, b| a.started.cmp(&b.started).then_with(|| a.id.cmp(b.id)))
            .map(|e| e.id.to_string())
    };
    match sel {
        Selector::Latest => {
            newest(&|_| true).ok_or_else(|| not_found("no backup: the repository is empty"))
        }
        Selector::Newest { vm, at } => newest(&|e| {
            vm.matches(e.vm_name, e.vm_uuid)
                && at.is_none_or(|at| e.started.is_some_and(|s| s <= at))
        })
        .ok_or_else(|| match at {
            None => not_found(format!("no backup of {}", vm.text())),
            Some(at) => not_found(format!(
                "no backup of {} started at {at} or before",
                vm.text()
            )),
        }),
        Selector::Id(s) => {
            if ids.contains(&s.as_str()) {
                return Ok(s.clone());
            }
            let mut found: Vec<&str> = ids
                .iter()
                .copied()
                .filter(|i| i.starts_with(s.as_str()))
                .collect();
            found.sort_unstable();
            found.dedup();
            match found.as_slice() {
                [] => Err(not_found(format!("no backup {s}"))),
                [one] => Ok(one.to_string()),
                many => Err(invalid(format!(
                    "{s} is ambiguous: {} backups start with it: {}",
                    many.len(),
                    many.join(", ")
                ))),
            }
        }
    }
}

/// Whether `s` can be a published backup's id as it is (checked against the store).
fn plain_id(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.len() <= 255
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_' | b'+' | b'@'))
}

/// Resolves backup arguments against one repository, listing it at most once.
pub struct Resolver<'r> {
    repo: &'r Repository,
    ids: OnceCell<Vec<String>>,
    scan: OnceCell<Listing>,
}

impl<'r> Resolver<'r> {
    pub fn new(repo: &'r Repository) -> Resolver<'r> {
        Resolver {
            repo,
            ids: OnceCell::new(),
            scan: OnceCell::new(),
        }
    }

    fn ids(&self) -> Result<&Vec<String>> {
        if let Some(i) = self.ids.get() {
            return Ok(i);
        }
        let ids = self
            .repo
            .store()
            .list("backups/")?
            .iter()
            .filter_map(|n| {
                n.strip_prefix("backups/")?
                    .strip_suffix("/manifest.json")
                    .map(str::to_string)
            })
            .collect();
        Ok(self.ids.get_or_init(|| ids))
    }

    fn scan(&self) -> Result<&Listing> {
        if let Some(s) = self.scan.get() {
            return Ok(s);
        }
        let s = self.repo.scan()?;
        Ok(self.scan.get_or_init(|| s))
    }

    /// The id of the backup `input` names.
    pub fn resolve(&self, input: &str) -> Result<String> {
        if plain_id(input)
            && self
                .repo
                .store()
                .exists(&format!("backups/{input}/manifest.json"))?
        {
            return Ok(input.to_string());
        }
        let sel = Selector::parse(input)?;
        match &sel {
            Selector::Id(_) => {
                let ids: Vec<&str> = self.ids()?.iter().map(String::as_str).collect();
                pick(&sel, &ids, &[])
            }
            _ => {
                let entries: Vec<Entry> = self.scan()?.backups.iter().map(Entry::of).collect();
                pick(&sel, &[], &entries)
            }
        }
    }

    /// The ids of the backups `inputs` name, each once, in order. Every input is resolved;
    /// those that name no backup (or several) are reported together.
    pub fn resolve_all(&self, inputs: &[String]) -> Result<Vec<String>> {
        let mut out: Vec<String> = Vec::new();
        let mut bad = Vec::new();
        // All unknown: not found; any ambiguous or malformed: invalid.
        let mut all_unknown = true;
        for i in inputs {
            match self.resolve(i) {
                Ok(id) if !out.contains(&id) => out.push(id),
                Ok(_) => {}
                Err(Error::NotFound(m)) => bad.push(m),
                Err(Error::Invalid(m)) => {
                    all_unknown = false;
                    bad.push(m)
                }
                Err(e) => return Err(e),
            }
        }
        match (bad.is_empty(), all_unknown) {
            (true, _) => Ok(out),
            (false, true) => Err(not_found(bad.join("; "))),
            (false, false) => Err(invalid(bad.join("; "))),
        }
    }
}

/// The id of the backup `input` names in `repo` (see the module's comment).
pub fn resolve(repo: &Repository, input: &str) -> Result<String> {
    Resolver::new(repo).resolve(input)
}

/// The filters of `list`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub vm: Option<VmFilter>,
    /// Started at or after this.
    pub since: Option<Timestamp>,
    /// Started at or before this.
    pub until: Option<Timestamp>,
    pub schedule: Option<String>,
    /// Only pinned backups.
    pub pinned: bool,
    /// Only backups that carry every one of these tags.
    pub tags: Vec<String>,
    /// Only the newest N of those that pass the other filters.
    pub last: Option<usize>,
}

impl ListFilter {
    /// Whether `m` passes every filter but `last`.
    pub fn admits(&self, m: &Manifest, pinned: &HashSet<String>) -> bool {
        let started = m.started_at.parse::<Timestamp>().ok();
        let timed = |bound: Option<Timestamp>, ok: fn(Timestamp, Timestamp) -> bool| {
            bound.is_none_or(|b| started.is_some_and(|s| ok(s, b)))
        };
        self.vm.as_ref().is_none_or(|v| v.matches_manifest(m))
            && timed(self.since, |s, b| s >= b)
            && timed(self.until, |s, b| s <= b)
            && self
                .schedule
                .as_ref()
                .is_none_or(|s| m.schedule.as_ref() == Some(s))
            && (!self.pinned || pinned.contains(&m.id))
            && self.tags.iter().all(|t| m.tags.contains(t))
    }

    /// The backups of `all` (oldest first) that pass, oldest first.
    pub fn apply(&self, all: Vec<Manifest>, pinned: &HashSet<String>) -> Vec<Manifest> {
        let mut kept: Vec<Manifest> = all.into_iter().filter(|m| self.admits(m, pinned)).collect();
        if let Some(n) = self.last {
            let skip = kept.len().saturating_sub(n);
            kept.drain(..skip);
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn manifest(id: &str, vm: &str, started: &str) -> Manifest {
        serde_json::from_value(serde_json::json!({
            "format_version": 1, "id": id, "vm_name": vm,
            "vm_uuid": format!("{:0>8}-0000-4000-8000-000000000000", vm.len()),
            "started_at": started, "ended_at": started, "consistency": "crash",
            "consistency_reason": null, "freeze_ms": null, "vcpus": 1, "memory_bytes": 1,
            "disks": [], "nics": [], "domain_xml_object": "x", "schedule": null,
            "stored_bytes": 0, "logical_bytes": 0
        }))
        .unwrap()
    }

    fn repo() -> Vec<Manifest> {
        vec![
            manifest("web-20260301T100000Z-0001", "web", "2026-03-01T10:00:00Z"),
            manifest("db-20260301T110000Z-0002", "db", "2026-03-01T11:00:00Z"),
            manifest("web-20260302T100000Z-0003", "web", "2026-03-02T10:00:00Z"),
            manifest(
                "web@qemu-20260303T100000Z-0004",
                "qemu:web",
                "2026-03-03T10:00:00Z",
            ),
            manifest("db-20260305T000000Z-0005", "db", "2026-03-05T00:00:00Z"),
        ]
    }

    fn resolve(input: &str) -> Result<String> {
        let all = repo();
        let entries: Vec<Entry> = all.iter().map(Entry::of).collect();
        let ids: Vec<&str> = all.iter().map(|m| m.id.as_str()).collect();
        let sel = Selector::parse(input)?;
        match sel {
            Selector::Id(_) => pick(&sel, &ids, &[]),
            _ => pick(&sel, &[], &entries),
        }
    }

    #[test]
    fn times_are_rfc3339_or_utc_dates_and_a_date_covers_its_day() {
        let t = parse_time("2026-03-01T12:00:00Z").unwrap();
        assert_eq!(
            (t.first, t.last),
            (ts("2026-03-01T12:00:00Z"), ts("2026-03-01T12:00:00Z"))
        );
        assert_eq!(
            parse_time("2026-03-01T14:00:00+02:00").unwrap().first,
            ts("2026-03-01T12:00:00Z")
        );
        assert_eq!(
            parse_time("2026-03-01T12:00").unwrap().first,
            ts("2026-03-01T12:00:00Z")
        );
        assert_eq!(
            parse_time("2026-03-01T12:00:30").unwrap().last,
            ts("2026-03-01T12:00:30Z")
        );
        let d = parse_time("2026-03-01").unwrap();
        assert_eq!(d.first, ts("2026-03-01T00:00:00Z"));
        assert!(d.last > ts("2026-03-01T23:59:59Z") && d.last < ts("2026-03-02T00:00:00Z"));
        for bad in [
            "",
            "yesterday",
            "2026-3-1",
            "2026-02-30",
            "2026-03-01 12:00",
            "2026-03-01T25:00",
            "1700000000",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn latest_and_vm_at_latest_pick_the_newest() {
        assert_eq!(resolve("latest").unwrap(), "db-20260305T000000Z-0005");
        assert_eq!(resolve("web@latest").unwrap(), "web-20260302T100000Z-0003");
        assert_eq!(
            resolve("qemu:web@latest").unwrap(),
            "web@qemu-20260303T100000Z-0004"
        );
        // By the UUID the backups recorded.
        assert_eq!(
            resolve("00000003-0000-4000-8000-000000000000@latest").unwrap(),
            "web-20260302T100000Z-0003"
        );
        assert_eq!(
            resolve("00000003-0000-4000-8000-000000000000@2026-03-01").unwrap(),
            "web-20260301T100000Z-0001"
        );
        assert!(resolve("nosuch@latest")
            .unwrap_err()
            .to_string()
            .contains("no backup of nosuch"));
        assert!(pick(&Selector::Latest, &[], &[]).is_err());
    }

    #[test]
    fn vm_at_a_time_is_the_newest_started_then_or_before() {
        assert_eq!(
            resolve("web@2026-03-01").unwrap(),
            "web-20260301T100000Z-0001"
        );
        assert_eq!(
            resolve("web@2026-03-02T09:59").unwrap(),
            "web-20260301T100000Z-0001"
        );
        assert_eq!(
            resolve("web@2026-03-02T10:00").unwrap(),
            "web-20260302T100000Z-0003"
        );
        assert_eq!(
            resolve("web@2026-03-02T10:00:00Z").unwrap(),
            "web-20260302T100000Z-0003"
        );
        assert_eq!(
            resolve("db@2027-01-01").unwrap(),
            "db-20260305T000000Z-0005"
        );
        let e = resolve("web@2026-02-28").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("no backup of web started at"), "{e}");
        assert_eq!(resolve("web@2026-13-01").unwrap_err().exit_code(), 2);
        assert_eq!(resolve("a/b@latest").unwrap_err().exit_code(), 2);
    }

    #[test]
    fn prefixes_must_be_unique_and_full_ids_are_taken_as_they_are() {
        assert_eq!(
            resolve("web-20260301T100000Z-0001").unwrap(),
            "web-20260301T100000Z-0001"
        );
        assert_eq!(resolve("web-202603-").unwrap_err().exit_code(), 2);
        assert_eq!(
            resolve("web-20260302").unwrap(),
            "web-20260302T100000Z-0003"
        );
        // A plain QEMU VM's id has an `@` that is no selector.
        assert_eq!(
            resolve("web@qemu").unwrap(),
            "web@qemu-20260303T100000Z-0004"
        );
        let e = resolve("web-2026").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let msg = e.to_string();
        assert!(
            msg.contains("ambiguous")
                && msg.contains("web-20260301T100000Z-0001")
                && msg.contains("web-20260302T100000Z-0003")
                && !msg.contains("db-"),
            "{msg}"
        );
        let e = resolve("nosuch").unwrap_err();
        assert_eq!(
            (e.exit_code(), e.to_string()),
            (2, "no backup nosuch".to_string())
        );
        assert_eq!(resolve("").unwrap_err().exit_code(), 2);
    }

    #[test]
    fn tags_are_short_safe_names() {
        for t in ["nightly", "pre-upgrade_2", "v1.2+x"] {
            assert_eq!(check_tag(t).unwrap(), t);
        }
        for t in [
            "",
            "a b",
            "../x",
            "-x",
            ".x",
            "a/b",
            "é",
            "a".repeat(65).as_str(),
        ] {
            assert_eq!(check_tag(t).unwrap_err().exit_code(), 2, "{t:?}");
        }
    }

    #[test]
    fn list_filters_combine_and_last_keeps_the_newest() {
        let mut all = repo();
        all[0].tags = vec!["nightly".into()];
        all[2].tags = vec!["nightly".into(), "keep".into()];
        all[2].schedule = Some("daily".into());
        let pinned: HashSet<String> = ["db-20260301T110000Z-0002".to_string()].into();
        let ids = |f: &ListFilter| -> Vec<String> {
            f.apply(all.clone(), &pinned)
                .into_iter()
                .map(|m| m.id)
                .collect()
        };
        let web = Some(VmFilter::parse("web").unwrap());
        assert_eq!(
            ids(&ListFilter {
                vm: web.clone(),
                ..Default::default()
            }),
            ["web-20260301T100000Z-0001", "web-20260302T100000Z-0003"]
        );
        assert_eq!(
            ids(&ListFilter {
                vm: web.clone(),
                last: Some(1),
                ..Default::default()
            }),
            ["web-20260302T100000Z-0003"]
        );
        assert_eq!(
            ids(&ListFilter {
                last: Some(0),
                ..Default::default()
            })
            .len(),
            0
        );
        assert_eq!(
            ids(&ListFilter {
                last: Some(99),
                ..Default::default()
            })
            .len(),
            5
        );
        let day = parse_time("2026-03-01").unwrap();
        assert_eq!(
            ids(&ListFilter {
                since: Some(day.first),
                until: Some(day.last),
                ..Default::default()
            }),
            ["web-20260301T100000Z-0001", "db-20260301T110000Z-0002"]
        );
        assert_eq!(
            ids(&ListFilter {
                since: Some(ts("2026-03-03T00:00:00Z")),
                ..Default::default()
            }),
            ["web@qemu-20260303T100000Z-0004", "db-20260305T000000Z-0005"]
        );
        assert_eq!(
            ids(&ListFilter {
                tags: vec!["nightly".into()],
                ..Default::default()
            }),
            ["web-20260301T100000Z-0001", "web-20260302T100000Z-0003"]
        );
        assert_eq!(
            ids(&ListFilter {
                tags: vec!["nightly".into(), "keep".into()],
                ..Default::default()
            }),
            ["web-20260302T100000Z-0003"]
        );
        assert_eq!(
            ids(&ListFilter {
                schedule: Some("daily".into()),
                ..Default::default()
            }),
            ["web-20260302T100000Z-0003"]
        );
        assert_eq!(
            ids(&ListFilter {
                pinned: true,
                ..Default::default()
            }),
            ["db-20260301T110000Z-0002"]
        );
        // `qemu:web` is not the libvirt domain `web`; a UUID finds the recorded one.
        assert_eq!(
            ids(&ListFilter {
                vm: Some(VmFilter::parse("qemu:web").unwrap()),
                ..Default::default()
            }),
            ["web@qemu-20260303T100000Z-0004"]
        );
        assert_eq!(
            ids(&ListFilter {
                vm: Some(VmFilter::parse("00000002-0000-4000-8000-000000000000").unwrap()),
                ..Default::default()
            }),
            ["db-20260301T110000Z-0002", "db-20260305T000000Z-0005"]
        );
    }
}
