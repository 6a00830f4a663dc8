//! The state that is not backup data, in one SQLite database in the state directory
//! (`state.db`, mode 0600): schedules, the occurrences `run-due` has claimed, the job history
//! and the pinned backups.
//!
//! Several processes share it (the timer's `run-due`, an administrator's `backup`): WAL mode
//! and a busy timeout let them wait for each other instead of failing, and claiming an
//! occurrence is one `INSERT` on its primary key, so two `run-due` started at the same moment
//! never run the same occurrence twice.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::locks::process_alive;
use crate::schedule::Spec;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {}", path.display())]
    Sql {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create the state database {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no schedule named {0:?}")]
    NoSchedule(String),
    #[error("a schedule named {0:?} exists already")]
    ScheduleExists(String),
    #[error("stored schedule {name:?} is unreadable: {detail}")]
    Corrupt { name: String, detail: String },
}

pub type Result<T, E = StateError> = std::result::Result<T, E>;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS occurrences (
    schedule TEXT NOT NULL,
    vm TEXT NOT NULL,
    due_ms INTEGER NOT NULL,
    claimed_ms INTEGER NOT NULL,
    PRIMARY KEY (schedule, vm, due_ms)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    vm TEXT,
    schedule TEXT,
    due_ms INTEGER,
    backup_id TEXT,
    status TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    error TEXT,
    detail TEXT,
    pid INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_started ON jobs (started_ms);
CREATE TABLE IF NOT EXISTS pins (
    backup_id TEXT PRIMARY KEY,
    pinned_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    backup_id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    phase TEXT NOT NULL,
    overlays TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
";

/// A backup run in flight, as its journal row says: the phase it entered last and the
/// overlay files it made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRow {
    pub backup_id: String,
    pub vm: String,
    pub phase: String,
    pub overlays: Vec<String>,
    pub pid: i64,
}

/// One job of the history.
#[derive(Debug, Clone, Serialize, PartialEq, schemars::JsonSchema)]
pub struct Job {
    pub id: i64,
    /// `backup`, `restore`, `delete`, `prune`.
    pub kind: String,
    pub vm: Option<String>,
    pub schedule: Option<String>,
    /// The occurrence it ran for (UTC), for scheduled jobs.
    pub due: Option<String>,
    pub backup_id: Option<String>,
    /// `running`, `ok`, `failed`, `skipped`, `missed`, `interrupted`.
    pub status: String,
    #[serde(rename = "started_at")]
    pub started: String,
    #[serde(rename = "ended_at")]
    pub ended: Option<String>,
    pub duration_ms: Option<i64>,
    pub error: Option<String>,
    pub detail: Option<String>,
}

/// What a new job row holds.
#[derive(Debug, Clone, Default)]
pub struct NewJob<'a> {
    pub kind: &'a str,
    pub vm: Option<&'a str>,
    pub schedule: Option<&'a str>,
    pub due_ms: Option<i64>,
}

/// Which jobs `State::jobs_matching` returns; `None` fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    /// Started at or after this (ms since the epoch).
    pub since_ms: Option<i64>,
    pub vm: Option<String>,
    pub kind: Option<String>,
    pub schedule: Option<String>,
    /// One of `JOB_STATUSES`.
    pub status: Option<String>,
    /// Only the newest N of those that pass (still oldest first).
    pub limit: Option<usize>,
}

/// The statuses a job can have.
pub const JOB_STATUSES: &[&str] = &[
    "running",
    "ok",
    "failed",
    "skipped",
    "missed",
    "interrupted",
];

/// The kinds of jobs.
pub const JOB_KINDS: &[&str] = &["backup", "restore", "delete", "prune", "boot-test"];

pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

pub fn fmt_ms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

pub struct State {
    conn: Connection,
    path: PathBuf,
}

impl State {
    /// Opens (creating it if needed) the database in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<State> {
        let path = state_dir.join("state.db");
        let create = |source| StateError::Create {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(create)?;
        // Created 0600 before SQLite opens it: it names VMs and holds report settings' output.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(create)?;
        let sql = |source| StateError::Sql {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        Ok(State { conn, path })
    }

    fn sql(&self, source: rusqlite::Error) -> StateError {
        StateError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    // ---- the journal of backup runs in flight ----

    /// Records that run `backup_id` enters `phase` (before it starts it).
    pub fn run_enter(&self, run: &RunRow) -> Result<()> {
        let overlays = serde_json::to_string(&run.overlays).unwrap_or_else(|_| "[]".into());
        let now = now_ms();
        self.conn
            .execute(
                "INSERT INTO runs (backup_id, vm, phase, overlays, pid, started_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
                 ON CONFLICT (backup_id) DO UPDATE SET phase = ?3, overlays = ?4, updated_ms = ?6",
                params![run.backup_id, run.vm, run.phase, overlays, run.pid, now],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// Forgets run `backup_id`: it finished, or what it left was put back.
    pub fn run_end(&self, backup_id: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM runs WHERE backup_id = ?1", params![backup_id])
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// The runs of VM `vm` (its text form) that never finished.
    /// The VMs (as text) that have runs on record which never ended.
    pub fn vms_with_runs(&self) -> Result<Vec<String>> {
        let mut st = self
            .conn
            .prepare("SELECT DISTINCT vm FROM runs ORDER BY vm")
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.sql(e))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(|e| self.sql(e))
    }

    pub fn runs_of(&self, vm: &str) -> Result<Vec<RunRow>> {
        let mut st = self
            .conn
            .prepare("SELECT backup_id, vm, phase, overlays, pid FROM runs WHERE vm = ?1 ORDER BY started_ms")
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map(params![vm], |r| {
                let overlays: String = r.get(3)?;
                Ok(RunRow {
                    backup_id: r.get(0)?,
                    vm: r.get(1)?,
                    phase: r.get(2)?,
                    overlays: serde_json::from_str(&overlays).unwrap_or_default(),
                    pid: r.get(4)?,
                })
            })
            .map_err(|e| self.sql(e))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(|e| self.sql(e))
    }

    // ---- schedules ----

    pub fn add_schedule(&self, spec: &Spec) -> Result<()> {
        let now = now_ms();
        let json = serde_json::to_string(spec).expect("a schedule serializes");
        match self.conn.execute(
            "INSERT INTO schedules (name, spec, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?3)",
            params![spec.name, json, now],
        ) {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StateError::ScheduleExists(spec.name.clone()))
            }
            Err(e) => Err(self.sql(e)),
        }
    }

    pub fn update_schedule(&self, spec: &Spec) -> Result<()> {
        let json = serde_json::to_string(spec).expect("a schedule serializes");
        let n = self
            .conn
            .execute(
                "UPDATE schedules SET spec = ?2, updated_ms = ?3 WHERE name = ?1",
                params![spec.name, json, now_ms()],
            )
            .map_err(|e| self.sql(e))?;
        if n == 0 {
            return Err(StateError::NoSchedule(spec.name.clone()));
        }
        Ok(())
    }

    pub fn remove_schedule(&self, name: &str) -> Result<()> {
        let n = self
            .conn
            .execute("DELETE FROM schedules WHERE name = ?1", params![name])
            .map_err(|e| self.sql(e))?;
        if n == 0 {
            return Err(StateError::NoSchedule(name.into()));
        }
        Ok(())
    }

    /// One schedule and when it was created (ms since the epoch).
    pub fn schedule(&self, name: &str) -> Result<(Spec, i64)> {
        let row: Option<(String, i64)> = self
            .conn
            .query_row(
                "SELECT spec, created_ms FROM schedules WHERE name = ?1",
                params![name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        let (json, created) = row.ok_or_else(|| StateError::NoSchedule(name.into()))?;
        Ok((parse_spec(name, &json)?, created))
    }

    /// Every schedule, by name, with its creation time.
    pub fn schedules(&self) -> Result<Vec<(Spec, i64)>> {
        let mut st = self
            .conn
            .prepare("SELECT name, spec, created_ms FROM schedules ORDER BY name")
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (name, json, created) = row.map_err(|e| self.sql(e))?;
            out.push((parse_spec(&name, &json)?, created));
        }
        Ok(out)
    }

    // ---- occurrences ----

    /// Claims an occurrence for this process; `false` when another process (or an earlier
    /// run) has it.
    pub fn claim(&self, schedule: &str, vm: &str, due_ms: i64) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO occurrences (schedule, vm, due_ms, claimed_ms) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![schedule, vm, due_ms, now_ms()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(n == 1)
    }

    pub fn is_claimed(&self, schedule: &str, vm: &str, due_ms: i64) -> Result<bool> {
        self.conn
            .query_row(
                "SELECT 1 FROM occurrences WHERE schedule = ?1 AND vm = ?2 AND due_ms = ?3",
                params![schedule, vm, due_ms],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
            .map_err(|e| self.sql(e))
    }

    /// Whether occurrence `(schedule, vm, due_ms)` is settled: claimed by a `run-due` that
    /// ran it, recorded it, or is still alive. A claim whose job is still `running` while
    /// its process is gone (a `run-due` killed after its claim, or the host went down) is
    /// not: the next `run-due` takes it over (`claim_job`).
    pub fn is_settled(&self, schedule: &str, vm: &str, due_ms: i64) -> Result<bool> {
        if !self.is_claimed(schedule, vm, due_ms)? {
            return Ok(false);
        }
        Ok(self.abandoned_job(schedule, vm, due_ms)?.is_none())
    }

    /// The newest job of a claimed occurrence when it is still `running` and its process
    /// is gone.
    fn abandoned_job(&self, schedule: &str, vm: &str, due_ms: i64) -> Result<Option<i64>> {
        let newest: Option<(i64, String, Option<i64>)> = self
            .conn
            .query_row(
                "SELECT id, status, pid FROM jobs WHERE schedule = ?1 AND vm = ?2 \
                 AND due_ms = ?3 ORDER BY id DESC LIMIT 1",
                params![schedule, vm, due_ms],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| self.sql(e))?;
        Ok(newest
            .filter(|(_, status, pid)| status == "running" && !pid.is_some_and(process_alive))
            .map(|(id, _, _)| id))
    }

    /// Claims the occurrence `j` is for (its schedule, VM and due time) and records `j` as
    /// running, in one transaction: every claim has a job that names the process holding it.
    /// An occurrence whose claiming process is gone while its job was running is taken over,
    /// that job marked `interrupted`. `None` when another process has it, or it was settled.
    pub fn claim_job(&self, j: &NewJob) -> Result<Option<i64>> {
        let (Some(schedule), Some(vm), Some(due)) = (j.schedule, j.vm, j.due_ms) else {
            return Ok(None);
        };
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )
        .map_err(|e| self.sql(e))?;
        let inserted = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO occurrences (schedule, vm, due_ms, claimed_ms) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![schedule, vm, due, now_ms()],
            )
            .map_err(|e| self.sql(e))?;
        if inserted == 0 {
            let Some(old) = self.abandoned_job(schedule, vm, due)? else {
                return Ok(None); // rolled back on drop
            };
            self.conn
                .execute(
                    "UPDATE jobs SET status = 'interrupted', ended_ms = ?2, error = ?3 \
                     WHERE id = ?1",
                    params![
                        old,
                        now_ms(),
                        "the process running it ended before it finished (killed, or the \
                         host went down); the next run-due took the occurrence over"
                    ],
                )
                .map_err(|e| self.sql(e))?;
            self.conn
                .execute(
                    "UPDATE occurrences SET claimed_ms = ?4 \
                     WHERE schedule = ?1 AND vm = ?2 AND due_ms = ?3",
                    params![schedule, vm, due, now_ms()],
                )
                .map_err(|e| self.sql(e))?;
        }
        let id = self.start_job(j)?;
        tx.commit().map_err(|e| self.sql(e))?;
        Ok(Some(id))
    }

    /// Gives claimed occurrence back, its job `job` ending with `status` and `error`, in one
    /// transaction: the next `run-due` runs it again (a VM or repository that was busy).
    pub fn release_claim(&self, job: i64, j: &NewJob, status: &str, error: &str) -> Result<()> {
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )
        .map_err(|e| self.sql(e))?;
        self.conn
            .execute(
                "DELETE FROM occurrences WHERE schedule = ?1 AND vm = ?2 AND due_ms = ?3",
                params![j.schedule, j.vm, j.due_ms],
            )
            .map_err(|e| self.sql(e))?;
        self.finish_job(job, status, None, Some(error), None)?;
        tx.commit().map_err(|e| self.sql(e))
    }

    // ---- jobs ----

    /// Records a job as running; returns its id.
    pub fn start_job(&self, j: &NewJob) -> Result<i64> {
        self.conn
            .execute(
                "INSERT INTO jobs (kind, vm, schedule, due_ms, status, started_ms, pid) \
                 VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?6)",
                params![
                    j.kind,
                    j.vm,
                    j.schedule,
                    j.due_ms,
                    now_ms(),
                    std::process::id()
                ],
            )
            .map_err(|e| self.sql(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Records how a job ended.
    pub fn finish_job(
        &self,
        id: i64,
        status: &str,
        backup_id: Option<&str>,
        error: Option<&str>,
        detail: Option<&str>,
    ) -> Result<()> {
        self.conn
            .execute(
                "UPDATE jobs SET status = ?2, backup_id = COALESCE(?3, backup_id), error = ?4, \
                 detail = ?5, ended_ms = ?6 WHERE id = ?1",
                params![id, status, backup_id, error, detail, now_ms()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    pub fn delete_job(&self, id: i64) -> Result<()> {
        self.conn
            .execute("DELETE FROM jobs WHERE id = ?1", params![id])
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    /// How many successful backups schedule `schedule` made of `vm` since its last boot test
    /// of that VM (all of them when it never ran one).
    pub fn backups_since_boot_test(&self, schedule: &str, vm: &str) -> Result<u32> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM jobs WHERE kind = 'backup' AND status = 'ok' \
                 AND schedule = ?1 AND vm = ?2 AND id > COALESCE((SELECT MAX(id) FROM jobs \
                 WHERE kind = 'boot-test' AND schedule = ?1 AND vm = ?2), 0)",
                params![schedule, vm],
                |r| r.get::<_, u32>(0),
            )
            .map_err(|e| self.sql(e))
    }

    /// Records a job that did not run (`skipped`, `missed`) in one step.
    pub fn record_job(&self, j: &NewJob, status: &str, error: &str) -> Result<i64> {
        let id = self.start_job(j)?;
        self.finish_job(id, status, None, Some(error), None)?;
        Ok(id)
    }

    /// Jobs started at or after `since_ms` (all with `None`), oldest first. A job still
    /// `running` whose process is gone is shown as `interrupted`.
    pub fn jobs(&self, since_ms: Option<i64>) -> Result<Vec<Job>> {
        self.jobs_matching(&JobQuery {
            since_ms,
            ..Default::default()
        })
    }

    /// The jobs `q` selects, oldest first. `running` and `interrupted` are told apart here
    /// (a `running` row whose process is gone is `interrupted`), so those two statuses are
    /// filtered after the query; the rest in SQL.
    pub fn jobs_matching(&self, q: &JobQuery) -> Result<Vec<Job>> {
        let status_sql = match q.status.as_deref() {
            None => None,
            Some("running") => Some("running"),
            Some("interrupted") => None,
            Some(s) => Some(s),
        };
        let mut st = self
            .conn
            .prepare(
                "SELECT id, kind, vm, schedule, due_ms, backup_id, status, started_ms, ended_ms, \
                 error, detail, pid FROM jobs WHERE started_ms >= ?1 \
                 AND (?2 IS NULL OR vm = ?2) AND (?3 IS NULL OR kind = ?3) \
                 AND (?4 IS NULL OR schedule = ?4) AND (?5 IS NULL OR status = ?5) \
                 AND (?6 = 0 OR status IN ('running', 'interrupted')) \
                 ORDER BY started_ms, id",
            )
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map(
                params![
                    q.since_ms.unwrap_or(i64::MIN),
                    q.vm,
                    q.kind,
                    q.schedule,
                    status_sql,
                    q.status.as_deref() == Some("interrupted"),
                ],
                |r| {
                    let started: i64 = r.get(7)?;
                    let ended: Option<i64> = r.get(8)?;
                    let mut status: String = r.get(6)?;
                    let pid: Option<i64> = r.get(11)?;
                    if status == "running" && !pid.is_some_and(process_alive) {
                        status = "interrupted".into();
                    }
                    Ok(Job {
                        id: r.get(0)?,
                        kind: r.get(1)?,
                        vm: r.get(2)?,
                        schedule: r.get(3)?,
                        due: r.get::<_, Option<i64>>(4)?.map(fmt_ms),
                        backup_id: r.get(5)?,
                        status,
                        started: fmt_ms(started),
                        ended: ended.map(fmt_ms),
                        duration_ms: ended.map(|e| e - started),
                        error: r.get(9)?,
                        detail: r.get(10)?,
                    })
                },
            )
            .map_err(|e| self.sql(e))?;
        let mut jobs = rows
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.sql(e))?;
        if let Some(s) = &q.status {
            jobs.retain(|j| &j.status == s);
        }
        if let Some(n) = q.limit {
            jobs.drain(..jobs.len().saturating_sub(n));
        }
        Ok(jobs)
    }

    // ---- pins ----

    pub fn pin(&self, backup_id: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO pins (backup_id, pinned_ms) VALUES (?1, ?2)",
                params![backup_id, now_ms()],
            )
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    pub fn unpin(&self, backup_id: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM pins WHERE backup_id = ?1", params![backup_id])
            .map_err(|e| self.sql(e))?;
        Ok(())
    }

    pub fn pinned(&self) -> Result<std::collections::HashSet<String>> {
        let mut st = self
            .conn
            .prepare("SELECT backup_id FROM pins")
            .map_err(|e| self.sql(e))?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(|e| self.sql(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.sql(e))
    }
}

fn parse_spec(name: &str, json: &str) -> Result<Spec> {
    serde_json::from_str(json).map_err(|e| StateError::Corrupt {
        name: name.into(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> Spec {
        Spec::example(name)
    }

    #[test]
    fn schedules_claims_jobs_and_pins() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("state.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        s.add_schedule(&spec("nightly")).unwrap();
        assert!(matches!(
            s.add_schedule(&spec("nightly")),
            Err(StateError::ScheduleExists(_))
        ));
        let mut sp = spec("nightly");
        sp.hour = 5;
        s.update_schedule(&sp).unwrap();
        assert_eq!(s.schedule("nightly").unwrap().0.hour, 5);
        assert!(matches!(
            s.update_schedule(&spec("other")),
            Err(StateError::NoSchedule(_))
        ));

        // A second handle (another process) cannot claim what the first claimed.
        let s2 = State::open(dir.path()).unwrap();
        assert!(s.claim("nightly", "a", 1000).unwrap());
        assert!(!s2.claim("nightly", "a", 1000).unwrap());
        assert!(s2.claim("nightly", "a", 2000).unwrap());

        let id = s
            .start_job(&NewJob {
                kind: "backup",
                vm: Some("a"),
                ..NewJob::default()
            })
            .unwrap();
        assert_eq!(s.jobs(None).unwrap()[0].status, "running");
        s.finish_job(id, "ok", Some("a-1"), None, None).unwrap();
        let j = &s2.jobs(None).unwrap()[0];
        assert_eq!(
            (j.status.as_str(), j.backup_id.as_deref()),
            ("ok", Some("a-1"))
        );
        assert!(s.jobs(Some(now_ms() + 10_000)).unwrap().is_empty());

        s.pin("a-1").unwrap();
        assert!(s2.pinned().unwrap().contains("a-1"));
        s.unpin("a-1").unwrap();
        assert!(s.pinned().unwrap().is_empty());
        s.remove_schedule("nightly").unwrap();
        assert!(s.schedules().unwrap().is_empty());
    }

    #[test]
    fn a_claim_whose_process_is_gone_is_taken_over_and_a_released_one_is_free_again() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        let s2 = State::open(dir.path()).unwrap();
        let j = NewJob {
            kind: "backup",
            vm: Some("a"),
            schedule: Some("nightly"),
            due_ms: Some(1000),
        };
        let first = s.claim_job(&j).unwrap().expect("free");
        // Alive (this process): held.
        assert!(s2.is_settled("nightly", "a", 1000).unwrap());
        assert_eq!(s2.claim_job(&j).unwrap(), None);
        // Its process gone while running: not settled, and taken over once.
        s.conn
            .execute("UPDATE jobs SET pid = 999999999 WHERE id = ?1", [first])
            .unwrap();
        assert!(!s2.is_settled("nightly", "a", 1000).unwrap());
        let second = s2.claim_job(&j).unwrap().expect("taken over");
        assert_eq!(s.claim_job(&j).unwrap(), None);
        let jobs = s.jobs(None).unwrap();
        assert_eq!(jobs[0].status, "interrupted");
        assert!(jobs[0].ended.is_some());
        assert_eq!((jobs[1].id, jobs[1].status.as_str()), (second, "running"));
        // Finished: settled for good.
        s2.finish_job(second, "ok", Some("a-1"), None, None)
            .unwrap();
        assert!(s.is_settled("nightly", "a", 1000).unwrap());
        assert_eq!(s.claim_job(&j).unwrap(), None);
        // A released claim (the VM was busy) is free for the next run-due.
        let j2 = NewJob {
            due_ms: Some(2000),
            ..j.clone()
        };
        let busy = s.claim_job(&j2).unwrap().unwrap();
        s.release_claim(busy, &j2, "skipped", "busy").unwrap();
        assert!(!s2.is_settled("nightly", "a", 2000).unwrap());
        assert!(s2.claim_job(&j2).unwrap().is_some());
        assert_eq!(
            s.jobs(None)
                .unwrap()
                .iter()
                .filter(|j| j.status == "skipped")
                .count(),
            1
        );
    }

    #[test]
    fn a_dead_process_job_shows_as_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        s.start_job(&NewJob {
            kind: "backup",
            ..NewJob::default()
        })
        .unwrap();
        s.conn
            .execute("UPDATE jobs SET pid = 999999999", [])
            .unwrap();
        assert_eq!(s.jobs(None).unwrap()[0].status, "interrupted");
    }

    #[test]
    fn jobs_are_filtered_by_vm_kind_schedule_status_and_limited_to_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        let add = |kind, vm, schedule, status: &str| {
            let id = s
                .start_job(&NewJob {
                    kind,
                    vm: Some(vm),
                    schedule,
                    due_ms: None,
                })
                .unwrap();
            if status != "running" {
                s.finish_job(id, status, None, None, None).unwrap();
            }
            id
        };
        let a = add("backup", "web", Some("nightly"), "ok");
        let b = add("backup", "web", None, "failed");
        let c = add("restore", "db", None, "failed");
        let d = add("backup", "db", Some("nightly"), "running");
        let e = add("backup", "web", None, "running");
        s.conn
            .execute("UPDATE jobs SET pid = 999999999 WHERE id = ?1", [e])
            .unwrap();
        let ids = |q: JobQuery| -> Vec<i64> {
            s.jobs_matching(&q).unwrap().iter().map(|j| j.id).collect()
        };
        let q = |f: &dyn Fn(&mut JobQuery)| {
            let mut q = JobQuery::default();
            f(&mut q);
            ids(q)
        };
        assert_eq!(q(&|_| {}), [a, b, c, d, e]);
        assert_eq!(q(&|q| q.status = Some("failed".into())), [b, c]);
        assert_eq!(q(&|q| q.status = Some("running".into())), [d]);
        assert_eq!(q(&|q| q.status = Some("interrupted".into())), [e]);
        assert_eq!(q(&|q| q.kind = Some("restore".into())), [c]);
        assert_eq!(q(&|q| q.schedule = Some("nightly".into())), [a, d]);
        assert_eq!(q(&|q| q.vm = Some("web".into())), [a, b, e]);
        assert_eq!(q(&|q| q.limit = Some(2)), [d, e]);
        assert_eq!(
            q(&|q| {
                q.vm = Some("web".into());
                q.kind = Some("backup".into());
                q.limit = Some(1);
            }),
            [e]
        );
        assert!(q(&|q| q.since_ms = Some(now_ms() + 60_000)).is_empty());
    }

    #[test]
    fn backups_are_counted_from_the_last_boot_test_of_their_schedule_and_vm() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        let job = |kind: &'static str, schedule: &'static str, vm: &'static str, status| {
            let id = s
                .start_job(&NewJob {
                    kind,
                    vm: Some(vm),
                    schedule: Some(schedule),
                    due_ms: None,
                })
                .unwrap();
            s.finish_job(id, status, None, None, None).unwrap();
        };
        assert_eq!(s.backups_since_boot_test("n", "a").unwrap(), 0);
        job("backup", "n", "a", "ok");
        job("backup", "n", "a", "failed");
        job("backup", "n", "b", "ok");
        job("backup", "other", "a", "ok");
        job("backup", "n", "a", "ok");
        assert_eq!(s.backups_since_boot_test("n", "a").unwrap(), 2);
        // A boot test, passed or failed, starts the count again; only its own VM's.
        job("boot-test", "n", "a", "failed");
        assert_eq!(s.backups_since_boot_test("n", "a").unwrap(), 0);
        assert_eq!(s.backups_since_boot_test("n", "b").unwrap(), 1);
        job("backup", "n", "a", "ok");
        assert_eq!(s.backups_since_boot_test("n", "a").unwrap(), 1);
    }
}
