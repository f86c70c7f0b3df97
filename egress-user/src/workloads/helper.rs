//! The namespace helper: the one part of egress that stays privileged after the agent drops to
//! its user.
//!
//! Making a socket inside another network namespace takes `setns`, and so CAP_SYS_ADMIN, which
//! the agent must not keep. Before the drop, the daemon forks this helper. It keeps only what it
//! needs (CAP_SYS_ADMIN, CAP_SYS_PTRACE to open other processes' namespaces, CAP_NET_ADMIN for the
//! agent mark, CAP_NET_BIND_SERVICE for the listen port) and answers four requests over a
//! socketpair, handing sockets back with SCM_RIGHTS:
//!
//! - `Scan`: the network namespaces of the processes in the cgroups egress is attached to (found
//!   from the pinned links, so `egress attach` is covered too);
//! - `Listen`: egress's listeners inside one of those namespaces;
//! - `Connect`: a direct connection started inside one of them (never to loopback: a
//!   container's loopback-only services stay out of the agent's reach);
//! - `Forget`: let go of a namespace;
//! - `OpenInRoot`: the hosts file or resolv.conf of the process found in one of those
//!   namespaces, opened inside that process's root (symbolic links cannot leave it) and only if it
//!   is a regular file; the descriptor is handed over, and the agent reads it (what a container
//!   resolves from its hosts file, and which resolvers it uses);
//! - `ContainerName`: ask the container engine (whose socket only root may use) for the name of
//!   the container with a given id.
//!
//! A compromised agent can therefore reach only the namespaces of intercepted processes, which
//! are the ones it serves anyway, and gets no unbound socket made by root there (which could
//! join a root service's SO_REUSEPORT group). The helper exits with the agent (parent-death signal, and end
//! of file on its socket).

use std::{
    collections::BTreeMap,
    io::{IoSlice, IoSliceMut, Write},
    net::{Ipv6Addr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, sendmsg,
    socketpair,
};
use serde::{Deserialize, Serialize};

use crate::kernel;

/// Upper bound of one message: a scan of [`MAX_NAMESPACES`] namespaces (about 90 KB) fits, and
/// so does a datagram within the default socket buffer.
const MAX_MESSAGE: usize = 160 * 1024;
/// As many namespaces as the kernel's served-namespaces map holds.
pub const MAX_NAMESPACES: usize = egress_common::MAX_SERVED_NETNS as usize - 1;
/// Bound of one scan's walk through the attached cgroup trees.
const MAX_CGROUPS_WALKED: usize = 20_000;
/// A cgroup id whose directory could not be found is looked for again at most this often (a
/// whole-tree walk).
const RESOLVE_AGAIN: Duration = Duration::from_secs(10);

/// A network namespace, named by its nsfs inode number (what `ls -L -i /proc/PID/ns/net` and
/// `ip netns identify` show); unique while the namespace exists.
pub type NetnsId = u64;

#[derive(Serialize, Deserialize, Debug)]
enum Request {
    /// `skip`: cgroups (ids) whose processes are left alone (containers not followed).
    Scan {
        skip: Vec<u64>,
    },
    ContainerName {
        id: String,
    },
    Listen {
        netns: NetnsId,
    },
    Connect {
        netns: NetnsId,
        to: SocketAddr,
    },
    Forget {
        netns: NetnsId,
    },
    OpenInRoot {
        netns: NetnsId,
        file: RootFile,
    },
}

/// A file of a client's root the agent may read.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RootFile {
    Hosts,
    ResolvConf,
}

impl RootFile {
    fn path(self) -> &'static str {
        match self {
            RootFile::Hosts => "etc/hosts",
            RootFile::ResolvConf => "etc/resolv.conf",
        }
    }
}

#[derive(Serialize, Deserialize, Debug)]
enum Reply {
    /// The namespaces found, each with one process in it.
    Namespaces(Vec<(NetnsId, u32)>),
    /// Listeners on 127.0.0.1 and (if present) [::1] follow as file descriptors.
    Listening {
        cookie: u64,
        ipv6: bool,
    },
    /// One socket follows, its connect started (non-blocking).
    Connecting,
    Container(Option<String>),
    /// One descriptor follows: the file opened, read-only.
    Opened,
    Done,
    Failed(String),
}

/// A namespace's listeners, made inside it by the helper.
pub struct NetnsListeners {
    pub cookie: u64,
    pub v4: std::net::TcpListener,
    pub v6: Option<std::net::TcpListener>,
}

/// The agent's end: one request at a time, with one receive buffer.
pub struct Helper {
    socket: Mutex<(OwnedFd, Vec<u8>)>,
    pid: nix::unistd::Pid,
}

/// What the helper needs to know, fixed at start.
pub struct HelperSettings {
    pub pin_dir: PathBuf,
    pub engine_socket: PathBuf,
    pub listen_port: u16,
    pub agent_mark: u32,
}

impl Helper {
    /// Forks the helper. Must run while the process is still root and single-threaded.
    pub fn spawn(settings: HelperSettings) -> Result<Self> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .context("creating the namespace helper's socket pair")?;
        let own_netns = std::fs::File::open("/proc/self/ns/net").context("opening /proc/self/ns/net")?;
        let parent = nix::unistd::getpid();
        // SAFETY: the daemon forks before it starts any thread (see daemon::run); the child only
        // runs `serve` and leaves with _exit.
        match unsafe { nix::unistd::fork() }.context("forking the namespace helper")? {
            nix::unistd::ForkResult::Parent { child } => {
                drop(theirs);
                Ok(Self {
                    socket: Mutex::new((ours, vec![0; MAX_MESSAGE])),
                    pid: child,
                })
            }
            nix::unistd::ForkResult::Child => {
                drop(ours);
                // Never unwind into the daemon's code: a panic ends the helper like an error.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    child_main(theirs, own_netns, parent, settings)
                }));
                let code = match ran {
                    Ok(Ok(())) => 0,
                    Ok(Err(e)) => {
                        let _ = writeln!(std::io::stderr(), "egress namespace helper: {e:#}");
                        1
                    }
                    Err(_) => 1,
                };
                // SAFETY: leaves without running the parent's destructors (its maps and links
                // belong to the agent).
                unsafe { libc::_exit(code) }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    fn call(&self, request: &Request) -> Result<(Reply, Vec<OwnedFd>)> {
        let mut guard = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        let (socket, buffer) = &mut *guard;
        send(socket.as_fd(), request, &[])?;
        let (reply, fds): (Reply, _) = receive(socket.as_fd(), buffer)?.context(
            "the namespace helper is gone: namespaces it did not serve yet stay refused (see the log)",
        )?;
        if let Reply::Failed(why) = reply {
            bail!("{why}");
        }
        Ok((reply, fds))
    }

    /// The network namespaces of the intercepted processes, except the helper's own and those
    /// of processes in the cgroups `skip`.
    pub fn scan(&self, skip: Vec<u64>) -> Result<Vec<(NetnsId, u32)>> {
        match self.call(&Request::Scan { skip })? {
            (Reply::Namespaces(found), _) => Ok(found),
            (other, _) => bail!("namespace helper: unexpected reply {other:?}"),
        }
    }

    /// egress's listeners inside `netns` (one found by the last scan).
    pub fn listen(&self, netns: NetnsId) -> Result<NetnsListeners> {
        let (reply, mut fds) = self.call(&Request::Listen { netns })?;
        let Reply::Listening { cookie, ipv6 } = reply else {
            bail!("namespace helper: unexpected reply {reply:?}");
        };
        if fds.len() != 1 + usize::from(ipv6) {
            bail!(
                "namespace helper: {} listeners instead of {}",
                fds.len(),
                1 + usize::from(ipv6)
            );
        }
        let v6 = ipv6.then(|| std::net::TcpListener::from(fds.pop().expect("counted")));
        let v4 = std::net::TcpListener::from(fds.pop().expect("counted"));
        Ok(NetnsListeners { cookie, v4, v6 })
    }

    /// A TCP connection to `to` started inside `netns` (non-blocking, connect in progress),
    /// for a direct connection that must leave from the application's namespace.
    pub fn connect(&self, netns: NetnsId, to: SocketAddr) -> Result<std::net::TcpStream> {
        let (_, mut fds) = self.call(&Request::Connect { netns, to })?;
        let fd = fds.pop().context("namespace helper: no socket")?;
        Ok(std::net::TcpStream::from(fd))
    }

    /// The name of container `id` (64 hex digits), None if the engine has no such container.
    pub fn container_name(&self, id: &str) -> Result<Option<String>> {
        match self.call(&Request::ContainerName { id: id.to_owned() })? {
            (Reply::Container(name), _) => Ok(name),
            (other, _) => bail!("namespace helper: unexpected reply {other:?}"),
        }
    }

    /// `file` of the process the last scan found in `netns`, opened read-only inside its root.
    pub fn open_in_root(&self, netns: NetnsId, file: RootFile) -> Result<std::fs::File> {
        let (_, mut fds) = self.call(&Request::OpenInRoot { netns, file })?;
        let fd = fds.pop().context("namespace helper: no descriptor")?;
        Ok(std::fs::File::from(fd))
    }

    pub fn forget(&self, netns: NetnsId) -> Result<()> {
        self.call(&Request::Forget { netns }).map(drop)
    }
}

fn send<T: Serialize>(socket: std::os::fd::BorrowedFd<'_>, message: &T, fds: &[RawFd]) -> Result<()> {
    let bytes = serde_json::to_vec(message)?;
    if bytes.len() > MAX_MESSAGE {
        bail!("namespace helper message of {} bytes is too long", bytes.len());
    }
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .context("writing to the namespace helper's socket")?;
    Ok(())
}

/// One message and the descriptors that came with it; `None` at end of file.
fn receive<T: for<'de> Deserialize<'de>>(
    socket: std::os::fd::BorrowedFd<'_>,
    buffer: &mut [u8],
) -> Result<Option<(T, Vec<OwnedFd>)>> {
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(buffer)];
        let message = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("reading from the namespace helper's socket")?;
        let mut fds = Vec::new();
        for cmsg in message.cmsgs().context("reading passed descriptors")? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: descriptors just received are ours alone.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        if message.flags.contains(MsgFlags::MSG_TRUNC) || message.flags.contains(MsgFlags::MSG_CTRUNC) {
            bail!("namespace helper message truncated");
        }
        (message.bytes, fds)
    };
    if len == 0 {
        return Ok(None);
    }
    let value = serde_json::from_slice(&buffer[..len]).context("namespace helper message")?;
    Ok(Some((value, fds)))
}

/// The helper's side.
struct HelperState {
    settings: HelperSettings,
    own_netns: std::fs::File,
    own_netns_id: NetnsId,
    /// Namespaces of the last scan: one process in each, and the namespace once opened.
    known: BTreeMap<NetnsId, (u32, Option<std::fs::File>)>,
    /// Attached cgroups by id, as far as found, and when the missing ones were last looked for.
    cgroup_paths: BTreeMap<u64, PathBuf>,
    last_resolve: Option<Instant>,
}

fn child_main(
    socket: OwnedFd,
    own_netns: std::fs::File,
    parent: nix::unistd::Pid,
    settings: HelperSettings,
) -> Result<()> {
    // Die with the agent. (Checked after setting it: the agent may already be gone.)
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    if nix::unistd::getppid() != parent {
        return Ok(());
    }
    close_inherited(socket.as_raw_fd(), own_netns.as_raw_fd())?;
    kernel::privileges::restrict_helper()?;
    let own_netns_id = own_netns.metadata()?.ino();
    let mut state = HelperState {
        settings,
        own_netns,
        own_netns_id,
        known: BTreeMap::new(),
        cgroup_paths: BTreeMap::new(),
        last_resolve: None,
    };
    let mut buffer = vec![0u8; MAX_MESSAGE];
    while let Some((request, _)) = receive::<Request>(socket.as_fd(), &mut buffer)? {
        let (reply, fds) = match state.handle(&request) {
            Ok(answer) => answer,
            Err(e) => (Reply::Failed(format!("{e:#}")), Vec::new()),
        };
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        // A reply that cannot be sent (too long) becomes an error the agent gets; only a
        // broken socket (the agent gone) ends the helper.
        if let Err(e) = send(socket.as_fd(), &reply, &raw) {
            send(socket.as_fd(), &Reply::Failed(format!("{e:#}")), &[])?;
        }
    }
    Ok(())
}

/// Closes every descriptor the agent had open when it forked, but `keep`: the helper must not
/// hold the agent's maps, links or listeners.
fn close_inherited(keep_a: RawFd, keep_b: RawFd) -> Result<()> {
    let entries = std::fs::read_dir("/proc/self/fd").context("listing inherited descriptors")?;
    let fds: Vec<RawFd> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if fd > 2 && fd != keep_a && fd != keep_b {
            // SAFETY: closing descriptors this process will never use again; the directory
            // iterator's own descriptor is already closed.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

impl HelperState {
    fn handle(&mut self, request: &Request) -> Result<(Reply, Vec<OwnedFd>)> {
        match *request {
            Request::Scan { ref skip } => Ok((Reply::Namespaces(self.scan(skip)?), Vec::new())),
            Request::ContainerName { ref id } => {
                if super::containers::container_id_in(id) != Some(id.as_str()) {
                    bail!("not a container id: {id:?}");
                }
                let engine = super::engine::Engine::new(&self.settings.engine_socket);
                Ok((Reply::Container(engine.inspect(id)?.map(|c| c.name)), Vec::new()))
            }
            Request::Listen { netns } => {
                let ns = self.open(netns)?;
                let (cookie, fds) = self.inside(&ns, || listeners(&self.settings))?;
                let ipv6 = fds.len() == 2;
                Ok((Reply::Listening { cookie, ipv6 }, fds))
            }
            Request::Connect { netns, to } => {
                refuse_local(to)?;
                let ns = self.open(netns)?;
                let mark = self.settings.agent_mark;
                let socket = self.inside(&ns, || start_connect(to, mark))?;
                Ok((Reply::Connecting, vec![socket]))
            }
            Request::Forget { netns } => {
                self.known.remove(&netns);
                Ok((Reply::Done, Vec::new()))
            }
            Request::OpenInRoot { netns, file } => {
                let Some((pid, _)) = self.known.get(&netns) else {
                    bail!("network namespace {netns} is not one of an intercepted process");
                };
                Ok((Reply::Opened, vec![open_in_root(*pid, netns, file.path())?]))
            }
        }
    }

    /// The namespace `netns` found by a scan, opened through its process, which must still be
    /// in it (a pid can be reused).
    fn open(&mut self, netns: NetnsId) -> Result<std::fs::File> {
        let Some((pid, opened)) = self.known.get_mut(&netns) else {
            bail!("network namespace {netns} is not one of an intercepted process");
        };
        if opened.is_none() {
            let path = format!("/proc/{pid}/ns/net");
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            if file.metadata()?.ino() != netns {
                bail!("process {pid} left network namespace {netns}");
            }
            *opened = Some(file);
        }
        Ok(opened.as_ref().expect("just opened").try_clone()?)
    }

    /// Runs `make` with this thread inside `ns`, and comes back whatever happens. If it cannot
    /// come back, the helper exits rather than make anything in the wrong namespace.
    fn inside<T>(&self, ns: &std::fs::File, make: impl FnOnce() -> Result<T>) -> Result<T> {
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the network namespace")?;
        let made = make();
        if let Err(e) = nix::sched::setns(&self.own_netns, nix::sched::CloneFlags::CLONE_NEWNET) {
            let _ = writeln!(
                std::io::stderr(),
                "egress namespace helper: cannot return to its own network namespace: {e}"
            );
            // SAFETY: immediate exit; nothing else may run in the wrong namespace.
            unsafe { libc::_exit(1) };
        }
        made
    }

    /// Every namespace already served is kept ahead of new ones, so that a process creating
    /// namespaces by the thousand cannot push the others out (its own beyond the bound stay
    /// refused).
    fn scan(&mut self, skip: &[u64]) -> Result<Vec<(NetnsId, u32)>> {
        // An error keeps the agent's state as it is (no namespace is dropped for it).
        let ids = kernel::pinned_cgroups(&self.settings.pin_dir).context("reading the pinned links")?;
        // A cgroup removed and made again at the same path is another cgroup, not attached.
        self.cgroup_paths
            .retain(|id, path| ids.contains(id) && std::fs::metadata(path).is_ok_and(|m| m.ino() == *id));
        let missing: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| !self.cgroup_paths.contains_key(id))
            .collect();
        if !missing.is_empty() && self.last_resolve.is_none_or(|t| t.elapsed() >= RESOLVE_AGAIN) {
            self.last_resolve = Some(Instant::now());
            for id in missing {
                if let Some(path) = super::cgroups::cgroup_path_by_id(id) {
                    self.cgroup_paths.insert(id, path);
                }
            }
        }
        let mut present: BTreeMap<NetnsId, u32> = BTreeMap::new();
        for root in self.cgroup_paths.values() {
            for pid in procs_under(root, skip) {
                if let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                    && meta.ino() != self.own_netns_id
                {
                    present.entry(meta.ino()).or_insert(pid);
                }
            }
        }
        let (kept, new): (Vec<_>, Vec<_>) = present
            .into_iter()
            .partition(|(netns, _)| self.known.get(netns).is_some_and(|(_, f)| f.is_some()));
        let found: BTreeMap<NetnsId, u32> = kept.into_iter().chain(new).take(MAX_NAMESPACES).collect();
        // Keep what was opened for namespaces still present; forget the rest.
        let mut known = BTreeMap::new();
        for (netns, pid) in &found {
            let opened = self.known.remove(netns).and_then(|(_, f)| f);
            known.insert(*netns, (*pid, opened));
        }
        self.known = known;
        Ok(found.into_iter().collect())
    }
}

/// Opens `path` (relative) as process `pid`, which must still be in network namespace `netns`,
/// sees it: resolved inside its root directory, so that no symbolic link there can name a file
/// of the host (openat2 with RESOLVE_IN_ROOT, Linux 5.6); first as a path only, so that nothing
/// but a regular file is ever opened (a device would act on being opened), then for reading.
fn open_in_root(pid: u32, netns: NetnsId, path: &str) -> Result<OwnedFd> {
    // One handle on the process: the checks and the root are the same process's, even if the
    // pid is reused meanwhile.
    let process = std::fs::File::open(format!("/proc/{pid}")).with_context(|| format!("process {pid}"))?;
    let ns = openat2(process.as_raw_fd(), "ns/net", libc::O_PATH | libc::O_CLOEXEC, 0)
        .with_context(|| format!("the network namespace of process {pid}"))?;
    if std::fs::File::from(ns).metadata()?.ino() != netns {
        bail!("process {pid} left network namespace {netns}");
    }
    let root = openat2(
        process.as_raw_fd(),
        "root",
        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    )
    .with_context(|| format!("the root directory of process {pid}"))?;
    let found = openat2(
        root.as_raw_fd(),
        path,
        libc::O_PATH | libc::O_CLOEXEC,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )
    .with_context(|| format!("/{path} in the root of process {pid}"))?;
    let found = std::fs::File::from(found);
    if !found.metadata()?.is_file() {
        bail!("/{path} of process {pid} is not a regular file");
    }
    use std::os::unix::fs::OpenOptionsExt;
    // Reopened through the path-only descriptor: the same file, now for reading.
    let readable = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", found.as_raw_fd()))
        .with_context(|| format!("reading /{path} of process {pid}"))?;
    Ok(readable.into())
}

/// openat2(2) of `path` under the directory `dir`.
fn openat2(dir: RawFd, path: &str, flags: i32, resolve: u64) -> std::io::Result<OwnedFd> {
    let name = std::ffi::CString::new(path)?;
    // SAFETY: open_how is plain data; all-zero is a valid value to fill in.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = resolve;
    // SAFETY: openat2 with a directory descriptor, a NUL-terminated path and an open_how of the
    // size passed; the returned descriptor (if any) is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor openat2 just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Every process in the cgroup `root` and below (at most [`MAX_CGROUPS_WALKED`] cgroups: a
/// delegated subtree may grow without bound).
fn procs_under(root: &Path, skip: &[u64]) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    let mut walked = 0;
    while let Some(dir) = dirs.pop() {
        walked += 1;
        if walked > MAX_CGROUPS_WALKED {
            break;
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter(|e| e.metadata().is_ok_and(|m| !skip.contains(&m.ino())))
                    .map(|e| e.path()),
            );
        }
    }
    pids
}

/// egress's listeners in the current namespace: 127.0.0.1 and, where loopback has IPv6, [::1],
/// with the agent mark, as the kernel requires of a redirect target.
fn listeners(settings: &HelperSettings) -> Result<(u64, Vec<OwnedFd>)> {
    use socket2::{Domain, Socket, Type};
    // A namespace's loopback is down until someone brings it up (containers have it up).
    let listen = |addr: SocketAddr| -> std::io::Result<OwnedFd> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_mark(settings.agent_mark)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    };
    let port = settings.listen_port;
    let v4 = listen(SocketAddr::from(([127, 0, 0, 1], port)))
        .with_context(|| format!("listening on 127.0.0.1:{port} (taken by a process in the namespace?)"))?;
    let cookie = kernel::netns_cookie(&v4)?;
    let mut fds = vec![v4];
    match listen(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
        Ok(v6) => fds.push(v6),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(e)
                .with_context(|| format!("listening on [::1]:{port}: taken by a process in the namespace"));
        }
        // No IPv6 on this loopback: IPv6 connects there are refused by the kernel.
        Err(_) => {}
    }
    Ok((cookie, fds))
}

/// Direct connections go to what policy allowed, never to the namespace's own loopback or to
/// nowhere.
fn refuse_local(to: SocketAddr) -> Result<()> {
    let ip = match to.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || to.port() == 0 {
        bail!("refusing a direct connection to {to} inside a container's namespace");
    }
    Ok(())
}

/// A non-blocking connect to `to`, started in the current namespace, with the agent mark.
fn start_connect(to: SocketAddr, mark: u32) -> Result<OwnedFd> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    socket.set_mark(mark)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&to.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e).with_context(|| format!("connecting to {to}")),
    }
    Ok(socket.into())
}
