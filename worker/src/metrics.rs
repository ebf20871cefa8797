//! The worker's Prometheus metrics, registered once and shared by every task.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use signal_model::worker_health::HealthReason;

/// Label of the poison counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// The `partition` label of the partition metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: u32,
}

/// Every metric the worker exports (names get the `signal_worker_` prefix).
pub struct Metrics {
    pub messages_received: Counter,
    pub pull_requests: Counter,
    pub rows_inserted: Counter,
    pub batches_inserted: Counter,
    pub insert_seconds: Histogram,
    pub insert_retries: Counter,
    pub poison: Family<ReasonLabel, Counter>,
    pub dead_letters_published: Counter,
    pub redis_writes: Counter,
    pub redis_failures: Counter,
    pub redis_skipped: Counter,
    pub consumer_lag: Gauge<u64, AtomicU64>,
    pub held_bytes: Gauge<u64, AtomicU64>,
    pub held_bytes_max: Gauge<u64, AtomicU64>,
    pub blocked: Family<ReasonLabel, Gauge>,
    pub inserts_rejected: Counter,
    pub dead_letters_unroutable: Counter,
    /// 1 for each partition whose lease this worker holds (`spec.workers.partitions`).
    pub partitions_held: Family<PartitionLabel, Gauge>,
    /// The poison counters of the known labels, so that counting one allocates nothing.
    poison_by_label: Vec<(&'static str, Counter)>,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("signal_worker");
        let metrics = Self {
            messages_received: Counter::default(),
            pull_requests: Counter::default(),
            rows_inserted: Counter::default(),
            batches_inserted: Counter::default(),
            insert_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            insert_retries: Counter::default(),
            poison: Family::default(),
            dead_letters_published: Counter::default(),
            redis_writes: Counter::default(),
            redis_failures: Counter::default(),
            redis_skipped: Counter::default(),
            consumer_lag: Gauge::default(),
            held_bytes: Gauge::default(),
            held_bytes_max: Gauge::default(),
            blocked: Family::default(),
            inserts_rejected: Counter::default(),
            dead_letters_unroutable: Counter::default(),
            partitions_held: Family::default(),
            poison_by_label: Vec::new(),
            registry: Registry::default(),
        };
        registry.register(
            "messages_received",
            "Messages pulled from JetStream",
            metrics.messages_received.clone(),
        );
        registry.register(
            "pull_requests",
            "Pull requests sent to the consumer",
            metrics.pull_requests.clone(),
        );
        registry.register(
            "rows_inserted",
            "Rows confirmed by ClickHouse",
            metrics.rows_inserted.clone(),
        );
        registry.register(
            "batches_inserted",
            "Batches confirmed by ClickHouse",
            metrics.batches_inserted.clone(),
        );
        registry.register(
            "insert_duration_seconds",
            "Time to insert one batch",
            metrics.insert_seconds.clone(),
        );
        registry.register(
            "insert_retries",
            "Failed insert attempts that were retried",
            metrics.insert_retries.clone(),
        );
        registry.register(
            "poison_messages",
            "Messages that could not become a row, by reason",
            metrics.poison.clone(),
        );
        registry.register(
            "dead_letters_published",
            "Poison messages published to the dead-letter subject",
            metrics.dead_letters_published.clone(),
        );
        registry.register(
            "redis_writes",
            "Keys written to the Redis cache",
            metrics.redis_writes.clone(),
        );
        registry.register(
            "redis_failures",
            "Failed Redis cache writes (their keys are written again)",
            metrics.redis_failures.clone(),
        );
        registry.register(
            "redis_skipped",
            "Cache key updates dropped because the queue for a slow or absent Redis was full (keys)",
            metrics.redis_skipped.clone(),
        );
        registry.register(
            "partition_held",
            "1 while this worker holds the partition's lease (partitioned consumers)",
            metrics.partitions_held.clone(),
        );
        registry.register(
            "consumer_lag",
            "Messages pending for the consumer, as last seen",
            metrics.consumer_lag.clone(),
        );
        registry.register(
            "held_message_bytes",
            "Payload bytes of the messages the worker holds (pulled, not yet settled)",
            metrics.held_bytes.clone(),
        );
        registry.register(
            "held_message_bytes_max",
            "The most payload bytes held at once since the worker started",
            metrics.held_bytes_max.clone(),
        );
        registry.register(
            "blocked",
            "1 while the worker cannot make progress for this reason (see /readyz)",
            metrics.blocked.clone(),
        );
        registry.register(
            "inserts_rejected",
            "Insert attempts ClickHouse refused for a reason retrying will not fix",
            metrics.inserts_rejected.clone(),
        );
        registry.register(
            "dead_letters_unroutable",
            "Dead-letter publishes no stream captured (the poison stays unacknowledged)",
            metrics.dead_letters_unroutable.clone(),
        );
        let labels = signal_model::row_encoder::Poison::LABELS;
        let poison_by_label = labels
            .iter()
            .chain([&crate::dead_letter::MAX_DELIVERIES])
            .map(|reason| {
                let counter = metrics.poison.get_or_create(&ReasonLabel {
                    reason: reason.to_string(),
                });
                (*reason, counter.clone())
            })
            .collect();
        Self {
            registry,
            poison_by_label,
            ..metrics
        }
    }

    /// Sets the `blocked` gauge of one reason.
    pub fn set_blocked(&self, reason: HealthReason, blocked: bool) {
        self.blocked
            .get_or_create(&ReasonLabel {
                reason: format!("{reason:?}"),
            })
            .set(i64::from(blocked));
    }

    pub fn count_poison(&self, reason: &str) {
        if let Some((_, counter)) = self.poison_by_label.iter().find(|(l, _)| *l == reason) {
            counter.inc();
            return;
        }
        self.poison
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }
}

impl signal_telemetry::http::MetricsSource for Metrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
