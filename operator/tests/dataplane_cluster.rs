//! The table reconciler against a real ClickHouse cluster: two clickhouse-server 18.16 replicas of
//! one shard and their ZooKeeper (testkit's `ClickHouseCluster`). The operator creates the
//! database, the `ReplicatedMergeTree` table and a Distributed table over it `ON CLUSTER`, so both
//! replicas have them; an added column reaches both; a replica that is down is named in the drift
//! and catches up on the queued `ALTER` when it returns; a table missing on one replica is named;
//! deletion drops both tables on both replicas.

#[path = "support/dataplane.rs"]
mod support;

use std::time::{Duration, Instant};

use signal_model::{ClickHouseClusterSpec, ClickHouseSpec, ColumnSpec, DistributedTableSpec};
use signal_operator::dataplane::table::drop_table;
use signal_testkit::{ClickHouseCluster, ClickHouseServer};
use support::{no_credentials, pipeline_spec, reconcile, unique};

/// The shared test pipeline's table, replicated on `cluster`, with a Distributed table over it.
fn cluster_spec(cluster: &ClickHouseCluster, label: &str) -> ClickHouseSpec {
    let urls = cluster.http_urls();
    let mut spec = pipeline_spec(&unique(label), "nats://127.0.0.1:4222", &urls[0]).clickhouse;
    spec.engine = "ReplicatedMergeTree".to_string();
    spec.cluster = Some(ClickHouseClusterSpec {
        name: cluster.name().to_string(),
        replica_urls: urls[1..].to_vec(),
        distributed: Some(DistributedTableSpec {
            table: "signals_all".to_string(),
            sharding_key: None,
        }),
        ..Default::default()
    });
    spec
}

fn columns_on(replica: &ClickHouseServer, database: &str, table: &str) -> Vec<String> {
    replica
        .query(&format!(
            // 18.16's system.columns has no `position`; it lists a table's columns in order.
            "SELECT name FROM system.columns WHERE database = '{database}' AND table = '{table}'"
        ))
        .expect("system.columns")
        .lines()
        .map(str::to_string)
        .collect()
}

fn engine_on(replica: &ClickHouseServer, database: &str, table: &str) -> String {
    replica
        .query(&format!(
            "SELECT engine_full FROM system.tables WHERE database = '{database}' AND name = '{table}' \
             FORMAT TabSeparatedRaw"
        ))
        .expect("system.tables")
        .trim()
        .to_string()
}

/// Polls until `done` or a minute passes (replication and the DDL queue are asynchronous).
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn creates_alters_checks_and_drops_the_table_on_every_replica() {
    let mut cluster = ClickHouseCluster::start(2).expect("ClickHouse cluster");
    let mut spec = cluster_spec(&cluster, "cluster");
    let (database, table) = (spec.database.clone(), spec.table.clone());

    let created = reconcile(&spec).await;
    assert!(created.report.ready, "{:?}", created.report);
    assert_eq!(created.report.reason, "Created", "{:?}", created.report);
    assert_eq!(
        created.report.changes,
        [
            format!("created database {database}"),
            format!("created table {database}.{table}"),
            format!("created Distributed table {database}.signals_all"),
        ]
    );
    for replica in cluster.replicas() {
        assert_eq!(
            columns_on(replica, &database, &table),
            ["event_time", "wallet", "amount"]
        );
        assert_eq!(
            engine_on(replica, &database, &table),
            format!(
                "ReplicatedMergeTree('/clickhouse/tables/{{shard}}/{database}.{table}', \
                 '{{replica}}') PARTITION BY toYYYYMM(event_time) ORDER BY (wallet, event_time) \
                 SETTINGS replicated_deduplication_window = 1000, index_granularity = 8192"
            )
        );
        assert!(
            engine_on(replica, &database, "signals_all").starts_with(&format!(
                "Distributed('signal_cluster', '{database}', '{table}', rand())"
            )),
            "{}",
            engine_on(replica, &database, "signals_all")
        );
    }
    // Rows written to one replica are on the other.
    cluster
        .replica(0)
        .query(&format!(
            "INSERT INTO {database}.{table} VALUES ('2026-01-01 00:00:00', 'w1', 1)"
        ))
        .unwrap();
    eventually("replication to replica 2", || {
        cluster
            .replica(1)
            .query(&format!("SELECT count() FROM {database}.{table}"))
            .is_ok_and(|count| count == "1\n")
    });

    let again = reconcile(&spec).await;
    assert_eq!(again.report.reason, "UpToDate", "{:?}", again.report);
    assert_eq!(again.schema_drift, None);

    // A new column reaches both replicas (and the Distributed table).
    spec.columns
        .push(ColumnSpec::from_field("severity", "UInt8"));
    let added = reconcile(&spec).await;
    assert!(added.report.ready, "{:?}", added.report);
    assert!(
        added.report.changes.contains(&format!(
            "added column severity UInt8 to {database}.{table}"
        )),
        "{:?}",
        added.report
    );
    for replica in cluster.replicas() {
        eventually("the new column on every replica", || {
            columns_on(replica, &database, &table).contains(&"severity".to_string())
                && columns_on(replica, &database, "signals_all").contains(&"severity".to_string())
        });
    }

    // Replica 2 down: the ALTER waits in the queue for it, and the drift names it.
    cluster.replica_mut(1).stop();
    spec.columns.push(ColumnSpec::from_field("note", "String"));
    let while_down = reconcile(&spec).await;
    assert!(while_down.report.ready, "{:?}", while_down.report);
    let replica_2 = format!("127.0.0.1:{}", cluster.replica(1).tcp_port());
    let drift = while_down.schema_drift.clone().unwrap_or_default();
    assert!(
        drift.contains(&format!(
            "replica {replica_2}: not checked, it did not answer"
        )),
        "{drift}"
    );
    cluster
        .replica_mut(1)
        .restart()
        .expect("replica 2 restarts");
    eventually("the queued ALTER on the returning replica", || {
        columns_on(cluster.replica(1), &database, &table).contains(&"note".to_string())
    });
    eventually("no drift once the replica caught up", || {
        let outcome = block_on(reconcile(&spec));
        outcome.schema_drift.is_none()
    });

    // A table gone from one replica is named with that replica.
    cluster
        .replica(1)
        .query(&format!("DROP TABLE {database}.{table}"))
        .unwrap();
    let missing = reconcile(&spec).await;
    let drift = missing.schema_drift.unwrap_or_default();
    assert!(
        drift.contains(&format!(
            "replica {replica_2}: table {database}.{table} is missing"
        )),
        "{drift}"
    );

    // Deletion drops both tables on both replicas.
    drop_table(&spec, &no_credentials().clickhouse, None)
        .await
        .expect("drop");
    for replica in cluster.replicas() {
        eventually("the tables dropped on every replica", || {
            columns_on(replica, &database, &table).is_empty()
                && columns_on(replica, &database, "signals_all").is_empty()
        });
    }
}

/// Runs a future to completion from a synchronous poll loop inside the multi-threaded runtime.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}
