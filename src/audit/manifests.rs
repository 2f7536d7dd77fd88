//! The audit's input from a directory of manifests: the mesh's resources, read and validated by
//! the control plane's own file source, and the workloads of the pod templates beside them.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::{AuditInput, AuditSettings, Workload};
use crate::control::source::file::judge_mixed;
use crate::control::source::{Resource, ResourceError};

/// Why a directory could not be audited.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error("{} invalid manifest(s); the control plane would refuse them too:\n  {}",
            .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<ResourceError>),
}

/// Reads every `*.yaml`/`*.yml` file of `dir` (not recursive, as the control plane's file
/// source): mesh resources are judged exactly as the control plane judges them, any refusal
/// fails the whole read (an audit of what would not load is a lie); pod templates become
/// [`Workload`]s; other objects are skipped.
pub fn read_dir(dir: &Path, settings: AuditSettings, now: i64) -> Result<AuditInput, ManifestError> {
    let io = |cause| ManifestError::Io { path: dir.display().to_string(), cause };
    let mut files: Vec<_> =
        std::fs::read_dir(dir).map_err(io)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>().map_err(io)?;
    files.retain(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    files.sort();
    let mut resources: BTreeMap<(&'static str, String, String), Resource> = BTreeMap::new();
    let (mut errors, mut workloads) = (Vec::new(), Vec::new());
    for path in files {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|cause| ManifestError::Io { path: name.clone(), cause })?;
        let (found, refused) = judge_mixed(&name, &text, |doc| workloads.extend(workload_of(doc, &settings)));
        errors.extend(refused);
        for r in found {
            let key = (r.kind(), r.namespace.clone(), r.name.clone());
            if let Some(first) = resources.get(&key) {
                errors.push(ResourceError {
                    origin: r.origin.clone(),
                    document: None,
                    line: None,
                    column: None,
                    object: Some(super::object(&r)),
                    message: format!("defined twice (first in {})", first.origin),
                });
            } else {
                resources.insert(key, r);
            }
        }
    }
    if !errors.is_empty() {
        return Err(ManifestError::Invalid(errors));
    }
    Ok(AuditInput {
        settings,
        resources: resources.into_values().collect(),
        workloads,
        sidecars: None,
        roots: Vec::new(),
        ca_key_sealed: None,
        now,
    })
}

/// The workload of a pod template: Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob
/// or Pod. `None` for any other object, and for pods that opted out of injection.
pub fn workload_of(doc: &Value, settings: &AuditSettings) -> Option<Workload> {
    let kind = doc.get("kind")?.as_str()?;
    let template = match kind {
        "Pod" => doc,
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => doc.pointer("/spec/template")?,
        "CronJob" => doc.pointer("/spec/jobTemplate/spec/template")?,
        _ => return None,
    };
    let meta = template.get("metadata");
    let labels: BTreeMap<String, String> = meta
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    let opted_out = |what: &str| {
        meta.and_then(|m| m.get(what)).and_then(|m| m.get("palisade.io/inject")).and_then(Value::as_str)
            == Some("disabled")
    };
    if opted_out("labels") || opted_out("annotations") {
        return None;
    }
    let namespace = doc.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default").to_string();
    let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("?");
    let spec = template.get("spec");
    let sa = spec
        .and_then(|s| s.get("serviceAccountName").or_else(|| s.get("serviceAccount")))
        .and_then(Value::as_str)
        .unwrap_or("default");
    Some(Workload {
        name: format!("{kind} {namespace}/{name}"),
        identity: Some(format!("spiffe://{}/ns/{namespace}/sa/{sa}", settings.trust_domain)),
        namespace,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_templates_become_workloads_and_other_objects_are_skipped() {
        let s = AuditSettings::default();
        let deploy = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {"template": {"metadata": {"labels": {"app": "orders"}}, "spec": {"serviceAccountName": "orders"}}}});
        let w = workload_of(&deploy, &s).unwrap();
        assert_eq!(w.name, "Deployment shop/orders");
        assert_eq!(w.labels.get("app").map(String::as_str), Some("orders"));
        assert_eq!(w.identity.as_deref(), Some("spiffe://cluster.local/ns/shop/sa/orders"));
        let cron = serde_json::json!({"kind": "CronJob", "metadata": {"name": "c"},
            "spec": {"jobTemplate": {"spec": {"template": {"metadata": {"labels": {"a": "b"}}}}}}});
        let w = workload_of(&cron, &s).unwrap();
        assert_eq!(
            (w.namespace.as_str(), w.identity.as_deref()),
            ("default", Some("spiffe://cluster.local/ns/default/sa/default"))
        );
        let svc = serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "orders"}});
        assert_eq!(workload_of(&svc, &s), None);
        let out = serde_json::json!({"kind": "Pod", "metadata": {"name": "p", "annotations": {"palisade.io/inject": "disabled"}}});
        assert_eq!(workload_of(&out, &s), None, "not meshed: the mesh's checks do not apply");
    }

    #[test]
    fn an_invalid_mesh_manifest_fails_the_read_and_names_where() {
        let dir = std::env::temp_dir().join(format!("palisade-audit-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.as_path().join("a.yaml"),
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: shop}\nspec: {template: {metadata: {labels: {app: d}}}}\n---\n\
             apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec: {rules: [{to: [{operation: {method: [GET]}}]}]}\n",
        )
        .unwrap();
        let e = read_dir(dir.as_path(), AuditSettings::default(), 0).unwrap_err().to_string();
        assert!(e.contains("a.yaml") && e.contains("AuthorizationPolicy shop/p") && e.contains("method"), "{e}");
        std::fs::write(dir.as_path().join("a.yaml"), "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: shop}\nspec: {template: {metadata: {labels: {app: d}}}}\n").unwrap();
        let input = read_dir(dir.as_path(), AuditSettings::default(), 0).unwrap();
        assert_eq!((input.resources.len(), input.workloads.len()), (0, 1));
        assert!(read_dir(&dir.join("missing"), AuditSettings::default(), 0).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
