//! CA keys inside a hardware security module, reached through PKCS#11 (`cryptoki`).
//!
//! A key is generated in the token (EC P-256, sensitive, not extractable, a token object) and
//! named in the store by a PKCS#11 URI (RFC 7512 style: `pkcs11:token=…;object=…;id=%..`); the
//! store never holds its private part and neither does this process: signing is `C_Sign` with
//! `CKM_ECDSA` over a SHA-256 digest computed here, and the token's raw `r||s` answer is
//! re-encoded as the DER `ECDSA-Sig-Value` X.509 wants.

use std::path::Path;
use std::sync::Arc;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use parking_lot::Mutex;

/// The URI scheme of a key reference.
pub const URI_PREFIX: &str = "pkcs11:";

/// DER of the OID of P-256 (secp256r1), the `CKA_EC_PARAMS` of every key made here.
const P256_OID: [u8; 10] = [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];

/// A PKCS#11 failure, naming the step.
#[derive(Debug, thiserror::Error)]
pub enum Pkcs11Error {
    #[error("PKCS#11 {step}: {source}")]
    Call { step: String, source: cryptoki::error::Error },
    #[error("no PKCS#11 token labelled {0:?} in the module (initialise it, or check --ca-pkcs11-token)")]
    NoToken(String),
    #[error("no key {0} in the token (deleted, or another token?)")]
    NoKey(String),
    #[error("{0:?} is not a PKCS#11 key reference made by Palisade")]
    BadReference(String),
    #[error("the token answered with {0}")]
    Unexpected(String),
}

fn call(step: impl Into<String>) -> impl FnOnce(cryptoki::error::Error) -> Pkcs11Error {
    let step = step.into();
    move |source| Pkcs11Error::Call { step, source }
}

/// A logged-in session on one token. Sessions are not thread-safe in PKCS#11, so there is one,
/// behind a lock: signing CA certificates is rare enough that this is never the bottleneck.
pub struct Token {
    label: String,
    session: Mutex<Session>,
    // Keeps the module loaded and initialised as long as the session lives.
    _module: Pkcs11,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("label", &self.label).finish_non_exhaustive()
    }
}

impl Token {
    /// Loads `module`, finds the token labelled `label` and logs in as its user with `pin`.
    pub fn open(module: &Path, label: &str, pin: &str) -> Result<Arc<Self>, Pkcs11Error> {
        let pkcs11 = Pkcs11::new(module).map_err(call(format!("loading {}", module.display())))?;
        pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).map_err(call("C_Initialize"))?;
        let slot = find_slot(&pkcs11, label)?;
        let session = pkcs11.open_rw_session(slot).map_err(call("C_OpenSession"))?;
        session
            .login(UserType::User, Some(&AuthPin::new(pin.into())))
            .map_err(call(format!("C_Login to token {label:?}")))?;
        Ok(Arc::new(Token { label: label.to_string(), session: Mutex::new(session), _module: pkcs11 }))
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Generates an EC P-256 key pair inside the token, labelled `object`, and returns it.
    /// The private key is sensitive and never extractable: it cannot leave the token.
    pub fn generate_key(self: &Arc<Self>, object: &str) -> Result<TokenKey, Pkcs11Error> {
        let id: [u8; 16] = rand::random();
        let common = |private: bool| {
            vec![
                Attribute::Token(true),
                Attribute::Private(private),
                Attribute::Label(object.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
            ]
        };
        let mut public = common(false);
        public.extend([
            Attribute::KeyType(KeyType::EC),
            Attribute::Verify(true),
            Attribute::EcParams(P256_OID.to_vec()),
        ]);
        let mut private = common(true);
        private.extend([
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Derive(false),
        ]);
        let (pub_handle, priv_handle) = self
            .session
            .lock()
            .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
            .map_err(call(format!("C_GenerateKeyPair for {object}")))?;
        let point = self.ec_point(pub_handle)?;
        let uri = format!("{URI_PREFIX}token={};object={};id={}", pct(&self.label), pct(object), pct_bytes(&id));
        Ok(TokenKey { token: self.clone(), private: priv_handle, point, uri })
    }

    /// Finds the key a reference made by [`generate_key`](Self::generate_key) names.
    pub fn find_key(self: &Arc<Self>, reference: &str) -> Result<TokenKey, Pkcs11Error> {
        let id = reference_id(reference)?;
        let find = |class| -> Result<ObjectHandle, Pkcs11Error> {
            let found = self
                .session
                .lock()
                .find_objects(&[Attribute::Class(class), Attribute::Id(id.clone())])
                .map_err(call("C_FindObjects"))?;
            found.first().copied().ok_or_else(|| Pkcs11Error::NoKey(reference.to_string()))
        };
        let private = find(ObjectClass::PRIVATE_KEY)?;
        let point = self.ec_point(find(ObjectClass::PUBLIC_KEY)?)?;
        Ok(TokenKey { token: self.clone(), private, point, uri: reference.to_string() })
    }

    /// The public key's uncompressed point (0x04 || X || Y).
    fn ec_point(&self, public: ObjectHandle) -> Result<Vec<u8>, Pkcs11Error> {
        let attrs = self
            .session
            .lock()
            .get_attributes(public, &[AttributeType::EcPoint])
            .map_err(call("C_GetAttributeValue"))?;
        let Some(Attribute::EcPoint(der)) = attrs.into_iter().next() else {
            return Err(Pkcs11Error::Unexpected("no CKA_EC_POINT".into()));
        };
        // PKCS#11 wraps the point in a DER OCTET STRING; some modules give it bare.
        match der.as_slice() {
            [0x04, 0x41, rest @ ..] if rest.len() == 65 => Ok(rest.to_vec()),
            [0x04, ..] if der.len() == 65 => Ok(der),
            _ => Err(Pkcs11Error::Unexpected(format!("a CKA_EC_POINT of {} bytes, not a P-256 point", der.len()))),
        }
    }
}

fn find_slot(pkcs11: &Pkcs11, label: &str) -> Result<Slot, Pkcs11Error> {
    for slot in pkcs11.get_slots_with_initialized_token().map_err(call("C_GetSlotList"))? {
        let info = pkcs11.get_token_info(slot).map_err(call("C_GetTokenInfo"))?;
        if info.label().trim_end() == label {
            return Ok(slot);
        }
    }
    Err(Pkcs11Error::NoToken(label.to_string()))
}

/// Whether `value` names a key in a token rather than holding one.
pub fn is_reference(value: &str) -> bool {
    value.starts_with(URI_PREFIX)
}

/// The `CKA_ID` a reference names.
fn reference_id(reference: &str) -> Result<Vec<u8>, Pkcs11Error> {
    let bad = || Pkcs11Error::BadReference(reference.to_string());
    let attrs = reference.strip_prefix(URI_PREFIX).ok_or_else(bad)?;
    let id = attrs.split(';').find_map(|a| a.strip_prefix("id=")).ok_or_else(bad)?;
    let hex: Vec<u8> = id.bytes().filter(|&b| b != b'%').collect();
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return Err(bad());
    }
    hex.chunks(2)
        .map(|pair| std::str::from_utf8(pair).ok().and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)
}

/// The object label of a CA key: trust domain, generation and role.
pub fn object_label(trust_domain: &str, generation: u32, role: &str) -> String {
    format!("palisade:{trust_domain}:generation-{generation}:{role}")
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `:`.
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => (b as char).to_string(),
            _ => format!("%{b:02x}"),
        })
        .collect()
}

fn pct_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02x}")).collect()
}

/// A P-256 private key inside a token: rcgen signs certificates with it through `C_Sign`.
pub struct TokenKey {
    token: Arc<Token>,
    private: ObjectHandle,
    point: Vec<u8>,
    uri: String,
}

impl TokenKey {
    /// The reference the store keeps in place of the key.
    pub fn reference(&self) -> &str {
        &self.uri
    }
}

impl rcgen::PublicKeyData for TokenKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for TokenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg);
        let raw = self.token.session.lock().sign(&Mechanism::Ecdsa, self.private, digest.as_ref()).map_err(|e| {
            tracing::error!(key = %self.uri, error = %e, "the token refused to sign");
            rcgen::Error::RemoteKeyError
        })?;
        ecdsa_raw_to_der(&raw).ok_or(rcgen::Error::RemoteKeyError)
    }
}

/// Re-encodes a raw `r || s` ECDSA signature (32 + 32 bytes for P-256) as DER
/// `SEQUENCE { INTEGER r, INTEGER s }`.
fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) || raw.len() > 132 {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let int = |v: &[u8]| {
        let v = &v[v.iter().position(|&b| b != 0).unwrap_or(v.len() - 1)..];
        let mut out = vec![0x02];
        let pad = v[0] & 0x80 != 0;
        out.push((v.len() + pad as usize) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    };
    let body = [int(r), int(s)].concat();
    let mut der = vec![0x30];
    if body.len() >= 0x80 {
        der.push(0x81);
    }
    der.push(body.len() as u8);
    der.extend(body);
    Some(der)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    #[test]
    fn raw_signatures_become_der_that_verifies() {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let public =
            aws_lc_rs::signature::UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref().to_vec());
        // Enough signatures that some r or s have a high bit set or a leading zero byte.
        for i in 0..64u8 {
            let msg = [i; 40];
            let raw = key.sign(&rng, &msg).unwrap();
            let der = ecdsa_raw_to_der(raw.as_ref()).unwrap();
            public.verify(&msg, &der).unwrap_or_else(|_| panic!("signature {i} does not verify"));
        }
    }

    #[test]
    fn references_name_token_object_and_id() {
        assert_eq!(pct("palisade:cluster.local:generation-2:root"), "palisade:cluster.local:generation-2:root");
        assert_eq!(pct("my token"), "my%20token");
        let r = format!("{URI_PREFIX}token=t;object=o;id={}", pct_bytes(&[0xab, 0x01]));
        assert_eq!(reference_id(&r).unwrap(), vec![0xab, 0x01]);
        assert!(reference_id("pkcs11:token=t;object=o").is_err());
        assert!(reference_id("-----BEGIN PRIVATE KEY-----").is_err());
    }
}
