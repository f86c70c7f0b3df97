//! Accepts the connections the kernel redirected, recovers where they were going, learns the
//! name the client asked for from its first bytes, plans the route, and carries it out: deny,
//! direct, CONNECT through https_proxy, or forward through http_proxy. Any failure resets the
//! client: nothing goes direct unless the plan said direct.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    time::Instant,
};

use super::{
    decision::Decision,
    dns_tcp,
    forward::{self, Forward},
    relay::{self, reset},
    sniff::{self, Sniff},
};
use crate::{
    agent::Agent,
    dns::lookup::{ClientFile, View, nameservers},
    route::{
        plan::{Action, Plan, Protocol, Resolved, Sniffed, plan},
        policy::RuleKind,
    },
    upstream::{self, Role, UpstreamStream, group::ProxyGroup},
    workloads::{ClientNetns, MAX_ROOT_FILE, RootFile},
};

/// Serves the listener of the namespace `netns`.
pub async fn serve(listener: TcpListener, agent: Arc<Agent>, netns: ClientNetns) -> std::io::Result<()> {
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
            // Logs and counts when dropped: also if this task panics or is cancelled.
            let mut decision = Decision::open(agent.metrics.clone(), id, peer);
            decision.netns = netns.id;
            handle(&agent, client, netns, &mut decision).await;
            decision.finish();
        });
    }
}

async fn handle(agent: &Agent, mut client: TcpStream, netns: ClientNetns, decision: &mut Decision) {
    let routing = agent.routing();
    let settings = &routing.settings;
    let Some(original) = agent.kernel.take_original_dst(&client) else {
        decision.fail("connection was not redirected by egress (no original destination)");
        return reset(client);
    };
    decision.original_dst = Some(original);

    let (first_bytes, sniffed) = match read_first_bytes(&mut client, settings.peek_timeout.get()).await {
        Ok(read) => read,
        Err(e) => return decision.fail(format!("reading from client: {e}")),
    };
    decision.protocol = Some(sniffed.protocol());
    decision.name = sniffed.name().map(str::to_owned);

    let mut resolved = agent
        .names
        .resolved(netns.cookie, original.ip(), original.port(), sniffed.name());
    if resolved.needs_lookup() && sniffed.protocol() != Protocol::Http {
        look_up_srv_targets(
            agent,
            &netns,
            &mut resolved,
            sniffed.name(),
            original.ip(),
            decision,
        )
        .await;
    }
    // A truncated answer's retry over TCP goes direct only to a resolver the client is
    // configured with.
    if resolved.resolver {
        let configured = client_file(agent, &netns, ClientFile::ResolvConf)
            .await
            .is_some_and(|text| nameservers(&text).contains(&original.ip().to_canonical()));
        resolved.resolver = configured;
    }
    let Plan {
        action,
        rule,
        name,
        named_by,
    } = plan(&routing.rules(), routing.proxies(), original, &sniffed, &resolved);
    let dns_over_tcp = rule.kind == RuleKind::Resolver;
    decision.resolved_name = resolved.dialled_name;
    decision.named_by = Some(named_by);
    decision.route_name = name;
    decision.planned(&action, rule, ProxyGroup::authorities);
    match action {
        Action::Deny => reset(client),
        Action::Direct { to } => {
            let started = Instant::now();
            let timeout = settings.connect_timeout.get();
            match connect_direct(agent, netns, to, settings.agent_mark.0, timeout).await {
                Ok(stream) if dns_over_tcp => {
                    let observer = dns_tcp::Observer {
                        watch: &agent.names.record,
                        netns: netns.cookie,
                        resolver: to.ip(),
                        connection: (1 << 63) | decision.id,
                    };
                    dns_tcp::relay(client, stream, first_bytes, observer, decision).await
                }
                Ok(stream) => {
                    agent.metrics.upstream_latency(started.elapsed());
                    relay::relay(
                        client,
                        UpstreamStream::Plain(stream),
                        first_bytes.freeze(),
                        Bytes::new(),
                        decision,
                        || {},
                    )
                    .await
                }
                Err(e) => {
                    decision.fail(e);
                    reset(client);
                }
            }
        }
        Action::Forward { proxy, authority } => {
            let forward = Forward {
                proxy: proxy.clone(),
                authority,
                approved_host: sniffed.name().map(str::to_owned),
            };
            let header_timeout = settings.request_header_timeout.get();
            Box::pin(forward::serve(
                client,
                first_bytes.freeze(),
                forward,
                header_timeout,
                decision,
            ))
            .await;
        }
        Action::Connect { proxy, target } => {
            let ahead = client_hello_record(&first_bytes, &sniffed);
            tunnel(
                agent,
                proxy,
                &target,
                client,
                first_bytes.freeze(),
                ahead,
                decision,
            )
            .await;
        }
    }
}

/// Looks up the SRV targets of a delegated connection (and the client's name itself) in the
/// client's view: its hosts file, for a container; the system resolver, for the host.
async fn look_up_srv_targets(
    agent: &Agent,
    netns: &ClientNetns,
    resolved: &mut Resolved,
    sni: Option<&str>,
    address: IpAddr,
    decision: &mut Decision,
) {
    let started = Instant::now();
    let hosts_file = match netns.id {
        None => None,
        Some(_) => match client_file(agent, netns, ClientFile::Hosts).await {
            Some(text) => Some(text),
            None => {
                decision.lookup = Some("failed");
                return;
            }
        },
    };
    let view = match &hosts_file {
        None => View::System,
        Some(text) => View::HostsFile(text),
    };
    let looked = agent
        .names
        .lookups
        .narrow(netns.cookie, &view, resolved, sni, address)
        .await;
    decision.lookup = Some(looked.as_str());
    decision.lookup_us = Some(started.elapsed().as_micros() as u64);
}

/// A client's hosts file or resolv.conf as it sees it (cached): the host's own for the agent's
/// namespace, a container's read inside its root by the namespace helper. None if unreadable.
async fn client_file(agent: &Agent, netns: &ClientNetns, file: ClientFile) -> Option<Arc<str>> {
    let lookups = &agent.names.lookups;
    if let Some(cached) = lookups.cached_file(netns.cookie, file) {
        return cached;
    }
    let read = match netns.id {
        None => {
            let path = match file {
                ClientFile::Hosts => "/etc/hosts",
                ClientFile::ResolvConf => "/etc/resolv.conf",
            };
            std::fs::read_to_string(path)
                .map_err(anyhow::Error::from)
                .and_then(|text| {
                    if text.len() > MAX_ROOT_FILE {
                        anyhow::bail!("{path} is longer than {MAX_ROOT_FILE} bytes");
                    }
                    Ok(text)
                })
        }
        Some(id) => {
            let which = match file {
                ClientFile::Hosts => RootFile::Hosts,
                ClientFile::ResolvConf => RootFile::ResolvConf,
            };
            agent.workloads.root_file(id, which).await
        }
    };
    if let Err(e) = &read {
        tracing::debug!("{e:#}");
    }
    let text = read.ok().map(Arc::from);
    lookups.keep_file(netns.cookie, file, text.clone());
    text
}

/// A direct connection leaves from the client's own network namespace, so that it is routed and
/// addressed as the application expects (a database container on the same bridge network).
async fn connect_direct(
    agent: &Agent,
    netns: ClientNetns,
    to: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let Some(id) = netns.id else {
        return upstream::connect_marked(Role::Destination, to, mark, timeout)
            .await
            .map_err(|e| e.to_string());
    };
    agent
        .workloads
        .connect(id, to, timeout)
        .await
        .map_err(|e| format!("{e:#}"))
}

/// The length of the client's ClientHello record, when its first bytes start with one complete
/// record holding exactly one ClientHello that named a server (so the sniffer parsed it whole):
/// the only bytes that may go out ahead of a proxy's answer (optimistic CONNECT). Sending them
/// again, to the next proxy of a list, is harmless; what follows them (0-RTT data) waits for the
/// 200. None for anything else.
fn client_hello_record(first_bytes: &[u8], sniffed: &Sniffed) -> Option<usize> {
    let Sniffed::Tls { sni: Some(_) } = sniffed else {
        return None;
    };
    let header = first_bytes.get(..9)?;
    let record = 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
    let hello = 4 + u32::from_be_bytes([0, header[6], header[7], header[8]]) as usize;
    let one_hello = header[0] == 0x16 && header[5] == 0x01 && hello == record - 5;
    (one_hello && first_bytes.len() >= record).then_some(record)
}

/// CONNECT through the proxy list, then relay. `ahead`: how many of the client's first bytes
/// may go out with the CONNECT (see upstream's optimistic CONNECT).
async fn tunnel(
    agent: &Agent,
    proxy: &ProxyGroup,
    target: &str,
    client: TcpStream,
    mut first_bytes: Bytes,
    ahead: Option<usize>,
    decision: &mut Decision,
) {
    let started = Instant::now();
    let offered = ahead.map_or_else(Bytes::new, |n| first_bytes.slice(..n));
    // Boxed: the handshake's state is large and must not size the connection's future for its
    // whole life (thousands of idle tunnels).
    match Box::pin(proxy.open_tunnel(target, &offered)).await {
        Ok((tunnel, member)) => {
            decision.upstream = Some(member.client.url.authority());
            decision.upstream_auth = Some(member.client.auth.as_str());
            agent.metrics.upstream_latency(started.elapsed());
            agent.metrics.upstream_connection(tunnel.warm);
            decision.upstream_warm = Some(tunnel.warm);
            decision.upstream_status = Some(200);
            decision.optimistic = Some(tunnel.first_bytes_sent);
            if tunnel.first_bytes_sent {
                decision.bytes_up += offered.len() as u64;
                let _ = first_bytes.split_to(offered.len());
            }
            let to_upstream = first_bytes;
            // The pool is refilled once the origin answered: its dials then stay out of the
            // way of this connection's own round trips.
            let client_of_proxy = member.client.clone();
            let refill = move || client_of_proxy.top_up();
            relay::relay(
                client,
                tunnel.stream,
                to_upstream,
                tunnel.early_data,
                decision,
                refill,
            )
            .await;
        }
        Err(e) => {
            decision.upstream_status = e.status();
            decision.fail(e);
            reset(client);
        }
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

    /// Only one whole ClientHello record that named a server goes ahead of a proxy's answer,
    /// and nothing behind it.
    #[test]
    fn only_a_whole_client_hello_record_may_go_ahead() {
        let sni = || Sniffed::Tls {
            sni: Some("origin.test".into()),
        };
        // A record of 9 bytes of body: a ClientHello of 5 bytes after its 4-byte header.
        let hello = [0x16, 3, 1, 0, 9, 1, 0, 0, 5, 3, 3, 0, 0, 0];
        let with_more = [&hello[..], b"0-RTT data"].concat();
        let cases: Vec<(&[u8], Sniffed, Option<usize>)> = vec![
            (&hello, sni(), Some(14)),
            (&with_more, sni(), Some(14)),
            (&hello, Sniffed::Tls { sni: None }, None),
            (&hello[..13], sni(), None),
            // Not a handshake record; not a ClientHello; a record with more than the hello.
            (&[0x17, 3, 1, 0, 9, 1, 0, 0, 5, 3, 3, 0, 0, 0], sni(), None),
            (&[0x16, 3, 1, 0, 9, 2, 0, 0, 5, 3, 3, 0, 0, 0], sni(), None),
            (&[0x16, 3, 1, 0, 9, 1, 0, 0, 4, 3, 3, 0, 0, 0], sni(), None),
            (b"GET / HTTP/1.1\r\n\r\n", Sniffed::Other, None),
            (&hello, Sniffed::Other, None),
        ];
        for (bytes, sniffed, expected) in cases {
            assert_eq!(
                client_hello_record(bytes, &sniffed),
                expected,
                "{bytes:?} {sniffed:?}"
            );
        }
    }
}
