//! vmbackup: live, application-consistent backups of libvirt/QEMU virtual machines.
//!
//! The binary (`src/main.rs`) is a thin layer over this library. See DESIGN.md for the
//! command-line contract and README.md for how to run it.

pub mod backup;
pub mod config;
pub mod digest;
pub mod error;
pub mod guest_agent;
pub mod hypervisor;
pub mod image;
pub mod names;
pub mod notify;
pub mod preflight;
pub mod qcow2;
pub mod recover;
pub mod repository;
pub mod restore;
pub mod schedule;
pub mod state;
pub mod thaw_guard;

pub use error::{Error, Result};
