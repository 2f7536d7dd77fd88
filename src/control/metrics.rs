//! The control plane's Prometheus metrics, served on its admin port's `/metrics`.
//!
//! Names follow `palisade_control_<what>_<unit>`, as the sidecar's follow `palisade_<area>_...`.
//! One [`ControlMetrics`] is built by the control plane and handed to each service that counts
//! (issuance, discovery, JWKS); nothing is global, so tests can build as many as they like.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::{Code, Request, Response, Status};

use crate::proto::identity::identity_server::Identity;
use crate::proto::identity::{CertifyRequest, CertifyResponse, certify_request::Credential};

/// Labels of `palisade_control_certificates_issued_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabels {
    /// `join-token`, `kubernetes` or `renewal`, as the ledger spells it.
    pub credential: &'static str,
}

/// Labels of `palisade_control_certificates_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Labels of `palisade_control_nacks_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Labels of the store metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

/// Labels of `palisade_control_ca_root_not_after_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenerationLabels {
    pub generation: String,
}

/// Labels of `palisade_control_jwks_fetches_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~3.3 s: a store write is sub-millisecond, a TokenReview can take seconds.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Every control-plane metric, and the registry that renders them.
pub struct ControlMetrics {
    registry: Registry,
    /// `palisade_control_certificates_issued_total{credential}`.
    pub issued: Family<CredentialLabels, Counter>,
    /// `palisade_control_certificates_refused_total{reason}`.
    pub refused: Family<ReasonLabels, Counter>,
    /// `palisade_control_issuance_duration_seconds`: every Certify answer, issued or refused.
    pub issuance_duration: Histogram,
    /// `palisade_control_sidecars_connected`: open discovery streams.
    pub sidecars_connected: Gauge,
    /// `palisade_control_snapshot_pushes_total`: every response sent, full or delta.
    pub snapshot_pushes: Counter,
    /// `palisade_control_delta_pushes_total`: the responses that were deltas.
    pub delta_pushes: Counter,
    /// `palisade_control_push_duration_seconds`: building one sidecar's snapshot.
    pub push_duration: Histogram,
    /// `palisade_control_nacks_total{kind}`.
    pub nacks: Family<KindLabels, Counter>,
    /// `palisade_control_store_duration_seconds{op}`.
    pub store_duration: Family<OpLabels, Histogram>,
    /// `palisade_control_store_errors_total{op}`.
    pub store_errors: Family<OpLabels, Counter>,
    /// `palisade_control_jwks_fetches_total{result}`.
    pub jwks_fetches: Family<ResultLabels, Counter>,
    /// `palisade_control_ca_root_not_after_seconds{generation}`, refreshed at each scrape.
    pub ca_root_not_after: Family<GenerationLabels, Gauge>,
    /// Ledger transactions tried (see [`super::store::Store::ledger_commits`]).
    ledger_commits: Counter,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("palisade_control");
        let m = ControlMetrics {
            registry: Registry::default(),
            issued: Family::default(),
            refused: Family::default(),
            issuance_duration: latency_histogram(),
            sidecars_connected: Gauge::default(),
            snapshot_pushes: Counter::default(),
            delta_pushes: Counter::default(),
            push_duration: latency_histogram(),
            nacks: Family::default(),
            store_duration: Family::new_with_constructor(latency_histogram),
            store_errors: Family::default(),
            jwks_fetches: Family::default(),
            ca_root_not_after: Family::default(),
            ledger_commits: Counter::default(),
        };
        registry.register("certificates_issued", "Workload certificates issued, by credential", m.issued.clone());
        registry.register(
            "certificates_refused",
            "Certificate requests refused, by reason (token_unknown, token_expired, token_redeemed, revoked, csr_invalid, no_credential, tokenreview_denied, unavailable, internal)",
            m.refused.clone(),
        );
        registry.register(
            "issuance_duration_seconds",
            "Time to answer a certificate request, issued or refused",
            m.issuance_duration.clone(),
        );
        registry.register("sidecars_connected", "Sidecars with an open discovery stream", m.sidecars_connected.clone());
        registry.register("snapshot_pushes", "Snapshots sent to sidecars, full or delta", m.snapshot_pushes.clone());
        registry.register(
            "delta_pushes",
            "Snapshots sent to sidecars as a delta from the version they run",
            m.delta_pushes.clone(),
        );
        registry.register(
            "push_duration_seconds",
            "Time to build one sidecar's snapshot for a push",
            m.push_duration.clone(),
        );
        registry.register("nacks", "Snapshots refused by sidecars, by what they could not apply", m.nacks.clone());
        registry.register("store_duration_seconds", "Time of state-store calls by operation", m.store_duration.clone());
        registry.register("store_errors", "Failed state-store calls by operation", m.store_errors.clone());
        registry.register(
            "ledger_commits",
            "Ledger transactions tried, failed ones and their row-by-row retries included: certificates_issued over this is about the rows a group commit carries",
            m.ledger_commits.clone(),
        );
        registry.register("jwks_fetches", "jwksUri fetches by result (ok, error)", m.jwks_fetches.clone());
        registry.register(
            "ca_root_not_after_seconds",
            "Expiry (Unix seconds) of each trusted CA root, by generation",
            m.ca_root_not_after.clone(),
        );
        ControlMetrics { registry, ..m }
    }

    /// The Prometheus text exposition (OpenMetrics).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The roots in force now, from `(generation, not_before, not_after)`; a root no longer
    /// trusted leaves the exposition.
    pub fn set_ca_roots(&self, roots: &[(u32, i64, i64)]) {
        self.ca_root_not_after.clear();
        for (generation, _, not_after) in roots {
            self.ca_root_not_after
                .get_or_create(&GenerationLabels { generation: generation.to_string() })
                .set(*not_after);
        }
    }

    /// Brings the ledger-commit counter up to `total` (read from the store at each scrape).
    pub fn set_ledger_commits(&self, total: u64) {
        let seen = self.ledger_commits.get();
        if total > seen {
            self.ledger_commits.inc_by(total - seen);
        }
    }

    /// Runs one store call, timing it under `op`; `failed` tells which errors are the store's
    /// (a refused join token is an answer, not a store failure).
    pub fn store_call<T, E>(
        &self,
        op: &'static str,
        call: impl FnOnce() -> Result<T, E>,
        failed: impl Fn(&E) -> bool,
    ) -> Result<T, E> {
        let started = Instant::now();
        let result = call();
        let labels = OpLabels { op };
        self.store_duration.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        if result.as_ref().is_err_and(failed) {
            self.store_errors.get_or_create(&labels).inc();
        }
        result
    }

    /// Counts a NACK under the kind of each thing it names (once per kind).
    pub fn nack(&self, message: &str) {
        let mut kinds: Vec<&'static str> = message.split("; ").map(nack_kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        for kind in kinds {
            self.nacks.get_or_create(&KindLabels { kind }).inc();
        }
    }

    /// A connected sidecar, counted until the guard drops (its stream's task ends).
    pub fn sidecar_connected(self: &Arc<Self>) -> ConnectedGuard {
        self.sidecars_connected.inc();
        ConnectedGuard(self.clone())
    }

    /// A JWKS fetch's result.
    pub fn jwks_fetch(&self, ok: bool) {
        self.jwks_fetches.get_or_create(&ResultLabels { result: if ok { "ok" } else { "error" } }).inc();
    }
}

/// Decrements `palisade_control_sidecars_connected` when dropped.
pub struct ConnectedGuard(Arc<ControlMetrics>);

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        self.0.sidecars_connected.dec();
    }
}

/// The resource kind one reason of a sidecar's NACK is about, from its message (the wording of
/// `crate::proxy::view::NackReason`).
pub fn nack_kind(reason: &str) -> &'static str {
    if let Some(kind) = crate::control::source::KINDS.iter().find(|k| reason.starts_with(**k)) {
        return kind;
    }
    match reason {
        r if r.starts_with("policy ") => "AuthorizationPolicy",
        r if r.starts_with("trust bundle") => "TrustBundle",
        r if r.starts_with("endpoint ") => "Endpoint",
        r if r.starts_with("mesh ") => "MeshConfig",
        _ => "other",
    }
}

/// Why `Identity/Certify` refused, as a label, from the status it answered: the messages are
/// those of `TokenRefusal`, the CSR check, the revocation check and the attestor.
pub fn refusal_reason(status: &Status) -> &'static str {
    use crate::control::store::TokenRefusal;
    let message = status.message();
    match status.code() {
        Code::InvalidArgument if message.starts_with("csr refused") => "csr_invalid",
        Code::PermissionDenied if message == TokenRefusal::Unknown.to_string() => "token_unknown",
        Code::PermissionDenied if message == TokenRefusal::Used.to_string() => "token_redeemed",
        Code::PermissionDenied if message == TokenRefusal::Expired.to_string() => "token_expired",
        Code::PermissionDenied if message.ends_with("is revoked") => "revoked",
        Code::PermissionDenied => "tokenreview_denied",
        Code::Unauthenticated => "no_credential",
        Code::Unavailable => "unavailable",
        Code::Unimplemented => "unsupported_credential",
        Code::InvalidArgument => "invalid_request",
        _ => "internal",
    }
}

/// An `Identity` service counted: issued by credential, refused by reason, and the time of both.
pub struct MeteredIdentity<S> {
    pub inner: S,
    pub metrics: Arc<ControlMetrics>,
}

#[tonic::async_trait]
impl<S: Identity> Identity for MeteredIdentity<S> {
    async fn certify(&self, request: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let started = Instant::now();
        let credential = match request.get_ref().credential {
            Some(Credential::JoinToken(_)) => crate::control::store::CredentialKind::JoinToken,
            Some(Credential::KubernetesToken(_)) => crate::control::store::CredentialKind::Kubernetes,
            None => crate::control::store::CredentialKind::Renewal,
        };
        let result = self.inner.certify(request).await;
        self.metrics.issuance_duration.observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => self.metrics.issued.get_or_create(&CredentialLabels { credential: credential.as_str() }).inc(),
            Err(status) => self.metrics.refused.get_or_create(&ReasonLabels { reason: refusal_reason(status) }).inc(),
        };
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_named_from_the_errors_that_make_them() {
        use crate::control::store::TokenRefusal;
        let denied = |e: TokenRefusal| Status::permission_denied(e.to_string());
        assert_eq!(refusal_reason(&denied(TokenRefusal::Unknown)), "token_unknown");
        assert_eq!(refusal_reason(&denied(TokenRefusal::Used)), "token_redeemed");
        assert_eq!(refusal_reason(&denied(TokenRefusal::Expired)), "token_expired");
        let revoked = Status::permission_denied("spiffe://cluster.local/ns/a/sa/b (serial 01) is revoked");
        assert_eq!(refusal_reason(&revoked), "revoked");
        assert_eq!(refusal_reason(&Status::invalid_argument("csr refused: bad")), "csr_invalid");
        assert_eq!(refusal_reason(&Status::unauthenticated("no credential: ...")), "no_credential");
        assert_eq!(refusal_reason(&Status::unavailable("TokenReview: timeout")), "unavailable");
        assert_eq!(refusal_reason(&Status::permission_denied("token is not authenticated")), "tokenreview_denied");
        assert_eq!(refusal_reason(&Status::internal("signing failed")), "internal");
    }

    #[test]
    fn nacks_are_counted_once_per_kind_they_name() {
        let m = ControlMetrics::new();
        m.nack("policy a.yaml#0 (shop/p): rego: parse error; policy b.yaml#0 (shop/q): x; trust bundle: empty");
        m.nack("RequestAuthentication t#0 (shop/jwt): no keys");
        let text = m.render();
        for line in [
            r#"palisade_control_nacks_total{kind="AuthorizationPolicy"} 1"#,
            r#"palisade_control_nacks_total{kind="TrustBundle"} 1"#,
            r#"palisade_control_nacks_total{kind="RequestAuthentication"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn store_calls_are_timed_and_only_store_failures_counted() {
        let m = ControlMetrics::new();
        let _ = m.store_call("redeem", || Err::<(), _>("refused"), |_| false);
        let _ = m.store_call("redeem", || Err::<(), _>("disk"), |_| true);
        let _ = m.store_call("redeem", || Ok::<_, ()>(()), |_| true);
        let text = m.render();
        assert!(text.contains(r#"palisade_control_store_duration_seconds_count{op="redeem"} 3"#), "{text}");
        assert!(text.lines().any(|l| l == r#"palisade_control_store_errors_total{op="redeem"} 1"#), "{text}");
        let guard = Arc::new(ControlMetrics::new());
        let connected = guard.sidecar_connected();
        assert!(guard.render().contains("palisade_control_sidecars_connected 1"));
        drop(connected);
        assert!(guard.render().contains("palisade_control_sidecars_connected 0"));
    }
}
