//! Daemon operations: health and metrics, dropped privileges, crash in the middle of a transfer,
//! targets by unit name, import from Synapse's homeserver.yaml, check-config and explain.
//!
//! Root only.

use std::{path::Path, time::Duration};

use egress_testbed::{
    HS_IP, LAN, ORIGIN_IP, ORIGIN_NAME, PROXY_IP, PROXY_PASSWORD, PROXY_USER, Testbed, cgroup::Cgroup,
    peers::BIG_FILE_BYTES,
};

fn testbed() -> Testbed {
    Testbed::new().expect("building the test topology")
}

fn repo_file(relative: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
        .to_string_lossy()
        .into_owned()
}

fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn health_and_metrics_report_what_happened() {
    let mut bed = testbed();
    bed.start_default_agent().unwrap();
    let (code, body) = bed.admin_get("/health").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with("ok: attached to 1 cgroup(s); upstream reachable"),
        "{body}"
    );
    assert!(!body.contains(PROXY_PASSWORD), "{body}");

    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0)
    );
    assert_eq!(bed.tcp_connect("192.0.2.1", 443).unwrap(), "EPERM"); // TEST-NET-1: blacklisted
    let series = "egress_connections_total{route=\"proxy-connect\",outcome=\"ok\"}";
    let text = bed.eventually(
        Duration::from_secs(5),
        |b| b.admin_get("/metrics").unwrap().1,
        |t| metric(t, series) == Some(1),
    );
    assert_eq!(metric(&text, series), Some(1), "{text}");
    assert_eq!(
        metric(&text, "egress_kernel_decisions_total{decision=\"redirected\"}"),
        Some(1),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "egress_kernel_decisions_total{decision=\"deny_blacklist\"}"
        ),
        Some(1),
        "{text}"
    );
    assert_eq!(
        metric(&text, "egress_upstream_connect_seconds_count"),
        Some(1),
        "{text}"
    );
    assert!(
        metric(&text, "egress_bytes_total{direction=\"down\"}").unwrap() > 500,
        "{text}"
    );
    assert_eq!(metric(&text, "egress_connections_active"), Some(0), "{text}");

    // Detached from its cgroup: unhealthy, and says why.
    let cgroup = bed.cgroup.path.to_string_lossy().into_owned();
    let pin_dir = bed.pin_dir.to_string_lossy().into_owned();
    assert_eq!(
        bed.egress(&["detach", "--cgroup", &cgroup, "--bpffs-dir", &pin_dir])
            .unwrap()
            .code,
        Some(0)
    );
    let (code, body) = bed.admin_get("/health").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not attached to cgroup"), "{body}");
}

#[test]
fn health_fails_when_the_upstream_is_unreachable() {
    let mut bed = testbed();
    let url = format!("http://{PROXY_IP}:9");
    bed.start_agent(&["--https-proxy", &url, "--ip-range-whitelist", LAN])
        .unwrap();
    let (code, body) = bed.admin_get("/health").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("unreachable") && body.contains("refused"), "{body}");
}

#[test]
fn the_running_agent_is_unprivileged_but_for_cap_net_admin() {
    let mut bed = testbed();
    bed.start_default_agent().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", bed.agent_pid().unwrap())).unwrap();
    let field = |name: &str| -> String {
        let line = status
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap();
        line.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
    };
    assert_eq!(field("Uid"), "65534 65534 65534 65534", "{status}");
    assert_eq!(field("Gid"), "65534 65534 65534 65534", "{status}");
    // Bit 12 is CAP_NET_ADMIN, needed for SO_MARK on the agent's own sockets.
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(field(set), "0000000000001000", "{set}\n{status}");
    }
    assert_eq!(field("CapInh"), "0000000000000000");
    assert_eq!(field("CapAmb"), "0000000000000000");
    assert_eq!(field("NoNewPrivs"), "1");
    // And it still does its job.
    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0)
    );
}

#[test]
fn sigkill_mid_transfer_fails_closed_and_a_restart_resumes_service() {
    let mut bed = testbed();
    bed.start_default_agent().unwrap();
    let ca = bed.certs.ca.to_string_lossy().into_owned();
    let resolve = format!("{ORIGIN_NAME}:443:{ORIGIN_IP}");
    let url = format!("https://{ORIGIN_NAME}/big.bin");
    let download = |rate: &str| -> Vec<String> {
        vec![
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "60",
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            "--limit-rate",
            rate,
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &url,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect()
    };
    let args = download("8M");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let client = bed.spawn_in(&bed.cgroup.path, "curl", &refs).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    bed.kill_agent();
    let out = client.wait_with_output().unwrap();
    let got: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    assert!(
        !out.status.success(),
        "the transfer cannot complete without the agent"
    );
    assert!(got > 0 && got < BIG_FILE_BYTES, "downloaded {got} bytes");

    // While it is down: refused, and nothing goes direct.
    assert_eq!(bed.tcp_connect(ORIGIN_IP, 443).unwrap(), "EPERM");
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);

    // `egress run` after the crash recovers without manual cleanup.
    bed.start_default_agent().unwrap();
    let args = download("1G");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = bed.run_in_cgroup("curl", &refs).unwrap();
    assert_eq!(result.code, Some(0), "{result:?}");
    assert_eq!(result.stdout, BIG_FILE_BYTES.to_string());
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
}

#[test]
fn units_are_resolved_to_their_cgroups() {
    let mut bed = testbed();
    // A cgroup named like a systemd unit, as systemd would create it (here under egress-test/).
    let unit = format!("{}.service", bed.name);
    let unit_cgroup = Cgroup::create(&format!("egress-test/{unit}")).unwrap();
    bed.start_agent_with(&["--unit", &unit]).unwrap();
    let result = bed
        .curl_in(&unit_cgroup.path, &["https://origin.test:8448/"])
        .unwrap();
    assert_eq!(result.code, Some(0), "{result:?}");
    let squid = bed.eventually(Duration::from_secs(5), Testbed::squid_access_log, |l| {
        l.contains(":8448")
    });
    assert!(
        squid.contains(&format!("CONNECT {ORIGIN_NAME}:8448 {PROXY_USER}")),
        "{squid}"
    );
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);

    let missing = bed
        .egress(&["check-config", "--unit", "no-such-unit-egress.service"])
        .unwrap();
    assert_eq!(missing.code, Some(1));
    assert!(
        missing.stderr.contains("no-such-unit-egress.service"),
        "{missing:?}"
    );
    bed.stop_agent();
    drop(unit_cgroup);
}

#[test]
fn settings_are_imported_from_synapse_homeserver_yaml() {
    let mut bed = testbed();
    let yaml = bed.dir.join("homeserver.yaml");
    std::fs::write(
        &yaml,
        format!(
            "server_name: example.org\n\
             listeners:\n  - port: 8008\n    type: http\n    resources: [{{names: [client, federation]}}]\n\
             database: {{name: sqlite3, args: {{database: /tmp/x.db}}}}\n\
             https_proxy: http://{PROXY_USER}:{PROXY_PASSWORD}@{PROXY_IP}:3128\n\
             no_proxy_hosts: ['{ORIGIN_NAME}:8448']\n\
             ip_range_whitelist: ['{LAN}']\n"
        ),
    )
    .unwrap();
    bed.start_agent(&["--homeserver-config", &yaml.to_string_lossy()])
        .unwrap();
    for port in [443, 8448] {
        assert_eq!(
            bed.curl(&format!("https://{ORIGIN_NAME}:{port}/")).unwrap().code,
            Some(0)
        );
    }
    let squid = bed.eventually(Duration::from_secs(5), Testbed::squid_access_log, |l| {
        l.contains(":443")
    });
    assert!(
        squid.contains(&format!("CONNECT {ORIGIN_NAME}:443 {PROXY_USER}")),
        "{squid}"
    );
    assert!(!squid.contains(":8448"), "{squid}");
    let origin = bed.eventually(Duration::from_secs(5), Testbed::origin_access_log, |l| {
        l.contains(HS_IP)
    });
    assert!(
        origin.contains(&format!("{HS_IP} 8448 ")),
        "8448 is no_proxy: direct\n{origin}"
    );
}

#[test]
fn check_config_and_explain_work_on_the_shipped_example() {
    let bed = testbed();
    let example = repo_file("packaging/egress.toml");
    let out = bed.egress(&["check-config", "--config", &example]).unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .contains("https_proxy = \"http://synapse:***@proxy.example.net:3128\""),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("change-me"),
        "secret printed:\n{}",
        out.stdout
    );

    let explain = |dest: &str| {
        bed.egress(&["explain", "--config", &example, dest, "--ip", "93.184.216.34"])
            .unwrap()
    };
    let out = explain("matrix.org:8448");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .contains("TLS (SNI): CONNECT matrix.org:8448 via http://synapse:***@proxy.example.net:3128"),
        "{}",
        out.stdout
    );
    let out = bed
        .egress(&["explain", "--config", &example, "10.1.2.3:443"])
        .unwrap();
    assert!(
        out.stdout.contains("EPERM") && out.stdout.contains("ip_range_blacklist 10.0.0.0/8"),
        "{}",
        out.stdout
    );
    let out = bed
        .egress(&["explain", "--config", &example, "10.20.5.5:443"])
        .unwrap();
    assert!(
        out.stdout.contains("EPERM"),
        "no_proxy does not override the blacklist:\n{}",
        out.stdout
    );
    let out = bed
        .egress(&["explain", "--config", &example, "10.20.30.40:443"])
        .unwrap();
    assert!(
        out.stdout.contains("not intercepted: goes direct"),
        "{}",
        out.stdout
    );

    // Bad files are refused, naming the key and the value.
    for (text, needles) in [
        (
            "ip_range_blacklist = [\"10.0.0.0/33\"]",
            &["ip_range_blacklist", "10.0.0.0/33"][..],
        ),
        ("https_proxy = \"socks5://p:1080\"", &["https_proxy", "socks5"]),
        ("no_proxy_hosts = []", &["no_proxy_hosts"]),
        ("listen_port = 70000", &["listen_port"]),
        ("cgroups = [\"/nonexistent-cgroup\"]\n[extra]", &["extra"]),
    ] {
        let path = bed.dir.join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = bed
            .egress(&["check-config", "--config", &path.to_string_lossy()])
            .unwrap();
        assert_eq!(out.code, Some(1), "{text}: {out:?}");
        for needle in needles {
            assert!(
                out.stderr.contains(needle),
                "{text}: stderr should name {needle}: {}",
                out.stderr
            );
        }
    }
    // A cgroup that does not exist refuses `run`.
    let out = bed
        .egress(&[
            "run",
            "--cgroup",
            "/sys/fs/cgroup/nonexistent-egress",
            "--https-proxy",
            "p:1",
        ])
        .unwrap();
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("nonexistent-egress"), "{}", out.stderr);
}

#[test]
fn status_names_attached_cgroups_and_json_logs_parse() {
    let mut bed = testbed();
    bed.start_agent_with(&["--log-format", "json"]).unwrap();
    let status = bed
        .egress(&["status", "--bpffs-dir", &bed.pin_dir.to_string_lossy()])
        .unwrap();
    let cgroup_line = format!("attached cgroup {} (id ", bed.cgroup.path.display());
    assert!(status.stdout.contains(&cgroup_line), "{status:?}");
    assert!(
        status.stdout.contains("agent: not reachable") || status.stdout.contains("agent: "),
        "{status:?}"
    );

    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0)
    );
    let log = bed.eventually(Duration::from_secs(5), Testbed::agent_log, |l| {
        l.contains("\"route\"")
    });
    let line = log
        .lines()
        .find(|l| l.contains("\"route\""))
        .unwrap_or_else(|| panic!("{log}"));
    for field in [
        "\"route\":\"proxy-connect\"",
        "\"name\":\"origin.test\"",
        "\"original_dst\":\"10.248.0.30:443\"",
        "\"outcome\":\"ok\"",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    assert!(!log.contains(PROXY_PASSWORD));
}
