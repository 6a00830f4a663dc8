//! `vmbackup serve ID`: the disks of a backup as read-only NBD exports (`nbd::server`), one
//! per disk, named after its target (`vda`), on a UNIX socket (0600) or a loopback TCP port.
//!
//! Chunks are read on demand from the repository (local, S3, encrypted alike: the read path
//! of a restore, `ChunkStore::get`, which checks every chunk against its digest) and kept
//! decoded in a cache of `CACHE_BYTES` shared by every disk and client (least recently used
//! first out; 16 chunks at the default 4 MiB chunk size). Zero chunks are answered without a
//! read and reported as holes (`base:allocation`). A chunk that is missing or damaged
//! answers `EIO` and logs an error naming it: never other data.
//!
//! The server holds a shared repository lock while it runs (as a backup does), so no gc frees
//! the chunks it serves. It stops when a stop signal came (`interrupt::requested`) or, with
//! an idle timeout, when no client was connected for that long; its socket is removed then.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::nbd::server::{self, BlockSource, Export, Listener, SourceError, Stopped};
use crate::repository::chunk::{self, ChunkStore, Digest};
use crate::repository::disk::DiskIndex;
use crate::repository::{RepoError, Repository};

/// The decoded chunks kept in memory, all disks and clients together.
pub const CACHE_BYTES: usize = 64 << 20;

/// Where to listen.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A UNIX socket at this path (it must not exist).
    Unix(PathBuf),
    /// A TCP port on 127.0.0.1 (0: any free one).
    Tcp(u16),
}

/// What `serve` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub id: String,
    /// Only these disks (targets); all when empty.
    pub disks: Vec<String>,
    pub endpoint: Endpoint,
    pub idle_timeout: Option<Duration>,
}

/// One export, as announced.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Announced {
    pub name: String,
    pub size: u64,
    pub uri: String,
}

/// What the server listens on, once it does.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Serving {
    /// The backup's id.
    #[serde(rename = "backup_id")]
    pub backup: String,
    pub vm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub exports: Vec<Announced>,
}

/// The default socket: `STATE_DIR/serve-PID.sock`.
pub fn default_socket(state_dir: &Path) -> PathBuf {
    state_dir.join(format!("serve-{}.sock", std::process::id()))
}

/// A decoded chunk being or having been read: its waiters block on the slot's lock.
type Slot = Arc<Mutex<Option<Arc<Vec<u8>>>>>;

/// The least recently used decoded chunks, at most `capacity` bytes of them.
pub(crate) struct ChunkCache {
    capacity: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    slots: HashMap<Digest, (Slot, u64)>,
    tick: u64,
}

impl ChunkCache {
    pub(crate) fn new(capacity: usize) -> Self {
        ChunkCache {
            capacity,
            inner: Mutex::default(),
        }
    }

    /// Chunk `d`, from the cache or from `fetch` (once, however many ask at the same time).
    fn get(
        &self,
        d: &Digest,
        fetch: impl FnOnce() -> std::result::Result<Vec<u8>, RepoError>,
    ) -> std::result::Result<Arc<Vec<u8>>, RepoError> {
        let slot = {
            let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            c.tick += 1;
            let tick = c.tick;
            let e = c.slots.entry(*d).or_insert_with(|| (Slot::default(), tick));
            e.1 = tick;
            e.0.clone()
        };
        let mut held = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(data) = &*held {
            return Ok(data.clone());
        }
        match fetch() {
            Ok(data) => {
                let data = Arc::new(data);
                *held = Some(data.clone());
                drop(held);
                self.evict(d);
                Ok(data)
            }
            Err(e) => {
                drop(held);
                let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                if c.slots.get(d).is_some_and(|(s, _)| Arc::ptr_eq(s, &slot)) {
                    c.slots.remove(d);
                }
                Err(e)
            }
        }
    }

    /// Drops the least recently used filled chunks (never `keep`) until the rest fit.
    fn evict(&self, keep: &Digest) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut total = 0usize;
            let mut oldest: Option<(Digest, u64)> = None;
            for (d, (slot, tick)) in &c.slots {
                // A slot being filled is locked: it counts once filled.
                let Ok(s) = slot.try_lock() else { continue };
                if let Some(data) = &*s {
                    total += data.len();
                    if d != keep && oldest.is_none_or(|(_, t)| *tick < t) {
                        oldest = Some((*d, *tick));
                    }
                }
            }
            match oldest {
                Some((d, _)) if total > self.capacity => {
                    c.slots.remove(&d);
                }
                _ => return,
            }
        }
    }
}

/// One disk of a backup, read from the repository (by `serve` and `mount`).
pub(crate) struct DiskSource {
    pub(crate) repo: Arc<Repository>,
    pub(crate) backup: String,
    pub(crate) target: String,
    pub(crate) index: DiskIndex,
    pub(crate) cache: Arc<ChunkCache>,
}

impl DiskSource {
    /// The bytes of chunk `i` (zeros are not asked for).
    fn chunk(&self, i: usize, d: &Digest) -> std::result::Result<Arc<Vec<u8>>, SourceError> {
        let cs = self.index.chunk_size;
        let want = ((i as u64 + 1) * cs).min(self.index.virtual_size) - i as u64 * cs;
        let fetch = || {
            let data = ChunkStore::new(self.repo.store(), self.repo.namer()).get(d)?;
            if data.len() as u64 != want {
                return Err(RepoError::Corrupt {
                    digest: chunk::hex(d),
                });
            }
            Ok(data)
        };
        self.cache.get(d, fetch).map_err(|e| {
            let hex = chunk::hex(d);
            tracing::error!(
                backup = %self.backup,
                disk = %self.target,
                chunk = %hex,
                offset = i as u64 * cs,
                error = %crate::error::chain(&e),
                "cannot read chunk {hex}: the reader gets an I/O error"
            );
            SourceError(format!(
                "chunk {hex} of disk {} cannot be read ({})",
                self.target,
                crate::error::chain(&e)
            ))
        })
    }
}

impl BlockSource for DiskSource {
    fn size(&self) -> u64 {
        self.index.virtual_size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), SourceError> {
        let cs = self.index.chunk_size;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let i = (at / cs) as usize;
            let within = (at % cs) as usize;
            let n = (buf.len() - done).min(cs as usize - within);
            let out = &mut buf[done..done + n];
            match self.index.chunks.get(i) {
                Some(Some(d)) => {
                    let data = self.chunk(i, d)?;
                    out.copy_from_slice(&data[within..within + n]);
                }
                Some(None) => out.fill(0),
                None => return Err(SourceError(format!("offset {at} is past the index"))),
            }
            done += n;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, length: u64) -> Vec<(u64, bool)> {
        let cs = self.index.chunk_size;
        let end = offset + length;
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let i = (at / cs) as usize;
            let next = ((i as u64 + 1) * cs).min(end);
            let zero = matches!(self.index.chunks.get(i), Some(None));
            match out.last_mut() {
                Some((l, z)) if *z == zero => *l += next - at,
                _ => out.push((next - at, zero)),
            }
            at = next;
        }
        out
    }
}

/// Removes the socket file when dropped, if it is still the one this process made.
struct SocketFile {
    path: PathBuf,
    ino: Option<(u64, u64)>,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == self.ino {
            let _ = std::fs::remove_file(&self.path);
        }
        set_current_socket(None);
    }
}

/// The socket being served, for `remove_socket_now` (an exit without unwinding).
static CURRENT: Mutex<Option<PathBuf>> = Mutex::new(None);

fn set_current_socket(p: Option<PathBuf>) {
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = p;
}

/// Removes the socket of a running `serve`: for a process about to exit at once.
pub fn remove_socket_now() {
    if let Some(p) = CURRENT.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = std::fs::remove_file(p);
    }
}

/// Binds a UNIX socket at `path`, 0600 from the start (the umask is tightened around the
/// bind). `path` must not exist.
fn bind_unix(path: &Path) -> Result<(Listener, SocketFile)> {
    use nix::sys::stat::{umask, Mode};
    const MAX_PATH: usize = 107;
    if path.as_os_str().len() > MAX_PATH {
        return Err(Error::Invalid(format!(
            "--socket {}: longer than {MAX_PATH} bytes (a UNIX socket's limit)",
            path.display()
        )));
    }
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(Error::Invalid(format!(
            "--socket {}: exists already (remove it, or choose another path)",
            path.display()
        )));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(Error::Invalid(format!(
                "--socket {}: no folder {}",
                path.display(),
                dir.display()
            )));
        }
    }
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    umask(old);
    let l = bound.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => Error::Invalid(format!(
            "--socket {}: exists already (remove it, or choose another path)",
            path.display()
        )),
        _ => Error::io("listen on", path, e),
    })?;
    let ino = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    set_current_socket(Some(path.to_path_buf()));
    Ok((
        Listener::Unix(l),
        SocketFile {
            path: path.to_path_buf(),
            ino,
        },
    ))
}

/// The chosen disks of backup `m` as sources sharing one chunk cache, and the shared
/// repository lock that keeps a gc from freeing their chunks while they are read (hold it as
/// long as they are; `RepoLock::is_lost` says when it no longer does that).
pub(crate) fn open_sources(
    repo: &Arc<Repository>,
    m: &crate::repository::manifest::Manifest,
    chosen: &[&crate::repository::manifest::DiskEntry],
) -> Result<(Vec<Arc<DiskSource>>, crate::repository::locks::RepoLock)> {
    let indexes = chosen
        .iter()
        .map(|d| repo.get_index(&m.id, d).map(|i| (d.target.clone(), i)))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let lock = repo
        .lock_for_backup()?
        .ok_or_else(|| Error::Busy("a gc holds the repository".into()))?;
    let cache = Arc::new(ChunkCache::new(CACHE_BYTES));
    let sources = indexes
        .into_iter()
        .map(|(target, index)| {
            Arc::new(DiskSource {
                repo: repo.clone(),
                backup: m.id.clone(),
                target,
                index,
                cache: cache.clone(),
            })
        })
        .collect();
    Ok((sources, lock))
}

/// The disks of backup `m` named in `disks` (all when empty); an unknown one is bad input.
pub(crate) fn chosen_disks<'a>(
    m: &'a crate::repository::manifest::Manifest,
    disks: &[String],
) -> Result<Vec<&'a crate::repository::manifest::DiskEntry>> {
    for d in disks {
        if !m.disks.iter().any(|x| &x.target == d) {
            let have: Vec<&str> = m.disks.iter().map(|x| x.target.as_str()).collect();
            return Err(Error::Invalid(format!(
                "backup {} has no disk {d} (it has {})",
                m.id,
                have.join(", ")
            )));
        }
    }
    let chosen: Vec<_> = m
        .disks
        .iter()
        .filter(|d| disks.is_empty() || disks.contains(&d.target))
        .collect();
    if chosen.is_empty() {
        return Err(Error::Invalid(format!("backup {} has no disks", m.id)));
    }
    Ok(chosen)
}

/// Serves backup `opts.id` of `repo` until stopped; `ready` is told where, once the server
/// listens. Returns why it stopped.
pub fn serve(repo: Repository, opts: &Options, ready: &dyn Fn(&Serving)) -> Result<Stopped> {
    serve_until(Arc::new(repo), opts, ready, &crate::interrupt::requested)
}

/// `serve`, stopping when `stop()` is true (checked every 100 ms) instead of at a signal.
pub fn serve_until(
    repo: Arc<Repository>,
    opts: &Options,
    ready: &dyn Fn(&Serving),
    stop: &dyn Fn() -> bool,
) -> Result<Stopped> {
    let m = repo.load(&opts.id)?;
    let chosen = chosen_disks(&m, &opts.disks)?;
    if let Endpoint::Unix(p) = &opts.endpoint {
        // Refused before anything is taken or made.
        if std::fs::symlink_metadata(p).is_ok() {
            return Err(Error::Invalid(format!(
                "--socket {}: exists already (remove it, or choose another path)",
                p.display()
            )));
        }
    }
    let (sources, lock) = open_sources(&repo, &m, &chosen)?;
    let exports: Vec<Export> = sources
        .into_iter()
        .map(|source| Export {
            name: source.target.clone(),
            source,
        })
        .collect();
    let (listener, _socket, socket, port) = match &opts.endpoint {
        Endpoint::Unix(p) => {
            let (l, f) = bind_unix(p)?;
            (l, Some(f), Some(p.clone()), None)
        }
        Endpoint::Tcp(port) => {
            let l = std::net::TcpListener::bind(("127.0.0.1", *port)).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AddrInUse {
                    Error::Invalid(format!("--port {port}: in use"))
                } else {
                    Error::io("listen on", format!("127.0.0.1:{port}"), e)
                }
            })?;
            let port = l
                .local_addr()
                .map_err(|e| Error::io("listen on", "127.0.0.1", e))?
                .port();
            (Listener::Tcp(l), None, None, Some(port))
        }
    };
    let uri = |name: &str| match (&socket, port) {
        (Some(p), _) => format!("nbd+unix:///{name}?socket={}", p.display()),
        (None, Some(port)) => format!("nbd://127.0.0.1:{port}/{name}"),
        (None, None) => unreachable!("a socket or a port"),
    };
    let serving = Serving {
        backup: m.id.clone(),
        vm: m.vm_name.clone(),
        socket: socket.as_ref().map(|p| p.display().to_string()),
        port,
        exports: exports
            .iter()
            .map(|e| Announced {
                name: e.name.clone(),
                size: e.source.size(),
                uri: uri(&e.name),
            })
            .collect(),
    };
    ready(&serving);
    tracing::info!(backup = %m.id, exports = exports.len(), "serving over NBD, read-only");
    let why = server::run(
        &listener,
        Arc::new(exports),
        opts.idle_timeout,
        server::HANDSHAKE_TIMEOUT,
        // A lost lock (not refreshed in time, removed as stale by another host) no longer
        // keeps a gc from freeing the chunks served: stop rather than answer EIO later.
        &|| stop() || lock.is_lost(),
    )
    .map_err(|e| Error::io("serve on", socket.clone().unwrap_or_default(), e))?;
    if lock.is_lost() {
        return Err(RepoError::LockLost(
            "stopped serving: a gc may free the chunks of the backup from now on".into(),
        )
        .into());
    }
    match why {
        Stopped::Idle => tracing::info!("no NBD client for the idle timeout: stopping"),
        Stopped::Asked => tracing::info!("stopping the NBD server"),
    }
    Ok(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_the_recent_chunks_within_its_size_and_fetches_each_once() {
        let c = ChunkCache::new(3 * 10);
        let fetched = std::sync::atomic::AtomicUsize::new(0);
        let get = |n: u8| {
            c.get(&[n; 32], || {
                fetched.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(vec![n; 10])
            })
            .unwrap()
        };
        for n in [1, 2, 3, 1, 4] {
            assert_eq!(*get(n), vec![n; 10]);
        }
        assert_eq!(fetched.load(std::sync::atomic::Ordering::SeqCst), 4);
        get(1);
        assert_eq!(
            fetched.load(std::sync::atomic::Ordering::SeqCst),
            4,
            "1 was used last"
        );
        get(2);
        assert_eq!(
            fetched.load(std::sync::atomic::Ordering::SeqCst),
            5,
            "2 was evicted"
        );
        // A failed fetch is not kept: the next read tries again.
        let e = c.get(&[9; 32], || Err(RepoError::Corrupt { digest: "x".into() }));
        assert!(e.is_err());
        assert_eq!(*c.get(&[9; 32], || Ok(vec![9; 10])).unwrap(), vec![9; 10]);
    }
}
