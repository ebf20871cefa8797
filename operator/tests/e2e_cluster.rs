//! End to end against a real Kubernetes control plane (testkit's `KubeCluster`: etcd,
//! kube-apiserver, kube-controller-manager), real nats-server and clickhouse-server, and the
//! operator binary running out of cluster.
//!
//! One pipeline goes through its life: applied → its finalizer, stream, consumer and table, its
//! worker Deployment and ConfigMap (owned by the pipeline), events, `kubectl get sigp`'s printer
//! columns, `Ready` once its pods are (a stand-in kubelet marks them, as no node runs); scaled
//! through the scale subresource (`kubectl scale` and an HPA use it) and by editing
//! `spec.workers.replicas`, the Deployment following each time; a column added, which the
//! `TableReady` condition reports for the new generation; a change of `stream.name` refused by the
//! CRD's CEL rule; deleted with `deletionPolicy: Delete`: the finalizer removes the stream and the
//! table, and kube-controller-manager's garbage collector the Deployment and ConfigMap.
//!
//! Worker pods that really run are the subject of `cluster_node.rs` (the testkit's node, in the
//! suite). The same lifecycle on someone's own cluster with nodes and the worker image is
//! `signals_flow_through_worker_pods_on_a_real_cluster`, ignored here because it needs that
//! cluster: run it on the one `scripts/kind-e2e.sh --keep` leaves (servers from `deploy/dev` in
//! namespace `signals`):
//!
//! ```text
//! SIGNAL_E2E_NATS_URL=nats://nats.signals.svc:4222 \
//! SIGNAL_E2E_CLICKHOUSE_URL=http://clickhouse.signals.svc:8123 \
//! SIGNAL_E2E_NAMESPACE=signals SIGNAL_E2E_CLICKHOUSE_SECRET=clickhouse-auth \
//! cargo test -p signal-operator --test e2e_cluster -- --ignored
//! ```

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/dataplane.rs"]
mod dataplane;

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use signal_model::{DeletionPolicy, SignalPipeline, SignalPipelineSpec};

use cluster::{
    FOLLOW_TIMEOUT, Operator, OperatorOptions, REQUEST_TIMEOUT, StandInKubelet, apply_pipeline,
    call, condition, describe_conditions, eventually, pipeline_object, wait_condition,
    wait_deployment_replicas, wait_gone,
};

/// What the lifecycle runs against.
struct Target {
    namespace: String,
    spec: SignalPipelineSpec,
    /// Check the stream and table on the servers themselves (reachable from the test), and use
    /// `kubectl` with the test control plane's kubeconfig.
    check_servers: bool,
    ready_timeout: Duration,
}

async fn lifecycle(client: &Client, target: &Target, name: &str) -> Result<()> {
    let namespace = target.namespace.as_str();
    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let worker = format!("{name}-worker");
    let stream = target.spec.stream.name.clone();
    let (database, table) = (
        target.spec.clickhouse.database.clone(),
        target.spec.clickhouse.table.clone(),
    );

    apply_pipeline(&pipelines, &pipeline_object(namespace, name, &target.spec)).await?;
    eventually(
        "the operator adding its finalizer (is the operator running?)",
        FOLLOW_TIMEOUT,
        || async {
            let pipeline = call("reading the pipeline", pipelines.get(name)).await?;
            let finalizers = pipeline.metadata.finalizers.clone().unwrap_or_default();
            Ok(if finalizers.iter().any(|f| f == "signals.dev/cleanup") {
                Ok(())
            } else {
                Err(format!("finalizers {finalizers:?}"))
            })
        },
    )
    .await?;
    let ready = wait_condition(&pipelines, name, "Ready", target.ready_timeout).await?;
    let status = ready
        .status
        .as_ref()
        .context("a Ready pipeline has a status")?;
    let qualified = format!("{database}.{table}");
    ensure!(
        status.table.as_deref() == Some(qualified.as_str()),
        "status.table is {:?}, expected {qualified}",
        status.table
    );
    if target.check_servers {
        let js = dataplane::jetstream_at(&dataplane::nats().url()).await;
        ensure!(
            dataplane::live_stream(&js, &stream).await.is_some(),
            "stream {stream} exists on nats-server"
        );
        ensure!(
            dataplane::table_exists(&database, &table),
            "table {qualified} exists on clickhouse-server"
        );
    }

    let deployment = call("reading the worker Deployment", deployments.get(&worker)).await?;
    let replicas = deployment.spec.as_ref().and_then(|s| s.replicas);
    ensure!(
        replicas == Some(1),
        "the Deployment has {replicas:?} replicas, the spec 1"
    );
    let owner = deployment
        .metadata
        .owner_references
        .as_ref()
        .and_then(|owners| owners.first())
        .context("the Deployment has an owner")?;
    ensure!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller)
            == ("SignalPipeline", name, Some(true)),
        "the Deployment is owned by {} {} (controller {:?})",
        owner.kind,
        owner.name,
        owner.controller
    );
    let configmap = call(
        "reading the pipeline ConfigMap",
        configmaps.get(&format!("{name}-pipeline")),
    )
    .await?;
    let manifest = configmap
        .data
        .as_ref()
        .and_then(|data| data.get("pipeline.yaml"))
        .context("the ConfigMap holds pipeline.yaml")?;
    ensure!(
        manifest.contains(&stream),
        "the manifest does not name the stream: {manifest}"
    );

    // Events the operator recorded on the pipeline (events.k8s.io, `kubectl events`).
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let recorded = call("listing events", events.list(&ListParams::default())).await?;
    let reasons: Vec<String> = recorded
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason.clone())
        .collect();
    ensure!(
        reasons.iter().any(|r| r == "WorkersApplied"),
        "no WorkersApplied event on the pipeline; reasons: {reasons:?}"
    );

    if target.check_servers {
        // The printer columns, as `kubectl get sigp` shows them.
        let listed = cluster::kubectl(&["get", "sigp", name, "--namespace", namespace])?;
        let mut lines = listed.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        // Every column the CRD declares, in its order, after the name.
        let declared = cluster::crd_manifest()?["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .context("the CRD declares printer columns")?
            .iter()
            .filter_map(|column| column["name"].as_str().map(str::to_uppercase))
            .collect::<Vec<_>>();
        ensure!(
            header.get(1..).unwrap_or_default()
                == declared.iter().map(String::as_str).collect::<Vec<_>>(),
            "kubectl get sigp columns {header:?}, the CRD declares {declared:?}: {listed}"
        );
        let row: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let column = |title: &str| {
            header
                .iter()
                .position(|h| *h == title)
                .and_then(|index| row.get(index).copied())
        };
        let expected = [
            ("NAME", name),
            ("STREAM", stream.as_str()),
            ("TABLE", qualified.as_str()),
            ("REPLICAS", "1"),
            ("LAG", "0"),
            ("READY", "True"),
        ];
        for (title, value) in expected {
            ensure!(
                column(title) == Some(value),
                "kubectl get sigp: {title} is {:?}, expected {value}: {listed}",
                column(title)
            );
        }
    }

    // `kubectl scale sigp NAME --replicas 2` goes through the scale subresource.
    call(
        "scaling through the scale subresource",
        pipelines.patch_scale(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        ),
    )
    .await?;
    wait_deployment_replicas(&deployments, &worker, 2, FOLLOW_TIMEOUT).await?;
    let scale = call("reading the scale subresource", pipelines.get_scale(name)).await?;
    let scale_replicas = scale.spec.and_then(|s| s.replicas);
    ensure!(
        scale_replicas == Some(2),
        "the scale subresource says {scale_replicas:?}"
    );
    let selector = scale.status.and_then(|s| s.selector).unwrap_or_default();
    ensure!(
        selector.contains(&format!("app.kubernetes.io/instance={name}")),
        "the scale subresource's selector `{selector}` does not select the workers"
    );

    if target.check_servers {
        cluster::kubectl(&[
            "scale",
            "sigp",
            name,
            "--replicas=4",
            "--namespace",
            namespace,
        ])?;
        wait_deployment_replicas(&deployments, &worker, 4, FOLLOW_TIMEOUT).await?;
    }

    call(
        "editing spec.workers.replicas",
        pipelines.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"workers": {"replicas": 3}}})),
        ),
    )
    .await?;
    wait_deployment_replicas(&deployments, &worker, 3, FOLLOW_TIMEOUT).await?;

    // A merge patch replaces the whole list: send every column plus the new one.
    let current = call("reading the pipeline", pipelines.get(name)).await?;
    let mut columns = serde_json::to_value(&current.spec.clickhouse.columns)?;
    columns
        .as_array_mut()
        .context("columns are a list")?
        .push(json!({"name": "note", "type": "String", "from": "$.note", "default": ""}));
    let edited = call(
        "adding a column",
        pipelines.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"clickhouse": {"columns": columns}}})),
        ),
    )
    .await?;
    let generation = edited.metadata.generation;
    eventually(
        "TableReady for the new generation",
        FOLLOW_TIMEOUT,
        || async {
            let pipeline = call("reading the pipeline", pipelines.get(name)).await?;
            let table = condition(&pipeline, "TableReady");
            Ok(match table {
                Some(c) if c.observed_generation == generation && c.status == "True" => {
                    if condition(&pipeline, "SchemaDrift").is_some() {
                        Err(format!(
                            "schema drift after adding a column: {}",
                            describe_conditions(&pipeline)
                        ))
                    } else {
                        Ok(())
                    }
                }
                _ => Err(describe_conditions(&pipeline)),
            })
        },
    )
    .await?;
    if target.check_servers {
        let columns = dataplane::live_columns(&database, &table);
        ensure!(
            columns.iter().any(|(column, _)| column == "note"),
            "the table has the new column: {columns:?}"
        );
    }

    // The CRD's CEL rule refuses a new stream name; the API server answers 422.
    let refused = tokio::time::timeout(
        REQUEST_TIMEOUT,
        pipelines.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"stream": {"name": "RENAMED"}}})),
        ),
    )
    .await
    .map_err(|_| anyhow!("renaming the stream: no answer within {REQUEST_TIMEOUT:?}"))?;
    match refused {
        Err(kube::Error::Api(status)) if status.message.contains("cannot be changed") => {}
        other => bail!("renaming the stream should be refused by the CEL rule, got {other:?}"),
    }

    call(
        "deleting the pipeline",
        pipelines.delete(name, &DeleteParams::default()),
    )
    .await?;
    wait_gone(&pipelines, name, FOLLOW_TIMEOUT).await?;
    // kube-controller-manager's garbage collector follows the owner references.
    eventually(
        "the worker Deployment and ConfigMap being garbage collected",
        FOLLOW_TIMEOUT,
        || async {
            let deployment = call(
                "reading the worker Deployment",
                deployments.get_opt(&worker),
            )
            .await?;
            let configmap = call(
                "reading the pipeline ConfigMap",
                configmaps.get_opt(&format!("{name}-pipeline")),
            )
            .await?;
            Ok(match (deployment, configmap) {
                (None, None) => Ok(()),
                (deployment, configmap) => Err(format!(
                    "Deployment there: {}, ConfigMap there: {}",
                    deployment.is_some(),
                    configmap.is_some()
                )),
            })
        },
    )
    .await?;
    if target.check_servers {
        let js = dataplane::jetstream_at(&dataplane::nats().url()).await;
        ensure!(
            dataplane::live_stream(&js, &stream).await.is_none(),
            "deletionPolicy Delete removes stream {stream}"
        );
        ensure!(
            !dataplane::table_exists(&database, &table),
            "deletionPolicy Delete removes table {qualified}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_pipeline_lives_through_apply_scale_edit_and_delete() {
    let client = cluster::admin_client().await.unwrap();
    let namespace = cluster::namespace("e2e");
    let operator = Operator::start(OperatorOptions {
        namespaces: vec![namespace.clone()],
        ..OperatorOptions::default()
    })
    .unwrap();
    let _kubelet = StandInKubelet::start(client.clone(), &namespace);
    let mut spec = dataplane::shared_pipeline_spec(&dataplane::unique("e2e"));
    spec.deletion_policy = DeletionPolicy::Delete;
    let target = Target {
        namespace,
        spec,
        check_servers: true,
        ready_timeout: FOLLOW_TIMEOUT,
    };
    if let Err(error) = lifecycle(&client, &target, "lifecycle").await {
        panic!("{error:#}\noperator log:\n{}", operator.log_text());
    }
}

/// The same life on a real cluster whose nodes run the worker image (see the top of this file).
#[tokio::test]
#[ignore = "runs against your own cluster (KUBECONFIG, SIGNAL_E2E_NATS_URL, SIGNAL_E2E_CLICKHOUSE_URL); the suite's node is cluster_node.rs"]
async fn signals_flow_through_worker_pods_on_a_real_cluster() {
    let required = |name: &str| {
        std::env::var(name)
            .ok()
            .filter(|value| !value.is_empty())
            .unwrap_or_else(|| {
                panic!("{name} is not set (see the top of operator/tests/e2e_cluster.rs)")
            })
    };
    let (nats_url, clickhouse_url) = (
        required("SIGNAL_E2E_NATS_URL"),
        required("SIGNAL_E2E_CLICKHOUSE_URL"),
    );
    let namespace =
        std::env::var("SIGNAL_E2E_NAMESPACE").unwrap_or_else(|_| "signal-e2e".to_string());
    let client = Client::try_default()
        .await
        .expect("a Kubernetes client from KUBECONFIG");
    let label = format!(
        "e2e_{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or_default()
    );
    let mut spec = dataplane::pipeline_spec(&label, &nats_url, &clickhouse_url);
    spec.deletion_policy = DeletionPolicy::Delete;
    if let Ok(secret) = std::env::var("SIGNAL_E2E_CLICKHOUSE_SECRET") {
        spec.clickhouse.auth = Some(signal_model::AuthSpec {
            secret_ref: signal_model::SecretRef { name: secret },
        });
    }
    let target = Target {
        namespace,
        spec,
        check_servers: false,
        // Pulling the worker image on a fresh cluster.
        ready_timeout: Duration::from_secs(300),
    };
    let name = label.replace('_', "-");
    if let Err(error) = lifecycle(&client, &target, &name).await {
        panic!("{name}: {error:#}");
    }
}
