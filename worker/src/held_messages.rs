//! Every message the worker holds, kept alive until it is settled.
//!
//! A message is held from the moment a pull hands it to the worker until it is acknowledged
//! (stored or dead-lettered) or let go (shutdown). While held, it gets an in-progress
//! ack (`+WPI`) every third of the ack wait, whatever the worker is doing with it: buffered from a
//! pull, in the batch being filled, waiting for the writer, in an insert attempt, or waiting for
//! its dead letter to be confirmed. So JetStream redelivers a message only when the worker that
//! held it is gone, never because an insert or a publish was slow.
//!
//! The registry also counts the payload bytes held, for the memory bound (README, "Memory").
//!
//! On an AckAll consumer (partitioned mode) any ack, of a stored message or of a dead-lettered
//! original, settles every delivery below it too. So there a dead-lettered original is not
//! acknowledged on its own: it is marked confirmed, and is settled by the first ack through a
//! sequence at or above it that is safe, one whose range holds nothing unconfirmed (a stored
//! batch's ack, or its own once nothing below it is still held).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

const PROGRESS: Bytes = Bytes::from_static(b"+WPI");
const ACK: Bytes = Bytes::from_static(b"+ACK");

/// The messages held, by their reply (ack) subject, which is unique per delivery.
pub struct HeldMessages {
    client: async_nats::Client,
    held: Mutex<Held>,
    /// `Some` on an AckAll consumer: whether an ack may be sent now (the partition lease's
    /// fence).
    cumulative: Option<MayAck>,
}

/// Whether an acknowledgement may be sent now.
pub type MayAck = Arc<dyn Fn() -> bool + Send + Sync>;

/// A reply subject as a map key: `Subject` is not `Hash`, and copying it into a `String` would
/// allocate once per message; a clone of the `Subject` only counts a reference.
#[derive(Clone)]
struct ReplyKey(Subject);

impl PartialEq for ReplyKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for ReplyKey {}

impl std::hash::Hash for ReplyKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.as_str().hash(state);
    }
}

impl std::borrow::Borrow<str> for ReplyKey {
    fn borrow(&self) -> &str {
        self.0.as_str()
    }
}

#[derive(Default)]
struct Held {
    /// Payload size by reply subject. Every message is inserted and removed once, so the hash
    /// is on the hot path: foldhash, not the default SipHash (the keys are the server's
    /// subjects, not an attacker's).
    sizes: HashMap<ReplyKey, usize, foldhash::fast::RandomState>,
    bytes: usize,
    high_water: usize,
    /// AckAll consumers only: held dead-lettered originals whose dead letters are stored, by
    /// stream sequence, waiting for a safe ack at or above them.
    confirmed: BTreeMap<u64, Subject>,
}

impl Held {
    /// Forgets a delivery (settled, or left to redelivery).
    fn remove(&mut self, reply: &str) {
        if let Some(bytes) = self.sizes.remove(reply) {
            self.bytes -= bytes;
        }
        if self.confirmed.is_empty() {
            return;
        }
        if let Some(sequence) = stream_sequence(reply)
            && self
                .confirmed
                .get(&sequence)
                .is_some_and(|kept| kept.as_str() == reply)
        {
            self.confirmed.remove(&sequence);
        }
    }
}

impl HeldMessages {
    pub fn new(client: async_nats::Client) -> Self {
        Self {
            client,
            held: Mutex::new(Held::default()),
            cumulative: None,
        }
    }

    /// The registry of an AckAll consumer, whose acks may be sent only while `may_ack` says so.
    pub fn cumulative(client: async_nats::Client, may_ack: MayAck) -> Self {
        Self {
            client,
            held: Mutex::new(Held::default()),
            cumulative: Some(may_ack),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // A panic while holding the lock leaves plain counters behind; they are still usable.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts keeping a delivery alive; `bytes` is its payload size.
    pub fn hold(&self, reply: &Subject, bytes: usize, metrics: &Metrics) {
        self.hold_all([(reply, bytes)], metrics);
    }

    /// Starts keeping deliveries alive, `(reply, payload size)` each: one lock and one update of
    /// the gauges for all of them (what a pull has already delivered).
    pub fn hold_all<'a>(
        &self,
        deliveries: impl IntoIterator<Item = (&'a Subject, usize)>,
        metrics: &Metrics,
    ) {
        let mut held = self.lock();
        for (reply, bytes) in deliveries {
            if held.sizes.insert(ReplyKey(reply.clone()), bytes).is_none() {
                held.bytes += bytes;
            }
        }
        metrics.held_bytes.set(held.bytes as u64);
        if held.bytes > held.high_water {
            held.high_water = held.bytes;
            metrics.held_bytes_max.set(held.high_water as u64);
        }
    }

    /// Stops keeping the deliveries alive (they were settled, or are left to redelivery).
    pub fn release<'a>(&self, replies: impl IntoIterator<Item = &'a Subject>, metrics: &Metrics) {
        let mut held = self.lock();
        for reply in replies {
            held.remove(reply.as_str());
        }
        metrics.held_bytes.set(held.bytes as u64);
    }

    /// How many deliveries are held now.
    pub fn count(&self) -> usize {
        self.lock().sizes.len()
    }

    /// Acknowledges stored messages and lets them go; returns how many acks could not be sent.
    pub async fn acknowledge(&self, replies: &[Subject], metrics: &Metrics) -> usize {
        let failed = self.send_each(replies, &ACK).await;
        self.release(replies, metrics);
        failed
    }

    /// Acknowledges a stored batch on an AckAll consumer with one ack of `last` (its highest
    /// stream sequence, which acknowledges every message up to it) and lets the batch go.
    /// Returns whether the ack could be sent.
    pub async fn acknowledge_through(
        &self,
        last: &Subject,
        replies: &[Subject],
        metrics: &Metrics,
    ) -> bool {
        let sent = self.send_each(std::slice::from_ref(last), &ACK).await == 0;
        {
            let mut held = self.lock();
            for reply in replies {
                held.remove(reply.as_str());
            }
            // The ack also settled the confirmed originals below it.
            if let Some(through) = stream_sequence(last.as_str()) {
                let settled: Vec<Subject> = held
                    .confirmed
                    .range(..=through)
                    .map(|(_, reply)| reply.clone())
                    .collect();
                for reply in settled {
                    held.remove(reply.as_str());
                }
            }
            metrics.held_bytes.set(held.bytes as u64);
        }
        self.settle_confirmed(metrics).await;
        sent
    }

    /// Settles dead-lettered originals whose dead letters are stored; returns how many acks
    /// could not be sent. On an AckAll consumer they are marked confirmed and settled by the
    /// first safe ack at or above them (see the module doc).
    pub async fn acknowledge_dead_lettered(&self, replies: &[Subject], metrics: &Metrics) -> usize {
        if self.cumulative.is_none() {
            return self.acknowledge(replies, metrics).await;
        }
        {
            let mut held = self.lock();
            for reply in replies {
                if let Some(sequence) = stream_sequence(reply.as_str()) {
                    held.confirmed.insert(sequence, reply.clone());
                }
            }
        }
        self.settle_confirmed(metrics).await
    }

    /// AckAll consumers: acknowledges the highest confirmed original with nothing unconfirmed
    /// held below it, which settles it and every confirmed original below it.
    async fn settle_confirmed(&self, metrics: &Metrics) -> usize {
        let Some(may_ack) = &self.cumulative else {
            return 0;
        };
        let through = {
            let mut held = self.lock();
            if held.confirmed.is_empty() {
                return 0;
            }
            let lowest_unconfirmed = held
                .sizes
                .keys()
                .filter_map(|key| stream_sequence(key.0.as_str()))
                .filter(|sequence| !held.confirmed.contains_key(sequence))
                .min()
                .unwrap_or(u64::MAX);
            let Some((_, through)) = held.confirmed.range(..lowest_unconfirmed).next_back() else {
                return 0;
            };
            let through = through.clone();
            if !may_ack() {
                return 0;
            }
            let settled: Vec<Subject> = held
                .confirmed
                .range(..lowest_unconfirmed)
                .map(|(_, reply)| reply.clone())
                .collect();
            for reply in settled {
                held.remove(reply.as_str());
            }
            metrics.held_bytes.set(held.bytes as u64);
            through
        };
        self.send_each(std::slice::from_ref(&through), &ACK).await
    }

    /// How many held deliveries outside `batch`, not confirmed dead-lettered, have a stream
    /// sequence at most `sequence`: on an AckAll consumer, an ack through `sequence` would also
    /// settle them (e.g. poison whose dead letter is not stored yet), so it has to wait until
    /// there are none.
    pub fn held_outside_up_to(&self, sequence: u64, batch: &[Subject]) -> usize {
        let held = self.lock();
        // Confirmed originals are settled by that ack safely: their dead letters are stored.
        let up_to = held
            .sizes
            .keys()
            .filter_map(|key| stream_sequence(key.0.as_str()))
            .filter(|s| *s <= sequence && !held.confirmed.contains_key(s))
            .count();
        let of_batch = batch
            .iter()
            .filter(|reply| held.sizes.contains_key(reply.as_str()))
            .count();
        up_to.saturating_sub(of_batch)
    }

    /// Publishes `body` to each reply subject; an ack is a plain publish queued to the client,
    /// so awaiting them one by one is cheap and keeps them in order.
    async fn send_each(&self, replies: &[Subject], body: &Bytes) -> usize {
        let mut failed = 0;
        for reply in replies {
            if self
                .client
                .publish(reply.clone(), body.clone())
                .await
                .is_err()
            {
                failed += 1;
            }
        }
        failed
    }

    /// Sends an in-progress ack for every held message each `interval`, until `stop`.
    pub async fn keep_alive(&self, interval: Duration, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.cancelled() => return,
            }
            let replies: Vec<Subject> = self.lock().sizes.keys().map(|key| key.0.clone()).collect();
            let failed = self.send_each(&replies, &PROGRESS).await;
            if failed > 0 {
                tracing::warn!(failed, "progress acks could not be sent");
            }
        }
    }
}

/// The stream sequence in a JetStream ack subject: `$JS.ACK.<stream>.<consumer>.<delivered>.
/// <stream seq>.…` (9 tokens), or with a domain and account hash in front of the stream (12).
pub fn stream_sequence(reply: &str) -> Option<u64> {
    let tokens: Vec<&str> = reply.split('.').collect();
    let index = match tokens.len() {
        9 => 5,
        n if n >= 11 => 7,
        _ => return None,
    };
    tokens.get(index)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that never connects: holding and releasing do not touch the network, and acks
    /// are only queued.
    async fn lazy_client() -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .expect("lazy client")
    }

    #[tokio::test]
    async fn bytes_held_follow_hold_and_release_and_keep_their_high_water() {
        let client = lazy_client().await;
        let held = HeldMessages::new(client);
        let metrics = Metrics::new();
        let a = Subject::from("$JS.ACK.a");
        let b = Subject::from("$JS.ACK.b");
        held.hold_all([(&a, 10), (&b, 5)], &metrics);
        held.hold(&a, 10, &metrics);
        assert_eq!((held.count(), metrics.held_bytes.get()), (2, 15));
        held.release([&a], &metrics);
        assert_eq!((held.count(), metrics.held_bytes.get()), (1, 5));
        assert_eq!(metrics.held_bytes_max.get(), 15);
    }

    #[test]
    fn stream_sequences_are_read_from_both_ack_subject_forms() {
        assert_eq!(
            stream_sequence("$JS.ACK.S.C.1.42.40.1700000000.3"),
            Some(42)
        );
        assert_eq!(
            stream_sequence("$JS.ACK.dom.hash.S.C.1.43.40.1700000000.3.rnd"),
            Some(43)
        );
        assert_eq!(stream_sequence("$JS.ACK.a"), None);
    }

    #[tokio::test]
    async fn held_deliveries_below_a_sequence_are_counted_outside_the_batch() {
        let client = lazy_client().await;
        let held = HeldMessages::new(client);
        let metrics = Metrics::new();
        let ack = |seq: u64| Subject::from(format!("$JS.ACK.S.C.1.{seq}.{seq}.0.0"));
        let batch = [ack(2), ack(4)];
        for reply in [ack(1), ack(2), ack(3), ack(4), ack(9)] {
            held.hold(&reply, 1, &metrics);
        }
        assert_eq!(held.held_outside_up_to(4, &batch), 2);
        held.release([&ack(1), &ack(3)], &metrics);
        assert_eq!(held.held_outside_up_to(4, &batch), 0);
    }

    #[tokio::test]
    async fn on_an_ack_all_consumer_a_dead_lettered_original_waits_for_what_lies_below_it() {
        let client = lazy_client().await;
        let fence_open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let may_ack: MayAck = {
            let open = fence_open.clone();
            Arc::new(move || open.load(std::sync::atomic::Ordering::SeqCst))
        };
        let held = HeldMessages::cumulative(client, may_ack);
        let metrics = Metrics::new();
        let ack = |seq: u64| Subject::from(format!("$JS.ACK.S.C.1.{seq}.{seq}.0.0"));
        for seq in 1..=6 {
            held.hold(&ack(seq), 1, &metrics);
        }
        // Poison 3's dead letter is stored, but 1 and 2 are not: its ack would settle them.
        held.acknowledge_dead_lettered(&[ack(3)], &metrics).await;
        assert_eq!(held.count(), 6, "nothing may be acknowledged through 3 yet");
        // A batch of 4..6 may be acknowledged through 6 (3 is confirmed), but 1 and 2 still hold it.
        assert_eq!(held.held_outside_up_to(6, &[ack(4), ack(5), ack(6)]), 2);
        // The batch of 1 and 2 is stored and acknowledged through 2: 3 is settled next, alone.
        held.acknowledge_through(&ack(2), &[ack(1), ack(2)], &metrics)
            .await;
        assert_eq!(
            held.count(),
            3,
            "3 settled after the ack through 2; 4..6 held"
        );
        assert_eq!(held.held_outside_up_to(6, &[ack(4), ack(5), ack(6)]), 0);

        // Past the fence nothing is acknowledged, confirmed or not.
        fence_open.store(false, std::sync::atomic::Ordering::SeqCst);
        held.hold(&ack(7), 1, &metrics);
        held.release([&ack(4), &ack(5), &ack(6)], &metrics);
        held.acknowledge_dead_lettered(&[ack(7)], &metrics).await;
        assert_eq!(held.count(), 1, "7 stays held past the fence");
        // Confirmed 7, below a batch of 8 and 9, does not hold the batch back and is settled by
        // its ack through 9.
        fence_open.store(true, std::sync::atomic::Ordering::SeqCst);
        held.hold(&ack(8), 1, &metrics);
        held.hold(&ack(9), 1, &metrics);
        assert_eq!(held.held_outside_up_to(9, &[ack(8), ack(9)]), 0);
        held.acknowledge_through(&ack(9), &[ack(8), ack(9)], &metrics)
            .await;
        assert_eq!(held.count(), 0, "the ack through 9 settled 7");
    }
}
