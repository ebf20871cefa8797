//! Partitioned consumers (`spec.workers.partitions`) on the operator's side: the stream's
//! partitioning, one durable consumer per partition, and a check that partitioning happens.
//!
//! The stream captures the partitioned subjects (`part.<STREAM>.*.<subject>`) and the published
//! subject pattern itself. On nats-server 2.10+ the stream rewrites published subjects with a
//! subject transform the operator sets. On 2.9 the server's `mappings` must do it (README,
//! "Partitioned consumers"): the published pattern is captured so that a missing mapping shows
//! as messages stored without a partition token, which no partition consumer sees, and is
//! reported (`PartitionMappingMissing`) instead of silently leaving signals behind.

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use signal_clients::consumer_config::partition_consumer_config;
use signal_model::partitions::PartitionScheme;
use signal_model::{
    ConsumerStatus, PartitionStatus, ServerVersion, SignalPipelineSpec, StreamSpec,
};

use super::consumer::{ConsumerOutcome, delete_consumer, reconcile_consumer_config};
use super::{DataPlaneError, PART_TIMEOUT, PartReport, bounded};

/// The reason of a stream holding messages without a partition token.
pub const MAPPING_MISSING: &str = "PartitionMappingMissing";

/// The stream the spec asks for: with partitions, it captures the partitioned subjects as well as
/// the published pattern.
pub fn stream_spec(spec: &SignalPipelineSpec, pipeline_name: &str) -> StreamSpec {
    let mut stream = spec.stream.clone();
    if let Some(scheme) = PartitionScheme::of(spec, pipeline_name) {
        stream.subjects = vec![scheme.partitioned_subjects(), scheme.source_subject.clone()];
    }
    stream
}

/// Whether a nats-server version (`2.9.10`) has stream subject transforms (2.10+).
pub fn supports_stream_transforms(version: &str) -> bool {
    ServerVersion::parse(version).is_some_and(|v| v >= ServerVersion::new(2, 10))
}

/// The transform a 2.10+ stream needs.
pub fn desired_transform(scheme: &PartitionScheme) -> stream::SubjectTransform {
    stream::SubjectTransform {
        source: scheme.source_subject.clone(),
        destination: scheme.mapping_destination(),
    }
}

/// The partition index of a consumer name `<durable>-p<i>`, if it is one.
pub fn partition_of(durable: &str, consumer: &str) -> Option<u32> {
    consumer
        .strip_prefix(durable)?
        .strip_prefix("-p")?
        .parse()
        .ok()
}

/// What reconciling the partitions found and did.
#[derive(Clone, Debug)]
pub struct PartitionsOutcome {
    /// The consumers' part (it stands for the pipeline's consumer).
    pub report: PartReport,
    /// The partitions' figures summed, as the pipeline's consumer figures (lag for autoscaling).
    pub status: Option<ConsumerStatus>,
    pub partitions: Vec<PartitionStatus>,
}

/// Reconciles the transform (2.10+), the partition consumers (deleting those above the count)
/// and checks that messages are partitioned.
pub async fn reconcile_partitions(
    js: &jetstream::Context,
    pipeline_name: &str,
    spec: &SignalPipelineSpec,
    scheme: &PartitionScheme,
) -> PartitionsOutcome {
    bounded(
        format!("reconciling the {} partition consumers", scheme.count),
        PART_TIMEOUT,
        apply(js, pipeline_name, spec, scheme),
    )
    .await
    .unwrap_or_else(|error| PartitionsOutcome {
        report: PartReport::from_error(&error),
        status: None,
        partitions: Vec::new(),
    })
}

fn refused(action: String, error: impl std::fmt::Display) -> DataPlaneError {
    DataPlaneError::NatsRefused {
        action,
        message: error.to_string(),
    }
}

async fn apply(
    js: &jetstream::Context,
    pipeline_name: &str,
    spec: &SignalPipelineSpec,
    scheme: &PartitionScheme,
) -> Result<PartitionsOutcome, DataPlaneError> {
    let stream_name = &spec.stream.name;
    let mut changes = Vec::new();
    let mut stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| refused(format!("read stream {stream_name}"), e))?;
    let transforms = supports_stream_transforms(&js.client().server_info().version);
    if transforms {
        let desired = desired_transform(scheme);
        let live = stream.cached_info().config.clone();
        if live.subject_transform.as_ref() != Some(&desired) {
            let mut update = live;
            update.subject_transform = Some(desired.clone());
            js.update_stream(update)
                .await
                .map_err(|e| refused(format!("set the partition transform of {stream_name}"), e))?;
            changes.push(format!(
                "stream {stream_name} partitions `{}` into {} partitions",
                desired.source, scheme.count
            ));
        }
    }

    let mut partitions = Vec::new();
    let mut problems: Vec<PartReport> = Vec::new();
    let mut total = ConsumerStatus::default();
    for index in 0..scheme.count {
        let desired = partition_consumer_config(pipeline_name, spec, scheme, index);
        let ConsumerOutcome { report, status } =
            reconcile_consumer_config(js, stream_name, desired).await;
        changes.extend(report.changes.iter().cloned());
        if let Some(status) = &status {
            total.num_pending += status.num_pending;
            total.num_ack_pending += status.num_ack_pending;
            total.num_redelivered += status.num_redelivered;
        }
        if !report.ready {
            problems.push(report);
        }
        partitions.push(PartitionStatus {
            consumer: scheme.consumer_name(index),
            filter_subject: scheme.filter_subject(index),
            num_pending: status.as_ref().map_or(0, |s| s.num_pending),
            num_ack_pending: status.as_ref().map_or(0, |s| s.num_ack_pending),
        });
    }

    // Consumers of partitions beyond the count (it shrank) are deleted; their messages belong
    // to other partitions now, and the stream keeps them.
    let mut names = stream.consumer_names();
    let mut extras = Vec::new();
    while let Some(name) = names.next().await {
        let name = name.map_err(|e| refused(format!("list consumers of {stream_name}"), e))?;
        if partition_of(&scheme.durable, &name).is_some_and(|index| index >= scheme.count) {
            extras.push(name);
        }
    }
    for name in extras {
        delete_consumer(js, stream_name, &name).await?;
        changes.push(format!(
            "deleted consumer {name}: beyond {} partitions",
            scheme.count
        ));
    }

    let unpartitioned = unpartitioned_messages(&mut stream, &scheme.source_subject).await?;
    let report = if let Some(problem) = problems.into_iter().next() {
        PartReport::not_ready(&problem.reason, problem.message, changes)
    } else if unpartitioned > 0 {
        PartReport::not_ready(
            MAPPING_MISSING,
            mapping_missing_message(scheme, unpartitioned, transforms),
            changes,
        )
    } else {
        let how = if transforms {
            "partitioned by the stream's subject transform"
        } else {
            "partitioned by the server's mapping"
        };
        PartReport::ready(
            if changes.is_empty() {
                "UpToDate"
            } else {
                "Updated"
            },
            format!(
                "{} partition consumers {}-p0…p{} ({how})",
                scheme.count,
                scheme.durable,
                scheme.count - 1
            ),
            changes,
        )
    };
    Ok(PartitionsOutcome {
        report,
        status: Some(total),
        partitions,
    })
}

/// Messages stored under the published pattern, i.e. without a partition token.
async fn unpartitioned_messages(
    stream: &mut stream::Stream,
    source_subject: &str,
) -> Result<u64, DataPlaneError> {
    let mut subjects = stream
        .info_with_subjects(source_subject)
        .await
        .map_err(|e| refused(format!("read the subjects of stream {source_subject}"), e))?;
    let mut count = 0u64;
    while let Some(entry) = subjects.next().await {
        let (_, messages) =
            entry.map_err(|e| refused(format!("read the subjects {source_subject}"), e))?;
        count += messages as u64;
    }
    Ok(count)
}

/// What a person must do when messages arrive without a partition token.
pub fn mapping_missing_message(scheme: &PartitionScheme, count: u64, transforms: bool) -> String {
    let fix = if transforms {
        "the stream's subject transform was missing when they arrived".to_string()
    } else {
        format!(
            "nats-server 2.9 partitions them only through its configuration: add `{}` to the \
             `mappings` of the account the publishers use and reload the server",
            scheme.server_mapping()
        )
    };
    format!(
        "{count} messages on `{}` reached stream {} without a partition token, so no partition \
         consumer sees them; {fix}. Messages already stored this way stay behind: republish them \
         after the fix, or purge them (`nats stream purge {} --subject '{}'`)",
        scheme.source_subject, scheme.stream, scheme.stream, scheme.source_subject
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(partitions: Option<u32>) -> SignalPipelineSpec {
        let mut spec = SignalPipelineSpec::default();
        spec.stream.name = "SIG".into();
        spec.stream.subjects = vec!["sig.*".into()];
        spec.workers.partitions = partitions;
        spec
    }

    #[test]
    fn a_partitioned_stream_captures_the_partitions_and_the_published_pattern() {
        assert_eq!(stream_spec(&spec(None), "p").subjects, ["sig.*"]);
        assert_eq!(
            stream_spec(&spec(Some(2)), "p").subjects,
            ["part.SIG.*.sig.*", "sig.*"]
        );
    }

    #[test]
    fn transforms_are_used_from_nats_2_10() {
        assert!(!supports_stream_transforms("2.9.10"));
        assert!(supports_stream_transforms("2.10.0"));
        assert!(supports_stream_transforms("2.11.4"));
        assert!(!supports_stream_transforms("garbage"));
        let scheme = PartitionScheme::of(&spec(Some(2)), "p").expect("partitioned");
        let transform = desired_transform(&scheme);
        assert_eq!(transform.source, "sig.*");
        assert_eq!(
            transform.destination,
            "part.SIG.{{partition(2,1)}}.sig.{{wildcard(1)}}"
        );
    }

    #[test]
    fn partition_consumers_are_recognised_by_name() {
        assert_eq!(partition_of("pipe", "pipe-p3"), Some(3));
        assert_eq!(partition_of("pipe", "pipe"), None);
        assert_eq!(partition_of("pipe", "pipe-px"), None);
        assert_eq!(partition_of("pipe", "other-p1"), None);
    }

    #[test]
    fn the_missing_mapping_message_quotes_the_mapping_to_add() {
        let scheme = PartitionScheme::of(&spec(Some(2)), "p").expect("partitioned");
        let message = mapping_missing_message(&scheme, 7, false);
        assert!(message.contains("7 messages on `sig.*`"), "{message}");
        assert!(
            message.contains("\"sig.*\": \"part.SIG.{{partition(2,1)}}.sig.{{wildcard(1)}}\""),
            "{message}"
        );
    }
}
