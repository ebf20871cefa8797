//! Running one worker: connect, find the consumer, then pull, write, acknowledge and cache until
//! shutdown, after which the batch in progress is flushed and acknowledged before returning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use signal_clients::connect;
use signal_clients::consumer_config::desired_consumer_config;
use signal_clients::retry::Backoff;
use signal_model::SignalPipelineSpec;
use signal_model::credentials::PipelineCredentials;
use signal_model::manifest::PipelineManifest;
use signal_model::partitions::PartitionScheme;
use signal_model::row_encoder::RowEncoder;
use signal_model::worker_health::health_subject;
use signal_telemetry::http;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::batch::BatchLimits;
use crate::cache::{self, CacheLayout, CacheQueue};
use crate::clickhouse_sink::{ClickHouseSink, SinkTarget, replica_clients};
use crate::dead_letter::DeadLetterRouter;
use crate::health::Health;
use crate::held_messages::HeldMessages;
use crate::metrics::Metrics;
use crate::source::{BatchRequest, Puller, next_batch};

/// What a worker is told to do.
pub struct WorkerOptions {
    pub manifest: PipelineManifest,
    pub credentials: PipelineCredentials,
    /// Address of the metrics and health endpoint.
    pub listen: SocketAddr,
    /// Create the durable consumer when it does not exist (standalone use without the operator).
    pub ensure_consumer: bool,
    /// This worker's name in its health reports (the pod name, or `local-N`).
    pub worker_name: String,
}

/// Bound on hand-overs of dead letters (up to 64 each) queued between the puller and the router;
/// the router itself keeps at most [`crate::dead_letter::MAX_IN_FLIGHT`] (and about a batch's
/// bytes) in flight.
pub(crate) const DEAD_LETTER_QUEUE: usize = 1;
/// Room for a pull's subject, reply subject and protocol framing besides the message.
pub(crate) const PULL_FRAMING_BYTES: usize = 4096;

/// The dead-letter subject of a pipeline: `spec.deadLetter.subject`, or the model's default (the
/// operator writes it resolved into the manifest; a hand-written manifest gets the same default).
pub fn dead_letter_subject(spec: &SignalPipelineSpec, pipeline: &str) -> String {
    spec.dead_letter_subject(pipeline)
}

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("spec.clickhouse.columns{0}")]
    Columns(String),
    #[error("spec.cache: {0}")]
    Cache(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Connect(#[from] connect::ConnectError),
}

/// Retries `attempt` with backoff until it succeeds or `shutdown` fires (then `None`).
pub(crate) async fn until_ok<
    T,
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
>(
    what: &str,
    shutdown: &CancellationToken,
    mut attempt: impl FnMut() -> F,
) -> Option<T> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match attempt().await {
            Ok(value) => return Some(value),
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "{what}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
        }
    }
}

/// Runs the worker until `shutdown` is cancelled, returning once the last batch is settled.
/// Reports the bound metrics address through `bound` when given (tests listen on port 0).
pub async fn run(
    options: WorkerOptions,
    shutdown: CancellationToken,
    bound: Option<oneshot::Sender<SocketAddr>>,
) -> Result<(), WorkerError> {
    let WorkerOptions {
        manifest,
        credentials,
        listen,
        ensure_consumer,
        worker_name,
    } = options;
    let spec = &manifest.spec;
    let pipeline = manifest.metadata.name.as_str();
    let durable = manifest.durable_name().to_string();
    let metrics = Arc::new(Metrics::new());

    let encoder = RowEncoder::new(
        &spec.clickhouse.columns,
        spec.workers.max_message_bytes.0 as usize,
    )
    .map_err(|errors| {
        WorkerError::Columns(
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let column_names: Vec<&str> = encoder.column_names().collect();
    let cache_layout = spec
        .cache
        .as_ref()
        .map(|cache| CacheLayout::new(cache, &column_names))
        .transpose()
        .map_err(WorkerError::Cache)?;

    let health = Arc::new(Health::new());
    let clickhouse_healthy = Arc::new(AtomicBool::new(false));
    // The endpoint comes up first so that liveness holds while servers are still unreachable.
    let nats_slot: Arc<std::sync::OnceLock<async_nats::Client>> =
        Arc::new(std::sync::OnceLock::new());
    let ready: http::ReadinessCheck = {
        let nats_slot = nats_slot.clone();
        let clickhouse_healthy = clickhouse_healthy.clone();
        let health = health.clone();
        Arc::new(move || {
            let nats_up = nats_slot
                .get()
                .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected);
            if !nats_up {
                return Err("not connected to NATS".into());
            }
            if !clickhouse_healthy.load(Ordering::Relaxed) {
                return Err("ClickHouse does not answer".into());
            }
            match health.problem() {
                Some((reason, message)) => Err(format!("{reason:?}: {message}")),
                None => Ok(()),
            }
        })
    };
    let http_stop = CancellationToken::new();
    let (addr, http_task) = http::serve(listen, metrics.clone(), ready, http_stop.clone())
        .await
        .map_err(|source| WorkerError::Listen {
            addr: listen,
            source,
        })?;
    tracing::info!(%addr, pipeline, "metrics and health endpoint listening");
    if let Some(bound) = bound {
        let _ = bound.send(addr);
    }

    // In a cluster the manifest leaves `workers.replicas` to the Deployment, so the ack window is
    // judged for one worker here; the operator warns with the replicas it runs.
    for warning in signal_model::validate::spec_warnings(spec) {
        tracing::warn!(pipeline, reason = warning.reason, "{}", warning.message);
    }
    let client_name = format!("signal-worker {pipeline}");
    let Some(nats) = until_ok("NATS unreachable; retrying", &shutdown, || {
        connect::nats(
            &spec.nats.url,
            &client_name,
            &credentials.nats,
            credentials.tls.nats.as_ref(),
        )
    })
    .await
    else {
        http_stop.cancel();
        return Ok(());
    };
    let _ = nats_slot.set(nats.clone());
    let js = jetstream::new(nats.clone());

    if let Some(scheme) = PartitionScheme::of(spec, pipeline) {
        let result = run_partitioned(
            crate::partitioned::Shared {
                pipeline: pipeline.to_string(),
                spec: spec.clone(),
                scheme,
                credentials,
                nats: nats.clone(),
                js,
                metrics,
                health,
                clickhouse_healthy,
                cache: None,
                ensure_consumer,
            },
            &worker_name,
            &shutdown,
        )
        .await;
        http_stop.cancel();
        let _ = http_task.await;
        return result;
    }

    let consumer_config = desired_consumer_config(pipeline, spec);
    let Some((consumer, stream_created_unix_nanos)) = until_ok(
        "consumer not available yet; retrying",
        &shutdown,
        || async {
            let stream = js
                .get_stream(&spec.stream.name)
                .await
                .map_err(|e| e.to_string())?;
            let created = stream.cached_info().created.unix_timestamp_nanos();
            let consumer: Result<PullConsumer, String> = if ensure_consumer {
                stream
                    .get_or_create_consumer(&durable, consumer_config.clone())
                    .await
                    .map_err(|e| e.to_string())
            } else {
                stream
                    .get_consumer(&durable)
                    .await
                    .map_err(|e| format!("consumer {durable}: {e}"))
            };
            consumer.map(|consumer| (consumer, created))
        },
    )
    .await
    else {
        http_stop.cancel();
        return Ok(());
    };
    let ack_wait = consumer.cached_info().config.ack_wait;
    let max_deliver = consumer.cached_info().config.max_deliver;
    let background_stop = CancellationToken::new();
    let held = Arc::new(HeldMessages::new(nats.clone()));
    let keep_alive = {
        let held = held.clone();
        let stop = background_stop.clone();
        tokio::spawn(async move {
            held.keep_alive((ack_wait / 3).max(Duration::from_millis(200)), stop)
                .await
        })
    };
    let reporter = {
        let health = health.clone();
        let stop = background_stop.clone();
        let subject = health_subject(&spec.stream.name, &durable, &worker_name);
        let js = js.clone();
        tokio::spawn(async move { health.publish_reports(js, subject, worker_name, stop).await })
    };
    let (letter_sender, letter_receiver) = mpsc::channel(DEAD_LETTER_QUEUE);
    let router = DeadLetterRouter {
        subject: Some(dead_letter_subject(spec, pipeline)),
        stream: spec.stream.name.clone(),
        stream_created_unix_nanos,
        client: nats.clone(),
        held: held.clone(),
        health: health.clone(),
        metrics: metrics.clone(),
        max_bytes_in_flight: spec.workers.batch.max_bytes.0 as usize,
    };
    let router_task = tokio::spawn(router.run(letter_receiver, shutdown.clone()));

    let column_list = encoder.column_list();
    let sink = ClickHouseSink::new(
        replica_clients(&spec.clickhouse, &credentials)?,
        SinkTarget::of_pipeline(spec, &column_list, stream_created_unix_nanos),
        metrics.clone(),
        health.clone(),
        letter_sender.clone(),
        clickhouse_healthy,
    );

    if until_ok("ClickHouse unreachable; retrying", &shutdown, || {
        sink.probe()
    })
    .await
    .is_none()
    {
        background_stop.cancel();
        http_stop.cancel();
        return Ok(());
    }

    let cache_queue: Option<(CacheQueue, tokio::task::JoinHandle<()>)> = match &spec.cache {
        Some(cache_spec) => match cache::start(
            cache_spec,
            &credentials.redis,
            credentials.tls.redis.as_ref(),
            metrics.clone(),
            health.clone(),
        ) {
            Ok(started) => Some(started),
            Err(error) => return Err(WorkerError::Cache(format!("redis.url: {error}"))),
        },
        None => None,
    };

    let puller = Puller {
        consumer,
        encoder,
        cache: cache_layout,
        limits: BatchLimits::from(&spec.workers.batch),
        min_pull_bytes: nats.server_info().max_payload + PULL_FRAMING_BYTES,
        max_deliver,
        dead_letters: letter_sender,
        held: held.clone(),
        metrics: metrics.clone(),
        partitioned: false,
    };
    let (request_sender, request_receiver) = mpsc::channel::<BatchRequest>(1);
    let puller_task = tokio::spawn(puller.run(request_receiver, shutdown.clone()));
    tracing::info!(pipeline, stream = %spec.stream.name, consumer = %durable, "ingesting");

    write_loop(
        &sink,
        &held,
        request_sender,
        cache_queue.as_ref().map(|(q, _)| q),
        &metrics,
        &shutdown,
    )
    .await;

    let _ = puller_task.await;
    // The sink's sender is the last one: dropping it lets the router finish what is in flight.
    drop(sink);
    let _ = router_task.await;
    background_stop.cancel();
    let _ = keep_alive.await;
    let _ = reporter.await;
    if let Err(error) = nats.flush().await {
        tracing::warn!(%error, "flushing acknowledgements to NATS failed");
    }
    if let Some((queue, task)) = cache_queue {
        drop(queue);
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    http_stop.cancel();
    let _ = http_task.await;
    tracing::info!(pipeline, "stopped");
    Ok(())
}

/// Partitioned mode ([`crate::partitioned`]): the health reports and the Redis cache, shared by
/// every partition held, around the partitions' coordinator.
async fn run_partitioned(
    mut shared: crate::partitioned::Shared,
    worker_name: &str,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    let background_stop = CancellationToken::new();
    let reporter = {
        let health = shared.health.clone();
        let stop = background_stop.clone();
        let subject = health_subject(
            &shared.spec.stream.name,
            &shared.scheme.durable,
            worker_name,
        );
        let js = shared.js.clone();
        let worker_name = worker_name.to_string();
        tokio::spawn(async move { health.publish_reports(js, subject, worker_name, stop).await })
    };
    let cache_task = match &shared.spec.cache {
        Some(cache_spec) => {
            let (queue, task) = cache::start(
                cache_spec,
                &shared.credentials.redis,
                shared.credentials.tls.redis.as_ref(),
                shared.metrics.clone(),
                shared.health.clone(),
            )
            .map_err(|error| WorkerError::Cache(format!("redis.url: {error}")))?;
            shared.cache = Some(queue);
            Some(task)
        }
        None => None,
    };
    crate::partitioned::run(shared, worker_name, shutdown).await;
    background_stop.cancel();
    let _ = reporter.await;
    if let Some(task) = cache_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    Ok(())
}

/// Asks the puller for batches, stores each, acknowledges it, and queues its cache update.
///
/// The acks of a batch are sent before the next batch is stored, so a worker that dies holds at
/// most one stored batch whose messages were not acknowledged (the documented duplicate bound).
async fn write_loop(
    sink: &ClickHouseSink,
    held: &HeldMessages,
    requests: mpsc::Sender<BatchRequest>,
    cache: Option<&CacheQueue>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    // The stored batch's buffer goes back to the puller with the next request.
    let mut spare_rows = None;
    loop {
        let asked = Instant::now();
        let Some(mut batch) = next_batch(&requests, spare_rows.take()).await else {
            return;
        };
        let received = Instant::now();
        match sink.store(&mut batch, shutdown).await {
            Ok(()) => {
                spare_rows = batch.take_buffer();
                let rows = batch.len() as u64;
                let stored = Instant::now();
                // Only now, with the rows confirmed, may their messages be acknowledged.
                let failed = held.acknowledge(&batch.settle.replies, metrics).await;
                if failed > 0 {
                    tracing::warn!(
                        failed,
                        "acknowledgements not sent; those rows may be redelivered"
                    );
                }
                metrics.rows_inserted.inc_by(rows);
                metrics.batches_inserted.inc();
                tracing::debug!(
                    rows,
                    first = batch.first_sequence,
                    last = batch.last_sequence,
                    waited_ms = (received - asked).as_millis() as u64,
                    insert_ms = (stored - received).as_millis() as u64,
                    ack_ms = stored.elapsed().as_millis() as u64,
                    "batch stored"
                );
                if let Some(cache) = cache {
                    cache.offer(batch.cache);
                }
            }
            Err(error) => {
                tracing::error!(%error, "batch not stored; its messages will be redelivered");
                held.release(&batch.settle.replies, metrics);
                return;
            }
        }
    }
}
