//! The mesh certificate authority: a root that anchors trust and an intermediate that signs.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};

use super::SpiffeId;
use crate::clock::unix;

/// Clock-skew allowance: certificates are valid from this long before they were issued.
pub const BACKDATE: Duration = Duration::from_secs(60);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);

/// A CA failure. These are operator problems (corrupt state, bad key material), not caller ones.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("stored CA material is unusable: {0}")]
    Material(String),
}

/// PEM material of one CA generation, as persisted in the control plane's store.
#[derive(Clone, Debug)]
pub struct CaMaterial {
    pub root_cert_pem: String,
    pub root_key_pem: String,
    pub intermediate_cert_pem: String,
    pub intermediate_key_pem: String,
}

impl CaMaterial {
    /// Generates a fresh root and intermediate (ECDSA P-256) for `trust_domain`.
    ///
    /// No name constraints are set: webpki fails closed on URI constraints.
    pub fn generate(trust_domain: &str, generation: u32) -> Result<Self, CaError> {
        let now = SystemTime::now();
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut root = CertificateParams::default();
        root.distinguished_name = dn(&format!("Palisade root CA {generation}"), trust_domain);
        root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        root.not_before = (now - BACKDATE).into();
        root.not_after = (now + ROOT_LIFETIME).into();
        root.serial_number = Some(random_serial());
        let root_cert = root.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root, &root_key);

        let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut int = CertificateParams::default();
        int.distinguished_name = dn(&format!("Palisade intermediate CA {generation}"), trust_domain);
        int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        int.use_authority_key_identifier_extension = true;
        int.not_before = (now - BACKDATE).into();
        int.not_after = (now + INTERMEDIATE_LIFETIME).into();
        int.serial_number = Some(random_serial());
        let int_cert = int.signed_by(&int_key, &root_issuer)?;

        Ok(CaMaterial {
            root_cert_pem: root_cert.pem(),
            root_key_pem: root_key.serialize_pem(),
            intermediate_cert_pem: int_cert.pem(),
            intermediate_key_pem: int_key.serialize_pem(),
        })
    }
}

fn dn(cn: &str, trust_domain: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, format!("Palisade {trust_domain}"));
    dn.push(DnType::CommonName, cn);
    dn
}

/// A random positive 128-bit serial (RFC 5280 allows up to 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // no leading zero octet, so the hex form is stable
    SerialNumber::from_slice(&bytes)
}

/// A certificate the CA signed.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    /// The leaf then the intermediate, PEM.
    pub chain_pem: String,
    pub spiffe_id: SpiffeId,
    /// Lower-case hex.
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

/// A loaded CA generation that can sign workload certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    material: CaMaterial,
}

impl CertificateAuthority {
    /// Loads a generation from its persisted PEM.
    pub fn load(material: CaMaterial) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(&material.intermediate_key_pem)
            .map_err(|e| CaError::Material(format!("intermediate key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(&material.intermediate_cert_pem, key)
            .map_err(|e| CaError::Material(format!("intermediate certificate: {e}")))?;
        Ok(CertificateAuthority { issuer, material })
    }

    /// The material this CA was loaded from.
    pub fn material(&self) -> &CaMaterial {
        &self.material
    }

    /// Signs a workload certificate for `id` over `public_key`, valid for `ttl` from now (minus
    /// the clock-skew backdate). Only the identity and key go in: nothing from the CSR.
    pub fn sign_workload(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        ttl: Duration,
        dns_names: &[String],
    ) -> Result<IssuedCertificate, CaError> {
        let now = SystemTime::now();
        self.sign_workload_valid(id, public_key, now - BACKDATE, now + ttl, dns_names)
    }

    /// Like [`sign_workload`](Self::sign_workload) with explicit validity. The control plane
    /// always uses `sign_workload`; this exists so tests can mint expired certificates.
    pub fn sign_workload_valid(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        not_before: SystemTime,
        not_after: SystemTime,
        dns_names: &[String],
    ) -> Result<IssuedCertificate, CaError> {
        let serial = random_serial();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.as_str().try_into().map_err(|e| CaError::Material(format!("SPIFFE ID as URI SAN: {e}")))?,
        )];
        for name in dns_names {
            // Serving certificates (the control plane's, its webhook's) may name an address.
            if let Ok(ip) = name.parse::<std::net::IpAddr>() {
                params.subject_alt_names.push(SanType::IpAddress(ip));
                continue;
            }
            params.subject_alt_names.push(SanType::DnsName(
                name.as_str().try_into().map_err(|e| CaError::Material(format!("DNS SAN {name}: {e}")))?,
            ));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        // EC and Ed25519 keys only sign; KeyEncipherment (an RSA key-transport usage) does not apply.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(serial.clone());
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(IssuedCertificate {
            chain_pem: format!("{}{}", cert.pem(), self.material.intermediate_cert_pem),
            spiffe_id: id.clone(),
            serial: crate::hex::encode(&serial.to_bytes()),
            not_before: unix(not_before),
            not_after: unix(not_after),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    #[test]
    fn signs_identity_from_caller_not_csr() {
        let ca = CertificateAuthority::load(CaMaterial::generate("cluster.local", 1).unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let issued = ca.sign_workload(&id, &key, Duration::from_secs(30), &[]).unwrap();
        assert_eq!(issued.not_after - issued.not_before, 90);
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let chain: Vec<_> =
            CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
        assert_eq!(chain.len(), 2);
        let (_, cert) = X509Certificate::from_der(&chain[0]).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names, vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")]);
        assert_eq!(crate::hex::encode(cert.raw_serial()), issued.serial);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
    }
}
