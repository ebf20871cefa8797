//! `signal-clients`: everything the operator, the worker and the demo need to talk to NATS,
//! ClickHouse and Redis, so that each is done one way.
//!
//! [`connect`] opens clients with a pipeline's credentials, which [`credentials`] loads from the
//! environment (and creds files); [`manifest`] reads a pipeline file. [`clickhouse`] asks a server
//! for its version, [`consumer_config`] is the durable consumer a spec asks for, [`dead_letter`]
//! names the headers of a dead letter, [`retry`] is the one backoff policy, and [`tls`] builds the
//! one rustls configuration all three clients use. The pure model
//! (spec, validation, parsing) stays in `signal-model`; the I/O around it lives here.

pub mod clickhouse;
pub mod connect;
pub mod consumer_config;
pub mod credentials;
pub mod dead_letter;
pub mod manifest;
pub mod retry;
pub mod tls;
