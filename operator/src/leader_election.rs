//! Leader election through a `coordination.k8s.io/v1` Lease, so only one operator replica
//! reconciles at a time (kube 5 has no built-in elector; `kube-leader-election` is built on kube 4
//! and compares the holder's `renewTime` with the local clock).
//!
//! Expiry is judged the way client-go judges it, never from the times written in the Lease: a
//! candidate remembers when, on its own monotonic clock, it last saw the Lease record change
//! (holder, `renewTime` or `resourceVersion`), and takes the Lease over only once the record has
//! stayed unchanged for the holder's `leaseDurationSeconds` by that clock. A holder that renews
//! changes the record, so no candidate takes over from a live leader however far apart the nodes'
//! wall clocks are; the wall times in the Lease are written for people and tools only.
//!
//! The holder renews every [`LeaseTiming::retry`]. Writes carry the Lease's `resourceVersion`, so
//! two candidates racing for an expired Lease cannot both win. A leader that cannot renew within
//! [`LeaseTiming::renew_deadline`] (counted from the start of its last successful renewal, before
//! anyone could have seen that renewal) steps down before any candidate's `lease_duration` can run
//! out.
//!
//! The Lease is reached through [`LeaseStore`] and time through [`Clock`], so the election can be
//! run against an in-memory Lease and a fake clock (see the tests).

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
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

/// Time as the election needs it.
pub trait Clock: Send + Sync {
    /// Monotonic time: the only time expiry and deadlines are judged by.
    fn monotonic(&self) -> Instant;
    /// Wall time, written into the Lease for people and tools; never compared.
    fn wall(&self) -> Timestamp;
}

/// The machine's clocks.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn monotonic(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// What a write to the Lease came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    Done,
    /// Someone else wrote the Lease first (its `resourceVersion` moved on, or it already exists).
    Conflict,
}

/// Where the Lease lives: the Kubernetes API ([`KubeLeases`]) or, in tests, memory.
pub trait LeaseStore: Send + Sync {
    fn get(&self) -> impl Future<Output = Result<Option<Lease>, kube::Error>> + Send;
    /// Creates the Lease; [`Written::Conflict`] when it exists.
    fn create(&self, lease: &Lease) -> impl Future<Output = Result<Written, kube::Error>> + Send;
    /// Replaces the Lease if its `resourceVersion` still matches.
    fn replace(&self, lease: &Lease) -> impl Future<Output = Result<Written, kube::Error>> + Send;
}

/// The Lease [`LEASE_NAME`] in a namespace of the cluster.
#[derive(Clone)]
pub struct KubeLeases {
    api: Api<Lease>,
}

impl KubeLeases {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
        }
    }
}

/// 409 (Conflict on a stale `resourceVersion`, or AlreadyExists) is the API's "someone else".
fn written<T>(result: Result<T, kube::Error>) -> Result<Written, kube::Error> {
    match result {
        Ok(_) => Ok(Written::Done),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(Written::Conflict),
        Err(error) => Err(error),
    }
}

impl LeaseStore for KubeLeases {
    async fn get(&self) -> Result<Option<Lease>, kube::Error> {
        self.api.get_opt(LEASE_NAME).await
    }

    async fn create(&self, lease: &Lease) -> Result<Written, kube::Error> {
        written(self.api.create(&PostParams::default(), lease).await)
    }

    async fn replace(&self, lease: &Lease) -> Result<Written, kube::Error> {
        written(
            self.api
                .replace(LEASE_NAME, &PostParams::default(), lease)
                .await,
        )
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

/// Decides from the Lease's spec and how long, by the local monotonic clock, the Lease record has
/// been seen unchanged (pure). The times written in the Lease play no part.
pub fn decide(lease: Option<&LeaseSpec>, identity: &str, unchanged_for: Duration) -> LeaseDecision {
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
    let duration = u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0);
    if unchanged_for >= Duration::from_secs(duration) {
        LeaseDecision::TakeOver
    } else {
        LeaseDecision::Wait {
            holder: holder.to_string(),
        }
    }
}

/// The parts of the Lease record whose change shows its holder is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RecordVersion {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    resource_version: Option<String>,
}

impl RecordVersion {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            holder: spec.and_then(|s| s.holder_identity.clone()),
            renew_time: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
            resource_version: lease.metadata.resource_version.clone(),
        }
    }
}

/// The record last seen and when, by the monotonic clock, it was first seen like that.
#[derive(Clone, Debug)]
struct Observation {
    record: RecordVersion,
    since: Instant,
}

/// One candidate in the election.
pub struct LeaderElector<S = KubeLeases, C = SystemClock> {
    store: S,
    clock: C,
    identity: String,
    timing: LeaseTiming,
    observed: Mutex<Option<Observation>>,
    /// When our last successful write's attempt started: others cannot have seen it earlier.
    last_write_started: Mutex<Option<Instant>>,
}

impl LeaderElector {
    /// A candidate named `identity` for the Lease in `namespace`.
    pub fn new(client: Client, namespace: &str, identity: String, timing: LeaseTiming) -> Self {
        Self::with_store(
            KubeLeases::new(client, namespace),
            SystemClock,
            identity,
            timing,
        )
    }
}

impl<S: LeaseStore, C: Clock> LeaderElector<S, C> {
    /// A candidate on any Lease store and clock.
    pub fn with_store(store: S, clock: C, identity: String, timing: LeaseTiming) -> Self {
        Self {
            store,
            clock,
            identity,
            timing,
            observed: Mutex::new(None),
            last_write_started: Mutex::new(None),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Notes `record` as seen at `now`, and returns how long it has been seen unchanged.
    fn observe(&self, record: RecordVersion, now: Instant) -> Duration {
        let mut observed = lock(&self.observed);
        match observed.as_ref() {
            Some(seen) if seen.record == record => now.saturating_duration_since(seen.since),
            _ => {
                *observed = Some(Observation { record, since: now });
                Duration::ZERO
            }
        }
    }

    /// One attempt: true when we hold the Lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let started = self.clock.monotonic();
        let existing = self.store.get().await?;
        let now = self.clock.monotonic();
        let unchanged_for = existing.as_ref().map_or(Duration::ZERO, |lease| {
            self.observe(RecordVersion::of(lease), now)
        });
        let decision = decide(
            existing.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            unchanged_for,
        );
        let wall = self.clock.wall();
        let (lease, result) = match (decision, existing) {
            (LeaseDecision::Wait { .. }, _) => return Ok(false),
            (LeaseDecision::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE_NAME.to_string()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.held_spec(None, wall)),
                };
                let result = self.store.create(&lease).await;
                (lease, result)
            }
            (LeaseDecision::Renew, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.renew_time = Some(MicroTime(wall));
                spec.lease_duration_seconds = Some(self.duration_seconds());
                let result = self.store.replace(&lease).await;
                (lease, result)
            }
            (LeaseDecision::TakeOver, Some(mut lease)) => {
                lease.spec = Some(self.held_spec(lease.spec.as_ref(), wall));
                let result = self.store.replace(&lease).await;
                (lease, result)
            }
        };
        match result? {
            Written::Done => {
                // Our own write is a change of the record, seen when we made it.
                self.observe(RecordVersion::of(&lease), now);
                *lock(&self.last_write_started) = Some(started);
                Ok(true)
            }
            Written::Conflict => Ok(false),
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
        loop {
            tokio::time::sleep(self.timing.retry).await;
            let left = self
                .timing
                .renew_deadline
                .saturating_sub(self.since_last_write());
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => {
                    warn!(identity = %self.identity, "another replica took the leader lease");
                    return;
                }
                Ok(Err(error)) => warn!(%error, "cannot renew the leader lease"),
                Err(_) => warn!("renewing the leader lease timed out"),
            }
            if self.since_last_write() >= self.timing.renew_deadline {
                warn!("renew deadline passed; stepping down");
                return;
            }
        }
    }

    /// Time since the start of our last successful write (all time, when there was none), by
    /// which the renew deadline is counted: others saw that write no earlier.
    fn since_last_write(&self) -> Duration {
        let now = self.clock.monotonic();
        lock(&self.last_write_started).map_or(Duration::MAX, |started| {
            now.saturating_duration_since(started)
        })
    }

    /// Gives the Lease up on shutdown so a standby takes over at once instead of after expiry.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.store.get().await else {
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
        match self.store.replace(&lease).await {
            Ok(Written::Done) => {}
            Ok(Written::Conflict) => warn!("cannot release the leader lease: it changed"),
            Err(error) => warn!(%error, "cannot release the leader lease"),
        }
    }
}

/// Locks a mutex of plain values, which a panic elsewhere cannot leave half-updated.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    use std::sync::Arc;

    fn spec(holder: &str, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(Timestamp::from_second(990).unwrap())),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn lease_decisions() {
        let seconds = Duration::from_secs;
        assert_eq!(decide(None, "a", seconds(0)), LeaseDecision::Create);
        assert_eq!(
            decide(Some(&spec("a", 15)), "a", seconds(100)),
            LeaseDecision::Renew
        );
        assert_eq!(
            decide(Some(&spec("b", 15)), "a", seconds(14)),
            LeaseDecision::Wait { holder: "b".into() }
        );
        assert_eq!(
            decide(Some(&spec("b", 15)), "a", seconds(15)),
            LeaseDecision::TakeOver
        );
        assert_eq!(
            decide(Some(&spec("", 15)), "a", seconds(0)),
            LeaseDecision::TakeOver
        );
    }

    /// Seconds of fake time shared by every candidate; each candidate's wall clock is off by its
    /// own skew, as on nodes whose clocks disagree.
    #[derive(Clone)]
    struct FakeClock {
        start: Instant,
        elapsed: Arc<Mutex<Duration>>,
        wall_skew: i64,
    }

    impl FakeClock {
        fn advance(&self, by: Duration) {
            *self.elapsed.lock().unwrap() += by;
        }

        fn skewed(&self, wall_skew: i64) -> Self {
            Self {
                wall_skew,
                ..self.clone()
            }
        }
    }

    impl Clock for FakeClock {
        fn monotonic(&self) -> Instant {
            self.start + *self.elapsed.lock().unwrap()
        }

        fn wall(&self) -> Timestamp {
            let elapsed = i64::try_from(self.elapsed.lock().unwrap().as_secs()).unwrap();
            Timestamp::from_second(1_800_000_000 + self.wall_skew + elapsed).unwrap()
        }
    }

    /// One Lease in memory with the API server's optimistic concurrency.
    #[derive(Clone, Default)]
    struct MemoryLeases {
        lease: Arc<Mutex<Option<Lease>>>,
    }

    impl LeaseStore for MemoryLeases {
        async fn get(&self) -> Result<Option<Lease>, kube::Error> {
            Ok(self.lease.lock().unwrap().clone())
        }

        async fn create(&self, lease: &Lease) -> Result<Written, kube::Error> {
            let mut stored = self.lease.lock().unwrap();
            if stored.is_some() {
                return Ok(Written::Conflict);
            }
            let mut lease = lease.clone();
            lease.metadata.resource_version = Some("1".to_string());
            *stored = Some(lease);
            Ok(Written::Done)
        }

        async fn replace(&self, lease: &Lease) -> Result<Written, kube::Error> {
            let mut stored = self.lease.lock().unwrap();
            let Some(current) = stored.as_ref() else {
                return Ok(Written::Conflict);
            };
            if current.metadata.resource_version != lease.metadata.resource_version {
                return Ok(Written::Conflict);
            }
            let next: u64 = current
                .metadata
                .resource_version
                .as_deref()
                .unwrap()
                .parse()
                .unwrap();
            let mut lease = lease.clone();
            lease.metadata.resource_version = Some((next + 1).to_string());
            *stored = Some(lease);
            Ok(Written::Done)
        }
    }

    /// A candidate as `main` runs it: attempts every `retry`, leads from a successful attempt
    /// until a failed one or until the renew deadline passes without a successful renewal (as
    /// [`LeaderElector::hold`] judges it).
    struct Candidate {
        elector: LeaderElector<MemoryLeases, FakeClock>,
        last_attempt_won: bool,
        running: bool,
    }

    impl Candidate {
        fn new(name: &str, store: &MemoryLeases, clock: FakeClock) -> Self {
            Self {
                elector: LeaderElector::with_store(
                    store.clone(),
                    clock,
                    name.to_string(),
                    LeaseTiming::default(),
                ),
                last_attempt_won: false,
                running: true,
            }
        }

        async fn attempt(&mut self) {
            if !self.running {
                return;
            }
            self.last_attempt_won = self.elector.try_acquire_or_renew().await.unwrap();
        }

        fn leads(&self) -> bool {
            self.running
                && self.last_attempt_won
                && self.elector.since_last_write() < LeaseTiming::default().renew_deadline
        }
    }

    /// Runs `a` and `b` (b's wall clock `b_skew` seconds off a's) for `seconds`, one attempt each
    /// per `retry`, and checks they never lead together. `a` stops (as a crashed process) at
    /// `a_stops_at`. Returns the second at which `b` first led.
    async fn elect(b_skew: i64, a_stops_at: u64, seconds: u64) -> Option<u64> {
        let store = MemoryLeases::default();
        let clock = FakeClock {
            start: Instant::now(),
            elapsed: Arc::default(),
            wall_skew: 0,
        };
        let mut a = Candidate::new("a", &store, clock.clone());
        let mut b = Candidate::new("b", &store, clock.skewed(b_skew));
        let retry = LeaseTiming::default().retry.as_secs();
        let mut b_led_at = None;
        for second in 0..seconds {
            if second == a_stops_at {
                a.running = false;
            }
            if second % retry == 0 {
                // `a` goes first at the start, so it is the first leader.
                a.attempt().await;
                b.attempt().await;
            }
            assert!(
                !(a.leads() && b.leads()),
                "two leaders at second {second} (b's clock off by {b_skew} s)"
            );
            assert!(
                !(a.running && b.leads()),
                "b took over from a running leader at second {second} (clock off by {b_skew} s)"
            );
            if b.leads() && b_led_at.is_none() {
                b_led_at = Some(second);
            }
            clock.advance(Duration::from_secs(1));
        }
        b_led_at
    }

    #[tokio::test]
    async fn skewed_clocks_never_give_two_leaders_and_a_silent_leader_is_replaced() {
        let lease_duration = LeaseTiming::default().lease_duration.as_secs();
        let retry = LeaseTiming::default().retry.as_secs();
        // a renews at seconds 0, 2, …, 20 and stops after its attempt at 20.
        let a_stops_at = 21;
        let last_renewal = 20;
        for b_skew in [3600, -3600, 0] {
            let b_led_at = elect(b_skew, a_stops_at, 120)
                .await
                .unwrap_or_else(|| panic!("b never led (clock off by {b_skew} s)"));
            // b saw a's last renewal at its own next attempt, and waits the lease duration from
            // there, whatever the times written in the Lease say.
            let earliest = last_renewal + lease_duration;
            assert!(
                (earliest..=earliest + 2 * retry).contains(&b_led_at),
                "b led at second {b_led_at} (clock off by {b_skew} s), expected from {earliest}"
            );
        }
    }

    #[tokio::test]
    async fn a_new_candidate_waits_a_lease_duration_before_taking_an_abandoned_lease() {
        let store = MemoryLeases::default();
        let clock = FakeClock {
            start: Instant::now(),
            elapsed: Arc::default(),
            wall_skew: 0,
        };
        let mut a = Candidate::new("a", &store, clock.clone());
        a.attempt().await;
        assert!(a.leads());
        // `a` dies; `b` starts an hour later (by any clock) and has never seen the record change.
        clock.advance(Duration::from_secs(3600));
        let mut b = Candidate::new("b", &store, clock.skewed(-7200));
        b.attempt().await;
        assert!(!b.leads(), "b cannot know the lease is abandoned yet");
        clock.advance(LeaseTiming::default().lease_duration);
        b.attempt().await;
        assert!(b.leads());
        let lease = store.lease.lock().unwrap().clone().unwrap();
        let spec = lease.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1));
    }

    #[tokio::test]
    async fn a_released_lease_is_taken_at_once() {
        let store = MemoryLeases::default();
        let clock = FakeClock {
            start: Instant::now(),
            elapsed: Arc::default(),
            wall_skew: 0,
        };
        let mut a = Candidate::new("a", &store, clock.clone());
        let mut b = Candidate::new("b", &store, clock.skewed(3600));
        a.attempt().await;
        b.attempt().await;
        assert!(a.leads() && !b.leads());
        a.elector.release().await;
        a.running = false;
        b.attempt().await;
        assert!(b.leads());
    }
}
