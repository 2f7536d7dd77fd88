//! Per-request load balancing over a service's endpoints: the power of two choices over a
//! peak-sensitive moving average of latency, weighted by the requests outstanding (the balancer
//! of Linkerd's proxy, after tower's `PeakEwma`).
//!
//! Each request picks two endpoints at random and goes to the cheaper, where an endpoint's cost
//! is its latency estimate times (requests outstanding + 1). The estimate jumps to any slower
//! observation at once (a peak), follows faster ones gradually, and decays towards zero while
//! nothing is observed, so an endpoint that was slow is tried again after a while and, if it
//! recovered, takes its share back. A request that failed counts as [`FAILURE_PENALTY`], so an
//! endpoint that fails fast (connection refused) is not mistaken for a fast one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The latency a failed request counts as.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// What the balancer knows about one endpoint. Kept across endpoint-set changes for as long as
/// the endpoint stays.
#[derive(Debug)]
pub struct Load {
    outstanding: AtomicU32,
    estimate: Mutex<Estimate>,
}

#[derive(Debug)]
struct Estimate {
    rtt_ns: f64,
    at: Instant,
}

/// Settings of the latency estimate.
#[derive(Clone, Copy, Debug)]
pub struct Decay {
    /// The time constant: an observation's weight falls to 1/e after this long.
    pub period: Duration,
    /// The estimate of an endpoint nothing was observed of yet.
    pub default_rtt: Duration,
}

impl Default for Decay {
    /// Linkerd's defaults: a 10 s decay and a 30 ms first guess.
    fn default() -> Self {
        Decay { period: Duration::from_secs(10), default_rtt: Duration::from_millis(30) }
    }
}

impl Load {
    pub fn new(decay: Decay) -> Arc<Load> {
        Arc::new(Load {
            outstanding: AtomicU32::new(0),
            estimate: Mutex::new(Estimate { rtt_ns: decay.default_rtt.as_nanos() as f64, at: Instant::now() }),
        })
    }

    /// The cost of sending one more request here now.
    pub fn cost(&self, now: Instant, decay: Decay) -> f64 {
        let rtt = {
            let e = self.estimate.lock();
            e.rtt_ns * weight(now.saturating_duration_since(e.at), decay)
        };
        rtt * f64::from(self.outstanding.load(Ordering::Relaxed) + 1)
    }

    /// Counts a request as outstanding until the returned guard is finished or dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight { load: self.clone(), started: Instant::now() }
    }

    fn observe(&self, rtt: Duration, decay: Decay) {
        let now = Instant::now();
        let rtt_ns = rtt.as_nanos() as f64;
        let mut e = self.estimate.lock();
        if rtt_ns > e.rtt_ns {
            e.rtt_ns = rtt_ns;
        } else {
            let w = weight(now.saturating_duration_since(e.at), decay);
            e.rtt_ns = e.rtt_ns * w + rtt_ns * (1.0 - w);
        }
        e.at = now;
    }

    /// Requests sent here and not answered yet.
    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// How much of an estimate `elapsed` old still counts.
fn weight(elapsed: Duration, decay: Decay) -> f64 {
    (-(elapsed.as_nanos() as f64) / decay.period.as_nanos().max(1) as f64).exp()
}

/// A request outstanding at an endpoint.
#[must_use]
pub struct InFlight {
    load: Arc<Load>,
    started: Instant,
}

impl InFlight {
    /// The response (its headers) arrived: its latency goes into the estimate, or
    /// [`FAILURE_PENALTY`] if it failed.
    pub fn finish(self, failed: bool, decay: Decay) {
        let rtt = self.started.elapsed();
        self.load.observe(if failed { rtt.max(FAILURE_PENALTY) } else { rtt }, decay);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Of `n` endpoints, the index to send the next request to: the cheaper of two distinct ones
/// picked at random; `None` when there are none.
pub fn pick(n: usize, cost: impl Fn(usize) -> f64) -> Option<usize> {
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let a = rand::random_range(0..n);
            let b = (a + rand::random_range(1..n)) % n;
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decay() -> Decay {
        Decay { period: Duration::from_millis(200), default_rtt: Duration::from_millis(10) }
    }

    #[test]
    fn a_slower_observation_counts_at_once_a_faster_one_gradually() {
        let load = Load::new(decay());
        load.observe(Duration::from_millis(100), decay());
        let now = Instant::now();
        assert!(load.cost(now, decay()) > 90e6, "the peak is taken whole");
        load.observe(Duration::from_millis(1), decay());
        let after = load.cost(Instant::now(), decay());
        assert!(after > 50e6, "one fast answer right after does not erase the peak: {after}");
    }

    #[test]
    fn the_estimate_decays_while_nothing_is_observed() {
        let load = Load::new(decay());
        load.observe(Duration::from_millis(100), decay());
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        assert!(load.cost(later, decay()) < load.cost(now, decay()) / 100.0, "five periods on, under 1 %");
    }

    #[test]
    fn outstanding_requests_multiply_the_cost_until_they_end() {
        let load = Load::new(decay());
        let now = Instant::now();
        let idle = load.cost(now, decay());
        let (a, b) = (load.start(), load.start());
        assert_eq!(load.outstanding(), 2);
        assert!((load.cost(now, decay()) / idle - 3.0).abs() < 1e-9);
        drop(a);
        b.finish(true, decay());
        assert_eq!(load.outstanding(), 0, "a dropped request and a finished one both end");
        assert!(load.cost(Instant::now(), decay()) > 0.9e9, "a failure counts as the penalty");
    }

    #[test]
    fn two_choices_never_pick_the_costliest_of_three() {
        let costs = [1.0, 1000.0, 2.0];
        let mut hits = [0; 3];
        for _ in 0..3000 {
            hits[pick(3, |i| costs[i]).unwrap()] += 1;
        }
        assert_eq!(hits[1], 0, "{hits:?}");
        assert!(hits[0] > hits[2] && hits[2] > 0, "the cheapest wins most, the middle one still gets some: {hits:?}");
        assert_eq!(pick(0, |_| 0.0), None);
        assert_eq!(pick(1, |_| 0.0), Some(0));
    }
}
