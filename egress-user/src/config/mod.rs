//! The effective configuration, from four sources, later wins:
//! built-in defaults → TOML file → environment (`http_proxy`, `https_proxy`, `no_proxy`, with
//! Synapse's parsing) → command-line flags. Every bad value stops the start with an error that
//! names the key, the value and why; the daemon never runs half-configured.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use serde::Deserialize;

pub mod flags;
pub mod homeserver;
pub mod proxy_url;

use crate::{
    containers::kubernetes::{self, PodSelection},
    kernel::cgroups,
    route::{
        plan::{DefaultRoute, Proxies, Rules},
        policy::{self, NoProxy, Policy},
    },
};
use flags::RunArgs;
use homeserver::SynapseSettings;
use proxy_url::{ProxyUrl, proxy_from_env};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/egress/egress.toml";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egress";
/// Below 1024 (`net.ipv4.ip_unprivileged_port_start`), so that no unprivileged process can
/// listen there, not even while egress restarts.
pub const DEFAULT_LISTEN_PORT: u16 = 1001;
/// "egrs": marks the agent's own sockets so the kernel program never redirects them.
pub const DEFAULT_AGENT_MARK: u32 = 0x6567_7273;
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9478";
/// Idle connections kept ready to each upstream proxy unless configured.
pub const DEFAULT_WARM_UPSTREAM: usize = 4;
/// The unprivileged user the agent becomes once attached.
pub const DEFAULT_USER: &str = "nobody";

/// Time limits on reaching the destination.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// TCP connect (and TLS handshake) to the proxy, or a direct connect.
    pub connect: Duration,
    /// From sending CONNECT to the end of the proxy's answer head.
    pub handshake: Duration,
    /// A forwarded plain-HTTP client's request head must arrive within this, and a kept-alive
    /// client connection may stay idle no longer.
    pub request_header: Duration,
}

/// The TOML file: same names as the flags (and as Synapse's homeserver.yaml where they exist).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub cgroups: Option<Vec<PathBuf>>,
    /// systemd units whose cgroups are intercepted (e.g. matrix-synapse.service).
    pub units: Option<Vec<String>>,
    /// Docker/Podman containers (names or ids) whose connections are intercepted.
    pub containers: Option<Vec<String>>,
    pub container_engine_socket: Option<PathBuf>,
    pub container_cgroup_parent: Option<PathBuf>,
    /// Kubernetes pods whose connections are intercepted, by label selector.
    pub pod_selector: Option<String>,
    pub pod_namespace: Option<String>,
    pub kubepods_cgroup: Option<PathBuf>,
    pub kube_api: Option<String>,
    pub kube_token_file: Option<PathBuf>,
    pub kube_ca_file: Option<PathBuf>,
    /// Synapse's homeserver.yaml, to import its proxy and IP range settings from.
    pub homeserver_config: Option<PathBuf>,
    pub https_proxy: Option<String>,
    pub http_proxy: Option<String>,
    pub no_proxy: Option<Vec<String>>,
    pub ip_range_blacklist: Option<Vec<String>>,
    pub ip_range_whitelist: Option<Vec<String>>,
    pub listen_port: Option<u16>,
    pub agent_mark: Option<u32>,
    pub connect_timeout: Option<f64>,
    pub handshake_timeout: Option<f64>,
    pub request_header_timeout: Option<f64>,
    pub peek_timeout: Option<f64>,
    pub connect_by_ip: Option<bool>,
    pub default_route: Option<DefaultRoute>,
    pub kernel_log: Option<bool>,
    pub bpffs_dir: Option<PathBuf>,
    pub proxy_ca_file: Option<PathBuf>,
    pub insecure_skip_proxy_tls_verify: Option<bool>,
    pub admin_addr: Option<String>,
    pub user: Option<String>,
    pub worker_threads: Option<usize>,
    pub warm_upstream: Option<usize>,
    pub dns_mode: Option<DnsMode>,
    pub synthetic_range: Option<String>,
    pub dns_resolver: Option<String>,
}

/// What egress does with the intercepted processes' DNS (see `dns`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DnsMode {
    /// Read their answers, to learn the names behind addresses; change nothing.
    #[default]
    Observe,
    /// Answer their queries: names outside no_proxy get addresses from `synthetic_range`, which
    /// egress CONNECTs by name; the rest goes to `dns_resolver`.
    Synthetic,
}

/// The DNS settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    pub mode: DnsMode,
    pub synthetic_range: ipnet::Ipv4Net,
    /// The internal resolver for synthetic DNS, if configured (else /etc/resolv.conf's).
    pub resolver: Option<std::net::SocketAddr>,
}

#[derive(Debug)]
pub struct Config {
    pub cgroups: Vec<PathBuf>,
    /// Units still to resolve to cgroups (done by [`Config::load`]).
    pub units: Vec<String>,
    /// Containers followed by name or id (see `containers`).
    pub containers: Vec<String>,
    pub container_engine_socket: PathBuf,
    /// Where the engine puts containers, if configured (else asked of the engine).
    pub container_cgroup_parent: Option<PathBuf>,
    /// Kubernetes pods followed by label, if configured.
    pub pods: Option<PodSelection>,
    pub https_proxy: Option<ProxyUrl>,
    pub http_proxy: Option<ProxyUrl>,
    pub policy: Policy,
    pub listen_port: u16,
    pub agent_mark: u32,
    pub timeouts: Timeouts,
    /// How long to wait for the client's first bytes (ClientHello / request head).
    pub peek_timeout: Duration,
    /// CONNECT to the vetted IP even when SNI/Host names the destination.
    pub connect_by_ip: bool,
    pub default_route: DefaultRoute,
    pub kernel_log: bool,
    pub pin_dir: PathBuf,
    /// CA certificates (PEM) for verifying https:// proxies, instead of the system roots.
    pub proxy_ca_file: Option<PathBuf>,
    /// Testing only: accept any certificate from an https:// proxy.
    pub insecure_skip_proxy_tls_verify: bool,
    /// Where /health and /metrics are served.
    pub admin_addr: std::net::SocketAddr,
    /// Who the agent becomes after attaching.
    pub user: String,
    /// Threads serving connections: 1 = one event loop, 0 = one per CPU.
    pub worker_threads: usize,
    /// Idle connections kept ready to each upstream proxy (0: none).
    pub warm_upstream: usize,
    pub dns: DnsSettings,
}

impl Config {
    /// Resolves the configuration for `egress run` from all sources.
    /// Synthetic DNS: fills in the default internal resolver (/etc/resolv.conf's) and refuses
    /// one the policy forbids. At start and on every reload (the policy may have changed).
    pub fn settle_dns(&mut self) -> Result<()> {
        if self.dns.mode != DnsMode::Synthetic {
            return Ok(());
        }
        let resolver = match self.dns.resolver {
            Some(resolver) => resolver,
            None => crate::dns::server::system_resolver()?,
        };
        check_resolver(&self.policy, resolver)?;
        self.dns.resolver = Some(resolver);
        Ok(())
    }

    /// The settings the routing plan follows.
    pub fn rules(&self) -> Rules<'_> {
        Rules {
            policy: &self.policy,
            default_route: self.default_route,
            connect_by_ip: self.connect_by_ip,
        }
    }

    /// The configured proxy URLs, as a routing plan chooses from them.
    pub fn proxies(&self) -> Proxies<'_, ProxyUrl> {
        Proxies {
            https: self.https_proxy.as_ref(),
            http: self.http_proxy.as_ref(),
        }
    }

    pub fn load(args: &RunArgs, env: &[(String, String)]) -> Result<Self> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => read_file(Path::new(DEFAULT_CONFIG_PATH))?,
            None => FileConfig::default(),
        };
        let synapse = match args
            .homeserver_config
            .as_ref()
            .or(file.homeserver_config.as_ref())
        {
            Some(path) => homeserver::read_homeserver_config(path)?,
            None => SynapseSettings::default(),
        };
        let mut config = Self::merge(file, synapse, args, env)?;
        for unit in std::mem::take(&mut config.units) {
            let cgroup = cgroups::resolve_unit(&unit).with_context(|| format!("unit {unit}"))?;
            config.cgroups.push(cgroup);
        }
        Ok(config)
    }

    /// Layers the sources; `synapse` (from homeserver.yaml) sits between the defaults and the file.
    pub fn merge(
        file: FileConfig,
        synapse: SynapseSettings,
        args: &RunArgs,
        env: &[(String, String)],
    ) -> Result<Self> {
        let env_value = |name: &str| proxy_from_env(env.iter().cloned(), name);
        let file_proxy = |key: &str, value: &Option<String>, imported: &Option<String>| match value {
            Some(v) => Some((format!("config key {key}"), v.clone())),
            None => imported
                .clone()
                .map(|v| (format!("homeserver.yaml key {key}"), v)),
        };

        let https_proxy = layered_proxy(
            "https_proxy",
            file_proxy("https_proxy", &file.https_proxy, &synapse.https_proxy),
            env_value("https_proxy"),
            &args.https_proxy,
        )?;
        let http_proxy = layered_proxy(
            "http_proxy",
            file_proxy("http_proxy", &file.http_proxy, &synapse.http_proxy),
            env_value("http_proxy"),
            &args.http_proxy,
        )?;

        let no_proxy = if !args.no_proxy.is_empty() {
            let mut all = NoProxy::default();
            for value in &args.no_proxy {
                all.extend(NoProxy::parse_env(value).map_err(|e| anyhow::anyhow!("--no-proxy: {e}"))?);
            }
            all
        } else if let Some(value) = env_value("no_proxy") {
            NoProxy::parse_env(&value).map_err(|e| anyhow::anyhow!("environment variable no_proxy: {e}"))?
        } else if let Some(list) = &file.no_proxy {
            NoProxy::parse_list(list.iter().map(String::as_str))
                .map_err(|e| anyhow::anyhow!("config key no_proxy: {e}"))?
        } else if let Some(list) = &synapse.no_proxy_hosts {
            NoProxy::parse_list(list.iter().map(String::as_str))
                .map_err(|e| anyhow::anyhow!("homeserver.yaml key no_proxy_hosts: {e}"))?
        } else {
            NoProxy::default()
        };

        let blacklist = match (
            &args.ip_range_blacklist[..],
            &file.ip_range_blacklist,
            &synapse.ip_range_blacklist,
        ) {
            ([], None, None) => policy::default_blacklist(),
            ([], None, Some(list)) => ip_ranges("homeserver.yaml key ip_range_blacklist", list)?,
            ([], Some(list), _) => ip_ranges("config key ip_range_blacklist", list)?,
            (flags, _, _) => ip_ranges("--ip-range-blacklist", flags)?,
        };
        let whitelist = match (
            &args.ip_range_whitelist[..],
            &file.ip_range_whitelist,
            &synapse.ip_range_whitelist,
        ) {
            ([], None, None) => Vec::new(),
            ([], None, Some(list)) => ip_ranges("homeserver.yaml key ip_range_whitelist", list)?,
            ([], Some(list), _) => ip_ranges("config key ip_range_whitelist", list)?,
            (flags, _, _) => ip_ranges("--ip-range-whitelist", flags)?,
        };

        // Targets: flags replace the file's (cgroups, units, containers and pods together).
        let (cgroups, units, containers, pod_selector) = if !args.cgroups.is_empty()
            || !args.units.is_empty()
            || !args.containers.is_empty()
            || args.pod_selector.is_some()
        {
            (
                args.cgroups.clone(),
                args.units.clone(),
                args.containers.clone(),
                args.pod_selector.clone(),
            )
        } else {
            (
                file.cgroups.clone().unwrap_or_default(),
                file.units.clone().unwrap_or_default(),
                file.containers.clone().unwrap_or_default(),
                file.pod_selector.clone(),
            )
        };
        let pods = pod_selection(pod_selector, &file, args, env)?;
        for container in &containers {
            crate::containers::validate_reference(container).context("config key containers")?;
        }
        let container_engine_socket = args
            .container_engine_socket
            .clone()
            .or_else(|| file.container_engine_socket.clone())
            .unwrap_or_else(|| PathBuf::from(crate::containers::engine::DEFAULT_SOCKET));
        let container_cgroup_parent = args
            .container_cgroup_parent
            .clone()
            .or_else(|| file.container_cgroup_parent.clone());

        let agent_mark = args.agent_mark.or(file.agent_mark).unwrap_or(DEFAULT_AGENT_MARK);
        if agent_mark == 0 {
            bail!("agent_mark 0: must be non-zero (0 would match every unmarked socket)");
        }
        let listen_port = args
            .listen_port
            .or(file.listen_port)
            .unwrap_or(DEFAULT_LISTEN_PORT);
        if listen_port == 0 {
            bail!("listen_port 0: must be a port from 1 to 65535");
        }

        let dns = dns_settings(&file, args)?;
        let policy = Policy {
            whitelist,
            blacklist,
            no_proxy,
        };
        let connect_by_ip = args.connect_by_ip || file.connect_by_ip.unwrap_or(false);
        if dns.mode == DnsMode::Synthetic {
            check_synthetic(&dns, &policy, connect_by_ip, https_proxy.is_some())?;
        }

        Ok(Self {
            dns,
            cgroups,
            units,
            containers,
            container_engine_socket,
            container_cgroup_parent,
            pods,
            https_proxy,
            http_proxy,
            policy,
            listen_port,
            agent_mark,
            timeouts: Timeouts {
                connect: seconds(
                    "connect_timeout",
                    args.connect_timeout.or(file.connect_timeout),
                    10.0,
                )?,
                handshake: seconds(
                    "handshake_timeout",
                    args.handshake_timeout.or(file.handshake_timeout),
                    15.0,
                )?,
                request_header: seconds(
                    "request_header_timeout",
                    args.request_header_timeout.or(file.request_header_timeout),
                    60.0,
                )?,
            },
            peek_timeout: seconds("peek_timeout", args.peek_timeout.or(file.peek_timeout), 0.5)?,
            connect_by_ip,
            default_route: args
                .default_route
                .or(file.default_route)
                .unwrap_or(DefaultRoute::Proxy),
            kernel_log: args.kernel_log || file.kernel_log.unwrap_or(false),
            worker_threads: args.worker_threads.or(file.worker_threads).unwrap_or(1),
            warm_upstream: match args
                .warm_upstream
                .or(file.warm_upstream)
                .unwrap_or(DEFAULT_WARM_UPSTREAM)
            {
                n if n > crate::proxy::warm::MAX_SIZE => bail!(
                    "warm_upstream {n}: at most {} idle connections per proxy",
                    crate::proxy::warm::MAX_SIZE
                ),
                n => n,
            },
            admin_addr: {
                let value = args.admin_addr.clone().or(file.admin_addr.clone());
                let value = value.as_deref().unwrap_or(DEFAULT_ADMIN_ADDR);
                value
                    .parse()
                    .map_err(|e| anyhow::anyhow!("admin_addr {value}: expected IP:PORT ({e})"))?
            },
            user: args
                .user
                .clone()
                .or(file.user.clone())
                .unwrap_or_else(|| DEFAULT_USER.to_owned()),
            proxy_ca_file: args.proxy_ca_file.clone().or(file.proxy_ca_file.clone()),
            insecure_skip_proxy_tls_verify: args.insecure_skip_proxy_tls_verify
                || file.insecure_skip_proxy_tls_verify.unwrap_or(false),
            pin_dir: args
                .pin
                .bpffs_dir
                .clone()
                .or(file.bpffs_dir.clone())
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR)),
        })
    }
}

/// The pod selection, when `pod_selector` is set: the API server from the settings, else from
/// the environment of a pod.
fn pod_selection(
    selector: Option<String>,
    file: &FileConfig,
    args: &RunArgs,
    env: &[(String, String)],
) -> Result<Option<PodSelection>> {
    let namespace = args.pod_namespace.clone().or(file.pod_namespace.clone());
    let Some(selector) = selector else {
        if namespace.is_some() {
            bail!("pod_namespace is set but pod_selector is not: set the labels of the pods to intercept");
        }
        return Ok(None);
    };
    kubernetes::validate_selector(&selector)?;
    if let Some(namespace) = &namespace {
        kubernetes::validate_namespace(namespace)?;
    }
    let env_var = |name: &str| {
        env.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    let api = args
        .kube_api
        .clone()
        .or(file.kube_api.clone())
        .or_else(|| kubernetes::in_cluster_api(&env_var))
        .context("pod_selector: no Kubernetes API server (not in a pod, and kube_api is not set)")?;
    kubernetes::parse_api(&api)?;
    Ok(Some(PodSelection {
        selector,
        namespace,
        api,
        token_file: args
            .kube_token_file
            .clone()
            .or(file.kube_token_file.clone())
            .unwrap_or_else(|| PathBuf::from(kubernetes::TOKEN_FILE)),
        ca_file: args
            .kube_ca_file
            .clone()
            .or(file.kube_ca_file.clone())
            .unwrap_or_else(|| PathBuf::from(kubernetes::CA_FILE)),
        kubepods_cgroup: args.kubepods_cgroup.clone().or(file.kubepods_cgroup.clone()),
    }))
}

fn dns_settings(file: &FileConfig, args: &RunArgs) -> Result<DnsSettings> {
    let mode = args.dns_mode.or(file.dns_mode).unwrap_or_default();
    let range = args
        .synthetic_range
        .clone()
        .or(file.synthetic_range.clone())
        .unwrap_or_else(|| crate::dns::synthetic::DEFAULT_RANGE.to_owned());
    let synthetic_range: ipnet::Ipv4Net = range.trim().parse().map_err(|e| {
        anyhow::anyhow!("synthetic_range {range}: expected an IPv4 range like 240.64.0.0/16 ({e})")
    })?;
    if synthetic_range.prefix_len() > 30 {
        bail!("synthetic_range {range}: too small (at most /30)");
    }
    let resolver = args
        .dns_resolver
        .clone()
        .or(file.dns_resolver.clone())
        .map(|value| parse_resolver(&value))
        .transpose()?;
    Ok(DnsSettings {
        mode,
        synthetic_range: synthetic_range.trunc(),
        resolver,
    })
}

/// `IP`, `IP:PORT` or `[IPv6]:PORT`; port 53 by default.
pub fn parse_resolver(value: &str) -> Result<std::net::SocketAddr> {
    let value = value.trim();
    if let Ok(ip) = value.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, 53));
    }
    value
        .parse()
        .map_err(|_| anyhow::anyhow!("dns_resolver {value}: expected IP, IP:PORT or [IPv6]:PORT"))
}

/// Synthetic addresses are made up: they must reach the agent (not denied or bypassed in the
/// kernel), and only a proxy that resolves names can take them further.
fn check_synthetic(dns: &DnsSettings, policy: &Policy, connect_by_ip: bool, https_proxy: bool) -> Result<()> {
    let range = IpNet::V4(dns.synthetic_range);
    if connect_by_ip {
        bail!(
            "connect_by_ip cannot work with dns_mode = \"synthetic\": synthetic addresses are made up, \
             and only the proxy can resolve the names behind them"
        );
    }
    if !https_proxy {
        bail!(
            "dns_mode = \"synthetic\" needs https_proxy: names behind synthetic addresses are reached through it"
        );
    }
    for net in policy.kernel_deny_nets() {
        if net.contains(&range.network()) || range.contains(&net.network()) {
            bail!(
                "synthetic_range {range} overlaps ip_range_blacklist {net}: connections to it would be refused; \
                 choose another range or whitelist it"
            );
        }
    }
    for net in policy.kernel_bypass_nets() {
        if net.contains(&range.network()) || range.contains(&net.network()) {
            bail!(
                "synthetic_range {range} overlaps no_proxy {net}: synthetic addresses cannot be reached directly"
            );
        }
    }
    Ok(())
}

/// Refuses a resolver the policy would not let the homeserver reach (loopback ones are local).
pub fn check_resolver(policy: &Policy, resolver: std::net::SocketAddr) -> Result<()> {
    let ip = resolver.ip().to_canonical();
    if ip.is_loopback() {
        return Ok(());
    }
    if let Some(rule) = policy.denied(ip) {
        bail!(
            "dns_resolver {resolver} is refused by {rule}: add it to ip_range_whitelist, or name another resolver"
        );
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))
}

/// A TOML error by position and message, without the quoted source line that toml's own text
/// carries (an unquoted proxy URL there would show its password).
fn toml_error(path: &Path, text: &str, error: &toml::de::Error) -> anyhow::Error {
    let at = error.span().map_or_else(String::new, |span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        // The key of that line, never its value.
        let key = text
            .lines()
            .nth(line - 1)
            .and_then(|l| l.split_once('='))
            .map(|(key, _)| key.trim())
            .filter(|key| {
                !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            })
            .map_or_else(String::new, |key| format!(", key {key}"));
        format!(", line {line}, column {column}{key}")
    });
    anyhow::anyhow!(
        "config file {}{at}: {}",
        path.display(),
        crate::redact::redact_credentials(error.message().trim_end())
    )
}

/// The proxy for one scheme: flag, else environment, else file (or homeserver.yaml); validated
/// with its source named.
fn layered_proxy(
    key: &str,
    file: Option<(String, String)>,
    env: Option<String>,
    flag: &Option<String>,
) -> Result<Option<ProxyUrl>> {
    let (source, value) = if let Some(v) = flag {
        (format!("--{}", key.replace('_', "-")), v.clone())
    } else if let Some(v) = env {
        (format!("environment variable {key}"), v)
    } else if let Some(sourced) = file {
        sourced
    } else {
        return Ok(None);
    };
    if value.trim().is_empty() {
        return Ok(None);
    }
    let url = ProxyUrl::parse(&value).with_context(|| format!("{source}: invalid proxy URL"))?;
    Ok(Some(url))
}

fn ip_ranges(source: &str, values: &[String]) -> Result<Vec<IpNet>> {
    values
        .iter()
        .map(|v| policy::parse_ip_range(v).map_err(|e| anyhow::anyhow!("{source}: {e}")))
        .collect()
}

fn seconds(key: &str, value: Option<f64>, default: f64) -> Result<Duration> {
    let value = value.unwrap_or(default);
    if !(value.is_finite() && value > 0.0 && value <= 3600.0) {
        bail!("{key} {value}: must be a number of seconds above 0 and at most 3600");
    }
    Ok(Duration::from_secs_f64(value))
}

#[cfg(test)]
impl Config {
    /// A configuration from TOML text alone, for tests elsewhere (the cgroup need not exist).
    pub fn from_toml(text: &str) -> Self {
        let args = RunArgs {
            cgroups: vec!["/nonexistent".into()],
            ..RunArgs::default()
        };
        Config::merge(
            toml::from_str::<FileConfig>(text).unwrap(),
            Default::default(),
            &args,
            &[],
        )
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RunArgs {
        RunArgs {
            cgroups: vec![PathBuf::from("/sys/fs/cgroup/test")],
            ..RunArgs::default()
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(toml_text: &str) -> FileConfig {
        toml::from_str(toml_text).unwrap()
    }

    fn error(file_config: FileConfig, args: &RunArgs, env: &[(String, String)]) -> String {
        format!(
            "{:#}",
            Config::merge(file_config, SynapseSettings::default(), args, env).unwrap_err()
        )
    }

    #[test]
    fn defaults() {
        let c = Config::merge(FileConfig::default(), SynapseSettings::default(), &args(), &[]).unwrap();
        assert_eq!(c.https_proxy, None);
        assert_eq!(c.http_proxy, None);
        assert_eq!(c.policy, Policy::default());
        assert_eq!(c.listen_port, DEFAULT_LISTEN_PORT);
        assert_eq!(c.agent_mark, DEFAULT_AGENT_MARK);
        assert_eq!(c.default_route, DefaultRoute::Proxy);
        assert_eq!(c.peek_timeout, Duration::from_millis(500));
        assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert!(!c.connect_by_ip);
        assert_eq!(c.worker_threads, 1);

        let file: FileConfig = toml::from_str("worker_threads = 0").unwrap();
        let c = Config::merge(file, SynapseSettings::default(), &args(), &[]).unwrap();
        assert_eq!(c.worker_threads, 0, "from the file");
        let mut flags = args();
        flags.worker_threads = Some(4);
        let file: FileConfig = toml::from_str("worker_threads = 0").unwrap();
        let c = Config::merge(file, SynapseSettings::default(), &flags, &[]).unwrap();
        assert_eq!(c.worker_threads, 4, "the flag wins");
    }

    #[test]
    fn warm_upstream_defaults_to_four_and_is_bounded() {
        let merge = |text: &str| Config::merge(file(text), SynapseSettings::default(), &args(), &[]);
        assert_eq!(merge("").unwrap().warm_upstream, DEFAULT_WARM_UPSTREAM);
        assert_eq!(
            merge("warm_upstream = 0").unwrap().warm_upstream,
            0,
            "0 turns it off"
        );
        assert_eq!(merge("warm_upstream = 64").unwrap().warm_upstream, 64);
        let err = merge("warm_upstream = 65").unwrap_err().to_string();
        assert!(
            err.contains("warm_upstream 65") && err.contains("at most 64"),
            "{err}"
        );
    }

    #[test]
    fn pod_selection_from_the_file_the_flags_and_a_pods_environment() {
        let no_targets = RunArgs::default();
        let in_pod = env(&[
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ]);
        let merge = |text: &str, args: &RunArgs, env: &[(String, String)]| {
            Config::merge(file(text), SynapseSettings::default(), args, env)
        };
        let c = merge(
            "pod_selector = \"app=synapse\"\npod_namespace = \"matrix\"",
            &no_targets,
            &in_pod,
        )
        .unwrap();
        let pods = c.pods.unwrap();
        assert_eq!(pods.selector, "app=synapse");
        assert_eq!(pods.namespace.as_deref(), Some("matrix"));
        assert_eq!(pods.api, "https://10.96.0.1:443");
        assert_eq!(pods.token_file, PathBuf::from(kubernetes::TOKEN_FILE));
        assert_eq!(pods.ca_file, PathBuf::from(kubernetes::CA_FILE));

        // Target flags replace the file's targets, pods included.
        let c = merge("pod_selector = \"app=synapse\"", &args(), &in_pod).unwrap();
        assert_eq!(c.pods, None);
        let mut flags = RunArgs {
            pod_selector: Some("tier=homeserver".into()),
            kube_api: Some("https://api.cluster.example:6443".into()),
            ..RunArgs::default()
        };
        let c = merge("pod_selector = \"app=synapse\"", &flags, &in_pod).unwrap();
        let pods = c.pods.unwrap();
        assert_eq!(
            (pods.selector.as_str(), pods.api.as_str()),
            ("tier=homeserver", "https://api.cluster.example:6443")
        );

        let cases = [
            (
                "pod_selector = \"app=synapse\"",
                &no_targets,
                vec![],
                "no Kubernetes API server",
            ),
            (
                "pod_selector = \"app=syn&apse\"",
                &no_targets,
                in_pod.clone(),
                "not a label selector",
            ),
            (
                "pod_selector = \"a=b\"\npod_namespace = \"Matrix\"",
                &no_targets,
                in_pod.clone(),
                "not a namespace name",
            ),
            (
                "pod_namespace = \"matrix\"",
                &no_targets,
                in_pod.clone(),
                "pod_selector is not",
            ),
            (
                "pod_selector = \"a=b\"\nkube_api = \"http://10.96.0.1\"",
                &no_targets,
                vec![],
                "expected https://",
            ),
        ];
        for (text, args, env, needle) in cases {
            let error = format!("{:#}", merge(text, args, &env).unwrap_err());
            assert!(error.contains(needle), "{text}: {error}");
        }
        flags.kube_api = None;
        assert!(merge("", &flags, &[]).is_err());
    }

    #[test]
    fn later_sources_win_file_then_env_then_flags() {
        let f = || file("https_proxy = \"file:1\"\nhttp_proxy = \"file:2\"\nno_proxy = [\"file.example\"]");
        let c = Config::merge(f(), SynapseSettings::default(), &args(), &[]).unwrap();
        assert_eq!(c.https_proxy.unwrap().host, "file");
        assert_eq!(c.policy.no_proxy, NoProxy::parse_list(["file.example"]).unwrap());

        let e = env(&[("HTTPS_PROXY", "env:1"), ("no_proxy", "env.example,10.0.0.0/8")]);
        let c = Config::merge(f(), SynapseSettings::default(), &args(), &e).unwrap();
        assert_eq!(c.https_proxy.unwrap().host, "env");
        assert_eq!(c.http_proxy.unwrap().host, "file");
        assert_eq!(
            c.policy.no_proxy,
            NoProxy::parse_env("env.example,10.0.0.0/8").unwrap()
        );

        let a = RunArgs {
            https_proxy: Some("flag:1".into()),
            no_proxy: vec!["flag.example".into(), "a.example,b.example".into()],
            ..args()
        };
        let c = Config::merge(f(), SynapseSettings::default(), &a, &e).unwrap();
        assert_eq!(c.https_proxy.unwrap().host, "flag");
        assert_eq!(
            c.policy.no_proxy,
            NoProxy::parse_list(["flag.example", "a.example", "b.example"]).unwrap()
        );
    }

    #[test]
    fn blacklist_replaces_default_and_whitelist_is_read() {
        let f = file(
            "ip_range_blacklist = [\"10.0.0.0/8\"]\nip_range_whitelist = [\"10.1.0.0/16\", \"10.2.3.4\"]",
        );
        let c = Config::merge(f, SynapseSettings::default(), &args(), &[]).unwrap();
        assert_eq!(c.policy.blacklist, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert_eq!(c.policy.whitelist.len(), 2);
        let a = RunArgs {
            ip_range_blacklist: vec!["192.168.0.0/16".into()],
            ..args()
        };
        let c = Config::merge(
            file("ip_range_blacklist = [\"10.0.0.0/8\"]"),
            SynapseSettings::default(),
            &a,
            &[],
        )
        .unwrap();
        assert_eq!(
            c.policy.blacklist,
            vec!["192.168.0.0/16".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn bad_values_name_the_key_and_the_value() {
        type Case = (
            FileConfig,
            RunArgs,
            Vec<(String, String)>,
            &'static [&'static str],
        );
        let cases: Vec<Case> = vec![
            (
                file("https_proxy = \"socks5://p:1080\""),
                args(),
                vec![],
                &["config key https_proxy", "socks5"],
            ),
            (
                FileConfig::default(),
                RunArgs {
                    https_proxy: Some("http://p:99999".into()),
                    ..args()
                },
                vec![],
                &["--https-proxy", "99999"],
            ),
            (
                FileConfig::default(),
                args(),
                env(&[("http_proxy", "ftp://x")]),
                &["environment variable http_proxy", "ftp"],
            ),
            (
                file("ip_range_blacklist = [\"10.0.0.0/33\"]"),
                args(),
                vec![],
                &["ip_range_blacklist", "10.0.0.0/33"],
            ),
            (
                FileConfig::default(),
                RunArgs {
                    ip_range_whitelist: vec!["nonsense".into()],
                    ..args()
                },
                vec![],
                &["--ip-range-whitelist", "nonsense"],
            ),
            (
                file("no_proxy = [\"10.0.0.0/99\"]"),
                args(),
                vec![],
                &["no_proxy", "10.0.0.0/99"],
            ),
            (file("agent_mark = 0"), args(), vec![], &["agent_mark 0"]),
            (file("listen_port = 0"), args(), vec![], &["listen_port 0"]),
            (
                file("admin_addr = \"localhost\""),
                args(),
                vec![],
                &["admin_addr localhost"],
            ),
            (file("peek_timeout = -1.0"), args(), vec![], &["peek_timeout -1"]),
            (
                FileConfig::default(),
                RunArgs {
                    connect_timeout: Some(f64::NAN),
                    ..args()
                },
                vec![],
                &["connect_timeout NaN"],
            ),
        ];
        for (f, a, e, needles) in cases {
            let message = error(f, &a, &e);
            for needle in needles {
                assert!(message.contains(needle), "`{message}` should mention `{needle}`");
            }
        }
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused() {
        let unknown = toml::from_str::<FileConfig>("https_proxy = \"p\"\nno_proxy_hosts = []").unwrap_err();
        assert!(unknown.to_string().contains("no_proxy_hosts"), "{unknown}");
        let port = toml::from_str::<FileConfig>("listen_port = 70000").unwrap_err();
        assert!(port.to_string().contains("listen_port"), "{port}");
        let route = toml::from_str::<FileConfig>("default_route = \"sideways\"").unwrap_err();
        assert!(route.to_string().contains("sideways"), "{route}");
    }

    #[test]
    fn homeserver_yaml_sits_between_defaults_and_the_file() {
        let synapse = SynapseSettings {
            https_proxy: Some("http://u:p@synapse-proxy:3128".into()),
            http_proxy: Some("synapse-http:8080".into()),
            no_proxy_hosts: Some(vec!["synapse.example".into(), "10.5.0.0/16".into()]),
            ip_range_blacklist: Some(vec!["10.0.0.0/8".into()]),
            ip_range_whitelist: Some(vec!["10.5.0.0/16".into()]),
        };
        let c = Config::merge(FileConfig::default(), synapse.clone(), &args(), &[]).unwrap();
        assert_eq!(c.https_proxy.unwrap().host, "synapse-proxy");
        assert_eq!(c.http_proxy.unwrap().port, 8080);
        assert_eq!(
            c.policy.no_proxy,
            NoProxy::parse_list(["synapse.example", "10.5.0.0/16"]).unwrap()
        );
        assert_eq!(c.policy.blacklist, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert_eq!(c.policy.whitelist, vec!["10.5.0.0/16".parse::<IpNet>().unwrap()]);

        let f = file("https_proxy = \"file:1\"\nip_range_whitelist = []");
        let c = Config::merge(f, synapse.clone(), &args(), &[]).unwrap();
        assert_eq!(c.https_proxy.unwrap().host, "file");
        assert!(c.policy.whitelist.is_empty());

        let bad = SynapseSettings {
            ip_range_blacklist: Some(vec!["not-a-range".into()]),
            ..synapse
        };
        let message = error_with(FileConfig::default(), bad, &args(), &[]);
        assert!(
            message.contains("homeserver.yaml key ip_range_blacklist") && message.contains("not-a-range"),
            "{message}"
        );
    }

    fn error_with(
        f: FileConfig,
        synapse: SynapseSettings,
        args: &RunArgs,
        env: &[(String, String)],
    ) -> String {
        format!("{:#}", Config::merge(f, synapse, args, env).unwrap_err())
    }

    #[test]
    fn empty_proxy_value_means_none() {
        let c = Config::merge(
            FileConfig::default(),
            SynapseSettings::default(),
            &args(),
            &env(&[("https_proxy", " ")]),
        )
        .unwrap();
        assert!(c.https_proxy.is_none());
    }

    /// Synthetic DNS settings: each bad combination refused with the key and the reason.
    #[test]
    fn synthetic_dns_settings_are_checked() {
        let ok = Config::merge(
            file(
                "dns_mode = \"synthetic\"\nhttps_proxy = \"http://proxy:3128\"\ndns_resolver = \"10.0.0.2\"",
            ),
            SynapseSettings::default(),
            &args(),
            &[],
        )
        .unwrap();
        assert_eq!(ok.dns.mode, DnsMode::Synthetic);
        assert_eq!(ok.dns.synthetic_range, "240.64.0.0/16".parse().unwrap());
        assert_eq!(ok.dns.resolver, Some("10.0.0.2:53".parse().unwrap()));
        assert_eq!(
            Config::merge(FileConfig::default(), SynapseSettings::default(), &args(), &[])
                .unwrap()
                .dns
                .mode,
            DnsMode::Observe
        );
        let base = "dns_mode = \"synthetic\"\nhttps_proxy = \"http://proxy:3128\"\n";
        let cases = [
            ("dns_mode = \"synthetic\"", "needs https_proxy"),
            (
                &format!("{base}connect_by_ip = true") as &str,
                "connect_by_ip cannot work",
            ),
            (
                &format!("{base}synthetic_range = \"198.18.0.0/16\""),
                "overlaps ip_range_blacklist 198.18.0.0/15",
            ),
            (
                &format!("{base}synthetic_range = \"240.64.0.0/16\"\nno_proxy = [\"240.0.0.0/4\"]"),
                "overlaps no_proxy 240.0.0.0/4",
            ),
            (
                &format!("{base}synthetic_range = \"240.64.0.0\""),
                "synthetic_range 240.64.0.0: expected an IPv4 range",
            ),
            (&format!("{base}synthetic_range = \"240.64.0.0/31\""), "too small"),
            (
                &format!("{base}dns_resolver = \"resolver.example\""),
                "dns_resolver resolver.example: expected IP",
            ),
        ];
        for (text, expected) in cases {
            let message = error(file(text), &args(), &[]);
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
}
