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
//!
//! The router does JetStream's publish protocol itself, on one reply subscription of its own
//! (`<inbox>.<token>`, a token per publish): JetStream answers a publish to a stream's subject with
//! an acknowledgement or an error, and the server answers with a no-responders status when no
//! stream captures it. The client library's publish costs a new inbox, a one-shot channel, two
//! timers and an untagged parse per message, which on a poisoned stream was a third of the
//! worker's CPU per dead letter; here a letter costs a map entry, and one timer serves them all
//! ([`ACK_TIMEOUT`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_nats::client::PublishErrorKind;
use async_nats::{HeaderMap, HeaderName, StatusCode, Subject};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use signal_clients::dead_letter::{HEADER_REASON, HEADER_SEQUENCE, HEADER_STREAM, HEADER_SUBJECT};
use signal_model::worker_health::HealthReason;
use tokio::sync::mpsc;
use tokio::time::Instant;
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
/// Pause before publishing again the dead letters no stream captured (or whose publish failed).
const RETRY_UNROUTABLE: Duration = Duration::from_secs(2);
/// How long a dead letter waits for JetStream's answer before it is published again, under the
/// same message id: a late first copy and the second are stored as one dead letter.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

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
    pub client: async_nats::Client,
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
    /// A timeout, a JetStream error or a broken connection: retry.
    Transient(String),
}

/// JetStream's answer to a publish: an acknowledgement (`{"stream":…,"seq":…}`) or an error.
#[derive(Deserialize)]
struct PublishAnswer {
    #[serde(default)]
    error: Option<PublishAnswerError>,
}

#[derive(Deserialize)]
struct PublishAnswerError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    description: String,
}

/// What a reply to a dead letter's publish says.
fn read_answer(status: Option<StatusCode>, payload: &[u8]) -> Result<(), PublishFailure> {
    if status == Some(StatusCode::NO_RESPONDERS) {
        return Err(PublishFailure::Unroutable(
            "no JetStream stream captures the dead-letter subject".into(),
        ));
    }
    match serde_json::from_slice::<PublishAnswer>(payload) {
        Ok(PublishAnswer { error: None }) => Ok(()),
        Ok(PublishAnswer { error: Some(error) }) => Err(PublishFailure::Transient(format!(
            "JetStream refused the dead letter ({}): {}",
            error.code, error.description
        ))),
        Err(error) => Err(PublishFailure::Transient(format!(
            "unreadable answer to a dead letter's publish: {error}"
        ))),
    }
}

/// The publishes awaiting JetStream's answer, by the token that ends their reply subject.
struct InFlight {
    /// `<inbox>.`: a publish's reply subject is this and its token.
    reply_prefix: String,
    next_token: u64,
    letters: HashMap<u64, (DeadLetter, Instant), foldhash::fast::RandomState>,
}

impl InFlight {
    fn len(&self) -> usize {
        self.letters.len()
    }

    fn is_empty(&self) -> bool {
        self.letters.is_empty()
    }

    /// The letter a reply on `subject` answers, if it is still waited for (an answer that came
    /// after its letter timed out is dropped: the letter has been published again).
    fn answered(&mut self, subject: &str) -> Option<DeadLetter> {
        let token = subject
            .strip_prefix(self.reply_prefix.as_str())?
            .parse()
            .ok()?;
        self.letters.remove(&token).map(|(letter, _)| letter)
    }

    /// The letters sent more than [`ACK_TIMEOUT`] ago.
    fn timed_out(&mut self, now: Instant) -> Vec<DeadLetter> {
        self.letters
            .extract_if(|_, (_, sent)| now.duration_since(*sent) >= ACK_TIMEOUT)
            .map(|(_, (letter, _))| letter)
            .collect()
    }
}

impl DeadLetterRouter {
    /// Routes letters from `letters` until it closes, waiting for the ones in flight. After
    /// `stop`, letters that cannot be stored are let go, unacknowledged, for redelivery.
    pub async fn run(self, mut letters: mpsc::Receiver<Vec<DeadLetter>>, stop: CancellationToken) {
        // Built once: cloning a `Subject` counts a reference, a `String` would be copied.
        let subject = self.subject.clone().map(Subject::from);
        let inbox = self.client.new_inbox();
        let mut answers = match self.client.subscribe(format!("{inbox}.*")).await {
            Ok(answers) => answers,
            Err(error) => {
                // Only a closed client refuses a subscription: the worker is stopping.
                tracing::error!(%error, "dead-letter router cannot subscribe to its answers");
                while let Some(received) = letters.recv().await {
                    self.held
                        .release(received.iter().map(|l| &l.reply), &self.metrics);
                }
                return;
            }
        };
        let mut in_flight = InFlight {
            reply_prefix: format!("{inbox}."),
            next_token: 0,
            letters: HashMap::default(),
        };
        // Payload bytes of the letters in flight or waiting for a retry.
        let mut bytes_held = 0usize;
        let mut waiting: VecDeque<DeadLetter> = VecDeque::new();
        let mut retry = tokio::time::interval(RETRY_UNROUTABLE);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut timeouts = tokio::time::interval(ACK_TIMEOUT / 5);
        timeouts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut open, mut stopping) = (true, false);
        loop {
            let count = in_flight.len() + waiting.len();
            let room =
                count < MAX_IN_FLIGHT && (count == 0 || bytes_held < self.max_bytes_in_flight);
            // Letters settled in this turn: answered, timed out, or failed at once.
            let mut answered: Vec<Published> = Vec::new();
            tokio::select! {
                received = letters.recv(), if open && room => match received {
                    Some(received) => {
                        for letter in received {
                            bytes_held += letter.payload.len();
                            if let Some(failed) = self.publish(&subject, letter, &mut in_flight).await {
                                answered.push(failed);
                            }
                        }
                    }
                    None => open = false,
                },
                Some(first) = answers.next(), if !in_flight.is_empty() => {
                    // Every answer already in is settled with it: one round of acks, one lock.
                    let mut replies = vec![first];
                    while let Some(Some(next)) = answers.next().now_or_never() {
                        replies.push(next);
                    }
                    for reply in replies {
                        if let Some(letter) = in_flight.answered(reply.subject.as_str()) {
                            let result = read_answer(reply.status, &reply.payload);
                            answered.push((letter, result));
                        }
                    }
                }
                now = timeouts.tick(), if !in_flight.is_empty() => {
                    for letter in in_flight.timed_out(now) {
                        let failure = PublishFailure::Transient(format!(
                            "no answer from JetStream within {} s",
                            ACK_TIMEOUT.as_secs()
                        ));
                        answered.push((letter, Err(failure)));
                    }
                }
                _ = retry.tick(), if !stopping && !waiting.is_empty() => {
                    while let Some(letter) = waiting.pop_front() {
                        if let Some(failed) = self.publish(&subject, letter, &mut in_flight).await {
                            answered.push(failed);
                        }
                    }
                }
                _ = stop.cancelled(), if !stopping => stopping = true,
                else => break,
            }
            if !answered.is_empty() {
                bytes_held -= answered.iter().map(|(l, _)| l.payload.len()).sum::<usize>();
                for letter in self.settle(answered).await {
                    bytes_held += letter.payload.len();
                    waiting.push_back(letter);
                }
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

    /// Publishes one letter with its reply subject, to be answered on the router's subscription;
    /// returns the letter at once when it is settled without an answer (no dead-letter subject)
    /// or cannot be sent.
    async fn publish(
        &self,
        subject: &Option<Subject>,
        letter: DeadLetter,
        in_flight: &mut InFlight,
    ) -> Option<Published> {
        let Some(subject) = subject.clone() else {
            return Some((letter, Ok(())));
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
        let token = in_flight.next_token;
        in_flight.next_token += 1;
        let reply = format!("{}{token}", in_flight.reply_prefix);
        match self
            .client
            .publish_with_reply_and_headers(subject, reply, headers, letter.payload.clone())
            .await
        {
            Ok(()) => {
                in_flight.letters.insert(token, (letter, Instant::now()));
                None
            }
            Err(error) => {
                let failure = match error.kind() {
                    PublishErrorKind::MaxPayloadExceeded => PublishFailure::Unroutable(format!(
                        "the dead letter of sequence {} exceeds the server's max_payload: {error}",
                        letter.stream_sequence
                    )),
                    _ => PublishFailure::Transient(error.to_string()),
                };
                Some((letter, Err(failure)))
            }
        }
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
        let failed = self.held.acknowledge_done(&replies, &self.metrics).await;
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
    fn answers_to_a_publish_are_read_as_stored_unroutable_or_retry() {
        assert!(read_answer(None, br#"{"stream":"DLQ","seq":7}"#).is_ok());
        assert!(read_answer(None, br#"{"stream":"DLQ","seq":7,"duplicate":true}"#).is_ok());
        assert!(matches!(
            read_answer(Some(StatusCode::NO_RESPONDERS), b""),
            Err(PublishFailure::Unroutable(_))
        ));
        match read_answer(
            None,
            br#"{"error":{"code":503,"err_code":10077,"description":"resource limits exceeded"}}"#,
        ) {
            Err(PublishFailure::Transient(message)) => {
                assert!(message.contains("resource limits exceeded"), "{message}")
            }
            other => panic!("a JetStream error is retried: {other:?}"),
        }
        assert!(matches!(
            read_answer(None, b"not json"),
            Err(PublishFailure::Transient(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn answers_find_their_letters_by_token_and_unanswered_letters_time_out() {
        let letter = |sequence| DeadLetter {
            payload: Bytes::from_static(b"x"),
            headers: None,
            subject: Subject::from("in"),
            reply: Subject::from(format!("$JS.ACK.S.C.1.{sequence}.{sequence}.0.0")),
            stream_sequence: sequence,
            label: "not_json",
            reason: String::new(),
        };
        let mut in_flight = InFlight {
            reply_prefix: "_INBOX.abc.".into(),
            next_token: 0,
            letters: HashMap::default(),
        };
        in_flight.letters.insert(1, (letter(10), Instant::now()));
        tokio::time::advance(ACK_TIMEOUT / 2).await;
        in_flight.letters.insert(2, (letter(11), Instant::now()));
        assert!(
            in_flight.answered("_INBOX.other.1").is_none(),
            "another inbox"
        );
        assert!(in_flight.answered("_INBOX.abc.x").is_none(), "not a token");
        tokio::time::advance(ACK_TIMEOUT / 2).await;
        let expired = in_flight.timed_out(Instant::now());
        assert_eq!(
            expired
                .iter()
                .map(|l| l.stream_sequence)
                .collect::<Vec<_>>(),
            [10]
        );
        assert!(
            in_flight.answered("_INBOX.abc.1").is_none(),
            "a late answer is dropped"
        );
        assert_eq!(
            in_flight
                .answered("_INBOX.abc.2")
                .map(|l| l.stream_sequence),
            Some(11)
        );
        assert!(in_flight.is_empty());
    }

    #[test]
    fn message_ids_tell_streams_incarnations_and_sequences_apart() {
        let id = message_id("SIGNALS", 1_700_000_000_000_000_000, 42);
        assert_eq!(id, "SIGNALS:1700000000000000000:42");
        assert_ne!(id, message_id("SIGNALS", 1_700_000_000_000_000_001, 42));
        assert_ne!(id, message_id("SIGNALS", 1_700_000_000_000_000_000, 43));
    }
}
