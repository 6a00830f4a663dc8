//! Many hosts, one repository (issue 15): `vmbackup` processes with state folders of their
//! own (one per "host") share a repository, excluded from each other only by the lock objects
//! under `locks/` in the repository itself.
//! - gc on one host during a backup on another is refused (exit 4) and frees nothing the
//!   backup will reference; the backup then publishes and verifies;
//! - a backup killed (SIGKILL) mid-way: its lock is stale at once (same host, process gone),
//!   gc proceeds and removes only what the killed backup left;
//! - a backup paused past the stale time: gc takes its lock for stale and proceeds; the backup
//!   then finds its lock lost, fails and publishes nothing;
//! - two hosts back up VMs whose disks share data at once: the shared data is stored once,
//!   and each host lists, verifies and restores the other's backups.
//!
//! The repository location is a parameter (`Location`): each case runs on a local folder and
//! on a prefix of the Garage node of `scripts/garage` (S3 on loopback).

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use vmbackup::hypervisor::vm::VmSpec;
use vmbackup_testkit::garage::S3Place;
use vmbackup_testkit::libvirt_vm::TestVmBuilder;

/// Where the shared repository is.
enum Location {
    /// A folder on this machine.
    Local(PathBuf),
    /// A prefix of its own in the Garage test bucket (`s3://vmbackup-test/<unique>/`).
    S3(S3Place),
}

impl Location {
    fn local(place: &Place) -> Location {
        Location::Local(place.repo())
    }

    fn garage(label: &str) -> Location {
        Location::S3(S3Place::new(label))
    }

    /// What `--repo` is given.
    fn arg(&self) -> OsString {
        match self {
            Location::Local(p) => p.clone().into_os_string(),
            Location::S3(p) => p.url().into(),
        }
    }

    /// The environment a run needs to reach it (the S3 settings).
    fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Location::Local(_) => Vec::new(),
            Location::S3(p) => p.garage.env(),
        }
    }

    /// How many objects there are under `prefix` (`chunks/`, `locks/`).
    fn objects(&self, prefix: &str) -> usize {
        match self {
            Location::Local(p) => files_below(&p.join(prefix)),
            Location::S3(p) => p.objects().iter().filter(|o| o.starts_with(prefix)).count(),
        }
    }

    /// The lock stale time of the paused-backup case, in seconds.
    fn stale_secs(&self) -> u64 {
        match self {
            Location::Local(_) => 3,
            Location::S3(_) => 8,
        }
    }

    /// The backups that have anything stored under `backups/` (published or not), sorted.
    fn backup_folders(&self) -> Vec<String> {
        match self {
            Location::Local(p) => files_in(&p.join("backups")),
            Location::S3(p) => {
                let mut ids: Vec<String> = p
                    .objects()
                    .iter()
                    .filter_map(|o| o.strip_prefix("backups/")?.split_once('/'))
                    .map(|(id, _)| id.to_string())
                    .collect();
                ids.sort();
                ids.dedup();
                ids
            }
        }
    }
}

fn files_below(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                files_below(&e.path())
            } else if e.file_name().to_string_lossy().starts_with(".tmp-") {
                0
            } else {
                1
            }
        })
        .sum()
}

/// One host: a state folder of its own, the shared repository, its own environment.
struct Host<'a> {
    repo: &'a Location,
    state: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl<'a> Host<'a> {
    fn new(place: &Place, repo: &'a Location, name: &str) -> Host<'a> {
        Host {
            repo,
            state: place.dir.path().join(name),
            env: Vec::new(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(binary());
        c.arg("--json")
            .arg("--repo")
            .arg(self.repo.arg())
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .env_remove("VMBACKUP_CONFIG")
            .env("VMBACKUP_LOG", "info")
            .envs(self.repo.env())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn run(&self, args: &[&str]) -> Run {
        let out = self.command(args).output().expect("run vmbackup");
        parse(out)
    }

    /// Starts `ARGS` with fail point `point` set to `action`.
    fn spawn(&self, point: &str, action: &str, args: &[&str]) -> Child {
        self.command(args)
            .env("VMBACKUP_FAILPOINTS", format!("{point}={action}"))
            .spawn()
            .expect("run vmbackup")
    }

    /// Starts `ARGS`, returning once it stopped itself (SIGSTOP) at fail point `point`.
    fn stopped_at(&self, point: &str, args: &[&str]) -> Child {
        let mut child = self.spawn(point, "stop", args);
        wait_stopped(&mut child, point, args);
        child
    }

    fn backup(&self, vm: &str) -> String {
        let b = self.run(&["backup", vm]);
        assert_eq!(b.code, 0, "{}", b.stderr);
        b.json["results"][0]["backup"]["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn listed(&self) -> Vec<String> {
        let l = self.run(&["list"]);
        assert_eq!(l.code, 0, "{}", l.stderr);
        l.json["backups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// `verify` of everything: ok; the number of chunks of each backup, by id.
    fn verified(&self) -> Vec<(String, u64)> {
        let v = self.run(&["verify"]);
        assert_eq!(v.code, 0, "verify: {} {}", v.json, v.stderr);
        v.json["backups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                assert_eq!(b["ok"], true, "{b}");
                (
                    b["id"].as_str().unwrap().to_string(),
                    b["chunks"].as_u64().unwrap(),
                )
            })
            .collect()
    }
}

fn parse(out: std::process::Output) -> Run {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json: Value = vmbackup_testkit::cli::parse_one_document(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout:?}\n{stderr}"));
    Run {
        code: out.status.code().unwrap_or(-1),
        json,
        stderr,
    }
}

/// Waits until `child` (started with `ARGS` and fail point `point` set to `stop`) stopped
/// itself there (SIGSTOP).
fn wait_stopped(child: &mut Child, point: &str, args: &[&str]) {
    let start = Instant::now();
    loop {
        if vmbackup_testkit::faults::is_stopped(child.id()) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("{args:?} ended ({status}) before {point}: {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{args:?} never reached {point}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn resume(child: Child) -> Run {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT).unwrap();
    parse(child.wait_with_output().unwrap())
}

/// gc on host B while host A's backup is between its chunks and its manifest: refused (exit
/// 4, busy), nothing freed; A publishes and everything verifies. A backup killed there: its
/// lock is stale at once, and gc removes what it left (and nothing else). A backup paused
/// past the stale time: gc takes over, and the backup fails without publishing.
fn gc_on_another_host_never_frees_what_a_running_backup_will_reference(
    repo: &Location,
    place: &Place,
) {
    let (_f1, one) = filled_disk("vdb", 64 * MIB, 12);
    let kept = TestVmBuilder::new("mh-kept")
        .disk_spec(one)
        .define()
        .expect("VM defined");
    let (_f2, two) = filled_disk("vdb", 64 * MIB, 13);
    let other = TestVmBuilder::new("mh-other")
        .disk_spec(two)
        .define()
        .expect("VM defined");
    let a = Host::new(place, repo, "host-a");
    let b = Host::new(place, repo, "host-b");

    // 1. A's first backup, held after its chunks and index, before its manifest: every chunk
    //    it wrote is referenced by nothing published yet.
    let held = a.stopped_at("backup-published-index", &["backup", kept.name()]);
    let written = repo.objects("chunks/");
    assert!(written >= 3, "the held backup wrote its chunks: {written}");
    assert_eq!(repo.objects("locks/"), 1, "A's shared lock");
    let gc = b.run(&["gc"]);
    assert_eq!(
        gc.code, 4,
        "gc during a backup on another host: {}",
        gc.stderr
    );
    assert_eq!(repo.objects("chunks/"), written, "gc freed nothing");
    let r = resume(held);
    assert_eq!(
        r.code, 0,
        "the held backup publishes: {} {}",
        r.json, r.stderr
    );
    let first = r.json["results"][0]["backup"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(b.listed(), vec![first.clone()]);
    assert_eq!(b.verified()[0].0, first);
    let gc = b.run(&["gc"]);
    assert_eq!(gc.code, 0, "{}", gc.stderr);
    assert_eq!(gc.json["gc"]["removed_chunks"], 0, "{}", gc.json);
    assert_eq!(repo.objects("locks/"), 0, "every lock released");

    // 2. A's backup of the other VM killed (SIGKILL) in the same place: the same host, its
    //    process gone, so its lock is stale at once; gc removes its leftovers only.
    let mut killed = a.stopped_at("backup-published-index", &["backup", other.name()]);
    let with_leftovers = repo.objects("chunks/");
    assert!(with_leftovers > written, "the killed backup wrote chunks");
    kill(Pid::from_raw(killed.id() as i32), Signal::SIGKILL).unwrap();
    killed.wait().unwrap();
    assert_eq!(
        repo.objects("locks/"),
        1,
        "the killed backup's lock stays behind"
    );
    let gc = b.run(&["gc"]);
    assert_eq!(gc.code, 0, "gc takes the stale lock over: {}", gc.stderr);
    assert!(
        gc.stderr.contains("removed a stale repository lock")
            && gc.stderr.contains("process is gone"),
        "gc says whose lock it removed: {}",
        gc.stderr
    );
    assert_eq!(
        gc.json["gc"]["removed_chunks"].as_u64(),
        Some((with_leftovers - written) as u64),
        "{}",
        gc.json
    );
    assert_eq!(repo.objects("chunks/"), written);
    assert_eq!(repo.objects("locks/"), 0);
    assert_eq!(repo.backup_folders(), vec![first.clone()]);
    assert_eq!(a.listed(), vec![first.clone()]);
    a.verified();

    // 3. A's backup paused past the stale time (3 s here, 8 s on S3: a gc there waits a
    //    listing's lag (1 s) in each of its 3 attempts, and so could itself outlast 3 s): gc
    //    on B takes its lock for stale and frees its chunks; A, let go, finds its lock lost
    //    and publishes nothing.
    let stale_secs = repo.stale_secs();
    let stale = ("VMBACKUP_LOCK_STALE_SECS", stale_secs.to_string());
    let a = Host {
        env: vec![stale.clone()],
        ..a
    };
    let b = Host {
        env: vec![stale],
        ..b
    };
    let paused = a.stopped_at("backup-published-index", &["backup", other.name()]);
    assert!(repo.objects("chunks/") > written);
    let gc = b.run(&["gc"]);
    assert_eq!(gc.code, 4, "not stale yet: {}", gc.stderr);
    std::thread::sleep(Duration::from_secs(stale_secs + 1));
    let gc = b.run(&["gc"]);
    assert_eq!(gc.code, 0, "{}", gc.stderr);
    assert!(gc.stderr.contains("not refreshed for"), "{}", gc.stderr);
    assert_eq!(
        repo.objects("chunks/"),
        written,
        "the paused backup's chunks are gone"
    );
    let r = resume(paused);
    assert_eq!(r.code, 1, "{} {}", r.json, r.stderr);
    assert!(r.json.to_string().contains("lock was lost"), "{}", r.json);
    assert_eq!(b.listed(), vec![first.clone()], "nothing published");
    assert_eq!(repo.backup_folders(), vec![first.clone()]);
    b.verified();
    assert_eq!(repo.objects("locks/"), 0);
    // The next backup of that VM is whole again.
    let id = a.backup(other.name());
    assert_eq!(b.verified().len(), 2);
    assert!(b.listed().contains(&id));
}

#[test]
fn gc_on_another_host_during_a_backup_into_a_local_repository() {
    let place = Place::new();
    gc_on_another_host_never_frees_what_a_running_backup_will_reference(
        &Location::local(&place),
        &place,
    );
}

#[test]
fn gc_on_another_host_during_a_backup_into_garage() {
    let place = Place::new();
    gc_on_another_host_never_frees_what_a_running_backup_will_reference(
        &Location::garage("hosts-gc"),
        &place,
    );
}

/// Two hosts back up, at the same moment, two VMs whose disks hold the same 48 MiB: the
/// shared chunks are stored once; each host lists and verifies both backups and restores
/// the other host's.
fn two_hosts_back_up_at_once(repo: &Location, place: &Place) {
    // The same data (and so the same file system layout) in both disks.
    let (_fill_a, disk_a) = filled_disk("vdb", 96 * MIB, 48);
    let (_fill_b, disk_b) = filled_disk("vdb", 96 * MIB, 48);
    let vm_a = TestVmBuilder::new("mh-a")
        .disk_spec(disk_a)
        .define()
        .expect("VM defined");
    let vm_b = TestVmBuilder::new("mh-b")
        .disk_spec(disk_b)
        .define()
        .expect("VM defined");
    let a = Host::new(place, repo, "host-a");
    let b = Host::new(place, repo, "host-b");

    // Both start at once; each stops itself after its chunks and index, before its manifest,
    // so that their locks are seen held at once whatever the machine's load; then both go on.
    let point = "backup-published-index";
    let (args_a, args_b) = (["backup", vm_a.name()], ["backup", vm_b.name()]);
    let mut started = [
        a.spawn(point, "stop", &args_a),
        b.spawn(point, "stop", &args_b),
    ];
    wait_stopped(&mut started[0], point, &args_a);
    wait_stopped(&mut started[1], point, &args_b);
    assert_eq!(
        repo.objects("locks/"),
        2,
        "both backups hold their shared locks at once"
    );
    let ids: Vec<String> = started
        .into_iter()
        .map(|c| {
            let r = resume(c);
            assert_eq!(r.code, 0, "{} {}", r.json, r.stderr);
            r.json["results"][0]["backup"]["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();

    for host in [&a, &b] {
        let mut listed = host.listed();
        listed.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(listed, want);
    }
    let chunks: u64 = a.verified().iter().map(|(_, c)| c).sum();
    let per_backup = b.verified();
    assert_eq!(per_backup.len(), 2);
    // 48 MiB of equal data: 12 chunks of 4 MiB, of which the ext4 of a small disk spoils
    // about half with the metadata of a block group every 8 MiB (checksummed with the file
    // system's own UUID); 8 are equal (measured), stored once.
    let stored = repo.objects("chunks/") as u64;
    assert!(
        stored + 6 <= chunks,
        "{stored} chunk objects for {chunks} chunks referenced: the shared data is stored once"
    );

    // Each host restores the other's backup (as a new VM), with the data intact.
    for (host, id, from) in [(&b, &ids[0], &vm_a), (&a, &ids[1], &vm_b)] {
        let name = format!("{}-x", from.name());
        let _gone = Undefine(name.clone());
        let r = host.run(&["restore", id, "--as", &name, "--new-macs"]);
        assert_eq!(r.code, 0, "{} {}", r.json, r.stderr);
        let lv = vmbackup::hypervisor::libvirt::Libvirt::open("qemu:///system").unwrap();
        let spec = VmSpec::from_xml(&lv.domain(&name).unwrap().inactive_xml().unwrap()).unwrap();
        let _images: Vec<RemoveFile> = spec
            .disks
            .iter()
            .filter_map(|d| d.source.clone())
            .map(|p| RemoveFile(PathBuf::from(p)))
            .collect();
        // Every disk, the one with the shared data included, holds what the original holds
        // (shut off, unchanged since its backup).
        let original = VmSpec::from_xml(&from.dom().inactive_xml().unwrap()).unwrap();
        assert_eq!(spec.disks.len(), original.disks.len());
        for d in &spec.disks {
            let o = original
                .disks
                .iter()
                .find(|o| o.target == d.target)
                .unwrap();
            let (restored, was) = (d.source.clone().unwrap(), o.source.clone().unwrap());
            assert_ne!(restored, was);
            let same = Command::new("qemu-img")
                .args(["compare", "-q", "-U", &was, &restored])
                .status()
                .unwrap();
            assert!(same.success(), "{name} {}: the content is back", d.target);
        }
    }
    assert_eq!(repo.objects("locks/"), 0);
}

#[test]
fn two_hosts_back_up_into_one_local_repository_at_once() {
    let place = Place::new();
    two_hosts_back_up_at_once(&Location::local(&place), &place);
}

#[test]
fn two_hosts_back_up_into_one_garage_prefix_at_once() {
    let place = Place::new();
    two_hosts_back_up_at_once(&Location::garage("hosts-two"), &place);
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

struct RemoveFile(PathBuf);

impl Drop for RemoveFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
