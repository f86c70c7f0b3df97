//! `egress-bench`: the benchmark behind `cargo xtask bench` (issue 6), and the helpers it runs
//! inside the testbed's namespaces: the load client, a fast CONNECT proxy and a byte source.
//! Run as root, with `EGRESS_BIN` naming the agent binary; see `cargo xtask bench`.

#[path = "../bench/mod.rs"]
mod bench;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "egress-bench",
    about = "egress against the alternatives, on one testbed"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the testbed, measure every peer, write the report.
    Run(bench::run::RunArgs),
    /// The load client (started by `run` inside the namespaces); prints JSON.
    Client(Box<bench::client::ClientArgs>),
    /// A minimal CONNECT proxy with basic auth.
    ConnectProxy(bench::servers::ProxyArgs),
    /// A TCP byte source: an 8-byte big-endian length in, that many bytes out.
    Source(bench::servers::SourceArgs),
    /// TCP forwarders that hold each chunk for a one-way delay (a network path here).
    DelayLine(bench::delay::DelayArgs),
    /// Render a recorded run's README.md and chart.svg again from its results.json.
    Render(bench::report::RenderArgs),
    /// The before/after table of two recorded runs (results.json), as markdown.
    Compare(bench::report::CompareArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => bench::run::run(args),
        Command::Client(args) => bench::client::main(*args),
        Command::ConnectProxy(args) => bench::servers::proxy_main(args),
        Command::Source(args) => bench::servers::source_main(args),
        Command::DelayLine(args) => bench::delay::main(args),
        Command::Render(args) => bench::report::render_main(args),
        Command::Compare(args) => bench::report::compare_main(args),
    }
}
