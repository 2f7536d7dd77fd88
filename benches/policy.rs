//! Per-decision cost of each policy engine (declarative rules, Rego via regorus, OPA Wasm via
//! opa-wasm) with a 10-rule and a 100-rule policy of the same shape: "service i may GET
//! /api/v1/resource-i/...". The Rego and Wasm policies are the committed fixtures
//! `tests/fixtures/opa/bench_rules_{10,100}.{rego,tar.gz}`; the declarative one is generated here.
//!
//! Each decision goes through `PolicySet::decide`, as in the proxy, on an input whose document
//! is already built (the proxy builds it once per request for all policies; `input/document`
//! measures that separately). The request matches the last rule: the worst case for engines
//! without rule indexing.
//!
//! `cargo bench --bench policy -- --warm-up-time 1 --measurement-time 3`

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use palisade::identity::SpiffeId;
use palisade::policy::{DefaultPolicy, Input, PolicySet, RequestAttributes, Workload, parse_documents};

const SIZES: [usize; 2] = [10, 100];

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/opa").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn header() -> &'static str {
    "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bench, namespace: shop}\nspec:\n  action: ALLOW\n"
}

fn rules_yaml(n: usize) -> String {
    let mut y = format!("{}  rules:\n", header());
    for i in 0..n {
        y.push_str(&format!(
            "  - from: [{{source: {{principals: [\"spiffe://cluster.local/ns/shop/sa/svc-{i}\"]}}}}]\n    to: [{{operation: {{methods: [GET], paths: [\"/api/v1/resource-{i}/*\"]}}}}]\n"
        ));
    }
    y
}

fn rego_yaml(n: usize) -> String {
    let module = String::from_utf8(fixture(&format!("bench_rules_{n}.rego"))).unwrap();
    let module = serde_json::to_string(&module).unwrap();
    format!("{}  rego: {{module: {module}, entrypoint: bench/authz/allow}}\n", header())
}

fn wasm_yaml(n: usize) -> String {
    let bundle = base64::engine::general_purpose::STANDARD.encode(fixture(&format!("bench_rules_{n}.tar.gz")));
    format!("{}  wasm: {{bundle: \"{bundle}\", entrypoint: bench/authz/allow}}\n", header())
}

fn set(yaml: &str) -> PolicySet {
    let policies = parse_documents(Path::new("bench.yaml"), yaml).unwrap().into_iter().map(|(_, p)| Arc::new(p));
    let workload = Workload {
        id: "spiffe://cluster.local/ns/shop/sa/orders".parse::<SpiffeId>().unwrap(),
        labels: BTreeMap::new(),
    };
    PolicySet::new(policies, workload, DefaultPolicy::Deny)
}

fn request(n: usize) -> RequestAttributes {
    let last = n - 1;
    serde_json::from_value(serde_json::json!({
        "source": format!("spiffe://cluster.local/ns/shop/sa/svc-{last}"),
        "source_ip": "10.1.2.3",
        "source_port": 40000,
        "destination": "spiffe://cluster.local/ns/shop/sa/orders",
        "destination_port": 8080,
        "method": "GET",
        "path": format!("/api/v1/resource-{last}/items?limit=10"),
        "host": "orders.shop:8080",
        "headers": {"x-tenant": "a", "user-agent": "bench"},
    }))
    .unwrap()
}

fn engines(c: &mut Criterion) {
    let mut g = c.benchmark_group("decide");
    for n in SIZES {
        let input = Input::new(request(n));
        // Build the shared document once, as the first policy of a request would.
        let _ = input.document();
        for (engine, yaml) in [("rules", rules_yaml(n)), ("rego", rego_yaml(n)), ("wasm", wasm_yaml(n))] {
            let set = set(&yaml);
            let d = set.decide(&input);
            assert!(d.allowed, "{engine}/{n}: {}", d.reason);
            g.bench_with_input(BenchmarkId::new(engine, n), &input, |b, input| b.iter(|| set.decide(black_box(input))));
        }
    }
    g.finish();
    c.bench_function("input/document", |b| {
        let attrs = request(10);
        b.iter(|| {
            let input = Input::new(black_box(attrs.clone()));
            black_box(input.document().clone())
        })
    });
}

criterion_group!(benches, engines);
criterion_main!(benches);
