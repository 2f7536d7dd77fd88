//! The injector's webhook body (`k8s::inject::admission_review`): any bytes from the API
//! server get an `AdmissionReview` response in JSON, allowed with a patch or refused with a
//! reason; never a panic, never a body the API server cannot read. A patch, when there is one,
//! is a JSON Patch that applies to the pod it was made for.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use palisade::k8s::inject::{InjectConfig, admission_review};

fn config() -> &'static InjectConfig {
    static C: OnceLock<InjectConfig> = OnceLock::new();
    C.get_or_init(InjectConfig::default)
}

fuzz_target!(|data: &[u8]| {
    let labels = BTreeMap::from([("palisade.io/inject".to_string(), "enabled".to_string())]);
    let out = admission_review(data, &labels, config());
    let review: serde_json::Value = serde_json::from_slice(&out).expect("the response is JSON");
    assert_eq!(review["kind"], "AdmissionReview");
    let response = &review["response"];
    assert!(response["allowed"].is_boolean(), "no verdict: {review}");
    if let Some(patch) = response["patch"].as_str() {
        let patch = base64::engine::general_purpose::STANDARD.decode(patch).expect("the patch is base64");
        let patch: serde_json::Value = serde_json::from_slice(&patch).expect("the patch is JSON");
        assert!(patch.is_array(), "a JSON Patch is an array");
        // It applies to the object it was made for.
        let request: serde_json::Value = serde_json::from_slice(data).expect("a patch answers a JSON request");
        let mut pod = request["request"]["object"].clone();
        let patch: json_patch::Patch = serde_json::from_value(patch).expect("a valid JSON Patch");
        json_patch::patch(&mut pod, &patch).expect("the patch applies to its pod");
    }
});
