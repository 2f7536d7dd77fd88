//! Per-peer counters for telemetry reports, lock-free on the data path.
//!
//! The map from peer to counters is an immutable `HashMap` behind `ArcSwap`: a request loads it
//! and bumps atomics; only a peer seen for the first time copies the map (rare).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

/// Counters for one (peer, direction).
#[derive(Default, Debug)]
pub struct PeerCounters {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub denials: AtomicU64,
    pub handshake_failures: AtomicU64,
}

/// Key: peer SPIFFE ID (or `unauthenticated`) and `inbound` / `outbound`.
pub type PeerKey = (Arc<str>, &'static str);

/// Totals per peer since start.
#[derive(Default)]
pub struct PeerStats {
    map: ArcSwap<HashMap<PeerKey, Arc<PeerCounters>>>,
}

impl PeerCounters {
    /// Counts one finished request.
    pub fn record(&self, status: u16, denied: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if denied {
            self.denials.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl PeerStats {
    /// The counters of one (peer, direction), created on first use. The data path looks them up
    /// once per route or connection and keeps them.
    pub fn counters(&self, peer: &str, direction: &'static str) -> Arc<PeerCounters> {
        if let Some(c) = self.map.load().get(&(Arc::from(peer), direction)) {
            return c.clone();
        }
        let key: PeerKey = (Arc::from(peer), direction);
        let mut found = None;
        self.map.rcu(|cur| {
            let mut next = HashMap::clone(cur);
            let c = next.entry(key.clone()).or_default().clone();
            found = Some(c);
            next
        });
        found.expect("rcu ran at least once")
    }

    /// Counts one finished request.
    pub fn record(&self, peer: &str, direction: &'static str, status: u16, denied: bool) {
        self.counters(peer, direction).record(status, denied);
    }

    /// Counts a failed handshake with a known peer (outbound: the expected identity).
    pub fn handshake_failure(&self, peer: &str, direction: &'static str) {
        self.counters(peer, direction).handshake_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Current totals.
    pub fn totals(&self) -> Vec<(PeerKey, [u64; 4])> {
        self.map
            .load()
            .iter()
            .map(|(k, c)| {
                let v = [&c.requests, &c.errors, &c.denials, &c.handshake_failures].map(|a| a.load(Ordering::Relaxed));
                (k.clone(), v)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_peer_and_direction() {
        let s = PeerStats::default();
        s.record("spiffe://td/ns/a/sa/x", "inbound", 200, false);
        s.record("spiffe://td/ns/a/sa/x", "inbound", 403, true);
        s.record("spiffe://td/ns/a/sa/x", "outbound", 502, false);
        let mut t = s.totals();
        t.sort_by_key(|(k, _)| k.1);
        assert_eq!(t[0].1, [2, 0, 1, 0]);
        assert_eq!(t[1].1, [1, 1, 0, 0]);
    }
}
