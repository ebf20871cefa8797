//! The stream reconciler against a real nats-server (Debian's 2.9.10): creation, in-place update
//! of changeable fields, refusal to touch a stream whose immutable fields changed, repair of drift
//! made through the NATS API, and the server's own refusals reported in its words.
//!
//! Every check reads the live stream back from the server: NATS 2.9 accepts options it does not
//! know and drops them silently, so the request is no proof of the result.

#[path = "support/dataplane.rs"]
mod support;

use std::time::Duration;

use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, StorageType};
use signal_model::{DiscardKind, HumanDuration, RetentionKind, StorageKind, StreamSpec};
use signal_operator::dataplane::stream::{StreamOutcome, reconcile_stream};
use support::{STEP_TIMEOUT, jetstream_at, live_stream, nats, shared_pipeline_spec, unique};

async fn reconcile(js: &async_nats::jetstream::Context, spec: &StreamSpec) -> StreamOutcome {
    tokio::time::timeout(STEP_TIMEOUT, reconcile_stream(js, spec))
        .await
        .expect("reconcile_stream is bounded")
}

fn stream_spec(label: &str) -> StreamSpec {
    shared_pipeline_spec(&unique(label)).stream
}

#[tokio::test]
async fn creates_the_stream_from_the_spec_then_finds_it_up_to_date() {
    let js = jetstream_at(&nats().url()).await;
    let spec = StreamSpec {
        discard: DiscardKind::New,
        max_msgs: Some(1000),
        max_bytes: Some(signal_model::ByteSize(64 << 20)),
        duplicate_window: Some(HumanDuration::from_secs(30)),
        ..stream_spec("create")
    };

    let created = reconcile(&js, &spec).await;
    assert!(created.report.ready, "{:?}", created.report);
    assert!(created.exists);
    assert_eq!(created.report.reason, "Created", "{:?}", created.report);
    assert_eq!(
        created.report.changes,
        [format!("created stream {}", spec.name)]
    );
    assert_eq!(created.status.map(|s| s.messages), Some(0));

    let live = live_stream(&js, &spec.name)
        .await
        .expect("the stream exists");
    assert_eq!(live.config.subjects, spec.subjects);
    assert_eq!(live.config.storage, StorageType::File);
    assert_eq!(live.config.retention, RetentionPolicy::Limits);
    assert_eq!(live.config.discard, DiscardPolicy::New);
    assert_eq!(live.config.max_age, Duration::from_secs(3600));
    assert_eq!(live.config.max_messages, 1000);
    assert_eq!(live.config.max_bytes, 64 << 20);
    assert_eq!(live.config.duplicate_window, Duration::from_secs(30));
    assert_eq!(live.config.num_replicas, 1);

    let again = reconcile(&js, &spec).await;
    assert!(again.report.ready);
    assert_eq!(again.report.reason, "UpToDate", "{:?}", again.report);
    assert!(again.report.changes.is_empty());
    let unchanged = live_stream(&js, &spec.name).await.expect("still there");
    assert_eq!(unchanged.config, live.config);
    assert_eq!(
        unchanged.created, live.created,
        "the stream was not recreated"
    );
}

#[tokio::test]
async fn a_changeable_field_is_updated_in_place_and_messages_survive() {
    let js = jetstream_at(&nats().url()).await;
    let spec = stream_spec("update");
    assert_eq!(reconcile(&js, &spec).await.report.reason, "Created");
    let subject = spec.subjects[0].replace('>', "one");
    js.publish(subject, "kept".into())
        .await
        .expect("publish")
        .await
        .expect("ack");

    let extra_subject = format!("{}_extra.>", spec.name.to_lowercase());
    let changed = StreamSpec {
        max_age: Some(HumanDuration::from_secs(7200)),
        max_msgs: Some(500),
        subjects: vec![spec.subjects[0].clone(), extra_subject.clone()],
        ..spec.clone()
    };
    let updated = reconcile(&js, &changed).await;
    assert!(updated.report.ready, "{:?}", updated.report);
    assert_eq!(updated.report.reason, "Updated", "{:?}", updated.report);
    let change = &updated.report.changes[0];
    assert!(change.contains("max_age 1h → 2h"), "{change}");
    assert!(change.contains("max_msgs unlimited → 500"), "{change}");
    assert!(change.contains(&extra_subject), "{change}");

    let live = live_stream(&js, &spec.name)
        .await
        .expect("the stream exists");
    assert_eq!(live.config.max_age, Duration::from_secs(7200));
    assert_eq!(live.config.max_messages, 500);
    assert_eq!(live.config.subjects, changed.subjects);
    assert_eq!(
        live.state.messages, 1,
        "an update keeps the stream's messages"
    );
    assert_eq!(updated.status.map(|s| s.messages), Some(1));

    assert_eq!(reconcile(&js, &changed).await.report.reason, "UpToDate");
}

#[tokio::test]
async fn an_immutable_change_is_reported_and_the_stream_left_untouched() {
    let js = jetstream_at(&nats().url()).await;
    let spec = stream_spec("immutable");
    assert_eq!(reconcile(&js, &spec).await.report.reason, "Created");
    let before = live_stream(&js, &spec.name)
        .await
        .expect("the stream exists");

    // A changeable field changes too: nothing at all may be applied while storage differs.
    let changed = StreamSpec {
        storage: StorageKind::Memory,
        max_age: Some(HumanDuration::from_secs(60)),
        ..spec.clone()
    };
    let outcome = reconcile(&js, &changed).await;
    assert!(!outcome.report.ready, "{:?}", outcome.report);
    assert!(
        outcome.exists,
        "the consumer may still use the existing stream"
    );
    assert_eq!(outcome.report.reason, "ImmutableFieldChanged");
    assert!(
        outcome.report.message.contains("storage file → memory"),
        "{}",
        outcome.report.message
    );
    assert!(outcome.report.changes.is_empty());

    let after = live_stream(&js, &spec.name).await.expect("still there");
    assert_eq!(after.config, before.config, "the stream was changed");
    assert_eq!(after.created, before.created, "the stream was recreated");

    // Putting the spec back makes it ready again without any change.
    assert_eq!(reconcile(&js, &spec).await.report.reason, "UpToDate");
}

#[tokio::test]
async fn drift_made_through_the_nats_api_is_put_back_and_unmanaged_settings_kept() {
    let js = jetstream_at(&nats().url()).await;
    let spec = stream_spec("drift");
    assert_eq!(reconcile(&js, &spec).await.report.reason, "Created");

    // Someone edits the stream by hand: a managed field (max_age) and an unmanaged one.
    let mut edited = live_stream(&js, &spec.name).await.expect("exists").config;
    edited.max_age = Duration::from_secs(300);
    edited.max_messages = 10;
    edited.description = Some("edited by hand".to_string());
    js.update_stream(&edited).await.expect("manual update");
    let drifted = live_stream(&js, &spec.name).await.expect("exists");
    assert_eq!(drifted.config.max_age, Duration::from_secs(300));

    let repaired = reconcile(&js, &spec).await;
    assert!(repaired.report.ready, "{:?}", repaired.report);
    assert_eq!(repaired.report.reason, "Updated");
    let change = &repaired.report.changes[0];
    assert!(change.contains("max_age 5m → 1h"), "{change}");
    assert!(change.contains("max_msgs 10 → unlimited"), "{change}");

    let live = live_stream(&js, &spec.name).await.expect("exists");
    assert_eq!(live.config.max_age, Duration::from_secs(3600));
    assert_eq!(live.config.max_messages, -1);
    assert_eq!(
        live.config.description.as_deref(),
        Some("edited by hand"),
        "settings the spec does not manage are left alone"
    );
    assert_eq!(reconcile(&js, &spec).await.report.reason, "UpToDate");
}

#[tokio::test]
async fn max_age_can_shrink_below_the_default_duplicate_window() {
    let js = jetstream_at(&nats().url()).await;
    let spec = stream_spec("short_age");
    assert_eq!(reconcile(&js, &spec).await.report.reason, "Created");
    let live = live_stream(&js, &spec.name).await.expect("exists");
    assert_eq!(live.config.duplicate_window, Duration::from_secs(120));

    // The server refuses a duplicate window longer than max_age; the spec does not set one, so
    // the server's 2m default must shrink with max_age rather than block the update.
    let shorter = StreamSpec {
        max_age: Some(HumanDuration::from_secs(30)),
        ..spec.clone()
    };
    let outcome = reconcile(&js, &shorter).await;
    assert!(outcome.report.ready, "{:?}", outcome.report);
    assert_eq!(outcome.report.reason, "Updated");
    let live = live_stream(&js, &spec.name).await.expect("exists");
    assert_eq!(live.config.max_age, Duration::from_secs(30));
    assert_eq!(live.config.duplicate_window, Duration::from_secs(30));
    assert_eq!(reconcile(&js, &shorter).await.report.reason, "UpToDate");
}

#[tokio::test]
async fn a_change_the_server_refuses_is_reported_in_its_words_and_nothing_changes() {
    let js = jetstream_at(&nats().url()).await;
    let spec = stream_spec("refused");
    assert_eq!(reconcile(&js, &spec).await.report.reason, "Created");
    let before = live_stream(&js, &spec.name).await.expect("exists");

    // NATS 2.9 refuses every retention change on an existing stream.
    let changed = StreamSpec {
        retention: RetentionKind::Workqueue,
        ..spec.clone()
    };
    let outcome = reconcile(&js, &changed).await;
    assert!(!outcome.report.ready, "{:?}", outcome.report);
    assert!(outcome.exists);
    assert_eq!(
        outcome.report.reason, "UpdateRefused",
        "{:?}",
        outcome.report
    );
    assert!(
        outcome.report.message.contains("retention"),
        "{}",
        outcome.report.message
    );
    assert!(outcome.report.changes.is_empty());
    let after = live_stream(&js, &spec.name).await.expect("exists");
    assert_eq!(after.config, before.config);
}

#[tokio::test]
async fn streams_of_different_pipelines_are_reconciled_concurrently() {
    let js = jetstream_at(&nats().url()).await;
    let specs: Vec<StreamSpec> = (0..8).map(|_| stream_spec("many")).collect();
    let outcomes = futures::future::join_all(specs.iter().map(|spec| reconcile(&js, spec))).await;
    for (spec, outcome) in specs.iter().zip(outcomes) {
        assert_eq!(
            outcome.report.reason, "Created",
            "{}: {:?}",
            spec.name, outcome.report
        );
        assert!(live_stream(&js, &spec.name).await.is_some());
    }
}
