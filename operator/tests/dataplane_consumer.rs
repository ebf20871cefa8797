//! The durable consumer reconciler against a real nats-server (Debian's 2.9.10): creation with the
//! spec's settings, in-place update of ack wait, max deliver, max ack pending and the filter
//! subject, repair of drift made through the NATS API, and refusal to touch a consumer whose
//! immutable fields changed. Every check reads the consumer back from the server.

#[path = "support/dataplane.rs"]
mod support;

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use signal_model::{DeliverPolicyKind, HumanDuration, SignalPipelineSpec};
use signal_operator::dataplane::consumer::{ConsumerOutcome, reconcile_consumer};
use signal_operator::dataplane::stream::reconcile_stream;
use support::{STEP_TIMEOUT, jetstream_at, live_consumer, nats, shared_pipeline_spec, unique};

async fn reconcile(
    js: &async_nats::jetstream::Context,
    pipeline: &str,
    spec: &SignalPipelineSpec,
) -> ConsumerOutcome {
    tokio::time::timeout(STEP_TIMEOUT, reconcile_consumer(js, pipeline, spec))
        .await
        .expect("reconcile_consumer is bounded")
}

/// A pipeline whose stream already exists.
async fn pipeline_with_stream(
    js: &async_nats::jetstream::Context,
    label: &str,
) -> (String, SignalPipelineSpec) {
    let name = unique(label);
    let spec = shared_pipeline_spec(&name);
    let stream = reconcile_stream(js, &spec.stream).await;
    assert!(stream.report.ready, "{:?}", stream.report);
    (name, spec)
}

#[tokio::test]
async fn creates_the_durable_consumer_from_the_spec_then_finds_it_up_to_date() {
    let js = jetstream_at(&nats().url()).await;
    let (name, spec) = pipeline_with_stream(&js, "create").await;
    let durable = spec.durable_name(&name).to_string();

    let created = reconcile(&js, &name, &spec).await;
    assert!(created.report.ready, "{:?}", created.report);
    assert_eq!(created.report.reason, "Created");
    assert_eq!(
        created.report.changes,
        [format!(
            "created consumer {durable} on stream {}",
            spec.stream.name
        )]
    );
    assert_eq!(created.status.map(|s| s.num_pending), Some(0));

    let live = live_consumer(&js, &spec.stream.name, &durable)
        .await
        .expect("the consumer exists");
    assert_eq!(live.config.durable_name.as_deref(), Some(durable.as_str()));
    assert_eq!(live.config.deliver_subject, None, "a pull consumer");
    assert_eq!(live.config.ack_policy, AckPolicy::Explicit);
    assert_eq!(live.config.deliver_policy, DeliverPolicy::All);
    assert_eq!(
        live.config.filter_subject,
        spec.consumer.filter_subject.clone().unwrap_or_default()
    );
    assert_eq!(live.config.ack_wait, Duration::from_secs(30));
    assert_eq!(live.config.max_deliver, 5);
    assert_eq!(live.config.max_ack_pending, 20_000);

    let again = reconcile(&js, &name, &spec).await;
    assert_eq!(again.report.reason, "UpToDate", "{:?}", again.report);
    assert!(again.report.ready && again.report.changes.is_empty());
    let unchanged = live_consumer(&js, &spec.stream.name, &durable)
        .await
        .expect("still there");
    assert_eq!(unchanged.config, live.config);
    assert_eq!(unchanged.created, live.created, "not recreated");
}

#[tokio::test]
async fn ack_wait_max_deliver_and_max_ack_pending_are_updated_in_place() {
    let js = jetstream_at(&nats().url()).await;
    let (name, mut spec) = pipeline_with_stream(&js, "update").await;
    let durable = spec.durable_name(&name).to_string();
    assert_eq!(reconcile(&js, &name, &spec).await.report.reason, "Created");
    let before = live_consumer(&js, &spec.stream.name, &durable)
        .await
        .expect("exists");

    spec.consumer.ack_wait = HumanDuration::from_secs(90);
    spec.consumer.max_deliver = 9;
    spec.consumer.max_ack_pending = 1234;
    let updated = reconcile(&js, &name, &spec).await;
    assert!(updated.report.ready, "{:?}", updated.report);
    assert_eq!(updated.report.reason, "Updated");
    let change = &updated.report.changes[0];
    for expected in [
        "ack_wait 30s → 1m30s",
        "max_deliver 5 → 9",
        "max_ack_pending 20000 → 1234",
    ] {
        assert!(change.contains(expected), "{change} lacks {expected}");
    }

    let live = live_consumer(&js, &spec.stream.name, &durable)
        .await
        .expect("exists");
    assert_eq!(live.config.ack_wait, Duration::from_secs(90));
    assert_eq!(live.config.max_deliver, 9);
    assert_eq!(live.config.max_ack_pending, 1234);
    assert_eq!(live.created, before.created, "updated, not recreated");
    assert_eq!(reconcile(&js, &name, &spec).await.report.reason, "UpToDate");
}

#[tokio::test]
async fn a_filter_subject_change_is_applied_in_place() {
    let js = jetstream_at(&nats().url()).await;
    let (name, mut spec) = pipeline_with_stream(&js, "filter").await;
    let durable = spec.durable_name(&name).to_string();
    assert_eq!(reconcile(&js, &name, &spec).await.report.reason, "Created");
    let before = live_consumer(&js, &spec.stream.name, &durable)
        .await
        .expect("exists");

    // 2.9.10 already changes a durable pull consumer's filter in place (checked by reading it
    // back); a server that refused would be reported as UpdateRefused instead.
    let wanted = format!("{name}.alerts.>");
    spec.consumer.filter_subject = Some(wanted.clone());
    let outcome = reconcile(&js, &name, &spec).await;
    assert!(outcome.report.ready, "{:?}", outcome.report);
    assert_eq!(outcome.report.reason, "Updated");
    assert!(
        outcome.report.changes[0].contains(&format!("filter_subject {name}.signals.> → {wanted}")),
        "{:?}",
        outcome.report.changes
    );
    let live = live_consumer(&js, &spec.stream.name, &durable)
        .await
        .expect("exists");
    assert_eq!(live.config.filter_subject, wanted);
    assert_eq!(live.created, before.created, "updated, not recreated");

    // Back to the whole stream.
    spec.consumer.filter_subject = None;
    let outcome = reconcile(&js, &name, &spec).await;
    assert_eq!(outcome.report.reason, "Updated", "{:?}", outcome.report);
    let live = live_consumer(&js, &spec.stream.name, &durable)
        .await
        .expect("exists");
    assert_eq!(live.config.filter_subject, "");
}

#[tokio::test]
async fn drift_made_through_the_nats_api_is_put_back() {
    let js = jetstream_at(&nats().url()).await;
    let (name, spec) = pipeline_with_stream(&js, "drift").await;
    let durable = spec.durable_name(&name).to_string();
    assert_eq!(reconcile(&js, &name, &spec).await.report.reason, "Created");

    let mut edited = live_consumer(&js, &spec.stream.name, &durable)
        .await
        .expect("exists")
        .config;
    edited.max_ack_pending = 7;
    edited.ack_wait = Duration::from_secs(5);
    js.create_consumer_on_stream(edited, &spec.stream.name)
        .await
        .expect("manual update");
    let drifted = live_consumer(&js, &spec.stream.name, &durable)
        .await
        .expect("exists");
    assert_eq!(drifted.config.max_ack_pending, 7);

    let repaired = reconcile(&js, &name, &spec).await;
    assert!(repaired.report.ready, "{:?}", repaired.report);
    assert_eq!(repaired.report.reason, "Updated");
    let live = live_consumer(&js, &spec.stream.name, &durable)
        .await
        .expect("exists");
    assert_eq!(live.config.max_ack_pending, 20_000);
    assert_eq!(live.config.ack_wait, Duration::from_secs(30));
}

#[tokio::test]
async fn an_immutable_change_is_reported_and_the_consumer_left_untouched() {
    let js = jetstream_at(&nats().url()).await;
    let (name, mut spec) = pipeline_with_stream(&js, "immutable").await;
    let durable = spec.durable_name(&name).to_string();
    assert_eq!(reconcile(&js, &name, &spec).await.report.reason, "Created");
    let before = live_consumer(&js, &spec.stream.name, &durable)
        .await
        .expect("exists");

    // A changeable field changes too: nothing may be applied while deliver_policy differs.
    spec.consumer.deliver_policy = DeliverPolicyKind::New;
    spec.consumer.max_deliver = 2;
    let outcome = reconcile(&js, &name, &spec).await;
    assert!(!outcome.report.ready, "{:?}", outcome.report);
    assert_eq!(outcome.report.reason, "ImmutableFieldChanged");
    assert!(
        outcome.report.message.contains("deliver_policy all → new"),
        "{}",
        outcome.report.message
    );
    assert!(outcome.report.changes.is_empty());
    assert!(outcome.status.is_some(), "the figures are still reported");

    let after = live_consumer(&js, &spec.stream.name, &durable)
        .await
        .expect("exists");
    assert_eq!(after.config, before.config);
    assert_eq!(after.created, before.created);
}

#[tokio::test]
async fn the_consumer_reports_the_streams_pending_messages() {
    let js = jetstream_at(&nats().url()).await;
    let (name, spec) = pipeline_with_stream(&js, "pending").await;
    assert_eq!(reconcile(&js, &name, &spec).await.report.reason, "Created");
    for index in 0..3 {
        js.publish(format!("{name}.signals.{index}"), "{}".into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }
    // Outside the consumer's filter: not pending for it.
    js.publish(format!("{name}.other"), "{}".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let outcome = reconcile(&js, &name, &spec).await;
    assert_eq!(outcome.report.reason, "UpToDate");
    assert_eq!(outcome.status.map(|s| s.num_pending), Some(3));
}
