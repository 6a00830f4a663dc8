//! The errors of the NBD client; short messages, the server's own words where it gave some.

use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot connect to NBD server {target}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD connection")]
    Io(#[source] std::io::Error),
    #[error("NBD server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("NBD server closed the connection")]
    Closed,
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    #[error("NBD server lacks {0}")]
    Unsupported(&'static str),
    #[error("NBD server has no export {name:?}: {message}")]
    UnknownExport { name: String, message: String },
    #[error("NBD server does not know meta context {0:?}")]
    UnknownContext(String),
    #[error("NBD server refused {option} ({reason}): {message}")]
    OptionRefused {
        option: &'static str,
        reason: &'static str,
        message: String,
    },
    #[error("NBD {command} failed: {name} ({code}){}: {message}", .at.map(|o| format!(" at {o}")).unwrap_or_default())]
    Server {
        command: &'static str,
        code: u32,
        name: &'static str,
        message: String,
        at: Option<u64>,
    },
    #[error("meta context {0:?} was not negotiated")]
    NotNegotiated(String),
    #[error("range {offset}+{length} is outside the export ({size} bytes)")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("NBD address {0} is not loopback (no TLS)")]
    NotLoopback(SocketAddr),
    #[error("invalid NBD request: {0}")]
    Invalid(String),
    #[error("NBD connection unusable after an earlier error")]
    Broken,
}

impl NbdError {
    /// The server said no during the handshake (as opposed to a broken connection).
    pub(super) fn is_refusal(&self) -> bool {
        matches!(
            self,
            NbdError::Unsupported(_)
                | NbdError::UnknownExport { .. }
                | NbdError::UnknownContext(_)
                | NbdError::OptionRefused { .. }
        )
    }

    /// After this error the connection can still carry requests.
    pub(super) fn keeps_connection(&self) -> bool {
        matches!(
            self,
            NbdError::Server { .. }
                | NbdError::NotNegotiated(_)
                | NbdError::OutOfRange { .. }
                | NbdError::Invalid(_)
        )
    }

    pub(super) fn server(command: &'static str, chunk: ErrorChunk) -> NbdError {
        NbdError::Server {
            command,
            code: chunk.code,
            name: errno_name(chunk.code),
            message: chunk.message,
            at: chunk.offset,
        }
    }
}

/// The payload of an error chunk.
pub(super) struct ErrorChunk {
    pub(super) code: u32,
    pub(super) message: String,
    pub(super) offset: Option<u64>,
}

/// The NBD name of a server error value.
pub(super) fn errno_name(code: u32) -> &'static str {
    match code {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}
