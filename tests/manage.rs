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
