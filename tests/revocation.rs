//! Revocation: made by an administrator through the management API, pushed to every sidecar
//! within a second; new handshakes and open connections of the revoked peer are refused,
//! everyone else carries on.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_identity_is_refused_by_every_sidecar_within_a_second() {
    let dir = tempdir("revoke");
    let cp = ControlPlane::start(&dir, &[]).await;
    let (app_b, app_d) = (EchoApp::start().await, EchoApp::start().await);
    let b = Sidecar::start(&cp, "b", Some(app_b.addr), &[]).await;
    let d = Sidecar::start(&cp, "d", Some(app_d.addr), &[]).await;
    let (a_to_b, a_to_d, c_to_b) = (free_addr(), free_addr(), free_addr());
    let _a = Sidecar::start(
        &cp,
        "a",
        None,
        &[
            format!("{a_to_b}={}@{}", b.inbound.unwrap(), id("b")),
            format!("{a_to_d}={}@{}", d.inbound.unwrap(), id("d")),
        ],
    )
    .await;
    let _c = Sidecar::start(&cp, "c", None, &[format!("{c_to_b}={}@{}", b.inbound.unwrap(), id("b"))]).await;

    // A keep-alive client keeps A's pooled mTLS connections to B and D open.
    let client = http_client();
    for url in [format!("http://{a_to_b}/"), format!("http://{a_to_d}/"), format!("http://{c_to_b}/")] {
        assert_eq!(get(&client, &url, &[]).await.unwrap().0, 200, "{url} before revocation");
    }

    // An uncooperative holder of A's certificate keeps its own connection to B open: B itself
    // must cut it, whatever A's sidecar does.
    let roots = std::fs::read_to_string(cp.root_pem_path()).unwrap();
    let a_cert = mint_client_cert(&cp.state, &id("a"), Duration::from_secs(600));
    let mut held = {
        let bundle = palisade::tls::TrustBundle::from_pem(&roots).unwrap();
        let store = palisade::tls::CertStore::new();
        store.set(a_cert.clone(), i64::MAX);
        let cfg = palisade::tls::config::client_config(store, bundle, None, &[b"http/1.1"]);
        let tcp = tokio::net::TcpStream::connect(b.inbound.unwrap()).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(cfg).connect(palisade::tls::config::sni(), tcp).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        sender
    };
    let req =
        || http::Request::get("/").header("host", "b").body(http_body_util::Full::new(bytes::Bytes::new())).unwrap();
    assert_eq!(held.send_request(req()).await.unwrap().status(), 200, "held connection works before revocation");

    // An administrator (logged in beforehand) revokes A through the management API.
    let server = cp.server_cli_args();
    let revoked_at = Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["control", "revoke", "--identity", &id("a")])
        .args(&server)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for url in [format!("http://{a_to_b}/"), format!("http://{a_to_d}/")] {
        let client = client.clone();
        wait_for(&format!("{url} refused"), Duration::from_secs(3), || {
            let (client, url) = (client.clone(), url.clone());
            async move { get(&client, &url, &[]).await.map(|r| r.0) != Ok(200) }
        })
        .await;
    }
    wait_for("held connection cut by B", Duration::from_secs(3), || {
        let closed = held.is_closed();
        async move { closed }
    })
    .await;
    assert!(held.send_request(req()).await.is_err());
    let elapsed = revoked_at.elapsed();
    assert!(elapsed < Duration::from_secs(1), "revocation took {elapsed:?} to reach every sidecar");

    // Stays refused (not a blip), and C is unaffected.
    for _ in 0..5 {
        let (status, headers, _) = get(&client, &format!("http://{a_to_b}/"), &[]).await.unwrap();
        assert_eq!(status, 502);
        assert!(headers.get("x-palisade-error").is_some());
        assert_eq!(get(&client, &format!("http://{c_to_b}/"), &[]).await.unwrap().0, 200);
    }
    // A fresh handshake presenting a valid, unexpired certificate for A is refused too.
    let probe = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let bundle = palisade::tls::TrustBundle::from_pem(&roots).unwrap();
        let store = palisade::tls::CertStore::new();
        store.set(a_cert, i64::MAX);
        let cfg = palisade::tls::config::client_config(store, bundle, None, &[b"http/1.1"]);
        let tcp = tokio::net::TcpStream::connect(b.inbound.unwrap()).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(cfg).connect(palisade::tls::config::sni(), tcp).await.ok()?;
        tls.write_all(b"GET / HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n").await.ok()?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.ok()?;
        Some(buf)
    };
    let answer = probe.await;
    assert!(answer.as_ref().is_none_or(|b| b.is_empty()), "revoked identity was served: {answer:?}");
    let metrics = b.metrics().await;
    assert!(metric(&metrics, "palisade_tls_handshake_failures_total", "reason=\"revoked\"") >= 1.0, "{metrics}");
    // The audit log names the administrator, the call and what it revoked.
    let audit = std::fs::read_to_string(cp.state.join("audit.log")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("\"call\":\"Revoke\"")
            && l.contains("spiffe://cluster.local/admin/tests")
            && l.contains(&id("a"))
            && l.contains("\"result\":\"allowed\"")),
        "{audit}"
    );
}
