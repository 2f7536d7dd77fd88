//! A tiny HTTP/1.1 server for admin endpoints (`/ready`, `/metrics`, ...).
//!
//! It runs on its own listener and tasks so a scrape never queues behind data-path work.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

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

/// Serves `handler` on `listener` until the task is dropped.
pub async fn serve<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(AdminRequest) -> F + Send + Sync + 'static,
    F: Future<Output = AdminResponse> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let fut =
                    handler(AdminRequest { method: req.method().clone(), path: req.uri().path().to_string(), peer });
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
