//! Partitioned consumers on the operator's side against nats-server 2.9: one AckAll consumer per
//! partition, those beyond a shrunk count deleted, the stream capturing the partitioned subjects,
//! and a server without the partition mapping detected and reported (`PartitionMappingMissing`);
//! and against the current release, which partitions by the stream's subject transform.

#[path = "support/dataplane.rs"]
mod support;

use async_nats::jetstream::consumer::AckPolicy;
use signal_model::SignalPipelineSpec;
use signal_model::partitions::PartitionScheme;
use signal_operator::dataplane::partitions::MAPPING_MISSING;
use signal_operator::dataplane::{DataPlaneReport, reconcile_data_plane};
use signal_testkit::NatsServer;
use support::{
    STEP_TIMEOUT, clickhouse, jetstream_at, live_consumer, live_stream, nats, no_credentials,
    pipeline_spec, unique,
};

async fn reconcile(name: &str, spec: &SignalPipelineSpec) -> DataPlaneReport {
    tokio::time::timeout(
        STEP_TIMEOUT,
        reconcile_data_plane(name, spec, &no_credentials()),
    )
    .await
    .expect("reconcile_data_plane is bounded")
}

fn partitioned_spec(name: &str, nats_url: &str, partitions: u32) -> SignalPipelineSpec {
    let mut spec = pipeline_spec(name, nats_url, &clickhouse().http_url());
    spec.stream.subjects = vec![format!("{name}.*")];
    spec.consumer.filter_subject = None;
    spec.workers.partitions = Some(partitions);
    spec.validate(name).expect("valid partitioned spec");
    spec
}

#[tokio::test]
async fn each_partition_gets_an_ack_all_consumer_and_a_shrunk_count_deletes_the_rest() {
    let name = unique("parts");
    let spec = partitioned_spec(&name, &nats().url(), 3);
    let report = reconcile(&name, &spec).await;
    assert!(report.all_ready(), "{report:#?}");
    assert_eq!(report.partitions.len(), 3, "{report:#?}");
    let js = jetstream_at(&nats().url()).await;
    let scheme = PartitionScheme::of(&spec, &name).expect("partitioned");
    let stream = live_stream(&js, &spec.stream.name).await.expect("stream");
    assert_eq!(
        stream.config.subjects,
        [scheme.partitioned_subjects(), scheme.source_subject.clone()]
    );
    for index in 0..3 {
        let consumer = live_consumer(&js, &spec.stream.name, &scheme.consumer_name(index))
            .await
            .expect("partition consumer");
        assert_eq!(consumer.config.ack_policy, AckPolicy::All);
        assert_eq!(consumer.config.filter_subject, scheme.filter_subject(index));
    }
    // The shared consumer is not created in partitioned mode.
    assert!(
        live_consumer(&js, &spec.stream.name, spec.durable_name(&name))
            .await
            .is_none()
    );

    let again = reconcile(&name, &spec).await;
    assert_eq!(again.consumer.reason, "UpToDate", "{again:#?}");

    let shrunk = partitioned_spec(&name, &nats().url(), 2);
    let report = reconcile(&name, &shrunk).await;
    assert!(report.all_ready(), "{report:#?}");
    assert!(
        report
            .consumer
            .changes
            .iter()
            .any(|c| c.contains(&scheme.consumer_name(2))),
        "{report:#?}"
    );
    assert!(
        live_consumer(&js, &spec.stream.name, &scheme.consumer_name(2))
            .await
            .is_none()
    );
    assert_eq!(report.partitions.len(), 2);
}

#[tokio::test]
async fn messages_without_a_partition_token_are_reported_with_the_mapping_to_add() {
    let name = unique("nomap");
    // A server of its own, without the mapping.
    let server = NatsServer::start().expect("nats-server");
    let spec = partitioned_spec(&name, &server.url(), 2);
    let report = reconcile(&name, &spec).await;
    assert!(report.all_ready(), "{report:#?}");
    let js = jetstream_at(&server.url()).await;
    js.publish(format!("{name}.k1"), "{}".into())
        .await
        .expect("publish")
        .await
        .expect("stored under the published subject");
    let report = reconcile(&name, &spec).await;
    assert_eq!(report.consumer.reason, MAPPING_MISSING, "{report:#?}");
    assert!(!report.all_ready());
    let scheme = PartitionScheme::of(&spec, &name).expect("partitioned");
    assert!(
        report.consumer.message.contains(&scheme.server_mapping()),
        "{}",
        report.consumer.message
    );
}

#[tokio::test]
async fn with_the_mapping_published_messages_land_in_the_partitions() {
    let name = unique("mapped");
    let probe = partitioned_spec(&name, "nats://127.0.0.1:4222", 2);
    let scheme = PartitionScheme::of(&probe, &name).expect("partitioned");
    let server = NatsServer::start_with_mappings(&[(
        scheme.source_subject.clone(),
        scheme.mapping_destination(),
    )])
    .expect("nats-server with the mapping");
    let spec = partitioned_spec(&name, &server.url(), 2);
    assert!(reconcile(&name, &spec).await.all_ready());
    let js = jetstream_at(&server.url()).await;
    let report = publish_to_both_partitions(&js, &name, &spec).await;
    assert_eq!(report.consumer_status.map(|c| c.num_pending), Some(20));
}

/// Publishes 20 messages on as many keys of `name`'s subjects, reconciles, and checks that both
/// partitions' consumers have some of them to deliver and all 20 between them.
async fn publish_to_both_partitions(
    js: &async_nats::jetstream::Context,
    name: &str,
    spec: &SignalPipelineSpec,
) -> DataPlaneReport {
    for key in 0..20 {
        js.publish(format!("{name}.k{key}"), "{}".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let report = reconcile(name, spec).await;
    assert!(report.all_ready(), "{report:#?}");
    let pending: Vec<u64> = report.partitions.iter().map(|p| p.num_pending).collect();
    assert_eq!(pending.iter().sum::<u64>(), 20, "{pending:?}");
    assert!(
        pending.iter().all(|n| *n > 0),
        "both partitions get messages: {pending:?}"
    );
    report
}

/// nats-server 2.10+ partitions by the stream's own subject transform: nothing to configure on the
/// server. Run against the current release the suite builds (`scripts/build-current-nats.sh`).
#[tokio::test]
async fn on_a_current_nats_server_the_streams_subject_transform_partitions_published_messages() {
    let name = unique("transformed");
    let server = NatsServer::start_current().expect("the current nats-server");
    let spec = partitioned_spec(&name, &server.url(), 2);
    let scheme = PartitionScheme::of(&spec, &name).expect("partitioned");
    let report = reconcile(&name, &spec).await;
    assert!(report.all_ready(), "{report:#?}");
    assert!(
        report
            .consumer
            .message
            .contains("partitioned by the stream's subject transform"),
        "{report:#?}"
    );
    let js = jetstream_at(&server.url()).await;
    assert_eq!(
        js.client().server_info().version,
        signal_testkit::CURRENT_NATS_VERSION
    );
    let stream = live_stream(&js, &spec.stream.name).await.expect("stream");
    assert_eq!(
        stream.config.subject_transform,
        Some(signal_operator::dataplane::partitions::desired_transform(
            &scheme
        ))
    );

    let report = publish_to_both_partitions(&js, &name, &spec).await;
    assert_eq!(report.consumer.reason, "UpToDate", "{report:#?}");
    // Stored under the partitioned subject, the published one after the partition token.
    let stored = js
        .get_stream(&spec.stream.name)
        .await
        .expect("stream")
        .get_raw_message(1)
        .await
        .expect("the first message");
    let prefix = format!("part.{}.", spec.stream.name);
    assert!(
        stored.subject.starts_with(&prefix) && stored.subject.ends_with(&format!("{name}.k0")),
        "{}",
        stored.subject
    );
}
