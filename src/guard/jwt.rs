//! `RequestAuthentication`: end-user tokens (JWT) verified at the sidecar, with Istio's
//! semantics.
//!
//! - A request that carries a token in a place a rule reads (`fromHeaders`, `fromParams`;
//!   default `Authorization: Bearer` and `?access_token=`) must carry a valid one: signed by a
//!   key of the rule whose `issuer` is the token's `iss` ([`keys`] says which algorithms a key
//!   allows), within `exp`/`nbf`/`iat` give or take [`CLOCK_SKEW_SECS`], for one of the rule's
//!   `audiences` when it has any. Otherwise it is refused with 401 and a short reason
//!   ([`TokenError`]); the token itself is never logged.
//! - A request without a token passes with no request principal: authorization decides.
//! - Two different tokens in one request are refused (`multiple-tokens`): which user is
//!   calling must not depend on which one a reader looks at first.
//! - The sidecar never fetches keys: a rule's `jwksUri` is fetched by the control plane, which
//!   sends the document in `jwks` with the snapshot. A token refused `unknown-kid` leaves its
//!   issuer in [`UnknownKidHints`], which the sidecar reports so the control plane fetches
//!   that `jwksUri` again at once (rate-limited) rather than at its next refresh.
//! - A verified token is remembered ([`cache`]) until it expires, so a repeat costs a lookup.
//! - Before the request goes on ([`JwtGuard::for_app`]), the token is removed unless
//!   `forwardOriginalToken`, and the `outputClaimToHeaders` headers are set by the sidecar
//!   (any copy of them the caller sent is removed first, token or not).
//!
//! The spec types are the schema of the CRD and of the wire (the CRD in `k8s::crd` wraps them).

pub mod cache;
pub mod keys;
mod token;

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use self::cache::{TokenCache, Verified};
use self::keys::VerifyingKey;
use super::Refusal;
use crate::policy::input::RequestAuth;
use crate::policy::resource::WorkloadSelector;
use crate::telemetry::unknown_kid::UnknownKidHints;

pub use self::keys::check_jwks;

/// Tolerance for `exp`, `nbf` and `iat` against this host's clock.
pub const CLOCK_SKEW_SECS: i64 = 60;
/// Largest token looked at; a larger one is refused (`too-large`) before it is parsed.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// How long a verified token without `exp` is remembered.
const NO_EXP_CACHE_SECS: i64 = 300;
/// Distinct places tokens may be read from, over every rule of a workload.
const MAX_LOCATIONS: usize = 64;

/// Where a JWT is read from: a header, and the prefix before the token in its value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtHeader {
    pub name: String,
    /// E.g. `"Bearer "`; compared without regard to case. A value without it carries no token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// A claim of the verified token copied into a request header for the app.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimToHeader {
    /// The header the app receives; one the caller sent is removed first.
    pub header: String,
    /// The claim (`a.b` for a nested one): a string, number or boolean, or a list of them
    /// (joined with `,`).
    pub claim: String,
}

/// One trusted token issuer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    /// The token's `iss` must be exactly this.
    pub issuer: String,
    /// When given, the token's `aud` must name one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the issuer's keys are published (HTTPS). Fetched by the control plane, never by a
    /// sidecar; it sends the document to sidecars as `jwks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The keys inline, as a JWKS document. Give this or `jwksUri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Headers a token is read from. Without these and `fromParams`: `Authorization: Bearer`
    /// and the `access_token` query parameter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters a token is read from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    /// Pass the token on to the app (default: it is removed once verified).
    #[serde(default)]
    pub forward_original_token: bool,
    /// Claims the app receives as headers, set by the sidecar.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
}

/// End-user (JWT) authentication of requests to the selected workloads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    pub jwt_rules: Vec<JwtRule>,
}

/// Why a token was refused: the reason in the 401, the access log and
/// `palisade_guard_refusals_total{guard="jwt"}`. Never carries the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed")]
    Malformed,
    #[error("too-large")]
    TooLarge,
    #[error("disallowed-algorithm")]
    DisallowedAlgorithm,
    #[error("wrong-issuer")]
    WrongIssuer,
    #[error("no-keys")]
    NoKeys,
    #[error("unknown-kid")]
    UnknownKid,
    #[error("bad-signature")]
    BadSignature,
    #[error("expired")]
    Expired,
    #[error("not-yet-valid")]
    NotYetValid,
    #[error("issued-in-future")]
    IssuedInFuture,
    #[error("wrong-audience")]
    WrongAudience,
    #[error("multiple-tokens")]
    MultipleTokens,
}

impl TokenError {
    /// The reason as a label.
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::TooLarge => "too-large",
            TokenError::DisallowedAlgorithm => "disallowed-algorithm",
            TokenError::WrongIssuer => "wrong-issuer",
            TokenError::NoKeys => "no-keys",
            TokenError::UnknownKid => "unknown-kid",
            TokenError::BadSignature => "bad-signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not-yet-valid",
            TokenError::IssuedInFuture => "issued-in-future",
            TokenError::WrongAudience => "wrong-audience",
            TokenError::MultipleTokens => "multiple-tokens",
        }
    }
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Self {
        Refusal::InvalidToken { reason: e.reason() }
    }
}

/// A place tokens are read from.
#[derive(Debug, Clone, PartialEq)]
enum Place {
    Header { name: HeaderName, prefix: String },
    Param(String),
}

/// A place, and the rules that read tokens there.
#[derive(Debug)]
struct Location {
    place: Place,
    rules: Vec<usize>,
}

/// One `jwtRules` entry, compiled.
#[derive(Debug)]
struct CompiledRule {
    issuer: String,
    audiences: Vec<String>,
    keys: Vec<VerifyingKey>,
    forward_original_token: bool,
    output: Vec<(HeaderName, String)>,
}

/// The verified end user of a request, and what [`JwtGuard::for_app`] needs to prepare the
/// request for the app.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// Who the token proves.
    pub auth: Arc<RequestAuth>,
    /// Whether a remembered verification answered (no signature was checked).
    pub cached: bool,
    rule: usize,
    /// The locations (bits) the token was found at.
    found_at: u64,
}

/// The compiled `RequestAuthentication` rules that select one workload. Empty: no token is
/// looked at, and requests carry no request principal.
#[derive(Debug, Default)]
pub struct JwtGuard {
    specs: Vec<RequestAuthenticationSpec>,
    rules: Vec<CompiledRule>,
    locations: Vec<Location>,
    /// Every `outputClaimToHeaders` header: only the sidecar sets them.
    output_headers: Vec<HeaderName>,
    cache: TokenCache,
}

/// Headers a claim may not be written to: the sidecar's own, and those that frame the request.
fn reserved_header(name: &str) -> bool {
    name.starts_with("x-palisade-")
        || name.starts_with(':')
        || matches!(
            name,
            "x-forwarded-client-cert"
                | "host"
                | "content-length"
                | "content-type"
                | "transfer-encoding"
                | "connection"
                | "keep-alive"
                | "te"
                | "trailer"
                | "upgrade"
                | "proxy-connection"
        )
}

fn header_name(name: &str, field: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("{field}: {name:?} is not a header name"))
}

impl JwtGuard {
    /// Compiles the specs selecting a workload. An inline `jwks` must hold a usable signing
    /// key; a rule with only a `jwksUri` compiles with no keys until the control plane sends
    /// them (its tokens are refused with `no-keys` meanwhile).
    pub fn compile(specs: Vec<RequestAuthenticationSpec>) -> Result<Self, String> {
        let mut guard = JwtGuard::default();
        for (s, spec) in specs.iter().enumerate() {
            for (r, rule) in spec.jwt_rules.iter().enumerate() {
                let base =
                    if specs.len() == 1 { format!("spec.jwtRules[{r}]") } else { format!("spec[{s}].jwtRules[{r}]") };
                guard.add_rule(rule, &base)?;
            }
        }
        guard.specs = specs;
        Ok(guard)
    }

    fn add_rule(&mut self, rule: &JwtRule, base: &str) -> Result<(), String> {
        if rule.issuer.trim().is_empty() {
            return Err(format!("{base}.issuer: must not be empty"));
        }
        let keys = match (&rule.jwks, &rule.jwks_uri) {
            (Some(jwks), _) => {
                check_jwks(jwks).map_err(|e| format!("{base}.jwks: {e}"))?;
                keys::parse_jwks(jwks).map_err(|e| format!("{base}.jwks: {e}"))?.0
            }
            (None, Some(uri)) => {
                check_jwks_uri(uri).map_err(|e| format!("{base}.jwksUri: {e}"))?;
                Vec::new()
            }
            (None, None) => {
                return Err(format!("{base}: issuer {:?} has neither jwksUri nor jwks", rule.issuer));
            }
        };
        let mut output = Vec::new();
        for (i, o) in rule.output_claim_to_headers.iter().enumerate() {
            let field = format!("{base}.outputClaimToHeaders[{i}]");
            let name = header_name(&o.header, &format!("{field}.header"))?;
            if reserved_header(name.as_str()) {
                return Err(format!("{field}.header: {name} is set by the sidecar or frames the request"));
            }
            if o.claim.trim().is_empty() {
                return Err(format!("{field}.claim: must not be empty"));
            }
            if !self.output_headers.contains(&name) {
                self.output_headers.push(name.clone());
            }
            output.push((name, o.claim.trim().to_string()));
        }
        let mut places = Vec::new();
        for (i, h) in rule.from_headers.iter().enumerate() {
            let name = header_name(&h.name, &format!("{base}.fromHeaders[{i}].name"))?;
            places.push(Place::Header { name, prefix: h.prefix.clone().unwrap_or_default() });
        }
        for (i, p) in rule.from_params.iter().enumerate() {
            if p.trim().is_empty() {
                return Err(format!("{base}.fromParams[{i}]: must not be empty"));
            }
            places.push(Place::Param(p.trim().to_string()));
        }
        if places.is_empty() {
            places.push(Place::Header { name: http::header::AUTHORIZATION, prefix: "Bearer ".into() });
            places.push(Place::Param("access_token".into()));
        }
        let index = self.rules.len();
        for place in places {
            if let Some(l) = self.locations.iter_mut().find(|l| l.place == place) {
                l.rules.push(index);
            } else if self.locations.len() < MAX_LOCATIONS {
                self.locations.push(Location { place, rules: vec![index] });
            } else {
                return Err(format!("{base}: more than {MAX_LOCATIONS} token locations"));
            }
        }
        self.rules.push(CompiledRule {
            issuer: rule.issuer.clone(),
            audiences: rule.audiences.clone(),
            keys,
            forward_original_token: rule.forward_original_token,
            output,
        });
        Ok(())
    }

    /// The specs it was compiled from.
    pub fn specs(&self) -> &[RequestAuthenticationSpec] {
        &self.specs
    }

    /// Whether any rule is in force.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// How many verified tokens are remembered.
    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    /// The end user of the request's token: `Ok(None)` when it carries none, `Err` when it
    /// carries an invalid one (or two different ones).
    pub fn authenticate(&self, headers: &HeaderMap, uri: &Uri) -> Result<Option<Authenticated>, Refusal> {
        self.authenticate_at(headers, uri, crate::clock::now_unix()).map_err(Refusal::from)
    }

    pub(crate) fn authenticate_at<'r>(
        &self,
        headers: &'r HeaderMap,
        uri: &'r Uri,
        now: i64,
    ) -> Result<Option<Authenticated>, TokenError> {
        if self.rules.is_empty() {
            return Ok(None);
        }
        // The token is read where it lies (a header value, or the query unless percent-encoded),
        // as bytes: a remembered token is found without checking it is text (it was when it was
        // verified, and a hit is the same bytes); a new one is checked when it is parsed.
        let mut found: Option<(Cow<'r, [u8]>, usize)> = None;
        let mut found_at = 0u64;
        for (i, location) in self.locations.iter().enumerate() {
            let mut each = |token: Cow<'r, [u8]>| -> Result<(), TokenError> {
                match &found {
                    Some((first, _)) if *first != token => return Err(TokenError::MultipleTokens),
                    Some(_) => {}
                    None => found = Some((token, i)),
                }
                found_at |= 1 << i;
                Ok(())
            };
            match &location.place {
                Place::Header { name, prefix } => {
                    for value in headers.get_all(name) {
                        if let Some(token) = strip_prefix(value.as_bytes(), prefix) {
                            each(Cow::Borrowed(token))?;
                        }
                    }
                }
                Place::Param(name) => {
                    for token in query_values(uri.query().unwrap_or(""), name) {
                        each(match token {
                            Cow::Borrowed(t) => Cow::Borrowed(t.as_bytes()),
                            Cow::Owned(t) => Cow::Owned(t.into_bytes()),
                        })?;
                    }
                }
            }
        }
        let Some((token, location)) = found else { return Ok(None) };
        let (auth, rule, cached) = self.verify(&token, &self.locations[location].rules, now)?;
        Ok(Some(Authenticated { auth, cached, rule, found_at }))
    }

    /// Verifies one token for the rules that read it where it was found; remembered
    /// verifications answer first.
    fn verify(&self, token: &[u8], rules: &[usize], now: i64) -> Result<(Arc<RequestAuth>, usize, bool), TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        if let Some(hit) = self.cache.get(token, now)
            && rules.contains(&hit.rule)
        {
            return Ok((hit.auth.clone(), hit.rule, true));
        }
        // UTF-8 is checked a word at a time (`to_str`'s visible-ASCII check went byte by byte);
        // a token that is not base64url is refused when parsed.
        let text = std::str::from_utf8(token).map_err(|_| TokenError::Malformed)?;
        let parsed = token::parse(text)?;
        let issuer = parsed.claims.get("iss").and_then(Value::as_str).ok_or(TokenError::WrongIssuer)?;
        let mut first_error = None;
        for &r in rules.iter().filter(|&&r| self.rules[r].issuer == issuer) {
            match self.rules[r].verify(&parsed, now) {
                Ok(valid_until) => {
                    let auth = Arc::new(RequestAuth::from_claims(parsed.claims));
                    let valid_until = valid_until.unwrap_or(now + NO_EXP_CACHE_SECS);
                    let verified = Arc::new(Verified { auth: auth.clone(), rule: r, valid_until });
                    self.cache.insert(token, verified, now);
                    return Ok((auth, r, false));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if first_error == Some(TokenError::UnknownKid) {
            // Perhaps the issuer rotated its keys: ask the control plane to fetch them now.
            UnknownKidHints::global().record(issuer, std::time::Instant::now());
        }
        Err(first_error.unwrap_or(TokenError::WrongIssuer))
    }

    /// Prepares a request for the app after [`JwtGuard::authenticate`]: removes every
    /// `outputClaimToHeaders` header the caller sent; with a verified token, removes the token
    /// (unless its rule forwards it) and sets the claim headers.
    pub fn for_app(
        &self,
        verified: Option<&Authenticated>,
        headers: &mut HeaderMap,
        uri: &mut Uri,
    ) -> Result<(), Refusal> {
        if self.rules.is_empty() {
            return Ok(());
        }
        for name in &self.output_headers {
            headers.remove(name);
        }
        let Some(v) = verified else { return Ok(()) };
        let rule = &self.rules[v.rule];
        if !rule.forward_original_token {
            let mut params = Vec::new();
            let found = self.locations.iter().enumerate().filter(|(i, _)| v.found_at & (1 << i) != 0);
            for (_, location) in found {
                match &location.place {
                    Place::Header { name, .. } => {
                        headers.remove(name);
                    }
                    Place::Param(name) => params.push(name.as_str()),
                }
            }
            if !params.is_empty() {
                *uri = without_params(uri, &params).ok_or(Refusal::BadRequest { rule: "unparsable" })?;
            }
        }
        for (name, claim) in &rule.output {
            if let Some(value) = claim_value(&v.auth.claims, claim).and_then(|s| HeaderValue::from_str(&s).ok()) {
                headers.insert(name.clone(), value);
            }
        }
        Ok(())
    }
}

impl CompiledRule {
    /// Signature, then times, then audience; returns the last second the token counts.
    fn verify(&self, t: &token::Parsed<'_>, now: i64) -> Result<Option<i64>, TokenError> {
        if self.keys.is_empty() {
            return Err(TokenError::NoKeys);
        }
        let by_kid: Vec<&VerifyingKey> = match &t.kid {
            Some(kid) => self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid.as_str())).collect(),
            None => self.keys.iter().collect(),
        };
        if by_kid.is_empty() {
            return Err(TokenError::UnknownKid);
        }
        let mut allowed = by_kid.into_iter().filter(|k| k.allows(t.alg)).peekable();
        if allowed.peek().is_none() {
            return Err(TokenError::DisallowedAlgorithm);
        }
        let signed = allowed
            .any(|k| jsonwebtoken::crypto::verify(t.signature, t.message.as_bytes(), &k.key, t.alg).unwrap_or(false));
        if !signed {
            return Err(TokenError::BadSignature);
        }
        let valid_until = token::check_times(&t.claims, now, CLOCK_SKEW_SECS)?;
        token::check_audience(&t.claims, &self.audiences)?;
        Ok(valid_until)
    }
}

/// `jwksUri` must be an absolute `https://` URL with a host.
fn check_jwks_uri(uri: &str) -> Result<(), String> {
    let parsed: Uri = uri.parse().map_err(|e| format!("{uri:?} is not a URL: {e}"))?;
    if parsed.scheme_str() != Some("https") {
        return Err(format!("{uri:?} must be an https:// URL"));
    }
    if parsed.host().is_none_or(str::is_empty) {
        return Err(format!("{uri:?} has no host"));
    }
    Ok(())
}

/// The token after `prefix` (compared without regard to ASCII case), if the value starts with
/// it and something follows.
fn strip_prefix<'v>(value: &'v [u8], prefix: &str) -> Option<&'v [u8]> {
    let head = value.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix.as_bytes()) {
        return None;
    }
    let token = value[prefix.len()..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Every value of query parameter `name`, percent-decoded.
fn query_values<'q>(query: &'q str, name: &str) -> impl Iterator<Item = Cow<'q, str>> {
    query.split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name && !v.is_empty()).then(|| percent_decoded(v))
    })
}

fn percent_decoded(v: &str) -> Cow<'_, str> {
    if !v.contains('%') {
        return Cow::Borrowed(v);
    }
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// `uri` without the query parameters named in `params`.
fn without_params(uri: &Uri, params: &[&str]) -> Option<Uri> {
    let query = uri.query()?;
    let kept: Vec<&str> =
        query.split('&').filter(|pair| !params.contains(&pair.split_once('=').map_or(*pair, |(k, _)| k))).collect();
    let path_and_query =
        if kept.is_empty() { uri.path().to_string() } else { format!("{}?{}", uri.path(), kept.join("&")) };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// A claim as header text: top level, else by a dotted path; lists joined with `,`.
fn claim_value(claims: &serde_json::Map<String, Value>, claim: &str) -> Option<String> {
    let value = claims.get(claim).or_else(|| {
        let mut parts = claim.split('.');
        let mut at = claims.get(parts.next()?)?;
        for p in parts {
            at = at.as_object()?.get(p)?;
        }
        Some(at)
    })?;
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    match value {
        Value::Array(items) => Some(items.iter().filter_map(scalar).collect::<Vec<_>>().join(",")),
        v => scalar(v),
    }
}

/// `palisade policy eval|explain --request` with a `jwt.token`: verifies the token as a sidecar
/// would, by the `RequestAuthentication` documents (inline `jwks` only: nothing is fetched
/// offline) found under `policies`.
pub fn verify_offline(policies: &Path, token: &str) -> Result<RequestAuth, String> {
    let mut specs = Vec::new();
    let files = crate::policy::load::yaml_files(policies).map_err(|(p, e)| format!("{}: {e}", p.display()))?;
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let Ok(value) = serde_yaml::Value::deserialize(doc) else { continue };
            if value.get("kind").and_then(|k| k.as_str()) != Some("RequestAuthentication") {
                continue;
            }
            let spec = value.get("spec").cloned().unwrap_or_default();
            let spec: RequestAuthenticationSpec =
                serde_yaml::from_value(spec).map_err(|e| format!("{}: RequestAuthentication: {e}", file.display()))?;
            specs.push(spec);
        }
    }
    if specs.is_empty() {
        return Err(format!("no RequestAuthentication under {} to verify the token with", policies.display()));
    }
    let guard = JwtGuard::compile(specs).map_err(|e| format!("RequestAuthentication: {e}"))?;
    let mut headers = HeaderMap::new();
    let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| "the token is not header text")?;
    headers.insert(http::header::AUTHORIZATION, value);
    match guard.authenticate_at(&headers, &Uri::from_static("/"), crate::clock::now_unix()) {
        Ok(Some(v)) => Ok(RequestAuth::clone(&v.auth)),
        Ok(None) => Err("no RequestAuthentication reads tokens from `Authorization: Bearer`".to_string()),
        Err(TokenError::NoKeys) => {
            Err("token refused: no-keys (a jwksUri is not fetched offline: give the keys as `jwks`)".to_string())
        }
        Err(e) => Err(format!("token refused: {e}")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair as _;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::json;
    use std::sync::OnceLock;

    const ISS: &str = "https://id.test";
    const NOW: i64 = 1_800_000_000;

    /// A signing key and its public JWK.
    pub(crate) struct TestKey {
        pub encoding: EncodingKey,
        pub jwk: serde_json::Value,
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The contents of the DER element at the start of `input`, and what follows it.
    fn der(input: &[u8]) -> (&[u8], &[u8]) {
        let (mut len, mut off) = (usize::from(input[1]), 2);
        if len & 0x80 != 0 {
            let n = len & 0x7f;
            len = input[2..2 + n].iter().fold(0, |acc, b| (acc << 8) | usize::from(*b));
            off = 2 + n;
        }
        (&input[off..off + len], &input[off + len..])
    }

    fn rsa(kid: &str) -> TestKey {
        let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = key.as_der().unwrap();
        // PrivateKeyInfo { version, algorithm, privateKey OCTET STRING { RSAPrivateKey } }
        let (info, _) = der(pkcs8.as_ref());
        let (_, rest) = der(info);
        let (_, rest) = der(rest);
        let (pkcs1, _) = der(rest);
        let public = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(key.public_key());
        TestKey {
            encoding: EncodingKey::from_rsa_der(pkcs1),
            jwk: json!({"kty": "RSA", "kid": kid, "n": b64(&public.n), "e": b64(&public.e)}),
        }
    }

    fn ec(kid: &str) -> TestKey {
        let alg = &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 =
            aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(alg, &aws_lc_rs::rand::SystemRandom::new()).unwrap();
        let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref()).unwrap();
        let point = pair.public_key().as_ref();
        TestKey {
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({"kty": "EC", "kid": kid, "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..])}),
        }
    }

    fn ed(kid: &str) -> TestKey {
        let pkcs8 =
            aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).unwrap();
        let pair = aws_lc_rs::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        TestKey {
            encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
            jwk: json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": b64(pair.public_key().as_ref())}),
        }
    }

    /// RSA keys are slow to make: these are made once.
    fn keys() -> &'static (TestKey, TestKey, TestKey, TestKey) {
        static KEYS: OnceLock<(TestKey, TestKey, TestKey, TestKey)> = OnceLock::new();
        KEYS.get_or_init(|| (rsa("r1"), rsa("r1"), ec("e1"), ed("d1")))
    }

    fn sign(key: &TestKey, alg: Algorithm, kid: Option<&str>, claims: serde_json::Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap()
    }

    fn claims() -> serde_json::Value {
        json!({"iss": ISS, "sub": "alice", "aud": "orders", "exp": NOW + 600, "iat": NOW - 10,
               "azp": "web-app", "scope": "orders:read orders:write"})
    }

    fn jwks(keys: &[&TestKey]) -> String {
        json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
    }

    fn guard_with(rule: JwtRule) -> JwtGuard {
        JwtGuard::compile(vec![RequestAuthenticationSpec { selector: None, jwt_rules: vec![rule] }]).unwrap()
    }

    fn guard() -> JwtGuard {
        let (r1, _, e1, d1) = keys();
        guard_with(JwtRule {
            issuer: ISS.into(),
            audiences: vec!["orders".into()],
            jwks: Some(jwks(&[r1, e1, d1])),
            ..Default::default()
        })
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
        h
    }

    fn check(g: &JwtGuard, token: &str) -> Result<Option<Authenticated>, TokenError> {
        g.authenticate_at(&bearer(token), &Uri::from_static("/orders"), NOW)
    }

    fn refused(g: &JwtGuard, token: &str) -> TokenError {
        check(g, token).expect_err("refused")
    }

    #[test]
    fn a_valid_token_of_each_key_type_proves_its_end_user() {
        let (r1, _, e1, d1) = keys();
        let g = guard();
        for (key, alg) in
            [(r1, Algorithm::RS256), (r1, Algorithm::PS384), (e1, Algorithm::ES256), (d1, Algorithm::EdDSA)]
        {
            let kid = key.jwk["kid"].as_str();
            let v = check(&g, &sign(key, alg, kid, claims())).unwrap().expect("verified");
            assert_eq!(v.auth.principal, "https://id.test/alice", "{alg:?}");
            assert_eq!(v.auth.audiences, ["orders"]);
            assert_eq!(v.auth.presenter.as_deref(), Some("web-app"));
            assert_eq!(v.auth.claims["scope"], "orders:read orders:write");
            assert!(!v.cached);
        }
        // Without a kid every key of the issuer is tried.
        assert!(check(&g, &sign(e1, Algorithm::ES256, None, claims())).unwrap().is_some());
        // No token: no end user, and policy decides.
        assert!(g.authenticate_at(&HeaderMap::new(), &Uri::from_static("/"), NOW).unwrap().is_none());
        let mut basic = HeaderMap::new();
        basic.insert(http::header::AUTHORIZATION, HeaderValue::from_static("Basic YTpi"));
        assert!(g.authenticate_at(&basic, &Uri::from_static("/"), NOW).unwrap().is_none(), "not a bearer token");
    }

    #[test]
    fn a_repeated_token_is_answered_from_the_cache() {
        let (r1, ..) = keys();
        let g = guard();
        let token = sign(r1, Algorithm::RS256, Some("r1"), claims());
        assert!(!check(&g, &token).unwrap().unwrap().cached);
        let again = check(&g, &token).unwrap().unwrap();
        assert!(again.cached);
        assert_eq!(again.auth.principal, "https://id.test/alice");
        assert_eq!(g.cached_tokens(), 1);
        // The remembered signature under a payload nobody signed is verified afresh, and refused.
        let (head, rest) = token.split_once('.').unwrap();
        let sig = rest.split_once('.').unwrap().1;
        let forged = b64(json!({"iss": ISS, "sub": "admin", "aud": "orders", "exp": NOW + 600}).to_string().as_bytes());
        assert_eq!(check(&g, &format!("{head}.{forged}.{sig}")).unwrap_err(), TokenError::BadSignature);
        // The cache keeps no token past its expiry.
        let late = g.authenticate_at(&bearer(&token), &Uri::from_static("/"), NOW + 600 + CLOCK_SKEW_SECS + 1);
        assert_eq!(late.unwrap_err(), TokenError::Expired);
        // Refusals are not remembered.
        let _ = check(&g, &sign(r1, Algorithm::RS256, Some("r1"), json!({"iss": ISS, "aud": "x"})));
        assert_eq!(g.cached_tokens(), 0);
    }

    #[test]
    fn algorithm_confusion_and_unsigned_tokens_are_refused() {
        let (r1, ..) = keys();
        let g = guard();
        let head = |h: serde_json::Value| b64(h.to_string().as_bytes());
        let body = b64(claims().to_string().as_bytes());
        let none = format!("{}.{body}.", head(json!({"alg": "none", "kid": "r1"})));
        assert_eq!(refused(&g, &none), TokenError::DisallowedAlgorithm, "the classic unsigned form");
        let none = format!("{}.{body}.c2ln", head(json!({"alg": "none", "kid": "r1"})));
        assert_eq!(refused(&g, &none), TokenError::DisallowedAlgorithm);
        // HS256 keyed with the RSA public key's bytes, as a confused verifier would check it.
        let public = r1.jwk["n"].as_str().unwrap().as_bytes();
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("r1".into());
        let hs = jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_secret(public)).unwrap();
        assert_eq!(refused(&g, &hs), TokenError::DisallowedAlgorithm);
        // An algorithm the named key does not allow: an RSA signature under the EC key's kid.
        assert_eq!(refused(&g, &sign(r1, Algorithm::RS256, Some("e1"), claims())), TokenError::DisallowedAlgorithm);
        // A key in the token header is no key source.
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some("attacker".into());
        h.jku = Some("https://evil.test/keys".into());
        let own_key = jsonwebtoken::encode(&h, &claims(), &r1.encoding).unwrap();
        assert_eq!(refused(&g, &own_key), TokenError::UnknownKid);
    }

    #[test]
    fn each_claim_rule_has_its_reason() {
        let (r1, other, ..) = keys();
        let g = guard();
        let with = |patch: serde_json::Value| {
            let mut c = claims();
            for (k, v) in patch.as_object().unwrap() {
                if v.is_null() {
                    c.as_object_mut().unwrap().remove(k);
                } else {
                    c[k] = v.clone();
                }
            }
            sign(r1, Algorithm::RS256, Some("r1"), c)
        };
        assert_eq!(refused(&g, &sign(other, Algorithm::RS256, Some("r1"), claims())), TokenError::BadSignature);
        assert_eq!(refused(&g, &sign(r1, Algorithm::RS256, Some("r9"), claims())), TokenError::UnknownKid);
        assert_eq!(refused(&g, &with(json!({"exp": NOW - 61}))), TokenError::Expired);
        assert!(check(&g, &with(json!({"exp": NOW - 59}))).is_ok(), "within the skew");
        assert_eq!(refused(&g, &with(json!({"nbf": NOW + 61}))), TokenError::NotYetValid);
        assert_eq!(refused(&g, &with(json!({"iat": NOW + 3600}))), TokenError::IssuedInFuture);
        assert_eq!(refused(&g, &with(json!({"aud": ["billing"]}))), TokenError::WrongAudience);
        assert_eq!(refused(&g, &with(json!({"aud": null}))), TokenError::WrongAudience);
        assert_eq!(refused(&g, &with(json!({"iss": "https://evil.test"}))), TokenError::WrongIssuer);
        assert_eq!(refused(&g, &with(json!({"iss": null}))), TokenError::WrongIssuer);
        assert!(check(&g, &with(json!({"exp": null}))).unwrap().is_some(), "exp is optional, as in Istio");
        assert_eq!(refused(&g, "abc$$.def.ghi"), TokenError::Malformed);
        let huge = format!("{}.{}.c2ln", "a".repeat(MAX_TOKEN_BYTES), "b");
        assert_eq!(refused(&g, &huge), TokenError::TooLarge);
        // Tampering with a signed token breaks its signature.
        let good = sign(r1, Algorithm::RS256, Some("r1"), claims());
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged = b64(json!({"iss": ISS, "sub": "root", "aud": "orders"}).to_string().as_bytes());
        parts[1] = &forged;
        assert_eq!(refused(&g, &parts.join(".")), TokenError::BadSignature);
    }

    #[test]
    fn tokens_are_read_where_the_rule_says_and_two_different_ones_are_refused() {
        let (r1, ..) = keys();
        let g = guard_with(JwtRule {
            issuer: ISS.into(),
            jwks: Some(jwks(&[r1])),
            from_headers: vec![JwtHeader { name: "X-Jwt".into(), prefix: None }],
            from_params: vec!["token".into()],
            ..Default::default()
        });
        let token = sign(r1, Algorithm::RS256, Some("r1"), claims());
        let mut h = HeaderMap::new();
        h.insert("x-jwt", HeaderValue::from_str(&token).unwrap());
        assert!(g.authenticate_at(&h, &Uri::from_static("/"), NOW).unwrap().is_some());
        let uri: Uri = format!("/a?x=1&token={token}").parse().unwrap();
        assert!(g.authenticate_at(&HeaderMap::new(), &uri, NOW).unwrap().is_some());
        assert!(g.authenticate_at(&h, &uri, NOW).unwrap().is_some(), "the same token twice is one token");
        assert!(
            g.authenticate_at(&bearer(&token), &Uri::from_static("/"), NOW).unwrap().is_none(),
            "Authorization is not read when the rule names its places"
        );
        let other = sign(r1, Algorithm::RS256, Some("r1"), json!({"iss": ISS, "sub": "bob"}));
        let uri: Uri = format!("/a?token={other}").parse().unwrap();
        assert_eq!(g.authenticate_at(&h, &uri, NOW).unwrap_err(), TokenError::MultipleTokens);
        // A token header that is not text is refused, not passed over as no token.
        let mut bytes = format!("Bearer {token}").into_bytes();
        bytes.push(0xff);
        let mut garbled = HeaderMap::new();
        garbled.insert(http::header::AUTHORIZATION, HeaderValue::from_bytes(&bytes).unwrap());
        assert_eq!(guard().authenticate_at(&garbled, &Uri::from_static("/"), NOW).unwrap_err(), TokenError::Malformed);
        // Defaults: Authorization: Bearer (any case) and ?access_token=.
        let d = guard();
        let mut lower = HeaderMap::new();
        lower.insert(http::header::AUTHORIZATION, HeaderValue::from_str(&format!("bearer {token}")).unwrap());
        assert!(d.authenticate_at(&lower, &Uri::from_static("/"), NOW).unwrap().is_some());
        let uri: Uri = format!("/a?access_token={token}").parse().unwrap();
        assert!(d.authenticate_at(&HeaderMap::new(), &uri, NOW).unwrap().is_some());
    }

    #[test]
    fn the_app_gets_claim_headers_from_the_sidecar_only_and_no_token() {
        let (r1, ..) = keys();
        let rule = JwtRule {
            issuer: ISS.into(),
            jwks: Some(jwks(&[r1])),
            output_claim_to_headers: vec![
                ClaimToHeader { header: "X-User".into(), claim: "sub".into() },
                ClaimToHeader { header: "x-scopes".into(), claim: "scope".into() },
                ClaimToHeader { header: "x-tenant".into(), claim: "org.tenant".into() },
            ],
            ..Default::default()
        };
        let g = guard_with(rule.clone());
        let mut c = claims();
        c["org"] = json!({"tenant": "acme"});
        let token = sign(r1, Algorithm::RS256, Some("r1"), c);
        let mut headers = bearer(&token);
        headers.insert("x-user", HeaderValue::from_static("mallory"));
        let mut uri: Uri = format!("/a?access_token={token}&page=2").parse().unwrap();
        let v = g.authenticate_at(&headers, &uri, NOW).unwrap();
        g.for_app(v.as_ref(), &mut headers, &mut uri).unwrap();
        assert_eq!(headers.get("x-user").unwrap(), "alice");
        assert_eq!(headers.get("x-scopes").unwrap(), "orders:read orders:write");
        assert_eq!(headers.get("x-tenant").unwrap(), "acme");
        assert!(headers.get(http::header::AUTHORIZATION).is_none(), "token removed");
        assert_eq!(uri.to_string(), "/a?page=2");
        // Without a token the caller's copy of a claim header is still removed.
        let mut spoofed = HeaderMap::new();
        spoofed.insert("x-user", HeaderValue::from_static("mallory"));
        let mut uri = Uri::from_static("/a");
        g.for_app(None, &mut spoofed, &mut uri).unwrap();
        assert!(spoofed.get("x-user").is_none());
        // forwardOriginalToken keeps it.
        let g = guard_with(JwtRule { forward_original_token: true, ..rule });
        let mut headers = bearer(&token);
        let mut uri = Uri::from_static("/a");
        let v = g.authenticate_at(&headers, &uri, NOW).unwrap();
        g.for_app(v.as_ref(), &mut headers, &mut uri).unwrap();
        assert!(headers.get(http::header::AUTHORIZATION).is_some());
    }

    #[test]
    fn keys_come_only_from_the_rule_and_a_new_key_set_forgets_the_old_tokens() {
        let (r1, other, ..) = keys();
        let pending =
            guard_with(JwtRule { issuer: ISS.into(), jwks_uri: Some(format!("{ISS}/jwks")), ..Default::default() });
        let token = sign(r1, Algorithm::RS256, Some("r1"), claims());
        assert_eq!(refused(&pending, &token), TokenError::NoKeys, "jwksUri not fetched yet: nothing verifies");
        let g = guard();
        assert!(check(&g, &token).unwrap().is_some());
        // Rotation: the issuer now publishes only a new key (kid r2).
        let mut rotated_jwk = other.jwk.clone();
        rotated_jwk["kid"] = json!("r2");
        let rotated = guard_with(JwtRule {
            issuer: ISS.into(),
            jwks: Some(json!({"keys": [rotated_jwk]}).to_string()),
            ..Default::default()
        });
        assert_eq!(refused(&rotated, &token), TokenError::UnknownKid);
        assert!(check(&rotated, &sign(other, Algorithm::RS256, Some("r2"), claims())).unwrap().is_some());
    }

    #[test]
    fn compile_refuses_what_could_never_work_naming_the_field() {
        let err = |rule: JwtRule| {
            JwtGuard::compile(vec![RequestAuthenticationSpec { selector: None, jwt_rules: vec![rule] }]).unwrap_err()
        };
        let keyed = |f: fn(&mut JwtRule)| {
            let mut r = JwtRule { issuer: ISS.into(), jwks: Some(jwks(&[&keys().0])), ..Default::default() };
            f(&mut r);
            r
        };
        assert!(err(JwtRule { issuer: ISS.into(), ..Default::default() }).contains("neither jwksUri nor jwks"));
        assert!(err(keyed(|r| r.issuer = " ".into())).contains("jwtRules[0].issuer"));
        assert!(
            err(keyed(|r| r.jwks = Some(r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#.into())))
                .contains("symmetric")
        );
        assert!(err(keyed(|r| r.jwks = Some("{".into()))).contains("jwtRules[0].jwks"));
        assert!(
            err(JwtRule { issuer: ISS.into(), jwks_uri: Some("http://id.test/k".into()), ..Default::default() })
                .contains("https")
        );
        let out = |header: &str| {
            keyed(|_| {})
                .output_claim_to_headers
                .clone()
                .into_iter()
                .chain([ClaimToHeader { header: header.into(), claim: "sub".into() }])
                .collect::<Vec<_>>()
        };
        for reserved in ["x-palisade-denied-by", "X-Forwarded-Client-Cert", "host", "content-length"] {
            let mut r = keyed(|_| {});
            r.output_claim_to_headers = out(reserved);
            assert!(err(r).contains("outputClaimToHeaders[0].header"), "{reserved}");
        }
        let mut r = keyed(|_| {});
        r.from_headers = vec![JwtHeader { name: "bad header".into(), prefix: None }];
        assert!(err(r).contains("fromHeaders[0].name"));
        assert!(JwtGuard::compile(Vec::new()).unwrap().is_empty());
    }
}
