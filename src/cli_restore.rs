//! `vmbackup restore --dry-run`: every check of a restore, and what it would create or
//! replace (`restore::dry_run`); nothing changes, no job is recorded.

use std::time::Duration;

use vmbackup::config::Config;
use vmbackup::error::exit;
use vmbackup::hypervisor::libvirt::Libvirt;
use vmbackup::unlock::open_repo;

use crate::{human_bytes, Output};

pub fn cmd_restore_dry_run(
    cfg: &Config,
    id: &str,
    power_off: bool,
    as_name: Option<&str>,
    new_macs: bool,
    force: bool,
    retry_lock: Option<Duration>,
) -> anyhow::Result<Output> {
    let opts = crate::restore_options(cfg, power_off, as_name, new_macs, force);
    let lv = Libvirt::open(&cfg.connect)?;
    let repo = open_repo(cfg)?;
    let p = vmbackup::retry::retry_busy(retry_lock, vmbackup::Error::is_busy, || {
        vmbackup::restore::dry_run(&lv, &repo, &cfg.state_dir, id, &opts)
    })?;
    let mut text = format!(
        "would restore {} onto {}: {} its definition{}\n",
        p.id,
        p.vm,
        if p.replaces_definition {
            "replace"
        } else {
            "create"
        },
        if p.powers_off {
            " (after shutting it down)"
        } else {
            ""
        }
    );
    for d in &p.disks {
        text.push_str(&format!(
            "  {} {:<7} {} ({} {}, {} of data)\n",
            d.target,
            if d.replaces { "replace" } else { "create" },
            d.path,
            human_bytes(d.size_bytes),
            d.format,
            human_bytes(d.data_bytes)
        ));
    }
    for s in &p.state {
        text.push_str(&format!("  {s}\n"));
    }
    text.push_str("nothing changed (dry run)\n");
    Ok(Output {
        text,
        json: crate::body(vmbackup::contract::RestoreBody {
            dry_run: true,
            restore: vmbackup::contract::Restore::Plan(p),
        }),
        code: exit::OK,
    })
}
