//! Every setting of `egress run`, declared once.
//!
//! Each field below is one setting. From its declaration come:
//! - the flag (`#[arg(long)]`; repeatable for lists) and its help (the doc comment);
//! - the TOML key (the field's name; `serde` reads the file with it);
//! - the environment variable, where there is one (`env = ...`; read as Synapse reads it, see
//!   `config::sources`);
//! - the default (`default_value`/`default_values_t`: clap shows it in `--help`, and
//!   `Settings::default()` takes it from there);
//! - the validation (the field's type parses and checks its values from any source, see
//!   `config::values`);
//! - `egress check-config`'s output and `docs/configuration.md` (`config::reference` reads the
//!   declarations back from clap).
//!
//! Rules that span settings (targets replaced together, synthetic DNS's needs, the pod
//! settings) are checked in `config::load`. The three groups shared with other commands
//! ([`Targets`], [`Engine`], [`PinDir`]) are serialized and read on their own (`config::sources`),
//! so that every value keeps the name of the source it came from.

use std::path::PathBuf;

use clap::{Args, FromArgMatches};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{
    proxy_route::ProxyRoute,
    proxy_url::ProxySetting,
    values::{
        AtMost, ContainerRef, KubeApi, LabelSelector, ListenAddr, Mark, NamespaceName, Port, ProxyMatch,
        Resolver, Seconds, SyntheticRange,
    },
};
use crate::route::{
    plan::{DefaultRoute, Proxies, Rules},
    policy::{self, NoProxy, NoProxyEntry, Policy},
};

/// The largest warm pool the configuration may ask for, per proxy.
pub const MAX_WARM_UPSTREAM: usize = 64;

/// The settings of `egress run` (also read by `check-config`, `explain` and `doctor`).
#[derive(Args, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    #[command(flatten)]
    #[serde(skip)]
    pub targets: Targets,
    #[command(flatten)]
    #[serde(skip)]
    pub engine: Engine,
    /// The cgroup the engine puts containers under (e.g. /sys/fs/cgroup/system.slice): with it,
    /// egress can start before the engine (at boot). Without it, it is asked of the engine.
    #[arg(long, value_name = "PATH", help_heading = "What is intercepted")]
    pub container_cgroup_parent: Option<PathBuf>,
    /// Kubernetes pods to intercept, by label selector as `kubectl get pods -l` takes it (e.g.
    /// app.kubernetes.io/name=synapse); their labels are asked of the API server.
    #[arg(long, value_name = "SELECTOR", help_heading = "What is intercepted")]
    pub pod_selector: Option<LabelSelector>,
    /// Only pods of this namespace (default: pods of all namespaces).
    #[arg(long, value_name = "NAMESPACE", help_heading = "What is intercepted")]
    pub pod_namespace: Option<NamespaceName>,
    /// kubelet's cgroup for pods (default: kubepods.slice, else kubepods, under the cgroup2
    /// root).
    #[arg(long, value_name = "PATH", help_heading = "What is intercepted")]
    pub kubepods_cgroup: Option<PathBuf>,
    /// The Kubernetes API server, https://HOST[:PORT] (default, in a pod:
    /// $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT).
    #[arg(long, value_name = "URL", help_heading = "What is intercepted")]
    pub kube_api: Option<KubeApi>,
    /// Bearer token for the API server, read afresh for every request.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token",
        help_heading = "What is intercepted"
    )]
    pub kube_token_file: PathBuf,
    /// CA certificates (PEM) of the API server.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        help_heading = "What is intercepted"
    )]
    pub kube_ca_file: PathBuf,

    /// Proxy for TLS (and unrecognised) connections, `[http://][user:pass@]host[:port]` (port
    /// 1080 by default), as Synapse parses it; or several, space-separated (a list in TOML),
    /// tried in order: one that cannot be reached is passed over until it answers again. Blank:
    /// none.
    #[arg(
        long,
        value_name = "URL",
        env = "https_proxy",
        default_value = "",
        hide_default_value = true,
        help_heading = "Upstream proxies"
    )]
    pub https_proxy: ProxySetting,
    /// Proxy for plain HTTP requests, forwarded in absolute form (several: as https_proxy).
    /// Without one, plain HTTP goes direct (the blacklist still applies), as in Synapse.
    #[arg(
        long,
        value_name = "URL",
        env = "http_proxy",
        default_value = "",
        hide_default_value = true,
        help_heading = "Upstream proxies"
    )]
    pub http_proxy: ProxySetting,
    /// Per-destination proxies: `DESTINATIONS -> PROXIES` (tried in order) or `DESTINATIONS ->
    /// direct`, destinations written as no_proxy entries, e.g. `partner.example 10.20.0.0/16 ->
    /// http://partner-proxy:8080`; repeatable, the first match wins, after the blacklist and
    /// no_proxy; at most 64.
    #[arg(long = "proxy-route", value_name = "ROUTE", help_heading = "Upstream proxies")]
    pub proxy_routes: Vec<ProxyRoute>,
    /// Kerberos (Negotiate) to proxies whose URL has no user and password: the keytab of egress's
    /// principal (readable by the agent's user). egress gets and renews its tickets itself.
    #[arg(long, value_name = "PATH", help_heading = "Upstream proxies")]
    pub kerberos_keytab: Option<PathBuf>,
    /// Kerberos (Negotiate) with a ticket cache another program keeps fresh (e.g.
    /// FILE:/run/egress/krb5cc, renewed by k5start), instead of a keytab.
    #[arg(long, value_name = "CCACHE", help_heading = "Upstream proxies")]
    pub kerberos_ccache: Option<String>,
    /// CA certificates (PEM) to verify https:// proxies with, instead of the system roots.
    #[arg(long, value_name = "PATH", help_heading = "Upstream proxies")]
    pub proxy_ca_file: Option<PathBuf>,
    /// TESTING ONLY: do not verify the certificate of an https:// proxy (like Synapse's
    /// use_insecure_ssl_client_just_for_testing_do_not_use).
    #[arg(long, help_heading = "Upstream proxies")]
    pub insecure_skip_proxy_tls_verify: bool,
    /// Idle connections kept ready (TCP, and TLS for https://) to each upstream proxy, so new
    /// tunnels skip those handshakes; 0 turns it off; at most 64.
    #[arg(
        long,
        value_name = "N",
        default_value = "4",
        help_heading = "Upstream proxies"
    )]
    pub warm_upstream: AtMost<MAX_WARM_UPSTREAM>,
    /// Proxies whose answer to CONNECT egress waits for before it sends the client's first
    /// bytes: `host` or `host:port` as in the proxy's URL, or `*` for all; repeatable. To the
    /// others, once one has answered a CONNECT with 200, egress sends the next CONNECT and the
    /// client's TLS ClientHello in one write, a round trip less; any answer but 200 then resets
    /// the client. Name here a proxy that drops bytes sent ahead of its answer.
    #[arg(long, value_name = "PROXY", help_heading = "Upstream proxies")]
    pub no_optimistic_connect: Vec<ProxyMatch>,
    /// Seconds allowed for the TCP connect (and TLS handshake) to the proxy, or a direct
    /// connect.
    #[arg(
        long,
        value_name = "SECS",
        default_value = "10",
        help_heading = "Upstream proxies"
    )]
    pub connect_timeout: Seconds,
    /// Seconds allowed for the proxy's answer to CONNECT.
    #[arg(
        long,
        value_name = "SECS",
        default_value = "15",
        help_heading = "Upstream proxies"
    )]
    pub handshake_timeout: Seconds,

    /// Destinations that bypass the proxy: `*`, host names (suffix match), IPs, CIDR ranges,
    /// `host:port`; repeatable or comma-separated.
    #[arg(
        long,
        value_name = "ENTRY",
        env = "no_proxy",
        value_delimiter = ',',
        value_parser = policy::no_proxy_arg,
        help_heading = "Policy"
    )]
    pub no_proxy: Vec<NoProxyEntry>,
    /// Destinations refused outright (connect fails with EPERM); repeatable. Replaces the default
    /// list: Synapse's private and reserved ranges, with the IPv6 forms that embed IPv4.
    #[arg(
        long,
        value_name = "CIDR",
        value_parser = policy::ip_range_arg,
        default_values_t = policy::default_blacklist(),
        hide_default_value = true,
        help_heading = "Policy"
    )]
    #[serde(with = "policy::ip_ranges")]
    pub ip_range_blacklist: Vec<IpNet>,
    /// Exceptions to the blacklist; repeatable.
    #[arg(long, value_name = "CIDR", value_parser = policy::ip_range_arg, help_heading = "Policy")]
    #[serde(with = "policy::ip_ranges")]
    pub ip_range_whitelist: Vec<IpNet>,

    /// Route for connections that send neither TLS nor HTTP within the peek window.
    #[arg(
        long,
        value_enum,
        value_name = "ROUTE",
        default_value = "proxy",
        help_heading = "Routing"
    )]
    pub default_route: DefaultRoute,
    /// CONNECT to the vetted IP address even when SNI/Host names the destination (DNS-rebinding
    /// safety over proxy-side domain ACLs).
    #[arg(long, help_heading = "Routing")]
    pub connect_by_ip: bool,
    /// Seconds to wait for the client's first bytes (TLS ClientHello or HTTP request head).
    #[arg(long, value_name = "SECS", default_value = "0.5", help_heading = "Routing")]
    pub peek_timeout: Seconds,
    /// Seconds a forwarded plain-HTTP client may take to send a request head, and may keep its
    /// connection idle between requests.
    #[arg(long, value_name = "SECS", default_value = "60", help_heading = "Routing")]
    pub request_header_timeout: Seconds,

    /// What egress does with the intercepted processes' DNS: `observe` it to learn the names
    /// behind addresses, or answer it with `synthetic` addresses (hosts without external DNS).
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        default_value = "observe",
        help_heading = "DNS"
    )]
    pub dns_mode: DnsMode,
    /// Synthetic DNS: the IPv4 range its addresses come from (at most /30).
    #[arg(
        long,
        value_name = "CIDR",
        default_value = "240.64.0.0/16",
        help_heading = "DNS"
    )]
    pub synthetic_range: SyntheticRange,
    /// Synthetic DNS: the internal resolver (IP or IP:PORT) for no_proxy names, SRV and every
    /// other query (default: the first nameserver of /etc/resolv.conf).
    #[arg(long, value_name = "IP[:PORT]", help_heading = "DNS")]
    pub dns_resolver: Option<Resolver>,

    /// Port of the agent's listeners on 127.0.0.1 and [::1]; keep it below 1024, where no
    /// unprivileged process can listen.
    #[arg(long, value_name = "PORT", default_value = "1001", help_heading = "Agent")]
    pub listen_port: Port,
    /// Socket mark on the agent's own connections, never intercepted; non-zero.
    #[arg(
        long,
        value_name = "MARK",
        default_value = "0x65677273",
        help_heading = "Agent"
    )]
    pub agent_mark: Mark,
    #[command(flatten)]
    #[serde(skip)]
    pub pins: PinDir,
    /// Address of the admin listener serving /health, /metrics and /dns.
    #[arg(
        long,
        value_name = "IP:PORT",
        default_value = "127.0.0.1:9478",
        help_heading = "Agent"
    )]
    pub admin_addr: ListenAddr,
    /// User to become once the programs are attached (keeping CAP_NET_ADMIN only).
    #[arg(long, value_name = "USER", default_value = "nobody", help_heading = "Agent")]
    pub user: String,
    /// Threads serving connections: 1 (one event loop: the lowest latency and memory; a core
    /// relays well over 1 GiB/s), N, or 0 for one per CPU.
    #[arg(long, value_name = "N", default_value = "1", help_heading = "Agent")]
    pub worker_threads: usize,
    /// Emit the kernel programs' debug records (aya-log) into the agent's log.
    #[arg(long, help_heading = "Agent")]
    pub kernel_log: bool,

    /// Synapse's homeserver.yaml, to import its http_proxy, https_proxy, no_proxy_hosts,
    /// ip_range_blacklist and ip_range_whitelist from (every other source overrides them).
    #[arg(long, value_name = "PATH", help_heading = "Sources")]
    pub homeserver_config: Option<PathBuf>,
}

/// The cgroups, units and containers intercepted (also `egress attach`'s).
#[derive(Args, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Targets {
    /// cgroup (v2) directory whose processes are intercepted; repeatable.
    #[arg(long = "cgroup", value_name = "PATH", help_heading = "What is intercepted")]
    pub cgroups: Vec<PathBuf>,
    /// systemd unit whose cgroup is intercepted (e.g. matrix-synapse.service); repeatable.
    /// Resolved on hybrid and pure cgroup v2 hosts; the unit must be running.
    #[arg(long = "unit", value_name = "UNIT", help_heading = "What is intercepted")]
    pub units: Vec<String>,
    /// Docker or Podman container (name, or 12 or more digits of its id) whose connections are
    /// intercepted, followed across restarts and recreation under the same name; repeatable.
    #[arg(
        long = "container",
        value_name = "NAME|ID",
        help_heading = "What is intercepted"
    )]
    pub containers: Vec<ContainerRef>,
}

/// The container engine's API (also `egress attach`'s).
#[derive(Args, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Engine {
    /// The container engine's API socket (Podman: /run/podman/podman.sock).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/run/docker.sock",
        help_heading = "What is intercepted"
    )]
    pub container_engine_socket: PathBuf,
}

/// Where the programs and maps are pinned (also `attach`, `detach` and `status`'s).
#[derive(Args, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PinDir {
    /// bpffs directory for the pinned programs, links and maps.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/sys/fs/bpf/egress",
        help_heading = "Agent"
    )]
    pub bpffs_dir: PathBuf,
}

/// What egress does with the intercepted processes' DNS (see `dns`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DnsMode {
    /// Read their answers, to learn the names behind addresses; change nothing.
    #[default]
    Observe,
    /// Answer their queries: names outside no_proxy get addresses from `synthetic_range`, which
    /// egress CONNECTs by name; the rest goes to `dns_resolver`.
    Synthetic,
}

/// A group's declared defaults, as clap knows them (no command line, no environment).
pub fn declared_defaults<T: Args + FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults")).mut_args(|arg| arg.env(None));
    let matches = command
        .try_get_matches_from(["defaults"])
        .expect("the declared defaults parse");
    T::from_arg_matches(&matches).expect("the declared defaults fit their fields")
}

impl Default for Settings {
    fn default() -> Self {
        declared_defaults()
    }
}

impl Default for Engine {
    fn default() -> Self {
        declared_defaults()
    }
}

impl Default for PinDir {
    fn default() -> Self {
        declared_defaults()
    }
}

impl Settings {
    /// The routing policy these settings make.
    pub fn policy(&self) -> Policy {
        Policy {
            whitelist: self.ip_range_whitelist.clone(),
            blacklist: self.ip_range_blacklist.clone(),
            no_proxy: NoProxy::new(self.no_proxy.clone()),
        }
    }

    /// The settings the routing plan follows, with `policy` (made by [`Self::policy`]).
    pub fn rules<'a>(&self, policy: &'a Policy) -> Rules<'a> {
        Rules {
            policy,
            default_route: self.default_route,
            connect_by_ip: self.connect_by_ip,
        }
    }

    /// The configured proxy URLs, as a routing plan chooses from them.
    pub fn proxy_urls(&self) -> Proxies<'_, ProxySetting> {
        Proxies {
            https: (!self.https_proxy.is_empty()).then_some(&self.https_proxy),
            http: (!self.http_proxy.is_empty()).then_some(&self.http_proxy),
            routes: &self.proxy_routes,
        }
    }

    /// The names synthetic DNS answers with real addresses: no_proxy's, and those routed direct
    /// (both go direct, so they need the real address).
    pub fn direct_names(&self) -> NoProxy {
        let mut names = NoProxy::new(self.no_proxy.clone());
        for route in &self.proxy_routes {
            if route.via == crate::route::plan::Via::Direct {
                names.extend(route.destinations.clone());
            }
        }
        names
    }

    /// Whether proxies without a user and password get Kerberos (Negotiate).
    pub fn kerberos(&self) -> bool {
        self.kerberos_keytab.is_some() || self.kerberos_ccache.is_some()
    }

    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: self.connect_timeout.get(),
            handshake: self.handshake_timeout.get(),
        }
    }

    pub fn synthetic_dns(&self) -> bool {
        self.dns_mode == DnsMode::Synthetic
    }
}

/// Time limits on reaching the destination.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// TCP connect (and TLS handshake) to the proxy, or a direct connect.
    pub connect: std::time::Duration,
    /// From sending CONNECT to the end of the proxy's answer head.
    pub handshake: std::time::Duration,
}
