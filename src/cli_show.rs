//! The text of `show` and `schedule show`: aligned key/value lines and tables of disks and
//! network interfaces, for people (`--json` has everything, for programs).

use vmbackup::render::{duration, key_values, Table};
use vmbackup::repository::manifest::Manifest;

use crate::human_bytes;

/// A backup: what, when, how consistent, its disks and NICs, and what else it holds.
pub fn manifest_text(m: &Manifest, state: &[String], boot_test: &str) -> String {
    let took = match (
        m.started_at.parse::<jiff::Timestamp>(),
        m.ended_at.parse::<jiff::Timestamp>(),
    ) {
        (Ok(a), Ok(b)) => std::time::Duration::try_from(b.duration_since(a))
            .map(|d| format!(" ({})", duration(d)))
            .unwrap_or_default(),
        _ => String::new(),
    };
    let mut consistency = m.consistency.clone();
    if let Some(ms) = m.freeze_ms {
        consistency.push_str(&format!(", frozen {ms} ms"));
    }
    if let Some(r) = &m.consistency_reason {
        consistency.push_str(&format!(" ({r})"));
    }
    let mut pairs = vec![
        ("backup", m.id.clone()),
        ("vm", format!("{} ({})", m.vm_name, m.vm_uuid)),
        ("started", format!("{} UTC", m.started_at)),
        ("ended", format!("{} UTC{took}", m.ended_at)),
        ("consistency", consistency),
        (
            "machine",
            format!("{} vCPUs, {} memory", m.vcpus, human_bytes(m.memory_bytes)),
        ),
        (
            "size",
            format!(
                "{} of data, {} stored",
                human_bytes(m.logical_bytes),
                human_bytes(m.stored_bytes)
            ),
        ),
    ];
    if let Some(s) = &m.schedule {
        let when = m
            .scheduled_for
            .as_deref()
            .map(|t| format!(" (for {t})"))
            .unwrap_or_default();
        pairs.push(("schedule", format!("{s}{when}")));
    }
    if !state.is_empty() {
        pairs.push(("vm state", state.join("\n")));
    }
    pairs.push(("last boot test", boot_test.to_string()));
    let mut text = key_values(&pairs);
    let mut disks = Table::new(&["DISK", "FORMAT", "SIZE", "DATA", "STORED", "READ", "SOURCE"])
        .right(&["SIZE", "DATA", "STORED"]);
    for d in &m.disks {
        let read = d
            .read
            .as_ref()
            .map(|r| {
                let mut w = format!("{} ({})", r.mode, human_bytes(r.bytes_read));
                if let Some(why) = &r.full_reason {
                    w.push_str(&format!(": {why}"));
                }
                w
            })
            .unwrap_or_else(|| "-".into());
        disks.row([
            d.target.clone(),
            d.format.clone(),
            human_bytes(d.virtual_size),
            human_bytes(d.logical_bytes),
            human_bytes(d.stored_bytes),
            read,
            d.source.clone(),
        ]);
    }
    text.push('\n');
    text.push_str(&disks.render());
    if !m.nics.is_empty() {
        let mut nics = Table::new(&["NIC", "MAC", "MODEL", "TYPE", "NETWORK", "ADDRESSES"]);
        for (i, n) in m.nics.iter().enumerate() {
            let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
            nics.row([
                i.to_string(),
                dash(&n.mac),
                dash(&n.model),
                n.kind.clone(),
                dash(&n.source),
                if n.ips.is_empty() {
                    "-".into()
                } else {
                    n.ips.join(" ")
                },
            ]);
        }
        text.push('\n');
        text.push_str(&nics.render());
    }
    text
}

/// A schedule: aligned keys, the VMs one a line. `next`: its next run, if enabled.
pub fn schedule_text(spec: &vmbackup::schedule::Spec, next: Option<jiff::Timestamp>) -> String {
    let vms: Vec<String> = spec.vms.iter().map(|v| v.to_string()).collect();
    key_values(&[
        ("schedule", spec.name.clone()),
        (
            "state",
            if spec.enabled { "enabled" } else { "disabled" }.to_string(),
        ),
        ("runs", spec.recurrence.describe()),
        ("slot", spec.slot_label()),
        ("starts", spec.start_date.clone()),
        (
            "next run",
            next.map_or_else(
                || "-".into(),
                |t| format!("{} UTC", t.strftime("%Y-%m-%d %H:%M")),
            ),
        ),
        ("quiesce", spec.quiesce.clone()),
        (
            "retention",
            spec.retention
                .map_or_else(|| "keep all".into(), |r| r.describe()),
        ),
        (
            "boot test",
            spec.boot_test
                .as_ref()
                .map_or_else(|| "no".into(), |b| b.describe()),
        ),
        ("vms", vms.join("\n")),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_schedule_in_words() {
        let spec: vmbackup::schedule::Spec = serde_json::from_value(json!({
            "name": "nightly", "vms": ["web", "qemu:db"],
            "recurrence": {"type": "daily"}, "start_date": "2026-01-01", "hour": 2,
            "tz": "UTC", "retention": {"by": "days", "days": 7}, "enabled": true,
            "quiesce": "preferred",
        }))
        .unwrap();
        let next = "2026-01-02T02:00:00Z".parse().ok();
        let text = schedule_text(&spec, next);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "schedule:  nightly", "{text}");
        assert_eq!(lines[1], "state:     enabled", "{text}");
        assert!(text.contains("next run:  2026-01-02 02:00 UTC\n"), "{text}");
        assert!(text.contains("retention: keep 7 days\n"), "{text}");
        assert!(text.contains("boot test: no\n"), "{text}");
        assert!(
            text.ends_with("vms:       web\n           qemu:db\n"),
            "{text}"
        );
    }
}
