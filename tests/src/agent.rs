//! A handle on one run of the agent (`egress run`): started in a namespace and cgroup, ready when
//! it says so, stopped or killed on request and on drop. Everything it reads is about *this* run:
//! its own log file, its admin endpoint (health, metrics) and the kernel counters of its pins.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    metrics::Metrics,
    process::{self, ClientResult, Daemon, Enter, egress_bin},
    wait,
};

/// The admin listener's default address, in the agent's network namespace.
pub const ADMIN_ADDR: &str = "127.0.0.1:9478";

pub struct Agent {
    daemon: Option<Daemon>,
    log: PathBuf,
    /// The network namespace the agent runs in (its admin endpoint is on that loopback).
    netns: String,
    pin_dir: PathBuf,
}

impl Agent {
    /// Spawns `command` (an `egress run ...`), logging to `log`, and waits until the log says
    /// `egress ready`; fails with the log if it exits first or takes too long.
    pub fn start(command: Command, log: PathBuf, netns: &str, pin_dir: &Path) -> Result<Self> {
        let mut daemon = Daemon::spawn("egress", command, &log)?;
        wait::ready("the agent to log `egress ready`", wait::STARTUP, || {
            daemon.check_alive()?;
            Ok(std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("egress ready"))
        })?;
        Ok(Self {
            daemon: Some(daemon),
            log,
            netns: netns.to_owned(),
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.child.id())
    }

    /// SIGTERM, and wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.signal(libc::SIGTERM);
            let _ = daemon.child.wait();
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.kill();
        }
    }

    /// Everything this run logged so far (and nothing an earlier run did).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until this run's log satisfies `done`; returns the log.
    pub fn wait_log(&self, what: &str, done: impl Fn(&str) -> bool) -> Result<String> {
        wait::until(
            &format!("the agent's log: {what}"),
            wait::SHORT,
            || Ok(self.log()),
            |l| done(l),
        )
    }

    /// Waits until this run's log contains `needle`; returns the log.
    pub fn logged(&self, needle: &str) -> Result<String> {
        self.wait_log(needle, |l| l.contains(needle))
    }

    /// Waits until this run logged a decision line containing every one of `needles`, and
    /// returns that line. (Decision lines carry `route=` in text and `"route":` in JSON; their
    /// level depends on the outcome, so it is not looked at.)
    pub fn wait_decision(&self, needles: &[&str]) -> Result<String> {
        let find = |log: &str| {
            log.lines()
                .find(|l| is_decision(l) && needles.iter().all(|n| l.contains(n)))
                .map(str::to_owned)
        };
        let log = self.wait_log(&format!("a decision line with {needles:?}"), |l| {
            find(l).is_some()
        })?;
        Ok(find(&log).expect("found above"))
    }

    /// Waits until this run has logged `n` decision lines; returns them.
    pub fn wait_decisions(&self, n: usize) -> Result<Vec<String>> {
        wait::until(
            &format!("{n} decision lines in the agent's log"),
            wait::SHORT,
            || Ok(self.decisions()),
            |d| d.len() == n,
        )
    }

    /// This run's decision lines.
    pub fn decisions(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| is_decision(l))
            .map(str::to_owned)
            .collect()
    }

    /// A command running `program args...` in the agent's network namespace, outside the
    /// intercepted cgroups (loopback is never intercepted anyway).
    fn in_netns(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
        process::launch(Some(&self.netns), Enter::Net, None, program, args)
    }

    /// GET `path` from the admin listener. Returns (HTTP status, body).
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        process::http_get(&self.netns, &format!("http://{ADMIN_ADDR}{path}"), 10, &[])
    }

    /// The admin listener's /metrics, parsed.
    pub fn metrics(&self) -> Result<Metrics> {
        let (code, body) = self.admin_get("/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}: {body}");
        }
        Metrics::parse(&body)
    }

    /// The sum of the series `name` with (at least) `labels`; an error if there is none.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<u64> {
        self.metrics()?.count(name, labels)
    }

    /// Waits until [`Self::metric`] equals `want`. A series that does not exist yet (the agent
    /// counts a connection when it closes) is waited for too; still missing at the end is an
    /// error, like a wrong value.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: u64,
        within: Duration,
    ) -> Result<()> {
        wait::until(
            &format!("{name} {labels:?} = {want}"),
            within,
            || Ok(self.metrics()?.count(name, labels).map_err(|e| e.to_string())),
            |v| v.as_ref() == Ok(&want),
        )
        .map(drop)
    }

    /// `egress status` for this run's pins, run in the agent's namespace (so it reaches the
    /// admin endpoint, whose /health probes the upstream proxy).
    pub fn status(&self) -> Result<ClientResult> {
        let pin_dir = self.pin_dir.to_string_lossy();
        process::output(self.in_netns(egress_bin(), &["status", "--bpffs-dir", &pin_dir]))
    }

    /// A kernel decision counter (`pass_no_proxy`, `deny_blacklist`, ...), read from the
    /// pinned maps with `egress status` run on the host: outside the agent's namespace, so that
    /// reading a counter does not make the agent probe its upstream (as /health does).
    pub fn counter(&self, name: &str) -> Result<u64> {
        let pin_dir = self.pin_dir.to_string_lossy();
        let status = process::egress(&["status", "--bpffs-dir", &pin_dir])?;
        status
            .stdout
            .lines()
            .find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
            })
            .with_context(|| format!("no counter {name} in {status:?}"))
    }
}

/// Whether a log line is a decision line (text or JSON format).
fn is_decision(line: &str) -> bool {
    (line.contains(" conn=") && line.contains(" route="))
        || (line.contains("\"conn\":") && line.contains("\"route\":"))
}
