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

/// Connects to NATS, failing when the first connection cannot be made (the caller retries).
pub async fn nats(
    url: &str,
    client_name: &str,
    auth: &NatsAuth,
) -> Result<async_nats::Client, ConnectError> {
    nats_options(client_name, auth)?
        .connect(url)
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
