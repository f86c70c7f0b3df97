//! A small, bounded pool of idle connections to one upstream proxy, already connected (and,
//! for `https://` proxies, past the TLS handshake), so a new tunnel skips those round trips.
//!
//! The pool fills on demand: once the proxy has answered a tunnel, dials start in the background
//! up to the pool's size. Connections idle longer than [`IDLE`] are closed and not replaced, so a
//! quiet host holds none; a proxy found closing idle connections sooner gets them kept for half
//! the age at which it did. Nothing the client sent ever goes down a pooled connection before it
//! is taken; a connection found closed or talking when taken is dropped.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, ReadBuf};

use super::UpstreamStream;
use crate::config::settings::MAX_WARM_UPSTREAM;

/// How long a pooled connection may wait to be used. Below the idle timeouts proxies apply to
/// connections that have sent no request yet (squid's `request_start_timeout`, 5 minutes).
pub const IDLE: Duration = Duration::from_secs(30);

pub struct WarmPool {
    size: usize,
    idle: Mutex<VecDeque<Idle>>,
    /// Dials under way, counted against `size`.
    dialling: AtomicUsize,
    /// No background dials before this, after one failed.
    quiet_until: Mutex<Option<Instant>>,
    /// How long a connection may wait: [`IDLE`], or less for a proxy seen closing them sooner.
    idle_limit: Mutex<Duration>,
    expiry_started: AtomicBool,
}

/// The shortest idle limit a proxy can teach the pool.
pub const MIN_IDLE: Duration = Duration::from_secs(1);

/// How long background dials pause after one failed.
const BACKOFF: Duration = Duration::from_secs(1);

struct Idle {
    stream: UpstreamStream,
    since: Instant,
}

impl WarmPool {
    /// A pool of up to `size` connections (0: no pool).
    pub fn new(size: usize) -> Option<Arc<Self>> {
        (size > 0).then(|| {
            Arc::new(Self {
                size: size.min(MAX_WARM_UPSTREAM),
                idle: Mutex::new(VecDeque::new()),
                dialling: AtomicUsize::new(0),
                quiet_until: Mutex::new(None),
                idle_limit: Mutex::new(IDLE),
                expiry_started: AtomicBool::new(false),
            })
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn idle_limit(&self) -> Duration {
        *self.idle_limit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently pooled connection that is still open and silent, if any. One the
    /// proxy closed while it waited teaches the pool to keep them for half as long as that; one
    /// that lasted most of the limit lets it grow back by a quarter (up to [`IDLE`]), so a
    /// proxy restart does not shorten it for good.
    pub fn take(&self) -> Option<UpstreamStream> {
        let limit = self.idle_limit();
        let mut idle = self.idle();
        while let Some(mut entry) = idle.pop_back() {
            let age = entry.since.elapsed();
            if age >= limit {
                continue;
            }
            let open = still_open_and_silent(&mut entry.stream);
            let learned = if open {
                (age >= limit * 3 / 4).then(|| (limit + limit / 4).min(IDLE))
            } else {
                Some((age / 2).max(MIN_IDLE).min(limit))
            };
            if let Some(learned) = learned {
                *self.idle_limit.lock().unwrap_or_else(|e| e.into_inner()) = learned;
            }
            if open {
                return Some(entry.stream);
            }
        }
        None
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.idle().len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Dials that would bring the pool to its size, counting those under way, reserved: each
    /// slot returns to the pool when filled, or when dropped unfilled (a failed or panicked dial).
    pub fn reserve_dials(self: &Arc<Self>) -> Vec<DialSlot> {
        (0..self.reserve_count())
            .map(|_| DialSlot {
                pool: self.clone(),
                done: false,
            })
            .collect()
    }

    fn reserve_count(self: &Arc<Self>) -> usize {
        if !self.expiry_started.swap(true, Ordering::Relaxed) {
            Self::spawn_expiry(self);
        }
        let quiet_until = *self.quiet_until.lock().unwrap_or_else(|e| e.into_inner());
        if quiet_until.is_some_and(|until| Instant::now() < until) {
            return 0;
        }
        let have = self.idle().len();
        let mut dialling = self.dialling.load(Ordering::Relaxed);
        loop {
            let missing = self.size.saturating_sub(have + dialling);
            if missing == 0 {
                return 0;
            }
            match self.dialling.compare_exchange(
                dialling,
                dialling + missing,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return missing,
                Err(now) => dialling = now,
            }
        }
    }

    /// Ends one reserved dial, pooling its connection if it succeeded.
    fn dialled(&self, stream: Option<UpstreamStream>) {
        if stream.is_none() {
            *self.quiet_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + BACKOFF);
        }
        if let Some(stream) = stream {
            let mut idle = self.idle();
            if idle.len() < self.size {
                idle.push_back(Idle {
                    stream,
                    since: Instant::now(),
                });
            }
        }
        self.dialling.fetch_sub(1, Ordering::Relaxed);
    }

    /// Closes connections idle for longer than the idle limit.
    fn expire(&self) {
        let limit = self.idle_limit();
        self.idle().retain(|entry| entry.since.elapsed() < limit);
    }

    /// Closes expired connections every second, until the pool itself is gone.
    fn spawn_expiry(pool: &Arc<Self>) {
        let pool: Weak<Self> = Arc::downgrade(pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MIN_IDLE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.expire();
            }
        });
    }
}

/// One reserved dial of a pool.
pub struct DialSlot {
    pool: Arc<WarmPool>,
    done: bool,
}

impl DialSlot {
    /// Ends the dial: pools its connection, or (None) pauses background dials for [`BACKOFF`].
    pub fn fill(mut self, stream: Option<UpstreamStream>) {
        self.done = true;
        self.pool.dialled(stream);
    }
}

impl Drop for DialSlot {
    fn drop(&mut self) {
        if !self.done {
            self.pool.dialled(None);
        }
    }
}

/// Whether a pooled connection is still open and has said nothing. The socket is asked first
/// (MSG_PEEK, without waiting): nothing to read is the good answer, end of stream or an error
/// the bad one. Bytes waiting are a bad sign on plain TCP; over TLS they may be what the proxy
/// sent after the handshake (TLS 1.3 session tickets), so TLS reads them without waiting, and
/// only Pending (no application data) is good.
fn still_open_and_silent(stream: &mut UpstreamStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::new(0u8)];
    let peeked = socket2::SockRef::from(stream.tcp()).peek(&mut byte);
    match peeked {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
        Ok(n) if n > 0 && matches!(stream, UpstreamStream::Tls(_)) => {}
        _ => return false,
    }
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(Pin::new(stream).poll_read(&mut cx, &mut buf), Poll::Pending)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dial that ends without filling its slot (failed, or its task panicked) gives the slot
    /// back, after pausing background dials: the pool can still fill later.
    #[tokio::test]
    async fn unfilled_dial_slots_come_back_after_the_backoff() {
        let pool = WarmPool::new(2).unwrap();
        let slots = pool.reserve_dials();
        assert_eq!(slots.len(), 2);
        assert!(pool.reserve_dials().is_empty(), "both dials are under way");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = slots;
            panic!("in the middle of a dial");
        }));
        assert!(panicked.is_err());
        assert!(pool.reserve_dials().is_empty(), "paused after the failure");
        tokio::time::sleep(BACKOFF + Duration::from_millis(100)).await;
        assert_eq!(pool.reserve_dials().len(), 2);
    }

    /// A connected pair on loopback: (the pool's end, the proxy's end).
    async fn pair() -> (UpstreamStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ours, theirs) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (UpstreamStream::Plain(ours.unwrap()), theirs.unwrap().0)
    }

    fn pooled(pool: &WarmPool, stream: UpstreamStream, age: Duration) {
        pool.idle().push_back(Idle {
            stream,
            since: Instant::now() - age,
        });
    }

    /// The idle limit follows the proxy: a connection it closed at 4 s halves the limit to 2 s;
    /// connections that last most of the limit let it grow back, up to [`IDLE`].
    #[tokio::test]
    async fn the_idle_limit_learns_from_the_proxy_and_grows_back() {
        let pool = WarmPool::new(4).unwrap();
        let (closed, proxy_end) = pair().await;
        drop(proxy_end);
        tokio::time::sleep(Duration::from_millis(50)).await;
        pooled(&pool, closed, Duration::from_secs(4));
        assert!(pool.take().is_none());
        let halved = pool.idle_limit();
        assert!(
            halved >= Duration::from_secs(2) && halved < Duration::from_millis(2100),
            "{halved:?}"
        );

        // Too old for the limit now: expired, not handed out.
        let (old, _proxy_end) = pair().await;
        pooled(&pool, old, Duration::from_millis(2500));
        assert!(pool.take().is_none());

        let mut limit = pool.idle_limit();
        let mut kept = Vec::new();
        while limit < IDLE {
            let (lasting, proxy_end) = pair().await;
            pooled(&pool, lasting, limit * 7 / 8);
            assert!(pool.take().is_some());
            kept.push(proxy_end);
            let grown = pool.idle_limit();
            assert!(grown > limit, "{grown:?} after {limit:?}");
            limit = grown;
        }
        assert_eq!(limit, IDLE);
    }
}
