//! What the kernel programs decide for a connect() to an address, modelled in Rust for
//! `egress explain` and `egress doctor`. The programs see only the address; the agent fills
//! their tries from [`Policy::kernel_deny_nets`] and [`Policy::kernel_bypass_nets`], and this
//! model answers from the same policy, in the programs' order.
//!
//! `destinations.toml` is the table both are held to: every kind of address and family, with
//! the verdict; the unit test below checks the model, `tests/tests/kernel_model.rs` the real
//! programs, against every row.

use std::net::IpAddr;

use crate::route::policy::{Policy, Rule};

#[derive(Debug, PartialEq, Eq)]
pub enum KernelVerdict {
    /// Loopback (127.0.0.0/8, ::1) and the unspecified address (0.0.0.0, ::: this host), also
    /// IPv4-mapped, are never intercepted: Redis, Postgres, the agent itself.
    Loopback,
    /// connect() fails with EPERM; the rule that denied it.
    Deny(Rule),
    /// Not intercepted (a no_proxy address range): straight to the destination.
    Bypass,
    /// Redirected to the agent, which plans with the name.
    Redirect,
}

#[cfg(test)]
impl KernelVerdict {
    /// The verdict's name in the destinations table (and the kernel counter that counts it).
    pub fn name(&self) -> &'static str {
        match self {
            KernelVerdict::Loopback => "loopback",
            KernelVerdict::Deny(_) => "deny",
            KernelVerdict::Bypass => "bypass",
            KernelVerdict::Redirect => "redirect",
        }
    }
}

pub fn kernel_verdict(policy: &Policy, ip: IpAddr) -> KernelVerdict {
    // As the programs: an IPv4-mapped address is its IPv4 address; loopback and unspecified
    // pass before any policy is looked at.
    let ip = ip.to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        KernelVerdict::Loopback
    } else if let Some(rule) = policy.denied(ip) {
        KernelVerdict::Deny(rule)
    } else if policy.kernel_bypass_nets().iter().any(|net| net.contains(&ip)) {
        KernelVerdict::Bypass
    } else {
        KernelVerdict::Redirect
    }
}

/// The table of destinations (see the module documentation).
#[cfg(test)]
pub mod table {
    use serde::Deserialize;

    pub const TEXT: &str = include_str!("destinations.toml");

    #[derive(Deserialize)]
    pub struct Table {
        pub policy: toml::Table,
        pub row: Vec<Row>,
    }

    #[derive(Deserialize)]
    pub struct Row {
        pub address: std::net::IpAddr,
        pub what: String,
        pub verdict: String,
    }

    pub fn read() -> Table {
        toml::from_str(TEXT).expect("destinations.toml parses")
    }

    /// The policy part, as an egress config file.
    pub fn policy_file(table: &Table) -> String {
        toml::to_string(&table.policy).expect("the policy serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Settings, route::policy::NoProxy};

    /// The model gives every row of the table its verdict.
    #[test]
    fn the_model_agrees_with_the_destinations_table() {
        let table = table::read();
        let policy = Settings::from_toml(&table::policy_file(&table)).policy();
        let families: std::collections::BTreeSet<(bool, &str)> = table
            .row
            .iter()
            .map(|row| (row.address.is_ipv4(), row.verdict.as_str()))
            .collect();
        // Every verdict in both families.
        assert_eq!(families.len(), 8, "{families:?}");
        for row in &table.row {
            let verdict = kernel_verdict(&policy, row.address);
            assert_eq!(verdict.name(), row.verdict, "{} ({})", row.address, row.what);
        }
    }

    #[test]
    fn deny_rules_are_named() {
        let policy = Policy {
            whitelist: vec!["10.1.0.0/16".parse().unwrap()],
            no_proxy: NoProxy::parse_list(["10.0.0.0/8", "192.0.2.7", "a.example", "8.8.8.8:443"]).unwrap(),
            ..Policy::default()
        };
        let cases: &[(&str, &str)] = &[
            ("10.2.0.1", "deny ip_range_blacklist 10.0.0.0/8"),
            ("::ffff:10.2.0.1", "deny ip_range_blacklist 10.0.0.0/8"),
            ("192.0.2.7", "deny ip_range_blacklist 192.0.2.0/24"),
            // Whitelisted out of the blacklist, and in a no_proxy range: bypassed.
            ("10.1.2.3", "bypass"),
            // A no_proxy entry with a port or a name is the agent's to decide.
            ("8.8.8.8", "redirect"),
        ];
        for &(ip, expected) in cases {
            let verdict = match kernel_verdict(&policy, ip.parse().unwrap()) {
                KernelVerdict::Deny(rule) => format!("deny {rule}"),
                other => other.name().to_owned(),
            };
            assert_eq!(verdict, expected, "{ip}");
        }
    }
}
