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

use std::collections::HashMap;
use std::sync::Mutex;
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
}

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
}

impl HeldMessages {
    pub fn new(client: async_nats::Client) -> Self {
        Self {
            client,
            held: Mutex::new(Held::default()),
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
            if let Some(bytes) = held.sizes.remove(reply.as_str()) {
                held.bytes -= bytes;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_held_follow_hold_and_release_and_keep_their_high_water() {
        // A client that never connects: hold/release do not touch the network.
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .expect("lazy client");
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
}
