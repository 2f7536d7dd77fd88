//! Prometheus metrics. Names follow `palisade_<area>_<what>_<unit>`.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label set as name/value pairs.
pub type Labels = Vec<(String, String)>;

/// Certificate lifecycle metrics of a sidecar.
#[derive(Default)]
pub struct CertMetrics {
    pub expiry: Gauge<i64, AtomicI64>,
    pub renewals: Family<Labels, Counter>,
    pub last_renewal: Gauge<i64, AtomicI64>,
}

impl CertMetrics {
    /// Records a certificate installed.
    pub fn record_issued(&self, not_after: i64) {
        self.expiry.set(not_after);
        self.last_renewal.set(crate::identity::ca::now_unix());
        self.renewals.get_or_create(&vec![("result".into(), "success".into())]).inc();
    }
}

/// Data-path metrics of a sidecar.
pub struct ProxyMetrics {
    pub requests: Family<Labels, Counter>,
    pub duration: Family<Labels, Histogram>,
    pub handshake_failures: Family<Labels, Counter>,
    pub connections_open: Family<Labels, Gauge>,
    pub decisions: Family<Labels, Counter>,
    pub decision_duration: Family<Labels, Histogram>,
    pub plaintext_refused: Counter,
    pub tcp_bytes: Family<Labels, Counter>,
    /// Per-peer totals for telemetry reports to the control plane.
    pub peers: std::sync::Arc<super::peers::PeerStats>,
}

impl ProxyMetrics {
    /// Counts a finished request: by direction, status class and peer, and its latency.
    pub fn record_request(&self, direction: &str, peer: &str, status: http::StatusCode, started: std::time::Instant) {
        self.requests
            .get_or_create(&vec![
                ("direction".into(), direction.into()),
                ("status_class".into(), crate::proxy::http::status_class(status).into()),
                ("peer".into(), peer.into()),
            ])
            .inc();
        self.duration
            .get_or_create(&vec![("direction".into(), direction.into())])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts an open connection until the returned guard is dropped.
    pub fn open_connection(self: &std::sync::Arc<Self>, direction: &'static str) -> OpenConnection {
        let gauge = self.connections_open.get_or_create(&vec![("direction".into(), direction.into())]).clone();
        gauge.inc();
        OpenConnection(gauge)
    }

    /// Counts bytes of an opaque TCP stream.
    pub fn record_tcp_bytes(&self, direction: &'static str, sent: u64, received: u64) {
        for (way, n) in [("sent", sent), ("received", received)] {
            self.tcp_bytes
                .get_or_create(&vec![("direction".into(), direction.into()), ("bytes".into(), way.into())])
                .inc_by(n);
        }
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
            tcp_bytes: Family::default(),
            peers: Default::default(),
        }
    }
}

/// All metrics of one process and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    pub certs: std::sync::Arc<CertMetrics>,
    pub proxy: std::sync::Arc<ProxyMetrics>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let certs = std::sync::Arc::new(CertMetrics::default());
        let proxy = std::sync::Arc::new(ProxyMetrics::default());
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
            "plaintext_refused",
            "Plaintext connections refused because the port is STRICT",
            proxy.plaintext_refused.clone(),
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
