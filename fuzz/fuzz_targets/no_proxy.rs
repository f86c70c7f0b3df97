//! The no_proxy parser on arbitrary strings: no panic; every accepted entry displays in the
//! admin's notation and parses back to itself; matching never panics.

#![no_main]

use egress_user::fuzzing::NoProxy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(no_proxy) = NoProxy::parse_env(input) else {
        return;
    };
    for entry in no_proxy.entries() {
        let shown = entry.to_string();
        let again = NoProxy::parse_list([shown.as_str()]).unwrap_or_else(|e| panic!("{shown}: {e}"));
        assert_eq!(again.entries(), std::slice::from_ref(entry), "{shown}");
    }
    let ip = std::net::IpAddr::from([10, 1, 2, 3]);
    let _ = no_proxy.matches(ip, 443, Some("a.example"));
    let _ = no_proxy.kernel_bypass_nets();
});
