//! The pipeline's ClickHouse table: checks what the server supports, creates the database and
//! table when missing, adds spec columns the table lacks, and reports any other difference
//! (columns, engine, `PARTITION BY`, `ORDER BY`, `TTL`) as schema drift instead of changing it.
//!
//! Nothing is ever dropped, retyped or rebuilt here: a column's data outlives a spec edit. The one
//! destructive statement, [`drop_table`], runs only on pipeline deletion with policy `Delete`.

use clickhouse::Client;
use signal_model::ClickHouseSpec;
use signal_model::ServerVersion;
use signal_model::credentials::UserPassword;
use signal_model::ddl;
use signal_model::tls::TlsMaterial;

use super::table_clause_diff::{PrintedClauses, diff_clauses};
use super::table_schema_diff::{LiveColumn, diff_schema};
use super::table_scratch::printed_spec_clauses;
use super::{DataPlaneError, PART_TIMEOUT, PartReport, REQUEST_TIMEOUT, bounded};

/// The result of reconciling the table.
#[derive(Clone, Debug)]
pub struct TableOutcome {
    pub report: PartReport,
    /// Differences the operator leaves to a person (see [`super::table_schema_diff`]).
    pub schema_drift: Option<String>,
}

/// Brings the table in line with `spec` as far as adding things allows.
pub async fn reconcile_table(
    spec: &ClickHouseSpec,
    auth: &UserPassword,
    tls: Option<&TlsMaterial>,
) -> TableOutcome {
    let client = match client(spec, auth, tls) {
        Ok(client) => client,
        Err(error) => {
            return TableOutcome {
                report: PartReport::from_error(&error),
                schema_drift: None,
            };
        }
    };
    bounded(
        format!(
            "reconciling table {}",
            ddl::qualified_table(&spec.database, &spec.table)
        ),
        PART_TIMEOUT,
        apply_table(&client, spec),
    )
    .await
    .unwrap_or_else(|error| TableOutcome {
        report: PartReport::from_error(&name_the_server(error, &spec.url)),
        schema_drift: None,
    })
}

/// The client for the table's server; unusable TLS material is a [`DataPlaneError::Tls`].
fn client(
    spec: &ClickHouseSpec,
    auth: &UserPassword,
    tls: Option<&TlsMaterial>,
) -> Result<Client, DataPlaneError> {
    signal_clients::connect::clickhouse(&spec.url, auth, tls)
        .map_err(|error| DataPlaneError::Tls(error.to_string()))
}

/// A step that timed out becomes ClickHouse not answering, so the condition names the server a
/// person has to look at (the steps' own words say only what was asked).
fn name_the_server(error: DataPlaneError, url: &str) -> DataPlaneError {
    match error {
        DataPlaneError::TimedOut { action, seconds } => DataPlaneError::ClickHouseUnreachable {
            url: url.to_string(),
            message: format!("{action} got no answer within {seconds} s"),
        },
        other => other,
    }
}

async fn apply_table(
    client: &Client,
    spec: &ClickHouseSpec,
) -> Result<TableOutcome, DataPlaneError> {
    let name = format!("{}.{}", spec.database, spec.table);
    for column in &spec.columns {
        ddl::column_type(column).map_err(|error| DataPlaneError::InvalidSpec(error.to_string()))?;
    }
    let version = server_version(client, &spec.url).await?;
    let unsupported = ddl::unsupported_features(spec, version);
    if !unsupported.is_empty() {
        let features: Vec<String> = unsupported.iter().map(ToString::to_string).collect();
        return Ok(TableOutcome {
            report: PartReport::not_ready(
                "UnsupportedByServer",
                format!("{}; server is {version}", features.join("; ")),
                Vec::new(),
            ),
            schema_drift: None,
        });
    }

    let mut changes = Vec::new();
    if !database_exists(client, &spec.url, &spec.database).await? {
        execute(client, &spec.url, &ddl::create_database_sql(&spec.database)).await?;
        changes.push(format!("created database {}", spec.database));
    }
    let live_clauses = table_clauses(client, &spec.url, &spec.database, &spec.table).await?;
    let created = live_clauses.is_none();
    if created {
        let sql = ddl::create_table_sql(spec, version)
            .map_err(|error| DataPlaneError::InvalidSpec(error.to_string()))?;
        execute(client, &spec.url, &sql).await?;
        changes.push(format!("created table {name}"));
    }

    let live = live_columns(client, &spec.url, &spec.database, &spec.table).await?;
    let mut diff = diff_schema(&spec.columns, &live);
    // A table just created from the spec has the spec's clauses.
    if let Some(live_clauses) = &live_clauses {
        match printed_spec_clauses(client, spec, version).await {
            Ok(spec_clauses) => {
                diff.clause_mismatches = diff_clauses(spec, live_clauses, &spec_clauses);
            }
            // Not knowing how the server prints the spec is worth a note, not a stopped table.
            Err(refused @ DataPlaneError::ClickHouseRefused { .. }) => {
                diff.clauses_not_compared = Some(refused.to_string());
            }
            Err(other) => return Err(other),
        }
    }
    for column in &diff.missing {
        let sql = ddl::add_column_sql(&spec.database, &spec.table, column, version)
            .map_err(|error| DataPlaneError::InvalidSpec(error.to_string()))?;
        execute(client, &spec.url, &sql).await?;
        changes.push(format!(
            "added column {} {} to {name}",
            column.name,
            ddl::column_type(column)
                .map(|t| t.to_string())
                .unwrap_or_else(|_| column.type_name.clone())
        ));
    }

    let schema_drift = diff.drift_message();

    let report = match &schema_drift {
        Some(message) if diff.blocks_writes() => PartReport::not_ready(
            "SchemaDrift",
            format!(
                "table {name} differs from the spec in a way the workers cannot write; the \
                 operator changes no existing column, resolve it by hand: {message}"
            ),
            changes,
        ),
        Some(message) => PartReport::ready(
            "SchemaDrift",
            format!("table {name} is usable but differs from the spec: {message}"),
            changes,
        ),
        None if created => PartReport::ready("Created", format!("table {name} created"), changes),
        None if !changes.is_empty() => PartReport::ready(
            "Updated",
            format!("table {name}: {}", changes.join(", ")),
            changes,
        ),
        None => PartReport::ready(
            "UpToDate",
            format!("table {name} matches the spec"),
            changes,
        ),
    };
    Ok(TableOutcome {
        report,
        schema_drift,
    })
}

/// Maps a client error: transport problems mean unreachable, anything else is the server's
/// refusal of `statement`.
fn query_error(url: &str, statement: &str, error: clickhouse::error::Error) -> DataPlaneError {
    if let Some(tls) = signal_clients::connect::clickhouse_tls_failure(url, &error) {
        return DataPlaneError::Tls(tls.to_string());
    }
    match error {
        clickhouse::error::Error::Network(_) | clickhouse::error::Error::TimedOut => {
            DataPlaneError::ClickHouseUnreachable {
                url: url.to_string(),
                message: with_causes(&error),
            }
        }
        clickhouse::error::Error::BadResponse(message)
            if clickhouse_error_code(&message).is_some_and(is_authentication_code) =>
        {
            DataPlaneError::AuthenticationFailed {
                server: "ClickHouse",
                url: url.to_string(),
                message: message.trim().to_string(),
            }
        }
        clickhouse::error::Error::BadResponse(message) => DataPlaneError::ClickHouseRefused {
            statement: statement.to_string(),
            message: message.trim().to_string(),
        },
        other => DataPlaneError::ClickHouseRefused {
            statement: statement.to_string(),
            message: other.to_string(),
        },
    }
}

/// The `Code: N` that starts ClickHouse's error text (`Code: 192, e.displayText() = …` on 18.x,
/// `Code: 516. DB::Exception: …` on current servers).
fn clickhouse_error_code(message: &str) -> Option<u32> {
    let rest = message.trim_start().strip_prefix("Code: ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// UNKNOWN_USER, WRONG_PASSWORD, REQUIRED_PASSWORD, IP_ADDRESS_NOT_ALLOWED, AUTHENTICATION_FAILED.
fn is_authentication_code(code: u32) -> bool {
    matches!(code, 192..=195 | 516)
}

/// The error and its causes, `a: b: c`: the HTTP client's own text ("client error (Connect)")
/// hides the part a person needs ("Connection refused").
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

pub(super) async fn execute(client: &Client, url: &str, sql: &str) -> Result<(), DataPlaneError> {
    // Raw: DDL is complete text, and a `?` inside an expression is not a bind placeholder.
    bounded(format!("running `{sql}`"), REQUEST_TIMEOUT, async {
        client
            .query_raw(sql)
            .execute()
            .await
            .map_err(|error| query_error(url, sql, error))
    })
    .await
}

/// The server's `major.minor` release.
pub async fn server_version(client: &Client, url: &str) -> Result<ServerVersion, DataPlaneError> {
    use signal_clients::clickhouse::{VERSION_SQL, VersionError};
    bounded("asking for the server version", REQUEST_TIMEOUT, async {
        signal_clients::clickhouse::server_version(client)
            .await
            .map_err(|error| match error {
                VersionError::Query(error) => query_error(url, VERSION_SQL, error),
                VersionError::NotAVersion(_) => DataPlaneError::ClickHouseRefused {
                    statement: VERSION_SQL.to_string(),
                    message: error.to_string(),
                },
            })
    })
    .await
}

async fn database_exists(
    client: &Client,
    url: &str,
    database: &str,
) -> Result<bool, DataPlaneError> {
    const SQL: &str = "SELECT count() FROM system.databases WHERE name = ?";
    let count = bounded("looking up the database", REQUEST_TIMEOUT, async {
        client
            .query(SQL)
            .bind(database)
            .fetch_one::<u64>()
            .await
            .map_err(|error| query_error(url, SQL, error))
    })
    .await?;
    Ok(count > 0)
}

/// The table's engine and keys as the server prints them, or `None` when the table does not
/// exist. These three columns of `system.tables` exist on 18.16 and on current servers alike.
pub async fn table_clauses(
    client: &Client,
    url: &str,
    database: &str,
    table: &str,
) -> Result<Option<PrintedClauses>, DataPlaneError> {
    const SQL: &str = "SELECT engine_full, partition_key, sorting_key FROM system.tables \
                       WHERE database = ? AND name = ?";
    let rows = bounded("looking up the table", REQUEST_TIMEOUT, async {
        // ClickHouse 18.16 reads every table of the database for `system.tables` and fails with
        // code 60 (unknown table) when another table is dropped meanwhile: read it again.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match client
                .query(SQL)
                .bind(database)
                .bind(table)
                .fetch_all::<(String, String, String)>()
                .await
            {
                Ok(rows) => return Ok(rows),
                Err(error) if attempts < 5 && error.to_string().contains("Code: 60") => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(error) => return Err(query_error(url, SQL, error)),
            }
        }
    })
    .await?;
    Ok(rows
        .into_iter()
        .next()
        .map(|(engine_full, partition_key, sorting_key)| PrintedClauses {
            engine_full,
            partition_key,
            sorting_key,
        }))
}

/// The table's columns as the server reports them.
pub async fn live_columns(
    client: &Client,
    url: &str,
    database: &str,
    table: &str,
) -> Result<Vec<LiveColumn>, DataPlaneError> {
    const SQL: &str = "SELECT name, type FROM system.columns WHERE database = ? AND table = ?";
    let rows = bounded("reading the table's columns", REQUEST_TIMEOUT, async {
        client
            .query(SQL)
            .bind(database)
            .bind(table)
            .fetch_all::<(String, String)>()
            .await
            .map_err(|error| query_error(url, SQL, error))
    })
    .await?;
    Ok(rows
        .into_iter()
        .map(|(name, type_text)| LiveColumn { name, type_text })
        .collect())
}

/// Drops the table (a missing table is fine). The database is kept: other tables may live in it.
pub async fn drop_table(
    spec: &ClickHouseSpec,
    auth: &UserPassword,
    tls: Option<&TlsMaterial>,
) -> Result<(), DataPlaneError> {
    let client = client(spec, auth, tls)?;
    execute(
        &client,
        &spec.url,
        &ddl::drop_table_sql(&spec.database, &spec.table),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_that_timed_out_names_clickhouse() {
        let named = name_the_server(
            DataPlaneError::TimedOut {
                action: "asking for the server version".to_string(),
                seconds: 5,
            },
            "http://ch:8123",
        );
        assert_eq!(named.reason(), "Unreachable");
        assert_eq!(
            named.to_string(),
            "ClickHouse at http://ch:8123 is unreachable: asking for the server version got no \
             answer within 5 s"
        );
        let refused = DataPlaneError::InvalidSpec("x".to_string());
        assert_eq!(name_the_server(refused.clone(), "http://ch:8123"), refused);
    }

    #[test]
    fn reads_the_error_code_of_old_and_current_servers() {
        assert_eq!(
            clickhouse_error_code(
                "Code: 192, e.displayText() = DB::Exception: Unknown user nobody, e.what() = \
                 DB::Exception"
            ),
            Some(192)
        );
        assert_eq!(
            clickhouse_error_code("Code: 516. DB::Exception: default: Authentication failed"),
            Some(516)
        );
        assert_eq!(clickhouse_error_code("no code here"), None);
        assert!(is_authentication_code(516) && is_authentication_code(193));
        assert!(!is_authentication_code(60));
    }
}
