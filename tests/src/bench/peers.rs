//! What the benchmark adds to the testbed besides its own servers: redsocks with its iptables
//! rules, and the load clients it runs. Everything started here is killed on drop.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Child,
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use egress_testbed::{
    ORIGIN_IP, Testbed,
    cgroup::Cgroup,
    process::{Daemon, Enter},
    procfs, wait,
};
use serde::de::DeserializeOwned;

use super::{SOURCE_PORT, interrupted};

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
    let daemon = bed.start_daemon(
        &bed.hs,
        Enter::Net,
        name,
        "redsocks",
        &["-c", &conf],
        &[local_port],
    )?;
    // sh and nsenter exec: the pid is redsocks' own, whose CPU time the report shows.
    let comm = procfs::comm(daemon.child.id())?;
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
            .spawn_in(cgroup, bin, &refs)
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
        let what = format!("{}: the client to exit", self.what);
        let status = wait::until(
            &what,
            within,
            || {
                interrupted()?;
                Ok(self.child.try_wait()?)
            },
            Option::is_some,
        )?;
        match status {
            Some(status) if !status.success() => bail!("{}: the client exited with {status}", self.what),
            _ => Ok(()),
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

/// The C splice relay (floor.c), built with the machine's C compiler into the testbed's
/// directory and started in the homeserver namespace on `listen`: every connection to it is
/// tunnelled with `CONNECT target` through `proxy`.
pub fn start_floor(
    bed: &Testbed,
    listen: SocketAddr,
    proxy: SocketAddr,
    target: &str,
    credentials: &str,
) -> Result<Daemon> {
    let source = bed.dir.join("floor.c");
    let binary = bed.dir.join("egress-floor-relay");
    std::fs::write(&source, include_str!("floor.c"))?;
    let built = std::process::Command::new("cc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .context("running cc for the C splice relay (the floor peer)")?;
    if !built.status.success() {
        bail!(
            "building the C splice relay: {}",
            String::from_utf8_lossy(&built.stderr).trim()
        );
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
    let (listen_ip, listen_port) = (listen.ip().to_string(), listen.port().to_string());
    let (proxy_ip, proxy_port) = (proxy.ip().to_string(), proxy.port().to_string());
    bed.start_daemon(
        &bed.hs,
        Enter::Net,
        "floor-relay",
        &binary,
        &[&listen_ip, &listen_port, &proxy_ip, &proxy_port, target, &encoded],
        &[listen.port()],
    )
}
