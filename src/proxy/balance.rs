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
//!
//! An endpoint that fails [`EJECT_AFTER`] requests in a row is ejected: no request is sent
//! there for [`EJECTION`] (doubling at each ejection in a row, up to [`MAX_EJECTION`]), unless
//! every endpoint is ejected. Then it is tried again, and one success ends its probation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The latency a failed request counts as.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);
/// Failures in a row that eject an endpoint.
pub const EJECT_AFTER: u32 = 5;
/// How long a first ejection lasts.
pub const EJECTION: Duration = Duration::from_secs(10);
/// The longest ejection.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What the balancer knows about one endpoint. Kept across endpoint-set changes for as long as
/// the endpoint stays.
#[derive(Debug)]
pub struct Load {
    outstanding: AtomicU32,
    /// One lock for both: a finished request updates both.
    state: Mutex<(Estimate, Health)>,
}

/// Failure accrual of one endpoint.
#[derive(Debug, Default)]
struct Health {
    failures_in_a_row: u32,
    /// Ejections in a row (without a success between them).
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Health {
    /// Counts a request's outcome; true when this failure ejects the endpoint.
    fn accrue(&mut self, failed: bool, now: Instant) -> bool {
        if !failed {
            self.failures_in_a_row = 0;
            self.ejections = 0;
            return false;
        }
        self.failures_in_a_row += 1;
        if self.failures_in_a_row < EJECT_AFTER {
            return false;
        }
        let period = EJECTION.saturating_mul(1 << self.ejections.min(8)).min(MAX_EJECTION);
        self.ejected_until = Some(now + period);
        self.failures_in_a_row = 0;
        self.ejections += 1;
        true
    }
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
            state: Mutex::new((
                Estimate { rtt_ns: decay.default_rtt.as_nanos() as f64, at: Instant::now() },
                Health::default(),
            )),
        })
    }

    /// The cost of sending one more request here now.
    pub fn cost(&self, now: Instant, decay: Decay) -> f64 {
        let rtt = {
            let e = &self.state.lock().0;
            e.rtt_ns * weight(now.saturating_duration_since(e.at), decay)
        };
        rtt * f64::from(self.outstanding.load(Ordering::Relaxed) + 1)
    }

    /// Counts a request as outstanding until the returned guard is finished or dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight { load: self.clone(), started: Instant::now() }
    }

    /// Takes one answer's latency into the estimate and its outcome toward ejection; true when
    /// this failure ejected the endpoint.
    fn observe(&self, rtt: Duration, failed: bool, decay: Decay) -> bool {
        let now = Instant::now();
        let rtt_ns = rtt.as_nanos() as f64;
        let (e, h) = &mut *self.state.lock();
        if rtt_ns > e.rtt_ns {
            e.rtt_ns = rtt_ns;
        } else {
            let w = weight(now.saturating_duration_since(e.at), decay);
            e.rtt_ns = e.rtt_ns * w + rtt_ns * (1.0 - w);
        }
        e.at = now;
        h.accrue(failed, now)
    }

    /// Whether requests may be sent here (not ejected) at `now`.
    pub fn available(&self, now: Instant) -> bool {
        self.state.lock().1.ejected_until.is_none_or(|until| now >= until)
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
    /// [`FAILURE_PENALTY`] if it failed. True when this failure ejected the endpoint.
    pub fn finish(self, failed: bool, decay: Decay) -> bool {
        let rtt = self.started.elapsed();
        self.load.observe(if failed { rtt.max(FAILURE_PENALTY) } else { rtt }, failed, decay)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An answer the balancer counts as the endpoint's failure (it could not be reached, or said it
/// could not serve), and a retry on another endpoint may mend.
pub fn failed(status: http::StatusCode) -> bool {
    use http::StatusCode;
    matches!(status, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT)
}

/// Of `n` endpoints, the index to send the next request to: the cheaper of two distinct ones
/// picked at random among those `usable` (all of them when none is); `None` when there are none.
pub fn pick(n: usize, usable: impl Fn(usize) -> bool, cost: impl Fn(usize) -> f64) -> Option<usize> {
    // Most of the time every endpoint is usable: two draws, no allocation.
    if n >= 2 {
        let a = rand::random_range(0..n);
        let b = (a + rand::random_range(1..n)) % n;
        if usable(a) && usable(b) {
            return Some(if cost(b) < cost(a) { b } else { a });
        }
    }
    let mut candidates: Vec<usize> = (0..n).filter(|&i| usable(i)).collect();
    if candidates.is_empty() {
        candidates = (0..n).collect();
    }
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        m => {
            let a = rand::random_range(0..m);
            let b = (a + rand::random_range(1..m)) % m;
            let (a, b) = (candidates[a], candidates[b]);
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

/// How many retries a route may send: at least `min_per_second` (over the window), and beyond
/// that `ratio` of the requests it carried in the last `window` (Linkerd's retry budget: 20 %
/// and 10 a second by default). Retries cannot multiply the load of a struggling service.
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    window: Duration,
    counts: Mutex<BudgetWindow>,
}

struct BudgetWindow {
    started: Instant,
    requests: u64,
    retries: u64,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_second: u32, window: Duration) -> Self {
        let counts = BudgetWindow { started: Instant::now(), requests: 0, retries: 0 };
        RetryBudget { ratio, min_per_second, window, counts: Mutex::new(counts) }
    }

    fn roll(&self, c: &mut BudgetWindow) {
        if c.started.elapsed() >= self.window {
            *c = BudgetWindow { started: Instant::now(), requests: 0, retries: 0 };
        }
    }

    /// Counts one request (not a retry).
    pub fn deposit(&self) {
        let mut c = self.counts.lock();
        self.roll(&mut c);
        c.requests += 1;
    }

    /// Takes one retry from the budget, if it has one left.
    pub fn withdraw(&self) -> bool {
        let mut c = self.counts.lock();
        self.roll(&mut c);
        let floor = f64::from(self.min_per_second) * self.window.as_secs_f64();
        if (c.retries as f64) < floor + self.ratio * c.requests as f64 {
            c.retries += 1;
            true
        } else {
            false
        }
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new(0.2, 10, Duration::from_secs(10))
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
        load.observe(Duration::from_millis(100), false, decay());
        let now = Instant::now();
        assert!(load.cost(now, decay()) > 90e6, "the peak is taken whole");
        load.observe(Duration::from_millis(1), false, decay());
        let after = load.cost(Instant::now(), decay());
        assert!(after > 50e6, "one fast answer right after does not erase the peak: {after}");
    }

    #[test]
    fn the_estimate_decays_while_nothing_is_observed() {
        let load = Load::new(decay());
        load.observe(Duration::from_millis(100), false, decay());
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
        assert!(!b.finish(true, decay()), "one failure ejects nothing");
        assert_eq!(load.outstanding(), 0, "a dropped request and a finished one both end");
        assert!(load.cost(Instant::now(), decay()) > 0.9e9, "a failure counts as the penalty");
    }

    #[test]
    fn two_choices_never_pick_the_costliest_of_three() {
        let costs = [1.0, 1000.0, 2.0];
        let mut hits = [0; 3];
        for _ in 0..3000 {
            hits[pick(3, |_| true, |i| costs[i]).unwrap()] += 1;
        }
        assert_eq!(hits[1], 0, "{hits:?}");
        assert!(hits[0] > hits[2] && hits[2] > 0, "the cheapest wins most, the middle one still gets some: {hits:?}");
        assert_eq!(pick(0, |_| true, |_| 0.0), None);
        assert_eq!(pick(1, |_| true, |_| 0.0), Some(0));
    }

    #[test]
    fn an_ejected_endpoint_gets_nothing_unless_all_are() {
        let mut hits = [0; 3];
        for _ in 0..300 {
            hits[pick(3, |i| i != 0, |_| 1.0).unwrap()] += 1;
        }
        assert_eq!(hits[0], 0, "{hits:?}");
        assert!(hits[1] > 0 && hits[2] > 0, "{hits:?}");
        assert_eq!(pick(2, |i| i == 1, |_| 1.0), Some(1), "the one usable endpoint");
        assert!(pick(2, |_| false, |_| 1.0).is_some(), "all ejected: still try one");
    }

    #[test]
    fn failures_in_a_row_eject_and_a_success_ends_the_series() {
        let load = Load::new(decay());
        for _ in 0..EJECT_AFTER - 1 {
            assert!(!load.start().finish(true, decay()));
        }
        assert!(!load.start().finish(false, decay()), "a success resets the count");
        for _ in 0..EJECT_AFTER - 1 {
            assert!(!load.start().finish(true, decay()));
        }
        assert!(load.available(Instant::now()));
        assert!(load.start().finish(true, decay()), "the fifth failure in a row ejects");
        assert!(!load.available(Instant::now()));
        assert!(load.available(Instant::now() + EJECTION), "for the ejection period");
    }

    #[test]
    fn the_retry_budget_is_a_floor_plus_a_ratio_of_requests() {
        let budget = RetryBudget::new(0.2, 1, Duration::from_secs(2));
        let taken = (0..10).filter(|_| budget.withdraw()).count();
        assert_eq!(taken, 2, "the floor: 1 a second over a 2 s window");
        for _ in 0..50 {
            budget.deposit();
        }
        let more = (0..20).filter(|_| budget.withdraw()).count();
        assert_eq!(more, 10, "20 % of 50 requests");
    }
}
