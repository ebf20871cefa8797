//! Pulling from the JetStream consumer and filling batches.
//!
//! The puller fetches up to a batch's remaining rows at a time, encodes each message into the
//! batch (or routes it as poison), and hands a due batch to the writer. Hand-over is a rendezvous:
//! the writer asks for its next batch only when the previous one is stored, so while ClickHouse is
//! down the puller holds one batch, stops fetching, and keeps its messages alive with progress acks.
//! Memory is bounded by two batches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use signal_clients::retry::Backoff;
use signal_model::row_encoder::{HeaderLookup, MessageMeta, RowEncoder};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, BatchLimits, SealedBatch};
use crate::cache::CacheLayout;
use crate::clickhouse_sink::send_progress;
use crate::dead_letter::{DeadLetters, PoisonMessage};
use crate::metrics::Metrics;

/// The writer's request for its next batch.
pub type BatchRequest = oneshot::Sender<SealedBatch>;

/// Shortest pull request; the server needs some time to answer one.
const MIN_EXPIRES: Duration = Duration::from_millis(20);
/// How long after a pull request's expiry the puller stops waiting for its end. nats-server does
/// not always answer a short, partly filled request with its expiry status, and the client library
/// then waits 5 s more, holding a due batch. Messages already received are still taken first.
const PULL_END_SLACK: Duration = Duration::from_millis(250);

/// NATS headers seen through the encoder's lookup trait.
struct Headers<'a>(&'a async_nats::HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|value| value.as_str())
    }
}

/// Everything the puller needs.
pub struct Puller {
    pub consumer: PullConsumer,
    pub encoder: RowEncoder,
    pub cache: Option<CacheLayout>,
    pub limits: BatchLimits,
    pub dead_letters: DeadLetters,
    pub progress_interval: Duration,
    pub metrics: Arc<Metrics>,
}

enum Step {
    Continue,
    Stop,
}

impl Puller {
    /// Runs until `shutdown`; the batch in progress is then handed over before it returns.
    pub async fn run(
        self,
        mut requests: mpsc::Receiver<BatchRequest>,
        shutdown: CancellationToken,
    ) {
        let wanted_texts: Vec<usize> = self
            .cache
            .as_ref()
            .map(|layout| {
                layout
                    .key_columns
                    .iter()
                    .chain(&layout.fields)
                    .map(|(_, i)| *i)
                    .collect()
            })
            .unwrap_or_default();
        let mut texts = Vec::new();
        let mut batch = Batch::with_capacity(self.limits.max_bytes.min(16 << 20));
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while !shutdown.is_cancelled() {
            let expires = match batch.deadline(&self.limits) {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => self.limits.max_wait,
            }
            .max(MIN_EXPIRES);
            let wanted = self.limits.max_rows.saturating_sub(batch.len()).max(1);
            let fetch = self
                .consumer
                .batch()
                .max_messages(wanted)
                .expires(expires)
                .messages();
            let mut messages = match fetch.await {
                Ok(messages) => {
                    backoff.reset();
                    messages
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "pull request failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    continue;
                }
            };
            let pull_ends = tokio::time::Instant::now() + expires + PULL_END_SLACK;
            loop {
                let next = tokio::select! {
                    // Buffered messages first: a pull ends only once it has nothing left to give.
                    biased;
                    next = messages.next() => next,
                    _ = tokio::time::sleep_until(pull_ends) => None,
                    _ = shutdown.cancelled() => None,
                };
                let Some(next) = next else { break };
                let message = match next {
                    Ok(message) => message,
                    Err(error) => {
                        tracing::debug!(%error, "pull request ended");
                        break;
                    }
                };
                self.metrics.messages_received.inc();
                if let Some(poison) = self.add(&mut batch, message, &wanted_texts, &mut texts) {
                    self.route_poison(poison).await;
                }
                if batch.is_full(&self.limits) {
                    batch = match self.hand_over(batch, &mut requests).await {
                        Step::Continue => Batch::with_capacity(self.limits.max_bytes.min(16 << 20)),
                        Step::Stop => return,
                    };
                }
            }
            let due = batch
                .deadline(&self.limits)
                .is_some_and(|d| Instant::now() >= d);
            if !batch.is_empty() && (due || shutdown.is_cancelled()) {
                batch = match self.hand_over(batch, &mut requests).await {
                    Step::Continue => Batch::with_capacity(self.limits.max_bytes.min(16 << 20)),
                    Step::Stop => return,
                };
            }
        }
    }

    /// Encodes one message into the batch, or returns it as poison.
    fn add(
        &self,
        batch: &mut Batch,
        message: jetstream::Message,
        wanted_texts: &[usize],
        texts: &mut Vec<String>,
    ) -> Option<PoisonMessage> {
        let (sequence, timestamp_nanos) = match message.info() {
            Ok(info) => {
                self.metrics.consumer_lag.set(info.pending);
                (
                    info.stream_sequence,
                    i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(i64::MAX),
                )
            }
            Err(error) => {
                // Without JetStream metadata the message cannot be acknowledged or placed; skip it.
                tracing::warn!(%error, subject = %message.subject, "message without JetStream metadata skipped");
                return None;
            }
        };
        let headers = message.headers.as_ref().map(Headers);
        let meta = MessageMeta {
            subject: message.subject.as_str(),
            stream_sequence: sequence,
            timestamp_nanos,
            headers: headers.as_ref().map(|h| h as &dyn HeaderLookup),
        };
        let encoded = match &self.cache {
            Some(_) => self.encoder.encode_with_texts(
                &message.payload,
                &meta,
                batch.buffer(),
                wanted_texts,
                texts,
            ),
            None => self.encoder.encode(&message.payload, &meta, batch.buffer()),
        };
        match encoded {
            Ok(()) => {
                if let Some(layout) = &self.cache {
                    let (key, entry) = layout.entry(texts, sequence);
                    batch.cache(key, entry);
                }
                let (_, acker) = message.split();
                batch.push(acker, sequence);
                None
            }
            Err(reason) => Some(PoisonMessage {
                message,
                stream_sequence: sequence,
                reason,
            }),
        }
    }

    async fn route_poison(&self, poison: PoisonMessage) {
        let label = poison.reason.label();
        let sequence = poison.stream_sequence;
        let reason = poison.reason.to_string();
        self.metrics.count_poison(label);
        match self.dead_letters.route(poison).await {
            Ok(()) if self.dead_letters.subject.is_some() => {
                self.metrics.dead_letters_published.inc();
                // The dead letter carries the reason and the metrics count it: no log line each.
                tracing::debug!(sequence, %reason, "poison message sent to the dead-letter subject");
            }
            Ok(()) => {
                tracing::warn!(sequence, %reason, "poison message terminated (no dead-letter subject)")
            }
            Err(error) => tracing::warn!(sequence, %error, "poison message left for redelivery"),
        }
    }

    /// Waits for the writer to ask for a batch, keeping the batch's messages alive meanwhile.
    async fn hand_over(&self, batch: Batch, requests: &mut mpsc::Receiver<BatchRequest>) -> Step {
        let mut progress = tokio::time::interval(self.progress_interval);
        progress.tick().await;
        loop {
            tokio::select! {
                request = requests.recv() => {
                    return match request.map(|request| request.send(batch.seal())) {
                        Some(Ok(())) => Step::Continue,
                        _ => Step::Stop,
                    };
                }
                _ = progress.tick() => send_progress(batch.acks()).await,
            }
        }
    }
}
