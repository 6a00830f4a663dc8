//! The client against `qemu-nbd` exporting qcow2 images made with `qemu-img` and `qemu-io`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A `qemu-nbd` serving one image read-only as export "name" on a Unix socket; killed on drop.
struct QemuNbd {
    child: Child,
    sock: PathBuf,
}

impl QemuNbd {
    fn start(dir: &Path, image: &Path, extra: &[&str]) -> QemuNbd {
        let sock = dir.join("nbd.sock");
        let log = std::fs::File::create(dir.join("qemu-nbd.log")).unwrap();
        let mut cmd = Command::new("qemu-nbd");
        // SAFETY: prctl(2) is async-signal-safe and touches only the child being started:
        // qemu-nbd gets SIGKILL when the test process dies, even without unwinding.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // Several clients at once (qemu-nbd serves one by default): the client under test
        // and nbdinfo.
        let mut child = cmd
            .args(["-r", "-t", "-e", "4", "-x", "name", "--format=qcow2", "-k"])
            .arg(&sock)
            .args(extra)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.join("qemu-nbd.log")).unwrap();
                panic!("qemu-nbd exited with {st}: {log}");
            }
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "qemu-nbd did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd { child, sock }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const MIB: u64 = 1 << 20;
const BITMAP: &str = "qemu:dirty-bitmap:b0";

fn qemu_io(image: &Path, cmds: &[&str]) {
    let mut args = vec!["qemu-io", "-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(image.to_str().unwrap());
    run(&args);
}

/// `nbdinfo --map` of `context` over the whole export, neighbours with equal flags merged;
/// `None` when nbdinfo (package libnbd-bin) is not installed.
/// nbdinfo (package libnbd-bin, installed by scripts/setup-host) is required: a missing tool
/// fails the test.
fn nbdinfo_map(sock: &Path, context: &str) -> Vec<Extent> {
    let uri = format!("nbd+unix:///name?socket={}", sock.display());
    let out = Command::new("timeout")
        .args(["60", "nbdinfo"])
        .arg(format!("--map={context}"))
        .arg(uri)
        .output()
        .unwrap();
    assert_ne!(
        out.status.code(),
        Some(127),
        "nbdinfo is not installed (package libnbd-bin, see scripts/setup-host)"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nbdinfo: {err}");
    let mut map: Vec<Extent> = Vec::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let e = Extent {
            offset: f[0].parse().unwrap(),
            length: f[1].parse().unwrap(),
            flags: f[2].parse().unwrap(),
        };
        match map.last_mut() {
            Some(l) if l.end() == e.offset && l.flags == e.flags => l.length += e.length,
            _ => map.push(e),
        }
    }
    map
}

fn extents(v: &[(u64, u64, u32)]) -> Vec<Extent> {
    v.iter()
        .map(|&(offset, length, flags)| Extent {
            offset,
            length,
            flags,
        })
        .collect()
}

/// Writes `[offset, offset + length)` widened to the bitmap granularity and merged.
fn granules(writes: &[(u64, u64)], g: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(o, l) in writes {
        let (s, e) = (o / g * g, (o + l).div_ceil(g) * g);
        match out.last_mut() {
            Some((po, pl)) if *po + *pl >= s => *pl = e - *po,
            _ => out.push((s, e - s)),
        }
    }
    out
}

fn bitmap_granularity(image: &Path) -> u64 {
    let info = run(&["qemu-img", "info", "--output=json", image.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["format-specific"]["data"]["bitmaps"][0]["granularity"]
        .as_u64()
        .unwrap()
}

#[test]
fn reads_and_allocation_of_a_qcow2_export() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.qcow2");
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        "64M",
    ]);
    qemu_io(&img, &["write -P 0x5a 1M 2M", "write -P 0x33 31M 2M"]);
    let s = QemuNbd::start(d.path(), &img, &[]);
    let mut c = Client::connect_unix(&s.sock, "name", &[BASE_ALLOCATION]).unwrap();
    assert_eq!(c.size(), 64 * MIB);

    // The whole export in one call: more than qemu-nbd's 32 MiB maximum payload.
    let mut expect = vec![0u8; 64 << 20];
    expect[1 << 20..3 << 20].fill(0x5a);
    expect[31 << 20..33 << 20].fill(0x33);
    let mut buf = vec![0xffu8; 64 << 20];
    c.read(0, &mut buf).unwrap();
    assert!(buf == expect);
    let mut small = [0xffu8; 20];
    c.read(MIB - 10, &mut small).unwrap();
    assert_eq!(small[..10], [0; 10]);
    assert_eq!(small[10..], [0x5a; 10]);
    assert!(matches!(
        c.read(64 * MIB - 10, &mut small),
        Err(NbdError::OutOfRange { .. })
    ));

    let hole = STATE_HOLE | STATE_ZERO;
    let map = extents(&[
        (0, MIB, hole),
        (MIB, 2 * MIB, 0),
        (3 * MIB, 28 * MIB, hole),
        (31 * MIB, 2 * MIB, 0),
        (33 * MIB, 31 * MIB, hole),
    ]);
    assert_eq!(c.allocation(0, 64 * MIB).unwrap(), map);
    assert_eq!(
        c.allocation(MIB + MIB / 2, 2 * MIB).unwrap(),
        extents(&[(MIB + MIB / 2, MIB + MIB / 2, 0), (3 * MIB, MIB / 2, hole)])
    );
    assert_eq!(c.allocation(5, 0).unwrap(), vec![]);
    assert!(matches!(
        c.dirty_ranges(BITMAP, 0, MIB),
        Err(NbdError::NotNegotiated(_))
    ));
    {
        let theirs = nbdinfo_map(&s.sock, BASE_ALLOCATION);
        assert_eq!(theirs, map);
    }
    c.disconnect().unwrap();
}

#[test]
fn dirty_ranges_are_the_writes_recorded_in_the_bitmap() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.qcow2");
    let p = img.to_str().unwrap();
    run(&["qemu-img", "create", "-q", "-f", "qcow2", p, "16M"]);
    qemu_io(&img, &["write -P 0x5a 1M 2M"]);
    run(&["qemu-img", "bitmap", "--add", p, "b0"]);
    // qemu-io opens the image read-write with its persistent bitmap loaded; the bitmap
    // records the writes and is stored back when qemu-io closes the image.
    let writes = [
        (5 * MIB, 65536),
        (7 * MIB + 100, 4000),
        (9 * MIB - 512, 1024),
    ];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l)| format!("write -P 0x44 {o} {l}"))
        .collect();
    qemu_io(&img, &cmds.iter().map(String::as_str).collect::<Vec<_>>());
    let g = bitmap_granularity(&img);
    assert_eq!(g, 65536);
    let want = granules(&writes, g);
    assert_eq!(
        want,
        [
            (5 * MIB, 65536),
            (7 * MIB, 65536),
            (9 * MIB - 65536, 131072)
        ]
    );

    let s = QemuNbd::start(d.path(), &img, &["-B", "b0"]);
    let mut c = Client::connect_unix(&s.sock, "name", &[BITMAP, BASE_ALLOCATION]).unwrap();
    assert_eq!(c.meta_contexts().count(), 2);
    assert_eq!(c.dirty_ranges(BITMAP, 0, c.size()).unwrap(), want);
    // A part of the export: the ranges are clipped to it.
    assert_eq!(
        c.dirty_ranges(BITMAP, 7 * MIB + 4096, 2 * MIB).unwrap(),
        [
            (7 * MIB + 4096, 65536 - 4096),
            (9 * MIB - 65536, 65536 + 4096)
        ]
    );
    let mut buf = vec![0u8; 4000];
    c.read(7 * MIB + 100, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x44));
    {
        let theirs = nbdinfo_map(&s.sock, BITMAP);
        let dirty: Vec<(u64, u64)> = theirs
            .iter()
            .filter(|e| e.flags & STATE_DIRTY != 0)
            .map(|e| (e.offset, e.length))
            .collect();
        assert_eq!(dirty, want);
        assert_eq!(theirs, c.block_status(BITMAP, 0, c.size()).unwrap());
    }
}

#[test]
fn more_dirty_extents_than_qemu_nbd_sends_in_one_reply() {
    // qemu-nbd 7.2 sends at most 2^17 extents a reply: 66000 dirty granules of 512 bytes,
    // each followed by a clean one, take two requests.
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.qcow2");
    let p = img.to_str().unwrap();
    run(&["qemu-img", "create", "-q", "-f", "qcow2", p, "72M"]);
    run(&[
        "qemu-io",
        "-t",
        "unsafe",
        "-f",
        "qcow2",
        "-c",
        "write -z 0 72M",
        p,
    ]);
    run(&["qemu-img", "bitmap", "--add", "-g", "512", p, "b0"]);
    let n = 66000u64;
    let script: String = (0..n)
        .map(|i| format!("write {} 512\n", i * 1024))
        .collect();
    let mut io = Command::new("qemu-io")
        .args(["-t", "unsafe", "-f", "qcow2", p])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = io.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, script.as_bytes()).unwrap();
    drop(stdin);
    assert!(io.wait().unwrap().success());

    let s = QemuNbd::start(d.path(), &img, &["-B", "b0"]);
    let mut c = Client::connect_unix(&s.sock, "name", &[BITMAP]).unwrap();
    let want: Vec<(u64, u64)> = (0..n).map(|i| (i * 1024, 512)).collect();
    assert_eq!(c.dirty_ranges(BITMAP, 0, c.size()).unwrap(), want);
    {
        let theirs = nbdinfo_map(&s.sock, BITMAP);
        assert_eq!(theirs, c.block_status(BITMAP, 0, c.size()).unwrap());
    }
}

#[test]
fn unknown_exports_and_contexts_are_named() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.qcow2");
    let p = img.to_str().unwrap();
    run(&["qemu-img", "create", "-q", "-f", "qcow2", p, "1M"]);
    run(&["qemu-img", "bitmap", "--add", p, "b0"]);
    let s = QemuNbd::start(d.path(), &img, &["-B", "b0"]);
    for contexts in [&[][..], &[BITMAP][..]] {
        let e = Client::connect_unix(&s.sock, "nope", contexts)
            .err()
            .unwrap();
        assert!(
            matches!(&e, NbdError::UnknownExport { name, .. } if name == "nope"),
            "{e:?}"
        );
        eprintln!("{e}");
    }
    let e = Client::connect_unix(&s.sock, "name", &[BITMAP, "qemu:dirty-bitmap:b1"])
        .err()
        .unwrap();
    assert!(
        matches!(&e, NbdError::UnknownContext(n) if n == "qemu:dirty-bitmap:b1"),
        "{e:?}"
    );
    eprintln!("{e}");
    // The server is still fine after the refusals.
    let c = Client::connect_unix(&s.sock, "name", &[BITMAP]).unwrap();
    assert_eq!(c.size(), MIB);
}

#[test]
fn a_killed_server_is_an_error_not_a_hang() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.qcow2");
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        "1M",
    ]);
    let mut s = QemuNbd::start(d.path(), &img, &[]);
    let mut c = Client::connect_unix_timeout(&s.sock, "name", &[], Duration::from_secs(5)).unwrap();
    let mut buf = [0u8; 4096];
    c.read(0, &mut buf).unwrap();
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let t = Instant::now();
    let e = c.read(0, &mut buf).unwrap_err();
    assert!(matches!(e, NbdError::Closed), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(matches!(c.read(0, &mut buf), Err(NbdError::Broken)));
}
