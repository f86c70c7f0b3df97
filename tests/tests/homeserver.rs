//! A real Synapse (from PyPI, SQLite) in the intercepted cgroup, with no proxy configuration of
//! its own: its URL previews reach a TLS origin only through egress and squid, and a preview of
//! an address egress blacklists fails without a packet reaching it, although Synapse's own
//! url_preview_ip_range_blacklist lets it through.

use egress_testbed::{
    ORIGIN_IP, ORIGIN_IP_2, ORIGIN_NAME, Testbed, narrow_whitelist_args,
    peers::{
        PREVIEW_TITLE,
        synapse::{Synapse, client_get, query_encode},
    },
};

fn preview(bed: &Testbed, token: &str, url: &str) -> (u16, String) {
    let path = format!("/_matrix/client/v1/media/preview_url?url={}", query_encode(url));
    client_get(bed, &path, Some(token)).expect("preview request")
}

#[test]
fn synapse_previews_go_through_squid_and_blacklisted_addresses_never_see_a_packet() {
    let hosts = format!("{ORIGIN_IP} {ORIGIN_NAME}\n{ORIGIN_IP_2} blocked.test\n");
    let mut bed = Testbed::builder()
        .squid()
        .nginx()
        .dns(&hosts, &[])
        .build()
        .expect("testbed");
    // Only the proxy and the origin's first address are whitelisted; ORIGIN_IP_2 stays in the
    // default blacklist (10.0.0.0/8).
    let proxy = bed.proxy_url(egress_testbed::PROXY_PASSWORD);
    let mut args = vec!["--https-proxy", &proxy, "--http-proxy", &proxy];
    let whitelist = narrow_whitelist_args();
    args.extend(whitelist.iter().map(String::as_str));
    bed.start_agent(&args).expect("agent");

    // Synapse's own preview blacklist opened up (it must be set for previews to work): egress
    // is what has to block.
    let synapse = Synapse::start(
        &bed,
        "url_preview_enabled: true\nurl_preview_ip_range_blacklist: ['192.0.2.0/24']\n",
    )
    .expect("synapse");
    let token = synapse
        .register_and_login(&bed, "alice", "correct-horse-battery")
        .expect("login");

    let (status, body) = preview(&bed, &token, &format!("https://{ORIGIN_NAME}/preview.html?run=1"));
    assert_eq!(status, 200, "{body}\n{}", synapse.log());
    // Synapse's preview: the Open Graph data it read off the page the origin served.
    let answer: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert_eq!(answer["og:title"], PREVIEW_TITLE, "{body}");

    let (status, body) = preview(&bed, &token, "https://blocked.test/preview.html?run=2");
    assert_ne!(status, 200, "{body}");
    assert!(!body.contains(PREVIEW_TITLE), "{body}");

    // Synapse pools its connections: stopping it closes the tunnel, and squid logs a CONNECT
    // only when the tunnel closes.
    synapse.stop().expect("stopping Synapse");
    let log = bed.squid_logged("CONNECT origin.test:443").unwrap();
    assert!(
        log.contains("TCP_TUNNEL/200") && log.contains("CONNECT origin.test:443"),
        "{log}"
    );
    assert!(
        !log.contains("blocked.test") && !log.contains(ORIGIN_IP_2),
        "{log}"
    );
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0, "a packet went direct");
    assert!(
        bed.agent().counter("deny_blacklist").unwrap() >= 1,
        "{}",
        bed.agent().log()
    );
    let origin_log = bed.origin_access_log();
    assert!(origin_log.contains("GET /preview.html?run=1"), "{origin_log}");
    assert!(!origin_log.contains("run=2"), "{origin_log}");
}
