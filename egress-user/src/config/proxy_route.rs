//! `proxy_routes`: per-destination proxy choices, one string each:
//! `DESTINATIONS -> PROXIES` or `DESTINATIONS -> direct`, where the destinations are written as
//! no_proxy entries (host names with their subdomains, IPs, CIDR ranges, `host:port`) and the
//! proxies as `https_proxy` (several, tried in order). For example
//! `partner.example 10.20.0.0/16 -> http://partner-proxy.corp:8080`.

use std::fmt;

use super::proxy_url::{ProxySetting, ProxyUrl};
use crate::route::{
    plan::{Route, Via},
    policy::NoProxy,
};

/// A route as configured: its proxies are URLs.
pub type ProxyRoute = Route<ProxySetting>;

/// Routes in one configuration.
pub const MAX_ROUTES: usize = 64;

/// Parses one route; the error names what was wrong (never a credential).
pub fn parse_route(text: &str) -> Result<ProxyRoute, String> {
    let (destinations, via) = text
        .split_once("->")
        .ok_or("expected `DESTINATIONS -> PROXIES` or `DESTINATIONS -> direct`")?;
    let destinations: Vec<&str> = destinations.split_whitespace().collect();
    if destinations.is_empty() {
        return Err("no destination before `->`".into());
    }
    let destinations = NoProxy::parse_list(destinations.iter().copied()).map_err(|e| e.to_string())?;
    let via = match via.trim() {
        "" => return Err("nothing after `->`: proxies, or `direct`".into()),
        "direct" => Via::Direct,
        proxies => Via::Proxies(
            proxies
                .parse::<ProxySetting>()
                .map_err(|e| format!("after `->`: {e}"))?,
        ),
    };
    let shown = match &via {
        Via::Direct => "direct".to_owned(),
        Via::Proxies(list) => list.to_string(),
    };
    let names: Vec<String> = destinations.entries().iter().map(ToString::to_string).collect();
    Ok(Route {
        destinations,
        via,
        text: format!("{} -> {shown}", names.join(" ")),
    })
}

/// The whole route, credentials included: for passing between configuration layers only.
fn secret_text(route: &ProxyRoute) -> String {
    let names: Vec<String> = route
        .destinations
        .entries()
        .iter()
        .map(ToString::to_string)
        .collect();
    let via = match &route.via {
        Via::Direct => "direct".to_owned(),
        Via::Proxies(list) => list
            .urls()
            .iter()
            .map(ProxyUrl::secret_text)
            .collect::<Vec<_>>()
            .join(" "),
    };
    format!("{} -> {via}", names.join(" "))
}

impl std::str::FromStr for Route<ProxySetting> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_route(s)
    }
}

impl fmt::Display for Route<ProxySetting> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl serde::Serialize for Route<ProxySetting> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&secret_text(self))
    }
}

impl<'de> serde::Deserialize<'de> for Route<ProxySetting> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        parse_route(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_hide_their_credentials() {
        let route = parse_route(
            "partner.example 10.20.0.0/16  ->  http://u:secret@partner-proxy:8080 http://p2:8080",
        )
        .unwrap();
        assert_eq!(
            route.text,
            "partner.example 10.20.0.0/16 -> http://u:***@partner-proxy:8080 http://p2:8080"
        );
        assert_eq!(route.to_string(), route.text);
        let Via::Proxies(list) = &route.via else {
            panic!("{route:?}")
        };
        assert_eq!(list.urls().len(), 2);
        assert!(secret_text(&route).contains("u:secret@"));
        assert_eq!(parse_route(&secret_text(&route)).unwrap(), route);

        let direct = parse_route("internal.example:8448 -> direct").unwrap();
        assert_eq!(direct.via, Via::Direct);

        for (text, why) in [
            (
                "partner.example http://p:8080",
                "expected `DESTINATIONS -> PROXIES`",
            ),
            (" -> direct", "no destination"),
            ("a.example ->", "nothing after"),
            ("10.0.0.0/33 -> direct", "prefix length"),
            (
                "a.example -> socks5://p:1080",
                "after `->`: unsupported proxy scheme",
            ),
            ("a.example -> http://u:pw/x@:99999", "not shown"),
        ] {
            let error = parse_route(text).unwrap_err();
            assert!(error.contains(why), "{text}: {error}");
            assert!(!error.contains("pw"), "{text}: {error}");
        }
    }
}
