//! Inbound: terminate mTLS from peer sidecars, establish who is calling, hand the request to the
//! local app with the verified identity in `x-forwarded-client-cert`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::http::{ProxyBody, XFCC, ensure_request_id, error_response, status_class, stream, strip_hop_by_hop};
use crate::identity::SpiffeId;
use crate::telemetry::metrics::ProxyMetrics;

/// Everything the inbound side needs; shared by all its connections.
pub struct Inbound {
    pub own_id: SpiffeId,
    pub app: SocketAddr,
    pub client: Client<HttpConnector, Incoming>,
    pub metrics: Arc<ProxyMetrics>,
    pub handshake_timeout: Duration,
    pub bundle: Arc<crate::tls::TrustBundle>,
}

impl Inbound {
    /// A pooled HTTP/1.1 keep-alive client to the app.
    pub fn app_client() -> Client<HttpConnector, Incoming> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(http)
    }
}

/// Accepts mTLS connections until the task is dropped.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, inbound: Arc<Inbound>) {
    loop {
        let Ok((tcp, remote)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let inbound = inbound.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(inbound.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    let reason = handshake_failure_reason(&e);
                    inbound
                        .metrics
                        .handshake_failures
                        .get_or_create(&vec![("direction".into(), "inbound".into()), ("reason".into(), reason.into())])
                        .inc();
                    tracing::info!(%remote, error = %e, reason, "inbound mTLS handshake refused");
                    return;
                }
                Err(_) => {
                    inbound
                        .metrics
                        .handshake_failures
                        .get_or_create(&vec![
                            ("direction".into(), "inbound".into()),
                            ("reason".into(), "timeout".into()),
                        ])
                        .inc();
                    return;
                }
            };
            let (peer, serial) = match crate::tls::peer_identity(tls.get_ref().1.peer_certificates()) {
                Ok(found) => found,
                Err(e) => {
                    tracing::info!(%remote, error = %e, "inbound peer has no usable identity");
                    return;
                }
            };
            let peer = Arc::new(peer);
            let mut revocations = inbound.bundle.revocations_changed();
            let svc = {
                let inbound = inbound.clone();
                let peer = peer.clone();
                hyper::service::service_fn(move |req| {
                    let inbound = inbound.clone();
                    let peer = peer.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&inbound, &peer, req).await) }
                })
            };
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
            builder.http2().timer(TokioTimer::new());
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            loop {
                tokio::select! {
                    res = &mut conn => {
                        if let Err(e) = res {
                            tracing::debug!(%remote, error = %e, "inbound connection ended with error");
                        }
                        return;
                    }
                    // A revocation cuts the peer's open connections, not only its next handshake.
                    Ok(()) = revocations.changed() => {
                        if inbound.bundle.is_revoked(peer.as_str(), &serial) {
                            tracing::warn!(%remote, peer = %peer, %serial, "closing connection of a revoked peer");
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// A metric label for why a handshake failed, from the rustls error inside the I/O error.
pub fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::NoCertificatesPresented) => "no_client_certificate",
        Some(E::InvalidCertificate(C::UnknownIssuer | C::BadSignature | C::BadEncoding)) => "untrusted_issuer",
        Some(E::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        )) => "expired",
        Some(E::InvalidCertificate(C::Revoked)) => "revoked",
        Some(E::InvalidCertificate(_)) => "bad_certificate",
        Some(E::PeerIncompatible(_) | E::NoApplicationProtocol) => "incompatible",
        Some(E::AlertReceived(_)) => "alert_received",
        Some(_) => "protocol_error",
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "eof",
        None => "io_error",
    }
}

async fn handle(inbound: &Inbound, peer: &SpiffeId, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let headers = req.headers_mut();
    let request_id = ensure_request_id(headers);
    strip_hop_by_hop(headers);
    // Only this sidecar may say who the caller is: drop anything that arrived from outside.
    headers.remove(&XFCC);
    let xfcc = format!("By={};URI={}", inbound.own_id, peer);
    headers.insert(XFCC.clone(), HeaderValue::from_str(&xfcc).expect("SPIFFE IDs are valid header text"));
    if !headers.contains_key(header::HOST)
        && let Some(auth) = req.uri().authority().map(|a| a.to_string())
        && let Ok(v) = HeaderValue::from_str(&auth)
    {
        req.headers_mut().insert(header::HOST, v);
    }
    let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let uri: Uri = match format!("http://{}{}", inbound.app, pq).parse() {
        Ok(u) => u,
        Err(_) => {
            return error_response(StatusCode::BAD_REQUEST, "invalid request target", &request_id);
        }
    };
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_11;
    let resp = match inbound.client.request(req).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, stream(body))
        }
        Err(e) => {
            let reason = format!("app at {} unavailable: {}", inbound.app, super::http::error_chain(&e));
            tracing::warn!(%request_id, %reason, "inbound forward failed");
            error_response(StatusCode::BAD_GATEWAY, &reason, &request_id)
        }
    };
    record(&inbound.metrics, "inbound", peer.as_str(), resp.status(), started);
    resp
}

/// Counts a finished request.
pub fn record(metrics: &ProxyMetrics, direction: &str, peer: &str, status: StatusCode, started: Instant) {
    metrics
        .requests
        .get_or_create(&vec![
            ("direction".into(), direction.into()),
            ("status_class".into(), status_class(status).into()),
            ("peer".into(), peer.into()),
        ])
        .inc();
    metrics
        .duration
        .get_or_create(&vec![("direction".into(), direction.into())])
        .observe(started.elapsed().as_secs_f64());
}
