//! Partitioned consumers against real servers: nats-server 2.9 with the partition mapping in its
//! configuration, ClickHouse, and `signal-worker` binaries holding partition leases.
//!
//! Every delivery of every partition consumer is observed on the wire (the workers' inboxes), so
//! the tests can tell which worker process received each partition's messages, and when.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream;
use common::{BinaryWorker, TestEnv, sample_columns, wait_for};
use futures::StreamExt;
use signal_model::manifest::PipelineManifest;
use signal_model::partitions::PartitionScheme;
use signal_model::{HumanDuration, ddl};
use signal_testkit::NatsServer;

/// Distinct publish subjects (`<name>.k<N>`), hashed into the partitions.
const KEYS: u64 = 64;

/// A partitioned pipeline `name` (subjects `<name>.*`) over `env`'s servers.
fn partitioned_manifest(env: &TestEnv, name: &str, partitions: u32) -> PipelineManifest {
    let mut manifest = env.manifest(name, sample_columns());
    let spec = &mut manifest.spec;
    spec.stream.subjects = vec![format!("{name}.*")];
    spec.workers.partitions = Some(partitions);
    spec.consumer.ack_wait = HumanDuration::from_secs(4);
    manifest.spec.validate(name).expect("valid partitioned spec");
    manifest
}

fn scheme(manifest: &PipelineManifest) -> PartitionScheme {
    PartitionScheme::of(&manifest.spec, &manifest.metadata.name).expect("partitioned")
}

/// nats-server 2.9 with the pipeline's partition mapping, and ClickHouse.
fn start(name: &str, partitions: u32) -> (TestEnv, PipelineManifest) {
    let nats = {
        // The mapping depends only on the stream, its subject and the partition count.
        let mut spec = signal_model::SignalPipelineSpec::default();
        spec.stream.name = name.to_uppercase();
        spec.stream.subjects = vec![format!("{name}.*")];
        spec.workers.partitions = Some(partitions);
        let scheme = PartitionScheme::of(&spec, name).expect("partitioned");
        NatsServer::start_with_mappings(&[(scheme.source_subject.clone(), scheme.mapping_destination())])
            .expect("nats-server with mappings")
    };
    let env = TestEnv::start_with_nats(nats);
    let manifest = partitioned_manifest(&env, name, partitions);
    provision(&env, &manifest);
    (env, manifest)
}

/// The partitioned stream, a dead-letter stream and the table (what the operator does on 2.9;
/// the workers create the partition consumers with `--ensure-consumer`).
fn provision(env: &TestEnv, manifest: &PipelineManifest) {
    let spec = &manifest.spec;
    let scheme = scheme(manifest);
    env.runtime.block_on(async {
        env.jetstream
            .create_stream(stream::Config {
                name: spec.stream.name.clone(),
                subjects: vec![scheme.partitioned_subjects()],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .expect("create stream");
        env.jetstream
            .create_stream(stream::Config {
                name: format!("{}_DLQ", spec.stream.name),
                subjects: vec![format!("dlq.{}.>", spec.stream.name)],
                ..Default::default()
            })
            .await
            .expect("create dead-letter stream");
    });
    let create = ddl::create_table_sql(&spec.clickhouse, common::CLICKHOUSE_VERSION)
        .expect("table DDL for 18.16");
    env.clickhouse.query(&create).expect("create table");
}

/// Signal `index`, published on key subject `<name>.k<index % KEYS>`; every 97th is poison.
fn publish(env: &TestEnv, name: &str, indices: std::ops::Range<u64>) {
    let runtime = &env.runtime;
    runtime.block_on(async {
        for key in 0..KEYS {
            let subject = format!("{name}.k{key}");
            let payloads = indices
                .clone()
                .filter(|i| i % KEYS == key)
                .map(|i| {
                    if is_poison(i) {
                        format!("not json {i}").into_bytes()
                    } else {
                        signal_demo::sample_signals::sample_signal(i)
                    }
                })
                .collect::<Vec<_>>();
            common::publish_all(env.jetstream.clone(), subject, payloads.into_iter()).await;
        }
    });
}

fn is_poison(index: u64) -> bool {
    index % 97 == 13
}

fn poison_in(indices: std::ops::Range<u64>) -> u64 {
    indices.filter(|i| is_poison(*i)).count() as u64
}

/// Deliveries seen on the wire, per partition consumer: (receiving client, arrival) in order.
type Deliveries = Arc<Mutex<BTreeMap<String, Vec<(String, Instant)>>>>;

/// Watches every delivery to an `_INBOX` (the workers' pull replies): the consumer is in the ack
/// subject (`$JS.ACK.<stream>.<consumer>.…`), the client in the inbox (`_INBOX.<client>.…`).
fn watch_deliveries(env: &TestEnv) -> Deliveries {
    let seen: Deliveries = Arc::default();
    let mut subscription = env
        .runtime
        .block_on(env.client.subscribe("_INBOX.>"))
        .expect("subscribe to the inboxes");
    env.runtime.block_on(env.client.flush()).expect("flush");
    let sink = seen.clone();
    env.runtime.spawn(async move {
        while let Some(message) = subscription.next().await {
            let Some(reply) = &message.reply else { continue };
            let tokens: Vec<&str> = reply.split('.').collect();
            if tokens.len() < 4 || tokens[0] != "$JS" || tokens[1] != "ACK" {
                continue;
            }
            let client = message.subject.split('.').nth(1).unwrap_or("").to_string();
            sink.lock()
                .expect("deliveries")
                .entry(tokens[3].to_string())
                .or_default()
                .push((client, Instant::now()));
        }
    });
    seen
}

/// Each partition consumer's receiving clients in order, consecutive repeats merged: a client
/// that appears twice got deliveries of the partition before and after another client did, i.e.
/// two workers consumed one partition at once.
fn owners(deliveries: &Deliveries) -> BTreeMap<String, Vec<String>> {
    deliveries
        .lock()
        .expect("deliveries")
        .iter()
        .map(|(consumer, seen)| {
            let mut runs: Vec<String> = Vec::new();
            for (client, _) in seen {
                if runs.last() != Some(client) {
                    runs.push(client.clone());
                }
            }
            (consumer.clone(), runs)
        })
        .collect()
}

fn assert_never_doubled(deliveries: &Deliveries) {
    for (consumer, runs) in owners(deliveries) {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for client in &runs {
            *counts.entry(client).or_default() += 1;
        }
        assert!(
            counts.values().all(|n| *n == 1),
            "{consumer} was consumed by interleaved clients: {runs:?}"
        );
    }
}

fn dead_letters(env: &TestEnv, manifest: &PipelineManifest) -> u64 {
    env.runtime.block_on(async {
        let mut dlq = env
            .jetstream
            .get_stream(format!("{}_DLQ", manifest.spec.stream.name))
            .await
            .expect("dead-letter stream");
        dlq.info().await.expect("dead-letter info").state.messages
    })
}

fn partitions_held(worker: &BinaryWorker, partitions: u32) -> Vec<u32> {
    let Some((_, body)) = common::try_http_get(worker.metrics_addr, "/metrics") else {
        return Vec::new();
    };
    (0..partitions)
        .filter(|p| {
            body.lines().any(|line| {
                line == format!("signal_worker_partition_held{{partition=\"{p}\"}} 1")
            })
        })
        .collect()
}

#[test]
fn two_workers_share_three_partitions_and_store_every_message_once() {
    let name = "parta";
    let (env, manifest) = start(name, 3);
    let deliveries = watch_deliveries(&env);
    let first = env.spawn_binary(&manifest, "w1");
    let second = env.spawn_binary(&manifest, "w2");
    let total = 12_000;
    publish(&env, name, 0..total);
    let poison = poison_in(0..total);
    wait_for("every clean signal stored", Duration::from_secs(90), || {
        env.row_count(&manifest) >= total - poison && dead_letters(&env, &manifest) >= poison
    });
    wait_for("both workers hold partitions", Duration::from_secs(30), || {
        let (a, b) = (partitions_held(&first, 3), partitions_held(&second, 3));
        !a.is_empty() && !b.is_empty() && a.len() + b.len() == 3
    });
    // Nothing more arrives and each partition's consumer is settled.
    std::thread::sleep(Duration::from_secs(2));
    let summary = env.sequences(&manifest);
    assert_eq!(summary.rows, total - poison, "{summary:?}");
    assert_eq!(summary.distinct, total - poison, "{summary:?}");
    assert_eq!(dead_letters(&env, &manifest), poison);
    let table = ddl::qualified_table(common::DATABASE, name);
    let prefixed = env.query(&format!(
        "SELECT count() FROM {table} WHERE subject NOT LIKE '{name}.k%'"
    ));
    assert_eq!(prefixed, "0", "@subject is the published subject");
    let scheme = scheme(&manifest);
    env.runtime.block_on(async {
        let stream = env.jetstream.get_stream(&manifest.spec.stream.name).await.expect("stream");
        for partition in 0..3 {
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
                .get_consumer(&scheme.consumer_name(partition))
                .await
                .expect("partition consumer");
            let info = consumer.info().await.expect("consumer info");
            assert_eq!(
                (info.num_pending, info.num_ack_pending),
                (0, 0),
                "partition {partition} settled"
            );
            assert!(info.delivered.stream_sequence > 0, "partition {partition} received messages");
        }
    });
    assert_never_doubled(&deliveries);
    drop((first, second));
}

#[test]
fn a_sigkilled_partition_owner_loses_nothing_and_its_partitions_move_once() {
    let name = "partk";
    let partitions = 2;
    let (env, manifest) = start(name, partitions);
    let deliveries = watch_deliveries(&env);
    let mut victim = env.spawn_binary(&manifest, "victim");
    let survivor = env.spawn_binary(&manifest, "survivor");
    wait_for("each worker holds a partition", Duration::from_secs(30), || {
        partitions_held(&victim, partitions).len() == 1
            && partitions_held(&survivor, partitions).len() == 1
    });
    let total = 30_000;
    publish(&env, name, 0..total / 2);
    wait_for("the victim stores some rows", Duration::from_secs(30), || {
        victim.metric("signal_worker_rows_inserted_total").unwrap_or(0.0) > 0.0
    });
    // Mid-stream: batches in flight, one stored and not yet acknowledged perhaps.
    victim.process.kill_hard().expect("SIGKILL");
    publish(&env, name, total / 2..total);
    let replacement = env.spawn_binary(&manifest, "replacement");
    let poison = poison_in(0..total);
    wait_for("every signal stored after the kill", Duration::from_secs(120), || {
        env.sequences(&manifest).distinct >= total - poison
            && dead_letters(&env, &manifest) >= poison
    });
    std::thread::sleep(Duration::from_secs(2));
    let summary = env.sequences(&manifest);
    assert_eq!(summary.distinct, total - poison, "nothing lost: {summary:?}");
    // At most one batch per partition the victim held was stored and not acknowledged.
    let max_rows = u64::from(manifest.spec.workers.batch.max_rows);
    assert!(
        summary.duplicates() <= u64::from(partitions) * max_rows,
        "duplicates bounded: {summary:?}"
    );
    assert_never_doubled(&deliveries);
    let held = partitions_held(&survivor, partitions).len() + partitions_held(&replacement, partitions).len();
    assert_eq!(held, partitions as usize, "every partition is held again");
    drop((survivor, replacement));
}
