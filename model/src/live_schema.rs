//! Whether the worker may write a live table: its column types, as `system.columns` reports them,
//! compared with the manifest's at the level of RowBinary bytes.
//!
//! A RowBinary insert carries no types, so a column retyped to another of the same width
//! (Int32 ↔ UInt32, Float64 ↔ Int64, DateTime ↔ UInt32) accepts the bytes and stores wrong
//! values. The worker compares before writing and refuses any column whose wire form differs;
//! differences that leave the bytes alone (a time zone, `LowCardinality`) are fine.

use crate::column_type::ColumnType;
use crate::spec::ColumnSpec;

/// A spec column the worker must not write as the table stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireMismatch {
    pub column: String,
    /// The live type as the server prints it; `None` when the table lacks the column.
    pub live: Option<String>,
    pub wanted: String,
}

impl std::fmt::Display for WireMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.live {
            Some(live) => write!(
                f,
                "column {}: table has {live}, the manifest writes {}",
                self.column, self.wanted
            ),
            None => write!(
                f,
                "column {}: not in the table, the manifest writes {}",
                self.column, self.wanted
            ),
        }
    }
}

impl ColumnType {
    /// The type as RowBinary sees it: time zones and `LowCardinality` do not change the bytes.
    pub fn wire_form(&self) -> ColumnType {
        match self {
            ColumnType::DateTime { .. } => ColumnType::DateTime { timezone: None },
            ColumnType::DateTime64 { precision, .. } => ColumnType::DateTime64 {
                precision: *precision,
                timezone: None,
            },
            ColumnType::LowCardinality(inner) => inner.wire_form(),
            ColumnType::Nullable(inner) => ColumnType::Nullable(Box::new(inner.wire_form())),
            ColumnType::Array(inner) => ColumnType::Array(Box::new(inner.wire_form())),
            ColumnType::Map(inner) => ColumnType::Map(Box::new(inner.wire_form())),
            other => other.clone(),
        }
    }
}

/// The spec columns whose values the live table would store differently from what the worker
/// sends. `live` is (name, type text) per table column; extra table columns are fine (the server
/// fills their defaults). Spec columns whose type does not parse are skipped (validated before).
pub fn wire_mismatches(
    spec_columns: &[ColumnSpec],
    live: &[(String, String)],
) -> Vec<WireMismatch> {
    let mut mismatches = Vec::new();
    for column in spec_columns {
        let Ok(wanted) = ColumnType::parse(&column.type_name) else {
            continue;
        };
        let live_text = live
            .iter()
            .find(|(name, _)| *name == column.name)
            .map(|(_, text)| text.clone());
        let same = live_text
            .as_deref()
            .and_then(|text| ColumnType::parse(text).ok())
            .is_some_and(|live_type| live_type.wire_form() == wanted.wire_form());
        if !same {
            mismatches.push(WireMismatch {
                column: column.name.clone(),
                live: live_text,
                wanted: wanted.to_string(),
            });
        }
    }
    mismatches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn same_width_retypes_are_mismatches_both_ways() {
        for (spec_type, live_type) in [
            ("Int32", "UInt32"),
            ("UInt32", "Int32"),
            ("Float64", "Int64"),
            ("Int64", "Float64"),
            ("DateTime", "UInt32"),
            ("UInt32", "DateTime"),
        ] {
            let spec = [ColumnSpec::new("v", spec_type, "$.v")];
            let found = wire_mismatches(&spec, &live(&[("v", live_type)]));
            assert_eq!(found.len(), 1, "{spec_type} vs {live_type}");
            assert_eq!(found[0].live.as_deref(), Some(live_type));
            assert!(found[0].to_string().contains(live_type), "{}", found[0]);
        }
    }

    #[test]
    fn spelling_time_zones_and_extra_columns_are_no_mismatch_but_a_missing_column_is() {
        let spec = [
            ColumnSpec::new("amount", "Decimal(18,4)", "$.a"),
            ColumnSpec::new("at", "DateTime", "$.t"),
            ColumnSpec::new("who", "LowCardinality(String)", "$.w"),
        ];
        let table = live(&[
            ("amount", "Decimal(18, 4)"),
            ("at", "DateTime('UTC')"),
            ("who", "String"),
            ("extra", "UInt8"),
        ]);
        assert!(wire_mismatches(&spec, &table).is_empty());
        let found = wire_mismatches(&spec, &table[..2]);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].column.as_str(), found[0].live.as_ref()),
            ("who", None)
        );
        // A type the worker cannot encode (Enum8) never matches.
        let enum_table = live(&[("who", "Enum8('a' = 1)")]);
        assert_eq!(wire_mismatches(&spec[2..], &enum_table).len(), 1);
    }
}
