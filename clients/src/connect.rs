//! Opening clients for NATS, ClickHouse and Redis from a server address and its credentials.
//!
//! The one place that knows how to authenticate, so the worker, the operator, local mode and the
//! demo connect the same way. Clients reconnect by themselves: async-nats retries forever with
//! backoff, the ClickHouse client opens a new HTTP connection per request, and a Redis client
//! connects when asked for a connection.
//!
//! TLS, when a server's material is given, is rustls for all three ([`crate::tls`]): async-nats
//! takes the configuration as is, ClickHouse gets a hyper client with a rustls connector, and
//! Redis gets the PEM text (its own rustls configuration, same provider).

use std::sync::Arc;
use std::time::Duration;

use signal_model::credentials::{NatsAuth, UserPassword};
use signal_model::tls::TlsMaterial;

use crate::tls::{TlsConfigError, client_config, failure_cause};

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("NATS credentials are not a valid creds file: {0}")]
    NatsCreds(std::io::Error),
    #[error("NATS URL `{url}` is not valid: {source}")]
    NatsUrl { url: String, source: std::io::Error },
    #[error("cannot connect to NATS at {url}: {source}")]
    Nats {
        url: String,
        source: async_nats::ConnectError,
    },
    /// The TLS handshake with the server failed; `cause` says why in plain words.
    #[error("{server} at {url}: {cause}")]
    Tls {
        server: &'static str,
        url: String,
        cause: String,
    },
    #[error(transparent)]
    TlsConfig(#[from] TlsConfigError),
    /// The Redis client refused the URL or the TLS settings (only with the `redis` feature).
    #[error("invalid Redis URL or TLS settings for {url}: {message}")]
    Redis { url: String, message: String },
}

/// Options shared by every NATS connection we open.
fn nats_options(
    name: &str,
    auth: &NatsAuth,
    tls: Option<&TlsMaterial>,
) -> Result<async_nats::ConnectOptions, ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None);
    if let Some(tls) = tls {
        options = options
            .require_tls(true)
            .tls_client_config(client_config(tls)?);
    }
    Ok(match auth {
        NatsAuth::None => options,
        NatsAuth::Token(token) => options.token(token.clone()),
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.clone())
        }
        NatsAuth::Creds(contents) => options
            .credentials(contents)
            .map_err(ConnectError::NatsCreds)?,
    })
}

/// The servers of a NATS URL that may list several, comma-separated (`nats://a:4222,nats://b:4222`),
/// as NATS clients take a cluster's seed list. The client tries each in turn and learns the rest
/// of the cluster from the server it reaches.
pub fn nats_server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, ConnectError> {
    if url.split(',').all(|one| one.trim().is_empty()) {
        return Err(ConnectError::NatsUrl {
            url: url.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no server listed"),
        });
    }
    url.split(',')
        .map(str::trim)
        .filter(|one| !one.is_empty())
        .map(|one| {
            one.parse().map_err(|source| ConnectError::NatsUrl {
                url: one.to_string(),
                source,
            })
        })
        .collect()
}

/// Connects to NATS at `url` (one server or a comma-separated seed list), failing when no first
/// connection can be made (the caller retries). A failed TLS handshake is [`ConnectError::Tls`].
pub async fn nats(
    url: &str,
    client_name: &str,
    auth: &NatsAuth,
    tls: Option<&TlsMaterial>,
) -> Result<async_nats::Client, ConnectError> {
    let servers = nats_server_addrs(url)?;
    nats_options(client_name, auth, tls)?
        .connect(servers)
        .await
        .map_err(|source| match failure_cause(&source) {
            Some(cause) => ConnectError::Tls {
                server: "NATS",
                url: url.to_string(),
                cause,
            },
            None => ConnectError::Nats {
                url: url.to_string(),
                source,
            },
        })
}

/// How long an idle pooled ClickHouse connection is kept: below the server's keep-alive timeout
/// (3 s on 18.x), as the crate's own client does.
const CLICKHOUSE_POOL_IDLE: Duration = Duration::from_secs(2);

/// A ClickHouse client for `url`. Validation is off: it relies on `RowBinaryWithNamesAndTypes`,
/// which 18.x servers lack, and we encode rows ourselves anyway. With TLS material the client
/// speaks HTTPS through rustls; it fails only when the material is unusable.
pub fn clickhouse(
    url: &str,
    auth: &UserPassword,
    tls: Option<&TlsMaterial>,
) -> Result<clickhouse::Client, ConnectError> {
    let client = match tls {
        None => clickhouse::Client::default(),
        Some(tls) => {
            use hyper_util::client::legacy::Client as HyperClient;
            use hyper_util::client::legacy::connect::HttpConnector;
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            http.set_keepalive(Some(Duration::from_secs(60)));
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(client_config(tls)?)
                .https_only()
                .enable_http1()
                .wrap_connector(http);
            let hyper = HyperClient::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(CLICKHOUSE_POOL_IDLE)
                .build(https);
            clickhouse::Client::with_http_client(hyper)
        }
    };
    let mut client = client.with_url(url).with_validation(false);
    if let Some(user) = &auth.user {
        client = client.with_user(user);
    }
    if let Some(password) = &auth.password {
        client = client.with_password(password);
    }
    Ok(client)
}

/// The plain-words TLS cause of a failed ClickHouse request, as [`ConnectError::Tls`]; `None`
/// when the failure was not TLS.
pub fn clickhouse_tls_failure(url: &str, error: &clickhouse::error::Error) -> Option<ConnectError> {
    failure_cause(error).map(|cause| ConnectError::Tls {
        server: "ClickHouse",
        url: url.to_string(),
        cause,
    })
}

/// Why a TLS connection to the ClickHouse server at `url` fails, found on a connection of our
/// own: the handshake, then one `GET /ping` read to its end. `None` when that works, when it fails
/// other than by TLS, or when `url` is not `https://`. Call it after a request failed without a
/// TLS cause ([`clickhouse_tls_failure`] gave `None`).
///
/// With TLS 1.3 a server that refuses the client's certificate says so only after the client has
/// finished its handshake. hyper's pool may see that connection close before it sends the request
/// and then reports only that the connection was not ready, so the server's alert is lost and the
/// server looks unreachable. Here nothing stands between the alert and the read that gets it.
pub async fn clickhouse_tls_probe(url: &str, tls: &TlsMaterial) -> Option<ConnectError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uri: http::Uri = url.parse().ok()?;
    if uri.scheme_str() != Some("https") {
        return None;
    }
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let server_name = rustls::pki_types::ServerName::try_from(host.to_string()).ok()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(tls).ok()?));
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        let mut stream = connector.connect(server_name, tcp).await?;
        let request = format!("GET /ping HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<(), std::io::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Err(error)) => failure_cause(&error).map(|cause| ConnectError::Tls {
            server: "ClickHouse",
            url: url.to_string(),
            cause,
        }),
        Ok(Ok(())) | Err(_) => None,
    }
}

/// A Redis client for `url` that authenticates with `auth`; it connects when asked for a
/// connection. Fails only on a malformed URL or unusable TLS material. With TLS material (and a
/// `rediss://` URL) it trusts the given CA and presents the client certificate.
#[cfg(feature = "redis")]
pub fn redis(
    url: &str,
    auth: &UserPassword,
    tls: Option<&TlsMaterial>,
) -> Result<redis::Client, ConnectError> {
    use redis::IntoConnectionInfo;
    let invalid = |error: redis::RedisError| ConnectError::Redis {
        url: url.to_string(),
        message: error.to_string(),
    };
    let mut info = url.into_connection_info().map_err(invalid)?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &auth.user {
        settings = settings.set_username(user);
    }
    if let Some(password) = &auth.password {
        settings = settings.set_password(password);
    }
    info = info.set_redis_settings(settings);
    let Some(tls) = tls else {
        return redis::Client::open(info).map_err(invalid);
    };
    // redis builds its own rustls configuration with the process-wide provider.
    crate::tls::install_default_provider();
    if tls.insecure_skip_verify
        && let redis::ConnectionAddr::TcpTls {
            host,
            port,
            tls_params,
            ..
        } = info.addr().clone()
    {
        info = info.set_addr(redis::ConnectionAddr::TcpTls {
            host,
            port,
            insecure: true,
            tls_params,
        });
    }
    // Parse the material ourselves first, so a bad PEM is reported like for NATS and ClickHouse.
    client_config(tls)?;
    let certificates = redis::TlsCertificates {
        client_tls: tls.client.as_ref().map(|identity| redis::ClientTlsConfig {
            client_cert: identity.cert_pem.clone().into_bytes(),
            client_key: identity.key_pem.clone().into_bytes(),
        }),
        root_cert: tls.ca_pem.clone().map(String::into_bytes),
    };
    redis::Client::build_with_tls(info, certificates).map_err(invalid)
}

/// The plain-words TLS cause of a failed Redis connection, as [`ConnectError::Tls`]; `None` when
/// the failure was not TLS.
#[cfg(feature = "redis")]
pub fn redis_tls_failure(url: &str, error: &redis::RedisError) -> Option<ConnectError> {
    failure_cause(error).map(|cause| ConnectError::Tls {
        server: "Redis",
        url: url.to_string(),
        cause,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_list_gives_one_address_per_server() {
        let servers = nats_server_addrs("nats://a:4222, nats://b:4223,,nats://c:4224").unwrap();
        let hosts: Vec<(String, u16)> = servers
            .iter()
            .map(|s| (s.host().to_string(), s.port()))
            .collect();
        assert_eq!(
            hosts,
            [("a".into(), 4222), ("b".into(), 4223), ("c".into(), 4224)]
        );
        assert_eq!(nats_server_addrs("nats://one:4222").unwrap().len(), 1);
    }

    #[test]
    fn a_bad_server_in_the_list_is_named() {
        let error = nats_server_addrs("nats://a:4222,http://b:80").unwrap_err();
        assert!(error.to_string().contains("`http://b:80`"), "{error}");
    }
}
