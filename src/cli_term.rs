//! The terminal: how much is logged (`-q`, `-v`, `-vv`, `VMBACKUP_LOG`), colour, and
//! progress bars (bytes, rate, ETA) drawn on stderr with log lines printed above them.
//!
//! Bars are drawn only when stderr is a terminal and neither `-q` nor `--json` is given;
//! otherwise `Progress` does nothing and stderr carries the log lines alone.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use vmbackup::render;

/// Where bars are drawn; `None`: no bars (not a terminal, `-q`, `--json`).
static BARS: OnceLock<Option<MultiProgress>> = OnceLock::new();

fn bars() -> Option<&'static MultiProgress> {
    BARS.get().and_then(Option::as_ref)
}

/// The log filter of `-q` (`quiet`) or `-v` repeated `verbose` times; an explicit filter in
/// `VMBACKUP_LOG` wins over both.
pub fn log_filter(quiet: bool, verbose: u8, env: Option<&str>) -> String {
    if let Some(f) = env.map(str::trim).filter(|f| !f.is_empty()) {
        return f.to_string();
    }
    match (quiet, verbose) {
        (true, _) => "error".into(),
        (false, 0) => "info".into(),
        (false, 1) => "info,vmbackup=debug,vmbackup_repo=debug".into(),
        (false, _) => "debug,vmbackup=trace,vmbackup_repo=trace".into(),
    }
}

/// Whether to colour what goes to a stream that `is_terminal`: not when `NO_COLOR` is set to
/// anything non-empty (no-color.org), nor on a dumb terminal.
pub fn colour(is_terminal: bool, no_color: Option<&str>, term: Option<&str>) -> bool {
    is_terminal && no_color.is_none_or(str::is_empty) && term != Some("dumb")
}

/// Sets up logging (tracing, to stderr) and the progress bars for the global options.
pub fn init(quiet: bool, verbose: u8, json: bool) {
    use tracing_subscriber::EnvFilter;
    let tty = std::io::stderr().is_terminal();
    let _ = BARS.set(
        (tty && !quiet && !json)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10))),
    );
    let env = std::env::var("VMBACKUP_LOG").ok();
    let wanted = log_filter(quiet, verbose, env.as_deref());
    let filter = EnvFilter::try_new(&wanted).unwrap_or_else(|e| {
        eprintln!("warning: VMBACKUP_LOG={wanted:?} is not a log filter ({e}); logging at info");
        EnvFilter::new("info")
    });
    let ansi = colour(
        tty,
        std::env::var("NO_COLOR").ok().as_deref(),
        std::env::var("TERM").ok().as_deref(),
    );
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .with_ansi(ansi)
        .with_target(verbose >= 2)
        .init();
}

/// Writes a log line to stderr, with the bars (if any) taken away while it is written.
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let write = || std::io::stderr().lock().write_all(buf);
        match bars() {
            Some(m) => m.suspend(write)?,
            None => write()?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `done` of `total` bytes for people: `1.5 GiB`.
fn bytes(b: u64) -> String {
    crate::human_bytes(b)
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix}  [{bar:24}] {done}/{total}  {rate}  ETA {eta_clock}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
        .with_key("done", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&bytes(s.pos()));
        })
        .with_key("total", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = w.write_str(&bytes(s.len().unwrap_or(0)));
        })
        .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{}/s", bytes(s.per_sec() as u64));
        })
        .with_key(
            "eta_clock",
            |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&render::duration_secs(s.eta().as_secs()));
            },
        )
}

/// Progress of copies and checks, one bar per label (a disk of a backup, a restore, a
/// verify, a gc). A label's bar ends when `done` reaches `total`: it gives way to one line
/// above the others, `LABEL: SIZE in TIME (RATE)`.
pub struct Progress {
    open: Mutex<Bars>,
}

#[derive(Default)]
struct Bars {
    drawn: HashMap<String, ProgressBar>,
    /// Labels whose bar ended: told `total` of `total` again, they stay ended.
    ended: std::collections::HashSet<String>,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            open: Mutex::new(Bars::default()),
        }
    }

    pub fn show(&self, label: &str, done: u64, total: u64) {
        let Some(m) = bars() else { return };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let finished = done >= total;
        if total == 0 || (finished && open.ended.contains(label)) {
            return;
        }
        open.ended.remove(label);
        let pb = open.drawn.entry(label.to_string()).or_insert_with(|| {
            let pb = m.add(ProgressBar::new(total).with_style(style()));
            pb.set_prefix(label.to_string());
            pb
        });
        if pb.length() != Some(total) {
            pb.set_length(total);
        }
        pb.set_position(done.min(total));
        if finished {
            let line = finished_line(label, total, pb.elapsed());
            pb.finish_and_clear();
            m.remove(pb);
            open.drawn.remove(label);
            open.ended.insert(label.to_string());
            let _ = m.println(line);
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Drop for Progress {
    /// Bars left unfinished (a failure, an interruption) stay as they were.
    fn drop(&mut self) {
        let open = self.open.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, pb) in open.drawn.drain() {
            pb.abandon();
        }
    }
}

/// What a finished bar leaves: `LABEL: 1.0 GiB in 1m 3s (16.3 MiB/s)`.
pub fn finished_line(label: &str, total: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        format!(" ({}/s)", bytes((total as f64 / secs) as u64))
    } else {
        String::new()
    };
    format!(
        "{label}: {} in {}{rate}",
        bytes(total),
        render::duration(elapsed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_verbose_and_an_explicit_filter() {
        assert_eq!(log_filter(false, 0, None), "info");
        assert_eq!(log_filter(true, 0, None), "error");
        assert_eq!(log_filter(true, 2, None), "error");
        assert!(log_filter(false, 1, None).contains("vmbackup=debug"));
        assert!(log_filter(false, 2, None).starts_with("debug,"));
        assert!(log_filter(false, 3, None).contains("vmbackup=trace"));
        // VMBACKUP_LOG wins, unless it is empty.
        assert_eq!(log_filter(true, 0, Some("warn")), "warn");
        assert_eq!(log_filter(false, 2, Some("vmbackup=info")), "vmbackup=info");
        assert_eq!(log_filter(false, 0, Some(" ")), "info");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None, Some("xterm")));
        assert!(colour(true, Some(""), None));
        assert!(!colour(true, Some("1"), Some("xterm")));
        assert!(!colour(false, None, Some("xterm")));
        assert!(!colour(true, None, Some("dumb")));
    }

    #[test]
    fn a_finished_bar_leaves_size_time_and_rate() {
        assert_eq!(
            finished_line("web vda", 1 << 30, Duration::from_secs(64)),
            "web vda: 1.0 GiB in 1m 4s (16.0 MiB/s)"
        );
        assert_eq!(finished_line("gc", 0, Duration::ZERO), "gc: 0 B in 0ms");
    }
}
