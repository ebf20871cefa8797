//! The `SignalPipeline` CustomResourceDefinition, checked without a cluster.
//!
//! `crds/signalpipeline.yaml` is exactly what `signal-operator crd` prints; it parses strictly into
//! k8s-openapi's `CustomResourceDefinition`; names, scope, subresources and printer columns are the
//! API the product promises; the schema is structural (the API server refuses a CRD otherwise, and
//! only finds out at install time); every property is documented for `kubectl explain`; the
//! fields the data plane cannot change carry CEL transition rules. A small validator, covering
//! the keywords the schema uses (CEL excepted), checks that every example passes and that typical
//! mistakes are refused by the schema itself, at `kubectl apply`.

use std::any::type_name;
use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use regex::Regex;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use signal_operator::crd::crd_yaml;

const REGENERATE: &str = "cargo run -p signal-operator -- crd > crds/signalpipeline.yaml";
/// The formats the API server understands on integer, number and string nodes.
const KNOWN_FORMATS: [&str; 6] = ["int32", "int64", "float", "double", "byte", "date-time"];
/// Fields whose change would need a new stream or table: the schema freezes them.
const IMMUTABLE_FIELDS: [&str; 6] = [
    "spec.stream.name",
    "spec.stream.storage",
    "spec.clickhouse.database",
    "spec.clickhouse.table",
    "spec.deadLetter.stream.name",
    "spec.deadLetter.stream.storage",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the operator crate lives inside the workspace")
        .to_path_buf()
}

fn committed_crd_text() -> String {
    let path = workspace_root().join("crds/signalpipeline.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|error| {
        panic!(
            "{} cannot be read ({error}); generate it: {REGENERATE}",
            path.display()
        )
    })
}

/// The committed CRD as JSON, the form the API server validates.
fn committed_crd() -> Value {
    yaml_serde::from_str(&committed_crd_text()).expect("crds/signalpipeline.yaml is YAML")
}

/// The `openAPIV3Schema` of the one served version.
fn schema() -> Value {
    let crd = committed_crd();
    let versions = crd["spec"]["versions"]
        .as_array()
        .expect("spec.versions is a list");
    assert_eq!(versions.len(), 1, "one version: v1alpha1");
    versions[0]["schema"]["openAPIV3Schema"].clone()
}

/// Deserialises `document` into `T`, refusing any field `T` does not know.
fn parse_strict<T: DeserializeOwned>(document: &Value) -> T {
    let mut unknown = Vec::new();
    let parsed =
        serde_ignored::deserialize(document.clone(), |path| unknown.push(path.to_string()))
            .unwrap_or_else(|error| panic!("does not parse as {}: {error}", type_name::<T>()));
    assert!(
        unknown.is_empty(),
        "fields unknown to {}: {unknown:?}",
        type_name::<T>()
    );
    parsed
}

/// The schema node at a dotted path below the root (`spec.clickhouse.columns`).
fn node<'a>(schema: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(schema, |node, name| {
        let child = &node["properties"][name];
        assert!(
            !child.is_null(),
            "no schema node at {path} (missing `{name}`)"
        );
        child
    })
}

#[test]
fn committed_crd_is_what_the_operator_generates() {
    let generated = crd_yaml().expect("the CRD can be generated");
    assert!(
        committed_crd_text() == generated,
        "crds/signalpipeline.yaml is out of date with the Rust types; regenerate it: {REGENERATE}"
    );
}

#[test]
fn crd_parses_strictly_as_a_custom_resource_definition() {
    let crd: CustomResourceDefinition = parse_strict(&committed_crd());
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("signalpipelines.signals.dev")
    );
    assert_eq!(crd.spec.group, "signals.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    let names = &crd.spec.names;
    assert_eq!(names.kind, "SignalPipeline");
    assert_eq!(names.plural, "signalpipelines");
    assert_eq!(names.singular.as_deref(), Some("signalpipeline"));
    assert_eq!(
        names.short_names.as_deref(),
        Some(&["sigp".to_string()][..])
    );

    let [version] = crd.spec.versions.as_slice() else {
        panic!("exactly one version");
    };
    assert_eq!(version.name, "v1alpha1");
    assert!(version.served && version.storage);
    let subresources = version.subresources.as_ref().expect("subresources");
    assert!(subresources.status.is_some(), "status subresource");
    let scale = subresources.scale.as_ref().expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.workers.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
}

#[test]
fn printer_columns_show_stream_table_replicas_lag_dead_letters_ready_and_age() {
    let crd: CustomResourceDefinition = parse_strict(&committed_crd());
    let columns: Vec<(&str, &str, &str)> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.as_str(), c.type_.as_str(), c.json_path.as_str()))
        .collect();
    assert_eq!(
        columns,
        [
            ("Stream", "string", ".spec.stream.name"),
            ("Table", "string", ".status.table"),
            ("Replicas", "integer", ".status.replicas"),
            ("Lag", "integer", ".status.consumer.numPending"),
            ("DeadLetters", "string", ".status.deadLetter.stream"),
            (
                "Ready",
                "string",
                ".status.conditions[?(@.type==\"Ready\")].status"
            ),
            ("Age", "date", ".metadata.creationTimestamp"),
        ]
    );
}

/// Checks one schema node and its children against the structural-schema rules; returns every
/// violation with its path.
fn structural_violations(node: &Value, path: &str, problems: &mut Vec<String>) {
    let Some(object) = node.as_object() else {
        problems.push(format!("{path}: not an object"));
        return;
    };
    let flag = |key: &str| object.get(key) == Some(&Value::Bool(true));
    let int_or_string = flag("x-kubernetes-int-or-string");
    let preserve_unknown = flag("x-kubernetes-preserve-unknown-fields");
    let type_ = object.get("type").and_then(Value::as_str);

    if type_.is_none() && !int_or_string && !preserve_unknown {
        problems.push(format!("{path}: no `type`"));
    }
    if object.contains_key("$ref") {
        problems.push(format!("{path}: `$ref` (structural schemas are inlined)"));
    }
    for union in ["anyOf", "oneOf", "allOf", "not"] {
        let Some(branches) = object.get(union) else {
            continue;
        };
        // The single union the API server accepts: int-or-string spelled out exactly.
        let int_or_string_union = int_or_string
            && union == "anyOf"
            && *branches == json!([{"type": "integer"}, {"type": "string"}]);
        if !int_or_string_union && branches.to_string().contains("\"type\"") {
            problems.push(format!("{path}: `{union}` with types inside"));
        }
    }
    if object.contains_key("additionalProperties") && object.contains_key("properties") {
        problems.push(format!(
            "{path}: both `properties` and `additionalProperties`"
        ));
    }
    if object.contains_key("nullable") && type_.is_none() {
        problems.push(format!("{path}: `nullable` without a `type`"));
    }
    if let Some(Value::String(format)) = object.get("format")
        && !KNOWN_FORMATS.contains(&format.as_str())
    {
        problems.push(format!(
            "{path}: format `{format}` means nothing to the API server"
        ));
    }
    if type_ == Some("array") && !object.contains_key("items") {
        problems.push(format!("{path}: an array without `items`"));
    }
    if type_ == Some("object")
        && !object.contains_key("properties")
        && !object.contains_key("additionalProperties")
        && !preserve_unknown
    {
        problems.push(format!(
            "{path}: an object with no properties, whose every field would be pruned"
        ));
    }
    if let Some(Value::Object(properties)) = object.get("properties") {
        for (name, child) in properties {
            let child_path = format!("{path}.{name}");
            let description = child.get("description").and_then(Value::as_str);
            if description.is_none_or(|text| text.trim().is_empty()) {
                problems.push(format!(
                    "{child_path}: no description for `kubectl explain`"
                ));
            }
            structural_violations(child, &child_path, problems);
        }
    }
    if let Some(items) = object.get("items") {
        structural_violations(items, &format!("{path}[]"), problems);
    }
    if let Some(additional @ Value::Object(_)) = object.get("additionalProperties") {
        structural_violations(additional, &format!("{path}{{*}}"), problems);
    }
}

#[test]
fn schema_is_structural_and_every_property_is_described() {
    let mut problems = Vec::new();
    structural_violations(&schema(), "<root>", &mut problems);
    assert!(
        problems.is_empty(),
        "the CRD schema is not structural or not documented; fix operator/src/crd.rs (or the doc \
         comments in model/src/spec.rs) and regenerate ({REGENERATE}):\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn kubectl_explain_documents_the_columns() {
    let schema = schema();
    let columns = node(&schema, "spec.clickhouse.columns");
    assert!(
        columns["description"]
            .as_str()
            .is_some_and(|text| text.contains("columns")),
        "{columns}"
    );
    for field in ["name", "type", "from", "default"] {
        assert!(
            columns["items"]["properties"][field]["description"].is_string(),
            "spec.clickhouse.columns[].{field} has no description"
        );
    }
}

#[test]
fn fields_the_data_plane_cannot_change_are_frozen_by_cel_rules() {
    let schema = schema();
    for path in IMMUTABLE_FIELDS {
        let rules = node(&schema, path)["x-kubernetes-validations"]
            .as_array()
            .unwrap_or_else(|| panic!("{path} has no x-kubernetes-validations"));
        assert!(
            rules
                .iter()
                .any(|rule| rule["rule"] == "self == oldSelf" && rule["message"].is_string()),
            "{path} has no `self == oldSelf` transition rule with a message: {rules:?}"
        );
    }
}

/// Validates `value` against the schema keywords this CRD uses (CEL rules are not evaluated);
/// pushes one message per violation.
fn schema_violations(value: &Value, schema: &Value, path: &str, problems: &mut Vec<String>) {
    let mut fail = |message: String| problems.push(format!("{path}: {message}"));
    if value.is_null() {
        if schema["nullable"] != Value::Bool(true) {
            fail("null is not allowed".into());
        }
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        fail(format!("{value} is not one of {allowed:?}"));
    }
    let int_or_string = schema["x-kubernetes-int-or-string"] == Value::Bool(true);
    let type_ = if int_or_string {
        if value.is_i64() || value.is_u64() {
            "integer"
        } else {
            "string"
        }
    } else {
        schema["type"].as_str().unwrap_or_default()
    };
    match type_ {
        "string" => {
            let Some(text) = value.as_str() else {
                return fail(format!("{value} is not a string"));
            };
            let length = text.chars().count() as u64;
            if schema["minLength"].as_u64().is_some_and(|min| length < min) {
                fail(format!(
                    "`{text}` is shorter than minLength {}",
                    schema["minLength"]
                ));
            }
            if schema["maxLength"].as_u64().is_some_and(|max| length > max) {
                fail(format!(
                    "`{text}` is longer than maxLength {}",
                    schema["maxLength"]
                ));
            }
            if let Some(pattern) = schema["pattern"].as_str() {
                let regex = Regex::new(pattern)
                    .unwrap_or_else(|error| panic!("{path}: bad pattern `{pattern}`: {error}"));
                if !regex.is_match(text) {
                    fail(format!("`{text}` does not match {pattern}"));
                }
            }
        }
        "integer" | "number" => {
            let Some(number) = value.as_f64() else {
                return fail(format!("{value} is not a number"));
            };
            if type_ == "integer" && !(value.is_i64() || value.is_u64()) {
                fail(format!("{value} is not an integer"));
            }
            if schema["minimum"].as_f64().is_some_and(|min| number < min) {
                fail(format!("{value} is below minimum {}", schema["minimum"]));
            }
            if schema["maximum"].as_f64().is_some_and(|max| number > max) {
                fail(format!("{value} is above maximum {}", schema["maximum"]));
            }
        }
        "boolean" if !value.is_boolean() => fail(format!("{value} is not a boolean")),
        "array" => {
            let Some(items) = value.as_array() else {
                return fail(format!("{value} is not a list"));
            };
            if schema["minItems"]
                .as_u64()
                .is_some_and(|min| (items.len() as u64) < min)
            {
                fail(format!(
                    "{} items, minItems is {}",
                    items.len(),
                    schema["minItems"]
                ));
            }
            for (index, item) in items.iter().enumerate() {
                schema_violations(
                    item,
                    &schema["items"],
                    &format!("{path}[{index}]"),
                    problems,
                );
            }
        }
        "object" => object_violations(value, schema, path, problems),
        _ => {}
    }
}

fn object_violations(value: &Value, schema: &Value, path: &str, problems: &mut Vec<String>) {
    let Some(fields) = value.as_object() else {
        return problems.push(format!("{path}: {value} is not an object"));
    };
    for required in schema["required"].as_array().into_iter().flatten() {
        let name = required.as_str().unwrap_or_default();
        if !fields.contains_key(name) {
            problems.push(format!("{path}: required field `{name}` is missing"));
        }
    }
    for (name, field) in fields {
        let field_path = format!("{path}.{name}");
        if let Some(field_schema) = schema["properties"].get(name) {
            schema_violations(field, field_schema, &field_path, problems);
        } else if let Some(additional @ Value::Object(_)) = schema.get("additionalProperties") {
            schema_violations(field, additional, &field_path, problems);
        } else {
            // The API server would prune it silently; `kubectl apply` (strict field validation)
            // refuses it.
            problems.push(format!("{field_path}: unknown field"));
        }
    }
}

/// The violations of a whole SignalPipeline document (apiVersion, kind and metadata are the API
/// server's, not the schema's).
fn pipeline_violations(document: &Value) -> Vec<String> {
    let mut body = document.clone();
    if let Some(fields) = body.as_object_mut() {
        for key in ["apiVersion", "kind", "metadata"] {
            fields.remove(key);
        }
    }
    let mut problems = Vec::new();
    schema_violations(&body, &schema(), "", &mut problems);
    problems
}

fn example(relative: &str) -> Value {
    let path = workspace_root().join("examples").join(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    yaml_serde::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn example_files() -> Vec<String> {
    let mut files = Vec::new();
    for dir in ["", "local", "production"] {
        let full = workspace_root().join("examples").join(dir);
        for entry in std::fs::read_dir(&full).expect("examples directory") {
            let path = entry.expect("directory entry").path();
            if path.extension().is_some_and(|ext| ext == "yaml") {
                let name = path.file_name().expect("file name").to_string_lossy();
                files.push(if dir.is_empty() {
                    name.into_owned()
                } else {
                    format!("{dir}/{name}")
                });
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_example_passes_the_schema() {
    let files = example_files();
    assert!(files.len() >= 4, "examples found: {files:?}");
    for file in files {
        let problems = pipeline_violations(&example(&file));
        assert!(
            problems.is_empty(),
            "examples/{file} fails the CRD schema: {problems:#?}"
        );
    }
}

#[test]
fn every_default_passes_its_own_schema() {
    // The API server refuses a CRD whose defaults do not validate.
    fn check(node: &Value, path: &str, problems: &mut Vec<String>) {
        if let Some(default) = node.get("default") {
            schema_violations(default, node, &format!("{path} (default)"), problems);
        }
        for (name, child) in node["properties"].as_object().into_iter().flatten() {
            check(child, &format!("{path}.{name}"), problems);
        }
        if let Some(items) = node.get("items") {
            check(items, &format!("{path}[]"), problems);
        }
    }
    let mut problems = Vec::new();
    check(&schema(), "", &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_schema_refuses_typical_mistakes() {
    let valid = example("transactions.yaml");
    assert_eq!(pipeline_violations(&valid), Vec::<String>::new());
    // (JSON pointer, bad value, what the refusal must mention)
    let mistakes: [(&str, Value, &str); 15] = [
        ("/spec/stream/storage", json!("disk"), "is not one of"),
        ("/spec/stream/retention", json!("forever"), "is not one of"),
        ("/spec/deletionPolicy", json!("delete"), "is not one of"),
        (
            "/spec/consumer/deliverPolicy",
            json!("last"),
            "is not one of",
        ),
        ("/spec/stream/name", json!("signals.all"), "does not match"),
        ("/spec/stream/replicas", json!(6), "above maximum"),
        ("/spec/workers/replicas", json!(-1), "below minimum"),
        ("/spec/workers/batch/maxRows", json!(0), "below minimum"),
        (
            "/spec/workers/batch/maxBytes",
            json!("8MB"),
            "does not match",
        ),
        ("/spec/clickhouse/columns", json!([]), "minItems"),
        (
            "/spec/clickhouse/columns/0/name",
            json!("1st"),
            "does not match",
        ),
        (
            "/spec/clickhouse/table",
            json!("risk-signals"),
            "does not match",
        ),
        (
            "/spec/clickhouse/url",
            json!("tcp://clickhouse:9000"),
            "does not match",
        ),
        ("/spec/workers/replica", json!(2), "unknown field"),
        (
            "/spec/workers/resources/limits/memory",
            json!("256 MB"),
            "does not match",
        ),
    ];
    for (pointer, bad, expected) in mistakes {
        let mut document = valid.clone();
        let (parent, key) = pointer.rsplit_once('/').expect("a pointer with a parent");
        let parent = document
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("{parent} exists in the example"));
        match parent {
            Value::Object(fields) => {
                fields.insert(key.to_string(), bad.clone());
            }
            Value::Array(items) => items[key.parse::<usize>().expect("an index")] = bad.clone(),
            other => panic!("{pointer}: parent is {other}"),
        }
        let problems = pipeline_violations(&document);
        assert!(
            problems.iter().any(|problem| problem.contains(expected)),
            "{pointer} = {bad} should be refused with `{expected}`, got {problems:?}"
        );
    }
}

/// A spec with every optional field set, as a user could write it.
fn full_spec() -> Value {
    let mut spec = example("transactions.yaml")["spec"].clone();
    spec["stream"]["maxMsgs"] = json!(1_000_000);
    spec["stream"]["maxMsgSize"] = json!(1_048_576);
    spec["stream"]["replicas"] = json!(3);
    spec["consumer"]["deliverPolicy"] = json!("new");
    spec["consumer"]["maxAckPending"] = json!(-1);
    spec["workers"]["image"] = json!("registry.example/signal-worker:1");
    spec["workers"]["maxMessageBytes"] = json!("2Mi");
    spec["workers"]["autoscale"] = json!({
        "minReplicas": 1, "maxReplicas": 8, "targetLagPerReplica": 5000,
        "scaleDownStabilization": "10m",
    });
    spec["deadLetter"] = json!({
        "subject": "dlq.SIGNALS.transactions",
        "stream": {
            "managed": true, "name": "SIGNALS_DEAD", "subjects": ["dlq.SIGNALS.>"],
            "storage": "file", "retention": "limits", "discard": "old", "maxAge": "30d",
            "maxBytes": "1Gi", "maxMsgs": 1_000_000, "replicas": 3, "duplicateWindow": "5m",
        },
    });
    spec["deletionPolicy"] = json!("Delete");
    spec
}

#[test]
fn what_the_operator_writes_passes_the_schema() {
    // The operator round-trips specs through its Rust types (the ConfigMap manifest, status
    // applies): whatever serde writes back must be what the schema accepts.
    let mut specs: Vec<(String, Value)> = example_files()
        .into_iter()
        .map(|file| {
            let spec = example(&file)["spec"].clone();
            (file, spec)
        })
        .collect();
    specs.push(("every optional field".to_string(), full_spec()));
    for (label, spec) in specs {
        let parsed: signal_model::SignalPipelineSpec =
            serde_json::from_value(spec).unwrap_or_else(|error| panic!("{label}: {error}"));
        let written = json!({"spec": serde_json::to_value(&parsed).expect("serialises")});
        let problems = pipeline_violations(&written);
        assert!(
            problems.is_empty(),
            "{label} as the operator writes it: {problems:#?}"
        );
    }

    let status = signal_model::SignalPipelineStatus {
        observed_generation: Some(4),
        conditions: vec![signal_model::Condition {
            type_: "Ready".to_string(),
            status: "True".to_string(),
            reason: "Ready".to_string(),
            message: "ok".to_string(),
            last_transition_time: Some("2024-01-01T00:00:00Z".to_string()),
            observed_generation: Some(4),
        }],
        replicas: 2,
        ready_replicas: 2,
        selector: Some("app.kubernetes.io/name=signal-worker".to_string()),
        table: Some("risk.events".to_string()),
        stream: Some(signal_model::StreamStatus {
            messages: 1,
            bytes: 2,
            last_sequence: 3,
            ..Default::default()
        }),
        consumer: Some(signal_model::ConsumerStatus {
            num_pending: 4,
            num_ack_pending: 5,
            num_redelivered: 6,
        }),
        autoscale: Some(signal_model::AutoscaleStatus {
            desired_replicas: 2,
            reason: "lag fits".to_string(),
            low_lag_since: Some("2024-01-01T00:00:00Z".to_string()),
        }),
        dead_letter: Some(signal_model::DeadLetterStatus {
            subject: "dlq.SIGNALS.transactions".to_string(),
            stream: "SIGNALS_DLQ".to_string(),
            messages: 7,
        }),
        partitions: vec![signal_model::PartitionStatus {
            consumer: "transactions-p0".to_string(),
            filter_subject: "part.SIGNALS.0.signals.*".to_string(),
            num_pending: 8,
            num_ack_pending: 9,
        }],
    };
    let written = json!({"spec": full_spec(), "status": status});
    let problems = pipeline_violations(&written);
    assert!(
        problems.is_empty(),
        "the status the operator writes: {problems:#?}"
    );
}

#[test]
fn the_schema_refuses_dead_letter_mistakes() {
    let mut valid = example("transactions.yaml");
    valid["spec"]["deadLetter"] = json!({"subject": "dlq.SIGNALS.tx", "stream": {"maxAge": "30d"}});
    assert_eq!(pipeline_violations(&valid), Vec::<String>::new());
    let mistakes: [(&str, Value, &str); 5] = [
        ("name", json!("signals.dead"), "does not match"),
        ("replicas", json!(0), "below minimum"),
        ("maxMsgs", json!(-2), "below minimum"),
        ("storage", json!("disk"), "is not one of"),
        ("maxAge", json!("2 weeks"), "does not match"),
    ];
    for (field, bad, expected) in mistakes {
        let mut document = valid.clone();
        document["spec"]["deadLetter"]["stream"][field] = bad.clone();
        let problems = pipeline_violations(&document);
        assert!(
            problems.iter().any(|problem| problem.contains(expected)),
            "deadLetter.stream.{field} = {bad} should be refused with `{expected}`, got {problems:?}"
        );
    }
}

#[test]
fn batch_max_wait_is_kept_well_below_ack_wait_by_a_cel_rule_on_the_spec() {
    let schema = schema();
    let rules = node(&schema, "spec")["x-kubernetes-validations"]
        .as_array()
        .expect("spec has x-kubernetes-validations");
    let rule = rules
        .iter()
        .find(|rule| {
            rule["message"]
                .as_str()
                .is_some_and(|m| m.contains("maxWait"))
        })
        .expect("a rule about maxWait");
    let text = rule["rule"].as_str().expect("rule text");
    assert!(
        text.contains(
            "duration(self.workers.batch.maxWait) + duration(self.workers.batch.maxWait) <= duration(self.consumer.ackWait)"
        ),
        "{text}"
    );
    // Optional fields are guarded, so a spec leaving them to their defaults is not refused.
    for guard in [
        "!has(self.workers)",
        "!has(self.workers.batch)",
        "!has(self.consumer)",
    ] {
        assert!(text.contains(guard), "{text} lacks {guard}");
    }
    // The rule's cost is bounded by the length of the two strings.
    for path in ["spec.workers.batch.maxWait", "spec.consumer.ackWait"] {
        assert_eq!(node(&schema, path)["maxLength"], 64, "{path}");
    }
}
