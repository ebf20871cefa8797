//! Every column type the worker encodes, checked against what ClickHouse 18.16 actually stores.
//!
//! The server is old: `Bool`, `DateTime64`, `Map` and `LowCardinality` (without an experimental
//! setting) do not exist there. The last test confirms the server refuses exactly those and that
//! the DDL reports them as unsupported rather than sending them; their RowBinary encoding is
//! covered by the unit tests in `model/src/row_encoder/`.

mod common;

use std::time::Duration;

use common::{CLICKHOUSE_VERSION, TestEnv, wait_for};
use signal_model::{ClickHouseSpec, ColumnSpec, ddl};

/// (column, type, source, value in the test message as JSON, what ClickHouse prints in TSV).
const CASES: &[(&str, &str, &str, &str, &str)] = &[
    ("s", "String", "$.s", r#""tab\there é""#, r"tab\there é"),
    ("i8", "Int8", "$.i8", "-128", "-128"),
    ("i16", "Int16", "$.i16", "-32768", "-32768"),
    (
        "i32_quoted",
        "Int32",
        "$.i32",
        r#""2147483647""#,
        "2147483647",
    ),
    (
        "i64",
        "Int64",
        "$.i64",
        "-9223372036854775808",
        "-9223372036854775808",
    ),
    ("u8", "UInt8", "$.u8", "255", "255"),
    ("u16", "UInt16", "$.u16", "65535", "65535"),
    ("u32", "UInt32", "$.u32", "4294967295", "4294967295"),
    (
        "u64",
        "UInt64",
        "$.u64",
        "18446744073709551615",
        "18446744073709551615",
    ),
    ("f32", "Float32", "$.f32", "1.5", "1.5"),
    ("f64", "Float64", "$.f64", "-0.00225", "-0.00225"),
    (
        "d9",
        "Decimal(9, 2)",
        "$.d9",
        r#""-1234567.891""#,
        "-1234567.89",
    ),
    ("d18_number", "Decimal(18, 4)", "$.d18", "3.25", "3.2500"),
    (
        "d38",
        "Decimal(38, 10)",
        "$.d38",
        r#""-1234567890123456789012345678.0123456789""#,
        "-1234567890123456789012345678.0123456789",
    ),
    // A JSON number, not text: every digit kept (through f64 it would be 12345678901234567168).
    (
        "d38_number",
        "Decimal(38, 18)",
        "$.d38n",
        "12345678901234567890.123456789012345678",
        "12345678901234567890.123456789012345678",
    ),
    ("date", "Date", "$.date", r#""2026-03-04""#, "2026-03-04"),
    (
        "dt_rfc3339",
        "DateTime",
        "$.dt",
        r#""2026-03-04T05:06:07Z""#,
        "2026-03-04 05:06:07",
    ),
    (
        "dt_offset",
        "DateTime",
        "$.dt_offset",
        r#""2026-03-04T07:06:07+02:00""#,
        "2026-03-04 05:06:07",
    ),
    (
        "dt_epoch_s",
        "DateTime",
        "$.epoch_s",
        "1767225600",
        "2026-01-01 00:00:00",
    ),
    (
        "dt_epoch_ms",
        "DateTime",
        "$.epoch_ms",
        "1767225601123",
        "2026-01-01 00:00:01",
    ),
    (
        "dt_epoch_us",
        "DateTime",
        "$.epoch_us",
        "1767225602123456",
        "2026-01-01 00:00:02",
    ),
    (
        "dt_epoch_ns",
        "DateTime",
        "$.epoch_ns",
        "1767225603123456789",
        "2026-01-01 00:00:03",
    ),
    ("date_epoch_ms", "Date", "$.epoch_ms", "", "2026-01-01"),
    (
        "uuid",
        "UUID",
        "$.uuid",
        r#""00112233-4455-6677-8899-aabbccddeeff""#,
        "00112233-4455-6677-8899-aabbccddeeff",
    ),
    ("null_string", "Nullable(String)", "$.null", "null", r"\N"),
    ("missing_int", "Nullable(Int32)", "$.absent", "null", r"\N"),
    ("present_int", "Nullable(Int32)", "$.i32", "", "2147483647"),
    (
        "strings",
        "Array(String)",
        "$.strings",
        r#"["a","b'c"]"#,
        r"['a','b\'c']",
    ),
    (
        "nullable_items",
        "Array(Nullable(UInt8))",
        "$.nullable_items",
        "[1,null,3]",
        "[1,NULL,3]",
    ),
    (
        "nested_arrays",
        "Array(Array(Int16))",
        "$.nested_arrays",
        "[[1,-2],[]]",
        "[[1,-2],[]]",
    ),
    (
        "object_as_text",
        "String",
        "$.obj",
        r#"{"inner":[10,20]}"#,
        r#"{"inner":[10,20]}"#,
    ),
    ("path_index", "UInt8", "$.obj.inner[1]", "", "20"),
    ("quoted_key", "Int8", "$['i8']", "", "-128"),
    ("subject", "String", "@subject", "", "types.one"),
    ("sequence", "UInt64", "@sequence", "", "1"),
    ("header", "String", "@header:Trace-Id", "", "trace-123"),
];

fn columns() -> Vec<ColumnSpec> {
    let mut columns: Vec<ColumnSpec> = CASES
        .iter()
        .map(|(name, ty, from, _, _)| ColumnSpec::new(*name, *ty, *from))
        .collect();
    columns.push(ColumnSpec::new("defaulted", "UInt16", "$.absent").with_default("42"));
    columns.push(ColumnSpec::new("defaulted_text", "String", "$.absent").with_default("unknown"));
    columns.push(ColumnSpec::new("defaulted_null", "Float64", "$.null").with_default("0.5"));
    columns.push(ColumnSpec::new("stored_at", "DateTime", "@timestamp"));
    columns
}

fn message() -> String {
    let fields: Vec<String> = CASES
        .iter()
        .filter(|(_, _, from, json, _)| !json.is_empty() && *from != "$.absent")
        .map(|(_, _, from, json, _)| {
            let key = from.trim_start_matches("$.");
            format!("\"{key}\":{json}")
        })
        .collect();
    format!("{{{}}}", fields.join(","))
}

#[test]
fn every_supported_type_is_stored_as_clickhouse_prints_it() {
    let env = TestEnv::start();
    let manifest = env.manifest("types", columns());
    env.provision(&manifest);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Trace-Id", "trace-123");
    let payload = message();
    let before = std::time::SystemTime::now();
    env.publish_with_headers("types.one", headers, payload.as_bytes());
    let worker = env.start_worker(&manifest);
    wait_for("the row", Duration::from_secs(30), || {
        env.row_count(&manifest) == 1
    });
    worker.stop(&env).expect("clean stop");

    let names: Vec<&str> = CASES.iter().map(|(name, ..)| *name).collect();
    let stored = env.query(&format!(
        "SELECT {} FROM signal_test.types FORMAT TSV",
        names.join(", ")
    ));
    let stored: Vec<&str> = stored.split('\t').collect();
    assert_eq!(stored.len(), CASES.len(), "{stored:?}");
    let mismatches: Vec<String> = CASES
        .iter()
        .zip(&stored)
        .filter(|((.., expected), actual)| expected != *actual)
        .map(|((name, ty, ..), actual)| {
            let expected = CASES.iter().find(|c| c.0 == *name).map_or("", |c| c.4);
            format!("{name} {ty}: stored {actual:?}, expected {expected:?}")
        })
        .collect();
    assert!(
        mismatches.is_empty(),
        "message {payload}\n{}",
        mismatches.join("\n")
    );

    assert_eq!(
        env.query(
            "SELECT defaulted, defaulted_text, defaulted_null FROM signal_test.types FORMAT TSV"
        ),
        "42\tunknown\t0.5"
    );
    // @timestamp is the stream's receive time: between publishing and now.
    let stored_at: u64 = env
        .query("SELECT toUnixTimestamp(stored_at) FROM signal_test.types")
        .parse()
        .expect("a number");
    let published = before
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    assert!(
        (published..=published + 60).contains(&stored_at),
        "{stored_at} vs {published}"
    );
}

#[test]
fn types_newer_than_the_server_are_refused_by_both_the_server_and_the_ddl() {
    let env = TestEnv::start();
    for (index, type_name) in [
        "Bool",
        "DateTime64(3)",
        "Map(String, UInt8)",
        "LowCardinality(String)",
    ]
    .into_iter()
    .enumerate()
    {
        let sql = format!(
            "CREATE TABLE signal_test.too_new_{index} (c {type_name}) ENGINE = MergeTree() ORDER BY tuple()"
        );
        assert!(
            env.clickhouse.query(&sql).is_err(),
            "18.16 accepted {type_name}"
        );

        let table = ClickHouseSpec {
            database: "signal_test".into(),
            table: format!("too_new_{index}"),
            engine: "MergeTree".into(),
            columns: vec![ColumnSpec::new("c", type_name, "$.c")],
            ..Default::default()
        };
        let refused = ddl::create_table_sql(&table, CLICKHOUSE_VERSION)
            .expect_err("the DDL refuses it for 18.16")
            .to_string();
        assert!(refused.contains("column `c`"), "{refused}");
    }
}
