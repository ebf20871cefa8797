//! The pipeline manifest: the same YAML a user applies with kubectl, read by the worker
//! (`--pipeline FILE`, mounted from the ConfigMap the operator writes) and by local mode. Parsing
//! only: `signal_clients::manifest` reads the file.

use serde::{Deserialize, Serialize};

use crate::spec::SignalPipelineSpec;
use crate::validate::ValidationError;

/// The API version this model reads and writes.
pub const API_VERSION: &str = "signals.dev/v1alpha1";
/// The kind this model reads and writes.
pub const KIND: &str = "SignalPipeline";

/// The part of `metadata` a pipeline file needs.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct ManifestMetadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A `SignalPipeline` document.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PipelineManifest {
    pub api_version: String,
    pub kind: String,
    pub metadata: ManifestMetadata,
    pub spec: SignalPipelineSpec,
}

/// Why a manifest could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{0}")]
    Parse(String),
    #[error("{0}")]
    Invalid(#[from] ValidationError),
}

impl PipelineManifest {
    /// Builds a manifest around a spec, for the ConfigMap the operator writes.
    pub fn new(name: &str, namespace: Option<&str>, spec: SignalPipelineSpec) -> Self {
        Self {
            api_version: API_VERSION.to_string(),
            kind: KIND.to_string(),
            metadata: ManifestMetadata {
                name: name.to_string(),
                namespace: namespace.map(str::to_string),
            },
            spec,
        }
    }

    /// Parses and validates a manifest; errors name the field (`spec.stream.maxAge: …`).
    pub fn from_yaml(text: &str) -> Result<Self, ManifestError> {
        // Parse to a generic value first: other metadata (labels, uid…) is allowed and ignored, while
        // the spec itself rejects unknown fields.
        let manifest: Self = parse_yaml(text)?;
        if manifest.api_version != API_VERSION {
            return Err(ManifestError::Parse(format!(
                "apiVersion: `{}` is not {API_VERSION}",
                manifest.api_version
            )));
        }
        if manifest.kind != KIND {
            return Err(ManifestError::Parse(format!(
                "kind: `{}` is not {KIND}",
                manifest.kind
            )));
        }
        if manifest.metadata.name.is_empty() {
            return Err(ManifestError::Parse(
                "metadata.name: must not be empty".into(),
            ));
        }
        manifest.spec.validate(&manifest.metadata.name)?;
        Ok(manifest)
    }

    /// The manifest as YAML.
    pub fn to_yaml(&self) -> Result<String, ManifestError> {
        yaml_serde::to_string(self).map_err(|e| ManifestError::Parse(e.to_string()))
    }

    /// The durable consumer name.
    pub fn durable_name(&self) -> &str {
        self.spec.durable_name(&self.metadata.name)
    }
}

/// Deserialises YAML, naming the full path of a field whose value is refused (`spec.stream.maxAge`),
/// which the YAML crate alone reports only down to the enclosing struct.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ManifestError> {
    let deserializer = yaml_serde::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner().to_string();
        if path == "." {
            return ManifestError::Parse(inner);
        }
        // The YAML crate may already name the field or its enclosing struct
        // (`spec.workers.batch: unknown field …`): name the full path once instead.
        ManifestError::Parse(match inner.split_once(": ") {
            Some((named, rest)) if path.starts_with(named) => format!("{path}: {rest}"),
            _ => format!("{path}: {inner}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: signals.dev/v1alpha1
kind: SignalPipeline
metadata: {name: tx, labels: {team: risk}}
spec:
  nats: {url: "nats://127.0.0.1:4222"}
  stream: {name: SIGNALS, subjects: ["signals.>"], maxAge: 7d}
  clickhouse:
    url: http://127.0.0.1:8123
    database: db
    table: t
    columns: [{name: id, type: UInt64, from: "@sequence"}]
"#;

    #[test]
    fn reads_a_manifest_and_round_trips_it() {
        let manifest = PipelineManifest::from_yaml(GOOD).unwrap();
        assert_eq!(manifest.durable_name(), "tx");
        assert_eq!(manifest.spec.consumer.max_ack_pending, 20_000);
        let again = PipelineManifest::from_yaml(&manifest.to_yaml().unwrap()).unwrap();
        assert_eq!(again, manifest);
    }

    #[test]
    fn bad_fields_are_named() {
        let err = |text: String| PipelineManifest::from_yaml(&text).unwrap_err().to_string();
        assert!(err(GOOD.replace("maxAge: 7d", "maxAge: 7 days")).contains("spec.stream.maxAge"));
        let unknown = err(GOOD.replace("maxAge: 7d", "maxAgee: 7d"));
        assert!(
            unknown.starts_with("spec.stream.maxAgee: unknown field `maxAgee`"),
            "{unknown}"
        );
        assert!(err(GOOD.replace("v1alpha1", "v2")).contains("apiVersion"));
        assert!(err(GOOD.replace("UInt64", "UInt65")).contains("spec.clickhouse.columns[0].type"));
    }
}
