//! The previous release's `egress`, for the upgrade test: built once from a recorded commit in
//! a worktree of its own, and kept in /var/cache/egress-previous/COMMIT/egress.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::setup;

/// The last commit of the previous release (the end of the previous working session).
pub const COMMIT: &str = "08c9a87e7efcc6028b5e11e5a89a5bd777a2230f";
const CACHE: &str = "/var/cache/egress-previous";

/// The previous release's binary, built if it is not there yet (a few minutes, once).
pub fn binary(root: &Path) -> Result<PathBuf> {
    let dir = Path::new(CACHE).join(COMMIT);
    let bin = dir.join("egress");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir)?;
    let root_s = root.to_string_lossy().into_owned();
    if setup::capture(
        "git",
        &["-C", &root_s, "cat-file", "-e", &format!("{COMMIT}^{{commit}}")],
    )
    .is_err()
    {
        bail!("the previous release's commit {COMMIT} is not in this clone (a shallow clone?): fetch it");
    }
    let source = dir.join("source");
    let source_s = source.to_string_lossy().into_owned();
    let _ = setup::sh(
        "git",
        &["-C", &root_s, "worktree", "remove", "--force", &source_s],
        &[],
    );
    let _ = std::fs::remove_dir_all(&source);
    setup::sh(
        "git",
        &["-C", &root_s, "worktree", "add", "--detach", &source_s, COMMIT],
        &[],
    )?;
    println!("previous release: building egress at {COMMIT} (once)");
    let target = dir.join("target").to_string_lossy().into_owned();
    let tools = setup::tools_dir().to_string_lossy().into_owned();
    let manifest = source.join("Cargo.toml").to_string_lossy().into_owned();
    let built = setup::sh(
        "cargo",
        &[
            "build",
            "--release",
            "--locked",
            "--manifest-path",
            &manifest,
            "--package",
            "egress-user",
            "--bin",
            "egress",
        ],
        &[("CARGO_TARGET_DIR", &target), ("EGRESS_TOOLS_DIR", &tools)],
    );
    let copied = built.and_then(|()| {
        std::fs::copy(dir.join("target/release/egress"), &bin)
            .map(drop)
            .context("copying the previous release's binary")
    });
    let _ = setup::sh(
        "git",
        &["-C", &root_s, "worktree", "remove", "--force", &source_s],
        &[],
    );
    let _ = std::fs::remove_dir_all(dir.join("target"));
    copied?;
    Ok(bin)
}
