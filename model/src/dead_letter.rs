//! The effective dead-letter destination of a pipeline: `spec.deadLetter` with its defaults resolved.
//!
//! One place decides the defaults, so the operator (which creates the dead-letter stream and
//! writes the resolved manifest into the worker's ConfigMap), local mode and the worker (which
//! publishes to the subject) cannot disagree. Without `spec.deadLetter`, dead letters go to
//! `dlq.<stream.name>.<durable>` and are kept by the stream `<stream.name>_DLQ` capturing
//! `dlq.<stream.name>.>`: outside the source stream (validation refuses a source stream that
//! captures them), and shared by the pipelines reading one stream, which therefore ask for the
//! same dead-letter stream. An explicit subject under `dlq.<stream.name>.` keeps that sharing; any
//! other explicit subject is what the stream captures, unless `deadLetter.stream.subjects` says.

use std::time::Duration;

use crate::quantity::HumanDuration;
use crate::spec::{DeadLetterSpec, SignalPipelineSpec, StreamSpec};
use crate::validate::subject_matches;

/// First token of the default dead-letter subjects.
pub const DEFAULT_DEAD_LETTER_PREFIX: &str = "dlq";
/// Suffix of the default dead-letter stream name.
pub const DEFAULT_DEAD_LETTER_STREAM_SUFFIX: &str = "_DLQ";
/// JetStream's own default duplicate window, the least the dead-letter stream gets by default.
pub const MIN_DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

impl SignalPipelineSpec {
    /// The subject the workers publish dead letters to: `deadLetter.subject`, or
    /// `dlq.<stream.name>.<durable>`.
    pub fn dead_letter_subject(&self, pipeline_name: &str) -> String {
        self.dead_letter
            .as_ref()
            .and_then(|d| d.subject.clone())
            .unwrap_or_else(|| {
                format!(
                    "{DEFAULT_DEAD_LETTER_PREFIX}.{}.{}",
                    self.stream.name,
                    self.durable_name(pipeline_name)
                )
            })
    }

    /// Whether the operator manages the dead-letter stream (`deadLetter.stream.managed`).
    pub fn dead_letter_stream_managed(&self) -> bool {
        self.dead_letter.as_ref().is_none_or(|d| d.stream.managed)
    }

    /// The dead-letter stream as a stream spec, every default resolved: what the operator
    /// creates (when managed) and what validation checks against the source stream.
    pub fn dead_letter_stream(&self) -> StreamSpec {
        let explicit = self.dead_letter.clone().unwrap_or_default();
        let settings = &explicit.stream;
        let name = settings
            .name
            .clone()
            .unwrap_or_else(|| format!("{}{DEFAULT_DEAD_LETTER_STREAM_SUFFIX}", self.stream.name));
        let shared = format!("{DEFAULT_DEAD_LETTER_PREFIX}.{}.>", self.stream.name);
        let subjects = match &explicit.subject {
            _ if !settings.subjects.is_empty() => settings.subjects.clone(),
            Some(subject) if !subject_matches(&shared, subject) => vec![subject.clone()],
            _ => vec![shared],
        };
        StreamSpec {
            name,
            subjects,
            storage: settings.storage,
            retention: settings.retention,
            discard: settings.discard,
            max_age: Some(settings.max_age),
            max_bytes: settings.max_bytes,
            max_msgs: settings.max_msgs,
            max_msg_size: None,
            replicas: settings.replicas.unwrap_or(self.stream.replicas).max(1),
            placement: self.stream.placement.clone(),
            duplicate_window: Some(
                settings
                    .duplicate_window
                    .unwrap_or_else(|| self.default_dead_letter_duplicate_window()),
            ),
        }
    }

    /// The larger of JetStream's default window and twice `ackWait` (a worker that crashed
    /// between publishing a dead letter and acknowledging the original sees the original again
    /// after `ackWait`), and no longer than `maxAge`, which the server requires.
    fn default_dead_letter_duplicate_window(&self) -> HumanDuration {
        let wanted = self
            .consumer
            .ack_wait
            .0
            .saturating_mul(2)
            .max(MIN_DEFAULT_DUPLICATE_WINDOW);
        let max_age = self
            .dead_letter
            .as_ref()
            .map_or_else(
                || DeadLetterSpec::default().stream.max_age,
                |d| d.stream.max_age,
            )
            .0;
        HumanDuration(if max_age.is_zero() {
            wanted
        } else {
            wanted.min(max_age)
        })
    }

    /// The same spec with `deadLetter` written out in full (subject, stream name, subjects and
    /// duplicate window resolved), for the manifest the workers read.
    pub fn with_dead_letter_resolved(&self, pipeline_name: &str) -> SignalPipelineSpec {
        let stream = self.dead_letter_stream();
        let mut dead_letter = self.dead_letter.clone().unwrap_or_default();
        dead_letter.subject = Some(self.dead_letter_subject(pipeline_name));
        dead_letter.stream.name = Some(stream.name);
        dead_letter.stream.subjects = stream.subjects;
        dead_letter.stream.duplicate_window = stream.duplicate_window;
        SignalPipelineSpec {
            dead_letter: Some(dead_letter),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DeadLetterStreamSpec, StorageKind};

    fn spec() -> SignalPipelineSpec {
        let mut spec = SignalPipelineSpec::default();
        spec.stream.name = "SIGNALS".into();
        spec.stream.subjects = vec!["signals.>".into()];
        spec
    }

    #[test]
    fn without_dead_letter_everything_is_derived_from_the_stream_and_durable() {
        let spec = spec();
        assert_eq!(spec.dead_letter_subject("tx"), "dlq.SIGNALS.tx");
        assert!(spec.dead_letter_stream_managed());
        let stream = spec.dead_letter_stream();
        assert_eq!(stream.name, "SIGNALS_DLQ");
        assert_eq!(stream.subjects, ["dlq.SIGNALS.>"]);
        assert_eq!(stream.max_age, Some(HumanDuration::from_secs(14 * 86_400)));
        assert_eq!(stream.duplicate_window, Some(HumanDuration::from_secs(120)));
        assert_eq!(stream.storage, StorageKind::File);
        assert_eq!(stream.replicas, 1);

        // A replicated source stream has a replicated dead-letter stream, on the same servers.
        let mut replicated = spec.clone();
        replicated.stream.replicas = 3;
        replicated.stream.placement = Some(crate::spec::StreamPlacement {
            cluster: Some("east".into()),
            tags: vec![],
        });
        let stream = replicated.dead_letter_stream();
        assert_eq!(stream.replicas, 3);
        assert_eq!(stream.placement, replicated.stream.placement);

        let mut durable = spec.clone();
        durable.consumer.durable_name = Some("writer".into());
        assert_eq!(durable.dead_letter_subject("tx"), "dlq.SIGNALS.writer");
    }

    #[test]
    fn an_explicit_subject_is_what_the_stream_captures_by_default() {
        let mut spec = spec();
        spec.dead_letter = Some(DeadLetterSpec {
            subject: Some("poison.tx".into()),
            stream: DeadLetterStreamSpec {
                name: Some("POISON".into()),
                ..DeadLetterStreamSpec::default()
            },
        });
        assert_eq!(spec.dead_letter_subject("tx"), "poison.tx");
        let stream = spec.dead_letter_stream();
        assert_eq!(
            (stream.name.as_str(), stream.subjects),
            ("POISON", vec!["poison.tx".to_string()])
        );

        // Under the shared prefix, the stream stays the one every pipeline on SIGNALS asks for.
        let mut shared = self::spec();
        shared.dead_letter = Some(DeadLetterSpec {
            subject: Some("dlq.SIGNALS.risk".into()),
            ..DeadLetterSpec::default()
        });
        assert_eq!(
            shared.dead_letter_stream(),
            self::spec().dead_letter_stream()
        );
    }

    #[test]
    fn the_duplicate_window_covers_a_redelivery_and_stays_within_max_age() {
        let mut spec = spec();
        spec.consumer.ack_wait = HumanDuration::from_secs(300);
        assert_eq!(
            spec.dead_letter_stream().duplicate_window,
            Some(HumanDuration::from_secs(600))
        );
        let mut short = DeadLetterSpec::default();
        short.stream.max_age = HumanDuration::from_secs(60);
        spec.dead_letter = Some(short);
        assert_eq!(
            spec.dead_letter_stream().duplicate_window,
            Some(HumanDuration::from_secs(60))
        );
        let mut explicit = DeadLetterSpec::default();
        explicit.stream.duplicate_window = Some(HumanDuration::from_secs(900));
        spec.dead_letter = Some(explicit);
        assert_eq!(
            spec.dead_letter_stream().duplicate_window,
            Some(HumanDuration::from_secs(900))
        );
    }

    #[test]
    fn the_resolved_spec_names_everything_and_resolves_to_itself() {
        let spec = spec();
        let resolved = spec.with_dead_letter_resolved("tx");
        let dead_letter = resolved.dead_letter.clone().expect("resolved");
        assert_eq!(dead_letter.subject.as_deref(), Some("dlq.SIGNALS.tx"));
        assert_eq!(dead_letter.stream.name.as_deref(), Some("SIGNALS_DLQ"));
        assert_eq!(dead_letter.stream.subjects, ["dlq.SIGNALS.>"]);
        assert_eq!(
            resolved.dead_letter_subject("tx"),
            spec.dead_letter_subject("tx")
        );
        assert_eq!(resolved.dead_letter_stream(), spec.dead_letter_stream());
        assert_eq!(resolved.with_dead_letter_resolved("tx"), resolved);
    }
}
