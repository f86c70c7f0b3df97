//! A real container engine: Debian's dockerd (with its own containerd and runc), started inside
//! the homeserver namespace so that its bridges, NAT and iptables rules stay there and vanish
//! with it. Containers run from an image imported locally (no registry): an almost empty root
//! whose /usr is the host's, mounted read-only, so curl, python3 and the host's Synapse
//! virtualenv work inside.
//!
//! Everything is removed on drop: containers, the daemon, its data, and the cgroups it made.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    process::{self, Daemon, Enter, launch},
    topology::{NAME_PREFIX, Testbed, cgroup::Cgroup},
    wait,
};

/// Debian's client, matching Debian's dockerd (another one may come first in PATH).
const DOCKER: &str = "/usr/bin/docker";
pub const IMAGE: &str = "egress-test/hostfs:1";

pub struct Docker {
    daemon: Option<Daemon>,
    pub socket: PathBuf,
    root: PathBuf,
    /// The cgroup every container is created under (dockerd's `--cgroup-parent`), relative to
    /// the cgroup root, and its cgroup2 directory, which egress attaches to.
    pub cgroup_parent: String,
    pub cgroup: Cgroup,
}

impl Docker {
    /// Starts dockerd in the homeserver namespace and imports [`IMAGE`].
    pub fn start(bed: &Testbed) -> Result<Self> {
        let root = bed.dir.join("docker");
        let (data, exec) = (root.join("data"), root.join("exec"));
        std::fs::create_dir_all(&data)?;
        std::fs::create_dir_all(&exec)?;
        let config = root.join("daemon.json");
        std::fs::write(&config, "{}\n")?;
        let relative = format!("egress-test/{}-docker", bed.name);
        let cgroup = Cgroup::create(&relative)?;
        let socket = root.join("docker.sock");
        let host = format!("unix://{}", socket.display());
        let args = [
            "--config-file",
            &config.to_string_lossy(),
            "--data-root",
            &data.to_string_lossy(),
            "--exec-root",
            &exec.to_string_lossy(),
            "--pidfile",
            &root.join("dockerd.pid").to_string_lossy(),
            "-H",
            &host,
            "--cgroup-parent",
            &format!("/{relative}"),
            "--userland-proxy=false",
            "--storage-driver",
            "overlay2",
        ]
        .map(|s| s.to_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let command = launch(Some(&bed.hs.name), Enter::Net, None, "dockerd", &args);
        let mut docker = Self {
            daemon: Some(Daemon::spawn("dockerd", command, &root.join("dockerd.log"))?),
            socket,
            root,
            cgroup_parent: format!("/{relative}"),
            cgroup,
        };
        wait::ready("dockerd to answer", wait::STARTUP, || {
            if let Some(daemon) = &mut docker.daemon {
                daemon.check_alive()?;
            }
            Ok(docker.command(&["version"]).output()?.status.success())
        })?;
        docker.import_image()?;
        Ok(docker)
    }

    /// `docker args...` against this daemon.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(DOCKER);
        command
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args);
        command
    }

    /// Runs `docker args...`, failing with its stderr; returns stdout, trimmed.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.command(args).output().context("running docker")?;
        if !out.status.success() {
            bail!(
                "docker {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Starts container `name` from [`IMAGE`] (detached, running `sleep`), with `extra` options
    /// (network, volumes) before the image. The host's /usr and CA store are mounted read-only.
    pub fn run_container(&self, name: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "-v",
            "/usr:/usr:ro",
            "-v",
            "/etc/ssl:/etc/ssl:ro",
        ];
        args.extend_from_slice(extra);
        args.extend([IMAGE, "sleep", "600"]);
        self.run(&args)
    }

    /// The main process of container `name`, as the host sees it.
    pub fn pid(&self, name: &str) -> Result<u32> {
        Ok(self.run(&["inspect", "-f", "{{.State.Pid}}", name])?.parse()?)
    }

    /// The nsfs inode of container `name`'s network namespace (what egress logs as `netns=`).
    pub fn netns_id(&self, name: &str) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let pid = self.pid(name)?;
        Ok(std::fs::metadata(format!("/proc/{pid}/ns/net"))?.ino())
    }

    /// An image whose root holds only links into /usr (mounted from the host at run time), the
    /// loader's cache and the mount points.
    fn import_image(&self) -> Result<()> {
        let tree = self.root.join("image");
        for dir in ["etc", "tmp", "proc", "dev", "sys", "run", "data"] {
            std::fs::create_dir_all(tree.join(dir))?;
        }
        for (link, target) in [
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            let _ = std::fs::remove_file(tree.join(link));
            std::os::unix::fs::symlink(target, tree.join(link))?;
        }
        std::fs::copy("/etc/ld.so.cache", tree.join("etc/ld.so.cache"))?;
        // /etc/hosts (docker's --add-host) before DNS, which test containers do not have.
        std::fs::write(tree.join("etc/nsswitch.conf"), "hosts: files dns\n")?;
        let script = r#"tar -C "$1" -c . | "$2" -H "unix://$3" import - "$4" >/dev/null"#;
        process::run(
            "sh",
            &[
                "-c",
                script,
                "import",
                &tree.to_string_lossy(),
                DOCKER,
                &self.socket.to_string_lossy(),
                IMAGE,
            ],
        )?;
        Ok(())
    }

    /// The cgroup v1 directories dockerd made for its containers (on hybrid hosts), deepest
    /// first.
    fn v1_cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for mount in v1_mounts() {
            collect_dirs(&mount.join(self.cgroup_parent.trim_start_matches('/')), &mut dirs);
        }
        dirs
    }
}

/// Where the cgroup v1 hierarchies are mounted (hybrid hosts; none on pure cgroup v2).
fn v1_mounts() -> Vec<PathBuf> {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next() == Some("cgroup")).then(|| PathBuf::from(mount))
        })
        .collect()
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
    if dir.exists() {
        out.push(dir.to_owned());
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if let Ok(ids) = self.run(&["ps", "-aq"]) {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.run(&args);
            }
        }
        if let Some(daemon) = self.daemon.take() {
            // SIGTERM: dockerd stops its containerd and shims; killed if it takes too long.
            daemon.signal(libc::SIGTERM);
            let mut daemon = daemon;
            let _ = wait::ready("dockerd to stop", Duration::from_secs(15), || Ok(daemon.exited()));
        }
        let data = self.root.join("data");
        let _ = process::run(
            "sh",
            &[
                "-c",
                r#"grep -o " $1[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l"#,
                "umount",
                &data.to_string_lossy(),
            ],
        );
        let _ = std::fs::remove_dir_all(&self.root);
        for dir in self.v1_cgroup_dirs() {
            let _ = std::fs::remove_dir(&dir);
            // The shared parent too, once the last testbed's engine is gone.
            if dir.ends_with(self.cgroup_parent.trim_start_matches('/'))
                && let Some(parent) = dir.parent()
            {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

/// Removes what crashed test runs left in the cgroup v1 hierarchies (hybrid hosts): dockerd's
/// directories named after a testbed.
pub fn sweep_v1_cgroups() {
    for mount in v1_mounts() {
        let parent = mount.join("egress-test");
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(NAME_PREFIX) {
                    let mut dirs = Vec::new();
                    collect_dirs(&entry.path(), &mut dirs);
                    for dir in dirs {
                        let _ = std::fs::remove_dir(dir);
                    }
                }
            }
        }
        let _ = std::fs::remove_dir(&parent);
    }
}
