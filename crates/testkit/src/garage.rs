//! The Garage node of `scripts/garage` (one node on loopback, bucket `vmbackup-test`), and
//! repositories in it: each test gets its own prefix `s3://vmbackup-test/<unique>/`, whose
//! objects are deleted when it is dropped.
//!
//! The settings come from the environment `scripts/test` exports (`VMBACKUP_S3_ENDPOINT`,
//! `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), else from the env file
//! `scripts/garage start` writes (`GARAGE_DIR`, default /var/tmp/vmbackup-garage). Neither is a
//! failure: S3 tests never skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use vmbackup::repository::location::{S3Settings, Secret};
use vmbackup::repository::s3::S3Store;
use vmbackup::repository::storage::ObjectStore;

use crate::cli::{parse_one_document, Run};

pub const BUCKET: &str = "vmbackup-test";

/// The node's settings.
#[derive(Clone)]
pub struct Garage {
    pub endpoint: String,
    pub region: String,
    pub key_id: String,
    pub secret: String,
}

/// The folder of `scripts/garage` (its config, data, pid file, env file).
pub fn garage_dir() -> PathBuf {
    PathBuf::from(std::env::var("GARAGE_DIR").unwrap_or_else(|_| "/var/tmp/vmbackup-garage".into()))
}

impl Garage {
    /// The node's settings; panics (never skips) when there are none.
    pub fn get() -> Garage {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let (Some(endpoint), Some(key_id), Some(secret)) = (
            var("VMBACKUP_S3_ENDPOINT"),
            var("AWS_ACCESS_KEY_ID"),
            var("AWS_SECRET_ACCESS_KEY"),
        ) {
            return Garage {
                endpoint,
                region: var("AWS_REGION").unwrap_or_else(|| "garage".into()),
                key_id,
                secret,
            };
        }
        let file = garage_dir().join("env");
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            panic!(
                "no S3 settings in the environment and no {} ({e}): run `scripts/garage install` \
                 and `scripts/garage start` (scripts/test does)",
                file.display()
            )
        });
        let get = |k: &str| {
            text.lines()
                .filter_map(|l| {
                    l.trim()
                        .strip_prefix("export ")
                        .unwrap_or(l)
                        .split_once('=')
                })
                .find(|(key, _)| key.trim() == k)
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_else(|| panic!("{} has no {k}", file.display()))
        };
        Garage {
            endpoint: get("VMBACKUP_S3_ENDPOINT"),
            region: get("AWS_REGION"),
            key_id: get("AWS_ACCESS_KEY_ID"),
            secret: get("AWS_SECRET_ACCESS_KEY"),
        }
    }

    /// The environment a `vmbackup` run needs to reach the node.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("VMBACKUP_S3_ENDPOINT", self.endpoint.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
        ]
    }

    pub fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint.clone()),
            region: self.region.clone(),
            access_key_id: Some(self.key_id.clone()),
            secret_access_key: Some(Secret::new(self.secret.clone())),
            ..S3Settings::default()
        }
    }

    /// A store on `prefix` of the test bucket.
    pub fn store(&self, prefix: &str) -> S3Store {
        S3Store::open(BUCKET, prefix, &self.settings()).expect("open the Garage test bucket")
    }

    /// The pid of the running node (from `scripts/garage`'s pid file).
    pub fn pid() -> Option<i32> {
        std::fs::read_to_string(garage_dir().join("garage.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Runs `scripts/garage start` (restarts a killed node on its data).
    pub fn start(checkout: &Path) {
        let out = Command::new(checkout.join("scripts/garage"))
            .arg("start")
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/garage start");
        assert!(
            out.status.success(),
            "scripts/garage start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A repository of one test: `s3://vmbackup-test/<unique>/` and a local state folder.
pub struct S3Place {
    pub garage: Garage,
    pub prefix: String,
    pub dir: tempfile::TempDir,
}

impl S3Place {
    pub fn new(label: &str) -> S3Place {
        static N: AtomicU32 = AtomicU32::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or_default();
        let prefix = format!(
            "t-{label}-{}-{now}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        S3Place {
            garage: Garage::get(),
            prefix,
            dir: tempfile::Builder::new()
                .prefix("vmbt-s3-")
                .tempdir_in("/var/tmp")
                .expect("temporary folder"),
        }
    }

    /// `s3://vmbackup-test/<prefix>/`.
    pub fn url(&self) -> String {
        format!("s3://{BUCKET}/{}/", self.prefix)
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The objects under the prefix, relative to it.
    pub fn objects(&self) -> Vec<String> {
        self.garage
            .store(&self.prefix)
            .list("")
            .expect("list the test prefix")
    }

    /// Runs `BINARY --json --repo URL --state-dir S ARGS` with the node's settings.
    pub fn run(&self, binary: &Path, args: &[&str]) -> Run {
        self.run_env(binary, args, &[], &[])
    }

    /// As `run`, with `env` set over the node's settings and `remove` unset.
    pub fn run_env(
        &self,
        binary: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        remove: &[&str],
    ) -> Run {
        self.run_at(binary, &self.url(), args, env, remove)
    }

    /// As `run_env`, on repository `repo` (another location) with this place's state folder.
    pub fn run_at(
        &self,
        binary: &Path,
        repo: &str,
        args: &[&str],
        env: &[(&str, &str)],
        remove: &[&str],
    ) -> Run {
        let mut cmd = Command::new(binary);
        cmd.arg("--json")
            .arg("--repo")
            .arg(repo)
            .arg("--state-dir")
            .arg(self.state())
            .args(args)
            .env_remove("VMBACKUP_CONFIG")
            .env("VMBACKUP_LOG", "info")
            .stdin(Stdio::null());
        for (k, v) in self.garage.env() {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        for k in remove {
            cmd.env_remove(k);
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", binary.display()));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let json = parse_one_document(&stdout)
            .unwrap_or_else(|e| panic!("{e}: {stdout:?}\nstderr: {stderr}"));
        Run {
            code: out.status.code().unwrap_or(-1),
            json,
            stderr,
        }
    }
}

impl Drop for S3Place {
    fn drop(&mut self) {
        // Best effort: a node killed by a test may be down.
        let Ok(store) = S3Store::open(BUCKET, &self.prefix, &self.garage.settings()) else {
            return;
        };
        if let Ok(names) = store.list("") {
            for n in names {
                let _ = store.delete(&n);
            }
        }
    }
}
