//! Project tasks: `cargo xtask setup | build | run | test | bench | fuzz | soak | deb | docs`.

mod bench;
mod deb;
mod demo;
mod fuzz;
mod imports;
mod kernel;
mod previous;
mod setup;
mod system;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "egress project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks: Debian packages, nightly rust-src, bpf-linker.
    Setup,
    /// Build the eBPF programs and the `egress` binary that embeds them (release).
    Build,
    /// Set up, build and run `egress run ARGS` as root. With no ARGS: the demo topology.
    Run {
        /// With no ARGS: exit after one round of the demo instead of running until Ctrl-C.
        #[arg(long)]
        once: bool,
        /// Arguments for `egress run`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run every test: unit tests, the root-only namespace tests, a short
    /// run of each fuzz target, and the benchmark's quick mode.
    Test {
        /// Skip the fuzz smoke run.
        #[arg(long)]
        no_fuzz: bool,
        /// Skip the quick benchmark run (`cargo xtask bench --quick`).
        #[arg(long)]
        no_bench: bool,
        /// Run the integration tests inside Debian's kernel VERSION (e.g. 6.1, 6.12) under
        /// qemu instead: by default the smoke set (tunnel, policy, hardening); ARGS name
        /// other test files. No fuzzing or benchmark then.
        #[arg(long, value_name = "VERSION")]
        kernel: Option<String>,
        /// Run the system test instead: Debian 12 booted with systemd as PID 1 under qemu,
        /// the package installed with apt and used by a Synapse unit (tests/tests/system.rs).
        #[arg(long, conflicts_with = "kernel")]
        system: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build `target/egress_VERSION_amd64.deb` (binary, systemd unit and Synapse drop-in, not
    /// enabled; /etc/egress/egress.toml as a conffile; the `egress` system user).
    Deb,
    /// The opt-in soak test: traffic through the agent for SECONDS, checking that its
    /// descriptors and memory do not grow.
    Soak {
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
    /// Set up, build, and measure egress against direct connections, application-level
    /// proxying and redsocks on one testbed; report in bench/results/.
    Bench {
        /// A short run (under 2 minutes) that checks that the benchmark works.
        #[arg(long)]
        quick: bool,
    },
    /// Write the configuration reference (docs/configuration.md) from the settings'
    /// declarations; `cargo xtask test` fails while the committed one is stale.
    Docs,
    /// Run each fuzz target (cargo-fuzz, nightly) for SECONDS, from the seed corpora.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(true),
        Task::Build => {
            setup::setup(false)?;
            build()
        }
        Task::Run { once, args } => {
            require_root()?;
            setup::setup(true)?;
            build()?;
            if args.is_empty() {
                demo::run(&egress_bin(), once)
            } else {
                let mut full = vec!["run".to_owned()];
                full.extend(args);
                let refs: Vec<&str> = full.iter().map(String::as_str).collect();
                setup::sh(&egress_bin().to_string_lossy(), &refs, &[])
            }
        }
        Task::Test {
            no_fuzz,
            no_bench,
            kernel,
            system,
            args,
        } => {
            require_root()?;
            // Before anything slow: the agent's modules import one another one way only.
            imports::check(&workspace_root().join("egress-user/src"))?;
            setup::setup(true)?;
            build()?;
            if system {
                return system::run(&workspace_root(), &egress_bin());
            }
            if let Some(version) = kernel {
                return kernel::run(&workspace_root(), &egress_bin(), &version, &args);
            }
            // The fuzz smoke first, so that the test runner's summary closes the output.
            if !no_fuzz && args.is_empty() {
                fuzz::run(&workspace_root(), 5, &[])?;
            }
            // That the benchmark still runs end to end (its figures are the full mode's job).
            if !no_bench && args.is_empty() {
                bench::run(&workspace_root(), &egress_bin(), true)?;
            }
            egress_testbed::sweep_leftovers();
            let bin = egress_bin();
            // The package, and a clean Debian 12 to install it into (tests/tests/package.rs).
            let deb = deb::build(&workspace_root(), &bin)?;
            let debian = setup::debian_root()?;
            // The release before, for the upgrade test (tests/tests/upgrade.rs).
            let previous = previous::binary(&workspace_root())?;
            let mut full = vec!["test", "--release", "--locked", "--workspace"];
            full.extend(args.iter().map(String::as_str));
            setup::cargo_test(
                &full,
                &[
                    ("EGRESS_BIN", &bin.to_string_lossy()),
                    ("EGRESS_DEB", &deb.to_string_lossy()),
                    ("EGRESS_DEBIAN_ROOT", &debian.to_string_lossy()),
                    ("EGRESS_PREVIOUS_BIN", &previous.to_string_lossy()),
                ],
            )
        }
        Task::Deb => {
            setup::setup(false)?;
            build()?;
            deb::build(&workspace_root(), &egress_bin()).map(drop)
        }
        Task::Soak { seconds } => {
            require_root()?;
            setup::setup(true)?;
            build()?;
            egress_testbed::sweep_leftovers();
            let bin = egress_bin();
            let args = [
                "test",
                "--release",
                "--locked",
                "-p",
                "egress-testbed",
                "--test",
                "soak",
                "--",
                "--ignored",
                "--nocapture",
            ];
            let seconds = seconds.to_string();
            setup::sh(
                "cargo",
                &args,
                &[
                    ("EGRESS_BIN", &bin.to_string_lossy()),
                    ("EGRESS_SOAK_SECONDS", &seconds),
                ],
            )
        }
        Task::Bench { quick } => {
            require_root()?;
            setup::setup(true)?;
            build()?;
            bench::run(&workspace_root(), &egress_bin(), quick)
        }
        Task::Docs => {
            setup::setup(false)?;
            setup::sh(
                "cargo",
                &[
                    "test",
                    "--release",
                    "--locked",
                    "-p",
                    "egress-user",
                    "--lib",
                    "the_committed_reference_is_current",
                ],
                &[
                    ("EGRESS_UPDATE_DOCS", "1"),
                    ("EGRESS_TOOLS_DIR", &setup::tools_dir().to_string_lossy()),
                ],
            )?;
            println!("wrote docs/configuration.md");
            Ok(())
        }
        Task::Fuzz { seconds, targets } => {
            setup::setup(false)?;
            fuzz::run(&workspace_root(), seconds, &targets)
        }
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn egress_bin() -> PathBuf {
    workspace_root().join("target/release/egress")
}

fn build() -> Result<()> {
    let tools = setup::tools_dir();
    setup::sh(
        "cargo",
        &[
            "build",
            "--release",
            "--locked",
            "--package",
            "egress-user",
            "--bin",
            "egress",
        ],
        &[("EGRESS_TOOLS_DIR", &tools.to_string_lossy())],
    )
}

fn require_root() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("this task needs root (BPF programs, cgroups, network namespaces): run it with sudo");
    }
    Ok(())
}
