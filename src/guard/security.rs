//! `WorkloadSecurity`: request and response hardening for edge-facing workloads — a request
//! body limit (413) and the response headers browsers act on (HSTS, `nosniff`,
//! `Referrer-Policy`, a CSP the user gives), with `Server` and `X-Powered-By` removed.
//!
//! The spec types are the schema of the CRD and of the wire (the CRD in `k8s::crd` wraps them).

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::resource::WorkloadSelector;

/// `Strict-Transport-Security`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hsts {
    pub max_age_seconds: u64,
    #[serde(default)]
    pub include_sub_domains: bool,
    #[serde(default)]
    pub preload: bool,
}

fn yes() -> bool {
    true
}

fn default_referrer_policy() -> Option<String> {
    Some("strict-origin-when-cross-origin".into())
}

fn default_remove() -> Vec<String> {
    vec!["server".into(), "x-powered-by".into()]
}

/// Headers set on (or removed from) every response of the workload, the app's and the
/// sidecar's own refusals alike. `responseHeaders: {}` gives the defaults: `nosniff`,
/// `Referrer-Policy: strict-origin-when-cross-origin`, `Server` and `X-Powered-By` removed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResponseHeaders {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts: Option<Hsts>,
    /// `X-Content-Type-Options: nosniff`.
    #[serde(default = "yes")]
    pub content_type_options: bool,
    /// `Referrer-Policy`; `null` sets none.
    #[serde(default = "default_referrer_policy")]
    pub referrer_policy: Option<String>,
    /// `Content-Security-Policy`, as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_security_policy: Option<String>,
    /// More headers to set, replacing the app's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Headers removed from the app's responses.
    #[serde(default = "default_remove")]
    pub remove: Vec<String>,
}

impl Default for ResponseHeaders {
    fn default() -> Self {
        ResponseHeaders {
            hsts: None,
            content_type_options: true,
            referrer_policy: default_referrer_policy(),
            content_security_policy: None,
            set: BTreeMap::new(),
            remove: default_remove(),
        }
    }
}

/// Hardening of the selected workloads. The most specific one applies (a selector beats a
/// namespace-wide one; among equals, the first by name).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSecuritySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Largest request body, in bytes: a larger `Content-Length` is refused with 413 before the
    /// app sees the request, and a streamed body is cut off when it passes the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<ResponseHeaders>,
}

/// The compiled hardening of one workload.
#[derive(Debug, Default)]
pub struct SecurityGuard {
    specs: Vec<WorkloadSecuritySpec>,
    /// Largest request body, if limited.
    pub max_request_body: Option<u64>,
    set: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl SecurityGuard {
    /// Compiles the specs selecting a workload: the most specific one applies.
    pub fn compile(specs: Vec<WorkloadSecuritySpec>) -> Result<Self, String> {
        let chosen = specs.iter().find(|s| s.selector.is_some()).or_else(|| specs.first());
        let mut guard = SecurityGuard::default();
        for spec in &specs {
            compile_headers(spec.response_headers.as_ref())?;
        }
        if let Some(spec) = chosen {
            guard.max_request_body = spec.max_request_body_bytes;
            (guard.set, guard.remove) = compile_headers(spec.response_headers.as_ref())?;
        }
        guard.specs = specs;
        Ok(guard)
    }

    /// Whether it changes nothing (no spec selects the workload): the request path skips it.
    pub fn is_noop(&self) -> bool {
        self.max_request_body.is_none() && self.set.is_empty() && self.remove.is_empty()
    }

    /// The specs it was compiled from.
    pub fn specs(&self) -> &[WorkloadSecuritySpec] {
        &self.specs
    }

    /// Sets and removes the configured response headers.
    pub fn harden(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

type Compiled = (Vec<(HeaderName, HeaderValue)>, Vec<HeaderName>);

fn compile_headers(h: Option<&ResponseHeaders>) -> Result<Compiled, String> {
    let Some(h) = h else { return Ok((Vec::new(), Vec::new())) };
    let name = |n: &str| HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("{n:?} is not a header name"));
    let value =
        |n: &str, v: &str| HeaderValue::from_str(v).map_err(|_| format!("header {n}: {v:?} is not a header value"));
    let mut set = Vec::new();
    if let Some(hsts) = &h.hsts {
        let mut v = format!("max-age={}", hsts.max_age_seconds);
        if hsts.include_sub_domains {
            v.push_str("; includeSubDomains");
        }
        if hsts.preload {
            v.push_str("; preload");
        }
        set.push((http::header::STRICT_TRANSPORT_SECURITY, value("hsts", &v)?));
    }
    if h.content_type_options {
        set.push((http::header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")));
    }
    if let Some(p) = &h.referrer_policy {
        set.push((http::header::REFERRER_POLICY, value("referrerPolicy", p)?));
    }
    if let Some(csp) = &h.content_security_policy {
        set.push((http::header::CONTENT_SECURITY_POLICY, value("contentSecurityPolicy", csp)?));
    }
    for (n, v) in &h.set {
        set.push((name(n)?, value(n, v)?));
    }
    let remove = h.remove.iter().map(|n| name(n)).collect::<Result<Vec<_>, _>>()?;
    Ok((set, remove))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> WorkloadSecuritySpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_harden_and_the_most_specific_spec_applies() {
        let ns_wide = spec("maxRequestBodyBytes: 10\nresponseHeaders: {}\n");
        let selected = spec(
            "selector: {matchLabels: {app: web}}\nmaxRequestBodyBytes: 1000\nresponseHeaders:\n  \
             hsts: {maxAgeSeconds: 31536000, includeSubDomains: true}\n  contentSecurityPolicy: \"default-src 'self'\"\n",
        );
        let g = SecurityGuard::compile(vec![ns_wide.clone(), selected]).unwrap();
        assert_eq!(g.max_request_body, Some(1000));
        let mut h = HeaderMap::new();
        h.insert("server", HeaderValue::from_static("nginx/1.2"));
        h.insert("x-powered-by", HeaderValue::from_static("PHP"));
        h.insert("x-content-type-options", HeaderValue::from_static("sniff-away"));
        g.harden(&mut h);
        assert!(h.get("server").is_none() && h.get("x-powered-by").is_none());
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["strict-transport-security"], "max-age=31536000; includeSubDomains");
        assert_eq!(h["content-security-policy"], "default-src 'self'");
        assert_eq!(h["referrer-policy"], "strict-origin-when-cross-origin");
        assert_eq!(SecurityGuard::compile(vec![ns_wide]).unwrap().max_request_body, Some(10));
    }

    #[test]
    fn bad_header_names_or_values_are_refused_when_compiled() {
        assert!(SecurityGuard::compile(vec![spec("responseHeaders: {set: {\"bad name\": x}}\n")]).is_err());
        assert!(SecurityGuard::compile(vec![spec("responseHeaders: {contentSecurityPolicy: \"a\\nb\"}\n")]).is_err());
        assert!(serde_yaml::from_str::<WorkloadSecuritySpec>("maxBody: 1\n").is_err(), "typos are refused");
    }
}
