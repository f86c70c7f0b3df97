//! Kubernetes pods chosen by a label selector (`pod_selector`), followed the way containers
//! are (see the module above).
//!
//! kubelet puts each pod in a cgroup named after the pod's UID, under `kubepods.slice` (systemd
//! cgroup driver) or `kubepods` (cgroupfs): Guaranteed pods directly, the others in the QoS-class
//! cgroups `kubepods-burstable.slice` and `kubepods-besteffort.slice` (`burstable`,
//! `besteffort`). egress attaches its programs to the kubepods cgroup as a scope, makes each QoS
//! cgroup a nested scope as it finds it, and classifies every pod cgroup by asking the API
//! server which pods the selector selects. A pod cgroup not classified yet is refused, as is
//! one the API server could not be asked about.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use serde::Deserialize;

const TIMEOUT: Duration = Duration::from_secs(5);
/// The pods of one selector: a few KiB each.
const MAX_ANSWER: usize = 32 << 20;
/// After a failed list, the next waits this long (a new pod stays refused meanwhile).
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(2);
/// The kubelet annotation that gives a static pod's mirror the UID of the static pod, which
/// names its cgroup.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// How egress finds and asks the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSelection {
    /// A label selector, as `kubectl get pods -l` takes it.
    pub selector: String,
    /// Only pods of this namespace (else of all namespaces).
    pub namespace: Option<String>,
    pub api: crate::config::values::KubeApi,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    /// The kubepods cgroup, if configured (else found under the cgroup2 root).
    pub kubepods_cgroup: Option<PathBuf>,
}

impl PodSelection {
    /// The pods `settings` select, if any (`config::load` checked the API server is known).
    pub fn of(settings: &crate::config::Settings) -> Option<Self> {
        Some(Self {
            selector: settings.pod_selector.as_ref()?.0.clone(),
            namespace: settings.pod_namespace.as_ref().map(|n| n.0.clone()),
            api: settings.kube_api.clone()?,
            token_file: settings.kube_token_file.clone(),
            ca_file: settings.kube_ca_file.clone(),
            kubepods_cgroup: settings.kubepods_cgroup.clone(),
        })
    }
}

/// The pod UID in a pod cgroup's directory name: `kubepods-pod<uid>.slice`,
/// `kubepods-burstable-pod<uid>.slice`, `kubepods-besteffort-pod<uid>.slice` (systemd driver,
/// `-` in the UID written `_`, and kubelet's `--cgroup-root` in front, e.g.
/// `kubelet-kubepods-pod<uid>.slice`), or `pod<uid>` (cgroupfs). A UID is a UUID, or 32 hex
/// digits for a static pod.
pub fn pod_uid_in(dir_name: &str) -> Option<String> {
    let base = dir_name.strip_suffix(".slice").unwrap_or(dir_name);
    if !base.is_ascii() {
        return None;
    }
    [36, 32].into_iter().find_map(|len| {
        let (head, tail) = base.split_at(base.len().checked_sub(len)?);
        let uid = tail.replace('_', "-");
        let before = head.strip_suffix("pod")?;
        (is_pod_uid(&uid) && (before.is_empty() || before.ends_with('-'))).then_some(uid)
    })
}

fn is_pod_uid(uid: &str) -> bool {
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    match uid.len() {
        36 => uid.bytes().enumerate().all(|(i, b)| {
            if [8, 13, 18, 23].contains(&i) {
                b == b'-'
            } else {
                hex(b)
            }
        }),
        32 => uid.bytes().all(hex),
        _ => false,
    }
}

/// Whether cgroup `name` is kubelet's root for pods: `kubepods.slice` (systemd driver; with
/// `--cgroup-root`, `<root>-kubepods.slice`) or `kubepods` (cgroupfs).
pub fn is_kubepods(name: &str) -> bool {
    name == "kubepods" || name == "kubepods.slice" || name.ends_with("-kubepods.slice")
}

/// Whether `dir_name`, a child of kubelet's root for pods `kubepods_name`, is one of its
/// QoS-class cgroups, whose children are pods.
pub fn is_qos_class(kubepods_name: &str, dir_name: &str) -> bool {
    if !is_kubepods(kubepods_name) {
        return false;
    }
    match kubepods_name.strip_suffix(".slice") {
        Some(stem) => dir_name
            .strip_prefix(stem)
            .is_some_and(|rest| matches!(rest, "-burstable.slice" | "-besteffort.slice")),
        None => matches!(dir_name, "burstable" | "besteffort"),
    }
}

/// Whether the cgroup at `path` is kubelet's root for pods or one of its QoS classes: all its
/// children are pods (or QoS classes), and nothing else is expected there.
pub fn is_kube_scope(path: &Path) -> bool {
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let own = name(path);
    is_kubepods(&own)
        || path
            .parent()
            .is_some_and(|parent| is_qos_class(&name(parent), &own))
}

/// The kubepods cgroup under the cgroup2 root `root`: the configured one, or the one kubelet
/// made (systemd driver first).
pub fn kubepods_cgroup(root: &Path, configured: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = configured {
        if !path.is_dir() {
            bail!("kubepods_cgroup {}: no such cgroup", path.display());
        }
        return Ok(path.to_owned());
    }
    ["kubepods.slice", "kubepods"]
        .iter()
        .map(|name| root.join(name))
        .find(|path| path.is_dir())
        .with_context(|| {
            format!(
                "pod_selector: no kubepods.slice or kubepods cgroup under {} (is kubelet running \
                 on this host? else set kubepods_cgroup)",
                root.display()
            )
        })
}

/// The pod cgroup under `kubepods` (directly, or in a QoS class) that holds process cgroup
/// `own`, if any.
pub fn own_pod_cgroup(kubepods: &Path, own: &Path) -> Option<PathBuf> {
    let relative = own.strip_prefix(kubepods).ok()?;
    let mut path = kubepods.to_owned();
    for part in relative.components() {
        let name = part.as_os_str().to_string_lossy().into_owned();
        let parent_name = path.file_name()?.to_string_lossy().into_owned();
        path.push(part);
        if pod_uid_in(&name).is_some() {
            return Some(path);
        }
        if !is_qos_class(&parent_name, &name) {
            return None;
        }
    }
    None
}

#[derive(Deserialize)]
struct PodList {
    items: Vec<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    metadata: Metadata,
}

#[derive(Deserialize)]
struct Metadata {
    uid: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// The API server's error body.
#[derive(Deserialize)]
struct Status {
    #[serde(default)]
    message: String,
}

/// The pods selected, by the UID their cgroups are named after, each with `namespace/name`.
pub fn selected_pods(body: &[u8]) -> Result<BTreeMap<String, String>> {
    let list: PodList = serde_json::from_slice(body).context("the API server's pod list")?;
    let mut selected = BTreeMap::new();
    for pod in list.items {
        let name = format!("{}/{}", pod.metadata.namespace, pod.metadata.name);
        // A static pod's UID is a 32-digit hash: a UUID here would let a selected pod name
        // another pod's cgroup.
        if let Some(mirrored) = pod.metadata.annotations.get(MIRROR_ANNOTATION)
            && mirrored.len() == 32
            && is_pod_uid(mirrored)
        {
            selected.insert(mirrored.clone(), name.clone());
        }
        selected.insert(pod.metadata.uid, name);
    }
    Ok(selected)
}

/// A client of the API server for the one request egress makes.
pub struct KubeApi {
    host: String,
    port: u16,
    tls: Arc<ClientConfig>,
    token_file: PathBuf,
    path: String,
    mark: u32,
}

/// Only the pods' metadata: the rest (specs, environments) is not egress's to read.
const ACCEPT: &str =
    "Accept: application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1, application/json\r\n";

impl KubeApi {
    /// `mark`: the agent mark, so that the kernel programs pass the request whatever the
    /// classification of egress's own pod.
    pub fn new(selection: &PodSelection, mark: u32) -> Result<Self> {
        let (host, port) = (selection.api.host.clone(), selection.api.port);
        let mut roots = RootCertStore::empty();
        crate::upstream::tls::add_pem_file(&mut roots, &selection.ca_file, "kube_ca_file")?;
        let tls = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let selector =
            percent_encoding::utf8_percent_encode(&selection.selector, percent_encoding::NON_ALPHANUMERIC);
        let path = match &selection.namespace {
            Some(namespace) => format!("/api/v1/namespaces/{namespace}/pods?labelSelector={selector}"),
            None => format!("/api/v1/pods?labelSelector={selector}"),
        };
        Ok(Self {
            host,
            port,
            tls: Arc::new(tls),
            token_file: selection.token_file.clone(),
            path,
            mark,
        })
    }

    /// The pods the selector selects now (see [`selected_pods`]).
    pub fn list(&self) -> Result<BTreeMap<String, String>> {
        let what = format!("the Kubernetes API server at {}:{}", self.host, self.port);
        // Read each time: kubelet rotates it.
        let token = std::fs::read_to_string(&self.token_file)
            .with_context(|| format!("kube_token_file {}", self.token_file.display()))?;
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            bail!(
                "kube_token_file {}: not a bearer token",
                self.token_file.display()
            );
        }
        let name = ServerName::try_from(self.host.clone())
            .with_context(|| format!("kube_api host {}", self.host))?;
        let address = (self.host.as_str(), self.port);
        let socket = std::net::ToSocketAddrs::to_socket_addrs(&address)
            .with_context(|| format!("{what}: resolving"))?
            .next()
            .with_context(|| format!("{what}: no address"))?;
        let tcp = socket2::Socket::new(socket2::Domain::for_address(socket), socket2::Type::STREAM, None)?;
        if self.mark != 0 {
            tcp.set_mark(self.mark)
                .context("marking the API server connection")?;
        }
        tcp.connect_timeout(&socket.into(), TIMEOUT)
            .with_context(|| what.clone())?;
        let tcp: std::net::TcpStream = tcp.into();
        // Also the TLS handshake, which the first write drives, is bounded.
        tcp.set_read_timeout(Some(TIMEOUT))?;
        tcp.set_write_timeout(Some(TIMEOUT))?;
        let connection = rustls::ClientConnection::new(self.tls.clone(), name).context("TLS")?;
        let mut stream = rustls::StreamOwned::new(connection, tcp);
        let answer = super::api::get(
            &mut stream,
            &what,
            &self.host,
            &self.path,
            &format!("{ACCEPT}Authorization: Bearer {token}\r\n"),
            TIMEOUT,
            MAX_ANSWER,
        )?;
        // The server's words, on one line and bounded: they go into egress's log.
        let message = || {
            serde_json::from_slice::<Status>(&answer.body)
                .map(|s| {
                    s.message
                        .chars()
                        .filter(|c| !c.is_control())
                        .take(300)
                        .collect::<String>()
                })
                .unwrap_or_default()
        };
        match answer.status {
            200 => selected_pods(&answer.body).with_context(|| what.clone()),
            401 => bail!(
                "{what} does not accept the token in {} (401)",
                self.token_file.display()
            ),
            403 => bail!(
                "{what}: the service account may not list pods (403; grant `list` on pods, see \
                 packaging/kubernetes): {}",
                message()
            ),
            400 => bail!("{what} refused pod_selector (400): {}", message()),
            code => bail!("{what}: listing pods answered {code}: {}", message()),
        }
    }
}

/// The selected pods as last listed, listed again when a pod cgroup is not among them (a new
/// pod) and when the list is older than the caller wants.
pub struct Pods {
    lister: Box<dyn FnMut() -> Result<BTreeMap<String, String>> + Send>,
    selection: PodSelection,
    selected: BTreeMap<String, String>,
    listed: Option<Instant>,
    failed: Option<(Instant, String)>,
    changed: bool,
}

/// What the API server says of one pod cgroup.
#[derive(Debug, PartialEq, Eq)]
pub enum PodVerdict {
    /// Selected: `namespace/name`.
    Selected(String),
    NotSelected,
}

impl Pods {
    pub fn new(selection: &PodSelection, mark: u32) -> Result<Self> {
        let api = KubeApi::new(selection, mark)?;
        Ok(Self::with_lister(selection, Box::new(move || api.list())))
    }

    fn with_lister(
        selection: &PodSelection,
        lister: Box<dyn FnMut() -> Result<BTreeMap<String, String>> + Send>,
    ) -> Self {
        Self {
            lister,
            selection: selection.clone(),
            selected: BTreeMap::new(),
            listed: None,
            failed: None,
            changed: false,
        }
    }

    pub fn selection(&self) -> &PodSelection {
        &self.selection
    }

    /// Lists again if the last list is older than `max_age` (or failed).
    pub fn refresh(&mut self, max_age: Duration) -> Result<()> {
        if self.listed.is_some_and(|t| t.elapsed() < max_age) {
            return Ok(());
        }
        self.list()
    }

    /// Whether the selection changed since this was last asked, by any list (also one a new
    /// pod made): the pods classified before must then be looked at again.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Pod `uid`: selected or not. For a cgroup seen for the first time at `new_since`, lists
    /// again unless a list was asked for since then (kubelet makes a pod's cgroup after the API
    /// server has the pod, so such a list has it); for one classified before, the last list
    /// (read again every resync) answers.
    pub fn verdict(&mut self, uid: &str, new_since: Option<Instant>) -> Result<PodVerdict> {
        if let Some(name) = self.selected.get(uid) {
            return Ok(PodVerdict::Selected(name.clone()));
        }
        let stale = match new_since {
            Some(since) => self.listed.is_none_or(|t| t < since),
            None => self.listed.is_none(),
        };
        if stale {
            self.list()?;
        }
        Ok(match self.selected.get(uid) {
            Some(name) => PodVerdict::Selected(name.clone()),
            None => PodVerdict::NotSelected,
        })
    }

    fn list(&mut self) -> Result<()> {
        if let Some((when, error)) = &self.failed
            && when.elapsed() < PAUSE_AFTER_FAILURE
        {
            bail!("{error}");
        }
        let asked = Instant::now();
        match (self.lister)() {
            Ok(selected) => {
                self.changed |= selected != self.selected;
                self.selected = selected;
                self.listed = Some(asked);
                self.failed = None;
                Ok(())
            }
            Err(e) => {
                let error = format!("{e:#}");
                self.failed = Some((Instant::now(), error.clone()));
                bail!("{error}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f3c6a2e-4b1d-4c8e-9a7f-1e2d3c4b5a69";

    #[test]
    fn pod_uids_in_cgroup_names() {
        let underscored = UID.replace('-', "_");
        let static_uid = "4a1bd3c28e9f0b7a6c5d4e3f2a1b0c9d";
        let undashed = UID.replace('-', "");
        let cases = [
            (format!("kubepods-pod{underscored}.slice"), Some(UID)),
            (format!("kubepods-burstable-pod{underscored}.slice"), Some(UID)),
            (format!("kubepods-besteffort-pod{underscored}.slice"), Some(UID)),
            (format!("pod{UID}"), Some(UID)),
            (format!("pod{static_uid}"), Some(static_uid)),
            (format!("pod{undashed}"), Some(undashed.as_str())),
            ("kubepods-burstable.slice".to_owned(), None),
            ("burstable".to_owned(), None),
            (format!("cri-containerd-{}.scope", "a".repeat(64)), None),
            (format!("pod{}", UID.to_uppercase()), None),
            (format!("pod{}", &UID[..35]), None),
            (format!("pod{UID}x"), None),
            (format!("kubepods-pod{}.slice", UID.replace('-', "/")), None),
            ("pod".to_owned(), None),
            (
                format!("kubelet-kubepods-burstable-pod{underscored}.slice"),
                Some(UID),
            ),
            (format!("xpod{UID}"), None),
            (format!("kubepods-burstable-pod{underscored}ä.slice"), None),
        ];
        for (name, want) in cases {
            assert_eq!(pod_uid_in(&name).as_deref(), want, "{name}");
        }
    }

    #[test]
    fn qos_classes_by_driver_and_cgroup_root() {
        let cases = [
            ("kubepods.slice", "kubepods-burstable.slice", true),
            ("kubepods.slice", "kubepods-besteffort.slice", true),
            ("kubepods", "burstable", true),
            ("kubepods", "besteffort", true),
            // kubelet --cgroup-root=/kubelet (kind): the root's name in front of every name.
            ("kubelet-kubepods.slice", "kubelet-kubepods-burstable.slice", true),
            ("kubelet-kubepods.slice", "kubepods-burstable.slice", false),
            // Guaranteed pods sit directly under kubepods: no QoS cgroup of their own.
            ("kubepods.slice", "kubepods-guaranteed.slice", false),
            ("kubepods.slice", "burstable", false),
            ("kubepods", "kubepods-burstable.slice", false),
            ("system.slice", "burstable", false),
            ("docker", "burstable", false),
        ];
        for (scope, child, want) in cases {
            assert_eq!(is_qos_class(scope, child), want, "{scope} {child}");
        }
        let kube = [
            "/c/kubepods.slice",
            "/c/kubepods.slice/kubepods-besteffort.slice",
            "/c/kubepods/burstable",
            "/c/kubelet.slice/kubelet-kubepods.slice",
        ];
        for path in kube {
            assert!(is_kube_scope(Path::new(path)), "{path}");
        }
        let other = [
            "/c/system.slice",
            "/c/docker",
            "/c/burstable",
            "/c/system.slice/kubepods-burstable.slice",
        ];
        for path in other {
            assert!(!is_kube_scope(Path::new(path)), "{path}");
        }
    }

    #[test]
    fn the_agents_own_pod_under_the_scope() {
        let scope = Path::new("/sys/fs/cgroup/kubepods.slice");
        let pod = format!("kubepods-burstable-pod{}.slice", UID.replace('-', "_"));
        let own = scope
            .join("kubepods-burstable.slice")
            .join(&pod)
            .join("cri-containerd-ab.scope");
        assert_eq!(
            own_pod_cgroup(scope, &own),
            Some(scope.join("kubepods-burstable.slice").join(&pod))
        );
        let guaranteed = scope.join(format!("kubepods-pod{}.slice", UID.replace('-', "_")));
        assert_eq!(own_pod_cgroup(scope, &guaranteed.join("x")), Some(guaranteed));
        assert_eq!(
            own_pod_cgroup(scope, Path::new("/sys/fs/cgroup/system.slice/egress.service")),
            None
        );
        assert_eq!(
            own_pod_cgroup(scope, &scope.join("kubepods-burstable.slice")),
            None
        );
        // Never a whole QoS class or an unknown child.
        let unknown = scope.join("kubepods-burstable.slice/other/x");
        assert_eq!(own_pod_cgroup(scope, &unknown), None);
        assert_eq!(own_pod_cgroup(scope, &scope.join("other.slice/x")), None);
    }

    #[test]
    fn selected_pods_by_uid_and_mirror() {
        let body = format!(
            r#"{{"kind":"PodList","items":[
                {{"metadata":{{"uid":"{UID}","name":"synapse-0","namespace":"matrix","labels":{{"app":"synapse"}}}}}},
                {{"metadata":{{"uid":"11111111-2222-3333-4444-555555555555","name":"static","namespace":"kube-system",
                  "annotations":{{"kubernetes.io/config.mirror":"4a1bd3c28e9f0b7a6c5d4e3f2a1b0c9d"}}}}}},
                {{"metadata":{{"uid":"22222222-2222-3333-4444-555555555555","name":"sly","namespace":"matrix",
                  "annotations":{{"kubernetes.io/config.mirror":"99999999-2222-3333-4444-555555555555"}}}}}}]}}"#
        );
        let selected = selected_pods(body.as_bytes()).unwrap();
        assert_eq!(selected.get(UID).map(String::as_str), Some("matrix/synapse-0"));
        assert_eq!(
            selected
                .get("4a1bd3c28e9f0b7a6c5d4e3f2a1b0c9d")
                .map(String::as_str),
            Some("kube-system/static")
        );
        // A mirror annotation naming a UUID (another pod's cgroup) is not believed.
        assert!(!selected.contains_key("99999999-2222-3333-4444-555555555555"));
        assert_eq!(selected.len(), 4);
        assert!(selected_pods(b"{\"kind\":\"Status\"}").is_err());
    }

    /// Pods listing through `answers` (one per list; an error where None), and how many lists
    /// were made.
    fn pods_answering(
        answers: Vec<Option<Vec<&'static str>>>,
    ) -> (Pods, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let lists = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = lists.clone();
        let selection = PodSelection {
            selector: "app=synapse".into(),
            namespace: None,
            api: "https://10.96.0.1".parse().unwrap(),
            token_file: "/var/run/secrets/kubernetes.io/serviceaccount/token".into(),
            ca_file: "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt".into(),
            kubepods_cgroup: None,
        };
        let lister = move || {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match answers.get(n).cloned().flatten() {
                Some(uids) => Ok(uids
                    .into_iter()
                    .map(|u| (u.to_owned(), format!("ns/{u}")))
                    .collect()),
                None => bail!("API server down"),
            }
        };
        (Pods::with_lister(&selection, Box::new(lister)), lists)
    }

    #[test]
    fn a_pod_not_in_the_last_list_is_listed_again_once_per_round() {
        let load = |l: &std::sync::atomic::AtomicUsize| l.load(std::sync::atomic::Ordering::SeqCst);
        let (mut pods, lists) = pods_answering(vec![Some(vec!["a"]), Some(vec!["a", "b"])]);
        let round = Instant::now();
        assert_eq!(
            pods.verdict("a", Some(round)).unwrap(),
            PodVerdict::Selected("ns/a".into())
        );
        assert_eq!(load(&lists), 1);
        // Listed this round already: an unknown pod is not selected, without asking again.
        assert_eq!(pods.verdict("b", Some(round)).unwrap(), PodVerdict::NotSelected);
        assert_eq!(load(&lists), 1);
        // Next round: a pod not in the list is asked about again, and the new list has it.
        let next = Instant::now();
        assert_eq!(
            pods.verdict("b", Some(next)).unwrap(),
            PodVerdict::Selected("ns/b".into())
        );
        assert_eq!(load(&lists), 2);
        // A selected one needs no list.
        assert_eq!(
            pods.verdict("a", Some(Instant::now())).unwrap(),
            PodVerdict::Selected("ns/a".into())
        );
        assert_eq!(load(&lists), 2);
        // A pod classified before (looked at again) is answered from the last list.
        assert_eq!(pods.verdict("c", None).unwrap(), PodVerdict::NotSelected);
        assert_eq!(load(&lists), 2);
    }

    #[test]
    fn a_failed_list_is_an_error_and_pauses_the_next() {
        let (mut pods, lists) = pods_answering(vec![None, Some(vec!["a"])]);
        let error = pods.verdict("a", Some(Instant::now())).unwrap_err().to_string();
        assert!(error.contains("API server down"), "{error}");
        // Within the pause: the same error, no new list.
        let error = pods.verdict("a", Some(Instant::now())).unwrap_err().to_string();
        assert!(error.contains("API server down"), "{error}");
        assert_eq!(lists.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn every_list_that_changes_the_selection_is_reported_once() {
        let answers = vec![
            Some(vec!["a"]),
            Some(vec!["a"]),
            Some(vec!["a", "b"]),
            Some(vec!["b"]),
        ];
        let (mut pods, lists) = pods_answering(answers);
        pods.refresh(Duration::ZERO).unwrap();
        assert!(pods.take_changed());
        assert!(!pods.take_changed(), "reported once");
        pods.refresh(Duration::ZERO).unwrap();
        assert!(!pods.take_changed(), "the same list");
        // Young enough: not listed.
        pods.refresh(Duration::from_secs(60)).unwrap();
        assert_eq!(lists.load(std::sync::atomic::Ordering::SeqCst), 2);
        // A list a new pod made (b was labelled meanwhile) counts too; the next resync, which
        // finds the same, must not hide it.
        assert_eq!(
            pods.verdict("c", Some(Instant::now())).unwrap(),
            PodVerdict::NotSelected
        );
        pods.refresh(Duration::ZERO).unwrap();
        assert!(pods.take_changed());
        assert_eq!(pods.verdict("a", None).unwrap(), PodVerdict::NotSelected);
    }
}
