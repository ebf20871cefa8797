//! The status conditions and events for the dead-letter stream and the workers' health reports,
//! kept apart from the reconcile flow that calls them.
//!
//! `DeadLetterReady` says whether a stream captures the dead-letter subject; `WorkersHealthy`
//! carries a stuck worker's own reason (`InsertRejected`, `SchemaMismatch`,
//! `DeadLetterUnroutable`) and message. Both come before `WorkersReady`, so that when a stuck worker
//! also makes its pod unready, `Ready=False` names the cause rather than the symptom.

use kube::runtime::events::EventType;
use signal_model::SignalPipeline;

use super::Context;
use super::conditions::{
    ConditionState, ConditionStatus, DEAD_LETTER_READY, WORKERS_HEALTHY, WORKERS_READY,
};
use super::events::publish;
use crate::dataplane::DataPlaneReport;
use crate::dataplane::worker_health::WorkerHealth;
use signal_model::worker_health::HEALTH_REPORT_MAX_AGE_SECS;

/// The `DeadLetterReady` condition.
pub fn dead_letter_condition(report: &DataPlaneReport) -> ConditionState {
    let part = &report.dead_letter;
    let reason = match (part.reason.is_empty(), part.ready) {
        (false, _) => part.reason.clone(),
        (true, true) => "Ready".to_string(),
        (true, false) => "NotReady".to_string(),
    };
    ConditionState::new(
        DEAD_LETTER_READY,
        ConditionStatus::from_bool(part.ready),
        reason,
        part.message.clone(),
    )
}

/// The `WorkersHealthy` condition.
pub fn workers_healthy_condition(health: &WorkerHealth) -> ConditionState {
    match health {
        WorkerHealth::Unknown(message) => ConditionState::new(
            WORKERS_HEALTHY,
            ConditionStatus::Unknown,
            "HealthUnreadable",
            format!("the workers' health reports could not be read: {message}"),
        ),
        WorkerHealth::NoReports => ConditionState::new(
            WORKERS_HEALTHY,
            ConditionStatus::True,
            "NoReports",
            format!("no worker reported a problem in the last {HEALTH_REPORT_MAX_AGE_SECS}s"),
        ),
        WorkerHealth::Healthy { workers } => ConditionState::new(
            WORKERS_HEALTHY,
            ConditionStatus::True,
            "Healthy",
            format!("{workers} worker(s) report progress"),
        ),
        WorkerHealth::Stuck { reason, message } => ConditionState::new(
            WORKERS_HEALTHY,
            ConditionStatus::False,
            reason.clone(),
            message.clone(),
        ),
    }
}

/// Puts `DeadLetterReady` and `WorkersHealthy` in front of `WorkersReady` (at the end when there
/// is none).
pub fn add_dead_letter_and_health_conditions(
    conditions: &mut Vec<ConditionState>,
    report: &DataPlaneReport,
) {
    let at = conditions
        .iter()
        .position(|c| c.type_ == WORKERS_READY)
        .unwrap_or(conditions.len());
    conditions.splice(
        at..at,
        [
            dead_letter_condition(report),
            workers_healthy_condition(&report.worker_health),
        ],
    );
}

/// A Warning when no stream captures the dead-letter subject or a worker is stuck (what the
/// dead-letter and health streams' reconcile changed is in the data plane's Normal event).
pub async fn publish_dead_letter_and_health_events(
    pipeline: &SignalPipeline,
    ctx: &Context,
    report: &DataPlaneReport,
) {
    if !report.dead_letter.ready {
        publish(
            &ctx.recorder,
            pipeline,
            EventType::Warning,
            &report.dead_letter.reason,
            "Reconcile",
            format!("dead letters: {}", report.dead_letter.message),
        )
        .await;
    }
    if let WorkerHealth::Stuck { reason, message } = &report.worker_health {
        publish(
            &ctx.recorder,
            pipeline,
            EventType::Warning,
            reason,
            "Reconcile",
            message.clone(),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::conditions::{STREAM_READY, TABLE_READY, summarise_ready};
    use crate::dataplane::PartReport;

    fn ok(type_: &'static str) -> ConditionState {
        ConditionState::new(type_, ConditionStatus::True, "Ready", "ok")
    }

    #[test]
    fn a_stuck_worker_is_why_the_pipeline_is_not_ready_even_when_its_pod_is_unready() {
        let report = DataPlaneReport {
            dead_letter: PartReport::ready("UpToDate", "kept by SIGNALS_DLQ", Vec::new()),
            worker_health: WorkerHealth::Stuck {
                reason: "InsertRejected".into(),
                message: "worker w-0: Code: 16. No such column x".into(),
            },
            ..DataPlaneReport::default()
        };
        let mut conditions = vec![
            ok(STREAM_READY),
            ok(TABLE_READY),
            ConditionState::new(WORKERS_READY, ConditionStatus::False, "Progressing", "0/1"),
        ];
        add_dead_letter_and_health_conditions(&mut conditions, &report);
        let types: Vec<&str> = conditions.iter().map(|c| c.type_).collect();
        assert_eq!(
            types,
            [
                STREAM_READY,
                TABLE_READY,
                DEAD_LETTER_READY,
                WORKERS_HEALTHY,
                WORKERS_READY
            ]
        );
        let ready = summarise_ready(&conditions);
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (ConditionStatus::False, "InsertRejected")
        );
        assert!(
            ready.message.contains("No such column x"),
            "{}",
            ready.message
        );
    }

    #[test]
    fn without_reports_the_workers_count_as_healthy() {
        let condition = workers_healthy_condition(&WorkerHealth::NoReports);
        assert_eq!(condition.status, ConditionStatus::True);
        let unknown = workers_healthy_condition(&WorkerHealth::Unknown("down".into()));
        assert_eq!(
            (unknown.status, unknown.reason.as_str()),
            (ConditionStatus::Unknown, "HealthUnreadable")
        );
    }

    #[test]
    fn an_unroutable_dead_letter_subject_makes_the_pipeline_not_ready() {
        let report = DataPlaneReport {
            dead_letter: PartReport::not_ready(
                "DeadLetterUnroutable",
                "no stream captures dlq.x",
                Vec::new(),
            ),
            ..DataPlaneReport::default()
        };
        let mut conditions = vec![ok(STREAM_READY)];
        add_dead_letter_and_health_conditions(&mut conditions, &report);
        let ready = summarise_ready(&conditions);
        assert_eq!(ready.reason, "DeadLetterUnroutable");
    }
}
