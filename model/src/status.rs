//! The `SignalPipeline` status: what the operator found and did, written by server-side apply.
//!
//! Plain data without Kubernetes types, so the model crate stays free of kube for the worker.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a SignalPipeline.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SignalPipelineStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `StreamReady`, `ConsumerReady`, `TableReady`, `DeadLetterReady`, `WorkersHealthy`,
    /// `WorkersReady`, and `SchemaDrift` when the table differs from the spec in a way the operator
    /// will not change by itself.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Worker replicas the Deployment has (scale subresource).
    #[serde(default)]
    pub replicas: i32,
    /// Worker replicas that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the worker pods (scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `database.table` the signals land in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// The stream as last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamStatus>,
    /// The consumer as last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<ConsumerStatus>,
    /// Where dead letters go and how many are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterStatus>,
    /// The autoscaler's last decision, when `workers.autoscale` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleStatus>,
    /// With `workers.partitions`: each partition's consumer as last seen (`consumer` then sums
    /// them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionStatus>,
}

/// One partition's consumer.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PartitionStatus {
    /// The durable consumer, `<durable>-p<i>`.
    pub consumer: String,
    /// The partition's subjects.
    pub filter_subject: String,
    /// Messages not yet delivered (the partition's lag).
    pub num_pending: u64,
    /// Messages delivered to the partition's worker and not yet acknowledged.
    pub num_ack_pending: u64,
}

/// A condition in the Kubernetes convention.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word saying why.
    pub reason: String,
    /// What a person needs to know.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The generation this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Stream figures.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StreamStatus {
    /// Messages stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// Last stream sequence.
    pub last_sequence: u64,
    /// In a NATS cluster: the server leading the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// In a NATS cluster: replicas (leader included) that are online and current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_replicas: Option<u32>,
    /// In a NATS cluster: servers holding a replica that are offline or behind the leader.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lagging_replicas: Vec<String>,
}

/// Consumer figures.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerStatus {
    /// Messages not yet delivered (the lag).
    pub num_pending: u64,
    /// Messages delivered and not yet acknowledged.
    pub num_ack_pending: u64,
    /// Messages delivered more than once.
    pub num_redelivered: u64,
}

/// What the autoscaler chose and why.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscaleStatus {
    /// Replicas chosen.
    pub desired_replicas: i32,
    /// Why, in words.
    pub reason: String,
    /// Since when the lag has been low enough to scale down (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_lag_since: Option<String>,
}

/// The dead-letter destination as last seen.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterStatus {
    /// The subject the workers publish dead letters to.
    pub subject: String,
    /// The stream that captures the subject (empty when none does).
    #[serde(default)]
    pub stream: String,
    /// Messages the dead-letter stream holds (all of its subjects).
    #[serde(default)]
    pub messages: u64,
}
