//! A libvirt domain as a `VmHandle`.
//!
//! The snapshot is one atomic, disk-only, external snapshot of every disk, with libvirt's
//! quiesce flag when the guest is to be frozen: libvirtd freezes the guest's filesystems
//! through the agent, snapshots and thaws inside that one call (and thaws even if this process
//! dies meanwhile), with the agent response timeout as the freeze deadline. libvirt thaws only
//! after a freeze it saw succeed, so after a quiesced snapshot that failed the pipeline asks
//! `ensure_thawed`. The commit back is an active block commit and pivot per disk; a block job
//! an interrupted run left on the disk is taken over (an active commit) or aborted and redone
//! (anything else), and the wait ends when the job makes no progress for the stall timeout.

use std::path::Path;
use std::time::{Duration, Instant};

use super::libvirt::{Dom, Libvirt, LibvirtError, PowerState};
use super::vm::{GuestInterface, VmSpec};
use super::xml_edit;
use super::{
    backing_of, is_overlay, Description, DiskShape, Freeze, Overlay, Recovered, Recovery, Tracked,
    VmHandle, VmShape, BITMAP_PREFIX,
};
use crate::error::{Error, Result};
use crate::guest_agent;
use crate::image;
use crate::preflight::{self, DiskFacts};
use crate::settings::BackupSettings;
use crate::vm_ref::VmRef;

/// A libvirt domain, looked up by name.
pub struct LibvirtVm<'a> {
    lv: &'a Libvirt,
    dom: Dom,
    vm: VmRef,
}

impl<'a> LibvirtVm<'a> {
    /// Looks domain `name` up; an unknown one is `LibvirtError::NoDomain` (bad input).
    pub fn open(lv: &'a Libvirt, vm: &VmRef) -> Result<LibvirtVm<'a>> {
        let dom = lv.domain(vm.name())?;
        Ok(LibvirtVm {
            lv,
            dom,
            vm: vm.clone(),
        })
    }

    pub fn dom(&self) -> &Dom {
        &self.dom
    }

    fn running(&self) -> Result<bool> {
        Ok(self.dom.state()? != PowerState::ShutOff)
    }

    /// The definition that names the images in use now.
    fn current_spec(&self) -> Result<VmSpec> {
        let xml = if self.running()? {
            self.dom.live_xml()?
        } else {
            self.dom.inactive_xml()?
        };
        Ok(VmSpec::from_xml(&xml)?)
    }
}

/// A disk of a definition that runs on one of vmbackup's overlays.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OnOverlay {
    target: String,
    overlay: String,
    /// The image below it, when the definition names it.
    backing: Option<String>,
}

/// The disks of a definition that run on vmbackup's overlays.
fn overlays_in(vm: &str, xml: &str) -> Result<Vec<OnOverlay>> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| xml_edit::XmlError(e.to_string()))?;
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
        out.push(OnOverlay {
            target: target.to_string(),
            overlay: source.to_string(),
            backing,
        });
    }
    Ok(out)
}

impl LibvirtVm<'_> {
    /// A running VM whose live disks are its images but whose persistent definition still
    /// names an overlay (a run died after the pivot): the definition is pointed back.
    fn fix_inactive_only(&self) -> Result<Vec<Recovered>> {
        let name = self.vm.name();
        let inactive = self.dom.inactive_xml()?;
        let stale = overlays_in(name, &inactive)?;
        if stale.is_empty() || !self.dom.is_active()? {
            return Ok(Vec::new());
        }
        let live = self.dom.live_xml()?;
        let mut fixed = inactive.clone();
        let mut out = Vec::new();
        for s in stale {
            let Some(image) = xml_edit::disk_source(&live, &s.target)? else {
                continue;
            };
            if is_overlay(name, &image) {
                continue;
            }
            fixed = xml_edit::set_disk_source(&fixed, &s.target, &image)?;
            if Path::new(&s.overlay).exists() {
                let _ = std::fs::remove_file(&s.overlay);
            }
            out.push(Recovered {
                vm: self.vm.to_string(),
                disk: s.target,
                overlay: s.overlay,
                image,
            });
        }
        if !out.is_empty() {
            self.lv.define(&fixed)?;
        }
        Ok(out)
    }

    /// Commits the overlays of a shut-off VM into their images with `qemu-img commit` and
    /// points the definition at the images; the overlay files are left for the caller.
    fn commit_offline(&self, overlays: &[Overlay]) -> Result<()> {
        let mut inactive = self.dom.inactive_xml()?;
        for o in overlays {
            let image = o.image.to_string_lossy();
            if xml_edit::disk_source(&inactive, &o.target)?.as_deref() == Some(&*image) {
                continue;
            }
            image::commit(&o.overlay)?;
            inactive = xml_edit::set_disk_source(&inactive, &o.target, &image)?;
            // The `<backingStore>` libvirt recorded below the overlay names the image itself:
            // kept, QEMU would open the image twice and fail on its own lock.
            inactive = xml_edit::remove_elements(&inactive, |n| {
                n.has_tag_name("backingStore")
                    && n.parent().is_some_and(|d| {
                        d.has_tag_name("disk")
                            && d.children().any(|c| {
                                c.has_tag_name("target") && c.attribute("dev") == Some(&o.target)
                            })
                    })
            })?;
        }
        self.lv.define(&inactive)?;
        Ok(())
    }

    /// Points the persistent definition's disks at their images again where libvirt left it
    /// naming the overlays.
    fn fix_persistent(&self, overlays: &[Overlay]) -> Result<()> {
        let mut inactive = self.dom.inactive_xml()?;
        let mut changed = false;
        for o in overlays {
            let image = o.image.to_string_lossy();
            if xml_edit::disk_source(&inactive, &o.target)?.as_deref() != Some(&*image) {
                inactive = xml_edit::set_disk_source(&inactive, &o.target, &image)?;
                changed = true;
            }
        }
        if changed {
            tracing::info!(vm = %self.vm, "restoring the persistent definition's disk paths");
            self.lv.define(&inactive)?;
        }
        Ok(())
    }

    /// Commits `o` back: takes over an active commit a killed run left, aborts and redoes
    /// any other job, starts one otherwise; pivots once it is ready. Gives up (aborting the
    /// job: the VM stays, safely, on its overlay) only after `stall` without progress.
    fn commit_one(&self, o: &Overlay, stall: Duration) -> Result<()> {
        let dom = &self.dom;
        let target = o.target.as_str();
        let start = Instant::now();
        match dom.block_job(target)? {
            Some(job) if job.active_commit => {
                tracing::warn!(vm = %self.vm, disk = target, "taking over the commit an interrupted run left")
            }
            Some(_) => {
                tracing::warn!(vm = %self.vm, disk = target, "aborting another block job on the disk before the commit");
                dom.block_job_abort(target)?;
                wait_job_gone(dom, target, stall)?;
                dom.block_commit_active(target)?;
            }
            None => dom.block_commit_active(target)?,
        }
        crate::fault::point("commit-started");
        // Short polls: a commit of a backup's overlay is usually done in tens of ms.
        let mut pause = Duration::from_millis(10);
        let mut pivoted = false;
        let mut progress = (0, 0);
        let mut progressed_at = Instant::now();
        loop {
            match dom.block_job(target)? {
                Some(job) if !pivoted && job.ready() => {
                    crate::fault::point("commit-ready");
                    pivoted = dom.block_job_pivot(target)?;
                    if pivoted {
                        crate::fault::point("commit-pivoted");
                    }
                    pause = Duration::from_millis(10);
                }
                Some(job) => {
                    if (job.cur, job.end) != progress {
                        progress = (job.cur, job.end);
                        progressed_at = Instant::now();
                    }
                }
                None if pivoted => break,
                None => {
                    // The job ended without our pivot: only fine if the disk is on its image.
                    let live = dom.live_xml()?;
                    if xml_edit::disk_source(&live, target)?.as_deref()
                        == Some(&*o.image.to_string_lossy())
                    {
                        break;
                    }
                    return Err(Error::CommitBack(format!(
                        "the commit of {} disk {target} ended without a pivot; the VM runs on {}",
                        self.vm,
                        o.overlay.display()
                    )));
                }
            }
            if progressed_at.elapsed() > stall {
                let _ = dom.block_job_abort(target);
                return Err(Error::CommitBack(format!(
                    "the commit of {} disk {target} made no progress for {}s; the VM stays on {} until the next run",
                    self.vm,
                    stall.as_secs(),
                    o.overlay.display()
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
        tracing::info!(vm = %self.vm, disk = target, ms = start.elapsed().as_millis() as u64, "committed back");
        Ok(())
    }
}

/// Waits until `target` has no block job, at most `timeout`.
fn wait_job_gone(dom: &Dom, target: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while dom.block_job(target)?.is_some() {
        if start.elapsed() > timeout {
            return Err(Error::CommitBack(format!(
                "the block job on {} disk {target} did not end",
                dom.name()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The snapshot of `overlays` (no metadata is kept, so its name does not matter); every other
/// disk of `spec` is left out explicitly.
fn snapshot_xml(spec: &VmSpec, overlays: &[Overlay]) -> String {
    let esc = xml_edit::escape_attr;
    let mut x = String::from("<domainsnapshot><name>vmbackup</name><disks>");
    for d in &spec.disks {
        match overlays.iter().find(|o| o.target == d.target) {
            Some(o) => x.push_str(&format!(
                "<disk name='{}' snapshot='external'><driver type='qcow2'/><source file='{}'/></disk>",
                esc(&d.target),
                esc(&o.overlay.to_string_lossy())
            )),
            None => x.push_str(&format!("<disk name='{}' snapshot='no'/>", esc(&d.target))),
        }
    }
    x.push_str("</disks></domainsnapshot>");
    x
}

/// The targets of `overlays` that can carry a dirty bitmap: qcow2 images, as the live
/// definition `spec` has them.
fn bitmap_targets(spec: &VmSpec, overlays: &[Overlay]) -> Vec<String> {
    spec.disks
        .iter()
        .filter(|d| d.format.as_deref() == Some("qcow2"))
        .filter(|d| overlays.iter().any(|o| o.target == d.target))
        .map(|d| d.target.clone())
        .collect()
}

/// The checkpoint `name`: a bitmap of that name on each of `targets`; every other disk of
/// `spec` is left out explicitly (raw images cannot carry bitmaps).
fn checkpoint_xml(spec: &VmSpec, name: &str, targets: &[String]) -> String {
    let esc = xml_edit::escape_attr;
    let mut x = format!(
        "<domaincheckpoint><name>{}</name><disks>",
        xml_edit::escape_attr(name)
    );
    for d in &spec.disks {
        if targets.contains(&d.target) {
            x.push_str(&format!(
                "<disk name='{}' checkpoint='bitmap' bitmap='{}'/>",
                esc(&d.target),
                esc(name)
            ));
        } else {
            x.push_str(&format!(
                "<disk name='{}' checkpoint='no'/>",
                esc(&d.target)
            ));
        }
    }
    x.push_str("</disks></domaincheckpoint>");
    x
}

impl LibvirtVm<'_> {
    /// Deletes checkpoint `name` with its bitmaps; when libvirt cannot (the bitmap is no
    /// longer in the image, say), only its metadata. Returns whether it is gone.
    fn delete_checkpoint(&self, name: &str) -> bool {
        match self.running() {
            Ok(false) => return self.delete_checkpoint_offline(name),
            Ok(true) => {}
            Err(e) => {
                tracing::warn!(vm = %self.vm, checkpoint = name, error = %crate::error::chain(&e),
                    "cannot tell whether the VM runs: the checkpoint is kept");
                return false;
            }
        }
        let e = match self.dom.checkpoint_delete(name, false) {
            Ok(()) => return true,
            Err(e) => e,
        };
        tracing::warn!(vm = %self.vm, checkpoint = name, error = %crate::error::chain(&e),
            "cannot delete the checkpoint with its bitmaps: deleting only libvirt's record of it");
        match self.dom.checkpoint_delete(name, true) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(vm = %self.vm, checkpoint = name, error = %crate::error::chain(&e),
                    "cannot delete the checkpoint");
                false
            }
        }
    }
}

impl LibvirtVm<'_> {
    /// libvirt deletes only the metadata of a shut-off domain's checkpoint: the bitmap is
    /// removed from every qcow2 image of the definition that has it first, then the
    /// metadata. A bitmap that cannot be removed keeps the checkpoint, for the next try.
    fn delete_checkpoint_offline(&self, name: &str) -> bool {
        let removed = self
            .dom
            .inactive_xml()
            .map_err(Error::from)
            .and_then(|xml| {
                let spec = VmSpec::from_xml(&xml)?;
                for d in &spec.disks {
                    let (Some("qcow2"), Some(src)) = (d.format.as_deref(), &d.source) else {
                        continue;
                    };
                    let path = Path::new(src);
                    let has = crate::qcow2_bitmaps::list(path)
                        .map(|b| b.get(name).is_some())
                        // An image that cannot be read is left to qemu-img to judge.
                        .unwrap_or(true);
                    if has {
                        image::remove_bitmap(path, name)?;
                    }
                }
                Ok(())
            });
        if let Err(e) = removed {
            tracing::warn!(vm = %self.vm, checkpoint = name, error = %crate::error::chain(&e),
                "cannot remove the checkpoint's bitmap from the shut-off VM's images: the checkpoint is kept");
            return false;
        }
        match self.dom.checkpoint_delete(name, true) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(vm = %self.vm, checkpoint = name, error = %crate::error::chain(&e),
                    "cannot delete the checkpoint");
                false
            }
        }
    }
}

impl VmHandle for LibvirtVm<'_> {
    fn vm(&self) -> &VmRef {
        &self.vm
    }

    fn recover(&self, s: &BackupSettings) -> Result<Recovery> {
        let name = self.vm.name();
        let running = self.running()?;
        let mut r = Recovery::default();
        if running && self.current_spec()?.agent_channel {
            // A guest left frozen by a freeze that completed after libvirt gave up on it.
            // An agent that does not answer is left alone: it is not holding a freeze that
            // ensure_thawed could undo within its deadline either.
            if let Ok(st) = guest_agent::freeze_status(&self.dom, Duration::from_secs(5)) {
                if st == "frozen" {
                    tracing::warn!(vm = %self.vm, "the guest was left frozen: thawing it");
                    guest_agent::ensure_thawed(&self.dom, s.thaw_deadline())?;
                    r.thawed = true;
                }
            }
        }
        let xml = if running {
            self.dom.live_xml()?
        } else {
            self.dom.inactive_xml()?
        };
        let found = overlays_in(name, &xml)?;
        if found.is_empty() {
            // The run may have died after the commit but before the definition was fixed.
            r.disks = self.fix_inactive_only()?;
            return Ok(r);
        }
        let mut overlays = Vec::new();
        for f in found {
            let image = match f.backing {
                Some(b) => b,
                None => backing_of(&f.overlay)?,
            };
            tracing::warn!(vm = %self.vm, disk = %f.target, overlay = %f.overlay, "an interrupted backup left the disk on its overlay: committing it back");
            overlays.push(Overlay {
                target: f.target,
                image: image.into(),
                format: String::new(),
                overlay: f.overlay.into(),
                node: None,
            });
        }
        if running {
            self.commit_back(&overlays, s)?;
            // Disks a killed run had already pivoted (the first of two, say) run on their
            // images, but the persistent definition may still name their overlays.
            r.disks = self.fix_inactive_only()?;
        } else {
            self.commit_offline(&overlays)?;
        }
        for o in &overlays {
            std::fs::remove_file(&o.overlay)
                .map_err(|e| Error::io("remove overlay", &o.overlay, e))?;
            r.disks.push(Recovered {
                vm: self.vm.to_string(),
                disk: o.target.clone(),
                overlay: o.overlay.to_string_lossy().into_owned(),
                image: o.image.to_string_lossy().into_owned(),
            });
        }
        Ok(r)
    }

    fn describe(&self) -> Result<VmShape> {
        let running = self.running()?;
        let spec = self.current_spec()?;
        let mut disks = Vec::new();
        for d in &spec.disks {
            let mut facts = DiskFacts {
                target: d.target.clone(),
                device: d.device.clone(),
                kind: d.kind.clone(),
                source: d.source.clone(),
                readonly: d.readonly,
                shareable: d.shareable,
                virtual_size: 0,
                allocated_size: 0,
                backing_file: None,
                missing: false,
            };
            if let (Ok(None), Some(src)) = (preflight::disk_rule(&facts), &d.source) {
                facts.missing = std::fs::symlink_metadata(src).is_err();
            }
            if let (Ok(None), Some(src), false) =
                (preflight::disk_rule(&facts), &d.source, facts.missing)
            {
                let info = image::info(Path::new(src))?;
                facts.virtual_size = info.virtual_size;
                facts.allocated_size = info.actual_size;
                facts.backing_file = info.full_backing_file.or(info.backing_file);
            }
            disks.push(DiskShape {
                facts,
                format: d.format.clone().unwrap_or_else(|| "raw".into()),
                node: None,
            });
        }
        Ok(VmShape {
            uuid: spec.uuid,
            vcpus: spec.vcpus,
            memory_bytes: spec.memory_bytes,
            running,
            agent: spec.agent_channel,
            no_agent: "the VM has no guest agent channel",
            disks,
            nics: spec.nics,
        })
    }

    fn description(&self) -> Result<Description> {
        Ok(Description {
            file: "domain.xml",
            bytes: self.dom.inactive_xml()?.into_bytes(),
        })
    }

    fn guest_interfaces(&self) -> Vec<GuestInterface> {
        guest_agent::interfaces(&self.dom).unwrap_or_default()
    }

    fn freeze(&self, s: &BackupSettings) -> Result<Freeze> {
        // Bounds every agent call libvirt makes for the freeze and the thaw.
        self.dom.set_agent_timeout(s.freeze_timeout)?;
        Ok(Freeze::InSnapshot)
    }

    fn snapshot(
        &self,
        overlays: &[Overlay],
        quiesce: bool,
        bitmap: Option<&str>,
        _s: &BackupSettings,
    ) -> Result<Tracked> {
        let spec = VmSpec::from_xml(&self.dom.live_xml()?)?;
        let mut tracked = Tracked::default();
        let mut checkpoint = None;
        if let Some(name) = bitmap {
            let targets = bitmap_targets(&spec, overlays);
            if !targets.is_empty() {
                // Just before the snapshot: the bitmaps record from a moment before its instant.
                match self
                    .dom
                    .checkpoint_create(&checkpoint_xml(&spec, name, &targets))
                {
                    Ok(()) => {
                        checkpoint = Some(name);
                        tracked.targets = targets;
                    }
                    Err(e) => {
                        let why = crate::error::chain(&e);
                        tracing::warn!(vm = %self.vm, checkpoint = name, error = %why,
                            "cannot create the checkpoint: this backup starts no changed-block tracking");
                        tracked.failed = Some(why);
                    }
                }
            }
        }
        let xml = snapshot_xml(&spec, overlays);
        let started = std::time::Instant::now();
        if let Err(e) = self.dom.snapshot_disk_only(&xml, quiesce) {
            if let Some(name) = checkpoint {
                self.delete_checkpoint(name);
            }
            return Err(e.into());
        }
        tracked.snapshot_ms = Some(started.elapsed().as_millis() as u64);
        Ok(tracked)
    }

    fn thaw(&self, _s: &BackupSettings) -> Result<()> {
        // libvirtd thaws inside the snapshot call.
        Ok(())
    }

    fn ensure_thawed(&self, s: &BackupSettings) -> Result<bool> {
        let start = Instant::now();
        let deadline = s.thaw_deadline();
        let e = match guest_agent::ensure_thawed(&self.dom, deadline) {
            Ok(thawed) => return Ok(thawed),
            // The agent did not say thawed in time: asking again would not help.
            Err(e @ LibvirtError::Timeout { .. }) => return Err(e.into()),
            Err(e) => e,
        };
        // The connection may have died with libvirtd (restarted while a freeze was in
        // flight, whose guest then stays frozen): ask again through a new connection, for
        // what is left of the deadline.
        tracing::warn!(vm = %self.vm, error = %crate::error::chain(&e), "cannot ask the guest agent: asking again through a new connection to libvirt");
        loop {
            let fresh = Libvirt::open(self.lv.uri()).and_then(|lv| {
                let dom = lv.domain(self.vm.name())?;
                let left = deadline.saturating_sub(start.elapsed());
                guest_agent::ensure_thawed(&dom, left.max(Duration::from_secs(5)))
            });
            match fresh {
                Ok(thawed) => return Ok(thawed),
                Err(e) if start.elapsed() >= deadline => return Err(e.into()),
                Err(e @ LibvirtError::Timeout { .. }) => return Err(e.into()),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    fn running_on(&self, overlays: &[Overlay]) -> Result<Vec<Overlay>> {
        let live = self.dom.live_xml()?;
        let mut out = Vec::new();
        for o in overlays {
            if xml_edit::disk_source(&live, &o.target)?.as_deref()
                == Some(&*o.overlay.to_string_lossy())
            {
                out.push(o.clone());
            }
        }
        Ok(out)
    }

    fn commit_back(&self, overlays: &[Overlay], s: &BackupSettings) -> Result<()> {
        if !overlays.is_empty() && !self.running()? {
            // The guest shut down during the backup: no block job can run, so the overlays
            // are committed offline and the definition is pointed at the images again, as
            // `recover` does.
            tracing::warn!(vm = %self.vm, "the VM was shut down during the backup: committing its overlays offline");
            return self.commit_offline(overlays);
        }
        let mut first_err = None;
        for o in overlays {
            if let Err(e) = self.commit_one(o, s.commit_stall_timeout) {
                tracing::error!(vm = %self.vm, disk = %o.target, error = %crate::error::chain(&e), "commit back failed");
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        // libvirt may leave the persistent definition pointing at the overlays.
        crate::fault::point("commit-before-inactive-xml");
        self.fix_persistent(overlays)?;
        let live = self.dom.live_xml()?;
        let inactive = self.dom.inactive_xml()?;
        for o in overlays {
            let image = o.image.to_string_lossy();
            for (which, xml) in [("live", &live), ("inactive", &inactive)] {
                let src = xml_edit::disk_source(xml, &o.target)?;
                if src.as_deref() != Some(&*image) {
                    return Err(Error::CommitBack(format!(
                        "after the commit, the {which} definition of {} disk {} points at {:?}, not {image}",
                        self.vm, o.target, src
                    )));
                }
            }
        }
        Ok(())
    }

    fn is_shut_off(&self) -> Result<bool> {
        Ok(!self.running()?)
    }

    fn drop_bitmaps(&self, drop: &dyn Fn(&str) -> bool) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for name in self.dom.checkpoints()? {
            if !name.starts_with(BITMAP_PREFIX) || !drop(&name) {
                continue;
            }
            if self.delete_checkpoint(&name) {
                tracing::debug!(vm = %self.vm, checkpoint = %name, "checkpoint deleted");
                removed.push(name);
            }
        }
        Ok(removed)
    }
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
            vec![OnOverlay {
                target: "vdb".to_string(),
                overlay: "/v/web.vdb.vmbackup-web-1-ab.qcow2".to_string(),
                backing: Some("/v/web-vdb.qcow2".to_string())
            }]
        );
        assert!(!is_overlay("web", "/v/web.qcow2"));
        assert!(!is_overlay("we", "/v/web.vdb.vmbackup-1.qcow2"));
    }

    #[test]
    fn the_snapshot_names_every_disk() {
        let spec = VmSpec::from_xml(
            "<domain><name>w</name><devices>\
             <disk type='file' device='disk'><source file='/a'/><target dev='vda'/></disk>\
             <disk type='file' device='cdrom'><target dev='sda'/></disk></devices></domain>",
        )
        .unwrap();
        let ov = Overlay {
            target: "vda".into(),
            image: "/a".into(),
            format: "raw".into(),
            overlay: "/o'x".into(),
            node: None,
        };
        let x = snapshot_xml(&spec, &[ov]);
        assert!(x.contains("<disk name='vda' snapshot='external'>"), "{x}");
        assert!(x.contains("/o&apos;x"), "{x}");
        assert!(x.contains("<disk name='sda' snapshot='no'/>"), "{x}");
    }

    #[test]
    fn the_checkpoint_names_every_disk_and_puts_bitmaps_only_on_qcow2_overlays() {
        let spec = VmSpec::from_xml(
            "<domain><name>w</name><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/a'/><target dev='vda'/></disk>\
             <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/b'/><target dev='vdb'/></disk>\
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/c'/><target dev='vdc'/></disk>\
             <disk type='file' device='cdrom'><target dev='sda'/></disk></devices></domain>",
        )
        .unwrap();
        let ov = |t: &str, f: &str| Overlay {
            target: t.into(),
            image: format!("/{t}").into(),
            format: f.into(),
            overlay: format!("/{t}.o").into(),
            node: None,
        };
        // vdc is qcow2 but not snapshotted.
        let targets = bitmap_targets(&spec, &[ov("vda", "qcow2"), ov("vdb", "raw")]);
        assert_eq!(targets, ["vda"]);
        let x = checkpoint_xml(&spec, "vmbackup-a'b", &targets);
        assert!(
            x.starts_with("<domaincheckpoint><name>vmbackup-a&apos;b</name>"),
            "{x}"
        );
        assert!(
            x.contains("<disk name='vda' checkpoint='bitmap' bitmap='vmbackup-a&apos;b'/>"),
            "{x}"
        );
        for t in ["vdb", "vdc", "sda"] {
            assert!(
                x.contains(&format!("<disk name='{t}' checkpoint='no'/>")),
                "{x}"
            );
        }
        roxmltree::Document::parse(&x).unwrap();
    }
}
