//! The network namespaces egress serves.
//!
//! cgroup hooks fire for a process whatever its network namespace, and the kernel redirects a
//! connect to the loopback of the caller's own namespace: a container's connect goes to the
//! container's 127.0.0.1. So every namespace with intercepted processes needs an egress listener
//! of its own, made inside it (istio/ztunnel's in-pod model) and served by the agent's event loop.
//!
//! [`Namespaces::reconcile`] runs every [`SCAN_INTERVAL`]: the [`helper`](super::helper) finds the
//! namespaces of the processes in the attached cgroups, makes listeners in the new ones, and the
//! kernel is told to redirect there only once the listener exists. Until then connects from that
//! namespace are refused (EPERM), never passed. A namespace whose processes are all gone loses
//! its listener.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::{
    net::{TcpListener, TcpStream},
    task::AbortHandle,
};

use super::helper::{Helper, NetnsId};
use crate::kernel::Kernel;

/// How often the attached cgroups are looked at for new namespaces. A container's first connect
/// within this time after it starts is refused (and retried by most clients).
pub const SCAN_INTERVAL: Duration = Duration::from_millis(250);
/// A namespace where egress could not listen is tried again after this long (and logged again).
const RETRY_FAILED: Duration = Duration::from_secs(30);

/// Which listener accepted a connection: its namespace's cookie, and for namespaces other than
/// the agent's own, the namespace (direct connections leave from there).
#[derive(Clone, Copy, Debug)]
pub struct ClientNetns {
    pub cookie: u64,
    pub id: Option<NetnsId>,
}

struct Served {
    cookie: u64,
    accepting: Vec<AbortHandle>,
}

/// The namespaces served, and those where egress could not listen.
#[derive(Default)]
pub struct Namespaces {
    served: Mutex<BTreeMap<NetnsId, Served>>,
    failed: Mutex<BTreeMap<NetnsId, Instant>>,
}

impl Namespaces {
    /// Brings the listeners in line with the namespaces of the intercepted processes, leaving
    /// out those of processes in the cgroups `skip` (containers not followed). `accept` starts
    /// serving a new listener and returns the handle that stops it.
    pub async fn reconcile(
        &self,
        helper: &Arc<Helper>,
        kernel: &Kernel,
        skip: Vec<u64>,
        accept: &impl Fn(ClientNetns, TcpListener) -> AbortHandle,
    ) -> Result<()> {
        let scanner = helper.clone();
        let found = tokio::task::spawn_blocking(move || scanner.scan(skip)).await??;
        let found_ids: BTreeSet<NetnsId> = found.iter().map(|(id, _)| *id).collect();

        let gone: Vec<(NetnsId, Served)> = {
            let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<NetnsId> = served
                .keys()
                .copied()
                .filter(|id| !found_ids.contains(id))
                .collect();
            ids.into_iter()
                .filter_map(|id| Some((id, served.remove(&id)?)))
                .collect()
        };
        for (id, served) in gone {
            // Refused in the kernel first, then the listener closes: no connect finds it closed.
            kernel.unserve_netns(served.cookie);
            served.accepting.iter().for_each(AbortHandle::abort);
            let forgetting = helper.clone();
            let _ = tokio::task::spawn_blocking(move || forgetting.forget(id)).await;
            tracing::info!(
                netns = id,
                "stopped serving a network namespace: no intercepted process is left in it"
            );
        }
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| found_ids.contains(id));

        for (id, pid) in found {
            if self
                .served
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&id)
            {
                continue;
            }
            if let Some(when) = self.failed.lock().unwrap_or_else(|e| e.into_inner()).get(&id)
                && when.elapsed() < RETRY_FAILED
            {
                continue;
            }
            match self.serve(helper, kernel, id, accept).await {
                Ok(cookie) => {
                    tracing::info!(netns = id, pid, cookie, "serving a network namespace");
                }
                Err(e) => {
                    self.failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id, Instant::now());
                    tracing::error!(
                        netns = id,
                        pid,
                        "cannot serve the network namespace of intercepted process {pid}; its \
                         connects stay refused: {e:#}"
                    );
                }
            }
        }
        Ok(())
    }

    async fn serve(
        &self,
        helper: &Arc<Helper>,
        kernel: &Kernel,
        id: NetnsId,
        accept: &impl Fn(ClientNetns, TcpListener) -> AbortHandle,
    ) -> Result<u64> {
        let listening = helper.clone();
        let listeners = tokio::task::spawn_blocking(move || listening.listen(id)).await??;
        let client = ClientNetns {
            cookie: listeners.cookie,
            id: Some(id),
        };
        // egress's own listeners: the kernel redirects only to sockets marked so.
        kernel.mark_listener(&listeners.v4)?;
        if let Some(v6) = &listeners.v6 {
            kernel.mark_listener(v6)?;
        }
        let mut accepting = vec![accept(client, TcpListener::from_std(listeners.v4)?)];
        if let Some(v6) = listeners.v6 {
            accepting.push(accept(client, TcpListener::from_std(v6)?));
        }
        if let Err(e) = kernel.serve_netns(listeners.cookie) {
            accepting.iter().for_each(AbortHandle::abort);
            return Err(e);
        }
        self.served.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Served {
                cookie: listeners.cookie,
                accepting,
            },
        );
        Ok(listeners.cookie)
    }
}

/// A direct connection to `to` from inside namespace `id`, started by the helper and completed
/// here within `timeout`.
pub async fn connect(
    helper: &Arc<Helper>,
    id: NetnsId,
    to: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream> {
    let helper = helper.clone();
    let stream = tokio::task::spawn_blocking(move || helper.connect(id, to))
        .await?
        .with_context(|| format!("connecting to {to} from network namespace {id}"))?;
    let stream = TcpStream::from_std(stream)?;
    match tokio::time::timeout(timeout, stream.writable()).await {
        Err(_) => anyhow::bail!("connecting to {to} from network namespace {id}: timed out"),
        Ok(ready) => ready?,
    }
    if let Some(e) = stream.take_error()? {
        return Err(e).with_context(|| format!("connecting to {to} from network namespace {id}"));
    }
    Ok(stream)
}
