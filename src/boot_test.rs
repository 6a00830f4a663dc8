//! `vmbackup boot-test ID`: boots a backup in a throwaway VM and waits for its guest agent.
//!
//! The backup's disks are served in-process over NBD (`serve::serve_until`) on a UNIX socket
//! in a private temporary folder (0700, owned by the user QEMU runs as, so that QEMU reaches
//! it and nobody else does). Each disk becomes a qcow2 overlay in that folder whose backing
//! file is its NBD export: nothing is copied first, the guest's writes go to the overlay, and
//! the backup is only read. The throwaway VM is a transient libvirt domain named
//! `vmbackup-boottest-<vm>-<pid>`, made from the backup's domain XML: same vCPUs, memory,
//! machine type, firmware and boot order; a new UUID; no network interfaces, host devices or
//! graphics; its per-VM files (NVRAM, console logs, sockets) in the temporary folder (the
//! NVRAM a copy of the backed-up one); its TPM state a copy of the backed-up one in libvirt's
//! folder for the new UUID. So the original VM, running or not, is not touched.
//!
//! The VM is destroyed and the folder removed on every path: when the test ends, fails,
//! errs, or a stop signal comes (the `Throwaway` guard; `cleanup_now` for a process that
//! exits without unwinding).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::hypervisor::libvirt::{Dom, Libvirt, PowerState};
use crate::hypervisor::xml_edit::{self, escape_attr, XmlError};
use crate::repository::manifest::{StateFile, TpmState};
use crate::repository::Repository;
use crate::vm_ref::VmRef;

/// The prefix of every throwaway domain's name.
pub const DOMAIN_PREFIX: &str = "vmbackup-boottest-";
/// The prefix of every temporary folder's name.
pub const DIR_PREFIX: &str = "vmbackup-boottest-";
/// The most bytes of the command's output kept (each of stdout and stderr).
pub const OUTPUT_MAX: usize = 4096;

/// What `boot-test` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub id: String,
    /// How long the guest agent has to answer (from the VM's start), and then the command to
    /// end.
    pub timeout: Duration,
    /// A shell command line run in the guest (`/bin/sh -c CMD`) once the agent answers.
    pub command: Option<String>,
    /// Libvirt's connection URI.
    pub connect: String,
    /// Where to save a screenshot of the VM's screen at the end of the test (passed or not).
    pub screenshot: Option<PathBuf>,
}

/// A screenshot taken at the end of a boot test.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Screenshot {
    pub path: String,
    /// As QEMU made it: `image/png` (QEMU 7.1 and later), else `image/x-portable-pixmap`.
    pub mime: String,
    pub bytes: u64,
}

/// The command run in the guest and what it returned.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct CommandResult {
    pub cmd: String,
    /// `None` when it did not end in time.
    pub exit_code: Option<i64>,
    /// Its output, at most `OUTPUT_MAX` bytes each (lossy UTF-8).
    pub stdout: String,
    pub stderr: String,
}

/// The result of a boot test.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct BootTest {
    /// The backup's id.
    #[serde(rename = "backup_id")]
    pub backup: String,
    pub vm: String,
    /// The throwaway domain's name.
    pub domain: String,
    /// The guest agent answered.
    pub booted: bool,
    pub seconds_to_agent: Option<f64>,
    /// What `guest-get-osinfo` said (`None` when the agent did not answer it).
    pub os: Option<Value>,
    pub command: Option<CommandResult>,
    /// Why the test failed; `None` when it passed.
    pub error: Option<String>,
    /// The screenshot asked for (`--screenshot`), when it could be taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub screenshot: Option<Screenshot>,
    /// Why the screenshot asked for could not be taken (the test's result does not depend
    /// on it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub screenshot_error: Option<String>,
    /// The whole test, from the first read of the backup to the cleanup's end.
    pub seconds: f64,
}

impl BootTest {
    /// The VM booted and the command (if any) exited 0.
    pub fn passed(&self) -> bool {
        self.booted && self.error.is_none()
    }

    /// The record kept with the backup.
    pub fn record(&self, at: String) -> crate::repository::BootTestRecord {
        crate::repository::BootTestRecord {
            at,
            booted: self.booted,
            seconds_to_agent: self.seconds_to_agent,
            command: self.command.as_ref().map(|c| c.cmd.clone()),
            command_exit_code: self.command.as_ref().and_then(|c| c.exit_code),
            error: self.error.clone(),
        }
    }
}

/// The throwaway VM of a boot test and its folder: gone when this is dropped.
struct Throwaway {
    lv_uri: String,
    domain: String,
    dir: PathBuf,
    uuid: String,
    dom: Option<Dom>,
    stop: Arc<AtomicBool>,
    server: Option<std::thread::JoinHandle<Result<crate::nbd::server::Stopped>>>,
}

/// What a process exiting at once must remove: (libvirt URI, domain, folder, UUID).
static CURRENT: Mutex<Option<(String, String, PathBuf, String)>> = Mutex::new(None);

fn set_current(v: Option<(String, String, PathBuf, String)>) {
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = v;
}

/// Removes the throwaway VM and folder of a running boot test: for a process about to exit
/// without unwinding (a second stop signal).
pub fn cleanup_now() {
    let Some((uri, domain, dir, uuid)) = CURRENT.lock().unwrap_or_else(|e| e.into_inner()).take()
    else {
        return;
    };
    if let Ok(lv) = Libvirt::open(&uri) {
        remove_domain(&lv, &domain);
    }
    remove_files(&dir, &uuid);
}

fn remove_domain(lv: &Libvirt, name: &str) {
    if let Ok(Some(d)) = lv.find_domain(name) {
        if let Err(e) = d.destroy() {
            tracing::warn!(domain = name, "cannot destroy the throwaway VM: {e}");
        }
        // Transient: gone once destroyed; a persistent one (never made here) is undefined.
        let _ = d.undefine();
    }
}

fn remove_files(dir: &Path, uuid: &str) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    }
    // The throwaway VM's own TPM state (libvirt names it by the new UUID), if it had one.
    let tpm = crate::vm_state::tpm_dir(uuid);
    if tpm.exists() {
        let _ = std::fs::remove_dir_all(&tpm);
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        if let Some(d) = self.dom.take() {
            if let Err(e) = d.destroy() {
                tracing::warn!(domain = %self.domain, "cannot destroy the throwaway VM: {e}");
            }
            let _ = d.undefine();
        }
        // A domain that was being created when the error came: looked up by name.
        if let Ok(lv) = Libvirt::open(&self.lv_uri) {
            remove_domain(&lv, &self.domain);
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
        remove_files(&self.dir, &self.uuid);
        set_current(None);
    }
}

/// The user and group QEMU runs as under libvirt (`libvirt-qemu` on Debian, `qemu`
/// elsewhere); `None` when neither exists (QEMU then runs as root).
pub(crate) fn qemu_owner() -> Option<(u32, u32)> {
    ["libvirt-qemu", "qemu"].iter().find_map(|n| {
        nix::unistd::User::from_name(n)
            .ok()
            .flatten()
            .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
    })
}

pub(crate) fn chown(path: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    if let Some((u, g)) = owner {
        std::os::unix::fs::chown(path, Some(u), Some(g))
            .map_err(|e| Error::io("change the owner of", path, e))?;
    }
    Ok(())
}

/// The throwaway domain's name: `vmbackup-boottest-<vm>-<pid>`, the VM's name cut to keep
/// it short.
pub fn domain_name(vm: &str) -> String {
    let vm: String = vm
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("{DOMAIN_PREFIX}{vm}-{}", std::process::id())
}

/// One disk of the throwaway VM.
#[derive(Debug, Clone)]
pub struct Overlay {
    pub target: String,
    pub overlay: PathBuf,
    pub socket: PathBuf,
}

/// Device elements a throwaway VM does without: it has no network, no host devices, no
/// display.
const DROPPED: [&str; 4] = ["interface", "hostdev", "redirdev", "graphics"];

/// The throwaway domain made from `xml` (the backup's): named `name`, UUID `uuid`, without
/// network interfaces, host devices and graphics, its per-VM files under `dir`, each disk of
/// `disks` the qcow2 overlay backed by its NBD export, other hard disks left out. `nvram`:
/// where its NVRAM goes, when the domain has one.
pub fn throwaway_xml(
    xml: &str,
    name: &str,
    uuid: &str,
    disks: &[Overlay],
    dir: &Path,
) -> std::result::Result<(String, Option<PathBuf>), XmlError> {
    let mut xml = xml_edit::set_name(xml, name)?;
    xml = match xml_edit::set_uuid(&xml, uuid) {
        Ok(x) => x,
        Err(_) => {
            let at = xml
                .find("<name>")
                .ok_or_else(|| XmlError("no <name>".into()))?;
            format!("{}<uuid>{uuid}</uuid>\n  {}", &xml[..at], &xml[at..])
        }
    };
    let in_devices = |n: roxmltree::Node| n.parent().is_some_and(|p| p.has_tag_name("devices"));
    let targets: Vec<&str> = disks.iter().map(|d| d.target.as_str()).collect();
    xml = xml_edit::remove_elements(&xml, |n| {
        if !in_devices(n) {
            return false;
        }
        let tag = n.tag_name().name();
        if DROPPED.contains(&tag) {
            return true;
        }
        // A hard disk the backup does not hold (skipped by the backup): left out.
        tag == "disk"
            && matches!(n.attribute("device").unwrap_or("disk"), "disk" | "lun")
            && !n
                .children()
                .find(|c| c.has_tag_name("target"))
                .and_then(|t| t.attribute("dev"))
                .is_some_and(|d| targets.contains(&d))
    })?;
    // Per-VM files: into the folder, one name each.
    let (paths, _) = xml_edit::per_vm_paths(&xml)?;
    let new_path = |i: usize, p: &xml_edit::VmPath| {
        let base = Path::new(&p.path)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let base: String = base.chars().take(40).collect();
        dir.join(format!("{i}-{base}"))
    };
    let nvram = paths
        .iter()
        .enumerate()
        .find(|(_, p)| p.kind == xml_edit::PathKind::Nvram)
        .map(|(i, p)| new_path(i, p));
    xml = xml_edit::set_paths(&xml, &paths, |p| {
        let i = paths.iter().position(|q| q == p).unwrap_or(0);
        new_path(i, p).to_string_lossy().into_owned()
    });
    for d in disks {
        xml = set_overlay(&xml, d)?;
    }
    Ok((xml, nvram))
}

/// Replaces disk `d.target` of `xml` by the qcow2 overlay `d.overlay` backed by export
/// `d.target` on `d.socket`; its target, boot order and address are kept.
pub(crate) fn set_overlay(xml: &str, d: &Overlay) -> std::result::Result<String, XmlError> {
    const KEPT: [&str; 6] = ["target", "boot", "address", "serial", "wwn", "blockio"];
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
    let disk = doc
        .descendants()
        .find(|n| {
            n.has_tag_name("disk")
                && n.parent().is_some_and(|p| p.has_tag_name("devices"))
                && n.children()
                    .any(|c| c.has_tag_name("target") && c.attribute("dev") == Some(&d.target))
        })
        .ok_or_else(|| XmlError(format!("no disk with target {}", d.target)))?;
    let mut kept = String::new();
    for c in disk.children().filter(|c| c.is_element()) {
        if KEPT.contains(&c.tag_name().name()) {
            kept.push_str("\n      ");
            kept.push_str(&xml[c.range()]);
        }
    }
    let new = format!(
        "<disk type='file' device='disk'>\n      \
         <driver name='qemu' type='qcow2'/>\n      \
         <source file='{}'/>\n      \
         <backingStore type='network' index='1'>\n        \
         <format type='raw'/>\n        \
         <source protocol='nbd' name='{}'>\n          \
         <host transport='unix' socket='{}'/>\n        \
         </source>\n        \
         <backingStore/>\n      \
         </backingStore>{kept}\n    </disk>",
        escape_attr(&d.overlay.to_string_lossy()),
        escape_attr(&d.target),
        escape_attr(&d.socket.to_string_lossy()),
    );
    let r = disk.range();
    Ok(format!("{}{new}{}", &xml[..r.start], &xml[r.end..]))
}

/// Whether domain `xml` has the guest agent's virtio channel.
fn has_agent_channel(xml: &str) -> bool {
    roxmltree::Document::parse(xml).is_ok_and(|d| {
        d.descendants().any(|n| {
            n.has_tag_name("target")
                && n.attribute("name") == Some("org.qemu.guest_agent.0")
                && n.parent().is_some_and(|p| p.has_tag_name("channel"))
        })
    })
}

/// Makes a private temporary folder `TMPDIR/<prefix>XXXXXX` for a VM's overlays and NBD
/// socket: 0700, owned by QEMU's user (`owner`), kept until its maker removes it.
pub(crate) fn private_dir(prefix: &str, owner: Option<(u32, u32)>) -> Result<PathBuf> {
    let base = std::env::temp_dir();
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .map_err(|e| Error::io("create a folder in", &base, e))?
        .keep();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("set the mode of", &dir, e))?;
    chown(&dir, owner)?;
    Ok(dir)
}

/// A qcow2 overlay of `size` bytes backed by the raw NBD export `uri`.
pub(crate) fn qemu_img_create(overlay: &Path, uri: &str, size: u64) -> Result<()> {
    Ok(crate::image::create(
        overlay,
        "qcow2",
        size,
        Some((uri, "raw")),
    )?)
}

/// Boot-tests backup `opts.id` of `repo`. Bad input (an unknown backup, one of a plain QEMU
/// VM, one missing its domain XML) is an error, and nothing is made; every later failure is
/// in the result (`error`), and everything made is removed before this returns.
pub fn boot_test(repo: Arc<Repository>, opts: &Options) -> Result<BootTest> {
    let started = Instant::now();
    let m = repo.load(&opts.id)?;
    if m.vm_name.parse::<VmRef>().is_ok_and(|v| v.is_qemu()) {
        return Err(Error::Invalid(format!(
            "backup {} is of plain QEMU VM {}: it has no domain XML to boot",
            m.id, m.vm_name
        )));
    }
    repo.check_complete(&m)?;
    let xml = repo.get_domain_xml(&m.id)?;
    if let Some(p) = &opts.screenshot {
        check_screenshot_path(p)?;
        if !xml.contains("<video") {
            return Err(Error::Invalid(format!(
                "backup {}: its VM has no video device, so there is no screen to take a \
                 screenshot of (leave out --screenshot)",
                m.id
            )));
        }
    }
    if !has_agent_channel(&xml) {
        return Err(Error::Invalid(format!(
            "backup {}: its VM has no guest agent channel (org.qemu.guest_agent.0), and a boot \
             test waits for the agent",
            m.id
        )));
    }
    let nvram = match m.vm_state.as_ref().and_then(|s| s.nvram.as_ref()) {
        Some(f) => Some(repo.get_state_file(&m.id, f)?),
        None => None,
    };
    // The TPM state: copied into the throwaway VM's own state folder (named by its UUID).
    let tpm = match m.vm_state.as_ref().and_then(|s| s.tpm.as_ref()) {
        Some(t) => {
            let mut files = Vec::new();
            for f in &t.files {
                files.push((f.clone(), repo.get_state_file(&m.id, f)?));
            }
            Some((t.clone(), files))
        }
        None => None,
    };
    let lv = Libvirt::open(&opts.connect)?;
    let mut out = BootTest {
        backup: m.id.clone(),
        vm: m.vm_name.clone(),
        domain: domain_name(&m.vm_name),
        booted: false,
        seconds_to_agent: None,
        os: None,
        command: None,
        error: None,
        screenshot: None,
        screenshot_error: None,
        seconds: 0.0,
    };
    let state = State {
        nvram: nvram.as_deref(),
        tpm: tpm.as_ref(),
    };
    let r = run(&lv, repo, &m, &xml, &state, opts, &mut out);
    out.seconds = started.elapsed().as_secs_f64();
    match r {
        Err(Error::Interrupted) => Err(Error::Interrupted),
        Err(e) => {
            out.error = Some(crate::error::chain(&e));
            Ok(out)
        }
        Ok(()) => Ok(out),
    }
}

/// A backup's TPM state: its description and its files' bytes.
type Tpm = (TpmState, Vec<(StateFile, Vec<u8>)>);

/// The backed-up NVRAM and TPM state, read before anything is made.
struct State<'a> {
    nvram: Option<&'a [u8]>,
    tpm: Option<&'a Tpm>,
}

/// Writes the backed-up TPM state into `dir`, the throwaway VM's state folder, with the
/// recorded owners and modes.
fn copy_tpm(t: &TpmState, files: &[(StateFile, Vec<u8>)], dir: &Path) -> Result<()> {
    let moved = |p: &str| -> PathBuf {
        match Path::new(p).strip_prefix(&t.dir) {
            Ok(rel) => dir.join(rel),
            Err(_) => dir.join(Path::new(p).file_name().unwrap_or_default()),
        }
    };
    for d in &t.dirs {
        let to = moved(&d.path);
        std::fs::create_dir_all(&to).map_err(|e| Error::io("create", &to, e))?;
        crate::restore::set_owner(&to, &d.owner)?;
    }
    for (f, bytes) in files {
        let to = moved(&f.path);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
        }
        crate::restore::write_state_file(&to, bytes, &f.owner)?;
    }
    Ok(())
}

fn run(
    lv: &Libvirt,
    repo: Arc<Repository>,
    m: &crate::repository::manifest::Manifest,
    xml: &str,
    state: &State,
    opts: &Options,
    out: &mut BootTest,
) -> Result<()> {
    let owner = qemu_owner();
    let uuid = crate::restore::new_uuid()?;
    // Named after the throwaway VM.
    debug_assert!(out.domain.starts_with(DIR_PREFIX));
    let dir = private_dir(&format!("{}-", out.domain), owner)?;
    let stop = Arc::new(AtomicBool::new(false));
    set_current(Some((
        lv.uri().to_string(),
        out.domain.clone(),
        dir.clone(),
        uuid.clone(),
    )));
    let mut guard = Throwaway {
        lv_uri: lv.uri().to_string(),
        domain: out.domain.clone(),
        dir: dir.clone(),
        uuid: uuid.clone(),
        dom: None,
        stop: stop.clone(),
        server: None,
    };

    // The NBD exports, served by a thread of this process until the guard stops it.
    let socket = dir.join("nbd.sock");
    let serve_opts = crate::serve::Options {
        id: m.id.clone(),
        disks: Vec::new(),
        endpoint: crate::serve::Endpoint::Unix(socket.clone()),
        idle_timeout: None,
    };
    let (tx, rx) = mpsc::channel::<crate::serve::Serving>();
    let server = std::thread::Builder::new()
        .name("boot-test-nbd".into())
        .spawn(move || {
            let stopping = move || stop.load(Ordering::SeqCst);
            let ready = |s: &crate::serve::Serving| {
                let _ = tx.send(s.clone());
            };
            crate::serve::serve_until(repo, &serve_opts, &ready, &stopping)
        })
        .map_err(|e| Error::io("start a thread for", &socket, e))?;
    let serving = match rx.recv() {
        Ok(s) => s,
        Err(_) => {
            // The server ended before it listened: its error says why.
            return match server.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(Error::Invalid("the NBD server did not start".into())),
            };
        }
    };
    guard.server = Some(server);
    chown(&socket, owner)?;

    let mut overlays = Vec::new();
    for e in &serving.exports {
        let overlay = dir.join(format!("{}.qcow2", e.name));
        let uri = format!("nbd+unix:///{}?socket={}", e.name, socket.display());
        qemu_img_create(&overlay, &uri, e.size)?;
        chown(&overlay, owner)?;
        overlays.push(Overlay {
            target: e.name.clone(),
            overlay,
            socket: socket.clone(),
        });
    }
    let (xml, nvram_path) = throwaway_xml(xml, &out.domain, &uuid, &overlays, &dir)?;
    if let (Some(bytes), Some(p)) = (state.nvram, &nvram_path) {
        std::fs::write(p, bytes).map_err(|e| Error::io("write", p, e))?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io("set the mode of", p, e))?;
        chown(p, owner)?;
    }

    if let Some((t, files)) = state.tpm {
        if xml.contains("<tpm") {
            copy_tpm(t, files, &crate::vm_state::tpm_dir(&uuid))?;
        }
    }
    tracing::info!(domain = %out.domain, backup = %m.id, "starting the throwaway VM");
    let t0 = Instant::now();
    let dom = lv.create_transient(&xml)?;
    let dom = guard.dom.insert(dom);
    let r = wait_and_run(dom, t0, opts, out);
    // Taken whatever happened (a screen stuck at a panic or a boot prompt says why).
    if let (Some(p), false) = (&opts.screenshot, matches!(r, Err(Error::Interrupted))) {
        match save_screenshot(lv, dom, p) {
            Ok(s) => out.screenshot = Some(s),
            Err(e) => {
                let why = crate::error::chain(&e);
                tracing::warn!("no screenshot: {why}");
                out.screenshot_error = Some(why);
            }
        }
    }
    r?;
    drop(guard);
    Ok(())
}

/// Checks `--screenshot PATH` before anything is made: a file (new or to replace) in an
/// existing folder.
fn check_screenshot_path(p: &Path) -> Result<()> {
    if p.is_dir() {
        return Err(Error::Invalid(format!(
            "--screenshot {}: is a folder (give a file name)",
            p.display()
        )));
    }
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Error::Invalid(format!(
            "--screenshot {}: folder {} does not exist",
            p.display(),
            parent.display()
        )));
    }
    Ok(())
}

/// Saves a screenshot of `dom` at `p` (0600: a screen may show what a console shows).
fn save_screenshot(lv: &Libvirt, dom: &Dom, p: &Path) -> Result<Screenshot> {
    use std::os::unix::fs::OpenOptionsExt;
    let (image, mime) = lv.screenshot(dom)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .map_err(|e| Error::io("create", p, e))?;
    // A file replaced keeps its mode otherwise.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("set the mode of", p, e))?;
    std::io::Write::write_all(&mut f, &image).map_err(|e| Error::io("write", p, e))?;
    tracing::info!(path = %p.display(), bytes = image.len(), "screenshot saved");
    Ok(Screenshot {
        path: p.display().to_string(),
        mime,
        bytes: image.len() as u64,
    })
}

/// Waits for the guest agent of the started throwaway VM, then runs the command.
fn wait_and_run(dom: &Dom, t0: Instant, opts: &Options, out: &mut BootTest) -> Result<()> {
    let deadline = t0 + opts.timeout;
    loop {
        if crate::interrupt::requested() {
            return Err(Error::Interrupted);
        }
        if crate::guest_agent::ping(dom, Duration::from_secs(1)).is_ok() {
            break;
        }
        // A transient domain whose QEMU ended is gone: an error here says so too.
        if !matches!(dom.state(), Ok(PowerState::Running | PowerState::Paused)) {
            return Err(Error::Invalid(
                "the VM stopped before its guest agent answered".into(),
            ));
        }
        if Instant::now() >= deadline {
            return Err(Error::Invalid(format!(
                "no answer from the guest agent within {} s",
                opts.timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    out.booted = true;
    out.seconds_to_agent = Some((t0.elapsed().as_secs_f64() * 10.0).round() / 10.0);
    tracing::info!(
        domain = %out.domain,
        seconds = out.seconds_to_agent,
        "the guest agent answered"
    );
    match dom.agent_command(
        &json!({"execute": "guest-get-osinfo"}),
        Duration::from_secs(10),
    ) {
        Ok(v) => out.os = Some(v),
        Err(e) => tracing::warn!("guest-get-osinfo: {e}"),
    }
    if let Some(cmd) = &opts.command {
        let mut res = CommandResult {
            cmd: cmd.clone(),
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
        };
        let r = crate::guest_agent::exec(dom, "/bin/sh", &["-c", cmd], None, opts.timeout);
        let failed = match r {
            Ok(o) => {
                res.exit_code = Some(o.exit_code as i64);
                res.stdout = truncated(&o.stdout);
                res.stderr = truncated(&o.stderr);
                (o.exit_code != 0).then(|| format!("the command exited with {}", o.exit_code))
            }
            Err(e) => Some(format!("the command did not complete: {e}")),
        };
        out.command = Some(res);
        if let Some(why) = failed {
            return Err(Error::Invalid(why));
        }
    }
    Ok(())
}

fn truncated(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(OUTPUT_MAX)]).into_owned();
    if b.len() > OUTPUT_MAX {
        s + "…"
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm'>
  <name>web</name>
  <uuid>11111111-2222-4333-8444-555555555555</uuid>
  <memory unit='KiB'>262144</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/vms/web-vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/vms/scratch.raw'/>
      <target dev='vdz' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
    </interface>
    <serial type='file'>
      <source path='/var/log/web-console.log'/>
    </serial>
    <graphics type='vnc' port='5901'/>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>";

    #[test]
    fn the_throwaway_domain_keeps_the_machine_and_touches_none_of_the_originals_files() {
        let dir = Path::new("/tmp/vmbackup-boottest-1-x");
        let disks = [Overlay {
            target: "vda".into(),
            overlay: dir.join("vda.qcow2"),
            socket: dir.join("nbd.sock"),
        }];
        let (x, nvram) = throwaway_xml(
            XML,
            "vmbackup-boottest-web-1",
            "aaaaaaaa-2222-4333-8444-555555555555",
            &disks,
            dir,
        )
        .unwrap();
        let doc = roxmltree::Document::parse(&x).unwrap();
        let text = |tag: &str| {
            doc.descendants()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.text())
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(text("name"), "vmbackup-boottest-web-1");
        assert_eq!(text("uuid"), "aaaaaaaa-2222-4333-8444-555555555555");
        assert_eq!(text("memory"), "262144");
        assert_eq!(text("vcpu"), "2");
        assert!(x.contains("machine='pc-q35-7.2'"));
        for gone in ["interface", "graphics", "mac"] {
            assert!(!doc.descendants().any(|n| n.has_tag_name(gone)), "{gone}");
        }
        // One hard disk: the overlay, backed by the export; the skipped disk is left out.
        let disks: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .collect();
        assert_eq!(disks.len(), 1, "{x}");
        assert!(x.contains("<source file='/tmp/vmbackup-boottest-1-x/vda.qcow2'/>"));
        assert!(x.contains("<source protocol='nbd' name='vda'>"));
        assert!(x.contains("socket='/tmp/vmbackup-boottest-1-x/nbd.sock'"));
        assert!(x.contains("<boot order='1'/>"));
        assert!(x.contains("<target dev='vda' bus='virtio'/>"));
        assert!(has_agent_channel(&x));
        assert!(!has_agent_channel(&x.replace("guest_agent", "other")));
        // NVRAM and console log in the folder; no path of the original is left.
        assert_eq!(
            nvram.unwrap(),
            Path::new("/tmp/vmbackup-boottest-1-x/0-web_VARS.fd")
        );
        assert!(text("nvram").starts_with("/tmp/vmbackup-boottest-1-x/"));
        for old in [
            "/vms/",
            "/var/log/web-console.log",
            "/var/lib/libvirt/qemu/nvram",
        ] {
            assert!(!x.contains(old), "{old} in {x}");
        }
    }

    #[test]
    fn a_domain_without_uuid_gets_one_and_names_are_cut_and_safe() {
        let xml = "<domain type='kvm'>\n  <name>a</name>\n  <devices/>\n</domain>";
        let (x, nvram) = throwaway_xml(xml, "n", "u-1", &[], Path::new("/t")).unwrap();
        assert!(x.contains("<uuid>u-1</uuid>"), "{x}");
        assert!(nvram.is_none());
        let n = domain_name(&"a/b c".repeat(20));
        assert!(n.starts_with("vmbackup-boottest-a_b_c"));
        assert!(n.len() <= DOMAIN_PREFIX.len() + 40 + 11);
        assert!(n.ends_with(&format!("-{}", std::process::id())));
    }
}
