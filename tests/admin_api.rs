//! The management API, standalone: only administrators' certificates are answered, every call
//! is audited, administrators' identities come only from `--admin` join tokens, and the admin
//! HTTP port holds nothing private.

mod common;

use std::time::Duration;

use common::*;
use palisade::agent::ControlClient;
use palisade::control::admin_client::{self, AdminClient};
use palisade::identity::SpiffeId;
use palisade::proto::admin::{
    ListCertificatesRequest, ListRevocationsRequest, ListSidecarsRequest, RevokeRequest, RotateCaRequest,
    StatusRequest, revoke_request::Target,
};
use palisade::proto::identity::certify_request::Credential;
use palisade::tls::{CertStore, TrustBundle};

/// A management client presenting `cert` (or nothing), with `bearer` if given.
async fn client_with(
    cp: &ControlPlane,
    cert: Option<std::sync::Arc<rustls::sign::CertifiedKey>>,
    bearer: Option<&str>,
) -> AdminClient {
    palisade::tls::install_crypto_provider();
    let bundle = TrustBundle::from_pem(&std::fs::read_to_string(cp.root_pem_path()).unwrap()).unwrap();
    let certs = CertStore::new();
    if let Some(cert) = cert {
        certs.set(cert, i64::MAX);
    }
    let control =
        ControlClient::new(&cp.listen.to_string(), bundle, certs, SpiffeId::control_plane("cluster.local").unwrap());
    admin_client::client(control.channel().await.unwrap(), bearer.map(|b| format!("Bearer {b}").parse().unwrap()))
}

fn audit_lines(cp: &ControlPlane) -> Vec<serde_json::Value> {
    std::fs::read_to_string(cp.state.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn revoke_id(id: &str) -> RevokeRequest {
    RevokeRequest { target: Some(Target::SpiffeId(id.to_string())) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_certificate_and_an_anonymous_caller_are_refused_and_every_call_is_audited() {
    let dir = tempdir("admin-refused");
    let cp = ControlPlane::start(&dir, &[]).await;
    let workload = mint_client_cert(&cp.state, &id("web"), Duration::from_secs(600));

    // A valid workload certificate: authenticated, but not an administrator.
    let mut as_workload = client_with(&cp, Some(workload.clone()), None).await;
    let refused = as_workload.revoke(revoke_id(&id("orders"))).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("not an administrator"), "{refused:?}");
    for code in [
        as_workload.list_sidecars(ListSidecarsRequest {}).await.unwrap_err().code(),
        as_workload.rotate_ca(RotateCaRequest { status_only: false }).await.unwrap_err().code(),
        as_workload.status(StatusRequest {}).await.unwrap_err().code(),
    ] {
        assert_eq!(code, tonic::Code::PermissionDenied);
    }
    // The same workload certificate with a bearer token: standalone, tokens earn nothing.
    let mut with_bearer = client_with(&cp, Some(workload), Some("anything")).await;
    assert_eq!(
        with_bearer.list_sidecars(ListSidecarsRequest {}).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    // No certificate at all.
    let mut anonymous = client_with(&cp, None, Some("anything")).await;
    let refused = anonymous.list_certificates(ListCertificatesRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    // Nothing was revoked or rotated by the refused calls.
    let mut admin = cp.api().await;
    let revoked = admin.list_revocations(ListRevocationsRequest {}).await.unwrap().into_inner();
    assert!(revoked.spiffe_ids.is_empty() && revoked.serials.is_empty(), "{revoked:?}");
    let ca = admin.rotate_ca(RotateCaRequest { status_only: true }).await.unwrap().into_inner();
    assert_eq!((ca.phase.as_str(), ca.generations.len()), ("idle", 1), "{ca:?}");
    // The administrator's own revocation goes through.
    admin.revoke(revoke_id(&id("orders"))).await.unwrap();
    let revoked = admin.list_revocations(ListRevocationsRequest {}).await.unwrap().into_inner();
    assert_eq!(revoked.spiffe_ids, vec![id("orders")]);
    let status = admin.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.caller, "spiffe://cluster.local/admin/tests");

    let lines = audit_lines(&cp);
    let find = |caller: &str, call: &str, result: &str| {
        lines.iter().any(|l| l["caller"] == caller && l["call"] == call && l["result"] == result)
    };
    assert!(find(&id("web"), "Revoke", "refused"), "{lines:#?}");
    assert!(find(&id("web"), "ListSidecars", "refused"), "{lines:#?}");
    assert!(find("anonymous", "ListCertificates", "refused"), "{lines:#?}");
    assert!(find("spiffe://cluster.local/admin/tests", "Revoke", "allowed"), "{lines:#?}");
    let allowed = lines.iter().find(|l| l["call"] == "Revoke" && l["result"] == "allowed").unwrap();
    assert_eq!(allowed["target"], id("orders"));
    assert!(allowed["remote"].as_str().is_some_and(|r| r.starts_with("127.0.0.1:")), "{allowed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn administrators_come_only_from_admin_tokens_and_a_revoked_administrator_is_refused() {
    let dir = tempdir("admin-tokens");
    let cp = ControlPlane::start(&dir, &[]).await;
    let token_create = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(["control", "token", "create", "--state-dir"])
            .arg(&cp.state)
            .args(args)
            .output()
            .unwrap()
    };
    // An administrator's identity without --admin, and --admin on a workload identity.
    let out = token_create(&["--identity", "spiffe://cluster.local/admin/eve"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("make its token with --admin"));
    let out = token_create(&["--admin", "--identity", &id("eve")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin needs an administrator's identity"));
    let out = token_create(&["--admin", "--identity", "spiffe://cluster.local/admin/eve/more"]);
    assert!(!out.status.success(), "a nested path is not an administrator's identity");

    let login = |token: &str, out: &std::path::Path| {
        std::process::Command::new(BIN)
            .args(["control", "login", "--server", &cp.listen.to_string(), "--token", token, "--ca-bundle"])
            .arg(cp.root_pem_path())
            .arg("--credentials")
            .arg(out)
            .output()
            .unwrap()
    };
    // An ordinary workload's token logs nobody in, and writes no credentials.
    let workload_creds = dir.join("workload-creds");
    let out = login(&cp.token(&id("web")), &workload_creds);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an administrator's identity"), "{out:?}");
    assert!(!workload_creds.join("key.pem").exists());

    // Two administrators; a token logs in once.
    let (alice, bob) = (dir.join("alice"), dir.join("bob"));
    let alice_token = cp.admin_token("alice");
    assert!(login(&alice_token, &alice).status.success());
    let again = login(&alice_token, &dir.join("alice-again"));
    assert!(!again.status.success(), "a join token is single-use");
    assert!(login(&cp.admin_token("bob"), &bob).status.success());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(alice.join("key.pem")).unwrap().permissions().mode() & 0o777, 0o600);

    let args = |creds: &std::path::Path| admin_client::ServerArgs {
        server: Some(cp.listen.to_string()),
        credentials: creds.to_path_buf(),
        token_file: None,
        ca_bundle: None,
    };
    let mut as_bob = admin_client::connect(&args(&bob)).await.unwrap();
    as_bob.list_sidecars(ListSidecarsRequest {}).await.unwrap();
    // Alice revokes Bob: his certificate, still valid, no longer opens the API.
    let mut as_alice = admin_client::connect(&args(&alice)).await.unwrap();
    as_alice.revoke(revoke_id("spiffe://cluster.local/admin/bob")).await.unwrap();
    let mut as_bob = admin_client::connect(&args(&bob)).await.unwrap();
    let refused = as_bob.list_sidecars(ListSidecarsRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("revoked"), "{refused:?}");

    // Malformed targets are refused with a reason and revoke nothing.
    for target in [Target::SpiffeId("not a spiffe id".into()), Target::Serial("zz:top".into())] {
        let err = as_alice.revoke(RevokeRequest { target: Some(target) }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
    assert_eq!(as_alice.revoke(RevokeRequest { target: None }).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let revoked = as_alice.list_revocations(ListRevocationsRequest {}).await.unwrap().into_inner();
    assert_eq!(revoked.spiffe_ids, vec!["spiffe://cluster.local/admin/bob".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_pages_and_filters_and_a_rotation_starts_through_the_api() {
    let dir = tempdir("admin-ledger");
    let cp = ControlPlane::start(&dir, &[]).await;
    let mut api = cp.api().await;
    // Five workload certificates, issued through join tokens.
    let bundle = TrustBundle::from_pem(&std::fs::read_to_string(cp.root_pem_path()).unwrap()).unwrap();
    let control = ControlClient::new(
        &cp.listen.to_string(),
        bundle,
        CertStore::new(),
        SpiffeId::control_plane("cluster.local").unwrap(),
    );
    let mut issued = Vec::new();
    for i in 0..5 {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
        let who = if i % 2 == 0 { "even" } else { "odd" };
        let resp = control.certify(csr.der().to_vec(), Some(Credential::JoinToken(cp.token(&id(who))))).await.unwrap();
        issued.push(resp.serial);
    }
    // Pages of two, newest first, with no row twice and none left out.
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = api
            .list_certificates(ListCertificatesRequest {
                limit: 2,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.certificates.len() <= 2);
        seen.extend(page.certificates);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let workloads: Vec<_> =
        seen.iter().filter(|c| c.credential == "join-token" && c.spiffe_id.contains("/sa/")).collect();
    assert_eq!(workloads.len(), 5, "{seen:#?}");
    let distinct: std::collections::BTreeSet<_> = seen.iter().map(|c| &c.serial).collect();
    assert_eq!(distinct.len(), seen.len(), "a row came twice");
    // Newest first, also within one second (all five usually share it).
    let listed: Vec<&String> = workloads.iter().map(|c| &c.serial).collect();
    let newest_first: Vec<&String> = issued.iter().rev().collect();
    assert_eq!(listed, newest_first, "not newest first");
    // Filtered by identity and by time.
    let odd = api
        .list_certificates(ListCertificatesRequest { spiffe_id: id("odd"), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(odd.certificates.len(), 2);
    assert!(odd.certificates.iter().all(|c| c.spiffe_id == id("odd")));
    let future = palisade::clock::now_unix() + 3600;
    let none = api
        .list_certificates(ListCertificatesRequest { issued_after: future, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(none.certificates.is_empty());
    let bad = api
        .list_certificates(ListCertificatesRequest { page_token: "x".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    // The CLI's server form reads the same ledger.
    let out = std::process::Command::new(BIN)
        .args(["status", "certs", "-o", "json", "--identity", &id("even")])
        .args(cp.server_cli_args())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 3, "{rows}");

    // A rotation starts through the API, shows as in progress, and cannot start twice.
    let started = api.rotate_ca(RotateCaRequest { status_only: false }).await.unwrap().into_inner();
    assert_eq!(started.phase, "started");
    let next = started.generations.iter().find(|g| g.generation == 2).expect("generation 2");
    assert_eq!(next.state, "next");
    assert!(next.next_step_at > 0 && next.root_not_after > next.root_not_before, "{next:?}");
    let twice = api.rotate_ca(RotateCaRequest { status_only: false }).await.unwrap_err();
    assert_eq!(twice.code(), tonic::Code::FailedPrecondition, "{twice:?}");
    // The running control plane takes the new root into its bundle at once.
    wait_for("the new root in the exported bundle", Duration::from_secs(5), || async {
        std::fs::read_to_string(cp.root_pem_path()).unwrap().matches("BEGIN CERTIFICATE").count() == 2
    })
    .await;
    let out =
        std::process::Command::new(BIN).args(["control", "ca", "status"]).args(cp.server_cli_args()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("rotation: in-progress") && text.contains("next"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_http_port_serves_health_and_nothing_private() {
    let dir = tempdir("admin-http");
    let cp = ControlPlane::start(&dir, &[]).await;
    let _s = Sidecar::start(&cp, "web", None, &[]).await;
    assert_eq!(status_of(&format!("http://{}/ready", cp.admin)).await, Some(200));
    assert_eq!(status_of(&format!("http://{}/live", cp.admin)).await, Some(200));
    for path in [
        "/v1/sidecars",
        "/v1/certificates",
        "/v1/traffic",
        "/v1/events",
        "/v1/mesh",
        "/v1/jwks",
        "/v1/resources/errors",
        "/config_dump",
    ] {
        let (status, _, body) = get(&http_client(), &format!("http://{}{path}", cp.admin), &[]).await.unwrap();
        assert_eq!(status, 404, "{path}: {body}");
        assert!(!body.contains("spiffe://"), "{path} leaks: {body}");
    }
}
