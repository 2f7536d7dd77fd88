//! Differential conformance with OPA: every fixture policy in `tests/fixtures/opa/` is evaluated
//! on the same generated requests by regorus (the Rego engine), by opa-wasm (the Wasm engine,
//! with the committed bundle) and by the real `opa eval`. All three must agree on every request.
//!
//! The OPA CLI is `$PALISADE_OPA`, else the test builds it with `.ci/install-opa` (once, cached
//! under `~/.cache/palisade-tools`). It never skips: a conformance test that skips proves
//! nothing.

mod tools;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use palisade::policy::rego::RegoEngine;
use palisade::policy::wasm::WasmEngine;
use palisade::policy::{Input, RequestAttributes};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

/// The fixtures and their entrypoints (as in each file's `# entrypoint:` line).
const POLICIES: &[(&str, &str)] = &[
    ("method_path_allowlist", "envoy/authz/allow"),
    ("tenant_isolation", "tenants/authz/allow"),
    ("admin_deny", "admin/guard/allow"),
    ("query_params", "query/authz/allow"),
    ("object_result", "envoy/authz/result"),
    ("bench_rules_10", "bench/authz/allow"),
];

const REQUESTS: usize = 300;
const SEED: u64 = 0x05ee_d0fa;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/opa")
}

/// What a decision comes to: the fields the proxy acts on, and whether the rule was undefined.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    allowed: bool,
    undefined: bool,
    http_status: Option<u16>,
    headers: BTreeMap<String, String>,
    body: Option<String>,
}

impl Outcome {
    fn from_verdict(v: &palisade::policy::rego::RegoVerdict) -> Self {
        Outcome {
            allowed: v.allowed,
            undefined: v.reason.ends_with("is undefined"),
            http_status: v.http_status,
            headers: v.headers.clone(),
            body: v.body.clone(),
        }
    }

    /// From `opa eval`'s raw value (`None`: undefined), read as the proxy reads a result.
    fn from_opa(v: Option<&Value>) -> Self {
        let mut o =
            Outcome { allowed: false, undefined: v.is_none(), http_status: None, headers: BTreeMap::new(), body: None };
        match v {
            Some(Value::Bool(b)) => o.allowed = *b,
            Some(Value::Object(m)) => {
                o.allowed = m.get("allowed") == Some(&Value::Bool(true));
                o.http_status = m.get("http_status").and_then(Value::as_u64).and_then(|n| u16::try_from(n).ok());
                if let Some(Value::Object(h)) = m.get("headers") {
                    for (k, v) in h {
                        o.headers.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                    }
                }
                o.body = m.get("body").and_then(Value::as_str).map(str::to_string);
            }
            _ => {}
        }
        o
    }
}

/// Deterministic requests: principals (and none), methods, paths with edge cases, tenants in
/// headers, query strings.
fn requests() -> Vec<RequestAttributes> {
    const PRINCIPALS: &[Option<&str>] = &[
        None,
        Some("spiffe://cluster.local/ns/shop/sa/web"),
        Some("spiffe://cluster.local/ns/shop/sa/admin"),
        Some("spiffe://cluster.local/ns/ops/sa/monitor"),
        Some("spiffe://cluster.local/ns/ops/sa/oncall"),
        Some("spiffe://cluster.local/ns/platform/sa/operator"),
        Some("spiffe://cluster.local/ns/acme/sa/app"),
        Some("spiffe://cluster.local/ns/globex/sa/api"),
        Some("spiffe://other.domain/ns/acme/sa/app"),
        Some("spiffe://cluster.local/ns/shop/sa/svc-3"),
        Some("spiffe://cluster.local/ns/shop/sa/svc-9"),
    ];
    const METHODS: &[&str] = &["GET", "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "get"];
    const PATHS: &[&str] = &[
        "/",
        "",
        "/orders",
        "/orders/",
        "/orders/7",
        "//orders/7",
        "/orders/%2e%2e/admin",
        "/catalog/items/42",
        "/catalog",
        "/healthz",
        "/metrics",
        "/metrics/",
        "/admin",
        "/admin/",
        "/Admin/users",
        "//admin//users",
        "/admin/health",
        "/admin/health/",
        "/ADMIN/STATUS",
        "/admin%2Fusers",
        "/tenants/acme/items",
        "/tenants/globex/",
        "/tenants//x",
        "/tenants/acme%2Fx/y",
        "/tenants/platform/x",
        "/search",
        "/search/",
        "/export",
        "/a%20b/c",
        "/api/v1/resource-3/x",
        "/api/v1/resource-9/",
        "/api/v1/resource-30/x",
    ];
    const QUERIES: &[&str] = &[
        "",
        "",
        "?limit=10",
        "?limit=10&format=json",
        "?limit=1000",
        "?limit=10&limit=25",
        "?limit=25&format=xml",
        "?limit=50&debug",
        "?limit=100&debug=0",
        "?limit=%31%30",
        "?limit=10&format=csv&format=json",
        "?q=a+b&limit=25",
        "?tenant=acme",
        "?tenant=acme&tenant=globex",
        "?tenant=globex&format=csv",
        "?tenant=",
        "?",
        "?&&limit=10",
    ];
    const TENANTS: &[Option<(&str, &str)>] = &[
        None,
        Some(("x-tenant", "acme")),
        Some(("X-Tenant", "globex")),
        Some(("x-tenant", "platform")),
        Some(("x-tenant", "")),
        Some(("x-tenant", "ACME")),
    ];
    type Request = (Option<&'static str>, &'static str, &'static str, Option<&'static str>);
    const ALLOWED: &[Request] = &[
        (Some("spiffe://cluster.local/ns/shop/sa/web"), "GET", "/orders/7", None),
        (Some("spiffe://cluster.local/ns/shop/sa/web"), "POST", "/orders", None),
        (Some("spiffe://cluster.local/ns/ops/sa/monitor"), "GET", "/healthz", None),
        (Some("spiffe://cluster.local/ns/acme/sa/app"), "GET", "/tenants/acme/items", Some("acme")),
        (Some("spiffe://cluster.local/ns/platform/sa/operator"), "PUT", "/tenants/globex/x", Some("globex")),
        (Some("spiffe://cluster.local/ns/ops/sa/oncall"), "POST", "/admin/users", None),
        (None, "GET", "/admin/health", None),
        (Some("spiffe://cluster.local/ns/shop/sa/web"), "GET", "/search?limit=25&format=json", None),
        (None, "GET", "/search?limit=10", None),
        (Some("spiffe://cluster.local/ns/acme/sa/app"), "GET", "/export?tenant=acme", Some("acme")),
        (Some("spiffe://cluster.local/ns/acme/sa/app"), "POST", "/export?tenant=acme&format=csv", Some("acme")),
        (Some("spiffe://cluster.local/ns/shop/sa/svc-3"), "GET", "/api/v1/resource-3/x", None),
        (Some("spiffe://cluster.local/ns/shop/sa/svc-9"), "GET", "/api/v1/resource-9/", None),
    ];
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut out = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let pick = |rng: &mut StdRng, n: usize| rng.random_range(0..n);
        let mut principal = PRINCIPALS[pick(&mut rng, PRINCIPALS.len())];
        let mut method = METHODS[pick(&mut rng, METHODS.len())];
        let mut path = format!("{}{}", PATHS[pick(&mut rng, PATHS.len())], QUERIES[pick(&mut rng, QUERIES.len())]);
        let mut tenant = TENANTS[pick(&mut rng, TENANTS.len())];
        // Purely random requests rarely satisfy a policy: a third start from a request some
        // policy allows, and half of those get one field changed into a near miss.
        if rng.random_bool(0.35) {
            let (p, m, u, t) = ALLOWED[pick(&mut rng, ALLOWED.len())];
            (principal, method, path, tenant) = (p, m, u.to_string(), t.map(|v| ("x-tenant", v)));
            if rng.random_bool(0.5) {
                match pick(&mut rng, 4) {
                    0 => principal = PRINCIPALS[pick(&mut rng, PRINCIPALS.len())],
                    1 => method = METHODS[pick(&mut rng, METHODS.len())],
                    2 => path.push_str(QUERIES[pick(&mut rng, QUERIES.len())]),
                    _ => tenant = TENANTS[pick(&mut rng, TENANTS.len())],
                }
            }
        }
        let mut headers = serde_json::Map::new();
        if let Some((k, v)) = tenant {
            headers.insert(k.to_string(), json!(v));
        }
        if rng.random_bool(0.3) {
            headers.insert("user-agent".into(), json!("curl/8.5"));
        }
        let mut attrs = json!({
            "destination": "spiffe://cluster.local/ns/shop/sa/orders",
            "destination_port": 8080,
            "source_ip": "10.1.2.3",
            "source_port": 40000,
            "method": method,
            "path": path,
            "host": "orders.shop:8080",
            "headers": headers,
        });
        if let Some(p) = principal {
            attrs["source"] = json!(p);
        }
        out.push(serde_json::from_value(attrs).expect("generated request attributes"));
    }
    out
}

/// Runs `opa eval` once per policy over all inputs: a comprehension evaluates the entrypoint
/// `with input as` each one, so an undefined result is simply absent from the answer.
fn opa_eval(opa: &Path, rego: &Path, entrypoint: &str, inputs: &[Value]) -> Vec<Option<Value>> {
    let rule = format!("data.{}", entrypoint.replace('/', "."));
    let dir = std::env::temp_dir().join(format!("palisade-opa-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join(format!("{}-inputs.json", rego.file_stem().unwrap().to_string_lossy()));
    std::fs::write(&data, serde_json::to_vec(&json!({ "conformance_inputs": inputs })).unwrap()).unwrap();
    let query = format!("[[i, r] | some i, x in data.conformance_inputs; r := {rule} with input as x]");
    let child = Command::new(opa)
        .args(["eval", "--format", "json", "-d"])
        .arg(rego)
        .arg("-d")
        .arg(&data)
        .arg(&query)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", opa.display()));
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&data);
    assert!(
        out.status.success(),
        "opa eval failed on {}: {}\n{}",
        rego.display(),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("opa eval --format json output");
    let pairs = v["result"][0]["expressions"][0]["value"]
        .as_array()
        .unwrap_or_else(|| panic!("unexpected opa eval output: {v}"))
        .clone();
    let mut results = vec![None; inputs.len()];
    for pair in pairs {
        let i = pair[0].as_u64().expect("index") as usize;
        results[i] = Some(pair[1].clone());
    }
    results
}

#[test]
fn regorus_wasm_and_opa_agree() {
    let opa = tools::opa();
    let requests = requests();
    assert!(requests.len() >= 200);
    let inputs: Vec<Input> = requests.into_iter().map(Input::new).collect();
    let documents: Vec<Value> = inputs.iter().map(|i| i.document().clone()).collect();
    let mut mismatches = Vec::new();
    let mut coverage = Vec::new();
    for (name, entrypoint) in POLICIES {
        let rego_path = fixtures().join(format!("{name}.rego"));
        let module = std::fs::read_to_string(&rego_path).unwrap();
        let rego = RegoEngine::compile(&format!("{name}.rego"), &module, entrypoint)
            .unwrap_or_else(|e| panic!("{name}: regorus does not compile it: {e}"));
        let bundle = std::fs::read(fixtures().join(format!("{name}.tar.gz")))
            .unwrap_or_else(|e| panic!("{name}.tar.gz: {e} (run tests/fixtures/opa/build.sh)"));
        let wasm = WasmEngine::compile(&base64::engine::general_purpose::STANDARD.encode(bundle), entrypoint)
            .unwrap_or_else(|e| panic!("{name}: the Wasm engine refuses the bundle: {e}"));
        let by_opa = opa_eval(opa, &rego_path, entrypoint, &documents);
        let mut allowed = 0;
        for (i, input) in inputs.iter().enumerate() {
            let a = Outcome::from_verdict(&rego.evaluate(input));
            let b = Outcome::from_verdict(&wasm.evaluate(input));
            let c = Outcome::from_opa(by_opa[i].as_ref());
            allowed += usize::from(c.allowed);
            if a != b || b != c {
                mismatches.push(format!(
                    "policy {name} ({entrypoint}), request {i}:\n  input: {}\n  regorus: {a:?}\n  wasm:    {b:?}\n  opa:     {c:?} (raw {:?})",
                    documents[i], by_opa[i]
                ));
            }
        }
        coverage.push((*name, allowed));
    }
    eprintln!("allowed per policy (of {}): {coverage:?}", inputs.len());
    let total = POLICIES.len() * inputs.len();
    // Every policy must see both answers, or agreement on it means little.
    for (name, allowed) in &coverage {
        assert!(*allowed > 0 && *allowed < inputs.len(), "{name}: {allowed} of {} allowed", inputs.len());
    }
    assert!(mismatches.is_empty(), "{} of {total} decisions differ:\n{}", mismatches.len(), mismatches.join("\n"));
}
