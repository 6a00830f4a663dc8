//! An error and its causes as text, for messages and logs; a leaf module (no imports from
//! this crate), so that any module can use it without depending on `error`. The repository
//! crate's own function: one spelling of `a: b: c` for both crates.

/// An error and its causes on one line, `a: b: c`.
pub use vmbackup_repo::error_chain as chain;
