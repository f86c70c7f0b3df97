//! Following containers by name: `--container NAME|ID` (Docker, or Podman's Docker-compatible
//! API).
//!
//! A restarted or recreated container gets a new cgroup, so attaching to the container's own
//! cgroup would leave it uncovered until egress noticed. Instead egress attaches its programs to
//! the engine's parent cgroup (`/docker`, `system.slice`, or the engine's `--cgroup-parent`) as a
//! *scope*: there the kernel intercepts only the child cgroups classified as followed, passes the
//! ones classified as other containers, and refuses connects from a child not classified yet.
//! [`classify_children`] classifies each child by the container id in its directory name, asking
//! the engine for the container's name. A followed container restarted or recreated under the
//! same name is therefore refused for a moment and then intercepted; it is never passed.

pub mod engine;

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use crate::kernel::{
    cgroups,
    scopes::{Classification, ScopeMaps},
};
use engine::Engine;

/// A container as named in the configuration: a name (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`, as Docker
/// and Podman allow) or an id (or a prefix of one, 12 hex digits at least).
pub fn validate_reference(reference: &str) -> Result<()> {
    let valid = reference.len() < 128
        && reference
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && reference
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid {
        bail!(
            "container {reference:?}: not a container name or id (letters, digits, '_', '.' and \
             '-', starting with a letter or digit, under 128 characters)"
        );
    }
    Ok(())
}

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

/// The cgroup v2 directory of process `pid`.
pub fn cgroup_of_pid(pid: u32) -> Result<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading /proc/{pid}/cgroup"))?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .with_context(|| format!("process {pid} has no cgroup v2 path"))?;
    Ok(cgroup2_root()?.join(relative.trim_start_matches('/')))
}

fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    cgroups::cgroup2_mount(&mountinfo).context("no cgroup2 filesystem is mounted")
}

/// The depth of cgroup directory `path` below the cgroup2 root (the root is level 0), as the
/// kernel's `bpf_get_current_ancestor_cgroup_id` counts.
pub fn cgroup_level(path: &Path) -> Result<u32> {
    let root = cgroup2_root()?;
    let relative = path.strip_prefix(&root).with_context(|| {
        format!(
            "{} is not under the cgroup2 root {}",
            path.display(),
            root.display()
        )
    })?;
    Ok(relative.components().count() as u32)
}

/// The engine cgroup to attach selectively for container `reference`: the parent of its
/// cgroup while it runs, else where the engine puts containers by default.
pub fn scope_for(engine: &Engine, reference: &str) -> Result<PathBuf> {
    validate_reference(reference)?;
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
    pub container: Option<String>,
    pub how: Classification,
}

/// Classifies every child cgroup of `scope` not classified yet (every one, with `again`).
/// `name_of(id)` asks the engine for a container's name (None: no such container, which
/// passes: not a container of this engine). A lookup that fails leaves the child as it was
/// (unclassified: refused), to be tried again next time.
pub fn classify_children(
    maps: &mut ScopeMaps,
    scope: &Path,
    followed: &[String],
    name_of: &mut dyn FnMut(&str) -> Result<Option<String>>,
    again: bool,
) -> Result<Vec<Classified>> {
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
        if before.is_some() && !again {
            continue;
        }
        let (container, how) = match container_id_in(dir_name) {
            None => (None, Classification::Pass),
            Some(container_id) => match name_of(container_id) {
                Ok(Some(name)) => {
                    let how = if is_followed(followed, container_id, &name) {
                        Classification::Intercept
                    } else {
                        Classification::Pass
                    };
                    (Some(name), how)
                }
                Ok(None) => (None, Classification::Pass),
                Err(e) => {
                    failure = Some(e);
                    continue;
                }
            },
        };
        if before == Some(how) {
            continue;
        }
        maps.classify(*id, how)?;
        changes.push(Classified {
            cgroup: scope.join(dir_name),
            container,
            how,
        });
    }
    if let Some(e) = failure {
        return Err(e.context("asking the container engine which container a new cgroup holds"));
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
    validate_reference(reference)?;
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
    // Also the children classified already: the container may be one passed so far.
    for change in classify_children(maps, scope, &followed, &mut name_of, true)? {
        log_classified(&change);
    }
    Ok(())
}

pub fn log_classified(change: &Classified) {
    let container = change.container.as_deref().unwrap_or("-");
    match change.how {
        Classification::Intercept => tracing::info!(
            container,
            cgroup = %change.cgroup.display(),
            "following a container: its connections are intercepted"
        ),
        Classification::Pass => tracing::debug!(
            container,
            cgroup = %change.cgroup.display(),
            "not a followed container: its connections pass"
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
}

impl Follower {
    /// One round. Returns the children classified as passing, whose processes egress leaves
    /// alone (no listener in their namespaces), and what went wrong, if anything (children
    /// that could not be classified stay refused).
    pub fn round(
        &mut self,
        maps: &std::sync::Mutex<ScopeMaps>,
        name_of: &mut dyn FnMut(&str) -> Result<Option<String>>,
    ) -> (Vec<u64>, Option<anyhow::Error>) {
        let mut maps = maps.lock().unwrap_or_else(|e| e.into_inner());
        let scopes = maps.scopes();
        if scopes.is_empty() {
            return (Vec::new(), None);
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
        let mut followed = maps.followed();
        followed.sort();
        let again = followed != self.followed;
        let paths: Vec<PathBuf> = self.paths.values().cloned().collect();
        let mut error = None;
        for scope in &paths {
            match classify_children(&mut maps, scope, &followed, name_of, again) {
                Ok(changes) => changes.iter().for_each(log_classified),
                Err(e) => error = Some(e),
            }
        }
        if error.is_none() {
            self.followed = followed;
        }
        // Only with every scope found: the children of one not found are not gone.
        if paths.len() == scopes.len() {
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

    #[test]
    fn container_references() {
        for good in ["matrix-synapse", "synapse_1", "a", "mautrix.telegram", &ID[..12]] {
            assert!(validate_reference(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", "../x", "a/b", "a b", "a?b", "ä", &"a".repeat(128)] {
            let error = validate_reference(bad).unwrap_err().to_string();
            assert!(error.contains("not a container name"), "{bad}: {error}");
        }
    }
}
