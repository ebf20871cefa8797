//! Shared pieces of the data-plane integration tests: one real nats-server and one real
//! clickhouse-server per test binary, pipeline specs with names unique to each test (so tests run
//! in parallel on the shared servers), and small readers of the live state the tests check.
//!
//! The servers live in `static`s for the life of the test process: testkit forks every server
//! from one long-lived thread, so a server outlives the test that started it and dies with the
//! process.
#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use signal_model::credentials::PipelineCredentials;
use signal_model::{
    ClickHouseSpec, ColumnSpec, ConsumerSpec, DeletionPolicy, HumanDuration, NatsSpec,
    SignalPipelineSpec, StreamSpec,
};
use signal_testkit::{ClickHouseServer, NatsServer};

/// Upper bound for any single test step that talks to a server, so a hang fails the test instead
/// of stalling the suite.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The nats-server shared by the tests of this binary.
pub fn nats() -> &'static NatsServer {
    static SERVER: OnceLock<NatsServer> = OnceLock::new();
    SERVER.get_or_init(|| NatsServer::start().expect("nats-server must start"))
}

/// The clickhouse-server shared by the tests of this binary.
pub fn clickhouse() -> &'static ClickHouseServer {
    static SERVER: OnceLock<ClickHouseServer> = OnceLock::new();
    SERVER.get_or_init(|| ClickHouseServer::start().expect("clickhouse-server must start"))
}

/// A name no other test in this process uses: `label_<pid>_<n>`, valid as a NATS stream name, a
/// durable name and a ClickHouse identifier.
pub fn unique(label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{label}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A pipeline whose stream, subjects, durable consumer, database and table carry `name`, so it
/// shares nothing with other tests.
pub fn pipeline_spec(name: &str, nats_url: &str, clickhouse_url: &str) -> SignalPipelineSpec {
    SignalPipelineSpec {
        nats: NatsSpec {
            url: nats_url.to_string(),
            auth: None,
            tls: None,
        },
        stream: StreamSpec {
            name: name.to_uppercase(),
            subjects: vec![format!("{name}.>")],
            max_age: Some(HumanDuration::from_secs(3600)),
            replicas: 1,
            ..StreamSpec::default()
        },
        consumer: ConsumerSpec {
            durable_name: Some(format!("{name}_ingest")),
            filter_subject: Some(format!("{name}.signals.>")),
            ..ConsumerSpec::default()
        },
        clickhouse: ClickHouseSpec {
            url: clickhouse_url.to_string(),
            database: format!("db_{name}"),
            table: "signals".to_string(),
            auth: None,
            tls: None,
            engine: "MergeTree".to_string(),
            partition_by: Some("toYYYYMM(event_time)".to_string()),
            order_by: vec!["wallet".to_string(), "event_time".to_string()],
            ttl: None,
            cluster: None,
            columns: vec![
                ColumnSpec::from_field("event_time", "DateTime"),
                ColumnSpec::from_field("wallet", "String"),
                ColumnSpec::from_field("amount", "Int32"),
            ],
        },
        deletion_policy: DeletionPolicy::Retain,
        ..SignalPipelineSpec::default()
    }
}

/// A pipeline on the shared servers.
pub fn shared_pipeline_spec(name: &str) -> SignalPipelineSpec {
    pipeline_spec(name, &nats().url(), &clickhouse().http_url())
}

/// One reconcile of `spec`'s table without credentials or TLS, as the operator runs it, failing
/// the test if it outlives [`STEP_TIMEOUT`].
pub async fn reconcile(spec: &ClickHouseSpec) -> signal_operator::dataplane::table::TableOutcome {
    tokio::time::timeout(
        STEP_TIMEOUT,
        signal_operator::dataplane::table::reconcile_table(
            spec,
            &no_credentials().clickhouse,
            None,
        ),
    )
    .await
    .expect("reconcile_table is bounded")
}

/// No credentials: the test servers allow anonymous access.
pub fn no_credentials() -> PipelineCredentials {
    PipelineCredentials::default()
}

/// A JetStream context on `url`, the way a person's tool would reach the server.
pub async fn jetstream_at(url: &str) -> jetstream::Context {
    let client = tokio::time::timeout(STEP_TIMEOUT, async_nats::connect(url))
        .await
        .expect("connecting to NATS timed out")
        .expect("connecting to NATS");
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .build(client)
}

/// The live stream config, or `None` when the stream does not exist.
pub async fn live_stream(js: &jetstream::Context, name: &str) -> Option<jetstream::stream::Info> {
    match js.get_stream(name).await {
        Ok(stream) => Some(stream.cached_info().clone()),
        Err(error)
            if matches!(
                error.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref api)
                    if api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            None
        }
        Err(error) => panic!("reading stream {name}: {error}"),
    }
}

/// The live consumer info, or `None` when it (or its stream) does not exist.
pub async fn live_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> Option<jetstream::consumer::Info> {
    match js
        .get_consumer_from_stream::<jetstream::consumer::Config, _, _>(durable, stream)
        .await
    {
        Ok(consumer) => Some(consumer.cached_info().clone()),
        Err(error)
            if matches!(
                error.kind(),
                jetstream::stream::ConsumerErrorKind::JetStream(ref api)
                    if api.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
                        || api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            None
        }
        Err(error) => panic!("reading consumer {durable} on {stream}: {error}"),
    }
}

/// Runs `sql` on the shared ClickHouse and returns its TSV answer.
pub fn clickhouse_query(sql: &str) -> String {
    clickhouse()
        .query(sql)
        .unwrap_or_else(|error| panic!("`{sql}` failed: {error}"))
}

/// A table's columns as `(name, type)` in table order. `DESCRIBE TABLE`, because 18.16's
/// `system.columns` has no `position` to order by.
pub fn live_columns(database: &str, table: &str) -> Vec<(String, String)> {
    clickhouse_query(&format!(
        "DESCRIBE TABLE `{database}`.`{table}` FORMAT TSVRaw"
    ))
    .lines()
    .map(|line| {
        let mut fields = line.split('\t');
        let name = fields.next().expect("a column name");
        let type_text = fields.next().expect("a column type");
        (name.to_string(), type_text.to_string())
    })
    .collect()
}

/// Whether the table exists.
pub fn table_exists(database: &str, table: &str) -> bool {
    clickhouse_query(&format!(
        "SELECT count() FROM system.tables WHERE database = '{database}' AND name = '{table}'"
    ))
    .trim()
        == "1"
}

/// A loopback port nothing listens on: reserved from testkit's pool, so no test server takes it
/// while the test runs.
pub fn closed_port() -> u16 {
    signal_testkit::free_port().expect("a free port")
}
