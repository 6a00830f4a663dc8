//! Finishing what an interrupted backup left: a VM still running on vmbackup's snapshot
//! overlays (the run was killed between the snapshot and the commit back) is committed back
//! and pivoted onto its original images, its persistent definition is pointed at them again,
//! and the overlays are deleted; a shut-off VM whose definition still names an overlay gets it
//! committed offline (`qemu-img commit`). Objects of backups that were never published are
//! removed when no backup is writing.
//!
//! `vmbackup recover` does it for every VM; every `backup` does it first for its own VM.
//! Overlays are recognised by their name, `<vm>.<target>.vmbackup-<backup id>.qcow2`.

use std::path::Path;

use serde::Serialize;

use crate::backup::{self, Options};
use crate::error::{chain, Error, Result};
use crate::hypervisor::libvirt::{Dom, Libvirt, PowerState};
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

/// Puts VM `dom` back onto its original images if an interrupted backup left it on overlays.
/// The caller holds the VM's lock.
pub fn recover_vm(lv: &Libvirt, dom: &Dom, opts: &Options) -> Result<Vec<Recovered>> {
    let name = dom.name().to_string();
    let running = dom.state()? != PowerState::ShutOff;
    let xml = if running {
        dom.live_xml()?
    } else {
        dom.inactive_xml()?
    };
    let found = overlays_in(&name, &xml)?;
    if found.is_empty() {
        // The run may have died after the commit but before the definition was fixed.
        return fix_inactive_only(lv, dom, &name);
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
    Ok(work
        .into_iter()
        .map(|(disk, overlay, image)| Recovered {
            vm: name.clone(),
            disk,
            overlay,
            image,
        })
        .collect())
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

/// `vmbackup recover`: every VM (or those named), then the repository.
pub fn recover(
    lv: &Libvirt,
    repo: &Repository,
    state_dir: &Path,
    names: &[String],
    opts: &Options,
) -> Result<Report> {
    let mut r = Report::default();
    let names = if names.is_empty() {
        lv.domain_names()?
    } else {
        names.to_vec()
    };
    for name in names {
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
            Ok(d) => r.disks.extend(d),
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
