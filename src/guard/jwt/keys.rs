//! An issuer's public keys (a JWKS document) and the algorithms each one allows.
//!
//! The algorithm a token may use is decided by the key, never by the token alone: an RSA key
//! allows RS256/384/512 and PS256/384/512, a P-256 key ES256, a P-384 key ES384, an Ed25519 key
//! EdDSA, and a key whose JWK names an `alg` allows that one only. Symmetric keys (`kty: oct`)
//! are never used: anyone who can read a JWKS could mint tokens with them. So a token that says
//! `HS256` and was signed with the bytes of an RSA public key (the classic algorithm confusion)
//! finds no key that allows HMAC, and `none` is no algorithm at all.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// RSA keys below this many bits are refused (aws-lc-rs would refuse their signatures anyway).
const MIN_RSA_BITS: usize = 2048;

/// One usable public key of an issuer.
#[derive(Clone)]
pub(crate) struct VerifyingKey {
    /// The JWK's `kid`, matched against the token header's `kid`.
    pub kid: Option<String>,
    /// The algorithms this key verifies.
    pub algorithms: &'static [Algorithm],
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey").field("kid", &self.kid).field("algorithms", &self.algorithms).finish()
    }
}

impl VerifyingKey {
    /// Whether this key verifies tokens signed with `alg`.
    pub fn allows(&self, alg: Algorithm) -> bool {
        self.algorithms.contains(&alg)
    }
}

const RSA: &[Algorithm] =
    &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512, Algorithm::PS256, Algorithm::PS384, Algorithm::PS512];

/// The algorithms a token header may name: the asymmetric ones jsonwebtoken verifies. Anything
/// else (`none`, `HS*`, `ES512`, unknown) is refused before a key is looked at.
pub(crate) fn algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The usable keys of a JWKS document, and why each other key was left out. The document itself
/// must be JSON with a `keys` array.
pub(crate) fn parse_jwks(json: &str) -> Result<(Vec<VerifyingKey>, Vec<String>), String> {
    let doc: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let Some(keys) = doc.get("keys").and_then(|k| k.as_array()) else {
        return Err("not a JWKS document: no `keys` array".to_string());
    };
    let mut usable = Vec::new();
    let mut skipped = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let kid = key.get("kid").and_then(|k| k.as_str()).unwrap_or("");
        match verifying_key(key) {
            Ok(k) => usable.push(k),
            Err(why) => skipped.push(format!("keys[{i}] (kid {kid:?}): {why}")),
        }
    }
    Ok((usable, skipped))
}

/// Checks a JWKS document the control plane fetched or a user wrote inline: it must hold at least
/// one usable signing key. Returns how many it holds.
pub fn check_jwks(json: &str) -> Result<usize, String> {
    let (usable, skipped) = parse_jwks(json)?;
    if usable.is_empty() {
        let why = if skipped.is_empty() { "it has no keys".to_string() } else { skipped.join("; ") };
        return Err(format!("no usable signing key: {why}"));
    }
    Ok(usable.len())
}

fn verifying_key(value: &serde_json::Value) -> Result<VerifyingKey, String> {
    // A private key pasted into a JWKS would be pushed to every sidecar and stored in the CRD.
    if value.get("d").is_some() {
        return Err("holds private key material (`d`): publish the public key only".to_string());
    }
    let jwk: Jwk = serde_json::from_value(value.clone()).map_err(|e| format!("not a JWK: {e}"))?;
    if let Some(usage) = &jwk.common.public_key_use
        && *usage != PublicKeyUse::Signature
    {
        return Err("not a signing key (`use` is not `sig`)".to_string());
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Err("`key_ops` does not include `verify`".to_string());
    }
    let by_type: &'static [Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            let bits = modulus_bits(&p.n)?;
            if bits < MIN_RSA_BITS {
                return Err(format!("RSA key of {bits} bits (at least {MIN_RSA_BITS} needed)"));
            }
            RSA
        }
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            ref other => return Err(format!("EC key on curve {other:?}: only P-256 and P-384 are verified")),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
            ref other => return Err(format!("OKP key on curve {other:?}: only Ed25519 is verified")),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric key (`kty: oct`): HMAC tokens are never accepted".to_string());
        }
    };
    // A JWK that names its algorithm allows that one only, and only if its type agrees.
    let algorithms = match jwk.common.key_algorithm {
        None => by_type,
        Some(named) => {
            let Some(alg) = key_algorithm(named) else {
                return Err(format!("`alg` {named:?} is not accepted (asymmetric signatures only)"));
            };
            let Some(i) = by_type.iter().position(|a| *a == alg) else {
                return Err(format!("`alg` {named:?} does not fit the key's type"));
            };
            &by_type[i..=i]
        }
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable key material: {e}"))?;
    Ok(VerifyingKey { kid: jwk.common.key_id.clone(), algorithms, key })
}

fn key_algorithm(named: KeyAlgorithm) -> Option<Algorithm> {
    Some(match named {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The size of an RSA modulus given as base64url (`n` of a JWK).
fn modulus_bits(n: &str) -> Result<usize, String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(n.trim_end_matches('='))
        .map_err(|_| "RSA modulus is not base64url".to_string())?;
    let significant: Vec<u8> = bytes.into_iter().skip_while(|b| *b == 0).collect();
    Ok(significant.first().map_or(0, |b| (significant.len() - 1) * 8 + (8 - b.leading_zeros() as usize)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// RFC 7517 appendix A.1's RSA key.
    const N_2048: &str = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";

    #[test]
    fn the_key_decides_the_algorithms() {
        let (keys, skipped) = parse_jwks(
            &json!({"keys": [
                {"kty": "RSA", "kid": "r", "n": N_2048, "e": "AQAB"},
                {"kty": "RSA", "kid": "r-ps", "alg": "PS256", "use": "sig", "n": N_2048, "e": "AQAB"},
                {"kty": "EC", "kid": "e", "crv": "P-256",
                 "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
                {"kty": "OKP", "kid": "d", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            ]})
            .to_string(),
        )
        .unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        let algs = |kid: &str| keys.iter().find(|k| k.kid.as_deref() == Some(kid)).unwrap().algorithms;
        assert_eq!(algs("r"), RSA);
        assert_eq!(algs("r-ps"), &[Algorithm::PS256]);
        assert_eq!(algs("e"), &[Algorithm::ES256]);
        assert_eq!(algs("d"), &[Algorithm::EdDSA]);
        assert!(keys.iter().all(|k| !k.allows(Algorithm::HS256)), "no key ever allows HMAC");
    }

    #[test]
    fn unusable_keys_are_left_out_with_the_reason() {
        let (keys, skipped) = parse_jwks(
            &json!({"keys": [
                {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
                {"kty": "RSA", "kid": "small", "n": "AQAB", "e": "AQAB"},
                {"kty": "RSA", "kid": "enc", "use": "enc", "n": N_2048, "e": "AQAB"},
                {"kty": "RSA", "kid": "mismatch", "alg": "ES256", "n": N_2048, "e": "AQAB"},
                {"kty": "RSA", "kid": "hs", "alg": "HS256", "n": N_2048, "e": "AQAB"},
                {"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"},
                {"kty": "RSA", "kid": "private", "n": N_2048, "e": "AQAB", "d": "AQAB"},
            ]})
            .to_string(),
        )
        .unwrap();
        assert!(keys.is_empty(), "{keys:?}");
        let all = skipped.join("\n");
        for expect in
            ["symmetric", "17 bits", "`use`", "does not fit", "HS256 is not accepted", "only P-256", "private"]
        {
            assert!(all.contains(expect), "{expect}: {all}");
        }
        assert!(check_jwks(&json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).to_string()).is_err());
        assert!(check_jwks("{}").unwrap_err().contains("keys"));
        assert!(check_jwks("nope").unwrap_err().contains("JSON"));
        assert_eq!(check_jwks(&json!({"keys": [{"kty": "RSA", "n": N_2048, "e": "AQAB"}]}).to_string()), Ok(1));
    }

    #[test]
    fn only_asymmetric_algorithms_are_names_a_token_may_use() {
        for refused in ["none", "None", "HS256", "HS384", "HS512", "ES512", "", "RS1"] {
            assert_eq!(algorithm(refused), None, "{refused}");
        }
        assert_eq!(algorithm("RS256"), Some(Algorithm::RS256));
        assert_eq!(algorithm("EdDSA"), Some(Algorithm::EdDSA));
    }
}
