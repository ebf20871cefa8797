//! Start-up errors of the `signal-worker` binary: a bad pipeline file (or bad credentials in the
//! environment) exits non-zero with one line on stderr that names the field and what is wrong.
//! No server is needed: the worker must refuse before it connects anywhere.

use std::process::{Command, Stdio};
use std::time::Duration;

use signal_testkit::ChildProcess;

const GOOD: &str = r#"
apiVersion: signals.dev/v1alpha1
kind: SignalPipeline
metadata: {name: orders, labels: {team: risk}}
spec:
  nats: {url: "nats://127.0.0.1:1"}
  stream: {name: ORDERS, subjects: ["orders.>"]}
  clickhouse:
    url: http://127.0.0.1:1
    database: db
    table: orders
    columns:
      - {name: seq, type: UInt64, from: "@sequence"}
      - {name: amount, type: "Decimal(18, 2)", from: $.amount}
  workers:
    batch: {maxRows: 1000, maxWait: 1s}
  cache:
    redis: {url: "redis://127.0.0.1:1"}
    key: "order:{seq}"
    fields: [amount]
    ttl: 5m
"#;

/// Runs the binary on `manifest` (written to a temp file unless `None`) with extra environment,
/// and returns its exit code and stderr.
fn run_worker(manifest: Option<&str>, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pipeline.yaml");
    if let Some(text) = manifest {
        std::fs::write(&path, text).expect("write manifest");
    }
    let stderr_path = dir.path().join("stderr");
    let mut command = Command::new(env!("CARGO_BIN_EXE_signal-worker"));
    command
        .arg("--pipeline")
        .arg(&path)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
    let mut worker = ChildProcess::spawn(command).expect("start signal-worker");
    let status = worker
        .wait_exit(Duration::from_secs(20))
        .expect("a bad manifest makes the worker exit at once");
    let stderr = std::fs::read_to_string(&stderr_path).expect("stderr");
    (status.code(), stderr)
}

/// Asserts a non-zero exit with exactly one stderr line containing every `expected` text.
fn assert_refused(manifest: Option<&str>, env: &[(&str, &str)], expected: &[&str]) {
    let (code, stderr) = run_worker(manifest, env);
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit code {code:?}, stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got:\n{stderr}");
    assert_eq!(
        lines[0].matches(expected[0]).count(),
        1,
        "said once: {}",
        lines[0]
    );
    for text in expected {
        assert!(
            lines[0].contains(text),
            "`{text}` missing from: {}",
            lines[0]
        );
    }
}

#[test]
fn the_good_manifest_is_accepted_so_the_cases_below_test_one_fault_each() {
    let manifest = signal_model::manifest::PipelineManifest::from_yaml(GOOD);
    assert!(manifest.is_ok(), "{manifest:?}");
}

#[test]
fn an_unknown_column_type_names_the_column_field() {
    assert_refused(
        Some(&GOOD.replace("type: UInt64", "type: UInt65")),
        &[],
        &["spec.clickhouse.columns[0].type", "UInt65"],
    );
}

#[test]
fn a_bad_duration_names_the_field() {
    assert_refused(
        Some(&GOOD.replace("maxWait: 1s", "maxWait: soon")),
        &[],
        &["spec.workers.batch.maxWait", "soon"],
    );
}

#[test]
fn an_unknown_field_is_named() {
    assert_refused(
        Some(&GOOD.replace("maxRows: 1000", "maxRowz: 1000")),
        &[],
        &["spec.workers.batch", "unknown field `maxRowz`"],
    );
}

#[test]
fn a_wrongly_typed_value_is_named() {
    assert_refused(
        Some(&GOOD.replace("maxRows: 1000", "maxRows: many")),
        &[],
        &["spec.workers.batch.maxRows"],
    );
}

#[test]
fn a_missing_required_field_is_named() {
    assert_refused(
        Some(&GOOD.replace("    table: orders\n", "")),
        &[],
        &["spec.clickhouse", "missing field `table`"],
    );
}

#[test]
fn semantic_errors_name_the_field() {
    assert_refused(
        Some(&GOOD.replace("name: ORDERS", "name: \"ORD ERS\"")),
        &[],
        &["spec.stream.name"],
    );
    assert_refused(
        Some(&GOOD.replace("fields: [amount]", "fields: [price]")),
        &[],
        &["spec.cache", "price"],
    );
    assert_refused(
        Some(&GOOD.replace("from: $.amount", "from: amount")),
        &[],
        &["spec.clickhouse.columns[1].from"],
    );
}

#[test]
fn a_wrong_kind_and_a_missing_file_are_reported() {
    assert_refused(
        Some(&GOOD.replace("kind: SignalPipeline", "kind: Pipeline")),
        &[],
        &["kind"],
    );
    assert_refused(None, &[], &["cannot read", "pipeline.yaml"]);
    assert_refused(Some("{not yaml: ["), &[], &["pipeline.yaml"]);
}

#[test]
fn bad_credentials_in_the_environment_name_the_variable() {
    assert_refused(
        Some(GOOD),
        &[("SIGNAL_NATS_PASSWORD", "secret")],
        &["SIGNAL_NATS_PASSWORD"],
    );
}
