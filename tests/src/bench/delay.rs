//! A delay line: a TCP forwarder that stands for a network path with a one-way delay, where the
//! kernel has neither netem nor fq (see docs/benchmarks.md). Each chunk is held for the delay
//! in both directions, pipelined (a chunk waits for its own time, not for the one before it to
//! be written); a new connection's first byte waits one round trip from the accept, for the TCP
//! handshake the client would have waited for. A connection opened ahead of time (a warm pool)
//! has paid that wait before its first byte, as it would have on a real network. Every path of
//! a comparison goes through the same line, so its own cost cancels out of the ratios.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, tcp::OwnedReadHalf, tcp::OwnedWriteHalf},
    sync::mpsc,
    time::Instant,
};

use super::raise_nofile;

#[derive(clap::Args, Debug)]
pub struct DelayArgs {
    /// `LISTEN=TO@MS`: forwards connections to LISTEN on to TO, MS milliseconds one way
    /// (repeatable: one process serves every line of a run).
    #[arg(long = "line", required = true)]
    pub lines: Vec<String>,
}

/// One line: where it listens, where it forwards to, and its one-way delay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Line {
    pub listen: SocketAddr,
    pub to: SocketAddr,
    pub delay: Duration,
}

impl Line {
    pub fn parse(text: &str) -> Result<Self> {
        let (listen, rest) = text
            .split_once('=')
            .with_context(|| format!("--line {text}: expected LISTEN=TO@MS"))?;
        let (to, ms) = rest
            .split_once('@')
            .with_context(|| format!("--line {text}: expected LISTEN=TO@MS"))?;
        let ms: u64 = ms.parse().with_context(|| format!("--line {text}: delay {ms}"))?;
        if ms > 1000 {
            bail!("--line {text}: a delay over a second is not a network path");
        }
        Ok(Self {
            listen: listen
                .parse()
                .with_context(|| format!("--line {text}: {listen}"))?,
            to: to.parse().with_context(|| format!("--line {text}: {to}"))?,
            delay: Duration::from_millis(ms),
        })
    }

    pub fn arg(&self) -> String {
        format!("{}={}@{}", self.listen, self.to, self.delay.as_millis())
    }
}

/// Chunks in flight per direction before the reader waits: bounds memory (64 KiB each) while
/// keeping far more than a bandwidth-delay product of the runs here in flight.
const IN_FLIGHT: usize = 256;
const CHUNK: usize = 64 * 1024;

pub fn main(args: DelayArgs) -> Result<()> {
    raise_nofile();
    let lines: Vec<Line> = args.lines.iter().map(|l| Line::parse(l)).collect::<Result<_>>()?;
    // One thread: the line's timing must not depend on cross-thread wakeups.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let mut listeners = Vec::new();
            for line in lines {
                let listener = TcpListener::bind(line.listen)
                    .await
                    .with_context(|| format!("binding {}", line.listen))?;
                listeners.push(tokio::spawn(serve(listener, line)));
            }
            for listener in listeners {
                listener.await??;
            }
            Ok(())
        })
}

async fn serve(listener: TcpListener, line: Line) -> Result<()> {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let accepted = Instant::now();
            let Ok(Ok(server)) =
                tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(line.to)).await
            else {
                return;
            };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            // The handshake's round trip: nothing moves before it is over.
            let opens = accepted + 2 * line.delay;
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(
                direction(client_read, server_write, line.delay, opens),
                direction(server_read, client_write, line.delay, opens),
            );
        });
    }
}

/// One direction: a reader that stamps each chunk with the time it may leave, and a writer
/// that sends it then; end of stream is passed on in its turn, an error ends both halves.
async fn direction(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration, opens: Instant) {
    let (sender, mut receiver) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let reader = async move {
        loop {
            let mut chunk = vec![0u8; CHUNK];
            let n = from.read(&mut chunk).await.unwrap_or(0);
            chunk.truncate(n);
            let due = (Instant::now() + delay).max(opens);
            // An empty chunk is the end of stream.
            if sender.send((due, chunk)).await.is_err() || n == 0 {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = receiver.recv().await {
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            if chunk.is_empty() {
                let _ = to.shutdown().await;
                return;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_print_back() {
        let line = Line::parse("10.0.0.1:13128=10.0.0.1:3128@2").unwrap();
        assert_eq!(line.delay, Duration::from_millis(2));
        assert_eq!(line.to, "10.0.0.1:3128".parse().unwrap());
        assert_eq!(Line::parse(&line.arg()).unwrap(), line);
        for bad in [
            "10.0.0.1:1",
            "10.0.0.1:1=10.0.0.1:2",
            "a=b@1",
            "10.0.0.1:1=10.0.0.1:2@x",
            "10.0.0.1:1=10.0.0.1:2@5000",
        ] {
            assert!(Line::parse(bad).is_err(), "{bad}");
        }
    }

    /// The line holds the first byte one round trip from the accept, and each later chunk one
    /// delay, both ways; bytes arrive intact and the end of stream is passed on.
    #[tokio::test]
    async fn holds_the_first_byte_a_round_trip_and_each_chunk_the_delay() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    let _ = s.shutdown().await;
                    return;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = front.local_addr().unwrap();
        let delay = Duration::from_millis(30);
        tokio::spawn(serve(front, Line { listen, to, delay }));

        let started = Instant::now();
        let mut client = TcpStream::connect(listen).await.unwrap();
        client.write_all(b"first").await.unwrap();
        let mut got = [0u8; 5];
        client.read_exact(&mut got).await.unwrap();
        // The handshake's round trip, then one delay back (the one forward ends within it).
        let first = started.elapsed();
        assert!(first >= 3 * delay, "{first:?}");
        assert_eq!(&got, b"first");

        let sent = Instant::now();
        client.write_all(b"again").await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        let round_trip = sent.elapsed();
        assert!(
            round_trip >= 2 * delay && round_trip < 2 * delay + Duration::from_millis(25),
            "{round_trip:?}"
        );
        assert_eq!(&got, b"again");
        client.shutdown().await.unwrap();
        assert_eq!(
            client.read(&mut got).await.unwrap(),
            0,
            "end of stream passed on both ways"
        );
    }
}
