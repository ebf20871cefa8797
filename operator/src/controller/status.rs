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
    AutoscaleStatus, ConsumerStatus, DeadLetterStatus, SignalPipeline, SignalPipelineStatus,
    StreamStatus,
};

use super::conditions::{ConditionState, READY, summarise_ready, with_transition_times};
use crate::workload::{FIELD_MANAGER, selector_string};

/// The figures a status reports besides its conditions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusFigures {
    pub replicas: i32,
    pub ready_replicas: i32,
    pub stream: Option<StreamStatus>,
    pub consumer: Option<ConsumerStatus>,
    pub autoscale: Option<AutoscaleStatus>,
    pub dead_letter: Option<DeadLetterStatus>,
    pub partitions: Vec<signal_model::PartitionStatus>,
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
                dead_letter: s.dead_letter.clone(),
                partitions: s.partitions.clone(),
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
        dead_letter: figures.dead_letter,
        partitions: figures.partitions,
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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use signal_model::Condition;

    use super::*;
    use crate::controller::conditions::{
        COMPONENT_TYPES, ConditionStatus, STREAM_READY, TABLE_READY, all_blocked,
    };
    use crate::workload::fixtures::stored_pipeline;

    fn all_ready() -> Vec<ConditionState> {
        COMPONENT_TYPES
            .iter()
            .map(|type_| ConditionState::new(type_, ConditionStatus::True, "Ready", "ok"))
            .collect()
    }

    #[test]
    fn the_status_leads_with_ready_and_describes_the_pipeline() {
        let pipeline = stored_pipeline("orders");
        let figures = StatusFigures {
            replicas: 2,
            ready_replicas: 1,
            stream: Some(StreamStatus {
                messages: 10,
                bytes: 100,
                last_sequence: 10,
                ..Default::default()
            }),
            ..StatusFigures::default()
        };
        let status = build_status(&pipeline, &all_ready(), figures);
        let types: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(
            types,
            [
                READY,
                "StreamReady",
                "ConsumerReady",
                "TableReady",
                "WorkersReady"
            ]
        );
        assert!(is_ready(&status));
        assert_eq!(status.observed_generation, Some(3));
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
        assert_eq!((status.replicas, status.ready_replicas), (2, 1));
        assert_eq!(status.table.as_deref(), Some("risk.events"));
        assert_eq!(status.selector, Some(selector_string("orders")));
        assert_eq!(status.stream.map(|s| s.messages), Some(10));
    }

    #[test]
    fn one_failing_part_makes_the_pipeline_not_ready() {
        let mut conditions = all_ready();
        conditions[2] = ConditionState::new(
            TABLE_READY,
            ConditionStatus::False,
            "Unreachable",
            "no ClickHouse",
        );
        let status = build_status(
            &stored_pipeline("orders"),
            &conditions,
            StatusFigures::default(),
        );
        assert!(!is_ready(&status));
        let ready = &status.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Unreachable")
        );
    }

    #[test]
    fn a_blocked_status_keeps_its_ready_condition_and_is_not_summed_up_again() {
        let status = build_status(
            &stored_pipeline("orders"),
            &all_blocked(ConditionStatus::False, "Conflict", "taken"),
            StatusFigures::default(),
        );
        assert_eq!(status.conditions.len(), 1 + COMPONENT_TYPES.len());
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.reason == "Conflict" && c.status == "False")
        );
    }

    #[test]
    fn an_unchanged_condition_keeps_its_transition_time() {
        let mut pipeline = stored_pipeline("orders");
        pipeline.status = Some(SignalPipelineStatus {
            conditions: vec![Condition {
                type_: STREAM_READY.to_string(),
                status: "True".to_string(),
                reason: "Ready".to_string(),
                message: "ok".to_string(),
                last_transition_time: Some("2024-01-01T00:00:00Z".to_string()),
                observed_generation: Some(2),
            }],
            ..SignalPipelineStatus::default()
        });
        let status = build_status(&pipeline, &all_ready(), StatusFigures::default());
        let stream = status
            .conditions
            .iter()
            .find(|c| c.type_ == STREAM_READY)
            .expect("stream");
        assert_eq!(
            stream.last_transition_time.as_deref(),
            Some("2024-01-01T00:00:00Z")
        );
        let ready = &status.conditions[0];
        assert_ne!(
            ready.last_transition_time.as_deref(),
            Some("2024-01-01T00:00:00Z")
        );
    }

    #[test]
    fn figures_come_from_the_previous_status_or_the_deployment() {
        let previous = SignalPipelineStatus {
            replicas: 3,
            ready_replicas: 2,
            consumer: Some(ConsumerStatus {
                num_pending: 7,
                num_ack_pending: 1,
                num_redelivered: 0,
            }),
            ..SignalPipelineStatus::default()
        };
        let kept = StatusFigures::from_previous(Some(&previous));
        assert_eq!((kept.replicas, kept.ready_replicas), (3, 2));
        assert_eq!(kept.consumer.map(|c| c.num_pending), Some(7));
        assert_eq!(StatusFigures::from_previous(None), StatusFigures::default());

        let deployment = Deployment {
            status: Some(DeploymentStatus {
                replicas: Some(4),
                ready_replicas: Some(1),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        };
        let observed = StatusFigures::default().with_deployment(Some(&deployment));
        assert_eq!((observed.replicas, observed.ready_replicas), (4, 1));
        let none = StatusFigures::default().with_deployment(None);
        assert_eq!((none.replicas, none.ready_replicas), (0, 0));
    }
}
