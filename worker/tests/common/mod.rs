//! Shared setup for the worker's integration tests: real servers from the testkit, a pipeline
//! built around them (stream, durable consumer, table), publishing, polling with deadlines, and
//! workers run either in-process (`pipeline::run`) or as the `signal-worker` binary.
//!
//! Tests are synchronous: the servers' helpers block, and the async parts (NATS clients, an
//! in-process worker) run on a runtime owned by [`TestEnv`].

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, stream};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use signal_clients::consumer_config::desired_consumer_config;
use signal_model::credentials::PipelineCredentials;
use signal_model::manifest::PipelineManifest;
use signal_model::{ColumnSpec, HumanDuration, ServerVersion, SignalPipelineSpec, ddl};
use signal_testkit::{ChildProcess, ClickHouseServer, NatsServer, RedisServer};
use signal_worker::pipeline::{self, WorkerError, WorkerOptions};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// The server version the testkit's ClickHouse is; the table DDL is written for it.
pub const CLICKHOUSE_VERSION: ServerVersion = ServerVersion::new(18, 16);
/// Database every test table lives in.
pub const DATABASE: &str = "signal_test";
/// Publishes kept in flight at once.
const PUBLISH_WINDOW: usize = 1024;
/// Pause between two polls of a condition.
const POLL: Duration = Duration::from_millis(50);

/// Columns over the sample signals, keyed by stream sequence so rows can be counted per message.
pub fn sample_columns() -> Vec<ColumnSpec> {
    vec![
        ColumnSpec::new("seq", "UInt64", "@sequence"),
        ColumnSpec::new("subject", "String", "@subject"),
        ColumnSpec::new("event_time", "DateTime", "$.event_time"),
        ColumnSpec::new("event_type", "String", "$.event_type"),
        ColumnSpec::new("severity", "UInt8", "$.severity"),
        ColumnSpec::new("wallet_address", "String", "$.wallet_address"),
        ColumnSpec::new("amount", "Decimal(18, 2)", "$.payload.amount"),
        ColumnSpec::new("payload", "String", "$.payload"),
    ]
}

/// Polls `condition` until it holds, panicking with `what` once `timeout` has passed.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// `count()`, distinct sequences, smallest and largest sequence of a table's `seq` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceSummary {
    pub rows: u64,
    pub distinct: u64,
    pub min: u64,
    pub max: u64,
}

impl SequenceSummary {
    /// Rows that repeat a sequence already stored.
    pub fn duplicates(&self) -> u64 {
        self.rows - self.distinct
    }

    /// True when every sequence `1..=expected` is stored (at least once) and no other.
    pub fn covers(&self, expected: u64) -> bool {
        self.distinct == expected && self.min == 1 && self.max == expected
    }
}

/// Real NATS and ClickHouse (and optionally Redis) servers, a NATS client, and a temp dir.
pub struct TestEnv {
    pub runtime: tokio::runtime::Runtime,
    pub nats: NatsServer,
    pub clickhouse: ClickHouseServer,
    pub redis: Option<RedisServer>,
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    /// Starts NATS and ClickHouse.
    pub fn start() -> TestEnv {
        Self::start_with(false)
    }

    /// Starts NATS, ClickHouse and Redis.
    pub fn start_with_redis() -> TestEnv {
        Self::start_with(true)
    }

    /// Starts ClickHouse next to `nats` (e.g. a server with subject mappings).
    pub fn start_with_nats(nats: NatsServer) -> TestEnv {
        Self::start_around(nats, false)
    }

    fn start_with(with_redis: bool) -> TestEnv {
        Self::start_around(NatsServer::start().expect("nats-server"), with_redis)
    }

    fn start_around(nats: NatsServer, with_redis: bool) -> TestEnv {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let clickhouse = ClickHouseServer::start().expect("clickhouse-server");
        let redis = with_redis.then(|| RedisServer::start().expect("redis-server"));
        let client = runtime
            .block_on(async_nats::connect(nats.url()))
            .expect("NATS client");
        // The JetStream context spawns a task, so it needs the runtime entered.
        let jetstream = {
            let _entered = runtime.enter();
            jetstream::new(client.clone())
        };
        clickhouse
            .query(&ddl::create_database_sql(DATABASE, None))
            .expect("create database");
        TestEnv {
            runtime,
            nats,
            clickhouse,
            redis,
            client,
            jetstream,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// A pipeline named `name` over these servers: stream `NAME` on `name.>`, table `name`, small
    /// batches (500 rows, 200 ms) so that tests see several of them.
    pub fn manifest(&self, name: &str, columns: Vec<ColumnSpec>) -> PipelineManifest {
        let mut spec = SignalPipelineSpec::default();
        spec.nats.url = self.nats.url();
        spec.stream.name = name.to_uppercase();
        spec.stream.subjects = vec![format!("{name}.>")];
        spec.stream.replicas = 1;
        spec.clickhouse.url = self.clickhouse.http_url();
        spec.clickhouse.database = DATABASE.into();
        spec.clickhouse.table = name.into();
        spec.clickhouse.engine = "MergeTree".into();
        spec.clickhouse.columns = columns;
        spec.consumer.ack_wait = HumanDuration::from_secs(10);
        spec.workers.batch.max_rows = 500;
        spec.workers.batch.max_wait = HumanDuration(Duration::from_millis(200));
        let manifest = PipelineManifest::new(name, None, spec);
        manifest
            .spec
            .validate(name)
            .expect("the test's spec is valid");
        manifest
    }

    /// Creates the stream, the durable consumer and the table of `manifest` (what the operator
    /// does before workers start).
    pub fn provision(&self, manifest: &PipelineManifest) {
        let spec = &manifest.spec;
        self.runtime.block_on(async {
            let stream = self
                .jetstream
                .create_stream(stream::Config {
                    name: spec.stream.name.clone(),
                    subjects: spec.stream.subjects.clone(),
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .expect("create stream");
            stream
                .create_consumer(desired_consumer_config(&manifest.metadata.name, spec))
                .await
                .expect("create consumer");
        });
        let create = ddl::create_table_sql(&spec.clickhouse, CLICKHOUSE_VERSION)
            .expect("table DDL for 18.16");
        self.clickhouse.query(&create).expect("create table");
    }

    /// Runs SQL and returns the trimmed answer.
    pub fn query(&self, sql: &str) -> String {
        match self.clickhouse.query(sql) {
            Ok(answer) => answer.trim_end().to_string(),
            Err(error) => panic!("{sql}: {error}"),
        }
    }

    /// Rows in the pipeline's table; 0 while ClickHouse does not answer.
    pub fn row_count(&self, manifest: &PipelineManifest) -> u64 {
        let table = ddl::qualified_table(DATABASE, &manifest.spec.clickhouse.table);
        self.clickhouse
            .query(&format!("SELECT count() FROM {table}"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Counts of the table's `seq` column.
    pub fn sequences(&self, manifest: &PipelineManifest) -> SequenceSummary {
        let table = ddl::qualified_table(DATABASE, &manifest.spec.clickhouse.table);
        let text = self.query(&format!(
            "SELECT count(), uniqExact(seq), min(seq), max(seq) FROM {table}"
        ));
        let numbers: Vec<u64> = text
            .split('\t')
            .map(|n| n.parse().expect("a number"))
            .collect();
        SequenceSummary {
            rows: numbers[0],
            distinct: numbers[1],
            min: numbers[2],
            max: numbers[3],
        }
    }

    /// Publishes sample signals `indices` on `subject` through JetStream, waiting for every ack.
    pub fn publish_samples(&self, subject: &str, indices: std::ops::Range<u64>) {
        self.publish_all(
            subject,
            indices.map(signal_demo::sample_signals::sample_signal),
        );
    }

    /// Publishes each payload on `subject` through JetStream, waiting for every ack.
    pub fn publish_all(&self, subject: &str, payloads: impl Iterator<Item = Vec<u8>>) {
        self.runtime.block_on(publish_all(
            self.jetstream.clone(),
            subject.to_string(),
            payloads,
        ));
    }

    /// Publishes one message with headers through JetStream; returns its stream sequence.
    pub fn publish_with_headers(
        &self,
        subject: &str,
        headers: async_nats::HeaderMap,
        payload: &[u8],
    ) -> u64 {
        self.runtime.block_on(async {
            self.jetstream
                .publish_with_headers(subject.to_string(), headers, payload.to_vec().into())
                .await
                .expect("publish")
                .await
                .expect("publish ack")
                .sequence
        })
    }

    /// The durable consumer's current state.
    pub fn consumer_info(&self, manifest: &PipelineManifest) -> jetstream::consumer::Info {
        self.runtime.block_on(async {
            let consumer: PullConsumer = self
                .jetstream
                .get_stream(&manifest.spec.stream.name)
                .await
                .expect("stream")
                .get_consumer(manifest.durable_name())
                .await
                .expect("consumer");
            consumer.get_info().await.expect("consumer info")
        })
    }

    /// True once the consumer has handed out every message and has none waiting for an ack.
    pub fn consumer_settled(&self, manifest: &PipelineManifest) -> bool {
        let info = self.consumer_info(manifest);
        info.num_pending == 0 && info.num_ack_pending == 0
    }

    /// Starts a worker inside this test process.
    pub fn start_worker(&self, manifest: &PipelineManifest) -> InProcessWorker {
        let shutdown = CancellationToken::new();
        let (bound_tx, bound_rx) = oneshot::channel();
        let options = WorkerOptions {
            manifest: manifest.clone(),
            credentials: PipelineCredentials::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ensure_consumer: false,
            worker_name: format!("test-{}", manifest.metadata.name),
        };
        let task = self
            .runtime
            .spawn(pipeline::run(options, shutdown.clone(), Some(bound_tx)));
        let metrics_addr = self
            .runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), bound_rx).await })
            .expect("the worker binds its endpoint in time")
            .expect("the worker reports its endpoint");
        InProcessWorker {
            shutdown,
            task: Some(task),
            metrics_addr,
        }
    }

    /// Writes `manifest` into this test's directory, for the binary.
    pub fn write_manifest(&self, manifest: &PipelineManifest, file_name: &str) -> PathBuf {
        let path = self.dir.path().join(file_name);
        std::fs::write(&path, manifest.to_yaml().expect("manifest YAML")).expect("write manifest");
        path
    }

    /// Starts the `signal-worker` binary on `manifest`, with its log in this test's directory.
    pub fn spawn_binary(&self, manifest: &PipelineManifest, run_name: &str) -> BinaryWorker {
        let manifest_path = self.write_manifest(manifest, &format!("{run_name}.yaml"));
        BinaryWorker::spawn(
            &manifest_path,
            &self.dir.path().join(format!("{run_name}.log")),
        )
    }
}

/// Publishes with a window of acks in flight, so publishing is not one round trip a message.
pub async fn publish_all(
    jetstream: jetstream::Context,
    subject: String,
    payloads: impl Iterator<Item = Vec<u8>>,
) {
    type AckFuture = <jetstream::context::PublishAckFuture as std::future::IntoFuture>::IntoFuture;
    let mut in_flight: FuturesUnordered<AckFuture> = FuturesUnordered::new();
    for payload in payloads {
        if in_flight.len() >= PUBLISH_WINDOW {
            in_flight
                .next()
                .await
                .expect("a publish in flight")
                .expect("publish ack");
        }
        let ack = jetstream
            .publish(subject.clone(), payload.into())
            .await
            .expect("publish");
        in_flight.push(std::future::IntoFuture::into_future(ack));
    }
    while let Some(ack) = in_flight.next().await {
        ack.expect("publish ack");
    }
}

/// A worker running on the test's runtime.
pub struct InProcessWorker {
    pub shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), WorkerError>>>,
    pub metrics_addr: SocketAddr,
}

impl InProcessWorker {
    /// Asks the worker to stop (as SIGTERM does) and waits for it to return.
    pub fn stop(mut self, env: &TestEnv) -> Result<(), WorkerError> {
        self.shutdown.cancel();
        let task = self.task.take().expect("stopped once");
        env.runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the worker stops within 30 s")
                .expect("the worker task does not panic")
        })
    }

    /// A metric's value from `/metrics` (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        metric(&http_get(self.metrics_addr, "/metrics").1, name)
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The `signal-worker` binary, run as a child process that dies with the test.
pub struct BinaryWorker {
    pub process: ChildProcess,
    pub metrics_addr: SocketAddr,
    pub log: PathBuf,
}

/// A failing test shows the end of each worker's log with its panic: CI keeps no files.
impl Drop for BinaryWorker {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_ON_PANIC)..];
        eprintln!(
            "--- the last {} lines of {}:\n{}",
            tail.len(),
            self.log.display(),
            tail.join("\n")
        );
    }
}

/// Lines of a worker's log shown when its test fails.
const LOG_TAIL_ON_PANIC: usize = 20;

impl BinaryWorker {
    /// Starts the binary with `--ensure-consumer` on a free port, stderr into `log`.
    pub fn spawn(manifest: &std::path::Path, log: &std::path::Path) -> BinaryWorker {
        let port = signal_testkit::free_port().expect("a free port");
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log_file = std::fs::File::create(log).expect("worker log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_signal-worker"));
        command
            .arg("--pipeline")
            .arg(manifest)
            .arg("--listen")
            .arg(metrics_addr.to_string())
            .arg("--ensure-consumer")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let process = ChildProcess::spawn(command).expect("start signal-worker");
        BinaryWorker {
            process,
            metrics_addr,
            log: log.to_path_buf(),
        }
    }

    /// The worker's log so far, for assertion messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A metric's value from `/metrics`; `None` while the endpoint does not answer.
    pub fn metric(&self, name: &str) -> Option<f64> {
        try_http_get(self.metrics_addr, "/metrics").map(|(_, body)| metric(&body, name))
    }
}

/// `GET path` over plain HTTP/1.1; panics when the server does not answer.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|| panic!("no HTTP answer from {addr}{path}"))
}

/// `GET path` over plain HTTP/1.1: status and body, `None` when the server does not answer.
pub fn try_http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    // axum answers small bodies with Content-Length, so no chunked decoding is needed.
    Some((status, body.to_string()))
}

/// The value of an unlabelled metric (`signal_worker_` prefix included in `name`, `_total` added
/// by the exposition for counters) in Prometheus text; 0 when absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}
