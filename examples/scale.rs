//! `scripts/bench scale`: a synthetic repository of SCALE_CHUNKS chunks (default 1,000,000)
//! and SCALE_BACKUPS backups (default 10,000), generated without VMs, then `list`, `verify
//! --metadata` and `gc` of the real binary on it, each timed with its peak memory (GNU time).
//!
//! Backup `i` has one disk of SCALE_PER_BACKUP chunks (default 1,000), chunks `i * step ..`,
//! `step` about chunks / backups, so neighbours share most of their chunks as successive
//! backups of one VM do, and (nearly) every chunk is used. Chunks hold 64 bytes each (the cost of a
//! repository's metadata operations does not depend on chunk sizes). Before `gc`, the first
//! 1% of the backups are deleted, which leaves their chunks that no later backup uses for gc to
//! remove. Environment: BENCH_DIR (default /var/tmp/vmbackup-bench), BENCH_VMBACKUP.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use vmbackup::repository::chunk::{self, Digest};
use vmbackup::repository::disk::DiskIndex;
use vmbackup::repository::manifest::{DiskEntry, Manifest};
use vmbackup::repository::storage::ObjectStore;
use vmbackup::repository::{RepoError, Repository};

/// Files below a folder, written without fsync: a generator's store, not a repository's.
struct Unsynced(PathBuf);

impl Unsynced {
    fn write(&self, name: &str, data: &[u8]) -> vmbackup::repository::Result<()> {
        let path = self.0.join(name);
        let io = |source| RepoError::Io {
            what: "write",
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        std::fs::write(&path, data).map_err(io)
    }
}

impl ObjectStore for Unsynced {
    fn put(&self, name: &str, data: &[u8]) -> vmbackup::repository::Result<()> {
        self.write(name, data)
    }
    fn put_new(&self, name: &str, data: &[u8]) -> vmbackup::repository::Result<()> {
        self.write(name, data)
    }
    fn put_unsynced(&self, name: &str, data: &[u8]) -> vmbackup::repository::Result<()> {
        self.write(name, data)
    }
    fn sync(&self) -> vmbackup::repository::Result<()> {
        Ok(())
    }
    fn forget_unsynced(&self) {}
    fn remove_temporaries(&self) -> vmbackup::repository::Result<usize> {
        Ok(0)
    }
    fn get(&self, name: &str) -> vmbackup::repository::Result<Vec<u8>> {
        std::fs::read(self.0.join(name)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => RepoError::NotFound(name.to_string()),
            _ => RepoError::Io {
                what: "read",
                path: self.0.join(name),
                source: e,
            },
        })
    }
    fn exists(&self, name: &str) -> vmbackup::repository::Result<bool> {
        Ok(self.0.join(name).exists())
    }
    fn list(&self, _prefix: &str) -> vmbackup::repository::Result<Vec<String>> {
        unimplemented!("the generator never lists")
    }
    fn delete(&self, name: &str) -> vmbackup::repository::Result<()> {
        std::fs::remove_file(self.0.join(name)).map_err(|source| RepoError::Io {
            what: "delete",
            path: self.0.join(name),
            source,
        })
    }
}

/// How far apart the chunk ranges of successive backups start: the last one ends at or before
/// the last chunk.
fn step(chunks: usize, backups: usize, per_backup: usize) -> usize {
    (chunks - per_backup) / (backups - 1).max(1)
}

fn env_num(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

fn chunk_payload(i: usize) -> [u8; 64] {
    let mut p = [0u8; 64];
    for (k, b) in p.chunks_mut(8).enumerate() {
        b.copy_from_slice(&((i as u64) ^ ((k as u64) << 56)).to_le_bytes());
    }
    p
}

/// Generates the repository in `dir`; returns how long it took, in seconds.
fn generate(dir: &Path, chunks: usize, backups: usize, per_backup: usize) -> Result<f64> {
    let t = Instant::now();
    // The repository's config, as `vmbackup` makes it.
    drop(Repository::open(dir)?);
    let repo = Repository::open_with(dir, Box::new(Unsynced(dir.to_path_buf())))?;
    let digests: Vec<Digest> = (0..chunks)
        .map(|i| chunk::digest(&chunk_payload(i)))
        .collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= chunks {
                            return Ok(());
                        }
                        let name = chunk::object_name(&digests[i]);
                        repo.store().put(&name, &chunk::encode(&chunk_payload(i)))?;
                        if i % 100_000 == 99_999 {
                            eprintln!("scale: {} chunks written", i + 1);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("a generator thread panicked")?;
        }
        Ok(())
    })?;
    let step = step(chunks, backups, per_backup);
    let chunk_size = 4u64 << 20;
    for b in 0..backups {
        let id = format!("scale-{b:06}");
        let index = DiskIndex {
            chunk_size,
            virtual_size: chunk_size * per_backup as u64,
            chunks: (0..per_backup)
                .map(|k| Some(digests[b * step + k]))
                .collect(),
        };
        let index_object = repo.put_index(&id, "vda", &index)?;
        let domain_xml_object = repo.put_domain_xml(&id, "<domain/>")?;
        let at = jiff::Timestamp::from_second(1_767_225_600 + 3600 * b as i64)?;
        repo.publish(&Manifest {
            format_version: 1,
            id: id.clone(),
            vm_name: format!("vm{}", b % 100),
            vm_uuid: format!("00000000-0000-4000-8000-{:012}", b % 100),
            started_at: at.to_string(),
            ended_at: at.to_string(),
            consistency: "application".into(),
            consistency_reason: None,
            freeze_ms: Some(10),
            vcpus: 1,
            memory_bytes: 1 << 30,
            disks: vec![DiskEntry {
                target: "vda".into(),
                format: "qcow2".into(),
                virtual_size: index.virtual_size,
                allocated_size: index.virtual_size,
                source: format!("/var/lib/libvirt/images/vm{}.qcow2", b % 100),
                chunk_size,
                index_object,
                logical_bytes: index.virtual_size,
                stored_bytes: 64 * step as u64,
                read: None,
            }],
            nics: vec![],
            domain_xml_object,
            schedule: None,
            scheduled_for: None,
            tags: Vec::new(),
            stored_bytes: step as u64 * 64,
            logical_bytes: index.virtual_size,
            vm_state: None,
        })?;
    }
    Ok(t.elapsed().as_secs_f64())
}

struct Measured {
    secs: f64,
    peak_kib: u64,
    stdout: String,
}

/// Runs `vmbackup --json ARGS` on the repository under GNU time; fails unless it exits 0.
fn measure(vmbackup: &str, base: &Path, args: &[&str]) -> Result<Measured> {
    let times = base.join("time.txt");
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%e %M")
        .arg("-o")
        .arg(&times)
        .arg(vmbackup)
        .arg("--repo")
        .arg(base.join("repo"))
        .arg("--state-dir")
        .arg(base.join("state"))
        .arg("--json")
        .args(args)
        .output()
        .context("run /usr/bin/time (GNU time)")?;
    if !out.status.success() {
        bail!(
            "vmbackup {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let t = std::fs::read_to_string(&times)?;
    let mut f = t.split_whitespace();
    let secs = f.next().context("GNU time's output")?.parse()?;
    let peak_kib = f.next().context("GNU time's output")?.parse()?;
    Ok(Measured {
        secs,
        peak_kib,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

fn main() -> Result<()> {
    let chunks = env_num("SCALE_CHUNKS", 1_000_000)?;
    let backups = env_num("SCALE_BACKUPS", 10_000)?;
    let per_backup = env_num("SCALE_PER_BACKUP", 1_000)?.min(chunks);
    if backups == 0 || chunks == 0 {
        bail!("SCALE_CHUNKS and SCALE_BACKUPS must be at least 1");
    }
    let base = PathBuf::from(
        std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp/vmbackup-bench".into()),
    )
    .join("scale");
    let vmbackup = match std::env::var("BENCH_VMBACKUP") {
        Ok(b) => b,
        Err(_) => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("cannot tell where the vmbackup binary is")?
            .join("vmbackup")
            .to_string_lossy()
            .into_owned(),
    };
    if base.exists() {
        std::fs::remove_dir_all(&base)?;
    }
    std::fs::create_dir_all(&base)?;
    let result = run(&base, &vmbackup, chunks, backups, per_backup);
    let _ = std::fs::remove_dir_all(&base);
    result
}

fn run(
    base: &Path,
    vmbackup: &str,
    chunks: usize,
    backups: usize,
    per_backup: usize,
) -> Result<()> {
    eprintln!("scale: generating {chunks} chunks and {backups} backups of {per_backup} chunks");
    let gen = generate(&base.join("repo"), chunks, backups, per_backup)?;
    eprintln!("scale: generated in {gen:.0} s");
    let list = measure(vmbackup, base, &["list"])?;
    let listed: serde_json::Value = serde_json::from_str(&list.stdout)?;
    let n = listed["backups"].as_array().map_or(0, Vec::len);
    if n != backups {
        bail!("list shows {n} backups, not {backups}");
    }
    let verify = measure(vmbackup, base, &["verify", "--metadata"])?;
    let v: serde_json::Value = serde_json::from_str(&verify.stdout)?;
    if v["ok"] != true || v["backups"].as_array().map_or(0, Vec::len) != backups {
        bail!("verify --metadata did not find every backup intact");
    }
    let deleted = (backups / 100).max(1);
    for b in 0..deleted {
        let m = measure(vmbackup, base, &["delete", &format!("scale-{b:06}")])?;
        drop(m);
    }
    let gc = measure(vmbackup, base, &["gc"])?;
    let g: serde_json::Value = serde_json::from_str(&gc.stdout)?;
    // What gc must free: the chunks no remaining backup uses.
    let step = step(chunks, backups, per_backup);
    let mut used = vec![false; chunks];
    for b in deleted..backups {
        for k in 0..per_backup {
            used[b * step + k] = true;
        }
    }
    let expect_removed = used.iter().filter(|u| !**u).count() as u64;
    let removed = g["gc"]["removed_chunks"].as_u64().unwrap_or(0);
    if removed != expect_removed {
        bail!("gc removed {removed} chunks, not {expect_removed}: {g}");
    }
    let mib = |k: u64| k as f64 / 1024.0;
    println!("| operation ({chunks} chunks, {backups} backups) | seconds | peak memory |");
    println!("|---|---|---|");
    println!("| generate (no fsync) | {gen:.0} | |");
    for (what, m) in [
        ("`list`".to_string(), &list),
        ("`verify --metadata`".to_string(), &verify),
        (
            format!("`gc` (after {deleted} deletes: {removed} chunks freed)"),
            &gc,
        ),
    ] {
        println!("| {what} | {:.1} | {:.0} MiB |", m.secs, mib(m.peak_kib));
    }
    let limit_kib = 512 * 1024;
    println!(
        "gc peak memory {:.0} MiB: {} the 512 MiB target",
        mib(gc.peak_kib),
        if gc.peak_kib < limit_kib {
            "under"
        } else {
            "OVER"
        }
    );
    if gc.peak_kib >= limit_kib {
        bail!("gc took {:.0} MiB", mib(gc.peak_kib));
    }
    Ok(())
}
