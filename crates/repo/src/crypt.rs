//! Encryption at rest (FORMAT.md, "Encrypted repositories"): a random master key, kept in a
//! key file and/or wrapped by a passphrase (Argon2id) in the repository; every object but
//! the config and the key material sealed with AES-256-GCM under a key derived from it
//! (`Sealed`, a wrapper around any `ObjectStore`); chunk names keyed (HMAC-SHA256).

use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::Sha256;

use super::storage::ObjectStore;
use super::{RepoError, Result};

/// A sealed object: magic, version, nonce, ciphertext, tag.
const MAGIC: &[u8; 4] = b"VMBE";
const VERSION: u8 = 1;
const NONCE: usize = 12;
const TAG: usize = 16;
pub const HEADER: usize = MAGIC.len() + 1 + NONCE;
/// What sealing adds to an object's size.
pub const OVERHEAD: usize = HEADER + TAG;
pub const CIPHER: &str = "aes-256-gcm";
/// The object that holds the master key wrapped by the passphrase.
pub const PASSPHRASE_OBJECT: &str = "keys/passphrase";
/// Argon2id parameters of a new wrapping (recorded beside it; any recorded ones are read).
pub const KDF_MEMORY_KIB: u32 = 64 * 1024;
pub const KDF_PASSES: u32 = 3;
pub const KDF_LANES: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    #[error(
        "{} is encrypted: give its key file (--key-file or VMBACKUP_KEY_FILE) or its passphrase (VMBACKUP_PASSPHRASE_FILE, VMBACKUP_PASSPHRASE_COMMAND, or a terminal)",
        .0.display()
    )]
    KeyNeeded(PathBuf),
    #[error("the key does not open repository {}: wrong key file or passphrase", .0.display())]
    WrongKey(PathBuf),
    #[error(
        "{} is not encrypted, yet a key was given (--key-file, VMBACKUP_KEY_FILE or a passphrase); refused, so that nothing is stored unencrypted by mistake",
        .0.display()
    )]
    NotEncrypted(PathBuf),
    #[error("key file {}: {why}", path.display())]
    KeyFile { path: PathBuf, why: String },
    #[error("passphrase: {0}")]
    Passphrase(String),
    #[error("there is no repository at {}; `vmbackup init` creates one", .0.display())]
    NoRepository(PathBuf),
    #[error("{} is a repository already; init changed nothing", .0.display())]
    Initialized(PathBuf),
    #[error("the encryption settings in config.json are damaged: {0}")]
    Config(String),
    #[error("{0}")]
    Internal(String),
}

/// Fills `buf` from the operating system's random source.
pub fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| CryptError::Internal(format!("no random numbers: {e}")).into())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// The repository's master key; zeroed when dropped.
pub struct MasterKey([u8; 32]);

impl MasterKey {
    pub fn generate() -> Result<MasterKey> {
        let mut k = [0u8; 32];
        random(&mut k)?;
        Ok(MasterKey(k))
    }

    fn subkey(&self, label: &[u8]) -> [u8; 32] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        m.update(label);
        m.finalize().into_bytes().into()
    }

    /// What config.json records to recognise this key without revealing it.
    pub fn check_value(&self, repository: &str) -> String {
        let mut label = b"vmbackup key check v1 ".to_vec();
        label.extend_from_slice(repository.as_bytes());
        hex(&self.subkey(&label))
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference into our own array; a
            // volatile write keeps the compiler from dropping the zeroing as a dead store.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// AES-256-GCM under `key` (ring's implementation: about three times the speed of the
/// RustCrypto one on this hardware, and already built for rustls).
fn aes_gcm(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key"))
}

/// Seals `buf[from..]` in place under `nonce` (which must never repeat under `key`) and appends
/// the tag.
fn seal_in_place(
    key: &LessSafeKey,
    nonce: [u8; NONCE],
    aad: &[u8],
    buf: &mut Vec<u8>,
    from: usize,
) -> std::result::Result<(), ring::error::Unspecified> {
    let tag = key.seal_in_place_separate_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf[from..],
    )?;
    buf.extend_from_slice(tag.as_ref());
    Ok(())
}

/// Opens `sealed` (ciphertext then tag): the plaintext, or an error if it is not exactly what
/// `key` sealed with `nonce` and `aad`.
fn open_sealed(
    key: &LessSafeKey,
    nonce: [u8; NONCE],
    aad: &[u8],
    sealed: &[u8],
) -> std::result::Result<Vec<u8>, ring::error::Unspecified> {
    let mut buf = sealed.to_vec();
    let len = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )?
        .len();
    buf.truncate(len);
    Ok(buf)
}

/// The keys derived from a master key: the object key (AES-256-GCM) and the chunk-name key
/// (HMAC-SHA256).
pub struct Keys {
    cipher: LessSafeKey,
    chunk_names: Hmac<Sha256>,
}

impl Keys {
    pub fn new(master: &MasterKey) -> Keys {
        let mut object = master.subkey(b"vmbackup object key v1");
        let mut names = master.subkey(b"vmbackup chunk name key v1");
        let keys = Keys {
            cipher: aes_gcm(&object),
            chunk_names: <Hmac<Sha256> as Mac>::new_from_slice(&names).expect("HMAC takes any key"),
        };
        object.fill(0);
        names.fill(0);
        keys
    }

    /// The keyed name of a chunk: HMAC-SHA256 of its content.
    pub fn chunk_digest(&self, data: &[u8]) -> [u8; 32] {
        let mut m = self.chunk_names.clone();
        m.update(data);
        m.finalize().into_bytes().into()
    }

    fn aad(name: &str) -> Vec<u8> {
        let mut a = Vec::with_capacity(5 + name.len());
        a.extend_from_slice(MAGIC);
        a.push(VERSION);
        a.extend_from_slice(name.as_bytes());
        a
    }

    /// Seals `plain`, the content of object `name` (its associated data).
    pub fn seal(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE];
        random(&mut nonce)?;
        let mut out = Vec::with_capacity(OVERHEAD + plain.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        seal_in_place(&self.cipher, nonce, &Keys::aad(name), &mut out, HEADER)
            .map_err(|_| CryptError::Internal(format!("cannot seal {name}")))?;
        Ok(out)
    }

    /// Opens `sealed`, read as object `name`: `RepoError::Tampered` unless it is exactly what
    /// this key sealed under that name.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        let tampered = || RepoError::Tampered {
            object: name.to_string(),
        };
        if sealed.len() < OVERHEAD || &sealed[..4] != MAGIC || sealed[4] != VERSION {
            return Err(tampered());
        }
        let mut nonce = [0u8; NONCE];
        nonce.copy_from_slice(&sealed[5..HEADER]);
        open_sealed(&self.cipher, nonce, &Keys::aad(name), &sealed[HEADER..])
            .map_err(|_| tampered())
    }
}

/// Objects stored as they are in an encrypted repository: the config (read before any key)
/// and the key material (sealed by its own key).
pub fn is_plain(name: &str) -> bool {
    name == "config.json" || name.starts_with("keys/")
}

/// An object store that seals what it stores and opens what it reads, around any store.
pub struct Sealed {
    inner: Box<dyn ObjectStore>,
    keys: std::sync::Arc<Keys>,
}

impl Sealed {
    pub fn new(inner: Box<dyn ObjectStore>, keys: std::sync::Arc<Keys>) -> Sealed {
        Sealed { inner, keys }
    }

    fn seal(&self, name: &str, data: &[u8]) -> Result<Vec<u8>> {
        if is_plain(name) {
            Ok(data.to_vec())
        } else {
            self.keys.seal(name, data)
        }
    }
}

impl ObjectStore for Sealed {
    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        self.inner.put(name, &self.seal(name, data)?)
    }
    fn put_new(&self, name: &str, data: &[u8]) -> Result<()> {
        self.inner.put_new(name, &self.seal(name, data)?)
    }
    fn put_unsynced(&self, name: &str, data: &[u8]) -> Result<()> {
        self.inner.put_unsynced(name, &self.seal(name, data)?)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn forget_unsynced(&self) {
        self.inner.forget_unsynced()
    }
    fn remove_temporaries(&self) -> Result<usize> {
        self.inner.remove_temporaries()
    }
    fn get(&self, name: &str) -> Result<Vec<u8>> {
        let bytes = self.inner.get(name)?;
        if is_plain(name) {
            Ok(bytes)
        } else {
            self.keys.open(name, &bytes)
        }
    }
    fn exists(&self, name: &str) -> Result<bool> {
        self.inner.exists(name)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.inner.list(prefix)
    }
    fn delete(&self, name: &str) -> Result<()> {
        self.inner.delete(name)
    }
    /// The sealed sizes: what the objects take in the store beneath.
    fn list_sized(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        self.inner.list_sized(prefix)
    }
    fn delete_many(&self, names: &[String]) -> Result<()> {
        self.inner.delete_many(names)
    }
    fn listing_has_sizes(&self) -> bool {
        self.inner.listing_has_sizes()
    }
    fn delete_batch(&self) -> usize {
        self.inner.delete_batch()
    }
    fn list_lag(&self) -> std::time::Duration {
        self.inner.list_lag()
    }
    fn requests(&self) -> Option<crate::storage::RequestCounts> {
        self.inner.requests()
    }
    fn parallel_reads(&self) -> usize {
        self.inner.parallel_reads()
    }
}

/// The `encryption` block of an encrypted repository's config.json.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EncryptionConfig {
    pub version: u32,
    pub cipher: String,
    /// A random id of this repository (hex): binds key files and the wrapped key to it.
    pub repository: String,
    /// HMAC-SHA256 under a key derived from the master key, of the repository id: tells a
    /// wrong key from a right one before anything is read or written.
    pub key_check: String,
}

/// A key file: the master key of one repository.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeyFile {
    vmbackup_key: u32,
    repository: String,
    key: String,
}

/// Writes `key` for `repository` to a new file `path` (0600); an existing file is never
/// overwritten.
pub fn write_key_file(path: &Path, repository: &str, key: &MasterKey) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |why: String| {
        RepoError::from(CryptError::KeyFile {
            path: path.to_path_buf(),
            why,
        })
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                err("exists already; it is never overwritten".into())
            }
            _ => err(format!("cannot create it: {e}")),
        })?;
    let text = serde_json::to_string(&KeyFile {
        vmbackup_key: 1,
        repository: repository.to_string(),
        key: hex(&key.0),
    })
    .map_err(|e| err(e.to_string()))?;
    let written = f
        .write_all(format!("{text}\n").as_bytes())
        .and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(err(format!("cannot write it: {e}")));
    }
    Ok(())
}

/// Reads the key file `path`; checks it is the key of `enc`'s repository (`WrongKey`).
pub fn read_key_file(path: &Path, repo: &Path, enc: &EncryptionConfig) -> Result<MasterKey> {
    let err = |why: &str| {
        RepoError::from(CryptError::KeyFile {
            path: path.to_path_buf(),
            why: why.to_string(),
        })
    };
    let text = std::fs::read(path).map_err(|e| err(&format!("cannot read it ({})", e.kind())))?;
    let kf: KeyFile =
        serde_json::from_slice(&text).map_err(|_| err("is not a vmbackup key file"))?;
    let bytes = unhex(&kf.key).filter(|k| k.len() == 32 && kf.vmbackup_key == 1);
    let Some(bytes) = bytes else {
        return Err(err("is not a vmbackup key file"));
    };
    let mut k = [0u8; 32];
    k.copy_from_slice(&bytes);
    let key = MasterKey(k);
    if kf.repository != enc.repository || key.check_value(&enc.repository) != enc.key_check {
        return Err(CryptError::WrongKey(repo.to_path_buf()).into());
    }
    Ok(key)
}

/// The master key wrapped by a passphrase (object `keys/passphrase`).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Wrapped {
    pub version: u32,
    pub kdf: String,
    pub argon2_version: u32,
    pub memory_kib: u32,
    pub passes: u32,
    pub lanes: u32,
    pub salt: String,
    pub cipher: String,
    pub nonce: String,
    pub wrapped: String,
}

fn kdf(
    passphrase: &[u8],
    salt: &[u8],
    memory_kib: u32,
    passes: u32,
    lanes: u32,
) -> Result<[u8; 32]> {
    let params = argon2::Params::new(memory_kib, passes, lanes, Some(32))
        .map_err(|e| CryptError::Config(format!("Argon2 parameters: {e}")))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    a.hash_password_into(passphrase, salt, &mut out)
        .map_err(|e| CryptError::Internal(format!("Argon2: {e}")))?;
    Ok(out)
}

fn wrap_aad(repository: &str) -> Vec<u8> {
    format!("vmbackup wrapped key v1 {repository}").into_bytes()
}

/// Wraps `key` by `passphrase` with a new salt and nonce.
pub fn wrap(key: &MasterKey, passphrase: &[u8], repository: &str) -> Result<Wrapped> {
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; NONCE];
    random(&mut salt)?;
    random(&mut nonce)?;
    let mut kek = kdf(passphrase, &salt, KDF_MEMORY_KIB, KDF_PASSES, KDF_LANES)?;
    let cipher = aes_gcm(&kek);
    kek.fill(0);
    let mut buf = key.0.to_vec();
    seal_in_place(&cipher, nonce, &wrap_aad(repository), &mut buf, 0)
        .map_err(|_| CryptError::Internal("cannot wrap the key".into()))?;
    let w = Wrapped {
        version: 1,
        kdf: "argon2id".into(),
        argon2_version: 0x13,
        memory_kib: KDF_MEMORY_KIB,
        passes: KDF_PASSES,
        lanes: KDF_LANES,
        salt: hex(&salt),
        cipher: CIPHER.into(),
        nonce: hex(&nonce),
        wrapped: hex(&buf),
    };
    buf.fill(0);
    Ok(w)
}

/// Unwraps the master key; a wrong passphrase is `WrongKey`.
pub fn unwrap(
    w: &Wrapped,
    passphrase: &[u8],
    repo: &Path,
    enc: &EncryptionConfig,
) -> Result<MasterKey> {
    let bad =
        |why: &str| RepoError::from(CryptError::Config(format!("{PASSPHRASE_OBJECT}: {why}")));
    if w.version != 1 || w.kdf != "argon2id" || w.argon2_version != 0x13 || w.cipher != CIPHER {
        return Err(bad("unknown key wrapping"));
    }
    // Bounds against a doctored object that would make the derivation take all memory.
    if w.memory_kib > 4 * 1024 * 1024 || w.passes > 64 || w.lanes > 64 {
        return Err(bad("Argon2 parameters out of bounds"));
    }
    let (Some(salt), Some(nonce), Some(wrapped)) =
        (unhex(&w.salt), unhex(&w.nonce), unhex(&w.wrapped))
    else {
        return Err(bad("not hex"));
    };
    let Ok(nonce) = <[u8; NONCE]>::try_from(nonce.as_slice()) else {
        return Err(bad("wrong lengths"));
    };
    if wrapped.len() != 32 + TAG || salt.len() < 8 {
        return Err(bad("wrong lengths"));
    }
    let mut kek = kdf(passphrase, &salt, w.memory_kib, w.passes, w.lanes)?;
    let cipher = aes_gcm(&kek);
    kek.fill(0);
    let mut buf = open_sealed(&cipher, nonce, &wrap_aad(&enc.repository), &wrapped)
        .map_err(|_| CryptError::WrongKey(repo.to_path_buf()))?;
    let mut k = [0u8; 32];
    k.copy_from_slice(&buf);
    buf.fill(0);
    let key = MasterKey(k);
    if key.check_value(&enc.repository) != enc.key_check {
        return Err(CryptError::WrongKey(repo.to_path_buf()).into());
    }
    Ok(key)
}

/// A passphrase, read once; zeroed when dropped.
pub struct Passphrase(pub Vec<u8>);

impl Drop for Passphrase {
    fn drop(&mut self) {
        self.0.fill(0);
    }
}

/// How a command may unlock an encrypted repository.
#[derive(Default)]
pub struct Unlock {
    /// `--key-file` / `VMBACKUP_KEY_FILE`.
    pub key_file: Option<PathBuf>,
    /// Gets the passphrase (a file, a command, a terminal prompt), called only when needed;
    /// `None`: no passphrase can be had.
    #[allow(clippy::type_complexity)]
    pub passphrase: Option<Box<dyn Fn() -> Result<Passphrase> + Send + Sync>>,
    /// A key or passphrase was given explicitly (not just a terminal to prompt on): an
    /// unencrypted repository is refused then, and none is created on first use.
    pub explicit: bool,
}

impl Unlock {
    /// No key: opens unencrypted repositories only.
    pub fn none() -> Unlock {
        Unlock::default()
    }

    pub fn key_file(path: &Path) -> Unlock {
        Unlock {
            key_file: Some(path.to_path_buf()),
            passphrase: None,
            explicit: true,
        }
    }

    /// The master key of the repository in `repo` (`enc`: its config), read through `store`.
    pub fn master_key(
        &self,
        repo: &Path,
        store: &dyn ObjectStore,
        enc: &EncryptionConfig,
    ) -> Result<MasterKey> {
        if let Some(path) = &self.key_file {
            return read_key_file(path, repo, enc);
        }
        let Some(get) = &self.passphrase else {
            return Err(CryptError::KeyNeeded(repo.to_path_buf()).into());
        };
        let w = match store.get(PASSPHRASE_OBJECT) {
            Ok(b) => b,
            Err(RepoError::NotFound(_)) => {
                return Err(CryptError::KeyFile {
                    path: repo.to_path_buf(),
                    why: "this repository's key is kept only in a key file (it was made with `init --encrypt --key-file` and no passphrase): give --key-file or VMBACKUP_KEY_FILE".into(),
                }
                .into())
            }
            Err(e) => return Err(e),
        };
        let w: Wrapped = serde_json::from_slice(&w)
            .map_err(|e| CryptError::Config(format!("{PASSPHRASE_OBJECT}: {e}")))?;
        let p = get()?;
        unwrap(&w, &p.0, repo, enc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::LocalDir;
    use std::sync::Arc;

    fn keys() -> Keys {
        Keys::new(&MasterKey([7; 32]))
    }

    /// Objects sealed and a key wrapped by the earlier implementation (the RustCrypto
    /// `aes-gcm` crate) open unchanged: the format is AES-256-GCM, whoever computes it.
    #[test]
    fn objects_and_wrapped_keys_of_the_earlier_implementation_open() {
        let sealed = unhex(
            "564d4245015c5bcc3527f7214685e3cfc502018b43b2913c278e825167ac4cdfd2203cdd0670775cca9253cea43aa55efff1e8",
        )
        .unwrap();
        let name = "backups/vm/2026/manifest.json";
        assert_eq!(keys().open(name, &sealed).unwrap(), b"sealed before ring");
        assert!(keys()
            .open("backups/vm/2027/manifest.json", &sealed)
            .is_err());
        let w: Wrapped = serde_json::from_str(
            r#"{"version":1,"kdf":"argon2id","argon2_version":19,"memory_kib":65536,"passes":3,"lanes":1,"salt":"b5fe097fe1f4c96921f903f64195ff73","cipher":"aes-256-gcm","nonce":"6e4109563e001dc7d1af7d10","wrapped":"3001293e3c19cfd251ac7e6c37d5f6b75f0512553c46e531a9939007a814386ba67e248f0cbf5e293c784a941a69e77b"}"#,
        )
        .unwrap();
        let enc = EncryptionConfig {
            version: 1,
            cipher: CIPHER.into(),
            repository: "r1".into(),
            key_check: MasterKey([9; 32]).check_value("r1"),
        };
        let key = unwrap(&w, b"pass", Path::new("/r"), &enc).unwrap();
        assert_eq!(key.0, [9; 32]);
        assert!(unwrap(&w, b"wrong", Path::new("/r"), &enc).is_err());
    }

    /// A sealed store lists the sizes of the sealed objects (what deleting them frees) and
    /// deletes many through its inner store, in that store's batches.
    #[test]
    fn sealed_sizes_and_deletes_of_many_are_the_inner_stores() {
        let d = tempfile::tempdir().unwrap();
        let s = Sealed::new(Box::new(LocalDir::new(d.path())), Arc::new(keys()));
        s.put("chunks/00/a", &[1; 100]).unwrap();
        s.put("config.json", b"{}").unwrap();
        let sized = s.list_sized("").unwrap();
        assert_eq!(
            sized,
            [
                ("chunks/00/a".to_string(), (100 + OVERHEAD) as u64),
                ("config.json".to_string(), 2)
            ]
        );
        assert_eq!(
            std::fs::metadata(d.path().join("chunks/00/a"))
                .unwrap()
                .len(),
            (100 + OVERHEAD) as u64
        );
        assert_eq!(s.delete_batch(), 1);
        s.delete_many(&["chunks/00/a".to_string(), "config.json".to_string()])
            .unwrap();
        assert!(s.list("").unwrap().is_empty());
    }

    /// AES-256-GCM as specified: test case 16 of McGrew and Viega's GCM specification (the
    /// 96-bit nonce, associated data and a partial last block).
    #[test]
    fn aes_gcm_matches_the_specification_vector() {
        let b = |h: &str| unhex(h).unwrap();
        let key: [u8; 32] = b("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
            .try_into()
            .unwrap();
        let nonce: [u8; NONCE] = b("cafebabefacedbaddecaf888").try_into().unwrap();
        let aad = b("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let plain = b("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39");
        let expect = b("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f66276fc6ece0f4e1768cddf8853bb2d551b");
        let mut buf = plain.clone();
        seal_in_place(&aes_gcm(&key), nonce, &aad, &mut buf, 0).unwrap();
        assert_eq!(hex(&buf), hex(&expect));
        assert_eq!(
            open_sealed(&aes_gcm(&key), nonce, &aad, &buf).unwrap(),
            plain
        );
    }

    #[test]
    fn seal_open_round_trip_and_nonces_differ() {
        let k = keys();
        let a = k.seal("backups/x/manifest.json", b"hello").unwrap();
        let b = k.seal("backups/x/manifest.json", b"hello").unwrap();
        assert_ne!(a, b, "a new nonce every time");
        assert_eq!(a.len(), 5 + OVERHEAD);
        assert_eq!(&a[..4], b"VMBE");
        assert!(!a.windows(5).any(|w| w == b"hello"));
        assert_eq!(k.open("backups/x/manifest.json", &a).unwrap(), b"hello");
    }

    #[test]
    fn tampering_swapping_and_a_wrong_key_name_the_object() {
        let k = keys();
        let a = k.seal("chunks/aaaa/a", b"first").unwrap();
        for i in [0, 4, 6, HEADER, a.len() - 1] {
            let mut t = a.clone();
            t[i] ^= 1;
            let e = k.open("chunks/aaaa/a", &t).unwrap_err();
            assert!(
                matches!(&e, RepoError::Tampered { object } if object == "chunks/aaaa/a"),
                "{e:?}"
            );
            assert!(e.to_string().contains("chunks/aaaa/a"), "{e}");
        }
        // The same bytes under another name (two objects swapped) do not open.
        assert!(matches!(
            k.open("chunks/bbbb/b", &a),
            Err(RepoError::Tampered { .. })
        ));
        // Truncated.
        assert!(k.open("chunks/aaaa/a", &a[..10]).is_err());
        // Another key.
        let other = Keys::new(&MasterKey([8; 32]));
        assert!(matches!(
            other.open("chunks/aaaa/a", &a),
            Err(RepoError::Tampered { .. })
        ));
    }

    #[test]
    fn keyed_chunk_names_differ_from_sha256_and_are_stable() {
        let data = b"some chunk content".repeat(100);
        let a = keys().chunk_digest(&data);
        assert_eq!(a, keys().chunk_digest(&data), "stable for one key");
        assert_ne!(a, crate::chunk::digest(&data), "not the plain SHA-256");
        assert_ne!(a, Keys::new(&MasterKey([8; 32])).chunk_digest(&data));
        // HMAC-SHA256 under the derived name key: a change of the derivation would orphan
        // every encrypted repository's chunks.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(
            &MasterKey([0; 32]).subkey(b"vmbackup chunk name key v1"),
        )
        .unwrap();
        m.update(b"abc");
        let want: [u8; 32] = m.finalize().into_bytes().into();
        assert_eq!(Keys::new(&MasterKey([0; 32])).chunk_digest(b"abc"), want);
    }

    #[test]
    fn the_store_wrapper_seals_all_but_config_and_keys() {
        let d = tempfile::tempdir().unwrap();
        let s = Sealed::new(Box::new(LocalDir::new(d.path())), Arc::new(keys()));
        s.put("backups/b/manifest.json", b"{\"secret\": 1}")
            .unwrap();
        s.put("config.json", b"{}").unwrap();
        s.put_unsynced("chunks/abcd/abcd", b"chunk-secret").unwrap();
        s.sync().unwrap();
        let raw = std::fs::read(d.path().join("backups/b/manifest.json")).unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains("secret"));
        let raw = std::fs::read(d.path().join("chunks/abcd/abcd")).unwrap();
        assert!(!raw.windows(6).any(|w| w == b"secret"));
        assert_eq!(std::fs::read(d.path().join("config.json")).unwrap(), b"{}");
        assert_eq!(
            s.get("backups/b/manifest.json").unwrap(),
            b"{\"secret\": 1}"
        );
        assert_eq!(s.get("chunks/abcd/abcd").unwrap(), b"chunk-secret");
        // Two sealed objects swapped on disk are detected, each named.
        let a = d.path().join("backups/b/manifest.json");
        let b = d.path().join("chunks/abcd/abcd");
        let (ab, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        std::fs::write(&a, &bb).unwrap();
        std::fs::write(&b, &ab).unwrap();
        let e = s.get("backups/b/manifest.json").unwrap_err();
        assert!(e.to_string().contains("backups/b/manifest.json"), "{e}");
    }

    #[test]
    fn key_files_and_passphrase_wrapping() {
        let d = tempfile::tempdir().unwrap();
        let master = MasterKey([3; 32]);
        let enc = EncryptionConfig {
            version: 1,
            cipher: CIPHER.into(),
            repository: "r1".into(),
            key_check: master.check_value("r1"),
        };
        let path = d.path().join("key");
        write_key_file(&path, "r1", &master).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Never overwritten.
        let e = write_key_file(&path, "r1", &MasterKey([4; 32])).unwrap_err();
        assert!(e.to_string().contains("never overwritten"), "{e}");
        assert_eq!(read_key_file(&path, d.path(), &enc).unwrap().0, [3; 32]);
        // Another repository's key is a wrong key.
        let other = d.path().join("other");
        write_key_file(&other, "r2", &MasterKey([5; 32])).unwrap();
        assert!(matches!(
            read_key_file(&other, d.path(), &enc),
            Err(RepoError::Crypt(CryptError::WrongKey(_)))
        ));
        let junk = d.path().join("junk");
        std::fs::write(&junk, "not a key").unwrap();
        assert!(matches!(
            read_key_file(&junk, d.path(), &enc),
            Err(RepoError::Crypt(CryptError::KeyFile { .. }))
        ));
        let w = wrap(&master, b"correct horse", "r1").unwrap();
        assert_eq!(w.memory_kib, KDF_MEMORY_KIB);
        assert!(!w.wrapped.contains(&hex(&[3; 32])));
        assert_eq!(
            unwrap(&w, b"correct horse", d.path(), &enc).unwrap().0,
            [3; 32]
        );
        let e = unwrap(&w, b"wrong horse", d.path(), &enc).err().unwrap();
        assert!(
            matches!(e, RepoError::Crypt(CryptError::WrongKey(_))),
            "{e:?}"
        );
        assert!(!e.to_string().contains("horse"));
    }

    /// Every file below `root`, by relative path, with its content.
    fn files(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
        let mut out = std::collections::BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                    out.insert(rel, std::fs::read(e.path()).unwrap());
                }
            }
        }
        out
    }

    #[test]
    fn an_encrypted_repository_end_to_end() {
        use crate::disk::{backup_disk, restore_disk, verify_disk};
        use crate::source::memory::MemorySource;
        use crate::{InitOptions, Repository};
        const M: usize = 1 << 20;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("repo");
        let key = d.path().join("key");
        let o = InitOptions {
            encrypt: true,
            key_file: Some(key.clone()),
            passphrase: Some(Passphrase(b"pass phrase".to_vec())),
        };
        Repository::init(&root, &o).unwrap();
        // init again: refused, nothing changed.
        let before = files(&root);
        let again = InitOptions {
            encrypt: true,
            key_file: Some(d.path().join("key2")),
            passphrase: None,
        };
        let e = Repository::init(&root, &again).err().unwrap();
        assert!(
            matches!(e, RepoError::Crypt(CryptError::Initialized(_))),
            "{e:?}"
        );
        assert!(!d.path().join("key2").exists());
        assert_eq!(files(&root), before);
        // Without a key, with a wrong one: refused before anything is written.
        for unlock in [Unlock::none(), Unlock::key_file(&d.path().join("nope"))] {
            assert!(Repository::open_unlocked(&root, &unlock).is_err());
        }
        let wrong = d.path().join("wrong");
        write_key_file(&wrong, "someone-else", &MasterKey([1; 32])).unwrap();
        let e = Repository::open_unlocked(&root, &Unlock::key_file(&wrong))
            .err()
            .unwrap();
        assert!(
            matches!(e, RepoError::Crypt(CryptError::WrongKey(_))),
            "{e:?}"
        );
        let bad_pass = Unlock {
            passphrase: Some(Box::new(|| Ok(Passphrase(b"nope".to_vec())))),
            explicit: true,
            ..Unlock::default()
        };
        assert!(Repository::open_unlocked(&root, &bad_pass).is_err());
        assert_eq!(files(&root), before);
        // With the passphrase and with the key file: the same repository.
        let pass = Unlock {
            passphrase: Some(Box::new(|| Ok(Passphrase(b"pass phrase".to_vec())))),
            explicit: true,
            ..Unlock::default()
        };
        Repository::open_unlocked(&root, &pass).unwrap();
        let repo = Repository::open_unlocked(&root, &Unlock::key_file(&key)).unwrap();
        assert!(repo.is_encrypted());
        let mut data = vec![0u8; 4 * M];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        data[..16].copy_from_slice(b"MARKER-PLAINTEXT");
        let src = MemorySource {
            data: data.clone(),
            zero: vec![],
        };
        let b = backup_disk(&repo, &src, M as u64, 2, &|_, _| {}).unwrap();
        let first = b.index.chunks[0].unwrap();
        assert_eq!(first, repo.chunk_digest(&data[..M]));
        assert_ne!(first, crate::chunk::digest(&data[..M]));
        // Dedup within the repository still works.
        let again = backup_disk(&repo, &src, M as u64, 2, &|_, _| {}).unwrap();
        assert_eq!(again.stored_bytes_new, 0);
        let plain_name = crate::chunk::hex(&crate::chunk::digest(&data[..M]));
        for (name, content) in files(&root) {
            assert!(!name.contains(&plain_name), "{name}");
            assert!(
                !content.windows(16).any(|w| w == b"MARKER-PLAINTEXT"),
                "{name}"
            );
        }
        let out = d.path().join("out.raw");
        restore_disk(&repo, &b.index, &out, 2, &|_, _| {}).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
        // A flipped byte in a chunk: verify names it, a restore fails on it.
        let chunk = root.join(crate::chunk::object_name(&first));
        let mut bytes = std::fs::read(&chunk).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&chunk, bytes).unwrap();
        assert_eq!(
            verify_disk(&repo, &b.index).unwrap(),
            [crate::chunk::hex(&first)]
        );
        std::fs::remove_file(&out).unwrap();
        let e = restore_disk(&repo, &b.index, &out, 2, &|_, _| {}).unwrap_err();
        assert!(e.to_string().contains(&crate::chunk::hex(&first)), "{e}");
        // An unencrypted repository refuses a key; a key never creates one.
        let plain = d.path().join("plain");
        assert!(Repository::open_unlocked(&plain, &Unlock::key_file(&key)).is_err());
        assert!(!plain.exists());
        Repository::open(&plain).unwrap();
        let e = Repository::open_unlocked(&plain, &Unlock::key_file(&key))
            .err()
            .unwrap();
        assert!(
            matches!(e, RepoError::Crypt(CryptError::NotEncrypted(_))),
            "{e:?}"
        );
    }

    /// Chunk store throughput, unencrypted against encrypted, into a tmpfs-backed folder
    /// when there is one: `cargo test -p vmbackup-repo --release -- --ignored throughput
    /// --nocapture`.
    #[test]
    #[ignore]
    fn throughput_encrypted_against_unencrypted() {
        use crate::chunk::{ChunkStore, Namer};
        const M: usize = 1 << 20;
        let chunks: Vec<Vec<u8>> = (0..64u64)
            .map(|n| {
                let mut x = n.wrapping_mul(0x9E3779B97F4A7C15) | 1;
                (0..4 * M)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            })
            .collect();
        let base = if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/var/tmp"
        };
        let mut secs = Vec::new();
        for encrypted in [false, true] {
            let d = tempfile::tempdir_in(base).unwrap();
            let keys = Arc::new(keys());
            let store: Box<dyn ObjectStore> = if encrypted {
                Box::new(Sealed::new(Box::new(LocalDir::new(d.path())), keys.clone()))
            } else {
                Box::new(LocalDir::new(d.path()))
            };
            let namer = if encrypted {
                Namer::Keyed(keys)
            } else {
                Namer::Sha256
            };
            let c = ChunkStore::new(store.as_ref(), &namer);
            let t = std::time::Instant::now();
            for data in &chunks {
                c.put(data).unwrap();
            }
            store.sync().unwrap();
            let s = t.elapsed().as_secs_f64();
            println!(
                "{}: {:.0} MiB/s",
                if encrypted {
                    "encrypted"
                } else {
                    "unencrypted"
                },
                256.0 / s
            );
            secs.push(s);
        }
        println!("encrypted speed: {:.2}x of unencrypted", secs[0] / secs[1]);
        let k = keys();
        let t = std::time::Instant::now();
        for data in &chunks {
            std::hint::black_box(k.seal("chunks/x", data).unwrap());
        }
        println!("seal alone: {:.0} MiB/s", 256.0 / t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        for data in &chunks {
            std::hint::black_box(k.chunk_digest(data));
        }
        println!("HMAC alone: {:.0} MiB/s", 256.0 / t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        for data in &chunks {
            std::hint::black_box(crate::chunk::digest(data));
        }
        println!(
            "SHA-256 alone: {:.0} MiB/s",
            256.0 / t.elapsed().as_secs_f64()
        );
    }
}
