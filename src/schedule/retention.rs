//! Which backups a retention rule removes. Pure: the caller lists one schedule's successful
//! backups of one VM (failed backups are never published, so they never count).
//!
//! - `Count(n)`: the newest `n` unpinned backups stay, older unpinned ones go;
//! - `Days(d)`: unpinned backups that started more than `d` days before now go;
//! - either way the newest backup stays, pinned backups stay and do not count.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Retention {
    /// Keep this many backups.
    Count { keep: u32 },
    /// Keep backups younger than this many days.
    Days { days: u32 },
}

impl Retention {
    pub fn describe(&self) -> String {
        match self {
            Retention::Count { keep } => format!("keep the newest {keep}"),
            Retention::Days { days } => format!("keep {days} days"),
        }
    }
}

/// One backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub id: String,
    pub time: Timestamp,
    pub pinned: bool,
}

/// The ids to delete, oldest first.
pub fn to_delete(backups: &[Kept], rule: Retention, now: Timestamp) -> Vec<String> {
    let mut sorted: Vec<&Kept> = backups.iter().collect();
    // Newest first; ties broken by id so that the answer is stable.
    sorted.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
    let newest = sorted.first().map(|k| k.id.clone());
    let mut gone: Vec<&Kept> = Vec::new();
    match rule {
        Retention::Count { keep } => {
            let keep = keep.max(1) as usize;
            gone.extend(sorted.iter().filter(|k| !k.pinned).skip(keep).copied());
        }
        Retention::Days { days } => {
            let limit = now.as_second() - i64::from(days) * 86_400;
            gone.extend(
                sorted
                    .iter()
                    .filter(|k| !k.pinned && k.time.as_second() < limit)
                    .copied(),
            );
        }
    }
    gone.retain(|k| Some(&k.id) != newest.as_ref());
    gone.reverse();
    gone.into_iter().map(|k| k.id.clone()).collect()
}

/// The ids that every one of `rules` deletes, oldest first: a backup stays when any rule
/// keeps it (`prune --keep N --keep-days D` keeps the newest N and all younger than D days).
/// No rule deletes nothing.
pub fn to_delete_all(backups: &[Kept], rules: &[Retention], now: Timestamp) -> Vec<String> {
    let Some((first, rest)) = rules.split_first() else {
        return Vec::new();
    };
    let mut gone = to_delete(backups, *first, now);
    for rule in rest {
        let also = to_delete(backups, *rule, now);
        gone.retain(|id| also.contains(id));
    }
    gone
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: &str, day: i64, pinned: bool) -> Kept {
        Kept {
            id: id.into(),
            time: Timestamp::from_second(1_800_000_000 + day * 86_400).unwrap(),
            pinned,
        }
    }

    fn now(day: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + day * 86_400).unwrap()
    }

    #[test]
    fn count_keeps_the_newest_n_and_deletes_oldest_first() {
        let all: Vec<Kept> = (0..6).map(|d| b(&format!("b{d}"), d, false)).collect();
        assert_eq!(
            to_delete(&all, Retention::Count { keep: 3 }, now(6)),
            vec!["b0", "b1", "b2"]
        );
        assert!(to_delete(&all, Retention::Count { keep: 6 }, now(6)).is_empty());
        // keep 0 still keeps the last good one.
        assert_eq!(
            to_delete(&all, Retention::Count { keep: 0 }, now(6)).len(),
            5
        );
    }

    #[test]
    fn pinned_backups_neither_go_nor_count() {
        let all = vec![
            b("b0", 0, true),
            b("b1", 1, false),
            b("b2", 2, false),
            b("b3", 3, true),
            b("b4", 4, false),
        ];
        assert_eq!(
            to_delete(&all, Retention::Count { keep: 2 }, now(5)),
            vec!["b1"]
        );
    }

    #[test]
    fn with_two_rules_a_backup_goes_only_when_both_let_it_go() {
        let all: Vec<Kept> = (0..6).map(|d| b(&format!("b{d}"), d, d == 0)).collect();
        let count = Retention::Count { keep: 1 };
        let days = Retention::Days { days: 3 };
        // Count alone: b1..b4 (b0 pinned); days alone: b1, b2 (older than day 3 at day 6).
        assert_eq!(
            to_delete_all(&all, &[count, days], now(6)),
            vec!["b1", "b2"]
        );
        assert_eq!(
            to_delete_all(&all, &[count], now(6)),
            to_delete(&all, count, now(6))
        );
        assert!(to_delete_all(&all, &[], now(6)).is_empty());
    }

    #[test]
    fn period_removes_old_ones_but_never_the_newest() {
        let all = vec![b("b0", 0, false), b("b1", 5, false), b("b2", 9, false)];
        assert_eq!(
            to_delete(&all, Retention::Days { days: 7 }, now(10)),
            vec!["b0"]
        );
        // Everything is old: the newest stays anyway.
        assert_eq!(
            to_delete(&all, Retention::Days { days: 7 }, now(100)),
            vec!["b0", "b1"]
        );
        assert!(to_delete(&[], Retention::Days { days: 1 }, now(1)).is_empty());
    }
}
