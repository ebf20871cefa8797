//! Status conditions: their types, how they are built, and how `lastTransitionTime` is kept.
//!
//! Conditions follow the Kubernetes convention (`type`, `status` True/False/Unknown, a CamelCase
//! `reason`, a `message`). A condition's `lastTransitionTime` only moves when its status changes,
//! so `kubectl describe` tells how long a pipeline has been (un)ready.

use signal_model::Condition;

/// Everything is in place and the workers are ready.
pub const READY: &str = "Ready";
/// The JetStream stream exists with the spec's settings.
pub const STREAM_READY: &str = "StreamReady";
/// The durable consumer exists with the spec's settings.
pub const CONSUMER_READY: &str = "ConsumerReady";
/// The ClickHouse table exists with the spec's columns.
pub const TABLE_READY: &str = "TableReady";
/// The worker Deployment has all its replicas ready.
pub const WORKERS_READY: &str = "WorkersReady";
/// The live table differs from the spec in a way the operator will not change by itself.
pub const SCHEMA_DRIFT: &str = "SchemaDrift";
/// A stream captures the dead-letter subject (the managed dead-letter stream is in place).
pub const DEAD_LETTER_READY: &str = "DeadLetterReady";
/// No worker reports being stuck (its health report's reason and message when one does).
pub const WORKERS_HEALTHY: &str = "WorkersHealthy";

/// The condition types every status carries, in the order they are written.
pub const COMPONENT_TYPES: [&str; 4] = [STREAM_READY, CONSUMER_READY, TABLE_READY, WORKERS_READY];

/// A condition before timestamps are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionState {
    pub type_: &'static str,
    pub status: ConditionStatus,
    pub reason: String,
    pub message: String,
}

/// `True`, `False` or `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionStatus::True => "True",
            ConditionStatus::False => "False",
            ConditionStatus::Unknown => "Unknown",
        }
    }

    pub fn from_bool(ok: bool) -> Self {
        if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        }
    }
}

impl ConditionState {
    pub fn new(
        type_: &'static str,
        status: ConditionStatus,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Attaches `observedGeneration` and `lastTransitionTime` to the desired conditions, keeping the
/// previous transition time of any condition whose status did not change.
pub fn with_transition_times(
    previous: &[Condition],
    desired: &[ConditionState],
    generation: Option<i64>,
    now_rfc3339: &str,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|state| {
            let status = state.status.as_str();
            let last_transition_time = previous
                .iter()
                .find(|old| old.type_ == state.type_ && old.status == status)
                .and_then(|old| old.last_transition_time.clone())
                .unwrap_or_else(|| now_rfc3339.to_string());
            Condition {
                type_: state.type_.to_string(),
                status: status.to_string(),
                reason: state.reason.clone(),
                message: state.message.clone(),
                last_transition_time: Some(last_transition_time),
                observed_generation: generation,
            }
        })
        .collect()
}

/// The `Ready` condition that sums up the component conditions: true when all of them are, else
/// false with the first failing component's reason and every failing message.
pub fn summarise_ready(components: &[ConditionState]) -> ConditionState {
    let failing: Vec<&ConditionState> = components
        .iter()
        .filter(|c| c.type_ != SCHEMA_DRIFT && c.status != ConditionStatus::True)
        .collect();
    match failing.first() {
        None => ConditionState::new(
            READY,
            ConditionStatus::True,
            "Ready",
            "stream, consumer, table and workers are ready",
        ),
        Some(first) => ConditionState::new(
            READY,
            if failing.iter().any(|c| c.status == ConditionStatus::False) {
                ConditionStatus::False
            } else {
                ConditionStatus::Unknown
            },
            first.reason.clone(),
            failing
                .iter()
                .map(|c| format!("{}: {}", c.type_, c.message))
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

/// Every condition set to the same failure, for problems found before anything was reconciled
/// (a conflict, a missing Secret, an invalid spec).
pub fn all_blocked(status: ConditionStatus, reason: &str, message: &str) -> Vec<ConditionState> {
    let mut states = vec![ConditionState::new(READY, status, reason, message)];
    states.extend(
        COMPONENT_TYPES
            .iter()
            .map(|type_| ConditionState::new(type_, status, reason, message)),
    );
    states
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let first = with_transition_times(
            &[],
            &[ConditionState::new(
                STREAM_READY,
                ConditionStatus::False,
                "Unreachable",
                "down",
            )],
            Some(1),
            "2024-01-01T00:00:00Z",
        );
        let same = with_transition_times(
            &first,
            &[ConditionState::new(
                STREAM_READY,
                ConditionStatus::False,
                "Unreachable",
                "still down",
            )],
            Some(2),
            "2024-01-01T00:05:00Z",
        );
        assert_eq!(
            same[0].last_transition_time.as_deref(),
            Some("2024-01-01T00:00:00Z")
        );
        assert_eq!(same[0].message, "still down");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = with_transition_times(
            &same,
            &[ConditionState::new(
                STREAM_READY,
                ConditionStatus::True,
                "Ready",
                "ok",
            )],
            Some(2),
            "2024-01-01T00:09:00Z",
        );
        assert_eq!(
            flipped[0].last_transition_time.as_deref(),
            Some("2024-01-01T00:09:00Z")
        );
    }

    #[test]
    fn ready_sums_up_components() {
        let ok = |t| ConditionState::new(t, ConditionStatus::True, "Ready", "ok");
        let all_ok: Vec<_> = COMPONENT_TYPES.iter().map(|t| ok(t)).collect();
        assert_eq!(summarise_ready(&all_ok).status, ConditionStatus::True);

        let mut one_down = all_ok.clone();
        one_down[2] = ConditionState::new(
            TABLE_READY,
            ConditionStatus::False,
            "Unreachable",
            "no ClickHouse",
        );
        let ready = summarise_ready(&one_down);
        assert_eq!(ready.status, ConditionStatus::False);
        assert_eq!(ready.reason, "Unreachable");
        assert!(
            ready.message.contains("TableReady: no ClickHouse"),
            "{}",
            ready.message
        );

        // Drift alone is reported on its own condition and does not block readiness.
        let mut drift = all_ok;
        drift.push(ConditionState::new(
            SCHEMA_DRIFT,
            ConditionStatus::True,
            "SchemaDrift",
            "extra column",
        ));
        assert_eq!(summarise_ready(&drift).status, ConditionStatus::True);
    }
}
