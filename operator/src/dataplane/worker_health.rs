//! The workers' health reports, as the operator sees them: the shared health stream they are
//! published to, and the last report of each worker of a pipeline, summed up for its status.
//!
//! The contract lives in [`signal_model::worker_health`]. Here: [`ensure_health_stream`] creates
//! the one stream every pipeline on a NATS server shares (memory storage, the last report per
//! subject, reports forgotten after [`HEALTH_REPORT_MAX_AGE_SECS`]); a pipeline never deletes it.
//! The reports are read from a [`HealthMirror`] (one per pooled NATS client, so a reconcile makes
//! no request for them) and [`summarise_health`] turns them into what the `WorkersHealthy`
//! condition says.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use signal_model::SignalPipelineSpec;
use signal_model::worker_health::{
    HEALTH_REPORT_MAX_AGE_SECS, HEALTH_STREAM, HEALTH_SUBJECTS, WorkerHealthReport, health_filter,
};

use super::connections::Session;
use super::health_mirror::HealthMirror;
use super::stream::stream_info;
use super::{DataPlaneError, FieldChange, PART_TIMEOUT, bounded, list_changes};

/// How long one look at the shared health stream (does it exist as the contract says) serves
/// the reconciles on the same NATS client.
const HEALTH_STREAM_RECHECK: Duration = Duration::from_secs(10);
/// Reports named in a status message; the rest are counted.
const REPORTS_NAMED: usize = 3;

/// The health stream's config: the contract's subjects and age limit, one report per subject,
/// in memory (reports are re-published every 30 s, so a restart loses nothing that matters).
pub fn health_stream_config() -> stream::Config {
    let max_age = Duration::from_secs(HEALTH_REPORT_MAX_AGE_SECS);
    stream::Config {
        name: HEALTH_STREAM.to_string(),
        subjects: vec![HEALTH_SUBJECTS.to_string()],
        storage: stream::StorageType::Memory,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        max_age,
        max_messages_per_subject: 1,
        max_messages: -1,
        max_bytes: -1,
        max_message_size: -1,
        max_consumers: -1,
        num_replicas: 1,
        // The server refuses a duplicate window longer than max_age.
        duplicate_window: max_age.min(Duration::from_secs(120)),
        ..Default::default()
    }
}

/// The fields of a live health stream that differ from [`health_stream_config`] and an update can
/// change (storage cannot; a memory/file mismatch is harmless and left alone).
pub fn health_stream_drift(live: &stream::Config) -> Vec<FieldChange> {
    let desired = health_stream_config();
    let mut changes = Vec::new();
    if live.subjects != desired.subjects {
        changes.push(FieldChange {
            field: "subjects",
            live: format!("[{}]", live.subjects.join(", ")),
            desired: format!("[{}]", desired.subjects.join(", ")),
        });
    }
    if live.max_age != desired.max_age {
        changes.push(FieldChange {
            field: "max_age",
            live: format!("{:?}", live.max_age),
            desired: format!("{:?}", desired.max_age),
        });
    }
    if live.max_messages_per_subject != desired.max_messages_per_subject {
        changes.push(FieldChange {
            field: "max_msgs_per_subject",
            live: live.max_messages_per_subject.to_string(),
            desired: desired.max_messages_per_subject.to_string(),
        });
    }
    changes
}

/// What [`ensure_health_stream`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthStreamState {
    /// When the stream was created (Unix nanoseconds): a new time is a new stream.
    pub created_unix_nanos: i128,
    /// What was changed, one sentence each.
    pub changes: Vec<String>,
}

/// Creates the health stream when missing and puts back its contract fields when they drifted.
pub async fn ensure_health_stream(
    js: &jetstream::Context,
) -> Result<HealthStreamState, DataPlaneError> {
    let Some(live) = stream_info(js, HEALTH_STREAM).await? else {
        return match js.create_stream(health_stream_config()).await {
            Ok(created) => Ok(HealthStreamState {
                created_unix_nanos: created.cached_info().created.unix_timestamp_nanos(),
                changes: vec![format!("created health stream {HEALTH_STREAM}")],
            }),
            // Another reconcile (of another pipeline) may have created it meanwhile.
            Err(error) if let Some(live) = stream_info(js, HEALTH_STREAM).await? => {
                tracing::debug!(%error, "health stream created concurrently");
                Ok(HealthStreamState {
                    created_unix_nanos: live.created.unix_timestamp_nanos(),
                    changes: Vec::new(),
                })
            }
            Err(error) => Err(DataPlaneError::NatsRefused {
                action: format!("create stream {HEALTH_STREAM}"),
                message: error.to_string(),
            }),
        };
    };
    let created_unix_nanos = live.created.unix_timestamp_nanos();
    let drift = health_stream_drift(&live.config);
    if drift.is_empty() {
        return Ok(HealthStreamState {
            created_unix_nanos,
            changes: Vec::new(),
        });
    }
    let desired = health_stream_config();
    let mut update = live.config.clone();
    update.subjects = desired.subjects;
    update.max_age = desired.max_age;
    update.max_messages_per_subject = desired.max_messages_per_subject;
    update.duplicate_window = update.duplicate_window.min(desired.max_age);
    js.update_stream(&update)
        .await
        .map_err(|error| DataPlaneError::NatsRefused {
            action: format!("update stream {HEALTH_STREAM}"),
            message: error.to_string(),
        })?;
    Ok(HealthStreamState {
        created_unix_nanos,
        changes: vec![format!(
            "updated health stream {HEALTH_STREAM}: {}",
            list_changes(&drift)
        )],
    })
}

/// What the workers' reports say about a pipeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum WorkerHealth {
    /// The reports could not be read (the message says why).
    Unknown(String),
    /// No worker reported within the reports' max age.
    #[default]
    NoReports,
    /// Every fresh report says the worker makes progress.
    Healthy { workers: usize },
    /// At least one worker is stuck: the reason of the first (`InsertRejected`, `SchemaMismatch`,
    /// `DeadLetterUnroutable`) and every stuck worker's message.
    Stuck { reason: String, message: String },
}

/// Whether `report` is within the contract's max age at `now_unix_ms`.
pub fn is_fresh(report: &WorkerHealthReport, now_unix_ms: u64) -> bool {
    now_unix_ms.saturating_sub(report.reported_at_unix_ms) <= HEALTH_REPORT_MAX_AGE_SECS * 1000
}

pub(super) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sums up the reports, ignoring those older than the contract's max age at `now_unix_ms` (the
/// stream drops them too, but only on its own schedule).
pub fn summarise_health(reports: &[WorkerHealthReport], now_unix_ms: u64) -> WorkerHealth {
    let mut fresh: Vec<&WorkerHealthReport> = reports
        .iter()
        .filter(|r| is_fresh(r, now_unix_ms))
        .collect();
    if fresh.is_empty() {
        return WorkerHealth::NoReports;
    }
    fresh.sort_by(|a, b| a.worker.cmp(&b.worker));
    let stuck: Vec<&&WorkerHealthReport> = fresh.iter().filter(|r| !r.ready).collect();
    let Some(first) = stuck.first() else {
        return WorkerHealth::Healthy {
            workers: fresh.len(),
        };
    };
    let reason = first.reason.map_or_else(
        || "WorkerNotReady".to_string(),
        |reason| format!("{reason:?}"),
    );
    let mut parts: Vec<String> = stuck
        .iter()
        .take(REPORTS_NAMED)
        .map(|r| format!("worker {}: {}", r.worker, r.message))
        .collect();
    if stuck.len() > REPORTS_NAMED {
        parts.push(format!("and {} more", stuck.len() - REPORTS_NAMED));
    }
    WorkerHealth::Stuck {
        reason,
        message: parts.join("; "),
    }
}

/// Ensures the health stream and sums up the pipeline's reports; never fails (a problem becomes
/// [`WorkerHealth::Unknown`]). Also returns what ensuring the stream changed. With a pool, the
/// reports come from its client's [`HealthMirror`]; without, from a mirror of this pipeline's
/// subjects made for this one read.
pub async fn check_worker_health(
    session: &Session<'_>,
    js: &jetstream::Context,
    pipeline_name: &str,
    spec: &SignalPipelineSpec,
) -> (WorkerHealth, Vec<String>) {
    let filter = health_filter(&spec.stream.name, spec.durable_name(pipeline_name));
    let result = bounded("reading the workers' health reports", PART_TIMEOUT, async {
        // Every pipeline on a server shares the stream: one look serves the reconciles of the
        // next few seconds (a fleet's resyncs would otherwise each ask for the same stream).
        let (changes, created) = if session.health_stream_checked_within(HEALTH_STREAM_RECHECK) {
            (Vec::new(), None)
        } else {
            let state = ensure_health_stream(js).await?;
            session.note_health_stream_checked();
            (state.changes, Some(state.created_unix_nanos))
        };
        // Started once the stream exists (ensured above by this or an earlier reconcile).
        let mirror = session.health_mirror(js);
        if let (Some(mirror), Some(created)) = (&mirror, created) {
            mirror.stream_seen(created);
        }
        let reports = match mirror {
            Some(mirror) => mirror.reports(&filter).await?,
            None => {
                HealthMirror::start(js.clone(), filter.clone())
                    .reports(&filter)
                    .await?
            }
        };
        Ok((reports, changes))
    })
    .await;
    match result {
        Ok((reports, changes)) => (summarise_health(&reports, now_unix_ms()), changes),
        Err(error) => (WorkerHealth::Unknown(error.to_string()), Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use signal_model::worker_health::HealthReason;

    use super::*;

    fn report(
        worker: &str,
        ready: bool,
        reason: Option<HealthReason>,
        at: u64,
    ) -> WorkerHealthReport {
        WorkerHealthReport {
            worker: worker.to_string(),
            ready,
            reason,
            message: format!("{worker} says so"),
            reported_at_unix_ms: at,
        }
    }

    #[test]
    fn no_fresh_report_is_no_report() {
        assert_eq!(summarise_health(&[], 1_000_000), WorkerHealth::NoReports);
        let old = report("w-0", false, Some(HealthReason::InsertRejected), 0);
        assert_eq!(
            summarise_health(&[old], HEALTH_REPORT_MAX_AGE_SECS * 1000 + 1),
            WorkerHealth::NoReports
        );
    }

    #[test]
    fn one_stuck_worker_makes_the_pipeline_stuck_with_its_reason() {
        let now = 10_000_000;
        let reports = [
            report("w-1", true, None, now),
            report("w-2", false, Some(HealthReason::SchemaMismatch), now - 1000),
            report("w-0", false, Some(HealthReason::InsertRejected), now),
        ];
        assert_eq!(
            summarise_health(&reports, now),
            WorkerHealth::Stuck {
                reason: "InsertRejected".into(),
                message: "worker w-0: w-0 says so; worker w-2: w-2 says so".into(),
            }
        );
        assert_eq!(
            summarise_health(&reports[..1], now),
            WorkerHealth::Healthy { workers: 1 }
        );
    }

    #[test]
    fn many_stuck_workers_are_counted_not_listed() {
        let now = 5_000_000;
        let reports: Vec<_> = (0..5)
            .map(|i| {
                report(
                    &format!("w-{i}"),
                    false,
                    Some(HealthReason::DeadLetterUnroutable),
                    now,
                )
            })
            .collect();
        let WorkerHealth::Stuck { reason, message } = summarise_health(&reports, now) else {
            panic!("stuck");
        };
        assert_eq!(reason, "DeadLetterUnroutable");
        assert!(
            message.ends_with("worker w-2: w-2 says so; and 2 more"),
            "{message}"
        );
    }

    #[test]
    fn the_health_stream_keeps_one_recent_report_per_worker_in_memory() {
        let config = health_stream_config();
        assert_eq!(config.name, HEALTH_STREAM);
        assert_eq!(config.subjects, [HEALTH_SUBJECTS]);
        assert_eq!(config.storage, stream::StorageType::Memory);
        assert_eq!(config.max_messages_per_subject, 1);
        assert_eq!(
            config.max_age,
            Duration::from_secs(HEALTH_REPORT_MAX_AGE_SECS)
        );
        assert!(health_stream_drift(&config).is_empty());
        let drifted = stream::Config {
            max_messages_per_subject: -1,
            ..config
        };
        let fields: Vec<_> = health_stream_drift(&drifted)
            .iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(fields, ["max_msgs_per_subject"]);
    }
}
