//! The pipeline's JetStream stream: the config the spec asks for, how it differs from the live one,
//! and the create/update that closes the gap.
//!
//! Updates start from the live config and overwrite only the fields the spec manages, so settings
//! made by other tools survive while drift in managed fields is put back. The server's answer is
//! compared again afterwards, because NATS 2.9 silently ignores options it does not know.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use signal_model::{
    DiscardKind, HumanDuration, RetentionKind, StorageKind, StreamSpec, StreamStatus,
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
        duplicate_window: spec
            .duplicate_window
            .map_or(Duration::ZERO, HumanDuration::as_duration),
        ..Default::default()
    }
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

/// Stream figures for the pipeline status.
pub fn stream_status(info: &stream::Info) -> StreamStatus {
    StreamStatus {
        messages: info.state.messages,
        bytes: info.state.bytes,
        last_sequence: info.state.last_sequence,
    }
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
        let created = js
            .create_stream(desired.clone())
            .await
            .map_err(|error| create_error(&format!("create stream {name}"), error))?;
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
            report: PartReport::ready(
                "UpToDate",
                format!("stream {name} matches the spec"),
                vec![],
            ),
            status,
            exists: true,
        });
    }

    let update = merged_update(&desired, &live.config);
    let updated = match js.update_stream(&update).await {
        Ok(info) => info,
        Err(error) => {
            let error = create_error(&format!("update stream {name}"), error);
            let reason = match error {
                DataPlaneError::NatsRefused { .. } => "UpdateRefused",
                _ => error.reason(),
            };
            return Ok(StreamOutcome {
                report: PartReport::not_ready(
                    reason,
                    format!("{error} (wanted: {})", list_changes(&diff.mutable)),
                    Vec::new(),
                ),
                status,
                exists: true,
            });
        }
    };
    let change = vec![format!(
        "updated stream {name}: {}",
        list_changes(&diff.mutable)
    )];
    let leftover = compare_stream_config(&desired, &updated.config);
    let report = if leftover.is_empty() {
        PartReport::ready(
            "Updated",
            format!("stream {name} updated: {}", list_changes(&diff.mutable)),
            change,
        )
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
