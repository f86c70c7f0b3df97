//! egress agent library: everything the `egress` binary does, one module per role.

pub mod cli;
pub mod config;
pub mod decision;
pub mod ebpf;
pub mod forward;
pub mod listener;
pub mod policy;
pub mod proxy_tls;
pub mod proxy_url;
pub mod relay;
pub mod run;
pub mod sniff;
pub mod upstream;
