//! `vmbackup restore` onto the original VM, against real libvirt domains and guests.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use vmbackup::hypervisor::vm::VmSpec;
use vmbackup_testkit::libvirt_vm::{DiskSpec, Format, TestNetwork, TestVm, TestVmBuilder};

fn virsh(args: &[&str]) {
    let out = Command::new("virsh")
        .arg("-c")
        .arg("qemu:///system")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn spec(vm: &TestVm) -> VmSpec {
    VmSpec::from_xml(&vm.dom().inactive_xml().unwrap()).unwrap()
}

fn disk_digest(vm: &TestVm) -> String {
    vmbackup::digest::sha256_hex(&std::fs::read(&vm.disk_paths()[0]).unwrap())
}

#[test]
fn restore_brings_back_the_data_vcpus_memory_and_mac_and_leaves_the_vm_off() {
    let mac = "52:54:00:4e:11:01";
    let vm = TestVmBuilder::new("rs-round")
        .vcpus(1)
        .memory_mib(256)
        .mac(mac)
        .disk("vdb", Format::Qcow2, 128 * MIB)
        .start()
        .expect("guest boots");
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    vm.write_file("/mnt/vdb/data", &payload).unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name(), "--quiesce", "required"]);

    // Change the data, and the vCPUs, memory and MAC of the definition.
    vm.write_file("/mnt/vdb/data", b"changed after the backup")
        .unwrap();
    virsh(&["setvcpus", vm.name(), "2", "--config", "--maximum"]);
    virsh(&["setvcpus", vm.name(), "2", "--config"]);
    virsh(&["setmaxmem", vm.name(), "393216", "--config"]);
    virsh(&["setmem", vm.name(), "393216", "--config"]);
    let altered = vm
        .dom()
        .inactive_xml()
        .unwrap()
        .replace(mac, "52:54:00:4e:11:99");
    vm.libvirt().define(&altered).unwrap();
    let s = spec(&vm);
    assert_eq!((s.vcpus, s.memory_bytes), (2, 384 * MIB));

    // Running, without --power-off: refused, nothing changed.
    let before = vm.dom().inactive_xml().unwrap();
    let r = vmbackup(&place, &["restore", &id, "--force"]);
    assert_eq!(r.code, 3, "running, no --power-off: refused: {}", r.stderr);
    assert_eq!(vm.dom().inactive_xml().unwrap(), before);
    assert_eq!(
        vm.read_file("/mnt/vdb/data").unwrap(),
        b"changed after the backup"
    );

    let r = vmbackup(&place, &["restore", &id, "--force", "--power-off"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!vm.dom().is_active().unwrap(), "the VM was left running");
    let s = spec(&vm);
    assert_eq!(s.vcpus, 1);
    assert_eq!(s.memory_bytes, 256 * MIB);
    assert_eq!(s.nics[0].mac.as_deref(), Some(mac));

    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    assert!(
        vm.read_file("/mnt/vdb/data").unwrap() == payload,
        "the guest does not read the backup's data"
    );
}

/// A restore onto an existing VM needs --force; --dry-run changes nothing; a held VM lock is
/// busy (4) and named, and --retry-lock waits for it.
#[test]
fn restore_needs_force_dry_runs_and_waits_for_a_held_vm_lock() {
    let vm = TestVmBuilder::new("rs-busy")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .define()
        .unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    let image = vm.disk_paths()[0].clone();
    let path = image.to_str().unwrap();
    // A restore puts a new file in place: the inode tells whether one did.
    let inode = || std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&image).unwrap());
    let untouched = (disk_digest(&vm), inode(), vm.dom().inactive_xml().unwrap());
    let unchanged = || {
        assert!(
            (disk_digest(&vm), inode(), vm.dom().inactive_xml().unwrap()) == untouched,
            "the VM changed"
        )
    };
    let vm_ref = vm.name().parse().unwrap();

    // Onto the existing VM, shut off, without --force: refused, naming the disks.
    let r = vmbackup(&place, &["restore", &id]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let err = r.json["error"]["message"].as_str().unwrap();
    assert!(
        err.contains("--force") && err.contains(path) && err.contains(vm.name()),
        "{err}"
    );
    unchanged();
    // The dry run: every check, the same exit code; with --force, what it would replace.
    let r = vmbackup(&place, &["restore", &id, "--dry-run"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let r = vmbackup(&place, &["restore", &id, "--dry-run", "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let plan = &r.json["restore"];
    assert_eq!(plan["replaces_definition"], true, "{plan}");
    assert_eq!(plan["powers_off"], false, "{plan}");
    let disk = &plan["disks"][0];
    assert_eq!(disk["path"], path, "{plan}");
    assert_eq!(disk["target"], "vdb", "{plan}");
    assert_eq!(disk["size_bytes"], 64 * MIB, "{plan}");
    assert_eq!(disk["replaces"], true, "{plan}");
    unchanged();
    drop(vmbackup::locks::lock_vm(&place.state(), &vm_ref).expect("the dry run left no lock"));

    // A backup of the VM holds this lock for its whole run: busy (4), naming it.
    vmbackup::locks::set_job("backup");
    let held = vmbackup::locks::lock_vm(&place.state(), &vm_ref).unwrap();
    let r = vmbackup(&place, &["restore", &id, "--force"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    let err = r.json["error"]["message"].as_str().unwrap();
    let holder = format!(
        "busy: VM {} is locked by backup (pid {}, since ",
        vm.name(),
        std::process::id()
    );
    assert!(err.contains(&holder), "{err}");
    assert_eq!(
        vmbackup(&place, &["restore", &id, "--force", "--dry-run"]).code,
        4
    );
    // And a backup is refused while a restore (or backup) holds it.
    assert_eq!(vmbackup(&place, &["backup", vm.name()]).code, 4);
    unchanged();
    // With --retry-lock, a restore waits for the lock, let go after 3 s, and runs.
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        drop(held);
    });
    let started = std::time::Instant::now();
    let r = vmbackup(&place, &["restore", &id, "--force", "--retry-lock", "20s"]);
    let took = started.elapsed();
    release.join().unwrap();
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(15),
        "{took:?}"
    );
    assert!(r.stderr.contains("trying again"), "{}", r.stderr);
    assert_ne!(inode(), untouched.1, "restored");
}

#[test]
fn a_corrupt_chunk_makes_restore_refuse_and_leaves_the_disks_untouched() {
    let (_fill, d) = filled_disk("vdb", 64 * MIB, 6);
    let vm = TestVmBuilder::new("rs-corrupt")
        .disk_spec(d)
        .define()
        .unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    let chunks = vmbackup::repository::Repository::open(&place.repo())
        .unwrap()
        .store()
        .list("chunks/")
        .unwrap();
    let path = place.repo().join(&chunks[chunks.len() / 2]);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len() - 100;
    bytes[n] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();

    let v = vmbackup(&place, &["verify", &id]);
    assert_eq!(v.code, 1);
    let digest = disk_digest(&vm);
    let xml = vm.dom().inactive_xml().unwrap();
    let r = vmbackup(&place, &["restore", &id, "--force"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("damaged"),
        "{}",
        r.json
    );
    assert_eq!(disk_digest(&vm), digest, "the VM's disk was changed");
    assert_eq!(vm.dom().inactive_xml().unwrap(), xml);
    assert_eq!(
        files_in(vm.dir()),
        ["vdb.qcow2"],
        "temporary files were left"
    );
}

#[test]
fn a_mac_used_by_another_vm_is_refused() {
    let mac = "52:54:00:4e:22:01";
    let vm = TestVmBuilder::new("rs-mac")
        .mac(mac)
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .define()
        .unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    let _other = TestVmBuilder::new("rs-mac-other")
        .mac(mac)
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .define()
        .unwrap();
    let digest = disk_digest(&vm);
    let r = vmbackup(&place, &["restore", &id, "--force"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.json["error"]["message"].as_str().unwrap().contains(mac),
        "{}",
        r.json
    );
    assert_eq!(disk_digest(&vm), digest);
}

/// Destroys and undefines a domain the test made by restoring, whatever happens.
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

#[test]
fn restore_as_recreates_a_deleted_vm_that_boots_with_its_data() {
    let mac = "52:54:00:4e:33:01";
    let vm = TestVmBuilder::new("rs-as")
        .mac(mac)
        .disk("vdb", Format::Qcow2, 128 * MIB)
        .start()
        .expect("guest boots");
    vm.write_file("/mnt/vdb/data", b"kept by the backup")
        .unwrap();
    let old_uuid = vm.dom().uuid().unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name(), "--quiesce", "required"]);

    // The VM goes away, disks and all.
    vm.dom().destroy().unwrap();
    vm.dom().undefine().unwrap();
    std::fs::remove_file(&vm.disk_paths()[0]).unwrap();

    let new = format!("{}-back", vm.name());
    let _cleanup = Undefine(new.clone());
    let r = vmbackup(&place, &["restore", &id, "--as", &new]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lv = vmbackup::hypervisor::libvirt::Libvirt::open("qemu:///system").unwrap();
    let dom = lv.domain(&new).unwrap();
    assert!(!dom.is_active().unwrap());
    let s = VmSpec::from_xml(&dom.inactive_xml().unwrap()).unwrap();
    assert_ne!(s.uuid, old_uuid);
    assert_eq!(s.nics[0].mac.as_deref(), Some(mac));
    assert_ne!(s.disks[0].source.as_deref(), vm.disk_paths()[0].to_str());

    dom.start().unwrap();
    let start = std::time::Instant::now();
    while vmbackup::guest_agent::ping(&dom, Duration::from_secs(2)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{new} did not boot"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let out = vmbackup::guest_agent::exec(
        &dom,
        "/bin/cat",
        &["/mnt/vdb/data"],
        None,
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(out.stdout, b"kept by the backup");
    let _ = dom.destroy();
    if let Some(p) = &s.disks[0].source {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn restore_as_beside_the_original_needs_new_macs() {
    let mac = "52:54:00:4e:44:01";
    let vm = TestVmBuilder::new("rs-clone")
        .mac(mac)
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .define()
        .unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    let new = format!("{}-copy", vm.name());
    let _cleanup = Undefine(new.clone());
    let r = vmbackup(&place, &["restore", &id, "--as", &new]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--new-macs"));
    assert_eq!(files_in(vm.dir()), ["vdb.qcow2"]);
    let r = vmbackup(&place, &["restore", &id, "--as", &new, "--new-macs"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lv = vmbackup::hypervisor::libvirt::Libvirt::open("qemu:///system").unwrap();
    let s = VmSpec::from_xml(&lv.domain(&new).unwrap().inactive_xml().unwrap()).unwrap();
    assert!(s.nics[0].mac.is_some());
    assert_ne!(s.nics[0].mac.as_deref(), Some(mac));
    // The original is untouched.
    assert_eq!(spec(&vm).nics[0].mac.as_deref(), Some(mac));
}

#[test]
fn restore_reserves_the_recorded_ip_on_a_dhcp_network_and_refuses_an_ip_in_use() {
    let net = TestNetwork::create("rs-net", 213).expect("an isolated network starts");
    let mac = "52:54:00:4e:55:01";
    let vm = TestVmBuilder::new("rs-ip")
        .mac(mac)
        .network(net.name())
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let ip = net.ip(50);
    vm.sh(&format!(
        "ip link set eth0 up && ip addr add {ip}/24 dev eth0"
    ))
    .unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name(), "--quiesce", "required"]);
    let show = vmbackup(&place, &["show", &id]);
    assert_eq!(
        show.json["manifest"]["nics"][0]["ips"],
        serde_json::json!([format!("{ip}/24")]),
        "the guest's address is recorded"
    );
    assert!(!net.xml().unwrap().contains(mac));

    // Another running VM has the address now: refused with the figures, nothing changed.
    let other = TestVmBuilder::new("rs-ip-other")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("second guest boots");
    other
        .sh(&format!(
            "ip link set eth0 up && ip addr add {ip}/24 dev eth0"
        ))
        .unwrap();
    let before = vm.dom().inactive_xml().unwrap();
    let r = vmbackup(&place, &["restore", &id, "--force", "--power-off"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let err = r.json["error"]["message"].as_str().unwrap();
    assert!(err.contains(&ip) && err.contains(other.name()), "{err}");
    assert!(
        vm.dom().is_active().unwrap(),
        "a refused restore powered the VM off"
    );
    assert_eq!(vm.dom().inactive_xml().unwrap(), before);
    assert!(!net.xml().unwrap().contains(mac));

    // Address free again: the restore reserves it for the vNIC's MAC on the network's DHCP.
    other.sh(&format!("ip addr del {ip}/24 dev eth0")).unwrap();
    let r = vmbackup(&place, &["restore", &id, "--force", "--power-off"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!vm.dom().is_active().unwrap());
    let host = format!("<host mac='{mac}' ip='{ip}'/>");
    let xml = net.xml().unwrap();
    assert!(xml.contains(&host), "{xml}");
    // Restored again: the reservation is there once.
    let r = vmbackup(&place, &["restore", &id, "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(net.xml().unwrap().matches(&host).count(), 1);
    let s = spec(&vm);
    assert_eq!(s.nics[0].mac.as_deref(), Some(mac));
    assert_eq!(s.nics[0].source.as_deref(), Some(net.name()));
    // Both restores are in the job history.
    let h = vmbackup(&place, &["history", "--vm", vm.name()]);
    let kinds: Vec<(String, String)> = h.json["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["kind"].as_str().unwrap().to_string(),
                j["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let restored_ok = kinds
        .iter()
        .filter(|(k, s)| k == "restore" && s == "ok")
        .count();
    assert_eq!(restored_ok, 2, "{kinds:?}");
    assert!(kinds.contains(&("backup".into(), "ok".into())));
}

#[test]
fn restore_onto_a_name_now_held_by_another_vm_is_refused_and_changes_nothing() {
    let vm = TestVmBuilder::new("rs-uuid")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .define()
        .unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    let old_uuid = vm.dom().uuid().unwrap();
    let mac = spec(&vm).nics[0].mac.clone().unwrap();

    // The VM goes, its disk file stays; another VM (another UUID) takes its name and the same
    // disk path, as tools that name disks after their VM do, and has data of its own there.
    let xml = vm.dom().inactive_xml().unwrap();
    vm.dom().undefine().unwrap();
    let disk = vm.disk_paths()[0].clone();
    std::fs::remove_file(&disk).unwrap();
    let fill = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::write(fill.path().join("marker"), b"the other VM's data").unwrap();
    vmbackup_testkit::libvirt_vm::make_disk(
        &disk,
        &DiskSpec {
            target: "vdb".into(),
            format: Format::Qcow2,
            size: 64 * MIB,
            ext4: true,
            fill_from: Some(fill.path().to_path_buf()),
        },
    )
    .unwrap();
    // libvirt gives the other VM a UUID and a MAC of its own.
    let other_xml = xml
        .replace(&format!("<uuid>{old_uuid}</uuid>"), "")
        .replace(&format!("<mac address='{mac}'/>"), "");
    assert!(!other_xml.contains(&old_uuid) && !other_xml.contains(&mac));
    let lv = vm.libvirt();
    let other = lv.define(&other_xml).unwrap();
    let other_uuid = other.uuid().unwrap();
    assert_ne!(other_uuid, old_uuid);
    let other_definition = other.inactive_xml().unwrap();
    let digest = vmbackup::digest::sha256_hex(&std::fs::read(&disk).unwrap());
    let files = files_in(vm.dir());

    let r = vmbackup(&place, &["restore", &id, "--force"]);
    assert_eq!(
        vmbackup::digest::sha256_hex(&std::fs::read(&disk).unwrap()),
        digest,
        "the other VM's disk was replaced (restore: exit {}, {})",
        r.code,
        r.json
    );
    assert_eq!(r.code, 3, "{}", r.stderr);
    let err = r.json["error"]["message"].as_str().unwrap();
    assert!(
        err.contains(&old_uuid) && err.contains(&other_uuid),
        "the refusal names both UUIDs: {err}"
    );
    let now = lv.domain(vm.name()).unwrap();
    assert_eq!(now.uuid().unwrap(), other_uuid);
    assert_eq!(now.inactive_xml().unwrap(), other_definition);
    assert_eq!(files_in(vm.dir()), files, "temporary files were left");
}
