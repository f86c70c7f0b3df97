//! Following containers by name: `--container NAME|ID` (Docker, or Podman's Docker-compatible
//! API), and Kubernetes pods by label (`pod_selector`, see [`kubernetes`]).
//!
//! A restarted or recreated container gets a new cgroup, so attaching to the container's own
//! cgroup would leave it uncovered until egress noticed. Instead egress attaches its programs to
//! the engine's parent cgroup (`/docker`, `system.slice`, or the engine's `--cgroup-parent`) as a
//! *scope*: there the kernel intercepts only the child cgroups classified as followed, passes the
//! ones classified as other containers, and refuses connects from a child not classified yet.
//! [`classify_children`] classifies each child by the container id in its directory name, asking
//! the engine for the container's name. A followed container restarted or recreated under the
//! same name is therefore refused for a moment and then intercepted; it is never passed.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    cgroups::{self, cgroup_level, cgroup_of_pid, cgroup2_root},
    engine::{self, Engine},
    kubernetes::{self, PodVerdict, Pods},
    scopes::{Classification, ScopeMaps},
};

/// The selected pods are listed again this often, so that a pod labelled (or unlabelled) while
/// it runs is intercepted (or passed) from then on.
const PODS_RESYNC: Duration = Duration::from_secs(10);
/// Looking at every child again (engine or API server answers for each) is retried no more
/// often than this while it fails.
const AGAIN_PAUSE: Duration = Duration::from_secs(2);

/// The container id in a cgroup directory's name, as engines name them: `<id>` (cgroupfs
/// driver), `docker-<id>.scope`, `libpod-<id>.scope`, `cri-containerd-<id>.scope`,
/// `crio-<id>.scope` (systemd driver).
pub fn container_id_in(dir_name: &str) -> Option<&str> {
    let base = dir_name.strip_suffix(".scope").unwrap_or(dir_name);
    let id = ["docker-", "libpod-", "cri-containerd-", "crio-"]
        .iter()
        .find_map(|prefix| base.strip_prefix(prefix))
        .unwrap_or(base);
    (id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then_some(id)
}

/// A reference the engine resolved must also be recognised later, when its recreated cgroups
/// are classified: by name, or by an id prefix long enough to count as one.
fn check_reference(reference: &str, container: &engine::Container) -> Result<()> {
    if !is_followed(&[reference.to_owned()], &container.id, &container.name) {
        bail!(
            "container {reference} is {} ({}): name it by its name, or by 12 or more digits of its id",
            container.name,
            &container.id[..12.min(container.id.len())]
        );
    }
    Ok(())
}

/// Whether container `id` named `name` is one of `followed` (names, or id prefixes of 12 hex
/// digits or more).
pub fn is_followed(followed: &[String], id: &str, name: &str) -> bool {
    followed
        .iter()
        .any(|f| f == name || (f.len() >= 12 && id.starts_with(f.as_str())))
}

/// The engine cgroup to attach selectively for container `reference`: the parent of its
/// cgroup while it runs, else where the engine puts containers by default.
pub fn scope_for(engine: &Engine, reference: &str) -> Result<PathBuf> {
    let container = engine.inspect(reference)?.with_context(|| {
        format!(
            "container {reference}: the engine at {} has none by that name",
            engine.socket().display()
        )
    })?;
    check_reference(reference, &container)?;
    let parent = match container.pid {
        // The container's own cgroup is the one named after its id (its main process may sit
        // deeper, e.g. systemd's init.scope in a container); the scope is its parent.
        Some(pid) => {
            let process_cgroup = cgroup_of_pid(pid)?;
            let own = process_cgroup
                .ancestors()
                .find(|dir| {
                    dir.file_name()
                        .and_then(|n| container_id_in(&n.to_string_lossy()).map(|id| id == container.id))
                        .unwrap_or(false)
                })
                .with_context(|| {
                    format!(
                        "container {reference}: no cgroup named after its id above {} (set \
                         container_cgroup_parent)",
                        process_cgroup.display()
                    )
                })?;
            own.parent().context("a container in the root cgroup")?.to_owned()
        }
        None => cgroup2_root()?.join(engine.default_parent()?),
    };
    if !parent.is_dir() {
        bail!(
            "container {reference} is not running and the engine's cgroup {} does not exist yet: \
             start the container, then egress",
            parent.display()
        );
    }
    Ok(parent)
}

/// What the classification of one child cgroup changed.
#[derive(Debug)]
pub struct Classified {
    pub cgroup: PathBuf,
    /// What it holds: `container NAME`, `pod NAMESPACE/NAME`, `pod UID` (not selected), a QoS
    /// class.
    pub holds: Option<String>,
    pub how: Classification,
}

/// Who says what a child cgroup holds.
pub struct Lookups<'a> {
    /// The engine: a container's name by its id (None: no such container, which passes: not a
    /// container of this engine).
    pub container_name: &'a mut dyn FnMut(&str) -> Result<Option<String>>,
    /// The API server, when pods are selected.
    pub pods: Option<&'a mut Pods>,
    /// egress's own pod, which always passes (see [`follow_pods`]).
    pub own_pod: Option<u64>,
}

/// Classifies every child cgroup of `scope` (at cgroup `level`) not classified yet (every one,
/// with `again`). A lookup that fails leaves the child as it was (unclassified: refused), to be
/// tried again next time. Under kubelet's cgroups, a QoS class becomes a scope itself (its pods
/// classified as its children), and a child that is neither that nor a pod stays refused.
pub fn classify_children(
    maps: &mut ScopeMaps,
    scope: &Path,
    level: u32,
    followed: &[String],
    lookups: &mut Lookups<'_>,
    again: bool,
) -> Result<Vec<Classified>> {
    let scope_name = scope
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let kube = kubernetes::is_kube_scope(scope);
    // Before the directory is read: a pod whose cgroup is there was known to the API server
    // by then.
    let seen = Instant::now();
    let mut present = BTreeMap::new();
    for entry in std::fs::read_dir(scope).with_context(|| format!("reading {}", scope.display()))? {
        let entry = entry?;
        if entry.file_type().is_ok_and(|t| t.is_dir())
            && let Ok(meta) = entry.metadata()
        {
            present.insert(meta.ino(), entry.file_name().to_string_lossy().into_owned());
        }
    }
    let mut changes = Vec::new();
    let mut failure = None;
    for (id, dir_name) in &present {
        let before = maps.classification(*id);
        let found = if kube && kubernetes::is_qos_class(&scope_name, dir_name) {
            // Every round: a nested scope's entry must come back if it was lost. Refused itself
            // should it ever decide (its entry lost after all).
            maps.add_scope(*id, level + 1)
                .map(|()| (Some(format!("QoS class {dir_name}")), Classification::Nested))
        } else if before.is_some() && !again {
            continue;
        } else if lookups.own_pod == Some(*id) {
            Ok((Some("egress's own pod".to_owned()), Classification::Pass))
        } else if kube {
            match (kubernetes::pod_uid_in(dir_name), lookups.pods.as_deref_mut()) {
                (Some(uid), Some(pods)) => pods
                    .verdict(&uid, before.is_none().then_some(seen))
                    .map(|verdict| match verdict {
                        PodVerdict::Selected(name) => {
                            (Some(format!("pod {name}")), Classification::Intercept)
                        }
                        PodVerdict::NotSelected => (Some(format!("pod {uid}")), Classification::Pass),
                    })
                    .context("asking the Kubernetes API server which pods pod_selector selects"),
                // These are refused now, also if they passed before (under an earlier
                // configuration or version).
                (Some(_), None) => {
                    maps.unclassify(*id);
                    Err(anyhow::anyhow!(
                        "{}: a pod, but no pod_selector is configured: the pods under {} stay \
                         refused (configure pod_selector, or `egress detach --cgroup` the kubepods \
                         cgroup)",
                        dir_name,
                        scope.display()
                    ))
                }
                (None, _) => {
                    maps.unclassify(*id);
                    Err(anyhow::anyhow!(
                        "{}: neither a pod nor a QoS class of kubelet's: refused",
                        scope.join(dir_name).display()
                    ))
                }
            }
        } else if let Some(container_id) = container_id_in(dir_name) {
            (lookups.container_name)(container_id)
                .map(|name| match name {
                    Some(name) => {
                        let how = if is_followed(followed, container_id, &name) {
                            Classification::Intercept
                        } else {
                            Classification::Pass
                        };
                        (Some(format!("container {name}")), how)
                    }
                    None => (None, Classification::Pass),
                })
                .context("asking the container engine which container a new cgroup holds")
        } else {
            Ok((None, Classification::Pass))
        };
        let (holds, how) = match found {
            Ok(found) => found,
            Err(e) => {
                failure = Some(e);
                continue;
            }
        };
        if before == Some(how) {
            continue;
        }
        if let Err(e) = maps.classify(*id, how) {
            failure = Some(e);
            continue;
        }
        changes.push(Classified {
            cgroup: scope.join(dir_name),
            holds,
            how,
        });
    }
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(changes)
}

/// Forgets classified children that exist under none of `scopes` any more.
pub fn forget_gone_children(maps: &mut ScopeMaps, scopes: &[PathBuf]) {
    let mut present = std::collections::BTreeSet::new();
    for scope in scopes {
        if let Ok(entries) = std::fs::read_dir(scope) {
            present.extend(
                entries
                    .flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.ino()),
            );
        }
    }
    for child in maps.classified() {
        if !present.contains(&child) {
            maps.unclassify(child);
        }
    }
}

/// Starts following container `reference`: its engine cgroup `scope` (from [`scope_for`])
/// becomes a scope, and its children are classified now, before the programs are attached
/// there (see [`classify_children`]).
pub fn follow(maps: &mut ScopeMaps, engine: &Engine, reference: &str, scope: &Path) -> Result<()> {
    if let Ok(Some(container)) = engine.inspect(reference) {
        check_reference(reference, &container)?;
    }
    let id = crate::kernel::cgroup_id(scope)?;
    let level = cgroup_level(scope)?;
    if level == 0 {
        bail!(
            "{}: the root cgroup cannot be a container engine's parent",
            scope.display()
        );
    }
    maps.add_scope(id, level)?;
    maps.follow(reference)?;
    let followed = maps.followed();
    let mut name_of = |id: &str| Ok(engine.inspect(id)?.map(|c| c.name));
    let mut lookups = Lookups {
        container_name: &mut name_of,
        pods: None,
        own_pod: None,
    };
    // Also the children classified already: the container may be one passed so far.
    for change in classify_children(maps, scope, level, &followed, &mut lookups, true)? {
        log_classified(&change);
    }
    Ok(())
}

/// Starts following the pods `pods` selects: the kubepods cgroup becomes a scope, egress's own
/// pod (when egress runs in one: the DaemonSet) passes, so that it can reach the API server
/// while the programs are attached from an earlier run, and the pods are classified now, before
/// the programs are attached there. Returns the kubepods cgroup, egress's own pod cgroup (id),
/// and what the API server could not be asked (the pods it concerns stay refused until it
/// answers).
pub fn follow_pods(
    maps: &mut ScopeMaps,
    pods: &mut Pods,
) -> Result<(PathBuf, Option<u64>, Option<anyhow::Error>)> {
    let kubepods =
        kubernetes::kubepods_cgroup(&cgroup2_root()?, pods.selection().kubepods_cgroup.as_deref())?;
    let level = cgroup_level(&kubepods)?;
    if level == 0 {
        bail!(
            "kubepods_cgroup {}: the root cgroup is not kubelet's",
            kubepods.display()
        );
    }
    if !kubernetes::is_kube_scope(&kubepods) {
        bail!(
            "kubepods_cgroup {}: not named as kubelet names its cgroup for pods (kubepods.slice, \
             <root>-kubepods.slice or kubepods)",
            kubepods.display()
        );
    }
    maps.add_scope(crate::kernel::cgroup_id(&kubepods)?, level)?;
    let mut own_pod = None;
    if let Some(own) = cgroups::own_cgroup().and_then(|own| kubernetes::own_pod_cgroup(&kubepods, &own)) {
        let id = crate::kernel::cgroup_id(&own)?;
        maps.classify(id, Classification::Pass)?;
        tracing::info!(cgroup = %own.display(), "egress's own pod: its connections pass");
        own_pod = Some(id);
    }
    let mut no_engine = |_: &str| Ok(None);
    let mut lookups = Lookups {
        container_name: &mut no_engine,
        pods: Some(pods),
        own_pod,
    };
    let mut failure = None;
    // The QoS cgroups become scopes as the first pass finds them; the second classifies their pods.
    let mut scopes = vec![(kubepods.clone(), level)];
    while let Some((scope, level)) = scopes.pop() {
        match classify_children(maps, &scope, level, &[], &mut lookups, true) {
            Ok(changes) => changes.iter().for_each(log_classified),
            Err(e) => failure = Some(e),
        }
        if scope == kubepods {
            let scope_name = scope
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            for entry in std::fs::read_dir(&scope)?.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if kubernetes::is_qos_class(&scope_name, &name) {
                    scopes.push((entry.path(), level + 1));
                }
            }
        }
    }
    Ok((kubepods, own_pod, failure))
}

pub fn log_classified(change: &Classified) {
    let holds = change.holds.as_deref().unwrap_or("-");
    match change.how {
        Classification::Intercept => {
            tracing::info!(
                holds,
                cgroup = %change.cgroup.display(),
                "following: its connections are intercepted"
            );
            if let Some(pid) = cgroups::raw_capable_process(&change.cgroup) {
                tracing::warn!(
                    holds,
                    pid,
                    "a followed process keeps CAP_NET_RAW: it can send packets no cgroup program \
                     sees (packet sockets); run the container with --cap-drop NET_RAW"
                );
            }
        }
        Classification::Pass => tracing::debug!(
            holds,
            cgroup = %change.cgroup.display(),
            "not followed: its connections pass"
        ),
        Classification::Nested => tracing::debug!(
            holds,
            cgroup = %change.cgroup.display(),
            "a nested scope: its children are classified in turn"
        ),
    }
}

/// The agent's side of following: each round classifies new children of every scope and
/// forgets gone ones.
#[derive(Default)]
pub struct Follower {
    paths: BTreeMap<u64, PathBuf>,
    /// The followed references last round: when `egress attach --container` adds one, every
    /// child is looked at again (one classified as passing may be the new one).
    followed: Vec<String>,
    /// The selected pods (made at start, while egress could still read its credentials).
    pods: Option<Pods>,
    own_pod: Option<u64>,
    /// Every child is to be looked at again (the selected pods changed).
    reclassify: bool,
    last_again: Option<Instant>,
}

impl Follower {
    pub fn new(pods: Option<Pods>, own_pod: Option<u64>) -> Self {
        Self {
            pods,
            own_pod,
            reclassify: true,
            ..Self::default()
        }
    }

    /// One round. `linked(id)`: whether scope `id` is attached itself (a nested scope, a QoS
    /// class, is not). Returns the children classified as passing, whose processes egress
    /// leaves alone (no listener in their namespaces), and what went wrong, if anything
    /// (children that could not be classified stay refused).
    pub fn round(
        &mut self,
        maps: &std::sync::Mutex<ScopeMaps>,
        name_of: &mut dyn FnMut(&str) -> Result<Option<String>>,
        linked: &dyn Fn(u64) -> bool,
    ) -> (Vec<u64>, Option<anyhow::Error>) {
        let mut error = None;
        // The selected pods are listed again every PODS_RESYNC, for pods whose labels changed.
        if let Some(pods) = &mut self.pods {
            if let Err(e) = pods.refresh(PODS_RESYNC) {
                error = Some(e.context("asking the Kubernetes API server which pods pod_selector selects"));
            }
            self.reclassify |= pods.take_changed();
        }
        let mut maps = maps.lock().unwrap_or_else(|e| e.into_inner());
        let scopes = maps.scopes();
        if scopes.is_empty() {
            return (Vec::new(), error);
        }
        self.paths
            .retain(|id, _| scopes.iter().any(|s| s.cgroup_id == *id));
        for scope in &scopes {
            if !self.paths.contains_key(&scope.cgroup_id)
                && let Some(path) = cgroups::cgroup_path_by_id(scope.cgroup_id)
            {
                self.paths.insert(scope.cgroup_id, path);
            }
        }
        // A nested scope whose cgroup is gone (kubelet removed a QoS class) goes with it.
        for scope in &scopes {
            let gone = self
                .paths
                .get(&scope.cgroup_id)
                .is_some_and(|path| match std::fs::metadata(path) {
                    Ok(meta) => meta.ino() != scope.cgroup_id,
                    Err(e) => e.kind() == std::io::ErrorKind::NotFound,
                });
            if gone && !linked(scope.cgroup_id) {
                maps.unclassify(scope.cgroup_id);
                let _ = maps.remove_scope(scope.cgroup_id);
                self.paths.remove(&scope.cgroup_id);
            }
        }
        let scopes = maps.scopes();
        let mut followed = maps.followed();
        followed.sort();
        // While an error persists, every child is looked at again only every AGAIN_PAUSE: new
        // ones are classified every round regardless.
        let again = (self.reclassify || followed != self.followed)
            && self.last_again.is_none_or(|t| t.elapsed() >= AGAIN_PAUSE);
        if again {
            self.last_again = Some(Instant::now());
        }
        let paths: Vec<(PathBuf, u32)> = scopes
            .iter()
            .filter_map(|s| Some((self.paths.get(&s.cgroup_id)?.clone(), s.level)))
            .collect();
        let mut lookups = Lookups {
            container_name: name_of,
            pods: self.pods.as_mut(),
            own_pod: self.own_pod,
        };
        for (scope, level) in &paths {
            match classify_children(&mut maps, scope, *level, &followed, &mut lookups, again) {
                Ok(changes) => changes.iter().for_each(log_classified),
                Err(e) => error = Some(e),
            }
        }
        if again && error.is_none() {
            self.followed = followed;
            self.reclassify = false;
        }
        // A list made for a new pod during the round may have changed the selection.
        if let Some(pods) = &mut self.pods {
            self.reclassify |= pods.take_changed();
        }
        // Only with every scope found: the children of one not found are not gone.
        if paths.len() == scopes.len() {
            let paths: Vec<PathBuf> = paths.into_iter().map(|(path, _)| path).collect();
            forget_gone_children(&mut maps, &paths);
        }
        let passing = maps
            .classified()
            .into_iter()
            .filter(|child| maps.classification(*child) == Some(Classification::Pass))
            .collect();
        (passing, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "01a96a4cdbd3e0e50d6f977c765f6a0e7728063e954a31cdb762d9f26df2c450";

    #[test]
    fn container_ids_in_cgroup_names() {
        let cases = [
            (ID.to_owned(), Some(ID)),
            (format!("docker-{ID}.scope"), Some(ID)),
            (format!("libpod-{ID}.scope"), Some(ID)),
            (format!("cri-containerd-{ID}.scope"), Some(ID)),
            (format!("crio-{ID}.scope"), Some(ID)),
            ("ssh.service".to_owned(), None),
            ("docker.service".to_owned(), None),
            (ID[..63].to_owned(), None),
            (ID.to_uppercase(), None),
            (format!("docker-{ID}x.scope"), None),
            (format!("{}g", &ID[..63]), None),
        ];
        for (name, want) in cases {
            assert_eq!(container_id_in(&name), want, "{name}");
        }
    }

    #[test]
    fn followed_by_name_or_id_prefix() {
        let followed = vec!["matrix-synapse".to_owned(), ID[..12].to_owned()];
        let cases = [
            ("ffff", "matrix-synapse", true),
            ("ffff", "matrix-synapse-2", false),
            (ID, "other", true),
            ("0123", "matrix", false),
        ];
        for (id, name, want) in cases {
            assert_eq!(is_followed(&followed, id, name), want, "{id} {name}");
        }
        // A short prefix is a name, not an id prefix: it must not follow every id starting so.
        assert!(!is_followed(&["01a9".to_owned()], ID, "x"));
    }

    #[test]
    fn a_resolved_reference_must_be_recognisable_later() {
        let container = engine::Container {
            id: ID.to_owned(),
            name: "synapse".to_owned(),
            pid: None,
        };
        assert!(check_reference("synapse", &container).is_ok());
        assert!(check_reference(&ID[..12], &container).is_ok());
        // Docker resolves 8 digits, but a recreated container's cgroup would not be recognised.
        let error = check_reference(&ID[..8], &container).unwrap_err().to_string();
        assert!(error.contains("12 or more digits"), "{error}");
    }
}
