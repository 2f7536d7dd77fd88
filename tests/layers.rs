//! The shape of the code, checked: modules import only layers below their own, and no function
//! runs past ~100 lines without saying why.
//!
//! The layer order (DESIGN.md, refined in docs/architecture.md), from the bottom:
//!
//! | layer | modules |
//! |---|---|
//! | 0 leaf | `proto`, `ports`, `clock`, `hex`, `backoff`, `redact`, `allocator`, `listener`, `identity::spiffe`, the crate root's items |
//! | 1 | `tls` |
//! | 2 | `identity` |
//! | 3 | `policy`, `telemetry`, `init` |
//! | 4 | `agent`, `guard` |
//! | 5 | `proxy` |
//! | 6 | `k8s` |
//! | 7 | `control` |
//! | 8 | `demo` |
//!
//! A module may name any module of a lower layer, and itself; never a higher layer nor another
//! module of its own layer. Test modules (`#[cfg(test)] mod tests` to the end of a file) are not
//! held to it. The binaries (`src/main.rs`, `src/bin/`) sit above everything.
//!
//! A function past 100 lines carries a comment just above it that starts its reason with
//! "Long because".

use std::path::{Path, PathBuf};

/// Layers by module path prefix; the longest matching prefix decides.
const LAYERS: &[(&str, u8)] = &[
    ("proto", 0),
    ("ports", 0),
    ("clock", 0),
    ("hex", 0),
    ("backoff", 0),
    ("redact", 0),
    ("allocator", 0),
    ("listener", 0),
    ("identity::spiffe", 0),
    ("tls", 1),
    ("identity", 2),
    ("policy", 3),
    ("guard", 4),
    ("telemetry", 3),
    ("init", 3),
    ("agent", 4),
    ("proxy", 5),
    ("k8s", 6),
    ("control", 7),
    ("demo", 8),
    ("audit", 8),
    ("fuzzing", 8),
];

/// Items of the crate root (`src/lib.rs`) anything may use.
const ROOT_ITEMS: &[&str] = &["shutdown_signal"];

fn layer_of(path: &str) -> Option<(u8, &'static str)> {
    LAYERS
        .iter()
        .filter(|(prefix, _)| path == *prefix || path.starts_with(&format!("{prefix}::")))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(prefix, layer)| (*layer, prefix.split("::").next().unwrap_or(prefix)))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/control/source/file.rs` → `control::source::file`; `mod.rs` names its folder.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The lines of a file before its test module.
fn code_lines(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .windows(2)
        .position(|w| w[0].trim() == "#[cfg(test)]" && w[1].trim_start().starts_with("mod tests"))
        .unwrap_or(lines.len());
    lines[..end].to_vec()
}

/// Every `crate::a::b` path a text names, grouped imports (`crate::{a, b::c}`) expanded.
fn crate_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                out.push(path_head(item.trim()));
            }
        } else {
            out.push(path_head(after));
        }
        rest = after;
    }
    out.retain(|p| !p.is_empty());
    out
}

/// `identity::spiffe::SpiffeId;` → `identity::spiffe::SpiffeId`.
fn path_head(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
        .collect::<String>()
        .trim_end_matches(':')
        .to_string()
}

#[test]
fn modules_import_only_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut unknown = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == "main" || module == "lib" || module.starts_with("bin::") {
            continue;
        }
        let Some((own_layer, own_top)) = layer_of(&module) else {
            unknown.push(module);
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in code_lines(&text).iter().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for path in crate_paths(line) {
                if ROOT_ITEMS.contains(&path.as_str()) {
                    continue;
                }
                let Some((layer, top)) = layer_of(&path) else {
                    unknown.push(format!("{}:{}: crate::{path}", file.display(), n + 1));
                    continue;
                };
                let allowed = layer < own_layer || (top == own_top && layer <= own_layer);
                if !allowed {
                    violations.push(format!(
                        "{}:{}: {module} (layer {own_layer}) names crate::{path} (layer {layer})",
                        file.strip_prefix(&src).unwrap().display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(unknown.is_empty(), "modules with no layer in LAYERS (add them there and to the docs): {unknown:#?}");
    assert!(violations.is_empty(), "imports that run up or across the layers:\n{}", violations.join("\n"));
}

#[test]
fn the_checker_sees_grouped_imports_and_inline_paths() {
    assert_eq!(crate_paths("use crate::{tls::config, identity::SpiffeId};"), ["tls::config", "identity::SpiffeId"]);
    assert_eq!(crate_paths("let x = crate::proxy::http::status_class(s);"), ["proxy::http::status_class"]);
    assert_eq!(layer_of("identity::spiffe::SpiffeId"), Some((0, "identity")));
    assert_eq!(layer_of("identity::manager"), Some((2, "identity")));
    assert_eq!(layer_of("identity"), Some((2, "identity")));
    assert_eq!(layer_of("proxyish"), None);
}

/// A function longer than this says why in a comment just above it.
const MAX_FUNCTION_LINES: usize = 100;

#[test]
fn functions_longer_than_100_lines_say_why() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut long = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let lines = code_lines(&text);
        for (start, line) in lines.iter().enumerate() {
            let indent = line.len() - line.trim_start().len();
            let body = line.trim_start();
            let is_fn = ["fn ", "pub fn ", "async fn ", "pub async fn ", "pub(crate) fn ", "pub(crate) async fn "]
                .iter()
                .any(|p| body.starts_with(p));
            if !is_fn || body.ends_with(';') {
                continue;
            }
            let close = format!("{}}}", " ".repeat(indent));
            let Some(len) = lines[start..].iter().position(|l| *l == close) else { continue };
            if len <= MAX_FUNCTION_LINES {
                continue;
            }
            // The comments and attributes right above the function.
            let above: Vec<&str> = lines[..start]
                .iter()
                .rev()
                .take_while(|l| l.trim_start().starts_with("//") || l.trim_start().starts_with("#["))
                .copied()
                .collect();
            let says_why = above.iter().any(|l| l.contains("Long because"));
            if !says_why {
                long.push(format!("{}:{}: {} lines", file.strip_prefix(&src).unwrap().display(), start + 1, len));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions past {MAX_FUNCTION_LINES} lines without a comment saying why:\n{}",
        long.join("\n")
    );
}
