//! Proves the DDL written for current servers is accepted by a current ClickHouse engine.
//!
//! This machine has no current clickhouse-server, so the statements run in chdb (ClickHouse as a
//! Python library, PyPI `chdb-core`) through `scripts/chdb_sql.py`. The table's columns are read back
//! from `system.columns` and compared as parsed types, which also proves that the way the operator
//! compares live types survives the server's normalised spelling.
//!
//! The cluster DDL (Replicated engines, Distributed tables, `ON CLUSTER`) runs in a chdb session
//! configured with ZooKeeper (testkit's, Debian's `zookeeper`), `{shard}`/`{replica}` macros and a
//! `remote_servers` cluster: the replicated table is really created (and registered in
//! ZooKeeper); `ON CLUSTER`, which needs a server's distributed DDL queue that chdb does not run,
//! is checked by the current parser (`formatQuery`).

use std::path::{Path, PathBuf};
use std::process::Command;

use signal_model::ddl::{
    add_column_sql, create_database_sql, create_distributed_table_sql, create_table_sql,
    drop_table_sql, on_cluster,
};
use signal_model::{
    ClickHouseClusterSpec, ClickHouseSpec, ColumnSpec, ColumnType, DistributedTableSpec,
    ServerVersion,
};

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("signal-ddl-{label}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What chdb said about a list of statements.
struct ChdbRun {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs each statement in one chdb session kept in `scratch`.
fn run_chdb(scratch: &Scratch, statements: &[String]) -> ChdbRun {
    run_chdb_configured(scratch, None, statements)
}

/// Like [`run_chdb`], with a server configuration file (ZooKeeper, macros, clusters).
fn run_chdb_configured(scratch: &Scratch, config: Option<&Path>, statements: &[String]) -> ChdbRun {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/chdb_sql.py");
    let mut files = Vec::new();
    for (index, statement) in statements.iter().enumerate() {
        let file = scratch.0.join(format!("statement-{index}.sql"));
        std::fs::write(&file, statement).unwrap();
        files.push(file);
    }
    let mut session = scratch.0.join("session").display().to_string();
    if let Some(config) = config {
        session.push_str(&format!("?config-file={}", config.display()));
    }
    let output = Command::new("python3")
        .arg(&script)
        .arg(session)
        .args(&files)
        .output()
        .expect("python3 must be installed to run the chdb DDL check");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_ne!(
        output.status.code(),
        Some(3),
        "chdb is missing: install it with `python3 -m pip install chdb-core`\n{stderr}"
    );
    ChdbRun {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr,
    }
}

/// A table using every type the spec allows, with partition, order and TTL clauses.
fn every_type_spec() -> ClickHouseSpec {
    ClickHouseSpec {
        url: "http://localhost:8123".to_string(),
        database: "risksignal".to_string(),
        table: "transaction_signals".to_string(),
        auth: None,
        tls: None,
        engine: "ReplacingMergeTree(event_time)".to_string(),
        partition_by: Some("toYYYYMM(event_time)".to_string()),
        order_by: vec!["wallet".to_string(), "event_time".to_string()],
        ttl: Some("toDateTime(event_time) + INTERVAL 90 DAY".to_string()),
        cluster: None,
        columns: vec![
            ColumnSpec::from_field("event_time", "DateTime64(3, 'UTC')"),
            ColumnSpec::from_field("received", "DateTime64(6)"),
            ColumnSpec::from_field("wallet", "LowCardinality(String)"),
            ColumnSpec::from_field("chain", "LowCardinality(Nullable(String))"),
            ColumnSpec::from_field("amount", "Decimal(18,4)"),
            ColumnSpec::from_field("fee", "Nullable(Decimal(9, 2))"),
            ColumnSpec::from_field("flagged", "Bool"),
            ColumnSpec::from_field("id", "UUID"),
            ColumnSpec::from_field("day", "Date"),
            ColumnSpec::from_field("seen_at", "DateTime"),
            ColumnSpec::from_field("seen_utc", "DateTime('UTC')"),
            ColumnSpec::from_field("i8", "Int8"),
            ColumnSpec::from_field("i16", "Int16"),
            ColumnSpec::from_field("i32", "Int32"),
            ColumnSpec::from_field("i64", "Int64"),
            ColumnSpec::from_field("u8", "UInt8"),
            ColumnSpec::from_field("u16", "UInt16"),
            ColumnSpec::from_field("u32", "UInt32"),
            ColumnSpec::from_field("u64", "UInt64"),
            ColumnSpec::from_field("f32", "Float32"),
            ColumnSpec::from_field("score", "Nullable(Float64)"),
            ColumnSpec::from_field("note", "String"),
            ColumnSpec::from_field("labels", "Map(String, String)"),
            ColumnSpec::from_field("counts", "Map(String, Nullable(UInt32))"),
            ColumnSpec::from_field("tags", "Array(LowCardinality(String))"),
            ColumnSpec::from_field("matrix", "Array(Array(Float64))"),
            ColumnSpec::from_field("maybe", "Array(Nullable(Int64))"),
        ],
    }
}

fn chdb_version(scratch: &Scratch) -> ServerVersion {
    let run = run_chdb(scratch, &["SELECT version()".to_string()]);
    assert!(run.success, "{}", run.stderr);
    let text = run.stdout.lines().nth(1).unwrap_or_default();
    ServerVersion::parse(text).unwrap_or_else(|| panic!("not a version: {text:?}"))
}

#[test]
fn ddl_for_every_type_is_accepted_by_a_current_clickhouse() {
    let scratch = Scratch::new("every-type");
    let version = chdb_version(&scratch);
    assert!(version >= ServerVersion::new(22, 0), "chdb is {version}");

    let mut spec = every_type_spec();
    let create = create_table_sql(&spec, version).unwrap();
    let added = ColumnSpec::from_field("severity", "LowCardinality(Nullable(String))");
    spec.columns.push(added.clone());
    let add = add_column_sql(&spec.database, &spec.table, &added, version, None).unwrap();
    assert!(add.contains("IF NOT EXISTS"), "{add}");
    let describe = "SELECT name, type FROM system.columns \
                    WHERE database = 'risksignal' AND table = 'transaction_signals' \
                    ORDER BY position"
        .to_string();
    let run = run_chdb(
        &scratch,
        &[
            create_database_sql(&spec.database, None),
            create.clone(),
            // Twice: IF NOT EXISTS makes both statements safe to repeat.
            create,
            add.clone(),
            add,
            describe,
        ],
    );
    assert!(run.success, "chdb refused the DDL: {}", run.stderr);

    let described: Vec<(String, String)> = run
        .stdout
        .rsplit("-- result ")
        .next()
        .unwrap()
        .lines()
        .skip(1)
        .map(|line| {
            let (name, type_text) = line.split_once('\t').unwrap();
            (name.to_string(), type_text.replace("\\'", "'"))
        })
        .collect();
    assert_eq!(described.len(), spec.columns.len(), "{described:?}");
    for (column, (live_name, live_type)) in spec.columns.iter().zip(&described) {
        assert_eq!(&column.name, live_name);
        let wanted = ColumnType::parse(&column.type_name).unwrap();
        let live = ColumnType::parse(live_type)
            .unwrap_or_else(|e| panic!("cannot parse the server's type {live_type:?}: {e}"));
        assert_eq!(
            live, wanted,
            "column {live_name}: server prints {live_type}"
        );
    }

    let drop = run_chdb(
        &scratch,
        &[drop_table_sql(&spec.database, &spec.table, None)],
    );
    assert!(drop.success, "{}", drop.stderr);
}

#[test]
fn a_bad_type_is_refused_by_chdb_with_its_message() {
    let scratch = Scratch::new("bad-type");
    let version = chdb_version(&scratch);
    let spec = ClickHouseSpec {
        database: "bad".to_string(),
        table: "t".to_string(),
        columns: vec![
            ColumnSpec::from_field("id", "UInt64"),
            ColumnSpec::from_field("n", "Int32"),
        ],
        ..every_type_spec()
    };
    let spec = ClickHouseSpec {
        partition_by: None,
        ttl: None,
        engine: "MergeTree".to_string(),
        order_by: vec!["id".to_string()],
        ..spec
    };
    // Our own parser refuses the type first...
    let mut refused = spec.clone();
    refused.columns[1].type_name = "Int33".to_string();
    let ours = create_table_sql(&refused, version).unwrap_err().to_string();
    assert!(ours.contains("unknown type `Int33`"), "{ours}");

    // ...and the engine refuses it too when it gets through, which shows this harness would
    // notice a statement the server does not accept.
    let sql = create_table_sql(&spec, version)
        .unwrap()
        .replace("`n` Int32", "`n` Int33");
    assert!(sql.contains("Int33"));
    let run = run_chdb(&scratch, &[create_database_sql("bad", None), sql]);
    assert!(!run.success, "chdb accepted an Int33 column");
    assert!(
        run.stderr.contains("Unknown data type family: Int33"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_repeated_batch_with_the_same_token_is_stored_once() {
    let scratch = Scratch::new("dedup");
    let version = chdb_version(&scratch);
    let spec = ClickHouseSpec {
        database: "dedup".to_string(),
        table: "t".to_string(),
        partition_by: None,
        ttl: None,
        engine: "MergeTree".to_string(),
        order_by: vec!["id".to_string()],
        columns: vec![ColumnSpec::from_field("id", "UInt64")],
        ..every_type_spec()
    };
    let create = create_table_sql(&spec, version).unwrap();
    assert!(
        create.contains("non_replicated_deduplication_window"),
        "{create}"
    );
    // The same rows twice under one token (a redelivered batch), then under another token.
    let insert = |token: &str| {
        format!(
            "INSERT INTO dedup.t SETTINGS insert_deduplication_token = '{token}' VALUES (1), (2), (3)"
        )
    };
    let run = run_chdb(
        &scratch,
        &[
            create_database_sql("dedup", None),
            create,
            insert("SIGNALS:1-3"),
            insert("SIGNALS:1-3"),
            insert("SIGNALS:4-6"),
            "SELECT count() FROM dedup.t".to_string(),
        ],
    );
    assert!(run.success, "chdb refused: {}", run.stderr);
    let count = run
        .stdout
        .rsplit("-- result ")
        .next()
        .unwrap()
        .lines()
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string();
    assert_eq!(count, "6", "{}", run.stdout);
}

#[test]
fn the_cluster_ddl_is_accepted_by_a_current_server_with_zookeeper() {
    let zookeeper = signal_testkit::ZooKeeperServer::start().expect("zookeeper");
    let scratch = Scratch::new("cluster");
    let version = chdb_version(&scratch);
    let config = scratch.0.join("cluster.xml");
    // The cluster's server is never contacted: chdb runs no distributed DDL.
    std::fs::write(
        &config,
        format!(
            "<clickhouse><zookeeper><node><host>127.0.0.1</host><port>{}</port></node>\
             </zookeeper><macros><shard>01</shard><replica>replica_1</replica></macros>\
             <remote_servers><signals><shard><internal_replication>true</internal_replication>\
             <replica><host>127.0.0.1</host><port>9000</port></replica></shard></signals>\
             </remote_servers></clickhouse>",
            zookeeper.port()
        ),
    )
    .unwrap();

    let spec = ClickHouseSpec {
        engine: "ReplicatedReplacingMergeTree(event_time)".to_string(),
        cluster: Some(ClickHouseClusterSpec {
            name: "signals".to_string(),
            distributed: Some(DistributedTableSpec {
                table: "transaction_signals_all".to_string(),
                sharding_key: Some("cityHash64(wallet)".to_string()),
            }),
            ..Default::default()
        }),
        ..every_type_spec()
    };
    let cluster = spec.cluster_name();
    let added = ColumnSpec::from_field("severity", "UInt8");
    let statements = [
        create_database_sql(&spec.database, cluster),
        create_table_sql(&spec, version).unwrap(),
        create_distributed_table_sql(&spec).unwrap().unwrap(),
        add_column_sql(&spec.database, &spec.table, &added, version, cluster).unwrap(),
        drop_table_sql(&spec.database, "transaction_signals_all", cluster),
        drop_table_sql(&spec.database, &spec.table, cluster),
    ];
    // The current parser takes every ON CLUSTER statement.
    let formatted: Vec<String> = statements
        .iter()
        .map(|sql| {
            format!(
                "SELECT formatQuery('{}')",
                sql.replace('\\', "\\\\").replace('\'', "\\'")
            )
        })
        .collect();
    let run = run_chdb(&scratch, &formatted);
    assert!(run.success, "chdb refused: {}", run.stderr);
    assert_eq!(
        run.stdout.matches("ON CLUSTER signals").count(),
        statements.len(),
        "{}",
        run.stdout
    );

    // And runs them on this server alone: the replicated table registers in ZooKeeper.
    let local = |sql: &String| sql.replace(&on_cluster(cluster), "");
    let run = run_chdb_configured(
        &scratch,
        Some(&config),
        &[
            local(&statements[0]),
            local(&statements[1]),
            local(&statements[2]),
            format!(
                "SELECT name, engine_full FROM system.tables WHERE database = '{}' ORDER BY name \
                 FORMAT TabSeparatedRaw",
                spec.database
            ),
            local(&statements[4]),
            local(&statements[5]),
        ],
    );
    assert!(run.success, "chdb refused: {}", run.stderr);
    assert!(
        run.stdout.contains(
            "transaction_signals\tReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/\
             risksignal.transaction_signals', '{replica}', event_time) PARTITION BY"
        ),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("replicated_deduplication_window = 1000"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(
            "transaction_signals_all\tDistributed('signals', 'risksignal', \
             'transaction_signals', cityHash64(wallet))"
        ),
        "{}",
        run.stdout
    );
}
