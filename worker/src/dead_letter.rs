//! Dead letters: poison messages (and messages on their last allowed delivery whose insert
//! failed) published to the dead-letter subject with headers that say why, then acknowledged so
//! JetStream stops redelivering them.
//!
//! Durable by construction: a dead letter is published through JetStream only, and the original is
//! acknowledged only once the stream that captures the subject has acknowledged it. When no stream
//! captures the subject the original stays held (kept alive, unacknowledged), the worker reports
//! `DeadLetterUnroutable`, and the publish is retried until a stream appears. Each dead letter
//! carries a `Nats-Msg-Id` made of the source stream's identity and the message's sequence, so a
//! re-publish after a crash (published, not yet acknowledged) is dropped by the dead-letter
//! stream's duplicate window: one dead letter per poison message.
//!
//! The original gets a plain `+ACK`, not a `+TERM`: both end its redeliveries, but nats-server
//! answers every `+TERM` with a JSON advisory (built, marshalled and published per message),
//! which on a poisoned stream was a large share of the server's CPU. The dead letter in its
//! stream is the record of what happened.
//!
//! Routing is concurrent: publishes are sent without waiting for each ack, up to
//! [`MAX_IN_FLIGHT`] messages (and about one batch's bytes) in flight or waiting for a retry at
//! once, and the originals are acknowledged as their dead letters are confirmed (every
//! confirmation already in at once). Good messages keep flowing while dead letters wait, until
//! that bound is reached. Letters arrive in groups (the puller hands over what a pull brought,
//! up to 64 at once), so a group may pass the bound by its size; one wake-up of the router then
//! serves many letters.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::{HeaderMap, HeaderName, Subject};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use signal_clients::dead_letter::{HEADER_REASON, HEADER_SEQUENCE, HEADER_STREAM, HEADER_SUBJECT};
use signal_model::worker_health::HealthReason;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::held_messages::HeldMessages;
use crate::metrics::Metrics;

/// Poison label (and reason prefix) of a message dead-lettered on its last allowed delivery.
pub const MAX_DELIVERIES: &str = "max_deliveries";

/// The dead letter's header names, built once: a name given as text is validated and looked up
/// among the standard names on every insert.
const REASON: HeaderName = HeaderName::from_static(HEADER_REASON);
const ORIGINAL_SUBJECT: HeaderName = HeaderName::from_static(HEADER_SUBJECT);
const SEQUENCE: HeaderName = HeaderName::from_static(HEADER_SEQUENCE);
const STREAM: HeaderName = HeaderName::from_static(HEADER_STREAM);

/// Dead letters awaiting their JetStream ack at once.
pub const MAX_IN_FLIGHT: usize = 256;
/// Pause before publishing again the dead letters no stream captured.
const RETRY_UNROUTABLE: Duration = Duration::from_secs(2);

/// A message on its way to the dead-letter subject; its delivery is held meanwhile.
pub struct DeadLetter {
    pub payload: Bytes,
    pub headers: Option<HeaderMap>,
    /// The subject the message was published on.
    pub subject: Subject,
    /// The delivery's ack subject.
    pub reply: Subject,
    pub stream_sequence: u64,
    /// Poison label for the metrics (`wrong_type`, `max_deliveries`, …).
    pub label: &'static str,
    /// The full reason, for the header.
    pub reason: String,
}

impl DeadLetter {
    /// Takes what a dead letter needs from a delivered message.
    pub fn from_message(
        message: &async_nats::Message,
        stream_sequence: u64,
        label: &'static str,
        reason: String,
    ) -> Option<Self> {
        Some(Self {
            payload: message.payload.clone(),
            headers: message.headers.clone(),
            subject: message.subject.clone(),
            reply: message.reply.clone()?,
            stream_sequence,
            label,
            reason,
        })
    }
}

/// The dead-letter message id: the source stream, its creation time (a re-created stream restarts
/// its sequences) and the sequence.
pub fn message_id(stream: &str, stream_created_unix_nanos: i128, sequence: u64) -> String {
    format!("{stream}:{stream_created_unix_nanos}:{sequence}")
}

/// Where poison goes, and what routing it needs.
pub struct DeadLetterRouter {
    /// `None`: the pipeline has no dead-letter subject; poison is acknowledged and counted.
    pub subject: Option<String>,
    pub stream: String,
    pub stream_created_unix_nanos: i128,
    /// Shared, since each publish future owns a handle (a `Context` clone copies its prefix).
    pub jetstream: Arc<jetstream::Context>,
    pub held: Arc<HeldMessages>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    /// Payload bytes in flight at once (at least one message is always let through).
    pub max_bytes_in_flight: usize,
}

type Published = (DeadLetter, Result<(), PublishFailure>);

#[derive(Debug)]
enum PublishFailure {
    /// No stream captures the subject (or the letter can never fit): wait for a person.
    Unroutable(String),
    /// A timeout or a broken connection: retry.
    Transient(String),
}

impl DeadLetterRouter {
    /// Routes letters from `letters` until it closes, waiting for the ones in flight. After
    /// `stop`, letters that cannot be stored are let go, unacknowledged, for redelivery.
    pub async fn run(self, mut letters: mpsc::Receiver<Vec<DeadLetter>>, stop: CancellationToken) {
        // Built once: cloning a `Subject` counts a reference, a `String` would be copied.
        let subject = self.subject.clone().map(Subject::from);
        let mut in_flight: FuturesUnordered<BoxFuture<'static, Published>> =
            FuturesUnordered::new();
        // Payload bytes of the letters in flight or waiting for a retry.
        let mut bytes_held = 0usize;
        let mut waiting: VecDeque<DeadLetter> = VecDeque::new();
        let mut retry = tokio::time::interval(RETRY_UNROUTABLE);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut open, mut stopping) = (true, false);
        loop {
            let count = in_flight.len() + waiting.len();
            let room =
                count < MAX_IN_FLIGHT && (count == 0 || bytes_held < self.max_bytes_in_flight);
            tokio::select! {
                received = letters.recv(), if open && room => match received {
                    Some(received) => {
                        for letter in received {
                            bytes_held += letter.payload.len();
                            in_flight.push(self.publish(&subject, letter));
                        }
                    }
                    None => open = false,
                },
                Some(first) = in_flight.next() => {
                    // Every answer already in is settled with it: one round of acks, one lock.
                    let mut answered = vec![first];
                    while let Some(Some(next)) = in_flight.next().now_or_never() {
                        answered.push(next);
                    }
                    bytes_held -= answered.iter().map(|(l, _)| l.payload.len()).sum::<usize>();
                    for letter in self.settle(answered).await {
                        bytes_held += letter.payload.len();
                        waiting.push_back(letter);
                    }
                }
                _ = retry.tick(), if !stopping && !waiting.is_empty() => {
                    while let Some(letter) = waiting.pop_front() {
                        in_flight.push(self.publish(&subject, letter));
                    }
                }
                _ = stop.cancelled(), if !stopping => stopping = true,
                else => break,
            }
            if stopping && !waiting.is_empty() {
                tracing::warn!(
                    letters = waiting.len(),
                    "dead letters not stored at shutdown; their messages will be redelivered"
                );
                self.held
                    .release(waiting.iter().map(|l| &l.reply), &self.metrics);
                bytes_held -= waiting.iter().map(|l| l.payload.len()).sum::<usize>();
                waiting.clear();
            }
            if !open && in_flight.is_empty() {
                break;
            }
        }
    }

    /// Publishes one letter; resolves once JetStream has answered.
    fn publish(
        &self,
        subject: &Option<Subject>,
        letter: DeadLetter,
    ) -> BoxFuture<'static, Published> {
        let Some(subject) = subject.clone() else {
            return Box::pin(async move { (letter, Ok(())) });
        };
        let mut headers = letter.headers.clone().unwrap_or_default();
        insert_header(&mut headers, REASON, &letter.reason);
        insert_header(&mut headers, ORIGINAL_SUBJECT, letter.subject.as_str());
        headers.insert(SEQUENCE, letter.stream_sequence.to_string());
        insert_header(&mut headers, STREAM, &self.stream);
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            message_id(
                &self.stream,
                self.stream_created_unix_nanos,
                letter.stream_sequence,
            ),
        );
        let jetstream = self.jetstream.clone();
        Box::pin(async move {
            let result = match jetstream
                .publish_with_headers(subject, headers, letter.payload.clone())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()),
                Err(error) => Err(error),
            }
            .map_err(|error| match error.kind() {
                PublishErrorKind::StreamNotFound => PublishFailure::Unroutable(format!(
                    "no JetStream stream captures the dead-letter subject: {error}"
                )),
                PublishErrorKind::MaxPayloadExceeded => PublishFailure::Unroutable(format!(
                    "the dead letter of sequence {} exceeds the server's max_payload: {error}",
                    letter.stream_sequence
                )),
                _ => PublishFailure::Transient(error.to_string()),
            });
            (letter, result)
        })
    }

    /// Acknowledges the originals of the confirmed letters, all at once, and returns the
    /// letters to try again.
    async fn settle(&self, answered: Vec<Published>) -> Vec<DeadLetter> {
        let mut retry = Vec::new();
        let mut stored = Vec::with_capacity(answered.len());
        for (letter, result) in answered {
            match result {
                Ok(()) => stored.push(letter),
                Err(PublishFailure::Unroutable(message)) => {
                    self.metrics.dead_letters_unroutable.inc();
                    self.health
                        .set(HealthReason::DeadLetterUnroutable, &message, &self.metrics);
                    retry.push(letter);
                }
                Err(PublishFailure::Transient(message)) => {
                    tracing::warn!(sequence = letter.stream_sequence, error = %message, "dead-letter publish failed; retrying");
                    retry.push(letter);
                }
            }
        }
        if stored.is_empty() {
            return retry;
        }
        let replies: Vec<Subject> = stored.iter().map(|letter| letter.reply.clone()).collect();
        let failed = self
            .held
            .acknowledge_dead_lettered(&replies, &self.metrics)
            .await;
        if failed > 0 {
            // The dead letters are stored; a redelivery publishes them again under the same
            // message ids, which the stream drops.
            tracing::warn!(failed, "acknowledging dead-lettered messages failed");
        }
        match &self.subject {
            Some(_) => {
                self.metrics
                    .dead_letters_published
                    .inc_by(stored.len() as u64);
                if self.health.has(HealthReason::DeadLetterUnroutable) {
                    self.health
                        .clear(HealthReason::DeadLetterUnroutable, &self.metrics);
                }
                // The dead letter carries the reason and the metrics count it.
                for letter in &stored {
                    tracing::debug!(sequence = letter.stream_sequence, reason = %letter.reason, "message dead-lettered");
                }
            }
            None => {
                for letter in &stored {
                    tracing::warn!(
                        sequence = letter.stream_sequence,
                        reason = %letter.reason,
                        "poison message acknowledged without a dead letter (no dead-letter subject)"
                    );
                }
            }
        }
        retry
    }
}

fn insert_header(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    // Header values cannot hold line breaks.
    if value.bytes().any(|byte| byte == b'\r' || byte == b'\n') {
        headers.insert(name, value.replace(['\r', '\n'], " ").as_str());
    } else {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_tell_streams_incarnations_and_sequences_apart() {
        let id = message_id("SIGNALS", 1_700_000_000_000_000_000, 42);
        assert_eq!(id, "SIGNALS:1700000000000000000:42");
        assert_ne!(id, message_id("SIGNALS", 1_700_000_000_000_000_001, 42));
        assert_ne!(id, message_id("SIGNALS", 1_700_000_000_000_000_000, 43));
    }
}
