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
use vmbackup::repository::crypt::Unlock;
use vmbackup::repository::disk::restore_disk;
use vmbackup::repository::Repository;
use vmbackup_testkit::garage::S3Place;
use vmbackup_testkit::libvirt_vm::{Format, TestVmBuilder};

/// A running `vmbackup serve`, its announcement, and its log in a file.
struct Server {
    child: Child,
    doc: Value,
    log: PathBuf,
}

impl Server {
    fn start(place: &Place, log: &Path, args: &[&str]) -> Server {
        Server::start_at(
            &place.repo().to_string_lossy(),
            &place.state(),
            &[],
            log,
            args,
        )
    }

    /// On repository `repo` (a folder or an `s3://` URL), with `env` set.
    fn start_at(
        repo: &str,
        state: &Path,
        env: &[(&str, String)],
        log: &Path,
        args: &[&str],
    ) -> Server {
        let mut child = Command::new(binary())
            .arg("--json")
            .arg("--repo")
            .arg(repo)
            .arg("--state-dir")
            .arg(state)
            .arg("serve")
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
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
        let doc: Value = vmbackup_testkit::cli::parse_one_document(&line).unwrap_or_else(|e| {
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
    restored_from(&Repository::open(&place.repo()).unwrap(), id, dir)
}

fn restored_from(repo: &Repository, id: &str, dir: &Path) -> Vec<(String, PathBuf)> {
    let m = repo.load(id).unwrap();
    m.disks
        .iter()
        .map(|d| {
            let out = dir.join(format!("{}.raw", d.target));
            let index = repo.get_index(id, d).unwrap();
            let t = Instant::now();
            restore_disk(repo, &index, &out, 2, &|_, _| {}).unwrap();
            eprintln!(
                "restore of {} (library, 2 threads): {:?}",
                d.target,
                t.elapsed()
            );
            (d.target.clone(), out)
        })
        .collect()
}

#[test]
fn a_served_backup_reads_as_the_restored_disks_and_a_damaged_chunk_is_an_io_error() {
    // vdc: 128 MiB of incompressible data on a 256 MiB disk (the throughput figure).
    let (_fill, vdc) = filled_disk("vdc", 256 * MIB, 128);
    let vm = TestVmBuilder::new("serve")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .disk_spec(vdc)
        .start()
        .expect("guest boots");
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
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
        &s.uri("vdc"),
        &copy.to_string_lossy(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vdc = &disks.iter().find(|(t, _)| t == "vdc").unwrap().1;
    eprintln!(
        "qemu-img convert of vdc ({} MiB) from the export: {:?}",
        std::fs::metadata(vdc).unwrap().len() >> 20,
        t.elapsed()
    );
    let out = qemu_img(&[
        "compare",
        "-F",
        "raw",
        &copy.to_string_lossy(),
        &vdc.to_string_lossy(),
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
    assert_eq!(names, ["vdb", "vdc"], "{info}");
    for e in exports {
        assert_eq!(e["is_read_only"], true, "{e}");
    }
    let vdb_size = std::fs::metadata(&disks.iter().find(|(t, _)| t == "vdb").unwrap().1)
        .unwrap()
        .len();
    assert_eq!(exports[0]["export-size"].as_u64(), Some(vdb_size));
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
    let vm = TestVmBuilder::new("serve-in")
        .disk("vdb", Format::Raw, 16 * MIB)
        .start()
        .expect("guest boots");
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    let work = tempfile::tempdir_in("/var/tmp").unwrap();

    let r = vmbackup(&place, &["serve", "web-20990101T000000Z-0000"]);
    assert_eq!(r.code, 2, "unknown id: {}", r.json);
    let r = vmbackup(&place, &["serve", &id, "--disk", "vdz"]);
    assert_eq!(r.code, 2, "unknown disk: {}", r.json);
    assert!(
        r.json["error"]["message"].as_str().unwrap().contains("vdb"),
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
    assert_eq!(s.uri("vdb"), format!("nbd://127.0.0.1:{port}/vdb"));
    let disks = restored(&place, &id, work.path());
    assert_identical(&disks[0].1, &s.uri("vdb"));
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

#[test]
fn an_encrypted_backup_is_served_decrypted_and_checked() {
    let vm = TestVmBuilder::new("serve-enc")
        .disk("vdb", Format::Qcow2, 32 * MIB)
        .start()
        .expect("guest boots");
    let place = Place::new();
    let key = place.dir.path().join("repo.key");
    let key_arg = key.to_str().unwrap();
    let i = vmbackup(&place, &["init", "--encrypt", "--key-file", key_arg]);
    assert_eq!(i.code, 0, "{}", i.stderr);
    let id = backup_id(&place, &[vm.name(), "--key-file", key_arg]);
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let repo = Repository::open_unlocked(&place.repo(), &Unlock::key_file(&key)).unwrap();
    let disks = restored_from(&repo, &id, work.path());
    drop(repo);
    let sock = work.path().join("enc.sock");
    let s = Server::start(
        &place,
        &work.path().join("enc.log"),
        &[
            &id,
            "--key-file",
            key_arg,
            "--socket",
            &sock.to_string_lossy(),
        ],
    );
    assert_identical(&disks[0].1, &s.uri("vdb"));
    assert_eq!(s.terminate(), 143);
    assert!(!sock.exists());
}

#[test]
fn a_backup_in_garage_is_served_with_its_chunks_fetched_on_demand() {
    let vm = TestVmBuilder::new("serve-s3")
        .disk("vdb", Format::Qcow2, 32 * MIB)
        .start()
        .expect("guest boots");
    vm.write_file("/mnt/vdb/marker", b"in the bucket\n")
        .unwrap();
    let place = S3Place::new("serve");
    let b = place.run(binary(), &["backup", vm.name()]);
    assert_eq!(b.code, 0, "{}", b.stderr);
    let id = b.json["results"][0]["backup"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", b.json))
        .to_string();
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    // What the restore path makes of it, read from the same bucket.
    let repo = Repository::open_with(
        place.dir.path(),
        Box::new(place.garage.store(&place.prefix)),
    )
    .unwrap();
    let disks = restored_from(&repo, &id, work.path());
    drop(repo);
    let sock = work.path().join("s3.sock");
    let s = Server::start_at(
        &place.url(),
        &place.state(),
        &place.garage.env(),
        &work.path().join("s3.log"),
        &[&id, "--socket", &sock.to_string_lossy()],
    );
    for (target, image) in &disks {
        assert_identical(image, &s.uri(target));
    }
    // The shared lock is held in the bucket while serving: a gc is refused (busy).
    let gc = place.run(binary(), &["gc"]);
    assert_eq!(gc.code, 4, "{}", gc.stderr);
    assert_eq!(s.terminate(), 143);
    assert!(!sock.exists());
    let locks: Vec<String> = place
        .objects()
        .into_iter()
        .filter(|o| o.starts_with("locks/"))
        .collect();
    assert!(locks.is_empty(), "locks left in the bucket: {locks:?}");
}
