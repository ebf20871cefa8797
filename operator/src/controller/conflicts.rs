//! Two pipelines claiming the same table or the same stream: who keeps it.
//!
//! A table is claimed by ClickHouse URL + `database.table`; a stream by NATS URL + stream name. Two
//! pipelines may share a stream when they agree on its settings and use different durable consumers;
//! otherwise, and always for a table, the older pipeline (by `creationTimestamp`, then
//! namespace/name) keeps the claim and the newer one is reported as in conflict and left untouched.
//!
//! [`ClaimIndex`] keeps every known pipeline under the two claims it makes, so a reconcile compares
//! a pipeline only with the pipelines that claim the same table or stream (its rivals), however
//! many pipelines exist.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

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

/// The keys of the two claims a pipeline makes: its table (ClickHouse URLs + `database.table`) and
/// its stream (NATS URLs + stream name), compared as [`find_conflict`] compares them.
pub fn claim_keys(pipeline: &SignalPipeline) -> [String; 2] {
    let spec = &pipeline.spec;
    [
        format!(
            "table {} {}.{}",
            normalise_urls(&spec.clickhouse.url).join(","),
            spec.clickhouse.database,
            spec.clickhouse.table
        ),
        format!(
            "stream {} {}",
            normalise_urls(&spec.nats.url).join(","),
            spec.stream.name
        ),
    ]
}

/// Every known pipeline by the claims it makes; see the module documentation.
#[derive(Default)]
pub struct ClaimIndex {
    /// `namespace/name` → the pipeline as last seen and its claim keys.
    pipelines: HashMap<String, (Arc<SignalPipeline>, [String; 2])>,
    /// Claim key → `namespace/name` of the pipelines making it.
    claimants: HashMap<String, BTreeSet<String>>,
}

impl ClaimIndex {
    /// Adds a pipeline or replaces what was known of it.
    pub fn upsert(&mut self, pipeline: Arc<SignalPipeline>) {
        let key = qualified_name(&pipeline);
        self.remove(&key);
        let claims = claim_keys(&pipeline);
        for claim in &claims {
            self.claimants
                .entry(claim.clone())
                .or_default()
                .insert(key.clone());
        }
        self.pipelines.insert(key, (pipeline, claims));
    }

    /// Forgets pipeline `key` (`namespace/name`).
    pub fn remove(&mut self, key: &str) {
        let Some((_, claims)) = self.pipelines.remove(key) else {
            return;
        };
        for claim in &claims {
            if let Some(names) = self.claimants.get_mut(claim) {
                names.remove(key);
                if names.is_empty() {
                    self.claimants.remove(claim);
                }
            }
        }
    }

    /// Keeps only the pipelines `keep` accepts (by `namespace/name`), after a relist.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self
            .pipelines
            .keys()
            .filter(|key| !keep(key))
            .cloned()
            .collect();
        for key in gone {
            self.remove(&key);
        }
    }

    /// The pipelines that make one of the claims `pipeline` makes (itself included when known).
    pub fn rivals(&self, pipeline: &SignalPipeline) -> Vec<Arc<SignalPipeline>> {
        let mut names = BTreeSet::new();
        for claim in claim_keys(pipeline) {
            if let Some(claimants) = self.claimants.get(&claim) {
                names.extend(claimants.iter());
            }
        }
        names
            .into_iter()
            .filter_map(|name| self.pipelines.get(name).map(|(p, _)| p.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.pipelines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pipelines.is_empty()
    }
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

/// `namespace/name`.
pub fn qualified_name(pipeline: &SignalPipeline) -> String {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::workload::fixtures::{minimal_spec, stored_pipeline_with};

    const EARLIER: i64 = 1_700_000_000;
    const LATER: i64 = 1_700_000_100;

    /// A pipeline on its own stream `stream` and table `table`.
    fn claiming(name: &str, stream: &str, table: &str, created_at: i64) -> SignalPipeline {
        let mut spec = minimal_spec();
        spec["stream"]["name"] = json!(stream);
        spec["clickhouse"]["table"] = json!(table);
        stored_pipeline_with(name, spec, created_at)
    }

    #[test]
    fn the_newer_of_two_pipelines_on_one_table_loses_it() {
        let older = claiming("older", "A", "events", EARLIER);
        let newer = claiming("newer", "B", "events", LATER);
        let all = [older.clone(), newer.clone()];
        let conflict = find_conflict(&newer, &all).expect("a conflict");
        assert_eq!(conflict.holder, "signals/older");
        assert!(conflict.what.contains("risk.events"), "{}", conflict.what);
        assert!(conflict.message().contains("signals/older"));
        assert_eq!(
            find_conflict(&older, &all),
            None,
            "the older one keeps its table"
        );
    }

    #[test]
    fn a_pipeline_never_conflicts_with_itself_or_with_separate_claims() {
        let alone = claiming("alone", "A", "events", EARLIER);
        assert_eq!(find_conflict(&alone, [&alone]), None);
        let other = claiming("other", "B", "other_events", EARLIER - 10);
        assert_eq!(find_conflict(&alone, [&alone, &other]), None);
    }

    #[test]
    fn the_same_table_on_another_server_is_no_conflict() {
        let older = claiming("older", "A", "events", EARLIER);
        let mut newer = claiming("newer", "B", "events", LATER);
        newer.spec.clickhouse.url = "http://other-clickhouse:8123".to_string();
        assert_eq!(find_conflict(&newer, [&older, &newer]), None);
    }

    #[test]
    fn urls_compare_without_case_trailing_slash_or_server_order() {
        let mut older = claiming("older", "A", "events", EARLIER);
        older.spec.clickhouse.url = "HTTP://ClickHouse.signals.svc:8123/".to_string();
        let newer = claiming("newer", "B", "events", LATER);
        assert!(find_conflict(&newer, [&older, &newer]).is_some());

        let mut older = claiming("older", "S", "t1", EARLIER);
        older.spec.nats.url = "nats://a:4222, nats://b:4222".to_string();
        let mut newer = claiming("newer", "S", "t2", LATER);
        newer.spec.nats.url = "nats://b:4222,nats://a:4222".to_string();
        newer.spec.stream.max_msgs = Some(5);
        assert!(find_conflict(&newer, [&older, &newer]).is_some());
    }

    #[test]
    fn a_shared_stream_needs_equal_settings_and_separate_consumers() {
        let older = claiming("older", "SIGNALS", "t1", EARLIER);
        let newer = claiming("newer", "SIGNALS", "t2", LATER);
        // Same settings, durable names default to the (different) pipeline names.
        assert_eq!(find_conflict(&newer, [&older, &newer]), None);

        let mut same_durable = newer.clone();
        same_durable.spec.consumer.durable_name = Some("older".to_string());
        let conflict = find_conflict(&same_durable, [&older, &same_durable]).expect("a conflict");
        assert!(
            conflict.what.contains("durable consumer older"),
            "{}",
            conflict.what
        );

        let mut other_settings = newer;
        other_settings.spec.stream.subjects = vec!["other.>".to_string()];
        let conflict =
            find_conflict(&other_settings, [&older, &other_settings]).expect("a conflict");
        assert!(
            conflict.what.contains("different stream settings"),
            "{}",
            conflict.what
        );
    }

    #[test]
    fn equal_creation_times_are_ordered_by_name_and_unsaved_pipelines_are_newest() {
        let alpha = claiming("alpha", "A", "events", EARLIER);
        let beta = claiming("beta", "B", "events", EARLIER);
        assert_eq!(find_conflict(&alpha, [&alpha, &beta]), None);
        assert_eq!(
            find_conflict(&beta, [&alpha, &beta]).map(|c| c.holder),
            Some("signals/alpha".to_string())
        );

        let mut unsaved = claiming("aaa", "C", "events", EARLIER);
        unsaved.metadata.creation_timestamp = None;
        unsaved.metadata.uid = None;
        assert!(find_conflict(&unsaved, [&alpha, &unsaved]).is_some());
    }

    #[test]
    fn the_index_finds_rivals_by_table_or_stream_only() {
        let mut index = ClaimIndex::default();
        let older = Arc::new(claiming("older", "A", "events", EARLIER));
        let same_table = Arc::new(claiming("same-table", "B", "events", LATER));
        let same_stream = Arc::new(claiming("same-stream", "A", "other", LATER));
        let apart = Arc::new(claiming("apart", "C", "third", LATER));
        for pipeline in [&older, &same_table, &same_stream, &apart] {
            index.upsert(pipeline.clone());
        }
        fn names(index: &ClaimIndex, pipeline: &SignalPipeline) -> Vec<String> {
            index
                .rivals(pipeline)
                .iter()
                .map(|p| p.name_any())
                .collect()
        }
        assert_eq!(
            names(&index, &older),
            ["older", "same-stream", "same-table"]
        );
        assert_eq!(names(&index, &apart), ["apart"]);
        let conflict = find_conflict(
            &same_table,
            index.rivals(&same_table).iter().map(Arc::as_ref),
        );
        assert_eq!(
            conflict.map(|c| c.holder),
            Some("signals/older".to_string())
        );

        // The older one moves to another table: the newer one keeps "events".
        let mut moved = claiming("older", "A", "moved", EARLIER);
        moved.metadata.uid = older.metadata.uid.clone();
        index.upsert(Arc::new(moved));
        assert_eq!(names(&index, &same_table), ["same-table"]);
        index.remove("signals/same-table");
        index.retain(|key| key != "signals/apart");
        assert_eq!(index.len(), 2);
        assert!(index.rivals(&same_table).is_empty());
    }

    #[test]
    fn the_oldest_holder_is_reported_whatever_the_cache_order() {
        let oldest = claiming("oldest", "A", "events", EARLIER - 100);
        let middle = claiming("middle", "B", "events", EARLIER);
        let newest = claiming("newest", "C", "events", LATER);
        for order in [[&middle, &oldest, &newest], [&newest, &middle, &oldest]] {
            assert_eq!(
                find_conflict(&newest, order).map(|c| c.holder),
                Some("signals/oldest".to_string())
            );
        }
    }
}
