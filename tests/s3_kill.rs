//! The S3 store going away mid-backup: the Garage node is killed (SIGKILL) while a backup of a
//! running guest is held at a fail point in its copy. The backup retries with backoff, then
//! fails cleanly: the VM is back on its images, nothing is published, and once the node is
//! back the repository is sound and the next backup works.
//!
//! Its own test binary: it stops the Garage node every other S3 test uses, and cargo runs test
//! binaries one after the other.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vmbackup_testkit::faults::{vm_violations, FaultRun};
use vmbackup_testkit::garage::{Garage, S3Place};
use vmbackup_testkit::libvirt_vm::{Format, TestVmBuilder};

#[test]
fn garage_killed_mid_backup_fails_it_cleanly_and_the_next_backup_works() {
    let vm = TestVmBuilder::new("s3-kill")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    vm.wait_agent(std::time::Duration::from_secs(180)).unwrap();
    // 12 MiB of new data: several chunks to upload.
    vm.sh("dd if=/dev/urandom of=/mnt/vdb/data bs=1M count=12 2>/dev/null && sync")
        .unwrap();
    let images: Vec<String> = vm
        .disk_paths()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let place = S3Place::new("kill");
    let env: Vec<(&str, String)> = place.garage.env();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Each request is retried for 3 s before the backup gives up.
    env.push(("VMBACKUP_S3_RETRY_SECS", "3"));
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));

    // Held (SIGSTOP) after its second new chunk.
    let url = place.url();
    let mut run = FaultRun::start_at(
        binary(),
        Path::new(&url),
        &place.state(),
        &["backup", vm.name()],
        "backup-chunk-written=stop@2",
        &env,
    );
    let pid = run.child.id();
    run.wait_stopped(Duration::from_secs(120));

    // The store goes away; the backup goes on.
    let garage = Garage::pid().expect("scripts/garage's pid file");
    kill(Pid::from_raw(garage), Signal::SIGKILL).unwrap();
    while kill(Pid::from_raw(garage), None).is_ok() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGCONT).unwrap();
    let code = run.wait(Duration::from_secs(300));
    let took = killed.elapsed();
    let stderr = run.stderr();
    // Restart the node on its data before any assertion can fail.
    Garage::start(checkout);

    assert_eq!(code, 1, "{stderr}\n{}", run.stdout());
    let doc = vmbackup_testkit::cli::parse_one_document(&run.stdout()).unwrap();
    let error = doc["results"][0]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("S3"),
        "a clean error naming the store: {doc}"
    );
    assert!(
        took < Duration::from_secs(120),
        "the failing backup took {took:?}"
    );
    // Retried before it gave up: object_store logs each retry.
    assert!(
        stderr.contains("retry") || stderr.contains("backing off"),
        "no retry in the log:\n{stderr}"
    );

    // The VM is on its images, thawed; nothing was published.
    let bad = vm_violations(&vm, &images);
    assert!(bad.is_empty(), "{bad:?}");
    let l = place.run(binary(), &["list"]);
    assert_eq!(l.code, 0, "{}", l.stderr);
    assert_eq!(l.json["backups"], serde_json::json!([]), "{}", l.json);

    // The next backup works, verifies, and gc leaves no backup without its manifest.
    let b = place.run(binary(), &["backup", vm.name()]);
    assert_eq!(b.code, 0, "{}\n{}", b.json, b.stderr);
    let v = place.run(binary(), &["verify"]);
    assert_eq!(v.code, 0, "{}", v.json);
    let gc = place.run(binary(), &["gc"]);
    assert_eq!(gc.code, 0, "{}", gc.stderr);
    let id = b.json["results"][0]["backup"]["id"].as_str().unwrap();
    for o in place.objects() {
        if let Some(rest) = o.strip_prefix("backups/") {
            assert!(
                rest.starts_with(&format!("{id}/")),
                "an object of the failed backup is left: {o}"
            );
        }
    }
}
