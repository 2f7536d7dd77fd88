//! Issue 16, attacked as an outsider would, through two real sidecars: path confusion past a
//! DENY, `x-palisade-*` headers from an app, an `Upgrade` an app answers with 101 to anything,
//! and a request body trickled a byte at a time.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Everyone may call anything, except `/admin/*` and `/internal`, which a DENY covers.
const POLICIES: &str = r#"apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: open, namespace: test}
spec:
  action: ALLOW
  rules: [{}]
---
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: test}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin/*", "/admin", "/internal"]}}]
"#;

struct Mesh {
    _dir: std::path::PathBuf,
    _cp: ControlPlane,
    _server: Sidecar,
    _client: Sidecar,
    /// The caller's plaintext route to the server.
    route: std::net::SocketAddr,
}

async fn mesh(app: std::net::SocketAddr, extra: &[&str]) -> Mesh {
    mesh_with(app, extra, "").await
}

/// A mesh whose resources are [`POLICIES`] and `more` (YAML documents).
async fn mesh_with(app: std::net::SocketAddr, extra: &[&str], more: &str) -> Mesh {
    let dir = tempdir("guards");
    let resources = dir.join("resources");
    std::fs::create_dir_all(&resources).unwrap();
    std::fs::write(resources.join("policies.yaml"), POLICIES).unwrap();
    if !more.is_empty() {
        std::fs::write(resources.join("more.yaml"), more).unwrap();
    }
    let res = resources.display().to_string();
    let cp = ControlPlane::start(&dir, &["--resources", &res, "--default-policy", "deny"]).await;
    let server = Sidecar::spawn(&cp, "server", Some(app), &[], extra);
    server.wait_ready().await;
    let route = free_addr();
    let client =
        Sidecar::spawn(&cp, "client", None, &[format!("{route}={}@{}", server.inbound.unwrap(), id("server"))], extra);
    client.wait_ready().await;
    Mesh { _dir: dir, _cp: cp, _server: server, _client: client, route }
}

/// Sends raw request bytes on a fresh connection and returns the raw response (until close).
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn status_of_raw(resp: &str) -> u16 {
    resp.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The path the echo app received, from its JSON answer.
fn echoed_path(resp: &str) -> Option<String> {
    let body = &resp[resp.find("\r\n\r\n")? + 4..];
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    Some(v["path"].as_str()?.to_string())
}

/// What must become of each request target: refused before the app (400/403/404/431), or
/// received by the app as exactly this path.
enum Want {
    Refused,
    App(&'static str),
}

/// The corpus: targets meant to reach `/admin/...` or `/internal` past the DENY, and ordinary
/// ones that must arrive unchanged or in their normal form.
fn corpus() -> Vec<(&'static str, Want)> {
    use Want::*;
    vec![
        // Dot segments, raw and encoded, in every case and mixture.
        ("/public/../admin/secret.txt", Refused),
        ("/public/./../admin/secret.txt", Refused),
        ("/public/%2e%2e/admin/secret.txt", Refused),
        ("/public/%2E%2E/admin/secret.txt", Refused),
        ("/public/%2e%2E/admin/secret.txt", Refused),
        ("/public/.%2e/admin/secret.txt", Refused),
        ("/public/%2e./admin/secret.txt", Refused),
        ("/public/a/b/../../../admin/x", Refused),
        ("/./admin/x", Refused),
        ("/%2e/admin/x", Refused),
        ("/admin/./x", Refused),
        ("/../admin/x", Refused),
        ("/public/..", App("/")),
        ("/internal/.", Refused),
        ("/internal/x/..", Refused),
        ("/internal/", Refused),
        // Doubled and encoded slashes.
        ("//admin/x", Refused),
        ("///admin/x", Refused),
        ("/public//..//admin/x", Refused),
        ("/admin%2fx", Refused),
        ("/admin%2Fx", Refused),
        ("/public%2f..%2fadmin/x", Refused),
        ("/%2fadmin/x", Refused),
        // Backslashes, raw and encoded.
        ("/public\\..\\admin\\x", Refused),
        ("/admin\\x", Refused),
        ("/public%5c..%5cadmin/x", Refused),
        ("/public%5C..%5Cadmin/x", Refused),
        // Encoded letters, mixed case.
        ("/%61dmin/x", Refused),
        ("/%61%64%6d%69%6e/x", Refused),
        ("/%41dmin/x", App("/Admin/x")),
        ("/adm%69n/x", Refused),
        ("/%69nternal", Refused),
        // Overlong and invalid encodings.
        ("/%c0%ae%c0%ae/admin/x", Refused),
        ("/public/%c0%af../admin/x", Refused),
        ("/%e0%80%ae/admin", Refused),
        ("/admin%zz", Refused),
        ("/admin/%", Refused),
        ("/admin/%2", Refused),
        ("/a%00dmin/x", Refused),
        ("/admin%0a/x", Refused),
        // `;` parameters (Java servers drop them from segments).
        ("/admin;jsessionid=1/x", Refused),
        ("/admin;/x", Refused),
        ("/public;x=../admin/x", Refused),
        ("/internal;", Refused),
        ("/admin%3b/x", Refused),
        // Absolute-form targets.
        ("http://server/admin/x", Refused),
        ("http://server/public/../admin/x", Refused),
        ("http://server/public/x", App("/public/x")),
        // Fragments and queries do not change the path decided on.
        ("/admin/x#frag", Refused),
        ("/public/x?next=/admin/x", App("/public/x")),
        // Ordinary paths arrive as sent, or in their normal form.
        ("/public/x", App("/public/x")),
        ("/public/./x", App("/public/x")),
        ("//public//x", App("/public/x")),
        ("/public/%7Euser", App("/public/~user")),
        ("/public/caf%c3%a9", App("/public/caf%C3%A9")),
        ("/administrator", App("/administrator")),
        ("/internals", App("/internals")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_confusion_never_reaches_a_denied_path_and_the_app_gets_the_normal_form() {
    let app = EchoApp::start().await;
    let m = mesh(app.addr, &[]).await;
    let cases = corpus();
    assert!(cases.len() >= 40, "the issue asks for at least 40 cases");
    let mut wrong = Vec::new();
    for (target, want) in &cases {
        let req = format!("GET {target} HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n");
        let resp = raw(m.route, req.as_bytes()).await;
        let status = status_of_raw(&resp);
        let got = echoed_path(&resp).filter(|_| status == 200);
        let ok = match want {
            Want::Refused => got.is_none() && matches!(status, 400 | 403 | 404 | 431),
            Want::App(path) => got.as_deref() == Some(*path),
        };
        if !ok {
            wrong.push(format!("{target}: status {status}, app got {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{} of {} cases wrong:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
    // A refusal says which rule refused.
    let resp = raw(m.route, b"GET /admin%2fx HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n").await;
    assert!(resp.contains("encoded-slash"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn palisade_headers_from_an_app_never_travel_and_cannot_pick_the_protocol() {
    let app = EchoApp::start().await;
    let m = mesh(app.addr, &[]).await;
    // An HTTP/1 caller claiming HTTP/2 must not make the server sidecar speak HTTP/2 to an
    // HTTP/1 app (that was a 502), and no x-palisade-* header of the caller reaches the app.
    let req = "GET /public/x HTTP/1.1\r\nhost: server\r\nx-palisade-orig-proto: HTTP/2\r\n\
               x-palisade-denied-by: nobody\r\nX-Palisade-Custom: 1\r\nconnection: close\r\n\r\n";
    let resp = raw(m.route, req.as_bytes()).await;
    assert_eq!(status_of_raw(&resp), 200, "{resp}");
    let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    let leaked: Vec<&String> =
        seen["headers"].as_object().unwrap().keys().filter(|k| k.starts_with("x-palisade-")).collect();
    assert!(leaked.is_empty(), "app saw {leaked:?}");
}

/// An app that answers 101 to any `Upgrade` and then echoes raw bytes: after that, whatever the
/// caller sends on the connection reaches it undecided. Otherwise it answers 200 with the
/// request head it received.
async fn start_upgrade_anything_app() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tcp.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if text.contains("\r\nupgrade:") {
                    let _ = tcp
                        .write_all(
                            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: anything\r\n\r\n",
                        )
                        .await;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = tcp.read(&mut buf).await {
                        if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                } else {
                    let body = format!("head:{}", text.replace("\r\n", "|"));
                    let resp =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                    let _ = tcp.write_all(resp.as_bytes()).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_upgrades_pass_and_h2c_never_does() {
    let app = start_upgrade_anything_app().await;
    let m = mesh(app, &[]).await;
    for proto in ["foo", "h2c", "websocket, foo", "TLS/1.0"] {
        let req = format!(
            "GET /public/x HTTP/1.1\r\nhost: server\r\nconnection: upgrade\r\nupgrade: {proto}\r\n\r\n\
             GET /admin/x HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n"
        );
        let resp = raw(m.route, req.as_bytes()).await;
        assert!(!resp.contains(" 101 "), "Upgrade: {proto} was let through: {resp}");
        assert!(resp.starts_with("HTTP/1.1 200"), "{proto}: {resp}");
        assert!(!resp.contains("upgrade:"), "the app saw the Upgrade header ({proto}): {resp}");
        // The second request on the connection is decided: the DENY refuses it.
        assert!(resp.contains("HTTP/1.1 403"), "the request after a refused upgrade was not decided ({proto}): {resp}");
    }
    // WebSocket, allowed by default, still switches.
    let req = "GET /public/ws HTTP/1.1\r\nhost: server\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\nping";
    let mut tcp = tokio::net::TcpStream::connect(m.route).await.unwrap();
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&got).ends_with("ping") && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 101") && got.ends_with("ping"), "{got}");
}

/// An app that reads the whole request body before it answers (`read N bytes`).
async fn start_body_reading_app() -> std::net::SocketAddr {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let n = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(format!("read {n} bytes")),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_request_body_is_cut_off_with_408_instead_of_holding_connections() {
    let app = start_body_reading_app().await;
    let m = mesh(app, &["--request-body-grace", "1s", "--request-body-min-rate", "1000"]).await;
    let mut tcp = tokio::net::TcpStream::connect(m.route).await.unwrap();
    tcp.write_all(b"POST /public/upload HTTP/1.1\r\nhost: server\r\ncontent-length: 100000\r\n\r\n").await.unwrap();
    let started = Instant::now();
    // One byte every 100 ms: 10 bytes/s, far under 1000 bytes/s. Bounded: 100 bytes at most.
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..100 {
        if tcp.write_all(b"x").await.is_err() {
            break;
        }
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            resp.extend_from_slice(&buf[..n]);
            if resp.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    }
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "cut off after {took:?}");
    // A body at a normal pace still goes through whole.
    let client = http_client();
    let req = http::Request::post(format!("http://{}/public/upload", m.route))
        .body(http_body_util::Full::new(bytes::Bytes::from(vec![b'y'; 200_000])))
        .unwrap();
    let (status, _, body) = {
        use http_body_util::BodyExt;
        let resp = client.request(req).await.unwrap();
        let status = resp.status();
        (status, (), resp.into_body().collect().await.unwrap().to_bytes())
    };
    assert_eq!(status, 200);
    assert_eq!(body, "read 200000 bytes");
}

const HARDENED: &str = r#"apiVersion: palisade.io/v1alpha1
kind: WorkloadSecurity
metadata: {name: edge, namespace: test}
spec:
  maxRequestBodyBytes: 1000
  responseHeaders:
    hsts: {maxAgeSeconds: 31536000, includeSubDomains: true}
    contentSecurityPolicy: "default-src 'self'"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_security_limits_bodies_and_hardens_every_response() {
    let app = start_body_reading_app().await;
    let m = mesh_with(app, &[], HARDENED).await;
    let head = |resp: &str, name: &str| {
        resp.split("\r\n\r\n").next().unwrap().lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let small =
        raw(m.route, b"POST /public/x HTTP/1.1\r\nhost: server\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")
            .await;
    assert_eq!(status_of_raw(&small), 200, "{small}");
    assert!(small.ends_with("read 5 bytes"), "{small}");
    assert_eq!(head(&small, "strict-transport-security").as_deref(), Some("max-age=31536000; includeSubDomains"));
    assert_eq!(head(&small, "x-content-type-options").as_deref(), Some("nosniff"));
    assert_eq!(head(&small, "content-security-policy").as_deref(), Some("default-src 'self'"));
    assert_eq!(head(&small, "server"), None, "the app's Server header is removed: {small}");
    assert_eq!(head(&small, "x-powered-by"), None);
    // Over the limit by Content-Length: refused before the app, hardened too.
    let big =
        raw(m.route, b"POST /public/x HTTP/1.1\r\nhost: server\r\ncontent-length: 5000\r\nconnection: close\r\n\r\n")
            .await;
    assert_eq!(status_of_raw(&big), 413, "{big}");
    assert_eq!(head(&big, "x-content-type-options").as_deref(), Some("nosniff"));
    // Over the limit in a chunked body: cut off when it passes the limit.
    let chunk = "x".repeat(600);
    let chunked = format!(
        "POST /public/x HTTP/1.1\r\nhost: server\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
         258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let resp = raw(m.route, chunked.as_bytes()).await;
    assert_eq!(status_of_raw(&resp), 413, "{resp}");
    // Denials carry the hardening as well.
    let denied = raw(m.route, b"GET /admin/x HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n").await;
    assert_eq!(status_of_raw(&denied), 403);
    assert_eq!(head(&denied, "x-content-type-options").as_deref(), Some("nosniff"));
}
