//! egress-testbed: what egress's integration tests, the demo and the benchmark are built from.
//!
//! - [`topology`]: network namespaces joined by a bridge, the intercepted cgroups, and a
//!   [`Builder`](topology::Builder) that adds only the peers a test asks for;
//! - [`peers`]: the real third-party programs on the LAN (squid, nginx, dnsmasq, Synapse) and the
//!   origin's packet counter;
//! - [`agent`]: a handle on one run of `egress run` (its own log, admin endpoint, metrics, kernel
//!   counters);
//! - [`process`]: the one launcher for "run this in that namespace and cgroup", daemons, the CLI;
//! - [`wait`]: the one bounded poll; [`metrics`]: the one /metrics parser; [`procfs`]: RSS, CPU
//!   time and limits from /proc.
//!
//! Tests send traffic only to loopback or to namespaces a testbed creates, and everything is
//! removed on drop, also when a test panics.

pub mod agent;
pub mod metrics;
pub mod overlay;
pub mod peers;
pub mod process;
pub mod procfs;
pub mod topology;
pub mod wait;

pub use process::{ClientResult, egress, egress_bin};
pub use topology::*;
