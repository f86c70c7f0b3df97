//! Loading, attaching and pinning the kernel programs, and reading their maps.
//!
//! Everything lives under one bpffs directory (default `/sys/fs/bpf/egress`): the maps, pinned
//! by name, and one pinned link per (cgroup, program). Pinned links stay attached when the agent
//! exits or crashes, so intercepted connects keep going to the (now closed) listener port and are
//! refused: no hole opens. A new agent reuses the pinned maps and swaps in its own links;
//! only `egress detach` removes the directory and with it the interception.

pub mod privileges;
pub mod requirements;
pub mod verdict;

use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, CgroupSockopt, SockOps,
        links::FdLink,
    },
};
use egress_common::{AF_INET, AF_INET6};
use egress_common::{
    AgentConfig, ConnKey, DnsPeer, NETNS_OWN, NETNS_SERVED, SockAddr, SynthName, counter, maps, programs,
};
use ipnet::IpNet;

/// The kernel programs, built by build.rs and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("EGRESS_EBPF_OBJECT"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const LINKS_DIR: &str = "links";
/// The cgroup/sock_addr programs, all attached to every target cgroup (besides sock_ops).
const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::SENDMSG4,
    programs::SENDMSG6,
    programs::RECVMSG4,
    programs::RECVMSG6,
];
/// The same for a selectively attached cgroup (a container engine's parent, see
/// `workloads::scopes`).
const SCOPED_SOCK_ADDR_PROGRAMS: [&str; 8] = [
    programs::CONNECT4_SCOPED,
    programs::CONNECT6_SCOPED,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::SENDMSG4_SCOPED,
    programs::SENDMSG6_SCOPED,
    programs::RECVMSG4,
    programs::RECVMSG6,
];
/// The packet programs on every attached cgroup: they copy the DNS messages of sockets the
/// sock_addr programs noted (see `dns::watch`), and drop TCP packets carrying source routes.
const PACKET_PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    (programs::SKB_INGRESS, CgroupSkbAttachType::Ingress),
    (programs::SKB_EGRESS, CgroupSkbAttachType::Egress),
];
/// cgroup/setsockopt, for full and selective attachments.
const SETSOCKOPT_PROGRAMS: [&str; 2] = [programs::SETSOCKOPT, programs::SETSOCKOPT_SCOPED];

/// How a cgroup is attached: everything in it intercepted, or only the followed containers
/// among its children.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    Full,
    Scope,
}

pub struct KernelSettings {
    pub pin_dir: PathBuf,
    pub listen_port: u16,
    pub agent_mark: u32,
    pub kernel_log: bool,
    /// Synthetic DNS: the intercepted processes' DNS goes to the agent.
    pub dns_synthetic: bool,
    /// The id of the agent's own cgroup (0 if unknown): in namespaces other than its own, only
    /// its tasks' marked sockets are believed.
    pub agent_cgroup: u64,
}

/// The deny and bypass tries, updated together.
struct Ranges {
    deny4: LpmTrie<MapData, u32, u8>,
    bypass4: LpmTrie<MapData, u32, u8>,
    deny6: LpmTrie<MapData, [u32; 4], u8>,
    bypass6: LpmTrie<MapData, [u32; 4], u8>,
}

/// The loaded programs' maps, as the agent uses them while it runs.
pub struct Kernel {
    /// Original destinations bound to the connections the agent accepted, by socket cookie.
    accepted_dst: Mutex<HashMap<MapData, u64, SockAddr>>,
    /// The socket storage that marks egress's own listeners.
    listeners: Mutex<aya::maps::SkStorage<MapData, u32>>,
    /// sock_ops on the agent's own cgroup, where its listeners' accepted sockets are: it binds
    /// original destinations to them. Held, not pinned: it serves only this agent's listeners.
    own_sock_ops: Mutex<Option<FdLink>>,
    /// The network namespace of the agent's listeners (its cookie).
    netns: u64,
    served: Mutex<HashMap<MapData, u64, u32>>,
    /// The deny and bypass sets this agent last put in force, to go back to if a change fails
    /// halfway (before the first, a failure stops the start anyway).
    applied: Mutex<Option<(Vec<IpNet>, Vec<IpNet>)>>,
    counters: PerCpuArray<MapData, u64>,
    ranges: Mutex<Ranges>,
    /// File descriptors of every link pinned under pin_dir, by pin name: while the agent runs,
    /// losing the pins (bpffs unmounted) must not detach anything.
    held_links: Mutex<std::collections::BTreeMap<std::ffi::OsString, std::os::fd::OwnedFd>>,
    pin_dir: PathBuf,
    /// Maps the agent hands to their owners elsewhere (the selective-attachment maps to
    /// `workloads::scopes`), until they take them.
    handed: Mutex<std::collections::BTreeMap<&'static str, aya::maps::Map>>,
    /// The DNS messages of intercepted processes, until `dns::Watch` takes them.
    dns_events: Mutex<Option<RingBuf<MapData>>>,
    /// The synthetic DNS mappings, until `dns::server` takes them.
    synthetic: Mutex<Option<HashMap<MapData, u32, SynthName>>>,
    /// Synthetic DNS: the sources of the queries the kernel redirected, until `dns` takes them.
    dns_peers: Mutex<Option<DnsPeers>>,
    ebpf: Ebpf,
}

impl Kernel {
    /// Loads the programs (reusing maps pinned by an earlier agent), writes the agent settings,
    /// and marks `netns` (the cookie of the namespace the agent listens in) as served.
    pub fn load(settings: &KernelSettings, netns: u64) -> Result<Self> {
        let mut ebpf = load_object(&settings.pin_dir)?;
        let mut config: Array<_, AgentConfig> = Array::try_from(map_mut(&mut ebpf, maps::CONFIG)?)?;
        let mut flags = 0;
        if settings.kernel_log {
            flags |= egress_common::FLAG_KERNEL_LOG;
        }
        if settings.dns_synthetic {
            flags |= egress_common::FLAG_DNS_SYNTHETIC;
        }
        config.set(
            0,
            AgentConfig {
                ready: 1,
                agent_mark: settings.agent_mark,
                listen_port: settings.listen_port,
                _pad: 0,
                flags,
            },
            0,
        )?;

        // What a dead agent served and left: its listeners died with it, and namespaces it served
        // get listeners again from this agent's scan. Until then their connects are refused.
        let mut served: HashMap<_, u64, u32> = HashMap::try_from(take_map(&mut ebpf, maps::SERVED_NETNS)?)?;
        let old: Vec<u64> = served.keys().filter_map(Result::ok).collect();
        for cookie in old {
            let _ = served.remove(&cookie);
        }
        served
            .insert(netns, NETNS_SERVED | NETNS_OWN, 0)
            .context("recording the agent's network namespace for the kernel programs")?;
        let mut agent_cgroup: Array<_, u64> = Array::try_from(map_mut(&mut ebpf, maps::AGENT_CGROUP)?)?;
        agent_cgroup
            .set(0, settings.agent_cgroup, 0)
            .context("recording the agent's cgroup for the kernel programs")?;
        // Entries left by connections a dead agent never accepted: none of them can be taken
        // by this agent's listeners, which do not listen yet.
        let mut orig_dst: HashMap<_, ConnKey, SockAddr> =
            HashMap::try_from(take_map(&mut ebpf, maps::ORIGINAL_DST)?)?;
        let stale: Vec<ConnKey> = orig_dst.keys().filter_map(Result::ok).collect();
        for key in stale {
            let _ = orig_dst.remove(&key);
        }
        let mut accepted_dst: HashMap<_, u64, SockAddr> =
            HashMap::try_from(take_map(&mut ebpf, maps::ACCEPTED_DST)?)?;
        let stale: Vec<u64> = accepted_dst.keys().filter_map(Result::ok).collect();
        for key in stale {
            let _ = accepted_dst.remove(&key);
        }
        let listeners = aya::maps::SkStorage::try_from(take_map(&mut ebpf, maps::LISTENERS)?)?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, maps::COUNTERS)?)?;
        let deny4 = LpmTrie::try_from(take_map(&mut ebpf, maps::DENY4)?)?;
        let bypass4 = LpmTrie::try_from(take_map(&mut ebpf, maps::BYPASS4)?)?;
        let deny6 = LpmTrie::try_from(take_map(&mut ebpf, maps::DENY6)?)?;
        let bypass6 = LpmTrie::try_from(take_map(&mut ebpf, maps::BYPASS6)?)?;
        let mut handed = std::collections::BTreeMap::new();
        for name in [maps::SCOPES, maps::SCOPED, maps::FOLLOWED] {
            handed.insert(name, take_map(&mut ebpf, name)?);
        }
        let dns_events = RingBuf::try_from(take_map(&mut ebpf, maps::DNS_EVENTS)?)?;
        let synthetic = HashMap::try_from(take_map(&mut ebpf, maps::SYNTHETIC)?)?;
        let dns_peers = HashMap::try_from(take_map(&mut ebpf, maps::DNS_PEERS)?)?;
        remove_obsolete_pins(&settings.pin_dir);
        Ok(Self {
            handed: Mutex::new(handed),
            dns_events: Mutex::new(Some(dns_events)),
            synthetic: Mutex::new(Some(synthetic)),
            dns_peers: Mutex::new(Some(DnsPeers { map: dns_peers })),
            accepted_dst: Mutex::new(accepted_dst),
            listeners: Mutex::new(listeners),
            own_sock_ops: Mutex::default(),
            netns,
            served: Mutex::new(served),
            applied: Mutex::default(),
            counters,
            ranges: Mutex::new(Ranges {
                deny4,
                bypass4,
                deny6,
                bypass6,
            }),
            held_links: Mutex::default(),
            pin_dir: settings.pin_dir.clone(),
            ebpf,
        })
    }

    /// The map `name` (one of the maps handed over, see [`Self::handed`]), once.
    pub fn take_map(&self, name: &str) -> Result<aya::maps::Map> {
        self.handed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .with_context(|| format!("map {name} was taken already"))
    }

    /// The ring buffer of DNS messages (once).
    pub fn take_dns_events(&self) -> Option<RingBuf<MapData>> {
        self.dns_events.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// The sources of the DNS queries the kernel redirects to the agent (once).
    pub fn take_dns_peers(&self) -> Option<DnsPeers> {
        self.dns_peers.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Marks `socket` as egress's own listener (TCP) or DNS socket (UDP): the kernel redirects
    /// only to sockets so marked, which takes access to the map (root's, or this agent's).
    pub fn mark_listener(&self, socket: &impl std::os::fd::AsRawFd) -> Result<()> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(socket, 1, 0)
            .context("marking egress's listener for the kernel programs")
    }

    /// Attaches sock_ops to the agent's own cgroup, where the sockets its listeners accept are:
    /// it binds each redirected connection's original destination to the accepted socket as it
    /// is established. Held by this agent, not pinned: it serves only its listeners.
    pub fn attach_own_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        let cgroup_fd =
            File::open(cgroup).with_context(|| format!("opening the agent's cgroup {}", cgroup.display()))?;
        let sock_ops: &mut SockOps = program(&mut self.ebpf, programs::SOCK_OPS_ACCEPT)?.try_into()?;
        let id = sock_ops
            .attach(&cgroup_fd, CgroupAttachMode::Single)
            .with_context(|| format!("attaching sock_ops to the agent's cgroup {}", cgroup.display()))?;
        let link: FdLink = sock_ops.take_link(id)?.try_into()?;
        *self.own_sock_ops.lock().unwrap_or_else(|e| e.into_inner()) = Some(link);
        Ok(())
    }

    /// The pinned synthetic DNS mappings (once).
    pub fn take_synthetic(&self) -> Option<HashMap<MapData, u32, SynthName>> {
        self.synthetic.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Gives the kernel-side aya-log records to the `log` facade (and so to tracing).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        match aya_log::EbpfLogger::init(&mut self.ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::debug!("kernel log unavailable: {e}");
                None
            }
        }
    }

    /// Attaches the programs to `cgroup`, replacing links left pinned by an earlier agent
    /// without a moment in which the cgroup is not intercepted.
    pub fn attach(&mut self, cgroup: &Path, pin_dir: &Path, how: Attachment) -> Result<()> {
        attach_programs(&mut self.ebpf, cgroup, pin_dir, how)
    }
}

/// Synthetic DNS: the sources of the queries the kernel redirected to the agent's DNS listener,
/// each while the socket that sent it lives.
pub struct DnsPeers {
    map: HashMap<MapData, DnsPeer, u64>,
}

impl DnsPeers {
    /// Whether the kernel redirected a DNS query from `peer` in namespace `netns` to the agent,
    /// from a socket that still exists: anyone may send to the agent's DNS port, and anyone may
    /// bind a port once its socket is gone; only these are answered.
    pub fn redirected(&self, netns: u64, peer: SocketAddr) -> bool {
        let peer = DnsPeer {
            netns,
            addr: to_sock_addr(peer),
            _pad: 0,
        };
        self.map.get(&peer, 0).is_ok()
    }
}

/// Loads the object, reusing (or creating) the maps pinned under `pin_dir`, and its programs.
fn load_object(pin_dir: &Path) -> Result<Ebpf> {
    ensure_bpffs(pin_dir)?;
    std::fs::create_dir_all(pin_dir.join(LINKS_DIR))
        .with_context(|| format!("creating {}", pin_dir.display()))?;
    check_pinned_layout(pin_dir)?;
    let listeners = pin_dir.join(maps::LISTENERS);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        // A BTF map: pinned by path (shared with `egress attach` and restarts alike).
        .map_pin_path(maps::LISTENERS, listeners.as_path())
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (are you root, with a BPF-enabled kernel?)")?;
    for name in SCOPED_SOCK_ADDR_PROGRAMS.into_iter().chain(SOCK_ADDR_PROGRAMS) {
        let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?.try_into()?;
        if prog.fd().is_err() {
            prog.load().with_context(|| format!("loading program {name}"))?;
        }
    }
    for (name, _) in PACKET_PROGRAMS {
        let prog: &mut CgroupSkb = program(&mut ebpf, name)?.try_into()?;
        prog.load().with_context(|| format!("loading program {name}"))?;
    }
    for name in SETSOCKOPT_PROGRAMS {
        let prog: &mut CgroupSockopt = program(&mut ebpf, name)?.try_into()?;
        prog.load().with_context(|| format!("loading program {name}"))?;
    }
    let release: &mut CgroupSock = program(&mut ebpf, programs::SOCK_RELEASE)?.try_into()?;
    release
        .load()
        .with_context(|| format!("loading program {}", programs::SOCK_RELEASE))?;
    for name in [programs::SOCK_OPS, programs::SOCK_OPS_ACCEPT] {
        let sock_ops: &mut SockOps = program(&mut ebpf, name)?.try_into()?;
        sock_ops
            .load()
            .with_context(|| format!("loading program {name}"))?;
    }
    Ok(ebpf)
}

/// Refuses to load over maps pinned by an egress whose map layout differs: the programs would
/// not load against them, or would read them wrongly.
fn check_pinned_layout(pin_dir: &Path) -> Result<()> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).context("parsing the embedded eBPF object")?;
    for (name, map) in &object.maps {
        let pin = pin_dir.join(name);
        if !pin.exists() {
            continue;
        }
        let info =
            aya::maps::MapInfo::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
        let pinned = (info.key_size(), info.value_size(), info.max_entries());
        let ours = (map.key_size(), map.value_size(), map.max_entries());
        if pinned != ours {
            bail!(
                "{} was pinned by an egress version with another map layout (key, value, \
                 entries: {pinned:?}, this version: {ours:?}); stop the intercepted services, \
                 run `egress detach --bpffs-dir {}` and start egress again",
                pin.display(),
                pin_dir.display()
            );
        }
    }
    Ok(())
}

/// Maps that earlier versions pinned and this one no longer uses.
fn remove_obsolete_pins(pin_dir: &Path) {
    for name in maps::OBSOLETE {
        let _ = std::fs::remove_file(pin_dir.join(name));
    }
}

/// The cookie of the network namespace `socket` lives in (`SO_NETNS_COOKIE`, Linux 5.14).
pub fn netns_cookie(socket: &impl std::os::fd::AsFd) -> Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a local u64 of the given length.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket.as_fd()),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context("reading the network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14 or later)");
    }
    Ok(cookie)
}

/// The cookie of `socket` (`SO_COOKIE`, Linux 4.12): what the kernel programs call it.
pub fn socket_cookie(socket: &impl std::os::fd::AsFd) -> std::io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a local u64 of the given length.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket.as_fd()),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// A running instance's programs, loaded again over its pinned maps (for `egress attach`).
pub struct Instance {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Instance {
    /// The instance pinned at `pin_dir`, which a running `egress run` configured.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        if !pin_dir.join(maps::CONFIG).exists() {
            bail!(
                "no egress instance at {}: start `egress run` first",
                pin_dir.display()
            );
        }
        let mut ebpf = load_object(pin_dir)?;
        let config: Array<_, AgentConfig> = Array::try_from(map_mut(&mut ebpf, maps::CONFIG)?)?;
        if config.get(&0, 0)?.ready == 0 {
            bail!(
                "the egress instance at {} was never configured by `egress run`",
                pin_dir.display()
            );
        }
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// One of the instance's (pinned) maps.
    pub fn take_map(&mut self, name: &str) -> Result<aya::maps::Map> {
        take_map(&mut self.ebpf, name)
    }

    /// Attaches the programs to `cgroup`; its processes are served by the running agent from
    /// then on, and nothing already connected is touched.
    pub fn attach(&mut self, cgroup: &Path, how: Attachment) -> Result<()> {
        attach_programs(&mut self.ebpf, cgroup, &self.pin_dir, how)
    }
}

/// Whether a bpf filesystem is mounted on `pin_dir` or one of its parents (from
/// /proc/self/mountinfo, which needs no permission on the mount itself).
fn pins_mounted(pin_dir: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    mountinfo.lines().any(|line| {
        let Some((left, right)) = line.split_once(" - ") else {
            return false;
        };
        right.split_whitespace().next() == Some("bpf")
            && left
                .split_whitespace()
                .nth(4)
                .is_some_and(|mount_point| pin_dir.starts_with(mount_point))
    })
}

/// `egress detach --cgroup`: removes the links of one cgroup; returns how many were removed.
pub fn detach_cgroup(pin_dir: &Path, cgroup: &Path) -> Result<usize> {
    let id = cgroup_id(cgroup)?;
    let prefix = format!("{id}-");
    let mut removed = 0;
    for entry in std::fs::read_dir(pin_dir.join(LINKS_DIR))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            detach_pinned(&entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

fn attach_programs(ebpf: &mut Ebpf, cgroup: &Path, pin_dir: &Path, how: Attachment) -> Result<()> {
    let cgroup_id = cgroup_id(cgroup)?;
    let cgroup_fd = File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let links = pin_dir.join(LINKS_DIR);

    let names = match how {
        Attachment::Full => SOCK_ADDR_PROGRAMS,
        Attachment::Scope => SCOPED_SOCK_ADDR_PROGRAMS,
    };
    for name in names {
        let prog: &mut CgroupSockAddr = program(ebpf, name)?.try_into()?;
        let id = prog
            .attach(&cgroup_fd, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        let link: FdLink = prog.take_link(id)?.try_into()?;
        replace_pinned_link(link, &links.join(format!("{cgroup_id}-{name}")))?;
    }

    for (name, attach_type) in PACKET_PROGRAMS {
        let prog: &mut CgroupSkb = program(ebpf, name)?.try_into()?;
        let id = prog
            .attach(&cgroup_fd, attach_type, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        let link: FdLink = prog.take_link(id)?.try_into()?;
        replace_pinned_link(link, &links.join(format!("{cgroup_id}-{name}")))?;
    }

    let setsockopt = match how {
        Attachment::Full => programs::SETSOCKOPT,
        Attachment::Scope => programs::SETSOCKOPT_SCOPED,
    };
    let prog: &mut CgroupSockopt = program(ebpf, setsockopt)?.try_into()?;
    let link = link_create(
        std::os::fd::AsFd::as_fd(prog.fd()?),
        &cgroup_fd,
        BPF_CGROUP_SETSOCKOPT,
    )
    .with_context(|| format!("attaching {setsockopt} to {}", cgroup.display()))?;
    replace_pinned_link_fd(link, &links.join(format!("{cgroup_id}-{setsockopt}")))?;

    let release: &mut CgroupSock = program(ebpf, programs::SOCK_RELEASE)?.try_into()?;
    let id = release
        .attach(&cgroup_fd, CgroupAttachMode::Single)
        .with_context(|| format!("attaching {} to {}", programs::SOCK_RELEASE, cgroup.display()))?;
    let link: FdLink = release.take_link(id)?.try_into()?;
    replace_pinned_link(
        link,
        &links.join(format!("{cgroup_id}-{}", programs::SOCK_RELEASE)),
    )?;

    let sock_ops: &mut SockOps = program(ebpf, programs::SOCK_OPS)?.try_into()?;
    let id = sock_ops
        .attach(&cgroup_fd, CgroupAttachMode::Single)
        .with_context(|| format!("attaching sock_ops to {}", cgroup.display()))?;
    let link: FdLink = sock_ops.take_link(id)?.try_into()?;
    replace_pinned_link(link, &links.join(format!("{cgroup_id}-{}", programs::SOCK_OPS)))?;

    // Links of programs an earlier version had in their place, and of the other kind of
    // attachment: the new ones are in, the old ones go.
    let other = match how {
        Attachment::Full => programs::SETSOCKOPT_SCOPED,
        Attachment::Scope => programs::SETSOCKOPT,
    };
    for obsolete in programs::OBSOLETE.into_iter().chain([other]) {
        let pin = links.join(format!("{cgroup_id}-{obsolete}"));
        if pin.exists() {
            detach_pinned(&pin)?;
        }
    }
    Ok(())
}

/// `bpf_attach_type` of cgroup/setsockopt (aya 0.14 gives no pinnable link for it).
const BPF_CGROUP_SETSOCKOPT: u32 = 22;

/// A BPF link of `prog` to `cgroup` (BPF_LINK_CREATE).
fn link_create(
    prog: std::os::fd::BorrowedFd<'_>,
    cgroup: &File,
    attach_type: u32,
) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    #[repr(C)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        _rest: [u64; 4],
    }
    const BPF_LINK_CREATE: libc::c_long = 28;
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
        _rest: [0; 4],
    };
    // SAFETY: attr is a zero-padded bpf_attr prefix for BPF_LINK_CREATE.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &attr,
            std::mem::size_of::<LinkCreateAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_LINK_CREATE");
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

impl Kernel {
    /// Takes a file descriptor for every pinned link not held yet (also those `egress attach`
    /// added), and lets go of those whose pin was removed deliberately (`egress detach`, which
    /// detaches them). If the whole pin directory is gone (bpffs unmounted), keeps them all:
    /// interception then lasts as long as this agent runs. Returns false in that case.
    pub fn keep_links(&self) -> bool {
        let links_dir = self.pin_dir.join(LINKS_DIR);
        let entries = match std::fs::read_dir(&links_dir) {
            Ok(entries) => entries,
            // bpffs mounted mode 700 (as systemd does): we cannot look, so keep what we hold.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return pins_mounted(&self.pin_dir),
            Err(_) => return false,
        };
        let pinned: std::collections::BTreeSet<std::ffi::OsString> = entries
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| !n.to_string_lossy().ends_with("_new"))
            .collect();
        let mut held = self.held_links.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|name, _| pinned.contains(name));
        for name in pinned {
            if let std::collections::btree_map::Entry::Vacant(slot) = held.entry(name)
                && let Ok(fd) = obj_get(&links_dir.join(slot.key()))
            {
                slot.insert(fd);
            }
        }
        true
    }

    /// Whether `cgroup` has egress's connect4 link: by its pin, or, where the pins cannot be
    /// looked at (bpffs mode 700 and the agent no longer root), by the links it holds.
    pub fn is_attached(&self, cgroup: &Path) -> bool {
        let Ok(id) = cgroup_id(cgroup) else { return false };
        self.has_link(&format!("{id}-{}", programs::CONNECT4))
    }

    /// Whether the cgroup `id` is attached as a scope itself (a nested scope is not).
    pub fn scope_linked(&self, id: u64) -> bool {
        self.has_link(&format!("{id}-{}", programs::CONNECT4_SCOPED))
    }

    fn has_link(&self, name: &str) -> bool {
        match std::fs::metadata(self.pin_dir.join(LINKS_DIR).join(name)) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => self
                .held_links
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(std::ffi::OsStr::new(&name)),
            Err(_) => false,
        }
    }

    /// Whether the pins are still there (false once bpffs was unmounted under us).
    pub fn pins_present(&self) -> bool {
        match std::fs::metadata(self.pin_dir.join(LINKS_DIR)) {
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => pins_mounted(&self.pin_dir),
            Err(_) => false,
        }
    }

    /// The cookie of the agent's own network namespace.
    pub fn own_netns(&self) -> u64 {
        self.netns
    }

    /// The destination the client asked for, for the accepted connection `socket`: bound to it
    /// in the kernel as it was established (see `egress_sock_ops`). Read once and deleted; a
    /// connection the kernel did not redirect there (a direct connect to the listener, from
    /// anywhere) has none.
    pub fn take_original_dst(&self, socket: &impl std::os::fd::AsFd) -> Option<SocketAddr> {
        let cookie = socket_cookie(socket).ok()?;
        let mut map = self.accepted_dst.lock().unwrap_or_else(|e| e.into_inner());
        let original = map.get(&cookie, 0).ok()?;
        let _ = map.remove(&cookie);
        from_sock_addr(&original)
    }

    /// Lets the kernel redirect connects made in network namespace `netns`, where an egress
    /// listener now listens. (Cookies are never reused, and `load` cleared what an earlier agent
    /// left, so no stale original destination can be waiting for this namespace.)
    pub fn serve_netns(&self, netns: u64) -> Result<()> {
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(netns, NETNS_SERVED, 0)
            .context("adding to the served-namespaces map (full?)")
    }

    /// Connects made in `netns` are refused again (its listener is about to close). Entries of
    /// connections still in flight there go with their sockets (sock_ops), or age out (LRU).
    pub fn unserve_netns(&self, netns: u64) {
        let _ = self
            .served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&netns);
    }

    /// Makes the kernel's deny and bypass tries hold exactly `deny` and `bypass`. If that fails
    /// halfway, the sets last put in force are restored, so that the kernel never runs a policy
    /// the agent does not.
    pub fn set_ranges(&self, deny: &[IpNet], bypass: &[IpNet]) -> Result<()> {
        let mut r = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        match write_ranges(&mut r, deny, bypass) {
            Ok(()) => {
                *applied = Some((deny.to_vec(), bypass.to_vec()));
                Ok(())
            }
            Err(e) => {
                if let Some((deny, bypass)) = &*applied
                    && let Err(restore) = write_ranges(&mut r, deny, bypass)
                {
                    tracing::error!("restoring the previous kernel address sets failed too: {restore:#}");
                }
                Err(e)
            }
        }
    }

    /// Uses each kind of map access the running agent needs (read, write, delete), as the
    /// agent is now: after the privilege drop, on kernels or security policies that deny bpf()
    /// to unprivileged processes, every connection would fail.
    pub fn check_access(&self) -> Result<()> {
        self.counters().context("reading the decision counters")?;
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.netns, NETNS_SERVED | NETNS_OWN, 0)
            .context("writing the served-namespaces map")?;
        // No socket has cookie 0.
        match self
            .accepted_dst
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&0)
        {
            // No entry has this key: the deletion must fail with ENOENT, not EPERM.
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(e).context("deleting from the original-destination map"),
        }
    }

    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        read_counters(&self.counters)
    }
}

/// The tries are pinned and in use while this runs, so the order avoids any moment that is more
/// permissive than either the old or the new policy: new denies go in before stale ones leave;
/// stale bypasses leave before new ones go in.
fn write_ranges(r: &mut Ranges, deny: &[IpNet], bypass: &[IpNet]) -> Result<()> {
    let (deny4, deny6) = trie_keys(deny)?;
    let (bypass4, bypass6) = trie_keys(bypass)?;
    replace_keys(&mut r.deny4, &deny4, true).context("updating the kernel deny set")?;
    replace_keys(&mut r.deny6, &deny6, true).context("updating the kernel deny set")?;
    replace_keys(&mut r.bypass4, &bypass4, false).context("updating the kernel bypass set")?;
    replace_keys(&mut r.bypass6, &bypass6, false).context("updating the kernel bypass set")?;
    Ok(())
}

type TrieKeys = (Vec<Key<u32>>, Vec<Key<[u32; 4]>>);

/// LPM keys for `nets`, split by family.
fn trie_keys(nets: &[IpNet]) -> Result<TrieKeys> {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for net in nets {
        match net.trunc() {
            IpNet::V4(n) => v4.push(Key::new(n.prefix_len().into(), u32::from(n.network()).to_be())),
            IpNet::V6(n) => v6.push(Key::new(n.prefix_len().into(), ip6_words(n.network()))),
        }
    }
    if v4.len().max(v6.len()) > egress_common::MAX_RANGES as usize {
        bail!(
            "too many address ranges for the kernel (at most {} per family)",
            egress_common::MAX_RANGES
        );
    }
    Ok((v4, v6))
}

/// Makes `trie` hold exactly `keys`: inserting first and then removing when `insert_first`
/// (deny sets), removing stale keys first otherwise (bypass sets).
fn replace_keys<K: aya::Pod + PartialEq>(
    trie: &mut LpmTrie<MapData, K, u8>,
    keys: &[Key<K>],
    insert_first: bool,
) -> Result<()> {
    let same = |a: &Key<K>, b: &Key<K>| a.prefix_len() == b.prefix_len() && a.data() == b.data();
    let stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !keys.iter().any(|n| same(n, k)))
        .collect();
    if !insert_first {
        for key in &stale {
            trie.remove(key)?;
        }
    }
    for key in keys {
        trie.insert(key, 1, 0)?;
    }
    if insert_first {
        for key in &stale {
            trie.remove(key)?;
        }
    }
    Ok(())
}

/// An IPv6 address as the kernel's four network-order words.
fn ip6_words(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
}

fn to_sock_addr(addr: SocketAddr) -> SockAddr {
    match addr {
        SocketAddr::V4(a) => SockAddr::v4(u32::from(*a.ip()).to_be(), a.port()),
        SocketAddr::V6(a) => SockAddr::v6(ip6_words(*a.ip()), a.port()),
    }
}

pub(crate) fn from_sock_addr(addr: &SockAddr) -> Option<SocketAddr> {
    match addr.family {
        AF_INET => Some(SocketAddr::new(
            Ipv4Addr::from(u32::from_be(addr.addr[0])).into(),
            addr.port,
        )),
        AF_INET6 => {
            let mut octets = [0u8; 16];
            for (i, word) in addr.addr.iter().enumerate() {
                octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
            }
            Some(SocketAddr::new(Ipv6Addr::from(octets).into(), addr.port))
        }
        _ => None,
    }
}

fn read_counters(map: &PerCpuArray<MapData, u64>) -> Result<Vec<(&'static str, u64)>> {
    (0..counter::COUNT)
        .map(|i| {
            let per_cpu = map.get(&i, 0)?;
            Ok((counter::NAMES[i as usize], per_cpu.iter().sum()))
        })
        .collect()
}

/// Counters of a pinned instance, for `egress status` (no agent needed).
pub fn pinned_counters(pin_dir: &Path) -> Result<Vec<(&'static str, u64)>> {
    let path = pin_dir.join(maps::COUNTERS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    read_counters(&PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?)
}

/// IDs of the cgroups with pinned links under `pin_dir`.
pub fn pinned_cgroups(pin_dir: &Path) -> Result<Vec<u64>> {
    let mut ids: Vec<u64> = std::fs::read_dir(pin_dir.join(LINKS_DIR))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.split_once('-')?.0.parse().ok())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Removes every pinned object under `pin_dir`; the links detach as their last reference goes.
pub fn detach(pin_dir: &Path) -> Result<bool> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    remove_pins(pin_dir)?;
    Ok(true)
}

fn remove_pins(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            remove_pins(&path)?;
        } else if path.parent().is_some_and(|p| p.ends_with(LINKS_DIR)) {
            detach_pinned(&path)?;
        } else {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

/// [`replace_pinned_link`] for a link made by [`link_create`].
fn replace_pinned_link_fd(link: std::os::fd::OwnedFd, path: &Path) -> Result<()> {
    use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
    #[repr(C)]
    struct ObjPinAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_PIN: libc::c_long = 6;
    let mut staging = path.as_os_str().to_owned();
    staging.push("_new");
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let c_path = std::ffi::CString::new(staging.as_os_str().as_bytes())?;
    let attr = ObjPinAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: link.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_OBJ_PIN; the path outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &attr,
            std::mem::size_of::<ObjPinAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("pinning link at {}", staging.display()));
    }
    std::fs::rename(&staging, path).with_context(|| format!("pinning link at {}", path.display()))
}

/// Pins `link` at `path`. An existing pin there is replaced atomically (rename over it), so the
/// old link detaches only once the new one is attached and pinned.
fn replace_pinned_link(link: FdLink, path: &Path) -> Result<()> {
    // bpffs refuses names with a dot.
    let mut staging = path.as_os_str().to_owned();
    staging.push("_new");
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let pinned = link
        .pin(&staging)
        .with_context(|| format!("pinning link at {}", staging.display()))?;
    std::fs::rename(&staging, path).with_context(|| format!("pinning link at {}", path.display()))?;
    // The pin holds the link; a running agent also holds it (see `Kernel::keep_links`).
    drop(pinned);
    Ok(())
}

/// Opens the BPF object pinned at `path` (BPF_OBJ_GET).
fn obj_get(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_OBJ_GET; the path outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr,
            std::mem::size_of::<ObjGetAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches the link pinned at `path` for good, whoever else holds a descriptor to it (a
/// running agent does), then removes the pin. BPF_LINK_DETACH; aya 0.14 does not expose it.
fn detach_pinned(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    const BPF_LINK_DETACH: libc::c_long = 34;
    if let Ok(fd) = obj_get(path) {
        let link_fd = fd.as_raw_fd() as u32;
        // SAFETY: bpf(BPF_LINK_DETACH, attr, size) reads link_detach.link_fd only.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, &link_fd, 4u32) };
        // A link whose cgroup is gone is already defunct: nothing left to detach.
        if rc < 0 {
            tracing::debug!(
                "detaching {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

fn fs_magic(path: &Path) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a properly sized out-buffer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(buf.f_type as i64)
}

/// The pin directory must be on a bpffs; mount one on /sys/fs/bpf if it is missing there.
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if fs_magic(parent).ok() == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    let default_root = Path::new("/sys/fs/bpf");
    if parent != default_root {
        bail!(
            "--bpffs-dir {}: its parent directory is not on a bpf filesystem",
            pin_dir.display()
        );
    }
    std::fs::create_dir_all(default_root)?;
    // SAFETY: static NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting bpffs on /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        );
    }
    tracing::info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}

/// Checks that `path` is a cgroup v2 directory and returns its id (the directory's inode).
pub fn cgroup_id(path: &Path) -> Result<u64> {
    let magic = fs_magic(path).with_context(|| format!("cgroup {}", path.display()))?;
    if magic != CGROUP2_SUPER_MAGIC {
        bail!("cgroup {}: not a cgroup v2 directory", path.display());
    }
    Ok(std::fs::metadata(path)?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_addresses_round_trip_through_the_kernel_layout() {
        for text in [
            "10.248.0.30:443",
            "[2001:db8::1]:8448",
            "[::1]:1001",
            "127.0.0.1:1",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(from_sock_addr(&to_sock_addr(addr)), Some(addr), "{text}");
        }
        // The kernel stores addresses in network byte order: first octet first in memory.
        let v4 = to_sock_addr("10.0.0.1:80".parse().unwrap());
        assert_eq!(v4.addr[0].to_ne_bytes(), [10, 0, 0, 1]);
        let v6 = to_sock_addr("[2001:db8::1]:80".parse().unwrap());
        assert_eq!(v6.addr[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(v6.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
    }
}
