//! The deletion path of a reconcile: under the finalizer, removes the pipeline's data plane when
//! its `deletionPolicy` is `Delete` (never what a conflicting pipeline only names), and gives up
//! after the cleanup timeout so an unreachable server cannot hold the resource forever.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use signal_model::{DeletionPolicy, SignalPipeline};

use super::Context;
use super::conflicts::find_conflict;
use super::events::publish;
use super::reconcile::ReconcileError;
use super::secrets::load_credentials;
use crate::dataplane::delete_data_plane;

/// Removes the data plane when the deletion policy says so; then the finalizer is released.
pub(super) async fn cleanup(
    pipeline: &SignalPipeline,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let name = pipeline.name_any();
    let namespace = pipeline
        .namespace()
        .ok_or(ReconcileError::MissingMetadata("metadata.namespace"))?;
    ctx.metrics
        .set_pipeline_ready(&format!("{namespace}/{name}"), None);
    // The pipeline goes: its shared clients close unless other pipelines use them.
    ctx.connections.release(&format!("{namespace}/{name}"));
    ctx.forget_applied(&namespace, &name);
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
    let rivals = ctx.pipelines.rivals(pipeline);
    if let Some(conflict) = find_conflict(pipeline, rivals.iter().map(Arc::as_ref)) {
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

    let outcome = match load_credentials(&ctx.client, ctx.caches.secrets(), &namespace, spec).await
    {
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
