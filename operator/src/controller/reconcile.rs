//! One reconcile of one `SignalPipeline`: the entry point, its error type and the apply path.
//!
//! Under the `signals.dev/cleanup` finalizer, an apply runs: validate the spec → check for
//! conflicts with older pipelines → read the Secrets → reconcile the data plane (stream, consumer,
//! table) → server-side apply the ConfigMap and Deployment ([`super::workers`]; while the data
//! plane is not ready, only a Deployment that already runs, with its manifest kept) → server-side
//! apply the status, unless it is what the pipeline already says. A deletion runs
//! [`super::cleanup`] instead. Every failure is written into
//! the conditions before it is returned, and the controller retries it with backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, Event as FinalizerEvent, finalizer};
use kube::{Api, ResourceExt};
use signal_model::SignalPipeline;
use tracing::{info, warn};

use super::Context;
use super::autoscale::{AutoscaleInput, decide};
use super::cleanup::cleanup;
use super::conditions::{
    CONSUMER_READY, ConditionState, ConditionStatus, SCHEMA_DRIFT, STREAM_READY, TABLE_READY,
    WORKERS_HEALTHY, all_blocked,
};
use super::conflicts::find_conflict;
use super::dead_letter_health::{
    add_dead_letter_and_health_conditions, publish_dead_letter_and_health_events,
};
use super::events::publish;
use super::secrets::{SecretError, load_credentials};
use super::status::{StatusFigures, apply_status, build_status, is_ready};
use super::workers::reconcile_workload;
use crate::dataplane::table::TableCheck;
use crate::dataplane::{DataPlaneReport, PartReport, reconcile_data_plane_with};
use crate::workload::WorkloadError;

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

pub(super) fn kube_error(action: impl Into<String>) -> impl FnOnce(kube::Error) -> ReconcileError {
    let action = action.into();
    move |source| ReconcileError::Kube { action, source }
}

fn secret_reason(error: &SecretError) -> &'static str {
    match error {
        SecretError::Missing { .. } => "SecretMissing",
        SecretError::MissingConfigMap { .. } => "ConfigMapMissing",
        SecretError::Api { .. } | SecretError::ConfigMapApi { .. } => "SecretUnreadable",
        SecretError::NotText { .. } | SecretError::Credentials(_) => "InvalidCredentials",
        SecretError::Tls(_) => "InvalidTlsMaterial",
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

    let step = Instant::now();
    let rivals = ctx.pipelines.rivals(pipeline);
    let conflict = find_conflict(pipeline, rivals.iter().map(Arc::as_ref));
    ctx.metrics.observe_step("conflicts", step.elapsed());
    if let Some(conflict) = conflict {
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

    let step = Instant::now();
    let loaded = load_credentials(
        &ctx.client,
        ctx.caches.secrets(),
        &namespace,
        &pipeline.spec,
    )
    .await;
    ctx.metrics.observe_step("secrets", step.elapsed());
    let credentials = match loaded {
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

    // Once per spec version: the settings stay as they are until someone edits the spec.
    let new_spec = pipeline.status.as_ref().and_then(|s| s.observed_generation)
        != pipeline.metadata.generation;
    if new_spec {
        for warning in signal_model::validate::spec_warnings(&pipeline.spec) {
            warn!(pipeline = %key, reason = warning.reason, "{}", warning.message);
            publish(
                &ctx.recorder,
                pipeline,
                EventType::Warning,
                warning.reason,
                "Reconcile",
                warning.message,
            )
            .await;
        }
    }
    let report = match ctx.recent_data_plane(pipeline, &credentials) {
        Some(report) => report,
        None => {
            let report = reconcile_data_plane_with(
                &ctx.connections,
                &key,
                &name,
                &pipeline.spec,
                &credentials,
                table_check(pipeline),
            )
            .await;
            ctx.remember_data_plane(pipeline, &credentials, &report);
            report
        }
    };
    publish_data_plane_events(pipeline, ctx, &report).await;
    publish_dead_letter_and_health_events(pipeline, ctx, &report).await;

    let step = Instant::now();
    let deployment_name = crate::workload::deployment_name(&name);
    let existing = match ctx.caches.deployment(&namespace, &deployment_name).await {
        Some(cached) => cached,
        None => Api::<Deployment>::namespaced(ctx.client.clone(), &namespace)
            .get_opt(&deployment_name)
            .await
            .map_err(kube_error(format!("reading Deployment {deployment_name}")))?,
    };

    let autoscale = pipeline.spec.workers.autoscale.as_ref().map(|spec| {
        decide(&AutoscaleInput {
            spec,
            lag: report.consumer_status.as_ref().map(|c| c.num_pending),
            data_plane_ready: report.all_ready(),
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

    // Workers start once the stream, consumer and table they need are in place; after that,
    // replicas and the pod template follow the spec even while a server is down, and only a
    // changed manifest waits for the data plane (see `workers`).
    let workload =
        reconcile_workload(pipeline, ctx, existing, replicas, report.all_ready()).await?;
    let deployment = workload.deployment;
    ctx.metrics.observe_step("workload", step.elapsed());

    let mut conditions = vec![
        part_condition(STREAM_READY, &report.stream),
        part_condition(CONSUMER_READY, &report.consumer),
        part_condition(TABLE_READY, &report.table),
        workload.condition,
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
        partitions: report.partitions.clone(),
        ..StatusFigures::default()
    }
    .with_deployment(deployment.as_ref());
    let status = build_status(pipeline, &conditions, figures);
    let step = Instant::now();
    write_status(pipeline, ctx, api, &status).await?;
    ctx.metrics.observe_step("status", step.elapsed());
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
    if let Some(recheck) = ctx.lagging_recheck(pipeline) {
        next = next.min(recheck);
    }
    Ok(Action::requeue(next))
}

/// A recent full check of the table is taken on trust only while the last status found the
/// table ready and the workers reporting no problem: a table dropped by hand or a ClickHouse the
/// workers cannot reach shows in their reports first, and then the table is checked in full.
fn table_check(pipeline: &SignalPipeline) -> TableCheck {
    let conditions = pipeline.status.as_ref().map(|s| s.conditions.as_slice());
    let is_true = |type_: &str| {
        conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True")
    };
    if is_true(TABLE_READY) && is_true(WORKERS_HEALTHY) {
        TableCheck::TrustRecent
    } else {
        TableCheck::Full
    }
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
    write_status(pipeline, ctx, api, &new_status).await?;
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

/// Applies `status` unless the pipeline (as last watched) already has it: a resync that found
/// nothing new writes nothing.
async fn write_status(
    pipeline: &SignalPipeline,
    ctx: &Context,
    api: &Api<SignalPipeline>,
    status: &signal_model::SignalPipelineStatus,
) -> Result<(), ReconcileError> {
    let unchanged = pipeline.status.as_ref() == Some(status);
    ctx.metrics.write("status", !unchanged);
    if unchanged {
        return Ok(());
    }
    apply_status(api, &pipeline.name_any(), status)
        .await
        .map_err(kube_error("writing the status"))
}

/// One Normal event for what the data plane's reconcile changed, and a Warning for each part that
/// is not ready. A new pipeline creates a stream, a consumer, a table and a dead-letter stream at
/// once: one event says so (`DataPlaneCreated`) rather than four, each an API request, which a
/// fleet being created would multiply.
async fn publish_data_plane_events(
    pipeline: &SignalPipeline,
    ctx: &Context,
    report: &DataPlaneReport,
) {
    if let Some((reason, note)) = data_plane_change_event(report) {
        publish(
            &ctx.recorder,
            pipeline,
            EventType::Normal,
            &reason,
            "Reconcile",
            note,
        )
        .await;
    }
    for (what, part) in [
        ("stream", &report.stream),
        ("consumer", &report.consumer),
        ("table", &report.table),
    ] {
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

/// The reason and note of the Normal event for a report's changes, if it has any: a part's own
/// (`StreamCreated`, `TableUpdated`, …) when one part changed, else `DataPlane` and the parts'
/// common reason (`DataPlaneCreated`), or `DataPlaneChanged` when their reasons differ.
fn data_plane_change_event(report: &DataPlaneReport) -> Option<(String, String)> {
    let dead_letter_changes: Vec<String> = report
        .dead_letter
        .changes
        .iter()
        .chain(&report.health_stream_changes)
        .cloned()
        .collect();
    let changed: Vec<(&str, &str, &[String])> = [
        (
            "Stream",
            report.stream.reason.as_str(),
            report.stream.changes.as_slice(),
        ),
        (
            "Consumer",
            &report.consumer.reason,
            &report.consumer.changes,
        ),
        ("Table", &report.table.reason, &report.table.changes),
        (
            "DeadLetterStream",
            &report.dead_letter.reason,
            dead_letter_changes.as_slice(),
        ),
    ]
    .into_iter()
    .filter(|(_, _, changes)| !changes.is_empty())
    .collect();
    let (first_prefix, first_reason, _) = changed.first()?;
    let note = changed
        .iter()
        .flat_map(|(_, _, changes)| changes.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join("; ");
    let reason = if changed.len() == 1 {
        format!("{first_prefix}{first_reason}")
    } else if changed.iter().all(|(_, reason, _)| reason == first_reason) {
        format!("DataPlane{first_reason}")
    } else {
        "DataPlaneChanged".to_string()
    };
    Some((reason, note))
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

fn first_failing_part(report: &DataPlaneReport) -> Option<(&'static str, &PartReport)> {
    [
        ("stream", &report.stream),
        ("consumer", &report.consumer),
        ("table", &report.table),
    ]
    .into_iter()
    .find(|(_, part)| !part.ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_data_plane_is_one_event_and_a_single_change_keeps_its_parts_reason() {
        let created =
            |what: &str| PartReport::ready("Created", "ok", vec![format!("created {what}")]);
        let mut report = DataPlaneReport {
            stream: created("stream S"),
            consumer: created("consumer C"),
            table: created("table db.t"),
            dead_letter: created("stream S_DLQ"),
            health_stream_changes: vec!["created stream SIGNAL_HEALTH".into()],
            ..DataPlaneReport::default()
        };
        assert_eq!(
            data_plane_change_event(&report),
            Some((
                "DataPlaneCreated".to_string(),
                "created stream S; created consumer C; created table db.t; created stream S_DLQ; \
                 created stream SIGNAL_HEALTH"
                    .to_string()
            ))
        );
        report.table = PartReport::ready("Updated", "ok", vec!["added column x".into()]);
        assert_eq!(
            data_plane_change_event(&report).unwrap().0,
            "DataPlaneChanged"
        );
        for part in [
            &mut report.stream,
            &mut report.consumer,
            &mut report.dead_letter,
        ] {
            part.changes.clear();
        }
        report.health_stream_changes.clear();
        assert_eq!(
            data_plane_change_event(&report),
            Some(("TableUpdated".to_string(), "added column x".to_string()))
        );
        report.table.changes.clear();
        assert_eq!(data_plane_change_event(&report), None);
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
