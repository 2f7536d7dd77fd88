//! Discovery: resources and endpoints reach the sidecars they concern, versioned and ACKed.

mod common;

use std::time::{Duration, Instant};

use common::*;

const PERMISSIVE_ORDERS: &str = "apiVersion: palisade.io/v1alpha1
kind: PeerAuthentication
metadata: {name: orders, namespace: test}
spec:
  selector: {matchLabels: {app: orders}}
  mtls: {mode: PERMISSIVE}
";

async fn sidecars_json(cp: &ControlPlane) -> serde_json::Value {
    cp.api_json("sidecars").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_reach_only_the_selected_sidecars_and_edits_apply_within_a_second() {
    let dir = tempdir("discovery");
    let resources = dir.join("resources");
    std::fs::create_dir_all(&resources).unwrap();
    std::fs::write(resources.join("pa.yaml"), PERMISSIVE_ORDERS).unwrap();
    let res = resources.display().to_string();
    let cp = ControlPlane::start(&dir, &["--resources", &res]).await;
    let app = EchoApp::start().await;
    let orders = Sidecar::spawn(&cp, "orders", Some(app.addr), &[], &["--label", "app=orders"]);
    let web = Sidecar::spawn(&cp, "web", Some(app.addr), &[], &["--label", "app=web"]);
    orders.wait_ready().await;
    web.wait_ready().await;

    // Only the selected workload is PERMISSIVE.
    assert_eq!(orders.config_dump().await["mesh"]["peer_auth"], "Permissive");
    assert_eq!(web.config_dump().await["mesh"]["peer_auth"], "Strict");

    // Each sidecar knows the other's inbound address and identity (the endpoint table).
    let orders_in = orders.inbound.unwrap().to_string();
    let web_in = web.inbound.unwrap().to_string();
    wait_for("endpoint table on both sides", Duration::from_secs(5), || async {
        let a = web.config_dump().await;
        let b = orders.config_dump().await;
        a["mesh"]["endpoints"][&orders_in] == id("orders") && b["mesh"]["endpoints"][&web_in] == id("web")
    })
    .await;

    // Edit: orders goes back to STRICT; it applies within a second, and web is not pushed.
    let web_version = web.config_dump().await["mesh"]["version"].clone();
    let edited = Instant::now();
    std::fs::write(resources.join("pa.yaml"), PERMISSIVE_ORDERS.replace("PERMISSIVE", "STRICT")).unwrap();
    wait_for("edit applied", Duration::from_secs(5), || async {
        orders.config_dump().await["mesh"]["peer_auth"] == "Strict"
    })
    .await;
    assert!(edited.elapsed() < Duration::from_secs(1), "took {:?}", edited.elapsed());
    assert_eq!(web.config_dump().await["mesh"]["version"], web_version, "web's snapshot did not change, so no push");

    // The control plane shows every sidecar ACKed the version it was pushed.
    wait_for("all ACKed", Duration::from_secs(5), || async {
        let s = sidecars_json(&cp).await;
        s.as_array().unwrap().len() == 2
            && s.as_array().unwrap().iter().all(|e| e["acked_version"] == e["pushed_version"] && e["connected"] == true)
    })
    .await;

    // A broken file is reported with file and document, and the last good content stays.
    std::fs::write(
        resources.join("pa.yaml"),
        "apiVersion: palisade.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: x}\nspec: {}\n",
    )
    .unwrap();
    wait_for("error reported", Duration::from_secs(5), || async {
        let body = cp.api_json("resource_errors").await.to_string();
        body.contains("pa.yaml:1: document 0") && body.contains("metadata.namespace")
    })
    .await;
    assert_eq!(orders.config_dump().await["mesh"]["peer_auth"], "Strict");
    let pushed = sidecars_json(&cp).await;
    assert!(
        pushed.as_array().unwrap().iter().all(|e| e["nack_message"] == ""),
        "the refused document never reached a sidecar: {pushed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_keep_their_snapshot_through_a_control_plane_restart_and_resume() {
    let dir = tempdir("discovery-restart");
    let resources = dir.join("resources");
    std::fs::create_dir_all(&resources).unwrap();
    std::fs::write(resources.join("pa.yaml"), PERMISSIVE_ORDERS).unwrap();
    let res = resources.display().to_string();
    let mut cp = ControlPlane::start(&dir, &["--resources", &res]).await;
    let app = EchoApp::start().await;
    let orders = Sidecar::spawn(&cp, "orders", Some(app.addr), &[], &["--label", "app=orders"]);
    orders.wait_ready().await;
    let version = orders.config_dump().await["mesh"]["version"].clone();

    cp.proc.kill9();
    wait_for("stream noticed the loss", Duration::from_secs(10), || async {
        orders.config_dump().await["discovery"]["connected"] == false
    })
    .await;
    // Still serving from the cached snapshot.
    assert_eq!(orders.config_dump().await["mesh"]["peer_auth"], "Permissive");
    assert_eq!(status_of(&format!("http://{}/ready", orders.admin)).await, Some(200));

    // Changed while the control plane was down; picked up after it returns.
    std::fs::write(resources.join("pa.yaml"), PERMISSIVE_ORDERS.replace("PERMISSIVE", "STRICT")).unwrap();
    let listen = cp.listen;
    drop(cp);
    let _cp = ControlPlane::start_at(&dir, listen, &["--resources", &res]).await;
    wait_for("reconnected and updated", Duration::from_secs(15), || async {
        let d = orders.config_dump().await;
        d["discovery"]["connected"] == true && d["mesh"]["peer_auth"] == "Strict"
    })
    .await;
    assert_ne!(orders.config_dump().await["mesh"]["version"], version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_cannot_register_another_identity() {
    // The node identity must be the one the certificate proves; checked with a raw stream.
    use palisade::proto::discovery::{DiscoveryRequest, Node, discovery_client::DiscoveryClient};
    let dir = tempdir("discovery-spoof");
    let cp = ControlPlane::start(&dir, &[]).await;
    palisade::tls::install_crypto_provider();
    let cert = mint_client_cert(&cp.state, &id("mallory"), Duration::from_secs(600));
    let bundle = palisade::tls::TrustBundle::from_pem(&std::fs::read_to_string(cp.root_pem_path()).unwrap()).unwrap();
    let store = palisade::tls::CertStore::new();
    store.set(cert, i64::MAX);
    let client = palisade::agent::ControlClient::new(
        &cp.listen.to_string(),
        bundle,
        store,
        palisade::identity::SpiffeId::control_plane("cluster.local").unwrap(),
    );
    let mut d = DiscoveryClient::new(client.channel().await.unwrap());
    let first = DiscoveryRequest {
        node: Some(Node { spiffe_id: id("payments"), addresses: vec!["127.0.0.1:1".into()], ..Default::default() }),
        ..Default::default()
    };
    let err = d.stream(tokio_stream::iter(vec![first])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("certificate proves"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_of_the_control_plane_under_traffic_loses_nothing() {
    let dir = tempdir("cp-kill");
    let resources = dir.join("resources");
    std::fs::create_dir_all(&resources).unwrap();
    let res = resources.display().to_string();
    let mut cp = ControlPlane::start(&dir, &["--resources", &res]).await;
    let app = EchoApp::start().await;
    let b = Sidecar::spawn(&cp, "b", Some(app.addr), &[], &["--label", "app=b"]);
    b.wait_ready().await;
    let route = free_addr();
    let _a = Sidecar::start(&cp, "a", None, &[format!("{route}={}@{}", b.inbound.unwrap(), id("b"))]).await;
    let issued_before: std::collections::BTreeSet<String> = {
        let store = palisade::control::Store::open(&cp.state).unwrap();
        store.certificates(None, 1000).unwrap().into_iter().map(|r| r.serial).collect()
    };
    assert!(issued_before.len() >= 3, "control plane + two sidecars");

    let traffic = Traffic::start(format!("http://{route}/steady"), Duration::from_millis(20));
    wait_for("traffic flowing", Duration::from_secs(5), || {
        let ok = traffic.ok.load(std::sync::atomic::Ordering::SeqCst);
        async move { ok > 20 }
    })
    .await;
    let listen = cp.listen;
    cp.proc.kill9();
    let ok_at_kill = traffic.ok.load(std::sync::atomic::Ordering::SeqCst);
    // While it is down: a policy that denies /blocked on b is written.
    std::fs::write(
        resources.join("deny.yaml"),
        "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-blocked, namespace: test}\n\
         spec:\n  selector: {matchLabels: {app: b}}\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/blocked\"]}}]\n",
    )
    .unwrap();
    let client = http_client();
    assert_eq!(get(&client, &format!("http://{route}/blocked"), &[]).await.unwrap().0, 200, "old set still in force");
    // Traffic keeps flowing while no control plane runs at all.
    wait_for("traffic flowing with the control plane dead", Duration::from_secs(5), || {
        let ok = traffic.ok.load(std::sync::atomic::Ordering::SeqCst);
        async move { ok > ok_at_kill + 10 }
    })
    .await;
    drop(cp);
    let cp = ControlPlane::start_at(&dir, listen, &["--resources", &res]).await;
    wait_for("the change made during the outage reaches b", Duration::from_secs(15), || async {
        get(&client, &format!("http://{route}/blocked"), &[]).await.map(|r| r.0) == Ok(403)
    })
    .await;
    let (ok, failed, failures) = traffic.finish().await;
    assert_eq!(failed, 0, "{:?}", &failures[..failures.len().min(5)]);
    assert!(ok > ok_at_kill + 10, "traffic kept flowing through the outage ({ok_at_kill} -> {ok})");
    let store = palisade::control::Store::open(&cp.state).unwrap();
    let after: std::collections::BTreeSet<String> =
        store.certificates(None, 1000).unwrap().into_iter().map(|r| r.serial).collect();
    assert!(issued_before.is_subset(&after), "the ledger lost certificates issued before the kill");
}
