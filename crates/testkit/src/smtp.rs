//! A real SMTP server on loopback for the report tests: Debian's python3-aiosmtpd, delivering
//! into a maildir (installed by `scripts/setup-host`). Stopped when dropped. `start` is a plain
//! relay (no TLS, no AUTH); `start_secure` a server that requires STARTTLS and then AUTH
//! (`USER`/`PASSWORD`), with a certificate for 127.0.0.1 and localhost signed by a private CA,
//! both made by the openssl CLI (`ca_file`: the CA a client must trust).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The one login the secure server accepts.
pub const USER: &str = "reporter";
pub const PASSWORD: &str = "c0rrect horse";

/// The secure server: aiosmtpd's Controller with the SMTP class's own STARTTLS and AUTH
/// enforcement (`require_starttls`, `auth_required`, AUTH only over TLS), delivering through
/// the Mailbox handler (which adds X-MailFrom and X-RcptTo headers).
const SECURE_SERVER: &str = r#"
import signal, ssl, sys
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import AuthResult, LoginPassword

port, cert, key, maildir, user, password = sys.argv[1:]
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)

def authenticator(server, session, envelope, mechanism, auth_data):
    ok = (isinstance(auth_data, LoginPassword)
          and auth_data.login == user.encode()
          and auth_data.password == password.encode())
    return AuthResult(success=ok, handled=False)

c = Controller(Mailbox(maildir), hostname="127.0.0.1", port=int(port),
               tls_context=ctx, require_starttls=True, auth_required=True,
               auth_require_tls=True, authenticator=authenticator)
c.start()
signal.sigwait([signal.SIGTERM, signal.SIGINT])
c.stop()
"#;

pub struct Smtp {
    child: Child,
    pub port: u16,
    maildir: tempfile::TempDir,
    /// The secure server's private CA (PEM): what a client must trust.
    pub ca_file: Option<PathBuf>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Smtp {
    /// Starts a plain relay on a free loopback port and waits until it accepts connections.
    pub fn start() -> Smtp {
        let port = free_port();
        let maildir = tempfile::tempdir().unwrap();
        let child = Command::new("/usr/bin/python3")
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            // aiosmtpd's Mailbox creates the maildir (new, cur, tmp) when it does not exist.
            .arg(maildir.path().join("mail"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3-aiosmtpd is installed (scripts/setup-host)");
        Smtp::wait_up(child, port, maildir, None)
    }

    /// Starts a server that requires STARTTLS and AUTH (`USER`, `PASSWORD`).
    pub fn start_secure() -> Smtp {
        let port = free_port();
        let maildir = tempfile::tempdir().unwrap();
        let dir = maildir.path();
        let (ca, cert, key) = (
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem"),
        );
        // A private CA, and the server's certificate it signs (for 127.0.0.1 and localhost).
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let ext = dir.join("ext");
        std::fs::write(
            &ext,
            "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n\
             extendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let openssl = |args: &[&str]| {
            let st = Command::new("openssl")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("openssl is installed (scripts/setup-host)");
            assert!(st.success(), "openssl {args:?}: {st}");
        };
        let path = |p: &PathBuf| p.to_str().expect("a UTF-8 temporary path").to_string();
        let (ca_key, csr) = (path(&dir.join("ca.key")), path(&dir.join("req.csr")));
        let (ca_s, cert_s, key_s) = (path(&ca), path(&cert), path(&key));
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &["-days", "2", "-subj", "/CN=vmbackup test CA"],
            ]
            .concat()
            .into_iter()
            .chain(["-keyout", &ca_key, "-out", &ca_s])
            .collect::<Vec<_>>(),
        );
        openssl(
            &[&["req", "-new"][..], &ec, &["-subj", "/CN=localhost"]]
                .concat()
                .into_iter()
                .chain(["-keyout", &key_s, "-out", &csr])
                .collect::<Vec<_>>(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_s,
            "-CAkey",
            &ca_key,
            "-set_serial",
            "2",
            "-days",
            "2",
            "-extfile",
            &path(&ext),
            "-out",
            &cert_s,
        ]);
        let child = Command::new("/usr/bin/python3")
            .args(["-c", SECURE_SERVER, &port.to_string()])
            .args([&cert, &key, &maildir.path().join("mail")])
            .args([USER, PASSWORD])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3-aiosmtpd is installed (scripts/setup-host)");
        Smtp::wait_up(child, port, maildir, Some(ca))
    }

    fn wait_up(
        mut child: Child,
        port: u16,
        maildir: tempfile::TempDir,
        ca_file: Option<PathBuf>,
    ) -> Smtp {
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("SMTP server ended: {status}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "SMTP server did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Smtp {
            child,
            port,
            maildir,
            ca_file,
        }
    }

    /// The raw messages delivered so far.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let new = self.maildir.path().join("mail/new");
        let mut out = Vec::new();
        for e in std::fs::read_dir(new).into_iter().flatten().flatten() {
            out.push(std::fs::read(e.path()).unwrap());
        }
        out
    }

    /// The delivered messages as text, a quoted-printable body decoded (as a mail reader shows
    /// it: report tables have lines longer than 76 characters, which are sent so).
    pub fn texts(&self) -> Vec<String> {
        self.messages().iter().map(|m| decoded(m)).collect()
    }

    /// Waits (up to 30 s) until at least `n` messages were delivered; returns them.
    pub fn wait_messages(&self, n: usize) -> Vec<Vec<u8>> {
        let t = Instant::now();
        loop {
            let m = self.messages();
            if m.len() >= n {
                return m;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{} mails, not {n}",
                m.len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `raw` as text, its body decoded when it is quoted-printable (headers as they are).
pub fn decoded(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw).into_owned();
    let Some(split) = text
        .find("\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| text.find("\n\n").map(|i| i + 2))
    else {
        return text;
    };
    let (head, body) = text.split_at(split);
    if !head
        .to_ascii_lowercase()
        .contains("content-transfer-encoding: quoted-printable")
    {
        return text;
    }
    let b = body.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            if b[i + 1..].starts_with(b"\r\n") {
                i += 3;
                continue;
            }
            if b[i + 1..].starts_with(b"\n") {
                i += 2;
                continue;
            }
            if let Some(x) = body
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    format!("{head}{}", String::from_utf8_lossy(&out))
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
