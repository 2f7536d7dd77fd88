//! The app's TCP, gRPC and HTTPS kubelet probes, rewritten by the injector to the sidecar's
//! admin port, are run by a real sidecar process against real servers: a probe passes only
//! while the app (not the sidecar) answers it the way the kubelet requires.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use palisade::proto::health::health_check_response::ServingStatus;
use palisade::proto::health::health_server::{Health, HealthServer};
use palisade::proto::health::{HealthCheckRequest, HealthCheckResponse};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// A gRPC app whose health is whatever the test sets.
struct App(Arc<AtomicI32>);

#[tonic::async_trait]
impl Health for App {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        if request.get_ref().service == "unknown" {
            return Err(Status::not_found("no such service"));
        }
        Ok(Response::new(HealthCheckResponse { status: self.0.load(Ordering::SeqCst) }))
    }

    type WatchStream = futures_util::stream::Empty<Result<HealthCheckResponse, Status>>;

    async fn watch(&self, _: Request<HealthCheckRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not used by probes"))
    }
}

async fn grpc_app(status: Arc<AtomicI32>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(HealthServer::new(App(status)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// An HTTPS app with a self-signed certificate (the kubelet does not verify it either):
/// `/healthz` answers 200, `/moved` 302, anything else 500.
async fn https_app() -> SocketAddr {
    palisade::tls::install_crypto_provider();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(palisade::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let status = match req.uri().path() {
                        "/healthz" if req.headers().get("x-probe").is_some_and(|v| v == "yes") => 200,
                        "/moved" => 302,
                        _ => 500,
                    };
                    Ok::<_, Infallible>(
                        http::Response::builder().status(status).body(Full::new(Bytes::from_static(b"."))).unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    addr
}

async fn probe(sidecar: &Sidecar, path: &str) -> (u16, String) {
    let (status, _, body) =
        get(&http_client(), &format!("http://{}/app-health/{path}", sidecar.admin), &[]).await.unwrap();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewritten_probes_pass_only_while_the_app_answers_them() {
    let dir = tempdir("app-probes");
    let cp = ControlPlane::start(&dir, &[]).await;

    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    let closed_port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let health = Arc::new(AtomicI32::new(ServingStatus::Serving as i32));
    let grpc = grpc_app(health.clone()).await;
    let https = https_app().await;
    // Accepts and never answers: a hung app.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();

    let probes = serde_json::json!({
        "/app-health/app/livez": {"tcpSocket": {"port": tcp_port}},
        "/app-health/app/startupz": {"tcpSocket": {"port": closed_port}},
        "/app-health/app/readyz": {"grpc": {"port": grpc.port()}},
        "/app-health/other/readyz": {"grpc": {"port": grpc.port(), "service": "unknown"}},
        "/app-health/web/livez": {"httpGet": {"port": https.port(), "path": "/healthz", "scheme": "HTTPS",
                                               "httpHeaders": [{"name": "x-probe", "value": "yes"}]}},
        "/app-health/web/readyz": {"httpGet": {"port": https.port(), "path": "/broken", "scheme": "HTTPS"}},
        "/app-health/web/startupz": {"httpGet": {"port": https.port(), "path": "/moved", "scheme": "HTTPS"}},
        "/app-health/hung/livez": {"grpc": {"port": silent_port}, "timeoutSeconds": 1},
    })
    .to_string();
    let sidecar = Sidecar::spawn(&cp, "web", None, &[], &["--app-probes", &probes]);
    sidecar.wait_ready().await;

    assert_eq!(probe(&sidecar, "app/livez").await.0, 200, "the app listens");
    let (status, body) = probe(&sidecar, "app/startupz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("refused"), "{body}");
    assert_eq!(probe(&sidecar, "app/readyz").await.0, 200, "gRPC SERVING");
    let (status, body) = probe(&sidecar, "other/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("NotFound") || body.contains("not found"), "{body}");
    let (status, body) = probe(&sidecar, "web/livez").await;
    assert_eq!(status, 200, "HTTPS 200 with the probe's headers: {body}");
    let (status, body) = probe(&sidecar, "web/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("500"), "{body}");
    assert_eq!(probe(&sidecar, "web/startupz").await.0, 200, "a redirect passes, as for the kubelet");
    assert_eq!(probe(&sidecar, "nothing/livez").await.0, 404);

    // A hung app fails within the probe's own timeout rather than holding the kubelet.
    let started = Instant::now();
    let (status, body) = probe(&sidecar, "hung/livez").await;
    assert_eq!(status, 503);
    assert!(body.contains("no answer within 1s"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());

    // The app changes, the probes follow: NOT_SERVING fails readiness, a closed port liveness.
    health.store(ServingStatus::NotServing as i32, Ordering::SeqCst);
    let (status, body) = probe(&sidecar, "app/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("NOT_SERVING"), "{body}");
    drop(tcp);
    let (status, body) = probe(&sidecar, "app/livez").await;
    assert_eq!(status, 503, "a dead app fails its TCP probe: {body}");
    drop(silent);
}

#[test]
fn a_sidecar_refuses_app_probes_it_cannot_run() {
    let out = std::process::Command::new(PROXY_BIN)
        .args(["--control", "127.0.0.1:1", "--ca-bundle", "/dev/null", "--token-file", "/dev/null"])
        .args(["--app-probes", r#"{"/app-health/a/livez": {"tcpSocket": {"port": "http"}}}"#])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--app-probes") && err.contains("named port \"http\""), "{err}");
}
