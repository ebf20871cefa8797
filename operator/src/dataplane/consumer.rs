//! The durable pull consumer the workers share: how the live one differs from the desired config
//! (`signal_clients::consumer_config`, which the worker builds the same way), and the create/update
//! that applies it.
//!
//! Acknowledgement is explicit: a worker acks a message only once its row is in ClickHouse, so a
//! crash redelivers instead of losing data. Pull limits (`max_waiting`, `max_batch`) keep the
//! server's defaults; the workers choose their batch size per fetch.

use async_nats::jetstream::{self, consumer};
pub use signal_clients::consumer_config::desired_consumer_config;
use signal_model::{ConsumerStatus, SignalPipelineSpec};

use super::{DataPlaneError, FieldChange, PART_TIMEOUT, PartReport, bounded, list_changes};

/// How a live consumer differs from the desired one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerConfigDiff {
    /// Fields an update can change. The filter subject is here: NATS decides whether it may
    /// change (2.10 allows it), and a refusal is reported with the server's words.
    pub mutable: Vec<FieldChange>,
    /// Fields only a new consumer can change: deliver policy, ack policy, pull versus push.
    pub immutable: Vec<FieldChange>,
}

impl ConsumerConfigDiff {
    pub fn is_empty(&self) -> bool {
        self.mutable.is_empty() && self.immutable.is_empty()
    }
}

fn deliver_policy_text(policy: &consumer::DeliverPolicy) -> String {
    match policy {
        consumer::DeliverPolicy::All => "all".to_string(),
        consumer::DeliverPolicy::New => "new".to_string(),
        consumer::DeliverPolicy::Last => "last".to_string(),
        consumer::DeliverPolicy::LastPerSubject => "last_per_subject".to_string(),
        consumer::DeliverPolicy::ByStartSequence { start_sequence } => {
            format!("by_start_sequence {start_sequence}")
        }
        consumer::DeliverPolicy::ByStartTime { start_time } => {
            format!("by_start_time {start_time}")
        }
    }
}

/// Both 0 and negative values mean "no limit" to the server.
fn normalized_limit(value: i64) -> i64 {
    if value <= 0 { -1 } else { value }
}

fn subject_text(subject: &str) -> String {
    if subject.is_empty() {
        "(whole stream)".to_string()
    } else {
        subject.to_string()
    }
}

/// Compares the fields the spec manages.
pub fn compare_consumer_config(
    desired: &consumer::pull::Config,
    live: &consumer::Config,
) -> ConsumerConfigDiff {
    let mut diff = ConsumerConfigDiff::default();
    if let Some(deliver_subject) = &live.deliver_subject {
        diff.immutable.push(FieldChange {
            field: "type",
            live: format!("push (deliver subject {deliver_subject})"),
            desired: "pull".to_string(),
        });
    }
    if desired.deliver_policy != live.deliver_policy {
        diff.immutable.push(FieldChange {
            field: "deliver_policy",
            live: deliver_policy_text(&live.deliver_policy),
            desired: deliver_policy_text(&desired.deliver_policy),
        });
    }
    if desired.ack_policy != live.ack_policy {
        diff.immutable.push(FieldChange {
            field: "ack_policy",
            live: format!("{:?}", live.ack_policy).to_lowercase(),
            desired: format!("{:?}", desired.ack_policy).to_lowercase(),
        });
    }
    if desired.filter_subject != live.filter_subject {
        diff.mutable.push(FieldChange {
            field: "filter_subject",
            live: subject_text(&live.filter_subject),
            desired: subject_text(&desired.filter_subject),
        });
    }
    if desired.ack_wait != live.ack_wait {
        diff.mutable.push(FieldChange {
            field: "ack_wait",
            live: signal_model::HumanDuration(live.ack_wait).to_string(),
            desired: signal_model::HumanDuration(desired.ack_wait).to_string(),
        });
    }
    if normalized_limit(desired.max_deliver) != normalized_limit(live.max_deliver) {
        diff.mutable.push(FieldChange {
            field: "max_deliver",
            live: live.max_deliver.to_string(),
            desired: desired.max_deliver.to_string(),
        });
    }
    if normalized_limit(desired.max_ack_pending) != normalized_limit(live.max_ack_pending) {
        diff.mutable.push(FieldChange {
            field: "max_ack_pending",
            live: live.max_ack_pending.to_string(),
            desired: desired.max_ack_pending.to_string(),
        });
    }
    diff
}

/// The update to send: the live config with every managed mutable field set as desired.
pub fn merged_update(
    desired: &consumer::pull::Config,
    live: &consumer::Config,
) -> consumer::Config {
    let mut update = live.clone();
    update.filter_subject = desired.filter_subject.clone();
    update.ack_wait = desired.ack_wait;
    update.max_deliver = desired.max_deliver;
    update.max_ack_pending = desired.max_ack_pending;
    update
}

/// Consumer figures for the pipeline status.
pub fn consumer_status(info: &consumer::Info) -> ConsumerStatus {
    ConsumerStatus {
        num_pending: info.num_pending,
        num_ack_pending: u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX),
        num_redelivered: u64::try_from(info.num_redelivered).unwrap_or(u64::MAX),
    }
}

/// The result of reconciling the consumer.
#[derive(Clone, Debug)]
pub struct ConsumerOutcome {
    pub report: PartReport,
    pub status: Option<ConsumerStatus>,
}

/// Creates the consumer when missing and updates drifted mutable fields; a changed immutable
/// field is reported and the consumer left alone.
pub async fn reconcile_consumer(
    js: &jetstream::Context,
    pipeline_name: &str,
    spec: &SignalPipelineSpec,
) -> ConsumerOutcome {
    reconcile_consumer_config(
        js,
        &spec.stream.name,
        desired_consumer_config(pipeline_name, spec),
    )
    .await
}

/// Like [`reconcile_consumer`], for any durable pull consumer config on `stream` (the
/// partitions' consumers, [`super::partitions`]).
pub async fn reconcile_consumer_config(
    js: &jetstream::Context,
    stream: &str,
    desired: consumer::pull::Config,
) -> ConsumerOutcome {
    let durable = desired.durable_name.clone().unwrap_or_default();
    bounded(
        format!("reconciling consumer {durable}"),
        PART_TIMEOUT,
        apply_consumer(js, stream, &durable, desired),
    )
    .await
    .unwrap_or_else(|error| ConsumerOutcome {
        report: PartReport::from_error(&error),
        status: None,
    })
}

async fn apply_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
    desired: consumer::pull::Config,
) -> Result<ConsumerOutcome, DataPlaneError> {
    let Some(live) = consumer_info(js, stream, durable).await? else {
        let info = create_or_update(js, desired.clone(), stream, durable, "create").await?;
        let change = vec![format!("created consumer {durable} on stream {stream}")];
        let leftover = compare_consumer_config(&desired, &info.config);
        let report = if leftover.is_empty() {
            PartReport::ready("Created", format!("consumer {durable} created"), change)
        } else {
            PartReport::not_ready(
                "UpdateIgnored",
                format!(
                    "consumer {durable} was created but the server kept {}",
                    list_changes(leftover.mutable.iter().chain(&leftover.immutable))
                ),
                change,
            )
        };
        return Ok(ConsumerOutcome {
            report,
            status: Some(consumer_status(&info)),
        });
    };

    let status = Some(consumer_status(&live));
    let diff = compare_consumer_config(&desired, &live.config);
    if !diff.immutable.is_empty() {
        let fields: Vec<&str> = diff.immutable.iter().map(|c| c.field).collect();
        return Ok(ConsumerOutcome {
            report: PartReport::not_ready(
                "ImmutableFieldChanged",
                format!(
                    "consumer {durable}: {} cannot change on an existing consumer ({}); the \
                     consumer was left as it is: delete it to start over, or put the spec back",
                    fields.join(", "),
                    list_changes(&diff.immutable)
                ),
                Vec::new(),
            ),
            status,
        });
    }
    if diff.mutable.is_empty() {
        return Ok(ConsumerOutcome {
            report: PartReport::ready(
                "UpToDate",
                format!("consumer {durable} matches the spec"),
                Vec::new(),
            ),
            status,
        });
    }

    let update = merged_update(&desired, &live.config);
    let updated = match create_or_update(js, update, stream, durable, "update").await {
        Ok(info) => info,
        Err(error) => {
            let reason = match error {
                DataPlaneError::NatsRefused { .. } => "UpdateRefused",
                _ => error.reason(),
            };
            return Ok(ConsumerOutcome {
                report: PartReport::not_ready(
                    reason,
                    format!("{error} (wanted: {})", list_changes(&diff.mutable)),
                    Vec::new(),
                ),
                status,
            });
        }
    };
    let change = vec![format!(
        "updated consumer {durable}: {}",
        list_changes(&diff.mutable)
    )];
    let leftover = compare_consumer_config(&desired, &updated.config);
    let report = if leftover.is_empty() {
        PartReport::ready(
            "Updated",
            format!(
                "consumer {durable} updated: {}",
                list_changes(&diff.mutable)
            ),
            change,
        )
    } else {
        PartReport::not_ready(
            "UpdateIgnored",
            format!(
                "consumer {durable}: the server accepted the update but kept {}",
                list_changes(leftover.mutable.iter().chain(&leftover.immutable))
            ),
            change,
        )
    };
    Ok(ConsumerOutcome {
        report,
        status: Some(consumer_status(&updated)),
    })
}

/// Sends a consumer create request (which also updates an existing durable) and returns the
/// server's view of the result.
async fn create_or_update<C>(
    js: &jetstream::Context,
    config: C,
    stream: &str,
    durable: &str,
    verb: &str,
) -> Result<consumer::Info, DataPlaneError>
where
    C: consumer::IntoConsumerConfig + consumer::FromConsumer,
{
    match js.create_consumer_on_stream(config, stream).await {
        Ok(created) => Ok(created.cached_info().clone()),
        Err(error) => Err(consumer_error(
            &format!("{verb} consumer {durable} on stream {stream}"),
            error,
        )),
    }
}

/// The consumer's info, or `None` when it (or its stream) does not exist.
pub async fn consumer_info(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> Result<Option<consumer::Info>, DataPlaneError> {
    match js
        .get_consumer_from_stream::<consumer::Config, _, _>(durable, stream)
        .await
    {
        Ok(found) => Ok(Some(found.cached_info().clone())),
        Err(error) if is_not_found(&error) => Ok(None),
        Err(error) => Err(consumer_error(
            &format!("read consumer {durable} on stream {stream}"),
            error,
        )),
    }
}

fn is_not_found(error: &jetstream::stream::ConsumerError) -> bool {
    matches!(
        error.kind(),
        jetstream::stream::ConsumerErrorKind::JetStream(api)
            if api.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
                || api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

fn consumer_error(action: &str, error: jetstream::stream::ConsumerError) -> DataPlaneError {
    use jetstream::stream::ConsumerErrorKind as Kind;
    match error.kind() {
        Kind::JetStream(api) => DataPlaneError::NatsRefused {
            action: action.to_string(),
            message: api.to_string(),
        },
        Kind::InvalidName => DataPlaneError::InvalidSpec(format!("{action}: {error}")),
        Kind::TimedOut | Kind::Request | Kind::InvalidConsumerType | Kind::Other => {
            DataPlaneError::NatsUnreachable {
                url: "the server".to_string(),
                message: format!("{action}: {error}"),
            }
        }
    }
}

/// Deletes the durable consumer; one already gone (or whose stream is gone) counts as deleted.
pub async fn delete_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> Result<(), DataPlaneError> {
    match js.delete_consumer_from_stream(durable, stream).await {
        Ok(_) => Ok(()),
        Err(error) if is_not_found(&error) => Ok(()),
        Err(error) => Err(consumer_error(
            &format!("delete consumer {durable} on stream {stream}"),
            error,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signal_model::{ConsumerSpec, DeliverPolicyKind, HumanDuration};
    use std::time::Duration;

    fn spec(consumer: ConsumerSpec) -> SignalPipelineSpec {
        SignalPipelineSpec {
            consumer,
            ..Default::default()
        }
    }

    fn live_from(desired: &consumer::pull::Config) -> consumer::Config {
        use consumer::IntoConsumerConfig;
        desired.clone().into_consumer_config()
    }

    #[test]
    fn the_desired_consumer_acks_explicitly_under_the_durable_name() {
        let config = desired_consumer_config(
            "payments",
            &spec(ConsumerSpec {
                filter_subject: Some("signals.tx.>".to_string()),
                deliver_policy: DeliverPolicyKind::New,
                ..ConsumerSpec::default()
            }),
        );
        assert_eq!(config.durable_name.as_deref(), Some("payments"));
        assert_eq!(config.ack_policy, consumer::AckPolicy::Explicit);
        assert_eq!(config.filter_subject, "signals.tx.>");
        assert_eq!(config.deliver_policy, consumer::DeliverPolicy::New);
        assert_eq!(config.ack_wait, Duration::from_secs(30));
        assert_eq!(config.max_deliver, 5);
        assert_eq!(config.max_ack_pending, 20_000);

        let named = desired_consumer_config(
            "payments",
            &spec(ConsumerSpec {
                durable_name: Some("ingest".to_string()),
                ..ConsumerSpec::default()
            }),
        );
        assert_eq!(named.durable_name.as_deref(), Some("ingest"));
        assert_eq!(named.filter_subject, "");
    }

    #[test]
    fn separates_mutable_from_immutable_changes() {
        let desired = desired_consumer_config(
            "p",
            &spec(ConsumerSpec {
                ack_wait: HumanDuration::from_secs(60),
                ..ConsumerSpec::default()
            }),
        );
        let mut live = live_from(&desired);
        assert!(compare_consumer_config(&desired, &live).is_empty());

        live.ack_wait = Duration::from_secs(30);
        live.deliver_policy = consumer::DeliverPolicy::New;
        live.max_ack_pending = 1000;
        let diff = compare_consumer_config(&desired, &live);
        let immutable: Vec<String> = diff.immutable.iter().map(ToString::to_string).collect();
        let mutable: Vec<String> = diff.mutable.iter().map(ToString::to_string).collect();
        assert_eq!(immutable, ["deliver_policy new → all"]);
        assert_eq!(
            mutable,
            ["ack_wait 30s → 1m", "max_ack_pending 1000 → 20000"]
        );

        let update = merged_update(&desired, &live);
        assert_eq!(update.ack_wait, Duration::from_secs(60));
        // The update never carries an immutable change.
        assert_eq!(update.deliver_policy, consumer::DeliverPolicy::New);
    }

    #[test]
    fn a_push_consumer_under_the_same_name_is_an_immutable_difference() {
        let desired = desired_consumer_config("p", &spec(ConsumerSpec::default()));
        let mut live = live_from(&desired);
        live.deliver_subject = Some("deliver.here".to_string());
        let diff = compare_consumer_config(&desired, &live);
        assert_eq!(diff.immutable[0].field, "type");
    }
}
