//! One structured log line per connection (Smokescreen's canonical log line): what was asked
//! for, what was decided and by which rule, how it ended. The record is a guard: it logs and
//! counts exactly once when dropped, so a connection whose task panics or is cancelled still
//! gets its line and leaves `egress_connections_active` right.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use crate::{
    metrics::{Closed, Metrics},
    route::{
        plan::{Action, Protocol, TargetName},
        policy::Rule,
    },
};

/// How the connection ended, which sets the line's level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Routed as planned (info).
    Allowed,
    /// Refused by policy (warn).
    Denied,
    /// Something failed: no original destination, the client, the upstream (error).
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "ok",
            Outcome::Denied => "denied",
            Outcome::Failed => "error",
        }
    }
}

pub struct Decision {
    metrics: Arc<Metrics>,
    pub id: u64,
    started: Instant,
    pub client: SocketAddr,
    /// The client's network namespace (nsfs inode) when it is not the agent's own: a container.
    pub netns: Option<u64>,
    pub original_dst: Option<SocketAddr>,
    pub protocol: Option<Protocol>,
    /// SNI or Host, when the client sent one.
    pub name: Option<String>,
    /// The name the application's DNS answers gave the original destination, if any.
    pub resolved_name: Option<String>,
    /// The name the plan went by (policy, CONNECT target), and where it came from.
    pub route_name: Option<String>,
    pub named_by: Option<TargetName>,
    /// The agent's own lookup of SRV targets (`done`, `failed`), and how long it took.
    pub lookup: Option<&'static str>,
    pub lookup_us: Option<u64>,
    /// The plan's action (`deny`, `direct`, `proxy-connect`, `proxy-forward`), once planned.
    pub route: Option<&'static str>,
    pub rule: Option<Rule>,
    /// The proxy list planned, then the proxy of it that carried the connection.
    pub upstream: Option<String>,
    /// How egress authenticated to that proxy: `basic`, `negotiate` or `none`.
    pub upstream_auth: Option<&'static str>,
    /// What was asked of the upstream proxy (CONNECT target or absolute-form authority), or the
    /// direct destination.
    pub target: Option<String>,
    pub upstream_status: Option<u16>,
    pub requests: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Of the bytes relayed, those moved by splice(2) through a pipe (the rest were copied
    /// through memory).
    pub bytes_spliced: u64,
    /// Whether the connection to the proxy came ready from the warm pool.
    pub upstream_warm: Option<bool>,
    /// Whether the client's first bytes went out with the CONNECT, ahead of the proxy's answer.
    pub optimistic: Option<bool>,
    pub error: Option<String>,
    /// Set when the connection's handling ran to its end; a record dropped without it was
    /// cancelled or panicked.
    finished: bool,
}

impl Decision {
    /// Opens the record of a new connection and counts it as active until the record drops.
    pub fn open(metrics: Arc<Metrics>, id: u64, client: SocketAddr) -> Self {
        metrics.connection_opened();
        Self {
            metrics,
            id,
            started: Instant::now(),
            client,
            netns: None,
            original_dst: None,
            protocol: None,
            name: None,
            resolved_name: None,
            route_name: None,
            named_by: None,
            lookup: None,
            lookup_us: None,
            route: None,
            rule: None,
            upstream: None,
            upstream_auth: None,
            target: None,
            upstream_status: None,
            requests: 0,
            bytes_up: 0,
            bytes_down: 0,
            bytes_spliced: 0,
            upstream_warm: None,
            optimistic: None,
            error: None,
            finished: false,
        }
    }

    /// The connection's handling is over (the record logs when it drops).
    pub fn finish(&mut self) {
        self.finished = true;
    }

    pub fn fail(&mut self, error: impl ToString) {
        self.error = Some(error.to_string());
    }

    /// Records the plan (its action, and its rule, taken over): route, rule, and where the
    /// connection goes. `upstream` names the proxy for the log (its URL's authority).
    pub fn planned<P>(&mut self, action: &Action<'_, P>, rule: Rule, upstream: impl Fn(&P) -> String) {
        self.route = Some(action.name());
        self.rule = Some(rule);
        match action {
            Action::Deny => {}
            Action::Direct { to } => self.target = Some(to.to_string()),
            Action::Connect { proxy, target } => {
                self.upstream = Some(upstream(proxy));
                self.target = Some(target.clone());
            }
            Action::Forward { proxy, authority } => {
                self.upstream = Some(upstream(proxy));
                self.target = Some(authority.clone());
            }
        }
    }

    pub fn outcome(&self) -> Outcome {
        if self.error.is_some() {
            Outcome::Failed
        } else if self.route == Some("deny") {
            Outcome::Denied
        } else {
            Outcome::Allowed
        }
    }

    pub fn rule_kind(&self) -> &'static str {
        self.rule.as_ref().map_or("none", |rule| rule.kind.as_str())
    }

    fn log(&self) {
        // The same fields at each level: tracing's levels are static per call site.
        macro_rules! line {
            ($level:expr) => {
                tracing::event!(
                    target: "egress::decision",
                    $level,
                    conn = self.id,
                    client = %self.client,
                    netns = %display_opt(&self.netns),
                    original_dst = %display_opt(&self.original_dst),
                    protocol = %self.protocol.map_or("-", Protocol::as_str),
                    name = %display_opt(&self.name),
                    dns_name = %display_opt(&self.resolved_name),
                    route_name = %display_opt(&self.route_name),
                    named_by = %self.named_by.map_or("-", TargetName::as_str),
                    lookup = %self.lookup.unwrap_or("-"),
                    lookup_us = %display_opt(&self.lookup_us),
                    route = %self.route.unwrap_or("none"),
                    rule = ?self.rule.as_ref().map_or_else(|| "-".to_owned(), ToString::to_string),
                    rule_kind = %self.rule_kind(),
                    upstream = %display_opt(&self.upstream),
                    auth = %self.upstream_auth.unwrap_or("-"),
                    target = %display_opt(&self.target),
                    status = %display_opt(&self.upstream_status),
                    upstream_conn = %self.upstream_warm.map_or("-", |warm| if warm { "warm" } else { "new" }),
                    optimistic = %self.optimistic.map_or("-", |sent| if sent { "yes" } else { "no" }),
                    requests = self.requests,
                    bytes_up = self.bytes_up,
                    bytes_down = self.bytes_down,
                    duration_ms = self.started.elapsed().as_millis() as u64,
                    outcome = %self.outcome().as_str(),
                    error = %display_opt(&self.error),
                    "decision"
                )
            };
        }
        match self.outcome() {
            Outcome::Allowed => line!(tracing::Level::INFO),
            Outcome::Denied => line!(tracing::Level::WARN),
            Outcome::Failed => line!(tracing::Level::ERROR),
        }
    }
}

impl Drop for Decision {
    fn drop(&mut self) {
        if self.error.is_none() && !self.finished {
            self.error = Some(if std::thread::panicking() {
                "the connection's task panicked".into()
            } else {
                "the connection's task was cancelled".into()
            });
        }
        self.log();
        self.metrics.connection_closed(&Closed {
            route: self.route.unwrap_or("none"),
            outcome: self.outcome().as_str(),
            rule_kind: self.rule_kind(),
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            bytes_spliced: self.bytes_spliced,
        });
    }
}

fn display_opt<T: std::fmt::Display>(value: &Option<T>) -> String {
    value.as_ref().map_or_else(|| "-".to_owned(), ToString::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::policy::RuleKind;

    fn open(metrics: &Arc<Metrics>, id: u64) -> Decision {
        Decision::open(metrics.clone(), id, "127.0.0.1:5000".parse().unwrap())
    }

    fn has_line(metrics: &Metrics, line: &str) -> bool {
        metrics.encode(&[], &[]).lines().any(|l| l == line)
    }

    /// Each record is counted once, when it drops, with its outcome and rule kind.
    #[test]
    fn records_count_once_by_outcome_and_rule_kind() {
        let metrics = Arc::new(Metrics::new());
        let mut denied = open(&metrics, 1);
        denied.route = Some("deny");
        denied.rule = Some(Rule::new(RuleKind::Blacklist, "10.0.0.0/8"));
        denied.finish();
        assert_eq!(metrics.active_connections(), 1);
        drop(denied);
        assert_eq!(metrics.active_connections(), 0);
        assert!(has_line(
            &metrics,
            "egress_connections_total{route=\"deny\",outcome=\"denied\",rule_kind=\"blacklist\"} 1"
        ));
        let mut failed = open(&metrics, 2);
        failed.route = Some("proxy-connect");
        failed.rule = Some(Rule::new(RuleKind::Proxy, ""));
        failed.fail("proxy answered 407");
        failed.finish();
        drop(failed);
        assert!(has_line(
            &metrics,
            "egress_connections_total{route=\"proxy-connect\",outcome=\"error\",rule_kind=\"proxy\"} 1"
        ));
    }

    /// A connection whose task is dropped halfway (cancelled, or unwinding from a panic) is
    /// still logged and counted once, as an error, and is no longer active.
    #[test]
    fn a_record_dropped_unfinished_counts_as_a_failure() {
        let metrics = Arc::new(Metrics::new());
        let in_task = metrics.clone();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let mut d = Decision::open(in_task, 1, "127.0.0.1:5000".parse().unwrap());
            d.route = Some("proxy-connect");
            panic!("in the middle of a connection");
        }));
        assert!(panicked.is_err());
        let cancelled = open(&metrics, 2);
        assert_eq!(cancelled.outcome(), Outcome::Allowed);
        drop(cancelled);
        assert_eq!(metrics.active_connections(), 0);
        assert!(has_line(
            &metrics,
            "egress_connections_total{route=\"proxy-connect\",outcome=\"error\",rule_kind=\"none\"} 1"
        ));
        assert!(has_line(
            &metrics,
            "egress_connections_total{route=\"none\",outcome=\"error\",rule_kind=\"none\"} 1"
        ));
    }
}
