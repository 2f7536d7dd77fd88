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
    let err = d.stream(tokio_stream::iter(vec![first.clone()])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("certificate proves"), "{err}");
    // A stream that ends before its first request gets a clear refusal, not a hang.
    let err = d.stream(tokio_stream::iter(Vec::<DiscoveryRequest>::new())).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    // Without a workload certificate (server-authenticated TLS only) there is no stream at all.
    let bundle = palisade::tls::TrustBundle::from_pem(&std::fs::read_to_string(cp.root_pem_path()).unwrap()).unwrap();
    let anonymous = palisade::agent::ControlClient::new(
        &cp.listen.to_string(),
        bundle,
        palisade::tls::CertStore::new(),
        palisade::identity::SpiffeId::control_plane("cluster.local").unwrap(),
    );
    let mut d = DiscoveryClient::new(anonymous.channel().await.unwrap());
    let err = d.stream(tokio_stream::iter(vec![first])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
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

/// A discovery stream opened by hand as `sa` (registering no address), to see exactly what the
/// control plane sends.
struct RawStream {
    tx: tokio::sync::mpsc::Sender<palisade::proto::discovery::DiscoveryRequest>,
    responses: tonic::Streaming<palisade::proto::discovery::DiscoveryResponse>,
}

impl RawStream {
    /// Opens the stream, resuming from `version` (empty: a first start).
    async fn open(cp: &ControlPlane, sa: &str, version: &str) -> RawStream {
        use palisade::proto::discovery::{DiscoveryRequest, Node, discovery_client::DiscoveryClient};
        palisade::tls::install_crypto_provider();
        let certs = palisade::tls::CertStore::new();
        certs.set(mint_client_cert(&cp.state, &id(sa), Duration::from_secs(600)), i64::MAX);
        let bundle =
            palisade::tls::TrustBundle::from_pem(&std::fs::read_to_string(cp.root_pem_path()).unwrap()).unwrap();
        let control_id = palisade::identity::SpiffeId::control_plane("cluster.local").unwrap();
        let client = palisade::agent::ControlClient::new(&cp.listen.to_string(), bundle, certs, control_id);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let node = Node { spiffe_id: id(sa), ..Default::default() };
        tx.send(DiscoveryRequest { node: Some(node), version_info: version.into(), ..Default::default() })
            .await
            .unwrap();
        let responses = DiscoveryClient::new(client.channel().await.unwrap())
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        RawStream { tx, responses }
    }

    async fn next(&mut self) -> palisade::proto::discovery::DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.responses.message())
            .await
            .expect("no response within 10 s")
            .unwrap()
            .expect("the stream ended")
    }

    async fn ack(&self, resp: &palisade::proto::discovery::DiscoveryResponse) {
        let ack = palisade::proto::discovery::DiscoveryRequest {
            version_info: resp.version_info.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        self.tx.send(ack).await.unwrap();
    }
}

/// The endpoint table a sidecar runs, from its `/config_dump`.
async fn table_of(sidecar: &Sidecar) -> (serde_json::Value, serde_json::Value) {
    let dump = sidecar.config_dump().await;
    (dump["mesh"]["endpoints"].clone(), dump["discovery"]["version"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_fed_joins_and_leaves_as_deltas_ends_with_the_table_of_a_fresh_one() {
    let dir = tempdir("discovery-deltas");
    let cp = ControlPlane::start(&dir, &["--endpoint-grace", "1s"]).await;
    let app = EchoApp::start().await;
    let observer = Sidecar::start(&cp, "observer", Some(app.addr), &[]).await;
    let b = Sidecar::spawn(&cp, "b", Some(app.addr), &[], &[]);
    let mut c = Sidecar::spawn(&cp, "c", Some(app.addr), &[], &[]);
    let d = Sidecar::spawn(&cp, "d", Some(app.addr), &[], &[]);
    for s in [&b, &c, &d] {
        s.wait_ready().await;
    }
    let address = |s: &Sidecar| s.inbound.unwrap().to_string();
    wait_for("the joins reached the observer", Duration::from_secs(10), || async {
        let (table, _) = table_of(&observer).await;
        [&b, &c, &d].iter().all(|s| table[address(s)] == s.identity)
    })
    .await;
    c.proc.kill9();
    wait_for("c's leave reached the observer", Duration::from_secs(10), || async {
        table_of(&observer).await.0.get(address(&c)).is_none()
    })
    .await;

    let e = Sidecar::start(&cp, "e", Some(app.addr), &[]).await;
    wait_for("e's join reached the observer", Duration::from_secs(10), || async {
        table_of(&observer).await.0.get(address(&e)).is_some()
    })
    .await;

    // A stream that connects now is sent the table in full; the observer runs the same.
    let full = RawStream::open(&cp, "fresh", "").await.next().await;
    let snapshot = full.snapshot.expect("a new stream gets a full snapshot");
    let sent: serde_json::Map<String, serde_json::Value> =
        snapshot.endpoints.iter().map(|ep| (ep.address.clone(), ep.spiffe_id.clone().into())).collect();
    assert_eq!(sent.len(), 4, "observer, b, d and e: {sent:?}");
    wait_for("the observer runs the version sent in full", Duration::from_secs(10), || async {
        table_of(&observer).await == (sent.clone().into(), full.version_info.clone().into())
    })
    .await;

    // How the observer got there: one full snapshot, then deltas only.
    let log = observer.proc.log_text();
    let applied: Vec<&str> = log.lines().filter(|l| l.contains("snapshot applied")).collect();
    assert_eq!(applied.iter().filter(|l| l.contains("delta=false")).count(), 1, "{applied:#?}");
    assert!(applied.iter().filter(|l| l.contains("delta=true")).count() >= 3, "{applied:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_is_sent_to_a_connected_sidecar_as_a_delta_of_its_one_entry() {
    let dir = tempdir("discovery-join-delta");
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = EchoApp::start().await;
    let web = Sidecar::start(&cp, "web", Some(app.addr), &[]).await;
    let mut watcher = RawStream::open(&cp, "watcher", "").await;
    let first = watcher.next().await;
    assert!(first.delta.is_none(), "a new stream starts with a full snapshot");
    let full = first.snapshot.clone().expect("a full snapshot");
    assert_eq!(full.endpoints.iter().map(|e| &e.spiffe_id).collect::<Vec<_>>(), [&web.identity]);
    watcher.ack(&first).await;

    let orders = Sidecar::spawn(&cp, "orders", Some(app.addr), &[], &[]);
    let next = watcher.next().await;
    assert!(next.snapshot.is_none(), "a join is not sent as the whole table");
    let delta = next.delta.clone().expect("a delta");
    assert_eq!(delta.base_version, first.version_info, "from the version the watcher ACKed");
    assert_eq!(delta.config, None, "nothing but the table changed");
    assert!(delta.removed.is_empty());
    let added: Vec<_> = delta.added.iter().map(|e| (e.address.clone(), e.spiffe_id.clone())).collect();
    assert_eq!(added, [(orders.inbound.unwrap().to_string(), orders.identity.clone())], "only the new entry");

    // Applied to what the watcher ran, it is what a new stream is sent in full.
    let applied = palisade::agent::discovery::apply_delta(&first.version_info, &full, &delta).unwrap();
    let mut late = RawStream::open(&cp, "late", "").await;
    let late_first = late.next().await;
    assert_eq!(late_first.version_info, next.version_info);
    assert_eq!(Some(applied), late_first.snapshot);
}

/// One response in flight per stream: changes made while a sidecar has not answered reach it as
/// one delta once it does, not one response per change queued behind a slow reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_a_sidecar_has_not_answered_reach_it_as_one_delta_when_it_does() {
    let dir = tempdir("discovery-ack-paced");
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = EchoApp::start().await;
    let observer = Sidecar::start(&cp, "observer", Some(app.addr), &[]).await;
    let mut slow = RawStream::open(&cp, "slow", "").await;
    let first = slow.next().await;
    // Two joins in two separate pushes (the observer runs the first before the second starts);
    // the slow stream answers neither meanwhile.
    let b = Sidecar::start(&cp, "b", Some(app.addr), &[]).await;
    wait_for("b's join pushed", Duration::from_secs(10), || async {
        table_of(&observer).await.0[b.inbound.unwrap().to_string()] == b.identity
    })
    .await;
    let c = Sidecar::start(&cp, "c", Some(app.addr), &[]).await;
    wait_for("c's join pushed", Duration::from_secs(10), || async {
        table_of(&observer).await.0[c.inbound.unwrap().to_string()] == c.identity
    })
    .await;
    slow.ack(&first).await;
    let next = slow.next().await;
    let delta = next.delta.expect("a delta from the version the stream ACKed");
    assert_eq!(delta.base_version, first.version_info);
    let mut added: Vec<_> = delta.added.iter().map(|e| e.spiffe_id.clone()).collect();
    added.sort();
    assert_eq!(added, [b.identity.clone(), c.identity.clone()], "both joins in the one response");
    let (_, observer_version) = table_of(&observer).await;
    assert_eq!(serde_json::Value::from(next.version_info), observer_version, "straight to the newest version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resuming_from_an_unknown_or_old_version_gets_a_full_snapshot() {
    let dir = tempdir("discovery-resume-full");
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = EchoApp::start().await;
    let _web = Sidecar::start(&cp, "web", Some(app.addr), &[]).await;
    let mut first = RawStream::open(&cp, "watcher", "").await;
    let old = first.next().await;
    first.ack(&old).await;
    let orders = Sidecar::start(&cp, "orders", Some(app.addr), &[]).await;
    let current = first.next().await;
    assert!(current.delta.is_some());
    drop(first);

    for resume in ["0123456789abcdef", old.version_info.as_str()] {
        let mut stream = RawStream::open(&cp, "watcher", resume).await;
        let resp = stream.next().await;
        assert!(resp.delta.is_none(), "resuming from {resume}: {resp:?}");
        assert_eq!(resp.version_info, current.version_info);
        let snapshot = resp.snapshot.expect("a full snapshot");
        assert!(snapshot.endpoints.iter().any(|e| e.spiffe_id == orders.identity), "the whole table");
    }
}
