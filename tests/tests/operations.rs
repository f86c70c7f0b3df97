//! Daemon operations: health and metrics, dropped privileges, crash in the middle of a transfer,
//! targets by unit name, import from Synapse's homeserver.yaml, check-config and explain.
//!
//! Root only.

use std::{path::Path, time::Duration};

use egress_testbed::{
    HS_IP, LAN, ORIGIN_IP, ORIGIN_NAME, PROXY_IP, PROXY_PASSWORD, PROXY_USER, Testbed, cgroup::Cgroup,
    egress, peers::BIG_FILE_BYTES, process::TempDir,
};

fn repo_file(relative: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
        .to_string_lossy()
        .into_owned()
}

#[test]
fn health_and_metrics_report_what_happened() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    let (code, body) = bed.agent().admin_get("/health").unwrap();
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
    let agent = bed.agent();
    let ok = [("route", "proxy-connect"), ("outcome", "ok")];
    agent
        .wait_metric("egress_connections_total", &ok, 1, Duration::from_secs(5))
        .unwrap();
    let metrics = agent.metrics().unwrap();
    let count = |name: &str, labels: &[(&str, &str)]| metrics.count(name, labels).unwrap();
    // One connection in all, and that one proxied.
    assert_eq!(count("egress_connections_total", &[]), 1, "{metrics:#?}");
    assert_eq!(
        count("egress_kernel_decisions_total", &[("decision", "redirected")]),
        1
    );
    assert_eq!(
        count("egress_kernel_decisions_total", &[("decision", "deny_blacklist")]),
        1
    );
    assert_eq!(count("egress_upstream_connect_seconds_count", &[]), 1);
    assert!(count("egress_bytes_total", &[("direction", "down")]) > 500);
    assert_eq!(count("egress_connections_active", &[]), 0);

    // Detached from its cgroup: unhealthy, and says why.
    let cgroup = bed.cgroup.path.to_string_lossy().into_owned();
    let pin_dir = bed.pin_dir.to_string_lossy().into_owned();
    assert_eq!(
        bed.egress(&["detach", "--cgroup", &cgroup, "--bpffs-dir", &pin_dir])
            .unwrap()
            .code,
        Some(0)
    );
    let (code, body) = bed.agent().admin_get("/health").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not attached to cgroup"), "{body}");
}

#[test]
fn health_fails_when_the_upstream_is_unreachable() {
    // No peers: nothing listens on the proxy host.
    let mut bed = Testbed::builder().build().unwrap();
    let url = format!("http://{PROXY_IP}:9");
    bed.start_agent(&["--https-proxy", &url, "--ip-range-whitelist", LAN])
        .unwrap();
    let (code, body) = bed.agent().admin_get("/health").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("unreachable") && body.contains("refused"), "{body}");
}

#[test]
fn the_running_agent_is_unprivileged_but_for_cap_net_admin() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", bed.agent().pid().unwrap())).unwrap();
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
    let mut bed = Testbed::standard();
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
    let mut bed = Testbed::standard();
    // A cgroup named like a systemd unit, as systemd would create it (here under egress-test/).
    let unit = format!("{}.service", bed.name);
    let unit_cgroup = Cgroup::create(&format!("egress-test/{unit}")).unwrap();
    bed.start_agent_with(&["--unit", &unit]).unwrap();
    let result = bed
        .curl_in(&unit_cgroup.path, &["https://origin.test:8448/"])
        .unwrap();
    assert_eq!(result.code, Some(0), "{result:?}");
    let squid = bed.squid_logged(":8448").unwrap();
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
    let mut bed = Testbed::standard();
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
    let squid = bed.squid_logged(":443").unwrap();
    assert!(
        squid.contains(&format!("CONNECT {ORIGIN_NAME}:443 {PROXY_USER}")),
        "{squid}"
    );
    assert!(!squid.contains(":8448"), "{squid}");
    let origin = bed.origin_logged(HS_IP).unwrap();
    assert!(
        origin.contains(&format!("{HS_IP} 8448 ")),
        "8448 is no_proxy: direct\n{origin}"
    );
}

#[test]
fn check_config_and_explain_work_on_the_shipped_example() {
    // The CLI alone: no namespaces, no peers.
    let dir = TempDir::new("check-config").unwrap();
    let example = repo_file("packaging/egress.toml");
    let out = egress(&["check-config", "--config", &example]).unwrap();
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

    let explain =
        |dest: &str| egress(&["explain", "--config", &example, dest, "--ip", "93.184.216.34"]).unwrap();
    let out = explain("matrix.org:8448");
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .contains("TLS (SNI): CONNECT matrix.org:8448 via http://synapse:***@proxy.example.net:3128"),
        "{}",
        out.stdout
    );
    let out = egress(&["explain", "--config", &example, "10.1.2.3:443"]).unwrap();
    assert!(
        out.stdout.contains("EPERM") && out.stdout.contains("ip_range_blacklist 10.0.0.0/8"),
        "{}",
        out.stdout
    );
    let out = egress(&["explain", "--config", &example, "10.20.5.5:443"]).unwrap();
    assert!(
        out.stdout.contains("EPERM"),
        "no_proxy does not override the blacklist:\n{}",
        out.stdout
    );
    let out = egress(&["explain", "--config", &example, "10.20.30.40:443"]).unwrap();
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
        let path = dir.join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = egress(&["check-config", "--config", &path.to_string_lossy()]).unwrap();
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
    let out = egress(&[
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
    let mut bed = Testbed::standard();
    bed.start_agent_with(&["--log-format", "json"]).unwrap();
    // Run where the agent runs, `egress status` reaches its admin endpoint and shows its health.
    let agent_line = |status: &egress_testbed::ClientResult| {
        status
            .stdout
            .lines()
            .find(|l| l.starts_with("agent: "))
            .unwrap_or_else(|| panic!("no agent line: {status:?}"))
            .to_owned()
    };
    let status = bed.agent().status().unwrap();
    assert_eq!(status.code, Some(0), "{status:?}");
    let cgroup_line = format!("attached cgroup {} (id ", bed.cgroup.path.display());
    assert!(status.stdout.contains(&cgroup_line), "{status:?}");
    assert!(
        agent_line(&status).starts_with("agent: ok: attached to 1 cgroup(s); upstream reachable"),
        "{status:?}"
    );

    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0)
    );
    let line = bed.agent().wait_decision(&[("route", &"proxy-connect")]).unwrap();
    for (field, value) in [
        ("name", "origin.test"),
        ("target", "origin.test:443"),
        ("original_dst", "10.248.0.30:443"),
        ("outcome", "ok"),
    ] {
        assert_eq!(line.get(field), value, "{field} in {line}");
    }
    let log = bed.agent().log();
    for line in log.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
    assert!(!log.contains(PROXY_PASSWORD));

    // With the agent gone, status says so (and still shows the pins, which stay).
    bed.stop_agent();
    let status = bed.agent().status().unwrap();
    assert!(
        agent_line(&status).starts_with("agent: not reachable at 127.0.0.1:9478"),
        "{status:?}"
    );
    assert!(status.stdout.contains(&cgroup_line), "{status:?}");
}

#[test]
fn the_kubernetes_daemonset_is_privileged_with_host_pid_and_valid_egress_arguments() {
    let text = std::fs::read_to_string(repo_file("packaging/kubernetes/egress-daemonset.yaml")).unwrap();
    let docs: Vec<serde_json::Value> = serde_norway::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .collect();
    let daemonset = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true, "the pods' processes must be visible");
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["privileged"], true);
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(
        mounts.contains(&"/sys/fs/bpf") && mounts.contains(&"/sys/fs/cgroup"),
        "{mounts:?}"
    );
    // Its arguments are a valid egress command line.
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "run");
    let mut check = vec![
        "check-config",
        "--https-proxy",
        "http://user:secret@proxy.test:3128",
    ];
    check.extend_from_slice(&args[1..]);
    // As in a pod, where the API server's address comes from the environment.
    let mut command = std::process::Command::new(egress_testbed::egress_bin());
    command
        .args(&check)
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443");
    let out = egress_testbed::process::output(command).unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("pod_selector = "), "{out:?}");
    assert!(
        out.stdout.contains("kube_api = \"https://10.96.0.1:443\""),
        "{out:?}"
    );

    // The pod runs as a service account that may list pods, in the namespace it looks at.
    let namespace = args
        .iter()
        .find_map(|a| a.strip_prefix("--pod-namespace="))
        .expect("--pod-namespace");
    let account = pod["serviceAccountName"].as_str().expect("a service account");
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "RoleBinding")
        .expect("a RoleBinding");
    assert_eq!(binding["metadata"]["namespace"], namespace);
    assert_eq!(binding["subjects"][0]["name"], account);
    let role = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == binding["roleRef"]["name"])
        .expect("the bound Role");
    assert_eq!(role["metadata"]["namespace"], namespace);
    let rule = &role["rules"][0];
    assert_eq!(rule["resources"][0], "pods");
    assert!(
        rule["verbs"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("list")),
        "{rule}"
    );
}
