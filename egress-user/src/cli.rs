//! The command line: its commands and flags, and which module carries out each.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::{
    config::{
        self, RunArgs, Settings,
        settings::{Engine, PinDir, Targets},
    },
    daemon, diag, kernel,
    redact::redact_credentials,
    upstream::Upstreams,
    workloads,
};

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
    Attach(AttachArgs),
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

/// `egress attach`: the same target flags as `egress run`'s.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(true).args(["cgroups", "units", "containers"])))]
pub struct AttachArgs {
    #[command(flatten)]
    pub targets: Targets,
    #[command(flatten)]
    pub engine: Engine,
    #[command(flatten)]
    pub pins: PinDir,
}

#[derive(Args, Debug)]
pub struct DetachArgs {
    /// Detach only from this cgroup; repeatable. Without it, everything is removed.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<PathBuf>,
    #[command(flatten)]
    pub pins: PinDir,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The running agent's admin address, asked for /health.
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:9478")]
    pub admin_addr: std::net::SocketAddr,
    #[command(flatten)]
    pub pins: PinDir,
}

/// The command line, parsed: clap's own reading of the environment is off (the environment is
/// a configuration layer of its own, see `config::sources`), and the settings remember which of
/// them were given.
fn parse() -> Result<Cli, clap::Error> {
    let command = Cli::command().mut_subcommands(|sub| sub.mut_args(|arg| arg.env(None)));
    let matches = command.try_get_matches()?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let Some((_, sub)) = matches.subcommand() {
        let given = config::sources::given_on_command_line(sub);
        match &mut cli.command {
            Command::Run(args) | Command::CheckConfig(args) => args.given = given,
            Command::Explain(args) => args.run.given = given,
            Command::Doctor(args) => args.run.given = given,
            _ => {}
        }
    }
    Ok(cli)
}

/// The settings of `egress run` for `args`, from every source, with units resolved.
fn load(args: &RunArgs) -> anyhow::Result<Settings> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut settings = config::load(args, &env)?;
    workloads::cgroups::resolve_units(&mut settings)?;
    Ok(settings)
}

/// Runs the command given on the command line.
pub fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap quotes what it could not parse: a misplaced proxy URL would show its password.
            let text = e.render().to_string();
            if e.use_stderr() {
                eprint!("{}", redact_credentials(&text));
            } else {
                print!("{text}");
            }
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => daemon::run(&args),
        Command::Attach(args) => workloads::attach_to_running(
            &args.pins.bpffs_dir,
            &args.targets,
            &args.engine.container_engine_socket,
        )
        .map(|done| done.iter().for_each(|line| println!("{line}"))),
        Command::Detach(args) if !args.cgroups.is_empty() => args.cgroups.iter().try_for_each(|cgroup| {
            let removed = workloads::detach_cgroup(&args.pins.bpffs_dir, cgroup)?;
            println!("detached {} ({removed} links removed)", cgroup.display());
            Ok(())
        }),
        Command::Detach(args) => match kernel::detach(&args.pins.bpffs_dir) {
            Ok(true) => {
                println!("detached: removed {}", args.pins.bpffs_dir.display());
                Ok(())
            }
            Ok(false) => {
                println!("nothing to detach at {}", args.pins.bpffs_dir.display());
                Ok(())
            }
            Err(e) => Err(e),
        },
        Command::Status(args) => diag::status::status(&args.pins.bpffs_dir, args.admin_addr),
        Command::CheckConfig(args) => load(&args).and_then(|settings| {
            let (text, problem) = diag::check_config::check_config(&settings);
            print!("{text}");
            match problem {
                None => Ok(()),
                Some(problem) => Err(anyhow::anyhow!(problem)),
            }
        }),
        Command::Explain(args) => explain(&args),
        Command::Doctor(args) => return run_doctor(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress: error: {}", redact_credentials(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn explain(args: &ExplainArgs) -> anyhow::Result<()> {
    let settings = load(&args.run)?;
    let (host, port) = crate::hostport::parse_destination(&args.destination)?;
    let ip = match (args.ip, host.parse::<std::net::IpAddr>()) {
        (Some(ip), _) | (None, Ok(ip)) => ip,
        (None, Err(_)) => std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .map_err(|e| anyhow::anyhow!("resolving {host}: {e} (give the address with --ip)"))?
            .next()
            .ok_or_else(|| anyhow::anyhow!("{host} has no address (give one with --ip)"))?
            .ip(),
    };
    let record = diag::explain::agent_record(settings.admin_addr.0, &host, ip, port);
    print!("{}", diag::explain::explain(&settings, &host, port, ip, &record));
    Ok(())
}

/// Exit status 0 when the federation version endpoint answered through egress, 1 otherwise.
fn run_doctor(args: &DoctorArgs) -> ExitCode {
    let report = (|| -> anyhow::Result<diag::doctor::report::Report> {
        let settings = load(&args.run)?;
        if !(args.timeout > 0.0 && args.timeout.is_finite()) {
            anyhow::bail!("--timeout {}: must be a positive number of seconds", args.timeout);
        }
        // The mark keeps the doctor's own connections out of interception should it run inside
        // an intercepted cgroup; setting it needs CAP_NET_ADMIN, so only root uses it.
        let mark = if nix::unistd::geteuid().is_root() {
            settings.agent_mark.0
        } else {
            0
        };
        let options = diag::doctor::Options {
            ca_files: args.ca_files.clone(),
            timeout: std::time::Duration::from_secs_f64(args.timeout),
            mark,
        };
        // Kerberos as the agent has it (its keytab), not the invoking user's tickets.
        crate::upstream::negotiate::set_environment(&settings);
        // Every probe dials: it checks the proxy, not connections kept ready.
        let upstreams = Upstreams::new(&settings, mark, false)?;
        let routing = crate::agent::Routing::with_upstreams(settings, upstreams);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(runtime.block_on(diag::doctor::diagnose(&routing, &args.server_name, &options)))
    })();
    match report {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("report serializes")
                );
            } else {
                print!("{}", report.render_text());
            }
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("egress: error: {}", redact_credentials(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EGRESS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // A decision record has a field named `target` (the CONNECT target, see
        // `proxy::decision`): tracing's own target would take its place in a flattened object.
        LogFormat::Json => builder.json().flatten_event(true).with_target(false).init(),
    }
}
