//! Synthetic DNS, for hosts without external DNS (a DMZ where only the proxy resolves public
//! names): the intercepted processes' queries come to the agent (the kernel redirects UDP port
//! 53), which answers A queries for names outside no_proxy with an address of its own from the
//! synthetic range. A connection to that address reaches the agent like any other, which
//! CONNECTs to the name. Names in no_proxy (reached directly, so they need their real address),
//! and every other query type (SRV, TXT, ...) go to the internal resolver.
//!
//! The range must stay outside Synapse's default `ip_range_blacklist`, which holds the usual
//! fake-IP ranges (198.18.0.0/15, fc00::/7): Synapse drops such answers before it connects. The
//! default is a slice of 240.0.0.0/4 (reserved, never routed): connect() to it works because the
//! kernel program rewrites the destination before any route lookup.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{DNSClass, RData, Record, RecordType, rdata::A},
};
use ipnet::Ipv4Net;

use crate::{hostport, route::policy::NoProxy};

/// TTL of synthetic answers. The mapping outlives it (and agent restarts): applications keep
/// addresses longer than they should.
pub const TTL: u32 = 300;

/// Names ↔ synthetic addresses, handed out in order and kept (the agent pins them in the kernel
/// so that a restart keeps them; see `server`).
#[derive(Debug)]
pub struct Allocator {
    range: Ipv4Net,
    by_name: HashMap<String, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, String>,
    next: u32,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the synthetic range {0} is full: every address in it names a host")]
pub struct Full(pub Ipv4Net);

impl Allocator {
    pub fn new(range: Ipv4Net) -> Self {
        Self {
            range,
            by_name: HashMap::new(),
            by_addr: HashMap::new(),
            next: 0,
        }
    }

    /// Takes over a mapping made before (by an earlier agent). Addresses outside the range, and
    /// a second address for a name, are ignored.
    pub fn restore(&mut self, addr: Ipv4Addr, name: &str) -> bool {
        if !self.usable(addr) || self.by_name.contains_key(name) || self.by_addr.contains_key(&addr) {
            return false;
        }
        self.by_name.insert(name.to_owned(), addr);
        self.by_addr.insert(addr, name.to_owned());
        true
    }

    /// The address of `name` (lower case), and whether it was handed out just now.
    pub fn address_for(&mut self, name: &str) -> Result<(Ipv4Addr, bool), Full> {
        if let Some(addr) = self.by_name.get(name) {
            return Ok((*addr, false));
        }
        let hosts = self.host_count();
        for _ in 0..hosts {
            let addr = Ipv4Addr::from(u32::from(self.range.network()) + 1 + self.next % hosts);
            self.next = (self.next + 1) % hosts;
            if !self.by_addr.contains_key(&addr) {
                self.by_name.insert(name.to_owned(), addr);
                self.by_addr.insert(addr, name.to_owned());
                return Ok((addr, true));
            }
        }
        Err(Full(self.range))
    }

    pub fn name_of(&self, addr: IpAddr) -> Option<&str> {
        match addr.to_canonical() {
            IpAddr::V4(v4) => self.by_addr.get(&v4).map(String::as_str),
            IpAddr::V6(_) => None,
        }
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        matches!(addr.to_canonical(), IpAddr::V4(v4) if self.range.contains(&v4))
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// The range without its network and broadcast addresses.
    fn host_count(&self) -> u32 {
        (1u32 << (32 - self.range.prefix_len())).saturating_sub(2).max(1)
    }

    fn usable(&self, addr: Ipv4Addr) -> bool {
        self.range.contains(&addr) && addr != self.range.network() && addr != self.range.broadcast()
    }
}

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Handling {
    /// Answer at once with this message (synthetic, empty, or an error).
    Answer(Message),
    /// Ask the internal resolver and pass its answer on.
    Forward,
    /// `name` got an address just now (the caller persists it), answered by the message.
    Allocated(Message, String, Ipv4Addr),
}

/// How the agent handles `query`, given the no_proxy names (forwarded: they are reached
/// directly, at their real address).
pub fn handle(query: &Message, no_proxy: &NoProxy, allocator: &mut Allocator) -> Handling {
    let reply = |code: ResponseCode| Handling::Answer(response(query, code));
    if query.message_type() != MessageType::Query || query.op_code() != OpCode::Query {
        return reply(ResponseCode::NotImp);
    }
    let [question] = query.queries() else {
        return reply(ResponseCode::FormErr);
    };
    // Only the Internet class: nothing else is for the internal resolver to see either.
    if question.query_class() != DNSClass::IN {
        return reply(ResponseCode::Refused);
    }
    let mut name = question.name().to_lowercase().to_ascii();
    if name.ends_with('.') {
        name.pop();
    }
    let address = matches!(question.query_type(), RecordType::A | RecordType::AAAA);
    if address && !hostport::valid_hostname(&name) {
        return reply(ResponseCode::Refused);
    }
    if no_proxy.names_host(&name) {
        return Handling::Forward;
    }
    match question.query_type() {
        RecordType::A => match allocator.address_for(&name) {
            Ok((addr, new)) => {
                let mut message = response(query, ResponseCode::NoError);
                message.add_answer(Record::from_rdata(
                    question.name().clone(),
                    TTL,
                    RData::A(A(addr)),
                ));
                if new {
                    Handling::Allocated(message, name, addr)
                } else {
                    Handling::Answer(message)
                }
            }
            Err(full) => {
                tracing::error!("synthetic DNS: {full}; answering SERVFAIL for {name}");
                reply(ResponseCode::ServFail)
            }
        },
        // No data: the application uses the IPv4 answer.
        RecordType::AAAA => reply(ResponseCode::NoError),
        _ => Handling::Forward,
    }
}

/// An answer to `query` with no records.
pub fn response(query: &Message, code: ResponseCode) -> Message {
    let mut message = Message::new();
    message.set_id(query.id());
    message.set_message_type(MessageType::Response);
    message.set_op_code(query.op_code());
    message.set_recursion_desired(query.recursion_desired());
    message.set_recursion_available(true);
    message.set_response_code(code);
    message.add_queries(query.queries().iter().cloned());
    message
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::Query,
        rr::{Name, RecordType},
    };

    use super::*;

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(0x1234);
        m.set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m
    }

    fn describe(h: &Handling) -> String {
        let answers = |m: &Message| {
            let rdata: Vec<String> = m.answers().iter().map(|r| r.data().to_string()).collect();
            format!("{} {}", m.response_code(), rdata.join(","))
        };
        match h {
            Handling::Answer(m) => format!("answer {}", answers(m)).trim().to_owned(),
            Handling::Forward => "forward".to_owned(),
            Handling::Allocated(m, name, addr) => format!("new {name}={addr} {}", answers(m)),
        }
    }

    /// (name, type, expected handling), in order: addresses are handed out in sequence, and a
    /// name asked again keeps its address.
    #[test]
    fn queries_are_answered_forwarded_or_refused() {
        let no_proxy = NoProxy::parse_list(["internal.example", "10.0.0.0/8"]).unwrap();
        let mut allocator = Allocator::new("240.64.0.0/16".parse().unwrap());
        #[rustfmt::skip]
        let cases = [
            ("matrix.org.", RecordType::A, "new matrix.org=240.64.0.1 No Error 240.64.0.1"),
            ("MATRIX.org.", RecordType::A, "answer No Error 240.64.0.1"),
            ("example.org", RecordType::A, "new example.org=240.64.0.2 No Error 240.64.0.2"),
            ("matrix.org.", RecordType::AAAA, "answer No Error"),
            // Reached directly: their real address, from the internal resolver.
            ("db.internal.example.", RecordType::A, "forward"),
            ("internal.example.", RecordType::AAAA, "forward"),
            // Everything but addresses: the internal resolver.
            ("_matrix-fed._tcp.example.org.", RecordType::SRV, "forward"),
            ("example.org.", RecordType::TXT, "forward"),
            ("34.216.184.93.in-addr.arpa.", RecordType::PTR, "forward"),
            // Addresses for names that are no host names: refused, not forwarded.
            ("*.example.", RecordType::A, "answer Query Refused"),
            ("host.123.", RecordType::AAAA, "answer Query Refused"),
        ];
        for (name, qtype, expected) in cases {
            let q = query(name, qtype);
            let handled = handle(&q, &no_proxy, &mut allocator);
            assert_eq!(describe(&handled), expected, "{name} {qtype}");
            if let Handling::Answer(m) | Handling::Allocated(m, ..) = &handled {
                assert_eq!(m.id(), 0x1234);
                assert_eq!(m.queries(), q.queries());
                assert!(m.recursion_available());
            }
        }
        assert_eq!(
            allocator.name_of("240.64.0.2".parse().unwrap()),
            Some("example.org")
        );
        assert_eq!(
            allocator.name_of("::ffff:240.64.0.1".parse().unwrap()),
            Some("matrix.org")
        );
        assert_eq!(allocator.name_of("240.64.0.3".parse().unwrap()), None);

        // Not a single standard query: refused with the matching code, never forwarded.
        let mut two = query("a.example.", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("b.example.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(
            describe(&handle(&two, &no_proxy, &mut allocator)),
            "answer Form Error"
        );
        let mut notify = query("a.example.", RecordType::SOA);
        notify.set_op_code(OpCode::Notify);
        assert_eq!(
            describe(&handle(&notify, &no_proxy, &mut allocator)),
            "answer Not Implemented"
        );
        let mut chaos = query("version.bind.", RecordType::TXT);
        chaos.queries_mut()[0].set_query_class(DNSClass::CH);
        assert_eq!(
            describe(&handle(&chaos, &no_proxy, &mut allocator)),
            "answer Query Refused"
        );
        let mut answer = query("a.example.", RecordType::A);
        answer.set_message_type(MessageType::Response);
        assert_eq!(
            describe(&handle(&answer, &no_proxy, &mut allocator)),
            "answer Not Implemented"
        );
    }

    /// Mappings from an earlier agent are kept, new names skip their addresses, and a full range
    /// is an error, not a reuse.
    #[test]
    fn the_allocator_restores_and_fills_up() {
        let mut allocator = Allocator::new("240.64.0.0/29".parse().unwrap());
        assert!(allocator.restore("240.64.0.1".parse().unwrap(), "kept.example"));
        assert!(!allocator.restore("240.64.0.9".parse().unwrap(), "outside.example"));
        assert!(!allocator.restore("240.64.0.0".parse().unwrap(), "network.example"));
        assert!(!allocator.restore("240.64.0.2".parse().unwrap(), "kept.example"));
        assert_eq!(
            allocator.address_for("kept.example"),
            Ok(("240.64.0.1".parse().unwrap(), false))
        );
        let mut handed = Vec::new();
        for i in 0..5 {
            handed.push(
                allocator
                    .address_for(&format!("n{i}.example"))
                    .unwrap()
                    .0
                    .to_string(),
            );
        }
        assert_eq!(
            handed,
            [
                "240.64.0.2",
                "240.64.0.3",
                "240.64.0.4",
                "240.64.0.5",
                "240.64.0.6"
            ]
        );
        assert_eq!(
            allocator.address_for("one-too-many.example"),
            Err(Full("240.64.0.0/29".parse().unwrap()))
        );
        assert_eq!(allocator.len(), 6);
        assert!(allocator.contains("240.64.0.7".parse().unwrap()));
        assert!(!allocator.contains("240.65.0.1".parse().unwrap()));
    }
}
