//! Faults on the way out: a misbehaving upstream proxy (scripted, in the proxy namespace), a slow
//! origin, and configuration reloads. Each case checks what the client sees and that nothing went
//! direct to the origin.
//!
//! Root only.

use std::time::{Duration, Instant};

use egress_testbed::{
    LAN, ORIGIN_IP, ORIGIN_NAME, PROXY_IP, Testbed,
    process::{Daemon, Enter},
};

/// One port per misbehaviour. Every handler reads the CONNECT head first.
const FAKE_PROXY: &str = r#"
import socket, struct, threading, time
def head(c):
    data = b''
    while b'\r\n\r\n' not in data:
        chunk = c.recv(4096)
        if not chunk:
            break
        data += chunk
    return data
def rst(c):
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    c.close()
def hang(c):
    head(c); time.sleep(600)
def reset_mid_stream(c):
    head(c); c.sendall(b'HTTP/1.1 200 Connection established\r\n\r\npartial-data'); time.sleep(0.5); rst(c)
def garbage(c):
    head(c); c.sendall(b'\x00\x01garbage that is not HTTP\r\n\r\n'); time.sleep(5)
def endless_header(c):
    head(c); c.sendall(b'HTTP/1.1 200 OK\r\nX-Endless: ')
    try:
        for _ in range(100000):
            c.sendall(b'a' * 1024)
    except OSError:
        pass
def forbidden(c):
    head(c); c.sendall(b'HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n'); time.sleep(5)
def bad_gateway(c):
    head(c); c.sendall(b'HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n'); time.sleep(5)
def tls_dropped(c):
    c.recv(4096); rst(c)
def serve(port, handler):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', port)); s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handler, args=(c,), daemon=True).start()
handlers = {4001: hang, 4002: reset_mid_stream, 4003: garbage, 4004: endless_header, 4005: forbidden,
            4006: bad_gateway, 4007: tls_dropped}
for port, handler in handlers.items():
    threading.Thread(target=serve, args=(port, handler), daemon=True).start()
print('ready', flush=True)
time.sleep(3600)
"#;

/// Connects to the origin (as a server-speaks-first client would: it sends nothing), then
/// prints what arrives and how the connection ends.
const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
s.settimeout(15)
try:
    while True:
        data = s.recv(65536)
        if not data:
            print('EOF'); break
        print('data', data.decode(errors='replace'))
except OSError as e:
    print(type(e).__name__)
"#;

fn start_fake_proxy(bed: &Testbed) -> Daemon {
    bed.start_daemon(
        &bed.proxy,
        Enter::Net,
        "fake-proxy",
        "python3",
        &["-c", FAKE_PROXY],
        &[4001, 4002, 4003, 4004, 4005, 4006, 4007],
    )
    .expect("starting the fake proxy")
}

#[test]
fn misbehaving_upstreams_reset_the_client_promptly_and_nothing_goes_direct() {
    // No squid, no nginx: the scripted proxy is the only upstream.
    let mut bed = Testbed::builder().build().unwrap();
    let _fake = start_fake_proxy(&bed);
    // (proxy URL, what the client sees last, what the decision log must say)
    let cases = [
        (
            format!("http://{PROXY_IP}:4001"),
            "ConnectionResetError",
            ("error", "did not answer CONNECT in time"),
        ),
        (
            format!("http://{PROXY_IP}:4002"),
            "ConnectionResetError",
            ("error", "relay"),
        ),
        (
            format!("http://{PROXY_IP}:4003"),
            "ConnectionResetError",
            ("error", "CONNECT exchange with proxy failed"),
        ),
        (
            format!("http://{PROXY_IP}:4004"),
            "ConnectionResetError",
            ("error", "CONNECT exchange with proxy failed"),
        ),
        (
            format!("http://{PROXY_IP}:4005"),
            "ConnectionResetError",
            ("status", "403"),
        ),
        (
            format!("http://{PROXY_IP}:4006"),
            "ConnectionResetError",
            ("status", "502"),
        ),
        (
            format!("https://{PROXY_IP}:4007"),
            "ConnectionResetError",
            ("error", "TLS with proxy"),
        ),
    ];
    for (proxy, client_sees, (field, says)) in cases {
        bed.start_agent(&[
            "--https-proxy",
            &proxy,
            "--ip-range-whitelist",
            LAN,
            "--peek-timeout",
            "0.2",
            "--handshake-timeout",
            "1",
            "--connect-timeout",
            "2",
        ])
        .unwrap();
        let started = Instant::now();
        let out = bed
            .run_in_cgroup("python3", &["-c", CLIENT, ORIGIN_IP, "8448"])
            .unwrap();
        let elapsed = started.elapsed();
        let last = out.stdout.lines().last().unwrap_or_default().to_owned();
        assert_eq!(last, client_sees, "{proxy}: {out:?}");
        assert!(elapsed < Duration::from_secs(5), "{proxy}: took {elapsed:?}");
        if proxy.ends_with(":4002") {
            assert!(
                out.stdout.contains("data partial-data"),
                "bytes before the reset arrive: {out:?}"
            );
        }
        // This run's one decision line (not an earlier run's) says what went wrong.
        let line = bed
            .agent()
            .wait_line(&format!("a decision whose {field} says {says}"), |l| {
                l.is_decision() && l.get(field).contains(says)
            })
            .unwrap_or_else(|e| panic!("{proxy}: {e}"));
        assert!(line.get("outcome") == "error", "{proxy}: {line}");
        assert_eq!(bed.agent().decisions(), [line], "{proxy}");
    }
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        0,
        "something went direct"
    );
}

#[test]
fn a_slow_origin_is_waited_for() {
    let mut bed = Testbed::builder().squid().build().unwrap();
    // An origin that answers after 3 s, reached through squid by plain-HTTP forwarding.
    let slow = "import http.server, time\n\
                class H(http.server.BaseHTTPRequestHandler):\n\
                \x20   def do_GET(self):\n\
                \x20       time.sleep(3); body = b'slow but sure\\n'\n\
                \x20       self.send_response(200); self.send_header('Content-Length', str(len(body)))\n\
                \x20       self.end_headers(); self.wfile.write(body)\n\
                http.server.HTTPServer(('0.0.0.0', 9000), H).serve_forever()\n";
    let _origin = bed
        .start_daemon(
            &bed.origin,
            Enter::Net,
            "slow-origin",
            "python3",
            &["-c", slow],
            &[9000],
        )
        .unwrap();
    let proxy = bed.proxy_url(egress_testbed::PROXY_PASSWORD);
    bed.start_agent_with(&["--http-proxy", &proxy, "--handshake-timeout", "1"])
        .unwrap();
    let started = Instant::now();
    let result = bed.curl(&format!("http://{ORIGIN_IP}:9000/slow")).unwrap();
    assert_eq!(result.code, Some(0), "{result:?}\n{}", bed.agent().log());
    assert_eq!(result.stdout, "slow but sure\n");
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

#[test]
fn sighup_reloads_the_configuration_and_a_bad_file_keeps_the_old_one() {
    let mut bed = Testbed::standard();
    let config = bed.dir.join("egress.toml");
    let proxy = bed.proxy_url(egress_testbed::PROXY_PASSWORD);
    let write = |text: &str| std::fs::write(&config, text).unwrap();
    write(&format!(
        "https_proxy = \"{proxy}\"\nip_range_whitelist = [\"{LAN}\"]\n"
    ));
    bed.start_agent(&["--config", &config.to_string_lossy()]).unwrap();
    let pid = bed.agent().pid().unwrap() as i32;
    let hup = || unsafe { libc::kill(pid, libc::SIGHUP) };
    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0)
    );

    // A bad file: logged, and the old configuration stays in force (kernel and agent).
    write("https_proxy = \"socks5://nope:1080\"\n");
    hup();
    let line = bed.agent().logged("reload failed").unwrap();
    assert!(line.message().contains("socks5"), "{line}");
    assert_eq!(line.level(), "ERROR", "{line}");
    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0)
    );

    // A good file with a new policy: 8448 now bypasses the proxy. The listen port cannot change
    // while running: kept, and the log says a restart is needed.
    write(&format!(
        "https_proxy = \"{proxy}\"\nip_range_whitelist = [\"{LAN}\"]\nno_proxy = [\"{ORIGIN_NAME}:8448\"]\nlisten_port = 15099\n"
    ));
    hup();
    bed.agent().logged("configuration reloaded").unwrap();
    bed.agent()
        .logged("listen_port changed; this takes a restart")
        .unwrap();
    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}:8448/")).unwrap().code,
        Some(0)
    );
    let line = bed.agent().wait_decision(&[("route", &"direct")]).unwrap();
    assert!(line.get("rule").contains("no_proxy origin.test:8448"), "{line}");

    // Then the whitelist goes: the kernel's deny set follows at once.
    write(&format!("https_proxy = \"{proxy}\"\n"));
    hup();
    egress_testbed::wait::until(
        "a second reload",
        egress_testbed::wait::SHORT,
        || {
            Ok(bed
                .agent()
                .lines()
                .iter()
                .filter(|l| l.message() == "configuration reloaded")
                .count())
        },
        |n| *n == 2,
    )
    .unwrap();
    assert_eq!(bed.tcp_connect(ORIGIN_IP, 443).unwrap(), "EPERM");
}
