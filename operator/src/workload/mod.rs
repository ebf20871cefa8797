//! The Kubernetes objects that run a pipeline's workers, built as pure functions of the pipeline.
//!
//! [`configmap`] renders the manifest the worker reads; [`deployment`] builds the worker Deployment
//! that mounts it. Both are owned by the `SignalPipeline` and carry the same labels, so a reader of
//! the cluster can tell which pipeline a pod belongs to and garbage collection removes them with it.
//! Applying them (server-side apply) is the controller's job, not this module's.

pub mod configmap;
pub mod deployment;
#[cfg(test)]
pub(crate) mod fixtures;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use signal_model::SignalPipeline;

pub use configmap::{build_configmap, config_hash};
pub use deployment::{WorkerDeploymentInputs, build_deployment};

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "signal-operator";
/// Label naming the pipeline on every object the operator creates.
pub const PIPELINE_LABEL: &str = "signals.dev/pipeline";
/// Pod-template annotation with the sha256 of the ConfigMap data, so a manifest change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "signals.dev/config-hash";
/// Name of the worker program and of its pods' `app.kubernetes.io/name`.
pub const WORKER_APP_NAME: &str = "signal-worker";
/// Directory the ConfigMap is mounted at inside the worker container.
pub const MANIFEST_DIR: &str = "/etc/signal";
/// Key of the manifest in the ConfigMap, and its file name under [`MANIFEST_DIR`].
pub const MANIFEST_KEY: &str = "pipeline.yaml";
/// Port of the worker's `/metrics`, `/healthz` and `/readyz`.
pub const WORKER_METRICS_PORT: i32 = 9090;

/// Why an object could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("the SignalPipeline has no {0} (it was not read from the API server?)")]
    MissingMetadata(&'static str),
    #[error("cannot render the pipeline manifest: {0}")]
    Manifest(#[from] signal_model::manifest::ManifestError),
}

/// Name of the worker Deployment of a pipeline.
pub fn deployment_name(pipeline_name: &str) -> String {
    format!("{pipeline_name}-worker")
}

/// Name of the ConfigMap holding a pipeline's manifest.
pub fn configmap_name(pipeline_name: &str) -> String {
    format!("{pipeline_name}-pipeline")
}

/// Labels that select a pipeline's worker pods. Kept minimal: a Deployment selector cannot change.
pub fn selector_labels(pipeline_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            WORKER_APP_NAME.to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            pipeline_name.to_string(),
        ),
    ])
}

/// All labels of the objects the operator creates for a pipeline.
pub fn labels(pipeline_name: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(pipeline_name);
    labels.insert(
        "app.kubernetes.io/managed-by".to_string(),
        FIELD_MANAGER.to_string(),
    );
    labels.insert(PIPELINE_LABEL.to_string(), pipeline_name.to_string());
    labels
}

/// The worker pods' label selector as a string, for `status.selector` (scale subresource, HPA).
pub fn selector_string(pipeline_name: &str) -> String {
    selector_labels(pipeline_name)
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Name and namespace of a pipeline that came from the API server.
pub(crate) fn name_and_namespace(
    pipeline: &SignalPipeline,
) -> Result<(String, String), WorkloadError> {
    let name = pipeline
        .meta()
        .name
        .clone()
        .ok_or(WorkloadError::MissingMetadata("metadata.name"))?;
    let namespace = pipeline
        .namespace()
        .ok_or(WorkloadError::MissingMetadata("metadata.namespace"))?;
    Ok((name, namespace))
}

/// The controller owner reference that ties an object's lifetime to the pipeline.
pub(crate) fn owner_reference(pipeline: &SignalPipeline) -> Result<OwnerReference, WorkloadError> {
    pipeline
        .controller_owner_ref(&())
        .ok_or(WorkloadError::MissingMetadata("metadata.uid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_selector_matches_the_selector_labels() {
        assert_eq!(
            selector_string("orders"),
            "app.kubernetes.io/instance=orders,app.kubernetes.io/name=signal-worker"
        );
        let all = labels("orders");
        for (key, value) in selector_labels("orders") {
            assert_eq!(all.get(&key), Some(&value), "{key}");
        }
        assert_eq!(all.get(PIPELINE_LABEL).map(String::as_str), Some("orders"));
        assert_eq!(
            all.get("app.kubernetes.io/managed-by").map(String::as_str),
            Some(FIELD_MANAGER)
        );
    }
}
