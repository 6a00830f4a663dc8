//! Settings: command-line flags win over environment variables (both handled by clap), which
//! win over `/etc/vmbackup/config.toml` (or the file `VMBACKUP_CONFIG` names), which wins over
//! the built-in defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::preflight::{Limits, GIB};
use crate::repository::location::{self, Location, S3Settings, Secret};
use crate::settings::BackupSettings;

/// The config file's keys; every one optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub connect: Option<String>,
    /// A folder or `s3://BUCKET/PREFIX`.
    pub repo: Option<String>,
    /// The key file of an encrypted repository.
    pub key_file: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub overlay_dir: Option<PathBuf>,
    pub overlay_headroom: Option<f64>,
    pub max_disk_gib: Option<u64>,
    pub max_total_gib: Option<u64>,
    pub freeze_timeout_secs: Option<u64>,
    /// How an `s3://` repository is reached.
    pub s3: Option<S3File>,
    /// Longest a commit back may go on without progress.
    pub commit_timeout_secs: Option<u64>,
    /// A disk is read whole at least every this many days.
    pub full_every_days: Option<u64>,
    pub threads: Option<usize>,
    pub qemu_dir: Option<PathBuf>,
    /// VMs a one-hour slot may hold.
    pub slot_capacity: Option<usize>,
    /// How late a missed occurrence may still run, in minutes.
    pub catch_up_minutes: Option<u64>,
    /// Where job reports go.
    pub report: Option<crate::notify::ReportConfig>,
}

/// The `[s3]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3File {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
    /// A file (mode 0600) of AWS shared-credentials format.
    pub credentials_file: Option<PathBuf>,
    /// How long a failing request is retried.
    pub retry_timeout_secs: Option<u64>,
}

/// The S3 settings of the environment, named as S3 tools name them (`AWS_...`), and ours.
#[derive(Debug, Default, Clone)]
pub struct S3Env {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub path_style: Option<String>,
    pub retry_secs: Option<String>,
}

impl S3Env {
    pub fn from_env() -> S3Env {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        S3Env {
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY").map(Secret::new),
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            endpoint: var("VMBACKUP_S3_ENDPOINT"),
            path_style: var("VMBACKUP_S3_PATH_STYLE"),
            retry_secs: var("VMBACKUP_S3_RETRY_SECS"),
        }
    }
}

pub const DEFAULT_CONFIG: &str = "/etc/vmbackup/config.toml";

impl FileConfig {
    /// Reads the config file; a missing file is an empty config, a malformed one an error.
    pub fn load(path: Option<&Path>) -> Result<FileConfig> {
        let explicit = path.is_some();
        let path = path.unwrap_or(Path::new(DEFAULT_CONFIG));
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| Error::Config {
                key: path.display().to_string(),
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(FileConfig::default())
            }
            Err(e) => Err(Error::io("read config", path, e)),
        }
    }
}

/// Everything resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub connect: String,
    pub repo: Location,
    /// How an `s3://` repository is reached (its credentials are checked when it is).
    pub s3: S3Settings,
    /// The key file of an encrypted repository (`init --encrypt`: where the key is written).
    pub key_file: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// Where plain QEMU VMs' sockets are (`NAME.qmp`, `NAME.qga`).
    pub qemu_dir: PathBuf,
    pub backup: BackupSettings,
    /// VMs a one-hour slot may hold [default: 8].
    pub slot_capacity: usize,
    /// How late a missed occurrence may still run [default: 6 hours].
    pub catch_up: Duration,
    pub report: crate::notify::ReportConfig,
}

/// The flags and environment variables that override the file (`None`: not given).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub connect: Option<String>,
    pub repo: Option<String>,
    pub s3: S3Env,
    /// The key file of an encrypted repository.
    pub key_file: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub overlay_dir: Option<PathBuf>,
    pub overlay_headroom: Option<f64>,
    pub max_disk_gib: Option<u64>,
    pub max_total_gib: Option<u64>,
    pub freeze_timeout_secs: Option<u64>,
    pub qemu_dir: Option<PathBuf>,
    pub slot_capacity: Option<usize>,
    pub catch_up_minutes: Option<u64>,
}

pub const DEFAULT_SLOT_CAPACITY: usize = 8;
pub const DEFAULT_CATCH_UP_MINUTES: u64 = 360;

impl Config {
    pub fn resolve(o: Overrides, f: FileConfig) -> Result<Config> {
        let d = BackupSettings::default();
        let dl = Limits::default();
        let headroom = o.overlay_headroom.or(f.overlay_headroom);
        if let Some(h) = headroom {
            if !(0.0..=10.0).contains(&h) {
                return Err(Error::Config {
                    key: "overlay_headroom".into(),
                    detail: format!("{h} is not a ratio between 0 and 10"),
                });
            }
        }
        let freeze_timeout = o.freeze_timeout_secs.or(f.freeze_timeout_secs);
        let commit_timeout = f.commit_timeout_secs;
        let slot_capacity = o.slot_capacity.or(f.slot_capacity);
        let catch_up_minutes = o.catch_up_minutes.or(f.catch_up_minutes);
        for (key, v) in [
            ("freeze_timeout_secs", freeze_timeout),
            ("commit_timeout_secs", commit_timeout),
            ("full_every_days", f.full_every_days),
            ("slot_capacity", slot_capacity.map(|n| n as u64)),
            ("catch_up_minutes", catch_up_minutes),
        ] {
            if v == Some(0) {
                return Err(Error::Config {
                    key: key.into(),
                    detail: "0 is not allowed: give at least 1".into(),
                });
            }
        }
        let limits = Limits {
            max_disk_bytes: o
                .max_disk_gib
                .or(f.max_disk_gib)
                .map(|g| g.saturating_mul(GIB))
                .unwrap_or(dl.max_disk_bytes),
            max_total_bytes: o
                .max_total_gib
                .or(f.max_total_gib)
                .map(|g| g.saturating_mul(GIB))
                .unwrap_or(dl.max_total_bytes),
            overlay_headroom_ratio: headroom.unwrap_or(dl.overlay_headroom_ratio),
        };
        let repo = Location::parse(
            &o.repo
                .or(f.repo)
                .unwrap_or_else(|| "/var/lib/vmbackup/repo".into()),
        )
        .map_err(|e| Error::Config {
            key: "repo".into(),
            detail: e.to_string(),
        })?;
        let s3 = s3_settings(
            o.s3,
            f.s3.unwrap_or_default(),
            matches!(repo, Location::S3 { .. }),
        )?;
        let report = f.report.unwrap_or_default();
        report.check().map_err(|e| Error::Config {
            key: "report".into(),
            detail: e.to_string(),
        })?;
        Ok(Config {
            connect: o
                .connect
                .or(f.connect)
                .unwrap_or_else(|| "qemu:///system".into()),
            repo,
            s3,
            key_file: o.key_file.or(f.key_file),
            state_dir: o
                .state_dir
                .or(f.state_dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/vmbackup")),
            qemu_dir: o
                .qemu_dir
                .or(f.qemu_dir)
                .unwrap_or_else(|| PathBuf::from("/run/vmbackup/qemu")),
            backup: BackupSettings {
                limits,
                overlay_dir: o.overlay_dir.or(f.overlay_dir),
                freeze_timeout: freeze_timeout
                    .map(Duration::from_secs)
                    .unwrap_or(d.freeze_timeout),
                commit_stall_timeout: commit_timeout
                    .map(Duration::from_secs)
                    .unwrap_or(d.commit_stall_timeout),
                threads: f.threads.unwrap_or(d.threads).max(1),
                full_every: f
                    .full_every_days
                    .map(|n| Duration::from_secs(n.saturating_mul(86_400)))
                    .unwrap_or(d.full_every),
                ..d
            },
            slot_capacity: slot_capacity.unwrap_or(DEFAULT_SLOT_CAPACITY),
            catch_up: Duration::from_secs(
                60u64.saturating_mul(catch_up_minutes.unwrap_or(DEFAULT_CATCH_UP_MINUTES)),
            ),
            report,
        })
    }
}

/// The S3 settings: the environment wins over the `[s3]` section. The credentials file is
/// read (and its mode checked) only for an `s3://` repository.
fn s3_settings(e: S3Env, f: S3File, used: bool) -> Result<S3Settings> {
    let bad = |key: &str, detail: String| Error::Config {
        key: key.into(),
        detail,
    };
    let d = S3Settings::default();
    let path_style = match e.path_style.as_deref() {
        None => f.path_style.unwrap_or(d.path_style),
        Some("1" | "true" | "yes") => true,
        Some("0" | "false" | "no") => false,
        Some(v) => {
            return Err(bad(
                "VMBACKUP_S3_PATH_STYLE",
                format!("{v:?} is not true or false"),
            ))
        }
    };
    let retry_secs = match e.retry_secs.as_deref() {
        None => f.retry_timeout_secs,
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            bad(
                "VMBACKUP_S3_RETRY_SECS",
                format!("{v:?} is not a number of seconds"),
            )
        })?),
    };
    if retry_secs == Some(0) {
        return Err(bad("s3 retry_timeout_secs", "0 is not allowed".into()));
    }
    let endpoint = e.endpoint.or(f.endpoint);
    if let (Some(ep), true) = (&endpoint, used) {
        location::check_endpoint(ep).map_err(|e| bad("s3 endpoint", e.to_string()))?;
    }
    let (mut id, mut secret) = (e.access_key_id, e.secret_access_key);
    if used && (id.is_none() || secret.is_none()) {
        if let Some(p) = &f.credentials_file {
            let (i, s) = location::read_credentials_file(p)
                .map_err(|e| bad("s3 credentials_file", e.to_string()))?;
            id = id.or(Some(i));
            secret = secret.or(Some(s));
        }
    }
    Ok(S3Settings {
        endpoint,
        region: e.region.or(f.region).unwrap_or(d.region),
        path_style,
        access_key_id: id,
        secret_access_key: secret,
        retry_timeout: retry_secs
            .map(Duration::from_secs)
            .unwrap_or(d.retry_timeout),
        parallel_uploads: d.parallel_uploads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let f: FileConfig = toml::from_str(
            "repo = '/srv/repo'\nmax_disk_gib = 100\noverlay_headroom = 0.5\nconnect = 'qemu:///session'",
        )
        .unwrap();
        let o = Overrides {
            repo: Some("/flag/repo".into()),
            ..Overrides::default()
        };
        let c = Config::resolve(o, f).unwrap();
        assert_eq!(c.repo, Location::Local("/flag/repo".into()));
        assert_eq!(c.connect, "qemu:///session");
        assert_eq!(c.backup.limits.max_disk_bytes, 100 * GIB);
        assert_eq!(c.backup.limits.max_total_bytes, 4000 * GIB);
        assert_eq!(c.backup.limits.overlay_headroom_ratio, 0.5);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/vmbackup"));
    }

    #[test]
    fn report_settings_and_schedule_defaults() {
        let f: FileConfig = toml::from_str(
            "slot_capacity = 2\n[report]\nsmtp = '127.0.0.1:2525'\nto = ['ops@example.com']\ncommand = ['/bin/cat']",
        )
        .unwrap();
        let c = Config::resolve(Overrides::default(), f).unwrap();
        assert_eq!(c.slot_capacity, 2);
        assert_eq!(c.catch_up, Duration::from_secs(6 * 3600));
        assert_eq!(c.report.smtp.as_deref(), Some("127.0.0.1:2525"));
        assert_eq!(c.report.to, vec!["ops@example.com".to_string()]);
        assert!(toml::from_str::<FileConfig>("[report]\nsmpt = 'x'").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_ratios_are_refused() {
        assert!(toml::from_str::<FileConfig>("rep = '/x'").is_err());
        let o = Overrides {
            overlay_headroom: Some(-1.0),
            ..Overrides::default()
        };
        assert!(Config::resolve(o, FileConfig::default()).is_err());
    }

    #[test]
    fn zero_timeouts_are_refused_as_bad_input() {
        let o = Overrides {
            freeze_timeout_secs: Some(0),
            ..Overrides::default()
        };
        let e = Config::resolve(o, FileConfig::default()).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::exit::BAD_INPUT, "{e}");
        let f: FileConfig = toml::from_str("commit_timeout_secs = 0").unwrap();
        let e = Config::resolve(Overrides::default(), f).unwrap_err();
        assert!(e.to_string().contains("commit_timeout_secs"), "{e}");
        let f: FileConfig = toml::from_str("commit_timeout_secs = 5").unwrap();
        let c = Config::resolve(Overrides::default(), f).unwrap();
        assert_eq!(c.backup.commit_stall_timeout, Duration::from_secs(5));
    }
}
