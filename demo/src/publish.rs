//! `signal-demo publish`: publishes demo messages to a pipeline's stream with a live progress line,
//! then waits until the pipeline has written them to ClickHouse and drained its consumer.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use signal_model::credentials::PipelineCredentials;
use signal_model::manifest::PipelineManifest;
use signal_model::spec::SignalPipelineSpec;

use crate::messages::{demo_message, publish_subject};
use crate::sample_signals::EVENT_TYPES;
use crate::{DemoError, clickhouse_error, nats_error};

/// How long the publisher waits for `signal-operator local` to create the stream and consumer.
const DATA_PLANE_WAIT: Duration = Duration::from_secs(90);
/// How often the progress line is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// What the publisher is asked to do.
#[derive(Clone, Debug)]
pub struct PublishOptions {
    pub count: u64,
    /// Share of malformed messages, in percent (0 to 100).
    pub malformed_percent: f64,
    /// Publish acknowledgements awaited at most at once.
    pub in_flight: usize,
    /// How long to wait, after publishing, for every message to be written or dead-lettered.
    pub drain_timeout: Duration,
}

/// One look at how far the pipeline got.
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    rows: u64,
    lag: u64,
}

/// Publishes `options.count` demo messages to the pipeline's stream, showing progress, and waits
/// until the pipeline has written every valid one to ClickHouse and drained its consumer.
pub async fn publish(
    manifest: &PipelineManifest,
    credentials: &PipelineCredentials,
    options: &PublishOptions,
) -> Result<(), DemoError> {
    let spec = &manifest.spec;
    let client = signal_clients::connect::nats(
        &spec.nats.url,
        "signal-demo publish",
        &credentials.nats,
        credentials.tls.nats.as_ref(),
    )
    .await
    .map_err(nats_error)?;
    let js = jetstream::new(client);
    let clickhouse = signal_clients::connect::clickhouse(
        &spec.clickhouse.url,
        &credentials.clickhouse,
        credentials.tls.clickhouse.as_ref(),
    )
    .map_err(clickhouse_error)?;
    let count_sql = format!(
        "SELECT count() FROM {}.{}",
        spec.clickhouse.database, spec.clickhouse.table
    );
    let count_rows = || async {
        clickhouse
            .query(&count_sql)
            .fetch_one::<u64>()
            .await
            .map_err(clickhouse_error)
    };
    let mut consumer = wait_for_data_plane(&js, spec, manifest.durable_name(), || async {
        count_rows().await.map_err(|error| error.to_string())
    })
    .await?;
    let rows_before = count_rows().await?;
    let per_mille = (options.malformed_percent.clamp(0.0, 100.0) * 10.0).round() as u64;
    let expected_malformed = (0..options.count)
        .filter(|index| demo_message(*index, per_mille).malformation.is_some())
        .count() as u64;
    let expected_rows = options.count - expected_malformed;
    eprintln!(
        "publishing {} signals to {} ({} malformed on purpose, for the dead-letter subject)",
        options.count,
        publish_subject(spec, "<event_type>"),
        expected_malformed
    );

    let published = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let publisher = tokio::spawn(publish_all(
        js.clone(),
        spec.clone(),
        options.count,
        per_mille,
        options.in_flight.max(1),
        published.clone(),
    ));
    let publisher = async { publisher.await.map_err(nats_error)? };
    tokio::pin!(publisher);
    let mut publish_seconds = None;
    let mut line = ProgressLine::new();
    let mut drain_deadline = None;
    let mut ticker = tokio::time::interval(PROGRESS_EVERY);
    loop {
        tokio::select! {
            result = &mut publisher, if publish_seconds.is_none() => {
                result?;
                publish_seconds = Some(started.elapsed().as_secs_f64());
                drain_deadline = Some(Instant::now() + options.drain_timeout);
            }
            _ = ticker.tick() => {
                let progress = Progress {
                    rows: count_rows().await?.saturating_sub(rows_before),
                    lag: consumer
                        .info()
                        .await
                        .map(|info| info.num_pending + info.num_ack_pending as u64)
                        .map_err(nats_error)?,
                };
                let sent = published.load(Ordering::Relaxed);
                line.show(sent, options.count, started.elapsed(), progress);
                let drained = progress.rows >= expected_rows && progress.lag == 0;
                if publish_seconds.is_some() && drained {
                    line.finish();
                    let total = started.elapsed().as_secs_f64();
                    let publish = publish_seconds.unwrap_or(total);
                    println!(
                        "published {} signals in {:.1} s ({:.0} msg/s); all {} valid rows in ClickHouse and the consumer drained after {:.1} s ({:.0} msg/s end to end)",
                        options.count,
                        publish,
                        options.count as f64 / publish.max(f64::EPSILON),
                        progress.rows,
                        total,
                        options.count as f64 / total.max(f64::EPSILON),
                    );
                    return Ok(());
                }
                if drain_deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    line.finish();
                    return Err(DemoError::Timeout(format!(
                        "after {} s, {} of {expected_rows} rows are in ClickHouse and {} messages wait in the consumer",
                        options.drain_timeout.as_secs(), progress.rows, progress.lag
                    )));
                }
            }
        }
    }
}

/// Publishes every message, keeping up to `in_flight` acknowledgements outstanding.
async fn publish_all(
    js: jetstream::Context,
    spec: SignalPipelineSpec,
    count: u64,
    per_mille: u64,
    in_flight: usize,
    published: Arc<AtomicU64>,
) -> Result<(), DemoError> {
    let subjects: BTreeMap<&str, String> = EVENT_TYPES
        .iter()
        .map(|event_type| (*event_type, publish_subject(&spec, event_type)))
        .collect();
    let mut acks = FuturesUnordered::new();
    for index in 0..count {
        let message = demo_message(index, per_mille);
        let subject = subjects
            .get(message.event_type)
            .cloned()
            .unwrap_or_else(|| publish_subject(&spec, message.event_type));
        let ack = js
            .publish(subject, message.payload.into())
            .await
            .map_err(nats_error)?;
        acks.push(ack.into_future());
        while acks.len() >= in_flight {
            if let Some(result) = acks.next().await {
                result.map_err(nats_error)?;
                published.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    while let Some(result) = acks.next().await {
        result.map_err(nats_error)?;
        published.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Waits for the stream, the durable consumer and the table that `signal-operator local` creates
/// (`count_rows` answers once the table exists).
async fn wait_for_data_plane<F: Future<Output = Result<u64, String>>>(
    js: &jetstream::Context,
    spec: &SignalPipelineSpec,
    durable: &str,
    count_rows: impl Fn() -> F,
) -> Result<jetstream::consumer::Consumer<pull::Config>, DemoError> {
    let deadline = Instant::now() + DATA_PLANE_WAIT;
    let mut said_waiting = false;
    loop {
        let found = match js.get_stream(&spec.stream.name).await {
            Ok(stream) => stream
                .get_consumer::<pull::Config>(durable)
                .await
                .map_err(|e| format!("consumer {durable}: {e}")),
            Err(error) => Err(format!("stream {}: {error}", spec.stream.name)),
        };
        let found = match found {
            Ok(consumer) => count_rows().await.map(|_| consumer),
            Err(error) => Err(error),
        };
        match found {
            Ok(consumer) => return Ok(consumer),
            Err(error) if Instant::now() >= deadline => {
                return Err(DemoError::Timeout(format!(
                    "the pipeline's stream, consumer and table did not appear within {} s: {error}",
                    DATA_PLANE_WAIT.as_secs()
                )));
            }
            Err(_) => {
                if !said_waiting {
                    eprintln!(
                        "waiting for stream {}, consumer {durable} and table {}.{} (created by signal-operator local)…",
                        spec.stream.name, spec.clickhouse.database, spec.clickhouse.table
                    );
                    said_waiting = true;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// The live progress line: rewritten in place on a terminal, one line every few seconds otherwise.
struct ProgressLine {
    terminal: bool,
    last_printed: Option<Instant>,
    /// When the previous sample was taken, with the published and written counts then.
    last_sample: Option<(Instant, u64, u64)>,
    publish_rate: f64,
    row_rate: f64,
}

impl ProgressLine {
    fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            last_printed: None,
            last_sample: None,
            publish_rate: 0.0,
            row_rate: 0.0,
        }
    }

    fn show(&mut self, sent: u64, total: u64, elapsed: Duration, progress: Progress) {
        let now = Instant::now();
        if let Some((at, sent_before, rows_before)) = self.last_sample {
            let seconds = now.duration_since(at).as_secs_f64();
            if seconds > 0.0 {
                self.publish_rate = sent.saturating_sub(sent_before) as f64 / seconds;
                self.row_rate = progress.rows.saturating_sub(rows_before) as f64 / seconds;
            }
        }
        self.last_sample = Some((now, sent, progress.rows));
        let text = format!(
            "[{:5.1} s] published {sent}/{total} ({:.0}/s) | rows in ClickHouse {} ({:.0}/s) | consumer lag {}",
            elapsed.as_secs_f64(),
            self.publish_rate,
            progress.rows,
            self.row_rate,
            progress.lag
        );
        let mut stderr = std::io::stderr();
        if self.terminal {
            let _ = write!(stderr, "\r{text}\x1b[K");
            let _ = stderr.flush();
        } else if self
            .last_printed
            .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
        {
            let _ = writeln!(stderr, "{text}");
            self.last_printed = Some(now);
        }
    }

    fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}
