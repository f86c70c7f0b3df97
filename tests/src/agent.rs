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

    /// Everything this run logged so far (and nothing an earlier run did), as text: for
    /// assertion messages. Tests look at [`Self::lines`] and [`Self::decisions`].
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// This run's log lines, parsed (the testbed runs the agent with `--log-format json`).
    pub fn lines(&self) -> Vec<LogLine> {
        self.log().lines().filter_map(LogLine::parse).collect()
    }

    /// This run's decision records: one per connection, written when it ends.
    pub fn decisions(&self) -> Vec<LogLine> {
        self.lines().into_iter().filter(LogLine::is_decision).collect()
    }

    /// Waits until this run logged a line that `matches`; returns it.
    pub fn wait_line(&self, what: &str, matches: impl Fn(&LogLine) -> bool) -> Result<LogLine> {
        let lines = wait::until(
            &format!("the agent's log: {what}"),
            wait::SHORT,
            || Ok(self.lines()),
            |lines| lines.iter().any(&matches),
        )?;
        Ok(lines.into_iter().find(|l| matches(l)).expect("found above"))
    }

    /// Waits until this run logged a line whose message contains `text`; returns it.
    pub fn logged(&self, text: &str) -> Result<LogLine> {
        self.wait_line(text, |l| l.message().contains(text))
    }

    /// Waits until this run logged a decision record with every `(field, value)` of `fields`;
    /// returns it.
    pub fn wait_decision(&self, fields: &[(&str, &dyn std::fmt::Display)]) -> Result<LogLine> {
        let wanted: Vec<(&str, String)> = fields.iter().map(|(k, v)| (*k, v.to_string())).collect();
        self.wait_line(&format!("a decision with {wanted:?}"), |l| {
            l.is_decision() && wanted.iter().all(|(key, value)| l.get(key) == *value)
        })
    }

    /// Waits until this run serves the network namespace `netns` (a listener of its own there).
    pub fn serving(&self, netns: u64) -> Result<LogLine> {
        self.wait_line(&format!("serving network namespace {netns}"), |l| {
            l.message() == "serving a network namespace" && l.number("netns") == netns
        })
    }

    /// Waits until this run has logged `n` decision records; returns them.
    pub fn wait_decisions(&self, n: usize) -> Result<Vec<LogLine>> {
        wait::until(
            &format!("{n} decision records in the agent's log"),
            wait::SHORT,
            || Ok(self.decisions()),
            |d| d.len() == n,
        )
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
        self.counters()?
            .remove(name)
            .with_context(|| format!("no kernel counter {name}"))
    }

    /// Every kernel decision counter, by name (see [`Self::counter`]).
    pub fn counters(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let pin_dir = self.pin_dir.to_string_lossy();
        let status = process::egress(&["status", "--bpffs-dir", &pin_dir])?;
        let counters: std::collections::BTreeMap<String, u64> = status
            .stdout
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let (name, value) = (words.next()?, words.next()?);
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        if counters.is_empty() {
            bail!("no kernel counters in {status:?}");
        }
        Ok(counters)
    }
}

/// One line of the agent's JSON log: its level, target, message and fields.
#[derive(Clone, Debug, PartialEq)]
pub struct LogLine(serde_json::Map<String, serde_json::Value>);

impl LogLine {
    fn parse(line: &str) -> Option<Self> {
        match serde_json::from_str(line) {
            Ok(serde_json::Value::Object(fields)) => Some(Self(fields)),
            _ => None,
        }
    }

    /// A field as text (numbers too); "" when absent.
    pub fn get(&self, key: &str) -> String {
        match self.0.get(key) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        }
    }

    /// A numeric field; 0 when absent.
    pub fn number(&self, key: &str) -> u64 {
        self.0.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0)
    }

    pub fn message(&self) -> String {
        self.get("message")
    }

    pub fn level(&self) -> String {
        self.get("level")
    }

    /// A connection's decision record (one per connection, see the agent's `proxy::decision`).
    pub fn is_decision(&self) -> bool {
        self.message() == "decision" && self.0.contains_key("conn")
    }
}

impl std::fmt::Display for LogLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", serde_json::Value::Object(self.0.clone()))
    }
}
