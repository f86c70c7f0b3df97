//! The record of which names stand behind which addresses, learnt from the DNS answers the
//! intercepted processes received, per network namespace.
//!
//! An answer counts only if it matches a query the same socket sent to the same server, with the
//! same id and question (as a resolver checks its answers), so a packet spoofed from port 53
//! teaches nothing. Names follow CNAME chains from the question; SRV answers give their targets
//! (and the targets' addresses when the answer carries them). Entries live as long as their TTL
//! (at least [`MIN_TTL`], at most [`MAX_TTL`]), and every part is bounded.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{Name, RData, Record},
};

use crate::route::plan::{ClientName, Resolved};

/// Answers with a shorter TTL (even 0) still name the address the application dials at once.
pub const MIN_TTL: Duration = Duration::from_secs(30);
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// (name, address) entries kept per network namespace.
pub const MAX_ENTRIES: usize = 2048;
/// Network namespaces with a record; the least recently taught one goes first.
pub const MAX_NAMESPACES: usize = 32;
/// Queries waiting for their answer, over all namespaces, and from one namespace.
pub const MAX_PENDING: usize = 4096;
pub const MAX_PENDING_PER_NAMESPACE: usize = 512;
/// SRV delegations kept per namespace, and targets kept per delegation.
pub const MAX_DELEGATIONS: usize = 256;
pub const MAX_SRV_TARGETS: usize = 8;
/// How long a query waits for its answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Resolvers kept per namespace that sent a truncated answer, and how long such an answer
/// stands for the retry over TCP it calls for.
pub const MAX_RESOLVERS: usize = 16;
pub const TRUNCATED_MEMORY: Duration = Duration::from_secs(30);
/// Records of one answer that are looked at, and CNAME links followed.
const MAX_RECORDS: usize = 64;
const MAX_CHAIN: usize = 8;

/// A DNS message of an intercepted process (a [`egress_common::DnsEvent`], decoded).
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    pub netns: u64,
    pub socket: u64,
    pub server: IpAddr,
    pub answer: bool,
    pub message: &'a [u8],
}

/// What became of an observed message (for the counters and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    QueryNoted,
    /// An answer matching its query: `learnt` (name, address) entries added or renewed.
    Learnt(usize),
    /// Not a usable message: unparsable, cut, or not a single-question query or answer.
    Malformed,
    /// An answer no query of that socket, id, server and question was waiting for.
    Unsolicited,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PendingKey {
    netns: u64,
    socket: u64,
    id: u16,
}

struct Pending {
    server: IpAddr,
    question: (String, u16),
    sent: Instant,
}

struct Entry {
    expires: Instant,
    /// The name the application asked for (the head of a CNAME chain, or an SRV target it
    /// would resolve next), not a name met along the chain.
    asked: bool,
    seq: u64,
}

/// One SRV answer: the targets a service name delegates to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delegation {
    pub service: String,
    pub targets: Vec<(String, u16)>,
    expires: Instant,
}

impl Delegation {
    /// Whether this is Matrix federation's service of `name` (`_matrix-fed._tcp.NAME`, or the
    /// older `_matrix._tcp.NAME`; `name` in lower case).
    fn is_under(&self, name: &str) -> bool {
        self.service
            .strip_suffix(name)
            .is_some_and(|service| service == "_matrix-fed._tcp." || service == "_matrix._tcp.")
    }
}

#[derive(Default)]
struct Namespace {
    entries: HashMap<(String, IpAddr), Entry>,
    by_addr: HashMap<IpAddr, HashSet<String>>,
    by_name: HashMap<String, HashSet<IpAddr>>,
    delegations: HashMap<String, Delegation>,
    /// The servers that last answered its processes over UDP with a truncated answer, and when.
    truncated: HashMap<IpAddr, Instant>,
    taught: u64,
}

/// What the record holds about one address or name, for `egress explain` and the admin API.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Known {
    pub name: String,
    pub address: IpAddr,
    pub asked: bool,
    pub ttl_left: u64,
}

#[derive(Default)]
pub struct Records {
    namespaces: HashMap<u64, Namespace>,
    pending: HashMap<PendingKey, Pending>,
    seq: u64,
    /// The agent's own namespace (the host's homeserver): never pushed out by others.
    protected: Option<u64>,
}

/// A name as recorded: lower case, without the root's dot.
fn name_text(name: &Name) -> String {
    let mut text = name.to_lowercase().to_ascii();
    if text.ends_with('.') {
        text.pop();
    }
    text
}

impl Records {
    /// A record whose namespace `protected` is never evicted to make room for others.
    pub fn protecting(protected: u64) -> Self {
        Self {
            protected: Some(protected),
            ..Self::default()
        }
    }

    pub fn observe(&mut self, observed: Observed<'_>, now: Instant) -> Outcome {
        let Ok(message) = Message::from_vec(observed.message) else {
            return Outcome::Malformed;
        };
        let [query] = message.queries() else {
            return Outcome::Malformed;
        };
        let question = (name_text(query.name()), u16::from(query.query_type()));
        let key = PendingKey {
            netns: observed.netns,
            socket: observed.socket,
            id: message.id(),
        };
        let server = observed.server.to_canonical();
        match (observed.answer, message.message_type()) {
            (false, MessageType::Query) => {
                self.make_room_for_query(observed.netns, now);
                self.pending.insert(
                    key,
                    Pending {
                        server,
                        question,
                        sent: now,
                    },
                );
                Outcome::QueryNoted
            }
            (true, MessageType::Response) => {
                let matches = self.pending.get(&key).is_some_and(|p| {
                    p.server == server && p.question == question && now.duration_since(p.sent) < QUERY_TIMEOUT
                });
                if !matches {
                    return Outcome::Unsolicited;
                }
                self.pending.remove(&key);
                if message.truncated() {
                    self.note_truncated(observed.netns, server, now);
                }
                if message.response_code() != ResponseCode::NoError {
                    return Outcome::Learnt(0);
                }
                Outcome::Learnt(self.learn(observed.netns, &question.0, &message, now))
            }
            _ => Outcome::Malformed,
        }
    }

    /// `server` answered a query of `netns` with a truncated answer: its client asks again over
    /// TCP, which the plan lets through to that server only (and only for a while).
    fn note_truncated(&mut self, netns: u64, server: IpAddr, now: Instant) {
        let seq = self.seq;
        let ns = self.namespace(netns, seq);
        if ns.truncated.len() >= MAX_RESOLVERS && !ns.truncated.contains_key(&server) {
            let oldest = ns.truncated.iter().min_by_key(|(_, t)| **t).map(|(a, _)| *a);
            if let Some(oldest) = oldest {
                ns.truncated.remove(&oldest);
            }
        }
        ns.truncated.insert(server, now);
    }

    /// Drops timed-out queries, then the oldest of `netns` (or of all) over the bounds: a
    /// namespace that floods queries never answered pushes out its own, not the others'.
    fn make_room_for_query(&mut self, netns: u64, now: Instant) {
        if self.pending.len() >= MAX_PENDING_PER_NAMESPACE {
            self.pending
                .retain(|_, p| now.duration_since(p.sent) < QUERY_TIMEOUT);
        }
        let own = self.pending.keys().filter(|k| k.netns == netns).count();
        let oldest = |pending: &HashMap<PendingKey, Pending>, only: Option<u64>| {
            pending
                .iter()
                .filter(|(k, _)| only.is_none_or(|n| k.netns == n))
                .min_by_key(|(_, p)| p.sent)
                .map(|(k, _)| k.clone())
        };
        let victim = if own >= MAX_PENDING_PER_NAMESPACE {
            oldest(&self.pending, Some(netns))
        } else if self.pending.len() >= MAX_PENDING {
            oldest(&self.pending, None)
        } else {
            None
        };
        if let Some(victim) = victim {
            self.pending.remove(&victim);
        }
    }

    /// Records the addresses `asked` resolved to (through CNAMEs), and SRV delegations.
    fn learn(&mut self, netns: u64, asked: &str, message: &Message, now: Instant) -> usize {
        let answers: Vec<&Record> = message.answers().iter().take(MAX_RECORDS).collect();
        // The chain of names from the question: asked, then each CNAME target.
        let mut chain = vec![asked.to_owned()];
        while chain.len() < MAX_CHAIN {
            let last = chain.last().cloned().unwrap_or_default();
            let next = answers.iter().find_map(|r| match r.data() {
                RData::CNAME(target) if name_text(r.name()) == last => Some(name_text(&target.0)),
                _ => None,
            });
            match next {
                Some(next) if !chain.contains(&next) => chain.push(next),
                _ => break,
            }
        }
        let mut learnt = Vec::new();
        let mut srv_targets = Vec::new();
        for record in &answers {
            let owner = name_text(record.name());
            if !chain.contains(&owner) {
                continue;
            }
            let ttl = ttl(record.ttl());
            match record.data() {
                RData::A(a) => learnt.push((IpAddr::V4(a.0), ttl)),
                RData::AAAA(aaaa) => learnt.push((IpAddr::V6(aaaa.0), ttl)),
                // A target becomes a CONNECT target and a policy name: a host name, or nothing.
                RData::SRV(srv) => {
                    let target = name_text(srv.target());
                    if crate::hostport::valid_hostname(&target) {
                        srv_targets.push((target, srv.port(), ttl));
                    }
                }
                _ => {}
            }
        }
        self.seq += 1;
        let seq = self.seq;
        let ns = self.namespace(netns, seq);
        let mut count = 0;
        // Names become CONNECT targets and policy names: host names only.
        chain.retain(|name| crate::hostport::valid_hostname(name));
        for (address, ttl) in learnt {
            for name in &chain {
                ns.insert(name, address, name == asked, now + ttl, seq);
                count += 1;
            }
        }
        if !srv_targets.is_empty() {
            // The additional section is not believed: the resolver passes on whatever the zone's
            // owner put there (an address for a no_proxy name, say). The application resolves the
            // targets itself, and those answers are recorded.
            srv_targets.truncate(MAX_SRV_TARGETS);
            let expires = now + srv_targets.iter().map(|t| t.2).min().unwrap_or(MIN_TTL);
            ns.delegations.retain(|_, d| d.expires > now);
            if ns.delegations.len() >= MAX_DELEGATIONS && !ns.delegations.contains_key(asked) {
                let soonest = ns
                    .delegations
                    .iter()
                    .min_by_key(|(_, d)| d.expires)
                    .map(|(k, _)| k.clone());
                if let Some(soonest) = soonest {
                    ns.delegations.remove(&soonest);
                }
            }
            ns.delegations.insert(
                asked.to_owned(),
                Delegation {
                    service: asked.to_owned(),
                    targets: srv_targets.into_iter().map(|(t, p, _)| (t, p)).collect(),
                    expires,
                },
            );
        }
        ns.trim(now);
        count
    }

    fn namespace(&mut self, netns: u64, seq: u64) -> &mut Namespace {
        if !self.namespaces.contains_key(&netns) && self.namespaces.len() >= MAX_NAMESPACES {
            let protected = self.protected;
            let stalest = self
                .namespaces
                .iter()
                .filter(|(k, _)| Some(**k) != protected)
                .min_by_key(|(_, ns)| ns.taught)
                .map(|(k, _)| *k);
            if let Some(stalest) = stalest {
                self.namespaces.remove(&stalest);
            }
        }
        let ns = self.namespaces.entry(netns).or_default();
        ns.taught = seq;
        ns
    }

    /// What the application in `netns` resolved about `address` (dialled on `port`), and about
    /// `name` (SNI/Host).
    pub fn resolved(
        &self,
        netns: u64,
        address: IpAddr,
        port: u16,
        name: Option<&str>,
        now: Instant,
    ) -> Resolved {
        let Some(ns) = self.namespaces.get(&netns) else {
            return Resolved::default();
        };
        let address = address.to_canonical();
        let live = |name: &str, address: IpAddr| {
            ns.entries
                .get(&(name.to_owned(), address))
                .filter(|e| e.expires > now)
        };
        let dialled = ns
            .by_addr
            .get(&address)
            .into_iter()
            .flatten()
            .filter_map(|n| live(n, address).map(|e| (n, e)))
            .max_by_key(|(_, e)| (e.asked, e.seq))
            .map(|(n, _)| n.clone());
        let mut srv_targets = Vec::new();
        let client = match name {
            None => ClientName::Unrecorded,
            Some(name) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                let delegations: Vec<&Delegation> = ns
                    .delegations
                    .values()
                    .filter(|d| d.expires > now && d.is_under(&name))
                    .collect();
                if live(&name, address).is_some() {
                    ClientName::Resolved
                } else if !delegations.is_empty() {
                    // SNI names the server; the address it dialled is not the server name's own.
                    for (target, _) in delegations
                        .iter()
                        .flat_map(|d| &d.targets)
                        .filter(|(_, p)| *p == port)
                    {
                        if !srv_targets.contains(target) {
                            srv_targets.push(target.clone());
                        }
                    }
                    ClientName::Delegates
                } else if ns
                    .by_name
                    .get(&name)
                    .is_some_and(|addrs| addrs.iter().any(|a| live(&name, *a).is_some()))
                {
                    ClientName::Elsewhere
                } else {
                    ClientName::Unrecorded
                }
            }
        };
        let resolver = ns
            .truncated
            .get(&address)
            .is_some_and(|answered| now.duration_since(*answered) < TRUNCATED_MEMORY);
        Resolved {
            client,
            dialled_name: dialled,
            synthetic: false,
            srv_targets,
            looked_up: false,
            resolver,
        }
    }

    /// Every live entry of `netns` about `address` or `name` (either matching; all of them if
    /// both are None).
    pub fn known(&self, netns: u64, address: Option<IpAddr>, name: Option<&str>, now: Instant) -> Vec<Known> {
        let Some(ns) = self.namespaces.get(&netns) else {
            return Vec::new();
        };
        let address = address.map(|a| a.to_canonical());
        let mut known: Vec<Known> = ns
            .entries
            .iter()
            .filter(|((n, a), e)| {
                let about = match (address, name) {
                    (None, None) => true,
                    (address, name) => {
                        address == Some(*a) || name.is_some_and(|want| want.eq_ignore_ascii_case(n))
                    }
                };
                e.expires > now && about
            })
            .map(|((n, a), e)| Known {
                name: n.clone(),
                address: *a,
                asked: e.asked,
                ttl_left: e.expires.duration_since(now).as_secs(),
            })
            .collect();
        known.sort_by(|a, b| (&a.name, a.address).cmp(&(&b.name, b.address)));
        known
    }

    /// Live SRV delegations of `netns`: the services under `name` (`_matrix-fed._tcp.NAME`), or
    /// all.
    pub fn delegations(&self, netns: u64, name: Option<&str>, now: Instant) -> Vec<Delegation> {
        let Some(ns) = self.namespaces.get(&netns) else {
            return Vec::new();
        };
        let mut found: Vec<Delegation> = ns
            .delegations
            .values()
            .filter(|d| d.expires > now && name.is_none_or(|name| d.is_under(&name.to_ascii_lowercase())))
            .cloned()
            .collect();
        found.sort_by(|a, b| a.service.cmp(&b.service));
        found
    }

    /// The namespaces with a record, and how many entries each holds.
    pub fn namespaces(&self) -> Vec<(u64, usize)> {
        let mut all: Vec<(u64, usize)> = self
            .namespaces
            .iter()
            .map(|(k, ns)| (*k, ns.entries.len()))
            .collect();
        all.sort_unstable();
        all
    }

    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

fn ttl(seconds: u32) -> Duration {
    Duration::from_secs(u64::from(seconds)).clamp(MIN_TTL, MAX_TTL)
}

impl Namespace {
    fn insert(&mut self, name: &str, address: IpAddr, asked: bool, expires: Instant, seq: u64) {
        let address = address.to_canonical();
        let entry = self
            .entries
            .entry((name.to_owned(), address))
            .or_insert(Entry { expires, asked, seq });
        entry.expires = expires;
        entry.asked |= asked;
        entry.seq = seq;
        self.by_addr.entry(address).or_default().insert(name.to_owned());
        self.by_name.entry(name.to_owned()).or_default().insert(address);
    }

    /// Over the bound: drops expired entries, then the oldest eighth, so that a flood of names
    /// costs one sort per [`MAX_ENTRIES`] / 8 new entries.
    fn trim(&mut self, now: Instant) {
        if self.entries.len() <= MAX_ENTRIES {
            return;
        }
        self.entries.retain(|_, e| e.expires > now);
        if self.entries.len() > MAX_ENTRIES {
            let mut seqs: Vec<u64> = self.entries.values().map(|e| e.seq).collect();
            seqs.sort_unstable();
            let keep_from = seqs[self.entries.len() - MAX_ENTRIES * 7 / 8];
            self.entries.retain(|_, e| e.seq >= keep_from);
        }
        let entries = &self.entries;
        self.by_addr.retain(|address, names| {
            names.retain(|n| entries.contains_key(&(n.clone(), *address)));
            !names.is_empty()
        });
        self.by_name.retain(|name, addrs| {
            addrs.retain(|a| entries.contains_key(&(name.clone(), *a)));
            !addrs.is_empty()
        });
        self.delegations.retain(|_, d| d.expires > now);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::{
        op::{Message, MessageType, Query},
        rr::{
            Name, RData, Record, RecordType,
            rdata::{A, AAAA, CNAME, SRV},
        },
    };

    use super::*;

    const NS: u64 = 7;
    const SOCKET: u64 = 99;
    const SERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53));

    fn name(text: &str) -> Name {
        Name::from_ascii(format!("{text}.")).unwrap()
    }

    fn query(id: u16, qname: &str, qtype: RecordType) -> Message {
        let mut m = Message::new();
        m.set_id(id);
        m.set_message_type(MessageType::Query);
        m.add_query(Query::query(name(qname), qtype));
        m
    }

    fn a(owner: &str, ip: &str, ttl: u32) -> Record {
        let rdata = match ip.parse::<IpAddr>().unwrap() {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        Record::from_rdata(name(owner), ttl, rdata)
    }

    fn cname(owner: &str, target: &str) -> Record {
        Record::from_rdata(name(owner), 300, RData::CNAME(CNAME(name(target))))
    }

    fn srv(owner: &str, target: &str, port: u16) -> Record {
        Record::from_rdata(name(owner), 300, RData::SRV(SRV::new(10, 5, port, name(target))))
    }

    fn answer(q: &Message, answers: Vec<Record>, additionals: Vec<Record>) -> Message {
        let mut m = q.clone();
        m.set_message_type(MessageType::Response);
        for r in answers {
            m.add_answer(r);
        }
        for r in additionals {
            m.add_additional(r);
        }
        m
    }

    fn observe(records: &mut Records, server: IpAddr, answer: bool, m: &Message, now: Instant) -> Outcome {
        observe_in(records, NS, SOCKET, server, answer, m, now)
    }

    /// [`observe`] from a given namespace and socket.
    fn observe_in(
        records: &mut Records,
        netns: u64,
        socket: u64,
        server: IpAddr,
        answer: bool,
        m: &Message,
        now: Instant,
    ) -> Outcome {
        let bytes = m.to_vec().unwrap();
        records.observe(
            Observed {
                netns,
                socket,
                server,
                answer,
                message: &bytes,
            },
            now,
        )
    }

    /// A query and its answer, as a resolver exchange of the application.
    fn exchange(
        records: &mut Records,
        q: Message,
        answers: Vec<Record>,
        additionals: Vec<Record>,
        now: Instant,
    ) {
        assert_eq!(observe(records, SERVER, false, &q, now), Outcome::QueryNoted);
        let reply = answer(&q, answers, additionals);
        assert!(matches!(
            observe(records, SERVER, true, &reply, now),
            Outcome::Learnt(_)
        ));
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// Every shape of delegation the record meets: the server name resolves to a web host,
    /// federation is delegated by SRV to another name (whose address the application may have
    /// resolved where the kernel cannot see), and the application dials a target's address with
    /// SNI = server name. Each row: (address and port dialled, SNI, expected view).
    #[test]
    fn names_behind_addresses() {
        let now = Instant::now();
        let mut r = Records::default();
        let srv_answer = |r: &mut Records, id, service: &str, targets: &[(&str, u16)]| {
            let records = targets.iter().map(|(t, p)| srv(service, t, *p)).collect();
            exchange(r, query(id, service, RecordType::SRV), records, vec![], now);
        };
        exchange(
            &mut r,
            query(1, "example.org", RecordType::A),
            vec![a("example.org", "198.51.100.1", 300)],
            vec![],
            now,
        );
        srv_answer(
            &mut r,
            2,
            "_matrix-fed._tcp.example.org",
            &[("matrix.example.org", 8448)],
        );
        exchange(
            &mut r,
            query(3, "matrix.example.org", RecordType::A),
            vec![a("matrix.example.org", "203.0.113.8", 300)],
            vec![],
            now,
        );
        // A CNAME chain: asked www, answered through a CDN name.
        exchange(
            &mut r,
            query(4, "www.example.net", RecordType::AAAA),
            vec![
                cname("www.example.net", "edge.cdn.example"),
                a("edge.cdn.example", "2001:db8::7", 60),
            ],
            vec![],
            now,
        );
        // Delegations whose targets' addresses the record never saw (hosts file, nscd, resolved).
        srv_answer(
            &mut r,
            6,
            "_matrix-fed._tcp.hosts.example",
            &[("fed.hosts.example", 8448)],
        );
        srv_answer(
            &mut r,
            7,
            "_matrix-fed._tcp.multi.example",
            &[("a.multi.example", 8448), ("b.multi.example", 8448)],
        );
        srv_answer(
            &mut r,
            8,
            "_matrix-fed._tcp.ports.example",
            &[("x.ports.example", 8448), ("y.ports.example", 443)],
        );
        // The legacy service name delegates too, and a target named twice counts once.
        srv_answer(
            &mut r,
            9,
            "_matrix._tcp.legacy.example",
            &[("fed.legacy.example", 8448)],
        );
        srv_answer(
            &mut r,
            10,
            "_matrix-fed._tcp.legacy.example",
            &[("fed.legacy.example", 8448)],
        );
        let view = |c: ClientName, n: Option<&str>, targets: &[&str]| Resolved {
            client: c,
            dialled_name: n.map(str::to_owned),
            srv_targets: targets.iter().map(|t| t.to_string()).collect(),
            ..Resolved::default()
        };
        use ClientName::{Delegates, Elsewhere, Unrecorded};
        let agreed = ClientName::Resolved;
        #[rustfmt::skip]
        let cases = [
            // The target's address, recorded: the name behind it is among the targets.
            ("203.0.113.8:8448", Some("example.org"), view(Delegates, Some("matrix.example.org"), &["matrix.example.org"])),
            ("203.0.113.8:8448", Some("matrix.example.org"), view(agreed, Some("matrix.example.org"), &[])),
            // The server name's own address (no SRV used): SNI agrees.
            ("198.51.100.1:8448", Some("example.org"), view(agreed, Some("example.org"), &[])),
            ("198.51.100.1:8448", Some("EXAMPLE.org."), view(agreed, Some("example.org"), &[])),
            // Delegated, the target resolved off the wire: the targets on the dialled port.
            ("192.0.2.50:8448", Some("hosts.example"), view(Delegates, None, &["fed.hosts.example"])),
            ("192.0.2.51:8448", Some("multi.example"), view(Delegates, None, &["a.multi.example", "b.multi.example"])),
            ("192.0.2.52:8448", Some("ports.example"), view(Delegates, None, &["x.ports.example"])),
            ("192.0.2.52:443", Some("ports.example"), view(Delegates, None, &["y.ports.example"])),
            ("192.0.2.52:9000", Some("ports.example"), view(Delegates, None, &[])),
            ("192.0.2.53:8448", Some("legacy.example"), view(Delegates, None, &["fed.legacy.example"])),
            // Delegated, and dialled on a port no target has.
            ("192.0.2.200:443", Some("example.org"), view(Delegates, None, &[])),
            // Not delegated, resolved elsewhere; or nothing recorded.
            ("192.0.2.200:443", Some("www.example.net"), view(Elsewhere, None, &[])),
            ("192.0.2.200:443", None, view(Unrecorded, None, &[])),
            ("203.0.113.8:443", None, view(Unrecorded, Some("matrix.example.org"), &[])),
            ("203.0.113.8:443", Some("other.example"), view(Unrecorded, Some("matrix.example.org"), &[])),
            // The asked name wins over the chain's; the chain's names still verify SNI.
            ("[2001:db8::7]:443", None, view(Unrecorded, Some("www.example.net"), &[])),
            ("[2001:db8::7]:443", Some("edge.cdn.example"), view(agreed, Some("www.example.net"), &[])),
        ];
        for (dialled, sni, expected) in cases {
            let dialled: std::net::SocketAddr = dialled.parse().unwrap();
            assert_eq!(
                r.resolved(NS, dialled.ip(), dialled.port(), sni, now),
                expected,
                "{dialled} {sni:?}"
            );
        }
        // Any service but Matrix federation's delegates nothing.
        srv_answer(&mut r, 11, "_ldap._tcp.corp.example", &[("dc.corp.example", 389)]);
        assert_eq!(
            r.resolved(NS, ip("192.0.2.60"), 389, Some("corp.example"), now)
                .client,
            Unrecorded
        );
        // Answers were whole so far: no server is owed a retry over TCP.
        assert!(!r.resolved(NS, SERVER, 53, None, now).resolver);
        // A truncated answer makes its server the one this namespace may ask over TCP, for a
        // while; not another address, not another namespace.
        let q = query(12, "big.example", RecordType::A);
        assert_eq!(observe(&mut r, SERVER, false, &q, now), Outcome::QueryNoted);
        let mut truncated = answer(&q, vec![a("big.example", "192.0.2.70", 300)], vec![]);
        truncated.set_truncated(true);
        assert!(matches!(
            observe(&mut r, SERVER, true, &truncated, now),
            Outcome::Learnt(_)
        ));
        assert!(r.resolved(NS, SERVER, 53, None, now).resolver);
        assert!(!r.resolved(NS, ip("192.0.2.200"), 53, None, now).resolver);
        assert!(!r.resolved(NS + 1, SERVER, 53, None, now).resolver);
        assert!(!r.resolved(NS, SERVER, 53, None, now + TRUNCATED_MEMORY).resolver);
        // Another namespace knows nothing of it; an IPv4-mapped address is the IPv4 one.
        assert_eq!(
            r.resolved(NS + 1, ip("203.0.113.8"), 443, None, now),
            Resolved::default()
        );
        assert_eq!(
            r.resolved(NS, ip("::ffff:203.0.113.8"), 443, None, now)
                .dialled_name
                .as_deref(),
            Some("matrix.example.org")
        );
        assert_eq!(
            r.delegations(NS, Some("example.org"), now)[0].targets,
            vec![("matrix.example.org".to_owned(), 8448)]
        );
        // TTLs: the CDN answer (60 s) is gone after 2 minutes, the others (300 s) are not.
        let later = now + Duration::from_secs(120);
        assert_eq!(
            r.resolved(NS, ip("2001:db8::7"), 443, None, later).dialled_name,
            None
        );
        assert!(
            r.resolved(NS, ip("203.0.113.8"), 443, None, later)
                .dialled_name
                .is_some()
        );
        // Even a TTL of 0 names the address for MIN_TTL.
        exchange(
            &mut r,
            query(5, "zero.example", RecordType::A),
            vec![a("zero.example", "192.0.2.9", 0)],
            vec![],
            now,
        );
        assert!(
            r.resolved(NS, ip("192.0.2.9"), 443, None, now + MIN_TTL / 2)
                .dialled_name
                .is_some()
        );
        assert!(
            r.resolved(NS, ip("192.0.2.9"), 443, None, now + MIN_TTL * 2)
                .dialled_name
                .is_none()
        );
    }

    /// Only an answer to a query of the same socket, id, server and question teaches anything:
    /// a packet spoofed from port 53 is ignored.
    #[test]
    fn unsolicited_answers_teach_nothing() {
        let now = Instant::now();
        let q = query(10, "matrix.example.org", RecordType::A);
        let good = vec![a("matrix.example.org", "203.0.113.8", 300)];
        type Attack<'a> = Box<dyn Fn(&mut Records) -> Outcome + 'a>;
        let cases: Vec<(&str, Attack)> = vec![
            (
                "no query at all",
                Box::new(|r| observe(r, SERVER, true, &answer(&q, good.clone(), vec![]), now)),
            ),
            (
                "another id",
                Box::new(|r| {
                    observe(r, SERVER, false, &q, now);
                    let mut reply = answer(&q, good.clone(), vec![]);
                    reply.set_id(11);
                    observe(r, SERVER, true, &reply, now)
                }),
            ),
            (
                "another server",
                Box::new(|r| {
                    observe(r, SERVER, false, &q, now);
                    observe(r, ip("192.0.2.53"), true, &answer(&q, good.clone(), vec![]), now)
                }),
            ),
            (
                "another question",
                Box::new(|r| {
                    observe(r, SERVER, false, &q, now);
                    let other = query(10, "evil.example", RecordType::A);
                    observe(
                        r,
                        SERVER,
                        true,
                        &answer(&other, vec![a("evil.example", "203.0.113.8", 300)], vec![]),
                        now,
                    )
                }),
            ),
            (
                "too late",
                Box::new(|r| {
                    observe(r, SERVER, false, &q, now);
                    observe(
                        r,
                        SERVER,
                        true,
                        &answer(&q, good.clone(), vec![]),
                        now + QUERY_TIMEOUT,
                    )
                }),
            ),
            (
                "answered twice",
                Box::new(|r| {
                    observe(r, SERVER, false, &q, now);
                    observe(r, SERVER, true, &answer(&q, vec![], vec![]), now);
                    observe(r, SERVER, true, &answer(&q, good.clone(), vec![]), now)
                }),
            ),
        ];
        for (case, run) in cases {
            let mut r = Records::default();
            assert_eq!(run(&mut r), Outcome::Unsolicited, "{case}");
            assert_eq!(
                r.resolved(NS, ip("203.0.113.8"), 443, None, now),
                Resolved::default(),
                "{case}"
            );
        }
        // Records for names outside the question's chain are not believed either.
        let mut r = Records::default();
        exchange(
            &mut r,
            q.clone(),
            vec![
                a("matrix.example.org", "203.0.113.8", 300),
                a("bank.example", "203.0.113.9", 300),
            ],
            vec![a("bank.example", "203.0.113.10", 300)],
            now,
        );
        assert_eq!(
            r.resolved(NS, ip("203.0.113.9"), 443, None, now).dialled_name,
            None
        );
        assert_eq!(
            r.resolved(NS, ip("203.0.113.10"), 443, None, now).dialled_name,
            None
        );
        // Garbage and cut messages are refused, not half-read.
        let bytes = answer(&q, good.clone(), vec![]).to_vec().unwrap();
        for broken in [
            &bytes[..0],
            &bytes[..5],
            &bytes[..bytes.len() - 3],
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        ] {
            let outcome = r.observe(
                Observed {
                    netns: NS,
                    socket: SOCKET,
                    server: SERVER,
                    answer: true,
                    message: broken,
                },
                now,
            );
            assert_eq!(outcome, Outcome::Malformed);
        }
    }

    /// SRV answers teach their targets, not the addresses in their additional section (which
    /// the zone's owner chooses): the application's own lookup of the target does.
    #[test]
    fn srv_answers_teach_targets_not_additional_addresses() {
        let now = Instant::now();
        let mut r = Records::default();
        exchange(
            &mut r,
            query(1, "_matrix-fed._tcp.example.org", RecordType::SRV),
            vec![srv("_matrix-fed._tcp.example.org", "fed.example.org", 443)],
            vec![
                a("fed.example.org", "203.0.113.20", 300),
                a("relay.internal.example", "203.0.113.21", 300),
            ],
            now,
        );
        assert_eq!(
            r.resolved(NS, ip("203.0.113.20"), 443, None, now).dialled_name,
            None
        );
        assert_eq!(
            r.resolved(NS, ip("203.0.113.21"), 443, None, now).dialled_name,
            None
        );
        exchange(
            &mut r,
            query(2, "fed.example.org", RecordType::A),
            vec![a("fed.example.org", "203.0.113.20", 300)],
            vec![],
            now,
        );
        assert_eq!(
            r.resolved(NS, ip("203.0.113.20"), 443, Some("example.org"), now)
                .dialled_name
                .as_deref(),
            Some("fed.example.org")
        );
        // example.org itself was never resolved, but it delegates to the dialled name.
        assert_eq!(
            r.resolved(NS, ip("203.0.113.20"), 443, Some("example.org"), now)
                .client,
            ClientName::Delegates
        );
        assert_eq!(
            r.resolved(NS, ip("203.0.113.20"), 443, Some("other.example"), now)
                .client,
            ClientName::Unrecorded
        );
        // Delegations are bounded, by number and by targets.
        let many: Vec<Record> = (0..40)
            .map(|i| srv("_matrix-fed._tcp.big.example", &format!("t{i}.example"), 1))
            .collect();
        exchange(
            &mut r,
            query(3, "_matrix-fed._tcp.big.example", RecordType::SRV),
            many,
            vec![],
            now,
        );
        assert_eq!(
            r.delegations(NS, Some("big.example"), now)[0].targets.len(),
            MAX_SRV_TARGETS
        );
        for i in 0..(MAX_DELEGATIONS as u16 + 10) {
            let service = format!("_x._tcp.d{i}.example");
            exchange(
                &mut r,
                query(100 + i, &service, RecordType::SRV),
                vec![srv(&service, "t.example", 1)],
                vec![],
                now,
            );
        }
        assert!(r.delegations(NS, None, now).len() <= MAX_DELEGATIONS);
    }

    /// A flood of distinct names stays within the bounds, and the newest names are kept.
    #[test]
    fn the_record_is_bounded() {
        let now = Instant::now();
        let mut r = Records::default();
        for i in 0..(MAX_ENTRIES as u32 * 3) {
            let host = format!("n{i}.flood.example");
            let address = IpAddr::V4(Ipv4Addr::from(0xc633_6400 + i));
            exchange(
                &mut r,
                query(i as u16, &host, RecordType::A),
                vec![a(&host, &address.to_string(), 3600)],
                vec![],
                now,
            );
            assert!(r.namespaces()[0].1 <= MAX_ENTRIES + 1);
        }
        let last = MAX_ENTRIES as u32 * 3 - 1;
        let newest = IpAddr::V4(Ipv4Addr::from(0xc633_6400 + last));
        assert_eq!(
            r.resolved(NS, newest, 443, None, now).dialled_name,
            Some(format!("n{last}.flood.example"))
        );
        assert_eq!(
            r.resolved(NS, IpAddr::V4(Ipv4Addr::from(0xc633_6400)), 443, None, now)
                .dialled_name,
            None
        );
        // Namespaces are bounded too.
        for netns in 0..(MAX_NAMESPACES as u64 * 2) {
            let q = query(1, "x.example", RecordType::AAAA);
            observe_in(&mut r, netns, 1, SERVER, false, &q, now);
            let reply = answer(
                &q,
                vec![a("x.example", &Ipv6Addr::LOCALHOST.to_string(), 60)],
                vec![],
            );
            observe_in(&mut r, netns, 1, SERVER, true, &reply, now);
        }
        assert!(r.namespaces().len() <= MAX_NAMESPACES);
        // Queries never answered are bounded as well.
        let mut r = Records::default();
        for i in 0..(MAX_PENDING as u32 * 2) {
            let q = query(i as u16, &format!("p{i}.example"), RecordType::A);
            observe_in(&mut r, NS, u64::from(i), SERVER, false, &q, now);
        }
        assert!(r.pending() <= MAX_PENDING);
        // One namespace's flood of unanswered queries leaves another's query waiting...
        let mut r = Records::default();
        let waiting = query(7, "matrix.example.org", RecordType::A);
        observe_in(&mut r, 1, 1, SERVER, false, &waiting, now);
        for i in 0..(MAX_PENDING as u32 * 2) {
            let q = query(i as u16, &format!("f{i}.example"), RecordType::A);
            observe_in(&mut r, 2, u64::from(i), SERVER, false, &q, now);
        }
        let reply = answer(
            &waiting,
            vec![a("matrix.example.org", "203.0.113.8", 300)],
            vec![],
        );
        let outcome = observe_in(&mut r, 1, 1, SERVER, true, &reply, now);
        assert_eq!(outcome, Outcome::Learnt(1));
        // ...and the protected namespace is never pushed out by others.
        let mut r = Records::protecting(NS);
        exchange(
            &mut r,
            query(1, "kept.example", RecordType::A),
            vec![a("kept.example", "203.0.113.1", 3600)],
            vec![],
            now,
        );
        for netns in 100..(100 + MAX_NAMESPACES as u64 * 2) {
            let q = query(1, "x.example", RecordType::A);
            observe_in(&mut r, netns, 1, SERVER, false, &q, now);
            let reply = answer(&q, vec![a("x.example", "203.0.113.2", 60)], vec![]);
            observe_in(&mut r, netns, 1, SERVER, true, &reply, now);
        }
        assert_eq!(
            r.resolved(NS, ip("203.0.113.1"), 443, None, now)
                .dialled_name
                .as_deref(),
            Some("kept.example")
        );
    }
}
