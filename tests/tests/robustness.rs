//! Faults around the agent: bpffs unmounted under it, a cgroup removed while attached, and no
//! secret in anything a run with credentials prints.
//!
//! Root only.

use egress_testbed::{LAN, ORIGIN_NAME, PROXY_IP, PROXY_PASSWORD, PROXY_USER, Testbed, process};

#[test]
fn bpffs_unmounted_under_a_running_agent_keeps_interception() {
    let mut bed = Testbed::standard();
    let mount = bed.use_private_bpffs().unwrap();
    bed.start_default_agent().unwrap();
    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0)
    );

    process::run("umount", &[&mount.to_string_lossy()]).unwrap();
    assert!(!bed.pin_dir.exists());
    // The agent holds the links: still intercepted, still through the proxy, nothing direct.
    for port in [443, 8448] {
        let result = bed.curl(&format!("https://{ORIGIN_NAME}:{port}/")).unwrap();
        assert_eq!(result.code, Some(0), "{result:?}");
    }
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        0,
        "traffic went direct after the unmount"
    );
    let squid = bed.squid_logged(":8448").unwrap();
    assert!(squid.contains("CONNECT origin.test:8448"), "{squid}");

    // And it says so.
    let (code, body) = bed.agent().admin_get("/health").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("bpffs unmounted"), "{body}");
    let line = bed.agent().logged("are gone").unwrap();
    assert!(line.message().contains("pinned links"), "{line}");
    assert_eq!(line.level(), "ERROR", "{line}");
}

#[test]
fn a_root_only_bpffs_as_systemd_mounts_it_is_handled_by_the_unprivileged_agent() {
    let mut bed = Testbed::standard();
    let mount = bed.use_private_bpffs_with("mode=700").unwrap();
    bed.start_default_agent().unwrap();
    // The agent runs as nobody and cannot look into the mount: still healthy, still working.
    let (code, body) = bed.agent().admin_get("/health").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0)
    );
    // The link keeper's first round, as the unprivileged agent, found them in place.
    bed.agent().logged("the pinned links are in place").unwrap();
    assert!(
        !bed.agent()
            .lines()
            .iter()
            .any(|l| l.message().contains("are gone")),
        "{}",
        bed.agent().log()
    );

    // And an unmount is still noticed, and survived.
    process::run("umount", &[&mount.to_string_lossy()]).unwrap();
    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}:8448/")).unwrap().code,
        Some(0)
    );
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
    let (code, body) = bed.agent().admin_get("/health").unwrap();
    assert_eq!(code, 503, "{body}");
}

#[test]
fn a_cgroup_removed_while_attached_is_reported_and_the_others_keep_working() {
    let mut bed = Testbed::standard();
    let cgroup_b = bed.cgroup_b.path.to_string_lossy().into_owned();
    bed.start_agent_with(&["--cgroup", &cgroup_b]).unwrap();
    assert_eq!(bed.agent().admin_get("/health").unwrap().0, 200);

    std::fs::remove_dir(&bed.cgroup_b.path).unwrap();
    let (code, body) = bed.agent().admin_get("/health").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(&format!("not attached to cgroup {cgroup_b}")),
        "{body}"
    );
    let status = bed
        .egress(&["status", "--bpffs-dir", &bed.pin_dir.to_string_lossy()])
        .unwrap();
    assert!(status.stdout.contains("(no longer exists)"), "{status:?}");

    // The other cgroup is still intercepted and served.
    assert_eq!(
        bed.curl(&format!("https://{ORIGIN_NAME}/")).unwrap().code,
        Some(0)
    );
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);
    std::fs::create_dir(&bed.cgroup_b.path).unwrap(); // for the testbed's own cleanup
}

#[test]
fn credentials_never_appear_in_logs_or_outputs() {
    use base64::Engine as _;
    let mut bed = Testbed::standard();
    let proxy = bed.proxy_url(PROXY_PASSWORD);
    let wrong = bed.proxy_url("wr0ng-Secret-pass");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{PROXY_USER}:{PROXY_PASSWORD}"));
    let basic_wrong =
        base64::engine::general_purpose::STANDARD.encode(format!("{PROXY_USER}:wr0ng-Secret-pass"));
    let mut outputs = Vec::new();

    // Every route, debug logging, and JSON logs.
    for format in ["text", "json"] {
        bed.start_agent(&[
            "--https-proxy",
            &proxy,
            "--http-proxy",
            &proxy,
            "--ip-range-whitelist",
            LAN,
            "--kernel-log",
            "--log-format",
            format,
        ])
        .unwrap();
        for url in [
            format!("https://{ORIGIN_NAME}/"),
            format!("http://{ORIGIN_NAME}/"),
        ] {
            assert_eq!(bed.curl(&url).unwrap().code, Some(0));
        }
        outputs.push(bed.agent().admin_get("/health").unwrap().1);
        outputs.push(bed.agent().admin_get("/metrics").unwrap().1);
        // Each run has a log of its own: keep it once both connections are counted (and so
        // logged: a connection's line is written before it is counted).
        bed.agent()
            .wait_metric("egress_connections_total", &[], 2, egress_testbed::wait::SHORT)
            .unwrap();
        outputs.push(bed.agent().log());
    }
    // Failures: wrong credentials (407) on both routes, and an unreachable proxy.
    bed.start_agent(&[
        "--https-proxy",
        &wrong,
        "--http-proxy",
        &wrong,
        "--ip-range-whitelist",
        LAN,
    ])
    .unwrap();
    for url in [
        format!("https://{ORIGIN_NAME}/"),
        format!("http://{ORIGIN_NAME}/"),
    ] {
        assert_ne!(bed.curl(&url).unwrap().code, Some(0));
    }
    outputs.push(bed.agent().admin_get("/health").unwrap().1);
    let failures = bed.agent().wait_decisions(2).unwrap();
    assert!(
        failures.iter().all(|l| l.get("status") == "407"),
        "the failures did happen: {failures:#?}"
    );
    bed.stop_agent();
    outputs.push(bed.agent().log());

    // The commands that print configuration or decisions, and refusals of bad values.
    let env_proxy = format!("http://{PROXY_USER}:{PROXY_PASSWORD}@{PROXY_IP}:99999");
    for args in [
        vec!["check-config", "--https-proxy", &proxy],
        vec![
            "explain",
            "--https-proxy",
            &proxy,
            "matrix.org:8448",
            "--ip",
            "93.184.216.34",
        ],
        vec!["check-config", "--https-proxy", &env_proxy],
        vec!["run", "--https-proxy", &env_proxy, "--cgroup", "/nonexistent"],
    ] {
        let out = bed.egress(&args).unwrap();
        outputs.push(out.stdout);
        outputs.push(out.stderr);
    }
    let out = bed.egress(&["--help"]).unwrap();
    outputs.push(out.stdout);

    let everything = outputs.join("\n");
    for secret in [
        PROXY_PASSWORD,
        "wr0ng-Secret-pass",
        basic.as_str(),
        basic_wrong.as_str(),
    ] {
        assert!(!everything.contains(secret), "`{secret}` leaked:\n{everything}");
    }
    assert!(
        everything.contains(&format!("{PROXY_USER}:***@")),
        "redacted form expected"
    );
}
