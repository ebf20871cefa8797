//! Leader election against a real kube-apiserver: two operator processes share one Lease; only
//! the holder reconciles; when it is killed (no release, as in a crash) the other takes over once
//! the Lease has expired, within the lease duration plus one retry; and the Lease's history, as a
//! watch delivers every version of it, never shows a takeover before the previous holder's
//! Lease expired (no two leaders at any time).

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/dataplane.rs"]
mod dataplane;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::jiff::SignedDuration;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;
use signal_model::SignalPipeline;

use cluster::{
    FOLLOW_TIMEOUT, Operator, OperatorOptions, apply_pipeline, call, eventually, pipeline_object,
};

const LEASE_NAME: &str = "signal-operator-leader";
/// The operator's lease duration and retry period (client-go's defaults, leader_election.rs).
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RETRY: Duration = Duration::from_secs(2);
/// Scheduling, one API round trip and process start-up noise on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(5);

/// Every version of the Lease a watch delivered, in order.
type History = Arc<Mutex<Vec<LeaseSpec>>>;

fn record_lease_history(client: Client, namespace: &str) -> (History, tokio::task::JoinHandle<()>) {
    let history: History = Arc::default();
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={LEASE_NAME}"));
    let sink = history.clone();
    let task = tokio::spawn(async move {
        let mut events = watcher(leases, config).boxed();
        while let Some(event) = events.next().await {
            let lease = match event {
                Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease)) => lease,
                _ => continue,
            };
            if let Some(spec) = lease.spec {
                let mut history = sink.lock().unwrap();
                if history.last() != Some(&spec) {
                    history.push(spec);
                }
            }
        }
    });
    (history, task)
}

fn holder(spec: &LeaseSpec) -> &str {
    spec.holder_identity.as_deref().unwrap_or_default()
}

async fn current_holder(leases: &Api<Lease>) -> String {
    call("reading the Lease", leases.get_opt(LEASE_NAME))
        .await
        .unwrap()
        .and_then(|lease| lease.spec)
        .map(|spec| holder(&spec).to_string())
        .unwrap_or_default()
}

/// Each change of holder from one identity to another happened only after the previous holder's
/// last renewal had expired: never two leaders.
fn assert_no_overlapping_leaders(history: &[LeaseSpec]) {
    for pair in history.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        if holder(before).is_empty() || holder(after).is_empty() || holder(before) == holder(after)
        {
            continue;
        }
        let renewed = before
            .renew_time
            .as_ref()
            .or(before.acquire_time.as_ref())
            .expect("a held Lease has a renew time")
            .0;
        let expired_at = renewed
            + SignedDuration::from_secs(i64::from(before.lease_duration_seconds.unwrap_or(0)));
        let acquired = after
            .acquire_time
            .as_ref()
            .expect("a new holder sets acquireTime")
            .0;
        assert!(
            acquired >= expired_at,
            "{} took the Lease at {acquired} while {}'s ran until {expired_at}: {history:#?}",
            holder(after),
            holder(before)
        );
        assert!(
            after.lease_transitions > before.lease_transitions,
            "a takeover counts a transition: {history:#?}"
        );
    }
}

#[tokio::test]
async fn one_leader_reconciles_and_a_killed_one_is_replaced_within_the_lease_duration() {
    let client = cluster::admin_client().await.unwrap();
    let namespace = cluster::namespace("leader");
    let (history, watch) = record_lease_history(client.clone(), &namespace);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &namespace);
    let options = |identity: &str| OperatorOptions {
        namespaces: vec![namespace.clone()],
        leader_election_namespace: Some(namespace.clone()),
        identity: Some(identity.to_string()),
        ..OperatorOptions::default()
    };

    let mut first = Operator::start(options("operator-a")).unwrap();
    eventually("operator-a taking the Lease", FOLLOW_TIMEOUT, || async {
        let holder = current_holder(&leases).await;
        Ok(if holder == "operator-a" {
            Ok(())
        } else {
            Err(holder)
        })
    })
    .await
    .unwrap();
    let second = Operator::start(options("operator-b")).unwrap();

    let pipelines: Api<SignalPipeline> = Api::namespaced(client.clone(), &namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let spec = dataplane::shared_pipeline_spec(&dataplane::unique("leader"));
    apply_pipeline(&pipelines, &pipeline_object(&namespace, "led", &spec))
        .await
        .unwrap();
    eventually(
        "the leader creating the Deployment",
        FOLLOW_TIMEOUT,
        || async {
            Ok(
                match call("reading", deployments.get_opt("led-worker")).await? {
                    Some(_) => Ok(()),
                    None => Err("no Deployment yet".to_string()),
                },
            )
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator-a:\n{}", first.log_text()));
    // The standby keeps out for a while, through several of its retries.
    for _ in 0..10 {
        assert_eq!(second.reconciles().unwrap(), 0, "the standby reconciled");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(first.reconciles().unwrap() > 0);
    assert_eq!(current_holder(&leases).await, "operator-a");

    // A crash: nothing releases the Lease; the standby waits for it to expire.
    first.kill().unwrap();
    let killed = Instant::now();
    let bound = LEASE_DURATION + RETRY + SLACK;
    let handed_over = eventually("operator-b taking the Lease", bound, || async {
        let holder = current_holder(&leases).await;
        Ok(if holder == "operator-b" {
            Ok(killed.elapsed())
        } else {
            Err(holder)
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator-b:\n{}", second.log_text()));
    eprintln!("leader killed; operator-b leads {handed_over:?} later (bound {bound:?})");

    // The new leader reconciles: an edit reaches the Deployment.
    call(
        "editing spec.workers.replicas",
        pipelines.patch(
            "led",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"workers": {"replicas": 2}}})),
        ),
    )
    .await
    .unwrap();
    eventually(
        "operator-b scaling the Deployment",
        FOLLOW_TIMEOUT,
        || async {
            let replicas = call("reading", deployments.get("led-worker"))
                .await?
                .spec
                .and_then(|s| s.replicas);
            Ok(if replicas == Some(2) {
                Ok(())
            } else {
                Err(format!("{replicas:?}"))
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\noperator-b:\n{}", second.log_text()));
    assert!(second.reconciles().unwrap() > 0);

    watch.abort();
    let history = history.lock().unwrap().clone();
    let holders: Vec<&str> = history.iter().map(holder).collect();
    eprintln!("Lease holders as watched: {holders:?}");
    assert!(holders.contains(&"operator-a") && holders.contains(&"operator-b"));
    assert_no_overlapping_leaders(&history);
}
