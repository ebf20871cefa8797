//! The operator itself as pods on the testkit's node, installed from the chart: two replicas with
//! leader election, the leader's pod killed mid-reconcile, the standby taking over.
//!
//! The pods reach the API server the way `KubeNode::api_server_for_pods` says: the chart's
//! `hostAliases` maps `kubernetes.default.svc` (a name the serving certificate carries) to the
//! node's address, and `extraEnv` sets `KUBERNETES_SERVICE_HOST`/`_PORT` to it, since no
//! kube-proxy runs. Everything else is the users' path: `helm install` with the operator and
//! worker images packed from the test profile's binaries, the chart's ServiceAccount and RBAC, a
//! pipeline applied with `kubectl`, worker pods ingesting.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/dataplane.rs"]
mod dataplane;
#[path = "support/node.rs"]
mod node;
#[path = "support/worker_binary.rs"]
mod worker_binary;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::DeleteParams;
use kube::{Api, Client};
use serde_json::json;
use signal_model::SignalPipeline;
use signal_testkit::{ClickHouseServer, KubeNode, NatsServer, RedisServer};

use cluster::{apply_pipeline, call, eventually, pipeline_object, wait_condition, wait_gone};
use node::{
    POD_TIMEOUT, Servers, WORKER_IMAGE, import_binary_image, import_worker_image, patch_spec,
    publish, ready_pods, spec_for, valid_in, wait_pods, wait_rows,
};

const OPERATOR_IMAGE_REPOSITORY: &str = "docker.io/library/signal-operator";
const OPERATOR_IMAGE_TAG: &str = "node-test";
/// The Lease the chart's operators share (leader_election.rs).
const LEASE_NAME: &str = "signal-operator-leader";

async fn lease_holder(leases: &Api<Lease>) -> Result<Option<String>> {
    let lease = call("reading the Lease", leases.get_opt(LEASE_NAME)).await?;
    Ok(lease
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_two_operator_pods_and_the_standby_takes_over_a_killed_leader() {
    let node = KubeNode::start(cluster::cluster()).expect("the node starts");
    let servers = Servers {
        nats: NatsServer::start_on(node.address()).unwrap(),
        clickhouse: ClickHouseServer::start_on(node.address()).unwrap(),
        redis: RedisServer::start_on(node.address()).unwrap(),
    };
    import_worker_image(&node).unwrap();
    import_binary_image(
        &node,
        Path::new(cluster::OPERATOR),
        &format!("{OPERATOR_IMAGE_REPOSITORY}:{OPERATOR_IMAGE_TAG}"),
    )
    .unwrap();
    let client = cluster::admin_client().await.unwrap();
    cluster::install_crd(&client).await.unwrap();
    let release_namespace = cluster::namespace("operator-pods");
    let watched = cluster::namespace("operator-pods-watched");
    let release = format!("sig{}", &release_namespace[release_namespace.len() - 8..]);
    let api_server = node.api_server_for_pods();
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/signal-operator");
    let (worker_repository, worker_tag) = WORKER_IMAGE.rsplit_once(':').unwrap();
    let installed = cluster::helm(&[
        "install",
        &release,
        chart,
        "--namespace",
        &release_namespace,
        "--skip-crds",
        "--set",
        &format!("watchNamespaces[0]={watched}"),
        "--set",
        &format!("image.repository={OPERATOR_IMAGE_REPOSITORY}"),
        "--set",
        &format!("image.tag={OPERATOR_IMAGE_TAG}"),
        "--set",
        "image.pullPolicy=Never",
        "--set",
        &format!("workerImage.repository={worker_repository}"),
        "--set",
        &format!("workerImage.tag={worker_tag}"),
        "--set",
        "logFormat=json",
        "--set",
        &format!("hostAliases[0].ip={}", api_server.ip()),
        "--set",
        "hostAliases[0].hostnames[0]=kubernetes.default.svc",
        "--set",
        "extraEnv[0].name=KUBERNETES_SERVICE_HOST",
        "--set",
        "extraEnv[0].value=kubernetes.default.svc",
        "--set",
        "extraEnv[1].name=KUBERNETES_SERVICE_PORT",
        "--set-string",
        &format!("extraEnv[1].value={}", api_server.port()),
    ])
    .unwrap();
    assert!(installed.contains("STATUS: deployed"), "{installed}");

    let result = scenario(&client, &release, &release_namespace, &watched, &servers).await;
    if let Err(error) = result {
        let logs = cluster::kubectl(&[
            "-n",
            &release_namespace,
            "logs",
            "--tail=30",
            "--prefix",
            "-l",
            &format!("app.kubernetes.io/instance={release}"),
        ])
        .unwrap_or_else(|e| format!("(no logs: {e:#})"));
        panic!("{error:#}\noperator pods' logs:\n{logs}");
    }
    cluster::helm(&["uninstall", &release, "--namespace", &release_namespace]).unwrap();
}

async fn scenario(
    client: &Client,
    release: &str,
    release_namespace: &str,
    namespace: &str,
    servers: &Servers,
) -> Result<()> {
    let operator_pods: Api<Pod> = Api::namespaced(client.clone(), release_namespace);
    let leases: Api<Lease> = Api::namespaced(client.clone(), release_namespace);
    let started = Instant::now();
    let ready = eventually("two Ready operator pods", POD_TIMEOUT, || async {
        let ready = ready_pods(&operator_pods, release).await?;
        Ok(if ready.len() == 2 {
            Ok(ready)
        } else {
            Err(format!("ready: {ready:?}"))
        })
    })
    .await?;
    let leader = eventually("a leader", POD_TIMEOUT, || async {
        Ok(match lease_holder(&leases).await? {
            Some(holder) if ready.contains(&holder) => Ok(holder),
            other => Err(format!("holder {other:?}")),
        })
    })
    .await?;
    eprintln!(
        "helm install: 2 operator pods Ready, {leader} leading, {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // A pipeline reconciled by the in-cluster leader, its workers ingesting.
    let name = "in-cluster";
    let spec = spec_for(&dataplane::unique("incluster"), servers);
    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let applied = Instant::now();
    apply_pipeline(&pipelines, &pipeline_object(namespace, name, &spec)).await?;
    wait_condition(&pipelines, name, "Ready", POD_TIMEOUT).await?;
    wait_pods(&pods, name, 2).await?;
    eprintln!(
        "pipeline Ready with 2 worker pods {:.1} s after apply, reconciled by the operator pod",
        applied.elapsed().as_secs_f64()
    );
    let js = dataplane::jetstream_at(&servers.nats.url()).await;
    let subject = format!(
        "{}.signals.test",
        spec.stream.subjects[0].trim_end_matches(".>")
    );
    publish(&js, &subject, 1, 10_000).await?;
    wait_rows(servers, &spec, valid_in(1, 10_000), Instant::now()).await?;

    // Mid-reconcile: a spec change, and the leader's pod force-deleted at once.
    patch_spec(&pipelines, name, json!({"workers": {"replicas": 3}})).await?;
    let killed = Instant::now();
    call(
        "force-deleting the leader's pod",
        operator_pods.delete(
            &leader,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        ),
    )
    .await?;
    let new_leader = eventually("another leader", Duration::from_secs(90), || async {
        Ok(match lease_holder(&leases).await? {
            Some(holder) if holder != leader => Ok(holder),
            other => Err(format!("holder {other:?}")),
        })
    })
    .await?;
    let took_over = killed.elapsed();
    wait_pods(&pods, name, 3).await?;
    eprintln!(
        "leader {leader} force-deleted mid-reconcile: {new_leader} took the Lease after {:.1} s; the 3 worker pods ran after {:.1} s",
        took_over.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
    eventually(
        "the status to show 3 replicas",
        Duration::from_secs(60),
        || async {
            let pipeline = call("reading the pipeline", pipelines.get(name)).await?;
            let replicas = pipeline.status.as_ref().map(|s| s.replicas);
            Ok(if replicas == Some(3) {
                Ok(())
            } else {
                Err(format!("status.replicas {replicas:?}"))
            })
        },
    )
    .await?;

    // Deletion through the new leader.
    call(
        "deleting the pipeline",
        pipelines.delete(name, &DeleteParams::default()),
    )
    .await?;
    wait_gone(&pipelines, name, Duration::from_secs(90)).await?;
    ensure!(
        dataplane::live_stream(&js, &spec.stream.name)
            .await
            .is_none(),
        "the stream is left"
    );
    Ok(())
}
