//! Reading a pipeline's credentials from the Secrets its spec names.
//!
//! Each `auth.secretRef` names a Secret in the pipeline's namespace. Its keys (`user`, `password`,
//! `token`, `creds`) map to the same variable names the worker gets through `secretKeyRef`, so the
//! operator and the worker authenticate identically. Values are never logged: errors name the
//! Secret and the key, not the content.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use signal_model::SignalPipelineSpec;
use signal_model::credentials::{
    CLICKHOUSE_SECRET_KEYS, CredentialsError, NATS_SECRET_KEYS, PipelineCredentials,
    REDIS_SECRET_KEYS,
};

/// Why credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Secret {namespace}/{name} (referenced by {field}) does not exist")]
    Missing {
        namespace: String,
        name: String,
        field: &'static str,
    },
    #[error("cannot read Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("Secret {name}: key `{key}` is not UTF-8 text")]
    NotText { name: String, key: String },
    #[error("invalid credentials: {0}")]
    Credentials(#[from] CredentialsError),
}

/// Which Secret a part of the spec references, and which keys of it matter.
struct SecretUse<'a> {
    field: &'static str,
    name: &'a str,
    keys: &'static [(&'static str, &'static str)],
}

fn secret_uses(spec: &SignalPipelineSpec) -> Vec<SecretUse<'_>> {
    let mut uses = Vec::new();
    if let Some(auth) = &spec.nats.auth {
        uses.push(SecretUse {
            field: "spec.nats.auth",
            name: &auth.secret_ref.name,
            keys: &NATS_SECRET_KEYS,
        });
    }
    if let Some(auth) = &spec.clickhouse.auth {
        uses.push(SecretUse {
            field: "spec.clickhouse.auth",
            name: &auth.secret_ref.name,
            keys: &CLICKHOUSE_SECRET_KEYS,
        });
    }
    if let Some(auth) = spec.cache.as_ref().and_then(|c| c.redis.auth.as_ref()) {
        uses.push(SecretUse {
            field: "spec.cache.redis.auth",
            name: &auth.secret_ref.name,
            keys: &REDIS_SECRET_KEYS,
        });
    }
    uses
}

/// Names of the Secrets a spec references (for RBAC messages and tests).
pub fn referenced_secrets(spec: &SignalPipelineSpec) -> Vec<String> {
    secret_uses(spec)
        .into_iter()
        .map(|u| u.name.to_string())
        .collect()
}

/// Maps the Secrets' keys to credential variables and assembles the credentials (pure).
pub fn credentials_from_secrets(
    spec: &SignalPipelineSpec,
    secrets: &BTreeMap<String, Secret>,
) -> Result<PipelineCredentials, SecretError> {
    let mut variables: HashMap<&str, String> = HashMap::new();
    for secret_use in secret_uses(spec) {
        let Some(secret) = secrets.get(secret_use.name) else {
            continue;
        };
        for (key, variable) in secret_use.keys {
            if let Some(value) = secret_value(secret, key, secret_use.name)? {
                variables.insert(variable, value);
            }
        }
    }
    Ok(PipelineCredentials::from_lookup(|variable| {
        variables.get(variable).cloned()
    })?)
}

fn secret_value(secret: &Secret, key: &str, name: &str) -> Result<Option<String>, SecretError> {
    if let Some(bytes) = secret.data.as_ref().and_then(|data| data.get(key)) {
        return String::from_utf8(bytes.0.clone())
            .map(Some)
            .map_err(|_| SecretError::NotText {
                name: name.to_string(),
                key: key.to_string(),
            });
    }
    Ok(secret
        .string_data
        .as_ref()
        .and_then(|data| data.get(key))
        .cloned())
}

/// Reads every referenced Secret from the pipeline's namespace and assembles the credentials.
pub async fn load_credentials(
    client: &Client,
    namespace: &str,
    spec: &SignalPipelineSpec,
) -> Result<PipelineCredentials, SecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut secrets = BTreeMap::new();
    for secret_use in secret_uses(spec) {
        if secrets.contains_key(secret_use.name) {
            continue;
        }
        let secret = api
            .get_opt(secret_use.name)
            .await
            .map_err(|source| SecretError::Api {
                namespace: namespace.to_string(),
                name: secret_use.name.to_string(),
                source,
            })?
            .ok_or_else(|| SecretError::Missing {
                namespace: namespace.to_string(),
                name: secret_use.name.to_string(),
                field: secret_use.field,
            })?;
        secrets.insert(secret_use.name.to_string(), secret);
    }
    credentials_from_secrets(spec, &secrets)
}
