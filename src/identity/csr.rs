//! Checks on a certificate signing request before the CA will look at it.

use rcgen::{CertificateSigningRequestParams, PublicKeyData, SignatureAlgorithm};
use rustls::pki_types::CertificateSigningRequestDer;

/// CSRs larger than this are refused unread.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// Why a CSR was refused. Each variant names the problem so the operator can fix the caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("CSR is empty")]
    Empty,
    #[error("CSR is {0} bytes; the limit is {MAX_CSR_BYTES}")]
    TooLarge(usize),
    #[error("CSR is not a DER PKCS#10 request")]
    Malformed,
    #[error("CSR signature does not verify: the requester does not hold the key")]
    BadSignature,
    #[error("CSR key type is not allowed (only ECDSA P-256, ECDSA P-384 and Ed25519 are)")]
    KeyType,
    #[error("CSR carries an extension Palisade does not accept")]
    UnsupportedExtension,
}

/// A CSR whose signature verified and whose key type is allowed.
pub struct VerifiedCsr {
    /// The public key to certify (SubjectPublicKeyInfo content and algorithm).
    pub public_key: rcgen::PublicKey,
}

/// Parses and verifies a CSR. Everything in it except the public key is ignored by the CA.
pub fn verify_csr(der: &[u8]) -> Result<VerifiedCsr, CsrError> {
    if der.is_empty() {
        return Err(CsrError::Empty);
    }
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(der.len()));
    }
    let parsed =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
            .map_err(|e| match e {
                rcgen::Error::InvalidCertificationRequestSignature => CsrError::BadSignature,
                rcgen::Error::UnsupportedExtension => CsrError::UnsupportedExtension,
                rcgen::Error::UnsupportedSignatureAlgorithm => CsrError::KeyType,
                _ => CsrError::Malformed,
            })?;
    let alg: &SignatureAlgorithm = PublicKeyData::algorithm(&parsed.public_key);
    let allowed = [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ];
    if !allowed.contains(&alg) {
        return Err(CsrError::KeyType);
    }
    Ok(VerifiedCsr {
        public_key: parsed.public_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn csr_for(alg: &'static SignatureAlgorithm) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).unwrap();
        CertificateParams::new(vec!["ignored.example".into()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn accepts_allowed_key_types() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            verify_csr(&csr_for(alg)).unwrap();
        }
    }

    #[test]
    fn refuses_garbage_oversize_and_tampering() {
        assert_eq!(verify_csr(b"").err(), Some(CsrError::Empty));
        assert_eq!(verify_csr(b"not a csr").err(), Some(CsrError::Malformed));
        assert_eq!(
            verify_csr(&vec![0x30; MAX_CSR_BYTES + 1]).err(),
            Some(CsrError::TooLarge(MAX_CSR_BYTES + 1))
        );
        let mut der = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256);
        let last = der.len() - 1;
        der[last] ^= 0x01; // flip a bit of the signature
        assert_eq!(verify_csr(&der).err(), Some(CsrError::BadSignature));
    }

    #[test]
    fn refuses_rsa() {
        let key =
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        let der = CertificateParams::new(vec![])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec();
        assert_eq!(verify_csr(&der).err(), Some(CsrError::KeyType));
    }
}
