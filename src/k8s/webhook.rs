//! The sidecar-injection webhook: HTTPS with a certificate from the mesh CA, the same injector
//! `palisade inject` runs on files, and a keeper that writes the mesh root into the
//! MutatingWebhookConfiguration's `caBundle` so the API server trusts the webhook.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use rustls::ServerConfig;
use rustls::server::NoServerSessionStorage;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::inject::{InjectConfig, admission_review};
use crate::listener::{Listener, ListenerLimits};
use crate::tls::CertStore;

/// The API server sends at most a few MiB per review; refuse anything larger.
const MAX_REVIEW_BYTES: usize = 8 << 20;
/// The API server gives a webhook at most 30 s; a body trickled slower is not from it.
const REVIEW_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections the webhook holds at once (the API servers keep a few each).
const MAX_CONNECTIONS: usize = 256;

/// TLS for the webhook: server-authenticated only (the API server presents no client
/// certificate), TLS 1.2 and 1.3 (the API server speaks both), HTTP/1.1.
fn tls_config(certs: Arc<CertStore>) -> Arc<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// The mesh's current trust roots (PEM).
pub type Roots = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `POST /inject` on `listener` until the task is dropped. Injected sidecars get
/// `config` with the roots of the moment.
pub async fn serve(
    listener: TcpListener,
    certs: Arc<CertStore>,
    client: kube::Client,
    config: InjectConfig,
    roots: Roots,
) {
    let limits = ListenerLimits::from_env("webhook", MAX_CONNECTIONS);
    let limits = limits.per_source((limits.max_connections / 4).max(1));
    let listener = Listener::new(listener, "webhook", limits);
    serve_limited(listener, certs, client, config, roots).await
}

/// [`serve`] on a listener whose limits the caller chose.
pub async fn serve_limited(
    listener: Listener,
    certs: Arc<CertStore>,
    client: kube::Client,
    config: InjectConfig,
    roots: Roots,
) {
    let config = Arc::new(config);
    let acceptor = TlsAcceptor::from(tls_config(certs));
    let namespaces: Api<Namespace> = Api::all(client);
    let header_timeout = listener.limits.header_timeout;
    loop {
        let (tcp, peer, admitted) = listener.accept().await;
        let tcp = listener.deadline(tcp, admitted);
        let (acceptor, namespaces, config, roots) =
            (acceptor.clone(), namespaces.clone(), config.clone(), roots.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::info!(%peer, error = %e, "webhook TLS handshake refused"),
                Err(_) => return tracing::info!(%peer, "webhook TLS handshake timed out"),
            };
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (namespaces, config) =
                    (namespaces.clone(), InjectConfig { ca_bundle_pem: roots(), ..(*config).clone() });
                async move { Ok::<_, Infallible>(handle(req, &namespaces, &config).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static parts are valid")
}

async fn handle(
    req: http::Request<hyper::body::Incoming>,
    namespaces: &Api<Namespace>,
    config: &InjectConfig,
) -> Response<Full<Bytes>> {
    if req.method() != Method::POST || req.uri().path() != "/inject" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "POST /inject only\n");
    }
    let body = match tokio::time::timeout(
        REVIEW_BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_REVIEW_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => return reply(StatusCode::PAYLOAD_TOO_LARGE, "text/plain", format!("request body: {e}\n")),
        Err(_) => return reply(StatusCode::REQUEST_TIMEOUT, "text/plain", "request body too slow\n"),
    };
    // The namespace's labels decide injection; they are not part of the review.
    let namespace = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.pointer("/request/namespace").and_then(|n| n.as_str()).map(str::to_string));
    let labels: BTreeMap<String, String> = match namespace {
        Some(ns) => match namespaces.get_opt(&ns).await {
            Ok(found) => found.and_then(|n| n.metadata.labels).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(namespace = %ns, error = %e, "cannot read namespace labels for injection");
                return reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("namespace {ns}: {e}\n"));
            }
        },
        None => BTreeMap::new(),
    };
    let out = admission_review(&body, &labels, config);
    reply(StatusCode::OK, "application/json", out)
}

/// Keeps the `caBundle` of every webhook in the configuration `name` equal to `roots()`: at
/// start, within a second of the roots changing, and whenever the configuration is created or
/// changed under it (a `kubectl replace`, a re-install, another tool dropping the field), which
/// it learns from a watch on that one object. Runs until dropped.
pub async fn keep_ca_bundle(client: kube::Client, name: String, roots: Roots) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let one = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut changes = std::pin::pin!(watcher(api, one).default_backoff().applied_objects());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut written, mut pending) = (String::new(), true);
    let mut retry = (tokio::time::Instant::now(), Duration::from_millis(500));
    loop {
        tokio::select! {
            change = changes.next() => match change {
                Some(Ok(config)) => pending |= !bundle_is(&config, &roots()),
                Some(Err(e)) => tracing::warn!(error = %e, config = %name, "watching the webhook configuration"),
                None => return,
            },
            _ = tick.tick() => {}
        }
        let pem = roots();
        pending |= pem != written;
        if !pending || tokio::time::Instant::now() < retry.0 {
            continue;
        }
        match sync_ca_bundle(&client, &name, &pem).await {
            // Absent: not applied yet, and the watch reports its creation.
            Ok(_) => (written, pending, retry.1) = (pem, false, Duration::from_millis(500)),
            // Another replica wrote it first: the watch brings its version to compare.
            Err(kube::Error::Api(e)) if e.code == 409 => (written, pending) = (pem, false),
            Err(e) => {
                tracing::warn!(error = %e, config = %name, retry_in = ?retry.1, "cannot update the webhook caBundle");
                retry = (tokio::time::Instant::now() + retry.1, (retry.1 * 2).min(Duration::from_secs(30)));
            }
        }
    }
}

fn bundle_is(config: &MutatingWebhookConfiguration, pem: &str) -> bool {
    config
        .webhooks
        .iter()
        .flatten()
        .all(|h| h.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) == Some(pem.as_bytes()))
}

/// Sets the `caBundle` of every webhook in the named configuration to the mesh roots.
/// Returns whether it changed anything, or `None` when the configuration does not exist (not
/// an error: the control plane may run before it is applied).
pub async fn sync_ca_bundle(client: &kube::Client, name: &str, bundle_pem: &str) -> Result<Option<bool>, kube::Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(mut mwc) = api.get_opt(name).await? else { return Ok(None) };
    let want = k8s_openapi::ByteString(bundle_pem.as_bytes().to_vec());
    let mut changed = false;
    for hook in mwc.webhooks.iter_mut().flatten() {
        if hook.client_config.ca_bundle.as_ref() != Some(&want) {
            hook.client_config.ca_bundle = Some(want.clone());
            changed = true;
        }
    }
    if changed {
        api.replace(name, &PostParams::default(), &mwc).await?;
        tracing::info!(name, "webhook caBundle updated to the mesh roots");
    }
    Ok(Some(changed))
}

/// The PEM as the base64 a `caBundle` field shows in YAML (for logs and tests).
pub fn ca_bundle_base64(bundle_pem: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(bundle_pem)
}
