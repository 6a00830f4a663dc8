//! vmbackup-testkit: what vmbackup's integration tests, demo and benchmarks share, kept out
//! of the shipped library (the root package uses it only as a dev-dependency).
//!
//! - `libvirt_vm`: throwaway libvirt VMs (`TestVmBuilder`, `TestVm`, `TestNetwork`), the
//!   cleanup of what dead test processes left, and the `vmb-writer` record checker;
//! - `qemu_vm`: throwaway plain QEMU VMs for the QMP tests;
//! - `guest`: the test guests of `vm-images/build` (busybox) and `vm-images/build-debian`
//!   (Debian 12), their boot files staged where QEMU can read them;
//! - `firmware`: UEFI variables and persistent TPM objects in the Debian UEFI + TPM guest;
//! - `cli`: running the `vmbackup` binary with `--json`, throwaway repositories;
//! - `faults`: runs broken at fail points (SIGKILL of the process group) and the invariants
//!   they must leave;
//! - `garage`: the Garage (S3) node of `scripts/garage`, a test prefix of its bucket each;
//! - `s3_proxy`: a fault-injecting HTTP proxy in front of the Garage node (503 SlowDown, 500,
//!   429 by policy), counting what it injected and forwarded;
//! - `smtp`: a real SMTP server on loopback (aiosmtpd) for the report tests;
//! - `error`: the kit's own error type (`KitError`).

pub mod cli;
pub mod error;
pub mod faults;
pub mod firmware;
pub mod garage;
pub mod guest;
pub mod libvirt_vm;
pub mod qemu_vm;
pub mod s3_proxy;
pub mod schema;
pub mod smtp;

pub use error::{KitError, Result};
