//! The traffic graph records only what the reporting identity can vouch for: a workload with a
//! valid certificate cannot put edges of another destination into the traffic graph.

mod common;

use std::time::Duration;

use common::*;
use palisade::proto::telemetry::telemetry_client::TelemetryClient;
use palisade::proto::telemetry::{PeerCounters, TelemetryReport};

async fn traffic(cp: &ControlPlane) -> Vec<serde_json::Value> {
    cp.api_json("traffic").await.as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reporter_cannot_add_edges_of_another_destination() {
    let dir = tempdir("telemetry-attribution");
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = EchoApp::start().await;
    let fast = ["--telemetry-interval", "200ms"];
    let orders = Sidecar::spawn(&cp, "orders", Some(app.addr), &[], &fast);
    orders.wait_ready().await;
    let route = free_addr();
    let web =
        Sidecar::spawn(&cp, "web", None, &[format!("{route}={}@{}", orders.inbound.unwrap(), id("orders"))], &fast);
    web.wait_ready().await;

    // Mallory holds a valid certificate and reports, under orders' name, a flood of calls it
    // made to orders and calls web made to orders.
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
    let mut telemetry = TelemetryClient::new(client.channel().await.unwrap());
    let forged = TelemetryReport {
        spiffe_id: id("orders"),
        peers: vec![
            PeerCounters {
                peer_spiffe_id: id("orders"),
                direction: "outbound".into(),
                requests: 1000,
                handshake_failures: 900,
                ..Default::default()
            },
            PeerCounters {
                peer_spiffe_id: id("web"),
                direction: "outbound".into(),
                requests: 1000,
                denials: 1000,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    telemetry.report(tokio_stream::iter(vec![forged])).await.expect("the report stream is accepted");

    // Honest traffic still shows, as the destination counted it.
    let client = http_client_unpooled();
    for _ in 0..3 {
        assert_eq!(get(&client, &format!("http://{route}/x"), &[]).await.unwrap().0, 200);
    }
    wait_for("the honest edge web -> orders", Duration::from_secs(10), || async {
        traffic(&cp)
            .await
            .iter()
            .any(|e| e["source"] == id("web") && e["destination"] == id("orders") && e["requests"] == 3)
    })
    .await;
    let edges = traffic(&cp).await;
    assert!(
        !edges.iter().any(|e| e["source"] == id("mallory") || e["destination"] == id("web")),
        "forged edges recorded: {edges:#?}"
    );
    let honest = edges.iter().find(|e| e["source"] == id("web") && e["destination"] == id("orders")).unwrap();
    assert_eq!(honest["handshake_failures"], 0, "{honest}");
    assert!(cp.proc.log_text().contains("telemetry the reporter cannot vouch for"), "the drop is logged");
}
