//! A pipeline's objects in a real kube-apiserver and kube-controller-manager, with real
//! nats-server and clickhouse-server and the operator binary out of cluster:
//!
//! - server-side-apply field ownership on the worker Deployment: a field another manager sets
//!   survives the operator's reconciles; a field the operator owns, changed by someone else, is
//!   put back;
//! - `deletionPolicy: Retain`: the stream and table stay, the garbage collector removes the
//!   Deployment and ConfigMap;
//! - deleting while NATS and ClickHouse are gone: a `Retain` pipeline goes at once; a `Delete`
//!   one keeps its finalizer, saying why in `CleanupFailed` events, and completes once the
//!   servers are back; when they never come back, it gives up once the operator's cleanup
//!   timeout (`--cleanup-timeout`, 30 s here) has passed, with a `CleanupAbandoned` event.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/dataplane.rs"]
mod dataplane;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use signal_model::{DeletionPolicy, SignalPipeline, SignalPipelineSpec};
use signal_testkit::{ClickHouseServer, NatsServer};

use cluster::{
    FOLLOW_TIMEOUT, Operator, OperatorOptions, apply_pipeline, call, eventually, pipeline_object,
    wait_condition, wait_gone,
};

const OTHER_MANAGER: &str = "someone-else";

async fn worker_deployment(deployments: &Api<Deployment>, name: &str) -> Deployment {
    eventually("the worker Deployment", FOLLOW_TIMEOUT, || async {
        Ok(match call("reading", deployments.get_opt(name)).await? {
            Some(deployment) => Ok(deployment),
            None => Err("not yet".to_string()),
        })
    })
    .await
    .unwrap()
}

/// The names of the managers of `deployment`'s fields.
fn managers(deployment: &Deployment) -> Vec<String> {
    deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|entry| entry.manager.clone())
        .collect()
}

#[tokio::test]
async fn server_side_apply_keeps_foreign_fields_and_restores_owned_ones() {
    let client = cluster::admin_client().await.unwrap();
    let namespace = cluster::namespace("ssa");
    let operator = Operator::start(OperatorOptions {
        namespaces: vec![namespace.clone()],
        ..OperatorOptions::default()
    })
    .unwrap();
    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), &namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let spec = dataplane::shared_pipeline_spec(&dataplane::unique("ssa"));
    apply_pipeline(&pipelines, &pipeline_object(&namespace, "owned", &spec))
        .await
        .unwrap();
    let deployment = worker_deployment(&deployments, "owned-worker").await;
    let operator_managers = managers(&deployment);
    assert!(
        !operator_managers.is_empty(),
        "the operator applied with a field manager"
    );
    let image = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone();

    // Another manager adds an annotation the operator does not set.
    let foreign = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "owned-worker", "annotations": {"example.com/team": "payments"}},
    });
    call(
        "applying a foreign annotation",
        deployments.patch(
            "owned-worker",
            &PatchParams::apply(OTHER_MANAGER),
            &Patch::Apply(&foreign),
        ),
    )
    .await
    .unwrap();
    // ...and overwrites fields the operator owns (an update, which takes them over).
    let intrusion = json!({"spec": {"replicas": 7, "template": {"spec": {"containers": [
        {"name": deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].name, "image": "example.com/not-the-worker:1"}
    ]}}}});
    call(
        "overwriting owned fields",
        deployments.patch(
            "owned-worker",
            &PatchParams {
                field_manager: Some("intruder".to_string()),
                ..PatchParams::default()
            },
            &Patch::Strategic(&intrusion),
        ),
    )
    .await
    .unwrap();

    // The change of an owned object triggers a reconcile, which re-applies what the operator owns.
    let restored = eventually(
        "the operator restoring its fields",
        FOLLOW_TIMEOUT,
        || async {
            let current = call("reading", deployments.get("owned-worker")).await?;
            let spec = current.spec.as_ref().unwrap();
            let current_image = spec.template.spec.as_ref().unwrap().containers[0]
                .image
                .clone();
            Ok(if spec.replicas == Some(1) && current_image == image {
                Ok(current)
            } else {
                Err(format!(
                    "replicas {:?}, image {current_image:?}",
                    spec.replicas
                ))
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));
    let annotations = restored.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations.get("example.com/team").map(String::as_str),
        Some("payments"),
        "the foreign annotation survived: {annotations:?}"
    );
    assert!(managers(&restored).iter().any(|m| m == OTHER_MANAGER));

    // A later reconcile (an edit of the pipeline) keeps it too.
    call(
        "editing spec.workers.replicas",
        pipelines.patch(
            "owned",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"workers": {"replicas": 2}}})),
        ),
    )
    .await
    .unwrap();
    eventually(
        "the Deployment following the edit",
        FOLLOW_TIMEOUT,
        || async {
            let current = call("reading", deployments.get("owned-worker")).await?;
            let replicas = current.spec.as_ref().and_then(|s| s.replicas);
            let team = current
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("example.com/team").cloned());
            Ok(match (replicas, team.as_deref()) {
                (Some(2), Some("payments")) => Ok(()),
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await
    .unwrap();
}

async fn collected(client: &Client, namespace: &str, name: &str) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    eventually(
        "the garbage collector removing the Deployment and ConfigMap",
        FOLLOW_TIMEOUT,
        || async {
            let deployment =
                call("reading", deployments.get_opt(&format!("{name}-worker"))).await?;
            let configmap =
                call("reading", configmaps.get_opt(&format!("{name}-pipeline"))).await?;
            Ok(match (deployment, configmap) {
                (None, None) => Ok(()),
                (d, c) => Err(format!(
                    "Deployment {}, ConfigMap {}",
                    d.is_some(),
                    c.is_some()
                )),
            })
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn retain_keeps_the_stream_and_table_and_the_owned_objects_are_collected() {
    let client = cluster::admin_client().await.unwrap();
    let namespace = cluster::namespace("retain");
    let operator = Operator::start(OperatorOptions {
        namespaces: vec![namespace.clone()],
        ..OperatorOptions::default()
    })
    .unwrap();
    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), &namespace);
    let label = dataplane::unique("retain");
    let mut spec = dataplane::shared_pipeline_spec(&label);
    spec.deletion_policy = DeletionPolicy::Retain;
    apply_pipeline(&pipelines, &pipeline_object(&namespace, "kept", &spec))
        .await
        .unwrap();
    wait_condition(&pipelines, "kept", "TableReady", FOLLOW_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));
    worker_deployment(&Api::namespaced(client.clone(), &namespace), "kept-worker").await;

    call(
        "deleting",
        pipelines.delete("kept", &DeleteParams::default()),
    )
    .await
    .unwrap();
    wait_gone(&pipelines, "kept", FOLLOW_TIMEOUT).await.unwrap();
    collected(&client, &namespace, "kept").await;
    let js = dataplane::jetstream_at(&dataplane::nats().url()).await;
    assert!(
        dataplane::live_stream(&js, &spec.stream.name)
            .await
            .is_some()
    );
    assert!(dataplane::table_exists(
        &spec.clickhouse.database,
        &spec.clickhouse.table
    ));
}

fn spec_on(
    label: &str,
    nats: &NatsServer,
    clickhouse: &ClickHouseServer,
    policy: DeletionPolicy,
) -> SignalPipelineSpec {
    let mut spec = dataplane::pipeline_spec(label, &nats.url(), &clickhouse.http_url());
    spec.deletion_policy = policy;
    spec
}

#[tokio::test]
async fn deleting_while_nats_and_clickhouse_are_gone() {
    let client = cluster::admin_client().await.unwrap();
    let namespace = cluster::namespace("gone");
    let operator = Operator::start(OperatorOptions {
        namespaces: vec![namespace.clone()],
        ..OperatorOptions::default()
    })
    .unwrap();
    // Servers of this test alone, so stopping them disturbs no other test.
    let mut nats = NatsServer::start().unwrap();
    let mut clickhouse = ClickHouseServer::start().unwrap();
    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), &namespace);
    let retained = spec_on(
        &dataplane::unique("gone_r"),
        &nats,
        &clickhouse,
        DeletionPolicy::Retain,
    );
    let deleted = spec_on(
        &dataplane::unique("gone_d"),
        &nats,
        &clickhouse,
        DeletionPolicy::Delete,
    );
    for (name, spec) in [("retained", &retained), ("deleted", &deleted)] {
        apply_pipeline(&pipelines, &pipeline_object(&namespace, name, spec))
            .await
            .unwrap();
        wait_condition(&pipelines, name, "TableReady", FOLLOW_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));
    }

    nats.stop();
    clickhouse.stop();
    for name in ["retained", "deleted"] {
        call("deleting", pipelines.delete(name, &DeleteParams::default()))
            .await
            .unwrap();
    }
    // Retain touches no server: the finalizer completes without them.
    wait_gone(&pipelines, "retained", FOLLOW_TIMEOUT)
        .await
        .unwrap();
    // Delete cannot be honoured yet: the finalizer stays and the events say why.
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    eventually("a CleanupFailed event", FOLLOW_TIMEOUT, || async {
        let list = call("listing events", events.list(&ListParams::default())).await?;
        let failed = list.items.iter().find(|e| {
            e.reason.as_deref() == Some("CleanupFailed")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("deleted")
        });
        Ok(match failed {
            Some(event) => Ok(event.note.clone().unwrap_or_default()),
            None => Err(format!("{} events, none CleanupFailed", list.items.len())),
        })
    })
    .await
    .unwrap();
    let waiting = call("reading", pipelines.get("deleted")).await.unwrap();
    assert!(
        waiting
            .metadata
            .finalizers
            .unwrap_or_default()
            .iter()
            .any(|f| f == "signals.dev/cleanup"),
        "the finalizer holds the pipeline while the stream and table cannot be removed"
    );

    nats.restart().unwrap();
    clickhouse.restart().unwrap();
    // The next retry (exponential backoff from 5 s) removes them and lets the pipeline go.
    wait_gone(&pipelines, "deleted", FOLLOW_TIMEOUT * 2)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));
    let js = dataplane::jetstream_at(&nats.url()).await;
    assert!(
        dataplane::live_stream(&js, &deleted.stream.name)
            .await
            .is_none()
    );
    assert!(
        dataplane::live_stream(&js, &retained.stream.name)
            .await
            .is_some()
    );
    collected(&client, &namespace, "deleted").await;
    collected(&client, &namespace, "retained").await;
}

/// The operator's cleanup timeout in this test (`--cleanup-timeout`; 5 minutes by default): how
/// long a `Delete` finalizer retries before giving up.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_delete_finalizer_gives_up_once_the_cleanup_timeout_has_passed() {
    let client = cluster::admin_client().await.unwrap();
    let namespace = cluster::namespace("abandon");
    let operator = Operator::start(OperatorOptions {
        namespaces: vec![namespace.clone()],
        cleanup_timeout: Some(CLEANUP_TIMEOUT),
        ..OperatorOptions::default()
    })
    .unwrap();
    let mut nats = NatsServer::start().unwrap();
    let mut clickhouse = ClickHouseServer::start().unwrap();
    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), &namespace);
    let spec = spec_on(
        &dataplane::unique("abandon"),
        &nats,
        &clickhouse,
        DeletionPolicy::Delete,
    );
    apply_pipeline(&pipelines, &pipeline_object(&namespace, "stranded", &spec))
        .await
        .unwrap();
    wait_condition(&pipelines, "stranded", "TableReady", FOLLOW_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));

    // The servers go for good: nothing can ever remove the stream and the table.
    nats.kill();
    clickhouse.kill();
    let deleted = Instant::now();
    call(
        "deleting",
        pipelines.delete("stranded", &DeleteParams::default()),
    )
    .await
    .unwrap();
    // Retries back off (5 s doubling) but never past the timeout, so the pipeline goes within
    // it plus one retry's worth of slack.
    wait_gone(&pipelines, "stranded", CLEANUP_TIMEOUT + FOLLOW_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));
    let waited = deleted.elapsed();
    eprintln!("the Delete finalizer gave up {waited:?} after the deletion");
    assert!(
        waited >= CLEANUP_TIMEOUT - Duration::from_secs(5),
        "gave up after {waited:?}, before the cleanup timeout"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    let list = call("listing events", events.list(&ListParams::default()))
        .await
        .unwrap();
    let abandoned = list
        .items
        .iter()
        .find(|e| e.reason.as_deref() == Some("CleanupAbandoned"))
        .and_then(|e| e.note.clone())
        .expect("a CleanupAbandoned event says what is left");
    assert!(abandoned.contains("remove them by hand"), "{abandoned}");
}
