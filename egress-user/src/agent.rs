//! The running agent's state: the kernel maps, metrics, and the current configuration with the
//! proxy clients built from it. SIGHUP reloads the configuration from the same sources; a bad
//! new configuration is logged and the old one stays in force.

use std::sync::{Arc, RwLock, atomic::AtomicU64};

use anyhow::{Context, Result};

use crate::{
    admin::HealthCache,
    cli::RunArgs,
    config::Config,
    ebpf::Kernel,
    metrics::Metrics,
    proxy_tls::ProxyTls,
    proxy_url::{ProxyScheme, ProxyUrl},
    upstream::ProxyClient,
};

/// One consistent configuration and the proxy clients built from it. Each connection takes a
/// snapshot at accept and keeps it to its end, so a reload never changes a decision halfway.
pub struct Current {
    pub config: Config,
    pub https_proxy: Option<ProxyClient>,
    pub http_proxy: Option<ProxyClient>,
}

impl Current {
    pub fn new(config: Config) -> Result<Self> {
        let client = |url: &Option<ProxyUrl>| -> Result<Option<ProxyClient>> {
            let Some(url) = url else { return Ok(None) };
            let tls = match url.scheme {
                ProxyScheme::Https => Some(ProxyTls::new(
                    config.proxy_ca_file.as_deref(),
                    config.insecure_skip_proxy_tls_verify,
                )?),
                ProxyScheme::Http => None,
            };
            Ok(Some(ProxyClient::new(
                url.clone(),
                tls,
                config.agent_mark,
                config.timeouts,
            )))
        };
        Ok(Self {
            https_proxy: client(&config.https_proxy)?,
            http_proxy: client(&config.http_proxy)?,
            config,
        })
    }

    /// The configured upstream proxies.
    pub fn proxies(&self) -> impl Iterator<Item = &ProxyClient> {
        self.https_proxy.iter().chain(self.http_proxy.iter())
    }
}

pub struct Agent {
    pub kernel: Kernel,
    pub metrics: Metrics,
    pub health: HealthCache,
    pub(crate) next_id: AtomicU64,
    current: RwLock<Arc<Current>>,
    /// What the configuration was loaded from, to load it again on SIGHUP.
    args: RunArgs,
    env: Vec<(String, String)>,
}

impl Agent {
    pub fn new(kernel: Kernel, config: Config, args: RunArgs, env: Vec<(String, String)>) -> Result<Self> {
        Ok(Self {
            kernel,
            metrics: Metrics::new(),
            health: HealthCache::default(),
            next_id: AtomicU64::new(1),
            current: RwLock::new(Arc::new(Current::new(config)?)),
            args,
            env,
        })
    }

    pub fn current(&self) -> Arc<Current> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Loads the configuration again and puts it in force: policy (also in the kernel), proxies,
    /// timeouts, routes. Settings bound at start stay as they are (see [`keep_start_settings`]).
    pub fn reload(&self) -> Result<()> {
        let old = self.current();
        let mut config = Config::load(&self.args, &self.env).context("reading the configuration")?;
        for change in keep_start_settings(&old.config, &mut config) {
            tracing::warn!("reload: {change} changed; this takes a restart to apply");
        }
        let current = Current::new(config)?;
        let policy = &current.config.policy;
        self.kernel
            .set_ranges(&policy.kernel_deny_nets(), &policy.kernel_bypass_nets())?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(current);
        self.health.forget();
        Ok(())
    }
}

/// Copies into `new` what cannot change while running (listeners, kernel settings, the user,
/// the attached cgroups), and names each that the new configuration wanted to change.
fn keep_start_settings(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($($field:ident),*) => {$(
            if new.$field != old.$field {
                changed.push(stringify!($field));
                new.$field = old.$field.clone();
            }
        )*};
    }
    keep!(
        listen_port,
        agent_mark,
        admin_addr,
        pin_dir,
        user,
        cgroups,
        kernel_log
    );
    changed
}
