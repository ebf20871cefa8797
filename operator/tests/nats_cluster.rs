//! A pipeline on a three-node NATS JetStream cluster (nats-server 2.9.10, testkit's
//! `NatsCluster`), reached through a comma-separated seed list in `spec.nats.url`.
//!
//! - Replicas and placement: the operator's stream reconcile scales a stream 1 → 3 in place (a
//!   scale and a move in one spec change become two updates), and refuses what the cluster cannot
//!   do (5 replicas on 3 servers, a cluster that does not exist) with `PlacementImpossible` and
//!   the server's words, leaving the stream as it is.
//! - A node lost mid-stream: with `stream.replicas: 3`, two `signal-worker` processes ingest
//!   while the stream's leader is killed (SIGKILL, a crash) and later restarted. Every stream sequence is stored,
//!   duplicates are counted, and the longest stall of stored-row progress is printed; meanwhile
//!   the operator's data-plane reconcile keeps the stream ready and names the missing replica.

#[path = "support/dataplane.rs"]
mod support;
#[path = "support/worker_binary.rs"]
mod worker_binary;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use signal_model::credentials::NatsAuth;
use signal_model::manifest::PipelineManifest;
use signal_model::{ColumnSpec, HumanDuration, SignalPipelineSpec, StreamPlacement};
use signal_operator::dataplane::stream::{
    PLACEMENT_IMPOSSIBLE, REPLICAS_DEGRADED, SCALED_BEFORE_MOVE, STREAM_MOVING, reconcile_stream,
};
use signal_operator::dataplane::{DataPlaneReport, reconcile_data_plane};
use signal_testkit::{ChildProcess, NatsCluster};
use support::{
    STEP_TIMEOUT, clickhouse, clickhouse_query, live_consumer, live_stream, no_credentials,
    pipeline_spec, unique,
};

/// Signals published in the node-loss test, and how fast (the node is lost about a third in).
const SIGNALS: u64 = 30_000;
const CHUNK: u64 = 1000;
const CHUNK_PAUSE: Duration = Duration::from_millis(250);

/// A JetStream context through the seed list, connected the way the operator and worker connect.
async fn jetstream_on(urls: &str) -> jetstream::Context {
    let client = tokio::time::timeout(
        STEP_TIMEOUT,
        signal_clients::connect::nats(urls, "nats-cluster-test", &NatsAuth::None, None),
    )
    .await
    .expect("connecting in time")
    .expect("connecting through the seed list");
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .build(client)
}

/// A pipeline over the cluster with a table keyed by stream sequence.
fn cluster_spec(name: &str, cluster: &NatsCluster, replicas: u8) -> SignalPipelineSpec {
    let mut spec = pipeline_spec(name, &cluster.urls(), &clickhouse().http_url());
    spec.stream.replicas = replicas;
    spec.clickhouse.partition_by = None;
    spec.clickhouse.order_by = vec!["seq".to_string()];
    spec.clickhouse.columns = vec![
        ColumnSpec::new("seq", "UInt64", "@sequence"),
        ColumnSpec::new("n", "UInt64", "$.n"),
    ];
    spec.consumer.ack_wait = HumanDuration::from_secs(10);
    spec.workers.batch.max_rows = 1000;
    spec.workers.batch.max_wait = HumanDuration(Duration::from_millis(200));
    spec.validate(name).expect("the test's spec is valid");
    spec
}

/// Reconciles the stream until it is ready, as the controller's retries would (a request may go
/// unanswered while a replica group forms); at most five times.
async fn reconcile_ready(
    js: &jetstream::Context,
    spec: &signal_model::StreamSpec,
) -> signal_operator::dataplane::stream::StreamOutcome {
    let mut attempts = 0;
    loop {
        let outcome = reconcile_stream(js, spec).await;
        attempts += 1;
        if outcome.report.ready {
            return outcome;
        }
        assert!(
            attempts < 5,
            "not ready after {attempts} reconciles: {:?}",
            outcome.report
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_scale_up_in_place_and_impossible_placements_are_refused_with_a_reason() {
    let cluster = NatsCluster::start(3).expect("a three-node NATS cluster");
    let js = jetstream_on(&cluster.urls()).await;
    let name = unique("scale");
    let mut spec = cluster_spec(&name, &cluster, 1).stream;

    let created = reconcile_stream(&js, &spec).await;
    assert_eq!(created.report.reason, "Created", "{:?}", created.report);
    let live = live_stream(&js, &spec.name).await.expect("created");
    assert_eq!(live.config.num_replicas, 1);

    // 1 → 3 together with a placement: NATS refuses a scale and a move in one update, so the
    // operator scales in one reconcile and moves in the next.
    spec.replicas = 3;
    spec.placement = Some(StreamPlacement {
        cluster: Some(cluster.name().to_string()),
        tags: vec![],
    });
    let scaled = reconcile_stream(&js, &spec).await;
    assert_eq!(
        scaled.report.reason, SCALED_BEFORE_MOVE,
        "{:?}",
        scaled.report
    );
    assert_eq!(
        scaled.report.changes,
        [format!("scaled stream {}: replicas 1 → 3", spec.name)]
    );
    println!("replicas 1 → 3 with a placement: {}", scaled.report.message);
    let moved = reconcile_ready(&js, &spec).await;
    println!("then: {}", moved.report.message);
    let live = live_stream(&js, &spec.name).await.expect("still there");
    assert_eq!(live.config.num_replicas, 3);
    assert_eq!(
        live.config.placement.and_then(|p| p.cluster).as_deref(),
        Some(cluster.name())
    );

    // More replicas than servers: refused with the reason, the stream left at 3. A current
    // nats-server may still be carrying out the move to 3 (`StreamMoving`): later reconciles send
    // the change again.
    spec.replicas = 5;
    let mut refused = reconcile_stream(&js, &spec).await;
    for _ in 0..20 {
        if refused.report.reason != STREAM_MOVING {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        refused = reconcile_stream(&js, &spec).await;
    }
    assert!(!refused.report.ready);
    assert_eq!(
        refused.report.reason, PLACEMENT_IMPOSSIBLE,
        "{:?}",
        refused.report
    );
    assert!(
        refused.report.message.contains("5 replicas")
            && refused.report.message.contains("no suitable peers"),
        "{}",
        refused.report.message
    );
    assert!(refused.exists);
    println!("replicas 3 → 5 on 3 servers: {}", refused.report.message);
    let live = live_stream(&js, &spec.name).await.expect("still there");
    assert_eq!(live.config.num_replicas, 3);

    // A cluster no server belongs to, on a new stream: not created, with the reason.
    let mut elsewhere = cluster_spec(&unique("elsewhere"), &cluster, 3).stream;
    elsewhere.placement = Some(StreamPlacement {
        cluster: Some("no-such-cluster".to_string()),
        tags: vec!["ssd".to_string()],
    });
    let refused = reconcile_stream(&js, &elsewhere).await;
    assert_eq!(
        refused.report.reason, PLACEMENT_IMPOSSIBLE,
        "{:?}",
        refused.report
    );
    assert!(!refused.exists);
    assert!(live_stream(&js, &elsewhere.name).await.is_none());

    // Back to what the cluster can do: 3 → 1 is carried out.
    spec.replicas = 1;
    let down = reconcile_ready(&js, &spec).await;
    assert!(down.report.ready, "{:?}", down.report);
    let live = live_stream(&js, &spec.name).await.expect("still there");
    assert_eq!(live.config.num_replicas, 1);
}

/// What the sampler saw: (time, distinct sequences stored).
type Progress = Arc<Mutex<Vec<(Instant, u64)>>>;

fn distinct_sequences(database: &str, table: &str) -> Option<u64> {
    clickhouse()
        .query(&format!(
            "SELECT uniqExact(seq) FROM `{database}`.`{table}`"
        ))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Publishes `SIGNALS` messages `{"n": i}` in paced chunks, each with a `Nats-Msg-Id`, and
/// republishes any whose ack did not come (a leader election under way): the stream's duplicate
/// window stores each once.
async fn publish_paced(js: jetstream::Context, subject: String, published: Arc<AtomicU64>) {
    let mut next = 0;
    while next < SIGNALS {
        let mut pending: Vec<u64> = (next..(next + CHUNK).min(SIGNALS)).collect();
        while !pending.is_empty() {
            let mut acks = Vec::new();
            for &n in &pending {
                let message = PublishMessage::build()
                    .message_id(format!("signal-{n}"))
                    .payload(format!("{{\"n\":{n}}}").into());
                acks.push((n, js.send_publish(subject.clone(), message).await));
            }
            let mut failed = Vec::new();
            for (n, sent) in acks {
                let stored = match sent {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                };
                if !stored {
                    failed.push(n);
                }
            }
            if !failed.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            pending = failed;
        }
        next = (next + CHUNK).min(SIGNALS);
        published.store(next, Ordering::Relaxed);
        tokio::time::sleep(CHUNK_PAUSE).await;
    }
}

/// Reconciles with the operator's data-plane code until `accept` holds for the report.
async fn reconcile_until(
    name: &str,
    spec: &SignalPipelineSpec,
    what: &str,
    accept: impl Fn(&DataPlaneReport) -> bool,
) -> DataPlaneReport {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = reconcile_data_plane(name, spec, &no_credentials()).await;
        if accept(&report) {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last report: {report:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_mid_stream_loses_nothing_and_the_status_names_the_missing_replica() {
    let mut cluster = NatsCluster::start(3).expect("a three-node NATS cluster");
    let name = unique("nodeloss");
    let spec = cluster_spec(&name, &cluster, 3);

    // The operator's reconcile: stream, dead-letter stream and consumer with three replicas.
    let report = reconcile_until(&name, &spec, "a ready data plane", |r| {
        r.all_ready() && r.stream_status.as_ref().and_then(|s| s.current_replicas) == Some(3)
    })
    .await;
    println!("ready: {}", report.stream.message);
    let js = jetstream_on(&cluster.urls()).await;
    let dead_letter = live_stream(&js, &spec.dead_letter_stream().name)
        .await
        .expect("the dead-letter stream exists");
    assert_eq!(dead_letter.config.num_replicas, 3);
    let durable = spec.durable_name(&name).to_string();
    let consumer = live_consumer(&js, &spec.stream.name, &durable)
        .await
        .expect("the consumer exists");
    // The consumer asks for no replica count of its own and inherits the stream's three.
    assert_eq!(
        consumer.cluster.as_ref().map(|c| c.replicas.len() + 1),
        Some(3),
        "{:?}",
        consumer.cluster
    );

    // Two workers, the real binary, reading through the seed list.
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest_path = dir.path().join("pipeline.yaml");
    let manifest = PipelineManifest::new(&name, None, spec.clone());
    std::fs::write(&manifest_path, manifest.to_yaml().expect("YAML")).expect("manifest");
    let workers: Vec<ChildProcess> = (0..2)
        .map(|index| {
            let log = std::fs::File::create(dir.path().join(format!("worker-{index}.log")))
                .expect("log file");
            let mut command = Command::new(worker_binary::worker_binary());
            command
                .arg("--pipeline")
                .arg(&manifest_path)
                .args(["--listen", "127.0.0.1:0", "--log-format", "human"])
                .arg("--worker-name")
                .arg(format!("nodeloss-{index}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log handle"))
                .stderr(log);
            ChildProcess::spawn(command).expect("a worker starts")
        })
        .collect();

    // Progress: distinct sequences stored, sampled every 100 ms.
    let progress: Progress = Arc::default();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (progress, sampling) = (progress.clone(), sampling.clone());
        let (database, table) = (
            spec.clickhouse.database.clone(),
            spec.clickhouse.table.clone(),
        );
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                if let Some(distinct) = distinct_sequences(&database, &table) {
                    progress
                        .lock()
                        .expect("progress")
                        .push((Instant::now(), distinct));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let subject = format!("{name}.signals.tx");
    let published = Arc::new(AtomicU64::new(0));
    let publisher = tokio::spawn(publish_paced(js.clone(), subject, published.clone()));

    // Crash the stream's leader once a third is published and rows are being stored: the rest is
    // published while it is down and after it returns.
    let (database, table) = (&spec.clickhouse.database, &spec.clickhouse.table);
    let deadline = Instant::now() + Duration::from_secs(120);
    while published.load(Ordering::Relaxed) < SIGNALS / 3
        || distinct_sequences(database, table).unwrap_or(0) == 0
    {
        assert!(Instant::now() < deadline, "ingestion did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = live_stream(&js, &spec.stream.name)
        .await
        .and_then(|info| info.cluster?.leader)
        .expect("the stream has a leader");
    let lost = cluster
        .nodes()
        .iter()
        .position(|node| node.name() == leader)
        .expect("the leader is one of the nodes");
    let stopped_at = Instant::now();
    cluster.node_mut(lost).kill();
    println!(
        "killed {leader} (the stream's leader) at {} published",
        published.load(Ordering::Relaxed)
    );

    // The operator's view while the node is down: the stream still works, and the status names
    // the missing replica. Until the groups the node led (the stream's, the consumer's) have
    // elected a new leader, their requests time out and the part says `Unreachable`.
    let degraded = reconcile_until(&name, &spec, "the missing replica in the status", |r| {
        r.all_ready()
            && r.stream.reason == REPLICAS_DEGRADED
            && r.stream_status
                .as_ref()
                .is_some_and(|s| s.lagging_replicas == [leader.clone()])
    })
    .await;
    assert!(degraded.stream.ready, "{:?}", degraded.stream);
    assert!(degraded.all_ready(), "{degraded:#?}");
    assert!(
        degraded.stream.message.contains(&leader),
        "{}",
        degraded.stream.message
    );
    let status = degraded.stream_status.expect("stream figures");
    assert_eq!(status.current_replicas, Some(2));
    assert_ne!(status.leader.as_deref(), Some(leader.as_str()));
    println!(
        "during the outage ({:.1} s after the kill, the data plane ready again): {}",
        stopped_at.elapsed().as_secs_f64(),
        degraded.stream.message
    );

    // Back after a while, on its ports and store.
    tokio::time::sleep(Duration::from_secs(5)).await;
    tokio::task::block_in_place(|| {
        cluster.node_mut(lost).restart().expect("the node restarts");
        cluster.wait_ready().expect("the cluster answers");
    });
    let restarted_at = Instant::now();
    println!(
        "restarted {leader} at {} published",
        published.load(Ordering::Relaxed)
    );

    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "publishing did not end: {} of {SIGNALS} acknowledged, {:?} stored",
                published.load(Ordering::Relaxed),
                distinct_sequences(database, table)
            )
        })
        .expect("the publisher does not panic");
    let deadline = Instant::now() + Duration::from_secs(120);
    while distinct_sequences(database, table).unwrap_or(0) < SIGNALS {
        assert!(
            Instant::now() < deadline,
            "not every sequence was stored: {:?}",
            distinct_sequences(database, table)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.join().expect("sampler");

    let stream = live_stream(&js, &spec.stream.name).await.expect("stream");
    assert_eq!(
        stream.state.last_sequence, SIGNALS,
        "each signal stored once"
    );
    let summary = clickhouse_query(&format!(
        "SELECT count(), uniqExact(seq), min(seq), max(seq) FROM `{database}`.`{table}`"
    ));
    let figures: Vec<u64> = summary
        .split_whitespace()
        .map(|n| n.parse().expect("a number"))
        .collect();
    assert_eq!(figures[1..], [SIGNALS, 1, SIGNALS], "every sequence stored");
    let duplicates = figures[0] - figures[1];

    // The longest time stored progress stood still while signals were still arriving.
    let samples = progress.lock().expect("progress").clone();
    let mut longest = (Duration::ZERO, stopped_at);
    let mut last_change = samples.first().map(|s| s.0).unwrap_or(stopped_at);
    let mut last_value = 0;
    for (at, value) in samples {
        if value != last_value {
            if at - last_change > longest.0 {
                longest = (at - last_change, last_change);
            }
            last_change = at;
            last_value = value;
        }
    }
    let began = if longest.1 >= stopped_at {
        format!(
            "{:.1} s after the kill",
            (longest.1 - stopped_at).as_secs_f64()
        )
    } else {
        format!(
            "{:.1} s before the kill",
            (stopped_at - longest.1).as_secs_f64()
        )
    };
    println!(
        "node loss (leader SIGKILLed): {SIGNALS} signals, 3 replicas, 2 workers; longest stall \
         of stored rows {:.1} s (began {began}); node down {:.1} s; {duplicates} duplicate rows",
        longest.0.as_secs_f64(),
        (restarted_at - stopped_at).as_secs_f64(),
    );

    // Back to three current replicas.
    let healed = reconcile_until(&name, &spec, "three current replicas again", |r| {
        r.stream_status.as_ref().and_then(|s| s.current_replicas) == Some(3)
    })
    .await;
    assert_eq!(healed.stream.reason, "UpToDate", "{:?}", healed.stream);
    for mut worker in workers {
        worker
            .terminate(Duration::from_secs(10))
            .expect("the worker stops");
    }
}
