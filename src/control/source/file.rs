//! Resource source `file`: a directory of YAML manifests in exactly the CRD format, watched.
//!
//! Every document is judged on its own by [`super::validate`], as the Kubernetes source judges
//! every object. A document that is refused is reported (file, line, document, object, why) and
//! the last good version of that object stays in force, so one typo or one Rego module that does
//! not compile never disturbs the rest of the directory, or the rest of the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{ConfigSource, KINDS, NOT_ENFORCED, Resource, ResourceError, SourceState, validate};
use crate::guard::jwt::RequestAuthenticationSpec;
use crate::guard::rate::RateLimitPolicySpec;
use crate::guard::security::WorkloadSecuritySpec;
use crate::k8s::crd::PeerAuthenticationSpec;
use crate::policy::resource::{API_VERSION, AuthorizationPolicySpec};

/// The object key of a resource: `(kind, namespace, name)`.
type Key = (String, String, String);

/// What one file yields: the objects it defines (valid or last good), and its errors.
#[derive(Debug, Default)]
struct FileState {
    objects: BTreeMap<Key, Resource>,
    errors: Vec<ResourceError>,
}

/// A manifest's outer shape, with the spec typed so that errors carry a line and column.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest<S> {
    metadata: Metadata,
    spec: S,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Judges every document of one file's text. `previous` is what the file yielded before: an
/// object whose new document is refused keeps its previous version; after a syntax error that
/// stops the reading of the file, or a refused document whose object cannot be told, every
/// object of the previous content not read again is kept.
fn judge_file(file: &str, text: &str, previous: &FileState) -> FileState {
    let starts = document_lines(text);
    let mut next = FileState::default();
    // Whether previous objects not read again stay (the file could not be read whole, or a
    // refused document's object is unknown).
    let mut keep_unread = false;
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let start = starts.get(i).copied().unwrap_or(1);
        let error = |line: usize, column: Option<usize>, object: Option<String>, message: String| ResourceError {
            origin: file.to_string(),
            document: Some(i),
            line: Some(line),
            column,
            object,
            message,
        };
        let value = match Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                let (line, column) = e.location().map_or((start, None), |l| (l.line(), Some(l.column())));
                next.errors.push(error(line, column, None, e.to_string()));
                keep_unread = true;
                break; // the parser cannot find the next document reliably after a syntax error
            }
        };
        if value.is_null() {
            continue; // an empty document (e.g. a trailing `---`)
        }
        match judge_document(file, i, text, &value) {
            Ok(r) => {
                let key = key_of(&r);
                next.objects.insert(key, r);
            }
            Err((key, position, message)) => {
                let (line, column) = position.map_or((start, None), |(l, c)| (l, Some(c)));
                let object = key.as_ref().map(|(k, ns, n)| format!("{k} {ns}/{n}"));
                next.errors.push(error(line, column, object, message));
                match key {
                    Some(key) => {
                        if let Some(last_good) = previous.objects.get(&key) {
                            next.objects.insert(key, last_good.clone());
                        }
                    }
                    // Which object this document meant is unknown: keep every previous one.
                    None => keep_unread = true,
                }
            }
        }
    }
    if keep_unread {
        for (key, r) in &previous.objects {
            next.objects.entry(key.clone()).or_insert_with(|| r.clone());
        }
    }
    next
}

/// Judges every document of one file's text as the control plane does, except that a document
/// of another API group (a Deployment, a Service, ...) is handed to `other` instead of being
/// refused: how `palisade audit` reads a directory where the mesh's manifests lie beside the
/// workloads they protect. A document of the mesh's group or kinds is judged by the same code as
/// [`FileSource`]'s, so what the audit accepts is what the control plane would push.
pub fn judge_mixed(file: &str, text: &str, mut other: impl FnMut(&Value)) -> (Vec<Resource>, Vec<ResourceError>) {
    let starts = document_lines(text);
    let (mut resources, mut errors) = (Vec::new(), Vec::new());
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let start = starts.get(i).copied().unwrap_or(1);
        let error = |line: usize, column: Option<usize>, object: Option<String>, message: String| ResourceError {
            origin: file.to_string(),
            document: Some(i),
            line: Some(line),
            column,
            object,
            message,
        };
        let value = match Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                let (line, column) = e.location().map_or((start, None), |l| (l.line(), Some(l.column())));
                errors.push(error(line, column, None, e.to_string()));
                break; // as judge_file: the next document cannot be found reliably
            }
        };
        if value.is_null() {
            continue;
        }
        let api = value.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
        if !api.starts_with("palisade.io/") && !KINDS.contains(&kind) {
            other(&value);
            continue;
        }
        match judge_document(file, i, text, &value) {
            Ok(r) => resources.push(r),
            Err((key, position, message)) => {
                let (line, column) = position.map_or((start, None), |(l, c)| (l, Some(c)));
                let object = key.as_ref().map(|(k, ns, n)| format!("{k} {ns}/{n}"));
                errors.push(error(line, column, object, message));
            }
        }
    }
    (resources, errors)
}

/// Why a document was refused: its object key when it could be read, a line and column when
/// the error has one, and the message.
type Refusal = (Option<Key>, Option<(usize, usize)>, String);

fn judge_document(file: &str, index: usize, text: &str, value: &Value) -> Result<Resource, Refusal> {
    let field = |path: &str| -> Result<&str, String> {
        let mut v = value;
        for p in path.split('.') {
            v = v.get(p).ok_or_else(|| format!("missing field `{path}`"))?;
        }
        v.as_str().ok_or_else(|| format!("field `{path}` must be a string"))
    };
    let refused = |message: String| (None, None, message);
    let api = field("apiVersion").map_err(refused)?;
    // Gateway API routes keep their own group, as on Kubernetes; every other kind is ours.
    let kind_field = value.get("kind").and_then(Value::as_str);
    let route = matches!(kind_field, Some(crate::proxy::http_route::KIND | crate::proxy::http_route::GRPC_KIND));
    let versions: &[&str] = if route { crate::proxy::http_route::API_VERSIONS } else { &[API_VERSION] };
    if !versions.contains(&api) {
        return Err(refused(format!("apiVersion {api:?} is not {}", versions.join(" or "))));
    }
    let kind = field("kind").map_err(refused)?;
    if !KINDS.contains(&kind) {
        return Err(refused(format!("kind {kind:?} is not one of {KINDS:?}")));
    }
    let name = field("metadata.name").map_err(refused)?;
    let namespace = field("metadata.namespace").map_err(refused)?;
    let key: Key = (kind.to_string(), namespace.to_string(), name.to_string());
    // The typed pass reads the document's own text again, so a shape error has a position.
    let typed = match kind {
        "AuthorizationPolicy" => typed_spec::<AuthorizationPolicySpec>(text, index),
        "PeerAuthentication" => typed_spec::<PeerAuthenticationSpec>(text, index),
        "RequestAuthentication" => typed_spec::<RequestAuthenticationSpec>(text, index),
        "RateLimitPolicy" => typed_spec::<RateLimitPolicySpec>(text, index),
        "MeshService" => typed_spec::<crate::proxy::service::MeshServiceSpec>(text, index),
        "HTTPRoute" => typed_spec::<crate::proxy::http_route::HttpRouteSpec>(text, index),
        "GRPCRoute" => typed_spec::<crate::proxy::http_route::GrpcRouteSpec>(text, index),
        _ => typed_spec::<WorkloadSecuritySpec>(text, index),
    };
    let (labels, spec) = typed.map_err(|(position, message)| (Some(key.clone()), position, message))?;
    let resource = validate(kind, namespace, name, labels, spec, format!("{file}#{index}"))
        .map_err(|e| (Some(key.clone()), None, e.message))?;
    if NOT_ENFORCED.contains(&kind) {
        tracing::warn!(
            file,
            kind,
            namespace,
            name,
            "accepted and pushed, but this version of Palisade does not enforce this kind yet"
        );
    }
    Ok(resource)
}

/// Document `index` of `text`, decoded as a manifest with spec `S`; the spec returned as JSON.
#[allow(clippy::type_complexity)]
fn typed_spec<S: DeserializeOwned + serde::Serialize>(
    text: &str,
    index: usize,
) -> Result<(BTreeMap<String, String>, Value), (Option<(usize, usize)>, String)> {
    let de = serde_yaml::Deserializer::from_str(text).nth(index).ok_or((None, "document vanished".to_string()))?;
    let m =
        Manifest::<S>::deserialize(de).map_err(|e| (e.location().map(|l| (l.line(), l.column())), e.to_string()))?;
    let spec = serde_json::to_value(&m.spec).map_err(|e| (None, e.to_string()))?;
    Ok((m.metadata.labels, spec))
}

fn key_of(r: &Resource) -> Key {
    (r.kind().to_string(), r.namespace.clone(), r.name.clone())
}

/// The line (from 1) on which each document of a multi-document YAML text starts, in the order
/// the YAML parser yields them: a `---` line ends one document and starts the next, and a
/// leading `---` before any content does not make an empty first document.
fn document_lines(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if line.starts_with("---") {
            // A bare `---` line: the document's first line is the next one.
            starts.push(if line.trim_end() == "---" { i + 2 } else { i + 1 });
        } else if starts.is_empty() && !trimmed.is_empty() && !trimmed.starts_with('#') {
            starts.push(1);
        }
    }
    starts
}

/// Watches a directory by polling modification times: no platform watcher to miss events on
/// editors that replace files, and changes land well within a second.
pub struct FileSource {
    dir: PathBuf,
    seen: BTreeMap<PathBuf, (SystemTime, u64)>,
    /// Stamps from the previous scan: a file is read only once its stamp held still for one
    /// interval, so a file caught half-written (`echo > file` truncates first) is not loaded.
    pending: BTreeMap<PathBuf, (SystemTime, u64)>,
    files: BTreeMap<PathBuf, FileState>,
}

impl FileSource {
    /// A source over `dir`, which must be a directory.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        if !dir.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{}: not a directory", dir.display()),
            ));
        }
        Ok(FileSource {
            dir: dir.to_path_buf(),
            seen: BTreeMap::new(),
            pending: BTreeMap::new(),
            files: BTreeMap::new(),
        })
    }

    /// How often the directory is scanned.
    pub const INTERVAL: Duration = Duration::from_millis(100);

    /// Rescans; returns true if the resources or errors may have changed.
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
        self.files.retain(|p, _| current.contains_key(p));
        for (path, stamp) in &current {
            if self.seen.get(path) == Some(stamp) {
                continue;
            }
            let name = path.display().to_string();
            let previous = self.files.remove(path).unwrap_or_default();
            let next = match std::fs::read_to_string(path) {
                Ok(text) => judge_file(&name, &text, &previous),
                Err(e) => FileState {
                    objects: previous.objects,
                    errors: vec![ResourceError {
                        origin: name.clone(),
                        document: None,
                        line: None,
                        column: None,
                        object: None,
                        message: e.to_string(),
                    }],
                },
            };
            for e in &next.errors {
                tracing::error!(error = %e, "resource refused; its last good version stays in force");
            }
            self.files.insert(path.clone(), next);
        }
        self.seen = current;
        Ok(true)
    }

    /// What the directory holds now: every resource in force and every refusal. An object
    /// defined in two files is taken from the first (by path) and the second is refused.
    pub fn state(&self) -> SourceState {
        let mut resources: BTreeMap<Key, Resource> = BTreeMap::new();
        let mut errors = Vec::new();
        for state in self.files.values() {
            for (key, r) in &state.objects {
                match resources.get(key) {
                    Some(first) => errors.push(ResourceError {
                        origin: r.origin.clone(),
                        document: None,
                        line: None,
                        column: None,
                        object: Some(format!("{} {}/{}", key.0, key.1, key.2)),
                        message: format!("defined twice (first in {})", first.origin),
                    }),
                    None => {
                        resources.insert(key.clone(), r.clone());
                    }
                }
            }
            errors.extend(state.errors.iter().cloned());
        }
        SourceState { resources: resources.into_values().collect(), errors, endpoints: None }
    }
}

impl ConfigSource for FileSource {
    async fn initial(&mut self) -> anyhow::Result<SourceState> {
        // Read now, without waiting for files to settle: the control plane never serves a
        // snapshot before it has read its resources.
        self.poll()?; // records the stamps as pending
        self.poll()?; // same stamps: reads every file
        Ok(self.state())
    }

    async fn changed(&mut self) -> SourceState {
        let mut tick = tokio::time::interval(Self::INTERVAL);
        loop {
            tick.tick().await;
            match self.poll() {
                Ok(true) => return self.state(),
                Ok(false) => {}
                Err(e) => tracing::error!(dir = %self.dir.display(), error = %e, "cannot read resources directory"),
            }
        }
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

    fn judge(text: &str) -> FileState {
        judge_file("p.yaml", text, &FileState::default())
    }

    #[test]
    fn parses_several_documents_and_selects_by_namespace_and_labels() {
        let state = judge(OK);
        assert!(state.errors.is_empty(), "{:?}", state.errors);
        let rs: Vec<&Resource> = state.objects.values().collect();
        assert_eq!(rs.len(), 2);
        let labels: BTreeMap<_, _> = [("app".to_string(), "orders".to_string())].into();
        let authz = rs.iter().find(|r| r.kind() == "AuthorizationPolicy").unwrap();
        let peer = rs.iter().find(|r| r.kind() == "PeerAuthentication").unwrap();
        assert!(authz.selects("shop", &labels));
        assert!(!authz.selects("shop", &BTreeMap::new()));
        assert!(!authz.selects("other", &labels));
        assert!(peer.selects("shop", &BTreeMap::new()), "no selector selects the namespace");
    }

    #[test]
    fn errors_name_file_line_document_object_and_field() {
        let bad = format!(
            "{OK}apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: x}}\nspec: {{}}\n"
        );
        let state = judge(&bad);
        let e = &state.errors[0];
        assert_eq!((e.origin.as_str(), e.document, e.line), ("p.yaml", Some(2), Some(13)));
        assert!(e.message.contains("metadata.namespace"), "{e}");
        assert_eq!(state.objects.len(), 2, "the good documents of the file are in force");

        let state = judge("kind: [unclosed");
        let e = state.errors[0].to_string();
        assert!(e.starts_with("p.yaml:2:1: document 0: did not find expected"), "a syntax error has its position: {e}");
        let state = judge("apiVersion: v1\nkind: Pod\n");
        assert!(state.errors[0].message.contains("apiVersion"), "{}", state.errors[0]);

        let typo = "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: t, namespace: shop}\n\
                    spec:\n  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        method: [GET]\n";
        let e = &judge(typo).errors[0];
        assert_eq!(e.line, Some(9), "a shape error points at the field: {e}");
        assert_eq!(e.object.as_deref(), Some("AuthorizationPolicy shop/t"));
    }

    #[test]
    fn a_policy_that_does_not_compile_is_refused_and_its_last_good_version_kept() {
        let rego = |body: &str| {
            format!(
                "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: r, namespace: shop}}\n\
                 spec:\n  rego:\n    entrypoint: authz/allow\n    module: |\n      package authz\n      {body}\n"
            )
        };
        let good = judge(&rego("allow := true"));
        assert!(good.errors.is_empty(), "{:?}", good.errors);
        let bad = judge_file("p.yaml", &format!("{OK}{}", rego("allow := ")), &good);
        assert_eq!(bad.errors.len(), 1);
        let e = &bad.errors[0];
        assert_eq!((e.document, e.line), (Some(2), Some(13)), "{e}");
        assert_eq!(bad.objects.len(), 3, "the two new documents, and the last good Rego policy");
        let kept = bad.objects.values().find(|r| r.name == "r").unwrap();
        assert_eq!(kept, good.objects.values().next().unwrap());
    }

    #[test]
    fn a_syntax_error_keeps_every_object_of_the_files_last_good_content() {
        let good = judge(OK);
        let broken = judge_file("p.yaml", "garbage: [ this does not parse", &good);
        assert_eq!(broken.objects.len(), 2);
        assert_eq!(broken.errors.len(), 1);
        // A document refused before its object could be told (no namespace): same.
        let unnamed = "apiVersion: palisade.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: x}\nspec: {}\n";
        let refused = judge_file("p.yaml", unnamed, &good);
        assert_eq!((refused.objects.len(), refused.errors.len()), (2, 1));
        // A valid file that no longer defines an object does drop it.
        let first_only = &OK[..OK.find("---").unwrap()];
        assert_eq!(judge_file("p.yaml", first_only, &good).objects.len(), 1);
    }

    #[test]
    fn document_lines_follow_the_parsers_numbering() {
        assert_eq!(document_lines("a: 1\n---\nb: 2\n---\n"), [1, 3, 5]);
        assert_eq!(document_lines("# c\n---\na: 1\n--- # two\nb: 1\n"), [3, 4]);
    }

    #[test]
    fn a_bad_edit_keeps_the_last_good_content_and_a_second_definition_is_refused() {
        let dir = std::env::temp_dir().join(format!("palisade-res-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), OK).unwrap();
        let mut src = FileSource::new(&dir).unwrap();
        assert!(!src.poll().unwrap(), "a new file is read only once it held still");
        assert!(src.poll().unwrap());
        assert_eq!(src.state().resources.len(), 2);
        std::fs::write(dir.join("a.yaml"), "garbage: [ this does not parse").unwrap();
        src.poll().unwrap();
        src.poll().unwrap();
        let state = src.state();
        assert_eq!(state.resources.len(), 2, "last good content stays");
        assert_eq!(state.errors.len(), 1);
        std::fs::write(dir.join("a.yaml"), OK).unwrap();
        std::fs::write(dir.join("b.yaml"), OK).unwrap();
        src.poll().unwrap();
        src.poll().unwrap();
        let state = src.state();
        assert_eq!(state.resources.len(), 2);
        assert_eq!(state.errors.len(), 2, "{:?}", state.errors);
        assert!(state.errors[0].message.contains("defined twice"), "{}", state.errors[0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
