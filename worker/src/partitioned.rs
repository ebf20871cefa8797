//! The worker in partitioned mode (`spec.workers.partitions`): hold a fair share of the partition
//! leases ([`crate::partition_lease`]) and run one ingest per held partition, on that partition's
//! AckAll consumer.
//!
//! Every `RENEW_EVERY` the coordinator renews its membership and its leases, gives back the
//! leases above its fair share (stopping their ingest first), and takes free ones up to it. A
//! partition's ingest is the usual puller, writer and dead-letter router, with three differences
//! that make one owner's AckAll safe:
//! - it stops pulling at its lease's pull fence and sends no ack after its ack fence, so a lease
//!   that could not be renewed stops the partition before another worker can take it;
//! - a stored batch is settled by one ack of the highest delivery with nothing unsettled below it
//!   (poison awaiting its dead letter, a late redelivery): the registry keeps what lies above such
//!   a delivery held until it is done ([`crate::held_messages`]), and the writer goes on;
//! - on taking over a consumer with deliveries still pending (the previous holder died or left
//!   messages unsettled), it waits for them to fall due for redelivery before pulling, and
//!   acknowledges nothing until every one of them has come back to it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use signal_clients::consumer_config::partition_consumer_config;
use signal_model::SignalPipelineSpec;
use signal_model::credentials::PipelineCredentials;
use signal_model::partitions::{
    LeaseTiming, PartitionScheme, RENEW_EVERY, claim_order, fair_share, share_is_final,
};
use signal_model::row_encoder::RowEncoder;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::batch::BatchLimits;
use crate::cache::{CacheLayout, CacheQueue};
use crate::clickhouse_sink::{ClickHouseSink, SinkTarget, replica_clients};
use crate::dead_letter::DeadLetterRouter;
use crate::health::Health;
use crate::held_messages::{HeldMessages, Recovery};
use crate::metrics::{Metrics, PartitionLabel};
use crate::partition_lease::{Fence, Lease, LeaseBoard, instance_name, takeover_wait};
use crate::pipeline::{DEAD_LETTER_QUEUE, PULL_FRAMING_BYTES, dead_letter_subject, until_ok};
use crate::source::{BatchRequest, Puller, next_batch};

/// What every partition's ingest shares.
pub struct Shared {
    pub pipeline: String,
    pub spec: SignalPipelineSpec,
    pub scheme: PartitionScheme,
    pub credentials: PipelineCredentials,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub clickhouse_healthy: Arc<AtomicBool>,
    pub cache: Option<CacheQueue>,
    pub ensure_consumer: bool,
}

/// A partition held by this worker and its running ingest.
struct Held {
    lease: Lease,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Holds partitions and ingests them until `shutdown`; then stops every ingest, lets the leases
/// go and leaves the members.
pub async fn run(shared: Shared, worker_name: &str, shutdown: &CancellationToken) {
    let shared = Arc::new(shared);
    let timing = LeaseTiming::for_max_wait(shared.spec.workers.batch.max_wait.0);
    let instance = instance_name(worker_name);
    let bucket = shared.scheme.lease_bucket();
    let Some(board) = until_ok("lease bucket not available; retrying", shutdown, || {
        LeaseBoard::open(&shared.js, &bucket, instance.clone(), timing)
    })
    .await
    else {
        return;
    };
    tracing::info!(
        instance = board.instance(),
        partitions = shared.scheme.count,
        bucket,
        "partitioned: holding a fair share of the partitions"
    );
    let mut held: BTreeMap<u32, Held> = BTreeMap::new();
    // Registered before claiming: workers started together see each other first, and take their
    // shares at once rather than one taking all and handing some over.
    if let Err(error) = board.register().await {
        tracing::warn!(%error, "membership not registered");
    }
    wait_for_peers(&board, shared.scheme.count, shutdown).await;
    let mut ticks = tokio::time::interval(RENEW_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        if let Err(error) = board.register().await {
            tracing::warn!(%error, "membership not renewed");
        }
        renew_or_drop(&board, &mut held, &shared).await;
        let live = match board.live_members().await {
            Ok(live) => live,
            Err(error) => {
                tracing::warn!(%error, "cannot count the live workers; keeping what is held");
                continue;
            }
        };
        let share = fair_share(shared.scheme.count, live) as usize;
        // Above the fair share: give back the highest partitions, each stopped before its lease
        // goes, so a newcomer gets them.
        while held.len() > share {
            let Some((partition, surplus)) = held.pop_last() else {
                break;
            };
            tracing::info!(partition, share, live, "giving a partition back");
            let_go(&board, surplus, &shared).await;
        }
        for partition in claim_order(board.instance(), shared.scheme.count) {
            if held.len() >= share {
                break;
            }
            if held.contains_key(&partition) {
                continue;
            }
            match board.try_acquire(partition).await {
                Ok(Some(lease)) => {
                    tracing::info!(partition, "partition acquired");
                    let stop = shutdown.child_token();
                    let task = tokio::spawn(ingest_partition(
                        shared.clone(),
                        partition,
                        lease.fence.clone(),
                        stop.clone(),
                    ));
                    set_held(&shared.metrics, partition, true);
                    held.insert(partition, Held { lease, stop, task });
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, partition, "cannot take the partition"),
            }
        }
    }
    // Every ingest is told to stop first, so they flush (and let their last pulls expire) at
    // once, not one after another.
    for partition in held.values() {
        partition.stop.cancel();
    }
    for (_, partition) in std::mem::take(&mut held) {
        let_go(&board, partition, &shared).await;
    }
    board.deregister().await;
}

/// How often a starting worker counts the members while it waits for its peers.
const PEER_POLL: Duration = Duration::from_millis(100);

/// Waits for the workers started together to register: one renewal at most, and no longer than
/// until there are enough of them that this worker's share is final ([`share_is_final`]), as
/// when `replicas` equals `partitions`.
async fn wait_for_peers(board: &LeaseBoard, partitions: u32, shutdown: &CancellationToken) {
    let deadline = Instant::now() + RENEW_EVERY;
    loop {
        if let Ok(live) = board.live_members().await
            && share_is_final(partitions, live)
        {
            tracing::debug!(
                live,
                "every partition has a worker; claiming without waiting"
            );
            return;
        }
        if Instant::now() >= deadline {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until((Instant::now() + PEER_POLL).min(deadline)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

fn set_held(metrics: &Metrics, partition: u32, on: bool) {
    metrics
        .partitions_held
        .get_or_create(&PartitionLabel { partition })
        .set(i64::from(on));
}

/// Renews every held lease. An ingest that ended (an insert it could not finish, its fence
/// passed) gives its lease back; a lease that someone else holds now (it expired) is dropped.
async fn renew_or_drop(board: &LeaseBoard, held: &mut BTreeMap<u32, Held>, shared: &Shared) {
    let partitions: Vec<u32> = held.keys().copied().collect();
    for partition in partitions {
        let Some(entry) = held.get_mut(&partition) else {
            continue;
        };
        if entry.task.is_finished() {
            if let Some(ended) = held.remove(&partition) {
                tracing::warn!(
                    partition,
                    "partition ingest ended; giving the partition back"
                );
                let_go(board, ended, shared).await;
            }
            continue;
        }
        if let Err(error) = board.renew(&mut entry.lease).await {
            if entry.lease.fence.may_ack() {
                tracing::warn!(%error, partition, "lease not renewed; retrying before its fence");
            } else if let Some(lost) = held.remove(&partition) {
                // Past the fence the ingest has stopped acknowledging; the lease is gone.
                tracing::warn!(%error, partition, "lease lost");
                lost.stop.cancel();
                let _ = lost.task.await;
                set_held(&shared.metrics, partition, false);
            }
        }
    }
}

/// Stops a partition's ingest (its last batch stored and acknowledged, its last pull expired)
/// and releases its lease.
async fn let_go(board: &LeaseBoard, partition: Held, shared: &Shared) {
    partition.stop.cancel();
    let _ = partition.task.await;
    let index = partition.lease.partition;
    board.release(partition.lease).await;
    set_held(&shared.metrics, index, false);
}

/// Runs one partition's ingest until `stop` or its fence; logs why it ended.
async fn ingest_partition(
    shared: Arc<Shared>,
    partition: u32,
    fence: Arc<Fence>,
    stop: CancellationToken,
) {
    match ingest(&shared, partition, &fence, &stop).await {
        Ok(()) => tracing::info!(partition, "partition ingest stopped"),
        Err(error) => tracing::error!(partition, %error, "partition ingest failed"),
    }
    // The last pull request may still deliver until it expires; the lease is given back only
    // after, so the next holder sees those deliveries as pending (and waits for them).
    let expiry = shared.spec.workers.batch.max_wait.0 + Duration::from_secs(1);
    tokio::time::sleep(expiry).await;
}

async fn partition_consumer(
    shared: &Shared,
    partition: u32,
    stop: &CancellationToken,
) -> Option<PullConsumer> {
    let name = shared.scheme.consumer_name(partition);
    until_ok(
        "partition consumer not available yet; retrying",
        stop,
        || async {
            let stream = shared
                .js
                .get_stream(&shared.spec.stream.name)
                .await
                .map_err(|e| e.to_string())?;
            if shared.ensure_consumer {
                let config = partition_consumer_config(
                    &shared.pipeline,
                    &shared.spec,
                    &shared.scheme,
                    partition,
                );
                stream
                    .get_or_create_consumer(&name, config)
                    .await
                    .map_err(|e| format!("consumer {name}: {e}"))
            } else {
                stream
                    .get_consumer(&name)
                    .await
                    .map_err(|e| format!("consumer {name}: {e}"))
            }
        },
    )
    .await
}

async fn ingest(
    shared: &Shared,
    partition: u32,
    fence: &Arc<Fence>,
    stop: &CancellationToken,
) -> Result<(), String> {
    let spec = &shared.spec;
    let Some(mut consumer) = partition_consumer(shared, partition, stop).await else {
        return Ok(());
    };
    let mut info = consumer.info().await.map_err(|e| e.to_string())?.clone();
    let ack_wait = info.config.ack_wait;
    let max_deliver = info.config.max_deliver;
    if info.num_ack_pending > 0 {
        let wait = takeover_wait(ack_wait);
        tracing::info!(
            partition,
            pending = info.num_ack_pending,
            wait_ms = wait.as_millis() as u64,
            "deliveries of the previous holder are pending; waiting for them to fall due"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return Ok(()),
        }
        info = consumer.info().await.map_err(|e| e.to_string())?.clone();
    }
    // Nothing is acknowledged before every delivery still pending has come back (an ack past one
    // would settle it unstored); if some stop coming, the partition is given up and taken again,
    // with a fresh count.
    let recovery = Recovery {
        through: info.delivered.stream_sequence,
        pending: info.num_ack_pending as u64,
    };
    let recovery_patience = takeover_wait(ack_wait) + spec.workers.batch.max_wait.0;
    let stream_created_unix_nanos = shared
        .js
        .get_stream(&spec.stream.name)
        .await
        .map_err(|e| e.to_string())?
        .cached_info()
        .created
        .unix_timestamp_nanos();

    let encoder = RowEncoder::new(
        &spec.clickhouse.columns,
        spec.workers.max_message_bytes.0 as usize,
    )
    .map_err(|errors| format!("{} column errors", errors.len()))?;
    let column_names: Vec<&str> = encoder.column_names().collect();
    let cache_layout = spec
        .cache
        .as_ref()
        .map(|cache| CacheLayout::new(cache, &column_names))
        .transpose()?;

    let pull_stop = stop.child_token();
    let keep_alive_stop = CancellationToken::new();
    // AckAll: every ack settles what lies below it, so acks go out only within the fence.
    let held = Arc::new(HeldMessages::cumulative(
        shared.nats.clone(),
        {
            let fence = fence.clone();
            Arc::new(move || fence.may_ack())
        },
        Some(recovery),
    ));
    let keep_alive = {
        let held = held.clone();
        let stop = keep_alive_stop.clone();
        tokio::spawn(async move {
            held.keep_alive((ack_wait / 3).max(Duration::from_millis(200)), stop)
                .await
        })
    };
    let fence_watch = tokio::spawn(watch_fence(
        partition,
        fence.clone(),
        pull_stop.clone(),
        keep_alive_stop.clone(),
    ));
    let (letter_sender, letter_receiver) = mpsc::channel(DEAD_LETTER_QUEUE);
    let router = DeadLetterRouter {
        subject: Some(dead_letter_subject(spec, &shared.pipeline)),
        stream: spec.stream.name.clone(),
        stream_created_unix_nanos,
        client: shared.nats.clone(),
        held: held.clone(),
        health: shared.health.clone(),
        metrics: shared.metrics.clone(),
        max_bytes_in_flight: spec.workers.batch.max_bytes.0 as usize,
    };
    let router_task = tokio::spawn(router.run(letter_receiver, pull_stop.clone()));
    let column_list = encoder.column_list();
    let sink = ClickHouseSink::new(
        replica_clients(&spec.clickhouse, &shared.credentials).map_err(|e| e.to_string())?,
        SinkTarget::of_pipeline(spec, &column_list, stream_created_unix_nanos),
        shared.metrics.clone(),
        shared.health.clone(),
        letter_sender.clone(),
        shared.clickhouse_healthy.clone(),
    );
    let puller = Puller {
        consumer,
        encoder,
        cache: cache_layout,
        limits: BatchLimits::from(&spec.workers.batch),
        min_pull_bytes: shared.nats.server_info().max_payload + PULL_FRAMING_BYTES,
        max_deliver,
        dead_letters: letter_sender,
        held: held.clone(),
        metrics: shared.metrics.clone(),
        partitioned: true,
    };
    let (request_sender, request_receiver) = mpsc::channel::<BatchRequest>(1);
    let puller_task = tokio::spawn(puller.run(request_receiver, pull_stop.clone()));
    tracing::info!(partition, "ingesting the partition");
    let outcome = write_loop(
        &sink,
        &held,
        request_sender,
        shared.cache.as_ref(),
        &shared.metrics,
        &pull_stop,
        fence,
        recovery_patience,
    )
    .await;
    pull_stop.cancel();
    let _ = puller_task.await;
    drop(sink);
    let _ = router_task.await;
    keep_alive_stop.cancel();
    let _ = keep_alive.await;
    fence_watch.abort();
    if let Err(error) = shared.nats.flush().await {
        tracing::warn!(%error, "flushing acknowledgements to NATS failed");
    }
    outcome
}

/// Stops pulling at the lease's pull fence and keeping messages alive at its ack fence, unless
/// renewals move them first.
async fn watch_fence(
    partition: u32,
    fence: Arc<Fence>,
    pull_stop: CancellationToken,
    keep_alive_stop: CancellationToken,
) {
    for (deadline, stop, what) in [
        (
            Fence::pull_deadline as fn(&Fence) -> Instant,
            &pull_stop,
            "pulling",
        ),
        (Fence::ack_deadline, &keep_alive_stop, "acknowledging"),
    ] {
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline(&fence)) => {}
                _ = stop.cancelled() => break,
            }
            if Instant::now() >= deadline(&fence) {
                tracing::warn!(
                    partition,
                    "lease not renewed in time: the partition stops {what}"
                );
                stop.cancel();
                break;
            }
        }
    }
}

/// Asks the puller for batches, stores each and settles it on the AckAll consumer, within the
/// fence: the registry acknowledges as far as is safe (`HeldMessages::acknowledge_done`).
#[allow(clippy::too_many_arguments)]
async fn write_loop(
    sink: &ClickHouseSink,
    held: &HeldMessages,
    requests: mpsc::Sender<BatchRequest>,
    cache: Option<&CacheQueue>,
    metrics: &Metrics,
    stop: &CancellationToken,
    fence: &Fence,
    recovery_patience: Duration,
) -> Result<(), String> {
    // The stored batch's buffer goes back to the puller with the next request.
    let mut spare_rows = None;
    // A takeover's pending deliveries still missing, and until when more of them must come back.
    let mut missing_before = held.still_missing();
    let mut recovery_deadline = Instant::now() + recovery_patience;
    loop {
        let Some(mut batch) = next_batch(&requests, spare_rows.take()).await else {
            return Ok(());
        };
        if let Err(error) = sink.store(&mut batch, stop).await {
            held.release(&batch.settle.replies, metrics);
            return Err(format!("batch not stored, left for redelivery: {error}"));
        }
        spare_rows = batch.take_buffer();
        let replies = &batch.settle.replies;
        if !fence.may_ack() {
            held.release(replies, metrics);
            return Err(
                "lease fence passed before the batch was acknowledged; it will be redelivered"
                    .into(),
            );
        }
        let failed = held.acknowledge_done(replies, metrics).await;
        if failed > 0 {
            tracing::warn!("acknowledgement not sent; the batch may be redelivered");
        }
        metrics.rows_inserted.inc_by(replies.len() as u64);
        metrics.batches_inserted.inc();
        if let Some(cache) = cache {
            cache.offer(std::mem::take(&mut batch.cache));
        }
        let missing = held.still_missing();
        if missing < missing_before {
            missing_before = missing;
            recovery_deadline = Instant::now() + recovery_patience;
        } else if missing > 0 && Instant::now() >= recovery_deadline {
            return Err(format!(
                "{missing} deliveries the previous holder left pending stopped coming back; \
                 what is stored and unacknowledged is left for redelivery"
            ));
        }
    }
}
