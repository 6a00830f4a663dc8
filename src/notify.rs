//! Job reports: when a `run-due` batch ends, one report per schedule that ran (a per-VM
//! table, times in UTC), sent by e-mail through an SMTP relay and/or given as JSON on the
//! standard input of a command. Both are set in the config file's `[report]` table:
//!
//! ```toml
//! [report]
//! smtp = "127.0.0.1:25"          # a relay that accepts mail from this host (no TLS, no auth)
//! from = "vmbackup@host.example"
//! to = ["ops@example.com"]
//! command = ["/usr/local/bin/backup-hook", "--source", "vmbackup"]   # argv, no shell
//! command_timeout_secs = 120     # the command is killed (its whole process group) after this
//! ```
//!
//! The SMTP client is the plain protocol (RFC 5321) for a local relay: EHLO, MAIL, RCPT,
//! DATA with dot-stuffing, QUIT. TLS and authentication towards the outside world are the
//! relay's business (Postfix, msmtpd, ...).
//!
//! Report text carries strings from elsewhere (error chains with the guest agent's or QEMU's
//! words, disk paths): the body is sanitised before it is sent (`sanitize_body`): CRLF and LF
//! end lines, every other control character (a bare CR among them) becomes a space, and
//! dot-stuffing means no line of the message is a lone `.`, so nothing in a report can end
//! the DATA early or smuggle a second message past the relay.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::schedule::report::JobReport;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// `host:port` of the SMTP relay.
    pub smtp: Option<String>,
    pub from: Option<String>,
    #[serde(default)]
    pub to: Vec<String>,
    /// A program and its arguments, given the report as JSON on stdin.
    pub command: Option<Vec<String>>,
    /// Seconds the command may run; then its process group is killed and the report counts
    /// as failed (default `DEFAULT_COMMAND_TIMEOUT`). At least 1.
    pub command_timeout_secs: Option<u64>,
}

/// How long the report command may run unless the config says otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

impl ReportConfig {
    /// Refuses settings that cannot work (bad input, found when the config is read).
    pub fn check(&self) -> Result<(), NotifyError> {
        if self.command_timeout_secs == Some(0) {
            return Err(NotifyError::Config(
                "command_timeout_secs: 0 is not allowed: give at least 1".into(),
            ));
        }
        if matches!(&self.command, Some(argv) if argv.is_empty()) {
            return Err(NotifyError::Config("command is empty".into()));
        }
        Ok(())
    }

    fn command_timeout(&self) -> Duration {
        self.command_timeout_secs
            .map_or(DEFAULT_COMMAND_TIMEOUT, Duration::from_secs)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("SMTP relay {relay}")]
    Io {
        relay: String,
        #[source]
        source: std::io::Error,
    },
    #[error("SMTP relay {relay} answered {reply:?} to {command}")]
    Refused {
        relay: String,
        command: String,
        reply: String,
    },
    #[error("report setting {0}")]
    Config(String),
    #[error("report command {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("report command {program} exited with {status}")]
    CommandFailed { program: String, status: String },
    #[error("report command {program} still ran after {secs} s: killed")]
    CommandTimeout { program: String, secs: u64 },
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `job`'s report wherever the config says; nothing configured is not an error.
pub fn send(cfg: &ReportConfig, job: &JobReport) -> Result<(), NotifyError> {
    let mut first_error = None;
    if let Some(relay) = &cfg.smtp {
        let from = cfg
            .from
            .clone()
            .unwrap_or_else(|| format!("vmbackup@{}", hostname()));
        if cfg.to.is_empty() {
            return Err(NotifyError::Config("smtp is set but `to` is empty".into()));
        }
        let (subject, body) = render(job);
        if let Err(e) = send_mail(relay, &from, &cfg.to, &subject, &body) {
            first_error = Some(e);
        }
    }
    if let Some(argv) = &cfg.command {
        if let Err(e) = run_command(argv, job, cfg.command_timeout()) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// The subject and the plain-text body of a report.
pub fn render(job: &JobReport) -> (String, String) {
    let ok = job.count("ok");
    let failed = job.count("failed");
    let other = job.results.len() - ok - failed;
    let boot_failed = job.boot_tests_failed();
    let subject = format!(
        "vmbackup {}: {} ok, {} failed{}{}",
        job.schedule,
        ok,
        failed,
        if other > 0 {
            format!(", {other} skipped or missed")
        } else {
            String::new()
        },
        if boot_failed > 0 {
            format!(", {boot_failed} did not pass the boot test")
        } else {
            String::new()
        }
    );
    let mut b = String::new();
    b.push_str(&format!(
        "Schedule {} ({}, slot {})\nrun-due at {} (UTC)\n\n",
        job.schedule, job.recurrence, job.slot, job.run_at
    ));
    b.push_str(&format!(
        "{:<20} {:<8} {:<25} {:<25} {:<25} {}\n",
        "VM", "STATUS", "DUE (UTC)", "START (UTC)", "END (UTC)", "BACKUP / ERROR"
    ));
    for r in &job.results {
        let what = match (&r.backup_id, &r.error) {
            (Some(id), _) => {
                let mut s = id.clone();
                if let Some(c) = &r.consistency {
                    s.push_str(&format!(" ({c}"));
                    if let Some(f) = r.freeze_ms {
                        s.push_str(&format!(", frozen {f} ms"));
                    }
                    s.push(')');
                }
                if let Some(t) = &r.boot_test {
                    match (&t.error, t.seconds_to_agent) {
                        (None, Some(secs)) => {
                            s.push_str(&format!("; boot test passed (agent after {secs:.1} s)"))
                        }
                        (None, None) => s.push_str("; boot test passed"),
                        (Some(e), _) => s.push_str(&format!("; boot test FAILED: {e}")),
                    }
                }
                if !r.pruned.is_empty() {
                    s.push_str(&format!("; pruned {}", r.pruned.join(", ")));
                }
                for e in &r.prune_errors {
                    s.push_str(&format!("; prune error: {e}"));
                }
                s
            }
            (None, Some(e)) => e.clone(),
            (None, None) => String::new(),
        };
        b.push_str(&format!(
            "{:<20} {:<8} {:<25} {:<25} {:<25} {}\n",
            r.vm,
            r.status,
            r.due,
            r.started.as_deref().unwrap_or("-"),
            r.ended.as_deref().unwrap_or("-"),
            what
        ));
    }
    (subject, b)
}

/// One header line: every control character (CR and LF among them) becomes a space.
fn sanitize_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A body as the DATA of an SMTP message: lines end in CRLF (a CRLF or a LF of the text ends
/// a line; a bare CR and every other control character but TAB become a space), and a line
/// that starts with `.` gets one more (RFC 5321 4.5.2), so no line is a lone `.` and the
/// message ends only where the client ends it.
pub fn sanitize_body(body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 16);
    if body.is_empty() {
        return out;
    }
    let text = body.strip_suffix('\n').unwrap_or(body);
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with('.') {
            out.push('.');
        }
        out.extend(
            line.chars()
                .map(|c| if c.is_control() && c != '\t' { ' ' } else { c }),
        );
        out.push_str("\r\n");
    }
    out
}

fn check_address(a: &str) -> Result<(), NotifyError> {
    if a.is_empty()
        || a.chars()
            .any(|c| c.is_control() || matches!(c, '<' | '>' | ' '))
    {
        return Err(NotifyError::Config(format!("bad e-mail address {a:?}")));
    }
    Ok(())
}

struct Smtp {
    relay: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Smtp {
    fn io(&self, source: std::io::Error) -> NotifyError {
        NotifyError::Io {
            relay: self.relay.clone(),
            source,
        }
    }

    /// Reads one (possibly multi-line) reply; checks its code's first digit.
    fn expect(&mut self, command: &str, class: u8) -> Result<String, NotifyError> {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).map_err(|e| self.io(e))?;
            if n == 0 {
                return Err(self.io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            all.push_str(line.trim_end());
            let b = line.as_bytes();
            if b.len() < 4 || b[3] != b'-' {
                break;
            }
            all.push('\n');
        }
        if all.as_bytes().first() != Some(&(b'0' + class)) {
            return Err(NotifyError::Refused {
                relay: self.relay.clone(),
                command: command.to_string(),
                reply: all,
            });
        }
        Ok(all)
    }

    fn command(&mut self, line: &str, class: u8) -> Result<String, NotifyError> {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .map_err(|e| self.io(e))?;
        let verb = line.split([' ', ':']).next().unwrap_or(line).to_string();
        self.expect(&verb, class)
    }
}

/// Sends one plain-text message through the relay at `relay` (`host:port`).
pub fn send_mail(
    relay: &str,
    from: &str,
    to: &[String],
    subject: &str,
    body: &str,
) -> Result<(), NotifyError> {
    check_address(from)?;
    for t in to {
        check_address(t)?;
    }
    let io = |source| NotifyError::Io {
        relay: relay.to_string(),
        source,
    };
    let addr = relay
        .to_socket_addrs()
        .map_err(io)?
        .next()
        .ok_or_else(|| io(std::io::ErrorKind::NotFound.into()))?;
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(io)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let mut s = Smtp {
        relay: relay.to_string(),
        reader: BufReader::new(stream.try_clone().map_err(io)?),
        writer: stream,
    };
    s.expect("greeting", 2)?;
    let me = hostname();
    if s.command(&format!("EHLO {me}"), 2).is_err() {
        s.command(&format!("HELO {me}"), 2)?;
    }
    s.command(&format!("MAIL FROM:<{from}>"), 2)?;
    for t in to {
        s.command(&format!("RCPT TO:<{t}>"), 2)?;
    }
    s.command("DATA", 3)?;
    let date = jiff::Timestamp::now()
        .strftime("%a, %d %b %Y %H:%M:%S +0000")
        .to_string();
    let mut msg = format!(
        "From: {from}\r\nTo: {}\r\nSubject: {}\r\nDate: {date}\r\nMessage-ID: <{}.{}@{me}>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\n",
        to.join(", "),
        sanitize_line(subject),
        jiff::Timestamp::now().as_nanosecond(),
        std::process::id()
    );
    msg.push_str(&sanitize_body(body));
    msg.push_str(".\r\n");
    s.writer.write_all(msg.as_bytes()).map_err(|e| s.io(e))?;
    s.expect("end of data", 2)?;
    let _ = s.command("QUIT", 2);
    Ok(())
}

fn run_command(argv: &[String], job: &JobReport, timeout: Duration) -> Result<(), NotifyError> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| NotifyError::Config("command is empty".into()))?;
    let spawn = |source| NotifyError::Spawn {
        program: program.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        // Its own process group: on timeout the command and whatever it started are killed.
        .process_group(0)
        .spawn()
        .map_err(spawn)?;
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let json = serde_json::to_vec(job).expect("a report serializes");
    // Written by a thread: a command that never reads its input must not block us past the
    // timeout (the pipe closes when the group is killed, and the write ends with EPIPE).
    let writer = child.stdin.take().map(|mut stdin| {
        std::thread::spawn(move || {
            // A command that does not read its input is its own business: ignore EPIPE.
            let _ = stdin.write_all(&json);
        })
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(spawn)? {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => break None,
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let Some(status) = status else {
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        // The writer ends when the pipe closes; a descendant that left the group may hold
        // it open, so it is not waited for.
        drop(writer);
        tracing::error!(program = %program, secs = timeout.as_secs(), "report command timed out: killed");
        return Err(NotifyError::CommandTimeout {
            program: program.clone(),
            secs: timeout.as_secs(),
        });
    };
    // The command is gone; what it started may still hold the pipe: the writer thread is
    // left to end on its own rather than waited for.
    drop(writer);
    if !status.success() {
        return Err(NotifyError::CommandFailed {
            program: program.clone(),
            status: status.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::report::VmResult;

    fn job() -> JobReport {
        let r = |vm: &str, status: &str, id: Option<&str>, err: Option<&str>| VmResult {
            vm: vm.into(),
            due: "2027-01-04T02:10:00Z".into(),
            status: status.into(),
            backup_id: id.map(str::to_string),
            consistency: id.map(|_| "application".into()),
            freeze_ms: id.map(|_| 42),
            stored_bytes: None,
            started: Some("2027-01-04T02:10:01Z".into()),
            ended: Some("2027-01-04T02:11:00Z".into()),
            error: err.map(str::to_string),
            pruned: vec![],
            prune_errors: vec![],
            boot_test: None,
        };
        JobReport {
            schedule: "nightly".into(),
            recurrence: "daily".into(),
            slot: "02:00-03:00 UTC".into(),
            run_at: "2027-01-04T02:12:00Z".into(),
            results: vec![
                r("web01", "ok", Some("web01-1"), None),
                r(
                    "db01",
                    "failed",
                    None,
                    Some("the guest agent does not answer"),
                ),
            ],
        }
    }

    #[test]
    fn the_report_has_a_row_per_vm() {
        let (subject, body) = render(&job());
        assert_eq!(subject, "vmbackup nightly: 1 ok, 1 failed");
        assert!(
            body.contains("web01-1 (application, frozen 42 ms)"),
            "{body}"
        );
        assert!(body.contains("db01"));
        assert!(body.contains("the guest agent does not answer"));
    }

    #[test]
    fn a_failed_boot_test_is_in_the_subject_and_in_its_row() {
        let mut j = job();
        j.results[0].boot_test = Some(crate::repository::BootTestRecord {
            at: "2027-01-04T02:11:30Z".into(),
            booted: false,
            seconds_to_agent: None,
            command: None,
            command_exit_code: None,
            error: Some("no guest agent answer within 300 s".into()),
        });
        let (subject, body) = render(&j);
        assert_eq!(
            subject,
            "vmbackup nightly: 1 ok, 1 failed, 1 did not pass the boot test"
        );
        assert!(
            body.contains("boot test FAILED: no guest agent answer within 300 s"),
            "{body}"
        );
        let t = j.results[0].boot_test.as_mut().unwrap();
        t.error = None;
        t.booted = true;
        t.seconds_to_agent = Some(7.25);
        let (subject, body) = render(&j);
        assert_eq!(subject, "vmbackup nightly: 1 ok, 1 failed");
        assert!(
            body.contains("boot test passed (agent after 7.2 s)"),
            "{body}"
        );
    }

    #[test]
    fn the_command_gets_json_and_its_failure_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("report.json");
        let argv = vec![
            "/usr/bin/tee".to_string(),
            out.to_string_lossy().into_owned(),
        ];
        run_command(&argv, &job(), DEFAULT_COMMAND_TIMEOUT).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(v["schedule"], "nightly");
        assert_eq!(v["results"][1]["status"], "failed");
        let e =
            run_command(&["/bin/false".to_string()], &job(), DEFAULT_COMMAND_TIMEOUT).unwrap_err();
        assert!(matches!(e, NotifyError::CommandFailed { .. }));
    }

    #[test]
    fn a_command_that_runs_for_ever_is_killed_with_its_process_group_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child.pid");
        // The shell starts a child that would outlive it, and never reads its input.
        let script = format!("sleep 1000 & echo $! > {}; wait", pid_file.display());
        let argv: Vec<String> = ["/bin/sh", "-c", &script].map(String::from).to_vec();
        let t = Instant::now();
        let e = run_command(&argv, &job(), Duration::from_secs(1)).unwrap_err();
        assert!(
            matches!(e, NotifyError::CommandTimeout { secs: 1, .. }),
            "{e:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild was killed too (reaped by init soon after: wait for it to go).
        let gone = Instant::now();
        while std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
        {
            assert!(
                gone.elapsed() < Duration::from_secs(5),
                "sleep {pid} lives on"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let zero = ReportConfig {
            command: Some(vec!["/bin/true".into()]),
            command_timeout_secs: Some(0),
            ..ReportConfig::default()
        };
        assert!(matches!(zero.check(), Err(NotifyError::Config(_))));
    }

    #[test]
    fn the_body_has_no_bare_cr_no_control_characters_and_no_lone_dot_line() {
        let hostile = "ok\r\n.\r\nMAIL FROM:<x@y>\nerr\r.\r\nDATA\n.\n\u{1b}[2Jtab\there\r\n..two";
        let s = sanitize_body(hostile);
        assert_eq!(
            s,
            "ok\r\n..\r\nMAIL FROM:<x@y>\r\nerr .\r\nDATA\r\n..\r\n [2Jtab\there\r\n...two\r\n"
        );
        // Every CR is followed by LF, every LF preceded by CR, and no line is a lone dot.
        let b = s.as_bytes();
        for (i, &c) in b.iter().enumerate() {
            if c == b'\r' {
                assert_eq!(b.get(i + 1), Some(&b'\n'), "bare CR at {i}: {s:?}");
            }
            if c == b'\n' {
                assert_eq!(b[i - 1], b'\r', "bare LF at {i}: {s:?}");
            }
        }
        assert!(s.split("\r\n").all(|l| l != "."), "{s:?}");
        assert_eq!(sanitize_body(""), "");
        assert_eq!(sanitize_body("a\n"), "a\r\n");
        assert_eq!(sanitize_line("x\r\nBcc: y\u{0}"), "x  Bcc: y ");
    }

    #[test]
    fn addresses_cannot_inject_commands() {
        assert!(check_address("a@b\r\nRCPT TO:<x@y>").is_err());
        assert!(check_address("ops@example.com").is_ok());
    }
}
