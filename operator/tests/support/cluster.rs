//! Shared pieces of the tests against a real Kubernetes control plane (testkit's `KubeCluster`:
//! etcd, kube-apiserver and kube-controller-manager on loopback).
//!
//! One control plane per test binary ([`cluster`]); each test works in its own namespace. The
//! operator runs as its own binary, out of cluster, with `KUBECONFIG` pointing at the control
//! plane ([`Operator`]), so these tests treat it as a black box and see only what a user would.
//! No node runs: worker pods stay pending unless a test marks them ready ([`mark_pods_ready`]).
#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::{Value, json};
use signal_model::{SignalPipeline, SignalPipelineSpec};
use signal_testkit::{ChildProcess, KubeCluster};

/// The operator binary under test.
pub const OPERATOR: &str = env!("CARGO_BIN_EXE_signal-operator");
pub const CRD_NAME: &str = "signalpipelines.signals.dev";
pub const FIELD_MANAGER: &str = "signal-cluster-test";
/// One API request; a hung server fails the test instead of stalling the suite.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// The operator reacting to something (a new pipeline, an edit, a deletion).
pub const FOLLOW_TIMEOUT: Duration = Duration::from_secs(60);
pub const POLL: Duration = Duration::from_millis(250);

/// The control plane shared by the tests of this binary (started by the first caller).
pub fn cluster() -> &'static KubeCluster {
    match KubeCluster::shared() {
        Ok(cluster) => cluster,
        Err(error) => panic!("{error}"),
    }
}

/// A kube client for `kubeconfig` (the admin's when `None`), for this test's runtime.
pub async fn client_for(kubeconfig: Option<&Path>) -> Result<Client> {
    let path = kubeconfig
        .map(Path::to_path_buf)
        .unwrap_or_else(|| cluster().kubeconfig_path());
    let kubeconfig = Kubeconfig::read_from(&path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("building a kube config")?;
    Client::try_from(config).context("building a kube client")
}

/// An admin client, with the CRD from `crds/` installed and established.
pub async fn admin_client() -> Result<Client> {
    let client = client_for(None).await?;
    install_crd(&client).await?;
    Ok(client)
}

/// The repository's `crds/signalpipeline.yaml` as JSON.
pub fn crd_manifest() -> Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/signalpipeline.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    yaml_serde::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Applies the CRD (server-side, idempotent) and waits until it is established.
pub async fn install_crd(client: &Client) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    call(
        "applying crds/signalpipeline.yaml",
        crds.patch(
            CRD_NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd_manifest()?),
        ),
    )
    .await?;
    eventually("the CRD becoming Established", FOLLOW_TIMEOUT, || async {
        let crd = call("reading the CRD", crds.get(CRD_NAME)).await?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        Ok(if established {
            Ok(())
        } else {
            Err("not established".to_string())
        })
    })
    .await
}

/// A fresh namespace for one test.
pub fn namespace(prefix: &str) -> String {
    match cluster().create_namespace(prefix) {
        Ok(name) => name,
        Err(error) => panic!("creating a namespace: {error}"),
    }
}

/// Runs one API call with [`REQUEST_TIMEOUT`].
pub async fn call<T>(what: &str, request: impl Future<Output = kube::Result<T>>) -> Result<T> {
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| anyhow!("{what}: no answer within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| what.to_string())
}

/// Polls `check` until it returns `Ok(Ok(value))`; fails with `what` and the last observation
/// (`Ok(Err(observed))`) after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
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

/// A SignalPipeline object for `spec` (e.g. one of `support/dataplane.rs`'s specs), as JSON to
/// apply.
pub fn pipeline_object(namespace: &str, name: &str, spec: &SignalPipelineSpec) -> Value {
    json!({
        "apiVersion": "signals.dev/v1alpha1",
        "kind": "SignalPipeline",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

/// Server-side applies `manifest` as [`FIELD_MANAGER`].
pub async fn apply_pipeline(api: &Api<SignalPipeline>, manifest: &Value) -> Result<SignalPipeline> {
    let name = manifest["metadata"]["name"]
        .as_str()
        .context("the manifest has a name")?;
    call(
        "applying the SignalPipeline",
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(manifest),
        ),
    )
    .await
}

pub fn condition<'a>(
    pipeline: &'a SignalPipeline,
    type_: &str,
) -> Option<&'a signal_model::Condition> {
    pipeline
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

pub fn describe_conditions(pipeline: &SignalPipeline) -> String {
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

/// Waits until condition `type_` is `True` for the pipeline's current generation.
pub async fn wait_condition(
    api: &Api<SignalPipeline>,
    name: &str,
    type_: &str,
    timeout: Duration,
) -> Result<SignalPipeline> {
    eventually(&format!("{name}: {type_}=True"), timeout, || async {
        let pipeline = call("reading the pipeline", api.get(name)).await?;
        let done = condition(&pipeline, type_).is_some_and(|c| {
            c.status == "True" && c.observed_generation == pipeline.metadata.generation
        });
        Ok(if done {
            Ok(pipeline)
        } else {
            Err(describe_conditions(&pipeline))
        })
    })
    .await
}

/// Waits until the pipeline is gone (its finalizer done).
pub async fn wait_gone(api: &Api<SignalPipeline>, name: &str, timeout: Duration) -> Result<()> {
    eventually(&format!("{name} disappearing"), timeout, || async {
        Ok(
            match call("reading the pipeline", api.get_opt(name)).await? {
                None => Ok(()),
                Some(pipeline) => Err(format!(
                    "still there with finalizers {:?}; {}",
                    pipeline.metadata.finalizers,
                    describe_conditions(&pipeline)
                )),
            },
        )
    })
    .await
}

/// Stands in for the kubelet no node runs: marks every pod in `namespace` that is not ready yet
/// Running and Ready, so the Deployment controller counts it and `WorkersReady` can become true.
/// Returns how many pods it marked.
pub async fn mark_pods_ready(client: &Client, namespace: &str) -> Result<usize> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = call("listing pods", pods.list(&ListParams::default())).await?;
    let mut marked = 0;
    for pod in list.items {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
        if ready || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let status = json!({"status": {
            "phase": "Running",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
            ],
        }});
        call(
            &format!("marking pod {name} ready"),
            pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)),
        )
        .await?;
        marked += 1;
    }
    Ok(marked)
}

/// Keeps marking the pods of `namespace` ready (see [`mark_pods_ready`]) until dropped.
pub struct StandInKubelet {
    task: tokio::task::JoinHandle<()>,
}

impl StandInKubelet {
    pub fn start(client: Client, namespace: &str) -> StandInKubelet {
        let namespace = namespace.to_string();
        let task = tokio::spawn(async move {
            loop {
                // A pod deleted between the list and the patch is not worth failing over.
                let _ = mark_pods_ready(&client, &namespace).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        StandInKubelet { task }
    }
}

impl Drop for StandInKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The operator binary running out of cluster against the control plane.
pub struct Operator {
    process: ChildProcess,
    metrics_port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// How to run one operator process.
#[derive(Debug, Clone, Default)]
pub struct OperatorOptions {
    /// `--namespace` (all namespaces when empty).
    pub namespaces: Vec<String>,
    /// `--leader-election` with the Lease in this namespace.
    pub leader_election_namespace: Option<String>,
    /// Its identity for leader election (`POD_NAME`).
    pub identity: Option<String>,
    /// Another kubeconfig than the admin's (e.g. a ServiceAccount token's).
    pub kubeconfig: Option<PathBuf>,
    /// `--cleanup-timeout` (the operator's default when absent).
    pub cleanup_timeout: Option<Duration>,
    /// `--worker-image` (the operator's default when absent).
    pub worker_image: Option<String>,
}

impl Operator {
    /// Starts `signal-operator run` and waits until its `/readyz` answers 200.
    pub fn start(options: OperatorOptions) -> Result<Operator> {
        let dir = tempfile::Builder::new()
            .prefix("signal-operator-test-")
            .tempdir()
            .context("creating the operator's directory")?;
        let log = dir.path().join("operator.log");
        let metrics_port = signal_testkit::free_port()?;
        let mut command = Command::new(OPERATOR);
        command
            .arg("run")
            .arg(format!("--metrics-addr=127.0.0.1:{metrics_port}"))
            .env(
                "KUBECONFIG",
                options
                    .kubeconfig
                    .clone()
                    .unwrap_or_else(|| cluster().kubeconfig_path()),
            )
            .env("SIGNAL_LOG_FORMAT", "json")
            .env("SIGNAL_LOG_LEVEL", "info")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null());
        for namespace in &options.namespaces {
            command.arg(format!("--namespace={namespace}"));
        }
        if let Some(namespace) = &options.leader_election_namespace {
            command
                .arg("--leader-election")
                .arg(format!("--leader-election-namespace={namespace}"));
        }
        if let Some(identity) = &options.identity {
            command.env("POD_NAME", identity);
        }
        if let Some(image) = &options.worker_image {
            command.arg(format!("--worker-image={image}"));
        }
        if let Some(timeout) = options.cleanup_timeout {
            command.arg(format!("--cleanup-timeout={}ms", timeout.as_millis()));
        }
        let out = std::fs::File::create(&log).context("creating the operator log")?;
        command.stdout(out.try_clone()?).stderr(out);
        let process = ChildProcess::spawn(command)?;
        let mut operator = Operator {
            process,
            metrics_port,
            log,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + FOLLOW_TIMEOUT;
        loop {
            if operator
                .http_get("/readyz")
                .is_ok_and(|(status, _)| status == 200)
            {
                return Ok(operator);
            }
            if !operator.process.is_running() {
                bail!("the operator exited at startup:\n{}", operator.log_text());
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "the operator did not become ready within {FOLLOW_TIMEOUT:?}:\n{}",
                    operator.log_text()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Everything the operator logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET http://127.0.0.1:<metrics port><path>`: status and body.
    pub fn http_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.metrics_port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// `signal_operator_reconciles_total` from `/metrics`.
    pub fn reconciles(&self) -> Result<u64> {
        let (status, body) = self.http_get("/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        metric_value(&body, "signal_operator_reconciles_total")
            .with_context(|| format!("no reconcile counter in /metrics:\n{body}"))
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGKILL: the process dies without releasing anything (its Lease stays until it expires).
    pub fn kill(&mut self) -> Result<()> {
        self.process.kill_hard()?;
        Ok(())
    }
}

/// The value of an unlabelled counter or gauge in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            (metric == name).then(|| value.trim().parse::<f64>().ok())?
        })
        .map(|value| value as u64)
}

/// Runs `kubectl` with the admin kubeconfig; returns stdout, or fails with stderr.
pub fn kubectl(args: &[&str]) -> Result<String> {
    let output = cluster()
        .kubectl()?
        .args(args)
        .output()
        .context("running kubectl")?;
    if !output.status.success() {
        bail!(
            "kubectl {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Waits until Deployment `name` asks for `replicas` pods.
pub async fn wait_deployment_replicas(
    deployments: &Api<Deployment>,
    name: &str,
    replicas: i32,
    timeout: Duration,
) -> Result<()> {
    eventually(
        &format!("Deployment {name} following to {replicas} replicas"),
        timeout,
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

/// Runs `helm` against the control plane; returns its stdout and stderr, or an error with both.
pub fn helm(args: &[&str]) -> Result<String> {
    let output = cluster()
        .helm()?
        .args(args)
        .output()
        .context("running helm")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("helm {} failed ({}): {text}", args.join(" "), output.status);
    }
    Ok(text)
}

/// Runs `kubectl` with input on stdin; returns (success, stdout + stderr).
pub fn kubectl_with_input(args: &[&str], input: &str) -> Result<(bool, String)> {
    let mut child = cluster()
        .kubectl()?
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl")?;
    child
        .stdin
        .take()
        .context("kubectl's stdin")?
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Ok((output.status.success(), text))
}
