//! The pipeline's dead-letter stream: created, updated and deleted like the source stream, so that
//! every dead letter a worker publishes is stored and acknowledged by JetStream.
//!
//! The settings come from `spec.deadLetter` with the model's defaults resolved
//! ([`SignalPipelineSpec::dead_letter_stream`]) and go through the same stream reconcile as the
//! source stream ([`super::stream`]), which refuses changes JetStream cannot make (storage, name).
//! With `deadLetter.stream.managed: false` the operator leaves the stream to whoever manages it and
//! only checks that some stream captures the dead-letter subject, saying so when none does.

use async_nats::jetstream;
use signal_model::{DeadLetterStatus, DeletionPolicy, SignalPipelineSpec};

use super::stream::{self, stream_info};
use super::{DataPlaneError, PART_TIMEOUT, PartReport, bounded};

/// The condition reason when no stream captures the dead-letter subject; the same word the
/// workers use in their health report ([`signal_model::worker_health::HealthReason`]).
pub const UNROUTABLE: &str = "DeadLetterUnroutable";

/// The result of reconciling the dead-letter destination.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeadLetterOutcome {
    pub report: PartReport,
    pub status: Option<DeadLetterStatus>,
}

/// Creates or updates the dead-letter stream (when managed), or finds the stream that captures
/// the subject (when not). Never fails: problems become a report that is not ready.
pub async fn reconcile_dead_letter(
    js: &jetstream::Context,
    pipeline_name: &str,
    spec: &SignalPipelineSpec,
) -> DeadLetterOutcome {
    let subject = spec.dead_letter_subject(pipeline_name);
    if spec.dead_letter_stream_managed() {
        return reconcile_managed(js, spec, subject).await;
    }
    let found = bounded(
        format!("finding the stream of dead-letter subject {subject}"),
        PART_TIMEOUT,
        capturing_stream(js, &subject),
    )
    .await;
    match found {
        Ok(Some((name, messages))) => DeadLetterOutcome {
            report: PartReport::ready(
                "Captured",
                format!(
                    "dead letters on {subject} are kept by stream {name} (not managed by the operator)"
                ),
                Vec::new(),
            ),
            status: Some(DeadLetterStatus {
                subject,
                stream: name,
                messages,
            }),
        },
        Ok(None) => DeadLetterOutcome {
            report: unroutable(&subject, "deadLetter.stream.managed is false"),
            status: Some(DeadLetterStatus {
                subject,
                ..DeadLetterStatus::default()
            }),
        },
        Err(error) => DeadLetterOutcome {
            report: PartReport::from_error(&error),
            status: None,
        },
    }
}

async fn reconcile_managed(
    js: &jetstream::Context,
    spec: &SignalPipelineSpec,
    subject: String,
) -> DeadLetterOutcome {
    let desired = spec.dead_letter_stream();
    let outcome = stream::reconcile_stream(js, &desired).await;
    let name = desired.name;
    let mut report = outcome.report;
    if report.ready {
        report.message = format!(
            "dead letters on {subject} are kept by stream {name}: {}",
            report.message
        );
    } else if !outcome.exists {
        // Without the stream nothing stores a dead letter: the workers hold poison unacknowledged.
        report = PartReport::not_ready(
            &report.reason,
            format!(
                "{}; no stream captures the dead-letter subject {subject}, so the workers keep \
                 poison messages unacknowledged",
                report.message
            ),
            report.changes,
        );
    }
    DeadLetterOutcome {
        report,
        status: Some(DeadLetterStatus {
            subject,
            stream: if outcome.exists { name } else { String::new() },
            messages: outcome.status.map_or(0, |s| s.messages),
        }),
    }
}

fn unroutable(subject: &str, why: &str) -> PartReport {
    PartReport::not_ready(
        UNROUTABLE,
        format!(
            "no stream captures the dead-letter subject {subject} ({why}): the workers keep poison \
             messages unacknowledged until one does"
        ),
        Vec::new(),
    )
}

/// The stream capturing `subject` and its message count, or `None`.
async fn capturing_stream(
    js: &jetstream::Context,
    subject: &str,
) -> Result<Option<(String, u64)>, DataPlaneError> {
    use jetstream::context::GetStreamByNameErrorKind as Kind;
    let name = match js.stream_by_subject(subject).await {
        Ok(name) => name,
        Err(error) => {
            return match error.kind() {
                Kind::NotFound => Ok(None),
                Kind::InvalidSubject => Err(DataPlaneError::InvalidSpec(format!(
                    "dead-letter subject `{subject}` is not valid"
                ))),
                Kind::JetStream(api) => Err(DataPlaneError::NatsRefused {
                    action: format!("look up the stream of {subject}"),
                    message: api.to_string(),
                }),
                Kind::Request => Err(DataPlaneError::NatsUnreachable {
                    url: "the server".to_string(),
                    message: format!("cannot look up the stream of {subject}: {error}"),
                }),
            };
        }
    };
    let messages = stream_info(js, &name)
        .await?
        .map_or(0, |info| info.state.messages);
    Ok(Some((name, messages)))
}

/// Deletes the managed dead-letter stream under `deletionPolicy: Delete`, but only when the
/// source stream went too (`source_stream_deleted`): pipelines reading one stream share its
/// default dead-letter stream, and one of them going must not take the others' dead letters.
/// Like the source stream, it is kept while consumers read it. Returns whether it was deleted.
pub async fn delete_dead_letter_stream(
    js: &jetstream::Context,
    spec: &SignalPipelineSpec,
    source_stream_deleted: bool,
) -> Result<bool, DataPlaneError> {
    if spec.deletion_policy == DeletionPolicy::Retain
        || !spec.dead_letter_stream_managed()
        || !source_stream_deleted
    {
        return Ok(false);
    }
    let name = spec.dead_letter_stream().name;
    stream::delete_stream_unless_shared(js, &name).await
}
