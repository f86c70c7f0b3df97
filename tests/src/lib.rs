//! Test topologies for egress, built from real parts: network namespaces joined by a bridge, a
//! homeserver host whose client processes run in an intercepted cgroup, a proxy host running
//! squid with basic auth, and an origin host running nginx with TLS on 443 and 8448.
//!
//! ```text
//!   hs (10.248.0.10)        proxy (10.248.0.20)        origin (10.248.0.30)
//!   agent + cgroup clients  squid :3128 (basic auth)   nginx :443 :8448 (TLS), :80
//!          \________________________|_________________________/
//!                            switch (bridge br0)
//! ```
//! The homeserver host can reach the origin directly over the bridge, so tests that assert
//! "nothing went direct" are meaningful. Everything is removed on drop, also when a test panics.

pub mod cgroup;
pub mod cmd;
pub mod netns;
pub mod peers;
pub mod synapse;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::{
    cgroup::Cgroup,
    netns::Netns,
    peers::{Certs, Daemon, SquidOptions},
};

/// The test LAN. Private address space: in egress's default blacklist.
pub const LAN: &str = "10.248.0.0/24";
pub const LAN6: &str = "fd00:248::/64";
pub const HS_IP: &str = "10.248.0.10";
pub const PROXY_IP: &str = "10.248.0.20";
pub const ORIGIN_IP: &str = "10.248.0.30";
pub const HS_IP6: &str = "fd00:248::10";
pub const PROXY_IP6: &str = "fd00:248::20";
pub const ORIGIN_IP6: &str = "fd00:248::30";
/// squid's TLS ports: a valid certificate for the proxy's addresses and proxy.test, an expired
/// one, and one for another name.
pub const SQUID_TLS_PORT: u16 = 3129;
pub const SQUID_TLS_EXPIRED_PORT: u16 = 3130;
pub const SQUID_TLS_WRONG_NAME_PORT: u16 = 3131;
/// squid's plain port with the stock rule "CONNECT only to port 443".
pub const SQUID_STRICT_PORT: u16 = 3132;
/// A second address of the origin host, for tests that need a blacklisted destination.
pub const ORIGIN_IP_2: &str = "10.248.0.31";
/// Matrix server names whose TLS certificate the origin holds (see peers::MATRIX_DELEGATIONS
/// for which delegate where).
pub const MATRIX_NAMES: &[&str] = &["example.test", "fed.example.test", "plain.example.test"];
/// A name squid resolves to the origin, but which the origin's certificate does not hold.
pub const NAME_NOT_IN_CERT: &str = "wrongcert.test";
pub const ORIGIN_NAME: &str = "origin.test";
pub const SQUID_PORT: u16 = 3128;
pub const PROXY_USER: &str = "egress";
pub const PROXY_PASSWORD: &str = "Tr0ub4dor-s3cret";
/// Prefix of every namespace, cgroup and bpffs directory a testbed creates.
pub const NAME_PREFIX: &str = "egt";

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Testbed {
    pub name: String,
    pub dir: PathBuf,
    pub certs: Certs,
    pub pin_dir: PathBuf,
    /// Where the agent runs: None = the test process's own cgroup (outside the attached ones),
    /// Some(dir) = that cgroup directory.
    pub agent_cgroup: Option<PathBuf>,
    /// A bpffs mounted for this testbed alone (see [`Testbed::use_private_bpffs`]).
    private_bpffs: Option<PathBuf>,
    // Drop order matters: processes first, then the cgroup, then the namespaces.
    agent: Option<Daemon>,
    agent_runs: u32,
    dns: Option<Daemon>,
    /// /etc/netns/<hs>: the resolv.conf and hosts `ip netns exec` gives the homeserver host.
    hs_etc: Option<PathBuf>,
    squid: Daemon,
    nginx: Daemon,
    pub cgroup: Cgroup,
    /// A second intercepted cgroup (think: a bridge next to Synapse); attached only when a test
    /// passes it to the agent.
    pub cgroup_b: Cgroup,
    pub hs: Netns,
    pub proxy: Netns,
    pub origin: Netns,
    _switch: Netns,
}

/// What a client command printed and how it exited.
#[derive(Debug)]
pub struct ClientResult {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for ClientResult {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Testbed {
    pub fn new() -> Result<Self> {
        let id = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NAME_PREFIX}{}x{id}", std::process::id());
        let dir = std::env::temp_dir().join(format!("egress-testbed-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;

        let switch = Netns::create(format!("{name}-sw"))?;
        let hs = Netns::create(format!("{name}-hs"))?;
        let proxy = Netns::create(format!("{name}-px"))?;
        let origin = Netns::create(format!("{name}-or"))?;
        netns::create_bridge(&switch)?;
        netns::attach_host(&switch, &hs, "p-hs", HS_IP, HS_IP6)?;
        netns::attach_host(&switch, &proxy, "p-px", PROXY_IP, PROXY_IP6)?;
        netns::attach_host(&switch, &origin, "p-or", ORIGIN_IP, ORIGIN_IP6)?;
        origin.ip(&[
            "addr",
            "add",
            &format!("{ORIGIN_IP_2}/{}", netns::PREFIX_LEN),
            "dev",
            "eth0",
        ])?;
        peers::install_packet_counter(&origin, HS_IP, HS_IP6)?;

        let origin_names: Vec<&str> = std::iter::once(ORIGIN_NAME)
            .chain(MATRIX_NAMES.iter().copied())
            .collect();
        let certs = peers::make_certs(&dir, "origin", &origin_names, &[ORIGIN_IP, ORIGIN_IP6], 2)?;
        let proxy_ips = [PROXY_IP, PROXY_IP6];
        let proxy_good = peers::make_certs(&dir, "proxy", &["proxy.test"], &proxy_ips, 2)?;
        let proxy_expired = peers::make_certs(&dir, "proxy-expired", &["proxy.test"], &proxy_ips, -1)?;
        let proxy_wrong_name = peers::make_certs(&dir, "proxy-wrong-name", &["other.test"], &[], 2)?;
        let squid = peers::start_squid(
            &proxy,
            &dir,
            &name,
            &SquidOptions {
                user: PROXY_USER,
                password: PROXY_PASSWORD,
                http_port: SQUID_PORT,
                https_ports: &[
                    (SQUID_TLS_PORT, &proxy_good),
                    (SQUID_TLS_EXPIRED_PORT, &proxy_expired),
                    (SQUID_TLS_WRONG_NAME_PORT, &proxy_wrong_name),
                ],
                hosts: &format!(
                    "{ORIGIN_IP} {ORIGIN_NAME} {NAME_NOT_IN_CERT} {}\n",
                    MATRIX_NAMES.join(" ")
                ),
                strict_port: SQUID_STRICT_PORT,
            },
        )?;
        let nginx = peers::start_nginx(&origin, &dir, &certs, &[443, 8448], 80)?;
        let cgroup = Cgroup::create(&format!("egress-test/{name}"))?;
        let cgroup_b = Cgroup::create(&format!("egress-test/{name}-b"))?;
        let mut bed = Self {
            agent_cgroup: None,
            private_bpffs: None,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{name}")),
            name,
            dir,
            certs,
            agent: None,
            agent_runs: 0,
            dns: None,
            hs_etc: None,
            squid,
            nginx,
            cgroup,
            cgroup_b,
            hs,
            proxy,
            origin,
            _switch: switch,
        };
        bed.wait_for("squid", |b| {
            [
                SQUID_PORT,
                SQUID_TLS_PORT,
                SQUID_TLS_EXPIRED_PORT,
                SQUID_TLS_WRONG_NAME_PORT,
                SQUID_STRICT_PORT,
            ]
            .iter()
            .all(|p| b.proxy.is_listening(*p))
        })?;
        bed.wait_for("nginx", |b| {
            b.origin.is_listening(443) && b.origin.is_listening(8448)
        })?;
        Ok(bed)
    }

    fn wait_for(&mut self, what: &str, ready: impl Fn(&Self) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if ready(self) {
                return Ok(());
            }
            if self.squid.exited() || self.nginx.exited() {
                bail!("{what} did not start; logs in {}", self.dir.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{what} not ready after 20 s; logs in {}", self.dir.display())
    }

    /// `http://user:password@proxy:3128`, optionally with another password.
    pub fn proxy_url(&self, password: &str) -> String {
        format!("http://{PROXY_USER}:{password}@{PROXY_IP}:{SQUID_PORT}")
    }

    /// Starts `egress run` in the homeserver namespace, attached to the test cgroup, and waits
    /// until it reports ready. `args` come after the testbed's own (--cgroup, --bpffs-dir).
    pub fn start_agent(&mut self, args: &[&str]) -> Result<()> {
        self.stop_agent();
        self.agent_runs += 1;
        let log = self.agent_log_path(self.agent_runs);
        let mut command = in_cgroup_then(self.agent_cgroup.as_deref());
        command
            .arg("nsenter")
            .arg(format!("--net={}", self.hs.path()))
            .arg(egress_bin())
            .arg("run")
            .arg("--cgroup")
            .arg(&self.cgroup.path)
            .arg("--bpffs-dir")
            .arg(&self.pin_dir)
            .args(args)
            .env("EGRESS_LOG", "info,egress=debug");
        let mut agent = Daemon::spawn("egress", command, &log)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("egress ready")
            {
                self.agent = Some(agent);
                return Ok(());
            }
            if agent.exited() || Instant::now() > deadline {
                bail!(
                    "egress did not become ready:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's usual arguments: squid with the right credentials as https_proxy, and the
    /// test LAN whitelisted (it is private address space, blacklisted by default).
    pub fn default_agent_args(&self) -> Vec<String> {
        vec![
            "--https-proxy".into(),
            self.proxy_url(PROXY_PASSWORD),
            "--ip-range-whitelist".into(),
            LAN.into(),
            "--ip-range-whitelist".into(),
            LAN6.into(),
        ]
    }

    /// Starts the agent with [`Self::default_agent_args`] followed by `extra`.
    pub fn start_agent_with(&mut self, extra: &[&str]) -> Result<()> {
        let mut args = self.default_agent_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_agent(&refs)
    }

    pub fn start_default_agent(&mut self) -> Result<()> {
        self.start_agent_with(&[])
    }

    /// Pins into a bpffs mounted for this testbed only, so a test may unmount it without
    /// touching anyone else's pins. Call before starting the agent.
    pub fn use_private_bpffs(&mut self) -> Result<PathBuf> {
        self.use_private_bpffs_with("mode=1777")
    }

    /// Like [`Self::use_private_bpffs`], with mount options (systemd mounts bpffs `mode=700`).
    pub fn use_private_bpffs_with(&mut self, options: &str) -> Result<PathBuf> {
        let mount = self.dir.join("bpffs");
        std::fs::create_dir_all(&mount)?;
        cmd::run(
            "mount",
            &["-t", "bpf", "-o", options, "bpf", &mount.to_string_lossy()],
        )?;
        self.pin_dir = mount.join("egress");
        self.private_bpffs = Some(mount.clone());
        Ok(mount)
    }

    /// The running agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.child.id())
    }

    /// GET `path` from the agent's admin listener (default address), from the homeserver host
    /// but outside the intercepted cgroup. Returns (HTTP status, body).
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        let url = format!("http://127.0.0.1:9478{path}");
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.hs.path()))
            .args(["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", &url])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.signal(libc::SIGTERM);
            let _ = agent.child.wait();
        }
    }

    /// Kills the agent with SIGKILL, as a crash would.
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
    }

    fn agent_log_path(&self, run: u32) -> PathBuf {
        self.dir.join(format!("egress-{run}.log"))
    }

    /// Everything the agent(s) of this testbed logged so far.
    pub fn agent_log(&self) -> String {
        (1..=self.agent_runs)
            .map(|run| std::fs::read_to_string(self.agent_log_path(run)).unwrap_or_default())
            .collect()
    }

    /// Gives the homeserver host a DNS server (dnsmasq on its loopback) answering A records
    /// from `hosts` (hosts-file lines) and the `srv` records, and makes it the resolver of
    /// programs started with [`Self::run_in_hs`] / [`Self::hs_command`] (`ip netns exec` uses
    /// /etc/netns/NAME/resolv.conf).
    pub fn start_dns(&mut self, hosts: &str, srv: &[(&str, &str, u16)]) -> Result<()> {
        let etc = PathBuf::from("/etc/netns").join(&self.hs.name);
        std::fs::create_dir_all(&etc)?;
        self.hs_etc = Some(etc.clone());
        std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
        std::fs::write(etc.join("hosts"), "127.0.0.1 localhost\n::1 localhost\n")?;
        self.dns = Some(peers::start_dnsmasq(&self.hs, &self.dir, hosts, srv)?);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .hs
            .exec("ss", &["-Hlun", "sport = :53"])
            .is_ok_and(|o| !o.trim().is_empty())
        {
            if Instant::now() > deadline {
                bail!("dnsmasq did not start; logs in {}", self.dir.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// `program args...` in the homeserver namespace through `ip netns exec` (so with the
    /// resolver of [`Self::start_dns`]), in `cgroup` if given (joined first: `ip netns exec`
    /// hides the cgroup filesystem).
    pub fn hs_command(&self, cgroup: Option<&Path>, program: &str, args: &[&str]) -> Command {
        let mut command = in_cgroup_then(cgroup);
        command
            .args(["ip", "netns", "exec", &self.hs.name, program])
            .args(args);
        command
    }

    /// Runs `program args...` in the homeserver namespace, outside the intercepted cgroups,
    /// with the resolver of [`Self::start_dns`].
    pub fn run_in_hs(&self, program: &str, args: &[&str]) -> Result<ClientResult> {
        Ok(self.hs_command(None, program, args).output()?.into())
    }

    /// Runs `program args...` inside the intercepted cgroup, in the homeserver namespace.
    pub fn run_in_cgroup(&self, program: &str, args: &[&str]) -> Result<ClientResult> {
        self.run_in(&self.cgroup.path, program, args)
    }

    /// Starts `program args...` inside `cgroup`, in the homeserver namespace, with stdin and
    /// stdout piped, for clients that must stay connected while the test does other things.
    /// The cgroup's removal on drop kills it if the test does not.
    pub fn spawn_in(&self, cgroup: &Path, program: &str, args: &[&str]) -> Result<std::process::Child> {
        Ok(self
            .in_cgroup(cgroup, program, args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?)
    }

    /// The command running `program args...` inside `cgroup`, in the homeserver namespace: join
    /// the cgroup first, then enter only the network namespace (keeping /sys and its cgroupfs).
    fn in_cgroup(&self, cgroup: &Path, program: &str, args: &[&str]) -> Command {
        let mut command = in_cgroup_then(Some(cgroup));
        command
            .arg("nsenter")
            .arg(format!("--net={}", self.hs.path()))
            .arg(program)
            .args(args);
        command
    }

    /// Runs `program args...` inside cgroup `cgroup`, in the homeserver namespace.
    pub fn run_in(&self, cgroup: &Path, program: &str, args: &[&str]) -> Result<ClientResult> {
        Ok(self.in_cgroup(cgroup, program, args).output()?.into())
    }

    /// curl from inside the cgroup with no proxy settings at all: `url` is fetched "directly",
    /// with origin.test resolving to the origin's address and the test CA trusted.
    pub fn curl(&self, url: &str) -> Result<ClientResult> {
        self.curl_many(&[url])
    }

    /// One curl fetching several URLs (reusing its connection where it can).
    pub fn curl_many(&self, urls: &[&str]) -> Result<ClientResult> {
        self.curl_in(&self.cgroup.path, urls)
    }

    /// curl in `cgroup` with no proxy settings, origin.test resolving to the origin and the test
    /// CA trusted; `args` (URLs and further options) come last.
    pub fn curl_in(&self, cgroup: &Path, args: &[&str]) -> Result<ClientResult> {
        let ca = self.certs.ca.to_string_lossy().into_owned();
        let resolves: Vec<String> = [443u16, 8448, 80]
            .iter()
            .map(|p| format!("{ORIGIN_NAME}:{p}:{ORIGIN_IP}"))
            .collect();
        let mut all = vec!["-sS", "--noproxy", "*", "--max-time", "15", "--cacert", &ca];
        for resolve in &resolves {
            all.extend(["--resolve", resolve.as_str()]);
        }
        all.extend_from_slice(args);
        self.run_in(cgroup, "curl", &all)
    }

    /// A bare TCP connect from inside the cgroup. stdout is `connected`, or the error's
    /// errno name (`ECONNREFUSED`, `EPERM`, ...), so tests can tell refusal from denial.
    pub fn tcp_connect(&self, ip: &str, port: u16) -> Result<String> {
        let script = "import errno, socket, sys\n\
try:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), 5); print('connected')\n\
except OSError as e:\n    print(errno.errorcode.get(e.errno, str(e)))\n";
        let result = self.run_in_cgroup("python3", &["-c", script, ip, &port.to_string()])?;
        Ok(result.stdout.trim().to_owned())
    }

    pub fn squid_access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("squid/access.log")).unwrap_or_default()
    }

    pub fn origin_access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nginx/access.log")).unwrap_or_default()
    }

    /// Packets that reached the origin host from the homeserver host's address, i.e. direct.
    pub fn direct_packets_at_origin(&self) -> Result<u64> {
        peers::read_packet_counter(&self.origin)
    }

    /// Polls `read` until `pred` holds or `timeout` passes; returns the last value read.
    pub fn eventually(
        &self,
        timeout: Duration,
        read: impl Fn(&Self) -> String,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let value = read(self);
            if pred(&value) || Instant::now() > deadline {
                return value;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn egress(&self, args: &[&str]) -> Result<ClientResult> {
        Ok(Command::new(egress_bin()).args(args).output()?.into())
    }

    /// A kernel decision counter, read with `egress status`.
    pub fn counter(&self, name: &str) -> u64 {
        let status = self
            .egress(&["status", "--bpffs-dir", &self.pin_dir.to_string_lossy()])
            .expect("egress status");
        status
            .stdout
            .lines()
            .find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no counter {name} in {status:?}"))
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.kill_agent();
        self.dns.take();
        if let Some(etc) = self.hs_etc.take() {
            let _ = std::fs::remove_dir_all(etc);
        }
        // Removing the pins detaches the programs from the (soon removed) cgroup.
        cmd::quietly(
            &egress_bin().to_string_lossy(),
            &["detach", "--bpffs-dir", &self.pin_dir.to_string_lossy()],
        );
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if let Some(mount) = &self.private_bpffs {
            cmd::quietly("umount", &["-l", &mount.to_string_lossy()]);
        }
        if std::thread::panicking() {
            eprintln!("testbed {}: logs kept in {}", self.name, self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The `egress` binary under test: $EGRESS_BIN, else the workspace's release build.
pub fn egress_bin() -> PathBuf {
    std::env::var_os("EGRESS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/egress"))
}

/// A shell that joins `cgroup` (if given) and then execs the program and arguments the caller
/// appends: joining first, because entering a namespace may hide the cgroup filesystem.
fn in_cgroup_then(cgroup: Option<&Path>) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"[ -z "$0" ] || echo $$ > "$0/cgroup.procs" && exec "$@""#)
        .arg(cgroup.unwrap_or(Path::new("")));
    command
}

/// Whitelist flags for the proxy and the origin's first address only (and the IPv6 LAN): the
/// origin's second address, [`ORIGIN_IP_2`], stays in the default blacklist (10.0.0.0/8).
pub fn narrow_whitelist_args() -> Vec<String> {
    [
        format!("{PROXY_IP}/32"),
        format!("{ORIGIN_IP}/32"),
        LAN6.to_owned(),
    ]
    .into_iter()
    .flat_map(|net| ["--ip-range-whitelist".to_owned(), net])
    .collect()
}

/// Removes what crashed earlier runs may have left: namespaces, cgroups and pins named egt*.
pub fn sweep_leftovers() {
    if let Ok(list) = cmd::run("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(NAME_PREFIX) {
                cmd::quietly("ip", &["netns", "del", name]);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(NAME_PREFIX) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    if let Ok(root) = cgroup::cgroup2_root()
        && let Ok(entries) = std::fs::read_dir(root.join("egress-test"))
    {
        for entry in entries.flatten() {
            cgroup::remove(&entry.path());
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(NAME_PREFIX) {
                cmd::quietly(
                    &egress_bin().to_string_lossy(),
                    &["detach", "--bpffs-dir", &entry.path().to_string_lossy()],
                );
            }
        }
    }
}
