//! An ordered list of upstream proxies (a route's, or `https_proxy`'s): a connection goes to
//! the first one up. One that cannot be reached (refused, silent, TLS failing, closing before it
//! answers) is marked down, with a backoff, and the next one is tried at once, before anything
//! of the client's was sent: the client never sees a failure another proxy could have served. A
//! background probe finds it back. A proxy that answers (even 403 or 502) is up: its answer
//! stands, since another proxy would most likely give the same for that destination.

use std::{
    fmt,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::{ProxyClient, Tunnel, UpstreamError, UpstreamStream};

/// Backoff of a proxy found down: doubling from the first, up to the last.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the probe looks at the proxies that are down.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// One proxy of the list and what is known of it.
pub struct Member {
    pub client: ProxyClient,
    down: Mutex<Option<Down>>,
    /// Failures since the proxy last carried a connection: the backoff grows with them, and a
    /// probe that reaches the proxy does not reset them (a proxy that takes TCP but answers no
    /// CONNECT must not be tried at full rate).
    failures: AtomicU32,
    /// Connections that moved on past this proxy because it failed.
    failovers: AtomicU64,
}

#[derive(Clone, Debug)]
struct Down {
    since: Instant,
    retry_at: Instant,
    why: String,
}

/// A proxy's state, for /health, /metrics and `egress status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemberState {
    pub proxy: String,
    pub up: bool,
    /// Why it is down, and for how long (seconds).
    pub why: Option<String>,
    pub down_for: Option<u64>,
    pub failovers: u64,
}

#[derive(Clone)]
pub struct ProxyGroup {
    inner: Arc<Inner>,
}

struct Inner {
    members: Vec<Member>,
    /// Whether a probe task runs (while any member is down).
    probing: AtomicBool,
}

impl fmt::Debug for ProxyGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl fmt::Display for ProxyGroup {
    /// The proxies, as configured (space-separated), credentials hidden.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self
            .inner
            .members
            .iter()
            .map(|m| m.client.url.to_string())
            .collect();
        f.write_str(&names.join(" "))
    }
}

impl Member {
    fn is_up(&self) -> bool {
        self.lock().is_none()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Down>> {
        self.down.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_up(&self) {
        let was = self.lock().take();
        if let Some(down) = was {
            tracing::info!(
                proxy = %self.client.url.authority(),
                down_for_ms = down.since.elapsed().as_millis() as u64,
                "upstream proxy is back"
            );
        }
    }

    /// It carried a connection: up, and its failures forgotten.
    fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.mark_up();
    }

    fn mark_down(&self, why: &UpstreamError) {
        let mut down = self.lock();
        let now = Instant::now();
        let failures = self.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (failures - 1).min(5))
            .min(MAX_BACKOFF);
        if down.is_none() {
            tracing::warn!(
                proxy = %self.client.url.authority(),
                "upstream proxy is down: {why}; connections go to the next one"
            );
        }
        *down = Some(Down {
            since: down.as_ref().map_or(now, |d| d.since),
            retry_at: now + backoff,
            why: why.to_string(),
        });
    }

    pub fn state(&self) -> MemberState {
        let down = self.lock().clone();
        MemberState {
            proxy: self.client.url.authority(),
            up: down.is_none(),
            down_for: down.as_ref().map(|d| d.since.elapsed().as_secs()),
            why: down.map(|d| d.why),
            failovers: self.failovers.load(Ordering::Relaxed),
        }
    }
}

impl ProxyGroup {
    pub fn new(clients: Vec<ProxyClient>) -> Self {
        let members = clients
            .into_iter()
            .map(|client| Member {
                client,
                down: Mutex::new(None),
                failures: AtomicU32::new(0),
                failovers: AtomicU64::new(0),
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                members,
                probing: AtomicBool::new(false),
            }),
        }
    }

    pub fn members(&self) -> &[Member] {
        &self.inner.members
    }

    /// The proxies' `host:port`, space-separated: for logs (no user names).
    pub fn authorities(&self) -> String {
        let names: Vec<String> = self.members().iter().map(|m| m.client.url.authority()).collect();
        names.join(" ")
    }

    /// The order to try them in: those up, as configured; then those down, the one due for a
    /// retry soonest first (when all are down, a connection still tries each).
    fn order(&self) -> Vec<&Member> {
        let mut up: Vec<&Member> = self.members().iter().filter(|m| m.is_up()).collect();
        let mut down: Vec<(&Member, Instant)> = self
            .members()
            .iter()
            .filter_map(|m| m.lock().as_ref().map(|d| (m, d.retry_at)))
            .collect();
        down.sort_by_key(|(_, retry_at)| *retry_at);
        up.extend(down.into_iter().map(|(m, _)| m));
        up
    }

    /// `CONNECT target` through the first proxy that can be reached (with the client's
    /// `first_bytes` ahead of its answer where it allows that); which one it was. A proxy that
    /// answered anything but 200 ends it: that answer stands, and nothing goes to the next.
    pub async fn open_tunnel(
        &self,
        target: &str,
        first_bytes: &Bytes,
    ) -> Result<(Tunnel, &Member), UpstreamError> {
        let mut failures = Vec::new();
        for member in self.order() {
            match member.client.open_tunnel(target, first_bytes).await {
                Ok(tunnel) => {
                    member.succeeded();
                    return Ok((tunnel, member));
                }
                Err(e) if e.is_proxy_failure() => {
                    member.failovers.fetch_add(1, Ordering::Relaxed);
                    // A refused ticket is this host's Kerberos with that proxy, not the proxy
                    // being down: it is not probed back.
                    if !matches!(e, UpstreamError::Negotiate(_)) {
                        self.mark_down(member, &e);
                    }
                    failures.push((member, e));
                }
                Err(e) => return Err(e),
            }
        }
        Err(all_failed(failures))
    }

    /// A connection to the first proxy that can be reached (for forwarded requests); whether it
    /// came warm, and from which proxy.
    pub async fn connect(&self) -> Result<(UpstreamStream, bool, &Member), UpstreamError> {
        let mut failures = Vec::new();
        for member in self.order() {
            match member.client.connect().await {
                Ok((stream, warm)) => {
                    // A new connection shows the proxy is there; a ready one shows nothing yet.
                    if !warm {
                        member.mark_up();
                    }
                    return Ok((stream, warm, member));
                }
                Err(e) => {
                    member.failovers.fetch_add(1, Ordering::Relaxed);
                    self.mark_down(member, &e);
                    failures.push((member, e));
                }
            }
        }
        Err(all_failed(failures))
    }

    pub fn states(&self) -> Vec<MemberState> {
        self.members().iter().map(Member::state).collect()
    }

    fn mark_down(&self, member: &Member, why: &UpstreamError) {
        member.mark_down(why);
        self.probe();
    }

    /// Probes the proxies that are down, in the background, until all are up again (or the
    /// list is dropped, as on a reload).
    fn probe(&self) {
        if self.inner.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let list: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let Some(inner) = list.upgrade() else { return };
                let now = Instant::now();
                for member in &inner.members {
                    let due = member.lock().as_ref().is_some_and(|d| d.retry_at <= now);
                    if !due {
                        continue;
                    }
                    match member.client.dial().await {
                        Ok(_) => member.mark_up(),
                        Err(e) => member.mark_down(&e),
                    }
                }
                if inner.members.iter().all(Member::is_up) {
                    inner.probing.store(false, Ordering::Release);
                    // A member marked down between the check and the store starts another.
                    if inner.members.iter().all(Member::is_up) {
                        return;
                    }
                    if inner.probing.swap(true, Ordering::AcqRel) {
                        return;
                    }
                }
            }
        });
    }
}

/// The error of a list whose every proxy failed: the last one's, naming the others.
fn all_failed(mut failures: Vec<(&Member, UpstreamError)>) -> UpstreamError {
    let Some((_, last)) = failures.pop() else {
        return UpstreamError::Protocol("no upstream proxy configured".into());
    };
    if failures.is_empty() {
        return last;
    }
    let others: Vec<String> = failures
        .iter()
        .map(|(m, e)| format!("{}: {e}", m.client.url.authority()))
        .collect();
    UpstreamError::AllFailed(format!("{last}; before that {}", others.join("; ")))
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::config::{Timeouts, proxy_url::ProxyUrl};

    const TIMEOUTS: Timeouts = Timeouts {
        connect: Duration::from_secs(2),
        handshake: Duration::from_secs(2),
    };

    /// A loopback listener for a fake proxy (see [`serve`]); its address, and a count of the
    /// CONNECTs it will get.
    async fn proxy() -> (ProxyUrl, Arc<AtomicU64>, TcpListener) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = ProxyUrl::parse(&format!(
            "http://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        ))
        .unwrap();
        (url, Arc::new(AtomicU64::new(0)), listener)
    }

    fn serve(
        listener: TcpListener,
        answer: &'static [u8],
        count: Arc<AtomicU64>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let count = count.clone();
                tokio::spawn(async move {
                    if super::super::read_request_head(&mut stream).await.is_none() {
                        return;
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                    let _ = stream.write_all(answer).await;
                    let _ = stream.read(&mut [0u8; 1]).await;
                });
            }
        })
    }

    /// A loopback address nothing listens on (connections are refused).
    async fn closed() -> ProxyUrl {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        ProxyUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap()
    }

    fn group(urls: &[&ProxyUrl]) -> ProxyGroup {
        ProxyGroup::new(
            urls.iter()
                .map(|u| ProxyClient::new((*u).clone(), None, 0, TIMEOUTS))
                .collect(),
        )
    }

    #[tokio::test]
    async fn a_refused_proxy_is_passed_over_marked_down_and_probed_back() {
        let down = closed().await;
        let (up, count, listener) = proxy().await;
        let _served = serve(listener, b"HTTP/1.1 200 OK\r\n\r\n", count.clone());
        let list = group(&[&down, &up]);
        for _ in 0..3 {
            let (_, member) = list.open_tunnel("example.org:443", &Bytes::new()).await.unwrap();
            assert_eq!(member.client.url, up);
        }
        assert_eq!(count.load(Ordering::Relaxed), 3);
        let states = list.states();
        assert!(!states[0].up && states[1].up, "{states:?}");
        assert!(
            states[0].why.as_deref().unwrap_or_default().contains("refused"),
            "{states:?}"
        );
        // Tried once, then skipped while down: one failover, not three.
        assert_eq!(states[0].failovers, 1);

        // It comes back on the same port: the probe finds it, and it is first again.
        let port = down.port;
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let back = Arc::new(AtomicU64::new(0));
        let _served_back = serve(listener, b"HTTP/1.1 200 OK\r\n\r\n", back.clone());
        tokio::time::timeout(Duration::from_secs(10), async {
            while !list.states()[0].up {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the probe did not find the proxy back");
        let (_, member) = list.open_tunnel("example.org:443", &Bytes::new()).await.unwrap();
        assert_eq!(member.client.url, down);
        assert_eq!(back.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_proxys_own_answer_stands_and_all_failing_says_each() {
        let (refusing, count, listener) = proxy().await;
        let _served = serve(listener, b"HTTP/1.1 403 Forbidden\r\n\r\n", count.clone());
        let (other, other_count, listener) = proxy().await;
        let _other = serve(listener, b"HTTP/1.1 200 OK\r\n\r\n", other_count.clone());
        let list = group(&[&refusing, &other]);
        let e = list
            .open_tunnel("blocked.example:443", &Bytes::new())
            .await
            .err()
            .unwrap();
        assert_eq!(e.status(), Some(403));
        assert_eq!(
            other_count.load(Ordering::Relaxed),
            0,
            "a 403 went on to the next proxy"
        );
        assert!(list.states()[0].up);

        let (a, b) = (closed().await, closed().await);
        let e = group(&[&a, &b])
            .open_tunnel("x.example:443", &Bytes::new())
            .await
            .err()
            .unwrap();
        let text = e.to_string();
        assert!(
            text.contains(&a.authority()) && text.contains(&b.authority()),
            "{text}"
        );
        assert!(text.contains("every proxy of the list failed"), "{text}");
    }

    #[tokio::test]
    async fn forwarded_requests_fail_over_too() {
        let down = closed().await;
        let (up, count, listener) = proxy().await;
        let _served = serve(listener, b"HTTP/1.1 200 OK\r\n\r\n", count);
        let list = group(&[&down, &up]);
        let (_, warm, member) = list.connect().await.unwrap();
        assert!(!warm);
        assert_eq!(member.client.url, up);
        assert!(!list.states()[0].up);
    }
}
