//! Command line: `egress run | detach | status`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{DEFAULT_PIN_DIR, DefaultRoute};

#[derive(Parser, Debug)]
#[command(
    name = "egress",
    version,
    about = "Transparent egress proxy for Matrix homeserver hosts",
    long_about = "egress catches every outbound TCP connect of the processes in the given cgroups \
                  (a cgroup eBPF program) and sends it through the configured HTTP(S) forward \
                  proxy, applying no_proxy rules and IP blacklists. The homeserver needs no proxy \
                  configuration."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach to the cgroups and proxy their outbound connections until stopped.
    Run(Box<RunArgs>),
    /// Validate the configuration (file, environment, flags) and print the effective one,
    /// secrets redacted. Exits non-zero, naming the bad key and value, if it is invalid.
    CheckConfig(Box<RunArgs>),
    /// Show which rule matches DEST (e.g. matrix.org:8448 or 10.1.2.3:443) and what would
    /// happen to a connection to it, without sending anything to it.
    Explain(Box<ExplainArgs>),
    /// Perform Matrix federation discovery for a server name (.well-known, SRV, 8448) through
    /// egress's policy and upstream proxy, and report each step: what was resolved, which rule
    /// applied, the proxy's answer to CONNECT, the certificate, the federation version answer.
    Doctor(Box<DoctorArgs>),
    /// Add cgroups to the running instance, without restarting it or touching connections.
    Attach(CgroupArgs),
    /// Remove the interception: detach the programs and delete everything pinned; with
    /// --cgroup, only from those cgroups (established connections are not disturbed).
    Detach(DetachArgs),
    /// Show the attached cgroups, the kernel decision counters and the agent's health.
    Status(StatusArgs),
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// HOST[:PORT], IP[:PORT] or [IPv6]:PORT (port 443 by default).
    pub destination: String,
    /// The address HOST resolves to (default: ask the system resolver).
    #[arg(long, value_name = "IP")]
    pub ip: Option<std::net::IpAddr>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// The Matrix server name to check, e.g. example.org (as in @user:example.org).
    #[arg(long, value_name = "NAME")]
    pub server_name: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Extra CA certificates (PEM) to trust for the homeserver's peers, like Synapse's
    /// federation_custom_ca_list; repeatable. The system roots (and SSL_CERT_FILE) count too.
    #[arg(long = "ca-file", value_name = "PATH")]
    pub ca_files: Vec<PathBuf>,
    /// Seconds allowed for each connection, handshake and answer.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub timeout: f64,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(true).args(["cgroups", "units"])))]
pub struct CgroupArgs {
    /// cgroup (v2) directory; repeatable.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<PathBuf>,
    /// systemd unit (its cgroup); repeatable. In a unit's ExecStartPre= the cgroup exists
    /// already, so interception is in place before the service's first connect.
    #[arg(long = "unit", value_name = "UNIT")]
    pub units: Vec<String>,
    #[command(flatten)]
    pub pin: PinDir,
}

#[derive(Args, Debug)]
pub struct DetachArgs {
    /// Detach only from this cgroup; repeatable. Without it, everything is removed.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<PathBuf>,
    #[command(flatten)]
    pub pin: PinDir,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The running agent's admin address, asked for /health.
    #[arg(long, value_name = "IP:PORT", default_value = crate::config::DEFAULT_ADMIN_ADDR)]
    pub admin_addr: std::net::SocketAddr,
    #[command(flatten)]
    pub pin: PinDir,
}

#[derive(Args, Debug)]
pub struct PinDir {
    /// bpffs directory holding egress's pinned programs and maps.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub bpffs_dir: PathBuf,
}

/// Flags of `egress run`. Each overrides the config file and the environment.
#[derive(Args, Debug, Default, Clone)]
pub struct RunArgs {
    /// TOML config file [default: /etc/egress/egress.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// cgroup (v2) directory whose processes are intercepted; repeatable.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<PathBuf>,
    /// systemd unit whose cgroup is intercepted (e.g. matrix-synapse.service); repeatable.
    /// Resolved on hybrid and pure cgroup v2 hosts; the unit must be running.
    #[arg(long = "unit", value_name = "UNIT")]
    pub units: Vec<String>,
    /// Import http_proxy, https_proxy, no_proxy_hosts, ip_range_blacklist and
    /// ip_range_whitelist from Synapse's homeserver.yaml (overridden by everything else).
    #[arg(long, value_name = "PATH")]
    pub homeserver_config: Option<PathBuf>,
    /// Proxy for TLS (and unrecognised) connections, `[http://][user:pass@]host[:port]`
    /// (port 1080 by default). Default: $https_proxy / $HTTPS_PROXY.
    #[arg(long, value_name = "URL")]
    pub https_proxy: Option<String>,
    /// Proxy for plain HTTP requests, forwarded in absolute form. Default: $http_proxy.
    /// Without one, plain HTTP goes direct (blacklist still applies), as in Synapse.
    #[arg(long, value_name = "URL")]
    pub http_proxy: Option<String>,
    /// Destinations that bypass the proxy: `*`, host names (suffix match), IPs, CIDR ranges,
    /// `host:port`; repeatable or comma-separated. Default: $no_proxy.
    #[arg(long, value_name = "ENTRY")]
    pub no_proxy: Vec<String>,
    /// Destinations refused outright (connect fails with EPERM); repeatable. Replaces the
    /// default list (Synapse's private and reserved ranges).
    #[arg(long, value_name = "CIDR")]
    pub ip_range_blacklist: Vec<String>,
    /// Exceptions to the blacklist; repeatable.
    #[arg(long, value_name = "CIDR")]
    pub ip_range_whitelist: Vec<String>,
    /// Port of the agent's listener on 127.0.0.1 [default: 15001].
    #[arg(long, value_name = "PORT")]
    pub listen_port: Option<u16>,
    /// Socket mark on the agent's own connections, never intercepted; non-zero
    /// [default: 0x65677273].
    #[arg(long, value_name = "MARK", value_parser = parse_u32)]
    pub agent_mark: Option<u32>,
    /// Seconds allowed for the TCP connect to the upstream [default: 10].
    #[arg(long, value_name = "SECS")]
    pub connect_timeout: Option<f64>,
    /// Seconds allowed for the proxy's answer to CONNECT [default: 15].
    #[arg(long, value_name = "SECS")]
    pub handshake_timeout: Option<f64>,
    /// Seconds to wait for the client's first bytes (TLS ClientHello or HTTP request head)
    /// [default: 0.5].
    #[arg(long, value_name = "SECS")]
    pub peek_timeout: Option<f64>,
    /// CONNECT to the vetted IP address even when SNI/Host names the destination (DNS-rebinding
    /// safety over proxy-side domain ACLs).
    #[arg(long)]
    pub connect_by_ip: bool,
    /// Route for connections that send neither TLS nor HTTP within the peek window
    /// [default: proxy].
    #[arg(long, value_enum, value_name = "ROUTE")]
    pub default_route: Option<DefaultRoute>,
    /// CA certificates (PEM) to verify https:// proxies with, instead of the system roots.
    #[arg(long, value_name = "PATH")]
    pub proxy_ca_file: Option<PathBuf>,
    /// TESTING ONLY: do not verify the certificate of an https:// proxy (like Synapse's
    /// use_insecure_ssl_client_just_for_testing_do_not_use).
    #[arg(long)]
    pub insecure_skip_proxy_tls_verify: bool,
    /// Emit the kernel programs' debug records (aya-log) into the agent's log.
    #[arg(long)]
    pub kernel_log: bool,
    /// Address of the admin listener serving /health and /metrics [default: 127.0.0.1:9478].
    #[arg(long, value_name = "IP:PORT")]
    pub admin_addr: Option<String>,
    /// Threads serving connections: 1 (one event loop: the lowest latency and memory; a core
    /// relays well over 1 GiB/s), N, or 0 for one per CPU [default: 1].
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,
    /// User to become once the programs are attached (keeping CAP_NET_ADMIN only)
    /// [default: nobody].
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    #[command(flatten)]
    pub pin: OptionalPinDir,
}

#[derive(Args, Debug, Default, Clone)]
pub struct OptionalPinDir {
    /// bpffs directory for the pinned programs and maps [default: /sys/fs/bpf/egress].
    #[arg(long, value_name = "DIR")]
    pub bpffs_dir: Option<PathBuf>,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("'{s}': {e}"))
}
