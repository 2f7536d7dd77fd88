//! A tiny HTTP/1.1 server for admin endpoints (`/ready`, `/metrics`, ...).
//!
//! It runs on its own listener, thread and single-threaded runtime
//! ([`spawn_on_own_runtime`]), so a scrape never queues behind data-path work and a busy data
//! path never delays `/ready`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::listener::{Listener, ListenerLimits};

/// An admin request as the handler sees it.
pub struct AdminRequest {
    pub method: Method,
    pub path: String,
    pub peer: SocketAddr,
}

/// Body type of admin responses.
pub type AdminResponse = Response<Full<Bytes>>;

/// A response with a status and a body.
pub fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> AdminResponse {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static parts are valid")
}

/// A JSON response.
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> AdminResponse {
    respond(status, "application/json", serde_json::to_vec_pretty(value).unwrap_or_default())
}

/// Most connections an admin port holds at once: probes and scrapes need a handful, and a
/// flood of idle connections must not take the descriptors the data path needs.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves `handler` on `listener` until the task is dropped, under the admin port's limits
/// ([`crate::listener`]: `PALISADE_ADMIN_MAX_CONNECTIONS`, `PALISADE_HEADER_TIMEOUT`,
/// `PALISADE_IDLE_TIMEOUT`).
pub async fn serve<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(AdminRequest) -> F + Send + Sync + 'static,
    F: Future<Output = AdminResponse> + Send + 'static,
{
    let limits = ListenerLimits::from_env("admin", MAX_CONNECTIONS);
    let limits = limits.per_source((limits.max_connections / 4).max(1));
    let listener = Listener::new(listener, "admin", limits);
    serve_limited(listener, handler).await
}

/// [`serve`] on a listener whose limits the caller chose.
pub async fn serve_limited<H, F>(listener: Listener, handler: H)
where
    H: Fn(AdminRequest) -> F + Send + Sync + 'static,
    F: Future<Output = AdminResponse> + Send + 'static,
{
    let handler = Arc::new(handler);
    let header_timeout = listener.limits.header_timeout;
    loop {
        let (stream, peer, admitted) = listener.accept().await;
        let stream = listener.deadline(stream, admitted);
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let fut =
                    handler(AdminRequest { method: req.method().clone(), path: req.uri().path().to_string(), peer });
                async move { Ok::<_, Infallible>(fut.await) }
            });
            // The header-read timeout runs from the moment hyper waits for a request head, so it
            // also ends keep-alive connections left idle between requests.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Runs [`serve`] on a dedicated thread with its own current-thread runtime. Handlers may use
/// tokio (timers, `spawn_blocking`) as usual; what they share with the data path must be
/// `Send + Sync` (snapshots behind `ArcSwap`, atomics).
pub fn spawn_on_own_runtime<H, F>(listener: TcpListener, handler: H) -> std::io::Result<()>
where
    H: Fn(AdminRequest) -> F + Send + Sync + 'static,
    F: Future<Output = AdminResponse> + Send + 'static,
{
    // A tokio listener is tied to the runtime that made it; move the socket itself across.
    let listener = listener.into_std()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("palisade-admin".into()).spawn(move || {
        runtime.block_on(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, handler).await,
                Err(e) => tracing::error!(error = %e, "admin listener unusable; admin endpoints are down"),
            }
        })
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use super::*;

    #[test]
    fn admin_answers_while_the_runtime_that_started_it_is_stalled() {
        let data_path = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let addr = data_path.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            spawn_on_own_runtime(listener, |_| async { respond(StatusCode::OK, "text/plain", "ready\n") }).unwrap();
            addr
        });
        // Occupy the data-path runtime's only thread with a blocking call: anything scheduled
        // on it could not run until the call returns, so only another runtime can answer.
        let reply = data_path.block_on(async move {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        });
        assert!(reply.starts_with("HTTP/1.1 200"), "admin stalled with the data path: {reply:?}");
    }
}
