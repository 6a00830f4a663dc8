//! Throwaway plain QEMU VMs (not managed by libvirt) for the tests of the QMP path: the test
//! guest of `vm-images/build`, its QMP and guest-agent sockets named as `hypervisor::qmp`
//! expects (`NAME.qmp`, `NAME.qga` in the VM's folder), plus `harness.qmp`, the harness's
//! own monitor. It boots the same staged copy of the guest as `crate::libvirt_vm`. Dropping
//! it stops QEMU and removes the folder, whatever happened; during a panic the console is
//! printed first.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vmbackup::hypervisor::qmp::QemuVm;

use crate::error::{KitError, Result};
use crate::guest;
use crate::libvirt_vm::{test_root, PREFIX};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct TestQemu {
    name: String,
    dir: PathBuf,
    child: Option<Child>,
    vm: Option<QemuVm>,
}

impl TestQemu {
    /// Starts QEMU (TCG) with `disks` as virtio disks with serials `vdb`, `vdc`, ... and waits
    /// until its guest agent answers.
    pub fn start(
        hint: &str,
        disks: &[(PathBuf, &str)],
        boot_timeout: Duration,
    ) -> Result<TestQemu> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{PREFIX}{}-q{n}-{hint}", std::process::id());
        let dir = test_root().join(&name);
        guest::make_public_dir(&dir)?;
        let mut t = TestQemu {
            name: name.clone(),
            dir: dir.clone(),
            child: None,
            vm: None,
        };
        let image = guest::staged_guest()?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-machine", "pc", "-kernel"])
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join(format!("{name}.qmp")).display()
        ))
        // A second monitor for the harness: `NAME.qmp` stays free for vmbackup.
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("harness.qmp").display()
        ))
        .arg("-chardev")
        .arg(format!(
            "socket,path={},server=on,wait=off,id=qga0",
            dir.join(format!("{name}.qga")).display()
        ))
        .args(["-device", "virtio-serial-pci"])
        .args([
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ])
        .args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:51:00:01",
        ]);
        for (i, (path, fmt)) in disks.iter().enumerate() {
            let serial = format!("vd{}", (b'b' + i as u8) as char);
            cmd.arg("-blockdev").arg(
                serde_json::json!({"driver": "file", "filename": path.to_string_lossy(),
                    "node-name": format!("file-{serial}"), "discard": "unmap"})
                .to_string(),
            );
            cmd.arg("-blockdev").arg(
                serde_json::json!({"driver": fmt, "file": format!("file-{serial}"),
                    "node-name": format!("fmt-{serial}"), "discard": "unmap"})
                .to_string(),
            );
            cmd.arg("-device").arg(format!(
                "virtio-blk-pci,drive=fmt-{serial},id={serial},serial={serial}"
            ));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("qemu.log"))
                    .map_err(|e| KitError::io("create the QEMU log in", &dir, e))?,
            )
            .process_group(0);
        t.child = Some(cmd.spawn().map_err(|e| KitError::Command {
            program: "qemu-system-x86_64".into(),
            detail: e.to_string(),
        })?);
        let start = Instant::now();
        loop {
            if t.vm.is_none() {
                t.vm = QemuVm::open_paths(
                    &name,
                    &dir.join("harness.qmp"),
                    &dir.join(format!("{name}.qga")),
                )
                .ok();
            }
            if let Some(vm) = &t.vm {
                if vm.agent_ping(Duration::from_secs(2)).is_ok() {
                    return Ok(t);
                }
            }
            let exited = t
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some();
            if exited || start.elapsed() > boot_timeout {
                return Err(KitError::Timeout {
                    what: format!("the guest agent of {name}\n{}", t.diagnostics()),
                    secs: start.elapsed().as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn qemu(&self) -> &QemuVm {
        self.vm.as_ref().expect("connected")
    }

    pub fn diagnostics(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!(
            "----- console -----\n{}\n----- qemu -----\n{}\n-----",
            read("console.log"),
            read("qemu.log")
        )
    }
}

impl Drop for TestQemu {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "testqemu: test failed with {} alive\n{}",
                self.name,
                self.diagnostics()
            );
        }
        self.vm = None;
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(5) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
