//! signal-operator: turns `SignalPipeline` custom resources into running ingestion pipelines.
//!
//! [`crd`] defines the API, [`workload`] builds the worker objects, [`controller`] reconciles the
//! cluster towards each pipeline, [`leader_election`] keeps one active replica, and [`metrics`] are
//! served with the probes by `signal-telemetry`. [`dataplane`] reconciles the stream, consumer and
//! table on the servers themselves, connecting through `signal-clients`. [`local`] runs a pipeline
//! file without a cluster: the same data-plane reconcile, with worker processes instead of a
//! Deployment.

pub mod controller;
pub mod crd;
pub mod dataplane;
pub mod leader_election;
pub mod local;
pub mod metrics;
pub mod workload;
