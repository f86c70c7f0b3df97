//! `egress explain DEST`: what would happen to a connection to DEST, step by step: the kernel's
//! verdict on the address, then the agent's routing plan for each kind of traffic. It asks the
//! same code the agent runs, with what the running agent's DNS record knows (over its admin
//! listener, if it answers), and contacts nothing else.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use crate::{
    config::{Settings, proxy_url::ProxySetting},
    diag::status::ask_agent,
    kernel::verdict::{KernelVerdict, kernel_verdict},
    route::{
        plan::{Action, ClientName, Plan, Resolved, Sniffed, plan},
        policy::Policy,
    },
};

/// What the running agent's DNS record says about a destination.
#[derive(Debug, Default)]
pub struct AgentRecord {
    pub resolved: Resolved,
    /// The record's lines, or why there are none.
    pub report: String,
}

/// Asks the running agent at `admin_addr` what its DNS record knows about `ip` (dialled on
/// `port`) and `host`.
pub fn agent_record(admin_addr: SocketAddr, host: &str, ip: IpAddr, port: u16) -> AgentRecord {
    let mut path = format!("/dns?address={ip}&port={port}");
    if crate::hostport::valid_hostname(host) && host.parse::<IpAddr>().is_err() {
        path.push_str(&format!("&name={host}"));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        resolved: Option<Resolved>,
        report: String,
    }
    match ask_agent(admin_addr, &path).map(|body| serde_json::from_str::<Answer>(&body)) {
        Ok(Ok(answer)) => AgentRecord {
            resolved: answer.resolved.unwrap_or_default(),
            report: answer.report,
        },
        Ok(Err(e)) => AgentRecord {
            report: format!("the agent at {admin_addr} gave no DNS record ({e})\n"),
            ..AgentRecord::default()
        },
        Err(e) => AgentRecord {
            report: format!("no running agent at {admin_addr} to ask ({e})\n"),
            ..AgentRecord::default()
        },
    }
}

/// The kinds of traffic explained, as the agent would sniff them for a connection naming `name`.
pub fn traffic_kinds(name: Option<&str>) -> [(&'static str, Sniffed); 3] {
    [
        (
            "TLS (SNI)",
            Sniffed::Tls {
                sni: name.map(str::to_owned),
            },
        ),
        (
            "plain HTTP (Host)",
            Sniffed::Http {
                host: name.map(str::to_owned),
                port: None,
            },
        ),
        ("other / silent client", Sniffed::Other),
    ]
}

/// The plans `explain` shows for a redirected connection to `dst` naming `name`.
pub fn plans<'a>(
    settings: &'a Settings,
    policy: &Policy,
    name: Option<&str>,
    dst: SocketAddr,
    resolved: &Resolved,
) -> Vec<(&'static str, Plan<'a, ProxySetting>)> {
    let rules = settings.rules(policy);
    traffic_kinds(name)
        .into_iter()
        .map(|(label, sniffed)| {
            (
                label,
                plan(&rules, settings.proxy_urls(), dst, &sniffed, resolved),
            )
        })
        .collect()
}

/// What would happen to a connection to `host:port` at address `ip`, for each kind of traffic.
pub fn explain(settings: &Settings, host: &str, port: u16, ip: IpAddr, record: &AgentRecord) -> String {
    let policy = settings.policy();
    let name = (host.parse::<IpAddr>().is_err()).then_some(host);
    let dst = SocketAddr::new(ip, port);
    let mut out = String::new();
    let _ = writeln!(out, "destination: {dst}");
    if let Some(name) = name {
        let _ = writeln!(out, "name: {name}");
    }
    let verdict = kernel_verdict(&policy, ip);
    let kernel = match &verdict {
        KernelVerdict::Deny(rule) => {
            format!("connect() fails with EPERM at once ({rule}); nothing leaves the host")
        }
        KernelVerdict::Loopback => {
            "not intercepted: loopback (and the unspecified address, this host) is always left alone"
                .to_owned()
        }
        KernelVerdict::Bypass => "not intercepted: goes direct (no_proxy address range)".to_owned(),
        KernelVerdict::Redirect => "redirected to the agent".to_owned(),
    };
    let _ = writeln!(out, "kernel: {kernel}");
    let _ = write!(out, "DNS record (running agent):\n{}", indent(&record.report));
    let resolved = &record.resolved;
    if let (Some(name), ClientName::Delegates) = (name, resolved.client) {
        let targets = match resolved.srv_targets.as_slice() {
            [] => "none".to_owned(),
            targets => targets.join(", "),
        };
        let checked = if resolved.looked_up {
            " (those the agent's own lookup finds at the address)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "{name} delegates by SRV; its targets on port {port}{checked}: {targets}"
        );
    }
    if verdict != KernelVerdict::Redirect {
        return out;
    }
    for (label, plan) in plans(settings, &policy, name, dst, &record.resolved) {
        let what = match &plan.action {
            Action::Deny => "deny: connection reset".to_owned(),
            Action::Direct { to } => format!("direct to {to}"),
            Action::Connect { proxy, target } => format!("CONNECT {target} via {proxy}"),
            Action::Forward { proxy, authority } => {
                format!("forward via {proxy} as GET http://{authority}/...")
            }
        };
        let by = plan.named_by.as_str();
        let _ = writeln!(out, "{label}: {what}  [rule: {}; name: {by}]", plan.rule);
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An action in words, its proxies by their display (a client shows as its URL).
    fn describe_action<P: std::fmt::Display>(action: &Action<'_, P>) -> String {
        match action {
            Action::Deny => "deny".into(),
            Action::Direct { to } => format!("direct {to}"),
            Action::Connect { proxy, target } => format!("connect {target} via {proxy}"),
            Action::Forward { proxy, authority } => format!("forward {authority} via {proxy}"),
        }
    }
    use crate::{agent::Routing, hostport};

    #[test]
    fn explains_each_route() {
        let c = Settings::from_toml(
            "https_proxy = \"http://u:secret@proxy:3128\"\nno_proxy = [\"internal.example\", \"192.0.2.0/24\"]\n\
             ip_range_whitelist = [\"192.0.2.0/24\"]",
        );
        let public: IpAddr = "93.184.216.34".parse().unwrap();
        let text = explain(&c, "matrix.org", 8448, public, &AgentRecord::default());
        assert!(text.contains("kernel: redirected to the agent"), "{text}");
        assert!(
            text.contains("TLS (SNI): CONNECT matrix.org:8448 via http://u:***@proxy:3128  [rule: proxy; name: client_unrecorded]"),
            "{text}"
        );
        assert!(
            text.contains("plain HTTP (Host): direct to 93.184.216.34:8448  [rule: no proxy for protocol; name: client_unrecorded]"),
            "{text}"
        );
        assert!(
            text.contains("other / silent client: CONNECT 93.184.216.34:8448 via"),
            "{text}"
        );
        assert!(!text.contains("secret"));

        let text = explain(
            &c,
            "10.1.2.3",
            443,
            "10.1.2.3".parse().unwrap(),
            &AgentRecord::default(),
        );
        assert!(
            text.contains("EPERM") && text.contains("ip_range_blacklist 10.0.0.0/8"),
            "{text}"
        );

        let text = explain(
            &c,
            "192.0.2.7",
            443,
            "192.0.2.7".parse().unwrap(),
            &AgentRecord::default(),
        );
        assert!(text.contains("not intercepted: goes direct"), "{text}");

        for loopback in ["127.0.0.1", "::1", "::ffff:127.0.0.2"] {
            let text = explain(
                &c,
                "localhost",
                5432,
                loopback.parse().unwrap(),
                &AgentRecord::default(),
            );
            assert!(text.contains("kernel: not intercepted: loopback"), "{text}");
            assert!(!text.contains("EPERM"), "{text}");
        }

        let text = explain(&c, "db.internal.example", 5432, public, &AgentRecord::default());
        assert!(
            text.contains("TLS (SNI): direct to") && text.contains("no_proxy internal.example"),
            "{text}"
        );
    }

    /// `egress explain` tells the kernel's verdict of every row of the destinations table.
    #[test]
    fn explain_gives_the_kernels_verdict_for_every_destination() {
        let table = crate::kernel::verdict::table::read();
        let settings = Settings::from_toml(&crate::kernel::verdict::table::policy_file(&table));
        for row in &table.row {
            let text = explain(
                &settings,
                &row.address.to_string(),
                443,
                row.address,
                &AgentRecord::default(),
            );
            let kernel = text
                .lines()
                .find(|l| l.starts_with("kernel: "))
                .unwrap_or_default();
            let said = if kernel.contains("EPERM") {
                "deny"
            } else if kernel.contains("not intercepted: loopback") {
                "loopback"
            } else if kernel.contains("not intercepted: goes direct") {
                "bypass"
            } else if kernel.contains("redirected to the agent") {
                "redirect"
            } else {
                "?"
            };
            assert_eq!(said, row.verdict, "{} ({}): {text}", row.address, row.what);
        }
    }

    /// The agent plans with the proxy clients it built; `explain` with the configured URLs. For
    /// every configuration, destination and kind of traffic in the table, both must come to the
    /// same action, proxy and rule.
    #[test]
    fn explain_and_the_agent_plan_alike() {
        let configs = [
            "https_proxy = \"http://u:p@proxy:3128\"\nhttp_proxy = \"http://other:8080\"",
            "https_proxy = \"http://proxy:3128\"\nno_proxy = [\"internal.example\", \"8.8.8.8:443\"]\n\
             default_route = \"direct\"\nconnect_by_ip = true",
            "http_proxy = \"http://proxy:3128\"\ndefault_route = \"deny\"\n\
             ip_range_whitelist = [\"10.1.0.0/16\"]",
            "https_proxy = \"http://proxy:3128\"\nno_proxy = [\"*\"]",
        ];
        let destinations = [
            ("matrix.org", "93.184.216.34:8448"),
            ("db.internal.example", "93.184.216.34:5432"),
            ("8.8.8.8", "8.8.8.8:443"),
            ("8.8.8.8", "8.8.8.8:80"),
            ("app.example", "10.1.2.3:443"),
            ("v6.example", "[2606:4700::1111]:443"),
        ];
        for text in configs {
            let settings = Settings::from_toml(text);
            let policy = settings.policy();
            let current = Routing::new(Settings::from_toml(text)).unwrap();
            for (host, dst) in destinations {
                let dst: SocketAddr = dst.parse().unwrap();
                let name = hostport::valid_hostname(host)
                    .then_some(host)
                    .filter(|h| h.parse::<IpAddr>().is_err());
                let explained = plans(&settings, &policy, name, dst, &Resolved::default());
                for ((label, sniffed), (explained_label, explained)) in
                    traffic_kinds(name).into_iter().zip(explained)
                {
                    assert_eq!(label, explained_label);
                    let agent = plan(
                        &current.rules(),
                        current.proxies(),
                        dst,
                        &sniffed,
                        &Resolved::default(),
                    );
                    // The same action through the same proxies (the agent's are clients).
                    assert_eq!(
                        (
                            describe_action(&agent.action),
                            agent.rule,
                            agent.name,
                            agent.named_by
                        ),
                        (
                            describe_action(&explained.action),
                            explained.rule,
                            explained.name,
                            explained.named_by
                        ),
                        "config {text:?}, {label} to {host} at {dst}"
                    );
                }
            }
        }
    }
}
