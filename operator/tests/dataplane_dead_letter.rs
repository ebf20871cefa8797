//! The dead-letter stream and the workers' health reports against a real nats-server, through
//! the entry points the controller and local mode call.
//!
//! A pipeline without `spec.deadLetter` gets its default dead-letter stream, which really stores
//! what is published to the default subject; a settings change is applied and a storage change
//! refused; `deletionPolicy: Delete` removes it with the source stream and `Retain` keeps it; an
//! unmanaged dead-letter subject that no stream captures is reported as `DeadLetterUnroutable`.
//! The shared health stream is created with the contract's settings and survives pipeline
//! deletion; a stuck worker's report published to it comes back as the pipeline's health, an old
//! report does not, and another pipeline's report is not read. Through the controller's shared
//! pool, the reports come from its mirror of the stream, which follows new reports and starts
//! again after a nats-server restart (the memory stream, and its reports, gone).

#[path = "support/dataplane.rs"]
mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::stream::StorageType;
use signal_model::worker_health::{
    HEALTH_REPORT_MAX_AGE_SECS, HEALTH_STREAM, HEALTH_SUBJECTS, HealthReason, WorkerHealthReport,
    health_subject,
};
use signal_model::{
    DeadLetterSpec, DeletionPolicy, HumanDuration, SignalPipelineSpec, StorageKind,
};
use signal_operator::dataplane::connections::{ConnectionLimits, Connections};
use signal_operator::dataplane::table::TableCheck;
use signal_operator::dataplane::worker_health::WorkerHealth;
use signal_operator::dataplane::{
    DataPlaneReport, delete_data_plane, read_worker_health, reconcile_data_plane,
    reconcile_data_plane_with,
};
use signal_testkit::NatsServer;
use support::{
    STEP_TIMEOUT, clickhouse, jetstream_at, live_stream, nats, no_credentials, pipeline_spec,
    shared_pipeline_spec, unique,
};

async fn reconcile(name: &str, spec: &SignalPipelineSpec) -> DataPlaneReport {
    tokio::time::timeout(
        STEP_TIMEOUT,
        reconcile_data_plane(name, spec, &no_credentials()),
    )
    .await
    .expect("reconcile_data_plane is bounded")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

#[tokio::test]
async fn a_pipeline_without_dead_letter_gets_a_default_stream_that_stores_dead_letters() {
    let name = unique("dlq_default");
    let spec = shared_pipeline_spec(&name);
    assert_eq!(spec.dead_letter, None);
    let report = reconcile(&name, &spec).await;
    assert!(
        report.all_ready() && report.dead_letter.ready,
        "{report:#?}"
    );
    assert_eq!(report.dead_letter.reason, "Created");
    assert!(
        report
            .changes()
            .any(|c| c.contains(&format!("{}_DLQ", spec.stream.name))),
        "{report:#?}"
    );

    let subject = spec.dead_letter_subject(&name);
    let stream_name = format!("{}_DLQ", spec.stream.name);
    let status = report.dead_letter_status.expect("dead-letter status");
    assert_eq!(
        (status.subject.as_str(), status.stream.as_str()),
        (subject.as_str(), stream_name.as_str())
    );

    let js = jetstream_at(&nats().url()).await;
    let live = live_stream(&js, &stream_name)
        .await
        .expect("dead-letter stream");
    assert_eq!(
        live.config.subjects,
        [format!("dlq.{}.>", spec.stream.name)]
    );
    assert_eq!(live.config.max_age, Duration::from_secs(14 * 86_400));
    assert_eq!(live.config.duplicate_window, Duration::from_secs(120));

    // A dead letter is stored and acknowledged; its repeat with the same message id is dropped.
    for _ in 0..2 {
        let ack = js
            .send_publish(
                subject.clone(),
                async_nats::jetstream::message::PublishMessage::build()
                    .payload("poison".into())
                    .message_id(format!("{}:7", spec.stream.name)),
            )
            .await
            .expect("publish")
            .await
            .expect("JetStream stores the dead letter");
        assert_eq!(ack.stream, stream_name);
    }
    let again = reconcile(&name, &spec).await;
    assert_eq!(again.dead_letter.reason, "UpToDate", "{again:#?}");
    assert_eq!(again.dead_letter_status.map(|s| s.messages), Some(1));
}

#[tokio::test]
async fn dead_letter_settings_are_applied_and_storage_changes_refused() {
    let name = unique("dlq_settings");
    let mut spec = shared_pipeline_spec(&name);
    let mut dead_letter = DeadLetterSpec::default();
    dead_letter.stream.name = Some(format!("{}_POISON", spec.stream.name));
    dead_letter.stream.max_age = HumanDuration::from_secs(3600);
    spec.dead_letter = Some(dead_letter);
    spec.validate(&name).expect("valid");
    assert!(reconcile(&name, &spec).await.dead_letter.ready);

    let stream_name = format!("{}_POISON", spec.stream.name);
    let settings = &mut spec.dead_letter.as_mut().expect("set").stream;
    settings.max_age = HumanDuration::from_secs(7200);
    settings.max_msgs = Some(1000);
    settings.duplicate_window = Some(HumanDuration::from_secs(300));
    let updated = reconcile(&name, &spec).await;
    assert_eq!(updated.dead_letter.reason, "Updated", "{updated:#?}");
    let js = jetstream_at(&nats().url()).await;
    let live = live_stream(&js, &stream_name).await.expect("stream");
    assert_eq!(live.config.max_age, Duration::from_secs(7200));
    assert_eq!(live.config.max_messages, 1000);
    assert_eq!(live.config.duplicate_window, Duration::from_secs(300));

    spec.dead_letter.as_mut().expect("set").stream.storage = StorageKind::Memory;
    let refused = reconcile(&name, &spec).await;
    assert!(!refused.dead_letter.ready);
    assert_eq!(refused.dead_letter.reason, "ImmutableFieldChanged");
    assert!(refused.all_ready(), "the workers still run: {refused:#?}");
    let live = live_stream(&js, &stream_name).await.expect("stream kept");
    assert_eq!(live.config.storage, StorageType::File);
}

#[tokio::test]
async fn the_dead_letter_stream_goes_with_the_source_stream_under_delete_only() {
    let js = jetstream_at(&nats().url()).await;

    let kept = unique("dlq_retain");
    let spec = shared_pipeline_spec(&kept);
    assert!(reconcile(&kept, &spec).await.dead_letter.ready);
    delete_data_plane(&kept, &spec, &no_credentials())
        .await
        .expect("retain");
    assert!(
        live_stream(&js, &format!("{}_DLQ", spec.stream.name))
            .await
            .is_some()
    );

    let gone = unique("dlq_delete");
    let spec = SignalPipelineSpec {
        deletion_policy: DeletionPolicy::Delete,
        ..shared_pipeline_spec(&gone)
    };
    assert!(reconcile(&gone, &spec).await.dead_letter.ready);
    delete_data_plane(&gone, &spec, &no_credentials())
        .await
        .expect("delete");
    assert!(live_stream(&js, &spec.stream.name).await.is_none());
    assert!(
        live_stream(&js, &format!("{}_DLQ", spec.stream.name))
            .await
            .is_none()
    );
    // The health stream is shared by every pipeline: never deleted with one.
    assert!(live_stream(&js, HEALTH_STREAM).await.is_some());
}

#[tokio::test]
async fn an_unmanaged_dead_letter_subject_that_no_stream_captures_is_reported() {
    let name = unique("dlq_unmanaged");
    let mut spec = shared_pipeline_spec(&name);
    let mut dead_letter = DeadLetterSpec {
        subject: Some(format!("elsewhere.{name}")),
        ..DeadLetterSpec::default()
    };
    dead_letter.stream.managed = false;
    spec.dead_letter = Some(dead_letter);
    spec.validate(&name).expect("valid");

    let report = reconcile(&name, &spec).await;
    assert!(report.all_ready(), "{report:#?}");
    assert!(!report.dead_letter.ready);
    assert_eq!(report.dead_letter.reason, "DeadLetterUnroutable");
    assert!(
        report
            .dead_letter
            .message
            .contains(&format!("elsewhere.{name}")),
        "{report:#?}"
    );
    assert_eq!(
        report.dead_letter_status.map(|s| s.stream),
        Some(String::new())
    );

    // Once someone else's stream captures it, the pipeline says which one.
    let js = jetstream_at(&nats().url()).await;
    let theirs = format!("THEIRS_{}", name.to_uppercase());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: theirs.clone(),
        subjects: vec![format!("elsewhere.{name}")],
        ..Default::default()
    })
    .await
    .expect("their stream");
    let captured = reconcile(&name, &spec).await;
    assert!(captured.dead_letter.ready, "{captured:#?}");
    assert_eq!(captured.dead_letter_status.map(|s| s.stream), Some(theirs));
}

#[tokio::test]
async fn the_health_stream_has_the_contract_settings() {
    let name = unique("health_stream");
    let spec = shared_pipeline_spec(&name);
    reconcile(&name, &spec).await;
    let js = jetstream_at(&nats().url()).await;
    let live = live_stream(&js, HEALTH_STREAM)
        .await
        .expect("health stream");
    assert_eq!(live.config.subjects, [HEALTH_SUBJECTS]);
    assert_eq!(live.config.storage, StorageType::Memory);
    assert_eq!(live.config.max_messages_per_subject, 1);
    assert_eq!(
        live.config.max_age,
        Duration::from_secs(HEALTH_REPORT_MAX_AGE_SECS)
    );
}

#[tokio::test]
async fn a_stuck_workers_report_becomes_the_pipelines_health() {
    let name = unique("health_read");
    let spec = shared_pipeline_spec(&name);
    let report = reconcile(&name, &spec).await;
    assert_eq!(report.worker_health, WorkerHealth::NoReports, "{report:#?}");

    let js = jetstream_at(&nats().url()).await;
    let durable = spec.durable_name(&name);
    let publish = |worker: &str, report: WorkerHealthReport| {
        let js = js.clone();
        let subject = health_subject(&spec.stream.name, durable, worker);
        async move {
            js.publish(subject, serde_json::to_vec(&report).expect("json").into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        }
    };
    let report =
        |worker: &str, ready: bool, reason: Option<HealthReason>, at: u64| WorkerHealthReport {
            worker: worker.to_string(),
            ready,
            reason,
            message: format!("{worker}: Code: 16. No such column amount_usd"),
            reported_at_unix_ms: at,
        };
    // An old stuck report of a worker that has since reported progress: only the last counts.
    publish(
        "w-0",
        report("w-0", false, Some(HealthReason::SchemaMismatch), now_ms()),
    )
    .await;
    publish("w-0", report("w-0", true, None, now_ms())).await;
    publish(
        "w-1",
        report("w-1", false, Some(HealthReason::InsertRejected), now_ms()),
    )
    .await;
    // A report too old to count, and another pipeline's stuck worker.
    publish(
        "w-2",
        report("w-2", false, Some(HealthReason::DeadLetterUnroutable), 1),
    )
    .await;
    js.publish(
        health_subject(&spec.stream.name, "someone_else", "w-9"),
        serde_json::to_vec(&report(
            "w-9",
            false,
            Some(HealthReason::SchemaMismatch),
            now_ms(),
        ))
        .expect("json")
        .into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");

    let expected = WorkerHealth::Stuck {
        reason: "InsertRejected".into(),
        message: "worker w-1: w-1: Code: 16. No such column amount_usd".into(),
    };
    assert_eq!(reconcile(&name, &spec).await.worker_health, expected);
    assert_eq!(
        read_worker_health(&name, &spec, &no_credentials()).await,
        expected
    );

    publish("w-1", report("w-1", true, None, now_ms())).await;
    assert_eq!(
        reconcile(&name, &spec).await.worker_health,
        WorkerHealth::Healthy { workers: 2 }
    );
}

#[tokio::test]
async fn the_shared_pools_mirror_follows_new_reports_and_a_nats_restart() {
    let mut server = NatsServer::start().expect("nats-server must start");
    let name = unique("health_mirror");
    let spec = pipeline_spec(&name, &server.url(), &clickhouse().http_url());
    let connections = Connections::shared(ConnectionLimits::default(), None);
    let health = || async {
        tokio::time::timeout(
            STEP_TIMEOUT,
            reconcile_data_plane_with(
                &connections,
                &format!("test/{name}"),
                &name,
                &spec,
                &no_credentials(),
                TableCheck::Full,
            ),
        )
        .await
        .expect("reconcile_data_plane_with is bounded")
        .worker_health
    };
    // Polls the pool's reconciles until the health is `expected` (the mirror follows the stream
    // a moment later than a publish is stored).
    let until = |expected: WorkerHealth, within: Duration| {
        let health = &health;
        async move {
            let deadline = tokio::time::Instant::now() + within;
            loop {
                let found = health().await;
                if found == expected {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still {found:?}, waiting for {expected:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(health().await, WorkerHealth::NoReports);

    let durable = spec.durable_name(&name);
    let nats_url = server.url();
    let publish = |report: WorkerHealthReport| {
        let url = nats_url.clone();
        let subject = health_subject(&spec.stream.name, durable, &report.worker);
        async move {
            jetstream_at(&url)
                .await
                .publish(subject, serde_json::to_vec(&report).expect("json").into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        }
    };
    let stuck = WorkerHealthReport {
        worker: "w-0".to_string(),
        ready: false,
        reason: Some(HealthReason::InsertRejected),
        message: "Code: 60. Table does not exist".to_string(),
        reported_at_unix_ms: now_ms(),
    };
    publish(stuck.clone()).await;
    until(
        WorkerHealth::Stuck {
            reason: "InsertRejected".into(),
            message: "worker w-0: Code: 60. Table does not exist".into(),
        },
        Duration::from_secs(5),
    )
    .await;

    // The health stream lives in memory: a restart loses it and its reports. The next reconcile
    // that makes sure of the stream creates it again, and the mirror starts over from it.
    server.restart().expect("nats-server restarts");
    until(WorkerHealth::NoReports, Duration::from_secs(30)).await;
    publish(WorkerHealthReport {
        ready: true,
        reason: None,
        message: String::new(),
        reported_at_unix_ms: now_ms(),
        ..stuck
    })
    .await;
    until(WorkerHealth::Healthy { workers: 1 }, Duration::from_secs(5)).await;
}
