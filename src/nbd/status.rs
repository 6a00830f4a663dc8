//! `NBD_CMD_BLOCK_STATUS`: one request after another until the asked range is covered
//! (a server may answer less), every chunk checked, the answers clipped to the range.

use super::error::ErrorChunk;
use super::wire::*;
use super::{Client, Extent, NbdError, Result, MAX_ERROR_CHUNKS, MAX_STATUS_REQUEST};

impl Client {
    pub(super) fn block_status_inner(
        &mut self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>> {
        let id = match self.contexts.iter().find(|(_, n)| n == context) {
            Some((id, _)) => *id,
            None => return Err(NbdError::NotNegotiated(context.to_string())),
        };
        self.check_open()?;
        let end = self.check_range(offset, length)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let a0 = self.align_down(pos);
            let a1 = self.align_up(end).min(a0 + u64::from(MAX_STATUS_REQUEST));
            let descriptors = self.status_request(id, a0, (a1 - a0) as u32)?;
            let mut at = a0;
            for (len, flags) in descriptors {
                let stop = at.saturating_add(u64::from(len));
                let (s, e) = (at.max(pos), stop.min(end));
                if s < e {
                    match out.last_mut() {
                        Some(last) if last.end() == s && last.flags == flags => {
                            last.length += e - s
                        }
                        _ => out.push(Extent {
                            offset: s,
                            length: e - s,
                            flags,
                        }),
                    }
                }
                at = stop;
                if at >= end {
                    break;
                }
            }
            if at <= pos {
                return Err(NbdError::Protocol(
                    "block status reply makes no progress".into(),
                ));
            }
            pos = at.min(end);
        }
        Ok(out)
    }

    /// One `NBD_CMD_BLOCK_STATUS`: the descriptors `(length, flags)` of context `id`.
    fn status_request(&mut self, id: u32, offset: u64, length: u32) -> Result<Vec<(u32, u32)>> {
        let cookie = self.send(CMD_BLOCK_STATUS, offset, length)?;
        let mut seen: Vec<u32> = Vec::new();
        let mut wanted: Option<Vec<(u32, u32)>> = None;
        let mut failure: Option<NbdError> = None;
        let mut errors = 0usize;
        loop {
            let (done, kind, len) = match self.conn.read_reply_header(cookie)? {
                ReplyHeader::Simple { error: 0 } => {
                    return Err(NbdError::Protocol(
                        "block status without status chunks".into(),
                    ))
                }
                ReplyHeader::Simple { error } => {
                    return Err(NbdError::server(
                        "block status",
                        ErrorChunk {
                            code: error,
                            message: String::new(),
                            offset: None,
                        },
                    ))
                }
                ReplyHeader::Chunk { done, kind, length } => (done, kind, length),
            };
            match kind {
                REPLY_TYPE_BLOCK_STATUS => {
                    if !(12..=MAX_STATUS_CHUNK).contains(&len) || (len - 4) % 8 != 0 {
                        return Err(NbdError::Protocol(format!(
                            "block status chunk of {len} bytes"
                        )));
                    }
                    let ctx = self.conn.read_u32()?;
                    if !self.contexts.iter().any(|(i, _)| *i == ctx) || seen.contains(&ctx) {
                        return Err(NbdError::Protocol(format!(
                            "block status for unknown or repeated context id {ctx}"
                        )));
                    }
                    seen.push(ctx);
                    if ctx != id {
                        self.conn.skip(u64::from(len - 4))?;
                    } else {
                        let raw = self.conn.read_vec(len - 4)?;
                        let mut d = Vec::with_capacity(raw.len() / 8);
                        for c in raw.chunks_exact(8) {
                            let l = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
                            let f = u32::from_be_bytes([c[4], c[5], c[6], c[7]]);
                            if l == 0 {
                                return Err(NbdError::Protocol("extent of length 0".into()));
                            }
                            d.push((l, f));
                        }
                        wanted = Some(d);
                    }
                }
                REPLY_TYPE_NONE => {
                    if len != 0 || !done {
                        return Err(NbdError::Protocol("bad final chunk".into()));
                    }
                }
                k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                    let e = self.conn.read_error_chunk(k, len)?;
                    errors += 1;
                    if errors > MAX_ERROR_CHUNKS {
                        return Err(NbdError::Protocol("too many error chunks".into()));
                    }
                    failure.get_or_insert(NbdError::server("block status", e));
                }
                k => {
                    return Err(NbdError::Protocol(format!(
                        "chunk type {k} in a block status reply"
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
        wanted.ok_or_else(|| NbdError::Protocol("no block status for the context".into()))
    }
}
