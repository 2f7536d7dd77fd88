//! A gRPC channel to the control plane over mesh TLS.
//!
//! tonic's own TLS cannot take a SPIFFE verifier or a hot-swapped client certificate, so the
//! connection is made here with tokio-rustls and handed to tonic as a ready stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::identity::{Certifier, CertifyError, SpiffeId};
use crate::proto::identity::identity_client::IdentityClient;
use crate::proto::identity::{CertifyRequest, CertifyResponse, certify_request::Credential};
use crate::tls::{CertStore, TrustSource, config};

/// A failure to reach or use the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    #[error("cannot connect to control plane at {addr}: {source}")]
    Connect { addr: String, source: tonic::transport::Error },
    #[error("control plane refused: {0}")]
    Status(#[from] tonic::Status),
}

impl ControlClientError {
    /// Whether retrying could help. A refused credential or CSR will be refused again.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ControlClientError::Status(s) if matches!(
                s.code(),
                tonic::Code::InvalidArgument | tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            )
        )
    }
}

/// Connection details for the control plane. Each call dials afresh so the client certificate
/// presented is always the current one.
///
/// `addr` may list several replicas separated by commas. The last one that answered is tried
/// first; when it cannot be reached the others are tried in turn, so a sidecar moves to a live
/// replica as soon as its own dies.
#[derive(Clone)]
pub struct ControlClient {
    addrs: Arc<[String]>,
    current: Arc<AtomicUsize>,
    tls: Arc<rustls::ClientConfig>,
}

impl ControlClient {
    /// A client for the control plane at `addr`, which must prove `control_identity`.
    pub fn new(addr: &str, trust: Arc<dyn TrustSource>, certs: Arc<CertStore>, control_identity: SpiffeId) -> Self {
        let tls = config::client_config(certs, trust, Some(control_identity), &[config::ALPN_H2]);
        Self::with_tls_config(addr, tls)
    }

    /// A client with a ready-made TLS config (tests use it to present arbitrary certificates).
    pub fn with_tls_config(addr: &str, tls: Arc<rustls::ClientConfig>) -> Self {
        let mut addrs: Vec<String> =
            addr.split(',').map(str::trim).filter(|a| !a.is_empty()).map(String::from).collect();
        if addrs.is_empty() {
            addrs.push(addr.to_string()); // fails at connect, with this address in the error
        }
        ControlClient { addrs: addrs.into(), current: Arc::new(AtomicUsize::new(0)), tls }
    }

    /// The replica the client talks to now.
    pub fn current_addr(&self) -> &str {
        &self.addrs[self.current.load(Ordering::Relaxed) % self.addrs.len()]
    }

    /// A gRPC channel (one connection) to the control plane: the current replica, else the
    /// next that answers.
    pub async fn channel(&self) -> Result<Channel, ControlClientError> {
        let start = self.current.load(Ordering::Relaxed);
        let mut last_error = None;
        for i in 0..self.addrs.len() {
            let idx = (start + i) % self.addrs.len();
            match self.channel_to(&self.addrs[idx]).await {
                Ok(channel) => {
                    if idx != start % self.addrs.len() {
                        tracing::info!(control = %self.addrs[idx], "switched to another control-plane replica");
                    }
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(channel);
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("a ControlClient has at least one address"))
    }

    async fn channel_to(&self, addr: &str) -> Result<Channel, ControlClientError> {
        let target = addr.to_string();
        let addr = addr.to_string();
        let tls = self.tls.clone();
        let connector = tower_service_fn(move || {
            let addr = addr.clone();
            let tls = tls.clone();
            async move {
                let tcp = TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                let stream = TlsConnector::from(tls).connect(config::sni(), tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        Endpoint::from_shared(format!("http://{target}"))
            .map_err(|source| ControlClientError::Connect { addr: target.clone(), source })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .connect_with_connector(connector)
            .await
            .map_err(|source| ControlClientError::Connect { addr: target, source })
    }

    /// Asks for a certificate for the key in `csr_der`, proving identity with `credential` or,
    /// when `None`, with the current mTLS certificate.
    pub async fn certify(
        &self,
        csr_der: Vec<u8>,
        credential: Option<Credential>,
    ) -> Result<CertifyResponse, ControlClientError> {
        let mut client = IdentityClient::new(self.channel().await?);
        Ok(client.certify(CertifyRequest { csr_der, credential }).await?.into_inner())
    }
}

/// The sidecar's certificate manager gets its certificates over this client.
impl Certifier for ControlClient {
    fn certify(
        &self,
        request: CertifyRequest,
    ) -> futures_util::future::BoxFuture<'_, Result<CertifyResponse, CertifyError>> {
        Box::pin(async move { Ok(ControlClient::certify(self, request.csr_der, request.credential).await?) })
    }
}

impl From<ControlClientError> for CertifyError {
    fn from(e: ControlClientError) -> Self {
        if e.is_permanent() { CertifyError::Refused(Box::new(e)) } else { CertifyError::Unavailable(Box::new(e)) }
    }
}

/// A `tower::Service<Uri>` from a closure, without pulling in `tower` for one helper.
fn tower_service_fn<F, Fut, T>(f: F) -> ConnectorFn<F>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    ConnectorFn(f)
}

#[derive(Clone)]
struct ConnectorFn<F>(F);

impl<F, Fut, T> tower_service::Service<http::Uri> for ConnectorFn<F>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    type Response = T;
    type Error = std::io::Error;
    type Future = Fut;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        (self.0)()
    }
}
