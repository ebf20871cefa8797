//! The users' path on a real node: the operator (out of cluster) turns a SignalPipeline into
//! worker pods that containerd really runs, from a worker image packed and imported here, and the
//! pods ingest.
//!
//! Everything is real and on this machine: the testkit's control plane and [`KubeNode`]
//! (kube-scheduler, containerd, runc, a CNI bridge, a kubelet), and nats-server,
//! clickhouse-server and redis-server listening on the node's bridge address, where the pods reach
//! them. The worker image is the test profile's `signal-worker` without its debug sections, with
//! the libraries it loads (`signal_testkit::write_image_archive`).
//!
//! One pipeline lives through: Ready with its pods; signals with 1% poison landing exactly once
//! per sequence, dead letters equal to poison, Redis keys; `kubectl scale sigp` and an edit of
//! `spec.workers.replicas` moving Running pods; a worker pod force-deleted and another's
//! container killed mid-stream with nothing lost; a manifest change rolling the pods; lag
//! autoscaling up and back down; a ClickHouse outage (SIGSTOP) during which the pods turn unready
//! and `kubectl scale` is still carried out; deletion removing pods, stream and table. Each step
//! prints its figures (`--nocapture`); none is a timed assertion.

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/dataplane.rs"]
mod dataplane;
#[path = "support/node.rs"]
mod node;
#[path = "support/worker_binary.rs"]
mod worker_binary;

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::DeleteParams;
use kube::{Api, Client};
use serde_json::json;
use signal_model::SignalPipeline;
use signal_testkit::{ClickHouseServer, KubeNode, NatsServer, RedisServer};

use node::{
    POD_TIMEOUT, POISON_EVERY, Servers, WAVE, WORKER_IMAGE, all_pods, check_exactly_once,
    import_worker_image, kill_worker_process, patch_spec, publish, ready_pods,
    signal_worker_process, spec_for, valid_in, wait_pods, wait_ready_count, wait_rows,
};

use cluster::{
    Operator, OperatorOptions, apply_pipeline, call, describe_conditions, eventually, kubectl,
    pipeline_object, wait_condition, wait_deployment_replicas, wait_gone,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_pods_ingest_scale_survive_kills_autoscale_and_outages() {
    let control_plane = cluster::cluster();
    let node = KubeNode::start(control_plane).expect("the node starts");
    eprintln!(
        "node {} at {} ready in {:.1} s",
        node.name(),
        node.address(),
        node.started_in().as_secs_f64()
    );
    let mut servers = Servers {
        nats: NatsServer::start_on(node.address()).unwrap(),
        clickhouse: ClickHouseServer::start_on(node.address()).unwrap(),
        redis: RedisServer::start_on(node.address()).unwrap(),
    };
    import_worker_image(&node).unwrap();
    let client = cluster::admin_client().await.unwrap();
    let namespace = cluster::namespace("node");
    let operator = Operator::start(OperatorOptions {
        namespaces: vec![namespace.clone()],
        worker_image: Some(WORKER_IMAGE.to_string()),
        ..OperatorOptions::default()
    })
    .unwrap();
    let result = scenario(&client, &namespace, &mut servers).await;
    if let Err(error) = result {
        let logs: Vec<String> = node
            .log_files()
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(f).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                format!(
                    "== {}\n{}",
                    f.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect();
        panic!(
            "{error:#}\noperator log:\n{}\n{}",
            operator.log_text(),
            logs.join("\n")
        );
    }
}

async fn scenario(client: &Client, namespace: &str, servers: &mut Servers) -> Result<()> {
    let name = "ingest";
    let spec = spec_for(&dataplane::unique("node"), servers);
    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let worker_deployment = format!("{name}-worker");
    let js = dataplane::jetstream_at(&servers.nats.url()).await;
    let subject = format!(
        "{}.signals.test",
        spec.stream.subjects[0].trim_end_matches(".>")
    );

    // Ready with its pods.
    let applied = Instant::now();
    apply_pipeline(&pipelines, &pipeline_object(namespace, name, &spec)).await?;
    wait_condition(&pipelines, name, "Ready", POD_TIMEOUT).await?;
    let (first_pods, _) = wait_pods(&pods, name, 2).await?;
    eprintln!(
        "pipeline Ready with 2 running worker pods {:.1} s after kubectl apply",
        applied.elapsed().as_secs_f64()
    );

    // A wave of signals published while no worker runs, then drained by two pods.
    patch_spec(&pipelines, name, json!({"workers": {"replicas": 0}})).await?;
    wait_pods(&pods, name, 0).await?;
    let published = Instant::now();
    publish(&js, &subject, 1, WAVE).await?;
    let publish_time = published.elapsed();
    let mut valid = valid_in(1, WAVE);
    let started = Instant::now();
    patch_spec(&pipelines, name, json!({"workers": {"replicas": 2}})).await?;
    let drained = wait_rows(servers, &spec, valid, started).await?;
    eprintln!(
        "{WAVE} signals (1% poison) published in {:.1} s with no worker running; 2 pods started and stored all {valid} rows in {:.1} s: {:.0} signals/s, pod start included",
        publish_time.as_secs_f64(),
        drained.as_secs_f64(),
        WAVE as f64 / drained.as_secs_f64()
    );
    check_exactly_once(servers, &js, &spec, valid, WAVE / POISON_EVERY, 0).await?;

    // kubectl scale, then an edit of spec.workers.replicas.
    let scaled = Instant::now();
    kubectl(&["-n", namespace, "scale", "sigp", name, "--replicas=3"])?;
    let (_, _) = wait_pods(&pods, name, 3).await?;
    eprintln!(
        "kubectl scale sigp --replicas=3: 3 running pods after {:.1} s",
        scaled.elapsed().as_secs_f64()
    );

    // Mid-stream: one pod force-deleted, another's worker process killed in place.
    let wave_start = WAVE + 1;
    let publisher = {
        let (js, subject) = (js.clone(), subject.clone());
        tokio::spawn(async move { publish(&js, &subject, wave_start, WAVE).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let current = ready_pods(&pods, name).await?;
    let mut victims = current.iter();
    let (deleted, killed) = (
        victims.next().context("a pod to delete")?.clone(),
        victims.next().context("a pod to kill")?.clone(),
    );
    call(
        "force-deleting a worker pod",
        pods.delete(
            &deleted,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        ),
    )
    .await?;
    kill_worker_process(&killed)?;
    publisher.await??;
    valid += valid_in(wave_start, WAVE);
    let recovered = wait_rows(servers, &spec, valid, Instant::now()).await?;
    wait_pods(&pods, name, 3).await?;
    eprintln!(
        "pod {deleted} force-deleted and pod {killed}'s worker killed mid-stream: all rows stored {:.1} s after the publisher finished",
        recovered.as_secs_f64()
    );
    // Two workers killed, each holding at most a few batches whose cache updates are lost.
    let killed_may_miss = 2 * 4 * u64::from(spec.workers.batch.max_rows);
    check_exactly_once(
        servers,
        &js,
        &spec,
        valid,
        2 * WAVE / POISON_EVERY,
        killed_may_miss,
    )
    .await?;

    // Back to one replica by editing the spec; then a manifest change rolls the pod.
    patch_spec(&pipelines, name, json!({"workers": {"replicas": 1}})).await?;
    let (one, took) = wait_pods(&pods, name, 1).await?;
    eprintln!(
        "spec.workers.replicas: 1 → one pod after {:.1} s",
        took.as_secs_f64()
    );
    patch_spec(
        &pipelines,
        name,
        json!({"workers": {"batch": {"maxRows": 5000}}}),
    )
    .await?;
    let rolled = eventually(
        "the manifest change to roll the pod",
        POD_TIMEOUT,
        || async {
            let now = ready_pods(&pods, name).await?;
            Ok(
                if now.len() == 1 && now.is_disjoint(&one) && all_pods(&pods, name).await? == 1 {
                    Ok(now)
                } else {
                    Err(format!("pods {now:?}"))
                },
            )
        },
    )
    .await?;
    eprintln!("a batch size change rolled pod {one:?} into {rolled:?}");
    ensure!(first_pods.is_disjoint(&rolled), "the pod was not replaced");

    // Lag autoscaling: the one worker is frozen (SIGSTOP), so a backlog above the target builds
    // while the data plane is healthy; the operator scales up, the new pods drain it, and once
    // the lag has stayed low for the stabilisation window it scales back to the minimum.
    patch_spec(
        &pipelines,
        name,
        json!({"workers": {"autoscale": {
            "minReplicas": 1, "maxReplicas": 3, "targetLagPerReplica": 2000,
            "scaleDownStabilization": "20s",
        }}}),
    )
    .await?;
    let frozen = rolled.iter().next().context("the rolled pod")?.clone();
    let frozen_count = signal_worker_process(&frozen, libc::SIGSTOP)?;
    ensure!(
        frozen_count == 1,
        "found {frozen_count} worker processes of pod {frozen}"
    );
    let backlog = Instant::now();
    let wave_start = 2 * WAVE + 1;
    publish(&js, &subject, wave_start, 30_000).await?;
    valid += valid_in(wave_start, 30_000);
    wait_deployment_replicas(
        &deployments,
        &worker_deployment,
        3,
        Duration::from_secs(120),
    )
    .await?;
    let autoscale_up = backlog.elapsed();
    let (_, _) = wait_ready_count(&pods, name, 2).await?;
    // The kubelet may have restarted the frozen container meanwhile (liveness): then none.
    signal_worker_process(&frozen, libc::SIGCONT)?;
    let drained = wait_rows(servers, &spec, valid, backlog).await?;
    eprintln!(
        "autoscale: a backlog of 30000 with the worker frozen scaled the Deployment to 3 after {:.1} s; drained {:.1} s after the backlog started",
        autoscale_up.as_secs_f64(),
        drained.as_secs_f64()
    );
    let low = Instant::now();
    wait_deployment_replicas(
        &deployments,
        &worker_deployment,
        1,
        Duration::from_secs(180),
    )
    .await?;
    wait_pods(&pods, name, 1).await?;
    eprintln!(
        "autoscale: back to 1 pod {:.1} s after the backlog was drained (stabilisation 20 s)",
        low.elapsed().as_secs_f64()
    );
    check_exactly_once(
        servers,
        &js,
        &spec,
        valid,
        (2 * WAVE + 30_000) / POISON_EVERY,
        killed_may_miss,
    )
    .await?;

    // A ClickHouse outage (SIGSTOP: connections accepted, nothing answered): the pods turn
    // unready, the status names ClickHouse, and kubectl scale is still carried out.
    patch_spec(&pipelines, name, json!({"workers": {"autoscale": null}})).await?;
    servers.clickhouse.pause();
    let outage = Instant::now();
    let wave_start = 2 * WAVE + 30_001;
    publish(&js, &subject, wave_start, 10_000).await?;
    valid += valid_in(wave_start, 10_000);
    let outage_scale = Instant::now();
    kubectl(&["-n", namespace, "scale", "sigp", name, "--replicas=2"])?;
    wait_deployment_replicas(&deployments, &worker_deployment, 2, Duration::from_secs(90)).await?;
    eprintln!(
        "ClickHouse stopped: kubectl scale sigp --replicas=2 reached the Deployment after {:.1} s",
        outage_scale.elapsed().as_secs_f64()
    );
    let unready = eventually(
        "the worker pods to turn unready",
        Duration::from_secs(120),
        || async {
            let ready = ready_pods(&pods, name).await?;
            Ok(if ready.is_empty() {
                Ok(())
            } else {
                Err(format!("ready: {ready:?}"))
            })
        },
    )
    .await;
    let pipeline = call("reading the pipeline", pipelines.get(name)).await?;
    eprintln!(
        "during the outage ({:.1} s in): {}",
        outage.elapsed().as_secs_f64(),
        describe_conditions(&pipeline)
    );
    unready?;
    servers.clickhouse.resume();
    let recovered = wait_rows(servers, &spec, valid, Instant::now()).await?;
    wait_pods(&pods, name, 2).await?;
    eprintln!(
        "ClickHouse resumed after {:.1} s of outage: the backlog was stored {:.1} s later",
        outage.elapsed().as_secs_f64(),
        recovered.as_secs_f64()
    );
    check_exactly_once(
        servers,
        &js,
        &spec,
        valid,
        (2 * WAVE + 40_000) / POISON_EVERY,
        killed_may_miss,
    )
    .await?;

    // Deletion removes pods, stream and table.
    let deleting = Instant::now();
    call(
        "deleting the pipeline",
        pipelines.delete(name, &DeleteParams::default()),
    )
    .await?;
    wait_gone(&pipelines, name, Duration::from_secs(90)).await?;
    eventually("the worker pods to go", POD_TIMEOUT, || async {
        let left = all_pods(&pods, name).await?;
        Ok(if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} pods"))
        })
    })
    .await?;
    ensure!(
        dataplane::live_stream(&js, &spec.stream.name)
            .await
            .is_none(),
        "the stream is left"
    );
    let tables = servers.clickhouse.query(&format!(
        "SELECT count() FROM system.tables WHERE database = '{}' AND name = '{}' FORMAT TSV",
        spec.clickhouse.database, spec.clickhouse.table
    ))?;
    ensure!(tables.trim() == "0", "the table is left");
    eprintln!(
        "deleted: pods, stream and table gone after {:.1} s",
        deleting.elapsed().as_secs_f64()
    );
    Ok(())
}
