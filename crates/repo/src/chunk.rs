//! Content-addressed chunks: named by the SHA-256 of their content, stored once, compressed
//! with zstd only where that pays, verified on every read.

use std::collections::HashSet;
use std::sync::Mutex;

use sha2::{Digest as _, Sha256};

use super::storage::ObjectStore;
use super::{RepoError, Result};

pub type Digest = [u8; 32];

const MAGIC: &[u8; 4] = b"VMBC";
const VERSION: u8 = 1;
const HEADER: usize = 12;
const FLAG_RAW: u8 = 0;
const FLAG_ZSTD: u8 = 1;
/// Compress only when a sample shrinks below this share of its size.
const WORTH: f64 = 0.90;
const SAMPLE: usize = 64 << 10;

/// The plain chunk name: SHA-256 of the content (unencrypted repositories).
pub fn digest(data: &[u8]) -> Digest {
    Sha256::digest(data).into()
}

/// How a repository names its chunks: plain SHA-256, or keyed (an encrypted repository,
/// whose store never sees content hashes).
pub enum Namer {
    Sha256,
    Keyed(std::sync::Arc<crate::crypt::Keys>),
}

impl Namer {
    pub fn digest(&self, data: &[u8]) -> Digest {
        match self {
            Namer::Sha256 => digest(data),
            Namer::Keyed(k) => k.chunk_digest(data),
        }
    }
}

pub fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn object_name(d: &Digest) -> String {
    let h = hex(d);
    format!("chunks/{}/{}", &h[..4], h)
}

/// The digest a chunk object's name stands for (`chunks/abcd/abcd...`), if it is one.
pub fn digest_of_object(name: &str) -> Option<Digest> {
    let hex = name.strip_prefix("chunks/")?.split('/').nth(1)?;
    if hex.len() != 64 {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, byte) in d.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    (object_name(&d) == name).then_some(d)
}

/// What `ChunkStore::put` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    pub digest: Digest,
    /// Bytes written to storage (0 when the chunk was already there).
    pub stored_bytes: u64,
    pub new: bool,
    /// A chunk of that name existed but was damaged (or unreadable): it was written again.
    pub repaired: bool,
}

/// Encodes a chunk file: header, then the raw or zstd-compressed payload.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let sample = &data[..data.len().min(SAMPLE)];
    let compress = match zstd::bulk::compress(sample, 1) {
        Ok(c) => (c.len() as f64) < sample.len() as f64 * WORTH,
        Err(_) => false,
    };
    let (flag, payload) = if compress {
        match zstd::bulk::compress(data, 1) {
            Ok(c) if c.len() < data.len() => (FLAG_ZSTD, c),
            _ => (FLAG_RAW, data.to_vec()),
        }
    } else {
        (FLAG_RAW, data.to_vec())
    };
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(flag);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a chunk file and checks it against its digest (made by `namer`).
pub fn decode(bytes: &[u8], expect: &Digest, namer: &Namer) -> Result<Vec<u8>> {
    let corrupt = || RepoError::Corrupt {
        digest: hex(expect),
    };
    if bytes.len() < HEADER || &bytes[..4] != MAGIC || bytes[4] != VERSION {
        return Err(corrupt());
    }
    let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    let data = match bytes[5] {
        FLAG_RAW => bytes[HEADER..].to_vec(),
        FLAG_ZSTD => zstd::bulk::decompress(&bytes[HEADER..], len).map_err(|_| corrupt())?,
        _ => return Err(corrupt()),
    };
    if data.len() != len || namer.digest(&data) != *expect {
        return Err(corrupt());
    }
    Ok(data)
}

/// Whether the chunk file `bytes` holds exactly `data`. As sound as `decode` against the
/// digest (the digest of `data` is the chunk's name), without hashing again.
pub fn holds(bytes: &[u8], data: &[u8]) -> bool {
    if bytes.len() < HEADER || &bytes[..4] != MAGIC || bytes[4] != VERSION {
        return false;
    }
    let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    if len != data.len() {
        return false;
    }
    match bytes[5] {
        FLAG_RAW => &bytes[HEADER..] == data,
        FLAG_ZSTD => zstd::bulk::decompress(&bytes[HEADER..], len).is_ok_and(|d| d == data),
        _ => false,
    }
}

pub struct ChunkStore<'a> {
    store: &'a dyn ObjectStore,
    namer: &'a Namer,
    /// The chunks already found intact or written; `None`: every reuse is checked.
    checked: Option<&'a Mutex<HashSet<Digest>>>,
    /// The chunks known to be in the store (see `Repository::seed_known`): reused without
    /// asking the store at all.
    known: Option<&'a Mutex<HashSet<Digest>>>,
}

impl<'a> ChunkStore<'a> {
    /// A chunk store that checks an existing chunk every time it is reused.
    pub fn new(store: &'a dyn ObjectStore, namer: &'a Namer) -> Self {
        ChunkStore {
            store,
            namer,
            checked: None,
            known: None,
        }
    }

    /// A chunk store that checks an existing chunk the first time it is reused, and
    /// remembers in `checked` the chunks it found intact or wrote.
    pub fn checked_once(
        store: &'a dyn ObjectStore,
        namer: &'a Namer,
        checked: &'a Mutex<HashSet<Digest>>,
    ) -> Self {
        ChunkStore {
            store,
            namer,
            checked: Some(checked),
            known: None,
        }
    }

    /// Like `checked_once`, and trusts the chunks in `known` without a store request; adds
    /// to it every chunk it found intact or wrote.
    pub fn with_known(
        store: &'a dyn ObjectStore,
        namer: &'a Namer,
        checked: &'a Mutex<HashSet<Digest>>,
        known: &'a Mutex<HashSet<Digest>>,
    ) -> Self {
        ChunkStore {
            store,
            namer,
            checked: Some(checked),
            known: Some(known),
        }
    }

    fn is_checked(&self, d: &Digest) -> bool {
        self.checked
            .is_some_and(|c| c.lock().map(|c| c.contains(d)).unwrap_or(false))
    }

    fn is_known(&self, d: &Digest) -> bool {
        self.known
            .is_some_and(|c| c.lock().map(|c| c.contains(d)).unwrap_or(false))
    }

    fn remember(&self, d: Digest) {
        for set in [self.checked, self.known].into_iter().flatten() {
            if let Ok(mut c) = set.lock() {
                c.insert(d);
            }
        }
    }

    pub fn put(&self, data: &[u8]) -> Result<PutOutcome> {
        let d = self.namer.digest(data);
        self.put_with_digest(data, d)
    }

    /// Stores chunk `data`, whose digest is `d`. A chunk that exists already is reused only
    /// once it was read back and found to hold `data` (once per `checked` set): a damaged
    /// chunk (a flipped bit, a torn or empty file) is never trusted because it has the right
    /// name; it is written again, and replaces the damaged file at the next `sync`.
    pub fn put_with_digest(&self, data: &[u8], d: Digest) -> Result<PutOutcome> {
        let name = object_name(&d);
        let mut repaired = false;
        if self.is_known(&d) {
            return Ok(PutOutcome {
                digest: d,
                stored_bytes: 0,
                new: false,
                repaired: false,
            });
        }
        if self.store.exists(&name)? {
            if self.is_checked(&d) {
                self.remember(d);
                return Ok(PutOutcome {
                    digest: d,
                    stored_bytes: 0,
                    new: false,
                    repaired: false,
                });
            }
            match self.store.get(&name) {
                Ok(bytes) if holds(&bytes, data) => {
                    self.remember(d);
                    return Ok(PutOutcome {
                        digest: d,
                        stored_bytes: 0,
                        new: false,
                        repaired: false,
                    });
                }
                Ok(bytes) => {
                    tracing::warn!(
                        chunk = %hex(&d),
                        size = bytes.len(),
                        "an existing chunk is damaged: writing it again"
                    );
                }
                // Removed meanwhile: written again below.
                Err(RepoError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(
                        chunk = %hex(&d),
                        error = %crate::error_chain(&e),
                        "an existing chunk cannot be read: writing it again"
                    );
                }
            }
            repaired = true;
        }
        let enc = encode(data);
        // Made durable by the `sync` that precedes publishing the index that refers to it.
        self.store.put_unsynced(&name, &enc)?;
        self.remember(d);
        Ok(PutOutcome {
            digest: d,
            // What the store holds: sealing adds its header and tag.
            stored_bytes: enc.len() as u64
                + match self.namer {
                    Namer::Keyed(_) => crate::crypt::OVERHEAD as u64,
                    Namer::Sha256 => 0,
                },
            new: true,
            repaired,
        })
    }

    /// Chunk `d`, checked against its digest; a damaged one (or, encrypted, one that fails
    /// authentication) is `RepoError::Corrupt`.
    pub fn get(&self, d: &Digest) -> Result<Vec<u8>> {
        let bytes = self.store.get(&object_name(d)).map_err(|e| match e {
            RepoError::Tampered { .. } => RepoError::Corrupt { digest: hex(d) },
            e => e,
        })?;
        decode(&bytes, d, self.namer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::LocalDir;

    fn noise(n: usize) -> Vec<u8> {
        let mut x: u64 = 88172645463325252;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn round_trip_dedup_and_compression_choice() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalDir::new(d.path());
        let c = ChunkStore::new(&s, &Namer::Sha256);
        let text = b"the same line again and again\n".repeat(10_000);
        let a = c.put(&text).unwrap();
        assert!(
            a.new && a.stored_bytes < text.len() as u64 / 10,
            "text compresses"
        );
        let again = c.put(&text).unwrap();
        assert_eq!(
            (again.new, again.stored_bytes, again.repaired),
            (false, 0, false)
        );
        assert_eq!(c.get(&a.digest).unwrap(), text);
        let rnd = noise(1 << 20);
        let r = c.put(&rnd).unwrap();
        assert_eq!(
            r.stored_bytes,
            rnd.len() as u64 + HEADER as u64,
            "noise is stored raw"
        );
        assert_eq!(c.get(&r.digest).unwrap(), rnd);
    }

    #[test]
    fn a_flipped_byte_is_reported_as_corrupt() {
        let d = tempfile::tempdir().unwrap();
        let s = LocalDir::new(d.path());
        let c = ChunkStore::new(&s, &Namer::Sha256);
        for data in [noise(4096), b"abc".repeat(5000)] {
            let p = c.put(&data).unwrap();
            s.sync().unwrap();
            let path = d.path().join(object_name(&p.digest));
            let mut bytes = std::fs::read(&path).unwrap();
            let i = bytes.len() - 7;
            bytes[i] ^= 0x40;
            std::fs::write(&path, bytes).unwrap();
            assert!(matches!(c.get(&p.digest), Err(RepoError::Corrupt { .. })));
        }
    }
}
