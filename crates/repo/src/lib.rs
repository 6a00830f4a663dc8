//! The backup repository: content-addressed chunks shared by all backups and VMs, one index
//! per backed-up disk, one manifest per backup, written last. See FORMAT.md beside this file.

pub mod chunk;
pub mod digest;
pub mod disk;
pub mod failpoint;
#[cfg(any(test, feature = "fault-injection"))]
pub mod faults;
pub mod location;
pub mod maintain;
pub mod manifest;
pub mod qcow2;
pub mod s3;
pub mod source;
pub mod storage;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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
        source: serde_json::Error,
    },
    #[error("{} is a repository of format {found}, this program reads format {}", path.display(), FORMAT)]
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

/// The repository format this program writes.
pub const FORMAT: u32 = 1;

pub struct Repository {
    /// The repository's folder; for a remote one, a local folder for its local files.
    path: PathBuf,
    /// `s3://bucket/prefix/` for a repository on an object store.
    remote: Option<String>,
    store: Box<dyn ObjectStore>,
    /// Chunks found intact (or written) by this process: reused without another check.
    checked: Mutex<HashSet<chunk::Digest>>,
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
        Repository::open_with(dir, Box::new(LocalDir::new(dir)))
    }

    /// Opens the repository at `loc`: a folder (as `open`), or `s3://BUCKET/PREFIX` reached
    /// with `s3`, whose local files (its lock) are in a folder under `state_dir`. An unknown
    /// bucket, a wrong endpoint or refused credentials are `RepoError::Location`, with nothing
    /// written; so is a prefix that holds other objects but no repository.
    pub fn open_location(
        loc: &location::Location,
        s3: &location::S3Settings,
        state_dir: &Path,
    ) -> Result<Repository> {
        let (bucket, prefix) = match loc {
            location::Location::Local(dir) => return Repository::open(dir),
            location::Location::S3 { bucket, prefix } => (bucket, prefix),
        };
        let store = s3::S3Store::open(bucket, prefix, s3)?;
        let shown = store.location().to_string();
        if !store.exists("config.json")? && !store.list("")?.is_empty() {
            return Err(RepoError::NotARepository(shown.into()));
        }
        let mut local = state_dir.join("s3").join(bucket);
        if !prefix.is_empty() {
            local.push(prefix);
        }
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&local)
                .map_err(|source| RepoError::Io {
                    what: "create folder",
                    path: local.clone(),
                    source,
                })?;
        }
        let mut repo = Repository::open_with(&local, Box::new(store)).map_err(|e| match e {
            RepoError::Format { found, .. } => RepoError::Format {
                path: shown.clone().into(),
                found,
            },
            e => e,
        })?;
        repo.remote = Some(shown);
        Ok(repo)
    }

    /// Opens the repository held by `store`, whose files (the lock) are in `dir`; creates
    /// its config when `store` has none.
    pub fn open_with(dir: &Path, store: Box<dyn ObjectStore>) -> Result<Repository> {
        let repo = Repository {
            path: dir.to_path_buf(),
            remote: None,
            store,
            checked: Mutex::new(HashSet::new()),
        };
        match repo.store.get("config.json") {
            Ok(bytes) => {
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                let found = v["format"].as_u64().unwrap_or(0) as u32;
                if found != FORMAT {
                    return Err(RepoError::Format {
                        path: dir.to_path_buf(),
                        found,
                    });
                }
            }
            Err(RepoError::NotFound(_)) => {
                let cfg = serde_json::json!({"format": FORMAT, "chunk_digest": "sha256"});
                repo.store.put("config.json", cfg.to_string().as_bytes())?;
            }
            Err(e) => return Err(e),
        }
        Ok(repo)
    }

    /// Drops the writes not yet synced (those of a backup that failed; a process runs one
    /// backup at a time) and forgets which chunks were checked: a chunk found damaged and
    /// written again may be damaged again.
    pub fn forget_unsynced(&self) {
        self.store.forget_unsynced();
        if let Ok(mut c) = self.checked.lock() {
            c.clear();
        }
    }

    /// The chunks of this repository, each existing one checked once by this process before
    /// a backup reuses it.
    pub fn chunks(&self) -> chunk::ChunkStore<'_> {
        chunk::ChunkStore::checked_once(self.store(), &self.checked)
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
            Err(e) => return Err(e),
        };
        if bytes.len() as u64 != f.size || digest::sha256_hex(&bytes) != f.sha256 {
            return Err(damaged("does not match its recorded size and SHA-256"));
        }
        Ok(bytes)
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
            source,
        })?;
        crate::failpoint::point("backup-before-manifest-rename");
        self.store.put_new(&manifest_name(&m.id), &bytes)
    }

    pub fn load(&self, id: &str) -> Result<Manifest> {
        storage::check_name(id)?;
        let bytes = self.store.get(&manifest_name(id)).map_err(|e| match e {
            RepoError::NotFound(_) => RepoError::NotFound(id.to_string()),
            e => e,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| RepoError::BadManifest {
            id: id.to_string(),
            source,
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
        let mut removed = 0;
        for name in &names {
            let Some(id) = name
                .strip_prefix("backups/")
                .and_then(|r| r.split('/').next())
            else {
                continue;
            };
            if in_progress.contains(&id) || names.contains(&manifest_name(id)) {
                continue;
            }
            self.store.delete(name)?;
            removed += 1;
        }
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
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
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
            stored_bytes: 0,
            logical_bytes: 0,
            vm_state: None,
        }
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
