//! Plain HTTP through the upstream proxy, as a real forward proxy client would send it: each
//! request rewritten to absolute form (`GET http://host/path`), `Proxy-Authorization` on every
//! request (Basic) or on the first of each connection to the proxy (Negotiate: the proxy
//! authenticates the connection), keep-alive on both sides. hyper speaks HTTP/1 to the client and
//! to the proxy. The proxy is the first of its list that can be reached.

use std::{
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{Either, Full};
use hyper::{body::Incoming, client::conn::http1::SendRequest, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{
    decision::Decision,
    relay::{ByteCounts, PrefixedIo},
};
use crate::upstream::{ProxyAuth, ProxyClient, UpstreamError, group::ProxyGroup};

/// Where and how one client connection's requests are forwarded.
pub struct Forward {
    pub proxy: ProxyGroup,
    /// Authority for the absolute-form URI: the client's host (port added when not 80), or the
    /// original IP:port when connecting by IP.
    pub authority: String,
    /// The host the policy approved; a kept-alive connection may not switch to another.
    pub approved_host: Option<String>,
}

struct State {
    forward: Forward,
    upstream: tokio::sync::Mutex<Option<Upstream>>,
    /// The proxy that carried the requests, and how egress authenticated to it.
    used: Mutex<Option<(String, &'static str)>>,
    requests: AtomicU64,
    last_status: AtomicU16,
    failure: Mutex<Option<String>>,
    client_fd: RawFd,
}

pub async fn serve(
    client: TcpStream,
    sniffed: Bytes,
    forward: Forward,
    header_timeout: Duration,
    decision: &mut Decision,
) {
    let state = Arc::new(State {
        forward,
        upstream: tokio::sync::Mutex::new(None),
        used: Mutex::new(None),
        requests: AtomicU64::new(0),
        last_status: AtomicU16::new(0),
        failure: Mutex::new(None),
        client_fd: client.as_raw_fd(),
    });
    let counts = Arc::new(ByteCounts::default());
    let io = TokioIo::new(PrefixedIo::new(sniffed, client, counts.clone()));
    let service_state = state.clone();
    let service = service_fn(move |request| {
        let state = service_state.clone();
        async move { state.forward_one(request).await }
    });
    // Without a timer hyper has no header timeout: an idle client would hold its connection
    // (and two descriptors) for ever.
    let served = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(io, service)
        .await;

    decision.requests = state.requests.load(Ordering::Relaxed);
    if let Some((proxy, auth)) = state.used.lock().unwrap_or_else(|e| e.into_inner()).take() {
        decision.upstream = Some(proxy);
        decision.upstream_auth = Some(auth);
    }
    decision.bytes_up = counts.read.load(Ordering::Relaxed);
    decision.bytes_down = counts.written.load(Ordering::Relaxed);
    let status = state.last_status.load(Ordering::Relaxed);
    decision.upstream_status = (status != 0).then_some(status);
    if let Some(failure) = state.failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
        decision.fail(failure);
    } else if let Err(e) = served {
        decision.fail(format!("client connection: {e}"));
    }
}

/// What the client gets back: the proxy's answer, or egress's own refusal.
type Body = Either<Incoming, Full<Bytes>>;

/// Methods egress never forwards, answered 405 without contacting the proxy: a proxy that
/// echoes TRACE (or TRACK) would hand back the `Proxy-Authorization` egress added, and CONNECT
/// inside a forwarded connection would open a tunnel past the plan made for this one. Methods
/// are case-sensitive, but proxies are lenient (squid takes `trace` as TRACE): any method with a
/// lower-case letter is refused too.
fn refuse_method(method: &Method) -> Option<Response<Body>> {
    let name = method.as_str();
    let refused = ["TRACE", "TRACK", "CONNECT"]
        .iter()
        .any(|m| name.eq_ignore_ascii_case(m))
        || name.bytes().any(|b| b.is_ascii_lowercase());
    if !refused {
        return None;
    }
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "egress does not forward {method} requests\n"
    )))));
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    let headers = response.headers_mut();
    headers.insert(
        header::ALLOW,
        HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
    );
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Some(response)
}

impl State {
    async fn forward_one(&self, request: Request<Incoming>) -> Result<Response<Body>, UpstreamError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(refused) = refuse_method(request.method()) {
            self.last_status
                .store(refused.status().as_u16(), Ordering::Relaxed);
            return Ok(refused);
        }
        let result = self.try_forward(request).await.map(|r| r.map(Either::Left));
        if let Err(e) = &result {
            self.abort_client(e.to_string());
        }
        result
    }

    async fn try_forward(&self, mut request: Request<Incoming>) -> Result<Response<Incoming>, UpstreamError> {
        if let Some(approved) = &self.forward.approved_host {
            let host = request_host(&request);
            if host.as_deref() != Some(approved.as_str()) {
                return Err(UpstreamError::Protocol(format!(
                    "request for host {} on a connection approved for {approved}",
                    host.as_deref().unwrap_or("(none)")
                )));
            }
        }
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        *request.uri_mut() = Uri::try_from(format!("http://{}{path}", self.forward.authority))
            .map_err(|e| UpstreamError::Protocol(format!("building absolute URI: {e}")))?;
        let headers = request.headers_mut();
        headers.remove(header::PROXY_AUTHORIZATION);
        headers.remove("proxy-connection");

        let mut upstream = self.upstream.lock().await;
        if upstream.as_ref().is_none_or(|u| u.sender.is_closed()) {
            *upstream = Some(self.connect().await?);
        }
        let upstream = upstream.as_mut().expect("connected above");
        if let Some(auth) = upstream.authorization() {
            request.headers_mut().insert(header::PROXY_AUTHORIZATION, auth);
        }
        let response = upstream
            .sender
            .send_request(request)
            .await
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        self.last_status
            .store(response.status().as_u16(), Ordering::Relaxed);
        // 407 is the proxy refusing egress's credentials, not an answer from the origin.
        if response.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            return Err(upstream
                .client
                .refused_ticket(UpstreamError::Status(response.status())));
        }
        // The proxy works: keep connections to it ready (not after its own errors, so that a
        // failing proxy is not dialled more often than clients ask).
        if !response.status().is_server_error() {
            upstream.client.top_up();
        }
        Ok(response)
    }

    /// A connection to the first proxy of the list that can be reached, and its credentials.
    async fn connect(&self) -> Result<Upstream, UpstreamError> {
        let (stream, _warm, member) = self.forward.proxy.connect().await?;
        let client = member.client.clone();
        let authorization = client.authorization().await?.and_then(|value| {
            let mut value = HeaderValue::from_str(&value).ok()?;
            value.set_sensitive(true);
            Some(value)
        });
        let (sender, conn) = hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        tokio::spawn(conn);
        *self.used.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((client.url.authority(), client.auth.as_str()));
        Ok(Upstream {
            sender,
            authorization,
            sent: false,
            client,
        })
    }

    /// Records why, and makes the coming close of the client connection a reset.
    fn abort_client(&self, why: String) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        // SAFETY: hyper owns the client stream and is still serving it while a request is
        // in flight, so the fd is open; we only set a socket option on it.
        let fd = unsafe { BorrowedFd::borrow_raw(self.client_fd) };
        let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
    }
}

/// The connection to the proxy the requests go down.
struct Upstream {
    sender: SendRequest<Incoming>,
    authorization: Option<HeaderValue>,
    /// Whether a request went down it already (a Negotiate token is for the first one only).
    sent: bool,
    client: ProxyClient,
}

impl Upstream {
    /// `Proxy-Authorization` for the next request on this connection.
    fn authorization(&mut self) -> Option<HeaderValue> {
        let first = !self.sent;
        self.sent = true;
        match self.client.auth {
            ProxyAuth::Negotiate if !first => None,
            _ => self.authorization.clone(),
        }
    }
}

/// The request's Host header, lowercased, without port.
fn request_host<B>(request: &Request<B>) -> Option<String> {
    let value = request.headers().get(header::HOST)?.to_str().ok()?;
    let authority: http::uri::Authority = value.parse().ok()?;
    Some(
        authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_track_and_connect_are_refused_and_the_rest_forwarded() {
        for method in ["TRACE", "TRACK", "CONNECT", "trace", "Track", "connect", "get"] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let refused = refuse_method(&method).unwrap_or_else(|| panic!("{method} forwarded"));
            assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED);
            assert!(refused.headers().contains_key(header::ALLOW));
        }
        for method in [
            "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND",
        ] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            assert!(refuse_method(&method).is_none(), "{method} refused");
        }
    }

    #[test]
    fn request_host_is_lowercased_without_port() {
        let req = |host: &str| Request::builder().header(header::HOST, host).body(()).unwrap();
        assert_eq!(
            request_host(&req("Origin.Test:8080")).as_deref(),
            Some("origin.test")
        );
        assert_eq!(
            request_host(&req("[2001:DB8::1]:80")).as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(request_host(&Request::new(())), None);
    }
}
