//! A repository on an S3-compatible store: the Garage node of `scripts/garage` on loopback,
//! each test on a prefix of its own (`crates/testkit/src/garage.rs`). A real busybox guest is
//! backed up into it, listed, shown, verified, backed up incrementally, restored, deleted,
//! pruned and collected, and scheduled; bad S3 settings are exit 2 with nothing written; no
//! secret ever reaches an output, a log or the history.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use serde_json::Value;
use vmbackup_testkit::cli::Run;
use vmbackup_testkit::garage::S3Place;
use vmbackup_testkit::libvirt_vm::{Format, TestVmBuilder};

/// Everything the runs printed, to search for secrets.
#[derive(Default)]
struct Printed(String);

impl Printed {
    fn add(&mut self, r: &Run) {
        self.0.push_str(&r.json.to_string());
        self.0.push_str(&r.stderr);
    }
}

/// Every file below `dir`, read whole (lossily), to search for secrets.
fn all_files(dir: &std::path::Path, out: &mut String) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            all_files(&p, out);
        } else if let Ok(b) = std::fs::read(&p) {
            out.push_str(&String::from_utf8_lossy(&b));
        }
    }
}

#[test]
fn a_vm_in_garage_is_backed_up_listed_verified_restored_incrementally_and_pruned() {
    let vm = TestVmBuilder::new("s3-round")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 13 % 251) as u8).collect();
    vm.write_file("/mnt/vdb/data", &payload).unwrap();
    let place = S3Place::new("round");
    let mut printed = Printed::default();
    let bin = binary();

    let b = place.run(bin, &["backup", vm.name()]);
    printed.add(&b);
    ok(&b, "backup");
    let first = b.json["results"][0]["backup"].clone();
    let id1 = first["id"].as_str().unwrap().to_string();
    let req = &first["requests"];
    assert!(
        req["put"].as_u64().unwrap() > 0 && req["head"].as_u64().is_some(),
        "request counts: {first}"
    );
    // The objects are in the bucket, under the prefix.
    let objects = place.objects();
    assert!(objects.contains(&"config.json".to_string()), "{objects:?}");
    assert!(objects.contains(&format!("backups/{id1}/manifest.json")));
    assert!(objects.iter().any(|o| o.starts_with("chunks/")));

    let l = place.run(bin, &["list"]);
    printed.add(&l);
    ok(&l, "list");
    assert_eq!(ids(&l), vec![id1.clone()]);
    let s = place.run(bin, &["show", &id1]);
    printed.add(&s);
    ok(&s, "show");
    assert_eq!(s.json["manifest"]["vm_name"], vm.name());
    let v = place.run(bin, &["verify"]);
    printed.add(&v);
    ok(&v, "verify");
    assert_eq!(v.json["backups"][0]["ok"], true);

    // An incremental backup after a change.
    vm.write_file("/mnt/vdb/data", b"changed after the first backup")
        .unwrap();
    let b2 = place.run(bin, &["backup", vm.name()]);
    printed.add(&b2);
    ok(&b2, "second backup");
    let second = &b2.json["results"][0]["backup"];
    let id2 = second["id"].as_str().unwrap().to_string();
    let vdb = second["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["target"] == "vdb")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(vdb["mode"], "incremental", "{second}");
    assert!(
        second["requests"]["put"].as_u64().unwrap() < req["put"].as_u64().unwrap(),
        "an incremental backup uploads less: {second} vs {first}"
    );

    // Restore the first backup: the guest reads the data of then.
    let r = place.run(bin, &["restore", &id1, "--force", "--power-off"]);
    printed.add(&r);
    ok(&r, "restore");
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    assert!(
        vm.read_file("/mnt/vdb/data").unwrap() == payload,
        "the guest does not read the first backup's data"
    );

    // Delete the second, collect its chunks.
    let d = place.run(bin, &["delete", &id2]);
    printed.add(&d);
    ok(&d, "delete");
    let gc = place.run(bin, &["gc"]);
    printed.add(&gc);
    ok(&gc, "gc");
    assert!(
        gc.json["gc"]["removed_chunks"].as_u64().unwrap() > 0,
        "{}",
        gc.json
    );
    assert_eq!(ids(&place.run(bin, &["list"])), vec![id1.clone()]);

    // A schedule that keeps one backup: its run makes a backup and prunes the older one.
    let add = place.run(
        bin,
        &[
            "schedule",
            "add",
            "nightly",
            "--vm",
            vm.name(),
            "--type",
            "daily",
            "--slot",
            "2",
            "--tz",
            "UTC",
            "--start",
            "2027-01-04",
            "--keep",
            "1",
        ],
    );
    printed.add(&add);
    ok(&add, "schedule add");
    let scheduled = |day: &str| {
        let due = place.run(bin, &["run-due", "--now", &format!("{day}T02:59:30Z")]);
        assert_eq!(due.code, 0, "run-due {day}: {}\n{}", due.json, due.stderr);
        let r = &due.json["run"]["jobs"][0]["results"][0];
        assert_eq!(r["status"], "ok", "{}", due.json);
        (r["backup_id"].as_str().unwrap().to_string(), due)
    };
    let (day1, due) = scheduled("2027-01-04");
    printed.add(&due);
    let (day2, due) = scheduled("2027-01-05");
    printed.add(&due);
    // The schedule keeps its newest backup; the manual one is not the schedule's to prune.
    let left = ids(&place.run(bin, &["list"]));
    assert_eq!(left, vec![id1.clone(), day2.clone()], "{}", due.json);
    assert_ne!(day1, day2);
    let p = place.run(bin, &["prune"]);
    printed.add(&p);
    ok(&p, "prune");
    let v = place.run(bin, &["verify"]);
    ok(&v, "verify after prune");

    // No secret in what was printed or stored locally (the history, the state folder).
    let mut stored = String::new();
    all_files(&place.state(), &mut stored);
    for text in [&printed.0, &stored] {
        assert!(
            !text.contains(&place.garage.secret),
            "the secret key leaked"
        );
    }
}

#[test]
fn bad_s3_settings_are_exit_2_with_a_clear_message_and_write_nothing() {
    let place = S3Place::new("bad");
    let bin = binary();
    let mut printed = Printed::default();
    let expect = |r: &Run, what: &str, says: &str| {
        assert_eq!(r.code, 2, "{what}: {}\n{}", r.json, r.stderr);
        let error = r.json["error"]["message"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{what}: {error:?} lacks {says:?}");
    };

    // Unknown bucket.
    let r = place.run_at(
        bin,
        "s3://no-such-bucket-vmbt/x",
        &["backup", "some-vm"],
        &[],
        &[],
    );
    printed.add(&r);
    expect(
        &r,
        "unknown bucket",
        "bucket \"no-such-bucket-vmbt\" does not exist",
    );
    // Wrong endpoint (nothing listens), in seconds.
    let started = std::time::Instant::now();
    let r = place.run_env(
        bin,
        &["backup", "some-vm"],
        &[("VMBACKUP_S3_ENDPOINT", "http://127.0.0.1:9")],
        &[],
    );
    printed.add(&r);
    expect(&r, "wrong endpoint", "cannot be reached");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // Plain HTTP to a remote endpoint: refused before any connection.
    let r = place.run_env(
        bin,
        &["list"],
        &[("VMBACKUP_S3_ENDPOINT", "http://s3.example.invalid")],
        &[],
    );
    printed.add(&r);
    expect(&r, "remote http", "plain http only to a loopback address");
    // Bad credentials: the key id is named, the secret never.
    let r = place.run_env(
        bin,
        &["backup", "some-vm"],
        &[("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")],
        &[],
    );
    printed.add(&r);
    expect(&r, "bad secret", "refused the credentials");
    assert!(
        !printed.0.contains("wrong-secret-0123456789"),
        "{}",
        printed.0
    );
    // No credentials at all.
    let r = place.run_env(
        bin,
        &["list"],
        &[],
        &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
    );
    printed.add(&r);
    expect(&r, "no credentials", "no S3 credentials");
    // Bad forms of the location.
    for repo in ["s3://Bad_Bucket/x", "s3:/vmbackup-test", "gs://b/p"] {
        let r = place.run_at(bin, repo, &["list"], &[], &[]);
        printed.add(&r);
        expect(&r, repo, "s3://BUCKET/PREFIX");
    }
    // Nothing was written: not in the bucket, not in the state folder.
    assert!(place.objects().is_empty(), "{:?}", place.objects());
    assert!(
        !place.state().exists(),
        "a refused run created its state folder"
    );

    // A credentials file in config.toml: refused unless 0600.
    let creds = place.dir.path().join("credentials");
    std::fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            place.garage.key_id, place.garage.secret
        ),
    )
    .unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o640)).unwrap();
    let config = place.dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[s3]\nendpoint = {:?}\nregion = {:?}\ncredentials_file = {:?}\n",
            place.garage.endpoint,
            place.garage.region,
            creds.display().to_string()
        ),
    )
    .unwrap();
    let cfg = config.display().to_string();
    let only_file = |args: &[&str]| {
        place.run_env(
            bin,
            &[&["--config", cfg.as_str()][..], args].concat(),
            &[],
            &[
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "VMBACKUP_S3_ENDPOINT",
                "AWS_REGION",
            ],
        )
    };
    let r = only_file(&["list"]);
    printed.add(&r);
    expect(&r, "credentials file 0640", "must be 0600");
    assert!(place.objects().is_empty());
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = only_file(&["list"]);
    printed.add(&r);
    ok(&r, "list with the credentials file");
    assert_eq!(r.json["backups"], serde_json::json!([]));

    assert!(
        !printed.0.contains(&place.garage.secret),
        "the secret key leaked"
    );
}

/// All of a backup's S3 requests, whatever their kind.
fn total_requests(backup: &Value) -> u64 {
    let r = &backup["requests"];
    ["get", "put", "head", "list", "delete"]
        .iter()
        .map(|k| {
            r[k].as_u64()
                .unwrap_or_else(|| panic!("no {k} count: {backup}"))
        })
        .sum()
}

fn mode_of(backup: &Value, target: &str) -> String {
    backup["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["target"] == target)
        .and_then(|d| d["mode"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The second backup of an unchanged (shut-off) VM, and a third that reads the disk whole
/// (asked to, as after a restore), make as many S3 requests for a disk of 64 chunks as for one of
/// 16: the chunks the previous backup of the disk refers to are trusted without a request
/// (its index is read under the backup lock, which keeps gc out), so what is left is per
/// backup (lock, listing, manifests, one index, the new index and manifest), never per chunk.
#[test]
fn backups_of_an_unchanged_disk_make_requests_per_backup_not_per_chunk() {
    let bin = binary();
    // (chunks referenced, requests of the unchanged backup, of the whole-disk one)
    let mut seen = Vec::new();
    for (label, size, data_mib) in [("small", 64 * MIB, 8), ("large", 256 * MIB, 160)] {
        let (_fill, spec) = filled_disk("vdb", size, data_mib);
        let vm = TestVmBuilder::new(&format!("s3-req-{label}"))
            .disk_spec(spec)
            .define()
            .expect("VM defined");
        let place = S3Place::new(&format!("req-{label}"));
        let first = place.run(bin, &["backup", vm.name()]);
        ok(&first, "first backup");
        let first = &first.json["results"][0]["backup"];

        let again = place.run(bin, &["backup", vm.name()]);
        ok(&again, "backup of the unchanged VM");
        let again = &again.json["results"][0]["backup"];
        assert_eq!(mode_of(again, "vdb"), "incremental", "{again}");

        // As after a restore or a failed spot check: a request to read the disk whole.
        let marker = place
            .state()
            .join("full-read")
            .join(format!("{}.vdb", vm.name()));
        std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
        std::fs::write(&marker, "asked by the test").unwrap();
        let whole = place.run(bin, &["backup", vm.name()]);
        ok(&whole, "backup reading the disk whole");
        let whole = &whole.json["results"][0]["backup"];
        assert_eq!(mode_of(whole, "vdb"), "full", "{whole}");

        let v = place.run(bin, &["verify"]);
        ok(&v, "verify");
        let chunks: Vec<u64> = v.json["backups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                assert_eq!(b["ok"], true, "{b}");
                b["chunks"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| *c == chunks[0]), "{chunks:?}");
        eprintln!(
            "{label}: {} chunks; requests: first {} {}, unchanged {} {}, whole-disk {} {}",
            chunks[0],
            total_requests(first),
            first["requests"],
            total_requests(again),
            again["requests"],
            total_requests(whole),
            whole["requests"]
        );
        seen.push((chunks[0], total_requests(again), total_requests(whole)));
    }
    let (small, large) = (seen[0], seen[1]);
    assert!(
        large.0 >= 3 * small.0,
        "the large disk has many more chunks: {seen:?}"
    );
    // The same requests for 4 times the chunks (a lock refresh may add one or two).
    assert!(
        large.1 <= small.1 + 2 && large.2 <= small.2 + 2,
        "requests grow with the chunks: {seen:?}"
    );
    assert!(
        large.1 < large.0 / 2 && large.2 < large.0 / 2,
        "far fewer requests than chunks: {seen:?}"
    );
}
