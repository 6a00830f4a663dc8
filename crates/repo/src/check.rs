//! `verify --metadata`: what can be checked of backups without reading their chunks. Every
//! manifest reads, every object it names (domain XML, NVRAM and TPM state, disk indexes) is
//! there and intact, and every chunk an index names exists. The chunks are looked up in one
//! listing of `chunks/` for the whole run (one request per 1,000 chunks on S3), not one by
//! one: the cost grows with the repository's chunk count once, and with its backups.

use std::collections::HashSet;

use super::chunk::{self, Digest};
use super::maintain::Verified;
use super::{error_chain, manifest_name, RepoError, Repository, Result};

impl Repository {
    /// The chunks the store holds, by digest.
    pub fn stored_chunks(&self) -> Result<HashSet<Digest>> {
        Ok(self
            .store()
            .list("chunks/")?
            .iter()
            .filter_map(|n| chunk::digest_of_object(n))
            .collect())
    }

    /// Checks backups `ids` (every published one, readable or not, when empty) without
    /// reading chunks; see the module's comment. A backup deleted meanwhile is left out when
    /// all are checked, and `RepoError::NotFound` when named.
    pub fn verify_metadata(&self, ids: &[String]) -> Result<Vec<Verified>> {
        let all = ids.is_empty();
        let ids: Vec<String> = if all {
            self.store()
                .list("backups/")?
                .iter()
                .filter_map(|n| {
                    n.strip_prefix("backups/")
                        .and_then(|r| r.strip_suffix("/manifest.json"))
                        .map(str::to_string)
                })
                .collect()
        } else {
            ids.to_vec()
        };
        let stored = self.stored_chunks()?;
        let mut out = Vec::with_capacity(ids.len());
        for id in &ids {
            match self.verify_metadata_of(id, &stored) {
                Err(RepoError::NotFound(_)) if all => continue,
                r => out.push(r?),
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn verify_metadata_of(&self, id: &str, stored: &HashSet<Digest>) -> Result<Verified> {
        let damaged_only = |why: String| Verified {
            id: id.to_string(),
            vm: String::new(),
            ok: false,
            chunks: 0,
            damaged: vec![why],
        };
        let m = match self.load(id) {
            Ok(m) => m,
            Err(e @ RepoError::BadManifest { .. }) => return Ok(damaged_only(error_chain(&e))),
            Err(e) => return Err(e),
        };
        let mut damaged = Vec::new();
        if m.domain_xml_object.is_empty() || !self.store().exists(&m.domain_xml_object)? {
            damaged.push(format!("domain XML {} is missing", m.domain_xml_object));
        }
        for f in Repository::state_files(&m) {
            if !self.store().exists(&f.object)? {
                damaged.push(format!("{} (object {}) is missing", f.path, f.object));
            }
        }
        let mut chunks = 0;
        for d in &m.disks {
            let index = match self.get_index(&m.id, d) {
                Ok(i) => i,
                Err(RepoError::Damaged { problems, .. }) => {
                    damaged.extend(problems);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (mut missing, mut first) = (HashSet::new(), None);
            for digest in index.chunks.iter().flatten() {
                chunks += 1;
                if !stored.contains(digest) && missing.insert(digest) {
                    first.get_or_insert(digest);
                }
            }
            if let Some(first) = first {
                damaged.push(format!(
                    "{}: {} chunk(s) missing, the first {}",
                    d.target,
                    missing.len(),
                    chunk::hex(first)
                ));
            }
        }
        if !damaged.is_empty() && !self.store().exists(&manifest_name(id))? {
            return Err(RepoError::NotFound(id.to_string()));
        }
        Ok(Verified {
            id: m.id,
            vm: m.vm_name,
            ok: damaged.is_empty(),
            chunks,
            damaged,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::memory::MemorySource;

    fn back_up(repo: &Repository, id: &str, pattern: u8) {
        let mut data = vec![0u8; 4 << 20];
        data[..2 << 20].fill(pattern);
        let src = MemorySource {
            data,
            zero: std::iter::once(2 << 20..4 << 20).collect(),
        };
        let started = "2026-01-01T00:00:00Z";
        crate::teststores::publish_backup(repo, id, "vm", started, &src, 1 << 20);
    }

    #[test]
    fn metadata_verify_finds_missing_chunks_and_objects_without_reading_chunks() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::open(&d.path().join("repo")).unwrap();
        back_up(&repo, "a", 1);
        back_up(&repo, "b", 2);
        let all = repo.verify_metadata(&[]).unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|v| v.ok && v.chunks == 2), "{all:?}");

        // A damaged chunk is not seen (that takes reading it); a missing one is.
        let index = repo
            .get_index("b", &repo.load("b").unwrap().disks[0])
            .unwrap();
        let gone = index.chunks.iter().flatten().next().copied().unwrap();
        repo.store().delete(&chunk::object_name(&gone)).unwrap();
        repo.store().delete("backups/a/domain.xml").unwrap();
        let v = repo.verify_metadata(&[]).unwrap();
        assert!(!v[0].ok && v[0].damaged[0].contains("domain XML"), "{v:?}");
        assert!(!v[1].ok, "{v:?}");
        assert!(
            v[1].damaged[0].contains(&chunk::hex(&gone)) && v[1].damaged[0].contains("1 chunk"),
            "{v:?}"
        );
        // A garbled manifest is reported, a named backup that is not there is NotFound.
        repo.store().put("backups/a/manifest.json", b"{").unwrap();
        let v = repo.verify_metadata(&[]).unwrap();
        assert!(!v[0].ok && v[0].id == "a", "{v:?}");
        assert!(matches!(
            repo.verify_metadata(&["nope".into()]),
            Err(RepoError::NotFound(_))
        ));
    }

    #[test]
    fn chunk_object_names_give_back_their_digest_and_nothing_else_does() {
        let d = chunk::digest(b"some data");
        assert_eq!(chunk::digest_of_object(&chunk::object_name(&d)), Some(d));
        let name = chunk::object_name(&d);
        assert_eq!(
            chunk::digest_of_object(&name.replace("chunks/", "backups/")),
            None
        );
        assert_eq!(chunk::digest_of_object(&format!("{name}.tmp")), None);
        // The folder must be the name's first four digits.
        let wrong = format!("chunks/0000/{}", &name[12..]);
        assert_eq!(chunk::digest_of_object(&wrong), None);
        assert_eq!(chunk::digest_of_object("chunks/abcd/xyz"), None);
    }
}
