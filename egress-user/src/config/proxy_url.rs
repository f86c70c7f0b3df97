//! Upstream proxy URLs, parsed the way Synapse parses them (`synapse.http.proxyagent.parse_proxy`):
//! `[scheme://][user:pass@]host[:port]`, scheme `http` (default) or `https`, default port 1080,
//! credentials used only when both user and password are non-empty, anything after the
//! authority ignored. Credentials are taken verbatim, as Synapse does (no percent-decoding).

use std::fmt;

pub const DEFAULT_PORT: u16 = 1080;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyScheme {
    Http,
    Https,
}

#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub scheme: ProxyScheme,
    /// Hostname or IP literal, lowercased, without brackets.
    pub host: String,
    pub port: u16,
    /// `user:password`, sent as `Proxy-Authorization: Basic`.
    credentials: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyUrlError {
    #[error("unsupported proxy scheme '{0}': only http:// and https:// proxies are supported")]
    UnsupportedScheme(String),
    #[error("proxy URL has no host name")]
    MissingHost,
    #[error("invalid proxy host '{0}': expected a host name or IP address")]
    InvalidHost(String),
    #[error("invalid proxy port '{0}': expected a number from 1 to 65535")]
    InvalidPort(String),
    #[error("invalid IPv6 literal in proxy URL: missing ']'")]
    UnclosedBracket,
    #[error("{0} proxies in one list: at most 8")]
    TooMany(usize),
}

impl ProxyUrlError {
    pub(crate) fn redacted(self) -> Self {
        const HIDDEN: &str = "(not shown: the URL contains credentials)";
        match self {
            Self::InvalidPort(_) => Self::InvalidPort(HIDDEN.into()),
            Self::InvalidHost(_) => Self::InvalidHost(HIDDEN.into()),
            Self::UnsupportedScheme(_) => Self::UnsupportedScheme(HIDDEN.into()),
            other => other,
        }
    }
}

impl ProxyUrl {
    pub fn parse(input: &str) -> Result<Self, ProxyUrlError> {
        Self::parse_raw(input).map_err(|e| {
            // A password with '/', '?' or '#' in it ends the authority early, and its pieces
            // would show up as "host" or "port": never echo values from a URL with credentials.
            if input.contains('@') { e.redacted() } else { e }
        })
    }

    fn parse_raw(input: &str) -> Result<Self, ProxyUrlError> {
        let input = input.trim();
        let (scheme, rest) = match input.split_once("://") {
            Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
            None => ("http".to_owned(), input),
        };
        let scheme = match scheme.as_str() {
            "http" => ProxyScheme::Http,
            "https" => ProxyScheme::Https,
            _ => return Err(ProxyUrlError::UnsupportedScheme(scheme)),
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        // As Python's urlsplit: the host part starts after the last '@'.
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let (host, port) = split_host_port(hostport)?;
        if host.is_empty() {
            return Err(ProxyUrlError::MissingHost);
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        if !crate::hostport::valid_hostname(host) {
            return Err(ProxyUrlError::InvalidHost(host.to_owned()));
        }
        let credentials = userinfo.and_then(|info| {
            let (user, pass) = info.split_once(':')?;
            (!user.is_empty() && !pass.is_empty()).then(|| format!("{user}:{pass}"))
        });
        Ok(Self {
            scheme,
            host: host.to_ascii_lowercase(),
            port: port.unwrap_or(DEFAULT_PORT),
            credentials,
        })
    }

    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// The value of the `Proxy-Authorization` header, if the URL carries credentials.
    pub fn authorization(&self) -> Option<String> {
        use base64::Engine as _;
        self.credentials
            .as_ref()
            .map(|c| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(c)))
    }

    /// `host:port` with IPv6 literals bracketed, for connecting and for logs.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn split_host_port(hostport: &str) -> Result<(&str, Option<u16>), ProxyUrlError> {
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or(ProxyUrlError::UnclosedBracket)?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(ProxyUrlError::InvalidHost(host.to_owned()));
        }
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| ProxyUrlError::InvalidPort(after.to_owned()))?,
            ),
        };
        (host, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        }
    };
    let port = match port {
        // "host:" means the default port, as in urlsplit.
        None | Some("") => None,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(ProxyUrlError::InvalidPort(p.to_owned())),
            Ok(n) => Some(n),
        },
    };
    Ok((host, port))
}

/// Never print credentials: Debug and Display show the URL with the password redacted.
impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            ProxyScheme::Http => "http",
            ProxyScheme::Https => "https",
        };
        match &self.credentials {
            Some(c) => {
                let user = c.split_once(':').map_or("", |(u, _)| u);
                write!(f, "{scheme}://{user}:***@{}", self.authority())
            }
            None => write!(f, "{scheme}://{}", self.authority()),
        }
    }
}

/// An upstream proxy setting as Synapse reads `https_proxy`: a proxy URL, or blank for none (the
/// connections it would carry go direct); or several, separated by spaces (a list in TOML),
/// tried in order: the first that can be reached carries the connection. Shown redacted;
/// serialized whole, for layering the configuration sources only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxySetting(pub Vec<ProxyUrl>);

/// Proxies in one list.
pub const MAX_PROXIES: usize = 8;

impl ProxySetting {
    /// The first proxy, if any.
    pub fn url(&self) -> Option<&ProxyUrl> {
        self.0.first()
    }

    pub fn urls(&self) -> &[ProxyUrl] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::str::FromStr for ProxySetting {
    type Err = ProxyUrlError;
    fn from_str(s: &str) -> Result<Self, ProxyUrlError> {
        // A new proxy starts at a scheme: a word without one belongs to the URL before it (a
        // password may hold a space, as Synapse takes credentials verbatim).
        let mut parts: Vec<String> = Vec::new();
        for word in s.split_whitespace() {
            match parts.last_mut() {
                Some(last) if !word.contains("://") => {
                    last.push(' ');
                    last.push_str(word);
                }
                _ => parts.push(word.to_owned()),
            }
        }
        let credentials = s.contains('@');
        let urls = parts
            .iter()
            .map(|part| ProxyUrl::parse(part).map_err(|e| if credentials { e.redacted() } else { e }))
            .collect::<Result<Vec<_>, _>>()?;
        if urls.len() > MAX_PROXIES {
            return Err(ProxyUrlError::TooMany(urls.len()));
        }
        Ok(Self(urls))
    }
}

impl fmt::Display for ProxySetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&urls.join(" "))
    }
}

impl serde::Serialize for ProxySetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let urls: Vec<String> = self.0.iter().map(ProxyUrl::secret_text).collect();
        s.serialize_str(&urls.join(" "))
    }
}

impl<'de> serde::Deserialize<'de> for ProxySetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Text {
            One(String),
            List(Vec<String>),
        }
        let text = match Text::deserialize(d)? {
            Text::One(text) => text,
            Text::List(urls) => {
                if urls.iter().any(|u| u.split_whitespace().count() != 1) {
                    return Err(serde::de::Error::custom("each list entry must be one proxy URL"));
                }
                urls.join(" ")
            }
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl ProxyUrl {
    /// The whole URL, password included: only for passing the setting between configuration
    /// layers, never for output.
    pub(crate) fn secret_text(&self) -> String {
        let scheme = match self.scheme {
            ProxyScheme::Http => "http",
            ProxyScheme::Https => "https",
        };
        match &self.credentials {
            Some(c) => format!("{scheme}://{c}@{}", self.authority()),
            None => format!("{scheme}://{}", self.authority()),
        }
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_synapse() {
        // input, scheme, host, port, Proxy-Authorization credentials
        let cases: &[(&str, ProxyScheme, &str, u16, Option<&str>)] = &[
            ("proxy.example", ProxyScheme::Http, "proxy.example", 1080, None),
            (
                "proxy.example:3128",
                ProxyScheme::Http,
                "proxy.example",
                3128,
                None,
            ),
            (
                "http://proxy.example",
                ProxyScheme::Http,
                "proxy.example",
                1080,
                None,
            ),
            (
                "https://proxy.example",
                ProxyScheme::Https,
                "proxy.example",
                1080,
                None,
            ),
            (
                "HTTPS://Proxy.Example:443/",
                ProxyScheme::Https,
                "proxy.example",
                443,
                None,
            ),
            (
                "http://u:p@proxy:3128",
                ProxyScheme::Http,
                "proxy",
                3128,
                Some("u:p"),
            ),
            ("u:p@proxy", ProxyScheme::Http, "proxy", 1080, Some("u:p")),
            (
                "http://u:p@ss@proxy:3128",
                ProxyScheme::Http,
                "proxy",
                3128,
                Some("u:p@ss"),
            ),
            (
                "http://u:p%40ss@proxy",
                ProxyScheme::Http,
                "proxy",
                1080,
                Some("u:p%40ss"),
            ),
            ("http://u:@proxy", ProxyScheme::Http, "proxy", 1080, None),
            ("http://:p@proxy", ProxyScheme::Http, "proxy", 1080, None),
            ("http://user@proxy", ProxyScheme::Http, "proxy", 1080, None),
            ("http://[::1]:3128", ProxyScheme::Http, "::1", 3128, None),
            ("[2001:db8::5]", ProxyScheme::Http, "2001:db8::5", 1080, None),
            (
                "10.0.0.1:8080/some/path?x",
                ProxyScheme::Http,
                "10.0.0.1",
                8080,
                None,
            ),
            ("http://proxy:", ProxyScheme::Http, "proxy", 1080, None),
            ("  http://proxy:1  ", ProxyScheme::Http, "proxy", 1, None),
        ];
        for (input, scheme, host, port, creds) in cases {
            let url = ProxyUrl::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(url.scheme, *scheme, "{input}");
            assert_eq!(url.host, *host, "{input}");
            assert_eq!(url.port, *port, "{input}");
            assert_eq!(url.credentials.as_deref(), *creds, "{input}");
        }
    }

    #[test]
    fn refuses_bad_urls() {
        let cases: &[(&str, ProxyUrlError)] = &[
            (
                "socks5://proxy:1080",
                ProxyUrlError::UnsupportedScheme("socks5".into()),
            ),
            (
                "socks5h://proxy",
                ProxyUrlError::UnsupportedScheme("socks5h".into()),
            ),
            ("ftp://proxy", ProxyUrlError::UnsupportedScheme("ftp".into())),
            ("http://", ProxyUrlError::MissingHost),
            ("http://u:p@:3128", ProxyUrlError::MissingHost),
            ("", ProxyUrlError::MissingHost),
            ("http://proxy:99999", ProxyUrlError::InvalidPort("99999".into())),
            ("http://proxy:0", ProxyUrlError::InvalidPort("0".into())),
            ("http://proxy:abc", ProxyUrlError::InvalidPort("abc".into())),
            ("http://[::1", ProxyUrlError::UnclosedBracket),
            ("http://[::1]x", ProxyUrlError::InvalidPort("x".into())),
            ("http://a b:3128", ProxyUrlError::InvalidHost("a b".into())),
            (
                "https://u01>db8::1]:8443",
                ProxyUrlError::InvalidHost("u01>db8::1]".into()),
            ),
            ("http://[not-v6]:1", ProxyUrlError::InvalidHost("not-v6".into())),
        ];
        for (input, expected) in cases {
            assert_eq!(ProxyUrl::parse(input).as_ref(), Err(expected), "{input}");
        }
    }

    #[test]
    fn errors_never_echo_parts_of_credentials() {
        for input in [
            "http://user:pa/ss@proxy:3128",
            "http://user:p#ss@proxy",
            "http://u:p?x@proxy:99999",
            "u:pw@[::1",
        ] {
            let error = ProxyUrl::parse(input).unwrap_err().to_string();
            for fragment in ["pa", "ss", "p#", "x@", "pw"] {
                assert!(
                    !error.contains(fragment) || !input.contains(fragment),
                    "{input}: {error}"
                );
            }
        }
        assert_eq!(
            ProxyUrl::parse("http://user:pa/ss@proxy").unwrap_err(),
            ProxyUrlError::InvalidPort("(not shown: the URL contains credentials)".into())
        );
    }

    #[test]
    fn authorization_is_basic_base64() {
        let url = ProxyUrl::parse("http://alice:s3cret@proxy:3128").unwrap();
        assert_eq!(url.authorization().as_deref(), Some("Basic YWxpY2U6czNjcmV0"));
        assert_eq!(ProxyUrl::parse("proxy").unwrap().authorization(), None);
    }

    #[test]
    fn display_and_debug_redact_password() {
        let url = ProxyUrl::parse("https://alice:s3cret@[::1]:3129").unwrap();
        assert_eq!(url.to_string(), "https://alice:***@[::1]:3129");
        assert!(!format!("{url:?}").contains("s3cret"));
    }
}

#[cfg(test)]
mod list_tests {
    use super::*;

    #[test]
    fn a_setting_holds_a_list_tried_in_order() {
        // A password may hold a space: a proxy starts at a scheme.
        let spaced: ProxySetting = "http://alice:hunter 2@proxy:3128".parse().unwrap();
        assert_eq!(spaced.urls().len(), 1);
        assert_eq!(spaced.urls()[0].host, "proxy");
        // An error about any part of a setting with credentials shows none of it.
        let error = "http://alice:hunter http://bob:pw/x@p:99999"
            .parse::<ProxySetting>()
            .unwrap_err();
        assert!(
            !error.to_string().contains("hunter") && !error.to_string().contains("pw"),
            "{error}"
        );
        let list: ProxySetting = " http://u:pw@a:3128  https://b:443 ".parse().unwrap();
        let hosts: Vec<&str> = list.urls().iter().map(|u| u.host.as_str()).collect();
        assert_eq!(hosts, ["a", "b"]);
        assert_eq!(list.url().unwrap().host, "a");
        assert_eq!(list.to_string(), "http://u:***@a:3128 https://b:443");
        let blank: ProxySetting = "  ".parse().unwrap();
        assert!(blank.is_empty() && blank.url().is_none());
        let too_many = (0..9)
            .map(|i| format!("http://p{i}:1"))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(too_many.parse::<ProxySetting>(), Err(ProxyUrlError::TooMany(9)));

        // TOML: a string as Synapse writes it, or a list; the list's entries are one URL each.
        #[derive(serde::Deserialize)]
        struct File {
            https_proxy: ProxySetting,
        }
        let read = |text: &str| toml::from_str::<File>(text).map(|f| f.https_proxy);
        assert_eq!(
            read("https_proxy = \"http://a:1 http://b:2\"")
                .unwrap()
                .urls()
                .len(),
            2
        );
        assert_eq!(
            read("https_proxy = [\"http://a:1\", \"http://b:2\"]")
                .unwrap()
                .urls()
                .len(),
            2
        );
        let error = read("https_proxy = [\"http://a:1 http://b:2\"]")
            .unwrap_err()
            .to_string();
        assert!(error.contains("one proxy URL"), "{error}");
    }
}
