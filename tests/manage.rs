//! Managing backup images through the command line: verify names a damaged backup, delete
//! removes one backup, gc frees only chunks no backup references.

mod common;

use std::collections::HashSet;

use common::*;
use serde_json::json;
use vmbackup::repository::chunk::object_name;
use vmbackup::repository::disk::DiskIndex;
use vmbackup::repository::Repository;
use vmbackup_testkit::libvirt_vm::TestVmBuilder;

fn chunk_names(repo: &Repository, id: &str) -> HashSet<String> {
    let m = repo.load(id).unwrap();
    let mut out = HashSet::new();
    for d in &m.disks {
        let idx = DiskIndex::decode(&repo.store().get(&d.index_object).unwrap()).unwrap();
        out.extend(idx.chunks.iter().flatten().map(object_name));
    }
    out
}

#[test]
fn verify_names_the_damaged_backup_and_delete_then_gc_free_its_chunks() {
    let (_fa, da) = filled_disk("vdb", 64 * MIB, 8);
    let (_fb, db) = filled_disk("vdb", 64 * MIB, 9);
    let a = TestVmBuilder::new("mg-a").disk_spec(da).define().unwrap();
    let b = TestVmBuilder::new("mg-b").disk_spec(db).define().unwrap();
    let place = Place::new();
    let ra = vmbackup(&place, &["backup", a.name()]);
    assert_eq!(ra.code, 0, "{}", ra.stderr);
    let rb = vmbackup(&place, &["backup", b.name()]);
    assert_eq!(rb.code, 0, "{}", rb.stderr);
    let ida = ra.json["results"][0]["backup"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let idb = rb.json["results"][0]["backup"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(vmbackup(&place, &["verify"]).code, 0);

    // Damage a chunk only b's backup uses.
    let repo = Repository::open(&place.repo()).unwrap();
    let (ca, cb) = (chunk_names(&repo, &ida), chunk_names(&repo, &idb));
    let only_b = cb
        .difference(&ca)
        .next()
        .expect("b has chunks of its own")
        .clone();
    let path = place.repo().join(&only_b);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len() / 2;
    bytes[n] ^= 0x5a;
    std::fs::write(&path, bytes).unwrap();

    let v = vmbackup(&place, &["verify"]);
    assert_eq!(v.code, 1, "{}", v.stderr);
    let bad: Vec<&str> = v.json["backups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["ok"] == json!(false))
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(bad, [idb.as_str()]);
    assert_eq!(vmbackup(&place, &["verify", &ida]).code, 0);

    // delete b: gone from the list; its own chunks go at gc, a's stay and verify.
    let d = vmbackup(&place, &["delete", &idb]);
    assert_eq!(d.code, 0, "{}", d.stderr);
    let ids: Vec<String> = vmbackup(&place, &["list"]).json["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, std::slice::from_ref(&ida));
    let g = vmbackup(&place, &["gc"]);
    assert_eq!(g.code, 0, "{}", g.stderr);
    assert_eq!(
        g.json["gc"]["removed_chunks"].as_u64().unwrap(),
        cb.difference(&ca).count() as u64
    );
    assert!(!path.exists());
    for c in &ca {
        assert!(
            place.repo().join(c).exists(),
            "gc removed {c}, which a's backup uses"
        );
    }
    assert_eq!(vmbackup(&place, &["verify"]).code, 0);
    assert_eq!(vmbackup(&place, &["delete", &idb]).code, 2);
}

#[test]
fn usage_splits_stored_bytes_into_each_vms_own_and_shared_and_a_vms_own_is_what_gc_frees() {
    let (_fa, da) = filled_disk("vdb", 64 * MIB, 8);
    let (_fb, db) = filled_disk("vdb", 64 * MIB, 9);
    let (_fc, dc) = filled_disk("vdc", 32 * MIB, 4);
    let a = TestVmBuilder::new("us-a")
        .disk_spec(da)
        .disk_spec(dc.clone())
        .define()
        .unwrap();
    let b = TestVmBuilder::new("us-b")
        .disk_spec(db)
        .disk_spec(dc)
        .define()
        .unwrap();
    // vdc: one image, cloned (the VMs are shut off): its chunks are shared.
    std::fs::copy(&a.disk_paths()[1], &b.disk_paths()[1]).unwrap();
    let place = Place::new();
    for vm in [&a, &b] {
        let r = vmbackup(&place, &["backup", vm.name()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let u = vmbackup(&place, &["usage"]);
    assert_eq!(u.code, 0, "{}", u.stderr);
    let usage = &u.json["usage"];
    let row = |name: &str| {
        usage["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vm"] == name)
            .unwrap_or_else(|| panic!("no row for {name}: {usage}"))
            .clone()
    };
    let (ua, ub) = (row(a.name()), row(b.name()));
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}: {v}"));
    // Each VM's 8 MiB of its own random data is its own; the identical root images are shared.
    assert!(n(&ua, "exclusive_bytes") >= 8 * MIB, "{ua}");
    assert!(n(&ua, "shared_bytes") > 0, "{ua}");
    assert_eq!(n(&ua, "shared_bytes"), n(&ub, "shared_bytes"));
    let r = &usage["repository"];
    assert_eq!(
        n(r, "stored_bytes"),
        n(&ua, "exclusive_bytes")
            + n(&ub, "exclusive_bytes")
            + n(&ua, "shared_bytes")
            + n(r, "unreferenced_bytes"),
        "{usage}"
    );
    assert!(r["dedup_ratio"].as_f64().unwrap() > 1.0, "{r}");
    assert!(n(r, "free_bytes") > 0);
    // Made within the hour: one hour begun of its disks' size.
    let gib = n(&ua, "newest_disk_bytes") as f64 / (1u64 << 30) as f64;
    assert!(
        (ua["gib_hours"].as_f64().unwrap() - gib).abs() < 1e-6,
        "{ua}"
    );
    assert_eq!(n(&ua, "added_30d_bytes"), {
        let list = vmbackup(&place, &["list", a.name()]);
        list.json["backups"][0]["stored_bytes"].as_u64().unwrap()
    });
    // One VM's row; the figures are the same.
    let only = vmbackup(&place, &["usage", "--vm", a.name()]);
    assert_eq!(only.json["usage"]["vms"].as_array().unwrap().len(), 1);
    assert_eq!(only.json["usage"]["vms"][0], ua);

    // Deleting all of a's backups, then a gc, frees exactly its exclusive bytes; a dry run
    // of the gc says so first and removes nothing.
    let ida = vmbackup(&place, &["list", a.name()]).json["backups"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(vmbackup(&place, &["delete", &ida]).code, 0);
    let dry = vmbackup(&place, &["gc", "--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert_eq!(dry.json["dry_run"], true);
    let after_dry = vmbackup(&place, &["usage"]);
    assert_eq!(
        after_dry.json["usage"]["repository"]["stored_bytes"], r["stored_bytes"],
        "a dry run removes nothing"
    );
    let gc = vmbackup(&place, &["gc"]);
    assert_eq!(
        gc.json["gc"], dry.json["gc"],
        "the dry run said what gc did"
    );
    assert_eq!(gc.code, 0, "{}", gc.stderr);
    assert_eq!(
        gc.json["gc"]["removed_bytes"].as_u64().unwrap(),
        n(&ua, "exclusive_bytes") + n(r, "unreferenced_bytes"),
        "{}",
        gc.json
    );

    // Bad input: exit 2.
    for bad in [
        &["usage", "--vm", "no-such-vm"][..],
        &["usage", "--from", "2027-02-01", "--to", "2027-01-01"][..],
        &["usage", "--from", "yesterday"][..],
    ] {
        let r = vmbackup(&place, bad);
        assert_eq!(r.code, 2, "{bad:?}: {}", r.stderr);
    }
}

/// Makes a file immutable (`chattr +i`: even root cannot delete it) until dropped: a
/// deletion that really fails.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn new(p: std::path::PathBuf) -> Immutable {
        let st = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success(), "chattr +i {}", p.display());
        Immutable(p)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn delete_and_verify_take_several_ids_check_them_all_first_and_report_each() {
    let vm = TestVmBuilder::new("mg-many")
        .disk("vdb", vmbackup_testkit::libvirt_vm::Format::Qcow2, 16 * MIB)
        .define()
        .unwrap();
    let place = Place::new();
    // Four backups: two tagged `nightly` (as an external scheduler would), one of the VM
    // named by its libvirt UUID.
    let old = backup_id(&place, &["--tag", "nightly", vm.name()]);
    let first = backup_id(&place, &["--tag", "nightly", "--tag", "keep", vm.name()]);
    let uuid = vmbackup(&place, &["list"]).json["backups"][0]["vm_uuid"]
        .as_str()
        .unwrap()
        .to_uppercase();
    let ids: Vec<String> = vec![
        first,
        backup_id(&place, &[&uuid]),
        backup_id(&place, &[vm.name()]),
    ];
    let listed = || -> Vec<String> {
        vmbackup(&place, &["list"]).json["backups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["id"].as_str().unwrap().to_string())
            .collect()
    };
    let manifest = |id: &str| place.repo().join("backups").join(id).join("manifest.json");

    // Found by name, by UUID, by tag, the newest N; the tags are in the manifest.
    let l = vmbackup(&place, &["list"]);
    assert_eq!(
        l.json["backups"][1]["tags"],
        json!(["nightly", "keep"]),
        "{}",
        l.json
    );
    assert_eq!(
        l.json["backups"][2]["vm"],
        vm.name(),
        "the UUID found the VM by name"
    );
    let s = vmbackup(&place, &["show", &ids[0]]);
    assert_eq!(s.json["manifest"]["tags"], json!(["nightly", "keep"]));
    let list = |args: &[&str]| common::ids(&vmbackup(&place, &[&["list"][..], args].concat()));
    assert_eq!(list(&["--last", "1", "--vm", vm.name()]), [ids[2].clone()]);
    assert_eq!(list(&["--vm", &uuid, "--last", "2"]), ids[1..]);
    assert_eq!(list(&["--tag", "nightly"]), [old.clone(), ids[0].clone()]);
    assert_eq!(list(&["--vm", "nosuch"]), Vec::<String>::new());
    assert_eq!(vmbackup(&place, &["list", "--tag", "a b"]).code, 2);
    assert_eq!(
        vmbackup(&place, &["backup", "--tag", "../x", vm.name()]).code,
        2
    );

    // latest, VM@latest, VM@TIME, a unique prefix; an ambiguous one is exit 2 and deletes
    // nothing.
    let shown = |what: &str| {
        let s = vmbackup(&place, &["show", what]);
        assert_eq!(s.code, 0, "show {what}: {}", s.stderr);
        s.json["manifest"]["id"].as_str().unwrap().to_string()
    };
    assert_eq!(shown("latest"), ids[2]);
    assert_eq!(shown(&format!("{}@latest", vm.name())), ids[2]);
    assert_eq!(shown(&format!("{uuid}@latest")), ids[2]);
    assert_eq!(shown(&format!("{}@2999-01-01", vm.name())), ids[2]);
    let started = s.json["manifest"]["started_at"].as_str().unwrap();
    assert_eq!(shown(&format!("{}@{started}", vm.name())), ids[0]);
    assert_eq!(
        vmbackup(&place, &["show", &format!("{}@2000-01-01", vm.name())]).code,
        2
    );
    let unique = (1..=ids[1].len())
        .map(|n| &ids[1][..n])
        .find(|p| [&old, &ids[0], &ids[2]].iter().all(|i| !i.starts_with(p)))
        .unwrap();
    assert_eq!(shown(unique), ids[1]);
    let common = &ids[1][..unique.len() - 1];
    let d = vmbackup(&place, &["delete", common]);
    assert_eq!(d.code, 2, "{}", d.stderr);
    assert!(
        d.stderr.contains("ambiguous") && d.stderr.contains(&ids[1]),
        "{}",
        d.stderr
    );
    assert_eq!(listed().len(), 4, "nothing deleted");
    assert_eq!(vmbackup(&place, &["delete", "nosuch-prefix"]).code, 2);

    // prune --vm --keep 1 --tag nightly: of the two tagged ones the older goes; a dry run
    // first deletes nothing.
    let p = vmbackup(
        &place,
        &[
            "prune",
            "--vm",
            vm.name(),
            "--keep",
            "1",
            "--tag",
            "nightly",
            "--dry-run",
        ],
    );
    assert_eq!(p.code, 0, "{}", p.stderr);
    assert_eq!(p.json["deleted"], json!([old]));
    assert_eq!(listed().len(), 4);
    assert_eq!(vmbackup(&place, &["prune", "--vm", vm.name()]).code, 2);
    let p = vmbackup(
        &place,
        &["prune", "--vm", &uuid, "--keep", "1", "--tag", "nightly"],
    );
    assert_eq!(p.code, 0, "{}", p.stderr);
    assert_eq!(p.json["deleted"], json!([old]));
    assert_eq!(listed(), ids);

    // verify A B C: one whose manifest does not read is reported beside the others, which
    // are all checked; an unknown id is bad input.
    std::fs::write(manifest(&ids[1]), b"{ not json").unwrap();
    let v = vmbackup(&place, &["verify", &ids[0], &ids[1], &ids[2]]);
    assert_eq!(v.code, 1, "{}", v.stderr);
    let rows = v.json["backups"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{}", v.json);
    let ok: Vec<bool> = rows.iter().map(|r| r["ok"].as_bool().unwrap()).collect();
    assert_eq!(ok, [true, false, true], "{}", v.json);
    assert!(!rows[1]["damaged"][0].as_str().unwrap().is_empty());
    let v = vmbackup(&place, &["verify", &ids[0], "nosuch-20270101T000000Z-0000"]);
    assert_eq!(v.code, 2, "{}", v.stderr);

    // A pinned backup is refused without --force (exit 3), an unknown id is exit 2: nothing
    // is deleted either way.
    assert_eq!(vmbackup(&place, &["pin", &ids[2]]).code, 0);
    let d = vmbackup(&place, &["delete", &ids[0], &ids[2]]);
    assert_eq!(d.code, 3, "{}", d.stderr);
    assert!(d.stderr.contains("pinned"), "{}", d.stderr);
    let d = vmbackup(&place, &["delete", &ids[0], "nosuch-20270101T000000Z-0000"]);
    assert_eq!(d.code, 2, "{}", d.stderr);
    assert_eq!(
        listed().len(),
        2,
        "the unreadable one is not listed; the others stay"
    );

    // A dry run checks as the real run does (pinned: exit 3 without --force) and deletes
    // nothing.
    let d = vmbackup(&place, &["delete", &ids[0], &ids[2], "--dry-run"]);
    assert_eq!(d.code, 3, "{}", d.stderr);
    let d = vmbackup(
        &place,
        &["delete", &ids[0], &ids[2], "--force", "--dry-run"],
    );
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert_eq!(d.json["deleted"], json!([ids[0], ids[2]]));
    assert_eq!(listed().len(), 2);

    // Unpinned, a backup can be deleted without --force (checked by a dry run); pinned again,
    // `list` says so.
    let pinned_in_list = |id: &str| -> bool {
        let l = vmbackup(&place, &["list"]);
        let rows = l.json["backups"].as_array().unwrap().clone();
        rows.iter().find(|r| r["id"] == id).unwrap()["pinned"] == true
    };
    assert!(pinned_in_list(&ids[2]));
    let u = vmbackup(&place, &["unpin", &ids[2]]);
    assert_eq!(
        (u.code, &u.json["pinned"]),
        (0, &json!(false)),
        "{}",
        u.json
    );
    assert!(!pinned_in_list(&ids[2]));
    let d = vmbackup(&place, &["delete", &ids[2], "--dry-run"]);
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert_eq!(vmbackup(&place, &["pin", &ids[2]]).code, 0);
    assert!(pinned_in_list(&ids[2]));

    // One of two deletions fails (its manifest immutable): the other is deleted, exit 5,
    // each in the JSON and the history.
    let stuck = Immutable::new(manifest(&ids[0]));
    let d = vmbackup(&place, &["delete", &ids[0], &ids[2], "--force"]);
    assert_eq!(d.code, 5, "{}\n{}", d.json, d.stderr);
    assert_eq!(d.json["deleted"], json!([ids[2]]));
    assert_eq!(d.json["errors"][0]["id"], ids[0].as_str());
    assert_eq!(listed(), vec![ids[0].clone()]);
    let h = vmbackup(&place, &["history", "--all"]);
    let deletes: Vec<(String, String)> = h.json["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["kind"] == "delete")
        .map(|j| {
            (
                j["backup_id"].as_str().unwrap_or_default().to_string(),
                j["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        deletes.contains(&(ids[0].clone(), "failed".into())),
        "{deletes:?}"
    );
    assert!(
        deletes.contains(&(ids[2].clone(), "ok".into())),
        "{deletes:?}"
    );
    // The history by status, kind and number.
    let h = vmbackup(&place, &["history", "--all", "--status", "failed"]);
    let jobs = h.json["jobs"].as_array().unwrap();
    assert!(
        !jobs.is_empty() && jobs.iter().all(|j| j["status"] == "failed"),
        "{}",
        h.json
    );
    assert!(jobs.iter().any(|j| j["backup_id"] == ids[0].as_str()));
    let h = vmbackup(&place, &["history", "--kind", "prune", "--limit", "1"]);
    let jobs = h.json["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{}", h.json);
    assert_eq!(jobs[0]["vm"], vm.name());
    assert!(jobs[0]["detail"].as_str().unwrap().contains(&old));
    assert_eq!(
        vmbackup(&place, &["history", "--status", "nonsense"]).code,
        2
    );
    // Every deletion failing is exit 1.
    let d = vmbackup(&place, &["delete", &ids[0]]);
    assert_eq!(d.code, 1, "{}", d.stderr);
    drop(stuck);
    // Freed, it goes; the unreadable one too.
    let d = vmbackup(&place, &["delete", &ids[0], &ids[1]]);
    assert_eq!(d.code, 0, "{}", d.stderr);
    assert_eq!(d.json["deleted"], json!([ids[0], ids[1]]));
    assert!(listed().is_empty());
}
