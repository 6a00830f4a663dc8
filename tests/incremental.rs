//! Incremental backups of running VMs, end to end, on real guests: after a first full read,
//! each backup of a running VM's qcow2 disk reads only the chunks the previous backup's dirty
//! bitmap marks (plus a few spot checks), and every backup still restores to the whole disk
//! exactly as the guest saw it at the backup's instant.
//!
//! The oracle is the guest itself: right before each backup (guest idle, caches dropped) the
//! test hashes its data disk, 4 MiB by 4 MiB, read with O_DIRECT inside the guest; the disk
//! restored from that backup must hash the same. Writes made while a backup runs (stopped at
//! a fault point: during its copy, or once its commit job started) belong to the next backup.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use vmbackup::hypervisor::qmp::QemuVm;
use vmbackup::repository::disk::{restore_disk, DiskIndex};
use vmbackup::repository::Repository;
use vmbackup_testkit::libvirt_vm::{make_disk, DiskSpec, Format, TestVm, TestVmBuilder};
use vmbackup_testkit::qemu_vm::TestQemu;

/// The repository's chunk size, the unit an incremental read works in.
const CHUNK: u64 = 4 * MIB;
/// The data disk's virtual size.
const DISK: u64 = 64 * MIB;
/// What an incremental read may read besides the changed chunks: its spot checks.
const SPOT: u64 = 3 * CHUNK;
/// The block size of the guest's writes: offsets and lengths are multiples of it.
const BLOCK: u64 = 64 * 1024;

/// Where the test's commands run: a libvirt guest or a plain QEMU one.
enum Guest<'a> {
    Libvirt(&'a TestVm),
    Qemu(&'a QemuVm),
}

impl Guest<'_> {
    /// Runs `sh -c script` in the guest; it must exit 0. Returns its stdout.
    fn sh(&self, script: &str) -> String {
        match self {
            Guest::Libvirt(vm) => vm
                .sh(script)
                .unwrap_or_else(|e| panic!("guest: {script}: {e}")),
            Guest::Qemu(q) => {
                // This agent call returns stdout only: fold stderr into it for the report.
                let (rc, out) = q
                    .exec_sh(&format!("exec 2>&1; {script}"), Duration::from_secs(120))
                    .unwrap_or_else(|e| panic!("guest: {script}: {e}"));
                assert_eq!(rc, 0, "guest: {script}: {out}");
                out
            }
        }
    }
}

impl Guest<'_> {
    /// vmbackup's dirty bitmaps on the VM's disks: libvirt checkpoints named `vmbackup-*`, or
    /// the plain QEMU's persistent, recording bitmaps of that name (others are reported by
    /// their flags, to fail the comparison visibly).
    fn tracking_bitmaps(&self) -> Vec<String> {
        let mut names: Vec<String> = match self {
            Guest::Libvirt(vm) => vm.dom().checkpoints().expect("list checkpoints"),
            Guest::Qemu(q) => q
                .bitmaps()
                .expect("list bitmaps")
                .into_iter()
                .map(|b| {
                    if b.persistent && b.recording && !b.inconsistent {
                        b.name
                    } else {
                        format!("{b:?}")
                    }
                })
                .collect(),
        };
        names.retain(|n| n.contains("vmbackup-"));
        names
    }
}

/// What a guest write puts into a region of the disk.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// Bytes from the guest's /dev/urandom.
    Random,
    /// Written zeros.
    Zeros,
    /// Discarded (trimmed): a qcow2 disk with `discard='unmap'` reads zeros there after.
    Discard,
}

/// One guest write of `len` bytes at `at`.
#[derive(Debug, Clone, Copy)]
struct W {
    at: u64,
    len: u64,
    fill: Fill,
}

const fn rnd(at: u64, len: u64) -> W {
    W {
        at,
        len,
        fill: Fill::Random,
    }
}
const fn zeros(at: u64, len: u64) -> W {
    W {
        at,
        len,
        fill: Fill::Zeros,
    }
}
const fn trim(at: u64, len: u64) -> W {
    W {
        at,
        len,
        fill: Fill::Discard,
    }
}

/// The chunks that `writes` touch.
fn touched(writes: &[W]) -> BTreeSet<u64> {
    writes
        .iter()
        .flat_map(|w| w.at / CHUNK..=(w.at + w.len - 1) / CHUNK)
        .collect()
}

/// The data disk as the guest sees it: the block device whose serial is the disk's target.
struct GuestDisk<'a> {
    guest: Guest<'a>,
    dev: String,
}

impl<'a> GuestDisk<'a> {
    fn find(guest: Guest<'a>, serial: &str) -> GuestDisk<'a> {
        let out = guest.sh(&format!(
            "for b in /sys/block/vd*; do \
             [ \"$(cat $b/serial 2>/dev/null)\" = {serial} ] && echo /dev/${{b##*/}}; \
             done; true"
        ));
        let devs: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(
            devs.len(),
            1,
            "the guest's device with serial {serial}: {out:?}"
        );
        let dev = devs[0].to_string();
        let size: u64 = guest
            .sh(&format!("blockdev --getsize64 {dev}"))
            .trim()
            .parse()
            .unwrap();
        assert_eq!(size, DISK, "{dev}");
        GuestDisk { guest, dev }
    }

    /// Makes `writes` in the guest, straight to the device (O_DIRECT; a discard is a
    /// synchronous ioctl), in order, then syncs.
    fn write(&self, writes: &[W]) {
        if writes.is_empty() {
            return;
        }
        let dev = &self.dev;
        let mut script = String::from("set -e");
        for w in writes {
            assert!(
                w.at.is_multiple_of(BLOCK) && w.len.is_multiple_of(BLOCK) && w.len > 0,
                "{w:?}"
            );
            assert!(w.at + w.len <= DISK, "{w:?}");
            let from = match w.fill {
                Fill::Random => "/dev/urandom",
                Fill::Zeros => "/dev/zero",
                Fill::Discard => {
                    script.push_str(&format!("; blkdiscard -o {} -l {} {dev}", w.at, w.len));
                    continue;
                }
            };
            script.push_str(&format!(
                "; dd if={from} of={dev} bs={BLOCK} seek={} count={} oflag=direct \
                 conv=notrunc status=none",
                w.at / BLOCK,
                w.len / BLOCK
            ));
        }
        script.push_str("; sync");
        self.guest.sh(&script);
    }

    /// The SHA-256 of each 4 MiB chunk in `chunks`, read from the device with O_DIRECT after
    /// a sync and with the page cache dropped: the bytes the guest would read.
    fn chunk_hashes(&self, chunks: &BTreeSet<u64>) -> Vec<String> {
        if chunks.is_empty() {
            return Vec::new();
        }
        let list: Vec<String> = chunks.iter().map(u64::to_string).collect();
        let out = self.guest.sh(&format!(
            "set -e; sync; echo 3 > /proc/sys/vm/drop_caches; for i in {list}; do \
             dd if={dev} bs={CHUNK} skip=$i count=1 iflag=direct status=none | sha256sum; \
             done",
            list = list.join(" "),
            dev = self.dev
        ));
        let hashes: Vec<String> = out
            .lines()
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
            .collect();
        assert_eq!(hashes.len(), chunks.len(), "{out}");
        assert!(hashes.iter().all(|h| h.len() == 64), "{out}");
        hashes
    }

    /// The SHA-256 of every chunk of the device.
    fn all_chunk_hashes(&self) -> Vec<String> {
        self.chunk_hashes(&(0..DISK / CHUNK).collect())
    }
}

/// Restores disk `target` of backup `id` to a raw file with the library and returns the
/// SHA-256 of each 4 MiB chunk of it (the file is removed).
fn restored_hashes(place: &Place, id: &str, target: &str) -> Vec<String> {
    let repo = Repository::open(&place.repo()).unwrap();
    let m = repo.load(id).unwrap();
    let d = m
        .disks
        .iter()
        .find(|d| d.target == target)
        .unwrap_or_else(|| panic!("backup {id} has no disk {target}"));
    let index = DiskIndex::decode(&repo.store().get(&d.index_object).unwrap()).unwrap();
    assert_eq!(index.virtual_size, DISK, "backup {id}");
    let out = place.dir.path().join(format!("restored-{id}.raw"));
    restore_disk(&repo, &index, &out, 2, &|_, _| {}).unwrap();
    let mut f = std::fs::File::open(&out).unwrap();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut hashes = Vec::new();
    loop {
        let mut n = 0;
        while n < buf.len() {
            let got = f.read(&mut buf[n..]).unwrap();
            if got == 0 {
                break;
            }
            n += got;
        }
        if n == 0 {
            break;
        }
        hashes.push(vmbackup::digest::sha256_hex(&buf[..n]));
    }
    std::fs::remove_file(&out).unwrap();
    hashes
}

/// Fails, naming the chunks that differ, unless backup `id` restores to `oracle`.
fn assert_restores_to(place: &Place, id: &str, oracle: &[String], what: &str) {
    let got = restored_hashes(place, id, "vdb");
    let differ: Vec<usize> = (0..oracle.len().max(got.len()))
        .filter(|&i| oracle.get(i) != got.get(i))
        .collect();
    assert!(
        differ.is_empty(),
        "{what}: backup {id} restores a disk that differs from what the guest read in the \
         4 MiB chunks {differ:?} (of {})",
        oracle.len()
    );
}

/// How the backup is run: its arguments after the global options.
struct Target {
    args: Vec<String>,
}

impl Target {
    fn args(&self) -> Vec<&str> {
        self.args.iter().map(String::as_str).collect()
    }
}

/// Runs `vmbackup --json ... ARGS` that stops itself (SIGSTOP) at fault point `point`, waits
/// until it has, runs `meanwhile`, continues it (SIGCONT) and returns its result.
fn run_stopped_at(place: &Place, point: &str, args: &[&str], meanwhile: impl FnOnce()) -> Run {
    let log = place.dir.path().join(format!("stopped-at-{point}.log"));
    let mut child = Command::new(binary())
        .arg("--json")
        .arg("--repo")
        .arg(place.repo())
        .arg("--state-dir")
        .arg(place.state())
        .args(args)
        .env_remove("VMBACKUP_CONFIG")
        .env("VMBACKUP_LOG", "info")
        .env("VMBACKUP_FAILPOINTS", format!("{point}=stop"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("run vmbackup");
    let start = Instant::now();
    loop {
        if vmbackup_testkit::faults::is_stopped(child.id()) {
            break;
        }
        let exited = child.try_wait().unwrap();
        if exited.is_some() || start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let status = child.wait();
            panic!(
                "vmbackup never stopped at {point} ({status:?}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Whatever `meanwhile` does, the stopped process is continued (and then waited for).
    struct Continue(i32);
    impl Drop for Continue {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
    }
    let cont = Continue(child.id() as i32);
    meanwhile();
    drop(cont);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let json = vmbackup_testkit::cli::parse_one_document(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout:?}\nstderr: {stderr}"));
    Run {
        code: out.status.code().unwrap_or(-1),
        json,
        stderr,
    }
}

/// One round: guest writes, then a backup, possibly with more writes while it is stopped at
/// a fault point (those belong to the next backup).
struct Round {
    name: &'static str,
    writes: Vec<W>,
    during: Option<(&'static str, Vec<W>)>,
}

fn round(name: &'static str, writes: &[W]) -> Round {
    Round {
        name,
        writes: writes.to_vec(),
        during: None,
    }
}

fn round_during(name: &'static str, writes: &[W], point: &'static str, during: &[W]) -> Round {
    Round {
        name,
        writes: writes.to_vec(),
        during: Some((point, during.to_vec())),
    }
}

/// A backup made by `run_rounds` and the chunk hashes of the disk it must restore to.
struct Made {
    round: &'static str,
    id: String,
    oracle: Vec<String>,
}

/// The chunk hashes of the disk as the guest reads it now. Hashing in a TCG guest is slow
/// (about 4 MiB/s), so only the chunks written since the last oracle (`dirty`) are read again,
/// the others carried over from `model`, unless `whole` (the last round): then every chunk is
/// read, and the ones nobody wrote must still be as they were.
fn oracle(
    disk: &GuestDisk,
    model: &mut Vec<String>,
    dirty: &BTreeSet<u64>,
    round: &str,
    whole: bool,
) -> Vec<String> {
    if whole {
        let now = disk.all_chunk_hashes();
        let changed: Vec<u64> = (0..DISK / CHUNK)
            .filter(|c| !dirty.contains(c) && now[*c as usize] != model[*c as usize])
            .collect();
        assert!(
            changed.is_empty(),
            "round {round:?}: the guest's disk changed in chunks {changed:?}, which nobody \
             wrote since they were last read (or, unwritten, are not zeros)"
        );
        *model = now;
    } else {
        for (c, h) in dirty.iter().zip(disk.chunk_hashes(dirty)) {
            model[*c as usize] = h;
        }
    }
    model.clone()
}

/// The entry of disk `target` in a `backup --json` result, which must be a success.
fn disk_read(run: &Run, target: &str) -> Value {
    assert_eq!(run.code, 0, "{}\n{}", run.json, run.stderr);
    run.json["results"][0]["backup"]["disks"]
        .as_array()
        .unwrap_or_else(|| panic!("no disks: {}", run.json))
        .iter()
        .find(|d| d["target"] == target)
        .cloned()
        .unwrap_or_else(|| panic!("no disk {target}: {}", run.json))
}

/// Checks how backup `id` read disk `vdb` (its `backup --json` entry `d`, and the same in its
/// manifest): the first backup (`prev` none) in full, the others incrementally from `prev`,
/// reading no more than twice the `dirty` chunks plus the spot checks. Returns bytes read.
fn check_read(
    place: &Place,
    what: &str,
    d: &Value,
    id: &str,
    prev: Option<&str>,
    dirty: &BTreeSet<u64>,
    full_at: &mut Option<String>,
) -> u64 {
    assert_eq!(
        d["bitmap"],
        format!("vmbackup-{id}").as_str(),
        "{what}: the disk's tracking bitmap: {d}"
    );
    let bytes_read = d["bytes_read"]
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: no bytes_read: {d}"));
    match prev {
        None => {
            assert_eq!(d["mode"], "full", "{what}: {d}");
            let reason = d["full_reason"].as_str().unwrap_or_default();
            assert!(reason.contains("first backup"), "{what}: full_reason: {d}");
            *full_at = Some(
                d["full_at"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{what}: no full_at: {d}"))
                    .to_string(),
            );
        }
        Some(prev) => {
            assert_eq!(
                (d["mode"].as_str(), d["based_on"].as_str()),
                (Some("incremental"), Some(prev)),
                "{what}: {d}"
            );
            assert_eq!(
                d["full_at"].as_str(),
                full_at.as_deref(),
                "{what}: full_at is the first backup's: {d}"
            );
            let bound = 2 * dirty.len() as u64 * CHUNK + SPOT;
            assert!(
                bytes_read <= bound,
                "{what}: read {bytes_read} bytes ({:.1} MiB) where {} chunks changed \
                 ({dirty:?}): at most {bound} ({} MiB) expected: {d}",
                bytes_read as f64 / MIB as f64,
                dirty.len(),
                bound / MIB
            );
        }
    }
    // The manifest records the same.
    let shown = vmbackup(place, &["show", id]);
    assert_eq!(shown.code, 0, "{what}: {}", shown.stderr);
    let read = shown.json["manifest"]["disks"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no disks shown: {}", shown.json))
        .iter()
        .find(|e| e["target"] == "vdb")
        .map(|e| e["read"].clone())
        .unwrap_or_default();
    for key in [
        "mode",
        "based_on",
        "full_reason",
        "bytes_read",
        "full_at",
        "bitmap",
    ] {
        assert_eq!(read[key], d[key], "{what}: show's {key}: {read} vs {d}");
    }
    bytes_read
}

/// Runs the rounds against disk `vdb` of the VM `target` backs up, checking after each
/// backup how the disk was read and that the backup restores to what the guest read.
fn run_rounds(place: &Place, disk: &GuestDisk, target: &Target, rounds: &[Round]) -> Vec<Made> {
    let mut made: Vec<Made> = Vec::new();
    // The chunks written since the last backup's snapshot instant (and its oracle).
    let mut dirty: BTreeSet<u64> = BTreeSet::new();
    let mut full_at: Option<String> = None;
    // The guest's view of the disk at the last oracle; at first the blank disk's: zeros (the
    // last round reads the whole disk, which checks this too).
    let zeros = vmbackup::digest::sha256_hex(&vec![0u8; CHUNK as usize]);
    let mut model: Vec<String> = vec![zeros; (DISK / CHUNK) as usize];
    for (i, r) in rounds.iter().enumerate() {
        let t0 = Instant::now();
        disk.write(&r.writes);
        dirty.extend(touched(&r.writes));
        let oracle = oracle(disk, &mut model, &dirty, r.name, i + 1 == rounds.len());
        let t1 = Instant::now();
        let args = [&["backup"][..], &target.args()].concat();
        let run = match &r.during {
            None => vmbackup(place, &args),
            Some((point, during)) => run_stopped_at(place, point, &args, || disk.write(during)),
        };
        let t2 = Instant::now();
        let d = disk_read(&run, "vdb");
        let id = run.json["results"][0]["backup"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no backup id: {}", r.name, run.json))
            .to_string();
        let what = format!("round {:?} (backup {id})", r.name);

        let bytes_read = check_read(
            place,
            &what,
            &d,
            &id,
            made.last().map(|m| m.id.as_str()),
            &dirty,
            &mut full_at,
        );

        // Only the newest backup's bitmap is kept, and it records.
        assert_eq!(
            disk.guest.tracking_bitmaps(),
            [format!("vmbackup-{id}")],
            "{what}: the VM's vmbackup bitmaps"
        );
        // The backup holds the disk exactly as the guest read it before the backup.
        assert_restores_to(place, &id, &oracle, &what);
        let t3 = Instant::now();
        eprintln!(
            "{what}: {} read {:.1} MiB of {} dirty chunks; writes+oracle {:.1}s, backup \
             {:.1}s, checks {:.1}s",
            d["mode"],
            bytes_read as f64 / MIB as f64,
            dirty.len(),
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64()
        );
        dirty = match &r.during {
            Some((_, during)) => touched(during),
            None => BTreeSet::new(),
        };
        made.push(Made {
            round: r.name,
            id,
            oracle,
        });
    }
    made
}

/// Deletes backups `delete` (indexes into `made`), collects garbage, and checks that the
/// others are listed and still restore to their oracles.
fn delete_gc_and_check_the_rest(place: &Place, made: &[Made], delete: &[usize]) {
    for &i in delete {
        let r = vmbackup(place, &["delete", &made[i].id]);
        assert_eq!(r.code, 0, "delete {}: {}", made[i].id, r.stderr);
    }
    let g = vmbackup(place, &["gc"]);
    assert_eq!(g.code, 0, "gc: {}", g.stderr);
    let listed = vmbackup(place, &["list"]);
    let mut ids: Vec<String> = listed.json["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut kept: Vec<String> = (0..made.len())
        .filter(|i| !delete.contains(i))
        .map(|i| made[i].id.clone())
        .collect();
    kept.sort();
    assert_eq!(ids, kept, "{}", listed.json);
    for (i, m) in made.iter().enumerate() {
        if !delete.contains(&i) {
            let what = format!("after delete and gc, round {:?}", m.round);
            assert_restores_to(place, &m.id, &m.oracle, &what);
        }
    }
}

/// The rounds of the multi-round tests: the first fills regions, then writes straddle a chunk
/// boundary, land in never-written regions, overwrite, write zeros, discard, and are made
/// during a backup's copy and during its commit.
fn many_rounds() -> Vec<Round> {
    vec![
        round(
            "first: scattered data",
            &[
                rnd(0, 4 * BLOCK),
                rnd(10 * MIB, 8 * BLOCK),
                rnd(30 * MIB + BLOCK, 2 * BLOCK),
                rnd(56 * MIB, 4 * BLOCK),
                rnd(60 * MIB + 8 * BLOCK, 8 * BLOCK),
            ],
        ),
        round(
            "straddle a chunk boundary, new regions, an overwrite",
            &[
                rnd(8 * MIB - 2 * BLOCK, 4 * BLOCK),
                rnd(20 * MIB, BLOCK),
                rnd(10 * MIB + 8 * BLOCK, 2 * BLOCK),
                rnd(DISK - BLOCK, BLOCK),
            ],
        ),
        round_during(
            "discard and zeros; writes during the copy",
            &[trim(60 * MIB, 2 * MIB), zeros(0, 8 * BLOCK)],
            "backup-copy",
            &[rnd(40 * MIB, 2 * BLOCK), rnd(10 * MIB, BLOCK)],
        ),
        round_during(
            "a new region; writes during the commit",
            &[rnd(44 * MIB, BLOCK)],
            "commit-started",
            &[rnd(52 * MIB - BLOCK, 2 * BLOCK), trim(56 * MIB, MIB)],
        ),
        round("after the commit: one block", &[rnd(2 * MIB, BLOCK)]),
    ]
}

/// A libvirt VM with a blank 64 MiB qcow2 data disk `vdb` (`discard='unmap'`).
fn libvirt_vm(hint: &str) -> TestVm {
    TestVmBuilder::new(hint)
        .blank_disk("vdb", Format::Qcow2, DISK)
        .start()
        .expect("guest boots")
}

#[test]
fn libvirt_incremental_backups_over_many_rounds_restore_what_the_guest_saw() {
    let start = Instant::now();
    let vm = libvirt_vm("inc-rounds");
    let place = Place::new();
    let disk = GuestDisk::find(Guest::Libvirt(&vm), "vdb");
    let target = Target {
        args: vec![vm.name().to_string()],
    };
    let made = run_rounds(&place, &disk, &target, &many_rounds());
    // The first (full) backup, one made with writes during its copy and the one the last
    // backup is based on go; the others must still restore whole.
    delete_gc_and_check_the_rest(&place, &made, &[0, 2, 3]);
    eprintln!("libvirt rounds: {:.1}s", start.elapsed().as_secs_f64());
}

#[test]
fn plain_qemu_incremental_backups_over_rounds_restore_what_the_guest_saw() {
    let start = Instant::now();
    let place = Place::new();
    let image = place.dir.path().join("vdb.qcow2");
    make_disk(
        &image,
        &DiskSpec {
            target: "vdb".into(),
            format: Format::Qcow2,
            size: DISK,
            ext4: false,
            fill_from: None,
        },
    )
    .unwrap();
    let t = TestQemu::start("inc-qemu", &[(image, "qcow2")], Duration::from_secs(180))
        .expect("plain QEMU guest boots");
    let disk = GuestDisk::find(Guest::Qemu(t.qemu()), "vdb");
    let target = Target {
        args: vec![
            "--qemu-dir".into(),
            t.dir().to_string_lossy().into_owned(),
            format!("qemu:{}", t.name()),
        ],
    };
    let rounds = vec![
        round(
            "first: scattered data",
            &[rnd(0, 4 * BLOCK), rnd(40 * MIB, 4 * BLOCK)],
        ),
        round_during(
            "straddle, a new region, an overwrite; writes during the copy",
            &[
                rnd(4 * MIB - BLOCK, 2 * BLOCK),
                rnd(20 * MIB, BLOCK),
                rnd(41 * MIB, BLOCK),
            ],
            "backup-copy",
            &[rnd(28 * MIB, BLOCK), zeros(0, BLOCK)],
        ),
        round_during(
            "a discard; writes during the commit",
            &[rnd(60 * MIB, BLOCK), trim(40 * MIB, 4 * BLOCK)],
            "commit-started",
            &[rnd(12 * MIB - BLOCK, 2 * BLOCK)],
        ),
        round("after the commit: one block", &[rnd(33 * MIB, BLOCK)]),
    ];
    let made = run_rounds(&place, &disk, &target, &rounds);
    delete_gc_and_check_the_rest(&place, &made, &[0, 1]);
    eprintln!("plain QEMU rounds: {:.1}s", start.elapsed().as_secs_f64());
}

#[test]
fn an_unchanged_running_vm_reads_only_the_spot_checks() {
    let start = Instant::now();
    let vm = libvirt_vm("inc-unchanged");
    let place = Place::new();
    let disk = GuestDisk::find(Guest::Libvirt(&vm), "vdb");
    let target = Target {
        args: vec![vm.name().to_string()],
    };
    let rounds = vec![
        round("first", &[rnd(0, 4 * BLOCK), rnd(24 * MIB, 8 * BLOCK)]),
        round("unchanged", &[]),
        round("still unchanged", &[]),
    ];
    let made = run_rounds(&place, &disk, &target, &rounds);
    assert_eq!(made[1].oracle, made[0].oracle);
    eprintln!("unchanged: {:.1}s", start.elapsed().as_secs_f64());
}
