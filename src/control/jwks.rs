//! The JWKS worker: the control plane fetches every `jwksUri` of the `RequestAuthentication`
//! resources in force, and sidecars get the keys with their snapshot. Sidecars never call an
//! issuer: one fetcher per control plane instead of one per pod, and no sidecar needs a route
//! to the internet or an issuer's CA.
//!
//! - HTTPS only, trusting the system's roots and those of `--jwks-ca`; HTTP/1.1, no redirects,
//!   [`FETCH_TIMEOUT`] for the whole exchange and [`MAX_JWKS_BYTES`] for the body.
//! - A document is taken only if it holds a usable signing key ([`check_jwks`]); otherwise,
//!   and when a fetch fails, the last good document stays in force and the fetch is retried
//!   with backoff (1 s doubling, capped at the refresh interval).
//! - Every document is fetched again each `--jwks-refresh` (default 5 min), so a key rotation
//!   at the issuer (a new `kid`) reaches sidecars within one interval without any restart; a
//!   new `jwksUri` is fetched as soon as its resource arrives.
//! - A sidecar that refused a token naming an unknown `kid` says so in its telemetry report
//!   ([`JwksRefetch`]); every `jwksUri` of that issuer's rules is then fetched at once, at most
//!   once per [`REFETCH_WINDOW`] per uri ([`RefetchLimiter`]; a hint inside the window is
//!   ignored), so a rotation reaches sidecars in seconds and bad tokens cannot make the
//!   control plane hammer an issuer.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::sync::Notify;

use super::discovery::MeshState;
use crate::guard::jwt::check_jwks;

/// Time allowed for one fetch: connect, TLS, request and the whole body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document taken.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Fetches a hint asks for: at most one per `jwksUri` in this window.
pub const REFETCH_WINDOW: Duration = Duration::from_secs(30);
/// Issuers waiting for the worker, at most (more are dropped until it has drained them).
const MAX_WANTED: usize = 64;
/// Hint-driven fetches remembered per uri, at most (the uris are the mesh's own).
const MAX_LIMITED: usize = 1024;

/// Unknown-`kid` hints from sidecars' reports, waiting for the JWKS worker.
#[derive(Default)]
pub struct JwksRefetch {
    issuers: Mutex<std::collections::BTreeSet<String>>,
    wanted: Notify,
}

impl JwksRefetch {
    /// Asks for the keys of `issuer` to be fetched again (bounded; the worker rate-limits).
    pub fn request(&self, issuer: &str) {
        let mut issuers = self.issuers.lock();
        if issuers.len() >= MAX_WANTED || !issuers.insert(issuer.to_string()) {
            return;
        }
        drop(issuers);
        self.wanted.notify_one();
    }

    fn take(&self) -> std::collections::BTreeSet<String> {
        std::mem::take(&mut *self.issuers.lock())
    }
}

/// When each `jwksUri` was last fetched because of a hint.
#[derive(Default)]
pub struct RefetchLimiter {
    last: HashMap<String, Instant>,
}

impl RefetchLimiter {
    /// Whether a hint for `uri` at `now` may fetch it (and, if so, counts that fetch).
    pub fn allow(&mut self, uri: &str, now: Instant) -> bool {
        if self.last.get(uri).is_some_and(|at| now.saturating_duration_since(*at) < REFETCH_WINDOW) {
            return false;
        }
        self.last.retain(|_, at| now.saturating_duration_since(*at) < REFETCH_WINDOW);
        if self.last.len() >= MAX_LIMITED {
            return false;
        }
        self.last.insert(uri.to_string(), now);
        true
    }
}

/// Why a fetch did not produce a usable document.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("not an https:// URL with a host")]
    Url,
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("status {0}")]
    Status(StatusCode),
    #[error("body: {0} (at most {MAX_JWKS_BYTES} bytes are read)")]
    Body(String),
    #[error("timed out after {FETCH_TIMEOUT:?}")]
    Timeout,
    #[error("not a usable JWKS: {0}")]
    Document(String),
}

/// What the worker knows about one `jwksUri`, for `/v1/jwks`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct JwksStatus {
    /// Usable keys in the document in force (0: none yet).
    pub keys: usize,
    /// When the document in force was fetched (Unix seconds).
    pub fetched_at: Option<i64>,
    /// Why the last fetch failed, if it did (the document in force, if any, is older).
    pub last_error: Option<String>,
}

/// The worker's state, shared with the admin API.
pub type JwksStatuses = Arc<Mutex<BTreeMap<String, JwksStatus>>>;

/// The JWKS worker's inputs.
pub struct JwksInputs {
    pub mesh: Arc<MeshState>,
    /// How often a document in force is fetched again.
    pub refresh: Duration,
    pub tls: Arc<ClientConfig>,
    pub status: JwksStatuses,
    /// Unknown-`kid` hints from sidecars.
    pub refetch: Arc<JwksRefetch>,
    pub metrics: Arc<super::metrics::ControlMetrics>,
}

/// The TLS client of JWKS fetches: the system's roots (where the platform has them) and every
/// certificate of the `extra` PEM files.
pub fn client_config(extra: &[PathBuf]) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    for file in extra {
        let pem = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("--jwks-ca {}: {e}", file.display()))?;
        let certs =
            crate::tls::certs_from_pem(&pem).map_err(|e| anyhow::anyhow!("--jwks-ca {}: {e}", file.display()))?;
        for cert in certs {
            roots.add(cert).map_err(|e| anyhow::anyhow!("--jwks-ca {}: {e}", file.display()))?;
        }
    }
    if roots.is_empty() {
        tracing::warn!(
            "no trusted roots for jwksUri fetches (no system roots found, no --jwks-ca): every fetch will fail"
        );
    } else {
        tracing::debug!(system_roots = added, extra_files = extra.len(), "roots for jwksUri fetches");
    }
    let mut config = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// When each `jwksUri` is due, and how often it has failed in a row.
struct Schedule {
    due: Instant,
    failures: u32,
}

/// Fetches every `jwksUri` in force when it is due, forever. Spawn once.
pub async fn run(inputs: JwksInputs) {
    let mut changes = inputs.mesh.changes();
    let mut schedule: HashMap<String, Schedule> = HashMap::new();
    let mut limiter = RefetchLimiter::default();
    loop {
        let uris = inputs.mesh.jwks_uris();
        schedule.retain(|uri, _| uris.contains(uri));
        for issuer in inputs.refetch.take() {
            for uri in inputs.mesh.jwks_uris_of(&issuer) {
                if limiter.allow(&uri, Instant::now()) {
                    tracing::info!(%uri, %issuer, "a sidecar saw an unknown kid: fetching the JWKS now");
                    schedule.entry(uri).or_insert(Schedule { due: Instant::now(), failures: 0 }).due = Instant::now();
                } else {
                    tracing::debug!(%uri, %issuer, window = ?REFETCH_WINDOW, "unknown-kid hint inside the window: ignored");
                }
            }
        }
        inputs.status.lock().retain(|uri, _| uris.contains(uri));
        let mut documents = BTreeMap::clone(&inputs.mesh.jwks());
        documents.retain(|uri, _| uris.contains(uri));
        let now = Instant::now();
        for uri in &uris {
            let entry = schedule.entry(uri.clone()).or_insert(Schedule { due: now, failures: 0 });
            if entry.due > now {
                continue;
            }
            let fetched = fetch(uri, &inputs.tls).await;
            inputs.metrics.jwks_fetch(fetched.is_ok());
            match fetched {
                Ok((doc, keys)) => {
                    tracing::info!(%uri, keys, "JWKS fetched");
                    documents.insert(uri.clone(), Arc::from(doc));
                    inputs.status.lock().insert(
                        uri.clone(),
                        JwksStatus { keys, fetched_at: Some(crate::clock::now_unix()), last_error: None },
                    );
                    *entry = Schedule { due: Instant::now() + inputs.refresh, failures: 0 };
                }
                Err(e) => {
                    entry.failures += 1;
                    let retry = Duration::from_secs(1 << entry.failures.min(16)).min(inputs.refresh);
                    entry.due = Instant::now() + retry;
                    let kept = documents.contains_key(uri);
                    tracing::warn!(%uri, error = %e, ?retry, kept_last_good = kept, "JWKS fetch failed");
                    inputs.status.lock().entry(uri.clone()).or_default().last_error = Some(e.to_string());
                }
            }
        }
        inputs.mesh.set_jwks(documents);
        let next = schedule.values().map(|s| s.due).min();
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = inputs.refetch.wanted.notified() => {}
            _ = sleep_until(next) => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// One fetch: the document and how many usable keys it holds.
pub async fn fetch(uri: &str, tls: &Arc<ClientConfig>) -> Result<(String, usize), FetchError> {
    let doc = tokio::time::timeout(FETCH_TIMEOUT, get(uri, tls)).await.map_err(|_| FetchError::Timeout)??;
    let keys = check_jwks(&doc).map_err(FetchError::Document)?;
    Ok((doc, keys))
}

async fn get(uri: &str, tls: &Arc<ClientConfig>) -> Result<String, FetchError> {
    let parsed: Uri = uri.parse().map_err(|_| FetchError::Url)?;
    let (Some("https"), Some(authority)) = (parsed.scheme_str(), parsed.authority()) else {
        return Err(FetchError::Url);
    };
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(443);
    let name = ServerName::try_from(host.to_string()).map_err(|_| FetchError::Url)?;
    let tcp = tokio::net::TcpStream::connect((host, port)).await.map_err(FetchError::Connect)?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await.map_err(FetchError::Tls)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = parsed.path_and_query().map_or("/", |p| p.as_str());
    let req = Request::get(path)
        .header(header::HOST, authority.as_str())
        .header(header::ACCEPT, "application/jwk-set+json, application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|_| FetchError::Url)?;
    let resp = sender.send_request(req).await?;
    if resp.status() != StatusCode::OK {
        return Err(FetchError::Status(resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| FetchError::Body(e.to_string()))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| FetchError::Body("not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_is_fetched_for_hints_at_most_once_per_window() {
        let mut limiter = RefetchLimiter::default();
        let t0 = Instant::now();
        let uri = "https://issuer.example/jwks";
        assert!(limiter.allow(uri, t0));
        for s in [0, 1, 10, 29] {
            assert!(!limiter.allow(uri, t0 + Duration::from_secs(s)), "hint {s}s after a fetch");
        }
        // Another uri has its own window.
        assert!(limiter.allow("https://other.example/jwks", t0 + Duration::from_secs(1)));
        assert!(limiter.allow(uri, t0 + REFETCH_WINDOW));
        assert!(!limiter.allow(uri, t0 + REFETCH_WINDOW + Duration::from_secs(1)));
    }

    #[test]
    fn hints_are_bounded_and_deduplicated() {
        let refetch = JwksRefetch::default();
        for _ in 0..10 {
            refetch.request("https://issuer.example");
        }
        for i in 0..1000 {
            refetch.request(&format!("https://issuer-{i}.example"));
        }
        let taken = refetch.take();
        assert_eq!(taken.len(), MAX_WANTED);
        assert!(taken.contains("https://issuer.example"));
        assert!(refetch.take().is_empty());
    }
}
