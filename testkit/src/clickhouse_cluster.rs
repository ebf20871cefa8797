//! A real ClickHouse cluster for tests: one shard of N `clickhouse-server` 18.16 replicas on
//! loopback, coordinated by a [`ZooKeeperServer`] of its own.
//!
//! [`ClickHouseCluster::start`] starts ZooKeeper, reserves every replica's ports first (each
//! replica's `remote_servers` names all of them), then starts the replicas one by one, each with
//! the cluster [`CLUSTER_NAME`] in `<remote_servers>` (one shard, `internal_replication` true, so a
//! write to one replica reaches the others through replication, not through the Distributed
//! engine), `<zookeeper>`, `<macros>` (`{shard}` = `01`, `{replica}` = `replica_N`) and
//! `<distributed_ddl>` (so `ON CLUSTER` statements work). Each replica is a [`ClickHouseServer`]:
//! [`ClickHouseServer::stop`] / [`ClickHouseServer::restart`] of one of them (same ports, same
//! data directory) is the fault tests' lost replica. Dropping the cluster stops the replicas,
//! then ZooKeeper.

use crate::clickhouse::{ClickHouseServer, Ports};
use crate::error::{Error, Result};
use crate::process::is_address_in_use;
use crate::zookeeper::ZooKeeperServer;

/// The cluster's name in every replica's `remote_servers`.
pub const CLUSTER_NAME: &str = "signal_cluster";

/// The `{shard}` macro of every replica (the cluster has one shard).
pub const SHARD: &str = "01";

/// Whole-cluster starts tried when a replica loses a race for one of its ports.
const START_ATTEMPTS: u32 = 3;

/// One shard of replicated ClickHouse servers and their ZooKeeper.
#[derive(Debug)]
pub struct ClickHouseCluster {
    // Declared first: replicas stop before the ZooKeeper they hold sessions with.
    replicas: Vec<ClickHouseServer>,
    zookeeper: ZooKeeperServer,
}

impl ClickHouseCluster {
    /// Starts ZooKeeper and `replicas` replicas of one shard (at least one).
    pub fn start(replicas: usize) -> Result<ClickHouseCluster> {
        let zookeeper = ZooKeeperServer::start()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match start_replicas(replicas.max(1), zookeeper.port()) {
                Ok(replicas) => {
                    return Ok(ClickHouseCluster {
                        replicas,
                        zookeeper,
                    });
                }
                Err(Error::Exited { log_tail, .. }) if is_address_in_use(&log_tail) => {
                    last_error = Some(log_tail);
                }
                Err(other) => return Err(other),
            }
        }
        Err(Error::PortsInUse {
            server: "clickhouse-server",
            attempts: START_ATTEMPTS,
            log_tail: last_error.unwrap_or_default(),
        })
    }

    /// The cluster's name, for `ON CLUSTER` and `spec.clickhouse.cluster.name`.
    pub fn name(&self) -> &'static str {
        CLUSTER_NAME
    }

    /// The replicas, in the order of `remote_servers` (`{replica}` = `replica_1`, …).
    pub fn replicas(&self) -> &[ClickHouseServer] {
        &self.replicas
    }

    /// Replica `index` (0-based).
    pub fn replica(&self, index: usize) -> &ClickHouseServer {
        &self.replicas[index]
    }

    /// Replica `index` (0-based), to stop, kill, pause or restart it.
    pub fn replica_mut(&mut self, index: usize) -> &mut ClickHouseServer {
        &mut self.replicas[index]
    }

    /// Every replica's HTTP URL, in order.
    pub fn http_urls(&self) -> Vec<String> {
        self.replicas
            .iter()
            .map(ClickHouseServer::http_url)
            .collect()
    }

    /// The cluster's ZooKeeper.
    pub fn zookeeper(&self) -> &ZooKeeperServer {
        &self.zookeeper
    }
}

fn start_replicas(count: usize, zookeeper_port: u16) -> Result<Vec<ClickHouseServer>> {
    let ports = (0..count)
        .map(|_| Ports::reserve(false))
        .collect::<Result<Vec<_>>>()?;
    let members: String = ports
        .iter()
        .map(|p| {
            format!(
                "<replica><host>127.0.0.1</host><port>{}</port></replica>",
                p.tcp()
            )
        })
        .collect();
    let mut started = Vec::with_capacity(count);
    for (index, replica_ports) in ports.into_iter().enumerate() {
        let extra = cluster_config(&members, zookeeper_port, index + 1);
        started.push(ClickHouseServer::start_configured(replica_ports, &extra)?);
    }
    Ok(started)
}

/// The elements that make a server replica `number` of the cluster.
fn cluster_config(members: &str, zookeeper_port: u16, number: usize) -> String {
    format!(
        "<remote_servers><{CLUSTER_NAME}><shard><internal_replication>true</internal_replication>\
         {members}</shard></{CLUSTER_NAME}></remote_servers>\n\
         <zookeeper><node><host>127.0.0.1</host><port>{zookeeper_port}</port></node>\
         <session_timeout_ms>6000</session_timeout_ms></zookeeper>\n\
         <macros><shard>{SHARD}</shard><replica>replica_{number}</replica></macros>\n\
         <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicated_table_on_cluster_reaches_every_replica_and_survives_a_restart() {
        let mut cluster = ClickHouseCluster::start(2).unwrap();
        let first = cluster.replica(0);
        assert!(
            first
                .query(&format!(
                    "SELECT count() FROM system.clusters WHERE cluster = '{CLUSTER_NAME}'"
                ))
                .unwrap()
                .starts_with('2')
        );
        first
            .query(&format!(
                "CREATE TABLE default.r ON CLUSTER {CLUSTER_NAME} (id UInt64) ENGINE = \
                 ReplicatedMergeTree('/clickhouse/tables/{{shard}}/default.r', '{{replica}}') \
                 ORDER BY id"
            ))
            .unwrap();
        first
            .query("INSERT INTO default.r VALUES (1), (2)")
            .unwrap();
        // An identical block is deduplicated by the replicated table.
        first
            .query("INSERT INTO default.r VALUES (1), (2)")
            .unwrap();
        let second = cluster.replica(1);
        second.query("SYSTEM SYNC REPLICA default.r").unwrap();
        assert_eq!(
            second.query("SELECT count() FROM default.r").unwrap(),
            "2\n"
        );

        cluster.replica_mut(1).stop();
        cluster
            .replica(0)
            .query("INSERT INTO default.r VALUES (3)")
            .unwrap();
        cluster.replica_mut(1).restart().unwrap();
        let second = cluster.replica(1);
        second.query("SYSTEM SYNC REPLICA default.r").unwrap();
        assert_eq!(
            second.query("SELECT count() FROM default.r").unwrap(),
            "3\n"
        );
    }
}
