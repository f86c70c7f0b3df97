//! The upstream proxies: how egress reaches them (TCP, and TLS for `https://` proxies, see
//! [`tls`]), keeps connections to them ready ([`warm`]), authenticates (Basic from the URL, or
//! Kerberos: [`negotiate`]), and opens tunnels through them with `CONNECT host:port` +
//! `Proxy-Authorization` ([`connect_exchange`]); the raw stream is then handed back to the data
//! path for relaying. Proxies come in ordered lists with failover ([`group`]).
//!
//! Optimistic CONNECT: once a proxy has answered a CONNECT with 200, the next CONNECT goes out
//! in one write with the client's first bytes (its TLS ClientHello), without waiting for the
//! answer: the origin's answer then comes a round trip sooner. A proxy only forwards them once
//! it has opened the tunnel; any other answer fails the tunnel, and the client is reset.

pub mod group;
pub mod negotiate;
pub mod tls;
pub mod warm;

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{StatusCode, header};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream},
};

use crate::{
    config::{
        Settings, Timeouts,
        proxy_url::{ProxyScheme, ProxySetting, ProxyUrl},
    },
    route::plan::{Proxies, Route, Via},
};
use group::ProxyGroup;
use negotiate::NegotiateError;
use tls::{ProxyTls, ProxyTlsStream};
use warm::WarmPool;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("resolving proxy {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("connecting to {role} {addr}: {source}")]
    Connect {
        role: Role,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(String),
    #[error("TLS with proxy {host}: {source}")]
    Tls { host: String, source: io::Error },
    #[error("proxy answered {0}")]
    Status(StatusCode),
    #[error("proxy did not answer CONNECT in time")]
    HandshakeTimeout,
    #[error("CONNECT exchange with proxy failed: {0}")]
    Protocol(String),
    #[error("{0}")]
    Negotiate(#[from] NegotiateError),
    #[error("every proxy of the list failed: {0}")]
    AllFailed(String),
}

impl UpstreamError {
    /// Whether a pooled connection may have failed only because it waited too long: the
    /// proxy closed it, never answered, or answered 408 Request Timeout.
    fn went_stale(&self) -> bool {
        matches!(self, Self::Protocol(_) | Self::HandshakeTimeout)
            || self.status() == Some(StatusCode::REQUEST_TIMEOUT.as_u16())
    }

    /// Whether the proxy could not be used at all (reached, secured, asked, or authenticated
    /// to): the next one of its list may serve the connection. A proxy's own answer (403, 502)
    /// is not: it stands.
    pub fn is_proxy_failure(&self) -> bool {
        match self {
            Self::Resolve { .. } | Self::ConnectTimeout(_) | Self::Tls { .. } | Self::Protocol(_) => true,
            Self::Connect { role, .. } => *role == Role::Proxy,
            // Refused by this proxy: another may take it. Not made at all (the KDC, the keytab):
            // no other proxy would fare better.
            Self::Negotiate(e) => e.refused_by_proxy,
            // The proxy got the CONNECT and is still at it (a slow or silent destination): the
            // next proxy would wait on the same destination.
            Self::HandshakeTimeout | Self::Status(_) | Self::AllFailed(_) => false,
        }
    }

    /// The proxy's HTTP status, when it answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status(s) => Some(s.as_u16()),
            _ => None,
        }
    }
}

/// Whom a connection goes to, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Proxy,
    Destination,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Proxy => "proxy",
            Role::Destination => "destination",
        })
    }
}

/// A connection to the proxy (or a direct one): plain TCP, or TLS for `https://` proxies.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<ProxyTlsStream>),
}

impl UpstreamStream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s) => s.get_ref().0.get_ref(),
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, data),
            Self::Tls(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An established tunnel: the stream to the proxy, and any bytes the proxy sent after its
/// answer head (already belonging to the tunnelled stream).
pub struct Tunnel {
    pub stream: UpstreamStream,
    pub early_data: Bytes,
    /// Whether the connection to the proxy was taken from the warm pool.
    pub warm: bool,
    /// Whether the client's first bytes went out with the CONNECT (optimistic): then they are
    /// not to be sent again.
    pub first_bytes_sent: bool,
}

/// Opens a TCP connection marked with `mark`, so the kernel program lets it through unchanged.
/// Mark 0 means "no mark" (unit tests); the agent always runs with a non-zero mark.
pub async fn connect_marked(
    role: Role,
    addr: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> Result<TcpStream, UpstreamError> {
    let error = |source| UpstreamError::Connect { role, addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(error)?;
    if mark != 0 {
        socket2::SockRef::from(&socket).set_mark(mark).map_err(error)?;
    }
    socket.set_nodelay(true).map_err(error)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(error(source)),
        Err(_) => Err(UpstreamError::ConnectTimeout(format!("{role} {addr}"))),
    }
}

/// How egress authenticates to a proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyAuth {
    None,
    /// `Proxy-Authorization: Basic`, from the URL's user and password.
    Basic(String),
    /// Kerberos: a fresh `Negotiate` token for `HTTP/<host>` on each new connection.
    Negotiate,
}

impl ProxyAuth {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Basic(_) => "basic",
            Self::Negotiate => "negotiate",
        }
    }
}

/// One upstream proxy and how to reach it.
#[derive(Clone)]
pub struct ProxyClient {
    pub url: ProxyUrl,
    pub auth: ProxyAuth,
    /// Present exactly for `https://` proxies.
    tls: Option<ProxyTls>,
    mark: u32,
    timeouts: Timeouts,
    /// Connections kept ready, if configured.
    warm: Option<Arc<WarmPool>>,
    /// Whether the client's first bytes may go out with the CONNECT, once `proven`.
    optimistic: bool,
    /// Whether this proxy has answered a CONNECT with 200 (shared by the clones).
    proven: Arc<AtomicBool>,
}

impl ProxyClient {
    pub fn new(url: ProxyUrl, tls: Option<ProxyTls>, mark: u32, timeouts: Timeouts) -> Self {
        debug_assert_eq!(tls.is_some(), url.scheme == ProxyScheme::Https);
        let auth = match url.authorization() {
            Some(basic) => ProxyAuth::Basic(basic),
            None => ProxyAuth::None,
        };
        Self {
            url,
            auth,
            tls,
            mark,
            timeouts,
            warm: None,
            optimistic: true,
            proven: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether the client's first bytes may go out with the CONNECT once this proxy has
    /// answered one with 200 (`no_optimistic_connect` says no).
    pub fn with_optimistic_connect(mut self, optimistic: bool) -> Self {
        self.optimistic = optimistic;
        self
    }

    /// Authenticates with Kerberos where the URL has no user and password.
    pub fn with_kerberos(mut self, kerberos: bool) -> Self {
        if kerberos && self.auth == ProxyAuth::None {
            self.auth = ProxyAuth::Negotiate;
        }
        self
    }

    /// The `Proxy-Authorization` for a new connection: Basic's is the same each time; a
    /// Negotiate token is made for each (a proxy takes each token once).
    pub async fn authorization(&self) -> Result<Option<String>, UpstreamError> {
        match &self.auth {
            ProxyAuth::None => Ok(None),
            ProxyAuth::Basic(value) => Ok(Some(value.clone())),
            ProxyAuth::Negotiate => Ok(negotiate::token_if_known(&self.url.host).await?),
        }
    }

    /// A 407 to a Kerberos ticket, said as what it usually means.
    pub fn refused_ticket(&self, error: UpstreamError) -> UpstreamError {
        match (&self.auth, error.status()) {
            (ProxyAuth::Negotiate, Some(407)) => UpstreamError::Negotiate(NegotiateError {
                host: self.url.host.clone(),
                reason: "the proxy refused the Kerberos ticket (407): its clock and this host's differ, \
                         or its keytab for that principal is not the KDC's"
                    .into(),
                refused_by_proxy: true,
            }),
            _ => error,
        }
    }

    /// Keeps up to `size` connections to the proxy ready (0: none).
    pub fn with_warm_pool(mut self, size: usize) -> Self {
        self.warm = WarmPool::new(size);
        self
    }

    /// How many ready connections the pool holds now (0 without a pool).
    #[cfg(test)]
    pub fn warm_idle(&self) -> usize {
        self.warm.as_ref().map_or(0, |pool| pool.len())
    }

    /// A connection to the proxy for a new tunnel or request: a ready one from the pool when
    /// there is one (`true`), else a new one. Call [`Self::top_up`] once it has proved itself.
    pub async fn connect(&self) -> Result<(UpstreamStream, bool), UpstreamError> {
        match self.warm.as_ref().and_then(|pool| pool.take()) {
            Some(stream) => Ok((stream, true)),
            None => Ok((self.dial().await?, false)),
        }
    }

    /// Starts background dials up to the pool's size. Called once a tunnel through the proxy
    /// has carried the origin's first answer (or a forwarded request its response), so the
    /// dials (and their TLS handshakes, on the agent's one event loop) run after that
    /// connection's round trips rather than in the middle of them; and a proxy that is down is
    /// never asked more often than clients ask (nor for a while after a dial failed).
    pub fn top_up(&self) {
        let Some(pool) = &self.warm else { return };
        for slot in pool.reserve_dials() {
            let client = self.clone();
            tokio::spawn(async move {
                match client.dial().await {
                    Ok(stream) => slot.fill(Some(stream)),
                    Err(e) => {
                        tracing::debug!("warm connection to proxy {}: {e}", client.url);
                        slot.fill(None);
                    }
                }
            });
        }
    }

    /// A new connection: TCP to the proxy (the first of its addresses that answers), then TLS
    /// for https proxies.
    pub async fn dial(&self) -> Result<UpstreamStream, UpstreamError> {
        let host = self.url.host.as_str();
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, self.url.port))
            .await
            .map_err(|source| UpstreamError::Resolve {
                host: host.to_owned(),
                source,
            })?
            .collect();
        let mut last_error = UpstreamError::Resolve {
            host: host.to_owned(),
            source: io::Error::other("no addresses"),
        };
        for addr in addrs {
            match connect_marked(Role::Proxy, addr, self.mark, self.timeouts.connect).await {
                Ok(tcp) => return self.secure(tcp).await,
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    async fn secure(&self, tcp: TcpStream) -> Result<UpstreamStream, UpstreamError> {
        let Some(tls) = &self.tls else {
            return Ok(UpstreamStream::Plain(tcp));
        };
        let host = &self.url.host;
        match tokio::time::timeout(self.timeouts.connect, tls.connect(host, tcp)).await {
            Ok(Ok(stream)) => Ok(UpstreamStream::Tls(Box::new(stream))),
            Ok(Err(source)) => Err(UpstreamError::Tls {
                host: host.clone(),
                source,
            }),
            Err(_) => Err(UpstreamError::ConnectTimeout(format!("TLS with proxy {host}"))),
        }
    }

    /// Opens `CONNECT target` (`host:port`, IPv6 bracketed) through the proxy, with
    /// `first_bytes` (the client's ClientHello, or nothing) in the same write when the proxy has
    /// proved it answers 200 and optimism is allowed. A ready connection that fails before the
    /// proxy answered CONNECT (closed meanwhile, silent, or a 408 the proxy sent because it
    /// waited too long) is replaced by a new one to the same proxy, once: no tunnel was opened,
    /// so nothing of the client's went past the proxy. Start [`Self::top_up`] once the tunnel
    /// carried its first answer.
    pub async fn open_tunnel(&self, target: &str, first_bytes: &Bytes) -> Result<Tunnel, UpstreamError> {
        let (stream, warm) = self.connect().await?;
        let ahead = if self.optimistic && self.proven.load(Ordering::Relaxed) {
            first_bytes.clone()
        } else {
            Bytes::new()
        };
        let result = match self.handshake(stream, target, warm, ahead.clone()).await {
            Err(e) if warm && e.went_stale() => {
                // Not knowing why it failed, the new connection waits for the answer.
                self.unprove(&ahead);
                let stream = self.dial().await?;
                self.handshake(stream, target, false, Bytes::new()).await
            }
            result => result,
        };
        match &result {
            Ok(_) => self.proven.store(true, Ordering::Relaxed),
            // Failed without an answer after bytes went ahead: maybe because they did. The
            // next CONNECT waits for the answer, and a 200 proves the proxy again.
            Err(e) if e.status().is_none() => self.unprove(&ahead),
            Err(_) => {}
        }
        result
    }

    fn unprove(&self, ahead: &Bytes) {
        if !ahead.is_empty() {
            self.proven.store(false, Ordering::Relaxed);
        }
    }

    async fn handshake(
        &self,
        stream: UpstreamStream,
        target: &str,
        warm: bool,
        ahead: Bytes,
    ) -> Result<Tunnel, UpstreamError> {
        let authorization = self.authorization().await?;
        let first_bytes_sent = !ahead.is_empty();
        let exchange = connect_exchange(stream, target, authorization.as_deref(), ahead);
        let (stream, early_data) = tokio::time::timeout(self.timeouts.handshake, exchange)
            .await
            .map_err(|_| UpstreamError::HandshakeTimeout)?
            .map_err(|e| self.refused_ticket(e))?;
        Ok(Tunnel {
            stream,
            early_data,
            warm,
            first_bytes_sent,
        })
    }
}

/// The upstream proxies of one configuration: a client for each configured proxy.
/// The upstream proxies of one configuration: a list (with failover) for each protocol and
/// route; a proxy named in several lists is one client, with one pool of ready connections.
pub struct Upstreams {
    https: Option<ProxyGroup>,
    http: Option<ProxyGroup>,
    routes: Vec<Route<ProxyGroup>>,
}

impl Upstreams {
    /// Clients for the proxies `settings` name, verified against their CA settings, whose
    /// sockets carry `mark` (0: none); each keeps `settings.warm_upstream` connections ready
    /// (`warm`: whether to keep any at all).
    pub fn new(settings: &Settings, mark: u32, warm: bool) -> anyhow::Result<Self> {
        let pool = if warm { settings.warm_upstream.get() } else { 0 };
        let mut clients: Vec<ProxyClient> = Vec::new();
        let mut client = |url: &ProxyUrl| -> anyhow::Result<ProxyClient> {
            if let Some(known) = clients.iter().find(|c| c.url == *url) {
                return Ok(known.clone());
            }
            let tls = match url.scheme {
                ProxyScheme::Https => Some(ProxyTls::new(
                    settings.proxy_ca_file.as_deref(),
                    settings.insecure_skip_proxy_tls_verify,
                )?),
                ProxyScheme::Http => None,
            };
            let optimistic = !settings
                .no_optimistic_connect
                .iter()
                .any(|m| m.matches(&url.host, url.port));
            let made = ProxyClient::new(url.clone(), tls, mark, settings.timeouts())
                .with_kerberos(settings.kerberos())
                .with_warm_pool(pool)
                .with_optimistic_connect(optimistic);
            clients.push(made.clone());
            Ok(made)
        };
        let mut group = |list: &ProxySetting| -> anyhow::Result<Option<ProxyGroup>> {
            if list.is_empty() {
                return Ok(None);
            }
            let members = list
                .urls()
                .iter()
                .map(&mut client)
                .collect::<anyhow::Result<_>>()?;
            Ok(Some(ProxyGroup::new(members)))
        };
        let https = group(&settings.https_proxy)?;
        // The same list for both: one list, so one state of its proxies.
        let http = match &https {
            Some(https) if settings.http_proxy == settings.https_proxy => Some(https.clone()),
            _ => group(&settings.http_proxy)?,
        };
        let mut routes = Vec::new();
        for route in &settings.proxy_routes {
            let via = match &route.via {
                Via::Direct => Via::Direct,
                Via::Proxies(list) => Via::Proxies(group(list)?.expect("a route names proxies")),
            };
            routes.push(Route {
                destinations: route.destinations.clone(),
                via,
                text: route.text.clone(),
            });
        }
        Ok(Self { https, http, routes })
    }

    /// The proxy lists, as the routing plan chooses from them.
    pub fn proxies(&self) -> Proxies<'_, ProxyGroup> {
        Proxies {
            https: self.https.as_ref(),
            http: self.http.as_ref(),
            routes: &self.routes,
        }
    }
}

/// The longest answer head taken from a proxy.
const MAX_ANSWER_HEAD: usize = 16 * 1024;

/// The CONNECT exchange over any stream: sends `CONNECT target` (with `authorization` as
/// Proxy-Authorization) and `ahead` right behind it in the same write, and on a 2xx answer gives
/// back the stream and the bytes the proxy sent after its answer head. Public for the fuzz
/// target that feeds it arbitrary answers.
///
/// Written out and parsed (httparse, hyper's own parser) here rather than through hyper's
/// client: a CONNECT is one request whose answer hands the stream over, and hyper's connection
/// task, upgrade channel and dispatch cost a task spawn and several wakeups per tunnel.
pub async fn connect_exchange<IO>(
    mut io: IO,
    target: &str,
    authorization: Option<&str>,
    ahead: Bytes,
) -> Result<(IO, Bytes), UpstreamError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // What hyper checked: an authority for a target, a header value for the credentials.
    if target.parse::<http::uri::Authority>().is_err() {
        return Err(UpstreamError::Protocol(format!(
            "building CONNECT {target}: not an authority"
        )));
    }
    if authorization.is_some_and(|a| header::HeaderValue::from_str(a).is_err()) {
        return Err(UpstreamError::Protocol(
            "building CONNECT: the Proxy-Authorization value has characters a header cannot carry".into(),
        ));
    }
    let mut request = Vec::with_capacity(128 + authorization.map_or(0, str::len) + ahead.len());
    request.extend_from_slice(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").as_bytes());
    if let Some(authorization) = authorization {
        request.extend_from_slice(b"Proxy-Authorization: ");
        request.extend_from_slice(authorization.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    if !ahead.is_empty() {
        // Should the proxy refuse the tunnel and keep the connection, it must not take what
        // follows for a next request (RFC 9112, 9.6).
        request.extend_from_slice(b"Connection: close\r\n");
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(&ahead);
    let sent = async {
        io.write_all(&request).await?;
        io.flush().await
    };
    sent.await
        .map_err(|e| UpstreamError::Protocol(format!("sending CONNECT: {e}")))?;
    drop(request);

    let mut answer = bytes::BytesMut::with_capacity(1024);
    let mut parse_first = false;
    loop {
        // More to read unless a whole head (after an informational one) is already here.
        if !parse_first {
            let read = io
                .read_buf(&mut answer)
                .await
                .map_err(|e| UpstreamError::Protocol(format!("reading the answer to CONNECT: {e}")))?;
            if read == 0 {
                return Err(UpstreamError::Protocol(
                    "the proxy closed the connection before answering CONNECT".into(),
                ));
            }
        }
        parse_first = false;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&answer) {
            Ok(httparse::Status::Complete(len)) => {
                let code = response.code.unwrap_or(0);
                let status = StatusCode::from_u16(code)
                    .map_err(|_| UpstreamError::Protocol(format!("the proxy answered status {code}")))?;
                if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                    // 100 Continue and the like come before the answer.
                    let _ = answer.split_to(len);
                    parse_first = !answer.is_empty();
                    continue;
                }
                if !status.is_success() {
                    return Err(UpstreamError::Status(status));
                }
                let early = answer.split_off(len);
                return Ok((io, early.freeze()));
            }
            Ok(httparse::Status::Partial) if answer.len() < MAX_ANSWER_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(UpstreamError::Protocol(format!(
                    "the proxy's answer head is longer than {MAX_ANSWER_HEAD} bytes"
                )));
            }
            Err(e) => {
                return Err(UpstreamError::Protocol(format!(
                    "malformed answer to CONNECT: {e}"
                )));
            }
        }
    }
}

/// Reads a request head (through the blank line) byte by byte, for the tests' fake proxies;
/// None if the connection ends first.
#[cfg(test)]
async fn read_request_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const TIMEOUTS: Timeouts = Timeouts {
        connect: Duration::from_secs(2),
        handshake: Duration::from_millis(500),
    };

    /// A one-connection fake proxy on loopback: returns the request head it read, after
    /// answering with `answer` and then echoing whatever follows.
    async fn fake_proxy(answer: &'static [u8]) -> (ProxyUrl, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if stream.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            stream.write_all(answer).await.unwrap();
            let mut buf = [0u8; 64];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            String::from_utf8(head).unwrap()
        });
        let url = ProxyUrl::parse(&format!("http://alice:s3cret@127.0.0.1:{port}")).unwrap();
        (url, task)
    }

    async fn open_tunnel(
        proxy: &ProxyUrl,
        target: &str,
        mark: u32,
        timeouts: Timeouts,
    ) -> Result<Tunnel, UpstreamError> {
        ProxyClient::new(proxy.clone(), None, mark, timeouts)
            .open_tunnel(target, &Bytes::new())
            .await
    }

    #[tokio::test]
    async fn connect_sends_target_host_and_credentials_and_keeps_early_data() {
        let (proxy, task) = fake_proxy(b"HTTP/1.1 200 Connection established\r\n\r\nearly").await;
        let mut tunnel = open_tunnel(&proxy, "10.1.2.3:8448", 0, TIMEOUTS).await.unwrap();
        assert_eq!(&tunnel.early_data[..], b"early");
        tunnel.stream.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        tunnel.stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping");
        drop(tunnel);

        let head = task.await.unwrap();
        let mut lines = head.lines();
        assert_eq!(lines.next(), Some("CONNECT 10.1.2.3:8448 HTTP/1.1"));
        let headers: Vec<String> = lines.map(str::to_ascii_lowercase).collect();
        assert!(headers.contains(&"host: 10.1.2.3:8448".to_owned()), "{head}");
        assert!(
            headers.contains(&"proxy-authorization: basic ywxpy2u6cznjcmv0".to_owned()),
            "{head}"
        );
    }

    #[tokio::test]
    async fn bracketed_ipv6_target_and_no_credentials() {
        let (mut proxy, task) = fake_proxy(b"HTTP/1.0 200 OK\r\n\r\n").await;
        proxy = ProxyUrl::parse(&format!("127.0.0.1:{}", proxy.port)).unwrap();
        open_tunnel(&proxy, "[2001:db8::1]:443", 0, TIMEOUTS)
            .await
            .unwrap();
        let head = task.await.unwrap();
        assert!(
            head.starts_with("CONNECT [2001:db8::1]:443 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            !head.to_ascii_lowercase().contains("proxy-authorization"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn non_2xx_answers_are_errors_with_their_status() {
        for (answer, status) in [
            (&b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=x\r\nContent-Length: 0\r\n\r\n"[..], 407),
            (&b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nnope!"[..], 403),
            (&b"HTTP/1.1 502 Bad Gateway\r\n\r\n"[..], 502),
            (&b"HTTP/1.1 301 Moved\r\nLocation: /\r\n\r\n"[..], 301),
        ] {
            let (proxy, _task) = fake_proxy(answer).await;
            let err = open_tunnel(&proxy, "10.1.2.3:443", 0, TIMEOUTS).await.err().unwrap();
            assert_eq!(err.status(), Some(status), "{err}");
        }
    }

    /// Answers as proxies send them: in pieces, after an informational answer, too long, or
    /// refusing a bad request before it is sent. What follows a 2xx head is the tunnel's.
    #[tokio::test]
    async fn answers_in_pieces_informational_first_and_over_long() {
        let long = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "a".repeat(20_000));
        // (the answer's pieces, the early data or a part of the error)
        type Case<'a> = (Vec<&'a [u8]>, Result<&'a [u8], &'a str>);
        let cases: Vec<Case> = vec![
            (vec![b"HTTP/1.1 2", b"00 OK\r\n", b"\r\ntunnel"], Ok(b"tunnel")),
            (
                vec![b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"],
                Ok(b""),
            ),
            (
                vec![b"HTTP/1.0 200 Connection established\r\nProxy-Agent: x\r\n\r\n"],
                Ok(b""),
            ),
            (
                vec![b"HTTP/1.1 403 Forbidden\r\n\r\n"],
                Err("proxy answered 403 Forbidden"),
            ),
            (
                vec![b"HTTP/1.1 200 OK\r\n"],
                Err("closed the connection before answering"),
            ),
            (vec![long.as_bytes()], Err("longer than 16384 bytes")),
            (vec![b"HTTP/1.1 999 What\r\n\r\n"], Err("proxy answered 999")),
        ];
        for (pieces, expected) in cases {
            let (agent, mut proxy) = tokio::io::duplex(64 * 1024);
            let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
            let written = pieces.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = proxy.read(&mut request).await;
                for piece in written {
                    let _ = proxy.write_all(&piece).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
            let got = connect_exchange(agent, "10.1.2.3:443", None, Bytes::new()).await;
            match (got, expected) {
                (Ok((_, early)), Ok(want)) => assert_eq!(&early[..], want, "{pieces:?}"),
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{e} for {pieces:?}"),
                (got, want) => panic!("{:?} for {pieces:?}, want {want:?}", got.map(|(_, e)| e)),
            }
        }
        // Values that would split the request are refused before anything is sent.
        let (agent, _proxy) = tokio::io::duplex(1024);
        let e = connect_exchange(agent, "10.1.2.3:443", Some("Basic x\r\nX-Evil: 1"), Bytes::new())
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("Proxy-Authorization"), "{e}");
        let (agent, _proxy) = tokio::io::duplex(1024);
        let e = connect_exchange(agent, "a b\r\n:443", None, Bytes::new())
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("not an authority"), "{e}");
    }

    #[tokio::test]
    async fn garbage_answer_is_a_protocol_error() {
        let (proxy, _task) = fake_proxy(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
        let err = open_tunnel(&proxy, "10.1.2.3:443", 0, TIMEOUTS)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, UpstreamError::Protocol(_)), "{err}");
    }

    #[tokio::test]
    async fn silent_proxy_times_out() {
        let (proxy, _task) = fake_proxy(b"").await;
        let started = std::time::Instant::now();
        let err = open_tunnel(&proxy, "10.1.2.3:443", 0, TIMEOUTS)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, UpstreamError::HandshakeTimeout), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn refused_proxy_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let proxy = ProxyUrl::parse(&format!("127.0.0.1:{port}")).unwrap();
        let err = open_tunnel(&proxy, "10.1.2.3:443", 0, TIMEOUTS)
            .await
            .err()
            .unwrap();
        match err {
            UpstreamError::Connect { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused)
            }
            other => panic!("{other}"),
        }
    }

    /// What the fake proxy does with one connection.
    #[derive(Clone, Copy, PartialEq)]
    enum Conduct {
        /// Answers CONNECT with 200, then echoes.
        Answer,
        /// Closes it as soon as it is accepted.
        HangUp,
        /// Closes it once the request arrived, without answering.
        Mute,
        /// Takes the request and never answers.
        Silent,
        /// Answers 408 Request Timeout and closes.
        RequestTimeout,
    }

    /// A fake proxy for many connections; `conduct` says what it does with the connection of
    /// each index. Returns its URL, a log of (connection index, request line) in arrival order,
    /// and the count of connections accepted.
    async fn counting_proxy(
        conduct: fn(usize) -> Conduct,
    ) -> (
        ProxyUrl,
        Arc<std::sync::Mutex<Vec<(usize, String)>>>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (log, count) = (requests.clone(), accepted.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let index = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let conduct = conduct(index);
                if conduct == Conduct::HangUp {
                    continue;
                }
                let log = log.clone();
                tokio::spawn(async move {
                    let Some(head) = read_request_head(&mut stream).await else {
                        return;
                    };
                    let line = String::from_utf8_lossy(&head)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_owned();
                    log.lock().unwrap().push((index, line));
                    match conduct {
                        Conduct::Mute => return,
                        Conduct::Silent => {
                            tokio::time::sleep(Duration::from_secs(10)).await;
                            return;
                        }
                        Conduct::RequestTimeout => {
                            let _ = stream.write_all(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").await;
                            return;
                        }
                        Conduct::Answer | Conduct::HangUp => {}
                    }
                    stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
                    let mut buf = [0u8; 64];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let url = ProxyUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        (url, requests, accepted)
    }

    async fn until_warm(client: &ProxyClient, idle: usize) {
        for _ in 0..200 {
            if client.warm_idle() == idle {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "the pool never held {idle} connections (has {})",
            client.warm_idle()
        );
    }

    /// The first tunnel dials; nothing more is dialled while it opens. Once it carried an
    /// answer (`top_up`), the pool fills to its size in the background, and the next tunnels go
    /// down connections the proxy accepted before they were asked for.
    #[tokio::test]
    async fn tunnels_take_ready_connections_from_the_warm_pool() {
        let (url, requests, accepted) = counting_proxy(|_| Conduct::Answer).await;
        let client = ProxyClient::new(url, None, 0, TIMEOUTS).with_warm_pool(2);
        let first = client.open_tunnel("10.0.0.1:443", &Bytes::new()).await.unwrap();
        assert!(!first.warm);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        client.top_up();
        until_warm(&client, 2).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
        let mut second = client.open_tunnel("10.0.0.2:443", &Bytes::new()).await.unwrap();
        assert!(second.warm);
        second.stream.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        second.stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping");
        // Sent down a pooled connection (index 1 or 2), not a new one.
        let log = requests.lock().unwrap().clone();
        let (index, line) = &log[1];
        assert!([1, 2].contains(index), "{log:?}");
        assert_eq!(line, "CONNECT 10.0.0.2:443 HTTP/1.1");
        // Topped up again behind it.
        client.top_up();
        until_warm(&client, 2).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    /// A pooled connection the proxy closed is noticed when taken, and not handed out.
    #[tokio::test]
    async fn a_pooled_connection_closed_by_the_proxy_is_not_handed_out() {
        // Connection 1 (the pool's) is closed by the proxy as soon as it is accepted.
        let (url, _requests, _accepted) =
            counting_proxy(|i| if i == 1 { Conduct::HangUp } else { Conduct::Answer }).await;
        let client = ProxyClient::new(url, None, 0, TIMEOUTS).with_warm_pool(1);
        client.open_tunnel("10.0.0.1:443", &Bytes::new()).await.unwrap();
        client.top_up();
        until_warm(&client, 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let pool = client.warm.as_ref().unwrap();
        assert!(pool.take().is_none(), "a closed connection was handed out");
        assert!(pool.is_empty());
        // A proxy closing idle connections this soon has them kept for the shortest time.
        assert_eq!(pool.idle_limit(), warm::MIN_IDLE);
    }

    /// A pooled connection that fails before the proxy answered CONNECT (closed on it, never
    /// answered, or answered 408 because it waited too long) is replaced by a new one, once: the
    /// tunnel still opens. Any other answer on it (407 here) is final.
    #[tokio::test]
    async fn a_pooled_connection_that_went_stale_is_retried_on_a_new_one() {
        let cases: [fn(usize) -> Conduct; 3] = [
            |i| if i == 1 { Conduct::Mute } else { Conduct::Answer },
            |i| if i == 1 { Conduct::Silent } else { Conduct::Answer },
            |i| {
                if i == 1 {
                    Conduct::RequestTimeout
                } else {
                    Conduct::Answer
                }
            },
        ];
        for conduct in cases {
            // Connection 1 is the pool's.
            let (url, requests, _accepted) = counting_proxy(conduct).await;
            let client = ProxyClient::new(url, None, 0, TIMEOUTS).with_warm_pool(1);
            client.open_tunnel("10.0.0.1:443", &Bytes::new()).await.unwrap();
            client.top_up();
            until_warm(&client, 1).await;
            let tunnel = client.open_tunnel("10.0.0.2:443", &Bytes::new()).await.unwrap();
            assert!(!tunnel.warm, "the tunnel went down the retried, new connection");
            let log = requests.lock().unwrap().clone();
            let to_second: Vec<usize> = log
                .iter()
                .filter(|(_, line)| line.contains("10.0.0.2"))
                .map(|(index, _)| *index)
                .collect();
            assert_eq!(to_second.len(), 2, "{log:?}");
            assert_eq!(to_second[0], 1, "first down the pooled connection: {log:?}");
        }
    }

    #[tokio::test]
    async fn a_refusal_on_a_pooled_connection_is_not_retried() {
        let (proxy, _task) =
            fake_proxy(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n").await;
        let client = ProxyClient::new(proxy, None, 0, TIMEOUTS).with_warm_pool(1);
        // The fake proxy serves one connection: dialled and pooled, then taken.
        let pool = client.warm.clone().unwrap();
        for slot in pool.reserve_dials() {
            slot.fill(Some(client.dial().await.unwrap()));
        }
        let err = client
            .open_tunnel("10.0.0.1:443", &Bytes::new())
            .await
            .err()
            .unwrap();
        assert_eq!(err.status(), Some(407), "{err}");
    }

    /// A fake proxy that keeps, per connection, what its first read after the accept got (one
    /// write of the agent's arrives in one read on loopback), answers the first connection 200
    /// and the later ones `later`, and after a 200 echoes what follows.
    async fn recording_proxy(later: &'static [u8]) -> (ProxyUrl, Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = received.clone();
        tokio::spawn(async move {
            for index in 0.. {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut first = vec![0u8; 4096];
                let n = stream.read(&mut first).await.unwrap();
                first.truncate(n);
                let end = first
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .expect("a whole head in one read");
                let behind = first[end + 4..].to_vec();
                log.lock().unwrap().push(first);
                let answer = if index == 0 { OK } else { later };
                stream.write_all(answer).await.unwrap();
                if answer.starts_with(b"HTTP/1.1 200") {
                    stream.write_all(&behind).await.unwrap();
                    tokio::spawn(async move {
                        let (mut reader, mut writer) = stream.split();
                        let _ = tokio::io::copy(&mut reader, &mut writer).await;
                    });
                }
            }
        });
        let url = ProxyUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        (url, received)
    }

    const OK: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";
    const HELLO: &[u8] = b"\x16\x03\x01\x00\x05hello";

    /// Once the proxy answered a CONNECT with 200, the next CONNECT and the client's first bytes
    /// go out in one write; the proxy gets them whole, behind the head, and they are marked sent.
    #[tokio::test]
    async fn after_a_200_the_first_bytes_go_out_with_the_next_connect() {
        let (url, received) = recording_proxy(OK).await;
        let client = ProxyClient::new(url, None, 0, TIMEOUTS);
        let hello = Bytes::from_static(HELLO);
        let first = client.open_tunnel("10.0.0.1:443", &hello).await.unwrap();
        assert!(
            !first.first_bytes_sent,
            "not before the proxy answered one CONNECT"
        );
        let mut second = client.open_tunnel("10.0.0.2:443", &hello).await.unwrap();
        assert!(second.first_bytes_sent);
        // The echo may have come with the answer (then hyper read it: early data).
        let mut echoed = second.early_data.to_vec();
        let mut rest = vec![0u8; HELLO.len() - echoed.len()];
        second.stream.read_exact(&mut rest).await.unwrap();
        echoed.extend(rest);
        assert_eq!(echoed, HELLO, "forwarded intact once the tunnel was open");
        let log = received.lock().unwrap().clone();
        assert!(
            log[0].ends_with(b"\r\n\r\n"),
            "{:?}",
            String::from_utf8_lossy(&log[0])
        );
        assert!(log[1].starts_with(b"CONNECT 10.0.0.2:443 HTTP/1.1\r\n"));
        assert!(
            log[1].ends_with(&[b"Connection: close\r\n\r\n", HELLO].concat()),
            "{:?}",
            String::from_utf8_lossy(&log[1])
        );
    }

    /// An optimistic CONNECT answered with anything but 200 fails the tunnel with that status,
    /// and nothing is retried: the caller resets the client.
    #[tokio::test]
    async fn any_answer_but_200_to_an_optimistic_connect_fails_it() {
        for refusal in [
            &b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"[..],
            b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n",
        ] {
            let (url, received) = recording_proxy(refusal).await;
            let client = ProxyClient::new(url, None, 0, TIMEOUTS);
            let hello = Bytes::from_static(HELLO);
            client.open_tunnel("10.0.0.1:443", &hello).await.unwrap();
            let err = client.open_tunnel("10.0.0.2:443", &hello).await.err().unwrap();
            let status = std::str::from_utf8(&refusal[9..12])
                .unwrap()
                .parse::<u16>()
                .unwrap();
            assert_eq!(err.status(), Some(status), "{err}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(received.lock().unwrap().len(), 2, "not retried");
        }
    }

    /// A proxy that fails a CONNECT with bytes ahead without answering (here: closes) is not
    /// sent bytes ahead again until it has answered a plain CONNECT with 200.
    #[tokio::test]
    async fn a_failure_after_bytes_went_ahead_makes_the_next_connect_wait() {
        let (url, _requests, _accepted) =
            counting_proxy(|i| if i == 1 { Conduct::Mute } else { Conduct::Answer }).await;
        let client = ProxyClient::new(url, None, 0, TIMEOUTS);
        let hello = Bytes::from_static(HELLO);
        let sent: Vec<Option<bool>> = tunnels_in_a_row(&client, &hello).await;
        assert_eq!(sent, [Some(false), None, Some(false), Some(true)]);
    }

    /// Four tunnels in a row: whether each sent the first bytes ahead (None: it failed).
    async fn tunnels_in_a_row(client: &ProxyClient, hello: &Bytes) -> Vec<Option<bool>> {
        let mut sent = Vec::new();
        for i in 0..4 {
            let target = format!("10.0.0.{i}:443");
            sent.push(
                client
                    .open_tunnel(&target, hello)
                    .await
                    .ok()
                    .map(|t| t.first_bytes_sent),
            );
        }
        sent
    }

    /// `no_optimistic_connect`: the proxy's answer is awaited every time.
    #[tokio::test]
    async fn a_proxy_named_in_no_optimistic_connect_gets_the_head_alone() {
        let (url, received) = recording_proxy(OK).await;
        let client = ProxyClient::new(url, None, 0, TIMEOUTS).with_optimistic_connect(false);
        let hello = Bytes::from_static(HELLO);
        for target in ["10.0.0.1:443", "10.0.0.2:443", "10.0.0.3:443"] {
            assert!(!client.open_tunnel(target, &hello).await.unwrap().first_bytes_sent);
        }
        for head in received.lock().unwrap().iter() {
            assert!(head.ends_with(b"\r\n\r\n"), "{:?}", String::from_utf8_lossy(head));
        }
    }

    /// No pool: every tunnel dials, and nothing is dialled ahead.
    #[tokio::test]
    async fn without_a_pool_nothing_is_dialled_ahead() {
        let (url, _requests, accepted) = counting_proxy(|_| Conduct::Answer).await;
        let client = ProxyClient::new(url, None, 0, TIMEOUTS).with_warm_pool(0);
        for _ in 0..3 {
            assert!(
                !client
                    .open_tunnel("10.0.0.1:443", &Bytes::new())
                    .await
                    .unwrap()
                    .warm
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
