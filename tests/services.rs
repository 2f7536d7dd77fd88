//! Mesh services: one name, several endpoints under different identities, balanced per request
//! by latency and load (real control plane, real sidecars, real mTLS, HTTP/2 over one client
//! connection as gRPC uses it).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const SERVICE: &str = "\
apiVersion: palisade.io/v1alpha1
kind: MeshService
metadata: {name: echo, namespace: test}
spec:
  identities:
    - spiffe://cluster.local/ns/test/sa/echo-a
    - spiffe://cluster.local/ns/test/sa/echo-b
  selector: {matchLabels: {app: echo}}
---
apiVersion: palisade.io/v1alpha1
kind: MeshService
metadata: {name: echo-stable, namespace: test}
spec: {identities: [spiffe://cluster.local/ns/test/sa/echo-a]}
---
apiVersion: palisade.io/v1alpha1
kind: MeshService
metadata: {name: echo-canary, namespace: test}
spec: {identities: [spiffe://cluster.local/ns/test/sa/echo-b]}
";

/// `HTTPRoute` for `test/echo`: `/hang` to the stable endpoints with a 200 ms timeout, `/api`
/// split between stable and canary by weight, nothing else.
fn split(stable: u32, canary: u32) -> String {
    format!(
        "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo-split, namespace: test}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: echo}}]
  rules:
    - matches: [{{path: {{type: Exact, value: /hang}}}}]
      backendRefs: [{{name: echo-stable, port: 80}}]
      timeouts: {{request: 200ms}}
    - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
      backendRefs:
        - {{name: echo-stable, port: 80, weight: {stable}}}
        - {{name: echo-canary, port: 80, weight: {canary}}}
"
    )
}

/// `total` requests over the one HTTP/2 connection of `client`, `concurrency` at a time; the
/// answers counted by app name. Every request must succeed.
async fn spread(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    total: usize,
    concurrency: usize,
) -> BTreeMap<String, usize> {
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, url) = (client.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..total / concurrency {
                let resp = client.get(url.parse().unwrap()).await.expect("request through the service route");
                assert_eq!(resp.status(), 200);
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                seen.push(String::from_utf8(body.to_vec()).unwrap());
            }
            seen
        }));
    }
    let mut counts = BTreeMap::new();
    for t in tasks {
        for name in t.await.unwrap() {
            *counts.entry(name).or_insert(0) += 1;
        }
    }
    counts
}

fn share(counts: &BTreeMap<String, usize>, name: &str) -> f64 {
    let total: usize = counts.values().sum();
    *counts.get(name).unwrap_or(&0) as f64 / total as f64
}

/// A control plane with the `test/echo` service, three endpoints behind it (two running as
/// echo-a, one as echo-b: each must be verified as itself), a workload that claims the service's
/// label under another identity, and a caller whose service routes are `listen` (to echo) and
/// `nowhere` (to a service that does not exist).
struct Mesh {
    cp: ControlPlane,
    resources: std::path::PathBuf,
    apps: [NamedApp; 3],
    backends: [Sidecar; 3],
    _thief: (NamedApp, Sidecar),
    caller: Sidecar,
    listen: SocketAddr,
    nowhere: SocketAddr,
}

impl Mesh {
    async fn start(tag: &str, decay: &str) -> Mesh {
        let dir = tempdir(tag);
        let resources = dir.join("resources");
        std::fs::create_dir_all(&resources).unwrap();
        std::fs::write(resources.join("echo.yaml"), SERVICE).unwrap();
        let cp = ControlPlane::start(&dir, &["--resources", &resources.display().to_string()]).await;

        let apps = [NamedApp::start("a1").await, NamedApp::start("a2").await, NamedApp::start("b").await];
        let label = ["--label", "app=echo"];
        let backends = [
            Sidecar::spawn(&cp, "echo-a", Some(apps[0].addr), &[], &label),
            Sidecar::spawn(&cp, "echo-a", Some(apps[1].addr), &[], &label),
            Sidecar::spawn(&cp, "echo-b", Some(apps[2].addr), &[], &label),
        ];
        // Not allowed to serve `echo`, whatever label it claims.
        let thief_app = NamedApp::start("thief").await;
        let thief = Sidecar::spawn(&cp, "thief", Some(thief_app.addr), &[], &label);
        let (listen, nowhere) = (free_addr(), free_addr());
        let (route, no_such) = (format!("{listen}=test/echo"), format!("{nowhere}=test/no-such-service"));
        let caller = Sidecar::spawn(
            &cp,
            "caller",
            None,
            &[],
            &["--service-route", &route, "--service-route", &no_such, "--balancer-decay", decay],
        );
        for s in backends.iter().chain([&thief, &caller]) {
            s.wait_ready().await;
        }
        let expected: BTreeMap<String, String> =
            backends.iter().map(|b| (b.inbound.unwrap().to_string(), b.identity.clone())).collect();
        wait_for("the service's three endpoints at the caller", Duration::from_secs(10), || async {
            let dump = caller.config_dump().await;
            let got: BTreeMap<String, String> = dump["mesh"]["services"]["test/echo"]["endpoints"]
                .as_array()
                .map(|eps| {
                    eps.iter()
                        .map(|e| {
                            (e["address"].as_str().unwrap().to_string(), e["identity"].as_str().unwrap().to_string())
                        })
                        .collect()
                })
                .unwrap_or_default();
            got == expected
        })
        .await;
        Mesh { cp, resources, apps, backends, _thief: (thief_app, thief), caller, listen, nowhere }
    }
}

/// An HTTP/2 client: every request over one connection, as gRPC uses it.
fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_every_endpoint_and_avoid_a_slow_one_until_it_recovers() {
    let mesh = Mesh::start("services", "1s").await;
    let (caller, apps, listen, nowhere) = (&mesh.caller, &mesh.apps, mesh.listen, mesh.nowhere);

    // One HTTP/2 connection (gRPC's shape): requests still reach every endpoint.
    let client = h2_client();
    let url = format!("http://{listen}/echo.Echo/Say");
    let counts = spread(&client, &url, 300, 4).await;
    println!("all healthy: {counts:?}");
    assert!(!counts.contains_key("thief"), "an identity the service does not name never serves it: {counts:?}");
    for name in ["a1", "a2", "b"] {
        assert!(share(&counts, name) >= 0.10, "{name} got {:.1} % of {counts:?}", share(&counts, name) * 100.0);
    }
    let metrics = caller.metrics().await;
    for sa in ["echo-a", "echo-b"] {
        assert!(metric(&metrics, "palisade_requests_total", &format!("sa/{sa}\"")) > 0.0, "{sa}: {metrics}");
    }

    // HTTP/1.1 callers are balanced per request too, over keep-alive connections per endpoint.
    let (mut h1, keep_alive) = (BTreeMap::new(), http_client());
    for _ in 0..60 {
        let (status, _, body) = get(&keep_alive, &url, &[]).await.expect("HTTP/1.1 through the service route");
        assert_eq!(status, 200);
        *h1.entry(body).or_insert(0) += 1;
    }
    assert!(h1.len() >= 2 && !h1.contains_key("thief"), "HTTP/1.1: {h1:?}");

    // `palisade status` lists the service with its endpoints, each under its own identity and
    // with its sidecar connected; the thief is not among them.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(["status", "-o", "json"])
        .args(mesh.cp.server_cli_args())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let echo = status["services"].as_array().unwrap().iter().find(|s| s["name"] == "echo").expect("test/echo listed");
    let listed: BTreeMap<String, (String, String)> = echo["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap().to_string();
            (field("address"), (field("spiffe_id"), field("state")))
        })
        .collect();
    let expected: BTreeMap<String, (String, String)> = mesh
        .backends
        .iter()
        .map(|b| (b.inbound.unwrap().to_string(), (b.identity.clone(), "connected".to_string())))
        .collect();
    assert_eq!(listed, expected, "{echo}");
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
        .arg("status")
        .args(mesh.cp.server_cli_args())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("SERVICES") && text.contains("test/echo (3 endpoints)"), "{text}");

    // A service with no endpoints is refused with the reason, not hung.
    let (status, _, body) = get(&http_client(), &format!("http://{nowhere}/"), &[]).await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("test/no-such-service has no endpoints"), "{body}");

    // One endpoint turns slow: within a few requests its share falls under 10 %, and stays
    // there while it is slow (it is tried again now and then, and found slow again).
    apps[2].delay_ms.store(200, Ordering::SeqCst);
    for round in 0..3 {
        let counts = spread(&client, &url, 200, 4).await;
        println!("b slow, round {round}: {counts:?}");
        assert!(share(&counts, "b") < 0.10, "the slow endpoint kept {:.1} %: {counts:?}", share(&counts, "b") * 100.0);
    }

    // It recovers: its estimate decays (1 s here), it is tried again, and takes its share back.
    apps[2].delay_ms.store(0, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let counts = spread(&client, &url, 100, 4).await;
        if share(&counts, "b") >= 0.15 {
            println!("b recovered: {counts:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "b never took its share back: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_killed_under_load_costs_no_request_and_is_ejected() {
    // A short decay, so the dead endpoint's penalty wears off and it is tried (and fails) often
    // enough to be ejected within the test.
    let mut mesh = Mesh::start("services-kill", "200ms").await;
    let url = format!("http://{}/echo.Echo/Say", mesh.listen);
    let client = h2_client();
    let warm = spread(&client, &url, 60, 4).await;
    assert_eq!(warm.len(), 3, "{warm:?}");

    // Constant load from four callers while one endpoint's sidecar is killed with SIGKILL (its
    // registration stays in the table for the control plane's grace period: the caller must
    // cope with an endpoint that is listed but gone).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(parking_lot::Mutex::new(Vec::new())));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, url, stop, ok, failed) = (client.clone(), url.clone(), stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match client.get(url.parse().unwrap()).await {
                    Ok(resp) if resp.status() == 200 => {
                        let _ = resp.into_body().collect().await;
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(resp) => failed.lock().push(format!("status {}", resp.status())),
                    Err(e) => failed.lock().push(e.to_string()),
                }
            }
        }));
    }
    wait_for("load running", Duration::from_secs(5), || async { ok.load(Ordering::SeqCst) > 100 }).await;
    mesh.backends[2].proc.kill9();
    let caller = &mesh.caller;
    wait_for("the dead endpoint ejected", Duration::from_secs(20), || async {
        metric(&caller.metrics().await, "palisade_balancer_events_total", "event=\"ejected\"") >= 1.0
    })
    .await;
    let at_ejection = ok.load(Ordering::SeqCst);
    wait_for("more load after the ejection", Duration::from_secs(10), || async {
        ok.load(Ordering::SeqCst) > at_ejection + 200
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let metrics = caller.metrics().await;
    let retried = metric(&metrics, "palisade_balancer_events_total", "event=\"retried\"");
    println!("ok {} failed {:?} retried {retried}", ok.load(Ordering::SeqCst), failed.lock());
    assert!(failed.lock().is_empty(), "requests failed: {:?}", failed.lock());
    assert!(retried >= 1.0, "the dead endpoint's requests were retried elsewhere: {metrics}");

    // `palisade status` shows the dead endpoint as gone (its entry stays for the grace period).
    let dead = mesh.backends[2].inbound.unwrap().to_string();
    wait_for("the dead endpoint shown as gone", Duration::from_secs(10), || async {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
            .args(["status", "-o", "json"])
            .args(mesh.cp.server_cli_args())
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        status["services"].as_array().into_iter().flatten().filter(|s| s["name"] == "echo").any(|s| {
            s["endpoints"].as_array().into_iter().flatten().any(|e| e["address"] == *dead && e["state"] == "gone")
        })
    })
    .await;
    drop(mesh.cp);
}

/// The weights of the `/api` rule of `test/echo` as the caller's view has them.
async fn api_weights(caller: &Sidecar) -> Option<Vec<u64>> {
    let dump = caller.config_dump().await;
    let rule = dump["mesh"]["routes"]["test/echo"].as_array()?.get(1)?.clone();
    rule["backends"].as_array()?.iter().map(|b| b[1].as_u64()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_grpc_routes_split_by_weight_change_live_and_time_out() {
    let mesh = Mesh::start("services-route", "10s").await;
    let caller = &mesh.caller;
    std::fs::write(mesh.resources.join("route.yaml"), split(90, 10)).unwrap();
    wait_for("the 90/10 route at the caller", Duration::from_secs(10), || async {
        api_weights(caller).await == Some(vec![90, 10])
    })
    .await;

    // 2,000 requests: 10 % ± 2 % reach the canary (echo-b's app, "b").
    let client = h2_client();
    let url = format!("http://{}/api/orders", mesh.listen);
    let counts = spread(&client, &url, 2000, 8).await;
    let canary = share(&counts, "b");
    println!("90/10: {counts:?}");
    assert!((0.08..=0.12).contains(&canary), "canary got {:.1} %: {counts:?}", canary * 100.0);

    // New weights apply live, on the same connection.
    std::fs::write(mesh.resources.join("route.yaml"), split(50, 50)).unwrap();
    wait_for("the 50/50 route at the caller", Duration::from_secs(10), || async {
        api_weights(caller).await == Some(vec![50, 50])
    })
    .await;
    let counts = spread(&client, &url, 1000, 8).await;
    let canary = share(&counts, "b");
    println!("50/50: {counts:?}");
    assert!((0.42..=0.58).contains(&canary), "canary got {:.1} %: {counts:?}", canary * 100.0);

    // A GRPCRoute on the same service sends one gRPC method to the canary (its rule comes
    // first: routes go by name, `echo-grpc` before `echo-split`).
    let grpc = [
        "apiVersion: gateway.networking.k8s.io/v1",
        "kind: GRPCRoute",
        "metadata: {name: echo-grpc, namespace: test}",
        "spec:",
        "  parentRefs: [{kind: Service, name: echo}]",
        "  rules:",
        "    - matches: [{method: {service: echo.Echo, method: Say}}]",
        "      backendRefs: [{name: echo-canary}]",
    ]
    .join("\n");
    std::fs::write(mesh.resources.join("grpc.yaml"), grpc).unwrap();
    wait_for("the GRPCRoute at the caller", Duration::from_secs(10), || async {
        caller.config_dump().await["mesh"]["routes"]["test/echo"].as_array().is_some_and(|r| r.len() == 3)
    })
    .await;
    for _ in 0..50 {
        let call = http::Request::post(format!("http://{}/echo.Echo/Say", mesh.listen))
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(call).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"b", "echo.Echo/Say goes to the canary only");
    }

    // A backend that hangs: the route's 200 ms timeout answers 504.
    let started = std::time::Instant::now();
    let (status, _, body) = get(&http_client(), &format!("http://{}/hang", mesh.listen), &[]).await.unwrap();
    let took = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("timeout"), "{body}");
    assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(3), "took {took:?}");

    // A path no rule takes reaches no service.
    let (status, _, body) = get(&http_client(), &format!("http://{}/admin", mesh.listen), &[]).await.unwrap();
    assert_eq!(status, 404, "{body}");
    let metrics = caller.metrics().await;
    assert_eq!(metric(&metrics, "palisade_balancer_events_total", "event=\"timed_out\""), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, "palisade_balancer_events_total", "event=\"no_route_matched\""), 1.0);

    // Per rule and backend: what each took, by class of answer, and how long it took.
    let backend = |rule: &str, backend: &str, class: &str| {
        let labels = format!(
            "service=\"test/echo\",route=\"test/echo-split#{rule}\",backend=\"test/echo-{backend}\",class=\"{class}\""
        );
        metric(&metrics, "palisade_backend_requests_total", &labels)
    };
    let (stable, canary) = (backend("1", "stable", "2xx"), backend("1", "canary", "2xx"));
    assert_eq!(stable + canary, 3000.0, "every /api request counted once under its rule: {metrics}");
    assert!((400.0..=760.0).contains(&canary), "the canary's count follows the splits: {canary}");
    assert_eq!(backend("0", "stable", "5xx"), 1.0, "the timed-out request, as a 5xx of its rule: {metrics}");
    let hang_latency =
        "palisade_backend_request_duration_seconds_sum{service=\"test/echo\",route=\"test/echo-split#0\"";
    assert!(metric(&metrics, hang_latency, "") >= 0.2, "the timeout's latency is observed: {metrics}");
}

/// `n` requests with `method` over the one HTTP/2 connection of `client`, 4 at a time; the
/// answers counted by status.
async fn statuses(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: http::Method,
    url: &str,
    n: usize,
) -> BTreeMap<u16, usize> {
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, method, url) = (client.clone(), method.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..n / 4 {
                let req =
                    http::Request::builder().method(method.clone()).uri(&url).body(Full::new(Bytes::new())).unwrap();
                let resp = client.request(req).await.expect("a request through the service route");
                seen.push(resp.status().as_u16());
                let _ = resp.into_body().collect().await;
            }
            seen
        }));
    }
    let mut counts = BTreeMap::new();
    for t in tasks {
        for status in t.await.unwrap() {
            *counts.entry(status).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_retry_policy_mends_its_codes_for_idempotent_methods_only() {
    let mesh = Mesh::start("services-retry", "10s").await;
    let caller = &mesh.caller;
    // a1 answers every /flaky... request with 500; a2 and b answer 200.
    mesh.apps[0].flaky.store(true, Ordering::SeqCst);
    let route = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-retry, namespace: test}
spec:
  parentRefs: [{group: \"\", kind: Service, name: echo}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /flaky}}]
      retry: {codes: [500], attempts: 2, backoff: 5ms}
    - matches: [{path: {type: PathPrefix, value: /flaky-unconfigured}}]
";
    std::fs::write(mesh.resources.join("retry.yaml"), route).unwrap();
    wait_for("the retry route at the caller", Duration::from_secs(10), || async {
        caller.config_dump().await["mesh"]["routes"]["test/echo"][0]["retry"]["attempts"] == 2
    })
    .await;
    let client = h2_client();
    let url = |path: &str| format!("http://{}{path}", mesh.listen);

    // GET and DELETE (idempotent, no body): a1's 500s are retried on another endpoint.
    let get = statuses(&client, http::Method::GET, &url("/flaky/orders"), 200).await;
    let delete = statuses(&client, http::Method::DELETE, &url("/flaky/orders/7"), 100).await;
    println!("configured retry: GET {get:?}, DELETE {delete:?}");
    assert_eq!(get, BTreeMap::from([(200, 200)]), "every GET mended");
    assert_eq!(delete, BTreeMap::from([(200, 100)]), "every DELETE mended");
    let retried = metric(&caller.metrics().await, "palisade_balancer_events_total", "event=\"retried\"");
    assert!(retried >= 10.0, "a1 took its share and each was retried: {retried}");

    // POST is not idempotent: never sent twice, whatever the policy says.
    let post = statuses(&client, http::Method::POST, &url("/flaky/orders"), 200).await;
    println!("POST: {post:?}");
    assert!(post.get(&500).is_some_and(|n| *n >= 5), "a1's POSTs are not retried: {post:?}");
    // A rule without a retry policy retries only what says the endpoint could not serve (502,
    // 503, 504): a 500 is the app's answer and reaches the caller.
    let plain = statuses(&client, http::Method::GET, &url("/flaky-unconfigured"), 200).await;
    println!("unconfigured: {plain:?}");
    assert!(plain.get(&500).is_some_and(|n| *n >= 5), "a 500 is not retried by default: {plain:?}");

    // A policy past the bounds is refused whole (and the caller keeps the route it had).
    std::fs::write(mesh.resources.join("retry.yaml"), route.replace("attempts: 2", "attempts: 50")).unwrap();
    wait_for("the refused retry policy reported", Duration::from_secs(10), || async {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_palisade"))
            .arg("status")
            .args(mesh.cp.server_cli_args())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("attempts: 50, at most 5")
    })
    .await;
    let get = statuses(&client, http::Method::GET, &url("/flaky/orders"), 100).await;
    assert_eq!(get, BTreeMap::from([(200, 100)]), "the route in force still retries");
}
