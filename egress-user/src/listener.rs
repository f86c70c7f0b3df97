//! Accepts the connections the kernel redirected, recovers where they were going, and relays
//! them through the upstream proxy. Any failure resets the client: nothing goes direct.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};

use crate::{
    decision::{Decision, Route},
    ebpf::Kernel,
    proxy_url::ProxyUrl,
    upstream::{self, Timeouts},
};

pub struct Agent {
    pub kernel: Kernel,
    pub https_proxy: ProxyUrl,
    pub agent_mark: u32,
    pub timeouts: Timeouts,
    next_id: AtomicU64,
}

impl Agent {
    pub fn new(kernel: Kernel, https_proxy: ProxyUrl, agent_mark: u32, timeouts: Timeouts) -> Self {
        Self {
            kernel,
            https_proxy,
            agent_mark,
            timeouts,
            next_id: AtomicU64::new(1),
        }
    }
}

pub async fn serve(listener: TcpListener, agent: Arc<Agent>) -> std::io::Result<()> {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; connections wait in the backlog.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let id = agent.next_id.fetch_add(1, Ordering::Relaxed);
            let mut decision = Decision::new(id, peer);
            handle(&agent, client, peer, &mut decision).await;
            decision.log();
        });
    }
}

async fn handle(agent: &Agent, mut client: TcpStream, peer: SocketAddr, decision: &mut Decision) {
    let original = match peer {
        SocketAddr::V4(peer) => agent.kernel.take_original_dst(peer),
        SocketAddr::V6(_) => None,
    };
    let Some(original) = original else {
        decision.rule = "no-original-destination";
        decision.error = Some("connection was not redirected by egress (no original destination)".into());
        reset(client);
        return;
    };
    decision.original_dst = Some(SocketAddr::V4(original));
    decision.route = Route::Connect;
    decision.upstream = Some(agent.https_proxy.authority());
    let target = connect_target(original);

    let tunnel =
        match upstream::open_tunnel(&agent.https_proxy, &target, agent.agent_mark, agent.timeouts).await {
            Ok(tunnel) => tunnel,
            Err(e) => {
                decision.upstream_status = e.status();
                decision.error = Some(e.to_string());
                reset(client);
                return;
            }
        };
    decision.upstream_status = Some(200);
    let mut upstream = tunnel.stream;
    if !tunnel.early_data.is_empty() {
        if let Err(e) = client.write_all(&tunnel.early_data).await {
            decision.error = Some(format!("writing to client: {e}"));
            reset(client);
            return;
        }
        decision.bytes_down += tunnel.early_data.len() as u64;
    }
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => {
            decision.bytes_up += up;
            decision.bytes_down += down;
        }
        Err(e) => {
            // One side reset or failed: pass the abort on to both rather than a clean close.
            decision.error = Some(format!("relay: {e}"));
            reset(client);
            reset(upstream);
        }
    }
}

fn connect_target(original: SocketAddrV4) -> String {
    original.to_string()
}

/// Closes with RST (SO_LINGER 0), so the client sees a reset rather than an orderly end of
/// stream it could mistake for a complete answer.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
