//! One structured log line per connection (in the manner of Smokescreen's canonical log line):
//! what was asked for, what was decided and by which rule, how it ended.

use std::{net::SocketAddr, time::Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Not decided yet, or failed before a decision.
    None,
    /// Refused by policy.
    Deny,
    /// Connected directly by the agent (no_proxy, or no proxy for the protocol).
    Direct,
    /// Tunnelled through the upstream proxy with CONNECT.
    ProxyConnect,
    /// Plain HTTP forwarded through the upstream proxy in absolute form.
    ProxyForward,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::None => "none",
            Route::Deny => "deny",
            Route::Direct => "direct",
            Route::ProxyConnect => "proxy-connect",
            Route::ProxyForward => "proxy-forward",
        }
    }
}

pub struct Decision {
    pub id: u64,
    pub started: Instant,
    pub client: SocketAddr,
    pub original_dst: Option<SocketAddr>,
    /// tls, http or unknown, from the first bytes.
    pub protocol: &'static str,
    /// SNI or Host, when the client sent one.
    pub name: Option<String>,
    pub route: Route,
    pub rule: String,
    pub upstream: Option<String>,
    /// What was asked of the upstream proxy (CONNECT target or absolute-form authority).
    pub target: Option<String>,
    pub upstream_status: Option<u16>,
    pub requests: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub error: Option<String>,
}

impl Decision {
    pub fn new(id: u64, client: SocketAddr) -> Self {
        Self {
            id,
            started: Instant::now(),
            client,
            original_dst: None,
            protocol: "-",
            name: None,
            route: Route::None,
            rule: "-".into(),
            upstream: None,
            target: None,
            upstream_status: None,
            requests: 0,
            bytes_up: 0,
            bytes_down: 0,
            error: None,
        }
    }

    pub fn fail(&mut self, error: impl ToString) {
        self.error = Some(error.to_string());
    }

    /// Emits the line; `outcome` is `ok` or `error`.
    pub fn log(&self) {
        let outcome = if self.error.is_some() { "error" } else { "ok" };
        tracing::info!(
            target: "egress::decision",
            conn = self.id,
            client = %self.client,
            original_dst = %display_opt(&self.original_dst),
            protocol = %self.protocol,
            name = %display_opt(&self.name),
            route = %self.route.as_str(),
            rule = ?self.rule,
            upstream = %display_opt(&self.upstream),
            target = %display_opt(&self.target),
            status = %display_opt(&self.upstream_status),
            requests = self.requests,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = self.started.elapsed().as_millis() as u64,
            outcome = %outcome,
            error = %display_opt(&self.error),
            "decision"
        );
    }
}

fn display_opt<T: std::fmt::Display>(value: &Option<T>) -> String {
    value.as_ref().map_or_else(|| "-".to_owned(), ToString::to_string)
}
