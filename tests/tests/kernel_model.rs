//! The kernel programs and their Rust model, held to one table: for every row of
//! egress-user/src/kernel/destinations.toml (every kind of destination, per family), a connect()
//! from the intercepted cgroup gets the row's verdict from the real programs, read off the
//! kernel's own decision counters, and `egress explain` says the same.
//!
//! Root only: real namespaces, cgroup eBPF programs. Nothing leaves the test's namespaces:
//! denied connects send nothing, redirected ones meet an agent that resets them
//! (`default_route = "deny"`), and bypassed ones go to the test origin.

use egress_testbed::{HS_IP, HS_IP6, Testbed};
use serde::Deserialize;

#[derive(Deserialize)]
struct Table {
    policy: toml::Table,
    row: Vec<Row>,
}

#[derive(Deserialize)]
struct Row {
    address: std::net::IpAddr,
    what: String,
    verdict: String,
}

/// Each verdict and the kernel counter that counts it.
const COUNTERS: [(&str, &str); 4] = [
    ("loopback", "pass_loopback"),
    ("deny", "deny_blacklist"),
    ("bypass", "pass_no_proxy"),
    ("redirect", "redirected"),
];

#[test]
fn the_kernel_and_explain_give_every_destination_its_verdict() {
    let table: Table =
        toml::from_str(include_str!("../../egress-user/src/kernel/destinations.toml")).unwrap();
    let mut bed = Testbed::standard();
    let config = bed.dir.join("destinations.toml");
    std::fs::write(&config, toml::to_string(&table.policy).unwrap()).unwrap();
    let config = config.to_string_lossy().into_owned();
    bed.start_agent(&["--config", &config]).unwrap();

    for row in &table.row {
        let before = bed.agent().counters().unwrap();
        let connected = bed.tcp_connect(&row.address.to_string(), 443).unwrap();
        let after = bed.agent().counters().unwrap();
        let grew: Vec<&str> = COUNTERS
            .iter()
            .filter(|(_, counter)| after[*counter] > before[*counter])
            .map(|(verdict, _)| *verdict)
            .collect();
        assert_eq!(
            grew,
            [row.verdict.as_str()],
            "{} ({}): the kernel decided otherwise (connect: {connected})",
            row.address,
            row.what
        );
        for (_, counter) in COUNTERS {
            assert!(
                after[counter] - before[counter] <= 1,
                "{}: {counter} grew by more than one",
                row.address
            );
        }
        // What the application saw: EPERM exactly when denied.
        assert_eq!(
            connected == "EPERM",
            row.verdict == "deny",
            "{}: {connected}",
            row.address
        );
        if row.verdict == "redirect" {
            // An IPv4-mapped destination is IPv4 on the wire, and recorded so.
            let original = std::net::SocketAddr::new(row.address.to_canonical(), 443).to_string();
            let decision = bed.agent().wait_decision(&[("original_dst", &original)]).unwrap();
            assert_eq!(decision.get("route"), "deny", "{decision}");
        }

        let destination = std::net::SocketAddr::new(row.address, 443).to_string();
        let ip = row.address.to_string();
        let explained = bed
            .egress(&["explain", "--config", &config, &destination, "--ip", &ip])
            .unwrap();
        assert_eq!(explained.code, Some(0), "{explained:?}");
        let kernel = explained
            .stdout
            .lines()
            .find(|l| l.starts_with("kernel: "))
            .unwrap_or_default()
            .to_owned();
        let said = match () {
            _ if kernel.contains("EPERM") => "deny",
            _ if kernel.contains("not intercepted: loopback") => "loopback",
            _ if kernel.contains("not intercepted: goes direct") => "bypass",
            _ if kernel.contains("redirected to the agent") => "redirect",
            _ => "?",
        };
        assert_eq!(
            said, row.verdict,
            "explain on {} ({}): {kernel}",
            row.address, row.what
        );
    }
    // The homeserver host's own addresses are neither loopback nor in the table's policy: the
    // table was read against the host as the tests build it.
    assert!(
        !table
            .row
            .iter()
            .any(|r| r.address.to_string() == HS_IP || r.address.to_string() == HS_IP6)
    );
}
