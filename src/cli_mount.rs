//! `mount`, `umount` and the hidden `mount-daemon` of the binary (see `vmbackup::mount`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use vmbackup::config::Config;
use vmbackup::error::exit;
use vmbackup::unlock::open_repo;

use crate::{human_bytes, Output};

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The global options that give the background process this command's repository, key and
/// state folder (its environment is this process's).
fn global_args(cfg: &Config, config: Option<&Path>) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["--repo".into()];
    a.push(match cfg.repo.local() {
        Some(p) => absolute(p).into_os_string(),
        None => cfg.repo.to_string().into(),
    });
    a.push("--state-dir".into());
    a.push(absolute(&cfg.state_dir).into_os_string());
    if let Some(k) = &cfg.key_file {
        a.push("--key-file".into());
        a.push(absolute(k).into_os_string());
    }
    if let Some(c) = config {
        a.push("--config".into());
        a.push(absolute(c).into_os_string());
    }
    a
}

pub fn cmd_mount(
    cfg: &Config,
    config: Option<&Path>,
    id: &str,
    dir: &Path,
    disks: &[String],
) -> anyhow::Result<Output> {
    let repo = open_repo(cfg)?;
    let opts = vmbackup::mount::Options {
        id: id.to_string(),
        dir: dir.to_path_buf(),
        disks: disks.to_vec(),
        global_args: global_args(cfg, config),
    };
    let r = vmbackup::mount::mount(&repo, &cfg.state_dir, &opts)?;
    let mut text = format!(
        "backup {} of {} mounted read-only under {}:\n",
        r.backup,
        r.vm,
        r.dir.display()
    );
    for f in &r.filesystems {
        let part = f
            .partition
            .map(|n| format!("partition {n}"))
            .unwrap_or_else(|| "whole disk".into());
        text.push_str(&format!(
            "  {:<24} {:<6} {} {}, {}\n",
            f.mountpoint.display(),
            f.fstype,
            f.disk,
            part,
            human_bytes(f.size)
        ));
    }
    for s in &r.skipped {
        text.push_str(&format!(
            "  not mounted: {}\n",
            vmbackup::mount::describe_skipped(s)
        ));
    }
    text.push_str(&format!("undo with: vmbackup umount {}\n", r.dir.display()));
    Ok(Output {
        json: crate::body(vmbackup::contract::MountBody {
            mount: vmbackup::contract::MountView {
                loop_devices: r
                    .filesystems
                    .iter()
                    .filter_map(|f| f.loop_device.clone())
                    .collect(),
                daemon_pid: r.daemon.as_ref().map(|d| d.pid),
                backup_id: r.backup,
                vm: r.vm,
                dir: r.dir,
                filesystems: r.filesystems,
                skipped: r.skipped,
                disks: r.disks,
                log: r.log,
            },
        }),
        text,
        code: exit::OK,
    })
}

pub fn cmd_umount(cfg: &Config, dir: &Path) -> anyhow::Result<Output> {
    let c = vmbackup::mount::umount(&cfg.state_dir, dir)?;
    let mut text = String::new();
    for d in &c.done {
        text.push_str(&format!("{d}\n"));
    }
    text.push_str(&format!(
        "backup {} is no longer mounted under {}\n",
        c.backup,
        c.dir.display()
    ));
    Ok(Output {
        json: crate::body(vmbackup::contract::UmountBody { umount: c }),
        text,
        code: exit::OK,
    })
}

pub fn cmd_mount_daemon(
    cfg: &Config,
    id: &str,
    at: &Path,
    disks: &[String],
) -> anyhow::Result<Output> {
    let repo = std::sync::Arc::new(open_repo(cfg)?);
    let opts = vmbackup::mount::fuse::DaemonOptions {
        id: id.to_string(),
        disks: disks.to_vec(),
        at: at.to_path_buf(),
    };
    vmbackup::mount::fuse::daemon(repo, &opts)?;
    Ok(Output {
        json: serde_json::Value::Null,
        text: String::new(),
        code: exit::OK,
    })
}
