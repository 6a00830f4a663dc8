//! A real SMTP server on loopback for the report tests: Debian's python3-aiosmtpd, delivering
//! into a maildir (installed by `scripts/setup-host`). Stopped when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Smtp {
    child: Child,
    pub port: u16,
    maildir: tempfile::TempDir,
}

impl Smtp {
    /// Starts the server on a free loopback port and waits until it accepts connections.
    pub fn start() -> Smtp {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
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
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
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

    /// The delivered messages as text.
    pub fn texts(&self) -> Vec<String> {
        self.messages()
            .into_iter()
            .map(|m| String::from_utf8_lossy(&m).into_owned())
            .collect()
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

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
