//! Kubernetes events on a pipeline: what the operator created, changed, or failed at.
//!
//! Events are for people running `kubectl describe`; failing to publish one must never fail a
//! reconcile, so errors are logged and dropped here.

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};
use signal_model::SignalPipeline;
use tracing::warn;

/// The API server refuses notes over 1 kB.
const MAX_NOTE_BYTES: usize = 1000;

/// Publishes one event about `pipeline`.
pub async fn publish(
    recorder: &Recorder,
    pipeline: &SignalPipeline,
    type_: EventType,
    reason: &str,
    action: &str,
    note: impl Into<String>,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(truncate(note.into())),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &pipeline.object_ref(&())).await {
        warn!(%error, reason, "cannot publish an event");
    }
}

fn truncate(mut note: String) -> String {
    if note.len() > MAX_NOTE_BYTES {
        let mut cut = MAX_NOTE_BYTES - 3;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    note
}
