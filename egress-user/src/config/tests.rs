//! The configuration's layering and its error messages, table-driven.

use std::path::PathBuf;

use super::{settings::DnsMode, *};
use crate::route::{plan::DefaultRoute, policy::NoProxy};

/// A TOML file in a directory of its own, removed on drop.
struct TempFile {
    dir: PathBuf,
    path: PathBuf,
}

impl TempFile {
    fn new(name: &str, text: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "egress-config-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        Self { dir, path }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `egress run` with `flags`, the config file `toml` (if any) and the environment `env`.
fn load_with(toml: Option<&str>, flags: &[&str], env: &[(String, String)]) -> Result<Settings> {
    let file = toml.map(|text| TempFile::new("egress.toml", text));
    let mut argv = vec!["egress".to_owned()];
    if let Some(file) = &file {
        argv.push("--config".into());
        argv.push(file.path.display().to_string());
    }
    argv.extend(flags.iter().map(|f| f.to_string()));
    load(&RunArgs::parse_from(argv)?, env)
}

fn error(toml: Option<&str>, flags: &[&str], env: &[(String, String)]) -> String {
    format!("{:#}", load_with(toml, flags, env).unwrap_err())
}

#[test]
fn defaults_are_the_declared_ones() {
    let s = load_with(None, &[], &[]).unwrap();
    assert_eq!(s.https_proxy.url(), None);
    assert_eq!(s.http_proxy.url(), None);
    assert_eq!(s.policy(), Policy::default());
    assert_eq!(s.listen_port.0, 1001);
    assert_eq!(s.agent_mark.0, 0x6567_7273);
    assert_eq!(s.default_route, DefaultRoute::Proxy);
    assert_eq!(s.peek_timeout.get(), std::time::Duration::from_millis(500));
    assert_eq!(s.pins.bpffs_dir, PathBuf::from("/sys/fs/bpf/egress"));
    assert_eq!(
        s.engine.container_engine_socket,
        PathBuf::from("/var/run/docker.sock")
    );
    assert_eq!(s.warm_upstream.get(), 4);
    assert_eq!(s.worker_threads, 1);
    assert_eq!(s.user, "nobody");
    assert!(!s.connect_by_ip);
    assert_eq!(s.dns_mode, DnsMode::Observe);
    assert_eq!(s, Settings::default());
}

/// Every declared setting is a TOML key too: its default, written in the file, reads back as
/// the same setting (the clap id and the serde name agree).
#[test]
fn every_flag_is_a_toml_key() {
    let defaults = toml::Table::try_from(Settings::default()).unwrap();
    let mut groups = toml::Table::new();
    for group in [
        toml::Table::try_from(Settings::default().targets).unwrap(),
        toml::Table::try_from(Settings::default().engine).unwrap(),
        toml::Table::try_from(Settings::default().pins).unwrap(),
    ] {
        groups.extend(group);
    }
    let keys = sources::keys();
    assert!(keys.len() > 30, "{keys:?}");
    for key in &keys {
        let Some(value) = defaults.get(key).or_else(|| groups.get(key)) else {
            // Settings without a default (nothing set) serialize to nothing.
            continue;
        };
        let text = format!("{key} = {value}");
        let read = load_with(Some(&text), &[], &[]);
        assert!(read.is_ok(), "{text}: {:#}", read.unwrap_err());
    }
    for key in defaults.keys().chain(groups.keys()) {
        assert!(keys.contains(key), "serialized {key} is not a declared setting");
    }
}

#[test]
fn later_sources_win_file_then_env_then_flags() {
    let file = Some("https_proxy = \"file:1\"\nhttp_proxy = \"file:2\"\nno_proxy = [\"file.example\"]");
    let s = load_with(file, &[], &[]).unwrap();
    assert_eq!(s.https_proxy.url().unwrap().host, "file");
    assert_eq!(
        s.policy().no_proxy,
        NoProxy::parse_list(["file.example"]).unwrap()
    );

    let e = env(&[("HTTPS_PROXY", "env:1"), ("no_proxy", "env.example,10.0.0.0/8")]);
    let s = load_with(file, &[], &e).unwrap();
    assert_eq!(s.https_proxy.url().unwrap().host, "env");
    assert_eq!(s.http_proxy.url().unwrap().host, "file");
    assert_eq!(
        s.policy().no_proxy,
        NoProxy::parse_env("env.example,10.0.0.0/8").unwrap()
    );

    let flags = [
        "--https-proxy",
        "flag:1",
        "--no-proxy",
        "flag.example",
        "--no-proxy",
        "a.example,b.example",
    ];
    let s = load_with(file, &flags, &e).unwrap();
    assert_eq!(s.https_proxy.url().unwrap().host, "flag");
    assert_eq!(
        s.policy().no_proxy,
        NoProxy::parse_list(["flag.example", "a.example", "b.example"]).unwrap()
    );

    // The lowercase spelling wins, whichever comes first; empty counts as unset.
    let e = env(&[
        ("HTTPS_PROXY", "upper:1"),
        ("https_proxy", "lower:1"),
        ("http_proxy", ""),
    ]);
    let s = load_with(file, &[], &e).unwrap();
    assert_eq!(s.https_proxy.url().unwrap().host, "lower");
    assert_eq!(s.http_proxy.url().unwrap().host, "file");
}

#[test]
fn a_blank_proxy_means_none_and_overrides() {
    let file = Some("https_proxy = \"file:1\"");
    let s = load_with(file, &[], &env(&[("https_proxy", " ")])).unwrap();
    assert!(s.https_proxy.url().is_none());
    let s = load_with(file, &["--https-proxy", ""], &[]).unwrap();
    assert!(s.https_proxy.url().is_none());
}

#[test]
fn flag_targets_replace_the_files_targets_together() {
    let file =
        Some("cgroups = [\"/sys/fs/cgroup/a\"]\nunits = [\"synapse.service\"]\ncontainers = [\"synapse\"]");
    let s = load_with(file, &[], &[]).unwrap();
    assert_eq!(s.targets.cgroups, vec![PathBuf::from("/sys/fs/cgroup/a")]);
    assert_eq!(s.targets.units, vec!["synapse.service".to_owned()]);
    let s = load_with(file, &["--container", "bridge"], &[]).unwrap();
    assert!(s.targets.cgroups.is_empty() && s.targets.units.is_empty());
    assert_eq!(s.targets.containers[0].0, "bridge");
}

#[test]
fn lists_and_ranges() {
    let s = load_with(
        Some("ip_range_blacklist = [\"10.0.0.0/8\"]\nip_range_whitelist = [\"10.1.0.0/16\", \"10.2.3.4\"]"),
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(
        s.ip_range_blacklist,
        vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(s.ip_range_whitelist.len(), 2);
    let s = load_with(
        Some("ip_range_blacklist = [\"10.0.0.0/8\"]"),
        &["--ip-range-blacklist", "192.168.0.0/16"],
        &[],
    )
    .unwrap();
    assert_eq!(
        s.ip_range_blacklist,
        vec!["192.168.0.0/16".parse::<ipnet::IpNet>().unwrap()]
    );
}

/// Each refused value is reported once with its source, its setting and why.
#[test]
fn bad_values_name_the_source_the_setting_and_why() {
    type Case = (
        Option<&'static str>,
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
        &'static [&'static str],
    );
    let cases: &[Case] = &[
        (
            Some("https_proxy = \"socks5://p:1080\""),
            &[],
            &[],
            &["config file", ": https_proxy: ", "socks5"],
        ),
        (
            None,
            &["--https-proxy", "http://p:99999"],
            &[],
            &["--https-proxy", "99999"],
        ),
        (
            None,
            &[],
            &[("http_proxy", "ftp://x")],
            &["environment variable http_proxy: ", "ftp"],
        ),
        (
            Some("ip_range_blacklist = [\"10.0.0.0/33\"]"),
            &[],
            &[],
            &["ip_range_blacklist: ", "10.0.0.0/33"],
        ),
        (
            None,
            &["--ip-range-whitelist", "nonsense"],
            &[],
            &["--ip-range-whitelist", "nonsense"],
        ),
        (
            Some("no_proxy = [\"10.0.0.0/99\"]"),
            &[],
            &[],
            &["no_proxy: ", "10.0.0.0/99"],
        ),
        (
            Some("agent_mark = 0"),
            &[],
            &[],
            &["agent_mark: 0: must be a non-zero"],
        ),
        (
            Some("listen_port = 0"),
            &[],
            &[],
            &["listen_port: 0: must be a port"],
        ),
        (
            Some("listen_port = 70000"),
            &[],
            &[],
            &["listen_port: 70000: must be a port"],
        ),
        (
            Some("admin_addr = \"localhost\""),
            &[],
            &[],
            &["admin_addr: localhost: expected IP:PORT"],
        ),
        (
            Some("peek_timeout = -1.0"),
            &[],
            &[],
            &["peek_timeout: -1: must be a number of seconds"],
        ),
        (
            None,
            &["--connect-timeout", "NaN"],
            &[],
            &["--connect-timeout", "must be a number of seconds"],
        ),
        (
            Some("warm_upstream = 65"),
            &[],
            &[],
            &["warm_upstream: 65: must be a number from 0 to 64"],
        ),
        (
            Some("default_route = \"sideways\""),
            &[],
            &[],
            &["default_route", "sideways"],
        ),
        (
            Some("listen_port = \"1001\""),
            &[],
            &[],
            &["listen_port", "string"],
        ),
        (
            Some("containers = [\"a/b\"]"),
            &[],
            &[],
            &["containers: ", "not a container name"],
        ),
    ];
    for (toml, flags, env_pairs, needles) in cases {
        let message = error(*toml, flags, &env(env_pairs));
        for needle in needles.iter() {
            assert!(message.contains(needle), "`{message}` should mention `{needle}`");
        }
        // Said once: no part of the message comes twice.
        for needle in needles.iter().filter(|n| n.len() > 8) {
            assert_eq!(
                message.matches(needle).count(),
                1,
                "`{message}` repeats `{needle}`"
            );
        }
    }
}

#[test]
fn unknown_keys_and_broken_files_are_refused() {
    let unknown = error(Some("https_proxy = \"p\"\nno_proxy_hosts = []"), &[], &[]);
    assert!(unknown.contains("unknown key no_proxy_hosts"), "{unknown}");
    let broken = error(Some("https_proxy = http://u:secret@p:3128"), &[], &[]);
    assert!(
        broken.contains("line 1") && broken.contains("key https_proxy"),
        "{broken}"
    );
    assert!(!broken.contains("secret"), "{broken}");
}

#[test]
fn homeserver_yaml_sits_between_defaults_and_the_file() {
    let yaml = TempFile::new(
        "homeserver.yaml",
        "https_proxy: http://u:p@synapse-proxy:3128\nhttp_proxy: synapse-http:8080\n\
         no_proxy_hosts: [synapse.example, 10.5.0.0/16]\nip_range_blacklist: [10.0.0.0/8]\n\
         ip_range_whitelist: [10.5.0.0/16]\n",
    );
    let yaml_path = yaml.path.display().to_string();
    let s = load_with(None, &["--homeserver-config", &yaml_path], &[]).unwrap();
    assert_eq!(s.https_proxy.url().unwrap().host, "synapse-proxy");
    assert_eq!(s.http_proxy.url().unwrap().port, 8080);
    assert_eq!(
        s.policy().no_proxy,
        NoProxy::parse_list(["synapse.example", "10.5.0.0/16"]).unwrap()
    );
    assert_eq!(
        s.ip_range_blacklist,
        vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
    );

    // Named in the file, and overridden by it.
    let file =
        format!("homeserver_config = \"{yaml_path}\"\nhttps_proxy = \"file:1\"\nip_range_whitelist = []");
    let s = load_with(Some(&file), &[], &[]).unwrap();
    assert_eq!(s.https_proxy.url().unwrap().host, "file");
    assert!(s.ip_range_whitelist.is_empty());
    assert_eq!(s.http_proxy.url().unwrap().host, "synapse-http");

    let bad = TempFile::new("homeserver.yaml", "ip_range_blacklist: [not-a-range]\n");
    let message = error(
        None,
        &["--homeserver-config", &bad.path.display().to_string()],
        &[],
    );
    assert!(
        message.contains(&format!(
            "homeserver.yaml {}: ip_range_blacklist",
            bad.path.display()
        )) && message.contains("not-a-range"),
        "{message}"
    );
}

#[test]
fn pod_selection_from_the_file_the_flags_and_a_pods_environment() {
    let in_pod = env(&[
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("KUBERNETES_SERVICE_PORT", "443"),
    ]);
    let s = load_with(
        Some("pod_selector = \"app=synapse\"\npod_namespace = \"matrix\""),
        &[],
        &in_pod,
    )
    .unwrap();
    assert_eq!(s.pod_selector.unwrap().0, "app=synapse");
    assert_eq!(s.pod_namespace.unwrap().0, "matrix");
    assert_eq!(s.kube_api.unwrap().to_string(), "https://10.96.0.1:443");
    assert_eq!(
        s.kube_token_file,
        PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
    );
    // Target flags replace the file's targets, pods included.
    let s = load_with(
        Some("pod_selector = \"app=synapse\""),
        &["--cgroup", "/sys/fs/cgroup/x"],
        &in_pod,
    )
    .unwrap();
    assert_eq!(s.pod_selector, None);
    let s = load_with(
        Some("pod_selector = \"app=synapse\""),
        &[
            "--pod-selector",
            "tier=homeserver",
            "--kube-api",
            "https://api.cluster.example:6443",
        ],
        &in_pod,
    )
    .unwrap();
    assert_eq!(s.pod_selector.unwrap().0, "tier=homeserver");
    assert_eq!(
        s.kube_api.unwrap().to_string(),
        "https://api.cluster.example:6443"
    );

    let cases: &[(&str, bool, &str)] = &[
        (
            "pod_selector = \"app=synapse\"",
            false,
            "no Kubernetes API server",
        ),
        ("pod_selector = \"app=syn&apse\"", true, "not a label selector"),
        (
            "pod_selector = \"a=b\"\npod_namespace = \"Matrix\"",
            true,
            "not a namespace name",
        ),
        ("pod_namespace = \"matrix\"", true, "pod_selector is not"),
        (
            "pod_selector = \"a=b\"\nkube_api = \"http://10.96.0.1\"",
            false,
            "expected https://",
        ),
    ];
    for (text, in_a_pod, needle) in cases {
        let environment = if *in_a_pod { in_pod.clone() } else { Vec::new() };
        let message = error(Some(text), &[], &environment);
        assert!(message.contains(needle), "{text}: {message}");
    }
}

/// Synthetic DNS settings: each bad combination refused with the setting and the reason.
#[test]
fn synthetic_dns_settings_are_checked() {
    let ok = load_with(
        Some("dns_mode = \"synthetic\"\nhttps_proxy = \"http://proxy:3128\"\ndns_resolver = \"10.0.0.2\""),
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(ok.dns_mode, DnsMode::Synthetic);
    assert_eq!(ok.synthetic_range.0, "240.64.0.0/16".parse().unwrap());
    assert_eq!(ok.dns_resolver.unwrap().0, "10.0.0.2:53".parse().unwrap());
    let base = "dns_mode = \"synthetic\"\nhttps_proxy = \"http://proxy:3128\"\n";
    let cases = [
        ("dns_mode = \"synthetic\"".to_owned(), "needs https_proxy"),
        (format!("{base}connect_by_ip = true"), "connect_by_ip cannot work"),
        (
            format!("{base}synthetic_range = \"198.18.0.0/16\""),
            "overlaps ip_range_blacklist 198.18.0.0/15",
        ),
        (
            format!("{base}synthetic_range = \"240.64.0.0/16\"\nno_proxy = [\"240.0.0.0/4\"]"),
            "overlaps no_proxy 240.0.0.0/4",
        ),
        (
            format!("{base}synthetic_range = \"240.64.0.0\""),
            "synthetic_range: 240.64.0.0: expected an IPv4 range",
        ),
        (format!("{base}synthetic_range = \"240.64.0.0/31\""), "too small"),
        (
            format!("{base}dns_resolver = \"resolver.example\""),
            "dns_resolver: resolver.example: expected IP",
        ),
    ];
    for (text, expected) in cases {
        let message = error(Some(&text), &[], &[]);
        assert!(message.contains(expected), "{text}: {message}");
    }
    let policy = Policy::default();
    assert!(check_resolver(&policy, "127.0.0.53:53".parse().unwrap()).is_ok());
    let refused = format!(
        "{:#}",
        check_resolver(&policy, "10.0.0.2:53".parse().unwrap()).unwrap_err()
    );
    assert!(refused.contains("ip_range_blacklist 10.0.0.0/8"), "{refused}");
}
