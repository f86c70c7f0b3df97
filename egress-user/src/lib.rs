//! egress agent library: everything the `egress` binary does, one module per role.

pub mod admin;
pub mod agent;
pub mod cli;
pub mod config;
pub mod decision;
pub mod doctor;
pub mod ebpf;
pub mod forward;
pub mod homeserver;
pub mod inspect;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod privileges;
pub mod proxy_tls;
pub mod proxy_url;
pub mod relay;
pub mod run;
pub mod sniff;
pub mod splice;
pub mod unit;
pub mod upstream;
