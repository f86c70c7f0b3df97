//! TLS to https:// proxies, IPv6 end to end, transparency (getpeername) and loop safety, several
//! cgroups coming and going. Real squid (https_port with test certificates), nginx, namespaces.
//!
//! Root only.

use std::io::{BufRead, BufReader, Write};

use egress_testbed::{
    HS_IP, LAN, LAN6, ORIGIN_IP, ORIGIN_IP6, ORIGIN_NAME, PROXY_IP, PROXY_IP6, PROXY_PASSWORD, PROXY_USER,
    SQUID_TLS_EXPIRED_PORT, SQUID_TLS_PORT, SQUID_TLS_WRONG_NAME_PORT, Testbed,
};

/// squid's TLS ports too, and nginx.
fn tls_testbed() -> Testbed {
    Testbed::builder()
        .squid_tls()
        .nginx()
        .build()
        .expect("building the test topology")
}

fn tls_proxy(port: u16) -> String {
    format!("https://{PROXY_USER}:{PROXY_PASSWORD}@{PROXY_IP}:{port}")
}

/// Runs a Python snippet in the intercepted cgroup and returns its trimmed stdout.
fn python(bed: &Testbed, code: &str) -> String {
    let result = bed.run_in_cgroup("python3", &["-c", code]).unwrap();
    assert_eq!(result.code, Some(0), "{result:?}");
    result.stdout.trim().to_owned()
}

#[test]
fn https_proxy_is_verified_against_the_ca_file_and_carries_both_protocols() {
    let mut bed = tls_testbed();
    let ca = bed.certs.ca.to_string_lossy().into_owned();
    let proxy = tls_proxy(SQUID_TLS_PORT);
    bed.start_agent(&[
        "--https-proxy",
        &proxy,
        "--http-proxy",
        &proxy,
        "--proxy-ca-file",
        &ca,
        "--ip-range-whitelist",
        LAN,
    ])
    .unwrap();

    let result = bed.curl(&format!("https://{ORIGIN_NAME}:8448/")).unwrap();
    assert_eq!(result.code, Some(0), "{result:?}\n{}", bed.agent().log());
    let result = bed.curl(&format!("http://{ORIGIN_NAME}/plain")).unwrap();
    assert_eq!(result.code, Some(0), "{result:?}\n{}", bed.agent().log());

    let squid = bed.squid_logged("GET http://origin.test/plain").unwrap();
    assert!(
        squid.contains(&format!("CONNECT {ORIGIN_NAME}:8448 {PROXY_USER}")),
        "{squid}"
    );
    assert!(
        squid.contains(&format!("GET http://{ORIGIN_NAME}/plain {PROXY_USER}")),
        "{squid}"
    );
    for decision in bed.agent().wait_decisions(2).unwrap() {
        assert_eq!(
            decision.get("upstream"),
            format!("{PROXY_IP}:{SQUID_TLS_PORT}"),
            "{decision}"
        );
    }
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

#[test]
fn failed_proxy_certificate_checks_reset_the_client_and_say_why() {
    let mut bed = tls_testbed();
    let ca = bed.certs.ca.to_string_lossy().into_owned();
    // (port, trust the test CA?, what the decision log must name)
    let cases = [
        (SQUID_TLS_PORT, false, "UnknownIssuer"),
        (SQUID_TLS_EXPIRED_PORT, true, "Expired"),
        (SQUID_TLS_WRONG_NAME_PORT, true, "certificate not valid for name"),
    ];
    for (port, trust_ca, reason) in cases {
        let proxy = tls_proxy(port);
        let mut args = vec!["--https-proxy", proxy.as_str(), "--ip-range-whitelist", LAN];
        if trust_ca {
            args.extend(["--proxy-ca-file", ca.as_str()]);
        }
        bed.start_agent(&args).unwrap();
        let result = bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap();
        assert_ne!(result.code, Some(0), "port {port}: {result:?}");
        assert!(
            result.stderr.contains("reset"),
            "port {port}: client should see a reset: {result:?}"
        );
        // This run's decision line names the failed TLS check.
        let line = bed
            .agent()
            .wait_line(&format!("a decision naming {reason}"), |l| {
                l.is_decision()
                    && l.get("error").contains("TLS with proxy")
                    && l.get("error").contains(reason)
            })
            .unwrap_or_else(|e| panic!("port {port}: {e}"));
        assert!(line.get("outcome") == "error", "port {port}: {line}");
    }
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
    assert!(!bed.squid_access_log().contains("TCP_TUNNEL"));

    // The testing-only switch accepts the wrong name, and says so loudly.
    let proxy = tls_proxy(SQUID_TLS_WRONG_NAME_PORT);
    bed.start_agent(&[
        "--https-proxy",
        &proxy,
        "--insecure-skip-proxy-tls-verify",
        "--ip-range-whitelist",
        LAN,
    ])
    .unwrap();
    let result = bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap();
    assert_eq!(result.code, Some(0), "{result:?}");
    let warning = bed
        .agent()
        .logged("TLS VERIFICATION OF THE UPSTREAM PROXY IS DISABLED")
        .unwrap();
    assert_eq!(warning.level(), "WARN", "{warning}");
}

#[test]
fn ipv6_goes_through_the_proxy_with_a_bracketed_connect() {
    let mut bed = Testbed::standard();
    let proxy6 = format!("http://{PROXY_USER}:{PROXY_PASSWORD}@[{PROXY_IP6}]:3128");
    bed.start_agent(&[
        "--https-proxy",
        &proxy6,
        "--ip-range-whitelist",
        LAN6,
        "--connect-by-ip",
    ])
    .unwrap();
    let result = bed.curl(&format!("https://[{ORIGIN_IP6}]:8448/")).unwrap();
    assert_eq!(result.code, Some(0), "{result:?}\n{}", bed.agent().log());
    assert_eq!(result.stdout, "origin ok 8448\n");

    let needle = format!("CONNECT [{ORIGIN_IP6}]:8448 {PROXY_USER}");
    let squid = bed.squid_logged(&needle).unwrap();
    assert!(squid.contains(&needle), "{squid}");
    let origin = bed.origin_logged(PROXY_IP6).unwrap();
    assert!(origin.starts_with(&format!("{PROXY_IP6} 8448 ")), "{origin}");
    // The decision line is written when the agent has closed both sides: poll for it.
    bed.agent()
        .wait_decision(&[
            ("original_dst", &format!("[{ORIGIN_IP6}]:8448")),
            ("route", &"proxy-connect"),
        ])
        .unwrap();
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);

    // The IPv4 LAN is not whitelisted here: IPv4 to it, also IPv4-mapped, is denied in the kernel.
    assert_eq!(bed.tcp_connect(ORIGIN_IP, 443).unwrap(), "EPERM");
    assert_eq!(
        bed.tcp_connect(&format!("::ffff:{ORIGIN_IP}"), 443).unwrap(),
        "EPERM"
    );
}

#[test]
fn ipv6_blacklist_is_enforced_in_the_kernel() {
    // Denied in the kernel: no peer is needed to show that nothing leaves.
    let mut bed = Testbed::builder().build().unwrap();
    let url = bed.proxy_url(PROXY_PASSWORD);
    // Only the IPv4 LAN is whitelisted; fd00::/8 stays blacklisted (fc00::/7).
    bed.start_agent(&["--https-proxy", &url, "--ip-range-whitelist", LAN])
        .unwrap();
    assert_eq!(bed.tcp_connect(ORIGIN_IP6, 443).unwrap(), "EPERM");
    assert_eq!(bed.agent().counter("deny_blacklist").unwrap(), 1);
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

#[test]
fn getpeername_shows_the_original_destination_for_v4_v6_and_mapped() {
    let mut bed = Testbed::standard();
    bed.start_agent_with(&["--peek-timeout", "0.2"]).unwrap();
    let peer = |family: &str, addr: &str| {
        python(
            &bed,
            &format!(
                "import socket; s = socket.socket(socket.{family}); s.connect(('{addr}', 8448)); \
                 print(s.getpeername()[:2])"
            ),
        )
    };
    assert_eq!(peer("AF_INET", ORIGIN_IP), format!("('{ORIGIN_IP}', 8448)"));
    assert_eq!(peer("AF_INET6", ORIGIN_IP6), format!("('{ORIGIN_IP6}', 8448)"));
    let mapped = format!("::ffff:{ORIGIN_IP}");
    assert_eq!(peer("AF_INET6", &mapped), format!("('{mapped}', 8448)"));

    // And all three really went through the agent and squid, by IP (no bytes sent). squid logs
    // each tunnel when it closes, in whatever order they close: wait for all three lines.
    let v6 = format!("CONNECT [{ORIGIN_IP6}]:8448");
    let v4 = format!("CONNECT {ORIGIN_IP}:8448");
    let squid = bed
        .wait_squid_log("three tunnels", |l| l.matches("CONNECT ").count() >= 3)
        .unwrap();
    assert_eq!(squid.matches(&v4).count(), 2, "{squid}");
    assert_eq!(squid.matches(&v6).count(), 1, "{squid}");
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

#[test]
fn agent_inside_the_attached_cgroup_tree_never_redirects_itself() {
    // Layout 1: the agent outside the attached cgroup: its sockets never meet the programs.
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0)
    );
    assert_eq!(bed.agent().counter("pass_agent").unwrap(), 0);
    drop(bed);

    // Layout 2: the attached cgroup is a parent of the agent's (as when attached at the root):
    // the agent's upstream connects run the programs and pass because of the socket mark.
    let mut bed = Testbed::standard();
    let agent_cgroup = bed.cgroup.path.join("agent");
    std::fs::create_dir(&agent_cgroup).unwrap();
    bed.agent_cgroup = Some(agent_cgroup);
    // No warm pool: every upstream connect is one a tunnel asked for, so they can be counted.
    bed.start_agent_with(&["--warm-upstream", "0"]).unwrap();
    for port in [443, 8448] {
        let result = bed.curl(&format!("https://{ORIGIN_NAME}:{port}/")).unwrap();
        assert_eq!(result.code, Some(0), "{result:?}\n{}", bed.agent().log());
    }
    assert_eq!(
        bed.agent().counter("pass_agent").unwrap(),
        2,
        "the agent's two upstream connects"
    );
    assert_eq!(
        bed.agent().counter("redirected").unwrap(),
        2,
        "only the client's two connects"
    );
    let squid = bed.squid_logged("CONNECT origin.test:8448").unwrap();
    assert_eq!(squid.matches("TCP_TUNNEL/200").count(), 2, "{squid}");
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

#[test]
fn cgroups_come_and_go_without_disturbing_established_connections() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    let pin_dir = bed.pin_dir.to_string_lossy().into_owned();
    let cgroup_b = bed.cgroup_b.path.to_string_lossy().into_owned();

    // A long-lived TLS connection from cgroup A, through the agent: one request now, one later.
    let client_code = format!(
        "import socket, ssl, sys\n\
         ctx = ssl.create_default_context(cafile='{ca}')\n\
         t = ctx.wrap_socket(socket.create_connection(('{ORIGIN_IP}', 443)), server_hostname='{ORIGIN_NAME}')\n\
         def get():\n\
         \x20   t.sendall(b'GET / HTTP/1.1\\r\\nHost: {ORIGIN_NAME}\\r\\n\\r\\n')\n\
         \x20   data = b''\n\
         \x20   while b'origin ok' not in data:\n\
         \x20       chunk = t.recv(4096)\n\
         \x20       if not chunk: raise SystemExit('closed')\n\
         \x20       data += chunk\n\
         \x20   print('ok', flush=True)\n\
         get()\n\
         sys.stdin.readline()\n\
         get()\n",
        ca = bed.certs.ca.display()
    );
    let mut client = bed
        .spawn_in(&bed.cgroup.path, "python3", &["-c", &client_code])
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ok");

    // Cgroup B, not attached yet: direct.
    let b_curl = |bed: &Testbed| {
        bed.curl_in(&bed.cgroup_b.path, &["https://origin.test/"])
            .unwrap()
    };
    assert_eq!(b_curl(&bed).code, Some(0));
    assert!(bed.origin_logged(HS_IP).unwrap().contains(HS_IP));
    let direct_before = bed.direct_packets_at_origin().unwrap();
    assert!(direct_before > 0);

    // Attach B to the running agent: B now goes through squid.
    let attach = bed
        .egress(&["attach", "--cgroup", &cgroup_b, "--bpffs-dir", &pin_dir])
        .unwrap();
    assert_eq!(attach.code, Some(0), "{attach:?}");
    assert_eq!(b_curl(&bed).code, Some(0));
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        direct_before,
        "B went direct after attach"
    );

    // Detach B again: direct once more; A is still intercepted.
    let detach = bed
        .egress(&["detach", "--cgroup", &cgroup_b, "--bpffs-dir", &pin_dir])
        .unwrap();
    assert_eq!(detach.code, Some(0), "{detach:?}");
    assert_eq!(b_curl(&bed).code, Some(0));
    assert!(bed.direct_packets_at_origin().unwrap() > direct_before);
    let after_b = bed.direct_packets_at_origin().unwrap();
    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0)
    );
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        after_b,
        "A must still be proxied"
    );

    // The connection A opened before all this is still alive and still works.
    writeln!(client.stdin.as_mut().unwrap()).unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "ok");
    assert!(client.wait().unwrap().success());
}

#[test]
fn multipath_tcp_sockets_do_not_go_direct() {
    let mut bed = Testbed::standard();
    let proxy = bed.proxy_url(PROXY_PASSWORD);
    bed.start_agent_with(&["--http-proxy", &proxy]).unwrap();
    // IPPROTO_MPTCP (262): the kernel runs connect4 on its first subflow, a TCP socket, so a
    // check for TCP in the program does not let it slip past.
    let code = format!(
        "import socket\n\
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)\n\
s.settimeout(10)\n\
s.connect(('{ORIGIN_IP}', 80))\n\
s.sendall(b'GET /mptcp HTTP/1.1\\r\\nHost: {ORIGIN_NAME}\\r\\nConnection: close\\r\\n\\r\\n')\n\
print(s.recv(4096).split(b'\\r\\n')[0].decode())\n"
    );
    let status_line = python(&bed, &code);
    assert!(status_line.starts_with("HTTP/1.1 200"), "{status_line}");
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0, "MPTCP went direct");
    let log = bed.squid_logged("/mptcp").unwrap();
    assert!(log.contains("GET http://origin.test/mptcp"), "{log}");
    assert_eq!(bed.agent().counter("redirected").unwrap(), 1);
}

/// Connections to squid's TLS port, established and owned by the homeserver host: the ones the
/// agent holds (pooled or carrying tunnels).
fn tls_connections_at_squid(bed: &Testbed) -> usize {
    let out = bed
        .proxy
        .exec(
            "ss",
            &[
                "-Htn",
                "state",
                "established",
                &format!("( sport = :{SQUID_TLS_PORT} )"),
            ],
        )
        .unwrap();
    out.lines().filter(|l| l.contains(HS_IP)).count()
}

/// egress keeps connections to an `https://` proxy ready, past the TLS handshake: after the
/// first tunnel, the next ones go down connections squid accepted before they were asked for,
/// and still reach the origin (TLS to the origin inside TLS to squid). With the pool off,
/// nothing is held open and every tunnel dials.
#[test]
fn tunnels_through_an_https_proxy_take_warm_connections() {
    let mut bed = tls_testbed();
    let ca = bed.certs.ca.to_string_lossy().into_owned();
    let proxy = tls_proxy(SQUID_TLS_PORT);
    for pool in [2usize, 0] {
        let size = pool.to_string();
        bed.start_agent(&[
            "--https-proxy",
            &proxy,
            "--proxy-ca-file",
            &ca,
            "--warm-upstream",
            &size,
            "--ip-range-whitelist",
            LAN,
        ])
        .unwrap();
        for _ in 0..4 {
            let result = bed.curl(&format!("https://{ORIGIN_NAME}:8448/")).unwrap();
            assert_eq!(result.code, Some(0), "{result:?}\n{}", bed.agent().log());
            // The pool topped up behind the tunnel: its connections wait at squid, handshaken,
            // with no tunnel in them (the tunnel's own closes as its client finishes).
            egress_testbed::wait::until(
                &format!("{pool} idle TLS connections from the agent at squid"),
                egress_testbed::wait::SHORT,
                || Ok(tls_connections_at_squid(&bed)),
                |n| *n == pool,
            )
            .unwrap();
        }
        let decisions = bed.agent().wait_decisions(4).unwrap();
        let conns: Vec<String> = decisions.iter().map(|d| d.get("upstream_conn")).collect();
        let agent = bed.agent();
        if pool > 0 {
            assert_eq!(conns, ["new", "warm", "warm", "warm"], "{decisions:#?}");
            agent
                .wait_metric(
                    "egress_upstream_connections_total",
                    &[("connection", "warm")],
                    3,
                    std::time::Duration::from_secs(5),
                )
                .unwrap();
        } else {
            assert_eq!(conns, ["new"; 4], "{decisions:#?}");
        }
    }
    let connect = format!("CONNECT {ORIGIN_NAME}:8448 {PROXY_USER}");
    bed.wait_squid_log("8 tunnels in squid's log", |l| l.matches(&connect).count() == 8)
        .unwrap();
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}
