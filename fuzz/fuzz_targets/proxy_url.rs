//! `ProxyUrl::parse` on arbitrary strings: no panic, and what it accepts is usable.
//!
//! The parser refuses hosts that are neither host names nor IP literals, so every accepted URL
//! must survive the round trip through its displayed form.

#![no_main]

use egress_user::fuzzing::ProxyUrl;
use egress_user::fuzzing::valid_hostname;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(url) = ProxyUrl::parse(input) else {
        return;
    };
    assert!(!url.host.is_empty());
    assert_eq!(url.host, url.host.to_ascii_lowercase());
    assert_ne!(url.port, 0);
    let shown = url.to_string();
    assert_eq!(format!("{url:?}"), format!("ProxyUrl({shown})"));
    assert_eq!(url.has_credentials(), url.authorization().is_some());
    assert_eq!(url.has_credentials(), shown.contains(":***@"), "{shown}");
    assert!(url.authority().ends_with(&format!(":{}", url.port)));
    assert!(valid_hostname(&url.host), "accepted invalid host {:?}", url.host);
    // The displayed form (password redacted) parses back to the same proxy.
    let again = ProxyUrl::parse(&shown).unwrap_or_else(|e| panic!("{shown:?}: {e}"));
    assert_eq!(
        (again.scheme, &again.host, again.port),
        (url.scheme, &url.host, url.port),
        "{shown:?}"
    );
});
