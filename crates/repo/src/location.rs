//! Where a repository is: a local folder (the default) or `s3://BUCKET/PREFIX` on an
//! S3-compatible object store, and the settings such a store needs (endpoint, region,
//! addressing, credentials). Secrets are held in `Secret`, which never prints.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A repository's place, as given to `--repo`, `repo =` or `VMBACKUP_REPO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    /// `prefix` is empty (the bucket's root) or '/'-separated components, no trailing '/'.
    S3 {
        bucket: String,
        prefix: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    #[error("repository {given:?}: {why}; give a folder or s3://BUCKET/PREFIX")]
    BadForm { given: String, why: String },
    #[error("S3 endpoint {given:?}: {why}")]
    BadEndpoint { given: String, why: String },
    #[error("S3 credentials file {}: {why}", path.display())]
    Credentials { path: PathBuf, why: String },
    #[error("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or credentials_file in the [s3] section of config.toml")]
    NoCredentials,
    #[error("{0}")]
    Setting(String),
    #[error("bucket {bucket:?} does not exist at {endpoint}")]
    NoBucket { bucket: String, endpoint: String },
    #[error("the S3 store at {endpoint} refused the credentials (access key {key_id:?}) for bucket {bucket:?}: {detail}")]
    Denied {
        bucket: String,
        endpoint: String,
        key_id: String,
        detail: String,
    },
    #[error("the S3 endpoint {endpoint} cannot be reached: {detail}")]
    Unreachable { endpoint: String, detail: String },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}/"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}/"),
        }
    }
}

impl std::str::FromStr for Location {
    type Err = LocationError;
    fn from_str(s: &str) -> Result<Location, LocationError> {
        Location::parse(s)
    }
}

/// A prefix's components: letters, digits, `.`, `_`, `-` (no `.` or `..`).
fn good_component(c: &str) -> bool {
    !c.is_empty()
        && c != "."
        && c != ".."
        && c.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))
}

/// S3's bucket naming rules: 3-63 of `[a-z0-9.-]`, starting and ending with a letter or digit.
fn good_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && b.starts_with(|c: char| c.is_ascii_alphanumeric())
        && b.ends_with(|c: char| c.is_ascii_alphanumeric())
}

impl Location {
    pub fn parse(s: &str) -> Result<Location, LocationError> {
        let bad = |why: &str| LocationError::BadForm {
            given: s.to_string(),
            why: why.to_string(),
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        let lower = s.to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix("s3:") {
            let Some(_) = rest.strip_prefix("//") else {
                return Err(bad("an S3 location starts with s3://"));
            };
            if !s.starts_with("s3://") {
                return Err(bad("write the scheme in lower case, s3://"));
            }
            let rest = &s["s3://".len()..];
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket"));
            }
            if !good_bucket(bucket) {
                return Err(bad(
                    "a bucket name is 3 to 63 lower-case letters, digits, '.' and '-'",
                ));
            }
            let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
            if !prefix.is_empty() && !prefix.split('/').all(good_component) {
                return Err(bad(
                    "the prefix is '/'-separated names of letters, digits, '.', '_' and '-' \
                     (no empty, '.' or '..' parts)",
                ));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        if let Some((scheme, _)) = s.split_once("://") {
            if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(bad(&format!("unsupported scheme {scheme}://")));
            }
        }
        Ok(Location::Local(PathBuf::from(s)))
    }

    pub fn local(&self) -> Option<&Path> {
        match self {
            Location::Local(p) => Some(p),
            Location::S3 { .. } => None,
        }
    }
}

/// A secret (an S3 secret key): never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }
    /// The secret itself, only for handing it to the S3 client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How to reach an S3 store.
#[derive(Debug, Clone, PartialEq)]
pub struct S3Settings {
    /// `https://host[:port]` (or `http://` on a loopback address); `None`: AWS for `region`.
    pub endpoint: Option<String>,
    pub region: String,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`.
    pub path_style: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    /// How long a request is retried (5xx, throttling, connection errors) before it fails.
    pub retry_timeout: Duration,
    /// Uploads in flight at once.
    pub parallel_uploads: usize,
}

pub const DEFAULT_REGION: &str = "us-east-1";
pub const DEFAULT_RETRY: Duration = Duration::from_secs(120);
pub const DEFAULT_PARALLEL_UPLOADS: usize = 16;

impl Default for S3Settings {
    fn default() -> S3Settings {
        S3Settings {
            endpoint: None,
            region: DEFAULT_REGION.into(),
            path_style: true,
            access_key_id: None,
            secret_access_key: None,
            retry_timeout: DEFAULT_RETRY,
            parallel_uploads: DEFAULT_PARALLEL_UPLOADS,
        }
    }
}

/// Whether `host` (no port) is a loopback address or `localhost`.
fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks an endpoint: `https://HOST[:PORT]`, or `http://` to a loopback address only (plain
/// HTTP elsewhere would carry the backups unencrypted). Returns it without a trailing '/'.
pub fn check_endpoint(e: &str) -> Result<String, LocationError> {
    let bad = |why: &str| LocationError::BadEndpoint {
        given: e.to_string(),
        why: why.to_string(),
    };
    let (scheme, rest) = e
        .split_once("://")
        .ok_or_else(|| bad("give a URL, https://HOST[:PORT]"))?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(bad("give a URL, https://HOST[:PORT], without a path"));
    }
    let host = if rest.starts_with('[') {
        rest.split_once(']')
            .map(|(h, _)| format!("{h}]"))
            .ok_or_else(|| bad("unclosed '['"))?
    } else {
        rest.rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(rest)
            .to_string()
    };
    match scheme {
        "https" => {}
        "http" if is_loopback(&host) => {}
        "http" => {
            return Err(bad(
                "plain http only to a loopback address; use https for a remote store",
            ))
        }
        _ => return Err(bad("the scheme is https:// (or http:// on loopback)")),
    }
    Ok(format!("{scheme}://{rest}"))
}

/// The text of a file that holds a secret: a regular file of mode 0600 (or stricter);
/// otherwise why not, in words.
pub fn read_private_file(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "has mode {mode:04o}; it holds a secret, so it must be 0600 (chmod 600)"
        ));
    }
    std::fs::read_to_string(path).map_err(|e| e.to_string())
}

/// Reads a credentials file, refused unless it is a regular file of mode 0600 (or stricter):
/// the AWS shared-credentials format, `aws_access_key_id = ...` and
/// `aws_secret_access_key = ...` in its `[default]` section (or before any section).
pub fn read_credentials_file(path: &Path) -> Result<(String, Secret), LocationError> {
    let bad = |why: String| LocationError::Credentials {
        path: path.to_path_buf(),
        why,
    };
    let text = read_private_file(path).map_err(bad)?;
    let (mut id, mut secret) = (None, None);
    let mut section = "default".to_string();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim().to_string();
            continue;
        }
        if section != "default" {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            // Never quote the line: it may be a secret.
            return Err(bad("a line is neither `key = value` nor `[section]`".into()));
        };
        let v = v.trim().trim_matches('"').to_string();
        match k.trim() {
            "aws_access_key_id" => id = Some(v),
            "aws_secret_access_key" => secret = Some(Secret(v)),
            _ => {}
        }
    }
    match (id, secret) {
        (Some(i), Some(s)) if !i.is_empty() && !s.0.is_empty() => Ok((i, s)),
        _ => Err(bad(
            "needs aws_access_key_id and aws_secret_access_key in its [default] section".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_s3_locations_parse() {
        assert_eq!(
            Location::parse("/var/lib/vmbackup/repo").unwrap(),
            Location::Local("/var/lib/vmbackup/repo".into())
        );
        assert_eq!(
            Location::parse("relative/repo").unwrap(),
            Location::Local("relative/repo".into())
        );
        let s3 = |b: &str, p: &str| Location::S3 {
            bucket: b.into(),
            prefix: p.into(),
        };
        assert_eq!(Location::parse("s3://bk-1").unwrap(), s3("bk-1", ""));
        assert_eq!(Location::parse("s3://bk-1/").unwrap(), s3("bk-1", ""));
        assert_eq!(
            Location::parse("s3://vmbackup-test/hosts/a_1.x/").unwrap(),
            s3("vmbackup-test", "hosts/a_1.x")
        );
        assert_eq!(
            Location::parse("s3://b.example/p").unwrap().to_string(),
            "s3://b.example/p/"
        );
    }

    #[test]
    fn bad_locations_are_refused_with_the_reason() {
        for (given, why) in [
            ("", "empty"),
            ("s3:/bucket", "s3://"),
            ("s3:bucket", "s3://"),
            ("S3://bucket", "lower case"),
            ("s3://", "no bucket"),
            ("s3:///p", "no bucket"),
            ("s3://ab", "bucket name"),
            ("s3://Upper", "bucket name"),
            ("s3://-bk", "bucket name"),
            ("s3://bk_x", "bucket name"),
            ("s3://bucket/a//b", "prefix"),
            ("s3://bucket/a/../b", "prefix"),
            ("s3://bucket/a b", "prefix"),
            ("s3://bucket/a?x", "prefix"),
            ("gs://bucket/p", "unsupported scheme gs://"),
            ("https://host/bucket", "unsupported scheme"),
        ] {
            let e = Location::parse(given).expect_err(given).to_string();
            assert!(e.contains(why), "{given:?}: {e}");
            assert!(e.contains("s3://BUCKET/PREFIX"), "{e}");
        }
    }

    #[test]
    fn endpoints_are_https_or_loopback_http() {
        assert_eq!(
            check_endpoint("http://127.0.0.1:3900/").unwrap(),
            "http://127.0.0.1:3900"
        );
        assert!(check_endpoint("http://localhost:3900").is_ok());
        assert!(check_endpoint("http://[::1]:3900").is_ok());
        assert!(check_endpoint("https://s3.example.com").is_ok());
        assert!(check_endpoint("https://s3.example.com:8443").is_ok());
        for bad in [
            "http://10.0.0.5:3900",
            "http://s3.example.com",
            "s3.example.com",
            "ftp://127.0.0.1",
            "https://s3.example.com/path",
            "https://user:pw@s3.example.com",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_files_must_be_private_and_are_never_quoted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("credentials");
        std::fs::write(
            &p,
            "# keys\n[other]\naws_access_key_id = NOPE\n[default]\naws_access_key_id = GK123\naws_secret_access_key = s3cr3t-value\n",
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_credentials_file(&p).unwrap_err().to_string();
        assert!(e.contains("0644") && e.contains("0600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (id, secret) = read_credentials_file(&p).unwrap();
        assert_eq!(id, "GK123");
        assert_eq!(secret.expose(), "s3cr3t-value");
        assert!(!format!("{secret:?}").contains("s3cr3t"));
        std::fs::write(&p, "aws_access_key_id = GK1\ns3cr3t-value\n").unwrap();
        let e = read_credentials_file(&p).unwrap_err().to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        std::fs::write(&p, "aws_access_key_id = GK1\n").unwrap();
        assert!(read_credentials_file(&p).is_err());
    }
}
