//! Reading the SPIFFE ID out of a verified peer certificate.

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::*;

use crate::identity::spiffe::SpiffeId;

/// Why a peer certificate does not name exactly one SPIFFE identity.
#[derive(thiserror::Error, PartialEq, Eq)]
pub enum PeerCertError {
    #[error("peer presented no certificate")]
    NoCertificate,
    #[error("peer certificate does not parse")]
    Malformed,
    #[error("peer certificate carries no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("peer certificate carries more than one spiffe:// URI SAN")]
    SeveralSpiffeIds,
    #[error("peer certificate SPIFFE ID is invalid: {0}")]
    Invalid(String),
}

impl std::fmt::Debug for PeerCertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The one SPIFFE ID in `cert`'s URI SANs, and its serial (lower-case hex).
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<(SpiffeId, String), PeerCertError> {
    let (_, cert) = X509Certificate::from_der(cert).map_err(|_| PeerCertError::Malformed)?;
    let serial = crate::hex::encode(cert.raw_serial());
    let san = cert.subject_alternative_name().map_err(|_| PeerCertError::Malformed)?;
    let mut found = None;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let GeneralName::URI(uri) = name
            && uri.starts_with("spiffe://")
        {
            if found.is_some() {
                return Err(PeerCertError::SeveralSpiffeIds);
            }
            found = Some(uri.parse::<SpiffeId>().map_err(|e| PeerCertError::Invalid(e.to_string()))?);
        }
    }
    found.map(|id| (id, serial)).ok_or(PeerCertError::NoSpiffeId)
}

/// The identity of the peer of a finished handshake (its end-entity certificate).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<(SpiffeId, String), PeerCertError> {
    let leaf = certs.and_then(|c| c.first()).ok_or(PeerCertError::NoCertificate)?;
    spiffe_id_of(leaf)
}
