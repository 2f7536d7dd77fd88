//! Outbound: take plaintext HTTP from the local app and carry it to a peer sidecar over pooled
//! mTLS connections, accepting only the peer identity the route names. HTTP/2 callers (gRPC)
//! are multiplexed over HTTP/2; HTTP/1 callers ride pooled HTTP/1.1 keep-alive connections,
//! which cost far less per request than HPACK and h2 framing.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::Either;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::body::RequestBody;
use super::detect::{Prefixed, Protocol, detect};
use super::h1_pool::{Dial, Pool, Sticky};
use super::http::{
    BoxError, ProxyBody, ensure_request_id, error_response, sanitize_request, stream, strip_hop_by_hop, strip_scanned,
};
use super::limits::{Drain, Limits, heed};
use crate::identity::SpiffeId;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::{ProxyMetrics, RequestMetrics};
use crate::tls::config::ALPN_HTTP1;

/// One explicit route: a local plaintext listener forwarding to one peer sidecar.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Route {
    pub listen: SocketAddr,
    pub target: String,
    pub identity: SpiffeId,
}

impl std::str::FromStr for Route {
    type Err = String;

    /// `LISTEN=TARGET@SPIFFE_ID`, e.g. `127.0.0.1:7001=127.0.0.1:15106@spiffe://cluster.local/ns/shop/sa/orders`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (listen, rest) =
            s.split_once('=').ok_or_else(|| format!("route {s:?}: expected LISTEN=TARGET@SPIFFE_ID"))?;
        let (target, id) =
            rest.split_once('@').ok_or_else(|| format!("route {s:?}: expected LISTEN=TARGET@SPIFFE_ID"))?;
        Ok(Route {
            listen: listen.parse().map_err(|e| format!("route {s:?}: listen address: {e}"))?,
            target: target.to_string(),
            identity: id.parse().map_err(|e| format!("route {s:?}: {e}"))?,
        })
    }
}

/// Dials a peer sidecar with mTLS; the handshake fails unless the peer proves the expected ID.
#[derive(Clone)]
pub struct MeshConnector {
    target: String,
    tls: TlsConnector,
    connect_timeout: Duration,
}

impl MeshConnector {
    /// A connector to `target` that pins the identity built into `tls`.
    pub fn new(target: String, tls: Arc<rustls::ClientConfig>, connect_timeout: Duration) -> Self {
        MeshConnector { target, tls: TlsConnector::from(tls), connect_timeout }
    }

    /// TCP to the target, then the mTLS handshake that must prove the pinned identity.
    async fn connect(&self) -> std::io::Result<MeshConn> {
        let tcp = super::tcp::connect(self.target.as_str(), self.connect_timeout).await?;
        let tls = self.tls.connect(crate::tls::config::sni(), tcp).await?;
        Ok(MeshConn(TokioIo::new(tls)))
    }
}

/// An mTLS connection to a peer sidecar.
pub struct MeshConn(TokioIo<TlsStream<TcpStream>>);

impl Connection for MeshConn {
    fn connected(&self) -> Connected {
        // The pool must know what ALPN chose: an `h2` connection is shared, an `http/1.1` one is not.
        if self.0.inner().get_ref().1.alpn_protocol() == Some(crate::tls::config::ALPN_H2) {
            Connected::new().negotiated_h2()
        } else {
            Connected::new()
        }
    }
}

impl hyper::rt::Read for MeshConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
}

impl tower_service::Service<Uri> for MeshConnector {
    type Response = MeshConn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = std::io::Result<MeshConn>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.connect().await })
    }
}

impl Dial for MeshConnector {
    type Io = MeshConn;
    fn dial(&self) -> impl std::future::Future<Output = std::io::Result<MeshConn>> + Send {
        self.connect()
    }
}

/// The pooled upstream clients of one route.
struct Pools {
    /// HTTP/2 (ALPN `h2`): every HTTP/2 request of the route multiplexed over few connections.
    h2: Client<MeshConnector, RequestBody>,
    /// HTTP/1.1 keep-alive (ALPN `http/1.1`): one request at a time per connection, each app
    /// connection keeping one between its requests.
    h1: Arc<Pool<MeshConnector>>,
}

/// State of one route's listener.
pub struct Outbound {
    pub route: Route,
    /// Replaced (dropping its pooled connections) whenever revocations change, so a revoked
    /// server is re-judged by a fresh handshake.
    pools: arc_swap::ArcSwap<Pools>,
    tls: Arc<rustls::ClientConfig>,
    /// mTLS for opaque TCP: same identity pinning, ALPN `palisade-tcp`.
    tcp_tls: Arc<rustls::ClientConfig>,
    /// mTLS for HTTP/1.1, upgrades and CONNECT: same identity pinning, ALPN `http/1.1`.
    h1_tls: Arc<rustls::ClientConfig>,
    /// `Host` for an HTTP/1.1 request that has none (HTTP/1.0 callers): the target. `None` if
    /// the target is not valid header text.
    h1_host: Option<HeaderValue>,
    pub metrics: Arc<ProxyMetrics>,
    /// The route's request metrics, resolved once.
    requests: RequestMetrics,
    pub limits: Limits,
    pub drain: Arc<Drain>,
    pub access_log: AccessLog,
}

/// Header carrying the protocol the calling app spoke, so the destination sidecar can speak the
/// same to its app. Sent on HTTP/2 between sidecars; on HTTP/1.1 the transport says it.
pub static ORIG_PROTO: http::HeaderName = http::HeaderName::from_static("x-palisade-orig-proto");

impl Outbound {
    /// Pooled mTLS clients for the route: HTTP/2 for HTTP/2 callers, HTTP/1.1 for the rest.
    pub fn new(route: Route, dp: &super::DataPlane) -> Self {
        let client = |alpn: &[u8]| {
            let trust = dp.view.clone();
            crate::tls::config::client_config(dp.certs.clone(), trust, Some(route.identity.clone()), &[alpn])
        };
        let (tls, tcp_tls) = (client(crate::tls::config::ALPN_H2), client(crate::tls::config::ALPN_TCP));
        let (metrics, limits, drain, access_log) =
            (dp.metrics.clone(), dp.limits.clone(), dp.drain.clone(), dp.access_log.clone());
        // Same verifier and certificate as the HTTP/2 config; only ALPN differs.
        let mut h1 = (*tls).clone();
        h1.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
        let h1_tls = Arc::new(h1);
        let pools = arc_swap::ArcSwap::from_pointee(Self::pools(&route, &tls, &h1_tls, &limits));
        let h1_host = HeaderValue::from_str(&route.target).ok();
        let requests = metrics.requests_for("outbound", route.identity.as_str());
        Outbound { route, pools, tls, tcp_tls, h1_tls, h1_host, metrics, requests, limits, drain, access_log }
    }

    fn pools(
        route: &Route,
        tls: &Arc<rustls::ClientConfig>,
        h1_tls: &Arc<rustls::ClientConfig>,
        limits: &Limits,
    ) -> Pools {
        let connector = |tls: &Arc<rustls::ClientConfig>| {
            MeshConnector::new(route.target.clone(), tls.clone(), limits.connect_timeout)
        };
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .build(connector(tls));
        // The peer sidecar closes an HTTP/1.1 connection that stays idle for its header-read
        // timeout (hyper's idle and slowloris limit are one). Give pooled connections up well
        // before, so a request is never written into a connection the peer is closing.
        let h1_idle = (limits.header_read_timeout / 2).clamp(Duration::from_millis(500), Duration::from_secs(90));
        Pools { h2, h1: Pool::new(connector(h1_tls), h1_idle) }
    }

    /// Drops every pooled connection; the next request handshakes afresh.
    pub fn reset_pool(&self) {
        let old = self.pools.swap(Arc::new(Self::pools(&self.route, &self.tls, &self.h1_tls, &self.limits)));
        // Connections app connections still hold go back to the old pool, which closes them.
        old.h1.retire();
    }
}

/// Serves the route's plaintext listener until draining starts.
pub async fn serve(listener: TcpListener, outbound: Arc<Outbound>) {
    let (drain, metrics) = (outbound.drain.clone(), outbound.metrics.clone());
    super::limits::accept_loop(listener, drain, metrics, "outbound", move |tcp, remote| {
        let outbound = outbound.clone();
        async move { connection(&outbound, tcp, remote, outbound.route.listen.port()).await }
    })
    .await
}

/// What an app-facing listener forwards to: one peer sidecar (a route, [`Outbound`]) or a
/// service balanced across its endpoints (`super::service_route`).
pub trait Upstream: Send + Sync + 'static {
    /// What one app connection keeps between its requests (its HTTP/1.1 upstream connections).
    type Conn: Default + Send + Sync + 'static;
    fn limits(&self) -> &Limits;
    fn drain(&self) -> &Arc<Drain>;
    /// Carries an opaque TCP stream (after `prefix`, the bytes detection read).
    fn tunnel(
        self: &Arc<Self>,
        tcp: TcpStream,
        prefix: bytes::BytesMut,
        remote: SocketAddr,
    ) -> impl std::future::Future<Output = ()> + Send;
    /// Carries one HTTP request.
    fn request(
        self: &Arc<Self>,
        conn: &Self::Conn,
        req: Request<Incoming>,
    ) -> impl std::future::Future<Output = Response<ProxyBody>> + Send;
}

impl Upstream for Outbound {
    type Conn = Sticky<MeshConnector>;
    fn limits(&self) -> &Limits {
        &self.limits
    }
    fn drain(&self) -> &Arc<Drain> {
        &self.drain
    }
    fn tunnel(
        self: &Arc<Self>,
        tcp: TcpStream,
        prefix: bytes::BytesMut,
        remote: SocketAddr,
    ) -> impl std::future::Future<Output = ()> + Send {
        tunnel(self, tcp, prefix, remote)
    }
    fn request(
        self: &Arc<Self>,
        sticky: &Sticky<MeshConnector>,
        req: Request<Incoming>,
    ) -> impl std::future::Future<Output = Response<ProxyBody>> + Send {
        handle(self, sticky, req, Instant::now())
    }
}

/// Serves one app connection: HTTP over the pooled upstream, anything else tunnelled.
pub async fn connection<U: Upstream>(out: &Arc<U>, mut tcp: TcpStream, remote: SocketAddr, port: u16) {
    let limits = out.limits();
    if limits.opaque_ports.contains(&port) {
        return out.tunnel(tcp, bytes::BytesMut::new(), remote).await;
    }
    let (protocol, prefix) = match detect(&mut tcp, limits.detect_timeout).await {
        Ok(found) => found,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "outbound connection failed during detection");
            return;
        }
    };
    if protocol == Protocol::Opaque {
        return out.tunnel(tcp, prefix, remote).await;
    }
    let io = TokioIo::new(Prefixed::new(prefix.freeze(), tcp));
    let svc = {
        let (out, held) = (out.clone(), Arc::new(U::Conn::default()));
        hyper::service::service_fn(move |req| {
            let (out, held) = (out.clone(), held.clone());
            async move { Ok::<_, std::convert::Infallible>(out.request(&held, req).await) }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let stop = out.drain().signaled();
    tokio::pin!(stop);
    match heed(conn.as_mut(), stop.as_mut()).await {
        Either::Left(res) => {
            if let Err(e) = res {
                tracing::debug!(%remote, error = %e, "outbound connection ended with error");
            }
        }
        Either::Right(()) => {
            // Finish the requests in flight, then close; idle keep-alive connections close now.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Carries an opaque TCP stream to the peer sidecar over mTLS (ALPN `palisade-tcp`).
pub(super) async fn tunnel(out: &Outbound, mut tcp: TcpStream, prefix: bytes::BytesMut, remote: SocketAddr) {
    let started = Instant::now();
    let connector = MeshConnector::new(out.route.target.clone(), out.tcp_tls.clone(), out.limits.connect_timeout);
    let mut upstream = match connector.connect().await {
        Ok(MeshConn(io)) => io.into_inner(),
        Err(e) => {
            if let Some(reason) = tls_failure(&e) {
                out.metrics.handshake_failure("outbound", reason);
            }
            tracing::warn!(%remote, target = %out.route.target, error = %e, "opaque TCP: upstream unavailable");
            return;
        }
    };
    use tokio::io::AsyncWriteExt;
    if !prefix.is_empty() && upstream.write_all(&prefix).await.is_err() {
        return;
    }
    let (sent, received) = super::tcp::splice(&mut tcp, &mut upstream, out.limits.idle_timeout).await;
    let sent = sent + prefix.len() as u64;
    out.metrics.record_tcp_bytes("outbound", sent, received);
    out.requests.peer().record(200, false);
    if let Some(r) = out.access_log.access("outbound") {
        let r = r.tcp().peer(out.requests.peer_label().clone());
        out.access_log.write(r.bytes(sent, received).took(started.elapsed()));
    }
}

/// Sends the app's request `req`, which arrived at `started`, over the route's pools.
pub(super) async fn handle(
    out: &Outbound,
    sticky: &Sticky<MeshConnector>,
    mut req: Request<Incoming>,
    started: Instant,
) -> Response<ProxyBody> {
    let request_id = ensure_request_id(req.headers_mut());
    // Only sidecars set `x-palisade-*` headers; the app's own never travel.
    let (scan, upgrade) = sanitize_request(&mut req, &out.limits.allowed_upgrades);
    if upgrade {
        // WebSocket or CONNECT: a dedicated HTTP/1.1 mTLS connection (the HTTP/2 pool cannot
        // carry an upgrade), then raw bytes both ways.
        let connector = MeshConnector::new(out.route.target.clone(), out.h1_tls.clone(), out.limits.connect_timeout);
        let resp = match connector.connect().await {
            Ok(conn) => match super::http::forward_upgrade(req, conn, out.limits.idle_timeout).await {
                Ok(resp) => resp,
                Err(e) => error_response(StatusCode::BAD_GATEWAY, &e, &request_id),
            },
            Err(e) => error_response(StatusCode::BAD_GATEWAY, &super::http::error_chain(&e), &request_id),
        };
        out.requests.record(resp.status(), started);
        return resp;
    }
    let req = req.map(|b| RequestBody::paced(b, out.limits.body_pace()));
    send(out, sticky, req, scan, request_id, started).await
}

/// A bodiless request sent again (a retry, on another endpoint): what [`handle`] does, but
/// never an upgrade (the caller retries no upgrade).
pub(super) async fn handle_again(
    out: &Outbound,
    sticky: &Sticky<MeshConnector>,
    mut req: Request<RequestBody>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let request_id = ensure_request_id(req.headers_mut());
    let (scan, _) = sanitize_request(&mut req, &[]);
    send(out, sticky, req, scan, request_id, started).await
}

/// Sends a sanitized request over the route's pools and records it.
async fn send(
    out: &Outbound,
    sticky: &Sticky<MeshConnector>,
    mut req: Request<RequestBody>,
    scan: super::http::HeaderScan,
    request_id: super::http::RequestId,
    started: Instant,
) -> Response<ProxyBody> {
    strip_scanned(req.headers_mut(), scan);
    let h2 = req.version() == http::Version::HTTP_2;
    let prepared = if h2 { to_h2(out, &mut req) } else { to_h1(out, &mut req) };
    if let Err(reason) = prepared {
        return error_response(StatusCode::BAD_REQUEST, reason, &request_id);
    }
    // The request line is copied now, before the request moves on, and only if the log is on.
    let record = out
        .access_log
        .access("outbound")
        .map(|r| r.peer(out.requests.peer_label().clone()).request(req.method(), req.uri().path(), &request_id));
    let pools = out.pools.load_full();
    let sent = if h2 {
        pools.h2.request(req).await.map_err(BoxError::from)
    } else {
        sticky.send(&pools.h1, req).await.map_err(BoxError::from)
    };
    let resp = match sent {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, stream(body))
        }
        Err(e) if super::body::too_slow(&*e) => {
            error_response(StatusCode::REQUEST_TIMEOUT, "request body arrived too slowly", &request_id)
        }
        Err(e) => {
            if let Some(tls_reason) = tls_failure(&*e) {
                out.metrics.handshake_failure("outbound", tls_reason);
                out.metrics.peers.handshake_failure(out.route.identity.as_str(), "outbound");
            }
            let reason =
                format!("upstream {} ({}): {}", out.route.target, out.route.identity, super::http::error_chain(&*e));
            tracing::warn!(%request_id, %reason, "outbound request failed");
            error_response(StatusCode::BAD_GATEWAY, &reason, &request_id)
        }
    };
    out.requests.record(resp.status(), started);
    out.requests.peer().record(resp.status().as_u16(), resp.status() == StatusCode::FORBIDDEN);
    if let Some(r) = record {
        out.access_log.write(r.status(resp.status().as_u16()).took(started.elapsed()));
    }
    resp
}

/// Readies a request for the HTTP/2 pool: the authority moves from `Host` into the URI (HTTP/2
/// carries it in `:authority`), and the app's protocol goes along in [`ORIG_PROTO`].
fn to_h2<B>(out: &Outbound, req: &mut Request<B>) -> Result<(), &'static str> {
    req.headers_mut().insert(ORIG_PROTO.clone(), HeaderValue::from_static("HTTP/2"));
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_else(|| out.route.target.clone());
    req.headers_mut().remove(header::HOST);
    let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    *req.uri_mut() = format!("http://{authority}{pq}").parse().map_err(|_| "invalid Host or request target")?;
    *req.version_mut() = http::Version::HTTP_2;
    Ok(())
}

/// Readies a request for the HTTP/1.1 connection: `Host` stays the app's (else an absolute-form
/// target's authority, else the peer's address) and the target goes in origin form.
fn to_h1<B>(out: &Outbound, req: &mut Request<B>) -> Result<(), &'static str> {
    if !req.headers().contains_key(header::HOST) {
        let host = match req.uri().authority() {
            Some(a) => HeaderValue::from_str(a.as_str()).map_err(|_| "invalid request target")?,
            None => out.h1_host.clone().ok_or("invalid upstream address")?,
        };
        req.headers_mut().insert(header::HOST, host);
    }
    if req.uri().authority().is_some() || req.uri().scheme().is_some() {
        let pq = req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
    }
    // HTTP/1.0 callers too: the hop between sidecars stays keep-alive.
    *req.version_mut() = http::Version::HTTP_11;
    Ok(())
}

/// The reason label of a TLS handshake failure somewhere in `e`'s source chain, if any.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.get_ref().is_some_and(|i| i.is::<rustls::Error>())
        {
            return Some(crate::tls::handshake_failure_reason(io));
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_route() {
        let r: Route = "127.0.0.1:7001=127.0.0.1:15106@spiffe://cluster.local/ns/shop/sa/orders".parse().unwrap();
        assert_eq!(r.listen, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(r.target, "127.0.0.1:15106");
        assert_eq!(r.identity.as_str(), "spiffe://cluster.local/ns/shop/sa/orders");
        assert!("127.0.0.1:7001=127.0.0.1:15106".parse::<Route>().is_err());
        assert!("127.0.0.1:7001=x@http://nope".parse::<Route>().is_err());
    }
}
