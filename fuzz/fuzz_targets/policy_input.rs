//! The policy input document (`policy::input`, what `palisade policy check --input` reads and
//! what the data path builds per request) as any JSON, decided and explained by a set of rule
//! and Rego policies. Never panics.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use palisade::policy::input::{Input, RequestAttributes};
use palisade::policy::set::{PolicySet, Workload};

fn set() -> &'static PolicySet {
    static SET: OnceLock<PolicySet> = OnceLock::new();
    SET.get_or_init(|| {
        let mut policies = Vec::new();
        for (name, text) in [
            ("orders.yaml", include_str!("../../examples/policies/orders.yaml")),
            ("envoy-authz.yaml", include_str!("../../examples/policies/envoy-authz.yaml")),
        ] {
            let docs = palisade::policy::load::parse_documents(std::path::Path::new(name), text).unwrap();
            policies.extend(docs.into_iter().map(|(_, p)| Arc::new(p)));
        }
        let workload = Workload {
            id: "spiffe://cluster.local/ns/shop/sa/orders".parse().unwrap(),
            labels: [("app".to_string(), "orders".to_string())].into(),
        };
        PolicySet::new(policies, workload, Default::default())
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(attrs) = serde_json::from_slice::<RequestAttributes>(data) else { return };
    let secret: Vec<String> =
        attrs.headers.keys().map(|k| k.to_ascii_lowercase()).filter(|k| palisade::redact::is_secret(k)).collect();
    let input = Input::new(attrs);
    let _ = set().explain(&input);
    // The redacted document goes to decision logs: a credential header's value never does.
    let doc = input.redacted_document();
    for name in secret {
        if let Some(value) = doc.pointer("/attributes/request/http/headers").and_then(|h| h.get(&name)) {
            assert_eq!(value.as_str(), Some(palisade::redact::REDACTED), "{name} reached the decision log");
        }
    }
});
