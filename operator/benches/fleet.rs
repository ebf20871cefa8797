//! The operator at fleet scale, on the suite's real control plane; prints figures, asserts
//! nothing. Run with `cargo bench -p signal-operator --bench fleet`.
//!
//! For each size in `SIGNAL_FLEET_SIZES` (default `200,1000,2000`), in a process of its own: a
//! fresh testkit control plane (etcd, kube-apiserver, kube-controller-manager), a fresh nats-server
//! and clickhouse-server, and the operator binary run out of cluster with the admin kubeconfig,
//! watching that namespace. The bench applies N pipelines (each its own stream, consumer and
//! table, all tables in one database as a platform team would have them), publishes a health
//! report for one worker of each every 30 s (no node runs the workers; their reports are what
//! the operator reads for each pipeline's `WorkersHealthy` condition) and prints:
//!
//! - the time until every pipeline's data plane is ready (`StreamReady`, `ConsumerReady` and
//!   `TableReady` true; no node runs, so workers stay pending) and pipelines per second;
//! - the operator's peak RSS (`VmHWM`);
//! - at rest (after all are ready, kube-controller-manager has rolled out every Deployment (a
//!   thousand take it minutes) and `SIGNAL_FLEET_SETTLE_SECS`, default 60 s, over
//!   `SIGNAL_FLEET_REST_SECS`, default 120 s: at least one resync of every pipeline; 0 measures
//!   the ramp only), the operator's CPU seconds per minute, NATS connections opened
//!   per minute (nats-server `/varz` `total_connections`), Kubernetes API requests per minute
//!   (kube-apiserver `apiserver_request_total`: every client's, the controller manager's
//!   included, with the writes to pipelines, Deployments, ConfigMaps and events apart) and the
//!   operator's reconciles per minute.
//!
//! Goals (issue 13): 1,000 pipelines ready in < 60 s on 2 cores, time growing no faster than N,
//! RSS < 64 MiB at 1,000, at rest < 3 % of a core and no new NATS connections.

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use signal_model::SignalPipeline;
use signal_model::worker_health::{
    HEALTH_REPORT_INTERVAL_SECS, WorkerHealthReport, health_subject,
};
use signal_testkit::{ClickHouseServer, NatsServer};

use cluster::{Operator, OperatorOptions, admin_client, apply_pipeline};

/// Pipelines applied at once.
const APPLY_CONCURRENCY: usize = 16;
/// How often readiness is counted while pipelines come up.
const READY_POLL: Duration = Duration::from_secs(1);
/// The one database every pipeline's table lives in.
const DATABASE: &str = "fleet";

fn main() -> Result<()> {
    let sizes = env_list("SIGNAL_FLEET_SIZES", &[200, 1000, 2000])?;
    let rest = Duration::from_secs(env_u64("SIGNAL_FLEET_REST_SECS", 120)?);
    // Time for the control plane's own tail (kube-controller-manager updating the new Deployments'
    // status, each an event that reconciles the owner) before the rest window.
    let settle = Duration::from_secs(env_u64("SIGNAL_FLEET_SETTLE_SECS", 60)?);
    let ready_timeout = Duration::from_secs(env_u64("SIGNAL_FLEET_READY_TIMEOUT_SECS", 900)?);
    if sizes.len() > 1 {
        return each_size_on_its_own_control_plane(&sizes);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let _ = cluster::cluster();
    println!(
        "control plane: kube-apiserver {} started in {:.1?}",
        signal_testkit::KUBERNETES_VERSION,
        started.elapsed()
    );
    let mut rows = Vec::new();
    for size in sizes {
        let row = runtime.block_on(run_size(size, settle, rest, ready_timeout))?;
        println!("{}", row.line());
        rows.push(row);
    }
    println!();
    println!("{}", Row::header());
    for row in &rows {
        println!("{}", row.line());
    }
    Ok(())
}

/// Runs this bench once per size, each in a process of its own and so on a control plane of its
/// own: otherwise etcd, kube-apiserver and kube-controller-manager would still hold the earlier
/// sizes' pipelines, Deployments and pods while a larger size is measured. Prints the children's
/// output as it comes and their rows together at the end.
fn each_size_on_its_own_control_plane(sizes: &[usize]) -> Result<()> {
    use std::io::BufRead;
    let program = std::env::current_exe().context("finding the bench's own binary")?;
    let mut rows = Vec::new();
    for size in sizes {
        let mut child = std::process::Command::new(&program)
            .args(std::env::args_os().skip(1))
            .env("SIGNAL_FLEET_SIZES", size.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} for {size} pipelines", program.display()))?;
        let stdout = child.stdout.take().context("the child's stdout")?;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.context("reading the child's output")?;
            println!("{line}");
            if line.starts_with(&format!("| {size} |")) {
                rows.push(line);
            }
        }
        let status = child.wait().context("waiting for the child")?;
        if !status.success() {
            bail!("the bench for {size} pipelines failed: {status}");
        }
    }
    println!();
    println!("{}", Row::header());
    // Each child prints its row twice (as it ends and in its table): one of each size.
    rows.dedup();
    for row in rows {
        println!("{row}");
    }
    Ok(())
}

/// The figures of one size.
struct Row {
    pipelines: usize,
    ready_after: Option<Duration>,
    ready_count: usize,
    peak_rss_kib: u64,
    rest_minutes: f64,
    cpu_seconds: f64,
    nats_connections: u64,
    api_requests: u64,
    api_writes: BTreeMap<String, u64>,
    reconciles: u64,
    operator_writes: u64,
}

impl Row {
    fn header() -> String {
        "| pipelines | all data planes ready | pipelines/s | operator peak RSS | CPU at rest (s/min) | NATS connects at rest (/min) | API requests at rest (/min, all clients) | writes at rest to the operator's kinds (/min, all clients) | operator's own writes at rest (/min) | reconciles at rest (/min) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |".to_string()
    }

    fn line(&self) -> String {
        let per_minute = |count: f64| count / self.rest_minutes;
        let ready = match self.ready_after {
            Some(after) => format!("{:.1} s", after.as_secs_f64()),
            None => format!("not all ({} ready)", self.ready_count),
        };
        let rate = self
            .ready_after
            .map(|after| format!("{:.1}", self.pipelines as f64 / after.as_secs_f64()))
            .unwrap_or_else(|| "-".to_string());
        if self.rest_minutes == 0.0 {
            return format!(
                "| {} | {ready} | {rate} | {:.1} MiB | not measured (SIGNAL_FLEET_REST_SECS=0) | - | - | - | - | - |",
                self.pipelines,
                self.peak_rss_kib as f64 / 1024.0
            );
        }
        let writes: u64 = self.api_writes.values().sum();
        let writes_detail = self
            .api_writes
            .iter()
            .map(|(key, count)| format!("{key} {:.0}", per_minute(*count as f64)))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "| {} | {ready} | {rate} | {:.1} MiB | {:.2} ({:.1} % of a core) | {:.1} | {:.0} | {:.0}{} | {:.0} | {:.0} |",
            self.pipelines,
            self.peak_rss_kib as f64 / 1024.0,
            per_minute(self.cpu_seconds),
            per_minute(self.cpu_seconds) / 60.0 * 100.0,
            per_minute(self.nats_connections as f64),
            per_minute(self.api_requests as f64),
            per_minute(writes as f64),
            if writes_detail.is_empty() {
                String::new()
            } else {
                format!(" ({writes_detail})")
            },
            per_minute(self.operator_writes as f64),
            per_minute(self.reconciles as f64),
        )
    }
}

async fn run_size(
    size: usize,
    settle: Duration,
    rest: Duration,
    ready_timeout: Duration,
) -> Result<Row> {
    println!("--- {size} pipelines");
    let client = admin_client().await?;
    let namespace = cluster::namespace("fleet");
    let nats = NatsServer::start().context("starting nats-server")?;
    let clickhouse = ClickHouseServer::start().context("starting clickhouse-server")?;
    let monitoring = nats
        .monitoring_url()
        .context("the testkit's nats-server has a monitoring port")?;
    let operator = Operator::start(OperatorOptions {
        namespaces: vec![namespace.clone()],
        ..OperatorOptions::default()
    })?;
    let pid = operator.pid();
    let api: Api<SignalPipeline> = Api::namespaced(client.clone(), &namespace);

    let mut ramp_processes = vec![("operator", pid), ("bench", std::process::id())];
    ramp_processes.extend(cluster::cluster().pids());
    ramp_processes.extend(nats.pid().map(|pid| ("nats-server", pid)));
    ramp_processes.extend(clickhouse.pid().map(|pid| ("clickhouse-server", pid)));
    let ramp_cpu = CpuSnapshot::take(&ramp_processes)?;
    let dead_letters = DeadLetters::from_env()?;
    if dead_letters == DeadLetters::Shared {
        create_shared_dead_letter_stream(&nats.url()).await?;
    }
    let started = Instant::now();
    let manifests: Vec<serde_json::Value> = (0..size)
        .map(|index| {
            pipeline_manifest(
                &namespace,
                index,
                &nats.url(),
                &clickhouse.http_url(),
                dead_letters,
            )
        })
        .collect();
    let applied = futures::stream::iter(manifests.iter())
        .map(|manifest| apply_pipeline(&api, manifest))
        .buffer_unordered(APPLY_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    for result in applied {
        result?;
    }
    println!("applied {size} in {:.1?}", started.elapsed());
    let reports = tokio::spawn(stand_in_health_reports(nats.url(), size));

    let mut ready_after = None;
    let mut ready_count = 0;
    let mut last_report = Instant::now();
    // A watch, not a list per poll: listing thousands of pipelines every second would load the
    // API server the operator is measured against.
    let ready = Arc::new(AtomicUsize::new(0));
    let counter = tokio::spawn(count_data_plane_ready(api.clone(), ready.clone()));
    while started.elapsed() < ready_timeout {
        ready_count = ready.load(Ordering::Relaxed);
        if ready_count == size {
            ready_after = Some(started.elapsed());
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            println!(
                "  {ready_count}/{size} ready after {:.0?}, operator RSS {} KiB",
                started.elapsed(),
                proc_status_kib(pid, "VmRSS:").unwrap_or(0)
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(READY_POLL).await;
    }
    counter.abort();
    print_ramp_work(&operator, size)?;
    ramp_cpu.print_since(&ramp_processes, size, started.elapsed())?;
    if ready_after.is_none() {
        println!("  not all ready within {ready_timeout:?}: {ready_count}/{size}");
    }

    if rest.is_zero() {
        reports.abort();
        // The ramp alone, for a quicker look at how its time grows with the fleet.
        let peak_rss_kib = proc_status_kib(pid, "VmHWM:")?;
        drop(operator);
        return Ok(Row {
            pipelines: size,
            ready_after,
            ready_count,
            peak_rss_kib,
            rest_minutes: 0.0,
            cpu_seconds: 0.0,
            nats_connections: 0,
            api_requests: 0,
            api_writes: BTreeMap::new(),
            reconciles: 0,
            operator_writes: 0,
        });
    }

    // No node runs the pods, but kube-controller-manager still rolls out every Deployment (a
    // ReplicaSet, a pending pod, the status), 20 API requests a second by default: a thousand
    // take minutes, and each status change is a change of the pipeline's status. The fleet is at
    // rest once they are all rolled out.
    match wait_rolled_out(&client, &namespace, size, started, ready_timeout).await? {
        Some(after) => println!("  {size} Deployments rolled out after {after:.0?}"),
        None => println!("  not all Deployments rolled out within {ready_timeout:?}"),
    }
    tokio::time::sleep(settle).await;
    let before = RestSnapshot::take(pid, &monitoring, &operator)?;
    let rest_cpu = CpuSnapshot::take(&ramp_processes)?;
    tokio::time::sleep(rest).await;
    let after = RestSnapshot::take(pid, &monitoring, &operator)?;
    rest_cpu.print_rest_since(&ramp_processes, rest)?;
    let peak_rss_kib = proc_status_kib(pid, "VmHWM:")?;
    let mut api_writes = BTreeMap::new();
    for (key, count) in &after.api_writes {
        let delta = count.saturating_sub(before.api_writes.get(key).copied().unwrap_or(0));
        if delta > 0 {
            api_writes.insert(key.clone(), delta);
        }
    }
    reports.abort();
    drop(operator);
    Ok(Row {
        pipelines: size,
        ready_after,
        ready_count,
        peak_rss_kib,
        rest_minutes: rest.as_secs_f64() / 60.0,
        cpu_seconds: after.cpu_seconds - before.cpu_seconds,
        nats_connections: after.nats_connections - before.nats_connections,
        api_requests: after.api_requests.saturating_sub(before.api_requests),
        api_writes,
        reconciles: after.reconciles.saturating_sub(before.reconciles),
        operator_writes: after.operator_writes.saturating_sub(before.operator_writes),
    })
}

/// Waits until `size` Deployments in `namespace` are rolled out as far as the control plane
/// goes without a node (status for the current generation, every replica updated); returns the
/// time since `started`, or `None` past `timeout`.
async fn wait_rolled_out(
    client: &kube::Client,
    namespace: &str,
    size: usize,
    started: Instant,
    timeout: Duration,
) -> Result<Option<Duration>> {
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), namespace);
    while started.elapsed() < timeout {
        let list = deployments
            .list_metadata(&Default::default())
            .await
            .context("listing Deployments")?;
        let listed = list.items.len();
        if listed >= size {
            let full = deployments
                .list(&Default::default())
                .await
                .context("listing Deployments")?;
            let rolled_out = full
                .items
                .iter()
                .filter(|deployment| {
                    let wanted = deployment.spec.as_ref().and_then(|s| s.replicas);
                    deployment.status.as_ref().is_some_and(|status| {
                        status.observed_generation >= deployment.metadata.generation
                            && status.replicas == wanted
                            && status.updated_replicas == wanted
                    })
                })
                .count();
            if rolled_out >= size {
                return Ok(Some(started.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    Ok(None)
}

/// Publishes, every [`HEALTH_REPORT_INTERVAL_SECS`], a healthy report for one worker of each of
/// the `size` pipelines, as their workers would if a node ran them: what the operator reads for
/// the `WorkersHealthy` condition on every reconcile. Runs until aborted; a failed publish is
/// retried on the next round.
async fn stand_in_health_reports(nats_url: String, size: usize) {
    let Ok(client) = async_nats::connect(&nats_url).await else {
        return;
    };
    let mut every = tokio::time::interval(Duration::from_secs(HEALTH_REPORT_INTERVAL_SECS));
    loop {
        every.tick().await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for index in 0..size {
            let name = format!("p{index:05}");
            let worker = format!("{name}-workers-0");
            let report = WorkerHealthReport {
                worker: worker.clone(),
                ready: true,
                reason: None,
                message: "inserting".to_string(),
                reported_at_unix_ms: now,
            };
            let subject = health_subject(&name.to_uppercase(), &format!("{name}_ingest"), &worker);
            let Ok(payload) = serde_json::to_vec(&report) else {
                continue;
            };
            let _ = client.publish(subject, payload.into()).await;
        }
        let _ = client.flush().await;
    }
}

/// Where the fleet's dead letters are kept (`SIGNAL_FLEET_DEAD_LETTERS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeadLetters {
    /// `own` (the default): each pipeline's operator-managed `<stream>_DLQ`.
    Own,
    /// `shared`: one stream, `FLEET_DLQ` on `dlq.fleet.>`, made by the bench as a platform
    /// team's tool would, and named by every pipeline with `managed: false`.
    Shared,
}

impl DeadLetters {
    fn from_env() -> Result<Self> {
        match std::env::var("SIGNAL_FLEET_DEAD_LETTERS").as_deref() {
            Err(_) | Ok("") | Ok("own") => Ok(Self::Own),
            Ok("shared") => Ok(Self::Shared),
            Ok(other) => {
                bail!("SIGNAL_FLEET_DEAD_LETTERS must be `own` or `shared`, not `{other}`")
            }
        }
    }
}

const SHARED_DEAD_LETTER_STREAM: &str = "FLEET_DLQ";

async fn create_shared_dead_letter_stream(nats_url: &str) -> Result<()> {
    let client = async_nats::connect(nats_url)
        .await
        .context("connecting to nats-server for the shared dead-letter stream")?;
    async_nats::jetstream::new(client)
        .create_stream(async_nats::jetstream::stream::Config {
            name: SHARED_DEAD_LETTER_STREAM.to_string(),
            subjects: vec!["dlq.fleet.>".to_string()],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .context("creating the shared dead-letter stream")?;
    Ok(())
}

/// Pipeline `index` of the fleet: its own stream, subjects, consumer and table.
fn pipeline_manifest(
    namespace: &str,
    index: usize,
    nats_url: &str,
    clickhouse_url: &str,
    dead_letters: DeadLetters,
) -> serde_json::Value {
    let name = format!("p{index:05}");
    let dead_letter = match dead_letters {
        DeadLetters::Own => json!({}),
        DeadLetters::Shared => json!({
            "subject": format!("dlq.fleet.{name}"),
            "stream": {"managed": false, "name": SHARED_DEAD_LETTER_STREAM},
        }),
    };
    json!({
        "apiVersion": "signals.dev/v1alpha1",
        "kind": "SignalPipeline",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nats": {"url": nats_url},
            "stream": {
                "name": name.to_uppercase(),
                "subjects": [format!("fleet.{name}.>")],
                "maxAge": "1h",
            },
            "consumer": {"durableName": format!("{name}_ingest")},
            "clickhouse": {
                "url": clickhouse_url,
                "database": DATABASE,
                "table": format!("signals_{name}"),
                "orderBy": ["wallet", "event_time"],
                "partitionBy": "toYYYYMM(event_time)",
                "columns": [
                    {"name": "event_time", "type": "DateTime", "from": "$.event_time"},
                    {"name": "wallet", "type": "String", "from": "$.wallet"},
                    {"name": "amount", "type": "Int32", "from": "$.amount"},
                ],
            },
            "deadLetter": dead_letter,
            "deletionPolicy": "Retain",
        },
    })
}

/// Keeps `ready` at the number of pipelines whose stream, consumer and table conditions are all
/// true, from a watch of `api`.
async fn count_data_plane_ready(api: Api<SignalPipeline>, ready: Arc<AtomicUsize>) {
    let mut by_name: HashMap<String, bool> = HashMap::new();
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        let Ok(pipeline) = event else { continue };
        let data_plane_ready = ["StreamReady", "ConsumerReady", "TableReady"]
            .iter()
            .all(|type_| cluster::condition(&pipeline, type_).is_some_and(|c| c.status == "True"));
        by_name.insert(pipeline.name_any(), data_plane_ready);
        ready.store(by_name.values().filter(|r| **r).count(), Ordering::Relaxed);
    }
}

/// Counters read at both ends of the rest window.
struct RestSnapshot {
    cpu_seconds: f64,
    nats_connections: u64,
    api_requests: u64,
    /// Write requests by `VERB resource` to what the operator writes.
    api_writes: BTreeMap<String, u64>,
    reconciles: u64,
    /// The operator's own `signal_operator_writes_total{outcome="written"}`.
    operator_writes: u64,
}

impl RestSnapshot {
    fn take(pid: u32, nats_monitoring: &str, operator: &Operator) -> Result<Self> {
        let varz = http_get(nats_monitoring, "/varz")?;
        let varz: serde_json::Value = serde_json::from_str(&varz).context("parsing /varz")?;
        let nats_connections = varz["total_connections"]
            .as_u64()
            .context("/varz has total_connections")?;
        let (status, metrics) = cluster::cluster().request("GET", "/metrics", b"")?;
        if status != 200 {
            bail!("kube-apiserver /metrics answered {status}");
        }
        let (api_requests, api_writes) = apiserver_requests(&metrics);
        Ok(Self {
            cpu_seconds: cpu_seconds(pid)?,
            nats_connections,
            api_requests,
            api_writes,
            reconciles: operator.reconciles()?,
            operator_writes: operator_writes(operator)?,
        })
    }
}

/// CPU seconds per process and the machine's busy time at one moment: at the start of the ramp
/// (where the ramp's time goes, and whether a server's share per pipeline grows with the fleet)
/// and of the rest window (what the fleet at rest costs each server).
struct CpuSnapshot {
    per_process: Vec<f64>,
    machine_busy: f64,
}

impl CpuSnapshot {
    fn take(processes: &[(&str, u32)]) -> Result<Self> {
        Ok(Self {
            per_process: processes
                .iter()
                .map(|(_, pid)| cpu_seconds(*pid))
                .collect::<Result<_>>()?,
            machine_busy: machine_busy_seconds()?,
        })
    }

    fn print_since(&self, processes: &[(&str, u32)], size: usize, elapsed: Duration) -> Result<()> {
        let now = Self::take(processes)?;
        let per_process = processes
            .iter()
            .zip(now.per_process.iter().zip(&self.per_process))
            .map(|((name, _), (after, before))| {
                let seconds = after - before;
                format!(
                    "{name} {seconds:.1} s ({:.1} ms per pipeline)",
                    seconds * 1000.0 / size as f64
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let busy = now.machine_busy - self.machine_busy;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        println!(
            "  CPU until ready: {per_process}; machine busy {busy:.1} s of {:.1} ({:.0} %)",
            elapsed.as_secs_f64() * cores,
            busy / (elapsed.as_secs_f64() * cores) * 100.0
        );
        Ok(())
    }
}

impl CpuSnapshot {
    fn print_rest_since(&self, processes: &[(&str, u32)], elapsed: Duration) -> Result<()> {
        let now = Self::take(processes)?;
        let per_process = processes
            .iter()
            .zip(now.per_process.iter().zip(&self.per_process))
            .map(|((name, _), (after, before))| {
                format!(
                    "{name} {:.1} %",
                    (after - before) / elapsed.as_secs_f64() * 100.0
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        println!("  CPU at rest, % of a core: {per_process}");
        Ok(())
    }
}

/// The machine's non-idle CPU seconds since boot (`/proc/stat`, all cores).
fn machine_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .context("/proc/stat has a cpu line")?
        .split_whitespace()
        .filter_map(|value| value.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
    let busy: f64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(index, _)| *index != 3 && *index != 4)
        .map(|(_, ticks)| ticks)
        .sum();
    Ok(busy / 100.0)
}

/// What the operator did to bring the fleet up: reconciles and writes per pipeline, and the mean time and
/// the total of each reconcile step (`signal_operator_reconcile_step_duration_seconds`), so a
/// step whose cost grows with the fleet shows.
fn print_ramp_work(operator: &Operator, size: usize) -> Result<()> {
    let (status, body) = operator.http_get("/metrics")?;
    if status != 200 {
        bail!("the operator's /metrics answered {status}");
    }
    let reconciles = operator.reconciles()?;
    let mut steps: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("signal_operator_reconcile_step_duration_seconds_")
        else {
            continue;
        };
        let Some((kind, rest)) = rest.split_once('{') else {
            continue;
        };
        let Some(step) = rest
            .split_once("step=\"")
            .and_then(|(_, tail)| tail.split_once('"'))
            .map(|(step, _)| step.to_string())
        else {
            continue;
        };
        let Some(value) = line
            .rsplit_once(' ')
            .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        else {
            continue;
        };
        let entry = steps.entry(step).or_default();
        match kind {
            "sum" => entry.0 = value,
            "count" => entry.1 = value,
            _ => {}
        }
    }
    let per_step = steps
        .iter()
        .filter(|(_, (_, count))| *count > 0.0)
        .map(|(step, (sum, count))| {
            format!(
                "{step} {:.1} ms × {count:.0} = {sum:.1} s",
                sum / count * 1000.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let writes = operator_writes(operator)?;
    let by_object = body
        .lines()
        .filter(|line| {
            line.starts_with("signal_operator_writes_total{")
                && line.contains("outcome=\"written\"")
        })
        .filter_map(|line| {
            let object = line.split_once("object=\"")?.1.split_once('"')?.0;
            let count = line.rsplit_once(' ')?.1.trim().parse::<f64>().ok()?;
            Some(format!("{object} {:.2}", count / size as f64))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let failures = body
        .lines()
        .filter_map(|line| line.strip_prefix("signal_operator_reconcile_failures_total{"))
        .filter_map(|rest| {
            let reason = rest.split_once("reason=\"")?.1.split_once('"')?.0;
            let count = rest.rsplit_once(' ')?.1.trim().parse::<f64>().ok()?;
            Some(format!("{reason} {count:.0}"))
        })
        .collect::<Vec<_>>();
    let failures = if failures.is_empty() {
        "none".to_string()
    } else {
        failures.join(", ")
    };
    println!(
        "  until ready: {reconciles} reconciles ({:.2} per pipeline), failed: {failures}, {writes} writes ({:.2} per pipeline: {by_object}); mean step times: {per_step}",
        reconciles as f64 / size as f64,
        writes as f64 / size as f64
    );
    Ok(())
}

/// The writes the operator made (status, Deployment, ConfigMap), by its own metric.
fn operator_writes(operator: &Operator) -> Result<u64> {
    let (status, body) = operator.http_get("/metrics")?;
    if status != 200 {
        bail!("the operator's /metrics answered {status}");
    }
    Ok(body
        .lines()
        .filter(|line| {
            line.starts_with("signal_operator_writes_total{")
                && line.contains("outcome=\"written\"")
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// The sum of `apiserver_request_total`, and the writes to the operator's kinds by verb.
fn apiserver_requests(metrics: &str) -> (u64, BTreeMap<String, u64>) {
    let mut total = 0;
    let mut writes = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let count = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
        total += count;
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                .map(|value| value.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let (verb, resource) = (label("verb"), label("resource"));
        let written = matches!(verb.as_str(), "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE");
        let ours = matches!(
            resource.as_str(),
            "signalpipelines" | "deployments" | "configmaps" | "events" | "secrets"
        );
        if written && ours {
            *writes.entry(format!("{verb} {resource}")).or_insert(0) += count;
        }
    }
    (total, writes)
}

/// User + system CPU time of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3, `state`.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| -> Result<f64> {
        fields
            .get(index)
            .and_then(|value| value.parse::<f64>().ok())
            .context("parsing /proc/PID/stat")
    };
    // utime and stime are fields 14 and 15 (1-based), indexes 11 and 12 here.
    let clock_ticks = 100.0; // sysconf(_SC_CLK_TCK) on Linux x86-64.
    Ok((ticks(11)? + ticks(12)?) / clock_ticks)
}

/// A `kB` field of `/proc/PID/status` (`VmRSS:`, `VmHWM:`).
fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// A plain HTTP GET of `base` (`http://host:port`) + `path`; the body.
fn http_get(base: &str, path: &str) -> Result<String> {
    let address = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).with_context(|| format!("connecting {base}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("an HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {base}{path}: {head}");
    }
    Ok(body.to_string())
}

fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .with_context(|| format!("{name}={value} is not a number")),
        Err(_) => Ok(default),
    }
}

fn env_list(name: &str, default: &[usize]) -> Result<Vec<usize>> {
    match std::env::var(name) {
        Ok(value) => value
            .split(',')
            .map(|one| {
                one.trim()
                    .parse()
                    .with_context(|| format!("{name}={value}: `{one}` is not a number"))
            })
            .collect(),
        Err(_) => Ok(default.to_vec()),
    }
}
