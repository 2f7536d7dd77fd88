//! A token read apart (JWS compact serialization, RFC 7515) and its claims checked (RFC 7519):
//! the steps that need no key.
//!
//! Nothing here trusts the token: the header is read only for `alg` (which must be one a key may
//! allow, see [`super::keys`]) and `kid`; `jku`, `x5u`, `jwk` and `x5c` are never looked at, so a
//! token cannot bring its own key. A `crit` header names extensions this verifier does not
//! implement, so such a token is refused (RFC 7515 §4.1.11).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use super::TokenError;

/// A token split into its parts, the header read, the claims decoded. Not yet verified.
#[derive(Debug)]
pub(crate) struct Parsed<'t> {
    pub alg: Algorithm,
    pub kid: Option<String>,
    pub claims: Map<String, Value>,
    /// `header.payload`, what the signature covers.
    pub message: &'t str,
    /// The signature, base64url.
    pub signature: &'t str,
}

fn decode_json(part: &str) -> Result<Map<String, Value>, TokenError> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(TokenError::Malformed),
    }
}

/// Splits and decodes a token. Anything but three base64url parts with JSON objects in the first
/// two is `malformed`; an algorithm no key may allow (`none`, `HS256`, ...) is
/// `disallowed-algorithm`.
pub(crate) fn parse(token: &str) -> Result<Parsed<'_>, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let head = decode_json(header)?;
    let alg = match head.get("alg") {
        Some(Value::String(name)) => super::keys::algorithm(name).ok_or(TokenError::DisallowedAlgorithm)?,
        _ => return Err(TokenError::Malformed),
    };
    if head.contains_key("crit") {
        return Err(TokenError::Malformed);
    }
    let kid = match head.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(TokenError::Malformed),
    };
    let claims = decode_json(payload)?;
    if signature.is_empty() || URL_SAFE_NO_PAD.decode(signature).is_err() {
        return Err(TokenError::Malformed);
    }
    let message = &token[..header.len() + 1 + payload.len()];
    Ok(Parsed { alg, kid, claims, message, signature })
}

/// A NumericDate claim: absent, or a number (seconds; fractions allowed).
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, TokenError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(|f| Some(f.floor() as i64)).ok_or(TokenError::Malformed),
        Some(_) => Err(TokenError::Malformed),
    }
}

/// Checks `exp`, `nbf` and `iat` at `now` with `skew` seconds of tolerance either way; returns
/// `exp + skew` (the last second the token counts), or `None` for a token without `exp`.
pub(crate) fn check_times(claims: &Map<String, Value>, now: i64, skew: i64) -> Result<Option<i64>, TokenError> {
    let exp = numeric_date(claims, "exp")?;
    if let Some(exp) = exp
        && now > exp.saturating_add(skew)
    {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = numeric_date(claims, "nbf")?
        && nbf > now.saturating_add(skew)
    {
        return Err(TokenError::NotYetValid);
    }
    if let Some(iat) = numeric_date(claims, "iat")?
        && iat > now.saturating_add(skew)
    {
        return Err(TokenError::IssuedInFuture);
    }
    Ok(exp.map(|e| e.saturating_add(skew)))
}

/// With `audiences` configured, the token's `aud` (a string or a list) must name one of them.
pub(crate) fn check_audience(claims: &Map<String, Value>, audiences: &[String]) -> Result<(), TokenError> {
    if audiences.is_empty() {
        return Ok(());
    }
    let named = |a: &str| audiences.iter().any(|want| want == a);
    let ok = match claims.get("aud") {
        Some(Value::String(a)) => named(a),
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).any(named),
        _ => false,
    };
    if ok { Ok(()) } else { Err(TokenError::WrongAudience) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn token(header: Value, claims: Value) -> String {
        format!("{}.{}.c2ln", b64(&header), b64(&claims))
    }

    #[test]
    fn a_well_formed_token_splits_into_what_the_signature_covers() {
        let t = token(json!({"alg": "RS256", "kid": "k1", "jku": "https://evil.test/keys"}), json!({"sub": "a"}));
        let p = parse(&t).unwrap();
        assert_eq!((p.alg, p.kid.as_deref()), (Algorithm::RS256, Some("k1")));
        assert_eq!(p.claims["sub"], "a");
        assert_eq!(format!("{}.{}", p.message, p.signature), t);
    }

    #[test]
    fn malformed_tokens_and_refused_algorithms() {
        let claims = json!({"sub": "a"});
        for bad in [
            "".to_string(),
            "abc".to_string(),
            "a.b".to_string(),
            "a.b.c.d.e".to_string(),
            "abc$$.def.ghi".to_string(),
            format!("{}.{}.", b64(&json!({"alg": "RS256"})), b64(&claims)),
            format!("{}.{}.c2ln", b64(&json!({"alg": "RS256"})), "bm90IGpzb24"),
            format!("{}.{}.c2ln", b64(&json!({"alg": "RS256"})), b64(&json!(["a"]))),
            format!("{}.{}.c2l=", b64(&json!({"alg": "RS256"})), b64(&claims)),
            token(json!({"kid": "k"}), claims.clone()),
            token(json!({"alg": "RS256", "kid": 7}), claims.clone()),
            token(json!({"alg": "RS256", "crit": ["exp"]}), claims.clone()),
        ] {
            assert_eq!(parse(&bad).unwrap_err(), TokenError::Malformed, "{bad}");
        }
        for alg in ["none", "HS256", "HS512", "ES512", "rs256"] {
            let t = token(json!({"alg": alg}), claims.clone());
            assert_eq!(parse(&t).unwrap_err(), TokenError::DisallowedAlgorithm, "{alg}");
        }
    }

    #[test]
    fn times_are_checked_with_the_skew() {
        let c = |v: Value| v.as_object().unwrap().clone();
        let now = 1_000_000;
        assert_eq!(check_times(&c(json!({})), now, 60), Ok(None));
        assert_eq!(check_times(&c(json!({"exp": now - 60})), now, 60), Ok(Some(now)));
        assert_eq!(check_times(&c(json!({"exp": now - 61})), now, 60), Err(TokenError::Expired));
        assert_eq!(check_times(&c(json!({"nbf": now + 60})), now, 60), Ok(None));
        assert_eq!(check_times(&c(json!({"nbf": now + 61})), now, 60), Err(TokenError::NotYetValid));
        assert_eq!(check_times(&c(json!({"iat": now + 61})), now, 60), Err(TokenError::IssuedInFuture));
        assert_eq!(check_times(&c(json!({"exp": "soon"})), now, 60), Err(TokenError::Malformed));
        assert_eq!(check_times(&c(json!({"exp": 1.5e6})), now, 60), Ok(Some(1_500_060)));
    }

    #[test]
    fn audiences_must_intersect_when_configured() {
        let c = |v: Value| v.as_object().unwrap().clone();
        let want = ["orders".to_string(), "billing".to_string()];
        assert_eq!(check_audience(&c(json!({"aud": "orders"})), &want), Ok(()));
        assert_eq!(check_audience(&c(json!({"aud": ["x", "billing"]})), &want), Ok(()));
        assert_eq!(check_audience(&c(json!({"aud": ["x"]})), &want), Err(TokenError::WrongAudience));
        assert_eq!(check_audience(&c(json!({})), &want), Err(TokenError::WrongAudience));
        assert_eq!(check_audience(&c(json!({})), &[]), Ok(()), "no audiences configured: any");
    }
}
