//! Processes in network namespaces of their own (containers), served by one agent on the host.
//!
//! These tests build what a container engine builds, with namespaces and cgroups only: a
//! network namespace per container behind the homeserver host (veth, routing, masquerade), and
//! its processes in the intercepted cgroup. `docker.rs` runs the same against a real engine.
//!
//! Root only.

use std::os::unix::fs::MetadataExt;

use egress_testbed::{
    ORIGIN_NAME, Testbed,
    peers::ADDRESS_ECHO_SERVER,
    process::{Daemon, Enter, launch},
    wait,
};

/// The namespace's nsfs inode number: what the agent logs as `netns=`.
fn netns_id(ns: &egress_testbed::topology::netns::Netns) -> u64 {
    std::fs::metadata(format!("/run/netns/{}", ns.name))
        .expect("the namespace's bind mount")
        .ino()
}

/// A resident process in `ns` and the intercepted cgroup, as a container's main process is; the
/// agent finds the namespace through it. Killed on drop.
fn resident(bed: &Testbed, ns: &egress_testbed::topology::netns::Netns) -> Daemon {
    let command = launch(
        Some(&ns.name),
        Enter::Net,
        Some(&bed.cgroup.path),
        "sleep",
        &["120"],
    );
    Daemon::spawn(
        "resident",
        command,
        &bed.dir.join(format!("resident-{}.log", ns.name)),
    )
    .expect("starting the resident process")
}

#[test]
fn a_container_started_after_egress_reaches_the_origin_only_through_squid() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    // The container appears after the agent started.
    let ct = bed.add_container_netns(1).unwrap();
    let id = netns_id(&ct);
    let main = resident(&bed, &ct);
    bed.agent()
        .logged(&format!("netns={id}"))
        .expect("the agent serves the container's namespace");

    let url = format!("https://{ORIGIN_NAME}/");
    let result = bed
        .curl_from(
            &ct,
            &bed.cgroup.path,
            &["-o", "/dev/null", "-w", "%{http_code}", &url],
        )
        .unwrap();
    assert_eq!(result.stdout, "200", "curl from the container: {result:?}");
    let line = bed
        .agent()
        .wait_decision(&[&format!("netns={id}"), "route=proxy-connect"])
        .unwrap();
    assert!(line.contains(&format!("target={ORIGIN_NAME}:443")), "{line}");
    bed.squid_logged(&format!("CONNECT {ORIGIN_NAME}:443")).unwrap();
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        0,
        "a packet from the homeserver host (the container masqueraded) reached the origin directly"
    );

    // The container stops: its listener goes, and the namespace is no longer served.
    drop(main);
    bed.agent().logged("stopped serving a network namespace").unwrap();
    wait::until(
        "the listener in the container's namespace to close",
        wait::SHORT,
        || Ok(ct.is_listening(1001)),
        |listening| !listening,
    )
    .unwrap();
}

#[test]
fn direct_connections_leave_from_the_containers_namespace() {
    let mut bed = Testbed::standard();
    let ct = bed.add_container_netns(2).unwrap();
    // db: reachable from the container only, over a link of its own.
    let db = egress_testbed::topology::netns::Netns::create(format!("{}-db", bed.name)).unwrap();
    ct.ip(&[
        "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", &db.name,
    ])
    .unwrap();
    ct.ip(&["addr", "add", "10.250.0.1/24", "dev", "eth1"]).unwrap();
    ct.ip(&["link", "set", "eth1", "up"]).unwrap();
    db.ip(&["addr", "add", "10.250.0.2/24", "dev", "eth0"]).unwrap();
    db.ip(&["link", "set", "eth0", "up"]).unwrap();
    let _server = bed
        .start_daemon(
            &db,
            Enter::Net,
            "db",
            "/usr/bin/python3",
            &["-c", ADDRESS_ECHO_SERVER, "10.250.0.2", "8080"],
            &[8080],
        )
        .unwrap();

    bed.start_agent_with(&["--no-proxy", "db.test", "--ip-range-whitelist", "10.250.0.0/24"])
        .unwrap();
    let id = netns_id(&ct);
    let _main = resident(&bed, &ct);
    bed.agent().logged(&format!("netns={id}")).unwrap();

    let result = bed
        .curl_from(
            &ct,
            &bed.cgroup.path,
            &["--resolve", "db.test:8080:10.250.0.2", "http://db.test:8080/"],
        )
        .unwrap();
    // Made in the agent's namespace, the connection would have had no route at all.
    assert_eq!(result.stdout, "client 10.250.0.1", "{result:?}");
    let line = bed
        .agent()
        .wait_decision(&[&format!("netns={id}"), "route=direct"])
        .unwrap();
    assert!(line.contains("outcome=ok"), "{line}");
    assert!(line.contains("no_proxy"), "{line}");
}

/// Listens on 127.0.0.1:argv[1] and prints `listening`, then `accepted` per connection.
const SQUATTER: &str = r#"
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
print("listening", flush=True)
while True:
    c, peer = s.accept(); print("accepted", peer, flush=True); c.close()
"#;

#[test]
fn a_squatted_container_namespace_is_refused_not_passed() {
    // A process inside the container (root there, but without CAP_NET_ADMIN for the mark)
    // takes egress's port first.
    let mut bed = Testbed::standard();
    let ct = bed.add_container_netns(3).unwrap();
    let squatter = bed
        .start_daemon(
            &ct,
            Enter::Net,
            "squatter",
            "/usr/bin/python3",
            &["-c", SQUATTER, "1001"],
            &[1001],
        )
        .unwrap();

    bed.start_default_agent().unwrap();
    let id = netns_id(&ct);
    let _main = resident(&bed, &ct);
    let log = bed.agent().logged("cannot serve the network namespace").unwrap();
    assert!(log.contains(&format!("netns={id}")), "{log}");

    let before = bed.agent().counter("deny_no_listener").unwrap();
    let script = "import errno, socket\n\
try:\n    socket.create_connection(('10.248.0.30', 443), 5); print('connected')\n\
except OSError as e:\n    print(errno.errorcode.get(e.errno, str(e)))\n";
    let result = egress_testbed::process::output(launch(
        Some(&ct.name),
        Enter::Net,
        Some(&bed.cgroup.path),
        "/usr/bin/python3",
        &["-c", script],
    ))
    .unwrap();
    assert_eq!(result.stdout.trim(), "EPERM", "{result:?}");
    assert!(bed.agent().counter("deny_no_listener").unwrap() > before);
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);

    // Nothing reached the squatter.
    drop(squatter);
    let log = std::fs::read_to_string(bed.dir.join("squatter.log")).unwrap();
    assert!(log.contains("listening"), "{log}");
    assert!(!log.contains("accepted"), "the squatter got a connection: {log}");
}

/// Sets socket mark argv[1] (as egress's own sockets carry), then connects to argv[2]:argv[3]
/// and holds the connection a moment; prints `connected` or the errno's name.
const MARKED_CONNECT: &str = r#"
import errno, socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, 36, int(sys.argv[1], 0))  # SO_MARK: CAP_NET_RAW in the namespace suffices
s.settimeout(5)
try:
    s.connect((sys.argv[2], int(sys.argv[3]))); print('connected', flush=True); time.sleep(0.5)
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
"#;

#[test]
fn the_agent_mark_set_inside_a_container_does_not_bypass_egress() {
    // Root in its container (CAP_NET_RAW is a default container capability) may put any mark
    // on its sockets, also egress's. That must not make the kernel take it for egress.
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    let ct = bed.add_container_netns(4).unwrap();
    let id = netns_id(&ct);
    let _main = resident(&bed, &ct);
    bed.agent().logged(&format!("netns={id}")).unwrap();

    let before = bed.agent().counter("pass_agent").unwrap();
    let result = egress_testbed::process::output(launch(
        Some(&ct.name),
        Enter::Net,
        Some(&bed.cgroup.path),
        "/usr/bin/python3",
        &[
            "-c",
            MARKED_CONNECT,
            "0x65677273",
            egress_testbed::ORIGIN_IP,
            "443",
        ],
    ))
    .unwrap();
    assert_eq!(result.stdout.trim(), "connected", "{result:?}");
    // It reached egress, not the origin.
    bed.agent()
        .wait_decision(&[&format!("netns={id}"), "original_dst=10.248.0.30:443"])
        .unwrap();
    assert_eq!(bed.agent().counter("pass_agent").unwrap(), before);
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        0,
        "the marked connect went straight to the origin"
    );
}
