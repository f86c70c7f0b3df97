//! systemd unit name → its cgroup v2 directory, read straight from the cgroup filesystem so the
//! agent needs neither systemd nor D-Bus. Works on pure v2 hosts (cgroup2 at /sys/fs/cgroup) and
//! hybrid ones (cgroup2 at /sys/fs/cgroup/unified, where systemd keeps the same tree).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Unit types that get a cgroup of their own (targets, timers, paths, devices... never do).
const CGROUP_TYPES: &[&str] = &["service", "scope", "slice", "socket", "mount", "swap"];
const OTHER_TYPES: &[&str] = &["target", "timer", "path", "device", "automount"];
/// Deep enough for user units (user.slice/user-1000.slice/user@1000.service/app.slice/x.service)
/// and nested slices, shallow enough to stay quick on hosts with many containers.
const MAX_DEPTH: usize = 8;

/// Where cgroup2 is mounted, from the text of /proc/self/mountinfo (the mount point of the first
/// `cgroup2` filesystem). A mount of the whole hierarchy (root `/`) is preferred over a bind
/// mount of a subtree.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    // Fields: id parent major:minor root mount-point options [optional...] - fstype source super-options
    let mounts: Vec<(&str, &str)> = mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
            (fields.get(sep + 1) == Some(&"cgroup2")).then_some((fields[3], fields[4]))
        })
        .collect();
    let (_, mount_point) = mounts.iter().find(|(root, _)| *root == "/").or(mounts.first())?;
    Some(PathBuf::from(unescape_mountinfo(mount_point)))
}

/// The kernel writes space, tab, newline and backslash in paths as octal escapes. `\134` goes
/// last so that the backslash it yields never starts another escape.
fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
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

/// CAP_NET_RAW's bit in /proc/PID/status's capability masks.
const CAP_NET_RAW: u32 = 13;
/// Processes looked at per cgroup.
const MAX_PROCESSES_CHECKED: usize = 32;

/// A process in cgroup `dir` or its direct children that may use CAP_NET_RAW (in its bounding
/// set), if any: it can open packet sockets, whose frames no cgroup program sees.
pub fn raw_capable_process(dir: &Path) -> Option<u32> {
    let children = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path());
    let pids = std::iter::once(dir.to_owned())
        .chain(children)
        .filter_map(|cgroup| std::fs::read_to_string(cgroup.join("cgroup.procs")).ok())
        .flat_map(|procs| {
            procs
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .take(MAX_PROCESSES_CHECKED);
    pids.into_iter().find(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| bounding_set(&status))
            .is_some_and(|caps| caps & (1 << CAP_NET_RAW) != 0)
    })
}

/// The `CapBnd:` mask of a /proc/PID/status text.
fn bounding_set(status: &str) -> Option<u64> {
    let mask = status.lines().find_map(|l| l.strip_prefix("CapBnd:"))?;
    u64::from_str_radix(mask.trim(), 16).ok()
}

/// Where cgroup2 is mounted on this host.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    cgroup2_mount(&mountinfo).context("no cgroup2 filesystem is mounted")
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

/// The id of this process's cgroup v2 (its directory's inode).
pub fn own_cgroup_id() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    Some(std::fs::metadata(own_cgroup()?).ok()?.ino())
}

/// Resolves the units in `settings` to their cgroups, added to its cgroups (units must be
/// running: systemd makes a unit's cgroup only while it runs).
pub fn resolve_units(settings: &mut crate::config::Settings) -> Result<()> {
    for unit in std::mem::take(&mut settings.targets.units) {
        let cgroup = resolve_unit(&unit)?;
        settings.targets.cgroups.push(cgroup);
    }
    Ok(())
}

/// Resolves using /proc/self/mountinfo.
pub fn resolve_unit(unit: &str) -> Result<PathBuf> {
    unit_name(unit)?; // a bad name is reported as such, even on a host without cgroup2
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let Some(root) = cgroup2_mount(&mountinfo) else {
        bail!("unit {unit}: no cgroup2 filesystem is mounted (egress needs cgroup v2, pure or hybrid)");
    };
    resolve_unit_in(&root, unit)
}

/// Finds the directory named exactly `unit` (a name without a unit-type suffix gets `.service`
/// appended) under `root`, searching depth-first at most 8 levels deep without following
/// symlinks. Errors, each naming the unit: invalid unit name (empty, contains '/', "..",
/// whitespace or control chars, or an unknown suffix — allowed: .service .scope .slice .socket
/// .mount .swap), not found ("is the unit running? systemd creates its cgroup only while it
/// runs"), or found more than once (list the paths).
pub fn resolve_unit_in(root: &Path, unit: &str) -> Result<PathBuf> {
    let name = unit_name(unit)?;
    if name == "-.slice" {
        // The root slice is the root cgroup itself.
        return Ok(root.to_path_buf());
    }
    // Fast path: where systemd puts system services; also wins over a same-named user unit.
    let system = root.join("system.slice").join(&name);
    if system.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        return Ok(system);
    }
    std::fs::read_dir(root)
        .with_context(|| format!("unit {name}: reading cgroup root {}", root.display()))?;
    let mut found = Vec::new();
    find(root, &name, 1, &mut found);
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "unit {name}: no cgroup of that name under {} (searched {MAX_DEPTH} levels deep); is the \
             unit running? systemd creates its cgroup only while it runs",
            root.display()
        ),
        _ => {
            found.sort();
            let list: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
            bail!(
                "unit {name}: several cgroups have that name: {}; pass the cgroup path instead",
                list.join(", ")
            )
        }
    }
}

/// Checks the name and appends `.service` when it has no unit-type suffix.
fn unit_name(unit: &str) -> Result<String> {
    let bad = |why: &str| anyhow::anyhow!("unit {unit:?}: invalid unit name: {why}");
    if unit.is_empty() {
        return Err(bad("empty"));
    }
    if unit.contains('/') || unit.contains("..") {
        return Err(bad("contains '/' or '..'"));
    }
    if unit.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("contains whitespace or control characters"));
    }
    let (stem, suffix) = unit.rsplit_once('.').unwrap_or((unit, "service"));
    if OTHER_TYPES.contains(&suffix) {
        return Err(bad(&format!(".{suffix} units have no cgroup")));
    }
    if !CGROUP_TYPES.contains(&suffix) {
        return Err(bad(&format!(
            "unknown suffix .{suffix} (expected one of .{}; for a service whose name has a dot, give \
             the full name ending in .service)",
            CGROUP_TYPES.join(" .")
        )));
    }
    if stem.is_empty() {
        return Err(bad("nothing before the suffix"));
    }
    if stem.ends_with('@') {
        // Only a template's instances run and have cgroups.
        return Err(bad("a template; name an instance, e.g. name@instance.service"));
    }
    let name = format!("{stem}.{suffix}");
    if name.len() > 255 {
        return Err(bad("longer than 255 bytes"));
    }
    Ok(name)
}

/// The cgroup directory with id `id` (its inode number) under the cgroup2 mount, for showing
/// paths where the kernel gives ids.
pub fn cgroup_path_by_id(id: u64) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let root = cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)?;
    if std::fs::metadata(&root).ok()?.ino() == id {
        return Some(root);
    }
    let mut found = Vec::new();
    walk(
        &root,
        &|e| e.metadata().is_ok_and(|m| m.ino() == id),
        1,
        &mut found,
    );
    found.into_iter().next()
}

/// This process's cgroup v2 directory. /proc/self/cgroup names it, except in a cgroup namespace
/// of its own (a container's default on cgroup v2, e.g. egress's DaemonSet pod), where it shows
/// only `/`: then it is the cgroup whose `cgroup.procs` lists this process (readable there with
/// the host's cgroup tree and PID namespace mounted).
pub fn own_cgroup() -> Option<PathBuf> {
    let pid = std::process::id().to_string();
    let holds_us = |dir: &Path| {
        std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| procs.lines().any(|l| l == pid))
    };
    let root = cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)?;
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let relative = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let named = root.join(relative.trim_start_matches('/'));
    if holds_us(&named) {
        return Some(named);
    }
    let mut found = Vec::new();
    walk(&root, &|e| holds_us(&e.path()), 1, &mut found);
    found.into_iter().next()
}

fn find(dir: &Path, name: &str, depth: usize, found: &mut Vec<PathBuf>) {
    walk(dir, &|e| e.file_name() == name, depth, found);
}

/// Depth-first search. Errors below the root are skipped: cgroups vanish as units stop.
fn walk(dir: &Path, matches: &dyn Fn(&std::fs::DirEntry) -> bool, depth: usize, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        // file_type() does not follow symlinks: a link to a directory is not descended into.
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        if matches(&entry) {
            // Same-named cgroups below a unit's own belong to it (delegation), not to systemd.
            found.push(path);
        } else if depth < MAX_DEPTH {
            walk(&path, matches, depth + 1, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounding_set_is_read_from_proc_status() {
        for (status, want) in [
            (
                "Name:\tsh\nCapBnd:\t00000000a80425fb\nCapAmb:\t0\n",
                Some(0xa80425fb),
            ),
            ("CapBnd:\t000001ffffffffff\n", Some(0x1ffffffffff)),
            ("CapBnd:\tnot hex\n", None),
            ("Name:\tsh\n", None),
        ] {
            assert_eq!(bounding_set(status), want, "{status:?}");
        }
    }

    #[test]
    fn a_cgroup_of_this_process_is_found_raw_capable_as_its_bounding_set_says() {
        let dir = TempDir::with(&["inner"]);
        let own = std::process::id();
        std::fs::write(dir.0.join("inner").join("cgroup.procs"), format!("{own}\n")).unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let capable = bounding_set(&status).unwrap() & (1 << CAP_NET_RAW) != 0;
        assert_eq!(raw_capable_process(&dir.0), capable.then_some(own));
        let empty = TempDir::with(&["a"]);
        assert_eq!(raw_capable_process(&empty.0), None);
    }

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("egress-unit-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        /// Creates each directory (relative path) with a cgroup-ish file in it.
        fn with(dirs: &[&str]) -> Self {
            let t = Self::new();
            for d in dirs {
                std::fs::create_dir_all(t.0.join(d)).unwrap();
                std::fs::write(t.0.join(d).join("cgroup.procs"), "").unwrap();
            }
            t
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const PURE_V2: &[&str] = &[
        "init.scope",
        "system.slice/matrix-synapse.service",
        "system.slice/postgresql.service",
        "system.slice/system-getty.slice/getty@tty1.service",
        "user.slice/user-1000.slice/session-3.scope",
        "user.slice/user-1000.slice/user@1000.service/app.slice/dbus.socket",
        "user.slice/user-1000.slice/user@1000.service/app.slice/element-desktop.service",
    ];

    #[test]
    fn resolves() {
        let worker =
            r"system.slice/system-matrix\x2dsynapse\x2dworker.slice/matrix-synapse-worker@generic1.service";
        let deep = "a.slice/b.slice/c.slice/d.slice/e.slice/f.slice/g.slice/deep.service"; // depth 8
        let mut dirs = PURE_V2.to_vec();
        dirs.extend([
            "matrix.slice/matrix-bridge.service",
            worker,
            deep,
            "user.slice/user-1000.slice/user@1000.service/app.slice/matrix-synapse.service",
        ]);
        let t = TempDir::with(&dirs);
        let cases: &[(&str, &str)] = &[
            ("matrix-synapse.service", "system.slice/matrix-synapse.service"),
            ("matrix-synapse", "system.slice/matrix-synapse.service"),
            ("matrix-bridge.service", "matrix.slice/matrix-bridge.service"),
            ("matrix-synapse-worker@generic1.service", worker),
            ("matrix-synapse-worker@generic1", worker),
            (
                r"system-matrix\x2dsynapse\x2dworker.slice",
                r"system.slice/system-matrix\x2dsynapse\x2dworker.slice",
            ),
            ("user-1000.slice", "user.slice/user-1000.slice"),
            ("system.slice", "system.slice"),
            ("-.slice", ""),
            ("session-3.scope", "user.slice/user-1000.slice/session-3.scope"),
            (
                "dbus.socket",
                "user.slice/user-1000.slice/user@1000.service/app.slice/dbus.socket",
            ),
            (
                "element-desktop",
                "user.slice/user-1000.slice/user@1000.service/app.slice/element-desktop.service",
            ),
            ("deep.service", deep),
        ];
        for (unit, want) in cases {
            let got = resolve_unit_in(&t.0, unit).unwrap_or_else(|e| panic!("{unit}: {e:#}"));
            assert_eq!(got, t.0.join(want), "{unit}");
        }
    }

    #[test]
    fn errors() {
        let t = TempDir::with(&[
            "system.slice/postgresql.service",
            "a.slice/dup.service",
            "b.slice/nested.slice/dup.service",
            "a.slice/b.slice/c.slice/d.slice/e.slice/f.slice/g.slice/h.slice/toodeep.service", // depth 9
            "elsewhere/linked.service",
        ]);
        std::os::unix::fs::symlink(t.0.join("elsewhere"), t.0.join("system.slice/link.slice")).unwrap();
        std::os::unix::fs::symlink(
            t.0.join("elsewhere/linked.service"),
            t.0.join("a.slice/lnk.service"),
        )
        .unwrap();
        // (unit, what the message must contain besides the unit name)
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("system.slice/foo.service", "'/'"),
            ("..", "'..'"),
            ("foo..service", "'..'"),
            ("matrix synapse.service", "whitespace"),
            ("matrix-synapse.service\n", "whitespace"),
            ("matrix\u{7}synapse.service", "control"),
            ("matrix-synapse.target", "no cgroup"),
            ("matrix-synapse.timer", "no cgroup"),
            ("matrix-synapse.conf", "unknown suffix .conf"),
            ("synapse@example.com", "unknown suffix .com"),
            (".service", "nothing before the suffix"),
            ("matrix-synapse-worker@.service", "template"),
            ("matrix-synapse-worker@", "template"),
            (&"x".repeat(250), "longer than 255 bytes"),
            (
                "missing.service",
                "is the unit running? systemd creates its cgroup only while it runs",
            ),
            ("missing", "is the unit running?"),
            ("toodeep.service", "is the unit running?"),
            ("lnk.service", "is the unit running?"), // a symlink is not a cgroup
            ("dup.service", "a.slice/dup.service"),
            ("dup", "b.slice/nested.slice/dup.service"),
        ];
        for (unit, needle) in cases {
            let err = resolve_unit_in(&t.0, unit).expect_err(unit);
            let msg = format!("{err:#}");
            assert!(
                msg.contains(&format!("unit {unit}")) || msg.contains(&format!("unit {unit:?}")),
                "{msg}"
            );
            assert!(msg.contains(needle), "{unit}: {msg}");
        }
        // linked.service is found once, at its real place: the symlinked slice is not followed.
        assert_eq!(
            resolve_unit_in(&t.0, "linked.service").unwrap(),
            t.0.join("elsewhere/linked.service")
        );
        // Missing root.
        let gone = t.0.join("nonexistent");
        let msg = format!("{:#}", resolve_unit_in(&gone, "x.service").unwrap_err());
        assert!(msg.contains("nonexistent") && msg.contains("x.service"), "{msg}");
    }

    #[test]
    fn resolve_unit_checks_the_name_first() {
        let msg = format!("{:#}", resolve_unit("matrix synapse").unwrap_err());
        assert!(msg.contains("invalid unit name"), "{msg}");
    }

    #[test]
    fn system_slice_wins_over_same_named_user_unit() {
        let t = TempDir::with(&[
            "user.slice/user-1000.slice/user@1000.service/app.slice/matrix-synapse.service",
            "system.slice/matrix-synapse.service",
        ]);
        let got = resolve_unit_in(&t.0, "matrix-synapse.service").unwrap();
        assert_eq!(got, t.0.join("system.slice/matrix-synapse.service"));
    }

    const HYBRID: &str = "\
22 28 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
23 28 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:13 - proc proc rw
28 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
31 22 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755,inode64
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
36 31 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
37 31 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
";

    const PURE: &str = "\
22 28 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
28 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
31 22 0:7 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:12 - bpf bpf rw,mode=700
";

    const LEGACY_V1: &str = "\
31 22 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
36 31 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
";

    #[test]
    fn finds_cgroup2_mount() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("hybrid", HYBRID, Some("/sys/fs/cgroup/unified")),
            ("pure v2", PURE, Some("/sys/fs/cgroup")),
            ("v1 only", LEGACY_V1, None),
            ("empty", "", None),
            (
                "no optional fields",
                "30 22 0:26 / /sys/fs/cgroup rw - cgroup2 none rw\n",
                Some("/sys/fs/cgroup"),
            ),
            (
                "several optional fields",
                "30 22 0:26 / /cg rw shared:9 master:2 propagate_from:1 - cgroup2 cgroup2 rw\n",
                Some("/cg"),
            ),
            (
                "escaped mount point",
                "30 22 0:26 / /mnt/my\\040cg\\134040\\011x rw - cgroup2 cgroup2 rw\n",
                Some("/mnt/my cg\\040\tx"),
            ),
            (
                "whole hierarchy preferred over a subtree bind mount",
                "40 22 0:26 /system.slice /srv/cg rw - cgroup2 cgroup2 rw\n50 22 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
                Some("/sys/fs/cgroup"),
            ),
            (
                "only a subtree",
                "40 22 0:26 /system.slice /srv/cg rw - cgroup2 cgroup2 rw\n",
                Some("/srv/cg"),
            ),
            (
                "malformed lines",
                "garbage\n1 2 3 4 5 6 -\n30 22 0:26 / /x rw cgroup2 cgroup2\n",
                None,
            ),
        ];
        for (name, text, want) in cases {
            assert_eq!(cgroup2_mount(text), want.map(PathBuf::from), "{name}");
        }
    }
}
