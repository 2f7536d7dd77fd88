//! `RateLimitPolicy`: token buckets at the sidecar, counted before policy decides.
//!
//! Each limit of a policy has a rate (`requestsPerUnit` per `unit`, `burst` at once), a match
//! (`paths` with the wildcards of `AuthorizationPolicy` paths, `methods`), and a key: one bucket
//! for the whole workload (the default), or one per caller identity, caller IP, header value,
//! JWT claim or end user. `overrides` give chosen callers or end users a rate of their own. A
//! request over any limit that applies is refused with 429, `Retry-After` and the IETF draft
//! headers `RateLimit-Policy` and `RateLimit`; a `dryRun` limit only counts it.
//!
//! The spec types are the schema of the CRD and of the wire (the CRD in `k8s::crd` wraps them).
//! The guard is compiled once per change of the specs and kept across snapshots that change
//! something else, so its buckets survive them. Checking a request takes no lock for a limit of
//! the whole workload and one shard's lock for a keyed limit, and allocates nothing unless the
//! request is refused or brings a key never seen ([`bucket`]).

mod bucket;
mod key;

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use self::bucket::{Bucket, KeyedBuckets, Rate};
use self::key::KeyKind;
use super::Refusal;
use crate::policy::resource::WorkloadSelector;
use crate::policy::rules::{StrMatch, normalise_principal};
use crate::telemetry::metrics::{RateLimitedCounts, RateLimitedLabels};

pub use self::key::client_ip;

/// The period a limit counts over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum RateUnit {
    #[default]
    Second,
    Minute,
    Hour,
}

impl RateUnit {
    /// The period in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            RateUnit::Second => 1,
            RateUnit::Minute => 60,
            RateUnit::Hour => 3600,
        }
    }
}

/// No fields: a key that needs no parameter (`source: {}`). Fields inside are ignored rather
/// than refused, so the CRD's schema for it stays a plain `type: object`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Empty {}

/// The caller's IP address as a key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemoteAddressKey {
    /// How many proxies in front of the workload append to `X-Forwarded-For` and are trusted:
    /// the client is that many entries from the right. Default 0: the header is ignored and the
    /// connection's peer counts, so a caller cannot choose its own bucket.
    #[serde(default)]
    pub xff_trusted_hops: u32,
}

/// What a limit counts by: exactly one field. Requests without the value (no header, no token)
/// share one bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateKey {
    /// Per caller identity (SPIFFE ID); `perSource: true` is the shorthand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Empty>,
    /// Per caller IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_address: Option<RemoteAddressKey>,
    /// Per value of this request header (its first value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Per value of this claim of the verified end-user token (`RequestAuthentication`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// Per verified end user (`<iss>/<sub>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_principal: Option<Empty>,
}

/// A rate of its own for chosen callers or end users. Its buckets are keyed as the limit's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateOverride {
    /// Caller identities, patterns as in `AuthorizationPolicy` principals.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// End users (`<iss>/<sub>`), patterns as for principals.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    /// Per the limit's unit.
    pub requests_per_unit: u32,
    /// Requests allowed at once; default: `requestsPerUnit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// One token bucket (or one per key).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_unit: u32,
    pub unit: RateUnit,
    /// Requests allowed at once; default: `requestsPerUnit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Only requests to these paths count (wildcards as in `AuthorizationPolicy`); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Only requests with these methods count; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Count per caller identity rather than for the workload as a whole (`key: {source: {}}`).
    #[serde(default)]
    pub per_source: bool,
    /// What to count by; default: the whole workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RateKey>,
    /// Rates of their own for chosen callers or end users; the first that matches applies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RateOverride>,
    /// Only count requests over the limit (`palisade_rate_limited_total{dry_run="true"}`);
    /// refuse none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// Most keys remembered at once, for the limit's rate and for each override's; a flood of
    /// new keys forgets the buckets nearest to full. Default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<u32>,
}

/// Request rate limits of the selected workloads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    pub limits: Vec<RateLimit>,
}

/// Keys a limit remembers unless it says otherwise.
pub const DEFAULT_MAX_KEYS: u32 = 10_000;
/// The most a limit may ask for: about 2 MB of buckets.
pub const MAX_KEYS_LIMIT: u32 = 1_000_000;

/// Claims of the verified end-user token, as the JWT guard holds them.
pub trait ClaimLookup {
    /// The claim's value as text, if the token has it.
    fn claim(&self, name: &str) -> Option<Cow<'_, str>>;
}

/// A verified end user's claims, as text: strings as they are, numbers and booleans printed,
/// anything else (objects, lists) not a key.
impl ClaimLookup for crate::policy::input::RequestAuth {
    fn claim(&self, name: &str) -> Option<Cow<'_, str>> {
        match self.claims.get(name)? {
            serde_json::Value::String(s) => Some(Cow::Borrowed(s)),
            serde_json::Value::Number(n) => Some(Cow::Owned(n.to_string())),
            serde_json::Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
            _ => None,
        }
    }
}

/// What the rate limits read of one request, borrowed where it lies.
pub struct RateRequest<'a> {
    pub method: &'a Method,
    /// The normalized path, without the query.
    pub path: &'a str,
    /// The caller's SPIFFE ID; `None` for a plaintext caller.
    pub source: Option<&'a str>,
    /// The connection's peer address.
    pub peer_ip: IpAddr,
    pub headers: &'a HeaderMap,
    /// The verified end user (`<iss>/<sub>`), from the JWT guard.
    pub principal: Option<&'a str>,
    /// The verified token's claims, from the JWT guard.
    pub claims: Option<&'a dyn ClaimLookup>,
}

/// The compiled `RateLimitPolicy` limits that select one workload. Empty: nothing is limited.
pub struct RateGuard {
    /// `namespace/name` and spec of each policy, as compiled.
    specs: Vec<(String, RateLimitPolicySpec)>,
    limits: Vec<Limit>,
    /// Bucket times count from here.
    epoch: Instant,
}

impl Default for RateGuard {
    fn default() -> Self {
        RateGuard { specs: Vec::new(), limits: Vec::new(), epoch: Instant::now() }
    }
}

impl std::fmt::Debug for RateGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateGuard").field("policies", &self.specs.iter().map(|s| &s.0).collect::<Vec<_>>()).finish()
    }
}

/// One limit, compiled.
struct Limit {
    /// The policy's `namespace/name`: the refusal, the headers and the metric name it.
    policy: Arc<str>,
    paths: Vec<StrMatch>,
    methods: Vec<StrMatch>,
    key: KeyKind,
    dry_run: bool,
    default: Quota,
    overrides: Vec<Override>,
}

struct Override {
    principals: Vec<StrMatch>,
    request_principals: Vec<StrMatch>,
    quota: Quota,
}

/// A rate and its buckets.
struct Quota {
    rate: Rate,
    /// `"<policy>";q=<requests>;w=<seconds>`, made once.
    policy_header: HeaderValue,
    buckets: Buckets,
}

enum Buckets {
    One(Bucket),
    Keyed(KeyedBuckets),
}

impl RateGuard {
    /// Compiles the specs selecting a workload, each with its policy's `namespace/name`. The
    /// error names the policy and the field.
    pub fn compile(specs: Vec<(String, RateLimitPolicySpec)>) -> Result<Self, String> {
        let mut limits = Vec::new();
        for (name, spec) in &specs {
            let policy: Arc<str> = Arc::from(name.as_str());
            for (i, limit) in spec.limits.iter().enumerate() {
                let compiled = Limit::compile(&policy, limit, &format!("spec.limits[{i}]"));
                limits.push(compiled.map_err(|e| format!("{name}: {e}"))?);
            }
        }
        Ok(RateGuard { specs, limits, epoch: Instant::now() })
    }

    /// The policies it was compiled from.
    pub fn specs(&self) -> &[(String, RateLimitPolicySpec)] {
        &self.specs
    }

    /// Whether any limit is in force.
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// Counts the request against every limit that applies to it; refuses it if one that is
    /// not a dry run is exhausted. Over-limit requests are counted in `counts`, dry runs too.
    ///
    /// A request refused by one limit has already been counted by the limits before it.
    pub fn check(&self, req: &RateRequest, counts: &RateLimitedCounts) -> Result<(), Refusal> {
        if self.limits.is_empty() {
            return Ok(());
        }
        self.check_at(req, counts, || u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    /// [`check`](Self::check) at the time `now` gives (nanoseconds from the epoch), read once
    /// and only if a limit applies.
    fn check_at(
        &self,
        req: &RateRequest,
        counts: &RateLimitedCounts,
        now: impl FnOnce() -> u64,
    ) -> Result<(), Refusal> {
        let mut now = Some(now);
        let mut at = 0;
        for limit in &self.limits {
            if !limit.applies(req) {
                continue;
            }
            if let Some(clock) = now.take() {
                at = clock();
            }
            let quota = limit.quota_for(req);
            let taken = match &quota.buckets {
                Buckets::One(b) => b.take(&quota.rate, at),
                Buckets::Keyed(k) => match limit.key.of(req) {
                    Some(key) => k.take(key.as_bytes(), &quota.rate, at),
                    None => Ok(()),
                },
            };
            let Err(wait) = taken else { continue };
            let labels = RateLimitedLabels {
                policy: limit.policy.clone(),
                key: limit.key.label(),
                dry_run: if limit.dry_run { "true" } else { "false" },
            };
            counts.get_or_create(&labels).inc();
            if !limit.dry_run {
                return Err(limit.refusal(quota, Duration::from_nanos(wait)));
            }
        }
        Ok(())
    }
}

impl Limit {
    fn compile(policy: &Arc<str>, spec: &RateLimit, field: &str) -> Result<Limit, String> {
        let patterns = |list: &[String], name: &str, norm: fn(&str) -> String| {
            list.iter()
                .enumerate()
                .map(|(j, p)| StrMatch::parse(&norm(p), &format!("{field}.{name}[{j}]")).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()
        };
        let key = key_kind(spec, field)?;
        let max_keys = spec.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
        if !(1..=MAX_KEYS_LIMIT).contains(&max_keys) {
            return Err(format!("{field}.maxKeys must be between 1 and {MAX_KEYS_LIMIT}"));
        }
        let quota = |requests: u32, burst: Option<u32>, field: &str| {
            Quota::new(policy, requests, burst, spec.unit, (key != KeyKind::Workload).then_some(max_keys), field)
        };
        let default = quota(spec.requests_per_unit, spec.burst, field)?;
        let mut overrides = Vec::with_capacity(spec.overrides.len());
        for (j, o) in spec.overrides.iter().enumerate() {
            let field = format!("{field}.overrides[{j}]");
            if o.principals.is_empty() && o.request_principals.is_empty() {
                return Err(format!("{field}: names neither principals nor requestPrincipals"));
            }
            overrides.push(Override {
                principals: patterns(&o.principals, &format!("overrides[{j}].principals"), normalise_principal)?,
                request_principals: patterns(
                    &o.request_principals,
                    &format!("overrides[{j}].requestPrincipals"),
                    str::to_string,
                )?,
                quota: quota(o.requests_per_unit, o.burst, &field)?,
            });
        }
        Ok(Limit {
            policy: policy.clone(),
            paths: patterns(&spec.paths, "paths", str::to_string)?,
            methods: patterns(&spec.methods, "methods", str::to_string)?,
            key,
            dry_run: spec.dry_run,
            default,
            overrides,
        })
    }

    fn applies(&self, req: &RateRequest) -> bool {
        (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(req.path)))
            && (self.methods.is_empty() || self.methods.iter().any(|m| m.matches(req.method.as_str())))
    }

    /// The first override naming the caller or end user, else the limit's own rate.
    fn quota_for(&self, req: &RateRequest) -> &Quota {
        let named =
            |patterns: &[StrMatch], value: Option<&str>| value.is_some_and(|v| patterns.iter().any(|p| p.matches(v)));
        self.overrides
            .iter()
            .find(|o| named(&o.principals, req.source) || named(&o.request_principals, req.principal))
            .map_or(&self.default, |o| &o.quota)
    }

    fn refusal(&self, quota: &Quota, wait: Duration) -> Refusal {
        let reset = wait.as_secs_f64().ceil().max(1.0) as u64;
        let remaining = HeaderValue::from_str(&format!("\"{}\";r=0;t={reset}", self.policy))
            .unwrap_or_else(|_| HeaderValue::from_static("r=0"));
        Refusal::RateLimited {
            policy: self.policy.to_string(),
            retry_after: wait,
            headers: vec![("ratelimit-policy", quota.policy_header.clone()), ("ratelimit", remaining)],
        }
    }
}

impl Quota {
    fn new(
        policy: &str,
        requests: u32,
        burst: Option<u32>,
        unit: RateUnit,
        max_keys: Option<u32>,
        field: &str,
    ) -> Result<Quota, String> {
        if requests == 0 {
            return Err(format!("{field}.requestsPerUnit must be at least 1"));
        }
        let burst = burst.unwrap_or(requests);
        if burst == 0 {
            return Err(format!("{field}.burst must be at least 1"));
        }
        let window = unit.seconds();
        let policy_header = HeaderValue::from_str(&format!("\"{policy}\";q={requests};w={window}"))
            .map_err(|_| format!("the policy name {policy:?} cannot be sent in a header"))?;
        Ok(Quota {
            rate: Rate::new(requests, Duration::from_secs(window), burst),
            policy_header,
            buckets: match max_keys {
                None => Buckets::One(Bucket::default()),
                Some(n) => Buckets::Keyed(KeyedBuckets::new(n as usize)),
            },
        })
    }
}

/// The limit's key: `perSource`, or exactly one field of `key`, or the whole workload.
fn key_kind(spec: &RateLimit, field: &str) -> Result<KeyKind, String> {
    let Some(k) = &spec.key else {
        return Ok(if spec.per_source { KeyKind::Source } else { KeyKind::Workload });
    };
    let set = [
        k.source.is_some(),
        k.remote_address.is_some(),
        k.header.is_some(),
        k.claim.is_some(),
        k.request_principal.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        return Err(format!(
            "{field}.key must have exactly one of source, remoteAddress, header, claim, requestPrincipal"
        ));
    }
    if spec.per_source && k.source.is_none() {
        return Err(format!("{field}: perSource and a key other than source contradict each other"));
    }
    Ok(if k.source.is_some() {
        KeyKind::Source
    } else if let Some(a) = &k.remote_address {
        KeyKind::RemoteAddress { xff_trusted_hops: a.xff_trusted_hops }
    } else if let Some(h) = &k.header {
        let name = HeaderName::from_bytes(h.trim().as_bytes())
            .map_err(|_| format!("{field}.key.header: {h:?} is not a header name"))?;
        KeyKind::Header(name)
    } else if let Some(c) = &k.claim {
        if c.trim().is_empty() {
            return Err(format!("{field}.key.claim: empty claim name"));
        }
        KeyKind::Claim(c.trim().into())
    } else {
        KeyKind::RequestPrincipal
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const BATCH: &str = "spiffe://cluster.local/ns/shop/sa/batch";
    const SEC: u64 = 1_000_000_000;

    fn guard(yaml: &str) -> RateGuard {
        let spec: RateLimitPolicySpec = serde_yaml::from_str(yaml).unwrap();
        RateGuard::compile(vec![("shop/api".into(), spec)]).unwrap()
    }

    fn compile_err(yaml: &str) -> String {
        let spec: RateLimitPolicySpec = serde_yaml::from_str(yaml).unwrap();
        RateGuard::compile(vec![("shop/api".into(), spec)]).unwrap_err()
    }

    /// A request; `with` changes it before it is checked.
    struct Req {
        method: Method,
        path: &'static str,
        source: Option<&'static str>,
        peer_ip: IpAddr,
        headers: HeaderMap,
        principal: Option<&'static str>,
        claims: Option<Claims>,
    }

    struct Claims(&'static str, &'static str);

    impl ClaimLookup for Claims {
        fn claim(&self, name: &str) -> Option<Cow<'_, str>> {
            (name == self.0).then_some(Cow::Borrowed(self.1))
        }
    }

    fn req(source: Option<&'static str>) -> Req {
        Req {
            method: Method::GET,
            path: "/api/orders",
            source,
            peer_ip: "10.0.0.1".parse().unwrap(),
            headers: HeaderMap::new(),
            principal: None,
            claims: None,
        }
    }

    impl Req {
        fn at(&self, g: &RateGuard, counts: &RateLimitedCounts, now: u64) -> Result<(), Refusal> {
            let r = RateRequest {
                method: &self.method,
                path: self.path,
                source: self.source,
                peer_ip: self.peer_ip,
                headers: &self.headers,
                principal: self.principal,
                claims: self.claims.as_ref().map(|c| c as &dyn ClaimLookup),
            };
            g.check_at(&r, counts, || now)
        }

        /// How many of `n` requests at `now` are admitted.
        fn admitted(&self, g: &RateGuard, n: usize, now: u64) -> usize {
            let counts = RateLimitedCounts::default();
            (0..n).filter(|_| self.at(g, &counts, now).is_ok()).count()
        }
    }

    fn counted(counts: &RateLimitedCounts, key: &'static str, dry_run: &'static str) -> u64 {
        counts.get_or_create(&RateLimitedLabels { policy: Arc::from("shop/api"), key, dry_run }).get()
    }

    #[test]
    fn a_refusal_says_when_to_retry_and_carries_the_draft_headers() {
        let g = guard("limits: [{requestsPerUnit: 2, unit: MINUTE, perSource: true}]");
        let counts = RateLimitedCounts::default();
        let web = req(Some(WEB));
        web.at(&g, &counts, SEC).unwrap();
        web.at(&g, &counts, SEC).unwrap();
        let refusal = web.at(&g, &counts, SEC).unwrap_err();
        assert_eq!(refusal.status(), http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refusal.grpc_status(), "8");
        assert_eq!(refusal.label(), ("rate_limit", "shop/api".to_string()));
        let headers: Vec<(&str, String)> =
            refusal.headers().into_iter().map(|(k, v)| (k, v.to_str().unwrap().to_string())).collect();
        assert_eq!(
            headers,
            [
                ("retry-after", "30".to_string()),
                ("ratelimit-policy", "\"shop/api\";q=2;w=60".to_string()),
                ("ratelimit", "\"shop/api\";r=0;t=30".to_string()),
            ]
        );
        assert_eq!(counted(&counts, "source", "false"), 1);
        // Another caller has its own bucket.
        req(Some(BATCH)).at(&g, &counts, SEC).unwrap();
        // A short wait still says one second, never zero.
        let g = guard("limits: [{requestsPerUnit: 1000, unit: SECOND, burst: 1}]");
        web.at(&g, &counts, 0).unwrap();
        let Refusal::RateLimited { retry_after, .. } = web.at(&g, &counts, 0).unwrap_err() else { panic!() };
        assert_eq!(retry_after, Duration::from_millis(1));
        assert!(web.at(&g, &counts, 0).unwrap_err().headers().contains(&("retry-after", HeaderValue::from(1u64))));
    }

    #[test]
    fn the_whole_workload_shares_one_bucket_by_default() {
        let g = guard("limits: [{requestsPerUnit: 3, unit: SECOND}]");
        assert_eq!(req(Some(WEB)).admitted(&g, 2, 0), 2);
        assert_eq!(req(Some(BATCH)).admitted(&g, 5, 0), 1);
        assert_eq!(req(None).admitted(&g, 1, SEC / 3), 1, "a third of a second refills one");
    }

    #[test]
    fn paths_and_methods_choose_the_requests_a_limit_counts() {
        let g = guard(r#"limits: [{requestsPerUnit: 1, unit: HOUR, paths: ["/api/*", "/login"], methods: ["POST"]}]"#);
        let mut r = req(Some(WEB));
        r.method = Method::POST;
        assert_eq!(r.admitted(&g, 3, 0), 1, "POST /api/orders counts");
        r.path = "/login";
        assert_eq!(r.admitted(&g, 1, 0), 0, "and shares the bucket with POST /login");
        r.path = "/login/x";
        assert_eq!(r.admitted(&g, 3, 0), 3, "an exact path is exact");
        r.path = "/api/orders";
        r.method = Method::GET;
        assert_eq!(r.admitted(&g, 3, 0), 3, "GET is not counted");
        let e = compile_err(r#"limits: [{requestsPerUnit: 1, unit: HOUR, paths: ["/a/*/b"]}]"#);
        assert!(e.starts_with("shop/api: spec.limits[0].paths[0]: pattern"), "{e}");
    }

    #[test]
    fn a_dry_run_limit_counts_and_never_refuses() {
        let g = guard("limits: [{requestsPerUnit: 1, unit: MINUTE, dryRun: true}]");
        let counts = RateLimitedCounts::default();
        for _ in 0..5 {
            req(Some(WEB)).at(&g, &counts, 0).unwrap();
        }
        assert_eq!(counted(&counts, "workload", "true"), 4);
        assert_eq!(counted(&counts, "workload", "false"), 0);
        // Next to an enforced limit, the enforced one still refuses.
        let g = guard(
            "limits: [{requestsPerUnit: 1, unit: MINUTE, dryRun: true}, {requestsPerUnit: 2, unit: MINUTE, perSource: true}]",
        );
        assert_eq!(req(Some(WEB)).admitted(&g, 5, 0), 2);
    }

    #[test]
    fn overrides_give_chosen_callers_and_end_users_their_own_rate() {
        let g = guard(
            r#"
limits:
- requestsPerUnit: 1
  unit: MINUTE
  perSource: true
  overrides:
  - {principals: ["cluster.local/ns/shop/sa/batch"], requestsPerUnit: 10}
  - {requestPrincipals: ["https://issuer.test/*"], requestsPerUnit: 4, burst: 2}
"#,
        );
        assert_eq!(req(Some(WEB)).admitted(&g, 20, 0), 1);
        assert_eq!(req(Some(BATCH)).admitted(&g, 20, 0), 10, "an Istio-style principal names batch");
        let mut user = req(Some("spiffe://cluster.local/ns/shop/sa/gateway"));
        user.principal = Some("https://issuer.test/alice");
        assert_eq!(user.admitted(&g, 20, 0), 2, "the end user's override, with its burst");
        let e = compile_err("limits: [{requestsPerUnit: 1, unit: MINUTE, overrides: [{requestsPerUnit: 5}]}]");
        assert!(e.contains("spec.limits[0].overrides[0]: names neither"), "{e}");
    }

    #[test]
    fn a_remote_address_key_ignores_forwarded_for_unless_hops_are_trusted() {
        let spoofing = |n: u32| {
            let mut r = req(Some(WEB));
            r.headers.insert("x-forwarded-for", format!("198.51.100.{n}").parse().unwrap());
            r
        };
        let g = guard("limits: [{requestsPerUnit: 2, unit: MINUTE, key: {remoteAddress: {}}}]");
        let admitted: usize = (0..10).map(|n| spoofing(n).admitted(&g, 1, 0)).sum();
        assert_eq!(admitted, 2, "one peer, one bucket, whatever it claims");
        let mut other = req(Some(WEB));
        other.peer_ip = "10.0.0.2".parse().unwrap();
        assert_eq!(other.admitted(&g, 1, 0), 1, "another peer has its own");
        let g = guard("limits: [{requestsPerUnit: 2, unit: MINUTE, key: {remoteAddress: {xffTrustedHops: 1}}}]");
        let admitted: usize = (0..10).map(|n| spoofing(n).admitted(&g, 1, 0)).sum();
        assert_eq!(admitted, 10, "with a trusted proxy in front, its entry is the client");
    }

    #[test]
    fn header_claim_and_end_user_keys() {
        let g = guard("limits: [{requestsPerUnit: 1, unit: MINUTE, key: {header: X-Api-Key}}]");
        let mut a = req(Some(WEB));
        a.headers.insert("x-api-key", "a".parse().unwrap());
        let mut b = req(Some(WEB));
        b.headers.insert("x-api-key", "b".parse().unwrap());
        assert_eq!(a.admitted(&g, 3, 0) + b.admitted(&g, 3, 0), 2);
        assert_eq!(req(Some(WEB)).admitted(&g, 3, 0) + req(Some(BATCH)).admitted(&g, 3, 0), 1, "no header: one bucket");

        let g = guard("limits: [{requestsPerUnit: 1, unit: MINUTE, key: {claim: tenant}}]");
        let tenant = |t: &'static str| {
            let mut r = req(Some(WEB));
            r.claims = Some(Claims("tenant", t));
            r
        };
        assert_eq!(tenant("a").admitted(&g, 3, 0) + tenant("b").admitted(&g, 3, 0), 2);
        assert_eq!(req(Some(WEB)).admitted(&g, 3, 0), 1, "no token: one shared bucket");

        let g = guard("limits: [{requestsPerUnit: 1, unit: MINUTE, key: {requestPrincipal: {}}}]");
        let mut alice = req(Some(WEB));
        alice.principal = Some("https://issuer.test/alice");
        assert_eq!(alice.admitted(&g, 3, 0) + req(Some(WEB)).admitted(&g, 3, 0), 2);
    }

    #[test]
    fn a_key_flood_is_bounded_per_limit() {
        let g = guard("limits: [{requestsPerUnit: 1, unit: MINUTE, key: {header: x-api-key}, maxKeys: 500}]");
        for n in 0..20_000 {
            let mut r = req(Some(WEB));
            r.headers.insert("x-api-key", n.to_string().parse().unwrap());
            r.admitted(&g, 1, n);
        }
        let Buckets::Keyed(k) = &g.limits[0].default.buckets else { panic!("a keyed limit") };
        assert!(k.len() <= 500 && k.capacity() <= 500, "{} keys", k.len());
    }

    #[test]
    fn compilation_refuses_what_would_not_work_naming_the_field() {
        for (yaml, want) in [
            ("limits: [{requestsPerUnit: 0, unit: SECOND}]", "spec.limits[0].requestsPerUnit must be at least 1"),
            ("limits: [{requestsPerUnit: 1, unit: SECOND, burst: 0}]", "spec.limits[0].burst must be at least 1"),
            ("limits: [{requestsPerUnit: 1, unit: SECOND, key: {}}]", "exactly one of"),
            ("limits: [{requestsPerUnit: 1, unit: SECOND, key: {source: {}, header: a}}]", "exactly one of"),
            ("limits: [{requestsPerUnit: 1, unit: SECOND, perSource: true, key: {header: a}}]", "contradict"),
            ("limits: [{requestsPerUnit: 1, unit: SECOND, key: {header: 'a b'}}]", "not a header name"),
            ("limits: [{requestsPerUnit: 1, unit: SECOND, key: {claim: ''}}]", "empty claim name"),
            ("limits: [{requestsPerUnit: 1, unit: SECOND, maxKeys: 0}]", "maxKeys"),
        ] {
            let e = compile_err(yaml);
            assert!(e.contains(want), "{yaml}: {e}");
        }
        // A typo is a decoding error, not a silently wider limit.
        assert!(
            serde_yaml::from_str::<RateLimitPolicySpec>("limits: [{requestsPerUnit: 1, unit: SECOND, method: [GET]}]")
                .is_err()
        );
        // perSource and key: {source: {}} are the same limit.
        let g = guard("limits: [{requestsPerUnit: 1, unit: SECOND, perSource: true, key: {source: {}}}]");
        assert_eq!(g.limits[0].key, KeyKind::Source);
    }

    #[test]
    fn no_limits_no_work() {
        let g = RateGuard::default();
        assert!(g.is_empty());
        let r = req(Some(WEB));
        let rr = RateRequest {
            method: &r.method,
            path: r.path,
            source: r.source,
            peer_ip: r.peer_ip,
            headers: &r.headers,
            principal: None,
            claims: None,
        };
        assert!(g.check(&rr, &RateLimitedCounts::default()).is_ok());
    }
}
