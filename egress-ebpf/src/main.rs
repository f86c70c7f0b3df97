//! egress kernel programs.
//!
//! `egress_connect4` (cgroup/connect4) sees every IPv4 connect() of processes in the attached
//! cgroups. TCP connects that are not to loopback and not from the agent itself are rewritten
//! to the agent's listener on 127.0.0.1; the original destination is parked under the socket's
//! cookie. `egress_sock_ops` then runs when the kernel has chosen the local port (TCP_CONNECT_CB)
//! and moves the parked destination to a map keyed by the connection's local address, which is
//! exactly the peer address the agent sees on accept().
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_SOCK_OPS_TCP_CONNECT_CB},
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, LpmTrie, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use egress_common::{AF_INET, AgentConfig, FLAG_KERNEL_LOG, MAX_RANGES, SockAddr, counter};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const LOOPBACK_BE: u32 = u32::from_be_bytes([127, 0, 0, 1]).to_be();

/// connect() return values for cgroup/connect programs.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[map(name = "EGRESS_CONFIG")]
static CONFIG: Array<AgentConfig> = Array::pinned(1, 0);

#[map(name = "EGRESS_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

/// Socket cookie -> original destination, between connect4 and sock_ops.
#[map(name = "EGRESS_PENDING")]
static PENDING: LruHashMap<u64, SockAddr> = LruHashMap::pinned(65536, 0);

/// Client-side local address of a redirected connection -> original destination.
/// Unique while the connection exists, so concurrent connects and port reuse cannot mix up
/// entries; the agent deletes each entry once read, LRU ages out the rest.
#[map(name = "EGRESS_ORIG_DST")]
static ORIG_DST: LruHashMap<SockAddr, SockAddr> = LruHashMap::pinned(65536, 0);

/// Filled by the agent from its policy. Keys are IPv4 addresses in network byte order.
#[map(name = "EGRESS_DENY4")]
static DENY4: LpmTrie<u32, u8> = LpmTrie::pinned(MAX_RANGES, 0);

#[map(name = "EGRESS_BYPASS4")]
static BYPASS4: LpmTrie<u32, u8> = LpmTrie::pinned(MAX_RANGES, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer can race this increment.
        unsafe { *slot += 1 };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn egress_connect4(ctx: SockAddrContext) -> i32 {
    decide_connect4(&ctx)
}

#[inline(always)]
fn decide_connect4(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        count(counter::PASS_NOT_TCP);
        return ALLOW;
    }
    count(counter::CONNECT_SEEN);

    let dst_ip = sa.user_ip4;
    let first_octet = u32::from_be(dst_ip) >> 24;
    if first_octet == 127 || dst_ip == 0 {
        count(counter::PASS_LOOPBACK);
        return ALLOW;
    }

    let Some(cfg) = CONFIG.get(0) else {
        count(counter::DENY_UNCONFIGURED);
        return DENY;
    };
    if cfg.ready == 0 {
        count(counter::DENY_UNCONFIGURED);
        return DENY;
    }
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    if mark == cfg.agent_mark {
        count(counter::PASS_AGENT);
        return ALLOW;
    }

    let dst_port = u16::from_be(sa.user_port as u16);
    // IP-only decisions never cost a trip through the agent: deny first, then bypass.
    let key = Key::new(32, dst_ip);
    if DENY4.get(&key).is_some() {
        count(counter::DENY_BLACKLIST);
        if cfg.flags & FLAG_KERNEL_LOG != 0 {
            debug!(ctx, "deny {:i}:{}", u32::from_be(dst_ip), dst_port);
        }
        return DENY;
    }
    if BYPASS4.get(&key).is_some() {
        count(counter::PASS_NO_PROXY);
        return ALLOW;
    }

    let original = SockAddr::v4(dst_ip, dst_port);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if PENDING.insert(cookie, original, BPF_ANY as u64).is_err() {
        // Without the original destination the agent could not route it: refuse, never leak.
        count(counter::DENY_NO_STATE);
        return DENY;
    }

    sa.user_ip4 = LOOPBACK_BE;
    sa.user_port = (cfg.listen_port.to_be()) as u32;
    count(counter::REDIRECTED);
    if cfg.flags & FLAG_KERNEL_LOG != 0 {
        debug!(
            ctx,
            "redirect {:i}:{} cookie {}",
            u32::from_be(dst_ip),
            dst_port,
            cookie
        );
    }
    ALLOW
}

#[sock_ops]
pub fn egress_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB && ctx.family() == AF_INET as u32 {
        record_original_dst(&ctx);
    }
    0
}

#[inline(always)]
fn record_original_dst(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(original) = (unsafe { PENDING.get(cookie) }) else {
        return;
    };
    let original = *original;
    let local = SockAddr::v4(ctx.local_ip4(), ctx.local_port() as u16);
    if ORIG_DST.insert(local, original, BPF_ANY as u64).is_ok() {
        count(counter::ORIGDST_RECORDED);
    }
    let _ = PENDING.remove(cookie);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
