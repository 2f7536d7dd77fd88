//! Sources of configuration: where the mesh's resources come from, behind one trait.
//!
//! - [`file`]: a directory of YAML manifests in exactly the CRD format, watched (standalone).
//! - [`kubernetes`]: the CRDs, Pods, Services and EndpointSlices (as [`kube_services`]'
//!   mesh services) and Gateway API routes, watched through the API server.
//!
//! Both hand every object to [`validate`], the one place that decodes a spec into its typed form
//! and compiles it (rules, Rego, Wasm) the way a sidecar will. An object that fails is reported
//! with where it came from and left out, or its last good version kept; the rest of the mesh's
//! configuration is not held back by it. So a sidecar only ever receives resources that compiled
//! here: a NACK can only be about that sidecar's own compilation.

pub mod cluster_table;
pub mod file;
pub mod kube_rollout;
pub mod kube_services;
pub mod kubernetes;

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::discovery::MeshState;
use crate::guard::jwt::RequestAuthenticationSpec;
use crate::guard::rate::RateLimitPolicySpec;
use crate::guard::security::WorkloadSecuritySpec;
use crate::k8s::crd::PeerAuthenticationSpec;
use crate::policy::resource::{AuthorizationPolicy, AuthorizationPolicySpec, WorkloadSelector};
use crate::proto::discovery::Endpoint;
use crate::proxy::http_route::{GrpcRouteSpec, HttpRouteSpec};
use crate::proxy::service::MeshServiceSpec;

/// The kinds the mesh understands.
pub const KINDS: &[&str] = &[
    "AuthorizationPolicy",
    "PeerAuthentication",
    "RequestAuthentication",
    "RateLimitPolicy",
    "WorkloadSecurity",
    "MeshService",
    "HTTPRoute",
    "GRPCRoute",
];

/// Kinds validated and pushed to sidecars that do not enforce them yet. Said in logs and
/// Kubernetes status, so nobody mistakes one for a protection. Every kind is enforced today.
pub const NOT_ENFORCED: &[&str] = &[];

/// A resource's spec, decoded into its typed form.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    AuthorizationPolicy(AuthorizationPolicySpec),
    PeerAuthentication(PeerAuthenticationSpec),
    RequestAuthentication(RequestAuthenticationSpec),
    RateLimitPolicy(RateLimitPolicySpec),
    WorkloadSecurity(WorkloadSecuritySpec),
    /// Not selected by workload: every sidecar is sent every service (it may call any).
    MeshService(MeshServiceSpec),
    /// Gateway API (`gateway.networking.k8s.io`), attached to a service: sent to every sidecar.
    HttpRoute(HttpRouteSpec),
    GrpcRoute(GrpcRouteSpec),
}

impl Spec {
    /// The kind's name, as in manifests.
    pub fn kind(&self) -> &'static str {
        match self {
            Spec::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Spec::PeerAuthentication(_) => "PeerAuthentication",
            Spec::RequestAuthentication(_) => "RequestAuthentication",
            Spec::RateLimitPolicy(_) => "RateLimitPolicy",
            Spec::WorkloadSecurity(_) => "WorkloadSecurity",
            Spec::MeshService(_) => "MeshService",
            Spec::HttpRoute(_) => "HTTPRoute",
            Spec::GrpcRoute(_) => "GRPCRoute",
        }
    }

    fn selector(&self) -> Option<&WorkloadSelector> {
        match self {
            Spec::AuthorizationPolicy(s) => s.selector.as_ref(),
            Spec::PeerAuthentication(s) => s.selector.as_ref(),
            Spec::RequestAuthentication(s) => s.selector.as_ref(),
            Spec::RateLimitPolicy(s) => s.selector.as_ref(),
            Spec::WorkloadSecurity(s) => s.selector.as_ref(),
            Spec::MeshService(_) | Spec::HttpRoute(_) | Spec::GrpcRoute(_) => None,
        }
    }

    /// The spec as the typed JSON sidecars decode (the wire form of a snapshot's resources).
    pub fn to_json(&self) -> String {
        let json = match self {
            Spec::AuthorizationPolicy(s) => serde_json::to_string(s),
            Spec::PeerAuthentication(s) => serde_json::to_string(s),
            Spec::RequestAuthentication(s) => serde_json::to_string(s),
            Spec::RateLimitPolicy(s) => serde_json::to_string(s),
            Spec::WorkloadSecurity(s) => serde_json::to_string(s),
            Spec::MeshService(s) => serde_json::to_string(s),
            Spec::HttpRoute(s) => serde_json::to_string(s),
            Spec::GrpcRoute(s) => serde_json::to_string(s),
        };
        json.expect("typed specs always serialize")
    }
}

/// One validated resource, as every other part of the control plane sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub namespace: String,
    pub name: String,
    /// `metadata.labels` (policies carry them into decisions' names only).
    pub labels: BTreeMap<String, String>,
    pub spec: Spec,
    /// Where it came from: `FILE#DOC` or `kubernetes:KIND/NS/NAME`.
    pub origin: String,
}

impl Resource {
    /// The kind's name.
    pub fn kind(&self) -> &'static str {
        self.spec.kind()
    }

    /// `spec.selector.matchLabels`, if any.
    pub fn match_labels(&self) -> Option<&BTreeMap<String, String>> {
        self.spec.selector().map(|s| &s.match_labels)
    }

    /// Whether this resource applies to a workload in `namespace` with `labels` (a mesh
    /// service and its routes apply to every workload: any may call it).
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        if matches!(self.spec, Spec::MeshService(_) | Spec::HttpRoute(_) | Spec::GrpcRoute(_)) {
            return true;
        }
        self.namespace == namespace
            && self.match_labels().is_none_or(|want| want.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }

    /// `(kind, namespace, name)`: what identifies an object across edits.
    pub fn key(&self) -> (&'static str, &str, &str) {
        (self.kind(), &self.namespace, &self.name)
    }
}

/// A resource that was refused, with where and why.
#[derive(Debug, thiserror::Error, Clone, PartialEq, serde::Serialize)]
pub struct ResourceError {
    /// The file, or `kubernetes:KIND/NS/NAME`.
    pub origin: String,
    /// Document index within a file, from 0.
    pub document: Option<usize>,
    /// Line and column (from 1) within the file, where known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// `KIND NS/NAME`, when it could be read.
    pub object: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ResourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if let Some(d) = self.document {
            write!(f, ": document {d}")?;
        }
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Why [`validate`] refused an object.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub message: String,
}

impl<T: std::fmt::Display> From<T> for Invalid {
    fn from(e: T) -> Self {
        Invalid { message: e.to_string() }
    }
}

/// Decodes `spec` as `kind` and checks it the way a sidecar will use it: an
/// `AuthorizationPolicy` is compiled (rules, Rego, Wasm), so one that does not compile never
/// leaves the control plane. The one validation both sources run.
pub fn validate(
    kind: &str,
    namespace: &str,
    name: &str,
    labels: BTreeMap<String, String>,
    spec: serde_json::Value,
    origin: String,
) -> Result<Resource, Invalid> {
    let decode = |what: &str, e: serde_json::Error| Invalid { message: format!("{what}: {e}") };
    let spec = match kind {
        "AuthorizationPolicy" => {
            let spec: AuthorizationPolicySpec = serde_json::from_value(spec).map_err(|e| decode("spec", e))?;
            compile_authorization(namespace, name, &labels, &spec)?;
            Spec::AuthorizationPolicy(spec)
        }
        "PeerAuthentication" => {
            let spec: PeerAuthenticationSpec = serde_json::from_value(spec).map_err(|e| decode("spec", e))?;
            if let Some(port) = spec.port_level_mtls.keys().find(|p| p.parse::<u16>().is_err()) {
                return Err(format!("spec.portLevelMtls: {port:?} is not a port number").into());
            }
            Spec::PeerAuthentication(spec)
        }
        // The sidecar's own compilation, run here first.
        "RequestAuthentication" => {
            let spec: RequestAuthenticationSpec = serde_json::from_value(spec).map_err(|e| decode("spec", e))?;
            // The control plane fills `jwks` from `jwksUri` for sidecars; a user gives one.
            if let Some(i) = spec.jwt_rules.iter().position(|r| r.jwks.is_some() && r.jwks_uri.is_some()) {
                return Err(format!("spec.jwtRules[{i}]: give jwks or jwksUri, not both").into());
            }
            crate::guard::jwt::JwtGuard::compile(vec![spec.clone()])?;
            Spec::RequestAuthentication(spec)
        }
        "RateLimitPolicy" => {
            let spec: RateLimitPolicySpec = serde_json::from_value(spec).map_err(|e| decode("spec", e))?;
            crate::guard::rate::RateGuard::compile(vec![(format!("{namespace}/{name}"), spec.clone())])?;
            Spec::RateLimitPolicy(spec)
        }
        "WorkloadSecurity" => {
            let spec: WorkloadSecuritySpec = serde_json::from_value(spec).map_err(|e| decode("spec", e))?;
            crate::guard::security::SecurityGuard::compile(vec![spec.clone()])?;
            Spec::WorkloadSecurity(spec)
        }
        "MeshService" => {
            let spec: MeshServiceSpec = serde_json::from_value(spec).map_err(|e| decode("spec", e))?;
            spec.check()?;
            Spec::MeshService(spec)
        }
        "HTTPRoute" => {
            let spec: HttpRouteSpec = serde_json::from_value(spec).map_err(|e| decode("spec", e))?;
            spec.check_in(namespace)?;
            Spec::HttpRoute(spec)
        }
        "GRPCRoute" => {
            let spec: GrpcRouteSpec = serde_json::from_value(spec).map_err(|e| decode("spec", e))?;
            spec.check_in(namespace)?;
            Spec::GrpcRoute(spec)
        }
        other => return Err(format!("kind {other:?} is not one of {KINDS:?}").into()),
    };
    Ok(Resource { namespace: namespace.to_string(), name: name.to_string(), labels, spec, origin })
}

fn compile_authorization(
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    spec: &AuthorizationPolicySpec,
) -> Result<(), Invalid> {
    let doc = AuthorizationPolicy::from_spec(namespace, name, labels, spec.clone());
    crate::policy::Policy::compile(&doc).map(|_| ()).map_err(Invalid::from)
}

/// What a source knows at one moment.
#[derive(Debug, Default)]
pub struct SourceState {
    /// Every resource in force: the valid ones, and the last good version of refused ones.
    pub resources: Vec<Resource>,
    /// Every object refused now.
    pub errors: Vec<ResourceError>,
    /// Workload and service addresses the source knows without any sidecar registering them
    /// (Kubernetes pods and Services); `None` for a source that knows none.
    pub endpoints: Option<Vec<Endpoint>>,
}

/// A source of configuration. The control plane reads its first state before serving, so no
/// sidecar is ever sent a snapshot built before the resources were read, then follows it.
pub trait ConfigSource: Send + 'static {
    /// Reads what exists now.
    fn initial(&mut self) -> impl Future<Output = anyhow::Result<SourceState>> + Send;
    /// Waits until something changed and returns the new state.
    fn changed(&mut self) -> impl Future<Output = SourceState> + Send;
}

/// Where a source's states go: the mesh (what is pushed) and the error list (what is shown).
#[derive(Clone)]
pub struct Sink {
    pub mesh: Arc<MeshState>,
    pub errors: Arc<ArcSwap<Vec<ResourceError>>>,
}

impl Sink {
    fn apply(&self, mut state: SourceState) {
        state.resources.sort_by(|a, b| a.key().cmp(&b.key()));
        self.mesh.set_resources(state.resources);
        if let Some(endpoints) = state.endpoints {
            self.mesh.set_cluster_endpoints(endpoints);
        }
        self.errors.store(Arc::new(state.errors));
    }
}

/// Reads `source`'s first state into `sink`, then follows it on a task of its own.
pub async fn start(mut source: impl ConfigSource, sink: Sink) -> anyhow::Result<()> {
    sink.apply(source.initial().await?);
    tokio::spawn(async move {
        loop {
            let state = source.changed().await;
            sink.apply(state);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(kind: &str, spec: serde_json::Value) -> Result<Resource, Invalid> {
        validate(kind, "shop", "p", BTreeMap::new(), spec, "test".into())
    }

    #[test]
    fn validation_compiles_policies_and_checks_what_a_schema_cannot() {
        let both =
            serde_json::json!({"rules": [], "rego": {"module": "package x\nallow := true", "entrypoint": "x/allow"}});
        let e = check("AuthorizationPolicy", both).unwrap_err().message;
        assert!(e.contains("rules") || e.contains("exactly one"), "{e}");
        let bad_rego = serde_json::json!({"rego": {"module": "package x\nallow := {", "entrypoint": "x/allow"}});
        assert!(check("AuthorizationPolicy", bad_rego).is_err());
        let typo = serde_json::json!({"rules": [{"to": [{"operation": {"method": ["GET"]}}]}]});
        assert!(check("AuthorizationPolicy", typo).unwrap_err().message.contains("method"));
        let ok = serde_json::json!({"action": "ALLOW", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]});
        let r = check("AuthorizationPolicy", ok).unwrap();
        assert_eq!(r.key(), ("AuthorizationPolicy", "shop", "p"));
        let zero = serde_json::json!({"limits": [{"requestsPerUnit": 0, "unit": "SECOND"}]});
        assert!(check("RateLimitPolicy", zero).unwrap_err().message.contains("limits[0]"));
        let both = serde_json::json!({"jwtRules": [{"issuer": "https://i.test", "jwksUri": "https://i.test/k",
                                                    "jwks": "{\"keys\": []}"}]});
        assert!(check("RequestAuthentication", both).unwrap_err().message.contains("not both"));
        let plain = serde_json::json!({"jwtRules": [{"issuer": "https://i.test", "jwksUri": "http://i.test/k"}]});
        assert!(check("RequestAuthentication", plain).unwrap_err().message.contains("https"));
        let no_keys = serde_json::json!({"jwtRules": [{"issuer": "https://i.test", "jwks": "{\"keys\": []}"}]});
        assert!(check("RequestAuthentication", no_keys).unwrap_err().message.contains("jwtRules[0].jwks"));
        let port = serde_json::json!({"portLevelMtls": {"http": {"mode": "PERMISSIVE"}}});
        assert!(check("PeerAuthentication", port).unwrap_err().message.contains("port"));
        assert!(check("Pod", serde_json::json!({})).is_err());
        let nobody = serde_json::json!({"identities": []});
        assert!(check("MeshService", nobody).unwrap_err().message.contains("at least one identity"));
        let not_an_id = serde_json::json!({"identities": ["orders"]});
        assert!(check("MeshService", not_an_id).unwrap_err().message.contains("identities[0]"));
        let service = check("MeshService", serde_json::json!({"identities": ["spiffe://cluster.local/ns/shop/sa/a"]}));
        assert!(service.unwrap().selects("other-namespace", &BTreeMap::new()), "every sidecar may call a service");
    }

    #[test]
    fn the_wire_form_decodes_into_the_document_the_sidecar_compiles() {
        let spec = serde_json::json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]});
        let r = check("AuthorizationPolicy", spec).unwrap();
        let decoded: AuthorizationPolicySpec = serde_json::from_str(&r.spec.to_json()).unwrap();
        assert_eq!(Spec::AuthorizationPolicy(decoded.clone()), r.spec);
        crate::policy::Policy::compile(&AuthorizationPolicy::from_spec("shop", "p", &r.labels, decoded)).unwrap();
    }
}
