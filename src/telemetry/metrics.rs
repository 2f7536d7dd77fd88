//! Prometheus metrics. Names follow `palisade_<area>_<what>_<unit>`.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::peers::PeerCounters;
use crate::identity::CertMetrics;

/// Labels of `palisade_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub status_class: &'static str,
    pub peer: Arc<str>,
}

/// Labels of metrics kept per direction only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

/// Labels of the balancer's counters (`palisade_balancer_*_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BalancerLabels {
    /// The mesh service, `namespace/name`.
    pub service: Arc<str>,
    /// `retried`, `retry_budget_exhausted`, `ejected`, `timed_out`, `no_route_matched`.
    pub event: &'static str,
}

/// Labels of the per-backend request metrics of service routes (`palisade_backend_*`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// The service the caller addressed, `namespace/name`.
    pub service: Arc<str>,
    /// The `HTTPRoute` rule that took the request (`namespace/name#index`), or empty.
    pub route: Arc<str>,
    /// The service the request was sent to (a backend of the rule, or the service itself).
    pub backend: Arc<str>,
}

/// `BackendLabels` and the class of the answer (`2xx`, `3xx`, `4xx`, `5xx`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendStatusLabels {
    #[prometheus(flatten)]
    pub backend: BackendLabels,
    pub class: &'static str,
}

/// Labels of `palisade_tls_handshake_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

/// Labels of `palisade_guard_refusals_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GuardLabels {
    /// `path`, `jwt` or `rate_limit`.
    pub guard: &'static str,
    /// The rule or reason that refused (`encoded-slash`, `expired`, ...), or the policy.
    pub reason: String,
}

/// Labels of `palisade_rate_limited_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitedLabels {
    /// The `RateLimitPolicy`'s `namespace/name`, shared with the compiled limit.
    pub policy: Arc<str>,
    /// What the limit counts by: `workload`, `source`, `remote_address`, `header`, `claim` or
    /// `request_principal`.
    pub key: &'static str,
    /// `true`: the limit only counts, the request went on.
    pub dry_run: &'static str,
}

/// Requests over a rate limit, enforced or dry-run; counted by the rate-limit guard.
pub type RateLimitedCounts = Family<RateLimitedLabels, Counter>;

/// Labels of `palisade_jwt_verifications_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwtLabels {
    /// `verified` (a signature was checked) or `cached` (a remembered verification answered).
    pub result: &'static str,
}

/// Labels of `palisade_authz_decisions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub result: &'static str,
    pub policy: PolicyLabel,
    pub engine: &'static str,
}

/// Labels of `palisade_authz_evaluation_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineLabels {
    pub engine: &'static str,
}

/// Labels of `palisade_tcp_bytes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpBytesLabels {
    pub direction: &'static str,
    pub bytes: &'static str,
}

/// What decided, as a label: a policy's shared `namespace/name`, or a fixed word for the
/// decisions no policy made (`mesh-default`, `no-allow-matched`, ...). Neither allocates.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum PolicyLabel {
    Policy(Arc<str>),
    Fixed(&'static str),
}

impl PolicyLabel {
    /// The label's text.
    pub fn as_str(&self) -> &str {
        match self {
            PolicyLabel::Policy(p) => p,
            PolicyLabel::Fixed(s) => s,
        }
    }
}

/// As its text (the access log's `denied_by`).
impl serde::Serialize for PolicyLabel {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl EncodeLabelValue for PolicyLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Data-path metrics of a sidecar.
pub struct ProxyMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<DirectionLabels, Histogram>,
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    pub connections_open: Family<DirectionLabels, Gauge>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub decision_duration: Family<EngineLabels, Histogram>,
    pub plaintext_refused: Counter,
    /// Failed accepts on the data-path listeners (out of descriptors, mostly); they back off.
    pub accept_errors: Counter,
    /// Requests refused by an API guard before policy.
    pub guard_refusals: Family<GuardLabels, Counter>,
    /// Requests over a rate limit, by policy, key kind and whether the limit is a dry run.
    pub rate_limited: RateLimitedCounts,
    /// Valid end-user tokens by how they were found valid (refusals are guard refusals).
    pub jwt_verifications: Family<JwtLabels, Counter>,
    /// `jwt_verifications`' two series, resolved once.
    jwt_verified: Counter,
    jwt_cached: Counter,
    pub tcp_bytes: Family<TcpBytesLabels, Counter>,
    /// Retries, retries the budget refused, and endpoints ejected, per service route.
    pub balancer: Family<BalancerLabels, Counter>,
    /// Service routes: requests per backend by class of answer, and their latency.
    pub backend_requests: Family<BackendStatusLabels, Counter>,
    pub backend_duration: Family<BackendLabels, Histogram>,
    /// Per-peer totals for telemetry reports to the control plane.
    pub peers: Arc<super::peers::PeerStats>,
}

impl ProxyMetrics {
    /// The request metrics of one (direction, peer), to resolve once per route or connection.
    pub fn requests_for(&self, direction: &'static str, peer: &str) -> RequestMetrics {
        RequestMetrics {
            requests: self.requests.clone(),
            direction,
            peer: Arc::from(peer),
            by_class: Default::default(),
            duration: self.duration.get_or_create_owned(&DirectionLabels { direction }),
            peer_counters: self.peers.counters(peer, direction),
        }
    }

    /// Counts a valid end-user token: `cached` when a remembered verification answered.
    pub fn jwt_verified(&self, cached: bool) {
        if cached {
            self.jwt_cached.inc()
        } else {
            self.jwt_verified.inc()
        };
    }

    /// Counts a failed mTLS handshake.
    pub fn handshake_failure(&self, direction: &'static str, reason: &'static str) {
        self.handshake_failures.get_or_create(&HandshakeLabels { direction, reason }).inc();
    }

    /// Counts an authorization decision and the time it took.
    pub fn record_decision(
        &self,
        last: &LastDecision,
        allowed: bool,
        policy: PolicyLabel,
        engine: &'static str,
        took: Duration,
    ) {
        let result = if allowed { "allow" } else { "deny" };
        let labels = DecisionLabels { result, policy, engine };
        let mut last = last.0.lock();
        let (_, count, duration) = match &mut *last {
            Some(same) if same.0 == labels => same,
            other => other.insert((
                labels.clone(),
                self.decisions.get_or_create_owned(&labels),
                self.decision_duration.get_or_create_owned(&EngineLabels { engine }),
            )),
        };
        count.inc();
        duration.observe(took.as_secs_f64());
    }

    /// Counts an open connection until the returned guard is dropped.
    pub fn open_connection(self: &Arc<Self>, direction: &'static str) -> OpenConnection {
        let gauge = self.connections_open.get_or_create_owned(&DirectionLabels { direction });
        gauge.inc();
        OpenConnection(gauge)
    }

    /// Counts bytes of an opaque TCP stream.
    pub fn record_tcp_bytes(&self, direction: &'static str, sent: u64, received: u64) {
        for (bytes, n) in [("sent", sent), ("received", received)] {
            self.tcp_bytes.get_or_create(&TcpBytesLabels { direction, bytes }).inc_by(n);
        }
    }
}

/// The decision series a connection recorded last. A connection's requests are mostly decided
/// alike, so a decision usually bumps these without building, hashing or looking up labels.
#[derive(Default)]
pub struct LastDecision(parking_lot::Mutex<Option<(DecisionLabels, Counter, Histogram)>>);

/// Request metrics of one (direction, peer), resolved once per route or connection, so a
/// request bumps atomics without building, hashing or looking up labels. A status class gets
/// its series on first use, as before.
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    direction: &'static str,
    peer: Arc<str>,
    by_class: ByClass,
    duration: Histogram,
    peer_counters: Arc<PeerCounters>,
}

/// One series' counters by status class (`1xx` to `5xx`), each made on first use, so a request
/// bumps an atomic and a class never seen has no series.
#[derive(Default)]
pub struct ByClass([OnceLock<Counter>; 5]);

impl ByClass {
    /// Counts an answer with `status`; `make` gives the counter of its class the first time.
    pub fn inc(&self, status: http::StatusCode, make: impl FnOnce(&'static str) -> Counter) {
        let class = status_class(status);
        let slot = usize::from(class.as_bytes()[0] - b'1');
        self.0[slot].get_or_init(|| make(class)).inc();
    }
}

impl RequestMetrics {
    /// Counts a finished request by status class, and its latency.
    pub fn record(&self, status: http::StatusCode, started: Instant) {
        self.by_class.inc(status, |status_class| {
            let labels = RequestLabels { direction: self.direction, status_class, peer: self.peer.clone() };
            self.requests.get_or_create_owned(&labels)
        });
        self.duration.observe(started.elapsed().as_secs_f64());
    }

    /// The peer's label (its SPIFFE ID, or `unauthenticated`), shared.
    pub fn peer_label(&self) -> &Arc<str> {
        &self.peer
    }

    /// The peer's totals for telemetry reports.
    pub fn peer(&self) -> &PeerCounters {
        &self.peer_counters
    }
}

/// `2xx`, `4xx`, ...: the `status_class` label of `palisade_requests_total`.
pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Decrements the open-connections gauge when dropped.
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        let jwt_verifications = Family::<JwtLabels, Counter>::default();
        ProxyMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            }),
            handshake_failures: Family::default(),
            connections_open: Family::default(),
            decisions: Family::default(),
            decision_duration: Family::new_with_constructor(|| {
                Histogram::new([1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 1e-3])
            }),
            plaintext_refused: Counter::default(),
            accept_errors: Counter::default(),
            guard_refusals: Family::default(),
            rate_limited: Family::default(),
            jwt_verified: jwt_verifications.get_or_create_owned(&JwtLabels { result: "verified" }),
            jwt_cached: jwt_verifications.get_or_create_owned(&JwtLabels { result: "cached" }),
            jwt_verifications,
            tcp_bytes: Family::default(),
            balancer: Family::default(),
            backend_requests: Family::default(),
            backend_duration: Family::new_with_constructor(|| {
                Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            }),
            peers: Default::default(),
        }
    }
}

/// All metrics of one process and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    pub certs: Arc<CertMetrics>,
    pub proxy: Arc<ProxyMetrics>,
}

impl Metrics {
    /// Registers every metric, exporting `access_log_dropped` (the counter given to
    /// [`AccessLog::start`]) as `palisade_access_log_dropped_lines_total`.
    ///
    /// [`AccessLog::start`]: super::access_log::AccessLog::start
    pub fn new(access_log_dropped: Counter) -> Self {
        let certs = Arc::new(CertMetrics::default());
        let proxy = Arc::new(ProxyMetrics::default());
        let mut registry = Registry::with_prefix("palisade");
        registry.register(
            "cert_expiry_timestamp_seconds",
            "Expiry of the workload certificate in service",
            certs.expiry.clone(),
        );
        registry.register("cert_renewals", "Certificate requests by result", certs.renewals.clone());
        registry.register(
            "cert_last_renewal_timestamp_seconds",
            "When the last certificate was installed",
            certs.last_renewal.clone(),
        );
        registry.register("requests", "Requests by direction, status class and peer identity", proxy.requests.clone());
        registry.register(
            "request_duration_seconds",
            "Request latency through the sidecar by direction",
            proxy.duration.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Failed mTLS handshakes by direction and reason",
            proxy.handshake_failures.clone(),
        );
        registry.register("connections_open", "Open connections by direction", proxy.connections_open.clone());
        registry.register(
            "authz_decisions",
            "Authorization decisions by result, policy and engine",
            proxy.decisions.clone(),
        );
        registry.register(
            "authz_evaluation_duration_seconds",
            "Time to decide one request, by engine of the deciding policy",
            proxy.decision_duration.clone(),
        );
        registry.register(
            "tcp_bytes",
            "Bytes carried by opaque TCP streams, by direction of the connection and of the bytes",
            proxy.tcp_bytes.clone(),
        );
        registry.register(
            "balancer_events",
            "Per service route: requests retried on another endpoint, retries the budget refused, endpoints ejected, route timeouts, requests no route rule took",
            proxy.balancer.clone(),
        );
        registry.register(
            "backend_requests",
            "Per service route: requests by the service addressed, the HTTPRoute rule that took them, the backend service they went to, and the class of the answer (after retries; refusals before a backend was chosen are not counted)",
            proxy.backend_requests.clone(),
        );
        registry.register(
            "backend_request_duration_seconds",
            "Per service route: time to the answer's head, by service, HTTPRoute rule and backend service (retries and their backoff included)",
            proxy.backend_duration.clone(),
        );
        registry.register(
            "guard_refusals",
            "Requests refused before policy by an API guard (path normalization, token, rate limit), by rule",
            proxy.guard_refusals.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests over a rate limit by policy and key kind; dry_run=\"true\": counted, not refused",
            proxy.rate_limited.clone(),
        );
        registry.register(
            "jwt_verifications",
            "Valid end-user tokens, by whether a signature was checked (verified) or a remembered verification answered (cached)",
            proxy.jwt_verifications.clone(),
        );
        registry.register(
            "plaintext_refused",
            "Plaintext connections refused because the port is STRICT",
            proxy.plaintext_refused.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts on the data-path listeners (out of file descriptors, mostly); each backs off",
            proxy.accept_errors.clone(),
        );
        registry.register(
            "access_log_dropped_lines",
            "Access- and decision-log lines dropped because the log writer fell behind or failed",
            access_log_dropped,
        );
        Metrics { registry, certs, proxy }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::access_log::{AccessLog, LogTarget};

    /// Lines the access log drops reach the exposition as an OpenMetrics counter.
    #[test]
    fn dropped_access_log_lines_are_exported() {
        let dropped = Counter::default();
        let metrics = Metrics::new(dropped.clone());
        let text = metrics.render();
        assert!(text.contains("# TYPE palisade_access_log_dropped_lines counter"), "{text}");
        assert!(text.lines().any(|l| l == "palisade_access_log_dropped_lines_total 0"), "{text}");
        // A log whose file cannot be written: its writer stops, and every line after is dropped.
        let log = AccessLog::start(LogTarget::File("/dev/full".into()), dropped).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.dropped() == 0 {
            assert!(Instant::now() < deadline, "the log never dropped a line");
            if let Some(r) = log.access("inbound") {
                log.write(r);
            }
            std::thread::yield_now();
        }
        let n = log.dropped();
        let text = metrics.render();
        let line = format!("palisade_access_log_dropped_lines_total {n}");
        assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
    }

    /// The per-connection shortcut counts each decision under its own labels, however a
    /// connection's decisions alternate, and the duration histogram follows the engine.
    #[test]
    fn decisions_are_counted_under_their_own_labels_through_the_connection_shortcut() {
        let metrics = Metrics::new(Counter::default());
        let (a, b) = (LastDecision::default(), LastDecision::default());
        let shop: Arc<str> = Arc::from("shop/allow-web");
        let took = Duration::from_micros(1);
        let p = &metrics.proxy;
        p.record_decision(&a, true, PolicyLabel::Policy(shop.clone()), "rules", took);
        p.record_decision(&a, true, PolicyLabel::Policy(shop.clone()), "rules", took);
        p.record_decision(&a, false, PolicyLabel::Fixed("no-allow-matched"), "none", took);
        p.record_decision(&a, true, PolicyLabel::Policy(Arc::from("shop/allow-web")), "rules", took);
        p.record_decision(&b, true, PolicyLabel::Policy(shop), "rego", took);
        let text = metrics.render();
        for line in [
            r#"palisade_authz_decisions_total{result="allow",policy="shop/allow-web",engine="rules"} 3"#,
            r#"palisade_authz_decisions_total{result="deny",policy="no-allow-matched",engine="none"} 1"#,
            r#"palisade_authz_decisions_total{result="allow",policy="shop/allow-web",engine="rego"} 1"#,
            r#"palisade_authz_evaluation_duration_seconds_count{engine="rules"} 3"#,
            r#"palisade_authz_evaluation_duration_seconds_count{engine="none"} 1"#,
            r#"palisade_authz_evaluation_duration_seconds_count{engine="rego"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}
