//! The server over in-memory exports: raw protocol bytes for the handshake and the errors,
//! and this crate's own client for data and block status.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::server::{self, Export, Listener, MemorySource, Stopped, EINVAL, EIO, EPERM};
use super::wire::*;
use super::{Client, NbdError, STATE_HOLE, STATE_ZERO};

const BLOCK: u64 = 64 * 1024;

/// 1 MiB of a pattern with zero blocks 3, 4 and 9; a second export of 3 bytes short of 256 KiB.
fn exports(bad_block: Option<u64>) -> Vec<Export> {
    let mut a: Vec<u8> = (0..1u64 << 20).map(|i| (i * 31 % 251) as u8 + 1).collect();
    for b in [3u64, 4, 9] {
        a[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].fill(0);
    }
    let b: Vec<u8> = (0..256 * 1024 - 3).map(|i| (i % 7) as u8 + 9).collect();
    vec![
        Export {
            name: "vda".into(),
            source: Arc::new(MemorySource {
                bytes: a,
                block: BLOCK,
                bad_block,
            }),
        },
        Export {
            name: "vdb".into(),
            source: Arc::new(MemorySource {
                bytes: b,
                block: BLOCK,
                bad_block: None,
            }),
        },
    ]
}

fn expected(name: &str) -> Vec<u8> {
    let e = exports(None);
    let src = &e.iter().find(|e| e.name == name).unwrap().source;
    let mut v = vec![0; src.size() as usize];
    src.read_at(0, &mut v).unwrap();
    v
}

/// A server on a socket in a temporary folder, stopped when dropped.
struct Running {
    _dir: tempfile::TempDir,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Stopped>>,
}

impl Running {
    fn start(exports: Vec<Export>, idle: Option<Duration>) -> Running {
        Running::start_with(exports, idle, server::HANDSHAKE_TIMEOUT)
    }

    fn start_with(exports: Vec<Export>, idle: Option<Duration>, handshake: Duration) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let listener = Listener::Unix(UnixListener::bind(&path).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            server::run(&listener, Arc::new(exports), idle, handshake, &|| {
                s.load(Ordering::SeqCst)
            })
            .unwrap()
        });
        Running {
            _dir: dir,
            path,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Stopped {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client speaking raw protocol bytes.
struct Raw(UnixStream);

impl Raw {
    /// Connects and reads the greeting; sends the client flags.
    fn connect(r: &Running, flags: u32) -> Raw {
        let s = UnixStream::connect(&r.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut raw = Raw(s);
        assert_eq!(raw.u64(), NBDMAGIC);
        assert_eq!(raw.u64(), IHAVEOPT);
        assert_eq!(raw.u16(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        raw.0.write_all(&flags.to_be_bytes()).unwrap();
        raw
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.0.read_exact(&mut b).unwrap();
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }

    /// One option reply: (type, data).
    fn reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC);
        assert_eq!(self.u32(), opt);
        let kind = self.u32();
        let len = self.u32() as usize;
        (kind, self.bytes(len))
    }

    /// `NBD_OPT_GO` for `name`; the export's size and transmission flags.
    fn go(&mut self, name: &str) -> (u64, u16) {
        self.option(OPT_GO, &go_data(name, &[]));
        let (mut size, mut flags) = (None, None);
        loop {
            let (kind, d) = self.reply(OPT_GO);
            match kind {
                REP_ACK => break,
                REP_INFO if d[..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap()));
                    flags = Some(u16::from_be_bytes(d[10..12].try_into().unwrap()));
                }
                REP_INFO => {}
                k => panic!("reply {k:#x} to NBD_OPT_GO"),
            }
        }
        (size.unwrap(), flags.unwrap())
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&length.to_be_bytes());
        m.extend_from_slice(payload);
        self.0.write_all(&m).unwrap();
    }

    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        (self.u32(), self.u64())
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

fn go_data(name: &str, info: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(info.len() as u16).to_be_bytes());
    for i in info {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

const FLAGS: u32 = (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) as u32;

#[test]
fn options_list_info_unknown_export_unsupported_option_and_abort() {
    let r = Running::start(exports(None), None);
    let mut c = Raw::connect(&r, FLAGS);

    c.option(3, &[]);
    let mut names = Vec::new();
    loop {
        match c.reply(3) {
            (REP_ACK, _) => break,
            (2, d) => {
                let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
            }
            (k, _) => panic!("reply {k:#x} to NBD_OPT_LIST"),
        }
    }
    assert_eq!(names, ["vda", "vdb"]);
    c.option(3, b"x");
    assert_eq!(
        c.reply(3).0,
        REP_ERR | 3,
        "NBD_OPT_LIST with data is invalid"
    );

    // NBD_OPT_INFO: the size, read-only, the block sizes and the name when asked.
    c.option(6, &go_data("vdb", &[1, INFO_BLOCK_SIZE]));
    let mut infos = Vec::new();
    loop {
        match c.reply(6) {
            (REP_ACK, _) => break,
            (REP_INFO, d) => infos.push(d),
            (k, _) => panic!("reply {k:#x} to NBD_OPT_INFO"),
        }
    }
    let export = infos.iter().find(|d| d[..2] == [0, 0]).unwrap();
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap()),
        256 * 1024 - 3
    );
    let flags = u16::from_be_bytes(export[10..12].try_into().unwrap());
    assert_eq!(flags & 3, 3, "has flags, read-only");
    let bs = infos.iter().find(|d| d[..2] == [0, 3]).unwrap();
    assert_eq!(
        u32::from_be_bytes(bs[2..6].try_into().unwrap()),
        1,
        "minimum block size 1"
    );
    assert!(infos.iter().any(|d| d[..2] == [0, 1] && &d[2..] == b"vdb"));

    c.option(6, &go_data("vdz", &[]));
    let (kind, msg) = c.reply(6);
    assert_eq!(kind, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("vda, vdb"));
    c.option(6, &go_data("vdb", &[])[..5]);
    assert_eq!(c.reply(6).0, REP_ERR | 3, "truncated NBD_OPT_INFO");
    c.option(5, &[]);
    assert_eq!(c.reply(5).0, REP_ERR_UNSUP, "no TLS");
    c.option(77, b"whatever");
    assert_eq!(c.reply(77).0, REP_ERR_UNSUP);
    c.option(
        OPT_SET_META_CONTEXT,
        &meta_data("vda", &[BASE_ALLOCATION_NAME]),
    );
    assert_eq!(
        c.reply(OPT_SET_META_CONTEXT).0,
        REP_ERR | 3,
        "meta contexts need structured replies first"
    );
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply(OPT_ABORT).0, REP_ACK);
    assert!(c.closed());

    // A client without fixed newstyle is dropped.
    let mut old = Raw::connect(&r, 0);
    assert!(old.closed());
    assert_eq!(r.stop(), Stopped::Asked);
}

const BASE_ALLOCATION_NAME: &str = super::BASE_ALLOCATION;

#[test]
fn simple_replies_read_at_odd_places_refuse_writes_and_out_of_range_reads() {
    let r = Running::start(exports(None), None);
    let mut c = Raw::connect(&r, FLAGS);
    let (size, flags) = c.go("vda");
    assert_eq!(size, 1 << 20);
    assert_eq!(flags & 2, 2, "read-only");
    let want = expected("vda");
    for (i, (off, len)) in [
        (0u64, 1u32),
        (1, 511),
        (65_535, 3),
        (BLOCK * 3 - 7, 70_001),
        ((1 << 20) - 1, 1),
    ]
    .into_iter()
    .enumerate()
    {
        c.request(0, i as u64, off, len, &[]);
        assert_eq!(c.simple(), (0, i as u64));
        assert_eq!(
            c.bytes(len as usize),
            &want[off as usize..(off + u64::from(len)) as usize],
            "read {off}+{len}"
        );
    }
    c.request(0, 50, (1 << 20) - 1, 2, &[]);
    assert_eq!(c.simple(), (EINVAL, 50), "a read past the end");
    c.request(0, 51, u64::MAX - 1, 4, &[]);
    assert_eq!(c.simple(), (EINVAL, 51), "an offset that overflows");
    // A write is refused, and its payload does not break the stream.
    c.request(1, 60, 0, 5, b"hello");
    assert_eq!(c.simple(), (EPERM, 60));
    for kind in [4u16, 6] {
        c.request(kind, 61, 0, 4096, &[]);
        assert_eq!(c.simple(), (EPERM, 61), "trim, write zeroes");
    }
    c.request(3, 62, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 62), "flush");
    c.request(7, 63, 0, 4096, &[]);
    assert_eq!(c.simple(), (EINVAL, 63), "block status without a context");
    c.request(0, 64, 0, 2, &[]);
    assert_eq!(c.simple(), (0, 64));
    assert_eq!(c.bytes(2), &want[..2], "nothing was written");
    c.request(2, 65, 0, 0, &[]);
    assert!(c.closed(), "NBD_CMD_DISC closes the connection");

    // NBD_OPT_EXPORT_NAME, the old way in, with the 124 zero bytes.
    let mut old = Raw::connect(&r, FLAG_FIXED_NEWSTYLE as u32);
    old.option(1, b"vdb");
    assert_eq!(old.u64(), 256 * 1024 - 3);
    assert_eq!(old.u16() & 3, 3);
    assert_eq!(old.bytes(124), vec![0; 124]);
    old.request(0, 1, 256 * 1024 - 5, 2, &[]);
    assert_eq!(old.simple(), (0, 1));
    assert_eq!(old.bytes(2), &expected("vdb")[256 * 1024 - 5..]);
    let mut gone = Raw::connect(&r, FLAGS);
    gone.option(1, b"nope");
    assert!(gone.closed(), "an unknown export name ends the connection");
}

#[test]
fn structured_reads_block_status_and_a_damaged_block_through_the_client() {
    let r = Running::start(exports(Some(6)), None);
    let mut c = Client::connect_unix(&r.path, "vda", &[super::BASE_ALLOCATION]).unwrap();
    assert_eq!(c.size(), 1 << 20);
    let want = expected("vda");
    for (off, len) in [
        (0u64, 4096usize),
        (3, 100_003),
        (BLOCK * 7 + 1, 2 * BLOCK as usize),
    ] {
        let mut buf = vec![0; len];
        c.read(off, &mut buf).unwrap();
        assert_eq!(buf, &want[off as usize..off as usize + len]);
    }
    let ext = c.allocation(0, 1 << 20).unwrap();
    let zero: Vec<(u64, u64)> = ext
        .iter()
        .filter(|e| e.flags == STATE_HOLE | STATE_ZERO)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(zero, [(3 * BLOCK, 2 * BLOCK), (9 * BLOCK, BLOCK)]);
    assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
    let part = c.allocation(3 * BLOCK + 5, 10).unwrap();
    assert_eq!(part.len(), 1);
    assert_eq!(
        (part[0].length, part[0].flags),
        (10, STATE_HOLE | STATE_ZERO)
    );

    // Block 6 cannot be read: EIO, and the connection goes on.
    let mut buf = vec![0; 100];
    match c.read(6 * BLOCK + 10, &mut buf) {
        Err(NbdError::Server { code, message, .. }) => {
            assert_eq!(code, EIO);
            assert!(message.contains("block 6"), "{message}");
        }
        other => panic!("a damaged block read gave {other:?}"),
    }
    assert_eq!(buf, vec![0; 100], "no data from a failed read");
    c.read(5 * BLOCK, &mut buf).unwrap();
    assert_eq!(buf, &want[5 * BLOCK as usize..5 * BLOCK as usize + 100]);

    // Several clients at once, one per export.
    let mut d = Client::connect_unix(&r.path, "vdb", &[]).unwrap();
    let mut all = vec![0; d.size() as usize];
    d.read(0, &mut all).unwrap();
    assert_eq!(all, expected("vdb"));
    assert!(matches!(
        d.allocation(0, 10),
        Err(NbdError::NotNegotiated(_))
    ));
    c.disconnect().unwrap();
    d.disconnect().unwrap();
}

#[test]
fn many_requests_in_flight_get_their_own_answers() {
    let r = Running::start(exports(None), None);
    let mut c = Raw::connect(&r, FLAGS);
    c.go("vda");
    let want = expected("vda");
    // 40 reads sent before any answer is read; replies may come in any order.
    let reads: Vec<(u64, u32)> = (0..40u64)
        .map(|i| (i * 26_111, 1000 + i as u32 * 7))
        .collect();
    for (i, (off, len)) in reads.iter().enumerate() {
        c.request(0, 1000 + i as u64, *off, *len, &[]);
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..reads.len() {
        let (err, cookie) = c.simple();
        assert_eq!(err, 0);
        let (off, len) = reads[(cookie - 1000) as usize];
        assert_eq!(
            c.bytes(len as usize),
            &want[off as usize..(off + u64::from(len)) as usize]
        );
        assert!(seen.insert(cookie));
    }
}

#[test]
fn stops_when_asked_with_clients_connected_and_when_idle() {
    let r = Running::start(exports(None), None);
    let mut c = Raw::connect(&r, FLAGS);
    c.go("vda");
    let t = Instant::now();
    assert_eq!(r.stop(), Stopped::Asked);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(c.closed(), "a connected client is cut off");

    let r = Running::start(exports(None), Some(Duration::from_millis(300)));
    let mut c = Raw::connect(&r, FLAGS);
    c.go("vdb");
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        !r.thread.as_ref().unwrap().is_finished(),
        "not idle while a client is connected"
    );
    c.request(2, 1, 0, 0, &[]);
    let t = Instant::now();
    while !r.thread.as_ref().unwrap().is_finished() {
        assert!(t.elapsed() < Duration::from_secs(5), "no idle stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(r.stop(), Stopped::Idle);
}

#[test]
fn a_client_that_does_not_finish_its_handshake_is_dropped_and_then_the_server_goes_idle() {
    let r = Running::start_with(
        exports(None),
        Some(Duration::from_millis(300)),
        Duration::from_millis(500),
    );
    // Greeted, flags sent, then silence.
    let mut c = Raw::connect(&r, FLAGS);
    let t = Instant::now();
    assert!(c.closed(), "the silent client is dropped");
    let dropped = t.elapsed();
    assert!(
        dropped >= Duration::from_millis(400),
        "not before its time: {dropped:?}"
    );
    // With it gone the idle timeout passes.
    while !r.thread.as_ref().unwrap().is_finished() {
        assert!(t.elapsed() < Duration::from_secs(5), "no idle stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(r.stop(), Stopped::Idle);

    // A client that finished its handshake may then wait as long as it likes.
    let r = Running::start_with(exports(None), None, Duration::from_millis(300));
    let mut c = Raw::connect(&r, FLAGS);
    c.go("vda");
    std::thread::sleep(Duration::from_millis(800));
    c.request(0, 7, 0, 512, &[]);
    let (error, cookie) = c.simple();
    assert_eq!((error, cookie), (0, 7));
    assert_eq!(c.bytes(512), expected("vda")[..512].to_vec());
}
