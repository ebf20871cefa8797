//! Poison messages: each kind lands on the dead-letter subject with headers saying why, where
//! it came from and its stream sequence; the good messages around them are stored; and nothing
//! is redelivered afterwards. Without a dead-letter subject poison is terminated and counted.

mod common;

use std::time::Duration;

use common::{TestEnv, wait_for};
use signal_clients::dead_letter::{HEADER_REASON, HEADER_SEQUENCE, HEADER_STREAM, HEADER_SUBJECT};
use signal_model::manifest::PipelineManifest;
use signal_model::{ByteSize, ColumnSpec, DeadLetterSpec, HumanDuration};

const MAX_MESSAGE_BYTES: u64 = 2048;
const GOOD_MESSAGES: u64 = 200;

/// (reason label, payload) of every kind of poison.
fn poison_payloads() -> Vec<(&'static str, Vec<u8>)> {
    let oversized = format!(
        r#"{{"severity":1,"pad":"{}"}}"#,
        "x".repeat(MAX_MESSAGE_BYTES as usize)
    );
    vec![
        ("not_json", b"severity=3".to_vec()),
        ("not_object", b"[1, 2, 3]".to_vec()),
        ("missing_value", br#"{"event_type":"login"}"#.to_vec()),
        ("wrong_type", br#"{"severity":"high"}"#.to_vec()),
        ("out_of_range", br#"{"severity":300}"#.to_vec()),
        ("too_large", oversized.into_bytes()),
    ]
}

fn poison_manifest(env: &TestEnv, name: &str, dead_letter: Option<&str>) -> PipelineManifest {
    let mut manifest = env.manifest(
        name,
        vec![
            ColumnSpec::new("seq", "UInt64", "@sequence"),
            ColumnSpec::new("severity", "UInt8", "$.severity"),
            ColumnSpec::new("event_type", "String", "$.event_type").with_default("none"),
        ],
    );
    manifest.spec.workers.max_message_bytes = ByteSize(MAX_MESSAGE_BYTES);
    // Short, so that a redelivery would show within the test.
    manifest.spec.consumer.ack_wait = HumanDuration::from_secs(2);
    manifest.spec.dead_letter = dead_letter.map(|subject| DeadLetterSpec {
        subject: Some(subject.into()),
        ..DeadLetterSpec::default()
    });
    manifest
}

/// Publishes good messages with the poison spread among them; returns (label, stream sequence)
/// of each poison message.
fn publish_mixed(env: &TestEnv, subject: &str) -> Vec<(&'static str, u64)> {
    let mut poison_sequences = Vec::new();
    let mut poison = poison_payloads().into_iter();
    let mut sequence = 0;
    for good in 0..GOOD_MESSAGES {
        if good % 30 == 15
            && let Some((label, payload)) = poison.next()
        {
            sequence += 1;
            let published =
                env.publish_with_headers(subject, async_nats::HeaderMap::new(), &payload);
            assert_eq!(published, sequence);
            poison_sequences.push((label, sequence));
        }
        sequence += 1;
        let payload = format!(r#"{{"severity":{}}}"#, good % 6);
        env.publish_with_headers(subject, async_nats::HeaderMap::new(), payload.as_bytes());
    }
    assert_eq!(poison_sequences.len(), poison_payloads().len());
    poison_sequences
}

/// Waits past the ack wait and checks nothing came back: no redelivery, no new rows.
fn assert_nothing_redelivered(env: &TestEnv, manifest: &PipelineManifest) {
    wait_for("every message settled", Duration::from_secs(20), || {
        env.consumer_settled(manifest)
    });
    let rows = env.row_count(manifest);
    std::thread::sleep(manifest.spec.consumer.ack_wait.0 + Duration::from_secs(1));
    let info = env.consumer_info(manifest);
    assert_eq!(info.num_redelivered, 0, "{info:?}");
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "{info:?}");
    assert_eq!(env.row_count(manifest), rows);
}

#[test]
fn poison_goes_to_the_dead_letter_subject_with_its_reason_subject_and_sequence() {
    let env = TestEnv::start();
    let manifest = poison_manifest(&env, "poison", Some("dlq.poison"));
    env.provision(&manifest);
    // A stream that captures the dead letters, so the test can read them back with headers.
    let dead_letters = env.runtime.block_on(async {
        env.jetstream
            .create_stream(async_nats::jetstream::stream::Config {
                name: "DLQ".into(),
                subjects: vec!["dlq.>".into()],
                ..Default::default()
            })
            .await
            .expect("dead-letter stream")
    });
    let poison = publish_mixed(&env, "poison.in");
    let worker = env.start_worker(&manifest);

    wait_for("the good rows", Duration::from_secs(30), || {
        env.row_count(&manifest) == GOOD_MESSAGES
    });
    wait_for("every dead letter", Duration::from_secs(30), || {
        let mut stream = dead_letters.clone();
        env.runtime
            .block_on(stream.info())
            .expect("stream info")
            .state
            .messages
            == poison.len() as u64
    });
    let payloads = poison_payloads();
    // Dead letters are routed concurrently: find each by its sequence header, not its position.
    let letters: Vec<_> = (1..=poison.len() as u64)
        .map(|n| {
            env.runtime
                .block_on(dead_letters.get_raw_message(n))
                .expect("dead letter")
        })
        .collect();
    for (index, (label, sequence)) in poison.iter().enumerate() {
        let letter = letters
            .iter()
            .find(|l| {
                l.headers
                    .get(HEADER_SEQUENCE)
                    .is_some_and(|v| v.as_str() == sequence.to_string())
            })
            .unwrap_or_else(|| panic!("no dead letter for sequence {sequence}"));
        let header = |name: &str| {
            letter
                .headers
                .get(name)
                .map(|v| v.as_str().to_string())
                .unwrap_or_else(|| panic!("dead letter {index} lacks {name}: {letter:?}"))
        };
        assert!(
            header(HEADER_REASON).starts_with(&format!("{label}:")),
            "{}",
            header(HEADER_REASON)
        );
        assert_eq!(header(HEADER_SUBJECT), "poison.in");
        assert_eq!(header(HEADER_SEQUENCE), sequence.to_string());
        assert_eq!(header(HEADER_STREAM), "POISON");
        assert_eq!(letter.subject.as_str(), "dlq.poison");
        let original = &payloads.iter().find(|(l, _)| l == label).expect("known").1;
        assert_eq!(letter.payload.as_ref(), original.as_slice(), "{label}");
    }
    for (label, _) in &poison {
        let counted = worker.metric(&format!(
            "signal_worker_poison_messages_total{{reason=\"{label}\"}}"
        ));
        assert_eq!(counted, 1.0, "{label}");
    }
    assert_eq!(
        worker.metric("signal_worker_dead_letters_published_total"),
        poison.len() as f64
    );
    // Good rows only, none of the poison sequences.
    let poison_list: Vec<String> = poison.iter().map(|(_, s)| s.to_string()).collect();
    assert_eq!(
        env.query(&format!(
            "SELECT count() FROM signal_test.poison WHERE seq IN ({})",
            poison_list.join(",")
        )),
        "0"
    );
    assert_eq!(
        env.query("SELECT uniqExact(seq), min(event_type) FROM signal_test.poison FORMAT TSV"),
        format!("{GOOD_MESSAGES}\tnone")
    );
    assert_nothing_redelivered(&env, &manifest);
    worker.stop(&env).expect("clean stop");
}

#[test]
fn without_a_dead_letter_subject_poison_is_terminated_and_counted() {
    let env = TestEnv::start();
    let manifest = poison_manifest(&env, "terminated", None);
    env.provision(&manifest);
    let poison = publish_mixed(&env, "terminated.in");
    let worker = env.start_worker(&manifest);

    wait_for("the good rows", Duration::from_secs(30), || {
        env.row_count(&manifest) == GOOD_MESSAGES
    });
    for (label, _) in &poison {
        wait_for(label, Duration::from_secs(10), || {
            worker.metric(&format!(
                "signal_worker_poison_messages_total{{reason=\"{label}\"}}"
            )) == 1.0
        });
    }
    assert_eq!(
        worker.metric("signal_worker_dead_letters_published_total"),
        0.0
    );
    assert_nothing_redelivered(&env, &manifest);
    assert_eq!(env.sequences(&manifest).duplicates(), 0);
    worker.stop(&env).expect("clean stop");
}
