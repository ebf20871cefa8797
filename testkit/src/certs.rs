//! Throwaway X.509 certificates for test servers: a CA, and serving or client certificates it
//! signs.
//!
//! Keys are ECDSA P-256 in PKCS#8 PEM, which Go's and rustls' TLS stacks both read. Nothing here
//! is meant to outlive a test run: a new CA is made for every control plane (or other TLS server)
//! a test starts, and its files live in that server's temporary directory.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::{Error, IoContext, Result};

/// A certificate authority that exists only for one test server.
pub struct CertificateAuthority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The certificate, PEM (`-----BEGIN CERTIFICATE-----`).
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub key_pem: String,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

/// Paths of a certificate and its key written by [`IssuedCertificate::write`].
#[derive(Debug, Clone)]
pub struct CertificateFiles {
    /// `<dir>/<name>.crt`
    pub cert: PathBuf,
    /// `<dir>/<name>.key`
    pub key: PathBuf,
}

impl CertificateAuthority {
    /// A new self-signed CA named `common_name`.
    pub fn new(common_name: &str) -> Result<CertificateAuthority> {
        let key = KeyPair::generate().map_err(certificate_error("generating the CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, key)
            .map_err(certificate_error("self-signing the CA"))?;
        Ok(CertificateAuthority { issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// The CA's private key, PKCS#8 PEM (for a server that signs certificates itself, such as
    /// kube-controller-manager's CSR signer).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Writes the CA certificate to `path`.
    pub fn write_cert(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.cert_pem()).context(|| format!("writing {}", path.display()))
    }

    /// A serving certificate for `common_name`, valid for the given DNS names and IP addresses.
    pub fn issue_server(
        &self,
        common_name: &str,
        dns_names: &[&str],
        ips: &[IpAddr],
    ) -> Result<IssuedCertificate> {
        self.sign(server_params(common_name, dns_names, ips)?)
    }

    /// Like [`Self::issue_server`], but valid only during the year 2000: an expired certificate,
    /// for tests of what clients say about one.
    pub fn issue_expired_server(
        &self,
        common_name: &str,
        dns_names: &[&str],
        ips: &[IpAddr],
    ) -> Result<IssuedCertificate> {
        let mut params = server_params(common_name, dns_names, ips)?;
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        self.sign(params)
    }

    /// A client certificate for `common_name` in the given organizations (Kubernetes reads them
    /// as the user name and its groups).
    pub fn issue_client(
        &self,
        common_name: &str,
        organizations: &[&str],
    ) -> Result<IssuedCertificate> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, organizations);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<IssuedCertificate> {
        let key = KeyPair::generate().map_err(certificate_error("generating a key"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(certificate_error("signing a certificate"))?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        })
    }
}

/// A new ECDSA P-256 key pair without a certificate (e.g. for signing service-account tokens):
/// the private key as PKCS#8 PEM and the public key as PKIX PEM (`-----BEGIN PUBLIC KEY-----`).
pub fn signing_key_pem() -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(certificate_error("generating a key"))?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

impl IssuedCertificate {
    /// Writes `<dir>/<name>.crt` and `<dir>/<name>.key` (the key readable by its owner only).
    pub fn write(&self, dir: &Path, name: &str) -> Result<CertificateFiles> {
        let files = CertificateFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, &self.cert_pem)
            .context(|| format!("writing {}", files.cert.display()))?;
        write_private(&files.key, &self.key_pem)?;
        Ok(files)
    }
}

/// Writes a secret file with mode 0600.
pub(crate) fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .context(|| format!("writing {}", path.display()))
}

fn server_params(
    common_name: &str,
    dns_names: &[&str],
    ips: &[IpAddr],
) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name, &[]);
    params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
    for dns in dns_names {
        let dns = (*dns)
            .try_into()
            .map_err(certificate_error("a DNS subject alternative name"))?;
        params.subject_alt_names.push(SanType::DnsName(dns));
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    Ok(params)
}

fn name(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    for organization in organizations {
        name.push(DnType::OrganizationName, *organization);
    }
    name
}

fn certificate_error(what: &'static str) -> impl Fn(rcgen::Error) -> Error {
    move |e| Error::Certificate(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn issues_pem_certificates_and_keys() {
        let ca = CertificateAuthority::new("test CA").unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let server = ca
            .issue_server("server", &["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
            .unwrap();
        assert!(server.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let client = ca.issue_client("admin", &["system:masters"]).unwrap();
        assert_ne!(client.cert_der, server.cert_der);

        let dir = tempfile::tempdir().unwrap();
        let files = client.write(dir.path(), "admin").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = files.key.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");
        assert_eq!(
            std::fs::read_to_string(&files.cert).unwrap(),
            client.cert_pem
        );
    }
}
