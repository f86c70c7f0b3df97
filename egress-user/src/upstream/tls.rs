//! TLS to `https://` upstream proxies (rustls): the proxy's certificate is verified against the
//! system roots, or against a CA file; SNI is the proxy's host name. Skipping verification is
//! possible for testing only, and says so loudly. Beneath rustls, the socket is read ahead
//! ([`ReadAhead`]).

use std::{
    io,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{self, Poll},
};

use anyhow::{Context, Result, bail};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

/// A TLS connection to a proxy.
pub type ProxyTlsStream = TlsStream<ReadAhead<TcpStream>>;

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
    pub async fn connect(&self, host: &str, stream: TcpStream) -> std::io::Result<ProxyTlsStream> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        self.connector.connect(name, ReadAhead::new(stream)).await
    }
}

/// How much ciphertext is read from the socket at once.
const READ_AHEAD: usize = 64 * 1024;

/// The socket under TLS, read ahead: rustls asks for at most 4 KiB of ciphertext per read, a
/// quarter of a million read(2) calls per GiB; this reads up to [`READ_AHEAD`] at once and hands
/// it out from memory. The memory exists only while bytes keep coming: a read that finds the
/// socket empty gives it back, so an idle tunnel holds none.
pub struct ReadAhead<S> {
    inner: S,
    /// Bytes read ahead; those from `start` on are not handed out yet.
    ahead: Vec<u8>,
    start: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            ahead: Vec::new(),
            start: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    #[cfg(test)]
    fn held_capacity(&self) -> usize {
        self.ahead.capacity()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.start == this.ahead.len() {
            if buf.remaining() >= READ_AHEAD {
                (this.ahead, this.start) = (Vec::new(), 0);
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // Not zeroed first: a memset per refill costs as much as the copy out.
            this.ahead.clear();
            this.ahead.reserve(READ_AHEAD);
            let mut into = ReadBuf::uninit(&mut this.ahead.spare_capacity_mut()[..READ_AHEAD]);
            let read = Pin::new(&mut this.inner).poll_read(cx, &mut into);
            let filled = into.filled().len();
            if into.filled().as_ptr() != this.ahead.as_ptr() {
                return Poll::Ready(Err(io::Error::other("the socket's reader replaced the buffer")));
            }
            // SAFETY: ReadBuf counts as filled only bytes written into its buffer, which is
            // this one (checked above).
            unsafe { this.ahead.set_len(filled) };
            this.start = 0;
            match read {
                Poll::Ready(Ok(())) if filled > 0 => {}
                other => {
                    this.ahead = Vec::new();
                    return other;
                }
            }
        }
        let n = (this.ahead.len() - this.start).min(buf.remaining());
        buf.put_slice(&this.ahead[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut task::Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Small reads (as rustls makes them) get the stream's bytes in order from one large read;
    /// a large read goes straight through; once the socket has nothing more, nothing is held.
    #[tokio::test]
    async fn reads_ahead_and_holds_nothing_once_the_socket_is_empty() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ours, theirs) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (mut ours, mut theirs) = (ReadAhead::new(ours.unwrap()), theirs.unwrap().0);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        theirs.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        while got.len() < 200_000 {
            let n = ours.read(&mut small).await.unwrap();
            got.extend_from_slice(&small[..n]);
        }
        let mut large = vec![0u8; 2 * READ_AHEAD];
        while got.len() < data.len() {
            let n = ours.read(&mut large).await.unwrap();
            got.extend_from_slice(&large[..n]);
        }
        assert!(got == data);
        // The socket is empty now: a read waits, and the memory is given back.
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), ours.read(&mut small)).await;
        assert!(waited.is_err(), "nothing more was sent");
        assert_eq!(ours.held_capacity(), 0);
        theirs.write_all(b"more").await.unwrap();
        drop(theirs);
        let mut rest = Vec::new();
        ours.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"more");
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
