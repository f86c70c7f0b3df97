//! `cargo xtask fuzz`: each cargo-fuzz target for a bounded time, starting from the seed corpora
//! in fuzz/seeds (the growing corpora stay out of the repository, in fuzz/corpus).

use std::path::Path;

use anyhow::{Context, Result};

use crate::setup;

pub fn run(root: &Path, seconds: u64, only: &[String]) -> Result<()> {
    setup::cargo_fuzz()?;
    let fuzz_dir = root.join("fuzz");
    let tools = setup::tools_dir().to_string_lossy().into_owned();
    let env = [("EGRESS_TOOLS_DIR", tools.as_str())];
    let targets = std::fs::read_dir(fuzz_dir.join("fuzz_targets"))
        .context("reading fuzz/fuzz_targets")?
        .filter_map(|e| e.ok()?.path().file_stem()?.to_str().map(str::to_owned))
        .filter(|t| only.is_empty() || only.contains(t));
    let mut targets: Vec<String> = targets.collect();
    targets.sort();
    setup::sh(
        "cargo",
        &[
            "+nightly",
            "fuzz",
            "build",
            "-O",
            "--fuzz-dir",
            &fuzz_dir.to_string_lossy(),
        ],
        &env,
    )?;
    for target in targets {
        let corpus = fuzz_dir.join("corpus").join(&target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = fuzz_dir.join("seeds").join(&target);
        let time = format!("-max_total_time={seconds}");
        println!("fuzz: {target} for {seconds} s");
        setup::sh(
            "cargo",
            &[
                "+nightly",
                "fuzz",
                "run",
                "-O",
                "--fuzz-dir",
                &fuzz_dir.to_string_lossy(),
                &target,
                &corpus.to_string_lossy(),
                &seeds.to_string_lossy(),
                "--",
                &time,
                "-max_len=20000",
            ],
            &env,
        )?;
    }
    Ok(())
}
