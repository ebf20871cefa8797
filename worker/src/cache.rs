//! The Redis latest-value cache: after a batch is stored, each key's newest fields are written
//! with `HSET` and given a TTL, in one pipeline per batch.
//!
//! Newest wins by stream sequence, also across batches: the write is a small script that skips a
//! key already holding a newer `_stream_sequence`, so a batch stored late (by another worker, or
//! redelivered after a crash) never overwrites newer values.
//!
//! It runs as its own task behind a small queue. When Redis is slow or down the queue fills and
//! further updates are dropped and counted: the cache never holds back ClickHouse ingestion.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, ServerErrorKind};
use signal_clients::retry::Backoff;
use signal_model::CacheSpec;
use signal_model::cache_key::KeyTemplate;
use signal_model::credentials::UserPassword;
use signal_model::tls::TlsMaterial;
use signal_model::worker_health::HealthReason;
use tokio::sync::mpsc;

use crate::batch::CacheEntry;
use crate::health::Health;
use crate::metrics::Metrics;

/// Batches of cache updates queued at most; beyond that updates are dropped.
const QUEUE_BATCHES: usize = 4;

/// Hash field holding the stream sequence of the row the key's fields come from.
pub const SEQUENCE_FIELD: &str = "_stream_sequence";

/// `KEYS[1]` the key; `ARGV` the row's stream sequence, the TTL in seconds, then field/value
/// pairs. Writes the fields and the TTL unless the key holds a newer row.
const WRITE_IF_NEWER: &str = r"
local held = redis.call('HGET', KEYS[1], '_stream_sequence')
if held and tonumber(held) > tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], '_stream_sequence', ARGV[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
";

/// What the batcher needs to fill cache entries from a row.
#[derive(Clone, Debug)]
pub struct CacheLayout {
    pub key: KeyTemplate,
    /// Column index of each placeholder in the key, in template order.
    pub key_columns: Vec<(String, usize)>,
    /// (field name, column index) written into the hash.
    pub fields: Vec<(String, usize)>,
}

impl CacheLayout {
    /// Resolves the key template and fields against the table's column names (validated before).
    pub fn new(spec: &CacheSpec, column_names: &[&str]) -> Result<Self, String> {
        let key = KeyTemplate::parse(&spec.key)?;
        let index_of = |name: &str| {
            column_names
                .iter()
                .position(|c| *c == name)
                .ok_or_else(|| format!("cache refers to unknown column `{name}`"))
        };
        let key_columns = key
            .columns()
            .map(|name| index_of(name).map(|i| (name.to_string(), i)))
            .collect::<Result<_, _>>()?;
        let fields = spec
            .fields
            .iter()
            .map(|name| index_of(name).map(|i| (name.clone(), i)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            key,
            key_columns,
            fields,
        })
    }

    /// The key and entry of one row whose column texts are `values`.
    pub fn entry(&self, values: &[String], stream_sequence: u64) -> (String, CacheEntry) {
        let key = self.key.render(|name| {
            self.key_columns
                .iter()
                .find(|(column, _)| column == name)
                .and_then(|(_, index)| values.get(*index))
                .map_or("", String::as_str)
        });
        let fields = self
            .fields
            .iter()
            .map(|(name, index)| {
                (
                    name.clone(),
                    values.get(*index).cloned().unwrap_or_default(),
                )
            })
            .collect();
        (
            key,
            CacheEntry {
                stream_sequence,
                fields,
            },
        )
    }
}

/// The sending side of the cache queue.
#[derive(Clone)]
pub struct CacheQueue {
    sender: mpsc::Sender<HashMap<String, CacheEntry>>,
    metrics: Arc<Metrics>,
}

impl CacheQueue {
    /// Queues a stored batch's entries, or drops them when Redis is behind.
    pub fn offer(&self, entries: HashMap<String, CacheEntry>) {
        if entries.is_empty() {
            return;
        }
        if self.sender.try_send(entries).is_err() {
            self.metrics.redis_skipped.inc();
        }
    }
}

/// Starts the cache writer; it ends when every [`CacheQueue`] is dropped and the queue is drained.
/// A failed TLS handshake is reported as [`HealthReason::CacheTlsFailed`] until a connection
/// succeeds.
pub fn start(
    spec: &CacheSpec,
    auth: &UserPassword,
    tls: Option<&TlsMaterial>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<(CacheQueue, tokio::task::JoinHandle<()>), signal_clients::connect::ConnectError> {
    let client = signal_clients::connect::redis(&spec.redis.url, auth, tls)?;
    let (sender, receiver) = mpsc::channel(QUEUE_BATCHES);
    let ttl = spec.ttl.0;
    let writer = Writer {
        client,
        url: spec.redis.url.clone(),
        ttl,
        metrics: metrics.clone(),
        health,
    };
    let task = tokio::spawn(writer.run(receiver));
    Ok((CacheQueue { sender, metrics }, task))
}

async fn connect(client: &redis::Client) -> redis::RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(1);
    client.get_connection_manager_with_config(config).await
}

/// The cache writer task's parts.
struct Writer {
    client: redis::Client,
    url: String,
    ttl: Duration,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

impl Writer {
    async fn run(self, receiver: mpsc::Receiver<HashMap<String, CacheEntry>>) {
        let Writer {
            client,
            url,
            ttl,
            metrics,
            health,
        } = self;
        write_loop(client, &url, receiver, ttl, metrics, &health).await;
    }
}

async fn write_loop(
    client: redis::Client,
    url: &str,
    mut receiver: mpsc::Receiver<HashMap<String, CacheEntry>>,
    ttl: Duration,
    metrics: Arc<Metrics>,
    health: &Health,
) {
    let mut connection: Option<ConnectionManager> = None;
    let script = redis::Script::new(WRITE_IF_NEWER);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    while let Some(entries) = receiver.recv().await {
        if connection.is_none() {
            match connect(&client).await {
                Ok(manager) => {
                    backoff.reset();
                    health.clear(HealthReason::CacheTlsFailed, &metrics);
                    connection = Some(manager);
                }
                Err(error) => {
                    metrics.redis_failures.inc();
                    match signal_clients::connect::redis_tls_failure(url, &error) {
                        Some(tls) => {
                            let message = tls.to_string();
                            tracing::warn!(error = %message, keys = entries.len(), "Redis refused TLS; cache update dropped");
                            health.set(HealthReason::CacheTlsFailed, &message, &metrics);
                        }
                        None => {
                            tracing::warn!(%error, keys = entries.len(), "Redis unreachable; cache update dropped")
                        }
                    }
                    // Wait before the next attempt; updates queued meanwhile are dropped by `offer`.
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            }
        }
        let Some(manager) = connection.as_mut() else {
            continue;
        };
        let mut pipe = redis::pipe();
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        for (key, entry) in &entries {
            let write = pipe
                .cmd("EVALSHA")
                .arg(script.get_hash())
                .arg(1)
                .arg(key)
                .arg(entry.stream_sequence)
                .arg(ttl_secs);
            for (field, value) in &entry.fields {
                write.arg(field).arg(value);
            }
            write.ignore();
        }
        let mut written = pipe.query_async::<()>(manager).await;
        // The server forgets scripts when it restarts (the connection manager reconnects by
        // itself), so load it on first use and whenever it is missing, then try again once.
        if matches!(&written, Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
        {
            written = match script.prepare_invoke().load_async(manager).await {
                Ok(_) => pipe.query_async::<()>(manager).await,
                Err(error) => Err(error),
            };
        }
        match written {
            Ok(()) => {
                metrics.redis_writes.inc_by(entries.len() as u64);
            }
            Err(error) => {
                metrics.redis_failures.inc();
                tracing::warn!(%error, keys = entries.len(), "Redis cache write failed");
            }
        }
    }
}
