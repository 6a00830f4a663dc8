//! Throwaway libvirt VMs for the integration tests, the demo and the benchmarks.
//!
//! A `TestVm` boots the guest that `vm-images/build` makes (Debian cloud kernel, busybox,
//! qemu-ga) with data disks made here, under a unique name with the prefix `vmbt-`, and
//! waits for its agent with a timeout. Dropping it destroys and undefines the domain and
//! removes its files, whatever happened; when the drop happens during a panic, the guest
//! console and the libvirt log are printed first. Leftovers of earlier processes are removed
//! when the first VM of a process is made.
//!
//! The guest boots from the copy of its kernel and initramfs that `crate::guest` stages
//! where QEMU (user `libvirt-qemu`) can read it, whatever folder the checkout is in; the VM's
//! disks and console log are in its own folder under `test_root()`, which must be traversable
//! by QEMU's user too (checked).
//!
//! Environment: `VMBACKUP_GUEST_DIR` and `VMBACKUP_GUEST_STAGE_DIR` (see `crate::guest`),
//! `VMBACKUP_TEST_URI` (default `qemu:///system`), `VMBACKUP_TEST_KVM=1` to use KVM instead of
//! TCG, `VMBACKUP_TEST_DIR` (default `/var/tmp/vmbackup-tests`), `VMBACKUP_TEST_KEEP=1` to
//! leave a failed VM behind.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use vmbackup::guest_agent::{self, ExecOutput};
use vmbackup::hypervisor::libvirt::{Dom, Libvirt};
use vmbackup::hypervisor::xml_edit::escape_attr;

use crate::error::{Context as _, KitError, Result};
use crate::guest;

/// Every test domain's name starts with this.
pub const PREFIX: &str = "vmbt-";

pub fn test_uri() -> String {
    std::env::var("VMBACKUP_TEST_URI").unwrap_or_else(|_| "qemu:///system".to_string())
}

pub fn test_root() -> PathBuf {
    std::env::var_os("VMBACKUP_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/vmbackup-tests"))
}

/// Runs a host program (never through a shell) and fails with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| KitError::Command {
            program: program.to_string(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(KitError::Command {
            program: format!("{program} {}", args.join(" ")),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// A data disk of a test VM.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Target name (`vdb`, ...); also the disk's serial, so the guest mounts it at
    /// `/mnt/<target>`.
    pub target: String,
    pub format: Format,
    pub size: u64,
    /// Make an ext4 filesystem on it (the guest mounts it); otherwise it stays blank.
    pub ext4: bool,
    /// Files to put into the filesystem when it is made (`mkfs.ext4 -d`).
    pub fill_from: Option<PathBuf>,
}

/// The guest a test VM boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    /// The busybox initramfs of `vm-images/build` (boots to its agent in about 3 s).
    Busybox,
    /// The Debian 12 guest of `vm-images/build-debian`: a copy of its ext4 root as `vda`
    /// (qcow2), direct kernel boot with `root=/dev/vda`, systemd and qemu-guest-agent (about
    /// 16 s to the agent under TCG).
    Debian,
    /// The Debian guest on a q35 machine with OVMF (pflash loader, a per-VM NVRAM file made
    /// from Debian's variables template, SMM) and an emulated TPM 2.0 (`tpm-crb`, swtpm).
    DebianUefiTpm,
    /// The busybox guest on that q35 machine with OVMF and a TPM 2.0 (direct kernel boot
    /// through the firmware).
    BusyboxUefiTpm,
}

impl GuestKind {
    /// OVMF, a per-VM NVRAM file and an emulated TPM.
    pub fn uefi_tpm(self) -> bool {
        matches!(self, GuestKind::DebianUefiTpm | GuestKind::BusyboxUefiTpm)
    }
}

/// OVMF as Debian's `ovmf` package installs it.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS_TEMPLATE: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// Builds a `TestVm`.
#[derive(Debug, Clone)]
pub struct TestVmBuilder {
    guest: GuestKind,
    hint: String,
    vcpus: u32,
    memory_mib: u64,
    disks: Vec<DiskSpec>,
    mac: Option<String>,
    network: Option<String>,
    agent: bool,
    cmdline_extra: String,
    boot_timeout: Duration,
    name_len: Option<usize>,
    file_names: Vec<(String, String)>,
    video: bool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);
static CLEAN_LEFTOVERS: Once = Once::new();

/// Connects to the test hypervisor; the first time in a process, also removes what earlier
/// test processes left behind.
fn open_test_libvirt() -> Result<Libvirt> {
    let uri = test_uri();
    let lv = Libvirt::open(&uri).ctx(format_args!("connect to libvirt at {uri}"))?;
    CLEAN_LEFTOVERS.call_once(|| {
        if let Err(e) = clean_leftovers(&lv) {
            eprintln!("testvm: cleaning leftovers failed: {e}");
        }
    });
    Ok(lv)
}

impl TestVmBuilder {
    /// `hint` becomes part of the domain name (letters, digits and `-`).
    pub fn new(hint: &str) -> Self {
        TestVmBuilder {
            hint: hint
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .take(24)
                .collect(),
            guest: GuestKind::Busybox,
            vcpus: 1,
            memory_mib: 256,
            disks: Vec::new(),
            mac: None,
            network: None,
            agent: true,
            cmdline_extra: String::new(),
            boot_timeout: Duration::from_secs(180),
            name_len: None,
            file_names: Vec::new(),
            video: false,
        }
    }
    /// Boots the Debian guest (see `GuestKind::Debian`) with 1 GiB of memory, unless
    /// `memory_mib` sets it afterwards. Its root disk is `vda`: data disks need other targets.
    pub fn debian(mut self) -> Self {
        self.guest = GuestKind::Debian;
        self.memory_mib = 1024;
        self
    }
    /// Boots the busybox guest with UEFI and a TPM 2.0 (see `GuestKind::BusyboxUefiTpm`).
    pub fn uefi_tpm(mut self) -> Self {
        self.guest = GuestKind::BusyboxUefiTpm;
        self
    }
    /// Boots the Debian guest with UEFI and a TPM 2.0 (see `GuestKind::DebianUefiTpm`).
    pub fn debian_uefi_tpm(mut self) -> Self {
        self = self.debian();
        self.guest = GuestKind::DebianUefiTpm;
        self
    }
    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }
    pub fn memory_mib(mut self, n: u64) -> Self {
        self.memory_mib = n;
        self
    }
    /// A data disk with an ext4 filesystem that the guest mounts at `/mnt/<target>`.
    pub fn disk(mut self, target: &str, format: Format, size: u64) -> Self {
        self.disks.push(DiskSpec {
            target: target.into(),
            format,
            size,
            ext4: true,
            fill_from: None,
        });
        self
    }
    /// A data disk with no filesystem (sparse; any virtual size).
    pub fn blank_disk(mut self, target: &str, format: Format, size: u64) -> Self {
        self.disks.push(DiskSpec {
            target: target.into(),
            format,
            size,
            ext4: false,
            fill_from: None,
        });
        self
    }
    pub fn disk_spec(mut self, spec: DiskSpec) -> Self {
        self.disks.push(spec);
        self
    }
    /// The MAC of the VM's one vNIC (user-mode networking; no traffic leaves the host).
    /// Puts the vNIC on libvirt network `name` instead of user-mode networking.
    pub fn network(mut self, name: &str) -> Self {
        self.network = Some(name.to_string());
        self
    }

    pub fn mac(mut self, mac: &str) -> Self {
        self.mac = Some(mac.to_string());
        self
    }
    /// Without the guest-agent channel.
    pub fn no_agent(mut self) -> Self {
        self.agent = false;
        self
    }
    /// With a VGA video device (and no graphics: a screen only screenshots see).
    pub fn video(mut self) -> Self {
        self.video = true;
        self
    }
    /// Appended to the kernel command line.
    pub fn cmdline(mut self, extra: &str) -> Self {
        self.cmdline_extra = extra.to_string();
        self
    }
    pub fn boot_timeout(mut self, t: Duration) -> Self {
        self.boot_timeout = t;
        self
    }

    /// Pads the domain name with `x` to exactly `len` characters (it must be longer than
    /// the name the hint gives).
    pub fn name_len(mut self, len: usize) -> Self {
        self.name_len = Some(len);
        self
    }
    /// The file name (in the VM's folder) of the disk with target `target`, instead of
    /// `<target>.<format>`; any bytes but `/` and NUL.
    pub fn disk_file_name(mut self, target: &str, file_name: &str) -> Self {
        self.file_names
            .push((target.to_string(), file_name.to_string()));
        self
    }

    /// Makes the disks and defines the domain without starting it.
    pub fn define(self) -> Result<TestVm> {
        let lv = open_test_libvirt()?;
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let mut name = format!("{PREFIX}{}-{n}-{}", std::process::id(), self.hint);
        if let Some(len) = self.name_len {
            if len < name.len() {
                return Err(KitError::Setup(format!(
                    "a name of {len} characters is shorter than {name}"
                )));
            }
            name.push_str(&"x".repeat(len - name.len()));
        }
        let dir = test_root().join(&name);
        guest::make_public_dir(&dir)?;
        guest::check_traversable(&dir)?;
        let mut vm = TestVm {
            lv,
            dom: None,
            name: name.clone(),
            dir,
            disks: Vec::new(),
            spec: self.clone(),
            owns_dir: true,
        };
        let image = match self.guest {
            GuestKind::Busybox | GuestKind::BusyboxUefiTpm => guest::staged_guest()?,
            GuestKind::Debian | GuestKind::DebianUefiTpm => {
                if self.disks.iter().any(|d| d.target == "vda") {
                    return Err(KitError::Setup(
                        "the Debian guest's root disk is vda: give data disks other targets".into(),
                    ));
                }
                let debian = guest::staged_debian_guest()?;
                let root = vm.dir.join("vda.qcow2");
                std::fs::copy(&debian.root, &root)
                    .map_err(|e| KitError::io("copy the Debian guest's root image to", &root, e))?;
                vm.disks.push(root);
                debian.boot
            }
        };
        for d in &self.disks {
            let file = match self.file_names.iter().find(|(t, _)| t == &d.target) {
                Some((_, f)) => f.clone(),
                None => format!("{}.{}", d.target, d.format.as_str()),
            };
            let path = vm.dir.join(file);
            make_disk(&path, d)?;
            vm.disks.push(path);
        }
        let xml = vm.domain_xml(&image);
        vm.dom = Some(
            vm.lv
                .define(&xml)
                .ctx(format_args!("define test domain {name}"))?,
        );
        Ok(vm)
    }

    /// Defines, starts, and (with an agent channel) waits until the agent answers. When the
    /// guest does not come up in time the error carries its console and libvirt log.
    pub fn start(self) -> Result<TestVm> {
        let timeout = self.boot_timeout;
        let agent = self.agent;
        let vm = self.define()?;
        vm.dom()
            .start()
            .ctx(format_args!("start test domain {}", vm.name))?;
        if agent {
            vm.wait_agent(timeout)?;
        }
        Ok(vm)
    }
}

/// Makes a disk image at `path`.
pub fn make_disk(path: &Path, d: &DiskSpec) -> Result<()> {
    let p = path
        .to_str()
        .ok_or_else(|| KitError::Setup(format!("disk path {} is not UTF-8", path.display())))?;
    if !d.ext4 {
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                d.format.as_str(),
                p,
                &d.size.to_string(),
            ],
        )?;
        return Ok(());
    }
    let raw = match d.format {
        Format::Raw => path.to_path_buf(),
        Format::Qcow2 => path.with_extension("raw-tmp"),
    };
    let raw_s = raw.to_str().unwrap_or(p).to_string();
    let f = std::fs::File::create(&raw).map_err(|e| KitError::io("create disk", &raw, e))?;
    f.set_len(d.size)
        .map_err(|e| KitError::io("size disk", &raw, e))?;
    drop(f);
    let mut args = vec![
        "-q",
        "-F",
        "-t",
        "ext4",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1",
    ];
    let fill;
    if let Some(dir) = &d.fill_from {
        fill = dir.to_string_lossy().into_owned();
        args.extend(["-d", fill.as_str()]);
    }
    args.push(raw_s.as_str());
    run("mkfs.ext4", &args)?;
    if d.format == Format::Qcow2 {
        run("qemu-img", &["convert", "-q", "-O", "qcow2", &raw_s, p])?;
        std::fs::remove_file(&raw).map_err(|e| KitError::io("remove", &raw, e))?;
    }
    Ok(())
}

/// A running (or defined) throwaway VM. See the module documentation.
pub struct TestVm {
    lv: Libvirt,
    dom: Option<Dom>,
    name: String,
    dir: PathBuf,
    disks: Vec<PathBuf>,
    spec: TestVmBuilder,
    /// Whether dropping it removes `dir` (a copy's files are in its original's folder).
    owns_dir: bool,
}

impl TestVm {
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The folder holding this VM's disks and console log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn disk_paths(&self) -> &[PathBuf] {
        &self.disks
    }
    pub fn libvirt(&self) -> &Libvirt {
        &self.lv
    }
    pub fn dom(&self) -> &Dom {
        self.dom.as_ref().expect("domain is defined")
    }
    /// Opens a new connection to libvirt and looks the domain up again: after a restart of
    /// libvirtd the old connection is dead.
    pub fn reconnect(&mut self) -> Result<()> {
        let uri = test_uri();
        self.lv = Libvirt::open(&uri).ctx(format_args!("connect to libvirt at {uri}"))?;
        if self.dom.is_some() {
            self.dom = self
                .lv
                .find_domain(&self.name)
                .ctx(format_args!("look up {}", self.name))?;
        }
        Ok(())
    }
    /// The domain `name` that the code under test defined from this VM (a `restore --as`
    /// copy), as a test VM: the guest helpers work on it, and dropping it destroys and
    /// undefines it with its NVRAM and TPM state. Its files are in this VM's folder and go
    /// with this VM. `name` must extend this VM's name, so that a crashed test's copy is a
    /// leftover like its original.
    pub fn copy_named(&self, name: &str) -> Result<TestVm> {
        if !name.starts_with(&self.name) {
            return Err(KitError::Setup(format!(
                "a copy of {} is named after it, not {name}",
                self.name
            )));
        }
        let lv = open_test_libvirt()?;
        let dom = lv
            .find_domain(name)
            .ctx(format_args!("look up {name}"))?
            .ok_or_else(|| KitError::Setup(format!("no domain {name}")))?;
        Ok(TestVm {
            lv,
            dom: Some(dom),
            name: name.to_string(),
            dir: self.dir.clone(),
            disks: Vec::new(),
            spec: self.spec.clone(),
            owns_dir: false,
        })
    }

    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    fn domain_xml(&self, image: &guest::GuestImage) -> String {
        let kvm = std::env::var("VMBACKUP_TEST_KVM").is_ok_and(|v| v == "1");
        let s = &self.spec;
        let uefi = s.guest.uefi_tpm();
        let (machine, firmware, features) = if uefi {
            (
                "q35",
                format!(
                    "    <loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>\n    \
                     <nvram template='{OVMF_VARS_TEMPLATE}'/>\n"
                ),
                "<acpi/><smm state='on'/>",
            )
        } else {
            ("pc", String::new(), "<acpi/>")
        };
        let root = match s.guest {
            GuestKind::Busybox | GuestKind::BusyboxUefiTpm => "",
            GuestKind::Debian | GuestKind::DebianUefiTpm => "root=/dev/vda rw ",
        };
        let mut x = String::new();
        let _ = write!(
            x,
            "<domain type='{ty}'>\n  <name>{name}</name>\n  <memory unit='MiB'>{mem}</memory>\n  \
             <vcpu>{vcpus}</vcpu>\n  <os>\n    <type arch='x86_64' machine='{machine}'>hvm</type>\n\
             {firmware}    <kernel>{kernel}</kernel>\n    <initrd>{initrd}</initrd>\n    \
             <cmdline>{root}console=ttyS0 quiet panic=-1 {extra}</cmdline>\n  </os>\n  \
             <features>{features}</features>\n  <on_poweroff>destroy</on_poweroff>\n  \
             <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n  <devices>\n",
            ty = if kvm { "kvm" } else { "qemu" },
            name = escape_attr(&self.name),
            mem = s.memory_mib,
            vcpus = s.vcpus,
            kernel = escape_attr(&image.kernel.to_string_lossy()),
            initrd = escape_attr(&image.initrd.to_string_lossy()),
            extra = escape_attr(&s.cmdline_extra),
        );
        let root_disk = self.disks.len() - s.disks.len();
        if root_disk == 1 {
            let _ = write!(
                x,
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2' \
                 cache='none' discard='unmap'/>\n      <source file='{src}'/>\n      <target \
                 dev='vda' bus='virtio'/>\n      <serial>vda</serial>\n    </disk>\n",
                src = escape_attr(&self.disks[0].to_string_lossy()),
            );
        }
        for (d, path) in s.disks.iter().zip(&self.disks[root_disk..]) {
            let _ = write!(
                x,
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{fmt}' \
                 cache='none' discard='unmap'/>\n      <source file='{src}'/>\n      <target \
                 dev='{t}' bus='virtio'/>\n      <serial>{t}</serial>\n    </disk>\n",
                fmt = d.format.as_str(),
                src = escape_attr(&path.to_string_lossy()),
                t = escape_attr(&d.target),
            );
        }
        match &s.network {
            Some(n) => {
                let _ = writeln!(
                    x,
                    "    <interface type='network'>\n      <source network='{}'/>",
                    escape_attr(n)
                );
            }
            None => x.push_str("    <interface type='user'>\n"),
        }
        if let Some(mac) = &s.mac {
            let _ = writeln!(x, "      <mac address='{}'/>", escape_attr(mac));
        }
        x.push_str("      <model type='virtio'/>\n    </interface>\n");
        let _ = write!(
            x,
            "    <serial type='file'>\n      <source path='{}'/>\n      <target port='0'/>\n    \
             </serial>\n",
            escape_attr(&self.console_path().to_string_lossy())
        );
        if s.agent {
            x.push_str(
                "    <channel type='unix'>\n      <target type='virtio' \
                 name='org.qemu.guest_agent.0'/>\n    </channel>\n",
            );
        }
        if uefi {
            x.push_str(
                "    <tpm model='tpm-crb'>\n      <backend type='emulator' version='2.0'/>\n    \
                 </tpm>\n",
            );
        }
        if s.video {
            x.push_str("    <video>\n      <model type='vga'/>\n    </video>\n");
        }
        x.push_str("    <memballoon model='none'/>\n  </devices>\n</domain>\n");
        x
    }

    /// Waits until the guest agent answers; on timeout (or when the domain stopped) the error
    /// carries the console and the libvirt log.
    pub fn wait_agent(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if guest_agent::ping(self.dom(), Duration::from_secs(2)).is_ok() {
                tracing::debug!(vm = %self.name, secs = start.elapsed().as_secs_f64(), "agent up");
                return Ok(());
            }
            let stopped = !self.dom().is_active().unwrap_or(false);
            if stopped || start.elapsed() >= timeout {
                let what = if stopped {
                    format!("the guest agent of {} (the domain stopped)", self.name)
                } else {
                    format!("the guest agent of {}", self.name)
                };
                return Err(KitError::Timeout {
                    what: format!("{what}\n{}", self.diagnostics()),
                    secs: start.elapsed().as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The guest console and the libvirt log of the domain, for failure reports.
    pub fn diagnostics(&self) -> String {
        let tail = |p: &Path| {
            let s = std::fs::read_to_string(p).unwrap_or_else(|e| format!("({e})"));
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        format!(
            "----- console of {name} ({console}) -----\n{c}\n----- libvirt log ({log}) -----\n{l}\n-----",
            name = self.name,
            console = self.console_path().display(),
            c = tail(&self.console_path()),
            log = self.libvirt_log_path().display(),
            l = tail(&self.libvirt_log_path()),
        )
    }

    fn libvirt_log_path(&self) -> PathBuf {
        PathBuf::from("/var/log/libvirt/qemu").join(format!("{}.log", self.name))
    }

    /// Runs `sh -c script` in the guest and returns its output, whatever its exit code.
    pub fn exec_sh(&self, script: &str) -> Result<ExecOutput> {
        guest_agent::exec(
            self.dom(),
            "/bin/sh",
            &["-c", script],
            None,
            Duration::from_secs(120),
        )
        .ctx(format_args!("run in {}: {script}", self.name))
    }

    /// Runs `sh -c script` in the guest; fails unless it exits 0. Returns its stdout.
    pub fn sh(&self, script: &str) -> Result<String> {
        let out = self.exec_sh(script)?;
        if out.exit_code != 0 {
            return Err(KitError::Command {
                program: format!("guest: {script}"),
                detail: format!("exit code {}: {}", out.exit_code, out.stderr_text().trim()),
            });
        }
        Ok(out.stdout_text())
    }

    /// Writes `data` to `path` in the guest and fsyncs it.
    pub fn write_file(&self, path: &str, data: &[u8]) -> Result<()> {
        let out = guest_agent::exec(
            self.dom(),
            "/bin/sh",
            &["-c", "cat > \"$0\" && sync \"$0\"", path],
            Some(data),
            Duration::from_secs(120),
        )
        .ctx(format_args!("write {path} in {}", self.name))?;
        if out.exit_code != 0 {
            return Err(KitError::Command {
                program: format!("guest: write {path}"),
                detail: out.stderr_text(),
            });
        }
        Ok(())
    }

    /// Reads a file from the guest.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let out = guest_agent::exec(
            self.dom(),
            "/bin/cat",
            &[path],
            None,
            Duration::from_secs(120),
        )
        .ctx(format_args!("read {path} in {}", self.name))?;
        if out.exit_code != 0 {
            return Err(KitError::Command {
                program: format!("guest: cat {path}"),
                detail: out.stderr_text(),
            });
        }
        Ok(out.stdout)
    }

    /// Shuts the guest down through its agent and waits until the domain is off; destroys it
    /// when that takes longer than `timeout`.
    pub fn shutdown(&self, timeout: Duration) -> Result<()> {
        let _ = self.dom().agent_command(
            &serde_json::json!({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}),
            Duration::from_secs(5),
        );
        let start = Instant::now();
        while self.dom().is_active().ctx("query the test domain")? {
            if start.elapsed() >= timeout {
                self.dom().destroy().ctx("destroy the test domain")?;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn teardown(&mut self) {
        let mut uuid = None;
        if let Some(dom) = self.dom.take() {
            uuid = dom.uuid().ok();
            if let Err(e) = dom.destroy() {
                eprintln!("testvm: destroy {}: {e}", self.name);
            }
            // With its NVRAM file; libvirt removes the TPM state of a domain undefined
            // without `persistent_state` itself.
            if let Err(e) = dom.undefine() {
                eprintln!("testvm: undefine {}: {e}", self.name);
            }
        } else if let Ok(Some(dom)) = self.lv.find_domain(&self.name) {
            // Redefined by the code under test (a restore, say) under the same name.
            uuid = dom.uuid().ok();
            let _ = dom.destroy();
            let _ = dom.undefine();
        }
        if self.spec.guest.uefi_tpm() {
            // What libvirt may leave of the TPM: the state (when the code under test defined
            // the domain with persistent state) and swtpm's log.
            if let Some(uuid) = uuid.filter(|u| !u.is_empty() && !u.contains('/')) {
                let state = Path::new("/var/lib/libvirt/swtpm").join(uuid);
                if let Err(e) = std::fs::remove_dir_all(&state) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        eprintln!("testvm: remove {}: {e}", state.display());
                    }
                }
            }
            let _ = std::fs::remove_file(
                Path::new("/var/log/swtpm/libvirt/qemu").join(format!("{}-swtpm.log", self.name)),
            );
        }
        if self.owns_dir {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("testvm: remove {}: {e}", self.dir.display());
                }
            }
        }
        let _ = std::fs::remove_file(self.libvirt_log_path());
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "testvm: test failed with {} alive\n{}",
                self.name,
                self.diagnostics()
            );
            if std::env::var("VMBACKUP_TEST_KEEP").is_ok_and(|v| v == "1") {
                eprintln!("testvm: VMBACKUP_TEST_KEEP=1: leaving {} behind", self.name);
                return;
            }
        }
        // The domain may have been redefined by the code under test; look it up afresh.
        if self.dom.is_some() {
            if let Ok(Some(fresh)) = self.lv.find_domain(&self.name) {
                self.dom = Some(fresh);
            }
        }
        self.teardown();
    }
}

/// The pid in a test domain's or folder's name, `vmbt-<pid>-<n>-<hint>`.
fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn process_alive(pid: i32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes the test domains and folders whose process is gone.
pub fn clean_leftovers(lv: &Libvirt) -> Result<()> {
    let me = std::process::id() as i32;
    let stale = |name: &str| match owner_pid(name) {
        Some(pid) => pid != me && !process_alive(pid),
        None => name.starts_with(PREFIX),
    };
    for name in lv.domain_names().ctx("list domains")? {
        if name.starts_with(PREFIX) && stale(&name) {
            if let Some(dom) = lv.find_domain(&name).ctx("look up a domain")? {
                eprintln!("testvm: removing leftover domain {name}");
                let _ = dom.destroy();
                dom.undefine()
                    .ctx(format_args!("undefine leftover domain {name}"))?;
            }
        }
    }
    for name in lv.network_names().ctx("list networks")? {
        if name.starts_with(PREFIX) && stale(&name) {
            eprintln!("testvm: removing leftover network {name}");
            lv.remove_network(&name)
                .ctx(format_args!("remove leftover network {name}"))?;
        }
    }
    if let Ok(entries) = std::fs::read_dir(test_root()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                eprintln!("testvm: removing leftover folder {name}");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

/// The test domains that exist now (for checks that nothing was left behind).
pub fn test_domains(lv: &Libvirt) -> Result<Vec<String>> {
    Ok(lv
        .domain_names()
        .ctx("list domains")?
        .into_iter()
        .filter(|n| n.starts_with(PREFIX))
        .collect())
}

/// Records written by the guest's `vmb-writer`, checked line by line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordCheck {
    /// How many complete, valid records in sequence from 0.
    pub valid: u64,
    /// Lines that are not valid records (torn, corrupt, out of sequence).
    pub bad: Vec<String>,
}

/// Checks the content of a `vmb-writer` file: records numbered from 0 in order, each with a
/// correct checksum, the last one complete.
pub fn check_records(data: &[u8]) -> RecordCheck {
    let text = String::from_utf8_lossy(data);
    let mut valid = 0u64;
    let mut bad = Vec::new();
    let complete = text.ends_with('\n') || text.is_empty();
    let lines: Vec<&str> = text.split_terminator('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let last_and_torn = i + 1 == lines.len() && !complete;
        let parts: Vec<&str> = line.split(' ').collect();
        let ok = !last_and_torn
            && parts.len() == 3
            && parts[0].len() == 10
            && parts[0].parse::<u64>().ok() == Some(valid)
            && parts[1].len() == 32
            && vmbackup::digest::sha256_hex(format!("{} {}", parts[0], parts[1]).as_bytes())[..16]
                == *parts[2];
        if ok && bad.is_empty() {
            valid += 1;
        } else {
            bad.push(line.to_string());
        }
    }
    RecordCheck { valid, bad }
}

/// A throwaway isolated libvirt network (no `<forward>`: no traffic leaves it) with DHCP on
/// 192.168.`octet`.0/24, removed when dropped.
pub struct TestNetwork {
    name: String,
    lv: Libvirt,
    octet: u8,
}

impl TestNetwork {
    /// Creates and starts the network; `octet` picks its /24 (it must be unique among the
    /// tests running at once).
    pub fn create(hint: &str, octet: u8) -> Result<TestNetwork> {
        let lv = open_test_libvirt()?;
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let name = format!("{PREFIX}{pid}-{n}-{hint}");
        // Linux bridge names have at most 15 characters.
        let bridge = format!("vb{}-{n}", pid % 10_000_000);
        let xml = format!(
            "<network>\n  <name>{}</name>\n  <bridge name='{}' stp='off'/>\n  \
             <ip address='192.168.{octet}.1' netmask='255.255.255.0'>\n    <dhcp>\n      \
             <range start='192.168.{octet}.100' end='192.168.{octet}.200'/>\n    </dhcp>\n  \
             </ip>\n</network>\n",
            escape_attr(&name),
            escape_attr(&bridge)
        );
        lv.remove_network(&name)
            .ctx(format_args!("remove network {name}"))?;
        lv.define_network(&xml)
            .ctx(format_args!("define network {name}"))?;
        Ok(TestNetwork { name, lv, octet })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// An address of the network's subnet.
    pub fn ip(&self, host: u8) -> String {
        format!("192.168.{}.{host}", self.octet)
    }

    /// The network's persistent XML.
    pub fn xml(&self) -> Result<String> {
        Ok(self
            .lv
            .network_xml(&self.name)
            .ctx(format_args!("read network {}", self.name))?
            .map(|(x, _)| x)
            .unwrap_or_default())
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        if let Err(e) = self.lv.remove_network(&self.name) {
            eprintln!("testvm: cannot remove network {}: {e}", self.name);
        }
    }
}
