//! Policy files (`policy::load`): any text as a YAML stream of policies with rules, Rego or a
//! Wasm bundle, each that compiles then evaluated against a fixed request. A file that does not
//! load says why (an error, never a panic).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use palisade::policy::input::{Input, RequestAttributes};
use palisade::policy::set::{PolicySet, Workload};

fn input() -> &'static Input<'static> {
    static INPUT: OnceLock<Input<'static>> = OnceLock::new();
    INPUT.get_or_init(|| {
        let attrs: RequestAttributes =
            serde_json::from_str(include_str!("../../examples/policies/request-get-orders.json")).unwrap();
        Input::new(attrs)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match palisade::policy::load::parse_documents(std::path::Path::new("fuzz.yaml"), text) {
        Ok(policies) => {
            let workload = Workload {
                id: "spiffe://cluster.local/ns/shop/sa/orders".parse().unwrap(),
                labels: [("app".to_string(), "orders".to_string())].into(),
            };
            let set = PolicySet::new(policies.into_iter().map(|(_, p)| Arc::new(p)), workload, Default::default());
            let _ = set.explain(input());
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
