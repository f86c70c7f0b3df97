//! Deciding where a connection goes. `policy` holds the rules (Synapse's blacklist, whitelist
//! and no_proxy semantics) as pure functions over an address, port and name; `plan` turns a
//! redirected connection into one action with the rule that chose it. Both are pure: the agent,
//! `egress explain` and `egress doctor` call the same code.

pub mod plan;
pub mod policy;
