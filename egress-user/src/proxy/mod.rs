//! The data path, in the order a connection takes it:
//!
//! 1. [`accept`]: take a connection the kernel redirected, look up where it was going;
//! 2. [`sniff`]: learn the name it asks for from its first bytes (TLS SNI, HTTP Host);
//! 3. [`crate::route::plan`]: decide (deny, direct, CONNECT, forward);
//! 4. [`upstream`] (with [`tls`] for `https://` proxies): reach the destination directly or
//!    through the proxy, or [`forward`] plain HTTP requests through it;
//! 5. [`relay`] (with [`splice`]): move the bytes both ways until both sides are done;
//! 6. [`decision`]: one log line and the metrics for the connection, however it ended.

pub mod accept;
pub mod decision;
pub mod forward;
pub mod relay;
pub mod sniff;
pub mod splice;
pub mod tls;
pub mod upstream;
pub mod warm;

use std::sync::{Arc, RwLock, atomic::AtomicU64};

use anyhow::Result;

use crate::{
    config::{Config, proxy_url::ProxyScheme},
    dns,
    kernel::Kernel,
    metrics::Metrics,
    netns::Namespaces,
    route::plan::Proxies,
};
use tls::ProxyTls;
use upstream::ProxyClient;

/// One consistent configuration and the proxy clients built from it. Each connection takes a
/// snapshot at accept and keeps it to its end, so a reload never changes a decision halfway.
pub struct Current {
    pub config: Config,
    https_proxy: Option<ProxyClient>,
    http_proxy: Option<ProxyClient>,
}

impl Current {
    pub fn new(config: Config) -> Result<Self> {
        let client = |url: &Option<crate::config::proxy_url::ProxyUrl>| -> Result<Option<ProxyClient>> {
            let Some(url) = url else { return Ok(None) };
            let tls = match url.scheme {
                ProxyScheme::Https => Some(ProxyTls::new(
                    config.proxy_ca_file.as_deref(),
                    config.insecure_skip_proxy_tls_verify,
                )?),
                ProxyScheme::Http => None,
            };
            Ok(Some(
                ProxyClient::new(url.clone(), tls, config.agent_mark, config.timeouts)
                    .with_warm_pool(config.warm_upstream),
            ))
        };
        let https_proxy = client(&config.https_proxy)?;
        // One proxy for both: one client, so one pool of ready connections.
        let http_proxy = match (&https_proxy, &config.http_proxy) {
            (Some(https), Some(url)) if https.url == *url => Some(https.clone()),
            _ => client(&config.http_proxy)?,
        };
        Ok(Self {
            https_proxy,
            http_proxy,
            config,
        })
    }

    /// The proxy clients, as the routing plan chooses from them.
    pub fn proxies(&self) -> Proxies<'_, ProxyClient> {
        Proxies {
            https: self.https_proxy.as_ref(),
            http: self.http_proxy.as_ref(),
        }
    }
}

/// What the data path shares across connections: the kernel's maps, the metrics, and the
/// configuration in force.
pub struct Shared {
    pub kernel: Kernel,
    /// The other network namespaces served (none without the namespace helper).
    pub namespaces: Option<Namespaces>,
    /// The names behind the addresses the intercepted processes resolved.
    pub dns: Arc<dns::Watch>,
    /// Synthetic DNS, when configured.
    pub synthetic: Option<dns::server::Synthesizer>,
    pub metrics: Arc<Metrics>,
    pub(crate) next_id: AtomicU64,
    current: RwLock<Arc<Current>>,
}

impl Shared {
    pub fn new(kernel: Kernel, namespaces: Option<Namespaces>, current: Current) -> Self {
        let dns = Arc::new(dns::Watch::new(kernel.take_dns_events(), kernel.own_netns()));
        let settings = &current.config.dns;
        let synthetic = match (settings.mode, settings.resolver) {
            (crate::config::DnsMode::Synthetic, Some(resolver)) => Some(dns::server::Synthesizer::new(
                settings.synthetic_range,
                kernel.take_synthetic(),
                resolver,
                current.config.agent_mark,
            )),
            _ => None,
        };
        Self {
            kernel,
            namespaces,
            dns,
            synthetic,
            metrics: Arc::new(Metrics::new()),
            next_id: AtomicU64::new(1),
            current: RwLock::new(Arc::new(current)),
        }
    }

    pub fn current(&self) -> Arc<Current> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What the application in `netns` resolved about `address` (and the client's `name`): from
    /// the synthetic mappings for a synthetic address, else from the record of its DNS answers.
    pub fn resolved(
        &self,
        netns: u64,
        address: std::net::IpAddr,
        name: Option<&str>,
    ) -> crate::route::plan::Resolved {
        use crate::route::plan::{ClientName, Resolved};
        let Some(synthetic) = self.synthetic.as_ref().filter(|s| s.contains(address)) else {
            return self.dns.resolved(netns, address, name);
        };
        let dialled_name = synthetic.name_of(address);
        let client = match (name, &dialled_name) {
            (None, _) => ClientName::Unrecorded,
            (Some(n), Some(d)) if n.trim_end_matches('.').eq_ignore_ascii_case(d) => ClientName::Resolved,
            (Some(_), _) => ClientName::Elsewhere,
        };
        Resolved {
            client,
            dialled_name,
            synthetic: true,
        }
    }

    /// Puts `current` in force for connections accepted from now on.
    pub fn replace(&self, current: Current) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(current);
    }
}
