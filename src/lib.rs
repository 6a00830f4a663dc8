//! vmbackup: live, application-consistent backups of libvirt/QEMU virtual machines.
//!
//! The binary (`src/main.rs`) is a thin layer over this library. Layers, each using only the
//! ones above it (a test in `tests/layers.rs` fails on an import cycle):
//! - domain, no I/O: `vm_ref`, `names`, `settings`, `preflight`, `schedule` (calendar, slots,
//!   retention, report data), `interrupt`, `fault`;
//! - storage: `repository` (crate `vmbackup-repo`), `state`, `image`, `locks`, `vm_state`
//!   (NVRAM and TPM state files);
//! - adapters: `hypervisor` (libvirt, QMP and their `VmHandle`s), `guest_agent`, `thaw_guard`;
//! - operations: `backup` (the one pipeline), `restore`, `serve` (NBD), `mount` (FUSE, loop
//!   devices), `recover`, `journal`,
//!   `schedule::run`; `error` is their aggregate error and maps errors to exit codes;
//! - `notify` (job reports) and `config` (settings resolved from flags, environment, file).

pub mod backup;
pub mod boot_test;
pub mod changes;
pub mod config;
pub mod config_show;
pub mod contract;
pub mod error;
pub mod error_text;
pub mod fault;
pub mod guest_agent;
pub mod hypervisor;
pub mod image;
pub mod instant;
pub mod interrupt;
pub mod journal;
pub mod locks;
pub mod mount;
pub mod names;
pub mod nbd;
pub mod notify;
pub mod preflight;
pub mod qcow2_bitmaps;
pub mod recover;
pub mod render;
pub mod restore;
pub mod retry;
pub mod schedule;
pub mod selector;
pub mod serve;
pub mod settings;
pub mod space;
pub mod state;
pub mod thaw_guard;
pub mod unlock;
pub mod vm_ref;
pub mod vm_state;

pub use error::{Error, Result};
// The repository format lives in its own crate (`crates/repo`); these keep its old paths.
pub use vmbackup_repo as repository;
pub use vmbackup_repo::{digest, qcow2};
