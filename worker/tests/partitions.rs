//! Partitioned consumers against real servers: nats-server 2.9 with the partition mapping in its
//! configuration (and the current release, partitioning by the stream's subject transform),
//! ClickHouse, and `signal-worker` binaries holding partition leases.
//!
//! Every write to a partition lease is observed on the wire, so the tests can tell that a
//! partition passed from one worker to another only once the first had let it go or its lease
//! had expired; the table tells that nothing was lost.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{kv, stream};
use common::{BinaryWorker, TestEnv, sample_columns, wait_for};
use futures::StreamExt;
use signal_model::manifest::PipelineManifest;
use signal_model::partitions::{LeaseTiming, PartitionScheme};
use signal_model::{HumanDuration, ddl};
use signal_testkit::NatsServer;
use signal_worker::partition_lease::LeaseBoard;

/// Distinct publish subjects (`<name>.k<N>`), hashed into the partitions.
const KEYS: u64 = 64;

/// A partitioned pipeline `name` (subjects `<name>.*`) over `env`'s servers.
fn partitioned_manifest(env: &TestEnv, name: &str, partitions: u32) -> PipelineManifest {
    let mut manifest = env.manifest(name, sample_columns());
    let spec = &mut manifest.spec;
    spec.stream.subjects = vec![format!("{name}.*")];
    spec.workers.partitions = Some(partitions);
    spec.consumer.ack_wait = HumanDuration::from_secs(4);
    manifest
        .spec
        .validate(name)
        .expect("valid partitioned spec");
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
        NatsServer::start_with_mappings(&[(
            scheme.source_subject.clone(),
            scheme.mapping_destination(),
        )])
        .expect("nats-server with mappings")
    };
    let env = TestEnv::start_with_nats(nats);
    let manifest = partitioned_manifest(&env, name, partitions);
    provision(&env, &manifest, Partitioner::ServerMapping);
    (env, manifest)
}

/// Who puts the partition token into a published subject.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Partitioner {
    /// nats-server 2.9: the mapping in the server's configuration.
    ServerMapping,
    /// nats-server 2.10+: the stream's subject transform.
    StreamTransform,
}

/// The partitioned stream, a dead-letter stream and the table (what the operator does; the
/// workers create the partition consumers with `--ensure-consumer`).
fn provision(env: &TestEnv, manifest: &PipelineManifest, partitioner: Partitioner) {
    let spec = &manifest.spec;
    let scheme = scheme(manifest);
    let (subjects, subject_transform) = match partitioner {
        Partitioner::ServerMapping => (vec![scheme.partitioned_subjects()], None),
        Partitioner::StreamTransform => (
            vec![scheme.partitioned_subjects(), scheme.source_subject.clone()],
            Some(stream::SubjectTransform {
                source: scheme.source_subject.clone(),
                destination: scheme.mapping_destination(),
            }),
        ),
    };
    env.runtime.block_on(async {
        env.jetstream
            .create_stream(stream::Config {
                name: spec.stream.name.clone(),
                subjects,
                subject_transform,
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

/// Every write to a partition lease the bucket stored, in order: (key, holder or `None` for a
/// release, the server's store time in nanoseconds).
type LeaseWrites = Arc<Mutex<Vec<(String, Option<String>, i128)>>>;

/// Watches the lease keys as the bucket stores them (the bucket is created first, as the
/// workers would).
fn watch_leases(env: &TestEnv, manifest: &PipelineManifest) -> LeaseWrites {
    let writes: LeaseWrites = Arc::default();
    let bucket = scheme(manifest).lease_bucket();
    let timing = LeaseTiming::for_max_wait(manifest.spec.workers.batch.max_wait.0);
    let mut watch = env.runtime.block_on(async {
        LeaseBoard::open(&env.jetstream, &bucket, "test".into(), timing)
            .await
            .expect("lease bucket");
        let store = env
            .jetstream
            .get_key_value(&bucket)
            .await
            .expect("lease store");
        store.watch("lease.>").await.expect("watch the leases")
    });
    let sink = writes.clone();
    env.runtime.spawn(async move {
        while let Some(Ok(entry)) = watch.next().await {
            let holder = (entry.operation == kv::Operation::Put)
                .then(|| String::from_utf8_lossy(&entry.value).into_owned());
            sink.lock().expect("lease writes").push((
                entry.key,
                holder,
                entry.created.unix_timestamp_nanos(),
            ));
        }
    });
    writes
}

/// A lease passes from one holder to another only after the first released it or stopped
/// renewing it for the lease's whole TTL (when the server expires it): never two holders at once.
fn assert_never_doubled(writes: &LeaseWrites, manifest: &PipelineManifest) {
    let ttl = LeaseTiming::for_max_wait(manifest.spec.workers.batch.max_wait.0).ttl;
    let writes = writes.lock().expect("lease writes");
    let mut last: HashMap<&str, (Option<&str>, i128)> = HashMap::new();
    let mut handovers = 0;
    for (key, holder, at) in writes.iter() {
        if let (Some(new), Some((Some(previous), previous_at))) =
            (holder.as_deref(), last.get(key.as_str()))
            && new != *previous
        {
            let gap = Duration::from_nanos(u64::try_from(at - previous_at).unwrap_or(0));
            assert!(
                gap >= ttl,
                "{key} went from {previous} to {new} after {gap:?}, within the TTL {ttl:?}"
            );
            handovers += 1;
        }
        last.insert(key, (holder.as_deref(), *at));
    }
    assert!(!writes.is_empty(), "lease writes were observed");
    eprintln!(
        "{} lease writes, {handovers} taken over after expiry",
        writes.len()
    );
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
            body.lines()
                .any(|line| line == format!("signal_worker_partition_held{{partition=\"{p}\"}} 1"))
        })
        .collect()
}

#[test]
fn two_workers_share_three_partitions_and_store_every_message_once() {
    let name = "parta";
    let (env, manifest) = start(name, 3);
    two_workers_drain_every_partition(name, &env, &manifest);
}

/// nats-server 2.10+ partitions by the stream's subject transform, without anything in the
/// server's configuration: the current release the suite builds (`scripts/build-current-nats.sh`).
#[test]
fn on_a_current_nats_server_two_workers_drain_a_stream_partitioned_by_its_transform() {
    let name = "partt";
    let env =
        TestEnv::start_with_nats(NatsServer::start_current().expect("the current nats-server"));
    assert_eq!(
        env.jetstream.client().server_info().version,
        signal_testkit::CURRENT_NATS_VERSION
    );
    let manifest = partitioned_manifest(&env, name, 3);
    provision(&env, &manifest, Partitioner::StreamTransform);
    two_workers_drain_every_partition(name, &env, &manifest);
}

/// Two workers share three partitions of `name`'s stream: every clean signal stored once, every
/// poison one dead-lettered, `@subject` the published subject, every partition's consumer
/// settled, and no partition ever held by two workers.
fn two_workers_drain_every_partition(name: &str, env: &TestEnv, manifest: &PipelineManifest) {
    let leases = watch_leases(env, manifest);
    let first = env.spawn_binary(manifest, "w1");
    let second = env.spawn_binary(manifest, "w2");
    let total = 12_000;
    publish(env, name, 0..total);
    let poison = poison_in(0..total);
    wait_for("every clean signal stored", Duration::from_secs(90), || {
        env.row_count(manifest) >= total - poison && dead_letters(env, manifest) >= poison
    });
    wait_for(
        "both workers hold partitions",
        Duration::from_secs(30),
        || {
            let (a, b) = (partitions_held(&first, 3), partitions_held(&second, 3));
            !a.is_empty() && !b.is_empty() && a.len() + b.len() == 3
        },
    );
    // Nothing more arrives and each partition's consumer is settled.
    std::thread::sleep(Duration::from_secs(2));
    let summary = env.sequences(manifest);
    assert_eq!(summary.rows, total - poison, "{summary:?}");
    assert_eq!(summary.distinct, total - poison, "{summary:?}");
    assert_eq!(dead_letters(env, manifest), poison);
    let table = ddl::qualified_table(common::DATABASE, name);
    let prefixed = env.query(&format!(
        "SELECT count() FROM {table} WHERE subject NOT LIKE '{name}.k%'"
    ));
    assert_eq!(prefixed, "0", "@subject is the published subject");
    let scheme = scheme(manifest);
    env.runtime.block_on(async {
        let stream = env
            .jetstream
            .get_stream(&manifest.spec.stream.name)
            .await
            .expect("stream");
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
            assert!(
                info.delivered.stream_sequence > 0,
                "partition {partition} received messages"
            );
        }
    });
    assert_never_doubled(&leases, manifest);
    drop((first, second));
}

#[test]
fn a_sigkilled_partition_owner_loses_nothing_and_its_partitions_move_once() {
    let name = "partk";
    let partitions = 2;
    let (env, manifest) = start(name, partitions);
    let leases = watch_leases(&env, &manifest);
    let mut victim = env.spawn_binary(&manifest, "victim");
    let survivor = env.spawn_binary(&manifest, "survivor");
    wait_for(
        "each worker holds a partition",
        Duration::from_secs(30),
        || {
            partitions_held(&victim, partitions).len() == 1
                && partitions_held(&survivor, partitions).len() == 1
        },
    );
    let total = 30_000;
    publish(&env, name, 0..total / 2);
    wait_for(
        "the victim stores some rows",
        Duration::from_secs(30),
        || {
            victim
                .metric("signal_worker_rows_inserted_total")
                .unwrap_or(0.0)
                > 0.0
        },
    );
    // Mid-stream: batches in flight, one stored and not yet acknowledged perhaps.
    victim.process.kill_hard().expect("SIGKILL");
    publish(&env, name, total / 2..total);
    let replacement = env.spawn_binary(&manifest, "replacement");
    let poison = poison_in(0..total);
    wait_for(
        "every signal stored after the kill",
        Duration::from_secs(120),
        || {
            env.sequences(&manifest).distinct >= total - poison
                && dead_letters(&env, &manifest) >= poison
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let summary = env.sequences(&manifest);
    eprintln!("after the kill: {summary:?}");
    assert_eq!(
        summary.distinct,
        total - poison,
        "nothing lost: {summary:?}"
    );
    // At most one batch per partition the victim held was stored and not acknowledged.
    let max_rows = u64::from(manifest.spec.workers.batch.max_rows);
    assert!(
        summary.duplicates() <= u64::from(partitions) * max_rows,
        "duplicates bounded: {summary:?}"
    );
    assert_never_doubled(&leases, &manifest);
    let held = partitions_held(&survivor, partitions).len()
        + partitions_held(&replacement, partitions).len();
    assert_eq!(held, partitions as usize, "every partition is held again");
    drop((survivor, replacement));
}
