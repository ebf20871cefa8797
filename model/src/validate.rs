//! Checks of a spec that its JSON schema cannot express, each naming the field at fault.
//!
//! The worker runs them at start-up and the operator before it touches anything, so a bad spec is
//! reported once, clearly, instead of failing halfway through a reconcile or a batch.

use std::collections::HashSet;
use std::fmt;

use crate::cache_key::KeyTemplate;
use crate::quantity::HumanDuration;
use crate::row_encoder::RowEncoder;
use crate::spec::SignalPipelineSpec;
use crate::worker_health::HEALTH_SUBJECTS;

/// One problem with a spec: the field's path and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Every problem found in a spec.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ValidationError {
    /// One line: `spec.a.b: what is wrong; spec.c: …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect();
        f.write_str(&parts.join("; "))
    }
}

/// Names NATS allows for streams and durable consumers.
pub fn is_valid_nats_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Identifiers we accept for ClickHouse databases, tables and columns (no quoting surprises).
pub fn is_valid_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 128
}

/// A NATS subject: dot-separated non-empty tokens; `*` as a whole token, `>` as the last one.
pub fn subject_problem(subject: &str, wildcards_allowed: bool) -> Option<String> {
    if subject.is_empty() {
        return Some("empty subject".into());
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (index, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Some(format!("`{subject}` has an empty token"));
        }
        if token.chars().any(char::is_whitespace) {
            return Some(format!("`{subject}` contains white space"));
        }
        let wildcard = *token == "*" || *token == ">";
        if wildcard && !wildcards_allowed {
            return Some(format!("`{subject}` must not contain wildcards"));
        }
        if *token == ">" && index + 1 != tokens.len() {
            return Some(format!("`{subject}`: `>` must be the last token"));
        }
        if !wildcard && token.contains(['*', '>']) {
            return Some(format!("`{subject}`: wildcards must be whole tokens"));
        }
    }
    None
}

/// True when the subject pattern (with `*`/`>` wildcards) matches the literal subject.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut literal = subject.split('.');
    for token in pattern.split('.') {
        match (token, literal.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (expected, Some(actual)) if expected == actual => {}
            _ => return false,
        }
    }
    literal.next().is_none()
}

/// True when some literal subject matches both patterns (so two streams could not both capture
/// them: JetStream refuses streams with overlapping subjects).
pub fn subjects_overlap(a: &str, b: &str) -> bool {
    let (mut left, mut right) = (a.split('.'), b.split('.'));
    loop {
        match (left.next(), right.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == y || x == "*" || y == "*" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn check(&mut self, ok: bool, field: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.push(field, message());
        }
    }

    fn push(&mut self, field: &str, message: String) {
        self.errors.push(FieldError {
            field: field.to_string(),
            message,
        });
    }
}

fn url_with_scheme(url: &str, schemes: &[&str]) -> bool {
    schemes.iter().any(|scheme| {
        url.strip_prefix(scheme)
            .and_then(|rest| rest.strip_prefix("://"))
            .is_some_and(|host| !host.is_empty())
    })
}

/// The shortest ack wait: below it a progress ack's round trip, a scheduling pause or a
/// reconnect already outlasts the wait, and messages are redelivered to a healthy worker.
pub const MIN_ACK_WAIT_SECS: u64 = 1;
/// `batch.maxWait` may be at most this fraction of `consumer.ackWait` ("well below" it).
pub const MAX_WAIT_SHARE_OF_ACK_WAIT: u32 = 3;

/// Settings that make redelivery (and so duplicates) certain rather than exceptional: a batch
/// that waits longer than a fraction of the ack wait, or an ack wait too short to keep a message
/// alive across one round trip. The worker refuses them at start; the operator's CRD rule
/// (`maxWait * 3 <= ackWait`, `ackWait >= 1s`) refuses them at apply. Pure, for both.
pub fn redelivery_problems(spec: &SignalPipelineSpec) -> Vec<FieldError> {
    let ack_wait = spec.consumer.ack_wait.0;
    let max_wait = spec.workers.batch.max_wait.0;
    let mut problems = Vec::new();
    if !ack_wait.is_zero() && ack_wait < std::time::Duration::from_secs(MIN_ACK_WAIT_SECS) {
        problems.push(FieldError {
            field: "spec.consumer.ackWait".into(),
            message: format!(
                "{} is below {MIN_ACK_WAIT_SECS}s: messages would be redelivered while a worker still holds them",
                spec.consumer.ack_wait
            ),
        });
    }
    if !ack_wait.is_zero() && max_wait * MAX_WAIT_SHARE_OF_ACK_WAIT > ack_wait {
        problems.push(FieldError {
            field: "spec.workers.batch.maxWait".into(),
            message: format!(
                "{} must be at most a third of spec.consumer.ackWait ({}): a batch waiting that long leaves no time to store it before redelivery",
                spec.workers.batch.max_wait, spec.consumer.ack_wait
            ),
        });
    }
    problems
}

/// A setting that works but hurts, for people to see: the operator publishes each as a Warning
/// event with `reason` (and a log line) once per spec version, and the worker logs each at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecWarning {
    pub reason: &'static str,
    pub message: String,
}

/// Every [`SpecWarning`] for `spec`: certificates not verified ([`crate::tls::insecure_tls_warning`])
/// and an ack window smaller than the workers' batches ([`ack_window_warning`]).
pub fn spec_warnings(spec: &SignalPipelineSpec) -> Vec<SpecWarning> {
    [
        ("InsecureTls", crate::tls::insecure_tls_warning(spec)),
        ("AckWindowTooSmall", ack_window_warning(spec)),
    ]
    .into_iter()
    .filter_map(|(reason, message)| {
        Some(SpecWarning {
            reason,
            message: message?,
        })
    })
    .collect()
}

/// Batches a worker holds unacknowledged at full speed: the one it fills and the one it inserts.
pub const BATCHES_HELD_PER_WORKER: i64 = 2;

/// The warning for a `consumer.maxAckPending` below what the workers hold unacknowledged at full
/// speed ([`BATCHES_HELD_PER_WORKER`] batches of `workers.batch.maxRows` each, for every replica
/// the pipeline may run, or for the one owner of each partition's consumer); `None` when the
/// window is large enough or unlimited. Not an error: JetStream then holds deliveries back until
/// acknowledgements return, so the workers drain at about one batch per `maxWait` while a
/// backlog lasts, but nothing is lost. One of the [`spec_warnings`] (`AckWindowTooSmall`).
pub fn ack_window_warning(spec: &SignalPipelineSpec) -> Option<String> {
    let window = spec.consumer.max_ack_pending;
    if window < 0 {
        return None;
    }
    let max_rows = i64::from(spec.workers.batch.max_rows);
    let (holders, who) = match spec.workers.partitions {
        Some(_) => (1, "the one worker of each partition's consumer".to_string()),
        None => {
            let replicas = match &spec.workers.autoscale {
                Some(autoscale) => autoscale.max_replicas,
                None => spec.workers.replicas,
            }
            .max(1);
            (i64::from(replicas), format!("{replicas} worker(s)"))
        }
    };
    let needed = BATCHES_HELD_PER_WORKER * holders * max_rows;
    (window < needed).then(|| {
        format!(
            "spec.consumer.maxAckPending ({window}) is below {needed}: {who} × \
             {BATCHES_HELD_PER_WORKER} batches (the one filling, the one inserting) × \
             spec.workers.batch.maxRows ({max_rows}); JetStream will hold deliveries back until \
             acknowledgements return, and a backlog drains at about one batch per maxWait. Raise \
             maxAckPending to at least {needed} or lower maxRows"
        )
    })
}

impl SignalPipelineSpec {
    /// The `tls` blocks and their URL schemes (see [`crate::tls`] for the rules).
    fn check_tls(&self, c: &mut Checker) {
        use crate::tls::{TlsServer, scheme_problem, tls_block_problems};
        for server in TlsServer::ALL {
            let block = server.spec(self);
            if let Some(block) = block {
                for (field, message) in tls_block_problems(server, block) {
                    c.push(&field, message);
                }
            }
            let urls: Vec<&str> = match server {
                TlsServer::Nats => self.nats.url.split(',').collect(),
                TlsServer::ClickHouse => vec![self.clickhouse.url.as_str()],
                TlsServer::Redis => match &self.cache {
                    Some(cache) => vec![cache.redis.url.as_str()],
                    None => Vec::new(),
                },
            };
            for url in urls {
                if let Some((field, message)) = scheme_problem(server, url, block.is_some()) {
                    c.push(&field, message);
                }
            }
        }
    }

    /// Checks the whole spec of the pipeline called `pipeline_name`.
    pub fn validate(&self, pipeline_name: &str) -> Result<(), ValidationError> {
        let mut c = Checker { errors: Vec::new() };

        for (index, url) in self.nats.url.split(',').enumerate() {
            c.check(
                url_with_scheme(url.trim(), &["nats", "tls", "ws", "wss"]),
                "spec.nats.url",
                || format!("URL {} `{url}` must look like nats://host:4222", index + 1),
            );
        }

        let stream = &self.stream;
        c.check(is_valid_nats_name(&stream.name), "spec.stream.name", || {
            format!("`{}` must be letters, digits, `-` and `_`", stream.name)
        });
        c.check(!stream.subjects.is_empty(), "spec.stream.subjects", || {
            "at least one subject is required".into()
        });
        for (index, subject) in stream.subjects.iter().enumerate() {
            if let Some(problem) = subject_problem(subject, true) {
                c.push(&format!("spec.stream.subjects[{index}]"), problem);
            } else if subjects_overlap(subject, HEALTH_SUBJECTS) {
                c.push(
                    &format!("spec.stream.subjects[{index}]"),
                    format!("`{subject}` overlaps `{HEALTH_SUBJECTS}`, the subjects of the workers' health reports"),
                );
            }
        }
        c.check(
            (1..=5).contains(&stream.replicas),
            "spec.stream.replicas",
            || format!("{} is outside 1..=5", stream.replicas),
        );
        if let Some(placement) = &stream.placement {
            if let Some(cluster) = &placement.cluster {
                c.check(
                    is_valid_nats_name(cluster),
                    "spec.stream.placement.cluster",
                    || format!("`{cluster}` must be letters, digits, `-` and `_`"),
                );
            }
            for (index, tag) in placement.tags.iter().enumerate() {
                c.check(
                    !tag.trim().is_empty(),
                    &format!("spec.stream.placement.tags[{index}]"),
                    || "a tag must not be empty".into(),
                );
            }
        }
        if let Some(max) = stream.max_msgs {
            c.check(max >= -1, "spec.stream.maxMsgs", || {
                format!("{max} must be -1 (unlimited) or more")
            });
        }

        let consumer = &self.consumer;
        let durable = self.durable_name(pipeline_name);
        c.check(
            is_valid_nats_name(durable),
            "spec.consumer.durableName",
            || format!("`{durable}` must be letters, digits, `-` and `_`"),
        );
        if let Some(filter) = &consumer.filter_subject
            && let Some(problem) = subject_problem(filter, true)
        {
            c.push("spec.consumer.filterSubject", problem);
        }
        c.check(
            !consumer.ack_wait.0.is_zero(),
            "spec.consumer.ackWait",
            || "must be more than 0".into(),
        );
        c.check(
            consumer.max_deliver == -1 || consumer.max_deliver >= 1,
            "spec.consumer.maxDeliver",
            || {
                format!(
                    "{} must be -1 (unlimited) or at least 1",
                    consumer.max_deliver
                )
            },
        );
        c.check(
            consumer.max_ack_pending == -1 || consumer.max_ack_pending >= 1,
            "spec.consumer.maxAckPending",
            || {
                format!(
                    "{} must be -1 (unlimited) or at least 1",
                    consumer.max_ack_pending
                )
            },
        );

        let ch = &self.clickhouse;
        c.check(
            url_with_scheme(&ch.url, &["http", "https"]),
            "spec.clickhouse.url",
            || {
                format!(
                    "`{}` must be an HTTP URL such as http://clickhouse:8123",
                    ch.url
                )
            },
        );
        c.check(
            is_valid_identifier(&ch.database),
            "spec.clickhouse.database",
            || {
                format!(
                    "`{}` must be letters, digits and `_`, not starting with a digit",
                    ch.database
                )
            },
        );
        c.check(
            is_valid_identifier(&ch.table),
            "spec.clickhouse.table",
            || {
                format!(
                    "`{}` must be letters, digits and `_`, not starting with a digit",
                    ch.table
                )
            },
        );
        c.check(
            ch.engine
                .trim_start()
                .split('(')
                .next()
                .is_some_and(|e| e.trim().ends_with("MergeTree")),
            "spec.clickhouse.engine",
            || format!("`{}` is not a MergeTree-family engine", ch.engine),
        );
        if let Some(cluster) = &ch.cluster {
            c.check(
                !cluster.name.is_empty()
                    && cluster
                        .name
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '.')),
                "spec.clickhouse.cluster.name",
                || {
                    format!(
                        "`{}` must be a cluster name of the servers' remote_servers: letters, \
                         digits, `_`, `-`, `.`",
                        cluster.name
                    )
                },
            );
            for (index, url) in cluster.replica_urls.iter().enumerate() {
                c.check(
                    url_with_scheme(url, &["http", "https"]),
                    &format!("spec.clickhouse.cluster.replicaUrls[{index}]"),
                    || format!("`{url}` must be an HTTP URL such as http://clickhouse-1:8123"),
                );
            }
            c.check(
                cluster.replica_urls.is_empty() || crate::ddl::is_replicated_engine(&ch.engine),
                "spec.clickhouse.cluster.replicaUrls",
                || {
                    format!(
                        "failing over to another replica needs a Replicated engine (`{}` keeps \
                         each server's rows apart, so a retry there could store a batch twice): \
                         use Replicated{}",
                        ch.engine,
                        ch.engine.trim()
                    )
                },
            );
            if let Some(distributed) = &cluster.distributed {
                c.check(
                    is_valid_identifier(&distributed.table) && distributed.table != ch.table,
                    "spec.clickhouse.cluster.distributed.table",
                    || {
                        format!(
                            "`{}` must be letters, digits and `_`, not starting with a digit, \
                             and differ from spec.clickhouse.table",
                            distributed.table
                        )
                    },
                );
            }
            c.check(
                cluster.write_to != crate::spec::WriteTarget::Distributed
                    || cluster.distributed.is_some(),
                "spec.clickhouse.cluster.writeTo",
                || "`distributed` needs spec.clickhouse.cluster.distributed.table".to_string(),
            );
        }
        c.check(!ch.columns.is_empty(), "spec.clickhouse.columns", || {
            "at least one column is required".into()
        });
        let mut seen = HashSet::new();
        for (index, column) in ch.columns.iter().enumerate() {
            c.check(
                is_valid_identifier(&column.name),
                &format!("spec.clickhouse.columns[{index}].name"),
                || {
                    format!(
                        "`{}` must be letters, digits and `_`, not starting with a digit",
                        column.name
                    )
                },
            );
            c.check(
                seen.insert(column.name.as_str()),
                &format!("spec.clickhouse.columns[{index}].name"),
                || format!("`{}` appears twice", column.name),
            );
        }
        if let Err(errors) = RowEncoder::new(&ch.columns, self.workers.max_message_bytes.0 as usize)
        {
            for error in errors {
                c.push(
                    &format!("spec.clickhouse.columns{}", error.field),
                    error.message,
                );
            }
        }

        let workers = &self.workers;
        c.check(workers.replicas >= 0, "spec.workers.replicas", || {
            format!("{} must not be negative", workers.replicas)
        });
        c.check(
            workers.batch.max_rows >= 1,
            "spec.workers.batch.maxRows",
            || "must be at least 1".into(),
        );
        c.check(
            workers.batch.max_bytes.0 >= 1024,
            "spec.workers.batch.maxBytes",
            || format!("{} is below the 1Ki minimum", workers.batch.max_bytes),
        );
        c.check(
            !workers.batch.max_wait.0.is_zero(),
            "spec.workers.batch.maxWait",
            || "must be more than 0".into(),
        );
        c.check(
            workers.max_message_bytes.0 >= 1,
            "spec.workers.maxMessageBytes",
            || "must be at least 1".into(),
        );
        if let Some(auto) = &workers.autoscale {
            c.check(
                auto.min_replicas >= 0,
                "spec.workers.autoscale.minReplicas",
                || "must not be negative".into(),
            );
            c.check(
                auto.max_replicas >= auto.min_replicas.max(1),
                "spec.workers.autoscale.maxReplicas",
                || {
                    format!(
                        "{} must be at least minReplicas ({}) and 1",
                        auto.max_replicas, auto.min_replicas
                    )
                },
            );
            c.check(
                auto.target_lag_per_replica >= 1,
                "spec.workers.autoscale.targetLagPerReplica",
                || "must be at least 1".into(),
            );
        }

        c.errors.extend(crate::partitions::problems(self));
        self.check_dead_letter(pipeline_name, &mut c);
        self.check_tls(&mut c);

        c.errors.extend(redelivery_problems(self));

        if let Some(cache) = &self.cache {
            c.check(
                url_with_scheme(&cache.redis.url, &["redis", "rediss"]),
                "spec.cache.redis.url",
                || format!("`{}` must look like redis://host:6379", cache.redis.url),
            );
            let known: HashSet<&str> = ch.columns.iter().map(|col| col.name.as_str()).collect();
            match KeyTemplate::parse(&cache.key) {
                Ok(template) => {
                    for name in template.columns() {
                        c.check(known.contains(name), "spec.cache.key", || {
                            format!("`{{{name}}}` is not a column")
                        });
                    }
                }
                Err(message) => c.push("spec.cache.key", message),
            }
            c.check(!cache.fields.is_empty(), "spec.cache.fields", || {
                "at least one field is required".into()
            });
            for (index, field) in cache.fields.iter().enumerate() {
                c.check(
                    known.contains(field.as_str()),
                    &format!("spec.cache.fields[{index}]"),
                    || format!("`{field}` is not a column"),
                );
            }
            c.check(cache.ttl.0.as_secs() >= 1, "spec.cache.ttl", || {
                "must be at least 1s".into()
            });
        }

        if c.errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationError { errors: c.errors })
        }
    }
}

impl SignalPipelineSpec {
    /// The dead-letter subject and stream, defaults resolved: valid, outside the source stream
    /// and the health reports, captured by the dead-letter stream, deduplicating long enough.
    fn check_dead_letter(&self, pipeline_name: &str, c: &mut Checker) {
        if !is_valid_nats_name(&self.stream.name)
            || !is_valid_nats_name(self.durable_name(pipeline_name))
        {
            // The defaults derive from these names, whose own errors are already reported.
            return;
        }
        let subject = self.dead_letter_subject(pipeline_name);
        let explicit = self
            .dead_letter
            .as_ref()
            .and_then(|d| d.subject.as_ref())
            .is_some();
        let what = if explicit {
            format!("`{subject}`")
        } else {
            format!("the default dead-letter subject `{subject}`")
        };
        let subject_field = "spec.deadLetter.subject";
        let subject_ok = match subject_problem(&subject, false) {
            Some(problem) => {
                c.push(subject_field, problem);
                false
            }
            None => true,
        };
        if subject_ok {
            for (index, source) in self.stream.subjects.iter().enumerate() {
                c.check(!subject_matches(source, &subject), subject_field, || {
                    format!(
                        "{what} is captured by the source stream (spec.stream.subjects[{index}] \
                         `{source}`), so dead letters would be stored with the signals; set \
                         spec.deadLetter.subject to a subject outside it"
                    )
                });
            }
            c.check(
                !subject_matches(HEALTH_SUBJECTS, &subject),
                subject_field,
                || format!("{what} is among the health report subjects `{HEALTH_SUBJECTS}`"),
            );
        }

        let stream = self.dead_letter_stream();
        c.check(
            is_valid_nats_name(&stream.name),
            "spec.deadLetter.stream.name",
            || format!("`{}` must be letters, digits, `-` and `_`", stream.name),
        );
        c.check(
            stream.name != self.stream.name,
            "spec.deadLetter.stream.name",
            || {
                format!(
                    "`{}` is the source stream; dead letters need a stream of their own",
                    stream.name
                )
            },
        );
        if !self.dead_letter_stream_managed() {
            // Someone else's stream: whether it captures the subject is checked live.
            return;
        }
        let explicit_subjects = self
            .dead_letter
            .as_ref()
            .is_some_and(|d| !d.stream.subjects.is_empty());
        let subjects_field = |index: usize| {
            if explicit_subjects {
                format!("spec.deadLetter.stream.subjects[{index}]")
            } else {
                "spec.deadLetter.stream.subjects".to_string()
            }
        };
        for (index, dead_letter_subject) in stream.subjects.iter().enumerate() {
            if let Some(problem) = subject_problem(dead_letter_subject, true) {
                c.push(&subjects_field(index), problem);
                continue;
            }
            for (source_index, source) in self.stream.subjects.iter().enumerate() {
                c.check(
                    !subjects_overlap(dead_letter_subject, source),
                    &subjects_field(index),
                    || {
                        format!(
                            "`{dead_letter_subject}` overlaps spec.stream.subjects[{source_index}] \
                             `{source}`; JetStream refuses streams with overlapping subjects"
                        )
                    },
                );
            }
            c.check(
                !subjects_overlap(dead_letter_subject, HEALTH_SUBJECTS),
                &subjects_field(index),
                || {
                    format!(
                        "`{dead_letter_subject}` overlaps `{HEALTH_SUBJECTS}`, the subjects of the \
                         workers' health reports"
                    )
                },
            );
        }
        if subject_ok {
            c.check(
                stream.subjects.iter().any(|s| subject_matches(s, &subject)),
                "spec.deadLetter.stream.subjects",
                || {
                    format!(
                        "[{}] does not capture the dead-letter subject `{subject}`",
                        stream.subjects.join(", ")
                    )
                },
            );
        }
        // Without its own value it follows spec.stream.replicas, checked above.
        if let Some(replicas) = self.dead_letter.as_ref().and_then(|d| d.stream.replicas) {
            c.check(
                (1..=5).contains(&replicas),
                "spec.deadLetter.stream.replicas",
                || format!("{replicas} is outside 1..=5"),
            );
        }
        if let Some(max) = stream.max_msgs {
            c.check(max >= -1, "spec.deadLetter.stream.maxMsgs", || {
                format!("{max} must be -1 (unlimited) or more")
            });
        }
        let max_age = stream.max_age.unwrap_or_default().0;
        if let Some(window) = stream.duplicate_window {
            let ack_wait = self.consumer.ack_wait;
            c.check(
                window.0 >= ack_wait.0,
                "spec.deadLetter.stream.duplicateWindow",
                || {
                    format!(
                        "{window} is shorter than spec.consumer.ackWait ({ack_wait}): a dead letter \
                         republished after a worker crash would be stored twice"
                    )
                },
            );
            c.check(
                max_age.is_zero() || window.0 <= max_age,
                "spec.deadLetter.stream.duplicateWindow",
                || {
                    format!(
                        "{window} is longer than spec.deadLetter.stream.maxAge ({}), which JetStream refuses",
                        HumanDuration(max_age)
                    )
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
nats: {url: "nats://127.0.0.1:4222"}
stream: {name: SIGNALS, subjects: ["signals.>"]}
consumer: {filterSubject: signals.transaction}
clickhouse:
  url: http://127.0.0.1:8123
  database: risksignal
  table: transaction_signals
  columns:
    - {name: event_time, type: "DateTime64(3)", from: "$.event_time"}
    - {name: wallet_address, type: String, from: "$.wallet_address"}
deadLetter: {subject: dlq.signals.transactions}
cache: {redis: {url: "redis://127.0.0.1:6379"}, key: "wallet:{wallet_address}:latest", fields: [event_time], ttl: 5m}
"#;

    fn spec(yaml: &str) -> SignalPipelineSpec {
        yaml_serde::from_str(yaml).unwrap()
    }

    #[test]
    fn an_ack_window_smaller_than_every_workers_two_batches_is_warned_about() {
        let mut spec = spec(EXAMPLE);
        assert_eq!(
            ack_window_warning(&spec),
            None,
            "the defaults: one worker, 2 × 10,000 rows in a window of 20,000"
        );
        spec.workers.replicas = 2;
        let warning = ack_window_warning(&spec).expect("two workers need 40,000");
        assert!(
            warning.contains("maxAckPending (20000) is below 40000")
                && warning.contains("2 worker(s)"),
            "{warning}"
        );
        assert_eq!(
            spec_warnings(&spec),
            [SpecWarning {
                reason: "AckWindowTooSmall",
                message: warning
            }]
        );
        spec.consumer.max_ack_pending = 40_000;
        assert_eq!(ack_window_warning(&spec), None);
        assert_eq!(spec_warnings(&spec), []);
        spec.workers.autoscale = Some(crate::spec::AutoscaleSpec {
            min_replicas: 1,
            max_replicas: 4,
            target_lag_per_replica: 1000,
            scale_down_stabilization: Default::default(),
        });
        assert!(
            ack_window_warning(&spec).is_some_and(|w| w.contains("below 80000")),
            "autoscaled: the most replicas count"
        );
        spec.workers.partitions = Some(4);
        assert_eq!(
            ack_window_warning(&spec),
            None,
            "partitioned: each partition's consumer has one owner"
        );
        spec.workers.partitions = None;
        spec.consumer.max_ack_pending = -1;
        assert_eq!(ack_window_warning(&spec), None, "unlimited");
    }

    #[test]
    fn the_example_is_valid() {
        spec(EXAMPLE).validate("transactions").unwrap();
    }

    #[test]
    fn a_placement_needs_a_valid_cluster_name_and_tags() {
        let mut placed = spec(EXAMPLE);
        placed.stream.placement = Some(crate::spec::StreamPlacement {
            cluster: Some("east".into()),
            tags: vec!["ssd".into()],
        });
        placed.validate("transactions").unwrap();
        placed.stream.placement = Some(crate::spec::StreamPlacement {
            cluster: Some("east coast".into()),
            tags: vec![" ".into()],
        });
        let err = placed.validate("transactions").unwrap_err();
        let fields: Vec<_> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.stream.placement.cluster",
                "spec.stream.placement.tags[0]"
            ]
        );
    }

    #[test]
    fn tls_blocks_and_url_schemes_are_checked_naming_the_field() {
        let secured = EXAMPLE
            .replace(
                r#"nats: {url: "nats://127.0.0.1:4222"}"#,
                r#"nats: {url: "tls://127.0.0.1:4222", tls: {ca: {configMapKeyRef: {name: ca, key: ca.crt}}, cert: {secretKeyRef: {name: c, key: tls.crt}}, key: {secretKeyRef: {name: c, key: tls.key}}}}"#,
            )
            .replace(
                "url: http://127.0.0.1:8123",
                "url: https://127.0.0.1:8443\n  tls: {}",
            )
            .replace(
                r#"{url: "redis://127.0.0.1:6379"}"#,
                r#"{url: "rediss://127.0.0.1:6380", tls: {insecureSkipVerify: true}}"#,
            );
        spec(&secured).validate("transactions").unwrap();

        let mut bad = spec(&secured);
        let nats_tls = bad.nats.tls.as_mut().unwrap();
        nats_tls.key = None;
        nats_tls.ca.as_mut().unwrap().secret_key_ref =
            nats_tls.cert.clone().unwrap().secret_key_ref;
        bad.clickhouse.tls = None;
        let redis = &mut bad.cache.as_mut().unwrap().redis;
        redis.url = "redis://127.0.0.1:6379".into();
        redis.tls.as_mut().unwrap().key = Some(crate::spec::PemSource {
            secret_key_ref: None,
            config_map_key_ref: Some(crate::spec::KeyRef {
                name: "k".into(),
                key: "tls.key".into(),
            }),
        });
        let err = bad.validate("transactions").unwrap_err();
        let found: Vec<(&str, &str)> = err
            .errors
            .iter()
            .map(|e| (e.field.as_str(), e.message.as_str()))
            .collect();
        let has =
            |field: &str, words: &str| found.iter().any(|(f, m)| *f == field && m.contains(words));
        assert!(has("spec.nats.tls.ca", "exactly one of"), "{err}");
        assert!(has("spec.nats.tls.key", "without its private key"), "{err}");
        assert!(
            has(
                "spec.clickhouse.tls",
                "https:// but spec.clickhouse.tls is not set"
            ),
            "{err}"
        );
        assert!(
            has("spec.cache.redis.tls.key", "must come from a Secret"),
            "{err}"
        );
        assert!(
            has("spec.cache.redis.tls.cert", "without a certificate"),
            "{err}"
        );
        assert!(has("spec.cache.redis.url", "use rediss://"), "{err}");
    }

    #[test]
    fn each_problem_names_its_field() {
        let mut bad = spec(EXAMPLE);
        bad.stream.replicas = 9;
        bad.clickhouse.columns[1].type_name = "Strng".into();
        bad.dead_letter.as_mut().unwrap().subject = Some("signals.dlq.x".into());
        bad.cache.as_mut().unwrap().key = "wallet:{nope}".into();
        let err = bad.validate("transactions").unwrap_err();
        let fields: Vec<_> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.stream.replicas",
                "spec.clickhouse.columns[1].type",
                "spec.deadLetter.subject",
                "spec.deadLetter.stream.subjects",
                "spec.cache.key"
            ]
        );
        assert!(
            err.to_string()
                .contains("spec.clickhouse.columns[1].type: invalid column type `Strng`"),
            "{err}"
        );
    }

    #[test]
    fn settings_that_make_redelivery_certain_are_refused_naming_both_fields() {
        let mut bad = spec(EXAMPLE);
        bad.consumer.ack_wait = crate::HumanDuration::from_secs(2);
        bad.workers.batch.max_wait = crate::HumanDuration::from_secs(1);
        let problems = redelivery_problems(&bad);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "spec.workers.batch.maxWait");
        assert!(
            problems[0].message.contains("spec.consumer.ackWait (2s)"),
            "{}",
            problems[0].message
        );
        assert!(bad.validate("p").is_err());

        bad.consumer.ack_wait = crate::HumanDuration(std::time::Duration::from_millis(500));
        bad.workers.batch.max_wait = crate::HumanDuration(std::time::Duration::from_millis(100));
        let problems = redelivery_problems(&bad);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "spec.consumer.ackWait");

        bad.consumer.ack_wait = crate::HumanDuration::from_secs(3);
        bad.workers.batch.max_wait = crate::HumanDuration::from_secs(1);
        assert!(redelivery_problems(&bad).is_empty());
    }

    #[test]
    fn subjects_and_patterns() {
        assert!(subject_matches("signals.>", "signals.dlq.x"));
        assert!(subject_matches("signals.*", "signals.tx"));
        assert!(!subject_matches("signals.*", "signals.tx.y"));
        assert!(!subject_matches(
            "signals.transaction",
            "signals.dlq.transactions"
        ));
        assert!(subject_problem("a.>.b", true).is_some());
        assert!(subject_problem("a..b", true).is_some());
        assert!(subject_problem("a.*", false).is_some());
        assert!(subject_problem("a.b", false).is_none());
    }

    fn fields(spec: &SignalPipelineSpec) -> Vec<String> {
        match spec.validate("transactions") {
            Ok(()) => Vec::new(),
            Err(error) => error.errors.into_iter().map(|e| e.field).collect(),
        }
    }

    fn messages(spec: &SignalPipelineSpec) -> String {
        spec.validate("transactions")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn subjects_overlap_when_one_literal_matches_both() {
        assert!(subjects_overlap("a.>", "a.b.c"));
        assert!(subjects_overlap("a.*.c", "a.b.*"));
        assert!(subjects_overlap(">", "x"));
        assert!(subjects_overlap("a.b", "a.b"));
        assert!(!subjects_overlap("a.>", "a"));
        assert!(!subjects_overlap("a.*", "a.b.c"));
        assert!(!subjects_overlap("dlq.S.>", "signals.>"));
        assert!(!subjects_overlap("signals.>", HEALTH_SUBJECTS));
    }

    #[test]
    fn a_pipeline_without_dead_letter_gets_a_valid_default() {
        let mut spec = spec(EXAMPLE);
        spec.dead_letter = None;
        assert_eq!(fields(&spec), Vec::<String>::new());
        // A source stream that captures the default subject must name another one.
        spec.stream.subjects = vec!["signals.>".into(), "dlq.>".into()];
        assert_eq!(
            fields(&spec),
            ["spec.deadLetter.subject", "spec.deadLetter.stream.subjects"]
        );
        assert!(
            messages(&spec).contains("the default dead-letter subject `dlq.SIGNALS.transactions` is captured by the source stream (spec.stream.subjects[1] `dlq.>`)"),
            "{}",
            messages(&spec)
        );
    }

    #[test]
    fn the_dead_letter_stream_must_capture_the_subject_outside_the_source() {
        let mut spec = spec(EXAMPLE);
        let dead_letter = spec.dead_letter.as_mut().unwrap();
        dead_letter.stream.subjects = vec!["poison.>".into(), "signals.dlq.>".into()];
        assert_eq!(
            fields(&spec),
            [
                "spec.deadLetter.stream.subjects[1]",
                "spec.deadLetter.stream.subjects"
            ]
        );
        assert!(
            messages(&spec)
                .contains("does not capture the dead-letter subject `dlq.signals.transactions`")
        );

        let mut named = self::spec(EXAMPLE);
        named.dead_letter.as_mut().unwrap().stream.name = Some("SIGNALS".into());
        assert_eq!(fields(&named), ["spec.deadLetter.stream.name"]);

        let mut health = self::spec(EXAMPLE);
        health.dead_letter.as_mut().unwrap().subject = Some("signal.health.x".into());
        assert_eq!(
            fields(&health),
            ["spec.deadLetter.subject", "spec.deadLetter.stream.subjects"]
        );
    }

    #[test]
    fn an_unmanaged_dead_letter_stream_is_checked_live_not_here() {
        let mut spec = spec(EXAMPLE);
        let dead_letter = spec.dead_letter.as_mut().unwrap();
        dead_letter.stream.managed = false;
        dead_letter.stream.subjects = vec!["elsewhere.>".into()];
        assert_eq!(fields(&spec), Vec::<String>::new());
        // Still never into the source stream.
        spec.dead_letter.as_mut().unwrap().subject = Some("signals.dead".into());
        assert_eq!(fields(&spec), ["spec.deadLetter.subject"]);
    }

    #[test]
    fn the_duplicate_window_must_outlast_ack_wait_and_fit_max_age() {
        let mut spec = spec(EXAMPLE);
        spec.dead_letter.as_mut().unwrap().stream.duplicate_window =
            Some(HumanDuration::from_secs(10));
        assert_eq!(fields(&spec), ["spec.deadLetter.stream.duplicateWindow"]);
        assert!(messages(&spec).contains("shorter than spec.consumer.ackWait (30s)"));
        let stream = &mut spec.dead_letter.as_mut().unwrap().stream;
        stream.duplicate_window = Some(HumanDuration::from_secs(3600));
        stream.max_age = HumanDuration::from_secs(600);
        assert_eq!(fields(&spec), ["spec.deadLetter.stream.duplicateWindow"]);
        spec.dead_letter.as_mut().unwrap().stream.max_age = HumanDuration::from_secs(0);
        assert_eq!(fields(&spec), Vec::<String>::new());
    }

    #[test]
    fn batch_max_wait_must_be_at_most_a_third_of_ack_wait() {
        let mut spec = spec(EXAMPLE);
        spec.workers.batch.max_wait = HumanDuration::from_secs(10);
        assert_eq!(fields(&spec), Vec::<String>::new());
        spec.workers.batch.max_wait = HumanDuration(std::time::Duration::from_millis(10_001));
        assert_eq!(fields(&spec), ["spec.workers.batch.maxWait"]);
        assert!(messages(&spec).contains("must be at most a third of spec.consumer.ackWait (30s)"));
    }

    #[test]
    fn a_cluster_needs_a_name_http_replicas_of_a_replicated_engine_and_its_write_target() {
        let mut spec = spec(EXAMPLE);
        spec.clickhouse.engine = "ReplicatedMergeTree".into();
        spec.clickhouse.cluster = Some(crate::spec::ClickHouseClusterSpec {
            name: "signals".into(),
            replica_urls: vec!["http://ch-1:8123".into()],
            ..Default::default()
        });
        assert_eq!(fields(&spec), Vec::<String>::new());

        let cluster = spec.clickhouse.cluster.as_mut().unwrap();
        cluster.name = "no spaces".into();
        cluster.replica_urls.push("ch-2:8123".into());
        cluster.write_to = crate::spec::WriteTarget::Distributed;
        assert_eq!(
            fields(&spec),
            [
                "spec.clickhouse.cluster.name",
                "spec.clickhouse.cluster.replicaUrls[1]",
                "spec.clickhouse.cluster.writeTo"
            ]
        );

        let cluster = spec.clickhouse.cluster.as_mut().unwrap();
        cluster.name = "signals".into();
        cluster.replica_urls.pop();
        cluster.distributed = Some(crate::spec::DistributedTableSpec {
            table: spec.clickhouse.table.clone(),
            sharding_key: None,
        });
        spec.clickhouse.engine = "MergeTree".into();
        assert_eq!(
            fields(&spec),
            [
                "spec.clickhouse.cluster.replicaUrls",
                "spec.clickhouse.cluster.distributed.table"
            ]
        );
        assert!(messages(&spec).contains("use ReplicatedMergeTree"));
    }
}
