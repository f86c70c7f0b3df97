//! Which workloads egress serves, and how: one owner for cgroups, systemd units, containers,
//! pods, their network namespaces and the listeners egress keeps in them (as ztunnel's `inpod/`
//! owns pod lifecycle).
//!
//! - **cgroups and units** ([`cgroups`]): attached in full; every process in them (and below) is
//!   intercepted. Units are resolved to their cgroups.
//! - **containers** ([`containers`], asking the engine through [`engine`]) and **pods**
//!   ([`kubernetes`], asking the API server): the engine's parent cgroup (or kubelet's) is
//!   attached as a *scope* ([`scopes`]): only its children classified as followed are
//!   intercepted, the others pass, and a new child is refused until classified.
//! - **network namespaces** ([`namespaces`]): the kernel redirects a connect to the loopback of
//!   the caller's own namespace, so every namespace with intercepted processes gets egress
//!   listeners of its own, made inside it by the privileged [`helper`].
//!
//! What happens when a new container starts: its cgroup appears under a scope and is refused;
//! within [`namespaces::SCAN_INTERVAL`] [`Workloads::keep_serving`] classifies it (asking the
//! engine for its name), then finds its network namespace and has the helper make listeners
//! there; only then does the kernel redirect its connects, to those listeners.

pub mod api;
pub mod cgroups;
pub mod containers;
pub mod engine;
pub mod helper;
pub mod kubernetes;
pub mod namespaces;
pub mod scopes;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, TcpStream},
    task::AbortHandle,
};

use crate::{
    config::Settings,
    kernel::{self, Attachment, Kernel},
};
use containers::Follower;
use engine::Engine;
pub use helper::RootFile;
use helper::{Helper, NetnsId};

/// The most of a client's hosts file or resolv.conf read, and how long reading it may take.
pub const MAX_ROOT_FILE: usize = 64 * 1024;
pub const ROOT_FILE_TIMEOUT: Duration = Duration::from_secs(2);
pub use namespaces::ClientNetns;
use namespaces::Namespaces;
use scopes::ScopeMaps;

/// The workloads served by the running agent.
pub struct Workloads {
    helper: Arc<Helper>,
    scopes: Arc<Mutex<ScopeMaps>>,
    follower: Arc<Mutex<Follower>>,
    namespaces: Namespaces,
}

impl Workloads {
    /// Attaches to what `settings` name: cgroups (and resolved units) in full, the engine's and
    /// kubelet's parents as scopes, with their children classified before the programs are
    /// attached there. `helper` makes the listeners in other namespaces.
    pub fn start(kernel: &mut Kernel, settings: &Settings, helper: Helper) -> Result<Self> {
        let pin_dir = settings.pins.bpffs_dir.clone();
        let mut maps = ScopeMaps::take(kernel)?;
        for cgroup in &settings.targets.cgroups {
            kernel.attach(cgroup, &pin_dir, Attachment::Full)?;
            tracing::info!(cgroup = %cgroup.display(), "attached");
        }
        let engine = Engine::new(&settings.engine.container_engine_socket);
        for reference in &settings.targets.containers {
            let reference = reference.0.as_str();
            // With the engine's cgroup parent configured, egress needs no engine to start (it
            // may start before the engine, at boot): children stay refused until it answers.
            let scope = match &settings.container_cgroup_parent {
                Some(parent) => parent.clone(),
                None => containers::scope_for(&engine, reference)
                    .with_context(|| format!("container {reference}"))?,
            };
            match containers::follow(&mut maps, &engine, reference, &scope) {
                Ok(()) => {}
                Err(e) if settings.container_cgroup_parent.is_some() => tracing::warn!(
                    "container {reference}: {e:#}; the containers under {} stay refused until the engine answers",
                    scope.display()
                ),
                Err(e) => return Err(e.context(format!("container {reference}"))),
            }
            kernel.attach(&scope, &pin_dir, Attachment::Scope)?;
            tracing::info!(container = %reference, scope = %scope.display(), "following a container (attached selectively)");
        }
        let mut follower = Follower::new(None, None);
        if let Some(selection) = kubernetes::PodSelection::of(settings) {
            let mut pods = kubernetes::Pods::new(&selection, settings.agent_mark.0)?;
            let (kubepods, own_pod, unanswered) = containers::follow_pods(&mut maps, &mut pods)?;
            follower = Follower::new(Some(pods), own_pod);
            if let Some(e) = unanswered {
                tracing::warn!(
                    "pods: {e:#}; the pods under {} not classified yet stay refused until the API server answers",
                    kubepods.display()
                );
            }
            kernel.attach(&kubepods, &pin_dir, Attachment::Scope)?;
            tracing::info!(
                selector = %selection.selector,
                scope = %kubepods.display(),
                "following pods (attached selectively)"
            );
        }
        prune_scopes(&mut maps, kernel);
        Ok(Self {
            helper: Arc::new(helper),
            scopes: Arc::new(Mutex::new(maps)),
            follower: Arc::new(Mutex::new(follower)),
            namespaces: Namespaces::default(),
        })
    }

    /// Keeps the classification of the scopes' children and the listeners in the network
    /// namespaces of intercepted processes up to date, every [`namespaces::SCAN_INTERVAL`], for
    /// as long as the agent runs. `accept` starts serving a new listener and returns the handle
    /// that stops it.
    pub async fn keep_serving(
        &self,
        kernel: &Kernel,
        accept: impl Fn(ClientNetns, TcpListener) -> AbortHandle,
    ) {
        let mut last_error = String::new();
        loop {
            // Containers first: a new followed container's cgroup is classified before its
            // namespace gets a listener; passing ones get none.
            let (helper, follower, scopes) =
                (self.helper.clone(), self.follower.clone(), self.scopes.clone());
            let linked: Vec<u64> = self
                .scopes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .scopes()
                .iter()
                .map(|s| s.cgroup_id)
                .filter(|id| kernel.scope_linked(*id))
                .collect();
            let (skip, follow_error) = tokio::task::spawn_blocking(move || {
                let mut name_of = |id: &str| helper.container_name(id);
                follower
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .round(&scopes, &mut name_of, &|id| linked.contains(&id))
            })
            .await
            .unwrap_or_else(|e| (Vec::new(), Some(e.into())));
            let result = self
                .namespaces
                .reconcile(&self.helper, kernel, skip, &accept)
                .await
                .and(follow_error.map_or(Ok(()), Err));
            // Logged when it changes, not every round.
            let error = result.err().map(|e| format!("{e:#}")).unwrap_or_default();
            if !error.is_empty() && error != last_error {
                tracing::error!("looking for the network namespaces of intercepted processes: {error}");
            }
            last_error = error;
            tokio::time::sleep(namespaces::SCAN_INTERVAL).await;
        }
    }

    /// A direct connection to `to` from inside network namespace `id` (an application's own,
    /// so that it is routed as the application expects), started by the helper and completed
    /// here within `timeout`.
    pub async fn connect(&self, id: NetnsId, to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        namespaces::connect(&self.helper, id, to, timeout).await
    }

    /// `file` (hosts file, resolv.conf) of the processes in namespace `id`, as they see it: at
    /// most [`MAX_ROOT_FILE`] bytes, read within [`ROOT_FILE_TIMEOUT`].
    pub async fn root_file(&self, id: NetnsId, file: RootFile) -> Result<String> {
        let helper = self.helper.clone();
        let read = tokio::task::spawn_blocking(move || -> Result<String> {
            use std::io::Read;
            let opened = helper.open_in_root(id, file)?;
            let mut bytes = Vec::new();
            opened.take(MAX_ROOT_FILE as u64 + 1).read_to_end(&mut bytes)?;
            if bytes.len() > MAX_ROOT_FILE {
                anyhow::bail!("longer than {MAX_ROOT_FILE} bytes");
            }
            Ok(String::from_utf8(bytes)?)
        });
        tokio::time::timeout(ROOT_FILE_TIMEOUT, read)
            .await
            .map_err(|_| anyhow::anyhow!("timed out"))??
            .with_context(|| format!("reading the {file:?} file of network namespace {id}"))
    }
}

/// Forgets the scopes whose cgroup has no scoped link pinned any more (detached, or gone),
/// unless they are nested in one that has (kubelet's QoS classes in the kubepods cgroup).
fn prune_scopes(maps: &mut ScopeMaps, kernel: &Kernel) {
    let all = maps.scopes();
    let linked: Vec<u64> = all
        .iter()
        .map(|s| s.cgroup_id)
        .filter(|id| kernel.scope_linked(*id))
        .collect();
    for scope in all {
        if linked.contains(&scope.cgroup_id) {
            continue;
        }
        let nested = cgroups::cgroup_path_by_id(scope.cgroup_id).is_some_and(|path| {
            path.ancestors()
                .skip(1)
                .any(|dir| kernel::cgroup_id(dir).is_ok_and(|id| linked.contains(&id)))
        });
        if !nested {
            let _ = maps.remove_scope(scope.cgroup_id);
        }
    }
}

/// `egress attach`: adds cgroups, units and containers to the running instance pinned at
/// `pin_dir`, which serves them from then on; nothing already connected is touched. Returns a
/// line for each.
pub fn attach_to_running(
    pin_dir: &Path,
    targets: &crate::config::settings::Targets,
    engine_socket: &Path,
) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let units = targets
        .units
        .iter()
        .map(|unit| cgroups::resolve_unit(unit))
        .collect::<Result<Vec<PathBuf>>>()?;
    for cgroup in targets.cgroups.iter().chain(&units) {
        kernel::Instance::open(pin_dir)?.attach(cgroup, Attachment::Full)?;
        done.push(format!("attached {}", cgroup.display()));
    }
    let engine = Engine::new(engine_socket);
    for reference in &targets.containers {
        let reference = reference.0.as_str();
        let scope = containers::scope_for(&engine, reference)?;
        let mut instance = kernel::Instance::open(pin_dir)?;
        let mut maps = ScopeMaps::from_instance(&mut instance)?;
        containers::follow(&mut maps, &engine, reference, &scope)?;
        instance.attach(&scope, Attachment::Scope)?;
        done.push(format!(
            "following container {reference} (attached to {})",
            scope.display()
        ));
    }
    Ok(done)
}

/// `egress detach --cgroup`: removes one cgroup's links, and its scope if it was attached
/// selectively; returns how many links were removed.
pub fn detach_cgroup(pin_dir: &Path, cgroup: &Path) -> Result<usize> {
    let id = kernel::cgroup_id(cgroup)?;
    if let Ok(mut scopes) = ScopeMaps::from_pins(pin_dir) {
        scopes.remove_scope(id)?;
    }
    kernel::detach_cgroup(pin_dir, cgroup)
}
