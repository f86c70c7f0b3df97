//! The two servers the benchmark adds to the testbed: a fast CONNECT proxy (so that the agent's
//! own overhead is not hidden behind squid's) and a plain TCP byte source (so that bulk
//! throughput is not bounded by TLS in nginx).

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use base64::Engine;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

use super::raise_nofile;

/// Bounds on what a misbehaving peer can make the servers wait for or buffer.
const HEAD_LIMIT: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Copy buffers of the proxy, each direction: large enough not to cap bulk throughput.
const COPY_BUFFER: usize = 64 * 1024;

#[derive(clap::Args, Debug)]
pub struct ProxyArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    /// `user:password` every CONNECT must present as `Proxy-Authorization: Basic`.
    #[arg(long)]
    pub auth: Option<String>,
    /// `name=ip` entries: the namespaces have no DNS.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct SourceArgs {
    #[arg(long)]
    pub listen: SocketAddr,
}

struct ProxyConfig {
    /// The whole expected header value, `Basic ...`.
    authorization: Option<String>,
    hosts: HashMap<String, std::net::IpAddr>,
}

/// A minimal CONNECT proxy: one request head, optional Basic auth, then bytes both ways.
pub fn proxy_main(args: ProxyArgs) -> Result<()> {
    raise_nofile();
    let mut hosts = HashMap::new();
    for entry in &args.hosts {
        let (name, ip) = entry
            .split_once('=')
            .with_context(|| format!("--host {entry}: expected name=ip"))?;
        hosts.insert(
            name.to_ascii_lowercase(),
            ip.parse().with_context(|| format!("--host {entry}"))?,
        );
    }
    let config = Arc::new(ProxyConfig {
        authorization: args
            .auth
            .map(|a| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(a))),
        hosts,
    });
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        loop {
            let Ok((client, _)) = listener.accept().await else {
                // Out of descriptors, most likely: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let config = config.clone();
            tokio::spawn(async move {
                let _ = serve_connect(client, &config).await;
            });
        }
    })
}

async fn serve_connect(mut client: TcpStream, config: &ProxyConfig) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let (head, rest) = timeout(IO_TIMEOUT, read_head(&mut client))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let mut request = lines.next().unwrap_or("").split(' ');
    let (Some("CONNECT"), Some(target)) = (request.next(), request.next()) else {
        return answer(&mut client, "405 Method Not Allowed").await;
    };
    if let Some(expected) = &config.authorization {
        let presented = lines.find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("proxy-authorization")
                .then(|| value.trim())
        });
        if presented != Some(expected.as_str()) {
            let head = "HTTP/1.1 407 Proxy Authentication Required\r\n\
                        Proxy-Authenticate: Basic realm=\"bench\"\r\n\
                        Content-Length: 0\r\nConnection: close\r\n\r\n";
            return client.write_all(head.as_bytes()).await;
        }
    }
    let Some(addr) = resolve(target, &config.hosts) else {
        return answer(&mut client, "502 Bad Gateway").await;
    };
    let mut upstream = match timeout(IO_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(upstream)) => upstream,
        _ => return answer(&mut client, "503 Service Unavailable").await,
    };
    upstream.set_nodelay(true)?;
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    upstream.write_all(&rest).await?;
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUFFER, COPY_BUFFER).await?;
    Ok(())
}

async fn answer(client: &mut TcpStream, status: &str) -> std::io::Result<()> {
    let head = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    client.write_all(head.as_bytes()).await
}

/// Reads up to the end of the request head; returns the head and whatever followed it.
async fn read_head(client: &mut TcpStream) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > HEAD_LIMIT {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
}

/// `host:port` or `[v6]:port`; names only from the static table.
fn resolve(target: &str, hosts: &HashMap<String, std::net::IpAddr>) -> Option<SocketAddr> {
    if let Ok(addr) = target.parse() {
        return Some(addr);
    }
    let (host, port) = target.rsplit_once(':')?;
    let ip = hosts.get(&host.to_ascii_lowercase())?;
    Some(SocketAddr::new(*ip, port.parse().ok()?))
}

/// The byte source: reads an 8-byte big-endian length, writes that many bytes, then holds the
/// connection until the client closes it (so idle tunnels stay up as long as the client wants).
pub fn source_main(args: SourceArgs) -> Result<()> {
    raise_nofile();
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = serve_bytes(conn).await;
            });
        }
    })
}

static ZEROES: [u8; 256 * 1024] = [0; 256 * 1024];

async fn serve_bytes(mut conn: TcpStream) -> std::io::Result<()> {
    let mut request = [0u8; 8];
    timeout(IO_TIMEOUT, conn.read_exact(&mut request))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    let mut left = u64::from_be_bytes(request);
    while left > 0 {
        let n = left.min(ZEROES.len() as u64) as usize;
        conn.write_all(&ZEROES[..n]).await?;
        left -= n as u64;
    }
    // Hold until the client is done; whatever it sends is discarded.
    let mut sink = [0u8; 1024];
    while conn.read(&mut sink).await? > 0 {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_ips_and_known_names_only() {
        let hosts = HashMap::from([("origin.test".to_owned(), "10.248.0.30".parse().unwrap())]);
        assert_eq!(
            resolve("origin.test:443", &hosts),
            Some("10.248.0.30:443".parse().unwrap())
        );
        assert_eq!(
            resolve("10.248.0.30:9000", &hosts),
            Some("10.248.0.30:9000".parse().unwrap())
        );
        assert_eq!(
            resolve("[fd00::1]:1", &hosts),
            Some("[fd00::1]:1".parse().unwrap())
        );
        assert_eq!(resolve("other.test:443", &hosts), None);
    }
}
