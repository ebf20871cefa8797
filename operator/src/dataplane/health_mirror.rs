//! The workers' health reports as the shared health stream holds them, mirrored in memory by one
//! ordered consumer, so that reading a pipeline's reports costs no request.
//!
//! The controller keeps one mirror per pooled NATS client (server and credentials), over every
//! pipeline's subjects: a fleet's resyncs then read their reports from memory, where each used to
//! create a consumer on the health stream, fetch from it and delete it (three JetStream requests
//! per pipeline and resync, and a consumer whose last-per-subject start the server looks up among
//! every worker's subject). One-off callers ([`super::connections::Connections::per_call`]) mirror
//! their pipeline's subjects only, for the one read.
//!
//! The consumer starts at the last report of each subject and then follows the stream live
//! (async-nats's ordered consumer recreates itself after a gap). Until it has delivered what the
//! stream held when it started, a read waits: a half-filled mirror would say "no reports" of
//! workers that did report. When the consumer fails, reads answer the error and the mirror starts
//! again from the last reports. So it does when the stream it follows is not the stream any more:
//! the health stream lives in memory, so a nats-server restart loses it, and the reconcile that
//! creates it again tells the mirror ([`HealthMirror::stream_seen`]) by its creation time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use signal_model::worker_health::{HEALTH_REPORT_MAX_AGE_SECS, HEALTH_STREAM, WorkerHealthReport};
use tokio::sync::watch;

use super::worker_health::{is_fresh, now_unix_ms};
use super::{DataPlaneError, REQUEST_TIMEOUT};

/// How long the mirror waits before starting again after its consumer failed.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Where the mirror is in following the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Progress {
    /// Delivering what the stream held when the consumer was created.
    CatchingUp,
    /// Everything the stream held is in; new reports follow as they are published.
    Current,
    /// The consumer failed (why); the mirror starts again shortly.
    Failed(String),
}

/// Reports by pipeline (the subject up to the worker token, its dot included), then by worker
/// token.
type Reports = HashMap<String, HashMap<String, WorkerHealthReport>>;

/// The health reports on one filter of the health stream, kept current in the background; see
/// the module documentation. Dropping it stops its consumer.
pub struct HealthMirror {
    reports: Arc<Mutex<Reports>>,
    progress: watch::Receiver<Progress>,
    /// The creation time (Unix nanoseconds) of the health stream as a reconcile last saw it.
    stream_seen: watch::Sender<Option<i128>>,
    task: tokio::task::JoinHandle<()>,
}

impl HealthMirror {
    /// Starts mirroring the reports on `filter` (`HEALTH_SUBJECTS` for every pipeline, or one
    /// pipeline's [`signal_model::worker_health::health_filter`]).
    pub fn start(js: jetstream::Context, filter: String) -> Self {
        let reports = Arc::new(Mutex::new(Reports::new()));
        let (progress_tx, progress) = watch::channel(Progress::CatchingUp);
        let (stream_seen, seen) = watch::channel(None);
        let task = tokio::spawn(follow(js, filter, reports.clone(), progress_tx, seen));
        Self {
            reports,
            progress,
            stream_seen,
            task,
        }
    }

    /// A reconcile found the health stream created at `created_unix_nanos`: when that is not the
    /// stream the mirror follows (it was lost and created again), the mirror starts over.
    pub fn stream_seen(&self, created_unix_nanos: i128) {
        self.stream_seen
            .send_if_modified(|seen| seen.replace(created_unix_nanos) != Some(created_unix_nanos));
    }

    /// The last report of every worker whose subject matches `pipeline_filter` (a
    /// [`signal_model::worker_health::health_filter`]), once the mirror is current; reports past
    /// the contract's max age are dropped here. Waits up to [`REQUEST_TIMEOUT`] for the mirror to
    /// catch up (or to start again after a failure), then answers why it is not current.
    pub async fn reports(
        &self,
        pipeline_filter: &str,
    ) -> Result<Vec<WorkerHealthReport>, DataPlaneError> {
        let mut progress = self.progress.clone();
        let waited = tokio::time::timeout(
            REQUEST_TIMEOUT,
            progress.wait_for(|p| *p == Progress::Current),
        )
        .await;
        if !matches!(waited, Ok(Ok(_))) {
            let message = match &*self.progress.borrow() {
                Progress::Failed(message) => message.clone(),
                _ => format!(
                    "the reports of stream {HEALTH_STREAM} were not all delivered within {}s",
                    REQUEST_TIMEOUT.as_secs()
                ),
            };
            return Err(DataPlaneError::NatsRefused {
                action: format!("read health reports on {pipeline_filter}"),
                message,
            });
        }
        let prefix = pipeline_filter.trim_end_matches('*');
        let now = now_unix_ms();
        let mut reports = lock(&self.reports);
        let Some(workers) = reports.get_mut(prefix) else {
            return Ok(Vec::new());
        };
        workers.retain(|_, report| is_fresh(report, now));
        let found = workers.values().cloned().collect();
        if workers.is_empty() {
            reports.remove(prefix);
        }
        Ok(found)
    }
}

impl Drop for HealthMirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs the mirror's consumer, starting it again after each failure.
async fn follow(
    js: jetstream::Context,
    filter: String,
    reports: Arc<Mutex<Reports>>,
    progress: watch::Sender<Progress>,
    mut stream_seen: watch::Receiver<Option<i128>>,
) {
    loop {
        let error = follow_once(&js, &filter, &reports, &progress, &mut stream_seen).await;
        tracing::debug!(%filter, %error, "health mirror failed; starting again");
        progress.send_replace(Progress::Failed(error));
        tokio::time::sleep(RESTART_DELAY).await;
        progress.send_replace(Progress::CatchingUp);
    }
}

/// One consumer's life: from the last report per subject, then live, until it fails (returns why).
async fn follow_once(
    js: &jetstream::Context,
    filter: &str,
    reports: &Mutex<Reports>,
    progress: &watch::Sender<Progress>,
    stream_seen: &mut watch::Receiver<Option<i128>>,
) -> String {
    let stream = match js.get_stream(HEALTH_STREAM).await {
        Ok(stream) => stream,
        Err(error) => return format!("opening stream {HEALTH_STREAM}: {error}"),
    };
    let followed = stream.cached_info().created.unix_timestamp_nanos();
    stream_seen.mark_unchanged();
    let consumer = match stream
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: js.client().new_inbox(),
            filter_subject: filter.to_string(),
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
    {
        Ok(consumer) => consumer,
        Err(error) => return format!("creating a reader on stream {HEALTH_STREAM}: {error}"),
    };
    // What the stream held starts afresh: a report deleted meanwhile is not kept.
    lock(reports).clear();
    if consumer.cached_info().num_pending == 0 {
        progress.send_replace(Progress::Current);
    }
    let mut messages = match consumer.messages().await {
        Ok(messages) => messages,
        Err(error) => return format!("reading stream {HEALTH_STREAM}: {error}"),
    };
    let mut sweep = tokio::time::interval(Duration::from_secs(HEALTH_REPORT_MAX_AGE_SECS));
    // Reports that expire between the consumer's creation and their delivery are never delivered,
    // and the last one to come may then not say it was the last: start again rather than wait.
    let catch_up = tokio::time::sleep(REQUEST_TIMEOUT);
    tokio::pin!(catch_up);
    loop {
        let message = tokio::select! {
            message = messages.next() => message,
            () = &mut catch_up, if *progress.borrow() == Progress::CatchingUp => {
                return format!(
                    "the reports of stream {HEALTH_STREAM} were not all delivered within {}s",
                    REQUEST_TIMEOUT.as_secs()
                );
            }
            Ok(()) = stream_seen.changed() => {
                if stream_seen.borrow_and_update().is_some_and(|seen| seen != followed) {
                    return format!("stream {HEALTH_STREAM} was created again");
                }
                continue;
            }
            _ = sweep.tick() => {
                let now = now_unix_ms();
                lock(reports).retain(|_, workers| {
                    workers.retain(|_, report| is_fresh(report, now));
                    !workers.is_empty()
                });
                continue;
            }
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(error)) => return format!("reading stream {HEALTH_STREAM}: {error}"),
            None => return format!("the reader of stream {HEALTH_STREAM} ended"),
        };
        record(reports, &message.subject, &message.payload);
        if message.info().is_ok_and(|info| info.pending == 0) {
            progress.send_if_modified(|p| {
                let changed = *p != Progress::Current;
                *p = Progress::Current;
                changed
            });
        }
    }
}

/// Files one report under its pipeline and worker; a report that does not parse is logged and
/// left out.
fn record(reports: &Mutex<Reports>, subject: &str, payload: &[u8]) {
    let Some((pipeline, worker)) = subject.rsplit_once('.') else {
        return;
    };
    match serde_json::from_slice::<WorkerHealthReport>(payload) {
        Ok(report) => {
            lock(reports)
                .entry(format!("{pipeline}."))
                .or_default()
                .insert(worker.to_string(), report);
        }
        Err(error) => tracing::warn!(
            %subject,
            %error,
            "ignoring a health report that does not parse"
        ),
    }
}

fn lock(reports: &Mutex<Reports>) -> MutexGuard<'_, Reports> {
    // Plain inserts and removals: a panic elsewhere leaves the map consistent.
    reports
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(worker: &str, at: u64) -> Vec<u8> {
        serde_json::to_vec(&WorkerHealthReport {
            worker: worker.to_string(),
            ready: true,
            reason: None,
            message: String::new(),
            reported_at_unix_ms: at,
        })
        .expect("json")
    }

    #[test]
    fn reports_are_filed_by_pipeline_and_worker_the_last_one_kept() {
        let reports = Mutex::new(Reports::new());
        record(&reports, "signal.health.S.d.w-0", &report("w-0", 1));
        record(&reports, "signal.health.S.d.w-0", &report("w-0", 2));
        record(&reports, "signal.health.S.d.w-1", &report("w-1", 3));
        record(&reports, "signal.health.S.other.w-0", &report("w-0", 4));
        record(&reports, "signal.health.S.d.w-2", b"not json");
        let reports = lock(&reports);
        let pipeline = reports.get("signal.health.S.d.").expect("the pipeline");
        assert_eq!(pipeline.len(), 2);
        assert_eq!(pipeline["w-0"].reported_at_unix_ms, 2);
        assert_eq!(reports["signal.health.S.other."].len(), 1);
    }
}
