//! A small, blocking NBD client for reading exports and their metadata: what incremental
//! backups need from a QEMU export (libvirt's backup API in pull mode, `block-export-add`,
//! `qemu-nbd`): the data, `base:allocation` and a `qemu:dirty-bitmap:NAME` context.
//!
//! The protocol is the one of `doc/proto.md` in the NBD project; QEMU's `docs/interop/nbd.txt`
//! defines the `qemu:` namespace (`qemu:dirty-bitmap:NAME`, flag bit 0 = dirty).
//!
//! - Handshake: fixed newstyle only (`NBD_FLAG_C_FIXED_NEWSTYLE`, `NBD_FLAG_C_NO_ZEROES` when
//!   offered), then `NBD_OPT_STRUCTURED_REPLY` (required: a server without it is refused),
//!   `NBD_OPT_SET_META_CONTEXT` for the asked contexts (each must be selected, else
//!   `NbdError::UnknownContext`), then `NBD_OPT_GO` asking for `NBD_INFO_BLOCK_SIZE`, whose
//!   constraints the client then keeps: requests are aligned to the minimum block size (an
//!   unaligned read goes through a bounce buffer) and reads are split at the maximum payload
//!   (at most 32 MiB). No TLS, so TCP is refused for anything but a loopback address.
//! - Transmission: one request in flight at a time (simple and correct: every reply read
//!   must carry the cookie of the one request sent). Only reads, block status and disconnect.
//! - The server is not trusted: every length it sends is bounded before use, a reply for
//!   another cookie, a chunk outside the request, overlapping chunks, a read not fully
//!   covered, a missing status chunk are protocol errors; a server error reply (error chunk or
//!   simple reply with an error) is `NbdError::Server` and leaves the connection usable.
//!   After any other error (I/O, timeout, protocol) the stream may be out of step, so the
//!   client refuses further requests (`NbdError::Broken`).
//! - Every socket operation has a timeout (`DEFAULT_TIMEOUT`, or the one given), the Unix
//!   connect included.
//! - `disconnect` sends `NBD_CMD_DISC`; dropping an open client does the same.
//!
//! `server` is the other side: the read-only server of `vmbackup serve`.
//!
//! What `qemu-nbd` 7.2 does (seen in the tests): block sizes 1 / 4096 / 32 MiB; a block status
//! reply covers exactly the requested length (never more, though the protocol allows the
//! last extent to run past it) but holds at most 2^17 extents, so a fragmented dirty bitmap
//! takes several requests; an unknown export is refused already at
//! `NBD_OPT_SET_META_CONTEXT`; it serves one client at a time unless started with
//! `--shared=N`, and a second client's handshake just waits (here: until the timeout).

mod error;
mod handshake;
mod read;
pub mod server;
mod status;
mod wire;

#[cfg(test)]
mod fake_tests;
#[cfg(test)]
mod server_tests;
#[cfg(test)]
mod tests;

use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use wire::*;

/// The timeout of every socket operation unless another is given.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The `base:allocation` metadata context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation`: the extent is not allocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME`: the extent is dirty.
pub const STATE_DIRTY: u32 = 1;

/// The largest read request sent, whatever the server allows.
const MAX_READ: u32 = 1 << 25;
/// The largest block status request: the largest `u32` that is a multiple of every legal
/// minimum block size (a power of two up to 2^16).
const MAX_STATUS_REQUEST: u32 = 0xffff_0000;
/// Most error chunks accepted in one reply.
const MAX_ERROR_CHUNKS: usize = 1024;

pub use error::NbdError;

pub type Result<T> = std::result::Result<T, NbdError>;

/// A range of the export and its status flags in one metadata context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Broken,
    Closed,
}

/// A connection to one export of an NBD server, in the transmission phase.
pub struct Client {
    conn: Conn,
    size: u64,
    flags: u16,
    min_block: u32,
    preferred_block: u32,
    max_payload: u32,
    contexts: Vec<(u32, String)>,
    cookie: u64,
    state: State,
}

/// A Unix stream socket connected to `path` within `timeout`: on Linux a connect to a Unix
/// socket whose listener is not accepting waits for room in its backlog, bounded by the
/// socket's send timeout, which `std`'s `UnixStream::connect` cannot set beforehand.
fn connect_unix_socket(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "socket path empty, too long or with a NUL",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call with constant arguments; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    sock.set_write_timeout(Some(timeout))?;
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: `addr` is an initialised `sockaddr_un` that outlives the call, and `len`
        // does not exceed its size (checked above); the descriptor is owned by `sock`.
        let rc = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
                len as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(sock);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) if Instant::now() < deadline => continue,
            Some(libc::EAGAIN) => return Err(std::io::ErrorKind::TimedOut.into()),
            _ => return Err(e),
        }
    }
}

impl Client {
    /// Connects to the Unix socket `path`, selects the metadata `contexts` and opens the
    /// export `export_name`, with `DEFAULT_TIMEOUT`.
    pub fn connect_unix(
        path: impl AsRef<Path>,
        export_name: &str,
        meta_contexts: &[&str],
    ) -> Result<Client> {
        Self::connect_unix_timeout(path, export_name, meta_contexts, DEFAULT_TIMEOUT)
    }

    /// `connect_unix` with another timeout for every socket operation.
    pub fn connect_unix_timeout(
        path: impl AsRef<Path>,
        export_name: &str,
        meta_contexts: &[&str],
        timeout: Duration,
    ) -> Result<Client> {
        let path = path.as_ref();
        if timeout.is_zero() {
            return Err(NbdError::Invalid("zero timeout".into()));
        }
        let sock = connect_unix_socket(path, timeout).map_err(|source| {
            let target = path.display().to_string();
            match source.kind() {
                std::io::ErrorKind::TimedOut => NbdError::Timeout(timeout),
                _ => NbdError::Connect { target, source },
            }
        })?;
        Self::start(Stream::Unix(sock), export_name, meta_contexts, timeout)
    }

    /// Connects over TCP to `addr`, which must be a loopback address (this client has no
    /// TLS), with `DEFAULT_TIMEOUT`.
    pub fn connect_tcp(
        addr: SocketAddr,
        export_name: &str,
        meta_contexts: &[&str],
    ) -> Result<Client> {
        Self::connect_tcp_timeout(addr, export_name, meta_contexts, DEFAULT_TIMEOUT)
    }

    /// `connect_tcp` with another timeout for every socket operation.
    pub fn connect_tcp_timeout(
        addr: SocketAddr,
        export_name: &str,
        meta_contexts: &[&str],
        timeout: Duration,
    ) -> Result<Client> {
        if !addr.ip().is_loopback() {
            return Err(NbdError::NotLoopback(addr));
        }
        if timeout.is_zero() {
            return Err(NbdError::Invalid("zero timeout".into()));
        }
        let sock =
            TcpStream::connect_timeout(&addr, timeout).map_err(|source| match source.kind() {
                std::io::ErrorKind::TimedOut => NbdError::Timeout(timeout),
                _ => NbdError::Connect {
                    target: addr.to_string(),
                    source,
                },
            })?;
        sock.set_nodelay(true).map_err(NbdError::Io)?;
        Self::start(Stream::Tcp(sock), export_name, meta_contexts, timeout)
    }

    fn start(
        stream: Stream,
        export_name: &str,
        meta_contexts: &[&str],
        timeout: Duration,
    ) -> Result<Client> {
        let mut conn = Conn::new(stream, timeout)?;
        let n = handshake::handshake(&mut conn, export_name, meta_contexts);
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                conn.shutdown();
                return Err(e);
            }
        };
        Ok(Client {
            conn,
            size: n.size,
            flags: n.flags,
            min_block: n.min_block,
            preferred_block: n.preferred_block,
            max_payload: n.max_payload,
            contexts: n.contexts,
            cookie: 0,
            state: State::Open,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The export's transmission flags (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// The server's block size constraints: minimum, preferred, maximum payload.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        (self.min_block, self.preferred_block, self.max_payload)
    }

    /// The names of the selected metadata contexts.
    pub fn meta_contexts(&self) -> impl Iterator<Item = &str> {
        self.contexts.iter().map(|(_, n)| n.as_str())
    }

    /// Changes the timeout of every later socket operation.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        self.conn.set_timeout(timeout)
    }

    /// Reads `buf.len()` bytes at `offset`; holes read as zeroes.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let r = self.read_inner(offset, buf);
        self.settle(r)
    }

    /// The extents of `context` over `offset..offset + length`: consecutive, covering that
    /// range exactly (the server's answers clipped to it), neighbours with equal flags merged.
    pub fn block_status(&mut self, context: &str, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let r = self.block_status_inner(context, offset, length);
        self.settle(r)
    }

    /// The dirty ranges, `(offset, length)`, of the dirty bitmap context `bitmap_context`
    /// (`qemu:dirty-bitmap:NAME`) over `offset..offset + length`, neighbours merged.
    pub fn dirty_ranges(
        &mut self,
        bitmap_context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<(u64, u64)>> {
        let extents = self.block_status(bitmap_context, offset, length)?;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for e in extents.iter().filter(|e| e.flags & STATE_DIRTY != 0) {
            match ranges.last_mut() {
                Some((o, l)) if *o + *l == e.offset => *l += e.length,
                _ => ranges.push((e.offset, e.length)),
            }
        }
        Ok(ranges)
    }

    /// The `base:allocation` extents over `offset..offset + length` (`STATE_HOLE`,
    /// `STATE_ZERO`); the context must have been selected at connect.
    pub fn allocation(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.block_status(BASE_ALLOCATION, offset, length)
    }

    /// Ends the session cleanly (`NBD_CMD_DISC`).
    pub fn disconnect(mut self) -> Result<()> {
        self.close()
    }

    fn close(&mut self) -> Result<()> {
        let was = self.state;
        self.state = State::Closed;
        let r = if was == State::Open {
            self.cookie += 1;
            self.conn.send_request(CMD_DISC, self.cookie, 0, 0)
        } else {
            Ok(())
        };
        self.conn.shutdown();
        r
    }

    /// Marks the connection broken after an error that may have left the stream out of
    /// step, and disconnects when the server says it is shutting down.
    fn settle<T>(&mut self, r: Result<T>) -> Result<T> {
        match &r {
            Err(NbdError::Server { code, .. }) if *code == ESHUTDOWN => {
                let _ = self.close();
            }
            Err(e) if !e.keeps_connection() && self.state == State::Open => {
                self.state = State::Broken;
                self.conn.shutdown();
            }
            _ => {}
        }
        r
    }

    pub(super) fn check_open(&self) -> Result<()> {
        match self.state {
            State::Open => Ok(()),
            State::Broken | State::Closed => Err(NbdError::Broken),
        }
    }

    pub(super) fn check_range(&self, offset: u64, length: u64) -> Result<u64> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size => Ok(end),
            _ => Err(NbdError::OutOfRange {
                offset,
                length,
                size: self.size,
            }),
        }
    }

    pub(super) fn send(&mut self, command: u16, offset: u64, length: u32) -> Result<u64> {
        self.cookie = self.cookie.wrapping_add(1);
        self.conn
            .send_request(command, self.cookie, offset, length)?;
        Ok(self.cookie)
    }

    pub(super) fn align_down(&self, x: u64) -> u64 {
        x - x % u64::from(self.min_block)
    }

    /// `x` rounded up to the minimum block size, but not past the end of the export.
    pub(super) fn align_up(&self, x: u64) -> u64 {
        let m = u64::from(self.min_block);
        x.div_ceil(m).saturating_mul(m).min(self.size)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
