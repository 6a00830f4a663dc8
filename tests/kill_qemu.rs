//! Issue 13, "Kill (SIGKILL)", plain QEMU: a backup killed while the guest is frozen (the
//! main process alone: its thaw guard thaws; the guard too: `recover` with no names thaws),
//! and a QMP reply held past its deadline (no overlay is deleted while the VM runs on it).
//! One VM runs every case in turn; each case is finished once by `recover` and once by the
//! next `backup`, and the invariants of issue 13 are checked after each.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use vmbackup_testkit::faults::{brief, repo_violations, FaultRun, Reached};
use vmbackup_testkit::libvirt_vm::{make_disk, DiskSpec, Format};
use vmbackup_testkit::qemu_vm::TestQemu;

/// A QMP socket in front of QEMU's that holds every reply for `hold` once a `transaction`
/// (the snapshot) went through it, while armed.
struct SlowQmp {
    armed: Arc<AtomicBool>,
    _path: PathBuf,
}

impl SlowQmp {
    fn start(path: &Path, upstream: PathBuf, hold: Duration) -> SlowQmp {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind the QMP proxy");
        let armed = Arc::new(AtomicBool::new(true));
        let a = armed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = UnixStream::connect(&upstream) else {
                    return;
                };
                let held_until: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (h, a) = (held_until.clone(), a.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n @ 1..) = c_in.read(&mut buf) {
                        if a.load(Ordering::SeqCst)
                            && String::from_utf8_lossy(&buf[..n]).contains("\"transaction\"")
                        {
                            *h.lock().unwrap() = Some(Instant::now() + hold);
                        }
                        if s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_out.shutdown(std::net::Shutdown::Both);
                });
                let (mut s_in, mut c_out) = (server, client);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n @ 1..) = s_in.read(&mut buf) {
                        let until = *held_until.lock().unwrap();
                        if let Some(t) = until {
                            if let Some(rest) = t.checked_duration_since(Instant::now()) {
                                std::thread::sleep(rest);
                            }
                        }
                        if c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_out.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        SlowQmp {
            armed,
            _path: path.to_path_buf(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    Recover,
    Backup,
}

#[derive(Debug, Clone, Copy)]
enum Case {
    /// Killed at `qemu-frozen`, the main process alone: the guard thaws.
    MainKilledWhileFrozen,
    /// Killed at `qemu-frozen` with its thaw guard: the guest stays frozen until finished.
    GroupKilledWhileFrozen,
    /// The snapshot's reply held for this long, past the 2 s QMP deadline.
    ReplyHeld(Duration),
}

struct Fixture {
    t: TestQemu,
    place: Place,
    /// What vmbackup is given as `--qemu-dir`: the VM's sockets only (not the harness's).
    qdir: PathBuf,
    image: String,
    image_dir: PathBuf,
}

impl Fixture {
    fn target(&self) -> String {
        format!("qemu:{}", self.t.name())
    }
    fn qdir(&self) -> String {
        self.qdir.to_string_lossy().into_owned()
    }
    fn sh(&self, script: &str) -> String {
        let (rc, out) = self
            .t
            .qemu()
            .exec_sh(script, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("guest {script}: {e}"));
        assert_eq!(rc, 0, "guest {script}: {out}");
        out
    }
    fn freeze_status(&self) -> String {
        self.t
            .qemu()
            .freeze_status(Duration::from_secs(10))
            .unwrap_or_else(|e| format!("no answer: {e}"))
    }
    fn wait_thawed(&self, within: Duration, what: &str) {
        let start = Instant::now();
        loop {
            let s = self.freeze_status();
            if s == "thawed" {
                return;
            }
            assert!(start.elapsed() < within, "{what}: the guest is {s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    /// What a finished run must leave: the disk on its image, no overlay file, the guest
    /// thawed.
    fn violations(&self) -> Vec<String> {
        let mut bad = Vec::new();
        match self.t.qemu().disks() {
            Ok(d) if d.len() == 1 && d[0].file == self.image => {}
            Ok(d) => bad.push(format!(
                "disks on {:?}",
                d.iter().map(|d| &d.file).collect::<Vec<_>>()
            )),
            Err(e) => bad.push(format!("query-block: {e}")),
        }
        let left: Vec<String> = files_in(&self.image_dir)
            .into_iter()
            .filter(|f| f.contains(".vmbackup-"))
            .collect();
        if !left.is_empty() {
            bad.push(format!("files left beside the image: {left:?}"));
        }
        let s = self.freeze_status();
        if s != "thawed" {
            bad.push(format!("guest {s}"));
        }
        bad
    }
    fn listed(&self) -> Vec<String> {
        let l = vmbackup(&self.place, &["list"]);
        assert_eq!(l.code, 0, "{}", l.stderr);
        l.json["backups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["id"].as_str().map(str::to_string))
            .collect()
    }
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // "pid (comm) S ppid ..."
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, r)| r.split(' ').nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

fn one_case(f: &Fixture, case: Case, finish: Finish, tag: &str) {
    let what = format!("case {case:?} finished by {finish:?}");
    let t0 = Instant::now();
    let before = f.listed();
    f.sh("dd if=/dev/urandom of=/mnt/vdb/fresh bs=64k count=8 2>/dev/null; sync");
    let file = format!("/mnt/vdb/window-{tag}");
    let qdir = f.qdir();
    let target = f.target();
    let args = [
        "--qemu-dir",
        &qdir,
        "backup",
        &target,
        "--quiesce",
        "required",
    ];
    let mut proxy = None;
    match case {
        Case::MainKilledWhileFrozen | Case::GroupKilledWhileFrozen => {
            let mut run = FaultRun::start(binary(), &f.place, &args, "qemu-frozen=kill", &[]);
            let reached = run.wait_marker(Duration::from_secs(120));
            assert_eq!(
                reached,
                Reached::Point("qemu-frozen".into()),
                "{what}: {}",
                run.stderr()
            );
            assert_eq!(f.freeze_status(), "frozen", "{what}");
            if matches!(case, Case::MainKilledWhileFrozen) {
                run.signal(Signal::SIGKILL);
                let _ = run.wait(Duration::from_secs(10));
                // The guard saw its pipe close: it thaws, on its own.
                f.wait_thawed(Duration::from_secs(30), &format!("{what}, by the guard"));
                f.sh(&format!("echo {tag} > {file} && sync"));
            } else {
                let guards = children(run.child.id());
                assert!(!guards.is_empty(), "{what}: no thaw guard");
                for g in guards {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(g), Signal::SIGKILL);
                }
                run.kill_group();
                std::thread::sleep(Duration::from_secs(2));
                assert_eq!(f.freeze_status(), "frozen", "{what}: nobody thawed");
                // The agent runs no command while frozen: this write, started before the
                // finishing command, lands once the guest is thawed.
                let (rc, _) =
                    f.t.qemu()
                        .exec_sh("true", Duration::from_secs(5))
                        .unwrap_or((1, String::new()));
                assert_ne!(rc, 0, "{what}: the agent ran a command while frozen?");
            }
        }
        Case::ReplyHeld(hold) => {
            // vmbackup's QMP socket, held for `hold` once the snapshot went through.
            let sock = f.qdir.join(format!("{}.qmp", f.t.name()));
            let upstream = f.t.dir().join(format!("{}.qmp", f.t.name()));
            let p = SlowQmp::start(&sock, upstream, hold);
            let mut run = FaultRun::start(
                binary(),
                &f.place,
                &args,
                "",
                &[("VMBACKUP_QMP_DEADLINE_MS", "2000")],
            );
            let code = run.wait(Duration::from_secs(300));
            p.armed.store(false, Ordering::SeqCst);
            eprintln!("{what}: the run ended with {code}:\n{}", run.stderr());
            // Whatever the run concluded, QEMU still has every file it runs on.
            let files: Vec<String> =
                f.t.qemu()
                    .disks()
                    .unwrap()
                    .into_iter()
                    .map(|d| d.file)
                    .collect();
            for file in &files {
                assert!(
                    Path::new(file).exists(),
                    "{what}: {file} was deleted while the VM runs on it ({code}):\n{}",
                    run.stderr()
                );
            }
            f.sh(&format!("echo {tag} > {file} && sync"));
            proxy = Some(p);
        }
    }
    // No backup is listed by a killed run (it never reached its manifest).
    let mid = f.listed();
    let ran: Vec<&String> = mid.iter().filter(|id| !before.contains(id)).collect();
    assert!(ran.is_empty(), "{what}: {ran:?}");

    let r = match finish {
        // With no names: every plain QEMU VM of --qemu-dir (libvirt's side is pointed at
        // the test driver, so that other tests' domains on this host are left alone).
        Finish::Recover => vmbackup(
            &f.place,
            &[
                "--connect",
                "test:///default",
                "--qemu-dir",
                &qdir,
                "recover",
            ],
        ),
        Finish::Backup => vmbackup(&f.place, &args),
    };
    assert_eq!(r.code, 0, "{what}: {}\n{}", brief(&r.json), r.stderr);
    if matches!(case, Case::GroupKilledWhileFrozen) {
        if finish == Finish::Recover {
            assert_eq!(
                r.json["recover"]["thawed"],
                serde_json::json!([target]),
                "{what}: {}",
                brief(&r.json)
            );
        }
        f.sh(&format!("echo {tag} > {file} && sync"));
    }
    let bad = f.violations();
    assert!(bad.is_empty(), "{what}: {bad:?}\n{}", r.stderr);
    let back = f.sh(&format!(
        "sync; echo 3 > /proc/sys/vm/drop_caches; cat {file}"
    ));
    assert_eq!(back.trim(), tag, "{what}: the guest's write");
    let (ids, bad) = repo_violations(binary(), &f.place);
    assert!(bad.is_empty(), "{what}: repository: {bad:?}");
    let new: Vec<&String> = ids.iter().filter(|id| !before.contains(id)).collect();
    // Only the finishing backup's: neither a killed run nor one whose snapshot failed lists one.
    assert_eq!(
        new.len(),
        usize::from(finish == Finish::Backup),
        "{what}: new backups {new:?}"
    );
    drop(proxy);
    // The held run's proxy is gone: vmbackup talks to QEMU directly again.
    if matches!(case, Case::ReplyHeld(_)) {
        let sock = f.qdir.join(format!("{}.qmp", f.t.name()));
        let _ = std::fs::remove_file(&sock);
        std::os::unix::fs::symlink(f.t.dir().join(format!("{}.qmp", f.t.name())), &sock).unwrap();
    }
    eprintln!("--- {what}: ok in {:.1?}", t0.elapsed());
}

#[test]
fn plain_qemu_backups_killed_while_frozen_or_with_a_held_reply_are_thawed_and_finished() {
    let place = Place::new();
    let image_dir = place.dir.path().join("images");
    std::fs::create_dir(&image_dir).unwrap();
    let vdb = image_dir.join("vdb.qcow2");
    make_disk(
        &vdb,
        &DiskSpec {
            target: "vdb".into(),
            format: Format::Qcow2,
            size: 64 * MIB,
            ext4: true,
            fill_from: None,
        },
    )
    .unwrap();
    let t = TestQemu::start("kill", &[(vdb.clone(), "qcow2")], Duration::from_secs(180))
        .expect("plain QEMU guest boots");
    let qdir = place.dir.path().join("q");
    std::fs::create_dir(&qdir).unwrap();
    for ext in ["qmp", "qga"] {
        let name = format!("{}.{ext}", t.name());
        std::os::unix::fs::symlink(t.dir().join(&name), qdir.join(&name)).unwrap();
    }
    let f = Fixture {
        t,
        place,
        qdir,
        image: vdb.to_string_lossy().into_owned(),
        image_dir,
    };
    let first = vmbackup(
        &f.place,
        &[
            "--qemu-dir",
            &f.qdir(),
            "backup",
            &f.target(),
            "--quiesce",
            "required",
        ],
    );
    assert_eq!(first.code, 0, "first backup: {}", first.stderr);
    let start = Instant::now();
    let cases = [
        Case::MainKilledWhileFrozen,
        Case::GroupKilledWhileFrozen,
        // Past the snapshot's 2 s deadline (the reply, held 5 s, arrives after it).
        Case::ReplyHeld(Duration::from_secs(5)),
    ];
    for (n, case) in cases.into_iter().enumerate() {
        for finish in [Finish::Recover, Finish::Backup] {
            one_case(&f, case, finish, &format!("q{n}{finish:?}"));
        }
    }
    eprintln!("--- every case in {:.1?}", start.elapsed());
}
