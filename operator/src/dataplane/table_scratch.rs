//! The spec's table clauses as the server itself prints them: the spec's table is created empty
//! under a unique name in a scratch database, read back from `system.tables` and dropped.
//!
//! This is what lets [`super::table_clause_diff`] compare like with like without knowing how any
//! server release rewrites expressions. The scratch database ([`SCRATCH_DATABASE`]) is the only
//! place besides the pipelines' own databases where the operator creates anything, so its
//! ClickHouse user needs CREATE DATABASE / CREATE TABLE / DROP TABLE there (on 18.x: the database
//! in the user's `allow_databases`, if that list is set).
//!
//! Cost: one CREATE, one SELECT and one DROP of an empty table, a few milliseconds, and only for a
//! table that already exists. The printing depends only on the server's release and the DDL, so it
//! is remembered per (server URL, release, DDL) for the life of the process: an unchanged spec
//! costs nothing on later reconciles.
//!
//! Clean-up: the scratch table is dropped on success and on error; if the reconcile is cancelled
//! (its timeout) while the table exists, the drop runs in the background; and scratch tables a
//! killed process left behind are dropped, once they are old, the next time a printing is made.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use clickhouse::Client;
use signal_model::{ClickHouseSpec, ServerVersion, ddl};

use super::table::{execute, table_clauses};
use super::table_clause_diff::PrintedClauses;
use super::{DataPlaneError, REQUEST_TIMEOUT};

/// Where scratch tables are created. Nothing else lives there.
pub const SCRATCH_DATABASE: &str = "signal_operator_scratch";

/// Scratch table names start with this; leftovers are found by it.
const SCRATCH_PREFIX: &str = "clauses_";

/// A scratch table older than this was left by a process that died: no printing takes that long.
const LEFTOVER_AGE_SECONDS: u32 = 600;

/// Printings kept at most; the cache is emptied when full (specs rarely change).
const CACHE_CAPACITY: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    url: String,
    version: ServerVersion,
    /// The scratch DDL with a fixed table name: the spec's columns and clauses.
    ddl: String,
}

static PRINTED: LazyLock<Mutex<HashMap<CacheKey, PrintedClauses>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// How the server at `spec.url` (release `version`) prints the clauses of a table created from
/// `spec`. An error means the server refused the scratch table (the spec's clauses, or the
/// operator's rights in [`SCRATCH_DATABASE`]) or could not be reached.
pub async fn printed_spec_clauses(
    client: &Client,
    spec: &ClickHouseSpec,
    version: ServerVersion,
) -> Result<PrintedClauses, DataPlaneError> {
    let key = CacheKey {
        url: spec.url.clone(),
        version,
        ddl: scratch_table_sql(spec, "clauses", version)?,
    };
    if let Some(hit) = lock_cache().get(&key) {
        return Ok(hit.clone());
    }

    execute(
        client,
        &spec.url,
        &ddl::create_database_sql(SCRATCH_DATABASE, None),
    )
    .await?;
    drop_leftovers(client, &spec.url).await;

    let name = unique_scratch_name();
    let create = scratch_table_sql(spec, &name, version)?;
    // Armed before the CREATE: a CREATE that times out here may still complete on the server.
    let mut scratch = ScratchTable::new(client, &spec.url, &name);
    let printed = async {
        execute(client, &spec.url, &create).await?;
        table_clauses(client, &spec.url, SCRATCH_DATABASE, &name)
            .await?
            .ok_or_else(|| DataPlaneError::ClickHouseRefused {
                statement: create.clone(),
                message: "the scratch table is missing from system.tables right after its \
                          creation"
                    .to_string(),
            })
    }
    .await;
    scratch.drop_now().await;
    let printed = printed?;

    let mut cache = lock_cache();
    if cache.len() >= CACHE_CAPACITY {
        cache.clear();
    }
    cache.insert(key, printed.clone());
    Ok(printed)
}

fn lock_cache() -> std::sync::MutexGuard<'static, HashMap<CacheKey, PrintedClauses>> {
    // The map holds plain values: a panic elsewhere cannot leave it half-updated.
    PRINTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The spec's `CREATE TABLE`, aimed at `SCRATCH_DATABASE.name` on this server alone and without
/// replication: a scratch table must not run on the cluster nor register in ZooKeeper (the clause
/// diff compares replication apart, see [`super::table_clause_diff`]).
fn scratch_table_sql(
    spec: &ClickHouseSpec,
    name: &str,
    version: ServerVersion,
) -> Result<String, DataPlaneError> {
    let scratch = ClickHouseSpec {
        database: SCRATCH_DATABASE.to_string(),
        table: name.to_string(),
        engine: ddl::unreplicated_engine(&spec.engine),
        cluster: None,
        ..spec.clone()
    };
    ddl::create_table_sql(&scratch, version)
        .map_err(|error| DataPlaneError::InvalidSpec(error.to_string()))
}

/// `clauses_<pid>_<nanoseconds>_<counter>`: unique across concurrent reconciles and operators.
fn unique_scratch_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!(
        "{SCRATCH_PREFIX}{}_{nanos}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Drops scratch tables that outlived any printing. Best effort: a failure here is logged and
/// retried on the next printing, and never hides the printing's own result.
async fn drop_leftovers(client: &Client, url: &str) {
    let sql = format!(
        "SELECT name FROM system.tables WHERE database = ? AND name LIKE '{SCRATCH_PREFIX}%' \
         AND metadata_modification_time < now() - {LEFTOVER_AGE_SECONDS}"
    );
    let names = tokio::time::timeout(
        REQUEST_TIMEOUT,
        client
            .query(&sql)
            .bind(SCRATCH_DATABASE)
            .fetch_all::<String>(),
    )
    .await;
    let names = match names {
        Ok(Ok(names)) => names,
        Ok(Err(error)) => {
            tracing::warn!(%url, %error, "could not list leftover scratch tables");
            return;
        }
        Err(_) => {
            tracing::warn!(%url, "listing leftover scratch tables timed out");
            return;
        }
    };
    for name in names {
        if let Err(error) = execute(
            client,
            url,
            &ddl::drop_table_sql(SCRATCH_DATABASE, &name, None),
        )
        .await
        {
            tracing::warn!(%url, %name, %error, "could not drop a leftover scratch table");
        }
    }
}

/// A scratch table that is dropped whichever way its printing ends.
struct ScratchTable {
    client: Client,
    url: String,
    drop_sql: String,
    dropped: bool,
}

impl ScratchTable {
    fn new(client: &Client, url: &str, name: &str) -> Self {
        Self {
            client: client.clone(),
            url: url.to_string(),
            drop_sql: ddl::drop_table_sql(SCRATCH_DATABASE, name, None),
            dropped: false,
        }
    }

    /// Drops the table now. A failure is logged; the table is then left for [`drop_leftovers`].
    async fn drop_now(&mut self) {
        self.dropped = true;
        if let Err(error) = execute(&self.client, &self.url, &self.drop_sql).await {
            tracing::warn!(url = %self.url, %error, "could not drop a scratch table");
        }
    }
}

impl Drop for ScratchTable {
    /// Reached without [`ScratchTable::drop_now`] only when the printing was cancelled.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        let url = std::mem::take(&mut self.url);
        let drop_sql = std::mem::take(&mut self.drop_sql);
        runtime.spawn(async move {
            if let Err(error) = execute(&client, &url, &drop_sql).await {
                tracing::warn!(%url, %error, "could not drop a scratch table");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names_are_unique_and_found_by_their_prefix() {
        let first = unique_scratch_name();
        let second = unique_scratch_name();
        assert_ne!(first, second);
        assert!(first.starts_with(SCRATCH_PREFIX), "{first}");
    }
}
