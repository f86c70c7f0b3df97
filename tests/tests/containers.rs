//! Processes in network namespaces of their own (containers), served by one agent on the host.
//!
//! These tests build what a container engine builds, with namespaces and cgroups only: a
//! network namespace per container behind the homeserver host (veth, routing, masquerade), and
//! its processes in the intercepted cgroup. `docker.rs` runs the same against a real engine.
//! Kubernetes pods are built the same way, as kubelet lays out their cgroups, with a stand-in
//! for the API server.
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
    resident_in(bed, ns, &bed.cgroup.path)
}

/// [`resident`] in cgroup `cgroup`.
fn resident_in(
    bed: &Testbed,
    ns: &egress_testbed::topology::netns::Netns,
    cgroup: &std::path::Path,
) -> Daemon {
    let command = launch(Some(&ns.name), Enter::Net, Some(cgroup), "sleep", &["120"]);
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
        .serving(id)
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
        .wait_decision(&[("netns", &id), ("route", &"proxy-connect")])
        .unwrap();
    assert_eq!(line.get("target"), format!("{ORIGIN_NAME}:443"), "{line}");
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
    bed.agent().serving(id).unwrap();

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
        .wait_decision(&[("netns", &id), ("route", &"direct")])
        .unwrap();
    assert_eq!(line.get("outcome"), "ok", "{line}");
    assert_eq!(line.get("rule_kind"), "no_proxy", "{line}");
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
    let line = bed.agent().logged("cannot serve the network namespace").unwrap();
    assert_eq!(line.number("netns"), id, "{line}");

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
    bed.agent().serving(id).unwrap();

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
        .wait_decision(&[("netns", &id), ("original_dst", &"10.248.0.30:443")])
        .unwrap();
    assert_eq!(bed.agent().counter("pass_agent").unwrap(), before);
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        0,
        "the marked connect went straight to the origin"
    );
}

/// A bare TCP connect to the origin from `cgroup` (in the homeserver namespace): `connected`, or
/// the errno's name.
fn connect_from(bed: &Testbed, cgroup: &std::path::Path) -> String {
    bed.tcp_connect_in(cgroup, egress_testbed::ORIGIN_IP, 443)
        .unwrap()
}

/// curl of the origin from `ns` and `cgroup`, printing the status.
fn curl(
    bed: &Testbed,
    ns: &egress_testbed::topology::netns::Netns,
    cgroup: &std::path::Path,
) -> egress_testbed::ClientResult {
    let url = format!("https://{ORIGIN_NAME}/");
    bed.curl_from(ns, cgroup, &["-o", "/dev/null", "-w", "%{http_code}", &url])
        .unwrap()
}

#[test]
fn pods_selected_by_label_reach_the_origin_only_through_squid_while_others_pass() {
    use egress_testbed::peers::kubernetes::{Cluster, Qos};

    let mut bed = Testbed::standard();
    let mut cluster = Cluster::start(&bed).unwrap();
    let synapse = [("app.kubernetes.io/name", "synapse")];
    let selector = "app.kubernetes.io/name=synapse";
    let a = cluster.add_pod(1, "synapse-0", Qos::Burstable, &synapse).unwrap();
    let b = cluster
        .add_pod(
            2,
            "postgres-0",
            Qos::BestEffort,
            &[("app.kubernetes.io/name", "postgres")],
        )
        .unwrap();
    let c = cluster
        .add_pod(3, "synapse-federation-sender-0", Qos::Guaranteed, &synapse)
        .unwrap();
    // egress itself runs in a pod of the same node, as the DaemonSet does (host network): it
    // must reach the API server to classify anything, its own pod included.
    // In a cgroup namespace of its own, as a container on cgroup v2 is by default, where
    // /proc/self/cgroup shows only `/`.
    let own = cluster
        .add_pod(
            9,
            "egress-x7k2p",
            Qos::Burstable,
            &[("app.kubernetes.io/name", "egress")],
        )
        .unwrap();
    bed.agent_cgroup = Some(cluster.pods[own].container.clone());
    let in_cgroupns = bed.dir.join("egress-in-cgroupns");
    std::fs::write(
        &in_cgroupns,
        format!(
            "#!/bin/sh\nexec unshare --cgroup {} \"$@\"\n",
            egress_testbed::egress_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&in_cgroupns, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let netns: Vec<_> = [1u8, 2, 3]
        .iter()
        .map(|i| bed.add_container_netns(*i).unwrap())
        .collect();
    let _residents: Vec<Daemon> = [a, b, c]
        .iter()
        .zip(&netns)
        .map(|(pod, ns)| resident_in(&bed, ns, &cluster.pods[*pod].container))
        .collect();

    let mut args = bed.default_agent_args();
    args.extend(cluster.agent_args(selector));
    args.extend(["--no-proxy".to_owned(), "direct.test".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    bed.start_agent_bin(&in_cgroupns, &args).unwrap();
    let root_cgroupns = std::fs::read_link("/proc/self/ns/cgroup").unwrap();
    let agent_cgroupns =
        std::fs::read_link(format!("/proc/{}/ns/cgroup", bed.agent().pid().unwrap())).unwrap();
    assert_ne!(
        agent_cgroupns, root_cgroupns,
        "the agent is not in a cgroup namespace of its own"
    );
    assert!(
        cluster
            .requests()
            .iter()
            .any(|r| r == &format!("GET /api/v1/pods {selector} auth=ok")),
        "{:?}",
        cluster.requests()
    );

    // Selected, in a QoS class (a nested scope) and directly under kubepods: proxied.
    for (pod, ns) in [(a, &netns[0]), (c, &netns[2])] {
        let id = netns_id(ns);
        bed.agent().serving(id).unwrap();
        let result = curl(&bed, ns, &cluster.pods[pod].container);
        assert_eq!(result.stdout, "200", "{result:?}");
        bed.agent()
            .wait_decision(&[("netns", &id), ("route", &"proxy-connect")])
            .unwrap();
    }
    bed.squid_logged(&format!("CONNECT {ORIGIN_NAME}:443")).unwrap();
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        0,
        "a selected pod went direct"
    );
    // Two selected pods; the one not selected and egress's own pass; QoS classes are neither.
    let status = bed.agent().status().unwrap();
    assert!(
        status
            .stdout
            .contains("containers and pods under them: 2 intercepted, 2 passed"),
        "{status:?}"
    );
    let intercepted: Vec<String> = bed
        .agent()
        .lines()
        .iter()
        .filter(|l| l.message() == "following: its connections are intercepted")
        .map(|l| l.get("holds"))
        .collect();
    for pod in ["pod matrix/synapse-0", "pod matrix/synapse-federation-sender-0"] {
        assert!(intercepted.iter().any(|h| h == pod), "{intercepted:?}");
    }

    // Not selected: left alone (direct, as without egress), and no listener in its namespace.
    let passed = bed.agent().counter("pass_unselected").unwrap();
    assert_eq!(curl(&bed, &netns[1], &cluster.pods[b].container).stdout, "200");
    assert!(bed.agent().counter("pass_unselected").unwrap() > passed);
    let passed_netns = netns_id(&netns[1]);
    assert!(
        !bed.agent()
            .lines()
            .iter()
            .any(|l| l.message() == "serving a network namespace" && l.number("netns") == passed_netns),
        "a listener was made in the namespace of a pod not selected"
    );
    let direct = bed.direct_packets_at_origin().unwrap();
    assert!(direct > 0, "the pod not selected did not go direct");

    // A selected pod started after egress: refused until classified, then proxied.
    let d = cluster
        .add_pod(4, "synapse-media-0", Qos::Burstable, &synapse)
        .unwrap();
    let ns_d = bed.add_container_netns(4).unwrap();
    let _resident_d = resident_in(&bed, &ns_d, &cluster.pods[d].container);
    let id_d = netns_id(&ns_d);
    bed.agent().serving(id_d).unwrap();
    assert_eq!(curl(&bed, &ns_d, &cluster.pods[d].container).stdout, "200");
    bed.agent()
        .wait_decision(&[("netns", &id_d), ("route", &"proxy-connect")])
        .unwrap();
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        direct,
        "the new pod went direct"
    );

    // A direct route (no_proxy) leaves from the pod's namespace: the helper's marked connect
    // there is known as egress's own, though egress runs in a cgroup namespace.
    let id_c = netns_id(&netns[2]);
    let result = bed
        .curl_from(
            &netns[2],
            &cluster.pods[c].container,
            &[
                "--resolve",
                &format!("direct.test:80:{}", egress_testbed::ORIGIN_IP),
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://direct.test/",
            ],
        )
        .unwrap();
    assert_eq!(result.stdout, "200", "{result:?}");
    let line = bed
        .agent()
        .wait_decision(&[("netns", &id_c), ("route", &"direct")])
        .unwrap();
    assert_eq!(line.get("outcome"), "ok", "{line}");

    // Its label removed (`kubectl label pod synapse-0 app.kubernetes.io/name-`): passed from
    // the next list on, and its namespace no longer served.
    cluster.relabel(a, &[]).unwrap();
    let stopped = netns_id(&netns[0]);
    bed.agent()
        .wait_line("the unlabelled pod's namespace to be let go", |l| {
            l.message().starts_with("stopped serving") && l.number("netns") == stopped
        })
        .unwrap();
    let passed = bed.agent().counter("pass_unselected").unwrap();
    assert_eq!(curl(&bed, &netns[0], &cluster.pods[a].container).stdout, "200");
    assert!(bed.agent().counter("pass_unselected").unwrap() > passed);

    // A cgroup under kubepods that is neither a pod nor a QoS class: refused, not passed.
    let stray = cluster.kubepods.join("stray.slice");
    std::fs::create_dir(&stray).unwrap();
    bed.agent().logged("neither a pod nor a QoS class").unwrap();
    let refused = bed.agent().counter("deny_unclassified").unwrap();
    assert_eq!(connect_from(&bed, &stray), "EPERM");
    assert!(bed.agent().counter("deny_unclassified").unwrap() > refused);
    std::fs::remove_dir(&stray).unwrap();

    // While the API server refuses egress's token, a new pod cannot be classified: refused,
    // never passed. Then it answers again, and the pod (not selected) is left alone.
    std::fs::write(&cluster.token_file, "not-the-token\n").unwrap();
    let e = cluster.add_pod(5, "other-0", Qos::BestEffort, &[]).unwrap();
    bed.agent().logged("does not accept the token").unwrap();
    let refused = bed.agent().counter("deny_unclassified").unwrap();
    assert_eq!(connect_from(&bed, &cluster.pods[e].container), "EPERM");
    assert!(bed.agent().counter("deny_unclassified").unwrap() > refused);
    let log = bed.agent().log();
    assert!(
        !log.contains(egress_testbed::peers::kubernetes::TOKEN),
        "the token was logged"
    );
    std::fs::write(&cluster.token_file, egress_testbed::peers::kubernetes::TOKEN).unwrap();
    egress_testbed::wait::until(
        "the new pod to be classified",
        egress_testbed::wait::SHORT,
        || Ok(connect_from(&bed, &cluster.pods[e].container)),
        |r| r == "connected",
    )
    .unwrap();

    // egress upgraded: the DaemonSet's new pod (a new cgroup, not classified) starts while the
    // programs stay attached from the last run. It must pass its own pod before it can ask the
    // API server anything, or reach squid.
    bed.stop_agent();
    let own = cluster
        .add_pod(
            10,
            "egress-b9m4q",
            Qos::Burstable,
            &[("app.kubernetes.io/name", "egress")],
        )
        .unwrap();
    bed.agent_cgroup = Some(cluster.pods[own].container.clone());
    bed.start_agent_bin(&in_cgroupns, &args).unwrap();
    bed.agent().serving(id_d).unwrap();
    let result = curl(&bed, &ns_d, &cluster.pods[d].container);
    assert_eq!(result.stdout, "200", "{result:?}");
    bed.agent()
        .wait_decision(&[("netns", &id_d), ("route", &"proxy-connect")])
        .unwrap();
    bed.agent()
        .logged("egress's own pod: its connections pass")
        .unwrap();
}
