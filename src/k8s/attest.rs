//! Service-account attestation: a projected token (audience `palisade`) checked by the API
//! server with TokenReview. The identity is the token's namespace and service account.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use crate::identity::SpiffeId;

/// The audience every sidecar token must carry.
pub const AUDIENCE: &str = "palisade";

/// Why a token earned no identity.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The API server did not accept the token (expired, wrong audience, unknown signer,
    /// deleted service account...). The message is the API server's own.
    #[error("token refused by the Kubernetes API server: {0}")]
    Refused(String),
    /// Authenticated, but not as a service account.
    #[error("token authenticates {0:?}, which is not a service account")]
    NotServiceAccount(String),
    /// The review itself failed; retrying may help.
    #[error("TokenReview failed: {0}")]
    Api(#[from] kube::Error),
}

impl AttestError {
    /// Whether the caller should retry rather than give up.
    pub fn is_transient(&self) -> bool {
        matches!(self, AttestError::Api(_))
    }
}

/// Checks tokens against the API server.
#[derive(Clone)]
pub struct Attestor {
    reviews: Api<TokenReview>,
    trust_domain: String,
}

impl Attestor {
    pub fn new(client: kube::Client, trust_domain: &str) -> Self {
        Attestor { reviews: Api::all(client), trust_domain: trust_domain.to_string() }
    }

    /// The workload identity `token` proves.
    pub async fn identity(&self, token: &str) -> Result<SpiffeId, AttestError> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.trim().to_string()), audiences: Some(vec![AUDIENCE.into()]) },
            ..Default::default()
        };
        let status = self.reviews.create(&PostParams::default(), &review).await?.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AttestError::Refused(status.error.unwrap_or_else(|| "not authenticated".into())));
        }
        // The API server echoes the audiences the token was found valid for; an answer
        // without ours means it was reviewed for the API server's own audience instead.
        if !status.audiences.unwrap_or_default().iter().any(|a| a == AUDIENCE) {
            return Err(AttestError::Refused(format!("token is not for audience {AUDIENCE:?}")));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        service_account_identity(&username, &self.trust_domain)
    }
}

/// `system:serviceaccount:<ns>:<sa>` → `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn service_account_identity(username: &str, trust_domain: &str) -> Result<SpiffeId, AttestError> {
    let not_sa = || AttestError::NotServiceAccount(username.to_string());
    let rest = username.strip_prefix("system:serviceaccount:").ok_or_else(not_sa)?;
    let (ns, sa) = rest.split_once(':').ok_or_else(not_sa)?;
    // Kubernetes names are DNS labels or subdomains; anything else cannot be a real account.
    let dns = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !dns(ns) || !dns(sa) {
        return Err(not_sa());
    }
    SpiffeId::workload(trust_domain, ns, sa).map_err(|_| not_sa())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_map_to_identities() {
        let id = service_account_identity("system:serviceaccount:shop:web", "cluster.local").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/web");
        assert!(service_account_identity("admin", "cluster.local").is_err());
        assert!(service_account_identity("system:serviceaccount:shop", "cluster.local").is_err());
        assert!(service_account_identity("system:serviceaccount:sh/op:web", "cluster.local").is_err());
    }
}
