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
    let repo = base.join("repo");
    let state = base.join("state");
    fresh(&repo)?;
    fresh(&state)?;
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--json",
            "--repo",
            repo.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let args = common(&["backup", name]);
    let m = measure(
        vmbackup,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let v: serde_json::Value = serde_json::from_str(m.stdout.trim())?;
    let id = v["results"][0]["backup"]["id"]
        .as_str()
        .context("backup id")?
        .to_string();
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
    let (mut rss_vmb, mut rss_vnr) = (0u64, 0u64);
    for round in 1..=rounds {
        let args = common(&["restore", &id]);
        let m = measure(
            vmbackup,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        eprintln!(
            "bench: round {round}: vmbackup restore {:.2}s, rss {} MiB",
            m.secs,
            m.max_rss_kib / 1024
        );
        t_vmb.push(m.secs);
        rss_vmb = rss_vmb.max(m.max_rss_kib);
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
    println!("  dd write+fsync, same bytes {md:7.2} s   (the disk's floor for a durable restore)");
    println!(
        "  speed-up vs virtnbdrestore  {:.2}x (target >= 3x); vmbackup / floor {:.2}x",
        mn / mv,
        mv / md
    );
    let _ = std::fs::remove_dir_all(base);
    Ok(())
}

fn main() -> Result<()> {
    let what = std::env::args().nth(1).unwrap_or_else(|| "backup".into());
    if what != "backup" && what != "restore" {
        bail!("unknown benchmark {what:?} (known: backup, restore)");
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
    let fill = base.join("fill");
    eprintln!("bench: making 1 GiB random + 512 MiB text");
    make_fill(&fill)?;
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
    std::fs::remove_dir_all(&fill)?;
    let allocated: u64 = vm
        .disk_paths()
        .iter()
        .map(|p| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
        })
        .sum();
    eprintln!(
        "bench: {} running, {:.2} GiB allocated",
        vm.name(),
        allocated as f64 / GIB as f64
    );
    let name = vm.name().to_string();
    if what == "restore" {
        return bench_restore(&vm, &base, &vmbackup, rounds, allocated);
    }

    let (mut t_vmb, mut t_vnb, mut t_conv) = (Vec::new(), Vec::new(), Vec::new());
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
