//! Opening a VM, whatever its kind, as a `VmHandle`: libvirt is connected at the first
//! libvirt VM, so plain QEMU VMs work on hosts without libvirtd.

use std::cell::OnceCell;
use std::path::{Path, PathBuf};

use super::libvirt::Libvirt;
use super::libvirt_vm::LibvirtVm;
use super::qemu_vm::QemuVmHandle;
use super::VmHandle;
use crate::error::Result;
use crate::vm_ref::VmRef;

/// The hypervisor interfaces of this host.
pub struct Hypervisors {
    connect: String,
    qemu_dir: PathBuf,
    lv: OnceCell<Libvirt>,
}

impl Hypervisors {
    /// libvirt at `connect` (opened when first needed); plain QEMU VMs' sockets in `qemu_dir`.
    pub fn new(connect: &str, qemu_dir: &Path) -> Hypervisors {
        Hypervisors {
            connect: connect.to_string(),
            qemu_dir: qemu_dir.to_path_buf(),
            lv: OnceCell::new(),
        }
    }

    /// The libvirt connection, opened now if it is not yet.
    pub fn libvirt(&self) -> Result<&Libvirt> {
        if let Some(lv) = self.lv.get() {
            return Ok(lv);
        }
        let lv = Libvirt::open(&self.connect)?;
        Ok(self.lv.get_or_init(|| lv))
    }

    pub fn qemu_dir(&self) -> &Path {
        &self.qemu_dir
    }

    /// The VM `text` names: a name (`qemu:NAME` for a plain QEMU VM), or the UUID of a
    /// libvirt domain (a UUID that is no domain's is then tried as a name).
    pub fn lookup(&self, text: &str) -> Result<VmRef> {
        if crate::vm_ref::is_uuid(text) {
            if let Some(d) = self.libvirt()?.find_domain_by_uuid(text)? {
                return Ok(VmRef::libvirt(d.name())?);
            }
        }
        Ok(text.parse::<VmRef>()?)
    }

    /// Runs `f` on `vm` opened through its interface; an unknown VM is bad input.
    pub fn with_vm<R>(&self, vm: &VmRef, f: impl FnOnce(&dyn VmHandle) -> Result<R>) -> Result<R> {
        match vm {
            VmRef::Libvirt(_) => f(&LibvirtVm::open(self.libvirt()?, vm)?),
            VmRef::Qemu(_) => f(&QemuVmHandle::open(&self.qemu_dir, vm)?),
        }
    }
}
