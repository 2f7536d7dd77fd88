//! The Rego engine: a module compiled once by `regorus` when the policy loads, evaluated per
//! request against the shared input document.
//!
//! The compiled module is lowered once more into a regorus VM program (RVM bytecode, about three
//! times faster than the tree-walking interpreter); each evaluation runs a fresh VM over the
//! shared program, so workers never contend on a lock. A module the VM compiler cannot lower, or
//! an evaluation the VM fails, runs on the interpreter instead (`regorus::CompiledPolicy`).
//!
//! A result is either a boolean or an object `{allowed, http_status, headers, body}` (the
//! OPA-Envoy shape). Anything else — undefined, another type, an evaluation error — is "not
//! allowed" with a reason: the engine fails closed.

use std::collections::BTreeMap;
use std::sync::Arc;

use regorus::languages::rego::compiler::Compiler as VmCompiler;
use regorus::rvm::{Program, RegoVM};

use super::input::Input;

/// A Rego module compiled for one entrypoint.
#[derive(Clone)]
pub struct RegoEngine {
    compiled: regorus::CompiledPolicy,
    program: Option<Arc<Program>>,
    rule: String,
}

impl std::fmt::Debug for RegoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegoEngine")
            .field("rule", &self.rule)
            .field("vm", &self.program.is_some())
            .finish_non_exhaustive()
    }
}

/// What a Rego policy said about one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegoVerdict {
    /// The policy's answer; `false` on anything unexpected.
    pub allowed: bool,
    /// Why, in words (always set when not allowed).
    pub reason: String,
    /// `http_status` from an object result.
    pub http_status: Option<u16>,
    /// `headers` from an object result.
    pub headers: BTreeMap<String, String>,
    /// `body` from an object result.
    pub body: Option<String>,
}

/// Turns `shop/orders/allow` (or `data.shop.orders.allow`) into `data.shop.orders.allow`.
pub fn entrypoint_rule(entrypoint: &str) -> Result<String, String> {
    let trimmed = entrypoint.trim();
    let path = trimmed
        .strip_prefix("data.")
        .or_else(|| trimmed.strip_prefix("data/"))
        .unwrap_or(trimmed)
        .trim_start_matches('/');
    let parts: Vec<&str> = path.split(['/', '.']).collect();
    let ident = |s: &str| {
        let mut b = s.bytes();
        b.next().is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
            && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
    };
    if parts.iter().all(|p| ident(p)) {
        Ok(format!("data.{}", parts.join(".")))
    } else {
        Err(format!("entrypoint {entrypoint:?} is not a rule path like `package/path/rule`"))
    }
}

/// Wall-clock budget of one decision. A decision takes microseconds; a policy that runs away (a
/// comprehension over a huge range, say) is stopped and the request denied, with a reason,
/// instead of holding a data-path thread.
pub const EVALUATION_BUDGET: std::time::Duration = std::time::Duration::from_millis(250);

fn time_budget() -> regorus::utils::limits::ExecutionTimerConfig {
    regorus::utils::limits::ExecutionTimerConfig {
        limit: EVALUATION_BUDGET,
        // Clock reads are not free: look every few hundred steps.
        check_interval: std::num::NonZeroU32::new(256).expect("non-zero"),
    }
}

impl RegoEngine {
    /// Parses and compiles `module`; `file_name` appears in error positions
    /// (`shop/orders.rego:3:5`). The error text is regorus's, which carries line and column.
    ///
    /// Rego v1 syntax (`if`, `contains`) is expected; a module that only parses as Rego v0
    /// (`allow { ... }`, as many existing OPA-Envoy policies are written) is accepted as v0.
    /// When neither parses, the v1 error is reported.
    pub fn compile(file_name: &str, module: &str, entrypoint: &str) -> Result<Self, String> {
        let rule = entrypoint_rule(entrypoint)?;
        match Self::compile_as(file_name, module, &rule, false) {
            Ok(e) => Ok(e),
            Err(v1_error) => Self::compile_as(file_name, module, &rule, true).map_err(|_| v1_error),
        }
    }

    fn compile_as(file_name: &str, module: &str, rule: &str, v0: bool) -> Result<Self, String> {
        // The interpreter path evaluates through engines made from the compiled policy, which
        // take the process-wide fallback: set it once for every Rego evaluation.
        static FALLBACK: std::sync::Once = std::sync::Once::new();
        FALLBACK.call_once(|| regorus::utils::limits::set_fallback_execution_timer_config(Some(time_budget())));
        let mut engine = regorus::Engine::new();
        engine.set_rego_v0(v0);
        engine.set_execution_timer_config(time_budget());
        engine.add_policy(file_name.to_string(), module.to_string()).map_err(|e| e.to_string())?;
        let compiled = engine.compile_with_entrypoint(&rule.into()).map_err(|e| format!("entrypoint {rule}: {e}"))?;
        let program = VmCompiler::compile_from_policy(&compiled, &[rule]).ok();
        Ok(RegoEngine { compiled, program, rule: rule.to_string() })
    }

    /// The rule evaluated, e.g. `data.shop.orders.allow`.
    pub fn rule(&self) -> &str {
        &self.rule
    }

    /// Evaluates the entrypoint for one request.
    pub fn evaluate(&self, input: &Input) -> RegoVerdict {
        match self.run_vm(input) {
            Some(Ok(v)) => interpret(&self.rule, &v),
            // Out of time in the VM: the interpreter would only spend the budget again.
            Some(Err(e)) if is_out_of_time(&e) => deny(format!("{} exceeded its evaluation budget ({e})", self.rule)),
            _ => self.evaluate_interpreted(input),
        }
    }

    fn run_vm(&self, input: &Input) -> Option<Result<regorus::Value, String>> {
        let program = self.program.as_ref()?;
        let mut vm = RegoVM::new();
        vm.set_execution_timer_config(Some(time_budget()));
        vm.load_program(program.clone());
        vm.set_input(input.rego_value().clone());
        Some(vm.execute().map_err(|e| e.to_string()))
    }

    /// Evaluates with the tree-walking interpreter only.
    fn evaluate_interpreted(&self, input: &Input) -> RegoVerdict {
        match self.compiled.eval_with_input(input.rego_value().clone()) {
            Ok(v) => interpret(&self.rule, &v),
            Err(e) => deny(format!("{} failed: {e}", self.rule)),
        }
    }

    /// Whether the fast VM path is in use.
    pub fn uses_vm(&self) -> bool {
        self.program.is_some()
    }
}

fn is_out_of_time(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    e.contains("time limit") || e.contains("timed out") || e.contains("timeout") || e.contains("deadline")
}

fn deny(reason: String) -> RegoVerdict {
    RegoVerdict { allowed: false, reason, ..RegoVerdict::default() }
}

/// Reads a result the OPA way (shared with the Wasm engine so both fail closed alike).
pub(super) fn interpret(rule: &str, v: &regorus::Value) -> RegoVerdict {
    use regorus::Value;
    match v {
        Value::Bool(true) => RegoVerdict { allowed: true, reason: format!("{rule} is true"), ..RegoVerdict::default() },
        Value::Bool(false) => deny(format!("{rule} is false")),
        Value::Undefined => deny(format!("{rule} is undefined")),
        Value::Object(obj) => {
            let get = |k: &str| obj.get(&Value::from(k));
            let allowed = match get("allowed") {
                Some(Value::Bool(b)) => *b,
                _ => return deny(format!("{rule}: result object has no boolean `allowed`")),
            };
            let http_status = match get("http_status") {
                None => None,
                Some(s) => match s.as_u16() {
                    Ok(n) if (100..=599).contains(&n) => Some(n),
                    _ => return deny(format!("{rule}: `http_status` is not an HTTP status")),
                },
            };
            let mut headers = BTreeMap::new();
            match get("headers") {
                None => {}
                Some(Value::Object(h)) => {
                    for (k, v) in h.iter() {
                        match (k, v) {
                            (Value::String(k), Value::String(v)) => {
                                headers.insert(k.to_string(), v.to_string());
                            }
                            _ => {
                                return deny(format!("{rule}: `headers` must map strings to strings"));
                            }
                        }
                    }
                }
                Some(_) => return deny(format!("{rule}: `headers` is not an object")),
            }
            let body = match get("body") {
                None => None,
                Some(Value::String(s)) => Some(s.to_string()),
                Some(_) => return deny(format!("{rule}: `body` is not a string")),
            };
            RegoVerdict { allowed, reason: format!("{rule}.allowed is {allowed}"), http_status, headers, body }
        }
        other => deny(format!(
            "{rule} returned {}, not a boolean or an object",
            other.to_json_str().unwrap_or_else(|_| "an unprintable value".into())
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::input::tests::attrs;

    const ENVOY: &str = r#"
package envoy.authz

default allow := false

allow if {
    input.attributes.request.http.method == "GET"
    startswith(input.parsed_path[0], "orders")
}
"#;

    fn input(method: &str, path: &str) -> Input<'static> {
        Input::new(attrs(Some("spiffe://cluster.local/ns/shop/sa/web"), method, path))
    }

    #[test]
    fn a_runaway_policy_is_stopped_at_its_budget_and_denies() {
        let module = include_str!("../../tests/fixtures/opa/runaway.rego");
        let e = RegoEngine::compile("runaway.rego", module, "runaway/allow").unwrap();
        let started = std::time::Instant::now();
        let v = e.evaluate(&input("GET", "/"));
        let took = started.elapsed();
        assert!(!v.allowed);
        assert!(v.reason.contains("time limit") || v.reason.contains("budget"), "{}", v.reason);
        assert!(took < std::time::Duration::from_secs(2), "unbounded it runs for seconds; took {took:?}");
    }

    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<RegoEngine>();
    }

    /// The VM and the interpreter must agree on every module and request used in these tests.
    #[test]
    fn vm_agrees_with_interpreter() {
        let modules = [
            (ENVOY, "envoy/authz/allow"),
            (
                "package t\nr := {\"allowed\": false, \"http_status\": 451, \"headers\": {\"x\": \"y\"}} if input.attributes.request.http.method == \"DELETE\"\nr := {\"allowed\": true} if input.attributes.request.http.method != \"DELETE\"\n",
                "t/r",
            ),
            ("package t\nr if false\n", "t/r"),
            ("package t\nr := 1\n", "t/r"),
            (
                "package t\nimport rego.v1\nr if {\n some k, v in input.parsed_query\n k == \"expand\"\n \"items\" in v\n}\n",
                "t/r",
            ),
            (
                "package t\nr if {\n input.palisade.source.namespace == \"shop\"\n input.palisade.tls\n glob.match(\"/orders/*\", [\"/\"], input.attributes.request.http.path)\n}\n",
                "t/r",
            ),
            (
                "package t\ndefault r := false\nr if {\n count(input.parsed_path) > 1\n regex.match(`^[0-9]+$`, input.parsed_path[1])\n net.cidr_contains(\"10.0.0.0/8\", input.attributes.source.address.socketAddress.address)\n}\n",
                "t/r",
            ),
            (
                "package envoy.authz\ndefault allow = false\nallow { input.attributes.request.http.method == \"GET\" }\n",
                "envoy/authz/allow",
            ),
        ];
        let inputs = [
            input("GET", "/orders/7?expand=items"),
            input("DELETE", "/orders/7"),
            input("GET", "/admin"),
            Input::new(attrs(None, "POST", "/orders/abc?x=1&x=2")),
        ];
        for (m, entry) in modules {
            let e = RegoEngine::compile("t.rego", m, entry).unwrap();
            assert!(e.uses_vm(), "{m} does not run on the VM");
            for i in &inputs {
                let on_vm = match e.run_vm(i) {
                    Some(Ok(v)) => interpret(e.rule(), &v),
                    other => panic!("{m}: the VM failed: {other:?}"),
                };
                assert_eq!(on_vm, e.evaluate_interpreted(i), "{m} on {:?}", i.attributes());
            }
        }
    }

    #[test]
    fn entrypoints() {
        assert_eq!(entrypoint_rule("shop/orders/allow").unwrap(), "data.shop.orders.allow");
        assert_eq!(entrypoint_rule("data.envoy.authz.allow").unwrap(), "data.envoy.authz.allow");
        assert_eq!(entrypoint_rule("/envoy/authz/allow").unwrap(), "data.envoy.authz.allow");
        assert!(entrypoint_rule("envoy/authz/al low").is_err());
        assert!(entrypoint_rule("").is_err());
    }

    #[test]
    fn opa_envoy_policy_runs_unchanged() {
        let e = RegoEngine::compile("envoy.rego", ENVOY, "envoy/authz/allow").unwrap();
        assert!(e.evaluate(&input("GET", "/orders/7")).allowed);
        assert!(e.evaluate(&input("GET", "/ordersummary")).allowed);
        let v = e.evaluate(&input("POST", "/orders/7"));
        assert!(!v.allowed);
        assert!(v.reason.contains("data.envoy.authz.allow is false"), "{}", v.reason);
        assert!(!e.evaluate(&input("GET", "/admin")).allowed);
    }

    #[test]
    fn rego_v0_opa_envoy_policy_still_works() {
        let v0 = r#"
package envoy.authz

import input.attributes.request.http as http_request

default allow = false

allow {
    http_request.method == "GET"
    input.parsed_path[0] == "orders"
}
"#;
        let e = RegoEngine::compile("v0.rego", v0, "envoy/authz/allow").unwrap();
        assert!(e.evaluate(&input("GET", "/orders/1")).allowed);
        assert!(!e.evaluate(&input("PUT", "/orders/1")).allowed);
    }

    #[test]
    fn object_results_carry_status_headers_body() {
        let m = r#"
package shop.orders
result := {"allowed": false, "http_status": 451, "headers": {"x-why": "law"}, "body": "no"} if input.attributes.request.http.method == "DELETE"
result := {"allowed": true} if input.attributes.request.http.method != "DELETE"
"#;
        let e = RegoEngine::compile("o.rego", m, "shop/orders/result").unwrap();
        let v = e.evaluate(&input("DELETE", "/"));
        assert!(!v.allowed);
        assert_eq!(v.http_status, Some(451));
        assert_eq!(v.headers.get("x-why").map(String::as_str), Some("law"));
        assert_eq!(v.body.as_deref(), Some("no"));
        assert!(e.evaluate(&input("GET", "/")).allowed);
    }

    #[test]
    fn unexpected_results_fail_closed() {
        for (body, why) in [
            ("r := 1", "not a boolean or an object"),
            (r#"r := {"allow": true}"#, "no boolean `allowed`"),
            (r#"r := {"allowed": true, "http_status": "x"}"#, "not an HTTP status"),
            ("r if false", "undefined"),
        ] {
            let e = RegoEngine::compile("t.rego", &format!("package t\n{body}\n"), "t/r").unwrap();
            let v = e.evaluate(&input("GET", "/"));
            assert!(!v.allowed, "{body}");
            assert!(v.reason.contains(why), "{body}: {}", v.reason);
        }
    }

    #[test]
    fn uses_palisade_extras_and_headers() {
        let m = r#"
package p
allow if {
    input.palisade.source.namespace == "shop"
    input.palisade.tls
    input.attributes.request.http.headers["x-tenant"] == "a"
    input.attributes.source.address.socketAddress.address == "10.1.2.3"
}
"#;
        let e = RegoEngine::compile("p.rego", m, "p/allow").unwrap();
        assert!(e.evaluate(&input("GET", "/")).allowed);
        let plain = Input::new(attrs(None, "GET", "/"));
        assert!(!e.evaluate(&plain).allowed);
    }

    #[test]
    fn compile_errors_carry_a_position() {
        let err =
            RegoEngine::compile("shop/bad.rego", "package p\nallow if {\n  input.x ==\n}\n", "p/allow").unwrap_err();
        assert!(err.contains("shop/bad.rego:"), "{err}");
        let err = RegoEngine::compile("p.rego", ENVOY, "envoy/authz/nope").unwrap_err();
        assert!(!err.is_empty());
    }
}
