//! egress: a transparent egress proxy for Matrix homeserver hosts.
//!
//! The tree follows the data path. `kernel` loads and attaches the eBPF programs that redirect
//! the homeserver's connects; `proxy` is what a redirected connection goes through (accept,
//! sniff, upstream or forward, relay, decision log), asking `route` where it may go; `netns`
//! gives it listeners in the network namespaces of containers; `config`
//! is where the rules come from. `agent`, `daemon`, `admin` and `metrics` run it all as a
//! service; `diag` explains it to admins; `cli` ties commands to modules.

mod admin;
mod agent;
mod cli;
mod config;
mod containers;
mod daemon;
mod diag;
mod dns;
mod hostport;
mod kernel;
mod metrics;
mod netns;
mod proxy;
mod redact;
mod route;

pub use cli::main;

/// What the fuzz targets exercise: the parsers that take input from clients, proxies and
/// admins. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::config::proxy_url::ProxyUrl;
    pub use crate::hostport::valid_hostname;
    pub use crate::proxy::sniff::{MAX_SNIFF_BYTES, Sniff, sniff};
    pub use crate::proxy::upstream::{UpstreamError, connect_exchange};
    pub use crate::route::{plan::Sniffed, policy::NoProxy};
}
