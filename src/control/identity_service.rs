//! `Identity/Certify`: the identity comes from the credential, never from the CSR.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tonic::{Request, Response, Status};

use crate::identity::csr::verify_csr;
use crate::identity::{IssuedCertificate, SpiffeId};
use crate::proto::identity::identity_server::Identity;
use crate::proto::identity::{CertifyRequest, CertifyResponse, certify_request::Credential};

use super::ca_set::CaSet;
use super::store::{CredentialKind, Store, StoreError, TokenRefusal};

/// The Certify service.
pub struct IdentityService {
    pub store: Arc<Store>,
    pub ca: Arc<ArcSwap<CaSet>>,
    pub cert_ttl: Duration,
    /// Kubernetes service-account attestation (TokenReview), when running in a cluster.
    pub attestor: Option<crate::k8s::attest::Attestor>,
    /// Store calls are timed here; issued and refused are counted around the service.
    pub metrics: Arc<super::metrics::ControlMetrics>,
}

/// A Certify failure, mapped to the gRPC status the caller sees.
#[derive(Debug, thiserror::Error)]
enum CertifyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Token(#[from] TokenRefusal),
    #[error("signing failed: {0}")]
    Sign(#[from] crate::identity::ca::CaError),
}

impl From<CertifyError> for Status {
    fn from(e: CertifyError) -> Status {
        match e {
            CertifyError::Token(t) => Status::permission_denied(t.to_string()),
            other => {
                tracing::error!(error = %other, "certify failed");
                Status::internal(other.to_string())
            }
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(&self, request: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let peer_certs = request.peer_certs();
        let body = request.into_inner();
        // An ECDSA verify is tens of microseconds: off the async threads, like the signing.
        let csr_der = body.csr_der;
        let csr = tokio::task::spawn_blocking(move || verify_csr(&csr_der))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::invalid_argument(format!("csr refused: {e}")))?;
        let ca = self.ca.load_full();
        let ttl = self.cert_ttl;
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let issued = match body.credential {
            Some(Credential::JoinToken(token)) => tokio::task::spawn_blocking(move || {
                let redeem = || {
                    store.redeem_join_token::<CertifyError>(&token, |id| {
                        Ok(ca.signer().sign_workload(id, &csr.public_key, ttl, &[])?)
                    })
                };
                metrics.store_call("redeem_join_token", redeem, |e| matches!(e, CertifyError::Store(_)))
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))??,
            Some(Credential::KubernetesToken(token)) => {
                let Some(attestor) = &self.attestor else {
                    return Err(Status::unimplemented(
                        "Kubernetes service-account attestation is not enabled on this control plane (start it with --kubernetes)",
                    ));
                };
                let id = attestor.identity(&token).await.map_err(|e| {
                    tracing::info!(error = %e, "service-account token refused");
                    if e.is_transient() {
                        Status::unavailable(e.to_string())
                    } else {
                        Status::permission_denied(e.to_string())
                    }
                })?;
                tokio::task::spawn_blocking(move || {
                    sign_and_record(&ca, &store, &metrics, &id, &csr.public_key, ttl, CredentialKind::Kubernetes)
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))??
            }
            None => {
                // Renewal: the TLS layer has verified the chain and validity of the client
                // certificate against the trust bundle; the identity is the one it carries.
                let (id, serial) = crate::tls::peer_identity(peer_certs.as_deref().map(|v| v.as_slice())).map_err(|e| {
                    Status::unauthenticated(format!(
                        "no credential: send a join token or connect with your current, unexpired workload certificate ({e})"
                    ))
                })?;
                tokio::task::spawn_blocking(move || -> Result<IssuedCertificate, Status> {
                    let revoked = metrics.store_call("is_revoked", || store.is_revoked(id.as_str(), &serial), |_| true);
                    if revoked.map_err(CertifyError::from)? {
                        return Err(Status::permission_denied(format!("{id} (serial {serial}) is revoked")));
                    }
                    Ok(sign_and_record(&ca, &store, &metrics, &id, &csr.public_key, ttl, CredentialKind::Renewal)?)
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))??
            }
        };
        let ca = self.ca.load();
        tracing::info!(spiffe_id = %issued.spiffe_id, serial = %issued.serial, not_after = issued.not_after, "issued certificate");
        Ok(Response::new(CertifyResponse {
            certificate_chain_pem: issued.chain_pem,
            trust_bundle_pem: ca.bundle_pem().to_string(),
            spiffe_id: issued.spiffe_id.to_string(),
            serial: issued.serial,
            not_before: issued.not_before,
            not_after: issued.not_after,
        }))
    }
}

/// Signs a workload certificate and records it in the ledger before anyone sees it.
fn sign_and_record(
    ca: &CaSet,
    store: &Store,
    metrics: &super::metrics::ControlMetrics,
    id: &SpiffeId,
    key: &rcgen::PublicKey,
    ttl: Duration,
    kind: CredentialKind,
) -> Result<IssuedCertificate, CertifyError> {
    let issued = ca.signer().sign_workload(id, key, ttl, &[])?;
    metrics.store_call("record_certificate", || store.record_certificate(&issued, kind), |_| true)?;
    Ok(issued)
}
