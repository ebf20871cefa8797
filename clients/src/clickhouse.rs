//! Questions the operator and the worker both ask a ClickHouse server.

use signal_model::ServerVersion;

/// The statement [`server_version`] runs, for error messages that quote it.
pub const VERSION_SQL: &str = "SELECT version()";

/// Why the server's version is unknown.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("`{VERSION_SQL}` failed: {0}")]
    Query(#[source] clickhouse::error::Error),
    #[error("`{0}` is not a version")]
    NotAVersion(String),
}

/// Asks the server for its `major.minor` release.
pub async fn server_version(client: &clickhouse::Client) -> Result<ServerVersion, VersionError> {
    let text: String = client
        .query(VERSION_SQL)
        .fetch_one()
        .await
        .map_err(VersionError::Query)?;
    ServerVersion::parse(&text).ok_or(VersionError::NotAVersion(text))
}
