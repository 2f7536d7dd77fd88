//! `RequestAuthentication`: end-user tokens (JWT) verified at the sidecar.
//!
//! The spec types are the schema of the CRD and of the wire (the CRD in `k8s::crd` wraps them).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::resource::WorkloadSelector;

/// Where a JWT is read from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtHeader {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// One trusted token issuer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtRule {
    pub issuer: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where the issuer's keys are published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The keys inline, as a JWKS document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Default: `Authorization: Bearer`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default)]
    pub forward_original_token: bool,
}

/// End-user (JWT) authentication of requests to the selected workloads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    pub jwt_rules: Vec<JwtRule>,
}

/// The compiled `RequestAuthentication` rules that select one workload. Empty: no token is
/// looked at, and requests carry no request principal.
#[derive(Debug, Default)]
pub struct JwtGuard {
    rules: Vec<RequestAuthenticationSpec>,
}

impl JwtGuard {
    /// Compiles the specs selecting a workload.
    pub fn compile(specs: Vec<RequestAuthenticationSpec>) -> Result<Self, String> {
        for spec in &specs {
            if let Some(r) = spec.jwt_rules.iter().find(|r| r.jwks.is_none() && r.jwks_uri.is_none()) {
                return Err(format!("spec.jwtRules: issuer {:?} has neither jwksUri nor jwks", r.issuer));
            }
        }
        Ok(JwtGuard { rules: specs })
    }

    /// The specs it was compiled from.
    pub fn specs(&self) -> &[RequestAuthenticationSpec] {
        &self.rules
    }

    /// Whether any rule is in force.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}
