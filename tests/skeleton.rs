//! Issue 2: one mTLS request end to end through real processes, and the attacks on it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use palisade::agent::ControlClient;
use palisade::identity::{CaMaterial, CertificateAuthority, SpiffeId};
use palisade::proto::identity::certify_request::Credential;
use palisade::tls::{CertStore, TrustBundle};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Mesh {
    _dir: std::path::PathBuf,
    cp: ControlPlane,
    app: EchoApp,
    a: Sidecar,
    b: Sidecar,
    route: std::net::SocketAddr,
}

/// Control plane, sidecar B in front of an echo app, sidecar A with a route to B.
async fn mesh(route_identity: Option<&str>) -> Mesh {
    let dir = tempdir("skeleton");
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = EchoApp::start().await;
    let b = Sidecar::start(&cp, "b", Some(app.addr), &[]).await;
    let route = free_addr();
    let expected = route_identity.map(str::to_string).unwrap_or_else(|| id("b"));
    let a = Sidecar::start(&cp, "a", None, &[format!("{route}={}@{expected}", b.inbound.unwrap())]).await;
    Mesh { _dir: dir, cp, app, a, b, route }
}

fn xfcc_seen(body: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("app body {body:?}: {e}"));
    v["headers"]["x-forwarded-client-cert"]
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_crosses_mtls_with_verified_caller_identity_and_spoofed_xfcc_is_stripped() {
    let m = mesh(None).await;
    let client = http_client();
    let (status, _, body) = get(&client, &format!("http://{}/orders/1", m.route), &[]).await.unwrap();
    assert_eq!(status, 200, "body: {body}");
    assert_eq!(xfcc_seen(&body), vec![format!("By={};URI={}", id("b"), id("a"))]);

    // A caller claiming to be someone else in the header gets its real identity instead.
    let spoof = "By=spiffe://cluster.local/ns/test/sa/b;URI=spiffe://cluster.local/ns/admin/sa/root";
    let (status, _, body) =
        get(&client, &format!("http://{}/", m.route), &[("x-forwarded-client-cert", spoof)]).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(xfcc_seen(&body), vec![format!("By={};URI={}", id("b"), id("a"))]);
    assert_eq!(m.app.hits.load(std::sync::atomic::Ordering::SeqCst), 2);

    // Both sides counted the requests with the peer identity.
    let metrics = m.b.metrics().await;
    assert!(
        metrics.contains(&format!(
            "palisade_requests_total{{direction=\"inbound\",status_class=\"2xx\",peer=\"{}\"}} 2",
            id("a")
        )),
        "{metrics}"
    );
    // config_dump shows the certificate summary and never key material.
    let dump = m.a.config_dump().await;
    assert_eq!(dump["certificate"]["spiffe_id"], id("a"));
    assert!(!dump.to_string().contains("PRIVATE KEY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_refuses_a_server_with_another_identity() {
    let m = mesh(Some("spiffe://cluster.local/ns/test/sa/not-b")).await;
    let (status, headers, body) = get(&http_client(), &format!("http://{}/", m.route), &[]).await.unwrap();
    assert_eq!(status, 502, "{body}");
    let reason = headers.get("x-palisade-error").unwrap().to_str().unwrap();
    assert!(reason.contains("identity mismatch") && reason.contains("not-b") && reason.contains("/sa/b"), "{reason}");
    assert!(headers.contains_key("x-request-id"));
    assert_eq!(m.app.hits.load(std::sync::atomic::Ordering::SeqCst), 0, "the app must not see the request");
}

/// Sends one HTTP/1.1 request over TLS with `cfg` and returns what came back (or the error).
async fn raw_tls_request(addr: std::net::SocketAddr, cfg: Arc<rustls::ClientConfig>) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(palisade::tls::config::sni(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // In TLS 1.3 the server judges the client certificate after the client thinks it is done,
    // so a refusal shows up on the first read.
    tls.write_all(b"GET / HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => Ok(String::from_utf8_lossy(&buf).into_owned()),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err("read timed out".into()),
    }
}

fn client_cfg(bundle_pem: &str, cert: Option<Arc<CertifiedKey>>) -> Arc<rustls::ClientConfig> {
    let bundle = TrustBundle::from_pem(bundle_pem).unwrap();
    let store = CertStore::new();
    if let Some(c) = cert {
        store.set(c, i64::MAX);
    }
    palisade::tls::config::client_config(store, bundle, None, &[b"http/1.1"])
}

fn certified(ca: &CertificateAuthority, identity: &str) -> Arc<CertifiedKey> {
    let key = KeyPair::generate().unwrap();
    let issued = ca.sign_workload(&identity.parse().unwrap(), &key, Duration::from_secs(600), &[]).unwrap();
    let chain = palisade::tls::certs_from_pem(&issued.chain_pem).unwrap();
    let sk = palisade::tls::provider()
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .unwrap();
    Arc::new(CertifiedKey::new(chain, sk))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_refuses_clients_without_a_mesh_certificate() {
    palisade::tls::install_crypto_provider();
    let m = mesh(None).await;
    let inbound = m.b.inbound.unwrap();
    let root = std::fs::read_to_string(m.cp.root_pem_path()).unwrap();

    // Control: a client with a real mesh certificate gets an answer, so the refusals below are
    // about the certificate and not about the harness.
    let mesh_ca = CertificateAuthority::load(load_material(&m.cp)).unwrap();
    let ok = raw_tls_request(inbound, client_cfg(&root, Some(certified(&mesh_ca, &id("c"))))).await.unwrap();
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    // No client certificate at all.
    let res = raw_tls_request(inbound, client_cfg(&root, None)).await;
    assert!(res.as_ref().is_err() || res.as_ref().unwrap().is_empty(), "no-cert client was served: {res:?}");

    // A certificate for a mesh identity, but from another CA.
    let rogue = CertificateAuthority::load(CaMaterial::generate("cluster.local", 1).unwrap()).unwrap();
    let res = raw_tls_request(inbound, client_cfg(&root, Some(certified(&rogue, &id("a"))))).await;
    assert!(res.as_ref().is_err() || res.as_ref().unwrap().is_empty(), "foreign-CA client was served: {res:?}");

    assert_eq!(m.app.hits.load(std::sync::atomic::Ordering::SeqCst), 1, "only the control request reached the app");
    let metrics = m.b.metrics().await;
    assert!(metrics.contains("reason=\"no_client_certificate\""), "{metrics}");
    assert!(metrics.contains("reason=\"untrusted_issuer\""), "{metrics}");
}

/// The CA material from the control plane's store (the test plays an attacker who stole
/// nothing: it only uses this to mint the positive control).
fn load_material(cp: &ControlPlane) -> CaMaterial {
    let store = palisade::control::Store::open(&cp.state).unwrap();
    store.ca_generations().unwrap().into_iter().find(|g| g.state == "active").unwrap().material
}

fn csr_claiming(identity: &str) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn control_client(cp: &ControlPlane) -> ControlClient {
    let bundle = TrustBundle::from_pem(&std::fs::read_to_string(cp.root_pem_path()).unwrap()).unwrap();
    ControlClient::new(
        &cp.listen.to_string(),
        bundle,
        CertStore::new(),
        palisade::identity::SpiffeId::control_plane("cluster.local").unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_token_is_single_use_and_yields_only_its_identity() {
    palisade::tls::install_crypto_provider();
    let dir = tempdir("tokens");
    let cp = ControlPlane::start(&dir, &[]).await;
    let client = control_client(&cp);
    let token = cp.token(&id("x"));

    let resp = client.certify(csr_claiming(&id("y")), Some(Credential::JoinToken(token.clone()))).await.unwrap();
    assert_eq!(resp.spiffe_id, id("x"));
    let leaf = &palisade::tls::certs_from_pem(&resp.certificate_chain_pem).unwrap()[0];
    let (issued_id, serial) = palisade::tls::spiffe_id_of(leaf).unwrap();
    assert_eq!(issued_id, id("x").parse::<SpiffeId>().unwrap(), "the CSR's SAN must be ignored");
    assert_eq!(serial, resp.serial);

    let again = client.certify(csr_claiming(&id("x")), Some(Credential::JoinToken(token))).await.unwrap_err();
    assert!(again.to_string().contains("already used"), "{again}");
    let unknown =
        client.certify(csr_claiming(&id("x")), Some(Credential::JoinToken("pjt_forged".into()))).await.unwrap_err();
    assert!(unknown.to_string().contains("unknown"), "{unknown}");

    // The ledger holds exactly one workload certificate, for x.
    let out = std::process::Command::new(BIN)
        .args(["status", "certs", "-o", "json", "--state-dir"])
        .arg(&cp.state)
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let workload: Vec<_> = rows.as_array().unwrap().iter().filter(|r| r["credential"] == "join-token").collect();
    assert_eq!(workload.len(), 1);
    assert_eq!(workload[0]["spiffe_id"], id("x"));
    assert_eq!(workload[0]["serial"], resp.serial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_same_state_dir_keeps_the_root() {
    let dir = tempdir("restart");
    let mut cp = ControlPlane::start(&dir, &[]).await;
    let root = std::fs::read_to_string(cp.root_pem_path()).unwrap();
    assert!(root.contains("BEGIN CERTIFICATE"));
    let status = cp.proc.terminate(Duration::from_secs(10));
    assert!(status.success(), "control plane exit on SIGTERM: {status:?}");
    let listen = cp.listen;
    drop(cp);
    let cp2 = ControlPlane::start_at(&dir, listen, &[]).await;
    assert_eq!(std::fs::read_to_string(cp2.root_pem_path()).unwrap(), root);
    // And it still issues under that root: a fresh sidecar verifies against the old file.
    let app = EchoApp::start().await;
    Sidecar::start(&cp2, "after-restart", Some(app.addr), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_control_plane_promptly_while_sidecars_hold_their_streams_open() {
    let dir = tempdir("stop-with-sidecars");
    let mut cp = ControlPlane::start(&dir, &[]).await;
    let app = EchoApp::start().await;
    let sidecar = Sidecar::start(&cp, "held-open", Some(app.addr), &[]).await;
    // The control plane holds the sidecar's discovery stream open.
    let metrics = format!("http://{}/metrics", cp.admin);
    wait_for("the sidecar's stream counted", Duration::from_secs(10), || async {
        let text = get(&http_client(), &metrics, &[]).await.map(|r| r.2).unwrap_or_default();
        metric(&text, "palisade_control_sidecars_connected", "") == 1.0
    })
    .await;
    let started = std::time::Instant::now();
    let status = cp.proc.terminate(Duration::from_secs(10));
    assert!(status.success(), "control plane exit on SIGTERM with a sidecar connected: {status:?}");
    assert!(started.elapsed() < Duration::from_secs(6), "stopping took {:?}", started.elapsed());
    drop(sidecar);
}

/// Serves TLS with one fixed certificate, no client authentication: a stand-in for whatever
/// answers on the control plane's address.
#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for OneCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// An impostor on the control plane's address, holding a valid certificate of the mesh's own
/// CA but for a workload's identity (a stolen workload key): a sidecar refuses the handshake,
/// so its join token never reaches the impostor, and it stays not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_sends_nothing_to_a_control_plane_with_another_identity() {
    let dir = tempdir("impostor");
    let cp = ControlPlane::start(&dir, &[]).await;
    let stolen = mint_client_cert(&cp.state, &id("workload"), Duration::from_secs(600));
    let config = rustls::ServerConfig::builder_with_provider(palisade::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneCert(stolen)));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let impostor = listener.local_addr().unwrap();
    let (tx, mut handshakes) = tokio::sync::mpsc::unbounded_channel::<Result<Vec<u8>, String>>();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let outcome = match acceptor.accept(tcp).await {
                    Ok(mut tls) => {
                        // Whatever the sidecar sends once it trusts us.
                        let mut got = vec![0u8; 4096];
                        let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut got)).await;
                        Ok(got[..n.ok().and_then(Result::ok).unwrap_or(0)].to_vec())
                    }
                    Err(e) => Err(e.to_string()),
                };
                let _ = tx.send(outcome);
            });
        }
    });
    let admin = free_addr();
    let (args, token) = cp.sidecar_args(impostor, "victim", admin);
    let secret = std::fs::read_to_string(&token).unwrap();
    let victim = Proc::spawn_proxy("sidecar-victim", &dir, &args);
    // Three attempts (the sidecar retries with backoff): each refused in the handshake.
    for _ in 0..3 {
        let outcome = tokio::time::timeout(Duration::from_secs(30), handshakes.recv()).await.unwrap().unwrap();
        match outcome {
            Err(_) => {}
            Ok(bytes) => panic!(
                "the sidecar completed a handshake with an impostor and sent {} bytes (token inside: {})",
                bytes.len(),
                String::from_utf8_lossy(&bytes).contains(&secret)
            ),
        }
    }
    assert_eq!(status_of(&format!("http://{admin}/ready")).await, Some(503));
    let log = victim.log_text();
    assert!(log.contains("palisade-control") || log.contains("identity"), "the sidecar does not say why:\n{log}");
}
