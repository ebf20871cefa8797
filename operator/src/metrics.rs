//! The operator's Prometheus metrics: reconciles, failures by reason, reconcile duration, and how
//! many pipelines are ready. Served on `/metrics` by `signal_telemetry::http`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadinessLabels {
    ready: String,
}

/// Metrics shared by every reconcile.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<FailureLabels, Counter>,
    duration: Histogram,
    pipelines: Family<ReadinessLabels, Gauge>,
    /// Readiness per `namespace/name`, the source of the `pipelines` gauge.
    readiness: Mutex<HashMap<String, bool>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("signal_operator");
        let reconciles = Counter::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let pipelines = Family::<ReadinessLabels, Gauge>::default();
        registry.register(
            "reconciles",
            "Reconciles of SignalPipelines started",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by reason",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconcile took",
            duration.clone(),
        );
        registry.register(
            "pipelines",
            "SignalPipelines by readiness",
            pipelines.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            pipelines,
            readiness: Mutex::new(HashMap::new()),
        }
    }
}

impl Metrics {
    pub fn reconcile_started(&self) {
        self.reconciles.inc();
    }

    pub fn reconcile_finished(&self, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
    }

    pub fn reconcile_failed(&self, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Records a pipeline's readiness; `None` forgets it (deleted).
    pub fn set_pipeline_ready(&self, key: &str, ready: Option<bool>) {
        let Ok(mut readiness) = self.readiness.lock() else {
            return;
        };
        match ready {
            Some(ready) => readiness.insert(key.to_string(), ready),
            None => readiness.remove(key),
        };
        let ready_count = readiness.values().filter(|ready| **ready).count();
        let total = readiness.len();
        for (label, count) in [("true", ready_count), ("false", total - ready_count)] {
            self.pipelines
                .get_or_create(&ReadinessLabels {
                    ready: label.to_string(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
}

impl signal_telemetry::http::MetricsSource for Metrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }
}
