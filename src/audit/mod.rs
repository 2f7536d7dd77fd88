//! `palisade audit`: where the mesh is weaker than it looks.
//!
//! [`audit`] is a pure function over an [`AuditInput`]: the same checks run over a directory of
//! manifests ([`manifests::read_dir`]) and over the live mesh (whoever reads the control plane
//! fills `sidecars`, `roots` and `ca_key_sealed`, which a directory cannot know). Each
//! [`Finding`] names the object, says what is weak and gives the change that fixes it.
//!
//! Workloads are judged with the control plane's own selection ([`Resource::selects`]) and its
//! PeerAuthentication precedence (one with a selector beats the namespace-wide one), so a
//! finding is about what sidecars are actually sent.

pub mod cli;
pub mod manifests;

use std::collections::BTreeMap;

use crate::control::discovery::SidecarEntry;
use crate::control::source::{Resource, Spec};
use crate::k8s::crd::{MtlsMode, PeerAuthenticationSpec};
use crate::policy::resource::{Action, AuthorizationPolicySpec, Rule, Source};

pub use cli::AuditArgs;

/// How bad a finding is; ordered, so `--fail-on high` is `severity >= High`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; no door is open.
    Low,
    /// Weaker than the mesh's defaults: a door open under some condition.
    Medium,
    /// A caller can get in without proving who it is, or will soon be locked out.
    High,
    /// Broken now (an expired certificate or root).
    Critical,
}

impl Severity {
    /// The spelling of the CLI and of JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// One weakness, with the object it is about and its fix.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// How bad.
    pub severity: Severity,
    /// The check's id, e.g. `permissive-mtls` (stable: CI may filter on it).
    pub check: &'static str,
    /// `KIND ns/name`, `workload ns/name`, a SPIFFE ID, or `mesh`.
    pub object: String,
    /// What is weak, and why.
    pub message: String,
    /// The YAML or flag to change.
    pub fix: String,
}

/// The mesh-wide settings of the control plane (`palisade control` flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditSettings {
    /// `deny`, `allow-authenticated` or `allow`.
    pub default_policy: String,
    /// `allow` or `deny`.
    pub egress: String,
    /// The mesh's trust domain, for the principals a fix suggests.
    pub trust_domain: String,
    /// Workload certificate lifetime (`--cert-ttl`), in seconds: sidecars renew by 60 % of it.
    pub cert_ttl_secs: i64,
}

impl Default for AuditSettings {
    /// The control plane's defaults.
    fn default() -> Self {
        AuditSettings {
            default_policy: "deny".into(),
            egress: "allow".into(),
            trust_domain: "cluster.local".into(),
            cert_ttl_secs: 3600,
        }
    }
}

/// A workload the mesh protects: from a pod template, or from a live sidecar.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// How to find it: `Deployment shop/orders`, or a sidecar's SPIFFE ID.
    pub name: String,
    /// The namespace policies must be in to select it.
    pub namespace: String,
    /// The pod's labels: what policies select on.
    pub labels: BTreeMap<String, String>,
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`, when known.
    pub identity: Option<String>,
}

/// One CA generation's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootInfo {
    /// The CA generation (`palisade control ca rotate` adds one).
    pub generation: u32,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

/// Everything the checks look at. A field a source cannot know stays empty (or `None`), and the
/// checks that need it say nothing.
#[derive(Clone, Debug, Default)]
pub struct AuditInput {
    /// The control plane's flags.
    pub settings: AuditSettings,
    /// Validated resources, as [`crate::control::source::validate`] returns them.
    pub resources: Vec<Resource>,
    /// From pod templates, or [`workloads_of`] the live sidecars.
    pub workloads: Vec<Workload>,
    /// Live only: what the control plane knows of each sidecar.
    pub sidecars: Option<Vec<SidecarEntry>>,
    /// Live only: the CA generations in force.
    pub roots: Vec<RootInfo>,
    /// Live only, when known: whether the CA keys are encrypted at rest.
    pub ca_key_sealed: Option<bool>,
    /// Unix seconds.
    pub now: i64,
}

/// A sidecar's config is stale when its ACK has lagged its push for this long.
pub const STALE_AFTER_SECS: i64 = 60;
/// A root is old past this age: rotate it (`palisade control ca rotate`).
pub const ROOT_MAX_AGE_SECS: i64 = 365 * 24 * 3600;
/// A root expiring within this is urgent: a rotation takes a workload lifetime to carry out.
pub const ROOT_EXPIRY_WARNING_SECS: i64 = 30 * 24 * 3600;

/// The live mesh's workloads: one per sidecar the control plane knows (its namespace from its
/// SPIFFE ID, its labels from its registration). For the live input beside `sidecars`.
pub fn workloads_of(sidecars: &[SidecarEntry]) -> Vec<Workload> {
    sidecars
        .iter()
        .filter_map(|s| {
            let id: crate::identity::SpiffeId = s.spiffe_id.parse().ok()?;
            Some(Workload {
                name: s.spiffe_id.clone(),
                namespace: id.namespace()?.to_string(),
                labels: s.labels.clone(),
                identity: Some(s.spiffe_id.clone()),
            })
        })
        .collect()
}

/// The live mesh's roots, from [`crate::control::ca_set::CaSet::root_validity`].
pub fn roots_of(validity: &[(u32, i64, i64)]) -> Vec<RootInfo> {
    validity.iter().map(|&(generation, not_before, not_after)| RootInfo { generation, not_before, not_after }).collect()
}

/// Runs every check; findings come most severe first, then by check and object.
pub fn audit(input: &AuditInput) -> Vec<Finding> {
    let mut findings = Vec::new();
    permissive_mtls(input, &mut findings);
    allow_any_caller(input, &mut findings);
    no_allow_policy(input, &mut findings);
    egress_allow(input, &mut findings);
    request_authentication_without_principal(input, &mut findings);
    certificates(input, &mut findings);
    roots(input, &mut findings);
    stale_config(input, &mut findings);
    ca_key(input, &mut findings);
    findings.sort_by(|a, b| {
        (b.severity, a.check, &a.object, &a.message).cmp(&(a.severity, b.check, &b.object, &b.message))
    });
    findings.dedup();
    findings
}

/// `KIND ns/name`.
fn object(r: &Resource) -> String {
    format!("{} {}/{}", r.kind(), r.namespace, r.name)
}

fn workload_object(w: &Workload) -> String {
    if w.name.is_empty() { format!("workload {}/{}", w.namespace, labels_text(&w.labels)) } else { w.name.clone() }
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", pairs.join(","))
}

/// The PeerAuthentication in force for a workload, as the control plane chooses it: one with a
/// selector beats the namespace-wide one; none means STRICT.
fn peer_authentication_for<'a>(
    input: &'a AuditInput,
    w: &Workload,
) -> Option<(&'a Resource, &'a PeerAuthenticationSpec)> {
    let mut chosen: Option<(&Resource, &PeerAuthenticationSpec)> = None;
    for r in input.resources.iter().filter(|r| r.selects(&w.namespace, &w.labels)) {
        let Spec::PeerAuthentication(spec) = &r.spec else { continue };
        if chosen.is_none_or(|(_, c)| c.selector.is_none() && spec.selector.is_some()) {
            chosen = Some((r, spec));
        }
    }
    chosen
}

fn permissive_mtls(input: &AuditInput, out: &mut Vec<Finding>) {
    let strict_fix = |r: &Resource, what: &str| {
        format!("set {what} to STRICT in {} ({}) once every caller is meshed", object(r), r.origin)
    };
    for w in &input.workloads {
        let Some((r, spec)) = peer_authentication_for(input, w) else { continue };
        if spec.mtls.as_ref().is_some_and(|m| m.mode == MtlsMode::Permissive) {
            out.push(Finding {
                severity: Severity::High,
                check: "permissive-mtls",
                object: workload_object(w),
                message: format!(
                    "accepts plaintext next to mTLS (PERMISSIVE from {}): callers need no identity",
                    object(r)
                ),
                fix: strict_fix(r, "spec.mtls.mode"),
            });
        }
        for (port, m) in &spec.port_level_mtls {
            if m.mode == MtlsMode::Permissive {
                out.push(Finding {
                    severity: Severity::High,
                    check: "port-without-mtls",
                    object: format!("{} port {port}", workload_object(w)),
                    message: format!("port {port} accepts plaintext (portLevelMtls PERMISSIVE in {})", object(r)),
                    fix: strict_fix(r, &format!("spec.portLevelMtls.\"{port}\".mode")),
                });
            }
        }
    }
    // A PERMISSIVE resource no known workload runs under yet is still a door left open.
    for r in &input.resources {
        let Spec::PeerAuthentication(spec) = &r.spec else { continue };
        let permissive = spec.mtls.as_ref().is_some_and(|m| m.mode == MtlsMode::Permissive)
            || spec.port_level_mtls.values().any(|m| m.mode == MtlsMode::Permissive);
        let governs_one = input
            .workloads
            .iter()
            .any(|w| peer_authentication_for(input, w).is_some_and(|(chosen, _)| chosen.key() == r.key()));
        if permissive && !governs_one {
            out.push(Finding {
                severity: Severity::Medium,
                check: "permissive-mtls",
                object: object(r),
                message: "allows plaintext for the workloads it selects (none known now)".into(),
                fix: strict_fix(r, "spec.mtls.mode and every spec.portLevelMtls mode"),
            });
        }
    }
}

/// Why a rule lets any caller through, if it does: `None` when its `from` or `when` narrows
/// who may call.
fn allows_any_caller(rule: &Rule) -> Option<&'static str> {
    // A `when` on the caller (source.*, request.auth.*) narrows it; other keys do not.
    let narrows_caller = rule.when.iter().any(|c| c.key.starts_with("source.") || c.key.starts_with("request.auth"));
    if narrows_caller {
        return None;
    }
    if rule.from.is_empty() {
        return Some("a rule without `from` matches every caller, authenticated or not");
    }
    let wide = |s: &Source| {
        let any = |v: &[String]| v.is_empty() || v.iter().any(|p| p == "*");
        let any_ip = s.ip_blocks.is_empty() || s.ip_blocks.iter().any(|b| b == "0.0.0.0/0" || b == "::/0");
        any(&s.principals)
            && any(&s.namespaces)
            && any_ip
            && s.request_principals.is_empty()
            && s.not_principals.is_empty()
            && s.not_namespaces.is_empty()
            && s.not_ip_blocks.is_empty()
            && s.not_request_principals.is_empty()
    };
    rule.from.iter().any(|f| wide(&f.source)).then_some("a `from` source matches any caller (`*` or no constraint)")
}

fn allow_any_caller(input: &AuditInput, out: &mut Vec<Finding>) {
    for r in &input.resources {
        let Spec::AuthorizationPolicy(AuthorizationPolicySpec { action: Action::Allow, rules: Some(rules), .. }) =
            &r.spec
        else {
            continue;
        };
        for (i, rule) in rules.iter().enumerate() {
            if let Some(why) = allows_any_caller(rule) {
                let td = &input.settings.trust_domain;
                out.push(Finding {
                    severity: Severity::High,
                    check: "allow-any-caller",
                    object: object(r),
                    message: format!("spec.rules[{i}]: {why}"),
                    fix: format!(
                        "name the callers in spec.rules[{i}].from, e.g. `from: [{{source: {{principals: [\"{td}/ns/{}/sa/CALLER\"]}}}}]` ({})",
                        r.namespace, r.origin
                    ),
                });
            }
        }
    }
}

fn no_allow_policy(input: &AuditInput, out: &mut Vec<Finding>) {
    let severity = match input.settings.default_policy.as_str() {
        "allow" => Severity::High,
        "allow-authenticated" => Severity::Medium,
        _ => return,
    };
    for w in &input.workloads {
        let has_allow = input.resources.iter().any(|r| {
            matches!(&r.spec, Spec::AuthorizationPolicy(s) if s.action == Action::Allow)
                && r.selects(&w.namespace, &w.labels)
        });
        if !has_allow {
            out.push(Finding {
                severity,
                check: "no-allow-policy",
                object: workload_object(w),
                message: format!(
                    "no ALLOW AuthorizationPolicy selects it, so the mesh default `{}` decides every request",
                    input.settings.default_policy
                ),
                fix: format!(
                    "add an ALLOW AuthorizationPolicy in namespace {} selecting {}, or start the control plane with --default-policy deny",
                    w.namespace,
                    labels_text(&w.labels)
                ),
            });
        }
    }
}

fn egress_allow(input: &AuditInput, out: &mut Vec<Finding>) {
    if input.settings.egress == "allow" {
        out.push(Finding {
            severity: Severity::Medium,
            check: "egress-allow",
            object: "mesh".into(),
            message: "sidecars pass traffic to destinations outside the mesh as plain TCP".into(),
            fix: "start the control plane with --egress deny (PALISADE_EGRESS=deny)".into(),
        });
    }
}

/// Whether a policy decides on the request principal (a verified end-user token), so a request
/// without a token does not pass.
fn requires_request_principal(spec: &AuthorizationPolicySpec) -> bool {
    let Some(rules) = &spec.rules else { return false };
    match spec.action {
        // Every rule must demand a token, or one rule lets token-less requests through.
        Action::Allow => {
            !rules.is_empty()
                && rules.iter().all(|rule| {
                    !rule.from.is_empty() && rule.from.iter().all(|f| !f.source.request_principals.is_empty())
                })
        }
        // DENY with `notRequestPrincipals: ["*"]`: requests without a token are refused.
        Action::Deny => {
            rules.iter().any(|rule| rule.from.iter().any(|f| f.source.not_request_principals.iter().any(|p| p == "*")))
        }
        Action::Audit => false,
    }
}

fn request_authentication_without_principal(input: &AuditInput, out: &mut Vec<Finding>) {
    for r in &input.resources {
        let Spec::RequestAuthentication(spec) = &r.spec else { continue };
        // The workloads it applies to; none known: the ones its selector describes.
        let mut targets: Vec<Workload> =
            input.workloads.iter().filter(|w| r.selects(&w.namespace, &w.labels)).cloned().collect();
        if targets.is_empty() {
            let labels = spec.selector.as_ref().map(|s| s.match_labels.clone()).unwrap_or_default();
            targets.push(Workload { namespace: r.namespace.clone(), labels, ..Default::default() });
        }
        let unguarded: Vec<String> = targets
            .iter()
            .filter(|w| {
                !input.resources.iter().any(|p| {
                    matches!(&p.spec, Spec::AuthorizationPolicy(s) if requires_request_principal(s))
                        && p.selects(&w.namespace, &w.labels)
                })
            })
            .map(workload_object)
            .collect();
        if !unguarded.is_empty() {
            out.push(Finding {
                severity: Severity::Medium,
                check: "request-authentication-without-principal-policy",
                object: object(r),
                message: format!(
                    "a request without a token passes: no AuthorizationPolicy requires requestPrincipals for {}",
                    unguarded.join(", ")
                ),
                fix: format!(
                    "add an AuthorizationPolicy in namespace {} with `action: DENY` and `rules: [{{from: [{{source: {{notRequestPrincipals: [\"*\"]}}}}]}}]` and the same selector",
                    r.namespace
                ),
            });
        }
    }
}

/// Certificates of connected sidecars. A sidecar renews between 40 % and 60 % of its lifetime,
/// so one with less than 40 % of `--cert-ttl` left has missed its renewal point: it is failing to
/// renew (high); one past expiry cannot make or take connections (critical).
fn certificates(input: &AuditInput, out: &mut Vec<Finding>) {
    let Some(sidecars) = &input.sidecars else { return };
    let renewal_point = input.settings.cert_ttl_secs * 4 / 10;
    for s in sidecars.iter().filter(|s| s.connected && s.certificate_not_after > 0) {
        let left = s.certificate_not_after - input.now;
        let (severity, message) = if left <= 0 {
            (Severity::Critical, format!("certificate expired {}s ago", -left))
        } else if left < renewal_point {
            (
                Severity::High,
                format!("certificate expires in {left}s, past its renewal point ({renewal_point}s before expiry)"),
            )
        } else {
            continue;
        };
        out.push(Finding {
            severity,
            check: "certificate-near-expiry",
            object: s.spiffe_id.clone(),
            message,
            fix: "read the sidecar's log for renewal errors (`palisade_cert_renewals_total{result=\"failure\"}`); \
                  check it can reach the control plane's gRPC port and its credential is not revoked"
                .into(),
        });
    }
}

fn roots(input: &AuditInput, out: &mut Vec<Finding>) {
    let fix = "rotate the CA: `palisade control ca rotate` (overlapping; the old root stays trusted until every sidecar renewed)";
    for root in &input.roots {
        let object = format!("CA generation {}", root.generation);
        let left = root.not_after - input.now;
        let age = input.now - root.not_before;
        let (severity, message) = if left <= 0 {
            (Severity::Critical, "root has expired: no certificate it anchors verifies".to_string())
        } else if left < ROOT_EXPIRY_WARNING_SECS {
            (Severity::High, format!("root expires in {} days", left / 86400))
        } else if age > ROOT_MAX_AGE_SECS {
            (Severity::Low, format!("root is {} days old", age / 86400))
        } else {
            continue;
        };
        out.push(Finding { severity, check: "root-age", object, message, fix: fix.into() });
    }
}

fn stale_config(input: &AuditInput, out: &mut Vec<Finding>) {
    let Some(sidecars) = &input.sidecars else { return };
    for s in sidecars.iter().filter(|s| s.connected) {
        if !s.nack_message.is_empty() {
            out.push(Finding {
                severity: Severity::High,
                check: "nacked-config",
                object: s.spiffe_id.clone(),
                message: format!(
                    "refused snapshot {} ({}); it runs {}",
                    s.pushed_version,
                    s.nack_message,
                    if s.acked_version.is_empty() { "no config" } else { &s.acked_version }
                ),
                fix: "fix the resource the NACK names (`palisade policy check` on it), or upgrade the sidecar".into(),
            });
        } else if !s.pushed_version.is_empty()
            && s.acked_version != s.pushed_version
            && input.now - s.last_seen > STALE_AFTER_SECS
        {
            out.push(Finding {
                severity: Severity::Medium,
                check: "stale-config",
                object: s.spiffe_id.clone(),
                message: format!(
                    "has not acknowledged snapshot {} for {}s (runs {:?})",
                    s.pushed_version,
                    input.now - s.last_seen,
                    s.acked_version
                ),
                fix: "check the sidecar's log and its connection to the control plane; restart the pod if it is stuck"
                    .into(),
            });
        }
    }
}

fn ca_key(input: &AuditInput, out: &mut Vec<Finding>) {
    if input.ca_key_sealed == Some(false) {
        out.push(Finding {
            severity: Severity::High,
            check: "ca-key-not-sealed",
            object: "CA".into(),
            message: "the CA's private keys are stored in clear".into(),
            fix: "give the control plane a key-encryption key (see docs/security.md); the store is migrated at start"
                .into(),
        });
    }
}

#[cfg(test)]
mod tests;
