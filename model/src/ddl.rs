//! The ClickHouse DDL the operator runs for a pipeline's table, as pure text built from the spec.
//!
//! Statements are written for the server's version: features the server lacks are reported by
//! [`unsupported_features`] (and refused by [`create_table_sql`]) rather than sent and failed on.
//! `LowCardinality` is treated as unsupported before 19.0: on 18.x it exists only behind
//! `allow_experimental_low_cardinality_type=1`, and an experimental setting is not something the
//! operator should switch on for a production table by itself.
//!
//! On a cluster (`spec.clickhouse.cluster`) every statement carries `ON CLUSTER <name>`, so the
//! servers' distributed DDL queue runs it on every replica, including one that is down now (it
//! catches up when it returns). `Replicated…` engines get their ZooKeeper path and replica name
//! as explicit arguments ([`replication_arguments`]): the only form 18.16 knows, and one current
//! servers still accept.

use std::fmt;

use crate::column_type::{ColumnType, TypeError};
use crate::server_version::ServerVersion;
use crate::spec::{ClickHouseSpec, ColumnSpec};

/// Table engine families the operator creates (optionally with arguments, e.g.
/// `ReplacingMergeTree(version)`), each also with the `Replicated` prefix.
pub const SUPPORTED_ENGINES: [&str; 5] = [
    "MergeTree",
    "ReplacingMergeTree",
    "SummingMergeTree",
    "CollapsingMergeTree",
    "VersionedCollapsingMergeTree",
];

/// The prefix of the engines whose tables replicate through ZooKeeper.
pub const REPLICATED_PREFIX: &str = "Replicated";

/// The ZooKeeper path of a replicated table when the spec names none: one path per shard
/// (`{shard}` macro) and table, the layout ClickHouse's documentation uses.
pub const DEFAULT_ZOOKEEPER_PATH: &str = "/clickhouse/tables/{shard}/{database}.{table}";

/// The replica name of a replicated table when the spec names none: the servers' macro.
pub const DEFAULT_REPLICA_NAME: &str = "{replica}";

/// How many recent insert blocks a table remembers for deduplication. The workers'
/// `insert_deduplication_token`s only take effect on a plain MergeTree table with this setting
/// (`non_replicated_deduplication_window`); replicated tables deduplicate by themselves and get
/// the same window (`replicated_deduplication_window`, 100 by default on 18.16). A batch retried
/// after a lost answer comes back within seconds, far fewer blocks ago.
pub const DEDUPLICATION_WINDOW_BLOCKS: u32 = 1000;

/// A feature of the spec that the server is too old for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsupported {
    /// The feature and where it is used, e.g. ``DateTime64 (column `event_time`)``.
    pub what: String,
    /// The oldest release that has it.
    pub minimum: ServerVersion,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} needs ClickHouse {} or later",
            self.what, self.minimum
        )
    }
}

/// Why a statement could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DdlError {
    #[error("column `{column}`: {source}")]
    ColumnType { column: String, source: TypeError },
    #[error("the table has no columns")]
    NoColumns,
    #[error("{what} must not be empty")]
    EmptyName { what: &'static str },
    #[error(
        "engine `{engine}` is not supported: use {}, optionally Replicated and with arguments",
        SUPPORTED_ENGINES.join(", ")
    )]
    Engine { engine: String },
    #[error("{clause} expression `{expression}` {problem}")]
    Expression {
        clause: &'static str,
        expression: String,
        problem: &'static str,
    },
    #[error(
        "column `{column}`: ClickHouse refuses {type_text} by default (it is slower than the plain \
         type; servers require allow_suspicious_low_cardinality_types): use LowCardinality only \
         over String"
    )]
    SuspiciousLowCardinality { column: String, type_text: String },
    #[error("{}; server is {server}", list_unsupported(.features))]
    Unsupported {
        features: Vec<Unsupported>,
        server: ServerVersion,
    },
}

fn list_unsupported(features: &[Unsupported]) -> String {
    features
        .iter()
        .map(Unsupported::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Back-quotes an identifier, escaping what would end the quote.
pub fn quote_identifier(name: &str) -> String {
    format!("`{}`", name.replace('\\', "\\\\").replace('`', "\\`"))
}

/// `` `db`.`table` ``.
pub fn qualified_table(database: &str, table: &str) -> String {
    format!("{}.{}", quote_identifier(database), quote_identifier(table))
}

/// ` ON CLUSTER `name`` for a cluster, nothing otherwise.
pub fn on_cluster(cluster: Option<&str>) -> String {
    cluster.map_or_else(String::new, |name| {
        format!(" ON CLUSTER {}", quote_identifier(name))
    })
}

/// `CREATE DATABASE IF NOT EXISTS `db`` (` ON CLUSTER …` on a cluster).
pub fn create_database_sql(database: &str, cluster: Option<&str>) -> String {
    format!(
        "CREATE DATABASE IF NOT EXISTS {}{}",
        quote_identifier(database),
        on_cluster(cluster)
    )
}

/// `DROP TABLE IF EXISTS `db`.`table`` (` ON CLUSTER …` on a cluster).
pub fn drop_table_sql(database: &str, table: &str, cluster: Option<&str>) -> String {
    format!(
        "DROP TABLE IF EXISTS {}{}",
        qualified_table(database, table),
        on_cluster(cluster)
    )
}

/// Whether `engine` (as the spec or `system.tables` writes it) is a `Replicated…` engine.
pub fn is_replicated_engine(engine: &str) -> bool {
    engine.trim_start().starts_with(REPLICATED_PREFIX)
}

/// A replicated engine's arguments as written, split into its ZooKeeper path and replica name
/// (when the first argument is a string literal, as both the spec's explicit form and
/// `system.tables` write them) and the family's own arguments (`ver` of
/// `ReplicatedReplacingMergeTree`). `None` for an engine that is not replicated.
pub fn replication_arguments(engine: &str) -> Option<(Option<(String, String)>, String)> {
    let engine = engine.trim();
    let rest = engine.strip_prefix(REPLICATED_PREFIX)?;
    let open = rest.find('(');
    let Some(open) = open else {
        return Some((None, String::new()));
    };
    let arguments = rest[open + 1..]
        .strip_suffix(')')
        .unwrap_or(&rest[open + 1..]);
    let items = split_top_level(arguments);
    match items.as_slice() {
        [path, replica, family @ ..] if path.starts_with('\'') => Some((
            Some((path.to_string(), replica.to_string())),
            family.join(", "),
        )),
        _ => Some((None, items.join(", "))),
    }
}

/// The engine without replication: `ReplicatedReplacingMergeTree('/p', '{replica}', ver)` is
/// `ReplacingMergeTree(ver)`. What an engine stores and sorts does not depend on replication, so
/// this is what the operator's scratch tables (which must not register in ZooKeeper) are made of.
pub fn unreplicated_engine(engine: &str) -> String {
    let engine = engine.trim();
    let Some((_, family_arguments)) = replication_arguments(engine) else {
        return engine.to_string();
    };
    let rest = &engine[REPLICATED_PREFIX.len()..];
    let name: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    if family_arguments.is_empty() {
        name
    } else {
        format!("{name}({family_arguments})")
    }
}

/// Splits a comma-separated argument list at the commas outside parentheses and quotes.
fn split_top_level(arguments: &str) -> Vec<String> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (index, c) in Unquoted::new(arguments) {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                items.push(arguments[start..index].trim().to_string());
                start = index + 1;
            }
            _ => {}
        }
    }
    let last = arguments[start..].trim();
    if !last.is_empty() || !items.is_empty() {
        items.push(last.to_string());
    }
    items
}

/// The characters of SQL text that stand outside string literals and quoted names (`'…'`,
/// `` `…` ``, `"…"`, with backslash escapes), with their byte offsets. An opening quote is
/// yielded; what it quotes and its closing quote are not.
struct Unquoted<'a> {
    chars: std::str::CharIndices<'a>,
    quote: Option<char>,
    escaped: bool,
}

impl<'a> Unquoted<'a> {
    fn new(text: &'a str) -> Self {
        Unquoted {
            chars: text.char_indices(),
            quote: None,
            escaped: false,
        }
    }

    /// Whether the text read so far ends inside a quote.
    fn in_quote(&self) -> bool {
        self.quote.is_some()
    }
}

impl Iterator for Unquoted<'_> {
    type Item = (usize, char);

    fn next(&mut self) -> Option<(usize, char)> {
        for (index, c) in self.chars.by_ref() {
            match self.quote {
                Some(_) if self.escaped => self.escaped = false,
                Some(_) if c == '\\' => self.escaped = true,
                Some(q) if c == q => self.quote = None,
                Some(_) => {}
                None => {
                    if matches!(c, '\'' | '`' | '"') {
                        self.quote = Some(c);
                    }
                    return Some((index, c));
                }
            }
        }
        None
    }
}

/// A string literal for ClickHouse.
fn string_literal(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The default ZooKeeper path of `database`.`table` (see [`DEFAULT_ZOOKEEPER_PATH`]).
pub fn default_zookeeper_path(database: &str, table: &str) -> String {
    DEFAULT_ZOOKEEPER_PATH
        .replace("{database}", database)
        .replace("{table}", table)
}

/// Parses a column's type text, naming the column when it is invalid or when ClickHouse would
/// refuse it in a table.
pub fn column_type(column: &ColumnSpec) -> Result<ColumnType, DdlError> {
    let parsed = ColumnType::parse(&column.type_name).map_err(|source| DdlError::ColumnType {
        column: column.name.clone(),
        source,
    })?;
    if let Some(suspicious) = suspicious_low_cardinality(&parsed) {
        return Err(DdlError::SuspiciousLowCardinality {
            column: column.name.clone(),
            type_text: suspicious.to_string(),
        });
    }
    Ok(parsed)
}

/// Current servers refuse `LowCardinality` over fixed-size types (numbers, dates) unless
/// `allow_suspicious_low_cardinality_types` is set; only String (possibly Nullable) is worth it.
fn suspicious_low_cardinality(parsed: &ColumnType) -> Option<&ColumnType> {
    match parsed {
        ColumnType::LowCardinality(inner) => {
            let base = match inner.as_ref() {
                ColumnType::Nullable(base) => base.as_ref(),
                base => base,
            };
            (*base != ColumnType::String).then_some(parsed)
        }
        ColumnType::Nullable(inner) | ColumnType::Array(inner) | ColumnType::Map(inner) => {
            suspicious_low_cardinality(inner)
        }
        _ => None,
    }
}

/// Features of `spec` that `server` lacks, each with the release that brought it. Columns whose type
/// text does not parse are left to [`create_table_sql`], which reports them.
pub fn unsupported_features(spec: &ClickHouseSpec, server: ServerVersion) -> Vec<Unsupported> {
    let mut found = Vec::new();
    for column in &spec.columns {
        let Ok(parsed) = ColumnType::parse(&column.type_name) else {
            continue;
        };
        if let Some((minimum, feature)) = parsed.minimum_server()
            && server < minimum
        {
            found.push(Unsupported {
                what: format!("{feature} (column `{}`)", column.name),
                minimum,
            });
        }
    }
    if spec.ttl.is_some() && !server.supports_ttl() {
        found.push(Unsupported {
            what: "Table TTL".to_string(),
            minimum: ServerVersion::new(19, 6),
        });
    }
    found
}

/// The `CREATE TABLE IF NOT EXISTS` statement for `spec` on `server`.
pub fn create_table_sql(spec: &ClickHouseSpec, server: ServerVersion) -> Result<String, DdlError> {
    check_names(spec)?;
    if spec.columns.is_empty() {
        return Err(DdlError::NoColumns);
    }
    let mut column_lines = Vec::with_capacity(spec.columns.len());
    for column in &spec.columns {
        let parsed = column_type(column)?;
        column_lines.push(format!("    {} {parsed}", quote_identifier(&column.name)));
    }
    let features = unsupported_features(spec, server);
    if !features.is_empty() {
        return Err(DdlError::Unsupported { features, server });
    }

    let mut sql = format!(
        "CREATE TABLE IF NOT EXISTS {}{}\n(\n{}\n)\nENGINE = {}",
        qualified_table(&spec.database, &spec.table),
        on_cluster(spec.cluster_name()),
        column_lines.join(",\n"),
        engine_sql(spec)?
    );
    if let Some(partition) = &spec.partition_by {
        check_expression("PARTITION BY", partition)?;
        sql.push_str(&format!("\nPARTITION BY {}", partition.trim()));
    }
    sql.push_str(&format!("\nORDER BY {}", order_by_clause(spec)?));
    if let Some(ttl) = &spec.ttl {
        check_expression("TTL", ttl)?;
        sql.push_str(&format!("\nTTL {}", ttl.trim()));
    }
    if is_replicated_engine(&spec.engine) {
        sql.push_str(&format!(
            "\nSETTINGS replicated_deduplication_window = {DEDUPLICATION_WINDOW_BLOCKS}"
        ));
    } else if server.supports_insert_deduplication_token() {
        sql.push_str(&format!(
            "\nSETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW_BLOCKS}"
        ));
    }
    Ok(sql)
}

/// The `CREATE TABLE IF NOT EXISTS … ENGINE = Distributed(…)` of `spec.cluster.distributed`, with
/// the spec's columns, over the local tables; `None` when the spec has no Distributed table.
pub fn create_distributed_table_sql(spec: &ClickHouseSpec) -> Option<Result<String, DdlError>> {
    let cluster = spec.cluster.as_ref()?;
    let distributed = cluster.distributed.as_ref()?;
    Some(distributed_sql(spec, &cluster.name, distributed))
}

fn distributed_sql(
    spec: &ClickHouseSpec,
    cluster: &str,
    distributed: &crate::spec::DistributedTableSpec,
) -> Result<String, DdlError> {
    check_names(spec)?;
    if distributed.table.is_empty() {
        return Err(DdlError::EmptyName {
            what: "distributed table",
        });
    }
    let mut column_lines = Vec::with_capacity(spec.columns.len());
    for column in &spec.columns {
        let parsed = column_type(column)?;
        column_lines.push(format!("    {} {parsed}", quote_identifier(&column.name)));
    }
    let sharding_key = distributed.sharding_key.as_deref().unwrap_or("rand()");
    check_expression("sharding key", sharding_key)?;
    Ok(format!(
        "CREATE TABLE IF NOT EXISTS {}{}\n(\n{}\n)\nENGINE = Distributed({}, {}, {}, {})",
        qualified_table(&spec.database, &distributed.table),
        on_cluster(Some(cluster)),
        column_lines.join(",\n"),
        string_literal(cluster),
        string_literal(&spec.database),
        string_literal(&spec.table),
        sharding_key.trim()
    ))
}

/// `ALTER TABLE … ADD COLUMN` for one spec column (` ON CLUSTER …` on a cluster). `IF NOT EXISTS`
/// is added where the server knows it (not on 18.x), so a column added concurrently by someone
/// else is not an error there.
pub fn add_column_sql(
    database: &str,
    table: &str,
    column: &ColumnSpec,
    server: ServerVersion,
    cluster: Option<&str>,
) -> Result<String, DdlError> {
    if column.name.is_empty() {
        return Err(DdlError::EmptyName {
            what: "column name",
        });
    }
    let parsed = column_type(column)?;
    let if_not_exists = if server.supports_add_column_if_not_exists() {
        "IF NOT EXISTS "
    } else {
        ""
    };
    Ok(format!(
        "ALTER TABLE {}{} ADD COLUMN {if_not_exists}{} {parsed}",
        qualified_table(database, table),
        on_cluster(cluster),
        quote_identifier(&column.name)
    ))
}

fn check_names(spec: &ClickHouseSpec) -> Result<(), DdlError> {
    if spec.database.is_empty() {
        return Err(DdlError::EmptyName { what: "database" });
    }
    if spec.table.is_empty() {
        return Err(DdlError::EmptyName { what: "table" });
    }
    if spec.columns.iter().any(|c| c.name.is_empty()) {
        return Err(DdlError::EmptyName {
            what: "column name",
        });
    }
    Ok(())
}

/// The spec's `ENGINE` as `CREATE TABLE` writes it: `MergeTree()`, `ReplacingMergeTree(version)` or
/// `ReplicatedMergeTree('/path', '{replica}')`: a supported engine name with balanced arguments; a
/// replicated one without a ZooKeeper path gets the default path and replica name in front of its
/// own arguments.
pub fn engine_sql(spec: &ClickHouseSpec) -> Result<String, DdlError> {
    let clause = plain_engine_clause(&spec.engine)?;
    match replication_arguments(&clause) {
        Some((None, family_arguments)) => {
            let name = &clause[..clause.find('(').unwrap_or(clause.len())];
            let mut arguments = vec![
                string_literal(&default_zookeeper_path(&spec.database, &spec.table)),
                string_literal(DEFAULT_REPLICA_NAME),
            ];
            if !family_arguments.is_empty() {
                arguments.push(family_arguments);
            }
            Ok(format!("{name}({})", arguments.join(", ")))
        }
        _ => Ok(clause),
    }
}

/// The engine name checked against [`SUPPORTED_ENGINES`] (with or without `Replicated`) and its
/// arguments checked to be one balanced expression list.
fn plain_engine_clause(engine: &str) -> Result<String, DdlError> {
    let engine = engine.trim();
    let refuse = || DdlError::Engine {
        engine: engine.to_string(),
    };
    let name_len = engine
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
        .count();
    let (name, rest) = engine.split_at(name_len);
    let name = if name.is_empty() && rest.is_empty() {
        "MergeTree"
    } else {
        name
    };
    let family = name.strip_prefix(REPLICATED_PREFIX).unwrap_or(name);
    if !SUPPORTED_ENGINES.contains(&family) {
        return Err(refuse());
    }
    let rest = rest.trim();
    if rest.is_empty() {
        return Ok(format!("{name}()"));
    }
    let arguments = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(refuse)?;
    check_expression("ENGINE", arguments).map_err(|_| refuse())?;
    Ok(format!("{name}({})", arguments.trim()))
}

/// One ORDER BY item is written bare, several as a tuple, none as `tuple()`. Items that name a
/// column are quoted; anything else is an expression and kept as written.
fn order_by_clause(spec: &ClickHouseSpec) -> Result<String, DdlError> {
    let mut items = Vec::with_capacity(spec.order_by.len());
    for item in &spec.order_by {
        check_expression("ORDER BY", item)?;
        let item = item.trim();
        if spec.columns.iter().any(|c| c.name == item) {
            items.push(quote_identifier(item));
        } else {
            items.push(item.to_string());
        }
    }
    Ok(match items.len() {
        0 => "tuple()".to_string(),
        1 => items.remove(0),
        _ => format!("({})", items.join(", ")),
    })
}

/// Refuses expressions that would end or comment out the statement: they are user text pasted
/// into DDL, so they must stay one balanced expression.
fn check_expression(clause: &'static str, expression: &str) -> Result<(), DdlError> {
    let fail = |problem: &'static str| DdlError::Expression {
        clause,
        expression: expression.to_string(),
        problem,
    };
    if expression.trim().is_empty() {
        return Err(fail("is empty"));
    }
    let mut depth: i32 = 0;
    let mut previous = ' ';
    let mut scan = Unquoted::new(expression);
    for (_, c) in scan.by_ref() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(fail("has an unmatched `)`"));
                }
            }
            ';' => return Err(fail("must not contain `;`")),
            '-' if previous == '-' => return Err(fail("must not contain a comment")),
            '*' if previous == '/' => return Err(fail("must not contain a comment")),
            _ => {}
        }
        previous = c;
    }
    if scan.in_quote() {
        return Err(fail("has an unterminated quote"));
    }
    if depth != 0 {
        return Err(fail("has an unmatched `(`"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_text_is_skipped_with_its_escapes_and_split_only_at_top_level_commas() {
        let outside: String = Unquoted::new(r#"f('a,\')', `b"c`) , "d" x"#)
            .map(|(_, c)| c)
            .collect();
        assert_eq!(outside, r#"f(', `) , " x"#);
        let mut open = Unquoted::new("g('still open");
        open.by_ref().for_each(drop);
        assert!(open.in_quote());
        assert_eq!(
            split_top_level(r#"'/p/{shard}', '{replica}', tuple(a, b), 'x,y'"#),
            ["'/p/{shard}'", "'{replica}'", "tuple(a, b)", "'x,y'"]
        );
        assert!(split_top_level("  ").is_empty());
    }

    fn spec(columns: Vec<ColumnSpec>) -> ClickHouseSpec {
        ClickHouseSpec {
            url: "http://localhost:8123".to_string(),
            database: "risksignal".to_string(),
            table: "transaction_signals".to_string(),
            auth: None,
            tls: None,
            engine: "MergeTree".to_string(),
            partition_by: None,
            order_by: Vec::new(),
            ttl: None,
            columns,
            cluster: None,
        }
    }

    const OLD: ServerVersion = ServerVersion::new(18, 16);
    const CURRENT: ServerVersion = ServerVersion::new(24, 8);

    #[test]
    fn writes_a_full_create_table_statement() {
        let mut table = spec(vec![
            ColumnSpec::from_field("event_time", "DateTime64(3, 'UTC')"),
            ColumnSpec::from_field("wallet", "LowCardinality(String)"),
            ColumnSpec::from_field("amount", "Decimal( 18 ,4 )"),
        ]);
        table.engine = "ReplacingMergeTree(event_time)".to_string();
        table.partition_by = Some("toYYYYMM(event_time)".to_string());
        table.order_by = vec!["wallet".to_string(), "toDate(event_time)".to_string()];
        table.ttl = Some("toDateTime(event_time) + INTERVAL 90 DAY".to_string());
        let sql = create_table_sql(&table, CURRENT).unwrap();
        assert_eq!(
            sql,
            "CREATE TABLE IF NOT EXISTS `risksignal`.`transaction_signals`\n(\n    \
             `event_time` DateTime64(3, 'UTC'),\n    `wallet` LowCardinality(String),\n    \
             `amount` Decimal(18, 4)\n)\nENGINE = ReplacingMergeTree(event_time)\n\
             PARTITION BY toYYYYMM(event_time)\nORDER BY (`wallet`, toDate(event_time))\n\
             TTL toDateTime(event_time) + INTERVAL 90 DAY\n\
             SETTINGS non_replicated_deduplication_window = 1000"
        );
    }

    #[test]
    fn orders_by_tuple_when_no_key_and_defaults_the_engine() {
        let mut table = spec(vec![ColumnSpec::from_field("id", "UInt64")]);
        table.engine = String::new();
        let sql = create_table_sql(&table, OLD).unwrap();
        assert!(
            sql.ends_with("ENGINE = MergeTree()\nORDER BY tuple()"),
            "{sql}"
        );
        table.order_by = vec!["id".to_string()];
        assert!(
            create_table_sql(&table, OLD)
                .unwrap()
                .ends_with("ORDER BY `id`")
        );
    }

    #[test]
    fn quotes_identifiers_that_would_break_out() {
        assert_eq!(quote_identifier("we`ird"), "`we\\`ird`");
        assert_eq!(
            create_database_sql("db`; DROP", None),
            "CREATE DATABASE IF NOT EXISTS `db\\`; DROP`"
        );
        assert_eq!(
            drop_table_sql("d", "t", None),
            "DROP TABLE IF EXISTS `d`.`t`"
        );
    }

    #[test]
    fn add_column_uses_if_not_exists_only_where_the_server_has_it() {
        let severity = ColumnSpec::from_field("severity", "UInt8");
        assert_eq!(
            add_column_sql("risksignal", "transaction_signals", &severity, OLD, None).unwrap(),
            "ALTER TABLE `risksignal`.`transaction_signals` ADD COLUMN `severity` UInt8"
        );
        assert_eq!(
            add_column_sql(
                "risksignal",
                "transaction_signals",
                &severity,
                CURRENT,
                None
            )
            .unwrap(),
            "ALTER TABLE `risksignal`.`transaction_signals` ADD COLUMN IF NOT EXISTS `severity` UInt8"
        );
        let bad = ColumnSpec::from_field("x", "Int33");
        assert!(matches!(
            add_column_sql("d", "t", &bad, CURRENT, None),
            Err(DdlError::ColumnType { .. })
        ));
    }

    #[test]
    fn lists_what_an_old_server_lacks_with_the_minimum_version() {
        let mut table = spec(vec![
            ColumnSpec::from_field("id", "UInt64"),
            ColumnSpec::from_field("event_time", "DateTime64(3)"),
            ColumnSpec::from_field("tags", "Map(String, String)"),
            ColumnSpec::from_field("wallet", "LowCardinality(String)"),
            ColumnSpec::from_field("flag", "Nullable(Bool)"),
        ]);
        table.ttl = Some("toDateTime(event_time) + INTERVAL 1 DAY".to_string());
        let found = unsupported_features(&table, OLD);
        let text: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "DateTime64 (column `event_time`) needs ClickHouse 20.1 or later",
                "Map (column `tags`) needs ClickHouse 21.8 or later",
                "LowCardinality (column `wallet`) needs ClickHouse 19.0 or later",
                "Bool (column `flag`) needs ClickHouse 21.12 or later",
                "Table TTL needs ClickHouse 19.6 or later",
            ]
        );
        assert!(unsupported_features(&table, CURRENT).is_empty());
        let err = create_table_sql(&table, OLD).unwrap_err().to_string();
        assert!(
            err.starts_with("DateTime64 (column `event_time`) needs ClickHouse 20.1 or later;")
                && err.ends_with("; server is 18.16"),
            "{err}"
        );
        // 19.6 has TTL and LowCardinality but still lacks DateTime64.
        let middle = unsupported_features(&table, ServerVersion::new(19, 6));
        assert_eq!(middle.len(), 3);
    }

    #[test]
    fn refuses_bad_engines_types_and_expressions() {
        let mut table = spec(vec![ColumnSpec::from_field("id", "UInt64")]);
        table.engine = "Log".to_string();
        assert!(matches!(
            create_table_sql(&table, CURRENT),
            Err(DdlError::Engine { .. })
        ));
        table.engine = "MergeTree) ; DROP TABLE x; (".to_string();
        assert!(create_table_sql(&table, CURRENT).is_err());
        table.engine = "MergeTree".to_string();

        table.partition_by = Some("toYYYYMM(ts); DROP TABLE x".to_string());
        let err = create_table_sql(&table, CURRENT).unwrap_err().to_string();
        assert!(err.contains("must not contain `;`"), "{err}");
        table.partition_by = Some("toYYYYMM(ts".to_string());
        assert!(
            create_table_sql(&table, CURRENT)
                .unwrap_err()
                .to_string()
                .contains("unmatched `(`")
        );
        table.partition_by = Some("x -- comment".to_string());
        assert!(create_table_sql(&table, CURRENT).is_err());
        // A `;` inside a string literal is data, not a statement end.
        table.partition_by = Some("concat(id, ';')".to_string());
        assert!(create_table_sql(&table, CURRENT).is_ok());

        let suspicious = spec(vec![ColumnSpec::from_field(
            "n",
            "Array(LowCardinality(Nullable(UInt32)))",
        )]);
        let err = create_table_sql(&suspicious, CURRENT)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refuses LowCardinality(Nullable(UInt32))"),
            "{err}"
        );

        let bad = spec(vec![ColumnSpec::from_field("id", "Int33")]);
        let err = create_table_sql(&bad, CURRENT).unwrap_err().to_string();
        assert!(
            err.starts_with("column `id`: invalid column type `Int33`"),
            "{err}"
        );
        assert_eq!(
            create_table_sql(&spec(Vec::new()), CURRENT),
            Err(DdlError::NoColumns)
        );
    }

    fn cluster_spec(engine: &str) -> ClickHouseSpec {
        let mut table = spec(vec![
            ColumnSpec::from_field("id", "UInt64"),
            ColumnSpec::from_field("seen_at", "DateTime"),
        ]);
        table.engine = engine.to_string();
        table.order_by = vec!["id".to_string()];
        table.cluster = Some(crate::spec::ClickHouseClusterSpec {
            name: "signals".to_string(),
            distributed: Some(crate::spec::DistributedTableSpec {
                table: "transaction_signals_all".to_string(),
                sharding_key: Some("cityHash64(id)".to_string()),
            }),
            ..Default::default()
        });
        table
    }

    #[test]
    fn replicated_engines_get_the_default_path_and_every_statement_runs_on_the_cluster() {
        let table = cluster_spec("ReplicatedReplacingMergeTree(seen_at)");
        let sql = create_table_sql(&table, OLD).unwrap();
        assert_eq!(
            sql,
            "CREATE TABLE IF NOT EXISTS `risksignal`.`transaction_signals` ON CLUSTER `signals`\n\
             (\n    `id` UInt64,\n    `seen_at` DateTime\n)\nENGINE = ReplicatedReplacingMergeTree(\
             '/clickhouse/tables/{shard}/risksignal.transaction_signals', '{replica}', seen_at)\n\
             ORDER BY `id`\nSETTINGS replicated_deduplication_window = 1000"
        );
        // Current servers get the same explicit arguments and no non-replicated window.
        assert_eq!(create_table_sql(&table, CURRENT).unwrap(), sql);

        let bare = cluster_spec("ReplicatedMergeTree");
        assert!(create_table_sql(&bare, OLD).unwrap().contains(
            "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/risksignal.\
                 transaction_signals', '{replica}')\n"
        ));
        // An explicit path and replica are kept as written.
        let explicit = cluster_spec("ReplicatedMergeTree('/ch/{shard}/tx', '{replica}')");
        assert!(
            create_table_sql(&explicit, OLD)
                .unwrap()
                .contains("ENGINE = ReplicatedMergeTree('/ch/{shard}/tx', '{replica}')\n")
        );

        assert_eq!(
            create_database_sql("risksignal", table.cluster_name()),
            "CREATE DATABASE IF NOT EXISTS `risksignal` ON CLUSTER `signals`"
        );
        assert_eq!(
            drop_table_sql("risksignal", "t", table.cluster_name()),
            "DROP TABLE IF EXISTS `risksignal`.`t` ON CLUSTER `signals`"
        );
        let added = ColumnSpec::from_field("severity", "UInt8");
        assert_eq!(
            add_column_sql("risksignal", "t", &added, OLD, table.cluster_name()).unwrap(),
            "ALTER TABLE `risksignal`.`t` ON CLUSTER `signals` ADD COLUMN `severity` UInt8"
        );
        assert_eq!(
            create_distributed_table_sql(&table).unwrap().unwrap(),
            "CREATE TABLE IF NOT EXISTS `risksignal`.`transaction_signals_all` ON CLUSTER \
             `signals`\n(\n    `id` UInt64,\n    `seen_at` DateTime\n)\nENGINE = \
             Distributed('signals', 'risksignal', 'transaction_signals', cityHash64(id))"
        );
        assert!(create_distributed_table_sql(&spec(Vec::new())).is_none());

        let mut unknown = cluster_spec("ReplicatedLog");
        assert!(matches!(
            create_table_sql(&unknown, OLD),
            Err(DdlError::Engine { .. })
        ));
        unknown.engine = "ReplicatedAggregatingMergeTree".to_string();
        assert!(create_table_sql(&unknown, OLD).is_err());
    }

    #[test]
    fn replication_is_stripped_for_scratch_tables_and_read_back_from_system_tables() {
        assert_eq!(
            unreplicated_engine(
                "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/d.t', '{replica}', ver)"
            ),
            "ReplacingMergeTree(ver)"
        );
        assert_eq!(unreplicated_engine("ReplicatedMergeTree"), "MergeTree");
        assert_eq!(
            unreplicated_engine("ReplicatedCollapsingMergeTree(sign)"),
            "CollapsingMergeTree(sign)"
        );
        assert_eq!(unreplicated_engine("MergeTree()"), "MergeTree()");
        assert_eq!(
            replication_arguments("ReplicatedMergeTree('/a,b', '{replica}')"),
            Some((
                Some(("'/a,b'".to_string(), "'{replica}'".to_string())),
                String::new()
            ))
        );
        assert_eq!(replication_arguments("MergeTree"), None);
        assert!(is_replicated_engine(" ReplicatedMergeTree") && !is_replicated_engine("MergeTree"));
    }
}
