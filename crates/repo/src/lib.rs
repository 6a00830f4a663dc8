//! The backup repository: content-addressed chunks shared by all backups and VMs, one index
//! per backed-up disk, one manifest per backup, written last. See FORMAT.md beside this file.

pub mod check;
pub mod chunk;
pub mod crypt;
pub mod digest;
pub mod disk;
pub mod failpoint;
#[cfg(any(test, feature = "fault-injection"))]
pub mod faults;
pub mod location;
pub mod locks;
pub mod maintain;
pub mod manifest;
pub mod qcow2;
pub mod s3;
pub mod source;
pub mod storage;
pub mod sync;
#[cfg(test)]
mod teststores;
pub mod usage;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crypt::{CryptError, EncryptionConfig, Keys, Passphrase, Sealed, Unlock};
use manifest::Manifest;
use storage::{LocalDir, ObjectStore};

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no backup or object {0:?}")]
    NotFound(String),
    #[error("invalid object name {0:?}")]
    BadName(String),
    #[error("chunk {digest} is damaged or does not match its digest")]
    Corrupt { digest: String },
    #[error("disk index: {0}")]
    BadIndex(String),
    #[error("the manifest of backup {id} cannot be read")]
    BadManifest {
        id: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("object {object} fails authentication: it was changed or damaged")]
    Tampered { object: String },
    #[error(transparent)]
    Crypt(#[from] CryptError),
    #[error("{} is a repository of format {found}, this program reads formats {} and {}", path.display(), FORMAT, FORMAT_ENCRYPTED)]
    Format { path: PathBuf, found: u32 },
    #[error("source disk")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{0} exists already; it is never overwritten")]
    Exists(String),
    #[error(
        "{} is neither empty nor a vmbackup repository (it has no config.json); give a new or empty folder",
        .0.display()
    )]
    NotARepository(PathBuf),
    #[error("backup {id} is damaged: {}", problems.join("; "))]
    Damaged { id: String, problems: Vec<String> },
    #[error(
        "refused: the manifest of {} cannot be read, so the chunks it uses are unknown and could be freed; `vmbackup verify` reports it, `vmbackup delete ID` removes it",
        ids.join(", ")
    )]
    UnreadableManifests { ids: Vec<String> },
    #[error("the repository lock was lost ({0}): another host may have taken it for stale; stopped (a backup publishes nothing, a gc deletes nothing more)")]
    LockLost(String),
    /// A bad repository location or S3 setting, or an S3 store that refuses or is unknown
    /// when first reached: bad input, nothing was written.
    #[error(transparent)]
    Location(#[from] location::LocationError),
    /// An S3 request that failed (after its retries).
    #[error("S3: cannot {what} {name}: {detail}")]
    Store {
        what: &'static str,
        name: String,
        detail: String,
    },
}

pub type Result<T, E = RepoError> = std::result::Result<T, E>;

/// The repository format this program writes (unencrypted repositories).
pub const FORMAT: u32 = 1;
/// The format of encrypted repositories (FORMAT.md): older programs refuse them.
pub const FORMAT_ENCRYPTED: u32 = 2;

/// What `vmbackup init` makes.
#[derive(Default)]
pub struct InitOptions {
    pub encrypt: bool,
    /// Where the master key is written too (a new file, 0600).
    pub key_file: Option<PathBuf>,
    /// The passphrase that wraps the master key in the repository; `None` with a key file:
    /// the key is kept only there.
    pub passphrase: Option<Passphrase>,
}

pub struct Repository {
    /// The repository's folder; for a remote one, a local folder for its local files.
    path: PathBuf,
    /// `s3://bucket/prefix/` for a repository on an object store.
    remote: Option<String>,
    store: Arc<dyn ObjectStore>,
    /// How chunks are named: SHA-256, or keyed in an encrypted repository.
    namer: chunk::Namer,
    /// Chunks found intact (or written) by this process: reused without another check.
    checked: Mutex<HashSet<chunk::Digest>>,
    /// Chunks known to be in the store while this process holds its backup lock (seeded
    /// from the previous backup's index, and what it wrote or checked): reused without a
    /// store request. Emptied whenever a backup lock is taken: without one, gc may remove
    /// chunks.
    known: Mutex<HashSet<chunk::Digest>>,
}

/// The last boot test of a backup (`backups/<id>/boot-test.json`): see FORMAT.md.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct BootTestRecord {
    /// When the test ended (UTC, RFC 3339).
    pub at: String,
    /// The guest agent answered.
    pub booted: bool,
    /// Seconds from the start of the VM to the agent's first answer.
    #[serde(default)]
    pub seconds_to_agent: Option<f64>,
    /// The command run in the guest, if any, and its exit status (`None`: it did not end).
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub command_exit_code: Option<i64>,
    /// Why the test failed; `None` when it passed.
    #[serde(default)]
    pub error: Option<String>,
}

fn boot_test_name(id: &str) -> String {
    format!("backups/{id}/boot-test.json")
}

/// What `Repository::scan` found under `backups/`.
#[derive(Debug, Default)]
pub struct Listing {
    /// The published backups whose manifest reads, oldest first.
    pub backups: Vec<Manifest>,
    /// The published backups whose manifest does not (truncated, garbled), by id, with why.
    pub unreadable: Vec<(String, String)>,
}

pub(crate) fn manifest_name(id: &str) -> String {
    format!("backups/{id}/manifest.json")
}

impl Repository {
    /// Opens the repository in `dir`, creating it (mode 0700) on first use: in a folder that
    /// does not exist or is empty. A folder with other content is refused, and left as it is.
    pub fn open(dir: &Path) -> Result<Repository> {
        Repository::open_unlocked(dir, &Unlock::none())
    }

    /// Like `open`, with what unlocks an encrypted repository. With a key given explicitly,
    /// no repository is created (`init` does) and an unencrypted one is refused.
    pub fn open_unlocked(dir: &Path, unlock: &Unlock) -> Result<Repository> {
        if unlock.explicit && !dir.join("config.json").exists() {
            return Err(CryptError::NoRepository(dir.to_path_buf()).into());
        }
        Repository::prepare_dir(dir)?;
        Repository::open_with_unlock(dir, Box::new(LocalDir::new(dir)), unlock)
    }

    /// Creates a new repository in `dir` (`vmbackup init`): a folder that does not exist or
    /// is empty. Refuses (`CryptError::Initialized`) a repository, and changes nothing.
    pub fn init(dir: &Path, o: &InitOptions) -> Result<()> {
        if dir.join("config.json").exists() {
            return Err(CryptError::Initialized(dir.to_path_buf()).into());
        }
        if let Some(k) = &o.key_file {
            if k.symlink_metadata().is_ok() {
                return Err(CryptError::KeyFile {
                    path: k.clone(),
                    why: "exists already; it is never overwritten".into(),
                }
                .into());
            }
        }
        Repository::prepare_dir(dir)?;
        Repository::init_with(dir, Box::new(LocalDir::new(dir)), o)
    }

    /// Creates a new repository in `store` (see `init`).
    pub fn init_with(dir: &Path, store: Box<dyn ObjectStore>, o: &InitOptions) -> Result<()> {
        let initialized = |e| match e {
            RepoError::Exists(_) => RepoError::from(CryptError::Initialized(dir.to_path_buf())),
            e => e,
        };
        if store.exists("config.json")? {
            return Err(CryptError::Initialized(dir.to_path_buf()).into());
        }
        if !o.encrypt {
            let cfg = serde_json::json!({"format": FORMAT, "chunk_digest": "sha256"});
            return store
                .put_new("config.json", cfg.to_string().as_bytes())
                .map_err(initialized);
        }
        if o.key_file.is_none() && o.passphrase.is_none() {
            return Err(CryptError::Passphrase(
                "none given, and no key file: the key would be lost".into(),
            )
            .into());
        }
        let master = crypt::MasterKey::generate()?;
        let mut id = [0u8; 16];
        crypt::random(&mut id)?;
        let enc = EncryptionConfig {
            version: 1,
            cipher: crypt::CIPHER.into(),
            repository: crypt::hex(&id),
            key_check: master.check_value(&crypt::hex(&id)),
        };
        let wrapped = match &o.passphrase {
            Some(p) => Some(crypt::wrap(&master, &p.0, &enc.repository)?),
            None => None,
        };
        if let Some(k) = &o.key_file {
            crypt::write_key_file(k, &enc.repository, &master)?;
        }
        let cfg = serde_json::json!({
            "format": FORMAT_ENCRYPTED,
            "chunk_digest": "hmac-sha256",
            "encryption": enc,
        });
        let mut wrote_wrapped = false;
        let written = (|| {
            if let Some(w) = &wrapped {
                let text = serde_json::to_vec_pretty(w)
                    .map_err(|e| CryptError::Internal(e.to_string()))?;
                store.put_new(crypt::PASSPHRASE_OBJECT, &text)?;
                wrote_wrapped = true;
            }
            // Last: the repository exists once its config does.
            store.put_new("config.json", cfg.to_string().as_bytes())
        })();
        if let Err(e) = written {
            if let Some(k) = &o.key_file {
                let _ = std::fs::remove_file(k);
            }
            if wrote_wrapped {
                let _ = store.delete(crypt::PASSPHRASE_OBJECT);
            }
            return Err(initialized(e));
        }
        Ok(())
    }

    /// Makes `dir` ready to hold a repository: creates it (0700) when it does not exist;
    /// refuses a folder that is neither empty nor a repository, and leaves it as it is.
    fn prepare_dir(dir: &Path) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| RepoError::Io {
                    what: "create repository",
                    path: dir.to_path_buf(),
                    source,
                })?;
        } else if !dir.join("config.json").exists() {
            let io = |source| RepoError::Io {
                what: "read repository",
                path: dir.to_path_buf(),
                source,
            };
            // A new file system's `lost+found` is no content, and neither is the config.json
            // (or its temporary) of another process creating this repository at the same
            // moment: it may appear between the check above and this listing.
            for e in std::fs::read_dir(dir).map_err(io)? {
                let name = e.map_err(io)?.file_name();
                if name != "lost+found"
                    && name != "config.json"
                    && !name.to_string_lossy().starts_with(".tmp-")
                {
                    return Err(RepoError::NotARepository(dir.to_path_buf()));
                }
            }
        }
        Ok(())
    }

    /// Opens the repository at `loc`: a folder (as `open`), or `s3://BUCKET/PREFIX` reached
    /// with `s3`, whose local files (its lock) are in a folder under `state_dir`. An unknown
    /// bucket, a wrong endpoint or refused credentials are `RepoError::Location`, with nothing
    /// written; so is a prefix that holds other objects but no repository.
    pub fn open_location(
        loc: &location::Location,
        s3: &location::S3Settings,
        state_dir: &Path,
        unlock: &Unlock,
    ) -> Result<Repository> {
        let (bucket, prefix) = match loc {
            location::Location::Local(dir) => return Repository::open_unlocked(dir, unlock),
            location::Location::S3 { bucket, prefix } => (bucket, prefix),
        };
        let store = s3::S3Store::open(bucket, prefix, s3)?;
        let shown = store.location().to_string();
        let has_config = store.exists("config.json")?;
        if !has_config && unlock.explicit {
            return Err(CryptError::NoRepository(shown.into()).into());
        }
        if !has_config && !store.list("")?.is_empty() {
            return Err(RepoError::NotARepository(shown.into()));
        }
        let local = Repository::s3_local_dir(state_dir, bucket, prefix)?;
        let mut repo =
            Repository::open_with_unlock(&local, Box::new(store), unlock).map_err(|e| match e {
                RepoError::Format { found, .. } => RepoError::Format {
                    path: shown.clone().into(),
                    found,
                },
                e => e,
            })?;
        repo.remote = Some(shown);
        Ok(repo)
    }

    /// Whether `loc` holds a repository (its config), without making one.
    pub fn is_repository_at(loc: &location::Location, s3: &location::S3Settings) -> Result<bool> {
        match loc {
            location::Location::Local(dir) => Ok(dir.join("config.json").is_file()),
            location::Location::S3 { bucket, prefix } => {
                s3::S3Store::open(bucket, prefix, s3)?.exists("config.json")
            }
        }
    }

    /// The local folder of a repository on S3 (under the state folder): what needs a local
    /// file.
    fn s3_local_dir(state_dir: &Path, bucket: &str, prefix: &str) -> Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        let mut local = state_dir.join("s3").join(bucket);
        if !prefix.is_empty() {
            local.push(prefix);
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&local)
            .map_err(|source| RepoError::Io {
                what: "create folder",
                path: local.clone(),
                source,
            })?;
        Ok(local)
    }

    /// Creates a new repository at `loc` (`vmbackup init`); see `init`.
    pub fn init_location(
        loc: &location::Location,
        s3: &location::S3Settings,
        o: &InitOptions,
    ) -> Result<()> {
        let (bucket, prefix) = match loc {
            location::Location::Local(dir) => return Repository::init(dir, o),
            location::Location::S3 { bucket, prefix } => (bucket, prefix),
        };
        let store = s3::S3Store::open(bucket, prefix, s3)?;
        let shown = PathBuf::from(store.location().to_string());
        if !store.exists("config.json")? && !store.list("")?.is_empty() {
            return Err(RepoError::NotARepository(shown));
        }
        if let Some(k) = &o.key_file {
            if k.symlink_metadata().is_ok() {
                return Err(CryptError::KeyFile {
                    path: k.clone(),
                    why: "exists already; it is never overwritten".into(),
                }
                .into());
            }
        }
        Repository::init_with(&shown, Box::new(store), o)
    }

    /// Opens the repository held by `store`, whose files (the lock) are in `dir`; creates
    /// its config when `store` has none. An encrypted one is refused (`KeyNeeded`).
    pub fn open_with(dir: &Path, store: Box<dyn ObjectStore>) -> Result<Repository> {
        Repository::open_with_unlock(dir, store, &Unlock::none())
    }

    /// Opens the repository held by `store`: reads its config; an encrypted one is unlocked
    /// with `unlock` (nothing is written before), its store wrapped to seal and open every
    /// object, and its chunks named with a key.
    pub fn open_with_unlock(
        dir: &Path,
        store: Box<dyn ObjectStore>,
        unlock: &Unlock,
    ) -> Result<Repository> {
        let plain = |store| Repository {
            path: dir.to_path_buf(),
            remote: None,
            store: Arc::from(store),
            namer: chunk::Namer::Sha256,
            checked: Mutex::new(HashSet::new()),
            known: Mutex::new(HashSet::new()),
        };
        let bytes = match store.get("config.json") {
            Ok(bytes) => bytes,
            Err(RepoError::NotFound(_)) if unlock.explicit => {
                return Err(CryptError::NoRepository(dir.to_path_buf()).into())
            }
            Err(RepoError::NotFound(_)) => {
                let cfg = serde_json::json!({"format": FORMAT, "chunk_digest": "sha256"});
                store.put("config.json", cfg.to_string().as_bytes())?;
                return Ok(plain(store));
            }
            Err(e) => return Err(e),
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let found = v["format"].as_u64().unwrap_or(0) as u32;
        match found {
            FORMAT if unlock.explicit => Err(CryptError::NotEncrypted(dir.to_path_buf()).into()),
            FORMAT => Ok(plain(store)),
            FORMAT_ENCRYPTED => {
                let enc: EncryptionConfig = serde_json::from_value(v["encryption"].clone())
                    .map_err(|e| CryptError::Config(e.to_string()))?;
                if enc.version != 1
                    || enc.cipher != crypt::CIPHER
                    || v["chunk_digest"] != "hmac-sha256"
                {
                    return Err(CryptError::Config(format!(
                        "unknown encryption (version {}, cipher {})",
                        enc.version, enc.cipher
                    ))
                    .into());
                }
                let master = unlock.master_key(dir, store.as_ref(), &enc)?;
                let keys = Arc::new(Keys::new(&master));
                Ok(Repository {
                    path: dir.to_path_buf(),
                    remote: None,
                    store: Arc::new(Sealed::new(store, keys.clone())),
                    namer: chunk::Namer::Keyed(keys),
                    checked: Mutex::new(HashSet::new()),
                    known: Mutex::new(HashSet::new()),
                })
            }
            _ => Err(RepoError::Format {
                path: dir.to_path_buf(),
                found,
            }),
        }
    }

    /// Whether the repository is encrypted.
    pub fn is_encrypted(&self) -> bool {
        matches!(self.namer, chunk::Namer::Keyed(_))
    }

    /// How this repository names chunks.
    pub fn namer(&self) -> &chunk::Namer {
        &self.namer
    }

    /// The name (digest) this repository gives a chunk of content `data`.
    pub fn chunk_digest(&self, data: &[u8]) -> chunk::Digest {
        self.namer.digest(data)
    }

    /// Drops the writes not yet synced (those of a backup that failed; a process runs one
    /// backup at a time) and forgets which chunks were checked: a chunk found damaged and
    /// written again may be damaged again.
    pub fn forget_unsynced(&self) {
        self.store.forget_unsynced();
        if let Ok(mut c) = self.checked.lock() {
            c.clear();
        }
        self.forget_known();
    }

    /// Empties the set of chunks known to be in the store.
    pub(crate) fn forget_known(&self) {
        if let Ok(mut c) = self.known.lock() {
            c.clear();
        }
    }

    /// Seeds the known chunks (`seed_known`) from the index of disk `target` in the newest of
    /// `previous` (published backups of one VM, newest first) that has it; returns how many
    /// chunks that index refers to (0: none found or readable, nothing seeded).
    pub fn seed_known_from(&self, previous: &[Manifest], target: &str) -> usize {
        let Some((m, d)) = previous
            .iter()
            .find_map(|m| m.disks.iter().find(|d| d.target == target).map(|d| (m, d)))
        else {
            return 0;
        };
        match self.get_index(&m.id, d) {
            Ok(index) => {
                self.seed_known(&index);
                index.chunks.iter().flatten().count()
            }
            Err(e) => {
                tracing::info!(backup = %m.id, disk = target, error = %error_chain(&e), "the previous index is not read: every chunk is looked up");
                0
            }
        }
    }

    /// Trusts every chunk `index` refers to as present, without asking the store, until the
    /// next backup lock is taken. Only for the index of a published backup, read while this
    /// process holds its backup lock (`lock_for_backup`): gc cannot remove those chunks then.
    /// A damaged chunk among them is not found (and not written again) by this backup.
    pub fn seed_known(&self, index: &disk::DiskIndex) {
        if let Ok(mut k) = self.known.lock() {
            k.extend(index.chunks.iter().flatten().copied());
        }
    }

    /// The chunks of this repository, each existing one checked once by this process before
    /// a backup reuses it, unless it is known to be there (`seed_known`).
    pub fn chunks(&self) -> chunk::ChunkStore<'_> {
        chunk::ChunkStore::with_known(self.store(), &self.namer, &self.checked, &self.known)
    }

    /// The repository's folder; for one on an object store, the local folder of its local
    /// files (see `remote`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `s3://bucket/prefix/` for a repository on an object store, `None` for a folder.
    pub fn remote(&self) -> Option<&str> {
        self.remote.as_deref()
    }

    /// Where the repository is, for people: its folder or its `s3://` location.
    pub fn location(&self) -> String {
        match &self.remote {
            Some(r) => r.clone(),
            None => self.path.display().to_string(),
        }
    }

    pub fn store(&self) -> &dyn ObjectStore {
        self.store.as_ref()
    }

    /// The store, for what outlives a borrow (the lock's refresh thread).
    pub fn shared_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Stores the verbatim inactive domain XML of backup `id`; returns its object name.
    /// Never replaces one (`RepoError::Exists`).
    pub fn put_domain_xml(&self, id: &str, xml: &str) -> Result<String> {
        let name = format!("backups/{id}/domain.xml");
        self.store.put_new(&name, xml.as_bytes())?;
        Ok(name)
    }

    pub fn get_domain_xml(&self, id: &str) -> Result<String> {
        let m = self.load(id)?;
        let b = self.store.get(&m.domain_xml_object).map_err(|e| match e {
            RepoError::NotFound(o) => RepoError::Damaged {
                id: id.to_string(),
                problems: vec![format!("its domain XML {o} is missing")],
            },
            e => e,
        })?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Stores the index of disk `target` of backup `id`; returns its object name. Never
    /// replaces one (`RepoError::Exists`): a second backup with the same id (an id
    /// collision) fails here, before it could change the first.
    pub fn put_index(&self, id: &str, target: &str, index: &disk::DiskIndex) -> Result<String> {
        let name = format!("backups/{id}/{target}.index");
        self.store.put_new(&name, &index.encode())?;
        Ok(name)
    }

    /// The index of disk entry `d` of backup `id`; a missing or damaged one is
    /// `RepoError::Damaged`.
    pub fn get_index(&self, id: &str, d: &manifest::DiskEntry) -> Result<disk::DiskIndex> {
        let damaged = |why: String| RepoError::Damaged {
            id: id.to_string(),
            problems: vec![format!("disk {}: index {} {why}", d.target, d.index_object)],
        };
        match self.store.get(&d.index_object) {
            Ok(b) => disk::DiskIndex::decode(&b).map_err(|e| damaged(format!("is damaged ({e})"))),
            Err(RepoError::NotFound(_)) => Err(damaged("is missing".into())),
            Err(RepoError::Tampered { .. }) => Err(damaged(
                "fails authentication: it was changed or damaged".into(),
            )),
            Err(e) => Err(e),
        }
    }

    /// Stores `bytes`, a file of the VM's state (NVRAM, TPM), as object `file` of backup `id`
    /// (one component, e.g. `nvram`); returns the object's name. Never replaces one.
    pub fn put_state_file(&self, id: &str, file: &str, bytes: &[u8]) -> Result<String> {
        let name = format!("backups/{id}/{file}");
        self.store.put_new(&name, bytes)?;
        Ok(name)
    }

    /// The content of state file `f` of backup `id`, checked against its size and digest; a
    /// missing or damaged one is `RepoError::Damaged`.
    pub fn get_state_file(&self, id: &str, f: &manifest::StateFile) -> Result<Vec<u8>> {
        let damaged = |why: &str| RepoError::Damaged {
            id: id.to_string(),
            problems: vec![format!("{} (object {}) {why}", f.path, f.object)],
        };
        let bytes = match self.store.get(&f.object) {
            Ok(b) => b,
            Err(RepoError::NotFound(_)) => return Err(damaged("is missing")),
            Err(RepoError::Tampered { .. }) => {
                return Err(damaged("fails authentication: it was changed or damaged"))
            }
            Err(e) => return Err(e),
        };
        if bytes.len() as u64 != f.size || digest::sha256_hex(&bytes) != f.sha256 {
            return Err(damaged("does not match its recorded size and SHA-256"));
        }
        Ok(bytes)
    }

    /// Records `t`, the result of a boot test of backup `id`, as `backups/<id>/boot-test.json`
    /// (replacing the previous one: it is the last boot test). The manifest is not touched; a
    /// backup that does not exist is `RepoError::NotFound`.
    pub fn put_boot_test(&self, id: &str, t: &BootTestRecord) -> Result<()> {
        storage::check_name(id)?;
        if !self.store.exists(&manifest_name(id))? {
            return Err(RepoError::NotFound(id.to_string()));
        }
        let bytes = serde_json::to_vec_pretty(t).map_err(|e| RepoError::BadManifest {
            id: id.to_string(),
            source: e.into(),
        })?;
        self.store.put(&boot_test_name(id), &bytes)
    }

    /// The last boot test of backup `id`, `None` when it has none (or its record does not
    /// read: logged).
    pub fn boot_test(&self, id: &str) -> Result<Option<BootTestRecord>> {
        match self.store.get(&boot_test_name(id)) {
            Ok(b) => Ok(serde_json::from_slice(&b)
                .map_err(|e| tracing::warn!(backup = id, "boot-test.json does not read: {e}"))
                .ok()),
            Err(RepoError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The state files (NVRAM, TPM) backup `m` recorded.
    pub fn state_files(m: &Manifest) -> Vec<&manifest::StateFile> {
        let Some(s) = &m.vm_state else {
            return Vec::new();
        };
        s.nvram
            .iter()
            .chain(s.tpm.iter().flat_map(|t| t.files.iter()))
            .collect()
    }

    /// What backup `m` needs besides its chunks and is missing or damaged: its domain XML,
    /// its disk indexes, its state files (present only: their digests are checked by
    /// `verify` and when restored). Cheap (no chunk is read).
    pub fn problems(&self, m: &Manifest) -> Result<Vec<String>> {
        let mut out = Vec::new();
        if m.domain_xml_object.is_empty() || !self.store.exists(&m.domain_xml_object)? {
            out.push(format!("its domain XML {} is missing", m.domain_xml_object));
        }
        for f in Repository::state_files(m) {
            if !self.store.exists(&f.object)? {
                out.push(format!("{} (object {}) is missing", f.path, f.object));
            }
        }
        for d in &m.disks {
            match self.get_index(&m.id, d) {
                Ok(_) => {}
                Err(RepoError::Damaged { problems, .. }) => out.extend(problems),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Refuses (`RepoError::Damaged`) a backup whose domain XML or an index is missing or
    /// damaged: what a restore checks before it changes anything.
    pub fn check_complete(&self, m: &Manifest) -> Result<()> {
        let problems = self.problems(m)?;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(RepoError::Damaged {
                id: m.id.clone(),
                problems,
            })
        }
    }

    /// Makes backup `m` visible: its manifest is written last, after all its data. Never
    /// replaces a published manifest (`RepoError::Exists`).
    pub fn publish(&self, m: &Manifest) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(m).map_err(|source| RepoError::BadManifest {
            id: m.id.clone(),
            source: source.into(),
        })?;
        crate::failpoint::point("backup-before-manifest-rename");
        self.store.put_new(&manifest_name(&m.id), &bytes)
    }

    pub fn load(&self, id: &str) -> Result<Manifest> {
        storage::check_name(id)?;
        let bytes = self.store.get(&manifest_name(id)).map_err(|e| match e {
            RepoError::NotFound(_) => RepoError::NotFound(id.to_string()),
            e @ RepoError::Tampered { .. } => RepoError::BadManifest {
                id: id.to_string(),
                source: e.into(),
            },
            e => e,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| RepoError::BadManifest {
            id: id.to_string(),
            source: source.into(),
        })
    }

    /// The published backups whose manifest reads, oldest first. Those whose manifest
    /// does not are left out (and logged); `scan` names them.
    pub fn list(&self) -> Result<Vec<Manifest>> {
        Ok(self.scan()?.backups)
    }

    /// The published backups, oldest first, and those whose manifest cannot be read.
    pub fn scan(&self) -> Result<Listing> {
        let mut out = Listing::default();
        let names = self.store.list("backups/")?;
        crate::failpoint::point("list-listed");
        for name in names {
            if let Some(id) = name
                .strip_prefix("backups/")
                .and_then(|r| r.strip_suffix("/manifest.json"))
            {
                match self.load(id) {
                    Ok(m) => out.backups.push(m),
                    // Deleted (by a delete or a prune of another process) since the listing.
                    Err(RepoError::NotFound(_)) => {}
                    Err(e @ RepoError::BadManifest { .. }) => {
                        let why = error_chain(&e);
                        tracing::warn!(backup = id, "{why}");
                        out.unreadable.push((id.to_string(), why));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        out.backups
            .sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Deletes the objects of backup `id`, which failed before it was published. Never touches
    /// a published backup, nor any other backup.
    pub fn discard_unpublished(&self, id: &str) -> Result<()> {
        storage::check_name(id)?;
        if self.store.exists(&manifest_name(id))? {
            return Ok(());
        }
        for name in self.store.list(&format!("backups/{id}/"))? {
            self.store.delete(&name)?;
        }
        Ok(())
    }

    /// Deletes the objects of backups that were never published, except those named in
    /// `in_progress`.
    pub fn remove_incomplete(&self, in_progress: &[&str]) -> Result<usize> {
        let names = self.store.list("backups/")?;
        let listed: HashSet<&str> = names.iter().map(String::as_str).collect();
        let leftovers: Vec<String> = names
            .iter()
            .filter(|name| {
                name.strip_prefix("backups/")
                    .and_then(|r| r.split('/').next())
                    .is_some_and(|id| {
                        !in_progress.contains(&id) && !listed.contains(manifest_name(id).as_str())
                    })
            })
            .cloned()
            .collect();
        self.store.delete_many(&leftovers)?;
        let mut removed = leftovers.len();
        removed += self.store.remove_temporaries()?;
        // A folder whose objects were all temporaries (or never written) is left empty.
        if let Ok(dirs) = std::fs::read_dir(self.path.join("backups")) {
            for d in dirs.flatten() {
                let id = d.file_name().to_string_lossy().into_owned();
                if !in_progress.contains(&id.as_str()) && d.file_type().is_ok_and(|t| t.is_dir()) {
                    // Fails, as it should, while the folder holds anything.
                    let _ = std::fs::remove_dir(d.path());
                }
            }
        }
        if removed > 0 {
            tracing::info!(objects = removed, "removed what unfinished backups left");
        }
        Ok(removed)
    }
}

/// An error and its causes, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_creating_one_new_repository_at_once_all_succeed() {
        for round in 0..20 {
            let d = tempfile::tempdir().unwrap();
            let dir = d.path().join(format!("repo-{round}"));
            std::thread::scope(|s| {
                let opened: Vec<_> = (0..6)
                    .map(|_| s.spawn(|| Repository::open(&dir).map(|_| ())))
                    .collect();
                for o in opened {
                    let r = o.join().unwrap();
                    assert!(r.is_ok(), "round {round}: {r:?}");
                }
            });
        }
    }

    fn manifest(id: &str, started: &str) -> Manifest {
        Manifest {
            format_version: 1,
            id: id.into(),
            vm_name: "vm".into(),
            vm_uuid: "u".into(),
            started_at: started.into(),
            ended_at: started.into(),
            consistency: "application".into(),
            consistency_reason: None,
            freeze_ms: Some(12),
            vcpus: 1,
            memory_bytes: 1,
            disks: vec![],
            nics: vec![],
            domain_xml_object: format!("backups/{id}/domain.xml"),
            schedule: None,
            scheduled_for: None,
            tags: Vec::new(),
            stored_bytes: 0,
            logical_bytes: 0,
            vm_state: None,
        }
    }

    #[test]
    fn the_last_boot_test_is_kept_beside_the_unchanged_manifest_and_goes_with_the_backup() {
        let d = tempfile::tempdir().unwrap();
        let r = Repository::open(d.path()).unwrap();
        r.put_domain_xml("b1", "<domain/>").unwrap();
        r.publish(&manifest("b1", "2026-01-01T00:00:00Z")).unwrap();
        let before = r.store().get("backups/b1/manifest.json").unwrap();
        assert_eq!(r.boot_test("b1").unwrap(), None);
        let mut t = BootTestRecord {
            at: "2026-01-02T00:00:00Z".into(),
            booted: true,
            seconds_to_agent: Some(3.5),
            command: Some("true".into()),
            command_exit_code: Some(0),
            error: None,
        };
        r.put_boot_test("b1", &t).unwrap();
        t.booted = false;
        t.error = Some("no answer".into());
        r.put_boot_test("b1", &t).unwrap();
        assert_eq!(r.boot_test("b1").unwrap(), Some(t.clone()), "the last one");
        assert_eq!(r.store().get("backups/b1/manifest.json").unwrap(), before);
        assert!(matches!(
            r.put_boot_test("nosuch", &t),
            Err(RepoError::NotFound(_))
        ));
        assert!(!r.store().exists("backups/nosuch/boot-test.json").unwrap());
        r.delete("b1").unwrap();
        assert!(r.store().list("backups/b1/").unwrap().is_empty());
    }

    #[test]
    fn only_published_backups_are_listed_and_leftovers_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let r = Repository::open(d.path()).unwrap();
        r.put_domain_xml("b2", "<domain/>").unwrap();
        r.publish(&manifest("b2", "2026-01-02T00:00:00Z")).unwrap();
        r.publish(&manifest("b1", "2026-01-01T00:00:00Z")).unwrap();
        r.put_domain_xml("half", "<domain/>").unwrap();
        r.put_domain_xml("running", "<domain/>").unwrap();
        let ids: Vec<String> = r.list().unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(ids, ["b1", "b2"]);
        r.put_domain_xml("failed", "<domain/>").unwrap();
        r.discard_unpublished("failed").unwrap();
        r.discard_unpublished("b2").unwrap();
        assert!(!r.store().exists("backups/failed/domain.xml").unwrap());
        assert!(
            r.store().exists("backups/b2/domain.xml").unwrap(),
            "published: kept"
        );
        assert!(
            r.store().exists("backups/half/domain.xml").unwrap(),
            "another: kept"
        );
        assert_eq!(r.remove_incomplete(&["running"]).unwrap(), 1);
        assert!(!r.store().exists("backups/half/domain.xml").unwrap());
        assert!(r.store().exists("backups/running/domain.xml").unwrap());
        assert_eq!(r.get_domain_xml("b2").unwrap(), "<domain/>");
        assert!(matches!(r.load("nope"), Err(RepoError::NotFound(_))));
        assert!(r.load("../x").is_err());
        // Reopening an existing repository works; a foreign format is refused.
        Repository::open(d.path()).unwrap();
        std::fs::write(d.path().join("config.json"), "{\"format\": 9}").unwrap();
        assert!(matches!(
            Repository::open(d.path()),
            Err(RepoError::Format { .. })
        ));
    }
}
