//! The endpoint table holds only addresses a workload proved: a valid certificate alone does not
//! let a workload pin someone else's address (or any address) to its identity.

mod common;

use std::time::Duration;

use common::*;
use palisade::proto::discovery::discovery_client::DiscoveryClient;
use palisade::proto::discovery::{DiscoveryRequest, DiscoveryResponse, Node};

async fn sidecars_json(cp: &ControlPlane) -> Vec<serde_json::Value> {
    cp.api_json("sidecars").await.as_array().unwrap().clone()
}

async fn entry_of(cp: &ControlPlane, identity: &str) -> Option<serde_json::Value> {
    sidecars_json(cp).await.into_iter().find(|s| s["spiffe_id"] == identity && s["connected"] == true)
}

/// A raw Discovery stream with a certificate minted for `identity` (what a workload holding a
/// valid certificate can send), registering `addresses`. Returns the first snapshot and the
/// request sender, which keeps the stream open while it lives.
async fn register_raw(
    cp: &ControlPlane,
    identity: &str,
    addresses: &[&str],
) -> (DiscoveryResponse, tokio::sync::mpsc::Sender<DiscoveryRequest>, tonic::Streaming<DiscoveryResponse>) {
    register_raw_via(cp, &cp.listen.to_string(), identity, addresses).await
}

/// [`register_raw`] dialling the control plane at `via`.
async fn register_raw_via(
    cp: &ControlPlane,
    via: &str,
    identity: &str,
    addresses: &[&str],
) -> (DiscoveryResponse, tokio::sync::mpsc::Sender<DiscoveryRequest>, tonic::Streaming<DiscoveryResponse>) {
    palisade::tls::install_crypto_provider();
    let cert = mint_client_cert(&cp.state, identity, Duration::from_secs(600));
    let bundle = palisade::tls::TrustBundle::from_pem(&std::fs::read_to_string(cp.root_pem_path()).unwrap()).unwrap();
    let store = palisade::tls::CertStore::new();
    store.set(cert, i64::MAX);
    let client = palisade::agent::ControlClient::new(
        via,
        bundle,
        store,
        palisade::identity::SpiffeId::control_plane("cluster.local").unwrap(),
    );
    let mut d = DiscoveryClient::new(client.channel().await.unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let node = Node {
        spiffe_id: identity.to_string(),
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    tx.send(DiscoveryRequest { node: Some(node), ..Default::default() }).await.unwrap();
    let mut responses = d.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = responses.message().await.unwrap().expect("a first snapshot");
    (first, tx, responses)
}

fn token_with_addresses(cp: &ControlPlane, identity: &str, addresses: &str) -> std::path::PathBuf {
    let out = std::process::Command::new(BIN)
        .args(["control", "token", "create", "--state-dir"])
        .arg(&cp.state)
        .args(["--identity", identity, "--address", addresses])
        .output()
        .unwrap();
    assert!(out.status.success(), "token create failed: {}", String::from_utf8_lossy(&out.stderr));
    let file = cp.dir.join(format!("bound-{}.token", rand::random::<u32>()));
    std::fs::write(&file, String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_certificate_does_not_pin_another_workloads_address() {
    let dir = tempdir("endpoint-proof");
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = EchoApp::start().await;
    let orders = Sidecar::start(&cp, "orders", Some(app.addr), &[]).await;
    let orders_in = orders.inbound.unwrap().to_string();
    // The honest loopback claim is proven (its port answers with orders' certificate).
    wait_for("orders' own address in its table", Duration::from_secs(10), || async {
        orders.config_dump().await["mesh"]["endpoints"][&orders_in] == id("orders")
    })
    .await;

    // Mallory holds a valid certificate and claims orders' address, an IP it does not connect
    // from, every loopback port, a loopback port nobody serves, and the unspecified address.
    let unserved = free_addr().to_string();
    let claims = [orders_in.as_str(), "10.9.9.9:0", "127.0.0.1:0", unserved.as_str(), "0.0.0.0:80", "nonsense"];
    let (snapshot, _keep_open, _responses) = register_raw(&cp, &id("mallory"), &claims).await;
    let endpoints = snapshot.snapshot.unwrap().endpoints;
    assert!(!endpoints.iter().any(|e| e.spiffe_id == id("mallory")), "mallory pinned an address: {endpoints:?}");
    assert!(endpoints.iter().any(|e| e.address == orders_in && e.spiffe_id == id("orders")));

    // The refusal and its reasons are visible to the operator.
    let mallory = entry_of(&cp, &id("mallory")).await.expect("mallory's entry");
    assert_eq!(mallory["addresses"], serde_json::json!([]), "{mallory}");
    let refused = mallory["refused_addresses"].as_array().unwrap();
    assert_eq!(refused.len(), claims.len(), "{mallory}");
    let reason = |address: &str| {
        refused.iter().find(|r| r["address"] == address).map(|r| r["reason"].as_str().unwrap().to_string()).unwrap()
    };
    assert!(reason(&orders_in).contains("does not answer with this identity's certificate"), "{mallory}");
    assert!(reason("10.9.9.9:0").contains("source of its connection"), "{mallory}");
    assert!(reason("127.0.0.1:0").contains("claim one port"), "{mallory}");
    let status = std::process::Command::new(BIN).arg("status").args(cp.server_cli_args()).output().unwrap();
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(table.contains("refused") && table.contains("10.9.9.9:0"), "{table}");

    // No sidecar's table names mallory, and orders' address still means orders.
    let dump = orders.config_dump().await;
    assert_eq!(dump["mesh"]["endpoints"][&orders_in], id("orders"));
    assert!(!dump["mesh"]["endpoints"].to_string().contains("mallory"), "{}", dump["mesh"]["endpoints"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_bound_to_the_join_token_is_accepted_and_stays_with_the_identity() {
    let dir = tempdir("endpoint-bound");
    let cp = ControlPlane::start(&dir, &[]).await;
    let watcher = Sidecar::start(&cp, "watcher", None, &[]).await;
    let spawn_with_pod_ip = |name: &str, token: std::path::PathBuf, ip: &str| {
        let args: Vec<String> = [
            "--control",
            &cp.listen.to_string(),
            "--ca-bundle",
            cp.root_pem_path().to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
            "--admin",
            &free_addr().to_string(),
            "--pod-ip",
            ip,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Proc::spawn_proxy(name, &cp.dir, &args)
    };
    // A workload whose token binds 10.1.2.3 registers it; one without a binding claims 10.1.2.4.
    let _bound = spawn_with_pod_ip("bound", token_with_addresses(&cp, &id("bound"), "10.1.2.3"), "10.1.2.3");
    let stray_token = cp.dir.join("stray.token");
    std::fs::write(&stray_token, cp.token(&id("stray"))).unwrap();
    let _stray = spawn_with_pod_ip("stray", stray_token, "10.1.2.4");

    wait_for("the bound address in another sidecar's table", Duration::from_secs(15), || async {
        watcher.config_dump().await["mesh"]["endpoints"]["10.1.2.3:0"] == id("bound")
    })
    .await;
    wait_for("the stray claim refused", Duration::from_secs(15), || async {
        entry_of(&cp, &id("stray")).await.is_some_and(|e| {
            e["refused_addresses"].as_array().is_some_and(|r| r.iter().any(|r| r["address"] == "10.1.2.4:0"))
        })
    })
    .await;
    assert!(watcher.config_dump().await["mesh"]["endpoints"].get("10.1.2.4:0").is_none());

    // The binding belongs to the identity, not to the certificate the token bought: a renewed
    // certificate of the same identity (a fresh one from the CA) still proves it.
    let (snapshot, _keep_open, _responses) = register_raw(&cp, &id("bound"), &["10.1.2.3:0", "10.1.2.5:0"]).await;
    let endpoints = snapshot.snapshot.unwrap().endpoints;
    assert!(endpoints.iter().any(|e| e.address == "10.1.2.3:0" && e.spiffe_id == id("bound")));
    assert!(!endpoints.iter().any(|e| e.address == "10.1.2.5:0"), "only what the token bound: {endpoints:?}");
}

/// This machine's first non-loopback IPv4 address, if it has one.
fn host_ip() -> Option<std::net::IpAddr> {
    // Connecting a UDP socket sends nothing; it picks the source address a route would use.
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    probe.connect("192.0.2.200:9").ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_address_proves_a_claim_unless_another_identity_connects_from_it_too() {
    let Some(ip) = host_ip() else {
        panic!("this test needs a non-loopback IPv4 address to connect from");
    };
    let dir = tempdir("endpoint-source");
    let port = free_addr().port();
    let listen = format!("0.0.0.0:{port}");
    let cp = ControlPlane::start_at(&dir, listen.parse().unwrap(), &[]).await;
    let via = format!("{ip}:{port}");
    let claim = format!("{ip}:0");
    // The first workload connecting from the address proves it by its connection.
    let (first, _a, _ra) = register_raw_via(&cp, &via, &id("first"), &[&claim]).await;
    let endpoints = first.snapshot.unwrap().endpoints;
    assert!(endpoints.iter().any(|e| e.address == claim && e.spiffe_id == id("first")), "{endpoints:?}");
    // A second identity behind the same address (a NAT) proves nothing by it.
    let (second, _b, _rb) = register_raw_via(&cp, &via, &id("second"), &[&claim]).await;
    let endpoints = second.snapshot.unwrap().endpoints;
    assert!(!endpoints.iter().any(|e| e.spiffe_id == id("second")), "{endpoints:?}");
    let entry = entry_of(&cp, &id("second")).await.unwrap();
    assert!(entry["refused_addresses"][0]["reason"].as_str().unwrap().contains("another identity"), "{entry}");
}
