//! Corporate proxies as they are: Kerberos (a real MIT KDC, squid answering only `Negotiate`
//! with its own keytab, egress with a keytab of its own), a pair of squids with failover, and
//! per-destination routes to different proxies. The homeserver side is a client in the
//! intercepted cgroup with no proxy settings.
//!
//! Root only: real namespaces, cgroup eBPF programs, squid, nginx, krb5kdc.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use egress_testbed::{
    ORIGIN_IP, PROXY_PASSWORD, PROXY_USER, Testbed, egress_bin,
    peers::{
        SquidNegotiate, SquidOptions,
        kerberos::{CLIENT, Kdc, REALM},
        resolvers::Resolution,
        start_squid,
    },
    process::{self, Daemon},
    wait,
};

const SQUID_A: &str = "10.248.0.20";
const SQUID_B: &str = "10.248.0.21";
const KERBEROS_SQUID: &str = "10.248.0.22";
const KDC_IP: &str = "10.248.0.23";
const PROXY_NAME: &str = "proxy.kerberos.test";

/// squid on `address`:3128 in the proxy namespace, with `auth`'s credentials, resolving
/// origin.test and partner.test to the origin; its own directory and instance.
fn squid(
    bed: &Testbed,
    name: &str,
    address: &str,
    negotiate: Option<SquidNegotiate>,
    clock: Option<&str>,
) -> Daemon {
    let dir = bed.dir.join(name);
    let instance = format!("{}{}", bed.name, name.replace('-', ""));
    let mut daemon = start_squid(
        &bed.proxy,
        &dir,
        &instance,
        &SquidOptions {
            user: PROXY_USER,
            password: PROXY_PASSWORD,
            http_port: 3128,
            https_ports: &[],
            hosts: &format!("{ORIGIN_IP} origin.test partner.test\n"),
            strict_port: None,
            listen: Some(address),
            negotiate,
            clock_offset: clock,
        },
    )
    .unwrap();
    wait::ready(&format!("squid {name} to listen"), wait::STARTUP, || {
        daemon.check_alive()?;
        Ok(bed
            .proxy
            .exec("ss", &["-Hltn", &format!("src {address}:3128")])?
            .contains("3128"))
    })
    .unwrap();
    daemon
}

fn access_log(bed: &Testbed, name: &str) -> String {
    std::fs::read_to_string(bed.dir.join(name).join("squid/access.log")).unwrap_or_default()
}

fn basic(address: &str) -> String {
    format!("http://{PROXY_USER}:{PROXY_PASSWORD}@{address}:3128")
}

/// A realm, squid answering only Negotiate as `HTTP/proxy.kerberos.test`, and the homeserver
/// host resolving that name (Kerberos needs the proxy's name, not its address).
struct KerberosBed {
    bed: Testbed,
    kdc: Kdc,
    /// egress's keytab, owned by the agent's user.
    keytab: PathBuf,
    squid_keytab: PathBuf,
}

impl KerberosBed {
    fn new() -> Self {
        let mut bed = Testbed::builder().nginx().build().unwrap();
        bed.proxy.add_address(KERBEROS_SQUID).unwrap();
        bed.proxy.add_address(KDC_IP).unwrap();
        let kdc = Kdc::start(&bed.proxy, &bed.dir, KDC_IP).unwrap();
        let squid_keytab = bed.dir.join("proxy-http.keytab");
        kdc.principal_with_keytab(&format!("HTTP/{PROXY_NAME}"), &squid_keytab, "proxy")
            .unwrap();
        let keytab = bed.dir.join("egress.keytab");
        kdc.principal_with_keytab(CLIENT, &keytab, "nobody").unwrap();
        bed.use_host_view(Resolution::Files, &format!("{KERBEROS_SQUID} {PROXY_NAME}\n"))
            .unwrap();
        bed.agent_env
            .push(("KRB5_CONFIG".into(), kdc.krb5_conf.to_string_lossy().into_owned()));
        Self {
            bed,
            kdc,
            keytab,
            squid_keytab,
        }
    }

    fn squid(&self, clock: Option<&str>) -> Daemon {
        squid(
            &self.bed,
            "ksquid",
            KERBEROS_SQUID,
            Some(SquidNegotiate {
                principal: &format!("HTTP/{PROXY_NAME}@{REALM}"),
                keytab: &self.squid_keytab,
                krb5_conf: &self.kdc.krb5_conf,
            }),
            clock,
        )
    }

    /// The agent with the Kerberos proxy for TLS and plain HTTP, and `credentials`
    /// (`--kerberos-keytab PATH` or `--kerberos-ccache CCACHE`).
    fn start_agent(&mut self, credentials: [&str; 2]) {
        let proxy = format!("http://{PROXY_NAME}:3128");
        let whitelist = format!("{ORIGIN_IP}/32");
        self.bed
            .start_agent(&[
                "--https-proxy",
                &proxy,
                "--http-proxy",
                &proxy,
                credentials[0],
                credentials[1],
                "--ip-range-whitelist",
                &whitelist,
            ])
            .unwrap();
    }
}

/// egress authenticates to a Negotiate-only squid with its keytab: TLS tunnels and forwarded
/// plain HTTP from the cgroup go through, squid logs egress's principal, the decision records
/// say `negotiate`, and check-config gets a ticket for the proxy's principal.
#[test]
fn kerberos_to_a_negotiate_only_squid_with_egress_keytab() {
    let mut k = KerberosBed::new();
    let _squid = k.squid(None);
    let keytab = k.keytab.to_string_lossy().into_owned();
    k.start_agent(["--kerberos-keytab", &keytab]);

    let tls = k.bed.curl("https://origin.test/").unwrap();
    assert_eq!(tls.code, Some(0), "{tls:?}");
    // Two plain-HTTP requests on one kept-alive connection: squid authenticates the connection,
    // so the token goes with the first request only, and both are served.
    let plain = k
        .bed
        .curl_many(&["http://origin.test/", "http://origin.test/"])
        .unwrap();
    assert_eq!(plain.code, Some(0), "{plain:?}");
    let principal = format!("{CLIENT}@{REALM}");
    let log = wait::until(
        "squid to log all three",
        wait::SHORT,
        || Ok(access_log(&k.bed, "ksquid")),
        |l| l.contains("CONNECT origin.test:443") && l.matches("GET http://origin.test/").count() == 2,
    )
    .unwrap();
    let forwarded = k
        .bed
        .agent()
        .wait_decision(&[("route", &"proxy-forward")])
        .unwrap();
    assert_eq!(
        (forwarded.get("requests").as_str(), forwarded.get("auth").as_str()),
        ("2", "negotiate"),
        "{forwarded}"
    );
    for line in log.lines() {
        assert!(
            line.contains(&principal),
            "squid did not log egress's principal: {line}"
        );
    }
    let line = k
        .bed
        .agent()
        .wait_decision(&[("route", &"proxy-connect"), ("outcome", &"ok")])
        .unwrap();
    assert_eq!(
        (line.get("auth").as_str(), line.get("upstream").as_str()),
        ("negotiate", "proxy.kerberos.test:3128"),
        "{line}"
    );
    assert_eq!(k.bed.direct_packets_at_origin().unwrap(), 0);

    // check-config asks the KDC for a ticket for each Kerberos proxy (in the homeserver host's
    // namespace, where the KDC is reachable).
    let mut command = k.bed.hs_command(
        None,
        &egress_bin().to_string_lossy(),
        &[
            "check-config",
            "--https-proxy",
            "http://proxy.kerberos.test:3128",
            "--kerberos-keytab",
            &keytab,
        ],
    );
    command.env("KRB5_CONFIG", &k.kdc.krb5_conf);
    let checked = process::output(command).unwrap();
    assert!(
        checked
            .stdout
            .contains("# kerberos: a ticket for HTTP/proxy.kerberos.test: ok"),
        "{checked:?}"
    );
}

/// Each way Kerberos fails gives a reset and a decision record that says why, and nothing goes
/// direct: a keytab whose keys were changed since, an expired ticket cache, and a proxy whose
/// clock is two hours off.
#[test]
fn kerberos_failures_reset_and_say_why() {
    let mut k = KerberosBed::new();
    let squid = k.squid(None);
    let failing = |k: &KerberosBed, want: &str| {
        let out = k.bed.curl("https://origin.test/").unwrap();
        assert_ne!(out.code, Some(0), "{want}: {out:?}");
        let line = k
            .bed
            .agent()
            .wait_line(want, |l| l.is_decision() && l.get("outcome") == "error")
            .unwrap();
        let error = line.get("error");
        eprintln!("the decision record says: {error}");
        assert!(error.contains(want), "wanted `{want}` in {line}");
        // No token, let alone key material, in the agent's log.
        assert!(!k.bed.agent().log().contains("Negotiate "), "a token was logged");
        assert_eq!(k.bed.direct_packets_at_origin().unwrap(), 0);
    };

    // The principal's keys changed after egress's keytab was exported: preauthentication fails.
    let stale = k.keytab.to_string_lossy().into_owned();
    k.kdc
        .export(CLIENT, &k.bed.dir.join("newer.keytab"), "nobody")
        .unwrap();
    k.start_agent(["--kerberos-keytab", &stale]);
    failing(&k, "Kerberos ticket for HTTP/proxy.kerberos.test: ");
    failing(&k, "export it again");
    assert!(
        !access_log(&k.bed, "ksquid").contains("CONNECT"),
        "squid got a CONNECT"
    );

    // A ticket cache whose ticket has expired (and no keytab to renew it from).
    let fresh = k.bed.dir.join("fresh.keytab");
    k.kdc.export(CLIENT, &fresh, "root").unwrap();
    let ccache = k.bed.dir.join("krb5cc");
    k.kdc
        .kinit(&format!("{CLIENT}@{REALM}"), &fresh, &ccache, "3s", "nobody")
        .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let cache = format!("FILE:{}", ccache.display());
    k.start_agent(["--kerberos-ccache", &cache]);
    failing(&k, "expired");

    // The proxy's clock is two hours ahead: the KDC gives egress a ticket, squid refuses it.
    drop(squid);
    let _skewed = k.squid(Some("+2h"));
    let fresh = fresh.to_string_lossy().into_owned();
    let _ = std::fs::remove_file(&ccache);
    std::process::Command::new("chown")
        .args(["nobody", &fresh])
        .status()
        .unwrap();
    k.start_agent(["--kerberos-keytab", &fresh]);
    failing(&k, "refused the Kerberos ticket");
    // ...and squid says why: the skew.
    let cache_log = std::fs::read_to_string(k.bed.dir.join("ksquid/squid/cache.log")).unwrap_or_default();
    assert!(cache_log.to_lowercase().contains("clock skew"), "{cache_log}");
}

/// Connects to the origin (TLS, SNI origin.test) argv[1] times, argv[2] s apart, each a new
/// connection with one request; prints `START_UNIX_TIME STATUS` per connection (STATUS: the HTTP
/// status, or the error's name).
const CONNECTIONS: &str = r#"
import socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[3])
for _ in range(int(sys.argv[1])):
    started = time.time()
    try:
        with socket.create_connection((sys.argv[4], 443), timeout=10) as s:
            with ctx.wrap_socket(s, server_hostname="origin.test") as t:
                t.sendall(b"GET / HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n")
                status = t.recv(64).split(b" ")[1].decode()
    except Exception as e:
        status = type(e).__name__
    print(f"{started:.6f} {status}", flush=True)
    time.sleep(float(sys.argv[2]))
"#;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Runs [`CONNECTIONS`] from the cgroup; (start time, status) of each.
fn connections(bed: &Testbed, count: usize, gap: &str) -> Vec<(f64, String)> {
    let ca = bed.certs.ca.to_string_lossy().into_owned();
    let out = bed
        .run_in_cgroup(
            "python3",
            &["-c", CONNECTIONS, &count.to_string(), gap, &ca, ORIGIN_IP],
        )
        .unwrap();
    parse_connections(&out.stdout)
}

fn parse_connections(text: &str) -> Vec<(f64, String)> {
    text.lines()
        .filter_map(|l| {
            let (at, status) = l.split_once(' ')?;
            Some((at.parse().ok()?, status.to_owned()))
        })
        .collect()
}

/// Two squids, both in https_proxy. The first is killed in the middle of a run of connections:
/// every connection started after that goes through the second, none fails and none goes direct.
/// Then it comes back, the probe finds it, and it is used again. Metrics and `egress status`
/// show each proxy's state; how long the failover took is measured and printed.
#[test]
fn a_dead_proxy_fails_over_to_the_next_and_is_used_again_when_back() {
    let mut bed = Testbed::builder().nginx().build().unwrap();
    bed.proxy.add_address(SQUID_B).unwrap();
    let squid_a = squid(&bed, "squid-a", SQUID_A, None, None);
    let _squid_b = squid(&bed, "squid-b", SQUID_B, None, None);
    let list = format!("{} {}", basic(SQUID_A), basic(SQUID_B));
    let whitelist = format!("{ORIGIN_IP}/32");
    bed.start_agent(&["--https-proxy", &list, "--ip-range-whitelist", &whitelist])
        .unwrap();

    let before = connections(&bed, 5, "0");
    assert!(before.iter().all(|(_, s)| s == "200"), "{before:?}");
    let logged = |name: &str, count: usize| {
        wait::until(
            &format!("{name} to log {count} CONNECTs"),
            wait::SHORT,
            || Ok(access_log(&bed, name).matches("CONNECT origin.test:443").count()),
            |n| *n >= count,
        )
        .unwrap()
    };
    assert_eq!(logged("squid-a", 5), 5);
    assert!(!access_log(&bed, "squid-b").contains("CONNECT"));

    // Kill A while a run of connections goes on.
    let ca = bed.certs.ca.to_string_lossy().into_owned();
    let run = bed
        .spawn_in(
            &bed.cgroup.path,
            "python3",
            &["-c", CONNECTIONS, "40", "0.05", &ca, ORIGIN_IP],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let killed_at = now();
    drop(squid_a);
    let output = run.wait_with_output().unwrap();
    let during = parse_connections(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(during.len(), 40, "{during:?}");
    let after_kill: Vec<&(f64, String)> = during.iter().filter(|(at, _)| *at > killed_at + 0.05).collect();
    assert!(after_kill.len() >= 20, "{during:?}");
    assert!(
        after_kill.iter().all(|(_, s)| s == "200"),
        "a connection after the first proxy died failed: {during:?}"
    );
    // A connection in flight at the kill may break with it: at most one.
    assert!(
        during.iter().filter(|(_, s)| s != "200").count() <= 1,
        "{during:?}"
    );
    // The run did start on A: the kill came in its middle.
    assert!(
        access_log(&bed, "squid-a")
            .matches("CONNECT origin.test:443")
            .count()
            > 5,
        "no connection of the run went through the first proxy before it was killed"
    );
    assert!(during.iter().any(|(at, _)| *at < killed_at), "{during:?}");
    assert!(logged("squid-b", 1) >= 1);
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);

    // What the failover cost: the first connection through B, against the run's usual one.
    let first_b = bed
        .agent()
        .decisions()
        .into_iter()
        .find(|d| d.get("upstream") == format!("{SQUID_B}:3128"))
        .expect("no decision through the second proxy");
    eprintln!(
        "failover: the first connection through the second proxy took {} ms",
        first_b.get("duration_ms")
    );

    let metric = |proxy: &str| {
        bed.agent()
            .metric("egress_proxy_up", &[("proxy", proxy)])
            .unwrap()
    };
    assert_eq!(metric(&format!("{SQUID_A}:3128")), 0);
    assert_eq!(metric(&format!("{SQUID_B}:3128")), 1);
    assert!(
        bed.agent()
            .metric(
                "egress_proxy_failovers_total",
                &[("proxy", &format!("{SQUID_A}:3128"))]
            )
            .unwrap()
            >= 1
    );
    let status = bed.agent().status().unwrap();
    assert!(
        status.stdout.contains(&format!("proxy {SQUID_A}:3128: down"))
            && status.stdout.contains(&format!("proxy {SQUID_B}:3128: up")),
        "{status:?}"
    );

    // A comes back: found by the probe, first in the list again.
    let _squid_a = squid(&bed, "squid-a2", SQUID_A, None, None);
    bed.agent()
        .wait_metric(
            "egress_proxy_up",
            &[("proxy", &format!("{SQUID_A}:3128"))],
            1,
            Duration::from_secs(40),
        )
        .unwrap();
    let again = connections(&bed, 3, "0");
    assert!(again.iter().all(|(_, s)| s == "200"), "{again:?}");
    assert_eq!(logged("squid-a2", 3), 3, "{}", access_log(&bed, "squid-a2"));
}

/// A route sends one destination to its own proxy, the rest to https_proxy; checked in both
/// squids' logs.
#[test]
fn routes_send_each_destination_to_its_proxy() {
    let mut bed = Testbed::builder().nginx().build().unwrap();
    bed.proxy.add_address(SQUID_B).unwrap();
    let _a = squid(&bed, "squid-a", SQUID_A, None, None);
    let _b = squid(&bed, "squid-b", SQUID_B, None, None);
    let route = format!("partner.test -> {}", basic(SQUID_B));
    let whitelist = format!("{ORIGIN_IP}/32");
    bed.start_agent(&[
        "--https-proxy",
        &basic(SQUID_A),
        "--proxy-route",
        &route,
        "--ip-range-whitelist",
        &whitelist,
    ])
    .unwrap();
    let origin = bed.curl("https://origin.test/").unwrap();
    assert_eq!(origin.code, Some(0), "{origin:?}");
    let resolve = format!("partner.test:443:{ORIGIN_IP}");
    let partner = bed
        .curl_many(&["-k", "--resolve", &resolve, "https://partner.test/"])
        .unwrap();
    assert_eq!(partner.code, Some(0), "{partner:?}");
    let (a, b) = (access_log(&bed, "squid-a"), access_log(&bed, "squid-b"));
    wait::until(
        "both squids to log",
        wait::SHORT,
        || Ok((access_log(&bed, "squid-a"), access_log(&bed, "squid-b"))),
        |(a, b)| a.contains("CONNECT origin.test:443") && b.contains("CONNECT partner.test:443"),
    )
    .unwrap_or_else(|e| panic!("{e:#}\nA: {a}\nB: {b}"));
    let (a, b) = (access_log(&bed, "squid-a"), access_log(&bed, "squid-b"));
    assert!(!a.contains("partner.test"), "{a}");
    assert!(!b.contains("origin.test"), "{b}");
    let line = bed
        .agent()
        .wait_decision(&[("route_name", &"partner.test")])
        .unwrap();
    assert_eq!(line.get("rule_kind"), "proxy_route", "{line}");
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

/// Optimistic CONNECT against a real squid: after squid answered one CONNECT with 200, egress
/// sends each next CONNECT and the client's ClientHello in one write; squid passes the
/// ClientHello on once its tunnel is open, so the TLS handshake with the origin completes and
/// curl gets the page. When squid refuses such a CONNECT (its stock rule: CONNECT to port 443
/// only), the client is reset and nothing reaches the origin, directly or otherwise. With
/// `--no-optimistic-connect` naming the proxy, every answer is awaited.
#[test]
fn optimistic_connect_through_squid_and_a_refusal() {
    use egress_testbed::{LAN, ORIGIN_NAME, PROXY_IP, SQUID_STRICT_PORT};
    let mut bed = Testbed::builder().squid_strict().nginx().build().unwrap();
    let strict = format!("http://{PROXY_USER}:{PROXY_PASSWORD}@{PROXY_IP}:{SQUID_STRICT_PORT}");
    bed.start_agent(&["--https-proxy", &strict, "--ip-range-whitelist", LAN])
        .unwrap();
    for _ in 0..3 {
        let result = bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap();
        assert_eq!(result.code, Some(0), "{result:?}\n{}", bed.agent().log());
        assert_eq!(result.stdout, "origin ok 443\n");
    }
    assert_eq!(optimistic(&bed, 3), ["no", "yes", "yes"], "{}", bed.agent().log());

    // Refused by squid after the ClientHello went out with the CONNECT.
    let result = bed.curl(&format!("https://{ORIGIN_NAME}:8448/")).unwrap();
    assert_ne!(result.code, Some(0), "{result:?}");
    assert!(
        result.stderr.contains("reset"),
        "the client sees a reset: {result:?}"
    );
    let refused = bed.agent().wait_decision(&[("status", &"403")]).unwrap();
    assert_eq!(refused.get("outcome"), "error", "{refused}");
    bed.wait_squid_log("the refused CONNECT", |l| {
        l.lines()
            .any(|line| line.contains("TCP_DENIED/403") && line.contains(":8448"))
    })
    .unwrap();
    let origin = bed
        .wait_origin_log("three requests", |l| l.lines().count() >= 3)
        .unwrap();
    assert_eq!(origin.lines().count(), 3, "only the three allowed ones: {origin}");
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);

    bed.start_agent(&[
        "--https-proxy",
        &strict,
        "--ip-range-whitelist",
        LAN,
        "--no-optimistic-connect",
        PROXY_IP,
    ])
    .unwrap();
    for _ in 0..2 {
        let result = bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap();
        assert_eq!(result.code, Some(0), "{result:?}");
    }
    assert_eq!(optimistic(&bed, 2), ["no", "no"]);
}

/// The `optimistic` field of this agent run's first `n` decision records.
fn optimistic(bed: &Testbed, n: usize) -> Vec<String> {
    let decisions = bed.agent().wait_decisions(n).unwrap();
    decisions.iter().map(|d| d.get("optimistic")).collect()
}
