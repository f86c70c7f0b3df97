//! Command line: `egress run | detach | status`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egress";
pub const DEFAULT_LISTEN_PORT: u16 = 15001;
/// "egrs": marks the agent's own sockets so the kernel program never redirects them.
pub const DEFAULT_AGENT_MARK: u32 = 0x6567_7273;

#[derive(Parser, Debug)]
#[command(
    name = "egress",
    version,
    about = "Transparent egress proxy for Matrix homeserver hosts",
    long_about = "egress catches every outbound TCP connect of the processes in the given cgroups \
                  (a cgroup eBPF program) and sends it through the configured HTTP(S) forward \
                  proxy. The homeserver needs no proxy configuration."
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
    Run(RunArgs),
    /// Remove the interception: detach the programs and delete everything pinned.
    Detach(PinArgs),
    /// Show the attached cgroups and the kernel decision counters.
    Status(PinArgs),
}

#[derive(Args, Debug)]
pub struct PinArgs {
    /// bpffs directory holding egress's pinned programs and maps.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub bpffs_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// cgroup (v2) directory whose processes are intercepted; repeatable.
    #[arg(long = "cgroup", value_name = "PATH", required = true)]
    pub cgroups: Vec<PathBuf>,
    /// Upstream proxy for tunnelled connections, `[http://][user:pass@]host[:port]`
    /// (default port 1080). Default: the https_proxy / HTTPS_PROXY environment variable.
    #[arg(long, value_name = "URL")]
    pub https_proxy: Option<String>,
    /// Port of the agent's listener on 127.0.0.1, where intercepted connects are sent.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_LISTEN_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub listen_port: u16,
    /// Socket mark on the agent's own connections (never intercepted); non-zero.
    #[arg(long, value_name = "MARK", default_value_t = DEFAULT_AGENT_MARK, value_parser = parse_mark)]
    pub agent_mark: u32,
    /// Seconds allowed for the TCP connect to the upstream proxy.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Seconds allowed for the proxy's answer to CONNECT.
    #[arg(long, value_name = "SECS", default_value_t = 15.0)]
    pub handshake_timeout: f64,
    /// Emit the kernel programs' debug records (aya-log) into the agent's log.
    #[arg(long)]
    pub kernel_log: bool,
    #[command(flatten)]
    pub pin: PinArgs,
}

/// A non-zero u32, decimal or 0x-hex. Zero would match every unmarked socket in the kernel.
fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    match parsed {
        Ok(0) => Err("the agent mark must be non-zero".into()),
        Ok(mark) => Ok(mark),
        Err(e) => Err(format!("'{s}': {e}")),
    }
}
