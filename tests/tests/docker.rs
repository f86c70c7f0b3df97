//! Homeservers in containers of a real engine (Debian's dockerd, started by the test inside the
//! homeserver namespace), served by one egress on the host with no proxy settings in the
//! containers.
//!
//! Root only.

use egress_testbed::{
    ORIGIN_IP, ORIGIN_NAME, Testbed,
    peers::{
        docker::Docker,
        federation::{
            DirectFederation, PeerHomeserver, federation_overrides, register_with_name, wait_healthy,
        },
        synapse,
    },
};

/// A standard testbed, dockerd in its homeserver namespace, and the user-defined network
/// `matrix-homeserver` with `subnet` (as matrix-docker-ansible-deploy names it).
fn engine_with_network(subnet: &str) -> (Testbed, Docker) {
    let bed = Testbed::standard();
    let docker = Docker::start(&bed).unwrap();
    docker
        .run(&["network", "create", "--subnet", subnet, "matrix-homeserver"])
        .unwrap();
    (bed, docker)
}

/// Options that make `origin.test` resolve to the origin and the test CA available as /ca.pem.
fn origin_options(bed: &Testbed) -> Vec<String> {
    vec![
        "--add-host".into(),
        format!("{ORIGIN_NAME}:{ORIGIN_IP}"),
        "-v".into(),
        format!("{}:/ca.pem:ro", bed.certs.ca.display()),
    ]
}

/// curl in container `name` with no proxy settings; prints the HTTP status.
fn curl_origin(docker: &Docker, name: &str) -> String {
    let url = format!("https://{ORIGIN_NAME}/");
    let out = docker
        .command(&[
            "exec",
            name,
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            "15",
            "--cacert",
            "/ca.pem",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits until the agent serves container `name`'s current network namespace.
fn wait_served(bed: &Testbed, docker: &Docker, name: &str) -> u64 {
    let id = docker.netns_id(name).unwrap();
    bed.agent()
        .serving(id)
        .unwrap_or_else(|e| panic!("the agent does not serve container {name}: {e:#}"));
    id
}

#[test]
fn containers_on_a_user_defined_network_reach_the_origin_only_through_squid() {
    let (mut bed, docker) = engine_with_network("10.251.0.0/24");
    // egress attached to the engine's cgroup parent: every container, also later ones.
    let parent = docker.cgroup.path.to_string_lossy().into_owned();
    bed.start_agent_with(&["--cgroup", &parent]).unwrap();

    let mut options = vec!["--network".to_owned(), "matrix-homeserver".to_owned()];
    options.extend(origin_options(&bed));
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    docker.run_container("synapse", &options).unwrap();
    let first = wait_served(&bed, &docker, "synapse");
    assert_eq!(curl_origin(&docker, "synapse"), "200");
    bed.agent()
        .wait_decision(&[("netns", &first), ("route", &"proxy-connect")])
        .unwrap();
    bed.squid_logged(&format!("CONNECT {ORIGIN_NAME}:443")).unwrap();

    // Restarted: a new network namespace (its inode number may be the old one's), served too.
    let served = |agent: &egress_testbed::agent::Agent| {
        agent
            .lines()
            .iter()
            .filter(|l| l.message() == "serving a network namespace")
            .count()
    };
    let before = served(bed.agent());
    docker.run(&["restart", "-t", "1", "synapse"]).unwrap();
    egress_testbed::wait::until(
        "the restarted container's namespace served",
        egress_testbed::wait::SHORT,
        || Ok(served(bed.agent())),
        |n| *n > before,
    )
    .unwrap();
    let second = wait_served(&bed, &docker, "synapse");
    assert_eq!(curl_origin(&docker, "synapse"), "200");
    bed.agent()
        .wait_decision(&[("netns", &second), ("route", &"proxy-connect")])
        .unwrap();

    // A second container started after egress.
    docker.run_container("bridge", &options).unwrap();
    let third = wait_served(&bed, &docker, "bridge");
    assert_eq!(curl_origin(&docker, "bridge"), "200");
    bed.agent()
        .wait_decision(&[("netns", &third), ("route", &"proxy-connect")])
        .unwrap();

    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        0,
        "a container's packet reached the origin directly (masqueraded as the host)"
    );
}

#[test]
fn a_container_reaches_a_database_container_directly_from_its_own_address() {
    let (mut bed, docker) = engine_with_network("10.252.0.0/24");
    let parent = docker.cgroup.path.to_string_lossy().into_owned();
    bed.start_agent_with(&[
        "--cgroup",
        &parent,
        "--no-proxy",
        "db.test",
        "--ip-range-whitelist",
        "10.252.0.0/24",
    ])
    .unwrap();
    docker
        .run(&[
            "run",
            "-d",
            "--name",
            "db",
            "--network",
            "matrix-homeserver",
            "--ip",
            "10.252.0.50",
            "-v",
            "/usr:/usr:ro",
            egress_testbed::peers::docker::IMAGE,
            "python3",
            "-c",
            egress_testbed::peers::ADDRESS_ECHO_SERVER,
            "0.0.0.0",
            "8080",
        ])
        .unwrap();
    docker
        .run_container(
            "synapse",
            &[
                "--network",
                "matrix-homeserver",
                "--ip",
                "10.252.0.40",
                "--add-host",
                "db.test:10.252.0.50",
            ],
        )
        .unwrap();
    let id = wait_served(&bed, &docker, "synapse");

    let response = egress_testbed::wait::until(
        "the database container to answer",
        egress_testbed::wait::SHORT,
        || {
            let out = docker
                .command(&[
                    "exec",
                    "synapse",
                    "curl",
                    "-sS",
                    "--noproxy",
                    "*",
                    "--max-time",
                    "5",
                    "http://db.test:8080/",
                ])
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        },
        |body| !body.is_empty(),
    )
    .unwrap();
    // From the application's own address on its network, not the host's gateway address.
    assert_eq!(response, "client 10.252.0.40");
    let line = bed
        .agent()
        .wait_decision(&[("netns", &id), ("route", &"direct")])
        .unwrap();
    assert_eq!(line.get("rule_kind"), "no_proxy", "{line}");
}

/// A container command that tries the origin from its very first moment: 30 attempts, 0.1 s
/// apart, each HTTP status (000: refused) appended to /probe/log; then it idles.
const PROBE: &str = "for i in $(seq 30); do curl -s -o /dev/null -w '%{http_code}\\n' --noproxy '*' \
--max-time 3 --cacert /ca.pem https://origin.test/ >> /probe/log; sleep 0.1; done; exec sleep 600";

#[test]
fn a_followed_container_is_intercepted_across_restart_and_recreation_while_others_pass() {
    let (mut bed, docker) = engine_with_network("10.253.0.0/24");
    let mut options = vec!["--network".to_owned(), "matrix-homeserver".to_owned()];
    options.extend(origin_options(&bed));
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    docker.run_container("other", &options).unwrap();
    docker.run_container("synapse", &options).unwrap();
    let socket = docker.socket.to_string_lossy().into_owned();
    // A service (no container) under the engine's parent, attached in full: the scope above it
    // must not let it pass.
    let service = egress_testbed::topology::cgroup::Cgroup::create(&format!(
        "{}/matrix-synapse.service",
        docker.cgroup_parent.trim_start_matches('/')
    ))
    .unwrap();
    let service_path = service.path.to_string_lossy().into_owned();
    bed.start_agent_with(&[
        "--container",
        "synapse",
        "--container-engine-socket",
        &socket,
        "--cgroup",
        &service_path,
    ])
    .unwrap();

    let synapse = wait_served(&bed, &docker, "synapse");
    let status = bed.agent().status().unwrap();
    assert!(
        status.stdout.contains("following container synapse"),
        "{status:?}"
    );
    assert!(
        status
            .stdout
            .contains("(selectively: followed containers and pods only)"),
        "{status:?}"
    );
    assert_eq!(curl_origin(&docker, "synapse"), "200");
    bed.agent()
        .wait_decision(&[("netns", &synapse), ("route", &"proxy-connect")])
        .unwrap();
    // Run with Docker's default capabilities, it could write packets no cgroup program sees
    // (packet sockets): the admin is told, for the followed container only.
    let warned = |holds: &str| {
        bed.agent()
            .lines()
            .iter()
            .any(|l| l.level() == "WARN" && l.message().contains("CAP_NET_RAW") && l.get("holds") == holds)
    };
    assert!(warned("container synapse"), "no CAP_NET_RAW warning");
    assert!(!warned("container other"));

    // Not followed: left alone (direct, as without egress), and no listener in its namespace.
    let passed = bed.agent().counter("pass_unselected").unwrap();
    assert_eq!(curl_origin(&docker, "other"), "200");
    assert!(bed.agent().counter("pass_unselected").unwrap() > passed);
    let other = docker.netns_id("other").unwrap();
    assert!(
        !bed.agent()
            .decisions()
            .iter()
            .any(|d| d.get("netns") == other.to_string()),
        "a connection of the container not followed reached egress"
    );
    let url = format!("https://{ORIGIN_NAME}/");
    let from_service = bed
        .curl_in(&service.path, &["-o", "/dev/null", "-w", "%{http_code}", &url])
        .unwrap();
    assert_eq!(from_service.stdout, "200", "{from_service:?}");
    let line = bed
        .agent()
        .wait_decision(&[("netns", &"-"), ("route", &"proxy-connect")])
        .unwrap();
    assert!(line.get("target") == format!("{ORIGIN_NAME}:443"), "{line}");
    let direct = bed.direct_packets_at_origin().unwrap();
    assert!(direct > 0, "the other container went direct");

    // Recreated under the same name (a new id, a new cgroup) with a command that connects from
    // its first moment: refused until egress classifies the new cgroup, then proxied; never
    // direct.
    let probe = bed.dir.join("probe");
    std::fs::create_dir_all(&probe).unwrap();
    docker.run(&["rm", "-f", "synapse"]).unwrap();
    let mut args = vec![
        "run",
        "-d",
        "--name",
        "synapse",
        "-v",
        "/usr:/usr:ro",
        "-v",
        "/etc/ssl:/etc/ssl:ro",
    ];
    let volume = format!("{}:/probe", probe.display());
    args.extend(["-v", &volume]);
    args.extend_from_slice(&options);
    args.extend([egress_testbed::peers::docker::IMAGE, "sh", "-c", PROBE]);
    docker.run(&args).unwrap();
    let statuses = wait_probes(&probe.join("log"), 30);
    assert!(statuses.iter().all(|s| s == "200" || s == "000"), "{statuses:?}");
    assert!(
        statuses.contains(&"200".to_owned()),
        "never proxied: {statuses:?}"
    );
    wait_served(&bed, &docker, "synapse");

    // Restarted: the same container, a new cgroup again.
    docker.run(&["restart", "-t", "1", "synapse"]).unwrap();
    let statuses = wait_probes(&probe.join("log"), 60);
    assert!(
        statuses[30..].contains(&"200".to_owned()),
        "never proxied after the restart: {statuses:?}"
    );

    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        direct,
        "the followed container sent a packet directly to the origin"
    );
    bed.squid_logged(&format!("CONNECT {ORIGIN_NAME}:443")).unwrap();

    // While the engine cannot say which container a new cgroup holds, the cgroup stays refused.
    let hidden = docker.socket.with_extension("hidden");
    std::fs::rename(&docker.socket, &hidden).unwrap();
    let unknown = docker.cgroup.path.join("0123456789abcdef".repeat(4));
    std::fs::create_dir(&unknown).unwrap();
    let refused = bed.agent().counter("deny_unclassified").unwrap();
    let connect = |cgroup: &std::path::Path| {
        bed.tcp_connect_in(cgroup, egress_testbed::ORIGIN_IP, 443)
            .unwrap()
    };
    bed.agent().logged("asking the container engine").unwrap();
    assert_eq!(connect(&unknown), "EPERM");
    assert!(bed.agent().counter("deny_unclassified").unwrap() > refused);
    // Back: the engine knows no such container, so the cgroup is left alone.
    std::fs::rename(&hidden, &docker.socket).unwrap();
    egress_testbed::wait::until(
        "the new cgroup to be classified",
        egress_testbed::wait::SHORT,
        || Ok(connect(&unknown)),
        |r| r == "connected",
    )
    .unwrap();
    let _ = std::fs::remove_dir(&unknown);

    // Following the other container too, from the command line, into the running agent.
    let pin_dir = bed.pin_dir.to_string_lossy().into_owned();
    let attach = bed
        .egress(&[
            "attach",
            "--container",
            "other",
            "--container-engine-socket",
            &socket,
            "--bpffs-dir",
            &pin_dir,
        ])
        .unwrap();
    assert_eq!(attach.code, Some(0), "{attach:?}");
    bed.agent().serving(other).unwrap();
    assert_eq!(curl_origin(&docker, "other"), "200");
    bed.agent()
        .wait_decision(&[("netns", &other), ("route", &"proxy-connect")])
        .unwrap();
}

/// Waits until the probe log holds `n` statuses; returns them.
fn wait_probes(log: &std::path::Path, n: usize) -> Vec<String> {
    egress_testbed::wait::until(
        &format!("{n} probe results in {}", log.display()),
        std::time::Duration::from_secs(90),
        || {
            Ok(std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>())
        },
        |lines| lines.len() >= n,
    )
    .unwrap()
}

#[test]
fn synapse_in_a_container_federates_with_a_second_synapse_through_egress() {
    use egress_testbed::HS_IP;
    let mut bed = Testbed::builder().squid().build().unwrap();
    // Federation that went direct: from the homeserver host to port 8448 of the origin host.
    let direct_federation = DirectFederation::install(&bed.origin, HS_IP).unwrap();
    // hs2: example.test, on the origin host, outside egress; it finds hs.test at the homeserver
    // host, where docker publishes hs1's federation port.
    let hs2 = PeerHomeserver::start(
        &bed,
        "example.test",
        "0.0.0.0",
        &bed.certs,
        &format!("{HS_IP} hs.test\n"),
        &[],
    )
    .unwrap();
    let hs2_dir = hs2.dir.clone();
    let in_hs2 = |args: &[&str]| hs2.run(args);
    let venv = synapse::venv().unwrap();
    let python = venv.join("bin/python").to_string_lossy().into_owned();

    // hs1: hs.test, in a container on a user-defined network, with no proxy settings; the
    // host's Python and Synapse mounted read-only, its state in a directory of the test.
    let docker = Docker::start(&bed).unwrap();
    docker
        .run(&[
            "network",
            "create",
            "--subnet",
            "10.254.0.0/24",
            "matrix-homeserver",
        ])
        .unwrap();
    // The network's resolver, as a host's would be: example.test, no SRV records (NXDOMAIN for
    // the rest of .test, not REFUSED, which Synapse takes for a failure).
    let _dns = egress_testbed::peers::start_dnsmasq_on(
        &bed.hs,
        &bed.dir,
        "10.254.0.1",
        "10.248.0.30 example.test\n",
        &[],
        &[],
    )
    .unwrap();
    let hs1_dir = bed.dir.join("hs1");
    let hs1_certs = egress_testbed::peers::make_certs(&bed.dir, "hs1", &["hs.test"], &[HS_IP], 2).unwrap();
    let hs1_args = synapse::configure(
        &hs1_dir,
        "hs.test",
        &federation_overrides(&hs1_dir, &hs1_certs, "0.0.0.0"),
    )
    .unwrap();
    let python_home = std::fs::canonicalize(venv.join("bin/python")).unwrap();
    let python_root = python_home
        .ancestors()
        .nth(2)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let mounts = [
        format!("{python_root}:{python_root}:ro"),
        format!("{}:{}:ro", venv.display(), venv.display()),
        format!("{}:{}", bed.dir.display(), bed.dir.display()),
    ];
    let mut args = vec![
        "run",
        "-d",
        "--name",
        "matrix-synapse",
        "--network",
        "matrix-homeserver",
        "-p",
        "8448:8448",
        "--add-host",
        "example.test:10.248.0.30",
        "--dns",
        "10.254.0.1",
        "-v",
        "/usr:/usr:ro",
        "-v",
        "/etc/ssl:/etc/ssl:ro",
        "-w",
    ];
    let hs1_dir_s = hs1_dir.to_string_lossy().into_owned();
    args.push(&hs1_dir_s);
    for mount in &mounts {
        args.extend(["-v", mount.as_str()]);
    }
    args.extend([egress_testbed::peers::docker::IMAGE, python.as_str()]);
    args.extend(hs1_args.iter().map(String::as_str));
    docker.run(&args).unwrap();
    let socket = docker.socket.to_string_lossy().into_owned();
    bed.start_agent_with(&[
        "--container",
        "matrix-synapse",
        "--container-engine-socket",
        &socket,
    ])
    .unwrap();
    let in_hs1 = |args: &[&str]| {
        let mut all = vec!["exec", "matrix-synapse"];
        all.extend_from_slice(args);
        let out = docker.command(&all).output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    wait_healthy("hs1", &in_hs1).unwrap();
    register_with_name(&in_hs1, &hs1_dir, "alice", "Alice on hs1");
    register_with_name(&in_hs2, &hs2_dir, "bob", "Bob on hs2");

    // hs1 → hs2 (through egress and squid), and hs2 → hs1 (which makes hs1 fetch hs2's keys,
    // through egress again).
    let bob = in_hs1(&[
        "curl",
        "-sS",
        "--max-time",
        "60",
        "http://127.0.0.1:8008/_matrix/client/v3/profile/@bob:example.test",
    ]);
    assert!(
        bob.contains("Bob on hs2"),
        "hs1 asking hs2 for bob's profile: {bob}"
    );
    let alice = in_hs2(&[
        "curl",
        "-sS",
        "--max-time",
        "60",
        "http://127.0.0.1:8008/_matrix/client/v3/profile/@alice:hs.test",
    ]);
    assert!(
        alice.contains("Alice on hs1"),
        "hs2 asking hs1 for alice's profile: {alice}"
    );

    let netns = docker.netns_id("matrix-synapse").unwrap();
    assert_eq!(
        direct_federation.packets().unwrap(),
        0,
        "hs1 reached hs2 directly"
    );
    // The decision line and squid's log entry come when the tunnel closes: stop hs1, which
    // closes its pooled connections.
    docker.run(&["stop", "-t", "10", "matrix-synapse"]).unwrap();
    let line = bed
        .agent()
        .wait_decision(&[("netns", &netns), ("target", &"example.test:8448")])
        .unwrap();
    assert!(
        line.get("route") == "proxy-connect" && line.get("status") == "200",
        "{line}"
    );
    bed.squid_logged("CONNECT example.test:8448").unwrap();
}

/// In a container: asks argv[1] (the network's DNS server) for the SRV record of
/// delegated.test, as a homeserver's Twisted does; resolves the target, fed2.test, from the
/// container's own hosts file (no packet); then opens TLS to that address with SNI
/// delegated.test, as Synapse does for an SRV-delegated server. argv[2], if given, is the address
/// to dial instead (a container whose hosts file is gone). Prints the first bytes of the answer.
const DELEGATED_CLIENT: &str = r#"
import socket, ssl, struct, sys
labels = b"".join(bytes([len(l)]) + l.encode() for l in "_matrix-fed._tcp.delegated.test".split("."))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.sendto(struct.pack(">HHHHHH", 77, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack(">HH", 33, 1), (sys.argv[1], 53))
u.recv(4096)
address = sys.argv[2] if len(sys.argv) > 2 else socket.gethostbyname("fed2.test")
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
with socket.create_connection((address, 443), timeout=10) as s:
    with ctx.wrap_socket(s, server_hostname="delegated.test") as t:
        t.sendall(b"GET / HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n")
        print(t.recv(12).decode())
"#;

/// A container resolves an SRV target from its own hosts file (`--add-host`, as Kubernetes'
/// hostAliases): egress reads that file (through the namespace helper, inside the container's
/// root) and CONNECTs to the target. Another container (its root with CAP_SYS_ADMIN) replaces
/// its /etc/hosts with a symbolic link to a file that exists only on the host, naming the
/// target: the helper must not follow it
/// out of the container's root, so that container's lookup fails (and its connection goes by the
/// one SRV target, unchecked) instead of reading the host's file.
#[test]
fn a_containers_srv_target_from_its_hosts_file_is_checked_in_its_own_root() {
    let mut bed = Testbed::builder()
        .squid_hosts(&format!("{ORIGIN_IP} fed2.test delegated.test\n"))
        .nginx()
        .build()
        .unwrap();
    let docker = Docker::start(&bed).unwrap();
    docker
        .run(&[
            "network",
            "create",
            "--subnet",
            "10.247.0.0/24",
            "matrix-homeserver",
        ])
        .unwrap();
    let _dns = egress_testbed::peers::start_dnsmasq_on(
        &bed.hs,
        &bed.dir,
        "10.247.0.1",
        "",
        &[("_matrix-fed._tcp.delegated.test".into(), "fed2.test".into(), 443)],
        &[],
    )
    .unwrap();
    let parent = docker.cgroup.path.to_string_lossy().into_owned();
    bed.start_agent_with(&["--cgroup", &parent]).unwrap();

    docker
        .run_container(
            "app",
            &[
                "--network",
                "matrix-homeserver",
                "--add-host",
                &format!("fed2.test:{ORIGIN_IP}"),
            ],
        )
        .unwrap();
    let secret = bed.dir.join("host-only-hosts");
    std::fs::write(&secret, format!("{ORIGIN_IP} fed2.test\n")).unwrap();
    // Docker mounts the container's hosts file in place; its root, given CAP_SYS_ADMIN, takes
    // it away and puts a link in its place.
    let link = format!(
        "umount /etc/hosts && rm -f /etc/hosts && ln -s {} /etc/hosts && exec sleep 600",
        secret.display()
    );
    docker
        .run(&[
            "run",
            "-d",
            "--name",
            "squatter",
            "--network",
            "matrix-homeserver",
            "--cap-add",
            "SYS_ADMIN",
            "-v",
            "/usr:/usr:ro",
            egress_testbed::peers::docker::IMAGE,
            "sh",
            "-c",
            &link,
        ])
        .unwrap();

    for (name, extra) in [("app", None), ("squatter", Some(ORIGIN_IP))] {
        let state = docker.run(&["inspect", "-f", "{{.State.Status}}", name]).unwrap();
        let logs = docker.command(&["logs", name]).output().unwrap();
        assert_eq!(
            state,
            "running",
            "{name}: {}",
            String::from_utf8_lossy(&logs.stderr)
        );
        let id = wait_served(&bed, &docker, name);
        let mut args = vec!["exec", name, "python3", "-c", DELEGATED_CLIENT, "10.247.0.1"];
        args.extend(extra);
        let out = docker.command(&args).output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.starts_with("HTTP/1.1"),
            "{name}: {said} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = bed
            .agent()
            .wait_decision(&[("netns", &id), ("target", &"fed2.test:443")])
            .unwrap();
        let (named_by, lookup) = (line.get("named_by"), line.get("lookup"));
        match name {
            "app" => assert_eq!(
                (named_by.as_str(), lookup.as_str()),
                ("srv_lookup", "done"),
                "{line}"
            ),
            _ => assert_eq!(
                (named_by.as_str(), lookup.as_str()),
                ("srv_target", "failed"),
                "{line}"
            ),
        }
    }
}
