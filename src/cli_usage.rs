//! `vmbackup usage`: what the backups take, per VM and in all (`repository::usage`).

use jiff::Timestamp;

use vmbackup::config::Config;
use vmbackup::error::exit;
use vmbackup::unlock::open_repo;
use vmbackup::Error;

use crate::{human_bytes, Output};

/// `2027-01-31` (midnight UTC) or an RFC 3339 time.
fn parse_time(flag: &str, s: &str) -> Result<Timestamp, Error> {
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    s.parse::<jiff::civil::Date>()
        .ok()
        .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC).ok())
        .map(|z| z.timestamp())
        .ok_or_else(|| {
            Error::Invalid(format!(
                "bad {flag} {s:?}: a date (2027-01-31, midnight UTC) or an RFC 3339 time"
            ))
        })
}

/// The first of `now`'s month, 00:00 UTC.
fn month_start(now: Timestamp) -> Timestamp {
    let d = now
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date()
        .first_of_month();
    d.to_zoned(jiff::tz::TimeZone::UTC)
        .map(|z| z.timestamp())
        .unwrap_or(now)
}

pub fn cmd_usage(
    cfg: &Config,
    vm: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
) -> anyhow::Result<Output> {
    let now = Timestamp::now();
    let now = now.round(jiff::Unit::Second).unwrap_or(now);
    let to = match to {
        Some(s) => parse_time("--to", s)?,
        None => now,
    };
    let from = match from {
        Some(s) => parse_time("--from", s)?,
        None => month_start(to),
    };
    if from >= to {
        return Err(Error::Invalid(format!("--from {from} is not before --to {to}")).into());
    }
    let repo = open_repo(cfg)?;
    let mut u = repo.usage(from, to, now).map_err(Error::from)?;
    if let Some(name) = vm {
        if !u.vms.iter().any(|v| v.vm == name) {
            return Err(
                Error::Invalid(format!("the repository has no backup of VM {name:?}")).into(),
            );
        }
        u.vms.retain(|v| v.vm == name);
    }
    let mut text = format!("GiB-hours from {} to {}\n", u.from, u.to);
    let mut t = vmbackup::render::Table::new(&[
        "VM",
        "BACKUPS",
        "NEWEST (UTC)",
        "DISKS",
        "DATA",
        "EXCLUSIVE",
        "SHARED",
        "ADDED 30D",
        "GiB-HOURS",
    ])
    .right(&[
        "BACKUPS",
        "DISKS",
        "DATA",
        "EXCLUSIVE",
        "SHARED",
        "ADDED 30D",
        "GiB-HOURS",
    ]);
    for v in &u.vms {
        t.row([
            v.vm.clone(),
            v.backups.to_string(),
            v.newest_at.clone().unwrap_or_else(|| "-".into()),
            human_bytes(v.newest_disk_bytes),
            human_bytes(v.newest_logical_bytes),
            human_bytes(v.exclusive_bytes),
            human_bytes(v.shared_bytes),
            human_bytes(v.added_30d_bytes),
            format!("{:.1}", v.gib_hours),
        ]);
    }
    text.push_str(&t.render());
    let r = &u.repository;
    text.push_str(&format!(
        "repository: {} backups of {} VMs; {} chunks, {} stored ({} used by no backup: gc frees it); \
         deduplication {:.2}x, compression {:.2}x{}\n",
        r.backups,
        r.vms,
        r.chunks,
        human_bytes(r.stored_bytes),
        human_bytes(r.unreferenced_bytes),
        r.dedup_ratio,
        r.compression_ratio,
        r.free_bytes
            .map(|f| format!("; {} free", human_bytes(f)))
            .unwrap_or_default()
    ));
    for id in &u.unreadable {
        text.push_str(&format!("not counted (cannot be read): {id}\n"));
    }
    Ok(Output {
        json: crate::body(vmbackup::contract::UsageBody { usage: u }),
        text,
        code: exit::OK,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_the_default_period() {
        let t = |s: &str| s.parse::<Timestamp>().unwrap();
        assert_eq!(
            parse_time("--from", "2027-01-31").unwrap(),
            t("2027-01-31T00:00:00Z")
        );
        assert_eq!(
            parse_time("--to", "2027-01-31T12:00:00+02:00").unwrap(),
            t("2027-01-31T10:00:00Z")
        );
        assert!(matches!(parse_time("--to", "soon"), Err(Error::Invalid(_))));
        assert_eq!(
            month_start(t("2027-02-17T13:14:15Z")),
            t("2027-02-01T00:00:00Z")
        );
    }
}
