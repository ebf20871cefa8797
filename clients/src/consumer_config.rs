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
