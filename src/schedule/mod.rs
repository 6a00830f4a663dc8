//! Schedules: what to back up, when (a recurrence, a start date and a one-hour slot in a named
//! time zone), what to keep; slot capacity; and `run-due`, which the external timer calls.

pub mod calendar;
pub mod report;
pub mod retention;
pub mod run;
pub mod slots;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

pub use calendar::{Occurrence, Recurrence};

use crate::settings::Quiesce;
use crate::vm_ref::VmRef;

/// Why a schedule cannot be placed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ScheduleError {
    /// Its slot has no room (a refusal).
    #[error("{0}")]
    SlotFull(String),
    #[error("{0}")]
    Invalid(String),
}
pub use retention::Retention;

/// One schedule as stored (JSON in the state database).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Spec {
    pub name: String,
    pub vms: Vec<VmRef>,
    pub recurrence: Recurrence,
    /// First local date the schedule may run (`YYYY-MM-DD`).
    pub start_date: String,
    /// The slot: `hour`:00 to `hour+1`:00 local time.
    pub hour: u8,
    /// IANA time zone name.
    pub tz: String,
    pub retention: Option<Retention>,
    pub enabled: bool,
    /// `required`, `preferred` or `off`.
    pub quiesce: String,
    /// Boot-test the new backup after every N-th successful backup of each VM (schedules
    /// stored before this field existed have none).
    #[serde(default)]
    pub boot_test: Option<BootTestRule>,
}

/// When and how a schedule boot-tests its backups (`vmbackup boot-test`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BootTestRule {
    /// After every `every`-th successful backup of a VM (1: after each).
    pub every: u32,
    /// Seconds the guest agent has to answer (and the command to end).
    pub timeout_secs: u64,
    /// Run in the guest by `/bin/sh -c`; it must exit 0.
    #[serde(default)]
    pub command: Option<String>,
}

impl BootTestRule {
    /// The default timeout, as `vmbackup boot-test`'s.
    pub const TIMEOUT_SECS: u64 = 300;

    /// `boot test after each backup`, `boot test after every 3 backups`.
    pub fn describe(&self) -> String {
        match self.every {
            1 => "boot test after each backup".into(),
            n => format!("boot test after every {n} backups"),
        }
    }
}

impl Spec {
    /// Checks every field; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        crate::names::check_component(&self.name).map_err(|e| e.to_string())?;
        if self.vms.is_empty() {
            return Err("a schedule needs at least one VM (--vm)".into());
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(d) = self.vms.iter().find(|v| !seen.insert(*v)) {
            return Err(format!("VM {d:?} is named twice"));
        }
        self.recurrence.validate()?;
        self.start()?;
        if self.hour > 23 {
            return Err(format!("slot hour {} is not between 0 and 23", self.hour));
        }
        self.zone()?;
        if Quiesce::parse(&self.quiesce).is_none() {
            return Err(format!("bad quiesce {:?}", self.quiesce));
        }
        if let Some(Retention::Count { keep: 0 }) = self.retention {
            return Err("--keep must be at least 1".into());
        }
        if let Some(Retention::Days { days: 0 }) = self.retention {
            return Err("--keep-days must be at least 1".into());
        }
        if let Some(b) = &self.boot_test {
            if b.every == 0 {
                return Err("--boot-test-every must be at least 1".into());
            }
            if b.timeout_secs == 0 {
                return Err("--boot-test-timeout must be at least 1".into());
            }
            if b.command.as_deref().is_some_and(|c| c.trim().is_empty()) {
                return Err("--boot-test-command is empty".into());
            }
            if let Some(v) = self.vms.iter().find(|v| v.is_qemu()) {
                return Err(format!(
                    "{v} is a plain QEMU VM: its backups have no domain XML to boot, so a \
                     schedule with it cannot boot-test (make a separate schedule for it)"
                ));
            }
        }
        Ok(())
    }

    pub fn start(&self) -> Result<Date, String> {
        self.start_date
            .parse::<Date>()
            .map_err(|e| format!("bad start date {:?}: {e}", self.start_date))
    }

    pub fn zone(&self) -> Result<TimeZone, String> {
        TimeZone::get(&self.tz).map_err(|e| format!("unknown time zone {:?}: {e}", self.tz))
    }

    /// `02:00-03:00 Europe/Berlin`.
    pub fn slot_label(&self) -> String {
        slot_label(self.hour, &self.tz)
    }

    /// Occurrences of VM `vm` starting in `[from, to]`.
    pub fn occurrences(&self, vm: &str, from: Timestamp, to: Timestamp) -> Vec<Occurrence> {
        let (Ok(start), Ok(tz)) = (self.start(), self.zone()) else {
            return Vec::new();
        };
        calendar::occurrences(&self.recurrence, start, self.hour, &tz, vm, from, to)
    }

    /// The next occurrence of any of its VMs after `now`, within a year and a bit.
    pub fn next_after(&self, now: Timestamp) -> Option<Timestamp> {
        let to = Timestamp::from_second(now.as_second() + 400 * 86_400).ok()?;
        self.vms
            .iter()
            .filter_map(|vm| {
                self.occurrences(&vm.to_string(), now, to)
                    .into_iter()
                    .find(|o| o.at > now)
                    .map(|o| o.at)
            })
            .min()
    }
}

#[cfg(test)]
impl Spec {
    /// A daily 02:00 UTC schedule of VM `a` from 2027-01-01, for tests.
    pub(crate) fn example(name: &str) -> Spec {
        Spec {
            name: name.into(),
            vms: vec!["a".parse().unwrap()],
            recurrence: Recurrence::Daily,
            start_date: "2027-01-01".into(),
            hour: 2,
            tz: "UTC".into(),
            retention: None,
            enabled: true,
            quiesce: "preferred".into(),
            boot_test: None,
        }
    }
}

pub fn slot_label(hour: u8, tz: &str) -> String {
    format!("{:02}:00-{:02}:00 {tz}", hour, (hour + 1) % 24)
}

/// Puts `spec` into a slot: with `auto`, the least loaded hour; then checks capacity against
/// every other enabled schedule. Refuses (`Error::SlotFull`, exit code 3) with the nearest
/// hours that have room.
pub fn place(
    others: &[Spec],
    spec: &mut Spec,
    auto: bool,
    capacity: usize,
    now: Timestamp,
) -> Result<(), ScheduleError> {
    let loads = slots::loads(others, Some(&spec.name), now);
    if auto {
        spec.hour = slots::least_loaded(spec, &loads, now);
    }
    if !spec.enabled {
        return Ok(());
    }
    if spec.vms.len() > capacity {
        return Err(ScheduleError::SlotFull(format!(
            "schedule {} has {} VMs, more than a slot holds ({capacity}); split it",
            spec.name,
            spec.vms.len()
        )));
    }
    let Some(o) = slots::overflow(spec, &loads, capacity, now) else {
        return Ok(());
    };
    let tz = spec.zone().map_err(ScheduleError::Invalid)?;
    let when = o.hour_start.to_zoned(tz);
    let near = slots::nearest_with_room(spec, &loads, capacity, now, 3);
    let near = if near.is_empty() {
        "no slot has room; raise slot_capacity".to_string()
    } else {
        format!(
            "nearest slots with room: {}",
            near.iter()
                .map(|h| format!("{:02}:00-{:02}:00", h, (h + 1) % 24))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Err(ScheduleError::SlotFull(format!(
        "slot {} is full: on {} it already holds {} of {capacity} VMs and this schedule adds {}; {near}",
        spec.slot_label(),
        when.date(),
        o.already,
        spec.vms.len(),
    )))
}
