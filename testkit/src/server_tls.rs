//! TLS for the data servers (NATS, ClickHouse, Redis): the certificate a server presents, the CA
//! it checks client certificates against, whether it demands one, and the handshake the testkit
//! itself makes to see that the TLS port is up.
//!
//! [`ServerTls`] is handed to `NatsServer::start_with_tls`, `ClickHouseServer::start_with_tls` and
//! `RedisServer::start_with_tls`; each writes the PEM files into its own directory. The
//! testkit's probes do not verify the server (an expired certificate must still come up, since
//! tests are about what *clients* say about it) and present a client certificate of the same CA.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, StreamOwned};

use crate::certs::{CertificateAuthority, IssuedCertificate};
use crate::error::{Error, IoContext, Result};

/// How a test server speaks TLS.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The CA that signed the server's certificate; client certificates must chain to it too.
    ca_pem: String,
    server: IssuedCertificate,
    require_client_certificate: bool,
    /// The testkit's own client certificate for its readiness probes.
    probe_client: IssuedCertificate,
}

/// Paths of the PEM files a server reads, written by [`ServerTls::write`].
#[derive(Clone, Debug)]
pub(crate) struct ServerTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServerTls {
    /// A certificate from `ca` for `localhost` and 127.0.0.1, valid now; clients need no
    /// certificate.
    pub fn new(ca: &CertificateAuthority) -> Result<ServerTls> {
        let server = ca.issue_server("signal-test-server", &["localhost"], &[loopback()])?;
        ServerTls::with_certificate(ca, server)
    }

    /// Like [`ServerTls::new`] with a certificate that expired in 2001.
    pub fn expired(ca: &CertificateAuthority) -> Result<ServerTls> {
        let server =
            ca.issue_expired_server("signal-test-server", &["localhost"], &[loopback()])?;
        ServerTls::with_certificate(ca, server)
    }

    fn with_certificate(ca: &CertificateAuthority, server: IssuedCertificate) -> Result<ServerTls> {
        Ok(ServerTls {
            ca_pem: ca.cert_pem(),
            server,
            require_client_certificate: false,
            probe_client: ca.issue_client("signal-testkit-probe", &[])?,
        })
    }

    /// The same, but the server refuses clients without a certificate signed by the CA (mutual
    /// TLS).
    pub fn requiring_client_certificate(mut self) -> ServerTls {
        self.require_client_certificate = true;
        self
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificate(&self) -> bool {
        self.require_client_certificate
    }

    /// The CA certificate clients should trust, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes `ca.crt`, `server.crt` and `server.key` (mode 0600) into `dir`.
    pub(crate) fn write(&self, dir: &Path) -> Result<ServerTlsFiles> {
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, &self.ca_pem).context(|| format!("writing {}", ca.display()))?;
        let files = self.server.write(dir, "server")?;
        Ok(ServerTlsFiles {
            ca,
            cert: files.cert,
            key: files.key,
        })
    }

    fn probe_config(&self) -> Result<Arc<ClientConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Certificate(format!("TLS versions: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(algorithms)))
            .with_client_auth_cert(
                vec![CertificateDer::from(self.probe_client.cert_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.probe_client.key_der.clone())),
            )
            .map_err(|e| Error::Certificate(format!("the probe's client certificate: {e}")))?;
        Ok(Arc::new(config))
    }

    /// Wraps a connected socket in a TLS client session (the handshake happens on first use).
    pub(crate) fn client_stream(
        &self,
        socket: TcpStream,
    ) -> Result<StreamOwned<ClientConnection, TcpStream>> {
        let connection = ClientConnection::new(
            self.probe_config()?,
            ServerName::IpAddress(loopback().into()),
        )
        .map_err(|e| Error::Certificate(format!("a TLS session: {e}")))?;
        Ok(StreamOwned::new(connection, socket))
    }

    /// Whether a TLS handshake with `127.0.0.1:port` completes and the server then keeps the
    /// session open (a refused client certificate ends it right away under TLS 1.3).
    pub(crate) fn handshake_succeeds(&self, port: u16) -> bool {
        let attempt = || -> std::io::Result<bool> {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let socket = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
            socket.set_read_timeout(Some(Duration::from_millis(500)))?;
            socket.set_write_timeout(Some(Duration::from_millis(500)))?;
            let Ok(mut stream) = self.client_stream(socket) else {
                return Ok(false);
            };
            while stream.conn.is_handshaking() {
                stream.conn.complete_io(&mut stream.sock)?;
            }
            stream.flush()?;
            Ok(true)
        };
        attempt().unwrap_or(false)
    }
}

fn loopback() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

/// A stream the NATS probe reads and writes, plain or TLS.
pub(crate) trait Duplex: Read + Write {}
impl<T: Read + Write> Duplex for T {}

/// Accepts any server certificate: the probes check that a server is up, not whom to trust.
#[derive(Debug)]
struct AnyServer(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}
