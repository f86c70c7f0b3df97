//! DNS over TCP, relayed message by message (a two-byte length before each, RFC 1035 4.2.2)
//! between an application and the resolver it asked, so that the record learns from the answers
//! as it does from UDP ones. This is what a resolver does when a UDP answer comes back truncated.
//! Anything that is not DNS ends the connection with a reset: port 53 goes direct for DNS only.

use std::{net::IpAddr, time::Duration};

use bytes::{Buf, BytesMut};
use hickory_proto::op::{Message, MessageType};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::{decision::Decision, relay::reset};
use crate::dns::Watch;

/// A connection with no message for this long is closed (resolvers close theirs sooner).
const IDLE: Duration = Duration::from_secs(30);

/// Where a relayed connection's messages are recorded.
pub struct Observer<'a> {
    pub watch: &'a Watch,
    pub netns: u64,
    pub resolver: IpAddr,
    /// Names the connection in the record (as a socket cookie names a UDP socket).
    pub connection: u64,
}

/// Relays until either side closes; resets the client on anything that is not DNS.
pub async fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    first_bytes: BytesMut,
    observer: Observer<'_>,
    decision: &mut Decision,
) {
    let carried = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        tokio::try_join!(
            carry(client_read, server_write, first_bytes, false, &observer),
            carry(server_read, client_write, BytesMut::new(), true, &observer),
        )
    };
    match carried {
        Ok((up, down)) => {
            decision.bytes_up = up;
            decision.bytes_down = down;
        }
        Err(e) => {
            decision.fail(format!("DNS over TCP: {e}"));
            reset(client);
        }
    }
}

/// Carries whole messages from `from` to `to` (queries, or with `answers` responses), recording
/// each; the bytes carried. A clean end of stream between messages ends the direction.
async fn carry(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut buffered: BytesMut,
    answers: bool,
    observer: &Observer<'_>,
) -> Result<u64, String> {
    let side = if answers { "the resolver" } else { "the client" };
    let mut carried = 0u64;
    loop {
        let Some(message) = read_message(&mut from, &mut buffered)
            .await
            .map_err(|e| format!("{side}: {e}"))?
        else {
            let _ = to.shutdown().await;
            return Ok(carried);
        };
        check(&message, answers).map_err(|e| format!("{side} sent {e}"))?;
        observer.watch.observe_tcp(
            observer.netns,
            observer.connection,
            observer.resolver,
            answers,
            &message,
        );
        let length = (message.len() as u16).to_be_bytes();
        to.write_all(&length).await.map_err(|e| e.to_string())?;
        to.write_all(&message).await.map_err(|e| e.to_string())?;
        carried += 2 + message.len() as u64;
    }
}

/// The next length-prefixed message; None at a clean end of stream.
async fn read_message(
    from: &mut (impl AsyncRead + Unpin),
    buffered: &mut BytesMut,
) -> std::io::Result<Option<Vec<u8>>> {
    loop {
        if buffered.len() >= 2 {
            let length = usize::from(u16::from_be_bytes([buffered[0], buffered[1]]));
            if buffered.len() >= 2 + length {
                buffered.advance(2);
                return Ok(Some(buffered.split_to(length).to_vec()));
            }
        }
        let read = tokio::time::timeout(IDLE, from.read_buf(buffered))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "idle"))??;
        if read == 0 {
            return if buffered.is_empty() {
                Ok(None)
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the stream ended inside a message",
                ))
            };
        }
    }
}

/// Whether `message` is a DNS query with one question (or, with `answer`, a response).
fn check(message: &[u8], answer: bool) -> Result<(), String> {
    let parsed = Message::from_vec(message).map_err(|e| format!("no DNS message ({e})"))?;
    match (answer, parsed.message_type()) {
        (false, MessageType::Query) if parsed.queries().len() == 1 => Ok(()),
        (false, _) => Err("a DNS message that is not a query of one question".into()),
        (true, MessageType::Response) => Ok(()),
        (true, _) => Err("a DNS message that is not a response".into()),
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::Query,
        rr::{Name, RecordType},
    };

    use super::*;

    fn query(id: u16) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(id);
        m.set_message_type(MessageType::Query);
        m.add_query(Query::query(
            Name::from_ascii("a.example.").unwrap(),
            RecordType::A,
        ));
        m.to_vec().unwrap()
    }

    fn framed(messages: &[&[u8]]) -> Vec<u8> {
        messages
            .iter()
            .flat_map(|m| {
                (m.len() as u16)
                    .to_be_bytes()
                    .into_iter()
                    .chain(m.iter().copied())
            })
            .collect()
    }

    #[tokio::test]
    async fn messages_are_read_whole_however_the_bytes_arrive() {
        let (q1, q2) = (query(1), query(2));
        let wire = framed(&[&q1, &q2]);
        for split in [1, 2, 3, wire.len() / 2, wire.len() - 1] {
            let (mut writer, mut reader) = tokio::io::duplex(64);
            let (head, tail) = wire.split_at(split);
            let (head, tail) = (head.to_vec(), tail.to_vec());
            let written = tokio::spawn(async move {
                writer.write_all(&head).await.unwrap();
                tokio::task::yield_now().await;
                writer.write_all(&tail).await.unwrap();
            });
            let mut buffered = BytesMut::new();
            assert_eq!(
                read_message(&mut reader, &mut buffered).await.unwrap(),
                Some(q1.clone())
            );
            assert_eq!(
                read_message(&mut reader, &mut buffered).await.unwrap(),
                Some(q2.clone())
            );
            written.await.unwrap();
            assert_eq!(
                read_message(&mut reader, &mut buffered).await.unwrap(),
                None,
                "{split}"
            );
        }
        // Cut inside a message: an error, not a clean end.
        let (mut writer, mut reader) = tokio::io::duplex(64);
        writer.write_all(&framed(&[&q1])[..5]).await.unwrap();
        drop(writer);
        assert!(read_message(&mut reader, &mut BytesMut::new()).await.is_err());
    }

    #[test]
    fn only_dns_passes() {
        let q = query(7);
        let mut response = Message::from_vec(&q).unwrap();
        response.set_message_type(MessageType::Response);
        let response = response.to_vec().unwrap();
        assert_eq!(check(&q, false), Ok(()));
        assert_eq!(check(&response, true), Ok(()));
        assert!(check(&response, false).unwrap_err().contains("not a query"));
        assert!(check(&q, true).unwrap_err().contains("not a response"));
        assert!(
            check(b"GET / HTTP/1.1\r\n\r\n", false)
                .unwrap_err()
                .contains("no DNS message")
        );
        assert!(check(b"", false).is_err());
    }
}
