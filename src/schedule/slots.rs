//! Slot capacity. A slot is counted in the UTC hour in which it starts, so that schedules in
//! different time zones share one count. Its load is the number of VMs of enabled schedules
//! whose occurrences start in that hour on the same day; a schedule may be added or edited only
//! if none of its occurrences in the coming year (the horizon; it covers every weekday, month
//! and DST shift) would push a slot over the capacity.

use std::collections::BTreeMap;

use jiff::Timestamp;

use super::Spec;

/// How far ahead capacity is checked.
pub const HORIZON_DAYS: i64 = 371;

/// VMs per UTC hour (seconds since the epoch / 3600).
pub type Loads = BTreeMap<i64, usize>;

fn horizon(from: Timestamp) -> Timestamp {
    Timestamp::from_second(from.as_second() + HORIZON_DAYS * 86_400).unwrap_or(Timestamp::MAX)
}

/// The hours in which `spec`'s slots start from `from` over the horizon.
fn slot_hours(spec: &Spec, from: Timestamp) -> Vec<i64> {
    // Slot starts are the same for every VM; one VM name is enough to enumerate them.
    let Some(vm) = spec.vms.first() else {
        return Vec::new();
    };
    // Occurrences are filtered by their start, which is within an hour after the slot's.
    let from = Timestamp::from_second(from.as_second() - 3600).unwrap_or(from);
    let mut hours: Vec<i64> = spec
        .occurrences(&vm.to_string(), from, horizon(from))
        .into_iter()
        .map(|o| o.slot_start.as_second().div_euclid(3600))
        .collect();
    hours.dedup();
    hours
}

/// The load every enabled schedule but `except` puts on each hour.
pub fn loads(specs: &[Spec], except: Option<&str>, from: Timestamp) -> Loads {
    let mut out = Loads::new();
    for s in specs
        .iter()
        .filter(|s| s.enabled && Some(s.name.as_str()) != except)
    {
        for h in slot_hours(s, from) {
            *out.entry(h).or_default() += s.vms.len();
        }
    }
    out
}

/// Where `spec` would overflow: the first hour and the load already there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overflow {
    pub hour_start: Timestamp,
    pub already: usize,
}

/// The first slot `spec` would overflow, if any.
pub fn overflow(spec: &Spec, loads: &Loads, capacity: usize, from: Timestamp) -> Option<Overflow> {
    slot_hours(spec, from).into_iter().find_map(|h| {
        let already = loads.get(&h).copied().unwrap_or(0);
        (already + spec.vms.len() > capacity).then(|| Overflow {
            hour_start: Timestamp::from_second(h * 3600).unwrap_or(Timestamp::MIN),
            already,
        })
    })
}

/// The highest load `spec`'s slots would reach with slot hour `hour`.
fn peak_with(spec: &Spec, hour: u8, loads: &Loads, from: Timestamp) -> usize {
    let mut s = spec.clone();
    s.hour = hour;
    slot_hours(&s, from)
        .into_iter()
        .map(|h| loads.get(&h).copied().unwrap_or(0) + s.vms.len())
        .max()
        .unwrap_or(0)
}

/// Up to `n` local slot hours, nearest to `spec.hour` first, in which `spec` fits.
pub fn nearest_with_room(
    spec: &Spec,
    loads: &Loads,
    capacity: usize,
    from: Timestamp,
    n: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    for delta in 1..=12i16 {
        for sign in [-1i16, 1] {
            if delta == 12 && sign == 1 {
                continue;
            }
            let h = (spec.hour as i16 + sign * delta).rem_euclid(24) as u8;
            if out.len() < n && peak_with(spec, h, loads, from) <= capacity {
                out.push(h);
            }
        }
    }
    out
}

/// `--slot auto`: the local hour whose peak load with `spec` is lowest (earliest on ties).
pub fn least_loaded(spec: &Spec, loads: &Loads, from: Timestamp) -> u8 {
    (0..24u8)
        .min_by_key(|h| (peak_with(spec, *h, loads, from), *h))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Recurrence;

    fn spec(name: &str, vms: &[&str], hour: u8, rec: Recurrence) -> Spec {
        Spec {
            name: name.into(),
            vms: vms.iter().map(|s| s.parse().unwrap()).collect(),
            recurrence: rec,
            start_date: "2027-01-01".into(),
            hour,
            tz: "Europe/Berlin".into(),
            retention: None,
            enabled: true,
            quiesce: "preferred".into(),
            boot_test: None,
        }
    }

    fn t0() -> Timestamp {
        "2027-01-01T00:00:00Z".parse().unwrap()
    }

    fn utc(mut s: Spec) -> Spec {
        s.tz = "UTC".into();
        s
    }

    #[test]
    fn a_full_slot_overflows_and_names_its_neighbours() {
        let a = utc(spec("a", &["v1", "v2"], 2, Recurrence::Daily));
        let b = utc(spec("b", &["v3"], 3, Recurrence::Daily));
        let all = vec![a, b];
        let l = loads(&all, None, t0());
        let c = utc(spec("c", &["v4"], 2, Recurrence::Daily));
        let o = overflow(&c, &l, 2, t0()).expect("slot 2 holds 2 already");
        assert_eq!(o.already, 2);
        assert_eq!(nearest_with_room(&c, &l, 2, t0(), 3), vec![1, 3, 0]);
        assert!(overflow(&c, &l, 3, t0()).is_none());
        // A disabled schedule takes no room.
        let mut all2 = all.clone();
        all2[0].enabled = false;
        assert!(overflow(&c, &loads(&all2, None, t0()), 2, t0()).is_none());
        // Editing a schedule does not count its old self.
        let a2 = utc(spec("a", &["v1", "v2"], 2, Recurrence::Daily));
        assert!(overflow(&a2, &loads(&all, Some("a"), t0()), 2, t0()).is_none());
    }

    #[test]
    fn on_the_spring_forward_night_two_local_slots_share_one_utc_hour() {
        // In Europe/Berlin 02:00 does not exist on 2027-03-28: that slot moves to 03:00 CEST,
        // the same instant as the 03:00 slot, and both count against one hour.
        let b = spec("b", &["v1"], 3, Recurrence::Daily);
        let l = loads(&[b], None, t0());
        let c = spec("c", &["v2"], 2, Recurrence::Daily);
        let o = overflow(&c, &l, 1, t0()).expect("they meet on the DST night");
        let local = o
            .hour_start
            .to_zoned(jiff::tz::TimeZone::get("Europe/Berlin").unwrap());
        assert_eq!(local.date(), jiff::civil::date(2027, 3, 28));
    }

    #[test]
    fn weekly_and_daily_collide_only_on_the_weekday() {
        let daily = spec("d", &["v1"], 4, Recurrence::Daily);
        let l = loads(&[daily], None, t0());
        let weekly = spec(
            "w",
            &["v2"],
            4,
            Recurrence::Weekly {
                weekday: "monday".into(),
            },
        );
        let o = overflow(&weekly, &l, 1, t0()).unwrap();
        let local = o
            .hour_start
            .to_zoned(jiff::tz::TimeZone::get("Europe/Berlin").unwrap());
        assert_eq!(local.weekday(), jiff::civil::Weekday::Monday);
        assert_eq!(local.hour(), 4);
    }

    #[test]
    fn time_zones_share_utc_hours() {
        let berlin = spec("b", &["v1"], 10, Recurrence::Daily);
        let mut london = spec("l", &["v2"], 9, Recurrence::Daily);
        london.tz = "Europe/London".into();
        let l = loads(&[berlin], None, t0());
        assert!(overflow(&london, &l, 1, t0()).is_some());
    }

    #[test]
    fn auto_picks_the_least_loaded_hour() {
        let all: Vec<Spec> = (0..24u8)
            .filter(|h| *h != 5)
            .map(|h| spec(&format!("s{h}"), &["x"], h, Recurrence::Daily))
            .collect();
        let l = loads(&all, None, t0());
        let c = spec("c", &["y"], 0, Recurrence::Daily);
        assert_eq!(least_loaded(&c, &l, t0()), 5);
    }
}
