//! How a live ClickHouse table's engine, `PARTITION BY`, `ORDER BY` and `TTL` differ from the
//! spec.
//!
//! None of these can change without rebuilding the table, which the operator never does by itself:
//! a difference is only reported, as schema drift, and never blocks the workers (it changes how
//! rows are stored, not what a worker sends).
//!
//! Servers print expressions in their own normal form (`amount % 4` for `modulo(amount, 4)`,
//! `CAST(x, 'UInt8')` for `cast(x as UInt8)`, `toIntervalDay(90)` for `INTERVAL 90 DAY`, with rules
//! that change between releases), so the spec's text is never compared with the live text.
//! Instead the server prints both: [`super::table_scratch`] creates the spec's table empty under a
//! scratch name and reads it back, and this module compares the two printings. Both come from
//! `system.tables`, which has the same three columns on 18.16 and on current servers:
//! `partition_key` and `sorting_key` hold the keys, and `engine_full` the engine with its
//! arguments followed by the clauses, from which the engine and `TTL` are read. `SETTINGS` are
//! not compared: a table keeps the settings of the release that created it.

use std::fmt;

use signal_model::{ClickHouseSpec, ddl};

/// A table's clauses as `system.tables` prints them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrintedClauses {
    /// `engine_full`: `ReplacingMergeTree(seen_at) PARTITION BY … ORDER BY … TTL … SETTINGS …`.
    pub engine_full: String,
    /// `partition_key`: empty when the table has no `PARTITION BY`.
    pub partition_key: String,
    /// `sorting_key`: the `ORDER BY` items joined by `, `; empty for `ORDER BY tuple()`.
    pub sorting_key: String,
}

/// A table clause the operator compares but never changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableClause {
    Engine,
    PartitionBy,
    OrderBy,
    Ttl,
}

impl fmt::Display for TableClause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TableClause::Engine => "ENGINE",
            TableClause::PartitionBy => "PARTITION BY",
            TableClause::OrderBy => "ORDER BY",
            TableClause::Ttl => "TTL",
        })
    }
}

/// A clause whose live text differs from the spec's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClauseMismatch {
    pub clause: TableClause,
    /// As the server prints it (`none` when the table has no such clause).
    pub live: String,
    /// As the spec writes it (`none` when the spec has no such clause).
    pub wanted: String,
}

impl fmt::Display for ClauseMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: table has {}, spec wants {} (the table was left as is: changing it means \
             rebuilding the table, which the operator never does by itself)",
            self.clause, self.live, self.wanted
        )
    }
}

/// What a missing optional clause is shown as.
const ABSENT: &str = "none";

/// Compares the live table's clauses with those of a table the same server created from `spec`
/// (`spec_printed`). The mismatches name the live clause as the server prints it and the wanted
/// one as the spec writes it, which is what a person edits.
pub fn diff_clauses(
    spec: &ClickHouseSpec,
    live: &PrintedClauses,
    spec_printed: &PrintedClauses,
) -> Vec<ClauseMismatch> {
    let mut mismatches = Vec::new();
    let live_parts = split_engine_full(&live.engine_full);
    let wanted_parts = split_engine_full(&spec_printed.engine_full);

    if engine_differs(spec, live_parts.engine, wanted_parts.engine) {
        let wanted_engine = spec.engine.trim();
        mismatches.push(ClauseMismatch {
            clause: TableClause::Engine,
            live: live_parts.engine.to_string(),
            wanted: if wanted_engine.is_empty() {
                "MergeTree".to_string()
            } else {
                wanted_engine.to_string()
            },
        });
    }

    if live.partition_key.trim() != spec_printed.partition_key.trim() {
        mismatches.push(ClauseMismatch {
            clause: TableClause::PartitionBy,
            live: shown_or_absent(&live.partition_key),
            wanted: shown_or_absent(spec.partition_by.as_deref().unwrap_or_default()),
        });
    }

    if live.sorting_key.trim() != spec_printed.sorting_key.trim() {
        mismatches.push(ClauseMismatch {
            clause: TableClause::OrderBy,
            live: live_order_by_shown(&live.sorting_key),
            wanted: wanted_order_by_shown(spec),
        });
    }

    if live_parts.ttl != wanted_parts.ttl {
        mismatches.push(ClauseMismatch {
            clause: TableClause::Ttl,
            live: shown_or_absent(live_parts.ttl.unwrap_or_default()),
            wanted: shown_or_absent(spec.ttl.as_deref().unwrap_or_default()),
        });
    }
    mismatches
}

/// Whether the live engine differs from the spec's. The scratch table the spec was printed from is
/// never replicated (it must not register in ZooKeeper), so the engines are compared without
/// replication, and the replication itself (replicated or not, ZooKeeper path and replica name,
/// which the server prints as written) is compared with the spec's text.
fn engine_differs(spec: &ClickHouseSpec, live: &str, printed_unreplicated: &str) -> bool {
    // 18.16 prints `MergeTree()`, current servers `MergeTree`.
    let bare = |engine: String| engine.trim().trim_end_matches("()").to_string();
    if bare(ddl::unreplicated_engine(live)) != bare(printed_unreplicated.to_string()) {
        return true;
    }
    let wanted_replication = ddl::engine_sql(spec)
        .ok()
        .and_then(|engine| ddl::replication_arguments(&engine))
        .map(|(path_and_replica, _)| path_and_replica);
    let live_replication =
        ddl::replication_arguments(live).map(|(path_and_replica, _)| path_and_replica);
    wanted_replication != live_replication
}

fn shown_or_absent(text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        ABSENT.to_string()
    } else {
        text.to_string()
    }
}

fn wanted_order_by_shown(spec: &ClickHouseSpec) -> String {
    let items: Vec<&str> = spec.order_by.iter().map(|item| item.trim()).collect();
    match items.as_slice() {
        [] => "tuple()".to_string(),
        [single] => single.to_string(),
        several => format!("({})", several.join(", ")),
    }
}

/// The sorting key as an `ORDER BY` clause would print it: `tuple()`, `id` or `(a, b)`.
fn live_order_by_shown(sorting_key: &str) -> String {
    let sorting_key = sorting_key.trim();
    if sorting_key.is_empty() {
        "tuple()".to_string()
    } else if top_level_bytes(sorting_key).any(|(_, byte)| byte == b',') {
        format!("({sorting_key})")
    } else {
        sorting_key.to_string()
    }
}

/// `engine_full` split into the engine with its arguments and the `TTL` expression.
#[derive(Debug, PartialEq, Eq)]
struct EngineFullParts<'a> {
    /// `ReplacingMergeTree(seen_at)`, `MergeTree()` (18.16) or `MergeTree` (current servers).
    engine: &'a str,
    ttl: Option<&'a str>,
}

/// Clause keywords that end the one before them in `engine_full`. The server prints them in upper
/// case, after a space and outside any parentheses or quotes, so a match there is a clause.
const CLAUSE_KEYWORDS: [&str; 6] = [
    "PARTITION BY ",
    "PRIMARY KEY ",
    "ORDER BY ",
    "SAMPLE BY ",
    "TTL ",
    "SETTINGS ",
];

fn split_engine_full(engine_full: &str) -> EngineFullParts<'_> {
    let engine_full = engine_full.trim();
    let clause_starts: Vec<(usize, &str)> = top_level_bytes(engine_full)
        .filter(|&(_, byte)| byte == b' ')
        .filter_map(|(index, _)| {
            let rest = &engine_full[index + 1..];
            CLAUSE_KEYWORDS
                .iter()
                .find(|keyword| rest.starts_with(**keyword))
                .map(|keyword| (index + 1, *keyword))
        })
        .collect();
    let engine_end = clause_starts
        .first()
        .map_or(engine_full.len(), |&(start, _)| start);
    let ttl = clause_starts
        .iter()
        .position(|&(_, keyword)| keyword == "TTL ")
        .map(|position| {
            let start = clause_starts[position].0 + "TTL ".len();
            let end = clause_starts
                .get(position + 1)
                .map_or(engine_full.len(), |&(next, _)| next);
            engine_full[start..end].trim()
        });
    EngineFullParts {
        engine: engine_full[..engine_end].trim(),
        ttl,
    }
}

/// The bytes of `text` outside parentheses, brackets, quoted strings and quoted identifiers, with
/// their positions. Only ASCII bytes are compared by the callers, so positions are char boundaries.
fn top_level_bytes(text: &str) -> impl Iterator<Item = (usize, u8)> + '_ {
    let mut depth = 0_usize;
    let mut quote: Option<u8> = None;
    let mut escaped = false;
    text.bytes().enumerate().filter(move |&(_, byte)| {
        if let Some(open) = quote {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == open {
                quote = None;
            }
            return false;
        }
        match byte {
            b'\'' | b'`' | b'"' => {
                quote = Some(byte);
                false
            }
            b'(' | b'[' => {
                depth += 1;
                false
            }
            b')' | b']' => {
                depth = depth.saturating_sub(1);
                false
            }
            _ => depth == 0,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use signal_model::ColumnSpec;

    /// The integration tests' table: partitioned by month, ordered by two columns.
    fn signals_spec() -> ClickHouseSpec {
        ClickHouseSpec {
            url: "http://localhost:8123".to_string(),
            database: "db".to_string(),
            table: "signals".to_string(),
            auth: None,
            tls: None,
            engine: "MergeTree".to_string(),
            partition_by: Some("toYYYYMM(event_time)".to_string()),
            order_by: vec!["wallet".to_string(), "event_time".to_string()],
            ttl: None,
            cluster: None,
            columns: vec![
                ColumnSpec::from_field("event_time", "DateTime"),
                ColumnSpec::from_field("wallet", "String"),
                ColumnSpec::from_field("amount", "Int32"),
            ],
        }
    }

    /// A table using every clause, with expressions the servers rewrite.
    fn every_clause_spec() -> ClickHouseSpec {
        ClickHouseSpec {
            engine: "ReplacingMergeTree(seen_at)".to_string(),
            partition_by: Some("(toYYYYMM(day), id % 4)".to_string()),
            order_by: vec![
                "id".to_string(),
                "toDate(seen_at)".to_string(),
                "intHash32(cityHash64(id)) % 10".to_string(),
            ],
            ttl: Some("toDateTime(seen_at) + INTERVAL 90 DAY".to_string()),
            columns: vec![
                ColumnSpec::from_field("id", "UInt64"),
                ColumnSpec::from_field("seen_at", "DateTime"),
                ColumnSpec::from_field("day", "Date"),
            ],
            ..signals_spec()
        }
    }

    fn printed(engine_full: &str, partition_key: &str, sorting_key: &str) -> PrintedClauses {
        PrintedClauses {
            engine_full: engine_full.to_string(),
            partition_key: partition_key.to_string(),
            sorting_key: sorting_key.to_string(),
        }
    }

    /// `every_clause_spec` as ClickHouse 26.9 (chdb) prints it.
    fn every_clause_printed() -> PrintedClauses {
        printed(
            "ReplacingMergeTree(seen_at) PARTITION BY (toYYYYMM(day), id % 4) \
             ORDER BY (id, toDate(seen_at), intHash32(cityHash64(id)) % 10) \
             TTL toDateTime(seen_at) + toIntervalDay(90) \
             SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 8192",
            "(toYYYYMM(day), id % 4)",
            "id, toDate(seen_at), intHash32(cityHash64(id)) % 10",
        )
    }

    #[test]
    fn the_same_printing_is_no_drift_whatever_the_settings() {
        let on_18_16 = printed(
            "MergeTree() PARTITION BY toYYYYMM(event_time) ORDER BY (wallet, event_time) \
             SETTINGS index_granularity = 8192",
            "toYYYYMM(event_time)",
            "wallet, event_time",
        );
        assert_eq!(diff_clauses(&signals_spec(), &on_18_16, &on_18_16), []);
        assert_eq!(
            diff_clauses(
                &every_clause_spec(),
                &every_clause_printed(),
                &every_clause_printed()
            ),
            []
        );
        // A table created before the operator set the deduplication window, on the same server.
        let older = printed(
            "MergeTree ORDER BY tuple() SETTINGS index_granularity = 8192",
            "",
            "",
        );
        let current = printed(
            "MergeTree ORDER BY tuple() \
             SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 8192",
            "",
            "",
        );
        assert_eq!(diff_clauses(&signals_spec(), &older, &current), []);
    }

    #[test]
    fn a_changed_order_by_is_named_with_both_texts() {
        let mut spec = signals_spec();
        spec.order_by = vec!["event_time".to_string(), "wallet".to_string()];
        let live = printed(
            "MergeTree() PARTITION BY toYYYYMM(event_time) ORDER BY (wallet, event_time) \
             SETTINGS index_granularity = 8192",
            "toYYYYMM(event_time)",
            "wallet, event_time",
        );
        let from_spec = printed(
            "MergeTree() PARTITION BY toYYYYMM(event_time) ORDER BY (event_time, wallet) \
             SETTINGS index_granularity = 8192",
            "toYYYYMM(event_time)",
            "event_time, wallet",
        );
        let mismatches = diff_clauses(&spec, &live, &from_spec);
        assert_eq!(
            mismatches,
            [ClauseMismatch {
                clause: TableClause::OrderBy,
                live: "(wallet, event_time)".to_string(),
                wanted: "(event_time, wallet)".to_string(),
            }]
        );
        assert_eq!(
            mismatches[0].to_string(),
            "ORDER BY: table has (wallet, event_time), spec wants (event_time, wallet) (the table \
             was left as is: changing it means rebuilding the table, which the operator never \
             does by itself)"
        );
        spec.order_by = Vec::new();
        let unordered = printed(
            "MergeTree() PARTITION BY toYYYYMM(event_time) ORDER BY tuple() \
             SETTINGS index_granularity = 8192",
            "toYYYYMM(event_time)",
            "",
        );
        assert_eq!(diff_clauses(&spec, &live, &unordered)[0].wanted, "tuple()");
    }

    #[test]
    fn changed_partition_engine_and_ttl_are_each_reported() {
        let mut spec = every_clause_spec();
        spec.engine = "ReplacingMergeTree(version)".to_string();
        spec.partition_by = None;
        spec.ttl = Some("toDateTime(seen_at) + INTERVAL 30 DAY".to_string());
        let from_spec = printed(
            "ReplacingMergeTree(version) \
             ORDER BY (id, toDate(seen_at), intHash32(cityHash64(id)) % 10) \
             TTL toDateTime(seen_at) + toIntervalDay(30) \
             SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 8192",
            "",
            "id, toDate(seen_at), intHash32(cityHash64(id)) % 10",
        );
        let mismatches = diff_clauses(&spec, &every_clause_printed(), &from_spec);
        let found: Vec<(TableClause, &str, &str)> = mismatches
            .iter()
            .map(|m| (m.clause, m.live.as_str(), m.wanted.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    TableClause::Engine,
                    "ReplacingMergeTree(seen_at)",
                    "ReplacingMergeTree(version)"
                ),
                (TableClause::PartitionBy, "(toYYYYMM(day), id % 4)", "none"),
                (
                    TableClause::Ttl,
                    "toDateTime(seen_at) + toIntervalDay(90)",
                    "toDateTime(seen_at) + INTERVAL 30 DAY"
                ),
            ]
        );

        // A TTL removed from the table, and an engine of another name.
        spec.engine = "MergeTree".to_string();
        let live = printed("ReplacingMergeTree ORDER BY tuple()", "", "");
        let from_spec = printed(
            "MergeTree ORDER BY tuple() TTL d + toIntervalDay(1)",
            "",
            "",
        );
        let mismatches = diff_clauses(&spec, &live, &from_spec);
        assert_eq!(mismatches[0].live, "ReplacingMergeTree");
        assert_eq!(mismatches[0].wanted, "MergeTree");
        let ttl = mismatches
            .iter()
            .find(|m| m.clause == TableClause::Ttl)
            .unwrap();
        assert_eq!(ttl.live, "none");
    }

    #[test]
    fn keywords_inside_expressions_do_not_split_engine_full() {
        let parts = split_engine_full(
            "MergeTree ORDER BY (a, b) TTL if(x = 'it\\'s ORDER BY', d, e) + toIntervalDay(1) \
             SETTINGS index_granularity = 8192",
        );
        assert_eq!(parts.engine, "MergeTree");
        assert_eq!(
            parts.ttl,
            Some("if(x = 'it\\'s ORDER BY', d, e) + toIntervalDay(1)")
        );
        assert_eq!(
            split_engine_full("MergeTree()"),
            EngineFullParts {
                engine: "MergeTree()",
                ttl: None
            }
        );
        assert_eq!(live_order_by_shown("f(a, b)"), "f(a, b)");
        assert_eq!(live_order_by_shown("`a,b`"), "`a,b`");
        assert_eq!(live_order_by_shown("a, f(b)"), "(a, f(b))");
    }

    #[test]
    fn a_replicated_table_is_compared_without_replication_then_by_its_path_and_replica() {
        let mut spec = signals_spec();
        spec.engine = "ReplicatedMergeTree".to_string();
        // The scratch table is the unreplicated engine, as 18.16 prints it.
        let scratch = printed(
            "MergeTree() PARTITION BY toYYYYMM(event_time) ORDER BY (wallet, event_time) \
             SETTINGS index_granularity = 8192",
            "toYYYYMM(event_time)",
            "wallet, event_time",
        );
        let live = |engine: &str| {
            printed(
                &format!(
                    "{engine} PARTITION BY toYYYYMM(event_time) ORDER BY (wallet, event_time) \
                     SETTINGS replicated_deduplication_window = 1000, index_granularity = 8192"
                ),
                "toYYYYMM(event_time)",
                "wallet, event_time",
            )
        };
        let created =
            live("ReplicatedMergeTree('/clickhouse/tables/{shard}/db.signals', '{replica}')");
        assert_eq!(diff_clauses(&spec, &created, &scratch), []);

        let elsewhere = live("ReplicatedMergeTree('/other/{shard}/signals', '{replica}')");
        let mismatches = diff_clauses(&spec, &elsewhere, &scratch);
        assert_eq!(mismatches.len(), 1, "{mismatches:?}");
        assert_eq!(mismatches[0].clause, TableClause::Engine);
        assert_eq!(mismatches[0].wanted, "ReplicatedMergeTree");

        // A plain table where the spec wants a replicated one, and the other way round.
        assert_eq!(diff_clauses(&spec, &live("MergeTree()"), &scratch).len(), 1);
        spec.engine = "MergeTree".to_string();
        assert_eq!(diff_clauses(&spec, &created, &scratch).len(), 1);
    }
}
