//! What /proc says about a process: the one RSS reader, CPU time, descriptors, its name and its
//! descriptor limit.

use anyhow::{Context, Result};

fn status_field(pid: u32, field: &str) -> Result<u64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} for process {pid}"))
}

/// Resident set size, KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_field(pid, "VmRSS")
}

/// Anonymous and file-backed parts of the resident set, KiB (RssAnon, RssFile).
pub fn rss_split_kib(pid: u32) -> Result<(u64, u64)> {
    Ok((status_field(pid, "RssAnon")?, status_field(pid, "RssFile")?))
}

/// Open descriptors.
pub fn fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("process {pid}"))?
        .count())
}

/// The process's command name, to check a pid is what it should be.
pub fn comm(pid: u32) -> Result<String> {
    Ok(std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .with_context(|| format!("process {pid}"))?
        .trim()
        .to_owned())
}

/// The hard limit on open descriptors of a process ("Max open files" in /proc/PID/limits).
pub fn nofile_hard_limit(pid: u32) -> Result<u64> {
    let limits =
        std::fs::read_to_string(format!("/proc/{pid}/limits")).with_context(|| format!("process {pid}"))?;
    limits
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("Max open files")?;
            rest.split_whitespace().nth(1)?.parse().ok()
        })
        .with_context(|| format!("no open-files limit for process {pid}:\n{limits}"))
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
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        let (anon, file) = rss_split_kib(pid).unwrap();
        assert!(anon > 0 && file > 0);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(fds(pid).unwrap() >= 3);
        assert!(nofile_hard_limit(pid).unwrap() > 0);
        assert!(!comm(pid).unwrap().is_empty());
        assert!(rss_kib(u32::MAX).is_err());
    }
}
