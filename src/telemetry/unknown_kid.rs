//! Issuers whose tokens named a `kid` this sidecar has no key for: the hint that makes the
//! control plane fetch that issuer's `jwksUri` at once instead of at its next refresh.
//!
//! The JWT guard records an issuer when it refuses `unknown-kid`; the telemetry reporter
//! drains the set into its next report and is woken to send it at once. Bounded both ways so a
//! flood of bad tokens cannot become a flood of reports: at most [`MAX_PENDING`] issuers wait,
//! and an issuer sent once is not sent again for [`RESEND_AFTER`] (the control plane ignores a
//! second hint inside that window anyway). Issuers only come from rules this sidecar was sent
//! (a token's `iss` that matches no rule is `wrong-issuer`, never `unknown-kid`), so the set of
//! names is the mesh's, not an attacker's.
//!
//! Process-wide ([`UnknownKidHints::global`]) like the sidecar it serves: the guard is
//! recompiled with every snapshot, the reporter lives as long as the process.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Issuers waiting for the next report, at most.
pub const MAX_PENDING: usize = 4;
/// An issuer hinted is not hinted again before this (the control plane's window).
pub const RESEND_AFTER: Duration = Duration::from_secs(30);
/// Issuers remembered as recently sent, at most.
const MAX_SENT: usize = 64;

#[derive(Default)]
struct State {
    pending: Vec<String>,
    sent: HashMap<String, Instant>,
}

/// The bounded set of issuers to hint, shared by the JWT guard and the telemetry reporter.
#[derive(Default)]
pub struct UnknownKidHints {
    state: Mutex<State>,
    ready: Notify,
}

static GLOBAL: LazyLock<Arc<UnknownKidHints>> = LazyLock::new(Default::default);

impl UnknownKidHints {
    /// This process's set.
    pub fn global() -> &'static Arc<UnknownKidHints> {
        &GLOBAL
    }

    /// Notes that a token of `issuer` named an unknown `kid`. Returns whether it was taken
    /// (false: already waiting, sent within [`RESEND_AFTER`], or the set is full).
    pub fn record(&self, issuer: &str, now: Instant) -> bool {
        let mut state = self.state.lock();
        let recently = state.sent.get(issuer).is_some_and(|at| now.saturating_duration_since(*at) < RESEND_AFTER);
        if recently || state.pending.len() >= MAX_PENDING || state.pending.iter().any(|p| p == issuer) {
            return false;
        }
        state.pending.push(issuer.to_string());
        drop(state);
        self.ready.notify_one();
        true
    }

    /// Takes the waiting issuers for a report; they count as sent from `now`.
    pub fn drain(&self, now: Instant) -> Vec<String> {
        let mut state = self.state.lock();
        let pending = std::mem::take(&mut state.pending);
        state.sent.retain(|_, at| now.saturating_duration_since(*at) < RESEND_AFTER);
        for issuer in &pending {
            if state.sent.len() < MAX_SENT {
                state.sent.insert(issuer.clone(), now);
            }
        }
        pending
    }

    /// Resolves when an issuer has been recorded since the last wait (at once if one was
    /// recorded while nobody waited).
    pub async fn recorded(&self) {
        self.ready.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issuer_is_hinted_once_per_window_however_many_tokens_name_unknown_kids() {
        let hints = UnknownKidHints::default();
        let t0 = Instant::now();
        assert!(hints.record("https://issuer.example", t0));
        for _ in 0..1000 {
            assert!(!hints.record("https://issuer.example", t0));
        }
        assert_eq!(hints.drain(t0), vec!["https://issuer.example".to_string()]);
        // Sent: more bad tokens inside the window add nothing to later reports.
        assert!(!hints.record("https://issuer.example", t0 + Duration::from_secs(29)));
        assert!(hints.drain(t0 + Duration::from_secs(29)).is_empty());
        // After the window the next unknown kid is hinted again.
        assert!(hints.record("https://issuer.example", t0 + RESEND_AFTER));
        assert_eq!(hints.drain(t0 + RESEND_AFTER).len(), 1);
    }

    #[test]
    fn at_most_a_few_issuers_wait_for_a_report() {
        let hints = UnknownKidHints::default();
        let now = Instant::now();
        for i in 0..100 {
            hints.record(&format!("https://issuer-{i}.example"), now);
        }
        assert_eq!(hints.drain(now).len(), MAX_PENDING);
        assert!(hints.drain(now).is_empty());
    }

    #[tokio::test]
    async fn a_record_wakes_the_reporter() {
        let hints = Arc::new(UnknownKidHints::default());
        let waiter = tokio::spawn({
            let hints = hints.clone();
            async move { hints.recorded().await }
        });
        hints.record("https://issuer.example", Instant::now());
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").expect("joined");
    }
}
