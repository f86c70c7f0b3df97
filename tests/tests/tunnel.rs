//! Foundation: connections from the intercepted cgroup, made with no proxy settings at all,
//! reach the origin only through squid; failures reset the client; a stopped agent fails closed.
//!
//! Root only: real namespaces, squid, nginx, cgroup eBPF programs.

use std::time::Duration;

use egress_testbed::{HS_IP, ORIGIN_IP, ORIGIN_NAME, PROXY_IP, PROXY_USER, Testbed};

#[test]
fn tls_on_443_and_8448_goes_through_squid_with_credentials() {
    let mut bed = Testbed::standard();
    bed.start_agent_with(&["--kernel-log", "--connect-by-ip"])
        .unwrap();

    for port in [443u16, 8448] {
        let url = format!("https://{ORIGIN_NAME}:{port}/");
        let result = bed.curl(&url).unwrap();
        assert_eq!(
            result.code,
            Some(0),
            "curl {url}: {result:?}\nagent log:\n{}",
            bed.agent().log()
        );
        assert_eq!(result.stdout, format!("origin ok {port}\n"));

        // squid writes the CONNECT line when the tunnel closes.
        let needle = format!("CONNECT {ORIGIN_IP}:{port} {PROXY_USER} ");
        let squid_log = bed.squid_logged(&needle).unwrap();
        assert!(
            squid_log.contains(&needle),
            "squid log lacks `{needle}`:\n{squid_log}"
        );
        assert!(squid_log.contains("TCP_TUNNEL/200"), "{squid_log}");
    }

    let origin_log = bed
        .wait_origin_log("two requests", |l| l.lines().count() >= 2)
        .unwrap();
    let lines: Vec<&str> = origin_log.lines().collect();
    assert_eq!(lines.len(), 2, "origin log: {origin_log}");
    for line in lines {
        assert!(
            line.starts_with(&format!("{PROXY_IP} ")),
            "origin saw a peer other than the proxy: {line}"
        );
    }
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        0,
        "packets went direct to the origin"
    );

    let line = bed
        .agent()
        .wait_decision(&[("original_dst", &format!("{ORIGIN_IP}:443"))])
        .unwrap();
    assert_eq!(
        (line.get("route"), line.get("status")),
        ("proxy-connect".into(), "200".into()),
        "{line}"
    );
}

#[test]
fn many_concurrent_connections_each_reach_their_own_destination() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    // 40 parallel fetches alternating ports: a mixed-up original destination would answer
    // with the other port's body.
    let script = format!(
        "for i in $(seq 1 40); do p=$([ $((i % 2)) -eq 0 ] && echo 443 || echo 8448); \
         (out=$(curl -sS --noproxy '*' --max-time 20 --cacert {ca} --resolve {ORIGIN_NAME}:$p:{ORIGIN_IP} \
         https://{ORIGIN_NAME}:$p/); echo \"$out want=$p\") & done; wait",
        ca = bed.certs.ca.display()
    );
    let result = bed.run_in_cgroup("sh", &["-c", &script]).unwrap();
    let lines: Vec<&str> = result.stdout.lines().filter(|l| l.contains("want=")).collect();
    assert_eq!(lines.len(), 40, "{result:?}");
    for line in lines {
        let want = line.rsplit("want=").next().unwrap();
        assert!(
            line.starts_with(&format!("origin ok {want} ")),
            "wrong destination: {line}"
        );
    }
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

#[test]
fn wrong_proxy_credentials_reset_the_client_and_log_407() {
    let mut bed = Testbed::standard();
    let url = bed.proxy_url("wrong-password");
    bed.start_agent(&["--https-proxy", &url, "--ip-range-whitelist", egress_testbed::LAN])
        .unwrap();

    let result = bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap();
    assert_ne!(result.code, Some(0), "{result:?}");
    assert!(
        result.stderr.contains("reset by peer") || result.stderr.contains("Connection reset"),
        "client should see a reset: {result:?}"
    );
    let line = bed.agent().wait_decision(&[("status", &"407")]).unwrap();
    assert_eq!(line.get("outcome"), "error", "{line}");
    assert!(
        line.get("error").contains("407 Proxy Authentication Required"),
        "{line}"
    );
    assert!(bed.squid_access_log().contains("TCP_DENIED/407"));
    assert_eq!(bed.origin_access_log(), "");
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

#[test]
fn unreachable_proxy_resets_the_client_promptly() {
    // No peers: nothing listens on the proxy host, and nothing may reach the origin host.
    let mut bed = Testbed::builder().build().unwrap();
    // Nothing listens on port 9 of the proxy host: connection refused.
    let url = format!("http://{PROXY_IP}:9");
    bed.start_agent(&["--https-proxy", &url, "--ip-range-whitelist", egress_testbed::LAN])
        .unwrap();
    let started = std::time::Instant::now();
    let result = bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap();
    assert_ne!(result.code, Some(0), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "reset took {:?}",
        started.elapsed()
    );
    let line = bed
        .agent()
        .wait_line("the refused proxy's decision", |l| {
            l.is_decision() && l.get("error").contains("connecting to proxy")
        })
        .unwrap();
    assert!(line.get("error").contains("refused"), "{line}");
    assert_eq!(line.get("outcome"), "error", "{line}");
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

#[test]
fn stopped_or_killed_agent_fails_closed_and_a_new_one_takes_over() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0)
    );

    bed.stop_agent();
    // Refused in the kernel: no egress listener is there to take the connection.
    assert_eq!(
        bed.tcp_connect(ORIGIN_IP, 443).unwrap(),
        "EPERM",
        "connect must be refused while the agent is down"
    );
    assert_ne!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0)
    );

    bed.start_default_agent().unwrap();
    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0),
        "{}",
        bed.agent().log()
    );

    bed.kill_agent();
    assert_eq!(
        bed.tcp_connect(ORIGIN_IP, 8448).unwrap(),
        "EPERM",
        "after a crash"
    );

    bed.start_default_agent().unwrap();
    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}:8448/")).unwrap().code,
        Some(0),
        "{}",
        bed.agent().log()
    );

    // Only the proxy ever talked to the origin.
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        0,
        "a connection went direct"
    );
    assert!(!bed.origin_access_log().contains(HS_IP));

    // A deliberate detach removes the interception: now the client really goes direct.
    bed.stop_agent();
    let detach = bed
        .egress(&["detach", "--bpffs-dir", &bed.pin_dir.to_string_lossy()])
        .unwrap();
    assert_eq!(detach.code, Some(0), "{detach:?}");
    assert!(!bed.pin_dir.exists());
    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0)
    );
    let origin = bed.origin_logged(HS_IP).unwrap();
    assert!(origin.contains(&format!("{HS_IP} 443")), "{origin}");
    assert!(bed.direct_packets_at_origin().unwrap() > 0);
}

#[test]
fn loopback_connections_are_never_intercepted() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    // A server on the homeserver host's loopback (think Redis, Postgres, workers), reached from
    // the cgroup: must connect directly, not via the agent.
    let script = "python3 -m http.server 18080 --bind 127.0.0.1 >/dev/null 2>&1 & \
                  for i in $(seq 1 50); do curl -s -o /dev/null http://127.0.0.1:18080/ && break; sleep 0.1; done; \
                  curl -sS -o /dev/null -w '%{http_code}' http://127.0.0.1:18080/; kill %1";
    let result = bed.run_in_cgroup("sh", &["-c", script]).unwrap();
    assert_eq!(result.stdout, "200", "{result:?}");
    let loopback = bed.agent().counter("pass_loopback").unwrap();
    assert!(loopback >= 2, "{loopback}");
    assert_eq!(bed.agent().counter("redirected").unwrap(), 0);
}
