//! Gateway API `HTTPRoute`s attached to a mesh service (the GAMMA pattern: `parentRefs` name
//! the service): per-request matches on path, method and headers, weighted backends (a canary
//! split), and a request timeout. The subset Palisade applies; a route that uses anything else
//! (filters, regular expressions, query-parameter matches) is refused whole by the control
//! plane, never applied in part.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proto::discovery::Resource;

/// The manifest kinds, and the API versions they are read from.
pub const KIND: &str = "HTTPRoute";
pub const GRPC_KIND: &str = "GRPCRoute";
pub const API_VERSIONS: &[&str] = &["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"];

/// Most weight one backend may carry (the Gateway API's bound).
const MAX_WEIGHT: u32 = 1_000_000;

/// `spec` of an `HTTPRoute`, as far as Palisade reads it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// The services the route applies to (kind `Service` or `MeshService`).
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<RouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one must match; none given matches every request.
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    /// Where matching requests go; none given: the parent service itself.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// When and how often a failed request is sent again (the Gateway API's `retry`, GEP-1731).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RouteRetry>,
    /// Not supported yet: a route with filters is refused rather than applied without them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Not supported yet (refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    /// `PathPrefix` (the default) or `Exact`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// `Exact` (the default) only.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Relative share of the rule's requests (default 1; 0 sends none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// The whole request, retries included (`200ms`, `5s`); past it the caller gets 504.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

/// A rule's `retry` (Gateway API, GEP-1731): which answers are retried, how many times, and
/// the pause before the first retry. Only requests that may be sent twice are retried at all:
/// an idempotent method (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) without a body.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRetry {
    /// Status codes retried (400-599); none given: 502, 503 and 504.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    /// Most retries of one request (default 1, at most 5; 0 turns retries off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Pause before the first retry (`25ms`), doubled before each further one, with jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

/// Most retries a rule may ask for: beyond that a retry storm is a configuration away.
pub const MAX_RETRY_ATTEMPTS: u32 = 5;

/// A rule's retries, compiled.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetryPolicy {
    pub codes: Vec<u16>,
    pub attempts: u32,
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// A rule asked for these retries: then the idempotent PUT and DELETE are retried too, and a
    /// retry may go to the endpoint that failed when there is no other. Without (the default),
    /// only a safe method is, and only on another endpoint.
    pub from_rule: bool,
}

/// What a service route does when no rule says: one retry of a safe method on another endpoint,
/// for an answer that says the endpoint could not serve it.
pub static DEFAULT_RETRY: RetryPolicy =
    RetryPolicy { codes: Vec::new(), attempts: 1, backoff: Duration::ZERO, from_rule: false };

impl RetryPolicy {
    /// Whether an answer with `status` is retried: one of the rule's codes, or by default one
    /// the balancer counts as the endpoint's failure.
    pub fn retries(&self, status: http::StatusCode) -> bool {
        match self.codes.is_empty() {
            true => super::balance::failed(status),
            false => self.codes.contains(&status.as_u16()),
        }
    }

    /// Whether `method` may be sent again.
    pub fn method_allowed(&self, method: &http::Method) -> bool {
        use http::Method;
        matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE)
            || (self.from_rule && matches!(*method, Method::PUT | Method::DELETE))
    }

    /// The pause before retry number `n` (0-based): the backoff doubled `n` times, between half
    /// and one and a half of it; with no backoff, up to 10 ms, so the retries of many callers
    /// do not arrive together.
    pub fn pause(&self, n: u32) -> Duration {
        if self.backoff.is_zero() {
            return Duration::from_millis(rand::random_range(0..10));
        }
        let base = self.backoff.saturating_mul(1 << n.min(10));
        base.mul_f64(rand::random_range(0.5..1.5))
    }
}

impl RouteRetry {
    fn compile(&self) -> Result<RetryPolicy, String> {
        if let Some(code) = self.codes.iter().find(|c| !(400..=599).contains(*c)) {
            return Err(format!("codes: {code} is not an error status (400-599)"));
        }
        let attempts = self.attempts.unwrap_or(1);
        if attempts > MAX_RETRY_ATTEMPTS {
            return Err(format!("attempts: {attempts}, at most {MAX_RETRY_ATTEMPTS}"));
        }
        let backoff = match &self.backoff {
            Some(v) => humantime::parse_duration(v).map_err(|e| format!("backoff: {v:?}: {e}"))?,
            None => Duration::ZERO,
        };
        Ok(RetryPolicy { codes: self.codes.clone(), attempts, backoff, from_rule: true })
    }
}

mod humantime_serde {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// `spec` of a `GRPCRoute`: the same parents and backends, matched by gRPC service and method.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Not supported yet (refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethodMatch {
    /// `Exact` (the default) only.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `package.Service`; none: every service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The method; none: every method of the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

impl GrpcRouteSpec {
    /// The same route as an `HTTPRoute`: a gRPC call is a POST to `/package.Service/Method`,
    /// so a method match is an exact path, a service match a path prefix.
    pub fn to_http(&self) -> Result<HttpRouteSpec, String> {
        let mut rules = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let mut matches = Vec::new();
            for (j, m) in rule.matches.iter().enumerate() {
                let at = format!("spec.rules[{i}].matches[{j}].method");
                let path = match &m.method {
                    None => None,
                    Some(mm) => {
                        if mm.kind.as_deref().is_some_and(|k| k != "Exact") {
                            return Err(format!("{at}.type {:?}: only Exact", mm.kind));
                        }
                        let ok = |s: &str| !s.is_empty() && !s.contains('/');
                        match (mm.service.as_deref(), mm.method.as_deref()) {
                            (Some(svc), Some(method)) if ok(svc) && ok(method) => {
                                Some(PathMatch { kind: Some("Exact".into()), value: Some(format!("/{svc}/{method}")) })
                            }
                            (Some(svc), None) if ok(svc) => {
                                Some(PathMatch { kind: Some("PathPrefix".into()), value: Some(format!("/{svc}")) })
                            }
                            (None, None) => None,
                            _ => return Err(format!("{at}: a service (and optionally a method), without '/'")),
                        }
                    }
                };
                matches.push(RouteMatch { path, method: None, headers: m.headers.clone(), query_params: vec![] });
            }
            rules.push(RouteRule {
                name: rule.name.clone(),
                matches,
                backend_refs: rule.backend_refs.clone(),
                timeouts: None,
                retry: None,
                filters: rule.filters.clone(),
            });
        }
        Ok(HttpRouteSpec { parent_refs: self.parent_refs.clone(), hostnames: self.hostnames.clone(), rules })
    }

    /// Checks what decoding cannot, as for an `HTTPRoute` in `namespace`.
    pub fn check_in(&self, namespace: &str) -> Result<(), String> {
        self.to_http()?.check_in(namespace)
    }
}

/// One rule, ready for the data path.
#[derive(Clone, Debug, Serialize)]
pub struct Rule {
    /// `namespace/name` of the route and the rule's index in it.
    pub route: Arc<str>,
    pub matches: Vec<Match>,
    /// `namespace/name` of each backend service, with its weight (shared with every request
    /// routed there, not copied per request).
    pub backends: Vec<(Arc<str>, u32)>,
    #[serde(with = "humantime_serde_opt")]
    pub timeout: Option<Duration>,
    /// The rule's own retries (none: [`DEFAULT_RETRY`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<Arc<RetryPolicy>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Match {
    pub path: Option<(PathKind, String)>,
    pub method: Option<String>,
    pub headers: Vec<(String, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PathKind {
    Prefix,
    Exact,
}

/// The rules of every route, by the `namespace/name` of the service they are attached to, in
/// order: routes by namespace and name, each route's rules as written.
pub type RouteTable = foldhash::HashMap<String, Arc<[Rule]>>;

impl HttpRouteSpec {
    /// [`Self::check`], and that every backend is in the route's own `namespace`: a backend
    /// in another namespace needs that namespace's consent (a Gateway API `ReferenceGrant`),
    /// which Palisade does not read yet, so it is refused.
    pub fn check_in(&self, namespace: &str) -> Result<(), String> {
        self.check()?;
        for (i, rule) in self.rules.iter().enumerate() {
            for (j, b) in rule.backend_refs.iter().enumerate() {
                if b.namespace.as_deref().is_some_and(|ns| ns != namespace) {
                    return Err(format!(
                        "spec.rules[{i}].backendRefs[{j}].namespace: a backend in another namespace needs a ReferenceGrant, not supported yet"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks what decoding cannot, so a route is applied whole or not at all.
    pub fn check(&self) -> Result<(), String> {
        if self.parent_refs.is_empty() {
            return Err("spec.parentRefs: attach the route to at least one service".into());
        }
        for (i, p) in self.parent_refs.iter().enumerate() {
            let kind = p.kind.as_deref().unwrap_or("Gateway");
            if !matches!(kind, "Service" | "MeshService") {
                return Err(format!(
                    "spec.parentRefs[{i}].kind: {kind:?}: only mesh routes (kind Service or MeshService) are applied"
                ));
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("spec.rules[{i}]");
            if !rule.filters.is_empty() {
                return Err(format!("{at}.filters: not supported yet"));
            }
            for (j, m) in rule.matches.iter().enumerate() {
                compile_match(m).map_err(|e| format!("{at}.matches[{j}]: {e}"))?;
            }
            for (j, b) in rule.backend_refs.iter().enumerate() {
                let kind = b.kind.as_deref().unwrap_or("Service");
                if !matches!(kind, "Service" | "MeshService") {
                    return Err(format!("{at}.backendRefs[{j}].kind: {kind:?} is not a service"));
                }
                if b.weight.is_some_and(|w| w > MAX_WEIGHT) {
                    return Err(format!("{at}.backendRefs[{j}].weight: at most {MAX_WEIGHT}"));
                }
            }
            if let Some(r) = &rule.retry {
                r.compile().map_err(|e| format!("{at}.retry.{e}"))?;
            }
            if let Some(t) = &rule.timeouts {
                for (what, v) in [("request", &t.request), ("backendRequest", &t.backend_request)] {
                    if let Some(v) = v {
                        humantime::parse_duration(v).map_err(|e| format!("{at}.timeouts.{what}: {v:?}: {e}"))?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn compile_match(m: &RouteMatch) -> Result<Match, String> {
    if !m.query_params.is_empty() {
        return Err("queryParams: not supported yet".into());
    }
    let path = match &m.path {
        None => None,
        Some(p) => {
            let kind = match p.kind.as_deref().unwrap_or("PathPrefix") {
                "PathPrefix" => PathKind::Prefix,
                "Exact" => PathKind::Exact,
                other => return Err(format!("path.type {other:?}: PathPrefix or Exact")),
            };
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            if !value.starts_with('/') {
                return Err(format!("path.value {value:?} must start with /"));
            }
            // A prefix matches whole segments; its trailing `/` is trimmed once, here.
            let value = match kind {
                PathKind::Prefix => value.trim_end_matches('/').to_string(),
                PathKind::Exact => value,
            };
            Some((kind, value))
        }
    };
    let method = match &m.method {
        Some(method) => {
            Some(method.parse::<http::Method>().map_err(|e| format!("method {method:?}: {e}"))?.to_string())
        }
        None => None,
    };
    let mut headers = Vec::new();
    for h in &m.headers {
        if h.kind.as_deref().is_some_and(|k| k != "Exact") {
            return Err(format!("headers: type {:?}: only Exact", h.kind));
        }
        let name = http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| format!("header {:?}: {e}", h.name))?;
        headers.push((name.as_str().to_string(), h.value.clone()));
    }
    Ok(Match { path, method, headers })
}

impl Match {
    /// Whether a request with this method, path and headers matches.
    pub fn matches(&self, method: &http::Method, path: &str, headers: &http::HeaderMap) -> bool {
        let path_ok = match &self.path {
            None => true,
            Some((PathKind::Exact, v)) => path == v,
            // A prefix matches whole segments: `/api` matches `/api` and `/api/x`, not `/apix`.
            Some((PathKind::Prefix, v)) => {
                v.is_empty()
                    || path.strip_prefix(v.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
        };
        path_ok
            && self.method.as_deref().is_none_or(|m| m == method.as_str())
            && self.headers.iter().all(|(k, v)| headers.get(k.as_str()).is_some_and(|h| h.as_bytes() == v.as_bytes()))
    }
}

impl Rule {
    /// Whether the rule takes this request (no match given: every request).
    pub fn takes(&self, method: &http::Method, path: &str, headers: &http::HeaderMap) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(method, path, headers))
    }

    /// The backend for the next request, by weight; `None` when every weight is 0.
    pub fn backend(&self) -> Option<&Arc<str>> {
        let total: u64 = self.backends.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return None;
        }
        let mut at = rand::random_range(0..total);
        for (name, w) in &self.backends {
            if at < u64::from(*w) {
                return Some(name);
            }
            at -= u64::from(*w);
        }
        None
    }
}

/// The snapshot's routes compiled into rules by parent service, for a caller in `caller_ns`.
/// A route in its parent's namespace (a producer route) applies to every caller; a route in
/// another namespace (a consumer route) only to callers of its own namespace, and comes first
/// for them (GAMMA), so no namespace can redirect another's calls. A route that does not
/// decode or compile is reported (for the NACK) and left out whole.
pub fn compile(policies: &[Resource], caller_ns: &str) -> (RouteTable, Vec<(String, String)>) {
    let mut routes: Vec<&Resource> = policies.iter().filter(|r| r.kind == KIND || r.kind == GRPC_KIND).collect();
    routes.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut consumer: HashMap<String, Vec<Rule>> = HashMap::new();
    let mut by_parent: HashMap<String, Vec<Rule>> = HashMap::new();
    let mut errors = Vec::new();
    for r in routes {
        let name = format!("{}/{}", r.namespace, r.name);
        let decoded = match r.kind.as_str() {
            GRPC_KIND => {
                serde_json::from_str::<GrpcRouteSpec>(&r.spec_json).map_err(|e| e.to_string()).and_then(|g| g.to_http())
            }
            _ => serde_json::from_str::<HttpRouteSpec>(&r.spec_json).map_err(|e| e.to_string()),
        };
        let compiled = decoded
            .and_then(|spec| spec.check_in(&r.namespace).map(|()| spec))
            .and_then(|spec| rules_of(&r.namespace, &name, &spec).map(|rules| (spec, rules)));
        match compiled {
            Ok((spec, rules)) => {
                for p in &spec.parent_refs {
                    let parent_ns = p.namespace.as_deref().unwrap_or(&r.namespace);
                    let table = match (parent_ns == r.namespace, r.namespace == caller_ns) {
                        (true, _) => &mut by_parent,
                        (false, true) => &mut consumer,
                        (false, false) => continue,
                    };
                    let parent = format!("{parent_ns}/{}", p.name);
                    // No backendRefs: the parent service itself.
                    let attached = rules.iter().map(|rule| match rule.backends.is_empty() {
                        true => Rule { backends: vec![(Arc::from(parent.as_str()), 1)], ..rule.clone() },
                        false => rule.clone(),
                    });
                    table.entry(parent.clone()).or_default().extend(attached);
                }
            }
            Err(e) => errors.push((name, e)),
        }
    }
    for (parent, mut rules) in consumer {
        rules.extend(by_parent.remove(&parent).unwrap_or_default());
        by_parent.insert(parent, rules);
    }
    (by_parent.into_iter().map(|(k, v)| (k, v.into())).collect(), errors)
}

fn rules_of(namespace: &str, name: &str, spec: &HttpRouteSpec) -> Result<Vec<Rule>, String> {
    spec.rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let matches = rule.matches.iter().map(compile_match).collect::<Result<Vec<_>, _>>()?;
            let backends = rule
                .backend_refs
                .iter()
                .map(|b| {
                    let name = format!("{}/{}", b.namespace.as_deref().unwrap_or(namespace), b.name);
                    (Arc::from(name), b.weight.unwrap_or(1))
                })
                .collect();
            let timeout = match rule.timeouts.as_ref().and_then(|t| t.request.as_deref()) {
                Some(v) => Some(humantime::parse_duration(v).map_err(|e| e.to_string())?),
                None => None,
            };
            let retry = rule.retry.as_ref().map(RouteRetry::compile).transpose()?.map(Arc::new);
            Ok(Rule { route: Arc::from(format!("{name}#{i}")), matches, backends, timeout, retry })
        })
        .collect()
}

/// `Option<Duration>` as humantime text in `/config_dump`.
mod humantime_serde_opt {
    pub fn serialize<S: serde::Serializer>(d: &Option<std::time::Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, spec: serde_json::Value) -> Resource {
        Resource {
            kind: KIND.into(),
            namespace: "shop".into(),
            name: name.into(),
            origin: "test".into(),
            spec_json: spec.to_string(),
            labels: Default::default(),
        }
    }

    fn backends(rule: &Rule) -> Vec<(&str, u32)> {
        rule.backends.iter().map(|(name, w)| (&**name, *w)).collect()
    }

    fn spec(v: serde_json::Value) -> Result<(), String> {
        serde_json::from_value::<HttpRouteSpec>(v).map_err(|e| e.to_string())?.check()
    }

    #[test]
    fn rules_attach_to_their_parent_in_order_and_default_to_it() {
        let (table, errors) = compile(
            &[
                route(
                    "b-split",
                    serde_json::json!({"parentRefs": [{"kind": "Service", "name": "orders"}], "rules": [
                        {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "method": "GET"}],
                         "backendRefs": [{"name": "orders-v1", "weight": 90}, {"name": "orders-v2", "weight": 10}],
                         "timeouts": {"request": "200ms"}},
                        {}
                    ]}),
                ),
                route(
                    "a-broken",
                    serde_json::json!({"parentRefs": [{"kind": "Service", "name": "orders"}], "rules": [{"filters": [{"type": "RequestHeaderModifier"}]}]}),
                ),
            ],
            "shop",
        );
        assert_eq!(errors.len(), 1);
        assert!(errors[0].1.contains("filters"), "{errors:?}");
        let rules = &table["shop/orders"];
        assert_eq!(rules.len(), 2);
        assert_eq!(backends(&rules[0]), [("shop/orders-v1", 90), ("shop/orders-v2", 10)]);
        assert_eq!(rules[0].timeout, Some(Duration::from_millis(200)));
        assert_eq!(backends(&rules[1]), [("shop/orders", 1)], "no backendRefs: the parent itself");
        let h = http::HeaderMap::new();
        assert!(rules[0].takes(&http::Method::GET, "/api/x", &h));
        assert!(rules[0].takes(&http::Method::GET, "/api", &h));
        assert!(!rules[0].takes(&http::Method::GET, "/apix", &h), "a prefix matches whole segments");
        assert!(!rules[0].takes(&http::Method::POST, "/api/x", &h));
        assert!(rules[1].takes(&http::Method::POST, "/anything", &h));
    }

    #[test]
    fn a_grpc_route_matches_by_service_and_method() {
        let (table, errors) = compile(
            &[Resource {
                kind: GRPC_KIND.into(),
                ..route(
                    "grpc",
                    serde_json::json!({"parentRefs": [{"kind": "Service", "name": "orders"}], "rules": [
                        {"matches": [{"method": {"service": "shop.Orders", "method": "Get"}}], "backendRefs": [{"name": "orders-v2"}]},
                        {"matches": [{"method": {"service": "shop.Orders"}}]}
                    ]}),
                )
            }],
            "shop",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let rules = &table["shop/orders"];
        let h = http::HeaderMap::new();
        assert!(rules[0].takes(&http::Method::POST, "/shop.Orders/Get", &h));
        assert!(!rules[0].takes(&http::Method::POST, "/shop.Orders/List", &h));
        assert!(rules[1].takes(&http::Method::POST, "/shop.Orders/List", &h));
        assert!(!rules[1].takes(&http::Method::POST, "/shop.OrdersAdmin/List", &h));
        let bad = GrpcRouteSpec {
            parent_refs: vec![ParentRef { kind: Some("Service".into()), name: "s".into(), ..Default::default() }],
            rules: vec![GrpcRouteRule {
                matches: vec![GrpcRouteMatch {
                    method: Some(GrpcMethodMatch { method: Some("Get".into()), ..Default::default() }),
                    headers: vec![],
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(bad.check_in("shop").unwrap_err().contains("a service"), "a method without its service");
    }

    #[test]
    fn a_route_of_another_namespace_binds_only_its_own_callers_and_no_foreign_backend() {
        let hijack = Resource {
            namespace: "evil".into(),
            ..route(
                "steal",
                serde_json::json!({"parentRefs": [{"kind": "Service", "namespace": "shop", "name": "orders"}],
                                   "rules": [{"backendRefs": [{"name": "collector"}]}]}),
            )
        };
        let producer =
            route("own", serde_json::json!({"parentRefs": [{"kind": "Service", "name": "orders"}], "rules": [{}]}));
        let (table, errors) = compile(&[hijack.clone(), producer.clone()], "web");
        assert!(errors.is_empty(), "{errors:?}");
        let rules = &table["shop/orders"];
        assert_eq!(rules.len(), 1, "a caller in `web` meets only the producer route");
        assert_eq!(backends(&rules[0]), [("shop/orders", 1)]);
        let (table, _) = compile(&[hijack, producer], "evil");
        assert_eq!(backends(&table["shop/orders"][0]), [("evil/collector", 1)], "its own callers, first");
        let foreign = route(
            "x",
            serde_json::json!({"parentRefs": [{"kind": "Service", "name": "orders"}],
                               "rules": [{"backendRefs": [{"name": "db", "namespace": "payments"}]}]}),
        );
        let (_, errors) = compile(&[foreign], "shop");
        assert!(errors[0].1.contains("ReferenceGrant"), "{errors:?}");
    }

    #[test]
    fn weights_split_requests() {
        let rule = Rule {
            route: "r".into(),
            matches: vec![],
            backends: vec![("a".into(), 9), ("b".into(), 1), ("none".into(), 0)],
            timeout: None,
            retry: None,
        };
        let b = (0..10_000).filter(|_| rule.backend().map(|b| &**b) == Some("b")).count();
        assert!((800..1200).contains(&b), "{b}");
        let zero =
            Rule { route: "r".into(), matches: vec![], backends: vec![("a".into(), 0)], timeout: None, retry: None };
        assert_eq!(zero.backend(), None);
    }

    #[test]
    fn what_is_not_supported_is_refused_not_ignored() {
        let parent = serde_json::json!([{"kind": "Service", "name": "s"}]);
        assert!(spec(serde_json::json!({"parentRefs": [{"name": "gw"}]})).unwrap_err().contains("Gateway"));
        assert!(spec(serde_json::json!({"parentRefs": []})).is_err());
        let regex = serde_json::json!({"parentRefs": parent, "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/.*"}}]}]});
        assert!(spec(regex).unwrap_err().contains("PathPrefix or Exact"));
        let query = serde_json::json!({"parentRefs": parent, "rules": [{"matches": [{"queryParams": [{"name": "a", "value": "b"}]}]}]});
        assert!(spec(query).unwrap_err().contains("queryParams"));
        let timeout = serde_json::json!({"parentRefs": parent, "rules": [{"timeouts": {"request": "soon"}}]});
        assert!(spec(timeout).unwrap_err().contains("timeouts.request"));
        let typo = serde_json::json!({"parentRefs": parent, "rules": [{"backendRef": []}]});
        assert!(spec(typo).is_err(), "an unknown field is an error, not ignored");
    }
}
