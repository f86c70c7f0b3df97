//! Prometheus metrics: what the kernel decided (its counters, read at scrape time), and per
//! connection what the agent decided and how it went.

use std::time::Duration;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// A finished connection, as the metrics count it.
pub struct Closed {
    /// The plan's action (`deny`, `direct`, `proxy-connect`, `proxy-forward`), or `none`.
    pub route: &'static str,
    /// `ok`, `denied` or `error`.
    pub outcome: &'static str,
    pub rule_kind: &'static str,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Of the bytes relayed, those moved by splice(2).
    pub bytes_spliced: u64,
}

/// What became of a query to synthetic DNS.
#[derive(Clone, Copy, Debug)]
pub enum DnsOutcome {
    /// Answered here (a synthetic address, or an answer such as NXDOMAIN for a bad name).
    Synthesized,
    /// Answered by the internal resolver.
    Forwarded,
    /// The internal resolver did not answer; SERVFAIL.
    Failed,
    /// Not redirected by egress; no answer.
    Ignored,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    route: &'static str,
    outcome: &'static str,
    rule_kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    connection: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProxyLabels {
    proxy: String,
}

/// An upstream proxy as the metrics show it.
pub struct ProxyState {
    /// `host:port`.
    pub proxy: String,
    pub up: bool,
    /// Connections that moved on past it because it failed.
    pub failovers: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KernelLabels {
    decision: &'static str,
}

pub struct Metrics {
    registry: Registry,
    connections: Family<ConnectionLabels, Counter>,
    active: Gauge,
    bytes: Family<DirectionLabels, Counter>,
    relay_bytes: Family<MethodLabels, Counter>,
    upstream_seconds: Histogram,
    upstream_connections: Family<PoolLabels, Counter>,
    dns_queries: Family<DnsLabels, Counter>,
    proxy_up: Family<ProxyLabels, Gauge>,
    proxy_failovers: Family<ProxyLabels, Counter>,
    kernel: Family<KernelLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("egress");
        let connections = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "connections",
            "Connections handled by the agent, by route, outcome and the kind of rule that decided",
            connections.clone(),
        );
        let active = Gauge::default();
        registry.register(
            "connections_active",
            "Connections open in the agent now",
            active.clone(),
        );
        let bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "bytes",
            "Bytes relayed: up = client to destination, down = back",
            bytes.clone(),
        );
        let relay_bytes = Family::<MethodLabels, Counter>::default();
        registry.register(
            "relay_bytes",
            "Bytes relayed, by how they moved: splice(2) through a pipe, or copied through memory",
            relay_bytes.clone(),
        );
        // 1 ms .. ~16 s
        let upstream_seconds = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 16.0,
        ]);
        registry.register(
            "upstream_connect_seconds",
            "Time to reach the destination: proxy connect and CONNECT answer, or direct connect",
            upstream_seconds.clone(),
        );
        let upstream_connections = Family::<PoolLabels, Counter>::default();
        registry.register(
            "upstream_connections",
            "Connections to upstream proxies taken for tunnels: warm (ready from the pool) or new",
            upstream_connections.clone(),
        );
        let dns_queries = Family::<DnsLabels, Counter>::default();
        registry.register(
            "dns_queries",
            "Queries to synthetic DNS: synthesized, forwarded (no_proxy names, other types), \
             failed (the resolver did not answer), or ignored (not redirected by egress: a local \
             user sending to the port, or a socket that is gone)",
            dns_queries.clone(),
        );
        let proxy_up = Family::<ProxyLabels, Gauge>::default();
        registry.register(
            "proxy_up",
            "Whether each upstream proxy is taking connections (1), or is down and probed (0)",
            proxy_up.clone(),
        );
        let proxy_failovers = Family::<ProxyLabels, Counter>::default();
        registry.register(
            "proxy_failovers",
            "Connections that went on to the next proxy of a list because this one failed",
            proxy_failovers.clone(),
        );
        let kernel = Family::<KernelLabels, Counter>::default();
        registry.register(
            "kernel_decisions",
            "Decisions taken by the kernel programs (sum over CPUs since the maps were pinned)",
            kernel.clone(),
        );
        Self {
            registry,
            connections,
            active,
            bytes,
            relay_bytes,
            upstream_seconds,
            upstream_connections,
            dns_queries,
            proxy_up,
            proxy_failovers,
            kernel,
        }
    }

    /// Counts a connection to an upstream proxy taken for a tunnel.
    pub fn upstream_connection(&self, warm: bool) {
        let connection = if warm { "warm" } else { "new" };
        self.upstream_connections
            .get_or_create(&PoolLabels { connection })
            .inc();
    }

    /// Counts a query to synthetic DNS by what became of it.
    pub fn dns_query(&self, outcome: DnsOutcome) {
        let outcome = match outcome {
            DnsOutcome::Synthesized => "synthesized",
            DnsOutcome::Forwarded => "forwarded",
            DnsOutcome::Failed => "failed",
            DnsOutcome::Ignored => "ignored",
        };
        self.dns_queries.get_or_create(&DnsLabels { outcome }).inc();
    }

    pub fn connection_opened(&self) {
        self.active.inc();
    }

    /// Records a finished connection.
    pub fn connection_closed(&self, closed: &Closed) {
        self.active.dec();
        self.connections
            .get_or_create(&ConnectionLabels {
                route: closed.route,
                outcome: closed.outcome,
                rule_kind: closed.rule_kind,
            })
            .inc();
        let relayed = closed.bytes_up + closed.bytes_down;
        self.relay_bytes
            .get_or_create(&MethodLabels { method: "splice" })
            .inc_by(closed.bytes_spliced);
        self.relay_bytes
            .get_or_create(&MethodLabels { method: "copy" })
            .inc_by(relayed.saturating_sub(closed.bytes_spliced));
        self.bytes
            .get_or_create(&DirectionLabels { direction: "up" })
            .inc_by(closed.bytes_up);
        self.bytes
            .get_or_create(&DirectionLabels { direction: "down" })
            .inc_by(closed.bytes_down);
    }

    pub fn active_connections(&self) -> u64 {
        self.active.get().max(0) as u64
    }

    pub fn upstream_latency(&self, elapsed: Duration) {
        self.upstream_seconds.observe(elapsed.as_secs_f64());
    }

    /// The text exposition (OpenMetrics), with the kernel counters and proxy states as given.
    pub fn encode(&self, kernel_counters: &[(&'static str, u64)], proxies: &[ProxyState]) -> String {
        // Only the proxies of the configuration in force (a reload may have dropped some).
        self.proxy_up.clear();
        self.proxy_failovers.clear();
        for state in proxies {
            let labels = ProxyLabels {
                proxy: state.proxy.clone(),
            };
            self.proxy_up.get_or_create(&labels).set(i64::from(state.up));
            self.proxy_failovers
                .get_or_create(&labels)
                .inner()
                .store(state.failovers, std::sync::atomic::Ordering::Relaxed);
        }
        for (name, value) in kernel_counters {
            let counter = self.kernel.get_or_create(&KernelLabels { decision: name });
            counter
                .inner()
                .store(*value, std::sync::atomic::Ordering::Relaxed);
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family_with_its_values() {
        let metrics = Metrics::new();
        let closed = |route, outcome, rule_kind, bytes_up, bytes_down, bytes_spliced| Closed {
            route,
            outcome,
            rule_kind,
            bytes_up,
            bytes_down,
            bytes_spliced,
        };
        for end in [
            closed("proxy-connect", "ok", "proxy", 100, 2000, 1500),
            closed("proxy-connect", "ok", "proxy", 4000, 6000, 9000),
            closed("proxy-connect", "error", "proxy", 0, 0, 0),
            closed("deny", "denied", "blacklist", 0, 0, 0),
        ] {
            metrics.connection_opened();
            metrics.connection_closed(&end);
        }
        // Still open: counted as active.
        metrics.connection_opened();
        metrics.upstream_latency(Duration::from_millis(3));
        metrics.upstream_connection(true);
        metrics.upstream_connection(true);
        metrics.upstream_connection(false);
        metrics.dns_query(DnsOutcome::Ignored);
        metrics.dns_query(DnsOutcome::Ignored);
        metrics.dns_query(DnsOutcome::Synthesized);
        let proxies = [
            ProxyState {
                proxy: "a:3128".into(),
                up: true,
                failovers: 0,
            },
            ProxyState {
                proxy: "b:3128".into(),
                up: false,
                failovers: 5,
            },
        ];
        let text = metrics.encode(&[("redirected", 7), ("deny_blacklist", 2)], &proxies);
        for line in [
            "egress_connections_total{route=\"proxy-connect\",outcome=\"ok\",rule_kind=\"proxy\"} 2",
            "egress_connections_total{route=\"proxy-connect\",outcome=\"error\",rule_kind=\"proxy\"} 1",
            "egress_connections_total{route=\"deny\",outcome=\"denied\",rule_kind=\"blacklist\"} 1",
            "egress_connections_active 1",
            "egress_bytes_total{direction=\"up\"} 4100",
            "egress_bytes_total{direction=\"down\"} 8000",
            "egress_relay_bytes_total{method=\"splice\"} 10500",
            "egress_relay_bytes_total{method=\"copy\"} 1600",
            "egress_upstream_connections_total{connection=\"warm\"} 2",
            "egress_upstream_connections_total{connection=\"new\"} 1",
            "egress_upstream_connect_seconds_count 1",
            "egress_upstream_connect_seconds_bucket{le=\"0.005\"} 1",
            "egress_upstream_connect_seconds_bucket{le=\"0.0025\"} 0",
            "egress_dns_queries_total{outcome=\"ignored\"} 2",
            "egress_proxy_up{proxy=\"a:3128\"} 1",
            "egress_proxy_up{proxy=\"b:3128\"} 0",
            "egress_proxy_failovers_total{proxy=\"b:3128\"} 5",
            "egress_dns_queries_total{outcome=\"synthesized\"} 1",
            "egress_kernel_decisions_total{decision=\"redirected\"} 7",
            "egress_kernel_decisions_total{decision=\"deny_blacklist\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
        // Kernel counters are absolute values, not increments.
        let text = metrics.encode(&[("redirected", 9)], &[]);
        assert!(
            text.contains("egress_kernel_decisions_total{decision=\"redirected\"} 9"),
            "{text}"
        );
    }
}
