//! `signal-worker`: moves signals from a JetStream durable consumer into a ClickHouse table.

pub mod connect;
