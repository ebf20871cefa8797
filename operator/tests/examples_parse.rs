//! Every example in `examples/` (and `examples/local/`, `examples/production/`) is a SignalPipeline
//! the operator accepts:
//! it parses as a manifest (apiVersion, kind, metadata, spec) into `signal_model::SignalPipelineSpec`
//! with unknown fields refused, passes `validate`, and its table's CREATE statement can be written
//! for the ClickHouse it targets: a current server in-cluster, 18.16 for the local example. Its
//! ack window fits its workers' batches (no `AckWindowTooSmall` warning). The
//! facts `scripts/kind-e2e.sh` relies on about `examples/transactions.yaml` are checked too.

use std::path::{Path, PathBuf};

use signal_model::ddl::{create_table_sql, unsupported_features};
use signal_model::manifest::{API_VERSION, KIND, PipelineManifest};
use signal_model::{ServerVersion, SignalPipelineSpec};

/// The in-cluster examples target a current ClickHouse (the kind script runs 24.8).
const CURRENT_CLICKHOUSE: ServerVersion = ServerVersion::new(24, 8);
/// What the local tests and demo run.
const OLD_CLICKHOUSE: ServerVersion = ServerVersion::new(18, 16);

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the operator crate lives inside the workspace")
        .join("examples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    files
}

/// Parses one example strictly, checks its shape and validates it.
fn load(path: &Path) -> PipelineManifest {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let manifest: PipelineManifest = yaml_serde::from_str(&text)
        .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
    assert_eq!(manifest.api_version, API_VERSION, "{}", path.display());
    assert_eq!(manifest.kind, KIND, "{}", path.display());
    assert!(!manifest.metadata.name.is_empty(), "{}", path.display());
    if let Err(error) = manifest.spec.validate(&manifest.metadata.name) {
        panic!("{} is invalid: {error}", path.display());
    }
    if let Some(warning) = signal_model::validate::ack_window_warning(&manifest.spec) {
        panic!("{}: {warning}", path.display());
    }
    manifest
}

fn create_table(path: &Path, spec: &SignalPipelineSpec, server: ServerVersion) -> String {
    let missing = unsupported_features(&spec.clickhouse, server);
    assert!(
        missing.is_empty(),
        "{} needs a newer ClickHouse than {server:?}: {missing:?}",
        path.display()
    );
    create_table_sql(&spec.clickhouse, server)
        .unwrap_or_else(|e| panic!("{}: no CREATE TABLE: {e}", path.display()))
}

#[test]
fn cluster_examples_parse_validate_and_have_a_table() {
    let files = yaml_files(&examples_dir());
    let names: Vec<String> = files
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "market-quotes.yaml",
        "raw-signals.yaml",
        "risk-events.yaml",
        "transactions.yaml",
    ] {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} in {names:?}"
        );
    }
    for path in &files {
        let manifest = load(path);
        assert_eq!(
            manifest.metadata.namespace.as_deref(),
            Some("signals"),
            "{} runs next to deploy/dev",
            path.display()
        );
        for url in [&manifest.spec.nats.url, &manifest.spec.clickhouse.url] {
            assert!(
                url.contains(".signals.svc:"),
                "{}: in-cluster URL {url}",
                path.display()
            );
        }
        let sql = create_table(path, &manifest.spec, CURRENT_CLICKHOUSE);
        assert!(sql.contains(&manifest.spec.clickhouse.table), "{sql}");
    }
}

#[test]
fn pipelines_sharing_a_stream_declare_it_identically() {
    // JetStream refuses two streams with overlapping subjects, so the pipelines on `signals.>`
    // share the SIGNALS stream; differing settings would make the operator fight itself.
    let streams: Vec<_> = yaml_files(&examples_dir())
        .iter()
        .map(|path| (path.clone(), load(path).spec.stream))
        .filter(|(_, stream)| stream.name == "SIGNALS")
        .collect();
    assert!(
        streams.len() >= 3,
        "raw signals, transactions and risk events share SIGNALS"
    );
    for (path, stream) in &streams {
        assert_eq!(
            stream,
            &streams[0].1,
            "{} declares SIGNALS differently",
            path.display()
        );
    }
}

#[test]
fn pipelines_sharing_a_stream_ask_for_the_same_dead_letter_stream() {
    // Their default dead-letter stream is shared too; differing settings would make the operator
    // fight itself over it.
    let streams: Vec<_> = yaml_files(&examples_dir())
        .iter()
        .map(|path| {
            let manifest = load(path);
            let dead_letter = manifest.spec.dead_letter_stream();
            (path.clone(), manifest.spec.stream.name.clone(), dead_letter)
        })
        .filter(|(_, stream, _)| stream == "SIGNALS")
        .collect();
    assert!(
        streams.len() >= 3,
        "raw signals, transactions and risk events share SIGNALS"
    );
    for (path, _, dead_letter) in &streams {
        assert_eq!(dead_letter.name, "SIGNALS_DLQ", "{}", path.display());
        assert_eq!(
            dead_letter,
            &streams[0].2,
            "{} asks for SIGNALS_DLQ differently",
            path.display()
        );
    }
}

#[test]
fn transactions_example_matches_what_the_kind_script_checks() {
    let path = examples_dir().join("transactions.yaml");
    let manifest = load(&path);
    assert_eq!(manifest.metadata.name, "transactions");
    let spec = &manifest.spec;
    assert_eq!(
        spec.consumer.filter_subject.as_deref(),
        Some("signals.transaction")
    );
    assert_eq!(
        (
            spec.clickhouse.database.as_str(),
            spec.clickhouse.table.as_str()
        ),
        ("risksignal", "transaction_signals")
    );
    let auth = spec
        .clickhouse
        .auth
        .as_ref()
        .expect("ClickHouse credentials");
    assert_eq!(
        auth.secret_ref.name, "clickhouse-auth",
        "the Secret in deploy/dev"
    );
    let cache = spec.cache.as_ref().expect("the Redis cache");
    assert_eq!(cache.key, "wallet:{wallet_address}:latest");
    assert!(cache.fields.iter().any(|field| field == "tx_hash"));
    for column in ["source_id", "wallet_address", "tx_hash"] {
        assert!(
            spec.clickhouse.columns.iter().any(|c| c.name == column),
            "column {column}"
        );
    }
}

#[test]
fn local_example_runs_on_old_clickhouse_at_default_ports() {
    let files = yaml_files(&examples_dir().join("local"));
    assert!(!files.is_empty(), "examples/local has a pipeline");
    for path in &files {
        let manifest = load(path);
        let spec = &manifest.spec;
        assert_eq!(spec.nats.url, "nats://127.0.0.1:4222");
        assert_eq!(spec.clickhouse.url, "http://127.0.0.1:8123");
        if let Some(cache) = &spec.cache {
            assert_eq!(cache.redis.url, "redis://127.0.0.1:6379");
        }
        create_table(path, spec, OLD_CLICKHOUSE);
    }
}

/// `examples/production/` (the README's "Production servers" manifests, which the tests apply to
/// the testkit's 18.16 servers).
#[test]
fn production_examples_parse_validate_and_have_a_table_on_old_clickhouse() {
    let files = yaml_files(&examples_dir().join("production"));
    assert!(!files.is_empty(), "examples/production has pipelines");
    for path in &files {
        let manifest = load(path);
        create_table(path, &manifest.spec, CURRENT_CLICKHOUSE);
        create_table(path, &manifest.spec, OLD_CLICKHOUSE);
    }
}

/// The README shows `examples/production/tls.yaml` verbatim under "### TLS".
#[test]
fn the_readme_shows_the_tls_example_as_it_is() {
    let readme = std::fs::read_to_string(examples_dir().join("../README.md")).expect("README.md");
    let example = std::fs::read_to_string(examples_dir().join("production/tls.yaml"))
        .expect("examples/production/tls.yaml");
    let section = readme
        .split_once("\n### TLS\n")
        .expect("README has a ### TLS section")
        .1;
    let block = section
        .split_once("```yaml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("the TLS section has a yaml block")
        .0;
    assert_eq!(
        block, example,
        "README's TLS manifest differs from the file"
    );
}

#[test]
fn a_misspelt_field_in_an_example_would_be_refused() {
    let path = examples_dir().join("transactions.yaml");
    let text = std::fs::read_to_string(&path).expect("transactions.yaml");
    let misspelt = text.replacen("filterSubject:", "filterSubjet:", 1);
    assert_ne!(misspelt, text);
    let error = yaml_serde::from_str::<PipelineManifest>(&misspelt).unwrap_err();
    assert!(error.to_string().contains("filterSubjet"), "{error}");
}
