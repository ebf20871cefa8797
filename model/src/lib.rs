//! The shared model of a signal pipeline.
//!
//! Everything here is pure: the `SignalPipeline` spec users write ([`spec`]), its validation
//! ([`validate`]), parsing the manifest the worker reads ([`manifest`]), the credential types and
//! the variables that carry them ([`credentials`]), ClickHouse column types ([`column_type`]) and
//! whether a live table matches them ([`live_schema`]), how a message becomes a RowBinary row
//! ([`row_encoder`]), the DDL the operator runs ([`ddl`]), the Redis cache key template
//! ([`cache_key`]), the dead-letter defaults ([`dead_letter`]), the worker health report
//! ([`worker_health`]), which TLS material reaches which server ([`tls`]) and the partitioned
//! consumers' subjects, names and lease rules ([`partitions`]). No I/O happens in
//! this crate: reading files and the environment, and talking to servers, is `signal-clients`'
//! part.

pub mod cache_key;
pub mod column_type;
pub mod credentials;
pub mod ddl;
pub mod dead_letter;
pub mod live_schema;
pub mod manifest;
pub mod partitions;
pub mod quantity;
pub mod row_encoder;
pub mod server_version;
pub mod spec;
pub mod status;
pub mod tls;
pub mod validate;
pub mod value_source;
pub mod worker_health;

pub use column_type::ColumnType;
pub use quantity::{ByteSize, HumanDuration};
pub use server_version::ServerVersion;
pub use spec::*;
pub use status::*;
