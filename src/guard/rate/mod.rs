//! `RateLimitPolicy`: token buckets at the sidecar.
//!
//! The spec types are the schema of the CRD and of the wire (the CRD in `k8s::crd` wraps them).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::resource::WorkloadSelector;

/// The period a limit counts over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum RateUnit {
    #[default]
    Second,
    Minute,
    Hour,
}

/// One token bucket.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    pub requests_per_unit: u32,
    pub unit: RateUnit,
    /// Extra requests allowed at once; default: `requestsPerUnit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Only requests to these paths count (wildcards allowed); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Count per caller identity rather than for the workload as a whole.
    #[serde(default)]
    pub per_source: bool,
}

/// Request rate limits of the selected workloads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    pub limits: Vec<RateLimit>,
}

/// The compiled `RateLimitPolicy` limits that select one workload. Empty: nothing is limited.
#[derive(Debug, Default)]
pub struct RateGuard {
    limits: Vec<RateLimitPolicySpec>,
}

impl RateGuard {
    /// Compiles the specs selecting a workload.
    pub fn compile(specs: Vec<RateLimitPolicySpec>) -> Result<Self, String> {
        for spec in &specs {
            if let Some(i) = spec.limits.iter().position(|l| l.requests_per_unit == 0) {
                return Err(format!("spec.limits[{i}].requestsPerUnit must be at least 1"));
            }
        }
        Ok(RateGuard { limits: specs })
    }

    /// The specs it was compiled from.
    pub fn specs(&self) -> &[RateLimitPolicySpec] {
        &self.limits
    }

    /// Whether any limit is in force.
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }
}
