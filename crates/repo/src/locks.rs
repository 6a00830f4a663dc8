//! Repository locks that hold across hosts: objects `locks/<id>` in the store itself, written
//! through `ObjectStore`, so they work on a local folder and on an S3-compatible store alike.
//! Backups hold shared locks; gc (and recover's clean-up) an exclusive one.
//!
//! The protocol needs no conditional PUT (Garage ignores `If-None-Match`) and tolerates a
//! `list` that shows new objects late (up to `ObjectStore::list_lag`):
//! 1. remove the stale locks (see below), each read again just before it is deleted;
//! 2. write our own lock object (a fresh random id: never anyone else's name);
//! 3. wait `list_lag`, then list `locks/` and read every other lock;
//! 4. a conflict (exclusive against anything) that is not stale: delete ours, back off a
//!    random while, and try again a few times; then give up (`None`: busy).
//!
//! Of two lockers, the one that wrote later lists after the other's object is visible, so at
//! least one of them sees the conflict and steps back: both never hold conflicting locks.
//!
//! A held lock is refreshed (rewritten with a new `refreshed` time) every `stale_after / 6`
//! by a thread. A lock is stale when it was not refreshed for `stale_after` (30 min, as
//! restic's), or at once when its holder ran on this host and its process is gone (killed).
//! A holder that could not refresh in time (paused, cut off from the store) has lost its lock
//! for good: `RepoLock::check` says so, and a backup checks right before it publishes.
//!
//! A lock also says who holds it (`job`, `vm`: the command this process runs, set once by
//! `set_job`, and the VM it works on), so that a refused locker can name its holder
//! (`Holder`). Older code reads these objects too: the fields are optional and unknown
//! fields are ignored on both sides.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::storage::ObjectStore;
use super::{RepoError, Result};

/// A lock not refreshed for this long is stale (restic's value).
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
/// Overrides `STALE_AFTER` (whole seconds), only in builds with the `fault-injection` feature.
pub const STALE_ENV: &str = "VMBACKUP_LOCK_STALE_SECS";
/// What a locker that saw a conflict needs, beyond the listing's lag, to withdraw its lock.
const WITHDRAW: Duration = Duration::from_millis(1500);
/// Lock objects live under this prefix.
pub const PREFIX: &str = "locks/";

/// How long a lock stays valid without a refresh.
pub fn stale_after() -> Duration {
    #[cfg(feature = "fault-injection")]
    if let Some(s) = std::env::var(STALE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return Duration::from_secs(s.max(1));
    }
    STALE_AFTER
}

/// The command this process runs (`backup`, `gc`, `run-due`, ...), recorded in its locks.
static JOB: Mutex<Option<String>> = Mutex::new(None);

/// Records the command this process runs, for the locks it takes (repository and VM locks).
pub fn set_job(job: &str) {
    if let Ok(mut j) = JOB.lock() {
        *j = Some(job.to_string());
    }
}

/// The command this process runs, as `set_job` recorded it (else the program's name).
pub fn job() -> String {
    JOB.lock()
        .ok()
        .and_then(|j| j.clone())
        .unwrap_or_else(|| "vmbackup".into())
}

/// Who holds a lock: what a refused locker tells. `since`: RFC 3339 UTC, whole seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Holder {
    pub pid: u32,
    /// The command it runs (`backup`, `restore`, `gc`, `run-due`, ...).
    pub job: String,
    /// The VM it works on, when it works on one.
    pub vm: Option<String>,
    /// The host it runs on: repository locks only (a VM lock is this host's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub since: String,
}

impl Holder {
    /// `backup of web (pid 1234 on host1, since 2026-11-30T22:01:05Z)`.
    pub fn describe(&self) -> String {
        let vm = self
            .vm
            .as_deref()
            .map(|v| format!(" of {v}"))
            .unwrap_or_default();
        let host = self
            .host
            .as_deref()
            .map(|h| format!(" on {h}"))
            .unwrap_or_default();
        format!(
            "{}{vm} (pid {}{host}, since {})",
            self.job, self.pid, self.since
        )
    }
}

/// A time as RFC 3339 UTC in whole seconds (`2026-11-30T22:01:05Z`); unreadable ones as
/// they are.
pub fn whole_seconds(t: &str) -> String {
    match t.parse::<jiff::Timestamp>() {
        Ok(ts) => jiff::Timestamp::from_second(ts.as_second())
            .map(|s| s.to_string())
            .unwrap_or_else(|_| t.to_string()),
        Err(_) => t.to_string(),
    }
}

/// The content of a lock object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// The holder's host name.
    pub host: String,
    pub pid: u32,
    /// Random, also the object's name: `locks/<id>`.
    pub id: String,
    pub exclusive: bool,
    /// RFC 3339 UTC.
    pub created: String,
    pub refreshed: String,
    /// The holder's command (absent in locks of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The VM the holder works on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
}

impl LockInfo {
    /// Who holds this lock.
    pub fn holder(&self) -> Holder {
        Holder {
            pid: self.pid,
            job: self
                .job
                .clone()
                .unwrap_or_else(|| "an older vmbackup".into()),
            vm: self.vm.clone(),
            host: Some(self.host.clone()),
            since: whole_seconds(&self.created),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} lock of pid {} on {} (since {}, refreshed {})",
            if self.exclusive {
                "an exclusive"
            } else {
                "a shared"
            },
            self.pid,
            self.host,
            self.created,
            self.refreshed
        )
    }

    fn conflicts_with(&self, exclusive: bool) -> bool {
        self.exclusive || exclusive
    }
}

/// Who takes locks and how: the host's name and the timings (tests change them).
#[derive(Debug, Clone)]
pub struct Locker {
    pub host: String,
    /// The VM the locker works on, recorded in its lock.
    pub vm: Option<String>,
    pub stale_after: Duration,
    /// How many times a conflict is retried before giving up.
    pub attempts: u32,
}

impl Default for Locker {
    fn default() -> Self {
        Locker {
            host: host_name(),
            vm: None,
            stale_after: stale_after(),
            attempts: 3,
        }
    }
}

/// This host's name (`/proc/sys/kernel/hostname`).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn random_id() -> String {
    use std::io::Read;
    let mut b = [0u8; 12];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if filled.is_err() {
        // Never reached on Linux; still unique per process and moment.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b[..8].copy_from_slice(&(t as u64).to_le_bytes());
        b[8..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// Whether process `pid` of this host is alive (EPERM: it is, and someone else's).
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

impl Locker {
    /// Why lock `l` is stale, `None` while it is valid.
    fn stale(&self, l: &LockInfo) -> Option<String> {
        if l.host == self.host && !pid_alive(l.pid) {
            return Some("its process is gone".into());
        }
        let refreshed: jiff::Timestamp = match l.refreshed.parse() {
            Ok(t) => t,
            Err(_) => return Some("its refresh time cannot be read".into()),
        };
        let age = jiff::Timestamp::now().duration_since(refreshed);
        let max =
            jiff::SignedDuration::try_from(self.stale_after).unwrap_or(jiff::SignedDuration::MAX);
        (age > max).then(|| format!("not refreshed for {}s", age.as_secs()))
    }

    /// The other locks in the store, by object name (`None`: not a lock we can read).
    fn others(
        &self,
        store: &dyn ObjectStore,
        own: &str,
    ) -> Result<Vec<(String, Option<LockInfo>)>> {
        let mut out = Vec::new();
        for name in store.list(PREFIX)? {
            if name == own {
                continue;
            }
            match store.get(&name) {
                Ok(b) => out.push((name, serde_json::from_slice(&b).ok())),
                // Released since the listing.
                Err(RepoError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Removes the stale locks: each is read again right before it is deleted, and deleted
    /// only if it is unchanged and still stale. Returns how many went.
    pub fn remove_stale(&self, store: &dyn ObjectStore) -> Result<usize> {
        let mut removed = 0;
        for (name, info) in self.others(store, "")? {
            let Some(info) = info else { continue };
            if self.take_over(store, &name, &info)? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes lock `name`, read as `info`, if it is stale: read again right before it is
    /// deleted, and deleted only if it is unchanged and still stale; logged. Whether it went
    /// (gone already, changed, or valid: `false`).
    fn take_over(&self, store: &dyn ObjectStore, name: &str, info: &LockInfo) -> Result<bool> {
        if self.stale(info).is_none() {
            return Ok(false);
        }
        let again = match store.get(name) {
            Ok(b) => serde_json::from_slice::<LockInfo>(&b).ok(),
            Err(RepoError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let Some(again) = again.filter(|a| a == info) else {
            return Ok(false);
        };
        let Some(why) = self.stale(&again) else {
            return Ok(false);
        };
        store.delete(name)?;
        tracing::warn!(
            lock = %name,
            host = %again.host,
            pid = again.pid,
            exclusive = again.exclusive,
            created = %again.created,
            refreshed = %again.refreshed,
            "removed a stale repository lock: {why}"
        );
        Ok(true)
    }

    /// Takes a lock of `store`, exclusive or shared; `None` when a conflicting lock is held.
    pub fn acquire(
        &self,
        store: &Arc<dyn ObjectStore>,
        exclusive: bool,
    ) -> Result<Option<RepoLock>> {
        self.try_acquire(store, exclusive).map(|r| r.ok())
    }

    /// `acquire`, saying who holds the conflicting locks when it is refused (`Err`; empty
    /// when none of them could be read).
    pub fn try_acquire(
        &self,
        store: &Arc<dyn ObjectStore>,
        exclusive: bool,
    ) -> Result<std::result::Result<RepoLock, Vec<Holder>>> {
        let mut holders = Vec::new();
        for attempt in 0..self.attempts.max(1) {
            self.remove_stale(store.as_ref())?;
            let t = now();
            let info = LockInfo {
                host: self.host.clone(),
                pid: std::process::id(),
                id: random_id(),
                exclusive,
                created: t.clone(),
                refreshed: t,
                job: Some(job()),
                vm: self.vm.clone(),
            };
            let name = format!("{PREFIX}{}", info.id);
            let bytes = serde_json::to_vec(&info).expect("a lock serializes");
            store.put(&name, &bytes)?;
            holders.clear();
            let written = Instant::now();
            // Removed on every way out of this attempt but success.
            let mut own = Written {
                store: store.as_ref(),
                name: Some(name.clone()),
            };
            std::thread::sleep(store.list_lag());
            let mut conflicts = Vec::new();
            for (other, theirs) in self.others(store.as_ref(), &name)? {
                match theirs {
                    // Stale by now, or not listed yet when the stale ones were removed (a
                    // lagging listing): taken over, as those were. One that changed meanwhile
                    // (refreshed after all) is judged again by the next attempt.
                    Some(l) if self.stale(&l).is_some() => {
                        if !self.take_over(store.as_ref(), &other, &l)?
                            && l.conflicts_with(exclusive)
                            && store.exists(&other)?
                        {
                            conflicts.push(l.describe());
                            holders.push(l.holder());
                        }
                    }
                    Some(l) if !l.conflicts_with(exclusive) => {}
                    Some(l) => {
                        conflicts.push(l.describe());
                        holders.push(l.holder());
                    }
                    None => conflicts.push(format!("{other}, which cannot be read")),
                }
            }
            // Our own lock must still be valid when its refresh thread first runs: an attempt
            // that took about the stale time (a slow store, a paused process) may have seen
            // its lock taken for stale by others. It starts again with a fresh one.
            let age = written.elapsed();
            if age + refresh_every(self.stale_after) >= self.stale_after {
                drop(own);
                tracing::warn!(
                    exclusive,
                    attempt = attempt + 1,
                    took_ms = age.as_millis() as u64,
                    stale_after_s = self.stale_after.as_secs(),
                    "taking the repository lock took about its stale time: withdrawn (another attempt follows unless it was the last)"
                );
                if attempt + 1 == self.attempts.max(1) {
                    return Err(RepoError::LockLost(format!(
                        "taking it took {}ms, about its stale time",
                        age.as_millis()
                    )));
                }
                continue;
            }
            if conflicts.is_empty() {
                own.name = None;
                return Ok(Ok(RepoLock::start(
                    store.clone(),
                    name,
                    info,
                    self.clone(),
                    written,
                )));
            }
            drop(own);
            tracing::info!(
                exclusive,
                attempt = attempt + 1,
                "the repository is locked: {}",
                conflicts.join("; ")
            );
            if attempt + 1 < self.attempts {
                // Random, so that two lockers that saw each other do not meet again.
                let jitter = u64::from_str_radix(&random_id()[..4], 16).unwrap_or(0) % 400;
                std::thread::sleep(Duration::from_millis(100 + jitter) * (attempt + 1));
            }
        }
        Ok(Err(holders))
    }
}

/// How often a held lock is rewritten.
fn refresh_every(stale_after: Duration) -> Duration {
    (stale_after / 6).max(Duration::from_millis(100))
}

/// A lock object written by an attempt, deleted when dropped unless `name` was taken.
struct Written<'a> {
    store: &'a dyn ObjectStore,
    name: Option<String>,
}

impl Drop for Written<'_> {
    fn drop(&mut self) {
        if let Some(n) = &self.name {
            let _ = self.store.delete(n);
        }
    }
}

/// What the refresh thread and the holder share.
struct Held {
    store: Arc<dyn ObjectStore>,
    name: String,
    info: Mutex<LockInfo>,
    /// When the object was last written with a new `refreshed` time.
    refreshed: Mutex<Instant>,
    /// Set once the lock is known lost: never valid again.
    lost: AtomicBool,
    stale_after: Duration,
    /// Who took it (judges other locks in `check`).
    locker: Locker,
}

impl Held {
    fn lose(&self, why: &str) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            tracing::error!(lock = %self.name, "the repository lock was lost: {why}");
        }
    }

    fn late(&self) -> bool {
        self.refreshed
            .lock()
            .map(|r| r.elapsed() >= self.stale_after)
            .unwrap_or(true)
    }

    /// Rewrites the lock with a new refresh time, unless it is lost or gone.
    fn refresh(&self) {
        if self.lost.load(Ordering::SeqCst) {
            return;
        }
        if self.late() {
            // Others may have taken it for stale and removed it: rewriting it now could hide
            // that from `check`.
            self.lose("it was not refreshed in time");
            return;
        }
        match self.store.exists(&self.name) {
            Ok(true) => {}
            Ok(false) => return self.lose("its object was removed (by another host, as stale)"),
            Err(e) => {
                tracing::warn!(lock = %self.name, error = %crate::error_chain(&e), "cannot refresh the repository lock");
                return;
            }
        }
        let bytes = {
            let Ok(mut info) = self.info.lock() else {
                return;
            };
            info.refreshed = now();
            serde_json::to_vec(&*info).expect("a lock serializes")
        };
        let started = Instant::now();
        match self.store.put(&self.name, &bytes) {
            Ok(()) => {
                if let Ok(mut r) = self.refreshed.lock() {
                    *r = started;
                }
            }
            Err(e) => {
                tracing::warn!(lock = %self.name, error = %crate::error_chain(&e), "cannot refresh the repository lock")
            }
        }
    }
}

/// Locks held by this process, released by `release_all` (a process that exits at once).
static HELD: Mutex<Vec<Arc<Held>>> = Mutex::new(Vec::new());

/// Deletes every lock this process holds: for a process about to exit without unwinding (an
/// abandoning signal). Their `RepoLock`s then find them gone.
pub fn release_all() {
    release_where(|_| true)
}

fn release_where(pick: impl Fn(&Held) -> bool) {
    let held: Vec<Arc<Held>> = match HELD.lock() {
        Ok(mut h) => {
            let (out, keep) = std::mem::take(&mut *h).into_iter().partition(|x| pick(x));
            *h = keep;
            out
        }
        Err(_) => Vec::new(),
    };
    for h in held {
        h.lost.store(true, Ordering::SeqCst);
        let _ = h.store.delete(&h.name);
    }
}

/// A held repository lock: refreshed by a thread while it lives, deleted when dropped.
pub struct RepoLock {
    held: Arc<Held>,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RepoLock {
    fn start(
        store: Arc<dyn ObjectStore>,
        name: String,
        info: LockInfo,
        locker: Locker,
        written: Instant,
    ) -> RepoLock {
        let stale_after = locker.stale_after;
        let held = Arc::new(Held {
            store,
            name,
            info: Mutex::new(info),
            refreshed: Mutex::new(written),
            lost: AtomicBool::new(false),
            stale_after,
            locker,
        });
        if let Ok(mut h) = HELD.lock() {
            h.push(held.clone());
        }
        let (tx, rx) = mpsc::channel::<()>();
        let every = refresh_every(stale_after);
        let h = held.clone();
        let thread = std::thread::Builder::new()
            .name("repo-lock".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                    h.refresh();
                }
            })
            .ok();
        RepoLock {
            held,
            stop: Some(tx),
            thread,
        }
    }

    /// The lock's object name (`locks/<id>`).
    pub fn name(&self) -> &str {
        &self.held.name
    }

    pub fn info(&self) -> LockInfo {
        self.held
            .info
            .lock()
            .map(|i| i.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Whether this lock is known lost (a refresh found its object gone, or it was not
    /// refreshed within the stale window), without asking the store: cheap enough to ask
    /// often. `check` asks the store.
    pub fn is_lost(&self) -> bool {
        self.held.lost.load(Ordering::SeqCst) || self.held.late()
    }

    /// Whether this lock still holds: its object is there, it was refreshed within the stale
    /// window, and (for a shared lock) no valid exclusive lock was taken meanwhile.
    /// `RepoError::LockLost` otherwise.
    pub fn check(&self) -> Result<()> {
        let h = &self.held;
        let lost = |why: &str| {
            h.lose(why);
            Err(RepoError::LockLost(why.to_string()))
        };
        if h.lost.load(Ordering::SeqCst) {
            return lost("it was removed or not refreshed in time");
        }
        if h.late() {
            return lost("it was not refreshed in time");
        }
        match h.store.get(&h.name) {
            Ok(b) => match serde_json::from_slice::<LockInfo>(&b) {
                Ok(i) if i.id == self.info().id => {}
                _ => return lost("its object was replaced"),
            },
            Err(RepoError::NotFound(_)) => {
                return lost("its object was removed (by another host, as stale)")
            }
            Err(e) => return Err(e),
        }
        if !self.info().exclusive {
            // An exclusive lock beside ours: either a locker that will see ours and withdraw
            // (it waits the listing's lag, lists, deletes its own), or one that took ours for
            // stale. Given the time to withdraw, one that stays is held.
            let locker = &h.locker;
            let exclusive: Vec<(String, LockInfo)> = locker
                .others(h.store.as_ref(), &h.name)?
                .into_iter()
                .filter_map(|(n, l)| l.map(|l| (n, l)))
                .filter(|(_, l)| l.exclusive && locker.stale(l).is_none())
                .collect();
            if !exclusive.is_empty() {
                std::thread::sleep(h.store.list_lag() * 2 + WITHDRAW);
                for (name, l) in exclusive {
                    if h.store.exists(&name)? {
                        return lost(&format!("{} was taken meanwhile", l.describe()));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Ok(mut h) = HELD.lock() {
            h.retain(|x| !Arc::ptr_eq(x, &self.held));
        }
        // Ours alone (a random name), even when lost.
        match self.held.store.delete(&self.held.name) {
            Ok(()) | Err(RepoError::NotFound(_)) => {}
            Err(e) => {
                tracing::warn!(lock = %self.held.name, error = %crate::error_chain(&e), "cannot release the repository lock")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::teststores::TestStore;
    use std::sync::atomic::AtomicUsize;

    fn locker(host: &str) -> Locker {
        Locker {
            host: host.into(),
            vm: None,
            stale_after: STALE_AFTER,
            attempts: 3,
        }
    }

    fn store(d: &tempfile::TempDir) -> Arc<dyn ObjectStore> {
        Arc::new(TestStore::new(d.path()))
    }

    fn count(s: &Arc<dyn ObjectStore>) -> usize {
        s.list(PREFIX).unwrap().len()
    }

    /// Writes a lock of someone else directly, as another host would.
    fn foreign(
        s: &Arc<dyn ObjectStore>,
        host: &str,
        pid: u32,
        exclusive: bool,
        age: u64,
    ) -> String {
        let t = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(age as i64);
        let info = LockInfo {
            host: host.into(),
            pid,
            id: random_id(),
            exclusive,
            created: t.to_string(),
            refreshed: t.to_string(),
            job: None,
            vm: None,
        };
        let name = format!("{PREFIX}{}", info.id);
        s.put(&name, &serde_json::to_vec(&info).unwrap()).unwrap();
        name
    }

    #[test]
    fn shared_locks_coexist_exclusive_excludes_everything_and_drop_releases() {
        let d = tempfile::tempdir().unwrap();
        let s = store(&d);
        let (a, b) = (locker("a"), locker("b"));
        let s1 = a.acquire(&s, false).unwrap().expect("shared");
        let s2 = b.acquire(&s, false).unwrap().expect("shared beside shared");
        assert!(
            b.acquire(&s, true).unwrap().is_none(),
            "exclusive vs shared"
        );
        assert_eq!(count(&s), 2, "a refused attempt leaves no object");
        drop(s1);
        assert!(a.acquire(&s, true).unwrap().is_none(), "one shared left");
        drop(s2);
        assert_eq!(count(&s), 0, "released on drop");
        let x = a
            .acquire(&s, true)
            .unwrap()
            .expect("exclusive on a free store");
        assert!(
            b.acquire(&s, false).unwrap().is_none(),
            "shared vs exclusive"
        );
        assert!(
            b.acquire(&s, true).unwrap().is_none(),
            "exclusive vs exclusive"
        );
        x.check().unwrap();
        let info = x.info();
        assert_eq!(
            (info.host.as_str(), info.pid, info.exclusive),
            ("a", std::process::id(), true)
        );
        drop(x);
        assert_eq!(count(&s), 0);
    }

    #[test]
    fn a_refused_locker_is_told_who_holds_the_lock_old_locks_too() {
        let d = tempfile::tempdir().unwrap();
        let s = store(&d);
        set_job("backup");
        let backup = Locker {
            vm: Some("web".into()),
            ..locker("a")
        };
        let held = backup.try_acquire(&s, false).unwrap().ok().unwrap();
        let Err(holders) = locker("b").try_acquire(&s, true).unwrap() else {
            panic!("not refused");
        };
        assert_eq!(holders.len(), 1);
        let h = &holders[0];
        assert_eq!(
            (h.pid, h.job.as_str(), h.vm.as_deref(), h.host.as_deref()),
            (std::process::id(), "backup", Some("web"), Some("a"))
        );
        assert!(
            h.since.ends_with('Z') && !h.since.contains('.'),
            "{}",
            h.since
        );
        assert!(
            h.describe().starts_with("backup of web (pid "),
            "{}",
            h.describe()
        );
        drop(held);
        // A lock written by an older version (no job, no VM) is read, and excludes.
        let t = now();
        let old = format!(
            r#"{{"host":"c","pid":7,"id":"0123","exclusive":true,"created":"{t}","refreshed":"{t}"}}"#
        );
        s.put("locks/0123", old.as_bytes()).unwrap();
        let Err(holders) = locker("b").try_acquire(&s, false).unwrap() else {
            panic!("not refused");
        };
        assert_eq!(holders[0].job, "an older vmbackup");
        assert_eq!(holders[0].host.as_deref(), Some("c"));
        // And older versions read ours: unknown fields are ignored.
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Old {
            host: String,
            pid: u32,
            id: String,
            exclusive: bool,
            created: String,
            refreshed: String,
        }
        s.delete("locks/0123").unwrap();
        let held = backup.acquire(&s, false).unwrap().unwrap();
        let o: Old = serde_json::from_slice(&s.get(held.name()).unwrap()).unwrap();
        assert_eq!(o.pid, std::process::id());
    }

    /// Lockers racing for conflicting locks, on a store whose listing shows new objects
    /// only after 150 ms: never two conflicting holders at once.
    fn race(lag_known: bool) -> usize {
        let d = tempfile::tempdir().unwrap();
        let s: Arc<dyn ObjectStore> = Arc::new(TestStore::lagging(
            d.path(),
            Duration::from_millis(150),
            lag_known,
        ));
        let mut overlaps = 0;
        for round in 0..6 {
            let barrier = std::sync::Barrier::new(3);
            let holding = AtomicUsize::new(0);
            let most = AtomicUsize::new(0);
            std::thread::scope(|sc| {
                for i in 0..3 {
                    let (s, barrier, holding, most) = (&s, &barrier, &holding, &most);
                    sc.spawn(move || {
                        let l = Locker {
                            attempts: 1,
                            ..locker(&format!("host{i}"))
                        };
                        barrier.wait();
                        // Thread 0 wants a shared lock in odd rounds: still exclusive vs it.
                        let exclusive = !(i == 0 && round % 2 == 1);
                        if let Some(held) = l.acquire(s, exclusive).unwrap() {
                            let n = holding.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(n, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(400));
                            holding.fetch_sub(1, Ordering::SeqCst);
                            drop(held);
                        }
                    });
                }
            });
            if most.load(Ordering::SeqCst) > 1 {
                overlaps += 1;
            }
            assert_eq!(count(&s), 0);
        }
        overlaps
    }

    #[test]
    fn lockers_racing_on_a_lagging_listing_never_hold_conflicting_locks() {
        assert_eq!(race(true), 0);
    }

    #[test]
    fn without_waiting_for_the_listing_the_race_is_lost() {
        // The wait is what makes the protocol sound: a store that hides its lag lets
        // conflicting lockers through. (Two lockers one after the other, well within the lag:
        // no thread timing involved.)
        let d = tempfile::tempdir().unwrap();
        let s: Arc<dyn ObjectStore> =
            Arc::new(TestStore::lagging(d.path(), Duration::from_secs(30), false));
        let a = locker("host0").acquire(&s, true).unwrap();
        let b = locker("host1").acquire(&s, true).unwrap();
        assert!(
            a.is_some() && b.is_some(),
            "both exclusive locks were taken"
        );
    }

    #[test]
    fn stale_locks_are_removed_live_ones_of_other_hosts_are_not() {
        let d = tempfile::tempdir().unwrap();
        let s = store(&d);
        let me = locker("here");
        // A process of this host that is gone (reaped: its pid is free).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let killed = foreign(&s, "here", dead, false, 0);
        let old = foreign(&s, "there", 1, true, STALE_AFTER.as_secs() + 60);
        let x = me.acquire(&s, true).unwrap().expect("both are stale");
        assert!(!s.exists(&killed).unwrap() && !s.exists(&old).unwrap());
        drop(x);
        // A fresh lock of another host (its pid means nothing here) holds.
        let live = foreign(&s, "there", dead, false, 60);
        assert!(me.acquire(&s, true).unwrap().is_none());
        assert!(s.exists(&live).unwrap());
        assert!(me.acquire(&s, false).unwrap().is_some(), "shared beside it");
        // A lock of this host whose process lives (this one) is never stale.
        s.delete(&live).unwrap();
        let mine = foreign(&s, "here", std::process::id(), false, 60);
        assert!(me.acquire(&s, true).unwrap().is_none());
        s.delete(&mine).unwrap();
        // An object that is no lock is never taken for stale: it blocks, and stays.
        s.put("locks/garbage", b"not json").unwrap();
        assert!(me.acquire(&s, true).unwrap().is_none());
        assert!(s.exists("locks/garbage").unwrap());
    }

    /// What `f` logs through tracing (on this thread), and what it returns.
    fn logged<T>(f: impl FnOnce() -> T) -> (String, T) {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || w.clone())
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
        (text, out)
    }

    /// A stale lock that the first listing of an acquire does not show yet (a listing that
    /// lags) is found stale by its conflict check: taken over (removed) and logged there, not
    /// passed over and left behind.
    #[test]
    fn a_lock_found_stale_mid_acquire_is_taken_over_and_logged() {
        let d = tempfile::tempdir().unwrap();
        let s: Arc<dyn ObjectStore> = Arc::new(TestStore::lagging(
            d.path(),
            Duration::from_millis(300),
            true,
        ));
        for exclusive in [true, false] {
            let old = foreign(&s, "there", 1, true, STALE_AFTER.as_secs() + 60);
            let me = locker("here");
            let (log, held) = logged(|| me.acquire(&s, exclusive).unwrap());
            let held = held.expect("the stale lock does not block");
            assert!(!s.exists(&old).unwrap(), "taken over, not left behind");
            assert!(
                log.contains("removed a stale repository lock") && log.contains(&old),
                "{log}"
            );
            assert!(log.contains("host=there"), "{log}");
            held.check().unwrap();
            drop(held);
            assert!(std::fs::read_dir(d.path().join("locks"))
                .unwrap()
                .next()
                .is_none());
        }
    }

    /// An acquire whose own lock is about stale by the time it would hand it over (here: a
    /// listing lag near the stale time) withdraws it and tries again with a fresh one; when
    /// every attempt is that slow it fails (`LockLost`), logged, and leaves no lock behind.
    #[test]
    fn an_acquire_that_takes_about_the_stale_time_withdraws_its_lock() {
        let d = tempfile::tempdir().unwrap();
        // list_lag: 500 ms; a refresh every 100 ms: the lock would be late at its first.
        let s: Arc<dyn ObjectStore> = Arc::new(TestStore::lagging(
            d.path(),
            Duration::from_millis(400),
            true,
        ));
        let slow = Locker {
            stale_after: Duration::from_millis(550),
            attempts: 2,
            ..locker("a")
        };
        let (log, got) = logged(|| slow.acquire(&s, true));
        assert!(
            matches!(got, Err(RepoError::LockLost(_))),
            "{:?}",
            got.map(|l| l.is_some())
        );
        assert_eq!(log.matches("took about its stale time").count(), 2, "{log}");
        assert!(std::fs::read_dir(d.path().join("locks"))
            .unwrap()
            .next()
            .is_none());
        // With time to spare, the same store gives the lock.
        let patient = Locker {
            stale_after: Duration::from_secs(5),
            ..slow
        };
        let held = patient.acquire(&s, true).unwrap().expect("taken");
        held.check().unwrap();
    }

    #[test]
    fn a_held_lock_is_refreshed_and_stays_valid_past_the_stale_time() {
        let d = tempfile::tempdir().unwrap();
        let s = store(&d);
        let quick = Locker {
            stale_after: Duration::from_millis(900),
            ..locker("a")
        };
        let other = Locker {
            host: "b".into(),
            ..quick.clone()
        };
        let held = quick.acquire(&s, false).unwrap().unwrap();
        let first = held.info().refreshed;
        std::thread::sleep(Duration::from_millis(2000));
        held.check().expect("refreshed, still valid");
        let now: LockInfo = serde_json::from_slice(&s.get(held.name()).unwrap()).unwrap();
        assert!(now.refreshed > first, "{} > {first}", now.refreshed);
        assert!(
            other.acquire(&s, true).unwrap().is_none(),
            "not stale for others"
        );
        assert_eq!(other.remove_stale(s.as_ref()).unwrap(), 0);
    }

    #[test]
    fn a_lock_not_refreshed_in_time_is_lost_taken_over_and_never_revived() {
        let d = tempfile::tempdir().unwrap();
        let ts = TestStore::new(d.path());
        let fail = ts.fail_puts.clone();
        let s: Arc<dyn ObjectStore> = Arc::new(ts);
        let quick = Locker {
            stale_after: Duration::from_millis(600),
            ..locker("a")
        };
        let gc = Locker {
            host: "b".into(),
            ..quick.clone()
        };
        let backup = quick.acquire(&s, false).unwrap().unwrap();
        // Cut off from the store: the refreshes fail.
        fail.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(900));
        assert!(backup.is_lost(), "known without asking the store");
        assert!(matches!(backup.check(), Err(RepoError::LockLost(_))));
        fail.store(false, Ordering::SeqCst);
        let x = gc
            .acquire(&s, true)
            .unwrap()
            .expect("the stale lock was removed");
        std::thread::sleep(Duration::from_millis(300));
        assert!(matches!(backup.check(), Err(RepoError::LockLost(_))));
        assert_eq!(count(&s), 1, "the lost lock is not written again");
        drop(backup);
        x.check().unwrap();
        drop(x);
        assert_eq!(count(&s), 0);
    }

    #[test]
    fn a_removed_lock_or_an_exclusive_one_beside_it_fails_the_check() {
        let d = tempfile::tempdir().unwrap();
        let s = store(&d);
        let a = locker("a");
        let held = a.acquire(&s, false).unwrap().unwrap();
        let x = foreign(&s, "b", 1, true, 0);
        assert!(matches!(held.check(), Err(RepoError::LockLost(_))));
        s.delete(&x).unwrap();
        assert!(held.check().is_err(), "lost for good");
        drop(held);
        let held = a.acquire(&s, false).unwrap().unwrap();
        held.check().unwrap();
        s.delete(held.name()).unwrap();
        assert!(matches!(held.check(), Err(RepoError::LockLost(_))));
    }

    #[test]
    fn an_exclusive_attempt_that_withdraws_does_not_fail_the_check() {
        let d = tempfile::tempdir().unwrap();
        let s = store(&d);
        let held = locker("a").acquire(&s, false).unwrap().unwrap();
        let x = foreign(&s, "b", 1, true, 0);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                s.delete(&x).unwrap();
            });
            held.check().expect("the attempt went away");
        });
        held.check().unwrap();
    }

    #[test]
    fn release_all_deletes_the_locks_of_this_process() {
        let d = tempfile::tempdir().unwrap();
        let s = store(&d);
        let held = locker("a").acquire(&s, false).unwrap().unwrap();
        assert_eq!(count(&s), 1);
        // As `release_all`, for this test's store only (other tests hold locks too).
        release_where(|h| Arc::ptr_eq(&h.store, &s));
        assert_eq!(count(&s), 0);
        assert!(held.check().is_err());
        drop(held);
    }
}
