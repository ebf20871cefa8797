//! End-to-end benchmark: how close the worker comes to the bare JetStream drain rate.
//!
//! One run starts nats-server and clickhouse-server (testkit), fills a stream with sample
//! signals (~240 B each), then drains it twice: with a bare durable pull consumer that acks every
//! message explicitly (the ceiling for one stream), and with the release `signal-worker` binary
//! into a ClickHouse table, sampling the worker's peak RSS (`VmHWM`). It prints figures only.
//!
//! `cargo bench -p signal-worker --bench end_to_end`; `SIGNAL_BENCH_MESSAGES=100000` for a quick
//! run (default 1,000,000). `SIGNAL_BENCH_MAX_ROWS` and `SIGNAL_BENCH_MAX_ACK_PENDING` override the
//! spec's batch size and ack window; `SIGNAL_BENCH_WORKER_LOG=signal_worker=debug` keeps the
//! worker's log, which times every batch (waiting for it, inserting it, queueing its acks).

use std::future::IntoFuture;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use signal_demo::sample_signals::sample_signal;
use signal_model::manifest::PipelineManifest;
use signal_model::{ColumnSpec, ServerVersion, SignalPipelineSpec, ddl};
use signal_testkit::{ChildProcess, ClickHouseServer, NatsServer};

const STREAM: &str = "BENCH";
const SUBJECT: &str = "bench.signals";
const DATABASE: &str = "bench";
const TABLE: &str = "signals";
const PUBLISH_WINDOW: usize = 1024;
const BARE_PULL_BATCH: usize = 1000;
/// Longest a drain may take before the benchmark gives up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

fn main() -> anyhow::Result<()> {
    let messages: u64 = match std::env::var("SIGNAL_BENCH_MESSAGES") {
        Ok(text) => text
            .parse()
            .with_context(|| format!("SIGNAL_BENCH_MESSAGES={text} is not a count"))?,
        Err(_) => 1_000_000,
    };
    let nats = NatsServer::start().context("nats-server")?;
    let clickhouse = ClickHouseServer::start().context("clickhouse-server")?;
    let runtime = tokio::runtime::Runtime::new().context("tokio runtime")?;
    println!(
        "end_to_end: {messages} messages of ~{} B; nats-server on {}, ClickHouse {} on {}",
        sample_signal(messages / 2).len(),
        nats.port(),
        clickhouse.query("SELECT version()")?.trim(),
        clickhouse.http_port()
    );

    let publish_rate = runtime.block_on(fill_stream(&nats.url(), messages))?;
    println!(
        "publish:               {publish_rate:>10.0} msg/s (JetStream acks, {PUBLISH_WINDOW} in flight)"
    );

    let nats_pid = nats.pid().context("nats-server pid")?;
    let clickhouse_pid = clickhouse.pid().context("clickhouse-server pid")?;
    let bench_pid = std::process::id();
    let before = (cpu_seconds(nats_pid), cpu_seconds(bench_pid));
    let bare_rate = runtime.block_on(bare_drain(&nats.url(), messages))?;
    let after = (cpu_seconds(nats_pid), cpu_seconds(bench_pid));
    println!(
        "bare drain:            {bare_rate:>10.0} msg/s (durable pull, batch {BARE_PULL_BATCH}, explicit ack each)"
    );
    println!(
        "  CPU during it:       nats-server {:.2} s, bare consumer {:.2} s",
        cpu_delta(before.0, after.0),
        cpu_delta(before.1, after.1)
    );

    let before = (cpu_seconds(nats_pid), cpu_seconds(clickhouse_pid));
    let worker = worker_drain(&nats, &clickhouse, messages)?;
    let after = (cpu_seconds(nats_pid), cpu_seconds(clickhouse_pid));
    println!(
        "  CPU during worker:   nats-server {:.2} s, clickhouse-server {:.2} s, worker {:.2} s \
         (its threads waited {:.2} s for a CPU)",
        cpu_delta(before.0, after.0),
        cpu_delta(before.1, after.1),
        worker.cpu_seconds.unwrap_or(0.0),
        worker.runqueue_wait_seconds,
    );
    println!(
        "worker end to end:     {:>10.0} msg/s (spawn to last row stored; {:.0} msg/s from first row)",
        worker.rate, worker.rate_after_first_row
    );
    println!("ratio worker/bare:     {:>10.2}", worker.rate / bare_rate);
    println!("rows in the table:     {:>10}", worker.rows);
    println!(
        "worker peak RSS:       {:>10.1} MiB (VmHWM)",
        worker.peak_rss_mib
    );
    println!(
        "inserts:               {:>10} (mean {:.1} ms each)",
        worker.inserts, worker.mean_insert_ms
    );
    Ok(())
}

async fn fill_stream(nats_url: &str, messages: u64) -> anyhow::Result<f64> {
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["bench.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    type AckFuture = <jetstream::context::PublishAckFuture as IntoFuture>::IntoFuture;
    let mut in_flight: FuturesUnordered<AckFuture> = FuturesUnordered::new();
    let started = Instant::now();
    for index in 0..messages {
        if in_flight.len() >= PUBLISH_WINDOW
            && let Some(ack) = in_flight.next().await
        {
            ack?;
        }
        let ack = js.publish(SUBJECT, sample_signal(index).into()).await?;
        in_flight.push(ack.into_future());
    }
    while let Some(ack) = in_flight.next().await {
        ack?;
    }
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}

/// Drains the stream with a durable pull consumer that acks every message, as any consumer of
/// the stream must at least do.
async fn bare_drain(nats_url: &str, messages: u64) -> anyhow::Result<f64> {
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client.clone());
    let consumer = js
        .get_stream(STREAM)
        .await?
        .create_consumer(pull::Config {
            durable_name: Some("bare".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut stream = consumer
        .stream()
        .max_messages_per_batch(BARE_PULL_BATCH)
        .messages()
        .await?;
    let mut received = 0;
    while received < messages {
        let next = tokio::time::timeout(Duration::from_secs(30), stream.next()).await;
        let message = match next {
            Ok(Some(message)) => message.map_err(|e| anyhow::anyhow!("pull: {e}"))?,
            Ok(None) => bail!("the pull stream ended after {received} messages"),
            Err(_) => bail!("no message for 30 s after {received}"),
        };
        message
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        received += 1;
    }
    client.flush().await?;
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}

struct WorkerFigures {
    cpu_seconds: Option<f64>,
    runqueue_wait_seconds: f64,
    inserts: f64,
    mean_insert_ms: f64,
    rate: f64,
    rate_after_first_row: f64,
    rows: u64,
    peak_rss_mib: f64,
}

/// The raw-signals example's columns, in the types ClickHouse 18.16 has.
fn bench_manifest(nats_url: &str, clickhouse_url: &str) -> PipelineManifest {
    let mut spec = SignalPipelineSpec::default();
    spec.nats.url = nats_url.into();
    spec.stream.name = STREAM.into();
    spec.stream.subjects = vec!["bench.>".into()];
    spec.stream.replicas = 1;
    spec.clickhouse.url = clickhouse_url.into();
    spec.clickhouse.database = DATABASE.into();
    spec.clickhouse.table = TABLE.into();
    spec.clickhouse.engine = "MergeTree".into();
    spec.clickhouse.partition_by = Some("toYYYYMM(event_time)".into());
    spec.clickhouse.order_by = vec!["event_type".into(), "event_time".into()];
    spec.clickhouse.columns = vec![
        ColumnSpec::new("event_time", "DateTime", "$.event_time"),
        ColumnSpec::new("source_id", "String", "$.source_id"),
        ColumnSpec::new("event_type", "String", "$.event_type"),
        ColumnSpec::new("severity", "UInt8", "$.severity"),
        ColumnSpec::new("trace_id", "String", "$.trace_id"),
        ColumnSpec::new("user_id", "String", "$.user_id"),
        ColumnSpec::new("wallet_address", "String", "$.wallet_address"),
        ColumnSpec::new("payload", "String", "$.payload"),
        ColumnSpec::new("subject", "String", "@subject"),
        ColumnSpec::new("stream_seq", "UInt64", "@sequence"),
    ];
    spec.consumer.durable_name = Some("worker".into());
    // Defaults are the spec's (10,000 rows a batch, 20,000 acks pending); these try others.
    if let Some(rows) = env_number("SIGNAL_BENCH_MAX_ROWS") {
        spec.workers.batch.max_rows = u32::try_from(rows).unwrap_or(u32::MAX);
        spec.workers.batch.max_bytes = signal_model::ByteSize(rows.saturating_mul(1024));
    }
    if let Some(pending) = env_number("SIGNAL_BENCH_MAX_ACK_PENDING") {
        spec.consumer.max_ack_pending = i64::try_from(pending).unwrap_or(i64::MAX);
    }
    PipelineManifest::new("bench", None, spec)
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

/// Peak resident set size of `pid` in KiB, from `/proc/PID/status`.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User plus system CPU time of `pid` so far, from `/proc/PID/stat` (clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let (_, after_name) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn cpu_delta(before: Option<f64>, after: Option<f64>) -> f64 {
    after.unwrap_or(0.0) - before.unwrap_or(0.0)
}

/// Seconds the threads of `pid` spent waiting on a run queue, from `/proc/PID/task/*/schedstat`
/// (run time, wait time and timeslices, in nanoseconds): how much a shared machine held it back.
fn runqueue_wait_seconds(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}

/// The worker's `/metrics` text (empty when it does not answer).
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

/// An unlabelled metric's value in Prometheus text (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn row_count(clickhouse: &ClickHouseServer) -> u64 {
    clickhouse
        .query(&format!("SELECT count() FROM {DATABASE}.{TABLE}"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

fn worker_drain(
    nats: &NatsServer,
    clickhouse: &ClickHouseServer,
    messages: u64,
) -> anyhow::Result<WorkerFigures> {
    let manifest = bench_manifest(&nats.url(), &clickhouse.http_url());
    manifest.spec.validate("bench")?;
    clickhouse.query(&ddl::create_database_sql(DATABASE))?;
    clickhouse.query(&ddl::create_table_sql(
        &manifest.spec.clickhouse,
        ServerVersion::new(18, 16),
    )?)?;
    // Kept when the worker logs more than warnings, for reading afterwards.
    let dir = tempfile::Builder::new().prefix("signal-bench-").tempdir()?;
    let manifest_path = dir.path().join("bench.yaml");
    std::fs::write(&manifest_path, manifest.to_yaml()?)?;
    let port = signal_testkit::free_port()?;
    let log_path = dir.path().join("worker.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_signal-worker"));
    command
        .arg("--pipeline")
        .arg(&manifest_path)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--ensure-consumer")
        .env(
            "RUST_LOG",
            std::env::var("SIGNAL_BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?);

    let started = Instant::now();
    let mut worker = ChildProcess::spawn(command)?;
    let pid = worker.pid();
    let mut peak_kib = 0;
    let mut first_row: Option<Instant> = None;
    let rows = loop {
        if let Some(kib) = peak_rss_kib(pid) {
            peak_kib = peak_kib.max(kib);
        }
        let rows = row_count(clickhouse);
        if rows > 0 && first_row.is_none() {
            first_row = Some(Instant::now());
        }
        if rows >= messages {
            break rows;
        }
        if let Some(status) = worker.try_wait()? {
            bail!(
                "the worker exited ({status}) after {rows} rows:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        if started.elapsed() > DRAIN_TIMEOUT {
            bail!("only {rows} of {messages} rows after {DRAIN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = started.elapsed();
    let after_first_row = first_row.map_or(elapsed, |t| t.elapsed());
    if let Some(kib) = peak_rss_kib(pid) {
        peak_kib = peak_kib.max(kib);
    }
    let cpu_seconds = cpu_seconds(pid);
    let runqueue_wait_seconds = runqueue_wait_seconds(pid);
    let metrics = scrape(port);
    let status = worker.terminate(Duration::from_secs(30))?;
    if std::env::var_os("SIGNAL_BENCH_WORKER_LOG").is_some() {
        println!(
            "worker log:            {}",
            dir.keep().join("worker.log").display()
        );
    }
    if !status.success() {
        eprintln!("worker exit status after SIGTERM: {status}");
    }
    let inserts = metric(&metrics, "signal_worker_insert_duration_seconds_count");
    Ok(WorkerFigures {
        cpu_seconds,
        runqueue_wait_seconds,
        inserts,
        mean_insert_ms: 1000.0 * metric(&metrics, "signal_worker_insert_duration_seconds_sum")
            / inserts.max(1.0),
        rate: messages as f64 / elapsed.as_secs_f64(),
        rate_after_first_row: messages as f64 / after_first_row.as_secs_f64(),
        rows,
        peak_rss_mib: peak_kib as f64 / 1024.0,
    })
}
