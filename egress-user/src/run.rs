//! `egress run` and `egress status`.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use tokio::{io::unix::AsyncFd, net::TcpListener, signal::unix::SignalKind};

use crate::{
    cli::RunArgs,
    ebpf::{self, Kernel, KernelSettings},
    listener::{self, Agent},
    proxy_url::{ProxyScheme, ProxyUrl, proxy_from_env},
    upstream::Timeouts,
};

pub fn run(args: RunArgs) -> Result<()> {
    let https_proxy = resolve_proxy(args.https_proxy.as_deref(), "https_proxy")?;
    for cgroup in &args.cgroups {
        ebpf::cgroup_id(cgroup).with_context(|| format!("--cgroup {}", cgroup.display()))?;
    }
    let timeouts = Timeouts {
        connect: seconds("--connect-timeout", args.connect_timeout)?,
        handshake: seconds("--handshake-timeout", args.handshake_timeout)?,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run_async(args, https_proxy, timeouts))
}

async fn run_async(args: RunArgs, https_proxy: ProxyUrl, timeouts: Timeouts) -> Result<()> {
    // Listen before attaching, so the first redirected connect already finds us.
    let listener = TcpListener::bind(("127.0.0.1", args.listen_port))
        .await
        .with_context(|| format!("listening on 127.0.0.1:{}", args.listen_port))?;
    let settings = KernelSettings {
        pin_dir: args.pin.bpffs_dir.clone(),
        listen_port: args.listen_port,
        agent_mark: args.agent_mark,
        kernel_log: args.kernel_log,
    };
    let mut kernel = Kernel::load(&settings)?;
    if let Some(logger) = kernel.take_logger() {
        tokio::spawn(drive_kernel_log(logger));
    }
    for cgroup in &args.cgroups {
        kernel.attach(cgroup, &settings.pin_dir)?;
        tracing::info!(cgroup = %cgroup.display(), "attached");
    }
    tracing::info!(
        listen = %format!("127.0.0.1:{}", args.listen_port),
        https_proxy = %https_proxy,
        pin_dir = %settings.pin_dir.display(),
        "egress ready"
    );

    let agent = Arc::new(Agent::new(kernel, https_proxy, args.agent_mark, timeouts));
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
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

/// The proxy from the flag, else from the environment (Synapse's rules), validated.
fn resolve_proxy(flag: Option<&str>, env_name: &str) -> Result<ProxyUrl> {
    let (source, value) = match flag {
        Some(v) => (format!("--{}", env_name.replace('_', "-")), v.to_owned()),
        None => match proxy_from_env(std::env::vars(), env_name) {
            Some(v) => (format!("environment variable {env_name}"), v),
            None => bail!("no upstream proxy: pass --https-proxy URL or set https_proxy"),
        },
    };
    let url = ProxyUrl::parse(&value).with_context(|| format!("{source}: invalid proxy URL"))?;
    if url.scheme == ProxyScheme::Https {
        bail!("{source}: https:// upstream proxies (TLS to the proxy) are not supported yet");
    }
    Ok(url)
}

fn seconds(flag: &str, value: f64) -> Result<Duration> {
    if !(value.is_finite() && value > 0.0) {
        bail!("{flag} {value}: must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(value))
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
