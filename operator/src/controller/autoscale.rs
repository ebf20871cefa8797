//! Lag-driven replica count: a pure decision from the consumer's lag and the last decision.
//!
//! `replicas = ceil(lag / targetLagPerReplica)`, clamped to `[minReplicas, maxReplicas]`. Scaling up
//! happens at once, because lag grows while we wait; scaling down waits until the lag has stayed low
//! for `scaleDownStabilization`, so a brief lull does not tear workers down and a burst right after
//! does not have to start them again. The start of the low period is kept in `status.autoscale`.
//! While the lag is unknown or the data plane is not ready (a server is down, so more workers
//! would not drain anything), the current replicas are kept.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use signal_model::{AutoscaleSpec, AutoscaleStatus};

/// What the autoscaler knows when it decides.
#[derive(Clone, Debug)]
pub struct AutoscaleInput<'a> {
    pub spec: &'a AutoscaleSpec,
    /// Messages the consumer has not delivered yet; `None` when the consumer could not be read.
    pub lag: Option<u64>,
    /// The stream, consumer and table are ready. While one is not (a server is down), the lag
    /// grows because the workers cannot write, not because they are too few: replicas are kept.
    pub data_plane_ready: bool,
    /// The previous decision, from `status.autoscale`.
    pub previous: Option<&'a AutoscaleStatus>,
    /// Replicas running when there is no previous decision (the Deployment's or the spec's).
    pub current_replicas: i32,
    pub now: DateTime<Utc>,
}

/// The decision, and when it should be looked at again at the latest.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoscaleDecision {
    pub status: AutoscaleStatus,
    /// Set while a scale-down waits for stabilisation: when the wait ends.
    pub recheck_after: Option<Duration>,
}

/// Replicas the lag asks for, before stabilisation.
pub fn replicas_for_lag(spec: &AutoscaleSpec, lag: u64) -> i32 {
    let (min, max) = bounds(spec);
    let target = u64::try_from(spec.target_lag_per_replica.max(1)).unwrap_or(1);
    let wanted = lag.div_ceil(target);
    i32::try_from(wanted).unwrap_or(i32::MAX).clamp(min, max)
}

fn bounds(spec: &AutoscaleSpec) -> (i32, i32) {
    let min = spec.min_replicas.max(0);
    (min, spec.max_replicas.max(min))
}

/// Chooses the replica count.
pub fn decide(input: &AutoscaleInput<'_>) -> AutoscaleDecision {
    let (min, max) = bounds(input.spec);
    let current = input
        .previous
        .map(|p| p.desired_replicas)
        .unwrap_or(input.current_replicas)
        .clamp(min, max);
    let lag = match input.lag {
        Some(lag) if input.data_plane_ready => Some(lag),
        _ => None,
    };
    let Some(lag) = lag else {
        let why = if input.lag.is_none() {
            "consumer lag unknown"
        } else {
            "the data plane is not ready"
        };
        return AutoscaleDecision {
            status: AutoscaleStatus {
                desired_replicas: current,
                reason: format!("{why}; keeping the current replicas"),
                low_lag_since: input.previous.and_then(|p| p.low_lag_since.clone()),
            },
            recheck_after: None,
        };
    };
    let wanted = replicas_for_lag(input.spec, lag);
    let per_replica = input.spec.target_lag_per_replica;
    if wanted >= current {
        let reason = if wanted > current {
            format!(
                "lag {lag} over {per_replica} per replica: scaled up from {current} to {wanted}"
            )
        } else {
            format!("lag {lag} fits {wanted} replicas at {per_replica} per replica")
        };
        return AutoscaleDecision {
            status: AutoscaleStatus {
                desired_replicas: wanted,
                reason,
                low_lag_since: None,
            },
            recheck_after: None,
        };
    }

    let stabilization = input.spec.scale_down_stabilization.as_duration();
    let low_since = input
        .previous
        .and_then(|p| p.low_lag_since.as_deref())
        .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
        .map(|time| time.with_timezone(&Utc))
        .filter(|time| *time <= input.now)
        .unwrap_or(input.now);
    let low_for = (input.now - low_since).to_std().unwrap_or_default();
    if low_for >= stabilization {
        AutoscaleDecision {
            status: AutoscaleStatus {
                desired_replicas: wanted,
                reason: format!(
                    "lag {lag} has needed fewer replicas for {}s: scaled down from {current} to {wanted}",
                    low_for.as_secs()
                ),
                low_lag_since: None,
            },
            recheck_after: None,
        }
    } else {
        let remaining = stabilization - low_for;
        AutoscaleDecision {
            status: AutoscaleStatus {
                desired_replicas: current,
                reason: format!(
                    "lag {lag} needs {wanted} replicas; keeping {current} for another {}s of stabilization",
                    remaining.as_secs()
                ),
                low_lag_since: Some(low_since.to_rfc3339_opts(SecondsFormat::Secs, true)),
            },
            recheck_after: Some(remaining),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signal_model::HumanDuration;

    fn spec() -> AutoscaleSpec {
        AutoscaleSpec {
            min_replicas: 1,
            max_replicas: 10,
            target_lag_per_replica: 1000,
            scale_down_stabilization: HumanDuration::from_secs(300),
        }
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + seconds, 0).unwrap()
    }

    fn decide_at(
        lag: Option<u64>,
        previous: Option<&AutoscaleStatus>,
        seconds: i64,
    ) -> AutoscaleDecision {
        decide(&AutoscaleInput {
            spec: &spec(),
            lag,
            data_plane_ready: true,
            previous,
            current_replicas: 1,
            now: at(seconds),
        })
    }

    #[test]
    fn replicas_are_kept_while_the_data_plane_is_not_ready() {
        let previous = AutoscaleStatus {
            desired_replicas: 2,
            reason: String::new(),
            low_lag_since: Some("2023-11-14T22:13:20Z".to_string()),
        };
        let decision = decide(&AutoscaleInput {
            spec: &spec(),
            lag: Some(9_000),
            data_plane_ready: false,
            previous: Some(&previous),
            current_replicas: 2,
            now: at(60),
        });
        assert_eq!(decision.status.desired_replicas, 2);
        assert_eq!(
            decision.status.reason,
            "the data plane is not ready; keeping the current replicas"
        );
        assert_eq!(decision.status.low_lag_since, previous.low_lag_since);
        assert_eq!(decision.recheck_after, None);
    }

    #[test]
    fn replicas_follow_lag_within_bounds() {
        assert_eq!(replicas_for_lag(&spec(), 0), 1, "never below minReplicas");
        assert_eq!(replicas_for_lag(&spec(), 1000), 1);
        assert_eq!(replicas_for_lag(&spec(), 1001), 2, "rounds up");
        assert_eq!(replicas_for_lag(&spec(), 4500), 5);
        assert_eq!(
            replicas_for_lag(&spec(), u64::MAX),
            10,
            "never above maxReplicas"
        );
    }

    #[test]
    fn scales_up_at_once() {
        let previous = AutoscaleStatus {
            desired_replicas: 2,
            reason: String::new(),
            low_lag_since: None,
        };
        let decision = decide_at(Some(7_500), Some(&previous), 0);
        assert_eq!(decision.status.desired_replicas, 8);
        assert!(
            decision.status.reason.contains("scaled up from 2 to 8"),
            "{}",
            decision.status.reason
        );
        assert_eq!(decision.status.low_lag_since, None);
    }

    #[test]
    fn scales_down_only_after_the_lag_stayed_low_for_the_stabilization_window() {
        let running = AutoscaleStatus {
            desired_replicas: 6,
            reason: String::new(),
            low_lag_since: None,
        };
        // The lag drops: keep 6 replicas and remember since when it is low.
        let first = decide_at(Some(900), Some(&running), 0);
        assert_eq!(first.status.desired_replicas, 6);
        assert_eq!(
            first.status.low_lag_since.as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
        assert_eq!(first.recheck_after, Some(Duration::from_secs(300)));

        // Still low four minutes later: keep waiting, with the original start.
        let later = decide_at(Some(900), Some(&first.status), 240);
        assert_eq!(later.status.desired_replicas, 6);
        assert_eq!(later.status.low_lag_since, first.status.low_lag_since);
        assert_eq!(later.recheck_after, Some(Duration::from_secs(60)));

        // Five minutes: scale down to what the lag needs.
        let done = decide_at(Some(900), Some(&later.status), 300);
        assert_eq!(done.status.desired_replicas, 1);
        assert_eq!(done.status.low_lag_since, None);
    }

    #[test]
    fn a_burst_during_the_window_resets_it() {
        let running = AutoscaleStatus {
            desired_replicas: 6,
            reason: String::new(),
            low_lag_since: None,
        };
        let low = decide_at(Some(100), Some(&running), 0);
        let burst = decide_at(Some(6_000), Some(&low.status), 200);
        assert_eq!(burst.status.desired_replicas, 6);
        assert_eq!(
            burst.status.low_lag_since, None,
            "high lag clears the low-lag start"
        );
        let low_again = decide_at(Some(100), Some(&burst.status), 400);
        assert_eq!(
            low_again.status.desired_replicas, 6,
            "the window starts over"
        );
    }

    #[test]
    fn unknown_lag_keeps_the_current_count_clamped() {
        let previous = AutoscaleStatus {
            desired_replicas: 40,
            reason: String::new(),
            low_lag_since: None,
        };
        let decision = decide_at(None, Some(&previous), 0);
        assert_eq!(
            decision.status.desired_replicas, 10,
            "clamped to maxReplicas"
        );
        assert!(decision.status.reason.contains("unknown"));
    }
}
