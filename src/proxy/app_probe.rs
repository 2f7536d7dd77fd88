//! Kubelet probes the sidecar runs for the app.
//!
//! Three kinds of probe cannot reach the app through the sidecar: a TCP probe (the sidecar
//! accepts every connection, so it would prove only that the sidecar is up, and a dead app would
//! never be restarted), a gRPC probe (plaintext HTTP/2, which a STRICT port refuses) and an
//! HTTPS probe (the kubelet's own TLS, refused likewise). The injector rewrites each to a plain
//! `GET /app-health/<container>/<livez|readyz|startupz>` on the admin port and hands the
//! original to the sidecar in `PALISADE_APP_PROBES`; the sidecar runs it against the app on
//! 127.0.0.1 the way the kubelet would and answers 200 or 503. Plain-HTTP probes are not
//! rewritten: a STRICT port lets exactly those requests through (see `inbound.rs`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Probe;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;

use crate::proto::health::health_check_response::ServingStatus;
use crate::proto::health::{HealthCheckRequest, health_client::HealthClient};

/// Where the rewritten probes live on the admin port.
pub const PATH_PREFIX: &str = "/app-health/";

/// The app's probes by admin path, validated once from `PALISADE_APP_PROBES`.
#[derive(Debug, Clone, Default)]
pub struct AppProbes(BTreeMap<String, (Check, Duration)>);

/// Parses `PALISADE_APP_PROBES`: a JSON map from `/app-health/...` paths to Kubernetes probes,
/// each a `tcpSocket`, a `grpc` or an `httpGet` with scheme HTTPS, with a numeric port. The
/// probe's own `timeoutSeconds` (the kubelet's default 1 s when unset) bounds each run.
pub fn parse(json: &str) -> Result<AppProbes, String> {
    let probes: BTreeMap<String, Probe> =
        serde_json::from_str(json).map_err(|e| format!("expected a JSON map from path to Kubernetes probe: {e}"))?;
    let mut out = BTreeMap::new();
    for (path, probe) in probes {
        if !path.starts_with(PATH_PREFIX) {
            return Err(format!("{path}: expected a path under {PATH_PREFIX}"));
        }
        let check = Check::of(&probe).map_err(|e| format!("{path}: {e}"))?;
        let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1).unsigned_abs().into());
        out.insert(path, (check, timeout));
    }
    Ok(AppProbes(out))
}

impl AppProbes {
    /// Runs the probe served at `path` against the app; `None` when there is none.
    pub async fn run(&self, path: &str) -> Option<Result<(), String>> {
        let (check, timeout) = self.0.get(path)?;
        Some(match tokio::time::timeout(*timeout, check.run()).await {
            Ok(result) => result.map_err(|e| format!("{check}: {e}")),
            Err(_) => Err(format!("{check}: no answer within {timeout:?}")),
        })
    }

    /// The admin paths served.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

/// One probe, as the sidecar runs it.
#[derive(Debug, Clone)]
enum Check {
    Tcp { port: u16 },
    Grpc { port: u16, service: String },
    Https { port: u16, path: String, headers: Vec<(String, String)> },
}

impl Check {
    fn of(probe: &Probe) -> Result<Check, String> {
        let port =
            |p: i32| u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| format!("port {p} is out of range"));
        let number = |p: &IntOrString| match p {
            IntOrString::Int(n) => port(*n),
            IntOrString::String(name) => Err(format!("named port {name:?}: the injector resolves names to numbers")),
        };
        match (&probe.tcp_socket, &probe.grpc, &probe.http_get) {
            (Some(tcp), None, None) if tcp.host.is_none() => Ok(Check::Tcp { port: number(&tcp.port)? }),
            (None, Some(grpc), None) => {
                Ok(Check::Grpc { port: port(grpc.port)?, service: grpc.service.clone().unwrap_or_default() })
            }
            (None, None, Some(get))
                if get.host.is_none() && get.scheme.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("HTTPS")) =>
            {
                let path = get.path.clone().unwrap_or_else(|| "/".to_string());
                Ok(Check::Https {
                    port: number(&get.port)?,
                    path: if path.starts_with('/') { path } else { format!("/{path}") },
                    headers: get.http_headers.iter().flatten().map(|h| (h.name.clone(), h.value.clone())).collect(),
                })
            }
            _ => Err("expected exactly one of tcpSocket, grpc or httpGet with scheme HTTPS, without host".to_string()),
        }
    }

    /// Runs the probe once; the error says what failed, [`AppProbes::run`] adds which probe.
    async fn run(&self) -> Result<(), String> {
        let app = |port: u16| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        match self {
            Check::Tcp { port } => TcpStream::connect(app(*port)).await.map(drop).map_err(|e| e.to_string()),
            Check::Grpc { port, service } => {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app(*port)))
                    .map_err(|e| e.to_string())?
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
                let reply = HealthClient::new(channel)
                    .check(HealthCheckRequest { service: service.clone() })
                    .await
                    .map_err(|e| format!("{} {}", e.code(), e.message()))?;
                match reply.into_inner().status() {
                    ServingStatus::Serving => Ok(()),
                    other => Err(other.as_str_name().to_string()),
                }
            }
            Check::Https { port, path, headers } => {
                let tcp = TcpStream::connect(app(*port)).await.map_err(|e| e.to_string())?;
                let tls = tokio_rustls::TlsConnector::from(kubelet_tls())
                    .connect(ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()), tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                let mut request = http::Request::get(path.as_str())
                    .header(http::header::HOST, app(*port).to_string())
                    .header(http::header::USER_AGENT, "kube-probe/palisade");
                for (name, value) in headers {
                    request = request.header(name.as_str(), value.as_str());
                }
                let request = request.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
                let status = sender.send_request(request).await.map_err(|e| e.to_string())?.status();
                // The kubelet's rule: 2xx and 3xx pass.
                if status.is_success() || status.is_redirection() { Ok(()) } else { Err(format!("HTTP {status}")) }
            }
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Check::Tcp { port } => write!(f, "tcp 127.0.0.1:{port}"),
            Check::Grpc { port, service } => write!(f, "grpc 127.0.0.1:{port} service {service:?}"),
            Check::Https { port, path, .. } => write!(f, "https://127.0.0.1:{port}{path}"),
        }
    }
}

/// TLS as the kubelet's HTTPS probe does it: no certificate verification (the app's certificate
/// is not the mesh's and the kubelet does not check it either), but a real handshake.
fn kubelet_tls() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = crate::tls::provider();
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("aws-lc-rs supports TLS 1.2 and 1.3")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(cfg)
        })
        .clone()
}

/// Accepts any certificate; still checks that the server holds its key.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tcp_grpc_and_https_probes_with_numeric_ports_are_accepted() {
        let ok = r#"{"/app-health/app/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 3},
                     "/app-health/app/readyz": {"grpc": {"port": 9090, "service": "shop"}},
                     "/app-health/app/startupz": {"httpGet": {"port": 8443, "path": "/healthz", "scheme": "HTTPS"}}}"#;
        let probes = parse(ok).unwrap();
        assert_eq!(probes.paths().count(), 3);
        for (bad, why) in [
            (r#"{"/app-health/a/livez": {"httpGet": {"port": 80, "path": "/"}}}"#, "HTTPS"),
            (r#"{"/app-health/a/livez": {"tcpSocket": {"port": "http"}}}"#, "named port"),
            (r#"{"/app-health/a/livez": {"tcpSocket": {"port": 70000}}}"#, "out of range"),
            (r#"{"/app-health/a/livez": {"tcpSocket": {"port": 80, "host": "10.0.0.1"}}}"#, "without host"),
            (r#"{"/ready": {"tcpSocket": {"port": 80}}}"#, "under /app-health/"),
            (r#"{"/app-health/a/livez": {"exec": {"command": ["true"]}}}"#, "exactly one"),
            ("[1]", "JSON map"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
