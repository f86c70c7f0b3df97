//! `egress run`: the daemon.
//!
//! Start-up happens in two phases. As root, single-threaded: bind the listeners, load and attach
//! the kernel programs, read what only root may read (CA files). Then drop privileges, and only
//! then start the async runtime that serves connections.

use std::{net::TcpListener as StdListener, sync::Arc};

use anyhow::{Context, Result};
use tokio::{io::unix::AsyncFd, net::TcpListener, signal::unix::SignalKind};

use crate::{
    admin,
    agent::Agent,
    config::{self, RunArgs, Settings},
    dns,
    kernel::{self, Kernel, KernelSettings, privileges},
    metrics::Metrics,
    proxy::accept,
    workloads::{self, ClientNetns, Workloads, helper::Helper},
};

type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

struct Listeners {
    v4: StdListener,
    v6: Option<StdListener>,
    admin: StdListener,
    /// Synthetic DNS: the DNS listeners (UDP) on the same loopback addresses and port.
    dns: Vec<std::net::UdpSocket>,
}

pub fn run(args: &RunArgs) -> Result<()> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let mut settings = config::load(args, &env)?;
    // Before any thread starts.
    crate::upstream::negotiate::set_environment(&settings);
    if settings.kerberos_keytab.is_some() && settings.user == "nobody" {
        tracing::warn!(
            "kerberos_keytab with user = \"nobody\": the keytab must be readable by nobody, and so \
             by every other service running as nobody; set user to a dedicated one (the package's \
             `egress`)"
        );
    }
    workloads::cgroups::resolve_units(&mut settings)?;
    let resolver = match settings.synthetic_dns() {
        true => Some(config::dns_resolver(&settings)?),
        false => None,
    };
    if settings.targets.cgroups.is_empty()
        && settings.targets.containers.is_empty()
        && settings.pod_selector.is_none()
    {
        tracing::warn!("no cgroup configured: nothing is intercepted until `egress attach --unit/--cgroup`");
    }
    for cgroup in &settings.targets.cgroups {
        kernel::cgroup_id(cgroup)?;
    }

    kernel::requirements::check(&kernel::requirements::running_release())?;
    raise_fd_limit();
    warn_if_unprivileged_port(settings.listen_port.0);
    let kernel_settings = KernelSettings {
        pin_dir: settings.pins.bpffs_dir.clone(),
        listen_port: settings.listen_port.0,
        agent_mark: settings.agent_mark.0,
        kernel_log: settings.kernel_log,
        dns_synthetic: settings.synthetic_dns(),
        agent_cgroup: workloads::cgroups::own_cgroup_id().unwrap_or(0),
    };
    let netns = kernel::netns_cookie(&socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        None,
    )?)?;
    // Loading clears what a dead agent left in the kernel for this namespace; only then do the
    // listeners take connections. They listen before anything is attached, so the first
    // redirected connect already finds them.
    let mut kernel = Kernel::load(&kernel_settings, netns)?;
    // Forked now, while single-threaded and root, and before the listeners exist (it must not
    // hold them).
    let helper = Helper::spawn(workloads::helper::HelperSettings {
        pin_dir: settings.pins.bpffs_dir.clone(),
        engine_socket: settings.engine.container_engine_socket.clone(),
        listen_port: settings.listen_port.0,
        agent_mark: settings.agent_mark.0,
    })?;
    tracing::debug!(pid = helper.pid(), "namespace helper started");
    let listeners = bind(&settings)?;
    // Only sockets the agent marks are taken for egress's by the kernel programs.
    for socket in [Some(&listeners.v4), listeners.v6.as_ref()].into_iter().flatten() {
        kernel.mark_listener(socket)?;
    }
    for socket in &listeners.dns {
        kernel.mark_listener(socket)?;
    }
    // The connections the listeners accept are in the agent's own cgroup: the kernel binds their
    // original destinations to them there, as they are established.
    let own_cgroup =
        workloads::cgroups::own_cgroup().context("finding the agent's own cgroup (cgroup v2)")?;
    kernel.attach_own_cgroup(&own_cgroup)?;
    let logger = kernel.take_logger();
    // Ranges before links: a newly attached cgroup is never without its deny set.
    let policy = settings.policy();
    kernel.set_ranges(&policy.kernel_deny_nets(), &policy.kernel_bypass_nets())?;
    let workloads = Workloads::start(&mut kernel, &settings, helper)?;
    // Hold the links now, while root may still open their pins (see `Kernel::keep_links`).
    kernel.keep_links();
    let metrics = Arc::new(Metrics::new());
    let names = dns::Names {
        record: Arc::new(dns::Watch::new(kernel.take_dns_events(), kernel.own_netns())),
        synthetic: resolver.map(|resolver| {
            Arc::new(dns::server::Synthesizer::new(dns::server::SynthesizerParts {
                range: settings.synthetic_range.0,
                pinned: kernel.take_synthetic(),
                clients: kernel.take_dns_peers(),
                netns: kernel.own_netns(),
                no_proxy: settings.direct_names(),
                resolver,
                mark: settings.agent_mark.0,
                metrics: metrics.clone(),
            }))
        }),
        lookups: dns::lookup::Lookups::new(),
        admin_lookups: dns::lookup::Lookups::new(),
    };
    let user = settings.user.clone();
    let worker_threads = settings.worker_threads;
    let agent = Agent::new(kernel, workloads, names, metrics, settings, args.clone(), env)?;
    privileges::drop_to(&user)?;
    agent.kernel.check_access().with_context(|| {
        format!(
            "after dropping privileges to user {user:?} the agent cannot use its BPF maps: this \
             kernel or its security policy denies bpf() to processes without CAP_BPF \
             (kernel.unprivileged_bpf_disabled on Linux before 5.19, or an LSM); run with \
             user = \"root\""
        )
    })?;

    runtime(worker_threads)?.block_on(serve(Arc::new(agent), listeners, logger))
}

/// One event loop by default: every relayed message then costs no cross-thread wakeup, which
/// is most of the agent's latency on small hosts (measured by `cargo xtask bench`).
fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if worker_threads > 1 {
        builder.worker_threads(worker_threads);
    }
    builder.enable_all().build()
}

/// The kernel redirects only to a listener with the agent mark, so a squatter on the port gets no
/// new connection; but a SYN already sent (and retransmitted) while egress restarts goes to
/// whoever listens by then. Below `ip_unprivileged_port_start` only privileged processes can.
fn warn_if_unprivileged_port(port: u16) {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(1024);
    if u32::from(port) >= start {
        tracing::warn!(
            "listen_port {port} is one any local user may bind (net.ipv4.ip_unprivileged_port_start \
             = {start}): while egress restarts, connections already on their way could reach such a \
             listener; use a port below {start}"
        );
    }
}

/// Each relayed connection holds two descriptors; thousands of idle federation connections are
/// normal for a homeserver. Raised while still root (the hard limit too, up to fs.nr_open).
fn raise_fd_limit() {
    let wanted = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let limit = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: wanted,
    };
    // SAFETY: plain setrlimit/getrlimit on local structs.
    let effective = unsafe {
        let mut current = std::mem::zeroed::<libc::rlimit>();
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut current);
            current.rlim_cur = current.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &current);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut current);
        current.rlim_cur
    };
    let message = format!(
        "file descriptor limit {effective}: room for about {} concurrent proxied connections",
        effective.saturating_sub(64) / 2
    );
    if effective < 65536 {
        tracing::warn!("{message} (raise LimitNOFILE)");
    } else {
        tracing::info!("{message}");
    }
}

/// The listeners. The kernel redirects only to a listener that carries the agent mark (setting
/// it takes CAP_NET_ADMIN), so another user who binds the port gets nothing. Both loopback
/// listeners or none: egress never runs half-listening.
fn bind(settings: &Settings) -> Result<Listeners> {
    use socket2::{Domain, Socket, Type};
    let listen = |addr: std::net::SocketAddr, mark: Option<u32>| -> std::io::Result<StdListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        if let Some(mark) = mark {
            socket.set_mark(mark)?;
        }
        socket.bind(&addr.into())?;
        // A deep backlog absorbs bursts of connects (capped by net.core.somaxconn).
        socket.listen(4096)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    };
    let mark = Some(settings.agent_mark.0);
    let port = settings.listen_port.0;
    let in_use = |addr| {
        format!(
            "listening on {addr}: the port is taken (another egress, or another program squatting \
             on it: find it with `ss -ltnp 'sport = :{port}'`); egress does not run half-listening"
        )
    };
    let v4_addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let v4 = listen(v4_addr, mark).with_context(|| in_use(v4_addr))?;
    // IPv6 connects are redirected to [::1]. A host without IPv6 on loopback has no [::1] to
    // bind, and the kernel then refuses those connects (no egress listener); a [::1] that
    // someone else holds is an error.
    let v6_addr = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    let v6 = match listen(v6_addr, mark) {
        Ok(l) => Some(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(e).with_context(|| in_use(v6_addr));
        }
        Err(e) => {
            tracing::warn!("listening on {v6_addr}: {e}; IPv6 connects will be refused");
            None
        }
    };
    let admin_addr = settings.admin_addr.0;
    let admin = listen(admin_addr, None).with_context(|| format!("listening on admin_addr {admin_addr}"))?;
    let mut dns = Vec::new();
    if settings.synthetic_dns() {
        let udp = |addr: std::net::SocketAddr| -> std::io::Result<std::net::UdpSocket> {
            let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
            socket.set_mark(settings.agent_mark.0)?;
            socket.bind(&addr.into())?;
            socket.set_nonblocking(true)?;
            Ok(socket.into())
        };
        let taken = |addr| {
            format!(
                "listening for DNS on {addr} (udp): the port is taken (find it with `ss -lunp 'sport = :{port}'`)"
            )
        };
        dns.push(udp(v4_addr).with_context(|| taken(v4_addr))?);
        if v6.is_some() {
            dns.push(udp(v6_addr).with_context(|| taken(v6_addr))?);
        }
    }
    Ok(Listeners { v4, v6, admin, dns })
}

async fn serve(agent: Arc<Agent>, listeners: Listeners, logger: Option<KernelLogger>) -> Result<()> {
    if let Some(logger) = logger {
        tokio::spawn(drive_kernel_log(logger));
    }
    let v4 = TcpListener::from_std(listeners.v4)?;
    agent
        .names
        .record
        .spawn()
        .context("polling the kernel's DNS ring buffer")?;
    let own = ClientNetns {
        cookie: agent.kernel.own_netns(),
        id: None,
    };
    if let Some(v6) = listeners.v6 {
        tokio::spawn(accept::serve(TcpListener::from_std(v6)?, agent.clone(), own));
    }
    for socket in listeners.dns {
        tokio::spawn(dns::server::serve(
            tokio::net::UdpSocket::from_std(socket)?,
            agent.names.clone(),
        ));
    }
    tokio::spawn(serve_workloads(agent.clone()));
    tokio::spawn(admin::serve(
        TcpListener::from_std(listeners.admin)?,
        agent.clone(),
    ));
    tokio::spawn(keep_links(agent.clone()));
    let routing = agent.routing();
    let settings = &routing.settings;
    tracing::info!(
        listen = %format!("127.0.0.1:{}", settings.listen_port),
        admin = %settings.admin_addr,
        https_proxy = %display_proxy(&settings.https_proxy),
        http_proxy = %display_proxy(&settings.http_proxy),
        pin_dir = %settings.pins.bpffs_dir.display(),
        "egress ready"
    );
    // Type=notify: units ordered after egress.service start once interception is in place.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!("telling systemd we are ready: {e}");
    }

    tokio::spawn(reload_on_sighup(agent.clone()));
    tokio::spawn(trim_memory(agent.clone()));
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    tokio::select! {
        result = accept::serve(v4, agent.clone(), own) => result?,
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        _ = sigterm.recv() => tracing::info!("terminated"),
    }
    tracing::info!(
        "stopping; the programs stay attached and intercepted connects are refused until the \
         next `egress run` (`egress detach` removes the interception)"
    );
    Ok(())
}

/// Keeps the workloads served: classifies new containers and pods, and keeps a listener in
/// every network namespace of an intercepted process (see [`workloads`]).
async fn serve_workloads(agent: Arc<Agent>) {
    let serving = agent.clone();
    agent
        .workloads
        .keep_serving(&agent.kernel, move |netns, listener| {
            tokio::spawn(accept::serve(listener, serving.clone(), netns)).abort_handle()
        })
        .await;
}

/// glibc's malloc keeps memory freed by a burst of connections; hand it back once the number of
/// open connections has fallen (checked every 5 s; a cheap call when there is nothing to give).
async fn trim_memory(agent: Arc<Agent>) {
    let mut previous = 0;
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        let active = agent.metrics.active_connections();
        if active + 256 < previous {
            // SAFETY: malloc_trim has no preconditions.
            unsafe { libc::malloc_trim(0) };
        }
        previous = active;
    }
}

/// SIGHUP: load the configuration again; a bad one is logged and the old one stays in force.
async fn reload_on_sighup(agent: Arc<Agent>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(SignalKind::hangup()) else {
        return;
    };
    while hangups.recv().await.is_some() {
        let reloading = agent.clone();
        match tokio::task::spawn_blocking(move || reloading.reload()).await {
            Ok(Ok(())) => tracing::info!("configuration reloaded"),
            Ok(Err(e)) => tracing::error!(
                "reload failed, the previous configuration stays in force: {}",
                crate::redact::redact_credentials(&format!("{e:#}"))
            ),
            Err(e) => tracing::error!("reload failed: {e}"),
        }
    }
}

/// Holds the links while the agent runs (see `Kernel::keep_links`), checking every 2 s.
async fn keep_links(agent: Arc<Agent>) {
    let mut warned = false;
    let mut first = true;
    loop {
        let pins_present = agent.kernel.keep_links();
        if pins_present && (first || warned) {
            tracing::debug!("the pinned links are in place");
        }
        first = false;
        if !pins_present && !warned {
            tracing::error!(
                "the pinned links under {} are gone (bpffs unmounted?): the programs stay attached \
                 while this agent runs, but a restart would lose them; remount bpffs and restart egress",
                agent.routing().settings.pins.bpffs_dir.display()
            );
        }
        warned = !pins_present;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

fn display_proxy(proxy: &crate::config::proxy_url::ProxySetting) -> String {
    proxy
        .url()
        .map_or_else(|| "none (direct)".to_owned(), ToString::to_string)
}

async fn drive_kernel_log(logger: KernelLogger) {
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
