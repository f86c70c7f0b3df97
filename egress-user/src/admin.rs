//! The admin listener (default 127.0.0.1:9478): `/health` and `/metrics`.
//!
//! `/health` is 200 when every configured cgroup still has egress's programs attached and every
//! configured upstream proxy answers (TCP, and TLS for https:// proxies), 503 with the reason
//! otherwise. Upstream probes are cached for a few seconds so frequent checks cost nothing.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::agent::{Agent, Routing};

const PROBE_CACHE: Duration = Duration::from_secs(5);
/// Admin connections served at once; one more is closed at once (nothing queues behind idle
/// connections). Each must send its request head within [`HEADER_TIMEOUT`], and may stay idle
/// no longer: a local user cannot hold the agent's descriptors with idle connections, and the
/// endpoint answers again seconds after a flood stops.
const MAX_CONNECTIONS: usize = 32;
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The last upstream probe: when, for which configuration (a reload makes it stale), and what
/// it found.
#[derive(Default)]
struct HealthCache {
    last: Mutex<Option<Probe>>,
}

/// How long /health waits for each proxy.
const PROBE_DEADLINE: Duration = Duration::from_secs(3);

struct Probe {
    at: Instant,
    of: Weak<Routing>,
    result: Result<String, String>,
}

pub async fn serve(listener: TcpListener, agent: Arc<Agent>) {
    let health = Arc::new(HealthCache::default());
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let agent = agent.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let agent = agent.clone();
                let health = health.clone();
                async move { Ok::<_, Infallible>(route(&agent, &health, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

async fn route(agent: &Agent, cache: &HealthCache, request: Request<Incoming>) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/health" => match health(agent, cache).await {
            Ok(summary) => text(StatusCode::OK, format!("ok: {summary}\n")),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {reason}\n")),
        },
        "/metrics" => {
            let kernel = agent.kernel.counters().unwrap_or_default();
            let proxies: Vec<crate::metrics::ProxyState> = proxy_states(&agent.routing())
                .into_iter()
                .map(|s| crate::metrics::ProxyState {
                    proxy: s.proxy,
                    up: s.up,
                    failovers: s.failovers,
                })
                .collect();
            let mut response = text(StatusCode::OK, agent.metrics.encode(&kernel, &proxies));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/dns" => dns(agent, request.uri().query().unwrap_or("")).await,
        "/proxies" => {
            let states = proxy_states(&agent.routing());
            text(StatusCode::OK, format!("{}\n", serde_json::json!(states)))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /health, /metrics, /dns or /proxies\n".into(),
        ),
    }
}

/// `/dns?address=IP&port=PORT&name=NAME` (all optional): what the DNS record knows, as JSON:
/// the plan's view for the agent's own namespace (`resolved`, given an address; with the
/// agent's own lookup of SRV targets, as a connection would get) and a report over all.
async fn dns(agent: &Agent, query: &str) -> Response<Full<Bytes>> {
    let mut address = None;
    let mut port = 443;
    let mut name = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("address", value)) => match value.parse::<std::net::IpAddr>() {
                Ok(ip) => address = Some(ip),
                Err(_) => return text(StatusCode::BAD_REQUEST, "address: not an IP address\n".into()),
            },
            Some(("port", value)) => match value.parse::<u16>() {
                Ok(p) => port = p,
                Err(_) => return text(StatusCode::BAD_REQUEST, "port: not a port number\n".into()),
            },
            Some(("name", value)) if crate::hostport::valid_hostname(value) => name = Some(value),
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "expected address=IP, port=PORT and/or name=HOSTNAME\n".into(),
                );
            }
        }
    }
    let own = agent.kernel.own_netns();
    let mut resolved = address.map(|ip| agent.names.resolved(own, ip, port, name));
    if let (Some(resolved), Some(ip)) = (resolved.as_mut(), address)
        && resolved.needs_lookup()
    {
        agent
            .names
            .admin_lookups
            .narrow(own, &crate::dns::lookup::View::System, resolved, name, ip)
            .await;
    }
    let mut report = String::new();
    if let Some(synthetic) = &agent.names.synthetic
        && let Some(ip) = address.filter(|ip| synthetic.contains(*ip))
    {
        let named = synthetic
            .name_of(ip)
            .unwrap_or_else(|| "nothing (not handed out)".to_owned());
        report.push_str(&format!("synthetic address {ip} stands for {named}\n"));
    }
    report.push_str(&agent.names.record.report(address, name));
    let body = serde_json::json!({
        "resolved": resolved,
        "report": report,
    });
    text(StatusCode::OK, format!("{body}\n"))
}

/// Each upstream proxy once, as the data path knows it (up, or down since when and why).
fn proxy_states(routing: &Routing) -> Vec<crate::upstream::group::MemberState> {
    let mut seen = std::collections::HashSet::new();
    routing
        .proxies()
        .iter()
        .flat_map(|list| list.states())
        .filter(|state| seen.insert(state.proxy.clone()))
        .collect()
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn health(agent: &Agent, cache: &HealthCache) -> Result<String, String> {
    let routing = agent.routing();
    let settings = &routing.settings;
    let kernel = &agent.kernel;
    if !kernel.pins_present() {
        return Err(format!(
            "pins under {} are gone (bpffs unmounted?): interception lasts only while this agent runs",
            settings.pins.bpffs_dir.display()
        ));
    }
    for cgroup in &settings.targets.cgroups {
        if !kernel.is_attached(cgroup) {
            return Err(format!("not attached to cgroup {}", cgroup.display()));
        }
    }
    let upstream = upstream_reachable(&routing, cache).await?;
    Ok(format!(
        "attached to {} cgroup(s); {upstream}",
        settings.targets.cgroups.len(),
    ))
}

async fn upstream_reachable(current: &Arc<Routing>, cache: &HealthCache) -> Result<String, String> {
    if let Some(probe) = &*cache.last.lock().unwrap_or_else(|e| e.into_inner())
        && probe.at.elapsed() < PROBE_CACHE
        && Weak::ptr_eq(&probe.of, &Arc::downgrade(current))
    {
        return probe.result.clone();
    }
    // Healthy while every list has a proxy that answers; the others are named.
    // Each proxy once, all at once, each within PROBE_DEADLINE.
    let mut clients = Vec::new();
    for list in current.proxies().iter() {
        for member in list.members() {
            if !clients
                .iter()
                .any(|c: &&crate::upstream::ProxyClient| c.url == member.client.url)
            {
                clients.push(&member.client);
            }
        }
    }
    let answers = futures_util::future::join_all(clients.iter().map(|client| async move {
        match tokio::time::timeout(PROBE_DEADLINE, client.dial()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {}s", PROBE_DEADLINE.as_secs())),
        }
    }))
    .await;
    let mut reachable = Vec::new();
    let mut unreachable = Vec::new();
    for (client, answer) in clients.iter().zip(&answers) {
        match answer {
            Ok(()) => reachable.push(client.url.to_string()),
            Err(e) => unreachable.push(format!("{} ({e})", client.url)),
        }
    }
    let answered = |url: &crate::config::proxy_url::ProxyUrl| {
        clients
            .iter()
            .zip(&answers)
            .any(|(client, answer)| client.url == *url && answer.is_ok())
    };
    let lists_down: Vec<String> = current
        .proxies()
        .iter()
        .filter(|list| !list.members().iter().any(|m| answered(&m.client.url)))
        .map(|list| list.authorities())
        .collect();
    let summary = match (reachable.is_empty(), unreachable.is_empty()) {
        (true, true) => "upstream: none configured (direct)".to_owned(),
        (_, true) => format!("upstream reachable: {}", reachable.join(", ")),
        (_, false) => format!(
            "upstream reachable: {}; unreachable: {}",
            if reachable.is_empty() {
                "none".to_owned()
            } else {
                reachable.join(", ")
            },
            unreachable.join(", ")
        ),
    };
    let result = if lists_down.is_empty() {
        Ok(summary)
    } else {
        Err(format!(
            "no proxy of {} answers; {summary}",
            lists_down.join(" / ")
        ))
    };
    *cache.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Probe {
        at: Instant::now(),
        of: Arc::downgrade(current),
        result: result.clone(),
    });
    result
}
