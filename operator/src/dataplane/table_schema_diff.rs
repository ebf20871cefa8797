//! How a live ClickHouse table differs from the spec, and which differences stop the workers.
//!
//! Columns are compared here; the engine, `PARTITION BY`, `ORDER BY` and `TTL` in
//! [`super::table_clause_diff`], and both end up in one [`SchemaDiff`] and one drift message.
//! Types are compared parsed, never as text: servers print their own normal form
//! (`Decimal(18, 4)`, `DateTime64(3)`). The operator only ever adds columns; everything else it
//! finds is reported as drift for a person to resolve. Drift blocks the workers only when a
//! column's values would be encoded differently on the wire: a time zone or `LowCardinality`
//! wrapper changes how ClickHouse stores or shows a value, not the RowBinary bytes a worker sends,
//! and a table clause changes how rows are stored, not what a worker sends.

use signal_model::{ColumnSpec, ColumnType};

use super::table_clause_diff::ClauseMismatch;

/// A column as `system.columns` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveColumn {
    pub name: String,
    pub type_text: String,
}

/// A column whose live type differs from the spec's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeMismatch {
    pub column: String,
    pub live: String,
    pub wanted: String,
    /// The worker's rows for the spec type would not decode as the live type.
    pub blocks_writes: bool,
}

/// Differences between a live table and the spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchemaDiff {
    /// Spec columns the table lacks; the operator adds these.
    pub missing: Vec<ColumnSpec>,
    /// Columns in both whose types differ; never changed by the operator.
    pub type_mismatches: Vec<TypeMismatch>,
    /// Table columns the spec does not name; left alone (ClickHouse fills their defaults).
    pub unknown_columns: Vec<LiveColumn>,
    /// Engine, `PARTITION BY`, `ORDER BY` or `TTL` differences; changing one means rebuilding the
    /// table, which the operator never does.
    pub clause_mismatches: Vec<ClauseMismatch>,
    /// Why the clauses could not be compared (the server refused the scratch table the
    /// comparison needs, see [`super::table_scratch`]); a note, never a blocker.
    pub clauses_not_compared: Option<String>,
}

impl SchemaDiff {
    /// The workers cannot write this table until a person resolves a type difference. Clause
    /// differences never block.
    pub fn blocks_writes(&self) -> bool {
        self.type_mismatches.iter().any(|m| m.blocks_writes)
    }

    /// The drift a person should know about, or `None` when the table only lacks spec columns.
    /// Column differences come first, then clause differences, joined by `; `.
    pub fn drift_message(&self) -> Option<String> {
        let mut parts: Vec<String> = self
            .type_mismatches
            .iter()
            .map(|m| {
                format!(
                    "column {}: table has {}, spec wants {}{}",
                    m.column,
                    m.live,
                    m.wanted,
                    if m.blocks_writes {
                        " (workers cannot write it)"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        parts.extend(self.unknown_columns.iter().map(|c| {
            format!(
                "column {} ({}) is in the table but not in the spec",
                c.name, c.type_text
            )
        }));
        parts.extend(self.clause_mismatches.iter().map(ToString::to_string));
        parts.extend(self.clauses_not_compared.iter().map(|reason| {
            format!("ENGINE, PARTITION BY, ORDER BY and TTL were not compared: {reason}")
        }));
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// Compares the spec's columns with the live ones, leaving `clause_mismatches` for
/// [`super::table_clause_diff::diff_clauses`]. Spec columns whose type does not parse are skipped
/// (the spec is reported invalid before this is called).
pub fn diff_schema(spec_columns: &[ColumnSpec], live: &[LiveColumn]) -> SchemaDiff {
    let mut diff = SchemaDiff::default();
    for column in spec_columns {
        let Ok(wanted) = ColumnType::parse(&column.type_name) else {
            continue;
        };
        let Some(found) = live.iter().find(|l| l.name == column.name) else {
            diff.missing.push(column.clone());
            continue;
        };
        match ColumnType::parse(&found.type_text) {
            Ok(live_type) if live_type == wanted => {}
            Ok(live_type) => diff.type_mismatches.push(TypeMismatch {
                column: column.name.clone(),
                live: found.type_text.clone(),
                wanted: wanted.to_string(),
                blocks_writes: live_type.wire_form() != wanted.wire_form(),
            }),
            // A type the worker cannot encode at all (Enum8, FixedString, …).
            Err(_) => diff.type_mismatches.push(TypeMismatch {
                column: column.name.clone(),
                live: found.type_text.clone(),
                wanted: wanted.to_string(),
                blocks_writes: true,
            }),
        }
    }
    diff.unknown_columns = live
        .iter()
        .filter(|l| !spec_columns.iter().any(|c| c.name == l.name))
        .cloned()
        .collect();
    diff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_column(name: &str, type_name: &str) -> ColumnSpec {
        ColumnSpec {
            name: name.to_string(),
            type_name: type_name.to_string(),
            from: format!("$.{name}"),
            default: None,
        }
    }

    fn live(name: &str, type_text: &str) -> LiveColumn {
        LiveColumn {
            name: name.to_string(),
            type_text: type_text.to_string(),
        }
    }

    #[test]
    fn the_servers_spelling_of_a_type_is_no_difference() {
        let diff = diff_schema(
            &[
                spec_column("amount", "Decimal(18,4)"),
                spec_column("at", "DateTime64( 3 )"),
                spec_column("who", "LowCardinality(String)"),
            ],
            &[
                live("amount", "Decimal(18, 4)"),
                live("at", "DateTime64(3)"),
                live("who", "LowCardinality(String)"),
            ],
        );
        assert_eq!(diff, SchemaDiff::default());
        assert_eq!(diff.drift_message(), None);
    }

    #[test]
    fn finds_missing_columns_to_add() {
        let diff = diff_schema(
            &[
                spec_column("id", "UInt64"),
                spec_column("severity", "UInt8"),
            ],
            &[live("id", "UInt64")],
        );
        assert_eq!(diff.missing.len(), 1);
        assert_eq!(diff.missing[0].name, "severity");
        assert!(!diff.blocks_writes());
        assert_eq!(diff.drift_message(), None);
    }

    #[test]
    fn a_changed_type_blocks_writes_and_is_described() {
        let diff = diff_schema(
            &[spec_column("amount", "Int64"), spec_column("id", "UInt64")],
            &[
                live("amount", "Int32"),
                live("id", "UInt64"),
                live("legacy", "String"),
            ],
        );
        assert!(diff.blocks_writes());
        assert_eq!(
            diff.drift_message().unwrap(),
            "column amount: table has Int32, spec wants Int64 (workers cannot write it); \
             column legacy (String) is in the table but not in the spec"
        );
    }

    #[test]
    fn a_wrapper_that_keeps_the_bytes_is_drift_without_blocking() {
        let diff = diff_schema(
            &[
                spec_column("who", "String"),
                spec_column("at", "DateTime"),
                spec_column("maybe", "Int32"),
            ],
            &[
                live("who", "LowCardinality(String)"),
                live("at", "DateTime('UTC')"),
                live("maybe", "Nullable(Int32)"),
            ],
        );
        let blocking: Vec<(&str, bool)> = diff
            .type_mismatches
            .iter()
            .map(|m| (m.column.as_str(), m.blocks_writes))
            .collect();
        assert_eq!(blocking, [("who", false), ("at", false), ("maybe", true)]);
    }

    #[test]
    fn a_live_type_the_worker_cannot_encode_blocks() {
        let diff = diff_schema(
            &[spec_column("kind", "String")],
            &[live("kind", "Enum8('a' = 1, 'b' = 2)")],
        );
        assert!(diff.blocks_writes());
    }

    #[test]
    fn a_clause_difference_is_drift_that_never_blocks_writes() {
        use crate::dataplane::table_clause_diff::TableClause;
        let mut diff = diff_schema(
            &[spec_column("id", "UInt64")],
            &[live("id", "UInt64"), live("legacy", "String")],
        );
        diff.clause_mismatches.push(ClauseMismatch {
            clause: TableClause::OrderBy,
            live: "id".to_string(),
            wanted: "(id, at)".to_string(),
        });
        assert!(!diff.blocks_writes());
        let message = diff.drift_message().unwrap();
        assert!(
            message.starts_with(
                "column legacy (String) is in the table but not in the spec; ORDER BY: table has \
                 id, spec wants (id, at) (the table was left as is"
            ),
            "{message}"
        );
    }

    #[test]
    fn clauses_that_could_not_be_compared_are_a_note_that_never_blocks_writes() {
        let mut diff = diff_schema(&[spec_column("id", "UInt64")], &[live("id", "UInt64")]);
        diff.clauses_not_compared = Some("ClickHouse refused `CREATE TABLE …`: denied".to_string());
        assert!(!diff.blocks_writes());
        assert_eq!(
            diff.drift_message().as_deref(),
            Some(
                "ENGINE, PARTITION BY, ORDER BY and TTL were not compared: ClickHouse refused \
                 `CREATE TABLE …`: denied"
            )
        );
    }
}
