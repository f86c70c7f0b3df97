//! Homeservers in containers of a real engine (Debian's dockerd, started by the test inside the
//! homeserver namespace), served by one egress on the host with no proxy settings in the
//! containers.
//!
//! Root only.

use egress_testbed::{ORIGIN_IP, ORIGIN_NAME, Testbed, peers::docker::Docker};

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
        .logged(&format!("netns={id}"))
        .unwrap_or_else(|e| panic!("the agent does not serve container {name}: {e:#}"));
    id
}

#[test]
fn containers_on_a_user_defined_network_reach_the_origin_only_through_squid() {
    let mut bed = Testbed::standard();
    let docker = Docker::start(&bed).unwrap();
    docker
        .run(&[
            "network",
            "create",
            "--subnet",
            "10.251.0.0/24",
            "matrix-homeserver",
        ])
        .unwrap();
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
        .wait_decision(&[&format!("netns={first}"), "route=proxy-connect"])
        .unwrap();
    bed.squid_logged(&format!("CONNECT {ORIGIN_NAME}:443")).unwrap();

    // Restarted: a new network namespace, served too.
    docker.run(&["restart", "-t", "1", "synapse"]).unwrap();
    let second = wait_served(&bed, &docker, "synapse");
    assert_ne!(first, second, "docker restart makes a new network namespace");
    assert_eq!(curl_origin(&docker, "synapse"), "200");
    bed.agent()
        .wait_decision(&[&format!("netns={second}"), "route=proxy-connect"])
        .unwrap();

    // A second container started after egress.
    docker.run_container("bridge", &options).unwrap();
    let third = wait_served(&bed, &docker, "bridge");
    assert_eq!(curl_origin(&docker, "bridge"), "200");
    bed.agent()
        .wait_decision(&[&format!("netns={third}"), "route=proxy-connect"])
        .unwrap();

    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        0,
        "a container's packet reached the origin directly (masqueraded as the host)"
    );
}

/// A database container's server: answers every GET with the client's address.
const DB_SERVER: &str = r#"
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("client " + self.client_address[0]).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"#;

#[test]
fn a_container_reaches_a_database_container_directly_from_its_own_address() {
    let mut bed = Testbed::standard();
    let docker = Docker::start(&bed).unwrap();
    docker
        .run(&[
            "network",
            "create",
            "--subnet",
            "10.252.0.0/24",
            "matrix-homeserver",
        ])
        .unwrap();
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
            DB_SERVER,
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
        .wait_decision(&[&format!("netns={id}"), "route=direct"])
        .unwrap();
    assert!(line.contains("no_proxy"), "{line}");
}
