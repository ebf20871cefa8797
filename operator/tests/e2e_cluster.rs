//! End to end against a real cluster: the one `KUBECONFIG` points to, with the CRD installed and
//! the operator running (`scripts/kind-e2e.sh --keep` leaves such a cluster behind).
//!
//! One pipeline goes through its life: applied → `Ready`, with its worker Deployment and
//! ConfigMap; scaled through the scale subresource (what `kubectl scale` and an HPA use) and by
//! editing `spec.workers.replicas`, the Deployment following each time; a column added, which the
//! `TableReady` condition reports for the new generation; a change of `stream.name` refused by
//! the CRD's CEL rule; deleted, the finalizer completing and the workers going with it.
//!
//! Ignored by default. On the cluster `scripts/kind-e2e.sh --keep` leaves (servers from
//! `deploy/dev` in namespace `signals`):
//!
//! ```text
//! SIGNAL_E2E_NATS_URL=nats://nats.signals.svc:4222 \
//! SIGNAL_E2E_CLICKHOUSE_URL=http://clickhouse.signals.svc:8123 \
//! SIGNAL_E2E_NAMESPACE=signals SIGNAL_E2E_CLICKHOUSE_SECRET=clickhouse-auth \
//! cargo test -p signal-operator --test e2e_cluster -- --ignored
//! ```
//!
//! The URLs are the servers as the cluster sees them; `SIGNAL_E2E_NAMESPACE` (default
//! `signal-e2e`, created if missing) is where the pipeline lives; `SIGNAL_E2E_CLICKHOUSE_SECRET`
//! names a Secret there with the ClickHouse `user` and `password`. Without a reachable cluster the
//! test fails within seconds, saying what is missing; every wait is bounded.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use signal_model::SignalPipeline;

const IGNORE_REASON: &str =
    "needs a Kubernetes cluster: KUBECONFIG, SIGNAL_E2E_NATS_URL, SIGNAL_E2E_CLICKHOUSE_URL";
const FIELD_MANAGER: &str = "signal-e2e";
const CRD_NAME: &str = "signalpipelines.signals.dev";
/// One API request; a kubeconfig pointing at nothing fails here instead of hanging.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Creating the stream and table and pulling the worker image on a fresh cluster.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// The operator reacting to an edit of a pipeline it already runs.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_secs(2);

/// What the test needs from its environment.
struct Environment {
    nats_url: String,
    clickhouse_url: String,
    namespace: String,
    clickhouse_secret: Option<String>,
}

impl Environment {
    fn from_env() -> Result<Self> {
        let required = |name: &str| {
            std::env::var(name).ok().filter(|value| !value.is_empty()).ok_or_else(|| {
                anyhow!("{name} is not set; this suite {IGNORE_REASON} (see the top of operator/tests/e2e_cluster.rs)")
            })
        };
        Ok(Self {
            nats_url: required("SIGNAL_E2E_NATS_URL")?,
            clickhouse_url: required("SIGNAL_E2E_CLICKHOUSE_URL")?,
            namespace: std::env::var("SIGNAL_E2E_NAMESPACE")
                .unwrap_or_else(|_| "signal-e2e".to_string()),
            clickhouse_secret: std::env::var("SIGNAL_E2E_CLICKHOUSE_SECRET").ok(),
        })
    }
}

/// Runs one API call with [`REQUEST_TIMEOUT`].
async fn call<T>(what: &str, request: impl Future<Output = kube::Result<T>>) -> Result<T> {
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| anyhow!("{what}: no answer from the cluster within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| what.to_string())
}

/// Polls `check` until it returns `Some`, or fails with `what` and the last observation.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<std::result::Result<T, String>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match check().await? {
            Ok(value) => return Ok(value),
            Err(observed) => observed,
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}; last seen: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Connects and checks the CRD is installed; every failure says what to set up.
async fn connect() -> Result<Client> {
    let client = tokio::time::timeout(REQUEST_TIMEOUT, Client::try_default())
        .await
        .map_err(|_| anyhow!("loading the kubeconfig took longer than {REQUEST_TIMEOUT:?}"))?
        .context("no Kubernetes client: set KUBECONFIG to a cluster with the operator running")?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    call(
        "reading the SignalPipeline CRD (is KUBECONFIG's cluster reachable, and the CRD installed: \
         kubectl apply --server-side -f crds/signalpipeline.yaml?)",
        crds.get(CRD_NAME),
    )
    .await?;
    Ok(client)
}

fn unique_suffix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

/// The pipeline the test runs: its own stream, subjects and table, deleted with it.
fn pipeline_manifest(env: &Environment, name: &str, suffix: u64) -> Value {
    let mut clickhouse = json!({
        "url": env.clickhouse_url,
        "database": "signal_e2e",
        "table": format!("e2e_{suffix}"),
        "orderBy": ["seq"],
        "columns": [
            {"name": "seq", "type": "UInt64", "from": "@sequence"},
            {"name": "subject", "type": "String", "from": "@subject"},
            {"name": "payload", "type": "String", "from": "$"},
        ],
    });
    if let Some(secret) = &env.clickhouse_secret {
        clickhouse["auth"] = json!({"secretRef": {"name": secret}});
    }
    json!({
        "apiVersion": "signals.dev/v1alpha1",
        "kind": "SignalPipeline",
        "metadata": {"name": name, "namespace": env.namespace},
        "spec": {
            "nats": {"url": env.nats_url},
            "stream": {"name": format!("E2E_{suffix}"), "subjects": [format!("e2e.{suffix}.>")]},
            "clickhouse": clickhouse,
            "workers": {"replicas": 1},
            "deletionPolicy": "Delete",
        },
    })
}

fn condition<'a>(pipeline: &'a SignalPipeline, type_: &str) -> Option<&'a signal_model::Condition> {
    pipeline
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

fn describe_conditions(pipeline: &SignalPipeline) -> String {
    pipeline
        .status
        .as_ref()
        .map(|status| {
            status
                .conditions
                .iter()
                .map(|c| format!("{}={} ({}: {})", c.type_, c.status, c.reason, c.message))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_else(|| "no status yet".to_string())
}

/// Waits for `Ready=True` computed for the pipeline's current generation.
async fn wait_ready(api: &Api<SignalPipeline>, name: &str) -> Result<SignalPipeline> {
    eventually("the pipeline becoming Ready", READY_TIMEOUT, || async {
        let pipeline = call("reading the pipeline", api.get(name)).await?;
        let ready = condition(&pipeline, "Ready").is_some_and(|c| {
            c.status == "True" && c.observed_generation == pipeline.metadata.generation
        });
        Ok(if ready {
            Ok(pipeline)
        } else {
            Err(describe_conditions(&pipeline))
        })
    })
    .await
}

async fn wait_deployment_replicas(
    deployments: &Api<Deployment>,
    name: &str,
    replicas: i32,
) -> Result<()> {
    eventually(
        &format!("Deployment {name} following to {replicas} replicas"),
        FOLLOW_TIMEOUT,
        || async {
            let deployment = call("reading the worker Deployment", deployments.get(name)).await?;
            let current = deployment.spec.as_ref().and_then(|s| s.replicas);
            Ok(if current == Some(replicas) {
                Ok(())
            } else {
                Err(format!("spec.replicas {current:?}"))
            })
        },
    )
    .await
}

async fn ensure_namespace(client: &Client, namespace: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
    call(
        &format!("creating namespace {namespace}"),
        namespaces.patch(
            namespace,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&body),
        ),
    )
    .await?;
    Ok(())
}

async fn lifecycle(client: &Client, env: &Environment, name: &str, suffix: u64) -> Result<()> {
    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), &env.namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &env.namespace);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &env.namespace);
    let worker = format!("{name}-worker");

    call(
        "applying the SignalPipeline",
        pipelines.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&pipeline_manifest(env, name, suffix)),
        ),
    )
    .await?;
    eventually(
        "the operator adding its finalizer (is the operator running?)",
        FOLLOW_TIMEOUT,
        || async {
            let pipeline = call("reading the pipeline", pipelines.get(name)).await?;
            let finalizers = pipeline.metadata.finalizers.clone().unwrap_or_default();
            Ok(if finalizers.iter().any(|f| f == "signals.dev/cleanup") {
                Ok(())
            } else {
                Err(format!("finalizers {finalizers:?}"))
            })
        },
    )
    .await?;
    let ready = wait_ready(&pipelines, name).await?;
    let status = ready
        .status
        .as_ref()
        .context("a Ready pipeline has a status")?;
    let table = format!("signal_e2e.e2e_{suffix}");
    ensure!(
        status.table.as_deref() == Some(table.as_str()),
        "status.table is {:?}, expected {table}",
        status.table
    );

    let deployment = call("reading the worker Deployment", deployments.get(&worker)).await?;
    let replicas = deployment.spec.as_ref().and_then(|s| s.replicas);
    ensure!(
        replicas == Some(1),
        "the Deployment has {replicas:?} replicas, the spec 1"
    );
    let owner = deployment
        .metadata
        .owner_references
        .as_ref()
        .and_then(|owners| owners.first())
        .context("the Deployment has an owner")?;
    ensure!(
        (owner.kind.as_str(), owner.name.as_str()) == ("SignalPipeline", name),
        "the Deployment is owned by {} {}",
        owner.kind,
        owner.name
    );
    let configmap = call(
        "reading the pipeline ConfigMap",
        configmaps.get(&format!("{name}-pipeline")),
    )
    .await?;
    let manifest = configmap
        .data
        .as_ref()
        .and_then(|data| data.get("pipeline.yaml"))
        .context("the ConfigMap holds pipeline.yaml")?;
    ensure!(
        manifest.contains(&format!("E2E_{suffix}")),
        "the manifest does not name the stream: {manifest}"
    );

    // `kubectl scale sigp NAME --replicas 2` goes through the scale subresource.
    call(
        "scaling through the scale subresource",
        pipelines.patch_scale(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 2}})),
        ),
    )
    .await?;
    wait_deployment_replicas(&deployments, &worker, 2).await?;
    let scale = call("reading the scale subresource", pipelines.get_scale(name)).await?;
    let scale_replicas = scale.spec.and_then(|s| s.replicas);
    ensure!(
        scale_replicas == Some(2),
        "the scale subresource says {scale_replicas:?}"
    );
    let selector = scale.status.and_then(|s| s.selector).unwrap_or_default();
    ensure!(
        selector.contains(&format!("app.kubernetes.io/instance={name}")),
        "the scale subresource's selector `{selector}` does not select the workers"
    );

    call(
        "editing spec.workers.replicas",
        pipelines.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"workers": {"replicas": 3}}})),
        ),
    )
    .await?;
    wait_deployment_replicas(&deployments, &worker, 3).await?;

    // A merge patch replaces the whole list: send every column plus the new one.
    let current = call("reading the pipeline", pipelines.get(name)).await?;
    let mut columns = serde_json::to_value(&current.spec.clickhouse.columns)?;
    columns
        .as_array_mut()
        .context("columns are a list")?
        .push(json!({"name": "note", "type": "String", "from": "$.note", "default": ""}));
    let edited = call(
        "adding a column",
        pipelines.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"clickhouse": {"columns": columns}}})),
        ),
    )
    .await?;
    let generation = edited.metadata.generation;
    eventually(
        "TableReady for the new generation",
        FOLLOW_TIMEOUT,
        || async {
            let pipeline = call("reading the pipeline", pipelines.get(name)).await?;
            let table = condition(&pipeline, "TableReady");
            Ok(match table {
                Some(c) if c.observed_generation == generation && c.status == "True" => {
                    if condition(&pipeline, "SchemaDrift").is_some() {
                        Err(format!(
                            "schema drift after adding a column: {}",
                            describe_conditions(&pipeline)
                        ))
                    } else {
                        Ok(())
                    }
                }
                _ => Err(describe_conditions(&pipeline)),
            })
        },
    )
    .await?;

    // The CRD's CEL rule refuses a new stream name; the API server answers 422.
    let refused = tokio::time::timeout(
        REQUEST_TIMEOUT,
        pipelines.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"stream": {"name": "RENAMED"}}})),
        ),
    )
    .await
    .map_err(|_| anyhow!("renaming the stream: no answer within {REQUEST_TIMEOUT:?}"))?;
    match refused {
        Err(kube::Error::Api(status)) if status.message.contains("cannot be changed") => {}
        other => bail!("renaming the stream should be refused by the CEL rule, got {other:?}"),
    }

    call(
        "deleting the pipeline",
        pipelines.delete(name, &DeleteParams::default()),
    )
    .await?;
    eventually(
        "the finalizer completing and the pipeline disappearing",
        FOLLOW_TIMEOUT,
        || async {
            Ok(
                match call("reading the pipeline", pipelines.get_opt(name)).await? {
                    None => Ok(()),
                    Some(pipeline) => Err(format!(
                        "still there with finalizers {:?}; {}",
                        pipeline.metadata.finalizers,
                        describe_conditions(&pipeline)
                    )),
                },
            )
        },
    )
    .await?;
    eventually(
        "the worker Deployment being garbage collected",
        FOLLOW_TIMEOUT,
        || async {
            Ok(
                match call(
                    "reading the worker Deployment",
                    deployments.get_opt(&worker),
                )
                .await?
                {
                    None => Ok(()),
                    Some(_) => Err("the Deployment still exists".to_string()),
                },
            )
        },
    )
    .await
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster: KUBECONFIG, SIGNAL_E2E_NATS_URL, SIGNAL_E2E_CLICKHOUSE_URL"]
async fn a_pipeline_lives_through_apply_scale_edit_and_delete() {
    let env = Environment::from_env().unwrap_or_else(|error| panic!("{error:#}"));
    let client = connect().await.unwrap_or_else(|error| panic!("{error:#}"));
    ensure_namespace(&client, &env.namespace)
        .await
        .unwrap_or_else(|error| panic!("{error:#}"));
    let suffix = unique_suffix();
    let name = format!("e2e-{suffix}");

    let outcome = lifecycle(&client, &env, &name, suffix).await;
    if outcome.is_err() {
        // Leave no pipeline behind; the operator removes its stream and table (deletionPolicy
        // Delete). Best effort: the failure being reported matters more.
        let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), &env.namespace);
        let _ = call(
            "cleaning up",
            pipelines.delete(&name, &DeleteParams::default()),
        )
        .await;
    }
    if let Err(error) = outcome {
        panic!("{name}: {error:#}");
    }
}
