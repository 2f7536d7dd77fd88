//! The certificate manager's metrics. Defined here, beside what they count; the telemetry
//! layer registers and renders them with the rest of the process's metrics.

use std::sync::atomic::AtomicI64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// Labels of `palisade_cert_renewals_total`: `result` = `success` or `failure`.
pub type RenewalLabels = Vec<(String, String)>;

/// Certificate lifecycle metrics of a sidecar.
#[derive(Default)]
pub struct CertMetrics {
    /// Expiry of the certificate in service (Unix seconds).
    pub expiry: Gauge<i64, AtomicI64>,
    /// Certificate requests by result.
    pub renewals: Family<RenewalLabels, Counter>,
    /// When the last certificate was installed (Unix seconds).
    pub last_renewal: Gauge<i64, AtomicI64>,
}

impl CertMetrics {
    /// Records a certificate installed.
    pub fn record_issued(&self, not_after: i64) {
        self.expiry.set(not_after);
        self.last_renewal.set(crate::clock::now_unix());
        self.renewals.get_or_create(&vec![("result".into(), "success".into())]).inc();
    }

    /// Records a request that brought no certificate.
    pub fn record_failure(&self) {
        self.renewals.get_or_create(&vec![("result".into(), "failure".into())]).inc();
    }
}
