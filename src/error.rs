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
use crate::mount::error::MountError;
use crate::names::NameError;
use crate::notify::NotifyError;
use crate::repository::RepoError;
use crate::schedule::ScheduleError;
use crate::state::StateError;
use crate::thaw_guard::ThawGuardError;
use crate::vm_state::VmStateError;

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
    #[error("config {key}: {detail}")]
    Config { key: String, detail: String },
    #[error("refused by pre-flight: {}", .0.refusals().join("; "))]
    Refused(Box<crate::preflight::Report>),
    /// Refused because of the state something is in (a VM running, a backup pinned): exit
    /// 3, as a pre-flight refusal; trying again will not help until that changes.
    #[error("refused: {0}")]
    RefusedState(String),
    #[error("busy: {0}")]
    Busy(String),
    /// The repository is locked by other jobs (a gc against backups, backups against a gc),
    /// on this host or another: exit 4.
    #[error("busy: the repository is locked by {}", holders_words(.holders))]
    RepoLocked {
        /// Who holds the locks in the way (empty when none of them could be read).
        holders: Vec<crate::locks::Holder>,
    },
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
    #[error(transparent)]
    VmState(#[from] VmStateError),
    #[error("report")]
    Notify(#[from] NotifyError),
    #[error("mount")]
    Mount(#[from] MountError),
    /// An instant restore that could not finish: the VM runs on the backup.
    #[error("{0}")]
    Instant(String),
}

impl Error {
    /// The exit code the command-line contract gives this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Libvirt(e) => libvirt_code(e),
            Error::Schedule(e) => schedule_code(e),
            Error::State(e) => state_code(e),
            Error::Repo(e) => repo_code(e),
            Error::Image(e) => image_code(e),
            Error::Lock(e) => lock_code(e),
            Error::NoQemu { .. }
            | Error::InvalidName(_)
            | Error::Config { .. }
            | Error::Invalid(_) => exit::BAD_INPUT,
            Error::Refused(_) | Error::RefusedState(_) => exit::REFUSED,
            Error::Busy(_) | Error::RepoLocked { .. } | Error::Mount(MountError::Busy { .. }) => {
                exit::BUSY
            }
            Error::Interrupted => crate::interrupt::exit_code(),
            _ => exit::FAILED,
        }
    }

    /// Whether this error says that something else holds the VM or the repository.
    pub fn is_busy(&self) -> bool {
        self.exit_code() == exit::BUSY
    }

    /// Who holds the lock that made this error busy, when it is known: the VM lock's holder,
    /// or the first of the repository's (`RepoLocked` has them all).
    pub fn holder(&self) -> Option<&crate::locks::Holder> {
        match self {
            Error::Lock(LockError::Busy { holder, .. }) => holder.as_deref(),
            Error::RepoLocked { holders } => holders.first(),
            _ => None,
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

fn holders_words(holders: &[crate::locks::Holder]) -> String {
    match holders {
        [] => "another job (its lock cannot be read)".into(),
        [h] => h.describe(),
        [h, rest @ ..] => format!("{} and {} more", h.describe(), rest.len()),
    }
}

fn libvirt_code(e: &LibvirtError) -> i32 {
    match e {
        LibvirtError::NoDomain(_) => exit::BAD_INPUT,
        _ => exit::FAILED,
    }
}

fn schedule_code(e: &ScheduleError) -> i32 {
    match e {
        ScheduleError::Invalid(_) => exit::BAD_INPUT,
        ScheduleError::SlotFull(_) => exit::REFUSED,
    }
}

fn state_code(e: &StateError) -> i32 {
    match e {
        StateError::NoSchedule(_) | StateError::ScheduleExists(_) => exit::BAD_INPUT,
        _ => exit::FAILED,
    }
}

fn repo_code(e: &RepoError) -> i32 {
    match e {
        RepoError::NotFound(_)
        | RepoError::BadName(_)
        | RepoError::NotARepository(_)
        | RepoError::Location(_) => exit::BAD_INPUT,
        // A missing or wrong key, an `init` of an existing repository.
        RepoError::Crypt(c) => match c {
            crate::repository::crypt::CryptError::Internal(_) => exit::FAILED,
            _ => exit::BAD_INPUT,
        },
        _ => exit::FAILED,
    }
}

fn image_code(e: &ImageError) -> i32 {
    match e {
        ImageError::InUse { .. } => exit::BUSY,
        ImageError::Interrupted => crate::interrupt::exit_code(),
        _ => exit::FAILED,
    }
}

fn lock_code(e: &LockError) -> i32 {
    match e {
        LockError::Busy { .. } => exit::BUSY,
        LockError::Io { .. } => exit::FAILED,
    }
}

/// The exit code of the first error in a chain that the library knows, whichever module's
/// error it is (callers may pass a module's error on without wrapping it in `Error`);
/// `FAILED` when none is.
pub fn exit_code_in<'a>(
    chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> i32 {
    for e in chain {
        let code = if let Some(e) = e.downcast_ref::<Error>() {
            e.exit_code()
        } else if let Some(e) = e.downcast_ref::<LibvirtError>() {
            libvirt_code(e)
        } else if let Some(e) = e.downcast_ref::<ScheduleError>() {
            schedule_code(e)
        } else if let Some(e) = e.downcast_ref::<StateError>() {
            state_code(e)
        } else if let Some(e) = e.downcast_ref::<RepoError>() {
            repo_code(e)
        } else if let Some(e) = e.downcast_ref::<ImageError>() {
            image_code(e)
        } else if let Some(e) = e.downcast_ref::<LockError>() {
            lock_code(e)
        } else if e.is::<NameError>() {
            exit::BAD_INPUT
        } else {
            continue;
        };
        return code;
    }
    exit::FAILED
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_errors_keep_their_exit_codes_unwrapped_or_wrapped() {
        let slot = ScheduleError::SlotFull("full".into());
        let chain: [&(dyn std::error::Error + 'static); 1] = [&slot];
        assert_eq!(exit_code_in(chain), exit::REFUSED);
        let wrapped = Error::from(ScheduleError::SlotFull("full".into()));
        assert_eq!(wrapped.exit_code(), exit::REFUSED);
        let busy = LockError::Busy {
            vm: "web".into(),
            holder: None,
        };
        let io = std::io::Error::other("x");
        let chain: [&(dyn std::error::Error + 'static); 2] = [&io, &busy];
        assert_eq!(
            exit_code_in(chain),
            exit::BUSY,
            "the first known error counts"
        );
        assert_eq!(
            Error::from(LibvirtError::NoDomain("x".into())).exit_code(),
            exit::BAD_INPUT
        );
        assert_eq!(
            exit_code_in([&io as &(dyn std::error::Error + 'static)]),
            exit::FAILED
        );
    }
}
