//! A VM's state besides its disks: the UEFI variables (NVRAM) and the emulated TPM's state
//! are backed up, put back onto the original VM, and given to a `restore --as` copy as its
//! own, with every per-VM path of the copy (serial log, NVRAM, TPM) its own too. Against real
//! libvirt, OVMF and swtpm, with the busybox test guest booted by OVMF (direct kernel boot).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use vmbackup::hypervisor::libvirt::{Dom, Libvirt};
use vmbackup::hypervisor::vm::VmSpec;
use vmbackup_testkit::faults::{FaultRun, Reached};
use vmbackup_testkit::guest;
use vmbackup_testkit::libvirt_vm::{test_root, test_uri, PREFIX};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// A UEFI (q35, OVMF, SMM) VM with an emulated TPM 2.0, booting the test guest's kernel
/// directly, with one blank data disk and a file-backed serial console in its folder.
/// Dropped: destroyed, undefined with its NVRAM and TPM state, its folder removed.
struct UefiVm {
    lv: Libvirt,
    name: String,
    dir: PathBuf,
    /// Copies made by the test (`restore --as`), removed likewise.
    copies: Vec<String>,
}

impl UefiVm {
    fn define(hint: &str) -> UefiVm {
        let lv = Libvirt::open(&test_uri()).unwrap();
        let name = format!("{PREFIX}{}-u{hint}", std::process::id());
        let dir = test_root().join(&name);
        guest::make_public_dir(&dir).unwrap();
        let image = guest::staged_guest().unwrap();
        let disk = dir.join("vdb.qcow2");
        vmbackup_testkit::libvirt_vm::run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "16M"],
        )
        .unwrap();
        let xml = format!(
            "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>256</memory>\n  \
             <vcpu>1</vcpu>\n  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n    \
             <loader readonly='yes' secure='no' type='pflash'>{OVMF_CODE}</loader>\n    \
             <nvram template='{OVMF_VARS}'/>\n    <kernel>{kernel}</kernel>\n    \
             <initrd>{initrd}</initrd>\n    <cmdline>console=ttyS0 quiet panic=-1</cmdline>\n  \
             </os>\n  <features><acpi/><smm state='on'/></features>\n  \
             <on_poweroff>destroy</on_poweroff>\n  <devices>\n    \
             <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
             <source file='{disk}'/>\n      <target dev='vdb' bus='virtio'/>\n    </disk>\n    \
             <serial type='file'>\n      <source path='{console}'/>\n      <target port='0'/>\n    \
             </serial>\n    <channel type='unix'>\n      <target type='virtio' \
             name='org.qemu.guest_agent.0'/>\n    </channel>\n    <tpm model='tpm-crb'>\n      \
             <backend type='emulator' version='2.0'/>\n    </tpm>\n    \
             <memballoon model='none'/>\n  </devices>\n</domain>\n",
            kernel = image.kernel.display(),
            initrd = image.initrd.display(),
            disk = disk.display(),
            console = dir.join("console.log").display(),
        );
        lv.define(&xml).unwrap();
        UefiVm {
            lv,
            name,
            dir,
            copies: Vec::new(),
        }
    }

    fn dom(&self, name: &str) -> Dom {
        self.lv.domain(name).unwrap()
    }

    fn spec(&self, name: &str) -> VmSpec {
        VmSpec::from_xml(&self.dom(name).inactive_xml().unwrap()).unwrap()
    }
}

impl Drop for UefiVm {
    fn drop(&mut self) {
        for n in self.copies.iter().chain([&self.name]) {
            if let Ok(Some(d)) = self.lv.find_domain(n) {
                let _ = d.destroy();
                let _ = d.undefine();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts every VM named and waits until all their agents answer.
fn boot_all(vm: &UefiVm, names: &[&str]) {
    let doms: Vec<Dom> = names.iter().map(|n| vm.dom(n)).collect();
    for d in &doms {
        d.start().unwrap();
    }
    let start = Instant::now();
    let mut up = vec![false; doms.len()];
    while up.iter().any(|u| !u) {
        for (d, u) in doms.iter().zip(up.iter_mut()) {
            if !*u {
                assert!(d.is_active().unwrap(), "{} stopped while booting", d.name());
                *u = vmbackup::guest_agent::ping(d, Duration::from_secs(2)).is_ok();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "not booted: {names:?} {up:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("booted {names:?} in {:?}", start.elapsed());
}

/// A file's bytes, uid, gid and mode.
type FileState = (Vec<u8>, u32, u32, u32);

fn file_state(p: &Path) -> FileState {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (
        std::fs::read(p).unwrap(),
        m.uid(),
        m.gid(),
        m.mode() & 0o7777,
    )
}

/// The TPM state files (not swtpm's lock) of the VM with `uuid`, by path below its folder.
fn tpm_files(uuid: &str) -> Vec<(String, FileState)> {
    let dir = vmbackup::vm_state::tpm_dir(uuid);
    let mut out = Vec::new();
    for sub in std::fs::read_dir(&dir).unwrap().flatten() {
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            let n = f.file_name().to_string_lossy().into_owned();
            if !n.starts_with('.') {
                let rel = format!("{}/{n}", sub.file_name().to_string_lossy());
                out.push((rel, file_state(&f.path())));
            }
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no TPM state in {}", dir.display());
    out
}

/// The TPM state folder and its folders: owner and mode of each.
fn tpm_dirs(uuid: &str) -> Vec<(u32, u32, u32)> {
    let dir = vmbackup::vm_state::tpm_dir(uuid);
    let mut out = Vec::new();
    let mut todo = vec![dir];
    while let Some(d) = todo.pop() {
        let m = std::fs::metadata(&d).unwrap();
        out.push((m.uid(), m.gid(), m.mode() & 0o7777));
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            }
        }
    }
    out
}

/// Runs `vmbackup ARGS` with fail point `spec` (`NAME=kill[@N]`) until it reaches the point,
/// then SIGKILLs its process group.
fn kill_at(place: &Place, spec: &str, args: &[&str]) {
    let point = spec.split('=').next().unwrap();
    let mut run = FaultRun::start(binary(), place, args, spec, &[]);
    let reached = run.wait_marker(Duration::from_secs(180));
    let log = run.stderr();
    run.kill_group();
    assert_eq!(reached, Reached::Point(point.into()), "{args:?}: {log}");
}

#[test]
fn nvram_and_tpm_state_come_back_onto_the_original_and_into_a_copy_that_runs_beside_it() {
    let mut vm = UefiVm::define("st");
    let name = vm.name.clone();
    // The first start makes the NVRAM (from OVMF's template) and the TPM state (swtpm_setup);
    // OVMF writes its variables while it boots.
    boot_all(&vm, &[&name]);
    let spec = vm.spec(&name);
    let nvram = PathBuf::from(spec.nvram.clone().expect("libvirt names the NVRAM file"));
    let place = Place::new();
    // Backed up while it runs: read right after the snapshot.
    let id = backup_id(&place, &[&name]);
    vm.dom(&name).destroy().unwrap();
    let before_nvram = file_state(&nvram);
    let before_tpm = tpm_files(&spec.uuid);

    // The manifest lists them, `show` shows them.
    let r = vmbackup(&place, &["show", &id]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let st = &r.json["manifest"]["vm_state"];
    assert_eq!(st["nvram"]["path"], nvram.to_str().unwrap());
    assert_eq!(st["nvram"]["size"], before_nvram.0.len() as u64);
    assert_eq!(
        st["nvram"]["sha256"],
        vmbackup::digest::sha256_hex(&before_nvram.0)
    );
    assert_eq!(st["nvram"]["owner"]["mode"], before_nvram.3);
    assert_eq!(st["tpm"]["version"], "2.0");
    let files = st["tpm"]["files"].as_array().unwrap();
    assert_eq!(files.len(), before_tpm.len(), "{st}");
    let words = r.json["vm_state"].to_string();
    assert!(
        words.contains("NVRAM: /") && words.contains("TPM: tpm-crb"),
        "{words}"
    );

    // Changed while the VM is off: the variables overwritten, other permissions, the TPM
    // state garbled and a stray volatile state beside it.
    let mut junk = before_nvram.0.clone();
    junk[..4096].fill(0xa5);
    std::fs::write(&nvram, &junk).unwrap();
    std::fs::set_permissions(&nvram, std::fs::Permissions::from_mode(0o644)).unwrap();
    let tpm_dir = vmbackup::vm_state::tpm_dir(&spec.uuid);
    let first = tpm_dir.join(&before_tpm[0].0);
    std::fs::write(&first, b"garbled").unwrap();
    let stray = first.with_file_name("tpm2-00.volatilestate");
    std::fs::write(&stray, b"stale").unwrap();

    let r = vmbackup(&place, &["restore", &id, "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        file_state(&nvram),
        before_nvram,
        "NVRAM back, owner and mode too"
    );
    assert_eq!(tpm_files(&spec.uuid), before_tpm, "TPM state back");
    assert!(!stray.exists());
    let said = r.json["restore"]["state"].to_string();
    assert!(said.contains("NVRAM restored to"), "{said}");

    // Killed after the NVRAM replaced the changed one (the second rename, after the disk's),
    // before the TPM state: the replaced NVRAM is kept aside, nothing is lost; `recover`
    // cleans up and the restore runs again to the end.
    std::fs::write(&nvram, &junk).unwrap();
    std::fs::write(&first, b"garbled").unwrap();
    kill_at(
        &place,
        "restore-renamed-one=kill@2",
        &["restore", &id, "--force"],
    );
    assert_eq!(std::fs::read(&nvram).unwrap(), before_nvram.0);
    let folder = nvram.parent().unwrap();
    let kept: Vec<PathBuf> = std::fs::read_dir(folder)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(".vmbackup-old-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        std::fs::read(&kept[0]).unwrap(),
        junk,
        "the replaced NVRAM is kept"
    );
    assert_eq!(std::fs::read(&first).unwrap(), b"garbled");
    let r = vmbackup(&place, &["recover", &name]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!kept[0].exists());
    let r = vmbackup(&place, &["restore", &id, "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(file_state(&nvram), before_nvram);
    assert_eq!(tpm_files(&spec.uuid), before_tpm);

    // The VM deleted with its NVRAM and TPM state: the restore brings back both, the TPM
    // state folders with their owners and modes.
    let dirs_before = tpm_dirs(&spec.uuid);
    vm.dom(&name).undefine().unwrap();
    assert!(!nvram.exists() && !tpm_dir.exists());
    let r = vmbackup(&place, &["restore", &id, "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(vm.spec(&name).uuid, spec.uuid);
    assert_eq!(file_state(&nvram), before_nvram);
    assert_eq!(tpm_files(&spec.uuid), before_tpm);
    assert_eq!(tpm_dirs(&spec.uuid), dirs_before);

    // A copy: its own NVRAM file beside the original's, its own TPM state (under its new
    // UUID), its own serial log; both run at once.
    let copy = format!("{name}-c");
    vm.copies.push(copy.clone());
    let r = vmbackup(&place, &["restore", &id, "--as", &copy, "--new-macs"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cs = vm.spec(&copy);
    assert_ne!(cs.uuid, spec.uuid);
    let copy_nvram = nvram.with_file_name(format!("{copy}_VARS.fd"));
    assert_eq!(cs.nvram.as_deref(), copy_nvram.to_str());
    assert_eq!(file_state(&copy_nvram), before_nvram);
    assert_eq!(tpm_files(&cs.uuid), before_tpm);
    let copy_xml = vm.dom(&copy).inactive_xml().unwrap();
    let copy_console = vm.dir.join(format!("{copy}-console.log"));
    assert!(
        copy_xml.contains(&format!("<source path='{}'/>", copy_console.display())),
        "{copy_xml}"
    );
    assert!(!copy_xml.contains(&vm.dir.join("console.log").display().to_string()));
    boot_all(&vm, &[&name, &copy]);
    assert!(std::fs::metadata(&copy_console).unwrap().len() > 0);
    // The original's files are its own still.
    assert_eq!(vm.spec(&name).nvram.as_deref(), nvram.to_str());
    assert!(tpm_dir.exists());
}

#[test]
fn missing_or_unreadable_state_fails_the_backup_and_an_old_backup_says_it_holds_no_state() {
    // Never started: libvirt has made neither the NVRAM file nor the TPM state yet.
    let vm = UefiVm::define("miss");
    let place = Place::new();
    let r = vmbackup(&place, &["backup", &vm.name]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("NVRAM file"), "{}", r.stderr);
    assert!(r.stderr.contains("missing"), "{}", r.stderr);
    let l = vmbackup(&place, &["list"]);
    assert_eq!(
        l.json["backups"].as_array().map(Vec::len),
        Some(0),
        "{}",
        l.json
    );

    // The NVRAM file there but unreadable as a file (a folder in its place): fails, naming it.
    let nvram = PathBuf::from(vm.spec(&vm.name).nvram.expect("an NVRAM path"));
    std::fs::create_dir(&nvram).unwrap();
    let r = vmbackup(&place, &["backup", &vm.name]);
    std::fs::remove_dir(&nvram).unwrap();
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains(&nvram.display().to_string()),
        "{}",
        r.stderr
    );
    // The NVRAM file there, the TPM state not: fails, naming the TPM state.
    std::fs::copy(OVMF_VARS, &nvram).unwrap();
    let r = vmbackup(&place, &["backup", &vm.name]);
    std::fs::remove_file(&nvram).unwrap();
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("emulated TPM has no state"),
        "{}",
        r.stderr
    );
    let l = vmbackup(&place, &["list"]);
    assert_eq!(l.json["backups"].as_array().map(Vec::len), Some(0));

    // Without <nvram> and <tpm>, it records that there are none.
    let xml = vm.dom(&vm.name).inactive_xml().unwrap();
    let start = xml.find("<tpm").unwrap();
    let end = xml.find("</tpm>").unwrap() + "</tpm>".len();
    let xml = format!("{}{}", &xml[..start], &xml[end..]);
    // (libvirt would give a pflash loader an NVRAM file again: the loader goes too.)
    let mut xml = xml;
    for (open, close) in [("<nvram", "</nvram>"), ("<loader", "</loader>")] {
        let start = xml.find(open).unwrap();
        let end = xml.find(close).unwrap() + close.len();
        xml = format!("{}{}", &xml[..start], &xml[end..]);
    }
    vm.lv.define(&xml).unwrap();
    let id = backup_id(&place, &[&vm.name]);
    let r = vmbackup(&place, &["show", &id]);
    let st = &r.json["manifest"]["vm_state"];
    assert!(st["nvram"].is_null() && st["tpm"].is_null(), "{st}");

    // A backup made before vmbackup recorded them: the manifest has no vm_state.
    let manifest = place.repo().join("backups").join(&id).join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("vm_state");
    std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let r = vmbackup(&place, &["show", &id]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.json["vm_state"].to_string().contains("none recorded"),
        "{}",
        r.json
    );
    let r = vmbackup(&place, &["restore", &id, "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.json["restore"]["state"]
            .to_string()
            .contains("holds no NVRAM or TPM state"),
        "{}",
        r.json
    );
}
