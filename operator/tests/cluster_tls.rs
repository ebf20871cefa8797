//! `examples/production/tls.yaml` on a real kube-apiserver and kube-controller-manager, with the
//! operator binary out of cluster and nats-server, clickhouse-server and redis-server serving
//! mutual TLS with a throwaway CA.
//!
//! The test creates the manifest's ConfigMap (`signal-ca`) and Secret (`signal-client-tls`),
//! applies the file with only the servers' addresses substituted, and sees the operator reconcile
//! over TLS with the material it read from them. The worker runs as a local process the way the
//! pod would: every volume of the operator's Deployment is resolved from the API (the pipeline
//! ConfigMap, the TLS Secret and ConfigMap keys) into files under the container's mount paths
//! (re-rooted in a temporary directory), and it gets the container's variables. Rows reach
//! ClickHouse, keys reach Redis, and the pipeline is `Ready`.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/worker_binary.rs"]
mod worker_binary;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;
use signal_demo::sample_signals::sample_signal;
use signal_model::SignalPipeline;
use signal_model::tls::{TlsMaterial, TlsServer};
use signal_operator::workload::deployment::TLS_DIR;
use signal_testkit::certs::CertificateAuthority;
use signal_testkit::{ChildProcess, ClickHouseServer, NatsServer, RedisServer, ServerTls};

use cluster::{
    FOLLOW_TIMEOUT, Operator, OperatorOptions, StandInKubelet, apply_pipeline, call, eventually,
    wait_condition,
};

const EXAMPLE: &str = include_str!("../../examples/production/tls.yaml");

/// The example with the testkit servers' addresses in place of the in-cluster Services.
fn example_for(namespace: &str, nats: &str, clickhouse: &str, redis: &str) -> serde_json::Value {
    let text = EXAMPLE
        .replace("tls://nats.signals.svc:4222", nats)
        .replace("https://clickhouse.signals.svc:8443", clickhouse)
        .replace("rediss://redis.signals.svc:6380", redis)
        .replace("namespace: signals", &format!("namespace: {namespace}"));
    assert!(!text.contains(".svc"), "an address was not substituted");
    yaml_serde::from_str(&text).expect("the example parses")
}

/// Writes what the kubelet would mount for `deployment`'s worker under `root` (mount paths
/// re-rooted there) and returns the container's variables with paths re-rooted the same way.
async fn materialise_pod(
    client: &kube::Client,
    namespace: &str,
    deployment: &Deployment,
    root: &Path,
) -> (Vec<String>, BTreeMap<String, String>) {
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let container = &pod.containers[0];
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let rerooted = |path: &str| root.join(path.trim_start_matches('/'));
    for mount in container.volume_mounts.iter().flatten() {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap();
        let dir = rerooted(&mount.mount_path);
        std::fs::create_dir_all(&dir).unwrap();
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(source) = &volume.secret {
            let secret = call(
                "reading a mounted Secret",
                secrets.get(source.secret_name.as_deref().unwrap()),
            )
            .await
            .unwrap();
            let data = secret.data.unwrap_or_default();
            for item in source.items.iter().flatten() {
                files.push((item.path.clone(), data[&item.key].0.clone()));
            }
        } else if let Some(source) = &volume.config_map {
            let config_map = call("reading a mounted ConfigMap", config_maps.get(&source.name))
                .await
                .unwrap();
            let data = config_map.data.unwrap_or_default();
            match &source.items {
                Some(items) => {
                    for item in items {
                        files.push((item.path.clone(), data[&item.key].clone().into_bytes()));
                    }
                }
                None => {
                    for (key, value) in data {
                        files.push((key, value.into_bytes()));
                    }
                }
            }
        }
        for (file, contents) in files {
            std::fs::write(dir.join(file), contents).unwrap();
        }
    }
    let reroot_value = |value: &str| {
        if value.starts_with('/') && (value.starts_with(TLS_DIR) || value.starts_with("/etc")) {
            rerooted(value).display().to_string()
        } else {
            value.to_string()
        }
    };
    let args: Vec<String> = container
        .args
        .iter()
        .flatten()
        .map(|arg| reroot_value(arg))
        .collect();
    let env = container
        .env
        .iter()
        .flatten()
        .map(|var| {
            let value = var.value.as_deref().expect("only literal values (paths)");
            (var.name.clone(), reroot_value(value))
        })
        .collect();
    (args, env)
}

/// Publishes `count` sample signals on `subject` over mutual TLS.
async fn publish(url: &str, ca_pem: &str, client_cert: (&str, &str), subject: &str, count: u64) {
    let tls = TlsMaterial {
        server: TlsServer::Nats.name(),
        ca_pem: Some(ca_pem.to_string()),
        client: Some(signal_model::tls::ClientIdentity {
            cert_pem: client_cert.0.to_string(),
            key_pem: client_cert.1.to_string(),
        }),
        insecure_skip_verify: false,
    };
    let client =
        signal_clients::connect::nats(url, "cluster tls test", &Default::default(), Some(&tls))
            .await
            .unwrap();
    let js = async_nats::jetstream::new(client);
    let mut acks = Vec::new();
    for index in 0..count {
        acks.push(
            js.publish(subject.to_string(), sample_signal(index).into())
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_production_tls_example_is_ready_and_stores_rows_and_cache_keys() {
    let ca = CertificateAuthority::new("signal cluster test CA").unwrap();
    let server_tls = || ServerTls::new(&ca).unwrap().requiring_client_certificate();
    let nats = NatsServer::start_with_tls(server_tls()).unwrap();
    let clickhouse = ClickHouseServer::start_with_tls(server_tls()).unwrap();
    let redis = RedisServer::start_with_tls(server_tls()).unwrap();
    let client_cert = ca.issue_client("signal-worker", &[]).unwrap();

    let client = cluster::admin_client().await.unwrap();
    let namespace = cluster::namespace("tls");
    let operator = Operator::start(OperatorOptions {
        namespaces: vec![namespace.clone()],
        ..OperatorOptions::default()
    })
    .unwrap();
    let _kubelet = StandInKubelet::start(client.clone(), &namespace);

    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let metadata = |name: &str| ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.clone()),
        ..ObjectMeta::default()
    };
    call(
        "creating the CA ConfigMap",
        config_maps.create(
            &PostParams::default(),
            &ConfigMap {
                metadata: metadata("signal-ca"),
                data: Some(BTreeMap::from([("ca.crt".to_string(), ca.cert_pem())])),
                ..ConfigMap::default()
            },
        ),
    )
    .await
    .unwrap();
    call(
        "creating the client certificate Secret",
        secrets.create(
            &PostParams::default(),
            &Secret {
                metadata: metadata("signal-client-tls"),
                type_: Some("kubernetes.io/tls".to_string()),
                data: Some(BTreeMap::from([
                    (
                        "tls.crt".to_string(),
                        ByteString(client_cert.cert_pem.clone().into_bytes()),
                    ),
                    (
                        "tls.key".to_string(),
                        ByteString(client_cert.key_pem.clone().into_bytes()),
                    ),
                ])),
                ..Secret::default()
            },
        ),
    )
    .await
    .unwrap();

    let manifest = example_for(
        &namespace,
        &nats.url(),
        &clickhouse.https_url().unwrap(),
        &redis.tls_url().unwrap(),
    );
    let name = manifest["metadata"]["name"].as_str().unwrap().to_string();
    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), &namespace);
    apply_pipeline(&pipelines, &manifest).await.unwrap();
    // The operator reached NATS and ClickHouse over TLS with what it read from the objects.
    for condition in ["StreamReady", "ConsumerReady", "TableReady"] {
        wait_condition(&pipelines, &name, condition, FOLLOW_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", operator.log_text()));
    }

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let deployment = eventually("the worker Deployment", FOLLOW_TIMEOUT, || async {
        Ok(
            match call("reading", deployments.get_opt(&format!("{name}-worker"))).await? {
                Some(deployment) => Ok(deployment),
                None => Err("not yet".to_string()),
            },
        )
    })
    .await
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let (args, env) = materialise_pod(&client, &namespace, &deployment, root.path()).await;
    assert_eq!(
        env.keys().filter(|name| name.contains("_TLS_")).count(),
        9,
        "a CA, certificate and key file for each of the three servers: {env:?}"
    );
    let log: PathBuf = root.path().join("worker.log");
    let out = std::fs::File::create(&log).unwrap();
    let listen_index = args.iter().position(|arg| arg == "--listen").unwrap() + 1;
    let mut args = args;
    args[listen_index] = "127.0.0.1:0".to_string();
    let mut command = Command::new(worker_binary::worker_binary());
    command
        .args(&args)
        .envs(&env)
        .env("POD_NAME", format!("{name}-worker-local"))
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let _worker = ChildProcess::spawn(command).unwrap();

    publish(
        &nats.url(),
        &ca.cert_pem(),
        (&client_cert.cert_pem, &client_cert.key_pem),
        "transactions.card",
        200,
    )
    .await;
    let worker_log = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("200 rows in ClickHouse", FOLLOW_TIMEOUT, || async {
        let count = clickhouse
            .query("SELECT count() FROM risksignal.transactions_tls")
            .unwrap_or_default();
        Ok(if count.trim() == "200" {
            Ok(())
        } else {
            Err(format!("{} rows", count.trim()))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\nworker log:\n{}", worker_log()));
    eventually("cache keys in Redis", FOLLOW_TIMEOUT, || async {
        let keys: Vec<String> = redis
            .command(&["KEYS", "wallet:*:latest-tls"])
            .unwrap_or_default();
        Ok(if keys.is_empty() {
            Err("none".to_string())
        } else {
            Ok(())
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\nworker log:\n{}", worker_log()));
    wait_condition(&pipelines, &name, "Ready", FOLLOW_TIMEOUT)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}\noperator log:\n{}\nworker log:\n{}",
                operator.log_text(),
                worker_log()
            )
        });
}
