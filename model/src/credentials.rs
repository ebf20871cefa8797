//! Secrets a pipeline needs, and the environment variables that carry them into a worker.
//!
//! The operator passes Secret keys to worker pods as `valueFrom.secretKeyRef` environment variables
//! with the names below, and reads the same keys itself when it connects; the worker reads them back
//! from its environment (`signal_clients::credentials::from_env`, which also reads a creds file named
//! by [`ENV_NATS_CREDS_FILE`]). Secrets never enter the pipeline manifest or a ConfigMap, and
//! `Debug` output redacts them so they cannot reach a log line.

use std::fmt;

/// Environment variable with a NATS token (Secret key `token`).
pub const ENV_NATS_TOKEN: &str = "SIGNAL_NATS_TOKEN";
/// Environment variable with a NATS user name (Secret key `user`).
pub const ENV_NATS_USER: &str = "SIGNAL_NATS_USER";
/// Environment variable with a NATS password (Secret key `password`).
pub const ENV_NATS_PASSWORD: &str = "SIGNAL_NATS_PASSWORD";
/// Environment variable with the contents of a NATS `.creds` file (Secret key `creds`).
pub const ENV_NATS_CREDS: &str = "SIGNAL_NATS_CREDS";
/// Environment variable with the path of a NATS `.creds` file (for local use; read by
/// `signal_clients::credentials`, never here).
pub const ENV_NATS_CREDS_FILE: &str = "SIGNAL_NATS_CREDS_FILE";
/// Environment variable with the ClickHouse user (Secret key `user`).
pub const ENV_CLICKHOUSE_USER: &str = "SIGNAL_CLICKHOUSE_USER";
/// Environment variable with the ClickHouse password (Secret key `password`).
pub const ENV_CLICKHOUSE_PASSWORD: &str = "SIGNAL_CLICKHOUSE_PASSWORD";
/// Environment variable with the Redis user (Secret key `user`, optional).
pub const ENV_REDIS_USER: &str = "SIGNAL_REDIS_USER";
/// Environment variable with the Redis password (Secret key `password`).
pub const ENV_REDIS_PASSWORD: &str = "SIGNAL_REDIS_PASSWORD";

/// Secret keys read from each referenced Secret, and the variable each one becomes.
pub const NATS_SECRET_KEYS: [(&str, &str); 4] = [
    ("creds", ENV_NATS_CREDS),
    ("token", ENV_NATS_TOKEN),
    ("user", ENV_NATS_USER),
    ("password", ENV_NATS_PASSWORD),
];
pub const CLICKHOUSE_SECRET_KEYS: [(&str, &str); 2] = [
    ("user", ENV_CLICKHOUSE_USER),
    ("password", ENV_CLICKHOUSE_PASSWORD),
];
pub const REDIS_SECRET_KEYS: [(&str, &str); 2] =
    [("user", ENV_REDIS_USER), ("password", ENV_REDIS_PASSWORD)];

/// How to authenticate to NATS.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum NatsAuth {
    #[default]
    None,
    Token(String),
    UserPassword {
        user: String,
        password: String,
    },
    /// The contents of a `.creds` file (JWT and NKey seed).
    Creds(String),
}

/// A user name and password; both optional, since servers may accept a user without a password.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct UserPassword {
    pub user: Option<String>,
    pub password: Option<String>,
}

/// All the secrets of one pipeline.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PipelineCredentials {
    pub nats: NatsAuth,
    pub clickhouse: UserPassword,
    pub redis: UserPassword,
    /// TLS material of the servers reached over TLS (filled by the loaders from the spec's
    /// `tls` blocks; [`Self::from_lookup`] leaves it empty).
    pub tls: crate::tls::PipelineTls,
}

/// Why credentials could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{0}: a NATS password was given without a user")]
    PasswordWithoutUser(&'static str),
}

impl PipelineCredentials {
    /// Assembles credentials from a lookup of variable names (the process environment, or a Secret's
    /// keys already mapped to variable names). Empty values count as absent. A creds file path
    /// ([`ENV_NATS_CREDS_FILE`]) is not read here: the caller passes the file's contents as
    /// [`ENV_NATS_CREDS`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, CredentialsError> {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let nats = if let Some(creds) = get(ENV_NATS_CREDS) {
            NatsAuth::Creds(creds)
        } else if let Some(token) = get(ENV_NATS_TOKEN) {
            NatsAuth::Token(token)
        } else {
            match (get(ENV_NATS_USER), get(ENV_NATS_PASSWORD)) {
                (Some(user), password) => NatsAuth::UserPassword {
                    user,
                    password: password.unwrap_or_default(),
                },
                (None, Some(_)) => {
                    return Err(CredentialsError::PasswordWithoutUser(ENV_NATS_PASSWORD));
                }
                (None, None) => NatsAuth::None,
            }
        };
        Ok(Self {
            nats,
            clickhouse: UserPassword {
                user: get(ENV_CLICKHOUSE_USER),
                password: get(ENV_CLICKHOUSE_PASSWORD),
            },
            redis: UserPassword {
                user: get(ENV_REDIS_USER),
                password: get(ENV_REDIS_PASSWORD),
            },
            tls: crate::tls::PipelineTls::default(),
        })
    }
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NatsAuth::None => "None",
            NatsAuth::Token(_) => "Token(<redacted>)",
            NatsAuth::UserPassword { .. } => "UserPassword(<redacted>)",
            NatsAuth::Creds(_) => "Creds(<redacted>)",
        })
    }
}

impl fmt::Debug for UserPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserPassword")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl fmt::Debug for PipelineCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipelineCredentials")
            .field("nats", &self.nats)
            .field("clickhouse", &self.clickhouse)
            .field("redis", &self.redis)
            .field("tls", &self.tls)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn picks_the_nats_method_and_redacts_debug_output() {
        let creds = PipelineCredentials::from_lookup(lookup(&[
            (ENV_NATS_USER, "ingest"),
            (ENV_NATS_PASSWORD, "s3cret"),
            (ENV_CLICKHOUSE_PASSWORD, "chpass"),
        ]))
        .unwrap();
        assert_eq!(
            creds.nats,
            NatsAuth::UserPassword {
                user: "ingest".into(),
                password: "s3cret".into()
            }
        );
        let printed = format!("{creds:?}");
        assert!(
            !printed.contains("s3cret") && !printed.contains("chpass"),
            "{printed}"
        );

        let token = PipelineCredentials::from_lookup(lookup(&[(ENV_NATS_TOKEN, "t")])).unwrap();
        assert_eq!(token.nats, NatsAuth::Token("t".into()));
        let err =
            PipelineCredentials::from_lookup(lookup(&[(ENV_NATS_PASSWORD, "p")])).unwrap_err();
        assert!(err.to_string().contains(ENV_NATS_PASSWORD));
    }
}
