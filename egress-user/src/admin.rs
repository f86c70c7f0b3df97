//! The admin listener (default 127.0.0.1:9478): `/health` and `/metrics`.
//!
//! `/health` is 200 when every configured cgroup still has egress's programs attached and every
//! configured upstream proxy answers (TCP, and TLS for https:// proxies), 503 with the reason
//! otherwise. Upstream probes are cached for a few seconds so frequent checks cost nothing.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::agent::Agent;

const PROBE_CACHE: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct HealthCache {
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl HealthCache {
    /// Drops the cached probe (the proxies changed).
    pub fn forget(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

pub async fn serve(listener: TcpListener, agent: Arc<Agent>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let agent = agent.clone();
                async move { Ok::<_, Infallible>(route(&agent, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn route(agent: &Agent, request: Request<Incoming>) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/health" => match health(agent).await {
            Ok(summary) => text(StatusCode::OK, format!("ok: {summary}\n")),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {reason}\n")),
        },
        "/metrics" => {
            let kernel = agent.kernel.counters().unwrap_or_default();
            let mut response = text(StatusCode::OK, agent.metrics.encode(&kernel));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /health or /metrics\n".into(),
        ),
    }
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

async fn health(agent: &Agent) -> Result<String, String> {
    let current = agent.current();
    let config = &current.config;
    if !agent.kernel.pins_present() {
        return Err(format!(
            "pins under {} are gone (bpffs unmounted?): interception lasts only while this agent runs",
            config.pin_dir.display()
        ));
    }
    for cgroup in &config.cgroups {
        if !agent.kernel.is_attached(cgroup) {
            return Err(format!("not attached to cgroup {}", cgroup.display()));
        }
    }
    upstream_reachable(agent).await?;
    let proxies: Vec<String> = current.proxies().map(|p| p.url.to_string()).collect();
    Ok(format!(
        "attached to {} cgroup(s); upstream reachable: {}",
        config.cgroups.len(),
        if proxies.is_empty() {
            "none configured (direct)".to_owned()
        } else {
            proxies.join(", ")
        }
    ))
}

async fn upstream_reachable(agent: &Agent) -> Result<(), String> {
    if let Some((at, result)) = agent
        .health
        .last
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        && at.elapsed() < PROBE_CACHE
    {
        return result;
    }
    let mut result = Ok(());
    for proxy in agent.current().proxies() {
        if let Err(e) = proxy.connect().await {
            result = Err(format!("upstream proxy {} unreachable: {e}", proxy.url));
            break;
        }
    }
    *agent.health.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), result.clone()));
    result
}
