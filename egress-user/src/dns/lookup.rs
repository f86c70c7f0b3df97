//! The agent's own lookups, for what the record cannot know: the SRV targets of a delegated
//! connection whose address the application resolved where the kernel does not see (a hosts
//! file, nscd, systemd-resolved over its socket, DNS over TLS). The agent asks as the client
//! would: in the host's network namespace through the system resolver (getaddrinfo: the same
//! nsswitch, hosts file, nscd and resolved as the homeserver), in a container's through its hosts
//! file. Bounded: a few lookups at once, each with a deadline, answers cached briefly. The
//! clients' hosts and resolv.conf files are cached here too.
//!
//! What a lookup finds is a claim of the same standing as SNI: the dialled address is vetted
//! whatever the name, and the name is refused where SNI would be.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;

use crate::route::plan::{ClientName, Resolved};

/// Lookups running at once; a connection that finds none free goes without.
const MAX_IN_FLIGHT: usize = 8;
/// How long one lookup may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an answer is reused: a found address, or a failure.
const FOUND_FOR: Duration = Duration::from_secs(30);
const FAILED_FOR: Duration = Duration::from_secs(5);
/// Names cached over all namespaces; clients' files cached.
const MAX_CACHED: usize = 1024;
const MAX_FILES: usize = 128;

/// Where the client's names come from.
pub enum View<'a> {
    /// The system resolver of the agent's own namespace (the host's homeserver).
    System,
    /// A container's hosts file (its text).
    HostsFile(&'a str),
}

/// What a lookup did, for the decision record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Looked {
    /// The names were looked up: the client's name found at the dialled address, or the targets
    /// there remain.
    Done,
    /// No target could be looked up (failures, deadline, too many lookups at once): the
    /// targets stay as the record gave them.
    Failed,
}

impl Looked {
    pub fn as_str(self) -> &'static str {
        match self {
            Looked::Done => "done",
            Looked::Failed => "failed",
        }
    }
}

/// A file of a client's that the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientFile {
    Hosts,
    ResolvConf,
}

/// A client's file (None: it could not be read), and when it was read.
type FileRead = (Option<Arc<str>>, Instant);

struct Cached {
    /// None: the lookup failed.
    addresses: Option<Vec<IpAddr>>,
    until: Instant,
}

pub struct Lookups {
    names: Mutex<HashMap<(u64, String), Cached>>,
    files: Mutex<HashMap<(u64, ClientFile), FileRead>>,
    in_flight: Arc<Semaphore>,
}

impl Default for Lookups {
    fn default() -> Self {
        Self::new()
    }
}

impl Lookups {
    pub fn new() -> Self {
        Self {
            names: Mutex::default(),
            files: Mutex::default(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// For a connection whose `sni` delegates: looks up, all at once, the name itself and
    /// `resolved.srv_targets` in `view` (of the namespace with cookie `netns`). If the name
    /// itself resolves to `address`, the client named the server it dialled (its `.well-known`,
    /// its web site): the name is taken as resolved. Else the targets are narrowed to those at
    /// `address` and marked looked up; they stay as they are if none could be looked up.
    pub async fn narrow(
        &self,
        netns: u64,
        view: &View<'_>,
        resolved: &mut Resolved,
        sni: Option<&str>,
        address: IpAddr,
    ) -> Looked {
        let address = address.to_canonical();
        let at_address = |found: &Option<Vec<IpAddr>>| {
            found
                .as_ref()
                .is_some_and(|addresses| addresses.iter().any(|a| a.to_canonical() == address))
        };
        let names: Vec<&str> = sni
            .into_iter()
            .chain(resolved.srv_targets.iter().map(String::as_str))
            .collect();
        let found =
            futures_util::future::join_all(names.iter().map(|name| self.addresses(netns, name, view))).await;
        let (own, targets) = match sni {
            Some(_) => (found.first(), &found[1..]),
            None => (None, &found[..]),
        };
        if own.is_some_and(at_address) {
            resolved.client = ClientName::Resolved;
            resolved.srv_targets.clear();
            resolved.looked_up = true;
            return Looked::Done;
        }
        if !targets.iter().any(Option::is_some) {
            return Looked::Failed;
        }
        resolved.srv_targets = resolved
            .srv_targets
            .iter()
            .zip(targets)
            .filter(|(_, found)| at_address(found))
            .map(|(target, _)| target.clone())
            .collect();
        resolved.looked_up = true;
        Looked::Done
    }

    /// The addresses of `name` in `view`, from the cache or looked up now; None if the lookup
    /// failed (no such name counts as an answer: no address).
    async fn addresses(&self, netns: u64, name: &str, view: &View<'_>) -> Option<Vec<IpAddr>> {
        let key = (netns, name.to_owned());
        let now = Instant::now();
        if let Some(cached) = self.lock_names().get(&key).filter(|c| c.until > now) {
            return cached.addresses.clone();
        }
        let addresses = match view {
            View::HostsFile(text) => Some(hosts_file_addresses(text, name)),
            View::System => self.system_lookup(name).await,
        };
        let until = now
            + if addresses.is_some() {
                FOUND_FOR
            } else {
                FAILED_FOR
            };
        let mut names = self.lock_names();
        if names.len() >= MAX_CACHED {
            names.retain(|_, c| c.until > now);
            if names.len() >= MAX_CACHED {
                names.clear();
            }
        }
        names.insert(
            key,
            Cached {
                addresses: addresses.clone(),
                until,
            },
        );
        addresses
    }

    /// getaddrinfo on a blocking thread that holds its permit until it returns, so that lookups
    /// past their deadline still count against the bound.
    async fn system_lookup(&self, name: &str) -> Option<Vec<IpAddr>> {
        let permit = self.in_flight.clone().try_acquire_owned().ok()?;
        let host = name.to_owned();
        let lookup = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            system_addresses(&host)
        });
        tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await.ok()?.ok()?
    }

    /// `file` of namespace `netns` as read lately: `Some(None)` if it could not be read (less
    /// than [`FAILED_FOR`] ago), None if it must be read again.
    pub fn cached_file(&self, netns: u64, file: ClientFile) -> Option<Option<Arc<str>>> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files
            .get(&(netns, file))
            .filter(|(text, read)| read.elapsed() < if text.is_some() { FOUND_FOR } else { FAILED_FOR })
            .map(|(text, _)| text.clone())
    }

    pub fn keep_file(&self, netns: u64, file: ClientFile, text: Option<Arc<str>>) {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if files.len() >= MAX_FILES {
            files.retain(|_, (_, read)| read.elapsed() < FOUND_FOR);
            if files.len() >= MAX_FILES {
                files.clear();
            }
        }
        files.insert((netns, file), (text, Instant::now()));
    }

    fn lock_names(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, String), Cached>> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// getaddrinfo(`name`): its addresses; none for a name that has none (NXDOMAIN, no data);
/// None when the lookup failed (no answer, SERVFAIL).
fn system_addresses(name: &str) -> Option<Vec<IpAddr>> {
    use dns_lookup::{AddrInfoHints, LookupErrorKind, SockType, getaddrinfo};
    let hints = AddrInfoHints {
        socktype: SockType::Stream.into(),
        ..AddrInfoHints::default()
    };
    match getaddrinfo(Some(name), None, Some(hints)) {
        Ok(found) => {
            let mut addresses: Vec<IpAddr> = found.filter_map(Result::ok).map(|a| a.sockaddr.ip()).collect();
            addresses.dedup();
            Some(addresses)
        }
        Err(e) if matches!(e.kind(), LookupErrorKind::NoName | LookupErrorKind::NoData) => Some(Vec::new()),
        Err(_) => None,
    }
}

/// The nameservers a resolv.conf names, in order.
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some("nameserver"))
                .then(|| fields.next())
                .flatten()
                // A link-local IPv6 server may carry its interface: fe80::1%eth0.
                .and_then(|address| address.split('%').next()?.parse::<IpAddr>().ok())
        })
        .collect()
}

/// The addresses a hosts file gives `name` (case-insensitive, as glibc compares).
pub fn hosts_file_addresses(text: &str, name: &str) -> Vec<IpAddr> {
    let name = name.trim_end_matches('.');
    let mut found = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        let Some(Ok(address)) = fields.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        if fields.any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(name)) && !found.contains(&address) {
            found.push(address);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_files_are_read_as_glibc_reads_them() {
        let text = "127.0.0.1 localhost\n\
                    # 10.0.0.1 commented.example\n\
                    10.0.0.2\tfed.example.org fed   # trailing comment\n\
                    fd00::2 FED.example.org\n\
                    not-an-address fed.example.org\n\
                    10.0.0.2 fed.example.org\n\
                    10.0.0.3 other.example #fed.example.org\n";
        for (name, want) in [
            ("fed.example.org", vec!["10.0.0.2", "fd00::2"]),
            ("FED.EXAMPLE.ORG.", vec!["10.0.0.2", "fd00::2"]),
            ("fed", vec!["10.0.0.2"]),
            ("commented.example", vec![]),
            ("other.example", vec!["10.0.0.3"]),
            ("example.org", vec![]),
        ] {
            let want: Vec<IpAddr> = want.iter().map(|a| a.parse().unwrap()).collect();
            assert_eq!(hosts_file_addresses(text, name), want, "{name}");
        }
    }

    #[test]
    fn resolv_conf_names_its_nameservers() {
        let text = "# generated\nsearch corp.example\nnameserver 10.0.0.53\nnameserver  fe80::1%eth0\n\
                    options edns0\nnameserver not-an-address\n#nameserver 10.9.9.9\nnameserver ::1\n";
        let want: Vec<IpAddr> = ["10.0.0.53", "fe80::1", "::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(nameservers(text), want);
    }

    fn delegated(targets: &[&str]) -> Resolved {
        Resolved {
            client: ClientName::Delegates,
            srv_targets: targets.iter().map(|t| t.to_string()).collect(),
            ..Resolved::default()
        }
    }

    #[tokio::test]
    async fn targets_are_narrowed_to_those_at_the_dialled_address() {
        let lookups = Lookups::new();
        let hosts = "192.0.2.1 a.example server.example\n192.0.2.2 b.example\n::ffff:192.0.2.3 c.example\n";
        let view = View::HostsFile(hosts);
        let dialled: IpAddr = "192.0.2.2".parse().unwrap();
        for (targets, want) in [
            (&["a.example", "b.example"][..], &["b.example"][..]),
            (&["a.example"], &[]),
            (&["b.example", "unknown.example"], &["b.example"]),
        ] {
            let mut resolved = delegated(targets);
            let looked = lookups
                .narrow(1, &view, &mut resolved, Some("server.example"), dialled)
                .await;
            assert_eq!(looked, Looked::Done);
            assert_eq!(resolved.srv_targets, want, "{targets:?}");
            assert_eq!(resolved.client, ClientName::Delegates);
            assert!(resolved.looked_up);
        }
        // A v4-mapped entry matches the IPv4 address dialled.
        let mut resolved = delegated(&["c.example"]);
        lookups
            .narrow(1, &view, &mut resolved, None, "192.0.2.3".parse().unwrap())
            .await;
        assert_eq!(resolved.srv_targets, ["c.example"]);
        // The server name's own address (its .well-known, its web site): the name is right.
        let mut resolved = delegated(&["b.example"]);
        lookups
            .narrow(
                1,
                &view,
                &mut resolved,
                Some("server.example"),
                "192.0.2.1".parse().unwrap(),
            )
            .await;
        assert_eq!(resolved.client, ClientName::Resolved);
        assert!(resolved.srv_targets.is_empty());
    }

    #[tokio::test]
    async fn the_system_resolver_reads_the_hosts_file_and_caches() {
        let lookups = Lookups::new();
        // localhost is in every hosts file, so getaddrinfo answers it without DNS (a unit test
        // sends nothing to the network); the answer is cached per namespace.
        let mut resolved = delegated(&["localhost"]);
        let looked = lookups
            .narrow(
                7,
                &View::System,
                &mut resolved,
                None,
                "127.0.0.1".parse().unwrap(),
            )
            .await;
        assert_eq!(looked, Looked::Done);
        assert_eq!(resolved.srv_targets, ["localhost"]);
        assert!(lookups.lock_names().contains_key(&(7, "localhost".to_owned())));
        assert!(!lookups.lock_names().contains_key(&(8, "localhost".to_owned())));
        // Not at another address.
        let mut resolved = delegated(&["localhost"]);
        lookups
            .narrow(
                7,
                &View::System,
                &mut resolved,
                None,
                "127.0.0.2".parse().unwrap(),
            )
            .await;
        assert!(resolved.srv_targets.is_empty() && resolved.looked_up);
    }
}
