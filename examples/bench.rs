//! `scripts/bench backup`: vmbackup against virtnbdbackup (the peer HOST.md names) and
//! `qemu-img convert` on the same running VM, measured alternately in the same run.
//!
//! The VM: 2 disks of 4 GiB virtual each; one holds 1 GiB of random data and 512 MiB of
//! repetitive text. Each round runs, in turn, `vmbackup backup` into a fresh repository,
//! `virtnbdbackup -l full` into a fresh folder, and `qemu-img convert -O qcow2` of both images.
//! Prints the medians, the ratios, the median freeze, the peak RSS of each tool, the bytes
//! stored, and the bytes a second backup of the unchanged VM adds. Each round also measures
//! two floors: `dd` writing as many bytes as vmbackup stored, with an fsync (the disk's cost
//! of making them durable), and the guest agent freezing and thawing with nothing in between
//! (the guest's own cost of a freeze); and `sync` after virtnbdbackup, which never fsyncs.
//!
//! `scripts/bench incremental`: on the same VM, vmbackup's incremental backup after the guest
//! rewrote 32 MiB against a full backup and against `virtnbdbackup -l inc` (see
//! `bench_incremental`).
//!
//! Environment: BENCH_ROUNDS (default 3), BENCH_DIR (default /var/tmp/vmbackup-bench),
//! BENCH_VMBACKUP (path of the vmbackup binary; default the one beside this example's folder,
//! target/release/vmbackup).

use std::io::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmbackup_testkit::libvirt_vm::{DiskSpec, Format, TestVmBuilder};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Wall time and peak RSS of one child process.
struct Measured {
    secs: f64,
    max_rss_kib: u64,
    stdout: String,
}

/// Runs a program (no shell) and measures it with `wait4`, which reports the peak RSS of
/// exactly that child.
fn measure(program: &str, args: &[&str]) -> Result<Measured> {
    // Every tool starts on a quiet page cache: what the previous tool left dirty is written
    // out first, untimed, so that nobody pays for another's writes (vmbackup's syncfs would).
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let start = Instant::now();
    let out_path = std::env::temp_dir().join(format!("bench-out-{}", std::process::id()));
    let out_file = std::fs::File::create(&out_path)?;
    let child = Command::new(program)
        .args(args)
        .stdout(out_file)
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .with_context(|| format!("start {program}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is a plain C struct for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet waited for (`child` is never waited through
    // std); `status` and `usage` are valid, writable and live for the whole call.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if rc != pid {
        bail!("wait4 {program}: {}", std::io::Error::last_os_error());
    }
    std::mem::forget(child);
    let secs = start.elapsed().as_secs_f64();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let st = std::process::ExitStatus::from_raw(status);
    if !st.success() {
        bail!("{program} {} failed: {st}\n{stdout}", args.join(" "));
    }
    Ok(Measured {
        secs,
        max_rss_kib: usage.ru_maxrss as u64,
        stdout,
    })
}

/// Removes every object under `prefix` of the Garage test bucket.
fn empty_prefix(garage: &vmbackup_testkit::garage::Garage, prefix: &str) -> Result<()> {
    use vmbackup::repository::storage::ObjectStore;
    let store = garage.store(prefix);
    for name in store.list("")? {
        store.delete(&name)?;
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                total += dir_bytes(&e.path());
            } else {
                use std::os::unix::fs::MetadataExt;
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// The disk's floor for making `bytes` durable: `dd` of that many bytes into a new file of
/// the benchmark folder, with an fsync at the end.
fn write_floor(base: &Path, bytes: u64) -> Result<Measured> {
    let floor = base.join("floor");
    let count = bytes.div_ceil(4 << 20).max(1).to_string();
    let m = measure(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", floor.display()),
            "bs=4M",
            &format!("count={count}"),
            "conv=fsync",
            "status=none",
        ],
    )?;
    let _ = std::fs::remove_file(&floor);
    Ok(m)
}

/// The guest's own cost of a freeze: the agent freezes and at once thaws all filesystems
/// (through libvirt, nothing in between), after the guest has been idle for a second as it
/// is before a backup. No backup tool can freeze for less.
fn guest_freeze_floor(vm: &vmbackup_testkit::libvirt_vm::TestVm) -> Result<f64> {
    std::thread::sleep(Duration::from_secs(1));
    let start = Instant::now();
    let frozen = vmbackup::guest_agent::freeze(vm.dom(), Duration::from_secs(10))?;
    frozen.thaw()?;
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

/// Removes vmbackup's checkpoints (and their bitmaps) from the VM: virtnbdbackup refuses to
/// run, full or incremental, on a domain with a checkpoint it did not make.
fn forget_vmbackup_checkpoints(vm: &vmbackup_testkit::libvirt_vm::TestVm) -> Result<()> {
    for name in vm.dom().checkpoints()? {
        if name.starts_with(vmbackup::hypervisor::BITMAP_PREFIX) {
            vm.dom().checkpoint_delete(&name, false)?;
        }
    }
    Ok(())
}

fn fresh(dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    Ok(())
}

fn make_fill(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    // 1 GiB that does not compress (xorshift output), 512 MiB that does (repeated text).
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("random.bin"))?);
    let mut x: u64 = 0x2545F4914F6CDD1D;
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..1024 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    let mut t = std::io::BufWriter::new(std::fs::File::create(dir.join("text.log"))?);
    let line =
        b"2026-11-22T10:00:00Z INFO request served path=/api/v1/items status=200 bytes=5120\n";
    let mut written = 0u64;
    while written < 512 * MIB {
        t.write_all(line)?;
        written += line.len() as u64;
    }
    t.flush()?;
    Ok(())
}

/// `--json --repo REPO --state-dir STATE EXTRA...`
fn repo_args(repo: &str, state: &str, extra: &[&str]) -> Vec<String> {
    ["--json", "--repo", repo, "--state-dir", state]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

/// `measure` with arguments built as `String`s (`repo_args`).
fn measure_args(program: &str, args: &[String]) -> Result<Measured> {
    measure(
        program,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}

/// A fresh repository and state folder under `base`, and a first backup of `vm` in it
/// (vmbackup's checkpoint then forgotten, for the peers): the folders and the backup's id.
fn first_backup(
    vm: &vmbackup_testkit::libvirt_vm::TestVm,
    base: &Path,
    vmbackup: &str,
) -> Result<(PathBuf, PathBuf, String)> {
    let repo = base.join("repo");
    let state = base.join("state");
    fresh(&repo)?;
    fresh(&state)?;
    let id = backed_up(
        vmbackup,
        repo.to_str().unwrap(),
        state.to_str().unwrap(),
        vm.name(),
    )?;
    forget_vmbackup_checkpoints(vm)?;
    Ok((repo, state, id))
}

/// Backs VM `name` up into `repo` (timed like every run) and returns the backup's id.
fn backed_up(vmbackup: &str, repo: &str, state: &str, name: &str) -> Result<String> {
    let args = repo_args(repo, state, &["backup", name]);
    let m = measure_args(vmbackup, &args)?;
    let v: serde_json::Value = serde_json::from_str(m.stdout.trim())?;
    Ok(v["results"][0]["backup"]["id"]
        .as_str()
        .context("backup id")?
        .to_string())
}

/// `vmbackup restore` of the benchmark VM against `virtnbdrestore` of a full backup of the
/// same VM, alternating; the VM is shut off, as both tools require.
fn bench_restore(
    vm: &vmbackup_testkit::libvirt_vm::TestVm,
    base: &Path,
    vmbackup: &str,
    rounds: usize,
    allocated: u64,
) -> Result<()> {
    let name = vm.name();
    let (repo, state, id) = first_backup(vm, base, vmbackup)?;
    let (repo_s, state_s) = (repo.to_str().unwrap(), state.to_str().unwrap());
    let common = |extra: &[&str]| repo_args(repo_s, state_s, extra);
    // The same backup in the loopback Garage bucket, restored in each round too.
    let garage = vmbackup_testkit::garage::Garage::get();
    let prefix = format!("bench-restore-{}", std::process::id());
    let s3 = format!("s3://{}/{prefix}", vmbackup_testkit::garage::BUCKET);
    let s3_common = |extra: &[&str]| repo_args(&s3, state_s, extra);
    let s3_id = backed_up(vmbackup, &s3, state_s, name)?;
    forget_vmbackup_checkpoints(vm)?;
    let vnb = base.join("virtnbdbackup");
    let _ = std::fs::remove_dir_all(&vnb);
    measure(
        "virtnbdbackup",
        &[
            "-U",
            "qemu:///system",
            "-d",
            name,
            "-l",
            "full",
            "-o",
            vnb.to_str().unwrap(),
        ],
    )?;
    vm.shutdown(Duration::from_secs(60))?;

    let (mut t_vmb, mut t_vnr, mut t_dd) = (Vec::new(), Vec::new(), Vec::new());
    let mut t_s3 = Vec::new();
    let (mut rss_vmb, mut rss_vnr) = (0u64, 0u64);
    for round in 1..=rounds {
        let args = common(&["restore", &id, "--force"]);
        let m = measure_args(vmbackup, &args)?;
        eprintln!(
            "bench: round {round}: vmbackup restore {:.2}s, rss {} MiB",
            m.secs,
            m.max_rss_kib / 1024
        );
        t_vmb.push(m.secs);
        rss_vmb = rss_vmb.max(m.max_rss_kib);
        let args = s3_common(&["restore", &s3_id, "--force"]);
        let m = measure_args(vmbackup, &args)?;
        eprintln!(
            "bench: round {round}: vmbackup restore from Garage {:.2}s",
            m.secs
        );
        t_s3.push(m.secs);
        let out = base.join("virtnbdrestore");
        fresh(&out)?;
        let m = measure(
            "virtnbdrestore",
            &[
                "-U",
                "qemu:///system",
                "-i",
                vnb.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ],
        )?;
        eprintln!(
            "bench: round {round}: virtnbdrestore {:.2}s, rss {} MiB",
            m.secs,
            m.max_rss_kib / 1024
        );
        t_vnr.push(m.secs);
        rss_vnr = rss_vnr.max(m.max_rss_kib);
        // The disk's floor: writing the allocated bytes once and making them durable, as a
        // restore must before it replaces the VM's images.
        let m = write_floor(base, allocated)?;
        eprintln!("bench: round {round}: dd write+fsync floor {:.2}s", m.secs);
        t_dd.push(m.secs);
    }
    let (mv, mn, md) = (median(&mut t_vmb), median(&mut t_vnr), median(&mut t_dd));
    println!("benchmark: restore of a 2-disk VM ({:.2} GiB allocated, 8 GiB virtual), {rounds} rounds, medians", allocated as f64 / GIB as f64);
    println!(
        "  vmbackup restore         {mv:7.2} s   peak RSS {:5} MiB",
        rss_vmb / 1024
    );
    println!(
        "  virtnbdrestore           {mn:7.2} s   peak RSS {:5} MiB",
        rss_vnr / 1024
    );
    let ms3 = median(&mut t_s3);
    println!(
        "  vmbackup restore, Garage {ms3:7.2} s   speed {:.2}x of the local folder (target >= 0.7x)",
        mv / ms3
    );
    println!("  dd write+fsync, same bytes {md:7.2} s   (the disk's floor for a durable restore)");
    println!(
        "  speed-up vs virtnbdrestore  {:.2}x (target >= 3x); vmbackup / floor {:.2}x",
        mn / mv,
        mv / md
    );
    empty_prefix(&garage, &prefix)?;
    let _ = std::fs::remove_dir_all(base);
    Ok(())
}

/// Backups as block devices: a boot test of the benchmark VM's backup against the VM's own
/// boot (start to guest agent); reading the backup through `vmbackup serve` with QEMU's
/// client (`qemu-img convert` of every disk, made durable) and `restore --instant` (to the
/// agent's answer, and to the disks' being local) against a plain `vmbackup restore`,
/// alternating; the VM is shut off between its boots, as a restore requires.
fn bench_blockdev(
    vm: &vmbackup_testkit::libvirt_vm::TestVm,
    base: &Path,
    vmbackup: &str,
    rounds: usize,
    allocated: u64,
) -> Result<()> {
    let name = vm.name();
    let (repo, state, id) = first_backup(vm, base, vmbackup)?;
    let (repo_s, state_s) = (repo.to_str().unwrap(), state.to_str().unwrap());
    let common = |extra: &[&str]| repo_args(repo_s, state_s, extra);
    vm.shutdown(Duration::from_secs(60))?;
    let disks: Vec<String> = {
        let m = vmbackup::repository::Repository::open(&repo)?.load(&id)?;
        m.disks.iter().map(|d| d.target.clone()).collect()
    };
    let (mut t_boot, mut t_bt, mut t_bt_agent) = (Vec::new(), Vec::new(), Vec::new());
    let (mut t_serve, mut t_restore) = (Vec::new(), Vec::new());
    let (mut t_inst_agent, mut t_inst_done) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        // The VM's own boot: start to the agent's first answer.
        let t = Instant::now();
        vm.dom().start()?;
        vm.wait_agent(Duration::from_secs(300))?;
        let boot = t.elapsed().as_secs_f64();
        vm.shutdown(Duration::from_secs(60))?;
        t_boot.push(boot);
        // The boot test: the whole command, and its own start-to-agent figure.
        let args = common(&["boot-test", &id]);
        let m = measure_args(vmbackup, &args)?;
        let v: serde_json::Value = serde_json::from_str(m.stdout.trim())?;
        let agent = v["boot_test"]["seconds_to_agent"]
            .as_f64()
            .context("boot test: seconds to agent")?;
        eprintln!(
            "bench: round {round}: VM boot {boot:.2}s; boot-test {:.2}s (agent after {agent:.2}s)",
            m.secs
        );
        t_bt.push(m.secs);
        t_bt_agent.push(agent);
        // The backup read through NBD by QEMU's client, written and synced as a restore is.
        let sock = base.join("serve.sock");
        let _ = std::fs::remove_file(&sock);
        let args = common(&["serve", &id, "--socket", sock.to_str().unwrap()]);
        let mut server = Command::new(vmbackup)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(server.stdout.take().context("serve's stdout")?),
            &mut line,
        )?;
        let out_dir = base.join("served");
        fresh(&out_dir)?;
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        let t = Instant::now();
        for d in &disks {
            let out = out_dir.join(format!("{d}.raw"));
            let uri = format!("nbd+unix:///{d}?socket={}", sock.display());
            let st = Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw", &uri])
                .arg(&out)
                .status()?;
            if !st.success() {
                bail!("qemu-img convert {uri}: {st}");
            }
            std::fs::File::open(&out)?.sync_all()?;
        }
        let served = t.elapsed().as_secs_f64();
        let _ = server.kill();
        let _ = server.wait();
        std::fs::remove_dir_all(&out_dir)?;
        t_serve.push(served);
        let args = common(&["restore", &id, "--force"]);
        let m = measure_args(vmbackup, &args)?;
        eprintln!(
            "bench: round {round}: read through serve {served:.2}s; restore {:.2}s",
            m.secs
        );
        t_restore.push(m.secs);
        // Instant restore of the shut-off VM: the guest agent's first answer, polled from the
        // command's start, and the command's end (the disks local, the server gone).
        let args = common(&["restore", &id, "--force", "--instant"]);
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        let t = Instant::now();
        let mut child = Command::new(vmbackup)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let lv = vmbackup::hypervisor::libvirt::Libvirt::open("qemu:///system")?;
        let mut agent = None;
        let mut done = None;
        while agent.is_none() || done.is_none() {
            if done.is_none() {
                if let Some(st) = child.try_wait()? {
                    if !st.success() {
                        bail!("restore --instant: {st}");
                    }
                    done = Some(t.elapsed().as_secs_f64());
                }
            }
            if agent.is_none() {
                let up = lv.domain(name).ok().is_some_and(|d| {
                    d.is_active().unwrap_or(false)
                        && vmbackup::guest_agent::ping(&d, Duration::from_millis(500)).is_ok()
                });
                if up {
                    agent = Some(t.elapsed().as_secs_f64());
                }
            }
            if t.elapsed() > Duration::from_secs(600) {
                bail!("restore --instant: no agent or no end within 600 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (agent, done) = (agent.unwrap_or_default(), done.unwrap_or_default());
        eprintln!(
            "bench: round {round}: restore --instant: agent after {agent:.2}s, disks local after {done:.2}s"
        );
        t_inst_agent.push(agent);
        t_inst_done.push(done);
        vm.shutdown(Duration::from_secs(60))?;
    }
    let (boot, bt, agent) = (
        median(&mut t_boot),
        median(&mut t_bt),
        median(&mut t_bt_agent),
    );
    let (served, restored) = (median(&mut t_serve), median(&mut t_restore));
    println!(
        "benchmark: backups as block devices, a 2-disk VM ({:.2} GiB allocated, 8 GiB virtual), {rounds} rounds, medians",
        allocated as f64 / GIB as f64
    );
    println!("  the VM's own boot (start to agent)   {boot:7.2} s");
    println!(
        "  boot-test, whole command             {bt:7.2} s   {:+.2} s vs the VM's boot (target <= +5 s); agent after {agent:.2} s",
        bt - boot
    );
    println!("  vmbackup restore                     {restored:7.2} s");
    println!(
        "  qemu-img convert from serve, synced  {served:7.2} s   speed {:.2}x of restore (target >= 0.8x)",
        restored / served
    );
    let (ia, idone) = (median(&mut t_inst_agent), median(&mut t_inst_done));
    println!(
        "  restore --instant: agent answers    {ia:7.2} s   after the command (target <= 10 s)"
    );
    println!(
        "  restore --instant: disks local      {idone:7.2} s   {:.2}x a plain restore's time (target <= 1.5x)",
        idone / restored
    );
    let _ = std::fs::remove_dir_all(base);
    Ok(())
}

/// The files the incremental benchmark's guest rewrites: one per folder, 4 folders on each
/// data disk (ext4 spreads top-level folders over its block groups), 4 MiB each: 32 MiB.
const INC_DISKS: [&str; 2] = ["vdb", "vdc"];
const INC_FILES_PER_DISK: usize = 4;
const INC_FILE_MIB: u64 = 4;
/// vmbackup's chunk: the unit an incremental backup reads.
const CHUNK: u64 = 4 * MIB;

/// The guest script that writes every file of the incremental benchmark with fresh random
/// data, in place (`notrunc`: the same blocks), each synced before the next.
fn inc_writes_script(create: bool) -> String {
    let conv = if create { "fsync" } else { "notrunc,fsync" };
    format!(
        "set -e; for d in {disks}; do for i in $(seq 0 {last}); do \
         mkdir -p /mnt/$d/inc$i; \
         dd if=/dev/urandom of=/mnt/$d/inc$i/data bs=1M count={INC_FILE_MIB} conv={conv} 2>/dev/null; \
         done; done",
        disks = INC_DISKS.join(" "),
        last = INC_FILES_PER_DISK - 1,
    )
}

/// The 4 MiB chunks (indexes from the start of the virtual disk) that hold the data of the
/// incremental benchmark's files on one disk image, read with `debugfs` from a raw copy of
/// the image. The guest must be frozen (ext4 then has its journal written back in place).
fn inc_chunks(image: &Path, scratch: &Path, disk: &str) -> Result<Vec<u64>> {
    let raw = scratch.join(format!("{disk}.raw"));
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(image)
        .arg(&raw)
        .output()?;
    if !out.status.success() {
        bail!(
            "qemu-img convert {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let debugfs = |request: &str| -> Result<String> {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(request)
            .arg(&raw)
            .output()?;
        if !out.status.success() {
            bail!(
                "debugfs -R {request:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let block: u64 = debugfs("stats")?
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no block size in debugfs stats")?;
    let mut chunks = Vec::new();
    for i in 0..INC_FILES_PER_DISK {
        let path = format!("/inc{i}/data");
        let listing = debugfs(&format!("ex -l {path}"))?;
        let mut blocks = 0;
        for line in listing.lines().skip(1) {
            // " 0/ 0   1/  1     0 -  2047   2128 -   4175   2048 [Uninit]": level, entry,
            // logical range, physical range, length; a 1-block extent has no ranges.
            let t: Vec<&str> = line
                .split(|c: char| c.is_whitespace() || c == '/')
                .filter(|t| !t.is_empty())
                .collect();
            let nums: Vec<u64> = t
                .iter()
                .skip(4)
                .filter(|t| **t != "-")
                .map_while(|t| t.parse().ok())
                .collect();
            let (start, len) = match nums.as_slice() {
                [_, _, p0, _, len, ..] => (*p0, *len),
                [_, p0, len] => (*p0, *len),
                _ => bail!("unexpected debugfs extent line for {path}: {line:?}"),
            };
            blocks += len;
            let (first, last) = (start * block / CHUNK, ((start + len) * block - 1) / CHUNK);
            chunks.extend(first..=last);
        }
        if blocks * block != INC_FILE_MIB * MIB {
            bail!("{disk}:{path} maps {blocks} blocks of {block} bytes, not {INC_FILE_MIB} MiB");
        }
    }
    let _ = std::fs::remove_file(&raw);
    chunks.sort_unstable();
    chunks.dedup();
    Ok(chunks)
}

/// One `vmbackup backup --json` run: its time, peak RSS and how it read each disk.
struct VmbRun {
    m: Measured,
    id: String,
    /// The copy phase (reading the disks, storing chunks), from the JSON.
    copy_secs: f64,
    bytes_read: u64,
    /// Of which spot checks (unchanged chunks read again and compared).
    checked_bytes: u64,
    /// "vdb: incremental based on X, 12.0 MiB read" per disk.
    disks: Vec<String>,
}

fn vmbackup_backup(
    vmbackup: &str,
    repo: &Path,
    state: &Path,
    name: &str,
    full: bool,
) -> Result<VmbRun> {
    let mut args = vec![
        "--json",
        "--connect",
        "qemu:///system",
        "--repo",
        repo.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "backup",
    ];
    if full {
        args.push("--full");
    }
    args.push(name);
    let m = measure(vmbackup, &args)?;
    let v: serde_json::Value = serde_json::from_str(m.stdout.trim())
        .with_context(|| format!("vmbackup's JSON: {}", m.stdout))?;
    let disks_json = v["results"][0]["backup"]["disks"]
        .as_array()
        .with_context(|| format!("no disks[] in vmbackup's JSON: {}", m.stdout))?;
    let mut bytes_read = 0;
    let mut checked_bytes = 0;
    let mut disks = Vec::new();
    for d in disks_json {
        let read = d["bytes_read"]
            .as_u64()
            .with_context(|| format!("no bytes_read in {d}"))?;
        bytes_read += read;
        checked_bytes += d["checked_bytes"].as_u64().unwrap_or(0);
        let mode = d["mode"].as_str().unwrap_or("?");
        let mut line = format!("{}: {mode}", d["target"].as_str().unwrap_or("?"));
        if let Some(b) = d["based_on"].as_str() {
            line.push_str(&format!(" based on {b}"));
        }
        if let Some(r) = d["full_reason"].as_str() {
            line.push_str(&format!(" ({r})"));
        }
        line.push_str(&format!(", {:.1} MiB read", read as f64 / MIB as f64));
        disks.push(line);
    }
    let id = v["results"][0]["backup"]["id"]
        .as_str()
        .with_context(|| format!("no backup id in {}", m.stdout))?
        .to_string();
    let copy_secs = v["results"][0]["backup"]["copy_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
    Ok(VmbRun {
        m,
        id,
        copy_secs,
        bytes_read,
        checked_bytes,
        disks,
    })
}

/// The chunks whose content differs between backup `id` and the backup each of its disks
/// was based on (read from the two indexes): the data that really changed, at chunk size.
fn chunks_changed(repo: &Path, id: &str) -> Result<u64> {
    let repo = vmbackup::repository::Repository::open(repo)?;
    let m = repo.load(id)?;
    let mut n = 0;
    for d in &m.disks {
        let base_id = d
            .read
            .as_ref()
            .and_then(|r| r.based_on.clone())
            .with_context(|| format!("{id} {}: not based on another backup", d.target))?;
        let base = repo.load(&base_id)?;
        let bd = base
            .disks
            .iter()
            .find(|b| b.target == d.target)
            .context("the base has no such disk")?;
        let load = |o: &str| -> Result<vmbackup::repository::disk::DiskIndex> {
            Ok(vmbackup::repository::disk::DiskIndex::decode(
                &repo.store().get(o)?,
            )?)
        };
        let (a, b) = (load(&d.index_object)?, load(&bd.index_object)?);
        n += a
            .chunks
            .iter()
            .zip(&b.chunks)
            .filter(|(x, y)| x != y)
            .count() as u64;
    }
    Ok(n)
}

/// The bytes of disk data in a virtnbdbackup folder: its `*.data` files (each backup also
/// saves the domain XML and, for a direct kernel boot, the kernel and initramfs).
fn data_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".data"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        })
        .sum()
}

fn virtnbdbackup(name: &str, level: &str, out: &Path) -> Result<Measured> {
    measure(
        "virtnbdbackup",
        &[
            "-U",
            "qemu:///system",
            "-d",
            name,
            "-l",
            level,
            "-o",
            out.to_str().unwrap(),
        ],
    )
}

fn human(bytes: f64) -> String {
    if bytes >= GIB as f64 {
        format!("{:.2} GiB", bytes / GIB as f64)
    } else if bytes >= MIB as f64 {
        format!("{:.1} MiB", bytes / MIB as f64)
    } else {
        format!("{:.1} KiB", bytes / 1024.0)
    }
}

/// `scripts/bench incremental`: two identical benchmark VMs, one backed up by vmbackup, its
/// twin by virtnbdbackup (virtnbdbackup refuses to run, full or incremental, while the
/// domain has a checkpoint it did not create, and vmbackup keeps one on every disk it
/// tracks). After a first vmbackup backup of the one and `virtnbdbackup -l full` of the
/// twin, each round both guests rewrite the same 32 MiB (8 files of 4 MiB, in 4 folders on
/// each disk, fresh random data, each synced); then, in an order that alternates between
/// rounds, `vmbackup backup` (incremental) followed at once by a second one of the unchanged
/// VM, and `virtnbdbackup -l inc` of the twin into its own folder: both read the same
/// writes since their previous backup. Last, `vmbackup backup --full` of the same VM into
/// the same repository (the next round's incremental starts from it). Prints medians and
/// the ratios against their targets as a table.
fn bench_incremental(
    vm: &vmbackup_testkit::libvirt_vm::TestVm,
    twin: &vmbackup_testkit::libvirt_vm::TestVm,
    base: &Path,
    vmbackup: &str,
    rounds: usize,
    allocated: u64,
) -> Result<()> {
    let name = vm.name();
    let (repo, state, vnb) = (base.join("repo"), base.join("state"), base.join("vnb"));
    fresh(&repo)?;
    fresh(&state)?;
    let _ = std::fs::remove_dir_all(&vnb);

    // The files the rounds rewrite, and the 4 MiB chunks their data occupies on each disk.
    eprintln!("bench: making the incremental benchmark's files in the guest");
    vm.sh(&inc_writes_script(true))?;
    let mut changed_chunks = 0u64;
    {
        let frozen = vmbackup::guest_agent::freeze(vm.dom(), Duration::from_secs(10))?;
        for (disk, image) in INC_DISKS.iter().zip(vm.disk_paths()) {
            let chunks = inc_chunks(image, base, disk)?;
            eprintln!(
                "bench: {disk}: the written data spans {} chunks of 4 MiB: {chunks:?}",
                chunks.len()
            );
            changed_chunks += chunks.len() as u64;
        }
        frozen.thaw()?;
    }
    let changed_bytes = changed_chunks * CHUNK;
    let written = (INC_DISKS.len() * INC_FILES_PER_DISK) as u64 * INC_FILE_MIB * MIB;

    eprintln!("bench: first backups: vmbackup, virtnbdbackup -l full");
    let first = vmbackup_backup(vmbackup, &repo, &state, name, false)?;
    eprintln!(
        "bench: first vmbackup backup {:.2}s: {}",
        first.m.secs,
        first.disks.join("; ")
    );
    twin.sh(&inc_writes_script(true))?;
    let m = virtnbdbackup(twin.name(), "full", &vnb)?;
    eprintln!("bench: virtnbdbackup -l full of the twin {:.2}s", m.secs);

    let (mut t_inc, mut t_full, mut t_vnb, mut t_unch) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut read_inc, mut read_unch, mut read_full, mut vnb_added) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut rss_inc, mut rss_full, mut rss_vnb) = (0u64, 0u64, 0u64);
    let (mut copy_inc, mut copy_full, mut really_changed) = (Vec::new(), Vec::new(), Vec::new());
    let (mut checked_inc, mut checked_unch) = (Vec::new(), Vec::new());
    let (mut modes_inc, mut modes_unch) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let start = Instant::now();
        vm.sh(&inc_writes_script(false))?;
        twin.sh(&inc_writes_script(false))?;
        eprintln!(
            "bench: round {round}: each guest wrote {} MiB in {:.2}s",
            written / MIB,
            start.elapsed().as_secs_f64()
        );
        let vmbackup_first = round % 2 == 1;
        let mut run_vnb = || -> Result<()> {
            let before = data_bytes(&vnb);
            let m = virtnbdbackup(twin.name(), "inc", &vnb)?;
            let added = data_bytes(&vnb).saturating_sub(before);
            eprintln!(
                "bench: round {round}: virtnbdbackup -l inc {:.2}s, rss {} MiB, {} of disk data written",
                m.secs,
                m.max_rss_kib / 1024,
                human(added as f64)
            );
            t_vnb.push(m.secs);
            rss_vnb = rss_vnb.max(m.max_rss_kib);
            vnb_added.push(added as f64);
            Ok(())
        };
        if !vmbackup_first {
            run_vnb()?;
        }
        let inc = vmbackup_backup(vmbackup, &repo, &state, name, false)?;
        eprintln!(
            "bench: round {round}: vmbackup incremental {:.2}s, rss {} MiB: {}",
            inc.m.secs,
            inc.m.max_rss_kib / 1024,
            inc.disks.join("; ")
        );
        // A second incremental right after: nothing changed in between.
        let unch = vmbackup_backup(vmbackup, &repo, &state, name, false)?;
        eprintln!(
            "bench: round {round}: vmbackup incremental, unchanged VM {:.2}s: {}",
            unch.m.secs,
            unch.disks.join("; ")
        );
        if vmbackup_first {
            run_vnb()?;
        }
        let full = vmbackup_backup(vmbackup, &repo, &state, name, true)?;
        eprintln!(
            "bench: round {round}: vmbackup --full {:.2}s, rss {} MiB: {}",
            full.m.secs,
            full.m.max_rss_kib / 1024,
            full.disks.join("; ")
        );
        let really = chunks_changed(&repo, &inc.id)?;
        eprintln!("bench: round {round}: {really} chunks differ from the base backup's");
        really_changed.push((really * CHUNK) as f64);
        copy_inc.push(inc.copy_secs);
        checked_inc.push(inc.checked_bytes as f64);
        checked_unch.push(unch.checked_bytes as f64);
        copy_full.push(full.copy_secs);
        t_inc.push(inc.m.secs);
        read_inc.push(inc.bytes_read as f64);
        rss_inc = rss_inc.max(inc.m.max_rss_kib);
        modes_inc = inc.disks;
        t_unch.push(unch.m.secs);
        read_unch.push(unch.bytes_read as f64);
        modes_unch = unch.disks;
        t_full.push(full.m.secs);
        read_full.push(full.bytes_read as f64);
        rss_full = rss_full.max(full.m.max_rss_kib);
    }

    let (mi, mf, mv, mu) = (
        median(&mut t_inc),
        median(&mut t_full),
        median(&mut t_vnb),
        median(&mut t_unch),
    );
    let (ri, ru, rf, va) = (
        median(&mut read_inc),
        median(&mut read_unch),
        median(&mut read_full),
        median(&mut vnb_added),
    );
    let (ki, ku) = (median(&mut checked_inc), median(&mut checked_unch));
    let (ci, cf, rc) = (
        median(&mut copy_inc),
        median(&mut copy_full),
        median(&mut really_changed),
    );
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "benchmark: incremental backup of a running 2-disk VM ({:.2} GiB allocated, 8 GiB virtual) \
         after the guest rewrote {} MiB in {} files on both disks ({} chunks of 4 MiB), \
         {rounds} rounds, medians",
        allocated as f64 / GIB as f64,
        written / MIB,
        INC_DISKS.len() * INC_FILES_PER_DISK,
        changed_chunks
    );
    println!();
    println!("| | time | read | peak RSS |");
    println!("|---|---:|---:|---:|");
    println!(
        "| vmbackup backup (incremental) | {mi:.2} s | {} | {} MiB |",
        human(ri),
        rss_inc / 1024
    );
    println!("| ... of which spot checks | | {} | |", human(ki));
    println!(
        "| vmbackup backup, unchanged VM | {mu:.2} s | {} (spot checks {}) | |",
        human(ru),
        human(ku)
    );
    println!(
        "| vmbackup backup --full (same repository: its chunks are all there already) | {mf:.2} s | {} | {} MiB |",
        human(rf),
        rss_full / 1024
    );
    println!(
        "| vmbackup, first backup (full, into the empty repository; one run) | {:.2} s | {} | {} MiB |",
        first.m.secs,
        human(first.bytes_read as f64),
        first.m.max_rss_kib / 1024
    );
    println!(
        "| virtnbdbackup -l inc | {mv:.2} s | ({} of disk data written) | {} MiB |",
        human(va),
        rss_vnb / 1024
    );
    println!();
    println!("| ratio | measured | target | |");
    println!("|---|---:|---:|---|");
    let r_time = mi / mf;
    println!(
        "| incremental time / --full time | {:.1}% | <= 10% | {} |",
        r_time * 100.0,
        verdict(r_time <= 0.10)
    );
    let r_first = mi / first.m.secs;
    println!(
        "| incremental time / first full backup's time | {:.1}% | <= 10% | {} |",
        r_first * 100.0,
        verdict(r_first <= 0.10)
    );
    println!(
        "| ... of which the copy phase (reading, storing): incremental / full | {:.1}% ({ci:.2} s / {cf:.2} s) | | |",
        ci / cf * 100.0
    );
    let r_read = ri / changed_bytes as f64;
    println!(
        "| bytes read / the files' data in 4 MiB chunks ({}) | {r_read:.2}x | <= 2x | {} |",
        human(changed_bytes as f64),
        verdict(r_read <= 2.0)
    );
    let r_really = ri / rc.max(1.0);
    println!(
        "| bytes read / chunks that differ from the base backup ({}, data and filesystem metadata) | {r_really:.2}x | <= 2x | {} |",
        human(rc),
        verdict(r_really <= 2.0)
    );
    let r_vnb = mv / mi;
    println!(
        "| speed vs virtnbdbackup -l inc | {r_vnb:.2}x | >= 1x | {} |",
        verdict(r_vnb >= 1.0)
    );
    println!(
        "| unchanged VM: incremental bytes read | {} | ~0 | {} |",
        human(ru),
        // "About zero": at most one chunk a disk (a quiesced snapshot itself writes the
        // guest filesystems' superblocks and journals).
        verdict(ru <= (INC_DISKS.len() as u64 * CHUNK) as f64)
    );
    let r_rss = rss_inc as f64 / rss_full.max(1) as f64;
    println!(
        "| peak RSS incremental / --full (nothing new to compress) | {r_rss:.2}x | <= 1x | {} |",
        verdict(r_rss <= 1.0)
    );
    let r_rss_first = rss_inc as f64 / first.m.max_rss_kib.max(1) as f64;
    println!(
        "| peak RSS incremental / first full backup | {r_rss_first:.2}x | <= 1x | {} |",
        verdict(r_rss_first <= 1.0)
    );
    println!();
    println!("how the last round's incremental read the disks:");
    for l in &modes_inc {
        println!("  {l}");
    }
    println!("how the last round's incremental of the unchanged VM read them:");
    for l in &modes_unch {
        println!("  {l}");
    }
    Ok(())
}

/// Removes the benchmark folder when the benchmark ends, whether it succeeded or not.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The benchmark VM, `count` identical ones: 2 qcow2 disks of 4 GiB virtual, one holding
/// 1 GiB of random data and 512 MiB of repetitive text. Returns them running, with the bytes
/// the first one's images allocate.
fn bench_vms(
    base: &Path,
    count: usize,
) -> Result<(Vec<vmbackup_testkit::libvirt_vm::TestVm>, u64)> {
    let fill = base.join("fill");
    eprintln!("bench: making 1 GiB random + 512 MiB text");
    make_fill(&fill)?;
    let mut vms = Vec::new();
    for _ in 0..count {
        eprintln!("bench: making the VM (2 x 4 GiB qcow2)");
        let vm = TestVmBuilder::new("bench")
            .memory_mib(256)
            .disk_spec(DiskSpec {
                target: "vdb".into(),
                format: Format::Qcow2,
                size: 4 * GIB,
                ext4: true,
                fill_from: Some(fill.clone()),
            })
            .disk("vdc", Format::Qcow2, 4 * GIB)
            .start()?;
        eprintln!(
            "bench: {} running, {:.2} GiB allocated",
            vm.name(),
            allocated_bytes(&vm) as f64 / GIB as f64
        );
        vms.push(vm);
    }
    std::fs::remove_dir_all(&fill)?;
    let allocated = allocated_bytes(&vms[0]);
    Ok((vms, allocated))
}

fn allocated_bytes(vm: &vmbackup_testkit::libvirt_vm::TestVm) -> u64 {
    vm.disk_paths()
        .iter()
        .map(|p| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
        })
        .sum()
}

fn main() -> Result<()> {
    let what = std::env::args().nth(1).unwrap_or_else(|| "backup".into());
    if !["backup", "restore", "incremental", "blockdev"].contains(&what.as_str()) {
        bail!("unknown benchmark {what:?} (known: backup, restore, incremental, blockdev)");
    }
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let base = PathBuf::from(
        std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp/vmbackup-bench".into()),
    );
    let vmbackup = match std::env::var("BENCH_VMBACKUP") {
        Ok(b) => b,
        // target/release/examples/bench -> target/release/vmbackup, wherever the target
        // folder is (CARGO_TARGET_DIR).
        Err(_) => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("cannot tell where the vmbackup binary is")?
            .join("vmbackup")
            .to_string_lossy()
            .into_owned(),
    };
    fresh(&base)?;
    let _cleanup = RemoveOnDrop(base.clone());
    let incremental = what == "incremental";
    let (mut vms, allocated) = bench_vms(&base, if incremental { 2 } else { 1 })?;
    if incremental {
        return bench_incremental(&vms[0], &vms[1], &base, &vmbackup, rounds, allocated);
    }
    let vm = vms.remove(0);
    let name = vm.name().to_string();
    if what == "restore" {
        return bench_restore(&vm, &base, &vmbackup, rounds, allocated);
    }
    if what == "blockdev" {
        return bench_blockdev(&vm, &base, &vmbackup, rounds, allocated);
    }

    let (mut t_vmb, mut t_vnb, mut t_conv) = (Vec::new(), Vec::new(), Vec::new());
    let mut t_enc = Vec::new();
    let (mut t_s3, mut s3_requests) = (Vec::new(), serde_json::Value::Null);
    let garage = vmbackup_testkit::garage::Garage::get();
    let (mut t_vnb_sync, mut t_floor, mut guest_freezes) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rss_vmb, mut rss_vnb, mut rss_conv) = (0u64, 0u64, 0u64);
    let mut freezes = Vec::new();
    let mut stored = 0u64;
    for round in 1..=rounds {
        // vmbackup, fresh repository.
        let repo = base.join("repo");
        let state = base.join("state");
        fresh(&repo)?;
        fresh(&state)?;
        let args = [
            "--json",
            "--connect",
            "qemu:///system",
            "--repo",
            repo.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "backup",
            name.as_str(),
        ];
        let m = measure(&vmbackup, &args)?;
        let v: serde_json::Value = serde_json::from_str(m.stdout.trim())?;
        if let Some(f) = v["results"][0]["backup"]["freeze_ms"].as_f64() {
            freezes.push(f);
        }
        stored = dir_bytes(&repo.join("chunks"));
        eprintln!(
            "bench: round {round}: vmbackup {:.2}s, rss {} MiB",
            m.secs,
            m.max_rss_kib / 1024
        );
        t_vmb.push(m.secs);
        rss_vmb = rss_vmb.max(m.max_rss_kib);
        forget_vmbackup_checkpoints(&vm)?;

        // The same backup into a fresh encrypted repository (`init --encrypt --key-file`).
        let enc = base.join("repo-enc");
        let key = base.join("repo-enc.key");
        let _ = std::fs::remove_dir_all(&enc);
        let _ = std::fs::remove_file(&key);
        let (enc_s, key_s) = (enc.to_str().unwrap(), key.to_str().unwrap());
        let init = Command::new(&vmbackup)
            .args(["--repo", enc_s, "--key-file", key_s, "init", "--encrypt"])
            .stdin(std::process::Stdio::null())
            .output()?;
        if !init.status.success() {
            bail!("init --encrypt: {}", String::from_utf8_lossy(&init.stderr));
        }
        let m = measure(
            &vmbackup,
            &[
                "--json",
                "--repo",
                enc_s,
                "--key-file",
                key_s,
                "--state-dir",
                state.to_str().unwrap(),
                "backup",
                name.as_str(),
            ],
        )?;
        eprintln!("bench: round {round}: vmbackup, encrypted {:.2}s", m.secs);
        t_enc.push(m.secs);
        forget_vmbackup_checkpoints(&vm)?;
        let _ = std::fs::remove_dir_all(&enc);

        // The same backup into a fresh prefix of the loopback Garage bucket.
        let prefix = format!("bench-{}-{round}", std::process::id());
        let s3 = format!("s3://{}/{prefix}", vmbackup_testkit::garage::BUCKET);
        let m = measure(
            &vmbackup,
            &[
                "--json",
                "--repo",
                &s3,
                "--state-dir",
                state.to_str().unwrap(),
                "backup",
                name.as_str(),
            ],
        )?;
        let v: serde_json::Value = serde_json::from_str(m.stdout.trim())?;
        s3_requests = v["results"][0]["backup"]["requests"].clone();
        eprintln!(
            "bench: round {round}: vmbackup into Garage {:.2}s, requests {s3_requests}",
            m.secs
        );
        t_s3.push(m.secs);
        forget_vmbackup_checkpoints(&vm)?;
        empty_prefix(&garage, &prefix)?;

        // Floors measured in the same round: the disk writing the stored bytes durably, and
        // the guest freezing and thawing its filesystems with nothing in between.
        let floor = write_floor(&base, stored)?;
        let gf = guest_freeze_floor(&vm)?;
        eprintln!(
            "bench: round {round}: dd write+fsync of the stored bytes {:.2}s, guest freeze+thaw {gf:.0} ms",
            floor.secs
        );
        t_floor.push(floor.secs);
        guest_freezes.push(gf);

        // virtnbdbackup, fresh folder.
        let out = base.join("virtnbdbackup");
        let _ = std::fs::remove_dir_all(&out);
        let m = measure(
            "virtnbdbackup",
            &[
                "-U",
                "qemu:///system",
                "-d",
                &name,
                "-l",
                "full",
                "-o",
                out.to_str().unwrap(),
            ],
        )?;
        eprintln!(
            "bench: round {round}: virtnbdbackup {:.2}s, rss {} MiB",
            m.secs,
            m.max_rss_kib / 1024
        );
        t_vnb.push(m.secs);
        rss_vnb = rss_vnb.max(m.max_rss_kib);
        // virtnbdbackup never calls fsync: its data may still be in the page cache when it
        // exits. The same durability as vmbackup's costs it a sync afterwards.
        let start = Instant::now();
        let st = Command::new("sync").status()?;
        if !st.success() {
            bail!("sync failed: {st}");
        }
        t_vnb_sync.push(m.secs + start.elapsed().as_secs_f64());

        // qemu-img convert of both images (force-share: the VM is running).
        let conv = base.join("convert");
        fresh(&conv)?;
        let start = Instant::now();
        let mut peak = 0;
        for (i, p) in vm.disk_paths().iter().enumerate() {
            let dst = conv.join(format!("{i}.qcow2"));
            let m = measure(
                "qemu-img",
                &[
                    "convert",
                    "-U",
                    "-O",
                    "qcow2",
                    p.to_str().unwrap(),
                    dst.to_str().unwrap(),
                ],
            )?;
            peak = peak.max(m.max_rss_kib);
        }
        let secs = start.elapsed().as_secs_f64();
        eprintln!("bench: round {round}: qemu-img convert {secs:.2}s");
        t_conv.push(secs);
        rss_conv = rss_conv.max(peak);
    }

    // Bytes a second backup of the unchanged VM adds (into the last round's repository).
    let repo = base.join("repo");
    let before = dir_bytes(&repo.join("chunks"));
    let m = measure(
        &vmbackup,
        &[
            "--json",
            "--repo",
            repo.to_str().unwrap(),
            "--state-dir",
            base.join("state").to_str().unwrap(),
            "backup",
            name.as_str(),
        ],
    )?;
    let added = dir_bytes(&repo.join("chunks")).saturating_sub(before);
    let _ = m;

    // Peak RSS against disk size: the same backup of a VM with one 64 MiB disk.
    let small = TestVmBuilder::new("bench-small")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()?;
    let small_repo = base.join("small-repo");
    fresh(&small_repo)?;
    let ms = measure(
        &vmbackup,
        &[
            "--json",
            "--repo",
            small_repo.to_str().unwrap(),
            "--state-dir",
            base.join("state").to_str().unwrap(),
            "backup",
            small.name(),
        ],
    )?;
    drop(small);

    let (mv, mn, mc) = (median(&mut t_vmb), median(&mut t_vnb), median(&mut t_conv));
    let (mns, mfl) = (median(&mut t_vnb_sync), median(&mut t_floor));
    let mgf = median(&mut guest_freezes);
    let me = median(&mut t_enc);
    let ms3 = median(&mut t_s3);
    let mf = if freezes.is_empty() {
        f64::NAN
    } else {
        median(&mut freezes)
    };
    println!("benchmark: backup of a running 2-disk VM ({:.2} GiB allocated, 8 GiB virtual), {rounds} rounds, medians", allocated as f64 / GIB as f64);
    println!(
        "  vmbackup backup          {mv:7.2} s   peak RSS {:5} MiB",
        rss_vmb / 1024
    );
    println!(
        "  virtnbdbackup -l full    {mn:7.2} s   peak RSS {:5} MiB",
        rss_vnb / 1024
    );
    println!(
        "  qemu-img convert         {mc:7.2} s   peak RSS {:5} MiB",
        rss_conv / 1024
    );
    println!("  virtnbdbackup + sync     {mns:7.2} s   (the same durability as vmbackup's)");
    println!(
        "  vmbackup backup, encrypted {me:5.2} s   speed {:.2}x of unencrypted (target >= 0.8x)",
        mv / me
    );
    println!(
        "  vmbackup backup, Garage  {ms3:7.2} s   speed {:.2}x of the local folder (target >= 0.7x); requests {s3_requests}",
        mv / ms3
    );
    println!(
        "  dd write+fsync, stored   {mfl:7.2} s   (the disk's floor for the bytes vmbackup stores)"
    );
    println!(
        "  speed-up vs virtnbdbackup   {:.2}x (target >= 3x)",
        mn / mv
    );
    println!(
        "  speed-up vs virtnbdbackup + sync {:.2}x; vmbackup / disk floor {:.2}x",
        mns / mv,
        mv / mfl
    );
    println!(
        "  time vs qemu-img convert    {:.2}x (target <= 1.5x)",
        mv / mc
    );
    println!("  median freeze               {mf:.0} ms (target <= 100 ms)");
    println!(
        "  guest's own freeze+thaw     {mgf:.0} ms (agent alone, nothing in between: the floor)"
    );
    println!(
        "  bytes stored (repository)   {:.1} MiB",
        stored as f64 / MIB as f64
    );
    println!(
        "  second backup, unchanged VM adds {:.1} KiB",
        added as f64 / 1024.0
    );
    println!(
        "  vmbackup peak RSS: {} MiB for 8 GiB of disks (1.51 GiB allocated), {} MiB for one 64 MiB disk",
        rss_vmb / 1024,
        ms.max_rss_kib / 1024
    );
    drop(vm);
    let _ = std::fs::remove_dir_all(&base);
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}
