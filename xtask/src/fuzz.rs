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
    // cargo-fuzz has no --locked: check that fuzz/Cargo.lock needs no change before it builds.
    let locked = std::process::Command::new("cargo")
        .args([
            "+nightly",
            "metadata",
            "--locked",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(fuzz_dir.join("Cargo.toml"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(std::process::Stdio::null())
        .status()
        .context("running cargo metadata")?;
    if !locked.success() {
        anyhow::bail!(
            "fuzz/Cargo.lock is out of date: run `cargo +nightly update --workspace \
             --manifest-path fuzz/Cargo.toml` and commit it"
        );
    }
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
