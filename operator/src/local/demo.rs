//! The two halves of `scripts/demo.sh` that need a NATS client: publishing sample signals (a few
//! deliberately malformed) with a live progress line, and the closing report of what arrived in
//! ClickHouse, in Redis and on the dead-letter subject.
//!
//! Both read the pipeline manifest for addresses and names, so the demo needs no flags beyond the
//! file. The malformed kinds assume the example pipeline's required columns
//! (`examples/local/demo.yaml`: `wallet_address` and `amount` have no default).

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
use signal_model::validate::subject_matches;
use signal_worker::dead_letter::{HEADER_REASON, HEADER_SUBJECT};
use signal_worker::sample_signals::{EVENT_TYPES, sample_signal};

/// How long the publisher waits for `signal-operator local` to create the stream and consumer.
const DATA_PLANE_WAIT: Duration = Duration::from_secs(90);
/// How often the progress line is refreshed.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Why the demo publisher or report failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("ClickHouse: {0}")]
    ClickHouse(String),
    #[error("Redis: {0}")]
    Redis(String),
    #[error("{0}")]
    Timeout(String),
}

fn nats_error(error: impl std::fmt::Display) -> DemoError {
    DemoError::Nats(error.to_string())
}

fn clickhouse_error(error: impl std::fmt::Display) -> DemoError {
    DemoError::ClickHouse(error.to_string())
}

fn redis_error(error: impl std::fmt::Display) -> DemoError {
    DemoError::Redis(error.to_string())
}

/// How a malformed demo message is broken, and so which poison reason it earns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformation {
    /// Cut in half: `not_json`.
    Truncated,
    /// `wallet_address` renamed: `missing_value`.
    MissingWallet,
    /// `amount` is a word: `wrong_type`.
    AmountNotANumber,
}

/// One demo message.
#[derive(Clone, Debug)]
pub struct DemoMessage {
    pub event_type: &'static str,
    pub payload: Vec<u8>,
    pub malformation: Option<Malformation>,
}

/// The `index`-th demo message: a sample signal, malformed for about `malformed_per_mille`
/// messages in a thousand (spread evenly, the same for a given index).
pub fn demo_message(index: u64, malformed_per_mille: u64) -> DemoMessage {
    let event_type = EVENT_TYPES[(index % EVENT_TYPES.len() as u64) as usize];
    let payload = sample_signal(index);
    // A multiplicative hash spreads the malformed ones instead of bunching them every 1000.
    let bucket = index.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) % 1000;
    if bucket >= malformed_per_mille {
        return DemoMessage {
            event_type,
            payload,
            malformation: None,
        };
    }
    let text = String::from_utf8_lossy(&payload).into_owned();
    let (malformation, broken) = match index % 3 {
        0 => (Malformation::Truncated, text[..text.len() / 2].to_string()),
        1 => (
            Malformation::MissingWallet,
            text.replace("\"wallet_address\"", "\"wallet\""),
        ),
        _ => (
            Malformation::AmountNotANumber,
            text.replace("\"amount\":", "\"amount\":\"lots\",\"was\":"),
        ),
    };
    DemoMessage {
        event_type,
        payload: broken.into_bytes(),
        malformation: Some(malformation),
    }
}

/// The subject a message of `event_type` goes to: `<prefix>.<event_type>` when the consumer's
/// filter (else the stream's first subject) ends in a wildcard, else that literal subject.
pub fn publish_subject(spec: &SignalPipelineSpec, event_type: &str) -> String {
    let pattern = spec
        .consumer
        .filter_subject
        .as_deref()
        .or(spec.stream.subjects.first().map(String::as_str))
        .unwrap_or("signals.>");
    match pattern
        .strip_suffix(".>")
        .or_else(|| pattern.strip_suffix(".*"))
    {
        Some(prefix) => format!("{prefix}.{event_type}"),
        None => pattern.to_string(),
    }
}

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
    let client =
        signal_worker::connect::nats(&spec.nats.url, "signal-operator demo", &credentials.nats)
            .await
            .map_err(nats_error)?;
    let js = jetstream::new(client);
    let clickhouse =
        signal_worker::connect::clickhouse(&spec.clickhouse.url, &credentials.clickhouse);
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

/// Prints what arrived: rows per `group_by` column value in ClickHouse, a few cached values from
/// Redis, and the dead letters (count per reason, and `show` of them with their headers).
pub async fn report(
    manifest: &PipelineManifest,
    credentials: &PipelineCredentials,
    group_by: &str,
    show: usize,
) -> Result<(), DemoError> {
    let spec = &manifest.spec;
    report_clickhouse(spec, credentials, group_by).await?;
    report_redis(spec, credentials, show).await?;
    report_dead_letters(manifest, credentials, show).await
}

async fn report_clickhouse(
    spec: &SignalPipelineSpec,
    credentials: &PipelineCredentials,
    group_by: &str,
) -> Result<(), DemoError> {
    let table = format!("{}.{}", spec.clickhouse.database, spec.clickhouse.table);
    let clickhouse =
        signal_worker::connect::clickhouse(&spec.clickhouse.url, &credentials.clickhouse);
    let rows: Vec<(String, u64)> = clickhouse
        .query(&format!(
            "SELECT toString({group_by}) AS value, count() FROM {table} GROUP BY value ORDER BY value"
        ))
        .fetch_all()
        .await
        .map_err(clickhouse_error)?;
    let total: u64 = rows.iter().map(|(_, count)| count).sum();
    println!("\n== ClickHouse {table}: {total} rows ==");
    for (value, count) in &rows {
        println!("  {group_by} = {value:<12} {count:>9} rows");
    }
    Ok(())
}

async fn report_redis(
    spec: &SignalPipelineSpec,
    credentials: &PipelineCredentials,
    show: usize,
) -> Result<(), DemoError> {
    let Some(cache) = &spec.cache else {
        println!("\n== Redis: the pipeline has no cache section ==");
        return Ok(());
    };
    let mut info = redis::IntoConnectionInfo::into_connection_info(cache.redis.url.as_str())
        .map_err(redis_error)?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &credentials.redis.user {
        settings = settings.set_username(user);
    }
    if let Some(password) = &credentials.redis.password {
        settings = settings.set_password(password);
    }
    info = info.set_redis_settings(settings);
    let client = redis::Client::open(info).map_err(redis_error)?;
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .map_err(redis_error)?;
    let pattern = key_pattern(&cache.key);
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut connection)
            .await
            .map_err(redis_error)?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    keys.sort();
    println!(
        "\n== Redis {}: {} keys match {pattern} (latest row per key, ttl {}) ==",
        cache.redis.url,
        keys.len(),
        cache.ttl
    );
    for key in keys.iter().take(show) {
        let fields: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .map_err(redis_error)?;
        let shown = fields
            .iter()
            .map(|(field, value)| format!("{field}={value}"))
            .collect::<Vec<_>>()
            .join(" ");
        println!("  {key}: {shown}");
    }
    Ok(())
}

/// `wallet:{wallet_address}:latest` → `wallet:*:latest`.
pub fn key_pattern(template: &str) -> String {
    let mut pattern = String::with_capacity(template.len());
    let mut in_placeholder = false;
    for c in template.chars() {
        match (c, in_placeholder) {
            ('{', false) => {
                in_placeholder = true;
                pattern.push('*');
            }
            ('}', true) => in_placeholder = false,
            (_, true) => {}
            (c, false) => pattern.push(c),
        }
    }
    pattern
}

async fn report_dead_letters(
    manifest: &PipelineManifest,
    credentials: &PipelineCredentials,
    show: usize,
) -> Result<(), DemoError> {
    let spec = &manifest.spec;
    let subject = &spec.dead_letter_subject(&manifest.metadata.name);
    let dead_letter_stream = spec.dead_letter_stream();
    if !dead_letter_stream
        .subjects
        .iter()
        .any(|pattern| subject_matches(pattern, subject))
    {
        println!(
            "\n== Dead letters go to {subject}, which stream {} does not store ==",
            dead_letter_stream.name
        );
        return Ok(());
    }
    let client = signal_worker::connect::nats(
        &spec.nats.url,
        "signal-operator demo report",
        &credentials.nats,
    )
    .await
    .map_err(nats_error)?;
    let js = jetstream::new(client);
    let stream = js
        .get_stream(&dead_letter_stream.name)
        .await
        .map_err(nats_error)?;
    // An ephemeral reader of the dead-letter subject alone, gone 30 s after the report.
    let reader = stream
        .create_consumer(pull::Config {
            filter_subject: subject.clone(),
            ack_policy: jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..pull::Config::default()
        })
        .await
        .map_err(nats_error)?;
    let count = reader.cached_info().num_pending;
    println!("\n== Dead letters on {subject}: {count} messages ==");
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    let mut examples = Vec::new();
    let mut messages = reader.messages().await.map_err(nats_error)?;
    for _ in 0..count {
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
        let Ok(Some(Ok(message))) = next else {
            break;
        };
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|headers| headers.get(name))
                .map(|value| value.as_str().to_string())
                .unwrap_or_default()
        };
        let reason = header(HEADER_REASON);
        let label = reason.split(':').next().unwrap_or_default().to_string();
        *by_reason.entry(label).or_default() += 1;
        if examples.len() < show {
            let payload = String::from_utf8_lossy(&message.payload);
            let payload: String = payload.chars().take(100).collect();
            examples.push((reason, header(HEADER_SUBJECT), payload));
        }
    }
    for (label, n) in &by_reason {
        println!("  {label:<14} {n:>7}");
    }
    for (reason, original_subject, payload) in examples {
        println!("  - {HEADER_REASON}: {reason}");
        println!("    {HEADER_SUBJECT}: {original_subject}");
        println!("    payload: {payload}…");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn about_the_asked_share_is_malformed_in_every_way() {
        let messages: Vec<DemoMessage> = (0..100_000).map(|i| demo_message(i, 30)).collect();
        let malformed: Vec<Malformation> = messages.iter().filter_map(|m| m.malformation).collect();
        assert!(
            (2_500..3_500).contains(&malformed.len()),
            "{}",
            malformed.len()
        );
        for kind in [
            Malformation::Truncated,
            Malformation::MissingWallet,
            Malformation::AmountNotANumber,
        ] {
            assert!(
                malformed.iter().filter(|m| **m == kind).count() > 500,
                "{kind:?}"
            );
        }
        assert!(
            (0..1000).all(|i| demo_message(i, 0).malformation.is_none()),
            "0 ‰ means none"
        );
    }

    #[test]
    fn malformed_messages_are_broken_the_way_they_say() {
        for index in 0..5000 {
            let message = demo_message(index, 1000);
            let parsed = serde_json::from_slice::<serde_json::Value>(&message.payload);
            match message.malformation {
                Some(Malformation::Truncated) => assert!(parsed.is_err()),
                Some(Malformation::MissingWallet) => {
                    assert!(parsed.unwrap().get("wallet_address").is_none())
                }
                Some(Malformation::AmountNotANumber) => {
                    assert!(parsed.unwrap()["payload"]["amount"].is_string())
                }
                None => panic!("1000 ‰ means all"),
            }
        }
    }

    #[test]
    fn subjects_follow_the_consumer_filter() {
        let mut spec = SignalPipelineSpec::default();
        spec.stream.subjects = vec!["signals.>".into()];
        assert_eq!(publish_subject(&spec, "login"), "signals.login");
        spec.consumer.filter_subject = Some("signals.events.>".into());
        assert_eq!(publish_subject(&spec, "login"), "signals.events.login");
        spec.consumer.filter_subject = Some("signals.transaction".into());
        assert_eq!(publish_subject(&spec, "login"), "signals.transaction");
    }

    #[test]
    fn key_templates_become_scan_patterns() {
        assert_eq!(
            key_pattern("wallet:{wallet_address}:latest"),
            "wallet:*:latest"
        );
        assert_eq!(key_pattern("{a}-{b}"), "*-*");
        assert_eq!(key_pattern("plain"), "plain");
    }
}
