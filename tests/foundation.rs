//! The foundation every other test stands on: throwaway guests boot, their agent answers, data
//! written in the guest reads back, a freeze through libvirt holds guest writes until the thaw,
//! and the harness leaves nothing behind, after a pass, a panic or a guest that never boots.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmbackup::guest_agent;
use vmbackup::hypervisor::libvirt::Libvirt;
use vmbackup::hypervisor::vm::VmSpec;
use vmbackup_testkit::libvirt_vm::{self, Format, TestVmBuilder};

const MIB: u64 = 1 << 20;

fn domain_exists(name: &str) -> bool {
    let lv = Libvirt::open(&libvirt_vm::test_uri()).expect("libvirt answers");
    lv.find_domain(name).expect("lookup works").is_some()
}

#[test]
fn agent_answers_and_guest_data_reads_back() {
    let vm = TestVmBuilder::new("roundtrip")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .mac("52:54:00:12:34:56")
        .start()
        .expect("guest boots and its agent answers");

    guest_agent::ping(vm.dom(), Duration::from_secs(5)).expect("agent answers a ping");

    // Bytes that are not text, so that nothing along the way may reinterpret them.
    let data: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    vm.write_file("/mnt/vdb/blob", &data)
        .expect("write in guest");
    let back = vm.read_file("/mnt/vdb/blob").expect("read in guest");
    assert_eq!(back.len(), data.len());
    assert!(
        back == data,
        "the bytes read back differ from those written"
    );

    // The vNIC the guest sees carries the MAC the domain was given.
    let ifs = guest_agent::interfaces(vm.dom()).expect("guest interfaces");
    assert!(
        ifs.iter()
            .any(|i| i.mac.as_deref() == Some("52:54:00:12:34:56")),
        "guest interfaces {ifs:?} lack the domain's MAC"
    );
    let spec = VmSpec::from_xml(&vm.dom().inactive_xml().unwrap()).unwrap();
    assert_eq!(spec.nics[0].mac.as_deref(), Some("52:54:00:12:34:56"));
    assert!(spec.agent_channel);
    assert_eq!(spec.disks.len(), 1);
}

#[test]
fn freeze_holds_guest_writes_until_thaw() {
    let vm = TestVmBuilder::new("freeze")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");

    // The writer waits 2 s, so that the freeze below is in place before it writes; it
    // records (on tmpfs, which is never frozen) the guest's uptime around its write.
    vm.sh(
        "setsid sh -c 'sleep 2; cut -d\" \" -f1 /proc/uptime > /tmp/before; \
         echo payload > /mnt/vdb/frozen-write; sync /mnt/vdb/frozen-write; \
         cut -d\" \" -f1 /proc/uptime > /tmp/after' </dev/null >/dev/null 2>&1 &",
    )
    .expect("start the writer");

    let frozen = guest_agent::freeze(vm.dom(), Duration::from_secs(10)).expect("freeze");
    assert!(
        frozen.filesystems() >= 1,
        "no filesystem was frozen (got {})",
        frozen.filesystems()
    );
    // Hold the freeze well past the moment the writer starts its write.
    std::thread::sleep(Duration::from_secs(6));
    let held = frozen.thaw().expect("thaw");
    assert!(held >= Duration::from_secs(6));

    // After the thaw, the write completes.
    let start = Instant::now();
    let after = loop {
        let out = vm
            .exec_sh("cat /tmp/after")
            .expect("agent answers after thaw");
        if out.exit_code == 0 {
            break out.stdout_text();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the guest write did not complete after the thaw"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let before = vm.sh("cat /tmp/before").unwrap();
    let (before, after): (f64, f64) = (
        before.trim().parse().unwrap(),
        after.trim().parse().unwrap(),
    );
    // The freeze was held ~4 s after the writer began (it began 2 s into a 6 s freeze).
    assert!(
        after - before >= 2.0,
        "the write took {:.2}s: it did not wait for the thaw",
        after - before
    );
    assert_eq!(vm.sh("cat /mnt/vdb/frozen-write").unwrap(), "payload\n");
}

#[test]
fn harness_removes_domain_and_files_after_a_passing_test() {
    let (name, dir): (String, PathBuf) = {
        let vm = TestVmBuilder::new("cleanup-pass")
            .disk("vdb", Format::Raw, 32 * MIB)
            .start()
            .expect("guest boots");
        assert!(domain_exists(vm.name()));
        assert!(vm.disk_paths()[0].exists());
        (vm.name().to_string(), vm.dir().to_path_buf())
    };
    assert!(!domain_exists(&name), "domain {name} is still defined");
    assert!(!dir.exists(), "{} is still there", dir.display());
}

#[test]
fn harness_removes_domain_and_files_after_a_panicking_test() {
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let vm = TestVmBuilder::new("cleanup-panic")
            .disk("vdb", Format::Qcow2, 32 * MIB)
            .start()
            .expect("guest boots");
        seen = Some((vm.name().to_string(), vm.dir().to_path_buf()));
        panic!("a test that fails on purpose");
    }));
    assert!(result.is_err(), "the closure was meant to panic");
    let (name, dir) = seen.expect("the VM was made before the panic");
    assert!(!domain_exists(&name), "domain {name} is still defined");
    assert!(!dir.exists(), "{} is still there", dir.display());
}

#[test]
fn guest_that_never_comes_up_fails_in_bounded_time_with_its_console() {
    // No init in the initramfs: the kernel panics and, with panic=0, stays halted.
    let timeout = Duration::from_secs(45);
    let start = Instant::now();
    let err = match TestVmBuilder::new("no-boot")
        .cmdline("rdinit=/does-not-exist panic=0")
        .boot_timeout(timeout)
        .start()
    {
        Ok(vm) => panic!("{} came up although it cannot", vm.name()),
        Err(e) => e,
    };
    let elapsed = start.elapsed();
    let text = err.to_string();
    assert!(
        elapsed < timeout + Duration::from_secs(30),
        "the failure took {elapsed:?}"
    );
    assert!(
        text.contains("Kernel panic"),
        "the error does not show the console: {text}"
    );
    let lv = Libvirt::open(&libvirt_vm::test_uri()).unwrap();
    let me = format!("{}{}-", libvirt_vm::PREFIX, std::process::id());
    assert!(
        !libvirt_vm::test_domains(&lv)
            .unwrap()
            .iter()
            .any(|n| n.starts_with(&me) && n.ends_with("no-boot")),
        "the failed VM was left defined"
    );
}

#[test]
fn record_checker_accepts_a_prefix_and_rejects_torn_or_altered_records() {
    let rec = |i: u64, p: &str| {
        let s = format!("{i:010}");
        let sum = vmbackup::digest::sha256_hex(format!("{s} {p}").as_bytes());
        format!("{s} {p} {}\n", &sum[..16])
    };
    let p = "0123456789abcdef0123456789abcdef";
    let good = format!("{}{}", rec(0, p), rec(1, p));
    assert_eq!(libvirt_vm::check_records(good.as_bytes()).valid, 2);
    assert!(libvirt_vm::check_records(good.as_bytes()).bad.is_empty());
    let torn = format!("{}{}", good, &rec(2, p)[..20]);
    let c = libvirt_vm::check_records(torn.as_bytes());
    assert_eq!((c.valid, c.bad.len()), (2, 1));
    let altered = good.replace("0000000001 0", "0000000001 1");
    assert_eq!(libvirt_vm::check_records(altered.as_bytes()).valid, 1);
    let gap = format!("{}{}", rec(0, p), rec(2, p));
    assert_eq!(libvirt_vm::check_records(gap.as_bytes()).bad.len(), 1);
}
