//! Accepts the connections the kernel redirected, recovers where they were going, learns the
//! name the client asked for from its first bytes, decides by policy, and routes: deny, direct,
//! CONNECT through https_proxy, or forward through http_proxy. Any failure resets the client:
//! nothing goes direct unless the policy said direct.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    time::Instant,
};

use crate::{
    agent::Agent,
    config::DefaultRoute,
    decision::{Decision, Route},
    forward::{self, Forward},
    policy::{Protocol, Route as Verdict, Target},
    relay::{self, reset},
    sniff::{self, Sniff, Sniffed},
    upstream::{self, ProxyClient, Role, UpstreamStream},
};

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
        // A relay must not add Nagle delays: the application already chose when to send.
        let _ = client.set_nodelay(true);
        let agent = agent.clone();
        tokio::spawn(async move {
            let id = agent.next_id.fetch_add(1, Ordering::Relaxed);
            let mut decision = Decision::new(id, peer);
            agent.metrics.connection_opened();
            handle(&agent, client, peer, &mut decision).await;
            decision.log();
            agent.metrics.connection_closed(&decision);
        });
    }
}

async fn handle(agent: &Agent, mut client: TcpStream, peer: SocketAddr, decision: &mut Decision) {
    let current = agent.current();
    let config = &current.config;
    let Some(original) = agent.kernel.take_original_dst(peer) else {
        decision.fail("connection was not redirected by egress (no original destination)");
        return reset(client);
    };
    decision.original_dst = Some(original);

    let (first_bytes, sniffed) = match read_first_bytes(&mut client, config.peek_timeout).await {
        Ok(read) => read,
        Err(e) => return decision.fail(format!("reading from client: {e}")),
    };
    let (protocol, name) = match sniffed {
        Sniffed::Tls { sni } => (Protocol::Tls, sni),
        Sniffed::Http { host, .. } => (Protocol::Http, host),
        Sniffed::Other => (Protocol::Unknown, None),
    };
    decision.protocol = match protocol {
        Protocol::Tls => "tls",
        Protocol::Http => "http",
        Protocol::Unknown => "unknown",
    };
    decision.name = name.clone();

    let proxy = match (protocol, config.default_route) {
        (Protocol::Http, _) => current.http_proxy.as_ref(),
        (Protocol::Tls, _) | (Protocol::Unknown, DefaultRoute::Proxy) => current.https_proxy.as_ref(),
        (Protocol::Unknown, DefaultRoute::Direct) => None,
        (Protocol::Unknown, DefaultRoute::Deny) => {
            decision.route = Route::Deny;
            decision.rule = "default_route deny (neither TLS nor HTTP)".into();
            return reset(client);
        }
    };
    let target = Target {
        ip: original.ip(),
        port: original.port(),
        host: name.as_deref(),
        protocol,
    };
    let verdict = config.policy.decide(&target, proxy.is_some());
    decision.rule = verdict.rule;
    match (verdict.route, proxy) {
        (Verdict::Deny, _) => {
            decision.route = Route::Deny;
            reset(client);
        }
        (Verdict::Direct, _) | (Verdict::Proxy, None) => {
            decision.route = Route::Direct;
            decision.target = Some(original.to_string());
            let started = Instant::now();
            match upstream::connect_marked(
                Role::Destination,
                original,
                config.agent_mark,
                config.timeouts.connect,
            )
            .await
            {
                Ok(stream) => {
                    agent.metrics.upstream_latency(started.elapsed());
                    relay::relay(
                        client,
                        UpstreamStream::Plain(stream),
                        first_bytes.freeze(),
                        Bytes::new(),
                        decision,
                    )
                    .await
                }
                Err(e) => {
                    decision.fail(e);
                    reset(client);
                }
            }
        }
        (Verdict::Proxy, Some(proxy)) if protocol == Protocol::Http => {
            decision.route = Route::ProxyForward;
            decision.upstream = Some(proxy.url.authority());
            let host = target.host.filter(|_| !config.connect_by_ip);
            let authority = forward::absolute_authority(
                &host.map_or_else(|| original.ip().to_string(), str::to_owned),
                original.port(),
            );
            decision.target = Some(authority.clone());
            let forward = Forward {
                proxy: proxy.clone(),
                authority,
                approved_host: target.host.map(str::to_owned),
            };
            Box::pin(forward::serve(client, first_bytes.freeze(), forward, decision)).await;
        }
        (Verdict::Proxy, Some(proxy)) => {
            decision.route = Route::ProxyConnect;
            decision.upstream = Some(proxy.url.authority());
            let connect_target = connect_target(&target, config.connect_by_ip);
            decision.target = Some(connect_target.clone());
            tunnel(
                agent,
                proxy,
                &connect_target,
                client,
                first_bytes.freeze(),
                decision,
            )
            .await;
        }
    }
}

async fn tunnel(
    agent: &Agent,
    proxy: &ProxyClient,
    target: &str,
    client: TcpStream,
    first_bytes: Bytes,
    decision: &mut Decision,
) {
    let started = Instant::now();
    // Boxed: the handshake's state is large and must not size the connection's future for its
    // whole life (thousands of idle tunnels).
    match Box::pin(proxy.open_tunnel(target)).await {
        Ok(tunnel) => {
            agent.metrics.upstream_latency(started.elapsed());
            decision.upstream_status = Some(200);
            relay::relay(client, tunnel.stream, first_bytes, tunnel.early_data, decision).await;
        }
        Err(e) => {
            decision.upstream_status = e.status();
            decision.fail(e);
            reset(client);
        }
    }
}

/// `host:port` for CONNECT: the client's name (SNI) when known, else the IP (IPv6 bracketed).
pub fn connect_target(target: &Target, by_ip: bool) -> String {
    match target.host {
        Some(host) if !by_ip && host.contains(':') => format!("[{host}]:{}", target.port),
        Some(host) if !by_ip => format!("{host}:{}", target.port),
        _ => SocketAddr::new(target.ip, target.port).to_string(),
    }
}

/// Reads until the first bytes say what they are (ClientHello, request head), the peek window
/// closes, the client stops sending, or the sniff limit is reached.
async fn read_first_bytes(client: &mut TcpStream, window: Duration) -> std::io::Result<(BytesMut, Sniffed)> {
    let mut buf = BytesMut::with_capacity(4096);
    let deadline = Instant::now() + window;
    loop {
        if let Sniff::Done(sniffed) = sniff::sniff(&buf) {
            return Ok((buf, sniffed));
        }
        match tokio::time::timeout_at(deadline, client.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => {
                // Silence or end of stream: a partial ClientHello is still TLS, anything else
                // (including nothing at all: server-speaks-first) is unknown.
                let sniffed = if buf.first() == Some(&0x16) {
                    Sniffed::Tls { sni: None }
                } else {
                    Sniffed::Other
                };
                return Ok((buf, sniffed));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn connect_target_prefers_the_name_unless_by_ip() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let t = |ip, host| Target {
            ip,
            port: 8448,
            host,
            protocol: Protocol::Tls,
        };
        assert_eq!(
            connect_target(&t(v4, Some("matrix.example")), false),
            "matrix.example:8448"
        );
        assert_eq!(
            connect_target(&t(v4, Some("matrix.example")), true),
            "10.1.2.3:8448"
        );
        assert_eq!(connect_target(&t(v4, None), false), "10.1.2.3:8448");
        assert_eq!(connect_target(&t(v6, None), false), "[2001:db8::1]:8448");
        assert_eq!(
            connect_target(&t(v6, Some("2001:db8::2")), false),
            "[2001:db8::2]:8448"
        );
    }
}
