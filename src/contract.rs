//! The machine-readable contract: what `vmbackup --json` prints, as types.
//!
//! Every document is one JSON object on stdout with the same head (`schema_version`,
//! `command`, `ok`, `exit_code`, and `interrupted` when a stop signal came), then either the
//! command's own fields (its body, below) or, when the command failed as a whole, `error`: one
//! [`ErrorDoc`]. Items of a multi-VM or multi-id command that failed carry the same error
//! shape. `docs/JSON.md` describes every command's document with an example; the JSON
//! schemas in `docs/schema/` are generated from these types ([`schemas`]) and the tests check
//! every document they read against them.
//!
//! Field names: `vm` is a VM's name, `vm_uuid` its UUID, `id` a backup's id; sizes end in
//! `_bytes`, durations carry their unit (`_ms`, `_seconds`); times are RFC 3339 in UTC; lists
//! are always lists. Adding a field is not a new version; renaming, removing or retyping one
//! is.

use schemars::JsonSchema;
use serde::Serialize;

use crate::error::{exit, Error, Kind};

/// The version of the documents' shapes; `schema_version` in every document.
pub const SCHEMA_VERSION: u32 = 1;

/// One error: the whole command's (`error` beside the head) or one item's.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ErrorDoc {
    pub kind: Kind,
    /// The error and its causes on one line.
    pub message: String,
    /// The exit code this error alone gives.
    pub exit_code: i32,
    /// A pre-flight refusal's figures: every check, with what was found and the limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preflight: Option<Box<crate::preflight::Report>>,
    /// Busy: who holds the lock (the VM's, or each holder of the repository's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<crate::locks::Holder>,
}

/// The lock holders an error names.
fn holders_of(e: &(dyn std::error::Error + 'static)) -> Option<Vec<crate::locks::Holder>> {
    if let Some(e) = e.downcast_ref::<Error>() {
        return match e {
            Error::RepoLocked { holders } => Some(holders.clone()),
            e => e.holder().map(|h| vec![h.clone()]),
        };
    }
    match e.downcast_ref::<crate::locks::LockError>() {
        Some(crate::locks::LockError::Busy {
            holder: Some(h), ..
        }) => Some(vec![(**h).clone()]),
        _ => None,
    }
}

impl ErrorDoc {
    /// The document of one of the library's errors.
    pub fn of(e: &Error) -> ErrorDoc {
        ErrorDoc {
            kind: e.kind(),
            message: crate::error::chain(e),
            exit_code: e.exit_code(),
            preflight: match e {
                Error::Refused(r) => Some(r.clone()),
                _ => None,
            },
            holders: holders_of(e).unwrap_or_default(),
        }
    }

    /// The document of any error chain (the binary's `anyhow` errors), with the exit code the
    /// command ends with.
    pub fn of_chain<'a>(
        chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)> + Clone,
        message: String,
        exit_code: i32,
    ) -> ErrorDoc {
        let preflight = chain
            .clone()
            .into_iter()
            .find_map(|e| match e.downcast_ref() {
                Some(Error::Refused(r)) => Some(r.clone()),
                _ => None,
            });
        let holders = chain
            .clone()
            .into_iter()
            .find_map(holders_of)
            .unwrap_or_default();
        let known = crate::error::kind_in(chain);
        let kind = if crate::error::kind_of_code(exit_code, false) == Kind::Invalid
            && known == Kind::NotFound
        {
            Kind::NotFound
        } else {
            crate::error::kind_of_code(exit_code, known == Kind::NotFound)
        };
        ErrorDoc {
            kind,
            message,
            exit_code,
            preflight,
            holders,
        }
    }

    /// An error known only by its words (a failure reported by a lower layer as text).
    pub fn failed(message: impl Into<String>) -> ErrorDoc {
        ErrorDoc {
            kind: Kind::Failed,
            message: message.into(),
            exit_code: exit::FAILED,
            preflight: None,
            holders: Vec::new(),
        }
    }

    /// Bad usage found by the argument parser.
    pub fn usage(message: impl Into<String>) -> ErrorDoc {
        ErrorDoc {
            kind: Kind::Invalid,
            message: message.into(),
            exit_code: exit::BAD_INPUT,
            preflight: None,
            holders: Vec::new(),
        }
    }
}

/// The fields every document starts with.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Head {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The command, as typed: `list`, `schedule add`; empty when the arguments did not parse
    /// far enough to tell.
    pub command: String,
    /// Whether the command did all it was asked (`exit_code` 0).
    pub ok: bool,
    /// The process's exit code.
    pub exit_code: i32,
    /// The stop signal that ended the command early (`SIGINT`, `SIGTERM`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
}

/// A document of a command that ran: the head and its body.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Done<T> {
    #[serde(flatten)]
    pub head: Head,
    #[serde(flatten)]
    pub body: T,
}

/// The document of a command that failed as a whole.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Failed {
    #[serde(flatten)]
    pub head: Head,
    pub error: ErrorDoc,
}

/// The schema of one command's documents: its body after the head, or an error.
#[derive(JsonSchema)]
#[allow(dead_code)]
#[schemars(untagged)]
enum Document<T> {
    Done(Done<T>),
    Failed(Failed),
}

/// One item that failed among several (a backup id, a VM).
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct ItemError {
    /// The backup it is about, when it is about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub error: ErrorDoc,
}

// ---- bodies, one per command ----

/// `init`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct InitBody {
    pub init: crate::unlock::Initialized,
}

/// One VM of `check`: its pre-flight report, or why it could not be checked.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CheckItem {
    pub vm: String,
    /// The checks all passed.
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<crate::preflight::Report>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDoc>,
}

/// `check`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CheckBody {
    pub vms: Vec<CheckItem>,
}

/// One VM of `backup`: its backup, or why there is none.
#[derive(Debug, Serialize, JsonSchema)]
pub struct BackupItem {
    pub vm: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<crate::backup::Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDoc>,
}

/// `backup`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct BackupBody {
    /// One per VM that was started, in the order given.
    pub results: Vec<BackupItem>,
    /// The VMs a stop signal kept from being started.
    pub not_started: Vec<String>,
}

/// One backup in `list` (and `show`'s `backup`).
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct BackupRow {
    pub id: String,
    pub vm: String,
    pub vm_uuid: String,
    pub started_at: String,
    pub ended_at: String,
    pub logical_bytes: u64,
    pub stored_bytes: u64,
    /// The disks' targets (`vda`).
    pub disks: Vec<String>,
    /// `application` or `crash`.
    pub consistency: String,
    pub freeze_ms: Option<u64>,
    pub schedule: Option<String>,
    pub scheduled_for: Option<String>,
    /// `backup --tag`: always a list.
    pub tags: Vec<String>,
    pub pinned: bool,
    pub boot_test: Option<crate::repository::BootTestRecord>,
}

impl BackupRow {
    pub fn of(
        m: &crate::repository::manifest::Manifest,
        pinned: bool,
        boot_test: Option<crate::repository::BootTestRecord>,
    ) -> BackupRow {
        BackupRow {
            id: m.id.clone(),
            vm: m.vm_name.clone(),
            vm_uuid: m.vm_uuid.clone(),
            started_at: m.started_at.clone(),
            ended_at: m.ended_at.clone(),
            logical_bytes: m.logical_bytes,
            stored_bytes: m.stored_bytes,
            disks: m.disks.iter().map(|d| d.target.clone()).collect(),
            consistency: m.consistency.clone(),
            freeze_ms: m.freeze_ms,
            schedule: m.schedule.clone(),
            scheduled_for: m.scheduled_for.clone(),
            tags: m.tags.clone(),
            pinned,
            boot_test,
        }
    }
}

/// A backup whose manifest cannot be read.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Unreadable {
    pub id: String,
    pub error: String,
}

/// `list`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ListBody {
    pub backups: Vec<BackupRow>,
    pub unreadable: Vec<Unreadable>,
}

/// `show`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ShowBody {
    /// The backup as `list` shows it.
    pub backup: BackupRow,
    /// The manifest as stored in the repository (crates/repo/src/FORMAT.md: its own field
    /// names, `vm_name` among them).
    pub manifest: crate::repository::manifest::Manifest,
    /// What the backup holds besides disks, in words.
    pub vm_state: Vec<String>,
    pub boot_test: Option<crate::repository::BootTestRecord>,
}

/// What a restore did: a plain one, or an instant one (the same and its timings).
#[derive(Debug, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Restore {
    Instant(crate::instant::InstantRestored),
    Plain(crate::restore::Restored),
    /// `--dry-run`: what it would do.
    Plan(crate::restore::RestorePlan),
}

/// `restore`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RestoreBody {
    /// Only `--dry-run`: nothing was changed, `restore` is the plan.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    pub restore: Restore,
}

/// `serve`: printed once it listens.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ServeBody {
    pub serve: crate::serve::Serving,
}

/// `boot-test`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct BootTestBody {
    pub boot_test: crate::boot_test::BootTest,
}

/// `delete` and `prune`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct DeletedBody {
    /// Only a dry run: nothing was deleted, `deleted` is what would be.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    pub deleted: Vec<String>,
    pub errors: Vec<ItemError>,
}

/// `verify`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct VerifyBody {
    pub metadata_only: bool,
    pub backups: Vec<crate::repository::maintain::Verified>,
}

/// `sync`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SyncBody {
    pub sync: crate::repository::sync::Synced,
}

/// `gc`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct GcBody {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    pub gc: crate::repository::maintain::Collected,
}

/// `recover`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RecoverBody {
    pub recover: crate::recover::Report,
}

/// `usage`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct UsageBody {
    pub usage: crate::repository::usage::Usage,
}

/// A schedule as `schedule list|show|add|edit|enable|disable` show it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ScheduleView {
    #[serde(flatten)]
    pub spec: crate::schedule::Spec,
    /// The slot in words (`02:00-03:00 Europe/Paris`).
    pub slot: String,
    /// The recurrence in words.
    pub description: String,
    /// The next occurrence (UTC); `null` when disabled or never again.
    pub next_run: Option<String>,
}

/// `schedule add|edit|enable|disable|show`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ScheduleBody {
    pub schedule: ScheduleView,
}

/// `schedule list`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct SchedulesBody {
    pub schedules: Vec<ScheduleView>,
}

/// `schedule remove`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RemovedBody {
    pub removed: String,
}

/// `run-due`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct RunDueBody {
    pub run: crate::schedule::run::RunDue,
}

/// `history`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct HistoryBody {
    pub jobs: Vec<crate::state::Job>,
}

/// `pin` and `unpin`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct PinBody {
    pub id: String,
    pub pinned: bool,
}

/// What `mount` mounted.
#[derive(Debug, Serialize, JsonSchema)]
pub struct MountView {
    pub backup_id: String,
    pub vm: String,
    pub dir: std::path::PathBuf,
    pub filesystems: Vec<crate::mount::Mounted>,
    pub skipped: Vec<crate::mount::Skipped>,
    pub disks: Vec<crate::mount::DiskFile>,
    pub loop_devices: Vec<std::path::PathBuf>,
    pub daemon_pid: Option<i32>,
    pub log: std::path::PathBuf,
}

/// `mount`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct MountBody {
    pub mount: MountView,
}

/// `umount`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct UmountBody {
    pub umount: crate::mount::Cleaned,
}

/// `completions`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CompletionsBody {
    pub shell: String,
    pub script: String,
}

/// `man`: the page (`page`), or the files written (`written`, with `--dir`).
#[derive(Debug, Serialize, JsonSchema)]
pub struct ManBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written: Option<Vec<String>>,
}

/// `config show`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ConfigBody {
    pub config: crate::config_show::Shown,
}

/// `report test`: each channel, and whether the sample report went through it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ReportTestBody {
    pub channels: Vec<crate::notify::ChannelResult>,
}

/// `thaw-guard` (internal: the guard of a plain QEMU guest's freeze).
#[derive(Debug, Serialize, JsonSchema)]
pub struct ThawGuardBody {
    pub thawed: bool,
}

/// The commands and the schema of each one's documents, by the name `command` carries.
pub fn schemas() -> Vec<(&'static str, schemars::Schema)> {
    fn one<T: JsonSchema>(name: &'static str) -> (&'static str, schemars::Schema) {
        // What is printed (serialization): a field skipped when empty is optional, an
        // `Option` that is always printed is required and may be null.
        let mut s = schemars::generate::SchemaSettings::draft2020_12()
            .for_serialize()
            .into_generator()
            .into_root_schema_for::<Document<T>>();
        s.insert(
            "title".into(),
            format!("vmbackup {name} --json (schema_version {SCHEMA_VERSION})").into(),
        );
        (name, s)
    }
    vec![
        one::<InitBody>("init"),
        one::<CheckBody>("check"),
        one::<BackupBody>("backup"),
        one::<ListBody>("list"),
        one::<ShowBody>("show"),
        one::<RestoreBody>("restore"),
        one::<ServeBody>("serve"),
        one::<BootTestBody>("boot-test"),
        one::<MountBody>("mount"),
        one::<UmountBody>("umount"),
        one::<DeletedBody>("delete"),
        one::<VerifyBody>("verify"),
        one::<GcBody>("gc"),
        one::<UsageBody>("usage"),
        one::<SyncBody>("sync"),
        one::<DeletedBody>("prune"),
        one::<RecoverBody>("recover"),
        one::<ScheduleBody>("schedule add"),
        one::<ScheduleBody>("schedule edit"),
        one::<ScheduleBody>("schedule enable"),
        one::<ScheduleBody>("schedule disable"),
        one::<ScheduleBody>("schedule show"),
        one::<SchedulesBody>("schedule list"),
        one::<RemovedBody>("schedule remove"),
        one::<RunDueBody>("run-due"),
        one::<HistoryBody>("history"),
        one::<PinBody>("pin"),
        one::<PinBody>("unpin"),
        one::<CompletionsBody>("completions"),
        one::<ManBody>("man"),
        one::<ConfigBody>("config show"),
        one::<ReportTestBody>("report test"),
    ]
}

/// The file of a command's schema in `docs/schema/`: `schedule add` is `schedule-add.json`.
pub fn schema_file(command: &str) -> String {
    format!("{}.json", command.replace(' ', "-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed schemas are the types' (`VMBACKUP_BLESS=1` rewrites them).
    #[test]
    fn committed_schemas_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schema");
        let bless = std::env::var_os("VMBACKUP_BLESS").is_some();
        let mut stale = Vec::new();
        for (name, schema) in schemas() {
            let path = dir.join(schema_file(name));
            let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
            if bless {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &text).unwrap();
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                stale.push(path.display().to_string());
            }
        }
        assert!(
            stale.is_empty(),
            "schemas out of date (VMBACKUP_BLESS=1 cargo test -p vmbackup --lib contract): {stale:?}"
        );
    }

    #[test]
    fn an_error_document_names_kind_message_and_code() {
        let e = Error::NotFound("no backup x".into());
        let v = serde_json::to_value(ErrorDoc::of(&e)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"kind": "not_found", "message": "no backup x", "exit_code": 2})
        );
    }
}
