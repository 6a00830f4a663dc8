//! The client against a scripted server that misbehaves on purpose: malformed replies must
//! be errors (never panics, never hangs), and a good server's unusual but legal answers
//! (chunks out of order, short block status answers, block size constraints) must work.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::wire::*;
use super::*;

/// The server side of the protocol, as far as these tests need it.
struct Srv<S> {
    s: S,
}

struct Req {
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
}

const BITMAP: &str = "qemu:dirty-bitmap:b0";

impl<S: Read + Write> Srv<S> {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }

    fn put(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    fn opt_reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.put(&m);
    }

    /// Greets and answers options: structured replies, the `contexts` it knows (those
    /// asked for get an id), and `NBD_OPT_GO` for export "e" of `size` bytes.
    fn handshake(&mut self, size: u64, block: Option<(u32, u32, u32)>, contexts: &[(u32, &str)]) {
        self.put(&NBDMAGIC.to_be_bytes());
        self.put(&IHAVEOPT.to_be_bytes());
        self.put(&3u16.to_be_bytes());
        assert_eq!(self.u32(), 3, "client flags");
        loop {
            assert_eq!(self.u64(), IHAVEOPT);
            let option = self.u32();
            let len = self.u32() as usize;
            let data = self.bytes(len);
            match option {
                OPT_STRUCTURED_REPLY => self.opt_reply(option, REP_ACK, &[]),
                OPT_SET_META_CONTEXT => {
                    let n = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
                    let mut at = 4 + n + 4;
                    let mut asked = Vec::new();
                    while at < data.len() {
                        let l = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
                        asked.push(String::from_utf8(data[at + 4..at + 4 + l].to_vec()).unwrap());
                        at += 4 + l;
                    }
                    for (id, name) in contexts {
                        if asked.iter().any(|a| a == name) {
                            let mut d = id.to_be_bytes().to_vec();
                            d.extend_from_slice(name.as_bytes());
                            self.opt_reply(option, REP_META_CONTEXT, &d);
                        }
                    }
                    self.opt_reply(option, REP_ACK, &[]);
                }
                OPT_GO => {
                    if &data[4..5] != b"e" {
                        self.opt_reply(option, REP_ERR_UNKNOWN, b"no such export");
                        continue;
                    }
                    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                    d.extend_from_slice(&size.to_be_bytes());
                    d.extend_from_slice(&1u16.to_be_bytes());
                    self.opt_reply(option, REP_INFO, &d);
                    if let Some((a, b, c)) = block {
                        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        for v in [a, b, c] {
                            d.extend_from_slice(&v.to_be_bytes());
                        }
                        self.opt_reply(option, REP_INFO, &d);
                    }
                    self.opt_reply(option, REP_ACK, &[]);
                    return;
                }
                OPT_ABORT => return,
                _ => self.opt_reply(option, REP_ERR_UNSUP, &[]),
            }
        }
    }

    /// The next request; `None` at a disconnect or the end of the stream.
    fn request(&mut self) -> Option<Req> {
        let mut h = [0u8; 28];
        self.s.read_exact(&mut h).ok()?;
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            REQUEST_MAGIC
        );
        let r = Req {
            command: u16::from_be_bytes(h[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(h[16..24].try_into().unwrap()),
            length: u32::from_be_bytes(h[24..28].try_into().unwrap()),
        };
        (r.command != CMD_DISC).then_some(r)
    }

    fn chunk(&mut self, done: bool, kind: u16, cookie: u64, payload: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        m.extend_from_slice(&u16::from(done).to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        self.put(&m);
    }

    fn data(&mut self, done: bool, cookie: u64, offset: u64, data: &[u8]) {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(data);
        self.chunk(done, REPLY_TYPE_OFFSET_DATA, cookie, &p);
    }

    fn status(&mut self, done: bool, cookie: u64, id: u32, extents: &[(u32, u32)]) {
        let mut p = id.to_be_bytes().to_vec();
        for (l, f) in extents {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        self.chunk(done, REPLY_TYPE_BLOCK_STATUS, cookie, &p);
    }
}

/// A server on a fresh Unix socket that accepts one connection and runs `script` on it.
fn serve<R: Send + 'static>(
    script: impl FnOnce(&mut Srv<UnixStream>) -> R + Send + 'static,
) -> (tempfile::TempDir, PathBuf, JoinHandle<R>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let listener = UnixListener::bind(&path).unwrap();
    let h = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        script(&mut Srv { s })
    });
    (dir, path, h)
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) % 251) as u8)
        .collect()
}

/// Answers reads with `pattern` (honouring the block sizes it asserts) until the client
/// disconnects; returns the (offset, length) of every read.
fn pattern_server<S: Read + Write>(srv: &mut Srv<S>, min: u32, max: u32) -> Vec<(u64, u32)> {
    let mut reads = Vec::new();
    while let Some(r) = srv.request() {
        assert_eq!(r.command, CMD_READ);
        assert!(r.offset % u64::from(min) == 0 && r.length % min == 0 && r.length <= max);
        reads.push((r.offset, r.length));
        srv.data(
            true,
            r.cookie,
            r.offset,
            &pattern(r.offset, r.length as usize),
        );
    }
    reads
}

fn connect(path: &std::path::Path) -> Client {
    Client::connect_unix_timeout(path, "e", &[BITMAP], Duration::from_secs(5)).unwrap()
}

#[test]
fn chunks_in_any_order_and_holes_make_the_read() {
    let (_d, path, h) = serve(|srv| {
        srv.handshake(1 << 20, None, &[]);
        let r = srv.request().unwrap();
        assert_eq!((r.offset, r.length), (4096, 12288));
        srv.data(false, r.cookie, 12288, &[7u8; 4096]);
        let mut hole = 4096u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&4096u32.to_be_bytes());
        srv.chunk(false, REPLY_TYPE_OFFSET_HOLE, r.cookie, &hole);
        srv.data(false, r.cookie, 8192, &[9u8; 4096]);
        srv.chunk(true, REPLY_TYPE_NONE, r.cookie, &[]);
        assert!(srv.request().is_none());
    });
    let mut c = Client::connect_unix(&path, "e", &[]).unwrap();
    assert_eq!(c.size(), 1 << 20);
    let mut buf = vec![1u8; 12288];
    c.read(4096, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0));
    assert!(buf[4096..8192].iter().all(|&b| b == 9));
    assert!(buf[8192..].iter().all(|&b| b == 7));
    c.disconnect().unwrap();
    h.join().unwrap();
}

#[test]
fn reads_keep_the_block_size_constraints() {
    let (_d, path, h) = serve(|srv| {
        srv.handshake(1 << 20, Some((512, 4096, 8192)), &[]);
        pattern_server(srv, 512, 8192)
    });
    let mut c = Client::connect_unix(&path, "e", &[]).unwrap();
    assert_eq!(c.block_sizes(), (512, 4096, 8192));
    for (offset, len) in [(100u64, 20000usize), (1024, 8192), (0, 1), (1048575, 1)] {
        let mut buf = vec![0u8; len];
        c.read(offset, &mut buf).unwrap();
        assert!(buf == pattern(offset, len), "{offset}+{len}");
    }
    let mut buf = [0u8; 2];
    assert!(matches!(
        c.read((1 << 20) - 1, &mut buf),
        Err(NbdError::OutOfRange { .. })
    ));
    drop(c);
    h.join().unwrap();
}

#[test]
fn connect_tcp_on_loopback_only() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut srv = Srv { s };
        srv.handshake(4096, None, &[]);
        pattern_server::<TcpStream>(&mut srv, 1, 1 << 25)
    });
    let mut c = Client::connect_tcp(addr, "e", &[]).unwrap();
    let mut buf = [0u8; 300];
    c.read(10, &mut buf).unwrap();
    assert!(buf[..] == pattern(10, 300)[..]);
    drop(c);
    assert_eq!(h.join().unwrap(), vec![(10, 300)]);
    let far: SocketAddr = "192.0.2.1:10809".parse().unwrap();
    assert!(matches!(
        Client::connect_tcp(far, "e", &[]),
        Err(NbdError::NotLoopback(_))
    ));
}

#[test]
fn short_block_status_answers_are_followed_up_and_clipped() {
    let (_d, path, h) = serve(|srv| {
        srv.handshake(1 << 20, None, &[(7, BITMAP), (9, BASE_ALLOCATION)]);
        let mut asked = Vec::new();
        while let Some(r) = srv.request() {
            assert_eq!(r.command, CMD_BLOCK_STATUS);
            asked.push((r.offset, r.length));
            // Each answer covers 64 KiB, dirty on odd 64 KiB blocks, plus the other
            // context first; the last one reaches past the request.
            srv.status(false, r.cookie, 9, &[(512, 0)]);
            let flags = ((r.offset >> 16) & 1) as u32;
            srv.status(true, r.cookie, 7, &[(65536, flags)]);
        }
        asked
    });
    let mut c = Client::connect_unix(&path, "e", &[BITMAP, BASE_ALLOCATION]).unwrap();
    let got = c.block_status(BITMAP, 65536, 4 * 65536 + 100).unwrap();
    let want: Vec<Extent> = (1..=5u64)
        .map(|i| Extent {
            offset: i * 65536,
            length: if i == 5 { 100 } else { 65536 },
            flags: (i & 1) as u32,
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        c.dirty_ranges(BITMAP, 65536, 4 * 65536 + 100).unwrap(),
        vec![(65536, 65536), (3 * 65536, 65536), (5 * 65536, 100)]
    );
    drop(c);
    let asked = h.join().unwrap();
    assert_eq!(
        asked[..5],
        [
            (65536, 262244),
            (131072, 196708),
            (196608, 131172),
            (262144, 65636),
            (327680, 100)
        ]
    );
}

/// Runs `misbehave` as the answer to the first request (a read of 4096 at 0, or a block
/// status if `status`), and returns what the client made of it and of the request after.
fn after(
    status: bool,
    misbehave: impl FnOnce(&mut Srv<UnixStream>, Req) + Send + 'static,
) -> (NbdError, Result<()>) {
    let (_d, path, h) = serve(move |srv| {
        srv.handshake(1 << 20, None, &[(7, BITMAP)]);
        let r = srv.request().unwrap();
        misbehave(srv, r);
        // The client must not send anything more once the stream is out of step.
        let mut rest = Vec::new();
        let _ = srv.s.read_to_end(&mut rest);
        if !rest.is_empty() {
            let disc = rest.len() == 28 && u16::from_be_bytes([rest[6], rest[7]]) == CMD_DISC;
            assert!(disc, "client sent {} bytes after", rest.len());
        }
    });
    let mut c = connect(&path);
    let mut buf = vec![0u8; 4096];
    let e = if status {
        c.block_status(BITMAP, 0, 4096).map(|_| ())
    } else {
        c.read(0, &mut buf)
    }
    .unwrap_err();
    let next = c.read(0, &mut buf);
    drop(c);
    h.join().unwrap();
    (e, next)
}

fn is_protocol(r: &(NbdError, Result<()>)) -> bool {
    matches!(r.0, NbdError::Protocol(_)) && matches!(r.1, Err(NbdError::Broken))
}

#[test]
fn a_reply_for_another_cookie_breaks_the_connection() {
    let r = after(false, |srv, r| srv.data(true, r.cookie + 1, 0, &[0; 4096]));
    assert!(is_protocol(&r), "{:?}", r.0);
}

#[test]
fn malformed_read_replies_are_protocol_errors() {
    type Script = Box<dyn FnOnce(&mut Srv<UnixStream>, Req) + Send>;
    let cases: Vec<(&str, Script)> = vec![
        (
            "outside",
            Box::new(|s, r| s.data(true, r.cookie, 4000, &[0; 200])),
        ),
        (
            "before",
            Box::new(|s, r| s.data(true, r.cookie, u64::MAX, &[0; 2])),
        ),
        (
            "overlap",
            Box::new(|s, r| {
                s.data(false, r.cookie, 0, &[0; 2048]);
                s.data(true, r.cookie, 2000, &[0; 2096]);
            }),
        ),
        (
            "short",
            Box::new(|s, r| s.data(true, r.cookie, 0, &[0; 4095])),
        ),
        (
            "simple",
            Box::new(|s, r| {
                let mut m = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                m.extend_from_slice(&0u32.to_be_bytes());
                m.extend_from_slice(&r.cookie.to_be_bytes());
                s.put(&m);
            }),
        ),
        (
            "type",
            Box::new(|s, r| s.chunk(true, REPLY_TYPE_BLOCK_STATUS, r.cookie, &[0; 12])),
        ),
        ("magic", Box::new(|s, _| s.put(&[0xde, 0xad, 0xbe, 0xef]))),
        (
            "none",
            Box::new(|s, r| s.chunk(false, REPLY_TYPE_NONE, r.cookie, &[])),
        ),
        (
            "error length",
            Box::new(|s, r| {
                let mut p = 5u32.to_be_bytes().to_vec();
                p.extend_from_slice(&100u16.to_be_bytes());
                p.extend_from_slice(b"short");
                s.chunk(true, REPLY_TYPE_ERROR_BIT | 1, r.cookie, &p);
            }),
        ),
    ];
    for (what, script) in cases {
        let r = after(false, script);
        assert!(is_protocol(&r), "{what}: {:?}", r.0);
    }
}

#[test]
fn malformed_block_status_replies_are_protocol_errors() {
    type Script = Box<dyn FnOnce(&mut Srv<UnixStream>, Req) + Send>;
    let huge = |s: &mut Srv<UnixStream>, r: Req| {
        let mut m = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
        m.extend_from_slice(&r.cookie.to_be_bytes());
        m.extend_from_slice(&0xffff_fff4u32.to_be_bytes());
        s.put(&m);
    };
    let cases: Vec<(&str, Script)> = vec![
        ("huge", Box::new(huge)),
        (
            "zero extent",
            Box::new(|s, r| s.status(true, r.cookie, 7, &[(0, 1)])),
        ),
        (
            "unknown id",
            Box::new(|s, r| s.status(true, r.cookie, 8, &[(4096, 1)])),
        ),
        (
            "missing",
            Box::new(|s, r| s.chunk(true, REPLY_TYPE_NONE, r.cookie, &[])),
        ),
        (
            "repeated",
            Box::new(|s, r| {
                s.status(false, r.cookie, 7, &[(4096, 1)]);
                s.status(true, r.cookie, 7, &[(4096, 1)]);
            }),
        ),
        (
            "odd length",
            Box::new(|s, r| {
                s.chunk(
                    true,
                    REPLY_TYPE_BLOCK_STATUS,
                    r.cookie,
                    &[0, 0, 0, 7, 0, 0, 1, 0, 0, 0, 0, 0, 0],
                )
            }),
        ),
    ];
    for (what, script) in cases {
        let r = after(true, script);
        assert!(is_protocol(&r), "{what}: {:?}", r.0);
    }
}

#[test]
fn a_server_error_is_reported_and_the_connection_stays_usable() {
    let (_d, path, h) = serve(|srv| {
        srv.handshake(1 << 20, None, &[(7, BITMAP)]);
        let r = srv.request().unwrap();
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&7u16.to_be_bytes());
        p.extend_from_slice(b"bad\nsec");
        p.extend_from_slice(&1024u64.to_be_bytes());
        srv.data(false, r.cookie, 0, &[1; 1024]);
        srv.chunk(false, REPLY_TYPE_ERROR_OFFSET, r.cookie, &p);
        srv.data(false, r.cookie, 2048, &[1; 2048]);
        srv.chunk(true, REPLY_TYPE_NONE, r.cookie, &[]);
        let r = srv.request().unwrap();
        let mut m = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&22u32.to_be_bytes());
        m.extend_from_slice(&r.cookie.to_be_bytes());
        srv.put(&m);
        pattern_server(srv, 1, 1 << 25)
    });
    let mut c = connect(&path);
    let mut buf = vec![0u8; 4096];
    let e = c.read(0, &mut buf).unwrap_err();
    assert_eq!(e.to_string(), "NBD read failed: EIO (5) at 1024: bad sec");
    let e = c.block_status(BITMAP, 0, 4096).unwrap_err();
    assert!(matches!(e, NbdError::Server { code: 22, .. }), "{e:?}");
    c.read(0, &mut buf).unwrap();
    assert!(buf == pattern(0, 4096));
    assert!(matches!(
        c.allocation(0, 1),
        Err(NbdError::NotNegotiated(n)) if n == BASE_ALLOCATION
    ));
    drop(c);
    h.join().unwrap();
}

#[test]
fn a_silent_server_times_out_and_a_vanished_one_is_closed() {
    let (_d, path, h) = serve(|srv| {
        srv.handshake(1 << 20, None, &[]);
        let _ = srv.request();
        std::thread::sleep(Duration::from_millis(1500));
    });
    let mut c = Client::connect_unix_timeout(&path, "e", &[], Duration::from_millis(200)).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 512];
    assert!(matches!(c.read(0, &mut buf), Err(NbdError::Timeout(_))));
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(matches!(c.read(0, &mut buf), Err(NbdError::Broken)));
    drop(c);
    h.join().unwrap();

    // Half a chunk, then the server is gone.
    let (_d, path, h) = serve(|srv| {
        srv.handshake(1 << 20, None, &[]);
        let r = srv.request().unwrap();
        let mut m = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        m.extend_from_slice(&r.cookie.to_be_bytes());
        m.extend_from_slice(&(8 + 512u32).to_be_bytes());
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(&[1; 100]);
        srv.put(&m);
    });
    let mut c = Client::connect_unix(&path, "e", &[]).unwrap();
    assert!(matches!(c.read(0, &mut buf), Err(NbdError::Closed)));
    h.join().unwrap();
}

#[test]
fn handshake_refusals_are_named() {
    let (_d, path, h) = serve(|srv| srv.handshake(4096, None, &[(1, BASE_ALLOCATION)]));
    let e = Client::connect_unix(&path, "e", &[BASE_ALLOCATION, BITMAP])
        .err()
        .unwrap();
    assert!(
        matches!(&e, NbdError::UnknownContext(n) if n == BITMAP),
        "{e:?}"
    );
    h.join().unwrap();

    let (_d, path, h) = serve(|srv| srv.handshake(4096, None, &[]));
    let e = Client::connect_unix(&path, "nope", &[]).err().unwrap();
    assert_eq!(
        e.to_string(),
        "NBD server has no export \"nope\": no such export"
    );
    h.join().unwrap();

    let (_d, path, h) = serve(|srv| srv.put(b"HTTP/1.1 400 Bad Request\r\n\r\n"));
    let e = Client::connect_unix(&path, "e", &[]).err().unwrap();
    assert!(matches!(e, NbdError::Protocol(_)), "{e:?}");
    h.join().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let e = Client::connect_unix(dir.path().join("none"), "e", &[])
        .err()
        .unwrap();
    assert!(matches!(e, NbdError::Connect { .. }), "{e:?}");
    let e = Client::connect_unix_timeout(dir.path().join("none"), "e", &[], Duration::ZERO);
    assert!(matches!(e, Err(NbdError::Invalid(_))));
}

#[test]
fn a_unix_connect_to_a_listener_that_never_accepts_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let listener = UnixListener::bind(&path).unwrap();
    // SAFETY: listen(2) on a listening socket that `listener` owns only shrinks its backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let t = Instant::now();
    // Connections fill the backlog (their sockets kept open, never accepted); once it is
    // full the connect itself must time out rather than wait.
    let mut kept = Vec::new();
    let mut connect_timed_out = false;
    for _ in 0..100 {
        match connect_unix_socket(&path, Duration::from_millis(100)) {
            Ok(s) => kept.push(s),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
                connect_timed_out = true;
                break;
            }
        }
    }
    assert!(
        connect_timed_out,
        "{} connections and no timeout",
        kept.len()
    );
    let e = Client::connect_unix_timeout(&path, "e", &[], Duration::from_millis(100));
    assert!(matches!(e, Err(NbdError::Timeout(_))));
    assert!(t.elapsed() < Duration::from_secs(10));
}
