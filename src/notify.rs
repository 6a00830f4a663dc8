//! Job reports: when a job ends (each schedule of a `run-due`, a manual `backup`, a `restore`,
//! a `delete`, a `prune`), a report with a per-VM table (times in UTC) is sent by e-mail
//! and/or given as JSON on the standard input of a command. `vmbackup report test` sends a
//! sample through every configured channel. All of it is set in the config file's `[report]`
//! table:
//!
//! ```toml
//! [report]
//! on = "always"                  # "always" (default), "failure" (only jobs with a failure),
//!                                # "never"
//! smtp = "mail.example.com:587"  # host[:port] of the mail server
//! tls = "starttls"               # "none", "starttls" or "tls"; see below
//! username = "vmbackup"          # AUTH (PLAIN or LOGIN); needs tls and password_file
//! password_file = "/etc/vmbackup/smtp-password"   # mode 0600, the password on one line
//! ca_file = "/etc/vmbackup/mail-ca.pem"           # a private CA, besides the system's
//! from = "vmbackup@host.example" # default vmbackup@HOSTNAME
//! to = ["ops@example.com"]
//! command = ["/usr/local/bin/backup-hook", "--source", "vmbackup"]   # argv, no shell
//! command_timeout_secs = 120     # the command is killed (its whole process group) after this
//! ```
//!
//! **Mail.** `tls = "none"` is plain SMTP (a relay on localhost:25 that takes mail from this
//! host: Postfix, msmtpd...), `"starttls"` upgrades the connection with STARTTLS and fails if
//! the server does not offer it, `"tls"` is TLS from the first byte (SMTPS, port 465). Without
//! `tls`, it follows the port: 465 is `tls`, 587 is `starttls`, any other port `none`; but a
//! `username` makes it `starttls` (a password never goes in clear: `tls = "none"` with a
//! `username` is refused). Without a port: 25, 587 or 465 by that mode. The server's certificate
//! is checked against the system's CAs plus `ca_file`, and its name against the host of `smtp`.
//! Every address the host resolves to is tried in turn. The message is made with `lettre`: the
//! subject is encoded (RFC 2047) when it is not ASCII, the body is 7-bit (quoted-printable when
//! it has non-ASCII text or lines longer than SMTP allows), so no 8BITMIME is needed; and
//! 8BITMIME/SMTPUTF8 are checked before anything that would need them is sent. The password is
//! read when a mail is sent, never logged and never in any `--json`.
//!
//! **Policy.** `on = "failure"` sends only the reports of jobs where something failed (a VM not
//! `ok`, a boot test that did not pass, a retention deletion that failed). A dry run sends
//! nothing; nor does bad input (exit 2). A report that cannot be sent makes `run-due` exit 5;
//! for a manual command it is logged (stderr) and the command's exit code stays that of the job.
//!
//! **The command** (hook) gets one JSON document (`Report`) on stdin, version 1:
//!
//! | field | |
//! |---|---|
//! | `version` | 1 |
//! | `kind` | `schedule`, `backup`, `restore`, `delete`, `prune` or `test` |
//! | `host` | this host's name |
//! | `status` | `ok`, or `failed` when anything failed (see Policy) |
//! | `subject` | the mail's subject, e.g. `vmbackup nightly: 2 ok (1 crash-consistent), 1 failed` |
//! | `at` | when the report was made (RFC 3339 UTC) |
//! | `schedule`, `recurrence`, `slot`, `run_at` | the schedule and the run-due's time (`kind` `schedule`; else null) |
//! | `results` | one per VM (or per deleted backup): see below |
//!
//! Each result: `vm`, `status` (`ok`, `failed`, `skipped`, `missed`), `due` (scheduled jobs,
//! else null), `backup_id` (the backup made, restored or deleted), `consistency`
//! (`application` or `crash`), `freeze_ms`, `stored_bytes`, `started_at`, `ended_at`, `error`,
//! `pruned` (ids retention deleted), `prune_errors`, `boot_test` (the boot test's record, if one
//! ran). The command runs without a shell in its own process group, its stdout discarded; it
//! fails the report if it exits non-zero or runs longer than `command_timeout_secs` (default
//! 120), after which the group is killed.
//!
//! Report text carries strings from elsewhere (error chains with the guest agent's or QEMU's
//! words, disk paths): control characters but TAB and LF become spaces (`sanitize_text`), and
//! header values lose theirs, so nothing in a report can add a header or end the DATA early
//! (lettre dot-stuffs the body and encodes it).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{Message, SmtpTransport, Transport};
use serde::{Deserialize, Serialize};

use crate::repository::location::Secret;
pub use crate::schedule::report::{JobReport, VmResult};

/// When reports are sent.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    #[default]
    Always,
    Failure,
    Never,
}

/// How the mail server is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Starttls,
    Tls,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// Which jobs' reports are sent (default: every one).
    pub on: Option<Policy>,
    /// `host[:port]` of the mail server.
    pub smtp: Option<String>,
    pub tls: Option<TlsMode>,
    pub username: Option<String>,
    /// A file (mode 0600) holding the password.
    pub password_file: Option<PathBuf>,
    /// PEM certificates of a private CA the mail server's certificate may be signed by.
    pub ca_file: Option<PathBuf>,
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

/// The mail server as resolved from `smtp`, `tls` and `username`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
}

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
        if self.username.is_some() != self.password_file.is_some() {
            return Err(NotifyError::Config(
                "username and password_file go together: give both or neither".into(),
            ));
        }
        if self.smtp.is_none() {
            return Ok(());
        }
        let server = self.server()?;
        if server.tls == TlsMode::None && self.username.is_some() {
            return Err(NotifyError::Config(
                "tls = \"none\" with a username would send the password in clear: \
                 use tls = \"starttls\" or \"tls\""
                    .into(),
            ));
        }
        if self.to.is_empty() {
            return Err(NotifyError::Config("smtp is set but `to` is empty".into()));
        }
        for a in self.to.iter().chain(&self.from) {
            address(a)?;
        }
        Ok(())
    }

    pub fn policy(&self) -> Policy {
        self.on.unwrap_or_default()
    }

    /// The mail server; `None` when no mail is sent.
    pub fn server(&self) -> Result<Server, NotifyError> {
        let smtp = self
            .smtp
            .as_deref()
            .ok_or_else(|| NotifyError::Config("smtp is not set".into()))?;
        let bad = || {
            NotifyError::Config(format!(
                "smtp {smtp:?} is not HOST or HOST:PORT (an IPv6 address in brackets)"
            ))
        };
        let (host, port) = if let Some(rest) = smtp.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (h, None),
                p => (h, Some(p.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else {
            match smtp.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                Some(_) => return Err(bad()),
                None => (smtp, None),
            }
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad());
        }
        let port = port
            .map(|p| p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(bad))
            .transpose()?;
        let tls = self.tls.unwrap_or(match port {
            Some(465) => TlsMode::Tls,
            Some(587) => TlsMode::Starttls,
            _ if self.username.is_some() => TlsMode::Starttls,
            _ => TlsMode::None,
        });
        let port = port.unwrap_or(match tls {
            TlsMode::None => 25,
            TlsMode::Starttls => 587,
            TlsMode::Tls => 465,
        });
        Ok(Server {
            host: host.to_string(),
            port,
            tls,
        })
    }

    fn command_timeout(&self) -> Duration {
        self.command_timeout_secs
            .map_or(DEFAULT_COMMAND_TIMEOUT, Duration::from_secs)
    }

    /// Whether any channel is configured.
    pub fn any(&self) -> bool {
        self.smtp.is_some() || self.command.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("mail through {server}: {detail}")]
    Mail { server: String, detail: String },
    #[error("mail: bad address {address:?}: {detail}")]
    Address { address: String, detail: String },
    #[error("mail: password_file {}: {why}", path.display())]
    Password { path: PathBuf, why: String },
    #[error("mail: ca_file {}: {why}", path.display())]
    CaFile { path: PathBuf, why: String },
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

/// What kind of job a report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Schedule,
    Backup,
    Restore,
    Delete,
    Prune,
    Test,
}

impl JobKind {
    fn label(self) -> &'static str {
        match self {
            JobKind::Schedule => "scheduled backup",
            JobKind::Backup => "backup",
            JobKind::Restore => "restore",
            JobKind::Delete => "delete",
            JobKind::Prune => "prune",
            JobKind::Test => "test",
        }
    }
}

/// `ok` or `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Failed,
}

/// A report: what the mail says and the JSON document the command gets (see the module's
/// documentation for its fields).
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Report {
    pub version: u32,
    pub kind: JobKind,
    pub host: String,
    pub status: Status,
    pub subject: String,
    pub at: String,
    pub schedule: Option<String>,
    pub recurrence: Option<String>,
    pub slot: Option<String>,
    pub run_at: Option<String>,
    pub results: Vec<VmResult>,
}

impl Report {
    /// A report of `kind` about `results`.
    pub fn new(kind: JobKind, results: Vec<VmResult>) -> Report {
        let mut r = Report {
            version: 1,
            kind,
            host: hostname(),
            status: Status::Ok,
            subject: String::new(),
            at: now(),
            schedule: None,
            recurrence: None,
            slot: None,
            run_at: None,
            results,
        };
        r.finish();
        r
    }

    /// The report of one schedule's part of a run-due.
    pub fn scheduled(job: &JobReport) -> Report {
        let mut r = Report::new(JobKind::Schedule, job.results.clone());
        r.schedule = Some(job.schedule.clone());
        r.recurrence = Some(job.recurrence.clone());
        r.slot = Some(job.slot.clone());
        r.run_at = Some(job.run_at.clone());
        r.finish();
        r
    }

    /// The sample `report test` sends.
    pub fn sample() -> Report {
        let mut vm = VmResult::new("example-vm", "ok");
        vm.backup_id = Some("example-vm-20270104-021000".into());
        vm.consistency = Some("application".into());
        vm.started = Some(now());
        vm.ended = Some(now());
        let mut r = Report::new(JobKind::Test, vec![vm]);
        r.subject = format!("vmbackup test report from {}", r.host);
        r
    }

    fn finish(&mut self) {
        self.status = if self.failures() > 0 {
            Status::Failed
        } else {
            Status::Ok
        };
        self.subject = subject(self);
    }

    fn count(&self, status: &str) -> usize {
        self.results.iter().filter(|r| r.status == status).count()
    }

    fn boot_tests_failed(&self) -> usize {
        self.results
            .iter()
            .filter(|r| r.boot_test.as_ref().is_some_and(|t| t.error.is_some()))
            .count()
    }

    /// VMs not ok, boot tests that did not pass and retention deletions that failed.
    pub fn failures(&self) -> usize {
        self.results.len() - self.count("ok")
            + self.boot_tests_failed()
            + self
                .results
                .iter()
                .filter(|r| !r.prune_errors.is_empty())
                .count()
    }
}

impl VmResult {
    /// A result with `vm` and `status` and nothing else.
    pub fn new(vm: &str, status: &str) -> VmResult {
        VmResult {
            vm: vm.to_string(),
            due: None,
            status: status.to_string(),
            backup_id: None,
            consistency: None,
            freeze_ms: None,
            stored_bytes: None,
            started: None,
            ended: None,
            error: None,
            pruned: Vec::new(),
            prune_errors: Vec::new(),
            boot_test: None,
        }
    }

    /// `ok` with `backup_id`, or `failed` with the error.
    pub fn outcome<E: std::fmt::Display>(
        vm: &str,
        backup_id: Option<&str>,
        r: Result<(), E>,
    ) -> VmResult {
        let mut v = VmResult::new(vm, if r.is_ok() { "ok" } else { "failed" });
        v.backup_id = backup_id.map(str::to_string);
        v.error = r.err().map(|e| e.to_string());
        v.ended = Some(now());
        v
    }

    /// What retention did to `vm`'s backups: `None` when it did nothing.
    pub fn pruned(vm: &str, deleted: &[String], errors: &[String]) -> Option<VmResult> {
        if deleted.is_empty() && errors.is_empty() {
            return None;
        }
        let mut v = VmResult::new(vm, if deleted.is_empty() { "failed" } else { "ok" });
        v.pruned = deleted.to_vec();
        v.prune_errors = errors.to_vec();
        v.ended = Some(now());
        Some(v)
    }
}

/// Now, RFC 3339 UTC to the second.
pub fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or_else(|_| jiff::Timestamp::now())
        .to_string()
}

/// Sends the report of a manual job (`backup`, `restore`, `delete`, `prune`) by the `on`
/// policy; nothing configured is nothing to do. A report that cannot be sent is logged, not
/// returned: the job is done either way.
pub fn job_done(cfg: &ReportConfig, kind: JobKind, results: Vec<VmResult>) {
    if results.is_empty() || !cfg.any() {
        return;
    }
    let report = Report::new(kind, results);
    if let Err(e) = send(cfg, &report) {
        tracing::error!(
            kind = kind.label(),
            "report not sent: {}",
            crate::error_text::chain(&e)
        );
    }
}

/// Sends `report` wherever the config says, if the `on` policy wants it; nothing configured
/// is not an error. Every channel is tried; the first error is returned.
pub fn send(cfg: &ReportConfig, report: &Report) -> Result<(), NotifyError> {
    let wanted = match cfg.policy() {
        Policy::Always => true,
        Policy::Failure => report.status == Status::Failed,
        Policy::Never => false,
    };
    if !wanted {
        return Ok(());
    }
    deliver(cfg, report)
        .into_iter()
        .find_map(|(_, r)| r.err())
        .map_or(Ok(()), Err)
}

/// One channel's outcome in `report test`.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ChannelResult {
    /// `mail` or `command`.
    pub channel: String,
    /// The mail server and recipients, or the command's program.
    pub target: String,
    pub ok: bool,
    pub error: Option<String>,
}

/// `report test`: the sample report through every configured channel, whatever `on` says.
pub fn test(cfg: &ReportConfig) -> Vec<ChannelResult> {
    deliver(cfg, &Report::sample())
        .into_iter()
        .map(|(mut c, r)| {
            if let Err(e) = r {
                c.ok = false;
                c.error = Some(crate::error_text::chain(&e));
            }
            c
        })
        .collect()
}

/// Sends through every channel; each one's outcome.
fn deliver(cfg: &ReportConfig, report: &Report) -> Vec<(ChannelResult, Result<(), NotifyError>)> {
    let mut out = Vec::new();
    if let Some(smtp) = &cfg.smtp {
        let c = ChannelResult {
            channel: "mail".into(),
            target: format!("{smtp} to {}", cfg.to.join(", ")),
            ok: true,
            error: None,
        };
        let r = send_mail(cfg, &report.subject, &render(report));
        out.push((c, r));
    }
    if let Some(argv) = &cfg.command {
        let c = ChannelResult {
            channel: "command".into(),
            target: argv.first().cloned().unwrap_or_default(),
            ok: true,
            error: None,
        };
        let r = run_command(argv, report, cfg.command_timeout());
        out.push((c, r));
    }
    for (c, r) in &mut out {
        if let Err(e) = r {
            c.ok = false;
            tracing::error!(channel = %c.channel, "report not sent: {}", crate::error_text::chain(e));
        }
    }
    out
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// The subject: what ran and how many were ok, crash-consistent (the backups whose quiesce
/// fell back or was off), failed, skipped or missed, and did not pass their boot test.
fn subject(r: &Report) -> String {
    let ok = r.count("ok");
    let failed = r.count("failed");
    let other = r.results.len() - ok - failed;
    let crash = r
        .results
        .iter()
        .filter(|v| v.status == "ok" && v.consistency.as_deref() == Some("crash"))
        .count();
    let boot_failed = r.boot_tests_failed();
    let prune_failed = r
        .results
        .iter()
        .filter(|v| !v.prune_errors.is_empty())
        .count();
    let what = match (&r.schedule, r.kind) {
        (Some(s), _) => s.clone(),
        (None, kind) => kind.label().to_string(),
    };
    let mut s = format!("vmbackup {what}: {ok} ok");
    if crash > 0 {
        s.push_str(&format!(" ({crash} crash-consistent)"));
    }
    s.push_str(&format!(", {failed} failed"));
    if other > 0 {
        s.push_str(&format!(", {other} skipped or missed"));
    }
    if boot_failed > 0 {
        s.push_str(&format!(", {boot_failed} did not pass the boot test"));
    }
    if prune_failed > 0 {
        s.push_str(&format!(", {prune_failed} with retention errors"));
    }
    sanitize_line(&s)
}

/// The plain-text body of a report.
pub fn render(report: &Report) -> String {
    let mut b = String::new();
    if report.kind == JobKind::Test {
        b.push_str(&format!(
            "This is a test report from vmbackup on {} at {} (UTC): the channels of the \
             [report] settings work.\nA real report looks like this:\n\n",
            report.host, report.at
        ));
    }
    match (
        &report.schedule,
        &report.recurrence,
        &report.slot,
        &report.run_at,
    ) {
        (Some(s), Some(rec), Some(slot), Some(at)) => b.push_str(&format!(
            "Schedule {s} ({rec}, slot {slot}) on {}\nrun-due at {at} (UTC)\n\n",
            report.host
        )),
        _ => b.push_str(&format!(
            "{} on {}, {} (UTC)\n\n",
            report.kind.label(),
            report.host,
            report.at
        )),
    }
    b.push_str(&format!(
        "{:<20} {:<8} {:<25} {:<25} {:<25} {}\n",
        "VM", "STATUS", "DUE (UTC)", "START (UTC)", "END (UTC)", "BACKUP / ERROR"
    ));
    for r in &report.results {
        let mut what = String::new();
        if let Some(id) = &r.backup_id {
            what.push_str(id);
            if let Some(c) = &r.consistency {
                what.push_str(&format!(" ({c}"));
                if let Some(f) = r.freeze_ms {
                    what.push_str(&format!(", frozen {f} ms"));
                }
                what.push(')');
            }
        }
        if let Some(t) = &r.boot_test {
            match (&t.error, t.seconds_to_agent) {
                (None, Some(secs)) => {
                    what.push_str(&format!("; boot test passed (agent after {secs:.1} s)"))
                }
                (None, None) => what.push_str("; boot test passed"),
                (Some(e), _) => what.push_str(&format!("; boot test FAILED: {e}")),
            }
        }
        if !r.pruned.is_empty() {
            if !what.is_empty() {
                what.push_str("; ");
            }
            what.push_str(&format!("pruned {}", r.pruned.join(", ")));
        }
        for e in &r.prune_errors {
            what.push_str(&format!("; prune error: {e}"));
        }
        if let Some(e) = &r.error {
            if !what.is_empty() {
                what.push_str(": ");
            }
            what.push_str(e);
        }
        b.push_str(&format!(
            "{:<20} {:<8} {:<25} {:<25} {:<25} {}\n",
            r.vm,
            r.status,
            r.due.as_deref().unwrap_or("-"),
            r.started.as_deref().unwrap_or("-"),
            r.ended.as_deref().unwrap_or("-"),
            what.trim_start_matches("; ")
        ));
    }
    b
}

/// One header line: every control character (CR and LF among them) becomes a space.
fn sanitize_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A body's text: LF and CRLF end lines (as LF; lettre sends CRLF), a bare CR and every other
/// control character but TAB become a space.
pub fn sanitize_text(body: &str) -> String {
    body.replace("\r\n", "\n")
        .chars()
        .map(|c| {
            if c.is_control() && c != '\t' && c != '\n' {
                ' '
            } else {
                c
            }
        })
        .collect()
}

fn address(a: &str) -> Result<lettre::message::Mailbox, NotifyError> {
    a.parse::<lettre::message::Mailbox>()
        .map_err(|e| NotifyError::Address {
            address: a.to_string(),
            detail: e.to_string(),
        })
}

/// The password in `path`: a regular file of mode 0600 (or stricter), its first line.
fn read_password(path: &Path) -> Result<Secret, NotifyError> {
    let bad = |why: String| NotifyError::Password {
        path: path.to_path_buf(),
        why,
    };
    let text = crate::repository::location::read_private_file(path).map_err(bad)?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(bad("is empty".into()));
    }
    Ok(Secret::new(line.to_string()))
}

/// One plain-text mail: the subject RFC 2047-encoded when it is not ASCII, the body 7-bit or
/// quoted-printable (long lines, non-ASCII text).
fn message(
    from: lettre::message::Mailbox,
    to: &[String],
    subject: &str,
    body: &str,
) -> Result<Message, NotifyError> {
    let mut m = Message::builder()
        .from(from)
        .subject(sanitize_line(subject))
        .date_now()
        .header(ContentType::TEXT_PLAIN);
    for t in to {
        m = m.to(address(t)?);
    }
    m.body(sanitize_text(body))
        .map_err(|e| NotifyError::Config(format!("cannot make the mail: {e}")))
}

/// Sends one plain-text mail as `cfg` says.
pub fn send_mail(cfg: &ReportConfig, subject: &str, body: &str) -> Result<(), NotifyError> {
    let server = cfg.server()?;
    let from = address(
        &cfg.from
            .clone()
            .unwrap_or_else(|| format!("vmbackup@{}", hostname())),
    )?;
    if cfg.to.is_empty() {
        return Err(NotifyError::Config("smtp is set but `to` is empty".into()));
    }
    let name = format!("{}:{}", server.host, server.port);
    let fail = |detail: String| NotifyError::Mail {
        server: name.clone(),
        detail,
    };
    let message = message(from, &cfg.to, subject, body)?;
    let mut t = SmtpTransport::builder_dangerous(server.host.clone())
        .port(server.port)
        .timeout(Some(TIMEOUT))
        .hello_name(ClientId::Domain(hostname()));
    if server.tls != TlsMode::None {
        let mut params = TlsParameters::builder(server.host.clone());
        if let Some(ca) = &cfg.ca_file {
            let ca_err = |why: String| NotifyError::CaFile {
                path: ca.clone(),
                why,
            };
            let pem = std::fs::read(ca).map_err(|e| ca_err(e.to_string()))?;
            params = params.add_root_certificate(
                Certificate::from_pem(&pem).map_err(|e| ca_err(e.to_string()))?,
            );
        }
        let params = params
            .build_rustls()
            .map_err(|e| fail(format!("TLS settings: {e}")))?;
        t = t.tls(match server.tls {
            TlsMode::Tls => Tls::Wrapper(params),
            _ => Tls::Required(params),
        });
    }
    if let (Some(user), Some(path)) = (&cfg.username, &cfg.password_file) {
        let password = read_password(path)?;
        t = t.credentials(Credentials::new(
            user.clone(),
            password.expose().to_string(),
        ));
    }
    let response = t.build().send(&message).map_err(|e| fail(e.to_string()))?;
    tracing::debug!(server = %name, code = %response.code(), "report mail sent");
    Ok(())
}

fn run_command(argv: &[String], report: &Report, timeout: Duration) -> Result<(), NotifyError> {
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
    let json = serde_json::to_vec(report).expect("a report serializes");
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
    use std::os::unix::fs::PermissionsExt;

    fn job() -> JobReport {
        let r = |vm: &str, status: &str, id: Option<&str>, err: Option<&str>| VmResult {
            vm: vm.into(),
            due: Some("2027-01-04T02:10:00Z".into()),
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
        let r = Report::scheduled(&job());
        let body = render(&r);
        assert_eq!(r.subject, "vmbackup nightly: 1 ok, 1 failed");
        assert_eq!(r.status, Status::Failed);
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
        let r = Report::scheduled(&j);
        let body = render(&r);
        assert_eq!(
            r.subject,
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
        let r = Report::scheduled(&j);
        let body = render(&r);
        assert_eq!(r.subject, "vmbackup nightly: 1 ok, 1 failed");
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
        run_command(&argv, &Report::scheduled(&job()), DEFAULT_COMMAND_TIMEOUT).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(v["schedule"], "nightly");
        assert_eq!(v["kind"], "schedule");
        assert_eq!(v["version"], 1);
        assert_eq!(v["status"], "failed");
        assert_eq!(v["subject"], "vmbackup nightly: 1 ok, 1 failed");
        assert_eq!(v["results"][1]["status"], "failed");
        let e = run_command(
            &["/bin/false".to_string()],
            &Report::scheduled(&job()),
            DEFAULT_COMMAND_TIMEOUT,
        )
        .unwrap_err();
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
        let e = run_command(&argv, &Report::scheduled(&job()), Duration::from_secs(1)).unwrap_err();
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
    fn report_text_has_no_bare_cr_and_no_control_characters() {
        let hostile = "ok\r\n.\r\nMAIL FROM:<x@y>\nerr\r.\r\nDATA\n.\n\u{1b}[2Jtab\there\r\n..two";
        assert_eq!(
            sanitize_text(hostile),
            "ok\n.\nMAIL FROM:<x@y>\nerr .\nDATA\n.\n [2Jtab\there\n..two"
        );
        assert_eq!(sanitize_line("x\r\nBcc: y\u{0}"), "x  Bcc: y ");
    }

    #[test]
    fn mails_are_7_bit_with_encoded_subjects_and_wrapped_long_lines() {
        let long = format!("db01 failed: {}\n", "x".repeat(3000));
        let m = message(
            address("vmbackup@test.invalid").unwrap(),
            &["ops@example.com".into()],
            "vmbackup nächtlich: 1 ok, 0 failed",
            &format!("Sicherung für web01 fertig\n{long}"),
        )
        .unwrap();
        let raw = m.formatted();
        assert!(raw.is_ascii(), "{}", String::from_utf8_lossy(&raw));
        let text = String::from_utf8(raw).unwrap();
        // The 3000-character line is cut by soft line breaks; no line reaches SMTP's limit.
        assert!(text.lines().all(|l| l.len() < 998), "{text}");
        assert!(text.contains("=\r\n"), "{text}");
        let subject = text.lines().find(|l| l.starts_with("Subject: ")).unwrap();
        assert!(subject.contains("=?utf-8?"), "{subject}");
        assert!(
            text.contains("Content-Transfer-Encoding: quoted-printable"),
            "{text}"
        );
        assert!(text.contains("f=C3=BCr web01"), "{text}");
    }

    #[test]
    fn addresses_cannot_inject_commands() {
        assert!(address("a@b\r\nRCPT TO:<x@y>").is_err());
        assert!(address("ops@example.com").is_ok());
    }

    #[test]
    fn subjects_count_crash_consistent_backups_and_kinds_are_named() {
        let mut j = job();
        j.results[1] = j.results[0].clone();
        j.results[1].vm = "db01".into();
        j.results[1].consistency = Some("crash".into());
        let mut third = j.results[0].clone();
        third.status = "failed".into();
        j.results.push(third);
        assert_eq!(
            Report::scheduled(&j).subject,
            "vmbackup nightly: 2 ok (1 crash-consistent), 1 failed"
        );
        let r = Report::new(
            JobKind::Restore,
            vec![VmResult::outcome::<String>(
                "web01",
                Some("web01-1"),
                Ok(()),
            )],
        );
        assert_eq!(r.subject, "vmbackup restore: 1 ok, 0 failed");
        assert_eq!(r.status, Status::Ok);
        let mut p = VmResult::new("web01", "ok");
        p.prune_errors = vec!["x".into()];
        let r = Report::new(JobKind::Prune, vec![p]);
        assert_eq!(r.status, Status::Failed);
        assert_eq!(
            r.subject,
            "vmbackup prune: 1 ok, 0 failed, 1 with retention errors"
        );
    }

    #[test]
    fn the_policy_decides_which_reports_are_sent() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sent");
        let cfg = |on: Option<Policy>| ReportConfig {
            on,
            command: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("cat >> {}", out.display()),
            ]),
            ..ReportConfig::default()
        };
        let ok = Report::new(JobKind::Backup, vec![VmResult::new("a", "ok")]);
        let failed = Report::new(JobKind::Backup, vec![VmResult::new("a", "failed")]);
        let sent = || {
            std::fs::read_to_string(&out)
                .unwrap_or_default()
                .matches("\"version\"")
                .count()
        };
        send(&cfg(None), &ok).unwrap();
        assert_eq!(sent(), 1, "the default is always");
        send(&cfg(Some(Policy::Failure)), &ok).unwrap();
        assert_eq!(sent(), 1);
        send(&cfg(Some(Policy::Failure)), &failed).unwrap();
        assert_eq!(sent(), 2);
        send(&cfg(Some(Policy::Never)), &failed).unwrap();
        assert_eq!(sent(), 2);
    }

    #[test]
    fn the_mail_server_setting_gives_host_port_and_tls() {
        let c = |smtp: &str, tls: Option<TlsMode>, user: bool| ReportConfig {
            smtp: Some(smtp.into()),
            tls,
            username: user.then(|| "u".into()),
            password_file: user.then(|| "/p".into()),
            to: vec!["ops@example.com".into()],
            ..ReportConfig::default()
        };
        let s = |host: &str, port, tls| Server {
            host: host.into(),
            port,
            tls,
        };
        assert_eq!(
            c("127.0.0.1:25", None, false).server().unwrap(),
            s("127.0.0.1", 25, TlsMode::None)
        );
        assert_eq!(
            c("localhost", None, false).server().unwrap(),
            s("localhost", 25, TlsMode::None)
        );
        assert_eq!(
            c("mail.example.com", None, true).server().unwrap(),
            s("mail.example.com", 587, TlsMode::Starttls)
        );
        assert_eq!(
            c("mail.example.com:465", None, true).server().unwrap(),
            s("mail.example.com", 465, TlsMode::Tls)
        );
        assert_eq!(
            c("mail.example.com:587", None, false).server().unwrap(),
            s("mail.example.com", 587, TlsMode::Starttls)
        );
        assert_eq!(
            c("[::1]:2525", Some(TlsMode::Tls), false).server().unwrap(),
            s("::1", 2525, TlsMode::Tls)
        );
        assert_eq!(
            c("[::1]", None, false).server().unwrap(),
            s("::1", 25, TlsMode::None)
        );
        for bad in ["", "a:b", "::1:25", "host:0", "a b:25", "[::1]x"] {
            assert!(
                matches!(c(bad, None, false).check(), Err(NotifyError::Config(_))),
                "{bad}"
            );
        }
        let e = c("127.0.0.1:25", Some(TlsMode::None), true)
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("in clear"), "{e}");
        assert!(c("127.0.0.1:25", None, true).check().is_ok());
        let mut half = c("127.0.0.1:25", None, false);
        half.username = Some("u".into());
        assert!(half.check().is_err());
    }

    #[test]
    fn a_password_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_password(&p).unwrap_err();
        assert!(
            e.to_string().contains("0640") && !e.to_string().contains("s3cret"),
            "{e}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password(&p).unwrap().expose(), "s3cret");
    }
}
