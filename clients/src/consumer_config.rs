//! The durable pull consumer a pipeline's workers share, as a JetStream config built from the spec.
//!
//! The operator creates and updates the consumer from this config (and compares the live one with
//! it); the worker uses it only with `--ensure-consumer`, for standalone runs without the operator.

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use signal_model::{DeliverPolicyKind, SignalPipelineSpec};

/// The consumer config the spec asks for.
pub fn desired_consumer_config(pipeline_name: &str, spec: &SignalPipelineSpec) -> pull::Config {
    let consumer = &spec.consumer;
    pull::Config {
        durable_name: Some(spec.durable_name(pipeline_name).to_string()),
        description: Some(format!("signal-operator pipeline {pipeline_name}")),
        filter_subject: consumer.filter_subject.clone().unwrap_or_default(),
        ack_policy: AckPolicy::Explicit,
        ack_wait: consumer.ack_wait.0,
        max_deliver: consumer.max_deliver,
        max_ack_pending: consumer.max_ack_pending,
        deliver_policy: match consumer.deliver_policy {
            DeliverPolicyKind::All => DeliverPolicy::All,
            DeliverPolicyKind::New => DeliverPolicy::New,
        },
        ..Default::default()
    }
}

/// The consumer of partition `index` (`spec.workers.partitions`): the shared consumer's settings,
/// named `<durable>-p<index>`, filtered on the partition and acknowledged with AckAll (its one
/// lease holder acknowledges a whole stored batch with one ack of its last message).
pub fn partition_consumer_config(
    pipeline_name: &str,
    spec: &SignalPipelineSpec,
    scheme: &signal_model::partitions::PartitionScheme,
    index: u32,
) -> pull::Config {
    pull::Config {
        durable_name: Some(scheme.consumer_name(index)),
        description: Some(format!(
            "signal-operator pipeline {pipeline_name}, partition {index} of {}",
            scheme.count
        )),
        filter_subject: scheme.filter_subject(index),
        ack_policy: AckPolicy::All,
        ..desired_consumer_config(pipeline_name, spec)
    }
}
