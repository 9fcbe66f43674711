//! One retry policy for everything that tries again: the price feeds' HTTP requests, the agent's
//! staging requests and its reconnects to the broker. Pure arithmetic: the caller passes the random
//! number the jitter uses and sleeps itself.
//!
//! The pause before retry `n` (1 = the first retry) is `min_backoff × multiplierⁿ⁻¹`, capped at
//! `max_backoff`, less a random share of at most `jitter` of itself ("equal jitter" at 0.5, "full
//! jitter" at 1), and never shorter than the server's hint (`Retry-After`), itself capped at
//! `max_backoff` so a server cannot park a client for an hour.

use std::time::Duration;

/// When a caller stops trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryLimit {
    /// Tries in all, the first one included (0 counts as 1).
    Tries(u32),
    /// Another try starts only while this long has not passed since the first one began (the
    /// pause before it included).
    Within(Duration),
    /// Tries forever (a reconnect loop, which a shutdown ends).
    Never,
}

/// How long to wait between tries, and how many tries to make.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// The pause before the first retry.
    pub min_backoff: Duration,
    /// The longest pause; also the cap on a server's hint.
    pub max_backoff: Duration,
    /// The factor between one pause and the next (values below 1 count as 1).
    pub multiplier: f64,
    /// The largest share of a pause that is taken off at random, 0 (none) to 1 (anything from 0
    /// to the full pause).
    pub jitter: f64,
    pub limit: RetryLimit,
}

impl RetryPolicy {
    /// Doubling from `min_backoff` to `max_backoff`, without jitter, trying forever.
    pub fn exponential(min_backoff: Duration, max_backoff: Duration) -> Self {
        Self { min_backoff, max_backoff, multiplier: 2.0, jitter: 0.0, limit: RetryLimit::Never }
    }

    /// The same policy with `jitter` (0 to 1) of each pause taken off at random.
    pub fn with_jitter(self, jitter: f64) -> Self {
        Self { jitter, ..self }
    }

    /// The same policy stopping at `limit`.
    pub fn with_limit(self, limit: RetryLimit) -> Self {
        Self { limit, ..self }
    }

    /// The pause before retry number `retry` (1 = the first retry; 0 counts as 1). `random` is a
    /// number in [0, 1) (`fastrand::f64()`); it picks how much of the jitter applies. `hint` is the
    /// server's `Retry-After`: the pause is at least that, but never more than `max_backoff`.
    pub fn delay(&self, retry: u32, hint: Option<Duration>, random: f64) -> Duration {
        let cap = self.max_backoff.as_nanos() as f64;
        let multiplier = if self.multiplier >= 1.0 { self.multiplier } else { 1.0 };
        let exponent = retry.saturating_sub(1).min(i32::MAX as u32) as i32;
        let grown = self.min_backoff.as_nanos() as f64 * multiplier.powi(exponent);
        // `!(a < b)` also catches an infinite product.
        let backoff = if grown < cap { grown } else { cap };
        let jittered = backoff * (1.0 - unit(self.jitter) * unit(random));
        let pause = if jittered < cap { Duration::from_nanos(jittered.round() as u64) } else { self.max_backoff };
        pause.max(hint.unwrap_or_default().min(self.max_backoff))
    }

    /// After `tries` tries failed (the first one began `elapsed` ago), the pause before the next
    /// one, or `None` when the limit is reached. `hint` and `random` as for [`delay`](Self::delay).
    pub fn next_delay(&self, tries: u32, elapsed: Duration, hint: Option<Duration>, random: f64) -> Option<Duration> {
        let pause = self.delay(tries, hint, random);
        match self.limit {
            RetryLimit::Tries(max) if tries >= max.max(1) => None,
            RetryLimit::Within(deadline) if elapsed.saturating_add(pause) > deadline => None,
            _ => Some(pause),
        }
    }
}

/// `value` clamped to [0, 1] (NaN → 0).
fn unit(value: f64) -> f64 {
    if value >= 1.0 {
        1.0
    } else if value > 0.0 {
        value
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::exponential(ms(100), ms(350))
    }

    #[test]
    fn pauses_grow_by_the_multiplier_up_to_the_cap() {
        let p = policy();
        let pauses: Vec<Duration> = (1..=4).map(|n| p.delay(n, None, 0.5)).collect();
        assert_eq!(pauses, [ms(100), ms(200), ms(350), ms(350)]);
        assert_eq!(p.delay(0, None, 0.0), ms(100), "retry 0 counts as the first");
        let triple = RetryPolicy { multiplier: 3.0, ..RetryPolicy::exponential(ms(10), ms(1000)) };
        assert_eq!(triple.delay(3, None, 0.0), ms(90));
        let flat = RetryPolicy { multiplier: 0.5, ..triple.clone() };
        assert_eq!(flat.delay(5, None, 0.0), ms(10), "a multiplier below 1 counts as 1");
        let nan = RetryPolicy { multiplier: f64::NAN, ..triple };
        assert_eq!(nan.delay(5, None, 0.0), ms(10));
    }

    #[test]
    fn many_retries_or_huge_bounds_do_not_overflow() {
        assert_eq!(policy().delay(u32::MAX, None, 0.0), ms(350));
        let huge = RetryPolicy::exponential(Duration::from_secs(1), Duration::MAX);
        assert_eq!(huge.delay(u32::MAX, None, 0.0), Duration::MAX);
        assert_eq!(huge.with_jitter(1.0).delay(u32::MAX, Some(Duration::MAX), 0.9), Duration::MAX);
    }

    #[test]
    fn the_hint_is_a_floor_capped_at_the_longest_pause() {
        let p = policy();
        assert_eq!(p.delay(1, Some(ms(300)), 0.0), ms(300), "a longer hint wins");
        assert_eq!(p.delay(2, Some(ms(50)), 0.0), ms(200), "a shorter hint does not shorten the backoff");
        assert_eq!(p.delay(1, Some(Duration::from_secs(3600)), 0.0), ms(350), "the hint is capped");
        let jittered = p.with_jitter(1.0);
        assert_eq!(jittered.delay(3, Some(ms(120)), 0.99), ms(120), "jitter never goes below the hint");
    }

    #[test]
    fn jitter_takes_at_most_its_share_off_the_pause() {
        let p = RetryPolicy::exponential(ms(1000), ms(8000)).with_jitter(0.5);
        assert_eq!(p.delay(2, None, 0.0), ms(2000), "random 0 takes nothing off");
        assert_eq!(p.delay(2, None, 0.5), ms(1500));
        assert_eq!(p.delay(4, None, 0.5), ms(6000), "jitter applies below the cap too");
        let mut rng = fastrand::Rng::with_seed(7);
        let pauses: Vec<Duration> = (0..1000).map(|_| p.delay(2, None, rng.f64())).collect();
        assert!(pauses.iter().all(|d| (ms(1000)..=ms(2000)).contains(d)), "within [pause/2, pause]");
        let (low, high) = (pauses.iter().min().unwrap(), pauses.iter().max().unwrap());
        assert!(*low < ms(1100) && *high > ms(1900), "spread over the range: {low:?}..{high:?}");
        assert_eq!(p.clone().with_jitter(7.0).delay(2, None, 0.25), ms(1500), "jitter over 1 counts as 1");
        assert_eq!(p.clone().with_jitter(-1.0).delay(2, None, 0.25), ms(2000), "below 0 as 0");
        assert_eq!(p.delay(2, None, 5.0), ms(1000), "a random number over 1 counts as 1");
    }

    #[test]
    fn a_try_limit_counts_the_first_try() {
        let p = policy().with_limit(RetryLimit::Tries(3));
        assert_eq!(p.next_delay(1, Duration::ZERO, None, 0.0), Some(ms(100)));
        assert_eq!(p.next_delay(2, Duration::ZERO, None, 0.0), Some(ms(200)));
        assert_eq!(p.next_delay(3, Duration::ZERO, None, 0.0), None);
        let once = policy().with_limit(RetryLimit::Tries(0));
        assert_eq!(once.next_delay(1, Duration::ZERO, None, 0.0), None, "0 tries count as 1");
    }

    #[test]
    fn a_deadline_refuses_a_try_that_would_start_past_it() {
        let p = policy().with_limit(RetryLimit::Within(ms(1000)));
        assert_eq!(p.next_delay(1, ms(900), None, 0.0), Some(ms(100)), "starts right at the deadline");
        assert_eq!(p.next_delay(2, ms(900), None, 0.0), None);
        assert_eq!(p.next_delay(1, ms(800), Some(ms(300)), 0.0), None, "the hint counts");
        assert_eq!(p.next_delay(1, Duration::MAX, None, 0.0), None);
    }

    #[test]
    fn without_a_limit_tries_never_run_out() {
        assert_eq!(policy().next_delay(u32::MAX, Duration::MAX, None, 0.0), Some(ms(350)));
    }
}
