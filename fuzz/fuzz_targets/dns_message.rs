//! A DNS message, arbitrary bytes, as the kernel hands them over from an application's socket
//! (or a forger's packet): the record and synthetic DNS never panic, and a synthetic reply is a
//! DNS message answering the same id.

#![no_main]

use egress_user::fuzzing::dns_message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Some(reply) = dns_message(bytes) {
        assert!(reply.len() >= 12, "a reply has a header");
        assert_eq!(reply[..2], bytes[..2], "the reply answers the query's id");
    }
});
