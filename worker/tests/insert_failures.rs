//! Inserts that cannot succeed, or not yet: a permanent refusal blocks the worker and is reported
//! until it clears; a live column retyped to another of the same width is refused before any row
//! is written; an insert slower than the ack wait causes no redelivery; and pulls hold the
//! memory bound in bytes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestEnv, http_get, wait_for};
use signal_model::{ByteSize, ColumnSpec, HumanDuration, ddl};

fn readyz(worker: &common::InProcessWorker) -> (u16, String) {
    http_get(worker.metrics_addr, "/readyz")
}

#[test]
fn a_refused_insert_blocks_and_is_reported_until_it_clears() {
    let env = TestEnv::start();
    let manifest = env.manifest(
        "refused",
        vec![
            ColumnSpec::new("seq", "UInt64", "@sequence"),
            ColumnSpec::new("severity", "UInt8", "$.severity"),
        ],
    );
    env.provision(&manifest);
    env.query(&ddl::drop_table_sql(common::DATABASE, "refused", None));
    let worker = env.start_worker(&manifest);
    env.publish_all(
        "refused.in",
        (0..2_000u64).map(|i| format!(r#"{{"severity":{}}}"#, i % 6).into_bytes()),
    );
    wait_for(
        "not ready with the server's message",
        Duration::from_secs(30),
        || {
            let (status, body) = readyz(&worker);
            status == 503 && body.contains("InsertRejected") && body.contains("doesn't exist")
        },
    );
    assert_eq!(
        worker.metric("signal_worker_blocked{reason=\"InsertRejected\"}"),
        1.0
    );
    assert!(worker.metric("signal_worker_inserts_rejected_total") >= 1.0);
    // Pulling stopped at what the worker holds, and it is kept alive.
    std::thread::sleep(manifest.spec.consumer.ack_wait.0 / 2);
    let info = env.consumer_info(&manifest);
    assert!(
        info.num_ack_pending <= 2 * manifest.spec.workers.batch.max_rows as usize,
        "{info:?}"
    );
    assert_eq!(info.num_redelivered, 0, "{info:?}");

    // The table comes back: the worker recovers by itself.
    let create =
        ddl::create_table_sql(&manifest.spec.clickhouse, common::CLICKHOUSE_VERSION).expect("DDL");
    env.query(&create);
    wait_for("every row", Duration::from_secs(60), || {
        env.row_count(&manifest) == 2_000
    });
    wait_for("ready again", Duration::from_secs(20), || {
        readyz(&worker).0 == 200
    });
    assert_eq!(
        worker.metric("signal_worker_blocked{reason=\"InsertRejected\"}"),
        0.0
    );
    assert_eq!(env.sequences(&manifest).duplicates(), 0);
    worker.stop(&env).expect("clean stop");
}

#[test]
fn a_column_retyped_to_the_same_width_is_refused_until_it_matches_again() {
    let env = TestEnv::start();
    // (manifest type, live type, a message for the manifest type)
    let pairs = [
        ("Int32", "UInt32", r#"{"v": -5}"#),
        ("UInt32", "Int32", r#"{"v": 4000000000}"#),
        ("Float64", "Int64", r#"{"v": 1.5}"#),
        ("Int64", "Float64", r#"{"v": 7}"#),
        ("DateTime", "UInt32", r#"{"v": "2026-01-01T00:00:00Z"}"#),
        ("UInt32", "DateTime", r#"{"v": 1767225600}"#),
    ];
    for (index, &(wanted, live, payload)) in pairs.iter().enumerate() {
        let name = format!("retyped{index}");
        let manifest = env.manifest(
            &name,
            vec![
                ColumnSpec::new("seq", "UInt64", "@sequence"),
                ColumnSpec::new("v", wanted, "$.v"),
            ],
        );
        env.provision(&manifest);
        env.query(&format!(
            "ALTER TABLE {}.{name} MODIFY COLUMN v {live}",
            common::DATABASE
        ));
        env.publish_all(
            &format!("{name}.in"),
            std::iter::once(payload.as_bytes().to_vec()),
        );
        let worker = env.start_worker(&manifest);
        wait_for(
            &format!("{wanted} written as {live} refused"),
            Duration::from_secs(20),
            || {
                let (status, body) = readyz(&worker);
                status == 503 && body.contains("SchemaMismatch") && body.contains(live)
            },
        );
        assert_eq!(
            worker.metric("signal_worker_blocked{reason=\"SchemaMismatch\"}"),
            1.0
        );
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            env.row_count(&manifest),
            0,
            "{wanted} vs {live}: nothing written"
        );

        env.query(&format!(
            "ALTER TABLE {}.{name} MODIFY COLUMN v {wanted}",
            common::DATABASE
        ));
        wait_for(
            &format!("{wanted} written once the column is {wanted} again"),
            Duration::from_secs(30),
            || env.row_count(&manifest) == 1,
        );
        wait_for("ready again", Duration::from_secs(20), || {
            readyz(&worker).0 == 200
        });
        worker.stop(&env).expect("clean stop");
    }
}

/// Sends `signal` (e.g. "STOP", "CONT") to a process.
fn signal_process(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill(1)");
    assert!(status.success(), "kill -{signal} {pid}");
}

#[test]
fn an_insert_slower_than_the_ack_wait_causes_no_redelivery() {
    let env = TestEnv::start();
    let mut manifest = env.manifest("slow", common::sample_columns());
    manifest.spec.consumer.ack_wait = HumanDuration::from_secs(2);
    env.provision(&manifest);
    let worker = env.start_worker(&manifest);
    env.publish_samples("slow.signals", 0..2_000);
    wait_for("some rows", Duration::from_secs(30), || {
        env.row_count(&manifest) >= 500
    });

    // A frozen server: connections are accepted by the kernel, nothing answers.
    let pid = env.clickhouse.pid().expect("ClickHouse runs");
    signal_process(pid, "STOP");
    let frozen = Instant::now();
    env.publish_samples("slow.signals", 2_000..6_000);
    std::thread::sleep((manifest.spec.consumer.ack_wait.0 * 3).saturating_sub(frozen.elapsed()));
    let held = env.consumer_info(&manifest);
    signal_process(pid, "CONT");

    wait_for("every row", Duration::from_secs(60), || {
        env.sequences(&manifest).distinct == 6_000
    });
    wait_for("settled", Duration::from_secs(20), || {
        env.consumer_settled(&manifest)
    });
    let info = env.consumer_info(&manifest);
    assert!(
        held.num_ack_pending > 0,
        "an insert was in flight: {held:?}"
    );
    assert_eq!(info.num_redelivered, 0, "kept alive while frozen: {info:?}");
    assert_eq!(env.sequences(&manifest).duplicates(), 0);
    worker.stop(&env).expect("clean stop");
}

#[test]
fn pulls_hold_the_memory_bound_in_bytes_with_one_mebibyte_messages() {
    const MESSAGES: u64 = 24;
    const MESSAGE_BYTES: usize = 1_000_000;
    let env = TestEnv::start();
    let mut manifest = env.manifest(
        "large",
        vec![
            ColumnSpec::new("seq", "UInt64", "@sequence"),
            ColumnSpec::new("blob", "String", "$.blob"),
        ],
    );
    let max_bytes = 64 * 1024;
    manifest.spec.workers.batch.max_bytes = ByteSize(max_bytes);
    manifest.spec.workers.max_message_bytes = ByteSize(2 << 20);
    env.provision(&manifest);
    let max_payload = env.client.server_info().max_payload as u64;
    let blob = "x".repeat(MESSAGE_BYTES - 20);
    env.publish_all(
        "large.in",
        (0..MESSAGES).map(|_| format!(r#"{{"blob":"{blob}"}}"#).into_bytes()),
    );
    let worker = env.start_worker(&manifest);
    let mut most_pending = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.row_count(&manifest) < MESSAGES {
        assert!(Instant::now() < deadline, "rows did not arrive");
        most_pending = most_pending.max(env.consumer_info(&manifest).num_ack_pending);
        std::thread::sleep(Duration::from_millis(20));
    }
    // README, "Memory": 3 × batch.maxBytes + 4 × the server's max_payload.
    let bound = 3 * max_bytes + 4 * max_payload;
    let held_max = worker.metric("signal_worker_held_message_bytes_max") as u64;
    println!(
        "memory bound: held at most {held_max} payload bytes (bound {bound}), at most {most_pending} messages unacknowledged"
    );
    assert!(held_max > 0 && held_max <= bound, "{held_max} > {bound}");
    assert!(most_pending <= 4, "{most_pending} messages held at once");
    assert_eq!(env.sequences(&manifest).duplicates(), 0);
    worker.stop(&env).expect("clean stop");
}
