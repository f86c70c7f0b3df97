//! The upstream proxy's answer to CONNECT, arbitrary bytes followed by the proxy closing: the
//! exchange never panics or hangs, succeeds only on a 2xx status line, and then hands back
//! exactly the bytes after the head.

#![no_main]

use std::time::Duration;

use egress_user::fuzzing::{connect_exchange, Bytes, UpstreamError};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|answer: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    runtime.block_on(async {
        let (agent_side, mut proxy_side) = tokio::io::duplex(1 << 20);
        let sent = answer.to_vec();
        let proxy = tokio::spawn(async move {
            let mut request = vec![0u8; 4096];
            let _ = proxy_side.read(&mut request).await;
            let _ = proxy_side.write_all(&sent).await;
            let _ = proxy_side.shutdown().await;
        });
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            // A ClientHello sent ahead of the answer (optimistic CONNECT): whatever the answer,
            // the exchange behaves the same.
            connect_exchange(
                agent_side,
                "matrix.example:8448",
                Some("Basic dTpw"),
                Bytes::from_static(b"\x16\x03\x01\x00\x05hello"),
            ),
        )
        .await;
        proxy.abort();
        match result {
            Err(_elapsed) => panic!("the exchange hung on a closed connection"),
            Ok(Ok((_stream, early))) => {
                // Empty lines before a status line and 1xx interim answers are skipped (RFC 9112,
                // 9110), so the 2xx status line need not come first; but it must be there.
                let text = String::from_utf8_lossy(answer);
                let has_2xx = text.split('\n').any(|line| {
                    line.starts_with("HTTP/1.") && line.as_bytes().get(9) == Some(&b'2')
                });
                assert!(has_2xx, "accepted without a 2xx status line: {text:?}");
                assert!(answer.ends_with(&early), "early data is a suffix of the answer");
            }
            Ok(Err(UpstreamError::Status(status))) => assert!(!status.is_success()),
            Ok(Err(_)) => {}
        }
    });
});
