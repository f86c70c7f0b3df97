//! egress agent library: everything the `egress` binary does, one module per role.

pub mod cli;
pub mod decision;
pub mod ebpf;
pub mod listener;
pub mod proxy_url;
pub mod run;
pub mod upstream;
