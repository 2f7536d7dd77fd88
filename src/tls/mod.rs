//! TLS for the mesh: one crypto provider (aws-lc-rs), SPIFFE-aware verifiers, a trust bundle and
//! a workload certificate that both swap live, and the configs built from them.

pub mod bundle;
pub mod config;
pub mod peer;
pub mod resolver;
pub mod verify;

use std::sync::Arc;

pub use bundle::TrustBundle;
pub use peer::{PeerCertError, peer_identity, spiffe_id_of};
pub use resolver::CertStore;

/// Installs aws-lc-rs as the process-wide rustls provider. Idempotent; call once at start.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The provider every config in Palisade is built with.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Parses every certificate in a PEM string.
pub fn certs_from_pem(
    pem: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).collect()
}
