//! The properties every sniff fuzz target checks on each input.

use std::net::IpAddr;

use egress_user::fuzzing::{MAX_SNIFF_BYTES, Sniff, Sniffed, sniff, valid_hostname};

/// What holds for any input: names safe for a CONNECT line, NeedMore only below the limit, and
/// an answer on a prefix never changed by more bytes.
pub fn check(data: &[u8]) {
    let answer = sniff(data);
    match &answer {
        Sniff::NeedMore => assert!(data.len() < MAX_SNIFF_BYTES),
        Sniff::Done(Sniffed::Tls { sni: Some(name) }) => {
            assert!(valid_hostname(name), "{name:?}");
            assert!(name.parse::<IpAddr>().is_err(), "IP literal in SNI: {name:?}");
            assert_connect_safe(name);
        }
        Sniff::Done(Sniffed::Http {
            host: Some(host),
            port,
        }) => {
            assert!(valid_hostname(host), "{host:?}");
            assert!(!host.contains(':') || host.parse::<IpAddr>().is_ok(), "{host:?}");
            assert_ne!(*port, Some(0));
            assert_connect_safe(host);
        }
        Sniff::Done(Sniffed::Http { host: None, port }) => assert_eq!(*port, None),
        Sniff::Done(_) => {}
    }
    let len = data.len();
    for cut in [1, 5, 9, len / 4, len / 2, len - len / 4, len.saturating_sub(1)] {
        if cut < len
            && let Sniff::Done(early) = sniff(&data[..cut])
        {
            assert_eq!(
                answer,
                Sniff::Done(early),
                "answer for the first {cut} bytes changed"
            );
        }
    }
}

fn assert_connect_safe(name: &str) {
    assert!(!name.is_empty() && !name.ends_with('.'), "{name:?}");
    assert!(
        name.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.:".contains(&b)),
        "{name:?}"
    );
}
