//! Leader election through a `coordination.k8s.io/v1` Lease, so only one operator replica
//! reconciles at a time (kube 5 has no built-in elector).
//!
//! The holder renews the Lease every [`LeaseTiming::retry`]; a candidate takes it over once its
//! `renewTime + leaseDurationSeconds` has passed. Writes carry the Lease's `resourceVersion`, so
//! two candidates racing for an expired Lease cannot both win. A leader that cannot renew within
//! [`LeaseTiming::renew_deadline`] steps down before anyone else may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::{info, warn};

/// The Lease's name in the operator's namespace.
pub const LEASE_NAME: &str = "signal-operator-leader";

/// Durations of the election, as client-go's defaults.
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    /// How long a Lease is valid after its last renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// Time between attempts to acquire or renew.
    pub retry: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// What a candidate does with the Lease as it finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseDecision {
    /// No Lease exists: create it.
    Create,
    /// We hold it: renew.
    Renew,
    /// It is free or expired: take it over.
    TakeOver,
    /// Someone else holds a valid Lease.
    Wait { holder: String },
}

/// Decides from the Lease's spec (pure).
pub fn decide(lease: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> LeaseDecision {
    let Some(spec) = lease else {
        return LeaseDecision::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == identity {
        return LeaseDecision::Renew;
    }
    if holder.is_empty() {
        return LeaseDecision::TakeOver;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let expired = match spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) {
        Some(renewed) => renewed.0 + duration <= now,
        None => true,
    };
    if expired {
        LeaseDecision::TakeOver
    } else {
        LeaseDecision::Wait {
            holder: holder.to_string(),
        }
    }
}

/// One candidate in the election.
pub struct LeaderElector {
    api: Api<Lease>,
    identity: String,
    timing: LeaseTiming,
}

impl LeaderElector {
    /// A candidate named `identity` for the Lease in `namespace`.
    pub fn new(client: Client, namespace: &str, identity: String, timing: LeaseTiming) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            identity,
            timing,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One attempt: true when we hold the Lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let existing = self.api.get_opt(LEASE_NAME).await?;
        let decision = decide(
            existing.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
        );
        let result = match (decision, existing) {
            (LeaseDecision::Wait { .. }, _) => return Ok(false),
            (LeaseDecision::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE_NAME.to_string()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.held_spec(None, now)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (LeaseDecision::Renew, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(self.duration_seconds());
                self.api
                    .replace(LEASE_NAME, &PostParams::default(), &lease)
                    .await
            }
            (LeaseDecision::TakeOver, Some(mut lease)) => {
                lease.spec = Some(self.held_spec(lease.spec.as_ref(), now));
                self.api
                    .replace(LEASE_NAME, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            // Someone else wrote the Lease first (409 Conflict or 409 AlreadyExists).
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    fn held_spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration_seconds()),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if previous.is_some() {
                transitions.saturating_add(1)
            } else {
                0
            }),
            ..LeaseSpec::default()
        }
    }

    /// Waits until this candidate holds the Lease.
    pub async fn acquire(&self) {
        let mut waiting_logged = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    info!(identity = %self.identity, "acquired the leader lease");
                    return;
                }
                Ok(false) if !waiting_logged => {
                    info!(identity = %self.identity, "another replica leads; standing by");
                    waiting_logged = true;
                }
                Ok(false) => {}
                Err(error) => warn!(%error, "cannot read or write the leader lease"),
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Renews the Lease until it is lost or cannot be renewed within the deadline; returns then.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(identity = %self.identity, "another replica took the leader lease");
                    return;
                }
                Err(error) => {
                    warn!(%error, "cannot renew the leader lease");
                    if last_renewal.elapsed() >= self.timing.renew_deadline {
                        warn!("renew deadline passed; stepping down");
                        return;
                    }
                }
            }
        }
    }

    /// Gives the Lease up on shutdown so a standby takes over at once instead of after expiry.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(LEASE_NAME).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        if let Err(error) = self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            warn!(%error, "cannot release the leader lease");
        }
    }
}

/// This replica's identity: the pod name (downward API `POD_NAME`), else the host name.
pub fn default_identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| format!("signal-operator-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_at: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed_at).unwrap())),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn lease_decisions() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert_eq!(decide(None, "a", now), LeaseDecision::Create);
        assert_eq!(
            decide(Some(&spec("a", 990, 15)), "a", now),
            LeaseDecision::Renew
        );
        assert_eq!(
            decide(Some(&spec("b", 990, 15)), "a", now),
            LeaseDecision::Wait { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&spec("b", 980, 15)), "a", now),
            LeaseDecision::TakeOver
        );
        assert_eq!(
            decide(Some(&spec("", 999, 15)), "a", now),
            LeaseDecision::TakeOver
        );
    }
}
