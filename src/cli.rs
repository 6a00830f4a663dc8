//! The command line of the contract in DESIGN.md: global options, commands, and how results
//! are rendered (text for people, one JSON document with `--json`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "vmbackup",
    version,
    about = "Live, application-consistent backups of libvirt/QEMU virtual machines",
    long_about = "Live, application-consistent backups of libvirt/QEMU virtual machines.\n\n\
        Exit codes: 0 success; 1 the operation failed; 2 bad usage or bad input; 3 refused by a \
        pre-flight limit; 4 busy; 5 partly done."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// libvirt connection URI [default: qemu:///system]
    #[arg(long, global = true, env = "VMBACKUP_CONNECT")]
    pub connect: Option<String>,
    /// Backup repository directory [default: /var/lib/vmbackup/repo]
    #[arg(long, global = true, env = "VMBACKUP_REPO")]
    pub repo: Option<PathBuf>,
    /// State directory: locks, schedules, job history [default: /var/lib/vmbackup]
    #[arg(long, global = true, env = "VMBACKUP_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Config file [default: /etc/vmbackup/config.toml, if present]
    #[arg(long, global = true, env = "VMBACKUP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print exactly one JSON document on stdout
    #[arg(long, global = true, env = "VMBACKUP_JSON")]
    pub json: bool,
    /// Where snapshot overlays are created [default: beside each disk image]
    #[arg(long, global = true, env = "VMBACKUP_OVERLAY_DIR")]
    pub overlay_dir: Option<PathBuf>,
    /// Free space needed for overlays, as a share of disks plus memory [default: 0.2]
    #[arg(long, global = true, env = "VMBACKUP_OVERLAY_HEADROOM")]
    pub overlay_headroom: Option<f64>,
    /// Largest disk, in GiB [default: 2032]
    #[arg(long, global = true, env = "VMBACKUP_MAX_DISK_GIB")]
    pub max_disk_gib: Option<u64>,
    /// Largest disks plus memory, in GiB [default: 4000]
    #[arg(long, global = true, env = "VMBACKUP_MAX_TOTAL_GIB")]
    pub max_total_gib: Option<u64>,
    /// Folder of plain QEMU VMs' sockets, NAME.qmp and NAME.qga, for `qemu:NAME`
    /// [default: /run/vmbackup/qemu]
    #[arg(long, global = true, env = "VMBACKUP_QEMU_DIR")]
    pub qemu_dir: Option<PathBuf>,
    /// Longest freeze wait for the guest agent, in seconds [default: 10]
    #[arg(long, global = true, env = "VMBACKUP_FREEZE_TIMEOUT")]
    pub freeze_timeout: Option<u64>,
}

impl Global {
    pub fn overrides(&self) -> vmbackup::config::Overrides {
        vmbackup::config::Overrides {
            connect: self.connect.clone(),
            repo: self.repo.clone(),
            state_dir: self.state_dir.clone(),
            overlay_dir: self.overlay_dir.clone(),
            overlay_headroom: self.overlay_headroom,
            max_disk_gib: self.max_disk_gib,
            max_total_gib: self.max_total_gib,
            freeze_timeout_secs: self.freeze_timeout,
            qemu_dir: self.qemu_dir.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Quiesce {
    Required,
    Preferred,
    Off,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the pre-flight checks alone, with the figures behind each verdict
    Check {
        #[arg(required = true)]
        domains: Vec<String>,
    },
    /// Take one backup of each VM (libvirt domain names, or qemu:NAME for plain QEMU)
    Backup {
        #[arg(required = true)]
        domains: Vec<String>,
        /// Freeze the guest's filesystems through the guest agent
        #[arg(long, value_enum, default_value = "preferred")]
        quiesce: Quiesce,
    },
    /// List backup images
    List { domain: Option<String> },
    /// Show one backup's manifest
    Show { id: String },
    /// Restore a backup; the VM is left powered off
    Restore {
        id: String,
        /// Recreate the VM under a new name
        #[arg(long = "as")]
        as_name: Option<String>,
        /// Shut a running VM down first
        #[arg(long)]
        power_off: bool,
        /// Give the vNICs new MAC addresses when the recorded ones are taken
        #[arg(long)]
        new_macs: bool,
    },
    /// Delete a backup
    Delete { id: String },
    /// Re-read backups and check every chunk against its digest
    Verify { ids: Vec<String> },
    /// Apply the retention rules
    Prune,
    /// Remove chunks that no backup references
    Gc,
    /// Manage schedules
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Run every schedule occurrence that is due (what an external timer calls)
    RunDue {
        /// Evaluate at this time (RFC 3339) instead of now
        #[arg(long)]
        now: Option<String>,
    },
    /// Job history
    History {
        /// How many days back
        #[arg(long, default_value_t = 7)]
        days: u32,
        /// All jobs
        #[arg(long)]
        all: bool,
    },
    /// Finish or undo what an interrupted run left
    Recover,
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Add a schedule
    Add { name: String },
    /// List schedules
    List,
    /// Show a schedule
    Show { name: String },
    /// Change a schedule
    Edit { name: String },
    /// Enable a schedule
    Enable { name: String },
    /// Disable a schedule
    Disable { name: String },
    /// Remove a schedule
    Remove { name: String },
}

impl Command {
    /// The command's name as the user typed it, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Check { .. } => "check",
            Command::Backup { .. } => "backup",
            Command::List { .. } => "list",
            Command::Show { .. } => "show",
            Command::Restore { .. } => "restore",
            Command::Delete { .. } => "delete",
            Command::Verify { .. } => "verify",
            Command::Prune => "prune",
            Command::Gc => "gc",
            Command::Schedule(_) => "schedule",
            Command::RunDue { .. } => "run-due",
            Command::History { .. } => "history",
            Command::Recover => "recover",
        }
    }
}
