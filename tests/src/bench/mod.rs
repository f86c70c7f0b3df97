//! The benchmark (issue 6): egress against what users would pick instead, measured in one run
//! on one testbed (egress-testbed's topology, peers and agent handle). One module per role:
//! - `run`: the orchestration (agent configurations, which peer when), and the checks that the
//!   figures measure what they claim (the kernel's counters against the connect() samples);
//! - `client`: the load generator, run inside the namespaces and cgroups;
//! - `servers`: a fast CONNECT proxy and a byte source added to the testbed;
//! - `delay`: the delay lines that stand for a network path to the proxy and to the origin;
//! - `floor.c`: the floor peer, a minimal C splice relay (built by `peers`);
//! - `peers`: redsocks with its iptables rules, and the load clients;
//! - `measure`: percentiles (RSS and CPU time come from egress_testbed::procfs);
//! - `report` and `chart`: the markdown report and the SVG chart, written from `results.json`,
//!   also again from a recorded run (`render`), and the before/after table of two (`compare`).

pub mod chart;
pub mod client;
pub mod delay;
pub mod measure;
pub mod peers;
pub mod report;
pub mod run;
pub mod servers;

/// The byte source on the origin host.
pub const SOURCE_PORT: u16 = 9000;
/// The fast CONNECT proxy on the proxy host, next to squid.
pub const FAST_PROXY_PORT: u16 = 3140;
/// A second address of the origin host, bypassed in the kernel (`--no-proxy`), so that one
/// agent configuration serves both the proxied peers and the in-kernel bypass measurement.
pub const BYPASS_IP: &str = "10.248.0.39";
/// An address in the default blacklist (10/8) outside the whitelisted test LAN: denied in the
/// kernel, so nothing is ever sent to it.
pub const DENY_IP: &str = "10.248.1.30";

/// Raises the soft descriptor limit to the hard one: thousands of idle tunnels need them.
pub fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut limit = std::mem::zeroed::<libc::rlimit>();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Turns SIGINT and SIGTERM into an error at the next wait for a client (see
/// [`interrupted`]), so that the run unwinds and everything it started is dropped: the servers
/// run in process groups of their own, which a Ctrl-C does not reach.
pub fn catch_interrupts() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

pub fn interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
        anyhow::bail!("interrupted");
    }
    Ok(())
}
