//! `scripts/soak [ITERATIONS]`: the opt-in soak test of issue 13. One throwaway libvirt VM
//! with two data disks (qcow2 and raw) and a guest that keeps writing; each iteration writes a
//! file in the guest, starts a backup (or, every few iterations, a delete or a gc) that a fail
//! point chosen at random breaks (SIGKILL of the process group, SIGKILL of the process alone,
//! or a panic), writes another file in the guest while the run is dead, then finishes it with
//! `recover` or with the next `backup` (chosen at random) and checks the invariants:
//! the finishing command exits 0; the VM's live and inactive definitions are on its images, no
//! block job, no overlay or temporary beside the images, the guest thawed; both files read back
//! in the guest; `list` is clean, `verify` passes, `gc` runs and leaves no temporary and no
//! backup folder without a manifest. At the end a last backup is restored from the repository
//! and every file the guest wrote in every iteration is read out of the restored disk images.
//!
//! Prints one line per iteration and a summary; exits 1 at the first invariant violation
//! (with the run's log), 0 when every iteration held.
//!
//! Environment: SOAK_SEED (the random seed, printed at the start, to replay a run),
//! SOAK_VMBACKUP (the binary, built with the `fault-injection` feature; default
//! target/debug/vmbackup), SOAK_KEEP (backups kept, default 4).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmbackup::repository::disk::{restore_disk, DiskIndex};
use vmbackup::repository::Repository;
use vmbackup_testkit::cli::{run_json, Place, Run};
use vmbackup_testkit::faults::{repo_violations, vm_violations, FaultRun, Reached};
use vmbackup_testkit::libvirt_vm::{Format, TestVm, TestVmBuilder};

const MIB: u64 = 1 << 20;

/// A small xorshift generator: enough to pick cases, and replayable from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

/// The fail points a backup reaches, with the hits worth breaking at.
const BACKUP_POINTS: &[(&str, &[u32])] = &[
    ("backup-locked", &[1]),
    ("backup-overlays-created", &[1]),
    ("backup-snapshot", &[1]),
    ("backup-snapshot-done", &[1]),
    ("backup-copy", &[1]),
    ("backup-chunk-written", &[1, 2, 3]),
    ("backup-published-index", &[1, 2]),
    ("backup-between-disks", &[1]),
    ("backup-before-manifest-rename", &[1]),
    ("backup-published", &[1]),
    ("commit-started", &[1, 2]),
    ("commit-ready", &[1, 2]),
    ("commit-pivoted", &[1, 2]),
    ("commit-before-inactive-xml", &[1]),
    ("commit-before-overlay-unlink", &[1]),
    ("backup-committed", &[1]),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum How {
    /// SIGKILL of the whole process group.
    KillGroup,
    /// SIGKILL of the process alone.
    KillProcess,
    /// A panic at the point (unwinding: guards and `Drop` run).
    Panic,
}

struct Soak {
    binary: PathBuf,
    place: Place,
    vm: TestVm,
    images: Vec<String>,
    rng: Rng,
    keep: usize,
    /// Every file the guest wrote: path in the guest -> content.
    written: BTreeMap<String, String>,
}

fn fail(what: String) -> anyhow::Error {
    anyhow::anyhow!(what)
}

impl Soak {
    fn run(&self, args: &[&str]) -> Run {
        run_json(&self.binary, &self.place.repo(), &self.place.state(), args)
    }

    fn guest_write(&mut self, path: &str) -> Result<()> {
        let content = format!("{:016x}\n", self.rng.next());
        self.vm
            .write_file(path, content.as_bytes())
            .with_context(|| format!("guest write {path}"))?;
        self.vm.sh("sync").context("guest sync")?;
        self.written.insert(path.to_string(), content);
        Ok(())
    }

    fn backups(&self) -> Result<Vec<String>> {
        let l = self.run(&["list"]);
        if l.code != 0 {
            bail!("list exit {}: {}", l.code, l.stderr);
        }
        Ok(l.json["backups"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|b| b["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// One iteration; returns what it did, for the log line.
    fn iteration(&mut self, i: u32) -> Result<String> {
        self.guest_write(&format!("/mnt/vdb/w-{i}"))?;
        let before = self.backups()?;
        let how = *self
            .rng
            .pick(&[How::KillGroup, How::KillGroup, How::KillProcess, How::Panic]);
        // Mostly backups; every few iterations a delete (of the oldest) or a gc.
        let (args, point, hit): (Vec<String>, &str, u32) = match self.rng.below(10) {
            0 if !before.is_empty() => (
                vec!["delete".into(), before[0].clone()],
                "prune-deleted-one",
                1,
            ),
            1 => (vec!["gc".into()], "gc-deleted-some", 1),
            _ => {
                let (p, hits) = *self.rng.pick(BACKUP_POINTS);
                let quiesce = *self.rng.pick(&["required", "preferred", "off"]);
                (
                    vec![
                        "backup".into(),
                        self.vm.name().to_string(),
                        "--quiesce".into(),
                        quiesce.into(),
                    ],
                    p,
                    *self.rng.pick(hits),
                )
            }
        };
        let action = if how == How::Panic { "panic" } else { "kill" };
        let spec = format!("{point}={action}@{hit}");
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut run = FaultRun::start(&self.binary, &self.place, &argv, &spec, &[]);
        let reached = run.wait_marker(Duration::from_secs(300));
        let outcome = match (&reached, how) {
            (Reached::Point(_), How::KillGroup) => {
                run.kill_group();
                "killed (group)".to_string()
            }
            (Reached::Point(_), _) => {
                run.signal(nix::sys::signal::Signal::SIGKILL);
                run.wait(Duration::from_secs(30));
                "killed (process)".to_string()
            }
            (Reached::Exited(code), How::Panic) if run.stderr().contains("fail point") => {
                format!("panicked, exit {code}")
            }
            (Reached::Exited(code), _) => format!("not reached, exit {code}"),
        };
        let log = run.stderr();
        drop(run);
        // What the guest writes while the run is dead (or done) must survive the finish.
        self.guest_write(&format!("/mnt/vdb/k-{i}"))?;
        let finisher = if self.rng.below(2) == 0 {
            "recover"
        } else {
            "backup"
        };
        let fin = match finisher {
            "recover" => self.run(&["recover", self.vm.name()]),
            _ => self.run(&["backup", self.vm.name()]),
        };
        let head = format!("{} {spec} ({how:?}): {outcome}; {finisher}", args[0]);
        if fin.code != 0 {
            bail!(
                "{head}: exit {}\n{}\n--- the broken run's log:\n{log}",
                fin.code,
                fin.stderr
            );
        }
        let mut bad = vm_violations(&self.vm, &self.images);
        for (path, content) in [
            (
                format!("/mnt/vdb/w-{i}"),
                &self.written[&format!("/mnt/vdb/w-{i}")],
            ),
            (
                format!("/mnt/vdb/k-{i}"),
                &self.written[&format!("/mnt/vdb/k-{i}")],
            ),
        ] {
            match self.vm.read_file(&path) {
                Ok(b) if b == content.as_bytes() => {}
                Ok(b) => bad.push(format!("{path} reads {b:?} in the guest")),
                Err(e) => bad.push(format!("{path}: {e}")),
            }
        }
        let (ids, repo_bad) = repo_violations(&self.binary, &self.place);
        bad.extend(repo_bad);
        // A backup that appeared is a complete one (verify above); none disappeared except
        // by the delete.
        for id in &before {
            if !ids.contains(id) && args[0] != "delete" {
                bad.push(format!("backup {id} disappeared"));
            }
        }
        if !bad.is_empty() {
            return Err(fail(format!(
                "{head}: invariants violated:\n  {}\n--- the broken run's log:\n{log}\n--- the finish:\n{}",
                bad.join("\n  "),
                fin.stderr
            )));
        }
        // Retention: keep the newest few.
        if ids.len() > self.keep {
            let d = self.run(&["delete", &ids[0]]);
            if d.code != 0 {
                bail!("delete {}: exit {}: {}", ids[0], d.code, d.stderr);
            }
        }
        Ok(format!("{head}: ok ({} backups)", ids.len()))
    }

    /// A last backup, restored from the repository: every file the guest ever wrote is in it.
    fn final_check(&self) -> Result<usize> {
        let b = self.run(&["backup", self.vm.name()]);
        if b.code != 0 {
            bail!("final backup: exit {}: {}", b.code, b.stderr);
        }
        let id = b.json["results"][0]["backup"]["id"]
            .as_str()
            .context("final backup id")?
            .to_string();
        let v = self.run(&["verify"]);
        if v.code != 0 {
            bail!("final verify: exit {}: {}", v.code, v.json);
        }
        let repo = Repository::open(&self.place.repo())?;
        let m = repo.load(&id)?;
        let d = m
            .disks
            .iter()
            .find(|d| d.target == "vdb")
            .context("vdb in the backup")?;
        let index = DiskIndex::decode(&repo.store().get(&d.index_object)?)?;
        let out = self.place.dir.path().join("final-vdb.raw");
        restore_disk(&repo, &index, &out, 2, &|_, _| {})?;
        let mut checked = 0;
        for (path, content) in &self.written {
            let inside = path.strip_prefix("/mnt/vdb").context("a vdb path")?;
            let got = Command::new("debugfs")
                .arg("-R")
                .arg(format!("cat {inside}"))
                .arg(&out)
                .output()
                .context("run debugfs")?;
            if got.stdout != content.as_bytes() {
                bail!(
                    "{path}: the restored disk holds {:?}, the guest wrote {content:?}",
                    String::from_utf8_lossy(&got.stdout)
                );
            }
            checked += 1;
        }
        let _ = std::fs::remove_file(&out);
        Ok(checked)
    }
}

fn main() -> Result<()> {
    let iterations: u32 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("ITERATIONS: a number")?
        .unwrap_or(300);
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    let binary = std::env::var_os("SOAK_VMBACKUP")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/debug/vmbackup"));
    if !Path::new(&binary).exists() {
        bail!("no vmbackup binary at {}", binary.display());
    }
    let keep = std::env::var("SOAK_KEEP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    println!("soak: {iterations} iterations, seed {seed}");
    let vm = TestVmBuilder::new("soak")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .disk("vdc", Format::Raw, 32 * MIB)
        .start()
        .context("start the soak VM")?;
    let images = vm
        .disk_paths()
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let mut soak = Soak {
        binary,
        place: Place::new(),
        vm,
        images,
        rng: Rng(seed),
        keep,
        written: BTreeMap::new(),
    };
    let started = Instant::now();
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for i in 1..=iterations {
        let t = Instant::now();
        match soak.iteration(i) {
            Ok(line) => {
                let kind = if line.contains("not reached") {
                    "not reached"
                } else if line.contains("panicked") {
                    "panicked"
                } else {
                    "killed"
                };
                *counts.entry(kind.to_string()).or_default() += 1;
                println!("{i:4} {:5.1}s {line}", t.elapsed().as_secs_f64());
            }
            Err(e) => {
                println!("{i:4} FAILED (seed {seed}): {e:#}");
                std::process::exit(1);
            }
        }
    }
    let checked = soak.final_check()?;
    println!(
        "soak: {iterations} iterations in {:.0} s, 0 invariant violations; {counts:?}; \
         every backup verifies; {checked} guest files read back from the last backup (seed {seed})",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
