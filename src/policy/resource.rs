//! The `AuthorizationPolicy` resource (`palisade.io/v1alpha1`): the same YAML in files now and as a
//! CRD later. These types only describe the document; [`super::Policy::compile`] checks and
//! compiles it.
//!
//! Every struct rejects unknown fields so that a typo (`method:` for `methods:`) is a load error
//! instead of a silently wider policy.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The only API version this build understands.
pub const API_VERSION: &str = "palisade.io/v1alpha1";
/// The resource kind.
pub const KIND: &str = "AuthorizationPolicy";

/// One `AuthorizationPolicy` document as written by a user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// Must be [`KIND`].
    pub kind: String,
    /// Name and namespace: a policy applies only to workloads of its namespace.
    pub metadata: ObjectMeta,
    /// What the policy selects and decides.
    pub spec: AuthorizationPolicySpec,
}

impl AuthorizationPolicy {
    /// The document for a policy known by namespace, name and typed spec: how the control plane
    /// compiles a resource and how a sidecar compiles what it was sent, so both compile the same.
    pub fn from_spec(
        namespace: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        spec: AuthorizationPolicySpec,
    ) -> Self {
        AuthorizationPolicy {
            api_version: API_VERSION.to_string(),
            kind: KIND.to_string(),
            metadata: ObjectMeta {
                name: name.to_string(),
                namespace: namespace.to_string(),
                labels: labels.clone(),
                annotations: BTreeMap::new(),
            },
            spec,
        }
    }
}

/// The subset of Kubernetes object metadata a policy uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Unique within the namespace.
    pub name: String,
    /// The namespace whose workloads the policy may select.
    pub namespace: String,
    /// Free-form labels (not used for selection).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The policy body: a selector, an action and exactly one of `rules`, `rego` or `wasm`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Which workloads of the namespace the policy applies to; absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// What a match does.
    #[serde(default)]
    pub action: Action,
    /// Declarative rules: any rule matches. A policy with `rules: []` (or none at all) matches
    /// nothing, as in Istio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<Rule>>,
    /// A Rego module evaluated by the embedded interpreter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rego: Option<RegoSource>,
    /// An OPA WebAssembly bundle built by `opa build -t wasm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmSource>,
}

/// Selects workloads by label.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Every pair must be present on the workload.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// What happens when a policy matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// A match allows the request (when no DENY matches).
    #[default]
    Allow,
    /// A match denies the request, whatever else allows it.
    Deny,
    /// A match is recorded in the decision but never changes it.
    Audit,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        })
    }
}

/// One Istio-style rule: every non-empty part (`from`, `to`, `when`) must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// Any entry matches; empty: any source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<From>,
    /// Any entry matches; empty: any operation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<To>,
    /// Every condition must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// A `from` entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    /// Who the caller is.
    pub source: Source,
}

/// Properties of the caller; every non-empty list must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// SPIFFE IDs of the caller (wildcards allowed; `spiffe://` may be omitted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// The caller must match none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// Namespace of the caller's SPIFFE ID.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// The caller's namespace must match none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// CIDRs or single addresses of the peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    /// The peer address must be in none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// The end user of a verified token, `<iss>/<sub>` (wildcards allowed; `*`: any verified
    /// token). A request without a token matches none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    /// The end user must match none of these (`["*"]`: requests without a token).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
}

/// A `to` entry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    /// What the caller asks for.
    pub operation: Operation,
}

/// Properties of the request; every non-empty list must match.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    /// HTTP methods, e.g. `GET`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// The method must match none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Request paths without the query string (wildcards allowed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// The path must match none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    /// Destination ports (numbers or strings).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// The destination port must be none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<Port>,
    /// Host header values, compared case-insensitively (wildcards allowed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// The host must match none of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
}

/// A port as written: Istio writes ports as strings, people write numbers; both are accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Port {
    /// `8080`
    Number(u64),
    /// `"8080"`
    Text(String),
}

/// Kubernetes' own spelling of "a number or a string".
impl JsonSchema for Port {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Port".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "x-kubernetes-int-or-string": true })
    }
}

/// A `when` condition: `key` must match one of `values` and none of `notValues`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    /// What to look at, e.g. `request.headers[x-tenant]` or `source.namespace`.
    pub key: String,
    /// Accepted values (wildcards allowed; CIDRs for `source.ip`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Refused values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// A Rego module and the rule that decides.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegoSource {
    /// The module source text.
    pub module: String,
    /// The deciding rule as a path, e.g. `shop/orders/allow` (→ `data.shop.orders.allow`).
    pub entrypoint: String,
}

/// An OPA WebAssembly bundle built by `opa build -t wasm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WasmSource {
    /// Base64 of the bundle.
    pub bundle: String,
    /// The deciding rule as a path, e.g. `shop/orders/allow`.
    pub entrypoint: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: orders-read, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/shop/sa/web"], namespaces: [], ipBlocks: [], notPrincipals: []}}]
    to:   [{operation: {methods: ["GET"], paths: ["/orders/*"], ports: [8080, "9090"], hosts: [], notPaths: []}}]
    when: [{key: "request.headers[x-tenant]", values: ["a"]}]
"#;

    #[test]
    fn parses_the_issue_example() {
        let p: AuthorizationPolicy = serde_yaml::from_str(FULL).unwrap();
        assert_eq!(p.metadata.namespace, "shop");
        assert_eq!(p.spec.action, Action::Allow);
        let rules = p.spec.rules.unwrap();
        assert_eq!(rules[0].to[0].operation.methods, ["GET"]);
        assert_eq!(rules[0].to[0].operation.ports, [Port::Number(8080), Port::Text("9090".into())]);
        assert_eq!(rules[0].when[0].key, "request.headers[x-tenant]");
    }

    #[test]
    fn rejects_unknown_fields_with_a_location() {
        let typo = FULL.replace("methods:", "method:");
        let err = serde_yaml::from_str::<AuthorizationPolicy>(&typo).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field `method`"), "{msg}");
        assert!(err.location().is_some());
    }

    #[test]
    fn rejects_unknown_action() {
        let bad = FULL.replace("action: ALLOW", "action: PERMIT");
        assert!(serde_yaml::from_str::<AuthorizationPolicy>(&bad).is_err());
    }
}
