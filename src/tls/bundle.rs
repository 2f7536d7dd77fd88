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

/// The live trust bundle, shared by every TLS config of a process.
pub struct TrustBundle {
    state: ArcSwap<BundleState>,
    /// Bumped whenever revocations change, so open connections can re-judge their peer.
    revocation_epoch: tokio::sync::watch::Sender<u64>,
}

impl TrustBundle {
    /// A bundle of the roots in `pem`.
    pub fn from_pem(pem: &str) -> Result<Arc<Self>, BundleError> {
        Ok(Arc::new(TrustBundle {
            state: ArcSwap::from_pointee(build(pem, HashSet::new(), HashSet::new())?),
            revocation_epoch: tokio::sync::watch::channel(0).0,
        }))
    }

    /// The current version.
    pub fn load(&self) -> arc_swap::Guard<Arc<BundleState>> {
        self.state.load()
    }

    /// Replaces the roots; revocations are kept. New handshakes use the new roots at once.
    pub fn set_roots(&self, pem: &str) -> Result<(), BundleError> {
        let cur = self.state.load();
        if cur.pem == pem {
            return Ok(());
        }
        let next = build(pem, cur.revoked_ids.clone(), cur.revoked_serials.clone())?;
        self.state.store(Arc::new(next));
        Ok(())
    }

    /// Replaces the revocation lists.
    pub fn set_revocations(&self, ids: HashSet<String>, serials: HashSet<String>) {
        let cur = self.state.load_full();
        if cur.revoked_ids == ids && cur.revoked_serials == serials {
            return;
        }
        self.state.store(Arc::new(BundleState {
            roots: cur.roots.clone(),
            pem: cur.pem.clone(),
            client_verifier: cur.client_verifier.clone(),
            revoked_ids: ids,
            revoked_serials: serials,
        }));
        self.revocation_epoch.send_modify(|e| *e += 1);
    }

    /// Notifies on every change of the revocation lists.
    pub fn revocations_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revocation_epoch.subscribe()
    }

    /// Whether a peer with this identity or serial is revoked.
    pub fn is_revoked(&self, id: &str, serial: &str) -> bool {
        let s = self.state.load();
        s.revoked_ids.contains(id) || s.revoked_serials.contains(serial)
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
