//! The worker against a real ClickHouse cluster: two clickhouse-server 18.16 replicas of one shard
//! and their ZooKeeper (testkit's `ClickHouseCluster`), a `ReplicatedMergeTree` table created
//! `ON CLUSTER`.
//!
//! - A sealed batch stored twice (a retry after a lost answer), then once more through the other
//!   replica (a retry after failing over), is stored once on both replicas: the sink resends the
//!   very same block and the replicated table deduplicates it.
//! - A worker writing through replica 1 while it is killed mid-stream and restarted fails over to
//!   replica 2; afterwards both replicas hold every sequence exactly once (`count()` =
//!   `uniqExact(seq)` = published).
//!
//! The figures (failover stall, rows per replica) are printed with `--nocapture`.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use common::{publish_all, sample_columns, wait_for};
use signal_clients::connect;
use signal_clients::consumer_config::desired_consumer_config;
use signal_model::credentials::{PipelineCredentials, UserPassword};
use signal_model::manifest::PipelineManifest;
use signal_model::row_encoder::{MessageMeta, RowEncoder};
use signal_model::{ClickHouseClusterSpec, HumanDuration, ServerVersion, SignalPipelineSpec, ddl};
use signal_testkit::{ClickHouseCluster, ClickHouseServer, NatsServer};
use signal_worker::batch::{Batch, SealedBatch};
use signal_worker::clickhouse_sink::{ClickHouseSink, Replicas, SinkTarget};
use signal_worker::health::Health;
use signal_worker::metrics::Metrics;
use signal_worker::pipeline::{self, WorkerOptions};
use tokio_util::sync::CancellationToken;

const DATABASE: &str = "signal_cluster_test";
const VERSION: ServerVersion = ServerVersion::new(18, 16);

/// A pipeline over `cluster` (writing through replica 1, failing over to replica 2) and `nats`.
fn cluster_manifest(cluster: &ClickHouseCluster, nats_url: &str, name: &str) -> PipelineManifest {
    let urls = cluster.http_urls();
    let mut spec = SignalPipelineSpec::default();
    spec.nats.url = nats_url.to_string();
    spec.stream.name = name.to_uppercase();
    spec.stream.subjects = vec![format!("{name}.>")];
    spec.stream.replicas = 1;
    spec.clickhouse.url = urls[0].clone();
    spec.clickhouse.database = DATABASE.into();
    spec.clickhouse.table = name.into();
    spec.clickhouse.engine = "ReplicatedMergeTree".into();
    spec.clickhouse.order_by = vec!["seq".into()];
    spec.clickhouse.columns = sample_columns();
    spec.clickhouse.cluster = Some(ClickHouseClusterSpec {
        name: cluster.name().to_string(),
        replica_urls: urls[1..].to_vec(),
        ..Default::default()
    });
    spec.consumer.ack_wait = HumanDuration::from_secs(10);
    spec.workers.batch.max_rows = 500;
    spec.workers.batch.max_wait = HumanDuration(Duration::from_millis(200));
    let manifest = PipelineManifest::new(name, None, spec);
    manifest
        .spec
        .validate(name)
        .expect("the test's spec is valid");
    manifest
}

/// The database and the replicated table, created `ON CLUSTER` as the operator does.
fn create_table(cluster: &ClickHouseCluster, manifest: &PipelineManifest) {
    let spec = &manifest.spec.clickhouse;
    let first = cluster.replica(0);
    first
        .query(&ddl::create_database_sql(DATABASE, spec.cluster_name()))
        .expect("create database on the cluster");
    first
        .query(&ddl::create_table_sql(spec, VERSION).expect("DDL"))
        .expect("create table on the cluster");
}

/// `count()` and `uniqExact(seq)` of the table on one replica, after it fetched every part.
fn counts(replica: &ClickHouseServer, table: &str) -> (u64, u64) {
    replica
        .query(&format!("SYSTEM SYNC REPLICA {DATABASE}.{table}"))
        .expect("sync replica");
    let text = replica
        .query(&format!(
            "SELECT count(), uniqExact(seq) FROM {DATABASE}.{table}"
        ))
        .expect("count");
    let numbers: Vec<u64> = text
        .trim()
        .split('\t')
        .map(|n| n.parse().expect("a number"))
        .collect();
    (numbers[0], numbers[1])
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A batch of sample signals `1..=rows` as the worker's source seals it.
fn sealed_batch(encoder: &RowEncoder, rows: u64) -> SealedBatch {
    let mut batch = Batch::with_capacity(64 * 1024);
    for sequence in 1..=rows {
        let payload = signal_demo::sample_signals::sample_signal(sequence);
        let meta = MessageMeta {
            subject: "dedup.signal",
            stream_sequence: sequence,
            timestamp_nanos: 1_700_000_000_000_000_000,
            headers: None,
        };
        encoder
            .encode(&payload, &meta, batch.buffer())
            .expect("a sample signal is a row");
        batch.push(
            async_nats::Subject::from(format!("$JS.ACK.reply.{sequence}")),
            sequence,
            payload.len(),
            None,
        );
    }
    batch.seal()
}

fn sink_through(urls: &[String], table: &str, encoder: &RowEncoder) -> ClickHouseSink {
    let replicas = Replicas {
        clients: urls
            .iter()
            .map(|url| {
                (
                    url.clone(),
                    connect::clickhouse(url, &UserPassword::default(), None).unwrap(),
                )
            })
            .collect(),
        tls: None,
    };
    let (letters, _) = tokio::sync::mpsc::channel(1);
    ClickHouseSink::new(
        replicas,
        SinkTarget {
            database: DATABASE,
            table,
            distributed: false,
            columns: &sample_columns(),
            column_list: &encoder.column_list(),
            stream: "DEDUP",
            stream_created_unix_nanos: 1,
        },
        Arc::new(Metrics::new()),
        Arc::new(Health::new()),
        letters,
        Arc::new(AtomicBool::new(false)),
    )
}

#[test]
fn a_retried_batch_is_stored_once_on_every_replica_even_through_the_other_replica() {
    let cluster = ClickHouseCluster::start(2).expect("ClickHouse cluster");
    let manifest = cluster_manifest(&cluster, "nats://127.0.0.1:4222", "dedup");
    create_table(&cluster, &manifest);
    let encoder = RowEncoder::new(&sample_columns(), 1 << 20).expect("encoder");
    let runtime = runtime();
    let urls = cluster.http_urls();
    let shutdown = CancellationToken::new();

    let first = sink_through(&urls, "dedup", &encoder);
    let mut batch = sealed_batch(&encoder, 1000);
    runtime.block_on(async {
        first.probe().await.unwrap();
        first.store(&mut batch, &shutdown).await.expect("stored");
        // The same batch again: a retry after an answer that was lost.
        first.store(&mut batch, &shutdown).await.expect("stored");
    });
    // And through the other replica: a retry after failing over.
    let reversed: Vec<String> = urls.iter().rev().cloned().collect();
    let second = sink_through(&reversed, "dedup", &encoder);
    runtime.block_on(async {
        second.probe().await.unwrap();
        second.store(&mut batch, &shutdown).await.expect("stored");
    });
    for (index, replica) in cluster.replicas().iter().enumerate() {
        assert_eq!(
            counts(replica, "dedup"),
            (1000, 1000),
            "replica {} holds the batch once",
            index + 1
        );
    }
    // A different batch (one more row) is a different block: stored.
    let mut bigger = sealed_batch(&encoder, 1001);
    runtime.block_on(async { first.store(&mut bigger, &shutdown).await.expect("stored") });
    assert_eq!(counts(cluster.replica(1), "dedup"), (2001, 1001));
}

#[test]
fn a_replica_killed_mid_stream_loses_and_doubles_nothing() {
    const SIGNALS: u64 = 30_000;
    let mut cluster = ClickHouseCluster::start(2).expect("ClickHouse cluster");
    let nats = NatsServer::start().expect("nats-server");
    let manifest = cluster_manifest(&cluster, &nats.url(), "failover");
    create_table(&cluster, &manifest);
    let runtime = runtime();
    let client = runtime
        .block_on(async_nats::connect(nats.url()))
        .expect("NATS client");
    let js = {
        let _entered = runtime.enter();
        jetstream::new(client)
    };
    runtime.block_on(async {
        let stream = js
            .create_stream(stream::Config {
                name: manifest.spec.stream.name.clone(),
                subjects: manifest.spec.stream.subjects.clone(),
                ..Default::default()
            })
            .await
            .expect("stream");
        stream
            .create_consumer(desired_consumer_config("failover", &manifest.spec))
            .await
            .expect("consumer");
    });

    let shutdown = CancellationToken::new();
    let options = WorkerOptions {
        manifest: manifest.clone(),
        credentials: PipelineCredentials::default(),
        listen: "127.0.0.1:0".parse().expect("address"),
        ensure_consumer: false,
        worker_name: "cluster-test".to_string(),
    };
    let worker = runtime.spawn(pipeline::run(options, shutdown.clone(), None));

    let publish = |range: std::ops::Range<u64>| {
        runtime.block_on(publish_all(
            js.clone(),
            "failover.signal".to_string(),
            range.map(signal_demo::sample_signals::sample_signal),
        ))
    };
    let stored_on = |cluster: &ClickHouseCluster, index: usize| {
        cluster
            .replica(index)
            .query("SELECT uniqExact(seq) FROM signal_cluster_test.failover")
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };

    publish(0..SIGNALS / 3);
    wait_for("rows through replica 1", Duration::from_secs(60), || {
        stored_on(&cluster, 0) > 0
    });
    // Replica 1, the one the worker writes through, crashes while signals keep coming.
    let stored_at_kill = stored_on(&cluster, 0);
    cluster.replica_mut(0).kill();
    let killed = Instant::now();
    publish(SIGNALS / 3..2 * SIGNALS / 3);
    let before = stored_on(&cluster, 1);
    wait_for("rows through replica 2", Duration::from_secs(60), || {
        stored_on(&cluster, 1) > before
    });
    let stall = killed.elapsed();
    cluster
        .replica_mut(0)
        .restart()
        .expect("replica 1 restarts");
    publish(2 * SIGNALS / 3..SIGNALS);
    for index in 0..2 {
        wait_for(
            &format!("every signal on replica {}", index + 1),
            Duration::from_secs(120),
            || stored_on(&cluster, index) == SIGNALS,
        );
    }
    shutdown.cancel();
    runtime
        .block_on(worker)
        .expect("worker task")
        .expect("worker exits cleanly");

    for (index, replica) in cluster.replicas().iter().enumerate() {
        let (rows, distinct) = counts(replica, "failover");
        println!(
            "replica {}: {rows} rows, {distinct} distinct sequences of {SIGNALS} published",
            index + 1
        );
        assert_eq!(
            (rows, distinct),
            (SIGNALS, SIGNALS),
            "replica {} holds every signal once",
            index + 1
        );
    }
    println!(
        "replica 1 killed mid-stream ({stored_at_kill} of the first {} signals stored): rows \
         flowed through replica 2 within {:.1} s",
        SIGNALS / 3,
        stall.as_secs_f64()
    );
}
