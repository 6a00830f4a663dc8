//! `--retry-lock DURATION`: a command that finds its VM or the repository locked (busy, exit
//! 4) tries again, with a growing pause, until DURATION has passed, instead of giving up at
//! once. A stop signal (SIGINT, SIGTERM) ends the wait at once (`Error::Interrupted`).
//! Busy errors leave nothing changed, so trying again is what a scheduler would do anyway.

use std::time::{Duration, Instant};

use crate::error::Error;

/// The first pause after a refusal; each next one doubles, up to `MAX_PAUSE`.
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(5);
/// How often a pause looks for a stop signal.
const TICK: Duration = Duration::from_millis(100);

/// Parses a duration as `30s`, `5m`, `1h`, `1h 30m`, `90min` (humantime's units); a bare
/// number is refused (the unit must be said).
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e} (a duration such as 30s, 5m or 1h)"))
}

/// The pause after the `n`-th refusal (from 0), never past `left`.
fn pause(n: u32, left: Duration) -> Duration {
    FIRST_PAUSE
        .saturating_mul(2u32.saturating_pow(n.min(16)))
        .min(MAX_PAUSE)
        .min(left)
}

/// Runs `f`; while it fails busy (`is_busy`) and `wait` has not passed since the first try,
/// waits and runs it again. `None`: no waiting, one try. The last busy error is returned when
/// the time is up; a stop signal during a wait ends it with `Error::Interrupted`.
pub fn retry_busy<T, E>(
    wait: Option<Duration>,
    is_busy: impl Fn(&E) -> bool,
    mut f: impl FnMut() -> std::result::Result<T, E>,
) -> std::result::Result<T, E>
where
    E: From<Error> + std::fmt::Display,
{
    let Some(wait) = wait else { return f() };
    let started = Instant::now();
    let mut n = 0;
    loop {
        let e = match f() {
            Err(e) if is_busy(&e) => e,
            r => return r,
        };
        let left = wait.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(e);
        }
        let p = pause(n, left);
        tracing::info!(
            "{e:#}; trying again in {:.1} s (--retry-lock: {} s left)",
            p.as_secs_f64(),
            left.as_secs()
        );
        sleep_unless_stopped(p)?;
        n += 1;
    }
}

/// Sleeps `d`, or until a stop signal comes (`Error::Interrupted`).
fn sleep_unless_stopped(d: Duration) -> Result<(), Error> {
    let end = Instant::now() + d;
    loop {
        if crate::interrupt::requested() {
            return Err(Error::Interrupted);
        }
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep(TICK.min(end - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Result;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 2min "), Ok(Duration::from_secs(120)));
        for bad in ["30", "", "soon", "-5s", "5 parsecs"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("30s, 5m or 1h"), "{bad}: {e}");
        }
    }

    #[test]
    fn pauses_grow_to_a_ceiling_and_never_pass_the_time_left() {
        let long = Duration::from_secs(3600);
        assert_eq!(pause(0, long), Duration::from_millis(250));
        assert_eq!(pause(1, long), Duration::from_millis(500));
        assert_eq!(pause(10, long), MAX_PAUSE);
        assert_eq!(pause(u32::MAX, long), MAX_PAUSE);
        assert_eq!(
            pause(3, Duration::from_millis(70)),
            Duration::from_millis(70)
        );
    }

    fn busy() -> Error {
        Error::Busy("held".into())
    }

    #[test]
    fn busy_is_tried_again_until_it_clears_or_the_time_is_up() {
        let mut tries = 0;
        let r = retry_busy(Some(Duration::from_secs(10)), Error::is_busy, || {
            tries += 1;
            if tries < 3 {
                Err(busy())
            } else {
                Ok(tries)
            }
        });
        assert_eq!(r.unwrap(), 3);

        let started = Instant::now();
        let mut tries = 0;
        let r: Result<()> = retry_busy(Some(Duration::from_millis(600)), Error::is_busy, || {
            tries += 1;
            Err(busy())
        });
        assert!(r.unwrap_err().is_busy());
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(600) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert!((3..=5).contains(&tries), "{tries}");
    }

    #[test]
    fn other_errors_and_no_wait_are_not_tried_again() {
        let mut tries = 0;
        let r: Result<()> = retry_busy(Some(Duration::from_secs(10)), Error::is_busy, || {
            tries += 1;
            Err(Error::Invalid("bad".into()))
        });
        assert!(matches!(r, Err(Error::Invalid(_))));
        assert_eq!(tries, 1);
        let mut tries = 0;
        let r: Result<()> = retry_busy(None, Error::is_busy, || {
            tries += 1;
            Err(busy())
        });
        assert!(r.unwrap_err().is_busy());
        assert_eq!(tries, 1);
    }
}
