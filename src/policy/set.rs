//! A compiled, immutable set of policies for one workload, and the evaluation order.
//!
//! The sidecar holds its current set in an `ArcSwap` and replaces it whole when new policy
//! arrives, so a request is always decided by one complete set. Selection (namespace, labels)
//! happens once, when the set is built; a request only walks the policies that apply.
//!
//! Order: AUDIT policies are evaluated and recorded; then any DENY that matches denies; else, if
//! ALLOW policies select the workload, one of them must allow; else the mesh default decides.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::decision::{Decider, Decision, DefaultPolicy};
use super::engine::{Policy, Verdict};
use super::explain::{Explanation, PolicyTrace};
use super::input::Input;
use super::rego::RegoVerdict;
use super::resource::Action;
use crate::identity::SpiffeId;

/// The workload a set is built for: its identity (whose namespace policies must share) and
/// labels (which selectors must match).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// This sidecar's SPIFFE ID.
    pub id: SpiffeId,
    /// From `--label KEY=VALUE` or, later, Kubernetes.
    pub labels: BTreeMap<String, String>,
}

/// Every policy applying to one workload, grouped by action, plus the mesh default.
#[derive(Debug, Clone)]
pub struct PolicySet {
    /// `None`: nothing was ever received; every request is refused.
    workload: Option<Workload>,
    all: Vec<Arc<Policy>>,
    deny: Vec<Arc<Policy>>,
    allow: Vec<Arc<Policy>>,
    audit: Vec<Arc<Policy>>,
    default: DefaultPolicy,
}

/// The reason given before any policy has been received.
pub const FAIL_CLOSED_REASON: &str = "no policy received yet for this workload: failing closed";
/// The reason given when ALLOW policies select the workload and none allows.
pub const NO_ALLOW_MATCHED: &str = "no ALLOW policy matched";

impl PolicySet {
    /// The set a workload has before its first policy arrives: it denies everything.
    pub fn fail_closed() -> Self {
        PolicySet {
            workload: None,
            all: Vec::new(),
            deny: Vec::new(),
            allow: Vec::new(),
            audit: Vec::new(),
            default: DefaultPolicy::Deny,
        }
    }

    /// Builds the set for `workload` from every known policy (those of other namespaces or
    /// whose selector does not match are kept only for [`PolicySet::explain`]).
    pub fn new(policies: impl IntoIterator<Item = Arc<Policy>>, workload: Workload, default: DefaultPolicy) -> Self {
        let mut set = PolicySet {
            workload: None,
            all: policies.into_iter().collect(),
            deny: Vec::new(),
            allow: Vec::new(),
            audit: Vec::new(),
            default,
        };
        for p in &set.all {
            if p.selects(&workload.id, &workload.labels).is_ok() {
                match p.action() {
                    Action::Deny => set.deny.push(p.clone()),
                    Action::Allow => set.allow.push(p.clone()),
                    Action::Audit => set.audit.push(p.clone()),
                }
            }
        }
        set.workload = Some(workload);
        set
    }

    /// Decides one request.
    pub fn decide(&self, input: &Input) -> Decision {
        if self.workload.is_none() {
            return Decision::bare(false, Decider::FailClosed, FAIL_CLOSED_REASON);
        }
        let audits: Vec<String> = self.audit.iter().map(|p| p.reason(&p.evaluate(input))).collect();
        let mut d = self.decide_enforced(input);
        d.audits = audits;
        d
    }

    fn decide_enforced(&self, input: &Input) -> Decision {
        for p in &self.deny {
            let v = p.evaluate(input);
            // A Rego DENY policy is a veto: it denies unless its module allows.
            let denies = match &v {
                Verdict::Rules(m) => m.is_some(),
                Verdict::Rego(r) => !r.allowed,
            };
            if denies {
                let reason = p.reason(&v);
                return decided(false, p, reason, v);
            }
        }
        if !self.allow.is_empty() {
            let mut refusal: Option<RegoVerdict> = None;
            for p in &self.allow {
                let v = p.evaluate(input);
                if v.positive() {
                    let reason = p.reason(&v);
                    return decided(true, p, reason, v);
                }
                if let Verdict::Rego(r) = v
                    && refusal.is_none()
                {
                    refusal = Some(r);
                }
            }
            let names: Vec<&str> = self.allow.iter().map(|p| p.id()).collect();
            let reason = format!("{NO_ALLOW_MATCHED} (considered {})", names.join(", "));
            let mut d = Decision::bare(false, Decider::NoAllowMatched, reason);
            // A Rego policy's chosen refusal (status, headers, body) is the response.
            if let Some(r) = refusal {
                d.http_status = r.http_status;
                d.headers = r.headers;
                d.body = r.body;
            }
            return d;
        }
        let (allowed, reason) = match self.default {
            DefaultPolicy::Deny => (false, "no ALLOW or DENY policy selects this workload; mesh default is deny"),
            DefaultPolicy::AllowAuthenticated if input.source().is_none() => {
                (false, "mesh default allow-authenticated: the caller presented no mesh identity")
            }
            DefaultPolicy::AllowAuthenticated => {
                (true, "mesh default allow-authenticated: the caller is authenticated")
            }
            DefaultPolicy::Allow => (true, "mesh default is allow"),
        };
        Decision::bare(allowed, Decider::Default(self.default), reason)
    }

    /// The decision, plus every policy known and what it made of the request.
    pub fn explain(&self, input: &Input) -> Explanation {
        let decision = self.decide(input);
        let mut policies = Vec::with_capacity(self.all.len());
        // Evaluation order first (DENY, ALLOW, AUDIT), then the policies that do not apply.
        let rank = |p: &Policy| match self.workload.as_ref().map(|w| p.selects(&w.id, &w.labels)) {
            Some(Ok(())) => match p.action() {
                Action::Deny => 0,
                Action::Allow => 1,
                Action::Audit => 2,
            },
            _ => 3,
        };
        let mut ordered: Vec<&Arc<Policy>> = self.all.iter().collect();
        ordered.sort_by_key(|p| rank(p));
        for p in ordered {
            let selection = match &self.workload {
                Some(w) => p.selects(&w.id, &w.labels),
                None => Err("no workload".to_string()),
            };
            let mut trace = PolicyTrace {
                policy: p.id().to_string(),
                action: p.action(),
                engine: p.engine().kind(),
                selected: selection.is_ok(),
                not_selected_because: selection.err(),
                decided: decision.policy() == Some(p.id()),
                matched: None,
                details: Vec::new(),
            };
            if trace.selected {
                let (v, details) = p.explain(input);
                trace.matched = Some(v.positive());
                trace.details = details;
            }
            policies.push(trace);
        }
        Explanation {
            workload: self.workload.as_ref().map(|w| w.id.to_string()),
            labels: self.workload.as_ref().map(|w| w.labels.clone()).unwrap_or_default(),
            default_policy: self.default,
            decision,
            policies,
        }
    }
}

fn decided(allowed: bool, p: &Policy, reason: String, v: Verdict) -> Decision {
    let decider = Decider::Policy { id: p.shared_id().clone(), action: p.action() };
    let mut d = Decision::bare(allowed, decider, reason);
    d.engine = Some(p.engine().kind());
    if let Verdict::Rego(r) = v {
        d.http_status = r.http_status;
        d.headers = r.headers;
        d.body = r.body;
    }
    d
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::input::tests::attrs;
    use crate::policy::load::parse_documents;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn policies(yaml: &str) -> Vec<Arc<Policy>> {
        parse_documents(Path::new("t.yaml"), yaml).unwrap().into_iter().map(|(_, p)| Arc::new(p)).collect()
    }

    fn workload(labels: &[(&str, &str)]) -> Workload {
        Workload {
            id: "spiffe://cluster.local/ns/shop/sa/orders".parse().unwrap(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn set(yaml: &str, default: DefaultPolicy) -> PolicySet {
        PolicySet::new(policies(yaml), workload(&[("app", "orders")]), default)
    }

    fn get(source: Option<&str>, path: &str) -> Input<'static> {
        Input::new(attrs(source, "GET", path))
    }

    fn policy(name: &str, action: &str, rules: &str) -> String {
        format!(
            "---\napiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  action: {action}\n  rules: {rules}\n"
        )
    }

    #[test]
    fn sets_are_shareable_across_workers() {
        fn check<T: Send + Sync + 'static>() {}
        check::<PolicySet>();
        check::<Input>();
        check::<Decision>();
    }

    #[test]
    fn fail_closed_before_first_policy() {
        let s = PolicySet::fail_closed();
        let d = s.decide(&get(Some(WEB), "/"));
        assert!(!d.allowed);
        assert_eq!(d.reason, FAIL_CLOSED_REASON);
        assert_eq!(d.decider, Decider::FailClosed);
    }

    #[test]
    fn deny_beats_allow() {
        let yaml = policy("all", "ALLOW", "[{}]")
            + &policy("no-admin", "DENY", "[{to: [{operation: {paths: [\"/admin/*\"]}}]}]");
        let s = set(&yaml, DefaultPolicy::Allow);
        let d = s.decide(&get(Some(WEB), "/admin/x"));
        assert!(!d.allowed);
        assert_eq!(d.policy(), Some("shop/no-admin"));
        assert_eq!(d.engine, Some(crate::policy::EngineKind::Rules));
        assert_eq!(d.reason, "denied by DENY policy shop/no-admin: rules[0] matched");
        let d = s.decide(&get(Some(WEB), "/orders"));
        assert!(d.allowed);
        assert_eq!(d.policy(), Some("shop/all"));
        assert_eq!(d.reason, "allowed by ALLOW policy shop/all: rules[0] matched");
        // The reason names the rule that matched, not the first one.
        let two =
            policy("two", "ALLOW", "[{to: [{operation: {paths: [\"/a\"]}}]}, {to: [{operation: {paths: [\"/b\"]}}]}]");
        let d = set(&two, DefaultPolicy::Deny).decide(&get(Some(WEB), "/b"));
        assert_eq!(d.reason, "allowed by ALLOW policy shop/two: rules[1] matched");
    }

    #[test]
    fn allow_policies_must_match_when_present() {
        let s = set(&policy("orders", "ALLOW", "[{to: [{operation: {paths: [\"/orders*\"]}}]}]"), DefaultPolicy::Allow);
        assert!(s.decide(&get(Some(WEB), "/orders/1")).allowed);
        let d = s.decide(&get(Some(WEB), "/other"));
        assert!(!d.allowed, "the mesh default does not apply once ALLOW policies exist");
        assert!(d.reason.starts_with(NO_ALLOW_MATCHED), "{}", d.reason);
        assert_eq!(d.decider, Decider::NoAllowMatched);
    }

    #[test]
    fn audit_changes_nothing_but_is_recorded() {
        let audit = policy("watch", "AUDIT", "[{}]");
        for default in [DefaultPolicy::Deny, DefaultPolicy::Allow] {
            let with = set(&audit, default).decide(&get(Some(WEB), "/"));
            let without = set("", default).decide(&get(Some(WEB), "/"));
            assert_eq!(with.allowed, without.allowed);
            assert_eq!(with.audits, ["shop/watch: rules[0] matched"]);
            assert!(without.audits.is_empty());
        }
        let deny_all = policy("deny", "DENY", "[{}]") + &audit;
        let d = set(&deny_all, DefaultPolicy::Allow).decide(&get(Some(WEB), "/"));
        assert!(!d.allowed);
        assert_eq!(d.audits.len(), 1, "audits are recorded on denials too");
    }

    #[test]
    fn mesh_defaults() {
        let none = "";
        let d = set(none, DefaultPolicy::Deny).decide(&get(Some(WEB), "/"));
        assert!(!d.allowed, "default deny");
        let s = set(none, DefaultPolicy::AllowAuthenticated);
        assert!(s.decide(&get(Some(WEB), "/")).allowed);
        let d = s.decide(&get(None, "/"));
        assert!(!d.allowed, "allow-authenticated refuses a caller without a principal");
        assert!(d.reason.contains("no mesh identity"), "{}", d.reason);
        assert!(set(none, DefaultPolicy::Allow).decide(&get(None, "/")).allowed);
    }

    #[test]
    fn selection_by_namespace_and_labels() {
        let other_ns = "---\napiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: ops}\nspec: {action: DENY, rules: [{}]}\n";
        let other_app = "---\napiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: y, namespace: shop}\nspec: {selector: {matchLabels: {app: web}}, action: DENY, rules: [{}]}\n";
        let mine = "---\napiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: z, namespace: shop}\nspec: {selector: {matchLabels: {app: orders}}, rules: [{}]}\n";
        let s = set(&format!("{other_ns}{other_app}{mine}"), DefaultPolicy::Deny);
        let d = s.decide(&get(Some(WEB), "/"));
        assert!(d.allowed);
        assert_eq!(d.policy(), Some("shop/z"));
        let e = s.explain(&get(Some(WEB), "/"));
        assert_eq!(e.policies.len(), 3);
        assert_eq!(e.policies.iter().filter(|t| t.selected).count(), 1, "one of three selects the workload");
        // Selected policies first, in evaluation order; then the rest, with the reason.
        assert_eq!(e.policies[0].policy, "shop/z");
        assert_eq!(e.policies[0].matched, Some(true));
        assert!(e.policies[0].decided);
        assert!(!e.policies[1].selected && !e.policies[2].selected);
        let why: Vec<&str> = e.policies[1..].iter().filter_map(|t| t.not_selected_because.as_deref()).collect();
        assert!(why.iter().any(|w| w.contains("namespace ops")), "{why:?}");
        assert!(why.iter().any(|w| w.contains("app=web")), "{why:?}");
        assert!(e.to_string().contains("shop/z [ALLOW rules] matched  <- decided"), "{e}");
    }

    #[test]
    fn a_broken_reload_keeps_the_previous_set() {
        let current = set(&policy("all", "ALLOW", "[{}]"), DefaultPolicy::Deny);
        assert!(current.decide(&get(Some(WEB), "/")).allowed);
        let broken = policy("all", "ALLOW", "[{to: [{operation: {method: [GET]}}]}]");
        // The reload path: build a new set only from a load that succeeded.
        match parse_documents(Path::new("t.yaml"), &broken) {
            Ok(_) => panic!("a policy with an unknown field must be refused"),
            Err(e) => assert!(e.to_string().contains("unknown field `method`"), "{e}"),
        }
        assert!(current.decide(&get(Some(WEB), "/")).allowed, "old set still decides");
    }

    const ENVOY_AUTHZ: &str = r#"
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: envoy, namespace: shop}
spec:
  action: ALLOW
  rego:
    entrypoint: envoy/authz/allow
    module: |
      package envoy.authz

      default allow := false

      allow if {
        input.attributes.request.http.method == "GET"
        startswith(input.parsed_path[0], "orders")
      }
"#;

    #[test]
    fn rego_allow_policy_in_the_set() {
        let s = set(ENVOY_AUTHZ, DefaultPolicy::Deny);
        let d = s.decide(&get(Some(WEB), "/orders/1"));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.engine, Some(crate::policy::EngineKind::Rego));
        assert_eq!(d.policy(), Some("shop/envoy"));
        let d = s.decide(&Input::new(attrs(Some(WEB), "POST", "/orders/1")));
        assert!(!d.allowed);
    }

    #[test]
    fn rego_deny_policy_is_a_veto_and_carries_its_response() {
        let veto = r#"
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: tenant-guard, namespace: shop}
spec:
  action: DENY
  rego:
    entrypoint: guard/decision
    module: |
      package guard
      default decision := {"allowed": false, "http_status": 401, "body": "tenant required"}
      decision := {"allowed": true} if input.attributes.request.http.headers["x-tenant"] == "a"
"#;
        let yaml = format!("{veto}{}", policy("all", "ALLOW", "[{}]"));
        let s = set(&yaml, DefaultPolicy::Deny);
        assert!(s.decide(&get(Some(WEB), "/")).allowed);
        let mut a = attrs(Some(WEB), "GET", "/");
        a.headers.clear();
        let d = s.decide(&Input::new(a));
        assert!(!d.allowed);
        assert_eq!(d.policy(), Some("shop/tenant-guard"));
        assert_eq!(d.http_status, Some(401));
        assert_eq!(d.body.as_deref(), Some("tenant required"));
    }

    #[test]
    fn explain_shows_why_no_rule_matched() {
        let s = set(
            &policy(
                "orders",
                "ALLOW",
                "[{from: [{source: {namespaces: [\"ops\"]}}]}, {to: [{operation: {methods: [\"POST\"]}}]}]",
            ),
            DefaultPolicy::Deny,
        );
        let e = s.explain(&get(Some(WEB), "/"));
        assert!(!e.decision.allowed);
        let t = &e.policies[0];
        assert_eq!(t.matched, Some(false));
        assert!(t.details[0].contains("from[0].source.namespaces"), "{:?}", t.details);
        assert!(t.details[1].contains("to[0].operation.methods"), "{:?}", t.details);
        let text = e.to_string();
        assert!(text.contains("DENIED"), "{text}");
        assert!(text.contains("shop/orders"), "{text}");
    }
}
