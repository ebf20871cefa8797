//! End-to-end benchmark: how close the worker comes to the bare JetStream drain rate, with and
//! without poison, and what each process spends per signal.
//!
//! One run starts nats-server and clickhouse-server (testkit) and measures, on the same servers:
//! a bare durable pull consumer that acks every message explicitly (the ceiling for one stream),
//! then the release `signal-worker` binary into a ClickHouse table on a clean stream, on a stream
//! with 3% poison and on one with 20% poison (the demo's malformed signals: cut in half, without
//! `wallet_address`, `amount` a word). Each drain prints its rate, its ratio to the bare drain,
//! CPU seconds per million signals of the consumer (the bare client or the worker), nats-server
//! and clickhouse-server (`/proc/PID/stat`), and the worker's peak RSS (`VmHWM`). A poisoned
//! drain ends when every valid row is stored and every dead letter is in the dead-letter stream.
//! It also prints the CPU of all those processes per signal and how many cores they kept busy:
//! on a machine whose cores the servers share, a pipeline that spends more CPU per signal than
//! the bare drain can outrun it only by the cores the bare drain left idle. It prints figures
//! only.
//!
//! Last, a partitioned drain (`workers.partitions: 2`, two worker processes, the stream filled
//! through nats-server's partition mapping) with the same figures per worker process.
//!
//! `cargo bench -p signal-worker --bench end_to_end`; `SIGNAL_BENCH_MESSAGES=200000` for a quick
//! run (default 1,000,000); `SIGNAL_BENCH_ONLY=partitioned` runs only the bare and the
//! partitioned drains. `SIGNAL_BENCH_MAX_ROWS` and `SIGNAL_BENCH_MAX_ACK_PENDING` override the
//! spec's batch size and ack window; `SIGNAL_BENCH_WORKER_LOG=signal_worker=debug` keeps the
//! worker's logs, which time every batch (waiting for it, inserting it, queueing its acks).
//! `SIGNAL_BENCH_WORKER_WRAPPER="valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p"`
//! runs the worker under that command (the worker binary and its arguments follow it), for
//! instruction counts that do not depend on the machine's load.

use std::future::IntoFuture;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use signal_demo::messages::demo_message;
use signal_demo::sample_signals::benchmark_columns;
use signal_model::manifest::PipelineManifest;
use signal_model::partitions::PartitionScheme;
use signal_model::{ServerVersion, SignalPipelineSpec, ddl};
use signal_testkit::{ChildProcess, ClickHouseServer, NatsServer};

const STREAM: &str = "BENCH";
const SUBJECT: &str = "bench.signals";
/// Captures the worker's default dead-letter subject, `dlq.BENCH.worker`.
const DEAD_LETTER_STREAM: &str = "BENCH_DLQ";
const DATABASE: &str = "bench";
const TABLE: &str = "signals";
const PUBLISH_WINDOW: usize = 1024;
const BARE_PULL_BATCH: usize = 1000;
/// Longest a drain may take before the benchmark gives up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// What one drain measured; CPU figures are seconds per million signals.
struct Drain {
    name: String,
    rate: f64,
    /// Without the start and the last partial batch's wait (the rate for the bare drain).
    steady_rate: f64,
    consumer_cpu: f64,
    nats_cpu: f64,
    clickhouse_cpu: Option<f64>,
    peak_rss_mib: Option<f64>,
}

impl Drain {
    /// CPU-s per 1M signals of every process the drain measured (consumer, nats-server and, for
    /// the workers, clickhouse-server).
    fn all_cpu(&self) -> f64 {
        self.consumer_cpu + self.nats_cpu + self.clickhouse_cpu.unwrap_or(0.0)
    }

    /// How many cores those processes kept busy on average.
    fn cores_busy(&self) -> f64 {
        self.rate * self.all_cpu() / 1e6
    }

    /// The most this drain could reach on `cores` at its CPU per signal, were nothing else
    /// running.
    fn ceiling(&self, cores: f64) -> f64 {
        cores * 1e6 / self.all_cpu().max(f64::EPSILON)
    }
}

/// Cores of this machine, for the drains' ceilings.
fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

/// The servers and the figures every drain needs.
struct Bench {
    nats: NatsServer,
    clickhouse: ClickHouseServer,
    runtime: tokio::runtime::Runtime,
    messages: u64,
}

fn main() -> anyhow::Result<()> {
    let messages: u64 = match std::env::var("SIGNAL_BENCH_MESSAGES") {
        Ok(text) => text
            .parse()
            .with_context(|| format!("SIGNAL_BENCH_MESSAGES={text} is not a count"))?,
        Err(_) => 1_000_000,
    };
    let bench = Bench {
        // The partitioned drain's mapping; the other drains publish outside it.
        nats: NatsServer::start_with_mappings(&[partition_mapping()]).context("nats-server")?,
        clickhouse: ClickHouseServer::start().context("clickhouse-server")?,
        runtime: tokio::runtime::Runtime::new().context("tokio runtime")?,
        messages,
    };
    // The batch settings decide much of clickhouse-server's CPU (README, `spec.workers`).
    let spec = bench_manifest(&bench.nats.url(), &bench.clickhouse.http_url()).spec;
    println!(
        "end_to_end: {messages} messages of ~{} B; batches of {} rows, {} acks pending; \
         nats-server on {}, ClickHouse {} on {}",
        demo_message(messages / 2, 0).payload.len(),
        spec.workers.batch.max_rows,
        spec.consumer.max_ack_pending,
        bench.nats.port(),
        bench.clickhouse.query("SELECT version()")?.trim(),
        bench.clickhouse.http_port()
    );
    bench
        .runtime
        .block_on(create_dead_letter_stream(&bench.nats.url()))?;

    let poisoned = bench.fill(0)?;
    let bare = bench.bare_drain()?;
    if std::env::var("SIGNAL_BENCH_ONLY").is_ok_and(|only| only == "partitioned") {
        let partitioned = bench.partitioned_drain()?;
        print_partitioned(&bare, &partitioned);
        return Ok(());
    }
    let mut drains = vec![bare, bench.worker_drain("worker clean", poisoned)?];
    for per_mille in [30, 200] {
        let poisoned = bench.fill(per_mille)?;
        let name = format!("worker {}% poison", per_mille / 10);
        drains.push(bench.worker_drain(&name, poisoned)?);
    }

    println!();
    println!(
        "{:<20} {:>9} {:>7} {:>9} {:>7}   CPU-s per 1M signals: {:>8} {:>8} {:>10} {:>6}   {:>5}   {:>9}",
        "drain",
        "msg/s",
        "× bare",
        "steady",
        "× bare",
        "consumer",
        "nats",
        "clickhouse",
        "all",
        "cores",
        "peak RSS"
    );
    let bare_rate = drains[0].rate;
    for drain in &drains {
        println!(
            "{:<20} {:>9.0} {:>7.2} {:>9.0} {:>7.2}                         {:>8.2} {:>8.2} {:>10} {:>6.2}   {:>5.2}   {:>9}",
            drain.name,
            drain.rate,
            drain.rate / bare_rate,
            drain.steady_rate,
            drain.steady_rate / bare_rate,
            drain.consumer_cpu,
            drain.nats_cpu,
            drain
                .clickhouse_cpu
                .map_or("-".into(), |cpu| format!("{cpu:.2}")),
            drain.all_cpu(),
            drain.cores_busy(),
            drain
                .peak_rss_mib
                .map_or("-".into(), |mib| format!("{mib:.1} MiB")),
        );
    }
    println!(
        "cores: how many of this machine's {:.0} cores the drain's processes kept busy, on average",
        cores()
    );
    let (clean, steady_clean) = (drains[1].rate, drains[1].steady_rate);
    println!(
        "poison vs clean:      3%: {:.2} × (goal ≥ 0.9), 20%: {:.2} × (goal ≥ 0.7); steady: {:.2} ×, {:.2} ×",
        drains[2].rate / clean,
        drains[3].rate / clean,
        drains[2].steady_rate / steady_clean,
        drains[3].steady_rate / steady_clean
    );
    println!(
        "worker CPU vs bare client: {:.2} × (goal ≤ 1.5); consumer CPU: the bare client's or the worker's whole process",
        drains[1].consumer_cpu / drains[0].consumer_cpu.max(f64::EPSILON)
    );
    let partitioned = bench.partitioned_drain()?;
    print_partitioned(&drains[0], &partitioned);
    Ok(())
}

async fn create_dead_letter_stream(nats_url: &str) -> anyhow::Result<()> {
    let js = jetstream::new(async_nats::connect(nats_url).await?);
    js.create_stream(stream::Config {
        name: DEAD_LETTER_STREAM.into(),
        subjects: vec!["dlq.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Messages in the dead-letter stream so far.
async fn dead_letters_stored(nats_url: &str) -> anyhow::Result<u64> {
    let js = jetstream::new(async_nats::connect(nats_url).await?);
    let mut stream = js.get_stream(DEAD_LETTER_STREAM).await?;
    Ok(stream.info().await?.state.messages)
}

/// (Re)creates the stream and publishes `messages` demo signals, `per_mille` of them malformed;
/// returns how many are.
async fn fill_stream(nats_url: &str, messages: u64, per_mille: u64) -> anyhow::Result<(u64, f64)> {
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client);
    // A previous drain's stream goes, with its consumers.
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["bench.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    type AckFuture = <jetstream::context::PublishAckFuture as IntoFuture>::IntoFuture;
    let mut in_flight: FuturesUnordered<AckFuture> = FuturesUnordered::new();
    let mut poisoned = 0;
    let started = Instant::now();
    for index in 0..messages {
        if in_flight.len() >= PUBLISH_WINDOW
            && let Some(ack) = in_flight.next().await
        {
            ack?;
        }
        let message = demo_message(index, per_mille);
        poisoned += u64::from(message.malformation.is_some());
        let ack = js.publish(SUBJECT, message.payload.into()).await?;
        in_flight.push(ack.into_future());
    }
    while let Some(ack) = in_flight.next().await {
        ack?;
    }
    Ok((poisoned, messages as f64 / started.elapsed().as_secs_f64()))
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

impl Bench {
    /// A fresh stream of demo signals, `per_mille` of them malformed; returns how many are.
    fn fill(&self, per_mille: u64) -> anyhow::Result<u64> {
        let (poisoned, rate) =
            self.runtime
                .block_on(fill_stream(&self.nats.url(), self.messages, per_mille))?;
        println!(
            "publish ({:>3} ‰ poison): {rate:>9.0} msg/s (JetStream acks, {PUBLISH_WINDOW} in flight)",
            per_mille
        );
        Ok(poisoned)
    }

    fn per_million(&self, seconds: f64) -> f64 {
        seconds * 1e6 / self.messages as f64
    }

    fn bare_drain(&self) -> anyhow::Result<Drain> {
        let nats_pid = self.nats.pid().context("nats-server pid")?;
        let bench_pid = std::process::id();
        let before = (cpu_seconds(nats_pid), cpu_seconds(bench_pid));
        let rate = self
            .runtime
            .block_on(bare_drain(&self.nats.url(), self.messages))?;
        let after = (cpu_seconds(nats_pid), cpu_seconds(bench_pid));
        println!(
            "bare drain:            {rate:>9.0} msg/s (durable pull, batch {BARE_PULL_BATCH}, explicit ack each)"
        );
        Ok(Drain {
            name: "bare drain".into(),
            rate,
            steady_rate: rate,
            consumer_cpu: self.per_million(cpu_delta(before.1, after.1)),
            nats_cpu: self.per_million(cpu_delta(before.0, after.0)),
            clickhouse_cpu: None,
            peak_rss_mib: None,
        })
    }

    fn worker_drain(&self, name: &str, poisoned: u64) -> anyhow::Result<Drain> {
        let nats_pid = self.nats.pid().context("nats-server pid")?;
        let clickhouse_pid = self.clickhouse.pid().context("clickhouse-server pid")?;
        let before = (cpu_seconds(nats_pid), cpu_seconds(clickhouse_pid));
        let worker = worker_drain(self, poisoned)?;
        let after = (cpu_seconds(nats_pid), cpu_seconds(clickhouse_pid));
        println!(
            "{name}: {:>9.0} msg/s end to end (spawn to last row and dead letter stored; {:.0} msg/s from the first row, \
             {:.0} msg/s steady: first batch to last full batch), \
             {} rows, {} dead letters, {} inserts of {:.1} ms, {} pull requests, worker waited {:.2} s for a CPU",
            worker.rate,
            worker.rate_after_first_row,
            worker.steady_rate,
            worker.rows,
            poisoned,
            worker.inserts,
            worker.mean_insert_ms,
            worker.pull_requests,
            worker.runqueue_wait_seconds,
        );
        Ok(Drain {
            name: name.into(),
            rate: worker.rate,
            steady_rate: worker.steady_rate,
            consumer_cpu: self.per_million(worker.cpu_seconds.unwrap_or(0.0)),
            nats_cpu: self.per_million(cpu_delta(before.0, after.0)),
            clickhouse_cpu: Some(self.per_million(cpu_delta(before.1, after.1))),
            peak_rss_mib: Some(worker.peak_rss_mib),
        })
    }
}

struct WorkerFigures {
    cpu_seconds: Option<f64>,
    runqueue_wait_seconds: f64,
    inserts: f64,
    mean_insert_ms: f64,
    pull_requests: f64,
    rate: f64,
    rate_after_first_row: f64,
    /// Messages per second from the first batch stored to the last full one.
    steady_rate: f64,
    rows: u64,
    peak_rss_mib: f64,
}

/// The bench pipeline, with the sample signals' columns.
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
    spec.clickhouse.columns = benchmark_columns();
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

/// The worker binary on `manifest_path`, listening on `port`, logging to `log_path`; run under
/// `SIGNAL_BENCH_WORKER_WRAPPER` when set (`valgrind --tool=callgrind ...` counts the worker's
/// instructions, which do not depend on the load of a shared machine).
fn worker_command(
    manifest_path: &std::path::Path,
    port: u16,
    log_path: &std::path::Path,
) -> anyhow::Result<Command> {
    let worker_bin = env!("CARGO_BIN_EXE_signal-worker");
    let wrapper = std::env::var("SIGNAL_BENCH_WORKER_WRAPPER").unwrap_or_default();
    let mut wrapper = wrapper.split_whitespace();
    let mut command = match wrapper.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(wrapper).arg(worker_bin);
            command
        }
        None => Command::new(worker_bin),
    };
    command
        .arg("--pipeline")
        .arg(manifest_path)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--ensure-consumer")
        .env(
            "RUST_LOG",
            std::env::var("SIGNAL_BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log_path)?);
    Ok(command)
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

/// Runs the worker on the stream until every valid row is stored and every poison message is in
/// the dead-letter stream.
fn worker_drain(bench: &Bench, poisoned: u64) -> anyhow::Result<WorkerFigures> {
    let Bench {
        nats,
        clickhouse,
        runtime,
        messages,
    } = bench;
    let messages = *messages;
    let valid = messages - poisoned;
    let manifest = bench_manifest(&nats.url(), &clickhouse.http_url());
    manifest.spec.validate("bench")?;
    clickhouse.query(&ddl::create_database_sql(DATABASE, None))?;
    clickhouse.query(&format!("DROP TABLE IF EXISTS {DATABASE}.{TABLE}"))?;
    clickhouse.query(&ddl::create_table_sql(
        &manifest.spec.clickhouse,
        ServerVersion::new(18, 16),
    )?)?;
    let dead_letters_before = runtime.block_on(dead_letters_stored(&nats.url()))?;
    // Kept when the worker logs more than warnings, for reading afterwards.
    let dir = tempfile::Builder::new().prefix("signal-bench-").tempdir()?;
    let manifest_path = dir.path().join("bench.yaml");
    std::fs::write(&manifest_path, manifest.to_yaml()?)?;
    let port = signal_testkit::free_port()?;
    let log_path = dir.path().join("worker.log");
    let command = worker_command(&manifest_path, port, &log_path)?;

    let started = Instant::now();
    let mut worker = ChildProcess::spawn(command)?;
    let pid = worker.pid();
    let mut peak_kib = 0;
    let mut first_row: Option<(Instant, u64)> = None;
    // The last batch is partial (unless the valid rows fill whole batches): the steady rate
    // runs from the first batch stored to the last full one.
    let max_rows = u64::from(manifest.spec.workers.batch.max_rows);
    let last_full_batch = valid / max_rows * max_rows;
    let mut last_full: Option<Instant> = None;
    let mut dead_letters = 0;
    let rows = loop {
        if let Some(kib) = peak_rss_kib(pid) {
            peak_kib = peak_kib.max(kib);
        }
        let rows = row_count(clickhouse);
        if rows > 0 && first_row.is_none() {
            first_row = Some((Instant::now(), rows));
        }
        if rows >= last_full_batch && last_full.is_none() {
            last_full = Some(Instant::now());
        }
        if rows >= valid {
            if dead_letters < poisoned {
                dead_letters =
                    runtime.block_on(dead_letters_stored(&nats.url()))? - dead_letters_before;
            }
            if dead_letters >= poisoned {
                break rows;
            }
        }
        if let Some(status) = worker.try_wait()? {
            bail!(
                "the worker exited ({status}) after {rows} rows:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        if started.elapsed() > DRAIN_TIMEOUT {
            bail!(
                "only {rows} of {valid} rows and {dead_letters} of {poisoned} dead letters after {DRAIN_TIMEOUT:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = started.elapsed();
    let after_first_row = first_row.map_or(elapsed, |(t, _)| t.elapsed());
    let messages_per_row = messages as f64 / valid.max(1) as f64;
    let steady_rate = match (first_row, last_full) {
        (Some((first, first_rows)), Some(last)) if last > first && last_full_batch > first_rows => {
            (last_full_batch - first_rows) as f64 * messages_per_row / (last - first).as_secs_f64()
        }
        _ => messages as f64 / after_first_row.as_secs_f64(),
    };
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
        pull_requests: metric(&metrics, "signal_worker_pull_requests_total"),
        rate: messages as f64 / elapsed.as_secs_f64(),
        rate_after_first_row: messages as f64 / after_first_row.as_secs_f64(),
        steady_rate,
        rows,
        peak_rss_mib: peak_kib as f64 / 1024.0,
    })
}

/// The partitioned drain's stream, publish subjects and partition count.
const PARTITIONED_STREAM: &str = "BPART";
const PARTITIONED_SUBJECTS: &str = "bpart.*";
const PARTITIONS: u32 = 2;
const PARTITIONED_WORKERS: usize = 2;
/// Distinct publish subjects (`bpart.k<N>`), hashed into the partitions.
const PARTITION_KEYS: u64 = 64;

/// The partitioned pipeline: the bench pipeline on its own stream, with two partitions.
fn partitioned_manifest(nats_url: &str, clickhouse_url: &str) -> PipelineManifest {
    let mut manifest = bench_manifest(nats_url, clickhouse_url);
    manifest.spec.stream.name = PARTITIONED_STREAM.into();
    manifest.spec.stream.subjects = vec![PARTITIONED_SUBJECTS.into()];
    manifest.spec.workers.partitions = Some(PARTITIONS);
    manifest
}

fn partition_scheme() -> PartitionScheme {
    let manifest = partitioned_manifest("nats://unused:4222", "http://unused:8123");
    PartitionScheme::of(&manifest.spec, &manifest.metadata.name).expect("partitioned manifest")
}

/// The server mapping the partitioned drain needs (nats-server 2.9 partitions only there).
fn partition_mapping() -> (String, String) {
    let scheme = partition_scheme();
    (scheme.source_subject.clone(), scheme.mapping_destination())
}

/// The partitioned drain's figures, per worker process.
struct PartitionedDrain {
    drain: Drain,
    /// CPU seconds per million signals of each worker process.
    worker_cpu: Vec<f64>,
    /// Peak RSS of each worker process, MiB.
    worker_rss_mib: Vec<f64>,
    rate_after_first_row: f64,
}

/// (Re)creates the partitioned stream (as the operator does on 2.9: the partitioned subjects and
/// the published pattern) and publishes the demo signals through the mapping.
async fn fill_partitioned_stream(nats_url: &str, messages: u64) -> anyhow::Result<f64> {
    let js = jetstream::new(async_nats::connect(nats_url).await?);
    let scheme = partition_scheme();
    let _ = js.delete_stream(PARTITIONED_STREAM).await;
    js.create_stream(stream::Config {
        name: PARTITIONED_STREAM.into(),
        subjects: vec![scheme.partitioned_subjects(), scheme.source_subject.clone()],
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
        let subject = format!("bpart.k{}", index % PARTITION_KEYS);
        let ack = js
            .publish(subject, demo_message(index, 0).payload.into())
            .await?;
        in_flight.push(ack.into_future());
    }
    while let Some(ack) = in_flight.next().await {
        ack?;
    }
    let rate = messages as f64 / started.elapsed().as_secs_f64();
    let stream = js.get_stream(PARTITIONED_STREAM).await?;
    let mut unmapped = stream.info_with_subjects(&scheme.source_subject).await?;
    if let Some(entry) = unmapped.next().await {
        bail!("messages stored without a partition token (the mapping did not apply): {entry:?}");
    }
    Ok(rate)
}

impl Bench {
    /// Two worker processes on a two-partition stream, until every row is stored.
    fn partitioned_drain(&self) -> anyhow::Result<PartitionedDrain> {
        let fill_rate = self
            .runtime
            .block_on(fill_partitioned_stream(&self.nats.url(), self.messages))?;
        println!(
            "publish (partitioned):  {fill_rate:>9.0} msg/s through the mapping to {PARTITIONS} partitions"
        );
        let manifest = partitioned_manifest(&self.nats.url(), &self.clickhouse.http_url());
        manifest.spec.validate("bench")?;
        let clickhouse = &self.clickhouse;
        clickhouse.query(&ddl::create_database_sql(DATABASE, None))?;
        clickhouse.query(&format!("DROP TABLE IF EXISTS {DATABASE}.{TABLE}"))?;
        clickhouse.query(&ddl::create_table_sql(
            &manifest.spec.clickhouse,
            ServerVersion::new(18, 16),
        )?)?;
        let dir = tempfile::Builder::new().prefix("signal-bench-").tempdir()?;
        let manifest_path = dir.path().join("partitioned.yaml");
        std::fs::write(&manifest_path, manifest.to_yaml()?)?;
        let nats_pid = self.nats.pid().context("nats-server pid")?;
        let clickhouse_pid = clickhouse.pid().context("clickhouse-server pid")?;
        let before = (cpu_seconds(nats_pid), cpu_seconds(clickhouse_pid));
        let started = Instant::now();
        let mut workers = Vec::new();
        for index in 0..PARTITIONED_WORKERS {
            let port = signal_testkit::free_port()?;
            let log_path = dir.path().join(format!("worker-{index}.log"));
            let mut command = worker_command(&manifest_path, port, &log_path)?;
            command.env("SIGNAL_WORKER_NAME", format!("bench-{index}"));
            workers.push((ChildProcess::spawn(command)?, log_path));
        }
        let pids: Vec<u32> = workers.iter().map(|(worker, _)| worker.pid()).collect();
        let mut peak_kib = vec![0; pids.len()];
        let mut first_row: Option<Instant> = None;
        loop {
            for (peak, pid) in peak_kib.iter_mut().zip(&pids) {
                *peak = (*peak).max(peak_rss_kib(*pid).unwrap_or(0));
            }
            let rows = row_count(clickhouse);
            if rows > 0 && first_row.is_none() {
                first_row = Some(Instant::now());
            }
            if rows >= self.messages {
                break;
            }
            for (worker, log) in &mut workers {
                if let Some(status) = worker.try_wait()? {
                    bail!(
                        "a partitioned worker exited ({status}) after {rows} rows:\n{}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                }
            }
            if started.elapsed() > DRAIN_TIMEOUT {
                bail!(
                    "only {rows} of {} rows after {DRAIN_TIMEOUT:?}",
                    self.messages
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let elapsed = started.elapsed();
        let worker_cpu: Vec<f64> = pids
            .iter()
            .map(|pid| self.per_million(cpu_seconds(*pid).unwrap_or(0.0)))
            .collect();
        let after = (cpu_seconds(nats_pid), cpu_seconds(clickhouse_pid));
        for (peak, pid) in peak_kib.iter_mut().zip(&pids) {
            *peak = (*peak).max(peak_rss_kib(*pid).unwrap_or(0));
        }
        let rate = self.messages as f64 / elapsed.as_secs_f64();
        let rate_after_first_row = self.messages as f64
            / first_row
                .map_or(elapsed, |t| started + elapsed - t)
                .as_secs_f64();
        for (mut worker, _) in workers {
            worker.terminate(Duration::from_secs(30))?;
        }
        let worker_rss_mib: Vec<f64> = peak_kib.iter().map(|kib| *kib as f64 / 1024.0).collect();
        Ok(PartitionedDrain {
            drain: Drain {
                name: format!("partitioned ×{PARTITIONS}"),
                rate,
                steady_rate: rate_after_first_row,
                consumer_cpu: worker_cpu.iter().sum(),
                nats_cpu: self.per_million(cpu_delta(before.0, after.0)),
                clickhouse_cpu: Some(self.per_million(cpu_delta(before.1, after.1))),
                peak_rss_mib: worker_rss_mib.iter().copied().reduce(f64::max),
            },
            worker_cpu,
            worker_rss_mib,
            rate_after_first_row,
        })
    }
}

/// The partitioned drain next to the bare drain of the same run.
fn print_partitioned(bare: &Drain, partitioned: &PartitionedDrain) {
    let drain = &partitioned.drain;
    println!();
    println!(
        "partitioned ({PARTITIONS} partitions, {PARTITIONED_WORKERS} worker processes, AckAll per batch): \
         {:.0} msg/s end to end (spawn to last row) = {:.2} × bare {:.0} msg/s (goal ≥ 1.2); \
         {:.0} msg/s from the first row = {:.2} × bare",
        drain.rate,
        drain.rate / bare.rate,
        bare.rate,
        partitioned.rate_after_first_row,
        partitioned.rate_after_first_row / bare.rate,
    );
    for (index, (cpu, rss)) in partitioned
        .worker_cpu
        .iter()
        .zip(&partitioned.worker_rss_mib)
        .enumerate()
    {
        println!("  worker {index}: {cpu:.2} CPU-s per 1M signals, peak RSS {rss:.1} MiB");
    }
    println!(
        "  workers together {:.2}, nats-server {:.2}, clickhouse-server {} CPU-s per 1M signals; bare client {:.2}, its nats-server {:.2}",
        drain.consumer_cpu,
        drain.nats_cpu,
        drain
            .clickhouse_cpu
            .map_or("-".into(), |cpu| format!("{cpu:.2}")),
        bare.consumer_cpu,
        bare.nats_cpu,
    );
    // A pipeline that spends more CPU per signal than the bare drain can only beat it by the
    // cores the bare drain left idle.
    let cores = cores();
    println!(
        "  CPU per signal: partitioned {:.2} (all processes) against bare {:.2}; they kept {:.2} and {:.2} of {cores:.0} cores busy; \
         at its CPU per signal the partitioned pipeline cannot pass {:.0} msg/s = {:.2} × bare on {cores:.0} cores",
        drain.all_cpu(),
        bare.all_cpu(),
        drain.cores_busy(),
        bare.cores_busy(),
        drain.ceiling(cores),
        drain.ceiling(cores) / bare.rate,
    );
}
