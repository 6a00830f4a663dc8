//! README's demo works from a clone in a folder QEMU cannot traverse: libvirt runs QEMU as
//! `libvirt-qemu`, which cannot open a kernel under root's home (mode 0700), so the test kit
//! must boot the guest from a copy staged outside the clone.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn git(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    use std::io::Write as _;
    let mut child = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run git");
    if let Some(data) = stdin {
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Clones `checkout` into `dest` with what `checkout` holds now: HEAD, plus uncommitted
/// changes and files not yet added. The clone builds into the same target folder as
/// `checkout`, whose artifacts must stay those of these sources.
fn clone_as_is(checkout: &Path, dest: &Path) {
    let head = String::from_utf8(git(checkout, &["rev-parse", "HEAD"], None)).unwrap();
    let parent = dest.parent().unwrap();
    let dest_s = dest.to_str().unwrap();
    git(
        parent,
        &[
            "clone",
            "--quiet",
            "--no-hardlinks",
            checkout.to_str().unwrap(),
            dest_s,
        ],
        None,
    );
    git(
        dest,
        &["checkout", "--quiet", "--detach", head.trim()],
        None,
    );
    let diff = git(checkout, &["diff", "HEAD", "--binary"], None);
    if !diff.is_empty() {
        git(dest, &["apply", "--whitespace=nowarn"], Some(&diff));
    }
    let untracked = git(
        checkout,
        &["ls-files", "-z", "--others", "--exclude-standard"],
        None,
    );
    for rel in untracked.split(|b| *b == 0).filter(|p| !p.is_empty()) {
        let rel = Path::new(std::str::from_utf8(rel).unwrap());
        let to = dest.join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(checkout.join(rel), &to).unwrap();
    }
}

/// A copy of a binary, put back in place (by a rename) when dropped.
struct KeepBinary {
    path: PathBuf,
    copy: PathBuf,
}

impl KeepBinary {
    fn new(path: &Path) -> KeepBinary {
        let copy = path.with_file_name(format!(".vmbackup-kept-{}", std::process::id()));
        std::fs::copy(path, &copy).expect("keep a copy of the test binary");
        KeepBinary {
            path: path.to_path_buf(),
            copy,
        }
    }
}

impl Drop for KeepBinary {
    fn drop(&mut self) {
        if let Err(e) = std::fs::rename(&self.copy, &self.path) {
            eprintln!("cannot put {} back: {e}", self.path.display());
        }
    }
}

#[test]
fn demo_runs_from_a_clone_in_a_folder_qemu_cannot_traverse() {
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    // target/debug/vmbackup -> target: the clone builds into this checkout's target folder,
    // so only the workspace's own crates are compiled again.
    let target = Path::new(env!("CARGO_BIN_EXE_vmbackup"))
        .parent()
        .and_then(Path::parent)
        .unwrap();
    let home = tempfile::Builder::new()
        .prefix("vmbt-home-")
        .tempdir_in("/root")
        .expect("a folder in /root");
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let clone = home.path().join("vmbackup");
    clone_as_is(checkout, &clone);

    let mut demo = Command::new("timeout");
    demo.arg("1500")
        .arg(clone.join("scripts/demo"))
        .current_dir(&clone)
        .env("CARGO_TARGET_DIR", target)
        .env("VMBACKUP_SKIP_APT", "1")
        // scripts/demo points it at the clone's own vm-images/out.
        .env_remove("VMBACKUP_GUEST_DIR");
    // The clone builds its own guest image (in the 0700 folder), from the kernel package this
    // checkout downloaded already.
    let cache = checkout.join("vm-images/cache");
    if std::env::var_os("VMBACKUP_GUEST_CACHE").is_none() && cache.is_dir() {
        demo.env("VMBACKUP_GUEST_CACHE", &cache);
    }
    // The demo builds the binary as shipped (no fail points) into the shared target folder;
    // the test targets that run after this one need the binary this suite was built with.
    let _restore = KeepBinary::new(Path::new(env!("CARGO_BIN_EXE_vmbackup")));
    let out = demo.output().expect("run scripts/demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/demo in {} failed: {}\n----- stdout -----\n{stdout}\n----- stderr -----\n{stderr}",
        clone.display(),
        out.status
    );
    assert!(
        stdout.contains("/hello in the guest after the restore"),
        "the demo did not get to the restore:\n{stdout}"
    );
}
