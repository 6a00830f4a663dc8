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
    /// Something the user named does not exist (a backup id, a schedule): exit 2, kind
    /// `not_found`.
    #[error("{0}")]
    NotFound(String),
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
            | Error::Invalid(_)
            | Error::NotFound(_) => exit::BAD_INPUT,
            Error::Refused(_) | Error::RefusedState(_) => exit::REFUSED,
            Error::Busy(_) | Error::RepoLocked { .. } | Error::Mount(MountError::Busy { .. }) => {
                exit::BUSY
            }
            Error::Interrupted => crate::interrupt::exit_code(),
            _ => exit::FAILED,
        }
    }

    /// What kind of error this is, for the `kind` of the JSON error document.
    pub fn kind(&self) -> Kind {
        kind_in([self as &(dyn std::error::Error + 'static)])
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

/// The kind of an error in the JSON contract: what a caller may do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A VM, backup, schedule or file named does not exist (exit 2).
    NotFound,
    /// Bad usage or bad input (exit 2).
    Invalid,
    /// Refused by a pre-flight limit or the state of something (exit 3).
    Refused,
    /// Another operation holds the VM or the repository; retrying later may work (exit 4).
    Busy,
    /// Stopped by SIGINT or SIGTERM (exit 130 or 143).
    Interrupted,
    /// The operation failed (exit 1), or only part of it was done (exit 5).
    Failed,
}

/// Whether an error (one of the library's, in any module) says that something named does
/// not exist.
fn is_not_found(e: &(dyn std::error::Error + 'static)) -> Option<bool> {
    if let Some(e) = e.downcast_ref::<Error>() {
        return match e {
            Error::NotFound(_) | Error::NoQemu { .. } => Some(true),
            Error::Libvirt(l) => Some(matches!(l, LibvirtError::NoDomain(_))),
            Error::Repo(r) => Some(matches!(r, RepoError::NotFound(_))),
            Error::State(s) => Some(matches!(s, StateError::NoSchedule(_))),
            _ => Some(false),
        };
    }
    if let Some(l) = e.downcast_ref::<LibvirtError>() {
        return Some(matches!(l, LibvirtError::NoDomain(_)));
    }
    if let Some(r) = e.downcast_ref::<RepoError>() {
        return Some(matches!(r, RepoError::NotFound(_)));
    }
    if let Some(s) = e.downcast_ref::<StateError>() {
        return Some(matches!(s, StateError::NoSchedule(_)));
    }
    None
}

/// The kind of the first error in a chain that the library knows (see `exit_code_in`).
pub fn kind_in<'a>(chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>) -> Kind {
    let chain: Vec<_> = chain.into_iter().collect();
    kind_of_code(
        exit_code_in(chain.iter().copied()),
        chain.iter().find_map(|e| is_not_found(*e)) == Some(true),
    )
}

/// The kind that an exit code stands for; `not_found` tells the two kinds of bad input apart.
pub fn kind_of_code(code: i32, not_found: bool) -> Kind {
    match code {
        exit::BAD_INPUT if not_found => Kind::NotFound,
        exit::BAD_INPUT => Kind::Invalid,
        exit::REFUSED => Kind::Refused,
        exit::BUSY => Kind::Busy,
        130 | 143 => Kind::Interrupted,
        _ => Kind::Failed,
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line, `a: b: c` (in a leaf module: the modules whose errors
/// `Error` aggregates use it too).
pub use crate::error_text::chain;

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

    #[test]
    fn kinds_tell_not_found_from_invalid_input() {
        assert_eq!(
            Error::from(LibvirtError::NoDomain("x".into())).kind(),
            Kind::NotFound
        );
        assert_eq!(Error::NotFound("no backup x".into()).kind(), Kind::NotFound);
        assert_eq!(Error::Invalid("bad".into()).kind(), Kind::Invalid);
        assert_eq!(Error::RefusedState("pinned".into()).kind(), Kind::Refused);
        assert_eq!(Error::Busy("gc".into()).kind(), Kind::Busy);
        assert_eq!(Error::CommitBack("x".into()).kind(), Kind::Failed);
        let busy = LockError::Busy {
            vm: "web".into(),
            holder: None,
        };
        assert_eq!(
            kind_in([&busy as &(dyn std::error::Error + 'static)]),
            Kind::Busy
        );
        assert_eq!(kind_of_code(143, false), Kind::Interrupted);
    }
}
