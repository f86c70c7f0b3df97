//! How the homeserver host resolves names, for real: a view of the host (a private mount
//! namespace in the homeserver's network namespace) with its own `/etc/hosts`, `resolv.conf`
//! and `nsswitch.conf`, and, where asked, a real nscd or a real systemd-resolved with
//! nss-resolve running in it. The daemons are Debian's, unpacked by `cargo xtask setup` (not
//! installed: their packages would take over the host's resolver); they run outside the
//! intercepted cgroup, so their lookups are off the homeserver's wire, as on a real host.
//!
//! Programs that should resolve through the view (Synapse, the agent, clients) are launched with
//! [`crate::process::Enter::View`] and the view's holder process.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::{
    process::{Daemon, launch},
    topology::netns::Netns,
    wait,
};

/// What answers getaddrinfo() in the view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// `hosts: files dns`: the hosts file, then the resolver in resolv.conf (glibc itself).
    Files,
    /// The same through a running nscd (glibc asks it over /run/nscd/socket; nscd looks up).
    Nscd,
    /// systemd-resolved through nss-resolve (`hosts: resolve [!UNAVAIL=return] files dns`), over
    /// its varlink socket; resolv.conf names its stub, 127.0.0.53.
    Resolved,
}

impl Resolution {
    pub fn as_str(self) -> &'static str {
        match self {
            Resolution::Files => "files",
            Resolution::Nscd => "nscd",
            Resolution::Resolved => "resolved",
        }
    }
}

/// The unpacked daemons (see `cargo xtask setup`).
pub fn resolvers_root() -> PathBuf {
    std::env::var_os("EGRESS_RESOLVERS_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/egress-resolvers/root"))
}

/// The view's holder: a process whose mount namespace is the view; it and the daemons started
/// in it end with it (one process group).
pub struct HostView {
    pub resolution: Resolution,
    holder: Daemon,
    pub pid: u32,
    pub dir: PathBuf,
}

/// Sets the view up (in a private mount namespace, in the network namespace it was entered in),
/// starts the daemon of the mode, prints `ready`, then holds the namespace.
const HOLDER: &str = r#"
set -eu
mode=$1 etc=$2 root=$3 state=$4
for f in hosts resolv.conf nsswitch.conf; do mount --bind "$etc/$f" "/etc/$f"; done
wait_for() { i=0; while [ ! -S "$1" ]; do i=$((i+1)); [ $i -lt 150 ] || { echo "no $1"; exit 1; }; sleep 0.1; done; }
case $mode in
files) ;;
nscd)
    mount -t tmpfs -o mode=0755,size=16m egress-run /run
    mkdir -p /run/nscd
    "$root/usr/sbin/nscd" -d -f "$etc/nscd.conf" > "$state/nscd.log" 2>&1 &
    wait_for /run/nscd/socket ;;
resolved)
    # resolved makes /run/systemd/resolve itself (it refuses one owned by root), as the user
    # systemd-resolve, and needs libnss_resolve and its libsystemd-shared from the unpacked root.
    mount -t tmpfs -o mode=0755,size=16m egress-run /run
    mkdir -p /run/systemd
    for f in passwd group; do mount --bind "$etc/$f" "/etc/$f"; done
    mount --bind "$etc/systemd" /etc/systemd
    mount -t overlay egress-nss -o "ro,lowerdir=$root/usr/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" /usr/lib/x86_64-linux-gnu
    SYSTEMD_LOG_LEVEL=debug SYSTEMD_LOG_TARGET=console "$root/lib/systemd/systemd-resolved" > "$state/resolved.log" 2>&1 &
    wait_for /run/systemd/resolve/io.systemd.Resolve ;;
esac
echo ready
exec sleep infinity
"#;

const NSCD_CONF: &str = "\
debug-level 0
paranoia no
enable-cache passwd no
enable-cache group no
enable-cache services no
enable-cache netgroup no
enable-cache hosts yes
positive-time-to-live hosts 60
negative-time-to-live hosts 0
check-files hosts yes
persistent hosts no
shared hosts yes
";

impl HostView {
    /// A view of `ns` whose hosts file is `hosts` and whose resolver is `nameserver` (for
    /// [`Resolution::Resolved`], systemd-resolved's upstream; the view's resolv.conf then names
    /// its stub).
    pub fn start(
        ns: &Netns,
        dir: &Path,
        resolution: Resolution,
        hosts: &str,
        nameserver: &str,
    ) -> Result<Self> {
        let dir = dir.join(format!("view-{}", resolution.as_str()));
        let etc = dir.join("etc");
        std::fs::create_dir_all(&etc)?;
        let root = resolvers_root();
        if resolution != Resolution::Files && !root.join(".egress-stamp").exists() {
            bail!(
                "{} has no unpacked nscd and systemd-resolved: run `cargo xtask setup`",
                root.display()
            );
        }
        std::fs::write(
            etc.join("hosts"),
            format!("127.0.0.1 localhost\n::1 localhost\n{hosts}"),
        )?;
        let host_nsswitch = std::fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
        let hosts_line = match resolution {
            Resolution::Resolved => "hosts: resolve [!UNAVAIL=return] files dns",
            _ => "hosts: files dns",
        };
        let nsswitch: String = host_nsswitch
            .lines()
            .filter(|l| !l.starts_with("hosts:"))
            .chain([hosts_line])
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(etc.join("nsswitch.conf"), nsswitch)?;
        let resolv = match resolution {
            Resolution::Resolved => "nameserver 127.0.0.53\noptions edns0 trust-ad\n".to_owned(),
            _ => format!("nameserver {nameserver}\n"),
        };
        std::fs::write(etc.join("resolv.conf"), resolv)?;
        std::fs::write(etc.join("nscd.conf"), NSCD_CONF)?;
        if resolution == Resolution::Resolved {
            let add = |file: &str, line: &str| -> Result<()> {
                let host = std::fs::read_to_string(format!("/etc/{file}"))?;
                let kept: String = host
                    .lines()
                    .filter(|l| !l.starts_with("systemd-resolve:"))
                    .map(|l| format!("{l}\n"))
                    .collect();
                std::fs::write(etc.join(file), format!("{kept}{line}\n"))?;
                Ok(())
            };
            add(
                "passwd",
                "systemd-resolve:x:64991:64991:systemd Resolver:/:/usr/sbin/nologin",
            )?;
            add("group", "systemd-resolve:x:64991:")?;
            std::fs::create_dir_all(etc.join("systemd"))?;
            std::fs::write(
                etc.join("systemd/resolved.conf"),
                format!(
                    "[Resolve]\nDNS={nameserver}\nFallbackDNS=\nDomains=\nLLMNR=no\nMulticastDNS=no\n\
                     DNSSEC=no\nDNSOverTLS=no\nCache=yes\nDNSStubListener=yes\nReadEtcHosts=yes\n"
                ),
            )?;
        }
        let (etc_s, root_s, dir_s) = (
            etc.to_string_lossy().into_owned(),
            root.to_string_lossy().into_owned(),
            dir.to_string_lossy().into_owned(),
        );
        let mut command = launch(
            Some(&ns.name),
            crate::process::Enter::Net,
            None,
            "unshare",
            &[
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                HOLDER,
                "holder",
                resolution.as_str(),
                &etc_s,
                &root_s,
                &dir_s,
            ],
        );
        command.current_dir(&dir);
        let log = dir.join("holder.log");
        let mut holder = Daemon::spawn("host view", command, &log)?;
        wait::ready(
            &format!("the host view ({}) to be ready", resolution.as_str()),
            wait::STARTUP,
            || {
                holder.check_alive()?;
                Ok(std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("ready"))
            },
        )
        .with_context(|| {
            ["nscd.log", "resolved.log"]
                .iter()
                .filter_map(|f| std::fs::read_to_string(dir.join(f)).ok())
                .collect::<String>()
        })?;
        let pid = holder.child.id();
        Ok(Self {
            resolution,
            holder,
            pid,
            dir,
        })
    }

    /// What the view's daemon logged (nscd's or systemd-resolved's).
    pub fn daemon_log(&self) -> String {
        let file = match self.resolution {
            Resolution::Files => return String::new(),
            Resolution::Nscd => "nscd.log",
            Resolution::Resolved => "resolved.log",
        };
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    pub fn check_alive(&mut self) -> Result<()> {
        self.holder.check_alive()
    }
}
