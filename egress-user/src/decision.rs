//! One structured log line per connection (in the manner of Smokescreen's canonical log line):
//! what was asked for, what was decided, how it ended.

use std::{net::SocketAddr, time::Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Tunnelled through the upstream proxy with CONNECT.
    Connect,
    /// Refused before any upstream contact.
    Refused,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Connect => "proxy-connect",
            Route::Refused => "refused",
        }
    }
}

pub struct Decision {
    pub id: u64,
    pub started: Instant,
    pub client: SocketAddr,
    pub original_dst: Option<SocketAddr>,
    pub route: Route,
    pub rule: &'static str,
    pub upstream: Option<String>,
    pub upstream_status: Option<u16>,
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
            route: Route::Refused,
            rule: "default",
            upstream: None,
            upstream_status: None,
            bytes_up: 0,
            bytes_down: 0,
            error: None,
        }
    }

    /// Emits the line; `outcome` is `ok` or `error`.
    pub fn log(&self) {
        let outcome = if self.error.is_some() { "error" } else { "ok" };
        tracing::info!(
            target: "egress::decision",
            conn = self.id,
            client = %self.client,
            original_dst = %display_opt(&self.original_dst),
            route = %self.route.as_str(),
            rule = %self.rule,
            upstream = %display_opt(&self.upstream),
            status = %display_opt(&self.upstream_status),
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
