//! What one Ready pipeline costs at rest, against a real kube-apiserver: a steady trickle of
//! signals into its stream for a minute, while the operator's reconciles are counted through its
//! `/metrics` and the pipeline's writes through a watch (every version the API server stored).
//!
//! Prints the figures. Asserts only that the operator does not reconcile or write in a loop: a
//! bound far above what periodic resyncs and the trickle's lag updates explain.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/dataplane.rs"]
mod dataplane;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Api;
use kube::runtime::watcher;
use signal_model::SignalPipeline;

use cluster::{
    FOLLOW_TIMEOUT, Operator, OperatorOptions, StandInKubelet, apply_pipeline, pipeline_object,
    wait_condition,
};

/// How long the pipeline is watched at rest (`SIGNAL_AT_REST_SECONDS` overrides).
const AT_REST: Duration = Duration::from_secs(60);
/// Signals published per second during that time.
const SIGNALS_PER_SECOND: u64 = 5;
/// A loop reconciles many times a second; a resync or a lag update every few seconds stays far
/// below this many per minute.
const MAX_RECONCILES_PER_MINUTE: u64 = 60;
const MAX_WRITES_PER_MINUTE: u64 = 60;

#[derive(Default)]
struct Writes {
    /// Versions whose status differs from the previous one.
    status: AtomicU64,
    /// Versions whose spec or metadata (other than the resource version) differ.
    other: AtomicU64,
}

#[tokio::test]
async fn a_ready_pipeline_with_a_trickle_of_signals_does_not_reconcile_in_a_loop() {
    let at_rest = std::env::var("SIGNAL_AT_REST_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(AT_REST);
    let client = cluster::admin_client().await.unwrap();
    let namespace = cluster::namespace("at-rest");
    let operator = Operator::start(OperatorOptions {
        namespaces: vec![namespace.clone()],
        ..OperatorOptions::default()
    })
    .unwrap();
    let _kubelet = StandInKubelet::start(client.clone(), &namespace);

    let label = dataplane::unique("rest");
    let spec = dataplane::shared_pipeline_spec(&label);
    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), &namespace);
    apply_pipeline(&pipelines, &pipeline_object(&namespace, "resting", &spec))
        .await
        .unwrap();
    wait_condition(&pipelines, "resting", "Ready", FOLLOW_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));

    // Count every version of the pipeline the API server stores from now on.
    let writes = Arc::new(Writes::default());
    let counted = writes.clone();
    let config = watcher::Config::default().fields("metadata.name=resting");
    let watch = tokio::spawn({
        let pipelines = pipelines.clone();
        async move {
            let mut last: Option<SignalPipeline> = None;
            let mut events = watcher(pipelines, config).boxed();
            while let Some(event) = events.next().await {
                let Ok(watcher::Event::Apply(pipeline) | watcher::Event::InitApply(pipeline)) =
                    event
                else {
                    continue;
                };
                if let Some(previous) = &last {
                    let same_version =
                        previous.metadata.resource_version == pipeline.metadata.resource_version;
                    if !same_version {
                        if previous.status != pipeline.status {
                            counted.status.fetch_add(1, Ordering::Relaxed);
                        }
                        if previous.spec != pipeline.spec
                            || previous.metadata.finalizers != pipeline.metadata.finalizers
                            || previous.metadata.annotations != pipeline.metadata.annotations
                            || previous.metadata.labels != pipeline.metadata.labels
                        {
                            counted.other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                last = Some(pipeline);
            }
        }
    });
    // Let the watch deliver its initial version before the window opens.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let nats = async_nats::connect(dataplane::nats().url()).await.unwrap();
    let subject = format!("{label}.signals.trickle");
    let reconciles_before = operator.reconciles().unwrap();
    let started = Instant::now();
    let mut published = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / SIGNALS_PER_SECOND));
    while started.elapsed() < at_rest {
        tick.tick().await;
        let payload =
            format!(r#"{{"event_time":"2026-01-01 00:00:00","wallet":"w{published}","amount":1}}"#);
        nats.publish(subject.clone(), payload.into()).await.unwrap();
        published += 1;
    }
    nats.flush().await.unwrap();
    let window = started.elapsed();
    let reconciles = operator.reconciles().unwrap() - reconciles_before;
    watch.abort();
    let status_writes = writes.status.load(Ordering::Relaxed);
    let other_writes = writes.other.load(Ordering::Relaxed);

    let per_minute = |count: u64| count as f64 * 60.0 / window.as_secs_f64();
    eprintln!(
        "at rest for {window:.1?} with {published} signals: {reconciles} reconciles \
         ({:.1}/min), {status_writes} status writes ({:.1}/min), {other_writes} other writes",
        per_minute(reconciles),
        per_minute(status_writes),
    );
    let minutes = window.as_secs_f64() / 60.0;
    assert!(
        (reconciles as f64) <= MAX_RECONCILES_PER_MINUTE as f64 * minutes.max(1.0),
        "{reconciles} reconciles in {window:?}: a reconcile loop?\n{}",
        operator.log_text()
    );
    assert!(
        ((status_writes + other_writes) as f64) <= MAX_WRITES_PER_MINUTE as f64 * minutes.max(1.0),
        "{status_writes} status and {other_writes} other writes in {window:?}: a write loop?"
    );
    let ready = pipelines.get("resting").await.unwrap();
    assert!(
        cluster::condition(&ready, "Ready").is_some_and(|c| c.status == "True"),
        "still Ready: {}",
        cluster::describe_conditions(&ready)
    );
}
