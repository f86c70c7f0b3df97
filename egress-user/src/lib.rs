//! egress: a transparent egress proxy for Matrix homeserver hosts.
//!
//! One owner per concern, and imports go one way, down this list (`cargo xtask test` fails on
//! an import cycle between these modules):
//!
//! - `cli` ties commands to modules; `daemon` runs `egress run`; `admin` serves /health and
//!   /metrics; `diag` explains egress to admins (check-config, explain, status, doctor);
//! - `proxy`: the data path, accept → sniff → plan → upstream → relay → decision;
//! - `agent`: the running agent's state, which the data path reads, and reloading it;
//! - `workloads`: what is served and how: cgroups, units, containers, pods, their network
//!   namespaces and listeners;
//! - `dns`: the names behind addresses (the record of DNS answers, synthetic DNS);
//! - `upstream`: the proxies: TLS to them, ready connections, CONNECT;
//! - `kernel`: loading, attaching and pinning the eBPF programs, and their maps;
//! - `config`: every setting declared once, and the sources it is read from;
//! - `route`: the pure routing decision (policy and plan); `metrics`, `hostport`, `redact`.

mod admin;
mod agent;
mod cli;
mod config;
mod daemon;
mod diag;
mod dns;
mod hostport;
mod kernel;
mod metrics;
mod proxy;
mod redact;
mod route;
mod upstream;
mod workloads;

pub use cli::main;

/// What the fuzz targets exercise: the parsers that take input from clients, proxies and
/// admins. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::config::proxy_url::ProxyUrl;
    pub use crate::hostport::valid_hostname;
    pub use crate::proxy::sniff::{MAX_SNIFF_BYTES, Sniff, sniff};
    pub use crate::route::{plan::Sniffed, policy::NoProxy};
    pub use crate::upstream::{UpstreamError, connect_exchange};
    pub use bytes::Bytes;

    /// An answer of the container engine or the Kubernetes API server, replayed and then
    /// closed: its status and body length, if it was taken; the body is then read as a pod
    /// list.
    pub fn api_answer(bytes: &[u8]) -> Option<(u16, usize)> {
        use std::io::{Read, Write};

        use crate::workloads::{api, kubernetes};
        struct Replay<'a>(&'a [u8]);
        impl Read for Replay<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                self.0.read(buf)
            }
        }
        impl Write for Replay<'_> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        impl api::TimedRead for Replay<'_> {
            fn set_read_limit(&mut self, _: std::time::Duration) -> std::io::Result<()> {
                Ok(())
            }
        }
        let limit = std::time::Duration::from_secs(5);
        let answer = api::get(&mut Replay(bytes), "fuzz", "api", "/", "", limit, 1 << 20).ok()?;
        let _ = kubernetes::selected_pods(&answer.body);
        Some((answer.status, answer.body.len()))
    }

    /// The pod UID egress reads in a cgroup directory's name (see `containers::kubernetes`).
    pub fn pod_uid_in(dir_name: &str) -> Option<String> {
        crate::workloads::kubernetes::pod_uid_in(dir_name)
    }

    /// A DNS message from an application (or a forger): seen as a query and then as its own
    /// answer by the record, and handled by synthetic DNS. Returns the synthetic reply, if any.
    pub fn dns_message(bytes: &[u8]) -> Option<Vec<u8>> {
        use std::{net::IpAddr, time::Instant};

        use crate::dns::{
            record::{Observed, Records},
            synthetic::{Allocator, Handling, handle},
        };
        let mut records = Records::default();
        let now = Instant::now();
        let server: IpAddr = [127, 0, 0, 53].into();
        for answer in [false, true] {
            records.observe(
                Observed {
                    netns: 1,
                    socket: 1,
                    server,
                    answer,
                    message: bytes,
                },
                now,
            );
        }
        let _ = records.resolved(1, [93, 184, 216, 34].into(), 8448, Some("matrix.example"), now);
        let _ = records.known(1, None, None, now);
        let query = hickory_proto::op::Message::from_vec(bytes).ok()?;
        let mut allocator = Allocator::new("240.64.0.0/29".parse().expect("a range"));
        let no_proxy = NoProxy::parse_list(["internal.example"]).expect("a no_proxy list");
        match handle(&query, &no_proxy, &mut allocator) {
            Handling::Answer(reply) | Handling::Allocated(reply, ..) => reply.to_vec().ok(),
            Handling::Forward => None,
        }
    }
}
