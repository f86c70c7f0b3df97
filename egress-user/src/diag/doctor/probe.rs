//! One HTTPS request the way a homeserver's connection would travel through egress: the
//! kernel's decision on the address, the agent's policy with the TLS name, CONNECT through the
//! upstream proxy (or a direct connection where policy says so), then TLS verified for the
//! name, then `GET path`. Each stage becomes a step of the report.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use serde_json::json;
use tokio_rustls::TlsConnector;

use super::report::{Report, Status};
use crate::{
    agent::Routing,
    kernel::verdict::{KernelVerdict, kernel_verdict},
    route::plan::{Action, Sniffed, plan},
    upstream::{self, Role, UpstreamError, UpstreamStream},
};

/// Answers larger than this are not read further (.well-known and version answers are tiny).
const MAX_BODY: usize = 64 * 1024;

pub struct Probe<'a> {
    pub routing: &'a Routing,
    pub tls: TlsConnector,
    pub timeout: Duration,
    /// Mark for the doctor's own connections (0: none).
    pub mark: u32,
}

/// An HTTP answer that came back.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Probe<'_> {
    /// `GET https://{host_header}{path}` at `ip:port`, with SNI and certificate check for
    /// `tls_name`. Stage failures are reported with `severity` and end the probe.
    pub async fn https_get(
        &self,
        report: &mut Report,
        severity: Status,
        addr: SocketAddr,
        tls_name: &str,
        host_header: &str,
        path: &str,
    ) -> Option<Answer> {
        let stream = self.connect(report, severity, addr, tls_name).await?;
        let server_name = match ServerName::try_from(tls_name.to_owned()) {
            Ok(name) => name,
            Err(e) => {
                report.add(
                    "tls",
                    severity,
                    format!("{tls_name}: not a TLS server name: {e}"),
                    json!({}),
                );
                return None;
            }
        };
        let tls = match tokio::time::timeout(self.timeout, self.tls.connect(server_name, stream)).await {
            Ok(Ok(tls)) => {
                let version = tls.get_ref().1.protocol_version().map(|v| format!("{v:?}"));
                report.ok(
                    "tls",
                    format!("certificate valid for {tls_name}"),
                    json!({"name": tls_name, "version": version}),
                );
                tls
            }
            Ok(Err(e)) => {
                report.add(
                    "tls",
                    severity,
                    format!(
                        "certificate for {tls_name} rejected: {e} (a homeserver checks it the same \
                         way; the name must be in the certificate, issued by a CA the host trusts)"
                    ),
                    json!({"name": tls_name, "error": e.to_string()}),
                );
                return None;
            }
            Err(_) => {
                report.add(
                    "tls",
                    severity,
                    format!("TLS handshake with {addr} timed out"),
                    json!({}),
                );
                return None;
            }
        };
        let url = format!("https://{host_header}{path}");
        match tokio::time::timeout(self.timeout, get(tls, host_header, path)).await {
            Ok(Ok(answer)) => {
                report.ok(
                    "http",
                    format!("GET {url}: {}", answer.status),
                    json!({"url": url, "status": answer.status}),
                );
                Some(answer)
            }
            Ok(Err(e)) => {
                report.add("http", severity, format!("GET {url}: {e:#}"), json!({"url": url}));
                None
            }
            Err(_) => {
                report.add(
                    "http",
                    severity,
                    format!("GET {url}: no answer in time"),
                    json!({"url": url}),
                );
                None
            }
        }
    }

    /// The connection, routed as egress would route a TLS connection to `addr` naming `tls_name`.
    async fn connect(
        &self,
        report: &mut Report,
        severity: Status,
        addr: SocketAddr,
        tls_name: &str,
    ) -> Option<UpstreamStream> {
        let routing = self.routing;
        let data =
            |route: &str, rule: &str| json!({"address": addr.to_string(), "route": route, "rule": rule});
        match kernel_verdict(&routing.policy, addr.ip()) {
            KernelVerdict::Deny(rule) => {
                let rule = rule.to_string();
                report.add(
                    "route",
                    severity,
                    format!("{addr}: denied in the kernel [{rule}]: connect() fails with EPERM"),
                    data("deny", &rule),
                );
                return None;
            }
            KernelVerdict::Loopback | KernelVerdict::Bypass => {
                let rule = "loopback or no_proxy address range: not intercepted";
                report.ok("route", format!("{addr}: direct [{rule}]"), data("direct", rule));
                return self.direct(report, severity, addr).await;
            }
            KernelVerdict::Redirect => {}
        }
        // What the agent sees: a ClientHello naming tls_name (IP literals are not sent as SNI).
        let sniffed = Sniffed::Tls {
            sni: tls_name.parse::<IpAddr>().is_err().then(|| tls_name.to_owned()),
        };
        // What the running agent learnt from the homeserver's own lookups of this address (the
        // doctor's lookups are not in it): the agent would plan with that.
        let (admin, name, ip, port) = (
            routing.settings.admin_addr.0,
            tls_name.to_owned(),
            addr.ip(),
            addr.port(),
        );
        let record =
            tokio::task::spawn_blocking(move || crate::diag::explain::agent_record(admin, &name, ip, port))
                .await
                .unwrap_or_default();
        report.info(
            "dns record",
            format!("{addr}: {}", record.report.trim_end().replace('\n', "; ")),
            json!({"address": addr.to_string(), "record": record.report}),
        );
        let plan = plan(
            &routing.rules(),
            routing.proxies(),
            addr,
            &sniffed,
            &record.resolved,
        );
        let rule = plan.rule.to_string();
        let rule = rule.as_str();
        match plan.action {
            Action::Deny => {
                report.add(
                    "route",
                    severity,
                    format!("{addr} ({tls_name}): denied by egress [{rule}]: the connection is reset"),
                    data("deny", rule),
                );
                None
            }
            Action::Direct { to } => {
                report.ok(
                    "route",
                    format!("{addr} ({tls_name}): direct [{rule}]"),
                    data("direct", rule),
                );
                self.direct(report, severity, to).await
            }
            Action::Connect { proxy, target } => {
                report.ok(
                    "route",
                    format!("{addr} ({tls_name}): CONNECT {target} via {proxy} [{rule}]"),
                    data("proxy", rule),
                );
                let data = json!({"proxy": proxy.to_string(), "connect": target});
                match proxy.open_tunnel(&target, &bytes::Bytes::new()).await {
                    Ok((tunnel, member)) if tunnel.early_data.is_empty() => {
                        let auth = member.client.auth.as_str();
                        let by = member.client.url.authority();
                        report.ok(
                            "proxy",
                            format!("CONNECT {target}: 200 from {by} (authentication: {auth}), tunnel open"),
                            data,
                        );
                        Some(tunnel.stream)
                    }
                    Ok(_) => {
                        report.add(
                            "proxy",
                            severity,
                            format!("CONNECT {target}: the proxy sent data before the TLS handshake"),
                            data,
                        );
                        None
                    }
                    Err(e) => {
                        let hint = proxy_hint(&e, addr.port());
                        let mut data = data;
                        data["status"] = json!(e.status());
                        report.add("proxy", severity, format!("CONNECT {target}: {e}{hint}"), data);
                        None
                    }
                }
            }
            // TLS is never forwarded as plain HTTP; the plan cannot ask for it.
            Action::Forward { .. } => {
                report.add(
                    "route",
                    severity,
                    format!("{addr} ({tls_name}): egress would forward TLS as plain HTTP [{rule}]"),
                    data("forward", rule),
                );
                None
            }
        }
    }

    async fn direct(
        &self,
        report: &mut Report,
        severity: Status,
        addr: SocketAddr,
    ) -> Option<UpstreamStream> {
        match upstream::connect_marked(Role::Destination, addr, self.mark, self.timeout).await {
            Ok(stream) => Some(UpstreamStream::Plain(stream)),
            Err(e) => {
                report.add(
                    "connect",
                    severity,
                    e.to_string(),
                    json!({"address": addr.to_string()}),
                );
                None
            }
        }
    }
}

/// What an admin can do about a refused CONNECT.
fn proxy_hint(error: &UpstreamError, port: u16) -> String {
    match error.status() {
        Some(407) => " (the proxy wants other credentials: check user:password in https_proxy, \
                      percent-encoding special characters)"
            .to_owned(),
        Some(403) if port != 443 => format!(
            " (the proxy refuses CONNECT to port {port}; squid's default allows CONNECT only to \
             SSL_ports, i.e. 443: add `acl SSL_ports port {port}` to squid.conf)"
        ),
        Some(403) => " (the proxy's access rules refuse this destination)".to_owned(),
        Some(502..=504) | None
            if matches!(error, UpstreamError::Status(_) | UpstreamError::HandshakeTimeout) =>
        {
            " (the proxy could not resolve or reach the destination; with CONNECT by name it \
             resolves the name itself)"
                .to_owned()
        }
        _ => String::new(),
    }
}

async fn get<IO>(io: IO, host: &str, path: &str) -> Result<Answer>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
        .context("HTTP handshake")?;
    let conn = tokio::spawn(conn);
    let request = Request::get(path)
        .header(header::HOST, host)
        .header(
            header::USER_AGENT,
            concat!("egress-doctor/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::new())?;
    let response = sender
        .send_request(request)
        .await
        .context("sending the request")?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
        .to_bytes();
    conn.abort();
    Ok(Answer { status, body })
}

/// TLS for the homeserver's peers: the system roots (honouring SSL_CERT_FILE) plus `ca_files`,
/// like Synapse with federation_custom_ca_list.
pub fn origin_tls(ca_files: &[PathBuf]) -> Result<TlsConnector> {
    let mut roots = RootCertStore::empty();
    let (system, _) = roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    for path in ca_files {
        crate::upstream::tls::add_pem_file(&mut roots, path, "--ca-file")?;
    }
    if system == 0 && ca_files.is_empty() {
        bail!("no system CA certificates found (install ca-certificates, or give --ca-file)");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
