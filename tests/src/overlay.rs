//! Overlay mounts: read-only lower roots under one writable layer, so a clean root filesystem
//! (Debian's, a kernel's modules) is used many times and left unchanged. Unmounted on drop.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub struct Overlay {
    /// Where the merged tree is mounted.
    pub merged: PathBuf,
    /// What was written to it (kept after the unmount, until `scratch` goes).
    pub upper: PathBuf,
}

impl Overlay {
    /// Mounts `lowers` (the first on top) at `scratch/merged`, writes going to `scratch/upper`.
    /// A mount left there by an earlier run that died is unmounted first, and `scratch` emptied.
    pub fn mount(lowers: &[&Path], scratch: &Path) -> Result<Self> {
        let merged = scratch.join("merged");
        crate::process::quietly("umount", &[&merged.to_string_lossy()]);
        let _ = std::fs::remove_dir_all(scratch);
        let (upper, work) = (scratch.join("upper"), scratch.join("work"));
        for dir in [&upper, &work, &merged] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let lowers: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lowers.join(":"),
            upper.display(),
            work.display()
        );
        crate::process::run(
            "mount",
            &[
                "-t",
                "overlay",
                "overlay",
                "-o",
                &options,
                &merged.to_string_lossy(),
            ],
        )
        .with_context(|| format!("mounting an overlay at {}", merged.display()))?;
        Ok(Self { merged, upper })
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        crate::process::quietly("umount", &[&self.merged.to_string_lossy()]);
    }
}
