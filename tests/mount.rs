//! `vmbackup mount` / `umount`: the file systems of a backup of a real test VM (real
//! libvirtd, QEMU, guest agent) mounted read-only on the host, its old files read back byte
//! for byte, and nothing left behind after `umount`, a failed `mount` or a signal.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use vmbackup_testkit::libvirt_vm::{Format, TestVmBuilder};

/// What a mount leaves while it is mounted, and must not leave after: records and private
/// folders in the state folder, loop devices backed by files under the test's folder, mounts
/// under it, background processes naming its state folder, and files in DIR.
fn leftovers(place: &Place, dir: &Path) -> Vec<String> {
    let root = place.dir.path();
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(place.state()) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("mount-") {
                out.push(format!("state: {n}"));
            }
        }
    }
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            if Path::new(b.trim()).starts_with(root) {
                out.push(format!("loop device {:?}: {}", e.file_name(), b.trim()));
            }
        }
    }
    for l in std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
    {
        let at = l.split(' ').nth(4).unwrap_or_default();
        if Path::new(at).starts_with(root) {
            out.push(format!("mount: {l}"));
        }
    }
    let state = place.state().to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            if c.contains("mount-daemon") && c.contains(&state) {
                out.push(format!("process {:?}: {c}", e.file_name()));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            out.push(format!("in DIR: {:?}", e.file_name()));
        }
    }
    out
}

fn assert_nothing_left(place: &Place, dir: &Path) {
    let l = leftovers(place, dir);
    assert!(l.is_empty(), "left behind: {l:#?}");
}

fn sha256(data: &[u8]) -> String {
    vmbackup::digest::sha256_hex(data)
}

#[test]
fn the_old_files_of_a_backup_are_read_from_a_read_only_mount_and_umount_leaves_nothing() {
    // Known files: 6 MiB of random bytes made with the disk (over chunk boundaries), and
    // small ones, one nested, written through the agent.
    let (fill, spec) = filled_disk("vdb", 128 * MIB, 6);
    let big = std::fs::read(fill.path().join("data")).unwrap();
    let vm = TestVmBuilder::new("mount")
        .disk_spec(spec)
        .start()
        .expect("guest boots");
    drop(fill);
    let note = b"kept in the backup\n".to_vec();
    let mut x: u64 = 0x2545F4914F6CDD1D;
    let bin: Vec<u8> = (0..(64 << 10))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    vm.sh("mkdir -p /mnt/vdb/etc/deep/er").unwrap();
    vm.write_file("/mnt/vdb/note.txt", &note).unwrap();
    vm.write_file("/mnt/vdb/etc/deep/er/data.bin", &bin)
        .unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    // Changed and deleted after the backup.
    vm.write_file("/mnt/vdb/note.txt", b"changed after\n")
        .unwrap();
    vm.sh("rm /mnt/vdb/etc/deep/er/data.bin /mnt/vdb/data && sync")
        .unwrap();

    let dir = place.dir.path().join("files");
    std::fs::create_dir(&dir).unwrap();
    let t = Instant::now();
    let r = vmbackup(&place, &["mount", &id, dir.to_str().unwrap()]);
    let took = t.elapsed();
    assert_eq!(r.code, 0, "{}\n{}", r.json, r.stderr);
    eprintln!("mount took {:.1} s", took.as_secs_f64());
    let m = &r.json["mount"];
    assert_eq!(m["backup_id"], id.as_str());
    let fs = m["filesystems"].as_array().unwrap();
    let vdb = fs
        .iter()
        .find(|f| f["disk"] == "vdb")
        .unwrap_or_else(|| panic!("vdb mounted: {m}"));
    assert_eq!(vdb["fstype"], "ext4");
    assert!(vdb["partition"].is_null());
    assert_eq!(vdb["options"], "ro,noload,nosuid,nodev,noexec");
    // As the kernel has it: no set-uid bits, device nodes or programs from a guest.
    let mine = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mine
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(dir.join("vdb").to_str().unwrap()))
        .unwrap_or_else(|| panic!("{} not in mountinfo", dir.join("vdb").display()));
    let opts = line.split(' ').nth(5).unwrap();
    for o in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(opts.split(',').any(|x| x == o), "{o} not in {opts}");
    }
    let at = dir.join("vdb");
    assert_eq!(vdb["mountpoint"], at.to_str().unwrap());
    assert!(m["daemon_pid"].as_i64().unwrap() > 0);
    assert!(!m["loop_devices"].as_array().unwrap().is_empty());

    // The old content, byte for byte, with ordinary reads.
    assert_eq!(std::fs::read(at.join("note.txt")).unwrap(), note);
    assert_eq!(std::fs::read(at.join("etc/deep/er/data.bin")).unwrap(), bin);
    assert_eq!(
        sha256(&std::fs::read(at.join("data")).unwrap()),
        sha256(&big)
    );
    let cp = place.dir.path().join("copied.bin");
    let out = Command::new("cp")
        .arg(at.join("etc/deep/er/data.bin"))
        .arg(&cp)
        .status()
        .unwrap();
    assert!(out.success());
    assert_eq!(std::fs::read(&cp).unwrap(), bin);

    // Read-only: writes fail with EROFS, on the file system and on the disk file under it.
    let e = std::fs::write(at.join("new.txt"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = std::fs::OpenOptions::new()
        .append(true)
        .open(at.join("note.txt"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let disk_file = PathBuf::from(m["disks"][0]["file"].as_str().unwrap());
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk_file)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    // Its private folder is root's alone.
    let private = disk_file.parent().unwrap().parent().unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(private).unwrap().permissions().mode() & 0o777,
        0o700
    );

    // No gc frees its chunks while it is mounted (the shared lock): busy.
    let gc = vmbackup(&place, &["gc"]);
    assert_eq!(gc.code, 4, "{}\n{}", gc.json, gc.stderr);

    // A second mount at the same folder, and bad input: exit 2, nothing changed.
    let before = leftovers(&place, &dir);
    let other = place.dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    for args in [
        vec!["mount", &id, dir.to_str().unwrap()],
        vec!["mount", &id, at.to_str().unwrap()],
        vec![
            "mount",
            "nosuch-20260101T000000Z-0000",
            other.to_str().unwrap(),
        ],
        vec!["mount", &id, other.to_str().unwrap(), "--disk", "vdz"],
        vec!["mount", &id, "/nonexistent/folder"],
        vec!["umount", other.to_str().unwrap()],
        vec!["umount", "/nonexistent/folder"],
    ] {
        let r = vmbackup(&place, &args);
        assert_eq!(r.code, 2, "{args:?}: {}\n{}", r.json, r.stderr);
        assert_eq!(r.json["ok"], false);
        assert_eq!(leftovers(&place, &dir), before, "{args:?}");
        assert!(std::fs::read_dir(&other).unwrap().next().is_none());
    }

    // A file system in use: umount refuses (busy) and keeps everything; then it succeeds.
    let held = std::fs::File::open(at.join("note.txt")).unwrap();
    let r = vmbackup(&place, &["umount", dir.to_str().unwrap()]);
    assert_eq!(r.code, 4, "{}\n{}", r.json, r.stderr);
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("busy"),
        "{}",
        r.json
    );
    assert_eq!(std::fs::read(at.join("note.txt")).unwrap(), note);
    drop(held);

    // umount: everything gone, DIR empty as it was; gc may run again.
    let r = vmbackup(&place, &["umount", dir.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}\n{}", r.json, r.stderr);
    assert_eq!(r.json["umount"]["backup_id"], id.as_str());
    assert_nothing_left(&place, &dir);
    assert!(dir.is_dir());
    let r = vmbackup(&place, &["umount", dir.to_str().unwrap()]);
    assert_eq!(r.code, 2, "a second umount: {}", r.json);
    ok(&vmbackup(&place, &["gc"]), "gc after umount");

    // A mount whose background process died: umount still cleans everything up.
    let r = vmbackup(
        &place,
        &["mount", &id, dir.to_str().unwrap(), "--disk", "vdb"],
    );
    assert_eq!(r.code, 0, "{}\n{}", r.json, r.stderr);
    assert_eq!(std::fs::read(at.join("note.txt")).unwrap(), note);
    let pid = r.json["mount"]["daemon_pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t0 = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the process lives");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = vmbackup(&place, &["umount", dir.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}\n{}", r.json, r.stderr);
    assert!(
        r.json["umount"].to_string().contains("had died"),
        "{}",
        r.json
    );
    assert_nothing_left(&place, &dir);

    // Damaged chunks: reading through the mount is an I/O error, never other data, and the
    // background process's log names the chunk.
    let r = vmbackup(&place, &["mount", &id, dir.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}\n{}", r.json, r.stderr);
    let log = PathBuf::from(r.json["mount"]["log"].as_str().unwrap());
    let repo = vmbackup::repository::Repository::open(&place.repo()).unwrap();
    let m = repo.load(&id).unwrap();
    let d = m.disks.iter().find(|d| d.target == "vdb").unwrap();
    for c in repo.get_index(&id, d).unwrap().chunks.iter().flatten() {
        let path = place
            .repo()
            .join(vmbackup::repository::chunk::object_name(c));
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 100;
        bytes[at] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
    }
    let mut f = std::fs::File::open(at.join("data")).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let err = loop {
        use std::io::Read;
        match f.read(&mut buf) {
            Ok(0) => panic!("the whole file read from damaged chunks"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(got, big[..got.len()], "wrong data before the error");
    drop(f);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("cannot read chunk"), "{text}");
    ok(
        &vmbackup(&place, &["umount", dir.to_str().unwrap()]),
        "umount",
    );
    assert_nothing_left(&place, &dir);
}

/// Writes `image` (a file) into `disk` at `offset`.
fn put(disk: &Path, offset: u64, image: &Path) {
    let data = std::fs::read(image).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&data).unwrap();
}

/// An ext4 image of `size` bytes holding `files`.
fn ext4_image(at: &Path, size: u64, files: &[(&str, &[u8])]) -> PathBuf {
    let fill = tempfile::tempdir_in(at).unwrap();
    for (name, data) in files {
        std::fs::write(fill.path().join(name), data).unwrap();
    }
    let img = at.join(format!("fs-{}.img", files[0].0));
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(fill.path())
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

fn sfdisk(disk: &Path, script: &str) {
    let mut c = Command::new("sfdisk")
        .arg("--quiet")
        .arg(disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (package fdisk)");
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success());
}

#[test]
fn partitions_of_gpt_and_mbr_disks_mount_by_number_and_the_rest_is_listed() {
    // vdc: GPT, 1 ext4, 2 swap. vdd: MBR, 1 ext4, 2 extended with logical 5 (ext4).
    let vm = TestVmBuilder::new("mount-parts")
        .blank_disk("vdc", Format::Raw, 64 * MIB)
        .blank_disk("vdd", Format::Raw, 64 * MIB)
        .define()
        .expect("defined");
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let vdc = vm
        .disk_paths()
        .iter()
        .find(|p| p.ends_with("vdc.raw"))
        .unwrap()
        .clone();
    let vdd = vm
        .disk_paths()
        .iter()
        .find(|p| p.ends_with("vdd.raw"))
        .unwrap()
        .clone();
    sfdisk(
        &vdc,
        "label: gpt\nstart=2048, size=40960, name=data\nstart=43008, size=8192, type=swap\n",
    );
    put(
        &vdc,
        2048 * 512,
        &ext4_image(work.path(), 20 * MIB, &[("hello.txt", b"gpt one\n")]),
    );
    let swap = work.path().join("swap.img");
    std::fs::File::create(&swap)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    assert!(Command::new("mkswap")
        .arg("-q")
        .arg(&swap)
        .status()
        .unwrap()
        .success());
    put(&vdc, 43008 * 512, &swap);
    sfdisk(
        &vdd,
        "label: dos\nstart=2048, size=30720, type=83\nstart=34816, type=5\nstart=36864, size=30720, type=83\n",
    );
    put(
        &vdd,
        2048 * 512,
        &ext4_image(work.path(), 15 * MIB, &[("one.txt", b"mbr primary\n")]),
    );
    put(
        &vdd,
        36864 * 512,
        &ext4_image(work.path(), 15 * MIB, &[("five.txt", b"mbr logical\n")]),
    );
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(120)).unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);

    let dir = place.dir.path().join("files");
    std::fs::create_dir(&dir).unwrap();
    let r = vmbackup(&place, &["mount", &id, dir.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}\n{}", r.json, r.stderr);
    assert_eq!(
        std::fs::read(dir.join("vdcp1/hello.txt")).unwrap(),
        b"gpt one\n"
    );
    assert_eq!(
        std::fs::read(dir.join("vddp1/one.txt")).unwrap(),
        b"mbr primary\n"
    );
    assert_eq!(
        std::fs::read(dir.join("vddp5/five.txt")).unwrap(),
        b"mbr logical\n"
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["vdcp1", "vddp1", "vddp5"]);
    let skipped = r.json["mount"]["skipped"].to_string();
    assert!(skipped.contains("swap"), "{skipped}");
    let text = vmbackup_text(&place, &["umount", dir.to_str().unwrap()]);
    assert!(text.contains("unmounted"), "{text}");
    assert_nothing_left(&place, &dir);
}

/// Runs the binary without `--json`; returns its stdout.
fn vmbackup_text(place: &Place, args: &[&str]) -> String {
    let out = Command::new(binary())
        .arg("--repo")
        .arg(place.repo())
        .arg("--state-dir")
        .arg(place.state())
        .args(args)
        .env_remove("VMBACKUP_CONFIG")
        .env_remove("VMBACKUP_JSON")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_mount_that_fails_or_is_interrupted_half_way_leaves_nothing() {
    // A disk with no file system: the background process starts, then nothing is mountable.
    let vm = TestVmBuilder::new("mount-fail")
        .blank_disk("vdb", Format::Qcow2, 32 * MIB)
        .disk("vdc", Format::Qcow2, 32 * MIB)
        .start()
        .expect("guest boots");
    vm.write_file("/mnt/vdc/f", b"x").unwrap();
    let place = Place::new();
    let id = backup_id(&place, &[vm.name()]);
    let dir = place.dir.path().join("files");
    std::fs::create_dir(&dir).unwrap();
    let r = vmbackup(
        &place,
        &["mount", &id, dir.to_str().unwrap(), "--disk", "vdb"],
    );
    assert_eq!(r.code, 1, "{}\n{}", r.json, r.stderr);
    let e = r.json["error"]["message"].as_str().unwrap();
    assert!(e.contains("nothing mountable") && e.contains("vdb"), "{e}");
    assert_nothing_left(&place, &dir);

    // SIGTERM once the mount has begun (its record exists): undone, exit 143.
    for _ in 0..3 {
        let child = Command::new(binary())
            .arg("--json")
            .arg("--repo")
            .arg(place.repo())
            .arg("--state-dir")
            .arg(place.state())
            .args(["mount", &id, dir.to_str().unwrap()])
            .env_remove("VMBACKUP_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let begun = || {
            std::fs::read_dir(place.state()).is_ok_and(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("mount-"))
            })
        };
        while !begun() {
            assert!(t0.elapsed() < Duration::from_secs(60), "no mount began");
            std::thread::sleep(Duration::from_millis(2));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(143));
        assert_nothing_left(&place, &dir);
    }
    // And then it mounts.
    let r = vmbackup(&place, &["mount", &id, dir.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}\n{}", r.json, r.stderr);
    assert_eq!(std::fs::read(dir.join("vdc/f")).unwrap(), b"x");
    assert!(r.json["mount"]["skipped"].to_string().contains("vdb"));
    ok(
        &vmbackup(&place, &["umount", dir.to_str().unwrap()]),
        "umount",
    );
    assert_nothing_left(&place, &dir);
}
