//! Reads the DNS messages the kernel copied (`egress_dns_in|out`) into the record.
//!
//! The kernel writes an answer into the ring buffer before the application can read it, so
//! before the application can connect to what it names. Each redirected connection drains the
//! ring before it looks up the record: no answer the application acted on can be missing, unless
//! the ring was full when it came (counted as `dns_lost`; the connection then goes by SNI/Host).

use std::{
    net::IpAddr,
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex},
    time::Instant,
};

use aya::maps::{MapData, RingBuf};
use egress_common::{DNS_ANSWER, DnsEvent};
use tokio::io::unix::AsyncFd;

use super::record::{Known, Observed, Outcome, Records};
use crate::route::plan::Resolved;

pub struct Watch {
    ring: Mutex<Option<RingBuf<MapData>>>,
    records: Mutex<Records>,
}

impl Watch {
    /// `own_netns`: the agent's namespace, whose record others never push out.
    pub fn new(ring: Option<RingBuf<MapData>>, own_netns: u64) -> Self {
        Self {
            ring: Mutex::new(ring),
            records: Mutex::new(Records::protecting(own_netns)),
        }
    }

    /// Drains the ring whenever the kernel adds to it, so that it never fills while no
    /// connection arrives.
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<()> {
        let fd: OwnedFd = {
            let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            let Some(ring) = ring.as_ref() else { return Ok(()) };
            ring.as_fd().try_clone_to_owned()?
        };
        // SAFETY: the AsyncFd owns `fd`, open for its whole life.
        let readiness = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        let watch = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok(mut ready) = readiness.readable().await else {
                    tracing::warn!("the DNS ring buffer cannot be polled; DNS is read per connection only");
                    return;
                };
                watch.drain();
                ready.clear_ready();
            }
        });
        Ok(())
    }

    /// Moves every message in the ring into the record.
    pub fn drain(&self) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ring) = ring.as_mut() else { return };
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while let Some(item) = ring.next() {
            let Some(event) = decode(&item) else { continue };
            let len = usize::from(event.len).min(event.message.len());
            if event.wire_len as usize > len {
                // Cut by the kernel's copy: cannot be parsed whole.
                continue;
            }
            let Some(server) = crate::kernel::from_sock_addr(&event.server).map(|a| a.ip()) else {
                continue;
            };
            let outcome = records.observe(
                Observed {
                    netns: event.netns,
                    socket: event.socket,
                    server,
                    answer: event.kind == DNS_ANSWER,
                    message: &event.message[..len],
                },
                now,
            );
            if outcome == Outcome::Unsolicited {
                tracing::debug!("a DNS answer from {server} matched no query of its socket; ignored");
            }
        }
    }

    /// Records an exchange the agent made itself for an application in `netns` (synthetic DNS
    /// forwarding to the internal resolver).
    pub fn learn(&self, netns: u64, server: IpAddr, query: &[u8], answer: &[u8]) {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // A socket id no kernel socket has (cookies count up from 1).
        let socket = u64::MAX;
        for (message, answer) in [(query, false), (answer, true)] {
            records.observe(
                Observed {
                    netns,
                    socket,
                    server,
                    answer,
                    message,
                },
                now,
            );
        }
    }

    /// What the application in the network namespace `netns` resolved about `address` (dialled
    /// on `port`) and `name`.
    pub fn resolved(&self, netns: u64, address: IpAddr, port: u16, name: Option<&str>) -> Resolved {
        self.drain();
        self.records.lock().unwrap_or_else(|e| e.into_inner()).resolved(
            netns,
            address,
            port,
            name,
            Instant::now(),
        )
    }

    /// Records a DNS message carried over TCP (DNS over TCP in observe mode), as the kernel's
    /// copies of UDP ones are: `socket` names the connection.
    pub fn observe_tcp(&self, netns: u64, socket: u64, server: IpAddr, answer: bool, message: &[u8]) {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records.observe(
            Observed {
                netns,
                socket,
                server,
                answer,
                message,
            },
            Instant::now(),
        );
    }

    /// The record's entries about `address` and/or `name`, by namespace, and its SRV delegations.
    pub fn report(&self, address: Option<IpAddr>, name: Option<&str>) -> String {
        use std::fmt::Write as _;
        self.drain();
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut out = String::new();
        for (netns, entries) in records.namespaces() {
            let known: Vec<Known> = records.known(netns, address, name, now);
            let delegations = match (address, name) {
                (Some(_), None) => Vec::new(),
                _ => records.delegations(netns, name, now),
            };
            if known.is_empty() && delegations.is_empty() {
                continue;
            }
            let _ = writeln!(out, "netns cookie {netns} ({entries} entries):");
            for k in known {
                let asked = if k.asked { "" } else { " (via CNAME)" };
                let _ = writeln!(out, "  {} -> {}  ttl {}s{asked}", k.name, k.address, k.ttl_left);
            }
            for d in &delegations {
                let targets: Vec<String> = d.targets.iter().map(|(t, p)| format!("{t}:{p}")).collect();
                let _ = writeln!(out, "  {} SRV {}", d.service, targets.join(", "));
            }
        }
        if out.is_empty() {
            out.push_str("the DNS record knows nothing about that\n");
        }
        out
    }
}

fn decode(bytes: &[u8]) -> Option<DnsEvent> {
    if bytes.len() < std::mem::size_of::<DnsEvent>() {
        return None;
    }
    // SAFETY: DnsEvent is plain #[repr(C)] data, valid for any bit pattern, and `bytes` holds
    // at least one; read_unaligned needs no alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DnsEvent>()) })
}
