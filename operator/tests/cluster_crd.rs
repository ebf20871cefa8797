//! The CRD from `crds/` in a real kube-apiserver: accepted, established, its CEL rules evaluated
//! (each immutable field refused with its rule's message), its enums, ranges and patterns
//! enforced at apply, unknown fields refused (strict field validation) or pruned (structural
//! schema), and its descriptions served to `kubectl explain`.
//!
//! No operator runs here: this is the API server's own behaviour with our schema.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/dataplane.rs"]
mod dataplane;

use anyhow::{Context as _, Result, bail};
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use signal_model::SignalPipeline;

use cluster::{FIELD_MANAGER, admin_client, call, kubectl, namespace, pipeline_object};

/// A valid pipeline; nothing connects to its servers here.
fn manifest(namespace: &str, name: &str) -> Value {
    let mut spec = dataplane::pipeline_spec(
        &name.replace('-', "_"),
        "nats://127.0.0.1:4222",
        "http://127.0.0.1:8123",
    );
    spec.deletion_policy = signal_model::DeletionPolicy::Delete;
    pipeline_object(namespace, name, &spec)
}

/// Applies `manifest` and returns the API server's refusal message, failing if it was accepted.
async fn refused(api: &Api<DynamicObject>, name: &str, manifest: &Value) -> Result<String> {
    let outcome = tokio::time::timeout(
        cluster::REQUEST_TIMEOUT,
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(manifest),
        ),
    )
    .await
    .context("no answer")?;
    match outcome {
        Err(kube::Error::Api(status)) => Ok(format!("{} ({})", status.message, status.code)),
        Err(other) => bail!("expected a refusal from the API server, got {other}"),
        Ok(_) => bail!("accepted, but should have been refused: {manifest}"),
    }
}

fn dynamic_api(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::erase::<SignalPipeline>(&()),
    )
}

#[tokio::test]
async fn every_cel_rule_is_evaluated_with_its_message() {
    let client = admin_client().await.unwrap();
    let namespace = namespace("crd-cel");
    let api = dynamic_api(&client, &namespace);
    let name = "immutable";
    let mut base = manifest(&namespace, name);
    base["spec"]["deadLetter"] = json!({"stream": {"name": "IMMUTABLE_DL", "storage": "file"}});
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&base),
    )
    .await
    .unwrap();

    let immutable: [(&str, Value); 7] = [
        ("stream.name", json!("RENAMED")),
        ("stream.storage", json!("memory")),
        ("clickhouse.database", json!("elsewhere")),
        ("clickhouse.table", json!("other_table")),
        ("consumer.deliverPolicy", json!("new")),
        ("deadLetter.stream.name", json!("RENAMED_DL")),
        ("deadLetter.stream.storage", json!("memory")),
    ];
    for (field, value) in immutable {
        let mut changed = base.clone();
        let pointer = format!("/spec/{}", field.replace('.', "/"));
        *changed
            .pointer_mut(&pointer)
            .expect("the base sets every field") = value;
        let message = refused(&api, name, &changed).await.unwrap();
        let rule = format!("{field} cannot be changed after creation");
        assert!(
            message.contains(&rule) && message.contains("422"),
            "changing {field}: {message}"
        );
    }

    // A mutable field goes through, so the refusals above are the rules and not the patch.
    let mut scaled = base.clone();
    scaled["spec"]["workers"]["replicas"] = json!(3);
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&scaled),
    )
    .await
    .unwrap();

    // The rules on values: byte sizes must not be negative; minReplicas <= maxReplicas.
    let mut negative = scaled.clone();
    negative["spec"]["stream"]["maxBytes"] = json!(-1);
    let message = refused(&api, name, &negative).await.unwrap();
    assert!(message.contains("must not be negative"), "{message}");
    let mut autoscale = scaled.clone();
    autoscale["spec"]["workers"]["autoscale"] =
        json!({"minReplicas": 5, "maxReplicas": 2, "targetLagPerReplica": 100});
    let message = refused(&api, name, &autoscale).await.unwrap();
    assert!(
        message.contains("minReplicas must not exceed maxReplicas"),
        "{message}"
    );
    // The redelivery rules: ackWait at least 1s, a batch's maxWait at most a third of ackWait.
    let mut short_ack = scaled.clone();
    short_ack["spec"]["consumer"]["ackWait"] = json!("500ms");
    let message = refused(&api, name, &short_ack).await.unwrap();
    assert!(
        message.contains("consumer.ackWait must be at least 1s"),
        "{message}"
    );
    let mut long_batch = scaled.clone();
    long_batch["spec"]["consumer"]["ackWait"] = json!("30s");
    long_batch["spec"]["workers"]["batch"] = json!({"maxWait": "11s"});
    let message = refused(&api, name, &long_batch).await.unwrap();
    assert!(
        message.contains("workers.batch.maxWait must be at most a third of consumer.ackWait"),
        "{message}"
    );
}

/// What is broken, how, and what the API server says about it.
type InvalidCase = (&'static str, fn(&mut Value), &'static str);

#[tokio::test]
async fn invalid_enums_ranges_and_patterns_are_refused_at_apply() {
    let client = admin_client().await.unwrap();
    let namespace = namespace("crd-invalid");
    let api = dynamic_api(&client, &namespace);
    let cases: [InvalidCase; 7] = [
        (
            "deletionPolicy",
            |m| m["spec"]["deletionPolicy"] = json!("Sometimes"),
            "Unsupported value: \"Sometimes\"",
        ),
        (
            "stream.retention",
            |m| m["spec"]["stream"]["retention"] = json!("forever"),
            "Unsupported value: \"forever\"",
        ),
        (
            "stream.replicas",
            |m| m["spec"]["stream"]["replicas"] = json!(6),
            "should be less than or equal to 5",
        ),
        (
            "workers.replicas",
            |m| m["spec"]["workers"]["replicas"] = json!(-1),
            "should be greater than or equal to 0",
        ),
        (
            "stream.name",
            |m| m["spec"]["stream"]["name"] = json!("not a name!"),
            "should match '^[A-Za-z0-9_-]+$'",
        ),
        (
            "clickhouse.columns",
            |m| m["spec"]["clickhouse"]["columns"] = json!([]),
            "should have at least 1 items",
        ),
        (
            "spec.nats",
            |m| {
                m["spec"].as_object_mut().map(|spec| spec.remove("nats"));
            },
            "Required value",
        ),
    ];
    for (index, (what, break_it, expected)) in cases.into_iter().enumerate() {
        let name = format!("invalid-{index}");
        let mut bad = manifest(&namespace, &name);
        break_it(&mut bad);
        let message = refused(&api, &name, &bad).await.unwrap();
        assert!(message.contains(expected), "{what}: {message}");
    }
    let list = api.list(&Default::default()).await.unwrap();
    assert!(list.items.is_empty(), "nothing invalid was stored");
}

#[tokio::test]
async fn unknown_fields_are_refused_when_strict_and_pruned_otherwise() {
    let client = admin_client().await.unwrap();
    let namespace = namespace("crd-unknown");
    let api = dynamic_api(&client, &namespace);
    let unknown = json!({"spec": {"stream": {"colour": "blue"}, "surprise": {"nested": true}}});

    // Server-side apply checks every field against the schema.
    let mut applied = manifest(&namespace, "unknown");
    applied["spec"]["stream"]["colour"] = json!("blue");
    let message = refused(&api, "unknown", &applied).await.unwrap();
    assert!(
        message.contains(".spec.stream.colour: field not declared in schema"),
        "{message}"
    );

    api.patch(
        "unknown",
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&manifest(&namespace, "unknown")),
    )
    .await
    .unwrap();
    // Other writes: refused with strict field validation...
    let strict = api
        .patch(
            "unknown",
            &PatchParams::default().validation_strict(),
            &Patch::Merge(&unknown),
        )
        .await;
    match strict {
        Err(kube::Error::Api(status)) => assert!(
            status
                .message
                .contains("unknown field \"spec.stream.colour\"")
                && status.message.contains("unknown field \"spec.surprise\""),
            "{}",
            status.message
        ),
        other => panic!("strict field validation should refuse unknown fields: {other:?}"),
    }
    // ...and otherwise pruned by the structural schema before the object is stored.
    api.patch(
        "unknown",
        &PatchParams::default().validation_ignore(),
        &Patch::Merge(&unknown),
    )
    .await
    .unwrap();
    let stored = call("reading the pipeline", api.get("unknown"))
        .await
        .unwrap();
    let spec = &stored.data["spec"];
    assert!(spec["stream"].get("colour").is_none(), "pruned: {spec}");
    assert!(spec.get("surprise").is_none(), "pruned: {spec}");
    // Defaults from the schema were filled in by the API server.
    let mut sparse = manifest(&namespace, "sparse");
    for (section, field) in [("stream", "storage"), ("consumer", "deliverPolicy")] {
        sparse["spec"][section]
            .as_object_mut()
            .map(|object| object.remove(field));
    }
    sparse["spec"]
        .as_object_mut()
        .map(|spec| spec.remove("deletionPolicy"));
    api.patch(
        "sparse",
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&sparse),
    )
    .await
    .unwrap();
    let defaulted = api.get("sparse").await.unwrap().data["spec"].clone();
    assert_eq!(defaulted["deletionPolicy"], json!("Retain"));
    assert_eq!(defaulted["stream"]["storage"], json!("file"));
    assert_eq!(defaulted["consumer"]["deliverPolicy"], json!("all"));
}

#[tokio::test]
async fn kubectl_explain_shows_the_descriptions() {
    admin_client().await.unwrap();
    // The API server publishes a new CRD's OpenAPI schema a moment after the CRD is established.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let top = loop {
        match kubectl(&["explain", "sigp"]) {
            Ok(text) => break text,
            Err(error) if std::time::Instant::now() < deadline => {
                eprintln!("waiting for the CRD's OpenAPI schema: {error:#}");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(error) => panic!("{error:#}"),
        }
    };
    assert!(
        top.contains("A NATS JetStream stream ingested into a ClickHouse table"),
        "{top}"
    );
    let stream = kubectl(&["explain", "signalpipeline.spec.stream.name"]).unwrap();
    assert!(
        stream.contains("Stream name: letters, digits, `-` and `_`. Cannot change."),
        "{stream}"
    );
    let policy = kubectl(&["explain", "sigp.spec.deletionPolicy"]).unwrap();
    assert!(
        policy.contains("What happens to the stream, consumer and table"),
        "{policy}"
    );
}
