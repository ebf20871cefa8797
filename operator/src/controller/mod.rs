//! The SignalPipeline controller: watches pipelines and the Deployments and ConfigMaps they own,
//! and runs [`reconcile::reconcile`] for each pipeline that changed.
//!
//! Fleet scale: a reconcile reads what it needs from watch caches ([`Caches`]: owned Deployments
//! and ConfigMaps, Secrets' metadata, the pipelines by claim in [`PipelineIndex`]), takes its NATS
//! and ClickHouse clients from the shared pool ([`Connections`]) and writes only what changed, so
//! its cost does not grow with the number of pipelines and a resync of a healthy pipeline makes no
//! Kubernetes request. A status-only change of a pipeline (the operator's own status write) does
//! not trigger a reconcile; a spec, finalizer, label, annotation or deletion change does.
//!
//! The pure decisions live in their own files ([`autoscale`], [`conflicts`], [`conditions`]); the
//! I/O steps in [`secrets`], [`status`] and [`events`]; a reconcile's apply path in [`reconcile`],
//! its workers step in `workers` and its deletion path in `cleanup`. This module wires them into
//! kube-runtime's `Controller` and owns the retry policy: failures back off exponentially per
//! pipeline, so a broken pipeline is retried without hammering its servers and the operator never
//! crash-loops.

pub mod autoscale;
mod cleanup;
pub mod conditions;
pub mod conflicts;
pub mod dead_letter_health;
pub mod events;
pub mod reconcile;
pub mod secrets;
pub mod status;
mod workers;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::ListParams;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{PredicateConfig, WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use signal_clients::retry::RetryPolicy;
use signal_model::SignalPipeline;
use signal_model::credentials::PipelineCredentials;
use tracing::{info, warn};

use crate::dataplane::DataPlaneReport;
use crate::dataplane::connections::{ConnectionLimits, Connections};
use crate::metrics::Metrics;
use crate::workload::FIELD_MANAGER;
use conflicts::{ClaimIndex, qualified_name};
pub use reconcile::{FINALIZER, ReconcileError, reconcile};
pub use secrets::SecretCache;

/// Retry delays after a failure: 5 s, doubling per consecutive failure, at most 5 minutes.
const BACKOFF: RetryPolicy = RetryPolicy::new(Duration::from_secs(5), Duration::from_secs(300));

/// Knobs of the controller, from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Worker image for pipelines that do not name one.
    pub default_worker_image: String,
    /// How long a deletion may keep failing before the finalizer is released anyway.
    pub cleanup_timeout: Duration,
    /// How often a healthy pipeline is looked at again (stream and consumer figures).
    pub resync_interval: Duration,
    /// How often an autoscaled pipeline's lag is looked at.
    pub autoscale_interval: Duration,
    /// Reconciles running at once (of different pipelines).
    pub concurrency: u16,
    /// Reconciles working on one NATS or ClickHouse server at once.
    pub connection_limits: ConnectionLimits,
}

impl Settings {
    pub fn new(default_worker_image: impl Into<String>) -> Self {
        Self {
            default_worker_image: default_worker_image.into(),
            cleanup_timeout: Duration::from_secs(300),
            resync_interval: Duration::from_secs(60),
            autoscale_interval: Duration::from_secs(15),
            concurrency: 32,
            connection_limits: ConnectionLimits::default(),
        }
    }
}

/// Every pipeline the operator watches (across its controllers' scopes) by the claims it makes:
/// the view conflicts are decided on, fed by the pipelines' watch events.
#[derive(Clone, Default)]
pub struct PipelineIndex {
    claims: Arc<Mutex<ClaimIndex>>,
}

impl PipelineIndex {
    /// The pipelines claiming the same table or stream as `pipeline` (itself included when known).
    pub fn rivals(&self, pipeline: &SignalPipeline) -> Vec<Arc<SignalPipeline>> {
        self.lock().rivals(pipeline)
    }

    /// Adds or replaces a pipeline (what a watch event does). Its status is not kept: conflicts
    /// are decided on specs and metadata.
    pub fn upsert(&self, mut pipeline: SignalPipeline) {
        pipeline.status = None;
        pipeline.metadata.managed_fields = None;
        self.lock().upsert(Arc::new(pipeline));
    }

    /// A feeder of the watch events of the pipelines in `namespace` (all namespaces: `None`).
    pub fn feeder(&self, namespace: Option<String>) -> IndexFeeder {
        IndexFeeder {
            index: self.clone(),
            namespace,
            relisted: None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClaimIndex> {
        // Plain inserts and removals: a panic elsewhere leaves the index consistent.
        self.claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Applies one scope's watch events to a [`PipelineIndex`], as a reflector's writer does to its
/// store: a relist replaces what the scope held.
pub struct IndexFeeder {
    index: PipelineIndex,
    namespace: Option<String>,
    /// The pipelines a relist in progress has listed.
    relisted: Option<HashSet<String>>,
}

impl IndexFeeder {
    pub fn apply_watcher_event(&mut self, event: &watcher::Event<SignalPipeline>) {
        match event {
            watcher::Event::Apply(pipeline) => self.index.upsert(pipeline.clone()),
            watcher::Event::Delete(pipeline) => {
                self.index.lock().remove(&qualified_name(pipeline));
            }
            watcher::Event::Init => self.relisted = Some(HashSet::new()),
            watcher::Event::InitApply(pipeline) => {
                if let Some(relisted) = &mut self.relisted {
                    relisted.insert(qualified_name(pipeline));
                }
                self.index.upsert(pipeline.clone());
            }
            watcher::Event::InitDone => {
                let Some(relisted) = self.relisted.take() else {
                    return;
                };
                let prefix = self.namespace.as_ref().map(|ns| format!("{ns}/"));
                self.index.lock().retain(|key| {
                    relisted.contains(key) || prefix.as_ref().is_some_and(|p| !key.starts_with(p))
                });
            }
        }
    }
}

/// Watch caches a reconcile reads instead of asking the API server. Empty (the default), every
/// read is a request and every write is made (for callers without watches, e.g. tests).
#[derive(Clone, Default)]
pub struct Caches {
    deployments: Vec<Store<Deployment>>,
    configmaps: Vec<Store<ConfigMap>>,
    secrets: Option<SecretCache>,
}

impl Caches {
    /// The owned Deployment `namespace/name` as last watched; `None` when not cached.
    pub async fn deployment(&self, namespace: &str, name: &str) -> Option<Option<Deployment>> {
        cached(&self.deployments, namespace, name).await
    }

    /// The owned ConfigMap `namespace/name` as last watched; `None` when not cached.
    pub async fn configmap(&self, namespace: &str, name: &str) -> Option<Option<ConfigMap>> {
        cached(&self.configmaps, namespace, name).await
    }

    pub fn secrets(&self) -> Option<&SecretCache> {
        self.secrets.as_ref()
    }
}

/// `Some(object or None)` from the first store, once filled; `None` without stores.
async fn cached<K>(stores: &[Store<K>], namespace: &str, name: &str) -> Option<Option<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    if stores.is_empty() {
        return None;
    }
    let reference = ObjectRef::<K>::new(name).within(namespace);
    for store in stores {
        // Fails only when the watch stopped, and then the controller stops too.
        let _ = store.wait_until_ready().await;
    }
    Some(
        stores
            .iter()
            .find_map(|store| store.get(&reference))
            .map(|object| (*object).clone()),
    )
}

/// What the operator last applied to an object, to skip applying it again unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AppliedRecord {
    desired: u64,
    /// The object's version right after the apply (a Deployment's generation, a ConfigMap's
    /// resourceVersion): a later change by anyone else makes the cached one differ.
    version: String,
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub pipelines: PipelineIndex,
    pub caches: Caches,
    /// The NATS and ClickHouse clients, shared by every reconcile.
    pub connections: Connections,
    /// Consecutive failures per `namespace/name`, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// What was last applied per `kind namespace/name`.
    applied: Mutex<HashMap<String, AppliedRecord>>,
    /// Each pipeline's rendered manifest digest, by `namespace/name`.
    manifests: Mutex<HashMap<String, ManifestRecord>>,
    /// Data-plane reports just taken, by `namespace/name` (see [`Context::recent_data_plane`]).
    recent_reports: Mutex<RecentReports>,
}

/// How long a data-plane report that found everything ready stands in for a new one, at most
/// (and never longer than half the resync interval, so a resync always looks again).
pub const DATA_PLANE_REUSE: Duration = Duration::from_secs(10);

/// The first look again at lagging replicas (a new stream's followers are current within a
/// second or two).
const LAGGING_RECHECK_FIRST: Duration = Duration::from_secs(2);

/// How soon to look again at replicas that have lagged for `lagging_for`: after
/// [`LAGGING_RECHECK_FIRST`], then as long again as they have lagged, so the status shows a new
/// stream's replicas current within seconds while a server that stays away costs a fleet ever
/// fewer looks (the resync interval caps the delay).
fn lagging_recheck_delay(lagging_for: Duration) -> Duration {
    lagging_for.max(LAGGING_RECHECK_FIRST)
}

/// The recent data-plane reports, and when the expired ones were last dropped: dropping them on
/// every insert walked every report of the last window (hundreds while a fleet is created).
#[derive(Default)]
struct RecentReports {
    by_pipeline: HashMap<String, RecentReport>,
    pruned: Option<std::time::Instant>,
    /// Since when each pipeline's data plane has reported lagging replicas, without a report
    /// in between that found them current (see [`Context::lagging_recheck`]).
    lagging_since: HashMap<String, std::time::Instant>,
}

impl RecentReports {
    /// Drops the reports past their use, at most once per [`DATA_PLANE_REUSE`]: none is then
    /// kept longer than twice that.
    fn prune(&mut self) {
        if self
            .pruned
            .is_some_and(|pruned| pruned.elapsed() < DATA_PLANE_REUSE)
        {
            return;
        }
        self.by_pipeline
            .retain(|_, entry| entry.taken.elapsed() < DATA_PLANE_REUSE);
        self.pruned = Some(std::time::Instant::now());
    }
}

/// A data-plane report with what it was taken for.
struct RecentReport {
    uid: Option<String>,
    generation: Option<i64>,
    credentials: PipelineCredentials,
    taken: std::time::Instant,
    report: DataPlaneReport,
}

/// What the workers step needs of a pipeline's ConfigMap without rendering it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestDigest {
    /// [`crate::workload::config_hash`] of the ConfigMap.
    pub config_hash: String,
    /// [`fingerprint`] of the ConfigMap, as [`Context::unchanged_since_applied`] compares it.
    pub fingerprint: u64,
}

/// A [`ManifestDigest`] and the pipeline version it was rendered from.
struct ManifestRecord {
    uid: Option<String>,
    generation: Option<i64>,
    digest: ManifestDigest,
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        pipelines: PipelineIndex,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            connections: Connections::shared(settings.connection_limits, Some(metrics.clone())),
            settings,
            metrics,
            pipelines,
            caches: Caches::default(),
            failures: Mutex::new(HashMap::new()),
            applied: Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
            recent_reports: Mutex::new(RecentReports::default()),
        }
    }

    /// The report of a data-plane reconcile of this very pipeline version with these credentials
    /// that found everything ready less than [`DATA_PLANE_REUSE`] ago (less than half the resync
    /// interval), without its changes (their events are published). A new pipeline is reconciled
    /// again as soon as its Deployment and ConfigMap appear and kube-controller-manager rolls
    /// them out: those reconciles only need the workload step, and asking NATS and ClickHouse
    /// again about a fleet that is being created would double the servers' work for nothing.
    /// Autoscaled pipelines always look again (they need the lag), and so does a resync.
    pub fn recent_data_plane(
        &self,
        pipeline: &SignalPipeline,
        credentials: &PipelineCredentials,
    ) -> Option<DataPlaneReport> {
        if pipeline.spec.workers.autoscale.is_some() {
            return None;
        }
        let window = DATA_PLANE_REUSE.min(self.settings.resync_interval / 2);
        let recent = self.recent_reports.lock().ok()?;
        let entry = recent.by_pipeline.get(&Self::key(pipeline))?;
        (entry.uid == pipeline.metadata.uid
            && entry.generation == pipeline.metadata.generation
            && entry.credentials == *credentials
            && entry.taken.elapsed() < window)
            .then(|| entry.report.clone())
    }

    /// Keeps `report` for [`Context::recent_data_plane`] when it found everything ready (and
    /// forgets the pipeline's last one otherwise); reports past their use are dropped as it goes.
    pub fn remember_data_plane(
        &self,
        pipeline: &SignalPipeline,
        credentials: &PipelineCredentials,
        report: &DataPlaneReport,
    ) {
        let Ok(mut recent) = self.recent_reports.lock() else {
            return;
        };
        let key = Self::key(pipeline);
        let lagging = report.replicas_lagging();
        if lagging {
            recent
                .lagging_since
                .entry(key.clone())
                .or_insert_with(std::time::Instant::now);
        } else {
            recent.lagging_since.remove(&key);
        }
        // A report with lagging replicas is not reused: the next look is to see them current.
        if !(report.all_ready() && report.dead_letter.ready) || lagging {
            recent.by_pipeline.remove(&key);
            return;
        }
        recent.prune();
        let mut report = report.clone();
        for part in [
            &mut report.stream,
            &mut report.consumer,
            &mut report.table,
            &mut report.dead_letter,
        ] {
            part.changes.clear();
        }
        report.health_stream_changes.clear();
        recent.by_pipeline.insert(
            key,
            RecentReport {
                uid: pipeline.metadata.uid.clone(),
                generation: pipeline.metadata.generation,
                credentials: credentials.clone(),
                taken: std::time::Instant::now(),
                report,
            },
        );
    }

    /// Reads owned objects and Secrets from `caches`, and skips unchanged writes.
    pub fn with_caches(mut self, caches: Caches) -> Self {
        self.caches = caches;
        self
    }

    /// Whether what has fingerprint `desired` ([`fingerprint`]) was already applied to object
    /// `key` and the object, at `live_version`, has not changed since (unknown without a cache:
    /// `false`, apply).
    pub fn unchanged_since_applied(
        &self,
        key: &str,
        desired: u64,
        live_version: Option<String>,
    ) -> bool {
        let Some(live_version) = live_version else {
            return false;
        };
        let Ok(applied) = self.applied.lock() else {
            return false;
        };
        applied.get(key)
            == Some(&AppliedRecord {
                desired,
                version: live_version,
            })
    }

    /// Records that what has fingerprint `desired` was applied to object `key`, which is now at
    /// `version`.
    pub fn remember_applied(&self, key: &str, desired: u64, version: Option<String>) {
        let Ok(mut applied) = self.applied.lock() else {
            return;
        };
        match version {
            Some(version) => applied.insert(key.to_string(), AppliedRecord { desired, version }),
            None => applied.remove(key),
        };
    }

    /// Forgets what was applied for pipeline `namespace/name` (deleted).
    pub fn forget_applied(&self, namespace: &str, name: &str) {
        let suffix = format!(" {namespace}/{name}");
        if let Ok(mut applied) = self.applied.lock() {
            applied.retain(|key, _| !key.ends_with(&suffix));
        }
        if let Ok(mut manifests) = self.manifests.lock() {
            manifests.remove(&format!("{namespace}/{name}"));
        }
        if let Ok(mut recent) = self.recent_reports.lock() {
            let key = format!("{namespace}/{name}");
            recent.by_pipeline.remove(&key);
            recent.lagging_since.remove(&key);
        }
    }

    /// How soon to look again at a pipeline whose last data-plane report found lagging replicas
    /// (`None` when it found none): [`lagging_recheck_delay`] of how long they have lagged.
    pub fn lagging_recheck(&self, pipeline: &SignalPipeline) -> Option<Duration> {
        let recent = self.recent_reports.lock().ok()?;
        let since = recent.lagging_since.get(&Self::key(pipeline))?;
        Some(lagging_recheck_delay(since.elapsed()))
    }

    /// The config hash and fingerprint of the ConfigMap `pipeline` renders to, rendered once per
    /// uid and generation (its spec changes only with its generation): a resync of a fleet would
    /// otherwise render every pipeline's manifest as YAML only to find it unchanged.
    pub fn manifest_digest(
        &self,
        pipeline: &SignalPipeline,
    ) -> Result<ManifestDigest, crate::workload::WorkloadError> {
        let key = Context::key(pipeline);
        let (uid, generation) = (&pipeline.metadata.uid, pipeline.metadata.generation);
        if let Ok(manifests) = self.manifests.lock()
            && let Some(record) = manifests.get(&key)
            && record.uid == *uid
            && record.generation == generation
        {
            return Ok(record.digest.clone());
        }
        let configmap = crate::workload::build_configmap(pipeline)?;
        let digest = ManifestDigest {
            config_hash: crate::workload::config_hash(&configmap),
            fingerprint: fingerprint(&configmap),
        };
        if let Ok(mut manifests) = self.manifests.lock() {
            manifests.insert(
                key,
                ManifestRecord {
                    uid: uid.clone(),
                    generation,
                    digest: digest.clone(),
                },
            );
        }
        Ok(digest)
    }

    fn key(pipeline: &SignalPipeline) -> String {
        format!(
            "{}/{}",
            pipeline.namespace().unwrap_or_default(),
            pipeline.name_any()
        )
    }

    /// The delay before the next retry of a pipeline that just failed.
    pub fn next_backoff(&self, pipeline: &SignalPipeline) -> Duration {
        let Ok(mut failures) = self.failures.lock() else {
            return BACKOFF.max;
        };
        let count = failures.entry(Self::key(pipeline)).or_insert(0);
        let delay = backoff_delay(*count);
        *count = count.saturating_add(1);
        delay
    }

    pub fn reset_backoff(&self, pipeline: &SignalPipeline) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(&Self::key(pipeline));
        }
    }
}

/// Drops what no reconcile reads from a watched object before it is cached: managed fields are
/// often the largest part of an object, and a fleet's caches hold thousands.
fn strip_managed_fields<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// A process-local fingerprint of what would be applied.
pub(crate) fn fingerprint(desired: &impl serde::Serialize) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(desired)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// What of a pipeline should trigger a reconcile: not its status (which reconciles write; the
/// resync looks at the data plane anyway), but its spec (generation), finalizers, labels,
/// annotations and deletion.
fn reconcile_relevant(pipeline: &SignalPipeline) -> Option<u64> {
    let meta = &pipeline.metadata;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (
        &meta.uid,
        meta.generation,
        &meta.finalizers,
        &meta.labels,
        &meta.annotations,
        meta.deletion_timestamp.as_ref().map(|t| t.0.to_string()),
    )
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// What of an owned Deployment a reconcile reads (see `workers`): its spec's replicas and pod
/// template annotations, its generation, labels and the replica counts of its status. Not the
/// status conditions, whose timestamps kube-controller-manager rewrites while pods wait: in a
/// fleet of pending workers that was ~700 Deployment updates a minute, each one a reconcile.
fn deployment_relevant(deployment: &Deployment) -> u64 {
    let meta = &deployment.metadata;
    let spec = deployment.spec.as_ref();
    let status = deployment.status.as_ref();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (
        &meta.uid,
        meta.generation,
        &meta.labels,
        meta.deletion_timestamp.as_ref().map(|t| t.0.to_string()),
        spec.and_then(|s| s.replicas),
        spec.and_then(|s| s.template.metadata.as_ref())
            .map(|m| &m.annotations),
        status.map(|s| {
            (
                s.observed_generation,
                s.replicas,
                s.ready_replicas,
                s.updated_replicas,
                s.available_replicas,
            )
        }),
    )
        .hash(&mut hasher);
    hasher.finish()
}

/// The objects of a reflected watch that should trigger their owner's reconcile: every deletion,
/// and an added or modified object only when `relevant` of it differs from what was last seen
/// (kube's `predicate_filter` would also drop a deletion, whose object is the last one seen).
fn relevant_changes<K, S>(
    events: S,
    relevant: fn(&K) -> u64,
) -> impl futures::Stream<Item = Result<K, watcher::Error>>
where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    K: kube::Resource + Clone,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let mut last_seen: HashMap<ObjectRef<K>, u64> = HashMap::new();
    events.filter_map(move |event| {
        let trigger = match event {
            Err(error) => Some(Err(error)),
            Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
                let fingerprint = relevant(&object);
                let previous = last_seen.insert(ObjectRef::from_obj(&object), fingerprint);
                (previous != Some(fingerprint)).then_some(Ok(object))
            }
            Ok(watcher::Event::Delete(object)) => {
                last_seen.remove(&ObjectRef::from_obj(&object));
                Some(Ok(object))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
        };
        futures::future::ready(trigger)
    })
}

/// A process-local fingerprint of an object built from `pipeline` (its version: uid, generation,
/// labels, annotations, as [`reconcile_relevant`] sees them) and `inputs`: the same for the same
/// inputs, without building the object.
pub(crate) fn inputs_fingerprint(pipeline: &SignalPipeline, inputs: impl Hash) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (reconcile_relevant(pipeline), inputs).hash(&mut hasher);
    hasher.finish()
}

/// The controller's delay after `previous_failures` consecutive failures (no jitter: kube's queue
/// spreads requeues).
pub fn backoff_delay(previous_failures: u32) -> Duration {
    BACKOFF.delay(previous_failures)
}

/// What the controller does after a failed reconcile: count it and retry with backoff.
pub fn error_policy(
    pipeline: Arc<SignalPipeline>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.reconcile_failed(error.metric_reason());
    let mut delay = ctx.next_backoff(&pipeline);
    if let Some(cap) = error.retry_cap() {
        delay = delay.min(cap);
    }
    warn!(
        pipeline = %Context::key(&pipeline),
        reason = error.metric_reason(),
        retry_in_s = delay.as_secs(),
        "reconcile failed: {error}"
    );
    Action::requeue(delay)
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(
        "the SignalPipeline CRD is not installed (or not readable): {0}; install it with `signal-operator crd | kubectl apply --server-side -f -`"
    )]
    CrdMissing(#[source] kube::Error),
}

/// Runs one controller per namespace (or one for all namespaces when `namespaces` is empty) until
/// a shutdown signal. `on_ready` is called once every controller's cache holds its pipelines.
pub async fn run(
    client: Client,
    namespaces: &[String],
    settings: Settings,
    metrics: Arc<Metrics>,
    on_ready: impl FnOnce() + Send,
) -> Result<(), ControllerError> {
    let scopes: Vec<Option<&str>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().map(|ns| Some(ns.as_str())).collect()
    };
    for scope in &scopes {
        pipeline_api(&client, *scope)
            .list(&ListParams::default().limit(1))
            .await
            .map_err(ControllerError::CrdMissing)?;
    }

    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
    let index = PipelineIndex::default();
    let mut caches = Caches::default();
    let mut secret_stores = Vec::new();
    let mut pipeline_stores = Vec::new();
    // Secret watches feed their stores only; nothing is triggered by them.
    let mut secret_watches = Vec::new();
    let mut controllers = Vec::new();
    for scope in &scopes {
        let (pipelines, pipeline_writer) = reflector::store::<SignalPipeline>();
        let mut feeder = index.feeder(scope.map(str::to_string));
        let pipeline_events = watcher(pipeline_api(&client, *scope), watcher::Config::default())
            .default_backoff()
            .modify(strip_managed_fields)
            .map_ok(move |event| {
                feeder.apply_watcher_event(&event);
                event
            })
            .reflect(pipeline_writer)
            .applied_objects()
            .predicate_filter(reconcile_relevant, PredicateConfig::default());
        let (deployments, deployment_writer) = reflector::store::<Deployment>();
        let deployment_events = watcher(scoped_api::<Deployment>(&client, *scope), owned.clone())
            .default_backoff()
            // A reconcile reads an owned Deployment's replicas, pod-template annotations,
            // generation and status, never its pod spec.
            .modify(|deployment: &mut Deployment| {
                strip_managed_fields(deployment);
                if let Some(spec) = &mut deployment.spec {
                    spec.template.spec = None;
                }
            })
            .reflect(deployment_writer);
        // Deletions too: a deleted Deployment is put back.
        let deployment_events = relevant_changes(deployment_events, deployment_relevant);
        let (configmaps, configmap_writer) = reflector::store::<ConfigMap>();
        let configmap_events = watcher(scoped_api::<ConfigMap>(&client, *scope), owned.clone())
            .default_backoff()
            // A reconcile needs an owned ConfigMap's version only (to skip an unchanged apply).
            .modify(|configmap: &mut ConfigMap| {
                strip_managed_fields(configmap);
                configmap.data = None;
                configmap.binary_data = None;
            })
            .reflect(configmap_writer)
            .touched_objects();
        // Metadata only: a Secret's data is read when a pipeline needs it, once per version.
        let (secrets, secret_writer) = reflector::store();
        secret_watches.push(
            watcher(
                scoped_api::<PartialObjectMeta<Secret>>(&client, *scope),
                watcher::Config::default(),
            )
            .default_backoff()
            .reflect(secret_writer)
            .for_each(|_| futures::future::ready(())),
        );
        caches.deployments.push(deployments);
        caches.configmaps.push(configmaps);
        secret_stores.push(secrets);
        pipeline_stores.push(pipelines.clone());
        controllers.push(
            Controller::for_stream(pipeline_events, pipelines)
                .owns_stream(deployment_events)
                .owns_stream(configmap_events)
                .with_config(ControllerConfig::default().concurrency(settings.concurrency))
                .shutdown_on_signal(),
        );
    }
    caches.secrets = Some(SecretCache::new(secret_stores));
    let stores = pipeline_stores;
    let ctx = Arc::new(Context::new(client.clone(), settings, metrics, index).with_caches(caches));

    let runs = controllers.into_iter().map(|controller| {
        controller
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|result| async move {
                match result {
                    Ok((object, _)) => tracing::debug!(pipeline = %object, "reconciled"),
                    // Reconcile failures were already logged by `error_policy`.
                    Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                    Err(error) => warn!(%error, "controller"),
                }
            })
    });
    let ready = async {
        for store in &stores {
            // Only fails when the controller stopped first, which `runs` reports.
            let _ = store.wait_until_ready().await;
        }
        info!(scopes = scopes.len(), "controller caches are filled");
        on_ready();
    };
    // The Secret watches run until the controllers stop (on a shutdown signal).
    tokio::select! {
        _ = async { futures::join!(join_all(runs), ready) } => {}
        _ = join_all(secret_watches) => {}
    }
    info!("controller stopped");
    Ok(())
}

fn pipeline_api(client: &Client, namespace: Option<&str>) -> Api<SignalPipeline> {
    scoped_api(client, namespace)
}

fn scoped_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_change_does_not_trigger_a_reconcile_but_spec_and_finalizers_do() {
        let pipeline = crate::workload::fixtures::stored_pipeline("orders");
        let mut with_status = pipeline.clone();
        with_status.status = Some(signal_model::SignalPipelineStatus {
            replicas: 3,
            ..Default::default()
        });
        assert_eq!(
            reconcile_relevant(&pipeline),
            reconcile_relevant(&with_status)
        );
        let mut edited = pipeline.clone();
        edited.metadata.generation = Some(edited.metadata.generation.unwrap_or(1) + 1);
        assert_ne!(reconcile_relevant(&pipeline), reconcile_relevant(&edited));
        let mut finalized = pipeline.clone();
        finalized.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
        assert_ne!(
            reconcile_relevant(&pipeline),
            reconcile_relevant(&finalized)
        );
    }

    #[tokio::test]
    async fn a_deployment_triggers_on_replica_counts_and_deletion_not_on_condition_timestamps() {
        use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

        let mut pending = Deployment::default();
        pending.metadata.name = Some("orders-workers".to_string());
        pending.metadata.namespace = Some("team".to_string());
        pending.metadata.generation = Some(1);
        pending.status = Some(DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(2),
            conditions: Some(vec![DeploymentCondition {
                type_: "Progressing".to_string(),
                status: "True".to_string(),
                last_update_time: Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let mut touched = pending.clone();
        if let Some(conditions) = touched.status.as_mut().and_then(|s| s.conditions.as_mut()) {
            conditions[0].last_update_time = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        }
        let mut one_ready = touched.clone();
        if let Some(status) = one_ready.status.as_mut() {
            status.ready_replicas = Some(1);
        }
        let events = futures::stream::iter(
            [
                watcher::Event::Init,
                watcher::Event::InitApply(pending.clone()),
                watcher::Event::InitDone,
                watcher::Event::Apply(touched),
                watcher::Event::Apply(one_ready.clone()),
                watcher::Event::Delete(one_ready),
            ]
            .map(Ok),
        );
        let triggers: Vec<Deployment> = relevant_changes(events, deployment_relevant)
            .try_collect()
            .await
            .unwrap();
        let ready: Vec<Option<i32>> = triggers
            .iter()
            .map(|d| d.status.as_ref().and_then(|s| s.ready_replicas))
            .collect();
        // The first sight, one more ready worker, and the deletion (same object as last seen).
        assert_eq!(ready, vec![None, Some(1), Some(1)]);
    }

    #[tokio::test]
    async fn the_manifest_is_rendered_once_per_generation_and_matches_the_configmap() {
        let ctx = offline_context(Settings::new("signal-worker:test"));
        let pipeline = crate::workload::fixtures::stored_pipeline("orders");
        let configmap = crate::workload::build_configmap(&pipeline).unwrap();
        let digest = ctx.manifest_digest(&pipeline).unwrap();
        assert_eq!(digest.config_hash, crate::workload::config_hash(&configmap));
        assert_eq!(digest.fingerprint, fingerprint(&configmap));

        // Same generation: the remembered digest, even for a spec that would render otherwise
        // (the API server bumps the generation with every spec change).
        let mut same_generation = pipeline.clone();
        same_generation.spec.workers.batch.max_rows += 1;
        assert_eq!(ctx.manifest_digest(&same_generation).unwrap(), digest);

        let mut edited = same_generation;
        edited.metadata.generation = Some(pipeline.metadata.generation.unwrap_or(1) + 1);
        let rendered = crate::workload::build_configmap(&edited).unwrap();
        let next = ctx.manifest_digest(&edited).unwrap();
        assert_ne!(next, digest);
        assert_eq!(next.config_hash, crate::workload::config_hash(&rendered));
    }

    /// A context whose client answers nothing: for what a reconcile keeps, not what it asks.
    fn offline_context(settings: Settings) -> Context {
        let (service, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        Context::new(
            Client::new(service, "default"),
            settings,
            Arc::new(Metrics::default()),
            PipelineIndex::default(),
        )
    }

    #[tokio::test]
    async fn a_ready_data_plane_report_stands_in_briefly_for_the_same_version_only() {
        let ctx = offline_context(Settings::new("signal-worker:test"));
        let pipeline = crate::workload::fixtures::stored_pipeline("orders");
        let credentials = PipelineCredentials::default();
        let ready =
            crate::dataplane::PartReport::ready("Created", "created", vec!["created".into()]);
        let report = DataPlaneReport {
            stream: ready.clone(),
            consumer: ready.clone(),
            table: ready.clone(),
            dead_letter: ready,
            health_stream_changes: vec!["created the health stream".into()],
            ..DataPlaneReport::default()
        };
        assert!(ctx.recent_data_plane(&pipeline, &credentials).is_none());
        ctx.remember_data_plane(&pipeline, &credentials, &report);
        let reused = ctx
            .recent_data_plane(&pipeline, &credentials)
            .expect("a ready report just taken is reused");
        assert!(reused.all_ready());
        assert_eq!(
            reused.changes().count(),
            0,
            "its events were published once"
        );
        assert!(reused.health_stream_changes.is_empty());

        // Another generation, other credentials or an autoscaled pipeline look again.
        let mut edited = pipeline.clone();
        edited.metadata.generation = Some(pipeline.metadata.generation.unwrap_or(1) + 1);
        assert!(ctx.recent_data_plane(&edited, &credentials).is_none());
        let mut rotated = PipelineCredentials::default();
        rotated.clickhouse.user = Some("rotated".into());
        assert!(ctx.recent_data_plane(&pipeline, &rotated).is_none());
        let mut autoscaled = pipeline.clone();
        autoscaled.spec.workers.autoscale = Some(
            serde_json::from_value(
                serde_json::json!({"maxReplicas": 4, "targetLagPerReplica": 1000}),
            )
            .expect("an autoscale spec"),
        );
        assert!(ctx.recent_data_plane(&autoscaled, &credentials).is_none());

        // A report that found something not ready is not kept, and replaces the ready one.
        let mut failing = report.clone();
        failing.table.ready = false;
        ctx.remember_data_plane(&pipeline, &credentials, &failing);
        assert!(ctx.recent_data_plane(&pipeline, &credentials).is_none());

        // A resync never takes it: the window is at most half the resync interval.
        let mut hurried = Settings::new("signal-worker:test");
        hurried.resync_interval = Duration::ZERO;
        let ctx = offline_context(hurried);
        ctx.remember_data_plane(&pipeline, &credentials, &report);
        assert!(ctx.recent_data_plane(&pipeline, &credentials).is_none());
    }

    #[tokio::test]
    async fn lagging_replicas_are_looked_at_again_soon_and_ever_later_while_they_lag() {
        let ctx = offline_context(Settings::new("signal-worker:test"));
        let pipeline = crate::workload::fixtures::stored_pipeline("orders");
        let credentials = PipelineCredentials::default();
        let ready = crate::dataplane::PartReport::ready("Created", "created", Vec::new());
        let current = DataPlaneReport {
            stream: ready.clone(),
            consumer: ready.clone(),
            table: ready.clone(),
            dead_letter: ready,
            stream_status: Some(signal_model::StreamStatus {
                leader: Some("n1".into()),
                current_replicas: Some(3),
                ..signal_model::StreamStatus::default()
            }),
            ..DataPlaneReport::default()
        };
        let mut lagging = current.clone();
        lagging.stream_status = Some(signal_model::StreamStatus {
            current_replicas: Some(2),
            lagging_replicas: vec!["n3".into()],
            ..current.stream_status.clone().expect("figures")
        });
        assert!(lagging.replicas_lagging() && !current.replicas_lagging());

        ctx.remember_data_plane(&pipeline, &credentials, &lagging);
        assert_eq!(
            ctx.lagging_recheck(&pipeline),
            Some(LAGGING_RECHECK_FIRST),
            "a stream just found lagging is looked at again within seconds"
        );
        assert!(
            ctx.recent_data_plane(&pipeline, &credentials).is_none(),
            "a report with lagging replicas is not reused: the next look is a new one"
        );
        ctx.remember_data_plane(&pipeline, &credentials, &current);
        assert_eq!(ctx.lagging_recheck(&pipeline), None);
        assert!(ctx.recent_data_plane(&pipeline, &credentials).is_some());

        // The dead-letter stream's lagging replicas count too.
        let mut dead_letter_lagging = current.clone();
        dead_letter_lagging.dead_letter.reason = crate::dataplane::stream::REPLICAS_DEGRADED.into();
        assert!(dead_letter_lagging.replicas_lagging());

        // The delay grows with how long they have lagged, so a server that stays away costs a
        // fleet ever fewer looks.
        assert_eq!(lagging_recheck_delay(Duration::ZERO), LAGGING_RECHECK_FIRST);
        assert_eq!(
            lagging_recheck_delay(Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert_eq!(
            lagging_recheck_delay(Duration::from_secs(40)),
            Duration::from_secs(40)
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff_delay(0), Duration::from_secs(5));
        assert_eq!(backoff_delay(1), Duration::from_secs(10));
        assert_eq!(backoff_delay(3), Duration::from_secs(40));
        assert_eq!(backoff_delay(6), Duration::from_secs(300));
        assert_eq!(backoff_delay(200), Duration::from_secs(300));
    }
}
