//! `egress check-config`: the effective configuration, as TOML with secrets redacted.

use std::fmt::Write as _;

use crate::{
    config::{Config, proxy_url::ProxyUrl},
    kernel,
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
    if !config.containers.is_empty() {
        let _ = writeln!(out, "containers = {}", list(config.containers.clone()));
    }
    if let Some(pods) = &config.pods {
        let _ = writeln!(out, "pod_selector = {}", quote(&pods.selector));
        if let Some(namespace) = &pods.namespace {
            let _ = writeln!(out, "pod_namespace = {}", quote(namespace));
        }
        let _ = writeln!(out, "kube_api = {}", quote(&pods.api));
        let _ = writeln!(
            out,
            "kube_token_file = {}",
            quote(&pods.token_file.display().to_string())
        );
        let _ = writeln!(
            out,
            "kube_ca_file = {}",
            quote(&pods.ca_file.display().to_string())
        );
        if let Some(cgroup) = &pods.kubepods_cgroup {
            let _ = writeln!(out, "kubepods_cgroup = {}", quote(&cgroup.display().to_string()));
        }
    }
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
    let _ = writeln!(out, "warm_upstream = {}", config.warm_upstream);
    let _ = writeln!(out, "connect_timeout = {}", config.timeouts.connect.as_secs_f64());
    let _ = writeln!(
        out,
        "handshake_timeout = {}",
        config.timeouts.handshake.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "request_header_timeout = {}",
        config.timeouts.request_header.as_secs_f64()
    );
    let _ = writeln!(out, "peek_timeout = {}", config.peek_timeout.as_secs_f64());
    let _ = writeln!(out, "connect_by_ip = {}", config.connect_by_ip);
    let _ = writeln!(out, "default_route = {}", quote(config.default_route.as_str()));
    let _ = writeln!(out, "kernel_log = {}", config.kernel_log);
    let dns = &config.dns;
    let mode = match dns.mode {
        crate::config::DnsMode::Observe => "observe",
        crate::config::DnsMode::Synthetic => "synthetic",
    };
    let _ = writeln!(out, "dns_mode = {}", quote(mode));
    if dns.mode == crate::config::DnsMode::Synthetic {
        let _ = writeln!(
            out,
            "synthetic_range = {}",
            quote(&dns.synthetic_range.to_string())
        );
        let resolver = dns.resolver.map_or_else(
            || "the first nameserver of /etc/resolv.conf".to_owned(),
            |r| r.to_string(),
        );
        let _ = writeln!(out, "dns_resolver = {}", quote(&resolver));
    }
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
        if let Err(e) = kernel::cgroup_id(cgroup) {
            let _ = writeln!(out, "# warning: {e:#}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_config_is_valid_toml_without_secrets() {
        let c = Config::from_toml("https_proxy = \"http://u:secret@proxy:3128\"\nno_proxy = [\"a.example\"]");
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
