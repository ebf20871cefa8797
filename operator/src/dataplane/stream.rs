//! The pipeline's JetStream stream: the config the spec asks for, how it differs from the live one,
//! and the create/update that closes the gap.
//!
//! Updates start from the live config and overwrite only the fields the spec manages, so settings
//! made by other tools survive while drift in managed fields is put back. The server's answer is
//! compared again afterwards, because NATS 2.9 silently ignores options it does not know.
//!
//! In a NATS cluster the server decides what it can do with replicas and placement: 2.9 scales
//! a stream up or down and moves it to other servers, but refuses a placement no server matches
//! (more replicas than servers, an unknown cluster or tags) and a move and a scale in one update.
//! The operator sends a scale and a move in two reconciles (scale first), reports a refusal as
//! `PlacementImpossible` with the server's words, and reports replicas that are offline or behind
//! the leader in the status (the stream stays usable while a quorum of its replicas is).

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use signal_model::{
    DiscardKind, HumanDuration, RetentionKind, StorageKind, StreamPlacement, StreamSpec,
    StreamStatus,
};

use super::{DataPlaneError, FieldChange, PART_TIMEOUT, PartReport, bounded, list_changes};

/// The stream config `spec` asks for. Absent limits are `-1` (unlimited), as the server stores them.
pub fn desired_stream_config(spec: &StreamSpec) -> stream::Config {
    stream::Config {
        name: spec.name.clone(),
        subjects: spec.subjects.clone(),
        storage: match spec.storage {
            StorageKind::File => stream::StorageType::File,
            StorageKind::Memory => stream::StorageType::Memory,
        },
        retention: match spec.retention {
            RetentionKind::Limits => stream::RetentionPolicy::Limits,
            RetentionKind::Interest => stream::RetentionPolicy::Interest,
            RetentionKind::Workqueue => stream::RetentionPolicy::WorkQueue,
        },
        discard: match spec.discard {
            DiscardKind::Old => stream::DiscardPolicy::Old,
            DiscardKind::New => stream::DiscardPolicy::New,
        },
        max_age: spec
            .max_age
            .map_or(Duration::ZERO, HumanDuration::as_duration),
        max_bytes: spec
            .max_bytes
            .map_or(-1, |b| i64::try_from(b.bytes()).unwrap_or(i64::MAX)),
        max_messages: spec.max_msgs.unwrap_or(-1),
        // The server caps message size far below i32::MAX, so saturating loses nothing real.
        max_message_size: spec
            .max_msg_size
            .map_or(-1, |b| i32::try_from(b.bytes()).unwrap_or(i32::MAX)),
        max_messages_per_subject: -1,
        max_consumers: -1,
        num_replicas: usize::from(spec.replicas.max(1)),
        placement: spec.placement.as_ref().map(nats_placement),
        duplicate_window: spec
            .duplicate_window
            .map_or(Duration::ZERO, HumanDuration::as_duration),
        ..Default::default()
    }
}

fn nats_placement(placement: &StreamPlacement) -> stream::Placement {
    stream::Placement {
        cluster: placement.cluster.clone(),
        tags: placement.tags.clone(),
    }
}

/// `cluster east, tags [ssd]`, or `any server`.
fn placement_text(placement: Option<&stream::Placement>) -> String {
    let mut parts = Vec::new();
    if let Some(cluster) = placement.and_then(|p| p.cluster.as_deref()) {
        parts.push(format!("cluster {cluster}"));
    }
    if let Some(placement) = placement.filter(|p| !p.tags.is_empty()) {
        parts.push(format!("tags [{}]", placement.tags.join(", ")));
    }
    if parts.is_empty() {
        "any server".to_string()
    } else {
        parts.join(", ")
    }
}

/// Whether two placements ask for the same servers (tag order does not matter).
fn same_placement(a: Option<&stream::Placement>, b: Option<&stream::Placement>) -> bool {
    let key = |p: Option<&stream::Placement>| {
        (
            p.and_then(|p| p.cluster.clone()).filter(|c| !c.is_empty()),
            sorted(p.map_or(&[][..], |p| &p.tags)),
        )
    };
    key(a) == key(b)
}

/// How a live stream differs from the desired one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamConfigDiff {
    /// Fields an update can change. Retention is here: whether a transition is allowed depends
    /// on the server (2.9 refuses all of them, 2.10 allows limits ↔ interest), so the server decides
    /// and its refusal is reported.
    pub mutable: Vec<FieldChange>,
    /// Fields that only a new stream can change: storage (and the name, by definition).
    pub immutable: Vec<FieldChange>,
}

impl StreamConfigDiff {
    pub fn is_empty(&self) -> bool {
        self.mutable.is_empty() && self.immutable.is_empty()
    }
}

fn unlimited_if_negative(value: i64) -> String {
    if value <= 0 {
        "unlimited".to_string()
    } else {
        value.to_string()
    }
}

fn duration_text(value: Duration) -> String {
    if value.is_zero() {
        "unlimited".to_string()
    } else {
        HumanDuration(value).to_string()
    }
}

/// The server stores 0 (unset) limits as -1; both mean unlimited.
fn normalized_limit(value: i64) -> i64 {
    if value <= 0 { -1 } else { value }
}

fn sorted(subjects: &[String]) -> Vec<String> {
    let mut subjects = subjects.to_vec();
    subjects.sort();
    subjects.dedup();
    subjects
}

/// Compares the fields the spec manages. A zero `duplicate_window` in `desired` means "server
/// default" and is not compared.
pub fn compare_stream_config(desired: &stream::Config, live: &stream::Config) -> StreamConfigDiff {
    let mut diff = StreamConfigDiff::default();
    let mut change = |mutable: bool, field: &'static str, live: String, desired: String| {
        let change = FieldChange {
            field,
            live,
            desired,
        };
        if mutable {
            diff.mutable.push(change);
        } else {
            diff.immutable.push(change);
        }
    };
    if desired.name != live.name {
        change(false, "name", live.name.clone(), desired.name.clone());
    }
    if desired.storage != live.storage {
        change(
            false,
            "storage",
            format!("{:?}", live.storage).to_lowercase(),
            format!("{:?}", desired.storage).to_lowercase(),
        );
    }
    if sorted(&desired.subjects) != sorted(&live.subjects) {
        change(
            true,
            "subjects",
            format!("[{}]", live.subjects.join(", ")),
            format!("[{}]", desired.subjects.join(", ")),
        );
    }
    if desired.retention != live.retention {
        change(
            true,
            "retention",
            format!("{:?}", live.retention).to_lowercase(),
            format!("{:?}", desired.retention).to_lowercase(),
        );
    }
    if desired.discard != live.discard {
        change(
            true,
            "discard",
            format!("{:?}", live.discard).to_lowercase(),
            format!("{:?}", desired.discard).to_lowercase(),
        );
    }
    if desired.max_age != live.max_age {
        change(
            true,
            "max_age",
            duration_text(live.max_age),
            duration_text(desired.max_age),
        );
    }
    let limits = [
        ("max_bytes", desired.max_bytes, live.max_bytes),
        ("max_msgs", desired.max_messages, live.max_messages),
        (
            "max_msg_size",
            i64::from(desired.max_message_size),
            i64::from(live.max_message_size),
        ),
    ];
    for (field, desired_value, live_value) in limits {
        if normalized_limit(desired_value) != normalized_limit(live_value) {
            change(
                true,
                field,
                unlimited_if_negative(live_value),
                unlimited_if_negative(desired_value),
            );
        }
    }
    if desired.num_replicas.max(1) != live.num_replicas.max(1) {
        change(
            true,
            "replicas",
            live.num_replicas.to_string(),
            desired.num_replicas.to_string(),
        );
    }
    // Without a placement in the spec the servers choose, and a placement set by hand stays.
    if desired.placement.is_some()
        && !same_placement(desired.placement.as_ref(), live.placement.as_ref())
    {
        change(
            true,
            PLACEMENT,
            placement_text(live.placement.as_ref()),
            placement_text(desired.placement.as_ref()),
        );
    }
    if !desired.duplicate_window.is_zero() && desired.duplicate_window != live.duplicate_window {
        change(
            true,
            "duplicate_window",
            duration_text(live.duplicate_window),
            duration_text(desired.duplicate_window),
        );
    }
    diff
}

/// The update to send: the live config with every managed field set as desired.
pub fn merged_update(desired: &stream::Config, live: &stream::Config) -> stream::Config {
    let mut update = live.clone();
    update.subjects = desired.subjects.clone();
    update.retention = desired.retention;
    update.discard = desired.discard;
    update.max_age = desired.max_age;
    update.max_bytes = desired.max_bytes;
    update.max_messages = desired.max_messages;
    update.max_message_size = desired.max_message_size;
    update.num_replicas = desired.num_replicas;
    if desired.placement.is_some() {
        update.placement = desired.placement.clone();
    }
    if !desired.duplicate_window.is_zero() {
        update.duplicate_window = desired.duplicate_window;
    } else if !desired.max_age.is_zero() && update.duplicate_window > desired.max_age {
        // The server refuses a duplicate window longer than max_age ("duplicates window can not
        // be larger then max age"); a stream created with the default 2m window would otherwise
        // never accept a max_age below 2m. Shrinking it is what the server does on create.
        update.duplicate_window = desired.max_age;
    }
    update
}

/// The field name of a placement change.
const PLACEMENT: &str = "placement";
/// The field name of a replicas change.
const REPLICAS: &str = "replicas";
/// JetStream's error code for "no suitable peers for placement".
const NO_SUITABLE_PEERS: jetstream::ErrorCode = jetstream::ErrorCode(10005);
/// The reason of a replicas or placement change the cluster cannot carry out.
pub const PLACEMENT_IMPOSSIBLE: &str = "PlacementImpossible";
/// The reason of a stream scaled by this reconcile whose placement change follows.
pub const SCALED_BEFORE_MOVE: &str = "ScaledBeforeMove";
/// The reason of a stream that works while some of its replicas are offline or behind.
pub const REPLICAS_DEGRADED: &str = "ReplicasDegraded";
/// JetStream's error code for "stream move already in progress" (2.10+): the cluster is still
/// carrying out the stream's last change of replicas or placement.
const MOVE_IN_PROGRESS: jetstream::ErrorCode = jetstream::ErrorCode(10124);
/// The reason of an update that waits for the stream's last replicas or placement change.
pub const STREAM_MOVING: &str = "StreamMoving";

/// The updates that carry out `diff`, in order; a reconcile sends the first. NATS 2.9 refuses to
/// move and scale a stream in one update ("can not move and scale a stream in a single update"),
/// so a change of both scales first (keeping the live placement) and moves second.
pub fn planned_updates(
    desired: &stream::Config,
    live: &stream::Config,
    diff: &StreamConfigDiff,
) -> Vec<stream::Config> {
    let update = merged_update(desired, live);
    let changes = |field: &str| diff.mutable.iter().any(|c| c.field == field);
    if changes(REPLICAS) && changes(PLACEMENT) {
        let scale = stream::Config {
            placement: live.placement.clone(),
            ..update.clone()
        };
        vec![scale, update]
    } else {
        vec![update]
    }
}

/// Servers holding a replica of the stream that are offline or not current with the leader
/// (empty outside a cluster).
fn lagging_replicas(info: &stream::Info) -> Vec<String> {
    info.cluster.as_ref().map_or_else(Vec::new, |cluster| {
        cluster
            .replicas
            .iter()
            .filter(|peer| peer.offline || !peer.current)
            .map(|peer| peer.name.clone())
            .collect()
    })
}

/// Stream figures for the pipeline status.
pub fn stream_status(info: &stream::Info) -> StreamStatus {
    let clustered = info.cluster.as_ref().filter(|c| c.leader.is_some());
    let lagging = lagging_replicas(info);
    StreamStatus {
        messages: info.state.messages,
        bytes: info.state.bytes,
        last_sequence: info.state.last_sequence,
        leader: clustered.and_then(|c| c.leader.clone()),
        // The leader plus the followers that keep up.
        current_replicas: clustered
            .filter(|_| info.config.num_replicas > 1)
            .map(|c| u32::try_from(1 + c.replicas.len() - lagging.len()).unwrap_or(u32::MAX)),
        lagging_replicas: lagging,
    }
}

/// The ready report of a stream that matches the spec, saying so when replicas are missing: the
/// stream keeps working while a quorum of them is current, with less safety.
fn ready_report(reason: &str, message: String, info: &stream::Info) -> PartReport {
    let lagging = lagging_replicas(info);
    if lagging.is_empty() || info.config.num_replicas <= 1 {
        return PartReport::ready(reason, message, Vec::new());
    }
    let replicas = info.config.num_replicas;
    PartReport::ready(
        REPLICAS_DEGRADED,
        format!(
            "{message}; {} of {replicas} replicas current: {} offline or behind the leader {}",
            replicas.saturating_sub(lagging.len()),
            lagging.join(", "),
            info.cluster
                .as_ref()
                .and_then(|c| c.leader.as_deref())
                .unwrap_or("(none)"),
        ),
        Vec::new(),
    )
}

/// The result of reconciling the stream.
#[derive(Clone, Debug)]
pub struct StreamOutcome {
    pub report: PartReport,
    pub status: Option<StreamStatus>,
    /// The stream exists on the server (so a consumer can be put on it), ready or not.
    pub exists: bool,
}

/// Creates the stream when missing, updates drifted mutable fields, and refuses to touch a stream
/// whose immutable fields differ from the spec.
pub async fn reconcile_stream(js: &jetstream::Context, spec: &StreamSpec) -> StreamOutcome {
    let result = bounded(
        format!("reconciling stream {}", spec.name),
        PART_TIMEOUT,
        apply_stream(js, spec),
    )
    .await;
    result.unwrap_or_else(|error| StreamOutcome {
        report: PartReport::from_error(&error),
        status: None,
        exists: false,
    })
}

async fn apply_stream(
    js: &jetstream::Context,
    spec: &StreamSpec,
) -> Result<StreamOutcome, DataPlaneError> {
    let desired = desired_stream_config(spec);
    let name = &spec.name;
    let Some(live) = stream_info(js, name).await? else {
        let created = match js.create_stream(desired.clone()).await {
            Ok(created) => created,
            Err(error) if is_no_suitable_peers(&error) => {
                return Ok(StreamOutcome {
                    report: PartReport::not_ready(
                        PLACEMENT_IMPOSSIBLE,
                        format!(
                            "stream {name} was not created: the NATS cluster has no servers for \
                             {} replicas on {} ({}); lower spec.stream.replicas to at most the \
                             number of servers that match, change spec.stream.placement, or lower \
                             spec.stream.maxBytes when the servers lack storage",
                            desired.num_replicas,
                            placement_text(desired.placement.as_ref()),
                            server_words(&error),
                        ),
                        Vec::new(),
                    ),
                    status: None,
                    exists: false,
                });
            }
            Err(error) => return Err(create_error(&format!("create stream {name}"), error)),
        };
        let info = created.cached_info();
        let status = Some(stream_status(info));
        let change = vec![format!("created stream {name}")];
        let leftover = compare_stream_config(&desired, &info.config);
        let report = if leftover.is_empty() {
            PartReport::ready("Created", format!("stream {name} created"), change)
        } else {
            PartReport::not_ready(
                "UpdateIgnored",
                format!(
                    "stream {name} was created but the server kept {}",
                    list_changes(leftover.mutable.iter().chain(&leftover.immutable))
                ),
                change,
            )
        };
        return Ok(StreamOutcome {
            report,
            status,
            exists: true,
        });
    };

    let diff = compare_stream_config(&desired, &live.config);
    let status = Some(stream_status(&live));
    if !diff.immutable.is_empty() {
        let fields: Vec<&str> = diff.immutable.iter().map(|c| c.field).collect();
        return Ok(StreamOutcome {
            report: PartReport::not_ready(
                "ImmutableFieldChanged",
                format!(
                    "stream {name}: {} cannot change on an existing stream ({}); the stream was \
                     left as it is: delete it, or put the spec back",
                    fields.join(", "),
                    list_changes(&diff.immutable)
                ),
                Vec::new(),
            ),
            status,
            exists: true,
        });
    }
    if diff.mutable.is_empty() {
        return Ok(StreamOutcome {
            report: ready_report("UpToDate", format!("stream {name} matches the spec"), &live),
            status,
            exists: true,
        });
    }

    let updates = planned_updates(&desired, &live.config, &diff);
    let update = &updates[0];
    let updated = match js.update_stream(update).await {
        Ok(info) => info,
        Err(error) => {
            return Ok(StreamOutcome {
                report: update_refused(name, &diff, error, &live.config, update),
                status,
                exists: true,
            });
        }
    };
    let change = vec![format!(
        "updated stream {name}: {}",
        list_changes(&diff.mutable)
    )];
    if updates.len() > 1 {
        // The move waits for the next reconcile: right after a scale the stream's group is
        // still forming and leaves a second update unanswered.
        let left = compare_stream_config(&desired, &updated.config);
        return Ok(StreamOutcome {
            report: PartReport::not_ready(
                SCALED_BEFORE_MOVE,
                format!(
                    "stream {name} scaled to {} replicas; {} follows on the next reconcile \
                     (NATS moves and scales a stream in separate updates)",
                    updated.config.num_replicas,
                    list_changes(&left.mutable)
                ),
                vec![format!(
                    "scaled stream {name}: replicas {} → {}",
                    live.config.num_replicas, updated.config.num_replicas
                )],
            ),
            status: Some(stream_status(&updated)),
            exists: true,
        });
    }
    let leftover = compare_stream_config(&desired, &updated.config);
    let report = if leftover.is_empty() {
        PartReport {
            changes: change,
            ..ready_report(
                "Updated",
                format!("stream {name} updated: {}", list_changes(&diff.mutable)),
                &updated,
            )
        }
    } else {
        PartReport::not_ready(
            "UpdateIgnored",
            format!(
                "stream {name}: the server accepted the update but kept {}",
                list_changes(leftover.mutable.iter().chain(&leftover.immutable))
            ),
            change,
        )
    };
    Ok(StreamOutcome {
        report,
        status: Some(stream_status(&updated)),
        exists: true,
    })
}

fn is_no_suitable_peers(error: &jetstream::context::CreateStreamError) -> bool {
    api_error_code(error) == Some(NO_SUITABLE_PEERS)
}

/// The JetStream error code of a refusal by the server.
fn api_error_code(error: &jetstream::context::CreateStreamError) -> Option<jetstream::ErrorCode> {
    match error.kind() {
        jetstream::context::CreateStreamErrorKind::JetStream(api) => Some(api.error_code()),
        _ => None,
    }
}

/// The server's description of an API refusal, or the error itself.
fn server_words(error: &jetstream::context::CreateStreamError) -> String {
    match error.kind() {
        jetstream::context::CreateStreamErrorKind::JetStream(api) => api.to_string(),
        _ => error.to_string(),
    }
}

/// The report of an update the server did not carry out; the live stream stays as it is.
fn update_refused(
    name: &str,
    diff: &StreamConfigDiff,
    error: jetstream::context::CreateStreamError,
    live: &stream::Config,
    update: &stream::Config,
) -> PartReport {
    if is_no_suitable_peers(&error) {
        return PartReport::not_ready(
            PLACEMENT_IMPOSSIBLE,
            format!(
                "stream {name} stays at {} replicas on {}: the NATS cluster has no servers for {} \
                 replicas on {} ({}); lower spec.stream.replicas to at most the number of servers \
                 that match, change spec.stream.placement, or lower spec.stream.maxBytes when the \
                 servers lack storage",
                live.num_replicas,
                placement_text(live.placement.as_ref()),
                update.num_replicas,
                placement_text(update.placement.as_ref()),
                server_words(&error),
            ),
            Vec::new(),
        );
    }
    if api_error_code(&error) == Some(MOVE_IN_PROGRESS) {
        // Not a refusal of the change: a later reconcile sends it again.
        return PartReport::not_ready(
            STREAM_MOVING,
            format!(
                "stream {name} is still carrying out its last change of replicas or placement \
                 ({}); {} follows once it has finished",
                server_words(&error),
                list_changes(&diff.mutable)
            ),
            Vec::new(),
        );
    }
    let error = create_error(&format!("update stream {name}"), error);
    let reason = match error {
        DataPlaneError::NatsRefused { .. } => "UpdateRefused",
        _ => error.reason(),
    };
    PartReport::not_ready(
        reason,
        format!("{error} (wanted: {})", list_changes(&diff.mutable)),
        Vec::new(),
    )
}

/// The stream's info, or `None` when it does not exist.
pub async fn stream_info(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<stream::Info>, DataPlaneError> {
    use jetstream::context::GetStreamErrorKind;
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream.cached_info().clone())),
        Err(error) => match error.kind() {
            GetStreamErrorKind::JetStream(api)
                if api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            GetStreamErrorKind::JetStream(api) => Err(DataPlaneError::NatsRefused {
                action: format!("read stream {name}"),
                message: api.to_string(),
            }),
            GetStreamErrorKind::EmptyName | GetStreamErrorKind::InvalidStreamName => Err(
                DataPlaneError::InvalidSpec(format!("stream name `{name}` is not valid")),
            ),
            GetStreamErrorKind::Request => Err(DataPlaneError::NatsUnreachable {
                url: "the server".to_string(),
                message: format!("cannot read stream {name}: {error}"),
            }),
        },
    }
}

/// Maps a create/update error: API refusals keep the server's words, transport problems count
/// as unreachable.
fn create_error(action: &str, error: jetstream::context::CreateStreamError) -> DataPlaneError {
    use jetstream::context::CreateStreamErrorKind as Kind;
    match error.kind() {
        Kind::JetStream(api) => DataPlaneError::NatsRefused {
            action: action.to_string(),
            message: api.to_string(),
        },
        Kind::EmptyStreamName | Kind::InvalidStreamName | Kind::DomainAndExternalSet => {
            DataPlaneError::InvalidSpec(format!("{action}: {error}"))
        }
        Kind::JetStreamUnavailable
        | Kind::TimedOut
        | Kind::Response
        | Kind::NotFound
        | Kind::ResponseParse => DataPlaneError::NatsUnreachable {
            url: "the server".to_string(),
            message: format!("{action}: {error}"),
        },
    }
}

/// Deletes the stream unless consumers remain on it. Returns whether it was deleted (a missing
/// stream counts as deleted).
pub async fn delete_stream_unless_shared(
    js: &jetstream::Context,
    name: &str,
) -> Result<bool, DataPlaneError> {
    let Some(info) = stream_info(js, name).await? else {
        return Ok(true);
    };
    if info.state.consumer_count > 0 {
        tracing::info!(
            stream = name,
            consumers = info.state.consumer_count,
            "stream kept: other consumers still read it"
        );
        return Ok(false);
    }
    match js.delete_stream(name).await {
        Ok(_) => Ok(true),
        Err(error) => match error.kind() {
            jetstream::context::DeleteStreamErrorKind::JetStream(api)
                if api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(true)
            }
            _ => Err(DataPlaneError::NatsRefused {
                action: format!("delete stream {name}"),
                message: error.to_string(),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signal_model::ByteSize;

    fn spec() -> StreamSpec {
        StreamSpec {
            name: "SIGNALS".to_string(),
            subjects: vec!["signals.>".to_string()],
            replicas: 1,
            ..Default::default()
        }
    }

    #[test]
    fn absent_limits_are_unlimited() {
        let config = desired_stream_config(&spec());
        assert_eq!(config.name, "SIGNALS");
        assert_eq!(config.subjects, ["signals.>"]);
        assert_eq!(config.max_bytes, -1);
        assert_eq!(config.max_messages, -1);
        assert_eq!(config.max_message_size, -1);
        assert_eq!(config.max_age, Duration::ZERO);
        assert_eq!(config.num_replicas, 1);
        assert_eq!(config.storage, stream::StorageType::File);
    }

    #[test]
    fn every_spec_field_reaches_the_config() {
        let spec = StreamSpec {
            storage: StorageKind::Memory,
            retention: RetentionKind::Workqueue,
            discard: DiscardKind::New,
            max_age: Some(HumanDuration::from_secs(7 * 86_400)),
            max_bytes: Some(ByteSize(10 << 30)),
            max_msgs: Some(1_000_000),
            max_msg_size: Some(ByteSize(1 << 20)),
            replicas: 3,
            duplicate_window: Some(HumanDuration::from_secs(120)),
            ..spec()
        };
        let config = desired_stream_config(&spec);
        assert_eq!(config.storage, stream::StorageType::Memory);
        assert_eq!(config.retention, stream::RetentionPolicy::WorkQueue);
        assert_eq!(config.discard, stream::DiscardPolicy::New);
        assert_eq!(config.max_age, Duration::from_secs(604_800));
        assert_eq!(config.max_bytes, 10 << 30);
        assert_eq!(config.max_messages, 1_000_000);
        assert_eq!(config.max_message_size, 1 << 20);
        assert_eq!(config.num_replicas, 3);
        assert_eq!(config.duplicate_window, Duration::from_secs(120));
    }

    #[test]
    fn a_matching_live_config_is_no_change() {
        let desired = desired_stream_config(&spec());
        // What the server returns: unset limits as -1, its own duplicate window, extra fields.
        let live = stream::Config {
            duplicate_window: Duration::from_secs(120),
            subjects: vec!["signals.>".to_string()],
            max_messages_per_subject: -1,
            allow_direct: true,
            ..desired.clone()
        };
        assert!(compare_stream_config(&desired, &live).is_empty());
    }

    #[test]
    fn separates_mutable_from_immutable_changes() {
        let desired = desired_stream_config(&StreamSpec {
            max_age: Some(HumanDuration::from_secs(3600)),
            subjects: vec!["signals.>".to_string(), "alerts.>".to_string()],
            ..spec()
        });
        let live = stream::Config {
            storage: stream::StorageType::Memory,
            max_age: Duration::from_secs(60),
            subjects: vec!["signals.>".to_string()],
            max_bytes: 0,
            ..desired.clone()
        };
        let diff = compare_stream_config(&desired, &live);
        assert_eq!(
            diff.immutable,
            [FieldChange {
                field: "storage",
                live: "memory".into(),
                desired: "file".into()
            }]
        );
        let mutable: Vec<String> = diff.mutable.iter().map(ToString::to_string).collect();
        assert_eq!(
            mutable,
            [
                "subjects [signals.>] → [signals.>, alerts.>]",
                "max_age 1m → 1h"
            ]
        );
    }

    #[test]
    fn the_update_keeps_unmanaged_live_settings() {
        let desired = desired_stream_config(&StreamSpec {
            max_msgs: Some(10),
            ..spec()
        });
        let live = stream::Config {
            description: Some("made by hand".to_string()),
            deny_delete: true,
            max_messages: 99,
            duplicate_window: Duration::from_secs(30),
            ..desired.clone()
        };
        let update = merged_update(&desired, &live);
        assert_eq!(update.max_messages, 10);
        assert_eq!(update.description.as_deref(), Some("made by hand"));
        assert!(update.deny_delete);
        assert_eq!(update.duplicate_window, Duration::from_secs(30));
        assert!(compare_stream_config(&desired, &update).is_empty());
    }

    fn placed(cluster: &str, tags: &[&str]) -> Option<StreamPlacement> {
        Some(StreamPlacement {
            cluster: Some(cluster.to_string()),
            tags: tags.iter().map(ToString::to_string).collect(),
        })
    }

    #[test]
    fn a_placement_is_compared_only_when_the_spec_sets_one() {
        let unplaced = desired_stream_config(&spec());
        let live = stream::Config {
            placement: Some(nats_placement(&placed("east", &["ssd"]).unwrap())),
            ..unplaced.clone()
        };
        // Set by hand, not in the spec: kept.
        assert!(compare_stream_config(&unplaced, &live).is_empty());
        assert_eq!(merged_update(&unplaced, &live).placement, live.placement);

        let same = desired_stream_config(&StreamSpec {
            placement: placed("east", &["ssd"]),
            ..spec()
        });
        assert!(compare_stream_config(&same, &live).is_empty());
        let moved = desired_stream_config(&StreamSpec {
            placement: placed("west", &[]),
            ..spec()
        });
        let diff = compare_stream_config(&moved, &live);
        let changes: Vec<String> = diff.mutable.iter().map(ToString::to_string).collect();
        assert_eq!(
            changes,
            ["placement cluster east, tags [ssd] → cluster west"]
        );
    }

    #[test]
    fn a_scale_and_a_move_are_two_updates_scale_first() {
        let live = desired_stream_config(&spec());
        let desired = desired_stream_config(&StreamSpec {
            replicas: 3,
            placement: placed("east", &[]),
            ..spec()
        });
        let diff = compare_stream_config(&desired, &live);
        let updates = planned_updates(&desired, &live, &diff);
        assert_eq!(updates.len(), 2);
        assert_eq!(updates[0].num_replicas, 3);
        assert_eq!(updates[0].placement, None);
        assert_eq!(updates[1].placement, desired.placement);

        let scale_only = desired_stream_config(&StreamSpec {
            replicas: 3,
            ..spec()
        });
        let diff = compare_stream_config(&scale_only, &live);
        assert_eq!(planned_updates(&scale_only, &live, &diff).len(), 1);
    }

    #[test]
    fn a_shorter_max_age_shrinks_the_servers_default_duplicate_window() {
        let desired = desired_stream_config(&StreamSpec {
            max_age: Some(HumanDuration::from_secs(60)),
            ..spec()
        });
        let live = stream::Config {
            max_age: Duration::from_secs(3600),
            duplicate_window: Duration::from_secs(120),
            ..desired.clone()
        };
        let update = merged_update(&desired, &live);
        assert_eq!(update.max_age, Duration::from_secs(60));
        assert_eq!(update.duplicate_window, Duration::from_secs(60));
    }
}
