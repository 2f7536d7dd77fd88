//! `palisade policy explain`: which policy and rule decided a request, and why every other
//! policy did not — the question mesh users otherwise answer by reading proxy debug logs.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::decision::{Decision, DefaultPolicy};
use super::engine::EngineKind;
use super::resource::Action;

/// What one policy made of the request.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyTrace {
    /// `namespace/name`.
    pub policy: String,
    /// ALLOW, DENY or AUDIT.
    pub action: Action,
    /// Its engine.
    pub engine: EngineKind,
    /// Whether it applies to the workload at all.
    pub selected: bool,
    /// If not selected, why (namespace or label mismatch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_selected_because: Option<String>,
    /// This policy decided the request.
    pub decided: bool,
    /// For a selected policy: a rule matched / the Rego module allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched: Option<bool>,
    /// The matching rule, or for each rule the first clause that failed, or the Rego result.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

/// A decision with its workings.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// The workload's SPIFFE ID (`None` for a fail-closed set).
    pub workload: Option<String>,
    /// The workload's labels.
    pub labels: BTreeMap<String, String>,
    /// The mesh default in force.
    pub default_policy: DefaultPolicy,
    /// What was decided.
    pub decision: Decision,
    /// Every policy known, in evaluation order within its action.
    pub policies: Vec<PolicyTrace>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.decision;
        writeln!(
            f,
            "decision: {}{}",
            if d.allowed { "ALLOWED" } else { "DENIED" },
            d.policy().map(|p| format!(" by {p}")).unwrap_or_default()
        )?;
        writeln!(f, "reason:   {}", d.reason)?;
        if let Some(s) = d.http_status {
            writeln!(f, "status:   {s}")?;
        }
        writeln!(f, "workload: {}", self.workload.as_deref().unwrap_or("<none: failing closed>"))?;
        if !self.labels.is_empty() {
            let labels: Vec<String> = self.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            writeln!(f, "labels:   {}", labels.join(","))?;
        }
        writeln!(f, "default:  {}", self.default_policy)?;
        for a in &d.audits {
            writeln!(f, "audit:    {a}")?;
        }
        writeln!(f, "policies considered: {}", self.policies.len())?;
        for t in &self.policies {
            write!(f, "  {} [{} {}] ", t.policy, t.action, t.engine)?;
            if !t.selected {
                writeln!(f, "not selected: {}", t.not_selected_because.as_deref().unwrap_or("?"))?;
                continue;
            }
            write!(
                f,
                "{}",
                match t.matched {
                    Some(true) if t.engine == EngineKind::Rules => "matched",
                    Some(true) => "allowed",
                    Some(false) if t.engine == EngineKind::Rules => "did not match",
                    Some(false) => "did not allow",
                    None => "not evaluated",
                },
            )?;
            if t.decided {
                write!(f, "  <- decided")?;
            }
            writeln!(f)?;
            for line in &t.details {
                writeln!(f, "      {line}")?;
            }
        }
        Ok(())
    }
}
