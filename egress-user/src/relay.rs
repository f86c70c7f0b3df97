//! Moving bytes between the client and wherever it was routed, and ending connections.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

use crate::{decision::Decision, upstream::UpstreamStream};

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
/// and `to_client` (bytes already read from upstream) are sent first. Half-close is passed on;
/// an error on either side resets both.
pub async fn relay(
    mut client: TcpStream,
    mut upstream: UpstreamStream,
    to_upstream: &[u8],
    to_client: &[u8],
    decision: &mut Decision,
) {
    if !to_client.is_empty() {
        if let Err(e) = client.write_all(to_client).await {
            decision.fail(format!("writing to client: {e}"));
            return reset_both(client, upstream);
        }
        decision.bytes_down += to_client.len() as u64;
    }
    if !to_upstream.is_empty() {
        if let Err(e) = upstream.write_all(to_upstream).await {
            decision.fail(format!("writing upstream: {e}"));
            return reset_both(client, upstream);
        }
        decision.bytes_up += to_upstream.len() as u64;
    }
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => {
            decision.bytes_up += up;
            decision.bytes_down += down;
        }
        Err(e) => {
            decision.fail(format!("relay: {e}"));
            reset_both(client, upstream);
        }
    }
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
