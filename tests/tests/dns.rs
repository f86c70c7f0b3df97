//! DNS-aware routing: the agent learns, from the intercepted processes' own DNS answers (copied
//! by the kernel programs), which names stand behind the addresses they dial, and routes by them.
//! Real dnsmasq, real squid, real Synapses, the real kernel programs.

use std::time::Duration;

use egress_testbed::{
    HS_IP, ORIGIN_IP, ORIGIN_IP_2, PROXY_IP, Testbed, narrow_whitelist_args,
    peers::{
        PREVIEW_TITLE,
        federation::{DirectFederation, EtcGuard, PeerHomeserver, federation_overrides, register_with_name},
        make_certs,
        resolvers::Resolution,
        start_dnsmasq_on,
        synapse::{Synapse, client_get, query_encode},
    },
    process::{self, Daemon},
};

/// A server that speaks first (as SMTP does): it greets each client with the address the
/// connection came from, and closes.
const BANNER_SERVER: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
while True:
    c, addr = s.accept()
    c.sendall(("220 client %s\r\n" % addr[0]).encode()); c.close()
"#;

/// Resolves NAME (IPv4, through the system resolver: glibc's DNS client) or takes an address,
/// connects to it without sending anything, and prints the server's greeting.
const SILENT_CLIENT: &str = r#"
import socket, sys
addr = socket.getaddrinfo(sys.argv[1], int(sys.argv[2]), socket.AF_INET, socket.SOCK_STREAM)[0][4]
s = socket.create_connection(addr, timeout=20)
print(s.recv(200).decode().strip())
"#;

const BANNER_PORT: u16 = 2525;

/// Starts the agent with squid as https_proxy, only the proxy and the origin's first address
/// whitelisted, and `extra`.
fn start_agent(bed: &mut Testbed, extra: &[&str]) {
    let proxy = bed.proxy_url(egress_testbed::PROXY_PASSWORD);
    let mut args = vec!["--https-proxy", &proxy];
    args.extend_from_slice(extra);
    let whitelist = narrow_whitelist_args();
    args.extend(whitelist.iter().map(String::as_str));
    bed.start_agent(&args).unwrap();
}

fn start_banner(bed: &Testbed) -> Daemon {
    bed.start_daemon(
        &bed.origin,
        process::Enter::Net,
        "banner",
        "python3",
        &["-c", BANNER_SERVER, ORIGIN_IP, &BANNER_PORT.to_string()],
        &[BANNER_PORT],
    )
    .unwrap()
}

/// Runs SILENT_CLIENT for `target` in the intercepted cgroup, with the homeserver host's resolver.
fn greet(bed: &Testbed, target: &str) -> String {
    let out = process::output(bed.hs_command(
        Some(&bed.cgroup.path),
        "python3",
        &["-c", SILENT_CLIENT, target, &BANNER_PORT.to_string()],
    ))
    .unwrap();
    assert_eq!(out.code, Some(0), "{target}: {out:?}");
    out.stdout.trim().to_owned()
}

/// A protocol with neither SNI nor Host still gets a name: the one the application resolved.
/// no_proxy names then work for it, and the proxy is asked for the name, not the address.
#[test]
fn protocols_without_sni_or_host_go_by_the_name_the_application_resolved() {
    let hosts = format!("{ORIGIN_IP} relay.internal.test\n{ORIGIN_IP} smtp.test\n");
    let mut bed = Testbed::builder()
        .squid_hosts(&hosts)
        .dns(&hosts, &[])
        .build()
        .unwrap();
    let _banner = start_banner(&bed);
    start_agent(&mut bed, &["--no-proxy", "internal.test"]);

    // Before any lookup, the address is all there is: CONNECT by address.
    assert_eq!(greet(&bed, ORIGIN_IP), format!("220 client {PROXY_IP}"));
    let line = bed
        .agent()
        .wait_decision(&[("target", &format!("{ORIGIN_IP}:{BANNER_PORT}"))])
        .unwrap();
    assert!(
        line.get("named_by") == "address" && line.get("route") == "proxy-connect",
        "{line}"
    );

    // Resolved as smtp.test: CONNECT smtp.test, and squid resolves it.
    assert_eq!(greet(&bed, "smtp.test"), format!("220 client {PROXY_IP}"));
    let line = bed
        .agent()
        .wait_decision(&[("target", &format!("smtp.test:{BANNER_PORT}"))])
        .unwrap();
    assert!(
        line.get("named_by") == "dns" && line.get("dns_name") == "smtp.test",
        "{line}"
    );
    bed.squid_logged(&format!("CONNECT smtp.test:{BANNER_PORT}"))
        .unwrap();

    // Resolved as relay.internal.test, in no_proxy: direct, from the homeserver host.
    assert_eq!(greet(&bed, "relay.internal.test"), format!("220 client {HS_IP}"));
    let line = bed
        .agent()
        .wait_decision(&[("route", &"direct"), ("route_name", &"relay.internal.test")])
        .unwrap();
    assert!(
        line.get("rule_kind") == "no_proxy" && line.get("named_by") == "dns",
        "{line}"
    );
    assert!(bed.agent().counter("dns_captured").unwrap() >= 4);
}

/// A DNS answer nobody asked for teaches nothing: a local user outside the cgroup sends the
/// homeserver's DNS socket a forged answer naming the origin's address as a no_proxy host; the
/// homeserver's next connection to that address still goes through squid.
#[test]
fn forged_dns_answers_are_not_believed() {
    let hosts = format!("{ORIGIN_IP} smtp.test\n");
    let mut bed = Testbed::builder()
        .squid_hosts(&hosts)
        .dns(&hosts, &[])
        .build()
        .unwrap();
    let _banner = start_banner(&bed);
    start_agent(&mut bed, &["--no-proxy", "internal.test"]);

    // The homeserver asks a resolver that never answers (127.0.0.3), from port 5300; the forger,
    // from 127.0.0.2:53, answers with the query's own id and question. Then the homeserver
    // connects to the address the forgery named.
    let homeserver = format!(
        r#"
import socket, struct, sys, time
q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\x05relay\x08internal\x04test\x00" + struct.pack(">HH", 1, 1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 5300))
u.sendto(q, ("127.0.0.3", 53))
u.settimeout(10); data, src = u.recvfrom(512)
print("forged answer from", src)
c = socket.create_connection(("{ORIGIN_IP}", {BANNER_PORT}), timeout=20)
print(c.recv(200).decode().strip())
"#
    );
    let forger = format!(
        r#"
import socket, struct, time
q = struct.pack(">HHHHHH", 0x4242, 0x8180, 1, 1, 0, 0) + b"\x05relay\x08internal\x04test\x00" + struct.pack(">HH", 1, 1)
a = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 300, 4) + socket.inet_aton("{ORIGIN_IP}")
f = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); f.bind(("127.0.0.2", 53))
for _ in range(20):
    f.sendto(q + a, ("127.0.0.1", 5300)); time.sleep(0.1)
"#
    );
    let captured = bed.agent().counter("dns_captured").unwrap();
    let client = bed
        .spawn_in(&bed.cgroup.path, "python3", &["-c", &homeserver])
        .unwrap();
    // The query is on record (the kernel copied it) before any forgery arrives.
    egress_testbed::wait::until(
        "the homeserver's query to be captured",
        egress_testbed::wait::SHORT,
        || bed.agent().counter("dns_captured"),
        |n| *n > captured,
    )
    .unwrap();
    let forged = bed.run_in_hs("python3", &["-c", &forger]).unwrap();
    assert_eq!(forged.code, Some(0), "{forged:?}");
    let out = client.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("forged answer from ('127.0.0.2', 53)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("220 client {PROXY_IP}")),
        "went direct: {stdout}"
    );
    let line = bed
        .agent()
        .wait_decision(&[("original_dst", &format!("{ORIGIN_IP}:{BANNER_PORT}"))])
        .unwrap();
    assert!(
        line.get("route") == "proxy-connect" && line.get("named_by") == "address",
        "{line}"
    );
    // The kernel did hand the forgery over: it was refused by the agent, not missed.
    assert!(bed.agent().counter("dns_captured").unwrap() >= 2);
}

/// The SRV-delegation bug, with two real Synapses: hs2 (delegated.test) delegates federation by
/// SRV to fed2.test, and delegated.test's own address is a web host with nothing on 8448 (and,
/// here, blacklisted). hs1, in the intercepted cgroup with no proxy settings, dials fed2.test's
/// address with SNI delegated.test; egress must CONNECT to fed2.test:8448, as Synapse's own
/// proxy support would, not to delegated.test:8448.
#[test]
fn srv_delegated_federation_connects_to_the_srv_target() {
    let hosts = format!("{ORIGIN_IP_2} delegated.test\n{ORIGIN_IP} fed2.test\n");
    let mut bed = Testbed::builder()
        .squid_hosts(&hosts)
        .dns(&hosts, &[("_matrix-fed._tcp.delegated.test", "fed2.test", 8448)])
        .build()
        .unwrap();
    let direct_federation = DirectFederation::install(&bed.origin, HS_IP).unwrap();
    start_agent(&mut bed, &[]);
    let proxy = bed.proxy_url(egress_testbed::PROXY_PASSWORD);

    // hs2 listens for federation on the origin's first address only: delegated.test's address
    // has nothing on 8448.
    let hs2_certs = make_certs(&bed.dir, "hs2", &["delegated.test"], &[], 2).unwrap();
    let hs2 = PeerHomeserver::start(
        &bed,
        "delegated.test",
        ORIGIN_IP,
        &hs2_certs,
        &format!("{HS_IP} hs.test\n"),
        &[],
    )
    .unwrap();
    let hs1_certs = make_certs(&bed.dir, "hs1", &["hs.test"], &[HS_IP], 2).unwrap();
    let hs1_dir = bed.dir.join("synapse");
    let hs1 = Synapse::start(&bed, &federation_overrides(&hs1_dir, &hs1_certs, HS_IP)).unwrap();
    let in_hs1 = |args: &[&str]| {
        let out = bed.run_in_hs(args[0], &args[1..]).unwrap();
        format!("{}{}", out.stdout, out.stderr)
    };
    let in_hs2 = |args: &[&str]| hs2.run(args);
    register_with_name(&in_hs1, &hs1.dir, "alice", "Alice on hs1");
    register_with_name(&in_hs2, &hs2.dir, "bob", "Bob on hs2");

    let bob = in_hs1(&[
        "curl",
        "-sS",
        "--max-time",
        "90",
        "http://127.0.0.1:8008/_matrix/client/v3/profile/@bob:delegated.test",
    ]);
    assert!(
        bob.contains("Bob on hs2"),
        "hs1 asking hs2 for bob's profile: {bob}\n{}",
        hs1.log()
    );
    let alice = in_hs2(&[
        "curl",
        "-sS",
        "--max-time",
        "90",
        "http://127.0.0.1:8008/_matrix/client/v3/profile/@alice:hs.test",
    ]);
    assert!(
        alice.contains("Alice on hs1"),
        "hs2 asking hs1 for alice's profile: {alice}"
    );

    // `egress explain` shows what the record knows about the address hs1 dialled.
    let whitelist_origin = format!("{ORIGIN_IP}/32");
    let explain_args = [
        "explain",
        "delegated.test:8448",
        "--ip",
        ORIGIN_IP,
        "--https-proxy",
        &proxy,
        "--ip-range-whitelist",
        &whitelist_origin,
    ];
    // In the agent's namespace, where its admin listener is.
    let explained = process::output(process::launch(
        Some(&bed.hs.name),
        process::Enter::Net,
        None,
        egress_testbed::egress_bin(),
        &explain_args,
    ))
    .unwrap();
    assert!(
        explained.stdout.contains("fed2.test -> 10.248.0.30")
            && explained.stdout.contains("delegated.test -> 10.248.0.31")
            && explained
                .stdout
                .contains("_matrix-fed._tcp.delegated.test SRV fed2.test:8448")
            && explained.stdout.contains("TLS (SNI): CONNECT fed2.test:8448")
            && explained.stdout.contains("name: dns"),
        "{explained:?}"
    );

    // Decision lines and squid's entries come when the tunnels close: stop hs1.
    hs1.stop().unwrap();
    let line = bed
        .agent()
        .wait_decision(&[("target", &"fed2.test:8448"), ("status", &"200")])
        .unwrap();
    assert!(
        line.get("name") == "delegated.test"
            && line.get("named_by") == "dns"
            && line.get("route") == "proxy-connect",
        "{line}"
    );
    let log = bed.squid_logged("CONNECT fed2.test:8448").unwrap();
    assert!(!log.contains("CONNECT delegated.test:8448"), "{log}");
    assert_eq!(
        direct_federation.packets().unwrap(),
        0,
        "hs1 reached hs2 directly"
    );
}

/// The same delegation, with the SRV target's address resolved where the kernel programs
/// cannot see it, on a host whose resolution is real: from the hosts file, through a running
/// nscd, and through systemd-resolved with nss-resolve (Synapse's own SRV lookup still goes as
/// UDP to the resolver, as Twisted sends it). The record has the delegation but not the target's
/// address; egress must still CONNECT to fed2.test:8448 (the release before CONNECTed to
/// delegated.test:8448, the web host), having checked the target with its own lookup through
/// the same resolver.
#[test]
fn srv_targets_resolved_off_the_wire_are_connected_by_name() {
    let dns_hosts = format!("{ORIGIN_IP_2} delegated.test\n{ORIGIN_IP} fed2.test\n");
    let mut bed = Testbed::builder()
        .squid_hosts(&dns_hosts)
        .dns(
            &dns_hosts,
            &[("_matrix-fed._tcp.delegated.test", "fed2.test", 8448)],
        )
        .build()
        .unwrap();
    let direct_federation = DirectFederation::install(&bed.origin, HS_IP).unwrap();
    let hs2_certs = make_certs(&bed.dir, "hs2", &["delegated.test"], &[], 2).unwrap();
    let hs2 = PeerHomeserver::start(
        &bed,
        "delegated.test",
        ORIGIN_IP,
        &hs2_certs,
        &format!("{HS_IP} hs.test\n"),
        &[],
    )
    .unwrap();
    let in_hs2 = |args: &[&str]| hs2.run(args);
    register_with_name(&in_hs2, &hs2.dir, "bob", "Bob on hs2");
    let hs1_certs = make_certs(&bed.dir, "hs1", &["hs.test"], &[HS_IP], 2).unwrap();

    for (resolution, hosts_file) in [
        (Resolution::Files, format!("{ORIGIN_IP} fed2.test\n")),
        (Resolution::Nscd, String::new()),
        (Resolution::Resolved, String::new()),
    ] {
        let mode = resolution.as_str();
        bed.use_host_view(resolution, &hosts_file).unwrap();
        start_agent(&mut bed, &[]);
        let hs1_dir = bed.dir.join("synapse");
        let _ = std::fs::remove_dir_all(&hs1_dir);
        let hs1 = Synapse::start(&bed, &federation_overrides(&hs1_dir, &hs1_certs, HS_IP)).unwrap();
        let bob = bed
            .run_in_hs(
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "90",
                    "http://127.0.0.1:8008/_matrix/client/v3/profile/@bob:delegated.test",
                ],
            )
            .unwrap();
        assert!(
            bob.stdout.contains("Bob on hs2"),
            "{mode}: hs1 asking hs2 for bob's profile: {bob:?}\n{}",
            hs1.log()
        );
        // Decision lines and squid's entries come when the tunnels close: stop hs1.
        hs1.stop().unwrap();
        let line = bed
            .agent()
            .wait_decision(&[("target", &"fed2.test:8448"), ("status", &"200")])
            .unwrap();
        assert_eq!(
            (
                line.get("name").as_str(),
                line.get("named_by").as_str(),
                line.get("lookup").as_str()
            ),
            ("delegated.test", "srv_lookup", "done"),
            "{mode}: {line}"
        );
        // What the lookup cost (for docs/dns.md; the first connection to the target pays it).
        let lookups: Vec<String> = bed
            .agent()
            .decisions()
            .iter()
            .filter(|d| d.get("lookup") == "done")
            .map(|d| d.get("lookup_us"))
            .collect();
        eprintln!("{mode}: lookup_us of the connections that looked up: {lookups:?}");
        assert!(
            !bed.agent()
                .decisions()
                .iter()
                .any(|d| d.get("target") == "delegated.test:8448"),
            "{mode}: a connection went to the server name's web host"
        );
        // The target's address was never on the homeserver's wire.
        let (_, record) = bed.agent().admin_get("/dns?name=fed2.test").unwrap();
        assert!(record.contains("knows nothing"), "{mode}: {record}");
        let view = bed.host_view().unwrap();
        match resolution {
            Resolution::Files => {}
            Resolution::Nscd => assert!(
                view.daemon_log().contains("GETAI (fed2.test)"),
                "{}",
                view.daemon_log()
            ),
            Resolution::Resolved => assert!(
                view.daemon_log().contains("ResolveHostname") && view.daemon_log().contains("fed2.test"),
                "{}",
                view.daemon_log()
            ),
        }
        bed.stop_agent();
    }
    let log = bed.squid_access_log();
    assert!(log.matches("CONNECT fed2.test:8448").count() >= 3, "{log}");
    assert!(!log.contains("CONNECT delegated.test:8448"), "{log}");
    assert_eq!(
        direct_federation.packets().unwrap(),
        0,
        "hs1 reached hs2 directly"
    );
}

/// A resolver that truncates over UDP (dnsmasq, past 512 bytes for a client without EDNS), as
/// glibc meets it: it asks again over TCP to port 53. That connection goes direct to the resolver
/// the application is configured with and that just truncated (a proxy would refuse CONNECT to
/// port 53), and its answer is read into the record like a UDP one. TCP to port 53 of any other
/// address goes the usual way, and a stream to the resolver that is not strictly DNS is reset.
#[test]
fn dns_over_tcp_after_a_truncated_answer_reaches_the_resolver_and_is_read() {
    let mut bed = Testbed::builder().squid().dns("", &[]).build().unwrap();
    let big: String = (1..=40).map(|i| format!("10.249.7.{i} big.test\n")).collect();
    let _resolver =
        egress_testbed::peers::start_dnsmasq_on(&bed.proxy, &bed.dir, PROXY_IP, &big, &[], &[]).unwrap();
    egress_testbed::wait::ready("dnsmasq on the proxy host", egress_testbed::wait::STARTUP, || {
        Ok(bed.proxy.is_listening_udp(53))
    })
    .unwrap();
    bed.use_host_view_with(Resolution::Files, "", PROXY_IP).unwrap();
    start_agent(&mut bed, &[]);

    let out = bed.run_in_cgroup("getent", &["ahostsv4", "big.test"]).unwrap();
    let addresses: std::collections::BTreeSet<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(addresses.len(), 40, "{out:?}");
    let line = bed
        .agent()
        .wait_decision(&[("target", &format!("{PROXY_IP}:53"))])
        .unwrap();
    assert_eq!(
        (
            line.get("route").as_str(),
            line.get("rule_kind").as_str(),
            line.get("outcome").as_str()
        ),
        ("direct", "resolver", "ok"),
        "{line}"
    );
    // The answer that came over TCP names every address (a truncated UDP answer cannot hold 40).
    let (_, record) = bed.agent().admin_get("/dns?name=big.test").unwrap();
    assert_eq!(record.matches("big.test -> 10.249.7.").count(), 40, "{record}");

    // Not DNS, to the same resolver: reset, never relayed. Nor a real query with a payload
    // after it in the same frame (a tunnel dressed as DNS).
    let garbage = r#"
import socket, struct, sys
if sys.argv[2] == "http":
    frame = b"GET / HTTP/1.1\r\n\r\n"
else:
    labels = b"".join(bytes([len(l)]) + l.encode() for l in "big.test".split("."))
    frame = struct.pack(">HHHHHH", 5, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack(">HH", 1, 1) + b"payload"
s = socket.create_connection((sys.argv[1], 53), timeout=5)
s.sendall(struct.pack(">H", len(frame)) + frame)
try:
    print("eof" if not s.recv(100) else "answered")
except ConnectionResetError:
    print("reset")
"#;
    for (kind, error) in [
        ("http", "no DNS message"),
        ("trailing", "7 bytes after a DNS message"),
    ] {
        let out = bed
            .run_in_cgroup("python3", &["-c", garbage, PROXY_IP, kind])
            .unwrap();
        assert_eq!(out.stdout.trim(), "reset", "{kind}: {out:?}");
        let refused = bed
            .agent()
            .wait_line(error, |l| l.is_decision() && l.get("error").contains(error))
            .unwrap();
        assert_eq!(refused.get("target"), format!("{PROXY_IP}:53"), "{refused}");
    }
    // TCP to port 53 of an address the application never asked: through the proxy as before.
    let out = bed
        .run_in_cgroup("python3", &["-c", garbage, ORIGIN_IP, "http"])
        .unwrap();
    assert_ne!(out.stdout.trim(), "answered", "{out:?}");
    let other = bed
        .agent()
        .wait_decision(&[("original_dst", &format!("{ORIGIN_IP}:53"))])
        .unwrap();
    assert_eq!(other.get("route"), "proxy-connect", "{other}");
}

/// The record is bounded: a flood of distinct names leaves at most its bound of entries, the
/// newest kept.
#[test]
fn the_record_stays_bounded_under_a_flood_of_names() {
    const NAMES: usize = 3000;
    let hosts: String = (0..NAMES)
        .map(|i| format!("{ORIGIN_IP} n{i}.flood.test\n"))
        .collect();
    let mut bed = Testbed::builder().dns(&hosts, &[]).build().unwrap();
    bed.start_default_agent().unwrap();
    let script = format!(
        "import socket\nfor i in range({NAMES}):\n    socket.getaddrinfo('n%d.flood.test' % i, 80, socket.AF_INET)\n"
    );
    let out = process::output(bed.hs_command(Some(&bed.cgroup.path), "python3", &["-c", &script])).unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    let (status, body) = bed
        .agent()
        .admin_get(&format!("/dns?name=n{}.flood.test", NAMES - 1))
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let report = answer["report"].as_str().unwrap();
    assert!(
        report.contains(&format!("n{}.flood.test -> {ORIGIN_IP}", NAMES - 1)),
        "{report}"
    );
    let entries: usize = report
        .split_once(" entries)")
        .and_then(|(head, _)| head.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no entry count in {report}"));
    assert!((1000..=2048).contains(&entries), "{entries} entries");
    let (_, oldest) = bed.agent().admin_get("/dns?name=n0.flood.test").unwrap();
    assert!(oldest.contains("knows nothing"), "{oldest}");
    assert_eq!(bed.agent().counter("dns_lost").unwrap(), 0);
}

/// An HTTPS origin serving /preview.html (Open Graph title PREVIEW_TITLE) and 404 for the rest.
const PREVIEW_SERVER: &str = r#"
import http.server, ssl, sys
PAGE = ('<html><head><title>t</title><meta property="og:title" content="%s"></head>'
        '<body>hello</body></html>' % sys.argv[4]).encode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if not self.path.startswith("/preview.html"):
            self.send_error(404); return
        self.send_response(200); self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE))); self.end_headers(); self.wfile.write(PAGE)
srv = http.server.ThreadingHTTPServer((sys.argv[1], 443), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

/// A DMZ: the homeserver host's only resolver is an internal one (dnsmasq on its loopback) that
/// knows internal names alone, and answers NXDOMAIN for the rest of .test.
struct InternalResolver {
    log: std::path::PathBuf,
    _dns: Daemon,
    _etc: EtcGuard,
}

impl InternalResolver {
    fn start(bed: &Testbed) -> Self {
        let etc = std::path::PathBuf::from("/etc/netns").join(&bed.hs.name);
        std::fs::create_dir_all(&etc).unwrap();
        let guard = EtcGuard(etc.clone());
        std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        std::fs::write(etc.join("hosts"), "127.0.0.1 localhost\n::1 localhost\n").unwrap();
        let dir = bed.dir.join("internal-dns");
        let dns = start_dnsmasq_on(
            &bed.hs,
            &dir,
            "127.0.0.1",
            &format!("{ORIGIN_IP_2} db.internal.test\n"),
            &[],
            &[],
        )
        .unwrap();
        egress_testbed::wait::ready("the internal resolver", egress_testbed::wait::STARTUP, || {
            Ok(bed.hs.is_listening_udp(53))
        })
        .unwrap();
        Self {
            log: dir.join("dnsmasq-127.0.0.1/dnsmasq.log"),
            _dns: dns,
            _etc: guard,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The agent's arguments for synthetic DNS, with the internal resolver on the host's loopback.
const SYNTHETIC: &[&str] = &[
    "--dns-mode",
    "synthetic",
    "--dns-resolver",
    "127.0.0.1",
    "--no-proxy",
    "internal.test",
];

/// `curl https://origin.test/` in the intercepted cgroup, with the host's resolver (or `resolve`,
/// an address the application kept).
fn fetch(bed: &Testbed, resolve: Option<&str>) -> egress_testbed::ClientResult {
    let ca = bed.certs.ca.to_string_lossy().into_owned();
    let mut args = vec!["-sS", "--max-time", "15", "--cacert", &ca];
    if let Some(resolve) = resolve {
        args.extend(["--resolve", resolve]);
    }
    args.push("https://origin.test/");
    process::output(bed.hs_command(Some(&bed.cgroup.path), "curl", &args)).unwrap()
}

/// `getent ahosts NAME` in the intercepted cgroup (glibc's resolver, both families).
fn lookup(bed: &Testbed, name: &str) -> egress_testbed::ClientResult {
    process::output(bed.hs_command(Some(&bed.cgroup.path), "getent", &["ahosts", name])).unwrap()
}

/// Synthetic DNS on a host without external DNS: Synapse, in the intercepted cgroup with no
/// proxy settings, fetches a URL preview and federates, with every public name answered by a
/// synthetic address that egress CONNECTs by name; only no_proxy names and SRV queries reach the
/// internal resolver.
#[test]
fn synthetic_dns_lets_synapse_preview_and_federate_without_external_dns() {
    let mut bed = Testbed::builder().squid().build().unwrap();
    let resolver = InternalResolver::start(&bed);
    let cert = bed.certs.cert.to_string_lossy().into_owned();
    let key = bed.certs.key.to_string_lossy().into_owned();
    let _origin = bed
        .start_daemon(
            &bed.origin,
            process::Enter::Net,
            "preview-origin",
            "python3",
            &["-c", PREVIEW_SERVER, ORIGIN_IP, &cert, &key, PREVIEW_TITLE],
            &[443],
        )
        .unwrap();
    let direct_federation = DirectFederation::install(&bed.origin, HS_IP).unwrap();
    start_agent(&mut bed, SYNTHETIC);

    let hs2 = PeerHomeserver::start(
        &bed,
        "example.test",
        ORIGIN_IP,
        &bed.certs,
        &format!("{HS_IP} hs.test\n"),
        &[],
    )
    .unwrap();
    let hs1_certs = make_certs(&bed.dir, "hs1", &["hs.test"], &[HS_IP], 2).unwrap();
    let hs1_dir = bed.dir.join("synapse");
    let hs1 = Synapse::start(
        &bed,
        &format!(
            "{}url_preview_enabled: true\nurl_preview_ip_range_blacklist: ['192.0.2.0/24']\n",
            federation_overrides(&hs1_dir, &hs1_certs, HS_IP)
        ),
    )
    .unwrap();
    let in_hs1 = |args: &[&str]| {
        let out = bed.run_in_hs(args[0], &args[1..]).unwrap();
        format!("{}{}", out.stdout, out.stderr)
    };
    register_with_name(&in_hs1, &hs1.dir, "alice", "Alice on hs1");
    register_with_name(&|args| hs2.run(args), &hs2.dir, "bob", "Bob on hs2");
    let token = hs1
        .register_and_login(&bed, "carol", "correct-horse-battery")
        .unwrap();

    let path = format!(
        "/_matrix/client/v1/media/preview_url?url={}",
        query_encode("https://origin.test/preview.html")
    );
    let (status, body) = client_get(&bed, &path, Some(&token)).unwrap();
    assert_eq!(status, 200, "{body}\n{}", hs1.log());
    let preview: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(preview["og:title"], PREVIEW_TITLE, "{body}");

    let bob = in_hs1(&[
        "curl",
        "-sS",
        "--max-time",
        "90",
        "http://127.0.0.1:8008/_matrix/client/v3/profile/@bob:example.test",
    ]);
    assert!(
        bob.contains("Bob on hs2"),
        "hs1 asking hs2 for bob's profile: {bob}\n{}",
        hs1.log()
    );
    let alice = hs2.run(&[
        "curl",
        "-sS",
        "--max-time",
        "90",
        "http://127.0.0.1:8008/_matrix/client/v3/profile/@alice:hs.test",
    ]);
    assert!(
        alice.contains("Alice on hs1"),
        "hs2 asking hs1 for alice's profile: {alice}"
    );

    hs1.stop().unwrap();
    let line = bed
        .agent()
        .wait_decision(&[("target", &"example.test:8448"), ("status", &"200")])
        .unwrap();
    assert!(
        line.get("original_dst").starts_with("240.64.") && line.get("named_by") == "client",
        "{line}"
    );
    bed.squid_logged("CONNECT origin.test:443").unwrap();
    bed.squid_logged("CONNECT example.test:8448").unwrap();
    assert_eq!(
        direct_federation.packets().unwrap(),
        0,
        "hs1 reached hs2 directly"
    );
    // The internal resolver was asked for SRV records, never for a public name's address.
    let asked = resolver.log();
    assert!(
        asked.contains("query[SRV] _matrix-fed._tcp.example.test"),
        "{asked}"
    );
    for public in ["origin.test", "example.test"] {
        assert!(
            !asked.contains(&format!("query[A] {public}")),
            "{public} reached the resolver:\n{asked}"
        );
        assert!(
            !asked.contains(&format!("query[AAAA] {public}")),
            "{public} reached the resolver:\n{asked}"
        );
    }
    assert!(bed.agent().counter("dns_redirected").unwrap() >= 3);
}

/// The permission to use synthetic DNS belongs to the socket the kernel redirected, not to its
/// port: a homeserver process asks one name from UDP port 5399 and exits; a local user outside
/// the cgroup then binds that port and asks the agent's DNS port directly. It gets no answer and
/// no address (the agent says it ignored the query), and the homeserver's next name gets the next
/// address.
#[test]
fn a_dns_port_reused_after_its_socket_closed_gets_no_synthetic_answers() {
    let mut bed = Testbed::builder().squid().build().unwrap();
    let _resolver = InternalResolver::start(&bed);
    start_agent(&mut bed, SYNTHETIC);
    let ask = |name: &str, to: &str| {
        format!(
            r#"
import socket, struct
labels = b"".join(bytes([len(l)]) + l.encode() for l in "{name}".split("."))
q = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 5399)); s.settimeout(3)
s.sendto(q, ("127.0.0.1", {to}))
try:
    a = s.recv(512); print(socket.inet_ntoa(a[-4:]))
except socket.timeout:
    print("no answer")
"#
        )
    };
    let homeserver = process::output(bed.hs_command(
        Some(&bed.cgroup.path),
        "python3",
        &["-c", &ask("first.example.test", "53")],
    ))
    .unwrap();
    let first: std::net::Ipv4Addr = homeserver
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{homeserver:?}"));
    assert!(first.to_string().starts_with("240.64."), "{homeserver:?}");

    // The homeserver's process is gone, and with it its socket: the port is anyone's.
    let outsider = process::output(bed.hs_command(
        None,
        "setpriv",
        &[
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &ask("squatter.example.test", "1001"),
        ],
    ))
    .unwrap();
    assert_eq!(outsider.stdout.trim(), "no answer", "{outsider:?}");
    // It reached the agent, which ignored it (not lost on the way).
    bed.agent()
        .wait_metric(
            "egress_dns_queries_total",
            &[("outcome", "ignored")],
            1,
            Duration::from_secs(5),
        )
        .unwrap();

    let next = process::output(bed.hs_command(
        Some(&bed.cgroup.path),
        "python3",
        &["-c", &ask("second.example.test", "53")],
    ))
    .unwrap();
    let second: std::net::Ipv4Addr = next.stdout.trim().parse().unwrap_or_else(|_| panic!("{next:?}"));
    assert_eq!(
        u32::from(second),
        u32::from(first) + 1,
        "an address went to the outsider"
    );
    assert_eq!(
        bed.agent()
            .metric("egress_dns_queries_total", &[("outcome", "synthesized")])
            .unwrap(),
        2
    );
}

/// A dual-stack socket in the cgroup sends redirected queries from two sources (its v4-mapped
/// and its IPv6 address), then closes. Both permissions go with it: a local user who then binds
/// the IPv4 source gets no answer.
#[test]
fn a_dual_stack_dns_socket_takes_all_its_sources_with_it() {
    let mut bed = Testbed::builder().squid().build().unwrap();
    let _resolver = InternalResolver::start(&bed);
    start_agent(&mut bed, SYNTHETIC);
    let query = |name: &str| {
        format!(
            r#"struct.pack(">HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"".join(bytes([len(l)]) + l.encode() for l in "{name}".split(".")) + b"\x00" + struct.pack(">HH", 1, 1)"#
        )
    };
    let dual_stack = format!(
        r#"
import socket, struct
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); s.bind(("::", 5398)); s.settimeout(3)
for query, resolver in (({v4}, "::ffff:10.9.9.9"), ({v6}, "fd00:9::9")):
    s.sendto(query, (resolver, 53)); print(socket.inet_ntoa(s.recv(512)[-4:]))
s.close()
"#,
        v4 = query("mapped.example.test"),
        v6 = query("six.example.test"),
    );
    let homeserver =
        process::output(bed.hs_command(Some(&bed.cgroup.path), "python3", &["-c", &dual_stack])).unwrap();
    let answers: Vec<&str> = homeserver.stdout.lines().collect();
    assert_eq!(answers.len(), 2, "{homeserver:?}");
    assert!(answers.iter().all(|a| a.starts_with("240.64.")), "{homeserver:?}");

    let outsider = format!(
        r#"
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 5398)); s.settimeout(3)
s.sendto({q}, ("127.0.0.1", 1001))
try:
    print(socket.inet_ntoa(s.recv(512)[-4:]))
except socket.timeout:
    print("no answer")
"#,
        q = query("squatter.example.test"),
    );
    let outsider = process::output(bed.hs_command(
        None,
        "setpriv",
        &[
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &outsider,
        ],
    ))
    .unwrap();
    assert_eq!(outsider.stdout.trim(), "no answer", "{outsider:?}");
    bed.agent()
        .wait_metric(
            "egress_dns_queries_total",
            &[("outcome", "ignored")],
            1,
            Duration::from_secs(5),
        )
        .unwrap();
}

/// Synthetic mappings outlive the agent: an application that keeps an address past a restart
/// still reaches the name behind it, and the name keeps its address. While no agent runs, DNS
/// from the cgroup goes nowhere (never to the host's resolver). no_proxy names get their real
/// address from the internal resolver.
#[test]
fn synthetic_addresses_survive_an_agent_restart_and_dns_fails_closed_without_an_agent() {
    let mut bed = Testbed::builder().squid().nginx().build().unwrap();
    let resolver = InternalResolver::start(&bed);
    start_agent(&mut bed, SYNTHETIC);

    let first = lookup(&bed, "origin.test");
    assert_eq!(first.code, Some(0), "{first:?}");
    let address = first.stdout.split_whitespace().next().unwrap().to_owned();
    assert!(address.starts_with("240.64."), "{first:?}");
    assert!(!first.stdout.contains(':'), "no IPv6 address: {first:?}");
    let internal = lookup(&bed, "db.internal.test");
    assert!(internal.stdout.starts_with(ORIGIN_IP_2), "{internal:?}");

    let before = fetch(&bed, None);
    assert_eq!(before.code, Some(0), "{before:?}");

    // A local user outside the cgroup, asking the agent's DNS port directly, gets no answer and
    // no address; the next name of the homeserver's gets the next address.
    let squatter = r#"
import socket, struct
q = struct.pack(">HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"\x08squatter\x07example\x00" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
s.sendto(q, ("127.0.0.1", 1001))
try:
    s.recvfrom(512); print("answered")
except socket.timeout:
    print("no answer")
"#;
    let outside = bed.run_in_hs("python3", &["-c", squatter]).unwrap();
    assert_eq!(outside.stdout.trim(), "no answer", "{outside:?}");
    let next = lookup(&bed, "next.example.test");
    let next_address: std::net::Ipv4Addr = next.stdout.split_whitespace().next().unwrap().parse().unwrap();
    let first_address: std::net::Ipv4Addr = address.parse().unwrap();
    assert_eq!(u32::from(next_address), u32::from(first_address) + 1, "{next:?}");
    // DNS over TCP is refused in the cgroup, also to a loopback resolver.
    let tcp = process::output(bed.hs_command(
        Some(&bed.cgroup.path),
        "python3",
        &["-c", "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 53), timeout=5); print('connected')\nexcept OSError as e:\n    print(e.errno)"],
    ))
    .unwrap();
    assert_eq!(tcp.stdout.trim(), "1", "EPERM (errno 1) expected: {tcp:?}");

    // No agent: the cgroup's DNS is refused, not sent to the resolver.
    bed.stop_agent();
    let asked_before = resolver.log().matches("query[").count();
    let refused = lookup(&bed, "fresh.example.test");
    assert_ne!(refused.code, Some(0), "{refused:?}");
    assert_eq!(
        resolver.log().matches("query[").count(),
        asked_before,
        "{}",
        resolver.log()
    );

    start_agent(&mut bed, SYNTHETIC);
    // An application still holding the address: reaches origin.test through squid.
    let resolve = format!("origin.test:443:{address}");
    let after = fetch(&bed, Some(&resolve));
    assert_eq!(after.code, Some(0), "{after:?}\n{}", bed.agent().log());
    let line = bed
        .agent()
        .wait_decision(&[
            ("original_dst", &format!("{address}:443")),
            ("target", &"origin.test:443"),
        ])
        .unwrap();
    assert!(line.get("route") == "proxy-connect", "{line}");
    let again = lookup(&bed, "origin.test");
    assert!(again.stdout.starts_with(&format!("{address} ")), "{again:?}");
    assert!(
        !resolver.log().contains("query[A] origin.test"),
        "{}",
        resolver.log()
    );
}
