//! Named fail points, for the tests that break a run at a chosen place (compiled in only with
//! the `fault-injection` feature; without it `point` is an empty inline function).
//!
//! The environment variable `VMBACKUP_FAILPOINTS` lists `name=action` pairs separated by `;`.
//! An action may end in `@N`: it then fires at the Nth time the run reaches the point (from 1),
//! and not at the others. Actions:
//! - `panic`: panics there (the unwinding path: guards and `Drop` run);
//! - `exit(N)`: ends the process at once with code N (no `Drop`, no unwinding);
//! - `sleep(MS)`: sleeps MS milliseconds, then goes on;
//! - `stop`: stops the process (SIGSTOP), for a test that inspects and kills it there;
//! - `kill`: prints `vmbackup-failpoint: NAME` on its own line to stderr and waits there for
//!   the test's SIGKILL (of the process group, thaw guard included);
//! - `off`: nothing (so that a list can switch one point off).
//!
//! Every point is listed in `POINTS`, so that a soak test can choose among them and a test can
//! check that the point it names exists.

/// Every fail point of the program, in the order a backup reaches them (then the others).
pub const POINTS: &[&str] = &[
    // backup, in order
    "backup-locked",
    "backup-overlays-created",
    "backup-snapshot",
    "backup-snapshot-done",
    "backup-copy",
    "backup-chunk-written",
    "backup-between-disks",
    "backup-published-index",
    "backup-before-manifest-rename",
    "backup-published",
    "commit-started",
    "commit-ready",
    "commit-pivoted",
    "commit-before-inactive-xml",
    "commit-before-overlay-unlink",
    "backup-committed",
    // maintenance
    "list-listed",
    "prune-planned",
    "prune-deleted-one",
    "gc-locked",
    "gc-listed",
    "gc-deleted-some",
    "verify-loaded",
    // restore
    "restore-temporaries",
    "restore-renamed-one",
    "restore-before-define",
    "instant-before-start",
    "instant-copying",
    // plain QEMU
    "qemu-frozen",
    // run-due
    "run-due-claimed",
    // sync
    "sync-chunks-written",
    "sync-before-manifest",
];

#[cfg(feature = "fault-injection")]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    #[derive(Debug, Clone, PartialEq)]
    pub(super) enum Action {
        Panic,
        Exit(i32),
        Sleep(u64),
        Stop,
        Kill,
        Off,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub(super) struct Rule {
        pub action: Action,
        /// Fires only at this hit (1-based); every hit when `None`.
        pub at: Option<u64>,
    }

    pub(super) fn parse(spec: &str) -> Result<HashMap<String, Rule>, String> {
        let mut rules = HashMap::new();
        for item in spec.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, action) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?}: expected NAME=ACTION"))?;
            let (action, at) = match action.rsplit_once('@') {
                Some((a, n)) => (
                    a,
                    Some(
                        n.parse::<u64>()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| format!("{item:?}: bad hit number"))?,
                    ),
                ),
                None => (action, None),
            };
            let arg = |prefix: &str| {
                action
                    .strip_prefix(prefix)
                    .and_then(|r| r.strip_suffix(')'))
                    .map(str::to_owned)
            };
            let action = match action {
                "panic" => Action::Panic,
                "stop" => Action::Stop,
                "kill" => Action::Kill,
                "off" => Action::Off,
                _ => {
                    if let Some(n) = arg("exit(") {
                        Action::Exit(n.parse().map_err(|_| format!("{item:?}: bad exit code"))?)
                    } else if let Some(ms) = arg("sleep(") {
                        Action::Sleep(ms.parse().map_err(|_| format!("{item:?}: bad sleep"))?)
                    } else {
                        return Err(format!("{item:?}: unknown action"));
                    }
                }
            };
            if !super::POINTS.contains(&name) {
                return Err(format!("{name:?}: no such fail point"));
            }
            rules.insert(name.to_owned(), Rule { action, at });
        }
        Ok(rules)
    }

    struct Table {
        rules: HashMap<String, Rule>,
        hits: Mutex<HashMap<String, u64>>,
    }

    fn table() -> &'static Table {
        static TABLE: OnceLock<Table> = OnceLock::new();
        TABLE.get_or_init(|| {
            let spec = std::env::var("VMBACKUP_FAILPOINTS").unwrap_or_default();
            let rules = match parse(&spec) {
                Ok(r) => r,
                Err(e) => {
                    // A test that names a point wrongly must fail loudly, not pass untested.
                    eprintln!("vmbackup: VMBACKUP_FAILPOINTS: {e}");
                    std::process::exit(70);
                }
            };
            Table {
                rules,
                hits: Mutex::new(HashMap::new()),
            }
        })
    }

    pub fn init() {
        table();
    }

    pub fn point(name: &str) {
        let t = table();
        let Some(rule) = t.rules.get(name) else {
            return;
        };
        let hit = {
            let mut hits = t.hits.lock().unwrap_or_else(|p| p.into_inner());
            let n = hits.entry(name.to_owned()).or_insert(0);
            *n += 1;
            *n
        };
        if rule.at.is_some_and(|at| at != hit) {
            return;
        }
        tracing::warn!(point = name, hit, action = ?rule.action, "fail point");
        match rule.action {
            Action::Off => {}
            Action::Panic => panic!("fail point {name}"),
            Action::Exit(code) => std::process::exit(code),
            Action::Sleep(ms) => std::thread::sleep(Duration::from_millis(ms)),
            Action::Stop => {
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
            }
            Action::Kill => {
                use std::io::Write;
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "vmbackup-failpoint: {name}");
                let _ = err.flush();
                drop(err);
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
        }
    }
}

/// Reads `VMBACKUP_FAILPOINTS` now (a bad list ends the process with code 70) rather than at
/// the first point reached.
pub fn init() {
    #[cfg(feature = "fault-injection")]
    imp::init();
}

/// Reaches the fail point `name` (see the module's documentation).
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    debug_assert!(POINTS.contains(&name), "unlisted fail point {name}");
    imp::point(name)
}

/// Reaches the fail point `name`: nothing, in a build without `fault-injection`.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// Whether fail points are compiled in.
pub const ENABLED: bool = cfg!(feature = "fault-injection");

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::imp::{parse, Action, Rule};

    #[test]
    fn a_spec_names_points_actions_and_hits() {
        let r =
            parse("backup-copy=kill; commit-ready=sleep(250)@2;backup-snapshot=exit(9)").unwrap();
        assert_eq!(
            r["backup-copy"],
            Rule {
                action: Action::Kill,
                at: None
            }
        );
        assert_eq!(
            r["commit-ready"],
            Rule {
                action: Action::Sleep(250),
                at: Some(2)
            }
        );
        assert_eq!(r["backup-snapshot"].action, Action::Exit(9));
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn unknown_points_and_actions_are_errors() {
        assert!(parse("no-such-point=panic").is_err());
        assert!(parse("backup-copy=explode").is_err());
        assert!(parse("backup-copy=panic@0").is_err());
        assert!(parse("backup-copy").is_err());
    }
}
