//! TLS for the mesh: one crypto provider (aws-lc-rs), SPIFFE-aware verifiers, a trust bundle and
//! a workload certificate that both swap live, and the configs built from them.

pub mod bundle;
pub mod config;
pub mod peer;
pub mod resolver;
pub mod verify;

use std::sync::Arc;

pub use bundle::{BundleError, BundleState, TrustBundle, TrustSource};
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

/// A certificate's validity as `(not_before, not_after)`, Unix seconds; `None` if `der` does
/// not parse.
pub fn validity(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some((cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp()))
}

/// The validity (see [`validity`]) of the first certificate in a PEM string.
pub fn pem_validity(pem: &str) -> Option<(i64, i64)> {
    validity(certs_from_pem(pem).ok()?.first()?)
}

/// A metric label for why a handshake failed, from the rustls error inside the I/O error.
pub fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::NoCertificatesPresented) => "no_client_certificate",
        Some(E::InvalidCertificate(C::UnknownIssuer | C::BadSignature | C::BadEncoding)) => "untrusted_issuer",
        Some(E::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        )) => "expired",
        Some(E::InvalidCertificate(C::Revoked)) => "revoked",
        Some(E::InvalidCertificate(_)) => "bad_certificate",
        Some(E::PeerIncompatible(_) | E::NoApplicationProtocol) => "incompatible",
        Some(E::AlertReceived(_)) => "alert_received",
        // What rustls says when the certificate store answered nothing: this sidecar's own
        // certificate has expired (it could not renew) and it refuses rather than present none.
        Some(E::General(m)) if m == "no server certificate chain resolved" => "no_certificate",
        Some(_) => "protocol_error",
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "eof",
        None => "io_error",
    }
}
