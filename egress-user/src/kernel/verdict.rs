//! What the kernel programs decide for a connect() to an address, modelled in Rust for
//! `egress explain` and `egress doctor`. The programs see only the address; the agent fills
//! their tries from [`Policy::kernel_deny_nets`] and [`Policy::kernel_bypass_nets`], and this
//! model answers from the same policy, in the programs' order.

use std::net::IpAddr;

use crate::route::policy::{Policy, Rule};

#[derive(Debug, PartialEq, Eq)]
pub enum KernelVerdict {
    /// Loopback (127.0.0.0/8, ::1, v4-mapped loopback) is never intercepted: Redis, Postgres,
    /// the agent itself.
    Loopback,
    /// connect() fails with EPERM; the rule that denied it.
    Deny(Rule),
    /// Not intercepted (a no_proxy address range): straight to the destination.
    Bypass,
    /// Redirected to the agent, which plans with the name.
    Redirect,
}

pub fn kernel_verdict(policy: &Policy, ip: IpAddr) -> KernelVerdict {
    if ip.to_canonical().is_loopback() {
        KernelVerdict::Loopback
    } else if let Some(rule) = policy.denied(ip) {
        KernelVerdict::Deny(rule)
    } else if policy
        .kernel_bypass_nets()
        .iter()
        .any(|net| net.contains(&ip.to_canonical()))
    {
        KernelVerdict::Bypass
    } else {
        KernelVerdict::Redirect
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::policy::NoProxy;

    #[test]
    fn verdicts() {
        let policy = Policy {
            whitelist: vec!["10.1.0.0/16".parse().unwrap()],
            no_proxy: NoProxy::parse_list(["10.0.0.0/8", "192.0.2.7", "a.example", "8.8.8.8:443"]).unwrap(),
            ..Policy::default()
        };
        let cases: &[(&str, &str)] = &[
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.2", "loopback"),
            ("10.2.0.1", "deny ip_range_blacklist 10.0.0.0/8"),
            ("::ffff:10.2.0.1", "deny ip_range_blacklist 10.0.0.0/8"),
            ("192.0.2.7", "deny ip_range_blacklist 192.0.2.0/24"),
            // Whitelisted out of the blacklist, and in a no_proxy range: bypassed.
            ("10.1.2.3", "bypass"),
            ("::ffff:10.1.2.3", "bypass"),
            // A no_proxy entry with a port or a name is the agent's to decide.
            ("8.8.8.8", "redirect"),
            ("93.184.216.34", "redirect"),
            ("2606:4700::1111", "redirect"),
        ];
        for &(ip, expected) in cases {
            let verdict = match kernel_verdict(&policy, ip.parse().unwrap()) {
                KernelVerdict::Loopback => "loopback".to_owned(),
                KernelVerdict::Deny(rule) => format!("deny {rule}"),
                KernelVerdict::Bypass => "bypass".to_owned(),
                KernelVerdict::Redirect => "redirect".to_owned(),
            };
            assert_eq!(verdict, expected, "{ip}");
        }
    }
}
