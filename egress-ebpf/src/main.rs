//! egress kernel programs.
//!
//! `egress_connect4` / `egress_connect6` (cgroup/connect4|6) see every connect() of processes in
//! the attached cgroups. For TCP, loopback destinations and the agent's own (marked) sockets are
//! left alone; IP-only policy is applied at once (deny trie: EPERM; bypass trie: untouched);
//! everything else is rewritten to the agent's listener on loopback, and the original destination
//! is remembered under the socket's cookie for the socket's lifetime. A redirect happens only when
//! the caller's network namespace is one egress serves and the socket listening there on egress's
//! port is egress's own (it carries the agent mark, which takes CAP_NET_ADMIN in that namespace to
//! set); otherwise the connect fails with EPERM, so a squatter on the port never gets anything.
//!
//! `egress_sock_ops` runs when the kernel has chosen the local port (TCP_CONNECT_CB) and files the
//! original destination under the network namespace and the connection's local address. When the
//! connection is established at the agent's listener (PASSIVE_ESTABLISHED_CB, on the accepted
//! socket: the program is attached to the agent's own cgroup too), the destination moves to that
//! accepted socket's cookie, which the agent reads with SO_COOKIE: from then on it belongs to the
//! connection, and no later socket can claim it, whatever the timing. When the client socket
//! closes, whatever is still filed under its address goes with it.
//!
//! `egress_setsockopt` refuses, on intercepted TCP sockets, the options that would send packets
//! elsewhere than connect() decided (IPv6 routing headers and destination options, IPv4 source
//! routes), and `egress_skb_out` drops TCP packets that carry them anyway (set where the hook does
//! not run: 32-bit processes' setsockopt skips it).
//!
//! `egress_getpeername4|6` keep the redirect invisible: the application's getpeername() returns
//! the address it connected to, not the agent's.
//!
//! DNS is observed, never changed: connect4/6 and `egress_sendmsg4|6` note the UDP sockets that
//! send to port 53, and `egress_dns_in|out` (cgroup_skb) copy those sockets' DNS messages into a
//! ring buffer for the agent, which learns from the answers which names stand behind the
//! addresses the application then dials.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_CURRENT_NETNS, BPF_NOEXIST, BPF_F_NO_PREALLOC, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_LISTEN, bpf_sock, bpf_sock_addr,
        bpf_sock_tuple,
    },
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_sk_fullsock, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release, bpf_sk_storage_get,
        bpf_skb_load_bytes,
    },
    macros::{btf_map, cgroup_skb, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{SkBuffContext, SockAddrContext, SockContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::debug;
use egress_common::{
    AF_INET, AF_INET6, AgentConfig, ConnKey, ContainerName, DNS_ANSWER, DNS_CAPTURE, DNS_QUERY,
    DNS_RING_BYTES, DnsEvent, DnsPeer, DnsPeerSlot, DnsRedirect, DNS_PEERS_PER_SOCKET, FLAG_DNS_SYNTHETIC, FLAG_KERNEL_LOG, MAX_DNS_REDIRECTS,
    MAX_DNS_SOCKETS, MAX_FOLLOWED, MAX_RANGES, MAX_SCOPED, MAX_SCOPES, MAX_SERVED_NETNS, MAX_SYNTHETIC,
    NETNS_OWN, SCOPE_INTERCEPT, SCOPE_PASS, Scope, SockAddr, SynthName, counter,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u8 = 17;
const DNS_PORT: u16 = 53;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP_CLOSE: u32 = 7;
const IPPROTO_TCP_U8: u8 = 6;
/// Socket option levels and names (linux/in.h, linux/in6.h) that change where a TCP packet goes.
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const IP_OPTIONS: i32 = 4;
const IPV6_2292HOPOPTS: i32 = 3;
const IPV6_2292DSTOPTS: i32 = 4;
const IPV6_2292RTHDR: i32 = 5;
const IPV6_2292PKTOPTIONS: i32 = 6;
const IPV6_HOPOPTS: i32 = 54;
const IPV6_RTHDRDSTOPTS: i32 = 55;
const IPV6_RTHDR: i32 = 57;
const IPV6_DSTOPTS: i32 = 59;
/// IPv6 extension headers: hop-by-hop, routing, destination options.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// IPv6 extension headers walked before giving up (and dropping).
const MAX_EXTENSION_HEADERS: u32 = 8;
/// `skb->ifindex` of the loopback device, in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const LOOPBACK4: u32 = u32::from_be_bytes([127, 0, 0, 1]).to_be();
const LOOPBACK6: [u32; 4] = [0, 0, 0, 1u32.to_be()];
const MAPPED_PREFIX: u32 = 0xffffu32.to_be();

/// connect() return values for cgroup/connect programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[map(name = "EGRESS_CONFIG")]
static CONFIG: Array<AgentConfig> = Array::pinned(1, 0);

#[map(name = "EGRESS_COUNTS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::SLOTS, 0);

/// Socket cookie -> original destination, from connect until the socket closes.
#[map(name = "EGRESS_SOCKET_DST")]
static SOCKET_DST: LruHashMap<u64, SockAddr> = LruHashMap::pinned(262144, 0);

/// Network namespace + client-side local address of a redirected connection -> original
/// destination, from connect until the connection is established at the agent (then it moves to
/// `ACCEPTED_DST`) or the client socket closes. Unique while the client socket exists, which
/// holds that address; another namespace cannot write or read this one's.
#[map(name = "EGRESS_CONN_DST")]
static ORIG_DST: LruHashMap<ConnKey, SockAddr> = LruHashMap::pinned(65536, 0);

/// Cookie of the socket the agent accepted -> the original destination of its connection. The
/// agent deletes each entry once read (SO_COOKIE); the accepted socket's close otherwise.
#[map(name = "EGRESS_ACCEPTED_DST")]
static ACCEPTED_DST: LruHashMap<u64, SockAddr> = LruHashMap::pinned(65536, 0);

/// egress's own listeners (and synthetic DNS sockets), marked by the agent: the kernel redirects
/// only to a socket that carries this, which no other process can give a socket (it takes access
/// to this map, root's). Pinned by the loader (`map_pin_path`), shared with `egress attach`.
#[btf_map]
static EGRESS_LISTENERS: SkStorage<u32> = SkStorage::new();

/// Network namespaces (by cookie) in which egress listens; the agent fills it.
#[map(name = "EGRESS_NETNS")]
static SERVED_NETNS: HashMap<u64, u32> = HashMap::pinned(MAX_SERVED_NETNS, 0);

#[map(name = "EGRESS_AGENTCG")]
static AGENT_CGROUP: Array<u64> = Array::pinned(1, 0);

/// Selectively attached cgroups and the classification of their children (see `scope_verdict`).
#[map(name = "EGRESS_SCOPES")]
static SCOPES: Array<Scope> = Array::pinned(MAX_SCOPES, 0);

#[map(name = "EGRESS_SCOPED")]
static SCOPED: HashMap<u64, u32> = HashMap::pinned(MAX_SCOPED, 0);

/// Written and read by the agent only (see egress_common::maps::FOLLOWED).
#[map(name = "EGRESS_FOLLOW")]
static FOLLOWED: HashMap<ContainerName, u32> = HashMap::pinned(MAX_FOLLOWED, 0);

/// Socket cookie -> network namespace cookie, for the UDP sockets of intercepted processes that
/// sent to port 53 (see `note_dns_socket`).
#[map(name = "EGRESS_DNS_SOCKS")]
static DNS_SOCKETS: LruHashMap<u64, u64> = LruHashMap::pinned(MAX_DNS_SOCKETS, 0);

#[map(name = "EGRESS_DNS_EVENTS")]
static DNS_EVENTS: RingBuf = RingBuf::pinned(DNS_RING_BYTES, 0);

/// Synthetic DNS: the sockets whose queries went to the agent, and where they were going.
#[map(name = "EGRESS_DNS_REDIR")]
static DNS_REDIRECTS: LruHashMap<u64, DnsRedirect> = LruHashMap::pinned(MAX_DNS_REDIRECTS, 0);

/// Synthetic DNS: the sources of redirected queries (-> the sending socket's cookie), written by
/// `egress_skb_out` as they leave; the agent answers only these. `egress_sock_release` removes a
/// socket's entries with the socket, before its port is free for anyone else. Plain hash maps, not
/// LRU: an entry evicted from the slots but not from the peers would outlive its socket.
#[map(name = "EGRESS_DNS_PEERS")]
static DNS_PEERS: HashMap<DnsPeer, u64> = HashMap::pinned(MAX_DNS_REDIRECTS, 0);

#[map(name = "EGRESS_DNS_PEER_SLOTS")]
static DNS_PEER_SLOTS: HashMap<DnsPeerSlot, DnsPeer> = HashMap::pinned(MAX_DNS_REDIRECTS, 0);

/// Written and read by the agent only (see egress_common::maps::SYNTHETIC); allocated on use.
#[map(name = "EGRESS_SYNTH")]
static SYNTHETIC: HashMap<u32, SynthName> = HashMap::pinned(MAX_SYNTHETIC, BPF_F_NO_PREALLOC);

/// Filled by the agent from its policy. Keys are addresses in network byte order.
#[map(name = "EGRESS_DENY4")]
static DENY4: LpmTrie<u32, u8> = LpmTrie::pinned(MAX_RANGES, 0);

#[map(name = "EGRESS_BYPASS4")]
static BYPASS4: LpmTrie<u32, u8> = LpmTrie::pinned(MAX_RANGES, 0);

#[map(name = "EGRESS_DENY6")]
static DENY6: LpmTrie<[u32; 4], u8> = LpmTrie::pinned(MAX_RANGES, 0);

#[map(name = "EGRESS_BYPASS6")]
static BYPASS6: LpmTrie<[u32; 4], u8> = LpmTrie::pinned(MAX_RANGES, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer can race this increment.
        unsafe { *slot += 1 };
    }
}

/// The verifier only allows 4-byte loads of the ctx's IPv6 words; read them one by one.
#[inline(always)]
fn read_ip6(words: *const [u32; 4]) -> [u32; 4] {
    let w = words as *const u32;
    unsafe {
        [
            read_volatile(w),
            read_volatile(w.add(1)),
            read_volatile(w.add(2)),
            read_volatile(w.add(3)),
        ]
    }
}

#[inline(always)]
fn write_ip6(words: *mut [u32; 4], value: [u32; 4]) {
    let w = words as *mut u32;
    unsafe {
        write_volatile(w, value[0]);
        write_volatile(w.add(1), value[1]);
        write_volatile(w.add(2), value[2]);
        write_volatile(w.add(3), value[3]);
    }
}

#[inline(always)]
fn is_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == MAPPED_PREFIX
}

/// What connect4/6 decided, before the rewrite.
enum Verdict {
    Allow,
    Deny,
    /// To the agent's listener on `port`, which must carry `mark`. Plain values, not a
    /// reference to the config: the verifier refuses pointers packed into an enum.
    Redirect {
        original: SockAddr,
        port: u16,
        mark: u32,
    },
}

#[inline(always)]
fn is_tcp(sa: &bpf_sock_addr) -> bool {
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        count(counter::PASS_NOT_TCP);
        return false;
    }
    count(counter::CONNECT_SEEN);
    true
}

/// Whether the calling task is in the agent's own cgroup (only a privileged process can move
/// a task there).
#[inline(always)]
fn is_agent_task() -> bool {
    match AGENT_CGROUP.get(0) {
        Some(&id) => id != 0 && unsafe { bpf_get_current_cgroup_id() } == id,
        None => false,
    }
}

/// The agent settings, or returns at once from the calling function: Deny when no agent has
/// configured the programs (they never let anything through unconfigured) or the caller's
/// network namespace is not one egress serves, Allow for the agent's own (marked) sockets. The
/// namespace comes first: in a namespace of its own (`unshare -rn`, a container with
/// CAP_NET_RAW) a process may set any mark, so outside the agent's namespace the mark counts only
/// from a task in the agent's cgroup. A macro, not a function returning
/// `Result<&AgentConfig, Verdict>`: the compiler packs such a result into a register with shifts
/// the verifier refuses on pointers.
macro_rules! config_or_return {
    ($ctx:expr, $sa:expr, $scoped:expr) => {{
        let Some(cfg) = CONFIG.get(0) else {
            count(counter::DENY_UNCONFIGURED);
            return Verdict::Deny;
        };
        if cfg.ready == 0 {
            count(counter::DENY_UNCONFIGURED);
            return Verdict::Deny;
        }
        // Only the scoped programs (attached to container engines' parents) look at scopes: a
        // cgroup attached in full is intercepted whatever scope lies above or below it.
        match if $scoped { scope_verdict() } else { SCOPE_NONE } {
            SCOPE_PASS => {
                count(counter::PASS_UNSELECTED);
                return Verdict::Allow;
            }
            SCOPE_UNKNOWN => {
                count(counter::DENY_UNCLASSIFIED);
                return Verdict::Deny;
            }
            _ => {}
        }
        let netns = unsafe { bpf_get_netns_cookie($ctx.as_ptr()) };
        let Some(&served) = (unsafe { SERVED_NETNS.get(&netns) }) else {
            count(counter::DENY_NO_LISTENER);
            return Verdict::Deny;
        };
        let mark = unsafe { (*$sa.__bindgen_anon_1.sk).mark };
        if mark == cfg.agent_mark && (served & NETNS_OWN != 0 || is_agent_task()) {
            count(counter::PASS_AGENT);
            return Verdict::Allow;
        }
        cfg
    }};
}

/// Not under any selectively attached cgroup (or a scope's entry is gone while its link
/// stays): intercepted as usual.
const SCOPE_NONE: u32 = 0;
/// Under one, in a child cgroup the agent has not classified yet: refused.
const SCOPE_UNKNOWN: u32 = 3;

/// Under a selectively attached cgroup (a container engine's parent, attached for `--container`),
/// only the children the agent classified as followed containers are intercepted; the others
/// are left alone, and new ones are refused until classified (never passed unseen: a followed
/// container restarted gets a new cgroup). The task's ancestor at the scope's level identifies
/// the scope, the one a level below the container; of nested scopes the deepest counts. (Linux
/// 5.7 gave sock_addr programs these helpers.)
#[inline(always)]
fn scope_verdict() -> u32 {
    let mut deepest: Option<u32> = None;
    let mut i = 0;
    while i < MAX_SCOPES {
        if let Some(scope) = SCOPES.get(i)
            && scope.cgroup_id != 0
            && deepest.is_none_or(|level| scope.level > level)
            && unsafe { bpf_get_current_ancestor_cgroup_id(scope.level as i32) } == scope.cgroup_id
        {
            deepest = Some(scope.level);
        }
        i += 1;
    }
    let Some(level) = deepest else {
        return SCOPE_NONE;
    };
    let child = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32 + 1) };
    if child == 0 {
        // In the scope's own cgroup: no container.
        return SCOPE_PASS;
    }
    match unsafe { SCOPED.get(child) } {
        Some(&verdict) if verdict == SCOPE_INTERCEPT || verdict == SCOPE_PASS => verdict,
        _ => SCOPE_UNKNOWN,
    }
}

/// Synthetic DNS answers UDP only: DNS over TCP (to any resolver, loopback ones included) is
/// refused, so that no query reaches a resolver the agent did not choose.
#[inline(always)]
fn synthetic_dns() -> bool {
    CONFIG
        .get(0)
        .is_some_and(|cfg| cfg.ready != 0 && cfg.flags & FLAG_DNS_SYNTHETIC != 0)
}

/// Policy for an IPv4 destination (also IPv4-mapped ones from connect6).
#[inline(always)]
fn decide4(ctx: &SockAddrContext, sa: &bpf_sock_addr, dst_ip: u32, dst_port: u16, scoped: bool) -> Verdict {
    if dst_port == DNS_PORT && synthetic_dns() {
        // After the scope, namespace and agent checks: only intercepted processes are refused.
        let _ = config_or_return!(ctx, sa, scoped);
        count(counter::DENY_NO_LISTENER);
        return Verdict::Deny;
    }
    if u32::from_be(dst_ip) >> 24 == 127 || dst_ip == 0 {
        count(counter::PASS_LOOPBACK);
        return Verdict::Allow;
    }
    let cfg = config_or_return!(ctx, sa, scoped);
    // The agent keeps the two sets disjoint (bypass minus deny): the order of the lookups does
    // not matter, and a bypassed connect costs one.
    let key = Key::new(32, dst_ip);
    if BYPASS4.get(&key).is_some() {
        count(counter::PASS_NO_PROXY);
        return Verdict::Allow;
    }
    if DENY4.get(&key).is_some() {
        count(counter::DENY_BLACKLIST);
        if cfg.flags & FLAG_KERNEL_LOG != 0 {
            debug!(ctx, "deny {:i}:{}", u32::from_be(dst_ip), dst_port);
        }
        return Verdict::Deny;
    }
    if cfg.flags & FLAG_KERNEL_LOG != 0 {
        debug!(ctx, "redirect {:i}:{}", u32::from_be(dst_ip), dst_port);
    }
    Verdict::Redirect {
        original: SockAddr::v4(dst_ip, dst_port),
        port: cfg.listen_port,
        mark: cfg.agent_mark,
    }
}

#[inline(always)]
fn decide6(
    ctx: &SockAddrContext,
    sa: &bpf_sock_addr,
    dst_ip: [u32; 4],
    dst_port: u16,
    scoped: bool,
) -> Verdict {
    if dst_port == DNS_PORT && synthetic_dns() {
        // After the scope, namespace and agent checks: only intercepted processes are refused.
        let _ = config_or_return!(ctx, sa, scoped);
        count(counter::DENY_NO_LISTENER);
        return Verdict::Deny;
    }
    if dst_ip == LOOPBACK6 || dst_ip == [0; 4] {
        count(counter::PASS_LOOPBACK);
        return Verdict::Allow;
    }
    let cfg = config_or_return!(ctx, sa, scoped);
    let key = Key::new(128, dst_ip);
    if BYPASS6.get(&key).is_some() {
        count(counter::PASS_NO_PROXY);
        return Verdict::Allow;
    }
    if DENY6.get(&key).is_some() {
        count(counter::DENY_BLACKLIST);
        if cfg.flags & FLAG_KERNEL_LOG != 0 {
            debug!(ctx, "deny {:i}:{}", to_bytes(dst_ip), dst_port);
        }
        return Verdict::Deny;
    }
    if cfg.flags & FLAG_KERNEL_LOG != 0 {
        debug!(ctx, "redirect {:i}:{}", to_bytes(dst_ip), dst_port);
    }
    Verdict::Redirect {
        original: SockAddr::v6(dst_ip, dst_port),
        port: cfg.listen_port,
        mark: cfg.agent_mark,
    }
}

#[inline(always)]
fn to_bytes(words: [u32; 4]) -> [u8; 16] {
    unsafe { core::mem::transmute(words) }
}

/// `bpf_sock_tuple` for IPv4 and IPv6, as seen by an arriving packet: `daddr:dport` is the
/// listener, `saddr:sport` the (unknown) client.
#[repr(C)]
struct Tuple4 {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

#[repr(C)]
struct Tuple6 {
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
}

/// Whether egress itself listens where the redirect would go (in the caller's network
/// namespace, which `config_or_return!` found served): the socket listening on loopback at
/// egress's port carries the agent `mark`. `ipv6`: the [::1] listener, else 127.0.0.1.
#[inline(always)]
fn agent_listens(ctx: &SockAddrContext, port: u16, mark: u32, ipv6: bool, udp: bool) -> bool {
    let dport = port.to_be();
    let sk: *mut bpf_sock = if ipv6 {
        let mut tuple = Tuple6 {
            saddr: [0; 4],
            daddr: LOOPBACK6,
            sport: 0,
            dport,
        };
        let lookup = if udp { bpf_sk_lookup_udp } else { bpf_sk_lookup_tcp };
        unsafe {
            lookup(
                ctx.as_ptr(),
                &mut tuple as *mut Tuple6 as *mut bpf_sock_tuple,
                core::mem::size_of::<Tuple6>() as u32,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        }
    } else {
        let mut tuple = Tuple4 {
            saddr: 0,
            daddr: LOOPBACK4,
            sport: 0,
            dport,
        };
        let lookup = if udp { bpf_sk_lookup_udp } else { bpf_sk_lookup_tcp };
        unsafe {
            lookup(
                ctx.as_ptr(),
                &mut tuple as *mut Tuple4 as *mut bpf_sock_tuple,
                core::mem::size_of::<Tuple4>() as u32,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        }
    };
    if sk.is_null() {
        count(counter::DENY_NO_LISTENER);
        return false;
    }
    // A UDP socket has no listening state; bound on egress's address and port suffices. The mark
    // alone is not egress's: CAP_NET_RAW sets it (Docker gives containers that). Only a socket
    // the agent marked in its socket storage is.
    let ours = unsafe {
        (udp || (*sk).state == BPF_TCP_LISTEN)
            && (*sk).mark == mark
            && !bpf_sk_storage_get(
                core::ptr::addr_of!(EGRESS_LISTENERS).cast_mut().cast(),
                sk.cast(),
                core::ptr::null_mut(),
                0,
            )
            .is_null()
    };
    unsafe { bpf_sk_release(sk as *mut core::ffi::c_void) };
    if !ours {
        count(counter::DENY_NOT_AGENT_LISTENER);
    }
    ours
}

/// Parks the original destination under the socket cookie; false if the map refused.
#[inline(always)]
fn remember(ctx: &SockAddrContext, original: &SockAddr) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if SOCKET_DST.insert(cookie, original, BPF_ANY as u64).is_err() {
        // Without the original destination the agent could not route it: refuse, never leak.
        count(counter::DENY_NO_STATE);
        return false;
    }
    count(counter::REDIRECTED);
    true
}

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    connect4(ctx, false)
}

/// connect4 for a container engine's parent cgroup: only followed containers are intercepted.
#[cgroup_sock_addr(connect4)]
pub fn egress_connect4_scoped(ctx: SockAddrContext) -> i32 {
    connect4(ctx, true)
}

#[cgroup_sock_addr(connect6)]
pub fn egress_connect6(ctx: SockAddrContext) -> i32 {
    connect6(ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn egress_connect6_scoped(ctx: SockAddrContext) -> i32 {
    connect6(ctx, true)
}

#[inline(always)]
fn connect4(ctx: SockAddrContext, scoped: bool) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst_port = u16::from_be(sa.user_port as u16);
    if !is_tcp(sa) {
        return dns_socket(&ctx, sa, dst_port, scoped, false);
    }
    match decide4(&ctx, sa, sa.user_ip4, dst_port, scoped) {
        Verdict::Allow => ALLOW,
        Verdict::Deny => DENY,
        Verdict::Redirect { original, port, mark } => {
            if !agent_listens(&ctx, port, mark, false, false) || !remember(&ctx, &original) {
                return DENY;
            }
            sa.user_ip4 = LOOPBACK4;
            sa.user_port = port.to_be() as u32;
            ALLOW
        }
    }
}

#[inline(always)]
fn connect6(ctx: SockAddrContext, scoped: bool) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst_port = u16::from_be(sa.user_port as u16);
    if !is_tcp(sa) {
        return dns_socket(&ctx, sa, dst_port, scoped, true);
    }
    let dst_ip = read_ip6(&sa.user_ip6);
    // An IPv4-mapped destination is IPv4 on the wire: IPv4 policy, IPv4 loopback listener.
    let mapped = is_mapped(&dst_ip);
    let decision = if mapped {
        decide4(&ctx, sa, dst_ip[3], dst_port, scoped)
    } else {
        decide6(&ctx, sa, dst_ip, dst_port, scoped)
    };
    match decision {
        Verdict::Allow => ALLOW,
        Verdict::Deny => DENY,
        Verdict::Redirect { original, port, mark } => {
            // A mapped destination goes to the IPv4 listener.
            if !agent_listens(&ctx, port, mark, !mapped, false) || !remember(&ctx, &original) {
                return DENY;
            }
            let loopback = if mapped {
                [0, 0, MAPPED_PREFIX, LOOPBACK4]
            } else {
                LOOPBACK6
            };
            write_ip6(&mut sa.user_ip6, loopback);
            sa.user_port = port.to_be() as u32;
            ALLOW
        }
    }
}

/// A UDP socket of an intercepted process sending to port 53 (DNS). Observed by default: noted
/// with its network namespace, so that `capture_dns` copies its queries and answers for the
/// agent, and nothing is refused or rewritten (resolution works as before, Docker's embedded DNS
/// included). With synthetic DNS the query goes to the agent's DNS listener in the caller's
/// namespace instead (the original resolver is kept for recvmsg), or nowhere: never to a resolver
/// the agent did not choose.
#[inline(always)]
fn dns_socket(ctx: &SockAddrContext, sa: &mut bpf_sock_addr, dst_port: u16, scoped: bool, ipv6: bool) -> i32 {
    if sa.type_ != SOCK_DGRAM || sa.protocol != IPPROTO_UDP as u32 || dst_port != DNS_PORT {
        return ALLOW;
    }
    let Some(cfg) = CONFIG.get(0) else { return ALLOW };
    if cfg.ready == 0 {
        return ALLOW;
    }
    let synthetic = cfg.flags & FLAG_DNS_SYNTHETIC != 0;
    if scoped {
        let verdict = scope_verdict();
        if verdict == SCOPE_PASS {
            return ALLOW;
        }
        if verdict == SCOPE_UNKNOWN {
            return if synthetic { DENY } else { ALLOW };
        }
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if !synthetic {
        let _ = DNS_SOCKETS.insert(cookie, netns, BPF_ANY as u64);
        return ALLOW;
    }
    // Synthetic DNS is served in the agent's own namespace only: elsewhere root may set the mark,
    // so a listener there could be anyone's.
    let served = match unsafe { SERVED_NETNS.get(netns) } {
        Some(&served) if served & NETNS_OWN != 0 => served,
        _ => {
            count(counter::DENY_NO_LISTENER);
            return DENY;
        }
    };
    // The agent's own queries (to the internal resolver), where its cgroup is below an attached one.
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    if mark == cfg.agent_mark && served & NETNS_OWN != 0 {
        count(counter::PASS_AGENT);
        return ALLOW;
    }
    // `ipv6`: a connect6/sendmsg6 program (the verifier refuses user_ip6 in the IPv4 ones).
    let (original, to_ipv6_listener) = if !ipv6 {
        (SockAddr::v4(sa.user_ip4, DNS_PORT), false)
    } else {
        let ip = read_ip6(&sa.user_ip6);
        if is_mapped(&ip) {
            (SockAddr::v4(ip[3], DNS_PORT), false)
        } else {
            (SockAddr::v6(ip, DNS_PORT), true)
        }
    };
    if !agent_listens(ctx, cfg.listen_port, cfg.agent_mark, to_ipv6_listener, true) {
        return DENY;
    }
    let redirect = DnsRedirect {
        original,
        _pad: 0,
        netns,
    };
    if DNS_REDIRECTS.insert(cookie, redirect, BPF_ANY as u64).is_err() {
        count(counter::DENY_NO_STATE);
        return DENY;
    }
    if !ipv6 {
        sa.user_ip4 = LOOPBACK4;
    } else if to_ipv6_listener {
        write_ip6(&mut sa.user_ip6, LOOPBACK6);
    } else {
        write_ip6(&mut sa.user_ip6, [0, 0, MAPPED_PREFIX, LOOPBACK4]);
    }
    sa.user_port = (cfg.listen_port.to_be()) as u32;
    count(counter::DNS_REDIRECTED);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg(ctx, false, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn egress_sendmsg4_scoped(ctx: SockAddrContext) -> i32 {
    sendmsg(ctx, true, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn egress_sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg(ctx, false, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn egress_sendmsg6_scoped(ctx: SockAddrContext) -> i32 {
    sendmsg(ctx, true, true)
}

/// sendto()/sendmsg() with an address on an unconnected UDP socket (connected ones are seen by
/// connect4/6).
#[inline(always)]
fn sendmsg(ctx: SockAddrContext, scoped: bool, ipv6: bool) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst_port = u16::from_be(sa.user_port as u16);
    dns_socket(&ctx, sa, dst_port, scoped, ipv6)
}

/// Synthetic DNS: an answer from the agent's DNS listener to a socket whose query was sent there
/// is reported as coming from the resolver the application asked.
#[cgroup_sock_addr(recvmsg4)]
pub fn egress_recvmsg4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(original) = redirected_dns(&ctx, sa)
        && original.family == AF_INET
        && sa.user_ip4 == LOOPBACK4
    {
        sa.user_ip4 = original.addr[0];
        sa.user_port = (DNS_PORT.to_be()) as u32;
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn egress_recvmsg6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(original) = redirected_dns(&ctx, sa) {
        let from = read_ip6(&sa.user_ip6);
        let ip = if original.family == AF_INET {
            [0, 0, MAPPED_PREFIX, original.addr[0]]
        } else {
            original.addr
        };
        if from == LOOPBACK6 || from == [0, 0, MAPPED_PREFIX, LOOPBACK4] {
            write_ip6(&mut sa.user_ip6, ip);
            sa.user_port = (DNS_PORT.to_be()) as u32;
        }
    }
    ALLOW
}

/// The resolver a socket's DNS query was meant for, if the query went to the agent and this
/// datagram comes from the agent's DNS port.
#[inline(always)]
fn redirected_dns(ctx: &SockAddrContext, sa: &bpf_sock_addr) -> Option<SockAddr> {
    let cfg = CONFIG.get(0)?;
    if cfg.flags & FLAG_DNS_SYNTHETIC == 0 || sa.user_port != (cfg.listen_port.to_be()) as u32 {
        return None;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { DNS_REDIRECTS.get(cookie) }.map(|r| r.original)
}

#[cgroup_skb(ingress)]
pub fn egress_skb_in(ctx: SkBuffContext) -> i32 {
    capture_dns(&ctx, DNS_ANSWER);
    1
}

#[cgroup_skb(egress)]
pub fn egress_skb_out(ctx: SkBuffContext) -> i32 {
    let Some(packet) = Packet::read(&ctx) else {
        return 1;
    };
    if packet.rerouted && (packet.protocol == IPPROTO_TCP_U8 || packet.protocol == IPPROTO_UDP) {
        count(counter::DROP_IP_OPTIONS);
        return 0;
    }
    if packet.to_loopback && unsafe { (*ctx.skb.skb).ifindex } != LOOPBACK_IFINDEX {
        count(counter::DROP_LOOPBACK_LEAK);
        return 0;
    }
    if packet.protocol == IPPROTO_TCP_U8 && !from_tcp_socket(&ctx) {
        count(counter::DROP_RAW_TCP);
        return 0;
    }
    note_dns_client(&ctx);
    capture_dns(&ctx, DNS_QUERY);
    1
}

/// What `egress_skb_out` checks about a leaving packet.
struct Packet {
    /// The transport protocol, after any IPv6 extension headers (255 if they were not walked to
    /// the end).
    protocol: u8,
    /// IPv4 options, or an IPv6 routing or destination-options header, or more extension headers
    /// than are walked: what source routing is made of. connect() decided on the destination in
    /// the IP header; these would send the packet elsewhere. They can be set where the setsockopt
    /// hook does not look (a 32-bit process's setsockopt skips it); TCP and DNS never need them.
    rerouted: bool,
    /// To 127.0.0.0/8, ::1 or a v4-mapped loopback address. The connect hooks let these pass as
    /// loopback; bound to another device (SO_BINDTODEVICE, no capability needed) the kernel sends
    /// them out of it, to whichever neighbour answers for the address.
    to_loopback: bool,
}

impl Packet {
    #[inline(always)]
    fn read(ctx: &SkBuffContext) -> Option<Packet> {
        match u16::from_be(ctx.skb.protocol() as u16) {
            ETH_P_IP => {
                let version_ihl = ctx.load::<u8>(0).ok()?;
                let protocol = ctx.load::<u8>(9).ok()?;
                let dst = ctx.load::<[u8; 4]>(16).ok()?;
                Some(Packet {
                    protocol,
                    rerouted: version_ihl & 0x0f > 5,
                    to_loopback: dst[0] == 127,
                })
            }
            ETH_P_IPV6 => {
                let dst = ctx.load::<[u32; 4]>(24).ok()?;
                let to_loopback = dst == LOOPBACK6
                    || (is_mapped(&dst) && u32::from_be(dst[3]) >> 24 == 127);
                let mut next = ctx.load::<u8>(6).ok()?;
                let mut at = 40usize;
                let mut rerouted = false;
                let mut walked = 0;
                while walked < MAX_EXTENSION_HEADERS {
                    let length = match next {
                        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                            ctx.load::<u8>(at + 1).ok()? as usize * 8 + 8
                        }
                        NEXTHDR_FRAGMENT => 8,
                        NEXTHDR_AUTH => ctx.load::<u8>(at + 1).ok()? as usize * 4 + 8,
                        _ => break,
                    };
                    rerouted |= next == NEXTHDR_ROUTING || next == NEXTHDR_DEST;
                    next = ctx.load::<u8>(at).ok()?;
                    at += length;
                    walked += 1;
                }
                let walked_all = walked < MAX_EXTENSION_HEADERS;
                Some(Packet {
                    protocol: if walked_all { next } else { 255 },
                    rerouted: rerouted || !walked_all,
                    to_loopback,
                })
            }
            _ => None,
        }
    }
}

/// Whether the packet's socket is a TCP socket (or not a full socket: a request or time-wait
/// socket answering for a TCP listener or connection). A raw socket (CAP_NET_RAW, which
/// containers get by default) can write TCP that no connect() hook saw.
#[inline(always)]
fn from_tcp_socket(ctx: &SkBuffContext) -> bool {
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return true;
    }
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return true;
    }
    unsafe { (*full).type_ == SOCK_STREAM && (*full).protocol == IPPROTO_TCP }
}

/// Whether the packet is UDP over IPv6, and where its UDP header starts (`skb->data` is at the
/// network header in cgroup_skb programs, both ways). IPv6 only with the UDP header right after
/// the fixed one: resolvers send no extension headers.
#[inline(always)]
fn udp_header(ctx: &SkBuffContext) -> Option<(bool, usize)> {
    match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => {
            let version_ihl = ctx.load::<u8>(0).ok()?;
            (ctx.load::<u8>(9) == Ok(IPPROTO_UDP)).then_some((false, (version_ihl & 0x0f) as usize * 4))
        }
        ETH_P_IPV6 => (ctx.load::<u8>(6) == Ok(IPPROTO_UDP)).then_some((true, 40)),
        _ => None,
    }
}

/// Synthetic DNS: a redirected query leaving for the agent's DNS listener files its source port
/// (with its namespace), so that the agent can tell it from a datagram anyone else sent there.
#[inline(always)]
fn note_dns_client(ctx: &SkBuffContext) {
    let Some(cfg) = CONFIG.get(0) else { return };
    if cfg.flags & FLAG_DNS_SYNTHETIC == 0 {
        return;
    }
    let Some((ipv6, udp)) = udp_header(ctx) else { return };
    if ctx.load::<u16>(udp + 2).map(u16::from_be) != Ok(cfg.listen_port) {
        return;
    }
    let Ok(sport) = ctx.load::<u16>(udp) else { return };
    let socket = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut core::ffi::c_void) };
    let Some(redirect) = (unsafe { DNS_REDIRECTS.get(socket) }) else {
        return;
    };
    // The source as the agent's listener will see it: address and port.
    let port = u16::from_be(sport);
    let addr = if ipv6 {
        let Ok(ip) = ctx.load::<[u32; 4]>(8) else { return };
        SockAddr::v6(ip, port)
    } else {
        let Ok(ip) = ctx.load::<u32>(12) else { return };
        SockAddr::v4(ip, port)
    };
    let peer = DnsPeer {
        netns: redirect.netns,
        addr,
        _pad: 0,
    };
    if !file_dns_peer(socket, &peer) {
        count(counter::DNS_PEER_REFUSED);
    }
}

/// Files `peer` for `socket`, in one of its [`DNS_PEERS_PER_SOCKET`] slots (so that the release
/// hook finds it). False if the socket has no free slot or a map is full: then the agent does not
/// answer that source.
#[inline(always)]
fn file_dns_peer(socket: u64, peer: &DnsPeer) -> bool {
    if unsafe { DNS_PEERS.get(peer) }.is_some_and(|&owner| owner == socket) {
        return true;
    }
    let mut slot = 0;
    while slot < DNS_PEERS_PER_SOCKET {
        let key = DnsPeerSlot {
            socket,
            slot,
            _pad: 0,
        };
        match unsafe { DNS_PEER_SLOTS.get(key) } {
            // Filed before, and since taken by another socket of the same source: take it back.
            Some(filed) if filed.netns == peer.netns && filed.addr == peer.addr => {
                return DNS_PEERS.insert(peer, socket, BPF_ANY as u64).is_ok();
            }
            Some(_) => {}
            None => {
                // The slot first: a peer on file always has a slot the release hook finds.
                if DNS_PEER_SLOTS.insert(key, peer, BPF_NOEXIST as u64).is_err() {
                    return false;
                }
                if DNS_PEERS.insert(peer, socket, BPF_ANY as u64).is_err() {
                    let _ = DNS_PEER_SLOTS.remove(key);
                    return false;
                }
                return true;
            }
        }
        slot += 1;
    }
    false
}

/// Copies a DNS message (UDP from port 53 arriving, or to port 53 leaving) of a noted socket into
/// the ring buffer. Packets of other sockets cost a few loads. `skb->data` is at the network
/// header in cgroup_skb programs, both ways.
#[inline(always)]
fn capture_dns(ctx: &SkBuffContext, kind: u16) {
    let answer = kind == DNS_ANSWER;
    let Some((ipv6, udp)) = udp_header(ctx) else {
        return;
    };
    // The server: an answer's source, a query's destination.
    let server = if ipv6 {
        let Ok(ip) = ctx.load::<[u32; 4]>(if answer { 8 } else { 24 }) else {
            return;
        };
        SockAddr::v6(ip, DNS_PORT)
    } else {
        let Ok(ip) = ctx.load::<u32>(if answer { 12 } else { 16 }) else {
            return;
        };
        SockAddr::v4(ip, DNS_PORT)
    };
    let port_at = if answer { udp } else { udp + 2 };
    if ctx.load::<u16>(port_at).map(u16::from_be) != Ok(DNS_PORT) {
        return;
    }
    let socket = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut core::ffi::c_void) };
    let Some(&netns) = (unsafe { DNS_SOCKETS.get(socket) }) else {
        return;
    };
    let message_at = udp + 8;
    let wire_len = ctx.len().saturating_sub(message_at as u32);
    if wire_len == 0 {
        return;
    }
    // 1..=DNS_CAPTURE bytes, in a form the verifier can bound: the opaque read keeps the
    // compiler from dropping the mask as redundant.
    let below = wire_len.min(DNS_CAPTURE as u32) - 1;
    let below = unsafe { read_volatile(&below) };
    let len = (below & (DNS_CAPTURE as u32 - 1)) + 1;
    let Some(mut entry) = DNS_EVENTS.reserve::<DnsEvent>(0) else {
        count(counter::DNS_LOST);
        return;
    };
    let event = entry.as_mut_ptr();
    let copied = unsafe {
        (*event).netns = netns;
        (*event).socket = socket;
        (*event).server = server;
        (*event).kind = kind;
        (*event).len = len as u16;
        (*event).wire_len = wire_len;
        bpf_skb_load_bytes(
            ctx.skb.skb as *const core::ffi::c_void,
            message_at as u32,
            (*event).message.as_mut_ptr() as *mut core::ffi::c_void,
            len,
        )
    };
    if copied != 0 {
        entry.discard(0);
        return;
    }
    entry.submit(0);
    count(counter::DNS_CAPTURED);
}

#[cgroup_sockopt(setsockopt)]
pub fn egress_setsockopt(ctx: SockoptContext) -> i32 {
    setsockopt(&ctx, false)
}

/// setsockopt for a container engine's parent cgroup: only followed containers are refused.
#[cgroup_sockopt(setsockopt)]
pub fn egress_setsockopt_scoped(ctx: SockoptContext) -> i32 {
    setsockopt(&ctx, true)
}

/// Refuses (EPERM) on intercepted TCP sockets the options that change where packets go after
/// connect() decided: IPv6 routing headers (a type-4 segment list names any address, and the
/// kernel sends the SYN to its first segment), IPv4 source routes (`IP_OPTIONS` with LSRR/SSRR,
/// also on dual-stack sockets), destination and hop-by-hop options, and the RFC 2292 forms
/// (`IPV6_2292PKTOPTIONS` installs a routing header too). Everything else passes untouched.
#[inline(always)]
fn setsockopt(ctx: &SockoptContext, scoped: bool) -> i32 {
    let opt = unsafe { &mut *ctx.sockopt };
    let (level, name) = (opt.level, opt.optname);
    let reroutes = (level == SOL_IP && name == IP_OPTIONS)
        || (level == SOL_IPV6
            && (name == IPV6_RTHDR
                || name == IPV6_2292RTHDR
                || name == IPV6_2292PKTOPTIONS
                || name == IPV6_DSTOPTS
                || name == IPV6_RTHDRDSTOPTS
                || name == IPV6_2292DSTOPTS
                || name == IPV6_HOPOPTS
                || name == IPV6_2292HOPOPTS));
    if reroutes {
        let sk = unsafe { opt.__bindgen_anon_1.sk };
        let tcp = unsafe { (*sk).type_ } == SOCK_STREAM;
        // Under a scope, only followed containers' sockets (and unclassified ones) are refused.
        let passed = scoped && scope_verdict() == SCOPE_PASS;
        if tcp && !passed {
            count(counter::DENY_SOCKOPT);
            return DENY;
        }
    }
    // The kernel reads the caller's own buffer: a program that leaves `optlen` alone makes an
    // option longer than a page fail with EFAULT on Linux 6.1.
    opt.optlen = 0;
    ALLOW
}

/// A socket of an intercepted process is released: its synthetic DNS permission goes with it,
/// before its port is free for anyone else to bind.
#[cgroup_sock(sock_release)]
pub fn egress_sock_release(ctx: SockContext) -> i32 {
    if unsafe { (*ctx.sock).type_ } != SOCK_DGRAM {
        return ALLOW;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut slot = 0;
    while slot < DNS_PEERS_PER_SOCKET {
        let key = DnsPeerSlot {
            socket: cookie,
            slot,
            _pad: 0,
        };
        if let Some(peer) = unsafe { DNS_PEER_SLOTS.get(key) } {
            let peer = *peer;
            // The entry may have gone to a newer socket of the same address meanwhile: not that one.
            if unsafe { DNS_PEERS.get(peer) }.is_some_and(|&owner| owner == cookie) {
                let _ = DNS_PEERS.remove(peer);
            }
            let _ = DNS_PEER_SLOTS.remove(key);
        }
        slot += 1;
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn egress_getpeername4(ctx: SockAddrContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(original) = unsafe { SOCKET_DST.get(cookie) }
        && original.family == AF_INET {
            let sa = unsafe { &mut *ctx.sock_addr };
            sa.user_ip4 = original.addr[0];
            sa.user_port = original.port.to_be() as u32;
        }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn egress_getpeername6(ctx: SockAddrContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(original) = unsafe { SOCKET_DST.get(cookie) } {
        let sa = unsafe { &mut *ctx.sock_addr };
        let ip = if original.family == AF_INET {
            [0, 0, MAPPED_PREFIX, original.addr[0]]
        } else {
            original.addr
        };
        write_ip6(&mut sa.user_ip6, ip);
        sa.user_port = original.port.to_be() as u32;
    }
    ALLOW
}

/// On the intercepted cgroups: the client side of a redirected connection.
#[sock_ops]
pub fn egress_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => record_original_dst(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            // Only redirected client sockets ask for these.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = SOCKET_DST.remove(cookie);
            // A destination still filed under the client's address was never bound to a
            // connection the agent accepted: it goes with the socket, whatever state it closed
            // from, so that nobody who takes the address later can claim it.
            let _ = ORIG_DST.remove(conn_key(&ctx, false));
        }
        _ => {}
    }
    0
}

/// On the agent's own cgroup: the accepted side. (Where the two cgroups nest, both programs run
/// for a socket; each acts only on its own side's events.)
#[sock_ops]
pub fn egress_sock_ops_accept(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => bind_original_dst(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            // Only accepted sockets with a bound destination ask for these: closed before the
            // agent read it.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = ACCEPTED_DST.remove(cookie);
        }
        _ => {}
    }
    0
}

/// A connection established at a listener (the agent's: this program is attached to the agent's
/// cgroup, and its listeners' accepted sockets are there): if it is to egress's port on loopback
/// and its client filed an original destination, the destination moves to this accepted socket.
#[inline(always)]
fn bind_original_dst(ctx: &SockOpsContext) {
    let Some(cfg) = CONFIG.get(0) else { return };
    if ctx.local_port() != cfg.listen_port as u32 {
        return;
    }
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() || unsafe { (*sk).mark } != cfg.agent_mark {
        return;
    }
    let key = conn_key(ctx, true);
    let Some(original) = (unsafe { ORIG_DST.get(key) }) else {
        return;
    };
    let original = *original;
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ACCEPTED_DST.insert(cookie, original, BPF_ANY as u64).is_err() {
        return;
    }
    let _ = ORIG_DST.remove(key);
    count(counter::ORIGDST_BOUND);
    // Ask for state changes, to forget the entry if the socket closes before the agent reads it.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

#[inline(always)]
fn record_original_dst(ctx: &SockOpsContext) {
    // Redirected sockets connect to loopback; others (bypassed in the kernel, say) cannot have
    // a parked destination, so they skip the cookie and the map lookup.
    let to_loopback = if ctx.family() == AF_INET6 as u32 {
        let ip = read_ip6(unsafe { &(*ctx.ops).remote_ip6 });
        ip == LOOPBACK6 || (is_mapped(&ip) && ip[3] == LOOPBACK4)
    } else {
        ctx.remote_ip4() == LOOPBACK4
    };
    if !to_loopback {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(original) = (unsafe { SOCKET_DST.get(cookie) }) else {
        return;
    };
    let original = *original;
    if ORIG_DST.insert(conn_key(ctx, false), original, BPF_ANY as u64).is_ok() {
        count(counter::ORIGDST_RECORDED);
    }
    // Ask for state changes, to forget the socket when it closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// A connection's network namespace and client address, the key its original destination is
/// filed under: the client socket's local address (`remote` false), which is the remote address
/// of the socket the agent accepted (`remote` true).
#[inline(always)]
fn conn_key(ctx: &SockOpsContext, remote: bool) -> ConnKey {
    let (port, ip4, ip6) = if remote {
        // bpf_sock_ops.remote_port is a 32-bit field in network byte order (the kernel shifts the
        // 16-bit port up on little-endian hosts): as ntohl() reads it.
        let port = u32::from_be(ctx.remote_port()) as u16;
        (port, ctx.remote_ip4(), unsafe { &(*ctx.ops).remote_ip6 })
    } else {
        (ctx.local_port() as u16, ctx.local_ip4(), unsafe { &(*ctx.ops).local_ip6 })
    };
    let addr = if ctx.family() == AF_INET6 as u32 {
        let ip = read_ip6(ip6);
        // A dual-stack socket talking IPv4: the agent accepts it on its IPv4 listener.
        if is_mapped(&ip) {
            SockAddr::v4(ip[3], port)
        } else {
            SockAddr::v6(ip, port)
        }
    } else {
        SockAddr::v4(ip4, port)
    };
    ConnKey {
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr,
        _pad: 0,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
