//! Writing a sealed batch into ClickHouse: one RowBinary INSERT per batch, retried with backoff
//! until the server confirms it; nothing is acknowledged before ClickHouse has confirmed.
//!
//! Insert errors are classified ([`crate::insert_error`]): transient ones are retried, permanent
//! ones are reported (`InsertRejected`) and retried slowly until a person fixes the cause. The
//! live table's column types are compared with the manifest's at start and after any insert
//! error; a mismatch (`SchemaMismatch`) blocks writing until it is resolved.
//!
//! A retry resends the very same block: the sealed batch's RowBinary bytes (same rows, same
//! order, one INSERT, which the server cuts into the same blocks and parts) and, where it knows
//! it (22.2+), the same `insert_deduplication_token`. A replicated table stores a block once per
//! checksum (or token) within `replicated_deduplication_window`, so a batch whose first attempt
//! was stored but whose answer was lost is not stored twice, on whichever replica the retry
//! lands: the deduplication log lives in ZooKeeper, shared by the shard's replicas.
//!
//! On a cluster the sink knows every replica URL of the spec (`url`, then
//! `cluster.replicaUrls`) and stays on one while it answers; an insert that fails to reach it
//! (connection refused, no answer) is retried on the next. It writes to the local replicated
//! table by default, or to the Distributed table (`cluster.writeTo: distributed`) with
//! `insert_distributed_sync=1`, so an answer still means the rows reached their shards.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use signal_clients::clickhouse::{VersionError, server_version};
use signal_clients::connect::clickhouse_tls_probe;
use signal_clients::retry::Backoff;
use signal_model::credentials::PipelineCredentials;
use signal_model::live_schema::wire_mismatches;
use signal_model::tls::TlsMaterial;
use signal_model::worker_health::HealthReason;
use signal_model::{ClickHouseSpec, ColumnSpec, SignalPipelineSpec};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::batch::SealedBatch;
use crate::dead_letter::{DeadLetter, MAX_DELIVERIES};
use crate::health::Health;
use crate::insert_error::{InsertFailure, classify};
use crate::metrics::Metrics;

/// How long a shutting-down worker keeps retrying a batch before leaving it to redelivery.
const SHUTDOWN_RETRY_BUDGET: Duration = Duration::from_secs(15);

/// Why a batch was not stored.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("gave up on batch {first}..={last} during shutdown: {last_error}")]
    ShutdownWhileFailing {
        first: u64,
        last: u64,
        last_error: String,
    },
}

/// The table and the clients that write to it, one per replica URL.
pub struct ClickHouseSink {
    /// `(url, client)` of each replica, the spec's `url` first.
    replicas: Vec<(String, clickhouse::Client)>,
    tls: Option<TlsMaterial>,
    /// The index in `replicas` of the one in use.
    current: AtomicUsize,
    /// Extra settings of every insert (`insert_distributed_sync` for a Distributed table).
    insert_settings: Vec<(&'static str, &'static str)>,
    database: String,
    table: String,
    insert_sql: String,
    /// The manifest's columns, compared with the live table's before writing.
    columns: Vec<ColumnSpec>,
    stream: String,
    stream_created_unix_nanos: i128,
    deduplication_tokens: AtomicBool,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    dead_letters: mpsc::Sender<Vec<DeadLetter>>,
    /// Last insert or probe reached the server; read by `/readyz`.
    pub healthy: Arc<AtomicBool>,
}

/// Where a sink writes and what it tells about its rows.
pub struct SinkTarget<'a> {
    pub database: &'a str,
    /// The table inserted into: the local one, or the Distributed one over it.
    pub table: &'a str,
    /// Whether `table` is a Distributed table (inserted into synchronously).
    pub distributed: bool,
    pub columns: &'a [ColumnSpec],
    pub column_list: &'a str,
    pub stream: &'a str,
    /// The stream's creation time, its identity in deduplication tokens.
    pub stream_created_unix_nanos: i128,
}

impl<'a> SinkTarget<'a> {
    /// Where a pipeline's rows go: its write table (local, or the Distributed one over it), in
    /// `column_list` order.
    pub fn of_pipeline(
        spec: &'a SignalPipelineSpec,
        column_list: &'a str,
        stream_created_unix_nanos: i128,
    ) -> Self {
        Self {
            database: &spec.clickhouse.database,
            table: spec.clickhouse.write_table(),
            distributed: spec.clickhouse.write_table() != spec.clickhouse.table,
            columns: &spec.clickhouse.columns,
            column_list,
            stream: &spec.stream.name,
            stream_created_unix_nanos,
        }
    }
}

/// The clients a sink writes through, and the TLS material they were made with.
pub struct Replicas {
    /// `(url, client)` of each replica, in the order they are tried.
    pub clients: Vec<(String, clickhouse::Client)>,
    /// For finding the TLS cause a failed request lost ([`clickhouse_tls_probe`]).
    pub tls: Option<TlsMaterial>,
}

/// A client for each replica URL of `clickhouse` (`url`, then `cluster.replicaUrls`), in order.
pub fn replica_clients(
    clickhouse: &ClickHouseSpec,
    credentials: &PipelineCredentials,
) -> Result<Replicas, signal_clients::connect::ConnectError> {
    let tls = credentials.tls.clickhouse.clone();
    let clients = clickhouse
        .urls()
        .into_iter()
        .map(|url| {
            let client =
                signal_clients::connect::clickhouse(url, &credentials.clickhouse, tls.as_ref())?;
            Ok((url.to_string(), client))
        })
        .collect::<Result<_, signal_clients::connect::ConnectError>>()?;
    Ok(Replicas { clients, tls })
}

impl ClickHouseSink {
    /// A sink writing through `replicas` (at least one; the first is used first).
    pub fn new(
        replicas: Replicas,
        target: SinkTarget<'_>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        dead_letters: mpsc::Sender<Vec<DeadLetter>>,
        healthy: Arc<AtomicBool>,
    ) -> Self {
        let SinkTarget {
            database,
            table,
            distributed,
            columns,
            column_list,
            stream,
            stream_created_unix_nanos,
        } = target;
        Self {
            replicas: replicas.clients,
            tls: replicas.tls,
            current: AtomicUsize::new(0),
            // Synchronous: the answer then means the rows reached a replica of their shard, not
            // just a queue on the server that was asked.
            insert_settings: if distributed {
                vec![("insert_distributed_sync", "1")]
            } else {
                Vec::new()
            },
            database: database.to_string(),
            table: table.to_string(),
            insert_sql: format!(
                "INSERT INTO `{database}`.`{table}` ({column_list}) FORMAT RowBinary"
            ),
            columns: columns.to_vec(),
            stream: stream.to_string(),
            stream_created_unix_nanos,
            deduplication_tokens: AtomicBool::new(false),
            metrics,
            health,
            dead_letters,
            healthy,
        }
    }

    /// The client of the replica in use.
    fn client(&self) -> &clickhouse::Client {
        &self.replica().1
    }

    /// `(url, client)` of the replica in use.
    fn replica(&self) -> &(String, clickhouse::Client) {
        &self.replicas[self.current.load(Ordering::Relaxed) % self.replicas.len()]
    }

    /// Moves on to the next replica URL (after one did not answer); returns its URL, or `None`
    /// when there is only one.
    fn fail_over(&self) -> Option<&str> {
        if self.replicas.len() < 2 {
            return None;
        }
        let next = (self.current.fetch_add(1, Ordering::Relaxed) + 1) % self.replicas.len();
        Some(self.replicas[next].0.as_str())
    }

    /// Checks the server once: reachable, whether it honours deduplication tokens, and whether
    /// the live table's columns match the manifest's. A replica that does not answer hands over
    /// to the next one for the following probe.
    pub async fn probe(&self) -> Result<(), String> {
        match server_version(self.client()).await {
            Ok(version) => {
                let tokens = version.supports_insert_deduplication_token();
                self.deduplication_tokens.store(tokens, Ordering::Relaxed);
                self.healthy.store(true, Ordering::Relaxed);
                tracing::info!(%version, deduplication_tokens = tokens, "ClickHouse reachable");
                self.check_schema().await;
                Ok(())
            }
            Err(error) => {
                self.healthy.store(false, Ordering::Relaxed);
                let message = match error {
                    VersionError::Query(error) => self.describe_unanswered(&error).await,
                    other => other.to_string(),
                };
                if let Some(next) = self.fail_over() {
                    tracing::warn!(next = %next, "ClickHouse replica unreachable; trying the next");
                }
                Err(message)
            }
        }
    }

    /// Compares the live table's column types with the manifest's and records the outcome
    /// (`SchemaMismatch`); returns true when the worker may write. An unanswered query changes
    /// nothing.
    async fn check_schema(&self) -> bool {
        const SQL: &str = "SELECT name, type FROM system.columns WHERE database = ? AND table = ?";
        let live = match self
            .client()
            .query(SQL)
            .bind(self.database.as_str())
            .bind(self.table.as_str())
            .fetch_all::<(String, String)>()
            .await
        {
            Ok(live) => live,
            Err(error) => {
                tracing::debug!(%error, "cannot read the table's columns");
                return !self.health.has(HealthReason::SchemaMismatch);
            }
        };
        let mismatches = wire_mismatches(&self.columns, &live);
        if mismatches.is_empty() || live.is_empty() {
            // No columns at all: the table is missing, which the insert reports as InsertRejected.
            self.health
                .clear(HealthReason::SchemaMismatch, &self.metrics);
            return true;
        }
        let message = format!(
            "table {}.{} does not match the manifest, refusing to write: {}",
            self.database,
            self.table,
            mismatches
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        );
        self.health
            .set(HealthReason::SchemaMismatch, &message, &self.metrics);
        false
    }

    /// An insert error in one line; a failed TLS handshake says which server and why.
    fn describe(&self, error: &clickhouse::error::Error) -> String {
        match signal_clients::connect::clickhouse_tls_failure(&self.replica().0, error) {
            Some(tls) => tls.to_string(),
            None => error.to_string(),
        }
    }

    /// [`Self::describe`] for a request that got no answer, with the TLS alert that hyper may
    /// have lost found by a connection of our own ([`clickhouse_tls_probe`]).
    async fn describe_unanswered(&self, error: &clickhouse::error::Error) -> String {
        let url = &self.replica().0;
        if let Some(failure) = signal_clients::connect::clickhouse_tls_failure(url, error) {
            return failure.to_string();
        }
        if matches!(error, clickhouse::error::Error::Network(_))
            && let Some(tls) = &self.tls
            && let Some(failure) = clickhouse_tls_probe(url, tls).await
        {
            return failure.to_string();
        }
        error.to_string()
    }

    async fn insert_once(&self, batch: &SealedBatch) -> Result<(), clickhouse::error::Error> {
        let mut insert = self
            .client()
            .insert_formatted_with(self.insert_sql.clone())
            .with_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(60)));
        for (name, value) in &self.insert_settings {
            insert = insert.with_setting(*name, *value);
        }
        if self.deduplication_tokens.load(Ordering::Relaxed) {
            insert = insert.with_setting(
                "insert_deduplication_token",
                batch.deduplication_token(&self.stream, self.stream_created_unix_nanos),
            );
        }
        insert.send(batch.rows.clone()).await?;
        insert.end().await
    }

    /// Inserts the batch, retrying until it is stored. Its messages are kept alive meanwhile
    /// ([`crate::held_messages`]). A permanent refusal or a schema mismatch blocks here (the
    /// puller then stops at one batch) and is reported until it clears. After an insert error,
    /// rows on their last allowed delivery are dead-lettered (`max_deliveries`) and the rest
    /// retried. After `shutdown` it keeps trying for a short budget, then gives up (the messages
    /// stay unacknowledged and are redelivered).
    pub async fn store(
        &self,
        batch: &mut SealedBatch,
        shutdown: &CancellationToken,
    ) -> Result<(), SinkError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut shutdown_since: Option<Instant> = None;
        loop {
            let last_error =
                if self.health.has(HealthReason::SchemaMismatch) && !self.check_schema().await {
                    let refused = "the table's columns do not match the manifest".to_string();
                    // Not written is as good as failed for a message on its last delivery.
                    self.dead_letter_last_deliveries(batch, &refused).await;
                    refused
                } else {
                    let started = Instant::now();
                    match self.insert_once(batch).await {
                        Ok(()) => {
                            self.metrics
                                .insert_seconds
                                .observe(started.elapsed().as_secs_f64());
                            self.healthy.store(true, Ordering::Relaxed);
                            self.health
                                .clear(HealthReason::InsertRejected, &self.metrics);
                            return Ok(());
                        }
                        Err(error) => {
                            let text = self.describe(&error);
                            self.after_insert_error(batch, &text).await
                        }
                    }
                };
            if batch.is_empty() {
                return Ok(());
            }
            if shutdown.is_cancelled() {
                let since = *shutdown_since.get_or_insert_with(Instant::now);
                if since.elapsed() > SHUTDOWN_RETRY_BUDGET {
                    return Err(SinkError::ShutdownWhileFailing {
                        first: batch.first_sequence,
                        last: batch.last_sequence,
                        last_error,
                    });
                }
            }
            let delay = backoff.next_delay();
            tracing::warn!(
                error = %last_error,
                attempt = backoff.attempts(),
                retry_in_ms = delay.as_millis() as u64,
                rows = batch.len(),
                "batch not stored; retrying"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                // Leave the budget to run from the moment shutdown was asked.
                _ = shutdown.cancelled(), if shutdown_since.is_none() => {}
            }
        }
    }

    /// Classifies an insert error, records it, checks the schema, and dead-letters the rows on
    /// their last delivery. Returns the error's text.
    async fn after_insert_error(&self, batch: &mut SealedBatch, error: &str) -> String {
        self.metrics.insert_retries.inc();
        match classify(error) {
            InsertFailure::Permanent { message, .. } => {
                // The server answered: it is reachable, just refusing.
                self.healthy.store(true, Ordering::Relaxed);
                self.metrics.inserts_rejected.inc();
                self.health
                    .set(HealthReason::InsertRejected, &message, &self.metrics);
            }
            InsertFailure::Transient(_) => {
                self.healthy.store(false, Ordering::Relaxed);
                // The same bytes on another replica are deduplicated there if the first attempt
                // was stored after all (see the module's documentation).
                if let Some(next) = self.fail_over() {
                    tracing::warn!(next = %next, "insert did not reach ClickHouse; failing over");
                }
            }
        }
        self.check_schema().await;
        self.dead_letter_last_deliveries(batch, error).await;
        error.to_string()
    }

    /// Sends the rows on their last allowed delivery to the dead letters (`max_deliveries` and
    /// why this attempt failed), leaving the rest of the batch to be retried.
    async fn dead_letter_last_deliveries(&self, batch: &mut SealedBatch, error: &str) {
        let reason =
            format!("{MAX_DELIVERIES}: insert failed on the last allowed delivery: {error}");
        let mut letters = batch.take_last_deliveries();
        if letters.is_empty() {
            return;
        }
        for letter in &mut letters {
            letter.reason = reason.clone();
            self.metrics.count_poison(MAX_DELIVERIES);
        }
        if self.dead_letters.send(letters).await.is_err() {
            tracing::warn!("dead-letter router stopped; the messages will be redelivered");
        }
    }
}
