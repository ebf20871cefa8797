//! Dead letters are stored exactly once: with no stream capturing the dead-letter subject the
//! poison stays unacknowledged (kept alive, reported on `/readyz`, in the metrics and in a health
//! report) until one appears; a dead letter published again after a crash is dropped by the
//! stream's duplicate window; and a message on its last allowed delivery whose insert fails is
//! dead-lettered with reason `max_deliveries` instead of falling out of the consumer.

mod common;

use std::time::Duration;

use async_nats::jetstream::stream;
use common::{TestEnv, http_get, wait_for};
use futures::StreamExt;
use signal_clients::dead_letter::{HEADER_REASON, HEADER_SEQUENCE};
use signal_model::manifest::PipelineManifest;
use signal_model::worker_health::{
    HEALTH_STREAM, HEALTH_SUBJECTS, HealthReason, WorkerHealthReport, health_filter,
};
use signal_model::{ColumnSpec, DeadLetterSpec, HumanDuration, ddl};
use signal_worker::dead_letter::message_id;

const GOOD: u64 = 300;
const POISON: u64 = 10;

fn manifest(env: &TestEnv, name: &str) -> PipelineManifest {
    let mut manifest = env.manifest(
        name,
        vec![
            ColumnSpec::new("seq", "UInt64", "@sequence"),
            ColumnSpec::new("severity", "UInt8", "$.severity"),
        ],
    );
    manifest.spec.consumer.ack_wait = HumanDuration::from_secs(2);
    manifest.spec.dead_letter = Some(DeadLetterSpec {
        subject: Some(format!("dlq.{name}")),
        ..DeadLetterSpec::default()
    });
    manifest
}

/// Good messages with `POISON` poison among them; returns the poison's stream sequences.
fn publish_mixed(env: &TestEnv, subject: &str) -> Vec<u64> {
    let mut poison = Vec::new();
    for index in 0..GOOD + POISON {
        let payload = if index % (GOOD / POISON + 1) == 7 && (poison.len() as u64) < POISON {
            br#"{"severity":"high"}"#.to_vec()
        } else {
            format!(r#"{{"severity":{}}}"#, index % 6).into_bytes()
        };
        let sequence = env.publish_with_headers(subject, async_nats::HeaderMap::new(), &payload);
        if payload.starts_with(br#"{"severity":"h"#) {
            poison.push(sequence);
        }
    }
    assert_eq!(poison.len() as u64, POISON);
    poison
}

fn create_stream(env: &TestEnv, name: &str, subject: &str) -> stream::Stream {
    env.runtime
        .block_on(env.jetstream.create_stream(stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            ..Default::default()
        }))
        .expect("create stream")
}

fn message_count(env: &TestEnv, stream: &stream::Stream) -> u64 {
    let mut stream = stream.clone();
    env.runtime
        .block_on(stream.info())
        .expect("stream info")
        .state
        .messages
}

/// The newest health report of `manifest`'s workers, if one was stored.
fn last_report(env: &TestEnv, manifest: &PipelineManifest) -> Option<WorkerHealthReport> {
    let filter = health_filter(&manifest.spec.stream.name, manifest.durable_name());
    env.runtime.block_on(async {
        let stream = env.jetstream.get_stream(HEALTH_STREAM).await.ok()?;
        let consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                filter_subject: filter,
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .ok()?;
        let mut batch = consumer
            .fetch()
            .max_messages(10)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .ok()?;
        let mut last = None;
        while let Some(Ok(message)) = batch.next().await {
            last = serde_json::from_slice(&message.payload).ok();
        }
        last
    })
}

#[test]
fn without_a_stream_for_the_dead_letters_poison_stays_unacknowledged_and_is_reported() {
    let env = TestEnv::start();
    let manifest = manifest(&env, "unroutable");
    env.provision(&manifest);
    env.runtime
        .block_on(env.jetstream.create_stream(stream::Config {
            name: HEALTH_STREAM.into(),
            subjects: vec![HEALTH_SUBJECTS.into()],
            max_messages_per_subject: 1,
            ..Default::default()
        }))
        .expect("health stream");
    let poison = publish_mixed(&env, "unroutable.in");
    let worker = env.start_worker(&manifest);

    wait_for("the good rows", Duration::from_secs(30), || {
        env.row_count(&manifest) == GOOD
    });
    wait_for("not ready, saying why", Duration::from_secs(20), || {
        let (status, body) = http_get(worker.metrics_addr, "/readyz");
        status == 503 && body.contains("DeadLetterUnroutable")
    });
    assert!(worker.metric("signal_worker_dead_letters_unroutable_total") >= 1.0);
    assert_eq!(
        worker.metric("signal_worker_blocked{reason=\"DeadLetterUnroutable\"}"),
        1.0
    );
    wait_for(
        "a health report saying why",
        Duration::from_secs(20),
        || {
            last_report(&env, &manifest)
                .is_some_and(|r| !r.ready && r.reason == Some(HealthReason::DeadLetterUnroutable))
        },
    );
    // Held, not lost and not redelivered: kept alive past several ack waits.
    std::thread::sleep(manifest.spec.consumer.ack_wait.0 * 3);
    let info = env.consumer_info(&manifest);
    assert_eq!(info.num_ack_pending, POISON as usize, "{info:?}");
    assert_eq!(info.num_redelivered, 0, "{info:?}");

    // A stream appears: the poison is stored and only then terminated.
    let dead_letters = create_stream(&env, "UNROUTABLE_DLQ", "dlq.unroutable");
    wait_for("every dead letter", Duration::from_secs(30), || {
        message_count(&env, &dead_letters) == POISON
    });
    wait_for("settled", Duration::from_secs(20), || {
        env.consumer_settled(&manifest)
    });
    wait_for("ready again", Duration::from_secs(20), || {
        http_get(worker.metrics_addr, "/readyz").0 == 200
    });
    wait_for(
        "a health report saying ready",
        Duration::from_secs(20),
        || last_report(&env, &manifest).is_some_and(|r| r.ready),
    );
    // Routed concurrently: in any order, each once.
    let mut sequences: Vec<u64> = (1..=POISON)
        .map(|n| {
            let letter = env
                .runtime
                .block_on(dead_letters.get_raw_message(n))
                .expect("dead letter");
            letter
                .headers
                .get(HEADER_SEQUENCE)
                .expect("header")
                .as_str()
                .parse()
                .expect("number")
        })
        .collect();
    sequences.sort_unstable();
    assert_eq!(sequences, poison);
    worker.stop(&env).expect("clean stop");
}

#[test]
fn a_dead_letter_published_again_after_a_crash_is_dropped_by_its_message_id() {
    let env = TestEnv::start();
    let manifest = manifest(&env, "republished");
    env.provision(&manifest);
    let dead_letters = create_stream(&env, "REPUBLISHED_DLQ", "dlq.republished");
    let poison = publish_mixed(&env, "republished.in");
    // What a worker killed between publishing the dead letter and terminating the original
    // left behind: the first poison message's dead letter, already stored.
    let created = env.runtime.block_on(async {
        let mut source = env
            .jetstream
            .get_stream("REPUBLISHED")
            .await
            .expect("stream");
        source
            .info()
            .await
            .expect("info")
            .created
            .unix_timestamp_nanos()
    });
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        message_id("REPUBLISHED", created, poison[0]).as_str(),
    );
    env.publish_with_headers("dlq.republished", headers, b"stored before the crash");

    let worker = env.start_worker(&manifest);
    wait_for("settled", Duration::from_secs(30), || {
        env.row_count(&manifest) == GOOD && env.consumer_settled(&manifest)
    });
    assert_eq!(
        message_count(&env, &dead_letters),
        POISON,
        "one dead letter per poison message"
    );
    assert_eq!(
        worker.metric("signal_worker_dead_letters_published_total"),
        POISON as f64
    );
    worker.stop(&env).expect("clean stop");
}

#[test]
fn a_message_on_its_last_delivery_whose_insert_fails_is_dead_lettered_as_max_deliveries() {
    let env = TestEnv::start();
    let mut manifest = manifest(&env, "exhausted");
    manifest.spec.consumer.max_deliver = 2;
    env.provision(&manifest);
    let dead_letters = create_stream(&env, "EXHAUSTED_DLQ", "dlq.exhausted");
    // ClickHouse refuses every insert: the table is gone.
    env.query(&ddl::drop_table_sql(common::DATABASE, "exhausted", None));
    env.publish_all(
        "exhausted.in",
        (0..GOOD).map(|i| format!(r#"{{"severity":{}}}"#, i % 6).into_bytes()),
    );

    // First delivery: held by a worker that then dies without settling anything.
    let mut first = env.spawn_binary(&manifest, "first");
    wait_for("the first delivery held", Duration::from_secs(30), || {
        env.consumer_info(&manifest).num_ack_pending > 0
    });
    wait_for("the insert refused", Duration::from_secs(30), || {
        first
            .metric("signal_worker_inserts_rejected_total")
            .is_some_and(|n| n >= 1.0)
    });
    first.process.kill_hard().expect("SIGKILL");

    // Second (last) delivery: the insert fails again, so the messages become dead letters.
    let second = env.start_worker(&manifest);
    wait_for(
        "every message dead-lettered",
        Duration::from_secs(60),
        || message_count(&env, &dead_letters) == GOOD,
    );
    wait_for("settled", Duration::from_secs(20), || {
        env.consumer_settled(&manifest)
    });
    let letter = env
        .runtime
        .block_on(dead_letters.get_raw_message(1))
        .expect("dead letter");
    let reason = letter
        .headers
        .get(HEADER_REASON)
        .expect("reason")
        .as_str()
        .to_string();
    assert!(reason.starts_with("max_deliveries:"), "{reason}");
    assert!(reason.contains("doesn't exist"), "the last error: {reason}");
    assert_eq!(
        second.metric("signal_worker_poison_messages_total{reason=\"max_deliveries\"}"),
        GOOD as f64
    );
    second.stop(&env).expect("clean stop");
}
