//! `examples/production/clickhouse-cluster.yaml`, applied to a real control plane with the
//! operator binary out of cluster, against a real ClickHouse cluster (two clickhouse-server 18.16
//! replicas of one shard and their ZooKeeper, testkit's `ClickHouseCluster`) and a real
//! nats-server: the pipeline becomes `Ready` (its pods marked ready by a stand-in kubelet, as no
//! node runs) and the replicated table and the Distributed table exist on both replicas.
//!
//! Only what points at servers is changed in the manifest: the NATS and ClickHouse URLs, the
//! cluster's name, the namespace, and the credentials (the test servers take the passwordless
//! `default` user, so no Secret).

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/dataplane.rs"]
mod dataplane;

use std::path::Path;

use kube::Api;
use signal_model::SignalPipeline;
use signal_model::manifest::PipelineManifest;
use signal_testkit::{ClickHouseCluster, NatsServer};

use cluster::{
    FOLLOW_TIMEOUT, Operator, OperatorOptions, StandInKubelet, apply_pipeline, pipeline_object,
    wait_condition,
};

const EXAMPLE: &str = "examples/production/clickhouse-cluster.yaml";

fn example() -> PipelineManifest {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(EXAMPLE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{EXAMPLE}: {e}"));
    yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{EXAMPLE} does not parse: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_example_is_ready_with_its_table_on_every_replica() {
    let clickhouse = ClickHouseCluster::start(2).expect("ClickHouse cluster");
    let nats = NatsServer::start().expect("nats-server");
    let client = cluster::admin_client().await.unwrap();
    let namespace = cluster::namespace("chcluster");
    let _operator = Operator::start(OperatorOptions {
        namespaces: vec![namespace.clone()],
        ..OperatorOptions::default()
    })
    .unwrap();
    let _kubelet = StandInKubelet::start(client.clone(), &namespace);

    let manifest = example();
    let name = manifest.metadata.name.clone();
    let mut spec = manifest.spec.clone();
    let urls = clickhouse.http_urls();
    spec.nats.url = nats.url();
    spec.clickhouse.url = urls[0].clone();
    spec.clickhouse.auth = None;
    let cluster_spec = spec
        .clickhouse
        .cluster
        .as_mut()
        .expect("the example names a cluster");
    cluster_spec.name = clickhouse.name().to_string();
    cluster_spec.replica_urls = urls[1..].to_vec();
    let distributed = cluster_spec
        .distributed
        .as_ref()
        .expect("the example has a Distributed table")
        .table
        .clone();

    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), &namespace);
    apply_pipeline(&pipelines, &pipeline_object(&namespace, &name, &spec))
        .await
        .unwrap();
    let ready = wait_condition(&pipelines, &name, "Ready", FOLLOW_TIMEOUT)
        .await
        .unwrap();
    let (database, table) = (&spec.clickhouse.database, &spec.clickhouse.table);
    assert_eq!(
        ready.status.as_ref().and_then(|s| s.table.clone()),
        Some(format!("{database}.{table}"))
    );
    for (index, replica) in clickhouse.replicas().iter().enumerate() {
        let tables = replica
            .query(&format!(
                "SELECT name, engine FROM system.tables WHERE database = '{database}' ORDER BY name"
            ))
            .unwrap();
        assert_eq!(
            tables,
            format!("{table}\tReplicatedMergeTree\n{distributed}\tDistributed\n"),
            "replica {}",
            index + 1
        );
    }
}
