//! An encrypted repository (`init --encrypt --key-file`) with a real VM: nothing of the
//! guest's data or its chunks' SHA-256 names is readable in the repository folder; list,
//! verify, incremental backup and restore work with the key; without it, or with a wrong one,
//! every command exits 2 and changes nothing; a changed byte in a chunk or a manifest fails
//! verify and restore, which name it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use vmbackup::repository::crypt::Unlock;
use vmbackup::repository::{chunk, Repository};
use vmbackup_testkit::libvirt_vm::{Format, TestVmBuilder};

/// Every file below `root` (relative path -> content).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// 64 KiB the guest writes: incompressible bytes with `marker` every 4 KiB (so an
/// unencrypted repository stores it as is, and a grep finds it there).
fn payload(marker: &[u8], seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    for at in (0..v.len() - marker.len()).step_by(4096) {
        v[at..at + marker.len()].copy_from_slice(marker);
    }
    v
}

fn flip(path: &Path, at_from_end: usize) {
    let mut b = std::fs::read(path).unwrap();
    let i = b.len() - at_from_end;
    b[i] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

#[test]
fn an_encrypted_repository_hides_the_guest_data_and_detects_tampering() {
    let vm = TestVmBuilder::new("enc")
        .disk("vdb", Format::Qcow2, 64 * MIB)
        .start()
        .expect("guest boots");
    let marker = b"VMBACKUP-ENCRYPTION-MARKER-7f3a9c";
    let first = payload(marker, 0x5eed);
    vm.write_file("/mnt/vdb/first", &first).unwrap();

    let place = Place::new();
    let key = place.dir.path().join("repo.key");
    let key_arg = key.to_str().unwrap();
    // init in key-file mode (no passphrase, no terminal: stdin is not one here).
    let i = vmbackup(&place, &["init", "--encrypt", "--key-file", key_arg]);
    assert_eq!(i.code, 0, "{}", i.stderr);
    assert_eq!(i.json["init"]["passphrase"], false, "{}", i.json);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // init again: exit 2, nothing changed, the key file kept.
    let before = snapshot(&place.repo());
    let key_before = std::fs::read(&key).unwrap();
    let again = vmbackup(&place, &["init", "--encrypt", "--key-file", key_arg]);
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert_eq!(snapshot(&place.repo()), before);
    assert_eq!(std::fs::read(&key).unwrap(), key_before);

    // The same guest in an unencrypted repository (first: the encrypted backup's bitmap is
    // then the newest, for the incremental one below): the control that the grep below
    // can find what it looks for.
    let plain = Place::new();
    backup_id(&plain, &[vm.name()]);
    let b1 = backup_id(&place, &[vm.name(), "--key-file", key_arg]);
    let plain_files = snapshot(&plain.repo());
    assert!(
        plain_files.values().any(|c| contains(c, marker)),
        "the marker is in the unencrypted repository"
    );
    let sha_names: Vec<String> = plain_files
        .keys()
        .filter(|p| p.starts_with("chunks"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(!sha_names.is_empty());

    // Nothing readable: no marker, no SHA-256 chunk name (as a name, hex or raw bytes),
    // no VM name inside any file but the names of objects, no domain XML.
    let enc_files = snapshot(&place.repo());
    for (path, content) in &enc_files {
        assert!(!contains(content, marker), "marker in {}", path.display());
        assert!(!contains(content, b"<domain"), "XML in {}", path.display());
        for n in &sha_names {
            assert!(
                !path.to_string_lossy().contains(n.as_str()),
                "{n} names {}",
                path.display()
            );
            assert!(
                !contains(content, n.as_bytes()),
                "{n} in {}",
                path.display()
            );
            let raw: Vec<u8> = (0..32)
                .map(|i| u8::from_str_radix(&n[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            assert!(!contains(content, &raw), "{n} (raw) in {}", path.display());
        }
    }
    let sealed = enc_files
        .iter()
        .filter(|(p, _)| p.starts_with("chunks") || p.starts_with("backups"))
        .count();
    assert!(sealed > 2);
    assert!(enc_files
        .iter()
        .filter(|(p, _)| p.starts_with("chunks") || p.starts_with("backups"))
        .all(|(_, c)| c.starts_with(b"VMBE")));

    // With the key: list and verify.
    let l = vmbackup(&place, &["list", "--key-file", key_arg]);
    assert_eq!(l.code, 0, "{}", l.stderr);
    assert_eq!(l.json["backups"][0]["id"], b1.as_str());
    let v = vmbackup(&place, &["verify", "--key-file", key_arg]);
    assert_eq!(v.code, 0, "{}", v.json);

    // Without the key, with another repository's key, with a garbled key file: exit 2, and
    // no object (nor the VM's disks, nor its definition) changed.
    let other = Place::new();
    let other_key = other.dir.path().join("other.key");
    let o = vmbackup(
        &other,
        &[
            "init",
            "--encrypt",
            "--key-file",
            other_key.to_str().unwrap(),
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let garbled = place.dir.path().join("garbled.key");
    std::fs::write(
        &garbled,
        "{\"vmbackup_key\":1,\"repository\":\"x\",\"key\":\"00\"}",
    )
    .unwrap();
    let before = snapshot(&place.repo());
    let xml = vm.dom().inactive_xml().unwrap();
    let vm_files = files_in(vm.dir());
    for keyed in [
        vec![],
        vec!["--key-file", other_key.to_str().unwrap()],
        vec!["--key-file", garbled.to_str().unwrap()],
    ] {
        for cmd in [
            vec!["list"],
            vec!["verify"],
            vec!["backup", vm.name()],
            vec!["restore", &b1, "--force", "--power-off"],
            vec!["delete", &b1],
            vec!["gc"],
            vec!["prune"],
        ] {
            let args = [&cmd[..], &keyed[..]].concat();
            let r = vmbackup(&place, &args);
            assert_eq!(r.code, 2, "{args:?}: {}", r.json);
            let e = r.json["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
                + &r.json.to_string();
            assert!(
                e.contains("encrypted") || e.contains("key"),
                "{args:?}: {}",
                r.json
            );
        }
    }
    assert_eq!(snapshot(&place.repo()), before, "an object changed");
    assert!(vm.dom().is_active().unwrap());
    assert_eq!(vm.dom().inactive_xml().unwrap(), xml);
    assert_eq!(files_in(vm.dir()), vm_files);

    // An incremental backup works encrypted.
    let second = payload(marker, 0xbeef);
    vm.write_file("/mnt/vdb/second", &second).unwrap();
    let b2 = backup_id(&place, &[vm.name(), "--key-file", key_arg]);
    let show = vmbackup(&place, &["show", &b2, "--key-file", key_arg]);
    assert_eq!(show.code, 0, "{}", show.stderr);
    let disks = show.json["manifest"]["disks"].as_array().unwrap();
    let vdb = disks.iter().find(|d| d["target"] == "vdb").unwrap();
    assert_eq!(vdb["read"]["mode"], "incremental", "{}", show.json);
    assert!(!snapshot(&place.repo())
        .values()
        .any(|c| contains(c, marker)));

    // A flipped byte in a chunk of the second backup: verify names the chunk, a restore
    // fails naming it and the backup, and the VM is not touched.
    let repo = Repository::open_unlocked(&place.repo(), &Unlock::key_file(&key)).unwrap();
    let m = repo.load(&b2).unwrap();
    let d = m.disks.iter().find(|d| d.target == "vdb").unwrap();
    let index = repo.get_index(&b2, d).unwrap();
    let victim = index.chunks.iter().flatten().next().copied().unwrap();
    let victim_hex = chunk::hex(&victim);
    let victim_path = place.repo().join(chunk::object_name(&victim));
    drop(repo);
    flip(&victim_path, 1000);
    let v = vmbackup(&place, &["verify", &b2, "--key-file", key_arg]);
    assert_eq!(v.code, 1, "{}", v.json);
    assert!(v.json.to_string().contains(&victim_hex), "{}", v.json);
    // Changed after the backup: the restore below brings the backup's content back.
    vm.write_file("/mnt/vdb/first", b"changed after the backup")
        .unwrap();
    vm.shutdown(Duration::from_secs(60)).unwrap();
    let r = vmbackup(&place, &["restore", &b2, "--force", "--key-file", key_arg]);
    assert_eq!(r.code, 1, "{}", r.json);
    let err = r.json["error"]["message"].as_str().unwrap();
    assert!(err.contains(&victim_hex) && err.contains(&b2), "{err}");
    assert_eq!(files_in(vm.dir()), vm_files, "the restore left files");
    flip(&victim_path, 1000);

    // A flipped byte in the first backup's manifest: verify and restore name it.
    let manifest = place.repo().join(format!("backups/{b1}/manifest.json"));
    flip(&manifest, 20);
    let v = vmbackup(&place, &["verify", &b1, "--key-file", key_arg]);
    assert_eq!(v.code, 1, "{}", v.json);
    let t = v.json.to_string();
    assert!(t.contains(&b1) && t.contains("manifest"), "{t}");
    let l = vmbackup(&place, &["list", "--key-file", key_arg]);
    assert_eq!(l.json["unreadable"][0]["id"], b1.as_str(), "{}", l.json);
    let r = vmbackup(&place, &["restore", &b1, "--force", "--key-file", key_arg]);
    assert_eq!(r.code, 1, "{}", r.json);
    let err = r.json["error"]["message"].as_str().unwrap();
    assert!(err.contains(&b1) && err.contains("manifest"), "{err}");
    flip(&manifest, 20);

    // Restored with the key: the guest reads what it wrote before each backup.
    let r = vmbackup(&place, &["restore", &b2, "--force", "--key-file", key_arg]);
    assert_eq!(r.code, 0, "{}", r.json);
    vm.dom().start().unwrap();
    vm.wait_agent(Duration::from_secs(180)).unwrap();
    assert!(vm.read_file("/mnt/vdb/first").unwrap() == first);
    assert!(vm.read_file("/mnt/vdb/second").unwrap() == second);
    let v = vmbackup(&place, &["verify", "--key-file", key_arg]);
    assert_eq!(v.code, 0, "{}", v.json);
}

/// Runs the binary with `env` set and stdin not a terminal; returns (exit code, stdout JSON).
fn run_env(place: &Place, env: &[(&str, &str)], args: &[&str]) -> (i32, serde_json::Value) {
    let out = std::process::Command::new(binary())
        .arg("--json")
        .arg("--repo")
        .arg(place.repo())
        .arg("--state-dir")
        .arg(place.state())
        .args(args)
        .env_remove("VMBACKUP_CONFIG")
        .env_remove("VMBACKUP_KEY_FILE")
        .env_remove("VMBACKUP_PASSPHRASE_FILE")
        .env_remove("VMBACKUP_PASSPHRASE_COMMAND")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let json = vmbackup_testkit::cli::parse_one_document(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), json)
}

#[test]
fn a_passphrase_from_a_file_or_a_command_unlocks_and_a_wrong_one_is_refused() {
    let place = Place::new();
    let pass = place.dir.path().join("pass");
    std::fs::write(&pass, "correct horse battery\n").unwrap();
    let wrong = place.dir.path().join("wrong");
    std::fs::write(&wrong, "incorrect horse\n").unwrap();
    let file = ("VMBACKUP_PASSPHRASE_FILE", pass.to_str().unwrap());
    // No passphrase, no key file, no terminal: refused, nothing made.
    let (code, j) = run_env(&place, &[], &["init", "--encrypt"]);
    assert_eq!(code, 2, "{j}");
    assert!(!place.repo().join("config.json").exists());
    // --key-file without --encrypt: bad usage.
    let key = place.dir.path().join("key");
    let (code, _) = run_env(&place, &[], &["init", "--key-file", key.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(!key.exists());
    // A passphrase and a key file: both open it.
    let (code, j) = run_env(
        &place,
        &[file],
        &["init", "--encrypt", "--key-file", key.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["init"]["passphrase"], true);
    let cmd = format!("cat {}", pass.display());
    for env in [
        vec![file],
        vec![("VMBACKUP_PASSPHRASE_COMMAND", cmd.as_str())],
        vec![("VMBACKUP_KEY_FILE", key.to_str().unwrap())],
    ] {
        let (code, j) = run_env(&place, &env, &["list"]);
        assert_eq!(code, 0, "{env:?}: {j}");
    }
    let before = snapshot(&place.repo());
    let wrong_cmd = format!("cat {}", wrong.display());
    for env in [
        vec![("VMBACKUP_PASSPHRASE_FILE", wrong.to_str().unwrap())],
        vec![("VMBACKUP_PASSPHRASE_COMMAND", wrong_cmd.as_str())],
        vec![("VMBACKUP_PASSPHRASE_COMMAND", "false")],
        vec![],
    ] {
        let (code, j) = run_env(&place, &env, &["gc"]);
        assert_eq!(code, 2, "{env:?}: {j}");
        assert!(!j.to_string().contains("horse"), "{j}");
    }
    assert_eq!(snapshot(&place.repo()), before);
    // A key given for an unencrypted repository is refused (nothing would be encrypted).
    let plain = Place::new();
    let (code, _) = run_env(&plain, &[], &["init"]);
    assert_eq!(code, 0);
    let (code, j) = run_env(&plain, &[file], &["list"]);
    assert_eq!(code, 2, "{j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not encrypted"),
        "{j}"
    );
}
