//! `vmbackup sync`: backups copied to another repository (a local folder; an encrypted one on
//! S3, the Garage node) restore the guest's bytes from there; a second sync copies nothing; a sync killed before a manifest leaves nothing listed and the
//! next one finishes; bad input changes nothing.

mod common;

use std::time::Duration;

use common::*;
use vmbackup::repository::storage::ObjectStore;
use vmbackup_testkit::faults::{repo_violations, FaultRun, Reached};
use vmbackup_testkit::garage::S3Place;
use vmbackup_testkit::libvirt_vm::TestVmBuilder;

const MIB: u64 = 1 << 20;

fn ids(run: &Run) -> Vec<String> {
    assert_eq!(run.code, 0, "{}", run.stderr);
    run.json["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn synced_backups_restore_from_the_target_and_a_killed_sync_is_finished_by_the_next() {
    let (_fill, spec) = filled_disk("vdb", 64 * MIB, 8);
    let mut vm = TestVmBuilder::new("sync")
        .disk_spec(spec)
        .start()
        .expect("guest boots");
    let local = Place::new();
    let shared = Place::new();
    let (a, b) = (local.repo(), shared.repo());
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());

    vm.write_file("/mnt/vdb/marker", b"first backup").unwrap();
    let first = backup_id(&local, &[vm.name()]);
    vm.write_file("/mnt/vdb/marker", b"second backup").unwrap();
    let second = backup_id(&local, &[vm.name()]);

    // Bad input: nothing made, nothing copied.
    let nowhere = local.dir.path().join("no-repo");
    for (args, says) in [
        (
            vec!["sync", "--from", nowhere.to_str().unwrap(), "--to", b],
            "not a vmbackup repository",
        ),
        (vec!["sync", "--from", a, "--to", a], "the same repository"),
        (
            vec!["sync", "--from", a, "--to", b, "--since", "yesterday"],
            "--since",
        ),
    ] {
        let r = vmbackup(&shared, &args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
    assert!(!nowhere.exists());
    assert!(!shared.repo().exists(), "the target was not made");

    // Killed before the second backup's manifest: only the first is listed in the target.
    let mut run = FaultRun::start(
        binary(),
        &shared,
        &["sync", "--from", a, "--to", b],
        "sync-before-manifest=kill@2",
        &[],
    );
    let reached = run.wait_marker(Duration::from_secs(120));
    let log = run.stderr();
    run.kill_group();
    assert_eq!(
        reached,
        Reached::Point("sync-before-manifest".into()),
        "{log}"
    );
    assert_eq!(ids(&vmbackup(&shared, &["list"])), vec![first.clone()]);

    // The next sync copies what is missing, and only that.
    let r = vmbackup(&shared, &["sync", "--from", a, "--to", b]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json["sync"]["copied"], serde_json::json!([second]));
    assert_eq!(r.json["sync"]["present"], serde_json::json!([first]));
    assert_eq!(
        ids(&vmbackup(&shared, &["list"])),
        ids(&vmbackup(&local, &["list"]))
    );
    let (listed, bad) = repo_violations(binary(), &shared);
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(listed.len(), 2);
    let again = vmbackup(&shared, &["sync", "--from", a, "--to", b]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.json["sync"]["copied"], serde_json::json!([]));
    assert_eq!(again.json["sync"]["chunks_copied"], 0);

    // Restored from the target, the guest reads what it held at the first backup.
    vm.write_file("/mnt/vdb/marker", b"after the backups")
        .unwrap();
    vm.dom().destroy().unwrap();
    let r = vmbackup(&shared, &["restore", &first, "--force"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    vm.reconnect().unwrap();
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(120)).unwrap();
    assert_eq!(vm.read_file("/mnt/vdb/marker").unwrap(), b"first backup");

    // The local repository synced to a shared one on S3 (Garage), encrypted there.
    let s3 = S3Place::new("sync");
    let url = s3.url();
    let key = s3.dir.path().join("shared.key");
    let key = key.to_str().unwrap();
    let i = s3.run(binary(), &["init", "--encrypt", "--key-file", key]);
    assert_eq!(i.code, 0, "{}", i.stderr);
    let to_s3 = ["sync", "--from", a, "--to", &url, "--to-key-file", key];
    let r = s3.run(binary(), &to_s3);
    assert_eq!(r.code, 0, "{} {}", r.json, r.stderr);
    assert_eq!(r.json["sync"]["copied"], serde_json::json!([first, second]));
    assert!(r.json["sync"]["chunks_copied"].as_u64().unwrap() > 0);
    // Encrypted there: its chunks are named with a key, and nothing opens it without one.
    let config = s3.garage.store(&s3.prefix).get("config.json").unwrap();
    let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(config["chunk_digest"], "hmac-sha256", "{config}");
    let keyless = s3.run(binary(), &["list"]);
    assert_eq!(keyless.code, 2, "{}", keyless.stderr);
    let listed = s3.run(binary(), &["list", "--key-file", key]);
    assert_eq!(ids(&listed), vec![first.clone(), second.clone()]);
    let verified = s3.run(binary(), &["verify", "--key-file", key]);
    assert_eq!(verified.code, 0, "{} {}", verified.json, verified.stderr);
    let again = s3.run(binary(), &to_s3);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.json["sync"]["copied"], serde_json::json!([]));
    assert_eq!(again.json["sync"]["chunks_copied"], 0);

    // Restored from the S3 copy, the guest reads what it held at the second backup.
    vm.write_file("/mnt/vdb/marker", b"after the sync").unwrap();
    vm.dom().destroy().unwrap();
    let r = s3.run(
        binary(),
        &["restore", &second, "--force", "--key-file", key],
    );
    assert_eq!(r.code, 0, "{} {}", r.json, r.stderr);
    vm.reconnect().unwrap();
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(120)).unwrap();
    assert_eq!(vm.read_file("/mnt/vdb/marker").unwrap(), b"second backup");

    // A flipped byte in a sealed chunk on S3: verify names the chunk and the backups that use
    // it; a restore of one of them fails naming it, and leaves the VM's images alone.
    let store = s3.garage.store(&s3.prefix);
    let victim = store.list("chunks/").unwrap().into_iter().next().unwrap();
    let victim_hex = victim.rsplit('/').next().unwrap().to_string();
    let good = store.get(&victim).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 1;
    store.put(&victim, &bad).unwrap();
    let v = s3.run(binary(), &["verify", "--key-file", key]);
    assert_eq!(v.code, 1, "{} {}", v.json, v.stderr);
    assert!(v.json.to_string().contains(&victim_hex), "{}", v.json);
    let damaged: Vec<String> = v.json["backups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["ok"] == false)
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!damaged.is_empty(), "{}", v.json);
    vm.dom().destroy().unwrap();
    let images = vm.disk_paths();
    let before: Vec<Vec<u8>> = images.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let r = s3.run(
        binary(),
        &["restore", &damaged[0], "--force", "--key-file", key],
    );
    assert_eq!(r.code, 1, "{} {}", r.json, r.stderr);
    let err = r.json["error"]["message"].as_str().unwrap_or_default();
    assert!(err.contains(&victim_hex), "{err}");
    let after: Vec<Vec<u8>> = images.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(before == after, "a failed restore changed the VM's images");
    store.put(&victim, &good).unwrap();
    let v = s3.run(binary(), &["verify", "--key-file", key]);
    assert_eq!(v.code, 0, "{} {}", v.json, v.stderr);
}
