//! Why the worker is stuck, when a person must fix something: ClickHouse rejects the insert, the
//! live table's column types differ from the manifest, no stream captures the dead-letter
//! subject, or the Redis cache refuses TLS.
//!
//! Each problem shows on `/readyz` (with its message), as the `signal_worker_blocked` gauge, and in
//! the [`WorkerHealthReport`] the worker publishes to the shared health stream on every change and
//! every [`HEALTH_REPORT_INTERVAL_SECS`], which the operator turns into the pipeline's `Ready`
//! condition.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use signal_model::worker_health::{HEALTH_REPORT_INTERVAL_SECS, HealthReason, WorkerHealthReport};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Every reason, in the order they are reported when several hold (the first one wins).
const REASONS: [HealthReason; 4] = [
    HealthReason::SchemaMismatch,
    HealthReason::InsertRejected,
    HealthReason::DeadLetterUnroutable,
    HealthReason::CacheTlsFailed,
];

/// The problems a worker has now; shared by every task.
pub struct Health {
    problems: Mutex<Vec<(HealthReason, String)>>,
    changed: watch::Sender<u64>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self {
            problems: Mutex::new(Vec::new()),
            changed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(HealthReason, String)>> {
        self.problems.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records (or updates) a problem; logs and reports it when it is new or its message changed.
    pub fn set(&self, reason: HealthReason, message: &str, metrics: &Metrics) {
        let mut problems = self.lock();
        match problems.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, held)) if held == message => return,
            Some((_, held)) => *held = message.to_string(),
            None => problems.push((reason, message.to_string())),
        }
        problems.sort_by_key(|(r, _)| REASONS.iter().position(|x| x == r));
        drop(problems);
        metrics.set_blocked(reason, true);
        tracing::error!(reason = ?reason, %message, "worker blocked");
        self.changed.send_modify(|n| *n += 1);
    }

    /// Clears a problem once it no longer holds.
    pub fn clear(&self, reason: HealthReason, metrics: &Metrics) {
        let mut problems = self.lock();
        let before = problems.len();
        problems.retain(|(r, _)| *r != reason);
        if problems.len() == before {
            return;
        }
        drop(problems);
        metrics.set_blocked(reason, false);
        tracing::info!(reason = ?reason, "worker no longer blocked");
        self.changed.send_modify(|n| *n += 1);
    }

    /// True while `reason` holds.
    pub fn has(&self, reason: HealthReason) -> bool {
        self.lock().iter().any(|(r, _)| *r == reason)
    }

    /// The problem to report, if any.
    pub fn problem(&self) -> Option<(HealthReason, String)> {
        self.lock().first().cloned()
    }

    /// The report for `worker` as of now.
    pub fn report(&self, worker: &str) -> WorkerHealthReport {
        let problem = self.problem();
        WorkerHealthReport {
            worker: worker.to_string(),
            ready: problem.is_none(),
            reason: problem.as_ref().map(|(r, _)| *r),
            message: problem.map(|(_, m)| m).unwrap_or_default(),
            reported_at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }

    /// Publishes the report on every change and every [`HEALTH_REPORT_INTERVAL_SECS`] until
    /// `stop`. A missing health stream is logged once; the worker carries on without it.
    pub async fn publish_reports(
        &self,
        jetstream: jetstream::Context,
        subject: String,
        worker: String,
        stop: CancellationToken,
    ) {
        let mut changes = self.changed.subscribe();
        let mut ticks = tokio::time::interval(Duration::from_secs(HEALTH_REPORT_INTERVAL_SECS));
        let mut warned = false;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                changed = changes.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
            let Ok(body) = serde_json::to_vec(&self.report(&worker)) else {
                continue;
            };
            let published = match jetstream.publish(subject.clone(), body.into()).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(error) => Err(error.to_string()),
            };
            match published {
                Ok(()) => warned = false,
                Err(error) if !warned => {
                    warned = true;
                    tracing::warn!(%error, %subject, "health report not stored (is the health stream missing?); carrying on");
                }
                Err(error) => tracing::debug!(%error, "health report not stored"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_set_clear_and_report_the_most_pressing_first() {
        let health = Health::new();
        let metrics = Metrics::new();
        assert!(health.report("w").ready);
        health.set(HealthReason::DeadLetterUnroutable, "no stream", &metrics);
        health.set(HealthReason::SchemaMismatch, "column a", &metrics);
        let report = health.report("w");
        assert!(!report.ready);
        assert_eq!(report.reason, Some(HealthReason::SchemaMismatch));
        assert_eq!(report.message, "column a");
        health.clear(HealthReason::SchemaMismatch, &metrics);
        assert_eq!(
            health.problem(),
            Some((HealthReason::DeadLetterUnroutable, "no stream".into()))
        );
        assert!(
            signal_telemetry::http::encode(signal_telemetry::http::MetricsSource::registry(
                &metrics
            ))
            .contains("reason=\"DeadLetterUnroutable\"} 1")
        );
        health.clear(HealthReason::DeadLetterUnroutable, &metrics);
        assert!(health.report("w").ready);
    }
}
