//! The test topology: network namespaces joined by a bridge, the intercepted cgroups, and the
//! peers a test asks for, sized by a [`Builder`].
//!
//! ```text
//!   hs (10.248.0.10)        proxy (10.248.0.20)        origin (10.248.0.30)
//!   agent + cgroup clients  squid :3128 (basic auth)   nginx :443 :8448 (TLS), :80
//!          \________________________|_________________________/
//!                            switch (bridge br0)
//! ```
//! The homeserver host can reach the origin directly over the bridge, so tests that assert
//! "nothing went direct" (the origin's packet counter) are meaningful. Everything is removed on
//! drop, also when a test panics: processes, the agent's pins, cgroups, /etc/netns files, then
//! the namespaces.

pub mod cgroup;
pub mod netns;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result};

use self::{cgroup::Cgroup, netns::Netns};
use crate::{
    agent::Agent,
    peers::{
        self, Certs, SquidOptions,
        resolvers::{HostView, Resolution},
    },
    process::{self, ClientResult, Daemon, Enter, egress_bin},
    wait,
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
/// A second address of the origin host, for tests that need a blacklisted destination.
pub const ORIGIN_IP_2: &str = "10.248.0.31";
pub const SQUID_PORT: u16 = 3128;
/// squid's TLS ports ([`Builder::squid_tls`]): a valid certificate for the proxy's addresses
/// and proxy.test, an expired one, and one for another name.
pub const SQUID_TLS_PORT: u16 = 3129;
pub const SQUID_TLS_EXPIRED_PORT: u16 = 3130;
pub const SQUID_TLS_WRONG_NAME_PORT: u16 = 3131;
/// squid's plain port with the stock rule "CONNECT only to port 443" ([`Builder::squid_strict`]).
pub const SQUID_STRICT_PORT: u16 = 3132;
/// Matrix server names whose TLS certificate the origin holds (see peers::MATRIX_DELEGATIONS
/// for which delegate where).
pub const MATRIX_NAMES: &[&str] = &["example.test", "fed.example.test", "plain.example.test"];
/// A name squid resolves to the origin, but which the origin's certificate does not hold.
pub const NAME_NOT_IN_CERT: &str = "wrongcert.test";
pub const ORIGIN_NAME: &str = "origin.test";
pub const PROXY_USER: &str = "egress";
pub const PROXY_PASSWORD: &str = "Tr0ub4dor-s3cret";
/// Prefix of every namespace, cgroup and bpffs directory a testbed creates.
pub const NAME_PREFIX: &str = "egt";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// An SRV record: name, target, port.
pub type SrvRecord = (String, String, u16);

/// What a test needs besides the namespaces and cgroups (which every testbed has).
#[derive(Default)]
pub struct Builder {
    squid: bool,
    squid_tls: bool,
    squid_strict: bool,
    nginx: bool,
    dns: Option<(String, Vec<SrvRecord>)>,
    squid_hosts: String,
}

impl Builder {
    /// squid with basic auth on [`SQUID_PORT`] of the proxy host.
    pub fn squid(mut self) -> Self {
        self.squid = true;
        self
    }

    /// More hosts-file lines for squid's resolver (besides the origin's names).
    pub fn squid_hosts(mut self, lines: &str) -> Self {
        self.squid_hosts.push_str(lines);
        self.squid()
    }

    /// squid's TLS ports too (see [`SQUID_TLS_PORT`]).
    pub fn squid_tls(mut self) -> Self {
        self.squid_tls = true;
        self.squid()
    }

    /// squid's port with the stock CONNECT rule too ([`SQUID_STRICT_PORT`]).
    pub fn squid_strict(mut self) -> Self {
        self.squid_strict = true;
        self.squid()
    }

    /// nginx on the origin host: TLS on 443 and 8448, plain HTTP on 80.
    pub fn nginx(mut self) -> Self {
        self.nginx = true;
        self
    }

    /// A DNS server (dnsmasq) on the homeserver host's loopback, answering A records from
    /// `hosts` (hosts-file lines) and the `srv` records (name, target, port), made the resolver
    /// of programs started with [`Testbed::run_in_hs`] / [`Testbed::hs_command`].
    pub fn dns(mut self, hosts: &str, srv: &[(&str, &str, u16)]) -> Self {
        let srv = srv
            .iter()
            .map(|(n, t, p)| (n.to_string(), t.to_string(), *p))
            .collect();
        self.dns = Some((hosts.to_owned(), srv));
        self
    }

    pub fn build(self) -> Result<Testbed> {
        Testbed::build(self)
    }
}

pub struct Testbed {
    pub name: String,
    pub dir: PathBuf,
    /// The test CA and the origin's certificate (for the origin's names and addresses).
    pub certs: Certs,
    pub pin_dir: PathBuf,
    /// Where the agent runs: None = the test process's own cgroup (outside the attached ones),
    /// Some(dir) = that cgroup directory.
    pub agent_cgroup: Option<PathBuf>,
    /// A bpffs mounted for this testbed alone (see [`Testbed::use_private_bpffs`]).
    private_bpffs: Option<PathBuf>,
    /// Environment variables the agents started from now on get (e.g. KRB5_CONFIG).
    pub agent_env: Vec<(String, String)>,
    // Drop order matters: processes first, then the cgroups, then the namespaces.
    /// The current (or last) agent run.
    agent: Option<Agent>,
    agent_runs: u32,
    dns: Option<Daemon>,
    /// How the homeserver host resolves names, when a test set it (see [`Testbed::use_host_view`]).
    view: Option<HostView>,
    /// /etc/netns/<hs>: the resolv.conf and hosts `ip netns exec` gives the homeserver host.
    hs_etc: Option<PathBuf>,
    squid: Option<Daemon>,
    nginx: Option<Daemon>,
    pub cgroup: Cgroup,
    /// A second intercepted cgroup (think: a bridge next to Synapse); attached only when a test
    /// passes it to the agent.
    pub cgroup_b: Cgroup,
    pub hs: Netns,
    pub proxy: Netns,
    pub origin: Netns,
    _switch: Netns,
}

impl Testbed {
    /// Namespaces and cgroups only; add peers with the builder's methods.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// What most tests use: squid (plain port) and nginx.
    pub fn standard() -> Self {
        Self::builder()
            .squid()
            .nginx()
            .build()
            .expect("building the test topology")
    }

    fn build(spec: Builder) -> Result<Self> {
        let id = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NAME_PREFIX}{}x{id}", std::process::id());
        let dir = std::env::temp_dir().join(format!("egress-testbed-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;

        let switch = Netns::create(format!("{name}-sw"))?;
        let hs = Netns::create(format!("{name}-hs"))?;
        let proxy = Netns::create(format!("{name}-px"))?;
        let origin = Netns::create(format!("{name}-or"))?;
        let cgroup = Cgroup::create(&format!("egress-test/{name}"))?;
        let cgroup_b = Cgroup::create(&format!("egress-test/{name}-b"))?;
        let origin_names: Vec<&str> = std::iter::once(ORIGIN_NAME)
            .chain(MATRIX_NAMES.iter().copied())
            .collect();
        let certs = peers::make_certs(&dir, "origin", &origin_names, &[ORIGIN_IP, ORIGIN_IP6], 2)?;
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
            view: None,
            agent_env: Vec::new(),
            squid: None,
            nginx: None,
            cgroup,
            cgroup_b,
            hs,
            proxy,
            origin,
            _switch: switch,
        };
        netns::create_bridge(&bed._switch)?;
        netns::attach_host(&bed._switch, &bed.hs, "p-hs", HS_IP, HS_IP6)?;
        netns::attach_host(&bed._switch, &bed.proxy, "p-px", PROXY_IP, PROXY_IP6)?;
        netns::attach_host(&bed._switch, &bed.origin, "p-or", ORIGIN_IP, ORIGIN_IP6)?;
        bed.origin.add_address(ORIGIN_IP_2)?;
        peers::install_packet_counter(&bed.origin, HS_IP, HS_IP6)?;

        if spec.squid {
            bed.start_squid(spec.squid_tls, spec.squid_strict, &spec.squid_hosts)?;
        }
        if spec.nginx {
            let mut nginx = peers::start_nginx(&bed.origin, &bed.dir, &bed.certs, &[443, 8448], 80)?;
            wait_listening(&bed.origin, &[443, 8448, 80], &mut nginx)?;
            bed.nginx = Some(nginx);
        }
        if let Some((hosts, srv)) = &spec.dns {
            bed.start_dns(hosts, srv)?;
        }
        Ok(bed)
    }

    fn start_squid(&mut self, tls: bool, strict: bool, extra_hosts: &str) -> Result<()> {
        let proxy_ips = [PROXY_IP, PROXY_IP6];
        let tls_certs = if tls {
            vec![
                (
                    SQUID_TLS_PORT,
                    peers::make_certs(&self.dir, "proxy", &["proxy.test"], &proxy_ips, 2)?,
                ),
                (
                    SQUID_TLS_EXPIRED_PORT,
                    peers::make_certs(&self.dir, "proxy-expired", &["proxy.test"], &proxy_ips, -1)?,
                ),
                (
                    SQUID_TLS_WRONG_NAME_PORT,
                    peers::make_certs(&self.dir, "proxy-wrong-name", &["other.test"], &[], 2)?,
                ),
            ]
        } else {
            Vec::new()
        };
        let https_ports: Vec<(u16, &Certs)> = tls_certs.iter().map(|(p, c)| (*p, c)).collect();
        let strict_port = strict.then_some(SQUID_STRICT_PORT);
        let mut squid = peers::start_squid(
            &self.proxy,
            &self.dir,
            &self.name,
            &SquidOptions {
                user: PROXY_USER,
                password: PROXY_PASSWORD,
                http_port: SQUID_PORT,
                https_ports: &https_ports,
                hosts: &format!(
                    "{ORIGIN_IP} {ORIGIN_NAME} {NAME_NOT_IN_CERT} {}\n{extra_hosts}",
                    MATRIX_NAMES.join(" ")
                ),
                strict_port,
                listen: None,
                negotiate: None,
                clock_offset: None,
            },
        )?;
        let ports: Vec<u16> = std::iter::once(SQUID_PORT)
            .chain(https_ports.iter().map(|(p, _)| *p))
            .chain(strict_port)
            .collect();
        wait_listening(&self.proxy, &ports, &mut squid)?;
        self.squid = Some(squid);
        Ok(())
    }

    fn start_dns(&mut self, hosts: &str, srv: &[SrvRecord]) -> Result<()> {
        let etc = PathBuf::from("/etc/netns").join(&self.hs.name);
        std::fs::create_dir_all(&etc)?;
        self.hs_etc = Some(etc.clone());
        std::fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
        std::fs::write(etc.join("hosts"), "127.0.0.1 localhost\n::1 localhost\n")?;
        let mut dns = peers::start_dnsmasq(&self.hs, &self.dir, hosts, srv)?;
        wait::ready("dnsmasq to listen on udp 53", wait::STARTUP, || {
            dns.check_alive()?;
            Ok(self.hs.is_listening_udp(53))
        })?;
        self.dns = Some(dns);
        Ok(())
    }

    /// Starts `program args...` as a daemon in `ns` (entered as `enter` says), logging to
    /// `dir/NAME.log`, and waits until it listens on every one of `ports`.
    pub fn start_daemon(
        &self,
        ns: &Netns,
        enter: Enter,
        name: &'static str,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        ports: &[u16],
    ) -> Result<Daemon> {
        let command = process::launch(Some(&ns.name), enter, None, program, args);
        let mut daemon = Daemon::spawn(name, command, &self.dir.join(format!("{name}.log")))?;
        wait_listening(ns, ports, &mut daemon)?;
        Ok(daemon)
    }

    /// `http://user:password@proxy:3128`, optionally with another password.
    pub fn proxy_url(&self, password: &str) -> String {
        format!("http://{PROXY_USER}:{password}@{PROXY_IP}:{SQUID_PORT}")
    }

    /// Starts `egress run` in the homeserver namespace, attached to the test cgroup, and waits
    /// until it reports ready. `args` come after the testbed's own (--cgroup, --bpffs-dir). A
    /// running agent is stopped first; the new run has a log of its own.
    pub fn start_agent(&mut self, args: &[&str]) -> Result<&Agent> {
        self.start_agent_bin(&egress_bin(), args)
    }

    /// [`Self::start_agent`] with another `egress` binary (an earlier release, for upgrades).
    pub fn start_agent_bin(&mut self, bin: &Path, args: &[&str]) -> Result<&Agent> {
        self.stop_agent();
        self.agent_runs += 1;
        let log = self.dir.join(format!("egress-{}.log", self.agent_runs));
        let cgroup = self.cgroup.path.to_string_lossy().into_owned();
        let pin_dir = self.pin_dir.to_string_lossy().into_owned();
        let mut all = vec!["run", "--cgroup", &cgroup, "--bpffs-dir", &pin_dir];
        // JSON, so that tests read records, not text (see `Agent::decisions`), unless a test
        // asks for a format itself.
        if !args.contains(&"--log-format") {
            all.extend(["--log-format", "json"]);
        }
        all.extend_from_slice(args);
        let mut command = process::launch(
            Some(&self.hs.name),
            self.view_or(Enter::Net),
            self.agent_cgroup.as_deref(),
            bin,
            &all,
        );
        command.env("EGRESS_LOG", "info,egress=debug");
        command.envs(self.agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let agent = Agent::start(command, log, &self.hs.name, &self.pin_dir)?;
        Ok(self.agent.insert(agent))
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
    pub fn start_agent_with(&mut self, extra: &[&str]) -> Result<&Agent> {
        let mut args = self.default_agent_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_agent(&refs)
    }

    pub fn start_default_agent(&mut self) -> Result<&Agent> {
        self.start_agent_with(&[])
    }

    /// The current agent run (or the last one, if it was stopped).
    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("no agent was started on this testbed")
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop_agent(&mut self) {
        if let Some(agent) = &mut self.agent {
            agent.stop();
        }
    }

    /// Kills the agent with SIGKILL, as a crash would.
    pub fn kill_agent(&mut self) {
        if let Some(agent) = &mut self.agent {
            agent.kill();
        }
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
        process::run(
            "mount",
            &["-t", "bpf", "-o", options, "bpf", &mount.to_string_lossy()],
        )?;
        self.pin_dir = mount.join("egress");
        self.private_bpffs = Some(mount.clone());
        Ok(mount)
    }

    /// `program args...` in the homeserver namespace through `ip netns exec` (so with the
    /// resolver of [`Builder::dns`]), in `cgroup` if given.
    pub fn hs_command(&self, cgroup: Option<&Path>, program: &str, args: &[&str]) -> Command {
        process::launch(
            Some(&self.hs.name),
            self.view_or(Enter::NetAndEtc),
            cgroup,
            program,
            args,
        )
    }

    /// From now on, the homeserver host resolves names as `resolution` says, with `hosts` in its
    /// hosts file and the builder's dnsmasq as its DNS server: for the agent started next, and
    /// for Synapse and clients started in the homeserver namespace. Replaces an earlier view.
    pub fn use_host_view(&mut self, resolution: Resolution, hosts: &str) -> Result<&HostView> {
        self.use_host_view_with(resolution, hosts, "127.0.0.1")
    }

    /// [`Self::use_host_view`] with another DNS server.
    pub fn use_host_view_with(
        &mut self,
        resolution: Resolution,
        hosts: &str,
        nameserver: &str,
    ) -> Result<&HostView> {
        self.view = None;
        let view = HostView::start(&self.hs, &self.dir, resolution, hosts, nameserver)?;
        Ok(self.view.insert(view))
    }

    pub fn host_view(&self) -> Option<&HostView> {
        self.view.as_ref()
    }

    /// `default`, or the host view's namespaces when a test set one.
    fn view_or(&self, default: Enter) -> Enter {
        self.view.as_ref().map_or(default, |view| Enter::View(view.pid))
    }

    /// Runs `program args...` in the homeserver namespace, outside the intercepted cgroups,
    /// with the resolver of [`Builder::dns`].
    pub fn run_in_hs(&self, program: &str, args: &[&str]) -> Result<ClientResult> {
        process::output(self.hs_command(None, program, args))
    }

    /// The command running `program args...` inside `cgroup`, in the homeserver namespace
    /// (only the network namespace: /sys and its cgroupfs stay visible).
    fn in_cgroup(&self, cgroup: &Path, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
        process::launch(
            Some(&self.hs.name),
            self.view_or(Enter::Net),
            Some(cgroup),
            program,
            args,
        )
    }

    /// Runs `program args...` inside the intercepted cgroup, in the homeserver namespace.
    pub fn run_in_cgroup(&self, program: &str, args: &[&str]) -> Result<ClientResult> {
        self.run_in(&self.cgroup.path, program, args)
    }

    /// Runs `program args...` inside cgroup `cgroup`, in the homeserver namespace.
    pub fn run_in(&self, cgroup: &Path, program: &str, args: &[&str]) -> Result<ClientResult> {
        process::output(self.in_cgroup(cgroup, program, args))
    }

    /// Starts `program args...` inside `cgroup`, in the homeserver namespace, with stdin,
    /// stdout and stderr piped, for clients that must stay connected while the test does other
    /// things. The cgroup's removal on drop kills it if the test does not.
    pub fn spawn_in(
        &self,
        cgroup: &Path,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) -> Result<Child> {
        Ok(self
            .in_cgroup(cgroup, program, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
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
        self.curl_from(&self.hs, cgroup, args)
    }

    /// [`Self::curl_in`] from network namespace `ns` (a container's, see
    /// [`Self::add_container_netns`]).
    pub fn curl_from(&self, ns: &Netns, cgroup: &Path, args: &[&str]) -> Result<ClientResult> {
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
        process::output(process::launch(
            Some(&ns.name),
            Enter::Net,
            Some(cgroup),
            "curl",
            &all,
        ))
    }

    /// A container's network namespace behind the homeserver host, made as a container engine
    /// makes one: a veth pair to the host, `10.249.INDEX.2/24` inside, the host routing and
    /// masquerading for it (so a packet that went direct reaches the origin from [`HS_IP`]).
    /// Deleted when the returned value drops.
    pub fn add_container_netns(&self, index: u8) -> Result<Netns> {
        let ct = Netns::create(format!("{}-c{index}", self.name))?;
        let host_side = format!("vc{index}");
        self.hs.ip(&[
            "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &ct.name,
        ])?;
        self.hs
            .ip(&["addr", "add", &format!("10.249.{index}.1/24"), "dev", &host_side])?;
        self.hs.ip(&["link", "set", &host_side, "up"])?;
        ct.ip(&["addr", "add", &format!("10.249.{index}.2/24"), "dev", "eth0"])?;
        ct.ip(&["link", "set", "eth0", "up"])?;
        ct.ip(&["route", "add", "default", "via", &format!("10.249.{index}.1")])?;
        self.hs.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let nat = "table ip egress_test_nat {
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    ip saddr 10.249.0.0/16 oifname \"eth0\" masquerade
  }
}
";
        process::run_with_input(
            "ip",
            &["netns", "exec", &self.hs.name, "nft", "-f", "-"],
            Some(nat),
        )?;
        Ok(ct)
    }

    /// A bare TCP connect from inside the cgroup. stdout is `connected`, or the error's
    /// errno name (`ECONNREFUSED`, `EPERM`, ...), so tests can tell refusal from denial.
    pub fn tcp_connect(&self, ip: &str, port: u16) -> Result<String> {
        self.tcp_connect_in(&self.cgroup.path, ip, port)
    }

    /// [`Self::tcp_connect`] from cgroup `cgroup`.
    pub fn tcp_connect_in(&self, cgroup: &Path, ip: &str, port: u16) -> Result<String> {
        let script = "import errno, socket, sys\n\
try:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), 5); print('connected')\n\
except OSError as e:\n    print(errno.errorcode.get(e.errno, str(e)))\n";
        let result = self.run_in(cgroup, "python3", &["-c", script, ip, &port.to_string()])?;
        Ok(result.stdout.trim().to_owned())
    }

    pub fn squid_access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("squid/access.log")).unwrap_or_default()
    }

    pub fn origin_access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nginx/access.log")).unwrap_or_default()
    }

    /// Waits until squid's access log satisfies `done` (squid writes a CONNECT line only when
    /// the tunnel closes); returns the log.
    pub fn wait_squid_log(&self, what: &str, done: impl Fn(&str) -> bool) -> Result<String> {
        wait::until(
            &format!("squid's access log: {what}"),
            wait::SHORT,
            || Ok(self.squid_access_log()),
            |l| done(l),
        )
    }

    /// Waits until nginx's access log satisfies `done`; returns the log.
    pub fn wait_origin_log(&self, what: &str, done: impl Fn(&str) -> bool) -> Result<String> {
        wait::until(
            &format!("the origin's access log: {what}"),
            wait::SHORT,
            || Ok(self.origin_access_log()),
            |l| done(l),
        )
    }

    /// Waits until squid's access log contains `needle`; returns the log.
    pub fn squid_logged(&self, needle: &str) -> Result<String> {
        self.wait_squid_log(needle, |l| l.contains(needle))
    }

    /// Waits until nginx's access log contains `needle`; returns the log.
    pub fn origin_logged(&self, needle: &str) -> Result<String> {
        self.wait_origin_log(needle, |l| l.contains(needle))
    }

    /// Packets that reached the origin host from the homeserver host's address, i.e. direct.
    pub fn direct_packets_at_origin(&self) -> Result<u64> {
        peers::read_packet_counter(&self.origin)
    }

    /// `egress args...` on the host, outside the namespaces.
    pub fn egress(&self, args: &[&str]) -> Result<ClientResult> {
        process::egress(args)
    }
}

/// Waits until something listens on every TCP port of `ports` in `ns`, or `daemon` has died.
fn wait_listening(ns: &Netns, ports: &[u16], daemon: &mut Daemon) -> Result<()> {
    wait::ready(
        &format!("{} to listen on {ports:?}", daemon.name),
        wait::STARTUP,
        || {
            daemon.check_alive()?;
            Ok(ports.iter().all(|p| ns.is_listening(*p)))
        },
    )
    .with_context(|| format!("log: {}", daemon.log.display()))
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.kill_agent();
        self.view.take();
        self.dns.take();
        if let Some(etc) = self.hs_etc.take() {
            let _ = std::fs::remove_dir_all(etc);
        }
        // Removing the pins detaches the programs from the (soon removed) cgroup.
        process::quietly(
            &egress_bin().to_string_lossy(),
            &["detach", "--bpffs-dir", &self.pin_dir.to_string_lossy()],
        );
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        if let Some(mount) = &self.private_bpffs {
            process::quietly("umount", &["-l", &mount.to_string_lossy()]);
        }
        if std::thread::panicking() {
            eprintln!("testbed {}: logs kept in {}", self.name, self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
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
/// (Also those of concurrent runs: only for `cargo xtask`, before it starts its own.)
pub fn sweep_leftovers() {
    // Container engines of crashed runs first: they hold namespaces and cgroups.
    // (dockerd, its containerd and the shims all name the testbed's docker directory.)
    process::quietly("pkill", &["-KILL", "-f", "egress-testbed-egt[0-9x]+/docker"]);
    peers::docker::sweep_v1_cgroups();
    if let Ok(list) = process::run("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(NAME_PREFIX) {
                process::quietly("ip", &["netns", "del", name]);
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
                process::quietly(
                    &egress_bin().to_string_lossy(),
                    &["detach", "--bpffs-dir", &entry.path().to_string_lossy()],
                );
            }
        }
    }
}
