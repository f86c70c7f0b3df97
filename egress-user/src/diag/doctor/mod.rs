//! `egress doctor --server-name NAME`: Matrix server discovery as a homeserver performs it
//! (.well-known delegation, SRV `_matrix-fed._tcp` then `_matrix._tcp`, port 8448), with every
//! connection routed the way egress routes the homeserver's (kernel decision, policy, CONNECT
//! through the upstream proxy), then TLS checked for the right name, then the federation
//! version endpoint asked. Each step is reported, after how this host resolves names where
//! egress cannot see ([`resolution`]).

pub mod discovery;
pub mod dns;
pub mod probe;
pub mod report;
pub mod resolution;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde_json::{Value, json};

use self::{
    discovery::{FEDERATION_PORT, FirstStep, Host, ServerName, first_step, parse_well_known, srv_names},
    dns::{Dns, Missing},
    probe::Probe,
    report::{Federation, Report, Status},
};
use crate::agent::Routing;

/// At most this many addresses of one host are tried.
const MAX_ADDRESSES: usize = 3;

pub struct Options {
    pub ca_files: Vec<PathBuf>,
    pub timeout: Duration,
    /// Mark on the doctor's connections, so that it is not intercepted itself (0: none).
    pub mark: u32,
}

/// Where federation requests go after discovery.
struct Endpoint {
    host: Host,
    port: u16,
    tls_name: String,
    host_header: String,
}

pub async fn diagnose(routing: &Routing, server_name: &str, options: &Options) -> Report {
    let mut report = Report::new(server_name);
    let server = match ServerName::parse(server_name) {
        Ok(server) => server,
        Err(e) => {
            report.add("server name", Status::Fail, e, Value::Null);
            return report;
        }
    };
    let findings = resolution::HostResolution::read().findings();
    if findings.is_empty() {
        report.ok(
            "host resolution",
            "names are resolved by DNS over UDP/TCP (and localhost entries): egress reads the answers",
            Value::Null,
        );
    }
    for (status, finding) in findings {
        report.add("host resolution", status, finding, Value::Null);
    }
    let (tls, dns) = match (probe::origin_tls(&options.ca_files), Dns::from_system()) {
        (Ok(tls), Ok(dns)) => (tls, dns),
        (Err(e), _) | (_, Err(e)) => {
            report.add("setup", Status::Fail, format!("{e:#}"), Value::Null);
            return report;
        }
    };
    let probe = Probe {
        routing,
        tls,
        timeout: options.timeout,
        mark: options.mark,
    };
    let endpoint = match first_step(&server) {
        FirstStep::Fixed {
            host,
            port,
            host_header,
        } => {
            report.ok(
                "server name",
                format!(
                    "{server}: {} given, so no .well-known or SRV lookup",
                    fixed_reason(&host)
                ),
                json!({"host": host, "port": port}),
            );
            Endpoint {
                host,
                port,
                tls_name: server.tls_name(),
                host_header,
            }
        }
        FirstStep::Lookup { name } => {
            report.ok(
                "server name",
                format!("{name}: no port, so .well-known first"),
                json!({"host": name}),
            );
            match well_known(&probe, &dns, &name, &mut report).await {
                Some(delegated) => delegated_endpoint(routing, &dns, &delegated, &mut report).await,
                None => srv_endpoint(routing, &dns, &name, &mut report).await,
            }
        }
    };
    federation_version(&probe, &dns, &endpoint, &mut report).await;
    report.ok = report.federation.is_some();
    report
}

fn fixed_reason(host: &Host) -> &'static str {
    match host {
        Host::Ip(_) => "IP literal",
        Host::Name(_) => "explicit port",
    }
}

/// `GET https://name/.well-known/matrix/server`: the delegated server name, if there is one.
async fn well_known(probe: &Probe<'_>, dns: &Dns, name: &str, report: &mut Report) -> Option<ServerName> {
    let ips = resolve(dns, name, Status::Warn, report).await?;
    let mut answer = None;
    for ip in ips.into_iter().take(MAX_ADDRESSES) {
        let addr = SocketAddr::new(ip, 443);
        // A failing .well-known is not fatal: discovery falls back to SRV, hence Warn.
        answer = probe
            .https_get(
                report,
                Status::Warn,
                addr,
                name,
                name,
                "/.well-known/matrix/server",
            )
            .await;
        if answer.is_some() {
            break;
        }
    }
    let Some(answer) = answer else {
        report.add(
            "well-known",
            Status::Warn,
            format!("could not fetch https://{name}/.well-known/matrix/server: falling back to SRV"),
            Value::Null,
        );
        return None;
    };
    if answer.status != 200 {
        let note = if (300..400).contains(&answer.status) {
            " (a redirect: egress doctor does not follow it, a homeserver does)"
        } else {
            ""
        };
        report.info(
            "well-known",
            format!("no delegation: answer {}{note}; trying SRV", answer.status),
            json!({"status": answer.status}),
        );
        return None;
    }
    match parse_well_known(&answer.body) {
        Ok(delegated) => {
            report.ok(
                "well-known",
                format!("m.server = {delegated}"),
                json!({"m.server": delegated.to_string()}),
            );
            Some(delegated)
        }
        Err(e) => {
            report.add(
                "well-known",
                Status::Warn,
                format!("ignored (as a homeserver ignores it): {e}; trying SRV"),
                json!({"error": e}),
            );
            None
        }
    }
}

/// Steps 3.1-3.5: the delegated name's IP literal, explicit port, SRV records, or 8448. The
/// certificate must be valid for the delegated name.
async fn delegated_endpoint(
    routing: &Routing,
    dns: &Dns,
    delegated: &ServerName,
    report: &mut Report,
) -> Endpoint {
    match first_step(delegated) {
        FirstStep::Fixed {
            host,
            port,
            host_header,
        } => Endpoint {
            host,
            port,
            tls_name: delegated.tls_name(),
            host_header,
        },
        FirstStep::Lookup { name } => srv_endpoint(routing, dns, &name, report).await,
    }
}

/// SRV `_matrix-fed._tcp.name`, then `_matrix._tcp.name`, else name:8448. Host header and
/// certificate stay `name` whatever the SRV target is.
async fn srv_endpoint(routing: &Routing, dns: &Dns, name: &str, report: &mut Report) -> Endpoint {
    for srv_name in srv_names(name) {
        match dns.srv(&srv_name).await {
            Ok(targets) => {
                let first = &targets[0];
                let all: Vec<String> = targets.iter().map(|t| format!("{}:{}", t.host, t.port)).collect();
                report.ok(
                    "srv",
                    format!("{srv_name} -> {}", all.join(", ")),
                    json!({"name": srv_name, "targets": all}),
                );
                if first.host != name && routing.proxies().https.is_some() && !routing.settings.connect_by_ip
                {
                    report.add(
                        "srv",
                        Status::Warn,
                        format!(
                            "egress sends CONNECT {name}:{port} (the TLS name), so the proxy connects to \
                             where {name} resolves for it, not to the SRV target {target}; if those \
                             differ, set connect_by_ip = true",
                            port = first.port,
                            target = first.host,
                        ),
                        Value::Null,
                    );
                }
                return Endpoint {
                    host: Host::Name(first.host.clone()),
                    port: first.port,
                    tls_name: name.to_owned(),
                    host_header: name.to_owned(),
                };
            }
            Err(Missing::NoRecords) => report.info(
                "srv",
                format!("{srv_name}: no records"),
                json!({"name": srv_name}),
            ),
            Err(Missing::Error(e)) => report.add(
                "srv",
                Status::Warn,
                format!("{srv_name}: lookup failed: {e}"),
                json!({"name": srv_name, "error": e}),
            ),
        }
    }
    report.info(
        "srv",
        format!("no SRV records: using {name}:{FEDERATION_PORT}"),
        Value::Null,
    );
    Endpoint {
        host: Host::Name(name.to_owned()),
        port: FEDERATION_PORT,
        tls_name: name.to_owned(),
        host_header: name.to_owned(),
    }
}

async fn resolve(dns: &Dns, host: &str, severity: Status, report: &mut Report) -> Option<Vec<IpAddr>> {
    match dns.addresses(host).await {
        Ok(ips) => {
            let list: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
            report.ok(
                "resolve",
                format!("{host} -> {}", list.join(", ")),
                json!({"host": host, "addresses": list}),
            );
            Some(ips)
        }
        Err(Missing::NoRecords) => {
            report.add(
                "resolve",
                severity,
                format!("{host}: no addresses"),
                json!({"host": host}),
            );
            None
        }
        Err(Missing::Error(e)) => {
            report.add(
                "resolve",
                severity,
                format!("{host}: {e}"),
                json!({"host": host, "error": e}),
            );
            None
        }
    }
}

/// `GET /_matrix/federation/v1/version` at the endpoint, trying its addresses in order.
async fn federation_version(probe: &Probe<'_>, dns: &Dns, endpoint: &Endpoint, report: &mut Report) {
    let ips = match &endpoint.host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => match resolve(dns, name, Status::Fail, report).await {
            Some(ips) => ips,
            None => return,
        },
    };
    for ip in ips.into_iter().take(MAX_ADDRESSES) {
        let addr = SocketAddr::new(ip, endpoint.port);
        let path = "/_matrix/federation/v1/version";
        let Some(answer) = probe
            .https_get(
                report,
                Status::Fail,
                addr,
                &endpoint.tls_name,
                &endpoint.host_header,
                path,
            )
            .await
        else {
            continue;
        };
        let server = serde_json::from_slice::<Value>(&answer.body)
            .ok()
            .and_then(|v| v.get("server").cloned())
            .filter(|_| answer.status == 200);
        let Some(server) = server else {
            report.add(
                "version",
                Status::Fail,
                format!(
                    "answer {} is not a federation version answer (is this a Matrix homeserver?)",
                    answer.status
                ),
                json!({"status": answer.status}),
            );
            continue;
        };
        let describe = |key: &str| server.get(key).and_then(Value::as_str).unwrap_or("?").to_owned();
        report.ok(
            "version",
            format!("{} {}", describe("name"), describe("version")),
            json!({"server": server}),
        );
        report.federation = Some(Federation {
            ip: ip.to_string(),
            port: endpoint.port,
            tls_name: endpoint.tls_name.clone(),
            host_header: endpoint.host_header.clone(),
            server,
        });
        return;
    }
}
