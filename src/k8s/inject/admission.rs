//! The mutating webhook's decision: an `admission.k8s.io/v1` AdmissionReview in, the review's
//! response out.
//!
//! The patch is `json_patch::diff` between the pod exactly as the API server sent it and the same
//! JSON with the additions spliced in, so fields this crate's Kubernetes types do not know (a newer
//! API server's) are never rewritten or dropped.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::response::Status;
use serde_json::Value;

use super::{InjectConfig, Plan, plan};

/// Answers one AdmissionReview the API server POSTs to the webhook.
///
/// Always returns an `admission.k8s.io/v1` AdmissionReview JSON document; the caller serves it
/// with HTTP 200 whatever it says, because the API server reads the verdict from the body:
/// - a CREATE of a Pod that gets injected: `allowed: true` with a JSONPatch;
/// - anything else (another operation or kind, a pod that is disabled, not enabled, hostNetwork
///   or already injected): `allowed: true`, no patch;
/// - a pod whose `palisade.io/*` annotations injection cannot use: `allowed: false`, status code
///   400, with a message naming the annotation (the user sees it from `kubectl apply`);
/// - a body that is not an AdmissionReview (not JSON, wrong apiVersion, no request): `allowed:
///   false`, status code 400, reason `InvalidRequest`, with the request's uid when one could be
///   read. Such bodies do not come from an API server.
///
/// `namespace_labels` are the labels of `request.namespace`, which the caller looks up.
pub fn admission_review(body: &[u8], namespace_labels: &BTreeMap<String, String>, cfg: &InjectConfig) -> Vec<u8> {
    let response = respond(body, namespace_labels, cfg);
    let patch = response.patch.clone();
    let mut review = serde_json::to_value(response.into_review()).unwrap_or_else(|e| {
        // Unreachable in practice (the review holds only strings, maps and bytes); if it happens
        // the API server sees a refusal rather than a broken body.
        tracing::error!(error = %e, "cannot serialize the AdmissionReview response");
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {"uid": "", "allowed": false, "status": {"code": 500, "message": "palisade injector: cannot serialize its response"}},
        })
    });
    // The API wants the patch base64-encoded (Go's encoding of []byte); kube 5 writes the bytes
    // as a JSON array of numbers (kube-rs issue 1781).
    if let (Some(bytes), Some(slot)) = (patch, review.pointer_mut("/response/patch")) {
        use base64::Engine;
        *slot = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    review.to_string().into_bytes()
}

fn respond(body: &[u8], namespace_labels: &BTreeMap<String, String>, cfg: &InjectConfig) -> AdmissionResponse {
    let raw: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return invalid("", format!("the body is not JSON: {e}")),
    };
    let uid = raw.pointer("/request/uid").and_then(Value::as_str).unwrap_or_default().to_string();
    let (api_version, kind) = (raw.get("apiVersion").and_then(Value::as_str), raw.get("kind").and_then(Value::as_str));
    if (api_version, kind) != (Some("admission.k8s.io/v1"), Some("AdmissionReview")) {
        return invalid(
            &uid,
            format!("expected an AdmissionReview of admission.k8s.io/v1, got kind {kind:?} apiVersion {api_version:?}"),
        );
    }
    let review: AdmissionReview<DynamicObject> = match serde_json::from_value(raw.clone()) {
        Ok(r) => r,
        Err(e) => return invalid(&uid, format!("the body is not an AdmissionReview: {e}")),
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(_) => return invalid(&uid, "the AdmissionReview has no request"),
    };
    let response = AdmissionResponse::from(&request);
    let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod" && request.sub_resource.is_none();
    if !is_pod || request.operation != Operation::Create {
        return response;
    }
    let Some(object) = raw.pointer("/request/object") else {
        return bad_request(response, "the request has no object".to_string());
    };
    let pod: Pod = match serde_json::from_value(object.clone()) {
        Ok(p) => p,
        Err(e) => return bad_request(response, format!("request.object is not a Pod: {e}")),
    };
    let name = pod_name(request.namespace.as_deref(), &pod);
    let Some(spec) = &pod.spec else {
        // Nothing to inject into; the API server's validation refuses it with its own words.
        return response;
    };

    match plan(&pod.metadata, spec, namespace_labels, cfg, false) {
        Err(e) => {
            tracing::info!(pod = %name, error = %e, "sidecar injection refused the pod");
            bad_request(response, format!("palisade sidecar injection refused pod {name}: {e}"))
        }
        Ok(Plan::Skip(outcome)) => {
            tracing::debug!(pod = %name, %outcome, "sidecar injection");
            response
        }
        Ok(Plan::Inject(additions)) => {
            let mut injected = object.clone();
            if let Err(e) = additions.apply_json(&mut injected) {
                return bad_request(response, format!("palisade sidecar injection refused pod {name}: {e}"));
            }
            let patch = json_patch::diff(object, &injected);
            match response.clone().with_patch(patch) {
                Ok(r) => {
                    tracing::info!(pod = %name, "sidecar injected");
                    r
                }
                Err(e) => {
                    let mut r = response.deny(format!("palisade sidecar injection failed for pod {name}: {e}"));
                    r.result.code = 500;
                    r
                }
            }
        }
    }
}

/// `namespace/name`, or `namespace/generateName*` for a pod a controller is creating (its name
/// is only assigned after admission).
fn pod_name(namespace: Option<&str>, pod: &Pod) -> String {
    let namespace = namespace.or(pod.metadata.namespace.as_deref()).unwrap_or("default");
    match (&pod.metadata.name, &pod.metadata.generate_name) {
        (Some(name), _) if !name.is_empty() => format!("{namespace}/{name}"),
        (_, Some(prefix)) if !prefix.is_empty() => format!("{namespace}/{prefix}*"),
        _ => format!("{namespace}/(unnamed)"),
    }
}

fn bad_request(response: AdmissionResponse, message: String) -> AdmissionResponse {
    let mut response = response.deny(&message);
    response.result = Status::failure(&message, "BadRequest").with_code(400);
    response
}

fn invalid(uid: &str, message: impl ToString) -> AdmissionResponse {
    let mut response = AdmissionResponse::invalid(message);
    response.uid = uid.to_string();
    response.result.code = 400;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::inject::{Outcome, annotation, inject_pod_template};
    use serde_json::json;

    const UID: &str = "705ab4f5-6393-11e8-b7cc-42010a800002";

    fn raw_pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": "web-7d4b9c-",
                "namespace": "shop",
                "creationTimestamp": null,
                "labels": {"app": "web", "pod-template-hash": "7d4b9c"},
                "annotations": annotations,
            },
            "spec": {
                "containers": [{
                    "name": "app", "image": "shop/web:1", "resources": {}, "aFutureField": {"x": 1},
                    "ports": [{"name": "tls", "containerPort": 8443}],
                    "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 7, "aFutureProbeField": 2},
                    "readinessProbe": {"grpc": {"port": 9090}},
                    "startupProbe": {"httpGet": {"port": "tls", "path": "/healthz", "scheme": "HTTPS"}},
                }],
                "serviceAccountName": "web",
                "aFuturePodField": true,
            },
            "status": {},
        })
    }

    fn review(object: Value, operation: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": UID,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": operation,
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": object,
                "oldObject": null,
                "dryRun": false,
            }
        }))
        .unwrap()
    }

    fn enabled() -> BTreeMap<String, String> {
        BTreeMap::from([(annotation::INJECT.to_string(), "enabled".to_string())])
    }

    /// The response part of the answer.
    fn answer(body: &[u8], ns: &BTreeMap<String, String>) -> Value {
        let out: Value = serde_json::from_slice(&admission_review(body, ns, &InjectConfig::default())).unwrap();
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(out["kind"], "AdmissionReview");
        out["response"].clone()
    }

    /// The JSONPatch of a response: base64 of the patch's JSON, as the API server decodes it.
    fn patch_of(response: &Value) -> json_patch::Patch {
        use base64::Engine;
        assert_eq!(response["patchType"], "JSONPatch", "{response}");
        let b64 = response["patch"].as_str().unwrap_or_else(|| panic!("patch is not a base64 string: {response}"));
        serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
    }

    #[test]
    fn the_patch_applied_to_the_pod_gives_the_injected_pod() {
        let original = raw_pod(json!({}));
        let response = answer(&review(original.clone(), "CREATE"), &enabled());
        assert_eq!(response["uid"], UID);
        assert_eq!(response["allowed"], true);

        let mut patched = original.clone();
        json_patch::patch(&mut patched, &patch_of(&response)).unwrap();

        // Same as the typed injection of the same pod...
        let mut expected: Pod = serde_json::from_value(original.clone()).unwrap();
        let spec = expected.spec.as_mut().unwrap();
        let outcome =
            inject_pod_template(&mut expected.metadata, spec, &BTreeMap::new(), &InjectConfig::default(), true)
                .unwrap();
        assert_eq!(outcome, Outcome::Injected);
        assert_eq!(serde_json::from_value::<Pod>(patched.clone()).unwrap(), expected);
        // ...and what the typed model does not know is kept, not rewritten.
        assert_eq!(patched["spec"]["aFuturePodField"], true);
        assert_eq!(patched["spec"]["containers"][0]["aFutureField"], json!({"x": 1}));
        assert_eq!(
            patched["spec"]["containers"][0]["livenessProbe"],
            json!({"httpGet": {"path": "/app-health/app/livez", "port": 15020, "scheme": "HTTP"}, "periodSeconds": 7, "aFutureProbeField": 2}),
            "the probe is rewritten in place"
        );
        assert_eq!(patched["metadata"]["creationTimestamp"], Value::Null);
        assert_eq!(patched["metadata"]["labels"], original["metadata"]["labels"]);
    }

    #[test]
    fn an_already_injected_pod_is_allowed_without_a_patch() {
        let original = raw_pod(json!({}));
        let response = answer(&review(original.clone(), "CREATE"), &enabled());
        let mut injected = original;
        json_patch::patch(&mut injected, &patch_of(&response)).unwrap();

        let again = answer(&review(injected, "CREATE"), &enabled());
        assert_eq!((again["uid"].as_str(), &again["allowed"]), (Some(UID), &json!(true)));
        assert!(again.get("patch").is_none() && again.get("patchType").is_none(), "{again}");
    }

    #[test]
    fn pods_not_enabled_disabled_or_not_created_get_no_patch() {
        let cases = [
            (raw_pod(json!({})), "CREATE", BTreeMap::new()),
            (raw_pod(json!({"palisade.io/inject": "disabled"})), "CREATE", enabled()),
            (raw_pod(json!({})), "UPDATE", enabled()),
        ];
        for (pod, operation, ns) in cases {
            let response = answer(&review(pod, operation), &ns);
            assert_eq!(response["allowed"], true, "{response}");
            assert!(response.get("patch").is_none(), "{response}");
        }
    }

    #[test]
    fn a_bad_annotation_is_refused_with_400_naming_it_and_the_pod() {
        let pod = raw_pod(json!({"palisade.io/exclude-outbound-ports": "5432,postgres"}));
        let response = answer(&review(pod, "CREATE"), &enabled());
        assert_eq!(response["uid"], UID);
        assert_eq!(response["allowed"], false);
        assert_eq!(response["status"]["code"], 400);
        let message = response["status"]["message"].as_str().unwrap();
        assert!(message.contains("palisade.io/exclude-outbound-ports"), "{message}");
        assert!(message.contains("\"postgres\" is not a TCP port"), "{message}");
        assert!(message.contains("pod shop/web-7d4b9c-*"), "generateName stands in for the name: {message}");
        assert!(response.get("patch").is_none());
    }

    #[test]
    fn a_body_that_is_not_an_admission_review_is_invalid_400() {
        let not_v1 = serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": UID}
        }))
        .unwrap();
        let no_request = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec();
        for (body, says, uid) in [
            (b"{not json".to_vec(), "not JSON", ""),
            (b"[1,2]".to_vec(), "expected an AdmissionReview", ""),
            (
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":7}}"#.to_vec(),
                "not an AdmissionReview",
                "",
            ),
            (not_v1, "admission.k8s.io/v1", UID),
            (no_request, "no request", ""),
        ] {
            let response = answer(&body, &enabled());
            assert_eq!(response["allowed"], false, "{response}");
            assert_eq!(response["status"]["code"], 400, "{response}");
            assert_eq!(response["uid"], uid, "{response}");
            assert!(response["status"]["message"].as_str().unwrap().contains(says), "{response}");
        }
    }

    #[test]
    fn an_object_that_is_not_a_pod_is_refused() {
        let response = answer(&review(json!({"apiVersion": "v1", "kind": "Pod", "spec": 7}), "CREATE"), &enabled());
        assert_eq!((response["allowed"].clone(), response["status"]["code"].clone()), (json!(false), json!(400)));
        assert!(response["status"]["message"].as_str().unwrap().contains("not a Pod"), "{response}");
    }
}
