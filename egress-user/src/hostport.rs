//! Host names and `host:port` text in one place: what a valid host is, the destination an admin
//! types into `egress explain`, and the authority egress sends upstream (a CONNECT target or the
//! authority of an absolute-form URI). IPv6 literals are bracketed wherever a port follows.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Result, bail};

/// Whether `name` is acceptable as a host in a CONNECT line / absolute URI: DNS name (letters,
/// digits, '-', '_', '.', labels 1..=63, total <= 253, optional trailing dot stripped by
/// callers) or an IP literal.
///
/// IP literals are dotted-quad IPv4 and IPv6 without brackets or zone. A DNS name whose last
/// label starts with a digit is refused: resolvers read `1.2.3`, `127.1` or `0x7f.1` as IPv4
/// addresses (`inet_aton`), and no top-level domain starts with a digit.
pub fn valid_hostname(name: &str) -> bool {
    if name.parse::<Ipv4Addr>().is_ok() || name.parse::<Ipv6Addr>().is_ok() {
        return true;
    }
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels_ok = name.split('.').all(|label| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    let last_label_numeric = name
        .rsplit('.')
        .next()
        .and_then(|label| label.bytes().next())
        .is_some_and(|b| b.is_ascii_digit());
    labels_ok && !last_label_numeric
}

/// A destination as an admin writes it: `host:port`, `[v6]:port`, `ip:port`, or a bare host or
/// address (port 443). Names come back lower case.
pub fn parse_destination(dest: &str) -> Result<(String, u16)> {
    if dest.contains('@') {
        bail!(
            "{}: a destination has no user information; expected HOST[:PORT], IP[:PORT] or [IPv6]:PORT",
            crate::redact::redact_credentials(dest)
        );
    }
    if let Ok(addr) = dest.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    if let Ok(ip) = dest
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok((ip.to_string(), 443));
    }
    let (host, port) = match dest.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .map_err(|_| anyhow::anyhow!("{dest}: the port is not a number from 1 to 65535"))?,
        ),
        None => (dest, 443),
    };
    if !valid_hostname(host) || port == 0 {
        bail!("{dest}: expected HOST[:PORT], IP[:PORT] or [IPv6]:PORT");
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// `host:port` for CONNECT: the name when given, else the destination's address; IPv6
/// bracketed.
pub fn connect_target(name: Option<&str>, dst: SocketAddr) -> String {
    match name {
        Some(host) => format!("{}:{}", bracketed(host), dst.port()),
        None => dst.to_string(),
    }
}

/// The authority of an absolute-form URI (`http://authority/...`): the name when given, else the
/// destination's address, with the port unless it is 80.
pub fn absolute_authority(name: Option<&str>, dst: SocketAddr) -> String {
    let host = name.map_or_else(|| dst.ip().to_string(), str::to_owned);
    match dst.port() {
        80 => bracketed(&host),
        port => format!("{}:{port}", bracketed(&host)),
    }
}

fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connect_targets() {
        let cases: &[(Option<&str>, &str, &str)] = &[
            (Some("matrix.example"), "10.1.2.3:8448", "matrix.example:8448"),
            (None, "10.1.2.3:8448", "10.1.2.3:8448"),
            (None, "[2001:db8::1]:8448", "[2001:db8::1]:8448"),
            (Some("2001:db8::2"), "[2001:db8::1]:8448", "[2001:db8::2]:8448"),
        ];
        for &(name, dst, expected) in cases {
            assert_eq!(connect_target(name, addr(dst)), expected, "{name:?} {dst}");
        }
    }

    #[test]
    fn absolute_authorities() {
        let cases: &[(Option<&str>, &str, &str)] = &[
            (Some("origin.test"), "10.0.0.1:80", "origin.test"),
            (Some("origin.test"), "10.0.0.1:8080", "origin.test:8080"),
            (None, "10.0.0.1:80", "10.0.0.1"),
            (None, "[2001:db8::1]:8080", "[2001:db8::1]:8080"),
            (Some("2001:db8::2"), "[2001:db8::1]:80", "[2001:db8::2]"),
        ];
        for &(name, dst, expected) in cases {
            assert_eq!(absolute_authority(name, addr(dst)), expected, "{name:?} {dst}");
        }
    }

    #[test]
    fn destinations_parse() {
        let cases = [
            ("matrix.org:8448", ("matrix.org", 8448)),
            ("Matrix.Org", ("matrix.org", 443)),
            ("10.1.2.3:443", ("10.1.2.3", 443)),
            ("[2001:db8::1]:8448", ("2001:db8::1", 8448)),
            ("2001:db8::1", ("2001:db8::1", 443)),
        ];
        for (input, (host, port)) in cases {
            assert_eq!(
                parse_destination(input).unwrap(),
                (host.to_owned(), port),
                "{input}"
            );
        }
        for bad in ["a b:1", "host:99999", "host:0", ":443", "host:x"] {
            assert!(parse_destination(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hostnames() {
        let label63 = "a".repeat(63);
        let name253 = format!("{label63}.{label63}.{label63}.{}", "b".repeat(61));
        let name254 = format!("{name253}c");
        let label64 = "a".repeat(64);
        let cases: &[(&str, bool)] = &[
            ("example.org", true),
            ("EXAMPLE.org", true),
            ("a", true),
            ("localhost", true),
            ("_matrix._tcp.example.org", true),
            ("-x.example", true),
            ("x-.example", true),
            ("xn--bcher-kva.example", true),
            ("1password.com", true),
            ("a.b2", true),
            ("123.example", true),
            (&label63, true),
            (&name253, true),
            ("192.0.2.1", true),
            ("0.0.0.0", true),
            ("::1", true),
            ("2001:db8::1", true),
            ("::ffff:192.0.2.1", true),
            ("", false),
            (".", false),
            ("example.org.", false),
            (".example.org", false),
            ("a..b", false),
            (&label64, false),
            (&name254, false),
            ("a b", false),
            ("a\tb", false),
            ("a.com\r\nX: y", false),
            ("a.com\n", false),
            ("a.com\0", false),
            ("a.com:443", false),
            ("a.com/x", false),
            ("user@a.com", false),
            ("a*b.com", false),
            ("a%20b", false),
            ("b\u{fc}cher.example", false),
            ("[::1]", false),
            ("fe80::1%eth0", false),
            ("::1:", false),
            ("1.2.3", false),
            ("127.1", false),
            ("2130706433", false),
            ("0x7f.1", false),
            ("0x7f000001", false),
            ("01.2.3.4", false),
            ("256.1.1.1", false),
            ("1.2.3.4.5", false),
            ("a.1b", false),
        ];
        for (name, expected) in cases {
            assert_eq!(valid_hostname(name), *expected, "{name:?}");
        }
    }
}
