//! The trust bundle: the roots a sidecar trusts and the identities it refuses, swapped live.

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

/// One immutable version of the bundle. Handshakes read it lock-free.
pub struct BundleState {
    pub roots: Arc<RootCertStore>,
    pub pem: String,
    /// Verifies client chains (mandatory client auth).
    pub client_verifier: Arc<dyn ClientCertVerifier>,
    /// Revoked SPIFFE IDs and serials (lower-case hex).
    pub revoked_ids: HashSet<String>,
    pub revoked_serials: HashSet<String>,
}

/// Why a bundle was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("trust bundle is not valid PEM: {0}")]
    Pem(String),
    #[error("trust bundle holds no certificate")]
    Empty,
    #[error("trust bundle certificate rejected: {0}")]
    Cert(rustls::Error),
    #[error("cannot build verifier: {0}")]
    Verifier(String),
}

impl BundleState {
    /// The roots in `pem`, with nothing revoked.
    pub fn from_pem(pem: &str) -> Result<Self, BundleError> {
        build(pem, HashSet::new(), HashSet::new())
    }

    /// The same roots with other revocation lists (the verifier is shared, not rebuilt).
    pub fn with_revocations(&self, revoked_ids: HashSet<String>, revoked_serials: HashSet<String>) -> Self {
        BundleState {
            roots: self.roots.clone(),
            pem: self.pem.clone(),
            client_verifier: self.client_verifier.clone(),
            revoked_ids,
            revoked_serials,
        }
    }

    /// Whether a peer with this identity or serial (lower-case hex) is revoked.
    pub fn is_revoked(&self, id: &str, serial: &str) -> bool {
        self.revoked_ids.contains(id) || self.revoked_serials.contains(serial)
    }

    /// Whether both hold the same revocation lists.
    pub fn same_revocations(&self, other: &BundleState) -> bool {
        self.revoked_ids == other.revoked_ids && self.revoked_serials == other.revoked_serials
    }
}

/// Where TLS configs read the trust in force at each handshake. A sidecar's is its mesh view
/// (one snapshot holds roots, revocations and everything else, swapped whole); a process that
/// holds only a bundle (the control plane, a CLI client) uses [`TrustBundle`].
pub trait TrustSource: Send + Sync {
    /// The roots and revocations in force now.
    fn trust(&self) -> Arc<BundleState>;
}

/// A trust bundle on its own, shared by every TLS config of a process that has no mesh view.
pub struct TrustBundle {
    state: ArcSwap<BundleState>,
}

impl TrustSource for TrustBundle {
    fn trust(&self) -> Arc<BundleState> {
        self.state.load_full()
    }
}

impl TrustBundle {
    /// A bundle of the roots in `pem`.
    pub fn from_pem(pem: &str) -> Result<Arc<Self>, BundleError> {
        Ok(Arc::new(TrustBundle { state: ArcSwap::from_pointee(BundleState::from_pem(pem)?) }))
    }

    /// The current version.
    pub fn load(&self) -> arc_swap::Guard<Arc<BundleState>> {
        self.state.load()
    }

    /// Replaces the roots; revocations are kept. New handshakes use the new roots at once.
    /// Built before the swap and swapped with `rcu`, so a concurrent change is never lost.
    pub fn set_roots(&self, pem: &str) -> Result<(), BundleError> {
        let roots = BundleState::from_pem(pem)?;
        self.state.rcu(|cur| Arc::new(roots.with_revocations(cur.revoked_ids.clone(), cur.revoked_serials.clone())));
        Ok(())
    }
}

fn build(
    pem: &str,
    revoked_ids: HashSet<String>,
    revoked_serials: HashSet<String>,
) -> Result<BundleState, BundleError> {
    let certs = super::certs_from_pem(pem).map_err(|e| BundleError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(BundleError::Empty);
    }
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(BundleError::Cert)?;
    }
    let roots = Arc::new(roots);
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), super::provider())
        .build()
        .map_err(|e| BundleError::Verifier(e.to_string()))?;
    Ok(BundleState { roots, pem: pem.to_string(), client_verifier, revoked_ids, revoked_serials })
}
