//! `vmbackup serve`: a backup of a real VM served over NBD, read by QEMU's own client
//! (`qemu-img compare`, `qemu-img convert`) and by `nbdinfo`.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use vmbackup::repository::chunk;
use vmbackup::repository::disk::restore_disk;
use vmbackup::repository::Repository;
use vmbackup_testkit::libvirt_vm::{Format, TestVmBuilder};

/// A running `vmbackup serve`, its announcement, and its log in a file.
struct Server {
    child: Child,
    doc: Value,
    log: PathBuf,
}

impl Server {
    fn start(place: &Place, log: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(binary())
            .arg("--json")
            .arg("--repo")
            .arg(place.repo())
            .arg("--state-dir")
            .arg(place.state())
            .arg("serve")
            .args(args)
            .env_remove("VMBACKUP_CONFIG")
            .env("VMBACKUP_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let doc: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            let _ = child.kill();
            panic!(
                "serve printed {line:?} ({e}); log: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
        assert_eq!(doc["ok"], true, "{doc}");
        Server {
            child,
            doc,
            log: log.to_path_buf(),
        }
    }

    fn uri(&self, disk: &str) -> String {
        self.doc["serve"]["exports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == disk)
            .unwrap_or_else(|| panic!("no export {disk}: {}", self.doc))["uri"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit code.
    fn terminate(mut self) -> i32 {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "serve did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img").args(args).output().unwrap()
}

fn assert_identical(image: &Path, uri: &str) {
    let out = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &image.to_string_lossy(),
        uri,
    ]);
    assert!(
        out.status.success(),
        "qemu-img compare {uri}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("identical"));
}

/// The disks of backup `id` as raw files in `dir`, written by the restore path.
fn restored(place: &Place, id: &str, dir: &Path) -> Vec<(String, PathBuf)> {
    let repo = Repository::open(&place.repo()).unwrap();
    let m = repo.load(id).unwrap();
    m.disks
        .iter()
        .map(|d| {
            let out = dir.join(format!("{}.raw", d.target));
            let index = repo.get_index(id, d).unwrap();
            restore_disk(&repo, &index, &out, 2, &|_, _| {}).unwrap();
            (d.target.clone(), out)
        })
        .collect()
}

#[test]
fn a_served_backup_reads_as_the_restored_disks_and_a_damaged_chunk_is_an_io_error() {
    let vm = TestVmBuilder::new("serve")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 13 % 253) as u8).collect();
    vm.write_file("/mnt/vdb/data", &payload).unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    // Changed after the backup: the export must still show the backup's bytes.
    vm.write_file("/mnt/vdb/data", b"changed after the backup")
        .unwrap();
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let disks = restored(&place, &id, work.path());

    // The default socket, in the state folder, 0600.
    let s = Server::start(&place, &work.path().join("serve.log"), &[&id]);
    let socket = PathBuf::from(s.doc["serve"]["socket"].as_str().unwrap());
    assert!(socket.starts_with(place.state()), "{}", s.doc);
    let mode = std::fs::symlink_metadata(&socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let sizes: Vec<u64> = s.doc["serve"]["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes.len(), 2, "{}", s.doc);
    assert_eq!(
        s.uri("vdb"),
        format!("nbd+unix:///vdb?socket={}", socket.display())
    );

    // Both disks, compared by two clients at once.
    let t = Instant::now();
    std::thread::scope(|sc| {
        for (target, image) in &disks {
            let uri = s.uri(target);
            sc.spawn(move || assert_identical(image, &uri));
        }
    });
    eprintln!("qemu-img compare of both disks: {:?}", t.elapsed());
    let copy = work.path().join("copy.qcow2");
    let t = Instant::now();
    let out = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &s.uri("vda"),
        &copy.to_string_lossy(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vda = &disks.iter().find(|(t, _)| t == "vda").unwrap().1;
    eprintln!(
        "qemu-img convert of vda ({} MiB) from the export: {:?}",
        std::fs::metadata(vda).unwrap().len() >> 20,
        t.elapsed()
    );
    let out = qemu_img(&[
        "compare",
        "-F",
        "raw",
        &copy.to_string_lossy(),
        &vda.to_string_lossy(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // nbdinfo: both exports listed, read-only, the right size, and zero regions as holes.
    let out = Command::new("nbdinfo")
        .args(["--json", "--list", &s.uri("vdb")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    let exports = info["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vda", "vdb"], "{info}");
    for e in exports {
        assert_eq!(e["is_read_only"], true, "{e}");
    }
    let vdb_size = std::fs::metadata(&disks.iter().find(|(t, _)| t == "vdb").unwrap().1)
        .unwrap()
        .len();
    assert_eq!(exports[1]["export-size"].as_u64(), Some(vdb_size));
    let out = Command::new("nbdinfo")
        .args(["--map", &s.uri("vdb")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map = String::from_utf8_lossy(&out.stdout);
    assert!(map.contains("hole,zero") && map.contains("data"), "{map}");

    // The repository is locked against gc while it serves.
    let gc = vmbackup(&place, &["gc"]);
    assert_eq!(gc.code, 4, "gc while serving: {}", gc.json);

    // SIGTERM stops it, the exit code says so, and the socket is gone.
    assert_eq!(s.terminate(), 143);
    assert!(!socket.exists(), "the socket was left");

    // A damaged chunk of vdb: QEMU gets an I/O error and the log names the chunk.
    let repo = Repository::open(&place.repo()).unwrap();
    let m = repo.load(&id).unwrap();
    let d = m.disks.iter().find(|d| d.target == "vdb").unwrap();
    let index = repo.get_index(&id, d).unwrap();
    let victim = *index.chunks.iter().flatten().next().unwrap();
    let path = place.repo().join(chunk::object_name(&victim));
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let mine = work.path().join("nbd.sock");
    let s = Server::start(
        &place,
        &work.path().join("damaged.log"),
        &[&id, "--socket", &mine.to_string_lossy(), "--disk", "vdb"],
    );
    assert_eq!(s.doc["serve"]["exports"].as_array().unwrap().len(), 1);
    let out = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &s.uri("vdb"),
        &work.path().join("bad.raw").to_string_lossy(),
    ]);
    assert!(!out.status.success(), "a damaged chunk read without error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Input/output error"), "{err}");
    let hex = chunk::hex(&victim);
    assert!(
        s.log()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains(&hex)),
        "the log does not name chunk {hex}: {}",
        s.log()
    );
    assert_eq!(s.terminate(), 143);
    assert!(!mine.exists());
}

#[test]
fn bad_input_is_refused_with_exit_2_and_an_idle_server_stops_by_itself() {
    let vm = TestVmBuilder::new("serve-in").start().expect("guest boots");
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    let work = tempfile::tempdir_in("/var/tmp").unwrap();

    let r = vmbackup(&place, &["serve", "web-20990101T000000Z-0000"]);
    assert_eq!(r.code, 2, "unknown id: {}", r.json);
    let r = vmbackup(&place, &["serve", &id, "--disk", "vdz"]);
    assert_eq!(r.code, 2, "unknown disk: {}", r.json);
    assert!(
        r.json["error"].as_str().unwrap().contains("vda"),
        "{}",
        r.json
    );
    let taken = work.path().join("taken");
    std::fs::write(&taken, b"not a socket").unwrap();
    let r = vmbackup(
        &place,
        &["serve", &id, "--socket", &taken.to_string_lossy()],
    );
    assert_eq!(r.code, 2, "existing socket path: {}", r.json);
    assert_eq!(std::fs::read(&taken).unwrap(), b"not a socket");
    let r = vmbackup(&place, &["serve", &id, "--socket", "/tmp/x", "--port", "0"]);
    assert_eq!(r.code, 2, "--socket and --port: {}", r.json);
    let locks = std::fs::read_dir(place.repo().join("locks"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(locks, 0, "bad input left a lock");

    // Loopback TCP, and an idle timeout: it stops by itself (exit 0) once the client is gone.
    let mut s = Server::start(
        &place,
        &work.path().join("tcp.log"),
        &[&id, "--port", "0", "--idle-timeout", "2"],
    );
    let port = s.doc["serve"]["port"].as_u64().unwrap();
    assert_eq!(s.uri("vda"), format!("nbd://127.0.0.1:{port}/vda"));
    let disks = restored(&place, &id, work.path());
    assert_identical(&disks[0].1, &s.uri("vda"));
    let t = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "no idle stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0), "{}", s.log());
    let left: Vec<_> = files_in(&place.state())
        .into_iter()
        .filter(|f| f.ends_with(".sock"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
