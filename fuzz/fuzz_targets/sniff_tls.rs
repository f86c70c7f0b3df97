//! `sniff` on arbitrary bytes, seeded with ClientHellos, plus a framing check: the handshake
//! bytes after the first record header, framed into records of any size, must give the same
//! answer as when framed into the largest records.

#![no_main]

#[path = "../common/sniff_check.rs"]
mod sniff_check;

use egress_user::fuzzing::{MAX_SNIFF_BYTES, sniff};
use libfuzzer_sys::fuzz_target;

use sniff_check::check;

fuzz_target!(|data: &[u8]| {
    check(data);
    if let [0x16, _, _, _, size, handshake @ ..] = data
        && !handshake.is_empty()
    {
        let whole = records(handshake, 1 << 14);
        let split = records(handshake, 1 + usize::from(*size));
        if split.len() < MAX_SNIFF_BYTES {
            assert_eq!(sniff(&whole), sniff(&split), "record framing changed the answer");
        }
        check(&split);
    }
});

fn records(handshake: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(handshake.len() + handshake.len() / size * 5 + 5);
    for chunk in handshake.chunks(size) {
        out.extend_from_slice(&[0x16, 0x03, 0x03]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}
