//! The data plane of a pipeline: its JetStream stream, its durable consumer, its ClickHouse table
//! and its dead-letter stream, plus the workers' health reports.
//!
//! [`reconcile_data_plane`] brings the parts in line with the spec, reads the workers' health
//! reports and reports each part the way the controller turns into conditions and events;
//! [`delete_data_plane`] removes them when the pipeline's deletion policy says so. The Kubernetes
//! controller and local mode ([`crate::local`]) both call these, so a pipeline behaves the same
//! with or without a cluster.
//!
//! Each part lives in its own module: pure "spec → desired config" and "desired vs live" functions
//! next to the I/O that applies them ([`stream`], [`consumer`], [`table`], [`dead_letter_stream`],
//! [`worker_health`]), with the column comparison in [`table_schema_diff`] and the engine and key
//! comparison in [`table_clause_diff`], which compares the live table with the spec's table as the
//! server itself prints it, made in [`table_scratch`]. Nothing here panics, and every network step
//! is bounded by a timeout so an unreachable server is reported within seconds instead of hanging
//! a reconcile. A server that accepts connections but answers nothing (a stopped process, a full
//! accept queue) costs one request timeout per side and reconcile: the first request it leaves
//! unanswered ends that side's work (the table's steps share one `?` chain; the NATS side skips
//! its remaining parts), so a reconcile during an outage takes about 6 s: the NATS connect bound, or
//! one [`REQUEST_TIMEOUT`], the two sides running at the same time.

pub mod connections;
pub mod consumer;
pub mod dead_letter_stream;
pub mod health_mirror;
pub mod partitions;
pub mod stream;
pub mod table;
pub mod table_clause_diff;
pub mod table_schema_diff;
pub mod table_scratch;
pub mod worker_health;

use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream;
use signal_model::credentials::PipelineCredentials;
use signal_model::{
    ConsumerStatus, DeadLetterStatus, DeletionPolicy, SignalPipelineSpec, StreamStatus,
};

use connections::{Connections, ServerKind, Session};
use dead_letter_stream::DeadLetterOutcome;
use worker_health::WorkerHealth;

/// How long opening a connection may take before the server counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one JetStream API request or ClickHouse query may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound for reconciling one part, however many requests it makes.
pub const PART_TIMEOUT: Duration = Duration::from_secs(20);
/// How long opening a NATS connection may take in all, name lookup included.
const NATS_CONNECT_BOUND: Duration = Duration::from_secs(CONNECT_TIMEOUT.as_secs() + 1);
/// The reason of a part whose server could not be reached or did not answer in time.
pub const UNREACHABLE: &str = "Unreachable";

/// The outcome of reconciling one part (stream, consumer or table).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartReport {
    /// The part exists and the workers can use it.
    pub ready: bool,
    /// One CamelCase word: `Created`, `Updated`, `UpToDate`, `Unreachable`, `ImmutableFieldChanged`,
    /// `UnsupportedByServer`, `SchemaDrift`, `InvalidSpec`, `UpdateRefused`, `QueryFailed`, …
    pub reason: String,
    /// What a person needs to know.
    pub message: String,
    /// What this reconcile changed, one sentence each (for Kubernetes events).
    pub changes: Vec<String>,
}

impl PartReport {
    /// A usable part.
    pub fn ready(reason: &str, message: impl Into<String>, changes: Vec<String>) -> Self {
        Self {
            ready: true,
            reason: reason.to_string(),
            message: message.into(),
            changes,
        }
    }

    /// A part the workers cannot use yet.
    pub fn not_ready(reason: &str, message: impl Into<String>, changes: Vec<String>) -> Self {
        Self {
            ready: false,
            reason: reason.to_string(),
            message: message.into(),
            changes,
        }
    }

    /// The report for an error that stopped the part's reconcile.
    pub fn from_error(error: &DataPlaneError) -> Self {
        Self::not_ready(error.reason(), error.to_string(), Vec::new())
    }
}

/// One field whose live value differs from the desired one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldChange {
    pub field: &'static str,
    pub live: String,
    pub desired: String,
}

impl fmt::Display for FieldChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} → {}", self.field, self.live, self.desired)
    }
}

/// `a 1 → 2, b x → y`.
pub(crate) fn list_changes<'a>(changes: impl IntoIterator<Item = &'a FieldChange>) -> String {
    changes
        .into_iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What [`reconcile_data_plane`] found and did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataPlaneReport {
    pub stream: PartReport,
    pub consumer: PartReport,
    pub table: PartReport,
    /// Stream figures, when the stream could be read.
    pub stream_status: Option<StreamStatus>,
    /// Consumer figures, when the consumer could be read.
    pub consumer_status: Option<ConsumerStatus>,
    /// With `workers.partitions`: each partition's consumer (then `consumer` and
    /// `consumer_status` stand for them all).
    pub partitions: Vec<signal_model::PartitionStatus>,
    /// Differences between the live table and the spec that the operator will not change itself.
    pub schema_drift: Option<String>,
    /// The dead-letter stream (or, when not managed, whether a stream captures the subject).
    /// Not part of [`Self::all_ready`]: workers run without it, holding poison unacknowledged.
    pub dead_letter: PartReport,
    /// Where dead letters go, when it could be seen.
    pub dead_letter_status: Option<DeadLetterStatus>,
    /// What the workers' health reports say.
    pub worker_health: WorkerHealth,
    /// What ensuring the shared health stream changed.
    pub health_stream_changes: Vec<String>,
}

impl DataPlaneReport {
    /// The stream, the consumer and the table are usable: the workers can run.
    pub fn all_ready(&self) -> bool {
        self.stream.ready && self.consumer.ready && self.table.ready
    }

    /// The stream or the dead-letter stream has replicas that are not current with its leader:
    /// just created or scaled (followers catching up, usually within seconds), or a server is
    /// away. The workers run; the status is looked at again sooner than a resync.
    pub fn replicas_lagging(&self) -> bool {
        self.stream_status
            .as_ref()
            .is_some_and(|status| !status.lagging_replicas.is_empty())
            || self.dead_letter.reason == stream::REPLICAS_DEGRADED
    }

    /// Every change made to the pipeline's own parts, in order stream, consumer, table,
    /// dead-letter stream (the shared health stream's are in `health_stream_changes`).
    pub fn changes(&self) -> impl Iterator<Item = &str> {
        self.stream
            .changes
            .iter()
            .chain(&self.consumer.changes)
            .chain(&self.table.changes)
            .chain(&self.dead_letter.changes)
            .map(String::as_str)
    }
}

/// Why a data-plane step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataPlaneError {
    #[error("NATS at {url} is unreachable: {message}")]
    NatsUnreachable { url: String, message: String },
    #[error("ClickHouse at {url} is unreachable: {message}")]
    ClickHouseUnreachable { url: String, message: String },
    #[error("NATS refused to {action}: {message}")]
    NatsRefused { action: String, message: String },
    #[error("ClickHouse refused `{statement}`: {message}")]
    ClickHouseRefused { statement: String, message: String },
    #[error("{server} at {url} did not accept the pipeline's credentials: {message}")]
    AuthenticationFailed {
        server: &'static str,
        url: String,
        message: String,
    },
    #[error("{action} took longer than {seconds} s")]
    TimedOut { action: String, seconds: u64 },
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// TLS to a server failed (handshake or unusable material); the message names the server
    /// and the cause.
    #[error("{0}")]
    Tls(String),
}

impl DataPlaneError {
    /// The condition reason this error stands for.
    pub fn reason(&self) -> &'static str {
        match self {
            DataPlaneError::NatsUnreachable { .. }
            | DataPlaneError::ClickHouseUnreachable { .. }
            | DataPlaneError::TimedOut { .. } => UNREACHABLE,
            DataPlaneError::AuthenticationFailed { .. } => "AuthenticationFailed",
            DataPlaneError::NatsRefused { .. } => "RequestRefused",
            DataPlaneError::ClickHouseRefused { .. } => "QueryFailed",
            DataPlaneError::InvalidSpec(_) => "InvalidSpec",
            DataPlaneError::Tls(_) => "TlsFailed",
        }
    }
}

/// Runs `future` with a deadline, turning an expiry into [`DataPlaneError::TimedOut`].
pub(crate) async fn bounded<T>(
    action: impl Into<String>,
    limit: Duration,
    future: impl Future<Output = Result<T, DataPlaneError>>,
) -> Result<T, DataPlaneError> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => result,
        Err(_) => Err(DataPlaneError::TimedOut {
            action: action.into(),
            seconds: limit.as_secs(),
        }),
    }
}

/// Opens a JetStream context on a new connection of its own, whose API requests time out after
/// [`REQUEST_TIMEOUT`] (the controller's reconciles take shared ones from [`Connections`]).
pub(crate) async fn connect_jetstream(
    spec: &SignalPipelineSpec,
    creds: &PipelineCredentials,
    client_name: &str,
) -> Result<jetstream::Context, DataPlaneError> {
    Connections::per_call()
        .session(client_name)
        .jetstream(
            &spec.nats.url,
            &creds.nats,
            creds.tls.nats.as_ref(),
            client_name,
        )
        .await
}

/// Tells a refused login and a bad URL apart from a server that cannot be reached: "unreachable"
/// would send a person looking at the network when the Secret or the spec is what is wrong.
fn nats_connect_error(url: &str, error: signal_clients::connect::ConnectError) -> DataPlaneError {
    use async_nats::ConnectErrorKind as Kind;
    use signal_clients::connect::ConnectError;
    let message = error.to_string();
    match &error {
        ConnectError::Tls { .. } | ConnectError::TlsConfig(_) => DataPlaneError::Tls(message),
        ConnectError::Redis { .. } => DataPlaneError::InvalidSpec(message),
        ConnectError::NatsCreds(_) => DataPlaneError::AuthenticationFailed {
            server: "NATS",
            url: url.to_string(),
            message,
        },
        ConnectError::NatsUrl { .. } => DataPlaneError::InvalidSpec(message),
        ConnectError::Nats { source, .. } => match source.kind() {
            Kind::Authentication | Kind::AuthorizationViolation => {
                DataPlaneError::AuthenticationFailed {
                    server: "NATS",
                    url: url.to_string(),
                    message,
                }
            }
            Kind::ServerParse => DataPlaneError::InvalidSpec(message),
            Kind::Dns | Kind::TimedOut | Kind::Tls | Kind::Io | Kind::MaxReconnects => {
                DataPlaneError::NatsUnreachable {
                    url: url.to_string(),
                    message,
                }
            }
        },
    }
}

/// Brings the stream, the consumer, the table and the dead-letter stream in line with `spec`, and
/// reads the workers' health reports, on connections of its own (see [`reconcile_data_plane_with`]).
pub async fn reconcile_data_plane(
    pipeline_name: &str,
    spec: &SignalPipelineSpec,
    creds: &PipelineCredentials,
) -> DataPlaneReport {
    reconcile_data_plane_with(
        &Connections::per_call(),
        pipeline_name,
        pipeline_name,
        spec,
        creds,
        table::TableCheck::Full,
    )
    .await
}

/// Brings the stream, the consumer, the table and the dead-letter stream in line with `spec`, and
/// reads the workers' health reports, with clients from `connections` for pipeline `key`
/// (`namespace/name`), waiting for a turn on each server.
///
/// NATS and ClickHouse are handled concurrently; the consumer waits for the stream it lives on.
/// `table_check` says whether a recent full check of the table may be taken on trust.
/// Never fails: every problem becomes a part that is not ready, with a reason and a message.
pub async fn reconcile_data_plane_with(
    connections: &Connections,
    key: &str,
    pipeline_name: &str,
    spec: &SignalPipelineSpec,
    creds: &PipelineCredentials,
    table_check: table::TableCheck,
) -> DataPlaneReport {
    let session = connections.session(key);
    let nats_side = async {
        let _turn = connections.turn(ServerKind::Nats, &spec.nats.url).await;
        let started = std::time::Instant::now();
        let side = reconcile_nats_side(&session, pipeline_name, spec, creds).await;
        connections.observe_step("nats", started.elapsed());
        side
    };
    let table_side = async {
        let _turn = connections
            .turn(ServerKind::ClickHouse, &spec.clickhouse.url)
            .await;
        let started = std::time::Instant::now();
        let table = table::reconcile_table_with(
            &session,
            &spec.clickhouse,
            &creds.clickhouse,
            creds.tls.clickhouse.as_ref(),
            table_check,
        )
        .await;
        connections.observe_step("clickhouse", started.elapsed());
        table
    };
    let (nats, table) = tokio::join!(nats_side, table_side);
    DataPlaneReport {
        stream: nats.stream,
        consumer: nats.consumer,
        table: table.report,
        stream_status: nats.stream_status,
        consumer_status: nats.consumer_status,
        partitions: nats.partitions,
        schema_drift: table.schema_drift,
        dead_letter: nats.dead_letter.report,
        dead_letter_status: nats.dead_letter.status,
        worker_health: nats.worker_health,
        health_stream_changes: nats.health_stream_changes,
    }
}

/// What the NATS side of a reconcile found.
struct NatsSide {
    stream: PartReport,
    stream_status: Option<StreamStatus>,
    consumer: PartReport,
    consumer_status: Option<ConsumerStatus>,
    partitions: Vec<signal_model::PartitionStatus>,
    dead_letter: DeadLetterOutcome,
    worker_health: WorkerHealth,
    health_stream_changes: Vec<String>,
}

async fn reconcile_nats_side(
    session: &Session<'_>,
    pipeline_name: &str,
    spec: &SignalPipelineSpec,
    creds: &PipelineCredentials,
) -> NatsSide {
    let js = match session
        .jetstream(
            &spec.nats.url,
            &creds.nats,
            creds.tls.nats.as_ref(),
            &format!("signal-operator/{pipeline_name}"),
        )
        .await
    {
        Ok(js) => js,
        Err(error) => return NatsSide::unanswered(PartReport::from_error(&error)),
    };
    // The dead-letter stream exists before the workers start (they start once this reconcile
    // is ready), so their first dead letter is stored.
    let dead_letter = dead_letter_stream::reconcile_dead_letter(&js, pipeline_name, spec).await;
    // A server that left one request unanswered would leave the next ones too: each would cost
    // another request timeout and hold the reconcile (and the workload step after it) longer.
    if dead_letter.report.reason == UNREACHABLE {
        return NatsSide {
            dead_letter: dead_letter.clone(),
            ..NatsSide::unanswered(not_checked_after(&dead_letter.report))
        };
    }
    let stream = stream::reconcile_stream(&js, &partitions::stream_spec(spec, pipeline_name)).await;
    if stream.report.reason == UNREACHABLE {
        return NatsSide {
            stream: stream.report.clone(),
            dead_letter,
            ..NatsSide::unanswered(not_checked_after(&stream.report))
        };
    }
    let mut partition_states = Vec::new();
    let scheme = signal_model::partitions::PartitionScheme::of(spec, pipeline_name);
    let (consumer, consumer_status) = if stream.exists
        && let Some(scheme) = &scheme
    {
        let outcome = partitions::reconcile_partitions(&js, pipeline_name, spec, scheme).await;
        partition_states = outcome.partitions;
        (outcome.report, outcome.status)
    } else if stream.exists {
        let consumer = consumer::reconcile_consumer(&js, pipeline_name, spec).await;
        (consumer.report, consumer.status)
    } else {
        let consumer = PartReport::not_ready(
            "StreamNotReady",
            format!(
                "the consumer waits for stream {}: {}",
                spec.stream.name, stream.report.message
            ),
            Vec::new(),
        );
        (consumer, None)
    };
    let (worker_health, health_stream_changes) = if consumer.reason == UNREACHABLE {
        (WorkerHealth::Unknown(consumer.message.clone()), Vec::new())
    } else {
        worker_health::check_worker_health(session, &js, pipeline_name, spec).await
    };
    NatsSide {
        stream: stream.report,
        stream_status: stream.status,
        consumer,
        consumer_status,
        partitions: partition_states,
        dead_letter,
        worker_health,
        health_stream_changes,
    }
}

/// The report of a part skipped because NATS left the request of an earlier one unanswered.
fn not_checked_after(unanswered: &PartReport) -> PartReport {
    PartReport::not_ready(
        UNREACHABLE,
        format!(
            "not checked, NATS left an earlier request unanswered: {}",
            unanswered.message
        ),
        Vec::new(),
    )
}

impl NatsSide {
    /// Every NATS part not ready with the same report: NATS could not be reached or stopped
    /// answering.
    fn unanswered(report: PartReport) -> Self {
        NatsSide {
            stream: report.clone(),
            stream_status: None,
            consumer: report.clone(),
            consumer_status: None,
            partitions: Vec::new(),
            worker_health: WorkerHealth::Unknown(report.message.clone()),
            dead_letter: DeadLetterOutcome {
                report,
                status: None,
            },
            health_stream_changes: Vec::new(),
        }
    }
}

/// What the workers' health reports say, read on its own connection (local mode polls it more
/// often than it reconciles).
pub async fn read_worker_health(
    pipeline_name: &str,
    spec: &SignalPipelineSpec,
    creds: &PipelineCredentials,
) -> WorkerHealth {
    match connect_jetstream(
        spec,
        creds,
        &format!("signal-operator/{pipeline_name}/health"),
    )
    .await
    {
        Ok(js) => {
            worker_health::check_worker_health(
                &Connections::per_call().session(pipeline_name),
                &js,
                pipeline_name,
                spec,
            )
            .await
            .0
        }
        Err(error) => WorkerHealth::Unknown(error.to_string()),
    }
}

/// Removes the consumer, the stream, the dead-letter stream and the table when
/// `spec.deletionPolicy` is `Delete`; does nothing for `Retain`.
///
/// The stream is kept when consumers other than this pipeline's remain on it (another pipeline
/// or tool still reads it), and the dead-letter stream goes only with the stream (see
/// [`dead_letter_stream::delete_dead_letter_stream`]); the consumer and the table, which belong to
/// this pipeline alone, are always removed. The shared health stream is never removed. Parts
/// already gone count as removed, so a retried deletion succeeds.
pub async fn delete_data_plane(
    pipeline_name: &str,
    spec: &SignalPipelineSpec,
    creds: &PipelineCredentials,
) -> Result<(), DataPlaneError> {
    if spec.deletion_policy == DeletionPolicy::Retain {
        return Ok(());
    }
    let js = connect_jetstream(spec, creds, &format!("signal-operator/{pipeline_name}")).await?;
    let durable = spec.durable_name(pipeline_name);
    consumer::delete_consumer(&js, &spec.stream.name, durable).await?;
    let stream_deleted = stream::delete_stream_unless_shared(&js, &spec.stream.name).await?;
    dead_letter_stream::delete_dead_letter_stream(&js, spec, stream_deleted).await?;
    table::drop_table(
        &spec.clickhouse,
        &creds.clickhouse,
        creds.tls.clickhouse.as_ref(),
    )
    .await?;
    Ok(())
}
