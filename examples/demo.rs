//! What `scripts/demo` shows: a throwaway VM, what vmbackup sees of it, its guest agent
//! answering, a freeze and thaw, then a live backup through the `vmbackup` command (check,
//! backup, list), the proof that the backup holds what the guest had written, and a restore
//! onto the VM after which the guest reads the backup's data again. The VM and the demo
//! repository are removed at the end.

use std::time::{Duration, Instant};

use vmbackup::guest_agent;
use vmbackup::hypervisor::vm::VmSpec;
use vmbackup_testkit::libvirt_vm::{Format, TestVmBuilder};

fn main() -> anyhow::Result<()> {
    const MIB: u64 = 1 << 20;
    println!("== booting a throwaway VM (TCG, 2 data disks, one vNIC)");
    let t = Instant::now();
    let vm = TestVmBuilder::new("demo")
        .vcpus(2)
        .memory_mib(384)
        .disk("vdb", Format::Qcow2, 256 * MIB)
        .disk("vdc", Format::Raw, 128 * MIB)
        .mac("52:54:00:de:40:01")
        .start()?;
    println!(
        "   {} is up, agent answering after {:.1}s",
        vm.name(),
        t.elapsed().as_secs_f64()
    );

    let spec = VmSpec::from_xml(&vm.dom().inactive_xml()?)?;
    println!("== the VM as vmbackup reads it from its domain XML");
    println!(
        "   uuid {}  vcpus {}  memory {} MiB",
        spec.uuid,
        spec.vcpus,
        spec.memory_bytes / MIB
    );
    for d in &spec.disks {
        println!(
            "   disk {} {} {}",
            d.target,
            d.format.as_deref().unwrap_or("?"),
            d.source.as_deref().unwrap_or("-")
        );
    }
    for n in &spec.nics {
        println!(
            "   vnic {} model {}",
            n.mac.as_deref().unwrap_or("-"),
            n.model.as_deref().unwrap_or("-")
        );
    }

    println!("== the guest agent");
    guest_agent::ping(vm.dom(), Duration::from_secs(5))?;
    for i in guest_agent::interfaces(vm.dom())? {
        println!(
            "   guest interface {} mac {} ips {:?}",
            i.name,
            i.mac.unwrap_or_default(),
            i.ips
        );
    }
    print!(
        "   guest mounts:\n{}",
        vm.sh("grep /mnt/ /proc/mounts | sed 's/^/     /'")?
    );
    vm.write_file("/mnt/vdb/hello", b"written before the freeze\n")?;

    println!("== freeze and thaw through libvirt");
    let frozen = guest_agent::freeze(vm.dom(), Duration::from_secs(10))?;
    println!("   froze {} filesystem(s)", frozen.filesystems());
    let held = frozen.thaw()?;
    println!("   thawed after {} ms", held.as_millis());
    print!(
        "   guest reads: {}",
        String::from_utf8_lossy(&vm.read_file("/mnt/vdb/hello")?)
    );

    println!("== vmbackup check / backup / list (the command an administrator runs)");
    let work = tempfile::Builder::new()
        .prefix("vmbackup-demo-")
        .tempdir_in("/var/tmp")?;
    let repo = work.path().join("repo");
    let state = work.path().join("state");
    // VMBACKUP_BIN, else the binary cargo built beside this example: target/debug/vmbackup
    // for target/debug/examples/demo, wherever the target folder is (CARGO_TARGET_DIR).
    let bin = match std::env::var_os("VMBACKUP_BIN") {
        Some(b) => std::path::PathBuf::from(b),
        None => std::env::current_exe()?
            .parent()
            .and_then(std::path::Path::parent)
            .ok_or_else(|| anyhow::anyhow!("cannot tell where the vmbackup binary is"))?
            .join("vmbackup"),
    };
    let cli = |args: &[&str]| -> anyhow::Result<()> {
        println!("   $ vmbackup {}", args.join(" "));
        let st = std::process::Command::new(&bin)
            .arg("--repo")
            .arg(&repo)
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .status()?;
        anyhow::ensure!(st.success(), "vmbackup {} failed: {st}", args.join(" "));
        Ok(())
    };
    vm.write_file("/mnt/vdb/hello", b"written before the backup\n")?;
    cli(&["check", vm.name()])?;
    cli(&["backup", vm.name(), "--quiesce", "required"])?;
    vm.write_file("/mnt/vdb/hello", b"changed after the backup\n")?;
    cli(&["list"])?;

    println!(
        "== what the backup holds (disk vdb written out of the repository, read with debugfs)"
    );
    let r = vmbackup::repository::Repository::open(&repo)?;
    let m = r
        .list()?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no backup listed"))?;
    let d = m
        .disks
        .iter()
        .find(|d| d.target == "vdb")
        .ok_or_else(|| anyhow::anyhow!("no vdb"))?;
    let index = vmbackup::repository::disk::DiskIndex::decode(&r.store().get(&d.index_object)?)?;
    let out = work.path().join("vdb.raw");
    vmbackup::repository::disk::restore_disk(&r, &index, &out, 2, &|_, _| {})?;
    let held = std::process::Command::new("debugfs")
        .arg("-R")
        .arg("cat /hello")
        .arg(&out)
        .output()?;
    print!(
        "   /hello in backup {}: {}",
        m.id,
        String::from_utf8_lossy(&held.stdout)
    );
    print!(
        "   /hello in the guest now: {}",
        String::from_utf8_lossy(&vm.read_file("/mnt/vdb/hello")?)
    );

    println!("== vmbackup restore onto the original VM (shut down first; left powered off)");
    cli(&["restore", &m.id, "--force", "--power-off"])?;
    anyhow::ensure!(!vm.dom().is_active()?, "the restored VM is running");
    println!("   {} is powered off; starting it", vm.name());
    vm.dom().start()?;
    vm.wait_agent(Duration::from_secs(180))?;
    let after = vm.read_file("/mnt/vdb/hello")?;
    print!(
        "   /hello in the guest after the restore: {}",
        String::from_utf8_lossy(&after)
    );
    anyhow::ensure!(
        after == b"written before the backup\n",
        "the restored guest does not read the backup's data"
    );
    cli(&["history"])?;

    println!("== cleaning up {}", vm.name());
    drop(vm);
    println!("   done");
    Ok(())
}
