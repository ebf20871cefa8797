//! One reconcile of one `SignalPipeline`.
//!
//! Under the `signals.dev/cleanup` finalizer, an apply runs: validate the spec → check for
//! conflicts with older pipelines → read the Secrets → reconcile the data plane (stream, consumer,
//! table) → server-side apply the ConfigMap and Deployment → server-side apply the status. A
//! deletion removes the data plane when `deletionPolicy: Delete`, giving up after a bounded time so
//! an unreachable server cannot hold the resource forever. Every failure is written into the
//! conditions before it is returned, and the controller retries it with backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, Event as FinalizerEvent, finalizer};
use kube::{Api, ResourceExt};
use signal_model::{DeletionPolicy, SignalPipeline};
use tracing::{info, warn};

use super::Context;
use super::autoscale::{AutoscaleInput, decide};
use super::conditions::{
    CONSUMER_READY, ConditionState, ConditionStatus, SCHEMA_DRIFT, STREAM_READY, TABLE_READY,
    WORKERS_READY, all_blocked,
};
use super::conflicts::find_conflict;
use super::dead_letter_health::{
    add_dead_letter_and_health_conditions, publish_dead_letter_and_health_events,
};
use super::events::publish;
use super::secrets::{SecretError, load_credentials};
use super::status::{StatusFigures, apply_status, build_status, is_ready};
use crate::dataplane::{DataPlaneReport, PartReport, delete_data_plane, reconcile_data_plane};
use crate::workload::{
    CONFIG_HASH_ANNOTATION, FIELD_MANAGER, WorkerDeploymentInputs, WorkloadError, build_configmap,
    build_deployment, config_hash,
};

/// The finalizer that holds a pipeline until its data plane is cleaned up.
pub const FINALIZER: &str = "signals.dev/cleanup";
/// How often a conflicting pipeline looks again whether the other one is gone.
const CONFLICT_RECHECK: Duration = Duration::from_secs(60);
/// Longest wait between retries of a failing cleanup, so the give-up deadline is met closely.
const CLEANUP_RETRY_CAP: Duration = Duration::from_secs(30);

/// Why a reconcile failed. Each variant says what failed; the controller retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("the SignalPipeline has no {0}")]
    MissingMetadata(&'static str),
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("{what} is not ready ({reason}): {message}")]
    DataPlaneNotReady {
        what: &'static str,
        reason: String,
        message: String,
    },
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("cleaning up the data plane failed (retrying for another {}s): {message}", retry_window.as_secs())]
    Cleanup {
        message: String,
        retry_window: Duration,
    },
}

impl ReconcileError {
    /// The `reason` label of the failure metric: one CamelCase word.
    pub fn metric_reason(&self) -> &str {
        match self {
            ReconcileError::MissingMetadata(_) => "MissingMetadata",
            ReconcileError::InvalidSpec(_) => "InvalidSpec",
            ReconcileError::Secret(error) => secret_reason(error),
            ReconcileError::DataPlaneNotReady { reason, .. } => reason,
            ReconcileError::Workload(_) => "WorkloadBuildFailed",
            ReconcileError::Kube { .. } => "KubernetesApiError",
            ReconcileError::Cleanup { .. } => "CleanupFailed",
        }
    }

    /// An upper bound on the next retry, when the failure has a deadline.
    pub fn retry_cap(&self) -> Option<Duration> {
        match self {
            ReconcileError::Cleanup { retry_window, .. } => {
                Some((*retry_window).clamp(Duration::from_secs(1), CLEANUP_RETRY_CAP))
            }
            _ => None,
        }
    }
}

fn kube_error(action: impl Into<String>) -> impl FnOnce(kube::Error) -> ReconcileError {
    let action = action.into();
    move |source| ReconcileError::Kube { action, source }
}

fn secret_reason(error: &SecretError) -> &'static str {
    match error {
        SecretError::Missing { .. } => "SecretMissing",
        SecretError::Api { .. } => "SecretUnreadable",
        SecretError::NotText { .. } | SecretError::Credentials(_) => "InvalidCredentials",
    }
}

/// Reconciles one pipeline: the entry point the controller calls.
pub async fn reconcile(
    pipeline: Arc<SignalPipeline>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = Instant::now();
    ctx.metrics.reconcile_started();
    let namespace = pipeline
        .namespace()
        .ok_or(ReconcileError::MissingMetadata("metadata.namespace"))?;
    let api: Api<SignalPipeline> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, pipeline.clone(), |event| async {
        match event {
            FinalizerEvent::Apply(pipeline) => apply(&pipeline, &ctx, &api).await,
            FinalizerEvent::Cleanup(pipeline) => cleanup(&pipeline, &ctx).await,
        }
    })
    .await
    .map_err(flatten_finalizer_error);
    ctx.metrics.reconcile_finished(started.elapsed());
    if result.is_ok() {
        ctx.reset_backoff(&pipeline);
    }
    result
}

fn flatten_finalizer_error(error: finalizer::Error<ReconcileError>) -> ReconcileError {
    match error {
        finalizer::Error::ApplyFailed(error) | finalizer::Error::CleanupFailed(error) => error,
        finalizer::Error::AddFinalizer(source) => kube_error("adding the finalizer")(source),
        finalizer::Error::RemoveFinalizer(source) => kube_error("removing the finalizer")(source),
        finalizer::Error::UnnamedObject => ReconcileError::MissingMetadata("metadata.name"),
        finalizer::Error::InvalidFinalizer => ReconcileError::MissingMetadata("a valid finalizer"),
    }
}

/// Brings the data plane and the workers in line with the spec, then writes the status.
async fn apply(
    pipeline: &SignalPipeline,
    ctx: &Context,
    api: &Api<SignalPipeline>,
) -> Result<Action, ReconcileError> {
    let name = pipeline.name_any();
    let namespace = pipeline
        .namespace()
        .ok_or(ReconcileError::MissingMetadata("metadata.namespace"))?;
    let key = format!("{namespace}/{name}");

    if let Err(error) = pipeline.spec.validate(&name) {
        let message = error.to_string();
        block(
            pipeline,
            ctx,
            api,
            ConditionStatus::False,
            "InvalidSpec",
            &message,
        )
        .await?;
        return Err(ReconcileError::InvalidSpec(message));
    }

    let pipelines = ctx.pipelines.all();
    if let Some(conflict) = find_conflict(pipeline, pipelines.iter().map(Arc::as_ref)) {
        let message = conflict.message();
        info!(pipeline = %key, holder = %conflict.holder, "conflict: not reconciling");
        block(
            pipeline,
            ctx,
            api,
            ConditionStatus::False,
            "Conflict",
            &message,
        )
        .await?;
        return Ok(Action::requeue(CONFLICT_RECHECK));
    }

    let credentials = match load_credentials(&ctx.client, &namespace, &pipeline.spec).await {
        Ok(credentials) => credentials,
        Err(error) => {
            let message = error.to_string();
            block(
                pipeline,
                ctx,
                api,
                ConditionStatus::False,
                secret_reason(&error),
                &message,
            )
            .await?;
            return Err(error.into());
        }
    };

    let report = reconcile_data_plane(&name, &pipeline.spec, &credentials).await;
    publish_data_plane_events(pipeline, ctx, &report).await;
    publish_dead_letter_and_health_events(pipeline, ctx, &report).await;

    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let deployment_name = crate::workload::deployment_name(&name);
    let existing = deployments
        .get_opt(&deployment_name)
        .await
        .map_err(kube_error(format!("reading Deployment {deployment_name}")))?;

    let autoscale = pipeline.spec.workers.autoscale.as_ref().map(|spec| {
        decide(&AutoscaleInput {
            spec,
            lag: report.consumer_status.as_ref().map(|c| c.num_pending),
            previous: pipeline.status.as_ref().and_then(|s| s.autoscale.as_ref()),
            current_replicas: existing
                .as_ref()
                .and_then(|d| d.spec.as_ref())
                .and_then(|s| s.replicas)
                .unwrap_or(pipeline.spec.workers.replicas),
            now: chrono::Utc::now(),
        })
    });
    let replicas = autoscale
        .as_ref()
        .map(|decision| decision.status.desired_replicas)
        .unwrap_or(pipeline.spec.workers.replicas);

    // Workers only start, or follow a spec change, once the stream, consumer and table they need
    // are in place; while a server is unreachable, running workers are left alone to retry.
    let deployment = if report.all_ready() {
        Some(apply_workload(pipeline, ctx, existing.as_ref(), replicas).await?)
    } else {
        existing
    };

    let mut conditions = vec![
        part_condition(STREAM_READY, &report.stream),
        part_condition(CONSUMER_READY, &report.consumer),
        part_condition(TABLE_READY, &report.table),
        workers_condition(deployment.as_ref(), report.all_ready()),
    ];
    add_dead_letter_and_health_conditions(&mut conditions, &report);
    if let Some(drift) = &report.schema_drift {
        conditions.push(ConditionState::new(
            SCHEMA_DRIFT,
            ConditionStatus::True,
            "SchemaDrift",
            drift.clone(),
        ));
    }
    let figures = StatusFigures {
        stream: report.stream_status.clone(),
        consumer: report.consumer_status.clone(),
        autoscale: autoscale.as_ref().map(|d| d.status.clone()),
        dead_letter: report.dead_letter_status.clone(),
        ..StatusFigures::default()
    }
    .with_deployment(deployment.as_ref());
    let status = build_status(pipeline, &conditions, figures);
    apply_status(api, &name, &status)
        .await
        .map_err(kube_error("writing the status"))?;
    ctx.metrics
        .set_pipeline_ready(&key, Some(is_ready(&status)));

    if let Some((what, part)) = first_failing_part(&report) {
        return Err(ReconcileError::DataPlaneNotReady {
            what,
            reason: part.reason.clone(),
            message: part.message.clone(),
        });
    }
    let mut next = if autoscale.is_some() {
        ctx.settings.autoscale_interval
    } else {
        ctx.settings.resync_interval
    };
    if let Some(recheck) = autoscale.and_then(|d| d.recheck_after) {
        next = next.min(recheck.max(Duration::from_secs(1)));
    }
    Ok(Action::requeue(next))
}

/// Writes a status where every condition carries the same failure, keeping the last figures, and
/// publishes it as a Warning event.
async fn block(
    pipeline: &SignalPipeline,
    ctx: &Context,
    api: &Api<SignalPipeline>,
    status: ConditionStatus,
    reason: &str,
    message: &str,
) -> Result<(), ReconcileError> {
    let name = pipeline.name_any();
    warn!(pipeline = %name, reason, message, "pipeline blocked");
    let figures = StatusFigures::from_previous(pipeline.status.as_ref());
    let new_status = build_status(pipeline, &all_blocked(status, reason, message), figures);
    apply_status(api, &name, &new_status)
        .await
        .map_err(kube_error("writing the status"))?;
    ctx.metrics.set_pipeline_ready(
        &format!("{}/{name}", pipeline.namespace().unwrap_or_default()),
        Some(false),
    );
    publish(
        &ctx.recorder,
        pipeline,
        EventType::Warning,
        reason,
        "Reconcile",
        message,
    )
    .await;
    Ok(())
}

/// Server-side applies the ConfigMap and the Deployment; returns the Deployment as stored.
async fn apply_workload(
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

/// One event per part that changed something, and one per part that is not ready.
async fn publish_data_plane_events(
    pipeline: &SignalPipeline,
    ctx: &Context,
    report: &DataPlaneReport,
) {
    for (what, reason_prefix, part) in [
        ("stream", "Stream", &report.stream),
        ("consumer", "Consumer", &report.consumer),
        ("table", "Table", &report.table),
    ] {
        if !part.changes.is_empty() {
            publish(
                &ctx.recorder,
                pipeline,
                EventType::Normal,
                &format!("{reason_prefix}{}", part.reason),
                "Reconcile",
                part.changes.join("; "),
            )
            .await;
        }
        if !part.ready {
            publish(
                &ctx.recorder,
                pipeline,
                EventType::Warning,
                &part.reason,
                "Reconcile",
                format!("{what}: {}", part.message),
            )
            .await;
        }
    }
}

fn part_condition(type_: &'static str, part: &PartReport) -> ConditionState {
    ConditionState::new(
        type_,
        ConditionStatus::from_bool(part.ready),
        non_empty(&part.reason, if part.ready { "Ready" } else { "NotReady" }),
        part.message.clone(),
    )
}

fn non_empty(text: &str, fallback: &str) -> String {
    if text.is_empty() {
        fallback.to_string()
    } else {
        text.to_string()
    }
}

fn workers_condition(deployment: Option<&Deployment>, data_plane_ready: bool) -> ConditionState {
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

fn first_failing_part(report: &DataPlaneReport) -> Option<(&'static str, &PartReport)> {
    [
        ("stream", &report.stream),
        ("consumer", &report.consumer),
        ("table", &report.table),
    ]
    .into_iter()
    .find(|(_, part)| !part.ready)
}

/// Removes the data plane when the deletion policy says so; then the finalizer is released.
async fn cleanup(pipeline: &SignalPipeline, ctx: &Context) -> Result<Action, ReconcileError> {
    let name = pipeline.name_any();
    let namespace = pipeline
        .namespace()
        .ok_or(ReconcileError::MissingMetadata("metadata.namespace"))?;
    ctx.metrics
        .set_pipeline_ready(&format!("{namespace}/{name}"), None);
    let spec = &pipeline.spec;
    let parts = format!(
        "stream {}, consumer {} and table {}.{}",
        spec.stream.name,
        spec.durable_name(&name),
        spec.clickhouse.database,
        spec.clickhouse.table
    );
    if spec.deletion_policy == DeletionPolicy::Retain {
        publish(
            &ctx.recorder,
            pipeline,
            EventType::Normal,
            "Retained",
            "Cleanup",
            format!("deletionPolicy Retain: kept {parts}"),
        )
        .await;
        return Ok(Action::await_change());
    }
    // A pipeline that lost a conflict never owned what it names: deleting it must not take the
    // older pipeline's stream or table with it.
    let pipelines = ctx.pipelines.all();
    if let Some(conflict) = find_conflict(pipeline, pipelines.iter().map(Arc::as_ref)) {
        publish(
            &ctx.recorder,
            pipeline,
            EventType::Normal,
            "Retained",
            "Cleanup",
            format!("not deleting anything: {}", conflict.message()),
        )
        .await;
        return Ok(Action::await_change());
    }

    let outcome = match load_credentials(&ctx.client, &namespace, spec).await {
        Ok(credentials) => delete_data_plane(&name, spec, &credentials)
            .await
            .map_err(|error| error.to_string()),
        Err(error) => Err(error.to_string()),
    };
    match outcome {
        Ok(()) => {
            publish(
                &ctx.recorder,
                pipeline,
                EventType::Normal,
                "Deleted",
                "Cleanup",
                format!("deletionPolicy Delete: removed {parts}"),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(message) => {
            let waited = deleting_for(pipeline);
            if waited >= ctx.settings.cleanup_timeout {
                publish(
                    &ctx.recorder,
                    pipeline,
                    EventType::Warning,
                    "CleanupAbandoned",
                    "Cleanup",
                    format!(
                        "gave up removing {parts} after {}s; remove them by hand: {message}",
                        waited.as_secs()
                    ),
                )
                .await;
                Ok(Action::await_change())
            } else {
                publish(
                    &ctx.recorder,
                    pipeline,
                    EventType::Warning,
                    "CleanupFailed",
                    "Cleanup",
                    message.clone(),
                )
                .await;
                Err(ReconcileError::Cleanup {
                    message,
                    retry_window: ctx.settings.cleanup_timeout - waited,
                })
            }
        }
    }
}

/// How long ago the pipeline was marked for deletion.
fn deleting_for(pipeline: &SignalPipeline) -> Duration {
    pipeline
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|time| k8s_openapi::jiff::Timestamp::now().duration_since(time.0))
        .and_then(|elapsed| Duration::try_from(elapsed).ok())
        .unwrap_or_default()
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

    #[test]
    fn a_failing_cleanup_retries_within_its_remaining_window() {
        let cleanup = |seconds| ReconcileError::Cleanup {
            message: "down".to_string(),
            retry_window: Duration::from_secs(seconds),
        };
        assert_eq!(cleanup(200).retry_cap(), Some(CLEANUP_RETRY_CAP));
        assert_eq!(cleanup(7).retry_cap(), Some(Duration::from_secs(7)));
        assert_eq!(cleanup(0).retry_cap(), Some(Duration::from_secs(1)));
        assert_eq!(
            ReconcileError::InvalidSpec("x".to_string()).retry_cap(),
            None
        );
        assert_eq!(cleanup(7).metric_reason(), "CleanupFailed");
    }
}
