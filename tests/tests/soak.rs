//! Soak (opt-in, not in CI): traffic of every kind through the agent for a bounded time
//! (EGRESS_SOAK_SECONDS, default 600), asserting that its descriptors and memory do not grow.
//! Run with `cargo xtask soak [--seconds N]`.
//!
//! Root only.

use std::time::{Duration, Instant};

use egress_testbed::{ORIGIN_IP, ORIGIN_NAME, PROXY_PASSWORD, Testbed, procfs};

fn fds(pid: u32) -> usize {
    procfs::fds(pid).unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    procfs::rss_kib(pid).unwrap()
}

#[test]
#[ignore = "long-running: cargo xtask soak"]
fn soak_without_descriptor_or_memory_growth() {
    let seconds: u64 = std::env::var("EGRESS_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let mut bed = Testbed::standard();
    let proxy = bed.proxy_url(PROXY_PASSWORD);
    bed.start_agent_with(&["--http-proxy", &proxy, "--peek-timeout", "0.2"])
        .unwrap();
    let pid = bed.agent().pid().unwrap();
    let round = |bed: &Testbed| {
        for url in [
            format!("https://{ORIGIN_NAME}/"),
            format!("https://{ORIGIN_NAME}:8448/"),
            format!("http://{ORIGIN_NAME}/"),
        ] {
            let result = bed.curl(&url).unwrap();
            assert_eq!(result.code, Some(0), "{url}: {result:?}");
        }
        // A burst of 50 parallel silent clients (tunnels by IP) that hang up at once.
        let burst = format!(
            "import socket\nconns = [socket.create_connection(('{ORIGIN_IP}', 443)) for _ in range(50)]\n\
             [c.close() for c in conns]"
        );
        assert_eq!(
            bed.run_in_cgroup("python3", &["-c", &burst]).unwrap().code,
            Some(0)
        );
    };
    // Warm up, then the baseline.
    for _ in 0..5 {
        round(&bed);
    }
    std::thread::sleep(Duration::from_secs(6));
    let (fds0, rss0) = (fds(pid), rss_kib(pid));
    let started = Instant::now();
    let mut rounds = 0u64;
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        round(&bed);
        rounds += 1;
        if rounds.is_multiple_of(100) {
            samples.push((started.elapsed().as_secs(), fds(pid), rss_kib(pid)));
        }
    }
    std::thread::sleep(Duration::from_secs(6)); // closes settle, freed memory is handed back
    let (fds1, rss1) = (fds(pid), rss_kib(pid));
    eprintln!("soak: {rounds} rounds in {seconds} s; fds {fds0} -> {fds1}; RSS {rss0} -> {rss1} KiB");
    for (at, f, r) in &samples {
        eprintln!("  at {at:>4} s: {f} fds, {r} KiB");
    }
    assert!(fds1 <= fds0 + 2, "descriptors grew: {fds0} -> {fds1}");
    assert!(rss1 <= rss0 + 4096, "memory grew: {rss0} -> {rss1} KiB");
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}
