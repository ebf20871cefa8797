//! TLS for the NATS, ClickHouse and Redis clients: one rustls configuration built from a server's
//! [`TlsMaterial`] (ring as the crypto provider, as kube's client uses), and the cause of a failed
//! handshake in plain words.
//!
//! A handshake error reaches us wrapped by each client library (async-nats' connect error,
//! hyper's connector error, redis' I/O error); [`failure_cause`] digs the rustls error out of any
//! of them, so a wrong CA, an expired certificate and a missing client certificate read the same
//! whichever server they concern.

use std::error::Error as StdError;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
};
use signal_model::tls::TlsMaterial;

/// Why a TLS configuration could not be built from the material.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("{server} tls.ca: {problem}")]
    Ca {
        server: &'static str,
        problem: String,
    },
    #[error("{server} tls.cert/tls.key: {problem}")]
    ClientCertificate {
        server: &'static str,
        problem: String,
    },
    #[error("{server} TLS: no tls.ca given and the system trust store is empty or unreadable")]
    NoSystemRoots { server: &'static str },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide provider, for libraries that build their own configuration with
/// `ClientConfig::builder()` (redis). Installing twice is harmless.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The rustls client configuration for one server: trust `ca_pem` (or the system's roots),
/// present the client certificate if any, or verify nothing under `insecure_skip_verify`.
pub fn client_config(tls: &TlsMaterial) -> Result<ClientConfig, TlsConfigError> {
    let server = tls.server;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError::Ca {
            server,
            problem: e.to_string(),
        })?;
    let builder = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(
                provider().signature_verification_algorithms,
            )))
    } else {
        builder.with_root_certificates(root_store(tls)?)
    };
    match &tls.client {
        None => Ok(builder.with_no_client_auth()),
        Some(identity) => {
            let client_problem =
                |problem: String| TlsConfigError::ClientCertificate { server, problem };
            let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| client_problem(format!("the certificate is not PEM: {e}")))?;
            if chain.is_empty() {
                return Err(client_problem("no certificate in the PEM text".into()));
            }
            let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
                .map_err(|e| client_problem(format!("the key is not a PEM private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| client_problem(e.to_string()))
        }
    }
}

/// The CA bundle's certificates, or the system's trust store when none is given.
pub fn root_store(tls: &TlsMaterial) -> Result<RootCertStore, TlsConfigError> {
    let server = tls.server;
    let mut roots = RootCertStore::empty();
    match &tls.ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| TlsConfigError::Ca {
                    server,
                    problem: format!("not PEM certificates: {e}"),
                })?;
                roots.add(cert).map_err(|e| TlsConfigError::Ca {
                    server,
                    problem: format!("not a usable CA certificate: {e}"),
                })?;
            }
            if roots.is_empty() {
                return Err(TlsConfigError::Ca {
                    server,
                    problem: "no certificate in the PEM text".into(),
                });
            }
        }
        None => {
            let (added, _ignored) =
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if added == 0 {
                return Err(TlsConfigError::NoSystemRoots { server });
            }
        }
    }
    Ok(roots)
}

/// `insecureSkipVerify`: any certificate is accepted, but the handshake's signatures are still
/// checked so the session keys are the server's.
#[derive(Debug)]
struct AcceptAnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// The TLS cause of a failed connection in plain words, with rustls' own text in parentheses,
/// or `None` when no TLS error is among the error's causes.
pub fn failure_cause(error: &(dyn StdError + 'static)) -> Option<String> {
    let tls_error = find_rustls_error(error)?;
    let words = match tls_error {
        rustls::Error::InvalidCertificate(certificate) => match certificate {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "the server's certificate is not signed by a trusted CA (check tls.ca)"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "the server's certificate does not name the host in the URL"
            }
            CertificateError::Revoked => "the server's certificate is revoked",
            _ => "the server's certificate was refused",
        },
        // Servers answer a missing client certificate differently (TLS 1.3's certificate_required
        // from OpenSSL, bad_certificate from Go's nats-server), and a certificate they do not
        // trust with the same alerts, so one wording covers both.
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate => {
                "the server requires a client certificate it trusts (set or check tls.cert and tls.key)"
            }
            AlertDescription::HandshakeFailure => {
                "the server refused the handshake (it may require a client certificate: tls.cert and tls.key)"
            }
            AlertDescription::CertificateExpired => {
                "the server says the client certificate has expired"
            }
            _ => "the server ended the handshake",
        },
        _ => "the handshake failed",
    };
    Some(format!("TLS: {words} ({tls_error})"))
}

/// The first rustls error among `error` and its causes, looking inside I/O errors too (an
/// `io::Error` does not list the error it wraps as its source).
fn find_rustls_error<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(found) = find_rustls_error(inner)
        {
            return Some(found);
        }
        // redis keeps its cause as an `Arc<dyn Error>`, which is the source object itself.
        if let Some(shared) = error.downcast_ref::<Arc<dyn StdError + Send + Sync>>()
            && let Some(found) = find_rustls_error(&**shared)
        {
            return Some(found);
        }
        current = error.source();
    }
    None
}
