//! Writing `SignalPipeline.status`: built purely from what reconcile observed, then server-side
//! applied to the status subresource.
//!
//! The operator owns the whole status under its field manager, so a field it stops setting (the
//! autoscale block after autoscaling is switched off) disappears instead of going stale.

use chrono::{SecondsFormat, Utc};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use signal_model::{
    AutoscaleStatus, ConsumerStatus, SignalPipeline, SignalPipelineStatus, StreamStatus,
};

use super::conditions::{ConditionState, summarise_ready, with_transition_times, READY};
use crate::workload::{FIELD_MANAGER, selector_string};

/// The figures a status reports besides its conditions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusFigures {
    pub replicas: i32,
    pub ready_replicas: i32,
    pub stream: Option<StreamStatus>,
    pub consumer: Option<ConsumerStatus>,
    pub autoscale: Option<AutoscaleStatus>,
}

impl StatusFigures {
    /// The figures of the last status, for reconciles that could not look again (a conflict, a
    /// missing Secret): stale figures are better than zeros that suggest the workers are gone.
    pub fn from_previous(status: Option<&SignalPipelineStatus>) -> Self {
        status
            .map(|s| Self {
                replicas: s.replicas,
                ready_replicas: s.ready_replicas,
                stream: s.stream.clone(),
                consumer: s.consumer.clone(),
                autoscale: s.autoscale.clone(),
            })
            .unwrap_or_default()
    }

    /// Replica counts as the Deployment reports them.
    pub fn with_deployment(mut self, deployment: Option<&Deployment>) -> Self {
        let status = deployment.and_then(|d| d.status.as_ref());
        self.replicas = status.and_then(|s| s.replicas).unwrap_or(0);
        self.ready_replicas = status.and_then(|s| s.ready_replicas).unwrap_or(0);
        self
    }
}

/// The status to write. `conditions` are the component conditions (and `SchemaDrift` if any);
/// `Ready` is added in front of them, summing them up, unless they already contain one.
pub fn build_status(
    pipeline: &SignalPipeline,
    conditions: &[ConditionState],
    figures: StatusFigures,
) -> SignalPipelineStatus {
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
    let mut desired = Vec::with_capacity(conditions.len() + 1);
    if !conditions.iter().any(|c| c.type_ == READY) {
        desired.push(summarise_ready(conditions));
    }
    desired.extend_from_slice(conditions);
    let previous = pipeline
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let spec = &pipeline.spec;
    SignalPipelineStatus {
        observed_generation: pipeline.meta().generation,
        conditions: with_transition_times(previous, &desired, pipeline.meta().generation, &now),
        replicas: figures.replicas,
        ready_replicas: figures.ready_replicas,
        selector: Some(selector_string(&pipeline.name_any())),
        table: Some(format!(
            "{}.{}",
            spec.clickhouse.database, spec.clickhouse.table
        )),
        stream: figures.stream,
        consumer: figures.consumer,
        autoscale: figures.autoscale,
    }
}

/// Server-side applies `status` to the pipeline's status subresource.
pub async fn apply_status(
    api: &Api<SignalPipeline>,
    name: &str,
    status: &SignalPipelineStatus,
) -> Result<(), kube::Error> {
    let body = json!({
        "apiVersion": SignalPipeline::api_version(&()),
        "kind": SignalPipeline::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Whether a status says the pipeline is ready (for metrics).
pub fn is_ready(status: &SignalPipelineStatus) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == READY && c.status == "True")
}
