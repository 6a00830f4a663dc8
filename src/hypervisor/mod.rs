//! The hypervisors vmbackup drives, behind one interface, `VmHandle`, that the backup,
//! restore and recover pipelines use:
//! - `libvirt` (the virt crate; all raw unsafe calls in one module) and `libvirt_vm`, its
//!   `VmHandle`: libvirt freezes, snapshots and thaws inside one call;
//! - `qmp` (plain QEMU through its QMP and guest-agent sockets) and `qemu_vm`, its
//!   `VmHandle`: vmbackup freezes and thaws itself, behind a thaw guard process;
//! - `vm` (the VM as data, from its domain XML), `xml_edit` (targeted edits of domain XML),
//!   `network` (libvirt networks' DHCP reservations).

pub mod libvirt;
pub mod libvirt_vm;
pub mod network;
pub mod open;
pub mod qemu_vm;
pub mod qmp;
pub mod vm;
pub mod xml_edit;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::preflight::DiskFacts;
use crate::settings::BackupSettings;
use crate::vm_ref::VmRef;
use vm::{GuestInterface, NicSpec};

/// A VM as a backup sees it.
#[derive(Debug, Clone)]
pub struct VmShape {
    pub uuid: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub running: bool,
    /// The guest agent can be asked to freeze (libvirt: an agent channel is defined; plain
    /// QEMU: the agent answered).
    pub agent: bool,
    /// Why there is no agent to freeze with, when `agent` is false.
    pub no_agent: &'static str,
    pub disks: Vec<DiskShape>,
    pub nics: Vec<NicSpec>,
}

/// One disk of a VM, with the figures of the pre-flight checks.
#[derive(Debug, Clone)]
pub struct DiskShape {
    pub facts: DiskFacts,
    /// The image format (`raw`, `qcow2`).
    pub format: String,
    /// QEMU's node name of the disk's top image (plain QEMU only).
    pub node: Option<String>,
}

/// A disk that runs on (or is about to run on) a snapshot overlay during a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub target: String,
    /// The disk's own image, read-only while the VM runs on the overlay.
    pub image: PathBuf,
    pub format: String,
    pub overlay: PathBuf,
    /// QEMU's node name of the disk's top image (plain QEMU only).
    pub node: Option<String>,
}

/// What vmbackup names its dirty bitmaps (libvirt: checkpoints): this prefix and the id of the
/// backup whose snapshot started them. Bitmaps without it are never touched.
pub const BITMAP_PREFIX: &str = "vmbackup-";

/// The dirty bitmap (libvirt: checkpoint) that backup `id` starts at its snapshot instant.
pub fn bitmap_name(id: &str) -> String {
    format!("{BITMAP_PREFIX}{id}")
}

/// The changed-block tracking `VmHandle::snapshot` started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracked {
    /// The disks (targets) on which the bitmap records every write since the snapshot instant
    /// (writes shortly before it may be recorded too).
    pub targets: Vec<String>,
    /// Why the bitmap could not be started, when it was asked for and failed (the snapshot was
    /// taken all the same).
    pub failed: Option<String>,
    /// How long the snapshot call itself took, when the adapter did more than that call
    /// (libvirt: the checkpoint is created before it, outside the freeze): with a quiesced
    /// libvirt snapshot, this is what bounds the guest's freeze.
    pub snapshot_ms: Option<u64>,
}

/// What `VmHandle::freeze` did.
#[derive(Debug, Clone, Copy)]
pub enum Freeze {
    /// The guest is frozen now, since then.
    Now(Instant),
    /// The freeze happens inside `snapshot` (libvirt's quiesce flag: libvirtd freezes,
    /// snapshots and thaws in one call, and thaws even if this process dies).
    InSnapshot,
}

/// What a VM keeps with its backup besides its disks, to be redefined from.
#[derive(Debug, Clone)]
pub struct Description {
    /// The object's name below the backup's folder, `domain.xml` or `qemu-block.json`.
    pub file: &'static str,
    pub bytes: Vec<u8>,
}

/// One disk put back onto its original image.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct Recovered {
    pub vm: String,
    pub disk: String,
    pub overlay: String,
    pub image: String,
}

/// What `VmHandle::recover` found and did.
#[derive(Debug, Default)]
pub struct Recovery {
    pub disks: Vec<Recovered>,
    /// The guest was found frozen, and has been thawed.
    pub thawed: bool,
}

/// A VM the pipelines can back up: one implementation per hypervisor interface, and fakes in
/// tests. Every method blocks.
pub trait VmHandle {
    fn vm(&self) -> &VmRef;

    /// Puts back what an interrupted run left: the guest thawed, every disk on its original
    /// image (a block job left behind taken over or redone), overlays the VM ran on deleted.
    fn recover(&self, s: &BackupSettings) -> Result<Recovery>;

    /// The VM's shape now, with the pre-flight figures of its disks.
    fn describe(&self) -> Result<VmShape>;

    /// What is kept with a backup to redefine the VM from.
    fn description(&self) -> Result<Description>;

    /// The guest's interfaces and addresses; empty when the agent does not tell.
    fn guest_interfaces(&self) -> Vec<GuestInterface>;

    /// Freezes the guest's filesystems through the agent, or says that `snapshot` will.
    fn freeze(&self, s: &BackupSettings) -> Result<Freeze>;

    /// One snapshot of every disk in `overlays` at one instant; the overlay files exist,
    /// empty. `quiesce`: freeze inside the snapshot (after `Freeze::InSnapshot`). The VM runs
    /// on the overlays afterwards.
    ///
    /// `bitmap`: also start a persistent dirty bitmap of that name on every qcow2 disk of
    /// `overlays`, in the image the VM leaves (plain QEMU: in the same transaction; libvirt: a
    /// checkpoint created just before the snapshot). A bitmap that cannot be started is no
    /// reason to fail: the snapshot is taken without it and `Tracked::failed` says why.
    fn snapshot(
        &self,
        overlays: &[Overlay],
        quiesce: bool,
        bitmap: Option<&str>,
        s: &BackupSettings,
    ) -> Result<Tracked>;

    /// Thaws after `Freeze::Now`.
    fn thaw(&self, s: &BackupSettings) -> Result<()>;

    /// After a freeze or thaw that went wrong: makes sure the guest is thawed, asking the agent
    /// until it says so or `s.thaw_deadline()` passes. Returns whether a thaw was needed.
    fn ensure_thawed(&self, s: &BackupSettings) -> Result<bool>;

    /// The overlays of `overlays` the VM runs on now.
    fn running_on(&self, overlays: &[Overlay]) -> Result<Vec<Overlay>>;

    /// Commits every overlay back into its image and checks that the VM (live, and its
    /// persistent definition) uses the images again. Tries every disk even when one fails.
    /// The overlay files are left for the caller to delete.
    fn commit_back(&self, overlays: &[Overlay], s: &BackupSettings) -> Result<()>;

    /// Whether the VM is (still) shut off.
    fn is_shut_off(&self) -> Result<bool>;

    /// Removes, from the disks of the VM (running on its own images, or shut off), every dirty bitmap
    /// (libvirt: checkpoint) whose name starts with `BITMAP_PREFIX` and for which `drop` says
    /// yes; never any other. Returns the names removed.
    fn drop_bitmaps(&self, drop: &dyn Fn(&str) -> bool) -> Result<Vec<String>>;
}

/// Whether `path` is one of vmbackup's overlays for VM `vm` (its bare name):
/// `<vm>.<target>.vmbackup-<backup id>.qcow2`.
pub fn is_overlay(vm: &str, path: &str) -> bool {
    let Some(file) = Path::new(path).file_name().and_then(|f| f.to_str()) else {
        return false;
    };
    file.starts_with(&format!("{vm}.")) && file.contains(".vmbackup-") && file.ends_with(".qcow2")
}

/// The backing image named in an overlay's header (read shared: QEMU may hold it).
pub fn backing_of(overlay: &str) -> Result<String> {
    let info = crate::image::info(Path::new(overlay))?;
    info.full_backing_file
        .or(info.backing_file)
        .ok_or_else(|| Error::CommitBack(format!("{overlay} names no backing image")))
}
