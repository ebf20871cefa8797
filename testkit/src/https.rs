//! A minimal blocking HTTPS client: [`crate::http`]'s one-request-per-connection client over
//! rustls, trusting one CA and presenting one client certificate.
//!
//! Enough to wait for a TLS server's health endpoint (kube-apiserver's `/readyz`) and to make the
//! odd request a test server needs while it starts; tests talk to such servers with real clients.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use crate::error::{Error, IoContext, Result};
use crate::http::{Response, parse};

/// A TLS client for servers on 127.0.0.1 whose certificates one CA signed.
#[derive(Clone)]
pub(crate) struct TlsClient {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient").finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Trusts the CA `ca_der` only, and authenticates with the client certificate and PKCS#8 key.
    pub(crate) fn new(
        ca_der: &[u8],
        client_cert_der: &[u8],
        client_key_der: &[u8],
    ) -> Result<Self> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca_der.to_vec()))
            .map_err(|e| Error::Certificate(format!("trusting the test CA: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Certificate(format!("TLS versions: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from(client_cert_der.to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(client_key_der.to_vec())),
            )
            .map_err(|e| Error::Certificate(format!("the client certificate: {e}")))?;
        Ok(TlsClient {
            config: Arc::new(config),
        })
    }

    /// Sends one request to `https://127.0.0.1:port` and reads the whole response.
    pub(crate) fn request(
        &self,
        port: u16,
        method: &str,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Response> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let what = || format!("HTTPS {method} https://{addr}{path}");
        let tcp = TcpStream::connect_timeout(&addr, timeout).context(what)?;
        tcp.set_read_timeout(Some(timeout)).context(what)?;
        tcp.set_write_timeout(Some(timeout)).context(what)?;
        let server_name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
        let connection = ClientConnection::new(self.config.clone(), server_name)
            .map_err(|e| Error::io(what(), std::io::Error::other(e)))?;
        let mut stream = StreamOwned::new(connection, tcp);
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: signal-testkit\r\n\
             Accept: application/json\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).context(what)?;
        stream.write_all(body).context(what)?;
        stream.flush().context(what)?;
        let mut raw = Vec::new();
        match stream.read_to_end(&mut raw) {
            Ok(_) => {}
            // A server that closes without close_notify still sent the whole response.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(Error::io(what(), e)),
        }
        parse(&raw)
    }
}
