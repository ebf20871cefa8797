//! The Helm chart in a real kube-apiserver: `helm install` succeeds (the chart's kubeVersion,
//! CRD, ServiceAccount and RBAC are accepted), and the operator, run out of cluster as the chart's
//! own ServiceAccount (a real token from the TokenRequest API, so only the chart's RBAC applies),
//! reconciles a pipeline whose ClickHouse credentials come from a Secret, without a single
//! "forbidden" in its log; the worker Deployment carries those credentials only as `secretKeyRef`;
//! with `watchNamespaces` set, a pipeline in another namespace is left alone.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/dataplane.rs"]
mod dataplane;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use signal_model::{AuthSpec, SecretRef, SignalPipeline};

use cluster::{
    FIELD_MANAGER, FOLLOW_TIMEOUT, Operator, OperatorOptions, apply_pipeline, call, cluster,
    pipeline_object, wait_condition,
};

/// How long the unwatched pipeline is watched for any sign of the operator.
const UNTOUCHED_FOR: Duration = Duration::from_secs(8);

/// A token for the ServiceAccount from the TokenRequest API, as a pod would get it.
async fn service_account_token(client: &Client, namespace: &str, name: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let issued = call(
        "requesting a ServiceAccount token",
        accounts.create_token_request(name, &PostParams::default(), &request),
    )
    .await
    .unwrap();
    issued
        .status
        .expect("a TokenRequest answer has a status")
        .token
}

#[tokio::test]
async fn the_charts_rbac_is_enough_and_only_watched_namespaces_are_touched() {
    let client = cluster::admin_client().await.unwrap();
    let release_namespace = cluster::namespace("chart");
    let watched = cluster::namespace("chart-watched");
    let other = cluster::namespace("chart-other");
    let release = format!("sig{}", &release_namespace[release_namespace.len() - 8..]);
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/signal-operator");

    let installed = cluster::helm(&[
        "install",
        &release,
        chart,
        "--namespace",
        &release_namespace,
        "--set",
        &format!("watchNamespaces[0]={watched}"),
    ])
    .unwrap();
    assert!(installed.contains("STATUS: deployed"), "{installed}");

    // The chart's ServiceAccount, and a token for it.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &release_namespace);
    let chart_accounts = call(
        "listing ServiceAccounts",
        accounts
            .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={release}"))),
    )
    .await
    .unwrap();
    let account = chart_accounts
        .items
        .first()
        .and_then(|a| a.metadata.name.clone())
        .expect("the chart creates a ServiceAccount");
    let token = service_account_token(&client, &release_namespace, &account).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("service-account.kubeconfig");
    cluster()
        .write_token_kubeconfig(&kubeconfig, &token, &release_namespace)
        .unwrap();

    // The token is the ServiceAccount's and nothing more: outside its Roles it is refused.
    let as_operator = cluster::client_for(Some(&kubeconfig)).await.unwrap();
    let outside: Api<Secret> = Api::namespaced(as_operator, &other);
    match outside.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{}", status.message),
        other => panic!("the chart's ServiceAccount should not list Secrets elsewhere: {other:?}"),
    }

    // ClickHouse credentials in a Secret (the test server's default user has no password).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &watched);
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "clickhouse-auth"},
        "stringData": {"user": "default", "password": ""},
    });
    call(
        "creating the Secret",
        secrets.patch(
            "clickhouse-auth",
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&secret),
        ),
    )
    .await
    .unwrap();

    // Run as the chart's pod would: its ServiceAccount, its namespaces, leader election on.
    let operator = Operator::start(OperatorOptions {
        namespaces: vec![watched.clone()],
        leader_election_namespace: Some(release_namespace.clone()),
        identity: Some(format!("{release}-0")),
        kubeconfig: Some(kubeconfig.clone()),
        ..OperatorOptions::default()
    })
    .unwrap();

    let mut spec = dataplane::shared_pipeline_spec(&dataplane::unique("chart"));
    spec.clickhouse.auth = Some(AuthSpec {
        secret_ref: SecretRef {
            name: "clickhouse-auth".to_string(),
        },
    });
    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), &watched);
    apply_pipeline(&pipelines, &pipeline_object(&watched, "with-secret", &spec))
        .await
        .unwrap();
    for condition in ["StreamReady", "ConsumerReady", "TableReady"] {
        wait_condition(&pipelines, "with-secret", condition, FOLLOW_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &watched);
    let deployment = cluster::eventually("the worker Deployment", FOLLOW_TIMEOUT, || async {
        Ok(
            match call("reading", deployments.get_opt("with-secret-worker")).await? {
                Some(deployment) => Ok(deployment),
                None => Err("not yet".to_string()),
            },
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));

    // Credentials reach the workers only as references the kubelet resolves.
    let pod_spec = deployment.spec.unwrap().template.spec.unwrap();
    let mut references = 0;
    for container in pod_spec
        .containers
        .iter()
        .chain(pod_spec.init_containers.iter().flatten())
    {
        for variable in container.env.iter().flatten() {
            let from_secret = variable
                .value_from
                .as_ref()
                .and_then(|source| source.secret_key_ref.as_ref());
            if let Some(reference) = from_secret {
                assert_eq!(reference.name, "clickhouse-auth", "{}", variable.name);
                references += 1;
            }
            let looks_secret = ["PASSWORD", "USER", "TOKEN", "CREDS"]
                .iter()
                .any(|word| variable.name.contains(word));
            assert!(
                !(looks_secret && variable.value.is_some()),
                "{} has a literal value",
                variable.name
            );
        }
    }
    assert!(references >= 2, "user and password come from the Secret");

    // The pipeline outside watchNamespaces: no finalizer, no status, no Deployment.
    let unwatched: Api<SignalPipeline> = Api::namespaced(client.clone(), &other);
    let other_spec = dataplane::shared_pipeline_spec(&dataplane::unique("unwatched"));
    apply_pipeline(
        &unwatched,
        &pipeline_object(&other, "unwatched", &other_spec),
    )
    .await
    .unwrap();
    tokio::time::sleep(UNTOUCHED_FOR).await;
    let untouched = call("reading", unwatched.get("unwatched")).await.unwrap();
    assert!(untouched.metadata.finalizers.unwrap_or_default().is_empty());
    assert!(untouched.status.is_none(), "{:?}", untouched.status);
    let other_deployments: Api<Deployment> = Api::namespaced(client.clone(), &other);
    assert!(
        call("reading", other_deployments.get_opt("unwatched-worker"))
            .await
            .unwrap()
            .is_none()
    );

    let log = operator.log_text();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the chart's RBAC was not enough:\n{log}"
    );
    cluster::helm(&["uninstall", &release, "--namespace", &release_namespace]).unwrap();
}
