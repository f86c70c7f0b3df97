//! The running agent: the data path's shared state, and how its configuration is reloaded.
//! SIGHUP loads the configuration again from the same sources; a bad new configuration is
//! logged and the old one stays in force, in the agent and in the kernel alike.

use std::sync::Arc;

use anyhow::{Context, Result};

use crate::{
    config::{Config, flags::RunArgs},
    kernel::Kernel,
    netns::Namespaces,
    proxy::{Current, Shared},
};

pub struct Agent {
    pub shared: Arc<Shared>,
    /// What the configuration was loaded from, to load it again on SIGHUP.
    args: RunArgs,
    env: Vec<(String, String)>,
}

impl Agent {
    pub fn new(
        kernel: Kernel,
        namespaces: Option<Namespaces>,
        config: Config,
        args: RunArgs,
        env: Vec<(String, String)>,
    ) -> Result<Self> {
        Ok(Self {
            shared: Arc::new(Shared::new(kernel, namespaces, Current::new(config)?)),
            args,
            env,
        })
    }

    pub fn current(&self) -> Arc<Current> {
        self.shared.current()
    }

    /// Loads the configuration again and puts it in force: policy (also in the kernel), proxies,
    /// timeouts, routes. Settings bound at start stay as they are (see [`keep_start_settings`]).
    pub fn reload(&self) -> Result<()> {
        let old = self.current();
        let mut config = Config::load(&self.args, &self.env).context("reading the configuration")?;
        config.settle_dns()?;
        for change in keep_start_settings(&old.config, &mut config) {
            tracing::warn!("reload: {change} changed; this takes a restart to apply");
        }
        let current = Current::new(config)?;
        let policy = &current.config.policy;
        self.shared
            .kernel
            .set_ranges(&policy.kernel_deny_nets(), &policy.kernel_bypass_nets())?;
        self.shared.replace(current);
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
        containers,
        container_engine_socket,
        container_cgroup_parent,
        pods,
        kernel_log,
        dns
    );
    changed
}
