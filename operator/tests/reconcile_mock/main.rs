//! The reconcile loop against a scripted Kubernetes API (kube's mock client service) and real
//! data-plane servers.
//!
//! Each test runs one `reconcile` the way the controller would and asserts, in order, every
//! request it makes to Kubernetes: the finalizer patch for a new pipeline; server-side applies of
//! the ConfigMap, the Deployment and the status once the stream, consumer and table are ready;
//! the finalizer release on deletion, with the data plane kept (`Retain`) or removed (`Delete`),
//! and held while a `Delete` cleanup fails until the cleanup timeout gives up; a `Conflict` status
//! for the newer of two pipelines claiming one table; `Ready=False` and an error, not a panic,
//! when NATS is unreachable, a Secret is missing or the spec is invalid, with a running worker
//! Deployment still following replicas and image but keeping its manifest; the dead-letter stream
//! created, kept or deleted with the pipeline and named in its status; `Ready=False` with the
//! reason of a stuck worker's health report published to the real NATS. NATS and ClickHouse are
//! real servers from `signal-testkit`, started once and shared: each test uses its own stream,
//! subjects and table.

mod api_server;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use api_server::{ApiServer, Call, mock_client};
use http::Method;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use serde_json::{Value, json};
use signal_model::credentials::PipelineCredentials;
use signal_model::worker_health::{HealthReason, WorkerHealthReport, health_subject};
use signal_model::{SignalPipeline, SignalPipelineSpec, SignalPipelineStatus};
use signal_operator::controller::{
    Context, FINALIZER, PipelineIndex, ReconcileError, Settings, reconcile,
};
use signal_operator::dataplane::reconcile_data_plane;
use signal_operator::metrics::Metrics;
use signal_operator::workload::{CONFIG_HASH_ANNOTATION, MANIFEST_KEY, config_hash};
use signal_testkit::{ClickHouseServer, NatsServer, free_port};

const NAMESPACE: &str = "signals";
const DATABASE: &str = "reconcile_mock";
const WORKER_IMAGE: &str = "signal-worker:mock";
const PIPELINES_PATH: &str = "/apis/signals.dev/v1alpha1/namespaces/signals/signalpipelines";
/// Bounds a whole reconcile, so a test that waits for a call that never comes fails instead of
/// hanging.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(120);

struct Servers {
    nats: NatsServer,
    clickhouse: ClickHouseServer,
}

/// One NATS and one ClickHouse for every test of this binary (testkit keeps them alive for the
/// process, not the test thread that started them).
fn servers() -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(|| Servers {
        nats: NatsServer::start().expect("nats-server starts (scripts/install-test-deps.sh)"),
        clickhouse: ClickHouseServer::start()
            .expect("clickhouse-server starts (scripts/install-test-deps.sh)"),
    })
}

/// A URL nothing listens on.
fn unreachable_url(scheme: &str) -> String {
    format!(
        "{scheme}://127.0.0.1:{}",
        free_port().expect("a free loopback port")
    )
}

/// A stored pipeline (uid, generation, creation time) named `name`, with its own stream,
/// subjects and table, created `created_at` seconds after the epoch.
fn pipeline(name: &str, nats_url: &str, clickhouse_url: &str, created_at: i64) -> SignalPipeline {
    let spec: SignalPipelineSpec = serde_json::from_value(json!({
        "nats": {"url": nats_url},
        "stream": {"name": format!("MOCK_{}", name.replace('-', "_")), "subjects": [format!("mock.{name}.>")]},
        "clickhouse": {
            "url": clickhouse_url,
            "database": DATABASE,
            "table": name.replace('-', "_"),
            "orderBy": ["seq"],
            "columns": [
                {"name": "seq", "type": "UInt64", "from": "@sequence"},
                {"name": "subject", "type": "String", "from": "@subject"},
                {"name": "payload", "type": "String", "from": "$"},
            ],
        },
    }))
    .expect("a valid spec");
    let mut pipeline = SignalPipeline::new(name, spec);
    let meta = &mut pipeline.metadata;
    meta.namespace = Some(NAMESPACE.to_string());
    meta.uid = Some(format!("uid-{name}"));
    meta.generation = Some(1);
    meta.resource_version = Some("1".to_string());
    meta.creation_timestamp = Some(Time(
        Timestamp::from_second(created_at).expect("a valid timestamp"),
    ));
    pipeline
}

fn with_finalizer(mut pipeline: SignalPipeline) -> SignalPipeline {
    pipeline.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    pipeline
}

fn being_deleted(mut pipeline: SignalPipeline) -> SignalPipeline {
    pipeline.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    pipeline
}

/// The controller's view of every pipeline, as its watch would feed it.
fn index_of(pipelines: &[&SignalPipeline]) -> PipelineIndex {
    let index = PipelineIndex::default();
    let mut feeder = index.feeder(None);
    for pipeline in pipelines {
        feeder.apply_watcher_event(&watcher::Event::Apply((*pipeline).clone()));
    }
    index
}

/// Starts `reconcile` of `pipeline` against a fresh mock API; the returned task ends when the
/// reconcile does, dropping the client so [`ApiServer::expect_no_more_calls`] can tell.
fn start_reconcile(
    pipeline: &SignalPipeline,
    index: PipelineIndex,
) -> (
    tokio::task::JoinHandle<Result<Action, ReconcileError>>,
    ApiServer,
) {
    let (client, api) = mock_client();
    let ctx = Arc::new(Context::new(
        client,
        Settings::new(WORKER_IMAGE),
        Arc::new(Metrics::default()),
        index,
    ));
    let pipeline = Arc::new(pipeline.clone());
    let task = tokio::spawn(async move {
        tokio::time::timeout(RECONCILE_TIMEOUT, reconcile(pipeline, ctx))
            .await
            .expect("the reconcile finishes in time")
    });
    (task, api)
}

async fn finish(
    task: tokio::task::JoinHandle<Result<Action, ReconcileError>>,
    api: &mut ApiServer,
) -> Result<Action, ReconcileError> {
    api.expect_no_more_calls().await;
    task.await.expect("the reconcile does not panic")
}

fn pipeline_path(name: &str) -> String {
    format!("{PIPELINES_PATH}/{name}")
}

fn deployment_path(pipeline: &str) -> String {
    format!("/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{pipeline}-worker")
}

fn configmap_path(pipeline: &str) -> String {
    format!("/api/v1/namespaces/{NAMESPACE}/configmaps/{pipeline}-pipeline")
}

fn as_json(pipeline: &SignalPipeline) -> Value {
    serde_json::to_value(pipeline).expect("a pipeline serialises")
}

/// The pipeline as the API server returns it after a status apply.
fn respond_with_status(call: Call, pipeline: &SignalPipeline) {
    let mut stored = as_json(pipeline);
    stored["status"] = call.body["status"].clone();
    call.respond_ok(&stored);
}

/// The condition of `type_` in a status apply's body.
fn condition<'a>(status_apply: &'a Value, type_: &str) -> &'a Value {
    status_apply["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status_apply}"))
}

/// `(status, reason)` of a condition, for compact assertions.
fn state<'a>(status_apply: &'a Value, type_: &str) -> (&'a str, &'a str) {
    let found = condition(status_apply, type_);
    (
        found["status"].as_str().unwrap_or_default(),
        found["reason"].as_str().unwrap_or_default(),
    )
}

async fn stream_exists(nats_url: &str, stream: &str) -> bool {
    let client = async_nats::connect(nats_url)
        .await
        .expect("the test NATS is reachable");
    async_nats::jetstream::new(client)
        .get_stream(stream)
        .await
        .is_ok()
}

fn table_exists(table: &str) -> bool {
    let answer = servers()
        .clickhouse
        .query(&format!("EXISTS TABLE {DATABASE}.{table}"))
        .expect("the test ClickHouse answers");
    answer.trim() == "1"
}

#[tokio::test]
async fn a_new_pipeline_first_gets_the_finalizer() {
    // Nothing is contacted before the finalizer is in place: the URLs lead nowhere.
    let fresh = pipeline(
        "fresh",
        &unreachable_url("nats"),
        &unreachable_url("http"),
        1_700_000_000,
    );
    let (task, mut api) = start_reconcile(&fresh, index_of(&[&fresh]));

    let call = api.next_call().await;
    call.expect_json_patch(
        &pipeline_path("fresh"),
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ]),
    );
    call.respond_ok(&as_json(&with_finalizer(fresh.clone())));

    let action = finish(task, &mut api)
        .await
        .expect("the finalizer is added");
    // The patch triggers a new reconcile through the watch; nothing to requeue.
    assert_eq!(action, Action::await_change());
    assert!(api.events.is_empty(), "{:?}", api.events);
}

#[tokio::test]
async fn a_ready_data_plane_gets_its_configmap_deployment_and_status_applied() {
    let servers = servers();
    let mut orders = with_finalizer(pipeline(
        "orders",
        &servers.nats.url(),
        &servers.clickhouse.http_url(),
        1_700_000_000,
    ));
    // Two batches of 15,000 do not fit the default window of 20,000 unacknowledged messages.
    orders.spec.workers.batch.max_rows = 15_000;
    let (task, mut api) = start_reconcile(&orders, index_of(&[&orders]));

    let read = api.next_call().await;
    read.expect(Method::GET, &deployment_path("orders"));
    read.respond_not_found();

    let configmap_apply = api.next_call().await;
    configmap_apply.expect_apply(&configmap_path("orders"));
    let configmap: ConfigMap =
        serde_json::from_value(configmap_apply.body.clone()).expect("a ConfigMap body");
    let manifest = &configmap.data.as_ref().expect("data")[MANIFEST_KEY];
    assert!(manifest.contains("MOCK_orders"), "{manifest}");
    // The workers get the dead-letter subject resolved, not the rules that derive it.
    assert!(
        manifest.contains("subject: dlq.MOCK_orders.orders"),
        "{manifest}"
    );
    let owner = &configmap.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("SignalPipeline", "uid-orders")
    );
    let expected_hash = config_hash(&configmap);
    let echo = configmap_apply.body.clone();
    configmap_apply.respond_ok(&echo);

    let deployment_apply = api.next_call().await;
    deployment_apply.expect_apply(&deployment_path("orders"));
    let deployment: Deployment =
        serde_json::from_value(deployment_apply.body.clone()).expect("a Deployment body");
    let spec = deployment.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(1));
    let pod_annotations = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref());
    assert_eq!(
        pod_annotations.and_then(|a| a.get(CONFIG_HASH_ANNOTATION)),
        Some(&expected_hash),
        "the pods roll when the manifest changes"
    );
    let image = spec.template.spec.as_ref().expect("pod spec").containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some(WORKER_IMAGE));
    // The API server's answer: created, no pod ready yet.
    let mut stored = deployment_apply.body.clone();
    stored["metadata"]["generation"] = json!(1);
    stored["status"] = json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1});
    deployment_apply.respond_ok(&stored);

    let status_apply = api.next_call().await;
    status_apply.expect_apply(&format!("{}/status", pipeline_path("orders")));
    let body = status_apply.body.clone();
    assert_eq!(body["apiVersion"], "signals.dev/v1alpha1");
    assert_eq!(body["kind"], "SignalPipeline");
    // Only the status: the operator must not take ownership of spec fields the user applies.
    let fields: Vec<&String> = body.as_object().expect("an object").keys().collect();
    assert_eq!(fields, ["apiVersion", "kind", "status"]);
    assert_eq!(state(&body, "StreamReady").0, "True", "{body}");
    assert_eq!(state(&body, "ConsumerReady").0, "True", "{body}");
    assert_eq!(state(&body, "TableReady").0, "True", "{body}");
    assert_eq!(
        state(&body, "DeadLetterReady"),
        ("True", "Created"),
        "{body}"
    );
    assert_eq!(
        state(&body, "WorkersHealthy"),
        ("True", "NoReports"),
        "{body}"
    );
    assert_eq!(body["status"]["deadLetter"]["stream"], "MOCK_orders_DLQ");
    assert_eq!(
        body["status"]["deadLetter"]["subject"],
        "dlq.MOCK_orders.orders"
    );
    assert_eq!(state(&body, "WorkersReady"), ("False", "Progressing"));
    assert_eq!(
        state(&body, "Ready").0,
        "False",
        "workers are not ready yet"
    );
    assert_eq!(body["status"]["table"], format!("{DATABASE}.orders"));
    assert_eq!(body["status"]["replicas"], 1);
    assert_eq!(body["status"]["observedGeneration"], 1);
    assert_eq!(
        body["status"]["selector"],
        "app.kubernetes.io/instance=orders,app.kubernetes.io/name=signal-worker"
    );
    respond_with_status(status_apply, &orders);

    let action = finish(task, &mut api).await.expect("reconciled");
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    assert!(api.published("WorkersApplied"), "{:?}", api.events);
    assert!(
        api.events
            .iter()
            .any(|e| e.reason == "DataPlaneCreated" && e.note.contains("created table")),
        "{:?}",
        api.events
    );
    assert!(
        api.events.iter().any(|e| e.reason == "AckWindowTooSmall"
            && e.type_ == "Warning"
            && e.note.contains("below 30000")),
        "{:?}",
        api.events
    );
    assert!(stream_exists(&servers.nats.url(), "MOCK_orders").await);
    assert!(stream_exists(&servers.nats.url(), "MOCK_orders_DLQ").await);
    assert!(table_exists("orders"));

    // Second pass, on the spec version the status has seen: the Deployment is up to date and
    // ready, so the pipeline is Ready, and neither the worker event nor the window's warning is
    // published again.
    let mut ready_deployment = stored;
    ready_deployment["status"]["readyReplicas"] = json!(1);
    orders.status = Some(SignalPipelineStatus {
        observed_generation: orders.metadata.generation,
        ..Default::default()
    });
    let (task, mut api) = start_reconcile(&orders, index_of(&[&orders]));
    let read = api.next_call().await;
    read.expect(Method::GET, &deployment_path("orders"));
    read.respond_ok(&ready_deployment);
    for path in [configmap_path("orders"), deployment_path("orders")] {
        let apply = api.next_call().await;
        apply.expect_apply(&path);
        let answer = if path.contains("deployments") {
            ready_deployment.clone()
        } else {
            apply.body.clone()
        };
        apply.respond_ok(&answer);
    }
    let status_apply = api.next_call().await;
    status_apply.expect_apply(&format!("{}/status", pipeline_path("orders")));
    let body = status_apply.body.clone();
    assert_eq!(state(&body, "WorkersReady"), ("True", "Ready"), "{body}");
    assert_eq!(state(&body, "Ready"), ("True", "Ready"), "{body}");
    respond_with_status(status_apply, &orders);
    finish(task, &mut api).await.expect("reconciled again");
    assert!(!api.published("WorkersApplied"), "{:?}", api.events);
    assert!(!api.published("AckWindowTooSmall"), "{:?}", api.events);
}

#[tokio::test]
async fn a_stuck_workers_health_report_makes_the_pipeline_not_ready_with_its_reason() {
    let servers = servers();
    let stuck = with_finalizer(pipeline(
        "stuck",
        &servers.nats.url(),
        &servers.clickhouse.http_url(),
        1_700_000_000,
    ));
    create_data_plane(&stuck).await;
    // What a worker whose inserts ClickHouse refuses publishes (model::worker_health).
    let report = WorkerHealthReport {
        worker: "stuck-worker-0".to_string(),
        ready: false,
        reason: Some(HealthReason::InsertRejected),
        message: "Code: 16. DB::Exception: No such column amount_usd".to_string(),
        reported_at_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64,
    };
    let client = async_nats::connect(servers.nats.url()).await.expect("NATS");
    async_nats::jetstream::new(client)
        .publish(
            health_subject("MOCK_stuck", "stuck", &report.worker),
            serde_json::to_vec(&report).expect("json").into(),
        )
        .await
        .expect("publish")
        .await
        .expect("the health stream stores the report");

    let (task, mut api) = start_reconcile(&stuck, index_of(&[&stuck]));
    let read = api.next_call().await;
    read.expect(Method::GET, &deployment_path("stuck"));
    // The stuck worker's pod is not ready either.
    let unready = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "stuck-worker", "namespace": NAMESPACE, "generation": 1},
        "spec": {"replicas": 1, "selector": {}, "template": {}},
        "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 0},
    });
    read.respond_ok(&unready);
    for path in [configmap_path("stuck"), deployment_path("stuck")] {
        let apply = api.next_call().await;
        apply.expect_apply(&path);
        let answer = if path.contains("deployments") {
            unready.clone()
        } else {
            apply.body.clone()
        };
        apply.respond_ok(&answer);
    }
    let status_apply = api.next_call().await;
    status_apply.expect_apply(&format!("{}/status", pipeline_path("stuck")));
    let body = status_apply.body.clone();
    assert_eq!(
        state(&body, "WorkersHealthy"),
        ("False", "InsertRejected"),
        "{body}"
    );
    assert_eq!(state(&body, "Ready"), ("False", "InsertRejected"), "{body}");
    let message = condition(&body, "Ready")["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message
            .contains("worker stuck-worker-0: Code: 16. DB::Exception: No such column amount_usd"),
        "{message}"
    );
    respond_with_status(status_apply, &stuck);
    finish(task, &mut api).await.expect("reconciled");
    assert!(api.published("InsertRejected"), "{:?}", api.events);
}

/// Creates the stream, consumer and table of `pipeline` directly, as an earlier reconcile would.
async fn create_data_plane(pipeline: &SignalPipeline) {
    let name = pipeline.metadata.name.as_deref().expect("a name");
    let report = reconcile_data_plane(name, &pipeline.spec, &PipelineCredentials::default()).await;
    assert!(report.all_ready(), "{report:?}");
}

/// The finalizer release kube's helper sends once cleanup succeeded.
fn expect_finalizer_removed(call: Call, pipeline: &SignalPipeline) {
    let name = pipeline.metadata.name.as_deref().expect("a name");
    call.expect_json_patch(
        &pipeline_path(name),
        json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
            {"op": "remove", "path": "/metadata/finalizers/0"},
        ]),
    );
    let mut released = as_json(pipeline);
    released["metadata"]["finalizers"] = json!([]);
    call.respond_ok(&released);
}

#[tokio::test]
async fn deleting_with_retain_keeps_the_data_plane_and_releases_the_finalizer() {
    let servers = servers();
    let kept = with_finalizer(pipeline(
        "kept",
        &servers.nats.url(),
        &servers.clickhouse.http_url(),
        1_700_000_000,
    ));
    create_data_plane(&kept).await;
    let kept = being_deleted(kept);
    let (task, mut api) = start_reconcile(&kept, index_of(&[&kept]));

    expect_finalizer_removed(api.next_call().await, &kept);
    let action = finish(task, &mut api).await.expect("cleaned up");
    assert_eq!(action, Action::await_change());
    assert!(api.published("Retained"), "{:?}", api.events);
    assert!(stream_exists(&servers.nats.url(), "MOCK_kept").await);
    assert!(stream_exists(&servers.nats.url(), "MOCK_kept_DLQ").await);
    assert!(table_exists("kept"));
}

#[tokio::test]
async fn deleting_with_delete_removes_the_data_plane_then_releases_the_finalizer() {
    let servers = servers();
    let mut removed = with_finalizer(pipeline(
        "removed",
        &servers.nats.url(),
        &servers.clickhouse.http_url(),
        1_700_000_000,
    ));
    removed.spec.deletion_policy = signal_model::DeletionPolicy::Delete;
    create_data_plane(&removed).await;
    assert!(table_exists("removed"));
    let removed = being_deleted(removed);
    let (task, mut api) = start_reconcile(&removed, index_of(&[&removed]));

    expect_finalizer_removed(api.next_call().await, &removed);
    let action = finish(task, &mut api).await.expect("cleaned up");
    assert_eq!(action, Action::await_change());
    assert!(api.published("Deleted"), "{:?}", api.events);
    assert!(!stream_exists(&servers.nats.url(), "MOCK_removed").await);
    assert!(!stream_exists(&servers.nats.url(), "MOCK_removed_DLQ").await);
    assert!(!table_exists("removed"));
}

#[tokio::test]
async fn the_newer_of_two_pipelines_claiming_one_table_is_reported_in_conflict() {
    // Neither server is contacted: the conflict is decided from the controller's cache.
    let nats_url = unreachable_url("nats");
    let clickhouse_url = unreachable_url("http");
    let older = with_finalizer(pipeline("older", &nats_url, &clickhouse_url, 1_700_000_000));
    let mut newer = with_finalizer(pipeline("newer", &nats_url, &clickhouse_url, 1_700_000_500));
    newer.spec.clickhouse.table = older.spec.clickhouse.table.clone();
    let (task, mut api) = start_reconcile(&newer, index_of(&[&older, &newer]));

    let status_apply = api.next_call().await;
    status_apply.expect_apply(&format!("{}/status", pipeline_path("newer")));
    let body = status_apply.body.clone();
    for type_ in [
        "Ready",
        "StreamReady",
        "ConsumerReady",
        "TableReady",
        "WorkersReady",
    ] {
        assert_eq!(
            state(&body, type_),
            ("False", "Conflict"),
            "{type_}: {body}"
        );
    }
    let message = condition(&body, "Ready")["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("signals/older"), "{message}");
    assert!(message.contains(&format!("{DATABASE}.older")), "{message}");
    respond_with_status(status_apply, &newer);

    let action = finish(task, &mut api)
        .await
        .expect("a conflict is not an error");
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    let event = api
        .events
        .iter()
        .find(|e| e.reason == "Conflict")
        .expect("a Conflict event");
    assert_eq!(event.type_, "Warning");

    // The older pipeline is not in conflict with the newer one.
    let (task, mut api) = start_reconcile(&older, index_of(&[&older, &newer]));
    let read = api.next_call().await;
    read.expect(Method::GET, &deployment_path("older"));
    read.respond_not_found();
    let status_apply = api.next_call().await;
    status_apply.expect_apply(&format!("{}/status", pipeline_path("older")));
    assert_ne!(state(&status_apply.body, "Ready").1, "Conflict");
    respond_with_status(status_apply, &older);
    let result = finish(task, &mut api).await;
    assert!(
        matches!(result, Err(ReconcileError::DataPlaneNotReady { .. })),
        "{result:?}"
    );
}

#[tokio::test]
async fn an_unreachable_nats_is_reported_in_the_conditions_and_returned_as_an_error() {
    let servers = servers();
    let offline = with_finalizer(pipeline(
        "offline",
        &unreachable_url("nats"),
        &servers.clickhouse.http_url(),
        1_700_000_000,
    ));
    let (task, mut api) = start_reconcile(&offline, index_of(&[&offline]));

    let read = api.next_call().await;
    read.expect(Method::GET, &deployment_path("offline"));
    read.respond_not_found();
    // No ConfigMap or Deployment: workers start once the stream and consumer exist.
    let status_apply = api.next_call().await;
    status_apply.expect_apply(&format!("{}/status", pipeline_path("offline")));
    let body = status_apply.body.clone();
    assert_eq!(
        state(&body, "StreamReady"),
        ("False", "Unreachable"),
        "{body}"
    );
    assert_eq!(state(&body, "ConsumerReady").0, "False", "{body}");
    assert_eq!(
        state(&body, "TableReady").0,
        "True",
        "ClickHouse is up: {body}"
    );
    assert_eq!(
        state(&body, "WorkersReady"),
        ("False", "WaitingForDataPlane")
    );
    assert_eq!(state(&body, "Ready"), ("False", "Unreachable"), "{body}");
    respond_with_status(status_apply, &offline);

    let error = finish(task, &mut api)
        .await
        .expect_err("an unreachable NATS fails the reconcile");
    match &error {
        ReconcileError::DataPlaneNotReady { what, reason, .. } => {
            assert_eq!((*what, reason.as_str()), ("stream", "Unreachable"));
        }
        other => panic!("unexpected error: {other}"),
    }
    assert_eq!(error.metric_reason(), "Unreachable");
    let warning = api
        .events
        .iter()
        .find(|e| e.reason == "Unreachable")
        .expect("a warning event");
    assert_eq!(warning.type_, "Warning");
}

#[tokio::test]
async fn while_nats_is_unreachable_a_running_deployment_follows_replicas_and_image_but_keeps_its_manifest()
 {
    let servers = servers();
    let mut outage = with_finalizer(pipeline(
        "outage",
        &unreachable_url("nats"),
        &servers.clickhouse.http_url(),
        1_700_000_000,
    ));
    outage.spec.workers.replicas = 3;
    outage.spec.workers.image = Some("signal-worker:next".to_string());
    let (task, mut api) = start_reconcile(&outage, index_of(&[&outage]));

    // Applied when the data plane was last good: one replica of the old image, the old manifest.
    let read = api.next_call().await;
    read.expect(Method::GET, &deployment_path("outage"));
    let running = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "outage-worker", "namespace": NAMESPACE, "generation": 1},
        "spec": {"replicas": 1, "selector": {}, "template": {
            "metadata": {"annotations": {CONFIG_HASH_ANNOTATION: "manifest-of-last-good-state"}},
            "spec": {"containers": [{"name": "signal-worker", "image": WORKER_IMAGE}]},
        }},
        "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1},
    });
    read.respond_ok(&running);

    // No ConfigMap: the manifest waits for the stream and consumer it describes.
    let deployment_apply = api.next_call().await;
    deployment_apply.expect_apply(&deployment_path("outage"));
    let deployment: Deployment =
        serde_json::from_value(deployment_apply.body.clone()).expect("a Deployment body");
    let spec = deployment.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(3));
    let template = &spec.template;
    assert_eq!(
        template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(CONFIG_HASH_ANNOTATION))
            .map(String::as_str),
        Some("manifest-of-last-good-state")
    );
    assert_eq!(
        template.spec.as_ref().expect("pod spec").containers[0]
            .image
            .as_deref(),
        Some("signal-worker:next")
    );
    let mut stored = deployment_apply.body.clone();
    stored["metadata"]["generation"] = json!(2);
    stored["status"] = running["status"].clone();
    deployment_apply.respond_ok(&stored);

    let status_apply = api.next_call().await;
    status_apply.expect_apply(&format!("{}/status", pipeline_path("outage")));
    let body = status_apply.body.clone();
    assert_eq!(
        state(&body, "StreamReady"),
        ("False", "Unreachable"),
        "{body}"
    );
    let stream_message = condition(&body, "StreamReady")["message"]
        .as_str()
        .unwrap_or_default();
    assert!(stream_message.contains("NATS"), "{stream_message}");
    assert_eq!(state(&body, "WorkersReady"), ("False", "Progressing"));
    let workers_message = condition(&body, "WorkersReady")["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        workers_message.contains("the changed manifest waits"),
        "{workers_message}"
    );
    respond_with_status(status_apply, &outage);

    let error = finish(task, &mut api)
        .await
        .expect_err("the data plane is still not ready, so the reconcile retries");
    assert!(
        matches!(
            error,
            ReconcileError::DataPlaneNotReady { what: "stream", .. }
        ),
        "{error}"
    );
    assert!(api.published("WorkersApplied"), "{:?}", api.events);
}

#[tokio::test]
async fn a_missing_secret_is_reported_in_the_conditions_and_returned_as_an_error() {
    let mut locked = with_finalizer(pipeline(
        "locked",
        &unreachable_url("nats"),
        &unreachable_url("http"),
        1_700_000_000,
    ));
    locked.spec.clickhouse.auth = Some(signal_model::AuthSpec {
        secret_ref: signal_model::SecretRef {
            name: "clickhouse-auth".to_string(),
        },
    });
    let (task, mut api) = start_reconcile(&locked, index_of(&[&locked]));

    let read = api.next_call().await;
    read.expect(
        Method::GET,
        &format!("/api/v1/namespaces/{NAMESPACE}/secrets/clickhouse-auth"),
    );
    read.respond_not_found();
    let status_apply = api.next_call().await;
    status_apply.expect_apply(&format!("{}/status", pipeline_path("locked")));
    assert_eq!(
        state(&status_apply.body, "Ready"),
        ("False", "SecretMissing")
    );
    respond_with_status(status_apply, &locked);

    let error = finish(task, &mut api)
        .await
        .expect_err("a missing Secret fails the reconcile");
    assert!(matches!(error, ReconcileError::Secret(_)), "{error}");
    assert_eq!(error.metric_reason(), "SecretMissing");
}

#[tokio::test]
async fn an_invalid_spec_is_reported_in_the_conditions_and_touches_nothing() {
    let mut typo = with_finalizer(pipeline(
        "typo",
        &unreachable_url("nats"),
        &unreachable_url("http"),
        1_700_000_000,
    ));
    typo.spec.clickhouse.columns[1].type_name = "Strng".to_string();
    let (task, mut api) = start_reconcile(&typo, index_of(&[&typo]));

    let status_apply = api.next_call().await;
    status_apply.expect_apply(&format!("{}/status", pipeline_path("typo")));
    assert_eq!(state(&status_apply.body, "Ready"), ("False", "InvalidSpec"));
    let message = condition(&status_apply.body, "Ready")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("Strng"), "{message}");
    respond_with_status(status_apply, &typo);

    let error = finish(task, &mut api)
        .await
        .expect_err("an invalid spec fails the reconcile");
    assert!(matches!(error, ReconcileError::InvalidSpec(_)), "{error}");
    assert!(api.published("InvalidSpec"), "{:?}", api.events);
}

/// A pipeline with `deletionPolicy: Delete` whose NATS is down, marked for deletion
/// `deleted_seconds_ago`.
fn undeletable(name: &str, deleted_seconds_ago: i64) -> SignalPipeline {
    let mut stuck = with_finalizer(pipeline(
        name,
        &unreachable_url("nats"),
        &unreachable_url("http"),
        1_700_000_000,
    ));
    stuck.spec.deletion_policy = signal_model::DeletionPolicy::Delete;
    let deleted_at = Timestamp::now().as_second() - deleted_seconds_ago;
    stuck.metadata.deletion_timestamp = Some(Time(
        Timestamp::from_second(deleted_at).expect("a valid timestamp"),
    ));
    stuck
}

#[tokio::test]
async fn a_failing_cleanup_keeps_the_finalizer_and_retries_within_the_timeout() {
    let stuck = undeletable("stuck", 0);
    let (task, mut api) = start_reconcile(&stuck, index_of(&[&stuck]));

    // Only events: the finalizer stays while the data plane may still exist.
    let error = finish(task, &mut api)
        .await
        .expect_err("a failed cleanup is retried");
    assert!(matches!(error, ReconcileError::Cleanup { .. }), "{error}");
    let retry = error.retry_cap().expect("a cleanup retry has a cap");
    assert!(retry <= Duration::from_secs(30), "{retry:?}");
    assert!(api.published("CleanupFailed"), "{:?}", api.events);
}

#[tokio::test]
async fn a_cleanup_failing_past_the_timeout_is_abandoned_and_the_finalizer_released() {
    // Settings::new gives up after 300 s; this deletion started ten minutes ago.
    let abandoned = undeletable("abandoned", 600);
    let (task, mut api) = start_reconcile(&abandoned, index_of(&[&abandoned]));

    expect_finalizer_removed(api.next_call().await, &abandoned);
    let action = finish(task, &mut api)
        .await
        .expect("an abandoned cleanup is no error");
    assert_eq!(action, Action::await_change());
    let event = api
        .events
        .iter()
        .find(|e| e.reason == "CleanupAbandoned")
        .expect("a CleanupAbandoned event");
    assert_eq!(event.type_, "Warning");
    assert!(event.note.contains("remove them by hand"), "{}", event.note);
}
