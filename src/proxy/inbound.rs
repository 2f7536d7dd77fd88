//! Inbound: terminate mTLS from peer sidecars (or, on a PERMISSIVE port, accept plaintext),
//! establish who is calling, decide the request against policy, hand it to the local app with
//! the verified identity in `x-forwarded-client-cert`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::Either;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::body::RequestBody;
use super::h1_pool::{Dial, Pool, Sticky};
use super::http::{
    BoxError, HeaderScan, ProxyBody, REQUEST_ID, XFCC, ensure_request_id, error_response, sanitize_scanned, stream,
    strip_hop_by_hop_and_palisade, strip_scanned,
};
use super::limits::{Drain, Limits, heed};
use super::view::{MeshView, PeerAuthMode, SharedView};
use crate::guard::Refusal;
use crate::guard::jwt::{Authenticated, JwtGuard};
use crate::guard::path::PathGuard;
use crate::guard::rate::{ClaimLookup, RateGuard, RateRequest};
use crate::guard::security::SecurityGuard;
use crate::identity::SpiffeId;
use crate::policy::input::RequestAuth;
use crate::policy::{Decider, Decision, EngineKind, Input, LiveRequest, RequestAttributes};
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::{GuardLabels, LastDecision, PolicyLabel, ProxyMetrics, RequestMetrics};

/// Header naming the policy that refused a request.
pub static DENIED_BY: http::HeaderName = http::HeaderName::from_static("x-palisade-denied-by");

/// Everything the inbound side needs; shared by all its connections.
pub struct Inbound {
    pub own_id: SpiffeId,
    /// The app, or `None` in transparent mode: `127.0.0.1:<original destination port>`.
    pub app: Option<SocketAddr>,
    /// HTTP/1.1 to the app for plaintext kubelet probes on a STRICT port (rare; pooled by hyper).
    pub client: Client<HttpConnector, RequestBody>,
    /// HTTP/1.1 keep-alive connections to the app, per app address (one in explicit mode, one
    /// per port in transparent mode); each caller connection keeps one between its requests.
    pub app_pools: AppPools,
    /// HTTP/2 (prior knowledge) to the app, for callers that spoke HTTP/2 (gRPC).
    pub h2_client: Client<HttpConnector, RequestBody>,
    pub limits: Limits,
    pub drain: Arc<Drain>,
    pub metrics: Arc<ProxyMetrics>,
    pub handshake_timeout: Duration,
    pub view: Arc<SharedView>,
    pub access_log: AccessLog,
    /// Plain-HTTP kubelet probes (`port`, `path`) let through a STRICT port: GET or HEAD of
    /// exactly these, nothing else, so that a STRICT pod can become ready.
    pub probes: Vec<(u16, String)>,
    /// This sidecar's certificate: once it has lapsed (the sidecar could not renew), open
    /// connections stop serving under it, as new handshakes already do.
    pub certs: Arc<crate::tls::CertStore>,
}

/// The caller of one connection.
struct Peer {
    /// `None` for a plaintext caller on a PERMISSIVE port.
    id: Option<SpiffeId>,
    serial: String,
    remote: SocketAddr,
    /// The port the caller asked for (the original destination port in transparent mode).
    local_port: u16,
    /// Where this connection's requests go.
    app: SocketAddr,
}

impl Peer {
    fn label(&self) -> &str {
        self.id.as_ref().map(|i| i.as_str()).unwrap_or("unauthenticated")
    }
}

/// What every request of one HTTP connection shares, worked out once when it opens.
struct ConnState {
    peer: Arc<Peer>,
    /// The `x-forwarded-client-cert` value for a verified caller.
    xfcc: Option<HeaderValue>,
    /// `peer.app` as a URI authority.
    app_authority: Option<Authority>,
    requests: RequestMetrics,
    /// HTTP/1.1 to the app: the pool for `peer.app`, and the connection this caller holds.
    app_pool: Arc<Pool<AppDial>>,
    sticky: Sticky<AppDial>,
    last_decision: LastDecision,
}

/// Dials the app over plain TCP.
pub struct AppDial {
    addr: SocketAddr,
    connect_timeout: Duration,
}

impl Dial for AppDial {
    type Io = TokioIo<TcpStream>;
    async fn dial(&self) -> std::io::Result<Self::Io> {
        Ok(TokioIo::new(super::tcp::connect(self.addr, self.connect_timeout).await?))
    }
}

/// The app's HTTP/1.1 pools by address.
#[derive(Default)]
pub struct AppPools(parking_lot::Mutex<std::collections::HashMap<SocketAddr, Arc<Pool<AppDial>>>>);

impl AppPools {
    fn get(&self, addr: SocketAddr, limits: &Limits) -> Arc<Pool<AppDial>> {
        self.0
            .lock()
            .entry(addr)
            .or_insert_with(|| {
                Pool::new(AppDial { addr, connect_timeout: limits.connect_timeout }, Duration::from_secs(90))
            })
            .clone()
    }
}

impl ConnState {
    fn new(inbound: &Inbound, peer: Arc<Peer>) -> Self {
        let xfcc = peer.id.as_ref().map(|id| {
            HeaderValue::from_str(&format!("By={};URI={}", inbound.own_id, id))
                .expect("SPIFFE IDs are valid header text")
        });
        let app_authority = peer.app.to_string().parse().ok();
        let requests = inbound.metrics.requests_for("inbound", peer.label());
        let app_pool = inbound.app_pools.get(peer.app, &inbound.limits);
        ConnState {
            peer,
            xfcc,
            app_authority,
            requests,
            app_pool,
            sticky: Sticky::default(),
            last_decision: LastDecision::default(),
        }
    }
}

impl Inbound {
    /// The inbound side of a sidecar whose workload is `own_id`.
    pub fn new(
        dp: &super::DataPlane,
        own_id: SpiffeId,
        app: Option<SocketAddr>,
        handshake_timeout: Duration,
        probes: Vec<(u16, String)>,
    ) -> Self {
        Inbound {
            own_id,
            app,
            client: Self::app_client(&dp.limits, false),
            app_pools: Default::default(),
            h2_client: Self::app_client(&dp.limits, true),
            limits: dp.limits.clone(),
            drain: dp.drain.clone(),
            metrics: dp.metrics.clone(),
            handshake_timeout,
            view: dp.view.clone(),
            access_log: dp.access_log.clone(),
            probes,
            certs: dp.certs.clone(),
        }
    }

    /// A pooled client to the app: HTTP/1.1 keep-alive, or HTTP/2 prior knowledge.
    pub fn app_client(limits: &Limits, h2: bool) -> Client<HttpConnector, RequestBody> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(limits.connect_timeout));
        Client::builder(TokioExecutor::new())
            .http2_only(h2)
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .build(http)
    }

    fn count_handshake_failure(&self, reason: &'static str) {
        self.metrics.handshake_failure("inbound", reason);
    }
}

/// Accepts connections until draining starts.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor, inbound: Arc<Inbound>) {
    let (drain, metrics) = (inbound.drain.clone(), inbound.metrics.clone());
    super::limits::accept_loop(listener, drain, metrics, "inbound", move |tcp, remote| {
        let (acceptor, inbound) = (acceptor.clone(), inbound.clone());
        async move { connection(&inbound, acceptor, tcp, remote).await }
    })
    .await
}

/// How often an idle inbound HTTP/2 connection is pinged.
const H2_KEEPALIVE: Duration = Duration::from_secs(60);

impl Inbound {
    /// A connection's IO once its protocol starts: its first bytes (an HTTP/1 head or the
    /// HTTP/2 preface, which hyper's header-read timeout does not cover) within the header-read
    /// timeout; after that hyper times reads out (the header-read timeout between HTTP/1
    /// requests, HTTP/2 pings) and the body pace covers a trickled body, so the IO only fails a
    /// write blocked past the idle timeout (a caller that stopped reading).
    fn deadline<IO>(&self, io: IO) -> crate::listener::Deadline<IO> {
        crate::listener::Deadline::http_server(io, self.limits.header_read_timeout, self.limits.idle_timeout)
    }
}

/// TLS records start with content type 22 (handshake); anything else is plaintext.
const TLS_HANDSHAKE: u8 = 0x16;

async fn connection(inbound: &Arc<Inbound>, acceptor: TlsAcceptor, tcp: TcpStream, remote: SocketAddr) {
    let (local_port, app) = match inbound.app {
        Some(app) => (tcp.local_addr().map(|a| a.port()).unwrap_or(0), app),
        None => match super::original_dst::original_dst(&tcp) {
            Ok(dst) => (dst.port(), SocketAddr::from(([127, 0, 0, 1], dst.port()))),
            Err(e) => {
                tracing::warn!(%remote, error = %e, "transparent inbound: no original destination; closed");
                return;
            }
        },
    };
    let mut first = [0u8; 1];
    let is_tls = match tokio::time::timeout(inbound.handshake_timeout, tcp.peek(&mut first)).await {
        Ok(Ok(1)) => first[0] == TLS_HANDSHAKE,
        _ => return inbound.count_handshake_failure("timeout"),
    };
    if !is_tls {
        if inbound.view.load().mode_for_port(local_port) != PeerAuthMode::Permissive {
            if inbound.probes.iter().any(|(port, _)| *port == local_port) {
                return serve_probes(inbound, tcp, remote, local_port, app).await;
            }
            inbound.metrics.plaintext_refused.inc();
            tracing::info!(%remote, "plaintext connection refused: port is STRICT (mTLS only)");
            return;
        }
        let peer = Arc::new(Peer { id: None, serial: String::new(), remote, local_port, app });
        return serve_http(inbound, TokioIo::new(inbound.deadline(tcp)), peer).await;
    }
    let tls = match tokio::time::timeout(inbound.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = crate::tls::handshake_failure_reason(&e);
            inbound.count_handshake_failure(reason);
            tracing::info!(%remote, error = %e, reason, "inbound mTLS handshake refused");
            return;
        }
        Err(_) => return inbound.count_handshake_failure("timeout"),
    };
    let (id, serial) = match crate::tls::peer_identity(tls.get_ref().1.peer_certificates()) {
        Ok(found) => found,
        Err(e) => {
            tracing::info!(%remote, error = %e, "inbound peer has no usable identity");
            return inbound.count_handshake_failure("no_identity");
        }
    };
    let peer = Arc::new(Peer { id: Some(id), serial, remote, local_port, app });
    if tls.get_ref().1.alpn_protocol() == Some(crate::tls::config::ALPN_TCP) {
        return opaque(inbound, tls, &peer).await;
    }
    serve_http(inbound, TokioIo::new(inbound.deadline(tls)), peer).await
}

/// A plaintext connection to a STRICT port that has kubelet probes: GET or HEAD of a probe path
/// goes to the app (no policy: a probe carries no identity and reveals only health); anything
/// else is refused as a STRICT port refuses plaintext.
async fn serve_probes(inbound: &Arc<Inbound>, tcp: TcpStream, remote: SocketAddr, port: u16, app: SocketAddr) {
    let inbound2 = inbound.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let inbound = inbound2.clone();
        async move {
            let path = req.uri().path().to_string();
            let allowed = matches!(*req.method(), http::Method::GET | http::Method::HEAD)
                && inbound.probes.iter().any(|(p, probe)| *p == port && *probe == path);
            if !allowed {
                inbound.metrics.plaintext_refused.inc();
                tracing::info!(%remote, port, %path, "plaintext request refused: port is STRICT and this is not a probe");
                return Ok::<_, std::convert::Infallible>(error_response(
                    StatusCode::FORBIDDEN,
                    "plaintext refused: this port accepts mutual TLS only (kubelet probe paths excepted)",
                    "",
                ));
            }
            let (mut parts, body) = req.into_parts();
            let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            parts.uri = Uri::try_from(format!("http://{app}{pq}")).unwrap_or_default();
            strip_hop_by_hop_and_palisade(&mut parts.headers);
            parts.headers.remove(&XFCC);
            // GET or HEAD of a probe path: no body to pace.
            match inbound.client.request(Request::from_parts(parts, RequestBody::unpaced(body))).await {
                Ok(resp) => Ok(resp.map(stream)),
                Err(e) => {
                    tracing::info!(%remote, port, %path, error = %e, "probe could not reach the app");
                    Ok(error_response(StatusCode::BAD_GATEWAY, "probe: the app did not answer", ""))
                }
            }
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(inbound.limits.header_read_timeout)
        .serve_connection(TokioIo::new(tcp), svc)
        .await;
}

/// An opaque TCP connection from a peer sidecar: one decision for the whole connection, then
/// bytes both ways to the app.
async fn opaque<S>(inbound: &Inbound, mut tls: S, peer: &Peer)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let started = Instant::now();
    let attrs = RequestAttributes {
        source: peer.id.clone(),
        source_ip: Some(peer.remote.ip()),
        source_port: Some(peer.remote.port()),
        destination: inbound.own_id.clone(),
        destination_port: peer.local_port,
        method: String::new(),
        path: String::new(),
        host: String::new(),
        scheme: "tcp".into(),
        protocol: "tcp".into(),
        headers: BTreeMap::new(),
    };
    let decision = inbound.view.load().policies.decide(&Input::new(attrs));
    inbound.metrics.peers.record(peer.label(), "inbound", if decision.allowed { 200 } else { 403 }, !decision.allowed);
    if !decision.allowed {
        tracing::info!(peer = peer.label(), denied_by = %denied_by(&decision), reason = %decision.reason, "opaque TCP connection denied");
        if let Some(r) = inbound.access_log.access("inbound") {
            inbound.access_log.write(r.tcp().peer(Arc::from(peer.label())).denied_by(policy_label(&decision)));
        }
        return;
    }
    let mut app = match super::tcp::connect(peer.app, inbound.limits.connect_timeout).await {
        Ok(app) => app,
        Err(e) => {
            tracing::warn!(app = %peer.app, error = %e, "opaque TCP: app unavailable");
            return;
        }
    };
    let (received, sent) = super::tcp::splice(&mut tls, &mut app, inbound.limits.idle_timeout).await;
    inbound.metrics.record_tcp_bytes("inbound", sent, received);
    if let Some(r) = inbound.access_log.access("inbound") {
        inbound.access_log.write(r.tcp().peer(Arc::from(peer.label())).bytes(sent, received).took(started.elapsed()));
    }
}

async fn serve_http<I>(inbound: &Arc<Inbound>, io: I, peer: Arc<Peer>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut revocations = inbound.view.revocations_changed();
    let svc = {
        let (inbound, conn) = (inbound.clone(), Arc::new(ConnState::new(inbound, peer.clone())));
        hyper::service::service_fn(move |req| {
            let (inbound, conn) = (inbound.clone(), conn.clone());
            async move { Ok::<_, std::convert::Infallible>(handle(&inbound, &conn, req).await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(inbound.limits.header_read_timeout)
        .max_buf_size(inbound.limits.max_header_bytes.max(8192))
        .max_headers(inbound.limits.max_headers);
    // An idle HTTP/2 connection is pinged; a peer that stopped answering is closed.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_KEEPALIVE))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    // Draining, a revocation of this peer, or this sidecar's own certificate lapsing: a
    // revocation cuts its open connections, not only its next handshake, and a sidecar whose
    // identity has lapsed stops serving under it on connections made before, as it refuses new
    // ones (fail closed).
    let interrupt = async {
        let stop = inbound.drain.signaled();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return Interrupt::Drain,
                Ok(()) = revocations.changed() => {
                    if inbound.certs.current().is_none() {
                        return Interrupt::Lapsed;
                    }
                    if let Some(id) = &peer.id && inbound.view.load().trust.is_revoked(id.as_str(), &peer.serial) {
                        return Interrupt::Revoked(id.clone());
                    }
                }
            }
        }
    };
    tokio::pin!(interrupt);
    match heed(conn.as_mut(), interrupt.as_mut()).await {
        Either::Left(res) => {
            if let Err(e) = res {
                tracing::debug!(remote = %peer.remote, error = %e, "inbound connection ended with error");
            }
        }
        Either::Right(Interrupt::Drain) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
        Either::Right(Interrupt::Revoked(id)) => {
            tracing::warn!(remote = %peer.remote, peer = %id, serial = %peer.serial, "closing connection of a revoked peer");
        }
        Either::Right(Interrupt::Lapsed) => {
            // Requests in flight finish; the peer opens a new connection, whose handshake fails
            // (`no_certificate`) until this sidecar renews.
            tracing::debug!(remote = %peer.remote, "own certificate lapsed: closing the connection");
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Why an inbound connection stops before its peer or app ends it.
enum Interrupt {
    Drain,
    Revoked(SpiffeId),
    /// This sidecar's own certificate expired without a renewal.
    Lapsed,
}

/// The protocol the calling app spoke (`HTTP/1.1`, `HTTP/2.0`, ...), whatever carried the
/// request between the sidecars: the peer sidecar names it in `x-palisade-orig-proto` when the
/// hop's protocol differs.
fn app_protocol<B>(req: &Request<B>) -> &'static str {
    match req.headers().get(&super::outbound::ORIG_PROTO).map(HeaderValue::as_bytes) {
        Some(b"HTTP/2") => "HTTP/2.0",
        Some(b"HTTP/1.1") => "HTTP/1.1",
        _ => match req.version() {
            http::Version::HTTP_09 => "HTTP/0.9",
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2.0",
            http::Version::HTTP_3 => "HTTP/3.0",
            _ => "HTTP/1.1",
        },
    }
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// What decided a refusal: the policy's `namespace/name`, or which rule of the evaluation order.
pub fn denied_by(decision: &Decision) -> &str {
    decision.decider.name()
}

/// The `policy` label of a decision: the deciding policy, else the step of the evaluation order.
fn policy_label(decision: &Decision) -> PolicyLabel {
    match &decision.decider {
        Decider::Policy { id, .. } => PolicyLabel::Policy(id.clone()),
        Decider::NoAllowMatched => PolicyLabel::Fixed("no-allow-matched"),
        Decider::Default(_) => PolicyLabel::Fixed("mesh-default"),
        Decider::FailClosed => PolicyLabel::Fixed("no-policy-yet"),
    }
}

/// The refusal a caller sees: 403 (or the status a Rego policy chose) with a small JSON body,
/// or gRPC PERMISSION_DENIED; always naming the deciding policy and the request id. A sidecar
/// that has no policy yet (just started, its first snapshot on the way) refuses with 503,
/// `retry-after: 1` and `x-palisade-error`, or gRPC UNAVAILABLE: it has decided nothing, and the
/// caller should try again rather than take it as a denial.
fn denial(decision: &Decision, request_id: &str, grpc: bool) -> Response<ProxyBody> {
    if matches!(decision.decider, Decider::FailClosed) {
        let status = if grpc { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        let mut resp = error_response(status, &decision.reason, request_id);
        let h = resp.headers_mut();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        h.insert(DENIED_BY.clone(), HeaderValue::from_static("no-policy-yet"));
        if grpc {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from_static("14"));
            if let Ok(v) = HeaderValue::from_str(&decision.reason) {
                h.insert("grpc-message", v);
            }
        }
        return resp;
    }
    let denied_by = denied_by(decision);
    let mut resp = if grpc {
        let mut r = Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from_static("7"));
        if let Ok(v) = HeaderValue::from_str(&format!("denied by {denied_by}: {}", decision.reason)) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let body = decision.body.clone().unwrap_or_else(|| {
            serde_json::json!({
                "error": "denied by policy",
                "policy": decision.policy(),
                "reason": decision.reason,
                "request_id": request_id,
            })
            .to_string()
        });
        let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
        *r.status_mut() =
            decision.http_status.and_then(|s| StatusCode::from_u16(s).ok()).unwrap_or(StatusCode::FORBIDDEN);
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    let h = resp.headers_mut();
    for (k, v) in &decision.headers {
        if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            h.insert(k, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(denied_by) {
        h.insert(DENIED_BY.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(REQUEST_ID.clone(), v);
    }
    resp
}

async fn handle(inbound: &Inbound, conn: &ConnState, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let peer = &*conn.peer;
    let request_id = ensure_request_id(req.headers_mut());
    // Only this sidecar may say who the caller is: drop anything that arrived from outside,
    // before policy sees the headers.
    req.headers_mut().remove(&XFCC);

    let view = inbound.view.load();
    // The app receives the path that was decided on: normalized before anything reads it.
    if let Err(refusal) = normalize_path(&view.guards.path, &mut req) {
        return guard_refusal(inbound, conn, &req, &refusal, &request_id, started);
    }
    let (verified, security) = match run_guards(inbound, &view, peer, &mut req) {
        Ok(passed) => passed,
        Err(refusal) => {
            let mut resp = guard_refusal(inbound, conn, &req, &refusal, &request_id, started);
            view.guards.security.harden(resp.headers_mut());
            return resp;
        }
    };
    // Policy reads the request where it lies; the full input document is built only if a Rego
    // or Wasm policy or the decision log asks for it.
    let input = Input::live(LiveRequest {
        source: peer.id.as_ref(),
        source_ip: Some(peer.remote.ip()),
        source_port: Some(peer.remote.port()),
        destination: &inbound.own_id,
        destination_port: peer.local_port,
        method: req.method(),
        uri: req.uri(),
        headers: req.headers(),
        scheme: if peer.id.is_some() { "https" } else { "http" },
        protocol: app_protocol(&req),
        auth: verified.as_ref().map(|v| &*v.auth),
    });
    let decided = Instant::now();
    let decision = view.policies.decide(&input);
    let engine = decision.engine.map_or("none", EngineKind::as_str);
    inbound.metrics.record_decision(
        &conn.last_decision,
        decision.allowed,
        policy_label(&decision),
        engine,
        decided.elapsed(),
    );
    if (!decision.allowed || !decision.audits.is_empty())
        && let Some(r) = inbound.access_log.decision(&request_id)
    {
        let decided = serde_json::to_value(&decision).unwrap_or_default();
        inbound.access_log.write(r.decided(decided, input.redacted_document()));
    }
    // The input borrows the request, which moves on now.
    drop((input, view));
    // The request line is copied now, before the request moves on, and only if the log is on.
    let record = inbound
        .access_log
        .access("inbound")
        .map(|r| r.peer(conn.requests.peer_label().clone()).request(req.method(), req.uri().path(), &request_id))
        .map(|r| match &verified {
            Some(v) => r.request_principal(&v.auth.principal),
            None => r,
        });
    let mut resp = if !decision.allowed {
        denial(&decision, &request_id, is_grpc(&req))
    } else {
        let body_limit = security.as_ref().and_then(|s| s.max_request_body);
        forward(inbound, conn, req, &request_id, body_limit).await
    };
    if let Some(security) = &security {
        security.harden(resp.headers_mut());
    }
    conn.requests.record(resp.status(), started);
    conn.requests.peer().record(resp.status().as_u16(), !decision.allowed);
    if let Some(r) = record {
        let r = r.status(resp.status().as_u16()).took(started.elapsed());
        inbound.access_log.write(if decision.allowed { r } else { r.denied_by(policy_label(&decision)) });
    }
    resp
}

/// WebSocket or CONNECT: its own HTTP/1.1 connection to the app, then raw bytes.
async fn upgrade(inbound: &Inbound, peer: &Peer, req: Request<Incoming>, request_id: &str) -> Response<ProxyBody> {
    let app = match super::tcp::connect(peer.app, inbound.limits.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            return error_response(
                StatusCode::BAD_GATEWAY,
                &format!("app at {} unavailable: {e}", peer.app),
                request_id,
            );
        }
    };
    match super::http::forward_upgrade(req, TokioIo::new(app), inbound.limits.idle_timeout).await {
        Ok(resp) => resp,
        Err(e) => error_response(StatusCode::BAD_GATEWAY, &e, request_id),
    }
}

/// The declared body length, if any.
fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers().get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Rewrites the request's path to its normal form (the query is kept as sent).
fn normalize_path<B>(guard: &PathGuard, req: &mut Request<B>) -> Result<(), Refusal> {
    // CONNECT's authority-form (`host:port`) and OPTIONS' `*` have no path to decide on or rewrite.
    if req.uri().path_and_query().is_none_or(|pq| pq.as_str() == "*") {
        return Ok(());
    }
    let normal = match guard.normalize(req.uri().path())? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(p) => p,
    };
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().map_err(|_| Refusal::BadRequest { rule: "unparsable" })?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| Refusal::BadRequest { rule: "unparsable" })?;
    Ok(())
}

/// The guards after path normalization, in order: the end user's token (401), the body limit
/// (413), the rate limits (429). What passes goes on with the verified end user and the
/// workload's hardening (`None` when it has none, the common case).
fn run_guards<B>(
    inbound: &Inbound,
    view: &MeshView,
    peer: &Peer,
    req: &mut Request<B>,
) -> Result<(Option<Authenticated>, Option<Arc<SecurityGuard>>), Refusal> {
    // A token is verified, then removed and its claim headers set before policy sees the
    // headers and before the app does.
    let verified = end_user(&view.guards.jwt, req)?;
    if let Some(v) = &verified {
        inbound.metrics.jwt_verified(v.cached);
    }
    let security = (!view.guards.security.is_noop()).then(|| view.guards.security.clone());
    if let Some(limit) = security.as_ref().and_then(|s| s.max_request_body)
        && content_length(req).is_some_and(|n| n > limit)
    {
        return Err(Refusal::TooLarge { limit });
    }
    check_rate_limits(inbound, &view.guards.rate, peer, req, verified.as_ref().map(|v| &*v.auth))?;
    Ok((verified, security))
}

/// Counts the request against the workload's rate limits (nothing to do without any).
fn check_rate_limits<B>(
    inbound: &Inbound,
    rate: &RateGuard,
    peer: &Peer,
    req: &Request<B>,
    user: Option<&RequestAuth>,
) -> Result<(), Refusal> {
    if rate.is_empty() {
        return Ok(());
    }
    let request = RateRequest {
        method: req.method(),
        path: req.uri().path(),
        source: peer.id.as_ref().map(SpiffeId::as_str),
        peer_ip: peer.remote.ip(),
        headers: req.headers(),
        principal: user.map(|u| u.principal.as_str()),
        claims: user.map(|u| u as &dyn ClaimLookup),
    };
    rate.check(&request, &inbound.metrics.rate_limited)
}

/// Authenticates the request's end user and prepares the request for policy and the app: the
/// token removed unless forwarded, the claim headers set (and never taken from the caller).
fn end_user<B>(jwt: &JwtGuard, req: &mut Request<B>) -> Result<Option<Authenticated>, Refusal> {
    if jwt.is_empty() {
        return Ok(None);
    }
    let verified = jwt.authenticate(req.headers(), req.uri())?;
    let mut uri = std::mem::take(req.uri_mut());
    let prepared = jwt.for_app(verified.as_ref(), req.headers_mut(), &mut uri);
    *req.uri_mut() = uri;
    prepared.map(|()| verified)
}

/// A guard's refusal: its status (or gRPC status), its reason, counted and logged.
fn guard_refusal<B>(
    inbound: &Inbound,
    conn: &ConnState,
    req: &Request<B>,
    refusal: &Refusal,
    request_id: &str,
    started: Instant,
) -> Response<ProxyBody> {
    let (guard, reason) = refusal.label();
    inbound.metrics.guard_refusals.get_or_create(&GuardLabels { guard, reason }).inc();
    let mut resp = error_response(refusal.status(), &refusal.reason(), request_id);
    if is_grpc(req) {
        *resp.status_mut() = StatusCode::OK;
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from_static(refusal.grpc_status()));
        if let Ok(v) = HeaderValue::from_str(&refusal.reason()) {
            h.insert("grpc-message", v);
        }
    }
    for (name, value) in refusal.headers() {
        resp.headers_mut().insert(name, value);
    }
    conn.requests.record(resp.status(), started);
    conn.requests.peer().record(resp.status().as_u16(), true);
    if let Some(r) = inbound.access_log.access("inbound") {
        let r = r.peer(conn.requests.peer_label().clone()).request(req.method(), req.uri().path(), request_id);
        inbound.access_log.write(r.status(resp.status().as_u16()).took(started.elapsed()).refused(refusal.reason()));
    }
    resp
}

async fn forward(
    inbound: &Inbound,
    conn: &ConnState,
    mut req: Request<Incoming>,
    request_id: &str,
    body_limit: Option<u64>,
) -> Response<ProxyBody> {
    let peer = &*conn.peer;
    if let Some(xfcc) = &conn.xfcc {
        req.headers_mut().insert(XFCC.clone(), xfcc.clone());
    }
    // Speak to the app what the calling app spoke: gRPC needs HTTP/2 end to end. Only a peer
    // sidecar says so, and only on HTTP/2 between sidecars (HTTP/1 callers ride HTTP/1.1);
    // every other `x-palisade-*` header stops here, whoever sent it.
    let scan = HeaderScan::of(req.headers());
    let orig = match scan.palisade() && peer.id.is_some() && req.version() == http::Version::HTTP_2 {
        true => req.headers().get(&super::outbound::ORIG_PROTO).cloned(),
        false => None,
    };
    if sanitize_scanned(&mut req, scan, &inbound.limits.allowed_upgrades) {
        return upgrade(inbound, peer, req, request_id).await;
    }
    let pace = inbound.limits.body_pace();
    let headers = req.headers_mut();
    strip_scanned(headers, scan);
    if !headers.contains_key(header::HOST)
        && let Some(auth) = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, auth);
    }
    let h2 = match orig.as_ref().and_then(|v| v.to_str().ok()) {
        Some(p) => p == "HTTP/2",
        None => req.version() == http::Version::HTTP_2,
    };
    let sent = if h2 {
        let Some(authority) = conn.app_authority.clone() else {
            return error_response(
                StatusCode::BAD_GATEWAY,
                &format!("app address {} is not usable", peer.app),
                request_id,
            );
        };
        let mut target = http::uri::Parts::default();
        target.scheme = Some(http::uri::Scheme::HTTP);
        target.authority = Some(authority);
        target.path_and_query =
            Some(req.uri().path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
        *req.uri_mut() = match Uri::from_parts(target) {
            Ok(u) => u,
            Err(_) => return error_response(StatusCode::BAD_REQUEST, "invalid request target", request_id),
        };
        *req.version_mut() = http::Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
        inbound.h2_client.request(req.map(|b| RequestBody::guarded(b, pace, body_limit))).await.map_err(BoxError::from)
    } else {
        if !req.headers().contains_key(header::HOST) {
            match HeaderValue::from_str(&peer.app.to_string()) {
                Ok(host) => req.headers_mut().insert(header::HOST, host),
                Err(_) => return error_response(StatusCode::BAD_REQUEST, "invalid request target", request_id),
            };
        }
        if req.uri().authority().is_some() || req.uri().scheme().is_some() {
            let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            *req.uri_mut() = Uri::from(pq);
        }
        *req.version_mut() = http::Version::HTTP_11;
        conn.sticky
            .send(&conn.app_pool, req.map(|b| RequestBody::guarded(b, pace, body_limit)))
            .await
            .map_err(BoxError::from)
    };
    match sent {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop_and_palisade(&mut parts.headers);
            Response::from_parts(parts, stream(body))
        }
        Err(e) if super::body::too_slow(&*e) => {
            error_response(StatusCode::REQUEST_TIMEOUT, "request body arrived too slowly", request_id)
        }
        Err(e) if super::body::too_large(&*e) => {
            let limit = body_limit.unwrap_or_default();
            error_response(StatusCode::PAYLOAD_TOO_LARGE, &format!("request body over {limit} bytes"), request_id)
        }
        Err(e) => {
            let reason = format!("app at {} unavailable: {}", peer.app, super::http::error_chain(&*e));
            tracing::warn!(%request_id, %reason, "inbound forward failed");
            error_response(StatusCode::BAD_GATEWAY, &reason, request_id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_the_first_snapshot_every_request_is_refused() {
        let roots = crate::identity::CaMaterial::generate("cluster.local", 1).unwrap().root_cert_pem;
        let view = super::super::view::MeshView::fail_closed(crate::tls::BundleState::from_pem(&roots).unwrap());
        let attrs = RequestAttributes {
            source: Some("spiffe://cluster.local/ns/a/sa/b".parse().unwrap()),
            source_ip: None,
            source_port: None,
            destination: "spiffe://cluster.local/ns/a/sa/c".parse().unwrap(),
            destination_port: 15006,
            method: "GET".into(),
            path: "/".into(),
            host: String::new(),
            scheme: "https".into(),
            protocol: "HTTP/1.1".into(),
            headers: BTreeMap::new(),
        };
        let decision = view.policies.decide(&Input::new(attrs));
        assert!(!decision.allowed);
        assert_eq!(denied_by(&decision), "no-policy-yet");
        assert_eq!(view.mode_for_port(15006), PeerAuthMode::Strict);
        // Nothing was decided: the caller is told to try again, not that policy denied it.
        let http = denial(&decision, "rid-1", false);
        assert_eq!(http.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http.headers()[header::RETRY_AFTER], "1");
        assert_eq!(http.headers()[&DENIED_BY], "no-policy-yet");
        assert!(http.headers().contains_key(&crate::proxy::http::PALISADE_ERROR));
        let grpc = denial(&decision, "rid-1", true);
        assert_eq!(grpc.status(), StatusCode::OK);
        assert_eq!(grpc.headers()["grpc-status"], "14", "UNAVAILABLE, not PERMISSION_DENIED");
    }

    #[test]
    fn a_connect_target_has_no_path_to_normalize() {
        let mut req = Request::connect("db.internal:5432").body(()).unwrap();
        normalize_path(&PathGuard::default(), &mut req).unwrap();
        assert_eq!(req.uri().authority().unwrap().as_str(), "db.internal:5432");
        let mut req = Request::get("/a//b/../c?q=1").body(()).unwrap();
        normalize_path(&PathGuard::default(), &mut req).unwrap();
        assert_eq!(req.uri(), "/a/c?q=1");
    }

    #[test]
    fn policy_sees_the_protocol_the_calling_app_spoke() {
        let req = |version, orig: Option<&'static str>| {
            let mut r = Request::builder().version(version);
            if let Some(o) = orig {
                r = r.header(&super::super::outbound::ORIG_PROTO, o);
            }
            r.body(()).unwrap()
        };
        // HTTP/1 callers travel on HTTP/1.1 between sidecars and name no protocol.
        assert_eq!(app_protocol(&req(http::Version::HTTP_11, None)), "HTTP/1.1");
        assert_eq!(app_protocol(&req(http::Version::HTTP_2, Some("HTTP/2"))), "HTTP/2.0");
        // An older peer sidecar carries HTTP/1.1 callers over HTTP/2 and says so.
        assert_eq!(app_protocol(&req(http::Version::HTTP_2, Some("HTTP/1.1"))), "HTTP/1.1");
        // A plaintext caller on a PERMISSIVE port: the protocol it spoke.
        assert_eq!(app_protocol(&req(http::Version::HTTP_10, None)), "HTTP/1.0");
    }
}
