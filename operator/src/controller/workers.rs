//! The workers step of an apply: server-side applies the pipeline's ConfigMap and worker
//! Deployment, says in an event what that changed, and turns the Deployment's state into the
//! `WorkersReady` condition.
//!
//! The workload follows the spec from the last known good data-plane state ([`plan_workload`]):
//! while a server is down or a part is otherwise not ready, a Deployment that already runs still
//! gets the spec's replicas and pod template (image, resources), so scaling and rollouts keep
//! working, but a changed manifest waits: the ConfigMap is not applied and the pods keep their
//! config hash until the stream, consumer and table the manifest describes are ready. A Deployment
//! that does not exist yet is created only once they are.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use signal_model::SignalPipeline;

use super::conditions::{ConditionState, ConditionStatus, WORKERS_READY};
use super::events::publish;
use super::reconcile::{ReconcileError, kube_error};
use super::{Context, ManifestDigest, inputs_fingerprint};
use crate::workload::{
    CONFIG_HASH_ANNOTATION, FIELD_MANAGER, WorkerDeploymentInputs, build_configmap,
    build_deployment, configmap_name, deployment_name,
};

/// What the workers step applies in one reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct WorkloadPlan {
    /// Apply the ConfigMap with the spec's manifest.
    pub apply_configmap: bool,
    /// The pod template's config-hash annotation (`None`: the running Deployment had none).
    pub config_hash: Option<String>,
    /// The spec's manifest differs from the one the pods run and waits for the data plane.
    pub manifest_waits: bool,
}

/// Decides what the workers step applies, from whether the stream, consumer and table are ready,
/// the Deployment as it runs, and the hash of the spec's manifest. `None`: nothing runs yet and
/// the data plane is not ready, so nothing is created.
pub(super) fn plan_workload(
    data_plane_ready: bool,
    existing: Option<&Deployment>,
    manifest_hash: &str,
) -> Option<WorkloadPlan> {
    if data_plane_ready {
        return Some(WorkloadPlan {
            apply_configmap: true,
            config_hash: Some(manifest_hash.to_string()),
            manifest_waits: false,
        });
    }
    // The Deployment was applied when the data plane was last good: keep its manifest.
    let running = running_config_hash(existing?);
    Some(WorkloadPlan {
        apply_configmap: false,
        manifest_waits: running != Some(manifest_hash),
        config_hash: running.map(str::to_string),
    })
}

/// The config hash the Deployment's pods run with.
fn running_config_hash(deployment: &Deployment) -> Option<&str> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(CONFIG_HASH_ANNOTATION))
        .map(String::as_str)
}

/// What the workers step left running, and the `WorkersReady` condition it makes.
pub(super) struct WorkloadOutcome {
    pub deployment: Option<Deployment>,
    pub condition: ConditionState,
}

/// Applies what [`plan_workload`] decides: the ConfigMap and the Deployment, only the Deployment,
/// or nothing.
pub(super) async fn reconcile_workload(
    pipeline: &SignalPipeline,
    ctx: &Context,
    existing: Option<Deployment>,
    replicas: i32,
    data_plane_ready: bool,
) -> Result<WorkloadOutcome, ReconcileError> {
    let manifest = ctx.manifest_digest(pipeline)?;
    let plan = plan_workload(data_plane_ready, existing.as_ref(), &manifest.config_hash);
    let deployment = match &plan {
        Some(plan) => {
            Some(apply_workload(pipeline, ctx, existing.as_ref(), replicas, &manifest, plan).await?)
        }
        None => existing,
    };
    let condition = workers_condition(deployment.as_ref(), plan.as_ref());
    Ok(WorkloadOutcome {
        deployment,
        condition,
    })
}

/// Server-side applies the ConfigMap (when the plan says so) and the Deployment; returns the
/// Deployment as stored.
async fn apply_workload(
    pipeline: &SignalPipeline,
    ctx: &Context,
    existing: Option<&Deployment>,
    replicas: i32,
    manifest: &ManifestDigest,
    plan: &WorkloadPlan,
) -> Result<Deployment, ReconcileError> {
    let namespace = pipeline
        .namespace()
        .ok_or(ReconcileError::MissingMetadata("metadata.namespace"))?;
    let params = PatchParams::apply(FIELD_MANAGER).force();

    if plan.apply_configmap {
        let configmap_name = configmap_name(&pipeline.name_any());
        let key = format!("configmap {namespace}/{configmap_name}");
        let live_version = ctx
            .caches
            .configmap(&namespace, &configmap_name)
            .await
            .flatten()
            .and_then(|live| live.metadata.resource_version);
        let unchanged = ctx.unchanged_since_applied(&key, manifest.fingerprint, live_version);
        ctx.metrics.write("configmap", !unchanged);
        if !unchanged {
            let configmap = build_configmap(pipeline)?;
            let applied = Api::<ConfigMap>::namespaced(ctx.client.clone(), &namespace)
                .patch(&configmap_name, &params, &Patch::Apply(&configmap))
                .await
                .map_err(kube_error(format!("applying ConfigMap {configmap_name}")))?;
            ctx.remember_applied(
                &key,
                manifest.fingerprint,
                applied.metadata.resource_version,
            );
        }
    }

    let inputs = WorkerDeploymentInputs {
        replicas,
        default_image: &ctx.settings.default_worker_image,
        config_hash: plan.config_hash.as_deref(),
    };
    // What the Deployment is built from stands for it: a resync that finds it applied and
    // unchanged need not build it.
    let desired_fingerprint = inputs_fingerprint(
        pipeline,
        (inputs.replicas, inputs.default_image, inputs.config_hash),
    );
    let deployment_name = deployment_name(&pipeline.name_any());
    let key = format!("deployment {namespace}/{deployment_name}");
    let generation =
        |deployment: &Deployment| deployment.metadata.generation.map(|g| g.to_string());
    if let Some(existing) = existing
        && ctx.unchanged_since_applied(&key, desired_fingerprint, generation(existing))
    {
        ctx.metrics.write("deployment", false);
        return Ok(existing.clone());
    }
    ctx.metrics.write("deployment", true);
    let desired = build_deployment(pipeline, &inputs)?;
    let applied = Api::<Deployment>::namespaced(ctx.client.clone(), &namespace)
        .patch(&deployment_name, &params, &Patch::Apply(&desired))
        .await
        .map_err(kube_error(format!("applying Deployment {deployment_name}")))?;
    ctx.remember_applied(&key, desired_fingerprint, generation(&applied));

    let change = describe_workload_change(
        existing,
        replicas,
        plan.config_hash.as_deref(),
        &deployment_name,
    );
    if let Some(change) = change {
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
    hash: Option<&str>,
    deployment_name: &str,
) -> Option<String> {
    let Some(existing) = existing else {
        return Some(format!(
            "created Deployment {deployment_name} with {replicas} worker(s)"
        ));
    };
    let old_replicas = existing.spec.as_ref().and_then(|s| s.replicas);
    let old_hash = running_config_hash(existing);
    let mut changes = Vec::new();
    if old_replicas != Some(replicas) {
        changes.push(format!(
            "scaled Deployment {deployment_name} from {} to {replicas} worker(s)",
            old_replicas.unwrap_or_default()
        ));
    }
    if old_hash != hash {
        changes.push(format!(
            "rolling out the changed pipeline manifest to Deployment {deployment_name}"
        ));
    }
    (!changes.is_empty()).then(|| changes.join("; "))
}

/// `WorkersReady` from the Deployment as applied, saying what waits for the data plane.
fn workers_condition(
    deployment: Option<&Deployment>,
    plan: Option<&WorkloadPlan>,
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
    let suffix = match plan {
        Some(plan) if plan.apply_configmap => "",
        Some(plan) if plan.manifest_waits => {
            " (data plane not ready: replicas and pod template follow the spec; the changed \
             manifest waits for the stream, consumer and table)"
        }
        _ => " (data plane not ready: replicas and pod template still follow the spec)",
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

    fn ready_plan(hash: &str) -> WorkloadPlan {
        WorkloadPlan {
            apply_configmap: true,
            config_hash: Some(hash.to_string()),
            manifest_waits: false,
        }
    }

    #[test]
    fn a_ready_data_plane_applies_the_spec_manifest() {
        let running = deployment(2, "old", 2, 2);
        for existing in [None, Some(&running)] {
            assert_eq!(
                plan_workload(true, existing, "new"),
                Some(ready_plan("new"))
            );
        }
    }

    #[test]
    fn nothing_is_created_before_the_data_plane_is_ready() {
        assert_eq!(plan_workload(false, None, "new"), None);
    }

    #[test]
    fn during_an_outage_a_running_deployment_keeps_its_manifest() {
        let running = deployment(2, "old", 2, 2);
        assert_eq!(
            plan_workload(false, Some(&running), "new"),
            Some(WorkloadPlan {
                apply_configmap: false,
                config_hash: Some("old".to_string()),
                manifest_waits: true,
            })
        );
        assert_eq!(
            plan_workload(false, Some(&running), "old"),
            Some(WorkloadPlan {
                apply_configmap: false,
                config_hash: Some("old".to_string()),
                manifest_waits: false,
            })
        );
        // A Deployment without the annotation keeps having none, so the manifest still rolls the
        // pods once the data plane is back.
        let mut bare = running;
        bare.spec.as_mut().expect("spec").template.metadata = None;
        assert_eq!(
            plan_workload(false, Some(&bare), "new"),
            Some(WorkloadPlan {
                apply_configmap: false,
                config_hash: None,
                manifest_waits: true,
            })
        );
    }

    #[test]
    fn workload_changes_are_described_only_when_something_changed() {
        let created = describe_workload_change(None, 2, Some("h1"), "orders-worker");
        assert_eq!(
            created.as_deref(),
            Some("created Deployment orders-worker with 2 worker(s)")
        );
        let same = deployment(2, "h1", 2, 2);
        assert_eq!(
            describe_workload_change(Some(&same), 2, Some("h1"), "orders-worker"),
            None
        );
        let scaled = describe_workload_change(Some(&same), 5, Some("h1"), "orders-worker");
        assert_eq!(
            scaled.as_deref(),
            Some("scaled Deployment orders-worker from 2 to 5 worker(s)")
        );
        let rolled = describe_workload_change(Some(&same), 2, Some("h2"), "orders-worker");
        assert!(rolled.is_some_and(|text| text.contains("rolling out")));
    }

    #[test]
    fn workers_are_ready_when_the_current_generation_has_every_replica_ready() {
        let plan = ready_plan("h");
        let ready = workers_condition(Some(&deployment(2, "h", 2, 2)), Some(&plan));
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (ConditionStatus::True, "Ready")
        );
        assert_eq!(ready.message, "2/2 workers ready");
        let stale = workers_condition(Some(&deployment(2, "h", 2, 1)), Some(&plan));
        assert_eq!(
            (stale.status, stale.reason.as_str()),
            (ConditionStatus::False, "Progressing")
        );
        let partial = workers_condition(Some(&deployment(3, "h", 1, 2)), Some(&plan));
        assert_eq!(partial.status, ConditionStatus::False);
        let missing = workers_condition(None, None);
        assert_eq!(missing.reason, "WaitingForDataPlane");
    }

    #[test]
    fn during_an_outage_the_condition_says_what_waits() {
        let running = deployment(3, "old", 1, 2);
        let waiting = plan_workload(false, Some(&running), "new");
        let condition = workers_condition(Some(&running), waiting.as_ref());
        assert_eq!(
            (condition.status, condition.reason.as_str()),
            (ConditionStatus::False, "Progressing")
        );
        assert!(
            condition.message.starts_with("1/3 workers ready")
                && condition.message.contains("the changed manifest waits"),
            "{}",
            condition.message
        );
        let unchanged = plan_workload(false, Some(&running), "old");
        let zero = workers_condition(Some(&deployment(0, "old", 0, 2)), unchanged.as_ref());
        assert_eq!(
            (zero.status, zero.reason.as_str()),
            (ConditionStatus::True, "ScaledToZero")
        );
        assert!(
            zero.message.contains("data plane not ready")
                && !zero.message.contains("manifest waits"),
            "{}",
            zero.message
        );
    }
}
