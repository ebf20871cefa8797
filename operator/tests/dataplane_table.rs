//! The table reconciler against a real clickhouse-server (Debian's 18.16): creation of the
//! database and table from the spec, `ALTER TABLE … ADD COLUMN` for new spec columns, schema drift
//! reported but never "fixed" (no column is dropped or retyped, no table rebuilt for a changed
//! engine, `PARTITION BY` or `ORDER BY`), features the server is too old for reported with the
//! release that has them, and the server's own refusals in its words. Every check reads the live
//! table back from `system.columns` / `SHOW CREATE TABLE`.

#[path = "support/dataplane.rs"]
mod support;

use signal_model::{ClickHouseSpec, ColumnSpec};
use support::{
    clickhouse_query, live_columns, reconcile, shared_pipeline_spec, table_exists, unique,
};

fn table_spec(label: &str) -> ClickHouseSpec {
    shared_pipeline_spec(&unique(label)).clickhouse
}

fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, type_text)| (name.to_string(), type_text.to_string()))
        .collect()
}

#[tokio::test]
async fn creates_the_database_and_table_from_the_spec_then_finds_them_up_to_date() {
    let spec = table_spec("create");
    let created = reconcile(&spec).await;
    assert!(created.report.ready, "{:?}", created.report);
    assert_eq!(created.report.reason, "Created");
    assert_eq!(
        created.report.changes,
        [
            format!("created database {}", spec.database),
            format!("created table {}.{}", spec.database, spec.table),
        ]
    );
    assert_eq!(created.schema_drift, None);

    assert_eq!(
        live_columns(&spec.database, &spec.table),
        owned(&[
            ("event_time", "DateTime"),
            ("wallet", "String"),
            ("amount", "Int32")
        ])
    );
    let ddl = clickhouse_query(&format!(
        "SHOW CREATE TABLE {}.{} FORMAT TSVRaw",
        spec.database, spec.table
    ));
    for clause in [
        "ENGINE = MergeTree",
        "PARTITION BY toYYYYMM(event_time)",
        "ORDER BY (wallet, event_time)",
    ] {
        assert!(ddl.contains(clause), "{ddl} lacks {clause}");
    }

    let again = reconcile(&spec).await;
    assert_eq!(again.report.reason, "UpToDate", "{:?}", again.report);
    assert!(again.report.ready && again.report.changes.is_empty());
}

#[tokio::test]
async fn every_type_the_old_server_supports_is_created_and_read_back_as_the_same_type() {
    let mut spec = table_spec("every_type");
    spec.engine = "ReplacingMergeTree(seen_at)".to_string();
    spec.partition_by = Some("toYYYYMM(day)".to_string());
    spec.order_by = vec!["id".to_string(), "seen_at".to_string()];
    spec.columns = [
        ("id", "UUID"),
        ("day", "Date"),
        ("seen_at", "DateTime"),
        ("seen_utc", "DateTime('UTC')"),
        ("i8", "Int8"),
        ("i16", "Int16"),
        ("i32", "Int32"),
        ("i64", "Int64"),
        ("u8", "UInt8"),
        ("u16", "UInt16"),
        ("u32", "UInt32"),
        ("u64", "UInt64"),
        ("f32", "Float32"),
        ("f64", "Float64"),
        ("amount", "Decimal(38,18)"),
        ("fee", "Nullable(Decimal(9, 2))"),
        ("note", "String"),
        ("maybe", "Nullable(String)"),
        ("tags", "Array(String)"),
        ("matrix", "Array(Array(Float64))"),
        ("sparse", "Array(Nullable(Int64))"),
    ]
    .iter()
    .map(|(name, type_name)| ColumnSpec::from_field(name, *type_name))
    .collect();

    let created = reconcile(&spec).await;
    assert_eq!(created.report.reason, "Created", "{:?}", created.report);
    let live = live_columns(&spec.database, &spec.table);
    assert_eq!(live.len(), spec.columns.len(), "{live:?}");
    for (wanted, (name, type_text)) in spec.columns.iter().zip(&live) {
        assert_eq!(&wanted.name, name);
        assert_eq!(
            signal_model::ColumnType::parse(type_text).ok(),
            signal_model::ColumnType::parse(&wanted.type_name).ok(),
            "column {name}: the server says {type_text}"
        );
    }
    // The server's own spelling (`Decimal(38, 18)`, `DateTime('UTC')`) is no drift.
    let again = reconcile(&spec).await;
    assert_eq!(again.report.reason, "UpToDate", "{:?}", again.report);
    assert_eq!(again.schema_drift, None);
}

#[tokio::test]
async fn new_spec_columns_are_added_and_existing_rows_kept() {
    let mut spec = table_spec("add");
    assert_eq!(reconcile(&spec).await.report.reason, "Created");
    clickhouse_query(&format!(
        "INSERT INTO {}.{} (event_time, wallet, amount) VALUES (now(), 'w1', 5)",
        spec.database, spec.table
    ));

    spec.columns
        .push(ColumnSpec::from_field("severity", "UInt8"));
    spec.columns
        .push(ColumnSpec::from_field("note", "Nullable(String)"));
    let updated = reconcile(&spec).await;
    assert!(updated.report.ready, "{:?}", updated.report);
    assert_eq!(updated.report.reason, "Updated");
    let qualified = format!("{}.{}", spec.database, spec.table);
    assert_eq!(
        updated.report.changes,
        [
            format!("added column severity UInt8 to {qualified}"),
            format!("added column note Nullable(String) to {qualified}"),
        ]
    );
    assert_eq!(
        live_columns(&spec.database, &spec.table),
        owned(&[
            ("event_time", "DateTime"),
            ("wallet", "String"),
            ("amount", "Int32"),
            ("severity", "UInt8"),
            ("note", "Nullable(String)"),
        ])
    );
    assert_eq!(
        clickhouse_query(&format!(
            "SELECT wallet, amount, severity, note FROM {qualified} FORMAT TSV"
        )),
        "w1\t5\t0\t\\N\n",
        "the existing row keeps its values and gets the new columns' defaults"
    );
    assert_eq!(reconcile(&spec).await.report.reason, "UpToDate");
}

#[tokio::test]
async fn a_changed_column_type_is_reported_as_drift_and_never_applied() {
    let mut spec = table_spec("retype");
    assert_eq!(reconcile(&spec).await.report.reason, "Created");

    spec.columns[2].type_name = "Int64".to_string();
    let outcome = reconcile(&spec).await;
    assert!(!outcome.report.ready, "{:?}", outcome.report);
    assert_eq!(outcome.report.reason, "SchemaDrift");
    assert_eq!(
        outcome.schema_drift.as_deref(),
        Some("column amount: table has Int32, spec wants Int64 (workers cannot write it)")
    );
    assert!(
        outcome.report.message.contains("resolve it by hand"),
        "{}",
        outcome.report.message
    );
    assert!(outcome.report.changes.is_empty());
    assert_eq!(
        live_columns(&spec.database, &spec.table)[2],
        ("amount".to_string(), "Int32".to_string()),
        "the live type is unchanged"
    );
}

#[tokio::test]
async fn a_column_removed_from_the_spec_stays_in_the_table_as_reported_drift() {
    let mut spec = table_spec("removed");
    assert_eq!(reconcile(&spec).await.report.reason, "Created");

    spec.columns.pop();
    let outcome = reconcile(&spec).await;
    // The workers can still write: ClickHouse fills the column's default.
    assert!(outcome.report.ready, "{:?}", outcome.report);
    assert_eq!(outcome.report.reason, "SchemaDrift");
    assert_eq!(
        outcome.schema_drift.as_deref(),
        Some("column amount (Int32) is in the table but not in the spec")
    );
    assert_eq!(
        live_columns(&spec.database, &spec.table).len(),
        3,
        "nothing dropped"
    );
}

#[tokio::test]
async fn types_and_clauses_the_server_is_too_old_for_are_reported_with_the_minimum_version() {
    let mut spec = table_spec("too_new");
    spec.columns[0].type_name = "DateTime64(3)".to_string();
    spec.columns
        .push(ColumnSpec::from_field("tags", "Map(String, String)"));
    spec.ttl = Some("toDateTime(event_time) + INTERVAL 1 DAY".to_string());
    spec.partition_by = None;

    let outcome = reconcile(&spec).await;
    assert!(!outcome.report.ready, "{:?}", outcome.report);
    assert_eq!(outcome.report.reason, "UnsupportedByServer");
    assert_eq!(
        outcome.report.message,
        "DateTime64 (column `event_time`) needs ClickHouse 20.1 or later; \
         Map (column `tags`) needs ClickHouse 21.8 or later; \
         Table TTL needs ClickHouse 19.6 or later; server is 18.16"
    );
    assert!(outcome.report.changes.is_empty());
    let databases = clickhouse_query(&format!(
        "SELECT count() FROM system.databases WHERE name = '{}'",
        spec.database
    ));
    assert_eq!(databases.trim(), "0", "nothing was created");
}

#[tokio::test]
async fn an_unsupported_new_column_is_reported_and_not_added() {
    let mut spec = table_spec("too_new_column");
    assert_eq!(reconcile(&spec).await.report.reason, "Created");

    spec.columns
        .push(ColumnSpec::from_field("chain", "LowCardinality(String)"));
    let outcome = reconcile(&spec).await;
    assert!(!outcome.report.ready, "{:?}", outcome.report);
    assert_eq!(outcome.report.reason, "UnsupportedByServer");
    assert!(
        outcome
            .report
            .message
            .contains("LowCardinality (column `chain`) needs ClickHouse 19.0 or later"),
        "{}",
        outcome.report.message
    );
    assert_eq!(live_columns(&spec.database, &spec.table).len(), 3);
}

#[tokio::test]
async fn an_invalid_type_is_an_invalid_spec_and_creates_nothing() {
    let mut spec = table_spec("invalid");
    spec.columns[2].type_name = "Int33".to_string();
    let outcome = reconcile(&spec).await;
    assert!(!outcome.report.ready);
    assert_eq!(outcome.report.reason, "InvalidSpec", "{:?}", outcome.report);
    assert!(
        outcome.report.message.contains("Int33"),
        "{}",
        outcome.report.message
    );
    assert!(!table_exists(&spec.database, &spec.table));
}

#[tokio::test]
async fn a_statement_the_server_refuses_is_reported_in_its_words() {
    let mut spec = table_spec("refused");
    spec.order_by = vec!["no_such_column".to_string()];
    let outcome = reconcile(&spec).await;
    assert!(!outcome.report.ready);
    assert_eq!(outcome.report.reason, "QueryFailed", "{:?}", outcome.report);
    assert!(
        outcome.report.message.contains("no_such_column")
            && outcome.report.message.contains("CREATE TABLE"),
        "{}",
        outcome.report.message
    );
    assert!(!table_exists(&spec.database, &spec.table));
}

#[tokio::test]
async fn a_table_with_another_engine_is_reported_as_drift() {
    let spec = table_spec("engine");
    clickhouse_query(&format!("CREATE DATABASE {}", spec.database));
    clickhouse_query(&format!(
        "CREATE TABLE {}.{} (event_time DateTime, wallet String, amount Int32) \
         ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMM(event_time) \
         ORDER BY (wallet, event_time)",
        spec.database, spec.table
    ));
    let outcome = reconcile(&spec).await;
    assert!(outcome.report.ready, "{:?}", outcome.report);
    assert_eq!(outcome.report.reason, "SchemaDrift");
    assert_eq!(
        outcome.schema_drift.as_deref(),
        Some(
            "ENGINE: table has ReplacingMergeTree(), spec wants MergeTree (the table was left as \
             is: changing it means rebuilding the table, which the operator never does by itself)"
        )
    );
}

/// The table's DDL as the server prints it.
fn show_create_table(spec: &ClickHouseSpec) -> String {
    clickhouse_query(&format!(
        "SHOW CREATE TABLE {}.{} FORMAT TSVRaw",
        spec.database, spec.table
    ))
}

#[tokio::test]
async fn an_unchanged_spec_finds_no_clause_drift_on_later_reconciles() {
    let mut spec = table_spec("clauses_unchanged");
    spec.engine = "ReplacingMergeTree(event_time)".to_string();
    spec.partition_by = Some("(toYYYYMM(event_time), amount % 4)".to_string());
    spec.order_by = vec!["wallet".to_string(), "toDate(event_time)".to_string()];
    assert_eq!(reconcile(&spec).await.report.reason, "Created");
    for _ in 0..2 {
        let again = reconcile(&spec).await;
        assert_eq!(again.report.reason, "UpToDate", "{:?}", again.report);
        assert_eq!(again.schema_drift, None);
    }

    // The same for a table with neither key.
    let mut bare = table_spec("clauses_unchanged_bare");
    bare.partition_by = None;
    bare.order_by = Vec::new();
    assert_eq!(reconcile(&bare).await.report.reason, "Created");
    let again = reconcile(&bare).await;
    assert_eq!(again.report.reason, "UpToDate", "{:?}", again.report);
    assert_eq!(again.schema_drift, None);
}

#[tokio::test]
async fn a_changed_order_by_is_reported_and_the_table_left_as_is() {
    let mut spec = table_spec("order_changed");
    assert_eq!(reconcile(&spec).await.report.reason, "Created");
    let before = show_create_table(&spec);

    spec.order_by = vec!["event_time".to_string(), "wallet".to_string()];
    let outcome = reconcile(&spec).await;
    assert!(
        outcome.report.ready,
        "the workers keep writing: {:?}",
        outcome.report
    );
    assert_eq!(outcome.report.reason, "SchemaDrift");
    assert!(outcome.report.changes.is_empty());
    assert_eq!(
        outcome.schema_drift.as_deref(),
        Some(
            "ORDER BY: table has (wallet, event_time), spec wants (event_time, wallet) (the table \
             was left as is: changing it means rebuilding the table, which the operator never \
             does by itself)"
        )
    );
    assert!(
        outcome.report.message.contains("is usable but differs"),
        "{}",
        outcome.report.message
    );
    assert_eq!(show_create_table(&spec), before, "the table is untouched");
    clickhouse_query(&format!(
        "INSERT INTO {}.{} (event_time, wallet, amount) VALUES (now(), 'w1', 5)",
        spec.database, spec.table
    ));
}

#[tokio::test]
async fn a_changed_partition_by_is_reported_and_the_table_left_as_is() {
    let mut spec = table_spec("partition_changed");
    assert_eq!(reconcile(&spec).await.report.reason, "Created");
    let before = show_create_table(&spec);

    spec.partition_by = Some("toDate(event_time)".to_string());
    let outcome = reconcile(&spec).await;
    assert!(
        outcome.report.ready,
        "the workers keep writing: {:?}",
        outcome.report
    );
    assert_eq!(outcome.report.reason, "SchemaDrift");
    assert_eq!(
        outcome.schema_drift.as_deref(),
        Some(
            "PARTITION BY: table has toYYYYMM(event_time), spec wants toDate(event_time) (the \
             table was left as is: changing it means rebuilding the table, which the operator \
             never does by itself)"
        )
    );

    spec.partition_by = None;
    let removed = reconcile(&spec).await;
    assert!(
        removed.schema_drift.as_deref().is_some_and(|drift| drift
            .starts_with("PARTITION BY: table has toYYYYMM(event_time), spec wants none")),
        "{:?}",
        removed.schema_drift
    );
    assert_eq!(show_create_table(&spec), before, "the table is untouched");
}

/// Scratch tables (the spec's table as the server prints it) still present for a spec whose
/// table has a column named `marker`.
fn scratch_tables_for(marker: &str) -> String {
    clickhouse_query(&format!(
        "SELECT count() FROM system.tables WHERE database = 'signal_operator_scratch' \
         AND create_table_query LIKE '%{marker}%'"
    ))
    .trim()
    .to_string()
}

#[tokio::test]
async fn expressions_the_server_rewrites_are_no_drift() {
    // The server prints `amount % 4` for `modulo(amount, 4)`, `CAST(amount, 'UInt8')` for the
    // lower-case `cast(amount as UInt8)` and drops the spacing, quotes and outer parentheses: a
    // comparison of texts (the tokenizer this replaced) reported these as drift on every reconcile.
    let mut spec = table_spec("rewritten");
    let marker = unique("marker");
    spec.columns.push(ColumnSpec::from_field(&marker, "UInt8"));
    spec.partition_by = Some("modulo(amount, 4)".to_string());
    spec.order_by = vec![
        "( `wallet` )".to_string(),
        "cast(amount as UInt8)".to_string(),
    ];
    assert_eq!(reconcile(&spec).await.report.reason, "Created");
    let printed = show_create_table(&spec);
    assert!(
        printed.contains("PARTITION BY amount % 4") && printed.contains("CAST(amount, 'UInt8')"),
        "the server rewrites the spec's expressions: {printed}"
    );
    for _ in 0..2 {
        let again = reconcile(&spec).await;
        assert_eq!(again.report.reason, "UpToDate", "{:?}", again.report);
        assert_eq!(again.schema_drift, None);
    }
    assert_eq!(scratch_tables_for(&marker), "0", "no scratch table is left");

    // A real change is still found, on the first reconcile after the edit.
    spec.partition_by = Some("modulo(amount, 8)".to_string());
    let changed = reconcile(&spec).await;
    assert_eq!(changed.report.reason, "SchemaDrift", "{:?}", changed.report);
    assert!(
        changed.schema_drift.as_deref().is_some_and(|drift| drift
            .starts_with("PARTITION BY: table has amount % 4, spec wants modulo(amount, 8)")),
        "{:?}",
        changed.schema_drift
    );
    assert_eq!(scratch_tables_for(&marker), "0", "no scratch table is left");
}

#[tokio::test]
async fn spec_clauses_the_server_refuses_on_an_existing_table_are_noted_not_blocking() {
    let mut spec = table_spec("clauses_refused");
    let marker = unique("marker");
    spec.columns.push(ColumnSpec::from_field(&marker, "UInt8"));
    assert_eq!(reconcile(&spec).await.report.reason, "Created");
    let before = show_create_table(&spec);

    spec.order_by = vec!["no_such_column".to_string()];
    let outcome = reconcile(&spec).await;
    assert!(outcome.report.ready, "{:?}", outcome.report);
    assert_eq!(outcome.report.reason, "SchemaDrift");
    let drift = outcome.schema_drift.unwrap_or_default();
    assert!(
        drift.starts_with(
            "ENGINE, PARTITION BY, ORDER BY and TTL were not compared: ClickHouse refused \
             `CREATE TABLE"
        ) && drift.contains("no_such_column"),
        "{drift}"
    );
    assert_eq!(show_create_table(&spec), before, "the table is untouched");
    assert_eq!(scratch_tables_for(&marker), "0", "no scratch table is left");
}

/// With the controller's pooled connections, a table a full check found as the spec says is
/// taken on trust for `TABLE_VERIFY_INTERVAL` by reconciles that may trust (workers healthy), once
/// the server says it still exists: a column changed by hand shows only at the next full check. A
/// dropped table, a reconcile that may not trust (workers report a problem) and a spec edit get
/// the full check at once.
#[tokio::test]
async fn a_pooled_resync_trusts_a_verified_table_until_a_full_check_is_asked_or_the_spec_changes() {
    use signal_operator::dataplane::connections::{ConnectionLimits, Connections};
    use signal_operator::dataplane::table::{TableCheck, reconcile_table_with};

    let connections = Connections::shared(ConnectionLimits::default(), None);
    let auth = support::no_credentials().clickhouse;
    let mut spec = table_spec("trusted");
    let run = |spec: ClickHouseSpec, check: TableCheck| {
        let (connections, auth) = (&connections, &auth);
        async move {
            reconcile_table_with(
                &connections.session("team/trusted"),
                &spec,
                auth,
                None,
                check,
            )
            .await
        }
    };
    let trusting = TableCheck::TrustRecent;
    assert_eq!(run(spec.clone(), trusting).await.report.reason, "Created");
    // The first check after creating is a full one; it finds the table as the spec says.
    assert_eq!(run(spec.clone(), trusting).await.report.reason, "UpToDate");

    let qualified = format!("{}.{}", spec.database, spec.table);
    clickhouse_query(&format!("ALTER TABLE {qualified} DROP COLUMN amount"));
    let trusted = run(spec.clone(), trusting).await;
    assert_eq!(
        (trusted.report.reason.as_str(), trusted.schema_drift),
        ("UpToDate", None),
        "within the interval a trusting reconcile only asks whether the table exists"
    );
    let full = run(spec.clone(), TableCheck::Full).await;
    assert_eq!(
        full.report.reason, "Updated",
        "the full check adds the column back"
    );

    assert_eq!(run(spec.clone(), trusting).await.report.reason, "UpToDate");
    clickhouse_query(&format!("DROP TABLE {qualified}"));
    let recreated = run(spec.clone(), trusting).await;
    assert_eq!(recreated.report.reason, "Created", "{:?}", recreated.report);
    assert!(table_exists(&spec.database, &spec.table));

    spec.columns.push(ColumnSpec {
        name: "note".to_string(),
        type_name: "Nullable(String)".to_string(),
        from: "$.note".to_string(),
        default: None,
    });
    let edited = run(spec.clone(), trusting).await;
    assert!(
        edited.report.changes.iter().any(|c| c.contains("note")),
        "a changed spec is checked in full: {:?}",
        edited.report
    );
}
