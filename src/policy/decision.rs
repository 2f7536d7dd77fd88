//! The outcome of authorising one request, and the mesh default that applies when no policy
//! has a say.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::engine::EngineKind;

/// What the mesh does for a workload that no ALLOW or DENY policy selects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultPolicy {
    /// Zero trust: refuse.
    #[default]
    Deny,
    /// Allow callers that presented a mesh certificate.
    AllowAuthenticated,
    /// Allow everything (migration only).
    Allow,
}

impl std::fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DefaultPolicy::Deny => "deny",
            DefaultPolicy::AllowAuthenticated => "allow-authenticated",
            DefaultPolicy::Allow => "allow",
        })
    }
}

impl std::str::FromStr for DefaultPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "deny" => Ok(DefaultPolicy::Deny),
            "allow-authenticated" => Ok(DefaultPolicy::AllowAuthenticated),
            "allow" => Ok(DefaultPolicy::Allow),
            other => Err(format!("unknown default policy {other:?} (deny, allow-authenticated, allow)")),
        }
    }
}

/// The answer for one request.
///
/// The proxy turns a denial into HTTP 403 (or `http_status` when a Rego policy chose one) with
/// `headers` and `body`, gRPC `PERMISSION_DENIED`, or a closed TCP connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Let the request through?
    pub allowed: bool,
    /// `namespace/name` of the deciding policy; `None` for the mesh default, a failed-closed
    /// set, or "no ALLOW policy matched". Shared with the policy, not copied per request.
    pub policy: Option<Arc<str>>,
    /// The engine of the deciding policy.
    pub engine: Option<EngineKind>,
    /// Why, in words: which rule matched, or what was missing.
    pub reason: String,
    /// Status chosen by a Rego policy's object result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Headers chosen by a Rego policy's object result.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Body chosen by a Rego policy's object result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// AUDIT policies that selected the workload, each `namespace/name: result`; they never
    /// change `allowed`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audits: Vec<String>,
}

impl Decision {
    /// A decision with no policy behind it.
    pub(crate) fn bare(allowed: bool, reason: impl Into<String>) -> Self {
        Decision {
            allowed,
            policy: None,
            engine: None,
            reason: reason.into(),
            http_status: None,
            headers: BTreeMap::new(),
            body: None,
            audits: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_round_trips() {
        for d in [DefaultPolicy::Deny, DefaultPolicy::AllowAuthenticated, DefaultPolicy::Allow] {
            assert_eq!(d.to_string().parse::<DefaultPolicy>(), Ok(d));
        }
        assert!("permit".parse::<DefaultPolicy>().is_err());
        assert_eq!(DefaultPolicy::default(), DefaultPolicy::Deny);
    }

    #[test]
    fn decision_serialises_compactly() {
        let d = Decision::bare(false, "no policy");
        let j = serde_json::to_value(&d).unwrap();
        assert_eq!(j, serde_json::json!({"allowed": false, "policy": null, "engine": null, "reason": "no policy"}));
    }
}
