//! Micro benchmark of one full TLS 1.3 mutual-auth handshake between two sidecars, in memory.
//!
//! Both ends use Palisade's own configs (SPIFFE verifiers, no resumption, the default key
//! exchange preference), with workload certificates from a real `CertificateAuthority`. Bytes are
//! pumped between `ClientConnection` and `ServerConnection` through `Vec<u8>` buffers, so the
//! figure is the CPU of both ends together on one core, without sockets.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use palisade::identity::{CaMaterial, CertificateAuthority, SpiffeId};
use palisade::tls::config::{ALPN_H2, client_config, server_config, sni};
use palisade::tls::{CertStore, TrustBundle, certs_from_pem, peer_identity, provider};
use rcgen::KeyPair;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

/// A `CertStore` holding a fresh P-256 workload certificate for `id`, as the sidecar's
/// certificate manager installs one.
fn cert_store(ca: &CertificateAuthority, id: &SpiffeId) -> Arc<CertStore> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let issued = ca.sign_workload(id, &key, Duration::from_secs(3600), &[]).expect("signs");
    let chain = certs_from_pem(&issued.chain_pem).expect("chain PEM");
    let signing_key = provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .expect("key loads");
    let store = CertStore::new();
    store.set(Arc::new(CertifiedKey::new(chain, signing_key)), issued.not_after);
    store
}

/// Runs one handshake to completion; returns both ends.
fn handshake(
    client_cfg: &Arc<ClientConfig>,
    server_cfg: &Arc<ServerConfig>,
    to_server: &mut Vec<u8>,
    to_client: &mut Vec<u8>,
) -> (ClientConnection, ServerConnection) {
    let mut client = ClientConnection::new(client_cfg.clone(), sni()).expect("client connection");
    let mut server = ServerConnection::new(server_cfg.clone()).expect("server connection");
    // A TLS 1.3 mutual-auth handshake takes three flights; more rounds means it is stuck.
    for _ in 0..10 {
        to_server.clear();
        while client.wants_write() {
            client.write_tls(to_server).expect("client writes");
        }
        let mut rd = &to_server[..];
        while !rd.is_empty() {
            server.read_tls(&mut rd).expect("server reads");
            server.process_new_packets().expect("server accepts");
        }
        to_client.clear();
        while server.wants_write() {
            server.write_tls(to_client).expect("server writes");
        }
        let mut rd = &to_client[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).expect("client reads");
            client.process_new_packets().expect("client accepts");
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return (client, server);
        }
    }
    panic!("handshake did not finish in 10 rounds");
}

fn bench_tls(c: &mut Criterion) {
    palisade::tls::install_crypto_provider();
    let material = CaMaterial::generate("cluster.local", 1).expect("CA material");
    let ca = CertificateAuthority::load(material.clone()).expect("CA loads");
    let client_id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().expect("valid");
    let server_id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/api".parse().expect("valid");
    let bundle = TrustBundle::from_pem(&material.root_cert_pem).expect("bundle");
    let client_cfg = client_config(cert_store(&ca, &client_id), bundle.clone(), Some(server_id.clone()), &[ALPN_H2]);
    let server_cfg = server_config(cert_store(&ca, &server_id), bundle, true, &[ALPN_H2]);

    let mut to_server = Vec::with_capacity(16 * 1024);
    let mut to_client = Vec::with_capacity(16 * 1024);

    // Once, outside timing: the handshake succeeds and each side sees the other's identity, so
    // the benchmark cannot silently measure a failing handshake.
    let (client, server) = handshake(&client_cfg, &server_cfg, &mut to_server, &mut to_client);
    let (seen_by_server, _) = peer_identity(server.peer_certificates()).expect("client identity");
    assert_eq!(seen_by_server, client_id);
    let (seen_by_client, _) = peer_identity(client.peer_certificates()).expect("server identity");
    assert_eq!(seen_by_client, server_id);
    assert_eq!(client.alpn_protocol(), Some(ALPN_H2));
    eprintln!(
        "handshake checked: {:?}, {:?}, key exchange {:?}",
        client.protocol_version(),
        client.negotiated_cipher_suite().map(|s| s.suite()),
        client.negotiated_key_exchange_group().map(|g| g.name()),
    );

    let mut group = c.benchmark_group("tls");
    group.sample_size(20);
    group.bench_function("mtls_handshake", |b| {
        b.iter(|| handshake(&client_cfg, &server_cfg, &mut to_server, &mut to_client))
    });
    group.finish();
}

criterion_group!(benches, bench_tls);
criterion_main!(benches);
