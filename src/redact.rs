//! The one redaction rule every log that writes request data applies.
//!
//! A header or query parameter whose name contains (ignoring case) one of [`SECRET_WORDS`] has
//! its value replaced by [`REDACTED`]. The words cover the `Authorization` / `Proxy-Authorization`
//! / `Cookie` / `Set-Cookie` family and the usual home-made names (`X-Auth`, `Api-Key`,
//! `X-Session-Id`, `?access_token=`, `?password=`). Matching by substring redacts some harmless
//! names too (`x-author`); a log that hides a value it could have shown costs less than one that
//! leaks a credential.
//!
//! A leaf: policy (the decision log's input document) and telemetry (the access log) both use it,
//! and neither may import the other.

use std::borrow::Cow;

/// What a redacted value reads as.
pub const REDACTED: &str = "[redacted]";

/// Name fragments that mark a value as a credential, lower case.
pub const SECRET_WORDS: &[&str] =
    &["token", "secret", "password", "passwd", "session", "auth", "key", "credential", "cookie"];

/// Whether a header or query parameter of this name carries a credential. Case-insensitive;
/// allocates nothing.
pub fn is_secret(name: &str) -> bool {
    let name = name.as_bytes();
    SECRET_WORDS.iter().any(|word| name.windows(word.len()).any(|w| w.eq_ignore_ascii_case(word.as_bytes())))
}

/// A path with the values of its secret query parameters replaced by [`REDACTED`]; borrowed
/// when there is nothing to hide. Keys are judged percent-decoded (`access%5Ftoken` is
/// `access_token`).
pub fn query(path_and_query: &str) -> Cow<'_, str> {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return Cow::Borrowed(path_and_query);
    };
    let secret_key = |pair: &str| {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        is_secret(key) || (key.contains('%') && is_secret(&percent_decoded(key)))
    };
    if !query.split('&').any(|pair| pair.contains('=') && secret_key(pair)) {
        return Cow::Borrowed(path_and_query);
    }
    let mut out = String::with_capacity(path_and_query.len());
    out.push_str(path);
    out.push('?');
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((key, _)) if secret_key(pair) => {
                out.push_str(key);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(pair),
        }
    }
    Cow::Owned(out)
}

/// `%XX` decoding, enough to judge a name; a malformed escape stays as it is.
fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |at: usize| b.get(at).and_then(|c| (*c as char).to_digit(16));
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_headers_are_secret_in_any_case() {
        for name in [
            "authorization",
            "Authorization",
            "PROXY-AUTHORIZATION",
            "cookie",
            "Set-Cookie",
            "X-Auth",
            "x-auth-token",
            "Api-Key",
            "x-api-key",
            "X-Session-Id",
            "x-amz-security-token",
            "X-Client-Secret",
            "x-db-password",
            "X-Passwd",
            "x-credentials",
        ] {
            assert!(is_secret(name), "{name} must be redacted");
        }
        for name in ["host", "x-tenant", "accept", "content-type", "x-request-id", "user-agent", "x-trace"] {
            assert!(!is_secret(name), "{name} is not a credential");
        }
    }

    #[test]
    fn secret_query_values_are_replaced_and_the_rest_kept() {
        assert_eq!(query("/a?access_token=abc123"), "/a?access_token=[redacted]");
        assert_eq!(query("/login?user=bob&password=hunter2&next=/x"), "/login?user=bob&password=[redacted]&next=/x");
        assert_eq!(query("/a?Api_Key=k&SESSION=s&page=2"), "/a?Api_Key=[redacted]&SESSION=[redacted]&page=2");
        // A percent-encoded key is judged decoded.
        assert_eq!(query("/a?access%5Ftoken=abc"), "/a?access%5Ftoken=[redacted]");
        // Repeated keys, empty values and bare keys.
        assert_eq!(query("/a?token=1&token=&debug"), "/a?token=[redacted]&token=[redacted]&debug");
        for kept in ["/orders/7", "/search?q=token", "/a?limit=10&format=json", "/a?", "/token?x=1"] {
            assert!(matches!(query(kept), Cow::Borrowed(_)), "{kept} has nothing to hide");
        }
    }

    #[test]
    fn no_secret_survives_in_the_output() {
        let path = "/cb?code=ok&Refresh_Token=s3cret&X-Auth=s3cret&passwd=s3cret&credential=s3cret";
        let out = query(path);
        assert!(!out.contains("s3cret"), "{out}");
        assert!(out.contains("code=ok"), "{out}");
    }
}
