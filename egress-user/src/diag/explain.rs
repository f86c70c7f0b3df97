//! `egress explain DEST`: what would happen to a connection to DEST, step by step: the kernel's
//! verdict on the address, then the agent's routing plan for each kind of traffic. It asks the
//! same code the agent runs and contacts nothing.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use crate::{
    config::{Config, proxy_url::ProxyUrl},
    kernel::verdict::{KernelVerdict, kernel_verdict},
    route::plan::{Action, Plan, Sniffed, plan},
};

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
    config: &'a Config,
    name: Option<&str>,
    dst: SocketAddr,
) -> Vec<(&'static str, Plan<'a, ProxyUrl>)> {
    traffic_kinds(name)
        .into_iter()
        .map(|(label, sniffed)| (label, plan(&config.rules(), config.proxies(), dst, &sniffed)))
        .collect()
}

/// What would happen to a connection to `host:port` at address `ip`, for each kind of traffic.
pub fn explain(config: &Config, host: &str, port: u16, ip: IpAddr) -> String {
    let name = (host.parse::<IpAddr>().is_err()).then_some(host);
    let dst = SocketAddr::new(ip, port);
    let mut out = String::new();
    let _ = writeln!(out, "destination: {dst}");
    if let Some(name) = name {
        let _ = writeln!(out, "name: {name}");
    }
    let kernel = match kernel_verdict(&config.policy, ip) {
        KernelVerdict::Deny(rule) => {
            format!("connect() fails with EPERM at once ({rule}); nothing leaves the host")
        }
        KernelVerdict::Loopback => "not intercepted: loopback is always left alone".to_owned(),
        KernelVerdict::Bypass => "not intercepted: goes direct (no_proxy address range)".to_owned(),
        KernelVerdict::Redirect => "redirected to the agent".to_owned(),
    };
    let _ = writeln!(out, "kernel: {kernel}");
    if kernel_verdict(&config.policy, ip) != KernelVerdict::Redirect {
        return out;
    }
    for (label, plan) in plans(config, name, dst) {
        let what = match &plan.action {
            Action::Deny => "deny: connection reset".to_owned(),
            Action::Direct { to } => format!("direct to {to}"),
            Action::Connect { proxy, target } => format!("CONNECT {target} via {proxy}"),
            Action::Forward { proxy, authority } => {
                format!("forward via {proxy} as GET http://{authority}/...")
            }
        };
        let _ = writeln!(out, "{label}: {what}  [rule: {}]", plan.rule);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{hostport, proxy::Current};

    #[test]
    fn explains_each_route() {
        let c = Config::from_toml(
            "https_proxy = \"http://u:secret@proxy:3128\"\nno_proxy = [\"internal.example\", \"192.0.2.0/24\"]\n\
             ip_range_whitelist = [\"192.0.2.0/24\"]",
        );
        let public: IpAddr = "93.184.216.34".parse().unwrap();
        let text = explain(&c, "matrix.org", 8448, public);
        assert!(text.contains("kernel: redirected to the agent"), "{text}");
        assert!(
            text.contains("TLS (SNI): CONNECT matrix.org:8448 via http://u:***@proxy:3128  [rule: proxy]"),
            "{text}"
        );
        assert!(
            text.contains("plain HTTP (Host): direct to 93.184.216.34:8448  [rule: no proxy for protocol]"),
            "{text}"
        );
        assert!(
            text.contains("other / silent client: CONNECT 93.184.216.34:8448 via"),
            "{text}"
        );
        assert!(!text.contains("secret"));

        let text = explain(&c, "10.1.2.3", 443, "10.1.2.3".parse().unwrap());
        assert!(
            text.contains("EPERM") && text.contains("ip_range_blacklist 10.0.0.0/8"),
            "{text}"
        );

        let text = explain(&c, "192.0.2.7", 443, "192.0.2.7".parse().unwrap());
        assert!(text.contains("not intercepted: goes direct"), "{text}");

        for loopback in ["127.0.0.1", "::1", "::ffff:127.0.0.2"] {
            let text = explain(&c, "localhost", 5432, loopback.parse().unwrap());
            assert!(text.contains("kernel: not intercepted: loopback"), "{text}");
            assert!(!text.contains("EPERM"), "{text}");
        }

        let text = explain(&c, "db.internal.example", 5432, public);
        assert!(
            text.contains("TLS (SNI): direct to") && text.contains("no_proxy internal.example"),
            "{text}"
        );
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
            let config = Config::from_toml(text);
            let current = Current::new(Config::from_toml(text)).unwrap();
            for (host, dst) in destinations {
                let dst: SocketAddr = dst.parse().unwrap();
                let name = hostport::valid_hostname(host)
                    .then_some(host)
                    .filter(|h| h.parse::<IpAddr>().is_err());
                let explained = plans(&config, name, dst);
                for ((label, sniffed), (explained_label, explained)) in
                    traffic_kinds(name).into_iter().zip(explained)
                {
                    assert_eq!(label, explained_label);
                    let agent = plan(&current.config.rules(), current.proxies(), dst, &sniffed);
                    let agent = Plan {
                        action: agent.action.map_proxy(|client| &client.url),
                        rule: agent.rule,
                    };
                    assert_eq!(agent, explained, "config {text:?}, {label} to {host} at {dst}");
                }
            }
        }
    }
}
