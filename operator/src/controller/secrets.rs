//! Reading a pipeline's credentials from the Secrets its spec names.
//!
//! Each `auth.secretRef` names a Secret in the pipeline's namespace. Its keys (`user`, `password`,
//! `token`, `creds`) map to the same variable names the worker gets through `secretKeyRef`, so the
//! operator and the worker authenticate identically. Values are never logged: errors name the
//! Secret and the key, not the content.
//!
//! The `tls` blocks reference Secret or ConfigMap keys holding PEM text; the operator reads the
//! same keys the worker gets as mounted files, so both trust and present the same certificates.
//!
//! The controller reads Secrets through [`SecretCache`] (a metadata watch, data read once per
//! version); ConfigMaps named by `tls` blocks are read per reconcile (rare, and not secret).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use signal_model::credentials::{
    CLICKHOUSE_SECRET_KEYS, CredentialsError, NATS_SECRET_KEYS, PipelineCredentials,
    REDIS_SECRET_KEYS,
};
use signal_model::tls::{PipelineTls, TlsMaterialError, TlsPart, TlsServer};
use signal_model::{PemSource, SignalPipelineSpec};

/// Why credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Secret {namespace}/{name} (referenced by {field}) does not exist")]
    Missing {
        namespace: String,
        name: String,
        field: String,
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
    #[error("ConfigMap {namespace}/{name} (referenced by {field}) does not exist")]
    MissingConfigMap {
        namespace: String,
        name: String,
        field: String,
    },
    #[error("cannot read ConfigMap {namespace}/{name}: {source}")]
    ConfigMapApi {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("invalid TLS material: {0}")]
    Tls(#[from] TlsMaterialError),
}

/// Every Secret or ConfigMap key a `tls` block of `spec` references, with the block's field
/// (`spec.nats.tls.ca`).
pub fn tls_sources(spec: &SignalPipelineSpec) -> Vec<(TlsServer, TlsPart, &PemSource)> {
    let mut sources = Vec::new();
    for server in TlsServer::ALL {
        if let Some(block) = server.spec(spec) {
            for part in TlsPart::ALL {
                if let Some(source) = block.source(part) {
                    sources.push((server, part, source));
                }
            }
        }
    }
    sources
}

/// The TLS material of every `tls` block, from Secrets and ConfigMaps already read (pure). A
/// missing object or key names the field that references it.
pub fn tls_from_objects(
    spec: &SignalPipelineSpec,
    secrets: &BTreeMap<String, Secret>,
    config_maps: &BTreeMap<String, ConfigMap>,
) -> Result<PipelineTls, SecretError> {
    let mut problem: Option<SecretError> = None;
    let tls = PipelineTls::assemble(spec, |server, part| {
        let Some(source) = server.spec(spec).and_then(|block| block.source(part)) else {
            return Ok(None);
        };
        let missing = |what: String| TlsMaterialError::Missing {
            field: server.field(),
            part: part.field(),
            where_: what,
        };
        if let Some(key_ref) = &source.secret_key_ref {
            let secret = secrets
                .get(&key_ref.name)
                .ok_or_else(|| missing(format!("Secret {} was not read", key_ref.name)))?;
            match secret_value(secret, &key_ref.key, &key_ref.name) {
                Ok(Some(text)) => Ok(Some(text)),
                Ok(None) => Err(missing(format!(
                    "Secret {} has no key `{}`",
                    key_ref.name, key_ref.key
                ))),
                Err(error) => {
                    problem = Some(error);
                    Err(missing(format!(
                        "Secret {} key `{}` is not text",
                        key_ref.name, key_ref.key
                    )))
                }
            }
        } else if let Some(key_ref) = &source.config_map_key_ref {
            let config_map = config_maps
                .get(&key_ref.name)
                .ok_or_else(|| missing(format!("ConfigMap {} was not read", key_ref.name)))?;
            match config_map
                .data
                .as_ref()
                .and_then(|data| data.get(&key_ref.key))
            {
                Some(text) => Ok(Some(text.clone())),
                None => Err(missing(format!(
                    "ConfigMap {} has no key `{}`",
                    key_ref.name, key_ref.key
                ))),
            }
        } else {
            Ok(None)
        }
    });
    match (tls, problem) {
        (_, Some(error)) => Err(error),
        (Ok(tls), None) => Ok(tls),
        (Err(error), None) => Err(error.into()),
    }
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

/// Names of the Secrets a spec references, credentials first, then TLS keys (for RBAC messages
/// and tests).
pub fn referenced_secrets(spec: &SignalPipelineSpec) -> Vec<String> {
    let mut names: Vec<String> = secret_uses(spec)
        .into_iter()
        .map(|u| u.name.to_string())
        .collect();
    for (_, _, source) in tls_sources(spec) {
        if let Some(key_ref) = &source.secret_key_ref
            && !names.contains(&key_ref.name)
        {
            names.push(key_ref.name.clone());
        }
    }
    names
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

/// Secrets as a reconcile reads them with watches: a metadata-only watch says which Secrets exist
/// and at which `resourceVersion`; a Secret's data is read (one GET) the first time a pipeline
/// needs it and again only when its version changes, and only referenced Secrets are held in
/// memory (not every Secret of the watched namespaces).
#[derive(Clone, Default)]
pub struct SecretCache {
    metadata: Vec<Store<PartialObjectMeta<Secret>>>,
    /// Referenced Secrets by `namespace/name`, as last read.
    data: Arc<Mutex<HashMap<String, Secret>>>,
}

impl SecretCache {
    pub fn new(metadata: Vec<Store<PartialObjectMeta<Secret>>>) -> Self {
        Self {
            metadata,
            data: Arc::default(),
        }
    }

    /// Secret `name` of `api`'s namespace, `None` when it does not exist.
    async fn get(
        &self,
        api: &Api<Secret>,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Secret>, kube::Error> {
        for store in &self.metadata {
            // Fails only when the watch stopped, and then the controller stops too.
            let _ = store.wait_until_ready().await;
        }
        let key = format!("{namespace}/{name}");
        let reference = ObjectRef::<PartialObjectMeta<Secret>>::new(name).within(namespace);
        let Some(meta) = self.metadata.iter().find_map(|store| store.get(&reference)) else {
            self.lock().remove(&key);
            return Ok(None);
        };
        if let Some(secret) = self.lock().get(&key)
            && secret.metadata.resource_version == meta.metadata.resource_version
        {
            return Ok(Some(secret.clone()));
        }
        let secret = api.get_opt(name).await?;
        match &secret {
            Some(secret) => self.lock().insert(key, secret.clone()),
            None => self.lock().remove(&key),
        };
        Ok(secret)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Secret>> {
        self.data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Reads every referenced Secret from the pipeline's namespace (through `cache` when given) and
/// assembles the credentials.
pub async fn load_credentials(
    client: &Client,
    cache: Option<&SecretCache>,
    namespace: &str,
    spec: &SignalPipelineSpec,
) -> Result<PipelineCredentials, SecretError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut wanted: Vec<(&str, String)> = secret_uses(spec)
        .into_iter()
        .map(|u| (u.name, u.field.to_string()))
        .collect();
    let mut wanted_config_maps: Vec<(&str, String)> = Vec::new();
    for (server, part, source) in tls_sources(spec) {
        let field = format!("{}.{}", server.field(), part.field());
        if let Some(key_ref) = &source.secret_key_ref {
            wanted.push((&key_ref.name, field));
        } else if let Some(key_ref) = &source.config_map_key_ref {
            wanted_config_maps.push((&key_ref.name, field));
        }
    }
    let mut secrets = BTreeMap::new();
    for (name, field) in wanted {
        if secrets.contains_key(name) {
            continue;
        }
        let secret = match cache {
            Some(cache) => cache.get(&api, namespace, name).await,
            None => api.get_opt(name).await,
        };
        let secret = secret
            .map_err(|source| SecretError::Api {
                namespace: namespace.to_string(),
                name: name.to_string(),
                source,
            })?
            .ok_or_else(|| SecretError::Missing {
                namespace: namespace.to_string(),
                name: name.to_string(),
                field,
            })?;
        secrets.insert(name.to_string(), secret);
    }
    let config_map_api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let mut config_maps = BTreeMap::new();
    for (name, field) in wanted_config_maps {
        if config_maps.contains_key(name) {
            continue;
        }
        let config_map = config_map_api
            .get_opt(name)
            .await
            .map_err(|source| SecretError::ConfigMapApi {
                namespace: namespace.to_string(),
                name: name.to_string(),
                source,
            })?
            .ok_or_else(|| SecretError::MissingConfigMap {
                namespace: namespace.to_string(),
                name: name.to_string(),
                field,
            })?;
        config_maps.insert(name.to_string(), config_map);
    }
    let mut credentials = credentials_from_secrets(spec, &secrets)?;
    credentials.tls = tls_from_objects(spec, &secrets, &config_maps)?;
    Ok(credentials)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde_json::json;
    use signal_model::credentials::NatsAuth;

    use super::*;
    use crate::workload::fixtures::minimal_spec;

    fn spec_with_auth() -> SignalPipelineSpec {
        let mut spec = minimal_spec();
        spec["nats"]["auth"] = json!({"secretRef": {"name": "nats-auth"}});
        spec["clickhouse"]["auth"] = json!({"secretRef": {"name": "clickhouse-auth"}});
        serde_json::from_value(spec).expect("a valid spec")
    }

    fn secret(name: &str, data: &[(&str, &[u8])]) -> (String, Secret) {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(key, value)| (key.to_string(), ByteString(value.to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        };
        (name.to_string(), secret)
    }

    #[test]
    fn secret_keys_become_the_credentials_of_each_server() {
        let secrets = BTreeMap::from([
            secret("nats-auth", &[("token", b"s3cret-token")]),
            secret(
                "clickhouse-auth",
                &[("user", b"ingest"), ("password", b"pw")],
            ),
        ]);
        let credentials =
            credentials_from_secrets(&spec_with_auth(), &secrets).expect("credentials");
        assert!(credentials.nats == NatsAuth::Token("s3cret-token".to_string()));
        assert_eq!(credentials.clickhouse.user.as_deref(), Some("ingest"));
        assert_eq!(credentials.clickhouse.password.as_deref(), Some("pw"));
    }

    #[test]
    fn string_data_is_read_when_data_lacks_the_key() {
        let (name, mut clickhouse) = secret("clickhouse-auth", &[]);
        clickhouse.string_data = Some(BTreeMap::from([("user".to_string(), "reader".to_string())]));
        let secrets = BTreeMap::from([(name, clickhouse)]);
        let credentials =
            credentials_from_secrets(&spec_with_auth(), &secrets).expect("credentials");
        assert_eq!(credentials.clickhouse.user.as_deref(), Some("reader"));
    }

    #[test]
    fn a_binary_value_is_refused_naming_the_key_not_the_value() {
        let secrets = BTreeMap::from([secret("clickhouse-auth", &[("password", &[0xff, 0xfe])])]);
        let error = credentials_from_secrets(&spec_with_auth(), &secrets).expect_err("not text");
        assert!(
            matches!(&error, SecretError::NotText { key, .. } if key == "password"),
            "{error}"
        );
    }

    #[test]
    fn referenced_secrets_lists_every_secret_ref() {
        assert_eq!(
            referenced_secrets(&spec_with_auth()),
            ["nats-auth", "clickhouse-auth"]
        );
        let plain: SignalPipelineSpec =
            serde_json::from_value(minimal_spec()).expect("a valid spec");
        assert!(referenced_secrets(&plain).is_empty());
    }
}
