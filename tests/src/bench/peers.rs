//! Processes the benchmark adds to the testbed (byte source, fast CONNECT proxy, redsocks with
//! its iptables rules) and the load clients it runs. Everything started here is killed on drop.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use egress_testbed::{ORIGIN_IP, Testbed, cgroup::Cgroup, netns::Netns, peers::Daemon};
use serde::de::DeserializeOwned;

use super::{SOURCE_PORT, interrupted};

/// Runs `bin ARGS` in `ns`'s network namespace as a daemon logging to `bed.dir/NAME.log`.
pub fn spawn_in_ns(
    bed: &Testbed,
    ns: &Netns,
    name: &'static str,
    program: &Path,
    args: &[&str],
) -> Result<Daemon> {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", ns.path()))
        .arg(program)
        .args(args);
    Daemon::spawn(name, command, &bed.dir.join(format!("{name}.log")))
}

/// Waits until something listens on `port` in `ns`, or the daemon that should has died.
pub fn wait_listening(bed: &Testbed, ns: &Netns, port: u16, daemon: &mut Daemon) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if ns.is_listening(port) {
            return Ok(());
        }
        if daemon.exited() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(bed.dir.join(format!("{}.log", daemon.name))).unwrap_or_default();
    bail!("{} is not listening on port {port}:\n{log}", daemon.name)
}

/// redsocks (Debian's) in the homeserver namespace, relaying to an HTTP CONNECT proxy, fed by
/// iptables REDIRECT rules that match only the processes of its own client cgroup (so other
/// peers' clients, in other cgroups, are untouched while the rules stay in place).
pub struct Redsocks {
    pub daemon: Daemon,
    /// Where this peer's clients run.
    pub clients: Cgroup,
}

pub fn start_redsocks(
    bed: &Testbed,
    name: &'static str,
    local_port: u16,
    upstream: SocketAddr,
    user: &str,
    password: &str,
) -> Result<Redsocks> {
    let conf = bed.dir.join(format!("{name}.conf"));
    // Debian's defaults, except: foreground, logging to stderr, and no user switch (the config
    // sits in the testbed's directory). http-connect is redsocks' HTTP CONNECT client.
    std::fs::write(
        &conf,
        format!(
            "base {{
  log_debug = off;
  log_info = on;
  log = stderr;
  daemon = off;
  redirector = iptables;
  redsocks_conn_max = 4096;
}}
redsocks {{
  local_ip = 127.0.0.1;
  local_port = {local_port};
  ip = {ip};
  port = {port};
  type = http-connect;
  login = \"{user}\";
  password = \"{password}\";
}}
",
            ip = upstream.ip(),
            port = upstream.port(),
        ),
    )?;
    let conf = conf.to_string_lossy().into_owned();
    let mut daemon = spawn_in_ns(bed, &bed.hs, name, Path::new("redsocks"), &["-c", &conf])?;
    wait_listening(bed, &bed.hs, local_port, &mut daemon)?;
    // nsenter execs: the pid is redsocks' own, whose CPU time the report shows.
    let comm = super::measure::comm(daemon.child.id())?;
    if comm != "redsocks" {
        bail!("process {} is {comm:?}, not redsocks", daemon.child.id());
    }
    let relative = format!("egress-test/{}-{name}", bed.name);
    // Created under the cgroup2 root, wherever that is mounted, which is what `-m cgroup
    // --path` is relative to.
    let clients = Cgroup::create(&relative)?;
    let to_port = local_port.to_string();
    for port in [443, SOURCE_PORT] {
        let port = port.to_string();
        bed.hs
            .exec(
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "-d",
                    ORIGIN_IP,
                    "--dport",
                    &port,
                    "-m",
                    "cgroup",
                    "--path",
                    &relative,
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    &to_port,
                ],
            )
            .context("iptables REDIRECT rule for redsocks")?;
    }
    Ok(Redsocks { daemon, clients })
}

/// A load client running in a cgroup of the homeserver host; killed on drop. Its stdout
/// lines arrive through a channel so that waits can time out.
pub struct ClientProc {
    child: Child,
    lines: Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    what: String,
}

impl ClientProc {
    pub fn spawn(bed: &Testbed, cgroup: &Path, bin: &Path, args: &[String], what: String) -> Result<Self> {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = bed
            .spawn_in(cgroup, &bin.to_string_lossy(), &refs)
            .with_context(|| format!("starting client for {what}"))?;
        let stdout = child.stdout.take().context("client stdout")?;
        let mut stderr = child.stderr.take().context("client stderr")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Ok(Self {
            child,
            lines,
            stderr: Some(stderr),
            what,
        })
    }

    /// The next JSON line the client prints.
    pub fn next<T: DeserializeOwned>(&mut self, within: Duration) -> Result<T> {
        let deadline = Instant::now() + within;
        let received = loop {
            interrupted()?;
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200));
            match self.lines.recv_timeout(slice) {
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => continue,
                other => break other,
            }
        };
        match received {
            Ok(line) => {
                serde_json::from_str(&line).with_context(|| format!("{}: bad output {line:?}", self.what))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => bail!("{}: no answer within {within:?}", self.what),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = self.child.wait();
                let text = self.stderr.take().and_then(|t| t.join().ok()).unwrap_or_default();
                bail!("{}: the client failed: {}", self.what, text.trim())
            }
        }
    }

    pub fn send_line(&mut self) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("client stdin")?;
        writeln!(stdin)?;
        Ok(())
    }

    /// Waits for a clean exit.
    pub fn finish(mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            interrupted()?;
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("{}: the client exited with {status}", self.what);
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{}: the client did not exit within {within:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ClientProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a client to completion and parses the one JSON object it prints.
pub fn run_client<T: DeserializeOwned>(
    bed: &Testbed,
    cgroup: &Path,
    bin: &Path,
    args: &[String],
    what: String,
    within: Duration,
) -> Result<T> {
    let mut client = ClientProc::spawn(bed, cgroup, bin, args, what)?;
    let report = client.next(within)?;
    client.finish(Duration::from_secs(10))?;
    Ok(report)
}

/// The path of the benchmark binary to run inside the namespaces: this very program.
pub fn bench_bin() -> Result<PathBuf> {
    std::env::current_exe().context("locating egress-bench")
}
