//! A cgroup v2 directory for the intercepted client processes, killed and removed on drop.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub struct Cgroup {
    pub path: PathBuf,
}

/// Where cgroup2 is mounted: /sys/fs/cgroup/unified on hybrid hosts, /sys/fs/cgroup on pure v2.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in mountinfo.lines() {
        // ... mount-point ... - fstype source options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mount_point) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mount_point));
        }
    }
    bail!("no cgroup2 filesystem is mounted")
}

impl Cgroup {
    pub fn create(relative: &str) -> Result<Self> {
        let path = cgroup2_root()?.join(relative);
        if path.exists() {
            remove(&path);
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove(&self.path);
    }
}

/// Kills every process in the cgroup and removes it, child cgroups first.
pub fn remove(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove(&entry.path());
            }
        }
    }
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    // Killed processes leave the cgroup a moment later; best effort (a cleanup path).
    let _ = crate::wait::ready(
        &format!("cgroup {} to be removed", path.display()),
        std::time::Duration::from_secs(1),
        || Ok(std::fs::remove_dir(path).is_ok() || !path.exists()),
    );
}
