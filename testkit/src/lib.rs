//! Real servers for tests: `nats-server` (JetStream; alone or as a [`NatsCluster`]),
//! `clickhouse-server` (alone, or as a replicated [`ClickHouseCluster`] with its
//! [`ZooKeeperServer`]) and `redis-server`,
//! a Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager; see
//! [`KubeCluster`]) built from upstream Go modules by `scripts/build-kube.sh`, and a node on top
//! of it (kube-scheduler, containerd and a kubelet; see [`KubeNode`]) that runs pods from images
//! packed here ([`write_image_archive`]).
//!
//! Each server runs as a child process on free loopback ports, with its own temporary directory,
//! so tests can run in parallel (test threads and several test binaries at once). Servers are
//! stopped when dropped, and also when the test process dies (`PR_SET_PDEATHSIG`). Everything is
//! blocking (the `redis` crate's synchronous API for Redis), so the crate works from sync and
//! async tests alike.
//!
//! The binaries come from Debian packages (`scripts/install-test-deps.sh` installs them); a
//! missing one is an [`Error::BinaryNotFound`] naming the `apt-get install` command. The
//! variables `SIGNAL_TEST_NATS_SERVER`, `SIGNAL_TEST_CLICKHOUSE_SERVER` and
//! `SIGNAL_TEST_REDIS_SERVER` point at other binaries. Besides Debian's nats-server 2.9.10, a
//! current release ([`NatsServer::start_current`]) is built from its Go module by
//! `scripts/build-current-nats.sh`; a missing one is an [`Error::NotBuilt`] naming the script.
//!
//! ```no_run
//! let ch = signal_testkit::ClickHouseServer::start()?;
//! assert!(ch.query("SELECT version()")?.starts_with("18.16"));
//! let nats = signal_testkit::NatsServer::start()?;
//! println!("NATS at {}", nats.url());
//! # Ok::<(), signal_testkit::Error>(())
//! ```

mod binary;
pub mod certs;
mod clickhouse;
mod clickhouse_cluster;
mod error;
mod http;
mod https;
mod kube_cluster;
mod kube_node;
mod nats;
mod nats_cluster;
mod oci_image;
mod ports;
mod process;
mod redis;
mod server_tls;
mod zookeeper;

pub use clickhouse::ClickHouseServer;
pub use clickhouse_cluster::{CLUSTER_NAME as CLICKHOUSE_CLUSTER_NAME, ClickHouseCluster};
pub use error::{Error, Result};
pub use kube_cluster::{
    BINARY_ENV_VAR as KUBE_BINARY_ENV_VAR, KUBERNETES_VERSION, KubeCluster, NODE_NAME,
};
pub use kube_node::{KubeNode, PAUSE_IMAGE};
pub use nats::{CURRENT_NATS_ENV_VAR, CURRENT_NATS_VERSION, NatsServer};
pub use nats_cluster::NatsCluster;
pub use oci_image::{ImageSpec, write_image_archive};
pub use ports::{free_port, is_port_free};
pub use process::{ChildProcess, workspace_bin};
pub use redis::RedisServer;
pub use server_tls::ServerTls;
pub use zookeeper::ZooKeeperServer;
