//! `cargo xtask bench`: builds the benchmark binary and runs it on a fresh testbed (see
//! tests/src/bench/). The report goes to bench/results/ (quick mode: bench/results/quick/).

use std::path::Path;

use anyhow::Result;

use crate::setup;

pub fn run(root: &Path, egress_bin: &Path, quick: bool) -> Result<()> {
    setup::sh(
        "cargo",
        &[
            "build",
            "--release",
            "--locked",
            "-p",
            "egress-testbed",
            "--bin",
            "egress-bench",
        ],
        &[],
    )?;
    egress_testbed::sweep_leftovers();
    let bench = root.join("target/release/egress-bench");
    let out = root.join("bench/results");
    let out = out.to_string_lossy();
    let mut args = vec!["run", "--out", &out];
    if quick {
        args.push("--quick");
    }
    setup::sh(
        &bench.to_string_lossy(),
        &args,
        &[("EGRESS_BIN", &egress_bin.to_string_lossy())],
    )
}
