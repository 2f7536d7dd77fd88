//! `palisade inject -f FILE`: injection of multi-document Kubernetes YAML, as if every namespace
//! were enabled. Documents are edited as YAML trees, so the user's key order survives; documents
//! that carry no pod template pass through unchanged (re-serialized: comments are not kept).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_yaml::Value;

use super::{InjectConfig, InjectError, Plan, malformed, plan};

/// Injects every pod template of a multi-document YAML stream and returns the stream.
///
/// Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers, Jobs,
/// CronJobs and the items of a `kind: List` are injected unless their pod template says
/// `palisade.io/inject: disabled` (or is hostNetwork, or already injected); every other
/// document is returned unchanged. Empty documents are dropped. Errors name the document (1-based)
/// and the object.
pub fn inject_yaml(text: &str, cfg: &InjectConfig) -> Result<String, InjectError> {
    let mut out = String::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let mut doc = Value::deserialize(document).map_err(|source| InjectError::Yaml { document: index, source })?;
        if doc.is_null() {
            continue;
        }
        inject_object(&mut doc, cfg).map_err(|e| InjectError::In {
            at: format!("document {index} ({})", describe(&doc)),
            source: Box::new(e),
        })?;
        let text = serde_yaml::to_string(&doc).map_err(|e| malformed(&format!("document {index}"), e))?;
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&text);
    }
    Ok(out)
}

/// Where each kind keeps its pod template, keyed by (API group, kind).
fn template_path(group: &str, kind: &str) -> Option<&'static [&'static str]> {
    match (group, kind) {
        ("", "Pod") => Some(&[]),
        ("", "ReplicationController")
        | ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch", "Job") => Some(&["spec", "template"]),
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

fn inject_object(object: &mut Value, cfg: &InjectConfig) -> Result<(), InjectError> {
    let api_version = object.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
    let kind = object.get("kind").and_then(Value::as_str).unwrap_or_default();
    if (group, kind) == ("", "List") {
        let Some(items) = object.get_mut("items").and_then(Value::as_sequence_mut) else {
            return Ok(());
        };
        for (i, item) in items.iter_mut().enumerate() {
            let at = format!("items[{i}] ({})", describe(item));
            inject_object(item, cfg).map_err(|e| InjectError::In { at, source: Box::new(e) })?;
        }
        return Ok(());
    }
    let Some(path) = template_path(group, kind) else {
        return Ok(());
    };
    // Kubernetes' YAML reader honours `<<` merge keys; resolve them before reading the template.
    object.apply_merge().map_err(|e| malformed("(merge keys)", e))?;
    let description = describe(object);

    let mut template = &mut *object;
    for key in path {
        template = template.get_mut(*key).ok_or_else(|| malformed(&path.join("."), "missing"))?;
    }
    let field = |leaf: &str| if path.is_empty() { leaf.to_string() } else { format!("{}.{leaf}", path.join(".")) };
    let meta: ObjectMeta = match template.get("metadata") {
        None | Some(Value::Null) => ObjectMeta::default(),
        Some(m) => serde_yaml::from_value(m.clone()).map_err(|e| malformed(&field("metadata"), e))?,
    };
    let spec: PodSpec = match template.get("spec") {
        None | Some(Value::Null) => return Err(malformed(&field("spec"), "missing")),
        Some(s) => serde_yaml::from_value(s.clone()).map_err(|e| malformed(&field("spec"), e))?,
    };
    if spec.containers.is_empty() {
        return Err(malformed(&field("spec.containers"), "missing: a pod needs at least one container"));
    }
    match plan(&meta, &spec, &BTreeMap::new(), cfg, true)? {
        Plan::Skip(outcome) => tracing::info!("{description}: {outcome}"),
        Plan::Inject(additions) => {
            additions.apply_yaml(template)?;
            tracing::info!("{description}: injected");
        }
    }
    Ok(())
}

/// `Kind namespace/name` (or `Kind name`) for messages.
fn describe(object: &Value) -> String {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    let kind = text(object.get("kind"));
    let meta = object.get("metadata");
    let name = text(meta.and_then(|m| m.get("name")));
    let namespace = text(meta.and_then(|m| m.get("namespace")));
    let kind = if kind.is_empty() { "object without kind".to_string() } else { kind };
    match (namespace.is_empty(), name.is_empty()) {
        (_, true) => kind,
        (true, false) => format!("{kind} {name}"),
        (false, false) => format!("{kind} {namespace}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::inject::{INIT_CONTAINER, PROXY_CONTAINER, TOKEN_VOLUME};

    const FILE: &str = r#"
# the web tier
kind: Deployment
apiVersion: apps/v1
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: app
        image: shop/web:1
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations:
    note: "yes"
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, appProtocol: http}
---
---
apiVersion: v1
kind: List
items:
- apiVersion: batch/v1
  kind: CronJob
  metadata: {name: report}
  spec:
    schedule: "0 * * * *"
    jobTemplate:
      spec:
        template:
          spec:
            restartPolicy: Never
            containers: [{name: report, image: shop/report:1}]
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: settings}
  data: {mode: "on", retries: "3"}
- apiVersion: apps/v1
  kind: DaemonSet
  metadata: {name: opted-out}
  spec:
    selector: {matchLabels: {app: agent}}
    template:
      metadata:
        labels: {app: agent}
        annotations: {palisade.io/inject: disabled}
      spec:
        containers: [{name: agent, image: shop/agent:1}]
"#;

    fn documents(text: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).unwrap())
            .filter(|v| !v.is_null())
            .collect()
    }

    fn init_names(template: &Value) -> Vec<&str> {
        template["spec"]["initContainers"]
            .as_sequence()
            .map(|s| s.iter().map(|c| c["name"].as_str().unwrap()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn only_pod_templates_are_injected_and_everything_else_passes_through() {
        let out = inject_yaml(FILE, &InjectConfig::default()).unwrap();
        let (before, after) = (documents(FILE), documents(&out));
        assert_eq!(after.len(), 3, "the empty document is dropped:\n{out}");

        let deployment = &after[0]["spec"]["template"];
        assert_eq!(init_names(deployment), [INIT_CONTAINER, PROXY_CONTAINER]);
        assert_eq!(deployment["metadata"]["annotations"]["palisade.io/status"], "injected");
        assert_eq!(deployment["metadata"]["labels"], before[0]["spec"]["template"]["metadata"]["labels"]);
        let volumes: Vec<_> = deployment["spec"]["volumes"].as_sequence().unwrap().iter().map(|v| &v["name"]).collect();
        assert!(volumes.contains(&&Value::from(TOKEN_VOLUME)), "{volumes:?}");
        // Outside the pod template the Deployment is as it was, in the user's key order.
        let mut deployment_without_template = after[0].clone();
        deployment_without_template["spec"]["template"] = Value::Null;
        let mut expected = before[0].clone();
        expected["spec"]["template"] = Value::Null;
        assert_eq!(deployment_without_template, expected);
        assert!(out.starts_with("kind: Deployment\napiVersion: apps/v1\n"), "{out}");

        assert_eq!(after[1], before[1], "the Service is unchanged");

        let items = after[2]["items"].as_sequence().unwrap();
        let cron = &items[0]["spec"]["jobTemplate"]["spec"]["template"];
        assert_eq!(init_names(cron), [INIT_CONTAINER, PROXY_CONTAINER]);
        assert_eq!(items[1], before[2]["items"][1], "the ConfigMap is unchanged");
        assert_eq!(items[2], before[2]["items"][2], "the opted-out DaemonSet is unchanged");
    }

    #[test]
    fn probes_are_rewritten_in_files_too() {
        let file = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      containers:
        - name: app
          image: web:1
          livenessProbe:
            tcpSocket: {port: 8080}
            periodSeconds: 4
"#;
        let out = inject_yaml(file, &InjectConfig::default()).unwrap();
        let doc = &documents(&out)[0];
        let probe = &doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"];
        assert_eq!(probe["httpGet"]["path"].as_str(), Some("/app-health/app/livez"), "{out}");
        assert_eq!(probe["httpGet"]["port"].as_u64(), Some(15020));
        assert!(probe.get("tcpSocket").is_none(), "{out}");
        assert_eq!(probe["periodSeconds"].as_u64(), Some(4));
    }

    #[test]
    fn injecting_the_output_again_changes_nothing() {
        let once = inject_yaml(FILE, &InjectConfig::default()).unwrap();
        assert_eq!(inject_yaml(&once, &InjectConfig::default()).unwrap(), once);
    }

    #[test]
    fn every_workload_kind_is_found_and_other_groups_are_left_alone() {
        for (api_version, kind, injected) in [
            ("v1", "ReplicationController", true),
            ("apps/v1", "StatefulSet", true),
            ("apps/v1", "ReplicaSet", true),
            ("batch/v1", "Job", true),
            // Same kind, someone else's API: its shape is unknown, so it is not touched.
            ("batch.volcano.sh/v1alpha1", "Job", false),
        ] {
            let doc = format!(
                "apiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: w}}\nspec:\n  template:\n    spec:\n      containers: [{{name: app, image: x}}]\n"
            );
            let out = documents(&inject_yaml(&doc, &InjectConfig::default()).unwrap());
            assert_eq!(!init_names(&out[0]["spec"]["template"]).is_empty(), injected, "{kind} of {api_version}");
        }
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: x}]\n";
        let out = documents(&inject_yaml(pod, &InjectConfig::default()).unwrap());
        assert_eq!(init_names(&out[0]), [INIT_CONTAINER, PROXY_CONTAINER]);
    }

    #[test]
    fn errors_name_the_document_and_the_problem() {
        let bad_yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\nkind: Pod\n  metadata: [unclosed\n";
        let err = inject_yaml(bad_yaml, &InjectConfig::default()).unwrap_err().to_string();
        assert!(err.starts_with("document 2: not valid YAML"), "{err}");

        let bad_annotation = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec:\n  template:\n    metadata:\n      annotations: {palisade.io/proxy-cpu: fast}\n    spec:\n      containers: [{name: app, image: x}]\n";
        let err = inject_yaml(&format!("---\n{bad_annotation}"), &InjectConfig::default()).unwrap_err().to_string();
        assert!(
            err.starts_with("document 1 (Deployment shop/web): annotation palisade.io/proxy-cpu=\"fast\""),
            "{err}"
        );

        let no_containers = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: batch/v1\n  kind: Job\n  metadata: {name: j}\n  spec:\n    template:\n      spec: {restartPolicy: Never}\n";
        let err = inject_yaml(no_containers, &InjectConfig::default()).unwrap_err().to_string();
        assert!(err.contains("document 1 (List): items[0] (Job j): spec.template.spec.containers: missing"), "{err}");
    }

    #[test]
    fn merge_keys_are_resolved_before_the_template_is_read() {
        // Without resolution, `<<` would be an annotation whose value is a map: unreadable.
        let doc = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  labels: &common {palisade.io/inject: disabled}\n  annotations: {<<: *common}\nspec:\n  containers: [{name: app, image: x}]\n";
        let out = documents(&inject_yaml(doc, &InjectConfig::default()).unwrap());
        assert_eq!(out[0]["metadata"]["annotations"]["palisade.io/inject"], "disabled");
        assert!(init_names(&out[0]).is_empty(), "the merged annotation opts the pod out");
    }
}
