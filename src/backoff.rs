//! Capped exponential backoff with jitter: how every retry loop in Palisade waits.
//!
//! Each wait doubles the step up to a cap, and is drawn between half and all of the step, so a
//! fleet of sidecars that lost the control plane together does not come back in lockstep.
//! [`reset`](Backoff::reset) is explicit: only the caller knows when an attempt went well
//! enough (a certificate installed, a stream that delivered a snapshot) for the next failure to
//! be treated as a fresh one.

use std::time::Duration;

/// Waits between retries of one operation. Not shared: each retry loop owns one.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    step: Duration,
}

impl Backoff {
    /// Steps of `initial`, doubling up to `cap` (an `initial` above `cap` starts at `cap`).
    pub fn new(initial: Duration, cap: Duration) -> Self {
        let initial = initial.min(cap);
        Backoff { initial, cap, step: initial }
    }

    /// The wait before the next attempt, between half and all of the current step; the step
    /// then doubles, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        self.delay_at(rand::random::<f64>())
    }

    /// [`next_delay`](Self::next_delay), then sleeps for it. Returns how long it slept.
    pub async fn wait(&mut self) -> Duration {
        let delay = self.next_delay();
        tokio::time::sleep(delay).await;
        delay
    }

    /// The next failure waits the initial step again.
    pub fn reset(&mut self) {
        self.step = self.initial;
    }

    /// `unit` is a uniform random number in [0, 1).
    fn delay_at(&mut self, unit: f64) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.cap);
        let half = step / 2;
        half.saturating_add((step - half).mul_f64(unit.clamp(0.0, 1.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn steps_double_up_to_the_cap_and_jitter_stays_within_half_a_step() {
        let mut low = Backoff::new(100 * MS, 800 * MS);
        let mut high = low.clone();
        let lows: Vec<_> = (0..6).map(|_| low.delay_at(0.0)).collect();
        let highs: Vec<_> = (0..6).map(|_| high.delay_at(1.0)).collect();
        assert_eq!(lows, [50 * MS, 100 * MS, 200 * MS, 400 * MS, 400 * MS, 400 * MS]);
        assert_eq!(highs, [100 * MS, 200 * MS, 400 * MS, 800 * MS, 800 * MS, 800 * MS]);

        let mut random = Backoff::new(100 * MS, 800 * MS);
        for step in [100, 200, 400, 800, 800] {
            let d = random.next_delay();
            assert!(d >= step * MS / 2 && d <= step * MS, "{d:?} outside [{}, {step}] ms", step / 2);
        }
    }

    #[test]
    fn an_initial_step_above_the_cap_starts_at_the_cap_and_a_huge_cap_does_not_overflow() {
        assert_eq!(Backoff::new(10 * MS, 4 * MS).delay_at(1.0), 4 * MS);
        let mut b = Backoff::new(Duration::MAX / 2, Duration::MAX);
        for _ in 0..4 {
            assert!(b.delay_at(1.0) >= Duration::MAX / 4);
        }
        assert_eq!(b.delay_at(1.0), Duration::MAX);
    }

    /// Under paused time a wait takes exactly what it said, to the timer's millisecond: a grown
    /// backoff waits long, a reset one short.
    #[tokio::test(start_paused = true)]
    async fn reset_brings_the_wait_back_to_the_initial_step() {
        async fn timed(b: &mut Backoff) -> Duration {
            let start = tokio::time::Instant::now();
            let said = b.wait().await;
            let took = start.elapsed();
            assert!(took >= said && took - said < MS, "waited {took:?} for {said:?}");
            took
        }
        let mut b = Backoff::new(100 * MS, 5000 * MS);
        for _ in 0..8 {
            timed(&mut b).await;
        }
        let at_cap = timed(&mut b).await;
        assert!(at_cap >= 2500 * MS && at_cap <= 5001 * MS, "at the cap: {at_cap:?}");

        b.reset();
        let after_reset = timed(&mut b).await;
        assert!(after_reset >= 50 * MS && after_reset <= 101 * MS, "after reset: {after_reset:?}");
    }
}
