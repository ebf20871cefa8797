//! signal-operator: turns `SignalPipeline` custom resources into running ingestion pipelines.
//!
//! [`crd`] defines the API, [`workload`] builds the worker objects, [`controller`] reconciles the
//! cluster towards each pipeline, [`leader_election`] keeps one active replica, [`http`] serves the
//! operator's [`metrics`] and probes, and [`telemetry`] sets up logging. [`dataplane`] reconciles
//! the stream, consumer and table on the servers themselves.

pub mod controller;
pub mod crd;
pub mod dataplane;
pub mod http;
pub mod leader_election;
pub mod metrics;
pub mod telemetry;
pub mod workload;
