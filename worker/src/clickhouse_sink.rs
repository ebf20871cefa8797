//! Writing a sealed batch into ClickHouse: one RowBinary INSERT per batch, retried with backoff
//! until the server confirms it.
//!
//! While an insert is being retried, the batch's messages get progress acks (`+WPI`) so JetStream
//! does not redeliver them meanwhile; nothing is acknowledged before ClickHouse has confirmed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use async_nats::jetstream::message::Acker;
use signal_clients::clickhouse::server_version;
use signal_clients::retry::Backoff;
use tokio_util::sync::CancellationToken;

use crate::batch::SealedBatch;
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

/// The table and the client that writes to it.
pub struct ClickHouseSink {
    client: clickhouse::Client,
    insert_sql: String,
    stream: String,
    deduplication_tokens: AtomicBool,
    progress_interval: Duration,
    metrics: Arc<Metrics>,
    /// Last insert or probe succeeded; read by `/readyz`.
    pub healthy: Arc<AtomicBool>,
}

impl ClickHouseSink {
    pub fn new(
        client: clickhouse::Client,
        database: &str,
        table: &str,
        column_list: &str,
        stream: &str,
        ack_wait: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            insert_sql: format!(
                "INSERT INTO `{database}`.`{table}` ({column_list}) FORMAT RowBinary"
            ),
            stream: stream.to_string(),
            deduplication_tokens: AtomicBool::new(false),
            progress_interval: (ack_wait / 3).max(Duration::from_millis(200)),
            metrics,
            healthy: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Checks the server once: reachable, and whether it honours deduplication tokens.
    pub async fn probe(&self) -> bool {
        match server_version(&self.client).await {
            Ok(version) => {
                let tokens = version.supports_insert_deduplication_token();
                self.deduplication_tokens.store(tokens, Ordering::Relaxed);
                self.healthy.store(true, Ordering::Relaxed);
                tracing::info!(%version, deduplication_tokens = tokens, "ClickHouse reachable");
                true
            }
            Err(_) => {
                self.healthy.store(false, Ordering::Relaxed);
                false
            }
        }
    }

    async fn insert_once(&self, batch: &SealedBatch) -> Result<(), clickhouse::error::Error> {
        let mut insert = self
            .client
            .insert_formatted_with(self.insert_sql.clone())
            .with_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(60)));
        if self.deduplication_tokens.load(Ordering::Relaxed) {
            insert = insert.with_setting(
                "insert_deduplication_token",
                batch.deduplication_token(&self.stream),
            );
        }
        insert.send(batch.rows.clone()).await?;
        insert.end().await
    }

    /// Inserts the batch, retrying until it is stored. After `shutdown` is cancelled it keeps trying
    /// for a short budget, then gives up (the messages stay unacknowledged and are redelivered).
    pub async fn store(
        &self,
        batch: &SealedBatch,
        shutdown: &CancellationToken,
    ) -> Result<(), SinkError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut last_progress = Instant::now();
        let mut shutdown_since: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let error = match self.insert_once(batch).await {
                Ok(()) => {
                    self.metrics
                        .insert_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.healthy.store(true, Ordering::Relaxed);
                    return Ok(());
                }
                Err(error) => error,
            };
            self.healthy.store(false, Ordering::Relaxed);
            self.metrics.insert_retries.inc();
            if shutdown.is_cancelled() {
                let since = *shutdown_since.get_or_insert_with(Instant::now);
                if since.elapsed() > SHUTDOWN_RETRY_BUDGET {
                    return Err(SinkError::ShutdownWhileFailing {
                        first: batch.first_sequence,
                        last: batch.last_sequence,
                        last_error: error.to_string(),
                    });
                }
            }
            let delay = backoff.next_delay();
            tracing::warn!(
                %error,
                attempt = backoff.attempts(),
                retry_in_ms = delay.as_millis() as u64,
                rows = batch.acks.len(),
                "insert failed; retrying"
            );
            let wake = Instant::now() + delay;
            while Instant::now() < wake {
                if last_progress.elapsed() >= self.progress_interval {
                    send_progress(&batch.acks).await;
                    last_progress = Instant::now();
                }
                tokio::time::sleep(
                    wake.saturating_duration_since(Instant::now())
                        .min(self.progress_interval),
                )
                .await;
            }
        }
    }
}

/// Tells JetStream the messages are still being worked on, restarting their ack wait.
pub async fn send_progress(acks: &[Acker]) {
    let mut failed = 0;
    for ack in acks {
        if ack.ack_with(AckKind::Progress).await.is_err() {
            failed += 1;
        }
    }
    if failed > 0 {
        tracing::warn!(failed, "progress acks could not be sent");
    }
}

/// Acknowledges a stored batch; returns how many acks could not be sent.
///
/// An ack is a plain publish queued to the client, so awaiting them one by one is cheaper than
/// polling thousands of futures at once, and keeps them in order.
pub async fn acknowledge(acks: Vec<Acker>) -> usize {
    let mut failed = 0;
    for ack in &acks {
        if ack.ack().await.is_err() {
            failed += 1;
        }
    }
    failed
}
