//! The bytes of the NBD protocol: its constants, the socket with its timeouts, and the framing
//! of option replies and of transmission replies. Every length that comes from the server is
//! bounded here before anything is allocated for it.

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::error::{ErrorChunk, NbdError};

pub(super) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub(super) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub(super) const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
pub(super) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(super) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(super) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(super) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server) and client flags share these two bits.
pub(super) const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub(super) const FLAG_NO_ZEROES: u16 = 2;

pub(super) const OPT_ABORT: u32 = 2;
pub(super) const OPT_GO: u32 = 7;
pub(super) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(super) const OPT_SET_META_CONTEXT: u32 = 10;

pub(super) const REP_ACK: u32 = 1;
pub(super) const REP_INFO: u32 = 3;
pub(super) const REP_META_CONTEXT: u32 = 4;
pub(super) const REP_ERR: u32 = 1 << 31;
pub(super) const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub(super) const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;

pub(super) const INFO_EXPORT: u16 = 0;
pub(super) const INFO_BLOCK_SIZE: u16 = 3;

pub(super) const CMD_READ: u16 = 0;
pub(super) const CMD_DISC: u16 = 2;
pub(super) const CMD_BLOCK_STATUS: u16 = 7;

pub(super) const REPLY_FLAG_DONE: u16 = 1;
pub(super) const REPLY_TYPE_NONE: u16 = 0;
pub(super) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(super) const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub(super) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub(super) const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub(super) const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

/// `NBD_ESHUTDOWN`: the server is going away; the client must disconnect.
pub(super) const ESHUTDOWN: u32 = 108;

/// The longest option reply accepted: strings are at most 4096 bytes, so anything longer
/// than a few of them is not a reply this client asked for.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// The longest error chunk accepted (a 4096-byte message and a few fixed fields).
pub(super) const MAX_ERROR_CHUNK: u32 = 16 * 1024;
/// The longest block status chunk accepted: the specification's 2^20 descriptors.
pub(super) const MAX_STATUS_CHUNK: u32 = 4 + 8 * (1 << 20);

/// The name of an option reply error.
pub(super) fn rep_err_name(kind: u32) -> &'static str {
    match kind {
        REP_ERR_UNSUP => "unsupported",
        0x8000_0002 => "forbidden by policy",
        0x8000_0003 => "invalid",
        0x8000_0004 => "unsupported on this platform",
        0x8000_0005 => "TLS required",
        REP_ERR_UNKNOWN => "unknown export",
        0x8000_0007 => "shutting down",
        0x8000_0008 => "block size required",
        0x8000_0009 => "too big",
        _ => "error",
    }
}

/// A server string shown to a person: lossy UTF-8, control characters replaced, cut short.
pub(super) fn display_string(bytes: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    s.trim().to_string()
}

pub(super) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The connection: reads go through a buffer, writes go straight to the socket (every
/// message is written whole with one `write_all`). Every socket error becomes an `NbdError`.
pub(super) struct Conn {
    reader: BufReader<Stream>,
    timeout: Duration,
}

impl Conn {
    pub(super) fn new(stream: Stream, timeout: Duration) -> Result<Conn, NbdError> {
        let mut conn = Conn {
            reader: BufReader::with_capacity(64 * 1024, stream),
            timeout,
        };
        conn.set_timeout(timeout)?;
        Ok(conn)
    }

    pub(super) fn set_timeout(&mut self, t: Duration) -> Result<(), NbdError> {
        if t.is_zero() {
            return Err(NbdError::Invalid("zero timeout".into()));
        }
        self.reader
            .get_ref()
            .set_timeouts(t)
            .map_err(NbdError::Io)?;
        self.timeout = t;
        Ok(())
    }

    pub(super) fn shutdown(&self) {
        self.reader.get_ref().shutdown();
    }

    fn map(&self, e: io::Error) -> NbdError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => NbdError::Timeout(self.timeout),
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => NbdError::Closed,
            _ => NbdError::Io(e),
        }
    }

    pub(super) fn write_all(&mut self, buf: &[u8]) -> Result<(), NbdError> {
        self.reader
            .get_mut()
            .write_all(buf)
            .map_err(|e| self.map(e))
    }

    pub(super) fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), NbdError> {
        self.reader.read_exact(buf).map_err(|e| self.map(e))
    }

    pub(super) fn read_vec(&mut self, len: u32) -> Result<Vec<u8>, NbdError> {
        let mut v = vec![0u8; len as usize];
        self.read_exact(&mut v)?;
        Ok(v)
    }

    /// Reads and drops `len` bytes.
    pub(super) fn skip(&mut self, mut len: u64) -> Result<(), NbdError> {
        let mut scratch = [0u8; 8192];
        while len > 0 {
            let n = len.min(scratch.len() as u64) as usize;
            self.read_exact(&mut scratch[..n])?;
            len -= n as u64;
        }
        Ok(())
    }

    pub(super) fn read_u16(&mut self) -> Result<u16, NbdError> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    pub(super) fn read_u32(&mut self) -> Result<u32, NbdError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    pub(super) fn read_u64(&mut self) -> Result<u64, NbdError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Sends one option of the fixed newstyle negotiation.
    pub(super) fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::Invalid("option data too long".into()))?;
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(data);
        self.write_all(&msg)
    }

    /// Reads one reply to `option`; its data is bounded by `MAX_OPTION_REPLY`.
    pub(super) fn read_option_reply(&mut self, option: u32) -> Result<OptionReply, NbdError> {
        if self.read_u64()? != OPT_REPLY_MAGIC {
            return Err(NbdError::Protocol("bad option reply magic".into()));
        }
        let got = self.read_u32()?;
        if got != option {
            return Err(NbdError::Protocol(format!(
                "reply to option {got} while option {option} was sent"
            )));
        }
        let kind = self.read_u32()?;
        let len = self.read_u32()?;
        if len > MAX_OPTION_REPLY {
            return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
        }
        let data = self.read_vec(len)?;
        Ok(OptionReply { kind, data })
    }

    /// Sends one transmission request.
    pub(super) fn send_request(
        &mut self,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    ) -> Result<(), NbdError> {
        let mut msg = [0u8; 28];
        msg[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        // Bytes 4..6 are the command flags: this client sets none.
        msg[6..8].copy_from_slice(&command.to_be_bytes());
        msg[8..16].copy_from_slice(&cookie.to_be_bytes());
        msg[16..24].copy_from_slice(&offset.to_be_bytes());
        msg[24..28].copy_from_slice(&length.to_be_bytes());
        self.write_all(&msg)
    }

    /// Reads the header of the next reply message, which must carry `cookie`.
    pub(super) fn read_reply_header(&mut self, cookie: u64) -> Result<ReplyHeader, NbdError> {
        let header = match self.read_u32()? {
            SIMPLE_REPLY_MAGIC => {
                let error = self.read_u32()?;
                let got = self.read_u64()?;
                (ReplyHeader::Simple { error }, got)
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = self.read_u16()?;
                let kind = self.read_u16()?;
                let got = self.read_u64()?;
                let length = self.read_u32()?;
                (
                    ReplyHeader::Chunk {
                        done: flags & REPLY_FLAG_DONE != 0,
                        kind,
                        length,
                    },
                    got,
                )
            }
            magic => return Err(NbdError::Protocol(format!("bad reply magic {magic:#010x}"))),
        };
        if header.1 != cookie {
            return Err(NbdError::Protocol(format!(
                "reply for unknown cookie {:#x}",
                header.1
            )));
        }
        Ok(header.0)
    }

    /// Reads the payload of an error chunk (`kind` has bit 15 set) of `length` bytes.
    pub(super) fn read_error_chunk(
        &mut self,
        kind: u16,
        length: u32,
    ) -> Result<ErrorChunk, NbdError> {
        let fixed = if kind == REPLY_TYPE_ERROR_OFFSET {
            14
        } else {
            6
        };
        if !(fixed..=MAX_ERROR_CHUNK).contains(&length) {
            return Err(NbdError::Protocol(format!("error chunk of {length} bytes")));
        }
        let data = self.read_vec(length)?;
        let code = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
        let msg_len = u16::from_be_bytes([data[4], data[5]]) as usize;
        if code == 0 {
            return Err(NbdError::Protocol("error chunk with error 0".into()));
        }
        if msg_len > data.len() - fixed as usize {
            return Err(NbdError::Protocol(
                "error message overruns its chunk".into(),
            ));
        }
        let message = display_string(&data[6..6 + msg_len]);
        let offset = if kind == REPLY_TYPE_ERROR_OFFSET {
            let at = 6 + msg_len;
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[at..at + 8]);
            Some(u64::from_be_bytes(b))
        } else {
            None
        };
        Ok(ErrorChunk {
            code,
            message,
            offset,
        })
    }
}

pub(super) struct OptionReply {
    pub(super) kind: u32,
    pub(super) data: Vec<u8>,
}

pub(super) enum ReplyHeader {
    Simple { error: u32 },
    Chunk { done: bool, kind: u16, length: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::error::errno_name;

    #[test]
    fn server_strings_are_made_displayable() {
        assert_eq!(
            display_string(b"no such\nexport\x00 \xff"),
            "no such export  \u{fffd}"
        );
        assert_eq!(display_string(&[b'a'; 5000]).len(), 4096);
    }

    #[test]
    fn error_names() {
        assert_eq!(errno_name(22), "EINVAL");
        assert_eq!(errno_name(7), "unknown error");
        assert_eq!(rep_err_name(REP_ERR_UNKNOWN), "unknown export");
    }
}
