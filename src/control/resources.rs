//! Resource source `file`: a directory of YAML manifests in exactly the CRD format, watched.
//!
//! Each file is parsed on its own. A file that does not parse is reported (file, document,
//! field) and its last good content stays in force, so one typo never disturbs the rest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;

/// The kinds the mesh understands.
pub const KINDS: &[&str] = &["AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication", "RateLimitPolicy"];

/// Kinds validated and pushed to sidecars, which do not enforce them yet (JWT validation and
/// rate limits are not built). Said in logs and Kubernetes status, so nobody mistakes one for
/// a protection.
pub const NOT_ENFORCED: &[&str] = &["RequestAuthentication", "RateLimitPolicy"];
/// The API group/version every manifest must carry.
pub const API_VERSION: &str = "palisade.io/v1alpha1";

/// One manifest, as every other part of Palisade sees it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Resource {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The whole manifest.
    pub manifest: Value,
    /// `FILE#DOC` (document index from 0), for error messages.
    pub origin: String,
}

impl Resource {
    /// `spec.selector.matchLabels`, if any.
    pub fn match_labels(&self) -> Option<BTreeMap<String, String>> {
        let m = self.manifest.get("spec")?.get("selector")?.get("matchLabels")?.as_object()?;
        Some(m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
    }

    /// Whether this resource applies to a workload in `namespace` with `labels`.
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespace == namespace
            && self.match_labels().is_none_or(|want| want.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

/// Why a file was not loaded.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error("{file}: document {document}: {message}")]
pub struct ResourceError {
    pub file: String,
    pub document: usize,
    pub message: String,
}

/// Parses every document of one YAML file.
pub fn parse_file(file: &str, text: &str) -> Result<Vec<Resource>, ResourceError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let err = |message: String| ResourceError { file: file.to_string(), document: i, message };
        let value: Value = serde::Deserialize::deserialize(doc).map_err(|e| err(e.to_string()))?;
        if value.is_null() {
            continue; // an empty document (e.g. a trailing `---`)
        }
        let field = |path: &str| -> Result<String, ResourceError> {
            let mut v = &value;
            for p in path.split('.') {
                v = v.get(p).ok_or_else(|| err(format!("missing field `{path}`")))?;
            }
            v.as_str().map(str::to_string).ok_or_else(|| err(format!("field `{path}` must be a string")))
        };
        let api = field("apiVersion")?;
        if api != API_VERSION {
            return Err(err(format!("apiVersion {api:?} is not {API_VERSION:?}")));
        }
        let kind = field("kind")?;
        if !KINDS.contains(&kind.as_str()) {
            return Err(err(format!("kind {kind:?} is not one of {KINDS:?}")));
        }
        let name = field("metadata.name")?;
        let namespace = field("metadata.namespace")?;
        if value.get("spec").is_none_or(|s| !s.is_object()) {
            return Err(err("missing object field `spec`".into()));
        }
        out.push(Resource { kind, namespace, name, manifest: value, origin: format!("{file}#{i}") });
    }
    Ok(out)
}

/// Watches a directory by polling modification times: no platform watcher to miss events on
/// editors that replace files, and changes land well within a second.
pub struct FileSource {
    dir: PathBuf,
    seen: BTreeMap<PathBuf, (SystemTime, u64)>,
    /// Stamps from the previous scan: a file is read only once its stamp held still for one
    /// interval, so a file caught half-written (`echo > file` truncates first) is not loaded.
    pending: BTreeMap<PathBuf, (SystemTime, u64)>,
    good: BTreeMap<PathBuf, Vec<Resource>>,
    errors: BTreeMap<PathBuf, ResourceError>,
}

impl FileSource {
    /// A source over `dir` (which must exist).
    pub fn new(dir: &Path) -> Self {
        FileSource {
            dir: dir.to_path_buf(),
            seen: BTreeMap::new(),
            pending: BTreeMap::new(),
            good: BTreeMap::new(),
            errors: BTreeMap::new(),
        }
    }

    /// How often [`poll`](Self::poll) should run.
    pub const INTERVAL: Duration = Duration::from_millis(100);

    /// Rescans; returns true if the set of good resources may have changed.
    pub fn poll(&mut self) -> std::io::Result<bool> {
        let mut current = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if !is_yaml || !path.is_file() {
                continue;
            }
            let meta = std::fs::metadata(&path)?;
            current.insert(path, (meta.modified()?, meta.len()));
        }
        let settling = current != self.pending;
        self.pending = current.clone();
        if current == self.seen || settling {
            return Ok(false);
        }
        let removed: Vec<PathBuf> = self.seen.keys().filter(|p| !current.contains_key(*p)).cloned().collect();
        for p in removed {
            self.good.remove(&p);
            self.errors.remove(&p);
        }
        for (path, stamp) in &current {
            if self.seen.get(path) == Some(stamp) {
                continue;
            }
            let name = path.display().to_string();
            let parsed = std::fs::read_to_string(path)
                .map_err(|e| ResourceError { file: name.clone(), document: 0, message: e.to_string() })
                .and_then(|text| parse_file(&name, &text));
            match parsed {
                Ok(resources) => {
                    for r in resources.iter().filter(|r| NOT_ENFORCED.contains(&r.kind.as_str())) {
                        tracing::warn!(
                            file = %name, kind = %r.kind, namespace = %r.namespace, name = %r.name,
                            "accepted and pushed, but this version of Palisade does not enforce this kind yet"
                        );
                    }
                    self.errors.remove(path);
                    self.good.insert(path.clone(), resources);
                }
                Err(e) => {
                    tracing::error!(error = %e, "resource file refused; its previous content stays in force");
                    self.errors.insert(path.clone(), e);
                }
            }
        }
        self.seen = current;
        Ok(true)
    }

    /// Reads the directory now, without waiting for files to settle: used once at start, so
    /// the control plane never serves a snapshot before it has read its resources.
    pub fn load_initial(&mut self) -> std::io::Result<()> {
        self.poll()?; // records the stamps as pending
        self.poll()?; // same stamps: reads every file
        Ok(())
    }

    /// Every good resource, in a stable order.
    pub fn resources(&self) -> Vec<Resource> {
        let mut all: Vec<Resource> = self.good.values().flatten().cloned().collect();
        all.sort_by(|a, b| (&a.kind, &a.namespace, &a.name).cmp(&(&b.kind, &b.namespace, &b.name)));
        all
    }

    /// Files currently refused, with why.
    pub fn errors(&self) -> Vec<ResourceError> {
        self.errors.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: a, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: ALLOW
---
apiVersion: palisade.io/v1alpha1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
---
";

    #[test]
    fn parses_several_documents_and_selects_by_namespace_and_labels() {
        let rs = parse_file("p.yaml", OK).unwrap();
        assert_eq!(rs.len(), 2);
        let labels: BTreeMap<_, _> = [("app".to_string(), "orders".to_string())].into();
        assert!(rs[0].selects("shop", &labels));
        assert!(!rs[0].selects("shop", &BTreeMap::new()));
        assert!(!rs[0].selects("other", &labels));
        assert!(rs[1].selects("shop", &BTreeMap::new()), "no selector selects the namespace");
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let bad = format!(
            "{OK}apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: x}}\nspec: {{}}\n"
        );
        let e = parse_file("p.yaml", &bad).unwrap_err();
        assert_eq!((e.file.as_str(), e.document), ("p.yaml", 2));
        assert!(e.message.contains("metadata.namespace"), "{e}");
        let e = parse_file("q.yaml", "kind: [unclosed").unwrap_err();
        assert!(e.to_string().starts_with("q.yaml: document 0:"), "{e}");
        let e = parse_file("r.yaml", "apiVersion: v1\nkind: Pod\n").unwrap_err();
        assert!(e.message.contains("apiVersion"), "{e}");
    }

    #[test]
    fn a_bad_edit_keeps_the_last_good_content_of_that_file() {
        let dir = std::env::temp_dir().join(format!("palisade-res-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), OK).unwrap();
        let mut src = FileSource::new(&dir);
        assert!(!src.poll().unwrap(), "a new file is read only once it held still");
        assert!(src.poll().unwrap());
        assert_eq!(src.resources().len(), 2);
        std::fs::write(dir.join("a.yaml"), "garbage: [").unwrap();
        // Same size and mtime granularity could hide the change; make the new content longer.
        std::fs::write(dir.join("a.yaml"), "garbage: [ this does not parse").unwrap();
        src.poll().unwrap();
        src.poll().unwrap();
        assert_eq!(src.resources().len(), 2, "last good content stays");
        assert_eq!(src.errors().len(), 1);
    }
}
