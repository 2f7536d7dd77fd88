//! End-user tokens (`guard::jwt`): the token as any bytes in `Authorization` and in a query
//! parameter, and (to get past the signature into claim checking) a header and claims the
//! fuzzer writes, signed with the rule's own key. Never panics; a token whose bytes the fuzzer
//! wrote freely is never accepted, since it cannot carry a valid signature.
#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue, Uri, header};
use libfuzzer_sys::fuzz_target;
use palisade::guard::jwt::{JwtGuard, JwtHeader, JwtRule, RequestAuthenticationSpec};

const ISS: &str = "https://issuer.example";
const NOW: i64 = 1_800_000_000;

struct Fixture {
    guard: JwtGuard,
    key: aws_lc_rs::signature::Ed25519KeyPair,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let pkcs8 =
            aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).unwrap();
        let key = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        use aws_lc_rs::signature::KeyPair as _;
        let jwks = serde_json::json!({"keys": [{"kty": "OKP", "kid": "k1", "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(key.public_key().as_ref())}]});
        let rule = JwtRule {
            issuer: ISS.into(),
            audiences: vec!["orders".into()],
            jwks: Some(jwks.to_string()),
            from_headers: vec![JwtHeader { name: "authorization".into(), prefix: Some("Bearer ".into()) }],
            from_params: vec!["access_token".into()],
            ..Default::default()
        };
        let guard =
            JwtGuard::compile(vec![RequestAuthenticationSpec { selector: None, jwt_rules: vec![rule] }]).unwrap();
        Fixture { guard, key }
    })
}

fn check(headers: &HeaderMap, uri: &Uri) -> Result<bool, palisade::guard::jwt::TokenError> {
    palisade::fuzzing::authenticate_at(&fixture().guard, headers, uri, NOW)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let f = fixture();
    match mode % 3 {
        // Any bytes as the bearer token.
        0 => {
            let mut value = b"Bearer ".to_vec();
            value.extend_from_slice(rest);
            let Ok(value) = HeaderValue::from_bytes(&value) else { return };
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value);
            assert!(!check(&headers, &Uri::from_static("/orders")).unwrap_or(false), "an unsigned token was accepted");
        }
        // Any bytes as the query string.
        1 => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            let Ok(uri) = format!("/orders?{text}").parse::<Uri>() else { return };
            assert!(!check(&HeaderMap::new(), &uri).unwrap_or(false), "an unsigned token was accepted");
        }
        // A header and claims the fuzzer writes (split at the first 0xff), really signed.
        _ => {
            let (head, claims) = match rest.iter().position(|&b| b == 0xff) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (&br#"{"alg":"EdDSA","kid":"k1"}"#[..], rest),
            };
            let mut token = format!("{}.{}", URL_SAFE_NO_PAD.encode(head), URL_SAFE_NO_PAD.encode(claims));
            let signature = f.key.sign(token.as_bytes());
            token.push('.');
            token.push_str(&URL_SAFE_NO_PAD.encode(signature.as_ref()));
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
            if check(&headers, &Uri::from_static("/orders")).unwrap_or(false) {
                // Accepted: then its claims were an object naming our issuer and audience, and
                // it was valid at NOW.
                let claims: serde_json::Value = serde_json::from_slice(claims).expect("accepted claims are JSON");
                assert_eq!(claims["iss"], ISS);
                if let Some(exp) = claims["exp"].as_f64() {
                    assert!(exp + 60.0 >= NOW as f64, "accepted after exp: {claims}");
                }
            }
        }
    }
});
