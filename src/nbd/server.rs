//! A small read-only NBD server: the protocol of `doc/proto.md` in the NBD project, server
//! side, over any `BlockSource` (the disks of a backup in `serve`; memory in the tests).
//!
//! - Handshake: fixed newstyle only (a client without `NBD_FLAG_C_FIXED_NEWSTYLE` is
//!   dropped), `NBD_FLAG_NO_ZEROES` honoured. Options: `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`,
//!   `NBD_OPT_LIST`, `NBD_OPT_INFO`, `NBD_OPT_GO` (answering `NBD_INFO_EXPORT`,
//!   `NBD_INFO_BLOCK_SIZE` 1 / 4096 / 32 MiB and `NBD_INFO_NAME` when asked),
//!   `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`
//!   (one context: `base:allocation`); any other option is `NBD_REP_ERR_UNSUP` (TLS
//!   included: the server listens on loopback or a UNIX socket only). The empty export name
//!   is the only export when there is one. An option longer than `MAX_OPTION` bytes ends the
//!   connection.
//! - Transmission: `NBD_FLAG_READ_ONLY`, `NBD_FLAG_SEND_FLUSH`, `NBD_FLAG_CAN_MULTI_CONN`
//!   (nothing is ever written, so every connection sees the same bytes) and, with structured
//!   replies, `NBD_FLAG_SEND_DF` (a read is always one data chunk). `READ` (at most
//!   `MAX_REQUEST` bytes, inside the export, else `EINVAL`), `FLUSH` and `CACHE` (nothing to
//!   do), `DISC`, `BLOCK_STATUS` for `base:allocation` (zero chunks are `HOLE|ZERO`; never
//!   past the request; one descriptor with `REQ_ONE`); `WRITE` (its payload read and
//!   dropped), `TRIM`, `WRITE_ZEROES`, `RESIZE` are `EPERM`; anything else `EINVAL`.
//! - A source that cannot give the bytes (a damaged chunk) answers `EIO`, never other data.
//! - Requests of one connection are read by one thread and answered by `WORKERS` threads, so
//!   a client with several requests in flight (QEMU sends up to 16) gets chunks fetched in
//!   parallel; replies may come out of order, as the protocol allows (each carries its
//!   request's cookie), and each is written whole under one lock.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::wire::{
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, NBDMAGIC,
    OPT_ABORT, OPT_GO, OPT_REPLY_MAGIC, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
    REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REP_ACK,
    REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};
use super::{BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};

const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_LIST_META_CONTEXT: u32 = 9;
const REP_SERVER: u32 = 2;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const INFO_NAME: u16 = 1;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_READ_ONLY: u16 = 2;
const TFLAG_SEND_FLUSH: u16 = 4;
const TFLAG_SEND_DF: u16 = 1 << 7;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const CMD_RESIZE: u16 = 8;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;

/// The one metadata context's id.
const BASE_ALLOCATION_ID: u32 = 1;
/// The largest read or block status request answered; also the advertised maximum block size.
pub const MAX_REQUEST: u32 = 32 << 20;
/// The preferred block size advertised.
const PREFERRED_BLOCK: u32 = 4096;
/// The longest option accepted (names and queries are at most 4096 bytes each).
const MAX_OPTION: u32 = 64 * 1024;
/// Most descriptors in one block status reply (the client asks again for the rest).
const MAX_EXTENTS: usize = 1 << 16;
/// Threads answering one connection's requests.
pub const WORKERS: usize = 4;

/// A source cannot give the bytes asked for: answered `EIO`, with `message`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// What an export serves: a read-only range of bytes.
pub trait BlockSource: Send + Sync {
    /// The size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset` (the range lies inside the source).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;
    /// The extents from `offset` covering at most `length` bytes (inside the source), as
    /// (length, reads as zeros), in order; may stop short. By default: all data.
    fn extents(&self, _offset: u64, length: u64) -> Vec<(u64, bool)> {
        vec![(length, false)]
    }
}

/// One export: its name (a disk's target, such as `vda`) and its bytes.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub source: Arc<dyn BlockSource>,
}

/// A connection's socket: UNIX or TCP.
pub enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_read_timeout(t),
            Socket::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn set_blocking(&self) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_nonblocking(false),
            Socket::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_nonblocking(false)
            }
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where the server listens.
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Socket> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Socket::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| Socket::Tcp(s)),
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
    }
}

/// Why `run` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// `stop` said so.
    Asked,
    /// No client was connected for the idle timeout.
    Idle,
}

/// How long a client has for its handshake (from its connection to `NBD_OPT_GO`): one that
/// connects and says nothing would otherwise hold a thread, and keep the idle timeout from
/// ever passing.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `exports` on `listener`, one thread per connection, until `stop()` is true
/// (checked every 100 ms) or, with `idle`, no client was connected for that long. A client
/// that has not chosen its export within `handshake` is dropped. On the way out every
/// connection is shut down and its threads are joined.
pub fn run(
    listener: &Listener,
    exports: Arc<Vec<Export>>,
    idle: Option<Duration>,
    handshake: Duration,
    stop: &dyn Fn() -> bool,
) -> io::Result<Stopped> {
    listener.set_nonblocking()?;
    let open: Arc<Mutex<HashMap<u64, Socket>>> = Arc::default();
    let active = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    let mut next_id = 0u64;
    let mut idle_since = Instant::now();
    let why = loop {
        if stop() {
            break Stopped::Asked;
        }
        if active.load(Ordering::SeqCst) > 0 {
            idle_since = Instant::now();
        } else if idle.is_some_and(|t| idle_since.elapsed() >= t) {
            break Stopped::Idle;
        }
        match listener.accept() {
            Ok(sock) => {
                sock.set_blocking()?;
                let id = next_id;
                next_id += 1;
                if let Ok(c) = sock.try_clone() {
                    open.lock().unwrap_or_else(|e| e.into_inner()).insert(id, c);
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (exports, open, live) = (exports.clone(), open.clone(), active.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("nbd-conn-{id}"))
                    .spawn(move || {
                        tracing::debug!(connection = id, "NBD client connected");
                        if let Err(e) = serve_connection(sock, &exports, handshake) {
                            tracing::debug!(connection = id, error = %e, "NBD connection ended");
                        }
                        open.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                        live.fetch_sub(1, Ordering::SeqCst);
                    });
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        active.fetch_sub(1, Ordering::SeqCst);
                        tracing::warn!(error = %e, "cannot start a thread for an NBD client");
                    }
                }
                threads.retain(|t| !t.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept an NBD client");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    for s in open.lock().unwrap_or_else(|e| e.into_inner()).values() {
        s.shutdown();
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(why)
}

/// What the handshake agreed.
struct Session {
    export: Export,
    structured: bool,
    /// `base:allocation` was selected for this export.
    allocation: bool,
}

/// Serves one client: the handshake (within `limit`), then its requests until it
/// disconnects.
pub fn serve_connection(sock: Socket, exports: &[Export], limit: Duration) -> io::Result<()> {
    // The clone shares the socket, and with it the timeout.
    sock.set_read_timeout(Some(limit))?;
    let mut reader = io::BufReader::with_capacity(64 * 1024, sock.try_clone()?);
    let mut writer = sock;
    let session = match handshake(&mut reader, &mut writer, exports) {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            tracing::warn!(
                "an NBD client did not finish its handshake within {} s: dropped",
                limit.as_secs_f64()
            );
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    writer.set_read_timeout(None)?;
    transmission(reader, writer, session)
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn protocol(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

fn option_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m)
}

/// A cursor over an option's data that says `None` when the data is too short.
struct Data<'a>(&'a [u8]);

impl<'a> Data<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

fn find<'a>(exports: &'a [Export], name: &[u8]) -> Option<&'a Export> {
    if name.is_empty() && exports.len() == 1 {
        return exports.first();
    }
    exports.iter().find(|e| e.name.as_bytes() == name)
}

fn transmission_flags(structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

fn unknown_export(w: &mut impl Write, opt: u32, name: &[u8], exports: &[Export]) -> io::Result<()> {
    let names: Vec<&str> = exports.iter().map(|e| e.name.as_str()).collect();
    let msg = format!(
        "no export {:?}; exports: {}",
        String::from_utf8_lossy(&name[..name.len().min(256)]),
        names.join(", ")
    );
    option_reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes())
}

/// The handshake; `None` when the client aborted or was dropped before choosing an export.
fn handshake(
    r: &mut impl Read,
    w: &mut impl Write,
    exports: &[Export],
) -> io::Result<Option<Session>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello)?;
    let client = read_u32(r)?;
    if client & u32::from(FLAG_FIXED_NEWSTYLE) == 0
        || client & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0
    {
        return Err(protocol("client flags unsupported (fixed newstyle only)"));
    }
    let no_zeroes = client & u32::from(FLAG_NO_ZEROES) != 0;
    let mut structured = false;
    // The export `NBD_OPT_SET_META_CONTEXT` selected `base:allocation` for.
    let mut meta_for: Option<Vec<u8>> = None;
    loop {
        if read_u64(r)? != IHAVEOPT {
            return Err(protocol("bad option magic"));
        }
        let opt = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION {
            return Err(protocol("option too long"));
        }
        let mut data = vec![0; len as usize];
        r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let Some(e) = find(exports, &data) else {
                    // This option has no error reply: the connection is closed.
                    return Ok(None);
                };
                let mut m = Vec::with_capacity(134);
                m.extend_from_slice(&e.source.size().to_be_bytes());
                m.extend_from_slice(&transmission_flags(structured).to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0; 124]);
                }
                w.write_all(&m)?;
                let allocation = structured && meta_for.as_deref() == Some(&data[..]);
                return Ok(Some(Session {
                    export: e.clone(),
                    structured,
                    allocation,
                }));
            }
            OPT_ABORT => {
                let _ = option_reply(w, opt, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for e in exports {
                    let mut d = Vec::with_capacity(4 + e.name.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    option_reply(w, opt, REP_SERVER, &d)?;
                }
                option_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_reply(w, opt, REP_ERR_INVALID, b"takes no data")?;
                    continue;
                }
                structured = true;
                option_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let mut d = Data(&data);
                let parsed = (|| {
                    let name = d.string()?;
                    let n = d.u16()? as usize;
                    let asked: Vec<u16> = (0..n).map(|_| d.u16()).collect::<Option<_>>()?;
                    d.0.is_empty().then_some((name, asked))
                })();
                let Some((name, asked)) = parsed else {
                    option_reply(w, opt, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO")?;
                    continue;
                };
                let Some(e) = find(exports, name) else {
                    unknown_export(w, opt, name, exports)?;
                    continue;
                };
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&e.source.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags(structured).to_be_bytes());
                option_reply(w, opt, REP_INFO, &info)?;
                // Sent whether asked or not: a minimum of 1 constrains no client.
                let mut bs = Vec::with_capacity(14);
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                for v in [1, PREFERRED_BLOCK, MAX_REQUEST] {
                    bs.extend_from_slice(&v.to_be_bytes());
                }
                option_reply(w, opt, REP_INFO, &bs)?;
                if asked.contains(&INFO_NAME) {
                    let mut n = INFO_NAME.to_be_bytes().to_vec();
                    n.extend_from_slice(e.name.as_bytes());
                    option_reply(w, opt, REP_INFO, &n)?;
                }
                option_reply(w, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    let allocation = structured
                        && meta_for
                            .as_deref()
                            .is_some_and(|m| find(exports, m).is_some_and(|x| x.name == e.name));
                    return Ok(Some(Session {
                        export: e.clone(),
                        structured,
                        allocation,
                    }));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !structured {
                    option_reply(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    )?;
                    continue;
                }
                let mut d = Data(&data);
                let parsed = (|| {
                    let name = d.string()?;
                    let n = d.u32()? as usize;
                    let queries: Vec<&[u8]> = (0..n.min(4096))
                        .map(|_| d.string())
                        .collect::<Option<_>>()?;
                    (queries.len() == n && d.0.is_empty()).then_some((name, queries))
                })();
                let Some((name, queries)) = parsed else {
                    option_reply(w, opt, REP_ERR_INVALID, b"malformed meta context option")?;
                    continue;
                };
                if find(exports, name).is_none() {
                    unknown_export(w, opt, name, exports)?;
                    continue;
                }
                let list = opt == OPT_LIST_META_CONTEXT;
                let selected = queries
                    .iter()
                    .any(|q| *q == BASE_ALLOCATION.as_bytes() || (list && (*q == b"base:")))
                    || (list && queries.is_empty());
                if !list {
                    meta_for = selected.then(|| name.to_vec());
                }
                if selected {
                    let id = if list { 0 } else { BASE_ALLOCATION_ID };
                    let mut m = id.to_be_bytes().to_vec();
                    m.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    option_reply(w, opt, REP_META_CONTEXT, &m)?;
                }
                option_reply(w, opt, REP_ACK, &[])?;
            }
            _ => {
                option_reply(w, opt, REP_ERR_UNSUP, b"option not supported")?;
            }
        }
    }
}

/// One request, as read.
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
}

fn simple_reply(cookie: u64, error: u32, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&error.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn chunk_header(m: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, length: u32) {
    m.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&length.to_be_bytes());
}

/// The reply to a request that failed with `error`.
fn error_reply(structured: bool, cookie: u64, error: u32, message: &str) -> Vec<u8> {
    if !structured {
        return simple_reply(cookie, error, &[]);
    }
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut m = Vec::with_capacity(26 + msg.len());
    chunk_header(
        &mut m,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    m.extend_from_slice(&error.to_be_bytes());
    m.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    m.extend_from_slice(msg);
    m
}

/// The reply to a request that succeeded without data.
fn ok_reply(structured: bool, cookie: u64) -> Vec<u8> {
    if !structured {
        return simple_reply(cookie, 0, &[]);
    }
    let mut m = Vec::with_capacity(20);
    chunk_header(&mut m, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    m
}

/// Checks that `offset + length` lies inside an export of `size` bytes and is at most
/// `MAX_REQUEST` long; the error message otherwise.
fn check_range(offset: u64, length: u32, size: u64) -> Result<(), String> {
    if length > MAX_REQUEST {
        return Err(format!("request of {length} bytes: at most {MAX_REQUEST}"));
    }
    match offset.checked_add(u64::from(length)) {
        Some(end) if end <= size => Ok(()),
        _ => Err(format!(
            "range {offset}+{length} is outside the export ({size} bytes)"
        )),
    }
}

/// The reply to `req` on `s`.
fn answer(s: &Session, req: &Request) -> Vec<u8> {
    let st = s.structured;
    let size = s.export.source.size();
    match req.kind {
        CMD_READ => {
            if let Err(m) = check_range(req.offset, req.length, size) {
                return error_reply(st, req.cookie, EINVAL, &m);
            }
            let n = req.length as usize;
            // The reply's header, then the data read in place behind it.
            let head = if st { 28 } else { 16 };
            let mut m = Vec::with_capacity(head + n);
            if st {
                if n == 0 {
                    return ok_reply(st, req.cookie);
                }
                chunk_header(
                    &mut m,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    8 + req.length,
                );
                m.extend_from_slice(&req.offset.to_be_bytes());
            } else {
                m = simple_reply(req.cookie, 0, &[]);
            }
            m.resize(head + n, 0);
            match s.export.source.read_at(req.offset, &mut m[head..]) {
                Ok(()) => m,
                Err(e) => error_reply(st, req.cookie, EIO, &e.0),
            }
        }
        CMD_FLUSH | CMD_CACHE => ok_reply(st, req.cookie),
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_RESIZE => {
            error_reply(st, req.cookie, EPERM, "the export is read-only")
        }
        CMD_BLOCK_STATUS => {
            if !s.allocation {
                return error_reply(st, req.cookie, EINVAL, "no metadata context was negotiated");
            }
            if req.length == 0 {
                return error_reply(st, req.cookie, EINVAL, "zero length");
            }
            // A block status request may be up to 4 GiB: its range is only bounded by size.
            let end = req.offset.checked_add(u64::from(req.length));
            if end.is_none_or(|e| e > size) {
                return error_reply(
                    st,
                    req.cookie,
                    EINVAL,
                    &format!(
                        "range {}+{} is outside the export ({size} bytes)",
                        req.offset, req.length
                    ),
                );
            }
            let mut extents: Vec<(u32, u32)> = Vec::new();
            let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                MAX_EXTENTS
            };
            for (len, zero) in s.export.source.extents(req.offset, u64::from(req.length)) {
                let flags = if zero { STATE_HOLE | STATE_ZERO } else { 0 };
                let len = len.min(u64::from(u32::MAX)) as u32;
                if len == 0 {
                    continue;
                }
                let full = extents.len() >= max;
                match extents.last_mut() {
                    Some((l, f)) if *f == flags => *l = l.saturating_add(len),
                    _ if full => break,
                    _ => extents.push((len, flags)),
                }
            }
            if extents.is_empty() {
                extents.push((req.length, 0));
            }
            let mut m = Vec::with_capacity(24 + 8 * extents.len());
            chunk_header(
                &mut m,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                req.cookie,
                4 + 8 * extents.len() as u32,
            );
            m.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
            for (l, f) in extents {
                m.extend_from_slice(&l.to_be_bytes());
                m.extend_from_slice(&f.to_be_bytes());
            }
            m
        }
        _ => error_reply(st, req.cookie, EINVAL, "unknown command"),
    }
}

/// Reads requests and hands them to the workers until the client disconnects.
fn transmission(mut r: io::BufReader<Socket>, w: Socket, session: Session) -> io::Result<()> {
    let session = Arc::new(session);
    let writer = Arc::new(Mutex::new(w));
    let failed = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::sync_channel::<Request>(WORKERS * 2);
    let rx = Arc::new(Mutex::new(rx));
    let served = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (rx, session, writer, failed, served) = (
                rx.clone(),
                session.clone(),
                writer.clone(),
                failed.clone(),
                served.clone(),
            );
            std::thread::spawn(move || loop {
                let req = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                    Ok(r) => r,
                    Err(_) => return,
                };
                let reply = answer(&session, &req);
                served.fetch_add(1, Ordering::Relaxed);
                let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                if w.write_all(&reply).is_err() {
                    failed.store(true, Ordering::SeqCst);
                    w.shutdown();
                }
            })
        })
        .collect();
    let result = (|| loop {
        if failed.load(Ordering::SeqCst) {
            return Err(protocol("cannot write a reply"));
        }
        let mut h = [0u8; 28];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            // A client that hangs up without `NBD_CMD_DISC`.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let be32 = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let be16 = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        if be32(0) != REQUEST_MAGIC {
            return Err(protocol("bad request magic"));
        }
        let req = Request {
            flags: be16(4),
            kind: be16(6),
            cookie: u64::from_be_bytes(h[8..16].try_into().unwrap_or_default()),
            offset: u64::from_be_bytes(h[16..24].try_into().unwrap_or_default()),
            length: be32(24),
        };
        if req.kind == CMD_DISC {
            return Ok(());
        }
        if req.kind == CMD_WRITE {
            // Its payload is read and dropped, so the next request is read in step.
            let dropped = io::copy(&mut (&mut r).take(u64::from(req.length)), &mut io::sink())?;
            if dropped != u64::from(req.length) {
                return Ok(());
            }
        }
        if tx.send(req).is_err() {
            return Err(protocol("workers gone"));
        }
    })();
    drop(tx);
    for t in workers {
        let _ = t.join();
    }
    tracing::debug!(
        export = %session.export.name,
        requests = served.load(Ordering::Relaxed),
        "NBD client disconnected"
    );
    result
}

/// An export held in memory (tests, and a model of what a source must do).
pub struct MemorySource {
    pub bytes: Vec<u8>,
    /// The size of the blocks `extents` reports on: a block of zeros is a hole.
    pub block: u64,
    /// A block index whose reads fail (a damaged chunk).
    pub bad_block: Option<u64>,
}

impl BlockSource for MemorySource {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        if let Some(b) = self.bad_block {
            let (first, last) = (
                offset / self.block,
                (offset + buf.len() as u64).saturating_sub(1) / self.block,
            );
            if !buf.is_empty() && (first..=last).contains(&b) {
                return Err(SourceError(format!("block {b} is damaged")));
            }
        }
        let o = offset as usize;
        buf.copy_from_slice(&self.bytes[o..o + buf.len()]);
        Ok(())
    }

    fn extents(&self, offset: u64, length: u64) -> Vec<(u64, bool)> {
        let end = offset + length;
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let next = ((at / self.block + 1) * self.block).min(end);
            let zero = self.bytes[at as usize..next as usize]
                .iter()
                .all(|b| *b == 0);
            out.push((next - at, zero));
            at = next;
        }
        out
    }
}
