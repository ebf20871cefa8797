//! The SignalPipeline controller: watches pipelines and the Deployments and ConfigMaps they own,
//! and runs [`reconcile::reconcile`] for each pipeline that changed.
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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ListParams;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use signal_clients::retry::RetryPolicy;
use signal_model::SignalPipeline;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::workload::FIELD_MANAGER;
pub use reconcile::{FINALIZER, ReconcileError, reconcile};

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
}

impl Settings {
    pub fn new(default_worker_image: impl Into<String>) -> Self {
        Self {
            default_worker_image: default_worker_image.into(),
            cleanup_timeout: Duration::from_secs(300),
            resync_interval: Duration::from_secs(60),
            autoscale_interval: Duration::from_secs(15),
        }
    }
}

/// Every pipeline the operator watches, across its controllers' caches: the view conflicts are
/// decided on.
#[derive(Clone, Default)]
pub struct PipelineIndex {
    stores: Vec<Store<SignalPipeline>>,
}

impl PipelineIndex {
    pub fn new(stores: Vec<Store<SignalPipeline>>) -> Self {
        Self { stores }
    }

    pub fn all(&self) -> Vec<Arc<SignalPipeline>> {
        self.stores.iter().flat_map(|store| store.state()).collect()
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub pipelines: PipelineIndex,
    /// Consecutive failures per `namespace/name`, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
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
            settings,
            metrics,
            pipelines,
            failures: Mutex::new(HashMap::new()),
        }
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
    let controllers: Vec<Controller<SignalPipeline>> = scopes
        .iter()
        .map(|scope| {
            Controller::new(pipeline_api(&client, *scope), watcher::Config::default())
                .owns(scoped_api::<Deployment>(&client, *scope), owned.clone())
                .owns(scoped_api::<ConfigMap>(&client, *scope), owned.clone())
                .with_config(ControllerConfig::default().concurrency(8))
                .shutdown_on_signal()
        })
        .collect();
    let stores: Vec<Store<SignalPipeline>> = controllers.iter().map(Controller::store).collect();
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics,
        PipelineIndex::new(stores.clone()),
    ));

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
    futures::join!(join_all(runs), ready);
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
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff_delay(0), Duration::from_secs(5));
        assert_eq!(backoff_delay(1), Duration::from_secs(10));
        assert_eq!(backoff_delay(3), Duration::from_secs(40));
        assert_eq!(backoff_delay(6), Duration::from_secs(300));
        assert_eq!(backoff_delay(200), Duration::from_secs(300));
    }
}
