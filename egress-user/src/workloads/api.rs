//! The one HTTP request shape egress makes of the APIs that say what a cgroup holds (the
//! container engine's, the Kubernetes API server's): a blocking HTTP/1.0 GET, one per
//! connection (so no chunked bodies), with one deadline for the whole answer and a size limit,
//! and httparse for the response head.

use std::{
    io::{ErrorKind, Read, Write},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// An answer: its status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// A stream whose reads can be given a time limit.
pub trait TimedRead: Read + Write {
    fn set_read_limit(&mut self, limit: Duration) -> std::io::Result<()>;
}

/// GET `path` from `host` over `stream`, with `headers` (each `Name: value\r\n`). `what` names
/// the API in errors. The answer must be complete within `timeout` and at most `max` bytes.
pub fn get(
    stream: &mut dyn TimedRead,
    what: &str,
    host: &str,
    path: &str,
    headers: &str,
    timeout: Duration,
    max: usize,
) -> Result<Answer> {
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n{headers}\r\n")
        .and_then(|()| stream.flush())
        .with_context(|| format!("{what}: sending GET {path}"))?;
    // One deadline for the whole answer: one that trickles in must not hold egress.
    let deadline = Instant::now() + timeout;
    let mut response = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(answer) = complete(&response, what, path)? {
            return Ok(answer);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("{what}: no complete answer to GET {path} within {timeout:?}");
        }
        stream.set_read_limit(left)?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            // A TLS peer that closes without close_notify: the end is known only from a
            // Content-Length, which `complete` looked for.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => 0,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("{what}: no complete answer to GET {path} within {timeout:?}")
            }
            Err(e) => return Err(e).with_context(|| format!("{what}: reading the answer to GET {path}")),
        };
        if n == 0 {
            return ended(&response, what, path);
        }
        response.extend_from_slice(&chunk[..n]);
        if response.len() > max {
            bail!("{what}: answer to GET {path} larger than {max} bytes");
        }
    }
}

/// A response head: the status, where the body starts, and its Content-Length if it has one.
struct Head {
    status: u16,
    body_start: usize,
    length: Option<usize>,
}

/// The head, once all of it is in.
fn head(response: &[u8], what: &str, path: &str) -> Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut head = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(body_start) = head
        .parse(response)
        .with_context(|| format!("{what}: malformed answer to GET {path}"))?
    else {
        return Ok(None);
    };
    let length = head
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .with_context(|| format!("{what}: bad Content-Length in the answer to GET {path}"))
        })
        .transpose()?;
    Ok(Some(Head {
        status: head.code.unwrap_or(0),
        body_start,
        length,
    }))
}

/// The answer, if its head is in and it says how long its body is and all of that is in.
fn complete(response: &[u8], what: &str, path: &str) -> Result<Option<Answer>> {
    Ok(head(response, what, path)?.and_then(|head| {
        let length = head.length?;
        (response.len() - head.body_start >= length).then(|| Answer {
            status: head.status,
            body: response[head.body_start..head.body_start + length].to_vec(),
        })
    }))
}

/// The answer at the end of the stream: what `complete` would not take yet is whole now,
/// unless it announced more than came.
fn ended(response: &[u8], what: &str, path: &str) -> Result<Answer> {
    let Some(head) = head(response, what, path)? else {
        bail!("{what}: incomplete answer to GET {path}");
    };
    if head.length.is_some() {
        bail!("{what}: the answer to GET {path} ended before its Content-Length");
    }
    Ok(Answer {
        status: head.status,
        body: response[head.body_start..].to_vec(),
    })
}

impl TimedRead for std::os::unix::net::UnixStream {
    fn set_read_limit(&mut self, limit: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(limit))
    }
}

impl TimedRead for rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    fn set_read_limit(&mut self, limit: Duration) -> std::io::Result<()> {
        self.sock.set_read_timeout(Some(limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A canned answer, delivered in pieces of `step` bytes, then EOF (or an error).
    struct Canned {
        data: Vec<u8>,
        at: usize,
        step: usize,
        end: Option<ErrorKind>,
        sent: Vec<u8>,
    }

    impl Read for Canned {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.at == self.data.len() {
                return match self.end {
                    Some(kind) => Err(kind.into()),
                    None => Ok(0),
                };
            }
            let n = self.step.min(buf.len()).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    impl Write for Canned {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.sent.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl TimedRead for Canned {
        fn set_read_limit(&mut self, _: Duration) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn fetch(answer: &str, end: Option<ErrorKind>, max: usize) -> Result<Answer> {
        let mut stream = Canned {
            data: answer.as_bytes().to_vec(),
            at: 0,
            step: 7,
            end,
            sent: Vec::new(),
        };
        let result = get(
            &mut stream,
            "the API",
            "api.test",
            "/x?y=1",
            "Authorization: Bearer t\r\n",
            Duration::from_secs(1),
            max,
        );
        let sent = String::from_utf8(stream.sent).unwrap();
        assert_eq!(
            sent,
            "GET /x?y=1 HTTP/1.0\r\nHost: api.test\r\nAuthorization: Bearer t\r\n\r\n"
        );
        result
    }

    #[test]
    fn answers_end_by_length_or_by_eof() {
        // The status and body, or what the error says.
        type Want = Result<(u16, &'static str), &'static str>;
        let cases: [(&str, Option<ErrorKind>, Want); 8] = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
                None,
                Ok((200, "{}")),
            ),
            // Taken at its length: what follows (or a missing close_notify) does not matter.
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
                Some(ErrorKind::UnexpectedEof),
                Ok((200, "{}")),
            ),
            ("HTTP/1.0 404 Not Found\r\n\r\nnone", None, Ok((404, "none"))),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}",
                None,
                Err("ended before its Content-Length"),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}",
                Some(ErrorKind::UnexpectedEof),
                Err("ended before its Content-Length"),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n{}",
                None,
                Err("bad Content-Length"),
            ),
            ("HTTP/1.1 200 OK\r\nContent-", None, Err("incomplete answer")),
            ("garbage\r\n\r\n", None, Err("malformed answer")),
        ];
        for (answer, end, want) in cases {
            let got = fetch(answer, end, 1 << 20);
            match want {
                Ok((status, body)) => {
                    let got = got.unwrap_or_else(|e| panic!("{answer:?}: {e:#}"));
                    assert_eq!(
                        (got.status, got.body.as_slice()),
                        (status, body.as_bytes()),
                        "{answer:?}"
                    );
                }
                Err(needle) => {
                    let error = format!("{:#}", got.unwrap_err());
                    assert!(
                        error.contains(needle) && error.contains("the API"),
                        "{answer:?}: {error}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_answer_over_the_limit_is_refused() {
        let body = "x".repeat(100);
        let answer = format!("HTTP/1.0 200 OK\r\n\r\n{body}");
        let error = format!("{:#}", fetch(&answer, None, 64).unwrap_err());
        assert!(error.contains("larger than 64 bytes"), "{error}");
        assert!(fetch(&answer, None, 1024).is_ok());
    }

    #[test]
    fn a_stalled_answer_is_a_timeout() {
        let error = format!(
            "{:#}",
            fetch("HTTP/1.0 200 OK\r\n", Some(ErrorKind::WouldBlock), 1024).unwrap_err()
        );
        assert!(error.contains("no complete answer"), "{error}");
    }
}
