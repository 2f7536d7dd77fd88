//! A compiled policy: its identity, what it selects, its action and the engine that matches it.
//!
//! The three engines sit behind one enum so the evaluation order in [`super::PolicySet`] is
//! written once.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::input::Input;
use super::rego::{RegoEngine, RegoVerdict};
use super::resource::{self, Action, AuthorizationPolicy};
use super::rules::RulesEngine;
use super::wasm::WasmEngine;
use crate::identity::SpiffeId;

/// Which engine decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Declarative `rules`.
    Rules,
    /// A Rego module (`regorus`).
    Rego,
    /// An OPA WebAssembly bundle.
    Wasm,
}

impl EngineKind {
    /// The lower-case name, as in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Rules => "rules",
            EngineKind::Rego => "rego",
            EngineKind::Wasm => "wasm",
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The compiled matcher of one policy.
#[derive(Debug, Clone)]
pub enum Engine {
    /// Declarative rules.
    Rules(RulesEngine),
    /// A compiled Rego module.
    Rego(RegoEngine),
    /// A compiled OPA Wasm bundle.
    Wasm(WasmEngine),
}

impl Engine {
    /// Which kind it is.
    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::Rules(_) => EngineKind::Rules,
            Engine::Rego(_) => EngineKind::Rego,
            Engine::Wasm(_) => EngineKind::Wasm,
        }
    }
}

/// Why a policy document could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// `apiVersion`, `kind`, `metadata` or the choice of engine is wrong.
    #[error("{field}: {message}")]
    Invalid {
        /// Where in the document.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The Rego module does not parse or compile (regorus's text, with `file:line:col`).
    #[error("spec.rego: module does not compile: {0}")]
    Rego(String),
    /// The Wasm bundle is not valid base64, not a gzip tarball with `/policy.wasm`, not an OPA
    /// Wasm module, or lacks the entrypoint.
    #[error("spec.wasm: {0}")]
    Wasm(String),
}

/// What a policy's engine said about one request. `hit` is "the policy applies": a rule
/// matched, or the Rego module allowed. `Rego` also carries Wasm verdicts: both are OPA
/// results with the same shape.
#[derive(Debug, Clone)]
pub(crate) enum Verdict {
    Rules(Option<usize>),
    Rego(RegoVerdict),
}

impl Verdict {
    /// A rule matched / the module allowed.
    pub(crate) fn positive(&self) -> bool {
        match self {
            Verdict::Rules(m) => m.is_some(),
            Verdict::Rego(v) => v.allowed,
        }
    }

    /// In words, for reasons and audits.
    pub(crate) fn describe(&self) -> String {
        match self {
            Verdict::Rules(Some(i)) => format!("rules[{i}] matched"),
            Verdict::Rules(None) => "no rule matched".to_string(),
            Verdict::Rego(v) => v.reason.clone(),
        }
    }
}

/// One `AuthorizationPolicy`, checked and compiled: cheap to share (`Arc`) between the sets of
/// many workloads.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Shared with every decision it makes (and their metric labels) rather than copied.
    id: Arc<str>,
    namespace: String,
    name: String,
    action: Action,
    match_labels: Option<BTreeMap<String, String>>,
    engine: Engine,
    /// For a rules policy, the reason of a decision by each rule, written once here rather
    /// than formatted for every request.
    rule_reasons: Vec<Box<str>>,
}

impl Policy {
    /// Checks and compiles a resource.
    pub fn compile(p: &AuthorizationPolicy) -> Result<Self, CompileError> {
        let invalid = |field: &str, message: String| CompileError::Invalid { field: field.to_string(), message };
        if p.api_version != resource::API_VERSION {
            return Err(invalid("apiVersion", format!("{:?} is not {}", p.api_version, resource::API_VERSION)));
        }
        if p.kind != resource::KIND {
            return Err(invalid("kind", format!("{:?} is not {}", p.kind, resource::KIND)));
        }
        for (field, value) in [("metadata.name", &p.metadata.name), ("metadata.namespace", &p.metadata.namespace)] {
            let ok = !value.is_empty()
                && value.len() <= 253
                && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
            if !ok {
                return Err(invalid(field, format!("{value:?} is not a valid name (letters, digits, '-', '.', '_')")));
            }
        }
        let spec = &p.spec;
        let chosen = [spec.rules.is_some(), spec.rego.is_some(), spec.wasm.is_some()].iter().filter(|b| **b).count();
        if chosen > 1 {
            return Err(invalid("spec", "give only one of rules, rego or wasm".to_string()));
        }
        let engine = if let Some(wasm) = &spec.wasm {
            Engine::Wasm(WasmEngine::compile(&wasm.bundle, &wasm.entrypoint).map_err(CompileError::Wasm)?)
        } else if let Some(rego) = &spec.rego {
            let file = format!("{}/{}.rego", p.metadata.namespace, p.metadata.name);
            Engine::Rego(
                RegoEngine::compile(&file, &rego.module, &rego.entrypoint)
                    .map_err(|e| CompileError::Rego(e.trim().to_string()))?,
            )
        } else {
            Engine::Rules(
                RulesEngine::compile(spec.rules.as_deref().unwrap_or_default(), spec.action)
                    .map_err(|e| CompileError::Invalid { field: e.field, message: e.message })?,
            )
        };
        let id: Arc<str> = Arc::from(format!("{}/{}", p.metadata.namespace, p.metadata.name));
        let rule_reasons = match &engine {
            Engine::Rules(r) => (0..r.rule_count())
                .map(|i| decision_reason(spec.action, &id, &Verdict::Rules(Some(i)).describe()).into())
                .collect(),
            _ => Vec::new(),
        };
        Ok(Policy {
            id,
            namespace: p.metadata.namespace.clone(),
            name: p.metadata.name.clone(),
            action: spec.action,
            match_labels: spec.selector.as_ref().map(|s| s.match_labels.clone()),
            engine,
            rule_reasons,
        })
    }

    /// `namespace/name`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `namespace/name`, shared.
    pub fn shared_id(&self) -> &Arc<str> {
        &self.id
    }

    /// The namespace whose workloads it may select.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// ALLOW, DENY or AUDIT.
    pub fn action(&self) -> Action {
        self.action
    }

    /// The compiled engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Whether it applies to a workload; `Err` says why not.
    pub fn selects(&self, workload: &SpiffeId, labels: &BTreeMap<String, String>) -> Result<(), String> {
        match workload.namespace() {
            Some(ns) if ns == self.namespace => {}
            Some(ns) => {
                return Err(format!("namespace {} is not the workload's ({ns})", self.namespace));
            }
            None => return Err(format!("workload {workload} has no namespace")),
        }
        if let Some(want) = &self.match_labels {
            for (k, v) in want {
                match labels.get(k) {
                    Some(have) if have == v => {}
                    Some(have) => {
                        return Err(format!("selector {k}={v}: the workload has {k}={have}"));
                    }
                    None => return Err(format!("selector {k}={v}: the workload has no {k}")),
                }
            }
        }
        Ok(())
    }

    /// Why this policy decided as it did: "allowed by ALLOW policy ns/name: rules[2] matched".
    pub(crate) fn reason(&self, v: &Verdict) -> String {
        if let Verdict::Rules(Some(i)) = v
            && let Some(written) = self.rule_reasons.get(*i)
        {
            return written.to_string();
        }
        decision_reason(self.action, &self.id, &v.describe())
    }

    pub(crate) fn evaluate(&self, input: &Input) -> Verdict {
        match &self.engine {
            Engine::Rules(r) => Verdict::Rules(r.first_match(input)),
            Engine::Rego(r) => Verdict::Rego(r.evaluate(input)),
            Engine::Wasm(w) => Verdict::Rego(w.evaluate(input)),
        }
    }

    /// For explanations: the matching rule, or why nothing matched.
    pub(crate) fn explain(&self, input: &Input) -> (Verdict, Vec<String>) {
        match &self.engine {
            Engine::Rules(r) => match r.explain(input) {
                Ok(i) => (Verdict::Rules(Some(i)), vec![format!("rules[{i}] matched")]),
                Err(why) => (Verdict::Rules(None), why),
            },
            Engine::Rego(r) => {
                let v = r.evaluate(input);
                let why = vec![v.reason.clone()];
                (Verdict::Rego(v), why)
            }
            Engine::Wasm(w) => {
                let v = w.evaluate(input);
                let why = vec![v.reason.clone()];
                (Verdict::Rego(v), why)
            }
        }
    }
}

/// The words of a decision made by policy `id` of `action`; for an AUDIT policy, the line it
/// adds to the decision's audits.
fn decision_reason(action: Action, id: &str, verdict: &str) -> String {
    match action {
        Action::Allow => format!("allowed by ALLOW policy {id}: {verdict}"),
        Action::Deny => format!("denied by DENY policy {id}: {verdict}"),
        Action::Audit => format!("{id}: {verdict}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(spec: &str) -> AuthorizationPolicy {
        serde_yaml::from_str(&format!(
            "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n{spec}"
        ))
        .unwrap()
    }

    #[test]
    fn broken_wasm_is_a_clear_load_error() {
        let e = Policy::compile(&doc("  wasm: {bundle: AAAA, entrypoint: a/allow}\n")).unwrap_err();
        assert!(matches!(e, CompileError::Wasm(_)), "{e}");
        assert!(e.to_string().starts_with("spec.wasm: bundle is not a gzip tarball"), "{e}");
    }

    #[test]
    fn wasm_policy_decides() {
        let bundle = crate::policy::wasm::tests::fixture("method_path_allowlist");
        let p = Policy::compile(&doc(&format!("  wasm: {{bundle: \"{bundle}\", entrypoint: envoy/authz/allow}}\n")))
            .unwrap();
        assert_eq!(p.engine().kind(), EngineKind::Wasm);
        let web = Some("spiffe://cluster.local/ns/shop/sa/web");
        let attrs = crate::policy::input::tests::attrs;
        assert!(p.evaluate(&Input::new(attrs(web, "GET", "/orders/1"))).positive());
        assert!(!p.evaluate(&Input::new(attrs(web, "DELETE", "/orders/1"))).positive());
    }

    #[test]
    fn only_one_engine() {
        let e =
            Policy::compile(&doc("  rules: [{}]\n  rego: {module: \"package a\", entrypoint: a/allow}\n")).unwrap_err();
        assert!(e.to_string().contains("only one of"), "{e}");
    }

    #[test]
    fn checks_api_version() {
        let mut d = doc("  rules: []\n");
        d.api_version = "palisade.io/v2".into();
        assert!(Policy::compile(&d).unwrap_err().to_string().starts_with("apiVersion"));
    }

    #[test]
    fn selection_by_namespace_and_labels() {
        let p = Policy::compile(&doc("  selector: {matchLabels: {app: orders}}\n  rules: []\n")).unwrap();
        let orders: SpiffeId = "spiffe://cluster.local/ns/shop/sa/orders".parse().unwrap();
        let other_ns: SpiffeId = "spiffe://cluster.local/ns/ops/sa/orders".parse().unwrap();
        let labels = BTreeMap::from([("app".to_string(), "orders".to_string())]);
        assert!(p.selects(&orders, &labels).is_ok());
        assert!(p.selects(&other_ns, &labels).is_err());
        assert!(p.selects(&orders, &BTreeMap::new()).is_err());
        let all = Policy::compile(&doc("  rules: []\n")).unwrap();
        assert!(all.selects(&orders, &BTreeMap::new()).is_ok());
    }
}
