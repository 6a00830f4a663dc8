//! The repository under faults, through the command line: a folder that is not a repository,
//! a backup whose manifest, domain XML or index is damaged or missing, a repository that
//! fills up during a backup. Backups are made with the repository crate where no VM is
//! needed; the full repository backs up a shut-off test VM.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::json;
use vmbackup::repository::disk::backup_disk;
use vmbackup::repository::manifest::{DiskEntry, Manifest};
use vmbackup::repository::source::{ChunkKind, ChunkSource};
use vmbackup::repository::Repository;
use vmbackup_testkit::libvirt_vm::TestVmBuilder;

/// A 4 MiB disk of incompressible bytes, held in memory.
struct Noise(Vec<u8>);

impl Noise {
    fn new(seed: u64) -> Noise {
        let mut x = 0x9E37_79B9_7F4A_7C15 ^ seed;
        Noise(
            (0..4 * MIB)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect(),
        )
    }
}

impl ChunkSource for Noise {
    type Error = std::io::Error;
    fn virtual_size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_chunk(&self, i: u64, size: u64, buf: &mut Vec<u8>) -> std::io::Result<ChunkKind> {
        let (a, b) = (
            (i * size) as usize,
            ((i + 1) * size).min(self.virtual_size()) as usize,
        );
        buf.clear();
        buf.extend_from_slice(&self.0[a..b]);
        Ok(ChunkKind::Data)
    }
}

/// Backs up `Noise::new(seed)` as backup `id` of libvirt VM `vm`, whose one disk was `source`.
fn fake_backup(repo: &Repository, id: &str, vm: &str, seed: u64, source: &Path) {
    let src = Noise::new(seed);
    let b = backup_disk(repo, &src, MIB, 2, &|_, _| {}).unwrap();
    let index_object = repo.put_index(id, "vda", &b.index).unwrap();
    let xml = format!(
        "<domain type='kvm'><name>{vm}</name><uuid>6d1c5c52-5d3c-4a53-9d3a-{:012x}</uuid>\
         <memory unit='KiB'>65536</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
        seed,
        source.display()
    );
    let domain_xml_object = repo.put_domain_xml(id, &xml).unwrap();
    repo.publish(&Manifest {
        format_version: 1,
        id: id.into(),
        vm_name: vm.into(),
        vm_uuid: format!("6d1c5c52-5d3c-4a53-9d3a-{seed:012x}"),
        started_at: format!("2026-01-0{seed}T00:00:00Z"),
        ended_at: format!("2026-01-0{seed}T00:00:01Z"),
        consistency: "crash".into(),
        consistency_reason: None,
        freeze_ms: None,
        vcpus: 1,
        memory_bytes: 64 << 20,
        disks: vec![DiskEntry {
            target: "vda".into(),
            format: "raw".into(),
            virtual_size: src.virtual_size(),
            allocated_size: src.virtual_size(),
            source: source.display().to_string(),
            chunk_size: MIB,
            index_object,
            logical_bytes: b.logical_bytes,
            stored_bytes: b.stored_bytes_new,
            read: None,
        }],
        nics: vec![],
        domain_xml_object,
        schedule: None,
        scheduled_for: None,
        tags: Vec::new(),
        stored_bytes: b.stored_bytes_new,
        logical_bytes: b.logical_bytes,
        vm_state: None,
    })
    .unwrap();
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_string())
        .collect()
}

/// Every file below `dir`, with its size, sorted.
fn tree(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            out.push((
                e.path().display().to_string(),
                if m.is_dir() { 0 } else { m.len() },
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn a_folder_that_is_not_a_repository_is_refused_with_exit_2_and_left_alone() {
    let place = Place::new();
    std::fs::create_dir_all(place.repo().join("photos")).unwrap();
    std::fs::write(place.repo().join("photos/a.jpg"), b"jpeg").unwrap();
    let before = tree(&place.repo());
    for args in [
        &["list"][..],
        &["backup", "vmbt-no-such-vm"],
        &["gc"],
        &["verify"],
        &["show", "x-20260101T000000Z-0000"],
    ] {
        let r = vmbackup(&place, args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert_eq!(r.json["ok"], json!(false), "{args:?}");
        assert!(
            r.json.to_string().contains("nor a vmbackup repository"),
            "{args:?}: {}",
            r.json
        );
        assert_eq!(
            tree(&place.repo()),
            before,
            "{args:?} wrote into the folder"
        );
    }
}

#[test]
fn an_unreadable_manifest_is_listed_apart_gc_refuses_and_verify_reports_it() {
    let place = Place::new();
    let disk = place.dir.path().join("disk.raw");
    let repo = Repository::open(&place.repo()).unwrap();
    fake_backup(&repo, "rf-a-20260101T000000Z-0001", "vmbt-rf", 1, &disk);
    fake_backup(&repo, "rf-b-20260102T000000Z-0002", "vmbt-rf", 2, &disk);
    fake_backup(&repo, "rf-c-20260103T000000Z-0003", "vmbt-rf", 3, &disk);
    let bad = "rf-b-20260102T000000Z-0002";
    let m = place.repo().join(format!("backups/{bad}/manifest.json"));
    let text = std::fs::read(&m).unwrap();
    std::fs::write(&m, &text[..text.len() / 3]).unwrap();

    let l = vmbackup(&place, &["list"]);
    assert_eq!(l.code, 0, "{}", l.stderr);
    assert_eq!(
        ids(&l.json["backups"]),
        ["rf-a-20260101T000000Z-0001", "rf-c-20260103T000000Z-0003"]
    );
    assert_eq!(ids(&l.json["unreadable"]), [bad]);
    assert!(l.json["unreadable"][0]["error"]
        .as_str()
        .unwrap()
        .contains("cannot be read"));

    let chunks_before = tree(&place.repo().join("chunks"));
    let g = vmbackup(&place, &["gc"]);
    assert_eq!(g.code, 1, "{}", g.stderr);
    let msg = g.json["error"].to_string();
    assert!(msg.contains(bad) && msg.contains("cannot be read"), "{msg}");
    assert_eq!(
        tree(&place.repo().join("chunks")),
        chunks_before,
        "gc freed nothing"
    );

    let v = vmbackup(&place, &["verify"]);
    assert_eq!(v.code, 1, "{}", v.stderr);
    let failed: Vec<&serde_json::Value> = v.json["backups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["ok"] == json!(false))
        .collect();
    assert_eq!(failed.len(), 1, "{}", v.json);
    assert_eq!(failed[0]["id"], json!(bad));
    assert_eq!(v.json["backups"].as_array().unwrap().len(), 3);

    // The damaged backup can be deleted; then gc and verify work again.
    assert_eq!(vmbackup(&place, &["delete", bad]).code, 0);
    assert_eq!(vmbackup(&place, &["gc"]).code, 0);
    assert_eq!(vmbackup(&place, &["verify"]).code, 0);
}

#[test]
fn a_missing_domain_xml_or_index_is_reported_by_verify_and_refused_by_restore() {
    let place = Place::new();
    let disk = place.dir.path().join("vmbt-rf-gone.raw");
    let repo = Repository::open(&place.repo()).unwrap();
    let (x, i) = ("rf-x-20260101T000000Z-0001", "rf-i-20260102T000000Z-0002");
    fake_backup(&repo, x, "vmbt-rf-gone", 1, &disk);
    fake_backup(&repo, i, "vmbt-rf-gone", 2, &disk);
    std::fs::remove_file(place.repo().join(format!("backups/{x}/domain.xml"))).unwrap();
    std::fs::remove_file(place.repo().join(format!("backups/{i}/vda.index"))).unwrap();

    let v = vmbackup(&place, &["verify"]);
    assert_eq!(v.code, 1, "{}", v.stderr);
    let damage = |id: &str| {
        v.json["backups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == json!(id))
            .map(|b| b["damaged"].to_string())
            .unwrap()
    };
    assert!(damage(x).contains("domain XML"), "{}", v.json);
    assert!(
        damage(i).contains("index") && damage(i).contains("missing"),
        "{}",
        v.json
    );

    let before = tree(&place.repo());
    for id in [x, i] {
        let r = vmbackup(&place, &["restore", id, "--force"]);
        assert_eq!(r.code, 1, "{}", r.stderr);
        let msg = r.json["error"].to_string();
        assert!(
            msg.contains("is damaged") && msg.contains("missing"),
            "{msg}"
        );
        assert_eq!(
            tree(&place.repo()),
            before,
            "restore of {id} changed the repository"
        );
        // No disk (nor temporary) was written beside the recorded one, no VM defined; the
        // state folder holds the job history.
        assert_eq!(
            files_in(place.dir.path()),
            ["repo", "state"],
            "restore of {id}"
        );
        let dominfo = Command::new("virsh")
            .args(["-c", "qemu:///system", "dominfo", "vmbt-rf-gone"])
            .output()
            .unwrap();
        assert!(!dominfo.status.success(), "restore of {id} defined the VM");
    }
}

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs at {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_repository_that_fills_up_during_a_backup_fails_it_cleanly() {
    let (_fill, spec) = filled_disk("vdb", 64 * MIB, 24);
    let vm = TestVmBuilder::new("rf-full")
        .disk_spec(spec)
        .define()
        .unwrap();
    let xml = || {
        let out = Command::new("virsh")
            .args(["-c", "qemu:///system", "dumpxml", "--inactive", vm.name()])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let xml_before = xml();
    let place = Place::new();
    // Room enough for pre-flight; once the backup stopped itself at the start of its copy,
    // another writer fills the file system up to its last 4 MiB.
    let _fs = Tmpfs::mount(&place.repo(), "64m");
    let child = Command::new(binary())
        .arg("--json")
        .arg("--repo")
        .arg(place.repo())
        .arg("--state-dir")
        .arg(place.state())
        .args(["backup", vm.name()])
        .env_remove("VMBACKUP_CONFIG")
        .env("VMBACKUP_LOG", "info")
        .env("VMBACKUP_FAILPOINTS", "backup-copy=stop")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stopped = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('T')
            })
            .unwrap_or(false)
    };
    let t = std::time::Instant::now();
    while !stopped() {
        assert!(
            t.elapsed().as_secs() < 60,
            "the backup never reached its copy"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let st = nix::sys::statvfs::statvfs(&place.repo()).unwrap();
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    let filled = Command::new("fallocate")
        .args(["-l", &(free - 4 * MIB).to_string()])
        .arg(place.repo().join("filler"))
        .status()
        .unwrap();
    assert!(filled.success());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let json = vmbackup_testkit::cli::parse_one_document(&stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let err = json["results"][0]["error"].to_string();
    assert!(err.contains("No space left on device"), "{err}");
    std::fs::remove_file(place.repo().join("filler")).unwrap();
    assert_eq!(xml(), xml_before, "the VM is on its images");
    // Nothing published, no temporary and no backup folder left, even before gc.
    let l = vmbackup(&place, &["list"]);
    assert_eq!((l.code, l.json["backups"].clone()), (0, json!([])));
    let leftovers: Vec<String> = tree(&place.repo())
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.contains("/.tmp-") || p.contains("/backups/"))
        .collect();
    assert_eq!(leftovers, Vec::<String>::new());
    assert_eq!(vmbackup(&place, &["gc"]).code, 0);
    assert_eq!(vmbackup(&place, &["verify"]).code, 0);
}

/// The ids of a `run-due` document's backups that ran ok.
fn ran_ok(v: &serde_json::Value) -> Vec<String> {
    v["run"]["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|j| j["results"].as_array().into_iter().flatten())
        .filter(|r| r["status"] == "ok")
        .filter_map(|r| r["backup_id"].as_str().map(str::to_string))
        .collect()
}

/// A truncated manifest of the VM's own last backup: the next scheduled backup still runs
/// (read whole, since its base cannot be read), retention goes on without deleting or
/// counting the unreadable backup, and `run-due` exits 0.
#[test]
fn run_due_goes_on_past_a_truncated_manifest() {
    let vm = TestVmBuilder::new("rf-rundue")
        .disk("vdb", vmbackup_testkit::libvirt_vm::Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let place = Place::new();
    let add = vmbackup(
        &place,
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
    assert_eq!(add.code, 0, "{}", add.stderr);
    let first = vmbackup(&place, &["run-due", "--now", "2027-01-04T02:59:00Z"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let first_id = ran_ok(&first.json);
    assert_eq!(first_id.len(), 1, "{}", first.json);
    let m = place
        .repo()
        .join(format!("backups/{}/manifest.json", first_id[0]));
    let text = std::fs::read(&m).unwrap();
    std::fs::write(&m, &text[..text.len() / 2]).unwrap();

    let second = vmbackup(&place, &["run-due", "--now", "2027-01-05T02:59:00Z"]);
    assert_eq!(second.code, 0, "{}\n{}", second.json, second.stderr);
    let second_id = ran_ok(&second.json);
    assert_eq!(second_id.len(), 1, "the occurrence ran: {}", second.json);
    let l = vmbackup(&place, &["list"]);
    assert_eq!(ids(&l.json["backups"]), second_id, "{}", l.json);
    assert_eq!(
        ids(&l.json["unreadable"]),
        first_id,
        "the unreadable backup is neither deleted nor hidden: {}",
        l.json
    );
    assert_eq!(
        vmbackup(&place, &["verify", &second_id[0]]).code,
        0,
        "the new backup is whole"
    );
}

/// A backup trusts the chunks of the previous backup of the same disk without reading them
/// back; a damaged one that `verify` reports is written again by `backup --full`, which
/// trusts no earlier index: then every backup that uses it verifies again.
#[test]
fn a_damaged_chunk_reported_by_verify_is_repaired_by_a_full_backup() {
    let (_fill, spec) = filled_disk("vdb", 64 * MIB, 12);
    let vm = TestVmBuilder::new("rf-repair")
        .disk_spec(spec)
        .define()
        .unwrap();
    let place = Place::new();
    backup_id(&place, &[vm.name()]);
    // The largest chunk: one of the data's.
    let mut chunks: Vec<(u64, std::path::PathBuf)> = Vec::new();
    for d in std::fs::read_dir(place.repo().join("chunks"))
        .unwrap()
        .flatten()
    {
        for c in std::fs::read_dir(d.path()).unwrap().flatten() {
            chunks.push((c.metadata().unwrap().len(), c.path()));
        }
    }
    chunks.sort();
    let (_, damaged) = chunks.last().unwrap();
    let mut bytes = std::fs::read(damaged).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(damaged, &bytes).unwrap();
    backup_id(&place, &[vm.name()]);
    let v = vmbackup(&place, &["verify"]);
    assert_eq!(v.code, 1, "both backups use the damaged chunk: {}", v.json);
    let full = vmbackup(&place, &["backup", vm.name(), "--full"]);
    assert_eq!(full.code, 0, "{}", full.stderr);
    assert!(
        full.stderr.contains("damaged: writing it again"),
        "{}",
        full.stderr
    );
    let v = vmbackup(&place, &["verify"]);
    assert_eq!(v.code, 0, "repaired for every backup: {}", v.json);
    assert_eq!(v.json["backups"].as_array().unwrap().len(), 3);
}
