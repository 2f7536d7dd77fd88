//! The control plane's `/metrics`: a real control plane issues and refuses certificates, a real
//! sidecar connects, and the counters say exactly that. The alert rules and the dashboard
//! shipped with the chart name only metrics the binaries expose.

mod common;

use std::time::Duration;

use common::*;
use palisade::agent::ControlClient;
use palisade::proto::identity::certify_request::Credential;
use palisade::tls::{CertStore, TrustBundle};

async fn scrape(admin: std::net::SocketAddr) -> String {
    let (status, headers, body) = get(&http_client(), &format!("http://{admin}/metrics"), &[]).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    body
}

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default().serialize_request(&key).unwrap().der().to_vec()
}

async fn control_plane_and_sidecar(tag: &str) -> (ControlPlane, Sidecar) {
    let dir = tempdir(tag);
    let cp = ControlPlane::start(&dir, &[]).await;
    let sidecar = Sidecar::start(&cp, "orders", None, &[]).await;
    (cp, sidecar)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_refusals_connections_and_pushes_are_counted() {
    let dir = tempdir("control-metrics");
    let cp = ControlPlane::start(&dir, &[]).await;
    let before = scrape(cp.admin).await;
    assert_eq!(metric(&before, "palisade_control_certificates_issued_total", ""), 0.0, "{before}");
    assert_eq!(metric(&before, "palisade_control_sidecars_connected", ""), 0.0, "{before}");

    // One refusal: a join token the control plane never made.
    palisade::tls::install_crypto_provider();
    let bundle = TrustBundle::from_pem(&std::fs::read_to_string(cp.root_pem_path()).unwrap()).unwrap();
    let anon = ControlClient::new(
        &cp.listen.to_string(),
        bundle,
        CertStore::new(),
        palisade::identity::SpiffeId::control_plane("cluster.local").unwrap(),
    );
    let err = anon.certify(csr(), Some(Credential::JoinToken("pjt_nope".into()))).await.unwrap_err();
    assert!(err.to_string().contains("unknown"), "{err}");

    // One sidecar: a certificate issued on its join token, a discovery stream, a push.
    let sidecar = Sidecar::start(&cp, "orders", None, &[]).await;
    let admin = cp.admin;
    wait_for("the sidecar's stream and first push counted", Duration::from_secs(10), || async move {
        let text = scrape(admin).await;
        metric(&text, "palisade_control_sidecars_connected", "") == 1.0
            && metric(&text, "palisade_control_snapshot_pushes_total", "") >= 1.0
    })
    .await;
    let text = scrape(cp.admin).await;
    let issued = metric(&text, "palisade_control_certificates_issued_total", r#"credential="join-token""#);
    assert!(issued >= 1.0, "{text}");
    assert_eq!(
        metric(&text, "palisade_control_certificates_refused_total", r#"reason="token_unknown""#),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "palisade_control_certificates_refused_total", ""), 1.0, "only the bad token: {text}");
    assert_eq!(metric(&text, "palisade_control_sidecars_connected", ""), 1.0, "{text}");
    assert!(metric(&text, "palisade_control_snapshot_pushes_total", "") >= 1.0, "{text}");
    assert!(metric(&text, "palisade_control_push_duration_seconds_count", "") >= 1.0, "{text}");
    let answered = metric(&text, "palisade_control_issuance_duration_seconds_count", "");
    assert_eq!(answered, issued + 1.0, "every answer timed, issued or refused: {text}");
    assert!(
        metric(&text, "palisade_control_store_duration_seconds_count", r#"op="redeem_join_token""#) >= 2.0,
        "{text}"
    );
    assert_eq!(metric(&text, "palisade_control_store_errors_total", ""), 0.0, "a refused token is no store error");
    let root_not_after = metric(&text, "palisade_control_ca_root_not_after_seconds", r#"generation="1""#);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as f64;
    assert!(root_not_after > now + 365.0 * 86400.0, "the first root's expiry, years ahead: {text}");

    // The sidecar leaves: the gauge follows.
    let mut sidecar = sidecar;
    sidecar.proc.terminate(Duration::from_secs(10));
    wait_for("the gauge back at 0", Duration::from_secs(10), || async move {
        metric(&scrape(admin).await, "palisade_control_sidecars_connected", "") == 0.0
    })
    .await;
}

/// Every `palisade_*` metric name in `text` (rule expressions, dashboard queries).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("palisade_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Whether the exposition `text` has metric `name`: a sample line, or for a family with no
/// series yet its `# TYPE` line (`_total`, `_bucket`, `_count`, `_sum` are sample suffixes).
fn exposes(text: &str, name: &str) -> bool {
    let base = ["_total", "_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
    text.lines().any(|l| {
        l.starts_with(&format!("{name} "))
            || l.starts_with(&format!("{name}{{"))
            || l.starts_with(&format!("# TYPE {base} "))
    })
}

/// The `# TYPE` lines of every metric registered in `file` under `prefix` (a labelled family
/// appears in a scrape only once it has a series; its registration is what says it exists).
fn registered(file: &str, prefix: &str) -> String {
    let code = std::fs::read_to_string(repo(file)).unwrap();
    let names: Vec<String> = code
        .split("registry.register(")
        .skip(1)
        .filter_map(|rest| Some(rest.trim_start().strip_prefix('"')?.split('"').next()?.to_string()))
        .collect();
    assert!(names.len() >= 8, "{file}: registrations not found, the parse is stale");
    names.iter().map(|n| format!("# TYPE {prefix}{n} registered\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_and_the_dashboard_name_only_metrics_the_binaries_expose() {
    let (cp, sidecar) = control_plane_and_sidecar("monitoring-names").await;
    let exposed = format!(
        "{}\n{}\n{}{}",
        scrape(cp.admin).await,
        sidecar.metrics().await,
        registered("src/control/metrics.rs", "palisade_control_"),
        registered("src/telemetry/metrics.rs", "palisade_"),
    );
    // The series every process exposes from its start are in the scrapes themselves.
    for always in ["palisade_control_sidecars_connected 1", "palisade_cert_expiry_timestamp_seconds "] {
        assert!(exposed.lines().any(|l| l.starts_with(always)), "{always}\n{exposed}");
    }
    let mut checked = 0;
    for file in ["deploy/monitoring/palisade-rules.yaml", "deploy/monitoring/grafana-dashboard.json"] {
        let text = std::fs::read_to_string(repo(file)).unwrap();
        let names = metric_names(&text);
        assert!(names.len() >= 5, "{file} names few metrics: {names:?}");
        for name in names {
            assert!(exposes(&exposed, &name), "{file} uses {name}, which neither binary exposes:\n{exposed}");
            checked += 1;
        }
    }
    assert!(checked > 10);
    // The check can fail: a made-up name is not exposed.
    assert!(!exposes(&exposed, "palisade_control_made_up_total"));
}
