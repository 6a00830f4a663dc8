//! Breaking `vmbackup` runs at its fail points, and the invariants every broken run must leave
//! (issue 13), shared by the fault tests and the soak test.
//!
//! A run is started in its own process group with `VMBACKUP_FAILPOINTS=POINT=kill`; when it
//! prints its marker (`vmbackup-failpoint: POINT`) the test sends SIGKILL to the whole group,
//! thaw guard included, as a power cut of the program would.
//!
//! These are test helpers: they panic, with the run's log, when their own setup fails.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmbackup::hypervisor::vm::VmSpec;

use crate::cli::{run_json, Place};
use crate::libvirt_vm::TestVm;

/// The marker a `kill` fail point prints on stderr.
pub const MARKER: &str = "vmbackup-failpoint: ";

/// A `vmbackup` run in its own process group, with its stderr and stdout in files.
pub struct FaultRun {
    pub child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// How a run that was meant to reach a fail point ended up.
#[derive(Debug, PartialEq, Eq)]
pub enum Reached {
    /// It printed the marker of this point and waits there.
    Point(String),
    /// It ended without reaching the point, with this exit code (-1: killed by a signal).
    Exited(i32),
}

impl FaultRun {
    /// Starts `BINARY --json --repo R --state-dir S ARGS` with `failpoints` (a
    /// `VMBACKUP_FAILPOINTS` list) and `env`, in a new process group.
    pub fn start(
        binary: &Path,
        place: &Place,
        args: &[&str],
        failpoints: &str,
        env: &[(&str, &str)],
    ) -> FaultRun {
        FaultRun::start_at(binary, &place.repo(), &place.state(), args, failpoints, env)
    }

    /// As `start`, with any `--repo` (an `s3://` one too) and state folder.
    pub fn start_at(
        binary: &Path,
        repo: &Path,
        state: &Path,
        args: &[&str],
        failpoints: &str,
        env: &[(&str, &str)],
    ) -> FaultRun {
        let dir = tempfile::Builder::new()
            .prefix("vmbt-log-")
            .tempdir_in("/var/tmp")
            .expect("log folder");
        let log = dir.path().join("stderr");
        let mut cmd = Command::new(binary);
        cmd.arg("--json")
            .arg("--repo")
            .arg(repo)
            .arg("--state-dir")
            .arg(state)
            .args(args)
            .env_remove("VMBACKUP_CONFIG")
            .env("VMBACKUP_LOG", "info")
            .env("VMBACKUP_FAILPOINTS", failpoints)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout")).expect("stdout file"))
            .stderr(std::fs::File::create(&log).expect("log file"))
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", binary.display()));
        FaultRun {
            child,
            log,
            _dir: dir,
        }
    }

    /// What the run wrote to stderr so far.
    pub fn stderr(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// What the run wrote to stdout so far (with `--json`, its one document once it ended).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.log.with_file_name("stdout")).unwrap_or_default()
    }

    /// Waits until the run prints a fail point's marker or ends, at most `timeout` (a panic
    /// with the log after that).
    pub fn wait_marker(&mut self, timeout: Duration) -> Reached {
        let start = Instant::now();
        loop {
            if let Some(line) = self.stderr().lines().find(|l| l.starts_with(MARKER)) {
                return Reached::Point(line[MARKER.len()..].trim().to_string());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // It may have printed the marker just before: look once more.
                if let Some(line) = self.stderr().lines().find(|l| l.starts_with(MARKER)) {
                    return Reached::Point(line[MARKER.len()..].trim().to_string());
                }
                return Reached::Exited(status.code().unwrap_or(-1));
            }
            if start.elapsed() > timeout {
                self.kill_group();
                panic!(
                    "no fail point reached within {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL to the run's whole process group (its thaw guard and children too), then
    /// reaps the run.
    pub fn kill_group(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Sends `signal` to the run alone (not its group).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
    }

    /// Waits until the run is stopped (SIGSTOP, by a `stop` fail point), at most `within`;
    /// panics, with its stderr, if it ends or takes longer.
    pub fn wait_stopped(&mut self, within: Duration) {
        let start = Instant::now();
        while !is_stopped(self.child.id()) {
            assert!(
                start.elapsed() < within,
                "the run never reached its fail point: {}",
                self.stderr()
            );
            assert!(
                matches!(self.child.try_wait(), Ok(None)),
                "the run ended early: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the run to end, at most `timeout`; its exit code (-1: by a signal).
    pub fn wait(&mut self, timeout: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code().unwrap_or(-1);
            }
            if start.elapsed() > timeout {
                self.kill_group();
                panic!(
                    "the run did not end within {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FaultRun {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill_group();
        }
    }
}

/// Whether process `pid` is stopped (SIGSTOP).
pub fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

/// The disk sources (in definition order) of a domain XML.
pub fn disk_sources(xml: &str) -> Vec<String> {
    VmSpec::from_xml(xml)
        .map(|s| {
            s.disks
                .into_iter()
                .map(|d| d.source.unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

/// What the guest agent says of the freeze (`thawed`, `frozen`), asking for up to `within`.
pub fn freeze_status(vm: &TestVm, within: Duration) -> Result<String, String> {
    let start = Instant::now();
    loop {
        match vm.dom().agent_command(
            &json!({"execute": "guest-fsfreeze-status"}),
            Duration::from_secs(2),
        ) {
            Ok(v) => return Ok(v.as_str().unwrap_or_default().to_string()),
            Err(e) if start.elapsed() >= within => {
                return Err(format!(
                    "the guest agent did not answer: {}",
                    vmbackup::error::chain(&e)
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// The invariants of a libvirt VM after a broken run was finished (by `recover` or the next
/// backup): live and inactive definitions on the original `images`, no block job, no overlay
/// or restore temporary beside the images, the guest thawed. Returns the violations.
pub fn vm_violations(vm: &TestVm, images: &[String]) -> Vec<String> {
    let mut bad = Vec::new();
    match vm.dom().live_xml() {
        Ok(x) if disk_sources(&x) == images => {}
        Ok(x) => bad.push(format!("live XML disks {:?}", disk_sources(&x))),
        Err(e) => bad.push(format!("live XML: {e}")),
    }
    match vm.dom().inactive_xml() {
        Ok(x) if disk_sources(&x) == images => {}
        Ok(x) => bad.push(format!("inactive XML disks {:?}", disk_sources(&x))),
        Err(e) => bad.push(format!("inactive XML: {e}")),
    }
    for p in images {
        let target = VmSpec::from_xml(&vm.dom().live_xml().unwrap_or_default())
            .ok()
            .and_then(|s| {
                s.disks
                    .into_iter()
                    .find(|d| d.source.as_deref() == Some(p))
                    .map(|d| d.target)
            });
        if let Some(t) = target {
            if let Ok(Some(job)) = vm.dom().block_job(&t) {
                bad.push(format!("block job left on {t}: {job:?}"));
            }
        }
    }
    let left: Vec<String> = std::fs::read_dir(vm.dir())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|f| f.contains(".vmbackup-"))
                .collect()
        })
        .unwrap_or_default();
    if !left.is_empty() {
        bad.push(format!("files left beside the images: {left:?}"));
    }
    match freeze_status(vm, Duration::from_secs(60)) {
        Ok(s) if s == "thawed" => {}
        Ok(s) => bad.push(format!("guest freeze status {s:?}")),
        Err(e) => bad.push(e),
    }
    bad
}

/// Files under `dir` (recursively) whose name starts with `.tmp-`.
fn temporaries(dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            temporaries(&p, out);
        } else if e.file_name().to_string_lossy().starts_with(".tmp-") {
            out.push(p.display().to_string());
        }
    }
}

/// The invariants of the repository after a broken run was finished: `list` works and every
/// listed backup is complete (`verify` passes), `gc` runs, and afterwards no temporary file
/// and no backup folder without a manifest is left. Returns the listed ids and the
/// violations.
pub fn repo_violations(binary: &Path, place: &Place) -> (Vec<String>, Vec<String>) {
    let mut bad = Vec::new();
    let list = run_json(binary, &place.repo(), &place.state(), &["list"]);
    if list.code != 0 {
        bad.push(format!("list exit {}: {}", list.code, list.stderr));
        return (Vec::new(), bad);
    }
    let ids: Vec<String> = list.json["backups"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if list.json["unreadable"]
        .as_array()
        .is_some_and(|u| !u.is_empty())
    {
        bad.push(format!("unreadable backups: {}", list.json["unreadable"]));
    }
    if !ids.is_empty() {
        let v = run_json(binary, &place.repo(), &place.state(), &["verify"]);
        if v.code != 0 {
            bad.push(format!("verify exit {}: {}", v.code, v.json));
        }
    }
    let gc = run_json(binary, &place.repo(), &place.state(), &["gc"]);
    if gc.code != 0 {
        bad.push(format!("gc exit {}: {}", gc.code, gc.stderr));
    }
    let mut tmp = Vec::new();
    temporaries(&place.repo(), &mut tmp);
    if !tmp.is_empty() {
        bad.push(format!("temporaries after gc: {tmp:?}"));
    }
    if let Ok(rd) = std::fs::read_dir(place.repo().join("backups")) {
        for e in rd.flatten() {
            if !e.path().join("manifest.json").exists() {
                bad.push(format!(
                    "backup folder without a manifest after gc: {}",
                    e.path().display()
                ));
            }
        }
    }
    (ids, bad)
}

/// The `--json` document of a run, for messages.
pub fn brief(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 2000 {
        format!("{}...", &s[..2000])
    } else {
        s
    }
}
