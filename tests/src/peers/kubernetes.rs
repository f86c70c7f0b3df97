//! A stand-in for the Kubernetes API server (no cluster can run on these machines): TLS with a
//! CA of its own, bearer-token authentication, and `GET /api/v1/pods` (and per namespace) with
//! equality label selectors, over a pod list the test rewrites as pods come, go and change
//! labels. And the cgroups kubelet makes for pods, with the systemd driver's names.

use std::path::PathBuf;

use anyhow::Result;
use serde_json::json;

use crate::{
    peers::{Certs, make_certs},
    process::{Daemon, Enter},
    topology::{HS_IP, Testbed, cgroup::Cgroup},
};

/// Where the stand-in listens: the homeserver host's LAN address (where the agent runs), not
/// loopback, which the kernel programs let through before looking at anything else (a cluster's
/// API server is a service address such as 10.96.0.1).
pub const API_PORT: u16 = 6443;
/// The token it accepts.
pub const TOKEN: &str = "kube-test-token-0123456789";

/// On argv[6]:argv[5], answers `GET /api/v1[/namespaces/NS]/pods?labelSelector=k=v,...` with the pods of argv[3]
/// (a JSON list of {uid, name, namespace, labels}, read at each request) that match; 401 without
/// `Authorization: Bearer argv[4]`. Each request is logged as `GET <selector> auth=ok|bad`.
const SERVER: &str = r#"
import http.server, json, ssl, sys, urllib.parse
cert, key, pods_file, token, port, address = sys.argv[1:7]
class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self, status, doc):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        selector = urllib.parse.parse_qs(url.query).get("labelSelector", [""])[0]
        ok = self.headers.get("Authorization") == "Bearer " + token
        print("GET", url.path, selector, "auth=ok" if ok else "auth=bad", flush=True)
        if not ok:
            return self.answer(401, {"kind": "Status", "message": "Unauthorized"})
        parts = url.path.split("/")
        namespace = parts[4] if len(parts) == 6 and parts[3] == "namespaces" else None
        if url.path not in ("/api/v1/pods", "/api/v1/namespaces/%s/pods" % namespace):
            return self.answer(404, {"kind": "Status", "message": "not found"})
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        with open(pods_file) as f:
            pods = json.load(f)
        items = [{"metadata": {"uid": p["uid"], "name": p["name"], "namespace": p["namespace"],
                               "labels": p["labels"]}}
                 for p in pods
                 if all(p["labels"].get(k) == v for k, v in wanted.items())
                 and namespace in (None, p["namespace"])]
        self.answer(200, {"kind": "PodList", "apiVersion": "v1", "items": items})
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer((sys.argv[6], int(port)), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// A pod as the stand-in lists it, and its cgroups on the node.
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub labels: Vec<(String, String)>,
    /// The pod's cgroup (kubepods-...-pod<uid>.slice).
    pub cgroup: PathBuf,
    /// Its container's cgroup below, where its processes run (cri-containerd-<id>.scope).
    pub container: PathBuf,
}

/// kubelet's QoS classes, each a place for a pod's cgroup.
#[derive(Clone, Copy, Debug)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// kubelet's cgroups (`kubepods.slice` and its QoS classes, in a test cgroup of their own) and
/// the API server's stand-in.
pub struct Cluster {
    pub kubepods: PathBuf,
    pub certs: Certs,
    pub token_file: PathBuf,
    pods_file: PathBuf,
    pub pods: Vec<Pod>,
    pub server: Daemon,
    _root: Cgroup,
}

impl Cluster {
    pub fn start(bed: &Testbed) -> Result<Self> {
        let root = Cgroup::create(&format!("egress-test/{}-kube", bed.name))?;
        let kubepods = root.path.join("kubepods.slice");
        for qos in ["kubepods-burstable.slice", "kubepods-besteffort.slice"] {
            std::fs::create_dir_all(kubepods.join(qos))?;
        }
        let dir = bed.dir.join("kube");
        std::fs::create_dir_all(&dir)?;
        let certs = make_certs(&dir, "kube-api", &[], &[HS_IP], 2)?;
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n"))?;
        let pods_file = dir.join("pods.json");
        std::fs::write(&pods_file, "[]")?;
        let (cert, key) = (
            certs.cert.to_string_lossy().into_owned(),
            certs.key.to_string_lossy().into_owned(),
        );
        let pods_arg = pods_file.to_string_lossy().into_owned();
        let port = API_PORT.to_string();
        let server = bed.start_daemon(
            &bed.hs,
            Enter::Net,
            "kube-api",
            "/usr/bin/python3",
            &["-c", SERVER, &cert, &key, &pods_arg, TOKEN, &port, HS_IP],
            &[API_PORT],
        )?;
        Ok(Self {
            kubepods,
            certs,
            token_file,
            pods_file,
            pods: Vec::new(),
            server,
            _root: root,
        })
    }

    /// The agent's flags for this cluster, selecting `selector`.
    pub fn agent_args(&self, selector: &str) -> Vec<String> {
        vec![
            "--pod-selector".into(),
            selector.into(),
            "--kubepods-cgroup".into(),
            self.kubepods.to_string_lossy().into_owned(),
            "--kube-api".into(),
            format!("https://{HS_IP}:{API_PORT}"),
            "--kube-token-file".into(),
            self.token_file.to_string_lossy().into_owned(),
            "--kube-ca-file".into(),
            self.certs.ca.to_string_lossy().into_owned(),
        ]
    }

    /// A pod `name` in namespace `matrix` with `labels`, listed by the API server first and
    /// then given its cgroups (as kubelet does: the pod exists before the node runs it).
    /// `index` makes its UID. Returns its index in [`Self::pods`].
    pub fn add_pod(&mut self, index: u8, name: &str, qos: Qos, labels: &[(&str, &str)]) -> Result<usize> {
        let uid = format!("{index:08x}-1111-4222-8333-{index:012x}");
        let underscored = uid.replace('-', "_");
        let cgroup = match qos {
            Qos::Guaranteed => self.kubepods.join(format!("kubepods-pod{underscored}.slice")),
            Qos::Burstable => self
                .kubepods
                .join("kubepods-burstable.slice")
                .join(format!("kubepods-burstable-pod{underscored}.slice")),
            Qos::BestEffort => self
                .kubepods
                .join("kubepods-besteffort.slice")
                .join(format!("kubepods-besteffort-pod{underscored}.slice")),
        };
        let container = cgroup.join(format!("cri-containerd-{:064x}.scope", index));
        self.pods.push(Pod {
            uid,
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cgroup,
            container: container.clone(),
        });
        self.write_pods()?;
        std::fs::create_dir_all(&container)?;
        Ok(self.pods.len() - 1)
    }

    /// Changes pod `index`'s labels, as `kubectl label` would.
    pub fn relabel(&mut self, index: usize, labels: &[(&str, &str)]) -> Result<()> {
        self.pods[index].labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.write_pods()
    }

    fn write_pods(&self) -> Result<()> {
        let pods: Vec<_> = self
            .pods
            .iter()
            .map(|p| {
                let labels: serde_json::Map<String, serde_json::Value> =
                    p.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
                json!({"uid": p.uid, "name": p.name, "namespace": "matrix", "labels": labels})
            })
            .collect();
        // Written whole, then renamed: the server never reads half a list.
        let temporary = self.pods_file.with_extension("new");
        std::fs::write(&temporary, serde_json::to_vec(&pods)?)?;
        std::fs::rename(&temporary, &self.pods_file)?;
        Ok(())
    }

    /// The requests the stand-in has had, one line each.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.server.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("GET "))
            .map(str::to_owned)
            .collect()
    }
}
