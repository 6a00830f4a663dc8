//! `vmbackup restore ID --instant` against real libvirtd, QEMU and guests: the VM runs at
//! once on the backup (served over NBD), its disks are copied into place while it runs, and it
//! ends exactly as after a plain restore, independent of the backup.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use vmbackup::hypervisor::vm::VmSpec;
use vmbackup_testkit::libvirt_vm::{Format, TestVm, TestVmBuilder};

fn payload(seed: u32, len: u32) -> Vec<u8> {
    (0..len).map(|i| ((i * seed + 11) % 251) as u8).collect()
}

/// This VM's instant restore leftovers: private folders, records, server processes.
fn leftovers(vm: &TestVm, place: &Place) -> Vec<String> {
    let prefix = format!("vmbackup-instant-{}-", vm.name());
    let mut out: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    if let Ok(d) = std::fs::read_dir(place.state().join("instant")) {
        out.extend(d.flatten().map(|e| e.path().display().to_string()));
    }
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(" serve ") && cmd.contains(&prefix) {
            out.push(format!(
                "process {}: {cmd}",
                p.file_name().to_string_lossy()
            ));
        }
    }
    out
}

/// On drop (a failed test too): stops this VM's instant restore servers and removes their
/// folders, which outlive the test's VM and repository otherwise.
struct Sweep(String);

/// Kills (SIGKILL) the instant restore servers of VM `vm`.
fn kill_servers(vm: &str) {
    let prefix = format!("vmbackup-instant-{vm}-");
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let pid = p.file_name().to_string_lossy().parse::<i32>();
        if let (true, Ok(pid)) = (cmd.contains(" serve ") && cmd.contains(&prefix), pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Sweep {
    fn drop(&mut self) {
        kill_servers(&self.0);
        let prefix = format!("vmbackup-instant-{}-", self.0);
        for e in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Destroys and undefines a domain a test made with `--as`, on drop.
struct Undefine(String);

impl Drop for Undefine {
    fn drop(&mut self) {
        let lv = vmbackup::hypervisor::libvirt::Libvirt::open("qemu:///system").unwrap();
        if let Ok(Some(d)) = lv.find_domain(&self.0) {
            let _ = d.destroy();
            let _ = d.undefine();
        }
    }
}

fn image_format(p: &Path) -> String {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(p)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v.get("backing-filename").is_none(),
        "{} has a backing file: {v}",
        p.display()
    );
    v["format"].as_str().unwrap().to_string()
}

/// The VM is on its own images: live and persistent definitions name them, no backing store,
/// no temporary path; each image has the disk's format.
fn assert_on_own_images(vm: &TestVm, formats: &[(&str, &str)]) {
    for (what, xml) in [
        ("live", vm.dom().live_xml().unwrap()),
        ("persistent", vm.dom().inactive_xml().unwrap()),
    ] {
        for bad in ["nbd", "vmbackup-instant-", "<backingStore type"] {
            assert!(!xml.contains(bad), "{what} XML has {bad}: {xml}");
        }
        let spec = VmSpec::from_xml(&xml).unwrap();
        let mut files: Vec<PathBuf> = spec
            .disks
            .iter()
            .filter_map(|d| d.source.clone().map(PathBuf::from))
            .collect();
        files.sort();
        let mut want = vm.disk_paths().to_vec();
        want.sort();
        assert_eq!(files, want, "{what} XML: {xml}");
    }
    for (p, (target, format)) in vm.disk_paths().iter().zip(formats) {
        assert!(p.to_string_lossy().contains(target));
        assert_eq!(&image_format(p), format, "{}", p.display());
    }
}

/// libvirt's id of the running domain (a new one at each start); `None` when it is off.
fn domid(vm: &TestVm) -> Option<String> {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system", "domid", vm.name()])
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && id.parse::<u32>().is_ok()).then_some(id)
}

/// Runs `restore --instant` in a thread and measures, from its start, when the guest agent of
/// the restored VM (a new start of the domain) answers; returns the command's result and that
/// time.
fn instant_restore_timed(place: &Place, vm: &TestVm, args: &[&str]) -> (Run, Duration) {
    let old = domid(vm);
    let t0 = Instant::now();
    let (repo, state) = (place.repo(), place.state());
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let cmd = std::thread::spawn(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        vmbackup_at(&repo, &state, &a)
    });
    let mut to_agent = None;
    while to_agent.is_none() && t0.elapsed() < Duration::from_secs(300) {
        let id = domid(vm);
        if id.is_some()
            && id != old
            && vmbackup::guest_agent::ping(vm.dom(), Duration::from_millis(500)).is_ok()
        {
            to_agent = Some(t0.elapsed());
        } else if cmd.is_finished() && id.is_none() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = cmd.join().unwrap();
    (
        r,
        to_agent.expect("the guest agent of the restored VM answered"),
    )
}

#[test]
fn an_instant_restore_runs_the_vm_at_once_and_ends_it_on_its_own_images() {
    let mac = "52:54:00:4e:16:01";
    let vm = TestVmBuilder::new("instant")
        .vcpus(1)
        .memory_mib(256)
        .mac(mac)
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .disk("vdc", Format::Raw, 64 * MIB)
        .start()
        .expect("guest boots");
    let _sweep = Sweep(vm.name().to_string());
    let (b, c) = (payload(7, 100_000), payload(13, 90_000));
    vm.write_file("/mnt/vdb/data", &b).unwrap();
    vm.write_file("/mnt/vdc/data", &c).unwrap();
    vm.sh("sync").unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name(), "--quiesce", "required"]);
    vm.write_file("/mnt/vdb/data", b"changed").unwrap();
    vm.write_file("/mnt/vdc/data", b"changed too").unwrap();
    vm.sh("sync").unwrap();

    // Bad input: nothing changes.
    let before = vm.dom().inactive_xml().unwrap();
    let r = vmbackup(&place, &["restore", &id, "--force", "--instant"]);
    assert_eq!(r.code, 3, "running, no --power-off: refused: {}", r.stderr);
    assert!(r.stderr.contains("--power-off"), "{}", r.stderr);
    let r = vmbackup(&place, &["restore", "no-such-backup", "--instant"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(vm.dom().inactive_xml().unwrap(), before);
    assert_eq!(vm.read_file("/mnt/vdb/data").unwrap(), b"changed");
    assert!(leftovers(&vm, &place).is_empty());

    // Plain restore for comparison of the copy time (same backup, same disks).
    let t = Instant::now();
    ok(
        &vmbackup(&place, &["restore", &id, "--force", "--power-off"]),
        "plain restore",
    );
    let plain = t.elapsed();
    let t = Instant::now();
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(120)).unwrap();
    let boot = t.elapsed();
    vm.write_file("/mnt/vdb/data", b"changed again").unwrap();
    vm.sh("sync").unwrap();

    let (r, to_agent) = instant_restore_timed(
        &place,
        &vm,
        &["restore", &id, "--force", "--instant", "--power-off"],
    );
    ok(&r, "instant restore");
    let j = &r.json["restore"];
    assert_eq!(j["id"], id.as_str());
    assert_eq!(j["vm"], vm.name());
    let (start, local) = (
        j["seconds_to_start"].as_f64().unwrap(),
        j["seconds_to_local"].as_f64().unwrap(),
    );
    assert!(start > 0.0 && start <= local, "{j}");
    assert!(j["bytes"].as_u64().unwrap() >= 128 * MIB, "{j}");
    eprintln!(
        "instant restore (debug build): VM started after {start:.1} s, guest agent after \
         {:.1} s, disks local after {local:.1} s; plain restore of the same backup {:.1} s, \
         then start to agent {:.1} s",
        to_agent.as_secs_f64(),
        plain.as_secs_f64(),
        boot.as_secs_f64()
    );

    // Running, the guest reads the backup's bytes; the VM is on its own images.
    assert!(vm.dom().is_active().unwrap());
    vm.wait_agent(Duration::from_secs(60)).unwrap();
    assert!(vm.read_file("/mnt/vdb/data").unwrap() == b);
    assert!(vm.read_file("/mnt/vdc/data").unwrap() == c);
    assert_on_own_images(&vm, &[("vdb", "qcow2"), ("vdc", "raw")]);
    let s = VmSpec::from_xml(&vm.dom().inactive_xml().unwrap()).unwrap();
    assert_eq!((s.vcpus, s.memory_bytes), (1, 256 * MIB));
    assert_eq!(s.nics[0].mac.as_deref(), Some(mac));
    assert!(
        leftovers(&vm, &place).is_empty(),
        "{:?}",
        leftovers(&vm, &place)
    );
    // The repository is free: gc takes its exclusive lock.
    ok(&vmbackup(&place, &["gc"]), "gc");

    // Independent of the backup: restarted with the repository moved away, the guest reads
    // the same bytes.
    let moved = place.dir.path().join("repo-moved-away");
    std::fs::rename(place.repo(), &moved).unwrap();
    vm.shutdown(Duration::from_secs(60)).unwrap();
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(120)).unwrap();
    assert!(vm.read_file("/mnt/vdb/data").unwrap() == b);
    assert!(vm.read_file("/mnt/vdc/data").unwrap() == c);
    std::fs::rename(&moved, place.repo()).unwrap();

    // --as: a second VM beside the running original, on new images beside the originals.
    let new = format!("{}-copy", vm.name());
    let _undefine = Undefine(new.clone());
    let _sweep_copy = Sweep(new.clone());
    let before = vm.dom().inactive_xml().unwrap();
    let r = vmbackup(
        &place,
        &["restore", &id, "--instant", "--as", &new, "--new-macs"],
    );
    ok(&r, "instant restore --as");
    let copy = vm.libvirt().domain(&new).unwrap();
    assert!(copy.is_active().unwrap());
    for (what, xml) in [
        ("live", copy.live_xml().unwrap()),
        ("persistent", copy.inactive_xml().unwrap()),
    ] {
        for bad in ["nbd", "vmbackup-instant-", "<backingStore type"] {
            assert!(!xml.contains(bad), "{what} XML has {bad}: {xml}");
        }
    }
    for (target, format) in [("vdb", "qcow2"), ("vdc", "raw")] {
        let p = vm.dir().join(format!("{new}-{target}.{format}"));
        assert_eq!(image_format(&p), format);
    }
    let agent = |cmd: &str| {
        copy.agent_command(&serde_json::json!({"execute": cmd}), Duration::from_secs(2))
    };
    let t = Instant::now();
    while agent("guest-ping").is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "the copy's agent never answered"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = vmbackup::guest_agent::exec(
        &copy,
        "/bin/cat",
        &["/mnt/vdc/data"],
        None,
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(out.stdout == c, "the copy does not read the backup's data");
    assert_eq!(
        vm.dom().inactive_xml().unwrap(),
        before,
        "the original changed"
    );
    assert!(vm.dom().is_active().unwrap());
    let copy_left: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("vmbackup-instant-{new}-")))
        .collect();
    assert!(copy_left.is_empty(), "{copy_left:?}");
}

/// Starts `vmbackup --json ... ARGS` that stops itself (SIGSTOP) at fault point `point`, and
/// waits until it has.
#[allow(clippy::zombie_processes)]
fn spawn_stopped_at(place: &Place, point: &str, args: &[&str]) -> std::process::Child {
    let mut child = Command::new(binary())
        .arg("--json")
        .arg("--repo")
        .arg(place.repo())
        .arg("--state-dir")
        .arg(place.state())
        .args(args)
        .env_remove("VMBACKUP_CONFIG")
        .env("VMBACKUP_FAILPOINTS", format!("{point}=stop"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run vmbackup");
    let stat = format!("/proc/{}/stat", child.id());
    let start = Instant::now();
    loop {
        let s = std::fs::read_to_string(&stat).unwrap_or_default();
        if s.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('T'))
        {
            return child;
        }
        if s.is_empty() || start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "vmbackup never reached {point}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_interrupted_instant_restore_keeps_the_vm_running_and_recover_finishes_it() {
    let vm = TestVmBuilder::new("instant-int")
        .disk("vdb", Format::Raw, 64 * MIB)
        .start()
        .expect("guest boots");
    let _sweep = Sweep(vm.name().to_string());
    let data = payload(31, 100_000);
    vm.write_file("/mnt/vdb/data", &data).unwrap();
    vm.sh("sync").unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    vm.write_file("/mnt/vdb/data", b"changed").unwrap();
    vm.sh("sync").unwrap();

    // SIGTERM while the copy runs (the command held at the point where the copies started).
    let child = spawn_stopped_at(
        &place,
        "instant-copying",
        &["restore", &id, "--force", "--instant", "--power-off"],
    );
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("vmbackup recover"), "{stderr}");

    // The VM runs on the backup: the guest reads the backup's bytes, the server serves on.
    assert!(vm.dom().is_active().unwrap());
    assert!(vm.dom().live_xml().unwrap().contains("vmbackup-instant-"));
    vm.wait_agent(Duration::from_secs(120)).unwrap();
    assert!(vm.read_file("/mnt/vdb/data").unwrap() == data);
    assert!(!leftovers(&vm, &place).is_empty());
    // Its record holds the domain XML: 0600.
    let records: Vec<_> = std::fs::read_dir(place.state().join("instant"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = records[0].metadata().unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "record mode {mode:o}");
    // Another instant restore of the VM, and a backup of it, are refused until it is
    // finished.
    let r = vmbackup(
        &place,
        &["restore", &id, "--force", "--instant", "--power-off"],
    );
    assert_eq!(r.code, 4, "{}", r.stderr);
    let r = vmbackup(&place, &["backup", vm.name()]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert!(r.stderr.contains("vmbackup recover"), "{}", r.stderr);

    let r = vmbackup(&place, &["recover", vm.name()]);
    ok(&r, "recover");
    let done = r.json["recover"]["instant_restores"].to_string();
    assert!(done.contains(vm.name()), "{}", r.json);
    assert_on_own_images(&vm, &[("vdb", "raw")]);
    assert!(
        leftovers(&vm, &place).is_empty(),
        "{:?}",
        leftovers(&vm, &place)
    );
    vm.write_file("/mnt/vdb/after", b"written after").unwrap();
    assert!(vm.read_file("/mnt/vdb/data").unwrap() == data);
    ok(&vmbackup(&place, &["gc"]), "gc");

    // Interrupted again; then the server dies and the VM is shut off hard before `recover`:
    // it starts a server again and copies the overlay (with the guest's writes) offline.
    let child = spawn_stopped_at(
        &place,
        "instant-copying",
        &["restore", &id, "--force", "--instant", "--power-off"],
    );
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(143));
    vm.wait_agent(Duration::from_secs(120)).unwrap();
    vm.write_file("/mnt/vdb/on-overlay", b"written on the overlay")
        .unwrap();
    vm.sh("sync").unwrap();
    kill_servers(vm.name());
    vm.dom().destroy().unwrap();
    let r = vmbackup(&place, &["recover", vm.name()]);
    ok(&r, "recover of a shut-off VM");
    assert!(
        r.json["recover"]["instant_restores"]
            .to_string()
            .contains("offline"),
        "{}",
        r.json
    );
    assert!(
        leftovers(&vm, &place).is_empty(),
        "{:?}",
        leftovers(&vm, &place)
    );

    // The guest's writes are in the image: after a restart without the repository too.
    std::fs::rename(place.repo(), place.dir.path().join("away")).unwrap();
    vm.dom().start().unwrap();
    assert_on_own_images(&vm, &[("vdb", "raw")]);
    vm.wait_agent(Duration::from_secs(120)).unwrap();
    assert!(vm.read_file("/mnt/vdb/data").unwrap() == data);
    assert_eq!(
        vm.read_file("/mnt/vdb/on-overlay").unwrap(),
        b"written on the overlay"
    );
    // Written after the first restore: the second one put the backup's content back.
    vm.sh("test ! -e /mnt/vdb/after").unwrap();
}
