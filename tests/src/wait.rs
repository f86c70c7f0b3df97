//! The one wait helper: poll something until it is what the test wants, bounded, with a message
//! naming what was awaited and the last value seen when it times out.

use std::{
    fmt::Debug,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

/// How long to wait for a log line or a counter that follows an action the test just took.
pub const SHORT: Duration = Duration::from_secs(15);
/// How long to wait for a daemon to start.
pub const STARTUP: Duration = Duration::from_secs(30);

const INTERVAL: Duration = Duration::from_millis(50);
/// How much of the last value a timeout message quotes.
const QUOTE_LIMIT: usize = 8_000;

/// Calls `read` until `done` accepts its value, and returns that value. An error from `read`
/// ends the wait at once (e.g. the daemon being waited for has died); so does `timeout`, with an
/// error naming `what` and quoting the last value read.
pub fn until<T: Debug>(
    what: &str,
    timeout: Duration,
    mut read: impl FnMut() -> Result<T>,
    mut done: impl FnMut(&T) -> bool,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let value = read()?;
        if done(&value) {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            let mut last = format!("{value:#?}");
            if last.len() > QUOTE_LIMIT {
                let cut = last.len() - QUOTE_LIMIT;
                let cut = (cut..last.len())
                    .find(|&i| last.is_char_boundary(i))
                    .unwrap_or(last.len());
                last = format!("...{}", &last[cut..]);
            }
            bail!("timed out after {timeout:?} waiting for {what}; last seen:\n{last}");
        }
        std::thread::sleep(INTERVAL);
    }
}

/// Waits until `check` says true.
pub fn ready(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    until(what, timeout, &mut check, |ok| *ok).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_accepted_value() {
        let mut n = 0;
        let got = until(
            "n to reach 3",
            SHORT,
            || {
                n += 1;
                Ok(n)
            },
            |n| *n == 3,
        );
        assert_eq!(got.unwrap(), 3);
    }

    #[test]
    fn times_out_naming_what_and_the_last_value() {
        let err = until(
            "the impossible",
            Duration::from_millis(120),
            || Ok("still no"),
            |_| false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("the impossible") && err.contains("still no"),
            "{err}"
        );
    }

    #[test]
    fn a_read_error_ends_the_wait_at_once() {
        let started = std::time::Instant::now();
        let err = ready("a dead daemon", SHORT, || anyhow::bail!("it exited")).unwrap_err();
        assert!(err.to_string().contains("it exited"));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
