//! The library's typed errors. Messages are short; the cause (a libvirt error, an I/O error)
//! travels as `source` so that the binary prints the whole chain exactly once.

use std::path::PathBuf;

/// Exit codes of the command-line contract (DESIGN.md).
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILED: i32 = 1;
    pub const BAD_INPUT: i32 = 2;
    pub const REFUSED: i32 = 3;
    pub const BUSY: i32 = 4;
    pub const PARTIAL: i32 = 5;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to libvirt at {uri}")]
    Connect {
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("no domain named {0:?}")]
    NoDomain(String),
    #[error("invalid name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("{op} failed for domain {domain}")]
    Libvirt {
        op: &'static str,
        domain: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("the guest agent of {domain} does not answer")]
    AgentUnavailable {
        domain: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("guest agent command {command} of {domain} failed")]
    Agent {
        domain: String,
        command: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("unexpected guest agent reply to {command}: {detail}")]
    AgentReply { command: String, detail: String },
    #[error("timed out after {secs:.1}s waiting for {what}")]
    Timeout { what: String, secs: f64 },
    #[error("domain XML: {0}")]
    Xml(String),
    #[error("{what}: {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed: {detail}")]
    Command { program: String, detail: String },
    #[error("config {}: {detail}", path.display())]
    Config { path: PathBuf, detail: String },
    #[error("refused by pre-flight: {}", .0.refusals().join("; "))]
    Refused(Box<crate::preflight::Report>),
    #[error("busy: {0}")]
    Busy(String),
    #[error("interrupted")]
    Interrupted,
    #[error("commit back: {0}")]
    CommitBack(String),
    #[error("repository")]
    Repo(#[from] crate::repository::RepoError),
    #[error("disk image")]
    Image(#[from] crate::image::ImageError),
    #[error("no plain QEMU VM {name:?} (no QMP socket {})", path.display())]
    NoQemu { name: String, path: PathBuf },
    #[error("QEMU")]
    Qmp(#[from] crate::hypervisor::qmp::QmpError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    SlotFull(String),
    #[error("report")]
    Notify(#[from] crate::notify::NotifyError),
}

impl Error {
    /// The exit code the command-line contract gives this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::NoDomain(_)
            | Error::NoQemu { .. }
            | Error::InvalidName { .. }
            | Error::Config { .. }
            | Error::Invalid(_)
            | Error::State(crate::state::StateError::NoSchedule(_))
            | Error::State(crate::state::StateError::ScheduleExists(_)) => exit::BAD_INPUT,
            Error::Repo(crate::repository::RepoError::NotFound(_))
            | Error::Repo(crate::repository::RepoError::BadName(_)) => exit::BAD_INPUT,
            Error::Refused(_) | Error::SlotFull(_) => exit::REFUSED,
            Error::Busy(_) => exit::BUSY,
            _ => exit::FAILED,
        }
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line, `a: b: c`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
