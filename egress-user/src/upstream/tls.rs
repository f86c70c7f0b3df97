//! TLS to `https://` upstream proxies (rustls): the proxy's certificate is verified against the
//! system roots, or against a CA file; SNI is the proxy's host name. Skipping verification is
//! possible for testing only, and says so loudly.

use std::{path::Path, sync::Arc};

use anyhow::{Context, Result, bail};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

#[derive(Clone)]
pub struct ProxyTls {
    connector: TlsConnector,
}

impl ProxyTls {
    /// `ca_file`: PEM certificates to trust instead of the system roots.
    pub fn new(ca_file: Option<&Path>, insecure: bool) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let config = if insecure {
            tracing::warn!(
                "TLS VERIFICATION OF THE UPSTREAM PROXY IS DISABLED (insecure_skip_proxy_tls_verify): \
                 anyone on the path can impersonate the proxy and read the proxy credentials. \
                 For testing only."
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
                .with_no_client_auth()
        } else {
            builder
                .with_root_certificates(roots(ca_file)?)
                .with_no_client_auth()
        };
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// The TLS handshake with the proxy at `host` (name or IP literal) over `stream`.
    pub async fn connect(&self, host: &str, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        self.connector.connect(name, stream).await
    }
}

fn roots(ca_file: Option<&Path>) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => add_pem_file(&mut roots, path, "proxy_ca_file")?,
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                bail!(
                    "no system CA certificates found to verify the https:// proxy \
                     (install ca-certificates, or give proxy_ca_file)"
                );
            }
        }
    }
    Ok(roots)
}

/// Adds the CA certificates of a PEM file; `what` names the setting in errors.
pub fn add_pem_file(roots: &mut RootCertStore, path: &Path, what: &str) -> Result<()> {
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("{what} {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{what} {}: not PEM certificates", path.display()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        bail!("{what} {}: no usable CA certificate in it", path.display());
    }
    Ok(())
}

/// Accepts any certificate (signatures are still checked, so the handshake is well-formed).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
