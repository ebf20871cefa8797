//! Two pipelines claiming the same table or the same stream: who keeps it.
//!
//! A table is claimed by ClickHouse URL + `database.table`; a stream by NATS URL + stream name. Two
//! pipelines may share a stream when they agree on its settings and use different durable consumers;
//! otherwise, and always for a table, the older pipeline (by `creationTimestamp`, then
//! namespace/name) keeps the claim and the newer one is reported as in conflict and left untouched.

use std::cmp::Ordering;

use kube::ResourceExt;
use signal_model::SignalPipeline;

/// The claim a pipeline lost, and to whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// `namespace/name` of the pipeline that keeps the claim.
    pub holder: String,
    /// What both claim, in words.
    pub what: String,
}

impl Conflict {
    pub fn message(&self) -> String {
        format!(
            "{} is already claimed by the older SignalPipeline {}; this pipeline is not reconciled until it is changed or the other one is deleted",
            self.what, self.holder
        )
    }
}

/// The first conflict `pipeline` loses against any of `all` (which may include itself).
pub fn find_conflict<'a>(
    pipeline: &SignalPipeline,
    all: impl IntoIterator<Item = &'a SignalPipeline>,
) -> Option<Conflict> {
    let mut older: Vec<&SignalPipeline> = all
        .into_iter()
        .filter(|other| !same_object(pipeline, other))
        .filter(|other| seniority(other, pipeline) == Ordering::Less)
        .collect();
    // Report the oldest holder first, so the message is stable across reconciles.
    older.sort_by(|a, b| seniority(a, b));
    older.into_iter().find_map(|other| clash(pipeline, other))
}

/// What `pipeline` and `other` both claim, if anything.
fn clash(pipeline: &SignalPipeline, other: &SignalPipeline) -> Option<Conflict> {
    let ours = &pipeline.spec;
    let theirs = &other.spec;
    let holder = qualified_name(other);
    if same_url(&ours.clickhouse.url, &theirs.clickhouse.url)
        && ours.clickhouse.database == theirs.clickhouse.database
        && ours.clickhouse.table == theirs.clickhouse.table
    {
        return Some(Conflict {
            holder,
            what: format!(
                "ClickHouse table {}.{} at {}",
                ours.clickhouse.database, ours.clickhouse.table, ours.clickhouse.url
            ),
        });
    }
    if same_url(&ours.nats.url, &theirs.nats.url) && ours.stream.name == theirs.stream.name {
        if ours.stream != theirs.stream {
            return Some(Conflict {
                holder,
                what: format!(
                    "JetStream stream {} at {} (with different stream settings)",
                    ours.stream.name, ours.nats.url
                ),
            });
        }
        let our_durable = ours.durable_name(&pipeline.name_any()).to_string();
        if our_durable == theirs.durable_name(&other.name_any()) {
            return Some(Conflict {
                holder,
                what: format!(
                    "durable consumer {our_durable} on stream {} at {}",
                    ours.stream.name, ours.nats.url
                ),
            });
        }
    }
    None
}

/// Older first: creation time, then namespace/name so that equal timestamps still order.
fn seniority(a: &SignalPipeline, b: &SignalPipeline) -> Ordering {
    let created = |p: &SignalPipeline| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
    // A pipeline without a timestamp has not been stored yet: it is the newest.
    match (created(a), created(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
    .then_with(|| qualified_name(a).cmp(&qualified_name(b)))
}

fn same_object(a: &SignalPipeline, b: &SignalPipeline) -> bool {
    match (&a.metadata.uid, &b.metadata.uid) {
        (Some(x), Some(y)) => x == y,
        _ => qualified_name(a) == qualified_name(b),
    }
}

fn qualified_name(pipeline: &SignalPipeline) -> String {
    format!(
        "{}/{}",
        pipeline.namespace().unwrap_or_default(),
        pipeline.name_any()
    )
}

/// URLs compare without case, surrounding space or a trailing slash, and a list of NATS servers
/// compares as a set.
fn same_url(a: &str, b: &str) -> bool {
    normalise_urls(a) == normalise_urls(b)
}

fn normalise_urls(urls: &str) -> Vec<String> {
    let mut list: Vec<String> = urls
        .split(',')
        .map(|url| url.trim().trim_end_matches('/').to_ascii_lowercase())
        .filter(|url| !url.is_empty())
        .collect();
    list.sort();
    list
}
