//! Pulling from the JetStream consumer and filling batches.
//!
//! The puller fetches up to a batch's remaining rows and bytes at a time, encodes each message
//! into the batch (or sends it to the dead letters), and hands a due batch to the writer.
//! Hand-over is a rendezvous: the writer asks for its next batch only when the previous one is
//! stored, so while ClickHouse is down the puller holds one batch and stops fetching. Every message
//! pulled is held (kept alive with progress acks) until it is settled ([`crate::held_messages`]).
//!
//! A pull asks for the rows the batch still needs plus the poison expected among them
//! ([`PoisonShare`]): on a poisoned stream a batch then fills in one pull, not in a tail of ever
//! smaller ones (each a request, a subscription and a round trip while the writer waits).
//!
//! Memory: a pull asks for at most the bytes the batch being filled still has room for (but at
//! least one message of the server's `max_payload`), so the puller holds about one batch's
//! `maxBytes` and the writer one more (README, "Memory").

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::{FutureExt, StreamExt};
use signal_clients::retry::Backoff;
use signal_model::partitions::PartitionScheme;
use signal_model::row_encoder::{HeaderLookup, MessageMeta, RowEncoder};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, BatchLimits, SealedBatch};
use crate::cache::CacheLayout;
use crate::dead_letter::{DeadLetter, MAX_DELIVERIES};
use crate::held_messages::HeldMessages;
use crate::metrics::Metrics;

/// The writer's request for its next batch.
pub struct BatchRequest {
    pub reply: oneshot::Sender<SealedBatch>,
    /// The buffer of the batch the writer stored last, for the puller to fill again.
    pub spare_rows: Option<Vec<u8>>,
}

/// Asks the puller for its next batch, handing back `spare_rows` (the stored batch's buffer) to
/// fill; `None` once the puller has stopped (it drops the reply when it stops without a batch).
pub async fn next_batch(
    requests: &mpsc::Sender<BatchRequest>,
    spare_rows: Option<Vec<u8>>,
) -> Option<SealedBatch> {
    let (reply, batch) = oneshot::channel();
    requests
        .send(BatchRequest { reply, spare_rows })
        .await
        .ok()?;
    batch.await.ok()
}

/// Shortest pull request; the server needs some time to answer one.
const MIN_EXPIRES: Duration = Duration::from_millis(20);
/// Most dead letters the puller gathers before handing them to the router at once (it hands
/// them over anyway when a pull ends and before a batch is handed over): one wake-up of the
/// router for many letters rather than one each.
const LETTERS_PER_HAND_OVER: usize = 64;
/// How long after a pull request's expiry the puller stops waiting for its end. nats-server does
/// not always answer a short, partly filled request with its expiry status, and the client library
/// then waits 5 s more, holding a due batch. Messages already received are still taken first.
const PULL_END_SLACK: Duration = Duration::from_millis(250);

/// The share of poison among the messages processed lately (a moving average over about the last
/// thousand), which sizes pulls.
#[derive(Debug, Default)]
struct PoisonShare(f64);

impl PoisonShare {
    /// Weight of one message in the average.
    const WEIGHT: f64 = 1.0 / 1024.0;
    /// The most poison a pull is sized for: a stream mostly poison takes more than one pull per
    /// batch rather than pulls far larger than a batch.
    const MAX: f64 = 0.5;
    /// Below this share (one in ten thousand) pulls are not enlarged.
    const NEGLIGIBLE: f64 = 1e-4;

    fn observe(&mut self, poison: bool) {
        let sample = if poison { 1.0 } else { 0.0 };
        self.0 += (sample - self.0) * Self::WEIGHT;
    }

    /// Messages to pull for `rows` more rows: the expected poison among them, and two standard
    /// deviations of it, on top. Messages beyond the batch start the next one.
    fn messages_for_rows(&self, rows: usize) -> usize {
        if self.0 < Self::NEGLIGIBLE {
            return rows;
        }
        let share = self.0.min(Self::MAX);
        let rows = rows as f64;
        let poison = rows * share / (1.0 - share);
        let spread = 2.0 * (poison * (1.0 - share)).sqrt();
        (rows + poison + spread).ceil() as usize
    }
}

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
    /// Bytes a pull may deliver at least: one message of the server's largest size, so that
    /// no message is too big to be delivered (then dead-lettered as too large).
    pub min_pull_bytes: usize,
    /// The consumer's `max_deliver` (-1: unlimited).
    pub max_deliver: i64,
    pub dead_letters: mpsc::Sender<Vec<DeadLetter>>,
    pub held: Arc<HeldMessages>,
    pub metrics: Arc<Metrics>,
    /// Partitioned consumers: `@subject` is the published subject, without the partition prefix.
    pub partitioned: bool,
}

enum Step {
    /// Go on with a new batch, in the writer's spare buffer when it gave one back.
    Continue(Option<Vec<u8>>),
    Stop,
}

/// What became of one message.
#[derive(Default)]
struct Processed {
    /// The message is poison: its dead letter.
    letter: Option<DeadLetter>,
    /// The server had nothing more for the consumer when it delivered the message.
    caught_up: bool,
}

/// Whether a partial batch is handed over at once rather than at `maxWait`: the consumer has
/// caught up with the stream and the batch before this one was full, so this one ends a burst
/// (the end of a backlog, the tail of a poisoned stream) and nothing more is coming soon. A
/// trickle still waits `maxWait` (its batches are not full), so this adds at most one insert per
/// full batch.
fn ends_burst(caught_up: bool, previous_full: bool, batch: &Batch) -> bool {
    caught_up && previous_full && !batch.is_empty()
}

/// A pull request's message stream, and whether it may still deliver.
struct OpenPull {
    messages: jetstream::consumer::pull::Batch,
    open: bool,
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
        let new_batch = |spare_rows: Option<Vec<u8>>| match spare_rows {
            Some(rows) => Batch::with_buffer(rows),
            None => Batch::with_capacity(self.limits.max_bytes.min(16 << 20)),
        };
        let mut batch = new_batch(None);
        let mut pending: VecDeque<jetstream::Message> = VecDeque::new();
        let mut letters: Vec<DeadLetter> = Vec::new();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        // Whether the batch handed over last was full: the stream was flowing faster than
        // batches fill, so the batch that catches up with it ends a burst (see `ends_burst`).
        let mut previous_full = false;
        let mut poison_share = PoisonShare::default();
        while !shutdown.is_cancelled() {
            let expires = match batch.deadline(&self.limits) {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => self.limits.max_wait,
            }
            .max(MIN_EXPIRES);
            let wanted = poison_share
                .messages_for_rows(self.limits.max_rows.saturating_sub(batch.len()).max(1));
            // The memory bound: a pull delivers at most what the batch still has room for.
            let max_bytes = self
                .limits
                .max_bytes
                .saturating_sub(batch.bytes())
                .max(self.min_pull_bytes);
            let fetch = self
                .consumer
                .batch()
                .max_messages(wanted)
                .max_bytes(max_bytes)
                .expires(expires)
                .messages();
            let messages = match fetch.await {
                Ok(messages) => {
                    self.metrics.pull_requests.inc();
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
            let mut pull = OpenPull {
                messages,
                open: true,
            };
            let pull_ends = tokio::time::Instant::now() + expires + PULL_END_SLACK;
            loop {
                // Messages delivered while a batch was handed over come first, in order.
                let message = match pending.pop_front() {
                    Some(message) => message,
                    None if !pull.open => break,
                    None => {
                        let next = tokio::select! {
                            // Buffered messages first: a pull ends only once it has nothing left.
                            biased;
                            next = pull.messages.next() => next,
                            _ = tokio::time::sleep_until(pull_ends) => None,
                            _ = shutdown.cancelled() => None,
                        };
                        match self.receive_ready(next, &mut pull, &mut pending) {
                            Some(message) => message,
                            None => {
                                pull.open = false;
                                break;
                            }
                        }
                    }
                };
                let processed = self.process(&mut batch, message, &wanted_texts, &mut texts);
                poison_share.observe(processed.letter.is_some());
                if let Some(letter) = processed.letter {
                    letters.push(letter);
                }
                // Caught up, the last letters go now rather than when the pull expires.
                if letters.len() >= LETTERS_PER_HAND_OVER
                    || (processed.caught_up && !letters.is_empty())
                {
                    self.send_letters(&mut letters, &mut pull, &mut pending)
                        .await;
                }
                let full = batch.is_full(&self.limits);
                if full || ends_burst(processed.caught_up, previous_full, &batch) {
                    // Dead letters do not wait for the writer, which may be stuck on ClickHouse.
                    self.send_letters(&mut letters, &mut pull, &mut pending)
                        .await;
                    batch = match self
                        .hand_over(batch, &mut requests, Some(&mut pull), &mut pending)
                        .await
                    {
                        Step::Continue(spare_rows) => new_batch(spare_rows),
                        Step::Stop => return self.let_go(&pending, &letters),
                    };
                    previous_full = full;
                }
            }
            self.send_letters(&mut letters, &mut pull, &mut pending)
                .await;
            if shutdown.is_cancelled() && batch.is_empty() {
                break;
            }
            let due = batch
                .deadline(&self.limits)
                .is_some_and(|d| Instant::now() >= d);
            if !batch.is_empty() && (due || shutdown.is_cancelled()) {
                batch = match self
                    .hand_over(batch, &mut requests, None, &mut pending)
                    .await
                {
                    Step::Continue(spare_rows) => new_batch(spare_rows),
                    Step::Stop => return self.let_go(&pending, &letters),
                };
                previous_full = false;
            }
        }
        self.let_go(&pending, &letters);
    }

    /// At shutdown, what was pulled but not batched (or not handed to the router) goes back to
    /// JetStream by redelivery.
    fn let_go(&self, pending: &VecDeque<jetstream::Message>, letters: &[DeadLetter]) {
        self.held.release(
            pending
                .iter()
                .filter_map(|m| m.reply.as_ref())
                .chain(letters.iter().map(|l| &l.reply)),
            &self.metrics,
        );
    }

    /// Takes one item of a pull: a message is held (kept alive) from here on.
    fn receive(
        &self,
        next: Option<Result<jetstream::Message, impl std::fmt::Display>>,
    ) -> Option<jetstream::Message> {
        match next? {
            Ok(message) => {
                self.metrics.messages_received.inc();
                if let Some(reply) = &message.reply {
                    self.held.hold(reply, message.payload.len(), &self.metrics);
                }
                Some(message)
            }
            Err(error) => {
                tracing::debug!(%error, "pull request ended");
                None
            }
        }
    }

    /// Takes one item of a pull and every message the pull has already received after it
    /// (those go to `pending`, in order), and holds them all at once: one lock per wake-up rather
    /// than one per message. Returns the first message.
    fn receive_ready(
        &self,
        next: Option<Result<jetstream::Message, impl std::fmt::Display>>,
        pull: &mut OpenPull,
        pending: &mut VecDeque<jetstream::Message>,
    ) -> Option<jetstream::Message> {
        let first = match next? {
            Ok(message) => message,
            Err(error) => {
                tracing::debug!(%error, "pull request ended");
                return None;
            }
        };
        let already = pending.len();
        while let Some(next) = pull.messages.next().now_or_never() {
            match next {
                Some(Ok(message)) => pending.push_back(message),
                Some(Err(error)) => {
                    tracing::debug!(%error, "pull request ended");
                    pull.open = false;
                    break;
                }
                None => {
                    pull.open = false;
                    break;
                }
            }
        }
        let received = std::iter::once(&first).chain(pending.range(already..));
        self.metrics
            .messages_received
            .inc_by(1 + (pending.len() - already) as u64);
        self.held.hold_all(
            received.filter_map(|m| Some((m.reply.as_ref()?, m.payload.len()))),
            &self.metrics,
        );
        Some(first)
    }

    /// Hands the dead letters gathered so far to the router, all at once. While the router is
    /// full, what the pull still delivers is held (kept alive) in `pending`. When the router has
    /// stopped, the letters are let go for redelivery.
    async fn send_letters(
        &self,
        letters: &mut Vec<DeadLetter>,
        pull: &mut OpenPull,
        pending: &mut VecDeque<jetstream::Message>,
    ) {
        if letters.is_empty() {
            return;
        }
        loop {
            tokio::select! {
                // `reserve` is cancel-safe: the letters are not lost when the pull wins.
                permit = self.dead_letters.reserve() => {
                    let letters = std::mem::take(letters);
                    match permit {
                        Ok(permit) => permit.send(letters),
                        Err(_) => {
                            tracing::warn!("dead-letter router stopped; poison left for redelivery");
                            self.held.release(letters.iter().map(|l| &l.reply), &self.metrics);
                        }
                    }
                    return;
                }
                next = pull.messages.next(), if pull.open => match self.receive(next) {
                    Some(message) => pending.push_back(message),
                    None => pull.open = false,
                },
            }
        }
    }

    /// Encodes one message into the batch, or returns it as a dead letter.
    fn process(
        &self,
        batch: &mut Batch,
        message: jetstream::Message,
        wanted_texts: &[usize],
        texts: &mut Vec<String>,
    ) -> Processed {
        let (sequence, timestamp_nanos, delivered, caught_up) = match message.info() {
            Ok(info) => {
                self.metrics.consumer_lag.set(info.pending);
                (
                    info.stream_sequence,
                    i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(i64::MAX),
                    info.delivered,
                    info.pending == 0,
                )
            }
            Err(error) => {
                // Without JetStream metadata the message cannot be acknowledged or placed; skip it.
                tracing::warn!(%error, subject = %message.subject, "message without JetStream metadata skipped");
                if let Some(reply) = &message.reply {
                    self.held.release([reply], &self.metrics);
                }
                return Processed::default();
            }
        };
        let Some(reply) = message.reply.clone() else {
            return Processed::default();
        };
        let encoded = {
            let headers = message.headers.as_ref().map(Headers);
            let meta = MessageMeta {
                subject: if self.partitioned {
                    PartitionScheme::published_subject(message.subject.as_str())
                } else {
                    message.subject.as_str()
                },
                stream_sequence: sequence,
                timestamp_nanos,
                headers: headers.as_ref().map(|h| h as &dyn HeaderLookup),
            };
            match &self.cache {
                Some(_) => self.encoder.encode_with_texts(
                    &message.payload,
                    &meta,
                    batch.buffer(),
                    wanted_texts,
                    texts,
                ),
                None => self.encoder.encode(&message.payload, &meta, batch.buffer()),
            }
        };
        match encoded {
            Ok(()) => {
                if let Some(layout) = &self.cache {
                    let (key, entry) = layout.entry(texts, sequence);
                    batch.cache(key, entry);
                }
                // On its last allowed delivery a message keeps what its dead letter needs, in
                // case the insert fails (README, "maxDeliver").
                let last_delivery = (self.max_deliver > 0 && delivered >= self.max_deliver)
                    .then(|| {
                        DeadLetter::from_message(&message, sequence, MAX_DELIVERIES, String::new())
                    })
                    .flatten();
                batch.push(reply, sequence, message.payload.len(), last_delivery);
                Processed {
                    letter: None,
                    caught_up,
                }
            }
            Err(reason) => {
                self.metrics.count_poison(reason.label());
                Processed {
                    letter: DeadLetter::from_message(
                        &message,
                        sequence,
                        reason.label(),
                        reason.to_string(),
                    ),
                    caught_up,
                }
            }
        }
    }

    /// Waits for the writer to ask for a batch. Messages the pull still delivers meanwhile are
    /// held (kept alive) in `pending` for the next batch.
    async fn hand_over(
        &self,
        batch: Batch,
        requests: &mut mpsc::Receiver<BatchRequest>,
        mut pull: Option<&mut OpenPull>,
        pending: &mut VecDeque<jetstream::Message>,
    ) -> Step {
        loop {
            let pulling = pull.as_ref().is_some_and(|p| p.open);
            tokio::select! {
                request = requests.recv() => {
                    let Some(request) = request else { return Step::Stop };
                    // A writer gone before taking its batch leaves the messages to redelivery.
                    return match request.reply.send(batch.seal()) {
                        Ok(()) => Step::Continue(request.spare_rows),
                        Err(_) => Step::Stop,
                    };
                }
                next = async {
                    match pull.as_mut() {
                        Some(pull) => pull.messages.next().await,
                        None => None,
                    }
                }, if pulling => {
                    match self.receive(next) {
                        Some(message) => pending.push_back(message),
                        None => {
                            if let Some(pull) = pull.as_mut() {
                                pull.open = false;
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulls_are_sized_for_the_poison_seen_lately() {
        let mut share = PoisonShare::default();
        assert_eq!(
            share.messages_for_rows(10_000),
            10_000,
            "a clean stream pulls exactly the rows the batch needs"
        );
        for index in 0..20_000 {
            share.observe(index % 5 == 0);
        }
        let wanted = share.messages_for_rows(10_000);
        assert!(
            (12_500..12_700).contains(&wanted),
            "20% poison: 10,000 rows need 12,500 messages and a margin, not {wanted}"
        );
        assert!(
            share.messages_for_rows(1) >= 2,
            "one row on a poisoned stream"
        );
        for _ in 0..20_000 {
            share.observe(true);
        }
        assert!(
            share.messages_for_rows(10_000) < 20_300,
            "all poison: at most about twice the rows"
        );
        for _ in 0..20_000 {
            share.observe(false);
        }
        assert_eq!(share.messages_for_rows(10_000), 10_000, "the share decays");
    }

    #[test]
    fn only_a_caught_up_batch_after_a_full_one_ends_a_burst() {
        let mut batch = Batch::with_capacity(16);
        assert!(
            !ends_burst(true, true, &batch),
            "an empty batch has nothing to insert"
        );
        batch.buffer().push(1);
        batch.push(async_nats::Subject::from("ack.1"), 1, 1, None);
        assert!(ends_burst(true, true, &batch));
        assert!(
            !ends_burst(false, true, &batch),
            "more messages are pending"
        );
        assert!(
            !ends_burst(true, false, &batch),
            "a trickle still batches for maxWait"
        );
    }
}
