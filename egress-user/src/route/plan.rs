//! The routing plan: what the agent does with a connection the kernel redirected to it, given
//! where it was going and what its first bytes said. Deny, go direct, CONNECT through
//! https_proxy, or forward plain HTTP through http_proxy, and the rule that decided.
//!
//! One pure function, used by the agent for every connection, by `egress explain` and by
//! `egress doctor`, so that what admins are told is what the agent does.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::{
    hostport,
    route::policy::{Disposition, Policy, Rule, RuleKind},
};

const DNS_PORT: u16 = 53;

/// What a connection's first bytes said (see `proxy::sniff`, which reads them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniffed {
    /// A TLS ClientHello; `sni` is the validated server_name (host_name type), lowercased, if present.
    Tls { sni: Option<String> },
    /// An HTTP/1.x request head; `host` is the validated Host header (hostname or IP, lowercased, IPv6
    /// without brackets), `port` the port in it if any.
    Http { host: Option<String>, port: Option<u16> },
    /// Neither: some other protocol (or garbage).
    Other,
}

/// What to do with a connection whose first bytes are neither a TLS ClientHello nor an HTTP/1
/// request within the peek window (e.g. protocols where the server speaks first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DefaultRoute {
    /// CONNECT through https_proxy (by IP), like TLS.
    Proxy,
    /// Connect directly (still blacklist-checked).
    Direct,
    /// Reset the connection.
    Deny,
}

impl DefaultRoute {
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultRoute::Proxy => "proxy",
            DefaultRoute::Direct => "direct",
            DefaultRoute::Deny => "deny",
        }
    }
}

/// What the application's own DNS answers said about the client's name (SNI/Host).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientName {
    /// Nothing recorded about it (resolved from /etc/hosts, a cache, or not by DNS we saw).
    #[default]
    Unrecorded,
    /// It resolved to the dialled address.
    Resolved,
    /// It resolved, but not to the dialled address, and delegates nowhere.
    Elsewhere,
    /// It delegates by SRV (`_matrix-fed._tcp.NAME`), and the dialled address is not one of its
    /// own: SNI names the server, the address is an SRV target's.
    Delegates,
}

/// What the record of the application's DNS answers knows about a connection (see `dns`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Resolved {
    pub client: ClientName,
    /// The name the application last resolved to the dialled address.
    pub dialled_name: Option<String>,
    /// The dialled address is a synthetic one (synthetic DNS): made up, reachable only through
    /// the proxy, by name.
    #[serde(default)]
    pub synthetic: bool,
    /// When the client's name delegates: its SRV targets on the dialled port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub srv_targets: Vec<String>,
    /// `srv_targets` were narrowed by the agent's own lookup (in the client's view: hosts file,
    /// nscd, systemd-resolved) to those that resolve to the dialled address.
    #[serde(default)]
    pub looked_up: bool,
    /// The dialled address is a resolver the application sent DNS queries to (over UDP, lately).
    #[serde(default)]
    pub resolver: bool,
}

impl Resolved {
    /// Whether the agent should look the SRV targets up itself: the client's name delegates, the
    /// record has no name for the dialled address among them, and a target could be it.
    pub fn needs_lookup(&self) -> bool {
        self.client == ClientName::Delegates
            && !self.looked_up
            && !self.srv_targets.is_empty()
            && !self
                .dialled_name
                .as_ref()
                .is_some_and(|dialled| self.srv_targets.contains(dialled))
    }
}

/// Which name a proxied connection is CONNECTed (or forwarded) by, for the decision log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetName {
    /// The client's SNI/Host, which the application resolved to the dialled address.
    Client,
    /// The client's SNI/Host, about which the record knows nothing.
    ClientUnrecorded,
    /// A plain-HTTP Host that resolved to other addresses: kept, for the origin's virtual host.
    ClientElsewhere,
    /// The name the application resolved to the dialled address (the client named none, or
    /// one that resolved elsewhere).
    Resolved,
    /// The one SRV target of the client's name on the dialled port (its address was resolved
    /// where egress cannot see: hosts file, nscd, systemd-resolved).
    SrvTarget,
    /// The one SRV target of the client's name that the agent's own lookup found at the dialled
    /// address.
    SrvLookup,
    /// The address: no name fits it, or `connect_by_ip`.
    Address,
}

impl TargetName {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetName::Client => "client",
            TargetName::ClientUnrecorded => "client_unrecorded",
            TargetName::ClientElsewhere => "client_elsewhere",
            TargetName::Resolved => "dns",
            TargetName::SrvTarget => "srv_target",
            TargetName::SrvLookup => "srv_lookup",
            TargetName::Address => "address",
        }
    }
}

/// The settings a plan follows (a view of the configuration).
#[derive(Clone, Copy, Debug)]
pub struct Rules<'a> {
    pub policy: &'a Policy,
    pub default_route: DefaultRoute,
    /// CONNECT (and forward) by the vetted address, never by the client's name.
    pub connect_by_ip: bool,
}

/// What the connection carries, as far as its first bytes tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tls,
    Http,
    Unknown,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tls => "tls",
            Protocol::Http => "http",
            Protocol::Unknown => "unknown",
        }
    }
}

impl Sniffed {
    pub fn protocol(&self) -> Protocol {
        match self {
            Sniffed::Tls { .. } => Protocol::Tls,
            Sniffed::Http { .. } => Protocol::Http,
            Sniffed::Other => Protocol::Unknown,
        }
    }

    /// The name the client asked for: TLS SNI or the HTTP Host (without port).
    pub fn name(&self) -> Option<&str> {
        match self {
            Sniffed::Tls { sni } => sni.as_deref(),
            Sniffed::Http { host, .. } => host.as_deref(),
            Sniffed::Other => None,
        }
    }
}

/// The upstream proxies a plan chooses from: the agent's proxy lists, or the configured URLs.
#[derive(Debug)]
pub struct Proxies<'a, P> {
    /// For TLS and (by default) unrecognised traffic.
    pub https: Option<&'a P>,
    /// For plain HTTP.
    pub http: Option<&'a P>,
    /// Per-destination choices (`proxy_routes`), the first that matches wins.
    pub routes: &'a [Route<P>],
}

/// A per-destination choice: where connections to `destinations` go, whatever their protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route<P> {
    /// Matched as no_proxy entries are: host names (with their subdomains), IPs, CIDR ranges,
    /// `host:port`.
    pub destinations: crate::route::policy::NoProxy,
    pub via: Via<P>,
    /// How the route was written (credentials hidden), for the rule in logs and `explain`.
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via<P> {
    Direct,
    Proxies(P),
}

impl<P> Clone for Proxies<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for Proxies<'_, P> {}

impl<'a, P> Proxies<'a, P> {
    /// Each configured proxy list (the same list may come twice).
    pub fn iter(self) -> impl Iterator<Item = &'a P> {
        self.https
            .into_iter()
            .chain(self.http)
            .chain(self.routes.iter().filter_map(|route| match &route.via {
                Via::Proxies(list) => Some(list),
                Via::Direct => None,
            }))
    }
}

/// What to do with the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<'a, P> {
    /// Reset the client; nothing is sent anywhere.
    Deny,
    /// Connect to the original destination from the agent (a marked socket).
    Direct { to: SocketAddr },
    /// `CONNECT target` through the proxy, then relay.
    Connect { proxy: &'a P, target: String },
    /// Forward each HTTP request through the proxy in absolute form, `http://authority/...`.
    Forward { proxy: &'a P, authority: String },
}

impl<'a, P> Action<'a, P> {
    /// The `route` of the decision log.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Deny => "deny",
            Action::Direct { .. } => "direct",
            Action::Connect { .. } => "proxy-connect",
            Action::Forward { .. } => "proxy-forward",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Plan<'a, P> {
    pub action: Action<'a, P>,
    pub rule: Rule,
    /// The name the policy decided with, and the connection goes by, and where it came from.
    pub name: Option<String>,
    pub named_by: TargetName,
}

/// The name a connection goes by: the client's, if the application's DNS did not say it stands
/// for another address; else the name that did resolve to the dialled address; else, when the
/// client's name delegates by SRV, its one target on the dialled port; else none. Never a name
/// the evidence says points elsewhere. A plain-HTTP request keeps its Host whatever DNS said: the
/// origin's virtual hosting and the proxy's absolute-form URL depend on it.
fn choose_name(
    protocol: Protocol,
    client: Option<&str>,
    resolved: &Resolved,
) -> (Option<String>, TargetName) {
    let dialled = || match &resolved.dialled_name {
        Some(name) => (Some(name.clone()), TargetName::Resolved),
        None => (None, TargetName::Address),
    };
    match (client, resolved.client) {
        // An address literal is what it says; the policy checks it like a dialled one.
        (Some(name), _) if name.parse::<std::net::IpAddr>().is_ok() => {
            (Some(name.to_owned()), TargetName::Client)
        }
        (Some(name), ClientName::Resolved) => (Some(name.to_owned()), TargetName::Client),
        (Some(name), ClientName::Unrecorded) => (Some(name.to_owned()), TargetName::ClientUnrecorded),
        (Some(name), ClientName::Elsewhere | ClientName::Delegates) if protocol == Protocol::Http => {
            (Some(name.to_owned()), TargetName::ClientElsewhere)
        }
        (Some(_), ClientName::Delegates) => {
            let targets = &resolved.srv_targets;
            match (&resolved.dialled_name, targets.as_slice()) {
                (Some(name), _) if targets.contains(name) => dialled(),
                (_, [only]) if resolved.looked_up => (Some(only.clone()), TargetName::SrvLookup),
                (_, [only]) => (Some(only.clone()), TargetName::SrvTarget),
                // Several targets on that port, or none: the address is the one sure thing.
                _ => (None, TargetName::Address),
            }
        }
        (Some(_), ClientName::Elsewhere) | (None, _) => dialled(),
    }
}

/// The plan for a redirected connection to `dst` whose first bytes were `sniffed`.
///
/// Which proxy: TLS → https_proxy; plain HTTP → http_proxy; anything else → `default_route`
/// (https_proxy, direct, or deny). The policy then decides with the address, port and name; a
/// proxied connection is CONNECTed (or forwarded) by that name unless `connect_by_ip`. The name
/// is the client's (SNI/Host) unless the application's own DNS answers (`resolved`) say it stands
/// for other addresses: then it is the name that resolved to the dialled one (an SRV target), or
/// none.
pub fn plan<'a, P>(
    rules: &Rules,
    proxies: Proxies<'a, P>,
    dst: SocketAddr,
    sniffed: &Sniffed,
    resolved: &Resolved,
) -> Plan<'a, P> {
    let protocol = sniffed.protocol();
    // DNS over TCP (a truncated answer's retry) to a resolver the application asked over UDP:
    // direct, like the UDP it follows (proxies refuse CONNECT to port 53), and read like it.
    // (The agent sets `resolver` only for a resolver the client is configured with that just
    // sent it a truncated answer.) `default_route = "deny"` still denies.
    if protocol == Protocol::Unknown
        && dst.port() == DNS_PORT
        && resolved.resolver
        && !resolved.synthetic
        && rules.default_route != DefaultRoute::Deny
    {
        let (action, rule) = match rules.policy.denied(dst.ip()) {
            Some(rule) => (Action::Deny, rule),
            None => (
                Action::Direct { to: dst },
                Rule::new(RuleKind::Resolver, dst.ip().to_string()),
            ),
        };
        return Plan {
            action,
            rule,
            name: None,
            named_by: TargetName::Address,
        };
    }
    let proxy = match (protocol, rules.default_route) {
        (Protocol::Http, _) => proxies.http,
        (Protocol::Tls, _) | (Protocol::Unknown, DefaultRoute::Proxy) => proxies.https,
        (Protocol::Unknown, DefaultRoute::Direct) => None,
        (Protocol::Unknown, DefaultRoute::Deny) => {
            return Plan {
                action: Action::Deny,
                rule: Rule::new(RuleKind::DefaultRoute, DefaultRoute::Deny.as_str()),
                name: None,
                named_by: TargetName::Address,
            };
        }
    };
    let (name, named_by) = choose_name(protocol, sniffed.name(), resolved);
    let deny = |rule| Plan {
        action: Action::Deny,
        rule,
        name: name.clone(),
        named_by,
    };
    // Both the client's name and the one the plan goes by must be fit to hand to a proxy.
    for claimed in [sniffed.name(), name.as_deref()].into_iter().flatten() {
        if let Some(refused) = refuse_name(rules.policy, claimed) {
            return deny(refused);
        }
    }
    // A target nothing confirmed names the CONNECT, but cannot claim a no_proxy name: direct
    // would send the dialled address past the proxy on a guess.
    let policy_name = name.as_deref().filter(|_| named_by != TargetName::SrvTarget);
    let mut ruling = rules
        .policy
        .decide(dst.ip(), dst.port(), policy_name, proxy.is_some());
    // A route for the destination, past the blacklist and no_proxy: its proxies, or direct.
    let mut proxy = proxy;
    let routed = ruling.disposition != Disposition::Deny && ruling.rule.kind != RuleKind::NoProxy;
    if let Some(route) = proxies.routes.iter().find(|route| {
        routed
            && route
                .destinations
                .matches(dst.ip(), dst.port(), policy_name)
                .is_some()
    }) {
        let rule = Rule {
            whitelisted: ruling.rule.whitelisted,
            ..Rule::new(RuleKind::ProxyRoute, route.text.clone())
        };
        (ruling.disposition, proxy) = match &route.via {
            Via::Direct => (Disposition::Direct, None),
            Via::Proxies(list) => (Disposition::Proxy, Some(list)),
        };
        ruling.rule = rule;
    }
    let action = match (ruling.disposition, proxy) {
        (Disposition::Deny, _) => Action::Deny,
        (Disposition::Direct, _) | (Disposition::Proxy, None) if resolved.synthetic => {
            return deny(Rule::new(RuleKind::Synthetic, dst.ip().to_string()));
        }
        (Disposition::Direct, _) | (Disposition::Proxy, None) => Action::Direct { to: dst },
        (Disposition::Proxy, Some(proxy)) => {
            let host = name.as_deref().filter(|_| !rules.connect_by_ip);
            match protocol {
                Protocol::Http => Action::Forward {
                    proxy,
                    authority: hostport::absolute_authority(host, dst),
                },
                Protocol::Tls | Protocol::Unknown => Action::Connect {
                    proxy,
                    target: hostport::connect_target(host, dst),
                },
            }
        }
    };
    let named_by = if rules.connect_by_ip {
        TargetName::Address
    } else {
        named_by
    };
    Plan {
        action,
        rule: ruling.rule,
        name,
        named_by,
    }
}

/// Names the client sent (SNI, Host) are claims, and the proxy would act on them: a name for the
/// local host (the proxy's own), or an address literal that the dialled address would not be
/// allowed to be, is refused as if it had been dialled.
fn refuse_name(policy: &Policy, name: &str) -> Option<Rule> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        let ip = ip.to_canonical();
        if ip.is_loopback() || ip.is_unspecified() {
            return Some(Rule::new(RuleKind::LocalName, name));
        }
        return policy.denied(ip).map(|rule| Rule {
            detail: format!("{} for the name {name}", rule.detail),
            ..rule
        });
    }
    // RFC 6761 reserves localhost and its subdomains; the others are in the /etc/hosts of
    // Debian (ip6-*) and RHEL (localhost4/6). The proxy host's own name cannot be known here:
    // the proxy should refuse it (squid: `http_access deny to_localhost`).
    let local = [
        "localhost",
        "localhost.localdomain",
        "ip6-localhost",
        "ip6-loopback",
        "localhost4",
        "localhost4.localdomain4",
        "localhost6",
        "localhost6.localdomain6",
    ];
    // Compared without allocating: this runs for every named connection.
    let bytes = name.as_bytes();
    let under_localhost = bytes.len() > 10 && bytes[bytes.len() - 10..].eq_ignore_ascii_case(b".localhost");
    (under_localhost || local.iter().any(|l| l.eq_ignore_ascii_case(name)))
        .then(|| Rule::new(RuleKind::LocalName, name.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Settings, proxy_url::ProxySetting};

    fn tls(sni: Option<&str>) -> Sniffed {
        Sniffed::Tls {
            sni: sni.map(str::to_owned),
        }
    }

    fn http(host: Option<&str>) -> Sniffed {
        Sniffed::Http {
            host: host.map(str::to_owned),
            port: None,
        }
    }

    /// The plan in one line: `deny`, `direct ADDR`, `connect TARGET via PROXY`,
    /// `forward AUTHORITY via PROXY`, then ` [rule]`.
    /// The plan for `dst` and `sniffed` under `settings`, with nothing from DNS, described.
    fn describe_plan(settings: &Settings, dst: SocketAddr, sniffed: &Sniffed) -> String {
        let policy = settings.policy();
        describe(&plan(
            &settings.rules(&policy),
            settings.proxy_urls(),
            dst,
            sniffed,
            &Resolved::default(),
        ))
    }

    fn describe(plan: &Plan<'_, ProxySetting>) -> String {
        let via = |list: &ProxySetting| {
            let authorities: Vec<String> = list.urls().iter().map(|u| u.authority()).collect();
            authorities.join(" ")
        };
        let action = match &plan.action {
            Action::Deny => "deny".to_owned(),
            Action::Direct { to } => format!("direct {to}"),
            Action::Connect { proxy, target } => format!("connect {target} via {}", via(proxy)),
            Action::Forward { proxy, authority } => format!("forward {authority} via {}", via(proxy)),
        };
        format!("{action} [{}]", plan.rule)
    }

    /// (configuration, destination, first bytes, expected plan), in the manner of ztunnel's
    /// `build_request` tests: every routing choice the agent makes, one row each.
    #[test]
    fn plans() {
        let proxies = "https_proxy = \"http://u:p@tls-proxy:3128\"\nhttp_proxy = \"http://http-proxy:8080\"\n\
                       no_proxy = [\"internal.example\", \"8.8.4.4:443\", \"2001:4860::/32\"]\n\
                       ip_range_whitelist = [\"10.1.0.0/16\"]";
        let by_ip = &format!("{proxies}\nconnect_by_ip = true");
        let https_only = "https_proxy = \"http://tls-proxy:3128\"";
        let direct_default = "https_proxy = \"http://tls-proxy:3128\"\ndefault_route = \"direct\"";
        let deny_default = "https_proxy = \"http://tls-proxy:3128\"\ndefault_route = \"deny\"";
        let no_proxy_all = "https_proxy = \"http://tls-proxy:3128\"\nno_proxy = [\"*\"]";
        #[rustfmt::skip]
        let cases: &[(&str, &str, Sniffed, &str)] = &[
            // TLS goes to https_proxy, CONNECTed by its SNI.
            (proxies, "93.184.216.34:8448", tls(Some("matrix.org")),
                "connect matrix.org:8448 via tls-proxy:3128 [proxy]"),
            // Without a name: by address, IPv6 bracketed.
            (proxies, "93.184.216.34:443", tls(None), "connect 93.184.216.34:443 via tls-proxy:3128 [proxy]"),
            (proxies, "[2606:4700::1111]:443", tls(None),
                "connect [2606:4700::1111]:443 via tls-proxy:3128 [proxy]"),
            // connect_by_ip: the vetted address, whatever the name.
            (by_ip, "93.184.216.34:8448", tls(Some("matrix.org")),
                "connect 93.184.216.34:8448 via tls-proxy:3128 [proxy]"),
            // Plain HTTP goes to http_proxy in absolute form (port 80 left out).
            (proxies, "93.184.216.34:80", http(Some("origin.example")),
                "forward origin.example via http-proxy:8080 [proxy]"),
            (proxies, "93.184.216.34:8080", http(Some("origin.example")),
                "forward origin.example:8080 via http-proxy:8080 [proxy]"),
            (proxies, "93.184.216.34:80", http(None), "forward 93.184.216.34 via http-proxy:8080 [proxy]"),
            (by_ip, "93.184.216.34:80", http(Some("origin.example")),
                "forward 93.184.216.34 via http-proxy:8080 [proxy]"),
            // No proxy for the protocol: direct, blacklist still applied.
            (https_only, "93.184.216.34:80", http(Some("origin.example")),
                "direct 93.184.216.34:80 [no proxy for protocol]"),
            (https_only, "10.2.3.4:80", http(Some("origin.example")), "deny [ip_range_blacklist 10.0.0.0/8]"),
            // Silent clients: default_route.
            (proxies, "93.184.216.34:25", Sniffed::Other, "connect 93.184.216.34:25 via tls-proxy:3128 [proxy]"),
            (direct_default, "93.184.216.34:25", Sniffed::Other,
                "direct 93.184.216.34:25 [no proxy for protocol]"),
            (deny_default, "93.184.216.34:25", Sniffed::Other,
                "deny [default_route deny (neither TLS nor HTTP)]"),
            // no_proxy by name (suffix), by address and port, by range.
            (proxies, "93.184.216.34:5432", tls(Some("db.internal.example")),
                "direct 93.184.216.34:5432 [no_proxy internal.example]"),
            (proxies, "8.8.4.4:443", tls(None), "direct 8.8.4.4:443 [no_proxy 8.8.4.4:443]"),
            (proxies, "8.8.4.4:80", http(None), "forward 8.8.4.4 via http-proxy:8080 [proxy]"),
            (proxies, "[2001:4860::8888]:443", tls(Some("dns.example")),
                "direct [2001:4860::8888]:443 [no_proxy 2001:4860::/32]"),
            (no_proxy_all, "93.184.216.34:443", tls(Some("matrix.org")), "direct 93.184.216.34:443 [no_proxy *]"),
            // The blacklist wins over no_proxy; the whitelist only exempts from the blacklist.
            (no_proxy_all, "10.2.3.4:443", tls(Some("matrix.org")), "deny [ip_range_blacklist 10.0.0.0/8]"),
            (proxies, "10.1.2.3:443", tls(Some("app.example")),
                "connect app.example:443 via tls-proxy:3128 [ip_range_whitelist 10.1.0.0/16, proxy]"),
            (proxies, "10.1.2.3:443", tls(Some("db.internal.example")),
                "direct 10.1.2.3:443 [ip_range_whitelist 10.1.0.0/16, no_proxy internal.example]"),
            (proxies, "[::ffff:10.2.3.4]:443", tls(None), "deny [ip_range_blacklist 10.0.0.0/8]"),
            // A name is a claim: an address in it is checked like a dialled one...
            (proxies, "93.184.216.34:80", http(Some("10.99.0.4")),
                "deny [ip_range_blacklist 10.0.0.0/8 for the name 10.99.0.4]"),
            (proxies, "93.184.216.34:80", http(Some("::ffff:192.168.1.1")),
                "deny [ip_range_blacklist 192.168.0.0/16 for the name ::ffff:192.168.1.1]"),
            (proxies, "93.184.216.34:80", http(Some("10.1.2.3")),
                "forward 10.1.2.3 via http-proxy:8080 [proxy]"),
            (proxies, "93.184.216.34:443", tls(Some("8.8.8.8")), "connect 8.8.8.8:443 via tls-proxy:3128 [proxy]"),
            // ...and the local host is never reachable by name, whatever the blacklist.
            (no_proxy_all, "93.184.216.34:80", http(Some("127.0.0.1")), "deny [local name 127.0.0.1]"),
            (proxies, "93.184.216.34:80", http(Some("::1")), "deny [local name ::1]"),
            (proxies, "93.184.216.34:80", http(Some("0.0.0.0")), "deny [local name 0.0.0.0]"),
            (proxies, "93.184.216.34:443", tls(Some("localhost")), "deny [local name localhost]"),
            (proxies, "93.184.216.34:443", tls(Some("admin.localhost")), "deny [local name admin.localhost]"),
            (proxies, "93.184.216.34:443", tls(Some("ip6-localhost")), "deny [local name ip6-localhost]"),
            (proxies, "93.184.216.34:443", tls(Some("localhost6.localdomain6")),
                "deny [local name localhost6.localdomain6]"),
            (proxies, "93.184.216.34:443", tls(Some("localhost.example")),
                "connect localhost.example:443 via tls-proxy:3128 [proxy]"),
        ];
        for (text, dst, sniffed, expected) in cases {
            let dst: SocketAddr = dst.parse().unwrap();
            let described = describe_plan(&Settings::from_toml(text), dst, sniffed);
            assert_eq!(described, *expected, "{dst} {sniffed:?} with\n{text}");
        }
    }

    /// Which name a connection goes by, given what the application's own DNS answers said:
    /// (configuration, destination, first bytes, what the record knows, expected plan, named by).
    #[test]
    fn names_from_the_applications_dns() {
        let proxies = "https_proxy = \"http://tls-proxy:3128\"\nhttp_proxy = \"http://http-proxy:8080\"\n\
                       no_proxy = [\"relay.internal.example\"]";
        let by_ip = &format!("{proxies}\nconnect_by_ip = true");
        let deny_default = "https_proxy = \"http://tls-proxy:3128\"\ndefault_route = \"deny\"";
        let known = |client: ClientName, dialled: Option<&str>| Resolved {
            client,
            dialled_name: dialled.map(str::to_owned),
            ..Resolved::default()
        };
        let delegated = |dialled: Option<&str>, targets: &[&str], looked_up: bool| Resolved {
            srv_targets: targets.iter().map(|t| t.to_string()).collect(),
            looked_up,
            ..known(Delegates, dialled)
        };
        let resolver = Resolved {
            resolver: true,
            ..Resolved::default()
        };
        use ClientName::{Delegates, Elsewhere, Unrecorded};
        let agreed = ClientName::Resolved;
        #[rustfmt::skip]
        let cases: &[(&str, &str, Sniffed, Resolved, &str, TargetName)] = &[
            // SRV delegation: SNI is the server name, whose own address is elsewhere; the address
            // dialled is the SRV target's. CONNECT by the target, as Synapse's own proxy code does.
            (proxies, "93.184.216.8:8448", tls(Some("example.org")),
                delegated(Some("matrix.example.org"), &["matrix.example.org"], false),
                "connect matrix.example.org:8448 via tls-proxy:3128 [proxy]", TargetName::Resolved),
            // The target's address was resolved off the wire (hosts file, nscd, resolved): the
            // one target on the dialled port; confirmed by the agent's own lookup, or not.
            (proxies, "93.184.216.8:8448", tls(Some("example.org")), delegated(None, &["fed.example.org"], false),
                "connect fed.example.org:8448 via tls-proxy:3128 [proxy]", TargetName::SrvTarget),
            (proxies, "93.184.216.8:8448", tls(Some("example.org")), delegated(None, &["fed.example.org"], true),
                "connect fed.example.org:8448 via tls-proxy:3128 [proxy]", TargetName::SrvLookup),
            // The address is known under a name that is no target: still the target.
            (proxies, "93.184.216.8:8448", tls(Some("example.org")),
                delegated(Some("cdn.example"), &["fed.example.org"], false),
                "connect fed.example.org:8448 via tls-proxy:3128 [proxy]", TargetName::SrvTarget),
            // Several targets on that port, none, or none the lookup found there: the address,
            // never the server name, which points elsewhere.
            (proxies, "93.184.216.8:8448", tls(Some("example.org")),
                delegated(None, &["a.example.org", "b.example.org"], false),
                "connect 93.184.216.8:8448 via tls-proxy:3128 [proxy]", TargetName::Address),
            (proxies, "93.184.216.8:8448", tls(Some("example.org")), delegated(None, &[], false),
                "connect 93.184.216.8:8448 via tls-proxy:3128 [proxy]", TargetName::Address),
            (proxies, "93.184.216.8:8448", tls(Some("example.org")), delegated(None, &[], true),
                "connect 93.184.216.8:8448 via tls-proxy:3128 [proxy]", TargetName::Address),
            // A target is a claim like SNI: the policy decides by it (a no_proxy target goes
            // direct; a local one is refused).
            (proxies, "93.184.216.9:8448", tls(Some("example.org")), delegated(None, &["relay.internal.example"], true),
                "direct 93.184.216.9:8448 [no_proxy relay.internal.example]", TargetName::SrvLookup),
            (proxies, "93.184.216.9:8448", tls(Some("example.org")), delegated(None, &["localhost"], false),
                "deny [local name localhost]", TargetName::SrvTarget),
            // ...but a target nothing confirmed (the lookup failed) cannot take it direct.
            (proxies, "93.184.216.9:8448", tls(Some("example.org")), delegated(None, &["relay.internal.example"], false),
                "connect relay.internal.example:8448 via tls-proxy:3128 [proxy]", TargetName::SrvTarget),
            // Plain HTTP to a delegating name keeps its Host.
            (proxies, "93.184.216.8:80", http(Some("example.org")), delegated(None, &["fed.example.org"], false),
                "forward example.org via http-proxy:8080 [proxy]", TargetName::ClientElsewhere),
            // .well-known delegation: Synapse dials the delegated host with SNI set to it; the
            // SNI is right whether the record saw its address or not.
            (proxies, "93.184.216.8:8448", tls(Some("matrix.example.org")), known(Unrecorded, None),
                "connect matrix.example.org:8448 via tls-proxy:3128 [proxy]", TargetName::ClientUnrecorded),
            // DNS over TCP to a resolver the application asked over UDP: direct, unless
            // blacklisted; to any other address, as before (the proxy, by address).
            (proxies, "93.184.216.53:53", Sniffed::Other, resolver.clone(),
                "direct 93.184.216.53:53 [DNS over TCP to the application's resolver 93.184.216.53]",
                TargetName::Address),
            (proxies, "10.0.0.53:53", Sniffed::Other, resolver.clone(),
                "deny [ip_range_blacklist 10.0.0.0/8]", TargetName::Address),
            (proxies, "93.184.216.53:53", Sniffed::Other, Resolved::default(),
                "connect 93.184.216.53:53 via tls-proxy:3128 [proxy]", TargetName::Address),
            (proxies, "93.184.216.53:53", tls(None), resolver.clone(),
                "connect 93.184.216.53:53 via tls-proxy:3128 [proxy]", TargetName::Address),
            (deny_default, "93.184.216.53:53", Sniffed::Other, resolver.clone(),
                "deny [default_route deny (neither TLS nor HTTP)]", TargetName::Address),
            // SNI agrees with DNS: by SNI.
            (proxies, "93.184.216.8:8448", tls(Some("matrix.example.org")), known(agreed, Some("matrix.example.org")),
                "connect matrix.example.org:8448 via tls-proxy:3128 [proxy]", TargetName::Client),
            // Nothing recorded about SNI (hosts file, cache): SNI, as before.
            (proxies, "93.184.216.8:443", tls(Some("a.example")), known(Unrecorded, Some("b.example")),
                "connect a.example:443 via tls-proxy:3128 [proxy]", TargetName::ClientUnrecorded),
            // SNI resolved elsewhere and no name for the address: the address.
            (proxies, "93.184.216.8:443", tls(Some("example.org")), known(Elsewhere, None),
                "connect 93.184.216.8:443 via tls-proxy:3128 [proxy]", TargetName::Address),
            // No SNI, no Host: the name the application resolved, also for a silent protocol...
            (proxies, "93.184.216.8:443", tls(None), known(Unrecorded, Some("matrix.example.org")),
                "connect matrix.example.org:443 via tls-proxy:3128 [proxy]", TargetName::Resolved),
            (proxies, "93.184.216.8:25", Sniffed::Other, known(Unrecorded, Some("smtp.example")),
                "connect smtp.example:25 via tls-proxy:3128 [proxy]", TargetName::Resolved),
            // ...so no_proxy names work without SNI or Host.
            (proxies, "93.184.216.9:25", Sniffed::Other, known(Unrecorded, Some("relay.internal.example")),
                "direct 93.184.216.9:25 [no_proxy relay.internal.example]", TargetName::Resolved),
            // A contradicted SNI cannot claim a no_proxy name to go direct.
            (proxies, "93.184.216.8:443", tls(Some("relay.internal.example")), known(Elsewhere, Some("matrix.example.org")),
                "connect matrix.example.org:443 via tls-proxy:3128 [proxy]", TargetName::Resolved),
            // Plain HTTP keeps its Host (virtual hosting), whatever DNS said.
            (proxies, "93.184.216.8:80", http(Some("example.org")), known(Elsewhere, Some("matrix.example.org")),
                "forward example.org via http-proxy:8080 [proxy]", TargetName::ClientElsewhere),
            (proxies, "93.184.216.8:80", http(None), known(Unrecorded, Some("matrix.example.org")),
                "forward matrix.example.org via http-proxy:8080 [proxy]", TargetName::Resolved),
            // A name from DNS is a claim like SNI: local names are refused.
            (proxies, "93.184.216.8:443", tls(None), known(Unrecorded, Some("localhost")),
                "deny [local name localhost]", TargetName::Resolved),
            // connect_by_ip: always the address.
            (by_ip, "93.184.216.8:8448", tls(Some("example.org")), known(Elsewhere, Some("matrix.example.org")),
                "connect 93.184.216.8:8448 via tls-proxy:3128 [proxy]", TargetName::Address),
        ];
        // Synthetic addresses (synthetic DNS) exist only as names for the proxy.
        let synthetic = |client: ClientName| Resolved {
            client,
            dialled_name: Some("matrix.example.org".to_owned()),
            synthetic: true,
            ..Resolved::default()
        };
        let https_only = "https_proxy = \"http://tls-proxy:3128\"";
        let mut cases = cases.to_vec();
        #[rustfmt::skip]
        cases.extend([
            (proxies, "240.64.0.7:8448", tls(Some("example.org")), synthetic(Elsewhere),
                "connect matrix.example.org:8448 via tls-proxy:3128 [proxy]", TargetName::Resolved),
            (proxies, "240.64.0.7:443", tls(Some("matrix.example.org")), synthetic(agreed),
                "connect matrix.example.org:443 via tls-proxy:3128 [proxy]", TargetName::Client),
            (https_only, "240.64.0.7:80", http(Some("matrix.example.org")), synthetic(agreed),
                "deny [synthetic address 240.64.0.7: only the proxy reaches its name]",
                TargetName::Client),
        ]);
        for (text, dst, sniffed, resolved, expected, named_by) in &cases {
            let settings = Settings::from_toml(text);
            let policy = settings.policy();
            let dst: SocketAddr = dst.parse().unwrap();
            let plan = plan(
                &settings.rules(&policy),
                settings.proxy_urls(),
                dst,
                sniffed,
                resolved,
            );
            assert_eq!(describe(&plan), *expected, "{dst} {sniffed:?} {resolved:?}");
            assert_eq!(plan.named_by, *named_by, "{dst} {sniffed:?} {resolved:?}");
        }
    }

    /// Per-destination routes: (configuration, destination, first bytes, expected plan). Each
    /// route matches as a no_proxy entry does; the first wins; the blacklist and no_proxy come
    /// first; a route's proxies carry TLS, HTTP and the rest alike.
    #[test]
    fn routes_choose_a_proxy_list_or_direct_per_destination() {
        let config = "https_proxy = \"http://a:3128 http://b:3128\"\nhttp_proxy = \"http://h:8080\"\n\
                      no_proxy = [\"internal.example\"]\n\
                      proxy_routes = [\"partner.example 10.20.0.0/16 -> http://p1:8080 http://p2:8080\", \
                      \"db.partner.example -> direct\", \"partner.example:8448 -> http://fed:3128\", \
                      \"internal.example -> http://never:3128\", \"10.0.0.0/8 -> direct\"]\n\
                      ip_range_whitelist = [\"10.20.0.0/16\"]";
        #[rustfmt::skip]
        let cases: &[(&str, Sniffed, &str)] = &[
            // The default list, both proxies in order.
            ("93.184.216.34:443", tls(Some("matrix.org")), "connect matrix.org:443 via a:3128 b:3128 [proxy]"),
            // A route by name (subdomains too): its list, for TLS and for HTTP.
            ("93.184.216.34:443", tls(Some("www.partner.example")),
                "connect www.partner.example:443 via p1:8080 p2:8080 [proxy_route partner.example 10.20.0.0/16 -> http://p1:8080 http://p2:8080]"),
            ("93.184.216.34:80", http(Some("partner.example")),
                "forward partner.example via p1:8080 p2:8080 [proxy_route partner.example 10.20.0.0/16 -> http://p1:8080 http://p2:8080]"),
            // By address (whitelisted out of the blacklist), whatever the name.
            ("10.20.3.4:443", tls(None),
                "connect 10.20.3.4:443 via p1:8080 p2:8080 [ip_range_whitelist 10.20.0.0/16, proxy_route partner.example 10.20.0.0/16 -> http://p1:8080 http://p2:8080]"),
            // The first match wins: the broader route comes first, so these never reach theirs.
            ("93.184.216.35:443", tls(Some("db.partner.example")),
                "connect db.partner.example:443 via p1:8080 p2:8080 [proxy_route partner.example 10.20.0.0/16 -> http://p1:8080 http://p2:8080]"),
            ("93.184.216.35:8448", tls(Some("partner.example")),
                "connect partner.example:8448 via p1:8080 p2:8080 [proxy_route partner.example 10.20.0.0/16 -> http://p1:8080 http://p2:8080]"),
            // no_proxy before routes, and the blacklist before everything.
            ("93.184.216.36:443", tls(Some("internal.example")), "direct 93.184.216.36:443 [no_proxy internal.example]"),
            ("10.1.2.3:443", tls(None), "deny [ip_range_blacklist 10.0.0.0/8]"),
            // Unrecognised traffic follows routes like the rest.
            ("10.20.3.4:5432", Sniffed::Other,
                "connect 10.20.3.4:5432 via p1:8080 p2:8080 [ip_range_whitelist 10.20.0.0/16, proxy_route partner.example 10.20.0.0/16 -> http://p1:8080 http://p2:8080]"),
        ];
        let settings = Settings::from_toml(config);
        for (dst, sniffed, expected) in cases {
            let dst: SocketAddr = dst.parse().unwrap();
            assert_eq!(
                describe_plan(&settings, dst, sniffed),
                *expected,
                "{dst} {sniffed:?}"
            );
        }
        // A route to direct, reached first.
        let direct = Settings::from_toml(
            "https_proxy = \"http://a:3128\"\nproxy_routes = [\"db.partner.example -> direct\", \"partner.example -> http://p:1\"]",
        );
        assert_eq!(
            describe_plan(
                &direct,
                "93.184.216.35:5432".parse().unwrap(),
                &tls(Some("db.partner.example"))
            ),
            "direct 93.184.216.35:5432 [proxy_route db.partner.example -> direct]"
        );
    }

    #[test]
    fn rule_kinds_name_what_decided() {
        let settings =
            Settings::from_toml("https_proxy = \"http://tls-proxy:3128\"\ndefault_route = \"deny\"");
        let policy = settings.policy();
        let kind = |dst: &str, sniffed: Sniffed| {
            plan(
                &settings.rules(&policy),
                settings.proxy_urls(),
                dst.parse().unwrap(),
                &sniffed,
                &Resolved::default(),
            )
            .rule
            .kind
        };
        assert_eq!(kind("10.0.0.1:443", tls(None)), RuleKind::Blacklist);
        assert_eq!(kind("8.8.8.8:443", tls(None)), RuleKind::Proxy);
        assert_eq!(kind("8.8.8.8:80", http(None)), RuleKind::NoProxyForProtocol);
        assert_eq!(kind("8.8.8.8:25", Sniffed::Other), RuleKind::DefaultRoute);
    }
}
