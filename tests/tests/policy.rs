//! Policy end to end: each route with real squid and origins in namespaces. Clients in the
//! intercepted cgroup never carry proxy settings; where traffic went is read off squid's and
//! nginx's logs and the origin's packet counter.
//!
//! Root only.

use egress_testbed::{HS_IP, ORIGIN_IP, ORIGIN_NAME, PROXY_IP, PROXY_USER, Testbed};

#[test]
fn tls_is_tunnelled_by_sni_name_on_443_and_8448() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    for port in [443, 8448] {
        let result = bed.curl(&format!("https://{ORIGIN_NAME}:{port}/")).unwrap();
        assert_eq!(result.code, Some(0), "{result:?}\n{}", bed.agent().log());
        let needle = format!("CONNECT {ORIGIN_NAME}:{port} {PROXY_USER} ");
        let log = bed.squid_logged(&needle).unwrap();
        assert!(log.contains(&needle), "squid should see the SNI name:\n{log}");
    }
    for port in [443, 8448] {
        let line = bed
            .agent()
            .wait_decision(&[("original_dst", &format!("{ORIGIN_IP}:{port}"))])
            .unwrap();
        assert_eq!(
            (line.get("protocol"), line.get("name")),
            ("tls".into(), ORIGIN_NAME.into()),
            "{line}"
        );
        assert!(
            line.get("rule")
                .contains("ip_range_whitelist 10.248.0.0/24, proxy"),
            "{line}"
        );
    }
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

#[test]
fn plain_http_is_forwarded_in_absolute_form_with_keep_alive() {
    let mut bed = Testbed::standard();
    let http_proxy = bed.proxy_url(egress_testbed::PROXY_PASSWORD);
    bed.start_agent_with(&["--http-proxy", &http_proxy]).unwrap();
    // Two requests on one client connection (curl reuses it).
    let result = bed
        .curl_many(&[
            &format!("http://{ORIGIN_NAME}/a"),
            &format!("http://{ORIGIN_NAME}/b"),
        ])
        .unwrap();
    assert_eq!(result.code, Some(0), "{result:?}\n{}", bed.agent().log());
    assert_eq!(result.stdout, "origin ok 80\norigin ok 80\n");
    for path in ["a", "b"] {
        let needle = format!("GET http://{ORIGIN_NAME}/{path} {PROXY_USER} ");
        let log = bed.squid_logged(&needle).unwrap();
        assert!(
            log.contains(&needle),
            "squid should see an absolute-form GET:\n{log}"
        );
    }
    let line = bed.agent().wait_decision(&[("route", &"proxy-forward")]).unwrap();
    assert_eq!(line.number("requests"), 2, "{line}");
    let origin = bed
        .wait_origin_log("two requests", |l| l.lines().count() == 2)
        .unwrap();
    assert_eq!(origin.lines().count(), 2, "{origin}");
    assert!(origin.lines().all(|l| l.starts_with(PROXY_IP)), "{origin}");
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

#[test]
fn plain_http_without_http_proxy_goes_direct() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    let result = bed.curl(&format!("http://{ORIGIN_NAME}/")).unwrap();
    assert_eq!(result.code, Some(0), "{result:?}");
    let line = bed.agent().wait_decision(&[("route", &"direct")]).unwrap();
    assert_eq!(line.get("protocol"), "http", "{line}");
    assert_eq!(line.get("rule_kind"), "no_proxy_for_protocol", "{line}");
    let origin = bed.origin_logged(HS_IP).unwrap();
    assert!(origin.starts_with(&format!("{HS_IP} 80 ")), "{origin}");
}

#[test]
fn no_proxy_cidr_is_bypassed_in_the_kernel() {
    let mut bed = Testbed::standard();
    bed.start_agent_with(&["--no-proxy", "10.248.0.16/28"]).unwrap();
    let result = bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap();
    assert_eq!(result.code, Some(0), "{result:?}");
    let origin = bed.origin_logged(HS_IP).unwrap();
    assert!(
        origin.starts_with(&format!("{HS_IP} 443 ")),
        "should have gone direct: {origin}"
    );
    // Decided in the kernel: bypassed, and never redirected to the agent.
    assert_eq!(bed.agent().counter("pass_no_proxy").unwrap(), 1);
    assert_eq!(bed.agent().counter("redirected").unwrap(), 0);
    assert_eq!(bed.squid_access_log(), "");
}

#[test]
fn no_proxy_hostname_and_host_port_entries_go_direct_through_the_agent() {
    let mut bed = Testbed::standard();
    bed.start_agent_with(&["--no-proxy", "example.org,.Origin.Test:8448"])
        .unwrap();
    // 8448 matches origin.test:8448 -> direct; 443 does not -> proxied.
    for port in [8448, 443] {
        let result = bed.curl(&format!("https://{ORIGIN_NAME}:{port}/")).unwrap();
        assert_eq!(result.code, Some(0), "{result:?}");
    }
    bed.agent().wait_decision(&[("route", &"proxy-connect")]).unwrap();
    let direct = bed.agent().wait_decision(&[("route", &"direct")]).unwrap();
    assert_eq!(direct.get("original_dst"), "10.248.0.30:8448", "{direct}");
    assert!(
        direct.get("rule").contains("no_proxy origin.test:8448"),
        "{direct}"
    );
    let origin = bed
        .wait_origin_log("two requests", |l| l.lines().count() == 2)
        .unwrap();
    assert!(origin.contains(&format!("{HS_IP} 8448 ")), "{origin}");
    assert!(origin.contains(&format!("{PROXY_IP} 443 ")), "{origin}");
    assert!(
        bed.squid_logged("CONNECT origin.test:443")
            .unwrap()
            .contains("CONNECT origin.test:443")
    );
}

#[test]
fn blacklisted_ip_is_refused_with_eperm_and_nothing_leaves() {
    let mut bed = Testbed::standard();
    // Default blacklist (10.0.0.0/8 among others), no whitelist.
    let url = bed.proxy_url(egress_testbed::PROXY_PASSWORD);
    bed.start_agent(&["--https-proxy", &url]).unwrap();
    assert_eq!(bed.tcp_connect(ORIGIN_IP, 443).unwrap(), "EPERM");
    let result = bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap();
    assert_ne!(result.code, Some(0));
    assert_eq!(bed.agent().counter("deny_blacklist").unwrap(), 2);
    assert_eq!(bed.agent().counter("redirected").unwrap(), 0);
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
    assert_eq!(bed.origin_access_log(), "");
    assert_eq!(bed.squid_access_log(), "");
}

#[test]
fn whitelist_overrides_blacklist_for_its_range_only() {
    let mut bed = Testbed::standard();
    let url = bed.proxy_url(egress_testbed::PROXY_PASSWORD);
    bed.start_agent(&[
        "--https-proxy",
        &url,
        "--ip-range-blacklist",
        "10.0.0.0/8",
        "--ip-range-whitelist",
        &format!("{ORIGIN_IP}/32"),
    ])
    .unwrap();
    let result = bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap();
    assert_eq!(result.code, Some(0), "{result:?}");
    // Another address in the same blacklisted /8 stays denied.
    assert_eq!(bed.tcp_connect("10.248.0.31", 443).unwrap(), "EPERM");
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

#[test]
fn silent_clients_take_the_default_route() {
    let mut bed = Testbed::standard();
    bed.start_agent_with(&["--peek-timeout", "0.2"]).unwrap();
    // Connects and sends nothing: no name to learn, so CONNECT by IP through the proxy.
    assert_eq!(bed.tcp_connect(ORIGIN_IP, 8448).unwrap(), "connected");
    let log = bed.squid_logged(&format!("CONNECT {ORIGIN_IP}:8448")).unwrap();
    assert!(
        log.contains(&format!("CONNECT {ORIGIN_IP}:8448 {PROXY_USER}")),
        "{log}"
    );
    let line = bed.agent().wait_decision(&[("protocol", &"unknown")]).unwrap();
    assert_eq!(line.get("route"), "proxy-connect", "{line}");

    bed.start_agent_with(&["--peek-timeout", "0.2", "--default-route", "deny"])
        .unwrap();
    let result = bed
        .run_in_cgroup(
            "python3",
            &[
                "-c",
                &format!(
                    "import socket; s=socket.create_connection(('{ORIGIN_IP}', 8448)); \
                 s.settimeout(5); print(repr(s.recv(10)))"
                ),
            ],
        )
        .unwrap();
    assert!(result.stderr.contains("ConnectionResetError"), "{result:?}");
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}
