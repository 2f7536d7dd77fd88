//! Issue 3: short-lived certificates that rotate under load with zero failed requests, CA
//! rotation, control-plane outages, and attacks on issuance.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use palisade::agent::ControlClient;
use palisade::proto::identity::certify_request::Credential;
use palisade::tls::{CertStore, TrustBundle};
use rcgen::{CertificateParams, KeyPair, SanType};

fn root_pem(cp: &ControlPlane) -> String {
    std::fs::read_to_string(cp.root_pem_path()).unwrap()
}

/// Two sidecars, each with an inbound listener in front of an echo app; A routes to B.
struct Pair {
    _apps: (EchoApp, EchoApp),
    a: Sidecar,
    b: Sidecar,
    route: std::net::SocketAddr,
}

async fn pair(cp: &ControlPlane) -> Pair {
    let app_a = EchoApp::start().await;
    let app_b = EchoApp::start().await;
    let b = Sidecar::start(cp, "b", Some(app_b.addr), &[]).await;
    let route = free_addr();
    let a = Sidecar::start(cp, "a", Some(app_a.addr), &[format!("{route}={}@{}", b.inbound.unwrap(), id("b"))]).await;
    Pair { _apps: (app_a, app_b), a, b, route }
}

fn ledger_serials(cp: &ControlPlane, identity: &str) -> BTreeSet<String> {
    let store = palisade::control::Store::open(&cp.state).unwrap();
    store.certificates(Some(identity), 10_000).unwrap().into_iter().map(|r| r.serial).collect()
}

/// Records every distinct serial each sidecar presents on fresh handshakes until `until`.
async fn watch_serials(cp: &ControlPlane, p: &Pair, until: Instant) -> (Vec<String>, Vec<String>) {
    let (mut seen_a, mut seen_b) = (Vec::<String>::new(), Vec::<String>::new());
    while Instant::now() < until {
        let probe = mint_client_cert(&cp.state, &id("probe"), Duration::from_secs(600));
        let roots = root_pem(cp);
        for (addr, seen) in [(p.a.inbound.unwrap(), &mut seen_a), (p.b.inbound.unwrap(), &mut seen_b)] {
            let serial =
                presented_serial(addr, &roots, Some(probe.clone())).await.expect("fresh handshake must succeed");
            if seen.last() != Some(&serial) {
                seen.push(serial);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    (seen_a, seen_b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_every_few_seconds_for_two_minutes_with_zero_failed_requests() {
    let dir = tempdir("soak");
    let cp = ControlPlane::start(&dir, &["--cert-ttl", "15s"]).await;
    let p = pair(&cp).await;
    let traffic = Traffic::start(format!("http://{}/soak", p.route), Duration::from_millis(20));
    let (seen_a, seen_b) = watch_serials(&cp, &p, Instant::now() + Duration::from_secs(125)).await;
    let (ok, failed, failures) = traffic.finish().await;

    assert_eq!(failed, 0, "failed requests: {:?}", &failures[..failures.len().min(5)]);
    assert!(ok > 2000, "traffic was not steady: {ok} requests");
    for (name, sidecar, seen) in [("a", &p.a, &seen_a), ("b", &p.b, &seen_b)] {
        let metrics = sidecar.metrics().await;
        let renewals = metric(&metrics, "palisade_cert_renewals_total", "success") - 1.0; // minus the first
        assert!(renewals >= 4.0, "{name}: only {renewals} renewals\n{metrics}");
        // Every new certificate was presented: the serial changed after each renewal (give or
        // take the last one, which may land after the final probe), and only ledger serials.
        assert!(seen.len() as f64 >= renewals, "{name}: saw {} serials for {renewals} renewals", seen.len());
        let ledger = ledger_serials(&cp, &id(name));
        assert!(seen.iter().all(|s| ledger.contains(s)), "{name} presented a serial missing from the ledger");
        assert!(metric(&metrics, "palisade_cert_expiry_timestamp_seconds", "") > 0.0);
        assert!(metric(&metrics, "palisade_cert_last_renewal_timestamp_seconds", "") > 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_under_load_loses_nothing_and_retires_the_old_root() {
    let dir = tempdir("ca-rotate");
    let cp = ControlPlane::start(&dir, &["--cert-ttl", "8s"]).await;
    let p = pair(&cp).await;
    let old_root = root_pem(&cp);
    // A sidecar that keeps the roots it is sent, and the bundle it was set up with, frozen (as
    // a pod's environment is at admission).
    let (frozen, kept) = (dir.join("frozen-root.pem"), dir.join("kept-roots.pem"));
    std::fs::write(&frozen, &old_root).unwrap();
    let keeper = Sidecar::spawn(&cp, "keeper", None, &[], &["--trust-state", kept.to_str().unwrap()]);
    keeper.wait_ready().await;
    let traffic = Traffic::start(format!("http://{}/rotate", p.route), Duration::from_millis(20));

    let out = std::process::Command::new(BIN)
        .args(["control", "ca", "rotate", "--state-dir"])
        .arg(&cp.state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A second rotation while one is running is refused, not stacked.
    let again = std::process::Command::new(BIN)
        .args(["control", "ca", "rotate", "--state-dir"])
        .arg(&cp.state)
        .output()
        .unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already in progress"));

    let store = palisade::control::Store::open(&cp.state).unwrap();
    // The store marks the generation retired first; the running control plane then reloads it
    // and rewrites root.pem on its next tick, so wait for both.
    wait_for("old CA generation retired and root.pem without the old root", Duration::from_secs(90), || {
        let gens = store.ca_generations().unwrap();
        let retired = gens.iter().any(|g| g.generation == 1 && g.state == "retired");
        let exported = !root_pem(&cp).contains(old_root.trim());
        async move { retired && exported }
    })
    .await;
    let new_root = root_pem(&cp);

    // Every sidecar now presents a certificate that chains to the new root alone.
    let probe = mint_client_cert(&cp.state, &id("probe"), Duration::from_secs(600));
    for s in [&p.a, &p.b] {
        let addr = s.inbound.unwrap();
        let new_root = new_root.clone();
        let probe = probe.clone();
        wait_for("sidecar presents a new-root certificate", Duration::from_secs(20), || {
            let (new_root, probe) = (new_root.clone(), probe.clone());
            async move { presented_serial(addr, &new_root, Some(probe)).await.is_ok() }
        })
        .await;
        assert!(
            presented_serial(addr, &old_root, Some(probe.clone())).await.is_err(),
            "old root still verifies {addr}"
        );
    }
    let (ok, failed, failures) = traffic.finish().await;
    assert_eq!(failed, 0, "failed requests: {:?}", &failures[..failures.len().min(5)]);
    assert!(ok > 500, "{ok}");

    // The frozen bundle can no longer verify the control plane: a sidecar restarted with it
    // alone could never be told the new roots.
    let outdated = ControlClient::new(
        &cp.listen.to_string(),
        TrustBundle::from_pem(&old_root).unwrap(),
        CertStore::new(),
        palisade::identity::SpiffeId::control_plane("cluster.local").unwrap(),
    );
    let refused = outdated.certify(csr(None), Some(Credential::JoinToken(cp.token(&id("keeper"))))).await;
    assert!(refused.is_err(), "the old root still verifies the control plane");
    // The keeper kept the new roots; restarted with the same frozen bundle, it starts from them.
    wait_for("the keeper holds the new roots", Duration::from_secs(20), || {
        let kept = std::fs::read_to_string(&kept).unwrap_or_default();
        let current = kept.contains(new_root.trim()) && !kept.contains(old_root.trim());
        async move { current }
    })
    .await;
    drop(keeper);
    let token = dir.join("keeper-again.token");
    std::fs::write(&token, cp.token(&id("keeper"))).unwrap();
    let admin = free_addr();
    let args = [
        "--control",
        &cp.listen.to_string(),
        "--ca-bundle",
        frozen.to_str().unwrap(),
        "--trust-state",
        kept.to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "--admin",
        &admin.to_string(),
    ]
    .map(String::from);
    let _again = Proc::spawn_proxy("sidecar-keeper-again", &dir, &args);
    wait_for("the restarted keeper is ready", Duration::from_secs(30), || async move {
        status_of(&format!("http://{admin}/ready")).await == Some(200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_keep_serving_through_a_control_plane_outage_and_renew_after() {
    let dir = tempdir("outage");
    let mut cp = ControlPlane::start(&dir, &["--cert-ttl", "20s"]).await;
    let p = pair(&cp).await;
    let traffic = Traffic::start(format!("http://{}/outage", p.route), Duration::from_millis(20));
    let listen = cp.listen;
    cp.proc.kill9();

    // Down for longer than a renewal interval: both sidecars have tried and failed.
    for s in [&p.a, &p.b] {
        wait_for("a failed renewal", Duration::from_secs(30), || async {
            metric(&s.metrics().await, "palisade_cert_renewals_total", "failure") >= 1.0
        })
        .await;
        assert_eq!(status_of(&format!("http://{}/ready", s.admin)).await, Some(200), "still ready on the current cert");
    }
    let before: Vec<f64> = futures_util::future::join_all(
        [&p.a, &p.b].map(|s| async { metric(&s.metrics().await, "palisade_cert_renewals_total", "success") }),
    )
    .await;
    drop(cp);
    let _cp = ControlPlane::start_at(&dir, listen, &["--cert-ttl", "20s"]).await;
    for (s, before) in [&p.a, &p.b].into_iter().zip(before) {
        wait_for("renewal after the control plane is back", Duration::from_secs(30), || async move {
            metric(&s.metrics().await, "palisade_cert_renewals_total", "success") > before
        })
        .await;
    }
    let (ok, failed, failures) = traffic.finish().await;
    assert_eq!(failed, 0, "failed requests: {:?}", &failures[..failures.len().min(5)]);
    assert!(ok > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_turns_ready_off_and_fails_handshakes_closed() {
    let dir = tempdir("expiry");
    let mut cp = ControlPlane::start(&dir, &["--cert-ttl", "3s"]).await;
    let app = EchoApp::start().await;
    let s = Sidecar::start(&cp, "short", Some(app.addr), &[]).await;
    let probe = mint_client_cert(&cp.state, &id("probe"), Duration::from_secs(600));
    let roots = root_pem(&cp);
    presented_serial(s.inbound.unwrap(), &roots, Some(probe.clone())).await.expect("serves while valid");
    cp.proc.kill9();
    wait_for("/ready turns 503", Duration::from_secs(20), || async {
        status_of(&format!("http://{}/ready", s.admin)).await == Some(503)
    })
    .await;
    let err = presented_serial(s.inbound.unwrap(), &roots, Some(probe)).await.unwrap_err();
    assert!(!err.is_empty());
}

// ---- Attacks on issuance, straight at the gRPC API of a real control plane ----

fn client(cp: &ControlPlane, cert: Option<Arc<rustls::sign::CertifiedKey>>) -> ControlClient {
    palisade::tls::install_crypto_provider();
    let bundle = TrustBundle::from_pem(&root_pem(cp)).unwrap();
    let store = CertStore::new();
    match cert {
        // Present the certificate whatever its validity: the server must be the one to judge.
        Some(c) => {
            let verifier = palisade::tls::verify::SpiffeServerVerifier::new(
                bundle,
                Some(palisade::identity::SpiffeId::control_plane("cluster.local").unwrap()),
            );
            let mut cfg = rustls::ClientConfig::builder_with_provider(palisade::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(c)));
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            ControlClient::with_tls_config(&cp.listen.to_string(), Arc::new(cfg))
        }
        None => ControlClient::new(
            &cp.listen.to_string(),
            bundle,
            store,
            palisade::identity::SpiffeId::control_plane("cluster.local").unwrap(),
        ),
    }
}

fn csr(identity: Option<&str>) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    if let Some(i) = identity {
        params.subject_alt_names = vec![SanType::URI(i.try_into().unwrap())];
    }
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn token_with_ttl(cp: &ControlPlane, identity: &str, ttl: &str) -> String {
    let out = std::process::Command::new(BIN)
        .args(["control", "token", "create", "--state-dir"])
        .arg(&cp.state)
        .args(["--identity", identity, "--ttl", ttl])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_refuses_bad_csrs_and_bad_credentials_and_says_why() {
    let dir = tempdir("attacks");
    let cp = ControlPlane::start(&dir, &[]).await;
    let anon = client(&cp, None);
    let tok = |id: &str| Some(Credential::JoinToken(cp.token(id)));

    let err = anon.certify(b"garbage".to_vec(), tok(&id("x"))).await.unwrap_err().to_string();
    assert!(err.contains("InvalidArgument") || err.contains("invalid"), "{err}");
    assert!(err.contains("not a DER PKCS#10"), "{err}");

    let mut tampered = csr(None);
    let n = tampered.len();
    tampered[n - 1] ^= 1;
    let err = anon.certify(tampered, tok(&id("x"))).await.unwrap_err().to_string();
    assert!(err.contains("signature does not verify"), "{err}");

    let rsa = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
    let rsa_csr = CertificateParams::default().serialize_request(&rsa).unwrap().der().to_vec();
    let err = anon.certify(rsa_csr, tok(&id("x"))).await.unwrap_err().to_string();
    assert!(err.contains("key type is not allowed"), "{err}");

    let err = anon.certify(vec![0x30; 17 * 1024], tok(&id("x"))).await.unwrap_err().to_string();
    assert!(err.contains("limit is 16384"), "{err}");

    let err =
        anon.certify(csr(None), Some(Credential::JoinToken(token_with_ttl(&cp, &id("x"), "0s")))).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");

    let err = anon.certify(csr(None), None).await.unwrap_err().to_string();
    assert!(err.contains("no credential"), "{err}");

    // None of the refusals spent a token or wrote a certificate.
    assert!(ledger_serials(&cp, &id("x")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_the_identity_of_the_certificate_and_refuses_expired_ones() {
    let dir = tempdir("renewal-attacks");
    let cp = ControlPlane::start(&dir, &[]).await;

    // Holder of A's certificate asks for B in the CSR: gets A.
    let cert_a = mint_client_cert(&cp.state, &id("a"), Duration::from_secs(600));
    let resp = client(&cp, Some(cert_a)).certify(csr(Some(&id("b"))), None).await.unwrap();
    assert_eq!(resp.spiffe_id, id("a"));
    let leaf = &palisade::tls::certs_from_pem(&resp.certificate_chain_pem).unwrap()[0];
    assert_eq!(palisade::tls::spiffe_id_of(leaf).unwrap().0.as_str(), id("a"));

    // An expired certificate renews nothing.
    let store = palisade::control::Store::open(&cp.state).unwrap();
    let material = store.ca_generations().unwrap().remove(0).material;
    let ca = palisade::identity::CertificateAuthority::load(material).unwrap();
    let expired = certified_by(&ca, &id("a"), SystemTime::now() - Duration::from_secs(60));
    let err = client(&cp, Some(expired)).certify(csr(None), None).await.unwrap_err();
    // The handshake itself is refused, before any RPC runs: the caller sees a transport failure
    // (the alert, a close or a broken pipe, depending on timing), and the control plane logs why.
    let palisade::agent::ControlClientError::Status(status) = &err else { panic!("{err}") };
    assert!(
        matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Unavailable),
        "expected a transport-level refusal, got {err}"
    );
    wait_for("the refusal logged with its reason", Duration::from_secs(5), || {
        let log = cp.proc.log_text();
        async move { log.contains("control-plane TLS handshake refused") && log.contains("reason=\"expired\"") }
    })
    .await;
    let a_certs = ledger_serials(&cp, &id("a"));
    assert_eq!(a_certs.len(), 1, "only the legitimate renewal is in the ledger");
    assert!(a_certs.contains(&resp.serial));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_survives_kill_dash_nine() {
    let dir = tempdir("ledger");
    let mut cp = ControlPlane::start(&dir, &[]).await;
    let resp =
        client(&cp, None).certify(csr(None), Some(Credential::JoinToken(cp.token(&id("durable"))))).await.unwrap();
    cp.proc.kill9(); // immediately after the answer: the row must already be on disk
    let listen = cp.listen;
    drop(cp);
    let cp = ControlPlane::start_at(&dir, listen, &[]).await;
    let out = std::process::Command::new(BIN).args(["status", "certs", "--state-dir"]).arg(&cp.state).output().unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains(&resp.serial) && table.contains(&id("durable")), "{table}");
}

/// Every issuance path goes through one revocation check: a revoked identity gets nothing from
/// a fresh join token (an operator's new token does not re-enrol it, since every sidecar would
/// refuse the certificate anyway) nor from renewing a certificate it still holds; the refusal
/// spends no token and writes no certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_identity_is_refused_on_every_issuance_path() {
    let dir = tempdir("revoked-issuance");
    let cp = ControlPlane::start(&dir, &[]).await;
    let held = mint_client_cert(&cp.state, &id("gone"), Duration::from_secs(600));
    let out = std::process::Command::new(BIN)
        .args(["control", "revoke", "--identity", &id("gone")])
        .args(cp.server_cli_args())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let token = cp.token(&id("gone"));
    let err = client(&cp, None).certify(csr(None), Some(Credential::JoinToken(token))).await.unwrap_err();
    let palisade::agent::ControlClientError::Status(status) = &err else { panic!("{err}") };
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(&format!("{} is revoked", id("gone"))), "{status:?}");

    let err = client(&cp, Some(held)).certify(csr(None), None).await.unwrap_err();
    let palisade::agent::ControlClientError::Status(status) = &err else { panic!("{err}") };
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("is revoked"), "{status:?}");
    assert!(ledger_serials(&cp, &id("gone")).is_empty(), "a refusal wrote a certificate");

    // Everyone else is served as before.
    let ok = client(&cp, None).certify(csr(None), Some(Credential::JoinToken(cp.token(&id("kept"))))).await.unwrap();
    assert_eq!(ok.spiffe_id, id("kept"));
}
