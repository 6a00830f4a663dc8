//! `vmbackup config show`: every effective setting and where it came from: a command-line
//! flag, an environment variable, the config file (with its path) or the built-in default.
//! Secrets (S3 keys, passwords, tokens, passphrase commands) are shown as `(set)`, never
//! their value.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{Config, DEFAULT_CONFIG};
use crate::error::{Error, Result};
use crate::preflight::GIB;
use crate::render::Table;

/// Where a global option's value came from, as clap saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliOrigin {
    /// `--repo` (the flag as spelled in `--help`).
    Flag(String),
    /// The variable clap read, e.g. `VMBACKUP_REPO`.
    Env(String),
}

/// What decided a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Flag,
    Env,
    File,
    Default,
}

/// One setting: its config-file key, its effective value, and its source.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Setting {
    /// The key in config.toml (`s3.region`: `region` in `[s3]`).
    pub key: String,
    /// The value in effect; `null` when unset; a secret's is `"(set)"` or `null`.
    pub value: Value,
    pub source: Source,
    /// The flag that gave it (`source` `flag`).
    pub flag: Option<String>,
    /// The environment variable that gave it (`source` `env`).
    pub env: Option<String>,
    /// The file that gave it (`source` `file`).
    pub file: Option<String>,
    /// Whether the value is a secret (never shown).
    pub secret: bool,
}

/// The whole answer of `config show`.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Shown {
    /// The config file read; `null` when none was (the default one is absent).
    pub config_file: Option<String>,
    pub settings: Vec<Setting>,
}

/// What the settings are read from besides the resolved configuration.
pub struct Inputs<'a> {
    /// For a global option (named by its field: `repo`, `freeze_timeout`): whether the command
    /// line or clap's environment variable gave it.
    pub cli: &'a dyn Fn(&str) -> Option<CliOrigin>,
    /// The config file read and its keys.
    pub file: Option<(&'a Path, &'a toml::Table)>,
    /// The environment (tests pass their own).
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

/// Reads the config file as `FileConfig::load` does (the default one only if present), as
/// a table of keys; `None` when there is none.
pub fn load_file(path: Option<&Path>) -> Result<Option<(PathBuf, toml::Table)>> {
    let explicit = path.is_some();
    let path = path.unwrap_or(Path::new(DEFAULT_CONFIG));
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .map(|t| Some((path.to_path_buf(), t)))
            .map_err(|e| Error::Config {
                key: path.display().to_string(),
                detail: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(None),
        Err(e) => Err(Error::io("read config", path, e)),
    }
}

/// Whether a key names a secret: passwords, tokens, secret keys, passphrases.
pub fn is_secret_key(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key).to_ascii_lowercase();
    ["password", "passwd", "secret", "token", "passphrase"]
        .iter()
        .any(|w| last.contains(w))
        || last == "key"
        || last.ends_with("_key")
        || last.ends_with("_key_id")
}

/// The value `file` holds at dotted `key`.
fn file_value<'t>(file: &'t toml::Table, key: &str) -> Option<&'t toml::Value> {
    let mut parts = key.split('.');
    let mut v = file.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

/// Every leaf key of `t`, dotted, with its value.
fn leaves(prefix: &str, t: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v.as_table() {
            Some(sub) => leaves(&key, sub, out),
            None => out.push((key, v.clone())),
        }
    }
}

fn to_json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => json!(s),
        toml::Value::Integer(i) => json!(i),
        toml::Value::Float(f) => json!(f),
        toml::Value::Boolean(b) => json!(b),
        toml::Value::Datetime(d) => json!(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
        }
    }
}

fn path_value(p: Option<&Path>) -> Value {
    p.map_or(Value::Null, |p| json!(p.display().to_string()))
}

/// The effective settings of `cfg` (resolved from the same inputs) and their sources.
pub fn effective(cfg: &Config, inp: &Inputs) -> Shown {
    let file_path = inp.file.map(|(p, _)| p.display().to_string());
    let table = inp.file.map(|(_, t)| t);
    let settings: std::cell::RefCell<Vec<Setting>> = Default::default();
    // key, the global option's field (flag or clap's variable), other variables read, the
    // effective value, secret.
    let add = |key: &str, cli: Option<&str>, vars: &[&str], value: Value, secret: bool| {
        let mut s = Setting {
            key: key.to_string(),
            value,
            source: Source::Default,
            flag: None,
            env: None,
            file: None,
            secret,
        };
        if let Some(o) = cli.and_then(|c| (inp.cli)(c)) {
            match o {
                CliOrigin::Flag(f) => (s.source, s.flag) = (Source::Flag, Some(f)),
                CliOrigin::Env(v) => (s.source, s.env) = (Source::Env, Some(v)),
            }
        } else if let Some(v) = vars
            .iter()
            .find(|v| (inp.env)(v).is_some_and(|x| !x.is_empty()))
        {
            (s.source, s.env) = (Source::Env, Some(v.to_string()));
        } else if table.is_some_and(|t| file_value(t, key).is_some()) {
            (s.source, s.file) = (Source::File, file_path.clone());
        }
        if s.secret {
            s.value = if s.value.is_null() {
                Value::Null
            } else {
                json!("(set)")
            };
        }
        settings.borrow_mut().push(s);
    };
    let b = &cfg.backup;
    let secs = |d: std::time::Duration| json!(d.as_secs());
    add("connect", Some("connect"), &[], json!(cfg.connect), false);
    add(
        "repo",
        Some("repo"),
        &[],
        json!(cfg.repo.to_string()),
        false,
    );
    add(
        "key_file",
        Some("key_file"),
        &[],
        path_value(cfg.key_file.as_deref()),
        false,
    );
    add(
        "state_dir",
        Some("state_dir"),
        &[],
        path_value(Some(&cfg.state_dir)),
        false,
    );
    add(
        "qemu_dir",
        Some("qemu_dir"),
        &[],
        path_value(Some(&cfg.qemu_dir)),
        false,
    );
    add(
        "overlay_dir",
        Some("overlay_dir"),
        &[],
        path_value(b.overlay_dir.as_deref()),
        false,
    );
    add(
        "overlay_headroom",
        Some("overlay_headroom"),
        &[],
        json!(b.limits.overlay_headroom_ratio),
        false,
    );
    add(
        "max_disk_gib",
        Some("max_disk_gib"),
        &[],
        json!(b.limits.max_disk_bytes / GIB),
        false,
    );
    add(
        "max_total_gib",
        Some("max_total_gib"),
        &[],
        json!(b.limits.max_total_bytes / GIB),
        false,
    );
    add(
        "freeze_timeout_secs",
        Some("freeze_timeout"),
        &[],
        secs(b.freeze_timeout),
        false,
    );
    add(
        "commit_timeout_secs",
        None,
        &[],
        secs(b.commit_stall_timeout),
        false,
    );
    add(
        "full_every_days",
        None,
        &[],
        json!(b.full_every.as_secs() / 86_400),
        false,
    );
    add("threads", None, &[], json!(b.threads), false);
    add(
        "slot_capacity",
        Some("slot_capacity"),
        &[],
        json!(cfg.slot_capacity),
        false,
    );
    add(
        "catch_up_minutes",
        Some("catch_up_minutes"),
        &[],
        json!(cfg.catch_up.as_secs() / 60),
        false,
    );
    let s3 = &cfg.s3;
    add(
        "s3.endpoint",
        None,
        &["VMBACKUP_S3_ENDPOINT"],
        json!(s3.endpoint),
        false,
    );
    add(
        "s3.region",
        None,
        &["AWS_REGION", "AWS_DEFAULT_REGION"],
        json!(s3.region),
        false,
    );
    add(
        "s3.path_style",
        None,
        &["VMBACKUP_S3_PATH_STYLE"],
        json!(s3.path_style),
        false,
    );
    add(
        "s3.retry_timeout_secs",
        None,
        &["VMBACKUP_S3_RETRY_SECS"],
        secs(s3.retry_timeout),
        false,
    );
    let credentials_file = table.and_then(|t| file_value(t, "s3.credentials_file"));
    add(
        "s3.credentials_file",
        None,
        &[],
        credentials_file.map_or(Value::Null, to_json),
        false,
    );
    // The keys: from the environment, else (for an s3:// repository) the credentials file.
    let env_set = |v: &str| (inp.env)(v).is_some_and(|x| !x.is_empty());
    for (key, var, set) in [
        (
            "s3.access_key_id",
            "AWS_ACCESS_KEY_ID",
            s3.access_key_id.is_some(),
        ),
        (
            "s3.secret_access_key",
            "AWS_SECRET_ACCESS_KEY",
            s3.secret_access_key.is_some(),
        ),
    ] {
        add(key, None, &[var], json!(set.then_some("x")), true);
        if set && !env_set(var) {
            if let (Some(s), Some(toml::Value::String(p))) =
                (settings.borrow_mut().last_mut(), credentials_file)
            {
                (s.source, s.file) = (Source::File, Some(p.clone()));
            }
        }
    }
    for (key, var, secret) in [
        ("passphrase_file", crate::unlock::PASSPHRASE_FILE_ENV, false),
        (
            "passphrase_command",
            crate::unlock::PASSPHRASE_COMMAND_ENV,
            true,
        ),
    ] {
        let v = (inp.env)(var).filter(|v| !v.is_empty());
        add(key, None, &[var], json!(v), secret);
    }
    // The report settings, and any other key of the file, as the file has them.
    let mut rest = Vec::new();
    if let Some(t) = table {
        leaves("", t, &mut rest);
    }
    let known: Vec<String> = settings.borrow().iter().map(|s| s.key.clone()).collect();
    let from_file =
        |key: &str| -> Option<Value> { table.and_then(|t| file_value(t, key)).map(to_json) };
    for (key, default) in [
        ("report.smtp", Value::Null),
        ("report.from", Value::Null),
        ("report.to", json!([])),
        ("report.command", Value::Null),
        (
            "report.command_timeout_secs",
            json!(crate::notify::DEFAULT_COMMAND_TIMEOUT.as_secs()),
        ),
    ] {
        let v = from_file(key).unwrap_or(default);
        add(key, None, &[], v, is_secret_key(key));
    }
    for (key, v) in rest {
        if known.contains(&key) || settings.borrow().iter().any(|s| s.key == key) {
            continue;
        }
        add(&key, None, &[], to_json(&v), is_secret_key(&key));
    }
    Shown {
        config_file: file_path,
        settings: settings.into_inner(),
    }
}

/// A value as one cell.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

/// The settings as a table: SETTING, VALUE, SOURCE (`flag --repo`, `env VMBACKUP_REPO`,
/// `file /etc/vmbackup/config.toml`, `default`).
pub fn text(s: &Shown) -> String {
    let mut out = match &s.config_file {
        Some(p) => format!("config file: {p}\n\n"),
        None => format!("config file: none ({DEFAULT_CONFIG} is absent)\n\n"),
    };
    let mut t = Table::new(&["SETTING", "VALUE", "SOURCE"]);
    for x in &s.settings {
        let source = match x.source {
            Source::Flag => format!("flag {}", x.flag.as_deref().unwrap_or("?")),
            Source::Env => format!("env {}", x.env.as_deref().unwrap_or("?")),
            Source::File => format!("file {}", x.file.as_deref().unwrap_or("?")),
            Source::Default => "default".into(),
        };
        t.row([x.key.clone(), cell(&x.value), source]);
    }
    out.push_str(&t.render());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, Overrides, S3Env};
    use crate::repository::location::Secret;

    fn find<'a>(s: &'a Shown, key: &str) -> &'a Setting {
        s.settings
            .iter()
            .find(|x| x.key == key)
            .unwrap_or_else(|| panic!("no setting {key}"))
    }

    #[test]
    fn each_setting_says_where_it_came_from_and_secrets_stay_hidden() {
        let toml_text = "max_disk_gib = 100\nconnect = 'qemu:///session'\n\
                         [report]\nsmtp = '127.0.0.1:25'\nto = ['ops@example.com']\npassword = 'hunter2'\n";
        let table: toml::Table = toml::from_str(toml_text).unwrap();
        // The typed file has no password key (yet): resolve without it.
        let typed: FileConfig = toml::from_str(
            "max_disk_gib = 100\nconnect = 'qemu:///session'\n[report]\nsmtp = '127.0.0.1:25'\n\
             to = ['ops@example.com']\n",
        )
        .unwrap();
        let o = Overrides {
            repo: Some("/flag/repo".into()),
            state_dir: Some("/env/state".into()),
            s3: S3Env {
                secret_access_key: Some(Secret::new("s3cr3t-value".into())),
                ..S3Env::default()
            },
            ..Overrides::default()
        };
        let cfg = Config::resolve(o, typed).unwrap();
        let cli = |k: &str| match k {
            "repo" => Some(CliOrigin::Flag("--repo".into())),
            "state_dir" => Some(CliOrigin::Env("VMBACKUP_STATE_DIR".into())),
            _ => None,
        };
        let env = |k: &str| (k == "AWS_SECRET_ACCESS_KEY").then(|| "s3cr3t-value".to_string());
        let path = Path::new("/etc/x.toml");
        let s = effective(
            &cfg,
            &Inputs {
                cli: &cli,
                file: Some((path, &table)),
                env: &env,
            },
        );
        let repo = find(&s, "repo");
        assert_eq!(
            (repo.source, repo.flag.as_deref()),
            (Source::Flag, Some("--repo"))
        );
        assert_eq!(repo.value, json!("/flag/repo"));
        let st = find(&s, "state_dir");
        assert_eq!(
            (st.source, st.env.as_deref()),
            (Source::Env, Some("VMBACKUP_STATE_DIR"))
        );
        let c = find(&s, "connect");
        assert_eq!(
            (c.source, c.file.as_deref()),
            (Source::File, Some("/etc/x.toml"))
        );
        assert_eq!(c.value, json!("qemu:///session"));
        assert_eq!(find(&s, "max_disk_gib").value, json!(100));
        let d = find(&s, "max_total_gib");
        assert_eq!((d.source, &d.value), (Source::Default, &json!(4000)));
        assert_eq!(find(&s, "report.smtp").source, Source::File);
        let secret = find(&s, "s3.secret_access_key");
        assert_eq!(
            (secret.source, &secret.value),
            (Source::Env, &json!("(set)"))
        );
        assert!(secret.secret);
        let pw = find(&s, "report.password");
        assert_eq!(
            (pw.source, &pw.value, pw.secret),
            (Source::File, &json!("(set)"), true)
        );
        assert_eq!(find(&s, "s3.access_key_id").value, Value::Null);
        // Neither the text nor the JSON has a secret's value.
        let text = text(&s);
        let doc = serde_json::to_string(&s).unwrap();
        for out in [&text, &doc] {
            assert!(!out.contains("s3cr3t-value"), "{out}");
            assert!(!out.contains("hunter2"), "{out}");
        }
        assert!(text.contains("flag --repo"), "{text}");
        assert!(text.contains("env VMBACKUP_STATE_DIR"), "{text}");
        assert!(text.contains("file /etc/x.toml"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("max_total_gib") && l.ends_with("default")),
            "{text}"
        );
    }

    #[test]
    fn secret_keys_by_name() {
        for k in [
            "report.password",
            "s3.secret_access_key",
            "api_token",
            "report.smtp_passwd",
            "key",
            "s3.access_key_id",
            "passphrase",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in [
            "key_file",
            "report.smtp",
            "s3.credentials_file",
            "connect",
            "report.to",
        ] {
            assert!(!is_secret_key(k), "{k}");
        }
    }
}
