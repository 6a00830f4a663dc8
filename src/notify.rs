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
//! ```
//!
//! The SMTP client is the plain protocol (RFC 5321) for a local relay: EHLO, MAIL, RCPT,
//! DATA with dot-stuffing, QUIT. TLS and authentication towards the outside world are the
//! relay's business (Postfix, msmtpd, ...).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Command, Stdio};
use std::time::Duration;

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
        if let Err(e) = run_command(argv, job) {
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
    let subject = format!(
        "vmbackup {}: {} ok, {} failed{}",
        job.schedule,
        ok,
        failed,
        if other > 0 {
            format!(", {other} skipped or missed")
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
        subject.replace(['\r', '\n'], " "),
        jiff::Timestamp::now().as_nanosecond(),
        std::process::id()
    );
    for line in body.lines() {
        // Dot-stuffing: a line starting with '.' gets one more.
        if line.starts_with('.') {
            msg.push('.');
        }
        msg.push_str(line);
        msg.push_str("\r\n");
    }
    msg.push_str(".\r\n");
    s.writer.write_all(msg.as_bytes()).map_err(|e| s.io(e))?;
    s.expect("end of data", 2)?;
    let _ = s.command("QUIT", 2);
    Ok(())
}

fn run_command(argv: &[String], job: &JobReport) -> Result<(), NotifyError> {
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
        .spawn()
        .map_err(spawn)?;
    let json = serde_json::to_vec(job).expect("a report serializes");
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input is its own business: ignore EPIPE.
        let _ = stdin.write_all(&json);
    }
    let status = child.wait().map_err(spawn)?;
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
    fn the_command_gets_json_and_its_failure_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("report.json");
        let argv = vec![
            "/usr/bin/tee".to_string(),
            out.to_string_lossy().into_owned(),
        ];
        run_command(&argv, &job()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(v["schedule"], "nightly");
        assert_eq!(v["results"][1]["status"], "failed");
        let e = run_command(&["/bin/false".to_string()], &job()).unwrap_err();
        assert!(matches!(e, NotifyError::CommandFailed { .. }));
    }

    #[test]
    fn addresses_cannot_inject_commands() {
        assert!(check_address("a@b\r\nRCPT TO:<x@y>").is_err());
        assert!(check_address("ops@example.com").is_ok());
    }
}
