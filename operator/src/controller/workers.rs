//! The workers step of an apply: server-side applies the pipeline's ConfigMap and worker
//! Deployment, says in an event what that changed, and turns the Deployment's state into the
//! `WorkersReady` condition.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use signal_model::SignalPipeline;

use super::Context;
use super::conditions::{ConditionState, ConditionStatus, WORKERS_READY};
use super::events::publish;
use super::reconcile::{ReconcileError, kube_error};
use crate::workload::{
    CONFIG_HASH_ANNOTATION, FIELD_MANAGER, WorkerDeploymentInputs, build_configmap,
    build_deployment, config_hash,
};

/// Server-side applies the ConfigMap and the Deployment; returns the Deployment as stored.
pub(super) async fn apply_workload(
    pipeline: &SignalPipeline,
    ctx: &Context,
    existing: Option<&Deployment>,
    replicas: i32,
) -> Result<Deployment, ReconcileError> {
    let namespace = pipeline
        .namespace()
        .ok_or(ReconcileError::MissingMetadata("metadata.namespace"))?;
    let params = PatchParams::apply(FIELD_MANAGER).force();

    let configmap = build_configmap(pipeline)?;
    let hash = config_hash(&configmap);
    let configmap_name = configmap.name_any();
    Api::<ConfigMap>::namespaced(ctx.client.clone(), &namespace)
        .patch(&configmap_name, &params, &Patch::Apply(&configmap))
        .await
        .map_err(kube_error(format!("applying ConfigMap {configmap_name}")))?;

    let desired = build_deployment(
        pipeline,
        &WorkerDeploymentInputs {
            replicas,
            default_image: &ctx.settings.default_worker_image,
            config_hash: &hash,
        },
    )?;
    let deployment_name = desired.name_any();
    let applied = Api::<Deployment>::namespaced(ctx.client.clone(), &namespace)
        .patch(&deployment_name, &params, &Patch::Apply(&desired))
        .await
        .map_err(kube_error(format!("applying Deployment {deployment_name}")))?;

    if let Some(change) = describe_workload_change(existing, replicas, &hash, &deployment_name) {
        publish(
            &ctx.recorder,
            pipeline,
            EventType::Normal,
            "WorkersApplied",
            "Apply",
            change,
        )
        .await;
    }
    Ok(applied)
}

/// What applying the Deployment changed, in words (`None` when nothing did).
fn describe_workload_change(
    existing: Option<&Deployment>,
    replicas: i32,
    hash: &str,
    deployment_name: &str,
) -> Option<String> {
    let Some(existing) = existing else {
        return Some(format!(
            "created Deployment {deployment_name} with {replicas} worker(s)"
        ));
    };
    let old_replicas = existing.spec.as_ref().and_then(|s| s.replicas);
    let old_hash = existing
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(CONFIG_HASH_ANNOTATION));
    let mut changes = Vec::new();
    if old_replicas != Some(replicas) {
        changes.push(format!(
            "scaled Deployment {deployment_name} from {} to {replicas} worker(s)",
            old_replicas.unwrap_or_default()
        ));
    }
    if old_hash.map(String::as_str) != Some(hash) {
        changes.push(format!(
            "rolling out the changed pipeline manifest to Deployment {deployment_name}"
        ));
    }
    (!changes.is_empty()).then(|| changes.join("; "))
}

pub(super) fn workers_condition(
    deployment: Option<&Deployment>,
    data_plane_ready: bool,
) -> ConditionState {
    let Some(deployment) = deployment else {
        return ConditionState::new(
            WORKERS_READY,
            ConditionStatus::False,
            "WaitingForDataPlane",
            "the worker Deployment is created once the stream, consumer and table are ready",
        );
    };
    let wanted = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let status = deployment.status.as_ref();
    let ready = status.and_then(|s| s.ready_replicas).unwrap_or(0);
    let updated = status.and_then(|s| s.updated_replicas).unwrap_or(0);
    let current_generation =
        status.and_then(|s| s.observed_generation) >= deployment.metadata.generation;
    let suffix = if data_plane_ready {
        ""
    } else {
        " (not updated while the data plane is not ready)"
    };
    if wanted == 0 {
        ConditionState::new(
            WORKERS_READY,
            ConditionStatus::True,
            "ScaledToZero",
            format!("the Deployment is scaled to zero{suffix}"),
        )
    } else if current_generation && ready >= wanted && updated >= wanted {
        ConditionState::new(
            WORKERS_READY,
            ConditionStatus::True,
            "Ready",
            format!("{ready}/{wanted} workers ready{suffix}"),
        )
    } else {
        ConditionState::new(
            WORKERS_READY,
            ConditionStatus::False,
            "Progressing",
            format!("{ready}/{wanted} workers ready, {updated} up to date{suffix}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn deployment(replicas: i32, hash: &str, ready: i32, observed_generation: i64) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(2),
                ..ObjectMeta::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        annotations: Some(
                            [(CONFIG_HASH_ANNOTATION.to_string(), hash.to_string())].into(),
                        ),
                        ..ObjectMeta::default()
                    }),
                    spec: None,
                },
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(observed_generation),
                ready_replicas: Some(ready),
                updated_replicas: Some(ready),
                ..DeploymentStatus::default()
            }),
        }
    }

    #[test]
    fn workload_changes_are_described_only_when_something_changed() {
        let created = describe_workload_change(None, 2, "h1", "orders-worker");
        assert_eq!(
            created.as_deref(),
            Some("created Deployment orders-worker with 2 worker(s)")
        );
        let same = deployment(2, "h1", 2, 2);
        assert_eq!(
            describe_workload_change(Some(&same), 2, "h1", "orders-worker"),
            None
        );
        let scaled = describe_workload_change(Some(&same), 5, "h1", "orders-worker");
        assert_eq!(
            scaled.as_deref(),
            Some("scaled Deployment orders-worker from 2 to 5 worker(s)")
        );
        let rolled = describe_workload_change(Some(&same), 2, "h2", "orders-worker");
        assert!(rolled.is_some_and(|text| text.contains("rolling out")));
    }

    #[test]
    fn workers_are_ready_when_the_current_generation_has_every_replica_ready() {
        let ready = workers_condition(Some(&deployment(2, "h", 2, 2)), true);
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (ConditionStatus::True, "Ready")
        );
        let stale = workers_condition(Some(&deployment(2, "h", 2, 1)), true);
        assert_eq!(
            (stale.status, stale.reason.as_str()),
            (ConditionStatus::False, "Progressing")
        );
        let partial = workers_condition(Some(&deployment(3, "h", 1, 2)), true);
        assert_eq!(partial.status, ConditionStatus::False);
        let zero = workers_condition(Some(&deployment(0, "h", 0, 2)), false);
        assert_eq!(
            (zero.status, zero.reason.as_str()),
            (ConditionStatus::True, "ScaledToZero")
        );
        assert!(
            zero.message
                .contains("not updated while the data plane is not ready")
        );
        let missing = workers_condition(None, false);
        assert_eq!(missing.reason, "WaitingForDataPlane");
    }
}
