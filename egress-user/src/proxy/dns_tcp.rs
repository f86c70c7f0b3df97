//! DNS over TCP, relayed message by message (a two-byte length before each, RFC 1035 4.2.2)
//! between an application and the resolver it asked, so that the record learns from the answers
//! as it does from UDP ones. This is what a resolver does when a UDP answer comes back truncated.
//! Anything that is not DNS ends the connection with a reset: port 53 goes direct for DNS only.
//! A query is one question and nothing else (no records of its own but EDNS, no bytes after
//! it); a response must answer a query still open on the connection.

use std::{collections::HashSet, net::IpAddr, sync::Mutex, time::Duration};

use bytes::{Buf, BytesMut};
use hickory_proto::{
    op::{Message, MessageType},
    serialize::binary::{BinDecodable, BinDecoder},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::{decision::Decision, relay::reset};
use crate::dns::Watch;

/// A connection with no message for this long is closed (resolvers close theirs sooner).
const IDLE: Duration = Duration::from_secs(30);
/// Queries one connection may carry, and open at once.
const MAX_QUERIES: usize = 256;
const MAX_OPEN: usize = 16;
/// The longest query (a question with EDNS options fits well within).
const MAX_QUERY: usize = 1232;

/// A query asked on the connection and not answered yet: its id and question.
type Open = (u16, String, u16);

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
    let open = Mutex::new((HashSet::new(), 0));
    let carried = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        tokio::try_join!(
            carry(client_read, server_write, first_bytes, false, &observer, &open),
            carry(server_read, client_write, BytesMut::new(), true, &observer, &open),
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
    open: &Mutex<(HashSet<Open>, usize)>,
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
        let question = check(&message, answers).map_err(|e| format!("{side} sent {e}"))?;
        {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            let (asked, count) = &mut *open;
            if answers {
                if !asked.remove(&question) {
                    return Err(format!("{side} sent an answer to no open query"));
                }
            } else {
                *count += 1;
                if *count > MAX_QUERIES || asked.len() >= MAX_OPEN {
                    return Err(format!("{side} sent more queries than one connection carries"));
                }
                asked.insert(question);
            }
        }
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

/// Whether `message` is exactly one DNS message, with nothing after it: a query of one question
/// and no records but EDNS, at most [`MAX_QUERY`] bytes (or, with `answer`, a response to one
/// question); its id and question.
fn check(message: &[u8], answer: bool) -> Result<Open, String> {
    let mut decoder = BinDecoder::new(message);
    let parsed = Message::read(&mut decoder).map_err(|e| format!("no DNS message ({e})"))?;
    if !decoder.is_empty() {
        return Err(format!("{} bytes after a DNS message", decoder.len()));
    }
    let [query] = parsed.queries() else {
        return Err("a DNS message without exactly one question".into());
    };
    let question = (
        parsed.id(),
        query.name().to_lowercase().to_ascii(),
        u16::from(query.query_type()),
    );
    match (answer, parsed.message_type()) {
        (false, MessageType::Query)
            if message.len() <= MAX_QUERY
                && parsed.answers().is_empty()
                && parsed.name_servers().is_empty()
                && parsed.additionals().is_empty() =>
        {
            Ok(question)
        }
        (false, MessageType::Query) => Err("a query carrying records, or too long".into()),
        (false, _) => Err("a DNS message that is not a query".into()),
        (true, MessageType::Response) => Ok(question),
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
        let question = (7, "a.example.".to_owned(), 1);
        assert_eq!(check(&q, false), Ok(question.clone()));
        assert_eq!(check(&response, true), Ok(question));
        assert!(check(&response, false).unwrap_err().contains("not a query"));
        assert!(check(&q, true).unwrap_err().contains("not a response"));
        assert!(
            check(b"GET / HTTP/1.1\r\n\r\n", false)
                .unwrap_err()
                .contains("no DNS message")
        );
        assert!(check(b"", false).is_err());
        // A query with anything after it, or records of its own, is a tunnel, not DNS.
        let mut trailing = q.clone();
        trailing.extend_from_slice(b"payload");
        assert!(check(&trailing, false).unwrap_err().contains("7 bytes after"));
        let mut carrying = Message::from_vec(&q).unwrap();
        carrying.add_additional(hickory_proto::rr::Record::from_rdata(
            Name::from_ascii("x.example.").unwrap(),
            0,
            hickory_proto::rr::RData::TXT(hickory_proto::rr::rdata::TXT::new(vec!["payload".into()])),
        ));
        let carrying = carrying.to_vec().unwrap();
        assert!(check(&carrying, false).unwrap_err().contains("carrying records"));
        let mut two = Message::from_vec(&q).unwrap();
        two.add_query(Query::query(
            Name::from_ascii("b.example.").unwrap(),
            RecordType::A,
        ));
        let two = two.to_vec().unwrap();
        assert!(check(&two, false).unwrap_err().contains("exactly one question"));
    }
}
