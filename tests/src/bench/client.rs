//! The load client. The orchestrator runs it inside the homeserver namespace, in whichever
//! cgroup the peer under test needs (intercepted for egress, a plain one otherwise), and reads
//! one JSON object from its stdout. It is the same program for every peer: only `--proxy`
//! (application-level proxying) and where it runs differ.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    sync::Mutex,
    time::timeout,
};
use tokio_rustls::TlsConnector;

use super::raise_nofile;

/// No single connection may take longer than this.
const CONN_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Sequential HTTPS requests: time to the first response byte of each.
    Latency,
    /// HTTPS requests from `--concurrency` workers for `--seconds`.
    Rate,
    /// `--bytes` from the byte source through `--tunnels` parallel connections.
    Bulk,
    /// `--count` connections to the byte source, held open until a line arrives on stdin.
    Idle,
    /// Blocking connect() latency, plain vs bypassed vs denied (see [`connect_mode`]).
    Connect,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// The destination as the application sees it (the origin's address).
    #[arg(long)]
    pub target: SocketAddr,
    /// Application-level proxying: open a CONNECT tunnel through this proxy first.
    #[arg(long)]
    pub proxy: Option<SocketAddr>,
    /// Speak TLS to the proxy (an `https://` proxy, like Synapse with one), verified against
    /// `--ca` by the proxy's address.
    #[arg(long)]
    pub proxy_tls: bool,
    /// `user:password` for `Proxy-Authorization: Basic`.
    #[arg(long)]
    pub proxy_auth: Option<String>,
    /// What to ask the proxy for (`name:port`); default: `--target`.
    #[arg(long)]
    pub connect_to: Option<String>,
    /// TLS server name (SNI and certificate check).
    #[arg(long, default_value = egress_testbed::ORIGIN_NAME)]
    pub sni: String,
    /// CA certificate (PEM) that signed the origin's certificate.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 0)]
    pub bytes: u64,
    #[arg(long, default_value_t = 1)]
    pub tunnels: usize,
    /// Connect mode: cgroup with nothing attached.
    #[arg(long)]
    pub plain_cgroup: Option<PathBuf>,
    /// Connect mode: the intercepted cgroup.
    #[arg(long)]
    pub intercepted_cgroup: Option<PathBuf>,
    /// Connect mode: a destination the agent bypasses in the kernel.
    #[arg(long)]
    pub bypass: Option<SocketAddr>,
    /// Connect mode: a destination the agent denies in the kernel.
    #[arg(long)]
    pub deny: Option<SocketAddr>,
    /// Connect mode: sockets created per cgroup at a time.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Give up after this many seconds in total.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
}

/// What every mode prints (fields a mode does not measure stay empty).
#[derive(Serialize, Deserialize, Default, Debug, Clone)]
pub struct Report {
    /// Latency: time to first byte, µs, one per successful request.
    #[serde(default)]
    pub samples_us: Vec<u32>,
    /// Rate: requests completed; bulk: tunnels completed; idle: connections open / alive.
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub errors: u64,
    #[serde(default)]
    pub first_error: Option<String>,
    /// Rate and bulk: wall time, s.
    #[serde(default)]
    pub seconds: f64,
    /// Bulk: bytes received.
    #[serde(default)]
    pub bytes: u64,
    /// Connect: connect() times, ns, per kind.
    #[serde(default)]
    pub plain_ns: Vec<u32>,
    #[serde(default)]
    pub bypass_ns: Vec<u32>,
    #[serde(default)]
    pub deny_ns: Vec<u32>,
    /// Connect: every connect() of a kind, also the unrecorded warm-up batch's and failed
    /// ones: what the kernel's decision counters must have counted.
    #[serde(default)]
    pub bypass_calls: u64,
    #[serde(default)]
    pub deny_calls: u64,
}

impl Report {
    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

pub fn main(args: ClientArgs) -> Result<()> {
    raise_nofile();
    if args.mode == Mode::Connect {
        // Synchronous and single-threaded: it moves itself between cgroups, and sockets take
        // the cgroup of the thread that creates them.
        let report = connect_mode(&args)?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let total = Duration::from_secs_f64(args.timeout);
        let client = Arc::new(Client::new(&args)?);
        let work = async {
            match args.mode {
                Mode::Latency => latency(&client, args.count).await,
                Mode::Rate => rate(&client, args.concurrency, args.seconds).await,
                Mode::Bulk => bulk(&client, args.bytes, args.tunnels).await,
                Mode::Idle => idle(&client, args.count).await,
                Mode::Connect => unreachable!(),
            }
        };
        let report = timeout(total, work)
            .await
            .with_context(|| format!("client did not finish within {total:?}"))??;
        if args.mode != Mode::Idle {
            println!("{}", serde_json::to_string(&report)?);
        }
        Ok(())
    })
}

/// A connection to the origin: plain TCP, or a tunnel inside TLS to an `https://` proxy.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}
type BoxStream = Box<dyn Stream>;

/// How to reach the origin: directly or through a CONNECT tunnel, and TLS to it.
struct Client {
    first_hop: SocketAddr,
    /// TLS to the proxy itself, for `https://` proxies (full handshakes, as Synapse does).
    proxy_tls: Option<TlsConnector>,
    /// The CONNECT request head, for application-level proxying.
    connect_request: Option<Vec<u8>>,
    tls: TlsConnector,
    server_name: ServerName<'static>,
    http_request: Vec<u8>,
}

impl Client {
    fn new(args: &ClientArgs) -> Result<Self> {
        let mut roots = RootCertStore::empty();
        if let Some(ca) = &args.ca {
            for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))? {
                roots.add(cert?)?;
            }
        }
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
        // Every connection is a new one: full handshakes, as on first contact with a server.
        config.resumption = rustls::client::Resumption::disabled();
        let connect_request = args.proxy.map(|_| {
            let target = args.connect_to.clone().unwrap_or_else(|| args.target.to_string());
            let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
            if let Some(auth) = &args.proxy_auth {
                let encoded = base64::engine::general_purpose::STANDARD.encode(auth);
                head.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
            }
            head.push_str("\r\n");
            head.into_bytes()
        });
        let proxy_tls = args
            .proxy_tls
            .then(|| TlsConnector::from(Arc::new(config.clone())));
        Ok(Self {
            first_hop: args.proxy.unwrap_or(args.target),
            proxy_tls,
            connect_request,
            tls: TlsConnector::from(Arc::new(config)),
            server_name: ServerName::try_from(args.sni.clone())?,
            http_request: format!(
                "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                args.sni
            )
            .into_bytes(),
        })
    }

    /// A stream to the origin (through the proxy's tunnel when there is one).
    async fn open(&self) -> Result<BoxStream> {
        let tcp = TcpStream::connect(self.first_hop)
            .await
            .with_context(|| format!("connecting to {}", self.first_hop))?;
        tcp.set_nodelay(true)?;
        let mut stream: BoxStream = match &self.proxy_tls {
            Some(tls) => {
                let name = ServerName::IpAddress(self.first_hop.ip().into());
                Box::new(
                    tls.connect(name, tcp)
                        .await
                        .context("TLS handshake with the proxy")?,
                )
            }
            None => Box::new(tcp),
        };
        if let Some(request) = &self.connect_request {
            stream.write_all(request).await?;
            read_connect_answer(&mut stream).await?;
        }
        Ok(stream)
    }

    /// One HTTPS request on a new connection; returns the time to the first response byte.
    async fn https_request(&self) -> Result<Duration> {
        let start = Instant::now();
        let tcp = self.open().await?;
        let mut tls = self
            .tls
            .connect(self.server_name.clone(), tcp)
            .await
            .context("TLS handshake")?;
        tls.write_all(&self.http_request).await?;
        let mut buf = [0u8; 4096];
        let n = tls.read(&mut buf).await?;
        let first_byte = start.elapsed();
        let mut head = buf[..n].to_vec();
        loop {
            match tls.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) if head.len() < 64 => head.extend_from_slice(&buf[..n]),
                Ok(_) => {}
                // nginx may close without close_notify after `Connection: close`.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e.into()),
            }
        }
        if !head.starts_with(b"HTTP/1.1 200") {
            bail!("unexpected answer: {:?}", String::from_utf8_lossy(&head));
        }
        Ok(first_byte)
    }

    /// A tunnel to the byte source that has carried `len` bytes back.
    async fn pull(&self, len: u64) -> Result<BoxStream> {
        let mut tcp = self.open().await?;
        tcp.write_all(&len.to_be_bytes()).await?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = len;
        while left > 0 {
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                bail!("the byte stream ended {left} bytes early");
            }
            left = left.saturating_sub(n as u64);
        }
        Ok(tcp)
    }
}

/// Reads the proxy's answer head (nothing follows it until we speak) and wants a 200.
async fn read_connect_answer(tcp: &mut BoxStream) -> Result<()> {
    let mut head = Vec::new();
    let mut reader = BufReader::new(tcp);
    loop {
        let before = head.len();
        if reader.read_until(b'\n', &mut head).await? == 0 {
            bail!("the proxy closed during CONNECT");
        }
        if &head[before..] == b"\r\n" || head.len() > 8192 {
            break;
        }
    }
    // Nothing may be left buffered: the server speaks only after we do.
    if !reader.buffer().is_empty() {
        bail!("unexpected bytes after the CONNECT answer");
    }
    let status = String::from_utf8_lossy(&head);
    if !(status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200")) {
        bail!("CONNECT refused: {}", status.lines().next().unwrap_or(""));
    }
    Ok(())
}

async fn latency(client: &Client, count: usize) -> Result<Report> {
    let mut report = Report::default();
    for _ in 0..count {
        match timeout(CONN_TIMEOUT, client.https_request()).await {
            Ok(Ok(took)) => report.samples_us.push(took.as_micros() as u32),
            Ok(Err(e)) => report.error(format!("{e:#}")),
            Err(_) => report.error("timed out"),
        }
    }
    report.completed = report.samples_us.len() as u64;
    Ok(report)
}

async fn rate(client: &Arc<Client>, concurrency: usize, seconds: f64) -> Result<Report> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let completed = Arc::new(AtomicU64::new(0));
    let report = Arc::new(Mutex::new(Report::default()));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, completed, report) = (client.clone(), completed.clone(), report.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    match timeout(CONN_TIMEOUT, client.https_request()).await {
                        Ok(Ok(_)) => {
                            completed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => report.lock().await.error(format!("{e:#}")),
                        Err(_) => report.lock().await.error("timed out"),
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let mut report = report.lock().await.clone();
    report.seconds = start.elapsed().as_secs_f64();
    report.completed = completed.load(Ordering::Relaxed);
    Ok(report)
}

async fn bulk(client: &Arc<Client>, bytes: u64, tunnels: usize) -> Result<Report> {
    let each = bytes / tunnels as u64;
    let start = Instant::now();
    let tasks: Vec<_> = (0..tunnels)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.pull(each).await.map(drop) })
        })
        .collect();
    let mut report = Report::default();
    for task in tasks {
        match task.await? {
            Ok(()) => {
                report.completed += 1;
                report.bytes += each;
            }
            Err(e) => report.error(format!("{e:#}")),
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Opens `count` tunnels, each carrying one byte back so it is known to be set up end to end,
/// prints how many opened, waits for a line on stdin, prints how many are still open, closes.
async fn idle(client: &Arc<Client>, count: usize) -> Result<Report> {
    let opening = Arc::new(tokio::sync::Semaphore::new(256));
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let (client, opening) = (client.clone(), opening.clone());
            tokio::spawn(async move {
                let _permit = opening.acquire().await;
                timeout(CONN_TIMEOUT, client.pull(1)).await
            })
        })
        .collect();
    let mut report = Report::default();
    let mut open = Vec::with_capacity(count);
    for task in tasks {
        match task.await? {
            Ok(Ok(stream)) => open.push(stream),
            Ok(Err(e)) => report.error(format!("{e:#}")),
            Err(_) => report.error("timed out"),
        }
    }
    report.completed = open.len() as u64;
    println!("{}", serde_json::to_string(&report)?);
    let mut line = String::new();
    BufReader::new(tokio::io::stdin()).read_line(&mut line).await?;
    // Still open: nothing to read and no end of stream (a read without waiting is pending).
    let mut byte = [0u8; 1];
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut alive = 0;
    for stream in open.iter_mut() {
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        if tokio::io::AsyncRead::poll_read(std::pin::Pin::new(stream), &mut cx, &mut buf).is_pending() {
            alive += 1;
        }
    }
    drop(open);
    report.completed = alive as u64;
    println!("{}", serde_json::to_string(&report)?);
    Ok(report)
}

/// Times blocking connect() calls (then closes with RST, leaving no TIME_WAIT behind) of three
/// kinds: from a cgroup with nothing attached to `--bypass`'s address (no eBPF), from the
/// intercepted cgroup to `--bypass` (bypassed in the kernel), and from the intercepted cgroup
/// to `--deny` (EPERM in the kernel).
///
/// The kernel runs a socket's cgroup programs by the cgroup the socket was created in, so the
/// process creates a batch of sockets in each cgroup and then connects them in turn, one of each
/// kind after the other: background noise (a busy neighbour, CPUs waking up) falls on all three
/// alike, which batches of one kind at a time did not achieve.
fn connect_mode(args: &ClientArgs) -> Result<Report> {
    let plain = args.plain_cgroup.as_ref().context("--plain-cgroup")?;
    let intercepted = args.intercepted_cgroup.as_ref().context("--intercepted-cgroup")?;
    let targets = [
        socket2::SockAddr::from(args.bypass.context("--bypass")?),
        socket2::SockAddr::from(args.bypass.context("--bypass")?),
        socket2::SockAddr::from(args.deny.context("--deny")?),
    ];
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    let mut report = Report::default();
    let mut sample = 0usize;
    // One batch more than needed: the first warms caches up and is not recorded.
    let batches = args.count.div_ceil(args.batch) + 1;
    for batch in 0..batches {
        if Instant::now() > deadline {
            bail!("connect samples not done within {} s", args.timeout);
        }
        let mut sockets: [Vec<socket2::Socket>; 3] = Default::default();
        for (kind, cgroup) in [plain, intercepted, intercepted].into_iter().enumerate() {
            join_cgroup(cgroup)?;
            for _ in 0..args.batch {
                let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                // A plain blocking connect(); SO_SNDTIMEO bounds it.
                socket.set_write_timeout(Some(Duration::from_secs(5)))?;
                sockets[kind].push(socket);
            }
        }
        let [plain_batch, bypass_batch, deny_batch] = &sockets;
        for trio in plain_batch.iter().zip(bypass_batch).zip(deny_batch) {
            let trio = [trio.0.0, trio.0.1, trio.1];
            // Which kind goes first rotates too.
            for kind in (0..3).map(|k| (k + sample) % 3) {
                let socket = trio[kind];
                match kind {
                    1 => report.bypass_calls += 1,
                    2 => report.deny_calls += 1,
                    _ => {}
                }
                let start = Instant::now();
                let result = socket.connect(&targets[kind]);
                let took = start.elapsed().as_nanos() as u32;
                let _ = socket.set_linger(Some(Duration::ZERO));
                let expected = match (kind, &result) {
                    (0 | 1, Ok(())) => true,
                    (2, Err(e)) => e.raw_os_error() == Some(libc::EPERM),
                    _ => false,
                };
                if !expected {
                    report.error(format!("connect (kind {kind}): {result:?}"));
                } else if batch > 0 {
                    [&mut report.plain_ns, &mut report.bypass_ns, &mut report.deny_ns][kind].push(took);
                }
            }
            sample += 1;
        }
        // Closing (RST) the batch's sockets.
        drop(sockets);
        if report.errors > 100 {
            bail!("too many failed connects: {:?}", report.first_error);
        }
    }
    Ok(report)
}

fn join_cgroup(cgroup: &std::path::Path) -> Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("joining {}", cgroup.display()))
}
