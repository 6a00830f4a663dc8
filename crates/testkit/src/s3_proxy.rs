//! A fault-injecting HTTP/1.1 proxy on 127.0.0.1 in front of an S3 store (the Garage node):
//! per request, it either answers itself with an S3 error (`503 SlowDown`, `500
//! InternalError`, `429 TooManyRequests`) or forwards the request to the store, as its
//! `Policy` says. It counts, per kind of request, what it forwarded and what it injected, and
//! keeps a log of every request with its time, so tests can check that failures were retried
//! and how far apart the retries were.
//!
//! The client is pointed at the proxy (`VMBACKUP_S3_ENDPOINT=http://127.0.0.1:PORT`, path-style
//! addressing) and so signs its requests for the proxy's host; the proxy forwards the request
//! unchanged (the `Host` header included, which the signature covers) except for its
//! `Connection` header: one upstream connection per request, `Connection: close` both ways.
//!
//! A chunked request body is refused with `400` and recorded as a problem (`problems()`), so a
//! test that never checks it still sees its operation fail rather than silently pass.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The kind of an S3 request, as the client's own request counts name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Get,
    Put,
    Head,
    /// A GET with `list-type` in its query.
    List,
    /// DELETE (and POST, the multi-object delete).
    Delete,
    Other,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Get, Kind::Put, Kind::Head, Kind::List, Kind::Delete];

    fn of(method: &str, target: &str) -> Kind {
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
        match method {
            "GET" if query.split('&').any(|p| p.starts_with("list-type")) => Kind::List,
            "GET" => Kind::Get,
            "PUT" => Kind::Put,
            "HEAD" => Kind::Head,
            "DELETE" | "POST" => Kind::Delete,
            _ => Kind::Other,
        }
    }
}

/// An error answer the proxy gives instead of forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Injected {
    /// `503 SlowDown`: throttling.
    SlowDown,
    /// `500 InternalError`.
    InternalError,
    /// `429 TooManyRequests`.
    TooManyRequests,
}

impl Injected {
    pub const ALL: [Injected; 3] = [
        Injected::SlowDown,
        Injected::InternalError,
        Injected::TooManyRequests,
    ];

    fn status(self) -> (u16, &'static str, &'static str, &'static str) {
        match self {
            Injected::SlowDown => (
                503,
                "Service Unavailable",
                "SlowDown",
                "Please reduce your request rate.",
            ),
            Injected::InternalError => (
                500,
                "Internal Server Error",
                "InternalError",
                "We encountered an internal error. Please try again.",
            ),
            Injected::TooManyRequests => (
                429,
                "Too Many Requests",
                "TooManyRequests",
                "Too many requests, please slow down.",
            ),
        }
    }
}

/// Which requests get an injected error.
#[derive(Debug, Clone)]
pub enum Policy {
    /// Every request is forwarded.
    Forward,
    /// The 1st, (n+1)th, (2n+1)th... request of each kind fails, the errors taken in turn
    /// from `errors` (per kind): with `n = 3`, a third of each kind's requests.
    EveryNth { n: u64, errors: Vec<Injected> },
    /// The first `k` requests of each kind fail with `error`; the rest are forwarded.
    FirstOfEachKind { k: u64, error: Injected },
    /// Every request fails with this error: a store that is up but never recovers.
    All(Injected),
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// When its head was read.
    pub at: Instant,
    pub kind: Kind,
    pub method: String,
    /// The request target (path and query).
    pub target: String,
    /// `None`: forwarded to the store.
    pub injected: Option<Injected>,
    /// Its `x-amz-content-sha256` header: the body's SHA-256 (hex), or `UNSIGNED-PAYLOAD`.
    pub payload_hash: Option<String>,
}

#[derive(Default)]
struct State {
    /// Requests seen per kind (the policy's counter).
    seen: BTreeMap<Kind, u64>,
    forwarded: BTreeMap<Kind, u64>,
    injected: BTreeMap<(Kind, Injected), u64>,
    log: Vec<Seen>,
    problems: Vec<String>,
}

struct Shared {
    upstream: SocketAddr,
    policy: Mutex<Policy>,
    state: Mutex<State>,
    stop: AtomicBool,
}

/// The running proxy; stops accepting when dropped.
pub struct S3Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl S3Proxy {
    /// Starts a proxy on a free port of 127.0.0.1 in front of `upstream_endpoint`
    /// (`http://HOST:PORT`, as `Garage::endpoint`).
    pub fn start(upstream_endpoint: &str, policy: Policy) -> S3Proxy {
        let hostport = upstream_endpoint
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("the proxy speaks plain HTTP: {upstream_endpoint}"))
            .trim_end_matches('/');
        let upstream = std::net::ToSocketAddrs::to_socket_addrs(hostport)
            .unwrap_or_else(|e| panic!("upstream {hostport}: {e}"))
            .next()
            .unwrap_or_else(|| panic!("upstream {hostport}: no address"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared {
            upstream,
            policy: Mutex::new(policy),
            state: Mutex::new(State::default()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("s3-proxy".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let s = s.clone();
                    let _ = std::thread::Builder::new()
                        .name("s3-proxy-conn".into())
                        .spawn(move || {
                            if let Err(e) = serve(&s, conn) {
                                // A client that went away mid-request (a killed run) is
                                // not a problem of the proxy.
                                tracing::debug!("s3 proxy connection: {e}");
                            }
                        });
                }
            })
            .expect("start the proxy thread");
        S3Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `http://127.0.0.1:PORT`, the endpoint to give the client.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The environment that points a `vmbackup` run at the proxy (over the store's settings).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("VMBACKUP_S3_ENDPOINT", self.endpoint()),
            ("VMBACKUP_S3_PATH_STYLE", "true".into()),
        ]
    }

    /// Changes the policy; the requests from now on follow it (the counters go on).
    pub fn set_policy(&self, policy: Policy) {
        *lock(&self.shared.policy) = policy;
    }

    /// Requests forwarded to the store, per kind.
    pub fn forwarded(&self) -> BTreeMap<Kind, u64> {
        lock(&self.shared.state).forwarded.clone()
    }

    /// Errors injected, per kind of request and error.
    pub fn injected(&self) -> BTreeMap<(Kind, Injected), u64> {
        lock(&self.shared.state).injected.clone()
    }

    /// Errors injected of one kind of error, all requests together.
    pub fn injected_of(&self, error: Injected) -> u64 {
        self.injected()
            .iter()
            .filter(|((_, e), _)| *e == error)
            .map(|(_, n)| n)
            .sum()
    }

    /// Errors injected into one kind of request, all errors together.
    pub fn injected_into(&self, kind: Kind) -> u64 {
        self.injected()
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, n)| n)
            .sum()
    }

    /// Every request seen so far, in the order their heads were read.
    pub fn log(&self) -> Vec<Seen> {
        lock(&self.shared.state).log.clone()
    }

    /// What the proxy refused to handle (a chunked request body, a malformed request).
    pub fn problems(&self) -> Vec<String> {
        lock(&self.shared.state).problems.clone()
    }
}

impl Drop for S3Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor up.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// A request or response head: its first line and its headers.
struct Head {
    line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The head with its `Connection` (and `Keep-Alive`) headers replaced by
    /// `Connection: close`, as bytes.
    fn closing(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.line);
        for (k, v) in &self.headers {
            if k.eq_ignore_ascii_case("connection") || k.eq_ignore_ascii_case("keep-alive") {
                continue;
            }
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("Connection: close\r\n\r\n");
        out.into_bytes()
    }
}

/// Reads a head (up to its empty line); `None` at a clean end of stream before it.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let first = line.trim_end().to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "end of stream in a head",
            ));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad header {l:?}"))
        })?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Some(Head {
        line: first,
        headers,
    }))
}

/// What the policy makes of the `nth` (from 0) request of its kind.
fn decide(policy: &Policy, nth: u64) -> Option<Injected> {
    match policy {
        Policy::Forward => None,
        Policy::EveryNth { n, errors } => {
            let n = (*n).max(1);
            (nth.is_multiple_of(n) && !errors.is_empty())
                .then(|| errors[((nth / n) % errors.len() as u64) as usize])
        }
        Policy::FirstOfEachKind { k, error } => (nth < *k).then_some(*error),
        Policy::All(e) => Some(*e),
    }
}

fn answer(
    out: &mut TcpStream,
    method: &str,
    status: u16,
    reason: &str,
    code: &str,
    message: &str,
) -> std::io::Result<()> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message><RequestId>vmbackup-test-proxy</RequestId></Error>"
    );
    let mut text = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 503 || status == 429 {
        text.push_str("Retry-After: 1\r\n");
    }
    text.push_str("\r\n");
    // A HEAD answer has no body.
    if method != "HEAD" {
        text.push_str(&body);
    }
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Serves one request of a client connection, then closes it.
fn serve(s: &Shared, conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut out = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let Some(head) = read_head(&mut r)? else {
        return Ok(());
    };
    let mut parts = head.line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let kind = Kind::of(&method, &target);

    let refuse = |out: &mut TcpStream, why: String| -> std::io::Result<()> {
        lock(&s.state)
            .problems
            .push(format!("{method} {target}: {why}"));
        answer(out, &method, 400, "Bad Request", "ProxyRefused", &why)?;
        // Let the client read the answer before the unread body makes the close a reset.
        let _ = out.shutdown(Shutdown::Write);
        let _ = out.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = std::io::copy(out, &mut std::io::sink());
        Ok(())
    };
    if head
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        return refuse(
            &mut out,
            "a chunked request body: the test proxy handles Content-Length bodies only".into(),
        );
    }
    if head
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    {
        return refuse(&mut out, "Expect: 100-continue is not handled".into());
    }
    let length: usize = match head.header("content-length") {
        None => 0,
        Some(v) => match v.parse() {
            Ok(n) => n,
            Err(_) => return refuse(&mut out, format!("bad Content-Length {v:?}")),
        },
    };
    let mut body = vec![0u8; length];
    r.read_exact(&mut body)?;

    let injected = {
        let policy = lock(&s.policy).clone();
        let mut st = lock(&s.state);
        let nth = st.seen.entry(kind).or_default();
        let injected = decide(&policy, *nth);
        *nth += 1;
        match injected {
            Some(e) => *st.injected.entry((kind, e)).or_default() += 1,
            None => *st.forwarded.entry(kind).or_default() += 1,
        }
        st.log.push(Seen {
            at: Instant::now(),
            kind,
            method: method.clone(),
            target: target.clone(),
            injected,
            payload_hash: head.header("x-amz-content-sha256").map(str::to_string),
        });
        injected
    };
    if let Some(e) = injected {
        let (status, reason, code, message) = e.status();
        answer(&mut out, &method, status, reason, code, message)?;
        let _ = out.shutdown(Shutdown::Both);
        return Ok(());
    }

    // Forward: a fresh connection, the head with `Connection: close`, the body.
    let up = TcpStream::connect_timeout(&s.upstream, Duration::from_secs(5))?;
    up.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut up_w = up.try_clone()?;
    up_w.write_all(&head.closing())?;
    up_w.write_all(&body)?;
    up_w.flush()?;
    let mut up_r = BufReader::new(up);
    let Some(reply) = read_head(&mut up_r)? else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the store closed without an answer",
        ));
    };
    out.write_all(&reply.closing())?;
    // The rest (the body, however framed) as it comes, to the store's end of stream.
    std::io::copy(&mut up_r, &mut out)?;
    out.flush()?;
    let _ = out.shutdown(Shutdown::Both);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_policies() {
        assert_eq!(Kind::of("GET", "/b?list-type=2&prefix=x"), Kind::List);
        assert_eq!(Kind::of("GET", "/b/k"), Kind::Get);
        assert_eq!(Kind::of("POST", "/b?delete"), Kind::Delete);
        let p = Policy::EveryNth {
            n: 3,
            errors: Injected::ALL.to_vec(),
        };
        let got: Vec<_> = (0..10).map(|i| decide(&p, i)).collect();
        assert_eq!(
            got,
            [
                Some(Injected::SlowDown),
                None,
                None,
                Some(Injected::InternalError),
                None,
                None,
                Some(Injected::TooManyRequests),
                None,
                None,
                Some(Injected::SlowDown),
            ]
        );
        let f = Policy::FirstOfEachKind {
            k: 2,
            error: Injected::TooManyRequests,
        };
        assert_eq!(
            (0..3).map(|i| decide(&f, i)).collect::<Vec<_>>(),
            [
                Some(Injected::TooManyRequests),
                Some(Injected::TooManyRequests),
                None
            ]
        );
    }

    /// A tiny upstream that answers every request with `200` and the request's body, so
    /// forwarding, the `Connection` rewrite and injection are seen without a store.
    #[test]
    fn forwards_and_injects_over_real_sockets() {
        let up = TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = up.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in up.incoming().flatten() {
                let mut w = c.try_clone().unwrap();
                let mut r = BufReader::new(c);
                let Ok(Some(h)) = read_head(&mut r) else {
                    continue;
                };
                let n: usize = h.header("content-length").unwrap_or("0").parse().unwrap();
                let mut b = vec![0; n];
                r.read_exact(&mut b).unwrap();
                let seen = format!(
                    "{}|host={}|conn={}|",
                    h.line,
                    h.header("host").unwrap_or(""),
                    h.header("connection").unwrap_or("")
                );
                let mut reply = seen.into_bytes();
                reply.extend_from_slice(&b);
                let _ = write!(
                    w,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n",
                    reply.len()
                );
                let _ = w.write_all(&reply);
            }
        });
        let proxy = S3Proxy::start(
            &format!("http://{up_addr}"),
            Policy::FirstOfEachKind {
                k: 1,
                error: Injected::SlowDown,
            },
        );
        let send = |req: &str| {
            let mut c = TcpStream::connect(proxy.addr).unwrap();
            c.write_all(req.as_bytes()).unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).unwrap();
            s
        };
        let put = "PUT /b/k HTTP/1.1\r\nHost: example:1\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello";
        let first = send(put);
        assert!(first.starts_with("HTTP/1.1 503"), "{first}");
        assert!(first.contains("<Code>SlowDown</Code>"), "{first}");
        let second = send(put);
        assert!(second.starts_with("HTTP/1.1 200"), "{second}");
        assert!(second.contains("Connection: close\r\n"), "{second}");
        assert!(!second.contains("keep-alive"), "{second}");
        assert!(
            second.ends_with("PUT /b/k HTTP/1.1|host=example:1|conn=close|hello"),
            "{second}"
        );
        let chunked = send(
            "PUT /b/c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        );
        assert!(chunked.starts_with("HTTP/1.1 400"), "{chunked}");
        assert_eq!(proxy.problems().len(), 1);
        assert_eq!(proxy.forwarded()[&Kind::Put], 1);
        assert_eq!(proxy.injected()[&(Kind::Put, Injected::SlowDown)], 1);
        let head = send("HEAD /b/k HTTP/1.1\r\nHost: h\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert!(
            head.ends_with("\r\n\r\n"),
            "no body after a HEAD answer: {head}"
        );
        assert_eq!(proxy.log().len(), 3);
    }
}
