//! `signal-worker`: moves signals from a JetStream durable consumer into a ClickHouse table.
//!
//! The flow, one module a step: [`source`] pulls messages and fills a [`batch`] through the row
//! encoder, routing poison to [`dead_letter`]; [`clickhouse_sink`] inserts each sealed batch with
//! retries (telling errors apart with [`insert_error`]) and acknowledges it once stored; [`cache`]
//! then updates Redis. Every message pulled is kept alive until settled by [`held_messages`];
//! [`health`] says why the worker is stuck when it is. [`pipeline`] wires them together with
//! shutdown, and serves [`metrics`] and health through `signal-telemetry`. With partitioned
//! consumers, [`partitioned`] runs that flow once per partition this worker holds a lease on
//! ([`partition_lease`]). Connecting,
//! credentials, the consumer config and retries come from `signal-clients`, shared with the operator.

pub mod batch;
pub mod cache;
pub mod clickhouse_sink;
pub mod dead_letter;
pub mod health;
pub mod held_messages;
pub mod insert_error;
pub mod metrics;
pub mod partition_lease;
pub mod partitioned;
pub mod pipeline;
pub mod source;
