//! `cargo xtask run` with no arguments: egress on a self-contained demo topology.
//!
//! Builds the same namespaces the integration tests use (homeserver host with an intercepted
//! cgroup, squid with basic auth, a TLS origin), runs the agent, and every few seconds makes a
//! client in the cgroup, with no proxy settings, fetch the origin on 443 and 8448. Each round
//! prints what the client got, the agent's decision lines and squid's access log lines.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use egress_testbed::{ORIGIN_NAME, Testbed};

pub fn run(egress_bin: &Path, once: bool) -> Result<()> {
    // SAFETY: set before any thread of ours reads the environment.
    unsafe { std::env::set_var("EGRESS_BIN", egress_bin) };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("installing Ctrl-C handler")?;

    egress_testbed::sweep_leftovers();
    println!("demo: building the topology (namespaces, squid with basic auth, TLS origin)...");
    let mut bed = Testbed::builder().squid().nginx().build()?;
    bed.start_default_agent()?;
    println!(
        "demo: egress attached to cgroup {}\n      upstream squid at {}; client runs curl with NO proxy settings\n",
        bed.cgroup.path.display(),
        egress_testbed::PROXY_IP
    );

    let mut seen_log = 0;
    let mut seen_squid = 0;
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) {
        round += 1;
        println!("── round {round} ──");
        for url in [
            format!("https://{ORIGIN_NAME}/"),
            format!("https://{ORIGIN_NAME}:8448/"),
        ] {
            let result = bed.curl(&url)?;
            let outcome = match result.code {
                Some(0) => result.stdout.trim().to_owned(),
                _ => format!("FAILED: {}", result.stderr.trim()),
            };
            println!("client  GET {url:<28} -> {outcome}");
        }
        std::thread::sleep(Duration::from_millis(300));
        let decisions = bed.agent().decisions();
        for line in decisions.iter().skip(seen_log) {
            let fields = [
                "original_dst",
                "name",
                "route",
                "rule",
                "upstream",
                "target",
                "status",
                "outcome",
            ];
            let shown: Vec<String> = fields.iter().map(|f| format!("{f}={}", line.get(f))).collect();
            println!("egress  {}", shown.join(" "));
        }
        seen_log = decisions.len();
        let squid = bed.squid_access_log();
        for line in squid.lines().skip(seen_squid) {
            println!("squid   {}", line.trim());
        }
        seen_squid = squid.lines().count();
        if once {
            break;
        }
        for _ in 0..50 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("demo: stopping and cleaning up");
    bed.stop_agent();
    Ok(())
}
