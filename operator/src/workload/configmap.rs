//! The ConfigMap that carries a pipeline's manifest to its workers.
//!
//! The manifest is the custom resource reduced to what the worker needs (`apiVersion`, `kind`,
//! `metadata.name`, `metadata.namespace`, `spec` with `deadLetter` resolved) under the key
//! `pipeline.yaml`; the worker reads it
//! with `--pipeline /etc/signal/pipeline.yaml`. Secrets never go here: they reach the pod as
//! environment variables from `secretKeyRef`s (see [`super::deployment`]).
//!
//! What only the Deployment uses (`workers.replicas`, `image`, `resources`, `autoscale`) is left
//! at its defaults in the manifest: the pods roll when the manifest's hash changes, and scaling
//! or a new image must not restart every pod for a manifest change the worker never reads.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest, Sha256};
use signal_model::manifest::PipelineManifest;
use signal_model::{SignalPipeline, WorkersSpec};

use super::{
    MANIFEST_KEY, WorkloadError, configmap_name, labels, name_and_namespace, owner_reference,
};

/// The manifest file the worker reads, as YAML.
pub fn manifest_yaml(pipeline: &SignalPipeline) -> Result<String, WorkloadError> {
    let (name, namespace) = name_and_namespace(pipeline)?;
    // Defaults resolved, so the workers publish dead letters where the operator keeps them.
    let mut spec = pipeline.spec.with_dead_letter_resolved(&name);
    spec.workers = WorkersSpec {
        batch: spec.workers.batch,
        max_message_bytes: spec.workers.max_message_bytes,
        // The workers consume the partitions' consumers and hold their leases.
        partitions: spec.workers.partitions,
        ..WorkersSpec::default()
    };
    Ok(PipelineManifest::new(&name, Some(&namespace), spec).to_yaml()?)
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::workload::fixtures::{
        NAMESPACE, minimal_spec, stored_pipeline, stored_pipeline_with,
    };

    #[test]
    fn the_configmap_carries_the_manifest_the_worker_reads() {
        let pipeline = stored_pipeline("orders");
        let configmap = build_configmap(&pipeline).expect("built");
        assert_eq!(configmap.metadata.name.as_deref(), Some("orders-pipeline"));
        assert_eq!(configmap.metadata.namespace.as_deref(), Some(NAMESPACE));
        assert_eq!(configmap.metadata.labels, Some(labels("orders")));

        let data = configmap.data.as_ref().expect("data");
        assert_eq!(data.keys().collect::<Vec<_>>(), [MANIFEST_KEY]);
        let manifest =
            PipelineManifest::from_yaml(&data[MANIFEST_KEY]).expect("the worker parses it");
        assert_eq!(manifest.metadata.name, "orders");
        assert_eq!(manifest.metadata.namespace.as_deref(), Some(NAMESPACE));
        // The spec, with the dead-letter defaults written out for the worker.
        assert_eq!(
            manifest.spec,
            pipeline.spec.with_dead_letter_resolved("orders")
        );
        let dead_letter = manifest.spec.dead_letter.expect("resolved");
        assert_eq!(
            dead_letter.subject,
            Some(pipeline.spec.dead_letter_subject("orders"))
        );
        assert_eq!(pipeline.spec.dead_letter, None);
    }

    #[test]
    fn the_manifest_names_secrets_but_never_holds_their_values() {
        let mut spec = minimal_spec();
        spec["clickhouse"]["auth"] = json!({"secretRef": {"name": "clickhouse-auth"}});
        spec["nats"]["auth"] = json!({"secretRef": {"name": "nats-auth"}});
        let configmap = build_configmap(&stored_pipeline_with("orders", spec, 0)).expect("built");
        let manifest = &configmap.data.as_ref().expect("data")[MANIFEST_KEY];
        assert!(manifest.contains("clickhouse-auth"), "{manifest}");
        // Only the manifest key: credentials reach the pod through secretKeyRef variables.
        assert_eq!(configmap.data.as_ref().map(|d| d.len()), Some(1));
        assert!(configmap.binary_data.is_none());
    }

    #[test]
    fn the_configmap_is_owned_by_its_pipeline() {
        let configmap = build_configmap(&stored_pipeline("orders")).expect("built");
        let owners = configmap
            .metadata
            .owner_references
            .expect("owner references");
        assert_eq!(owners.len(), 1);
        let owner = &owners[0];
        assert_eq!(owner.api_version, "signals.dev/v1alpha1");
        assert_eq!(owner.kind, "SignalPipeline");
        assert_eq!(owner.name, "orders");
        assert_eq!(owner.uid, "uid-orders");
        assert_eq!(owner.controller, Some(true));
    }

    #[test]
    fn a_pipeline_not_read_from_the_api_server_is_refused() {
        let mut pipeline = stored_pipeline("orders");
        pipeline.metadata.uid = None;
        assert!(matches!(
            build_configmap(&pipeline),
            Err(WorkloadError::MissingMetadata("metadata.uid"))
        ));
        pipeline.metadata.namespace = None;
        assert!(matches!(
            build_configmap(&pipeline),
            Err(WorkloadError::MissingMetadata("metadata.namespace"))
        ));
    }

    #[test]
    fn the_config_hash_changes_exactly_when_the_manifest_does() {
        let pipeline = stored_pipeline("orders");
        let hash = config_hash(&build_configmap(&pipeline).expect("built"));
        assert_eq!(hash.len(), 64);
        assert!(hash.chars().all(|c| c.is_ascii_hexdigit()), "{hash}");
        assert_eq!(
            hash,
            config_hash(&build_configmap(&pipeline).expect("built"))
        );

        let mut scaled = pipeline.clone();
        scaled.metadata.generation = Some(9);
        assert_eq!(
            hash,
            config_hash(&build_configmap(&scaled).expect("built")),
            "metadata outside the manifest does not roll the pods"
        );

        let mut edited = pipeline;
        edited.spec.workers.batch.max_rows = 500;
        assert_ne!(hash, config_hash(&build_configmap(&edited).expect("built")));
    }

    #[test]
    fn scaling_or_a_new_image_leaves_the_manifest_alone() {
        let mut spec = minimal_spec();
        spec["workers"] = json!({"replicas": 2, "batch": {"maxRows": 700}});
        let pipeline = stored_pipeline_with("orders", spec, 0);
        let hash = config_hash(&build_configmap(&pipeline).expect("built"));
        let mut deployment_only = pipeline.clone();
        let workers = &mut deployment_only.spec.workers;
        workers.replicas = 5;
        workers.image = Some("registry.example/worker:2".to_string());
        workers.resources =
            Some(serde_json::from_value(json!({"limits": {"memory": "1Gi"}})).expect("resources"));
        workers.autoscale = Some(
            serde_json::from_value(
                json!({"minReplicas": 1, "maxReplicas": 4, "targetLagPerReplica": 100}),
            )
            .expect("autoscale"),
        );
        assert_eq!(
            hash,
            config_hash(&build_configmap(&deployment_only).expect("built"))
        );
        // What the worker reads stays in: the batch settings.
        let manifest =
            PipelineManifest::from_yaml(&manifest_yaml(&deployment_only).expect("rendered"))
                .expect("the worker parses it");
        assert_eq!(manifest.spec.workers.batch.max_rows, 700);
        assert_eq!(manifest.spec.workers.image, None);
    }

    #[test]
    fn the_config_hash_separates_keys_from_values() {
        let with = |key: &str, value: &str| ConfigMap {
            data: Some(BTreeMap::from([(key.to_string(), value.to_string())])),
            ..ConfigMap::default()
        };
        assert_ne!(config_hash(&with("a", "bc")), config_hash(&with("ab", "c")));
    }
}
