//! `NBD_CMD_READ` with structured replies: split at the maximum payload, aligned to the
//! minimum block size, every chunk checked against the request before its data is read.

use std::collections::BTreeMap;

use super::wire::*;
use super::{Client, NbdError, Result, MAX_ERROR_CHUNKS, MAX_READ};

impl Client {
    pub(super) fn read_inner(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_open()?;
        let end = self.check_range(offset, buf.len() as u64)?;
        let min = u64::from(self.min_block);
        let chunk = u64::from(self.max_payload.min(MAX_READ));
        let chunk = (chunk - chunk % min).max(min);
        let mut bounce = Vec::new();
        let mut pos = offset;
        while pos < end {
            let a0 = self.align_down(pos);
            let a1 = self.align_up(end).min(a0 + chunk);
            let at = (pos - offset) as usize;
            if a0 == pos && a1 <= end {
                self.read_request(a0, &mut buf[at..at + (a1 - a0) as usize])?;
                pos = a1;
            } else {
                bounce.resize((a1 - a0) as usize, 0);
                self.read_request(a0, &mut bounce)?;
                let stop = a1.min(end);
                let from = (pos - a0) as usize;
                buf[at..at + (stop - pos) as usize]
                    .copy_from_slice(&bounce[from..from + (stop - pos) as usize]);
                pos = stop;
            }
        }
        Ok(())
    }

    /// One `NBD_CMD_READ` of `buf.len()` (at most `u32::MAX`) bytes at `offset`.
    fn read_request(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let length = buf.len() as u64;
        let cookie = self.send(CMD_READ, offset, length as u32)?;
        // Content chunks seen so far: start -> end, relative to `offset`, never overlapping.
        let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
        let mut total = 0u64;
        let mut failure: Option<NbdError> = None;
        let mut errors = 0usize;
        loop {
            let (done, kind, len) = match self.conn.read_reply_header(cookie)? {
                ReplyHeader::Simple { .. } => {
                    return Err(NbdError::Protocol("simple reply to a read".into()))
                }
                ReplyHeader::Chunk { done, kind, length } => (done, kind, length),
            };
            match kind {
                REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                    let bad = |what: &str| NbdError::Protocol(format!("read reply: {what}"));
                    if kind == REPLY_TYPE_OFFSET_DATA && len < 9 {
                        return Err(bad("short data chunk"));
                    }
                    if kind == REPLY_TYPE_OFFSET_HOLE && len != 12 {
                        return Err(bad("bad hole chunk length"));
                    }
                    let at = self.conn.read_u64()?;
                    let n = if kind == REPLY_TYPE_OFFSET_DATA {
                        u64::from(len - 8)
                    } else {
                        u64::from(self.conn.read_u32()?)
                    };
                    let start = at.wrapping_sub(offset);
                    if n == 0 || at < offset || start > length || n > length - start {
                        return Err(bad("chunk outside the request"));
                    }
                    let stop = start + n;
                    let before = covered.range(..stop).next_back();
                    if before.is_some_and(|(_, &e)| e > start) {
                        return Err(bad("overlapping chunks"));
                    }
                    covered.insert(start, stop);
                    total += n;
                    let dst = &mut buf[start as usize..stop as usize];
                    if kind == REPLY_TYPE_OFFSET_DATA {
                        self.conn.read_exact(dst)?;
                    } else {
                        dst.fill(0);
                    }
                }
                REPLY_TYPE_NONE => {
                    if len != 0 || !done {
                        return Err(NbdError::Protocol("bad final chunk".into()));
                    }
                }
                k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                    let e = self.conn.read_error_chunk(k, len)?;
                    if e.offset.is_some_and(|o| o < offset || o - offset >= length) {
                        return Err(NbdError::Protocol("error offset outside the read".into()));
                    }
                    errors += 1;
                    if errors > MAX_ERROR_CHUNKS {
                        return Err(NbdError::Protocol("too many error chunks".into()));
                    }
                    failure.get_or_insert(NbdError::server("read", e));
                }
                k => {
                    return Err(NbdError::Protocol(format!(
                        "chunk type {k} in a read reply"
                    )))
                }
            }
            if done {
                break;
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if total != length {
            return Err(NbdError::Protocol(format!(
                "read reply covers {total} of {length} bytes"
            )));
        }
        Ok(())
    }
}
