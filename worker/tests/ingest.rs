//! Ingestion end to end against real servers: every message becomes exactly one row, batches
//! flush on their limits, the health and metrics endpoints tell the truth, and SIGTERM or SIGINT
//! flushes and acknowledges before the binary exits 0.

mod common;

use std::time::Duration;

use common::{TestEnv, http_get, metric, sample_columns, wait_for};
use signal_model::HumanDuration;

#[test]
fn ten_thousand_messages_become_ten_thousand_rows_each_sequence_once() {
    let env = TestEnv::start();
    let manifest = env.manifest("exact", sample_columns());
    env.provision(&manifest);
    const MESSAGES: u64 = 10_000;
    env.publish_samples("exact.signals", 0..MESSAGES);

    let worker = env.start_worker(&manifest);
    wait_for("10k rows", Duration::from_secs(60), || {
        env.row_count(&manifest) >= MESSAGES
    });
    wait_for(
        "every message acknowledged",
        Duration::from_secs(20),
        || env.consumer_settled(&manifest),
    );
    // Each message was delivered once: no pull was ended with deliveries still unread.
    assert_eq!(env.consumer_info(&manifest).num_redelivered, 0);

    let summary = env.sequences(&manifest);
    assert_eq!(summary.rows, MESSAGES, "{summary:?}");
    assert!(summary.covers(MESSAGES), "{summary:?}");
    assert_eq!(
        worker.metric("signal_worker_rows_inserted_total"),
        MESSAGES as f64
    );
    // 500-row batches: at least 20 inserts.
    assert!(worker.metric("signal_worker_batches_inserted_total") >= 20.0);

    // The rows hold what the messages said (sample 7, at sequence 8, is a "transfer" of severity 1).
    assert_eq!(
        env.query(
            "SELECT subject, event_type, severity, toString(amount), payload, toString(event_time) \
             FROM signal_test.exact WHERE seq = 8 FORMAT TSV"
        ),
        "exact.signals\ttransfer\t1\t7.07\t\
         {\"amount\":7.07,\"currency\":\"USD\"}\t2026-01-01 00:00:00"
    );
    worker.stop(&env).expect("clean stop");
}

#[test]
fn the_partial_batch_that_ends_a_burst_does_not_wait_for_max_wait() {
    let env = TestEnv::start();
    let mut manifest = env.manifest("burst", sample_columns());
    // Two full batches and a partial one; the partial one would wait a minute on its own.
    manifest.spec.workers.batch.max_rows = 400;
    manifest.spec.workers.batch.max_wait = HumanDuration::from_secs(60);
    // At least three times maxWait, or the worker refuses the spec (redelivery_problems).
    manifest.spec.consumer.ack_wait = HumanDuration::from_secs(180);
    env.provision(&manifest);
    const MESSAGES: u64 = 950;
    env.publish_samples("burst.signals", 0..MESSAGES);

    let worker = env.start_worker(&manifest);
    // Well within maxWait: only the caught-up hand-over can store the last 150 rows by then.
    wait_for("every row, before maxWait", Duration::from_secs(30), || {
        env.row_count(&manifest) >= MESSAGES
    });
    wait_for(
        "every message acknowledged",
        Duration::from_secs(20),
        || env.consumer_settled(&manifest),
    );
    let summary = env.sequences(&manifest);
    assert_eq!(summary.rows, MESSAGES, "{summary:?}");
    assert!(summary.covers(MESSAGES), "{summary:?}");
    worker.stop(&env).expect("clean stop");
}

#[test]
fn a_batch_flushes_on_its_wait_when_rows_trickle_in() {
    let env = TestEnv::start();
    let mut manifest = env.manifest("trickle", sample_columns());
    manifest.spec.workers.batch.max_rows = 1_000_000;
    manifest.spec.workers.batch.max_wait = HumanDuration(Duration::from_millis(300));
    env.provision(&manifest);
    let worker = env.start_worker(&manifest);

    env.publish_samples("trickle.a", 0..3);
    wait_for("3 rows after max_wait", Duration::from_secs(10), || {
        env.row_count(&manifest) == 3
    });
    env.publish_samples("trickle.b", 3..5);
    wait_for("5 rows", Duration::from_secs(10), || {
        env.row_count(&manifest) == 5
    });
    assert_eq!(worker.metric("signal_worker_batches_inserted_total"), 2.0);
    worker.stop(&env).expect("clean stop");
}

#[test]
fn health_readiness_and_metrics_endpoints_answer() {
    let env = TestEnv::start();
    let manifest = env.manifest("endpoints", sample_columns());
    env.provision(&manifest);
    let worker = env.start_worker(&manifest);

    assert_eq!(http_get(worker.metrics_addr, "/healthz").0, 200);
    wait_for("ready", Duration::from_secs(20), || {
        http_get(worker.metrics_addr, "/readyz").0 == 200
    });
    env.publish_samples("endpoints.x", 0..10);
    wait_for("10 rows", Duration::from_secs(20), || {
        env.row_count(&manifest) == 10
    });
    let (status, text) = http_get(worker.metrics_addr, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        metric(&text, "signal_worker_messages_received_total"),
        10.0,
        "{text}"
    );
    assert_eq!(metric(&text, "signal_worker_rows_inserted_total"), 10.0);
    assert!(text.contains("signal_worker_insert_duration_seconds_bucket"));
    assert!(text.contains("signal_worker_poison_messages_total{reason=\"not_json\"} 0"));

    worker.stop(&env).expect("clean stop");
}

/// SIGINT's number on Linux (the tests do not link libc for one constant).
const SIGINT: i32 = 2;

#[test]
fn sigterm_flushes_acknowledges_and_exits_zero() {
    stop_signal_flushes_acknowledges_and_exits_zero("sigterm", None);
}

#[test]
fn sigint_flushes_acknowledges_and_exits_zero() {
    stop_signal_flushes_acknowledges_and_exits_zero("sigint", Some(SIGINT));
}

/// Runs the binary with batches that never fall due by themselves, then stops it with SIGTERM
/// (`None`) or `signal`: every pulled message must be stored and acknowledged, and the exit 0.
fn stop_signal_flushes_acknowledges_and_exits_zero(name: &str, signal: Option<i32>) {
    let env = TestEnv::start();
    let mut manifest = env.manifest(name, sample_columns());
    // Nothing would flush by itself for a minute: only the shutdown can store these rows.
    manifest.spec.workers.batch.max_rows = 1_000_000;
    manifest.spec.workers.batch.max_wait = HumanDuration::from_secs(60);
    // At least three times maxWait, or the worker refuses the spec (redelivery_problems).
    manifest.spec.consumer.ack_wait = HumanDuration::from_secs(180);
    env.provision(&manifest);
    const MESSAGES: u64 = 777;
    env.publish_samples(&format!("{name}.x"), 0..MESSAGES);

    let mut worker = env.spawn_binary(&manifest, name);
    wait_for("every message pulled", Duration::from_secs(30), || {
        worker.metric("signal_worker_messages_received_total") == Some(MESSAGES as f64)
    });
    assert_eq!(
        env.row_count(&manifest),
        0,
        "nothing is due before the signal"
    );

    let status = match signal {
        None => worker.process.terminate(Duration::from_secs(20)),
        Some(signal) => {
            worker.process.send_signal(signal);
            worker.process.wait_exit(Duration::from_secs(20))
        }
    }
    .expect("exits after the signal");
    assert!(status.success(), "{status:?}\n{}", worker.log_text());
    let summary = env.sequences(&manifest);
    assert_eq!(summary.rows, MESSAGES, "{summary:?}");
    assert!(summary.covers(MESSAGES), "{summary:?}");
    let info = env.consumer_info(&manifest);
    assert_eq!(
        (info.num_ack_pending, info.num_pending),
        (0, 0),
        "every stored row was acknowledged before exit\n{}",
        worker.log_text()
    );
}
