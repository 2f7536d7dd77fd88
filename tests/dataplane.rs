//! Issue 4: gRPC, opaque TCP, draining and the proxy's own protection, through real sidecars.

mod common;

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use futures_util::Stream;
use palisade::proto::discovery::discovery_server::{Discovery, DiscoveryServer};
use palisade::proto::discovery::{DiscoveryRequest, DiscoveryResponse};
use palisade::proto::identity::identity_server::{Identity, IdentityServer};
use palisade::proto::identity::{CertifyRequest, CertifyResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status, Streaming};

/// A gRPC app: unary echoes what it saw (metadata, caller identity); `csr_der = b"fail"` fails
/// with a status carrying custom trailing metadata; the bidi stream echoes every message.
struct GrpcApp;

#[tonic::async_trait]
impl Identity for GrpcApp {
    async fn certify(&self, req: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let md = req.metadata().clone();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        if req.get_ref().csr_der == b"fail" {
            let mut trailers = tonic::metadata::MetadataMap::new();
            trailers.insert("x-reason", "quota".parse().unwrap());
            return Err(Status::with_metadata(tonic::Code::ResourceExhausted, "out of quota", trailers));
        }
        let mut resp = Response::new(CertifyResponse {
            spiffe_id: get("x-forwarded-client-cert"),
            serial: get("x-user"),
            ..Default::default()
        });
        resp.metadata_mut().insert("x-served-by", "grpc-app".parse().unwrap());
        Ok(resp)
    }
}

#[tonic::async_trait]
impl Discovery for GrpcApp {
    type StreamStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
    async fn stream(&self, req: Request<Streaming<DiscoveryRequest>>) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let echo = DiscoveryResponse { version_info: format!("echo:{}", m.version_info), ..Default::default() };
                if tx.send(Ok(echo)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

async fn start_grpc_app() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(GrpcApp))
            .add_service(DiscoveryServer::new(GrpcApp))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_bidi_streams_cross_the_mesh_with_metadata_and_trailers() {
    use palisade::proto::discovery::discovery_client::DiscoveryClient;
    use palisade::proto::identity::identity_client::IdentityClient;
    let dir = tempdir("grpc");
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = start_grpc_app().await;
    let b = Sidecar::start(&cp, "grpc-b", Some(app), &[]).await;
    let route = free_addr();
    let _a = Sidecar::start(&cp, "grpc-a", None, &[format!("{route}={}@{}", b.inbound.unwrap(), id("grpc-b"))]).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{route}")).unwrap().connect().await.unwrap();

    // Unary, with request metadata in and response metadata out.
    let mut unary = IdentityClient::new(channel.clone());
    let mut req = Request::new(CertifyRequest { csr_der: b"hello".to_vec(), credential: None });
    req.metadata_mut().insert("x-user", "alice".parse().unwrap());
    let resp = unary.certify(req).await.unwrap();
    assert_eq!(resp.metadata().get("x-served-by").unwrap(), "grpc-app");
    let body = resp.into_inner();
    assert_eq!(body.serial, "alice", "request metadata reached the app");
    assert_eq!(body.spiffe_id, format!("By={};URI={}", id("grpc-b"), id("grpc-a")), "verified caller identity");

    // An error status with trailing metadata arrives intact.
    let err = unary.certify(CertifyRequest { csr_der: b"fail".to_vec(), credential: None }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert_eq!(err.message(), "out of quota");
    assert_eq!(err.metadata().get("x-reason").unwrap(), "quota");

    // Bidirectional stream: every message echoed in order, clean end of stream (grpc-status 0
    // travels in the trailers).
    let mut bidi = DiscoveryClient::new(channel);
    let outbound =
        tokio_stream::iter((0..50).map(|i| DiscoveryRequest { version_info: i.to_string(), ..Default::default() }));
    let mut responses = bidi.stream(outbound).await.unwrap().into_inner();
    let mut got = vec![];
    while let Some(r) = responses.message().await.unwrap() {
        got.push(r.version_info);
    }
    assert_eq!(got, (0..50).map(|i| format!("echo:{i}")).collect::<Vec<_>>());
}

/// HTTP/1.1 callers cross the mesh on pooled HTTP/1.1 keep-alive mTLS connections: the app sees
/// the caller's `Host` and no mesh-internal header, and sequential requests share one connection
/// between the sidecars (no handshake per request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_callers_share_one_keep_alive_connection_between_sidecars_and_keep_their_host() {
    let dir = tempdir("h1pool");
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = EchoApp::start().await;
    let b = Sidecar::start(&cp, "h1-b", Some(app.addr), &[]).await;
    let route = free_addr();
    let _a = Sidecar::start(&cp, "h1-a", None, &[format!("{route}={}@{}", b.inbound.unwrap(), id("h1-b"))]).await;
    let client = http_client();
    for i in 0..20 {
        let url = format!("http://{route}/items/{i}");
        let (status, _, body) = get(&client, &url, &[("host", "orders.shop:8080")]).await.unwrap();
        assert_eq!(status, 200, "{body}");
        let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(seen["path"], format!("/items/{i}"));
        assert_eq!(seen["headers"]["host"], serde_json::json!(["orders.shop:8080"]), "{body}");
        assert!(seen["headers"].get("x-palisade-orig-proto").is_none(), "{body}");
    }
    assert_eq!(app.hits.load(Ordering::SeqCst), 20);
    let metrics = b.metrics().await;
    // One pooled connection; hyper may open a second when a request starts just before the
    // previous one's connection is back in the pool (seen on a loaded machine), never one per request.
    let open = metric(&metrics, "palisade_connections_open", "direction=\"inbound\"");
    assert!((1.0..=2.0).contains(&open), "{open} inbound connections for 20 sequential requests\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_speaks_first_service_sends_its_banner_after_the_bounded_detection_wait() {
    let dir = tempdir("banner");
    let cp = ControlPlane::start(&dir, &[]).await;
    // An SMTP-like app: greets first, then echoes lines.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                s.write_all(b"220 smtp.test ESMTP ready\r\n").await.unwrap();
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let b = Sidecar::start(&cp, "smtp", Some(app), &[]).await;
    let route = free_addr();
    let _a = Sidecar::start(&cp, "mailer", None, &[format!("{route}={}@{}", b.inbound.unwrap(), id("smtp"))]).await;

    for _ in 0..3 {
        let started = Instant::now();
        let mut conn = tokio::net::TcpStream::connect(route).await.unwrap();
        let mut banner = vec![0u8; 27];
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut banner)).await.unwrap().unwrap();
        let elapsed = started.elapsed();
        assert_eq!(&banner, b"220 smtp.test ESMTP ready\r\n");
        // Detection waits its 100 ms for client bytes, then gives up and lets the server speak.
        assert!(elapsed >= Duration::from_millis(100), "no detection wait at all? {elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "banner took {elapsed:?}");
        // And the stream works both ways afterwards.
        conn.write_all(b"EHLO x\r\n").await.unwrap();
        let mut echo = [0u8; 8];
        conn.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"EHLO x\r\n");
    }
    // A port declared opaque skips detection entirely: the banner comes without the wait.
    let fast_route = free_addr();
    let _fast = Sidecar::spawn(
        &cp,
        "mailer-fast",
        None,
        &[format!("{fast_route}={}@{}", b.inbound.unwrap(), id("smtp"))],
        // A detection wait of 5 s: were the port not opaque, the banner would take that long.
        &["--opaque-ports", &fast_route.port().to_string(), "--detect-timeout", "5s"],
    );
    _fast.wait_ready().await;
    let started = Instant::now();
    let mut conn = tokio::net::TcpStream::connect(fast_route).await.unwrap();
    let mut banner = vec![0u8; 27];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut banner)).await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "opaque port still waited: {:?}", started.elapsed());
    drop(conn);
    // Bytes of the closed streams are counted on B: 4 banners (27) and 3 echoes (8) sent back.
    wait_for("TCP bytes counted", Duration::from_secs(5), || async {
        metric(&b.metrics().await, "palisade_tcp_bytes_total", "direction=\"inbound\",bytes=\"sent\"") == 132.0
    })
    .await;
    assert!(b.metrics().await.contains("palisade_connections_open{direction=\"inbound\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish_refuses_new_ones_and_exits_in_time() {
    let dir = tempdir("drain");
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = EchoApp::start().await;
    // Sidecar B drains with a 5 s grace; its app answers /slow after 1 s.
    let mut b = Sidecar::spawn(&cp, "drained", Some(app.addr), &[], &["--drain-timeout", "5s"]);
    b.wait_ready().await;
    let route = free_addr();
    let _a = Sidecar::start(&cp, "caller", None, &[format!("{route}={}@{}", b.inbound.unwrap(), id("drained"))]).await;
    assert_eq!(get(&http_client(), &format!("http://{route}/warm"), &[]).await.unwrap().0, 200);

    let hits = app.hits.load(Ordering::SeqCst);
    let in_flight = tokio::spawn(async move { get(&http_client(), &format!("http://{route}/slow"), &[]).await });
    wait_for("the slow request reached the app", Duration::from_secs(5), || {
        let h = app.hits.load(Ordering::SeqCst);
        async move { h > hits }
    })
    .await;
    let term_at = Instant::now();
    std::process::Command::new("kill").args(["-TERM", &b.proc.child.id().to_string()]).status().unwrap();
    // New connections are refused from now on.
    let inbound = b.inbound.unwrap();
    wait_for("listener closed", Duration::from_secs(2), || async move {
        tokio::net::TcpStream::connect(inbound).await.is_err()
    })
    .await;
    let (status, _, _) = in_flight.await.unwrap().unwrap();
    assert_eq!(status, 200, "the request in flight completed");
    let exit = b.proc.terminate(Duration::from_secs(6));
    assert!(exit.success(), "{exit:?}");
    assert!(term_at.elapsed() < Duration::from_secs(5), "exited within the grace period: {:?}", term_at.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_by_the_header_timeout_while_others_are_served() {
    let dir = tempdir("slowloris");
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = EchoApp::start().await;
    let b = Sidecar::start(&cp, "target", Some(app.addr), &[]).await;
    let route = free_addr();
    let a = Sidecar::spawn(
        &cp,
        "front",
        None,
        &[format!("{route}={}@{}", b.inbound.unwrap(), id("target"))],
        &["--header-read-timeout", "1s"],
    );
    a.wait_ready().await;

    let mut slow = tokio::net::TcpStream::connect(route).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        // One byte a second... well, every 250 ms, forever, until the proxy hangs up.
        let mut n = 0u64;
        loop {
            if slow.write_all(b"x").await.is_err() {
                return (started.elapsed(), n);
            }
            let mut probe = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(250), slow.read(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), n),
                Ok(Ok(_)) => {} // a 408 may come first; the close follows
                Err(_) => {}
            }
            n += 1;
            if started.elapsed() > Duration::from_secs(10) {
                return (started.elapsed(), n);
            }
        }
    });
    // Meanwhile everyone else is served.
    for _ in 0..5 {
        assert_eq!(get(&http_client(), &format!("http://{route}/ok"), &[]).await.unwrap().0, 200);
    }
    let (cut_after, _) = trickle.await.unwrap();
    assert!(cut_after < Duration::from_secs(3), "slowloris held the connection for {cut_after:?}");
    assert!(cut_after >= Duration::from_millis(900), "cut before the timeout: {cut_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_or_too_many_headers_get_431_and_reach_nobody() {
    let dir = tempdir("headers");
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = EchoApp::start().await;
    let b = Sidecar::start(&cp, "target", Some(app.addr), &[]).await;
    let route = free_addr();
    let _a = Sidecar::start(&cp, "front", None, &[format!("{route}={}@{}", b.inbound.unwrap(), id("target"))]).await;
    let huge = "a".repeat(100 * 1024);
    let (status, _, _) = get(&http_client(), &format!("http://{route}/"), &[("x-huge", &huge)]).await.unwrap();
    assert_eq!(status, 431);
    let many: Vec<(String, String)> = (0..150).map(|i| (format!("x-h{i}"), "v".to_string())).collect();
    let many_ref: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, _, _) = get(&http_client(), &format!("http://{route}/"), &many_ref).await.unwrap();
    assert_eq!(status, 431);
    assert_eq!(app.hits.load(Ordering::SeqCst), 0);
    assert_eq!(get(&http_client(), &format!("http://{route}/"), &[]).await.unwrap().0, 200);
}

/// An app that switches protocols on `Upgrade: echo` (the HTTP mechanism WebSocket uses) and
/// accepts CONNECT, then echoes bytes; it reports the caller identity its sidecar vouched for.
async fn start_upgrade_app() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|mut req: http::Request<hyper::body::Incoming>| async move {
                    let caller = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    let upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(up) = upgrade.await {
                            let mut io = hyper_util::rt::TokioIo::new(up);
                            let mut buf = [0u8; 64];
                            while let Ok(n) = io.read(&mut buf).await {
                                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    });
                    let mut resp = http::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                    if req.method() != http::Method::CONNECT {
                        *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                        resp.headers_mut().insert("connection", "upgrade".parse().unwrap());
                        resp.headers_mut().insert("upgrade", "echo".parse().unwrap());
                    }
                    resp.headers_mut().insert("x-caller", caller.parse().unwrap());
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_and_connect_cross_the_mesh_as_byte_streams_after_policy() {
    let dir = tempdir("upgrade");
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = start_upgrade_app().await;
    // `echo` is not WebSocket: both sidecars must be told to let it through.
    let allow = ["--allowed-upgrades", "websocket,echo"];
    let b = Sidecar::spawn(&cp, "ws", Some(app), &[], &allow);
    b.wait_ready().await;
    let route = free_addr();
    let a = Sidecar::spawn(&cp, "browser", None, &[format!("{route}={}@{}", b.inbound.unwrap(), id("ws"))], &allow);
    a.wait_ready().await;

    for head in [
        "GET /chat HTTP/1.1\r\nhost: ws\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        "CONNECT db.internal:5432 HTTP/1.1\r\nhost: db.internal:5432\r\n\r\n",
    ] {
        let mut conn = tokio::net::TcpStream::connect(route).await.unwrap();
        conn.write_all(head.as_bytes()).await.unwrap();
        // Read the response head.
        let mut resp = Vec::new();
        while !resp.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut byte)).await.unwrap().unwrap();
            resp.push(byte[0]);
        }
        let resp = String::from_utf8_lossy(&resp).to_lowercase();
        let expected = if head.starts_with("CONNECT") { "http/1.1 200" } else { "http/1.1 101" };
        assert!(resp.starts_with(expected), "{head:?} -> {resp}");
        assert!(resp.contains(&format!("x-caller: by={};uri={}", id("ws"), id("browser"))), "{resp}");
        // Now a raw byte stream, both ways, several round trips.
        for i in 0..3 {
            let msg = format!("frame-{i}");
            conn.write_all(msg.as_bytes()).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut back)).await.unwrap().unwrap();
            assert_eq!(back, msg.as_bytes());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_shutdown_on_the_admin_port_drains_and_exits_zero() {
    let dir = tempdir("admin-shutdown");
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = EchoApp::start().await;
    let mut s = Sidecar::start(&cp, "stoppable", Some(app.addr), &[]).await;
    // GET is not enough: only POST stops it.
    assert_eq!(get(&http_client(), &format!("http://{}/shutdown", s.admin), &[]).await.unwrap().0, 403);
    assert!(s.proc.child.try_wait().unwrap().is_none());
    let req = http::Request::post(format!("http://{}/shutdown", s.admin))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(http_client().request(req).await.unwrap().status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = s.proc.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "did not exit after POST /shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}

/// Kubernetes probes arrive in plaintext from the kubelet. A STRICT port lets exactly the
/// declared probe paths through (GET/HEAD), and refuses every other plaintext request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_port_answers_declared_kubelet_probes_and_nothing_else_in_plaintext() {
    let dir = tempdir("probes");
    let cp = ControlPlane::start(&dir, &["--default-policy", "deny"]).await;
    let app = EchoApp::start().await;
    let inbound = free_addr();
    let probe = format!("{}/healthz", inbound.port());
    let b = Sidecar::spawn(
        &cp,
        "probed",
        None,
        &[],
        &["--inbound", &inbound.to_string(), "--app", &app.addr.to_string(), "--probe", &probe],
    );
    b.wait_ready().await;
    let client = http_client();
    let (status, _, body) =
        get(&client, &format!("http://{inbound}/healthz"), &[("x-forwarded-client-cert", "By=x;URI=spiffe://evil")])
            .await
            .unwrap();
    assert_eq!(status, 200, "the probe reaches the app: {body}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(seen["headers"].get("x-forwarded-client-cert").is_none(), "a probe carries no identity: {body}");
    let hits = app.hits.load(Ordering::SeqCst);
    for path in ["/healthz/../admin", "/admin", "/healthzz"] {
        let (status, _, _) = get(&client, &format!("http://{inbound}{path}"), &[]).await.unwrap();
        assert_eq!(status, 403, "{path} is not a probe");
    }
    let post = http::Request::post(format!("http://{inbound}/healthz"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(client.request(post).await.unwrap().status(), 403, "only GET and HEAD");
    assert_eq!(app.hits.load(Ordering::SeqCst), hits, "nothing but the probe reached the app");
    assert!(metric(&b.metrics().await, "palisade_plaintext_refused", "") >= 4.0);
}
