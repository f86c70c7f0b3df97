//! Where an outbound TCP connection goes: refused, direct, or through the upstream proxy.
//!
//! Pure decision logic (no I/O, no logging), shared by the agent and by the code that fills the
//! kernel's maps. It follows Synapse's semantics, so a homeserver's existing settings
//! (`ip_range_blacklist`, `ip_range_whitelist`, `no_proxy`/`no_proxy_hosts`) mean the same here.
//! First match wins:
//!
//! 1. `ip_range_whitelist`: an exception to the blacklist only; a whitelisted IP skips step 2 and
//!    continues with step 3.
//! 2. `ip_range_blacklist`: refused.
//! 3. `no_proxy`: direct.
//! 4. a proxy is configured for the protocol: through it.
//! 5. otherwise direct (the blacklist has been checked already).
//!
//! Target addresses are normalised before any matching: an IPv4-mapped IPv6 address
//! (`::ffff:a.b.c.d`, what a dual-stack socket shows for an IPv4 peer) is treated as the IPv4
//! address it carries, so `::ffff:10.0.0.1` cannot slip past `10.0.0.0/8`. Ranges are matched as
//! written: a range inside `::ffff:0:0/96` never matches anything, write its IPv4 form instead.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Synapse's default `ip_range_blacklist` (plus `0.0.0.0` and `::`, which Synapse always adds),
/// extended, as Stripe's Smokescreen does, with the IPv6 ranges that embed an IPv4 address and
/// may reach it through a relay or translator.
///
/// IPv4-mapped `::ffff:0:0/96` is not listed: targets in it are normalised to IPv4 before
/// matching, so the IPv4 ranges above apply to them, and `::ffff:8.8.8.8` stays reachable.
pub const DEFAULT_BLACKLIST: &[&str] = &[
    // Loopback.
    "127.0.0.0/8",
    // Private networks.
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    // Carrier-grade NAT.
    "100.64.0.0/10",
    // IETF protocol assignments.
    "192.0.0.0/24",
    // Link-local.
    "169.254.0.0/16",
    // Formerly the 6to4 relay anycast.
    "192.88.99.0/24",
    // Benchmarking and documentation.
    "198.18.0.0/15",
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    // Multicast.
    "224.0.0.0/4",
    // IPv6 loopback, link-local, unique local, documentation, multicast, site-local.
    "::1/128",
    "fe80::/10",
    "fc00::/7",
    "2001:db8::/32",
    "ff00::/8",
    "fec0::/10",
    // "This host": connecting to the unspecified address reaches the local machine.
    "0.0.0.0/32",
    "::/128",
    // IPv6 forms that embed an IPv4 address. IPv4-compatible (deprecated).
    "::/96",
    // 6to4.
    "2002::/16",
    // NAT64 well-known prefix. On an IPv6-only host behind DNS64 every IPv4 destination looks like
    // this; such a host has to whitelist it (and then loses the IPv4 checks for those addresses).
    "64:ff9b::/96",
    // Teredo.
    "2001::/32",
];

/// [`DEFAULT_BLACKLIST`] parsed.
pub fn default_blacklist() -> Vec<IpNet> {
    DEFAULT_BLACKLIST
        .iter()
        .map(|s| parse_ip_range(s).expect("DEFAULT_BLACKLIST entries are valid ranges"))
        .collect()
}

/// Parses a CIDR range (`10.0.0.0/8`, `2001:db8::/32`) or a bare address (as `/32` or `/128`).
///
/// A range with bits set after the prefix (`10.0.0.1/8`) is refused rather than truncated: it is
/// usually a typo for a different range (or for a single address), and guessing would silently
/// widen or move a security boundary.
pub fn parse_ip_range(s: &str) -> Result<IpNet, PolicyError> {
    let value = s.trim();
    let (addr, prefix) = match value.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (value, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| PolicyError::NotIpRange {
        value: value.to_owned(),
    })?;
    let max = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    let prefix_len = match prefix {
        None => max,
        Some(p) => parse_digits::<u8>(p)
            .filter(|&len| len <= max)
            .ok_or_else(|| PolicyError::BadPrefix {
                value: value.to_owned(),
                max,
            })?,
    };
    let net = IpNet::new(addr, prefix_len).expect("prefix length checked above");
    if net.trunc() != net {
        return Err(PolicyError::HostBitsSet {
            value: value.to_owned(),
            network: net.trunc(),
        });
    }
    Ok(net)
}

/// A configuration value that cannot be used. Every message names the value and says why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("`{value}` is not an IP address or CIDR range")]
    NotIpRange { value: String },
    #[error("`{value}`: the prefix length must be a number from 0 to {max}")]
    BadPrefix { value: String, max: u8 },
    #[error("`{value}` has bits set after the prefix length; the range is `{network}`")]
    HostBitsSet { value: String, network: IpNet },
    #[error("empty no_proxy entry")]
    EmptyNoProxyEntry,
    #[error("no_proxy entry `{entry}`: port `{port}` is not a number from 1 to 65535")]
    BadNoProxyPort { entry: String, port: String },
    #[error("no_proxy entry `{entry}`: {reason}")]
    BadNoProxyHost { entry: String, reason: &'static str },
    #[error("no_proxy entry `{entry}`: {}", .error.why())]
    BadNoProxyRange { entry: String, error: Box<PolicyError> },
}

impl PolicyError {
    /// Why, without the value: for messages that show the value already (clap's).
    pub fn why(&self) -> String {
        match self {
            Self::NotIpRange { .. } => "not an IP address or CIDR range".into(),
            Self::BadPrefix { max, .. } => format!("the prefix length must be a number from 0 to {max}"),
            Self::HostBitsSet { network, .. } => {
                format!("has bits set after the prefix length; the range is `{network}`")
            }
            Self::EmptyNoProxyEntry => "empty no_proxy entry".into(),
            Self::BadNoProxyPort { port, .. } => format!("port `{port}` is not a number from 1 to 65535"),
            Self::BadNoProxyHost { reason, .. } => (*reason).into(),
            Self::BadNoProxyRange { error, .. } => error.why(),
        }
    }
}

/// An address range given as a flag (clap shows the value itself).
pub fn ip_range_arg(s: &str) -> Result<IpNet, String> {
    parse_ip_range(s).map_err(|e| e.why())
}

/// A no_proxy entry given as a flag (clap shows the value itself).
pub fn no_proxy_arg(s: &str) -> Result<NoProxyEntry, String> {
    NoProxyEntry::parse(s).map_err(|e| e.why())
}

/// One `no_proxy` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoProxyEntry {
    /// `*`: every destination.
    All,
    /// A host name and its subdomains, lower case, without leading or trailing dot.
    Host { name: String, port: Option<u16> },
    /// An address or range, matched against the target's IP whether or not a name is known.
    Ip { net: IpNet, port: Option<u16> },
}

impl NoProxyEntry {
    /// Parses one entry, already split from its list.
    ///
    /// Accepted: `*`; `name`, `.name` and `*.name` (all three meaning the name and its
    /// subdomains; Python's `proxy_bypass_environment` and curl treat a leading dot this way, and a
    /// leading `*.` is taken as the same thing rather than refused); IPv4 and IPv6 addresses and
    /// CIDR ranges, IPv6 optionally bracketed; any of these except `*` with `:port`, IPv6 then in
    /// brackets (`[2001:db8::1]:8448`), since an unbracketed one is read as a whole address.
    pub fn parse(raw: &str) -> Result<Self, PolicyError> {
        let entry = raw.trim();
        if entry.is_empty() {
            return Err(PolicyError::EmptyNoProxyEntry);
        }
        if entry == "*" {
            return Ok(NoProxyEntry::All);
        }
        let host_err = |reason| PolicyError::BadNoProxyHost {
            entry: entry.to_owned(),
            reason,
        };
        if entry.contains('@') {
            // User information: never echo it (a proxy URL put here by mistake has a password).
            return Err(PolicyError::BadNoProxyHost {
                entry: crate::redact::redact_credentials(entry),
                reason: "has user information (`@`); give a host name, address or range",
            });
        }
        if entry.contains("://") {
            return Err(host_err("is a URL; give a host name, address or range"));
        }
        let (host, port, bracketed) = if let Some(rest) = entry.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| host_err("has no closing `]`"))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| host_err("has text after `]`; write `[address]:port`"))?,
                ),
            };
            (inside, port, true)
        } else if entry.contains(']') {
            return Err(host_err("has a `]` without an opening `[`"));
        } else if entry.matches(':').count() == 1 {
            let (host, port) = entry.split_once(':').expect("one colon");
            (host, Some(port), false)
        } else {
            // No colon, or an IPv6 address or range (which has at least two).
            (entry, None, false)
        };
        let port = port
            .map(|p| {
                parse_digits::<u16>(p)
                    .filter(|&p| p != 0)
                    .ok_or_else(|| PolicyError::BadNoProxyPort {
                        entry: entry.to_owned(),
                        port: p.to_owned(),
                    })
            })
            .transpose()?;
        if bracketed && !host.contains(':') {
            return Err(host_err("brackets are only for IPv6 addresses"));
        }
        if host == "*" {
            return Err(host_err("`*` means every destination and cannot take a port"));
        }
        if host.contains(['/', ':']) || host.parse::<IpAddr>().is_ok() {
            let net = parse_ip_range(host).map_err(|error| PolicyError::BadNoProxyRange {
                entry: entry.to_owned(),
                error: Box::new(error),
            })?;
            return Ok(NoProxyEntry::Ip { net, port });
        }
        let name = parse_host_name(host).map_err(host_err)?;
        Ok(NoProxyEntry::Host { name, port })
    }

    fn matches(&self, ip: IpAddr, port: u16, host: Option<&str>) -> bool {
        match self {
            NoProxyEntry::All => true,
            NoProxyEntry::Host { name, port: p } => {
                p.is_none_or(|p| p == port) && host.is_some_and(|host| host_matches(name, host))
            }
            NoProxyEntry::Ip { net, port: p } => p.is_none_or(|p| p == port) && net.contains(&ip),
        }
    }
}

/// The admin's notation, for the decision log: `*`, `a.com`, `a.com:8448`, `10.0.0.1`,
/// `10.0.0.0/8:443`, `[2001:db8::1]:8448`. Parsing it again gives the same entry.
impl fmt::Display for NoProxyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoProxyEntry::All => f.write_str("*"),
            NoProxyEntry::Host { name, port: None } => f.write_str(name),
            NoProxyEntry::Host {
                name,
                port: Some(port),
            } => write!(f, "{name}:{port}"),
            NoProxyEntry::Ip { net, port } => {
                // A single address is shown without its /32 or /128.
                let host = if net.prefix_len() == net.max_prefix_len() {
                    net.addr().to_string()
                } else {
                    net.to_string()
                };
                match (net, port) {
                    (_, None) => f.write_str(&host),
                    (IpNet::V4(_), Some(port)) => write!(f, "{host}:{port}"),
                    (IpNet::V6(_), Some(port)) => write!(f, "[{host}]:{port}"),
                }
            }
        }
    }
}

impl std::str::FromStr for NoProxyEntry {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        Self::parse(s)
    }
}

impl serde::Serialize for NoProxyEntry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for NoProxyEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Lists of address ranges as settings carry them: written as text, parsed with
/// [`parse_ip_range`] (so `10.0.0.1/8` is refused, a bare address is one host).
pub mod ip_ranges {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(nets.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|text| super::parse_ip_range(text).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// The destinations that bypass the upstream proxy (Synapse's `no_proxy_hosts`, the `no_proxy`
/// environment variable), in the order given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoProxy {
    entries: Vec<NoProxyEntry>,
}

impl NoProxy {
    pub fn new(entries: Vec<NoProxyEntry>) -> Self {
        Self { entries }
    }

    /// One entry per item (a TOML list, a repeated flag). Items are trimmed; an empty item is an
    /// error here, since in a list it is a mistake rather than an artefact of splitting.
    pub fn parse_list<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, PolicyError> {
        let entries = items
            .into_iter()
            .map(NoProxyEntry::parse)
            .collect::<Result<_, _>>()?;
        Ok(NoProxy { entries })
    }

    /// The environment variable's form: comma-separated, whitespace around entries ignored, empty
    /// entries (`a.com,,b.com`, a trailing comma) skipped.
    pub fn parse_env(value: &str) -> Result<Self, PolicyError> {
        Self::parse_list(value.split(',').filter(|item| !item.trim().is_empty()))
    }

    /// Appends `other`'s entries after this one's.
    pub fn extend(&mut self, other: NoProxy) {
        self.entries.extend(other.entries);
    }

    /// The entries in the order given, duplicates included.
    pub fn entries(&self) -> &[NoProxyEntry] {
        &self.entries
    }

    /// The first entry matching the destination. `host` is the name the client asked for (SNI,
    /// `Host`), without port, if known; host name entries never match without it.
    pub fn matches(&self, ip: IpAddr, port: u16, host: Option<&str>) -> Option<&NoProxyEntry> {
        let ip = ip.to_canonical();
        self.entries.iter().find(|entry| entry.matches(ip, port, host))
    }

    /// IP/CIDR entries without a port (and 0.0.0.0/0 + ::/0 for `*`): destinations the kernel can
    /// pass direct without asking the agent. Aggregated, so overlapping entries become one.
    /// Whether a host entry (on any port), or `*`, names `host`: the names synthetic DNS leaves
    /// to the internal resolver, since they are reached directly.
    pub fn names_host(&self, host: &str) -> bool {
        self.entries.iter().any(|entry| match entry {
            NoProxyEntry::All => true,
            NoProxyEntry::Host { name, .. } => host_matches(name, host),
            NoProxyEntry::Ip { .. } => false,
        })
    }

    pub fn kernel_bypass_nets(&self) -> Vec<IpNet> {
        if self.entries.contains(&NoProxyEntry::All) {
            return vec![
                IpNet::new(Ipv4Addr::UNSPECIFIED.into(), 0).expect("valid"),
                IpNet::new(Ipv6Addr::UNSPECIFIED.into(), 0).expect("valid"),
            ];
        }
        let nets: Vec<IpNet> = self
            .entries
            .iter()
            .filter_map(|entry| match entry {
                NoProxyEntry::Ip { net, port: None } => Some(*net),
                _ => None,
            })
            .collect();
        IpNet::aggregate(&nets)
    }
}

/// How the policy disposes of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Refused before any contact with the destination.
    Deny,
    /// Straight to the destination, not through the upstream proxy.
    Direct,
    /// Through the upstream proxy configured for the protocol.
    Proxy,
}

/// Which kind of rule decided: the decision log's `rule_kind` and the metrics' label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleKind {
    /// `ip_range_blacklist`: refused.
    Blacklist,
    /// A `no_proxy` entry: direct.
    NoProxy,
    /// The proxy configured for the protocol.
    Proxy,
    /// No proxy is configured for the protocol: direct.
    NoProxyForProtocol,
    /// `default_route`, for traffic that is neither TLS nor HTTP.
    DefaultRoute,
    /// The client named this host itself (`localhost`, a loopback address): never reachable
    /// through egress.
    LocalName,
    /// A synthetic address (synthetic DNS) that the route would reach directly: it has no host.
    Synthetic,
    /// DNS over TCP to a resolver the application asked over UDP: direct, read like UDP.
    Resolver,
    /// A `proxy_routes` entry: its proxies, or direct.
    ProxyRoute,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Blacklist => "blacklist",
            RuleKind::NoProxy => "no_proxy",
            RuleKind::Proxy => "proxy",
            RuleKind::NoProxyForProtocol => "no_proxy_for_protocol",
            RuleKind::DefaultRoute => "default_route",
            RuleKind::LocalName => "local_name",
            RuleKind::Synthetic => "synthetic",
            RuleKind::Resolver => "resolver",
            RuleKind::ProxyRoute => "proxy_route",
        }
    }
}

/// The rule that decided, shown in the admin's notation, e.g. `ip_range_blacklist 10.0.0.0/8`
/// or `ip_range_whitelist 10.1.0.0/16, no_proxy a.com`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub kind: RuleKind,
    /// The range, entry or setting that matched; empty for `Proxy` and `NoProxyForProtocol`.
    pub detail: String,
    /// The whitelist range that exempted a blacklisted address before this rule applied.
    pub whitelisted: Option<IpNet>,
}

impl Rule {
    pub fn new(kind: RuleKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
            whitelisted: None,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(white) = self.whitelisted {
            write!(f, "ip_range_whitelist {white}, ")?;
        }
        match self.kind {
            RuleKind::Blacklist => write!(f, "ip_range_blacklist {}", self.detail),
            RuleKind::NoProxy => write!(f, "no_proxy {}", self.detail),
            RuleKind::Proxy => f.write_str("proxy"),
            RuleKind::NoProxyForProtocol => f.write_str("no proxy for protocol"),
            RuleKind::DefaultRoute => write!(f, "default_route {} (neither TLS nor HTTP)", self.detail),
            RuleKind::LocalName => write!(f, "local name {}", self.detail),
            RuleKind::Synthetic => write!(
                f,
                "synthetic address {}: only the proxy reaches its name",
                self.detail
            ),
            RuleKind::Resolver => write!(f, "DNS over TCP to the application's resolver {}", self.detail),
            RuleKind::ProxyRoute => write!(f, "proxy_route {}", self.detail),
        }
    }
}

/// A disposition and the rule that made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruling {
    pub disposition: Disposition,
    pub rule: Rule,
}

/// The whole policy; see the module documentation for the order of the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub whitelist: Vec<IpNet>,
    pub blacklist: Vec<IpNet>,
    pub no_proxy: NoProxy,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            whitelist: Vec::new(),
            blacklist: default_blacklist(),
            no_proxy: NoProxy::default(),
        }
    }
}

impl Policy {
    /// The ruling for a connection to `ip:port` asking for `host` (TLS SNI, HTTP Host without
    /// port, if any). `proxy_configured`: whether a proxy is set for the connection's protocol
    /// (the routing plan chooses which).
    pub fn decide(&self, ip: IpAddr, port: u16, host: Option<&str>, proxy_configured: bool) -> Ruling {
        let ip = ip.to_canonical();
        let mut whitelisted = None;
        if let Some(black) = most_specific(&self.blacklist, ip) {
            match most_specific(&self.whitelist, ip) {
                Some(white) => whitelisted = Some(*white),
                None => {
                    return Ruling {
                        disposition: Disposition::Deny,
                        rule: Rule::new(RuleKind::Blacklist, black.to_string()),
                    };
                }
            }
        }
        let (disposition, rule) = if let Some(entry) = self.no_proxy.matches(ip, port, host) {
            (
                Disposition::Direct,
                Rule::new(RuleKind::NoProxy, entry.to_string()),
            )
        } else if proxy_configured {
            (Disposition::Proxy, Rule::new(RuleKind::Proxy, ""))
        } else {
            (Disposition::Direct, Rule::new(RuleKind::NoProxyForProtocol, ""))
        };
        Ruling {
            disposition,
            rule: Rule { whitelisted, ..rule },
        }
    }

    /// Whether an IP alone is denied (blacklisted and not whitelisted), with the rule: what the
    /// kernel decides before any name is known.
    pub fn denied(&self, ip: IpAddr) -> Option<Rule> {
        let ip = ip.to_canonical();
        let black = most_specific(&self.blacklist, ip)?;
        match most_specific(&self.whitelist, ip) {
            Some(_) => None,
            None => Some(Rule::new(RuleKind::Blacklist, black.to_string())),
        }
    }

    /// Blacklist minus whitelist as an exact set difference, as sorted, disjoint CIDRs: e.g.
    /// 10.0.0.0/8 minus 10.1.0.0/16 = 10.0.0.0/16, 10.2.0.0/15, 10.4.0.0/14, ..., 10.128.0.0/9.
    ///
    /// Subtracting here means the kernel's LPM trie needs one lookup and no whitelist of its own,
    /// where a longer whitelist prefix would have to win over a shorter blacklist one. The kernel
    /// must normalise IPv4-mapped addresses itself, as no `::ffff:0:0/96` forms are emitted.
    pub fn kernel_deny_nets(&self) -> Vec<IpNet> {
        difference(&self.blacklist, &self.whitelist)
    }

    /// no_proxy's address ranges minus the deny set, as disjoint CIDRs: with the two sets
    /// disjoint, the kernel can look the bypass set up first, so a bypassed connect costs one
    /// trie lookup (measured by `cargo xtask bench`), and the deny set still always wins.
    pub fn kernel_bypass_nets(&self) -> Vec<IpNet> {
        difference(&self.no_proxy.kernel_bypass_nets(), &self.kernel_deny_nets())
    }
}

/// `nets` minus `holes`, as sorted, disjoint CIDRs.
fn difference(nets: &[IpNet], holes: &[IpNet]) -> Vec<IpNet> {
    // Aggregating first makes the pieces disjoint (`::/128` lies inside `::/96`); splitting a
    // range keeps them so.
    let mut nets = IpNet::aggregate(&nets.to_vec());
    for hole in holes {
        let mut rest = Vec::with_capacity(nets.len());
        for net in nets {
            subtract(net, *hole, &mut rest);
        }
        nets = rest;
    }
    IpNet::aggregate(&nets)
}

/// The longest range containing `ip`: the most informative one for the log, and the one the
/// kernel's longest-prefix match would name.
fn most_specific(nets: &[IpNet], ip: IpAddr) -> Option<&IpNet> {
    nets.iter()
        .filter(|net| net.contains(&ip))
        .max_by_key(|net| net.prefix_len())
}

/// Pushes `net` minus `hole` onto `out`, as disjoint CIDRs. Two CIDRs are either nested or
/// disjoint, so when `net` strictly contains `hole`, `net` is halved down to `hole`, keeping each
/// half that does not contain it.
fn subtract(net: IpNet, hole: IpNet, out: &mut Vec<IpNet>) {
    if hole.contains(&net) {
        return;
    }
    if !net.contains(&hole) {
        out.push(net);
        return;
    }
    let mut current = net;
    while current.prefix_len() < hole.prefix_len() {
        let mut halves = current
            .subnets(current.prefix_len() + 1)
            .expect("longer prefix is valid");
        let (low, high) = (
            halves.next().expect("two halves"),
            halves.next().expect("two halves"),
        );
        if low.contains(&hole) {
            out.push(high);
            current = low;
        } else {
            out.push(low);
            current = high;
        }
    }
}

/// Whether `host` is `name` or a subdomain of it, ignoring ASCII case and a trailing dot on
/// either side. `a.com` matches `x.a.com` but not `xa.com`.
fn host_matches(name: &str, host: &str) -> bool {
    // Entries from the parser are already normalised; tolerate hand-built ones too.
    let name = name.strip_prefix('.').unwrap_or(name);
    let name = name.strip_suffix('.').unwrap_or(name).as_bytes();
    let host = host.strip_suffix('.').unwrap_or(host).as_bytes();
    if name.is_empty() || host.len() < name.len() {
        return false;
    }
    let split = host.len() - name.len();
    host[split..].eq_ignore_ascii_case(name) && (split == 0 || host[split - 1] == b'.')
}

/// Validates a no_proxy host name and returns it lower case, without its leading `.` or `*.` and
/// trailing dot.
fn parse_host_name(host: &str) -> Result<String, &'static str> {
    let name = host
        .strip_prefix("*.")
        .or_else(|| host.strip_prefix('.'))
        .unwrap_or(host);
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err("has no host name");
    }
    if name.contains('*') {
        return Err("`*` is only allowed alone or as a leading `*.`");
    }
    if name.contains(char::is_whitespace) {
        return Err("contains whitespace; entries are separated by commas");
    }
    if name.contains(',') {
        return Err("contains a comma; give one entry per list item");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err("contains a character that cannot be in a host name \
                    (an internationalised name must be written in its xn-- form)");
    }
    if name.len() > 253 {
        return Err("is longer than the 253 characters a host name can have");
    }
    if name.split('.').any(str::is_empty) {
        return Err("has an empty label (`..`)");
    }
    if name.split('.').any(|label| label.len() > 63) {
        return Err("has a label longer than the 63 characters a host name label can have");
    }
    // A top-level domain is never all digits (RFC 3696), so this is a mistyped IP address, which
    // as a name would never match anything.
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("is not a valid IP address, and a host name cannot end in a numeric label");
    }
    Ok(name.to_ascii_lowercase())
}

/// Parses a non-empty string of ASCII digits only (`str::parse` would also take a leading `+`).
fn parse_digits<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn nets(items: &[&str]) -> Vec<IpNet> {
        items.iter().map(|s| net(s)).collect()
    }

    fn no_proxy(items: &[&str]) -> NoProxy {
        NoProxy::parse_list(items.iter().copied()).unwrap_or_else(|e| panic!("{items:?}: {e}"))
    }

    fn offset(addr: IpAddr, delta: i128) -> Option<IpAddr> {
        match addr {
            IpAddr::V4(a) => {
                let v = i128::from(u32::from(a)) + delta;
                u32::try_from(v).ok().map(|v| IpAddr::V4(v.into()))
            }
            IpAddr::V6(a) => {
                let v = u128::from(a);
                let v = if delta < 0 {
                    v.checked_sub(delta.unsigned_abs())
                } else {
                    v.checked_add(delta as u128)
                };
                v.map(|v| IpAddr::V6(v.into()))
            }
        }
    }

    /// A deterministic xorshift generator, so the property tests need no extra dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn next_u128(&mut self) -> u128 {
            (u128::from(self.next()) << 64) | u128::from(self.next())
        }

        /// An address inside `net`.
        fn addr_in(&mut self, net: IpNet) -> IpAddr {
            match net {
                IpNet::V4(n) => IpAddr::V4(
                    (u32::from(n.network()) | (self.next() as u32 & u32::from(n.hostmask()))).into(),
                ),
                IpNet::V6(n) => IpAddr::V6(
                    (u128::from(n.network()) | (self.next_u128() & u128::from(n.hostmask()))).into(),
                ),
            }
        }
    }

    // ---- default blacklist -------------------------------------------------------------------

    #[test]
    fn default_blacklist_is_canonical() {
        let parsed = default_blacklist();
        assert_eq!(parsed.len(), DEFAULT_BLACKLIST.len());
        for (text, net) in DEFAULT_BLACKLIST.iter().zip(&parsed) {
            assert_eq!(&net.to_string(), text, "write {text} in canonical form");
        }
        assert_eq!(Policy::default().blacklist, parsed);
        assert!(Policy::default().whitelist.is_empty());
        assert!(Policy::default().no_proxy.entries().is_empty());
    }

    /// Every default range denies an address inside it (reported as that range), its first and
    /// last address, and not the addresses just outside it, where no other default range has them.
    #[test]
    fn default_blacklist_ranges() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, &[&str])] = &[
            // range            inside                 just outside, not denied
            ("127.0.0.0/8",     "127.0.0.1",           &["126.255.255.255", "128.0.0.0"]),
            ("10.0.0.0/8",      "10.20.30.40",         &["9.255.255.255", "11.0.0.0"]),
            ("172.16.0.0/12",   "172.20.20.22",        &["172.15.255.255", "172.32.0.0"]),
            ("192.168.0.0/16",  "192.168.1.1",         &["192.167.255.255", "192.169.0.0"]),
            ("100.64.0.0/10",   "100.100.100.100",     &["100.63.255.255", "100.128.0.0"]),
            ("192.0.0.0/24",    "192.0.0.8",           &["191.255.255.255", "192.0.1.0"]),
            ("169.254.0.0/16",  "169.254.169.254",     &["169.253.255.255", "169.255.0.0"]),
            ("192.88.99.0/24",  "192.88.99.1",         &["192.88.98.255", "192.88.100.0"]),
            ("198.18.0.0/15",   "198.19.1.1",          &["198.17.255.255", "198.20.0.0"]),
            ("192.0.2.0/24",    "192.0.2.1",           &["192.0.1.255", "192.0.3.0"]),
            ("198.51.100.0/24", "198.51.100.7",        &["198.51.99.255", "198.51.101.0"]),
            ("203.0.113.0/24",  "203.0.113.9",         &["203.0.112.255", "203.0.114.0"]),
            ("224.0.0.0/4",     "239.255.255.250",     &["223.255.255.255", "240.0.0.0"]),
            // Below is ::/96, which is denied too.
            ("::1/128",         "::1",                 &[]),
            // Above is fec0::/10.
            ("fe80::/10",       "fe80::1",             &["fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]),
            ("fc00::/7",        "fd12:3456::1",        &["fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                                                         "fe00::"]),
            ("2001:db8::/32",   "2001:db8::1",         &["2001:db7:ffff:ffff:ffff:ffff:ffff:ffff",
                                                         "2001:db9::"]),
            // Below is fec0::/10, and there is nothing above.
            ("ff00::/8",        "ff02::1",             &[]),
            // Below is fe80::/10, above ff00::/8.
            ("fec0::/10",       "fec0::1",             &[]),
            ("0.0.0.0/32",      "0.0.0.0",             &["0.0.0.1"]),
            // Next to it is ::1, denied by ::1/128 and ::/96.
            ("::/128",          "::",                  &[]),
            ("::/96",           "::10.0.0.1",          &["::1:0:0"]),
            ("2002::/16",       "2002:a00:1::",        &["2001:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                                                         "2003::"]),
            ("64:ff9b::/96",    "64:ff9b::8.8.8.8",    &["64:ff9a:ffff:ffff:ffff:ffff:ffff:ffff",
                                                         "64:ff9b::1:0:0"]),
            ("2001::/32",       "2001:0:4136:e378::1", &["2000:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                                                         "2001:1::"]),
        ];
        let policy = Policy::default();
        let mut covered: Vec<&str> = cases.iter().map(|c| c.0).collect();
        covered.sort_unstable();
        let mut all = DEFAULT_BLACKLIST.to_vec();
        all.sort_unstable();
        assert_eq!(covered, all, "every default range has a case");

        for &(range, inside, outside) in cases {
            let n = net(range);
            assert!(n.contains(&ip(inside)), "{inside} in {range}");
            assert_eq!(
                policy.denied(ip(inside)).map(|r| r.to_string()),
                Some(format!("ip_range_blacklist {range}")),
                "{inside}"
            );
            assert!(policy.denied(n.network()).is_some(), "{range} first address");
            assert!(policy.denied(n.broadcast()).is_some(), "{range} last address");
            for out in outside {
                assert!(!n.contains(&ip(out)), "{out} outside {range}");
                assert_eq!(policy.denied(ip(out)), None, "{out} just outside {range}");
                let verdict = policy.decide(ip(out), 443, None, true);
                assert_eq!(verdict.disposition, Disposition::Proxy, "{out}");
            }
        }
    }

    #[test]
    fn public_addresses_are_not_denied() {
        let policy = Policy::default();
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
        ] {
            assert_eq!(policy.denied(ip(addr)), None, "{addr}");
        }
    }

    /// Smokescreen-style classification of the addresses that carry an IPv4 address in IPv6.
    #[test]
    fn ipv4_in_ipv6() {
        let cases: &[(&str, Option<&str>)] = &[
            // IPv4-mapped: normalised, then the IPv4 ranges decide.
            ("::ffff:10.0.0.1", Some("10.0.0.0/8")),
            ("::ffff:127.0.0.1", Some("127.0.0.0/8")),
            ("::ffff:169.254.169.254", Some("169.254.0.0/16")),
            ("::ffff:0.0.0.0", Some("0.0.0.0/32")),
            ("::ffff:8.8.8.8", None),
            // IPv4-compatible, 6to4, NAT64, Teredo: denied whatever they embed.
            ("::10.0.0.1", Some("::/96")),
            ("::8.8.8.8", Some("::/96")),
            ("2002:0a00:0001::1", Some("2002::/16")),
            ("2002:0808:0808::1", Some("2002::/16")),
            ("64:ff9b::10.0.0.1", Some("64:ff9b::/96")),
            ("64:ff9b::8.8.8.8", Some("64:ff9b::/96")),
            ("2001:0:4136:e378:8000:63bf:f5ff:fffe", Some("2001::/32")),
        ];
        let policy = Policy::default();
        for &(addr, range) in cases {
            let expected = range.map(|r| format!("ip_range_blacklist {r}"));
            assert_eq!(policy.denied(ip(addr)).map(|r| r.to_string()), expected, "{addr}");
            let route = policy.decide(ip(addr), 443, None, true).disposition;
            assert_eq!(route == Disposition::Deny, range.is_some(), "{addr}");
        }
    }

    // ---- parse_ip_range ------------------------------------------------------------------------

    #[test]
    fn parse_ip_range_accepts() {
        let cases = [
            ("10.0.0.0/8", "10.0.0.0/8"),
            (" 10.0.0.0/8 ", "10.0.0.0/8"),
            ("10.0.0.1", "10.0.0.1/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("172.16.0.0/012", "172.16.0.0/12"),
            ("::1", "::1/128"),
            ("::/0", "::/0"),
            ("2001:DB8::/32", "2001:db8::/32"),
            // Matched as written: a normalised target never falls in it.
            ("::ffff:10.0.0.0/104", "::ffff:10.0.0.0/104"),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_ip_range(input), Ok(net(expected)), "{input}");
        }
        let mapped = Policy {
            blacklist: vec![net("::ffff:10.0.0.0/104")],
            ..Policy::default()
        };
        assert_eq!(mapped.denied(ip("::ffff:10.0.0.1")), None);
    }

    #[test]
    fn parse_ip_range_errors() {
        let not = |v: &str| PolicyError::NotIpRange { value: v.into() };
        let prefix = |v: &str, max| PolicyError::BadPrefix { value: v.into(), max };
        let host_bits = |v: &str, n: &str| PolicyError::HostBitsSet {
            value: v.into(),
            network: net(n),
        };
        let cases = [
            ("", not("")),
            ("example.com", not("example.com")),
            ("10.0.0", not("10.0.0")),
            ("10.0.0.256", not("10.0.0.256")),
            ("010.0.0.1", not("010.0.0.1")),
            ("/8", not("/8")),
            ("fe80::1%eth0", not("fe80::1%eth0")),
            ("[::1]", not("[::1]")),
            ("10.0.0.0/33", prefix("10.0.0.0/33", 32)),
            ("10.0.0.0/", prefix("10.0.0.0/", 32)),
            ("10.0.0.0/x", prefix("10.0.0.0/x", 32)),
            ("10.0.0.0/+8", prefix("10.0.0.0/+8", 32)),
            ("10.0.0.0/8/8", prefix("10.0.0.0/8/8", 32)),
            ("10.0.0.0/256", prefix("10.0.0.0/256", 32)),
            ("::/129", prefix("::/129", 128)),
            ("1.2.3.4/8", host_bits("1.2.3.4/8", "1.0.0.0/8")),
            ("10.0.0.1/31", host_bits("10.0.0.1/31", "10.0.0.0/31")),
            ("2001:db8::1/32", host_bits("2001:db8::1/32", "2001:db8::/32")),
        ];
        for (input, expected) in cases {
            let err = parse_ip_range(input).expect_err(input);
            assert!(
                err.to_string().contains(&format!("`{input}`")),
                "{err} names {input}"
            );
            assert_eq!(err, expected, "{input}");
        }
        assert_eq!(
            parse_ip_range("1.2.3.4/8").unwrap_err().to_string(),
            "`1.2.3.4/8` has bits set after the prefix length; the range is `1.0.0.0/8`"
        );
    }

    // ---- no_proxy parsing ----------------------------------------------------------------------

    #[test]
    fn no_proxy_entries_parse_and_display() {
        let host = |name: &str, port| NoProxyEntry::Host {
            name: name.into(),
            port,
        };
        let ip_ = |n: &str, port| NoProxyEntry::Ip { net: net(n), port };
        let cases = [
            ("*", NoProxyEntry::All, "*"),
            (" * ", NoProxyEntry::All, "*"),
            ("a.com", host("a.com", None), "a.com"),
            (".a.com", host("a.com", None), "a.com"),
            ("*.a.com", host("a.com", None), "a.com"),
            ("A.Com.", host("a.com", None), "a.com"),
            (".a.com.", host("a.com", None), "a.com"),
            ("localhost", host("localhost", None), "localhost"),
            (
                "my_host.internal",
                host("my_host.internal", None),
                "my_host.internal",
            ),
            (
                "xn--bcher-kva.example",
                host("xn--bcher-kva.example", None),
                "xn--bcher-kva.example",
            ),
            ("a.com:8448", host("a.com", Some(8448)), "a.com:8448"),
            (".a.com:443", host("a.com", Some(443)), "a.com:443"),
            ("10.0.0.1", ip_("10.0.0.1/32", None), "10.0.0.1"),
            ("10.0.0.1/32", ip_("10.0.0.1/32", None), "10.0.0.1"),
            ("10.0.0.1:443", ip_("10.0.0.1/32", Some(443)), "10.0.0.1:443"),
            ("172.16.0.0/12", ip_("172.16.0.0/12", None), "172.16.0.0/12"),
            ("10.0.0.0/8:443", ip_("10.0.0.0/8", Some(443)), "10.0.0.0/8:443"),
            ("::1", ip_("::1/128", None), "::1"),
            ("[::1]", ip_("::1/128", None), "::1"),
            ("[::1]:8008", ip_("::1/128", Some(8008)), "[::1]:8008"),
            ("2001:db8::/32", ip_("2001:db8::/32", None), "2001:db8::/32"),
            ("[2001:db8::/32]", ip_("2001:db8::/32", None), "2001:db8::/32"),
            (
                "[2001:db8::1]:8448",
                ip_("2001:db8::1/128", Some(8448)),
                "[2001:db8::1]:8448",
            ),
            (
                "[2001:db8::/32]:443",
                ip_("2001:db8::/32", Some(443)),
                "[2001:db8::/32]:443",
            ),
            // Without brackets, a trailing group is part of the address, not a port.
            (
                "2001:db8::1:8448",
                ip_("2001:db8::1:8448/128", None),
                "2001:db8::1:8448",
            ),
            ("a.com:65535", host("a.com", Some(65535)), "a.com:65535"),
        ];
        for (input, entry, shown) in cases {
            let parsed = no_proxy(&[input]);
            assert_eq!(parsed.entries(), std::slice::from_ref(&entry), "{input}");
            assert_eq!(entry.to_string(), shown, "{input}");
            assert_eq!(no_proxy(&[shown]).entries(), [entry], "{shown} parses back");
        }
    }

    #[test]
    fn no_proxy_errors() {
        /// What is wrong with the entry, which every error names in full.
        enum Want {
            Host(&'static str),
            Port(&'static str),
            Range(PolicyError),
        }
        use Want::{Host, Port, Range};
        let not = |v: &str| PolicyError::NotIpRange { value: v.into() };
        let host_bits = |v: &str, n: &str| PolicyError::HostBitsSet {
            value: v.into(),
            network: net(n),
        };
        let star = "`*` is only allowed alone or as a leading `*.`";
        let chars = "contains a character that cannot be in a host name \
                     (an internationalised name must be written in its xn-- form)";
        let numeric = "is not a valid IP address, and a host name cannot end in a numeric label";
        let empty_label = "has an empty label (`..`)";
        let brackets = "brackets are only for IPv6 addresses";
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}.com", vec!["a".repeat(60); 5].join("."));
        #[rustfmt::skip]
        let cases = [
            ("10.0.0.0/33",     Range(PolicyError::BadPrefix { value: "10.0.0.0/33".into(), max: 32 })),
            ("[::/200]:443",    Range(PolicyError::BadPrefix { value: "::/200".into(), max: 128 })),
            ("1.2.3.4/8",       Range(host_bits("1.2.3.4/8", "1.0.0.0/8"))),
            ("[2001:db8::1/32]:443", Range(host_bits("2001:db8::1/32", "2001:db8::/32"))),
            ("fe80::1%eth0",    Range(not("fe80::1%eth0"))),
            ("[not:ip]",        Range(not("not:ip"))),
            ("a.com/24",        Range(not("a.com/24"))),
            ("a.com/",          Range(not("a.com/"))),
            ("a.com:0",         Port("0")),
            ("a.com:65536",     Port("65536")),
            ("a.com:",          Port("")),
            ("a.com:https",     Port("https")),
            ("a.com:+443",      Port("+443")),
            ("a.com: 443",      Port(" 443")),
            ("10.0.0.1:99999",  Port("99999")),
            ("[::1]:x",         Port("x")),
            ("[::1]:",          Port("")),
            ("a.*.com",         Host(star)),
            ("*a.com",          Host(star)),
            ("a.com*",          Host(star)),
            ("**",              Host(star)),
            ("*.*.a.com",       Host(star)),
            ("*:443",           Host("`*` means every destination and cannot take a port")),
            ("a b.com",         Host("contains whitespace; entries are separated by commas")),
            ("a.com,b.com",     Host("contains a comma; give one entry per list item")),
            ("bücher.example",  Host(chars)),
            ("a!.com",          Host(chars)),
            ("a.com\\",         Host(chars)),
            ("a..com",          Host(empty_label)),
            ("..a.com",         Host(empty_label)),
            ("a.com..",         Host(empty_label)),
            (".",               Host("has no host name")),
            ("*.",              Host("has no host name")),
            (":443",            Host("has no host name")),
            (&long_label,       Host("has a label longer than the 63 characters a host name label can have")),
            (&long_name,        Host("is longer than the 253 characters a host name can have")),
            ("1.2.3.400",       Host(numeric)),
            ("10.0.0",          Host(numeric)),
            ("10.0.0.1.",       Host(numeric)),
            ("[1.2.3.4]",       Host(brackets)),
            ("[a.com]:443",     Host(brackets)),
            ("[::1",            Host("has no closing `]`")),
            ("::1]",            Host("has a `]` without an opening `[`")),
            ("[::1]8448",       Host("has text after `]`; write `[address]:port`")),
            ("http://a.com",    Host("is a URL; give a host name, address or range")),
        ];
        for (input, want) in cases {
            let entry = input.to_owned();
            let expected = match want {
                Host(reason) => PolicyError::BadNoProxyHost { entry, reason },
                Port(port) => PolicyError::BadNoProxyPort {
                    entry,
                    port: port.into(),
                },
                Range(error) => PolicyError::BadNoProxyRange {
                    entry,
                    error: Box::new(error),
                },
            };
            let err = NoProxy::parse_list([input]).expect_err(input);
            assert!(
                err.to_string()
                    .starts_with(&format!("no_proxy entry `{input}`: ")),
                "{err}"
            );
            assert_eq!(err, expected, "{input}");
            // The environment form reports the same, for entries without a comma.
            if !input.contains(',') {
                assert_eq!(
                    NoProxy::parse_env(&format!("ok.example, {input} ,")),
                    Err(expected),
                    "{input}"
                );
            }
        }
        assert_eq!(NoProxy::parse_list([""]), Err(PolicyError::EmptyNoProxyEntry));
        assert_eq!(
            NoProxy::parse_list(["a.com", "  "]),
            Err(PolicyError::EmptyNoProxyEntry)
        );
        assert_eq!(
            NoProxy::parse_list(["a.com", "10.0.0.0/33"])
                .unwrap_err()
                .to_string(),
            "no_proxy entry `10.0.0.0/33`: the prefix length must be a number from 0 to 32"
        );
    }

    #[test]
    fn parse_env_splits_on_commas() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            (" ", &[]),
            (",", &[]),
            (" , ,, ", &[]),
            ("a.com", &["a.com"]),
            ("a.com,b.com", &["a.com", "b.com"]),
            ("a.com,,b.com", &["a.com", "b.com"]),
            (" a.com , b.com ,", &["a.com", "b.com"]),
            (
                "\ta.com,\n10.0.0.0/8 , [::1]:8448,*",
                &["a.com", "10.0.0.0/8", "[::1]:8448", "*"],
            ),
            ("localhost,127.0.0.1,::1", &["localhost", "127.0.0.1", "::1"]),
        ];
        for &(value, items) in cases {
            assert_eq!(NoProxy::parse_env(value), Ok(no_proxy(items)), "{value:?}");
        }
        assert_eq!(
            NoProxy::parse_env("a.com b.com"),
            Err(PolicyError::BadNoProxyHost {
                entry: "a.com b.com".into(),
                reason: "contains whitespace; entries are separated by commas"
            })
        );
        assert_eq!(
            NoProxy::parse_env("a.com, 10.0.0.0/33"),
            Err(PolicyError::BadNoProxyRange {
                entry: "10.0.0.0/33".into(),
                error: Box::new(PolicyError::BadPrefix {
                    value: "10.0.0.0/33".into(),
                    max: 32
                }),
            })
        );
    }

    #[test]
    fn extend_appends_in_order() {
        let mut list = no_proxy(&["a.com", "10.0.0.0/8"]);
        list.extend(NoProxy::parse_env("b.com,a.com").unwrap());
        assert_eq!(list, no_proxy(&["a.com", "10.0.0.0/8", "b.com", "a.com"]));
        list.extend(NoProxy::default());
        assert_eq!(list.entries().len(), 4);
    }

    // ---- no_proxy matching ---------------------------------------------------------------------

    #[test]
    fn no_proxy_host_matching() {
        #[rustfmt::skip]
        let cases: &[(&str, Option<&str>, u16, bool)] = &[
            // entry        target host          port   matches
            ("a.com",       Some("a.com"),       443,   true),
            ("a.com",       Some("b.a.com"),     443,   true),
            ("a.com",       Some("c.b.a.com"),   443,   true),
            ("a.com",       Some("xa.com"),      443,   false),
            ("a.com",       Some("a.com.evil"),  443,   false),
            ("a.com",       Some("a.co"),        443,   false),
            ("a.com",       Some("com"),         443,   false),
            ("a.com",       Some(".a.com"),      443,   true),
            ("a.com",       Some(""),            443,   false),
            ("a.com",       None,                443,   false),
            (".a.com",      Some("a.com"),       443,   true),
            (".a.com",      Some("b.a.com"),     443,   true),
            (".a.com",      Some("xa.com"),      443,   false),
            ("*.a.com",     Some("a.com"),       443,   true),
            ("*.a.com",     Some("b.a.com"),     443,   true),
            ("*.a.com",     Some("xa.com"),      443,   false),
            ("A.COM",       Some("a.com"),       443,   true),
            ("a.com",       Some("B.A.Com"),     443,   true),
            ("a.com.",      Some("a.com"),       443,   true),
            ("a.com",       Some("a.com."),      443,   true),
            (".a.com.",     Some("b.a.com."),    443,   true),
            ("a.com",       Some("a.com.."),     443,   false),
            ("a.com:8448",  Some("a.com"),       8448,  true),
            ("a.com:8448",  Some("b.a.com"),     8448,  true),
            ("a.com:8448",  Some("a.com"),       443,   false),
            ("a.com:8448",  None,                8448,  false),
            ("localhost",   Some("localhost"),   80,    true),
            ("localhost",   Some("localhost.localdomain"), 80, false),
            ("*",           Some("anything.example"), 1, true),
            ("*",           None,                65535, true),
        ];
        for &(entry, host, port, expected) in cases {
            let list = no_proxy(&[entry]);
            let got = list.matches(ip("93.184.216.34"), port, host);
            assert_eq!(got.is_some(), expected, "{entry} vs {host:?}:{port}");
        }
    }

    #[test]
    fn no_proxy_ip_matching() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, u16, Option<&str>, bool)] = &[
            // entry                 target ip             port  host            matches
            ("10.0.0.1",             "10.0.0.1",           443,  None,           true),
            ("10.0.0.1",             "10.0.0.2",           443,  None,           false),
            ("10.0.0.1",             "10.0.0.1",           443,  Some("a.com"),  true),
            ("10.0.0.1",             "8.8.8.8",            443,  Some("10.0.0.1"), false),
            ("10.0.0.1",             "::ffff:10.0.0.1",    443,  None,           true),
            ("172.16.0.0/12",        "172.20.20.22",       443,  None,           true),
            ("172.16.0.0/12",        "172.31.255.255",     443,  None,           true),
            ("172.16.0.0/12",        "172.32.0.0",         443,  None,           false),
            ("172.16.0.0/12",        "::ffff:172.20.20.22", 443, None,           true),
            ("0.0.0.0/0",            "203.0.113.1",        443,  None,           true),
            ("0.0.0.0/0",            "2001:db8::1",        443,  None,           false),
            ("::/0",                 "2001:db8::1",        443,  None,           true),
            ("::/0",                 "::ffff:8.8.8.8",     443,  None,           false),
            ("::1",                  "::1",                443,  None,           true),
            ("[::1]",                "::1",                443,  None,           true),
            ("::1",                  "127.0.0.1",          443,  None,           false),
            ("2001:db8::/32",        "2001:db8:1::5",      443,  None,           true),
            ("2001:db8::/32",        "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", 443, None, true),
            ("2001:db8::/32",        "2001:db9::",         443,  None,           false),
            ("2001:db8::/32",        "2001:db7:ffff::",    443,  None,           false),
            ("fd00::/8",             "fd12::1",            443,  Some("x.lan"),  true),
            ("10.0.0.1:443",         "10.0.0.1",           443,  None,           true),
            ("10.0.0.1:443",         "10.0.0.1",           80,   None,           false),
            ("10.0.0.0/8:443",       "10.9.9.9",           443,  None,           true),
            ("10.0.0.0/8:443",       "10.9.9.9",           8448, None,           false),
            ("[2001:db8::1]:8448",   "2001:db8::1",        8448, None,           true),
            ("[2001:db8::1]:8448",   "2001:db8::1",        443,  None,           false),
            ("[2001:db8::/32]:443",  "2001:db8::9",        443,  None,           true),
            // A host name entry never matches a target known only by IP.
            ("a.com",                "10.0.0.1",           443,  None,           false),
        ];
        for &(entry, addr, port, host, expected) in cases {
            let got = no_proxy(&[entry]).matches(ip(addr), port, host).is_some();
            assert_eq!(got, expected, "{entry} vs {addr}:{port} {host:?}");
        }
    }

    #[test]
    fn no_proxy_returns_first_matching_entry() {
        let list = no_proxy(&["b.com", "10.0.0.0/8", "a.com:443", "a.com", "*"]);
        let cases = [
            ("10.1.1.1", 443, Some("a.com"), "10.0.0.0/8"),
            ("8.8.8.8", 443, Some("x.a.com"), "a.com:443"),
            ("8.8.8.8", 80, Some("x.a.com"), "a.com"),
            ("8.8.8.8", 80, Some("b.com"), "b.com"),
            ("8.8.8.8", 80, None, "*"),
        ];
        for (addr, port, host, expected) in cases {
            let entry = list.matches(ip(addr), port, host).expect("a match");
            assert_eq!(entry.to_string(), expected, "{addr}:{port} {host:?}");
        }
        assert_eq!(
            NoProxy::default().matches(ip("10.0.0.1"), 443, Some("a.com")),
            None
        );
    }

    #[test]
    fn hand_built_host_entries_are_normalised_when_matching() {
        let list = NoProxy {
            entries: vec![NoProxyEntry::Host {
                name: ".A.com.".into(),
                port: None,
            }],
        };
        assert!(list.matches(ip("8.8.8.8"), 443, Some("x.a.com")).is_some());
        assert!(list.matches(ip("8.8.8.8"), 443, Some("xa.com")).is_none());
    }

    // ---- decide / denied -----------------------------------------------------------------------

    /// Target IP, port, host, whether a proxy is configured; expected route and rule.
    type DecideCase<'a> = (&'a str, u16, Option<&'a str>, bool, Disposition, &'a str);

    #[test]
    fn decide() {
        let policy = Policy {
            whitelist: nets(&["10.1.0.0/16", "1.1.1.0/24"]),
            no_proxy: no_proxy(&[
                "a.com",
                "localhost",
                "10.1.2.3",
                "10.2.0.0/16",
                "8.8.4.4:443",
                "[2001:db8::1]",
            ]),
            ..Policy::default()
        };
        use Disposition::{Deny, Direct, Proxy};
        #[rustfmt::skip]
        let cases: &[DecideCase] = &[
            // target ip        port  host              proxy  route    rule
            // Blacklisted.
            ("10.0.0.1",        443,  None,             true,  Deny,    "ip_range_blacklist 10.0.0.0/8"),
            ("10.0.0.1",        443,  None,             false, Deny,    "ip_range_blacklist 10.0.0.0/8"),
            ("::ffff:10.0.0.1", 443,  None,             true,  Deny,    "ip_range_blacklist 10.0.0.0/8"),
            ("::1",             8008, None,             true,  Deny,    "ip_range_blacklist ::1/128"),
            // The blacklist wins over no_proxy, by IP and by name.
            ("10.2.0.5",        443,  None,             true,  Deny,    "ip_range_blacklist 10.0.0.0/8"),
            ("127.0.0.1",       8008, Some("localhost"), true, Deny,     "ip_range_blacklist 127.0.0.0/8"),
            ("2001:db8::1",     443,  None,             true,  Deny,    "ip_range_blacklist 2001:db8::/32"),
            ("192.168.1.1",     443,  Some("x.a.com"),  false, Deny,    "ip_range_blacklist 192.168.0.0/16"),
            // Whitelisted out of the blacklist, then no_proxy and proxy apply.
            ("10.1.0.5",        443,  None,             true,  Proxy,
                "ip_range_whitelist 10.1.0.0/16, proxy"),
            ("::ffff:10.1.0.5", 443,  None,             true,  Proxy,
                "ip_range_whitelist 10.1.0.0/16, proxy"),
            ("10.1.0.5",        443,  None,             false, Direct,
                "ip_range_whitelist 10.1.0.0/16, no proxy for protocol"),
            ("10.1.2.3",        443,  None,             true,  Direct,
                "ip_range_whitelist 10.1.0.0/16, no_proxy 10.1.2.3"),
            ("10.1.0.5",        443,  Some("x.a.com"),  true,  Direct,
                "ip_range_whitelist 10.1.0.0/16, no_proxy a.com"),
            // Whitelisted but not blacklisted: the whitelist decided nothing.
            ("1.1.1.1",         443,  None,             true,  Proxy,   "proxy"),
            // no_proxy.
            ("8.8.8.8",         443,  Some("a.com"),    true,  Direct,  "no_proxy a.com"),
            ("8.8.8.8",         443,  Some("A.COM."),   true,  Direct,  "no_proxy a.com"),
            ("8.8.4.4",         443,  None,             true,  Direct,  "no_proxy 8.8.4.4:443"),
            ("8.8.4.4",         80,   None,             true,  Proxy,   "proxy"),
            // Not no_proxy'd: proxy if one is set for the protocol, else direct.
            ("8.8.8.8",         443,  Some("xa.com"),   true,  Proxy,   "proxy"),
            ("8.8.8.8",         443,  Some("xa.com"),   false, Direct,  "no proxy for protocol"),
            ("2606:4700::1111", 443,  None,             true,  Proxy,   "proxy"),
            ("::ffff:8.8.8.8",  443,  None,             false, Direct,  "no proxy for protocol"),
        ];
        for &(addr, port, host, proxy, disposition, rule) in cases {
            let ruling = policy.decide(ip(addr), port, host, proxy);
            assert_eq!(
                (ruling.disposition, ruling.rule.to_string()),
                (disposition, rule.to_owned()),
                "{addr}:{port} {host:?} proxy={proxy}"
            );
        }
    }

    #[test]
    fn decide_edge_policies() {
        let everything = Policy {
            no_proxy: no_proxy(&["*"]),
            ..Policy::default()
        };
        assert_eq!(
            everything.decide(ip("8.8.8.8"), 443, None, true).rule.to_string(),
            "no_proxy *"
        );
        assert_eq!(
            everything.decide(ip("8.8.8.8"), 443, None, true).disposition,
            Disposition::Direct
        );
        assert_eq!(
            everything.decide(ip("10.0.0.1"), 443, None, true).disposition,
            Disposition::Deny
        );

        let open = Policy {
            blacklist: Vec::new(),
            ..Policy::default()
        };
        assert_eq!(
            open.decide(ip("10.0.0.1"), 443, None, true).disposition,
            Disposition::Proxy
        );
        assert_eq!(open.denied(ip("127.0.0.1")), None);

        // The most specific range is named, whatever the order.
        let nested = Policy {
            whitelist: nets(&["10.0.0.0/8", "10.1.0.0/16"]),
            blacklist: nets(&["10.0.0.0/8", "10.1.2.0/24"]),
            no_proxy: NoProxy::default(),
        };
        assert_eq!(
            nested.decide(ip("10.1.2.3"), 443, None, true).rule.to_string(),
            "ip_range_whitelist 10.1.0.0/16, proxy"
        );
        let narrow = Policy {
            whitelist: nets(&["10.1.2.3/32"]),
            ..nested.clone()
        };
        assert_eq!(
            narrow.denied(ip("10.1.2.4")).map(|r| r.to_string()),
            Some("ip_range_blacklist 10.1.2.0/24".into())
        );
        assert_eq!(narrow.denied(ip("10.1.2.3")), None);
    }

    #[test]
    fn denied() {
        let policy = Policy {
            whitelist: nets(&["10.1.0.0/16", "fd00::/8"]),
            ..Policy::default()
        };
        let cases: &[(&str, Option<&str>)] = &[
            ("10.0.0.1", Some("10.0.0.0/8")),
            ("::ffff:10.0.0.1", Some("10.0.0.0/8")),
            ("10.1.0.1", None),
            ("::ffff:10.1.0.1", None),
            ("fd00::1", None),
            ("fc00::1", Some("fc00::/7")),
            ("8.8.8.8", None),
            ("::", Some("::/128")),
            ("0.0.0.0", Some("0.0.0.0/32")),
        ];
        for &(addr, range) in cases {
            assert_eq!(
                policy.denied(ip(addr)).map(|r| r.to_string()),
                range.map(|r| format!("ip_range_blacklist {r}")),
                "{addr}"
            );
        }
    }

    // ---- kernel maps ---------------------------------------------------------------------------

    #[test]
    fn kernel_deny_nets_example() {
        let policy = Policy {
            whitelist: nets(&["10.1.0.0/16"]),
            blacklist: nets(&["10.0.0.0/8"]),
            no_proxy: NoProxy::default(),
        };
        let expected = nets(&[
            "10.0.0.0/16",
            "10.2.0.0/15",
            "10.4.0.0/14",
            "10.8.0.0/13",
            "10.16.0.0/12",
            "10.32.0.0/11",
            "10.64.0.0/10",
            "10.128.0.0/9",
        ]);
        assert_eq!(policy.kernel_deny_nets(), expected);

        let cases: &[(&[&str], &[&str], &[&str])] = &[
            // blacklist, whitelist, difference
            (&["10.0.0.0/8"], &[], &["10.0.0.0/8"]),
            (&["10.0.0.0/8"], &["10.0.0.0/8"], &[]),
            (
                &["10.0.0.0/8", "192.168.0.0/16"],
                &["10.0.0.0/7"],
                &["192.168.0.0/16"],
            ),
            (&["10.0.0.0/8"], &["11.0.0.0/8", "::/0"], &["10.0.0.0/8"]),
            (&["10.0.0.0/31"], &["10.0.0.1/32"], &["10.0.0.0/32"]),
            (&["10.0.0.0/8", "10.0.0.0/9"], &["10.128.0.0/9"], &["10.0.0.0/9"]),
            // Two holes in one range.
            (
                &["10.0.0.0/30"],
                &["10.0.0.0/32", "10.0.0.3/32"],
                &["10.0.0.1/32", "10.0.0.2/32"],
            ),
        ];
        for &(black, white, expected) in cases {
            let policy = Policy {
                whitelist: nets(white),
                blacklist: nets(black),
                no_proxy: NoProxy::default(),
            };
            assert_eq!(policy.kernel_deny_nets(), nets(expected), "{black:?} - {white:?}");
        }

        // Overlapping blacklist ranges (::/128 and ::1/128 lie in ::/96) are merged first; a /128
        // hole in a /96 leaves one piece per level, smallest first.
        let policy = Policy {
            whitelist: nets(&["::1/128"]),
            blacklist: nets(&["::/96", "::/128", "::1/128"]),
            no_proxy: NoProxy::default(),
        };
        let got = policy.kernel_deny_nets();
        assert_eq!(got.len(), 32);
        assert_eq!(got[..3], nets(&["::/128", "::2/127", "::4/126"]));
        assert_eq!(got[31], net("::8000:0/97"));
    }

    /// `kernel_deny_nets` holds an IP exactly when `denied` does, and its ranges are disjoint.
    fn check_kernel_deny(policy: &Policy, samples: &[IpAddr]) {
        let deny = policy.kernel_deny_nets();
        for (i, a) in deny.iter().enumerate() {
            assert_eq!(a.trunc(), *a, "{a} is a network");
            for b in &deny[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} and {b} overlap");
            }
        }
        let bypass = policy.kernel_bypass_nets();
        let no_proxy_nets = policy.no_proxy.kernel_bypass_nets();
        for &addr in samples {
            let in_deny = deny.iter().any(|n| n.contains(&addr));
            // The bypass set is no_proxy's ranges minus the deny set: disjoint from it.
            let in_bypass = bypass.iter().any(|n| n.contains(&addr));
            let in_no_proxy = no_proxy_nets.iter().any(|n| n.contains(&addr));
            assert_eq!(in_bypass, in_no_proxy && !in_deny, "{addr}: bypass={in_bypass}");
            let in_black = policy.blacklist.iter().any(|n| n.contains(&addr));
            let in_white = policy.whitelist.iter().any(|n| n.contains(&addr));
            assert_eq!(
                in_deny,
                in_black && !in_white,
                "{addr}: deny={in_deny} black={in_black} white={in_white}"
            );
            // For addresses that need no normalisation, it agrees with `denied` too.
            if addr.to_canonical() == addr {
                assert_eq!(in_deny, policy.denied(addr).is_some(), "{addr}");
            }
        }
    }

    /// Each range's ends, the addresses either side, and random ones inside; plus random addresses.
    fn samples(ranges: &[IpNet], rng: &mut Rng) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for &n in ranges {
            for edge in [n.network(), n.broadcast()] {
                out.extend(
                    [offset(edge, -1), Some(edge), offset(edge, 1)]
                        .into_iter()
                        .flatten(),
                );
            }
            for _ in 0..8 {
                out.push(rng.addr_in(n));
            }
        }
        for _ in 0..200 {
            out.push(IpAddr::V4((rng.next() as u32).into()));
            out.push(IpAddr::V6(rng.next_u128().into()));
        }
        out
    }

    #[test]
    fn kernel_deny_nets_is_the_set_difference() {
        let policy = Policy {
            whitelist: nets(&[
                "10.1.0.0/16",
                "10.1.2.0/24",
                "192.168.1.128/25",
                "172.16.0.0/12",
                "8.8.8.0/24",
                "0.0.0.0/32",
                "127.0.0.1/32",
                "2001:db8:1::/48",
                "::/128",
                "64:ff9b::/96",
                "fe80::/64",
                "::ffff:10.0.0.0/104",
            ]),
            ..Policy::default()
        };
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let ranges: Vec<IpNet> = policy
            .blacklist
            .iter()
            .chain(&policy.whitelist)
            .copied()
            .collect();
        check_kernel_deny(&policy, &samples(&ranges, &mut rng));
        check_kernel_deny(&Policy::default(), &samples(&ranges, &mut rng));
    }

    #[test]
    fn kernel_deny_nets_random_policies() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let base = net("10.0.0.0/8");
        let random_nets = |rng: &mut Rng, count: usize| -> Vec<IpNet> {
            (0..count)
                .map(|_| {
                    let len = 8 + (rng.next() % 25) as u8;
                    IpNet::new(rng.addr_in(base), len).unwrap().trunc()
                })
                .collect()
        };
        for _ in 0..200 {
            let black_count = 1 + (rng.next() % 6) as usize;
            let white_count = (rng.next() % 6) as usize;
            let no_proxy_count = (rng.next() % 4) as usize;
            let bypass: Vec<String> = random_nets(&mut rng, no_proxy_count)
                .iter()
                .map(ToString::to_string)
                .collect();
            let policy = Policy {
                blacklist: random_nets(&mut rng, black_count),
                whitelist: random_nets(&mut rng, white_count),
                no_proxy: NoProxy::parse_list(bypass.iter().map(String::as_str)).unwrap(),
            };
            let ranges: Vec<IpNet> = policy
                .blacklist
                .iter()
                .chain(&policy.whitelist)
                .chain(&policy.no_proxy.kernel_bypass_nets())
                .copied()
                .collect();
            let mut points = samples(&ranges, &mut rng);
            points.extend((0..100).map(|_| rng.addr_in(base)));
            check_kernel_deny(&policy, &points);
        }
    }

    #[test]
    fn kernel_bypass_nets() {
        let list = no_proxy(&[
            "a.com",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "192.168.1.1:443",
            "::1",
            "[2001:db8::/32]:443",
            "172.16.0.0/13",
            "172.24.0.0/13",
        ]);
        let mut got = list.kernel_bypass_nets();
        got.sort();
        assert_eq!(got, nets(&["10.0.0.0/8", "172.16.0.0/12", "::1/128"]));

        let all = no_proxy(&["a.com", "*", "10.0.0.0/8"]);
        assert_eq!(all.kernel_bypass_nets(), nets(&["0.0.0.0/0", "::/0"]));
        assert!(
            no_proxy(&["a.com", "10.0.0.1:443"])
                .kernel_bypass_nets()
                .is_empty()
        );
        assert!(NoProxy::default().kernel_bypass_nets().is_empty());

        // The policy's set leaves out what it denies: 10/8 but for the whitelisted 10.1/16,
        // 172.16/12 and ::1 are in the default blacklist.
        let policy = Policy {
            no_proxy: list.clone(),
            whitelist: nets(&["10.1.0.0/16"]),
            ..Policy::default()
        };
        assert_eq!(policy.kernel_bypass_nets(), nets(&["10.1.0.0/16"]));
        let open = Policy {
            no_proxy: list,
            blacklist: Vec::new(),
            ..Policy::default()
        };
        let mut got = open.kernel_bypass_nets();
        got.sort();
        assert_eq!(got, nets(&["10.0.0.0/8", "172.16.0.0/12", "::1/128"]));
    }
}
