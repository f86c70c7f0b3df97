//! `sniff` on arbitrary bytes, seeded with HTTP/1 request heads, and on the bytes put where a
//! Host header's value and an absolute-form target's authority go.

#![no_main]

#[path = "../common/sniff_check.rs"]
mod sniff_check;

use libfuzzer_sys::fuzz_target;

use sniff_check::check;

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut host = b"GET / HTTP/1.1\r\nHost: ".to_vec();
    host.extend_from_slice(data);
    host.extend_from_slice(b"\r\n\r\n");
    check(&host);
    let mut target = b"GET http://".to_vec();
    target.extend_from_slice(data);
    target.extend_from_slice(b"/ HTTP/1.1\r\n\r\n");
    check(&target);
});
