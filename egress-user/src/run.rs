//! `egress run` and `egress status`.

use std::{path::Path, sync::Arc};

use anyhow::{Context, Result};
use tokio::{io::unix::AsyncFd, net::TcpListener, signal::unix::SignalKind};

use crate::{
    cli::RunArgs,
    config::Config,
    ebpf::{self, Kernel, KernelSettings},
    listener::{self, Agent},
};

pub fn run(args: &RunArgs) -> Result<()> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = Config::load(args, &env)?;
    for cgroup in &config.cgroups {
        ebpf::cgroup_id(cgroup).with_context(|| format!("cgroup {}", cgroup.display()))?;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run_async(config))
}

async fn run_async(config: Config) -> Result<()> {
    // Listen before attaching, so the first redirected connect already finds us.
    let listener = TcpListener::bind(("127.0.0.1", config.listen_port))
        .await
        .with_context(|| format!("listening on 127.0.0.1:{}", config.listen_port))?;
    // IPv6 connects are redirected to [::1]. Without IPv6 on loopback they simply fail (closed).
    let listener6 = match TcpListener::bind(("::1", config.listen_port)).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(
                "not listening on [::1]:{}: {e}; IPv6 connects will be refused",
                config.listen_port
            );
            None
        }
    };
    let settings = KernelSettings {
        pin_dir: config.pin_dir.clone(),
        listen_port: config.listen_port,
        agent_mark: config.agent_mark,
        kernel_log: config.kernel_log,
    };
    let mut kernel = Kernel::load(&settings)?;
    if let Some(logger) = kernel.take_logger() {
        tokio::spawn(drive_kernel_log(logger));
    }
    // Ranges before links: a newly attached cgroup is never without its deny set.
    kernel.set_ranges(
        &config.policy.kernel_deny_nets(),
        &config.policy.kernel_bypass_nets(),
    )?;
    for cgroup in &config.cgroups {
        kernel.attach(cgroup, &settings.pin_dir)?;
        tracing::info!(cgroup = %cgroup.display(), "attached");
    }
    tracing::info!(
        listen = %format!("127.0.0.1:{}", config.listen_port),
        https_proxy = %display_proxy(&config.https_proxy),
        http_proxy = %display_proxy(&config.http_proxy),
        pin_dir = %settings.pin_dir.display(),
        "egress ready"
    );

    let agent = Arc::new(Agent::new(kernel, config)?);
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    if let Some(listener6) = listener6 {
        tokio::spawn(listener::serve(listener6, agent.clone()));
    }
    tokio::select! {
        result = listener::serve(listener, agent.clone()) => result?,
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        _ = sigterm.recv() => tracing::info!("terminated"),
    }
    tracing::info!(
        "stopping; the programs stay attached and intercepted connects are refused until the \
         next `egress run` (`egress detach` removes the interception)"
    );
    Ok(())
}

fn display_proxy(proxy: &Option<crate::proxy_url::ProxyUrl>) -> String {
    proxy
        .as_ref()
        .map_or_else(|| "none (direct)".to_owned(), ToString::to_string)
}

async fn drive_kernel_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer fd, which stays open as long as the AsyncFd.
    let Ok(mut fd) = (unsafe { AsyncFd::register(logger) }) else {
        return;
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

pub fn status(pin_dir: &Path) -> Result<()> {
    if !pin_dir.exists() {
        println!("not attached (no {})", pin_dir.display());
        return Ok(());
    }
    println!("pinned at {}", pin_dir.display());
    for id in ebpf::pinned_cgroups(pin_dir)? {
        println!("attached cgroup id {id}");
    }
    for (name, value) in ebpf::pinned_counters(pin_dir)? {
        println!("{name:>20} {value}");
    }
    Ok(())
}
