//! A tenant's past usage (GPU-, CPU- and GiB-seconds), decayed exponentially with a half-life.

use std::time::Duration;

use super::Amount;
use crate::model::UnixMillis;

/// Resource-seconds used, decayed to `at`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PastUsage {
    seconds: Amount,
    at: UnixMillis,
}

impl PastUsage {
    /// The usage decayed to `now`.
    pub fn at(&self, now: UnixMillis, half_life: Duration) -> Amount {
        let elapsed = (now - self.at).max(0) as f64 / 1000.0;
        self.seconds.scaled(decay(elapsed, half_life))
    }

    /// Adds an attempt that held `held` for `ran`, ending at `now`: each second of it counts
    /// decayed by how long ago it was.
    pub fn add_run(&mut self, held: Amount, ran: Duration, now: UnixMillis, half_life: Duration) {
        let h = half_life.as_secs_f64().max(1e-9);
        // ∫ from 0 to ran of 2^(−s/h) ds = h/ln2 × (1 − 2^(−ran/h)).
        let integral = h / std::f64::consts::LN_2 * (1.0 - decay(ran.as_secs_f64(), half_life));
        self.seconds = self.at(now, half_life).plus(held.scaled(integral));
        self.at = now.max(self.at);
    }

    /// The usage decayed to `now` in resource-hours (GPU-hours, CPU-hours, GiB-hours): what fair
    /// share adds to a tenant's holdings, so that an hour of a GPU used counts like a GPU held.
    pub fn hours(&self, now: UnixMillis, half_life: Duration) -> Amount {
        self.at(now, half_life).scaled(1.0 / 3600.0)
    }
}

/// 2^(−elapsed / half-life).
fn decay(elapsed_s: f64, half_life: Duration) -> f64 {
    (-elapsed_s / half_life.as_secs_f64().max(1e-9)).exp2()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn gpus(n: f64) -> Amount {
        Amount { gpus: n, cpus: 0.0, memory_gib: 0.0 }
    }

    #[test]
    fn usage_halves_every_half_life() {
        let mut u = PastUsage::default();
        // A short run counts almost in full.
        u.add_run(gpus(2.0), Duration::from_secs(1), 0, HOUR);
        assert!((u.at(0, HOUR).gpus - 2.0).abs() < 1e-3);
        assert!((u.at(3_600_000, HOUR).gpus - 1.0).abs() < 1e-3);
        assert!((u.at(7_200_000, HOUR).gpus - 0.5).abs() < 1e-3);
    }

    #[test]
    fn a_steady_holding_converges_to_holding_times_half_life_over_ln2() {
        let mut u = PastUsage::default();
        // 4 GPUs held for 20 half-lives, reported hour by hour: 4 × 1 h / ln 2 GPU-hours.
        for hour in 1..=20 {
            u.add_run(gpus(4.0), HOUR, hour * 3_600_000, HOUR);
        }
        let hours = u.hours(20 * 3_600_000, HOUR).gpus;
        assert!((hours - 4.0 / std::f64::consts::LN_2).abs() < 0.01, "{hours}");
    }

    #[test]
    fn one_long_run_equals_many_short_ones() {
        let (mut long, mut short) = (PastUsage::default(), PastUsage::default());
        long.add_run(gpus(1.0), 4 * HOUR, 4 * 3_600_000, HOUR);
        for q in 1..=16 {
            short.add_run(gpus(1.0), HOUR / 4, q * 900_000, HOUR);
        }
        let (a, b) = (long.at(4 * 3_600_000, HOUR).gpus, short.at(4 * 3_600_000, HOUR).gpus);
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}
