//! The crate-wide error: the aggregate of the modules' own errors, at the level of the
//! operations (backup, restore, recover, schedules). It maps every error to an exit code of
//! the command-line contract. Messages are short; the cause travels as `source` so that the
//! binary prints the whole chain exactly once.

use std::path::PathBuf;

use crate::hypervisor::libvirt::LibvirtError;
use crate::hypervisor::qmp::QmpError;
use crate::hypervisor::xml_edit::XmlError;
use crate::image::ImageError;
use crate::locks::LockError;
use crate::names::NameError;
use crate::notify::NotifyError;
use crate::repository::RepoError;
use crate::schedule::ScheduleError;
use crate::state::StateError;
use crate::thaw_guard::ThawGuardError;

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
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error(transparent)]
    Xml(#[from] XmlError),
    #[error("{what}: {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed: {detail}")]
    Command { program: String, detail: String },
    #[error("timed out after {secs:.1}s waiting for {what}")]
    Timeout { what: String, secs: f64 },
    #[error("config {key}: {detail}")]
    Config { key: String, detail: String },
    #[error("refused by pre-flight: {}", .0.refusals().join("; "))]
    Refused(Box<crate::preflight::Report>),
    #[error("busy: {0}")]
    Busy(String),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("interrupted")]
    Interrupted,
    #[error("commit back: {0}")]
    CommitBack(String),
    #[error("repository")]
    Repo(#[from] RepoError),
    #[error("disk image")]
    Image(#[from] ImageError),
    #[error("no plain QEMU VM {name:?} (no QMP socket {})", path.display())]
    NoQemu { name: String, path: PathBuf },
    #[error("QEMU")]
    Qmp(#[from] QmpError),
    #[error("thaw guard")]
    ThawGuard(#[from] ThawGuardError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("report")]
    Notify(#[from] NotifyError),
}

impl Error {
    /// The exit code the command-line contract gives this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Libvirt(LibvirtError::NoDomain(_))
            | Error::NoQemu { .. }
            | Error::InvalidName(_)
            | Error::Config { .. }
            | Error::Invalid(_)
            | Error::Schedule(ScheduleError::Invalid(_))
            | Error::State(StateError::NoSchedule(_))
            | Error::State(StateError::ScheduleExists(_)) => exit::BAD_INPUT,
            Error::Repo(RepoError::NotFound(_)) | Error::Repo(RepoError::BadName(_)) => {
                exit::BAD_INPUT
            }
            Error::Refused(_) | Error::Schedule(ScheduleError::SlotFull(_)) => exit::REFUSED,
            Error::Busy(_)
            | Error::Lock(LockError::Busy(_))
            | Error::Image(ImageError::InUse { .. }) => exit::BUSY,
            _ => exit::FAILED,
        }
    }

    /// Whether this error says that something else holds the VM or the repository.
    pub fn is_busy(&self) -> bool {
        self.exit_code() == exit::BUSY
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
