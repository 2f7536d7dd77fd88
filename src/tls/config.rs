//! rustls configs for the mesh: TLS 1.3 only, no session resumption (a resumed session would
//! report the peer's old certificate and hide a rotation or a revocation).

use std::sync::Arc;

use rustls::client::Resumption;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, ServerConfig};

use super::verify::{SpiffeClientVerifier, SpiffeServerVerifier};
use super::{CertStore, TrustSource};
use crate::identity::spiffe::SpiffeId;

/// ALPN for sidecar-to-sidecar HTTP/2 (callers that spoke HTTP/2, gRPC among them).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for sidecar-to-sidecar HTTP/1.1 (callers that spoke HTTP/1, and upgrades).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN for an opaque TCP stream tunnelled between sidecars: the inbound side needs no
/// protocol detection (and so adds no delay for server-speaks-first protocols).
pub const ALPN_TCP: &[u8] = b"palisade-tcp";

/// Server side of mTLS. `mandatory_client_auth: false` only for the control plane's Certify.
pub fn server_config(
    certs: Arc<CertStore>,
    trust: Arc<dyn TrustSource>,
    mandatory_client_auth: bool,
    alpn: &[&[u8]],
) -> Arc<ServerConfig> {
    let verifier = Arc::new(SpiffeClientVerifier::new(trust, mandatory_client_auth));
    let mut cfg = ServerConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// Client side of mTLS to a server that must prove `expected`.
pub fn client_config(
    certs: Arc<CertStore>,
    trust: Arc<dyn TrustSource>,
    expected: Option<SpiffeId>,
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let verifier = Arc::new(SpiffeServerVerifier::new(trust, expected));
    let mut cfg = ClientConfig::builder_with_provider(super::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(certs);
    cfg.resumption = Resumption::disabled();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// The server name sent in SNI. Mesh identity is checked on the URI SAN, so this is only a label.
pub fn sni() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from("palisade.mesh").expect("static name is valid")
}
