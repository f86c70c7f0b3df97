//! Synthetic DNS, served: the agent's DNS listener (UDP, on loopback at egress's port, carrying
//! the agent mark so that the kernel sends queries only to it), the synthetic mappings (kept in a
//! pinned map, so that an agent restart keeps every address applications may still hold), and
//! forwarding to the internal resolver.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use egress_common::SynthName;
use hickory_proto::op::{Message, ResponseCode};
use ipnet::Ipv4Net;
use tokio::{net::UdpSocket, sync::Semaphore};

use super::{
    Names,
    synthetic::{Allocator, Handling, handle, response},
};
use crate::{
    kernel::DnsPeers,
    metrics::{DnsOutcome, Metrics},
    route::policy::NoProxy,
};

/// Queries answered at once; more are dropped (the client asks again).
const MAX_IN_FLIGHT: usize = 256;
/// How long the internal resolver has to answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Synthesizer {
    allocator: Mutex<Allocator>,
    pinned: Mutex<Option<BpfHashMap<MapData, u32, SynthName>>>,
    /// The sources the kernel redirected here: the only ones answered.
    clients: Option<DnsPeers>,
    /// The agent's own network namespace, the only one synthetic DNS serves.
    netns: u64,
    /// no_proxy names are forwarded, not synthesized: the policy in force (a reload changes it).
    no_proxy: RwLock<Arc<NoProxy>>,
    pub resolver: SocketAddr,
    mark: u32,
    metrics: Arc<Metrics>,
}

/// What synthetic DNS is made of, fixed at start.
pub struct SynthesizerParts {
    pub range: Ipv4Net,
    pub pinned: Option<BpfHashMap<MapData, u32, SynthName>>,
    pub clients: Option<DnsPeers>,
    pub netns: u64,
    pub no_proxy: NoProxy,
    pub resolver: SocketAddr,
    pub mark: u32,
    pub metrics: Arc<Metrics>,
}

impl Synthesizer {
    /// Takes over the mappings pinned by earlier agents (those outside `range`, after a change of
    /// range, are dropped).
    pub fn new(parts: SynthesizerParts) -> Self {
        let SynthesizerParts {
            range,
            mut pinned,
            clients,
            netns,
            no_proxy,
            resolver,
            mark,
            metrics,
        } = parts;
        let mut allocator = Allocator::new(range);
        if let Some(map) = pinned.as_mut() {
            let entries: Vec<(u32, SynthName)> = map.iter().filter_map(Result::ok).collect();
            let mut dropped = 0;
            for (key, name) in entries {
                let addr = Ipv4Addr::from(u32::from_be(key));
                let restored = name_text(&name).is_some_and(|name| allocator.restore(addr, &name));
                if !restored {
                    let _ = map.remove(&key);
                    dropped += 1;
                }
            }
            tracing::info!(
                restored = allocator.len(),
                dropped,
                range = %range,
                "synthetic DNS mappings taken over"
            );
        }
        Self {
            allocator: Mutex::new(allocator),
            pinned: Mutex::new(pinned),
            clients,
            netns,
            no_proxy: RwLock::new(Arc::new(no_proxy)),
            resolver,
            mark,
            metrics,
        }
    }

    /// Puts a reloaded policy's no_proxy in force.
    pub fn set_no_proxy(&self, no_proxy: NoProxy) {
        *self.no_proxy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(no_proxy);
    }

    fn no_proxy(&self) -> Arc<NoProxy> {
        self.no_proxy.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the kernel sent a query from `peer` here.
    fn redirected(&self, peer: SocketAddr) -> bool {
        self.clients
            .as_ref()
            .is_some_and(|clients| clients.redirected(self.netns, peer))
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        self.lock().contains(addr)
    }

    pub fn name_of(&self, addr: IpAddr) -> Option<String> {
        self.lock().name_of(addr).map(str::to_owned)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Allocator> {
        self.allocator.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles a query; a new mapping is pinned before it is answered.
    fn handle(&self, query: &Message, no_proxy: &NoProxy) -> Handling {
        let handling = handle(query, no_proxy, &mut self.lock());
        if let Handling::Allocated(_, name, addr) = &handling {
            self.persist(name, *addr);
        }
        handling
    }

    fn persist(&self, name: &str, addr: Ipv4Addr) {
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        let Some(map) = pinned.as_mut() else { return };
        let mut value = SynthName([0; 256]);
        let bytes = name.as_bytes();
        value.0[..bytes.len().min(255)].copy_from_slice(&bytes[..bytes.len().min(255)]);
        if let Err(e) = map.insert(u32::from(addr).to_be(), value, 0) {
            tracing::warn!("synthetic DNS: pinning {name} = {addr}: {e}; it is lost when the agent restarts");
        }
    }
}

fn name_text(name: &SynthName) -> Option<String> {
    let end = name.0.iter().position(|&b| b == 0).unwrap_or(name.0.len());
    let text = std::str::from_utf8(&name.0[..end]).ok()?;
    crate::hostport::valid_hostname(text).then(|| text.to_owned())
}

/// Answers the queries arriving on `socket` (in the agent's own network namespace).
pub async fn serve(socket: UdpSocket, names: Arc<Names>) {
    let Some(synthesizer) = names.synthetic.clone() else {
        return;
    };
    let socket = Arc::new(socket);
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                tracing::warn!("synthetic DNS: receiving: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Only queries the kernel redirected: not a local user's, sent straight to this port.
        if !synthesizer.redirected(peer) {
            synthesizer.metrics.dns_query(DnsOutcome::Ignored);
            tracing::debug!("synthetic DNS: a query from {peer} was not redirected by egress; ignored");
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!("synthetic DNS: {MAX_IN_FLIGHT} queries in flight; one dropped");
            continue;
        };
        let query = buf[..n].to_vec();
        let (socket, names, synthesizer) = (socket.clone(), names.clone(), synthesizer.clone());
        tokio::spawn(async move {
            if let Some(reply) = answer(&synthesizer, &names, &query).await
                && let Err(e) = socket.send_to(&reply, peer).await
            {
                tracing::debug!("synthetic DNS: answering {peer}: {e}");
            }
            drop(permit);
        });
    }
}

async fn answer(synthesizer: &Synthesizer, names: &Names, bytes: &[u8]) -> Option<Vec<u8>> {
    // Not a DNS message: no answer, as a resolver would do.
    let query = Message::from_vec(bytes).ok()?;
    match synthesizer.handle(&query, &synthesizer.no_proxy()) {
        Handling::Answer(message) | Handling::Allocated(message, ..) => {
            synthesizer.metrics.dns_query(DnsOutcome::Synthesized);
            message.to_vec().ok()
        }
        Handling::Forward => match forward(synthesizer.resolver, bytes, synthesizer.mark).await {
            Ok(reply) => {
                synthesizer.metrics.dns_query(DnsOutcome::Forwarded);
                names
                    .record
                    .learn(synthesizer.netns, synthesizer.resolver.ip(), bytes, &reply);
                Some(reply)
            }
            Err(e) => {
                synthesizer.metrics.dns_query(DnsOutcome::Failed);
                tracing::warn!(
                    "synthetic DNS: the internal resolver {}: {e}",
                    synthesizer.resolver
                );
                response(&query, ResponseCode::ServFail).to_vec().ok()
            }
        },
    }
}

/// Asks the internal resolver, from a marked socket (never redirected), and returns its answer
/// to this query (same id).
async fn forward(resolver: SocketAddr, query: &[u8], mark: u32) -> std::io::Result<Vec<u8>> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(resolver), Type::DGRAM, None)?;
    socket.set_mark(mark)?;
    socket.set_nonblocking(true)?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.connect(resolver).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 4096];
    tokio::time::timeout(FORWARD_TIMEOUT, async {
        loop {
            let n = socket.recv(&mut buf).await?;
            if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
                return Ok(buf[..n].to_vec());
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))?
}
