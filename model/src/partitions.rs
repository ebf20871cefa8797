//! Partitioned consumers (`spec.workers.partitions`): the subject scheme, the per-partition
//! consumers, the lease bucket that gives each partition one owner, and the timing rules that make
//! a hand-over safe.
//!
//! The stream's one subject pattern (e.g. `signals.*.*`) is mapped by the server to
//! `part.<STREAM>.<p>.<subject>`, where `<p>` = `{{partition(N, wildcards...)}}` hashes every `*`
//! token of the subject. On nats-server 2.10+ the stream does it itself (a subject transform); on
//! 2.9 an account/server `mappings` entry does it before the stream sees the message. Partition
//! `p` is consumed by the durable `<durable>-p<p>` filtered on `part.<STREAM>.<p>.<subject>`, acknowledged
//! with AckAll by the one worker that holds the partition's lease.

use std::time::Duration;

use crate::SignalPipelineSpec;
use crate::validate::FieldError;

/// Most partitions a pipeline may have: each is a durable consumer and a lease.
pub const MAX_PARTITIONS: u32 = 64;
/// First token of every partitioned subject.
pub const PARTITION_PREFIX: &str = "part";
/// How often a worker renews its leases and its membership.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// A lease holder sends no acknowledgement (nor in-progress ack) this long before its lease could
/// expire on the server: time for the last one in flight to arrive.
pub const ACK_MARGIN: Duration = Duration::from_secs(2);
/// A pull request may outlive its expiry by this much (client slack and transit).
const PULL_SLACK: Duration = Duration::from_secs(1);

/// When a lease holder must stop pulling and acknowledging, relative to the moment it sent the
/// write that (re)started its lease; the server expires the lease `ttl` after storing that write,
/// which is never earlier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// The lease bucket's `max_age`: a lease not renewed for this long is free.
    pub ttl: Duration,
    /// No pull request is issued later than `ttl - pull_margin` (its deliveries end before the
    /// acknowledgement fence).
    pub pull_margin: Duration,
    /// No acknowledgement is sent later than `ttl - ack_margin`.
    pub ack_margin: Duration,
}

impl LeaseTiming {
    /// The timing for workers whose batches wait at most `max_wait` (the longest pull request).
    pub fn for_max_wait(max_wait: Duration) -> LeaseTiming {
        let pull_margin = ACK_MARGIN + max_wait + PULL_SLACK;
        LeaseTiming {
            // Three renewals may fail before the holder has to stop pulling.
            ttl: pull_margin + 3 * RENEW_EVERY,
            pull_margin,
            ack_margin: ACK_MARGIN,
        }
    }
}

/// The partitioned layout of one pipeline, derived from its spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionScheme {
    /// Number of partitions.
    pub count: u32,
    /// The stream.
    pub stream: String,
    /// The subject pattern publishers use (the stream's one subject).
    pub source_subject: String,
    /// The pipeline's durable name; partition consumers are named after it.
    pub durable: String,
}

impl PartitionScheme {
    /// The scheme of a spec with `workers.partitions` set (`None` otherwise).
    pub fn of(spec: &SignalPipelineSpec, pipeline_name: &str) -> Option<PartitionScheme> {
        let count = spec.workers.partitions?;
        Some(PartitionScheme {
            count,
            stream: spec.stream.name.clone(),
            source_subject: spec.stream.subjects.first().cloned().unwrap_or_default(),
            durable: spec.durable_name(pipeline_name).to_string(),
        })
    }

    /// `part.<STREAM>`: the tokens in front of the partition number.
    fn prefix(&self) -> String {
        format!("{PARTITION_PREFIX}.{}", self.stream)
    }

    /// Tokens of the prefix plus the partition token, stripped to recover the published subject.
    pub const PREFIX_TOKENS: usize = 3;

    /// The subjects the stream stores: `part.<STREAM>.*.<source subject>`.
    pub fn partitioned_subjects(&self) -> String {
        format!("{}.*.{}", self.prefix(), self.source_subject)
    }

    /// The mapping destination: `part.<STREAM>.{{partition(N,1,..)}}.<source with wildcard(i)>`.
    pub fn mapping_destination(&self) -> String {
        let mut wildcard = 0;
        let rest: Vec<String> = self
            .source_subject
            .split('.')
            .map(|token| {
                if token == "*" {
                    wildcard += 1;
                    format!("{{{{wildcard({wildcard})}}}}")
                } else {
                    token.to_string()
                }
            })
            .collect();
        let indices: Vec<String> = (1..=wildcard).map(|i| i.to_string()).collect();
        format!(
            "{}.{{{{partition({},{})}}}}.{}",
            self.prefix(),
            self.count,
            indices.join(","),
            rest.join(".")
        )
    }

    /// The line a nats-server 2.9 configuration needs, inside `mappings { }` (of the account
    /// the publishers use).
    pub fn server_mapping(&self) -> String {
        format!(
            "\"{}\": \"{}\"",
            self.source_subject,
            self.mapping_destination()
        )
    }

    /// The durable consumer of partition `index`.
    pub fn consumer_name(&self, index: u32) -> String {
        format!("{}-p{index}", self.durable)
    }

    /// The filter subject of partition `index`'s consumer: `part.<STREAM>.<index>.<source
    /// subject>` (nats-server 2.9 accepts a filter only if it lies within the stream's subjects,
    /// so not `part.<STREAM>.<index>.>`).
    pub fn filter_subject(&self, index: u32) -> String {
        format!("{}.{index}.{}", self.prefix(), self.source_subject)
    }

    /// The KV bucket holding the partitions' leases and the live workers.
    pub fn lease_bucket(&self) -> String {
        format!("partitions-{}-{}", self.stream, self.durable)
    }

    /// The published subject of a stored (partitioned) subject, for `@subject`.
    pub fn published_subject(stored: &str) -> &str {
        let mut rest = stored;
        for _ in 0..Self::PREFIX_TOKENS {
            match rest.split_once('.') {
                Some((_, tail)) => rest = tail,
                None => return stored,
            }
        }
        rest
    }
}

/// The lease key of partition `index`.
pub fn lease_key(index: u32) -> String {
    format!("lease.p{index}")
}

/// The membership key of a worker instance.
pub fn member_key(instance: &str) -> String {
    format!("member.{instance}")
}

/// Key prefix of the membership keys.
pub const MEMBER_PREFIX: &str = "member.";

/// How many partitions one of `live` workers may hold: `ceil(partitions / live)`, so that every
/// partition can be held and none is hoarded.
pub fn fair_share(partitions: u32, live: usize) -> u32 {
    let live = u32::try_from(live.max(1)).unwrap_or(u32::MAX);
    partitions.div_ceil(live)
}

/// Whether `live` workers are enough that no newcomer can lower a worker's fair share any further
/// (one partition each, the least a share can be): a worker that sees them claims at once.
pub fn share_is_final(partitions: u32, live: usize) -> bool {
    fair_share(partitions, live) <= 1
}

/// The order in which a worker tries free partitions: starting at a point derived from its
/// instance name, so that workers starting together do not all race for partition 0.
pub fn claim_order(instance: &str, partitions: u32) -> Vec<u32> {
    if partitions == 0 {
        return Vec::new();
    }
    // FNV-1a: stable across processes and builds (std's hasher is randomly seeded).
    let hash = instance.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let start = (hash % u64::from(partitions)) as u32;
    (0..partitions).map(|i| (start + i) % partitions).collect()
}

/// Problems with `spec.workers.partitions` and the settings it constrains.
pub fn problems(spec: &SignalPipelineSpec) -> Vec<FieldError> {
    let mut found = Vec::new();
    let Some(count) = spec.workers.partitions else {
        return found;
    };
    let mut push = |field: &str, message: String| {
        found.push(FieldError {
            field: field.to_string(),
            message,
        })
    };
    if !(1..=MAX_PARTITIONS).contains(&count) {
        push(
            "spec.workers.partitions",
            format!("{count} must be between 1 and {MAX_PARTITIONS}"),
        );
    }
    match spec.stream.subjects.as_slice() {
        [subject] => {
            let tokens: Vec<&str> = subject.split('.').collect();
            if tokens.contains(&">") || !tokens.contains(&"*") {
                push(
                    "spec.stream.subjects[0]",
                    format!(
                        "`{subject}` must use `*` wildcards only, at least one, with \
                         spec.workers.partitions set: the partition is a hash of the `*` tokens \
                         (a `>` cannot be mapped)"
                    ),
                );
            }
            if tokens.first() == Some(&PARTITION_PREFIX) {
                push(
                    "spec.stream.subjects[0]",
                    format!(
                        "`{subject}` must not start with `{PARTITION_PREFIX}.`, the partitioned subjects' prefix"
                    ),
                );
            }
        }
        _ => push(
            "spec.stream.subjects",
            "exactly one subject pattern is required with spec.workers.partitions set (one \
             partition mapping per stream)"
                .into(),
        ),
    }
    if spec.consumer.filter_subject.is_some() {
        push(
            "spec.consumer.filterSubject",
            "cannot be combined with spec.workers.partitions: each partition's consumer filters on its partition".into(),
        );
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(partitions: Option<u32>, subjects: &[&str]) -> SignalPipelineSpec {
        let mut spec = SignalPipelineSpec::default();
        spec.stream.name = "SIGNALS".into();
        spec.stream.subjects = subjects.iter().map(|s| s.to_string()).collect();
        spec.workers.partitions = partitions;
        spec
    }

    fn scheme(count: u32, subject: &str) -> PartitionScheme {
        PartitionScheme::of(&spec(Some(count), &[subject]), "pipe").expect("partitioned")
    }

    #[test]
    fn the_mapping_hashes_every_wildcard_and_keeps_the_published_subject() {
        let scheme = scheme(3, "sig.*.x.*");
        assert_eq!(
            scheme.mapping_destination(),
            "part.SIGNALS.{{partition(3,1,2)}}.sig.{{wildcard(1)}}.x.{{wildcard(2)}}"
        );
        assert_eq!(
            scheme.server_mapping(),
            "\"sig.*.x.*\": \"part.SIGNALS.{{partition(3,1,2)}}.sig.{{wildcard(1)}}.x.{{wildcard(2)}}\""
        );
        assert_eq!(scheme.partitioned_subjects(), "part.SIGNALS.*.sig.*.x.*");
    }

    #[test]
    fn each_partition_has_its_own_durable_and_filter() {
        let scheme = scheme(2, "sig.*");
        assert_eq!(scheme.consumer_name(0), "pipe-p0");
        assert_eq!(scheme.consumer_name(1), "pipe-p1");
        assert_eq!(scheme.filter_subject(1), "part.SIGNALS.1.sig.*");
        assert_eq!(scheme.lease_bucket(), "partitions-SIGNALS-pipe");
        assert_eq!(lease_key(1), "lease.p1");
        assert_eq!(member_key("w-1"), "member.w-1");
    }

    #[test]
    fn the_published_subject_is_recovered_from_the_stored_one() {
        assert_eq!(
            PartitionScheme::published_subject("part.SIGNALS.2.sig.a.b"),
            "sig.a.b"
        );
        assert_eq!(PartitionScheme::published_subject("sig.a"), "sig.a");
    }

    #[test]
    fn the_fair_share_spreads_partitions_over_live_workers() {
        assert_eq!(fair_share(2, 2), 1);
        assert_eq!(fair_share(3, 2), 2);
        assert_eq!(fair_share(2, 3), 1);
        assert_eq!(fair_share(4, 0), 4);
        assert_eq!(fair_share(4, 1), 4);
        // A share is final at one partition each: more workers cannot lower it.
        assert!(share_is_final(2, 2));
        assert!(share_is_final(2, 3));
        assert!(share_is_final(1, 1));
        assert!(!share_is_final(2, 1));
        assert!(!share_is_final(4, 3));
    }

    #[test]
    fn claim_orders_visit_every_partition_once_from_a_stable_start() {
        let order = claim_order("worker-a", 5);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2, 3, 4]);
        assert_eq!(order, claim_order("worker-a", 5));
        assert!(claim_order("x", 0).is_empty());
    }

    #[test]
    fn the_lease_outlives_the_last_pull_and_the_last_ack() {
        let timing = LeaseTiming::for_max_wait(Duration::from_secs(1));
        assert!(timing.pull_margin >= timing.ack_margin + Duration::from_secs(1));
        assert!(timing.ttl >= timing.pull_margin + 3 * RENEW_EVERY);
        let longer = LeaseTiming::for_max_wait(Duration::from_secs(10));
        assert!(longer.ttl > timing.ttl);
    }

    fn fields(spec: &SignalPipelineSpec) -> Vec<String> {
        problems(spec).into_iter().map(|p| p.field).collect()
    }

    #[test]
    fn partitions_are_checked_with_the_settings_they_constrain() {
        assert!(fields(&spec(None, &["a.>", "b.>"])).is_empty());
        assert!(fields(&spec(Some(3), &["sig.*.*"])).is_empty());
        assert_eq!(
            fields(&spec(Some(0), &["sig.*"])),
            ["spec.workers.partitions"]
        );
        assert_eq!(
            fields(&spec(Some(65), &["sig.*"])),
            ["spec.workers.partitions"]
        );
        assert_eq!(
            fields(&spec(Some(2), &["sig.>"])),
            ["spec.stream.subjects[0]"]
        );
        assert_eq!(
            fields(&spec(Some(2), &["sig.a"])),
            ["spec.stream.subjects[0]"]
        );
        assert_eq!(
            fields(&spec(Some(2), &["part.*"])),
            ["spec.stream.subjects[0]"]
        );
        assert_eq!(
            fields(&spec(Some(2), &["a.*", "b.*"])),
            ["spec.stream.subjects"]
        );
        let mut filtered = spec(Some(2), &["sig.*"]);
        filtered.consumer.filter_subject = Some("sig.a".into());
        assert_eq!(fields(&filtered), ["spec.consumer.filterSubject"]);
        let message = problems(&spec(Some(0), &["sig.*"])).remove(0).message;
        assert!(message.contains("between 1 and 64"), "{message}");
    }
}
