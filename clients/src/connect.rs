//! Opening clients for NATS, ClickHouse and Redis from a server address and its credentials.
//!
//! The one place that knows how to authenticate, so the worker, the operator, local mode and the
//! demo connect the same way. Clients reconnect by themselves: async-nats retries forever with
//! backoff, the ClickHouse client opens a new HTTP connection per request, and a Redis client
//! connects when asked for a connection.

use std::time::Duration;

use signal_model::credentials::{NatsAuth, UserPassword};

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
}

/// Options shared by every NATS connection we open.
fn nats_options(name: &str, auth: &NatsAuth) -> Result<async_nats::ConnectOptions, ConnectError> {
    let options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None);
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
/// connection can be made (the caller retries).
pub async fn nats(
    url: &str,
    client_name: &str,
    auth: &NatsAuth,
) -> Result<async_nats::Client, ConnectError> {
    let servers = nats_server_addrs(url)?;
    nats_options(client_name, auth)?
        .connect(servers)
        .await
        .map_err(|source| ConnectError::Nats {
            url: url.to_string(),
            source,
        })
}

/// A ClickHouse client for `url`. Validation is off: it relies on `RowBinaryWithNamesAndTypes`,
/// which 18.x servers lack, and we encode rows ourselves anyway.
pub fn clickhouse(url: &str, auth: &UserPassword) -> clickhouse::Client {
    let mut client = clickhouse::Client::default()
        .with_url(url)
        .with_validation(false);
    if let Some(user) = &auth.user {
        client = client.with_user(user);
    }
    if let Some(password) = &auth.password {
        client = client.with_password(password);
    }
    client
}

/// A Redis client for `url` that authenticates with `auth`; it connects when asked for a
/// connection. Fails only on a malformed URL.
#[cfg(feature = "redis")]
pub fn redis(url: &str, auth: &UserPassword) -> redis::RedisResult<redis::Client> {
    use redis::IntoConnectionInfo;
    let mut info = url.into_connection_info()?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &auth.user {
        settings = settings.set_username(user);
    }
    if let Some(password) = &auth.password {
        settings = settings.set_password(password);
    }
    info = info.set_redis_settings(settings);
    redis::Client::open(info)
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
