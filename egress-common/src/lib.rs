//! Types shared by the egress kernel programs (`egress-ebpf`) and the agent (`egress-user`).
//!
//! Everything here is `#[repr(C)]` plain data: the same bytes are written by one side into a
//! BPF map and read by the other.
#![no_std]

/// Names of the maps in the eBPF object. They are pinned by name under the agent's bpffs
/// directory, so a restarted agent finds the same maps the attached programs use.
pub mod maps {
    pub const CONFIG: &str = "EGRESS_CONFIG";
    /// Per-CPU decision counters (see [`super::counter`]).
    pub const COUNTERS: &str = "EGRESS_COUNTS";
    pub const SOCKET_DST: &str = "EGRESS_SOCKET_DST";
    /// [`super::ConnKey`] (network namespace + the client's local address) -> original
    /// destination, for the agent's accept().
    pub const ORIGINAL_DST: &str = "EGRESS_CONN_DST";
    /// Network namespaces (by cookie) where an egress listener serves redirected connects ->
    /// `NETNS_*` flags.
    pub const SERVED_NETNS: &str = "EGRESS_NETNS";
    /// The agent's own cgroup v2 id (one entry): its sockets carry the agent mark, and in
    /// namespaces other than its own only a task of that cgroup is believed.
    pub const AGENT_CGROUP: &str = "EGRESS_AGENTCG";
    /// Cgroups attached selectively ([`super::Scope`]): the programs there intercept only the
    /// child cgroups classified [`super::SCOPE_INTERCEPT`] in `SCOPED`.
    pub const SCOPES: &str = "EGRESS_SCOPES";
    /// Child cgroup id (under a scope) -> [`super::SCOPE_INTERCEPT`], [`super::SCOPE_PASS`] or
    /// [`super::SCOPE_NESTED`].
    /// A child not in the map is refused until the agent classifies it.
    pub const SCOPED: &str = "EGRESS_SCOPED";
    /// Names (or ids) of the containers followed ([`super::ContainerName`] -> 1). Not read by
    /// the kernel: pinned so that `egress attach --container` and agent restarts share it.
    pub const FOLLOWED: &str = "EGRESS_FOLLOW";
    /// Socket cookie of a connection the agent accepted -> its original destination: bound
    /// when the connection is established at the agent's listener (sock_ops on the passive
    /// side), moved there from `ORIGINAL_DST`, so that no later socket can claim it.
    pub const ACCEPTED_DST: &str = "EGRESS_ACCEPTED_DST";
    /// Socket storage marking egress's own listeners (TCP, and the synthetic DNS sockets): the
    /// kernel redirects only to a socket that has it, which only a holder of this map can give.
    pub const LISTENERS: &str = "EGRESS_LISTENERS";
    /// Maps earlier versions pinned under these names, with another layout; removed once this
    /// version's programs are attached.
    pub const OBSOLETE: [&str; 3] = ["EGRESS_COUNTERS", "EGRESS_ORIG_DST", "EGRESS_DNS_CLIENTS"];
    /// LPM trie of IPv4 destinations whose connect() fails with EPERM (blacklist minus whitelist).
    pub const DENY4: &str = "EGRESS_DENY4";
    /// LPM trie of IPv4 destinations passed direct without the agent (no_proxy IPs and CIDRs).
    pub const BYPASS4: &str = "EGRESS_BYPASS4";
    /// The same two for IPv6 destinations (IPv4-mapped ones use the IPv4 tries).
    pub const DENY6: &str = "EGRESS_DENY6";
    pub const BYPASS6: &str = "EGRESS_BYPASS6";
    /// Socket cookie of an intercepted process's DNS socket (UDP to port 53) -> its network
    /// namespace's cookie: the sockets whose packets `DNS_EVENTS` carries.
    pub const DNS_SOCKETS: &str = "EGRESS_DNS_SOCKS";
    /// Ring buffer of [`super::DnsEvent`]s: the DNS queries and answers of intercepted
    /// processes, for the agent's record of which names stand behind which addresses.
    pub const DNS_EVENTS: &str = "EGRESS_DNS_EVENTS";
    /// Synthetic DNS: synthetic IPv4 address (network order) -> [`super::SynthName`]. Not read by
    /// the kernel: pinned so that the mappings outlive the agent (applications keep addresses).
    pub const SYNTHETIC: &str = "EGRESS_SYNTH";
    /// Synthetic DNS: socket cookie -> [`super::DnsRedirect`], for the sockets whose queries went
    /// to the agent (recvmsg restores the resolver's address from it).
    pub const DNS_REDIRECTS: &str = "EGRESS_DNS_REDIR";
    /// Synthetic DNS: [`super::DnsPeer`] (the source of a query the kernel redirected) -> the
    /// cookie of the socket that sent it; the agent answers no one else. An entry goes with its
    /// socket (cgroup/sock_release), so a port reused by anyone else is not believed.
    pub const DNS_PEERS: &str = "EGRESS_DNS_PEERS";
    /// Synthetic DNS: [`super::DnsPeerSlot`] (socket cookie, slot) -> a [`super::DnsPeer`] the
    /// socket filed, for removing every one of them when the socket is released (the release
    /// hook cannot read the socket's addresses, and a dual-stack socket may send from several).
    pub const DNS_PEER_OF: &str = "EGRESS_DNS_PEER_SLOTS";
}

/// Capacity of each deny/bypass trie.
pub const MAX_RANGES: u32 = 16384;

/// Names of the programs in the eBPF object.
pub mod programs {
    pub const CONNECT4: &str = "egress_connect4";
    pub const CONNECT6: &str = "egress_connect6";
    /// connect4/6 for selectively attached cgroups (container engines' parents).
    pub const CONNECT4_SCOPED: &str = "egress_connect4_scoped";
    pub const CONNECT6_SCOPED: &str = "egress_connect6_scoped";
    pub const GETPEERNAME4: &str = "egress_getpeername4";
    pub const GETPEERNAME6: &str = "egress_getpeername6";
    pub const SOCK_OPS: &str = "egress_sock_ops";
    /// sock_ops on the agent's own cgroup: binds original destinations to accepted sockets.
    pub const SOCK_OPS_ACCEPT: &str = "egress_sock_ops_accept";
    /// cgroup/sendmsg4|6: note the sockets that send DNS queries (unconnected UDP).
    pub const SENDMSG4: &str = "egress_sendmsg4";
    pub const SENDMSG6: &str = "egress_sendmsg6";
    pub const SENDMSG4_SCOPED: &str = "egress_sendmsg4_scoped";
    pub const SENDMSG6_SCOPED: &str = "egress_sendmsg6_scoped";
    /// cgroup_skb ingress/egress: copy the DNS packets of noted sockets to the agent; on the
    /// way out, also drop TCP packets carrying IPv4 options or IPv6 routing headers.
    pub const SKB_INGRESS: &str = "egress_skb_in";
    pub const SKB_EGRESS: &str = "egress_skb_out";
    /// cgroup/recvmsg4|6: answers from the agent's DNS listener (synthetic DNS) appear to come
    /// from the resolver the application asked.
    pub const RECVMSG4: &str = "egress_recvmsg4";
    pub const RECVMSG6: &str = "egress_recvmsg6";
    /// cgroup/setsockopt: refuses the socket options that change where a TCP packet goes after
    /// connect() decided (routing headers, IPv4 source routes, destination options).
    pub const SETSOCKOPT: &str = "egress_setsockopt";
    pub const SETSOCKOPT_SCOPED: &str = "egress_setsockopt_scoped";
    /// cgroup/sock_release: forgets a released socket's synthetic DNS permission.
    pub const SOCK_RELEASE: &str = "egress_sock_release";
    /// Programs of earlier versions, whose pinned links a new version replaces by its own.
    pub const OBSOLETE: [&str; 2] = ["egress_dns_in", "egress_dns_out"];
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// A socket address as the kernel sees it.
///
/// `addr` holds the address in network byte order exactly as the kernel stores it (for IPv4
/// only `addr[0]` is used, the rest is zero); `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
}

impl SockAddr {
    pub const fn v4(addr_be: u32, port: u16) -> Self {
        Self {
            addr: [addr_be, 0, 0, 0],
            port,
            family: AF_INET,
        }
    }

    /// `addr` as four network-order words, as the kernel stores an in6_addr.
    pub const fn v6(addr: [u32; 4], port: u16) -> Self {
        Self {
            addr,
            port,
            family: AF_INET6,
        }
    }
}

/// Key of the original-destination map: the client's local address is unique within its network
/// namespace while the connection exists, and only there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The network namespace's cookie (`bpf_get_netns_cookie`, `SO_NETNS_COOKIE`).
    pub netns: u64,
    pub addr: SockAddr,
    /// Explicit padding: hash keys are compared byte for byte.
    pub _pad: u32,
}

/// Capacity of the scopes array, the scope children map and the followed-containers map.
pub const MAX_SCOPES: u32 = 8;
pub const MAX_SCOPED: u32 = 16384;
pub const MAX_FOLLOWED: u32 = 256;

/// A cgroup attached selectively (a container engine's parent cgroup): its id and its depth
/// in the cgroup2 tree (the root is level 0). Unused slots have `cgroup_id` 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    pub cgroup_id: u64,
    pub level: u32,
    pub _pad: u32,
}

pub const SCOPE_INTERCEPT: u32 = 1;
pub const SCOPE_PASS: u32 = 2;
/// A child that is a scope itself (kubelet's QoS classes): the kernel refuses a connect it would
/// decide (any value but the two above), so that losing the nested scope's entry fails closed.
pub const SCOPE_NESTED: u32 = 4;

/// A followed container's name or id, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContainerName(pub [u8; 128]);

/// `EGRESS_NETNS` values: served (an egress listener is there), and the agent's own namespace,
/// where only privileged processes can set the agent mark. In a container's namespace, root
/// there may set any mark (CAP_NET_RAW suffices since Linux 5.17).
pub const NETNS_SERVED: u32 = 1;
pub const NETNS_OWN: u32 = 2;

/// Capacity of the served-namespaces map.
pub const MAX_SERVED_NETNS: u32 = 4096;

/// Capacity of the DNS-sockets map.
pub const MAX_DNS_SOCKETS: u32 = 16384;
/// Size of the DNS ring buffer (bytes; a power of two, as the kernel requires).
pub const DNS_RING_BYTES: u32 = 4 << 20;
/// DNS message bytes copied per packet: a power of two, so that the kernel program bounds the
/// copy with a mask; larger than the 1232 bytes resolvers answer over UDP since DNS Flag Day 2020.
pub const DNS_CAPTURE: usize = 2048;

/// Where a redirected DNS query was going, and from which network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsRedirect {
    pub original: SockAddr,
    pub _pad: u32,
    pub netns: u64,
}

/// A redirected DNS query's source, as the agent's DNS listener sees it: the namespace and the
/// client's address and UDP port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsPeer {
    pub netns: u64,
    pub addr: SockAddr,
    pub _pad: u32,
}

/// One of the sources a socket filed as a [`DnsPeer`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsPeerSlot {
    pub socket: u64,
    pub slot: u32,
    pub _pad: u32,
}

/// Sources one socket may send redirected queries from (a dual-stack socket has two); a socket
/// sending from more gets no answers from those.
pub const DNS_PEERS_PER_SOCKET: u32 = 4;

/// Capacity of the DNS redirect and client maps.
pub const MAX_DNS_REDIRECTS: u32 = 16384;

/// Capacity of the synthetic-names map.
pub const MAX_SYNTHETIC: u32 = 65536;

/// A name behind a synthetic address, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthName(pub [u8; 256]);

/// [`DnsEvent::kind`]: a query an intercepted process sent, or an answer it received.
pub const DNS_QUERY: u16 = 1;
pub const DNS_ANSWER: u16 = 2;

/// One DNS message (UDP payload) of an intercepted process, as the kernel saw it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsEvent {
    /// Cookie of the process's network namespace.
    pub netns: u64,
    /// Cookie of the process's socket: an answer belongs to a query of the same socket.
    pub socket: u64,
    /// The DNS server: where a query went, where an answer came from.
    pub server: SockAddr,
    pub kind: u16,
    /// Bytes of `message` captured (at most [`DNS_CAPTURE`]).
    pub len: u16,
    /// The message's full length on the wire (more than `len` when it was cut).
    pub wire_len: u32,
    pub message: [u8; DNS_CAPTURE],
}

/// Settings the agent writes into the single-entry `EGRESS_CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentConfig {
    /// Non-zero once an agent has written this entry. Until then intercepted connects are
    /// refused: the programs never let traffic through unconfigured.
    pub ready: u32,
    /// Socket mark the agent puts on its own upstream and direct sockets; such sockets are
    /// never redirected, wherever the agent's process sits in the cgroup tree.
    pub agent_mark: u32,
    /// Port of the agent's listeners on 127.0.0.1 and [::1] (host byte order).
    pub listen_port: u16,
    pub _pad: u16,
    /// Bit set of `FLAG_*`.
    pub flags: u32,
}

/// Emit aya-log debug records from the kernel programs.
pub const FLAG_KERNEL_LOG: u32 = 1;
/// Synthetic DNS: DNS over UDP from intercepted processes goes to the agent's DNS listener (in
/// the caller's network namespace, on `listen_port`), or nowhere.
pub const FLAG_DNS_SYNTHETIC: u32 = 2;

/// Indexes into the per-CPU `EGRESS_COUNTERS` array: one counter per kernel decision.
pub mod counter {
    /// TCP connects seen by connect4 / connect6.
    pub const CONNECT_SEEN: u32 = 0;
    /// Rewritten to the agent's listener.
    pub const REDIRECTED: u32 = 1;
    /// Left alone: loopback or unspecified destination.
    pub const PASS_LOOPBACK: u32 = 2;
    /// Left alone: the agent's own socket (carries the agent mark).
    pub const PASS_AGENT: u32 = 3;
    /// Left alone: not a TCP socket (UDP, e.g. DNS).
    pub const PASS_NOT_TCP: u32 = 4;
    /// Refused with EPERM: no agent has configured the programs.
    pub const DENY_UNCONFIGURED: u32 = 5;
    /// sock_ops recorded the original destination under the connection's 4-tuple.
    pub const ORIGDST_RECORDED: u32 = 6;
    /// Refused with EPERM: the original destination could not be remembered (map full).
    pub const DENY_NO_STATE: u32 = 7;
    /// Refused with EPERM: destination in the deny trie (blacklisted, not whitelisted).
    pub const DENY_BLACKLIST: u32 = 8;
    /// Left alone: destination in the bypass trie (no_proxy IP or CIDR).
    pub const PASS_NO_PROXY: u32 = 9;
    /// Refused with EPERM: no egress listener in the caller's network namespace (egress is
    /// down, or does not serve that namespace).
    pub const DENY_NO_LISTENER: u32 = 10;
    /// Refused with EPERM: the socket listening on egress's port is not egress's (a squatter).
    pub const DENY_NOT_AGENT_LISTENER: u32 = 11;
    /// Left alone: a container under a selectively attached cgroup that egress does not follow.
    pub const PASS_UNSELECTED: u32 = 12;
    /// Refused with EPERM: a new cgroup under a selectively attached one, not classified yet.
    pub const DENY_UNCLASSIFIED: u32 = 13;
    /// DNS messages of intercepted processes copied to the agent.
    pub const DNS_CAPTURED: u32 = 14;
    /// DNS messages lost: the ring buffer to the agent was full.
    pub const DNS_LOST: u32 = 15;
    /// Synthetic DNS: a DNS query sent to the agent's DNS listener instead of its resolver.
    pub const DNS_REDIRECTED: u32 = 16;
    /// Refused with EPERM: a socket option that would send TCP packets elsewhere than connect()
    /// decided (routing header, IPv4 source route, destination or hop-by-hop options).
    pub const DENY_SOCKOPT: u32 = 17;
    /// Dropped: a TCP or UDP packet leaving with IPv4 options or an IPv6 routing or
    /// destination-options header (set by a way the setsockopt hook does not see, such as a
    /// 32-bit process), or with more extension headers than the program walks.
    pub const DROP_IP_OPTIONS: u32 = 18;
    /// An original destination bound to the connection the agent accepted.
    pub const ORIGDST_BOUND: u32 = 19;
    /// Dropped: a packet to a loopback address leaving by another device than loopback (a
    /// socket bound to a device with SO_BINDTODEVICE, where 127/8 is no route).
    pub const DROP_LOOPBACK_LEAK: u32 = 20;
    /// Dropped: a TCP packet not sent by a TCP socket (a raw socket, which connect() never saw).
    pub const DROP_RAW_TCP: u32 = 21;
    /// Synthetic DNS: a redirected query's source not filed (the socket sends from more than
    /// [`super::DNS_PEERS_PER_SOCKET`] sources, or the map is full); the agent ignores it.
    pub const DNS_PEER_REFUSED: u32 = 22;
    /// Used slots; the map has [`SLOTS`] so that later versions can add counters.
    pub const COUNT: u32 = 23;
    pub const SLOTS: u32 = 32;

    /// Human names for metrics and `egress status`, indexed like the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "connect_seen",
        "redirected",
        "pass_loopback",
        "pass_agent",
        "pass_not_tcp",
        "deny_unconfigured",
        "origdst_recorded",
        "deny_no_state",
        "deny_blacklist",
        "pass_no_proxy",
        "deny_no_listener",
        "deny_not_agent_listener",
        "pass_unselected",
        "deny_unclassified",
        "dns_captured",
        "dns_lost",
        "dns_redirected",
        "deny_sockopt",
        "drop_ip_options",
        "origdst_bound",
        "drop_loopback_leak",
        "drop_raw_tcp",
        "dns_peer_refused",
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] data without padding holes that matter; any bit pattern is valid.
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::AgentConfig {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::Scope {}
    unsafe impl aya::Pod for super::ContainerName {}
    unsafe impl aya::Pod for super::SynthName {}
    unsafe impl aya::Pod for super::DnsRedirect {}
    unsafe impl aya::Pod for super::DnsPeer {}
    unsafe impl aya::Pod for super::DnsPeerSlot {}
}
