//! `signal-telemetry`: what the operator and the worker show of themselves, set up one way for both.
//!
//! [`logging`] installs the `tracing` subscriber (human lines or JSON, [`LogFormat`]); [`http`]
//! serves `/metrics` (OpenMetrics text from a `prometheus-client` registry), `/healthz` and
//! `/readyz` on one port.

pub mod http;
pub mod logging;

pub use logging::{LogArgs, LogFormat};
