//! The types of setting values. Each type parses and checks its own values, the same way
//! whether the value comes from a flag (clap calls [`FromStr`]), the TOML file, homeserver.yaml
//! or the environment (serde): so a setting's validation is declared once, with its type.
//!
//! Error texts say why a value is refused and name the value where it is safe to (never a proxy
//! URL's credentials); the caller adds where the value came from and which setting it is.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// Implements `Serialize` through `Display` and `Deserialize` through `FromStr`, for values
/// written as strings.
macro_rules! string_value {
    ($type:ty, $expecting:literal) => {
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl de::Visitor<'_> for Visitor {
                    type Value = $type;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, value: &str) -> Result<$type, E> {
                        value
                            .parse()
                            .map_err(|why| E::custom(format!("{value}: {why}")))
                    }
                }
                d.deserialize_str(Visitor)
            }
        }
    };
}

/// A time limit in seconds: above 0 and at most an hour.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Seconds(pub Duration);

impl Seconds {
    const WHY: &'static str = "must be a number of seconds above 0 and at most 3600";

    fn new(value: f64) -> Result<Self, &'static str> {
        if value.is_finite() && value > 0.0 && value <= 3600.0 {
            Ok(Self(Duration::from_secs_f64(value)))
        } else {
            Err(Self::WHY)
        }
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for Seconds {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, &'static str> {
        Self::new(s.trim().parse().map_err(|_| Self::WHY)?)
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.as_secs_f64())
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0.as_secs_f64())
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(d)?;
        Self::new(value).map_err(|why| de::Error::custom(format!("{value}: {why}")))
    }
}

/// A TCP/UDP port, 1 to 65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Port(pub u16);

impl Port {
    const WHY: &'static str = "must be a port from 1 to 65535";

    fn new(value: i64) -> Result<Self, &'static str> {
        match u16::try_from(value) {
            Ok(port) if port != 0 => Ok(Self(port)),
            _ => Err(Self::WHY),
        }
    }
}

impl FromStr for Port {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, &'static str> {
        Self::new(s.trim().parse().map_err(|_| Self::WHY)?)
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Port {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.0)
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(d)?;
        Self::new(value).map_err(|why| de::Error::custom(format!("{value}: {why}")))
    }
}

/// The socket mark of the agent's own sockets: a non-zero 32-bit number, decimal or `0x` hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark(pub u32);

impl Mark {
    const WHY: &'static str = "must be a non-zero 32-bit number (0 would match every unmarked socket)";
}

impl FromStr for Mark {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, &'static str> {
        let text = s.trim();
        let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => text.parse(),
        };
        match parsed {
            Ok(mark) if mark != 0 => Ok(Self(mark)),
            _ => Err(Self::WHY),
        }
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl Serialize for Mark {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

impl<'de> Deserialize<'de> for Mark {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(d)?;
        match u32::try_from(value) {
            Ok(mark) if mark != 0 => Ok(Self(mark)),
            _ => Err(de::Error::custom(format!("{value}: {}", Self::WHY))),
        }
    }
}

/// A count with an upper bound (`MAX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtMost<const MAX: usize>(pub usize);

impl<const MAX: usize> AtMost<MAX> {
    fn new(value: i64) -> Result<Self, String> {
        match usize::try_from(value) {
            Ok(n) if n <= MAX => Ok(Self(n)),
            _ => Err(format!("must be a number from 0 to {MAX}")),
        }
    }

    pub fn get(self) -> usize {
        self.0
    }
}

impl<const MAX: usize> FromStr for AtMost<MAX> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::new(
            s.trim()
                .parse()
                .map_err(|_| format!("must be a number from 0 to {MAX}"))?,
        )
    }
}

impl<const MAX: usize> fmt::Display for AtMost<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<const MAX: usize> Serialize for AtMost<MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0 as u64)
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for AtMost<MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = i64::deserialize(d)?;
        Self::new(value).map_err(|why| de::Error::custom(format!("{value}: {why}")))
    }
}

/// A container as named in the configuration: a name (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`, as Docker
/// and Podman allow) or an id (or a prefix of one, 12 hex digits at least).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRef(pub String);

impl FromStr for ContainerRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let valid = s.len() < 128
            && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !valid {
            return Err(
                "not a container name or id (letters, digits, '_', '.' and '-', starting \
                 with a letter or digit, under 128 characters)"
                    .into(),
            );
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for ContainerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_value!(ContainerRef, "a container name or id");

/// A Kubernetes label selector, as `kubectl get pods -l` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSelector(pub String);

impl FromStr for LabelSelector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let valid = !s.trim().is_empty()
            && s.len() <= 1024
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=!,() ".contains(c));
        if !valid {
            return Err(
                "not a label selector (e.g. app.kubernetes.io/name=synapse; letters, \
                 digits and - _ . / = ! , ( ) and spaces)"
                    .into(),
            );
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_value!(LabelSelector, "a label selector");

/// A Kubernetes namespace name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceName(pub String);

impl FromStr for NamespaceName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let valid = (1..=63).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-');
        if !valid {
            return Err("not a namespace name (lower-case letters, digits and '-')".into());
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for NamespaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_value!(NamespaceName, "a namespace name");

/// The Kubernetes API server: `https://HOST[:PORT]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeApi {
    pub host: String,
    pub port: u16,
}

impl KubeApi {
    /// The API server of the cluster egress runs in, from a pod's environment.
    pub fn in_cluster(env: &dyn Fn(&str) -> Option<String>) -> Option<Result<Self, String>> {
        let host = env("KUBERNETES_SERVICE_HOST")?;
        let port = env("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".to_owned());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Some(format!("https://{host}:{port}").parse())
    }
}

impl FromStr for KubeApi {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .strip_prefix("https://")
            .and_then(|rest| crate::hostport::parse_destination(rest.trim_end_matches('/')).ok())
            .ok_or_else(|| "expected https://HOST[:PORT]".to_owned())?;
        Ok(Self { host, port })
    }
}

impl fmt::Display for KubeApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "https://{}:{}", self.host, self.port)
        }
    }
}

string_value!(KubeApi, "https://HOST[:PORT]");

/// A DNS resolver: `IP`, `IP:PORT` or `[IPv6]:PORT`; port 53 by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolver(pub std::net::SocketAddr);

impl FromStr for Resolver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let value = s.trim();
        if let Ok(ip) = value.parse::<std::net::IpAddr>() {
            return Ok(Self(std::net::SocketAddr::new(ip, 53)));
        }
        value
            .parse()
            .map(Self)
            .map_err(|_| "expected IP, IP:PORT or [IPv6]:PORT".to_owned())
    }
}

impl fmt::Display for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

string_value!(Resolver, "IP, IP:PORT or [IPv6]:PORT");

/// The synthetic DNS range: an IPv4 range of at least 4 addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticRange(pub ipnet::Ipv4Net);

impl FromStr for SyntheticRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let range: ipnet::Ipv4Net = s
            .trim()
            .parse()
            .map_err(|e| format!("expected an IPv4 range like 240.64.0.0/16 ({e})"))?;
        if range.prefix_len() > 30 {
            return Err("too small (at most /30)".into());
        }
        Ok(Self(range.trunc()))
    }
}

impl fmt::Display for SyntheticRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

string_value!(SyntheticRange, "an IPv4 range");

/// A listening address, `IP:PORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddr(pub std::net::SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim()
            .parse()
            .map(Self)
            .map_err(|_| "expected IP:PORT".to_owned())
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

string_value!(ListenAddr, "IP:PORT");

/// An upstream proxy as an admin names it in a setting: `host` (any port) or `host:port`
/// (`[v6]:port`), as in its URL but without scheme or credentials; or `*`, every proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyMatch {
    Any,
    Proxy { host: String, port: Option<u16> },
}

impl ProxyMatch {
    pub fn matches(&self, host: &str, port: u16) -> bool {
        match self {
            Self::Any => true,
            Self::Proxy { host: h, port: p } => same_host(h, host) && p.is_none_or(|p| p == port),
        }
    }
}

/// Host names by text (both lower case), IP addresses by value (`2001:db8:0::1` is `2001:db8::1`).
fn same_host(a: &str, b: &str) -> bool {
    match (a.parse::<std::net::IpAddr>(), b.parse::<std::net::IpAddr>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

impl FromStr for ProxyMatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(Self::Any);
        }
        if s.contains('@') || s.contains('/') {
            // Never echoed: it may hold a password.
            return Err("expected a proxy as host or host:port, without scheme or credentials".into());
        }
        let (host, port) = match s.strip_prefix('[') {
            Some(rest) => {
                let (host, after) = rest.split_once(']').ok_or("missing ']' after an IPv6 address")?;
                let port = match after {
                    "" => None,
                    _ => Some(after.strip_prefix(':').ok_or("expected :PORT after ']'")?),
                };
                (host, port)
            }
            None => match s.split_once(':') {
                Some((host, port)) if !port.contains(':') => (host, Some(port)),
                _ => (s, None),
            },
        };
        let host = host.to_ascii_lowercase();
        if !crate::hostport::valid_hostname(&host) {
            return Err(format!("{s}: not a host name or IP address"));
        }
        let port = match port {
            None => None,
            Some(port) => Some(
                port.parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("{s}: the port must be from 1 to 65535"))?,
            ),
        };
        Ok(Self::Proxy { host, port })
    }
}

impl fmt::Display for ProxyMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Proxy { host, port } => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                match port {
                    Some(port) => write!(f, "{host}:{port}"),
                    None => f.write_str(&host),
                }
            }
        }
    }
}

string_value!(ProxyMatch, "a proxy as host or host:port, or *");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_are_named_by_host_and_optional_port() {
        // (host, port, whether it matches)
        type Against = (&'static str, u16, bool);
        let cases: &[(&str, Option<Against>)] = &[
            // (text, Some(against)) or None when refused
            ("*", Some(("anything.example", 1, true))),
            ("Proxy.Corp", Some(("proxy.corp", 3128, true))),
            ("proxy.corp:3128", Some(("proxy.corp", 3128, true))),
            ("proxy.corp:3128", Some(("proxy.corp", 8080, false))),
            ("proxy.corp", Some(("other.corp", 3128, false))),
            ("[2001:db8::1]:3128", Some(("2001:db8::1", 3128, true))),
            ("2001:db8::1", Some(("2001:db8::1", 3128, true))),
            ("[2001:db8:0::1]:3128", Some(("2001:db8::1", 3128, true))),
            ("2001:db8::1", Some(("2001:0db8::0:1", 3128, true))),
            ("10.0.0.1", Some(("10.0.0.1", 1080, true))),
            ("http://proxy.corp:3128", None),
            ("u:secret@proxy.corp", None),
            ("proxy.corp:0", None),
            ("proxy.corp:http", None),
            ("[2001:db8::1", None),
            ("bad host", None),
        ];
        for &(text, expected) in cases {
            match (text.parse::<ProxyMatch>(), expected) {
                (Ok(m), Some((host, port, matches))) => {
                    assert_eq!(m.matches(host, port), matches, "{text} against {host}:{port}");
                    assert_eq!(m.to_string().parse::<ProxyMatch>().unwrap(), m, "{text}");
                }
                (Err(e), None) => assert!(!e.contains("secret"), "{text}: {e}"),
                (got, expected) => panic!("{text}: {got:?}, expected {expected:?}"),
            }
        }
    }

    /// Each type refuses the same values from text (flags) and from TOML, and says why.
    #[test]
    fn values_are_checked_alike_from_text_and_from_toml() {
        #[derive(Deserialize)]
        struct One<T> {
            v: T,
        }
        fn toml<T: for<'de> Deserialize<'de>>(value: &str) -> Result<T, String> {
            toml::from_str::<One<T>>(&format!("v = {value}"))
                .map(|one| one.v)
                .map_err(|e| e.message().to_owned())
        }
        let cases: &[(&str, &str, &str)] = &[
            // (type, value, why refused; "" = accepted)
            ("seconds", "0.5", ""),
            ("seconds", "3600", ""),
            ("seconds", "0", "above 0 and at most 3600"),
            ("seconds", "-1", "above 0"),
            ("seconds", "3601", "at most 3600"),
            ("seconds", "nan", "above 0"),
            ("port", "1001", ""),
            ("port", "0", "from 1 to 65535"),
            ("port", "70000", "from 1 to 65535"),
            ("mark", "0x65677273", ""),
            ("mark", "0", "non-zero"),
            ("at_most", "64", ""),
            ("at_most", "65", "from 0 to 64"),
            ("at_most", "-1", "from 0 to 64"),
        ];
        for &(kind, value, why) in cases {
            fn both<T: FromStr + for<'de> Deserialize<'de>>(value: &str) -> [Result<(), String>; 2]
            where
                T::Err: fmt::Display,
            {
                [
                    value.parse::<T>().map(drop).map_err(|e| e.to_string()),
                    toml::<T>(value).map(drop),
                ]
            }
            let [text, from_toml] = match kind {
                "seconds" => both::<Seconds>(value),
                "port" => both::<Port>(value),
                "mark" => both::<Mark>(value),
                _ => both::<AtMost<64>>(value),
            };
            for (source, result) in [("text", text), ("toml", from_toml)] {
                match (why, result) {
                    ("", Ok(())) => {}
                    ("", Err(e)) => panic!("{kind} {value} from {source}: refused: {e}"),
                    (why, Err(e)) => assert!(e.contains(why), "{kind} {value} from {source}: {e}"),
                    (_, Ok(())) => panic!("{kind} {value} from {source}: accepted"),
                }
            }
        }
        assert_eq!("0.5".parse::<Seconds>().unwrap().to_string(), "0.5");
        assert_eq!("0x10".parse::<Mark>().unwrap(), Mark(16));
    }

    #[test]
    fn selectors_namespaces_containers_and_api_urls() {
        for good in [
            "app=synapse",
            "app.kubernetes.io/name in (synapse, workers),tier!=db",
            "!canary",
        ] {
            assert!(good.parse::<LabelSelector>().is_ok(), "{good}");
        }
        for bad in [
            "",
            "  ",
            "app=synapse&x=y",
            "app=syn\napse",
            "a%20b",
            &"a".repeat(1025),
        ] {
            let error = bad.parse::<LabelSelector>().unwrap_err();
            assert!(error.contains("not a label selector"), "{bad:?}: {error}");
        }
        for good in ["matrix", "ess-1", "a"] {
            assert!(good.parse::<NamespaceName>().is_ok(), "{good}");
        }
        for bad in ["", "Matrix", "-a", "a-", "a/b", "a.b", &"a".repeat(64)] {
            assert!(bad.parse::<NamespaceName>().is_err(), "{bad:?}");
        }
        let id = "01a96a4cdbd3";
        for good in ["matrix-synapse", "synapse_1", "a", "mautrix.telegram", id] {
            assert!(good.parse::<ContainerRef>().is_ok(), "{good}");
        }
        for bad in ["", "-x", "../x", "a/b", "a b", "a?b", "ä", &"a".repeat(128)] {
            let error = bad.parse::<ContainerRef>().unwrap_err();
            assert!(error.contains("not a container name"), "{bad}: {error}");
        }
        let cases = [
            ("https://10.96.0.1:443", Some(("10.96.0.1", 443))),
            ("https://10.96.0.1", Some(("10.96.0.1", 443))),
            ("https://[fd00::1]:6443/", Some(("fd00::1", 6443))),
            (
                "https://kubernetes.default.svc:6443",
                Some(("kubernetes.default.svc", 6443)),
            ),
            ("http://10.96.0.1:443", None),
            ("https://user@10.96.0.1", None),
            ("https://10.96.0.1:0x", None),
        ];
        for (api, want) in cases {
            match (api.parse::<KubeApi>(), want) {
                (Ok(got), Some((host, port))) => {
                    assert_eq!((got.host.as_str(), got.port), (host, port), "{api}")
                }
                (Err(e), None) => assert!(e.contains("expected https://"), "{api}: {e}"),
                (got, want) => panic!("{api}: {got:?}, wanted {want:?}"),
            }
        }
        let env = |name: &str| match name {
            "KUBERNETES_SERVICE_HOST" => Some("fd00::1".to_owned()),
            "KUBERNETES_SERVICE_PORT" => Some("6443".to_owned()),
            _ => None,
        };
        assert_eq!(
            KubeApi::in_cluster(&env).unwrap().unwrap().to_string(),
            "https://[fd00::1]:6443"
        );
        assert!(KubeApi::in_cluster(&|_| None).is_none());
    }
}
