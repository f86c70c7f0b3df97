//! Statistics over samples, and what /proc says about a process's memory and CPU time.

use anyhow::{Context, Result};
use serde::Serialize;

/// Percentiles of a set of samples, in the samples' unit.
#[derive(Serialize, Clone, Copy, Debug, Default)]
pub struct Summary {
    pub n: usize,
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
}

impl Summary {
    pub fn of(samples: &[u32]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let sum: f64 = sorted.iter().map(|&s| s as f64).sum();
        Some(Self {
            n: sorted.len(),
            p10: percentile(&sorted, 10.0),
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
            mean: sum / sorted.len() as f64,
        })
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// The process's command name, to check a pid is what it should be.
pub fn comm(pid: u32) -> Result<String> {
    Ok(std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .with_context(|| format!("process {pid}"))?
        .trim()
        .to_owned())
}

/// Resident set size, KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no VmRSS for process {pid}"))
}

/// Anonymous and file-backed parts of the resident set, KiB (RssAnon, RssFile).
pub fn rss_split_kib(pid: u32) -> Result<(u64, u64)> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid}"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} for process {pid}"))
    };
    Ok((field("RssAnon:")?, field("RssFile:")?))
}

/// User + system CPU time of the whole process (all threads, also those that exited), s.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid}"))?;
    // The command name may contain spaces: fields are counted after its closing parenthesis.
    let after = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u32> = (1..=100).collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!((s.p50, s.p99, s.n), (50.0, 99.0, 100));
        assert_eq!(Summary::of(&[7]).unwrap().p99, 7.0);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        let (anon, file) = rss_split_kib(pid).unwrap();
        assert!(anon > 0 && file > 0);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
    }
}
