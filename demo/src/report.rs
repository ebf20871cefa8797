//! `signal-demo report`: what arrived in ClickHouse, in Redis and on the dead-letter subject.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use signal_clients::dead_letter::{HEADER_REASON, HEADER_SUBJECT};
use signal_model::credentials::PipelineCredentials;
use signal_model::manifest::PipelineManifest;
use signal_model::spec::SignalPipelineSpec;
use signal_model::validate::subject_matches;

use crate::{DemoError, clickhouse_error, nats_error, redis_error};

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
    let clickhouse = signal_clients::connect::clickhouse(
        &spec.clickhouse.url,
        &credentials.clickhouse,
        credentials.tls.clickhouse.as_ref(),
    )
    .map_err(clickhouse_error)?;
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
    let client = signal_clients::connect::redis(
        &cache.redis.url,
        &credentials.redis,
        credentials.tls.redis.as_ref(),
    )
    .map_err(redis_error)?;
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
    let client = signal_clients::connect::nats(
        &spec.nats.url,
        "signal-demo report",
        &credentials.nats,
        credentials.tls.nats.as_ref(),
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
    fn key_templates_become_scan_patterns() {
        assert_eq!(
            key_pattern("wallet:{wallet_address}:latest"),
            "wallet:*:latest"
        );
        assert_eq!(key_pattern("{a}-{b}"), "*-*");
        assert_eq!(key_pattern("plain"), "plain");
    }
}
