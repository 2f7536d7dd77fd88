//! `palisade audit` over a directory of manifests: the real binary, its output and exit code.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{BIN, tempdir};

const WORKLOADS: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: orders, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  template:
    metadata: {labels: {app: orders}}
    spec:
      serviceAccountName: orders
      containers: [{name: app, image: orders:1}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: web
      containers: [{name: app, image: web:1}]
---
apiVersion: v1
kind: Service
metadata: {name: orders, namespace: shop}
spec: {ports: [{port: 80}]}
";

/// STRICT for the namespace, and a policy allowing one principal per workload.
const CLEAN: &str = "apiVersion: palisade.io/v1alpha1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
---
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: orders-from-web, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]
---
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-from-gateway, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/edge/sa/gateway]}}]
";

/// `web` in PERMISSIVE, and `orders` open to any caller.
const WEAK: &str = "apiVersion: palisade.io/v1alpha1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
---
apiVersion: palisade.io/v1alpha1
kind: PeerAuthentication
metadata: {name: web-migration, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: PERMISSIVE}
---
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: orders-open, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: ALLOW
  rules:
  - to: [{operation: {methods: [GET]}}]
---
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-from-gateway, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/edge/sa/gateway]}}]
";

fn mesh(tag: &str, policies: &str) -> std::path::PathBuf {
    let dir = tempdir(tag);
    std::fs::write(dir.join("workloads.yaml"), WORKLOADS).unwrap();
    std::fs::write(dir.join("mesh.yml"), policies).unwrap();
    dir
}

fn audit(dir: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args(["audit", "--resources"])
        .arg(dir)
        .args(["--default-policy", "deny", "--egress", "deny"])
        .args(extra)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_permissive_workload_and_an_allow_any_policy_are_reported_with_their_fix_and_fail_ci() {
    let dir = mesh("audit-weak", WEAK);
    let out = audit(&dir, &["--fail-on", "high"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("permissive-mtls") && stdout.contains("Deployment shop/web"), "{stdout}");
    assert!(stdout.contains("spec.mtls.mode to STRICT in PeerAuthentication shop/web-migration"), "{stdout}");
    assert!(stdout.contains("allow-any-caller") && stdout.contains("AuthorizationPolicy shop/orders-open"), "{stdout}");
    assert!(stdout.contains("fix: name the callers in spec.rules[0].from"), "{stdout}");

    // Below the threshold: reported, but the exit code is 0.
    let out = audit(&dir, &["--fail-on", "critical"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = audit(&dir, &[]);
    assert_eq!(out.status.code(), Some(0), "without --fail-on the report never fails");

    let out = audit(&dir, &["-o", "json", "--fail-on", "high"]);
    assert_eq!(out.status.code(), Some(3));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    let findings = doc["findings"].as_array().unwrap();
    let named = |check: &str, object: &str| {
        findings.iter().find(|f| f["check"] == check && f["object"] == object).unwrap_or_else(|| panic!("{doc:#}"))
    };
    let permissive = named("permissive-mtls", "Deployment shop/web");
    assert_eq!(permissive["severity"], "high");
    assert!(permissive["fix"].as_str().unwrap().contains("STRICT"), "{permissive}");
    let open = named("allow-any-caller", "AuthorizationPolicy shop/orders-open");
    assert_eq!(open["severity"], "high");
    assert!(open["fix"].as_str().unwrap().contains("principals"), "{open}");
    assert_eq!(findings.len(), 2, "nothing else is weak here: {doc:#}");
    assert_eq!(doc["summary"]["high"], 2);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_clean_mesh_reports_nothing_and_exits_0() {
    let dir = mesh("audit-clean", CLEAN);
    let out = audit(&dir, &["--fail-on", "low"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(text(&out.stdout), "no findings\n");
    let out = audit(&dir, &["--fail-on", "low", "-o", "json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["findings"], serde_json::json!([]));

    // The control plane's defaults (egress allow) and a permissive default are findings.
    let out = Command::new(BIN)
        .args(["audit", "--resources"])
        .arg(&dir)
        .args(["--default-policy", "allow", "--fail-on", "medium"])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("egress-allow") && stdout.contains("--egress deny"), "{stdout}");
    assert!(!stdout.contains("no-allow-policy"), "both workloads have an ALLOW policy: {stdout}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_invalid_manifest_or_a_missing_directory_is_an_error_not_a_clean_report() {
    let dir = mesh(
        "audit-invalid",
        "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: shop}\nspec:\n  rules:\n  - to: [{operation: {method: [GET]}}]\n",
    );
    let out = audit(&dir, &["--fail-on", "high"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("mesh.yml") && stderr.contains("AuthorizationPolicy shop/typo"), "{stderr}");
    assert!(out.stdout.is_empty(), "no report for a directory the control plane would refuse");

    let out = audit(&dir.join("nope"), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("nope"), "{}", text(&out.stderr));
    std::fs::remove_dir_all(dir).unwrap();
}

/// The live mesh, through the management API: the same checks over what the control plane
/// holds (its settings, its resources, its sidecars, its CA), with an administrator's
/// credentials (a workload's certificate is refused by the API: tests/admin_api.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_mesh_is_audited_through_the_management_api() {
    let dir = tempdir("audit-live");
    let resources = dir.join("resources");
    std::fs::create_dir_all(&resources).unwrap();
    let ns = |yaml: &str| yaml.replace("namespace: shop", "namespace: test").replace("ns/shop/", "ns/test/");
    common::write_atomically(&resources.join("mesh.yaml"), &ns(WEAK));
    let kek = dir.join("kek");
    std::fs::write(&kek, [7u8; 32]).unwrap();
    let (res, kek) = (resources.display().to_string(), kek.display().to_string());
    let cp = common::ControlPlane::start(
        &dir,
        &["--resources", &res, "--default-policy", "deny", "--egress", "deny", "--ca-kek-file", &kek],
    )
    .await;
    let app = common::EchoApp::start().await;
    let label = |app: &str| format!("app={app}");
    let orders = common::Sidecar::spawn(&cp, "orders", Some(app.addr), &[], &["--label", &label("orders")]);
    let web = common::Sidecar::spawn(&cp, "web", None, &[], &["--label", &label("web")]);
    orders.wait_ready().await;
    web.wait_ready().await;
    let live = |extra: &[&str]| Command::new(BIN).arg("audit").args(cp.server_cli_args()).args(extra).output().unwrap();

    let out = live(&["-o", "json", "--fail-on", "high"]);
    assert_eq!(out.status.code(), Some(3), "{}{}", text(&out.stdout), text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings = doc["findings"].as_array().unwrap();
    let has = |check: &str, object: &str| findings.iter().any(|f| f["check"] == check && f["object"] == object);
    assert!(has("permissive-mtls", &common::id("web")), "{doc:#}");
    assert!(has("allow-any-caller", "AuthorizationPolicy test/orders-open"), "{doc:#}");
    assert_eq!(findings.len(), 2, "nothing else is weak in this mesh: {doc:#}");

    // The operator fixes both; the live mesh reports nothing once the control plane holds it.
    common::write_atomically(&resources.join("mesh.yaml"), &ns(CLEAN));
    common::wait_for("the fixed mesh audited clean", std::time::Duration::from_secs(10), || async {
        live(&["--fail-on", "low"]).status.code() == Some(0)
    })
    .await;
    let out = live(&["--fail-on", "low"]);
    assert_eq!(text(&out.stdout), "no findings\n");
}
