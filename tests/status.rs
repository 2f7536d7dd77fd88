//! Telemetry reaches the control plane and `palisade status` shows sidecars and the traffic graph.

mod common;

use std::time::Duration;

use common::*;

const ONLY_GET: &str = "apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: only-get, namespace: test}
spec:
  action: ALLOW
  rules:
  - to: [{operation: {methods: [GET]}}]
";

fn status(cp: &ControlPlane, json: bool) -> String {
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("status").args(cp.server_cli_args());
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_sidecars_and_who_calls_whom_with_denials() {
    let dir = tempdir("status");
    let resources = dir.join("resources");
    std::fs::create_dir_all(&resources).unwrap();
    std::fs::write(resources.join("p.yaml"), ONLY_GET).unwrap();
    let res = resources.display().to_string();
    let cp = ControlPlane::start(&dir, &["--resources", &res, "--default-policy", "deny"]).await;
    let app = EchoApp::start().await;
    let fast = ["--telemetry-interval", "200ms", "--label", "app=orders"];
    let orders = Sidecar::spawn(&cp, "orders", Some(app.addr), &[], &fast);
    orders.wait_ready().await;
    let route = free_addr();
    let web = Sidecar::spawn(
        &cp,
        "web",
        None,
        &[format!("{route}={}@{}", orders.inbound.unwrap(), id("orders"))],
        &fast[..2],
    );
    web.wait_ready().await;

    let client = http_client_unpooled();
    for _ in 0..6 {
        assert_eq!(get(&client, &format!("http://{route}/x"), &[]).await.unwrap().0, 200);
    }
    let post =
        http::Request::post(format!("http://{route}/x")).body(http_body_util::Full::new(bytes::Bytes::new())).unwrap();
    assert_eq!(client.request(post).await.unwrap().status(), 403);

    wait_for("traffic edge web -> orders", Duration::from_secs(10), || async {
        let report: serde_json::Value = serde_json::from_str(&status(&cp, true)).unwrap();
        report["traffic"].as_array().unwrap().iter().any(|e| {
            e["source"] == id("web") && e["destination"] == id("orders") && e["requests"] == 7 && e["denials"] == 1
        })
    })
    .await;
    let report: serde_json::Value = serde_json::from_str(&status(&cp, true)).unwrap();
    let sidecars = report["sidecars"].as_array().unwrap();
    let orders_entry = sidecars.iter().find(|s| s["spiffe_id"] == id("orders")).unwrap();
    assert_eq!(orders_entry["labels"]["app"], "orders");
    assert_eq!(orders_entry["addresses"][0], orders.inbound.unwrap().to_string());
    assert_eq!(orders_entry["acked_version"], orders_entry["pushed_version"]);
    assert!(orders_entry["certificate_not_after"].as_i64().unwrap() > 0);

    let table = status(&cp, false);
    assert!(table.contains("SIDECARS (2)") && table.contains("ACK") && table.contains("app=orders"), "{table}");
    let edge = table.lines().find(|l| l.starts_with(&id("web")) && l.contains(&format!("-> {}", id("orders"))));
    assert!(edge.is_some_and(|l| l.contains(" 7 ") && l.contains("14%")), "{table}");

    // The policy selects both sidecars (namespace `test`, no selector) and both run it.
    let resources = report["resources"].as_array().unwrap();
    let only_get = resources.iter().find(|r| r["name"] == "only-get").expect("the policy in force");
    assert_eq!((&only_get["selected"], &only_get["current"], &only_get["nacked"]), (&2.into(), &2.into(), &0.into()));
    let line = table.lines().find(|l| l.starts_with("AuthorizationPolicy") && l.contains("test/only-get"));
    assert!(line.is_some_and(|l| l.split_whitespace().collect::<Vec<_>>()[2..5] == ["2", "2", "0"]), "{table}");

    // Certificate events arrived too.
    let events = cp.api_json("events").await.to_string();
    assert!(events.contains("Issued") && events.contains(&id("orders")), "{events}");
}
