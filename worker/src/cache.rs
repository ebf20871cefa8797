//! The Redis latest-value cache: after a batch is stored, each key's newest fields are written
//! with `HSET` and given a TTL, in one pipeline per batch.
//!
//! Newest wins by stream sequence, also across batches: the write is a small script that skips a
//! key already holding a newer `_stream_sequence`, so a batch stored late (by another worker, or
//! redelivered after a crash) never overwrites newer values.
//!
//! It runs as its own task behind a queue that keeps only each key's newest entry: updates that
//! arrive while a write is in flight, or while Redis is slow or down, are merged into it, and a
//! write that fails puts its entries back (unless newer ones arrived), so once Redis answers
//! again every key gets its newest value. The cache never holds back ClickHouse ingestion: the
//! queue holds at most [`MAX_PENDING_KEYS`] keys, and updates of further keys are dropped and
//! counted.

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
use std::sync::Mutex;
use tokio::sync::Notify;

use crate::batch::CacheEntry;
use crate::health::Health;
use crate::metrics::Metrics;

/// Keys waiting to be written at most (a few MiB); updates of further keys are dropped.
pub const MAX_PENDING_KEYS: usize = 20_000;

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
    shared: Arc<Shared>,
    /// Dropped with the last queue handle, which tells the writer to finish.
    _open: Arc<OpenQueue>,
    metrics: Arc<Metrics>,
}

/// What the queue handles and the writer share.
#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Notify,
}

#[derive(Default)]
struct Pending {
    entries: HashMap<String, CacheEntry>,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves a plain map behind; it is still usable.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Merges `entries` into the queue, keeping each key's newest; returns how many were
    /// dropped because the queue is full.
    fn merge(&self, entries: HashMap<String, CacheEntry>) -> u64 {
        let mut dropped = 0;
        {
            let mut pending = self.lock();
            for (key, entry) in entries {
                let room = pending.entries.len() < MAX_PENDING_KEYS;
                match pending.entries.get_mut(&key) {
                    Some(queued) => {
                        if entry.stream_sequence >= queued.stream_sequence {
                            *queued = entry;
                        }
                    }
                    None if room => {
                        pending.entries.insert(key, entry);
                    }
                    None => dropped += 1,
                }
            }
        }
        self.wake.notify_one();
        dropped
    }
}

/// Marks the queue closed when the last [`CacheQueue`] goes.
struct OpenQueue(Arc<Shared>);

impl Drop for OpenQueue {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_one();
    }
}

impl CacheQueue {
    /// Queues a stored batch's entries (each key keeps its newest).
    pub fn offer(&self, entries: HashMap<String, CacheEntry>) {
        if entries.is_empty() {
            return;
        }
        let dropped = self.shared.merge(entries);
        if dropped > 0 {
            self.metrics.redis_skipped.inc_by(dropped);
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
    let shared = Arc::new(Shared::default());
    let ttl = spec.ttl.0;
    let writer = Writer {
        client,
        url: spec.redis.url.clone(),
        ttl,
        metrics: metrics.clone(),
        health,
    };
    let task = tokio::spawn(writer.run(shared.clone()));
    let queue = CacheQueue {
        _open: Arc::new(OpenQueue(shared.clone())),
        shared,
        metrics,
    };
    Ok((queue, task))
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
    async fn run(self, queue: Arc<Shared>) {
        let Writer {
            client,
            url,
            ttl,
            metrics,
            health,
        } = self;
        write_loop(client, &url, &queue, ttl, metrics, &health).await;
    }
}

async fn write_loop(
    client: redis::Client,
    url: &str,
    queue: &Shared,
    ttl: Duration,
    metrics: Arc<Metrics>,
    health: &Health,
) {
    let mut connection: Option<ConnectionManager> = None;
    let script = redis::Script::new(WRITE_IF_NEWER);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let entries = {
            let mut pending = queue.lock();
            if pending.entries.is_empty() && pending.closed {
                return;
            }
            std::mem::take(&mut pending.entries)
        };
        if entries.is_empty() {
            // `notify_one` keeps a permit when nobody waits, so no offer is missed.
            queue.wake.notified().await;
            continue;
        }
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
                            tracing::warn!(error = %message, keys = entries.len(), "Redis refused TLS; cache update kept for the next attempt");
                            health.set(HealthReason::CacheTlsFailed, &message, &metrics);
                        }
                        None => {
                            tracing::warn!(%error, keys = entries.len(), "Redis unreachable; cache update kept for the next attempt")
                        }
                    }
                    // Wait before the next attempt; updates meanwhile merge into the queue.
                    requeue(queue, entries, &metrics);
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
                backoff.reset();
                metrics.redis_writes.inc_by(entries.len() as u64);
            }
            Err(error) => {
                metrics.redis_failures.inc();
                tracing::warn!(%error, keys = entries.len(), "Redis cache write failed; kept for the next attempt");
                // The connection manager reconnects by itself; pause so a Redis that is down is
                // not asked again at once.
                requeue(queue, entries, &metrics);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Puts back the entries of a write that did not happen, unless newer ones arrived meanwhile.
fn requeue(queue: &Shared, entries: HashMap<String, CacheEntry>, metrics: &Metrics) {
    let dropped = queue.merge(entries);
    if dropped > 0 {
        metrics.redis_skipped.inc_by(dropped);
    }
}
