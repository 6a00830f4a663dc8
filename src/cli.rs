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
        pre-flight limit; 4 busy; 5 partly done.\n\n\
        Wherever a backup ID is taken: a full id, a unique prefix of one, `latest` (the newest \
        backup), `VM@latest`, or `VM@TIME` (VM's newest backup started at TIME or before; TIME \
        is RFC 3339 or UTC YYYY-MM-DD[THH:MM[:SS]], a date alone meaning its whole day). A VM \
        may be given by its UUID."
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
    #[arg(short = 'c', long, global = true, env = "VMBACKUP_CONNECT")]
    pub connect: Option<String>,
    /// Backup repository: a folder, or s3://BUCKET/PREFIX (S3 settings: AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, VMBACKUP_S3_ENDPOINT, VMBACKUP_S3_PATH_STYLE, or
    /// [s3] in config.toml) [default: /var/lib/vmbackup/repo]
    #[arg(long, global = true, env = "VMBACKUP_REPO")]
    pub repo: Option<String>,
    /// Key file of an encrypted repository (`init --encrypt`: where its key is written)
    #[arg(long, global = true, env = "VMBACKUP_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// State directory: locks, schedules, job history [default: /var/lib/vmbackup]
    #[arg(long, global = true, env = "VMBACKUP_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Config file [default: /etc/vmbackup/config.toml, if present]
    #[arg(long, global = true, env = "VMBACKUP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print exactly one JSON document on stdout
    #[arg(long, global = true, env = "VMBACKUP_JSON")]
    pub json: bool,
    /// Errors only on stderr: no progress, no warnings (VMBACKUP_LOG, if set, wins)
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More log lines: -v debug of vmbackup, -vv everything (VMBACKUP_LOG, if set, wins)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
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
    /// VMs a one-hour schedule slot may hold [default: 8]
    #[arg(long, global = true, env = "VMBACKUP_SLOT_CAPACITY")]
    pub slot_capacity: Option<usize>,
    /// How late a missed schedule occurrence may still run, in minutes [default: 360]
    #[arg(long, global = true, env = "VMBACKUP_CATCH_UP_MINUTES")]
    pub catch_up_minutes: Option<u64>,
}

impl Global {
    pub fn overrides(&self) -> vmbackup::config::Overrides {
        vmbackup::config::Overrides {
            connect: self.connect.clone(),
            repo: self.repo.clone(),
            key_file: self.key_file.clone(),
            s3: vmbackup::config::S3Env::from_env(),
            state_dir: self.state_dir.clone(),
            overlay_dir: self.overlay_dir.clone(),
            overlay_headroom: self.overlay_headroom,
            max_disk_gib: self.max_disk_gib,
            max_total_gib: self.max_total_gib,
            freeze_timeout_secs: self.freeze_timeout,
            qemu_dir: self.qemu_dir.clone(),
            slot_capacity: self.slot_capacity,
            catch_up_minutes: self.catch_up_minutes,
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
    /// Create the repository (otherwise made, unencrypted, on first use). With --encrypt:
    /// a random key, wrapped by a passphrase (VMBACKUP_PASSPHRASE_FILE,
    /// VMBACKUP_PASSPHRASE_COMMAND or the terminal) and/or written to --key-file PATH
    Init {
        /// Encrypt everything stored (AES-256-GCM) and name chunks with a key
        #[arg(long)]
        encrypt: bool,
    },
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
        /// Read every disk whole, even one an earlier backup proves unchanged
        #[arg(long)]
        full: bool,
        /// Label the backup (repeat for several; 1-64 letters, digits, `.`, `-`, `_`, `+`),
        /// for `list --tag` and `prune --vm NAME --tag TAG`
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// When the VM or the repository is locked by another job, try again until DURATION
        /// (30s, 5m, 1h) has passed instead of exiting 4 at once
        #[arg(long, value_name = "DURATION", value_parser = vmbackup::retry::parse_duration)]
        retry_lock: Option<std::time::Duration>,
    },
    /// List backup images
    List {
        domain: Option<String>,
        #[command(flatten)]
        filter: crate::cli_find::ListArgs,
    },
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
        /// Start the VM at once on the backup (served over NBD) and copy its disks into
        /// place while it runs; the VM is left running on its own images
        #[arg(long)]
        instant: bool,
        /// Replace the VM's definition and disks when it exists (refused otherwise, exit 3)
        #[arg(long)]
        force: bool,
        /// Run every check and say which disks and definition would be created or replaced;
        /// change nothing
        #[arg(long, conflicts_with = "instant")]
        dry_run: bool,
        /// When the VM or the repository is locked by another job, try again until DURATION
        /// (30s, 5m, 1h) has passed instead of exiting 4 at once
        #[arg(long, value_name = "DURATION", value_parser = vmbackup::retry::parse_duration)]
        retry_lock: Option<std::time::Duration>,
    },
    /// Delete backups (their chunks are freed by gc)
    Delete {
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
        /// Delete pinned backups too (refused otherwise, exit 3)
        #[arg(long)]
        force: bool,
        /// Run every check and say what would be deleted; delete nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Serve a backup's disks read-only over NBD (one export per disk, named after its
    /// target, e.g. vda) until SIGINT/SIGTERM or --idle-timeout; prints what to connect to
    Serve {
        id: String,
        /// Only this disk (repeat for several) [default: all]
        #[arg(long = "disk", value_name = "TARGET")]
        disks: Vec<String>,
        /// The UNIX socket to listen on (must not exist; made 0600)
        /// [default: STATE_DIR/serve-PID.sock]
        #[arg(long, value_name = "PATH", conflicts_with = "port")]
        socket: Option<PathBuf>,
        /// Listen on this TCP port of 127.0.0.1 instead (0: any free one); every local user
        /// can connect to it
        #[arg(long)]
        port: Option<u16>,
        /// Stop after this many seconds without a client
        #[arg(long, value_name = "SECS")]
        idle_timeout: Option<u64>,
    },
    /// Boot a backup in a throwaway VM (no network; disks: overlays on the backup served
    /// over NBD, nothing copied) and wait for its guest agent; removed afterwards
    BootTest {
        id: String,
        /// Seconds the guest agent has to answer (and then the command to end)
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        timeout: u64,
        /// A command line run in the guest by `/bin/sh -c` once the agent answers; it must
        /// exit 0
        #[arg(long, value_name = "CMD")]
        command: Option<String>,
        /// Save a screenshot of the VM's screen at the end (passed or not) to FILE (PNG, or
        /// PPM from QEMU before 7.1; 0600); the VM needs a video device
        #[arg(long, value_name = "FILE")]
        screenshot: Option<std::path::PathBuf>,
    },
    /// Mount a backup's file systems read-only under DIR, an empty folder (DIR/vdb: the file
    /// system on disk vdb; DIR/vdap1: partition 1 of vda); `vmbackup umount DIR` undoes it
    Mount {
        id: String,
        dir: PathBuf,
        /// Only this disk (repeat for several) [default: all]
        #[arg(long = "disk", value_name = "TARGET")]
        disks: Vec<String>,
    },
    /// Undo `vmbackup mount` at DIR: unmount, detach, stop its background process
    Umount { dir: PathBuf },
    /// (internal) The background process of `mount`: the backup's disks as read-only files
    /// (FUSE) at --at until that is unmounted
    #[command(hide = true)]
    MountDaemon {
        id: String,
        #[arg(long)]
        at: PathBuf,
        #[arg(long = "disk", value_name = "TARGET")]
        disks: Vec<String>,
    },
    /// Re-read backups and check every chunk against its digest
    Verify {
        ids: Vec<String>,
        /// Check without reading chunks: manifests, indexes and the other objects read and
        /// intact, every chunk they name present
        #[arg(long)]
        metadata: bool,
    },
    /// Apply the schedules' retention rules, or (--vm) --keep/--keep-days to one VM's backups
    Prune {
        /// Only say which backups would be deleted
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        vm: crate::cli_find::PruneArgs,
        /// Accepted for one scheduler line for all: prune takes no lock, it never waits
        #[arg(long, value_name = "DURATION", value_parser = vmbackup::retry::parse_duration)]
        retry_lock: Option<std::time::Duration>,
    },
    /// Remove chunks that no backup references
    Gc {
        /// Only say how many chunks and bytes would be removed (takes no lock)
        #[arg(long)]
        dry_run: bool,
        /// While backups hold the repository, try again until DURATION (30s, 5m, 1h) has
        /// passed instead of exiting 4 at once
        #[arg(long, value_name = "DURATION", value_parser = vmbackup::retry::parse_duration)]
        retry_lock: Option<std::time::Duration>,
    },
    /// Print a shell completion script: `vmbackup completions bash >
    /// /usr/share/bash-completion/completions/vmbackup`
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page vmbackup(1), or write it and one per command to --dir
    Man {
        /// Write vmbackup.1, vmbackup-backup.1, ... into this folder
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// What the backups take, per VM (exclusive and shared bytes, GiB-hours over a period)
    /// and in all (chunks, stored bytes, deduplication, free space)
    Usage {
        /// Only this VM's row (the figures still count every VM's backups)
        #[arg(long)]
        vm: Option<String>,
        /// Start of the GiB-hours period (a date, midnight UTC, or an RFC 3339 time)
        /// [default: the first of the month]
        #[arg(long)]
        from: Option<String>,
        /// End of the period [default: now]
        #[arg(long)]
        to: Option<String>,
    },
    /// Copy the backups another repository lacks (chunks first, the manifest last)
    Sync {
        /// The repository to copy from (it must exist)
        #[arg(long, value_name = "REPO")]
        from: String,
        /// The repository to copy to (made on first use, like any repository)
        #[arg(long, value_name = "REPO")]
        to: String,
        /// Only this VM's backups
        #[arg(long, value_name = "NAME")]
        vm: Option<String>,
        /// Only backups started at or after TIME (RFC 3339, or a date: YYYY-MM-DD, UTC)
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// The key file of an encrypted source (else --key-file's)
        #[arg(long, value_name = "PATH")]
        from_key_file: Option<std::path::PathBuf>,
        /// The key file of an encrypted target (else --key-file's)
        #[arg(long, value_name = "PATH")]
        to_key_file: Option<std::path::PathBuf>,
    },
    /// Manage schedules
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// The configuration in effect
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Job reports (the config file's [report] table)
    #[command(subcommand)]
    Report(ReportCommand),
    /// Run every schedule occurrence that is due (what an external timer calls every minute)
    RunDue {
        /// Evaluate at this time (RFC 3339, e.g. 2027-01-04T02:30:00Z) instead of now
        #[arg(long)]
        now: Option<String>,
        /// Show what is due without running or claiming anything
        #[arg(long)]
        dry_run: bool,
    },
    /// Job history (backup, restore, delete, prune), oldest first
    History {
        /// How many days back
        #[arg(long, default_value_t = 7)]
        days: u32,
        /// All jobs
        #[arg(long, conflicts_with = "days")]
        all: bool,
        /// Only this VM's jobs
        #[arg(long)]
        vm: Option<String>,
        #[command(flatten)]
        filter: crate::cli_find::HistoryArgs,
    },
    /// Exempt a backup from retention
    Pin { id: String },
    /// Let retention remove a backup again
    Unpin { id: String },
    /// Finish what an interrupted backup left (VMs on snapshot overlays, plain QEMU guests
    /// left frozen, unpublished data); every backup also does it first for its own VM
    Recover {
        /// Only these VMs, `qemu:NAME` for a plain QEMU VM [default: all libvirt VMs]
        domains: Vec<String>,
    },
    /// (internal) Thaws a plain QEMU guest when its standard input ends without the word
    /// `thawed`: started by a backup while it holds the guest frozen
    #[command(hide = true)]
    ThawGuard {
        /// The guest agent's socket
        #[arg(long)]
        qga: std::path::PathBuf,
        /// Seconds to wait for the agent
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
}

impl Command {
    /// The job this command's locks record (see `vmbackup::locks::set_job`).
    pub fn job(&self) -> &'static str {
        match self {
            Command::Backup { .. } => "backup",
            Command::Restore { .. } => "restore",
            Command::Gc { .. } => "gc",
            Command::Prune { .. } => "prune",
            Command::RunDue { .. } => "run-due",
            Command::Recover { .. } => "recover",
            Command::Sync { .. } => "sync",
            Command::Serve { .. } => "serve",
            Command::BootTest { .. } => "boot-test",
            Command::Delete { .. } => "delete",
            _ => "vmbackup",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Once,
    Daily,
    Weekly,
    Monthly,
}

/// The fields of a schedule; on `edit`, only those given change.
#[derive(Debug, Args)]
pub struct ScheduleFields {
    /// A VM to back up (repeat for several; on edit, replaces the list)
    #[arg(long = "vm")]
    pub vms: Vec<String>,
    /// How often
    #[arg(long = "type", value_enum)]
    pub kind: Option<Kind>,
    /// The date of a `once` schedule (YYYY-MM-DD, local)
    #[arg(long)]
    pub date: Option<String>,
    /// The weekday of a `weekly` schedule, or of a `monthly --week` one
    #[arg(long)]
    pub weekday: Option<String>,
    /// The day of the month of a `monthly` schedule (29-31 run on the last day of shorter months)
    #[arg(long)]
    pub day: Option<u8>,
    /// first, second, third, fourth, fifth or last: with --weekday, e.g. the third Monday
    /// (months without a fifth one are skipped)
    #[arg(long)]
    pub week: Option<String>,
    /// First date it may run (YYYY-MM-DD, local) [default: today]
    #[arg(long)]
    pub start: Option<String>,
    /// The one-hour slot's starting hour (0-23, local), or `auto` for the least loaded one
    #[arg(long)]
    pub slot: Option<String>,
    /// IANA time zone of the slot and dates [default: the host's, else UTC]
    #[arg(long)]
    pub tz: Option<String>,
    /// Retention: keep the newest N backups of each VM
    #[arg(long, conflicts_with = "keep_days")]
    pub keep: Option<u32>,
    /// Retention: keep backups younger than N days
    #[arg(long)]
    pub keep_days: Option<u32>,
    /// Retention: keep everything (on edit, drops the rule)
    #[arg(long, conflicts_with_all = ["keep", "keep_days"])]
    pub keep_all: bool,
    /// Freeze the guest's filesystems [default: preferred]
    #[arg(long, value_enum)]
    pub quiesce: Option<Quiesce>,
    /// Boot-test each new backup in a throwaway VM (as `vmbackup boot-test`); a backup that
    /// fails it deletes no older backup by retention
    #[arg(long)]
    pub boot_test: bool,
    /// Boot-test only after every N-th successful backup of each VM (implies --boot-test)
    #[arg(long, value_name = "N")]
    pub boot_test_every: Option<u32>,
    /// Seconds the boot test's guest agent has to answer [default: 300]
    #[arg(long, value_name = "SECS")]
    pub boot_test_timeout: Option<u64>,
    /// A command the boot test runs in the guest by `/bin/sh -c`; it must exit 0
    #[arg(long, value_name = "CMD")]
    pub boot_test_command: Option<String>,
    /// No boot tests (on edit, drops the rule)
    #[arg(long, conflicts_with_all = ["boot_test", "boot_test_every", "boot_test_timeout", "boot_test_command"])]
    pub no_boot_test: bool,
}

#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// Send a sample report through every configured channel (mail, command)
    ///
    /// Exit codes: 0 every channel worked, 1 one or more failed (each one's cause is said),
    /// 2 no channel is configured.
    Test,
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Add a schedule
    Add {
        name: String,
        #[command(flatten)]
        fields: ScheduleFields,
        /// Add it disabled
        #[arg(long)]
        disabled: bool,
    },
    /// List schedules
    List,
    /// Show a schedule
    Show { name: String },
    /// Change a schedule
    Edit {
        name: String,
        #[command(flatten)]
        fields: ScheduleFields,
    },
    /// Enable a schedule
    Enable { name: String },
    /// Disable a schedule
    Disable { name: String },
    /// Remove a schedule
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Every effective setting and where it came from: a flag, an environment variable, the
    /// config file, or the default (secrets are shown as `(set)`)
    Show,
}
