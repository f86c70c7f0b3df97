//! Tunnels through the upstream HTTP proxy: `CONNECT host:port` with `Proxy-Authorization`,
//! spoken by hyper's HTTP/1 client, then the raw TCP stream handed back for relaying.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

use crate::proxy_url::{ProxyScheme, ProxyUrl};

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// TCP connect to the proxy.
    pub connect: Duration,
    /// From sending CONNECT to the end of the proxy's answer head.
    pub handshake: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("resolving proxy {host}: {source}")]
    Resolve { host: String, source: std::io::Error },
    #[error("connecting to proxy {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to proxy {0}: timed out")]
    ConnectTimeout(String),
    #[error("proxy answered CONNECT with {0}")]
    Status(StatusCode),
    #[error("proxy did not answer CONNECT in time")]
    HandshakeTimeout,
    #[error("CONNECT exchange with proxy failed: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// The proxy's HTTP status, when it answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status(s) => Some(s.as_u16()),
            _ => None,
        }
    }
}

/// An established tunnel: the TCP stream to the proxy, and any bytes the proxy sent after its
/// answer head (already belonging to the tunnelled stream).
pub struct Tunnel {
    pub stream: TcpStream,
    pub early_data: Bytes,
}

/// Opens a TCP connection marked with `mark`, so the kernel program lets it through unchanged.
pub async fn connect_marked(
    addr: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> Result<TcpStream, UpstreamError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|source| UpstreamError::Connect { addr, source })?;
    socket2::SockRef::from(&socket)
        .set_mark(mark)
        .map_err(|source| UpstreamError::Connect { addr, source })?;
    socket
        .set_nodelay(true)
        .map_err(|source| UpstreamError::Connect { addr, source })?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
        Err(_) => Err(UpstreamError::ConnectTimeout(addr.to_string())),
    }
}

/// Connects to the proxy, whichever of its resolved addresses answers first in order.
async fn connect_proxy(proxy: &ProxyUrl, mark: u32, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|source| UpstreamError::Resolve {
            host: proxy.host.clone(),
            source,
        })?
        .collect();
    let mut last_error = None;
    for addr in addrs {
        match connect_marked(addr, mark, timeout).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| UpstreamError::Resolve {
        host: proxy.host.clone(),
        source: std::io::Error::other("no addresses"),
    }))
}

/// Opens `CONNECT target` (`host:port`, IPv6 bracketed) through `proxy`.
pub async fn open_tunnel(
    proxy: &ProxyUrl,
    target: &str,
    mark: u32,
    timeouts: Timeouts,
) -> Result<Tunnel, UpstreamError> {
    debug_assert_eq!(
        proxy.scheme,
        ProxyScheme::Http,
        "https proxies are refused at start"
    );
    let stream = connect_proxy(proxy, mark, timeouts.connect).await?;
    tokio::time::timeout(timeouts.handshake, connect_handshake(stream, proxy, target))
        .await
        .map_err(|_| UpstreamError::HandshakeTimeout)?
}

async fn connect_handshake(
    stream: TcpStream,
    proxy: &ProxyUrl,
    target: &str,
) -> Result<Tunnel, UpstreamError> {
    let protocol = |e: hyper::Error| UpstreamError::Protocol(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(protocol)?;
    // The connection future hands the socket over to the upgrade once the proxy says 2xx.
    let conn = tokio::spawn(conn.with_upgrades());

    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(target)
        .header(header::HOST, target);
    if let Some(auth) = proxy.authorization() {
        request = request.header(header::PROXY_AUTHORIZATION, auth);
    }
    let request = request
        .body(Empty::new())
        .map_err(|e| UpstreamError::Protocol(format!("building CONNECT {target}: {e}")))?;
    let response = match sender.send_request(request).await {
        Ok(r) => r,
        Err(e) => {
            conn.abort();
            return Err(protocol(e));
        }
    };
    if !response.status().is_success() {
        conn.abort();
        return Err(UpstreamError::Status(response.status()));
    }
    let upgraded = hyper::upgrade::on(response).await.map_err(protocol)?;
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| UpstreamError::Protocol("upgraded connection is not a TCP stream".into()))?;
    Ok(Tunnel {
        stream: parts.io.into_inner(),
        early_data: parts.read_buf,
    })
}
