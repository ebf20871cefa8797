//! Benchmark of the operator's reconcile against real local servers; prints figures, asserts
//! nothing. Run with `cargo bench -p signal-operator --bench reconcile`.
//!
//! (a) Time to Ready: [`reconcile_data_plane`] for fresh pipelines (stream, consumer and table
//!     created on a local nats-server and clickhouse-server), then a no-op re-reconcile of each.
//!     Goal: Ready in under 2 s.
//! (b) Memory and reconcile rate with 200 pipelines: the controller's own
//!     [`reconcile`](signal_operator::controller::reconcile) for 200 pipelines held in a reflector
//!     store, against a fake Kubernetes API (a tower service that answers every request
//!     generically) and the real local servers, 8 at a time like the controller. Prints
//!     reconciles/s for the creating pass and for steady-state passes, and the process's VmRSS /
//!     VmHWM. Goal: under 40 MiB RSS.
//!
//! The servers are child processes, so their memory is not in the figures; the fake API's stored
//! objects are, and their size is printed so it can be subtracted.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::runtime::reflector;
use kube::runtime::watcher;
use serde_json::{Value, json};
use signal_model::credentials::PipelineCredentials;
use signal_model::{
    ClickHouseSpec, ColumnSpec, ConsumerSpec, HumanDuration, NatsSpec, SignalPipeline,
    SignalPipelineSpec, StreamSpec,
};
use signal_operator::controller::{Context, FINALIZER, PipelineIndex, Settings, reconcile};
use signal_operator::dataplane::reconcile_data_plane;
use signal_operator::metrics::Metrics;
use signal_testkit::{ClickHouseServer, NatsServer};

const FRESH_PIPELINES: usize = 7;
const HELD_PIPELINES: usize = 200;
/// The controller's `ControllerConfig::concurrency`.
const CONCURRENCY: usize = 8;
const STEADY_PASSES: usize = 5;
const NAMESPACE: &str = "bench";
const CRD_PATH: &str = "/apis/signals.dev/v1alpha1/namespaces";

fn main() -> anyhow::Result<()> {
    let start_memory = Memory::read()?;
    let nats = NatsServer::start().context("starting nats-server")?;
    let clickhouse = ClickHouseServer::start().context("starting clickhouse-server")?;
    let clickhouse_version = clickhouse.query("SELECT version()")?;
    println!(
        "servers: nats-server at {} (2.9.10 from Debian), clickhouse-server {} at {}",
        nats.url(),
        clickhouse_version.trim(),
        clickhouse.http_url()
    );
    // Like the operator's #[tokio::main] on this 2-core machine.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let servers = Servers {
        nats: nats.url(),
        clickhouse: clickhouse.http_url(),
    };
    println!("memory at start: {start_memory}");
    runtime.block_on(time_to_ready(&servers))?;
    runtime.block_on(many_pipelines(&servers))?;
    Ok(())
}

struct Servers {
    nats: String,
    clickhouse: String,
}

/// A realistic pipeline: its own stream, consumer and table (in a database shared by the run).
fn pipeline_spec(servers: &Servers, name: &str) -> SignalPipelineSpec {
    SignalPipelineSpec {
        nats: NatsSpec {
            url: servers.nats.clone(),
            auth: None,
            tls: None,
        },
        stream: StreamSpec {
            name: name.to_uppercase(),
            subjects: vec![format!("{name}.>")],
            max_age: Some(HumanDuration::from_secs(7 * 86_400)),
            replicas: 1,
            ..StreamSpec::default()
        },
        consumer: ConsumerSpec {
            filter_subject: Some(format!("{name}.transaction")),
            ..ConsumerSpec::default()
        },
        clickhouse: ClickHouseSpec {
            url: servers.clickhouse.clone(),
            database: "bench".to_string(),
            table: name.replace('-', "_"),
            auth: None,
            tls: None,
            engine: "MergeTree".to_string(),
            partition_by: Some("toYYYYMM(event_time)".to_string()),
            order_by: vec!["wallet_address".to_string(), "event_time".to_string()],
            ttl: None,
            cluster: None,
            columns: vec![
                ColumnSpec::new("event_time", "DateTime", "$.event_time"),
                ColumnSpec::new("source_id", "String", "$.source_id"),
                ColumnSpec::new("wallet_address", "String", "$.wallet_address"),
                ColumnSpec::new("tx_hash", "String", "$.payload.tx_hash"),
                ColumnSpec::new("amount", "Decimal(38, 18)", "$.payload.amount"),
                ColumnSpec::new("severity", "UInt8", "$.severity"),
                ColumnSpec::new("subject", "String", "@subject"),
                ColumnSpec::new("stream_seq", "UInt64", "@sequence"),
            ],
        },
        ..SignalPipelineSpec::default()
    }
}

fn run_id() -> String {
    format!("b{}", std::process::id())
}

/// (a) Fresh pipelines to Ready, then a no-op re-reconcile of each.
async fn time_to_ready(servers: &Servers) -> anyhow::Result<()> {
    let credentials = PipelineCredentials::default();
    let mut fresh = Vec::new();
    let mut noop = Vec::new();
    for index in 0..FRESH_PIPELINES {
        let name = format!("{}-fresh-{index}", run_id());
        let spec = pipeline_spec(servers, &name);
        let started = Instant::now();
        let report = reconcile_data_plane(&name, &spec, &credentials).await;
        fresh.push(started.elapsed());
        if !report.all_ready() || report.changes().count() < 3 {
            bail!("pipeline {name} did not become ready from scratch: {report:#?}");
        }
        let started = Instant::now();
        let report = reconcile_data_plane(&name, &spec, &credentials).await;
        noop.push(started.elapsed());
        if !report.all_ready() || report.changes().count() != 0 {
            bail!("the re-reconcile of {name} was not a no-op: {report:#?}");
        }
    }
    println!();
    println!("(a) time to Ready: reconcile_data_plane for a fresh pipeline");
    println!(
        "    creates stream + consumer + table: {}",
        Summary::of(&fresh)
    );
    println!(
        "    no-op re-reconcile:                {}",
        Summary::of(&noop)
    );
    println!("    goal: Ready < 2000 ms");
    Ok(())
}

/// (b) The controller's reconcile for many pipelines at once.
async fn many_pipelines(servers: &Servers) -> anyhow::Result<()> {
    let before_store = Memory::read()?;
    let pipelines: Vec<SignalPipeline> = (0..HELD_PIPELINES)
        .map(|index| held_pipeline(servers, index))
        .collect();
    let api = FakeApi::default();
    for pipeline in &pipelines {
        api.preload(pipeline)?;
    }
    let (store, mut writer) = reflector::store::<SignalPipeline>();
    let index = PipelineIndex::default();
    let mut feeder = index.feeder(None);
    for pipeline in pipelines {
        feeder.apply_watcher_event(&watcher::Event::Apply(pipeline.clone()));
        writer.apply_watcher_event(&watcher::Event::Apply(pipeline));
    }
    let client = kube::Client::new(api.clone(), "default");
    let ctx = Arc::new(Context::new(
        client,
        Settings::new("ghcr.io/signal-operator/worker:bench"),
        Arc::new(Metrics::default()),
        index,
    ));
    let after_store = Memory::read()?;

    println!();
    println!(
        "(b) {HELD_PIPELINES} pipelines in a reflector store, controller reconcile, {CONCURRENCY} at a time, fake Kubernetes API"
    );
    println!("    memory before the store:        {before_store}");
    println!("    memory with the store filled:   {after_store}");

    let created = reconcile_pass(&store, &ctx).await;
    println!(
        "    pass 1 (creates everything):    {created}; {}",
        Memory::read()?
    );
    for pass in 0..STEADY_PASSES {
        let steady = reconcile_pass(&store, &ctx).await;
        println!(
            "    pass {} (steady state, no-op):  {steady}; {}",
            pass + 2,
            Memory::read()?
        );
    }
    let end = Memory::read()?;
    println!(
        "    fake API: {} objects, {} KiB of JSON held in this process; requests {}",
        api.object_count(),
        api.stored_bytes() / 1024,
        api.request_counts()
    );
    println!(
        "    peak RSS (VmHWM) {:.1} MiB, RSS now {:.1} MiB; goal < 40 MiB with {HELD_PIPELINES} pipelines",
        mib(end.hwm_kib),
        mib(end.rss_kib)
    );
    Ok(())
}

/// A pipeline as the API server would hand it to the controller, already holding the finalizer
/// (so reconcile goes straight to applying it).
fn held_pipeline(servers: &Servers, index: usize) -> SignalPipeline {
    let name = format!("{}-held-{index:03}", run_id());
    let mut pipeline = SignalPipeline::new(&name, pipeline_spec(servers, &name));
    pipeline.metadata = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(NAMESPACE.to_string()),
        uid: Some(format!("00000000-0000-4000-8000-{index:012}")),
        resource_version: Some("1".to_string()),
        generation: Some(1),
        finalizers: Some(vec![FINALIZER.to_string()]),
        creation_timestamp: Some(Time(
            k8s_openapi::jiff::Timestamp::now()
                - k8s_openapi::jiff::SignedDuration::from_secs(3600 - index as i64),
        )),
        ..ObjectMeta::default()
    };
    pipeline
}

/// Outcome of reconciling every pipeline once.
struct Pass {
    ok: usize,
    failed: usize,
    first_error: Option<String>,
    took: Duration,
}

impl std::fmt::Display for Pass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total = self.ok + self.failed;
        write!(
            f,
            "{total} reconciles in {:.0} ms = {:.0}/s ({} failed)",
            self.took.as_secs_f64() * 1000.0,
            total as f64 / self.took.as_secs_f64(),
            self.failed
        )?;
        if let Some(error) = &self.first_error {
            write!(f, " first error: {error}")?;
        }
        Ok(())
    }
}

async fn reconcile_pass(store: &reflector::Store<SignalPipeline>, ctx: &Arc<Context>) -> Pass {
    let started = Instant::now();
    let results: Vec<Result<_, _>> = futures::stream::iter(store.state())
        .map(|pipeline| reconcile(pipeline, ctx.clone()))
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let took = started.elapsed();
    let failed: Vec<String> = results
        .iter()
        .filter_map(|result| result.as_ref().err().map(ToString::to_string))
        .collect();
    Pass {
        ok: results.len() - failed.len(),
        failed: failed.len(),
        first_error: failed.into_iter().next(),
        took,
    }
}

/// Median, min and max of some timings, in ms.
struct Summary {
    median: Duration,
    min: Duration,
    max: Duration,
    count: usize,
}

impl Summary {
    fn of(timings: &[Duration]) -> Self {
        let mut sorted = timings.to_vec();
        sorted.sort();
        Self {
            median: sorted.get(sorted.len() / 2).copied().unwrap_or_default(),
            min: sorted.first().copied().unwrap_or_default(),
            max: sorted.last().copied().unwrap_or_default(),
            count: sorted.len(),
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(
            f,
            "median {:.1} ms (min {:.1}, max {:.1}, n = {})",
            ms(self.median),
            ms(self.min),
            ms(self.max),
            self.count
        )
    }
}

/// This process's resident memory, from `/proc/self/status`, and its open file descriptors (a
/// connection leaked per reconcile would show there first).
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
    open_fds: usize,
}

impl Memory {
    fn read() -> anyhow::Result<Self> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        let field = |key: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
                .with_context(|| format!("no {key} in /proc/self/status"))
        };
        Ok(Self {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
            open_fds: std::fs::read_dir("/proc/self/fd")?.count(),
        })
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VmRSS {:.1} MiB, VmHWM {:.1} MiB, {} open fds",
            mib(self.rss_kib),
            mib(self.hwm_kib),
            self.open_fds
        )
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A Kubernetes API that answers every request generically: GET returns the stored object or
/// 404, POST stores and echoes the body (201), PATCH merges the body into the stored object (the
/// `/status` subresource into its parent) and returns it, DELETE removes. Events are echoed but
/// not kept, as an API server keeps them, not the operator.
#[derive(Clone, Default)]
struct FakeApi {
    objects: Arc<Mutex<HashMap<String, Bytes>>>,
    requests: Arc<Mutex<BTreeMap<String, u64>>>,
    resource_version: Arc<AtomicU64>,
}

type FakeResponse = Response<Full<Bytes>>;

impl FakeApi {
    fn preload(&self, pipeline: &SignalPipeline) -> anyhow::Result<()> {
        let name = pipeline.metadata.name.clone().unwrap_or_default();
        let path = format!("{CRD_PATH}/{NAMESPACE}/signalpipelines/{name}");
        self.store(path, &serde_json::to_value(pipeline)?);
        Ok(())
    }

    fn store(&self, path: String, object: &Value) {
        if let (Ok(mut objects), Ok(bytes)) = (self.objects.lock(), serde_json::to_vec(object)) {
            objects.insert(path, Bytes::from(bytes));
        }
    }

    fn load(&self, path: &str) -> Option<Value> {
        let objects = self.objects.lock().ok()?;
        serde_json::from_slice(objects.get(path)?).ok()
    }

    fn object_count(&self) -> usize {
        self.objects.lock().map(|o| o.len()).unwrap_or_default()
    }

    fn stored_bytes(&self) -> usize {
        self.objects
            .lock()
            .map(|o| o.iter().map(|(k, v)| k.len() + v.len()).sum())
            .unwrap_or_default()
    }

    fn request_counts(&self) -> String {
        self.requests
            .lock()
            .map(|counts| {
                counts
                    .iter()
                    .map(|(key, count)| format!("{key} {count}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    }

    fn count(&self, method: &Method, path: &str) {
        let kind = path
            .trim_end_matches("/status")
            .rsplit('/')
            .nth(1)
            .filter(|kind| !kind.is_empty())
            .unwrap_or("?");
        let kind = if path.ends_with("/status") {
            format!("{kind}/status")
        } else if method == Method::POST {
            path.rsplit('/').next().unwrap_or("?").to_string()
        } else {
            kind.to_string()
        };
        if let Ok(mut counts) = self.requests.lock() {
            *counts.entry(format!("{method} {kind}")).or_default() += 1;
        }
    }

    fn answer(&self, method: &Method, path: &str, body: &[u8]) -> FakeResponse {
        self.count(method, path);
        let keep = !path.contains("/events");
        match *method {
            Method::GET => match self.load(path) {
                Some(object) => json_response(StatusCode::OK, &object),
                None => status_response(StatusCode::NOT_FOUND, "NotFound", path),
            },
            Method::POST => {
                let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
                    return status_response(StatusCode::BAD_REQUEST, "BadRequest", path);
                };
                let name = object
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("unnamed")
                    .to_string();
                self.stamp(&mut object, None);
                if keep {
                    self.store(format!("{path}/{name}"), &object);
                }
                json_response(StatusCode::CREATED, &object)
            }
            Method::PATCH => {
                let Ok(patch) = serde_json::from_slice::<Value>(body) else {
                    return status_response(StatusCode::BAD_REQUEST, "BadRequest", path);
                };
                let (target, subresource) = match path.strip_suffix("/status") {
                    Some(parent) => (parent, true),
                    None => (path, false),
                };
                let existing = self.load(target);
                let mut object = existing.clone().unwrap_or_else(|| json!({}));
                if subresource {
                    // Only the status of the parent changes.
                    if let Some(status) = patch.get("status") {
                        object["status"] = status.clone();
                    }
                } else {
                    merge(&mut object, patch);
                }
                self.stamp(&mut object, existing.as_ref());
                if keep {
                    self.store(target.to_string(), &object);
                }
                json_response(StatusCode::OK, &object)
            }
            Method::DELETE => {
                if let Ok(mut objects) = self.objects.lock() {
                    objects.remove(path);
                }
                json_response(
                    StatusCode::OK,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                )
            }
            _ => status_response(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", path),
        }
    }

    /// What the API server adds to every stored object.
    fn stamp(&self, object: &mut Value, existing: Option<&Value>) {
        let version = self.resource_version.fetch_add(1, Ordering::Relaxed) + 2;
        let metadata = &mut object["metadata"];
        if !metadata.is_object() {
            *metadata = json!({});
        }
        metadata["resourceVersion"] = json!(version.to_string());
        if metadata.get("uid").is_none() {
            metadata["uid"] = json!(format!("fake-{version}"));
        }
        if metadata.get("creationTimestamp").is_none() {
            metadata["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        let generation = existing
            .and_then(|e| e.pointer("/metadata/generation"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        metadata["generation"] = json!(generation.max(1));
    }
}

/// Merges `patch` into `into`: objects key by key, anything else replaced.
fn merge(into: &mut Value, patch: Value) {
    match (into, patch) {
        (Value::Object(into), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(into.entry(key).or_insert(Value::Null), value);
            }
        }
        (into, patch) => *into = patch,
    }
}

fn json_response(status: StatusCode, object: &Value) -> FakeResponse {
    let body = serde_json::to_vec(object).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn status_response(status: StatusCode, reason: &str, path: &str) -> FakeResponse {
    json_response(
        status,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": format!("{path}: {reason}"),
            "reason": reason,
            "code": status.as_u16(),
        }),
    )
}

impl tower::Service<Request<kube::client::Body>> for FakeApi {
    type Response = FakeResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<FakeResponse, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<kube::client::Body>) -> Self::Future {
        let api = self.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body
                .collect()
                .await
                .map(|collected| collected.to_bytes())
                .unwrap_or_default();
            Ok(api.answer(&parts.method, parts.uri.path(), &body))
        })
    }
}
