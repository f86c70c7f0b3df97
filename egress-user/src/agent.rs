//! The running agent: what the data path reads (the kernel's maps, the workloads served, the
//! names behind addresses, the metrics, and the routing in force), and how the configuration is
//! reloaded. SIGHUP loads the configuration again from the same sources; a bad new
//! configuration is logged and the old one stays in force, in the agent and in the kernel alike.

use std::sync::{Arc, RwLock, atomic::AtomicU64};

use anyhow::{Context, Result};

use crate::{
    config::{self, RunArgs, Settings},
    dns,
    kernel::Kernel,
    metrics::Metrics,
    route::{
        plan::{Proxies, Rules},
        policy::Policy,
    },
    upstream::{Upstreams, group::ProxyGroup},
    workloads::{self, Workloads},
};

/// What connections are routed by: the settings in force, their policy, and the upstream
/// proxies made from them. Each connection takes one at accept and keeps it to its end, so a
/// reload never changes a decision halfway.
pub struct Routing {
    pub settings: Settings,
    pub policy: Policy,
    pub upstreams: Upstreams,
}

impl Routing {
    pub fn new(settings: Settings) -> Result<Self> {
        let upstreams = Upstreams::new(&settings, settings.agent_mark.0, true)?;
        Ok(Self::with_upstreams(settings, upstreams))
    }

    /// Routing by `settings` through `upstreams` (made otherwise, e.g. without warm pools).
    pub fn with_upstreams(settings: Settings, upstreams: Upstreams) -> Self {
        Self {
            policy: settings.policy(),
            upstreams,
            settings,
        }
    }

    /// The settings the routing plan follows.
    pub fn rules(&self) -> Rules<'_> {
        self.settings.rules(&self.policy)
    }

    pub fn proxies(&self) -> Proxies<'_, ProxyGroup> {
        self.upstreams.proxies()
    }
}

pub struct Agent {
    pub kernel: Kernel,
    pub workloads: Workloads,
    pub names: Arc<dns::Names>,
    pub metrics: Arc<Metrics>,
    /// Numbers the connections, for the decision log.
    pub next_id: AtomicU64,
    routing: RwLock<Arc<Routing>>,
    /// What the configuration was loaded from, to load it again on SIGHUP.
    args: RunArgs,
    env: Vec<(String, String)>,
}

impl Agent {
    pub fn new(
        kernel: Kernel,
        workloads: Workloads,
        names: dns::Names,
        metrics: Arc<Metrics>,
        settings: Settings,
        args: RunArgs,
        env: Vec<(String, String)>,
    ) -> Result<Self> {
        Ok(Self {
            kernel,
            workloads,
            names: Arc::new(names),
            metrics,
            next_id: AtomicU64::new(1),
            routing: RwLock::new(Arc::new(Routing::new(settings)?)),
            args,
            env,
        })
    }

    /// The routing in force now.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Loads the configuration again and puts it in force: policy (also in the kernel and in
    /// synthetic DNS), proxies, timeouts, routes. Settings bound at start stay as they are (see
    /// [`keep_start_settings`]).
    pub fn reload(&self) -> Result<()> {
        let old = self.routing();
        let mut settings = config::load(&self.args, &self.env).context("reading the configuration")?;
        workloads::cgroups::resolve_units(&mut settings)?;
        if settings.synthetic_dns() {
            config::dns_resolver(&settings)?;
        }
        for change in keep_start_settings(&old.settings, &mut settings) {
            tracing::warn!("reload: {change} changed; this takes a restart to apply");
        }
        let routing = Routing::new(settings)?;
        self.kernel.set_ranges(
            &routing.policy.kernel_deny_nets(),
            &routing.policy.kernel_bypass_nets(),
        )?;
        if let Some(synthetic) = &self.names.synthetic {
            synthetic.set_no_proxy(routing.settings.direct_names());
        }
        *self.routing.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(routing);
        Ok(())
    }
}

/// Copies into `new` what cannot change while running (listeners, kernel settings, the user,
/// what is intercepted, DNS), and names each that the new configuration wanted to change.
fn keep_start_settings(old: &Settings, new: &mut Settings) -> Vec<&'static str> {
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
        pins,
        user,
        worker_threads,
        targets,
        engine,
        container_cgroup_parent,
        pod_selector,
        pod_namespace,
        kubepods_cgroup,
        kube_api,
        kube_token_file,
        kube_ca_file,
        kernel_log,
        dns_mode,
        synthetic_range,
        dns_resolver,
        kerberos_keytab,
        kerberos_ccache
    );
    changed
}
