//! Restore a backup onto its original VM: the VM is left powered off, redefined from the
//! backup's saved domain XML (so vCPUs, memory, disks and vNICs with their MACs are the
//! originals), with every disk written back from the repository.
//!
//! Order, so that a refused or failed restore changes nothing: checks first (a VM of that name
//! is the backup's VM, same UUID; the VM is off, or `--power-off` was given; no other VM uses
//! one of the backup's MACs); then every disk is written into a temporary file beside its
//! image, each chunk checked against its digest; only when all disks are written is the domain
//! redefined, and only once libvirt has accepted the definition are the images replaced
//! (rename), the old ones kept until all new ones are in place, so that a failed rename puts
//! back the images and the definition.
//!
//! A restore killed part-way leaves its temporary files (`.TARGET.vmbackup-restore-PID.EXT`)
//! and the replaced images it kept aside (`.FILE.vmbackup-old-PID`) beside the images; it
//! records the folders it writes in (`STATE_DIR/restores/PID.json`, removed when it ends), and
//! `recover` cleans those folders once that process is gone (`remove_leftovers`). Killed
//! before its definition, nothing else changed; killed after it, the restore can be run again.
//!
//! The restored images hold no dirty bitmaps: libvirt's record of vmbackup's checkpoints of
//! the VM is removed, and the next backup is asked to read every restored disk whole.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::hypervisor::libvirt::{Dom, Libvirt, PowerState};
use crate::hypervisor::network::{self, Reservation};
use crate::hypervisor::vm::VmSpec;
use crate::hypervisor::{xml_edit, BITMAP_PREFIX};
use crate::locks::lock_vm;
use crate::preflight::{Check, Report};
use crate::repository::disk::{restore_disk, restore_disk_qcow2, DiskIndex};
use crate::repository::manifest::{Manifest, Owner, StateFile};
use crate::repository::Repository;
use crate::vm_ref::VmRef;

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Shut a running VM down first (gracefully, then forced after `shutdown_timeout`).
    pub power_off: bool,
    pub shutdown_timeout: Duration,
    pub threads: usize,
    /// Recreate the VM under this name, with a new UUID and new disk paths.
    pub as_name: Option<String>,
    /// With `as_name`: give the vNICs new MACs when another VM uses the recorded ones.
    pub new_macs: bool,
    /// Replace an existing VM (its definition and disks): refused (exit 3) without it.
    pub force: bool,
}

/// What a restore would do (`dry_run`): every check passed, nothing changed.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct RestorePlan {
    pub id: String,
    pub vm: String,
    /// A VM of that name is defined: its definition would be replaced (else: created).
    pub replaces_definition: bool,
    /// The VM runs and would be shut down first (`--power-off`).
    pub powers_off: bool,
    pub disks: Vec<PlannedDisk>,
    /// The NVRAM and TPM state that would be put back, and where.
    pub state: Vec<String>,
}

/// One disk a restore would write.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct PlannedDisk {
    pub target: String,
    pub path: String,
    pub format: String,
    /// The disk's virtual size.
    pub size_bytes: u64,
    /// The bytes of data written (the chunks that are not zero).
    pub data_bytes: u64,
    /// An image is at `path` already and would be replaced (else: created).
    pub replaces: bool,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Restored {
    pub id: String,
    pub vm: String,
    pub disks: Vec<String>,
    pub duration_ms: u64,
    /// DHCP reservations made or found on libvirt networks: `IP for MAC on NETWORK`.
    pub reserved: Vec<String>,
    /// What the restore could not do after the VM was restored.
    pub warnings: Vec<String>,
    /// The NVRAM and TPM state put back, and where; or that the backup holds none.
    pub state: Vec<String>,
}

/// The result of a call on domain `name`, or `None` when it failed because the domain went
/// away meanwhile (another tool undefined it while the restore looked at every VM).
fn unless_gone<T, E: Into<Error>>(
    lv: &Libvirt,
    name: &str,
    r: std::result::Result<T, E>,
) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) => match lv.find_domain(name)? {
            None => Ok(None),
            Some(_) => Err(e.into()),
        },
    }
}

/// How long a running VM's agent may take to say which addresses it has.
const IP_QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Other running VMs whose guests report one of `ips`: `(ip, vm)`. VMs without an agent
/// channel, or whose agent does not answer within `IP_QUERY_TIMEOUT`, are not asked.
fn ip_conflicts(
    lv: &Libvirt,
    own_uuid: &str,
    ips: &[std::net::Ipv4Addr],
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    if ips.is_empty() {
        return Ok(out);
    }
    for name in lv.domain_names()? {
        let Some(dom) = lv.find_domain(&name)? else {
            continue;
        };
        if !unless_gone(lv, &name, dom.is_active())?.unwrap_or(false) {
            continue;
        }
        let Some(xml) = unless_gone(lv, &name, dom.live_xml())? else {
            continue;
        };
        let spec = VmSpec::from_xml(&xml)?;
        if spec.uuid == own_uuid || !spec.agent_channel {
            continue;
        }
        let ifs = match crate::guest_agent::interfaces_within(&dom, IP_QUERY_TIMEOUT) {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(vm = %name, error = %e, "no addresses from the agent");
                continue;
            }
        };
        let theirs: Vec<String> = ifs.into_iter().flat_map(|i| i.ips).collect();
        for ip in network::ipv4s(&theirs) {
            if ips.contains(&ip) {
                out.push((ip.to_string(), name.clone()));
            }
        }
    }
    Ok(out)
}

/// A DHCP reservation to make on a libvirt network after the VM is defined.
struct PlannedReservation {
    network: String,
    mac: String,
    ip: String,
    plan: Reservation,
    live: bool,
}

/// For every vNIC on a libvirt network with a recorded IPv4 address, what its network's DHCP
/// must reserve; a reservation of that address for another MAC is a conflict.
fn plan_reservations(
    lv: &Libvirt,
    saved: &VmSpec,
    m: &Manifest,
) -> Result<(Vec<PlannedReservation>, Vec<String>)> {
    let mut plans = Vec::new();
    let mut conflicts = Vec::new();
    for nic in saved.nics.iter().filter(|n| n.kind == "network") {
        let (Some(net), Some(mac)) = (&nic.source, &nic.mac) else {
            continue;
        };
        let recorded = m
            .nics
            .iter()
            .find(|e| e.mac.as_deref() == Some(mac.as_str()))
            .map(|e| network::ipv4s(&e.ips))
            .unwrap_or_default();
        if recorded.is_empty() {
            continue;
        }
        let Some((xml, live)) = lv.network_xml(net)? else {
            tracing::warn!(network = %net, "the vNIC's network does not exist; no reservation");
            continue;
        };
        for ip in recorded {
            let plan = network::plan(&xml, mac, ip)
                .map_err(|e| Error::Xml(xml_edit::XmlError(e.to_string())))?;
            if let Reservation::Conflict { other_mac } = &plan {
                conflicts.push(format!(
                    "{ip} is reserved on network {net} for {other_mac}, not for {mac}"
                ));
            }
            plans.push(PlannedReservation {
                network: net.clone(),
                mac: mac.clone(),
                ip: ip.to_string(),
                plan,
                live,
            });
        }
    }
    Ok((plans, conflicts))
}

/// Makes the planned reservations; returns what is reserved, and what failed.
fn reserve(lv: &Libvirt, plans: &[PlannedReservation]) -> (Vec<String>, Vec<String>) {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for p in plans {
        let label = format!("{} for {} on {}", p.ip, p.mac, p.network);
        let host = network::host_xml(&p.mac, &p.ip);
        let r = match &p.plan {
            Reservation::Present => Ok(true),
            Reservation::NotServed | Reservation::Conflict { .. } => Ok(false),
            Reservation::Add { ip_index } => lv
                .network_dhcp_host(&p.network, true, *ip_index, &host, p.live)
                .map(|_| true),
            Reservation::Replace { ip_index, old_ip } => lv
                .network_dhcp_host(
                    &p.network,
                    false,
                    *ip_index,
                    &network::host_xml(&p.mac, old_ip),
                    p.live,
                )
                .and_then(|_| lv.network_dhcp_host(&p.network, true, *ip_index, &host, p.live))
                .map(|_| true),
        };
        match r {
            Ok(true) => {
                tracing::info!("DHCP reservation: {label}");
                done.push(label);
            }
            Ok(false) => {}
            Err(e) => {
                let msg = format!("cannot reserve {label}: {}", crate::error::chain(&e));
                tracing::error!("{msg}");
                failed.push(msg);
            }
        }
    }
    (done, failed)
}

/// Temporary files of a restore, removed unless they were moved into place.
struct Temps(Vec<PathBuf>);

/// Where restores in flight record the folders they write temporary files in.
fn records_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("restores")
}

/// A restore's record of the folders it writes in, `STATE_DIR/restores/PID.json`, removed
/// when dropped (a killed restore leaves it, for `recover`).
struct InFlight(PathBuf);

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct InFlightRecord {
    pid: u32,
    dirs: Vec<PathBuf>,
}

impl InFlight {
    fn begin(state_dir: &Path, dirs: Vec<PathBuf>) -> Result<InFlight> {
        let dir = records_dir(state_dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create folder", &dir, e))?;
        let pid = std::process::id();
        let path = dir.join(format!("{pid}.json"));
        let tmp = dir.join(format!(".{pid}.json.tmp"));
        let body = serde_json::to_vec(&InFlightRecord { pid, dirs })
            .map_err(|e| Error::Invalid(format!("restore record: {e}")))?;
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::io("write the restore record", &path, e))?;
        Ok(InFlight(path))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A file a restore of process `pid` leaves beside the images when it is killed.
#[derive(Debug, PartialEq, Eq)]
enum Leftover {
    /// `.TARGET.vmbackup-restore-PID.EXT`: a disk being written.
    Temporary,
    /// `.FILE.vmbackup-old-PID`: image `FILE`, replaced or about to be, kept aside.
    KeptAside(String),
}

fn leftover(name: &str, pid: u32) -> Option<Leftover> {
    let rest = name.strip_prefix('.')?;
    if let Some(file) = rest.strip_suffix(&format!(".vmbackup-old-{pid}")) {
        return (!file.is_empty()).then(|| Leftover::KeptAside(file.to_string()));
    }
    rest.contains(&format!(".vmbackup-restore-{pid}."))
        .then_some(Leftover::Temporary)
}

pub(crate) use crate::locks::process_alive;

/// Cleans what restores that are gone (killed, the host went down) left beside the images:
/// their temporary files are removed; a kept-aside image is removed when its image is there
/// (the kept file is the replaced image, or a second name of the image), and renamed back
/// when it is not (killed between keeping it aside and putting the restored one in place).
/// A restore still running is left alone. Returns the files removed or put back.
pub fn remove_leftovers(state_dir: &Path) -> Result<Vec<String>> {
    let dir = records_dir(state_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", &dir, e)),
    };
    let mut done = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let record: InFlightRecord = match std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            Some(r) => r,
            None => {
                tracing::warn!(file = %path.display(), "unreadable restore record: left alone");
                continue;
            }
        };
        if process_alive(record.pid) {
            continue;
        }
        for d in &record.dirs {
            let Ok(files) = std::fs::read_dir(d) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                let file = f.path();
                match leftover(&name, record.pid) {
                    None => {}
                    Some(Leftover::Temporary) => match std::fs::remove_file(&file) {
                        Ok(()) => done.push(format!("removed {}", file.display())),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(Error::io("remove restore temporary", &file, e)),
                    },
                    Some(Leftover::KeptAside(image)) => {
                        let image = d.join(image);
                        if std::fs::symlink_metadata(&image).is_ok() {
                            std::fs::remove_file(&file)
                                .map_err(|e| Error::io("remove kept-aside image", &file, e))?;
                            done.push(format!("removed {}", file.display()));
                        } else {
                            std::fs::rename(&file, &image)
                                .map_err(|e| Error::io("put back kept-aside image", &image, e))?;
                            sync_folder(&image)?;
                            done.push(format!(
                                "put {} back as {}",
                                file.display(),
                                image.display()
                            ));
                        }
                    }
                }
            }
        }
        std::fs::remove_file(&path).map_err(|e| Error::io("remove restore record", &path, e))?;
        tracing::info!(pid = record.pid, "cleaned what an interrupted restore left");
    }
    Ok(done)
}

impl Drop for Temps {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn refuse(vm: &str, name: &str, message: String) -> Error {
    Error::Refused(Box::new(Report {
        vm: vm.to_string(),
        ok: false,
        checks: vec![Check {
            name: name.to_string(),
            ok: false,
            found: 0,
            limit: 0,
            message,
        }],
        skipped_disks: vec![],
        disks: vec![],
    }))
}

/// Restoring onto the original VM `name` (no `--as`): the domain of that name, if any, must be
/// the backup's VM (UUID `uuid`), or its disks, which may well have the same paths, would be
/// replaced; and the backup's VM must not exist under another name.
fn check_same_vm(lv: &Libvirt, name: &str, dom: Option<&Dom>, uuid: &str) -> Result<()> {
    if uuid.is_empty() {
        return Ok(());
    }
    match dom {
        Some(d) => {
            let found = d.uuid()?;
            if !found.eq_ignore_ascii_case(uuid) {
                return Err(refuse(
                    name,
                    "other-vm",
                    format!(
                        "the VM named {name} has UUID {found}, the backup is of UUID {uuid}: \
                         another VM, whose disks the restore would replace (restore with \
                         --as NEW_NAME, or remove or rename that VM first)"
                    ),
                ));
            }
        }
        None => {
            if let Some(d) = lv.find_domain_by_uuid(uuid)? {
                return Err(refuse(
                    name,
                    "renamed",
                    format!(
                        "the backup's VM (UUID {uuid}) is now named {}: rename it back to \
                         {name}, or restore with --as NEW_NAME",
                        d.name()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Restored images moved over the images they replace, each replaced image kept beside it
/// (`.FILE.vmbackup-old-PID`, a hard link, else a rename) until `finish`. Dropped before that,
/// it puts the replaced images back and removes the new ones where there was none.
struct Placed {
    /// `(image, the replaced image kept aside)`, in the order they were placed.
    done: Vec<(PathBuf, Option<PathBuf>)>,
    finished: bool,
}

fn sync_folder(file: &Path) -> Result<()> {
    match file.parent() {
        Some(dir) => std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("sync folder", dir, e)),
        None => Ok(()),
    }
}

/// Moves every `(restored, image)` into place; on an error, what was moved is put back. A
/// restored file gets the owner and mode of the file it replaces, unless it is in `owned`
/// (its temporary carries the recorded ones already: NVRAM, TPM state).
fn place_disks(moves: &[(PathBuf, PathBuf)], owned: &[PathBuf]) -> Result<Placed> {
    let mut placed = Placed {
        done: Vec::new(),
        finished: false,
    };
    for (from, to) in moves {
        let kept = match std::fs::symlink_metadata(to) {
            Ok(m) => {
                // The restored image gets the replaced one's owner and mode (read now, with
                // the VM off: the owner libvirt's dynamic ownership put back at shutdown); a
                // new one stays 0600, ours.
                if m.is_file() && !owned.contains(to) {
                    crate::image::take_owner_and_mode(from, &m)?;
                }
                let file = to.file_name().unwrap_or_default().to_string_lossy();
                let aside =
                    to.with_file_name(format!(".{file}.vmbackup-old-{}", std::process::id()));
                let _ = std::fs::remove_file(&aside);
                if std::fs::hard_link(to, &aside).is_err() {
                    std::fs::rename(to, &aside)
                        .map_err(|e| Error::io("keep the replaced disk", to, e))?;
                }
                Some(aside)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("look at disk", to, e)),
        };
        placed.done.push((to.clone(), kept));
        std::fs::rename(from, to).map_err(|e| Error::io("replace disk", to, e))?;
        sync_folder(to)?;
        crate::fault::point("restore-renamed-one");
    }
    Ok(placed)
}

impl Placed {
    /// Every image is in place: the replaced ones go.
    fn finish(mut self) {
        self.finished = true;
        for (_, kept) in &self.done {
            if let Some(k) = kept {
                if let Err(e) = std::fs::remove_file(k) {
                    tracing::warn!(file = %k.display(), error = %e, "cannot remove the replaced disk");
                }
            }
        }
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        for (image, kept) in self.done.iter().rev() {
            let r = match kept {
                // When the image is still the kept file itself (its own rename failed), the
                // rename does nothing and the second name is removed.
                Some(k) => std::fs::rename(k, image).map(|_| {
                    let _ = std::fs::remove_file(k);
                }),
                None => match std::fs::remove_file(image) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    r => r,
                },
            };
            match r.map_err(|e| Error::io("put back the replaced disk", image, e)) {
                Ok(()) => {
                    let _ = sync_folder(image);
                }
                Err(e) => tracing::error!("{}", crate::error::chain(&e)),
            }
        }
    }
}

/// The MACs of the backup that another defined VM uses: `(mac, other VM)`.
fn mac_conflicts(lv: &Libvirt, own_uuid: &str, macs: &[String]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for name in lv.domain_names()? {
        let Some(dom) = lv.find_domain(&name)? else {
            continue;
        };
        let Some(xml) = unless_gone(lv, &name, dom.inactive_xml())? else {
            continue;
        };
        let spec = VmSpec::from_xml(&xml)?;
        if spec.uuid == own_uuid {
            continue;
        }
        for n in &spec.nics {
            if let Some(m) = &n.mac {
                if macs.contains(m) {
                    out.push((m.clone(), name.clone()));
                }
            }
        }
    }
    Ok(out)
}

/// Restores backup `id` onto its original VM (found by UUID, else by name; recreated from the
/// saved XML when it no longer exists but its disks' folders do).
pub fn restore(
    lv: &Libvirt,
    repo: &Repository,
    state_dir: &Path,
    id: &str,
    opts: &Options,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
) -> Result<Restored> {
    restore_with(lv, repo, state_dir, id, opts, progress, None).map(|(r, _, _)| r)
}

/// Runs every check of `restore` (the backup's manifest, domain XML and indexes read; the
/// VM's lock, taken and let go; its state; names, MACs, addresses; free space; `--force`)
/// and says what it would create or replace. Changes nothing; the same errors as `restore`.
pub fn dry_run(
    lv: &Libvirt,
    repo: &Repository,
    state_dir: &Path,
    id: &str,
    opts: &Options,
) -> Result<RestorePlan> {
    match run(lv, repo, state_dir, id, opts, &|_, _, _| {}, None, true)? {
        Ran::Planned(p) => Ok(p),
        Ran::Done(..) => unreachable!("a dry run restores nothing"),
    }
}

enum Ran {
    Done(Restored, crate::locks::VmLock, Dom),
    Planned(RestorePlan),
}

/// One disk an instant restore gives the VM: its target, the image it ends in, the image's
/// format.
#[derive(Debug, Clone)]
pub(crate) struct FinalDisk {
    pub target: String,
    pub path: PathBuf,
    pub format: String,
}

/// What an instant restore (the `instant` module) does where a restore writes the disks.
pub(crate) trait InstantHooks {
    /// Once every check passed and the images at `disks` are made (empty): serves the backup,
    /// makes the overlays, and returns the definition to start the VM with (`xml`, the final
    /// one, its disks on the overlays).
    fn prepare(&mut self, xml: &str, disks: &[FinalDisk]) -> Result<String>;
    /// The VM is defined on the overlays and the (empty) images are in place: starts it.
    fn start(&mut self, dom: &Dom) -> Result<()>;
}

/// `restore`, or with `instant` the first part of an instant restore: the same checks, then
/// empty images in place of the restored ones, the VM defined on overlays and started.
/// Returns the VM's lock (still held) and domain too.
pub(crate) fn restore_with(
    lv: &Libvirt,
    repo: &Repository,
    state_dir: &Path,
    id: &str,
    opts: &Options,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
    instant: Option<&mut dyn InstantHooks>,
) -> Result<(Restored, crate::locks::VmLock, Dom)> {
    match run(lv, repo, state_dir, id, opts, progress, instant, false)? {
        Ran::Done(r, lock, dom) => Ok((r, lock, dom)),
        Ran::Planned(_) => unreachable!("a restore is no dry run"),
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    lv: &Libvirt,
    repo: &Repository,
    state_dir: &Path,
    id: &str,
    opts: &Options,
    progress: &(dyn Fn(&str, u64, u64) + Sync),
    mut instant: Option<&mut dyn InstantHooks>,
    dry_run: bool,
) -> Result<Ran> {
    let started = Instant::now();
    let m = repo.load(id)?;
    // A plain QEMU backup keeps no domain XML (its description is QEMU's block graph): it
    // cannot become a libvirt VM, with or without --as. Refused before anything is read.
    if m.vm_name.parse::<VmRef>().is_ok_and(|v| v.is_qemu()) {
        return Err(Error::Invalid(format!(
            "backup {id} is of plain QEMU VM {}: restoring it as a libvirt VM is not \
             supported (it has no domain XML)",
            m.vm_name
        )));
    }
    // A backup with a missing domain XML or index is refused before anything changes.
    repo.check_complete(&m)?;
    let mut xml = repo.get_domain_xml(id)?;
    let saved = VmSpec::from_xml(&xml)?;
    let vm = match &opts.as_name {
        Some(n) => VmRef::libvirt(n)?,
        None => m.vm_name.parse::<VmRef>()?,
    };
    let name = vm.name().to_string();
    let lock = lock_vm(state_dir, &vm)?;
    let dom = lv.find_domain(&name)?;
    if opts.as_name.is_none() {
        let uuid = if m.vm_uuid.is_empty() {
            &saved.uuid
        } else {
            &m.vm_uuid
        };
        check_same_vm(lv, &name, dom.as_ref(), uuid)?;
    }

    let mut copy_uuid: Option<String> = None;
    // Where each disk goes: its recorded image, or with --as a new file beside it.
    let mut targets: Vec<PathBuf> = m.disks.iter().map(|d| PathBuf::from(&d.source)).collect();
    if let Some(new) = &opts.as_name {
        if dom.is_some() {
            return Err(refuse(
                &name,
                "name-taken",
                format!("a VM named {new} exists already"),
            ));
        }
        xml = xml_edit::set_name(&xml, new)?;
        // A new UUID chosen here, not by libvirt: the copy's TPM state folder is named by it
        // and is written before the definition.
        let uuid = new_uuid()?;
        xml = match xml_edit::set_uuid(&xml, &uuid) {
            Ok(x) => x,
            Err(_) => xml_edit::remove_elements(&xml, |n| {
                n.has_tag_name("uuid") && n.parent().is_some_and(|p| p.has_tag_name("domain"))
            })?,
        };
        copy_uuid = Some(uuid);
        for (d, t) in m.disks.iter().zip(targets.iter_mut()) {
            let dir = Path::new(&d.source).parent().unwrap_or(Path::new("/"));
            *t = dir.join(format!("{new}-{}.{}", d.target, d.format));
            if t.exists() {
                return Err(refuse(
                    &name,
                    "disk-exists",
                    format!("{} exists already", t.display()),
                ));
            }
            xml = xml_edit::set_disk_source(&xml, &d.target, &t.to_string_lossy())?;
        }
    }

    // The per-VM files (NVRAM, TPM state, logs, sockets): with --as, new ones for the copy.
    let plan = match (&opts.as_name, &copy_uuid) {
        (Some(new), Some(uuid)) => {
            let (x, plan) = plan_copy_state(&m, &xml, &saved.name, new, uuid)?;
            xml = x;
            plan
        }
        _ => plan_original_state(&m),
    };

    if let Some(d) = &dom {
        if d.state()? != PowerState::ShutOff && !opts.power_off {
            // Refused (3), not busy (4): a scheduler retrying will not help.
            return Err(Error::RefusedState(format!(
                "{} is running; shut it down or give --power-off",
                name
            )));
        }
    }
    let macs: Vec<String> = saved.nics.iter().filter_map(|n| n.mac.clone()).collect();
    // A new VM (--as) conflicts with every other VM, the original included.
    let own_uuid = if opts.as_name.is_some() {
        ""
    } else {
        saved.uuid.as_str()
    };
    let conflicts = mac_conflicts(lv, own_uuid, &macs)?;
    let mut macs_replaced = false;
    if !conflicts.is_empty() {
        if opts.as_name.is_some() && opts.new_macs {
            macs_replaced = true;
            xml = xml_edit::remove_elements(&xml, |n| {
                n.has_tag_name("mac") && n.parent().is_some_and(|p| p.has_tag_name("interface"))
            })?;
        } else {
            let list: Vec<String> = conflicts
                .iter()
                .map(|(mac, vm)| format!("{mac} is used by {vm}"))
                .collect();
            let hint = if opts.as_name.is_some() {
                " (--new-macs gives new ones)"
            } else {
                ""
            };
            return Err(refuse(
                &name,
                "mac-conflict",
                format!("MAC address conflict: {}{hint}", list.join(", ")),
            ));
        }
    }

    // The recorded addresses: no other running VM may have one, and the networks' DHCP must
    // be able to reserve them for the vNICs' MACs.
    let recorded: Vec<std::net::Ipv4Addr> =
        m.nics.iter().flat_map(|n| network::ipv4s(&n.ips)).collect();
    let ip_taken = ip_conflicts(lv, own_uuid, &recorded)?;
    if !ip_taken.is_empty() {
        let list: Vec<String> = ip_taken
            .iter()
            .map(|(ip, vm)| format!("{ip} is in use by running VM {vm}"))
            .collect();
        return Err(refuse(
            &name,
            "ip-conflict",
            format!("IP address conflict: {}", list.join(", ")),
        ));
    }
    // The indexes are read now: a backup whose index cannot be read changes nothing, and
    // they give the space the disks need.
    let mut indexes = Vec::new();
    for d in &m.disks {
        indexes.push(DiskIndex::decode(&repo.store().get(&d.index_object)?)?);
    }
    let (reservations, reserved_elsewhere) = if macs_replaced {
        // New MACs are made by libvirt at define time: nothing to reserve for the old ones.
        (Vec::new(), Vec::new())
    } else {
        plan_reservations(lv, &saved, &m)?
    };
    if !reserved_elsewhere.is_empty() {
        return Err(refuse(
            &name,
            "dhcp-conflict",
            format!(
                "DHCP reservation conflict: {}",
                reserved_elsewhere.join(", ")
            ),
        ));
    }
    let disks: Vec<PlannedDisk> = m
        .disks
        .iter()
        .zip(&targets)
        .zip(&indexes)
        .map(|((d, t), index)| PlannedDisk {
            target: d.target.clone(),
            path: t.display().to_string(),
            format: d.format.clone(),
            size_bytes: index.virtual_size,
            data_bytes: index.data_bytes(),
            replaces: t.exists(),
        })
        .collect();
    check_force(&name, dom.is_some(), &disks, opts.force)?;
    check_space(&name, &disks, instant.is_some())?;
    if dry_run {
        let powers_off = match &dom {
            Some(d) => d.state()? != PowerState::ShutOff,
            None => false,
        };
        drop(lock);
        return Ok(Ran::Planned(RestorePlan {
            id: id.to_string(),
            vm: name,
            replaces_definition: dom.is_some(),
            powers_off,
            disks,
            state: plan.report,
        }));
    }

    // Every disk into a temporary file beside its image; chunks are checked while read.
    // Recorded first, so that `recover` finds them if this process is killed.
    let mut dirs: Vec<PathBuf> = targets
        .iter()
        .chain(plan.files.iter().map(|(_, t)| t))
        .filter_map(|t| t.parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    let _in_flight = InFlight::begin(state_dir, dirs)?;
    let mut temps = Temps(Vec::new());
    let mut moves: Vec<(PathBuf, PathBuf)> = Vec::new();
    for ((d, target), index) in m.disks.iter().zip(&targets).zip(indexes) {
        let target = target.clone();
        let dir = target
            .parent()
            .ok_or_else(|| Error::Invalid(format!("{} has no folder", d.source)))?
            .to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create folder", &dir, e))?;
        if instant.is_some() {
            // An empty image of the disk's size and format: the block copy fills it.
            let e = dir.join(format!(
                ".{}.vmbackup-restore-{}.{}",
                d.target,
                std::process::id(),
                d.format
            ));
            let _ = std::fs::remove_file(&e);
            temps.0.push(e.clone());
            create_empty(&e, &d.format, index.virtual_size)?;
            moves.push((e, target));
            continue;
        }
        let label = format!("restore {} {}", m.vm_name, d.target);
        let threads = opts.threads.max(1);
        if d.format == "qcow2" && index.chunk_size.is_multiple_of(crate::qcow2::CLUSTER) {
            // Straight into a new qcow2 image: one pass, no raw copy to convert.
            let q = dir.join(format!(
                ".{}.vmbackup-restore-{}.qcow2",
                d.target,
                std::process::id()
            ));
            let _ = std::fs::remove_file(&q);
            temps.0.push(q.clone());
            restore_disk_qcow2(repo, &index, &q, threads, &|a, b| progress(&label, a, b))?;
            std::fs::File::open(&q)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io("sync restored disk", &q, e))?;
            moves.push((q, target));
            continue;
        }
        let raw = dir.join(format!(
            ".{}.vmbackup-restore-{}.raw",
            d.target,
            std::process::id()
        ));
        let _ = std::fs::remove_file(&raw);
        temps.0.push(raw.clone());
        restore_disk(repo, &index, &raw, threads, &|a, b| progress(&label, a, b))?;
        let ready = if d.format == "raw" {
            raw.clone()
        } else {
            let conv = dir.join(format!(
                ".{}.vmbackup-restore-{}.{}",
                d.target,
                std::process::id(),
                d.format
            ));
            let _ = std::fs::remove_file(&conv);
            temps.0.push(conv.clone());
            // Made 0600 first: qemu-img keeps the mode of a file it writes over.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&conv)
                .map_err(|e| Error::io("create", &conv, e))?;
            crate::image::convert(&raw, "raw", &conv, &d.format)?;
            conv
        };
        // Durable before it replaces anything.
        std::fs::File::open(&ready)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("sync restored disk", &ready, e))?;
        moves.push((ready, target));
    }

    // The NVRAM and TPM state files likewise, each with its recorded owner and mode.
    let mut created = CreatedDirs(Vec::new());
    let mut owned = Vec::new();
    for (path, owner) in &plan.dirs {
        if !path.exists() {
            let parent = path.parent().unwrap_or(Path::new("/"));
            std::fs::create_dir_all(parent).map_err(|e| Error::io("create folder", parent, e))?;
            std::fs::create_dir(path).map_err(|e| Error::io("create folder", path, e))?;
            created.0.push(path.clone());
            set_owner(path, owner)?;
        }
    }
    for (f, target) in &plan.files {
        let bytes = repo.get_state_file(id, f)?;
        let dir = target
            .parent()
            .ok_or_else(|| Error::Invalid(format!("{} has no folder", target.display())))?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create folder", dir, e))?;
        let file = target.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dir.join(format!(
            ".{file}.vmbackup-restore-{}.state",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        temps.0.push(tmp.clone());
        write_state_file(&tmp, &bytes, &f.owner)?;
        owned.push(target.clone());
        moves.push((tmp, target.clone()));
    }

    // All disks are written and checked: now the VM may change.
    crate::fault::point("restore-temporaries");
    if let Some(d) = &dom {
        if d.state()? != PowerState::ShutOff {
            power_off(d, opts.shutdown_timeout)?;
        }
    }
    let final_xml = xml.clone();
    if let Some(h) = instant.as_mut() {
        let disks: Vec<FinalDisk> = m
            .disks
            .iter()
            .zip(&targets)
            .map(|(d, t)| FinalDisk {
                target: d.target.clone(),
                path: t.clone(),
                format: d.format.clone(),
            })
            .collect();
        xml = h.prepare(&final_xml, &disks)?;
    }
    // The definition before any image: when libvirt refuses it, no disk has changed. When an
    // image cannot be put in place, the replaced images and the definition are put back.
    let previous = match &dom {
        Some(d) => Some(d.inactive_xml()?),
        None => None,
    };
    crate::fault::point("restore-before-define");
    let defined = lv.define(&xml)?;
    let placed = place_disks(&moves, &owned).and_then(|placed| {
        if let Some(h) = instant.as_mut() {
            h.start(&defined)?;
        }
        Ok(placed)
    });
    match placed {
        Ok(placed) => {
            placed.finish();
            created.0.clear();
            remove_stray_state(&plan);
        }
        Err(e) => {
            let undo = match &previous {
                Some(x) => lv.define(x).map(|_| ()),
                None => defined.undefine(),
            };
            if let Err(u) = undo {
                tracing::error!(vm = %name, "cannot put the definition back: {}", crate::error::chain(&u));
            }
            return Err(e);
        }
    }
    let (reserved, mut warnings) = reserve(lv, &reservations);
    if opts.as_name.is_none() {
        // The images are new files without the dirty bitmaps the VM's checkpoints stood for.
        warnings.extend(forget_checkpoints(&defined));
        let why = format!("restored from backup {id}");
        for d in &m.disks {
            if let Err(e) = crate::changes::request_full_read(state_dir, &vm, &d.target, &why) {
                let msg = format!(
                    "cannot ask the next backup to read disk {} whole: {e}",
                    d.target
                );
                tracing::warn!(vm = %name, "{msg}");
                warnings.push(msg);
            }
        }
    }
    if instant.is_none() {
        tracing::info!(vm = %name, id, "restored; the VM is left powered off");
    }
    let restored = Restored {
        id: id.to_string(),
        vm: name,
        disks: m.disks.iter().map(|d| d.target.clone()).collect(),
        duration_ms: started.elapsed().as_millis() as u64,
        reserved,
        warnings,
        state: plan.report,
    };
    Ok(Ran::Done(restored, lock, defined))
}

/// A restore that would replace a VM's definition or an image that is there needs `force`:
/// refused otherwise (exit 3), naming what it would replace.
fn check_force(name: &str, defined: bool, disks: &[PlannedDisk], force: bool) -> Result<()> {
    let replaced: Vec<String> = disks
        .iter()
        .filter(|d| d.replaces)
        .map(|d| format!("{} ({})", d.path, d.target))
        .collect();
    if force || (!defined && replaced.is_empty()) {
        return Ok(());
    }
    let what = match (defined, replaced.is_empty()) {
        (true, true) => format!("the definition of VM {name}"),
        (true, false) => format!(
            "the definition of VM {name} and its disks {}",
            replaced.join(", ")
        ),
        (false, _) => format!("the disk images {}", replaced.join(", ")),
    };
    Err(refuse(
        name,
        "force",
        format!(
            "the restore would replace {what}: give --force to replace them (--dry-run shows \
             what a restore would do; --as NEW_NAME restores beside the VM)"
        ),
    ))
}

/// The restored images are written beside the images they replace, which stay until all are
/// in place: each file system needs room for the disks' data (twice for a disk converted
/// from raw), else refused (exit 3) before anything is written.
fn check_space(name: &str, disks: &[PlannedDisk], instant: bool) -> Result<()> {
    let mut need: Vec<(crate::preflight::Space, u64)> = Vec::new();
    for d in disks {
        let dir = Path::new(&d.path).parent().unwrap_or(Path::new("/"));
        let space = crate::space::free_space(dir)?;
        let bytes = match d.format.as_str() {
            "raw" | "qcow2" => d.data_bytes,
            _ if instant => d.data_bytes,
            _ => d.data_bytes.saturating_mul(2),
        };
        match need
            .iter_mut()
            .find(|(s, _)| s.device.is_some() && s.device == space.device || s.path == space.path)
        {
            Some((_, n)) => *n = n.saturating_add(bytes),
            None => need.push((space, bytes)),
        }
    }
    for (space, bytes) in need {
        if bytes > space.free_bytes {
            return Err(Error::Refused(Box::new(Report {
                vm: name.to_string(),
                ok: false,
                checks: vec![Check {
                    name: "space".into(),
                    ok: false,
                    found: bytes,
                    limit: space.free_bytes,
                    message: format!(
                        "the restored disks need {} MiB in {}, {} MiB are free",
                        bytes.div_ceil(1 << 20),
                        space.path,
                        space.free_bytes >> 20
                    ),
                }],
                skipped_disks: vec![],
                disks: vec![],
            })));
        }
    }
    Ok(())
}

/// Where the NVRAM and TPM state of a backup go, and which folders they need.
#[derive(Debug, Default)]
struct StatePlan {
    /// Each recorded state file and where it goes.
    files: Vec<(StateFile, PathBuf)>,
    /// Folders the TPM state needs (parents first), made with their recorded owner and mode
    /// when missing.
    dirs: Vec<(PathBuf, Owner)>,
    /// The TPM state folders restored: files in them that the backup does not hold (swtpm's
    /// hidden lock aside) are removed once the state is in place.
    clean: Vec<PathBuf>,
    /// What is restored, in words.
    report: Vec<String>,
}

const NO_STATE: &str =
    "the backup holds no NVRAM or TPM state (it was made before vmbackup backed them up)";

/// Onto the original VM: every state file back to its recorded path.
fn plan_original_state(m: &Manifest) -> StatePlan {
    let mut plan = StatePlan::default();
    let Some(st) = &m.vm_state else {
        plan.report.push(NO_STATE.into());
        return plan;
    };
    if let Some(f) = &st.nvram {
        plan.files.push((f.clone(), PathBuf::from(&f.path)));
        plan.report.push(format!("NVRAM restored to {}", f.path));
    }
    if let Some(t) = &st.tpm {
        plan.dirs = t
            .dirs
            .iter()
            .map(|d| (PathBuf::from(&d.path), d.owner.clone()))
            .collect();
        plan.clean = plan.dirs.iter().map(|(p, _)| p.clone()).collect();
        plan.files
            .extend(t.files.iter().map(|f| (f.clone(), PathBuf::from(&f.path))));
        plan.report.push(format!("TPM state restored to {}", t.dir));
    }
    plan
}

/// The longest unix socket path (`sun_path` holds 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// For a copy named `new` (UUID `uuid`) of VM `old`: rewrites every per-VM path of `xml`
/// (NVRAM, file-backed consoles and logs, pipes, listening sockets) to a new one beside the
/// original, and plans the copy's own NVRAM file and TPM state folder. What cannot be made
/// unique (a host device, a fixed port, a new path that exists already) is refused (exit 3)
/// before anything changes.
fn plan_copy_state(
    m: &Manifest,
    xml: &str,
    old: &str,
    new: &str,
    uuid: &str,
) -> Result<(String, StatePlan)> {
    let (paths, mut refused) = xml_edit::per_vm_paths(xml)?;
    let mut map: std::collections::BTreeMap<String, String> = Default::default();
    for p in &paths {
        if map.contains_key(&p.path) {
            continue;
        }
        let Some(to) = xml_edit::copy_path(&p.path, old, new) else {
            refused.push(format!("the {} path {:?} has no file name", p.what, p.path));
            continue;
        };
        if p.kind == xml_edit::PathKind::Socket && to.len() > MAX_SOCKET_PATH {
            refused.push(format!(
                "the copy's {} would be {to}, longer than a unix socket path may be",
                p.what
            ));
        }
        if p.kind == xml_edit::PathKind::Nvram && Path::new(&to).exists() {
            refused.push(format!(
                "the copy's NVRAM file {to} exists already (left by a VM of that name?)"
            ));
        }
        if map.values().any(|v| v == &to) || map.contains_key(&to) {
            refused.push(format!("the copy's {} {to} would not be its own", p.what));
        }
        map.insert(p.path.clone(), to);
    }
    let mut plan = StatePlan::default();
    let st = m.vm_state.as_ref();
    if st.is_none() {
        plan.report.push(NO_STATE.into());
    }
    if let Some(f) = st.and_then(|s| s.nvram.as_ref()) {
        let to = match map.get(&f.path) {
            Some(t) => t.clone(),
            None => xml_edit::copy_path(&f.path, old, new).unwrap_or_default(),
        };
        if Path::new(&to).exists() && !map.contains_key(&f.path) {
            refused.push(format!("the copy's NVRAM file {to} exists already"));
        }
        plan.report.push(format!("NVRAM restored to {to}"));
        plan.files.push((f.clone(), PathBuf::from(to)));
    }
    if let Some(t) = st.and_then(|s| s.tpm.as_ref()) {
        let dir = crate::vm_state::tpm_dir(uuid);
        if dir.exists() {
            refused.push(format!(
                "the copy's TPM state folder {} exists already",
                dir.display()
            ));
        }
        let moved = |p: &str| -> PathBuf {
            match Path::new(p).strip_prefix(&t.dir) {
                Ok(rel) => dir.join(rel),
                Err(_) => dir.join(Path::new(p).file_name().unwrap_or_default()),
            }
        };
        plan.dirs = t
            .dirs
            .iter()
            .map(|d| (moved(&d.path), d.owner.clone()))
            .collect();
        plan.files
            .extend(t.files.iter().map(|f| (f.clone(), moved(&f.path))));
        plan.report
            .push(format!("TPM state restored to {}", dir.display()));
    }
    if !refused.is_empty() {
        return Err(refuse(
            new,
            "not-unique",
            format!(
                "the copy cannot get its own files or ports: {}",
                refused.join("; ")
            ),
        ));
    }
    for (from, to) in &map {
        if !plan.files.iter().any(|(_, t)| t == Path::new(to)) {
            plan.report.push(format!("{from} -> {to}"));
        }
    }
    let xml = xml_edit::set_paths(xml, &paths, |p| {
        map.get(&p.path).cloned().unwrap_or_else(|| p.path.clone())
    });
    Ok((xml, plan))
}

/// A random (version 4) UUID.
pub(crate) fn new_uuid() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::io("read", "/dev/urandom", e))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Gives `path` the recorded owner (by name when the host knows it, else by number) and
/// mode. Without the right to change the owner (not root), the owner stays ours.
pub(crate) fn set_owner(path: &Path, o: &Owner) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let uid = o
        .user
        .as_deref()
        .and_then(|u| nix::unistd::User::from_name(u).ok().flatten())
        .map(|u| u.uid.as_raw())
        .unwrap_or(o.uid);
    let gid = o
        .group
        .as_deref()
        .and_then(|g| nix::unistd::Group::from_name(g).ok().flatten())
        .map(|g| g.gid.as_raw())
        .unwrap_or(o.gid);
    match std::os::unix::fs::chown(path, Some(uid), Some(gid)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        Err(e) => return Err(Error::io("set the owner of", path, e)),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(o.mode & 0o7777))
        .map_err(|e| Error::io("set the mode of", path, e))
}

/// Writes a state file's temporary: new (0600), content, recorded owner and mode, synced.
pub(crate) fn write_state_file(tmp: &Path, bytes: &[u8], owner: &Owner) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| Error::io("create", tmp, e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io("write restored state", tmp, e))?;
    set_owner(tmp, owner)?;
    f.sync_all()
        .map_err(|e| Error::io("sync restored state", tmp, e))
}

/// Folders a restore made for the TPM state; removed (when empty) unless the restore
/// finished.
struct CreatedDirs(Vec<PathBuf>);

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// After the TPM state is in place: removes what else its folders hold (a volatile state
/// of a later suspend, say), so that swtpm starts from the backed-up state alone.
fn remove_stray_state(plan: &StatePlan) {
    for dir in &plan.clean {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let is_file = e.file_type().is_ok_and(|t| t.is_file());
            if !is_file || name.starts_with('.') || plan.files.iter().any(|(_, t)| *t == p) {
                continue;
            }
            match std::fs::remove_file(&p) {
                Ok(()) => {
                    tracing::info!(file = %p.display(), "removed: not part of the restored TPM state")
                }
                Err(e) => tracing::warn!(file = %p.display(), error = %e, "cannot remove"),
            }
        }
    }
}

/// After the images of `dom` were replaced by restored ones, which hold no dirty bitmaps:
/// removes libvirt's record of every checkpoint of vmbackup's (their bitmaps are gone). Other
/// checkpoints are left alone, with a warning, since their bitmaps are gone too. Returns what
/// could not be done.
pub(crate) fn forget_checkpoints(dom: &Dom) -> Vec<String> {
    let names = match dom.checkpoints() {
        Ok(n) => n,
        Err(e) => {
            let msg = format!(
                "cannot list the checkpoints of {}: {}",
                dom.name(),
                crate::error::chain(&e)
            );
            tracing::warn!("{msg}");
            return vec![msg];
        }
    };
    let mut warnings = Vec::new();
    let (ours, foreign): (Vec<String>, Vec<String>) = names
        .into_iter()
        .partition(|n| n.starts_with(BITMAP_PREFIX));
    for n in ours {
        match dom.checkpoint_delete(&n, true) {
            Ok(()) => tracing::debug!(vm = dom.name(), checkpoint = %n, "checkpoint forgotten"),
            Err(e) => {
                let msg = format!(
                    "cannot remove checkpoint {n} of {}: {}",
                    dom.name(),
                    crate::error::chain(&e)
                );
                tracing::warn!("{msg}");
                warnings.push(msg);
            }
        }
    }
    if !foreign.is_empty() {
        tracing::warn!(
            vm = dom.name(),
            "checkpoints not made by vmbackup now name dirty bitmaps that the restored disks \
             do not have: {}",
            foreign.join(", ")
        );
    }
    warnings
}

/// Shuts a domain down through its agent, then forcibly after `timeout`.
fn power_off(d: &crate::hypervisor::libvirt::Dom, timeout: Duration) -> Result<()> {
    let _ = d.agent_command(
        &serde_json::json!({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}),
        Duration::from_secs(5),
    );
    let start = Instant::now();
    while d.is_active()? {
        if start.elapsed() > timeout {
            tracing::warn!(vm = d.name(), "graceful shutdown timed out; powering off");
            d.destroy()?;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// An empty image of `size` bytes in `format` at `path` (new, 0600).
pub fn create_empty(path: &Path, format: &str, size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    if format == "raw" {
        return f
            .set_len(size)
            .map_err(|e| Error::io("set the size of", path, e));
    }
    drop(f);
    // qemu-img keeps the mode of the file it writes over.
    Ok(crate::image::create(path, format, size, None)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn leftovers_of_a_gone_restore_are_recognised_by_name_and_pid() {
        assert_eq!(
            leftover(".vda.vmbackup-restore-42.qcow2", 42),
            Some(Leftover::Temporary)
        );
        assert_eq!(leftover(".vda.vmbackup-restore-42.qcow2", 4), None);
        assert_eq!(leftover(".vda.vmbackup-restore-421.raw", 42), None);
        assert_eq!(
            leftover(".my disk.qcow2.vmbackup-old-42", 42),
            Some(Leftover::KeptAside("my disk.qcow2".into()))
        );
        assert_eq!(leftover(".a.qcow2.vmbackup-old-420", 42), None);
        assert_eq!(leftover("a.qcow2", 42), None);
        assert_eq!(leftover("vda.vmbackup-restore-42.raw", 42), None);
        // NVRAM and TPM state files are written and kept aside the same way.
        assert_eq!(
            leftover(".tpm2-00.permall.vmbackup-restore-42.state", 42),
            Some(Leftover::Temporary)
        );
        assert_eq!(
            leftover(".web01_VARS.fd.vmbackup-old-42", 42),
            Some(Leftover::KeptAside("web01_VARS.fd".into()))
        );
    }

    #[test]
    fn recover_cleans_a_gone_restore_and_puts_a_lone_kept_image_back() {
        let state = tempfile::tempdir().unwrap();
        let images = tempfile::tempdir().unwrap();
        let d = images.path();
        // A pid that is not running (above the kernel's pid_max).
        let pid = 999_999_999u32;
        std::fs::write(d.join("a.qcow2"), b"new a").unwrap();
        std::fs::write(d.join(format!(".a.qcow2.vmbackup-old-{pid}")), b"old a").unwrap();
        // Killed between keeping b aside (by rename) and putting the new one in place.
        std::fs::write(d.join(format!(".b.qcow2.vmbackup-old-{pid}")), b"old b").unwrap();
        std::fs::write(d.join(format!(".vdb.vmbackup-restore-{pid}.qcow2")), b"x").unwrap();
        // Another restore's, still running (this process).
        let mine = format!(".vdc.vmbackup-restore-{}.raw", std::process::id());
        std::fs::write(d.join(&mine), b"y").unwrap();
        let rec = records_dir(state.path());
        std::fs::create_dir_all(&rec).unwrap();
        let body = serde_json::to_vec(&InFlightRecord {
            pid,
            dirs: vec![d.to_path_buf()],
        })
        .unwrap();
        std::fs::write(rec.join(format!("{pid}.json")), body).unwrap();
        let alive = InFlight::begin(state.path(), vec![d.to_path_buf()]).unwrap();

        let done = remove_leftovers(state.path()).unwrap();
        assert_eq!(done.len(), 3, "{done:?}");
        assert_eq!(names(d), [mine.clone(), "a.qcow2".into(), "b.qcow2".into()]);
        assert_eq!(std::fs::read(d.join("a.qcow2")).unwrap(), b"new a");
        assert_eq!(std::fs::read(d.join("b.qcow2")).unwrap(), b"old b");
        assert_eq!(names(&rec), [format!("{}.json", std::process::id())]);
        drop(alive);
        assert!(names(&rec).is_empty());
        assert!(remove_leftovers(state.path()).unwrap().is_empty());
    }

    #[test]
    fn a_failed_placement_puts_the_replaced_images_back() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.qcow2"), b"old a").unwrap();
        std::fs::write(d.join(".a.new"), b"new a").unwrap();
        std::fs::write(d.join(".b.new"), b"new b").unwrap();
        std::fs::write(d.join("c.qcow2"), b"old c").unwrap();
        let moves = vec![
            (d.join(".a.new"), d.join("a.qcow2")),
            // A new image where there was none.
            (d.join(".b.new"), d.join("b.qcow2")),
            // Fails: the restored file is missing.
            (d.join(".c.new"), d.join("c.qcow2")),
        ];
        assert!(place_disks(&moves, &[]).is_err());
        assert_eq!(std::fs::read(d.join("a.qcow2")).unwrap(), b"old a");
        assert_eq!(std::fs::read(d.join("c.qcow2")).unwrap(), b"old c");
        assert_eq!(names(d), ["a.qcow2", "c.qcow2"]);
    }

    #[test]
    fn a_finished_placement_leaves_only_the_new_images() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.qcow2"), b"old a").unwrap();
        std::fs::write(d.join(".a.new"), b"new a").unwrap();
        std::fs::write(d.join(".b.new"), b"new b").unwrap();
        let moves = vec![
            (d.join(".a.new"), d.join("a.qcow2")),
            (d.join(".b.new"), d.join("b.qcow2")),
        ];
        let placed = place_disks(&moves, &[]).unwrap();
        // Until finished, the replaced image is kept beside the new one.
        assert_eq!(
            names(d),
            [
                format!(".a.qcow2.vmbackup-old-{}", std::process::id()),
                "a.qcow2".into(),
                "b.qcow2".into()
            ]
        );
        placed.finish();
        assert_eq!(names(d), ["a.qcow2", "b.qcow2"]);
        assert_eq!(std::fs::read(d.join("a.qcow2")).unwrap(), b"new a");
        assert_eq!(std::fs::read(d.join("b.qcow2")).unwrap(), b"new b");
    }

    #[test]
    fn empty_images_have_the_size_and_format() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.raw");
        create_empty(&raw, "raw", 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), 1 << 20);
        assert!(create_empty(&raw, "raw", 1).is_err(), "never over a file");
        let q = dir.path().join("a.qcow2");
        create_empty(&q, "qcow2", 1 << 20).unwrap();
        let head = std::fs::read(&q).unwrap();
        assert_eq!(&head[..4], b"QFI\xfb");
    }
}
