//! The documented deployment on a real systemd host. `cargo xtask test --system` boots a Debian 12
//! root filesystem with systemd as PID 1 and Debian's 6.1 kernel under qemu, and runs this test
//! there as a unit: it installs the package with apt, gives a Synapse unit the drop-in as the
//! README says, and drives everything through systemctl, apt and journalctl. It refuses to run
//! anywhere else (it installs packages and writes units into /etc/systemd/system).
//!
//! The guest is the homeserver host: its own network namespace, plugged into the test LAN at
//! HS_IP. squid (Basic auth) is on the proxy host; on the origin host are nginx (TLS, a page to
//! preview) and a second Synapse to federate with, and the packet counters that tell whether
//! anything went direct.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use egress_testbed::{
    HS_IP, HS_IP6, ORIGIN_IP, ORIGIN_NAME, PROXY_IP, PROXY_PASSWORD, PROXY_USER, SQUID_PORT, Testbed,
    peers::{
        self, PREVIEW_TITLE,
        federation::{PeerHomeserver, federation_overrides, register_with_name},
        make_certs,
        synapse::{self, query_encode},
    },
    process::{self, Enter},
    wait,
};

const PEER_NAME: &str = "peer.test";
const SYNAPSE_DIR: &str = "/var/lib/matrix-synapse";
const SYNAPSE_CGROUP: &str = "/sys/fs/cgroup/system.slice/matrix-synapse.service";
const EGRESS_TOML: &str = "/etc/egress/egress.toml";
/// Under emulation a Synapse start, a federation round trip or a preview takes many seconds.
const SLOW: Duration = Duration::from_secs(300);

/// The guest's shared directory: the packages to install and the results.
fn guest_dir() -> String {
    let dir = std::env::var("EGRESS_SYSTEM_GUEST").unwrap_or_default();
    let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    assert!(
        !dir.is_empty() && pid1.trim() == "systemd",
        "this test runs only inside the guest of `cargo xtask test --system` \
         (EGRESS_SYSTEM_GUEST set, systemd as PID 1); PID 1 here is {pid1:?}"
    );
    dir
}

/// `sh -c script`, which must succeed; its stdout and stderr.
fn sh(script: &str) -> String {
    let (code, out) = sh_status(script);
    assert_eq!(code, Some(0), "`{script}` failed:\n{out}");
    out
}

fn sh_status(script: &str) -> (Option<i32>, String) {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Prints a measured figure in a form `cargo xtask test --system` collects for its report.
fn measured(what: &str, value: impl std::fmt::Display) {
    println!("MEASURED {what}: {value}");
}

/// Marks the start of a step in the output, with the time since the guest booted.
fn step(what: &str) {
    let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
    let seconds = uptime.split_whitespace().next().unwrap_or("?");
    println!("---- {what} (uptime {seconds} s)");
}

/// Runs `program args...` on the homeserver host outside egress's cgroups; stdout and stderr.
fn on_host(args: &[&str]) -> String {
    let out = process::output(process::launch(None, Enter::Net, None, args[0], &args[1..])).unwrap();
    format!("{}{}", out.stdout, out.stderr)
}

/// The guest's own namespace takes the place of the test bed's homeserver namespace on the LAN,
/// at HS_IP: the origin's counters count its packets. Its resolver is a dnsmasq on loopback
/// that knows the test's names (and says NXDOMAIN for the rest of .test, forwarding nothing).
fn plug_host_into_lan(bed: &Testbed) -> process::Daemon {
    let switch = format!("{}-sw", bed.name);
    bed.hs.ip(&["link", "del", "eth0"]).unwrap();
    sh(&format!(
        "ip link add hs0 type veth peer name p-root netns {switch} && \
         ip -n {switch} link set p-root master br0 up && \
         ip addr add {HS_IP}/24 dev hs0 && ip -6 addr add {HS_IP6}/64 dev hs0 nodad && \
         ip link set hs0 up"
    ));
    // Names as a host without DNS has them: the hosts file (egress's own lookups read it too).
    let names = format!("{ORIGIN_IP} {ORIGIN_NAME} {PEER_NAME}\n{HS_IP} hs.test\n");
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap();
    std::fs::write("/etc/hosts", format!("{hosts}\n{names}")).unwrap();
    std::fs::write("/etc/resolv.conf", "nameserver 127.0.0.1\n").unwrap();
    let mut dns = peers::start_dnsmasq_here(&bed.dir, "127.0.0.1", &names, &[]).unwrap();
    wait::ready("the host's dnsmasq", SLOW, || {
        dns.check_alive()?;
        Ok(sh_status("ss -Hlun 'sport = :53'").1.contains("127.0.0.1"))
    })
    .unwrap();
    dns
}

/// Counts, on the origin host (nginx and the peer homeserver), the connections the homeserver
/// host starts there (conntrack's `new`: not its answers to the peer, such as its federation
/// listener's, or a reset from a port it does not serve): whatever went direct, to any port.
fn install_direct_counter(bed: &Testbed) {
    process::run_with_input(
        "ip",
        &["netns", "exec", &bed.origin.name, "nft", "-f", "-"],
        Some(&format!(
            "table inet egress_system {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
             ip saddr {HS_IP} ct state new counter\n    \
             ip6 saddr {HS_IP6} ct state new counter\n  }}\n}}\n"
        )),
    )
    .unwrap();
}

fn direct_packets(bed: &Testbed) -> u64 {
    let listing = bed
        .origin
        .exec("nft", &["list", "chain", "inet", "egress_system", "input"])
        .unwrap();
    let words: Vec<&str> = listing.split_whitespace().collect();
    let counts: Vec<u64> = words
        .windows(2)
        .filter(|w| w[0] == "packets")
        .map(|w| w[1].parse().unwrap())
        .collect();
    assert_eq!(counts.len(), 2, "{listing}");
    counts.iter().sum()
}

/// egress's configuration: the package's file with the test bed's proxy and whitelist, and
/// `extra` lines.
fn write_egress_config(extra: &str) {
    let proxy = format!("http://{PROXY_USER}:{PROXY_PASSWORD}@{PROXY_IP}:{SQUID_PORT}");
    std::fs::write(
        EGRESS_TOML,
        format!(
            "user = \"egress\"\nunits = []\nhttps_proxy = \"{proxy}\"\nhttp_proxy = \"{proxy}\"\n{extra}"
        ),
    )
    .unwrap();
    // As the README says: it holds the proxy password.
    sh(&format!(
        "chown root:egress {EGRESS_TOML} && chmod 640 {EGRESS_TOML}"
    ));
}

const WHITELIST: &str = "ip_range_whitelist = [\"10.248.0.20/32\", \"10.248.0.30/32\"]\n";

/// The Synapse unit, as an admin writes one for Synapse in a virtualenv, and the drop-in copied
/// from the package as the README says.
fn install_synapse_unit(certs_ca: &Path) {
    let venv = synapse::venv().unwrap();
    let python = venv.join("bin/python");
    std::fs::write(
        "/etc/systemd/system/matrix-synapse.service",
        format!(
            "[Unit]
Description=Synapse Matrix homeserver
After=network.target

[Service]
Type=notify
NotifyAccess=main
User=matrix-synapse
WorkingDirectory={SYNAPSE_DIR}
Environment=SSL_CERT_FILE={ca}
ExecStart={python} -m synapse.app.homeserver --config-path {SYNAPSE_DIR}/homeserver.yaml --config-path {SYNAPSE_DIR}/overrides.yaml
TimeoutStartSec=600
Restart=on-failure

[Install]
WantedBy=multi-user.target
",
            ca = certs_ca.display(),
            python = python.display(),
        ),
    )
    .unwrap();
    // A template unit beside it, as a worker's would be; its drop-in goes under NAME@.service.d.
    // Its process is a stand-in for a worker (Synapse's workers need Redis): one HTTPS request.
    std::fs::write(
        "/etc/systemd/system/matrix-synapse-worker@.service",
        format!(
            "[Unit]
Description=Synapse worker %i

[Service]
Type=oneshot
RemainAfterExit=yes
User=matrix-synapse
ExecStart=/usr/bin/curl -sS --fail --max-time 120 --cacert {ca} -o {SYNAPSE_DIR}/worker-%i.out https://{ORIGIN_NAME}/?worker=%i
",
            ca = certs_ca.display(),
        ),
    )
    .unwrap();
    sh("mkdir -p /etc/systemd/system/matrix-synapse.service.d \
            /etc/systemd/system/matrix-synapse-worker@.service.d && \
        cp /usr/share/egress/matrix-synapse.service.d/egress.conf /etc/systemd/system/matrix-synapse.service.d/ && \
        cp /usr/share/egress/matrix-synapse.service.d/egress.conf /etc/systemd/system/matrix-synapse-worker@.service.d/ && \
        systemctl daemon-reload");
}

/// Connections from inside Synapse's cgroup, one every `interval`, for `duration`: each a TLS
/// handshake with the origin (by its name) and one request. Prints `T ok` or `T error` per
/// connection, T in seconds since the epoch.
const PROBE: &str = r#"
import socket, ssl, sys, time
ca, host, duration, interval = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
ctx = ssl.create_default_context(cafile=ca)
end = time.time() + duration
while time.time() < end:
    started = time.time()
    try:
        with socket.create_connection((host, 443), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as s:
                s.sendall(b"GET /?probe HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
                ok = b"origin ok" in s.recv(4096)
        print(f"{started:.3f} {'ok' if ok else 'error'}", flush=True)
    except Exception as e:
        print(f"{started:.3f} error {type(e).__name__}", flush=True)
    time.sleep(interval)
"#;

/// A TLS connection opened at once, then one request per line on stdin: a long-lived tunnel.
const HOLDER: &str = r#"
import socket, ssl, sys
ca, host = sys.argv[1], sys.argv[2]
s = ssl.create_default_context(cafile=ca).wrap_socket(socket.create_connection((host, 443), timeout=30), server_hostname=host)
print("connected", flush=True)
for line in sys.stdin:
    s.sendall(b"GET /?held HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
    answer = b""
    while b"origin ok" not in answer:
        chunk = s.recv(4096)
        if not chunk:
            break
        answer += chunk
    print("answer", answer.decode(errors="replace").splitlines()[-1:], flush=True)
"#;

/// Starts `python3 -c script args...` inside Synapse's cgroup (the unit must be running).
fn spawn_in_synapse(script: &str, args: &[&str]) -> Child {
    let mut full = vec!["-c", script];
    full.extend_from_slice(args);
    process::launch(
        None,
        Enter::Net,
        Some(Path::new(SYNAPSE_CGROUP)),
        "python3",
        &full,
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap()
}

/// Runs [`PROBE`] in Synapse's cgroup while `during` runs; returns (time, ok) per connection.
fn probing_while(ca: &Path, during: impl FnOnce()) -> Vec<(f64, bool)> {
    let ca = ca.to_string_lossy();
    let mut probe = spawn_in_synapse(PROBE, &[&ca, ORIGIN_NAME, "150", "0.2"]);
    let stdout = probe.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                Some((words.next()?.parse::<f64>().ok()?, words.next()? == "ok"))
            })
            .collect::<Vec<_>>()
    });
    // Let it run a while first, so that the gap has a before.
    std::thread::sleep(Duration::from_secs(15));
    during();
    std::thread::sleep(Duration::from_secs(20));
    let _ = probe.kill();
    let _ = probe.wait();
    reader.join().unwrap()
}

/// Runs `command` while a client in Synapse's cgroup connects five times a second; measures
/// the gap, and asserts that the connections resume and that none went direct meanwhile.
fn connections_through(bed: &Testbed, ca: &Path, command: &str) {
    let results = probing_while(ca, || {
        let t = Instant::now();
        sh(command);
        measured(
            &format!("`{command}` (s)"),
            format!("{:.1}", t.elapsed().as_secs_f64()),
        );
    });
    let (longest, failed) = gap(&results);
    measured(
        &format!("`{command}`: longest time without a connection (s)"),
        format!("{longest:.2}"),
    );
    measured(&format!("`{command}`: failed connections"), failed);
    assert!(
        results.iter().rev().take(5).all(|(_, ok)| *ok),
        "no recovery after `{command}`: {results:?}"
    );
    assert_eq!(direct_packets(bed), 0, "a packet went direct during `{command}`");
}

/// The longest time without a successful connection around the event, and how many failed.
fn gap(results: &[(f64, bool)]) -> (f64, usize) {
    let oks: Vec<f64> = results.iter().filter(|(_, ok)| *ok).map(|(t, _)| *t).collect();
    let longest = oks.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    (longest, results.iter().filter(|(_, ok)| !ok).count())
}

fn egress_pid() -> String {
    sh("systemctl show -p MainPID --value egress").trim().to_owned()
}

/// GET on hs1's client API from the host (loopback: never intercepted).
fn hs1_get(path: &str, token: Option<&str>) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}"))
        .unwrap_or_default();
    let mut args = vec!["curl", "-sS", "--max-time", "240"];
    if token.is_some() {
        args.extend(["-H", &auth]);
    }
    let url = format!("http://127.0.0.1:8008{path}");
    args.push(&url);
    on_host(&args)
}

/// On a failure, keeps what explains it in the shared results directory: the journal (egress,
/// Synapse, the units' drop-ins) and the test bed's logs (squid, nginx, the peer homeserver).
struct KeepLogsOnFailure {
    results: String,
    bed_dir: std::path::PathBuf,
}

impl Drop for KeepLogsOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let r = &self.results;
            let _ = sh_status(&format!(
                "journalctl --no-pager -b > {r}/journal.log 2>&1; cp -r {} {r}/testbed; \
                 cp -r {SYNAPSE_DIR} {r}/synapse 2>/dev/null; rm -f {r}/synapse/*.db*",
                self.bed_dir.display()
            ));
        }
    }
}

fn journal(unit_args: &str, since: &str) -> String {
    sh(&format!(
        "journalctl --no-pager -o cat {unit_args} --since '{since}'"
    ))
}

#[test]
#[ignore = "runs only inside the guest of `cargo xtask test --system`"]
fn the_documented_deployment_on_a_systemd_host() {
    let shared = guest_dir();
    let started = sh("date '+%Y-%m-%d %H:%M:%S'").trim().to_owned();
    let debs: Vec<String> = std::fs::read_dir(format!("{shared}/debs"))
        .unwrap()
        .map(|e| e.unwrap().path().to_string_lossy().into_owned())
        .collect();
    let (newer, this): (Vec<&String>, Vec<&String>) = debs.iter().partition(|d| d.contains("+system"));
    let [deb, newer_deb] = [&this[..], &newer[..]].map(|d| match d {
        [one] => one.as_str(),
        _ => panic!("the package and a newer build of it: {debs:?}"),
    });

    step("The test bed: squid, nginx, the peer homeserver");
    let bed = Testbed::builder()
        .squid()
        .squid_hosts(&format!("{ORIGIN_IP} {PEER_NAME}\n"))
        .build()
        .unwrap();
    let _resolver = plug_host_into_lan(&bed);
    let _keep_logs = KeepLogsOnFailure {
        results: format!("{shared}/results"),
        bed_dir: bed.dir.clone(),
    };
    // nginx on 443 only: the peer homeserver has 8448 on the same host.
    let mut nginx = peers::start_nginx(&bed.origin, &bed.dir, &bed.certs, &[443], 80).unwrap();
    wait::ready("nginx on 443", SLOW, || {
        nginx.check_alive()?;
        Ok(bed.origin.is_listening(443))
    })
    .unwrap();
    install_direct_counter(&bed);
    // The counter sees a direct connection (none is intercepted yet): then back to zero.
    let direct = on_host(&[
        "curl",
        "-sS",
        "--max-time",
        "60",
        "-k",
        &format!("https://{ORIGIN_NAME}/"),
    ]);
    assert!(direct.contains("origin ok"), "{direct}");
    assert!(direct_packets(&bed) > 0, "the counter missed a direct connection");
    bed.origin
        .exec("nft", &["delete", "table", "inet", "egress_system"])
        .unwrap();
    install_direct_counter(&bed);
    assert_eq!(direct_packets(&bed), 0);
    let peer_certs = make_certs(&bed.dir, "peer", &[PEER_NAME], &[ORIGIN_IP], 2).unwrap();
    let hs2 = PeerHomeserver::start(
        &bed,
        PEER_NAME,
        ORIGIN_IP,
        &peer_certs,
        &format!("{HS_IP} hs.test\n"),
        &[],
    )
    .unwrap();
    let in_hs2 = |args: &[&str]| hs2.run(args);
    for (user, name) in [("bob", "Bob on the peer"), ("carol", "Carol on the peer")] {
        register_with_name(&in_hs2, &hs2.dir, user, name);
    }
    let ca = bed.certs.ca.clone();
    // Readable by Synapse's user: the CA it trusts for the origin.
    sh(&format!(
        "chmod o+rx {} && chmod o+r {}",
        bed.dir.display(),
        ca.display()
    ));

    // ---- Install.
    step("Install");
    let t = Instant::now();
    sh(&format!("apt-get install -y {deb}"));
    measured("apt install (s)", format!("{:.1}", t.elapsed().as_secs_f64()));
    assert!(sh("getent passwd egress").starts_with("egress:"));
    sh("useradd --system --home-dir /var/lib/matrix-synapse --shell /usr/sbin/nologin matrix-synapse");
    let hs1_certs = make_certs(&bed.dir, "hs1", &["hs.test"], &[HS_IP], 2).unwrap();
    let synapse_dir = Path::new(SYNAPSE_DIR);
    synapse::configure(
        synapse_dir,
        "hs.test",
        &format!(
            "{}url_preview_enabled: true\nurl_preview_ip_range_blacklist: ['192.0.2.0/24']\n",
            federation_overrides(synapse_dir, &hs1_certs, HS_IP)
        ),
    )
    .unwrap();
    sh(&format!(
        "chmod o+r {key} && chown -R matrix-synapse: {SYNAPSE_DIR}",
        key = hs1_certs.key.display()
    ));
    install_synapse_unit(&ca);

    // ---- Start: notify means "attached and listening" when systemctl returns.
    step("Start");
    write_egress_config(WHITELIST);
    let t = Instant::now();
    sh("systemctl enable --now egress");
    measured(
        "systemctl enable --now egress (s)",
        format!("{:.1}", t.elapsed().as_secs_f64()),
    );
    assert_eq!(sh("systemctl is-active egress").trim(), "active");
    let egress_user = sh(&format!("ps -o user= -p {}", egress_pid()));
    assert_eq!(egress_user.trim(), "egress", "the agent did not drop to its user");

    // ---- Use: federation and a URL preview, through squid only.
    step("Use");
    let t = Instant::now();
    sh("systemctl start matrix-synapse");
    measured(
        "systemctl start matrix-synapse (s)",
        format!("{:.1}", t.elapsed().as_secs_f64()),
    );
    let status = sh("egress status");
    assert!(
        status.contains("matrix-synapse.service"),
        "egress status: {status}"
    );
    let in_hs1 = |args: &[&str]| on_host(args);
    register_with_name(&in_hs1, synapse_dir, "alice", "Alice on hs1");
    let login = on_host(&[
        "curl",
        "-sS",
        "-d",
        r#"{"type":"m.login.password","identifier":{"type":"m.id.user","user":"alice"},"password":"correct-horse-battery"}"#,
        "http://127.0.0.1:8008/_matrix/client/v3/login",
    ]);
    let token = serde_json::from_str::<serde_json::Value>(&login).unwrap()["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("login: {login}"))
        .to_owned();
    let t = Instant::now();
    // Under emulation the first request can outlast Synapse's own federation timeouts while the
    // two servers fetch each other's keys: asked again a few times, it must then succeed.
    let mut bob = String::new();
    for _ in 0..4 {
        bob = hs1_get(&format!("/_matrix/client/v3/profile/@bob:{PEER_NAME}"), None);
        if bob.contains("Bob on the peer") {
            break;
        }
        println!(
            "hs1 asking the peer for bob after {:.0} s: {bob}",
            t.elapsed().as_secs_f64()
        );
    }
    assert!(
        bob.contains("Bob on the peer"),
        "hs1 asking the peer for bob: {bob}"
    );
    measured(
        "first federation request (s)",
        format!("{:.1}", t.elapsed().as_secs_f64()),
    );
    let preview = hs1_get(
        &format!(
            "/_matrix/client/v1/media/preview_url?url={}",
            query_encode(&format!("https://{ORIGIN_NAME}/preview.html?system=1"))
        ),
        Some(&token),
    );
    assert!(preview.contains(PREVIEW_TITLE), "URL preview: {preview}");

    // ---- Restart the homeserver: a new cgroup, attached by the drop-in before Synapse's first
    step("Restart the homeserver");
    // connection (a connection made before would go direct and show in the counters).
    sh("systemctl restart matrix-synapse");
    // squid logs a tunnel when it closes: Synapse's closed with its restart.
    let squid_log = wait::until(
        "squid to log the first run's tunnels",
        SLOW,
        || Ok(bed.squid_access_log()),
        |l| {
            l.contains(&format!("CONNECT {PEER_NAME}:8448"))
                && l.contains(&format!("CONNECT {ORIGIN_NAME}:443"))
        },
    )
    .unwrap();
    assert!(!squid_log.contains("TCP_DENIED"), "{squid_log}");
    let carol = hs1_get(&format!("/_matrix/client/v3/profile/@carol:{PEER_NAME}"), None);
    assert!(carol.contains("Carol on the peer"), "after the restart: {carol}");
    // A template instance, with the drop-in under matrix-synapse-worker@.service.d.
    sh("systemctl start matrix-synapse-worker@1");
    assert!(
        std::fs::read_to_string(format!("{SYNAPSE_DIR}/worker-1.out"))
            .unwrap()
            .contains("origin ok")
    );
    let origin_log = bed.origin_access_log();
    let worker_request = origin_log
        .lines()
        .find(|l| l.contains("worker=1"))
        .unwrap_or_default();
    assert!(
        worker_request.starts_with(&format!("{PROXY_IP} ")),
        "the worker's request came from elsewhere than the proxy: {origin_log}"
    );
    assert_eq!(direct_packets(&bed), 0, "a packet went direct");

    // ---- Reload: a changed policy applies to new connections, an established tunnel stays.
    step("Reload");
    let ca_s = ca.to_string_lossy().into_owned();
    let mut holder = spawn_in_synapse(HOLDER, &[&ca_s, ORIGIN_NAME]);
    let mut held_out = BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    held_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    let request = |holder: &mut Child, out: &mut BufReader<std::process::ChildStdout>| {
        writeln!(holder.stdin.as_mut().unwrap(), "again").unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        line
    };
    let new_connection = || {
        let out = process::output(process::launch(
            None,
            Enter::Net,
            Some(Path::new(SYNAPSE_CGROUP)),
            "curl",
            &[
                "-sS",
                "--max-time",
                "60",
                "--cacert",
                &ca_s,
                &format!("https://{ORIGIN_NAME}/"),
            ],
        ))
        .unwrap();
        (out.code, format!("{}{}", out.stdout, out.stderr))
    };
    assert_eq!(new_connection().0, Some(0));
    let pid = egress_pid();
    // The origin is no longer whitelisted: back in the default blacklist (10.0.0.0/8).
    write_egress_config("ip_range_whitelist = [\"10.248.0.20/32\"]\n");
    let reload_since = sh("date '+%Y-%m-%d %H:%M:%S'").trim().to_owned();
    sh("systemctl reload egress");
    wait::ready("the reload to apply", SLOW, || Ok(new_connection().0 != Some(0))).unwrap();
    let (_, refused) = new_connection();
    assert!(
        refused.contains("Permission denied") || refused.contains("Couldn't connect"),
        "{refused}"
    );
    assert!(
        request(&mut holder, &mut held_out).contains("origin ok"),
        "the established tunnel broke"
    );
    assert_eq!(egress_pid(), pid, "the reload restarted egress");
    // A broken file: logged, and the running configuration stays.
    std::fs::write(EGRESS_TOML, "no_proxy = 5\n").unwrap();
    sh("systemctl reload egress");
    let said = wait::until(
        "the journal to say why the reload was refused",
        SLOW,
        || Ok(journal("-u egress", &reload_since)),
        |j| j.contains("reload failed"),
    )
    .unwrap();
    let refusal = said
        .lines()
        .find(|l| l.contains("reload failed"))
        .unwrap()
        .to_owned();
    println!("journal on a broken reload: {refusal}");
    assert!(
        refusal.contains("no_proxy"),
        "the journal does not name the setting: {refusal}"
    );
    assert_eq!(sh("systemctl is-active egress").trim(), "active");
    assert_ne!(new_connection().0, Some(0), "a broken reload changed the policy");
    assert!(request(&mut holder, &mut held_out).contains("origin ok"));
    write_egress_config(WHITELIST);
    sh("systemctl reload egress");
    wait::ready("the good configuration to apply", SLOW, || {
        Ok(new_connection().0 == Some(0))
    })
    .unwrap();
    drop(holder.stdin.take());
    let _ = holder.wait();

    // ---- Restart egress while Synapse runs: connections in the gap fail, none goes direct.
    step("Restart egress while Synapse runs");
    connections_through(&bed, &ca, "systemctl restart egress");
    assert_eq!(sh("systemctl is-active matrix-synapse").trim(), "active");

    // ---- Upgrade while connections run.
    step("Upgrade while connections run");
    let old_pid = egress_pid();
    connections_through(
        &bed,
        &ca,
        &format!("apt-get install -y -o Dpkg::Options::=--force-confold {newer_deb}"),
    );
    let new_pid = egress_pid();
    assert_ne!(new_pid, old_pid, "the upgrade left the old agent running");
    let exe = sh(&format!("readlink /proc/{new_pid}/exe"));
    assert!(
        !exe.contains("deleted"),
        "the agent runs a replaced binary: {exe}"
    );
    let version = sh("dpkg-query -W -f '${Version}' egress");
    assert!(
        newer_deb.contains(&format!("_{version}_")),
        "{version} is not {newer_deb}'s"
    );

    // ---- Logs: decision lines in the journal, no secret anywhere in it.
    step("Logs");
    sh("systemctl stop matrix-synapse");
    let decisions = wait::until(
        "decision lines in the journal",
        SLOW,
        || Ok(journal("-u egress", &started)),
        |j| j.contains(&format!("target={PEER_NAME}:8448")) && j.contains("route=proxy-connect"),
    )
    .unwrap();
    assert!(decisions.contains("egress::decision"), "{decisions}");
    let everything = journal("", &started);
    assert!(
        !everything.contains(PROXY_PASSWORD),
        "the proxy password is in the journal"
    );

    // ---- Remove: nothing of egress's is left in the kernel or the system.
    step("Remove");
    // egress's programs are all named egress_* (systemd's own are sd_*, attached as
    // cgroup_inet_egress).
    let egress_programs = |listing: &str| -> Vec<String> {
        listing
            .split_whitespace()
            .filter(|w| w.starts_with("egress_"))
            .map(str::to_owned)
            .collect()
    };
    let loaded = sh("bpftool prog show");
    assert!(
        !egress_programs(&loaded).is_empty(),
        "bpftool shows no program of egress's:\n{loaded}"
    );
    sh("apt-get purge -y egress");
    assert!(!Path::new("/sys/fs/bpf/egress").exists(), "pins left behind");
    let attached = sh("bpftool cgroup tree /sys/fs/cgroup");
    assert_eq!(
        egress_programs(&attached),
        Vec::<String>::new(),
        "still attached:\n{attached}"
    );
    // The kernel frees a program once its last reference goes, shortly after.
    wait::ready("egress's programs to be unloaded", SLOW, || {
        Ok(egress_programs(&sh("bpftool prog show")).is_empty())
    })
    .unwrap();
    assert_ne!(sh_status("getent passwd egress").0, Some(0), "the user is left");
    assert!(!Path::new("/etc/egress").exists(), "/etc/egress is left");
    drop(bed);
}
