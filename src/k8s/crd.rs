//! The `palisade.io/v1alpha1` custom resources, generated from these types into `deploy/crds/`.
//!
//! `AuthorizationPolicy` reuses the policy engine's own spec types, so the schema the API server
//! enforces and the document the engine compiles cannot drift apart. The API server's schema
//! catches shape errors at `kubectl apply`; what only the engine can judge (a Rego module that
//! does not compile, `rules` and `rego` together) is reported in `status.conditions`.

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::resource::WorkloadSelector;

/// Acceptance as the control plane saw it (written by the leader replica), and the rollout
/// among the sidecars the object selects (written by every replica for its own sidecars).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PalisadeStatus {
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`: `True`, or `False` with reason `Invalid` and a message saying what is wrong.
    #[serde(default)]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// How many connected sidecars the object selects, over every control-plane replica; how many
/// run the version that carries the object as it is now; how many refused (NACKed) it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    pub selected: u32,
    pub current: u32,
    pub nacked: u32,
    /// Each replica's own counts, by replica (pod) name; an entry not refreshed for three
    /// minutes no longer counts.
    #[serde(default)]
    pub replicas: BTreeMap<String, ReplicaRollout>,
}

/// One replica's counts for its own sidecars.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaRollout {
    pub selected: u32,
    pub current: u32,
    pub nacked: u32,
    /// The `metadata.generation` the counts are for.
    pub observed_generation: i64,
    /// When the replica wrote them (Unix seconds).
    pub updated: i64,
}

/// Who may call a workload, and how: the spec of the policy engine itself.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "palisade.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PalisadeStatus",
    shortname = "authz",
    category = "palisade",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Selected","type":"integer","jsonPath":".status.rollout.selected"}"#,
    printcolumn = r#"{"name":"Current","type":"integer","jsonPath":".status.rollout.current"}"#,
    printcolumn = r#"{"name":"NACKed","type":"integer","jsonPath":".status.rollout.nacked"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct AuthorizationPolicySpec {
    #[serde(flatten)]
    pub policy: crate::policy::resource::AuthorizationPolicySpec,
}

/// Whether workloads accept plaintext next to mutual TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Mutual TLS only (the default: zero trust).
    #[default]
    Strict,
    /// Mutual TLS and plaintext, for migration.
    Permissive,
}

/// The mode for all ports, or for one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MtlsSetting {
    pub mode: MtlsMode,
}

/// Mutual-TLS requirements of the selected workloads (namespace-wide without a selector).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "palisade.io",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    status = "PalisadeStatus",
    shortname = "peerauthn",
    category = "palisade",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Selected","type":"integer","jsonPath":".status.rollout.selected"}"#,
    printcolumn = r#"{"name":"Current","type":"integer","jsonPath":".status.rollout.current"}"#,
    printcolumn = r#"{"name":"NACKed","type":"integer","jsonPath":".status.rollout.nacked"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSetting>,
    /// Per-port overrides, keyed by port number.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<String, MtlsSetting>,
}

/// End-user (JWT) authentication of requests to the selected workloads.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "palisade.io",
    version = "v1alpha1",
    kind = "RequestAuthentication",
    namespaced,
    status = "PalisadeStatus",
    shortname = "reqauthn",
    category = "palisade",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Selected","type":"integer","jsonPath":".status.rollout.selected"}"#,
    printcolumn = r#"{"name":"Current","type":"integer","jsonPath":".status.rollout.current"}"#,
    printcolumn = r#"{"name":"NACKed","type":"integer","jsonPath":".status.rollout.nacked"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct RequestAuthenticationSpec {
    #[serde(flatten)]
    pub spec: crate::guard::jwt::RequestAuthenticationSpec,
}

/// Request rate limits of the selected workloads.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "palisade.io",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    namespaced,
    status = "PalisadeStatus",
    shortname = "ratelimit",
    category = "palisade",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Selected","type":"integer","jsonPath":".status.rollout.selected"}"#,
    printcolumn = r#"{"name":"Current","type":"integer","jsonPath":".status.rollout.current"}"#,
    printcolumn = r#"{"name":"NACKed","type":"integer","jsonPath":".status.rollout.nacked"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct RateLimitPolicySpec {
    #[serde(flatten)]
    pub spec: crate::guard::rate::RateLimitPolicySpec,
}

/// Request and response hardening of the selected workloads: a body limit and the response
/// headers browsers act on.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "palisade.io",
    version = "v1alpha1",
    kind = "WorkloadSecurity",
    plural = "workloadsecurities",
    namespaced,
    status = "PalisadeStatus",
    shortname = "wlsec",
    category = "palisade",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Selected","type":"integer","jsonPath":".status.rollout.selected"}"#,
    printcolumn = r#"{"name":"Current","type":"integer","jsonPath":".status.rollout.current"}"#,
    printcolumn = r#"{"name":"NACKed","type":"integer","jsonPath":".status.rollout.nacked"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct WorkloadSecuritySpec {
    #[serde(flatten)]
    pub spec: crate::guard::security::WorkloadSecuritySpec,
}

/// Every CRD, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        AuthorizationPolicy::crd(),
        PeerAuthentication::crd(),
        RequestAuthentication::crd(),
        RateLimitPolicy::crd(),
        WorkloadSecurity::crd(),
    ]
}

/// The file name of a CRD under `deploy/crds/`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("crd"))
}

/// One CRD as the YAML committed under `deploy/crds/`.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    let body = serde_yaml::to_string(crd).expect("a CRD always serializes");
    format!("# Generated by `palisade k8s crds --out deploy/crds`; do not edit.\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_crds_are_what_the_code_generates() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/crds");
        for crd in crds() {
            let path = dir.join(file_name(&crd));
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == to_yaml(&crd),
                "{} differs from the generated CRD: run `cargo run -- k8s crds --out deploy/crds`",
                path.display()
            );
        }
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(files, crds().len(), "deploy/crds holds a file the code no longer generates");
    }

    #[test]
    fn schemas_are_structural() {
        // The API server refuses a CRD whose schema mixes `properties` with
        // `additionalProperties`, or uses `anyOf` with types; catch that before it does.
        for crd in crds() {
            let text = serde_json::to_string(&crd).unwrap();
            assert!(!text.contains("\"$ref\""), "{text}");
            assert!(!text.contains("additionalProperties\":false"), "{text}");
        }
    }
}
