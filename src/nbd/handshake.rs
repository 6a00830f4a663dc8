//! The fixed newstyle handshake: structured replies, the metadata contexts, then `NBD_OPT_GO`
//! with a request for the server's block size constraints.

use super::wire::*;
use super::NbdError;

/// Most option replies accepted for one option (a reply per context, per information item).
const MAX_REPLIES: usize = 1024;

/// What the handshake settled.
pub(super) struct Negotiated {
    pub(super) size: u64,
    pub(super) flags: u16,
    pub(super) min_block: u32,
    pub(super) preferred_block: u32,
    pub(super) max_payload: u32,
    /// The selected metadata contexts: the server's id, then the name.
    pub(super) contexts: Vec<(u32, String)>,
}

fn check_string(what: &str, s: &str) -> Result<(), NbdError> {
    if s.len() > 4096 || s.contains('\0') {
        return Err(NbdError::Invalid(format!(
            "{what} longer than 4096 bytes or with a NUL"
        )));
    }
    Ok(())
}

/// Runs the handshake on a fresh connection. On a refusal it asks the server to end the
/// session (`NBD_OPT_ABORT`, not waiting for its answer) before returning the error.
pub(super) fn handshake(
    conn: &mut Conn,
    export: &str,
    contexts: &[&str],
) -> Result<Negotiated, NbdError> {
    check_string("export name", export)?;
    let mut wanted: Vec<&str> = Vec::new();
    for &c in contexts {
        check_string("meta context", c)?;
        if !c.contains(':') {
            return Err(NbdError::Invalid(format!(
                "meta context {c:?} has no namespace"
            )));
        }
        if !wanted.contains(&c) {
            wanted.push(c);
        }
    }
    greet(conn)?;
    let result = negotiate(conn, export, &wanted);
    if let Err(e) = &result {
        if e.is_refusal() {
            let _ = conn.send_option(OPT_ABORT, &[]);
        }
    }
    result
}

/// The first exchange: the server's magic numbers and flags, the client's flags.
fn greet(conn: &mut Conn) -> Result<(), NbdError> {
    if conn.read_u64()? != NBDMAGIC {
        return Err(NbdError::Protocol("not an NBD server".into()));
    }
    match conn.read_u64()? {
        IHAVEOPT => {}
        CLISERV_MAGIC => return Err(NbdError::Unsupported("newstyle negotiation")),
        _ => return Err(NbdError::Protocol("bad handshake magic".into())),
    }
    let server_flags = conn.read_u16()?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Unsupported("fixed newstyle negotiation"));
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
    conn.write_all(&client_flags.to_be_bytes())
}

fn refused(option: &'static str, reply: &OptionReply) -> NbdError {
    NbdError::OptionRefused {
        option,
        reason: rep_err_name(reply.kind),
        message: display_string(&reply.data),
    }
}

fn unexpected(option: &str, reply: &OptionReply) -> NbdError {
    NbdError::Protocol(format!(
        "unexpected reply type {:#x} to {option}",
        reply.kind
    ))
}

fn negotiate(conn: &mut Conn, export: &str, wanted: &[&str]) -> Result<Negotiated, NbdError> {
    conn.send_option(OPT_STRUCTURED_REPLY, &[])?;
    let reply = conn.read_option_reply(OPT_STRUCTURED_REPLY)?;
    match reply.kind {
        REP_ACK => {}
        REP_ERR_UNSUP => return Err(NbdError::Unsupported("structured replies")),
        k if k & REP_ERR != 0 => return Err(refused("NBD_OPT_STRUCTURED_REPLY", &reply)),
        _ => return Err(unexpected("NBD_OPT_STRUCTURED_REPLY", &reply)),
    }
    let contexts = if wanted.is_empty() {
        Vec::new()
    } else {
        set_meta_contexts(conn, export, wanted)?
    };
    let mut n = go(conn, export)?;
    n.contexts = contexts;
    Ok(n)
}

/// Length-prefixed string, as the options carry them.
fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn set_meta_contexts(
    conn: &mut Conn,
    export: &str,
    wanted: &[&str],
) -> Result<Vec<(u32, String)>, NbdError> {
    let mut data = Vec::new();
    put_string(&mut data, export);
    data.extend_from_slice(&(wanted.len() as u32).to_be_bytes());
    for c in wanted {
        put_string(&mut data, c);
    }
    conn.send_option(OPT_SET_META_CONTEXT, &data)?;
    let mut selected: Vec<(u32, String)> = Vec::new();
    for _ in 0..MAX_REPLIES {
        let reply = conn.read_option_reply(OPT_SET_META_CONTEXT)?;
        match reply.kind {
            REP_META_CONTEXT => {
                if reply.data.len() < 4 {
                    return Err(NbdError::Protocol("short meta context reply".into()));
                }
                let id = u32::from_be_bytes([
                    reply.data[0],
                    reply.data[1],
                    reply.data[2],
                    reply.data[3],
                ]);
                let name = String::from_utf8(reply.data[4..].to_vec())
                    .map_err(|_| NbdError::Protocol("meta context name is not UTF-8".into()))?;
                if selected.iter().any(|(i, n)| *i == id || *n == name) {
                    return Err(NbdError::Protocol(format!(
                        "meta context {name:?} (id {id}) selected twice"
                    )));
                }
                selected.push((id, name));
            }
            REP_ACK => {
                if let Some(missing) = wanted
                    .iter()
                    .find(|w| !selected.iter().any(|(_, n)| n == *w))
                {
                    return Err(NbdError::UnknownContext(missing.to_string()));
                }
                return Ok(selected);
            }
            REP_ERR_UNKNOWN => {
                return Err(NbdError::UnknownExport {
                    name: export.to_string(),
                    message: display_string(&reply.data),
                })
            }
            REP_ERR_UNSUP => return Err(NbdError::Unsupported("meta contexts")),
            k if k & REP_ERR != 0 => return Err(refused("NBD_OPT_SET_META_CONTEXT", &reply)),
            _ => return Err(unexpected("NBD_OPT_SET_META_CONTEXT", &reply)),
        }
    }
    Err(NbdError::Protocol("too many meta context replies".into()))
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn go(conn: &mut Conn, export: &str) -> Result<Negotiated, NbdError> {
    let mut data = Vec::new();
    put_string(&mut data, export);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    conn.send_option(OPT_GO, &data)?;
    let mut export_info: Option<(u64, u16)> = None;
    // The defaults when the server states no constraints.
    let (mut min_block, mut preferred_block, mut max_payload) = (1u32, 4096u32, 1u32 << 25);
    for _ in 0..MAX_REPLIES {
        let reply = conn.read_option_reply(OPT_GO)?;
        let d = &reply.data;
        match reply.kind {
            REP_INFO => {
                if d.len() < 2 {
                    return Err(NbdError::Protocol("short info reply".into()));
                }
                match u16::from_be_bytes([d[0], d[1]]) {
                    INFO_EXPORT => {
                        if d.len() != 12 {
                            return Err(NbdError::Protocol("bad export info length".into()));
                        }
                        let mut size = [0u8; 8];
                        size.copy_from_slice(&d[2..10]);
                        export_info =
                            Some((u64::from_be_bytes(size), u16::from_be_bytes([d[10], d[11]])));
                    }
                    INFO_BLOCK_SIZE => {
                        if d.len() != 14 {
                            return Err(NbdError::Protocol("bad block size info length".into()));
                        }
                        (min_block, preferred_block, max_payload) =
                            (be_u32(&d[2..]), be_u32(&d[6..]), be_u32(&d[10..]));
                        let valid = min_block.is_power_of_two()
                            && min_block <= 1 << 16
                            && preferred_block.is_power_of_two()
                            && preferred_block >= min_block.max(512)
                            && max_payload >= preferred_block;
                        if !valid {
                            return Err(NbdError::Protocol(format!(
                                "bad block sizes {min_block}/{preferred_block}/{max_payload}"
                            )));
                        }
                    }
                    // Names, descriptions and whatever else a server adds: not needed.
                    _ => {}
                }
            }
            REP_ACK => {
                let Some((size, flags)) = export_info else {
                    return Err(NbdError::Protocol("NBD_OPT_GO without export info".into()));
                };
                return Ok(Negotiated {
                    size,
                    flags,
                    min_block,
                    preferred_block,
                    max_payload,
                    contexts: Vec::new(),
                });
            }
            REP_ERR_UNKNOWN => {
                return Err(NbdError::UnknownExport {
                    name: export.to_string(),
                    message: display_string(d),
                })
            }
            REP_ERR_UNSUP => return Err(NbdError::Unsupported("NBD_OPT_GO")),
            k if k & REP_ERR != 0 => return Err(refused("NBD_OPT_GO", &reply)),
            _ => return Err(unexpected("NBD_OPT_GO", &reply)),
        }
    }
    Err(NbdError::Protocol("too many info replies".into()))
}
