//! The SBOM (`deploy/sbom`, CycloneDX) names every crate the shipped binaries are built from,
//! exactly as Cargo.lock pins it: the same set of (name, version) as the dependency graph of the
//! package for Linux on x86_64 without dev-dependencies, each with its purl, its licence and the
//! SHA-256 checksum of Cargo.lock.

mod tools;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

const TARGET: &str = "x86_64-unknown-linux-gnu";

/// (name, version) of every package the root depends on, transitively, through normal and
/// build dependencies for `TARGET`.
fn shipped_crates() -> BTreeSet<(String, String)> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--locked", "--filter-platform", TARGET, "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages: BTreeMap<&str, (String, String)> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (p["id"].as_str().unwrap(), (p["name"].as_str().unwrap().into(), p["version"].as_str().unwrap().into()))
        })
        .collect();
    let nodes: BTreeMap<&str, &Value> =
        meta["resolve"]["nodes"].as_array().unwrap().iter().map(|n| (n["id"].as_str().unwrap(), n)).collect();
    let root = meta["resolve"]["root"].as_str().unwrap();
    let (mut seen, mut todo) = (BTreeSet::new(), vec![root]);
    while let Some(id) = todo.pop() {
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let shipped = dep["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].as_str() != Some("dev"));
            let pkg = dep["pkg"].as_str().unwrap();
            if shipped && seen.insert(pkg) {
                todo.push(pkg);
            }
        }
    }
    seen.into_iter().map(|id| packages[id].clone()).collect()
}

/// Cargo.lock's checksum of every registry package, by (name, version).
fn lock_checksums() -> BTreeMap<(String, String), String> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
    let mut out = BTreeMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |key: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
                .map(|v| v.trim_end_matches('"').to_string())
        };
        if let (Some(name), Some(version), Some(sum)) = (field("name"), field("version"), field("checksum")) {
            out.insert((name, version), sum);
        }
    }
    out
}

#[test]
fn the_sbom_lists_every_shipped_crate_with_its_pinned_checksum() {
    let dir = std::env::temp_dir().join(format!("palisade-sbom-{}", std::process::id()));
    let path = dir.join("palisade.cdx.json");
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/sbom"))
        .arg(&path)
        .env("PALISADE_CYCLONEDX", tools::cyclonedx())
        .output()
        .unwrap();
    assert!(out.status.success(), "deploy/sbom: {}", String::from_utf8_lossy(&out.stderr));
    let sbom: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    assert_eq!(sbom["bomFormat"], "CycloneDX");
    assert_eq!(sbom["specVersion"], "1.5");
    assert_eq!(sbom["metadata"]["component"]["name"], "palisade");
    let components = sbom["components"].as_array().unwrap();
    let listed: BTreeSet<(String, String)> = components
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_string(), c["version"].as_str().unwrap().to_string()))
        .collect();
    let expected = shipped_crates();
    let missing: Vec<_> = expected.difference(&listed).collect();
    let extra: Vec<_> = listed.difference(&expected).collect();
    assert!(missing.is_empty(), "crates built into Palisade but not in the SBOM: {missing:?}");
    assert!(extra.is_empty(), "SBOM entries Palisade is not built from: {extra:?}");
    assert!(expected.len() > 300, "suspiciously few crates: {}", expected.len());

    let checksums = lock_checksums();
    for c in components {
        let (name, version) = (c["name"].as_str().unwrap(), c["version"].as_str().unwrap());
        assert_eq!(c["purl"], format!("pkg:cargo/{name}@{version}"), "{name}");
        assert!(c["licenses"].as_array().is_some_and(|l| !l.is_empty()), "{name} {version} has no licence in the SBOM");
        let sha = c["hashes"].as_array().and_then(|h| h.iter().find(|h| h["alg"] == "SHA-256"));
        let pinned = checksums.get(&(name.to_string(), version.to_string()));
        assert_eq!(
            sha.and_then(|h| h["content"].as_str()),
            pinned.map(String::as_str),
            "{name} {version}: the SBOM's SHA-256 is not Cargo.lock's checksum"
        );
    }
}
