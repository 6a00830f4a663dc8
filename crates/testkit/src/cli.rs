//! Running the `vmbackup` binary as a caller would (`--json`, one JSON document on stdout),
//! and throwaway repositories. The binary's path is the caller's: integration tests pass
//! `env!("CARGO_BIN_EXE_vmbackup")`, which only exists there.
//!
//! These are test helpers: they panic, with the binary's output, when something is off.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// A repository and state directory of one test, removed when dropped.
pub struct Place {
    pub dir: tempfile::TempDir,
}

impl Place {
    pub fn new() -> Place {
        std::fs::create_dir_all("/var/tmp/vmbackup-tests").unwrap();
        Place {
            dir: tempfile::Builder::new()
                .prefix("vmbt-repo-")
                .tempdir_in("/var/tmp")
                .expect("temporary folder"),
        }
    }
    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

impl Default for Place {
    fn default() -> Self {
        Place::new()
    }
}

/// The result of one run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub json: Value,
    pub stderr: String,
}

/// Runs `BINARY --json --repo R --state-dir S ARGS...` (with no config file, logging at
/// info) and parses its one JSON document.
pub fn run_json(binary: &Path, repo: &Path, state: &Path, args: &[&str]) -> Run {
    let out = Command::new(binary)
        .arg("--json")
        .arg("--repo")
        .arg(repo)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("VMBACKUP_CONFIG")
        .env("VMBACKUP_LOG", "info")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", binary.display()));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json =
        parse_one_document(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout:?}\nstderr: {stderr}"));
    Run {
        code: out.status.code().unwrap_or(-1),
        json,
        stderr,
    }
}

/// Parses stdout that must be exactly one JSON document, of the shape its command's schema
/// gives (`crate::schema`).
pub fn parse_one_document(stdout: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(stdout.trim())
        .map_err(|e| format!("stdout is not one JSON document ({e})"))?;
    crate::schema::check_document(&v)?;
    Ok(v)
}
