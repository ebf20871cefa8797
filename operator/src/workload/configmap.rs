//! The ConfigMap that carries a pipeline's manifest to its workers.
//!
//! The manifest is the custom resource reduced to what the worker needs (`apiVersion`, `kind`,
//! `metadata.name`, `metadata.namespace`, `spec`) under the key `pipeline.yaml`; the worker reads it
//! with `--pipeline /etc/signal/pipeline.yaml`. Secrets never go here: they reach the pod as
//! environment variables from `secretKeyRef`s (see [`super::deployment`]).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest, Sha256};
use signal_model::SignalPipeline;
use signal_model::manifest::PipelineManifest;

use super::{
    MANIFEST_KEY, WorkloadError, configmap_name, labels, name_and_namespace, owner_reference,
};

/// The manifest file the worker reads, as YAML.
pub fn manifest_yaml(pipeline: &SignalPipeline) -> Result<String, WorkloadError> {
    let (name, namespace) = name_and_namespace(pipeline)?;
    Ok(PipelineManifest::new(&name, Some(&namespace), pipeline.spec.clone()).to_yaml()?)
}

/// The ConfigMap `<pipeline>-pipeline`, owned by the pipeline.
pub fn build_configmap(pipeline: &SignalPipeline) -> Result<ConfigMap, WorkloadError> {
    let (name, namespace) = name_and_namespace(pipeline)?;
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(configmap_name(&name)),
            namespace: Some(namespace),
            labels: Some(labels(&name)),
            owner_references: Some(vec![owner_reference(pipeline)?]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            MANIFEST_KEY.to_string(),
            manifest_yaml(pipeline)?,
        )])),
        ..ConfigMap::default()
    })
}

/// sha256 (hex) of the ConfigMap's data, keys in order; it changes exactly when the data does.
pub fn config_hash(configmap: &ConfigMap) -> String {
    let mut hasher = Sha256::new();
    for (key, value) in configmap.data.iter().flatten() {
        // Length prefixes keep `a`+`bc` and `ab`+`c` apart.
        hasher.update((key.len() as u64).to_be_bytes());
        hasher.update(key.as_bytes());
        hasher.update((value.len() as u64).to_be_bytes());
        hasher.update(value.as_bytes());
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
