//! Issue 5 end to end: every inbound request decided by policy delivered over discovery.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

const POLICIES: &str = r#"apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: orders-read, namespace: test}
spec:
  selector: {matchLabels: {app: orders}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["spiffe://cluster.local/ns/test/sa/web"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/orders/*"]}}]
---
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: blocked-tenant, namespace: test}
spec:
  action: DENY
  rules:
  - when: [{key: "request.headers[x-tenant]", values: ["blocked"]}]
---
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: reports-rego, namespace: test}
spec:
  selector: {matchLabels: {app: orders}}
  action: ALLOW
  rego:
    entrypoint: envoy/authz/allow
    module: |
      package envoy.authz
      default allow := false
      allow if {
        input.attributes.request.http.method == "GET"
        input.parsed_path[0] == "reports"
        input.attributes.source.principal == "spiffe://cluster.local/ns/test/sa/batch"
      }
---
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: watch-writes, namespace: test}
spec:
  action: AUDIT
  rules:
  - to: [{operation: {notMethods: ["GET"]}}]
"#;

struct Shop {
    _dir: std::path::PathBuf,
    cp: ControlPlane,
    resources: std::path::PathBuf,
    app: EchoApp,
    orders: Sidecar,
    web: String,
    batch: String,
    /// The callers' sidecars: dropped (killed) with the fixture.
    _callers: (Sidecar, Sidecar),
}

async fn shop(default_policy: &str) -> Shop {
    let dir = tempdir("authz");
    let resources = dir.join("resources");
    std::fs::create_dir_all(&resources).unwrap();
    write_atomically(&resources.join("policies.yaml"), POLICIES);
    let res = resources.display().to_string();
    let cp = ControlPlane::start(&dir, &["--resources", &res, "--default-policy", default_policy]).await;
    let app = EchoApp::start().await;
    let orders = Sidecar::spawn(&cp, "orders", Some(app.addr), &[], &["--label", "app=orders"]);
    orders.wait_ready().await;
    let (web_route, batch_route) = (free_addr(), free_addr());
    let target = orders.inbound.unwrap();
    let web = Sidecar::start(&cp, "web", None, &[format!("{web_route}={target}@{}", id("orders"))]).await;
    let batch = Sidecar::start(&cp, "batch", None, &[format!("{batch_route}={target}@{}", id("orders"))]).await;
    Shop {
        _dir: dir,
        cp,
        resources,
        app,
        orders,
        web: format!("http://{web_route}"),
        batch: format!("http://{batch_route}"),
        _callers: (web, batch),
    }
}

async fn call(base: &str, path: &str, method: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let client = http_client();
    let mut req = http::Request::builder().method(method).uri(format!("{base}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client.request(req.body(http_body_util::Full::new(bytes::Bytes::new())).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let by = resp.headers().get("x-palisade-denied-by").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    use http_body_util::BodyExt;
    let body = String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
    (status, by, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_engine_allows_and_denies_as_written_in_the_evaluation_order() {
    let s = shop("deny").await;
    // Declarative ALLOW.
    assert_eq!(call(&s.web, "/orders/7", "GET", &[]).await.0, 200);
    // Same caller, method not allowed: no ALLOW matched.
    let (status, by, body) = call(&s.web, "/orders/7", "POST", &[]).await;
    assert_eq!((status, by.as_str()), (403, "no-allow-matched"), "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["request_id"].as_str().unwrap().len(), 32);
    // DENY beats ALLOW.
    let (status, by, _) = call(&s.web, "/orders/7", "GET", &[("x-tenant", "blocked")]).await;
    assert_eq!((status, by.as_str()), (403, "test/blocked-tenant"));
    // Rego (OPA-Envoy input) allows batch on /reports, and only batch.
    assert_eq!(call(&s.batch, "/reports/q3", "GET", &[]).await.0, 200);
    assert_eq!(call(&s.web, "/reports/q3", "GET", &[]).await.0, 403);
    assert_eq!(call(&s.batch, "/orders/7", "GET", &[]).await.0, 403);
    // Nothing denied reached the app: 2 allowed requests only.
    assert_eq!(s.app.hits.load(Ordering::SeqCst), 2);

    let metrics = s.orders.metrics().await;
    assert!(metric(&metrics, "palisade_authz_decisions_total", "policy=\"test/blocked-tenant\"") >= 1.0, "{metrics}");
    assert!(metric(&metrics, "palisade_authz_decisions_total", "engine=\"rego\"") >= 1.0, "{metrics}");
    assert!(metrics.contains("palisade_authz_evaluation_duration_seconds"));

    // The decision log recorded the denial and the audit (POST), without secret headers.
    let _ = call(&s.web, "/orders/7", "POST", &[("authorization", "Bearer s3cret"), ("x-trace", "t-42")]).await;
    wait_for("decision log line", Duration::from_secs(5), || async { s.orders.proc.stdout_text().contains("t-42") })
        .await;
    let out = s.orders.proc.stdout_text();
    let line: serde_json::Value =
        serde_json::from_str(out.lines().find(|l| l.contains("t-42") && l.contains("\"decision\"")).unwrap()).unwrap();
    assert_eq!(line["decision"]["allowed"], false);
    assert!(line["decision"]["audits"].to_string().contains("test/watch-writes"), "{line}");
    assert_eq!(line["input"]["attributes"]["source"]["principal"], id("web"));
    assert!(!out.contains("s3cret"), "a secret header reached the log");
    // And one access-log line per request, with the refusal named.
    assert!(out.lines().any(|l| l.contains("\"type\":\"access\"") && l.contains("test/blocked-tenant")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_default_applies_to_a_workload_without_policies() {
    // A namespace with no policies at all.
    let dir = tempdir("authz-default");
    for (default, mtls_caller_status) in [("deny", 403), ("allow-authenticated", 200)] {
        std::fs::create_dir_all(dir.join(default)).unwrap();
        let cp = ControlPlane::start(&dir.join(default), &["--default-policy", default]).await;
        let app = EchoApp::start().await;
        let server = Sidecar::start(&cp, "lonely", Some(app.addr), &[]).await;
        let route = free_addr();
        let _client =
            Sidecar::start(&cp, "caller", None, &[format!("{route}={}@{}", server.inbound.unwrap(), id("lonely"))])
                .await;
        let (status, by, _) = call(&format!("http://{route}"), "/", "GET", &[]).await;
        assert_eq!(status, mtls_caller_status, "default {default}");
        if status == 403 {
            assert_eq!(by, "mesh-default");
        }
    }
}

/// A policy that does not compile, for the same workload as the valid ones.
const BROKEN: &str = r#"apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: broken-rego, namespace: test}
spec:
  selector: {matchLabels: {app: orders}}
  action: ALLOW
  rego:
    entrypoint: envoy/authz/allow
    module: |
      package envoy.authz
      allow if {{{ broken
"#;

/// Issue 15's test of the spine: a bad policy is refused at the control plane, reported with
/// where it is, and holds back nothing: the sidecar keeps deciding by the valid policies, and a
/// revocation and a trust-bundle change made afterwards each reach it within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_does_not_compile_is_reported_and_holds_back_nothing() {
    let s = shop("deny").await;
    let version_before = s.orders.config_dump().await["mesh"]["version"].as_str().unwrap().to_string();
    write_atomically(&s.resources.join("zz-broken.yaml"), &format!("# added by an operator\n---\n{BROKEN}"));
    wait_for("the broken policy reported at the control plane", Duration::from_secs(5), || async {
        s.cp.api_json("resource_errors").await.to_string().contains("broken-rego")
    })
    .await;
    let errors = s.cp.api_json("resource_errors").await.to_string();
    // File, line of the document, document index, the object, and Rego's own position.
    assert!(errors.contains("zz-broken.yaml:3: document 0: AuthorizationPolicy test/broken-rego"), "{errors}");
    let status = std::process::Command::new(BIN).arg("status").args(s.cp.server_cli_args()).output().unwrap();
    assert!(String::from_utf8_lossy(&status.stdout).contains("broken-rego"), "palisade status shows it");

    // Nothing was pushed for it: no NACK, the same version, the valid policies still decide.
    let dump = s.orders.config_dump().await;
    assert_eq!(dump["mesh"]["version"], version_before.as_str());
    assert_eq!(dump["discovery"]["last_nack"], "");
    assert_eq!(call(&s.web, "/orders/7", "GET", &[]).await.0, 200);
    assert_eq!(call(&s.batch, "/reports/q3", "GET", &[]).await.0, 200);
    assert_eq!(call(&s.web, "/orders/7", "GET", &[("x-tenant", "blocked")]).await.0, 403);

    // A revocation made afterwards reaches the sidecar within a second: web is cut off.
    let revoked_at = Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["control", "revoke", "--state-dir"])
        .arg(&s.cp.state)
        .args(["--identity", &id("web")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("web refused after its revocation", Duration::from_secs(3), || async {
        call(&s.web, "/orders/7", "GET", &[]).await.0 != 200
    })
    .await;
    let elapsed = revoked_at.elapsed();
    assert!(elapsed < Duration::from_secs(1), "revocation took {elapsed:?} to reach the sidecar");
    assert_eq!(call(&s.batch, "/reports/q3", "GET", &[]).await.0, 200, "batch is not revoked");

    // A trust-bundle change made afterwards reaches it within a second too: a CA rotation puts
    // a new root in the bundle, and a client certificate of the new CA is then accepted.
    let roots_before = std::fs::read_to_string(s.cp.root_pem_path()).unwrap();
    let rotated_at = Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["control", "ca", "rotate", "--state-dir"])
        .arg(&s.cp.state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let store = palisade::control::Store::open(&s.cp.state).unwrap();
    let next = store.ca_generations().unwrap().into_iter().find(|g| g.state == "next").unwrap().material;
    let next_ca = palisade::identity::CertificateAuthority::load(next).unwrap();
    let probe = certified_by(&next_ca, &id("probe"), std::time::SystemTime::now() + Duration::from_secs(600));
    let inbound = s.orders.inbound.unwrap();
    wait_for("a certificate of the new CA accepted", Duration::from_secs(3), || {
        let (probe, roots) = (probe.clone(), roots_before.clone());
        // Any HTTP answer (allowed or denied by policy) means the sidecar accepted the handshake.
        async move { mtls_status(inbound, &roots, probe).await.is_some() }
    })
    .await;
    let elapsed = rotated_at.elapsed();
    assert!(elapsed < Duration::from_secs(1), "the new root took {elapsed:?} to reach the sidecar");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_swapped_every_200ms_under_load_loses_nothing_and_is_never_half_applied() {
    let s = shop("deny").await;
    // Two versions, each all-or-nothing: in A, /a is allowed and /b denied by gate-a; in B the
    // reverse. /both is allowed by either. A half-applied set would show up as /both refused
    // or as a refusal by the wrong gate (a gate from one version with the allow of the other
    // refuses by "no-allow-matched" or lets both through).
    let version = |allow: &str, gate: &str, deny: &str| {
        format!(
            "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-{allow}, namespace: test}}\n\
             spec:\n  selector: {{matchLabels: {{app: orders}}}}\n  action: ALLOW\n  rules:\n  - to: [{{operation: {{paths: [\"/{allow}\", \"/both\"]}}}}]\n\
             ---\napiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {gate}, namespace: test}}\n\
             spec:\n  action: DENY\n  rules:\n  - to: [{{operation: {{paths: [\"/{deny}\"]}}}}]\n"
        )
    };
    let (va, vb) = (version("a", "gate-a", "b"), version("b", "gate-b", "a"));
    let path = s.resources.join("policies.yaml");
    write_atomically(&path, &va);
    wait_for("version A in force", Duration::from_secs(5), || async { call(&s.web, "/a", "GET", &[]).await.0 == 200 })
        .await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bad = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let (seen_a, seen_b, total) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = vec![];
    for _ in 0..2 {
        let (stop, bad, seen_a, seen_b, total, web) =
            (stop.clone(), bad.clone(), seen_a.clone(), seen_b.clone(), total.clone(), s.web.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let both = call(&web, "/both", "GET", &[]).await;
                let a = call(&web, "/a", "GET", &[]).await;
                let b = call(&web, "/b", "GET", &[]).await;
                total.fetch_add(3, Ordering::SeqCst);
                if both.0 != 200 {
                    bad.lock().push(format!("/both refused: {both:?}"));
                }
                for (name, r) in [("a", &a), ("b", &b)] {
                    let ok = r.0 == 200
                        || (r.0 == 403 && r.1 == format!("test/gate-{}", if name == "a" { "b" } else { "a" }));
                    if !ok {
                        bad.lock().push(format!("/{name}: {r:?}"));
                    }
                }
                if a.0 == 200 {
                    seen_a.fetch_add(1, Ordering::SeqCst);
                }
                if b.0 == 200 {
                    seen_b.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    let started = Instant::now();
    let mut flip = false;
    while started.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(200)).await; // the swap cadence under test
        flip = !flip;
        write_atomically(&path, if flip { &vb } else { &va });
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let bad = bad.lock().clone();
    assert!(bad.is_empty(), "{} bad answers, first: {:?}", bad.len(), &bad[..bad.len().min(5)]);
    assert!(total.load(Ordering::SeqCst) > 300, "load too light: {}", total.load(Ordering::SeqCst));
    assert!(
        seen_a.load(Ordering::SeqCst) > 0 && seen_b.load(Ordering::SeqCst) > 0,
        "both versions took effect under load"
    );
}
