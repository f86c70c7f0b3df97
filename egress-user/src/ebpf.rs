//! Loading, attaching and pinning the kernel programs, and reading their maps.
//!
//! Everything lives under one bpffs directory (default `/sys/fs/bpf/egress`): the maps, pinned
//! by name, and one pinned link per (cgroup, program). Pinned links stay attached when the agent
//! exits or crashes, so intercepted connects keep going to the (now closed) listener port and are
//! refused: no hole opens. A new agent reuses the pinned maps and swaps in its own links;
//! only `egress detach` removes the directory and with it the interception.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps, links::FdLink},
};
use egress_common::{AgentConfig, SockAddr, counter, maps, programs};
use ipnet::{IpNet, Ipv4Net};

/// The kernel programs, built by build.rs and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("EGRESS_EBPF_OBJECT"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const LINKS_DIR: &str = "links";

pub struct KernelSettings {
    pub pin_dir: PathBuf,
    pub listen_port: u16,
    pub agent_mark: u32,
    pub kernel_log: bool,
}

/// The loaded programs' maps, as the agent uses them while it runs.
pub struct Kernel {
    orig_dst: Mutex<HashMap<MapData, SockAddr, SockAddr>>,
    counters: PerCpuArray<MapData, u64>,
    deny4: LpmTrie<MapData, u32, u8>,
    bypass4: LpmTrie<MapData, u32, u8>,
    ebpf: Ebpf,
}

impl Kernel {
    /// Loads the programs (reusing maps pinned by an earlier agent) and writes the agent settings.
    pub fn load(settings: &KernelSettings) -> Result<Self> {
        ensure_bpffs(&settings.pin_dir)?;
        std::fs::create_dir_all(settings.pin_dir.join(LINKS_DIR))
            .with_context(|| format!("creating {}", settings.pin_dir.display()))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&settings.pin_dir)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (are you root, with a BPF-enabled kernel?)")?;

        let mut config: Array<_, AgentConfig> = Array::try_from(map_mut(&mut ebpf, maps::CONFIG)?)?;
        let flags = if settings.kernel_log {
            egress_common::FLAG_KERNEL_LOG
        } else {
            0
        };
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

        let connect4: &mut CgroupSockAddr = program(&mut ebpf, programs::CONNECT4)?.try_into()?;
        connect4.load().context("loading the connect4 program")?;
        let sock_ops: &mut SockOps = program(&mut ebpf, programs::SOCK_OPS)?.try_into()?;
        sock_ops.load().context("loading the sock_ops program")?;

        let orig_dst = HashMap::try_from(take_map(&mut ebpf, maps::ORIGINAL_DST)?)?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, maps::COUNTERS)?)?;
        let deny4 = LpmTrie::try_from(take_map(&mut ebpf, maps::DENY4)?)?;
        let bypass4 = LpmTrie::try_from(take_map(&mut ebpf, maps::BYPASS4)?)?;
        Ok(Self {
            orig_dst: Mutex::new(orig_dst),
            counters,
            deny4,
            bypass4,
            ebpf,
        })
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

    /// Attaches both programs to `cgroup`, replacing links left pinned by an earlier agent
    /// without a moment in which the cgroup is not intercepted.
    pub fn attach(&mut self, cgroup: &Path, pin_dir: &Path) -> Result<()> {
        let cgroup_id = cgroup_id(cgroup)?;
        let cgroup_fd = File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let links = pin_dir.join(LINKS_DIR);

        let connect4: &mut CgroupSockAddr = program(&mut self.ebpf, programs::CONNECT4)?.try_into()?;
        let id = connect4
            .attach(&cgroup_fd, CgroupAttachMode::Single)
            .with_context(|| format!("attaching connect4 to {}", cgroup.display()))?;
        let link: FdLink = connect4.take_link(id)?.try_into()?;
        replace_pinned_link(link, &links.join(format!("{cgroup_id}-connect4")))?;

        let sock_ops: &mut SockOps = program(&mut self.ebpf, programs::SOCK_OPS)?.try_into()?;
        let id = sock_ops
            .attach(&cgroup_fd, CgroupAttachMode::Single)
            .with_context(|| format!("attaching sock_ops to {}", cgroup.display()))?;
        let link: FdLink = sock_ops.take_link(id)?.try_into()?;
        replace_pinned_link(link, &links.join(format!("{cgroup_id}-sock_ops")))?;
        Ok(())
    }

    /// The destination the client asked for, for a connection accepted from `peer`.
    /// Each entry is read once and deleted.
    pub fn take_original_dst(&self, peer: SocketAddrV4) -> Option<SocketAddrV4> {
        let key = SockAddr::v4(u32::from(*peer.ip()).to_be(), peer.port());
        let mut map = self.orig_dst.lock().unwrap_or_else(|e| e.into_inner());
        let original = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(original.addr[0])),
            original.port,
        ))
    }

    /// Makes the kernel's deny and bypass tries hold exactly `deny` and `bypass` (IPv4 part).
    ///
    /// The tries are pinned and in use while this runs, so the order avoids any moment that is
    /// more permissive than either the old or the new policy: new denies go in before stale
    /// ones leave; stale bypasses leave before new ones go in.
    pub fn set_ranges(&mut self, deny: &[IpNet], bypass: &[IpNet]) -> Result<()> {
        let deny = v4_nets(deny);
        let bypass = v4_nets(bypass);
        if deny.len() + bypass.len() > 2 * egress_common::MAX_RANGES as usize {
            bail!(
                "too many address ranges for the kernel (at most {} each)",
                egress_common::MAX_RANGES
            );
        }
        insert_nets(&mut self.deny4, &deny).context("filling the kernel deny trie")?;
        remove_stale(&mut self.deny4, &deny)?;
        remove_stale(&mut self.bypass4, &bypass)?;
        insert_nets(&mut self.bypass4, &bypass).context("filling the kernel bypass trie")?;
        Ok(())
    }

    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>> {
        read_counters(&self.counters)
    }
}

fn v4_nets(nets: &[IpNet]) -> Vec<Ipv4Net> {
    nets.iter()
        .filter_map(|n| match n {
            IpNet::V4(v4) => Some(v4.trunc()),
            IpNet::V6(_) => None,
        })
        .collect()
}

fn v4_key(net: &Ipv4Net) -> Key<u32> {
    Key::new(u32::from(net.prefix_len()), u32::from(net.network()).to_be())
}

fn insert_nets(trie: &mut LpmTrie<MapData, u32, u8>, nets: &[Ipv4Net]) -> Result<()> {
    for net in nets {
        trie.insert(&v4_key(net), 1, 0)
            .with_context(|| format!("adding {net}"))?;
    }
    Ok(())
}

fn remove_stale(trie: &mut LpmTrie<MapData, u32, u8>, keep: &[Ipv4Net]) -> Result<()> {
    let keep: std::collections::HashSet<(u32, u32)> = keep
        .iter()
        .map(|n| (u32::from(n.prefix_len()), u32::from(n.network()).to_be()))
        .collect();
    let stale: Vec<Key<u32>> = trie
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| !keep.contains(&(k.prefix_len(), k.data())))
        .collect();
    for key in stale {
        trie.remove(&key)?;
    }
    Ok(())
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
        } else {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
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
    // The pin now holds the link; our fd may go.
    drop(pinned);
    Ok(())
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
