//! The health report a worker publishes and the operator reads: the contract between them.
//!
//! A worker that cannot make progress for a reason a person must fix (ClickHouse rejects the
//! insert, the live table's column types differ from the manifest, no stream captures the
//! dead-letter subject) says so on `/readyz` and in its metrics, and also publishes a
//! [`WorkerHealthReport`] to JetStream so the operator (and local mode) can put it in the
//! pipeline's status without reaching the worker pods. Reports go to one subject per worker in
//! the shared [`HEALTH_STREAM`], which keeps the last report per subject and forgets reports older
//! than [`HEALTH_REPORT_MAX_AGE_SECS`], so a worker that went away stops counting.
//!
//! Pure data and names: publishing and reading live with the binaries.

use serde::{Deserialize, Serialize};

/// The JetStream stream holding the last health report of every worker on a NATS server.
pub const HEALTH_STREAM: &str = "SIGNAL_WORKER_HEALTH";
/// Subjects of [`HEALTH_STREAM`].
pub const HEALTH_SUBJECTS: &str = "signal.health.>";
/// Reports older than this are dropped by the stream (workers re-publish well within it).
pub const HEALTH_REPORT_MAX_AGE_SECS: u64 = 120;
/// How often a worker re-publishes an unchanged report.
pub const HEALTH_REPORT_INTERVAL_SECS: u64 = 30;

/// Why a worker is not making progress. Serialized as the CamelCase word used as the
/// pipeline's `Ready` condition reason.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum HealthReason {
    /// ClickHouse refused the insert for a reason retrying will not fix (unknown column,
    /// type mismatch, missing table or database, authentication).
    InsertRejected,
    /// The live table's column types differ from the manifest's; writing would corrupt values.
    SchemaMismatch,
    /// No JetStream stream captures the dead-letter subject, so poison stays unacknowledged.
    DeadLetterUnroutable,
    /// The TLS handshake with the Redis cache fails (wrong CA, expired or missing certificate):
    /// rows are still stored, but the cache is not updated.
    CacheTlsFailed,
}

/// One worker's state, published on change and every [`HEALTH_REPORT_INTERVAL_SECS`].
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerHealthReport {
    /// The worker's identity (pod name, or `local-N` in local mode).
    pub worker: String,
    /// `true` when the worker is making progress.
    pub ready: bool,
    /// Set when `ready` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<HealthReason>,
    /// One line a person can act on, e.g. the server's error message.
    #[serde(default)]
    pub message: String,
    /// When the report was made, milliseconds since the Unix epoch.
    pub reported_at_unix_ms: u64,
}

/// The subject one worker of a pipeline reports on. Stream, consumer and worker names are
/// already subject-safe tokens except for the worker name, whose dots are replaced.
pub fn health_subject(stream: &str, durable: &str, worker: &str) -> String {
    format!(
        "{}.{worker}",
        health_filter_prefix(stream, durable),
        worker = subject_token(worker)
    )
}

/// The filter matching every worker's report of one pipeline.
pub fn health_filter(stream: &str, durable: &str) -> String {
    format!("{}.*", health_filter_prefix(stream, durable))
}

fn health_filter_prefix(stream: &str, durable: &str) -> String {
    format!(
        "signal.health.{}.{}",
        subject_token(stream),
        subject_token(durable)
    )
}

fn subject_token(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '.' | '*' | '>' | ' ' => '_',
            other => other,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_per_worker_under_one_filter() {
        let subject = health_subject("SIGNALS", "writer", "pod.a");
        assert_eq!(subject, "signal.health.SIGNALS.writer.pod_a");
        assert_eq!(
            health_filter("SIGNALS", "writer"),
            "signal.health.SIGNALS.writer.*"
        );
        assert!(HEALTH_SUBJECTS.starts_with("signal.health."));
    }

    #[test]
    fn report_round_trips_with_camel_case_reason() {
        let report = WorkerHealthReport {
            worker: "w-0".into(),
            ready: false,
            reason: Some(HealthReason::InsertRejected),
            message: "Code: 16, No such column x".into(),
            reported_at_unix_ms: 1,
        };
        let text = serde_json::to_string(&report).unwrap();
        assert!(text.contains("\"reason\":\"InsertRejected\""), "{text}");
        let back: WorkerHealthReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, report);
    }
}
