//! How commands open a repository that may be encrypted: with a key file (`--key-file`,
//! `VMBACKUP_KEY_FILE`), or with a passphrase from a file (`VMBACKUP_PASSPHRASE_FILE`), a
//! command (`VMBACKUP_PASSPHRASE_COMMAND`, its argv split at whitespace, run without a shell)
//! or a terminal prompt (no echo; only when standard input is a terminal). And `init`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::repository::crypt::{CryptError, Passphrase, Unlock};
use crate::repository::location::Location;
use crate::repository::{InitOptions, RepoError, Repository};

pub const PASSPHRASE_FILE_ENV: &str = "VMBACKUP_PASSPHRASE_FILE";
pub const PASSPHRASE_COMMAND_ENV: &str = "VMBACKUP_PASSPHRASE_COMMAND";

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn bad(why: impl Into<String>) -> RepoError {
    CryptError::Passphrase(why.into()).into()
}

/// Drops one trailing newline (`\n` or `\r\n`); an empty passphrase is refused.
fn trimmed(mut p: Vec<u8>, from: &str) -> Result<Passphrase, RepoError> {
    if p.ends_with(b"\n") {
        p.pop();
        if p.ends_with(b"\r") {
            p.pop();
        }
    }
    if p.is_empty() {
        return Err(bad(format!("{from} gave an empty passphrase")));
    }
    Ok(Passphrase(p))
}

fn from_file(path: &str) -> Result<Passphrase, RepoError> {
    let bytes = std::fs::read(path).map_err(|e| {
        bad(format!(
            "{PASSPHRASE_FILE_ENV}: cannot read {path} ({})",
            e.kind()
        ))
    })?;
    trimmed(bytes, PASSPHRASE_FILE_ENV)
}

fn from_command(cmd: &str) -> Result<Passphrase, RepoError> {
    let mut argv = cmd.split_whitespace();
    let Some(program) = argv.next() else {
        return Err(bad(format!("{PASSPHRASE_COMMAND_ENV} is empty")));
    };
    let out = std::process::Command::new(program)
        .args(argv)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| {
            bad(format!(
                "{PASSPHRASE_COMMAND_ENV}: cannot run {program}: {e}"
            ))
        })?;
    if !out.status.success() {
        return Err(bad(format!(
            "{PASSPHRASE_COMMAND_ENV}: {program} failed ({})",
            out.status
        )));
    }
    trimmed(out.stdout, PASSPHRASE_COMMAND_ENV)
}

/// A passphrase typed once in this process (a command may open the repository twice).
static TYPED: Mutex<Option<Vec<u8>>> = Mutex::new(None);

/// Reads a line from the terminal with echo off.
fn prompt_once(prompt: &str) -> Result<Vec<u8>, RepoError> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|e| bad(format!("no terminal to ask on: {e}")))?;
    let saved = tcgetattr(&tty).map_err(|e| bad(format!("terminal: {e}")))?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    quiet.local_flags.insert(LocalFlags::ECHONL);
    tcsetattr(&tty, SetArg::TCSAFLUSH, &quiet).map_err(|e| bad(format!("terminal: {e}")))?;
    let mut w = &tty;
    let _ = w.write_all(prompt.as_bytes());
    let _ = w.flush();
    let mut line = Vec::new();
    let read = std::io::BufReader::new(&tty).read_until(b'\n', &mut line);
    let _ = tcsetattr(&tty, SetArg::TCSAFLUSH, &saved);
    read.map_err(|e| bad(format!("terminal: {e}")))?;
    Ok(line)
}

fn from_terminal(repo: &str, confirm: bool) -> Result<Passphrase, RepoError> {
    let mut typed = TYPED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = typed.as_ref() {
        return Ok(Passphrase(p.clone()));
    }
    let p = trimmed(
        prompt_once(&format!("Passphrase of repository {repo}: "))?,
        "the terminal",
    )?;
    if confirm {
        let again = trimmed(prompt_once("Passphrase again: ")?, "the terminal")?;
        if again.0 != p.0 {
            return Err(bad("the two passphrases differ"));
        }
    }
    *typed = Some(p.0.clone());
    Ok(p)
}

/// Whether a passphrase was given by the environment (not just a terminal to ask on).
fn passphrase_given() -> bool {
    env(PASSPHRASE_FILE_ENV).is_some() || env(PASSPHRASE_COMMAND_ENV).is_some()
}

/// The passphrase source of this process: the file, else the command, else the terminal
/// when standard input is one; `None` when there is none.
#[allow(clippy::type_complexity)]
fn passphrase_source(
    repo: &str,
    confirm: bool,
) -> Option<Box<dyn Fn() -> Result<Passphrase, RepoError> + Send + Sync>> {
    if let Some(f) = env(PASSPHRASE_FILE_ENV) {
        return Some(Box::new(move || from_file(&f)));
    }
    if let Some(c) = env(PASSPHRASE_COMMAND_ENV) {
        return Some(Box::new(move || from_command(&c)));
    }
    if std::io::stdin().is_terminal() {
        let repo = repo.to_string();
        return Some(Box::new(move || from_terminal(&repo, confirm)));
    }
    None
}

/// What unlocks `cfg`'s repository.
pub fn unlock(cfg: &Config) -> Unlock {
    Unlock {
        key_file: cfg.key_file.clone(),
        passphrase: passphrase_source(&cfg.repo.to_string(), false),
        explicit: cfg.key_file.is_some() || passphrase_given(),
    }
}

/// What unlocks the repository at `repo` with `key_file` (else `cfg`'s), for a command that
/// opens two (`sync`).
pub fn unlock_other(cfg: &Config, repo: &Location, key_file: Option<&Path>) -> Unlock {
    let key_file = key_file.map(Path::to_path_buf).or(cfg.key_file.clone());
    Unlock {
        explicit: key_file.is_some() || passphrase_given(),
        key_file,
        passphrase: passphrase_source(&repo.to_string(), false),
    }
}

/// Opens `cfg`'s repository, unlocking an encrypted one (see the module's comment).
pub fn open_repo(cfg: &Config) -> Result<Repository> {
    Repository::open_location(&cfg.repo, &cfg.s3, &cfg.state_dir, &unlock(cfg)).map_err(Error::from)
}

/// What `init` made.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Initialized {
    pub repo: String,
    pub encrypted: bool,
    pub key_file: Option<String>,
    /// Whether the key is also wrapped by a passphrase in the repository.
    pub passphrase: bool,
}

/// `vmbackup init [--encrypt]`, with `cfg.key_file` as where the key is written.
pub fn init(cfg: &Config, encrypt: bool) -> Result<Initialized> {
    if !encrypt && cfg.key_file.is_some() {
        return Err(Error::Invalid(
            "--key-file (or VMBACKUP_KEY_FILE) is for an encrypted repository: add --encrypt"
                .into(),
        ));
    }
    // A key file alone and no passphrase given: the key lives only in that file.
    let passphrase = if !encrypt || (cfg.key_file.is_some() && !passphrase_given()) {
        None
    } else {
        // Before asking for a passphrase (S3: `init_location` checks).
        if let Some(dir) = cfg.repo.local().filter(|d| d.join("config.json").exists()) {
            return Err(RepoError::from(CryptError::Initialized(dir.to_path_buf())).into());
        }
        let Some(get) = passphrase_source(&cfg.repo.to_string(), true) else {
            return Err(Error::Invalid(
                "an encrypted repository needs a passphrase (VMBACKUP_PASSPHRASE_FILE, VMBACKUP_PASSPHRASE_COMMAND, or a terminal) or --key-file"
                    .into(),
            ));
        };
        Some(get()?)
    };
    let with_passphrase = passphrase.is_some();
    Repository::init_location(
        &cfg.repo,
        &cfg.s3,
        &InitOptions {
            encrypt,
            key_file: cfg.key_file.clone(),
            passphrase,
        },
    )?;
    Ok(Initialized {
        repo: cfg.repo.to_string(),
        encrypted: encrypt,
        key_file: cfg.key_file.as_ref().map(|k| k.display().to_string()),
        passphrase: with_passphrase,
    })
}
