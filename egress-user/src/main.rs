use clap::Parser;
use egress_user::{
    cli::{Cli, Command, DoctorArgs, ExplainArgs, LogFormat},
    config::Config,
    doctor, ebpf, inspect, run,
};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Attach(args) => {
            let units = args.units.iter().map(|u| egress_user::unit::resolve_unit(u));
            units
                .collect::<anyhow::Result<Vec<_>>>()
                .and_then(|unit_cgroups| {
                    args.cgroups.iter().chain(&unit_cgroups).try_for_each(|cgroup| {
                        ebpf::attach_to_running(&args.pin.bpffs_dir, cgroup)?;
                        println!("attached {}", cgroup.display());
                        Ok(())
                    })
                })
        }
        Command::Detach(args) if !args.cgroups.is_empty() => args.cgroups.iter().try_for_each(|cgroup| {
            let removed = ebpf::detach_cgroup(&args.pin.bpffs_dir, cgroup)?;
            println!("detached {} ({removed} links removed)", cgroup.display());
            Ok(())
        }),
        Command::Detach(args) => match ebpf::detach(&args.pin.bpffs_dir) {
            Ok(true) => {
                println!("detached: removed {}", args.pin.bpffs_dir.display());
                Ok(())
            }
            Ok(false) => {
                println!("nothing to detach at {}", args.pin.bpffs_dir.display());
                Ok(())
            }
            Err(e) => Err(e),
        },
        Command::Status(args) => run::status(&args.pin.bpffs_dir, args.admin_addr),
        Command::CheckConfig(args) => {
            let env: Vec<(String, String)> = std::env::vars().collect();
            Config::load(&args, &env).map(|config| print!("{}", inspect::render_config(&config)))
        }
        Command::Explain(args) => explain(&args),
        Command::Doctor(args) => return run_doctor(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn explain(args: &ExplainArgs) -> anyhow::Result<()> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = Config::load(&args.run, &env)?;
    let (host, port) = inspect::parse_destination(&args.destination)?;
    let ip = match (args.ip, host.parse::<std::net::IpAddr>()) {
        (Some(ip), _) | (None, Ok(ip)) => ip,
        (None, Err(_)) => std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .map_err(|e| anyhow::anyhow!("resolving {host}: {e} (give the address with --ip)"))?
            .next()
            .ok_or_else(|| anyhow::anyhow!("{host} has no address (give one with --ip)"))?
            .ip(),
    };
    print!("{}", inspect::explain(&config, &host, port, ip));
    Ok(())
}

/// Exit status 0 when the federation version endpoint answered through egress, 1 otherwise.
fn run_doctor(args: &DoctorArgs) -> std::process::ExitCode {
    let report = (|| -> anyhow::Result<doctor::report::Report> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let config = Config::load(&args.run, &env)?;
        if !(args.timeout > 0.0 && args.timeout.is_finite()) {
            anyhow::bail!("--timeout {}: must be a positive number of seconds", args.timeout);
        }
        // The mark keeps the doctor's own connections out of interception should it run inside
        // an intercepted cgroup; setting it needs CAP_NET_ADMIN, so only root uses it.
        let mark = if nix::unistd::geteuid().is_root() {
            config.agent_mark
        } else {
            0
        };
        let options = doctor::Options {
            ca_files: args.ca_files.clone(),
            timeout: std::time::Duration::from_secs_f64(args.timeout),
            mark,
        };
        let current = egress_user::agent::Current::new(Config {
            agent_mark: mark,
            ..config
        })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(runtime.block_on(doctor::diagnose(&current, &args.server_name, &options)))
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
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("egress: error: {e:#}");
            std::process::ExitCode::FAILURE
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
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
