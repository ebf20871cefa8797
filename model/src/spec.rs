//! The `SignalPipeline` spec: the public API that users write in YAML.
//!
//! These types are plain serde + schemars data, shared by the worker (which reads a manifest file)
//! and the operator (which enables the `kube` feature to derive the custom resource from them).
//! Every field carries a doc comment because it becomes the `kubectl explain` text.
//! Checks that the schema cannot express live in [`crate::validate`].

// kube's `printcolumn(...)` repeats `name`/`type_` keys by design, one group per column; clippy
// reads the repetition as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::quantity::{ByteSize, HumanDuration};

/// A NATS JetStream stream, a ClickHouse table and the workers that move signals from one to the other.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource),
    kube(
        group = "signals.dev",
        version = "v1alpha1",
        kind = "SignalPipeline",
        plural = "signalpipelines",
        shortname = "sigp",
        category = "signals",
        namespaced,
        status = "crate::status::SignalPipelineStatus",
        doc = "A NATS JetStream stream ingested into a ClickHouse table by a scaled set of workers.",
        scale(
            spec_replicas_path = ".spec.workers.replicas",
            status_replicas_path = ".status.replicas",
            label_selector_path = ".status.selector"
        ),
        printcolumn(name = "Stream", type_ = "string", json_path = ".spec.stream.name"),
        printcolumn(name = "Table", type_ = "string", json_path = ".status.table"),
        printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
        printcolumn(
            name = "Lag",
            type_ = "integer",
            json_path = ".status.consumer.numPending"
        ),
        printcolumn(
            name = "DeadLetters",
            type_ = "string",
            json_path = ".status.deadLetter.stream"
        ),
        printcolumn(
            name = "Ready",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Ready\")].status"
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
pub struct SignalPipelineSpec {
    /// How to reach the NATS server that holds the stream.
    pub nats: NatsSpec,
    /// The JetStream stream that receives the signals.
    pub stream: StreamSpec,
    /// The durable pull consumer the workers share.
    #[serde(default)]
    pub consumer: ConsumerSpec,
    /// The ClickHouse table the signals land in, and how each message becomes a row.
    pub clickhouse: ClickHouseSpec,
    /// The worker Deployment: replicas, image, batching and resources.
    #[serde(default)]
    pub workers: WorkersSpec,
    /// Where messages that cannot become a row are published and kept. When absent, every default
    /// applies: subject `dlq.<stream.name>.<durable>`, kept by the stream `<stream.name>_DLQ`.
    /// Poison is never dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterSpec>,
    /// An optional Redis cache of the latest row per key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
    /// What happens to the stream, consumer and table when the pipeline is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// A reference to a Secret in the pipeline's namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    /// Name of the Secret.
    pub name: String,
}

/// Credentials taken from a Secret; the keys a Secret may hold depend on the server.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthSpec {
    /// The Secret that holds the credentials. NATS keys: `creds` | `token` | `user` + `password`;
    /// ClickHouse keys: `user`, `password`; Redis keys: `password` (and optionally `user`).
    pub secret_ref: SecretRef,
}

/// One key of a Secret or a ConfigMap in the pipeline's namespace, holding PEM text. Exactly one
/// of the two references is set.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PemSource {
    /// A key of a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
    /// A key of a ConfigMap (not for private keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
}

/// A key of a named Secret or ConfigMap.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyRef {
    /// Name of the Secret or ConfigMap.
    pub name: String,
    /// The key whose value is used, e.g. `ca.crt`.
    pub key: String,
}

/// TLS to a server: whom to trust and, for mutual TLS, which certificate to present. Certificates
/// and keys are referenced, never written inline; workers get them as read-only mounted files.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsSpec {
    /// The CA certificates (PEM bundle) the server's certificate must chain to. When absent, the
    /// system's trust store (e.g. for a managed service with a public certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PemSource>,
    /// The client certificate (PEM, leaf first) for mutual TLS; requires `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PemSource>,
    /// The client certificate's private key (PEM; a Secret only); requires `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PemSource>,
    /// Accept any server certificate, unverified. For development only: the connection is
    /// encrypted but not authenticated. Off by default; when on, the pipeline's status says so
    /// (condition `InsecureTls`) and a Warning event and log line are emitted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// How to reach NATS.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsSpec {
    /// NATS server URL, e.g. `nats://nats.signals.svc:4222`. Several may be given separated by commas.
    pub url: String,
    /// Credentials for NATS (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// TLS to NATS (required by `tls://` URLs; with `nats://` URLs the connection is upgraded
    /// and TLS is required of the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// Where JetStream keeps the stream's data. Cannot change after creation.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum StorageKind {
    /// On disk.
    #[default]
    File,
    /// In memory.
    Memory,
}

/// When JetStream removes messages from the stream.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RetentionKind {
    /// Kept until a limit (age, bytes, count) is reached.
    #[default]
    Limits,
    /// Kept while a consumer is interested in them.
    Interest,
    /// Removed once acknowledged.
    Workqueue,
}

/// What JetStream does when the stream is full.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum DiscardKind {
    /// Drop the oldest messages.
    #[default]
    Old,
    /// Refuse new messages.
    New,
}

/// The JetStream stream.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StreamSpec {
    /// Stream name: letters, digits, `-` and `_`. Cannot change.
    pub name: String,
    /// Subjects the stream captures, wildcards allowed (`signals.>`).
    pub subjects: Vec<String>,
    /// `file` or `memory`. Cannot change.
    #[serde(default)]
    pub storage: StorageKind,
    /// `limits`, `interest` or `workqueue`.
    #[serde(default)]
    pub retention: RetentionKind,
    /// `old` or `new`: what to discard when a limit is reached.
    #[serde(default)]
    pub discard: DiscardKind,
    /// Oldest message kept, e.g. `7d` (unlimited when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<HumanDuration>,
    /// Largest stream size, e.g. `10Gi` (unlimited when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<ByteSize>,
    /// Most messages kept (unlimited when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_msgs: Option<i64>,
    /// Largest message the stream accepts, e.g. `1Mi` (server default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_msg_size: Option<ByteSize>,
    /// Number of stream replicas in a NATS cluster (1 to 5, at most the cluster's size; 3 keeps
    /// a stream writable with one server down).
    #[serde(default = "default_stream_replicas")]
    pub replicas: u8,
    /// Where the replicas go: a cluster of a super-cluster and server tags (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<StreamPlacement>,
    /// Window in which a repeated `Nats-Msg-Id` is dropped as a duplicate, e.g. `2m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_window: Option<HumanDuration>,
}

/// Which NATS servers hold a stream's replicas.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StreamPlacement {
    /// The cluster (`cluster.name` of the servers) that holds the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Server tags (`server_tags`) every server holding a replica must have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

fn default_stream_replicas() -> u8 {
    1
}

/// Which messages a new consumer starts with.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum DeliverPolicyKind {
    /// Every message in the stream.
    #[default]
    All,
    /// Only messages published after the consumer was created.
    New,
}

/// The durable pull consumer.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsumerSpec {
    /// Durable consumer name (default: the pipeline's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable_name: Option<String>,
    /// Only messages on this subject (wildcards allowed) are consumed; all of the stream when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_subject: Option<String>,
    /// How long a delivered message may stay unacknowledged before it is redelivered.
    #[serde(default = "default_ack_wait")]
    pub ack_wait: HumanDuration,
    /// Deliveries of one message before JetStream gives up on it.
    #[serde(default = "default_max_deliver")]
    pub max_deliver: i64,
    /// Most messages delivered and not yet acknowledged, across all workers.
    #[serde(default = "default_max_ack_pending")]
    pub max_ack_pending: i64,
    /// `all` or `new`: where a newly created consumer starts. Cannot change.
    #[serde(default)]
    pub deliver_policy: DeliverPolicyKind,
}

impl Default for ConsumerSpec {
    fn default() -> Self {
        Self {
            durable_name: None,
            filter_subject: None,
            ack_wait: default_ack_wait(),
            max_deliver: default_max_deliver(),
            max_ack_pending: default_max_ack_pending(),
            deliver_policy: DeliverPolicyKind::All,
        }
    }
}

fn default_ack_wait() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_max_deliver() -> i64 {
    5
}
fn default_max_ack_pending() -> i64 {
    20_000
}

/// The ClickHouse table.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClickHouseSpec {
    /// ClickHouse HTTP URL, e.g. `http://clickhouse.signals.svc:8123`, or
    /// `https://clickhouse.signals.svc:8443` with `tls`.
    pub url: String,
    /// Database name. Cannot change.
    pub database: String,
    /// Table name. Cannot change.
    pub table: String,
    /// Credentials for ClickHouse (Secret keys `user`, `password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// TLS to ClickHouse; set exactly when `url` is `https://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Table engine, optionally with arguments: `MergeTree`, `ReplacingMergeTree`,
    /// `SummingMergeTree`, `CollapsingMergeTree`, `VersionedCollapsingMergeTree`, or any of them
    /// `Replicated` (`ReplicatedMergeTree`, `ReplicatedReplacingMergeTree(version)`, …). A
    /// Replicated engine without a ZooKeeper path gets `'/clickhouse/tables/{shard}/<database>.<table>',
    /// '{replica}'` in front of its arguments (the servers' `{shard}`/`{replica}` macros); write
    /// both yourself to choose another path.
    #[serde(default = "default_engine")]
    pub engine: String,
    /// PARTITION BY expression, e.g. `toYYYYMM(event_time)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition_by: Option<String>,
    /// ORDER BY columns or expressions (an empty list orders by `tuple()`).
    #[serde(default)]
    pub order_by: Vec<String>,
    /// TTL expression, e.g. `toDateTime(event_time) + INTERVAL 90 DAY` (ClickHouse 19.6 or later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// The table's columns and where each value comes from.
    pub columns: Vec<ColumnSpec>,
    /// The ClickHouse cluster the table lives on: every statement the operator runs (database,
    /// table, added columns, drops) runs `ON CLUSTER`, and the workers fail over between its
    /// replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClickHouseClusterSpec>,
}

/// A ClickHouse cluster, as the servers' `remote_servers` define it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClickHouseClusterSpec {
    /// The cluster's name in the servers' `remote_servers` (and `system.clusters`).
    pub name: String,
    /// HTTP URLs of the other replicas of `url`'s shard, tried in order when the one in use does
    /// not answer, by the workers (an insert retried on another replica of a Replicated table is
    /// deduplicated there) and by the operator. Requires a `Replicated…` engine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica_urls: Vec<String>,
    /// A `Distributed` table over the local tables, created `ON CLUSTER` next to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed: Option<DistributedTableSpec>,
    /// The table the workers insert into: `local` (default: the replicated table on the replica
    /// they reach, the one whose answer means the rows are stored and deduplicated) or
    /// `distributed` (the Distributed table, inserting synchronously, which spreads rows over
    /// several shards).
    #[serde(default)]
    pub write_to: WriteTarget,
}

/// A `Distributed` table over the pipeline's local tables.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DistributedTableSpec {
    /// Its name, in the pipeline's database (a new name makes a new table; the old one stays).
    pub table: String,
    /// The sharding key expression, e.g. `cityHash64(wallet_address)`; `rand()` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sharding_key: Option<String>,
}

/// Which table the workers insert into on a cluster.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum WriteTarget {
    /// The local (replicated) table on the replica a worker reaches.
    #[default]
    Local,
    /// The `Distributed` table (`cluster.distributed` must be set).
    Distributed,
}

impl ClickHouseSpec {
    /// The cluster's name, for `ON CLUSTER`.
    pub fn cluster_name(&self) -> Option<&str> {
        self.cluster.as_ref().map(|cluster| cluster.name.as_str())
    }

    /// Every replica URL the workers and the operator may use, `url` first.
    pub fn urls(&self) -> Vec<&str> {
        let mut urls = vec![self.url.as_str()];
        if let Some(cluster) = &self.cluster {
            urls.extend(cluster.replica_urls.iter().map(String::as_str));
        }
        urls
    }

    /// The table the workers insert into (see [`WriteTarget`]).
    pub fn write_table(&self) -> &str {
        match &self.cluster {
            Some(ClickHouseClusterSpec {
                write_to: WriteTarget::Distributed,
                distributed: Some(distributed),
                ..
            }) => &distributed.table,
            _ => &self.table,
        }
    }
}

fn default_engine() -> String {
    "MergeTree".to_string()
}

/// One column of the table and the message value it is filled from.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ColumnSpec {
    /// Column name: letters, digits and `_`, not starting with a digit.
    pub name: String,
    /// ClickHouse type: String, Bool, Int8..Int64, UInt8..UInt64, Float32, Float64, Decimal(P,S), Date,
    /// DateTime, DateTime64(p), UUID, and Nullable(T), LowCardinality(T), Array(T), Map(String, T) of those.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Where the value comes from: a JSON path into the message (`$.a.b`; `$` is the whole message) or
    /// metadata: `@subject`, `@sequence` (stream sequence), `@timestamp` (stream time), `@header:Name`.
    pub from: String,
    /// Value used when the source is missing or null, written as ClickHouse would print it (`0`, `unknown`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

impl ColumnSpec {
    /// A column filled from `from` (a JSON path or `@` metadata), without a default.
    pub fn new(
        name: impl Into<String>,
        type_name: impl Into<String>,
        from: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            type_name: type_name.into(),
            from: from.into(),
            default: None,
        }
    }

    /// A column filled from the message's top-level field of the same name (`$.name`).
    pub fn from_field(name: &str, type_name: impl Into<String>) -> Self {
        Self::new(name, type_name, format!("$.{name}"))
    }

    /// The same column, with the value used when the source is missing or null.
    pub fn with_default(mut self, default: impl Into<String>) -> Self {
        self.default = Some(default.into());
        self
    }
}

/// The workers that move messages from the consumer into the table.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkersSpec {
    /// Number of worker pods (ignored while `autoscale` is set).
    #[serde(default = "default_worker_replicas")]
    pub replicas: i32,
    /// Worker image; the operator's default when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// When a batch is written to ClickHouse.
    #[serde(default)]
    pub batch: BatchSpec,
    /// CPU and memory for each worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesSpec>,
    /// Scale replicas with the consumer's lag (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleSpec>,
    /// Messages larger than this are poison (default `1Mi`).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: ByteSize,
    /// Split the stream into this many partitions (1 to 64), each consumed by its own durable
    /// consumer `<durable>-p<i>` and held by exactly one worker at a time (README, "Partitioned
    /// consumers"). Requires one `stream.subjects` pattern with `*` wildcards only. When absent,
    /// all workers share one consumer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub partitions: Option<u32>,
}

impl Default for WorkersSpec {
    fn default() -> Self {
        Self {
            replicas: default_worker_replicas(),
            image: None,
            batch: BatchSpec::default(),
            resources: None,
            autoscale: None,
            max_message_bytes: default_max_message_bytes(),
            partitions: None,
        }
    }
}

fn default_worker_replicas() -> i32 {
    1
}
fn default_max_message_bytes() -> ByteSize {
    ByteSize(1024 * 1024)
}

/// A batch is written when any one of its limits is reached.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchSpec {
    /// Rows in a batch.
    #[serde(default = "default_batch_rows")]
    pub max_rows: u32,
    /// Encoded bytes in a batch, e.g. `8Mi`.
    #[serde(default = "default_batch_bytes")]
    pub max_bytes: ByteSize,
    /// Longest time the first message of a batch waits, e.g. `1s`.
    #[serde(default = "default_batch_wait")]
    pub max_wait: HumanDuration,
}

impl Default for BatchSpec {
    fn default() -> Self {
        Self {
            max_rows: default_batch_rows(),
            max_bytes: default_batch_bytes(),
            max_wait: default_batch_wait(),
        }
    }
}

fn default_batch_rows() -> u32 {
    10_000
}
fn default_batch_bytes() -> ByteSize {
    ByteSize(8 * 1024 * 1024)
}
fn default_batch_wait() -> HumanDuration {
    HumanDuration::from_secs(1)
}

/// Container resources, as Kubernetes quantities (`100m`, `64Mi`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourcesSpec {
    /// Requested resources, e.g. `{cpu: 100m, memory: 64Mi}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    /// Resource limits, e.g. `{memory: 256Mi}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// Lag-driven replica count.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AutoscaleSpec {
    /// Fewest workers.
    #[serde(default = "default_min_replicas")]
    pub min_replicas: i32,
    /// Most workers.
    pub max_replicas: i32,
    /// Pending messages one worker is expected to keep up with.
    pub target_lag_per_replica: i64,
    /// How long the lag must stay low before replicas are removed (default `5m`).
    #[serde(default = "default_stabilization")]
    pub scale_down_stabilization: HumanDuration,
}

fn default_min_replicas() -> i32 {
    1
}
fn default_stabilization() -> HumanDuration {
    HumanDuration::from_secs(300)
}

/// Where messages that cannot become a row go: a subject and the JetStream stream that keeps them.
///
/// Every field has a default, and a pipeline without `deadLetter` gets them all: dead letters are
/// published to `dlq.<stream.name>.<durable>` and kept by the stream `<stream.name>_DLQ`, which
/// captures `dlq.<stream.name>.>` (so pipelines reading one stream share one dead-letter stream).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeadLetterSpec {
    /// Subject poison messages are published to, with headers `Signal-Poison-Reason`,
    /// `Signal-Original-Subject` and `Signal-Stream-Sequence` (default `dlq.<stream.name>.<durable>`).
    /// It must lie outside the source stream's subjects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The stream that keeps the dead letters.
    #[serde(default)]
    pub stream: DeadLetterStreamSpec,
}

/// The dead-letter stream. Settings as for `spec.stream`, with defaults suited to dead letters.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeadLetterStreamSpec {
    /// `true`: the operator creates and updates the stream, and deletes it with the pipeline under
    /// `deletionPolicy: Delete`. `false`: another tool manages a stream that captures the subject;
    /// the operator only checks that one does.
    #[serde(default = "default_managed")]
    pub managed: bool,
    /// Stream name (default `<stream.name>_DLQ`). Cannot change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Subjects the stream captures (default `dlq.<stream.name>.>`, or `[subject]` when `subject` is
    /// set outside it). They must not overlap the source stream's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
    /// `file` or `memory`. Cannot change.
    #[serde(default)]
    pub storage: StorageKind,
    /// `limits`, `interest` or `workqueue`.
    #[serde(default)]
    pub retention: RetentionKind,
    /// `old` or `new`: what to discard when a limit is reached.
    #[serde(default)]
    pub discard: DiscardKind,
    /// Oldest dead letter kept (default `14d`; `0` keeps them until another limit is reached).
    #[serde(default = "default_dead_letter_max_age")]
    pub max_age: HumanDuration,
    /// Largest stream size, e.g. `1Gi` (unlimited when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<ByteSize>,
    /// Most dead letters kept (unlimited when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_msgs: Option<i64>,
    /// Number of stream replicas in a NATS cluster (1 to 5; default `stream.replicas`). The
    /// stream follows `stream.placement`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u8>,
    /// Window in which a dead letter republished after a worker crash (same `Nats-Msg-Id`) is
    /// dropped as a duplicate. At least `consumer.ackWait`; default the larger of `2m` and twice
    /// `consumer.ackWait`, within `maxAge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_window: Option<HumanDuration>,
}

impl Default for DeadLetterStreamSpec {
    fn default() -> Self {
        Self {
            managed: default_managed(),
            name: None,
            subjects: Vec::new(),
            storage: StorageKind::File,
            retention: RetentionKind::Limits,
            discard: DiscardKind::Old,
            max_age: default_dead_letter_max_age(),
            max_bytes: None,
            max_msgs: None,
            replicas: None,
            duplicate_window: None,
        }
    }
}

fn default_managed() -> bool {
    true
}
fn default_dead_letter_max_age() -> HumanDuration {
    HumanDuration::from_secs(14 * 86_400)
}

/// The Redis latest-value cache.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheSpec {
    /// The Redis server.
    pub redis: RedisSpec,
    /// Key template over column names, e.g. `wallet:{wallet_address}:latest`.
    pub key: String,
    /// Columns written into the hash at the key.
    pub fields: Vec<String>,
    /// Expiry set on each key after it is written, e.g. `5m`.
    pub ttl: HumanDuration,
}

/// How to reach Redis.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisSpec {
    /// Redis URL, e.g. `redis://redis.signals.svc:6379`, or `rediss://redis.signals.svc:6380`
    /// with `tls`.
    pub url: String,
    /// Credentials for Redis (Secret key `password`, optionally `user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// TLS to Redis; set exactly when `url` is `rediss://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// What deleting the pipeline does to the stream, consumer and table.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum DeletionPolicy {
    /// Leave them in place.
    #[default]
    Retain,
    /// Delete the consumer, the stream and the table.
    Delete,
}

impl SignalPipelineSpec {
    /// The durable consumer name: `consumer.durableName`, or the pipeline's name.
    pub fn durable_name<'a>(&'a self, pipeline_name: &'a str) -> &'a str {
        self.consumer
            .durable_name
            .as_deref()
            .unwrap_or(pipeline_name)
    }
}
