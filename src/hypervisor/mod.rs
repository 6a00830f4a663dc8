//! The hypervisors vmbackup drives: libvirt-managed domains (`libvirt`) and the VM as data,
//! read from its domain XML (`vm`).

pub mod libvirt;
pub mod network;
pub mod qmp;
pub mod vm;
pub mod xml_edit;
