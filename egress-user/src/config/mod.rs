//! The configuration: every setting declared once ([`settings`]), read from five sources,
//! later wins: the declared defaults → Synapse's homeserver.yaml (if given) → the TOML file →
//! the environment (`https_proxy`, `http_proxy`, `no_proxy`, read as Synapse reads them) → the
//! command line. figment layers the sources ([`sources`]) and keeps where each value came from,
//! so a bad value is refused naming its source, its setting and why; the daemon never runs
//! half-configured.

pub mod homeserver;
pub mod proxy_route;
pub mod proxy_url;
pub mod reference;
pub mod settings;
pub mod sources;
pub mod values;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use figment::Figment;

use crate::route::policy::Policy;
pub use settings::{Settings, Timeouts};
use values::KubeApi;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/egress/egress.toml";

/// The command line of `egress run` (and of `check-config`, `explain` and `doctor`): the config
/// file and the settings.
#[derive(Args, Debug, Default, Clone)]
pub struct RunArgs {
    /// TOML config file (default: /etc/egress/egress.toml, if it exists).
    #[arg(long, value_name = "FILE", help_heading = "Sources")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
    /// The settings given on the command line, by key; the others hold clap's defaults.
    #[arg(skip)]
    pub given: Vec<String>,
}

#[cfg(test)]
impl RunArgs {
    /// From an argument list (the program name first), as `egress run` would read it.
    pub fn parse_from<I: IntoIterator<Item = T>, T: Into<std::ffi::OsString> + Clone>(
        argv: I,
    ) -> Result<Self> {
        use clap::FromArgMatches;
        let matches = sources::command()
            .try_get_matches_from(argv)
            .map_err(|e| anyhow::anyhow!("{}", e.render()))?;
        let mut args = Self::from_arg_matches(&matches)?;
        args.given = sources::given_on_command_line(&matches);
        Ok(args)
    }
}

impl clap::CommandFactory for RunArgs {
    fn command() -> clap::Command {
        Self::augment_args(clap::Command::new("egress"))
    }

    fn command_for_update() -> clap::Command {
        Self::augment_args_for_update(clap::Command::new("egress"))
    }
}

/// The effective settings for `egress run` from every source: layered, each value checked by its
/// type, then the rules that span settings. Units are not resolved here (see
/// `workloads::cgroups::resolve_units`).
pub fn load(args: &RunArgs, env: &[(String, String)]) -> Result<Settings> {
    let file_path = match &args.config {
        Some(path) => Some(path.clone()),
        None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
    };
    let file = file_path.as_deref().map(read_file).transpose()?;
    let homeserver_path = if args.given.iter().any(|g| g == "homeserver_config") {
        args.settings.homeserver_config.clone()
    } else {
        file.as_ref()
            .and_then(|table| table.get("homeserver_config"))
            .and_then(|value| value.as_str())
            .map(PathBuf::from)
    };

    let mut figment = Figment::new().merge(sources::defaults());
    if let Some(path) = &homeserver_path {
        let synapse = homeserver::read_homeserver_config(path)?;
        figment = figment.merge(sources::homeserver(path, synapse));
    }
    if let (Some(path), Some(table)) = (&file_path, file) {
        figment = figment.merge(sources::file(path, table)?);
    }
    figment = figment.merge(sources::environment(env));
    figment = figment.merge(sources::command_line(&args.settings, &args.given)?);
    let mut settings = sources::extract(&figment)?;

    // What is intercepted comes from one source: targets on the command line replace the
    // file's, all of them (cgroups, units, containers, pods) together.
    const TARGETS: [&str; 4] = ["cgroups", "units", "containers", "pod_selector"];
    if args.given.iter().any(|g| TARGETS.contains(&g.as_str())) {
        settings.targets = args.settings.targets.clone();
        settings.pod_selector = args.settings.pod_selector.clone();
    }
    check(&mut settings, env)?;
    Ok(settings)
}

/// The rules that span settings; fills in what comes from elsewhere (the in-cluster API
/// server).
fn check(settings: &mut Settings, env: &[(String, String)]) -> Result<()> {
    match &settings.pod_selector {
        None if settings.pod_namespace.is_some() => {
            bail!("pod_namespace is set but pod_selector is not: set the labels of the pods to intercept")
        }
        None => {}
        Some(_) if settings.kube_api.is_some() => {}
        Some(_) => {
            let var = |name: &str| {
                env.iter()
                    .find(|(key, _)| key == name)
                    .map(|(_, value)| value.clone())
            };
            let api = KubeApi::in_cluster(&var)
                .context("pod_selector: no Kubernetes API server (not in a pod, and kube_api is not set)")?
                .map_err(|e| anyhow::anyhow!("environment variables KUBERNETES_SERVICE_HOST/PORT: {e}"))?;
            settings.kube_api = Some(api);
        }
    }
    if settings.synthetic_dns() {
        check_synthetic(settings)?;
    }
    check_proxies(settings)?;
    Ok(())
}

/// Routes are bounded; Kerberos has one source of credentials and needs proxies named by host
/// name (their service principal is `HTTP/<name>`).
fn check_proxies(settings: &Settings) -> Result<()> {
    if settings.proxy_routes.len() > proxy_route::MAX_ROUTES {
        bail!(
            "proxy_routes: {} routes, at most {}",
            settings.proxy_routes.len(),
            proxy_route::MAX_ROUTES
        );
    }
    if settings.kerberos_keytab.is_some() && settings.kerberos_ccache.is_some() {
        bail!("kerberos_keytab and kerberos_ccache are both set: give egress one of them");
    }
    if settings.kerberos() {
        let routes = settings.proxy_routes.iter().filter_map(|r| match &r.via {
            crate::route::plan::Via::Proxies(list) => Some(list),
            crate::route::plan::Via::Direct => None,
        });
        let lists = [&settings.https_proxy, &settings.http_proxy]
            .into_iter()
            .chain(routes);
        for url in lists.flat_map(|list| list.urls()) {
            if !url.has_credentials() && url.host.parse::<std::net::IpAddr>().is_ok() {
                bail!(
                    "proxy {url}: Kerberos (kerberos_keytab/kerberos_ccache) needs the proxy's host name, \
                     as in its service principal HTTP/<name>, not an address"
                );
            }
        }
    }
    Ok(())
}

/// Synthetic addresses are made up: they must reach the agent (not denied or bypassed in the
/// kernel), and only a proxy that resolves names can take them further.
fn check_synthetic(settings: &Settings) -> Result<()> {
    let range = ipnet::IpNet::V4(settings.synthetic_range.0);
    if settings.connect_by_ip {
        bail!(
            "connect_by_ip cannot work with dns_mode = \"synthetic\": synthetic addresses are made up, \
             and only the proxy can resolve the names behind them"
        );
    }
    if settings.https_proxy.url().is_none() {
        bail!(
            "dns_mode = \"synthetic\" needs https_proxy: names behind synthetic addresses are reached through it"
        );
    }
    let policy = settings.policy();
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

/// Synthetic DNS: the internal resolver, configured or /etc/resolv.conf's first, checked against
/// the policy. At start and on every reload (the policy may have changed).
pub fn dns_resolver(settings: &Settings) -> Result<SocketAddr> {
    let resolver = match settings.dns_resolver {
        Some(resolver) => resolver.0,
        None => system_resolver()?,
    };
    check_resolver(&settings.policy(), resolver)?;
    Ok(resolver)
}

/// The first nameserver of /etc/resolv.conf.
fn system_resolver() -> Result<SocketAddr> {
    let (config, _) = hickory_resolver::system_conf::read_system_conf().map_err(|e| {
        anyhow::anyhow!(
            "dns_mode = \"synthetic\": reading /etc/resolv.conf for the internal resolver: {e}; set dns_resolver"
        )
    })?;
    config
        .name_servers()
        .first()
        .map(|ns| ns.socket_addr)
        .context("dns_mode = \"synthetic\": /etc/resolv.conf names no nameserver; set dns_resolver")
}

/// Refuses a resolver the policy would not let the homeserver reach (loopback ones are local).
pub fn check_resolver(policy: &Policy, resolver: SocketAddr) -> Result<()> {
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

/// The TOML file, with every key checked against the declared settings.
fn read_file(path: &Path) -> Result<toml::Table> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
    let keys = sources::keys();
    for key in table.keys() {
        if key == "config" || !keys.iter().any(|k| k == key) {
            bail!(
                "config file {}: unknown key {key} (the keys are listed in docs/configuration.md)",
                path.display()
            );
        }
    }
    Ok(table)
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

#[cfg(test)]
impl Settings {
    /// Settings from TOML text alone, for tests elsewhere.
    pub fn from_toml(text: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "egress-settings-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("egress.toml");
        std::fs::write(&path, text).unwrap();
        let args = RunArgs {
            config: Some(path),
            ..RunArgs::default()
        };
        let settings = load(&args, &[]).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        settings
    }
}

#[cfg(test)]
mod tests;
