//! The pipeline's ClickHouse table: checks what the server supports, creates the database and
//! table when missing, adds spec columns the table lacks, and reports any other difference
//! (columns, engine, `PARTITION BY`, `ORDER BY`, `TTL`) as schema drift instead of changing it.
//!
//! Nothing is ever dropped, retyped or rebuilt here: a column's data outlives a spec edit. The one
//! destructive statement, [`drop_table`], runs only on pipeline deletion with policy `Delete`.
//!
//! On a cluster (`spec.clickhouse.cluster`) the operator talks to the first replica of `url` and
//! `cluster.replicaUrls` that answers, every statement runs `ON CLUSTER` (so a replica that is down
//! runs it from the distributed DDL queue when it returns), and the drift check reads every
//! replica the servers' `system.clusters` lists (through `remote()`, which 18.16 has; it lacks
//! `clusterAllReplicas`), naming the replica that differs.

use clickhouse::Client;
use signal_model::ClickHouseSpec;
use signal_model::ServerVersion;
use signal_model::credentials::UserPassword;
use signal_model::ddl;
use signal_model::tls::TlsMaterial;

use super::connections::{Connections, Session};
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

/// How long a table that a full check found as its spec says is trusted by reconciles that may
/// ([`TableCheck::TrustRecent`]): they only ask whether it still exists (`EXISTS TABLE`, one query
/// instead of four: what a fleet's resyncs cost ClickHouse and the operator), so a column changed
/// by hand outside the operator is reported within this interval. A spec change, a missing table
/// or a server that does not answer gets the full check at once.
pub const TABLE_VERIFY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// How much of a recent full check a reconcile may take on trust.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableCheck {
    /// Ask the server every time (a pipeline whose workers report a problem: a dropped table or
    /// a ClickHouse they cannot reach shows there first).
    Full,
    /// Take a full check younger than [`TABLE_VERIFY_INTERVAL`] for the same spec on trust once
    /// the server says the table still exists.
    TrustRecent,
}

/// What a full check of a table found, when it found the table as the spec says.
#[derive(Clone, Debug)]
pub struct VerifiedTable {
    /// The spec it was checked against (a fingerprint of `spec.clickhouse`).
    spec: u64,
    /// The replica URL that answered.
    url: String,
    outcome: TableOutcome,
}

/// Brings the table in line with `spec` as far as adding things allows, with clients of its own.
pub async fn reconcile_table(
    spec: &ClickHouseSpec,
    auth: &UserPassword,
    tls: Option<&TlsMaterial>,
) -> TableOutcome {
    reconcile_table_with(
        &Connections::per_call().session(""),
        spec,
        auth,
        tls,
        TableCheck::Full,
    )
    .await
}

/// Brings the table in line with `spec` as far as adding things allows, with `session`'s clients.
pub async fn reconcile_table_with(
    session: &Session<'_>,
    spec: &ClickHouseSpec,
    auth: &UserPassword,
    tls: Option<&TlsMaterial>,
    check: TableCheck,
) -> TableOutcome {
    bounded(
        format!(
            "reconciling table {}",
            ddl::qualified_table(&spec.database, &spec.table)
        ),
        PART_TIMEOUT,
        async {
            let key = clauses_key(&spec.url, &spec.database, &spec.table);
            let fingerprint = spec_fingerprint(spec);
            if check == TableCheck::TrustRecent
                && let Some(outcome) =
                    still_verified(session, &key, spec, fingerprint, auth, tls).await
            {
                return Ok(outcome);
            }
            let (client, url, version) = connect_reachable(session, spec, auth, tls).await?;
            let outcome = apply_table(session, &client, &url, version, spec, auth, tls).await?;
            let as_spec_says = outcome.report.ready
                && outcome.report.changes.is_empty()
                && outcome.schema_drift.is_none();
            session.remember_verified_table(
                &key,
                as_spec_says.then(|| VerifiedTable {
                    spec: fingerprint,
                    url,
                    outcome: outcome.clone(),
                }),
            );
            Ok(outcome)
        },
    )
    .await
    .unwrap_or_else(|error| TableOutcome {
        report: PartReport::from_error(&name_the_server(error, &spec.url)),
        schema_drift: None,
    })
}

/// The last full check's outcome, when it found the table (pool key `key`) as `spec` (with
/// `fingerprint`) says less than [`TABLE_VERIFY_INTERVAL`] ago and the replica that answered then
/// says the table still exists.
async fn still_verified(
    session: &Session<'_>,
    key: &str,
    spec: &ClickHouseSpec,
    fingerprint: u64,
    auth: &UserPassword,
    tls: Option<&TlsMaterial>,
) -> Option<TableOutcome> {
    let verified = session
        .verified_table(key, TABLE_VERIFY_INTERVAL)
        .filter(|verified| verified.spec == fingerprint)?;
    let client = session.clickhouse(&verified.url, auth, tls).ok()?;
    match table_exists(&client, &verified.url, &spec.database, &spec.table).await {
        Ok(true) => Some(verified.outcome),
        // Gone, or the server did not answer: the full check says which.
        _ => None,
    }
}

fn spec_fingerprint(spec: &ClickHouseSpec) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(spec)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// The first of the spec's replica URLs (`url`, then `cluster.replicaUrls`) whose server answers,
/// with its release. When none answers, the error of the first.
async fn connect_reachable(
    session: &Session<'_>,
    spec: &ClickHouseSpec,
    auth: &UserPassword,
    tls: Option<&TlsMaterial>,
) -> Result<(Client, String, ServerVersion), DataPlaneError> {
    let mut first_error = None;
    for url in spec.urls() {
        // Unusable TLS material is a [`DataPlaneError::Tls`], whichever replica it is for.
        let client = session.clickhouse(url, auth, tls)?;
        match server_version(&client, url).await {
            Ok(version) => return Ok((client, url.to_string(), version)),
            Err(DataPlaneError::ClickHouseUnreachable { .. })
                if let Some(tls) = tls
                    && let Some(failure) =
                        signal_clients::connect::clickhouse_tls_probe(url, tls).await =>
            {
                // The request lost the server's TLS alert (see `clickhouse_tls_probe`).
                return Err(DataPlaneError::Tls(failure.to_string()));
            }
            Err(
                error @ (DataPlaneError::ClickHouseUnreachable { .. }
                | DataPlaneError::TimedOut { .. }),
            ) => {
                tracing::debug!(%url, %error, "ClickHouse replica unreachable; trying the next");
                first_error.get_or_insert(error);
            }
            Err(other) => return Err(other),
        }
    }
    Err(first_error.unwrap_or_else(|| DataPlaneError::InvalidSpec("no ClickHouse URL".into())))
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
    session: &Session<'_>,
    client: &Client,
    url: &str,
    version: ServerVersion,
    spec: &ClickHouseSpec,
    auth: &UserPassword,
    tls: Option<&TlsMaterial>,
) -> Result<TableOutcome, DataPlaneError> {
    let name = format!("{}.{}", spec.database, spec.table);
    for column in &spec.columns {
        ddl::column_type(column).map_err(|error| DataPlaneError::InvalidSpec(error.to_string()))?;
    }
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
    let cluster = spec.cluster_name();
    // Statements some replica has not run yet (it runs them from the queue when it returns).
    let mut queued = Vec::new();

    let mut changes = Vec::new();
    if !database_exists(client, url, &spec.database).await? {
        let sql = ddl::create_database_sql(&spec.database, cluster);
        execute_ddl(client, url, &sql, &mut queued).await?;
        changes.push(format!("created database {}", spec.database));
    }
    let live_clauses =
        live_table_clauses(session, client, url, &spec.database, &spec.table).await?;
    let created = live_clauses.is_none();
    if created {
        let sql = ddl::create_table_sql(spec, version)
            .map_err(|error| DataPlaneError::InvalidSpec(error.to_string()))?;
        execute_ddl(client, url, &sql, &mut queued).await?;
        changes.push(format!("created table {name}"));
        // The table has the spec's clauses as the server prints them: remembered, so the next
        // reconciles need not read them back (see `live_table_clauses`).
        if let Ok(printed) = printed_spec_clauses(client, spec, version).await {
            session.remember_clauses(
                &clauses_key(url, &spec.database, &spec.table),
                Some(printed),
            );
        }
    }
    if let Some(distributed) = spec.cluster.as_ref().and_then(|c| c.distributed.as_ref()) {
        let exists = table_clauses(client, url, &spec.database, &distributed.table)
            .await?
            .is_some();
        if !exists && let Some(sql) = ddl::create_distributed_table_sql(spec) {
            let sql = sql.map_err(|error| DataPlaneError::InvalidSpec(error.to_string()))?;
            execute_ddl(client, url, &sql, &mut queued).await?;
            changes.push(format!(
                "created Distributed table {}.{}",
                spec.database, distributed.table
            ));
        }
    }

    let live = live_columns(client, url, &spec.database, &spec.table).await?;
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
        let sql = ddl::add_column_sql(&spec.database, &spec.table, column, version, cluster)
            .map_err(|error| DataPlaneError::InvalidSpec(error.to_string()))?;
        execute_ddl(client, url, &sql, &mut queued).await?;
        changes.push(format!(
            "added column {} {} to {name}",
            column.name,
            ddl::column_type(column)
                .map(|t| t.to_string())
                .unwrap_or_else(|_| column.type_name.clone())
        ));
    }

    if let Some(distributed) = spec.cluster.as_ref().and_then(|c| c.distributed.as_ref()) {
        // Servers refuse `ALTER … ON CLUSTER` of a table that is not replicated (the Distributed
        // one) on a cluster that replicates internally, so it is altered on each replica URL of
        // the spec by itself.
        for replica_url in spec.urls() {
            let replica = session.clickhouse(replica_url, auth, tls)?;
            let live = match live_columns(&replica, replica_url, &spec.database, &distributed.table)
                .await
            {
                Ok(live) => live,
                Err(error) => {
                    queued.push(format!(
                        "columns of {}.{} on {replica_url} ({error})",
                        spec.database, distributed.table
                    ));
                    continue;
                }
            };
            for column in diff_schema(&spec.columns, &live).missing {
                let sql =
                    ddl::add_column_sql(&spec.database, &distributed.table, &column, version, None)
                        .map_err(|error| DataPlaneError::InvalidSpec(error.to_string()))?;
                execute(&replica, replica_url, &sql).await?;
                changes.push(format!(
                    "added column {} to {}.{} on {replica_url}",
                    column.name, spec.database, distributed.table
                ));
            }
        }
    }

    let mut drift_parts: Vec<String> = diff.drift_message().into_iter().collect();
    if let Some(cluster) = cluster {
        let own = diff.drift_message();
        let replicas = replica_drift(client, url, spec, cluster, auth, version)
            .await?
            .into_iter()
            .map(|(replica, mut message)| {
                // Clauses that could not be compared here were not compared there either.
                if let (Some(note), Some(own_message)) = (&diff.clauses_not_compared, &own)
                    && message.is_none()
                    && own_message.contains(note.as_str())
                {
                    message = own.clone();
                }
                (replica, message)
            });
        drift_parts.extend(
            replicas
                .into_iter()
                .filter(|(_, message)| *message != own)
                .map(|(replica, message)| {
                    format!(
                        "replica {replica}: {}",
                        message.unwrap_or_else(|| "matches the spec".to_string())
                    )
                }),
        );
    }
    let schema_drift = (!drift_parts.is_empty()).then(|| drift_parts.join("; "));
    if !queued.is_empty() {
        changes.push(format!(
            "left to replicas that did not answer in time, which run it when they return: {}",
            queued.join("; ")
        ));
    }

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

/// The table's engine and keys as [`table_clauses`] reads them, remembered by a pooled `session`
/// for [`LIVE_CLAUSES_TTL`]: ClickHouse 18.16 answers `system.tables` by printing the `CREATE` of
/// every table in the database, so a fleet of pipelines sharing one database would make each
/// reconcile cost as much as the fleet is large. Existence is checked on every reconcile
/// (`EXISTS TABLE`, one table); within the TTL the clauses are not read again, so a table
/// recreated by hand with other clauses is reported as drift within the TTL.
async fn live_table_clauses(
    session: &Session<'_>,
    client: &Client,
    url: &str,
    database: &str,
    table: &str,
) -> Result<Option<PrintedClauses>, DataPlaneError> {
    let key = clauses_key(url, database, table);
    if !table_exists(client, url, database, table).await? {
        session.remember_clauses(&key, None);
        return Ok(None);
    }
    if let Some(clauses) = session.remembered_clauses(&key, LIVE_CLAUSES_TTL) {
        return Ok(Some(clauses));
    }
    let clauses = table_clauses(client, url, database, table).await?;
    session.remember_clauses(&key, clauses.clone());
    Ok(clauses)
}

fn clauses_key(url: &str, database: &str, table: &str) -> String {
    format!("{url} {database}.{table}")
}

/// How long [`live_table_clauses`] trusts what it read.
pub const LIVE_CLAUSES_TTL: std::time::Duration = std::time::Duration::from_secs(1800);

async fn table_exists(
    client: &Client,
    url: &str,
    database: &str,
    table: &str,
) -> Result<bool, DataPlaneError> {
    let sql = format!("EXISTS TABLE {}", ddl::qualified_table(database, table));
    let exists = bounded("looking up the table", REQUEST_TIMEOUT, async {
        client
            .query(&sql)
            .fetch_one::<u8>()
            .await
            .map_err(|error| query_error(url, &sql, error))
    })
    .await?;
    Ok(exists == 1)
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

/// Drops the table, and the Distributed table over it, `ON CLUSTER` on a cluster (a missing table
/// is fine). The database is kept: other tables may live in it.
pub async fn drop_table(
    spec: &ClickHouseSpec,
    auth: &UserPassword,
    tls: Option<&TlsMaterial>,
) -> Result<(), DataPlaneError> {
    let (client, url, _) =
        connect_reachable(&Connections::per_call().session(""), spec, auth, tls).await?;
    let cluster = spec.cluster_name();
    let mut queued = Vec::new();
    if let Some(distributed) = spec.cluster.as_ref().and_then(|c| c.distributed.as_ref()) {
        let sql = ddl::drop_table_sql(&spec.database, &distributed.table, cluster);
        execute_ddl(&client, &url, &sql, &mut queued).await?;
    }
    let sql = ddl::drop_table_sql(&spec.database, &spec.table, cluster);
    execute_ddl(&client, &url, &sql, &mut queued).await
}

/// How long an `ON CLUSTER` statement waits for every replica: less than [`REQUEST_TIMEOUT`], so
/// the server's own answer, that some replica has not run it yet, comes first.
const DISTRIBUTED_DDL_TIMEOUT_SECONDS: u64 = REQUEST_TIMEOUT.as_secs().saturating_sub(2);

/// ClickHouse's TIMEOUT_EXCEEDED for an `ON CLUSTER` statement that some replica has not run within
/// `distributed_ddl_task_timeout`; the statement stays in the queue for it.
const DDL_TASK_TIMEOUT_CODE: u32 = 159;

/// Runs one statement built from the spec. An `ON CLUSTER` one that a replica has not run within
/// [`DISTRIBUTED_DDL_TIMEOUT_SECONDS`] (down or slow: it runs it from the queue when it returns) is
/// noted in `queued`, not failed: the replicas that answered have it, and the drift check names a
/// replica that is still behind.
async fn execute_ddl(
    client: &Client,
    url: &str,
    sql: &str,
    queued: &mut Vec<String>,
) -> Result<(), DataPlaneError> {
    if !sql.contains(" ON CLUSTER ") {
        return execute(client, url, sql).await;
    }
    let client = client.clone().with_setting(
        "distributed_ddl_task_timeout",
        DISTRIBUTED_DDL_TIMEOUT_SECONDS.to_string(),
    );
    match execute(&client, url, sql).await {
        Err(DataPlaneError::ClickHouseRefused { message, .. })
            if clickhouse_error_code(&message) == Some(DDL_TASK_TIMEOUT_CODE) =>
        {
            tracing::warn!(%url, %sql, %message, "a replica has not run the statement yet");
            queued.push(sql.lines().next().unwrap_or(sql).to_string());
            Ok(())
        }
        other => other,
    }
}

/// One replica of the cluster as `system.clusters` lists it: `host:port` (native protocol).
type ReplicaAddress = String;

/// Each replica's drift (as [`super::table_schema_diff::SchemaDiff::drift_message`] words it,
/// `None` when it matches the spec), read through `remote()` from the server at `url`. A replica
/// that does not answer is reported as such, not as drift of its table.
async fn replica_drift(
    client: &Client,
    url: &str,
    spec: &ClickHouseSpec,
    cluster: &str,
    auth: &UserPassword,
    version: ServerVersion,
) -> Result<Vec<(ReplicaAddress, Option<String>)>, DataPlaneError> {
    const REPLICAS_SQL: &str = "SELECT host_name, port FROM system.clusters WHERE cluster = ? ORDER BY shard_num, replica_num";
    let replicas = bounded("listing the cluster's replicas", REQUEST_TIMEOUT, async {
        client
            .query(REPLICAS_SQL)
            .bind(cluster)
            .fetch_all::<(String, u16)>()
            .await
            .map_err(|error| query_error(url, REPLICAS_SQL, error))
    })
    .await?;
    if replicas.is_empty() {
        return Err(DataPlaneError::InvalidSpec(format!(
            "spec.clickhouse.cluster.name: the server at {url} has no cluster `{cluster}` in its \
             remote_servers"
        )));
    }
    let spec_printed = printed_spec_clauses(client, spec, version).await.ok();
    let (user, password) = (
        auth.user.clone().unwrap_or_else(|| "default".to_string()),
        auth.password.clone().unwrap_or_default(),
    );
    let mut found = Vec::with_capacity(replicas.len());
    for (host, port) in replicas {
        let address = format!("{host}:{port}");
        let read = async {
            let columns_sql = "SELECT name, type FROM remote(?, system.columns, ?, ?) \
                               WHERE database = ? AND table = ?";
            let columns = client
                .query(columns_sql)
                .bind(address.as_str())
                .bind(user.as_str())
                .bind(password.as_str())
                .bind(spec.database.as_str())
                .bind(spec.table.as_str())
                .fetch_all::<(String, String)>()
                .await?;
            let tables_sql = "SELECT engine_full, partition_key, sorting_key FROM \
                              remote(?, system.tables, ?, ?) WHERE database = ? AND name = ?";
            let clauses = client
                .query(tables_sql)
                .bind(address.as_str())
                .bind(user.as_str())
                .bind(password.as_str())
                .bind(spec.database.as_str())
                .bind(spec.table.as_str())
                .fetch_all::<(String, String, String)>()
                .await?;
            Ok::<_, clickhouse::error::Error>((columns, clauses))
        };
        let message = match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
            Ok(Ok((_, clauses))) if clauses.is_empty() => {
                Some(format!("table {}.{} is missing", spec.database, spec.table))
            }
            Ok(Ok((columns, clauses))) => {
                let live: Vec<LiveColumn> = columns
                    .into_iter()
                    .map(|(name, type_text)| LiveColumn { name, type_text })
                    .collect();
                let mut diff = diff_schema(&spec.columns, &live);
                if let (Some(spec_printed), Some((engine_full, partition_key, sorting_key))) =
                    (&spec_printed, clauses.into_iter().next())
                {
                    let live_clauses = PrintedClauses {
                        engine_full,
                        partition_key,
                        sorting_key,
                    };
                    diff.clause_mismatches = diff_clauses(spec, &live_clauses, spec_printed);
                }
                let missing = diff
                    .missing
                    .iter()
                    .map(|column| format!("column {} is missing", column.name));
                let parts: Vec<String> = missing.chain(diff.drift_message()).collect();
                (!parts.is_empty()).then(|| parts.join("; "))
            }
            Ok(Err(error)) => Some(format!(
                "not checked, it did not answer: {}",
                with_causes(&error)
            )),
            Err(_) => Some(format!(
                "not checked, it did not answer within {} s",
                REQUEST_TIMEOUT.as_secs()
            )),
        };
        found.push((address, message));
    }
    Ok(found)
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
