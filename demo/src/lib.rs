//! `signal-demo`: the two halves of `scripts/demo.sh` that talk to the servers, publishing sample
//! signals ([`publish`]) and reporting what arrived ([`report`]), plus the [`sample_signals`] the
//! worker's tests and benchmark and local mode's test publish too.
//!
//! Both commands read the pipeline manifest for addresses and names, so the demo needs no flags
//! beyond the file. [`messages`] makes the demo's messages, a few of them malformed on purpose.

pub mod messages;
pub mod publish;
pub mod report;
pub mod sample_signals;

/// Why the demo publisher or report failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("ClickHouse: {0}")]
    ClickHouse(String),
    #[error("Redis: {0}")]
    Redis(String),
    #[error("{0}")]
    Timeout(String),
}

pub(crate) fn nats_error(error: impl std::fmt::Display) -> DemoError {
    DemoError::Nats(error.to_string())
}

pub(crate) fn clickhouse_error(error: impl std::fmt::Display) -> DemoError {
    DemoError::ClickHouse(error.to_string())
}

pub(crate) fn redis_error(error: impl std::fmt::Display) -> DemoError {
    DemoError::Redis(error.to_string())
}
