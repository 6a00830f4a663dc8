//! The QEMU guest agent of a libvirt domain: ping, run commands in the guest, read its network
//! interfaces, and freeze its filesystems behind a guard that always thaws.

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::hypervisor::libvirt::{Dom, LibvirtError as Error, Result};
pub use crate::hypervisor::vm::GuestInterface;

/// Answers when the agent is up and talking.
pub fn ping(dom: &Dom, timeout: Duration) -> Result<()> {
    dom.agent_command(&json!({"execute": "guest-ping"}), timeout)
        .map(|_| ())
}

/// What a command run in the guest returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

const AGENT_CALL: Duration = Duration::from_secs(30);

/// Starts `path args...` in the guest with its output captured; returns the guest pid.
pub fn exec_start(dom: &Dom, path: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<i64> {
    let mut arguments = json!({"path": path, "arg": args, "capture-output": true});
    if let Some(input) = stdin {
        arguments["input-data"] = json!(base64::engine::general_purpose::STANDARD.encode(input));
    }
    let r = dom.agent_command(
        &json!({"execute": "guest-exec", "arguments": arguments}),
        AGENT_CALL,
    )?;
    r.get("pid")
        .and_then(Value::as_i64)
        .ok_or_else(|| Error::AgentReply {
            command: "guest-exec".into(),
            detail: format!("no pid in {r}"),
        })
}

/// The result of a started command, or `None` while it still runs.
pub fn exec_status(dom: &Dom, pid: i64) -> Result<Option<ExecOutput>> {
    let r = dom.agent_command(
        &json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
        AGENT_CALL,
    )?;
    if !r.get("exited").and_then(Value::as_bool).unwrap_or(false) {
        return Ok(None);
    }
    let decode = |key: &str| -> Result<Vec<u8>> {
        match r.get(key).and_then(Value::as_str) {
            None => Ok(Vec::new()),
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| Error::AgentReply {
                    command: "guest-exec-status".into(),
                    detail: format!("{key}: {e}"),
                }),
        }
    };
    let exit_code = match (r.get("exitcode"), r.get("signal")) {
        (Some(c), _) => c.as_i64().unwrap_or(-1) as i32,
        (None, Some(s)) => 128 + s.as_i64().unwrap_or(0) as i32,
        (None, None) => -1,
    };
    Ok(Some(ExecOutput {
        exit_code,
        stdout: decode("out-data")?,
        stderr: decode("err-data")?,
    }))
}

/// Runs `path args...` in the guest and waits for it, at most `timeout`.
pub fn exec(
    dom: &Dom,
    path: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<ExecOutput> {
    let pid = exec_start(dom, path, args, stdin)?;
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(out) = exec_status(dom, pid)? {
            return Ok(out);
        }
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: format!("guest command {path} {}", args.join(" ")),
                secs: timeout.as_secs_f64(),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// The guest's network interfaces and addresses (loopback left out).
pub fn interfaces(dom: &Dom) -> Result<Vec<GuestInterface>> {
    interfaces_within(dom, AGENT_CALL)
}

/// `interfaces`, waiting at most `timeout` for the agent.
pub fn interfaces_within(dom: &Dom, timeout: Duration) -> Result<Vec<GuestInterface>> {
    let r = dom.agent_command(&json!({"execute": "guest-network-get-interfaces"}), timeout)?;
    if !r.is_array() {
        return Err(Error::AgentReply {
            command: "guest-network-get-interfaces".into(),
            detail: "not a list".into(),
        });
    }
    Ok(GuestInterface::from_agent_reply(&r))
}

/// Filesystems frozen through the agent. Thaws when dropped, on every path.
pub struct Frozen<'a> {
    dom: &'a Dom,
    filesystems: u32,
    since: Instant,
    thawed: bool,
}

/// Freezes all of the guest's filesystems. `deadline` bounds how long libvirt waits for the
/// agent in this call and in the thaw, so an agent that stops answering cannot hold the caller.
pub fn freeze(dom: &Dom, deadline: Duration) -> Result<Frozen<'_>> {
    dom.set_agent_timeout(deadline)?;
    let since = Instant::now();
    match dom.fs_freeze(&[]) {
        Ok(filesystems) => {
            tracing::debug!(domain = dom.name(), filesystems, "guest filesystems frozen");
            Ok(Frozen {
                dom,
                filesystems,
                since,
                thawed: false,
            })
        }
        Err(e) => {
            // A freeze that timed out may still complete inside the guest later: thaw anyway.
            let _ = dom.fs_thaw(&[]);
            Err(e)
        }
    }
}

impl Frozen<'_> {
    pub fn filesystems(&self) -> u32 {
        self.filesystems
    }

    /// Thaws now; returns how long the filesystems were frozen.
    pub fn thaw(mut self) -> Result<Duration> {
        self.thawed = true;
        let r = self.dom.fs_thaw(&[]);
        let held = self.since.elapsed();
        r.map(|_| held)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if self.thawed {
            return;
        }
        if let Err(e) = self.dom.fs_thaw(&[]) {
            tracing::error!(domain = self.dom.name(), error = %e, "thaw failed");
        } else {
            tracing::debug!(domain = self.dom.name(), "guest filesystems thawed");
        }
    }
}

/// The guest agent's freeze status: `thawed` or `frozen`.
pub fn freeze_status(dom: &Dom, timeout: Duration) -> Result<String> {
    let r = dom.agent_command(&json!({"execute": "guest-fsfreeze-status"}), timeout)?;
    r.as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::AgentReply {
            command: "guest-fsfreeze-status".into(),
            detail: format!("not a string: {r}"),
        })
}

/// Longest wait for one agent call of `ensure_thawed`.
const THAW_CALL: Duration = Duration::from_secs(5);

/// Makes sure the guest's filesystems are not left frozen after a freeze that failed or timed
/// out. libvirt thaws only after a freeze it saw succeed, but the guest agent may still finish
/// one that libvirt gave up on, and the guest then stays frozen. So: ask the agent for the
/// freeze status, thaw while it says `frozen`, until it says `thawed`. The agent is
/// single-threaded and answers nothing while it is still busy with the freeze, so a call that
/// times out (or any other failed call) only means: ask again after a short pause. Returns
/// whether the guest was found frozen (and was thawed). A domain that no longer runs, or whose
/// agent channel no agent holds open (no agent can be holding a freeze then), has nothing to
/// thaw. Fails when the guest is not seen thawed within `deadline`.
pub fn ensure_thawed(dom: &Dom, deadline: Duration) -> Result<bool> {
    // An abandoning second signal waits for this (see `interrupt`).
    let _thaw_pending = crate::interrupt::ThawPending::start();
    let start = Instant::now();
    let mut was_frozen = false;
    let mut pause = Duration::from_millis(100);
    loop {
        if !dom.is_active()? {
            return Ok(was_frozen);
        }
        if dom.agent_connected()? == Some(false) {
            tracing::debug!(
                domain = dom.name(),
                "no guest agent connected: nothing to thaw"
            );
            return Ok(was_frozen);
        }
        let call = deadline
            .saturating_sub(start.elapsed())
            .clamp(Duration::from_secs(1), THAW_CALL);
        let last = match freeze_status(dom, call) {
            Ok(s) if s == "thawed" => return Ok(was_frozen),
            Ok(s) => {
                tracing::warn!(domain = dom.name(), status = %s, "the guest's filesystems are frozen: thawing");
                was_frozen = true;
                match dom.agent_command(&json!({"execute": "guest-fsfreeze-thaw"}), call) {
                    Ok(n) => {
                        tracing::info!(domain = dom.name(), filesystems = %n, "guest filesystems thawed");
                        None
                    }
                    Err(e) => Some(e),
                }
            }
            Err(e) => Some(e),
        };
        let elapsed = start.elapsed();
        if elapsed >= deadline {
            let why = last.map_or_else(
                || "it still says frozen".to_string(),
                |e| crate::error::chain(&e),
            );
            return Err(Error::Timeout {
                what: format!(
                    "the guest agent of {} to report the guest thawed (it may still be frozen; last: {why})",
                    dom.name()
                ),
                secs: elapsed.as_secs_f64(),
            });
        }
        std::thread::sleep(pause.min(deadline - elapsed));
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}
