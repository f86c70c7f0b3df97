//! A small, bounded pool of idle connections to one upstream proxy, already connected (and,
//! for `https://` proxies, past the TLS handshake), so a new tunnel skips those round trips.
//!
//! The pool fills on demand: taking a connection (or finding none) starts dials in the
//! background up to the pool's size. Connections idle longer than [`IDLE`] are closed and not
//! replaced, so a quiet host holds none. Nothing the client sent ever goes down a pooled
//! connection before it is taken; a connection found closed or talking when taken is dropped.

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

use super::upstream::UpstreamStream;

/// How long a pooled connection may wait to be used. Below the idle timeouts proxies apply to
/// connections that have sent no request yet (squid's `request_start_timeout`, 5 minutes).
pub const IDLE: Duration = Duration::from_secs(30);
/// The largest pool the configuration may ask for, per proxy.
pub const MAX_SIZE: usize = 64;

pub struct WarmPool {
    size: usize,
    idle: Mutex<VecDeque<Idle>>,
    /// Dials under way, counted against `size`.
    dialling: AtomicUsize,
    /// No background dials before this, after one failed.
    quiet_until: Mutex<Option<Instant>>,
    expiry_started: AtomicBool,
}

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
                size: size.min(MAX_SIZE),
                idle: Mutex::new(VecDeque::new()),
                dialling: AtomicUsize::new(0),
                quiet_until: Mutex::new(None),
                expiry_started: AtomicBool::new(false),
            })
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently pooled connection that is still open and silent, if any.
    pub fn take(&self) -> Option<UpstreamStream> {
        let mut idle = self.idle();
        while let Some(mut entry) = idle.pop_back() {
            if entry.since.elapsed() < IDLE && still_open_and_silent(&mut entry.stream) {
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

    /// How many dials would bring the pool to its size, counting those under way; reserves
    /// them (each must be ended with [`WarmPool::dialled`]).
    pub fn reserve_dials(self: &Arc<Self>) -> usize {
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
    pub fn dialled(&self, stream: Option<UpstreamStream>) {
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

    /// Closes connections idle for longer than [`IDLE`]; returns how many are left.
    pub fn expire(&self) -> usize {
        let mut idle = self.idle();
        idle.retain(|entry| entry.since.elapsed() < IDLE);
        idle.len()
    }

    /// Closes expired connections every [`IDLE`] / 4, until the pool itself is gone.
    fn spawn_expiry(pool: &Arc<Self>) {
        let pool: Weak<Self> = Arc::downgrade(pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE / 4);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.expire();
            }
        });
    }
}

/// Whether a pooled connection is still open and has said nothing: reads without waiting.
/// Pending (nothing to read) is the only good answer; for TLS this also takes in what the
/// proxy sent after the handshake (TLS 1.3 session tickets), which is not application data.
fn still_open_and_silent(stream: &mut UpstreamStream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(Pin::new(stream).poll_read(&mut cx, &mut buf), Poll::Pending)
}
