//! The kit's own error type. Errors of the `vmbackup` library are carried as a boxed source
//! under a short description of what the kit was doing, so the kit does not depend on how
//! the library shapes its errors.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// A call into the `vmbackup` library failed.
    #[error("{what}")]
    Lib {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what}: {}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A host program, or a command in the guest, failed.
    #[error("{program} failed: {detail}")]
    Command { program: String, detail: String },
    #[error("timed out after {secs:.1}s waiting for {what}")]
    Timeout { what: String, secs: f64 },
    /// The test guest or the test folders are missing or unusable.
    #[error("test set-up: {0}")]
    Setup(String),
}

pub type Result<T, E = KitError> = std::result::Result<T, E>;

impl KitError {
    pub fn io(what: impl Into<String>, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        KitError::Io {
            what: what.into(),
            path: path.into(),
            source,
        }
    }
}

/// Maps any other error (the library's) into a `KitError::Lib` that says what failed.
pub trait Context<T> {
    fn ctx(self, what: impl std::fmt::Display) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| KitError::Lib {
            what: what.to_string(),
            source: Box::new(e),
        })
    }
}
