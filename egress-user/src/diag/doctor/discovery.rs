//! Matrix server discovery rules (server-server API, "Resolving server names"), as pure
//! functions: parsing server names and `.well-known/matrix/server` answers, and what a
//! delegation means for the next lookup. The I/O lives in the doctor's other modules.

use std::net::IpAddr;

use serde::Serialize;

/// The default federation port.
pub const FEDERATION_PORT: u16 = 8448;

/// `hostname[:port]` where hostname is a DNS name, an IPv4 literal or a bracketed IPv6 literal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerName {
    pub host: Host,
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

impl std::fmt::Display for ServerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => write!(f, "{}", self.host),
        }
    }
}

impl ServerName {
    /// Parses a server name as the spec's grammar allows; names are lowercased.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("'{s}' is not a valid server name: {why}");
        if s.is_empty() || s.len() > 255 {
            return Err(bad("empty or longer than 255 characters"));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (ip, after) = rest.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| bad("bad IPv6 literal"))?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
            };
            (Host::Ip(IpAddr::V6(ip)), port)
        } else {
            let (host, port) = match s.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (s, None),
            };
            let host = match host.parse::<std::net::Ipv4Addr>() {
                Ok(ip) => Host::Ip(IpAddr::V4(ip)),
                Err(_) if crate::hostport::valid_hostname(host) => Host::Name(host.to_ascii_lowercase()),
                Err(_) => return Err(bad("hostname has characters or labels DNS does not allow")),
            };
            (host, port)
        };
        let port = port
            .map(|p| {
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad("port must be 1-65535"))
            })
            .transpose()?;
        Ok(Self { host, port })
    }

    /// The name as it goes into TLS SNI / certificate checks (no brackets, no port).
    pub fn tls_name(&self) -> String {
        match &self.host {
            Host::Ip(ip) => ip.to_string(),
            Host::Name(name) => name.clone(),
        }
    }
}

/// Parses a `/.well-known/matrix/server` body: a JSON object whose `m.server` is a server name.
pub fn parse_well_known(body: &[u8]) -> Result<ServerName, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let object = value.as_object().ok_or("body is not a JSON object")?;
    let server = object
        .get("m.server")
        .ok_or("no \"m.server\" key")?
        .as_str()
        .ok_or("\"m.server\" is not a string")?;
    ServerName::parse(server)
}

/// The first step for a server name: what the spec says to do with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirstStep {
    /// An IP literal or an explicit port: connect there, no well-known, no SRV. `resolve` is
    /// the host to look up (None for IP literals); `host_header` what requests carry.
    Fixed {
        host: Host,
        port: u16,
        host_header: String,
    },
    /// A bare hostname: well-known first (only for the original name), then SRV, then 8448.
    Lookup { name: String },
}

/// Steps 1-2 of the algorithm for the original server name, and 3.1-3.2 for a delegated one.
pub fn first_step(server: &ServerName) -> FirstStep {
    match (&server.host, server.port) {
        (Host::Ip(_), port) => FirstStep::Fixed {
            host: server.host.clone(),
            port: port.unwrap_or(FEDERATION_PORT),
            host_header: server.to_string(),
        },
        (Host::Name(_), Some(port)) => FirstStep::Fixed {
            host: server.host.clone(),
            port,
            host_header: server.to_string(),
        },
        (Host::Name(name), None) => FirstStep::Lookup { name: name.clone() },
    }
}

/// The two SRV names to try for `name`, in order: `_matrix-fed._tcp` then the deprecated
/// `_matrix._tcp`.
pub fn srv_names(name: &str) -> [String; 2] {
    [format!("_matrix-fed._tcp.{name}"), format!("_matrix._tcp.{name}")]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(host: &str, port: Option<u16>) -> ServerName {
        ServerName {
            host: Host::Name(host.into()),
            port,
        }
    }

    #[test]
    fn server_names_parse_as_the_grammar_says() {
        let v4: IpAddr = "1.2.3.4".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let table: &[(&str, Result<ServerName, ()>)] = &[
            ("example.org", Ok(name("example.org", None))),
            ("Example.ORG:8448", Ok(name("example.org", Some(8448)))),
            (
                "matrix.example.org:443",
                Ok(name("matrix.example.org", Some(443))),
            ),
            ("localhost", Ok(name("localhost", None))),
            (
                "1.2.3.4",
                Ok(ServerName {
                    host: Host::Ip(v4),
                    port: None,
                }),
            ),
            (
                "1.2.3.4:1234",
                Ok(ServerName {
                    host: Host::Ip(v4),
                    port: Some(1234),
                }),
            ),
            (
                "[2001:db8::1]",
                Ok(ServerName {
                    host: Host::Ip(v6),
                    port: None,
                }),
            ),
            (
                "[2001:db8::1]:80",
                Ok(ServerName {
                    host: Host::Ip(v6),
                    port: Some(80),
                }),
            ),
            ("", Err(())),
            ("example.org:", Err(())),
            ("example.org:0", Err(())),
            ("example.org:65536", Err(())),
            ("example.org:http", Err(())),
            ("exa mple.org", Err(())),
            ("example.org/path", Err(())),
            ("[2001:db8::1", Err(())),
            ("[2001:db8::1]x", Err(())),
            ("[not-an-ip]:80", Err(())),
            ("2001:db8::1", Err(())),
        ];
        for (input, expected) in table {
            let got = ServerName::parse(input);
            match expected {
                Ok(want) => assert_eq!(got.as_ref(), Ok(want), "{input}"),
                Err(()) => assert!(got.is_err(), "{input} parsed as {got:?}"),
            }
        }
    }

    #[test]
    fn server_names_display_back() {
        for s in [
            "example.org",
            "example.org:8448",
            "1.2.3.4:80",
            "[2001:db8::1]:443",
            "[::1]",
        ] {
            assert_eq!(ServerName::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(ServerName::parse("[::1]:80").unwrap().tls_name(), "::1");
    }

    #[test]
    fn well_known_answers() {
        let ok: &[(&str, ServerName)] = &[
            (
                r#"{"m.server": "fed.example.org"}"#,
                name("fed.example.org", None),
            ),
            (
                r#"{"m.server": "fed.example.org:443", "other": 1}"#,
                name("fed.example.org", Some(443)),
            ),
        ];
        for (body, want) in ok {
            assert_eq!(parse_well_known(body.as_bytes()).as_ref(), Ok(want), "{body}");
        }
        let bad: &[(&str, &str)] = &[
            ("<html>", "not JSON"),
            ("[]", "not a JSON object"),
            ("{}", "no \"m.server\""),
            (r#"{"m.server": 8448}"#, "not a string"),
            (r#"{"m.server": "bad name:x"}"#, "not a valid server name"),
        ];
        for (body, why) in bad {
            let err = parse_well_known(body.as_bytes()).unwrap_err();
            assert!(err.contains(why), "{body}: {err}");
        }
    }

    #[test]
    fn plans_follow_the_spec_order() {
        let plan_of = |s: &str| first_step(&ServerName::parse(s).unwrap());
        assert_eq!(
            plan_of("1.2.3.4"),
            FirstStep::Fixed {
                host: Host::Ip("1.2.3.4".parse().unwrap()),
                port: 8448,
                host_header: "1.2.3.4".into()
            }
        );
        assert_eq!(
            plan_of("[2001:db8::1]:443"),
            FirstStep::Fixed {
                host: Host::Ip("2001:db8::1".parse().unwrap()),
                port: 443,
                host_header: "[2001:db8::1]:443".into()
            }
        );
        assert_eq!(
            plan_of("example.org:8000"),
            FirstStep::Fixed {
                host: Host::Name("example.org".into()),
                port: 8000,
                host_header: "example.org:8000".into()
            }
        );
        assert_eq!(
            plan_of("example.org"),
            FirstStep::Lookup {
                name: "example.org".into()
            }
        );
        assert_eq!(
            srv_names("example.org"),
            ["_matrix-fed._tcp.example.org", "_matrix._tcp.example.org"]
        );
    }
}
