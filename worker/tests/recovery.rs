//! Failures mid-stream: the worker binary killed with SIGKILL and restarted, ClickHouse stopped
//! and restarted, NATS restarted under a running worker, and two workers sharing one durable
//! consumer. In every case no stream sequence
//! is missing from the table, and duplicates stay within the documented bound: rows stored but
//! not yet acknowledged when a worker dies (at most one batch) are redelivered.

mod common;

use std::time::{Duration, Instant};

use common::{TestEnv, http_get, sample_columns, wait_for};
use signal_model::HumanDuration;

/// Publishes `total` sample signals on `subject` in chunks, pausing between chunks, so the
/// stream keeps growing while the worker runs.
fn publish_paced(
    env: &TestEnv,
    subject: &str,
    total: u64,
    chunk: u64,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    let jetstream = env.jetstream.clone();
    let subject = subject.to_string();
    env.runtime.spawn(async move {
        let mut next = 0;
        while next < total {
            let end = (next + chunk).min(total);
            common::publish_all(
                jetstream.clone(),
                subject.clone(),
                (next..end).map(signal_demo::sample_signals::sample_signal),
            )
            .await;
            next = end;
            tokio::time::sleep(pause).await;
        }
    })
}

#[test]
fn the_binary_killed_with_sigkill_and_restarted_loses_nothing() {
    let env = TestEnv::start();
    let mut manifest = env.manifest("killed", sample_columns());
    // Redelivery of what the killed worker held waits for the ack wait; keep it short.
    manifest.spec.consumer.ack_wait = HumanDuration::from_secs(3);
    env.provision(&manifest);
    const MESSAGES: u64 = 30_000;
    let publisher = publish_paced(
        &env,
        "killed.signals",
        MESSAGES,
        1_000,
        Duration::from_millis(100),
    );

    let mut first = env.spawn_binary(&manifest, "first");
    wait_for("a few batches stored", Duration::from_secs(60), || {
        env.row_count(&manifest) >= 3_000
    });
    first.process.kill_hard().expect("SIGKILL");
    let at_kill = env.row_count(&manifest);
    assert!(
        at_kill < MESSAGES,
        "the kill must land mid-stream ({at_kill} rows)"
    );

    let second = env.spawn_binary(&manifest, "second");
    env.runtime.block_on(publisher).expect("publisher");
    wait_for("every sequence stored", Duration::from_secs(90), || {
        env.sequences(&manifest).distinct == MESSAGES
    });
    wait_for("everything acknowledged", Duration::from_secs(30), || {
        env.consumer_settled(&manifest)
    });
    let summary = env.sequences(&manifest);
    assert!(
        summary.covers(MESSAGES),
        "{summary:?}\n{}",
        second.log_text()
    );
    // README, "Duplicate bound": at most one stored batch whose acks had not reached NATS (the
    // batch being filled was never stored, so its redelivery duplicates nothing).
    let bound = u64::from(manifest.spec.workers.batch.max_rows);
    assert!(
        summary.duplicates() <= bound,
        "{} duplicates exceed {bound}: {summary:?}",
        summary.duplicates()
    );
    println!(
        "killed at {at_kill} rows; {} duplicate rows after restart",
        summary.duplicates()
    );
}

#[test]
fn clickhouse_stopped_and_restarted_mid_stream_loses_nothing() {
    let mut env = TestEnv::start();
    let mut manifest = env.manifest("outage", sample_columns());
    // The outage below outlasts the ack wait: only progress acks keep the batches from redelivery.
    manifest.spec.consumer.ack_wait = HumanDuration::from_secs(2);
    env.provision(&manifest);
    let worker = env.start_worker(&manifest);
    env.publish_samples("outage.signals", 0..5_000);
    wait_for("some rows", Duration::from_secs(30), || {
        env.row_count(&manifest) >= 1_000
    });

    env.clickhouse.stop();
    env.publish_samples("outage.signals", 5_000..10_000);
    wait_for(
        "not ready while ClickHouse is down",
        Duration::from_secs(20),
        || http_get(worker.metrics_addr, "/readyz").0 == 503,
    );
    let down_since = Instant::now();
    while down_since.elapsed() < manifest.spec.consumer.ack_wait.0 * 2 {
        assert_eq!(http_get(worker.metrics_addr, "/healthz").0, 200);
        std::thread::sleep(Duration::from_millis(200));
    }
    let info = env.consumer_info(&manifest);
    assert!(
        info.num_ack_pending <= 2 * manifest.spec.workers.batch.max_rows as usize,
        "the worker stops pulling while it cannot store: {info:?}"
    );
    env.clickhouse.restart().expect("ClickHouse restarts");

    wait_for("every sequence stored", Duration::from_secs(60), || {
        env.sequences(&manifest).distinct == 10_000
    });
    wait_for("everything acknowledged", Duration::from_secs(30), || {
        env.consumer_settled(&manifest)
    });
    let summary = env.sequences(&manifest);
    assert!(summary.covers(10_000), "{summary:?}");
    // Only an insert cut off by the stop may have been stored without its answer arriving.
    assert!(
        summary.duplicates() <= u64::from(manifest.spec.workers.batch.max_rows),
        "{summary:?}"
    );
    let info = env.consumer_info(&manifest);
    assert_eq!(
        info.num_redelivered, 0,
        "progress acks kept every held message: {info:?}"
    );
    assert!(worker.metric("signal_worker_insert_retries_total") > 0.0);
    wait_for("ready again", Duration::from_secs(10), || {
        http_get(worker.metrics_addr, "/readyz").0 == 200
    });
    worker.stop(&env).expect("clean stop");
}

#[test]
fn nats_restarted_under_a_running_worker_loses_nothing() {
    let mut env = TestEnv::start();
    let mut manifest = env.manifest("reconnect", sample_columns());
    manifest.spec.consumer.ack_wait = HumanDuration::from_secs(3);
    env.provision(&manifest);
    let worker = env.start_worker(&manifest);
    env.publish_samples("reconnect.signals", 0..5_000);
    wait_for("some rows", Duration::from_secs(30), || {
        env.row_count(&manifest) >= 1_000
    });

    // Same port and store: the stream and the consumer survive, the worker must reconnect.
    env.nats.restart().expect("NATS restarts");
    wait_for("the worker ready again", Duration::from_secs(30), || {
        http_get(worker.metrics_addr, "/readyz").0 == 200
    });
    // The test's own client reconnects by itself as well.
    env.publish_samples("reconnect.signals", 5_000..10_000);
    wait_for("every sequence stored", Duration::from_secs(60), || {
        env.sequences(&manifest).distinct == 10_000
    });
    wait_for("everything acknowledged", Duration::from_secs(30), || {
        env.consumer_settled(&manifest)
    });
    let summary = env.sequences(&manifest);
    assert!(summary.covers(10_000), "{summary:?}");
    println!(
        "{} duplicate rows after the NATS restart",
        summary.duplicates()
    );
    worker.stop(&env).expect("clean stop");
}

#[test]
fn two_workers_on_one_durable_consumer_store_each_message_once() {
    let env = TestEnv::start();
    let manifest = env.manifest("shared", sample_columns());
    env.provision(&manifest);
    const MESSAGES: u64 = 20_000;
    let first = env.start_worker(&manifest);
    let second = env.start_worker(&manifest);
    env.publish_samples("shared.signals", 0..MESSAGES);

    wait_for("every sequence stored", Duration::from_secs(60), || {
        env.row_count(&manifest) >= MESSAGES
    });
    wait_for("everything acknowledged", Duration::from_secs(30), || {
        env.consumer_settled(&manifest)
    });
    let summary = env.sequences(&manifest);
    assert_eq!(summary.rows, MESSAGES, "{summary:?}");
    assert!(summary.covers(MESSAGES), "{summary:?}");
    let (by_first, by_second) = (
        first.metric("signal_worker_rows_inserted_total"),
        second.metric("signal_worker_rows_inserted_total"),
    );
    assert_eq!(by_first + by_second, MESSAGES as f64);
    assert!(
        by_first > 0.0 && by_second > 0.0,
        "both workers took a share: {by_first} + {by_second}"
    );
    first.stop(&env).expect("clean stop");
    second.stop(&env).expect("clean stop");
}
