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
use super::discovery::MeshState;
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
    /// The revocations in force (the lists pushed to sidecars), checked by [`sign_checked`]
    /// on every path.
    pub mesh: Arc<MeshState>,
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
    #[error("{0} is revoked")]
    Revoked(String),
}

impl From<CertifyError> for Status {
    fn from(e: CertifyError) -> Status {
        match e {
            CertifyError::Token(t) => Status::permission_denied(t.to_string()),
            CertifyError::Revoked(what) => {
                tracing::info!(%what, "certificate refused: revoked");
                Status::permission_denied(format!("{what} is revoked"))
            }
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
        let mesh = self.mesh.clone();
        let issued = match body.credential {
            Some(Credential::JoinToken(token)) => tokio::task::spawn_blocking(move || {
                let redeem = || {
                    // A revoked identity stays revoked: a fresh token does not re-enrol it
                    // (its peers would refuse the certificate anyway), and the token is not spent.
                    store.redeem_join_token::<CertifyError>(&token, |id| {
                        sign_checked(&ca, &mesh, id, None, &csr.public_key, ttl)
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
                    let issued = sign_checked(&ca, &mesh, &id, None, &csr.public_key, ttl)?;
                    record(&store, &metrics, issued, CredentialKind::Kubernetes)
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
                tokio::task::spawn_blocking(move || {
                    let issued = sign_checked(&ca, &mesh, &id, Some(&serial), &csr.public_key, ttl)?;
                    record(&store, &metrics, issued, CredentialKind::Renewal)
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

/// The one place a workload certificate is signed, so no issuance path can forget the
/// revocation check: `id` must not be revoked, nor `presented` (the serial of the certificate a
/// renewal is proven with). The lists are the ones pushed to sidecars, so the control plane
/// refuses exactly what sidecars refuse; on Kubernetes they are every replica's (watched).
fn sign_checked(
    ca: &CaSet,
    mesh: &MeshState,
    id: &SpiffeId,
    presented: Option<&str>,
    key: &rcgen::PublicKey,
    ttl: Duration,
) -> Result<IssuedCertificate, CertifyError> {
    if mesh.is_revoked(id.as_str(), presented) {
        let what = match presented {
            Some(serial) => format!("{id} (serial {serial})"),
            None => id.to_string(),
        };
        return Err(CertifyError::Revoked(what));
    }
    Ok(ca.signer().sign_workload(id, key, ttl, &[])?)
}

/// Records a signed certificate in the ledger before anyone sees it.
fn record(
    store: &Store,
    metrics: &super::metrics::ControlMetrics,
    issued: IssuedCertificate,
    kind: CredentialKind,
) -> Result<IssuedCertificate, CertifyError> {
    metrics.store_call("record_certificate", || store.record_certificate(&issued, kind), |_| true)?;
    Ok(issued)
}
