//! A server outage does not take the user's controls away, against a real kube-apiserver and
//! kube-controller-manager, real nats-server and clickhouse-server (frozen with SIGSTOP: the
//! kernel still accepts connections, nothing answers) and the operator binary out of cluster.
//!
//! With ClickHouse, then NATS, hung under a Ready pipeline: `kubectl scale sigp --replicas=3`
//! reaches the worker Deployment while the part that needs the server is `False` with a message
//! naming it; a new worker image rolls out; a manifest change (ClickHouse case) waits, the pods
//! keeping their config hash and the ConfigMap its data, until the server answers again; then
//! the pipeline is Ready on its own. A `Retain` pipeline is deleted while NATS hangs. The time
//! from `kubectl scale` to the Deployment's new replica count, and from the server's return to
//! `Ready`, are printed.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/dataplane.rs"]
mod dataplane;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;
use signal_model::SignalPipeline;
use signal_operator::workload::{CONFIG_HASH_ANNOTATION, MANIFEST_KEY};
use signal_testkit::{ClickHouseServer, NatsServer};

use cluster::{
    FOLLOW_TIMEOUT, Operator, OperatorOptions, StandInKubelet, apply_pipeline, call, condition,
    describe_conditions, eventually, pipeline_object, wait_condition, wait_gone,
};

/// The longest retry delay of a failing reconcile (the controller's backoff cap): once the server
/// is back, the pipeline becomes Ready at the latest on the next retry.
const BACKOFF_CAP: Duration = Duration::from_secs(300);
const NEW_IMAGE: &str = "registry.example/signal-worker:outage-test";

/// Which server the test freezes.
#[derive(Clone, Copy, Debug)]
enum Frozen {
    ClickHouse,
    Nats,
}

impl Frozen {
    /// The condition that must turn `False` while the server hangs, and the server's name its
    /// message must contain.
    fn part(self) -> (&'static str, &'static str) {
        match self {
            Frozen::ClickHouse => ("TableReady", "ClickHouse"),
            Frozen::Nats => ("StreamReady", "NATS"),
        }
    }
}

/// What a test reads of the worker Deployment.
#[derive(Debug, PartialEq)]
struct Workload {
    replicas: Option<i32>,
    image: Option<String>,
    config_hash: Option<String>,
}

async fn workload(deployments: &Api<Deployment>, name: &str) -> anyhow::Result<Option<Workload>> {
    let Some(deployment) = call("reading the Deployment", deployments.get_opt(name)).await? else {
        return Ok(None);
    };
    let spec = deployment.spec.unwrap_or_default();
    let template = spec.template;
    Ok(Some(Workload {
        replicas: spec.replicas,
        image: template
            .spec
            .and_then(|pod| pod.containers.into_iter().next())
            .and_then(|container| container.image),
        config_hash: template
            .metadata
            .and_then(|m| m.annotations)
            .and_then(|mut a| a.remove(CONFIG_HASH_ANNOTATION)),
    }))
}

async fn manifest(configmaps: &Api<ConfigMap>, name: &str) -> String {
    call("reading the ConfigMap", configmaps.get(name))
        .await
        .unwrap()
        .data
        .and_then(|mut data| data.remove(MANIFEST_KEY))
        .unwrap_or_default()
}

/// Waits until the pipeline's `type_` condition is `False` with a message naming `server`, and
/// `WorkersReady`'s message contains `workers_note`.
async fn wait_outage_reported(
    pipelines: &Api<SignalPipeline>,
    name: &str,
    frozen: Frozen,
    workers_note: &str,
) {
    let (type_, server) = frozen.part();
    eventually(
        &format!("{type_}=False naming {server}"),
        FOLLOW_TIMEOUT,
        || async {
            let pipeline = call("reading the pipeline", pipelines.get(name)).await?;
            let part = condition(&pipeline, type_)
                .is_some_and(|c| c.status == "False" && c.message.contains(server));
            let workers = condition(&pipeline, "WorkersReady")
                .is_some_and(|c| c.message.contains(workers_note));
            Ok(if part && workers {
                Ok(())
            } else {
                Err(describe_conditions(&pipeline))
            })
        },
    )
    .await
    .unwrap();
}

/// Ready pipeline → server frozen → scale, new image (and, with `edit_manifest`, a new batch
/// size) carried out or held as they should → server back → Ready.
async fn controls_work_while_a_server_hangs(frozen: Frozen, edit_manifest: bool) {
    let client = cluster::admin_client().await.unwrap();
    let namespace = cluster::namespace(match frozen {
        Frozen::ClickHouse => "outage-ch",
        Frozen::Nats => "outage-nats",
    });
    let operator = Operator::start(OperatorOptions {
        namespaces: vec![namespace.clone()],
        ..OperatorOptions::default()
    })
    .unwrap();
    let _kubelet = StandInKubelet::start(client.clone(), &namespace);
    // Servers of this test alone, so freezing them disturbs no other test.
    let mut nats = NatsServer::start().unwrap();
    let mut clickhouse = ClickHouseServer::start().unwrap();
    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), &namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let name = "hung";
    let (worker, configmap) = (format!("{name}-worker"), format!("{name}-pipeline"));
    let spec = dataplane::pipeline_spec(
        &dataplane::unique("outage"),
        &nats.url(),
        &clickhouse.http_url(),
    );
    apply_pipeline(&pipelines, &pipeline_object(&namespace, name, &spec))
        .await
        .unwrap();
    wait_condition(&pipelines, name, "Ready", FOLLOW_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));
    let before = workload(&deployments, &worker).await.unwrap().unwrap();
    let manifest_before = manifest(&configmaps, &configmap).await;

    match frozen {
        Frozen::ClickHouse => clickhouse.pause(),
        Frozen::Nats => nats.pause(),
    }
    let asked = Instant::now();
    cluster::kubectl(&[
        "scale",
        "sigp",
        name,
        "--replicas=3",
        "--namespace",
        &namespace,
    ])
    .unwrap();
    eventually("the Deployment scaling to 3", FOLLOW_TIMEOUT, || async {
        let current = workload(&deployments, &worker).await?;
        Ok(match current {
            Some(w) if w.replicas == Some(3) => Ok(()),
            other => Err(format!("{other:?}")),
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));
    eprintln!(
        "{frozen:?} hung: `kubectl scale sigp --replicas=3` reached the Deployment in {:?}",
        asked.elapsed()
    );
    wait_outage_reported(&pipelines, name, frozen, "still follow the spec").await;

    // A new image rolls out; a manifest change waits for the data plane.
    let mut edit = json!({"spec": {"workers": {"image": NEW_IMAGE}}});
    if edit_manifest {
        edit["spec"]["workers"]["batch"] = json!({"maxRows": 777});
    }
    call(
        "editing spec.workers",
        pipelines.patch(name, &PatchParams::default(), &Patch::Merge(&edit)),
    )
    .await
    .unwrap();
    let held = eventually(
        "the Deployment rolling out the new image",
        FOLLOW_TIMEOUT,
        || async {
            let current = workload(&deployments, &worker).await?;
            Ok(match current {
                Some(w) if w.image.as_deref() == Some(NEW_IMAGE) => Ok(w),
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));
    assert_eq!(
        (held.replicas, &held.config_hash),
        (Some(3), &before.config_hash),
        "the pods keep the manifest of the last good state"
    );
    if edit_manifest {
        wait_outage_reported(&pipelines, name, frozen, "the changed manifest waits").await;
    }
    assert_eq!(
        manifest(&configmaps, &configmap).await,
        manifest_before,
        "the ConfigMap waits for the data plane"
    );

    let back = Instant::now();
    match frozen {
        Frozen::ClickHouse => clickhouse.resume(),
        Frozen::Nats => nats.resume(),
    }
    wait_condition(&pipelines, name, "Ready", BACKOFF_CAP + FOLLOW_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));
    eprintln!(
        "{frozen:?} back: the pipeline was Ready again {:?} later",
        back.elapsed()
    );
    let after = workload(&deployments, &worker).await.unwrap().unwrap();
    assert_eq!(
        (after.replicas, after.image.as_deref()),
        (Some(3), Some(NEW_IMAGE))
    );
    if edit_manifest {
        assert_ne!(after.config_hash, before.config_hash, "the pods roll");
        let manifest_after = manifest(&configmaps, &configmap).await;
        assert!(manifest_after.contains("maxRows: 777"), "{manifest_after}");
    } else {
        // Replicas and image are the Deployment's: the manifest and the pods' hash never moved.
        assert_eq!(after.config_hash, before.config_hash);
        assert_eq!(manifest(&configmaps, &configmap).await, manifest_before);
    }

    if let Frozen::Nats = frozen {
        // Deleting a `Retain` pipeline needs no server, hung or not.
        nats.pause();
        call("deleting", pipelines.delete(name, &DeleteParams::default()))
            .await
            .unwrap();
        wait_gone(&pipelines, name, FOLLOW_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));
    }
}

#[tokio::test]
async fn scaling_and_rollouts_go_on_while_clickhouse_hangs_and_the_manifest_waits() {
    controls_work_while_a_server_hangs(Frozen::ClickHouse, true).await;
}

#[tokio::test]
async fn scaling_rollouts_and_deletion_go_on_while_nats_hangs() {
    controls_work_while_a_server_hangs(Frozen::Nats, false).await;
}
