//! How a live ClickHouse table's engine, `PARTITION BY`, `ORDER BY` and `TTL` differ from the
//! spec.
//!
//! None of these can change without rebuilding the table, which the operator never does by itself:
//! a difference is only reported, as schema drift, and never blocks the workers (it changes how
//! rows are stored, not what a worker sends).
//!
//! The live clauses come from `system.tables`, which has the same three columns on 18.16 and on
//! current servers: `partition_key` and `sorting_key` hold the two keys as expressions (the sorting
//! key without its outer parentheses, both empty when absent), and `engine_full` holds the engine
//! with its arguments followed by the clauses, from which the engine and `TTL` are read. Servers
//! print expressions in their own normal form, so texts are compared normalised: whitespace,
//! backquotes around plain identifiers, outer parentheses, `tuple()` for "no key", `MergeTree()`
//! for `MergeTree` (18.16 prints the parentheses, current servers do not), and `INTERVAL 90 DAY`
//! for the `toIntervalDay(90)` current servers print. An expression the server rewrites in some
//! other way shows as drift until the spec is written the way the server prints it.

use std::fmt;

use signal_model::ClickHouseSpec;
use signal_model::ddl;

/// The table's clauses as `system.tables` reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveClauses {
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

/// Compares the spec's engine, `PARTITION BY`, `ORDER BY` and `TTL` with the live table's.
pub fn diff_clauses(spec: &ClickHouseSpec, live: &LiveClauses) -> Vec<ClauseMismatch> {
    let mut mismatches = Vec::new();
    let live_clauses = split_engine_full(&live.engine_full);

    let wanted_engine = spec.engine.trim();
    let wanted_engine = if wanted_engine.is_empty() {
        "MergeTree"
    } else {
        wanted_engine
    };
    if normalise_engine(wanted_engine) != normalise_engine(live_clauses.engine) {
        mismatches.push(ClauseMismatch {
            clause: TableClause::Engine,
            live: live_clauses.engine.to_string(),
            wanted: wanted_engine.to_string(),
        });
    }

    let wanted_partition = spec.partition_by.as_deref().map(str::trim);
    if normalise_key(wanted_partition.unwrap_or_default()) != normalise_key(&live.partition_key) {
        mismatches.push(ClauseMismatch {
            clause: TableClause::PartitionBy,
            live: shown_or_absent(&live.partition_key),
            wanted: shown_or_absent(wanted_partition.unwrap_or_default()),
        });
    }

    if normalise_key(&wanted_order_by_key(spec)) != normalise_key(&live.sorting_key) {
        mismatches.push(ClauseMismatch {
            clause: TableClause::OrderBy,
            live: live_order_by_shown(&live.sorting_key),
            wanted: wanted_order_by_shown(spec),
        });
    }

    let wanted_ttl = spec.ttl.as_deref().map(str::trim).unwrap_or_default();
    let live_ttl = live_clauses.ttl.unwrap_or_default();
    if normalise_expression(wanted_ttl) != normalise_expression(live_ttl) {
        mismatches.push(ClauseMismatch {
            clause: TableClause::Ttl,
            live: shown_or_absent(live_ttl),
            wanted: shown_or_absent(wanted_ttl),
        });
    }
    mismatches
}

fn shown_or_absent(text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        ABSENT.to_string()
    } else {
        text.to_string()
    }
}

/// The `ORDER BY` items the way `create_table_sql` writes them (an item naming a column is
/// back-quoted), so an identifier that needs quoting compares equal to the server's quoted form.
fn wanted_order_by_key(spec: &ClickHouseSpec) -> String {
    spec.order_by
        .iter()
        .map(|item| {
            let item = item.trim();
            if spec.columns.iter().any(|column| column.name == item) {
                ddl::quote_identifier(item)
            } else {
                item.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
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
    } else if has_top_level_comma(sorting_key) {
        format!("({sorting_key})")
    } else {
        sorting_key.to_string()
    }
}

fn has_top_level_comma(text: &str) -> bool {
    let tokens = tokenize(text);
    let mut depth = 0_i32;
    tokens.iter().any(|token| {
        match token.kind {
            TokenKind::Symbol('(') | TokenKind::Symbol('[') => depth += 1,
            TokenKind::Symbol(')') | TokenKind::Symbol(']') => depth -= 1,
            _ => {}
        }
        depth == 0 && token.kind == TokenKind::Symbol(',')
    })
}

/// `engine_full` split into the engine with its arguments and the `TTL` expression.
struct EngineFullParts<'a> {
    /// `ReplacingMergeTree(seen_at)`, `MergeTree()` (18.16) or `MergeTree` (current servers).
    engine: &'a str,
    ttl: Option<&'a str>,
}

/// Clause keywords that end the one before them in `engine_full`; the server prints them in
/// upper case and outside any parentheses, so a match there is a clause, not part of an expression.
const CLAUSE_KEYWORDS: [&str; 6] = ["PARTITION", "PRIMARY", "ORDER", "SAMPLE", "TTL", "SETTINGS"];

fn split_engine_full(engine_full: &str) -> EngineFullParts<'_> {
    let engine_full = engine_full.trim();
    let tokens = tokenize(engine_full);
    let mut depth = 0_i32;
    let mut clause_starts = Vec::new();
    for (index, token) in tokens.iter().enumerate() {
        match &token.kind {
            TokenKind::Symbol('(') | TokenKind::Symbol('[') => depth += 1,
            TokenKind::Symbol(')') | TokenKind::Symbol(']') => depth -= 1,
            TokenKind::Word(word)
                if depth == 0 && index > 0 && CLAUSE_KEYWORDS.contains(&word.as_str()) =>
            {
                clause_starts.push(index);
            }
            _ => {}
        }
    }
    let engine_end = clause_starts
        .first()
        .map_or(engine_full.len(), |&index| tokens[index].start);
    let ttl = clause_starts
        .iter()
        .position(|&index| matches!(&tokens[index].kind, TokenKind::Word(word) if word == "TTL"))
        .map(|position| {
            let start = tokens[clause_starts[position]].end;
            let end = clause_starts
                .get(position + 1)
                .map_or(engine_full.len(), |&index| tokens[index].start);
            engine_full[start..end].trim()
        });
    EngineFullParts {
        engine: engine_full[..engine_end].trim(),
        ttl,
    }
}

/// `MergeTree()` and `MergeTree` are the same engine.
fn normalise_engine(engine: &str) -> String {
    let normalised = normalise_expression(engine);
    match normalised.strip_suffix("()") {
        Some(name) if !name.contains('(') => name.to_string(),
        _ => normalised,
    }
}

/// A partition or sorting key: outer parentheses do not matter, and `tuple()` is no key.
fn normalise_key(key: &str) -> String {
    let mut tokens = normalised_tokens(key);
    while is_wrapped_in_parentheses(&tokens) {
        tokens = tokens[1..tokens.len() - 1].to_vec();
    }
    let text = render(&tokens);
    if text == "tuple()" {
        String::new()
    } else {
        text
    }
}

fn normalise_expression(expression: &str) -> String {
    render(&normalised_tokens(expression))
}

fn is_wrapped_in_parentheses(tokens: &[Token]) -> bool {
    if tokens.len() < 2
        || tokens[0].kind != TokenKind::Symbol('(')
        || tokens[tokens.len() - 1].kind != TokenKind::Symbol(')')
    {
        return false;
    }
    // `(a) + (b)` starts and ends with parentheses that are not a pair.
    let mut depth = 0_i32;
    for (index, token) in tokens.iter().enumerate() {
        match token.kind {
            TokenKind::Symbol('(') => depth += 1,
            TokenKind::Symbol(')') => depth -= 1,
            _ => {}
        }
        if depth == 0 && index < tokens.len() - 1 {
            return false;
        }
    }
    true
}

/// The server writes `INTERVAL 90 DAY` as `toIntervalDay(90)`.
const INTERVAL_UNITS: [&str; 8] = [
    "Second", "Minute", "Hour", "Day", "Week", "Month", "Quarter", "Year",
];

fn normalised_tokens(expression: &str) -> Vec<Token> {
    let tokens = tokenize(expression);
    let mut out = Vec::with_capacity(tokens.len());
    let mut index = 0;
    while index < tokens.len() {
        if let Some(rewritten) = interval_as_function(&tokens[index..]) {
            out.extend(rewritten);
            index += 3;
        } else {
            out.push(tokens[index].clone());
            index += 1;
        }
    }
    out
}

/// `INTERVAL n UNIT` at the start of `tokens`, as `toIntervalUnit(n)`.
fn interval_as_function(tokens: &[Token]) -> Option<[Token; 4]> {
    let [keyword, amount, unit, ..] = tokens else {
        return None;
    };
    let (TokenKind::Word(keyword), TokenKind::Word(amount), TokenKind::Word(unit)) =
        (&keyword.kind, &amount.kind, &unit.kind)
    else {
        return None;
    };
    if !keyword.eq_ignore_ascii_case("INTERVAL") || !amount.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let unit = INTERVAL_UNITS
        .iter()
        .find(|known| known.eq_ignore_ascii_case(unit))?;
    // Rewritten tokens stand for no text of their own: only comparison reads them, never a span.
    let word = |text: String| Token {
        kind: TokenKind::Word(text),
        start: 0,
        end: 0,
    };
    let symbol = |c| Token {
        kind: TokenKind::Symbol(c),
        start: 0,
        end: 0,
    };
    Some([
        word(format!("toInterval{unit}")),
        symbol('('),
        word(amount.clone()),
        symbol(')'),
    ])
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TokenKind {
    /// An identifier, keyword or number; a back-quoted plain identifier is stored unquoted.
    Word(String),
    /// A string literal or an identifier that needs its quotes, as written.
    Quoted(String),
    /// Any other character outside whitespace.
    Symbol(char),
}

/// A token and its byte range in the text it came from.
#[derive(Clone, Debug)]
struct Token {
    kind: TokenKind,
    start: usize,
    end: usize,
}

fn tokenize(text: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        if c.is_whitespace() {
            continue;
        }
        if is_word_char(c) {
            let mut end = start + c.len_utf8();
            while let Some(&(index, next)) = chars.peek() {
                if !is_word_char(next) {
                    break;
                }
                end = index + next.len_utf8();
                chars.next();
            }
            tokens.push(Token {
                kind: TokenKind::Word(text[start..end].to_string()),
                start,
                end,
            });
        } else if matches!(c, '\'' | '`' | '"') {
            let mut end = text.len();
            let mut escaped = false;
            for (index, next) in chars.by_ref() {
                if escaped {
                    escaped = false;
                } else if next == '\\' {
                    escaped = true;
                } else if next == c {
                    end = index + next.len_utf8();
                    break;
                }
            }
            let quoted = &text[start..end];
            let inner = quoted
                .get(1..quoted.len().saturating_sub(1))
                .unwrap_or_default();
            let plain_identifier = c != '\''
                && inner.starts_with(|first: char| first.is_ascii_alphabetic() || first == '_')
                && inner.chars().all(is_word_char);
            let kind = if plain_identifier {
                TokenKind::Word(inner.to_string())
            } else {
                TokenKind::Quoted(quoted.to_string())
            };
            tokens.push(Token { kind, start, end });
        } else {
            tokens.push(Token {
                kind: TokenKind::Symbol(c),
                start,
                end: start + c.len_utf8(),
            });
        }
    }
    tokens
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Tokens joined with a space only where two words meet, so spacing never matters.
fn render(tokens: &[Token]) -> String {
    let mut text = String::new();
    let mut previous_was_word = false;
    for token in tokens {
        match &token.kind {
            TokenKind::Word(word) => {
                if previous_was_word {
                    text.push(' ');
                }
                text.push_str(word);
                previous_was_word = true;
            }
            TokenKind::Quoted(quoted) => {
                text.push_str(quoted);
                previous_was_word = false;
            }
            TokenKind::Symbol(c) => {
                text.push(*c);
                previous_was_word = false;
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use signal_model::{ColumnSpec, ServerVersion};

    /// The integration tests' table: partitioned by month, ordered by two columns.
    fn signals_spec() -> ClickHouseSpec {
        ClickHouseSpec {
            url: "http://localhost:8123".to_string(),
            database: "db".to_string(),
            table: "signals".to_string(),
            auth: None,
            engine: "MergeTree".to_string(),
            partition_by: Some("toYYYYMM(event_time)".to_string()),
            order_by: vec!["wallet".to_string(), "event_time".to_string()],
            ttl: None,
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

    fn live(engine_full: &str, partition_key: &str, sorting_key: &str) -> LiveClauses {
        LiveClauses {
            engine_full: engine_full.to_string(),
            partition_key: partition_key.to_string(),
            sorting_key: sorting_key.to_string(),
        }
    }

    #[test]
    fn the_ddl_under_test_is_what_the_servers_were_given() {
        // The live texts below were printed by servers for tables created with exactly this DDL.
        assert!(
            ddl::create_table_sql(&signals_spec(), ServerVersion::new(18, 16))
                .unwrap()
                .ends_with(
                    "ENGINE = MergeTree()\nPARTITION BY toYYYYMM(event_time)\n\
                     ORDER BY (`wallet`, `event_time`)"
                )
        );
        assert!(
            ddl::create_table_sql(&every_clause_spec(), ServerVersion::new(26, 9))
                .unwrap()
                .ends_with(
                    "ENGINE = ReplacingMergeTree(seen_at)\nPARTITION BY (toYYYYMM(day), id % 4)\n\
                     ORDER BY (`id`, toDate(seen_at), intHash32(cityHash64(id)) % 10)\n\
                     TTL toDateTime(seen_at) + INTERVAL 90 DAY\n\
                     SETTINGS non_replicated_deduplication_window = 1000"
                )
        );
    }

    #[test]
    fn a_table_created_from_the_spec_on_18_16_has_no_drift() {
        // `system.tables` of clickhouse-server 18.16.1.
        let printed = live(
            "MergeTree() PARTITION BY toYYYYMM(event_time) ORDER BY (wallet, event_time) \
             SETTINGS index_granularity = 8192",
            "toYYYYMM(event_time)",
            "wallet, event_time",
        );
        assert_eq!(diff_clauses(&signals_spec(), &printed), []);

        let mut unordered = signals_spec();
        unordered.partition_by = None;
        unordered.order_by = Vec::new();
        let printed = live(
            "MergeTree() ORDER BY tuple() SETTINGS index_granularity = 8192",
            "",
            "",
        );
        assert_eq!(diff_clauses(&unordered, &printed), []);

        let mut replacing = every_clause_spec();
        replacing.ttl = None; // 18.16 has no TTL
        let printed = live(
            "ReplacingMergeTree(seen_at) PARTITION BY (toYYYYMM(day), id % 4) \
             ORDER BY (id, toDate(seen_at), intHash32(cityHash64(id)) % 10) \
             SETTINGS index_granularity = 8192",
            "(toYYYYMM(day), id % 4)",
            "id, toDate(seen_at), intHash32(cityHash64(id)) % 10",
        );
        assert_eq!(diff_clauses(&replacing, &printed), []);
    }

    #[test]
    fn a_table_created_from_the_spec_on_a_current_server_has_no_drift() {
        // `system.tables` of ClickHouse 26.9 (chdb), with the operator's deduplication setting.
        let printed = live(
            "MergeTree PARTITION BY toYYYYMM(event_time) ORDER BY (wallet, event_time) \
             SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 8192",
            "toYYYYMM(event_time)",
            "wallet, event_time",
        );
        assert_eq!(diff_clauses(&signals_spec(), &printed), []);

        let mut unordered = signals_spec();
        unordered.partition_by = None;
        unordered.order_by = Vec::new();
        let printed = live(
            "MergeTree ORDER BY tuple() \
             SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 8192",
            "",
            "",
        );
        assert_eq!(diff_clauses(&unordered, &printed), []);

        let printed = live(
            "ReplacingMergeTree(seen_at) PARTITION BY (toYYYYMM(day), id % 4) \
             ORDER BY (id, toDate(seen_at), intHash32(cityHash64(id)) % 10) \
             TTL toDateTime(seen_at) + toIntervalDay(90) \
             SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 8192",
            "(toYYYYMM(day), id % 4)",
            "id, toDate(seen_at), intHash32(cityHash64(id)) % 10",
        );
        assert_eq!(diff_clauses(&every_clause_spec(), &printed), []);
    }

    #[test]
    fn spacing_quotes_and_parentheses_in_the_spec_are_no_difference() {
        let mut spec = signals_spec();
        spec.engine = " MergeTree() ".to_string();
        spec.partition_by = Some("( toYYYYMM( `event_time` ) )".to_string());
        spec.order_by = vec!["(wallet,event_time)".to_string()];
        let printed = live(
            "MergeTree PARTITION BY toYYYYMM(event_time) ORDER BY (wallet, event_time)",
            "toYYYYMM(event_time)",
            "wallet, event_time",
        );
        assert_eq!(diff_clauses(&spec, &printed), []);
        // An unpartitioned table is the same as one partitioned by `tuple()`.
        spec.partition_by = Some("tuple()".to_string());
        let unpartitioned = live(
            "MergeTree ORDER BY (wallet, event_time)",
            "",
            "wallet, event_time",
        );
        assert_eq!(diff_clauses(&spec, &unpartitioned), []);
        spec.engine = String::new();
        assert_eq!(
            diff_clauses(&spec, &unpartitioned),
            [],
            "MergeTree is the default"
        );
    }

    #[test]
    fn a_changed_order_by_is_named_with_both_texts() {
        let mut spec = signals_spec();
        spec.order_by = vec!["event_time".to_string(), "wallet".to_string()];
        let printed = live(
            "MergeTree() PARTITION BY toYYYYMM(event_time) ORDER BY (wallet, event_time) \
             SETTINGS index_granularity = 8192",
            "toYYYYMM(event_time)",
            "wallet, event_time",
        );
        let mismatches = diff_clauses(&spec, &printed);
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
        assert_eq!(diff_clauses(&spec, &printed)[0].wanted, "tuple()");
    }

    #[test]
    fn changed_partition_engine_and_ttl_are_each_reported() {
        let mut spec = every_clause_spec();
        spec.engine = "ReplacingMergeTree(version)".to_string();
        spec.partition_by = None;
        spec.ttl = Some("toDateTime(seen_at) + INTERVAL 30 DAY".to_string());
        let printed = live(
            "ReplacingMergeTree(seen_at) PARTITION BY (toYYYYMM(day), id % 4) \
             ORDER BY (id, toDate(seen_at), intHash32(cityHash64(id)) % 10) \
             TTL toDateTime(seen_at) + toIntervalDay(90) \
             SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 8192",
            "(toYYYYMM(day), id % 4)",
            "id, toDate(seen_at), intHash32(cityHash64(id)) % 10",
        );
        let mismatches = diff_clauses(&spec, &printed);
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
        let printed = live("ReplacingMergeTree() ORDER BY tuple()", "", "");
        let mismatches = diff_clauses(&spec, &printed);
        assert_eq!(mismatches[0].live, "ReplacingMergeTree()");
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
            "MergeTree ORDER BY (a, b) TTL if(x = 'ORDER BY', d, e) + toIntervalDay(1) \
             SETTINGS index_granularity = 8192",
        );
        assert_eq!(parts.engine, "MergeTree");
        assert_eq!(
            parts.ttl,
            Some("if(x = 'ORDER BY', d, e) + toIntervalDay(1)")
        );
        assert_eq!(split_engine_full("MergeTree()").ttl, None);
    }

    #[test]
    fn normalising_keeps_what_changes_the_meaning() {
        assert_eq!(normalise_key("(a) + (b)"), "(a)+(b)");
        assert_eq!(normalise_key("((a, b))"), "a,b");
        assert_ne!(normalise_key("`my col`"), normalise_key("my col"));
        assert_ne!(normalise_expression("'A'"), normalise_expression("'a'"));
        assert_eq!(
            normalise_expression("d + interval 7 day"),
            normalise_expression("d + toIntervalDay(7)")
        );
        assert_eq!(normalise_engine("MergeTree()"), "MergeTree");
        assert_eq!(
            normalise_engine("ReplacingMergeTree(v)"),
            "ReplacingMergeTree(v)"
        );
    }
}
