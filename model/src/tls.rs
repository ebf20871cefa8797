//! TLS to the three servers, apart from any I/O: which server a `tls` block belongs to, the
//! variables that name a worker's mounted certificate files, and the PEM text once read.
//!
//! The operator mounts each referenced Secret or ConfigMap key read-only into the worker pod and
//! sets the `SIGNAL_<SERVER>_TLS_<PART>_FILE` variables below to the files' paths; local mode
//! passes its own paths in the same variables. `signal_clients::credentials` reads the files and
//! the operator reads the same keys from the API, both ending in [`TlsMaterial::assemble`], so
//! the worker and the operator trust and present the same certificates.

use std::fmt;

use crate::spec::{PemSource, SignalPipelineSpec, TlsSpec};

/// A server a pipeline may reach over TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TlsServer {
    Nats,
    ClickHouse,
    Redis,
}

/// One of the PEM files of a `tls` block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TlsPart {
    /// The CA bundle (`tls.ca`).
    Ca,
    /// The client certificate (`tls.cert`).
    Cert,
    /// The client certificate's key (`tls.key`).
    Key,
}

impl TlsPart {
    pub const ALL: [TlsPart; 3] = [TlsPart::Ca, TlsPart::Cert, TlsPart::Key];

    /// The field's name inside a `tls` block.
    pub fn field(self) -> &'static str {
        match self {
            TlsPart::Ca => "ca",
            TlsPart::Cert => "cert",
            TlsPart::Key => "key",
        }
    }

    /// The file name a worker finds the part under (the names cert-manager gives them).
    pub fn file_name(self) -> &'static str {
        match self {
            TlsPart::Ca => "ca.crt",
            TlsPart::Cert => "tls.crt",
            TlsPart::Key => "tls.key",
        }
    }
}

impl TlsServer {
    pub const ALL: [TlsServer; 3] = [TlsServer::Nats, TlsServer::ClickHouse, TlsServer::Redis];

    /// The server's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            TlsServer::Nats => "NATS",
            TlsServer::ClickHouse => "ClickHouse",
            TlsServer::Redis => "Redis",
        }
    }

    /// The path of its `tls` block, e.g. `spec.nats.tls`.
    pub fn field(self) -> &'static str {
        match self {
            TlsServer::Nats => "spec.nats.tls",
            TlsServer::ClickHouse => "spec.clickhouse.tls",
            TlsServer::Redis => "spec.cache.redis.tls",
        }
    }

    /// A lowercase word for volume names and directories.
    pub fn slug(self) -> &'static str {
        match self {
            TlsServer::Nats => "nats",
            TlsServer::ClickHouse => "clickhouse",
            TlsServer::Redis => "redis",
        }
    }

    /// The server's `tls` block in `spec`, if any.
    pub fn spec(self, spec: &SignalPipelineSpec) -> Option<&TlsSpec> {
        match self {
            TlsServer::Nats => spec.nats.tls.as_ref(),
            TlsServer::ClickHouse => spec.clickhouse.tls.as_ref(),
            TlsServer::Redis => spec.cache.as_ref().and_then(|c| c.redis.tls.as_ref()),
        }
    }

    /// The variable naming the file of `part`, e.g. `SIGNAL_NATS_TLS_CA_FILE`.
    pub fn file_variable(self, part: TlsPart) -> &'static str {
        use TlsPart::*;
        use TlsServer::*;
        match (self, part) {
            (Nats, Ca) => "SIGNAL_NATS_TLS_CA_FILE",
            (Nats, Cert) => "SIGNAL_NATS_TLS_CERT_FILE",
            (Nats, Key) => "SIGNAL_NATS_TLS_KEY_FILE",
            (ClickHouse, Ca) => "SIGNAL_CLICKHOUSE_TLS_CA_FILE",
            (ClickHouse, Cert) => "SIGNAL_CLICKHOUSE_TLS_CERT_FILE",
            (ClickHouse, Key) => "SIGNAL_CLICKHOUSE_TLS_KEY_FILE",
            (Redis, Ca) => "SIGNAL_REDIS_TLS_CA_FILE",
            (Redis, Cert) => "SIGNAL_REDIS_TLS_CERT_FILE",
            (Redis, Key) => "SIGNAL_REDIS_TLS_KEY_FILE",
        }
    }
}

impl TlsSpec {
    /// Where `part` comes from, if the block sets it.
    pub fn source(&self, part: TlsPart) -> Option<&PemSource> {
        match part {
            TlsPart::Ca => self.ca.as_ref(),
            TlsPart::Cert => self.cert.as_ref(),
            TlsPart::Key => self.key.as_ref(),
        }
    }
}

/// A client certificate and its key, PEM. `Debug` redacts the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What a client needs to reach one server over TLS. `Debug` redacts the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsMaterial {
    /// The server's name in messages (`NATS`, `ClickHouse`, `Redis`).
    pub server: &'static str,
    /// CA certificates to trust; the system's trust store when absent.
    pub ca_pem: Option<String>,
    /// The certificate to present for mutual TLS.
    pub client: Option<ClientIdentity>,
    /// Accept any server certificate (`insecureSkipVerify`).
    pub insecure_skip_verify: bool,
}

/// The TLS material of every server a pipeline reaches over TLS (`None`: plain text).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineTls {
    pub nats: Option<TlsMaterial>,
    pub clickhouse: Option<TlsMaterial>,
    pub redis: Option<TlsMaterial>,
}

impl PipelineTls {
    /// The material for `server`.
    pub fn get(&self, server: TlsServer) -> Option<&TlsMaterial> {
        match server {
            TlsServer::Nats => self.nats.as_ref(),
            TlsServer::ClickHouse => self.clickhouse.as_ref(),
            TlsServer::Redis => self.redis.as_ref(),
        }
    }

    fn slot(&mut self, server: TlsServer) -> &mut Option<TlsMaterial> {
        match server {
            TlsServer::Nats => &mut self.nats,
            TlsServer::ClickHouse => &mut self.clickhouse,
            TlsServer::Redis => &mut self.redis,
        }
    }

    /// Assembles every `tls` block of `spec` from a lookup of PEM text by server and part (read
    /// from files or from Secrets and ConfigMaps).
    pub fn assemble(
        spec: &SignalPipelineSpec,
        mut pem: impl FnMut(TlsServer, TlsPart) -> Result<Option<String>, TlsMaterialError>,
    ) -> Result<PipelineTls, TlsMaterialError> {
        let mut tls = PipelineTls::default();
        for server in TlsServer::ALL {
            if let Some(block) = server.spec(spec) {
                *tls.slot(server) = Some(TlsMaterial::assemble(server, block, |part| {
                    pem(server, part)
                })?);
            }
        }
        Ok(tls)
    }
}

/// Why the TLS material of a server is incomplete.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TlsMaterialError {
    #[error("{field}.{part} is set but {where_}")]
    Missing {
        field: &'static str,
        part: &'static str,
        where_: String,
    },
    #[error("{field}.{part}: {problem}")]
    Unreadable {
        field: &'static str,
        part: &'static str,
        problem: String,
    },
}

impl TlsMaterial {
    /// The material for `server` from its `tls` block and a lookup of each part's PEM text;
    /// every part the block sets must be found.
    pub fn assemble(
        server: TlsServer,
        block: &TlsSpec,
        mut pem: impl FnMut(TlsPart) -> Result<Option<String>, TlsMaterialError>,
    ) -> Result<TlsMaterial, TlsMaterialError> {
        let mut read = |part: TlsPart| -> Result<Option<String>, TlsMaterialError> {
            if block.source(part).is_none() {
                return Ok(None);
            }
            match pem(part)? {
                Some(text) if !text.trim().is_empty() => Ok(Some(text)),
                _ => Err(TlsMaterialError::Missing {
                    field: server.field(),
                    part: part.field(),
                    where_: "its PEM text is empty".to_string(),
                }),
            }
        };
        let ca_pem = read(TlsPart::Ca)?;
        let client = match (read(TlsPart::Cert)?, read(TlsPart::Key)?) {
            (Some(cert_pem), Some(key_pem)) => Some(ClientIdentity { cert_pem, key_pem }),
            _ => None,
        };
        Ok(TlsMaterial {
            server: server.name(),
            ca_pem,
            client,
            insecure_skip_verify: block.insecure_skip_verify,
        })
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_pem", &format!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The problems of one `tls` block against its server's URL scheme (pure; for validation).
///
/// Rules: each PEM source names exactly one of a Secret and a ConfigMap, with a name and a key;
/// `cert` and `key` come together; a private key comes from a Secret; `insecureSkipVerify`
/// and `ca` exclude each other (a CA that is not checked would only mislead).
pub fn tls_block_problems(server: TlsServer, block: &TlsSpec) -> Vec<(String, String)> {
    let field = server.field();
    let mut problems = Vec::new();
    for part in TlsPart::ALL {
        let Some(source) = block.source(part) else {
            continue;
        };
        let at = format!("{field}.{}", part.field());
        match (&source.secret_key_ref, &source.config_map_key_ref) {
            (Some(_), Some(_)) | (None, None) => problems.push((
                at.clone(),
                "set exactly one of secretKeyRef and configMapKeyRef".to_string(),
            )),
            (Some(key_ref), None) | (None, Some(key_ref)) => {
                if key_ref.name.is_empty() || key_ref.key.is_empty() {
                    problems.push((at.clone(), "name and key must not be empty".to_string()));
                }
            }
        }
        if part == TlsPart::Key && source.config_map_key_ref.is_some() {
            problems.push((
                at,
                "a private key must come from a Secret (secretKeyRef), not a ConfigMap".into(),
            ));
        }
    }
    match (&block.cert, &block.key) {
        (Some(_), None) => problems.push((
            format!("{field}.key"),
            format!("{field}.cert is set without its private key: set {field}.key as well"),
        )),
        (None, Some(_)) => problems.push((
            format!("{field}.cert"),
            format!("{field}.key is set without a certificate: set {field}.cert as well"),
        )),
        _ => {}
    }
    if block.insecure_skip_verify && block.ca.is_some() {
        problems.push((
            format!("{field}.insecureSkipVerify"),
            format!("true ignores {field}.ca; remove one of them"),
        ));
    }
    problems
}

/// Problems between a server's URL scheme and whether its `tls` block is set: `https://` and
/// `rediss://` need the block and `http://`/`redis://` refuse it; for NATS `tls://` needs the
/// block, which may also upgrade a `nats://` connection. Returns the field and message.
pub fn scheme_problem(server: TlsServer, url: &str, has_tls: bool) -> Option<(String, String)> {
    let scheme = url.trim().split("://").next().unwrap_or_default();
    let (url_field, tls_schemes, plain_schemes): (&str, &[&str], &[&str]) = match server {
        TlsServer::Nats => ("spec.nats.url", &["tls"], &[]),
        TlsServer::ClickHouse => ("spec.clickhouse.url", &["https"], &["http"]),
        TlsServer::Redis => ("spec.cache.redis.url", &["rediss"], &["redis"]),
    };
    let field = server.field();
    if !has_tls && tls_schemes.contains(&scheme) {
        return Some((
            field.to_string(),
            format!(
                "{url_field} is {scheme}:// but {field} is not set: set it (an empty block trusts the system's CAs)"
            ),
        ));
    }
    if has_tls && plain_schemes.contains(&scheme) {
        let secure = tls_schemes[0];
        return Some((
            url_field.to_string(),
            format!("`{url}` is plain {scheme}:// but {field} is set: use {secure}://"),
        ));
    }
    None
}

/// The warning for `tls` blocks with `insecureSkipVerify: true`, naming their servers; `None`
/// when every TLS connection is verified. One of the [`crate::validate::spec_warnings`]
/// (`InsecureTls`).
pub fn insecure_tls_warning(spec: &SignalPipelineSpec) -> Option<String> {
    let fields: Vec<&str> = TlsServer::ALL
        .into_iter()
        .filter(|server| {
            server
                .spec(spec)
                .is_some_and(|tls| tls.insecure_skip_verify)
        })
        .map(TlsServer::field)
        .collect();
    (!fields.is_empty()).then(|| {
        format!(
            "insecureSkipVerify is on for {}: those connections are encrypted but the server is not authenticated; for development only",
            fields.join(", ")
        )
    })
}
