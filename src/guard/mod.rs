//! API protection at every sidecar, before authorization: path normalization, end-user tokens
//! (`RequestAuthentication`), rate limits (`RateLimitPolicy`).
//!
//! The guards of a workload are compiled with its snapshot into the sidecar's one view
//! ([`Guards::compile`]), never per request. Each request then meets them in order: the path
//! is normalized (the app receives the path that was decided on), a token is verified, the
//! rate limits are counted, and only then does policy decide, seeing the verified end user. A
//! guard that refuses answers itself ([`Refusal`]) and the request goes no further.

pub mod jwt;
pub mod path;
pub mod rate;
pub mod security;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, StatusCode};

/// Why a guard refused a request; each maps to one status and says why in the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The request target is malformed or ambiguous (400): path normalization.
    BadRequest { rule: &'static str },
    /// The end-user token is invalid (401 with `WWW-Authenticate: Bearer error="invalid_token"`).
    InvalidToken { reason: &'static str },
    /// A request body over the workload's limit (413).
    TooLarge { limit: u64 },
    /// Over a rate limit (429 with `Retry-After`).
    RateLimited { policy: String, retry_after: Duration, headers: Vec<(&'static str, HeaderValue)> },
}

impl Refusal {
    /// The HTTP status the caller sees.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Refusal::InvalidToken { .. } => StatusCode::UNAUTHORIZED,
            Refusal::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The reason, for the response body, the access log and metrics.
    pub fn reason(&self) -> String {
        match self {
            Refusal::BadRequest { rule } => format!("path refused: {rule}"),
            Refusal::InvalidToken { reason } => format!("invalid token: {reason}"),
            Refusal::TooLarge { limit } => format!("request body over {limit} bytes"),
            Refusal::RateLimited { policy, .. } => format!("rate limited by {policy}"),
        }
    }

    /// The guard that refused, and its rule or reason, for `palisade_guard_refusals_total`.
    pub fn label(&self) -> (&'static str, String) {
        match self {
            Refusal::BadRequest { rule } => ("path", (*rule).to_string()),
            Refusal::InvalidToken { reason } => ("jwt", (*reason).to_string()),
            Refusal::TooLarge { .. } => ("body", "too-large".to_string()),
            Refusal::RateLimited { policy, .. } => ("rate_limit", policy.clone()),
        }
    }

    /// The gRPC status code a gRPC caller gets instead of the HTTP status.
    pub fn grpc_status(&self) -> &'static str {
        match self {
            Refusal::BadRequest { .. } => "3",    // INVALID_ARGUMENT
            Refusal::InvalidToken { .. } => "16", // UNAUTHENTICATED
            Refusal::TooLarge { .. } => "8",      // RESOURCE_EXHAUSTED
            Refusal::RateLimited { .. } => "8",   // RESOURCE_EXHAUSTED
        }
    }

    /// Headers the refusal carries besides the request id.
    pub fn headers(&self) -> Vec<(&'static str, HeaderValue)> {
        match self {
            Refusal::BadRequest { .. } | Refusal::TooLarge { .. } => Vec::new(),
            Refusal::InvalidToken { .. } => {
                vec![("www-authenticate", HeaderValue::from_static("Bearer error=\"invalid_token\""))]
            }
            Refusal::RateLimited { retry_after, headers, .. } => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                let mut h = vec![("retry-after", HeaderValue::from(secs))];
                h.extend(headers.iter().cloned());
                h
            }
        }
    }
}

/// Everything that guards one workload's requests, compiled once per snapshot.
#[derive(Debug, Default)]
pub struct Guards {
    pub path: path::PathGuard,
    /// Shared with the next snapshot's guards while its specs are unchanged.
    pub jwt: Arc<jwt::JwtGuard>,
    pub rate: Arc<rate::RateGuard>,
    pub security: Arc<security::SecurityGuard>,
}
