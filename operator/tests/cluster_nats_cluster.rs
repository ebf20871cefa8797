//! `examples/production/nats-cluster.yaml` applied to the real control plane, with the operator
//! out of cluster, against a three-node NATS cluster (testkit's `NatsCluster`) and a real
//! clickhouse-server: the file's seed list, placement cluster and ClickHouse URL are replaced by
//! the test servers', the rest is the file as users read it. The pipeline becomes `Ready` with
//! its stream and dead-letter stream on three replicas, and the status shows them current soon
//! after (a new stream's followers may still be catching up when it becomes `Ready`).

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/dataplane.rs"]
mod dataplane;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use signal_model::SignalPipeline;
use signal_model::manifest::PipelineManifest;
use signal_testkit::NatsCluster;

use cluster::{
    FIELD_MANAGER, FOLLOW_TIMEOUT, Operator, OperatorOptions, StandInKubelet, apply_pipeline, call,
    eventually, pipeline_object, wait_condition,
};

/// Well below the operator's resync interval (60 s), so only its quicker look at lagging
/// replicas can meet it.
const LAGGING_SETTLES: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_cluster_example_becomes_ready_with_three_replicas() {
    let nats = NatsCluster::start(3).expect("a three-node NATS cluster");
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/production/nats-cluster.yaml");
    let text = std::fs::read_to_string(&path).expect("the example");
    let mut manifest: PipelineManifest = yaml_serde::from_str(&text).expect("the example parses");
    let name = manifest.metadata.name.clone();
    let spec = &mut manifest.spec;
    assert_eq!(spec.stream.replicas, 3);
    assert_eq!(spec.nats.url.split(',').count(), 3, "a seed list of three");
    spec.nats.url = nats.urls();
    spec.stream
        .placement
        .as_mut()
        .expect("the example places the stream")
        .cluster = Some(nats.name().to_string());
    spec.clickhouse.url = dataplane::clickhouse().http_url();
    spec.validate(&name).expect("the example is valid");

    let client = cluster::admin_client().await.unwrap();
    let namespace = cluster::namespace("natscluster");
    // The Secrets the example names (the test servers take anyone: no password, any token).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    for (secret, data) in [
        (
            "clickhouse-auth",
            json!({"user": "default", "password": ""}),
        ),
        ("nats-auth", json!({"token": "any"})),
    ] {
        let object = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": secret},
            "stringData": data,
        });
        call(
            "creating a Secret",
            secrets.patch(
                secret,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(&object),
            ),
        )
        .await
        .unwrap();
    }
    let operator = Operator::start(OperatorOptions {
        namespaces: vec![namespace.clone()],
        ..OperatorOptions::default()
    })
    .unwrap();
    let _kubelet = StandInKubelet::start(client.clone(), &namespace);

    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), &namespace);
    apply_pipeline(
        &pipelines,
        &pipeline_object(&namespace, &name, &manifest.spec),
    )
    .await
    .unwrap();
    wait_condition(
        &pipelines,
        &name,
        "Ready",
        FOLLOW_TIMEOUT + Duration::from_secs(30),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));
    // A new stream's followers may still be catching up when it becomes Ready; the operator
    // looks again within seconds (not at the next resync, a minute later) and the status shows
    // them current.
    let stream = eventually(
        "the status shows three current replicas",
        LAGGING_SETTLES,
        || async {
            let pipeline = call("reading the pipeline", pipelines.get(&name)).await?;
            let stream = pipeline.status.and_then(|s| s.stream);
            Ok(match stream {
                Some(stream)
                    if stream.current_replicas == Some(3) && stream.lagging_replicas.is_empty() =>
                {
                    Ok(stream)
                }
                other => Err(format!("{other:?}")),
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));
    let leader = stream.leader.expect("a leader");
    assert!(
        nats.nodes().iter().any(|node| node.name() == leader),
        "{leader}"
    );

    let js = dataplane::jetstream_at(&nats.nodes()[0].url()).await;
    for stream_name in [
        manifest.spec.stream.name.clone(),
        manifest.spec.dead_letter_stream().name,
    ] {
        let live = dataplane::live_stream(&js, &stream_name)
            .await
            .unwrap_or_else(|| panic!("stream {stream_name} exists"));
        assert_eq!(live.config.num_replicas, 3, "{stream_name}");
        assert_eq!(
            live.config.placement.and_then(|p| p.cluster).as_deref(),
            Some(nats.name()),
            "{stream_name}"
        );
    }
    println!(
        "{} Ready: stream {} on 3 replicas, leader {leader}",
        path.display(),
        manifest.spec.stream.name
    );
}
