//! What the tests of pods on the testkit's node share: the servers on the node's bridge, images
//! packed from workspace binaries, signals with poison and their counts, and waits on pods and
//! Deployments.
#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use async_nats::jetstream;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;
use signal_model::{
    CacheSpec, DeletionPolicy, HumanDuration, RedisSpec, SignalPipeline, SignalPipelineSpec,
};
use signal_testkit::{
    ClickHouseServer, ImageSpec, KubeNode, NatsServer, RedisServer, write_image_archive,
};

use super::cluster::{call, eventually};
use super::dataplane;
use super::worker_binary;

/// The image name the pods run; imported into the node, never pulled.
pub const WORKER_IMAGE: &str = "docker.io/library/signal-worker:node-test";
/// Long enough for pods to start on a loaded two-core machine.
pub const POD_TIMEOUT: Duration = Duration::from_secs(120);
/// Signals per wave; every 100th is poison.
pub const WAVE: u64 = 100_000;
pub const POISON_EVERY: u64 = 100;

pub struct Servers {
    pub nats: NatsServer,
    pub clickhouse: ClickHouseServer,
    pub redis: RedisServer,
}

/// Packs the test profile's worker into an image and imports it into the node.
pub fn import_worker_image(node: &KubeNode) -> Result<()> {
    import_binary_image(node, &worker_binary::worker_binary(), WORKER_IMAGE)
}

/// Packs `binary` (debug sections stripped: a quarter of the size) into image `name`, running as
/// the distroless non-root user, and imports it into the node.
pub fn import_binary_image(node: &KubeNode, binary: &Path, name: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file_name = binary.file_name().context("a binary file name")?;
    let stripped = dir.path().join(file_name);
    let status = std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(&stripped)
        .status()
        .context("running objcopy (apt-get install -y binutils)")?;
    ensure!(status.success(), "objcopy --strip-debug failed: {status}");
    let archive = dir.path().join("image.tar");
    write_image_archive(
        &ImageSpec {
            name: name.to_string(),
            program: stripped,
            args: Vec::new(),
            user: "65532:65532".to_string(),
        },
        &archive,
    )?;
    node.import_image(&archive)?;
    Ok(())
}

pub fn spec_for(name: &str, servers: &Servers) -> SignalPipelineSpec {
    let mut spec =
        dataplane::pipeline_spec(name, &servers.nats.url(), &servers.clickhouse.http_url());
    spec.deletion_policy = DeletionPolicy::Delete;
    spec.workers.replicas = 2;
    // A killed worker's messages come back after the ack wait: keep it short.
    spec.consumer.ack_wait = HumanDuration::from_secs(6);
    spec.workers.batch.max_wait = HumanDuration::from_secs(1);
    spec.cache = Some(CacheSpec {
        redis: RedisSpec {
            url: servers.redis.url(),
            auth: None,
            tls: None,
        },
        key: "wallet:{wallet}".to_string(),
        fields: vec!["amount".to_string()],
        ttl: HumanDuration::from_secs(600),
    });
    spec
}

/// Publishes `count` signals from sequence `first`, every [`POISON_EVERY`]th one not JSON;
/// each valid one has its own wallet `w<sequence>`, so rows and keys count sequences.
pub async fn publish(js: &jetstream::Context, subject: &str, first: u64, count: u64) -> Result<()> {
    let mut acks = Vec::with_capacity(1024);
    for sequence in first..first + count {
        let payload = if sequence % POISON_EVERY == 0 {
            format!("poison {sequence}")
        } else {
            json!({
                "event_time": "2026-12-01T12:00:00Z",
                "wallet": format!("w{sequence}"),
                "amount": (sequence % 1000) as i32,
            })
            .to_string()
        };
        acks.push(js.publish(subject.to_string(), payload.into()).await?);
        if acks.len() == 1024 {
            for ack in acks.drain(..) {
                ack.await.context("a publish was not acknowledged")?;
            }
        }
    }
    for ack in acks {
        ack.await.context("a publish was not acknowledged")?;
    }
    Ok(())
}

pub fn valid_in(first: u64, count: u64) -> u64 {
    (first..first + count)
        .filter(|s| s % POISON_EVERY != 0)
        .count() as u64
}

/// (rows, distinct wallets) in the pipeline's table.
pub fn table_counts(
    clickhouse: &ClickHouseServer,
    spec: &SignalPipelineSpec,
) -> Result<(u64, u64)> {
    let text = clickhouse.query(&format!(
        "SELECT count(), uniqExact(wallet) FROM {}.{} FORMAT TSV",
        spec.clickhouse.database, spec.clickhouse.table
    ))?;
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(rows)), Some(Ok(distinct))) => Ok((rows, distinct)),
        _ => bail!("unexpected answer {text:?}"),
    }
}

pub async fn dead_letters(js: &jetstream::Context, spec: &SignalPipelineSpec) -> Result<u64> {
    let name = format!("{}_DLQ", spec.stream.name);
    let mut stream = js.get_stream(&name).await?;
    Ok(stream.info().await?.state.messages)
}

/// Waits until the table holds `rows` rows; returns how long that took from `since`.
pub async fn wait_rows(
    servers: &Servers,
    spec: &SignalPipelineSpec,
    rows: u64,
    since: Instant,
) -> Result<Duration> {
    eventually(
        &format!("{rows} distinct sequences in ClickHouse"),
        Duration::from_secs(180),
        || async {
            // Distinct, not all rows: after a kill, redelivered duplicates can reach the row
            // count while some sequences are still on their way.
            let (have, distinct) = table_counts(&servers.clickhouse, spec)?;
            Ok(if distinct >= rows {
                Ok(())
            } else {
                Err(format!("{distinct} distinct sequences in {have} rows"))
            })
        },
    )
    .await?;
    Ok(since.elapsed())
}

/// Names of the pods labelled `app.kubernetes.io/instance=<name>` (a pipeline's workers, or a
/// release's operator pods) that are Running and Ready (and not being deleted).
pub async fn ready_pods(pods: &Api<Pod>, name: &str) -> Result<BTreeSet<String>> {
    let list = call(
        "listing worker pods",
        pods.list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name}"))),
    )
    .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter(|pod| {
            let status = pod.status.as_ref();
            status.and_then(|s| s.phase.as_deref()) == Some("Running")
                && status
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|pod| pod.metadata.name)
        .collect())
}

pub async fn all_pods(pods: &Api<Pod>, name: &str) -> Result<usize> {
    let list = call(
        "listing worker pods",
        pods.list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={name}"))),
    )
    .await?;
    Ok(list.items.len())
}

/// Waits until exactly `count` pods are Running and Ready and no other pod of the pipeline is
/// left; returns their names and how long that took.
pub async fn wait_pods(
    pods: &Api<Pod>,
    name: &str,
    count: usize,
) -> Result<(BTreeSet<String>, Duration)> {
    wait_ready(pods, name, count, true).await
}

/// Waits until at least `count` pods are Running and Ready, whatever else runs.
pub async fn wait_ready_count(
    pods: &Api<Pod>,
    name: &str,
    count: usize,
) -> Result<(BTreeSet<String>, Duration)> {
    wait_ready(pods, name, count, false).await
}

async fn wait_ready(
    pods: &Api<Pod>,
    name: &str,
    count: usize,
    no_other: bool,
) -> Result<(BTreeSet<String>, Duration)> {
    let started = Instant::now();
    let what = if no_other { " and no other" } else { "" };
    let names = eventually(
        &format!("{count} Running, Ready worker pods{what}"),
        POD_TIMEOUT,
        || async {
            let ready = ready_pods(pods, name).await?;
            let total = all_pods(pods, name).await?;
            let done = if no_other {
                ready.len() == count && total == count
            } else {
                ready.len() >= count
            };
            Ok(if done {
                Ok(ready)
            } else {
                Err(format!("{} ready of {total} pods", ready.len()))
            })
        },
    )
    .await?;
    Ok((names, started.elapsed()))
}

pub async fn patch_spec(
    api: &Api<SignalPipeline>,
    name: &str,
    patch: serde_json::Value,
) -> Result<()> {
    call(
        "patching the pipeline",
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": patch})),
        ),
    )
    .await?;
    Ok(())
}

/// Every valid sequence stored once, every poison one a dead letter, a Redis key per wallet.
///
/// The cache is written after the rows are stored and acknowledged, and is best effort (README,
/// "Delivery guarantees"): a worker killed between the two drops the cache updates of the batches
/// it held, at most `cache_may_miss` keys; without faults it must be complete.
pub async fn check_exactly_once(
    servers: &Servers,
    js: &jetstream::Context,
    spec: &SignalPipelineSpec,
    valid: u64,
    poison: u64,
    cache_may_miss: u64,
) -> Result<()> {
    let (rows, distinct) = table_counts(&servers.clickhouse, spec)?;
    // Dead letters are published concurrently with the rows' inserts, so they may trail them.
    let letters = eventually(
        &format!("{poison} dead letters"),
        Duration::from_secs(60),
        || async {
            let letters = dead_letters(js, spec).await?;
            Ok(if letters >= poison {
                Ok(letters)
            } else {
                Err(format!("{letters} dead letters"))
            })
        },
    )
    .await?;
    let keys = eventually(
        &format!("{valid} Redis keys"),
        Duration::from_secs(60),
        || async {
            let keys: u64 = servers.redis.command(&["DBSIZE"])?;
            Ok(if keys + cache_may_miss >= valid {
                Ok(keys)
            } else {
                Err(format!("{keys} keys"))
            })
        },
    )
    .await?;
    eprintln!(
        "  {rows} rows, {distinct} distinct sequences (expected {valid}), {} duplicates; {letters} dead letters for {poison} poison; {keys} Redis keys",
        rows - distinct
    );
    ensure!(
        distinct == valid,
        "{distinct} distinct sequences stored, {valid} expected"
    );
    ensure!(
        letters >= poison,
        "{letters} dead letters for {poison} poison signals"
    );
    ensure!(
        keys <= valid && keys + cache_may_miss >= valid,
        "{keys} Redis keys for {valid} wallets (up to {cache_may_miss} may be missing)"
    );
    Ok(())
}

/// SIGKILLs the worker process of pod `pod` on this machine (the kubelet restarts the container).
pub fn kill_worker_process(pod: &str) -> Result<()> {
    let killed = signal_worker_process(pod, libc::SIGKILL)?;
    ensure!(killed == 1, "found {killed} worker processes of pod {pod}");
    Ok(())
}

/// Sends `signal` to the worker process of pod `pod`, found by the `HOSTNAME` its container has;
/// returns how many processes got it.
pub fn signal_worker_process(pod: &str, signal: i32) -> Result<usize> {
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let command = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let is_worker = command.starts_with(b"/usr/local/bin/signal-worker");
        let in_pod = String::from_utf8_lossy(&environ).contains(&format!("HOSTNAME={pod}"));
        if is_worker && in_pod {
            // SAFETY: a plain syscall on a pid just read from /proc.
            unsafe {
                libc::kill(pid, signal);
            }
            killed += 1;
        }
    }
    Ok(killed)
}
