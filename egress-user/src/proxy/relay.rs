//! Moving bytes between the client and wherever it was routed, and ending connections.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

use super::{decision::Decision, splice};
use crate::upstream::UpstreamStream;

/// Closes with RST (SO_LINGER 0), so the client sees a reset rather than an orderly end of
/// stream it could mistake for a complete answer.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

fn reset_upstream(stream: UpstreamStream) {
    let _ = socket2::SockRef::from(stream.tcp()).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Relays until both directions are done. `to_upstream` (bytes already read from the client)
/// and `to_client` (bytes already read from upstream) are sent first, then let go. Half-close is
/// passed on; an error on either side resets both. `first_answer` runs once, when the first
/// bytes from upstream are on their way to the client.
pub async fn relay(
    mut client: TcpStream,
    mut upstream: UpstreamStream,
    to_upstream: Bytes,
    to_client: Bytes,
    decision: &mut Decision,
    first_answer: impl FnOnce(),
) {
    let mut first_answer = Some(first_answer);
    if !to_client.is_empty() {
        if let Some(first_answer) = first_answer.take() {
            first_answer();
        }
        if let Err(e) = client.write_all(&to_client).await {
            decision.fail(format!("writing to client: {e}"));
            return reset_both(client, upstream);
        }
        decision.bytes_down += to_client.len() as u64;
    }
    if !to_upstream.is_empty() {
        if let Err(e) = upstream.write_all(&to_upstream).await {
            decision.fail(format!("writing upstream: {e}"));
            return reset_both(client, upstream);
        }
        decision.bytes_up += to_upstream.len() as u64;
    }
    // Long-lived connections must not keep the sniffing and handshake buffers.
    drop((to_upstream, to_client));
    let copied = match &mut upstream {
        UpstreamStream::Plain(tcp) => copy_lean(&client, tcp, first_answer).await,
        UpstreamStream::Tls(tls) => copy_lean_tls(&mut client, tls.as_mut(), first_answer).await,
    };
    match copied {
        Ok(copied) => {
            decision.bytes_up += copied.up;
            decision.bytes_down += copied.down;
            decision.bytes_spliced += copied.spliced;
        }
        Err(e) => {
            decision.fail(format!("relay: {e}"));
            reset_both(client, upstream);
        }
    }
}

/// Size of each worker thread's relay buffer.
const RELAY_BUFFER: usize = 64 * 1024;

thread_local! {
    static BUFFER: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; RELAY_BUFFER].into_boxed_slice());
}

/// One direction of a TCP relay: what was read but not yet written (only under backpressure:
/// in a pipe, or in memory when no pipe could be had), and whether the source has ended.
#[derive(Default)]
struct Direction {
    /// A pipe holding this many bytes spliced from the source.
    piped: Option<(splice::Pipe, usize)>,
    /// The last fill filled the pipe: the source has more.
    full: bool,
    /// A drain said more would follow: TCP may hold the last bytes until [`splice::push`].
    held: bool,
    pending: Vec<u8>,
    eof: bool,
    done: bool,
    bytes: u64,
    /// Of `bytes`, those that went through a pipe.
    spliced: u64,
}

impl Direction {
    fn has_pending(&self) -> bool {
        self.piped.is_some() || !self.pending.is_empty()
    }
}

/// Copies both ways between two TCP sockets, like `copy_bidirectional`, but waits for readiness
/// before taking any resource: bytes move by splice(2) through a pipe taken from a per-thread
/// pool (or, when no pipe can be had, through a per-thread buffer), so an idle connection holds
/// neither, and one under backpressure holds at most one read's worth.
async fn copy_lean(
    a: &TcpStream,
    b: &TcpStream,
    mut first_answer: Option<impl FnOnce()>,
) -> io::Result<Copied> {
    let mut up = Direction::default(); // a -> b
    let mut down = Direction::default(); // b -> a
    while !(up.done && down.done) {
        let rounds = tokio::select! {
            ready = a.readable(), if !up.done && !up.has_pending() && !up.eof => { ready?; step(&mut up, a, b)? }
            ready = b.writable(), if !up.done && (up.has_pending() || up.eof) => { ready?; step(&mut up, a, b)? }
            ready = b.readable(), if !down.done && !down.has_pending() && !down.eof => { ready?; step(&mut down, b, a)? }
            ready = a.writable(), if !down.done && (down.has_pending() || down.eof) => { ready?; step(&mut down, b, a)? }
        };
        // Readiness costs no cooperative budget in tokio, so every round is charged here: a flow
        // whose sockets stay ready yields the event loop to the other connections every so often.
        for _ in 0..rounds {
            tokio::task::coop::consume_budget().await;
        }
        if (down.bytes > 0 || down.has_pending())
            && let Some(first_answer) = first_answer.take()
        {
            first_answer();
        }
    }
    Ok(Copied {
        up: up.bytes,
        down: down.bytes,
        spliced: up.spliced + down.spliced,
    })
}

/// One direction of the relay with a TLS side: what the destination did not take yet, and how
/// far it got.
#[derive(Default)]
struct StreamDirection {
    pending: Vec<u8>,
    /// Bytes were written since the last flush (TLS holds records until flushed or full).
    unflushed: bool,
    eof: bool,
    done: bool,
    bytes: u64,
}

/// Copies both ways between the client and a TLS stream to the proxy, like
/// `copy_bidirectional`, but without buffers of its own while idle: each direction reads into the
/// per-thread buffer (as much as the source has, up to its size, so records are written on in
/// large writes) and writes straight on; only what the destination does not take is kept.
async fn copy_lean_tls<A, B>(
    a: &mut A,
    b: &mut B,
    mut first_answer: Option<impl FnOnce()>,
) -> io::Result<Copied>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = StreamDirection::default(); // a -> b
    let mut down = StreamDirection::default(); // b -> a
    std::future::poll_fn(|cx| {
        let up_done = poll_stream_direction(&mut up, cx, a, b)?.is_ready();
        let down_done = poll_stream_direction(&mut down, cx, b, a)?.is_ready();
        if (down.bytes > 0 || !down.pending.is_empty())
            && let Some(first_answer) = first_answer.take()
        {
            first_answer();
        }
        if up_done && down_done {
            Poll::Ready(Ok::<_, io::Error>(()))
        } else {
            Poll::Pending
        }
    })
    .await?;
    Ok(Copied {
        up: up.bytes,
        down: down.bytes,
        spliced: 0,
    })
}

/// Moves what it can from `src` to `dst`; Ready once the direction is done (end of stream
/// passed on).
fn poll_stream_direction<R, W>(
    dir: &mut StreamDirection,
    cx: &mut Context<'_>,
    src: &mut R,
    dst: &mut W,
) -> Poll<io::Result<()>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        if dir.done {
            return Poll::Ready(Ok(()));
        }
        while !dir.pending.is_empty() {
            let n = ready!(Pin::new(&mut *dst).poll_write(cx, &dir.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            dir.pending.drain(..n);
            dir.bytes += n as u64;
            dir.unflushed = true;
        }
        dir.pending = Vec::new(); // give the memory back
        if dir.eof {
            // Shutting down flushes, and passes the half-close on (close_notify over TLS).
            ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
            dir.done = true;
            continue;
        }
        let read = BUFFER.with(|buffer| -> Poll<io::Result<()>> {
            let mut buffer = buffer.borrow_mut();
            let mut filled = ReadBuf::new(&mut buffer[..]);
            // As much as the source has now: TLS hands out one record per read.
            let mut source_waits = false;
            while filled.remaining() > 0 {
                let before = filled.filled().len();
                match Pin::new(&mut *src).poll_read(cx, &mut filled) {
                    Poll::Ready(Ok(())) if filled.filled().len() == before => {
                        dir.eof = before == 0;
                        break;
                    }
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        source_waits = true;
                        break;
                    }
                }
            }
            let data = filled.filled();
            if data.is_empty() {
                return if source_waits {
                    Poll::Pending
                } else {
                    Poll::Ready(Ok(()))
                };
            }
            let mut written = 0;
            while written < data.len() {
                match Pin::new(&mut *dst).poll_write(cx, &data[written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            dir.bytes += written as u64;
            dir.unflushed |= written > 0;
            dir.pending.extend_from_slice(&data[written..]);
            Poll::Ready(Ok(()))
        });
        match read {
            Poll::Ready(result) => result?,
            Poll::Pending => {
                // Nothing more to read now: let what was written go out.
                if dir.unflushed && Pin::new(&mut *dst).poll_flush(cx)?.is_ready() {
                    dir.unflushed = false;
                }
                return Poll::Pending;
            }
        }
    }
}

/// Bytes relayed each way, and how many of them moved by splice(2).
struct Copied {
    up: u64,
    down: u64,
    spliced: u64,
}

/// Fills and drains at most this many times per wakeup, so one bulk flow does not hold the
/// event loop (4 MiB with 256 KiB pipes).
const ROUNDS: usize = 16;

/// Moves what it can from `src` to `dst` without waiting: fills and drains again while fills
/// fill the pipe and `dst` takes it all, rather than going back to the event loop to learn what
/// a full pipe already said (the source has more). Returns how many rounds it made.
fn step(dir: &mut Direction, src: &TcpStream, dst: &TcpStream) -> io::Result<usize> {
    let mut rounds = 0;
    while rounds < ROUNDS {
        rounds += 1;
        if !dir.has_pending() && !dir.eof {
            dir.full = false;
            match splice::take() {
                Some(pipe) => fill_pipe(dir, pipe, src)?,
                None => copy_through_buffer(dir, src, dst)?,
            }
        }
        flush(dir, dst)?;
        if !dir.full || dir.has_pending() || dir.eof {
            break;
        }
    }
    if dir.held && !dir.has_pending() && !dir.full {
        // Drained, and the source had no more: let go of what a drain with `more` left held.
        splice::push(dst)?;
        dir.held = false;
    }
    if dir.eof && !dir.has_pending() && !dir.done {
        // Pass the half-close on.
        let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
        dir.done = true;
    }
    Ok(rounds)
}

/// Splices what `src` has into the (empty) pipe; the pipe goes back to the pool unless it
/// now holds bytes.
fn fill_pipe(dir: &mut Direction, pipe: splice::Pipe, src: &TcpStream) -> io::Result<()> {
    match splice::fill(&pipe, src) {
        Ok(0) => {
            dir.eof = true;
            splice::give_back(pipe);
        }
        Ok(n) => {
            dir.full = pipe.filled_by(n);
            dir.piped = Some((pipe, n));
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => splice::give_back(pipe),
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Without a pipe: reads into the per-thread buffer and writes from it; what `dst` does not take
/// now is kept in `pending`.
fn copy_through_buffer(dir: &mut Direction, src: &TcpStream, dst: &TcpStream) -> io::Result<()> {
    BUFFER.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        let n = match src.try_read(&mut buffer) {
            Ok(0) => {
                dir.eof = true;
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        let written = write_some(dst, &buffer[..n])?;
        dir.bytes += written as u64;
        dir.pending.extend_from_slice(&buffer[written..n]);
        Ok(())
    })
}

/// Writes out what the direction holds, until `dst` is full or nothing is left.
fn flush(dir: &mut Direction, dst: &TcpStream) -> io::Result<()> {
    if let Some((pipe, left)) = &mut dir.piped {
        while *left > 0 {
            match splice::drain(pipe, dst, *left, dir.full) {
                Ok(n) => {
                    dir.held = dir.full;
                    dir.bytes += n as u64;
                    dir.spliced += n as u64;
                    *left -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // A pipe still holding bytes is dropped with the direction, never pooled.
                Err(e) => return Err(e),
            }
        }
        if let Some((pipe, _)) = dir.piped.take() {
            splice::give_back(pipe);
        }
    } else if !dir.pending.is_empty() {
        let written = write_some(dst, &dir.pending)?;
        dir.bytes += written as u64;
        dir.pending.drain(..written);
        if dir.pending.is_empty() {
            dir.pending = Vec::new(); // give the memory back
        }
    }
    Ok(())
}

/// Writes as much of `data` as `dst` takes without waiting.
fn write_some(dst: &TcpStream, data: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < data.len() {
        match dst.try_write(&data[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

fn reset_both(client: TcpStream, upstream: UpstreamStream) {
    reset(client);
    reset_upstream(upstream);
}

/// Byte counts shared with whoever owns a [`PrefixedIo`].
#[derive(Default)]
pub struct ByteCounts {
    pub read: AtomicU64,
    pub written: AtomicU64,
}

/// A stream that first yields `prefix` (bytes already read while sniffing), then the stream's
/// own bytes; counts traffic both ways.
pub struct PrefixedIo<S> {
    prefix: Bytes,
    inner: S,
    counts: Arc<ByteCounts>,
}

impl<S> PrefixedIo<S> {
    pub fn new(prefix: Bytes, inner: S, counts: Arc<ByteCounts>) -> Self {
        Self {
            prefix,
            inner,
            counts,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefixedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            this.counts.read.fetch_add(n as u64, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.counts.read.fetch_add(n as u64, Ordering::Relaxed);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &poll {
            self.counts.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn prefixed_io_yields_prefix_then_stream_and_counts() {
        let (a, mut b) = tokio::io::duplex(64);
        let counts = Arc::new(ByteCounts::default());
        let mut io = PrefixedIo::new(Bytes::from_static(b"GET / "), a, counts.clone());
        b.write_all(b"HTTP/1.1\r\n").await.unwrap();
        let mut got = vec![0u8; 16];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
        io.write_all(b"answer").await.unwrap();
        assert_eq!(counts.read.load(Ordering::Relaxed), 16);
        assert_eq!(counts.written.load(Ordering::Relaxed), 6);
    }
}

#[cfg(test)]
mod lean_tests {
    use super::*;
    use tokio::{io::AsyncReadExt, net::TcpListener};

    /// A connected pair of TCP sockets on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Which copy a test runs.
    #[derive(Clone, Copy, PartialEq)]
    enum Copy {
        Pipes,
        Memory,
        /// The one for a TLS leg (generic over streams; plain TCP here).
        Streams,
    }

    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_backpressure_through_pipes() {
        copies_both_ways_with_half_close_and_backpressure(Copy::Pipes).await
    }

    #[tokio::test]
    async fn copies_both_ways_through_memory_when_no_pipe_can_be_had() {
        copies_both_ways_with_half_close_and_backpressure(Copy::Memory).await
    }

    #[tokio::test]
    async fn copies_both_ways_between_streams_as_for_a_tls_leg() {
        copies_both_ways_with_half_close_and_backpressure(Copy::Streams).await
    }

    /// The test runtime is single-threaded: the relay task runs on this thread, so the pipe
    /// switch (thread-local) applies to it. The first-answer hook runs once the upstream's first
    /// bytes arrive, not before.
    async fn copies_both_ways_with_half_close_and_backpressure(copy: Copy) {
        splice::NO_PIPES.set(copy == Copy::Memory);
        let (mut client, mut client_side) = pair().await;
        let (mut upstream_side, mut upstream) = pair().await;
        let answered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hook = answered.clone();
        let first_answer = Some(move || hook.store(true, Ordering::SeqCst));
        let relay = tokio::spawn(async move {
            match copy {
                Copy::Streams => copy_lean_tls(&mut client_side, &mut upstream_side, first_answer).await,
                _ => copy_lean(&client_side, &upstream_side, first_answer).await,
            }
        });

        // 8 MiB up, written before anyone reads: exercises backpressure and pending bytes.
        let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap(); // half-close: client is done sending
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer
        });
        let mut received = Vec::new();
        // Read slowly at first.
        let mut chunk = vec![0u8; 1024];
        for _ in 0..16 {
            let n = upstream.read(&mut chunk).await.unwrap();
            received.extend_from_slice(&chunk[..n]);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        upstream.read_to_end(&mut received).await.unwrap(); // sees the half-close as EOF
        assert_eq!(received.len(), data.len());
        assert!(received == data);
        assert!(!answered.load(Ordering::SeqCst), "nothing came back yet");
        upstream.write_all(b"answer after half-close").await.unwrap();
        upstream.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"answer after half-close");
        let copied = relay.await.unwrap().unwrap();
        assert!(answered.load(Ordering::SeqCst));
        assert_eq!((copied.up, copied.down), (data.len() as u64, 23));
        // Which path the bytes took: all through pipes, or none.
        let expected_spliced = if copy == Copy::Pipes {
            copied.up + copied.down
        } else {
            0
        };
        assert_eq!(copied.spliced, expected_spliced);
    }

    /// A request that exactly fills a pipe is drained saying more follows (SPLICE_F_MORE); once
    /// the source has no more, what TCP held for it must go out at once. With a one-page pipe the
    /// request is one short segment with nothing before it in flight, which TCP would otherwise
    /// hold for its probe timer (200 ms or more) each round; with a full-size pipe, several
    /// segments go first. Several rounds on one connection, each request whole in the relay's
    /// source socket before the relay reads it, each answered.
    #[tokio::test]
    async fn a_request_the_size_of_a_pipe_is_not_held_back() {
        for size in [4096, splice::CHUNK] {
            splice::set_pipe_size(size);
            let (mut client, client_side) = pair().await;
            let (upstream_side, mut upstream) = pair().await;
            for socket in [&client, &client_side, &upstream_side, &upstream] {
                socket.set_nodelay(true).unwrap();
            }
            for socket in [&client_side, &upstream] {
                socket2::SockRef::from(socket)
                    .set_recv_buffer_size(4 * size)
                    .unwrap();
            }
            socket2::SockRef::from(&client)
                .set_send_buffer_size(4 * size)
                .unwrap();
            let request: Vec<u8> = (0..size as u32).map(|i| (i % 241) as u8).collect();
            let (start, started) = tokio::sync::oneshot::channel::<()>();
            let relay = tokio::spawn(async move {
                started.await.unwrap();
                copy_lean(&client_side, &upstream_side, None::<fn()>).await
            });
            let mut start = Some(start);
            let pushes = splice::PUSHES.get();
            let began = std::time::Instant::now();
            const EXCHANGES: usize = 8;
            for round in 0..EXCHANGES {
                client.write_all(&request).await.unwrap();
                if let Some(start) = start.take() {
                    start.send(()).unwrap();
                }
                let mut received = vec![0u8; request.len()];
                tokio::time::timeout(Duration::from_secs(5), upstream.read_exact(&mut received))
                    .await
                    .unwrap_or_else(|_| panic!("{size}, round {round}: the request's tail was held back"))
                    .unwrap();
                assert!(received == request, "{size}, round {round}");
                upstream.write_all(b"ok").await.unwrap();
                let mut answer = [0u8; 2];
                tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut answer))
                    .await
                    .unwrap_or_else(|_| panic!("{size}, round {round}: no answer"))
                    .unwrap();
                assert_eq!(&answer, b"ok");
            }
            let took = began.elapsed();
            // Held each time, the exchanges would take 8 × 200 ms at least.
            assert!(
                took < Duration::from_millis(400),
                "{size}: {EXCHANGES} exchanges took {took:?}"
            );
            assert!(
                splice::PUSHES.get() - pushes >= EXCHANGES,
                "{size}: the requests were not drained with SPLICE_F_MORE and pushed"
            );
            drop((client, upstream));
            relay.await.unwrap().unwrap();
        }
        splice::set_pipe_size(splice::CHUNK);
    }

    /// With more than a pipe's worth waiting in the source, one wakeup moves more than one
    /// pipe: the loop ran (and the bytes still arrive whole and in order).
    #[tokio::test]
    async fn one_wakeup_moves_more_than_a_pipe_when_the_source_has_it() {
        let (client, client_side) = pair().await;
        let (upstream_side, upstream) = pair().await;
        let total = 32 * splice::CHUNK;
        let data: Vec<u8> = (0..total as u32).map(|i| (i % 239) as u8).collect();
        let sent = data.clone();
        let mut client = client.into_std().unwrap();
        client.set_nonblocking(false).unwrap();
        let writer = std::thread::spawn(move || std::io::Write::write_all(&mut client, &sent));
        let mut upstream = upstream.into_std().unwrap();
        upstream.set_nonblocking(false).unwrap();
        let reader = std::thread::spawn(move || {
            let mut received = vec![0u8; total];
            std::io::Read::read_exact(&mut upstream, &mut received).map(|()| received)
        });
        let mut dir = Direction::default();
        let mut most = 0;
        let relayed = async {
            while dir.bytes < total as u64 {
                if dir.has_pending() {
                    upstream_side.writable().await.unwrap();
                } else {
                    client_side.readable().await.unwrap();
                }
                most = most.max(step(&mut dir, &client_side, &upstream_side).unwrap());
            }
        };
        tokio::time::timeout(Duration::from_secs(30), relayed)
            .await
            .expect("the relay stalled");
        writer.join().unwrap().unwrap();
        assert!(reader.join().unwrap().unwrap() == data);
        assert!(most >= 2, "every wakeup moved one pipe at most");
    }

    #[tokio::test]
    async fn a_reset_on_one_side_is_an_error() {
        let (client, client_side) = pair().await;
        let (upstream_side, upstream) = pair().await;
        let relay = tokio::spawn(async move { copy_lean(&client_side, &upstream_side, None::<fn()>).await });
        socket2::SockRef::from(&upstream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(upstream);
        assert!(relay.await.unwrap().is_err());
        drop(client);
    }
}
