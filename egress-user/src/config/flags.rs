//! The command-line source of the configuration: the flags of `egress run` (shared by
//! `check-config`, `explain` and `doctor`). Each overrides the config file and the environment.

use std::path::PathBuf;

use clap::Args;

use crate::route::plan::DefaultRoute;

/// Flags of `egress run`. Each overrides the config file and the environment.
#[derive(Args, Debug, Default, Clone)]
pub struct RunArgs {
    /// TOML config file [default: /etc/egress/egress.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// cgroup (v2) directory whose processes are intercepted; repeatable.
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<PathBuf>,
    /// systemd unit whose cgroup is intercepted (e.g. matrix-synapse.service); repeatable.
    /// Resolved on hybrid and pure cgroup v2 hosts; the unit must be running.
    #[arg(long = "unit", value_name = "UNIT")]
    pub units: Vec<String>,
    /// Docker or Podman container (name or id) whose connections are intercepted, followed
    /// across restarts and recreation under the same name; repeatable.
    #[arg(long = "container", value_name = "NAME|ID")]
    pub containers: Vec<String>,
    /// The container engine's API socket [default: /var/run/docker.sock; Podman:
    /// /run/podman/podman.sock].
    #[arg(long, value_name = "PATH")]
    pub container_engine_socket: Option<PathBuf>,
    /// The cgroup the engine puts containers under (e.g. /sys/fs/cgroup/system.slice): with it,
    /// egress can start before the engine (at boot) [default: asked of the engine].
    #[arg(long, value_name = "PATH")]
    pub container_cgroup_parent: Option<PathBuf>,
    /// Kubernetes pods to intercept, by label selector as `kubectl get pods -l` takes it (e.g.
    /// app.kubernetes.io/name=synapse); their labels are asked of the API server.
    #[arg(long, value_name = "SELECTOR")]
    pub pod_selector: Option<String>,
    /// Only pods of this namespace [default: all namespaces].
    #[arg(long, value_name = "NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// kubelet's cgroup for pods [default: kubepods.slice, else kubepods, under the cgroup2
    /// root].
    #[arg(long, value_name = "PATH")]
    pub kubepods_cgroup: Option<PathBuf>,
    /// The Kubernetes API server, https://HOST[:PORT] [default: in a pod,
    /// $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT].
    #[arg(long, value_name = "URL")]
    pub kube_api: Option<String>,
    /// Bearer token for the API server [default: the pod's service account token].
    #[arg(long, value_name = "PATH")]
    pub kube_token_file: Option<PathBuf>,
    /// CA certificates (PEM) of the API server [default: the pod's service account CA].
    #[arg(long, value_name = "PATH")]
    pub kube_ca_file: Option<PathBuf>,
    /// Import http_proxy, https_proxy, no_proxy_hosts, ip_range_blacklist and
    /// ip_range_whitelist from Synapse's homeserver.yaml (overridden by everything else).
    #[arg(long, value_name = "PATH")]
    pub homeserver_config: Option<PathBuf>,
    /// Proxy for TLS (and unrecognised) connections, `[http://][user:pass@]host[:port]`
    /// (port 1080 by default). Default: $https_proxy / $HTTPS_PROXY.
    #[arg(long, value_name = "URL")]
    pub https_proxy: Option<String>,
    /// Proxy for plain HTTP requests, forwarded in absolute form. Default: $http_proxy.
    /// Without one, plain HTTP goes direct (blacklist still applies), as in Synapse.
    #[arg(long, value_name = "URL")]
    pub http_proxy: Option<String>,
    /// Destinations that bypass the proxy: `*`, host names (suffix match), IPs, CIDR ranges,
    /// `host:port`; repeatable or comma-separated. Default: $no_proxy.
    #[arg(long, value_name = "ENTRY")]
    pub no_proxy: Vec<String>,
    /// Destinations refused outright (connect fails with EPERM); repeatable. Replaces the
    /// default list (Synapse's private and reserved ranges).
    #[arg(long, value_name = "CIDR")]
    pub ip_range_blacklist: Vec<String>,
    /// Exceptions to the blacklist; repeatable.
    #[arg(long, value_name = "CIDR")]
    pub ip_range_whitelist: Vec<String>,
    /// Port of the agent's listeners on 127.0.0.1 and [::1]; keep it below 1024 [default: 1001].
    #[arg(long, value_name = "PORT")]
    pub listen_port: Option<u16>,
    /// Socket mark on the agent's own connections, never intercepted; non-zero
    /// [default: 0x65677273].
    #[arg(long, value_name = "MARK", value_parser = parse_u32)]
    pub agent_mark: Option<u32>,
    /// Seconds allowed for the TCP connect to the upstream [default: 10].
    #[arg(long, value_name = "SECS")]
    pub connect_timeout: Option<f64>,
    /// Seconds allowed for the proxy's answer to CONNECT [default: 15].
    #[arg(long, value_name = "SECS")]
    pub handshake_timeout: Option<f64>,
    /// Seconds a forwarded plain-HTTP client may take to send a request head, and may keep its
    /// connection idle between requests [default: 60].
    #[arg(long, value_name = "SECS")]
    pub request_header_timeout: Option<f64>,
    /// Seconds to wait for the client's first bytes (TLS ClientHello or HTTP request head)
    /// [default: 0.5].
    #[arg(long, value_name = "SECS")]
    pub peek_timeout: Option<f64>,
    /// CONNECT to the vetted IP address even when SNI/Host names the destination (DNS-rebinding
    /// safety over proxy-side domain ACLs).
    #[arg(long)]
    pub connect_by_ip: bool,
    /// Route for connections that send neither TLS nor HTTP within the peek window
    /// [default: proxy].
    #[arg(long, value_enum, value_name = "ROUTE")]
    pub default_route: Option<DefaultRoute>,
    /// What egress does with the intercepted processes' DNS: `observe` it to learn the names
    /// behind addresses, or answer it with `synthetic` addresses (hosts without external DNS)
    /// [default: observe].
    #[arg(long, value_enum, value_name = "MODE")]
    pub dns_mode: Option<crate::config::DnsMode>,
    /// Synthetic DNS: the IPv4 range its addresses come from [default: 240.64.0.0/16].
    #[arg(long, value_name = "CIDR")]
    pub synthetic_range: Option<String>,
    /// Synthetic DNS: the internal resolver (IP or IP:PORT) for no_proxy names, SRV and every
    /// other query [default: the first nameserver of /etc/resolv.conf].
    #[arg(long, value_name = "IP[:PORT]")]
    pub dns_resolver: Option<String>,
    /// CA certificates (PEM) to verify https:// proxies with, instead of the system roots.
    #[arg(long, value_name = "PATH")]
    pub proxy_ca_file: Option<PathBuf>,
    /// TESTING ONLY: do not verify the certificate of an https:// proxy (like Synapse's
    /// use_insecure_ssl_client_just_for_testing_do_not_use).
    #[arg(long)]
    pub insecure_skip_proxy_tls_verify: bool,
    /// Emit the kernel programs' debug records (aya-log) into the agent's log.
    #[arg(long)]
    pub kernel_log: bool,
    /// Address of the admin listener serving /health and /metrics [default: 127.0.0.1:9478].
    #[arg(long, value_name = "IP:PORT")]
    pub admin_addr: Option<String>,
    /// Threads serving connections: 1 (one event loop: the lowest latency and memory; a core
    /// relays well over 1 GiB/s), N, or 0 for one per CPU [default: 1].
    #[arg(long, value_name = "N")]
    pub worker_threads: Option<usize>,
    /// Idle connections kept ready (TCP, and TLS for https://) to each upstream proxy, so new
    /// tunnels skip those handshakes; 0 turns it off [default: 4].
    #[arg(long, value_name = "N")]
    pub warm_upstream: Option<usize>,
    /// User to become once the programs are attached (keeping CAP_NET_ADMIN only)
    /// [default: nobody].
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    #[command(flatten)]
    pub pin: OptionalPinDir,
}

#[derive(Args, Debug, Default, Clone)]
pub struct OptionalPinDir {
    /// bpffs directory for the pinned programs and maps [default: /sys/fs/bpf/egress].
    #[arg(long, value_name = "DIR")]
    pub bpffs_dir: Option<PathBuf>,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("'{s}': {e}"))
}
