//! The operator's Prometheus metrics: reconciles, failures by reason, reconcile duration (whole and
//! by step), how many pipelines are ready, the queue for the servers (pipelines waiting for a
//! turn), the shared clients open, NATS connects, and writes made or skipped because nothing
//! changed. Served on `/metrics` by `signal_telemetry::http`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::dataplane::connections::ServerKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadinessLabels {
    ready: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabels {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    object: String,
    outcome: String,
}

type DurationFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Metrics shared by every reconcile.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<FailureLabels, Counter>,
    duration: Histogram,
    pipelines: Family<ReadinessLabels, Gauge>,
    /// Readiness per `namespace/name`, the source of the `pipelines` gauge.
    readiness: Mutex<Readiness>,
    steps: DurationFamily<StepLabels>,
    waiting: Family<ServerLabels, Gauge>,
    open_clients: Family<ServerLabels, Gauge>,
    nats_connects: Counter,
    writes: Family<WriteLabels, Counter>,
}

/// Readiness per pipeline and how many are ready, kept together so an update costs O(1).
#[derive(Default)]
struct Readiness {
    by_pipeline: HashMap<String, bool>,
    ready: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("signal_operator");
        let reconciles = Counter::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let pipelines = Family::<ReadinessLabels, Gauge>::default();
        let steps: DurationFamily<StepLabels> = Family::new_with_constructor(duration_histogram);
        let waiting = Family::<ServerLabels, Gauge>::default();
        let open_clients = Family::<ServerLabels, Gauge>::default();
        let nats_connects = Counter::default();
        let writes = Family::<WriteLabels, Counter>::default();
        registry.register(
            "reconcile_step_duration_seconds",
            "Time a step of a reconcile took: conflicts, secrets, nats_queue, nats, clickhouse_queue, clickhouse, workload, status",
            steps.clone(),
        );
        registry.register(
            "pipelines_waiting",
            "Reconciles waiting for a turn on a server (the per-server concurrency limit), by server kind",
            waiting.clone(),
        );
        registry.register(
            "open_clients",
            "Shared clients open, one per server and credential set, by server kind",
            open_clients.clone(),
        );
        registry.register(
            "nats_connects",
            "NATS connections opened by the shared clients (reconnects are the client's own)",
            nats_connects.clone(),
        );
        registry.register(
            "writes",
            "Writes to Kubernetes by object (status, deployment, configmap), made or skipped as unchanged",
            writes.clone(),
        );
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
            readiness: Mutex::new(Readiness::default()),
            steps,
            waiting,
            open_clients,
            nats_connects,
            writes,
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
        let previous = match ready {
            Some(ready) => readiness.by_pipeline.insert(key.to_string(), ready),
            None => readiness.by_pipeline.remove(key),
        };
        if previous == Some(true) {
            readiness.ready -= 1;
        }
        if ready == Some(true) {
            readiness.ready += 1;
        }
        let ready_count = readiness.ready;
        let total = readiness.by_pipeline.len();
        for (label, count) in [("true", ready_count), ("false", total - ready_count)] {
            self.pipelines
                .get_or_create(&ReadinessLabels {
                    ready: label.to_string(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Records how long one step of a reconcile took.
    pub fn observe_step(&self, step: &str, elapsed: Duration) {
        self.steps
            .get_or_create(&StepLabels {
                step: step.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a reconcile as waiting for a turn on a server until the guard is dropped.
    pub fn waiting_for(&self, kind: ServerKind) -> WaitingGuard {
        let gauge = self
            .waiting
            .get_or_create(&ServerLabels {
                server: kind.label().to_string(),
            })
            .clone();
        gauge.inc();
        WaitingGuard(gauge)
    }

    pub fn set_open_clients(&self, nats: usize, clickhouse: usize) {
        for (server, count) in [("nats", nats), ("clickhouse", clickhouse)] {
            self.open_clients
                .get_or_create(&ServerLabels {
                    server: server.to_string(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    pub fn nats_connected(&self) {
        self.nats_connects.inc();
    }

    /// Counts a write to `object` (`status`, `deployment`, `configmap`): made, or skipped because
    /// the object already says what it would write.
    pub fn write(&self, object: &str, made: bool) {
        self.writes
            .get_or_create(&WriteLabels {
                object: object.to_string(),
                outcome: if made { "written" } else { "unchanged" }.to_string(),
            })
            .inc();
    }
}

/// Holds one count in the `pipelines_waiting` gauge.
pub struct WaitingGuard(Gauge);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl signal_telemetry::http::MetricsSource for Metrics {
    fn registry(&self) -> &Registry {
        &self.registry
    }
}
