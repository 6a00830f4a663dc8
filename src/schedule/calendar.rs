//! When a schedule's occurrences fall: the local dates a recurrence names, and the instant in
//! UTC at which each VM's backup of that date starts.
//!
//! Rules for dates that do not exist (README, "Calendar rules"):
//! - `monthly --day 29|30|31` in a month without that day runs on the month's last day;
//! - an ordinal weekday a month does not have (the fifth Monday of most months) is skipped in
//!   that month (`--week last` always exists);
//! - a slot start inside a DST gap moves forward by the length of the gap (02:30 on the
//!   spring-forward night in Europe/Berlin runs at 03:30 CEST);
//! - a slot start inside a DST fold runs once, at its first (earlier) instance.

use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

/// How often a schedule recurs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Recurrence {
    /// Once, on `date` (local date in the schedule's time zone).
    Once {
        date: String,
    },
    Daily,
    /// Every week on `weekday` (`monday` ... `sunday`).
    Weekly {
        weekday: String,
    },
    /// Every month on day `day` (1-31).
    MonthlyDay {
        day: u8,
    },
    /// Every month on the `nth` `weekday` (`nth` 1-5, or -1 for the last).
    MonthlyWeekday {
        nth: i8,
        weekday: String,
    },
}

/// Parses `monday`, `mon`, `Mon` ... into a weekday.
pub fn parse_weekday(s: &str) -> Option<Weekday> {
    let s = s.to_ascii_lowercase();
    let all = [
        ("monday", Weekday::Monday),
        ("tuesday", Weekday::Tuesday),
        ("wednesday", Weekday::Wednesday),
        ("thursday", Weekday::Thursday),
        ("friday", Weekday::Friday),
        ("saturday", Weekday::Saturday),
        ("sunday", Weekday::Sunday),
    ];
    all.iter()
        .find(|(name, _)| s.len() >= 3 && name.starts_with(&s))
        .map(|(_, w)| *w)
}

pub fn weekday_name(w: Weekday) -> &'static str {
    match w {
        Weekday::Monday => "monday",
        Weekday::Tuesday => "tuesday",
        Weekday::Wednesday => "wednesday",
        Weekday::Thursday => "thursday",
        Weekday::Friday => "friday",
        Weekday::Saturday => "saturday",
        Weekday::Sunday => "sunday",
    }
}

/// `first` ... `fifth`, `last` (or 1-5, -1) into an ordinal.
pub fn parse_ordinal(s: &str) -> Option<i8> {
    match s.to_ascii_lowercase().as_str() {
        "first" | "1" | "1st" => Some(1),
        "second" | "2" | "2nd" => Some(2),
        "third" | "3" | "3rd" => Some(3),
        "fourth" | "4" | "4th" => Some(4),
        "fifth" | "5" | "5th" => Some(5),
        "last" | "-1" => Some(-1),
        _ => None,
    }
}

pub fn ordinal_name(n: i8) -> &'static str {
    match n {
        1 => "first",
        2 => "second",
        3 => "third",
        4 => "fourth",
        5 => "fifth",
        -1 => "last",
        _ => "?",
    }
}

impl Recurrence {
    /// Checks the fields a user typed; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Recurrence::Once { date } => date
                .parse::<Date>()
                .map(|_| ())
                .map_err(|e| format!("bad date {date:?}: {e}")),
            Recurrence::Daily => Ok(()),
            Recurrence::Weekly { weekday } => parse_weekday(weekday)
                .map(|_| ())
                .ok_or_else(|| format!("bad weekday {weekday:?}")),
            Recurrence::MonthlyDay { day } => {
                if (1..=31).contains(day) {
                    Ok(())
                } else {
                    Err(format!("day of month {day} is not between 1 and 31"))
                }
            }
            Recurrence::MonthlyWeekday { nth, weekday } => {
                if !matches!(nth, 1..=5 | -1) {
                    return Err(format!("ordinal {nth} is not 1-5 or last"));
                }
                parse_weekday(weekday)
                    .map(|_| ())
                    .ok_or_else(|| format!("bad weekday {weekday:?}"))
            }
        }
    }

    /// A short description: `daily`, `weekly on monday`, `monthly on the third monday`.
    pub fn describe(&self) -> String {
        match self {
            Recurrence::Once { date } => format!("once on {date}"),
            Recurrence::Daily => "daily".into(),
            Recurrence::Weekly { weekday } => format!("weekly on {weekday}"),
            Recurrence::MonthlyDay { day } => format!("monthly on day {day}"),
            Recurrence::MonthlyWeekday { nth, weekday } => {
                format!("monthly on the {} {weekday}", ordinal_name(*nth))
            }
        }
    }

    /// The local dates in `[from, to]` (inclusive) on which this recurrence runs.
    pub fn dates(&self, from: Date, to: Date) -> Vec<Date> {
        let mut out = Vec::new();
        if from > to {
            return out;
        }
        match self {
            Recurrence::Once { date } => {
                if let Ok(d) = date.parse::<Date>() {
                    if d >= from && d <= to {
                        out.push(d);
                    }
                }
            }
            Recurrence::Daily | Recurrence::Weekly { .. } => {
                let want = match self {
                    Recurrence::Weekly { weekday } => parse_weekday(weekday),
                    _ => None,
                };
                let mut d = from;
                while d <= to {
                    if want.is_none_or(|w| d.weekday() == w) {
                        out.push(d);
                    }
                    match d.tomorrow() {
                        Ok(n) => d = n,
                        Err(_) => break,
                    }
                }
            }
            Recurrence::MonthlyDay { .. } | Recurrence::MonthlyWeekday { .. } => {
                let mut month = from.first_of_month();
                while month <= to {
                    if let Some(d) = self.day_in_month(month) {
                        if d >= from && d <= to {
                            out.push(d);
                        }
                    }
                    match month.checked_add(1.month()) {
                        Ok(n) => month = n,
                        Err(_) => break,
                    }
                }
            }
        }
        out
    }

    /// The day a monthly recurrence runs in the month of `month` (its first day), or `None`
    /// when it skips that month.
    fn day_in_month(&self, month: Date) -> Option<Date> {
        match self {
            Recurrence::MonthlyDay { day } => {
                let last = month.days_in_month();
                let d = (*day as i8).min(last);
                Date::new(month.year(), month.month(), d).ok()
            }
            Recurrence::MonthlyWeekday { nth, weekday } => {
                let w = parse_weekday(weekday)?;
                month.nth_weekday_of_month(*nth, w).ok()
            }
            _ => None,
        }
    }
}

/// The instant the one-hour slot starting at `hour`:00 local time on `date` begins. In a DST
/// gap it moves forward by the gap; in a fold it is the earlier instance.
pub fn slot_start(date: Date, hour: u8, tz: &TimeZone) -> Option<Timestamp> {
    let dt = date.at(hour as i8, 0, 0, 0);
    tz.to_ambiguous_zoned(dt)
        .compatible()
        .ok()
        .map(|z| z.timestamp())
}

/// A stable offset, in seconds, of VM `vm`'s start inside any slot: the same for the same
/// name on every host and every run, spread over the slot's first 55 minutes (never its last
/// 5).
pub fn vm_offset_secs(vm: &str) -> i64 {
    let d = crate::repository::chunk::digest(vm.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(b) % (55 * 60)) as i64
}

/// The latest instant inside a slot at which a backup may start.
pub const SLOT_START_WINDOW_SECS: i64 = 55 * 60;

/// One occurrence: the local date it belongs to, and when VM's backup starts (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occurrence {
    pub date: Date,
    pub slot_start: Timestamp,
    pub at: Timestamp,
}

/// VM `vm`'s occurrences of (`rec`, `start_date`, `hour`, `tz`) whose start lies in
/// `[from, to]`.
pub fn occurrences(
    rec: &Recurrence,
    start_date: Date,
    hour: u8,
    tz: &TimeZone,
    vm: &str,
    from: Timestamp,
    to: Timestamp,
) -> Vec<Occurrence> {
    let offset = vm_offset_secs(vm);
    // Local dates around the window: a slot may start up to a day apart from UTC.
    let lo = from
        .to_zoned(tz.clone())
        .date()
        .yesterday()
        .unwrap_or(Date::MIN);
    let hi = to
        .to_zoned(tz.clone())
        .date()
        .tomorrow()
        .unwrap_or(Date::MAX);
    let lo = lo.max(start_date);
    rec.dates(lo, hi)
        .into_iter()
        .filter_map(|date| {
            let s = slot_start(date, hour, tz)?;
            let at = s.checked_add(offset.seconds()).ok()?;
            Some(Occurrence {
                date,
                slot_start: s,
                at,
            })
        })
        .filter(|o| o.at >= from && o.at <= to)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn tz(name: &str) -> TimeZone {
        TimeZone::get(name).expect("tzdata is installed (scripts/setup-host)")
    }

    fn utc(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn third_monday_over_two_years() {
        let r = Recurrence::MonthlyWeekday {
            nth: 3,
            weekday: "monday".into(),
        };
        let ds = r.dates(date(2027, 1, 1), date(2028, 12, 31));
        assert_eq!(ds.len(), 24);
        for d in &ds {
            assert_eq!(d.weekday(), Weekday::Monday);
            assert!((15..=21).contains(&d.day()), "{d}");
        }
        assert_eq!(ds[0], date(2027, 1, 18));
        assert_eq!(ds[1], date(2027, 2, 15));
        assert_eq!(ds[23], date(2028, 12, 18));
    }

    #[test]
    fn last_friday_over_two_years() {
        let r = Recurrence::MonthlyWeekday {
            nth: -1,
            weekday: "fri".into(),
        };
        let ds = r.dates(date(2027, 1, 1), date(2028, 12, 31));
        assert_eq!(ds.len(), 24);
        for d in &ds {
            assert_eq!(d.weekday(), Weekday::Friday);
            // The last one: a week later is in the next month.
            assert_ne!(d.checked_add(7.days()).unwrap().month(), d.month(), "{d}");
        }
        assert_eq!(ds[0], date(2027, 1, 29));
        assert_eq!(ds[1], date(2027, 2, 26));
        assert_eq!(ds[13], date(2028, 2, 25));
    }

    #[test]
    fn the_31st_in_short_months_is_the_last_day() {
        let r = Recurrence::MonthlyDay { day: 31 };
        let ds = r.dates(date(2027, 1, 1), date(2028, 12, 31));
        assert_eq!(ds.len(), 24);
        for d in &ds {
            assert_eq!(d.day(), d.days_in_month(), "{d}");
        }
        assert!(ds.contains(&date(2027, 2, 28)));
        assert!(ds.contains(&date(2028, 2, 29)));
        assert!(ds.contains(&date(2027, 4, 30)));
        assert!(ds.contains(&date(2027, 1, 31)));
        let r = Recurrence::MonthlyDay { day: 30 };
        let ds = r.dates(date(2027, 2, 1), date(2027, 3, 31));
        assert_eq!(ds, vec![date(2027, 2, 28), date(2027, 3, 30)]);
    }

    #[test]
    fn a_fifth_monday_runs_only_in_months_that_have_one() {
        let r = Recurrence::MonthlyWeekday {
            nth: 5,
            weekday: "monday".into(),
        };
        let ds = r.dates(date(2027, 1, 1), date(2027, 12, 31));
        // 2027: Mondays 29 Mar, 31 May, 30 Aug, 29 Nov.
        assert_eq!(
            ds,
            vec![
                date(2027, 3, 29),
                date(2027, 5, 31),
                date(2027, 8, 30),
                date(2027, 11, 29)
            ]
        );
    }

    #[test]
    fn weekly_daily_and_once() {
        let w = Recurrence::Weekly {
            weekday: "Wed".into(),
        };
        assert_eq!(
            w.dates(date(2026, 11, 23), date(2026, 12, 6)),
            vec![date(2026, 11, 25), date(2026, 12, 2)]
        );
        assert_eq!(
            Recurrence::Daily
                .dates(date(2026, 12, 30), date(2027, 1, 2))
                .len(),
            4
        );
        let o = Recurrence::Once {
            date: "2027-01-05".into(),
        };
        assert_eq!(
            o.dates(date(2027, 1, 1), date(2027, 1, 31)),
            vec![date(2027, 1, 5)]
        );
        assert!(o.dates(date(2027, 2, 1), date(2027, 2, 28)).is_empty());
    }

    #[test]
    fn dst_gap_moves_forward_by_the_gap() {
        // Europe/Berlin springs forward on 2027-03-28 at 02:00 CET to 03:00 CEST.
        let s = slot_start(date(2027, 3, 28), 2, &tz("Europe/Berlin")).unwrap();
        assert_eq!(s, utc("2027-03-28T01:00:00Z"));
        // The day before, 02:00 CET is 01:00 UTC as well; the day after 02:00 CEST is 00:00.
        assert_eq!(
            slot_start(date(2027, 3, 29), 2, &tz("Europe/Berlin")).unwrap(),
            utc("2027-03-29T00:00:00Z")
        );
        // America/New_York springs forward on 2027-03-14 at 02:00 EST to 03:00 EDT.
        let s = slot_start(date(2027, 3, 14), 2, &tz("America/New_York")).unwrap();
        assert_eq!(s, utc("2027-03-14T07:00:00Z"));
        assert_eq!(
            s.to_zoned(tz("America/New_York")).time(),
            jiff::civil::time(3, 0, 0, 0)
        );
    }

    #[test]
    fn dst_fold_runs_once() {
        let r = Recurrence::Daily;
        for (name, day, first) in [
            ("Europe/Berlin", date(2027, 10, 31), "2027-10-31T00:00:00Z"),
            (
                "America/New_York",
                date(2027, 11, 7),
                "2027-11-07T05:00:00Z",
            ),
        ] {
            let z = tz(name);
            let hour = if name == "Europe/Berlin" { 2 } else { 1 };
            assert_eq!(slot_start(day, hour, &z).unwrap(), utc(first));
            let from = utc(first).checked_sub(6.hours()).unwrap();
            let to = utc(first).checked_add(6.hours()).unwrap();
            let occ = occurrences(&r, date(2027, 1, 1), hour, &z, "vm1", from, to);
            assert_eq!(occ.len(), 1, "{name}: {occ:?}");
            assert_eq!(occ[0].date, day);
        }
    }

    #[test]
    fn slot_offsets_are_stable_and_inside_the_slot_but_not_its_last_5_minutes() {
        let names: Vec<String> = (0..500).map(|i| format!("vm-{i}")).collect();
        let mut distinct = std::collections::HashSet::new();
        for n in &names {
            let o = vm_offset_secs(n);
            assert_eq!(o, vm_offset_secs(n));
            assert!((0..55 * 60).contains(&o), "{n}: {o}");
            distinct.insert(o / 60);
        }
        // They spread over the slot.
        assert!(distinct.len() > 40, "{}", distinct.len());
        // Fixed on every host and release.
        assert_eq!(vm_offset_secs("web01"), vm_offset_secs("web01"));
        let z = tz("Europe/Berlin");
        let from = utc("2027-01-01T00:00:00Z");
        let to = utc("2027-12-31T23:59:59Z");
        for n in names.iter().take(20) {
            for o in occurrences(&Recurrence::Daily, date(2027, 1, 1), 2, &z, n, from, to) {
                let into = o.at.as_second() - o.slot_start.as_second();
                assert!((0..55 * 60).contains(&into));
            }
        }
    }

    #[test]
    fn start_date_and_window_bound_the_occurrences() {
        let z = tz("UTC");
        let occ = occurrences(
            &Recurrence::Daily,
            date(2027, 1, 3),
            4,
            &z,
            "a",
            utc("2027-01-01T00:00:00Z"),
            utc("2027-01-06T00:00:00Z"),
        );
        let days: Vec<i8> = occ.iter().map(|o| o.date.day()).collect();
        assert_eq!(days, vec![3, 4, 5]);
        for o in occ {
            assert_eq!(o.slot_start.to_zoned(z.clone()).hour(), 4);
        }
    }

    #[test]
    fn parsing() {
        assert_eq!(parse_weekday("MON"), Some(Weekday::Monday));
        assert_eq!(parse_weekday("mo"), None);
        assert_eq!(parse_ordinal("third"), Some(3));
        assert_eq!(parse_ordinal("last"), Some(-1));
        assert!(Recurrence::MonthlyDay { day: 32 }.validate().is_err());
        assert!(Recurrence::MonthlyWeekday {
            nth: 6,
            weekday: "mon".into()
        }
        .validate()
        .is_err());
    }
}
