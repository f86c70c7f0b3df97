//! The trust boundary, attacked as a local user outside the intercepted cgroup or a compromised
//! homeserver inside it would: squatting egress's listener port, forging original destinations,
//! names that point past the blacklist, forwarded requests that leak credentials, passwords in
//! error output, and idle connections that hold the agent's descriptors.
//!
//! Root only.

use std::{io::Read, process::Stdio, time::Duration};

use egress_testbed::{
    ORIGIN_IP, ORIGIN_IP_2, ORIGIN_NAME, PROXY_USER, Testbed, narrow_whitelist_args,
    process::{TempDir, egress},
    procfs, wait,
};

/// Listens on port argv[1] of the loopback addresses argv[2..], prints `listening` (or the
/// errno's name if it cannot), then one `accepted` line per connection until killed.
const SQUATTER: &str = r#"
import errno, socket, sys, threading
socks = []
try:
    for host in sys.argv[2:]:
        s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)
        s.bind((host, int(sys.argv[1]))); s.listen(16); socks.append(s)
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)), flush=True); sys.exit(1)
print('listening', flush=True)
def serve(s):
    while True:
        c, peer = s.accept(); print('accepted', peer, flush=True); c.close()
for s in socks[1:]:
    threading.Thread(target=serve, args=(s,), daemon=True).start()
serve(socks[0])
"#;

/// Connects to argv[1]:argv[2] from local port argv[3] (bound on 0.0.0.0), with socket mark
/// argv[4] if given, and prints `connected` or the errno's name.
const CONNECT_FROM_PORT: &str = r#"
import errno, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if len(sys.argv) > 4:
    s.setsockopt(socket.SOL_SOCKET, 36, int(sys.argv[4], 0))  # SO_MARK
s.bind(('0.0.0.0', int(sys.argv[3]))); s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print('connected')
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
"#;

/// From 127.0.0.1:argv[1], connects to egress's listener (the default port) directly, sends an HTTP request for
/// origin.test and prints what came back (`reset`, `eof` or the first bytes).
const FORGE_FROM_PORT: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', int(sys.argv[1]))); s.settimeout(10)
try:
    s.connect(('127.0.0.1', 1001))
    s.sendall(b'GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n')
    data = s.recv(100); print('eof' if not data else repr(data))
except (ConnectionResetError, BrokenPipeError):
    print('reset')
"#;

/// `python3 args...` as `nobody` (Debian's python: the test runner's may live under /root).
fn python_as_nobody<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec![
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "/usr/bin/python3",
    ];
    all.extend_from_slice(args);
    all
}

/// Reads the squatter's first line.
fn first_line(child: &mut std::process::Child) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while child.stdout.as_mut().unwrap().read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[test]
fn a_squatter_on_the_listener_port_gets_nothing_and_egress_refuses_to_share_it() {
    let mut bed = Testbed::standard();

    // The default port is below 1024: an unprivileged user cannot even bind it.
    let args = python_as_nobody(&["-c", SQUATTER, "1001", "127.0.0.1"]);
    let output = bed.hs_command(None, args[0], &args[1..]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "EACCES");

    // On a port anyone may bind (as an admin may configure), the kernel still redirects only to
    // egress's own listener.
    bed.start_agent_with(&["--listen-port", "15001"]).unwrap();
    bed.agent().logged("is one any local user may bind").unwrap();
    bed.stop_agent(); // the programs stay attached
    let before = bed.agent().counter("deny_not_agent_listener").unwrap();

    // While egress is down, an unprivileged local user takes both loopback ports.
    let args = python_as_nobody(&["-c", SQUATTER, "15001", "127.0.0.1", "::1"]);
    let mut squatter = bed
        .hs_command(None, args[0], &args[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(first_line(&mut squatter), "listening");

    // Connects from the cgroup are refused in the kernel; the squatter gets nothing.
    assert_eq!(bed.tcp_connect(ORIGIN_IP, 443).unwrap(), "EPERM");
    assert_eq!(bed.tcp_connect(egress_testbed::ORIGIN_IP6, 443).unwrap(), "EPERM");
    assert_eq!(
        bed.agent().counter("deny_not_agent_listener").unwrap(),
        before + 2,
        "the kernel saw a listener that is not egress's"
    );

    // egress will not start beside the squatter, nor on half its ports.
    let refused = bed
        .start_agent_with(&["--listen-port", "15001"])
        .err()
        .expect("egress started on a taken port");
    let refused = format!("{refused:#}");
    assert!(
        refused.contains("127.0.0.1:15001") && refused.contains("does not run half-listening"),
        "{refused}"
    );
    let _ = squatter.kill();
    let output = squatter.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&output.stdout);
    assert!(
        !seen.contains("accepted"),
        "the squatter got a connection: {seen}"
    );

    let args = python_as_nobody(&["-c", SQUATTER, "15001", "::1"]);
    let mut v6_only = bed
        .hs_command(None, args[0], &args[1..])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(first_line(&mut v6_only), "listening");
    let refused = bed
        .start_agent_with(&["--listen-port", "15001"])
        .err()
        .expect("egress ran without [::1]");
    assert!(format!("{refused:#}").contains("[::1]:15001"), "{refused:#}");
    let _ = v6_only.kill();
    let _ = v6_only.wait();

    // With the port free again egress starts, and traffic flows through squid only.
    bed.start_agent_with(&["--listen-port", "15001"]).unwrap();
    let fetched = bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap();
    assert_eq!(fetched.code, Some(0), "{fetched:?}");
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

/// A connect refused while egress is down, and one made from a network namespace of the
/// client's own (as `unshare -rn` gives any user), leave nothing behind that a process outside
/// the cgroup could claim by connecting to egress from the same local address.
#[test]
fn forged_original_destinations_are_reset_with_the_reason() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();

    // 1. A connect while the agent is down.
    bed.stop_agent();
    let stale_port = "40101";
    let connect = bed
        .run_in_cgroup(
            "python3",
            &["-c", CONNECT_FROM_PORT, ORIGIN_IP, "443", stale_port],
        )
        .unwrap();
    assert_eq!(connect.stdout.trim(), "EPERM", "{connect:?}");

    // 2. A connect from a network namespace of the client's own. egress serves the namespaces
    //    of intercepted processes, so depending on whether its scan found this one yet, the
    //    connect is refused or served there (under that namespace's key); never direct.
    bed.start_default_agent().unwrap();
    let own_ns_port = "40102";
    let script = format!("ip link set lo up && exec python3 -c \"$0\" {ORIGIN_IP} 443 {own_ns_port}");
    let connect = bed
        .run_in_cgroup("unshare", &["-n", "sh", "-c", &script, CONNECT_FROM_PORT])
        .unwrap();
    assert!(
        matches!(connect.stdout.trim(), "EPERM" | "connected"),
        "{connect:?}"
    );
    // There it may set any mark, egress's included: not taken for egress's own socket.
    let passed = bed.agent().counter("pass_agent").unwrap();
    let script = format!("ip link set lo up && exec python3 -c \"$0\" {ORIGIN_IP} 443 40103 0x65677273");
    let marked = bed
        .run_in_cgroup("unshare", &["-n", "sh", "-c", &script, CONNECT_FROM_PORT])
        .unwrap();
    assert!(
        matches!(marked.stdout.trim(), "EPERM" | "connected"),
        "{marked:?}"
    );
    assert_eq!(bed.agent().counter("pass_agent").unwrap(), passed);

    // A process outside the cgroup claims both local addresses.
    for port in [stale_port, own_ns_port] {
        let forged = bed.run_in_hs("python3", &["-c", FORGE_FROM_PORT, port]).unwrap();
        assert!(
            matches!(forged.stdout.trim(), "reset" | "eof"),
            "the forger got an answer: {forged:?}"
        );
        // (The forger's, on the agent's own listener: the client in its own namespace may have
        // been served there with the same local address.)
        let line = bed
            .agent()
            .wait_decision(&[("client", &format!("127.0.0.1:{port}")), ("netns", &"-")])
            .unwrap();
        assert!(
            line.get("route") == "none" && line.get("error").contains("no original destination"),
            "{line}"
        );
    }
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

/// `Host: <blacklisted address>` on a connection to a whitelisted origin made squid fetch the
/// blacklisted host. A name is a claim, and an address in it is checked like a dialled one.
#[test]
fn names_in_host_cannot_route_around_the_blacklist() {
    let mut bed = Testbed::standard();
    let proxy = bed.proxy_url(egress_testbed::PROXY_PASSWORD);
    let mut args = vec!["--http-proxy", proxy.as_str(), "--https-proxy", proxy.as_str()];
    let whitelist = narrow_whitelist_args();
    args.extend(whitelist.iter().map(String::as_str));
    bed.start_agent(&args).unwrap();

    // The whitelisted address itself is fine...
    let ok = bed.curl(&format!("http://{ORIGIN_IP}/")).unwrap();
    assert_eq!(ok.code, Some(0), "{ok:?}");
    // ...but not with a blacklisted address, or the local host, as its Host.
    for host in [ORIGIN_IP_2, "localhost", "127.0.0.1", "[::1]"] {
        let header = format!("Host: {host}");
        let result = bed
            .curl_many(&["-H", &header, &format!("http://{ORIGIN_IP}/")])
            .unwrap();
        assert_ne!(result.code, Some(0), "{host}: {result:?}");
        let name = host.trim_start_matches('[').trim_end_matches(']');
        let line = bed
            .agent()
            .wait_decision(&[("route", &"deny"), ("name", &name)])
            .unwrap();
        let expected = if host == ORIGIN_IP_2 {
            format!("ip_range_blacklist 10.0.0.0/8 for the name {ORIGIN_IP_2}")
        } else {
            format!("local name {name}")
        };
        assert!(line.get("rule").contains(&expected), "{line}");
    }
    assert!(!bed.squid_access_log().contains(ORIGIN_IP_2));
    assert!(!bed.squid_access_log().contains("localhost"));
    assert!(!bed.origin_access_log().contains(ORIGIN_IP_2));
}

/// TRACE would make a proxy that echoes it hand back egress's Proxy-Authorization; CONNECT
/// inside a forwarded connection would open a tunnel the plan never saw. A client's own
/// Proxy-Authorization is replaced by egress's.
#[test]
fn forwarded_http_refuses_trace_and_connect_and_sends_only_egress_credentials() {
    let mut bed = Testbed::standard();
    let proxy = bed.proxy_url(egress_testbed::PROXY_PASSWORD);
    bed.start_agent_with(&["--http-proxy", &proxy]).unwrap();

    let url = format!("http://{ORIGIN_NAME}/");
    let status_code = ["-o", "/dev/null", "-w", "%{http_code}"];
    for method in ["TRACE", "TRACK"] {
        let result = bed
            .curl_many(&[&status_code[..], &["-X", method, &url]].concat())
            .unwrap();
        assert_eq!(result.stdout, "405", "{method}: {result:?}");
    }
    let raw = r"
import socket
s = socket.create_connection(('10.248.0.30', 80), 10)
s.sendall(b'CONNECT 10.248.0.31:443 HTTP/1.1\r\nHost: 10.248.0.31:443\r\n\r\n')
print(s.recv(100).split(b'\r\n')[0].decode())
";
    let connect = bed.run_in_cgroup("python3", &["-c", raw]).unwrap();
    assert!(connect.stdout.starts_with("HTTP/1.1 405"), "{connect:?}");
    // Proxies are lenient about case (squid takes `trace` for TRACE): a lower-case method on a
    // kept-alive connection is refused too.
    let lower = r"
import socket
s = socket.create_connection(('10.248.0.30', 80), 10)
s.sendall(b'GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n')
first = b''
while b'origin ok' not in first:
    first += s.recv(65536)
s.sendall(b'trace / HTTP/1.1\r\nHost: origin.test\r\nMax-Forwards: 0\r\n\r\n')
second = s.recv(65536)
print(first.split(b'\r\n')[0].decode(), '|', second.split(b'\r\n')[0].decode())
";
    let lower = bed.run_in_cgroup("python3", &["-c", lower]).unwrap();
    assert_eq!(
        lower.stdout.trim(),
        "HTTP/1.1 200 OK | HTTP/1.1 405 Method Not Allowed",
        "{lower:?}"
    );

    // The client's own credentials never reach squid: with them squid would answer 407.
    let headers = [
        "-H",
        "Proxy-Authorization: Basic bWFsbG9yeTp3cm9uZw==",
        "-H",
        "Proxy-Connection: keep-alive",
    ];
    let result = bed
        .curl_many(&[&status_code[..], &headers, &[url.as_str()]].concat())
        .unwrap();
    assert_eq!(result.stdout, "200", "{result:?}");
    let log = bed.squid_logged(&format!("GET http://{ORIGIN_NAME}/")).unwrap();
    let line = log.lines().find(|l| l.contains("GET ")).unwrap();
    assert!(
        line.contains(&format!(" {PROXY_USER} ")) && line.contains("/200 "),
        "{line}"
    );
    for method in ["TRACE", "TRACK", "CONNECT", "trace"] {
        assert!(!log.contains(method), "squid saw {method}: {log}");
    }
}

/// Whatever is wrong with a configuration, no output of egress shows a proxy password or its
/// base64 form (which Proxy-Authorization carries).
#[test]
fn no_error_output_shows_a_proxy_password() {
    const PASSWORD: &str = "S3cretPW";
    let basic = "YWxpY2U6UzNjcmV0UFc="; // base64("alice:S3cretPW")
    let dir = TempDir::new("secrets").unwrap();
    let url = format!("http://alice:{PASSWORD}@proxy.example:3128");
    let files: Vec<(&str, String)> = vec![
        ("unquoted URL", format!("https_proxy = {url}\n")),
        (
            "SOCKS scheme",
            format!("https_proxy = \"socks5://alice:{PASSWORD}@proxy:1080\"\n"),
        ),
        (
            "port out of range",
            format!("https_proxy = \"http://alice:{PASSWORD}@proxy:99999\"\n"),
        ),
        (
            "space in host",
            format!("http_proxy = \"http://alice:{PASSWORD}@pro xy:3128\"\n"),
        ),
        ("wrong type", format!("connect_by_ip = \"{url}\"\n")),
        // (A list is a proxy setting's other form: several proxies, tried in order.)
        ("list for a number", format!("listen_port = [\"{url}\"]\n")),
        (
            "duplicate key",
            format!("https_proxy = \"{url}\"\nhttps_proxy = \"{url}\"\n"),
        ),
        ("unknown key", format!("proxy = \"{url}\"\n")),
        (
            "broken quoting",
            "https_proxy = \"http://alice:S3c\"retPW@proxy:3128\"\n".to_owned(),
        ),
        ("URL in no_proxy", format!("no_proxy = [\"{url}\"]\n")),
        ("URL as a range", format!("ip_range_blacklist = [\"{url}\"]\n")),
        (
            "password with @",
            "https_proxy = http://alice:S3cret@PW@proxy:3128\n".to_owned(),
        ),
        // Quoted back by the TOML parser as a string value: punctuation and spaces inside.
        (
            "string for a list, `;`",
            "no_proxy = \"http://alice:S3c;retPW@proxy:3128\"\n".to_owned(),
        ),
        (
            "string for a list, `,`",
            "no_proxy = \"http://alice:S3c,retPW@proxy:3128\"\n".to_owned(),
        ),
        (
            "string for a number, space",
            "listen_port = \"http://alice:S3c retPW@proxy\"\n".to_owned(),
        ),
    ];
    let mut runs: Vec<(String, egress_testbed::ClientResult)> = Vec::new();
    for (case, text) in &files {
        let path = dir.join("egress.toml");
        std::fs::write(&path, text).unwrap();
        let path = path.to_string_lossy().into_owned();
        for command in [
            vec!["check-config", "--config", &path],
            vec![
                "explain",
                "--config",
                &path,
                "--ip",
                "93.184.216.34",
                "matrix.org",
            ],
            vec!["doctor", "--config", &path, "--server-name", "matrix.org"],
        ] {
            runs.push((format!("{case}: {}", command[0]), egress(&command).unwrap()));
        }
    }
    let yaml = dir.join("homeserver.yaml");
    std::fs::write(&yaml, format!("http_proxy: [{url}]\nno_proxy_hosts: {url}: x\n")).unwrap();
    let yaml = yaml.to_string_lossy().into_owned();
    runs.push((
        "homeserver.yaml".into(),
        egress(&["check-config", "--homeserver-config", &yaml]).unwrap(),
    ));
    for flags in [
        vec![
            "check-config",
            "--https-proxy",
            "http://alice:S3cretPW@[proxy:3128",
        ],
        vec![
            "check-config",
            "--listen-port",
            "http://alice:S3cretPW@proxy:3128",
        ],
        vec!["check-config", "--no-proxy", "http://alice:S3cretPW@proxy:3128"],
        vec!["check-config", "http://alice:S3cretPW@proxy:3128"],
        vec!["check-config", "--agent-mark", "http://alice:S3c,retPW@proxy"],
        vec!["explain", "alice:S3cretPW@proxy"],
    ] {
        runs.push((
            format!("flags {flags:?}").replace(PASSWORD, "***"),
            egress(&flags).unwrap(),
        ));
    }
    let env = std::process::Command::new(egress_testbed::egress_bin())
        .arg("check-config")
        .env("https_proxy", "http://alice:S3cretPW@proxy:notaport")
        .output()
        .unwrap();
    runs.push(("environment".into(), env.into()));
    let env = std::process::Command::new(egress_testbed::egress_bin())
        .arg("check-config")
        .env("no_proxy", "alice:S3cretPW@proxy")
        .output()
        .unwrap();
    runs.push(("no_proxy environment".into(), env.into()));

    for (case, result) in &runs {
        assert_ne!(
            result.code,
            Some(0),
            "{case}: a broken configuration was accepted"
        );
        let all = format!("{}{}", result.stdout, result.stderr);
        assert!(all.contains("error"), "{case}: no error message: {all}");
        for secret in [PASSWORD, basic, "S3cret", "retPW"] {
            assert!(!all.contains(secret), "{case}: `{secret}` in the output:\n{all}");
        }
    }
}

/// Idle connections cannot hold the agent's descriptors: the admin listener serves a bounded
/// number at once, each with a header timeout, and a forwarded client idle past
/// request_header_timeout is closed.
#[test]
fn idle_connections_are_bounded_and_closed() {
    let mut bed = Testbed::standard();
    let proxy = bed.proxy_url(egress_testbed::PROXY_PASSWORD);
    bed.start_agent_with(&["--http-proxy", &proxy, "--request-header-timeout", "1"])
        .unwrap();
    let pid = bed.agent().pid().unwrap();
    let fds_before = procfs::fds(pid).unwrap();

    // 200 idle connections to the admin listener from a local user; after 7 s, how many has
    // the agent closed?
    let hold = r"
import socket, time
conns = [socket.create_connection(('127.0.0.1', 9478)) for _ in range(200)]
print('holding', flush=True)
time.sleep(7)
closed = 0
for c in conns:
    c.setblocking(False)
    try:
        closed += c.recv(1) == b''
    except BlockingIOError:
        pass
    except ConnectionResetError:
        closed += 1
print(closed, flush=True)
time.sleep(30)
";
    let mut holder = bed
        .hs_command(None, "python3", &["-c", hold])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 8];
    holder.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    assert_eq!(&first, b"holding\n");
    std::thread::sleep(Duration::from_millis(500));
    let fds_flooded = procfs::fds(pid).unwrap();
    assert!(
        fds_flooded <= fds_before + 40,
        "the agent holds {fds_flooded} descriptors (from {fds_before}) for idle admin connections"
    );
    let mut closed = String::new();
    let mut byte = [0u8; 1];
    while holder.stdout.as_mut().unwrap().read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
        closed.push(byte[0] as char);
    }
    let closed: usize = closed.trim().parse().unwrap();
    assert!(
        closed >= 32,
        "the agent closed only {closed} idle admin connections in 7 s"
    );
    let _ = holder.kill();
    let _ = holder.wait();
    // After the flood the agent serves new admin connections.
    let (status, body) = bed.agent().admin_get("/health").unwrap();
    assert_eq!(status, 200, "{body}");

    // A forwarded plain-HTTP client that goes idle after its request is closed by the agent.
    let idle = r"
import socket, time
s = socket.create_connection(('10.248.0.30', 80), 10)
s.sendall(b'GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n')
s.settimeout(10)
start = time.time(); data = b''
while True:
    chunk = s.recv(65536)
    if not chunk: break
    data += chunk
print(data.split(b'\r\n')[0].decode(), round(time.time() - start))
";
    let result = bed.run_in_cgroup("python3", &["-c", idle]).unwrap();
    let out = result.stdout.trim();
    assert!(out.starts_with("HTTP/1.1 200"), "{result:?}");
    let waited: u64 = out.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        waited <= 5,
        "the idle connection stayed open {waited} s: {result:?}"
    );
    wait::ready(
        "the agent's descriptors to come back down",
        Duration::from_secs(10),
        || Ok(procfs::fds(pid)? <= fds_before + 8),
    )
    .unwrap();
}
