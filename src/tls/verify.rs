//! SPIFFE verification for both ends of a handshake.
//!
//! Stock webpki verifiers check DNS names (server) or nothing (client). In the mesh the name that
//! matters is the SPIFFE ID in the URI SAN, and the roots change during a CA rotation, so both
//! verifiers read the live trust ([`TrustSource`]) on every handshake.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme};

use super::TrustSource;
use crate::identity::spiffe::SpiffeId;

/// The server presented a valid chain for an identity other than the expected one.
#[derive(thiserror::Error)]
#[error("peer identity mismatch: expected {expected}, got {actual}")]
pub struct IdentityMismatch {
    pub expected: String,
    pub actual: String,
}

// rustls renders `OtherError` with `Debug`; make that the readable message operators see.
impl std::fmt::Debug for IdentityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Verifies a server: chain to the bundle, then exactly the expected SPIFFE ID, then not revoked.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    trust: Arc<dyn TrustSource>,
    expected: Option<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    /// `expected: None` accepts any identity in the trust domain's bundle (used by tests only).
    pub fn new(trust: Arc<dyn TrustSource>, expected: Option<SpiffeId>) -> Self {
        SpiffeServerVerifier { trust, expected, provider: super::provider() }
    }
}

impl std::fmt::Debug for dyn TrustSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrustSource")
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let state = self.trust.trust();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &state.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let (id, serial) = super::spiffe_id_of(end_entity)
            .map_err(|e| Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))?;
        if let Some(expected) = &self.expected
            && *expected != id
        {
            return Err(Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(IdentityMismatch {
                expected: expected.to_string(),
                actual: id.to_string(),
            })))));
        }
        if state.is_revoked(id.as_str(), &serial) {
            return Err(Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Verifies a client: chain to the live bundle, a SPIFFE ID present, not revoked.
///
/// Which identities may do what is policy's job, after the handshake; this only proves who.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    trust: Arc<dyn TrustSource>,
    mandatory: bool,
}

impl SpiffeClientVerifier {
    /// `mandatory: false` lets clients without a certificate finish the handshake (the control
    /// plane's Certify, where a new workload has no certificate yet).
    pub fn new(trust: Arc<dyn TrustSource>, mandatory: bool) -> Self {
        SpiffeClientVerifier { trust, mandatory }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would have to borrow from the live bundle; peers have one certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let state = self.trust.trust();
        state.client_verifier.verify_client_cert(end_entity, intermediates, now)?;
        let (id, serial) = super::spiffe_id_of(end_entity)
            .map_err(|e| Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))?;
        if state.is_revoked(id.as_str(), &serial) {
            return Err(Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.trust.trust().client_verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.trust.trust().client_verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.trust().client_verifier.supported_verify_schemes()
    }
}
