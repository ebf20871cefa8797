//! The one retry policy: exponential backoff built on `backon`, for inserts, reconnects, local
//! mode's restarts and reconciles, and the controller's requeues.
//!
//! Delays double from an initial delay up to a cap. [`Backoff`] draws each one with *equal
//! jitter*, uniformly from `[delay/2, delay)`: workers retrying after the same outage spread out
//! instead of hitting the server in lockstep, yet none retries sooner than half the delay. The
//! controller's requeues need no jitter (kube's queue spreads them) and use [`RetryPolicy::delay`].

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays that double from `initial` up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The delay after `previous_failures` failures, without jitter: `initial * 2^failures`,
    /// capped at `max`.
    pub fn delay(&self, previous_failures: u32) -> Duration {
        let mut delays = self.builder(self.initial, self.max).build();
        // Doubling reaches any cap within 64 steps; beyond that the cap holds.
        let step = usize::try_from(previous_failures.min(64)).unwrap_or(64);
        delays.nth(step).unwrap_or(self.max)
    }

    /// A stateful backoff with equal jitter, for one retry loop.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.initial, self.max)
    }

    fn builder(&self, initial: Duration, max: Duration) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_factor(2.0)
            .with_min_delay(initial)
            .with_max_delay(max)
            .without_max_times()
    }

    /// `backon` adds jitter on top of a delay (`[d, 2d)`), so halving the schedule draws
    /// `[delay/2, delay)`.
    fn jittered(&self) -> ExponentialBuilder {
        self.builder(self.initial / 2, self.max / 2).with_jitter()
    }
}

/// One retry loop's delays: doubling from `initial` up to `max`, with equal jitter.
#[derive(Debug)]
pub struct Backoff {
    policy: RetryPolicy,
    delays: ExponentialBackoff,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let policy = RetryPolicy::new(initial, max);
        Self {
            delays: policy.jittered().build(),
            policy,
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        // The schedule has no end (`without_max_times`); the cap is the answer if it ever had.
        self.delays.next().unwrap_or(self.policy.max)
    }

    /// Attempts made since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts over from the initial delay, after a success.
    pub fn reset(&mut self) {
        self.delays = self.policy.jittered().build();
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(delay: Duration, low_ms: u64, high_ms: u64) -> bool {
        delay >= Duration::from_millis(low_ms) && delay <= Duration::from_millis(high_ms)
    }

    #[test]
    fn delays_grow_to_the_cap_with_equal_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(within(delays[0], 50, 100), "{delays:?}");
        assert!(within(delays[3], 400, 800), "{delays:?}");
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(2)),
            "{delays:?}"
        );
        assert!(delays[7] >= Duration::from_secs(1), "{delays:?}");
        assert_eq!(backoff.attempts(), 8);
        backoff.reset();
        assert_eq!(backoff.attempts(), 0);
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_the_delays_of_loops_that_start_together() {
        let draws: Vec<Duration> = (0..32)
            .map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(8)).next_delay())
            .collect();
        let first = draws[0];
        assert!(draws.iter().any(|d| *d != first), "{draws:?}");
    }

    #[test]
    fn the_plain_schedule_doubles_up_to_the_cap() {
        let policy = RetryPolicy::new(Duration::from_secs(5), Duration::from_secs(300));
        assert_eq!(policy.delay(0), Duration::from_secs(5));
        assert_eq!(policy.delay(1), Duration::from_secs(10));
        assert_eq!(policy.delay(3), Duration::from_secs(40));
        assert_eq!(policy.delay(6), Duration::from_secs(300));
        assert_eq!(policy.delay(u32::MAX), Duration::from_secs(300));
    }
}
