//! The outcome of authorising one request, and the mesh default that applies when no policy
//! has a say.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::engine::EngineKind;
use super::resource::Action;

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

/// Who decided a request: a policy, or which step of the evaluation order when none did.
/// Readers match on it (the proxy names it in `x-palisade-denied-by`, the access log and the
/// `policy` label of `palisade_authz_decisions_total`); `reason` says the same for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decider {
    /// A DENY policy matched, or an ALLOW policy allowed. The id is shared with the policy,
    /// not copied per request.
    Policy { id: Arc<str>, action: Action },
    /// ALLOW policies select the workload and none allowed.
    NoAllowMatched,
    /// No ALLOW or DENY policy selects the workload: the mesh default decided.
    Default(DefaultPolicy),
    /// No policy has been received yet: the workload fails closed.
    FailClosed,
}

impl Decider {
    /// The name users see: the policy's `namespace/name`, else `no-allow-matched`,
    /// `mesh-default` or `no-policy-yet`.
    pub fn name(&self) -> &str {
        match self {
            Decider::Policy { id, .. } => id,
            Decider::NoAllowMatched => "no-allow-matched",
            Decider::Default(_) => "mesh-default",
            Decider::FailClosed => "no-policy-yet",
        }
    }

    /// The deciding policy's `namespace/name`, if a policy decided.
    pub fn policy(&self) -> Option<&Arc<str>> {
        match self {
            Decider::Policy { id, .. } => Some(id),
            _ => None,
        }
    }
}

impl std::fmt::Display for Decider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Serialised as `"policy"` (the deciding policy's name or `null`, as before there was a
/// decider) and `"decided_by"` (the [`Decider::name`]).
impl Serialize for Decider {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Decider", 2)?;
        st.serialize_field("policy", &self.policy())?;
        st.serialize_field("decided_by", self.name())?;
        st.end()
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
    /// Who decided.
    #[serde(flatten)]
    pub decider: Decider,
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
    /// A decision with no engine behind it.
    pub(crate) fn bare(allowed: bool, decider: Decider, reason: impl Into<String>) -> Self {
        Decision {
            allowed,
            decider,
            engine: None,
            reason: reason.into(),
            http_status: None,
            headers: BTreeMap::new(),
            body: None,
            audits: Vec::new(),
        }
    }

    /// `namespace/name` of the deciding policy; `None` when a step of the evaluation order
    /// decided (see [`Decision::decider`]).
    pub fn policy(&self) -> Option<&str> {
        self.decider.policy().map(|id| &**id)
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
        let d = Decision::bare(false, Decider::FailClosed, "no policy");
        let j = serde_json::to_value(&d).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"allowed": false, "policy": null, "decided_by": "no-policy-yet", "engine": null, "reason": "no policy"})
        );
        let d = Decision::bare(true, Decider::Policy { id: Arc::from("shop/web"), action: Action::Allow }, "matched");
        let j = serde_json::to_value(&d).unwrap();
        assert_eq!((&j["policy"], &j["decided_by"]), (&serde_json::json!("shop/web"), &serde_json::json!("shop/web")));
    }
}
