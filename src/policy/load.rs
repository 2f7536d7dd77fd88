//! Loading policies from YAML: a directory of files, several documents per file.
//!
//! Loading is all or nothing: the first broken document makes the whole load an `Err`, so the
//! caller keeps deciding with its previous set. The error names the file, the document (1-based),
//! the policy when its name could be read, and the position: line and column for YAML errors, the
//! field path for invalid values, `module.rego:line:col` for Rego.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::engine::{CompileError, Policy};
use super::resource::{self, AuthorizationPolicy};

/// Kinds of the `palisade.io` group that live in the same resources directory and are not
/// authorization policies; they are skipped here.
const OTHER_KINDS: &[&str] =
    &["PeerAuthentication", "RequestAuthentication", "RateLimitPolicy", "WorkloadSecurity", "MeshService"];

/// A line and column (1-based) in a YAML file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

/// What went wrong with a document.
#[derive(Debug, thiserror::Error)]
pub enum LoadErrorKind {
    /// The file or directory could not be read.
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    /// Not YAML, or not the shape of an `AuthorizationPolicy` (unknown field, wrong type...).
    #[error("{0}")]
    Yaml(String),
    /// Parsed but refused by the compiler.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// Two documents define the same `namespace/name`.
    #[error("defined twice (first in {0})")]
    Duplicate(String),
    /// A `palisade.io` kind this build does not know.
    #[error("unknown kind {0:?} in group palisade.io")]
    UnknownKind(String),
}

/// A refused policy file, with where and why.
#[derive(Debug, thiserror::Error)]
pub struct LoadError {
    /// The file (as given to the loader).
    pub file: PathBuf,
    /// The document within the file, from 1; `None` for file-level errors.
    pub document: Option<usize>,
    /// `namespace/name` when it could be read.
    pub policy: Option<String>,
    /// Line and column for YAML errors.
    pub position: Option<Position>,
    /// Why (boxed: the error travels in `Result`s on the reload path).
    #[source]
    pub kind: Box<LoadErrorKind>,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(p) = self.position {
            write!(f, ":{}:{}", p.line, p.column)?;
        }
        if let Some(d) = self.document {
            write!(f, ": document {d}")?;
        }
        if let Some(p) = &self.policy {
            write!(f, ": policy {p}")?;
        }
        write!(f, ": {}", self.kind)
    }
}

/// Loads every `*.yaml`/`*.yml` file under `path` (recursively, sorted, hidden entries skipped),
/// or `path` itself if it is a file.
pub fn load_path(path: &Path) -> Result<Vec<Arc<Policy>>, LoadError> {
    let io = |file: &Path, e: std::io::Error| LoadError {
        file: file.to_path_buf(),
        document: None,
        policy: None,
        position: None,
        kind: Box::new(LoadErrorKind::Io(e)),
    };
    let files = yaml_files(path).map_err(|(p, e)| io(&p, e))?;
    let mut loaded = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| io(&file, e))?;
        for (doc, policy) in parse_documents(&file, &text)? {
            let here = format!("{} document {doc}", file.display());
            if let Some(first) = seen.insert(policy.id().to_string(), here) {
                return Err(LoadError {
                    file,
                    document: Some(doc),
                    policy: Some(policy.id().to_string()),
                    position: None,
                    kind: Box::new(LoadErrorKind::Duplicate(first)),
                });
            }
            loaded.push(Arc::new(policy));
        }
    }
    Ok(loaded)
}

/// The YAML files under `path` in the order [`load_path`] reads them (`path` itself if it is a
/// file); an error names the entry that could not be read.
pub fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, (PathBuf, std::io::Error)> {
    let mut files = Vec::new();
    if std::fs::metadata(path).map_err(|e| (path.to_path_buf(), e))?.is_dir() {
        collect_yaml(path, &mut files)?;
    } else {
        files.push(path.to_path_buf());
    }
    Ok(files)
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), (PathBuf, std::io::Error)> {
    let rd = std::fs::read_dir(dir).map_err(|e| (dir.to_path_buf(), e))?;
    let mut entries: Vec<PathBuf> = Vec::new();
    for e in rd {
        let e = e.map_err(|e| (dir.to_path_buf(), e))?;
        // Hidden entries include editors' swap files and ConfigMap mounts' `..data` links.
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        entries.push(e.path());
    }
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_yaml(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
    Ok(())
}

fn position(e: &serde_yaml::Error) -> Option<Position> {
    e.location().map(|l| Position { line: l.line(), column: l.column() })
}

/// The `namespace/name` of a document, read loosely so that an error can name it.
fn loose_id(v: &serde_yaml::Value) -> Option<String> {
    let m = v.get("metadata")?;
    let name = m.get("name")?.as_str()?;
    let ns = m.get("namespace").and_then(|n| n.as_str()).unwrap_or("?");
    Some(format!("{ns}/{name}"))
}

/// Parses and compiles the `AuthorizationPolicy` documents of one file's text, returning them
/// with their 1-based document numbers. `file` only labels errors.
pub fn parse_documents(file: &Path, text: &str) -> Result<Vec<(usize, Policy)>, LoadError> {
    let fail = |document: usize, policy: Option<String>, position, kind| LoadError {
        file: file.to_path_buf(),
        document: Some(document),
        policy,
        position,
        kind: Box::new(kind),
    };
    // First pass, loosely typed: syntax errors, skipping other kinds, names for errors.
    let mut loose = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = serde_yaml::Value::deserialize(de)
            .map_err(|e| fail(i + 1, None, position(&e), LoadErrorKind::Yaml(e.to_string())))?;
        loose.push(v);
    }
    let mut out = Vec::new();
    // Second pass, strictly typed, so that errors carry the field path and position.
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let Some(v) = loose.get(i) else { break };
        if v.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
        let group_is_ours = v.get("apiVersion").and_then(|k| k.as_str()).is_some_and(|a| a.starts_with("palisade.io/"));
        if kind != resource::KIND {
            if group_is_ours && !OTHER_KINDS.contains(&kind) {
                return Err(fail(i + 1, loose_id(v), None, LoadErrorKind::UnknownKind(kind.to_string())));
            }
            continue;
        }
        let id = loose_id(v);
        let doc = AuthorizationPolicy::deserialize(de)
            .map_err(|e| fail(i + 1, id.clone(), position(&e), LoadErrorKind::Yaml(e.to_string())))?;
        let policy = Policy::compile(&doc).map_err(|e| fail(i + 1, id.clone(), None, LoadErrorKind::Compile(e)))?;
        out.push((i + 1, policy));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: a, namespace: shop}
spec:
  rules: [{}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: not-a-policy}
---
apiVersion: palisade.io/v1alpha1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mode: STRICT}
---
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: b, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin/*"]}}]
---
"#;

    #[test]
    fn several_documents_per_file() {
        let got = parse_documents(Path::new("p.yaml"), GOOD).unwrap();
        let ids: Vec<(usize, &str)> = got.iter().map(|(d, p)| (*d, p.id())).collect();
        assert_eq!(ids, [(1, "shop/a"), (4, "shop/b")]);
    }

    #[test]
    fn unknown_field_names_file_document_policy_and_position() {
        let bad = GOOD.replace("paths:", "pathz:");
        let e = parse_documents(Path::new("dir/p.yaml"), &bad).unwrap_err();
        assert_eq!(e.document, Some(4));
        assert_eq!(e.policy.as_deref(), Some("shop/b"));
        let pos = e.position.expect("a position");
        assert_eq!(pos.line, 23, "{e}");
        let msg = e.to_string();
        assert!(msg.starts_with("dir/p.yaml:23:"), "{msg}");
        assert!(msg.contains("document 4"), "{msg}");
        assert!(msg.contains("policy shop/b"), "{msg}");
        assert!(msg.contains("unknown field `pathz`"), "{msg}");
    }

    #[test]
    fn bad_yaml_syntax() {
        let e = parse_documents(Path::new("p.yaml"), "a: [1, 2\nb: c\n").unwrap_err();
        assert_eq!(e.document, Some(1));
        assert!(e.position.is_some(), "{e}");
        assert!(matches!(*e.kind, LoadErrorKind::Yaml(_)));
    }

    #[test]
    fn invalid_value_names_the_field() {
        let bad = GOOD.replace("\"/admin/*\"", "\"/a*b*\"");
        let e = parse_documents(Path::new("p.yaml"), &bad).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("policy shop/b"), "{msg}");
        assert!(msg.contains("spec.rules[0].to[0].operation.paths[0]"), "{msg}");
    }

    #[test]
    fn rego_that_does_not_compile_names_policy_and_line() {
        let text = r#"
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec:
  rego:
    entrypoint: shop/allow
    module: |
      package shop
      allow if {
        input.x ==
      }
"#;
        let e = parse_documents(Path::new("r.yaml"), text).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("policy shop/broken"), "{msg}");
        assert!(msg.contains("does not compile"), "{msg}");
        assert!(msg.contains("shop/broken.rego:"), "{msg}");
    }

    #[test]
    fn unknown_palisade_kind_is_refused() {
        let text = "apiVersion: palisade.io/v1alpha1\nkind: AuthorisationPolicy\nmetadata: {name: x, namespace: y}\n";
        let e = parse_documents(Path::new("k.yaml"), text).unwrap_err();
        assert!(matches!(*e.kind, LoadErrorKind::UnknownKind(_)), "{e}");
    }

    #[test]
    fn directory_load_is_all_or_nothing() {
        let dir = std::env::temp_dir().join(format!("palisade-policy-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        std::fs::write(dir.join(".swp.yaml"), "{{{").unwrap();
        let ok = load_path(&dir).unwrap();
        assert_eq!(ok.len(), 2);
        // The same policy twice is refused.
        std::fs::write(dir.join("sub/b.yml"), GOOD).unwrap();
        let e = load_path(&dir).unwrap_err();
        assert!(matches!(*e.kind, LoadErrorKind::Duplicate(_)), "{e}");
        std::fs::write(dir.join("sub/b.yml"), "kind: AuthorizationPolicy\nspec: [\n").unwrap();
        let e = load_path(&dir).unwrap_err();
        assert!(e.file.ends_with("sub/b.yml"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(load_path(&dir).is_err(), "a missing directory is an error, not an empty set");
    }
}
