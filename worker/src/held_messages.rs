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
//! On an AckAll consumer (partitioned mode) any ack settles every delivery below it too. So there
//! nothing is acknowledged on its own: a stored message or a dead-lettered original is marked
//! done, and the registry acknowledges the highest done delivery with nothing undone held below
//! it, which settles every done delivery up to it at once. A batch stored above a message still on
//! its way (poison awaiting its dead letter, a redelivery that came after newer messages) stays
//! held, kept alive, until that message is done too; the writer never waits for it.
//!
//! A worker that takes over a partition also has to wait for the deliveries the previous holder
//! left pending: they come back as redeliveries, mostly but not always before anything newer, and
//! an ack past one not yet received would settle it unstored. So until every one of them has been
//! received ([`Recovery`]), nothing is acknowledged.

use std::collections::HashMap;
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

/// The deliveries a previous holder of an AckAll consumer left pending, which have to come back
/// to this worker before it acknowledges anything: every pending delivery then was at most
/// `through`, and there were `pending` of them.
#[derive(Clone, Copy, Debug)]
pub struct Recovery {
    /// The consumer's last delivered stream sequence when this worker took it over.
    pub through: u64,
    /// Its deliveries pending acknowledgement then.
    pub pending: u64,
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
    /// What is held, by reply subject. Every message is inserted and removed once, so the hash
    /// is on the hot path: foldhash, not the default SipHash (the keys are the server's
    /// subjects, not an attacker's).
    entries: HashMap<ReplyKey, Entry, foldhash::fast::RandomState>,
    bytes: usize,
    high_water: usize,
    /// AckAll consumers only: how many entries are done.
    done: usize,
    /// AckAll consumers taken over with deliveries pending: those not received yet.
    recovering: Option<Recovering>,
}

/// One held delivery.
struct Entry {
    /// Payload bytes still in memory (0 once done).
    bytes: usize,
    /// AckAll consumers only (0 otherwise): the stream sequence, from the reply subject.
    sequence: u64,
    /// AckAll consumers only: stored, or dead-lettered with its dead letter stored, and waiting
    /// for a safe ack at or above it.
    done: bool,
}

/// A [`Recovery`] under way.
struct Recovering {
    through: u64,
    missing: u64,
    /// The sequences up to `through` received so far (a message counts once, however often it
    /// is delivered).
    received: std::collections::HashSet<u64>,
}

impl Recovering {
    /// Counts a received delivery; returns whether every pending one has now come back.
    fn receive(&mut self, sequence: u64) -> bool {
        if sequence <= self.through && self.received.insert(sequence) {
            self.missing = self.missing.saturating_sub(1);
        }
        self.missing == 0
    }
}

impl Held {
    /// Forgets a delivery (settled, or left to redelivery).
    fn remove(&mut self, reply: &str) {
        if let Some(entry) = self.entries.remove(reply) {
            self.bytes -= entry.bytes;
            self.done -= usize::from(entry.done);
        }
    }

    /// AckAll consumers: the highest done delivery with nothing undone held below it, if the
    /// deliveries pending at a takeover have all come back.
    fn safe_ack(&self) -> Option<(u64, Subject)> {
        if self.done == 0 || self.recovering.is_some() {
            return None;
        }
        let lowest_undone = self
            .entries
            .values()
            .filter(|entry| !entry.done)
            .map(|entry| entry.sequence)
            .min()
            .unwrap_or(u64::MAX);
        self.entries
            .iter()
            .filter(|(_, entry)| entry.done && entry.sequence < lowest_undone)
            .max_by_key(|(_, entry)| entry.sequence)
            .map(|(key, entry)| (entry.sequence, key.0.clone()))
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

    /// The registry of an AckAll consumer, whose acks may be sent only while `may_ack` says so,
    /// and, after a takeover with deliveries pending, only once they have all come back.
    pub fn cumulative(
        client: async_nats::Client,
        may_ack: MayAck,
        recovery: Option<Recovery>,
    ) -> Self {
        let recovering = recovery
            .filter(|recovery| recovery.pending > 0)
            .map(|recovery| Recovering {
                through: recovery.through,
                missing: recovery.pending,
                received: Default::default(),
            });
        Self {
            client,
            held: Mutex::new(Held {
                recovering,
                ..Held::default()
            }),
            cumulative: Some(may_ack),
        }
    }

    /// How many deliveries a previous holder left pending have not come back yet (0 when none
    /// or not an AckAll consumer).
    pub fn still_missing(&self) -> u64 {
        self.lock()
            .recovering
            .as_ref()
            .map_or(0, |recovering| recovering.missing)
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
        let cumulative = self.cumulative.is_some();
        let mut held = self.lock();
        let held = &mut *held;
        for (reply, bytes) in deliveries {
            let sequence = if cumulative {
                stream_sequence(reply.as_str()).unwrap_or(0)
            } else {
                0
            };
            let entry = Entry {
                bytes,
                sequence,
                done: false,
            };
            if let Some(replaced) = held.entries.insert(ReplyKey(reply.clone()), entry) {
                held.bytes -= replaced.bytes;
                held.done -= usize::from(replaced.done);
            }
            held.bytes += bytes;
            if let Some(recovering) = &mut held.recovering
                && recovering.receive(sequence)
            {
                tracing::info!("every delivery the previous holder left pending has come back");
                held.recovering = None;
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
        self.lock().entries.len()
    }

    /// Acknowledges stored messages and lets them go; returns how many acks could not be sent.
    pub async fn acknowledge(&self, replies: &[Subject], metrics: &Metrics) -> usize {
        let failed = self.send_each(replies, &ACK).await;
        self.release(replies, metrics);
        failed
    }

    /// Settles deliveries that are done: stored, or dead-lettered with their dead letters stored.
    /// Returns how many acks could not be sent. On an AckAll consumer they are marked done, and
    /// the highest done delivery with nothing undone held below it is acknowledged (see the
    /// module doc); elsewhere each is acknowledged.
    pub async fn acknowledge_done(&self, replies: &[Subject], metrics: &Metrics) -> usize {
        if self.cumulative.is_none() {
            return self.acknowledge(replies, metrics).await;
        }
        self.mark_done(replies, metrics);
        self.settle_done(metrics).await
    }

    /// AckAll consumers: marks deliveries done. Their payloads are gone (stored or in a dead
    /// letter), so they no longer count against the memory bound.
    fn mark_done(&self, replies: &[Subject], metrics: &Metrics) {
        let mut held = self.lock();
        let held = &mut *held;
        for reply in replies {
            if let Some(entry) = held.entries.get_mut(reply.as_str())
                && !entry.done
            {
                held.bytes -= entry.bytes;
                entry.bytes = 0;
                entry.done = true;
                held.done += 1;
            }
        }
        metrics.held_bytes.set(held.bytes as u64);
    }

    /// AckAll consumers: acknowledges the highest done delivery with nothing undone held below
    /// it, which settles it and every done delivery below it.
    async fn settle_done(&self, metrics: &Metrics) -> usize {
        let Some(may_ack) = &self.cumulative else {
            return 0;
        };
        let through = {
            let mut held = self.lock();
            let Some((through_sequence, through)) = held.safe_ack() else {
                return 0;
            };
            if !may_ack() {
                return 0;
            }
            // The ack settles every delivery up to it, all done: each is let go.
            let held = &mut *held;
            let mut settled = 0;
            held.entries.retain(|_, entry| {
                let covered = entry.sequence <= through_sequence;
                settled += usize::from(covered);
                !covered
            });
            held.done -= settled;
            metrics.held_bytes.set(held.bytes as u64);
            through
        };
        self.send_each(std::slice::from_ref(&through), &ACK).await
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
            let replies: Vec<Subject> = self
                .lock()
                .entries
                .keys()
                .map(|key| key.0.clone())
                .collect();
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
    // Counted, then walked again: no allocation, as this runs for every held delivery on an
    // AckAll consumer's settle.
    let index = match reply.split('.').count() {
        9 => 5,
        n if n >= 11 => 7,
        _ => return None,
    };
    reply.split('.').nth(index)?.parse().ok()
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

    fn ack(seq: u64) -> Subject {
        Subject::from(format!("$JS.ACK.S.C.1.{seq}.{seq}.0.0"))
    }

    fn ack_all_registry(
        client: async_nats::Client,
        recovery: Option<Recovery>,
    ) -> (HeldMessages, Arc<std::sync::atomic::AtomicBool>) {
        let fence_open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let may_ack: MayAck = {
            let open = fence_open.clone();
            Arc::new(move || open.load(std::sync::atomic::Ordering::SeqCst))
        };
        (
            HeldMessages::cumulative(client, may_ack, recovery),
            fence_open,
        )
    }

    #[tokio::test]
    async fn on_an_ack_all_consumer_nothing_is_acknowledged_past_what_is_not_done() {
        let (held, fence_open) = ack_all_registry(lazy_client().await, None);
        let metrics = Metrics::new();
        for seq in 1..=6 {
            held.hold(&ack(seq), 10, &metrics);
        }
        // Poison 3's dead letter is stored, but 1 and 2 are not: its ack would settle them.
        held.acknowledge_done(&[ack(3)], &metrics).await;
        assert_eq!(held.count(), 6, "nothing may be acknowledged through 3 yet");
        // A batch of 4..6 is stored: still nothing, as 1 and 2 are not done; the writer does not
        // wait, and the stored messages no longer count as bytes held.
        held.acknowledge_done(&[ack(4), ack(5), ack(6)], &metrics)
            .await;
        assert_eq!(held.count(), 6, "1 and 2 hold the ack back");
        assert_eq!(metrics.held_bytes.get(), 20, "only 1 and 2 are in memory");
        // The batch of 1 and 2 is stored: one ack through 6 settles everything.
        held.acknowledge_done(&[ack(1), ack(2)], &metrics).await;
        assert_eq!(held.count(), 0, "the ack through 6 settled 1..6");

        // Past the fence nothing is acknowledged, done or not.
        fence_open.store(false, std::sync::atomic::Ordering::SeqCst);
        held.hold(&ack(7), 1, &metrics);
        held.acknowledge_done(&[ack(7)], &metrics).await;
        assert_eq!(held.count(), 1, "7 stays held past the fence");
        // A redelivery received after newer messages holds back only what lies above it.
        fence_open.store(true, std::sync::atomic::Ordering::SeqCst);
        for seq in [9, 10, 8] {
            held.hold(&ack(seq), 1, &metrics);
        }
        held.acknowledge_done(&[ack(9), ack(10)], &metrics).await;
        assert_eq!(held.count(), 3, "7 is settled, 8 holds 9 and 10 back");
        held.acknowledge_done(&[ack(8)], &metrics).await;
        assert_eq!(held.count(), 0);
    }

    #[tokio::test]
    async fn after_a_takeover_nothing_is_acknowledged_until_every_pending_delivery_came_back() {
        // The previous holder left 3 deliveries pending, all at or below sequence 5.
        let recovery = Recovery {
            through: 5,
            pending: 3,
        };
        let (held, _fence) = ack_all_registry(lazy_client().await, Some(recovery));
        let metrics = Metrics::new();
        // Two came back, then newer messages (6, 7): a batch of them is stored, but an ack
        // through 7 could settle the third, not received yet.
        for seq in [2, 4, 6, 7] {
            held.hold(&ack(seq), 1, &metrics);
        }
        assert_eq!(held.still_missing(), 1);
        held.acknowledge_done(&[ack(2), ack(4), ack(6), ack(7)], &metrics)
            .await;
        assert_eq!(held.count(), 4, "nothing acknowledged while one is missing");
        // A message counts once, however often it is delivered.
        held.hold(&Subject::from("$JS.ACK.S.C.2.4.8.0.0"), 1, &metrics);
        assert_eq!(held.still_missing(), 1);
        // The third comes back and is stored: everything is settled at once.
        held.hold(&ack(3), 1, &metrics);
        assert_eq!(held.still_missing(), 0);
        held.acknowledge_done(&[ack(3), Subject::from("$JS.ACK.S.C.2.4.8.0.0")], &metrics)
            .await;
        assert_eq!(held.count(), 0);
        // Without a recovery, or with nothing pending, there is nothing to wait for.
        let (fresh, _fence) = ack_all_registry(
            lazy_client().await,
            Some(Recovery {
                through: 9,
                pending: 0,
            }),
        );
        assert_eq!(fresh.still_missing(), 0);
    }
}
