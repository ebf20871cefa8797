//! Running one worker: connect, find the consumer, then pull, write, acknowledge and cache until
//! shutdown, after which the batch in progress is flushed and acknowledged before returning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use signal_clients::connect;
use signal_clients::consumer_config::desired_consumer_config;
use signal_clients::retry::Backoff;
use signal_model::credentials::PipelineCredentials;
use signal_model::manifest::PipelineManifest;
use signal_model::row_encoder::RowEncoder;
use signal_telemetry::http;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::batch::BatchLimits;
use crate::cache::{self, CacheLayout, CacheQueue};
use crate::clickhouse_sink::{ClickHouseSink, acknowledge};
use crate::dead_letter::DeadLetters;
use crate::metrics::Metrics;
use crate::source::{BatchRequest, Puller};

/// What a worker is told to do.
pub struct WorkerOptions {
    pub manifest: PipelineManifest,
    pub credentials: PipelineCredentials,
    /// Address of the metrics and health endpoint.
    pub listen: SocketAddr,
    /// Create the durable consumer when it does not exist (standalone use without the operator).
    pub ensure_consumer: bool,
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
async fn until_ok<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
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

    let clickhouse = connect::clickhouse(&spec.clickhouse.url, &credentials.clickhouse);
    let sink = ClickHouseSink::new(
        clickhouse,
        &spec.clickhouse.database,
        &spec.clickhouse.table,
        &encoder.column_list(),
        &spec.stream.name,
        spec.consumer.ack_wait.0,
        metrics.clone(),
    );

    // The endpoint comes up first so that liveness holds while servers are still unreachable.
    let nats_slot: Arc<std::sync::OnceLock<async_nats::Client>> =
        Arc::new(std::sync::OnceLock::new());
    let ready: http::ReadinessCheck = {
        let nats_slot = nats_slot.clone();
        let clickhouse_healthy = sink.healthy.clone();
        Arc::new(move || {
            let nats_up = nats_slot
                .get()
                .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected);
            nats_up && clickhouse_healthy.load(Ordering::Relaxed)
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

    let client_name = format!("signal-worker {pipeline}");
    let Some(nats) = until_ok("NATS unreachable; retrying", &shutdown, || {
        connect::nats(&spec.nats.url, &client_name, &credentials.nats)
    })
    .await
    else {
        http_stop.cancel();
        return Ok(());
    };
    let _ = nats_slot.set(nats.clone());
    let js = jetstream::new(nats.clone());

    let consumer_config = desired_consumer_config(pipeline, spec);
    let Some(consumer) = until_ok(
        "consumer not available yet; retrying",
        &shutdown,
        || async {
            let stream = js
                .get_stream(&spec.stream.name)
                .await
                .map_err(|e| e.to_string())?;
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
            consumer
        },
    )
    .await
    else {
        http_stop.cancel();
        return Ok(());
    };
    let ack_wait = consumer.cached_info().config.ack_wait;

    if until_ok("ClickHouse unreachable; retrying", &shutdown, || async {
        if sink.probe().await {
            Ok(())
        } else {
            Err("no answer to SELECT version()")
        }
    })
    .await
    .is_none()
    {
        http_stop.cancel();
        return Ok(());
    }

    let cache_queue: Option<(CacheQueue, tokio::task::JoinHandle<()>)> = match &spec.cache {
        Some(cache_spec) => match cache::start(cache_spec, &credentials.redis, metrics.clone()) {
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
        dead_letters: DeadLetters {
            subject: spec.dead_letter.as_ref().map(|d| d.subject.clone()),
            stream: spec.stream.name.clone(),
            client: nats.clone(),
            jetstream: js.clone(),
        },
        progress_interval: (ack_wait / 3).max(Duration::from_millis(200)),
        metrics: metrics.clone(),
    };
    let (request_sender, request_receiver) = mpsc::channel::<BatchRequest>(1);
    let puller_task = tokio::spawn(puller.run(request_receiver, shutdown.clone()));
    tracing::info!(pipeline, stream = %spec.stream.name, consumer = %durable, "ingesting");

    write_loop(
        &sink,
        request_sender,
        cache_queue.as_ref().map(|(q, _)| q),
        &metrics,
        &shutdown,
    )
    .await;

    let _ = puller_task.await;
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

/// Asks the puller for batches, stores each, acknowledges it, and queues its cache update.
///
/// The acks of a batch are sent before the next batch is stored, so a worker that dies holds at
/// most one stored batch whose messages were not acknowledged (the documented duplicate bound).
async fn write_loop(
    sink: &ClickHouseSink,
    requests: mpsc::Sender<BatchRequest>,
    cache: Option<&CacheQueue>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    loop {
        let asked = Instant::now();
        let (reply, batch) = oneshot::channel();
        if requests.send(reply).await.is_err() {
            return;
        }
        // The puller drops the reply when it stops without a batch.
        let Ok(batch) = batch.await else { return };
        let rows = batch.acks.len() as u64;
        let received = Instant::now();
        match sink.store(&batch, shutdown).await {
            Ok(()) => {
                let stored = Instant::now();
                // Only now, with the rows confirmed, may their messages be acknowledged.
                let failed = acknowledge(batch.acks).await;
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
                return;
            }
        }
    }
}
