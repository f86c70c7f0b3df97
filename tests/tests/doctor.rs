//! `egress doctor --server-name`: Matrix server discovery through egress's policy and the real
//! squid, against an origin serving .well-known and federation TLS, with a real DNS server
//! (dnsmasq) answering A and SRV records in the homeserver namespace.

use egress_testbed::{
    ClientResult, ORIGIN_IP, ORIGIN_IP_2, ORIGIN_NAME, PROXY_IP, PROXY_PASSWORD, PROXY_USER, SQUID_PORT,
    SQUID_STRICT_PORT, Testbed, egress_bin, narrow_whitelist_args,
};

/// example.test delegates (.well-known) to fed.example.test, whose SRV record points at
/// origin.test:8448; plain.example.test has neither; wrongcert.test is not in the origin's
/// certificate; blocked.test is an address egress blacklists.
fn testbed() -> Testbed {
    let hosts = format!(
        "{ORIGIN_IP} {ORIGIN_NAME}\n{ORIGIN_IP} example.test\n{ORIGIN_IP} fed.example.test\n\
         {ORIGIN_IP} plain.example.test\n{ORIGIN_IP} wrongcert.test\n{ORIGIN_IP_2} blocked.test\n"
    );
    Testbed::builder()
        .squid_strict()
        .nginx()
        .dns(
            &hosts,
            &[("_matrix-fed._tcp.fed.example.test", ORIGIN_NAME, 8448)],
        )
        .build()
        .expect("testbed")
}

/// The policy the doctor is asked about (and the agent runs with, where a test starts one):
/// squid on `squid_port`, only the proxy and the origin's first address whitelisted.
fn policy_args(squid_port: u16) -> Vec<String> {
    let proxy = format!("http://{PROXY_USER}:{PROXY_PASSWORD}@{PROXY_IP}:{squid_port}");
    let mut args = vec!["--https-proxy".to_owned(), proxy];
    args.extend(narrow_whitelist_args());
    args
}

/// Runs the doctor in the homeserver namespace (its resolver is dnsmasq) with squid on `port`,
/// only the proxy and the origin's first address whitelisted.
fn doctor(bed: &Testbed, server_name: &str, squid_port: u16, json: bool) -> ClientResult {
    let ca = bed.certs.ca.to_string_lossy().into_owned();
    let policy = policy_args(squid_port);
    let mut args = vec!["doctor", "--server-name", server_name];
    args.extend(policy.iter().map(String::as_str));
    args.extend(["--ca-file", &ca, "--timeout", "5"]);
    if json {
        args.push("--json");
    }
    bed.run_in_hs(&egress_bin().to_string_lossy(), &args)
        .expect("egress doctor")
}

/// The steps of a JSON report as (step, status, message).
fn steps(result: &ClientResult) -> Vec<(String, String, String)> {
    let report = json(result);
    report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            let field = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
            (field("step"), field("status"), field("message"))
        })
        .collect()
}

fn json(result: &ClientResult) -> serde_json::Value {
    serde_json::from_str(&result.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {result:?}"))
}

fn has_step(steps: &[(String, String, String)], step: &str, status: &str, text: &str) -> bool {
    steps
        .iter()
        .any(|(s, st, m)| s == step && st == status && m.contains(text))
}

#[test]
fn delegation_through_well_known_and_srv_reaches_the_federation_endpoint_through_squid() {
    let bed = testbed();
    let result = doctor(&bed, "example.test", SQUID_PORT, true);
    assert_eq!(result.code, Some(0), "{result:?}");
    let report = json(&result);
    assert_eq!(report["ok"], true);
    let steps = steps(&result);
    for (step, status, text) in [
        ("resolve", "ok", "example.test -> 10.248.0.30"),
        (
            "route",
            "ok",
            "CONNECT example.test:443 via http://egress:***@10.248.0.20:3128",
        ),
        ("proxy", "ok", "CONNECT example.test:443: 200"),
        ("tls", "ok", "certificate valid for example.test"),
        (
            "http",
            "ok",
            "GET https://example.test/.well-known/matrix/server: 200",
        ),
        ("well-known", "ok", "m.server = fed.example.test"),
        (
            "srv",
            "ok",
            "_matrix-fed._tcp.fed.example.test -> origin.test:8448",
        ),
        ("srv", "warn", "not to the SRV target origin.test"),
        ("resolve", "ok", "origin.test -> 10.248.0.30"),
        ("route", "ok", "CONNECT fed.example.test:8448"),
        ("tls", "ok", "certificate valid for fed.example.test"),
        ("version", "ok", "egress-test-origin 8448"),
    ] {
        assert!(
            has_step(&steps, step, status, text),
            "no {status} {step} '{text}' in {steps:#?}"
        );
    }
    assert_eq!(report["federation"]["port"], 8448);
    assert_eq!(report["federation"]["tls_name"], "fed.example.test");
    assert!(!result.stdout.contains(PROXY_PASSWORD), "password in the report");

    // Everything went through squid, nothing direct.
    let log = bed.squid_logged("CONNECT fed.example.test:8448").unwrap();
    assert!(
        log.contains("TCP_TUNNEL/200") && log.contains("CONNECT example.test:443"),
        "{log}"
    );
    assert!(log.contains("CONNECT fed.example.test:8448"), "{log}");
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

#[test]
fn no_delegation_falls_back_to_port_8448_and_text_output_reads_well() {
    let bed = testbed();
    let result = doctor(&bed, "plain.example.test", SQUID_PORT, false);
    assert_eq!(result.code, Some(0), "{result:?}");
    let out = &result.stdout;
    for line in [
        "egress doctor: federation with plain.example.test",
        "info  well-known  no delegation: answer 404",
        "info  srv         _matrix-fed._tcp.plain.example.test: no records",
        "info  srv         _matrix._tcp.plain.example.test: no records",
        "info  srv         no SRV records: using plain.example.test:8448",
        "ok    version     egress-test-origin 8448",
        "result: ok: federation requests for plain.example.test go to 10.248.0.30 port 8448",
    ] {
        assert!(out.contains(line), "no '{line}' in:\n{out}");
    }
}

#[test]
fn squid_refusing_port_8448_is_reported_with_the_fix() {
    let bed = testbed();
    let result = doctor(&bed, "example.test", SQUID_STRICT_PORT, true);
    assert_eq!(result.code, Some(1), "{result:?}");
    let steps = steps(&result);
    // .well-known on 443 is allowed by the stock rule; federation on 8448 is not.
    assert!(
        has_step(&steps, "well-known", "ok", "m.server = fed.example.test"),
        "{steps:#?}"
    );
    assert!(
        has_step(
            &steps,
            "proxy",
            "fail",
            "CONNECT fed.example.test:8448: proxy answered 403"
        ) && has_step(&steps, "proxy", "fail", "acl SSL_ports port 8448"),
        "{steps:#?}"
    );
    assert_eq!(json(&result)["ok"], false);
}

#[test]
fn a_certificate_without_the_server_name_fails_the_tls_step() {
    let bed = testbed();
    let result = doctor(&bed, "wrongcert.test", SQUID_PORT, true);
    assert_eq!(result.code, Some(1), "{result:?}");
    let steps = steps(&result);
    // .well-known fails on the certificate too (a warning: discovery goes on to SRV and 8448).
    assert!(
        has_step(&steps, "tls", "warn", "certificate for wrongcert.test rejected"),
        "{steps:#?}"
    );
    assert!(
        has_step(&steps, "tls", "fail", "certificate for wrongcert.test rejected"),
        "{steps:#?}"
    );
    assert!(
        has_step(&steps, "tls", "fail", "invalid peer certificate"),
        "{steps:#?}"
    );
    assert!(!steps.iter().any(|(s, _, _)| s == "version"), "{steps:#?}");
}

#[test]
fn a_blacklisted_destination_is_denied_in_the_kernel_as_the_doctor_says() {
    let mut bed = testbed();
    // The agent's kernel programs attached with the very policy the doctor is asked about, so
    // that the doctor's verdict can be held against the kernel's.
    let policy = policy_args(SQUID_PORT);
    let policy: Vec<&str> = policy.iter().map(String::as_str).collect();
    bed.start_agent(&policy).unwrap();
    let denied_before = bed.agent().counter("deny_blacklist").unwrap();

    let result = doctor(&bed, "blocked.test", SQUID_PORT, true);
    assert_eq!(result.code, Some(1), "{result:?}");
    let steps = steps(&result);
    let claim = "denied in the kernel [ip_range_blacklist 10.0.0.0/8]";
    // Every address the doctor says the kernel denies (ADDR:PORT: reason).
    let denied: Vec<&str> = steps
        .iter()
        .filter(|(step, status, message)| step == "route" && status == "fail" && message.contains(claim))
        .filter_map(|(_, _, message)| Some(message.split_once(": ")?.0))
        .collect();
    assert!(
        denied.contains(&format!("{ORIGIN_IP_2}:8448").as_str()),
        "no failed route step '{ORIGIN_IP_2}:8448: {claim}' in {steps:#?}"
    );
    // The doctor itself sent nothing there: it runs outside the intercepted cgroup, so a
    // packet would have reached the origin; and the kernel counted nothing for it.
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
    assert_eq!(bed.agent().counter("deny_blacklist").unwrap(), denied_before);

    // The kernel agrees: a real connect from the intercepted cgroup to each of those addresses
    // fails with EPERM, each counted once as a blacklist denial, and no packet leaves.
    for addr in &denied {
        let (ip, port) = addr.rsplit_once(':').unwrap();
        assert_eq!(
            bed.tcp_connect(ip, port.parse().unwrap()).unwrap(),
            "EPERM",
            "{addr}"
        );
    }
    assert_eq!(
        bed.agent().counter("deny_blacklist").unwrap(),
        denied_before + denied.len() as u64
    );
    assert_eq!(bed.agent().counter("redirected").unwrap(), 0);
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
    assert!(!bed.squid_access_log().contains("blocked.test"));
}

#[test]
fn a_bad_server_name_is_named() {
    // Refused before any lookup: no peers needed (but still in a namespace of its own, so a
    // doctor that did look would not reach the machine's network).
    let bed = Testbed::builder().build().unwrap();
    let result = doctor(&bed, "exa mple.test", SQUID_PORT, false);
    assert_eq!(result.code, Some(1), "{result:?}");
    assert!(
        result
            .stdout
            .contains("FAIL  server name 'exa mple.test' is not a valid server name"),
        "{result:?}"
    );
}

/// The doctor says where the host resolves names out of egress's sight, on a real host view
/// each time: entries in the hosts file, a running nscd, systemd-resolved through nss-resolve;
/// and nothing of the kind where glibc asks DNS itself.
#[test]
fn the_doctor_says_how_the_host_resolves_names_out_of_sight() {
    use egress_testbed::peers::resolvers::Resolution;
    let mut bed = testbed();
    for (resolution, hosts, said, not_said) in [
        (Resolution::Files, "", "by DNS over UDP/TCP", "nscd"),
        (
            Resolution::Files,
            "10.248.0.99 partner.example\n",
            "/etc/hosts names 1 host",
            "nscd",
        ),
        (Resolution::Nscd, "", "nscd runs", "/etc/hosts names"),
        (Resolution::Resolved, "", "systemd-resolved (`resolve`)", "nscd"),
    ] {
        bed.use_host_view(resolution, hosts).unwrap();
        let result = doctor(&bed, "plain.example.test", SQUID_PORT, true);
        let steps = steps(&result);
        let resolution_steps: Vec<&String> = steps
            .iter()
            .filter(|(step, _, _)| step == "host resolution")
            .map(|(_, _, message)| message)
            .collect();
        assert!(
            resolution_steps.iter().any(|m| m.contains(said)),
            "{resolution:?} {hosts:?}: {resolution_steps:#?}"
        );
        assert!(
            !resolution_steps.iter().any(|m| m.contains(not_said)),
            "{resolution:?} {hosts:?}: {resolution_steps:#?}"
        );
        // Discovery itself still works through the view's resolver.
        assert_eq!(result.code, Some(0), "{resolution:?}: {result:?}");
    }
}
