//! Where reconciles get their NATS and ClickHouse clients: one long-lived client per server and
//! credential set, shared by every pipeline that uses it, and a bound on how many reconciles work
//! on one server at a time.
//!
//! [`Connections::shared`] is the controller's pool. A NATS client is opened on first use and kept:
//! async-nats reconnects it by itself after a server restart, so a resync of a thousand pipelines
//! opens no connection at all. Credentials and TLS material are part of a client's identity: a
//! rotated Secret gets a new client and the old one goes with its last user. A client is dropped
//! (its connection closed) once no pipeline's last reconcile used it, i.e. when its pipelines were
//! deleted or moved to another server or credential set. ClickHouse clients are pooled the same
//! way (each keeps its own keep-alive HTTP connections).
//!
//! Each server (by URL, whatever the credentials) has a semaphore: at most
//! [`ConnectionLimits::nats_per_server`] reconciles talk to one NATS server at once, and
//! [`ConnectionLimits::clickhouse_per_server`] to one ClickHouse server, so a thousand pipelines
//! applied at once queue in the operator instead of on the servers. How many wait is a metric.
//!
//! [`Connections::per_call`] pools nothing and bounds nothing: every call connects anew and the
//! client goes when the call ends (one-off callers and tests that restart servers under a client).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use signal_model::credentials::{NatsAuth, UserPassword};
use signal_model::tls::TlsMaterial;
use signal_model::worker_health::HEALTH_SUBJECTS;
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};

use super::health_mirror::HealthMirror;
use super::table::VerifiedTable;
use super::table_clause_diff::PrintedClauses;
use super::{DataPlaneError, NATS_CONNECT_BOUND, REQUEST_TIMEOUT, bounded, nats_connect_error};
use crate::metrics::Metrics;

/// How many reconciles may work on one server at the same time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub nats_per_server: usize,
    pub clickhouse_per_server: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            nats_per_server: 16,
            clickhouse_per_server: 8,
        }
    }
}

/// The clients of the servers pipelines use; see the module documentation.
pub struct Connections {
    /// `None`: [`Connections::per_call`].
    pool: Option<Pool>,
}

struct Pool {
    limits: ConnectionLimits,
    metrics: Option<Arc<Metrics>>,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    nats: Vec<Arc<NatsClient>>,
    clickhouse: Vec<Arc<ClickHouseClient>>,
    /// The clients each pipeline's last reconcile used, by `namespace/name`: what keeps a client.
    uses: HashMap<String, Vec<Used>>,
    /// One semaphore per server, by normalised URL.
    nats_permits: HashMap<String, Arc<Semaphore>>,
    clickhouse_permits: HashMap<String, Arc<Semaphore>>,
    /// Live tables' clauses by `url database.table`, with when they were read
    /// (see [`super::table`]'s `live_table_clauses`).
    clauses: HashMap<String, (Instant, PrintedClauses)>,
    /// Tables last found as their spec says, by `url database.table` (see [`super::table`]'s
    /// `still_verified`), with when they were checked in full.
    verified_tables: HashMap<String, (Instant, VerifiedTable)>,
}

/// One NATS client and what identifies it.
struct NatsClient {
    url: String,
    auth: NatsAuth,
    tls: Option<TlsMaterial>,
    /// Set by the first successful connect; a failed one leaves it empty for the next caller.
    client: OnceCell<async_nats::Client>,
    /// When a reconcile last made sure the shared health stream is as the contract says (see
    /// [`Session::health_stream_checked_within`]).
    health_stream_checked: Mutex<Option<Instant>>,
    /// The workers' health reports on this client's server, mirrored once a reconcile asks.
    health_mirror: OnceLock<Arc<HealthMirror>>,
}

/// One ClickHouse client and what identifies it.
struct ClickHouseClient {
    url: String,
    auth: UserPassword,
    tls: Option<TlsMaterial>,
    client: clickhouse::Client,
}

/// A client a pipeline keeps open by holding it (either kind).
type Used = Arc<dyn std::any::Any + Send + Sync>;

/// Which kind of server a permit is for (the `server` label of the queue metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    Nats,
    ClickHouse,
}

impl ServerKind {
    pub fn label(self) -> &'static str {
        match self {
            ServerKind::Nats => "nats",
            ServerKind::ClickHouse => "clickhouse",
        }
    }
}

impl Connections {
    /// The controller's pool: shared clients and per-server limits; the queue and the open
    /// clients go to `metrics`.
    pub fn shared(limits: ConnectionLimits, metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            pool: Some(Pool {
                limits,
                metrics,
                state: Mutex::new(PoolState::default()),
            }),
        }
    }

    /// No pool: a new client per call, no limits.
    pub const fn per_call() -> Self {
        Self { pool: None }
    }

    /// The clients one reconcile of pipeline `key` (`namespace/name`) takes from the pool. When
    /// it ends, what it used becomes what the pipeline keeps, and clients nobody keeps are closed.
    pub fn session(&self, key: &str) -> Session<'_> {
        Session {
            connections: self,
            pipeline: key.to_string(),
            used: Mutex::new(Vec::new()),
            nats: Mutex::new(None),
        }
    }

    /// Pipeline `key` is gone: the clients only it used are closed.
    pub fn release(&self, key: &str) {
        if let Some(pool) = &self.pool {
            let mut state = pool.lock();
            state.uses.remove(key);
            pool.prune(&mut state);
        }
    }

    /// Open NATS and ClickHouse clients in the pool (0 without a pool).
    pub fn open_clients(&self) -> (usize, usize) {
        match &self.pool {
            Some(pool) => {
                let state = pool.lock();
                (state.nats.len(), state.clickhouse.len())
            }
            None => (0, 0),
        }
    }

    /// Records how long a step of a reconcile took (nothing without a pool's metrics).
    pub fn observe_step(&self, step: &str, elapsed: Duration) {
        if let Some(metrics) = self.pool.as_ref().and_then(|pool| pool.metrics.as_ref()) {
            metrics.observe_step(step, elapsed);
        }
    }

    /// Waits for a turn on the server at `url` (immediately without a pool); the turn lasts as long
    /// as the permit. While waiting, the pipeline counts in the queue metric.
    pub async fn turn(&self, kind: ServerKind, url: &str) -> Option<OwnedSemaphorePermit> {
        let pool = self.pool.as_ref()?;
        let semaphore = {
            let mut state = pool.lock();
            let (permits, limit) = match kind {
                ServerKind::Nats => (&mut state.nats_permits, pool.limits.nats_per_server),
                ServerKind::ClickHouse => (
                    &mut state.clickhouse_permits,
                    pool.limits.clickhouse_per_server,
                ),
            };
            permits
                .entry(server_key(url))
                .or_insert_with(|| Arc::new(Semaphore::new(limit.max(1))))
                .clone()
        };
        if let Ok(permit) = semaphore.clone().try_acquire_owned() {
            return Some(permit);
        }
        let _waiting = pool.metrics.as_ref().map(|m| m.waiting_for(kind));
        let started = Instant::now();
        // The semaphore is never closed.
        let permit = semaphore.acquire_owned().await.ok();
        self.observe_step(&format!("{}_queue", kind.label()), started.elapsed());
        permit
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves consistent state (plain inserts and removals).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Closes the clients no pipeline keeps and no reconcile holds.
    fn prune(&self, state: &mut PoolState) {
        state.nats.retain(|client| Arc::strong_count(client) > 1);
        state
            .clickhouse
            .retain(|client| Arc::strong_count(client) > 1);
        if let Some(metrics) = &self.metrics {
            metrics.set_open_clients(state.nats.len(), state.clickhouse.len());
        }
    }
}

/// The clients of one reconcile; see [`Connections::session`].
pub struct Session<'a> {
    connections: &'a Connections,
    pipeline: String,
    used: Mutex<Vec<Used>>,
    /// The pooled NATS client [`Session::jetstream`] gave out last.
    nats: Mutex<Option<Arc<NatsClient>>>,
}

impl Session<'_> {
    /// A JetStream context on the pipeline's NATS client, whose requests time out after
    /// [`REQUEST_TIMEOUT`]. A pooled client that lost its connection answers `Unreachable` at
    /// once (it reconnects by itself) instead of costing every request a timeout.
    pub async fn jetstream(
        &self,
        url: &str,
        auth: &NatsAuth,
        tls: Option<&TlsMaterial>,
        client_name: &str,
    ) -> Result<jetstream::Context, DataPlaneError> {
        let Some(pool) = &self.connections.pool else {
            return Ok(context(connect_nats(url, auth, tls, client_name).await?));
        };
        let entry = {
            let mut state = pool.lock();
            let found = state
                .nats
                .iter()
                .find(|c| c.url == url && &c.auth == auth && c.tls.as_ref() == tls)
                .cloned();
            found.unwrap_or_else(|| {
                let entry = Arc::new(NatsClient {
                    url: url.to_string(),
                    auth: auth.clone(),
                    tls: tls.cloned(),
                    client: OnceCell::new(),
                    health_stream_checked: Mutex::new(None),
                    health_mirror: OnceLock::new(),
                });
                state.nats.push(entry.clone());
                entry
            })
        };
        self.remember(entry.clone());
        if let Ok(mut nats) = self.nats.lock() {
            *nats = Some(entry.clone());
        }
        let client = entry
            .client
            .get_or_try_init(|| async {
                let client = connect_nats(url, auth, tls, "signal-operator").await?;
                if let Some(metrics) = &pool.metrics {
                    metrics.nats_connected();
                }
                tracing::info!(%url, "NATS client opened (shared by the pipelines on this server and credentials)");
                Ok::<_, DataPlaneError>(client)
            })
            .await?;
        if client.connection_state() != async_nats::connection::State::Connected {
            return Err(DataPlaneError::NatsUnreachable {
                url: url.to_string(),
                message: "the connection is lost; the client is reconnecting".to_string(),
            });
        }
        Ok(context(client.clone()))
    }

    /// A ClickHouse client for `url` with the pipeline's credentials; fails only when the TLS
    /// material is unusable.
    pub fn clickhouse(
        &self,
        url: &str,
        auth: &UserPassword,
        tls: Option<&TlsMaterial>,
    ) -> Result<clickhouse::Client, DataPlaneError> {
        let open = || {
            signal_clients::connect::clickhouse(url, auth, tls)
                .map_err(|error| DataPlaneError::Tls(error.to_string()))
        };
        let Some(pool) = &self.connections.pool else {
            return open();
        };
        let entry = {
            let mut state = pool.lock();
            let found = state
                .clickhouse
                .iter()
                .find(|c| c.url == url && &c.auth == auth && c.tls.as_ref() == tls)
                .cloned();
            match found {
                Some(entry) => entry,
                None => {
                    let entry = Arc::new(ClickHouseClient {
                        url: url.to_string(),
                        auth: auth.clone(),
                        tls: tls.cloned(),
                        client: open()?,
                    });
                    state.clickhouse.push(entry.clone());
                    entry
                }
            }
        };
        let client = entry.client.clone();
        self.remember(entry);
        Ok(client)
    }

    /// A live table's clauses read less than `ttl` ago (never without a pool).
    pub fn remembered_clauses(&self, key: &str, ttl: Duration) -> Option<PrintedClauses> {
        let pool = self.connections.pool.as_ref()?;
        recall(&pool.lock().clauses, key, ttl)
    }

    /// Remembers a live table's clauses just read (`None`: the table does not exist).
    pub fn remember_clauses(&self, key: &str, clauses: Option<PrintedClauses>) {
        if let Some(pool) = &self.connections.pool {
            note(&mut pool.lock().clauses, key, clauses);
        }
    }

    /// What the last full check of table `key` found, when it is less than `ttl` old (never
    /// without a pool).
    pub fn verified_table(&self, key: &str, ttl: Duration) -> Option<VerifiedTable> {
        let pool = self.connections.pool.as_ref()?;
        recall(&pool.lock().verified_tables, key, ttl)
    }

    /// Remembers that a full check found table `key` as its spec says (`None`: it did not, so the
    /// next reconcile checks it in full again).
    pub fn remember_verified_table(&self, key: &str, verified: Option<VerifiedTable>) {
        if let Some(pool) = &self.connections.pool {
            note(&mut pool.lock().verified_tables, key, verified);
        }
    }

    /// Whether a reconcile on this session's NATS client (server and credentials) made sure of
    /// the shared health stream less than `ttl` ago (never without a pool).
    pub fn health_stream_checked_within(&self, ttl: Duration) -> bool {
        self.pooled_nats().is_some_and(|nats| {
            nats.health_stream_checked
                .lock()
                .ok()
                .and_then(|checked| *checked)
                .is_some_and(|checked| checked.elapsed() < ttl)
        })
    }

    /// Notes that the shared health stream was just made sure of, for the other reconciles on the
    /// same NATS client.
    pub fn note_health_stream_checked(&self) {
        if let Some(nats) = self.pooled_nats()
            && let Ok(mut checked) = nats.health_stream_checked.lock()
        {
            *checked = Some(Instant::now());
        }
    }

    /// The mirror of every worker's health reports on this session's NATS client, started by the
    /// first caller on `js` (that client's context); `None` without a pool.
    pub fn health_mirror(&self, js: &jetstream::Context) -> Option<Arc<HealthMirror>> {
        let nats = self.pooled_nats()?;
        Some(
            nats.health_mirror
                .get_or_init(|| {
                    Arc::new(HealthMirror::start(js.clone(), HEALTH_SUBJECTS.to_string()))
                })
                .clone(),
        )
    }

    /// The pooled NATS client [`Session::jetstream`] gave out last.
    fn pooled_nats(&self) -> Option<Arc<NatsClient>> {
        self.nats.lock().ok()?.clone()
    }

    fn remember(&self, used: Used) {
        if let Ok(mut list) = self.used.lock() {
            list.push(used);
        }
    }
}

/// What `memo` holds for `key`, when it was noted less than `ttl` ago.
fn recall<T: Clone>(memo: &HashMap<String, (Instant, T)>, key: &str, ttl: Duration) -> Option<T> {
    let (noted_at, value) = memo.get(key)?;
    (noted_at.elapsed() < ttl).then(|| value.clone())
}

/// Notes `value` for `key` in `memo` as of now; `None` forgets the key.
fn note<T>(memo: &mut HashMap<String, (Instant, T)>, key: &str, value: Option<T>) {
    match value {
        Some(value) => memo.insert(key.to_string(), (Instant::now(), value)),
        None => memo.remove(key),
    };
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let Some(pool) = &self.connections.pool else {
            return;
        };
        let used = match self.used.get_mut() {
            Ok(used) => std::mem::take(used),
            Err(poisoned) => std::mem::take(poisoned.into_inner()),
        };
        let mut state = pool.lock();
        state.uses.insert(std::mem::take(&mut self.pipeline), used);
        pool.prune(&mut state);
    }
}

fn context(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(client)
}

async fn connect_nats(
    url: &str,
    auth: &NatsAuth,
    tls: Option<&TlsMaterial>,
    client_name: &str,
) -> Result<async_nats::Client, DataPlaneError> {
    bounded(
        format!("connecting to NATS at {url}"),
        NATS_CONNECT_BOUND,
        async {
            signal_clients::connect::nats(url, client_name, auth, tls)
                .await
                .map_err(|error| nats_connect_error(url, error))
        },
    )
    .await
}

/// A server's URL as the limits count it: without case, spaces or a trailing slash.
fn server_key(url: &str) -> String {
    url.trim().trim_end_matches('/').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn clients_are_shared_per_credentials_and_closed_with_their_last_pipeline() {
        let connections = Connections::shared(ConnectionLimits::default(), None);
        let url = "http://127.0.0.1:1";
        let alice = UserPassword {
            user: Some("alice".to_string()),
            password: None,
        };
        for pipeline in ["a", "b"] {
            let session = connections.session(pipeline);
            session
                .clickhouse(url, &UserPassword::default(), None)
                .expect("a client");
        }
        assert_eq!(connections.open_clients(), (0, 1), "one client for both");
        {
            let session = connections.session("c");
            session.clickhouse(url, &alice, None).expect("a client");
        }
        assert_eq!(connections.open_clients(), (0, 2), "other credentials");
        connections.release("c");
        assert_eq!(connections.open_clients(), (0, 1));
        connections.release("a");
        assert_eq!(connections.open_clients(), (0, 1), "b still uses it");
        // b moves to alice's credentials: the anonymous client goes.
        {
            let session = connections.session("b");
            session.clickhouse(url, &alice, None).expect("a client");
        }
        assert_eq!(connections.open_clients(), (0, 1));
        connections.release("b");
        assert_eq!(connections.open_clients(), (0, 0));
    }

    #[tokio::test]
    async fn a_server_takes_at_most_its_limit_of_reconciles_at_once() {
        let limits = ConnectionLimits {
            nats_per_server: 2,
            clickhouse_per_server: 1,
        };
        let connections = Connections::shared(limits, None);
        let first = connections.turn(ServerKind::Nats, "nats://a:4222").await;
        let second = connections.turn(ServerKind::Nats, "NATS://a:4222/").await;
        assert!(first.is_some() && second.is_some());
        let third = connections.turn(ServerKind::Nats, "nats://a:4222");
        let waited = tokio::time::timeout(Duration::from_millis(50), third).await;
        assert!(waited.is_err(), "a third turn waits");
        assert!(
            connections
                .turn(ServerKind::Nats, "nats://b:4222")
                .await
                .is_some(),
            "another server has its own limit"
        );
        drop(first);
        assert!(
            connections
                .turn(ServerKind::Nats, "nats://a:4222")
                .await
                .is_some()
        );
        assert!(
            Connections::per_call()
                .turn(ServerKind::ClickHouse, "http://x")
                .await
                .is_none()
        );
    }
}
