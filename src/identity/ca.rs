//! The mesh certificate authority: a root that anchors trust and an intermediate that signs.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SigningKey,
};

use super::SpiffeId;
use super::pkcs11::{self, Pkcs11Error, Token, TokenKey};
use super::seal::{self, Kek, SealError};
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
    #[error("the {0} key is sealed and no key-encryption key was given")]
    NoKek(KeyRole),
    #[error("the {role} key: {source}")]
    Seal { role: KeyRole, source: SealError },
    #[error("the {0} key is in a PKCS#11 token and no token is configured (--ca-pkcs11-module)")]
    NoToken(KeyRole),
    #[error(transparent)]
    Pkcs11(#[from] Pkcs11Error),
}

/// Which of a generation's two keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRole {
    Root,
    Intermediate,
}

impl std::fmt::Display for KeyRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeyRole::Root => "root",
            KeyRole::Intermediate => "intermediate",
        })
    }
}

/// Where a generation's private keys are kept. The default (neither) keeps them in clear, as
/// the demo and a first try do.
#[derive(Clone, Debug, Default)]
pub struct KeyCustody {
    /// Seals every key written to the store or the CA Secret (AES-256-GCM).
    pub kek: Option<Arc<Kek>>,
    /// Generates new generations' keys inside this token; they never leave it.
    pub token: Option<Arc<Token>>,
}

/// The CA's signing key: in this process, or inside a PKCS#11 token.
pub enum CaKey {
    Local(KeyPair),
    Token(TokenKey),
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            CaKey::Local(k) => k.der_bytes(),
            CaKey::Token(k) => k.der_bytes(),
        }
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            CaKey::Local(k) => k.algorithm(),
            CaKey::Token(k) => k.algorithm(),
        }
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            CaKey::Local(k) => k.sign(msg),
            CaKey::Token(k) => k.sign(msg),
        }
    }
}

impl CaKey {
    /// A new P-256 key: in the custody's token (labelled by trust domain, generation and
    /// role) if there is one, else here.
    fn generate(custody: &KeyCustody, trust_domain: &str, generation: u32, role: KeyRole) -> Result<Self, CaError> {
        match &custody.token {
            Some(token) => Ok(CaKey::Token(token.generate_key(&pkcs11::object_label(
                trust_domain,
                generation,
                &role.to_string(),
            ))?)),
            None => Ok(CaKey::Local(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)),
        }
    }

    /// What the material holds for this key: its PEM, or its token reference.
    fn stored_form(&self) -> String {
        match self {
            CaKey::Local(k) => k.serialize_pem(),
            CaKey::Token(k) => k.reference().to_string(),
        }
    }

    /// Loads a key from its opened stored form (PEM, or a token reference).
    fn load(stored: &str, custody: &KeyCustody, role: KeyRole) -> Result<Self, CaError> {
        if pkcs11::is_reference(stored) {
            let token = custody.token.as_ref().ok_or(CaError::NoToken(role))?;
            return Ok(CaKey::Token(token.find_key(stored)?));
        }
        if seal::is_sealed(stored) {
            return Err(CaError::NoKek(role));
        }
        KeyPair::from_pem(stored).map(CaKey::Local).map_err(|e| CaError::Material(format!("{role} key: {e}")))
    }
}

/// Material of one CA generation, as persisted in the control plane's store. A key field holds
/// a PEM key in clear, a sealed key ([`seal`]), or a reference to a key in a PKCS#11 token.
#[derive(Clone, Debug)]
pub struct CaMaterial {
    pub root_cert_pem: String,
    pub root_key_pem: String,
    pub intermediate_cert_pem: String,
    pub intermediate_key_pem: String,
}

impl CaMaterial {
    /// Generates a fresh root and intermediate (ECDSA P-256) for `trust_domain`, keys in clear.
    ///
    /// No name constraints are set: webpki fails closed on URI constraints.
    pub fn generate(trust_domain: &str, generation: u32) -> Result<Self, CaError> {
        Self::generate_in(trust_domain, generation, &KeyCustody::default())
    }

    /// Like [`generate`](Self::generate), with both keys generated inside the custody's token
    /// when it has one (the material then holds references, never keys). Sealing under a KEK
    /// is the writer's business ([`sealed`](Self::sealed)): it knows where the material goes.
    pub fn generate_in(trust_domain: &str, generation: u32, custody: &KeyCustody) -> Result<Self, CaError> {
        let now = SystemTime::now();
        let root_key = CaKey::generate(custody, trust_domain, generation, KeyRole::Root)?;
        let mut root = CertificateParams::default();
        root.distinguished_name = dn(&format!("Palisade root CA {generation}"), trust_domain);
        root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        root.not_before = (now - BACKDATE).into();
        root.not_after = (now + ROOT_LIFETIME).into();
        root.serial_number = Some(random_serial());
        let root_cert = root.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root, &root_key);

        let int_key = CaKey::generate(custody, trust_domain, generation, KeyRole::Intermediate)?;
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
            root_key_pem: root_key.stored_form(),
            intermediate_cert_pem: int_cert.pem(),
            intermediate_key_pem: int_key.stored_form(),
        })
    }

    /// The material with every key in clear (PEM) sealed under `kek`, bound to `scope` (where
    /// it is written, e.g. `store generation 3`), the key's role and its certificate. Sealed
    /// keys and token references are kept as they are.
    pub fn sealed(&self, kek: &Kek, scope: &str) -> Self {
        let seal_one = |key: &str, role, cert: &str| {
            if seal::is_sealed(key) || pkcs11::is_reference(key) {
                key.to_string()
            } else {
                kek.seal(key.as_bytes(), &key_aad(scope, role, cert))
            }
        };
        CaMaterial {
            root_key_pem: seal_one(&self.root_key_pem, KeyRole::Root, &self.root_cert_pem),
            intermediate_key_pem: seal_one(
                &self.intermediate_key_pem,
                KeyRole::Intermediate,
                &self.intermediate_cert_pem,
            ),
            ..self.clone()
        }
    }

    /// The material with its sealed keys opened; fails if one is sealed and there is no KEK,
    /// or it does not open (wrong KEK, or moved from another `scope`, or altered).
    pub fn opened(&self, kek: Option<&Kek>, scope: &str) -> Result<Self, CaError> {
        let open_one = |key: &str, role, cert: &str| -> Result<String, CaError> {
            if !seal::is_sealed(key) {
                return Ok(key.to_string());
            }
            let kek = kek.ok_or(CaError::NoKek(role))?;
            let plain = kek.open(key, &key_aad(scope, role, cert)).map_err(|source| CaError::Seal { role, source })?;
            String::from_utf8(plain).map_err(|_| CaError::Material(format!("the opened {role} key is not PEM")))
        };
        Ok(CaMaterial {
            root_key_pem: open_one(&self.root_key_pem, KeyRole::Root, &self.root_cert_pem)?,
            intermediate_key_pem: open_one(
                &self.intermediate_key_pem,
                KeyRole::Intermediate,
                &self.intermediate_cert_pem,
            )?,
            ..self.clone()
        })
    }

    /// Whether a private key is held here in clear (neither sealed nor in a token).
    pub fn has_clear_key(&self) -> bool {
        [&self.root_key_pem, &self.intermediate_key_pem].iter().any(|k| !seal::is_sealed(k) && !pkcs11::is_reference(k))
    }

    /// Whether a key is sealed.
    pub fn has_sealed_key(&self) -> bool {
        seal::is_sealed(&self.root_key_pem) || seal::is_sealed(&self.intermediate_key_pem)
    }

    /// Whether the signing (intermediate) key lives in a PKCS#11 token.
    pub fn signer_in_token(&self) -> bool {
        pkcs11::is_reference(&self.intermediate_key_pem)
    }
}

/// The associated data of a sealed key: format, place, role, and a digest of its certificate
/// (which names the trust domain and generation), so a sealed key opens only where it was put.
fn key_aad(scope: &str, role: KeyRole, cert_pem: &str) -> Vec<u8> {
    let cert_digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert_pem.trim().as_bytes());
    format!("palisade-ca-key-v1\n{scope}\n{role}\n{}", crate::hex::encode(cert_digest.as_ref())).into_bytes()
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
    issuer: Issuer<'static, CaKey>,
    material: CaMaterial,
}

impl CertificateAuthority {
    /// Loads a generation from its persisted PEM (keys in clear).
    pub fn load(material: CaMaterial) -> Result<Self, CaError> {
        Self::load_with(material, &KeyCustody::default())
    }

    /// Loads a generation whose keys are opened ([`CaMaterial::opened`]): PEM, or a reference
    /// to a key in the custody's token, which must be the key of the intermediate certificate.
    pub fn load_with(material: CaMaterial, custody: &KeyCustody) -> Result<Self, CaError> {
        let key = CaKey::load(&material.intermediate_key_pem, custody, KeyRole::Intermediate)?;
        if let CaKey::Token(token_key) = &key {
            let (_, pem) = x509_parser::pem::parse_x509_pem(material.intermediate_cert_pem.as_bytes())
                .map_err(|e| CaError::Material(format!("intermediate certificate: {e}")))?;
            let cert = pem.parse_x509().map_err(|e| CaError::Material(format!("intermediate certificate: {e}")))?;
            if cert.public_key().subject_public_key.data.as_ref() != token_key.der_bytes() {
                return Err(CaError::Material(format!(
                    "the token key {} is not the intermediate certificate's key",
                    token_key.reference()
                )));
            }
        }
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

    fn kek(byte: u8) -> Kek {
        Kek::from_bytes(&[byte; 32], "test").unwrap()
    }

    #[test]
    fn sealed_material_holds_no_key_and_opens_only_where_it_was_sealed() {
        let material = CaMaterial::generate("cluster.local", 1).unwrap();
        let sealed = material.sealed(&kek(1), "store generation 1");
        assert!(!sealed.has_clear_key() && sealed.has_sealed_key());
        assert!(!sealed.root_key_pem.contains("PRIVATE KEY") && !sealed.intermediate_key_pem.contains("PRIVATE KEY"));
        assert_eq!(sealed.root_cert_pem, material.root_cert_pem);
        // Sealing twice does not wrap a sealed key again.
        assert_eq!(sealed.sealed(&kek(1), "store generation 1").root_key_pem, sealed.root_key_pem);
        let opened = sealed.opened(Some(&kek(1)), "store generation 1").unwrap();
        assert_eq!(opened.intermediate_key_pem, material.intermediate_key_pem);
        CertificateAuthority::load(opened).unwrap();

        assert!(matches!(sealed.opened(None, "store generation 1"), Err(CaError::NoKek(KeyRole::Root))));
        let wrong = sealed.opened(Some(&kek(2)), "store generation 1").unwrap_err();
        assert!(matches!(wrong, CaError::Seal { role: KeyRole::Root, source: SealError::Refused }), "{wrong}");
        assert!(sealed.opened(Some(&kek(1)), "store generation 2").is_err(), "moved to another row");
        // The root's sealed key in the intermediate's place: bound to its role and certificate.
        let swapped = CaMaterial { intermediate_key_pem: sealed.root_key_pem.clone(), ..sealed.clone() };
        let err = swapped.opened(Some(&kek(1)), "store generation 1").unwrap_err();
        assert!(matches!(err, CaError::Seal { role: KeyRole::Intermediate, .. }), "{err}");
        // Another generation's sealed key under this generation's certificates does not open.
        let other = CaMaterial::generate("cluster.local", 2).unwrap().sealed(&kek(1), "store generation 1");
        let mixed = CaMaterial { intermediate_key_pem: other.intermediate_key_pem, ..sealed.clone() };
        assert!(mixed.opened(Some(&kek(1)), "store generation 1").is_err());
        // A sealed key is never mistaken for a PEM one.
        assert!(matches!(CertificateAuthority::load(sealed), Err(CaError::NoKek(KeyRole::Intermediate))));
    }

    #[test]
    fn a_token_reference_needs_the_token() {
        let material = CaMaterial {
            intermediate_key_pem: "pkcs11:token=t;object=o;id=%01".into(),
            ..CaMaterial::generate("cluster.local", 1).unwrap()
        };
        assert!(material.signer_in_token() && material.has_clear_key(), "the root is still in clear here");
        let err = CertificateAuthority::load(material.clone()).err().unwrap();
        assert!(matches!(err, CaError::NoToken(KeyRole::Intermediate)), "{err}");
        // References are not secrets: sealing leaves them readable.
        assert_eq!(material.sealed(&kek(1), "s").intermediate_key_pem, material.intermediate_key_pem);
    }

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
