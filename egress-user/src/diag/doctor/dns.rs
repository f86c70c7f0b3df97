//! DNS the way a homeserver looks things up: SRV records from the nameservers in
//! /etc/resolv.conf (hickory), addresses from the system resolver (getaddrinfo, so /etc/hosts
//! counts, as it does for Synapse).

use std::net::IpAddr;

use hickory_resolver::TokioResolver;

/// One SRV answer, in the order to try.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvTarget {
    pub host: String,
    pub port: u16,
    pub priority: u16,
    pub weight: u16,
}

/// How a lookup ended when it found nothing.
#[derive(Debug)]
pub enum Missing {
    /// The name or record type does not exist: discovery moves on.
    NoRecords,
    /// The lookup itself failed (timeout, no nameserver): worth a warning.
    Error(String),
}

pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    pub fn from_system() -> anyhow::Result<Self> {
        let resolver = TokioResolver::builder_tokio()
            .map_err(|e| anyhow::anyhow!("reading /etc/resolv.conf: {e}"))?
            .build();
        Ok(Self { resolver })
    }

    /// SRV records for `name`, lowest priority first, then highest weight.
    pub async fn srv(&self, name: &str) -> Result<Vec<SrvTarget>, Missing> {
        // A trailing dot: the name is absolute, no search domains appended.
        let lookup = self.resolver.srv_lookup(format!("{name}.")).await.map_err(|e| {
            if e.is_no_records_found() {
                Missing::NoRecords
            } else {
                Missing::Error(e.to_string())
            }
        })?;
        let mut targets: Vec<SrvTarget> = lookup
            .iter()
            .map(|srv| SrvTarget {
                host: srv.target().to_utf8().trim_end_matches('.').to_ascii_lowercase(),
                port: srv.port(),
                priority: srv.priority(),
                weight: srv.weight(),
            })
            // "." as target means: the service is decidedly not available.
            .filter(|t| !t.host.is_empty())
            .collect();
        targets.sort_by_key(|t| (t.priority, std::cmp::Reverse(t.weight)));
        if targets.is_empty() {
            return Err(Missing::NoRecords);
        }
        Ok(targets)
    }

    /// The addresses of `host`, as getaddrinfo returns them.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, Missing> {
        let found = tokio::net::lookup_host((host, 0))
            .await
            .map_err(|e| Missing::Error(e.to_string()))?;
        let mut ips: Vec<IpAddr> = Vec::new();
        for addr in found {
            if !ips.contains(&addr.ip()) {
                ips.push(addr.ip());
            }
        }
        if ips.is_empty() {
            return Err(Missing::NoRecords);
        }
        Ok(ips)
    }
}
