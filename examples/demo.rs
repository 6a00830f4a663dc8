//! What `scripts/demo` shows: a throwaway VM, what vmbackup sees of it, its guest agent
//! answering, and a freeze and thaw of its filesystems. The VM is removed at the end.

use std::time::{Duration, Instant};

use vmbackup::guest_agent;
use vmbackup::hypervisor::vm::VmSpec;
use vmbackup::testvm::{Format, TestVmBuilder};

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

    println!("== cleaning up {}", vm.name());
    drop(vm);
    println!("   done");
    Ok(())
}
