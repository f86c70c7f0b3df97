//! The benchmark run: one testbed, every peer measured on it in the same run, in rounds that
//! alternate between peers so that drift of the (shared, 2-core) machine spreads over all alike.
//!
//! Phases, each with one agent configuration:
//! 1. squid upstream: first connect() latency for in-kernel bypass and denial against no eBPF
//!    (while the machine is quiet), then direct, application-level proxying, egress and
//!    redsocks;
//! 2. a fast CONNECT proxy upstream (the agent's own overhead, not hidden behind squid):
//!    application-level proxying, egress and redsocks again;
//! 3. squid's TLS port (an `https://` proxy): application-level proxying (the client speaks
//!    TLS to squid itself, a full handshake per connection, as Synapse does) and egress
//!    (redsocks cannot speak TLS to a proxy);
//! 4. delay profiles: squid (`http://` and `https://`) behind a delay line of 0, 2 and 5 ms one
//!    way, and 2 ms with an origin 20 ms away: time to first byte, application-level against
//!    egress, where the round trips egress saves are worth something;
//! 5. a fresh agent: RSS idle and with thousands of idle tunnels.
//!
//! The fast-proxy phase also measures the floor: a minimal C splice relay (floor.c) whose CPU
//! per GiB is what the kernel's work costs anyway.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use egress_testbed::{
    LAN, LAN6, ORIGIN_IP, ORIGIN_NAME, PROXY_IP, PROXY_PASSWORD, PROXY_USER, SQUID_PORT, SQUID_TLS_PORT,
    Testbed,
    process::{Daemon, Enter},
    procfs,
};

use super::{
    BYPASS_IP, DENY_IP, FAST_PROXY_PORT, SOURCE_PORT,
    client::Report,
    delay::Line,
    measure::Summary,
    peers::{self, ClientProc, Redsocks},
    report::{self, ConnectResult, DelayResult, IdleResult, KernelCounts, PathResult, Results},
};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// A short run that checks that everything works (for CI); its figures are rough.
    #[arg(long)]
    pub quick: bool,
    /// Directory for the report (the quick mode writes into its `quick/` subdirectory).
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Measure only these parts (for working on the benchmark itself); default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Part>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Part {
    /// Latency, connection rate and throughput of every path, squid upstream.
    Squid,
    /// The same against the fast CONNECT proxy.
    Fast,
    /// Latency, connection rate and throughput through squid's TLS port (`https://` proxy).
    SquidTls,
    /// connect() latency, in-kernel bypass and denial against no eBPF.
    Connect,
    /// Agent memory, idle and with idle tunnels.
    Idle,
    /// Time to first byte with delay lines in front of squid and the origin.
    Delay,
}

/// How much of everything. The full mode is bounded to a few minutes on 2 cores.
struct Plan {
    /// New HTTPS connections per peer for time to first byte, split over rounds.
    latency_conns: usize,
    latency_rounds: usize,
    rate_seconds: f64,
    rate_rounds: usize,
    /// Bytes per bulk run (one tunnel, or split over 16), and runs per path and tunnel count.
    bulk_bytes: u64,
    bulk_rounds: usize,
    idle_tunnels: usize,
    /// connect() samples per kind (plain, bypassed, denied).
    connect_samples: usize,
    /// New HTTPS connections per peer and delay profile (a third of it with the origin far
    /// away, where each takes several of its round trips), in two rounds.
    delay_conns: usize,
}

const FULL: Plan = Plan {
    latency_conns: 2_000,
    latency_rounds: 4,
    rate_seconds: 3.0,
    rate_rounds: 3,
    bulk_bytes: 1 << 30,
    bulk_rounds: 2,
    // At most: the agent's descriptor limit may allow fewer (see `Bench::idle_tunnels`).
    idle_tunnels: report::TUNNEL_TARGET,
    connect_samples: 5_000,
    delay_conns: 300,
};

const QUICK: Plan = Plan {
    latency_conns: 200,
    latency_rounds: 2,
    rate_seconds: 1.0,
    rate_rounds: 1,
    bulk_bytes: 64 << 20,
    bulk_rounds: 1,
    idle_tunnels: 500,
    connect_samples: 500,
    delay_conns: 12,
};

/// Sockets per idle-tunnel client process (each must stay under the descriptor cap too).
const IDLE_PER_CLIENT: usize = 5_000;
const REDSOCKS_SQUID_PORT: u16 = 12345;
const REDSOCKS_FAST_PORT: u16 = 12346;
/// The C splice relay, on the homeserver host's loopback.
const FLOOR_PORT: u16 = 12400;
/// The delay lines' ports: in front of squid's plain and TLS ports (plus the one-way delay in
/// ms), on the proxy host; in front of nginx, on the origin host.
const DELAYED_SQUID_PORT: u16 = 13000;
const DELAYED_SQUID_TLS_PORT: u16 = 13100;
const DELAYED_ORIGIN_PORT: u16 = 8443;
/// One-way delays to the proxy, ms, each alone, and then one with the origin far away.
const PROXY_DELAYS_MS: [u16; 3] = [0, 2, 5];
const ORIGIN_DELAY_MS: u16 = 20;
const PROFILES: [Profile; 4] = [
    Profile {
        proxy_ms: 0,
        origin_ms: 0,
    },
    Profile {
        proxy_ms: 2,
        origin_ms: 0,
    },
    Profile {
        proxy_ms: 5,
        origin_ms: 0,
    },
    Profile {
        proxy_ms: 2,
        origin_ms: ORIGIN_DELAY_MS,
    },
];
const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    /// No proxy at all: the physical limit.
    Direct,
    /// The client itself speaks CONNECT to the proxy (what Synapse does today).
    App,
    /// The client in the intercepted cgroup, no proxy settings, through the agent.
    Egress,
    /// redsocks with an iptables REDIRECT rule.
    Redsocks,
    /// The C splice relay: the floor of relaying CPU (bulk only).
    Floor,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Upstream {
    Squid,
    Fast,
    /// squid's `https_port`.
    SquidTls,
}

/// Delay lines on the way: one way to the proxy, and from the proxy to the origin.
#[derive(Clone, Copy, PartialEq, Debug)]
struct Profile {
    proxy_ms: u16,
    origin_ms: u16,
}

#[derive(Clone, Copy, Debug)]
struct Peer {
    kind: Kind,
    upstream: Upstream,
    /// Through delay lines (squid only), or straight.
    delay: Option<Profile>,
}

impl Peer {
    fn new(kind: Kind, upstream: Upstream) -> Self {
        Self {
            kind,
            upstream,
            delay: None,
        }
    }

    /// The proxy's port this peer goes to: a delay line's, or the proxy's own.
    fn proxy_port(self) -> u16 {
        match (self.upstream, self.delay) {
            (Upstream::Squid, Some(d)) => DELAYED_SQUID_PORT + d.proxy_ms,
            (Upstream::SquidTls, Some(d)) => DELAYED_SQUID_TLS_PORT + d.proxy_ms,
            (Upstream::Squid, None) => SQUID_PORT,
            (Upstream::SquidTls, None) => SQUID_TLS_PORT,
            (Upstream::Fast, _) => FAST_PROXY_PORT,
        }
    }

    fn label(self) -> String {
        let upstream = match self.upstream {
            Upstream::Squid => "squid",
            Upstream::Fast => "fast proxy",
            Upstream::SquidTls => "squid https://",
        };
        match self.kind {
            Kind::Direct => "direct (no proxy)".into(),
            Kind::App => format!("application-level → {upstream}"),
            Kind::Egress => format!("egress → {upstream}"),
            Kind::Redsocks => format!("redsocks → {upstream}"),
            Kind::Floor => format!("C splice relay (floor) → {upstream}"),
        }
    }
}

/// What the benchmark adds to the testbed. Fields drop in order: clients' cgroups and the
/// servers before the testbed itself.
struct Bench {
    redsocks_squid: Redsocks,
    redsocks_fast: Redsocks,
    floor: Daemon,
    _delay_lines: (Daemon, Daemon),
    _source: Daemon,
    _fast_proxy: Daemon,
    bed: Testbed,
    bin: PathBuf,
    /// Things that failed while measuring: reported, and the run then exits non-zero.
    problems: Vec<String>,
}

pub fn run(args: RunArgs) -> Result<()> {
    super::catch_interrupts();
    let started = Instant::now();
    let plan = if args.quick { QUICK } else { FULL };
    let mode = if args.quick { "quick" } else { "full" };
    let out = if args.quick {
        args.out.join("quick")
    } else {
        args.out.clone()
    };
    let date = report::now_utc();
    let mut bench = Bench::new()?;
    eprintln!("bench: testbed {} ready ({mode} mode)", bench.bed.name);
    let mut results = Results {
        mode: mode.into(),
        date,
        source: report::source(),
        machine: report::machine(),
        ..Default::default()
    };
    let parts = if args.only.is_empty() {
        vec![
            Part::Squid,
            Part::Fast,
            Part::SquidTls,
            Part::Connect,
            Part::Delay,
            Part::Idle,
        ]
    } else {
        args.only.clone()
    };
    bench.measure(&plan, &parts, &mut results)?;
    results.seconds = started.elapsed().as_secs_f64();
    results.problems = bench.problems.clone();
    drop(bench);
    report::write(&out, &results)?;
    eprintln!(
        "bench: report in {} ({:.0} s)",
        out.join("README.md").display(),
        results.seconds
    );
    if !results.problems.is_empty() {
        bail!(
            "the benchmark did not run cleanly:\n{}",
            results.problems.join("\n")
        );
    }
    Ok(())
}

impl Bench {
    fn new() -> Result<Self> {
        let bin = peers::bench_bin()?;
        let bed = Testbed::builder().squid_tls().nginx().build()?;
        // Tens of thousands of short connections leave TIME_WAIT behind; the same wider port
        // range and reuse in the client-side namespaces for every peer.
        for ns in [&bed.hs, &bed.proxy] {
            ns.exec(
                "sysctl",
                &[
                    "-q",
                    "-w",
                    "net.ipv4.ip_local_port_range=10000 65000",
                    "-w",
                    "net.ipv4.tcp_tw_reuse=1",
                ],
            )?;
        }
        bed.origin.add_address(BYPASS_IP)?;
        let source_addr = format!("{ORIGIN_IP}:{SOURCE_PORT}");
        let source = bed.start_daemon(
            &bed.origin,
            Enter::Net,
            "source",
            &bin,
            &["source", "--listen", &source_addr],
            &[SOURCE_PORT],
        )?;
        let fast_addr = format!("{PROXY_IP}:{FAST_PROXY_PORT}");
        let auth = format!("{PROXY_USER}:{PROXY_PASSWORD}");
        let host = format!("{ORIGIN_NAME}={ORIGIN_IP}");
        let fast_proxy = bed.start_daemon(
            &bed.proxy,
            Enter::Net,
            "fast-proxy",
            &bin,
            &[
                "connect-proxy",
                "--listen",
                &fast_addr,
                "--auth",
                &auth,
                "--host",
                &host,
            ],
            &[FAST_PROXY_PORT],
        )?;
        let floor = peers::start_floor(
            &bed,
            SocketAddr::from(([127, 0, 0, 1], FLOOR_PORT)),
            fast_addr.parse()?,
            &source_addr,
            &auth,
        )?;
        let delay_lines = start_delay_lines(&bed, &bin)?;
        let redsocks_squid = peers::start_redsocks(
            &bed,
            "redsocks-squid",
            REDSOCKS_SQUID_PORT,
            format!("{PROXY_IP}:{SQUID_PORT}").parse()?,
            PROXY_USER,
            PROXY_PASSWORD,
        )?;
        let redsocks_fast = peers::start_redsocks(
            &bed,
            "redsocks-fast",
            REDSOCKS_FAST_PORT,
            fast_addr.parse()?,
            PROXY_USER,
            PROXY_PASSWORD,
        )?;
        Ok(Self {
            redsocks_squid,
            redsocks_fast,
            floor,
            _delay_lines: delay_lines,
            _source: source,
            _fast_proxy: fast_proxy,
            bed,
            bin,
            problems: Vec::new(),
        })
    }

    fn measure(&mut self, plan: &Plan, parts: &[Part], results: &mut Results) -> Result<()> {
        let squid_peers = [Kind::Direct, Kind::App, Kind::Egress, Kind::Redsocks]
            .map(|kind| Peer::new(kind, Upstream::Squid));
        let fast_peers = [Kind::App, Kind::Egress, Kind::Redsocks, Kind::Floor]
            .map(|kind| Peer::new(kind, Upstream::Fast));
        // The squid configuration also serves the connect() measurement: the bypass set holds
        // BYPASS_IP whatever the upstream.
        let phase = Instant::now();
        self.start_agent(Upstream::Squid)?;
        // First, while the machine is quiet: the difference sought is about a microsecond.
        if parts.contains(&Part::Connect) {
            results.connect = Some(self.connect_latency(plan)?);
        }
        if parts.contains(&Part::Squid) {
            results.paths.extend(self.measure_peers(plan, &squid_peers)?);
            results.agent_rss_after_load_kib = Some(procfs::rss_kib(self.agent_pid()?)?);
        }
        eprintln!("bench: squid phase done ({:.0} s)", phase.elapsed().as_secs_f64());

        if parts.contains(&Part::Fast) {
            let phase = Instant::now();
            self.start_agent(Upstream::Fast)?;
            results.paths.extend(self.measure_peers(plan, &fast_peers)?);
            eprintln!(
                "bench: fast-proxy phase done ({:.0} s)",
                phase.elapsed().as_secs_f64()
            );
        }
        if parts.contains(&Part::SquidTls) {
            let phase = Instant::now();
            self.start_agent(Upstream::SquidTls)?;
            let tls_peers = [Kind::App, Kind::Egress].map(|kind| Peer::new(kind, Upstream::SquidTls));
            results.paths.extend(self.measure_peers(plan, &tls_peers)?);
            eprintln!(
                "bench: squid https:// phase done ({:.0} s)",
                phase.elapsed().as_secs_f64()
            );
        }
        if parts.contains(&Part::Delay) {
            let phase = Instant::now();
            for upstream in [Upstream::Squid, Upstream::SquidTls] {
                for profile in PROFILES {
                    results.delay.push(self.delay_profile(plan, upstream, profile)?);
                }
            }
            eprintln!(
                "bench: delay profiles done ({:.0} s)",
                phase.elapsed().as_secs_f64()
            );
        }
        if parts.contains(&Part::Idle) {
            let phase = Instant::now();
            self.start_agent(Upstream::Fast)?;
            results.idle = Some(self.idle_tunnels(plan)?);
            eprintln!(
                "bench: idle tunnels done ({:.0} s)",
                phase.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    /// (Re)starts the agent chaining to `upstream`; the origin's second address is bypassed
    /// in the kernel, the rest of the test LAN whitelisted (it is private address space).
    fn start_agent(&mut self, upstream: Upstream) -> Result<()> {
        self.start_agent_for(Peer::new(Kind::Egress, upstream))
    }

    /// (Re)starts the agent chaining to `peer`'s proxy port (a delay line's, or the proxy's).
    fn start_agent_for(&mut self, peer: Peer) -> Result<()> {
        let scheme = match peer.upstream {
            Upstream::SquidTls => "https",
            Upstream::Squid | Upstream::Fast => "http",
        };
        let proxy = format!(
            "{scheme}://{PROXY_USER}:{PROXY_PASSWORD}@{PROXY_IP}:{}",
            peer.proxy_port()
        );
        let bypass = format!("{BYPASS_IP}/32");
        let ca = self.bed.certs.ca.to_string_lossy().into_owned();
        let args = [
            "--proxy-ca-file",
            &ca,
            "--https-proxy",
            &proxy,
            "--ip-range-whitelist",
            LAN,
            "--ip-range-whitelist",
            LAN6,
            "--no-proxy",
            &bypass,
        ];
        // Extra agent flags from the environment, for before/after runs of one mechanism
        // (e.g. `EGRESS_BENCH_AGENT_ARGS="--warm-upstream 0"`).
        let extra = std::env::var("EGRESS_BENCH_AGENT_ARGS").unwrap_or_default();
        let args: Vec<&str> = args.iter().copied().chain(extra.split_whitespace()).collect();
        self.bed.start_agent(&args)?;
        let pid = self.agent_pid()?;
        // The testbed starts it through sh and nsenter, both of which exec: the pid is the agent's.
        let comm = procfs::comm(pid)?;
        let bin = egress_testbed::egress_bin();
        let name = bin
            .file_name()
            .context("EGRESS_BIN has no file name")?
            .to_string_lossy();
        // The kernel keeps the first 15 bytes of a command name.
        if !name.as_bytes().starts_with(comm.as_bytes()) || comm.is_empty() {
            bail!("process {pid} is {comm:?}, not the agent ({name})");
        }
        Ok(())
    }

    fn agent_pid(&self) -> Result<u32> {
        self.bed.agent().pid().context("the agent is not running")
    }

    /// Where a peer's client runs and how it addresses the origin: `https` for nginx's TLS
    /// port, else the byte source.
    fn client_for(&self, peer: Peer, https: bool) -> (PathBuf, Vec<String>) {
        let far_origin = peer.delay.is_some_and(|d| d.origin_ms > 0);
        let port = match (https, far_origin) {
            (true, true) => DELAYED_ORIGIN_PORT,
            (true, false) => 443,
            (false, _) => SOURCE_PORT,
        };
        let target = match peer.kind {
            Kind::Floor => format!("127.0.0.1:{FLOOR_PORT}"),
            _ => format!("{ORIGIN_IP}:{port}"),
        };
        let mut args = vec![
            "client".to_owned(),
            "--target".to_owned(),
            target.clone(),
            "--ca".to_owned(),
            self.bed.certs.ca.to_string_lossy().into_owned(),
        ];
        let cgroup = match peer.kind {
            Kind::Direct | Kind::Floor => self.bed.cgroup_b.path.clone(),
            Kind::App => {
                if peer.upstream == Upstream::SquidTls {
                    args.push("--proxy-tls".to_owned());
                }
                let proxy_port = peer.proxy_port();
                // Like Synapse: CONNECT by name for TLS; the byte source has no name.
                let connect_to = if https {
                    format!("{ORIGIN_NAME}:{port}")
                } else {
                    target
                };
                args.extend([
                    "--proxy".to_owned(),
                    format!("{PROXY_IP}:{proxy_port}"),
                    "--proxy-auth".to_owned(),
                    format!("{PROXY_USER}:{PROXY_PASSWORD}"),
                    "--connect-to".to_owned(),
                    connect_to,
                ]);
                self.bed.cgroup_b.path.clone()
            }
            Kind::Egress => self.bed.cgroup.path.clone(),
            Kind::Redsocks => match peer.upstream {
                Upstream::Squid | Upstream::SquidTls => self.redsocks_squid.clients.path.clone(),
                Upstream::Fast => self.redsocks_fast.clients.path.clone(),
            },
        };
        (cgroup, args)
    }

    /// Runs one client for `peer` with `mode_args` and returns its report; failures of single
    /// connections are recorded as problems, a client that cannot run is an error.
    fn client(&mut self, peer: Peer, https: bool, mode_args: &[&str], within: Duration) -> Result<Report> {
        let (cgroup, mut args) = self.client_for(peer, https);
        args.extend(mode_args.iter().map(|s| s.to_string()));
        args.extend(["--timeout".to_owned(), within.as_secs_f64().to_string()]);
        let what = format!("{} {}", peer.label(), mode_args.join(" "));
        let report: Report = peers::run_client(
            &self.bed,
            &cgroup,
            &self.bin,
            &args,
            what.clone(),
            within + Duration::from_secs(10),
        )?;
        if report.errors > 0 {
            self.problems.push(format!(
                "{what}: {} failed, first: {}",
                report.errors,
                report.first_error.as_deref().unwrap_or("?")
            ));
        }
        Ok(report)
    }

    /// Latency, connection rate and bulk throughput of each peer, interleaved in rounds.
    fn measure_peers(&mut self, plan: &Plan, list: &[Peer]) -> Result<Vec<PathResult>> {
        let mut results: Vec<PathResult> = list
            .iter()
            .map(|p| PathResult {
                key: format!("{:?}/{:?}", p.kind, p.upstream).to_lowercase(),
                label: p.label(),
                ..Default::default()
            })
            .collect();
        // Warm up: squid's credential cache, redsocks' auth negotiation, the agent. (The floor
        // relay only moves bulk bytes.)
        let tls_capable: Vec<usize> = (0..list.len()).filter(|&i| list[i].kind != Kind::Floor).collect();
        for &peer in list.iter().filter(|p| p.kind != Kind::Floor) {
            let report = self.client(
                peer,
                true,
                &["--mode", "latency", "--count", "10"],
                Duration::from_secs(60),
            )?;
            if report.completed == 0 {
                bail!("{}: no request succeeded: {:?}", peer.label(), report.first_error);
            }
        }

        let mut samples: Vec<Vec<u32>> = vec![Vec::new(); list.len()];
        let per_round = (plan.latency_conns / plan.latency_rounds).to_string();
        for round in 0..plan.latency_rounds {
            for i in rotation(list.len(), round).filter(|i| tls_capable.contains(i)) {
                let report = self.client(
                    list[i],
                    true,
                    &["--mode", "latency", "--count", &per_round],
                    Duration::from_secs(300),
                )?;
                samples[i].extend(report.samples_us);
                results[i].errors += report.errors;
            }
        }
        for (result, samples) in results.iter_mut().zip(&samples) {
            result.latency_us = Summary::of(samples);
        }
        eprintln!("bench: latency done");

        let seconds = plan.rate_seconds.to_string();
        let mut rate = vec![(0u64, 0f64); list.len()];
        for round in 0..plan.rate_rounds {
            for i in rotation(list.len(), round).filter(|i| tls_capable.contains(i)) {
                let cpu = self.cpu_of(list[i])?;
                let report = self.client(
                    list[i],
                    true,
                    &["--mode", "rate", "--concurrency", "64", "--seconds", &seconds],
                    Duration::from_secs_f64(plan.rate_seconds + 60.0),
                )?;
                if let (Some(before), Some(after)) = (cpu, self.cpu_of(list[i])?) {
                    *results[i].cpu_us_per_conn.get_or_insert(0.0) += (after - before) * 1e6;
                }
                rate[i].0 += report.completed;
                rate[i].1 += report.seconds;
                results[i].errors += report.errors;
            }
        }
        for (result, (completed, seconds)) in results.iter_mut().zip(&rate) {
            if *seconds == 0.0 {
                continue;
            }
            result.conns_per_s = Some(*completed as f64 / seconds);
            if let Some(cpu) = result.cpu_us_per_conn.as_mut() {
                *cpu /= (*completed).max(1) as f64;
            }
        }
        eprintln!("bench: connection rate done");

        let bytes = plan.bulk_bytes.to_string();
        // Per path: (bytes, seconds) through 1 and through 16 tunnels; relay CPU and bytes.
        let mut bulk = vec![[(0u64, 0f64); 2]; list.len()];
        let mut cpu = vec![(0f64, 0u64); list.len()];
        for round in 0..plan.bulk_rounds {
            for i in rotation(list.len(), round) {
                let before = self.cpu_of(list[i])?;
                for (t, tunnels) in ["1", "16"].into_iter().enumerate() {
                    let report = self.client(
                        list[i],
                        false,
                        &["--mode", "bulk", "--bytes", &bytes, "--tunnels", tunnels],
                        Duration::from_secs(180),
                    )?;
                    results[i].errors += report.errors;
                    bulk[i][t].0 += report.bytes;
                    bulk[i][t].1 += report.seconds;
                    cpu[i].1 += report.bytes;
                }
                if let (Some(before), Some(after)) = (before, self.cpu_of(list[i])?) {
                    cpu[i].0 += after - before;
                }
            }
        }
        for (i, result) in results.iter_mut().enumerate() {
            let mib_s = |(bytes, seconds): (u64, f64)| (seconds > 0.0).then(|| bytes as f64 / MIB / seconds);
            result.bulk1_mib_s = mib_s(bulk[i][0]);
            result.bulk16_mib_s = mib_s(bulk[i][1]);
            if self.cpu_of(list[i])?.is_some() && cpu[i].1 > 0 {
                result.cpu_s_per_gib = Some(cpu[i].0 / (cpu[i].1 as f64 / GIB));
            }
        }
        eprintln!("bench: bulk throughput done");
        Ok(results)
    }

    /// Time to first byte through the delay lines of `profile`, application-level against
    /// egress (restarted for the delay line's port, so its warm pool dials through it too), in
    /// two rounds that alternate which goes first.
    fn delay_profile(&mut self, plan: &Plan, upstream: Upstream, profile: Profile) -> Result<DelayResult> {
        let app = Peer {
            delay: Some(profile),
            ..Peer::new(Kind::App, upstream)
        };
        let egress = Peer {
            kind: Kind::Egress,
            ..app
        };
        self.start_agent_for(egress)?;
        let count = if profile.origin_ms > 0 {
            plan.delay_conns / 3
        } else {
            plan.delay_conns
        };
        let peers = [app, egress];
        let mut samples: [Vec<u32>; 2] = Default::default();
        for round in 0..3 {
            for i in rotation(2, round) {
                // The first round warms up (squid's credential cache, the pool) and is not kept.
                let n = if round == 0 { 4 } else { count.div_ceil(2) };
                let report = self.client(
                    peers[i],
                    true,
                    &["--mode", "latency", "--count", &n.to_string()],
                    Duration::from_secs(300),
                )?;
                if report.completed == 0 {
                    bail!(
                        "{}: no request succeeded: {:?}",
                        peers[i].label(),
                        report.first_error
                    );
                }
                if round > 0 {
                    samples[i].extend(report.samples_us);
                }
            }
        }
        let what = format!(
            "{} with {} ms to the proxy, {} ms to the origin",
            egress.label(),
            profile.proxy_ms,
            profile.origin_ms
        );
        let summary = |s: &[u32]| Summary::of(s).with_context(|| format!("{what}: no samples"));
        eprintln!("bench: {what} done");
        Ok(DelayResult {
            upstream: match upstream {
                Upstream::SquidTls => "squid https://".into(),
                _ => "squid".into(),
            },
            proxy_ms: profile.proxy_ms,
            origin_ms: profile.origin_ms,
            app_us: summary(&samples[0])?,
            egress_us: summary(&samples[1])?,
        })
    }

    /// CPU seconds so far of the process in the middle of `peer`'s path, if it has one of ours.
    fn cpu_of(&self, peer: Peer) -> Result<Option<f64>> {
        let pid = match (peer.kind, peer.upstream) {
            (Kind::Egress, _) => self.agent_pid()?,
            (Kind::Redsocks, Upstream::Squid | Upstream::SquidTls) => self.redsocks_squid.daemon.child.id(),
            (Kind::Redsocks, Upstream::Fast) => self.redsocks_fast.daemon.child.id(),
            (Kind::Floor, _) => self.floor.child.id(),
            _ => return Ok(None),
        };
        Ok(Some(procfs::cpu_seconds(pid)?))
    }

    /// connect() latency: no eBPF (a cgroup with nothing attached) against the intercepted
    /// cgroup for a destination bypassed in the kernel, and one denied there.
    fn connect_latency(&mut self, plan: &Plan) -> Result<ConnectResult> {
        let args = [
            "client".to_owned(),
            "--mode".to_owned(),
            "connect".to_owned(),
            "--target".to_owned(),
            format!("{BYPASS_IP}:80"),
            "--count".to_owned(),
            plan.connect_samples.to_string(),
            "--plain-cgroup".to_owned(),
            self.bed.cgroup_b.path.to_string_lossy().into_owned(),
            "--intercepted-cgroup".to_owned(),
            self.bed.cgroup.path.to_string_lossy().into_owned(),
            "--bypass".to_owned(),
            format!("{BYPASS_IP}:80"),
            "--deny".to_owned(),
            format!("{DENY_IP}:80"),
            "--timeout".to_owned(),
            "120".to_owned(),
        ];
        let plain = self.bed.cgroup_b.path.clone();
        let counters = |bench: &Self| -> Result<[u64; 3]> {
            let agent = bench.bed.agent();
            Ok([
                agent.counter("pass_no_proxy")?,
                agent.counter("deny_blacklist")?,
                agent.counter("redirected")?,
            ])
        };
        let before = counters(self)?;
        let report: Report = peers::run_client(
            &self.bed,
            &plain,
            &self.bin,
            &args,
            "connect latency".into(),
            Duration::from_secs(130),
        )?;
        if report.errors > 0 {
            self.problems.push(format!(
                "connect latency: {} unexpected results, first: {}",
                report.errors,
                report.first_error.as_deref().unwrap_or("?")
            ));
        }
        let after = counters(self)?;
        let kernel = KernelCounts {
            bypass_calls: report.bypass_calls,
            pass_no_proxy: after[0] - before[0],
            deny_calls: report.deny_calls,
            deny_blacklist: after[1] - before[1],
            redirected: after[2] - before[2],
        };
        // Every bypass sample must have been a bypass in the kernel (and every denial a denial):
        // otherwise the figures measure something else, and the benchmark fails.
        if let Some(mismatch) = kernel.mismatch() {
            bail!("connect latency: {mismatch}");
        }
        if report.bypass_ns.len() as u64 > kernel.pass_no_proxy
            || report.deny_ns.len() as u64 > kernel.deny_blacklist
        {
            bail!("connect latency: more samples than kernel decisions: {kernel:?}");
        }
        eprintln!(
            "bench: connect latency done (pass_no_proxy +{} for {} bypassed calls)",
            kernel.pass_no_proxy, kernel.bypass_calls
        );
        Ok(ConnectResult {
            plain_ns: Summary::of(&report.plain_ns).context("no plain connect samples")?,
            bypass_ns: Summary::of(&report.bypass_ns).context("no bypassed connect samples")?,
            deny_ns: Summary::of(&report.deny_ns).context("no denied connect samples")?,
            kernel: Some(kernel),
        })
    }

    /// Agent RSS idle, and with `plan.idle_tunnels` idle tunnels open through it, each of which
    /// has carried a byte back from the origin (so it is set up end to end).
    fn idle_tunnels(&mut self, plan: &Plan) -> Result<IdleResult> {
        let pid = self.agent_pid()?;
        // Two descriptors per tunnel in the agent, whose limit nothing here can raise (root
        // without CAP_SYS_RESOURCE): as many tunnels as fit, up to the plan's number.
        let limit = procfs::nofile_hard_limit(pid)?;
        let tunnels = plan.idle_tunnels.min(report::tunnels_that_fit(limit));
        let peer = Peer::new(Kind::Egress, Upstream::Fast);
        // One connection first: the runtime's threads and buffers exist in a working agent.
        self.client(
            peer,
            false,
            &["--mode", "bulk", "--bytes", "1048576"],
            Duration::from_secs(30),
        )?;
        std::thread::sleep(Duration::from_secs(1));
        let rss_idle_kib = procfs::rss_kib(pid)?;

        // At least two clients, opened one after the other, so that the memory a tunnel adds
        // is measured between two sizes (the first tunnels also pay for one-off growth: the
        // allocator keeps what the concurrent handshakes used).
        let (cgroup, base_args) = self.client_for(peer, false);
        let clients_needed = tunnels.div_ceil(IDLE_PER_CLIENT).max(2);
        let mut clients = Vec::new();
        let mut opened = 0;
        let mut rss_steps = Vec::new();
        for c in 0..clients_needed {
            let n = tunnels / clients_needed + usize::from(c < tunnels % clients_needed);
            let mut args = base_args.clone();
            args.extend(["--mode", "idle", "--count", &n.to_string(), "--timeout", "600"].map(String::from));
            let mut client = ClientProc::spawn(
                &self.bed,
                &cgroup,
                &self.bin,
                &args,
                format!("idle tunnels ({n})"),
            )?;
            let report: Report = client.next(Duration::from_secs(300))?;
            opened += report.completed;
            if report.errors > 0 {
                self.problems.push(format!(
                    "idle tunnels: {} failed to open, first: {}",
                    report.errors,
                    report.first_error.as_deref().unwrap_or("?")
                ));
            }
            clients.push(client);
            // Let the agent finish its bookkeeping (decision state, allocator) before reading.
            std::thread::sleep(Duration::from_secs(2));
            rss_steps.push((opened, procfs::rss_kib(pid)?));
        }
        let active = self.bed.agent().metric("egress_connections_active", &[])?;
        let (rss_anon_kib, _) = procfs::rss_split_kib(pid)?;
        let mut alive = 0;
        for client in &mut clients {
            client.send_line()?;
        }
        for mut client in clients {
            let report: Report = client.next(Duration::from_secs(60))?;
            alive += report.completed;
            client.finish(Duration::from_secs(60))?;
        }
        if alive != opened {
            self.problems.push(format!(
                "idle tunnels: {} of {opened} closed while held",
                opened - alive
            ));
        }
        let (first_n, first_rss) = rss_steps[0];
        let (last_n, rss_open_kib) = *rss_steps.last().expect("two steps");
        let marginal_kib =
            rss_open_kib.saturating_sub(first_rss) as f64 / last_n.saturating_sub(first_n).max(1) as f64;
        Ok(IdleResult {
            agent_nofile_limit: Some(limit),
            tunnels,
            opened,
            alive,
            agent_active: active,
            rss_idle_kib,
            rss_steps,
            rss_open_kib,
            rss_open_anon_kib: rss_anon_kib,
            per_tunnel_kib: rss_open_kib.saturating_sub(rss_idle_kib) as f64 / opened.max(1) as f64,
            marginal_kib,
            // From the largest measured point on, each further tunnel at the marginal cost.
            rss_10k_kib: rss_open_kib as f64
                + marginal_kib * (report::TUNNEL_TARGET as u64).saturating_sub(opened) as f64,
        })
    }
}

/// The delay lines of every profile, in one process on each side: in front of squid's plain and
/// TLS ports on the proxy host, and in front of nginx on the origin host.
fn start_delay_lines(bed: &Testbed, bin: &std::path::Path) -> Result<(Daemon, Daemon)> {
    let proxy = |port: u16| SocketAddr::new(PROXY_IP.parse().expect("PROXY_IP"), port);
    let mut proxy_lines = Vec::new();
    for ms in PROXY_DELAYS_MS {
        for (front, port) in [
            (DELAYED_SQUID_PORT, SQUID_PORT),
            (DELAYED_SQUID_TLS_PORT, SQUID_TLS_PORT),
        ] {
            proxy_lines.push(Line {
                listen: proxy(front + ms),
                to: proxy(port),
                delay: Duration::from_millis(ms.into()),
            });
        }
    }
    let origin = |port: u16| SocketAddr::new(ORIGIN_IP.parse().expect("ORIGIN_IP"), port);
    let origin_line = Line {
        listen: origin(DELAYED_ORIGIN_PORT),
        to: origin(443),
        delay: Duration::from_millis(ORIGIN_DELAY_MS.into()),
    };
    let start = |ns, name, lines: &[Line]| {
        let mut args = vec!["delay-line".to_owned()];
        for line in lines {
            args.extend(["--line".to_owned(), line.arg()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ports: Vec<u16> = lines.iter().map(|l| l.listen.port()).collect();
        bed.start_daemon(ns, Enter::Net, name, bin, &args, &ports)
    };
    Ok((
        start(&bed.proxy, "delay-proxy", &proxy_lines)?,
        start(&bed.origin, "delay-origin", &[origin_line])?,
    ))
}

/// Indexes 0..n starting at `round` (mod n): each peer goes first in turn.
fn rotation(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + round) % n)
}

#[cfg(test)]
mod tests {
    use super::rotation;

    #[test]
    fn every_peer_goes_first_in_turn() {
        assert_eq!(rotation(3, 0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(rotation(3, 1).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(rotation(3, 5).collect::<Vec<_>>(), [2, 0, 1]);
    }
}
