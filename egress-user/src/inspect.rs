//! `egress check-config` and `egress explain`: what the configuration is and what it would do,
//! without attaching anything or contacting any destination.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context, Result, bail};

use crate::{
    config::{Config, DefaultRoute},
    ebpf,
    policy::{Protocol, Route, Target},
    proxy_url::ProxyUrl,
};

/// The effective configuration in TOML form, secrets redacted; warnings for cgroups that do not
/// exist (yet: a unit's cgroup exists only while it runs).
pub fn render_config(config: &Config) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let list = |items: Vec<String>| {
        format!(
            "[{}]",
            items.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", ")
        )
    };
    let proxy = |p: &Option<ProxyUrl>| {
        p.as_ref()
            .map_or("\"\"  # none: direct".to_owned(), |p| quote(&p.to_string()))
    };
    let mut out = String::new();
    let cgroups = config.cgroups.iter().map(|c| c.display().to_string()).collect();
    let _ = writeln!(out, "cgroups = {}", list(cgroups));
    let _ = writeln!(out, "https_proxy = {}", proxy(&config.https_proxy));
    let _ = writeln!(out, "http_proxy = {}", proxy(&config.http_proxy));
    let p = &config.policy;
    let _ = writeln!(
        out,
        "no_proxy = {}",
        list(p.no_proxy.entries().iter().map(|e| e.to_string()).collect())
    );
    let _ = writeln!(
        out,
        "ip_range_blacklist = {}",
        list(p.blacklist.iter().map(|n| n.to_string()).collect())
    );
    let _ = writeln!(
        out,
        "ip_range_whitelist = {}",
        list(p.whitelist.iter().map(|n| n.to_string()).collect())
    );
    let _ = writeln!(out, "listen_port = {}", config.listen_port);
    let _ = writeln!(out, "agent_mark = {:#x}", config.agent_mark);
    let _ = writeln!(out, "admin_addr = {}", quote(&config.admin_addr.to_string()));
    let _ = writeln!(out, "user = {}", quote(&config.user));
    let _ = writeln!(out, "worker_threads = {}", config.worker_threads);
    let _ = writeln!(out, "connect_timeout = {}", config.timeouts.connect.as_secs_f64());
    let _ = writeln!(
        out,
        "handshake_timeout = {}",
        config.timeouts.handshake.as_secs_f64()
    );
    let _ = writeln!(out, "peek_timeout = {}", config.peek_timeout.as_secs_f64());
    let _ = writeln!(out, "connect_by_ip = {}", config.connect_by_ip);
    let _ = writeln!(out, "default_route = {}", quote(route_name(config.default_route)));
    let _ = writeln!(out, "kernel_log = {}", config.kernel_log);
    let _ = writeln!(
        out,
        "bpffs_dir = {}",
        quote(&config.pin_dir.display().to_string())
    );
    if let Some(ca) = &config.proxy_ca_file {
        let _ = writeln!(out, "proxy_ca_file = {}", quote(&ca.display().to_string()));
    }
    let _ = writeln!(
        out,
        "insecure_skip_proxy_tls_verify = {}",
        config.insecure_skip_proxy_tls_verify
    );
    for cgroup in &config.cgroups {
        if let Err(e) = ebpf::cgroup_id(cgroup) {
            let _ = writeln!(out, "# warning: {e:#}");
        }
    }
    out
}

fn route_name(route: DefaultRoute) -> &'static str {
    match route {
        DefaultRoute::Proxy => "proxy",
        DefaultRoute::Direct => "direct",
        DefaultRoute::Deny => "deny",
    }
}

/// `host:port`, `[v6]:port`, `ip:port`, or a bare host (port 443).
pub fn parse_destination(dest: &str) -> Result<(String, u16)> {
    if let Ok(addr) = dest.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    if let Ok(ip) = dest
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok((ip.to_string(), 443));
    }
    let (host, port) = match dest.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .with_context(|| format!("{dest}: bad port '{port}'"))?,
        ),
        None => (dest, 443),
    };
    if !crate::sniff::valid_hostname(host) || port == 0 {
        bail!("{dest}: expected HOST[:PORT], IP[:PORT] or [IPv6]:PORT");
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// What the kernel program does with a connect() to `ip`: it sees only the address.
#[derive(Debug, PartialEq, Eq)]
pub enum KernelDecision {
    /// Loopback (127.0.0.0/8, ::1, v4-mapped loopback) is never intercepted: Redis, Postgres,
    /// the agent itself.
    Loopback,
    /// connect() fails with EPERM; the rule that denied it.
    Deny(String),
    /// Not intercepted (a no_proxy address range): straight to the destination.
    Bypass,
    /// Redirected to the agent, which decides with the name.
    Redirect,
}

pub fn kernel_decision(policy: &crate::policy::Policy, ip: IpAddr) -> KernelDecision {
    if ip.to_canonical().is_loopback() {
        KernelDecision::Loopback
    } else if let Some(rule) = policy.denied(ip) {
        KernelDecision::Deny(rule)
    } else if policy
        .no_proxy
        .kernel_bypass_nets()
        .iter()
        .any(|net| net.contains(&ip))
    {
        // (Denied addresses were answered above: no need for the bypass set minus them.)
        KernelDecision::Bypass
    } else {
        KernelDecision::Redirect
    }
}

/// What would happen to a connection to `host:port` at address `ip`, for each kind of traffic.
pub fn explain(config: &Config, host: &str, port: u16, ip: IpAddr) -> String {
    let name = (host.parse::<IpAddr>().is_err()).then_some(host);
    let mut out = String::new();
    let _ = writeln!(out, "destination: {}", SocketAddr::new(ip, port));
    if let Some(name) = name {
        let _ = writeln!(out, "name: {name}");
    }
    let policy = &config.policy;
    let kernel = match kernel_decision(policy, ip) {
        KernelDecision::Deny(rule) => {
            format!("connect() fails with EPERM at once ({rule}); nothing leaves the host")
        }
        KernelDecision::Loopback => "not intercepted: loopback is always left alone".to_owned(),
        KernelDecision::Bypass => "not intercepted: goes direct (no_proxy address range)".to_owned(),
        KernelDecision::Redirect => "redirected to the agent".to_owned(),
    };
    let _ = writeln!(out, "kernel: {kernel}");
    if !kernel.starts_with("redirected") {
        return out;
    }
    for (label, protocol, proxy) in [
        ("TLS (SNI)", Protocol::Tls, &config.https_proxy),
        ("plain HTTP (Host)", Protocol::Http, &config.http_proxy),
        ("other / silent client", Protocol::Unknown, &config.https_proxy),
    ] {
        let named = if protocol == Protocol::Unknown { None } else { name };
        let line = if protocol == Protocol::Unknown && config.default_route == DefaultRoute::Deny {
            "deny (default_route deny)".to_owned()
        } else {
            let proxy = proxy
                .as_ref()
                .filter(|_| protocol != Protocol::Unknown || config.default_route == DefaultRoute::Proxy);
            let target = Target {
                ip,
                port,
                host: named,
                protocol,
            };
            let verdict = policy.decide(&target, proxy.is_some());
            let what = match (verdict.route, proxy) {
                (Route::Deny, _) => "deny: connection reset".to_owned(),
                (Route::Direct, _) | (Route::Proxy, None) => {
                    format!("direct to {}", SocketAddr::new(ip, port))
                }
                (Route::Proxy, Some(proxy)) if protocol == Protocol::Http => {
                    let host = named
                        .filter(|_| !config.connect_by_ip)
                        .map_or(ip.to_string(), str::to_owned);
                    format!(
                        "forward via {proxy} as GET http://{}/...",
                        crate::forward::absolute_authority(&host, port)
                    )
                }
                (Route::Proxy, Some(proxy)) => {
                    let connect = crate::listener::connect_target(&target, config.connect_by_ip);
                    format!("CONNECT {connect} via {proxy}")
                }
            };
            format!("{what}  [rule: {}]", verdict.rule)
        };
        let _ = writeln!(out, "{label}: {line}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cli::RunArgs, config::FileConfig};

    fn config(toml_text: &str) -> Config {
        let args = RunArgs {
            cgroups: vec!["/nonexistent".into()],
            ..RunArgs::default()
        };
        Config::merge(
            toml::from_str::<FileConfig>(toml_text).unwrap(),
            Default::default(),
            &args,
            &[],
        )
        .unwrap()
    }

    #[test]
    fn destinations_parse() {
        let cases = [
            ("matrix.org:8448", ("matrix.org", 8448)),
            ("Matrix.Org", ("matrix.org", 443)),
            ("10.1.2.3:443", ("10.1.2.3", 443)),
            ("[2001:db8::1]:8448", ("2001:db8::1", 8448)),
            ("2001:db8::1", ("2001:db8::1", 443)),
        ];
        for (input, (host, port)) in cases {
            assert_eq!(
                parse_destination(input).unwrap(),
                (host.to_owned(), port),
                "{input}"
            );
        }
        for bad in ["a b:1", "host:99999", "host:0", ":443", "host:x"] {
            assert!(parse_destination(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn explains_each_route() {
        let c = config(
            "https_proxy = \"http://u:secret@proxy:3128\"\nno_proxy = [\"internal.example\", \"192.0.2.0/24\"]\n\
             ip_range_whitelist = [\"192.0.2.0/24\"]",
        );
        let public: IpAddr = "93.184.216.34".parse().unwrap();
        let text = explain(&c, "matrix.org", 8448, public);
        assert!(text.contains("kernel: redirected to the agent"), "{text}");
        assert!(
            text.contains("TLS (SNI): CONNECT matrix.org:8448 via http://u:***@proxy:3128"),
            "{text}"
        );
        assert!(
            text.contains("plain HTTP (Host): direct to 93.184.216.34:8448"),
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

    #[test]
    fn rendered_config_is_valid_toml_without_secrets() {
        let c = config("https_proxy = \"http://u:secret@proxy:3128\"\nno_proxy = [\"a.example\"]");
        let text = render_config(&c);
        assert!(!text.contains("secret"), "{text}");
        assert!(
            text.contains("https_proxy = \"http://u:***@proxy:3128\""),
            "{text}"
        );
        assert!(text.contains("# warning: cgroup /nonexistent"), "{text}");
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(
            parsed["no_proxy"].as_array().unwrap()[0].as_str(),
            Some("a.example")
        );
    }
}
