//! Finishing what an interrupted backup left: a VM still running on vmbackup's snapshot
//! overlays (the run was killed between the snapshot and the commit back) is committed back
//! and pivoted onto its original images, its persistent definition is pointed at them again,
//! and the overlays are deleted; a shut-off VM whose definition still names an overlay gets it
//! committed offline (`qemu-img commit`). Objects of backups that were never published are
//! removed when no backup is writing.
//!
//! A running libvirt guest the agent reports frozen is thawed first (libvirt thaws only after a
//! freeze it saw succeed, so a freeze it gave up on can leave the guest frozen). A plain QEMU
//! VM (`qemu:NAME`) is handled through QMP the same way, and since vmbackup freezes such a
//! guest itself (no libvirtd to thaw it if vmbackup is killed), a guest the agent reports
//! frozen is thawed first there too.
//!
//! `vmbackup recover` does it for every libvirt VM and the plain QEMU VMs named; every
//! `backup` does it first for its own VM. Overlays are recognised by their name,
//! `<vm>.<target>.vmbackup-<backup id>.qcow2`.

use std::path::Path;

use serde::Serialize;

use crate::backup::{self, Options};
use crate::error::{chain, Error, Result};
use crate::guest_agent;
use crate::hypervisor::libvirt::{Dom, Libvirt, PowerState};
use crate::hypervisor::qmp::QemuVm;
use crate::hypervisor::xml_edit;
use crate::repository::Repository;

/// One disk put back onto its original image.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Recovered {
    pub vm: String,
    pub disk: String,
    pub overlay: String,
    pub image: String,
}

/// What `recover` did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub disks: Vec<Recovered>,
    /// VMs left alone because an operation holds them.
    pub busy: Vec<String>,
    /// VMs whose guest was found frozen, and thawed.
    pub thawed: Vec<String>,
    pub errors: Vec<String>,
    /// Objects of unpublished backups removed from the repository.
    pub removed_objects: usize,
}

/// Whether `path` is one of vmbackup's overlays for VM `vm`.
pub fn is_overlay(vm: &str, path: &str) -> bool {
    let Some(file) = Path::new(path).file_name().and_then(|f| f.to_str()) else {
        return false;
    };
    file.starts_with(&format!("{vm}.")) && file.contains(".vmbackup-") && file.ends_with(".qcow2")
}

/// The overlays a definition's disks point at: (target, overlay, backing image).
fn overlays_in(vm: &str, xml: &str) -> Result<Vec<(String, String, Option<String>)>> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| Error::Xml(e.to_string()))?;
    let mut out = Vec::new();
    for disk in doc.descendants().filter(|n| n.has_tag_name("disk")) {
        let target = disk
            .children()
            .find(|c| c.has_tag_name("target"))
            .and_then(|t| t.attribute("dev"));
        let source = disk
            .children()
            .find(|c| c.has_tag_name("source"))
            .and_then(|s| s.attribute("file"));
        let (Some(target), Some(source)) = (target, source) else {
            continue;
        };
        if !is_overlay(vm, source) {
            continue;
        }
        let backing = disk
            .children()
            .find(|c| c.has_tag_name("backingStore"))
            .and_then(|b| b.children().find(|c| c.has_tag_name("source")))
            .and_then(|s| s.attribute("file"))
            .map(str::to_string);
        out.push((target.to_string(), source.to_string(), backing));
    }
    Ok(out)
}

/// The backing image named in an overlay's header (read shared: QEMU may hold it).
fn backing_of(overlay: &str) -> Result<String> {
    let info = crate::image::info(Path::new(overlay))?;
    info.full_backing_file
        .or(info.backing_file)
        .ok_or_else(|| Error::Command {
            program: "qemu-img info".into(),
            detail: format!("{overlay} names no backing image"),
        })
}

/// What `recover_vm` found and did.
#[derive(Debug, Default)]
pub struct VmRecovery {
    pub disks: Vec<Recovered>,
    /// The guest was frozen, and has been thawed.
    pub thawed: bool,
}

/// A running libvirt guest with an agent channel that the agent reports frozen (a freeze that
/// libvirt gave up on and the agent completed later, a libvirtd restart mid-snapshot) is
/// thawed; `true` when it was. An agent that does not answer within `AGENT_PROBE` is left
/// alone, as for plain QEMU VMs (a guest without a running agent must not hold up every
/// backup); a freeze it completes later is thawed by the next `recover`, or by the next
/// backup once its own quiesced snapshot fails.
pub fn thaw_vm(dom: &Dom, xml: &str, opts: &Options) -> Result<bool> {
    if !crate::hypervisor::vm::VmSpec::from_xml(xml)?.agent_channel {
        return Ok(false);
    }
    match guest_agent::freeze_status(dom, AGENT_PROBE) {
        Ok(s) if s == "frozen" => {
            tracing::warn!(vm = dom.name(), "the guest was left frozen: thawing it");
            guest_agent::ensure_thawed(dom, guest_agent::thaw_deadline(opts.freeze_timeout))
        }
        Ok(_) => Ok(false),
        Err(e) => {
            tracing::debug!(vm = dom.name(), error = %chain(&e), "no freeze status from the agent");
            Ok(false)
        }
    }
}

/// Puts VM `dom` back into the state a finished backup leaves: a guest left frozen is thawed,
/// and a VM an interrupted backup left on overlays is put back onto its original images. The
/// caller holds the VM's lock.
pub fn recover_vm(lv: &Libvirt, dom: &Dom, opts: &Options) -> Result<VmRecovery> {
    let name = dom.name().to_string();
    let running = dom.state()? != PowerState::ShutOff;
    let xml = if running {
        dom.live_xml()?
    } else {
        dom.inactive_xml()?
    };
    let thawed = running && thaw_vm(dom, &xml, opts)?;
    let found = overlays_in(&name, &xml)?;
    if found.is_empty() {
        // The run may have died after the commit but before the definition was fixed.
        return Ok(VmRecovery {
            disks: fix_inactive_only(lv, dom, &name)?,
            thawed,
        });
    }
    let mut work = Vec::new();
    for (target, overlay, backing) in found {
        let image = match backing {
            Some(b) => b,
            None => backing_of(&overlay)?,
        };
        tracing::warn!(vm = %name, disk = %target, overlay = %overlay, "an interrupted backup left the disk on its overlay: committing it back");
        work.push((target, overlay, image));
    }
    if running {
        backup::commit_overlays(lv, dom, &work, opts)?;
    } else {
        let mut inactive = dom.inactive_xml()?;
        for (target, overlay, image) in &work {
            crate::image::commit(Path::new(overlay))?;
            inactive = xml_edit::set_disk_source(&inactive, target, image)?;
        }
        lv.define(&inactive)?;
        for (_, overlay, _) in &work {
            std::fs::remove_file(overlay).map_err(|e| Error::io("remove overlay", overlay, e))?;
        }
    }
    Ok(VmRecovery {
        disks: work
            .into_iter()
            .map(|(disk, overlay, image)| Recovered {
                vm: name.clone(),
                disk,
                overlay,
                image,
            })
            .collect(),
        thawed,
    })
}

/// What `recover_qemu` found and did.
#[derive(Debug, Default)]
pub struct QemuRecovery {
    pub disks: Vec<Recovered>,
    /// The guest agent answered.
    pub agent: bool,
    /// The guest was frozen, and has been thawed.
    pub thawed: bool,
}

/// How long `recover_qemu` waits for the guest agent: one that does not answer in this
/// time is taken to be absent.
const AGENT_PROBE: std::time::Duration = std::time::Duration::from_secs(5);

/// Puts the plain QEMU VM of `q` back into the state a finished backup leaves: guest thawed,
/// every disk on its original image, overlays deleted. The caller holds the VM's lock.
pub fn recover_qemu(q: &QemuVm, opts: &Options) -> Result<QemuRecovery> {
    let label = format!("qemu:{}", q.name());
    let mut r = QemuRecovery::default();
    if let Ok(status) = q.freeze_status(AGENT_PROBE) {
        r.agent = true;
        if status == "frozen" {
            tracing::warn!(vm = %label, "the guest was left frozen (an interrupted backup?): thawing it");
            q.thaw(opts.freeze_timeout)?;
            r.thawed = true;
        }
    }
    // Newest overlay first: a run killed on a VM already left on an overlay adds another.
    for _ in 0..16 {
        let disks = q.disks()?;
        let Some(d) = disks.iter().find(|d| is_overlay(q.name(), &d.file)) else {
            break;
        };
        let image = match &d.backing {
            Some(b) => b.clone(),
            None => backing_of(&d.file)?,
        };
        tracing::warn!(vm = %label, disk = %d.device, overlay = %d.file, "an interrupted backup left the disk on its overlay: committing it back");
        q.cancel_commit(&d.device, opts.commit_timeout)?;
        q.commit_back(&d.device, Path::new(&image), opts.commit_timeout)?;
        std::fs::remove_file(&d.file).map_err(|e| Error::io("remove overlay", &d.file, e))?;
        r.disks.push(Recovered {
            vm: label.clone(),
            disk: d.device.clone(),
            overlay: d.file.clone(),
            image,
        });
    }
    Ok(r)
}

/// `recover` of one plain QEMU VM named on the command line.
fn recover_qemu_named(
    r: &mut Report,
    state_dir: &Path,
    qemu_dir: &Path,
    name: &str,
    opts: &Options,
) -> Result<()> {
    let _lock = match backup::lock_vm(state_dir, &format!("qemu-{name}")) {
        Ok(l) => l,
        Err(Error::Busy(_)) => {
            r.busy.push(format!("qemu:{name}"));
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let q = QemuVm::open(qemu_dir, name)?;
    let done = recover_qemu(&q, opts)?;
    if done.thawed {
        r.thawed.push(format!("qemu:{name}"));
    }
    r.disks.extend(done.disks);
    Ok(())
}

/// A running VM whose live disks are its images but whose persistent definition still
/// names an overlay: the definition is pointed back at the images.
fn fix_inactive_only(lv: &Libvirt, dom: &Dom, name: &str) -> Result<Vec<Recovered>> {
    let inactive = dom.inactive_xml()?;
    let stale = overlays_in(name, &inactive)?;
    if stale.is_empty() || !dom.is_active()? {
        return Ok(Vec::new());
    }
    let live = dom.live_xml()?;
    let mut fixed = inactive.clone();
    let mut out = Vec::new();
    for (target, overlay, _) in stale {
        let Some(image) = xml_edit::disk_source(&live, &target)? else {
            continue;
        };
        if is_overlay(name, &image) {
            continue;
        }
        fixed = xml_edit::set_disk_source(&fixed, &target, &image)?;
        if Path::new(&overlay).exists() {
            let _ = std::fs::remove_file(&overlay);
        }
        out.push(Recovered {
            vm: name.to_string(),
            disk: target,
            overlay,
            image,
        });
    }
    if !out.is_empty() {
        lv.define(&fixed)?;
    }
    Ok(out)
}

/// Checks the VM names given to `recover`: an unknown one is bad input, before anything is
/// touched.
pub fn check_names(lv: &Libvirt, qemu_dir: &Path, names: &[String]) -> Result<()> {
    for name in names {
        match name.strip_prefix("qemu:") {
            Some(plain) => backup::check_qemu_name(qemu_dir, plain)?,
            None => {
                if lv.find_domain(name)?.is_none() {
                    return Err(Error::NoDomain(name.clone()));
                }
            }
        }
    }
    Ok(())
}

/// `vmbackup recover`: every libvirt VM (or the VMs named, `qemu:NAME` for plain QEMU
/// VMs in `qemu_dir`), then the repository.
pub fn recover(
    lv: &Libvirt,
    repo: &Repository,
    state_dir: &Path,
    qemu_dir: &Path,
    names: &[String],
    opts: &Options,
) -> Result<Report> {
    let mut r = Report::default();
    check_names(lv, qemu_dir, names)?;
    let names = if names.is_empty() {
        lv.domain_names()?
    } else {
        names.to_vec()
    };
    for name in names {
        if let Some(plain) = name.strip_prefix("qemu:") {
            if let Err(e) = recover_qemu_named(&mut r, state_dir, qemu_dir, plain, opts) {
                tracing::error!(vm = %name, "recover failed: {}", chain(&e));
                r.errors.push(format!("{name}: {}", chain(&e)));
            }
            continue;
        }
        let Some(dom) = lv.find_domain(&name)? else {
            r.errors.push(format!("no domain named {name:?}"));
            continue;
        };
        let _lock = match backup::lock_vm(state_dir, &name) {
            Ok(l) => l,
            Err(Error::Busy(_)) => {
                r.busy.push(name);
                continue;
            }
            Err(Error::InvalidName { .. }) => continue,
            Err(e) => return Err(e),
        };
        match recover_vm(lv, &dom, opts) {
            Ok(d) => {
                if d.thawed {
                    r.thawed.push(name.clone());
                }
                r.disks.extend(d.disks);
            }
            Err(e) => {
                tracing::error!(vm = %name, "recover failed: {}", chain(&e));
                r.errors.push(format!("{name}: {}", chain(&e)));
            }
        }
    }
    if let Some(_lock) = repo.lock_exclusive()? {
        r.removed_objects = repo.remove_incomplete(&[])?;
    } else {
        tracing::info!("a backup is writing: unfinished backups' objects are left for later");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlays_are_found_by_name_with_their_backing_image() {
        let xml = "<domain><name>web</name><devices>\
            <disk type='file' device='disk'><source file='/v/web.vdb.vmbackup-web-1-ab.qcow2'/>\
            <backingStore type='file'><format type='qcow2'/><source file='/v/web-vdb.qcow2'/>\
            <backingStore/></backingStore><target dev='vdb'/></disk>\
            <disk type='file' device='disk'><source file='/v/web-vdc.raw'/><target dev='vdc'/></disk>\
            <disk type='file' device='disk'><source file='/v/other.vdd.vmbackup-x.qcow2'/><target dev='vdd'/></disk>\
            </devices></domain>";
        let found = overlays_in("web", xml).unwrap();
        assert_eq!(
            found,
            vec![(
                "vdb".to_string(),
                "/v/web.vdb.vmbackup-web-1-ab.qcow2".to_string(),
                Some("/v/web-vdb.qcow2".to_string())
            )]
        );
        assert!(!is_overlay("web", "/v/web.qcow2"));
        assert!(!is_overlay("we", "/v/web.vdb.vmbackup-1.qcow2"));
    }
}
