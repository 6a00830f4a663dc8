//! The backup repository: content-addressed chunks shared by all backups and VMs, one index
//! per backed-up disk, one manifest per backup, written last. See FORMAT.md beside this file.

pub mod chunk;
pub mod digest;
pub mod disk;
pub mod maintain;
pub mod manifest;
pub mod qcow2;
pub mod source;
pub mod storage;

use std::path::{Path, PathBuf};

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
    #[error("manifest {id}")]
    BadManifest {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} is a repository of format {found}, this program reads format {}", path.display(), FORMAT)]
    Format { path: PathBuf, found: u32 },
    #[error("source disk")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T, E = RepoError> = std::result::Result<T, E>;

/// The repository format this program writes.
pub const FORMAT: u32 = 1;

pub struct Repository {
    path: PathBuf,
    store: Box<dyn ObjectStore>,
}

pub(crate) fn manifest_name(id: &str) -> String {
    format!("backups/{id}/manifest.json")
}

impl Repository {
    /// Opens the repository in `dir`, creating it (mode 0700) on first use.
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
        }
        let repo = Repository {
            path: dir.to_path_buf(),
            store: Box::new(LocalDir::new(dir)),
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

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn store(&self) -> &dyn ObjectStore {
        self.store.as_ref()
    }

    /// Stores the verbatim inactive domain XML of backup `id`; returns its object name.
    pub fn put_domain_xml(&self, id: &str, xml: &str) -> Result<String> {
        let name = format!("backups/{id}/domain.xml");
        self.store.put(&name, xml.as_bytes())?;
        Ok(name)
    }

    pub fn get_domain_xml(&self, id: &str) -> Result<String> {
        let m = self.load(id)?;
        let b = self.store.get(&m.domain_xml_object)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Stores the index of disk `target` of backup `id`; returns its object name.
    pub fn put_index(&self, id: &str, target: &str, index: &disk::DiskIndex) -> Result<String> {
        let name = format!("backups/{id}/{target}.index");
        self.store.put(&name, &index.encode())?;
        Ok(name)
    }

    /// Makes backup `m` visible: its manifest is written last, after all its data.
    pub fn publish(&self, m: &Manifest) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(m).map_err(|source| RepoError::BadManifest {
            id: m.id.clone(),
            source,
        })?;
        self.store.put(&manifest_name(&m.id), &bytes)
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

    /// The published backups, oldest first.
    pub fn list(&self) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        for name in self.store.list("backups/")? {
            if let Some(id) = name
                .strip_prefix("backups/")
                .and_then(|r| r.strip_suffix("/manifest.json"))
            {
                match self.load(id) {
                    Ok(m) => out.push(m),
                    // Deleted (by a delete or a prune of another process) since the listing.
                    Err(RepoError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        out.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
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
        if removed > 0 {
            tracing::info!(objects = removed, "removed what unfinished backups left");
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
