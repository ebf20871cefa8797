//! Stored `SignalPipeline`s for the unit tests of the builders and the controller's pure parts.
//!
//! "Stored" means what the API server hands the controller: namespace, uid, generation and
//! creation time set, which the owner references and conflict ordering depend on.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use signal_model::{SignalPipeline, SignalPipelineSpec};

pub(crate) const NAMESPACE: &str = "signals";

/// The smallest valid spec: one stream, one table with two columns.
pub(crate) fn minimal_spec() -> Value {
    json!({
        "nats": {"url": "nats://nats.signals.svc:4222"},
        "stream": {"name": "SIGNALS", "subjects": ["signals.>"]},
        "clickhouse": {
            "url": "http://clickhouse.signals.svc:8123",
            "database": "risk",
            "table": "events",
            "orderBy": ["seq"],
            "columns": [
                {"name": "seq", "type": "UInt64", "from": "@sequence"},
                {"name": "payload", "type": "String", "from": "$"},
            ],
        },
    })
}

/// A stored pipeline `name` in [`NAMESPACE`] with `spec` (JSON, as a user writes it), created
/// `created_at` seconds after the epoch.
pub(crate) fn stored_pipeline_with(name: &str, spec: Value, created_at: i64) -> SignalPipeline {
    let spec: SignalPipelineSpec = match serde_json::from_value(spec) {
        Ok(spec) => spec,
        Err(error) => panic!("test spec does not parse: {error}"),
    };
    let mut pipeline = SignalPipeline::new(name, spec);
    let meta = &mut pipeline.metadata;
    meta.namespace = Some(NAMESPACE.to_string());
    meta.uid = Some(format!("uid-{name}"));
    meta.generation = Some(3);
    meta.creation_timestamp = Timestamp::from_second(created_at).ok().map(Time);
    pipeline
}

/// A stored pipeline `name` with [`minimal_spec`].
pub(crate) fn stored_pipeline(name: &str) -> SignalPipeline {
    stored_pipeline_with(name, minimal_spec(), 1_700_000_000)
}
