//! Kubernetes, end to end against a real kube-apiserver and etcd (built from the Go module proxy
//! by `.ci/install-k8s`), driven with a real kubectl. No kubelet runs, so pods are stored but
//! never scheduled; sidecars run as local processes with tokens from the TokenRequest API.
//!
//! One API server is shared by every test of this binary; each test works in namespaces of its
//! own and runs its own control planes (each in its own control-plane namespace, so CA Secrets
//! and leader Leases do not mix).

mod common;
mod tools;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use palisade::agent::ControlClient;
use palisade::proto::identity::certify_request::Credential;
use palisade::tls::{CertStore, TrustBundle};
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "palisade-test-admin-token";
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The shared API server: etcd + kube-apiserver, stopped when this test process exits.
struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    kubeconfig: PathBuf,
    /// The service-account signing key (PKCS#8 DER): tests forge tokens with it.
    sa_key_der: Vec<u8>,
    _keepalive: parking_lot::Mutex<Vec<ChildStdin>>,
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(start_cluster)
}

fn start_cluster() -> Cluster {
    let bin = tools::k8s_bin_dir().to_path_buf();
    let dir = tempdir("k8s");
    let port = |_: u8| free_addr().port();
    let (etcd_client, etcd_peer, api_port) = (port(0), port(1), port(2));
    let (etcd, etcd_in) = tools::spawn_tied(
        &bin.join("etcd"),
        &[
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
            format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
            format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ],
        &dir.join("etcd.log"),
    );
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(dir.join("sa.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("sa.pub"), key.public_key_pem()).unwrap();
    let sa_key_der = key.serialize_der();
    std::fs::write(dir.join("tokens.csv"), format!("{ADMIN_TOKEN},admin,admin-uid,system:masters\n")).unwrap();
    let cert_dir = dir.join("pki");
    let (api, api_in) = tools::spawn_tied(
        &bin.join("kube-apiserver"),
        &[
            format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", cert_dir.display()),
            format!("--service-account-issuer={ISSUER}"),
            format!("--service-account-key-file={}", dir.join("sa.pub").display()),
            format!("--service-account-signing-key-file={}", dir.join("sa.key").display()),
            format!("--token-auth-file={}", dir.join("tokens.csv").display()),
            "--authorization-mode=RBAC".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--enable-priority-and-fairness=false".into(),
            "--v=1".into(),
        ],
        &dir.join("kube-apiserver.log"),
    );
    let mut children = [("etcd", etcd), ("kube-apiserver", api)];
    let server = format!("https://127.0.0.1:{api_port}");
    let kubeconfig = dir.join("admin.kubeconfig");
    write_kubeconfig(&kubeconfig, &server, ADMIN_TOKEN);
    let c = Cluster { dir, bin, kubeconfig, sa_key_der, _keepalive: parking_lot::Mutex::new(vec![etcd_in, api_in]) };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let out = c.kubectl_output(&["get", "--raw", "/readyz"]);
        if out.status.success() {
            break;
        }
        for (name, child) in children.iter_mut() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "{name} exited ({status}) before the API server was ready:\n{}",
                    std::fs::read_to_string(c.dir.join(format!("{name}.err"))).unwrap_or_default()
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "kube-apiserver not ready after 90s: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(c.dir.join("kube-apiserver.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.kubectl(&["apply", "--server-side", "-f", &repo("deploy/crds").display().to_string()]);
    c.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/authorizationpolicies.palisade.io",
        "crd/peerauthentications.palisade.io",
        "crd/requestauthentications.palisade.io",
        "crd/ratelimitpolicies.palisade.io",
        "crd/workloadsecurities.palisade.io",
    ]);
    c
}

fn write_kubeconfig(path: &Path, server: &str, token: &str) {
    // The API server's certificate is self-signed per run; the token is what matters here.
    let cfg = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": server, "insecure-skip-tls-verify": true}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}],
    });
    std::fs::write(path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}

impl Cluster {
    fn kubectl_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bin.join("kubectl")).arg("--kubeconfig").arg(&self.kubeconfig).args(args).output().unwrap()
    }

    /// Runs kubectl; panics with its stderr on failure; returns stdout.
    fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(out.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// `kubectl apply -f -` with `yaml`; returns (success, stdout + stderr).
    fn apply(&self, yaml: &str) -> (bool, String) {
        self.kubectl_stdin(&["apply", "-f", "-"], yaml)
    }

    /// kubectl with `input` on stdin: success, and stdout followed by stderr.
    fn kubectl_stdin(&self, args: &[&str], input: &str) -> (bool, String) {
        let mut child = Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    fn get_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all)).unwrap()
    }

    /// A namespace with service accounts (no controller-manager runs to create `default`).
    fn namespace(&self, name: &str, labels: &[(&str, &str)], accounts: &[&str]) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let (ok, out) = self.apply(
            &serde_json::to_string(
                &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}),
            )
            .unwrap(),
        );
        assert!(ok, "{out}");
        for sa in accounts {
            let (ok, out) = self.apply(&format!(
                "{{\"apiVersion\":\"v1\",\"kind\":\"ServiceAccount\",\"metadata\":{{\"name\":\"{sa}\",\"namespace\":\"{name}\"}}}}"
            ));
            assert!(ok, "{out}");
        }
    }

    /// A token for `ns/sa` from the TokenRequest API.
    fn token(&self, ns: &str, sa: &str, audience: &str) -> String {
        self.kubectl(&["create", "token", sa, "-n", ns, "--audience", audience, "--duration", "10m"]).trim().to_string()
    }

    /// A token signed with the cluster's own key but with claims we choose (e.g. expired).
    fn forge_token(&self, ns: &str, sa: &str, audience: &str, exp: i64, key_der: &[u8]) -> String {
        let uid = self.kubectl(&["get", "sa", sa, "-n", ns, "-o", "jsonpath={.metadata.uid}"]);
        let now = now_unix();
        let claims = json!({
            "iss": ISSUER, "sub": format!("system:serviceaccount:{ns}:{sa}"), "aud": [audience],
            "iat": exp - 3600, "nbf": exp - 3600, "exp": exp,
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": uid}},
            "jti": format!("forged-{now}"),
        });
        let key = jsonwebtoken::EncodingKey::from_ec_der(key_der);
        jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256), &claims, &key).unwrap()
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A control plane in Kubernetes mode; `system_ns` holds its CA Secret and leader Lease.
async fn control_plane(
    c: &Cluster,
    dir: &Path,
    name: &str,
    system_ns: &str,
    extra: &[&str],
) -> (ControlPlane, Option<SocketAddr>) {
    let listen =
        extra.iter().find_map(|a| a.strip_prefix("--listen=")).map(|a| a.parse().unwrap()).unwrap_or_else(free_addr);
    let extra: Vec<&str> = extra.iter().copied().filter(|a| !a.starts_with("--listen=")).collect();
    let extra = &extra[..];
    let admin = free_addr();
    let state = dir.join(format!("state-{name}"));
    let mut args: Vec<String> = [
        "control",
        "--kubernetes",
        "--namespace",
        system_ns,
        "--pod-name",
        name,
        "--default-policy",
        "allow",
        "--lease-duration",
        "3s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--state-dir".into(), state.display().to_string()]);
    args.extend(["--listen".into(), listen.to_string(), "--admin".into(), admin.to_string()]);
    let webhook = extra.contains(&"--webhook").then(free_addr);
    for a in extra {
        if *a == "--webhook" {
            args.extend(["--webhook".into(), webhook.unwrap().to_string()]);
        } else {
            args.push(a.to_string());
        }
    }
    c.namespace(system_ns, &[], &[]);
    let mut kubeconfig = c.kubeconfig.display().to_string();
    if let Some(pos) = args.iter().position(|a| a.starts_with("--kubeconfig=")) {
        kubeconfig = args.remove(pos)["--kubeconfig=".len()..].to_string();
    }
    let mut proc = Proc::spawn_with_env(name, dir, &args, &[("KUBECONFIG", &kubeconfig)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while status_of(&format!("http://{admin}/ready")).await != Some(200) {
        if let Some(status) = proc.child.try_wait().unwrap() {
            panic!("control plane {name} exited ({status}):\n{}", proc.log_text());
        }
        assert!(Instant::now() < deadline, "control plane {name} not ready after 60s");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    (ControlPlane { proc, dir: dir.to_path_buf(), state, listen, admin }, webhook)
}

/// A sidecar that proves its identity with a service-account token.
#[allow(clippy::too_many_arguments)]
async fn kube_sidecar(
    dir: &Path,
    control: &str,
    root_pem: &Path,
    token: &str,
    name: &str,
    app: Option<SocketAddr>,
    routes: &[String],
    labels: &[&str],
) -> Sidecar {
    let token_file = dir.join(format!("{name}.token"));
    std::fs::write(&token_file, token).unwrap();
    let admin = free_addr();
    let mut args: Vec<String> = vec![
        "--control".into(),
        control.into(),
        "--ca-bundle".into(),
        root_pem.display().to_string(),
        "--kube-token-file".into(),
        token_file.display().to_string(),
        "--admin".into(),
        admin.to_string(),
    ];
    let inbound = app.map(|app| {
        let inbound = free_addr();
        args.extend(["--inbound".into(), inbound.to_string(), "--app".into(), app.to_string()]);
        inbound
    });
    for r in routes {
        args.extend(["--route".into(), r.clone()]);
    }
    for l in labels {
        args.extend(["--label".into(), l.to_string()]);
    }
    let proc = Proc::spawn_proxy(name, dir, &args);
    let s = Sidecar { proc, admin, inbound, identity: name.to_string() };
    s.wait_ready().await;
    s
}

/// An echo app behind the sidecar of `ns/orders` (label `app=orders`), and the sidecar of
/// `ns/web` with a route to it; returns the app, both sidecars and the route's address.
async fn orders_and_web(
    c: &Cluster,
    dir: &Path,
    ns: &str,
    control: &str,
    root: &Path,
) -> (EchoApp, Sidecar, Sidecar, SocketAddr) {
    let app = EchoApp::start().await;
    let orders_token = c.token(ns, "orders", "palisade");
    let orders =
        kube_sidecar(dir, control, root, &orders_token, &format!("{ns}-orders"), Some(app.addr), &[], &["app=orders"])
            .await;
    let route = free_addr();
    let to_orders = format!("{route}={}@spiffe://cluster.local/ns/{ns}/sa/orders", orders.inbound.unwrap());
    let web_token = c.token(ns, "web", "palisade");
    let web = kube_sidecar(dir, control, root, &web_token, &format!("{ns}-web"), None, &[to_orders], &[]).await;
    (app, orders, web, route)
}

async fn certify(cp: &ControlPlane, token: &str) -> Result<String, tonic::Status> {
    palisade::tls::install_crypto_provider();
    let bundle = TrustBundle::from_pem(&std::fs::read_to_string(cp.root_pem_path()).unwrap()).unwrap();
    let client = ControlClient::new(
        &cp.listen.to_string(),
        bundle,
        CertStore::new(),
        palisade::identity::SpiffeId::control_plane("cluster.local").unwrap(),
    );
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
    match client.certify(csr.der().to_vec(), Some(Credential::KubernetesToken(token.to_string()))).await {
        Ok(resp) => Ok(resp.spiffe_id),
        Err(palisade::agent::ControlClientError::Status(s)) => Err(s),
        Err(e) => panic!("control plane unreachable: {e}"),
    }
}

fn accepted_condition(c: &Cluster, ns: &str, name: &str) -> Option<(String, String, i64)> {
    condition_of(c, "authorizationpolicy", ns, name)
        .map(|(status, _, message, generation)| (status, message, generation))
}

/// Status, reason, message and observedGeneration of the `Accepted` condition of `kind/name`.
fn condition_of(c: &Cluster, kind: &str, ns: &str, name: &str) -> Option<(String, String, String, i64)> {
    let v = c.get_json(&["get", kind, name, "-n", ns]);
    let cond = v["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Accepted")?.clone();
    Some((
        cond["status"].as_str()?.to_string(),
        cond["reason"].as_str().unwrap_or("").to_string(),
        cond["message"].as_str().unwrap_or("").to_string(),
        cond["observedGeneration"].as_i64().unwrap_or(-1),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_apply_and_malformed_policies_are_refused_or_marked_invalid() {
    let c = cluster();
    let dir = tempdir("k8s-crd");
    c.namespace("crd-test", &[], &[]);
    // The schema refuses what it can describe, at apply time.
    let (ok, out) = c.apply(
        "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: permit, namespace: crd-test}\n\
         spec: {action: PERMIT, rules: []}\n",
    );
    assert!(!ok && out.contains("PERMIT") && out.contains("Unsupported value"), "{out}");
    let (ok, out) = c.apply(
        "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: shape, namespace: crd-test}\n\
         spec: {rules: {from: everyone}}\n",
    );
    assert!(!ok && out.contains("spec.rules"), "{out}");
    let (ok, out) = c.apply(
        "apiVersion: palisade.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: crd-test}\n\
         spec: {mtls: {mode: SOMETIMES}}\n",
    );
    assert!(!ok && out.contains("SOMETIMES"), "{out}");

    // What only the engine can judge is marked Invalid in status, by the control plane.
    let (_cp, _) = control_plane(c, &dir, "cp-crd", "crd-system", &[]).await;
    let (ok, out) = c.apply(
        "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bad-rego, namespace: crd-test}\n\
         spec:\n  rego:\n    entrypoint: t/allow\n    module: |\n      package t\n      allow if { input.x == \n",
    );
    assert!(ok, "{out}");
    let (ok, out) = c.apply(
        "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: good, namespace: crd-test}\n\
         spec: {action: ALLOW, rules: [{to: [{operation: {methods: [GET]}}]}]}\n",
    );
    assert!(ok, "{out}");
    wait_for("status on both policies", Duration::from_secs(20), || async {
        accepted_condition(c, "crd-test", "bad-rego").is_some() && accepted_condition(c, "crd-test", "good").is_some()
    })
    .await;
    let (status, message, generation) = accepted_condition(c, "crd-test", "bad-rego").unwrap();
    assert_eq!(status, "False");
    assert!(message.contains("rego") || message.contains("module"), "the message says what is wrong: {message}");
    assert_eq!(generation, 1);
    let (status, _, generation) = accepted_condition(c, "crd-test", "good").unwrap();
    assert_eq!((status.as_str(), generation), ("True", 1));
    // Printer columns show acceptance.
    let table = c.kubectl(&["get", "authorizationpolicies", "-n", "crd-test"]);
    assert!(table.contains("ACCEPTED") && table.contains("False") && table.contains("True"), "{table}");

    // A valid JWT rule is accepted and enforced (its keys are fetched by the control plane).
    let (ok, out) = c.apply(
        "apiVersion: palisade.io/v1alpha1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: crd-test}\n\
         spec: {jwtRules: [{issuer: https://issuer.test, jwksUri: https://issuer.test/jwks.json}]}\n",
    );
    assert!(ok, "{out}");
    wait_for("status on the RequestAuthentication", Duration::from_secs(20), || async {
        condition_of(c, "requestauthentication", "crd-test", "jwt").is_some()
    })
    .await;
    let (status, reason, message, _) = condition_of(c, "requestauthentication", "crd-test", "jwt").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Accepted"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_earn_their_own_identity_and_nothing_else() {
    let c = cluster();
    let dir = tempdir("k8s-sa");
    c.namespace("shop", &[], &["web", "other", "gone"]);
    let (cp, _) = control_plane(c, &dir, "cp-sa", "sa-system", &[]).await;

    let web = c.token("shop", "web", "palisade");
    assert_eq!(certify(&cp, &web).await.unwrap(), "spiffe://cluster.local/ns/shop/sa/web");
    // Another account's token earns that account's identity, never web's.
    let other = c.token("shop", "other", "palisade");
    assert_eq!(certify(&cp, &other).await.unwrap(), "spiffe://cluster.local/ns/shop/sa/other");

    let refused = |r: Result<String, tonic::Status>, what: &str| {
        let s = r.expect_err(what);
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{what}: {s:?}");
        s.message().to_string()
    };
    // A token minted for someone else's audience (say, stolen from a sidecar of another system).
    let msg = refused(certify(&cp, &c.token("shop", "web", "vault")).await, "wrong audience");
    assert!(msg.contains("refused"), "{msg}");
    // Expired, though signed by the cluster's own key.
    let expired = c.forge_token("shop", "web", "palisade", now_unix() - 3600, &c.sa_key_der);
    let msg = refused(certify(&cp, &expired).await, "expired token");
    assert!(msg.contains("expired"), "{msg}");
    // Valid in every claim but signed by a key the cluster does not know.
    let stranger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().serialize_der();
    let unknown = c.forge_token("shop", "web", "palisade", now_unix() + 600, &stranger);
    refused(certify(&cp, &unknown).await, "token from an unknown signer");
    refused(certify(&cp, "not-a-token").await, "garbage token");
    // A token outlives nothing: once its service account is deleted, it is refused.
    let gone = c.token("shop", "gone", "palisade");
    c.kubectl(&["delete", "sa", "gone", "-n", "shop"]);
    refused(certify(&cp, &gone).await, "token of a deleted service account");

    // The ledger records how each identity was established.
    let ledger =
        Command::new(BIN).args(["status", "certs", "-o", "json", "--state-dir"]).arg(&cp.state).output().unwrap();
    let rows: Vec<Value> = serde_json::from_slice(&ledger.stdout).unwrap();
    let kube_rows = rows.iter().filter(|r| r["credential"] == "kubernetes").count();
    assert_eq!(kube_rows, 2, "exactly the two accepted tokens were recorded: {rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_policy_from_kubectl_reaches_a_sidecar_within_two_seconds() {
    let c = cluster();
    let dir = tempdir("k8s-policy");
    c.namespace("pol", &[], &["orders", "web"]);
    let (cp, _) = control_plane(c, &dir, "cp-pol", "pol-system", &[]).await;
    let (_app, _orders, web, route) = orders_and_web(c, &dir, "pol", &cp.listen.to_string(), &cp.root_pem_path()).await;
    let http = http_client();
    let url = format!("http://{route}/blocked");
    assert_eq!(get(&http, &url, &[]).await.unwrap().0, 200, "default allow before any policy");

    let policy = "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\n\
                  metadata: {name: block, namespace: pol}\n\
                  spec: {selector: {matchLabels: {app: orders}}, action: DENY, rules: [{to: [{operation: {paths: [/blocked]}}]}]}\n";
    // Timed from before kubectl starts: the 2 s include kubectl's own round trips.
    let applied = Instant::now();
    let (ok, out) = c.apply(policy);
    assert!(ok, "{out}");
    eprintln!("kubectl apply returned after {:?}", applied.elapsed());
    wait_for("the DENY policy to take effect", Duration::from_secs(2), || async {
        get(&http, &url, &[]).await.map(|r| r.0) == Ok(403)
    })
    .await;
    let took = applied.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    eprintln!("policy applied with kubectl took effect in {took:?}");
    let (status, _, headers_text) = {
        let (s, h, b) = get(&http, &url, &[]).await.unwrap();
        (s, b, format!("{h:?}"))
    };
    assert_eq!(status, 403);
    assert!(headers_text.contains("pol/block"), "the refusal names the policy: {headers_text}");
    assert_eq!(get(&http, &format!("http://{route}/open"), &[]).await.unwrap().0, 200, "other paths unaffected");

    // Pods and Services feed the endpoint table: an injected pod that gets an address (patched
    // in, as no kubelet runs) and the Service in front of it reach the sidecars.
    let (ok, out) = c.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: orders-0, namespace: pol, labels: {app: orders},\n\
         annotations: {palisade.io/status: injected}}\nspec: {serviceAccountName: orders, containers: [{name: app, image: example/orders:1}]}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: orders, namespace: pol}\n\
         spec: {selector: {app: orders}, ports: [{port: 80, targetPort: 8080}]}\n",
    );
    assert!(ok, "{out}");
    c.kubectl(&[
        "patch",
        "pod",
        "orders-0",
        "-n",
        "pol",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running","podIP":"10.44.0.7","podIPs":[{"ip":"10.44.0.7"}]}}"#,
    ]);
    let cluster_ip = c.kubectl(&["get", "svc", "orders", "-n", "pol", "-o", "jsonpath={.spec.clusterIP}"]);
    let orders_id = "spiffe://cluster.local/ns/pol/sa/orders";
    wait_for("pod and service addresses in the sidecar's endpoint table", Duration::from_secs(5), || async {
        let dump = web.config_dump().await;
        let eps = &dump["mesh"]["endpoints"];
        eps["10.44.0.7:0"] == orders_id && eps[format!("{cluster_ip}:0").as_str()] == orders_id
    })
    .await;

    assert_eq!(get(&http, &url, &[]).await.unwrap().0, 403, "still denied before the deletion");
    let deleted = Instant::now();
    c.kubectl(&["delete", "authorizationpolicy", "block", "-n", "pol"]);
    eprintln!("kubectl delete returned after {:?}", deleted.elapsed());
    wait_for("the deletion to take effect", Duration::from_secs(2), || async {
        get(&http, &url, &[]).await.map(|r| r.0) == Ok(200)
    })
    .await;
    let took = deleted.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    eprintln!("deletion took effect in {took:?}");
}

/// The sidecar's view of service `svc/orders`: its endpoints (address and service account),
/// the service at the ClusterIP's port, and each rule's backends with their weights.
type OrdersView = (Vec<(String, String)>, Option<String>, Vec<Vec<(String, u64)>>);

async fn orders_view(sidecar: &Sidecar) -> OrdersView {
    let mesh = sidecar.config_dump().await["mesh"].clone();
    let endpoints = mesh["services"]["svc/orders"]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let sa = e["identity"].as_str().unwrap_or("").rsplit('/').next().unwrap_or("").to_string();
            (e["address"].as_str().unwrap_or("").to_string(), sa)
        })
        .collect();
    let at = mesh["service_addresses"]["at"]["10.96.45.10:80"].as_str().map(str::to_string);
    let rules = mesh["routes"]["svc/orders"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|rule| {
            rule["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| (b[0].as_str().unwrap_or("").to_string(), b[1].as_u64().unwrap_or(0)))
                .collect()
        })
        .collect();
    (endpoints, at, rules)
}

/// Applies `yaml` with kubectl, then waits (2 s at most, from before kubectl started) until the
/// sidecar's view of `svc/orders` is `want`; returns how long that took.
async fn applied_within_two_seconds(
    c: &Cluster,
    sidecar: &Sidecar,
    what: &str,
    yaml: &str,
    want: &OrdersView,
) -> Duration {
    let applied = Instant::now();
    let (ok, out) = c.apply(yaml);
    assert!(ok, "{out}");
    let kubectl = applied.elapsed();
    let deadline = applied + Duration::from_secs(2);
    loop {
        let got = orders_view(sidecar).await;
        if &got == want {
            break;
        }
        assert!(Instant::now() < deadline, "{what}: not in the sidecar's view within 2 s of kubectl apply: {got:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = applied.elapsed();
    eprintln!("{what}: in the sidecar's view {took:?} after kubectl apply started (kubectl itself: {kubectl:?})");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_its_endpoint_slices_and_an_http_route_from_kubectl_reach_a_sidecar_within_two_seconds() {
    let c = cluster();
    let dir = tempdir("k8s-services");
    c.namespace("svc", &[], &["orders", "orders-v2", "web"]);
    // This test installs the Gateway API CRDs itself, after its control plane started: one that
    // starts without them must come up, and read routes once they are installed.
    let crds = tools::gateway_api_crds();
    let (ok, out) = c.kubectl_stdin(&["get", "crd", "httproutes.gateway.networking.k8s.io"], "");
    assert!(!ok && out.contains("NotFound"), "the Gateway API CRDs are installed by this test alone: {out}");
    let (cp, _) = control_plane(c, &dir, "cp-svc", "svc-system", &[]).await;
    let absent = "the Gateway API HTTPRoute CRD (httproutes.gateway.networking.k8s.io) is not installed";
    assert!(cp.proc.log_text().contains(absent), "said before ready:\n{}", cp.proc.log_text());
    let files: Vec<String> = ["httproutes", "grpcroutes"]
        .iter()
        .map(|kind| crds.join(format!("gateway.networking.k8s.io_{kind}.yaml")).display().to_string())
        .collect();
    let installing = Instant::now();
    c.kubectl(&["apply", "--server-side", "-f", &files[0], "-f", &files[1]]);
    c.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/httproutes.gateway.networking.k8s.io",
        "crd/grpcroutes.gateway.networking.k8s.io",
    ]);
    wait_for("the control plane to read HTTPRoutes once their CRD exists", Duration::from_secs(15), || async {
        cp.proc.log_text().contains("the Gateway API HTTPRoute CRD is installed")
    })
    .await;
    eprintln!("HTTPRoutes read {:?} after the CRDs' kubectl apply started", installing.elapsed());
    assert_eq!(cp.proc.log_text().matches(absent).count(), 1, "a missing CRD is said once, not at every retry");

    // Meshed pods under two service accounts, with addresses (patched in: no kubelet runs).
    for (pod, sa, ip) in [
        ("orders-0", "orders", "10.45.0.1"),
        ("orders-1", "orders-v2", "10.45.0.2"),
        ("orders-2", "orders", "10.45.0.3"),
    ] {
        let (ok, out) = c.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: svc, annotations: {{palisade.io/status: injected}}}}\n\
             spec: {{serviceAccountName: {sa}, containers: [{{name: app, image: example/orders:1}}]}}\n"
        ));
        assert!(ok, "{out}");
        let status = format!(r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}}}"#);
        c.kubectl(&["patch", "pod", pod, "-n", "svc", "--subresource=status", "--type=merge", "-p", &status]);
    }
    let root = cp.root_pem_path();
    let web = kube_sidecar(
        &dir,
        &cp.listen.to_string(),
        &root,
        &c.token("svc", "web", "palisade"),
        "svc-web",
        None,
        &[],
        &[],
    )
    .await;
    wait_for("the pods in the sidecar's endpoint table", Duration::from_secs(10), || async {
        let eps = web.config_dump().await["mesh"]["endpoints"].clone();
        ["10.45.0.1:0", "10.45.0.2:0", "10.45.0.3:0"].iter().all(|a| eps[*a].is_string())
    })
    .await;
    assert_eq!(orders_view(&web).await, (vec![], None, vec![]), "nothing of the service before it is applied");

    // A selector-less Service (its slices written by hand, as no controller runs here) with two
    // slices: a ready pod of each account, one not ready, and an address that is no meshed pod.
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: orders, namespace: svc}\n\
                   spec: {clusterIP: 10.96.45.10, ports: [{name: http, port: 80, targetPort: 8080}]}\n";
    let slice = |name: &str, endpoints: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, namespace: svc, labels: {{kubernetes.io/service-name: orders}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: {endpoints}\n"
        )
    };
    let slice_a = |third_ready: bool| {
        slice(
            "orders-a",
            &format!(
                "[{{addresses: [10.45.0.1], conditions: {{ready: true}}, zone: z1}}, \
                 {{addresses: [10.45.0.3], conditions: {{ready: {third_ready}}}}}]"
            ),
        )
    };
    let slice_b = slice("orders-b", "[{addresses: [10.45.0.2]}, {addresses: [10.45.9.9], conditions: {ready: true}}]");
    let route = |v1: u32, v2: u32| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: orders-canary, namespace: svc}}\n\
             spec:\n  parentRefs: [{{group: \"\", kind: Service, name: orders, port: 80}}]\n  rules:\n\
             \x20   - matches: [{{path: {{type: PathPrefix, value: /api}}}}]\n\
             \x20     backendRefs: [{{name: orders-v1, port: 80, weight: {v1}}}, {{name: orders-v2, port: 80, weight: {v2}}}]\n"
        )
    };
    // The API server holds the creation of a custom resource for 2 s while its CRD is younger
    // than 2 s (for HA API servers to see it established): not what is measured here.
    wait_for("the HTTPRoute CRD older than the API server's 2 s grace", Duration::from_secs(10), || async {
        let established = c.kubectl(&[
            "get",
            "crd",
            "httproutes.gateway.networking.k8s.io",
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Established")].lastTransitionTime}"#,
        ]);
        let established: k8s_openapi::jiff::Timestamp = established.trim().parse().unwrap();
        // The condition's time is in whole seconds.
        k8s_openapi::jiff::Timestamp::now().duration_since(established).as_secs_f64() > 3.0
    })
    .await;
    let endpoint = |ip: &str, sa: &str| (format!("{ip}:0"), sa.to_string());
    let split = |v1: u64, v2: u64| vec![vec![("svc/orders-v1".to_string(), v1), ("svc/orders-v2".to_string(), v2)]];
    let two_ready = vec![endpoint("10.45.0.1", "orders"), endpoint("10.45.0.2", "orders-v2")];
    let at = Some("svc/orders".to_string());
    let mut took = vec![
        applied_within_two_seconds(
            c,
            &web,
            "Service, EndpointSlices and HTTPRoute",
            &[service.to_string(), slice_a(false), slice_b, route(90, 10)].join("---\n"),
            &(two_ready.clone(), at.clone(), split(90, 10)),
        )
        .await,
    ];
    let dump = web.config_dump().await;
    let orders = &dump["mesh"]["services"]["svc/orders"];
    assert_eq!(orders["endpoints"][0]["zone"], "z1", "the slice's zone");
    assert_eq!(orders["ports"], json!([[80, 8080]]), "port and targetPort");

    // A route Palisade cannot apply whole is refused, and disturbs neither the good one nor the
    // rest of the mesh.
    let (ok, out) = c.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: orders-regex, namespace: svc}\n\
         spec:\n  parentRefs: [{group: \"\", kind: Service, name: orders, port: 80}]\n  rules:\n\
         \x20   - matches: [{path: {type: RegularExpression, value: \"/v[0-9]+/.*\"}}]\n\
         \x20     backendRefs: [{name: orders-v2, port: 80}]\n",
    );
    assert!(ok, "the API server accepts it (RegularExpression is in the official schema): {out}");
    std::fs::write(dir.join(format!("admin-{}.token", cp.listen.port())), ADMIN_TOKEN).unwrap();
    wait_for("the malformed route in the control plane's resource errors", Duration::from_secs(10), || async {
        cp.api_json("resource_errors").await.to_string().contains("HTTPRoute svc/orders-regex")
    })
    .await;
    let errors = cp.api_json("resource_errors").await.to_string();
    assert!(errors.contains("PathPrefix or Exact"), "the refusal says why: {errors}");

    // Live changes: the weights, then the not-ready endpoint turning ready.
    took.push(
        applied_within_two_seconds(
            c,
            &web,
            "new weights",
            &route(50, 50),
            &(two_ready.clone(), at.clone(), split(50, 50)),
        )
        .await,
    );
    let all_ready =
        vec![endpoint("10.45.0.1", "orders"), endpoint("10.45.0.2", "orders-v2"), endpoint("10.45.0.3", "orders")];
    took.push(
        applied_within_two_seconds(
            c,
            &web,
            "an endpoint turned ready",
            &slice_a(true),
            &(all_ready, at, split(50, 50)),
        )
        .await,
    );
    assert!(
        !web.config_dump().await["mesh"]["routes"].to_string().contains("orders-regex"),
        "the refused route never reached the sidecar"
    );
    eprintln!("kubectl apply → sidecar view latencies: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_tokens_and_hardening_from_kubectl_are_accepted_and_enforced_by_a_sidecar() {
    let c = cluster();
    let dir = tempdir("k8s-ratelimit");
    c.namespace("rl", &[], &["orders", "web"]);
    let (cp, _) = control_plane(c, &dir, "cp-rl", "rl-system", &[]).await;
    let (_app, _orders, _web, route) = orders_and_web(c, &dir, "rl", &cp.listen.to_string(), &cp.root_pem_path()).await;
    let (ok, out) = c.apply(
        "apiVersion: palisade.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: per-caller, namespace: rl}\n\
         spec: {selector: {matchLabels: {app: orders}}, limits: [{requestsPerUnit: 3, unit: HOUR, key: {source: {}}, paths: [/limited/*]}]}\n\
         ---\napiVersion: palisade.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: zero, namespace: rl}\n\
         spec: {limits: [{requestsPerUnit: 0, unit: SECOND}]}\n",
    );
    assert!(ok, "{out}");
    let http = http_client();
    let url = format!("http://{route}/limited/x");
    wait_for("the limit to take effect", Duration::from_secs(10), || async {
        get(&http, &url, &[]).await.map(|r| r.0) == Ok(429)
    })
    .await;
    let (status, headers, _) = get(&http, &url, &[]).await.unwrap();
    assert_eq!(status, 429);
    assert_eq!(headers["ratelimit-policy"], r#""rl/per-caller";q=3;w=3600"#);
    assert_eq!(get(&http, &format!("http://{route}/open"), &[]).await.unwrap().0, 200, "other paths unaffected");
    wait_for("status on both policies", Duration::from_secs(20), || async {
        condition_of(c, "ratelimitpolicy", "rl", "per-caller").is_some()
            && condition_of(c, "ratelimitpolicy", "rl", "zero").is_some()
    })
    .await;
    let (status, reason, message, _) = condition_of(c, "ratelimitpolicy", "rl", "per-caller").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Accepted"), "enforced, not NotEnforced: {message}");
    let (status, _, message, _) = condition_of(c, "ratelimitpolicy", "rl", "zero").unwrap();
    assert_eq!(status, "False");
    assert!(message.contains("spec.limits[0].requestsPerUnit must be at least 1"), "{message}");

    // End-user tokens and workload hardening from kubectl too: a token that is not signed is
    // refused with 401, and every response of the workload carries the hardening.
    use aws_lc_rs::signature::KeyPair as _;
    let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let public = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(key.public_key());
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = format!(
        r#"{{"keys":[{{"kty":"RSA","kid":"k1","use":"sig","n":"{}","e":"{}"}}]}}"#,
        b64(&public.n),
        b64(&public.e)
    );
    let (ok, out) = c.apply(&format!(
        "apiVersion: palisade.io/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: users, namespace: rl}}\n\
         spec:\n  selector: {{matchLabels: {{app: orders}}}}\n  jwtRules:\n  - issuer: https://id.example\n    jwks: '{jwks}'\n\
         ---\napiVersion: palisade.io/v1alpha1\nkind: WorkloadSecurity\nmetadata: {{name: edge, namespace: rl}}\n\
         spec: {{selector: {{matchLabels: {{app: orders}}}}, responseHeaders: {{}}}}\n"
    ));
    assert!(ok, "{out}");
    let unsigned =
        format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), b64(br#"{"iss":"https://id.example","sub":"u"}"#));
    let bearer = format!("Bearer {unsigned}");
    wait_for("the token rule to take effect", Duration::from_secs(10), || async {
        get(&http, &format!("http://{route}/open"), &[("authorization", bearer.as_str())]).await.map(|r| r.0) == Ok(401)
    })
    .await;
    let (status, headers, _) = get(&http, &format!("http://{route}/open"), &[]).await.unwrap();
    assert_eq!(status, 200, "no token: authorization decides");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    wait_for("RequestAuthentication and WorkloadSecurity accepted", Duration::from_secs(20), || async {
        condition_of(c, "requestauthentication", "rl", "users").is_some_and(|(s, r, ..)| s == "True" && r == "Accepted")
            && condition_of(c, "workloadsecurity", "rl", "edge")
                .is_some_and(|(s, r, ..)| s == "True" && r == "Accepted")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_moves_to_the_surviving_replica_and_keeps_receiving_updates() {
    let c = cluster();
    let dir = tempdir("k8s-ha");
    c.namespace("ha", &[], &["orders", "web"]);
    let (cp_a, _) = control_plane(c, &dir, "cp-a", "ha-system", &[]).await;
    let (cp_b, _) = control_plane(c, &dir, "cp-b", "ha-system", &[]).await;
    // One CA, shared through the Secret: both replicas export the same roots.
    assert_eq!(
        std::fs::read_to_string(cp_a.root_pem_path()).unwrap(),
        std::fs::read_to_string(cp_b.root_pem_path()).unwrap()
    );
    let lease_holder = || {
        c.kubectl(&[
            "get",
            "lease",
            "palisade-control-leader",
            "-n",
            "ha-system",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
    };
    wait_for("a leader", Duration::from_secs(10), || async { !lease_holder().is_empty() }).await;

    let control = format!("{},{}", cp_a.listen, cp_b.listen);
    let (_app, _orders, _web, route) = orders_and_web(c, &dir, "ha", &control, &cp_a.root_pem_path()).await;
    // The management API answers the cluster's administrator (RBAC through SubjectAccessReview).
    for cp in [&cp_a, &cp_b] {
        std::fs::write(cp.dir.join(format!("admin-{}.token", cp.listen.port())), ADMIN_TOKEN).unwrap();
    }
    let (api_a, api_b) = (cp_a.server_args(), cp_b.server_args());
    let connected_to = |api: palisade::control::admin_client::ServerArgs, who: &'static str| async move {
        let Ok(mut api) = palisade::control::admin_client::connect(&api).await else { return false };
        let Ok(list) = api.list_sidecars(palisade::proto::admin::ListSidecarsRequest {}).await else { return false };
        let want = format!("spiffe://cluster.local/ns/ha/sa/{who}");
        list.into_inner().sidecars.iter().any(|s| s.spiffe_id == want && s.connected)
    };
    wait_for("orders connected to replica A", Duration::from_secs(10), || connected_to(api_a.clone(), "orders")).await;

    let leader_before = lease_holder();
    let mut cp_a = cp_a;
    cp_a.proc.kill9();
    wait_for("orders reconnected to replica B", Duration::from_secs(20), || connected_to(api_b.clone(), "orders"))
        .await;

    let http = http_client();
    let url = format!("http://{route}/blocked");
    assert_eq!(get(&http, &url, &[]).await.unwrap().0, 200);
    let (ok, out) = c.apply(
        "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: block, namespace: ha}\n\
         spec: {selector: {matchLabels: {app: orders}}, action: DENY, rules: [{to: [{operation: {paths: [/blocked]}}]}]}\n",
    );
    assert!(ok, "{out}");
    wait_for("the policy pushed by replica B", Duration::from_secs(5), || async {
        get(&http, &url, &[]).await.map(|r| r.0) == Ok(403)
    })
    .await;
    // Whoever led before, B leads now and writes status.
    wait_for("replica B to hold the lease", Duration::from_secs(15), || async { lease_holder() == "cp-b" }).await;
    wait_for("status written by the new leader", Duration::from_secs(10), || async {
        accepted_condition(c, "ha", "block").is_some_and(|(s, _, _)| s == "True")
    })
    .await;
    eprintln!("leader before the kill: {leader_before}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_in_an_enabled_namespace_are_injected_once_and_opted_out_pods_are_not() {
    let c = cluster();
    let dir = tempdir("k8s-inject");
    let (mut cp, webhook) = control_plane(
        c,
        &dir,
        "cp-inject",
        "inject-system",
        &["--webhook", "--webhook-config", "palisade-injector-test"],
    )
    .await;
    // The shipped webhooks (deploy/webhook.yaml), reached by URL (no Service routing without
    // kube-proxy) and confined to this test's namespaces; caBundle is left empty as shipped: the
    // control plane fills it in with the mesh root.
    let shipped: Value = serde_yaml::from_str(&std::fs::read_to_string(repo("deploy/webhook.yaml")).unwrap()).unwrap();
    let mut webhooks = shipped["webhooks"].as_array().expect("deploy/webhook.yaml has webhooks").clone();
    for hook in &mut webhooks {
        hook["clientConfig"] = json!({"url": format!("https://{}/inject", webhook.unwrap())});
        hook["namespaceSelector"]["matchExpressions"].as_array_mut().unwrap().push(json!(
            {"key": "palisade-test/webhook", "operator": "In", "values": ["on"]}
        ));
    }
    let mwc = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "palisade-injector-test"},
        "webhooks": webhooks,
    });
    let (ok, out) = c.apply(&mwc.to_string());
    assert!(ok, "{out}");
    let root = std::fs::read_to_string(cp.root_pem_path()).unwrap();
    let want = vec![palisade::k8s::webhook::ca_bundle_base64(&root); webhooks.len()].join(" ");
    let ca_bundles = || {
        c.kubectl(&[
            "get",
            "mutatingwebhookconfiguration",
            "palisade-injector-test",
            "-o",
            "jsonpath={.webhooks[*].clientConfig.caBundle}",
        ])
    };
    wait_for("the control plane to publish its root as every webhook's caBundle", Duration::from_secs(10), || async {
        ca_bundles() == want
    })
    .await;
    // Replaced by a tool that drops caBundle (as `kubectl replace` of the shipped file would):
    // the control plane notices through its watch and writes it back.
    let (ok, out) = c.kubectl_stdin(
        &["replace", "-f", "-", "-o", "jsonpath={.webhooks[*].clientConfig.caBundle}"],
        &mwc.to_string(),
    );
    assert!(ok && out.trim().is_empty(), "the replace stores no caBundle: {out}");
    wait_for("the control plane to restore the wiped caBundle", Duration::from_secs(10), || async {
        ca_bundles() == want
    })
    .await;
    c.namespace("inj", &[("palisade.io/inject", "enabled"), ("palisade-test/webhook", "on")], &["default"]);
    c.namespace("plain", &[("palisade-test/webhook", "on")], &["default"]);

    let pod = |ns: &str, name: &str, annotations: Value, extra_spec: Value| {
        let mut spec = json!({"containers": [{"name": "app", "image": "example/app:1"}]});
        for (k, v) in extra_spec.as_object().unwrap() {
            spec[k] = v.clone();
        }
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": ns, "labels": {"app": name}, "annotations": annotations},
               "spec": spec})
        .to_string()
    };
    let labelled = |yaml: String, inject: &str| {
        let mut pod: Value = serde_json::from_str(&yaml).unwrap();
        pod["metadata"]["labels"]["palisade.io/inject"] = json!(inject);
        pod.to_string()
    };
    let create = |yaml: String| {
        let (ok, out) = c.apply(&yaml);
        assert!(ok, "{out}");
    };
    let stored = |ns: &str, name: &str| c.get_json(&["get", "pod", name, "-n", ns]);
    let init_names = |p: &Value| -> Vec<String> {
        p["spec"]["initContainers"]
            .as_array()
            .map(|a| a.iter().map(|c| c["name"].as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };

    // Enabled by the namespace label.
    create(pod("inj", "p1", json!({}), json!({})));
    let p1 = stored("inj", "p1");
    assert_eq!(init_names(&p1), ["palisade-init", "palisade-proxy"]);
    let inits = p1["spec"]["initContainers"].as_array().unwrap();
    let (init, proxy) = (&inits[0], &inits[1]);
    assert_eq!(init["securityContext"]["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(
        proxy["startupProbe"]["httpGet"]["path"], "/ready",
        "the app starts only once the proxy has its identity"
    );
    let env: BTreeMap<String, Value> =
        proxy["env"].as_array().unwrap().iter().map(|e| (e["name"].as_str().unwrap().to_string(), e.clone())).collect();
    assert_eq!(env["PALISADE_CA_BUNDLE_PEM"]["value"], root.as_str(), "the sidecar trusts the mesh root");
    assert_eq!(env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.namespace");
    assert_eq!(env["PALISADE_LABELS"]["value"], "app=p1");
    let token =
        p1["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "palisade-token").expect("token volume");
    assert_eq!(token["projected"]["sources"][0]["serviceAccountToken"]["audience"], "palisade");
    assert_eq!(p1["metadata"]["annotations"]["palisade.io/status"], "injected");
    assert_eq!(p1["spec"]["containers"].as_array().unwrap().len(), 1, "the app container is untouched");

    // The same pod through the webhook again (its spec already carries the sidecar, without
    // the status annotation): never injected twice.
    let mut again = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p2", "namespace": "inj"}, "spec": p1["spec"].clone()});
    again["spec"].as_object_mut().unwrap().remove("nodeName");
    create(again.to_string());
    let p2 = stored("inj", "p2");
    assert_eq!(init_names(&p2), ["palisade-init", "palisade-proxy"], "no second sidecar");
    assert_eq!(p2["spec"]["volumes"].as_array().unwrap().iter().filter(|v| v["name"] == "palisade-token").count(), 1);

    // Opted out by annotation inside an enabled namespace; hostNetwork pods are skipped.
    create(pod("inj", "p3", json!({"palisade.io/inject": "disabled"}), json!({})));
    create(pod("inj", "p4", json!({}), json!({"hostNetwork": true})));
    // Not enabled: untouched. Enabled by annotation alone: injected.
    create(pod("plain", "p5", json!({}), json!({})));
    create(pod("plain", "p6", json!({"palisade.io/inject": "enabled"}), json!({})));
    for (ns, name) in [("inj", "p3"), ("inj", "p4"), ("plain", "p5")] {
        let p = stored(ns, name);
        assert!(init_names(&p).is_empty(), "{ns}/{name} must be untouched: {p}");
        assert!(p["metadata"]["annotations"].get("palisade.io/status").is_none(), "{ns}/{name}");
    }
    assert_eq!(init_names(&stored("plain", "p6")), ["palisade-init", "palisade-proxy"]);
    // A TCP probe would pass at the sidecar whatever the app does: it moves to the admin port,
    // and the sidecar gets the original to run.
    let tcp_probed = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p10", "namespace": "inj"},
        "spec": {"containers": [{"name": "app", "image": "example/app:1",
                                 "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 3}}]}});
    create(tcp_probed.to_string());
    let p10 = stored("inj", "p10");
    let live = &p10["spec"]["containers"][0]["livenessProbe"];
    assert_eq!(live["httpGet"], json!({"path": "/app-health/app/livez", "port": 15020, "scheme": "HTTP"}), "{live}");
    assert_eq!((live.get("tcpSocket"), &live["periodSeconds"]), (None, &json!(3)));
    let env = p10["spec"]["initContainers"][1]["env"].as_array().unwrap();
    let app_probes = env.iter().find(|e| e["name"] == "PALISADE_APP_PROBES").expect("the originals for the sidecar");
    let originals: Value = serde_json::from_str(app_probes["value"].as_str().unwrap()).unwrap();
    assert_eq!(originals["/app-health/app/livez"]["tcpSocket"]["port"], 8080);

    // The pod label opts in and out as the annotation does.
    create(labelled(pod("plain", "p8", json!({}), json!({})), "enabled"));
    create(labelled(pod("inj", "p9", json!({}), json!({})), "disabled"));
    assert_eq!(init_names(&stored("plain", "p8")), ["palisade-init", "palisade-proxy"]);
    assert!(init_names(&stored("inj", "p9")).is_empty(), "a pod labelled disabled stays out");

    // An override that makes no sense is refused with its name, not silently dropped.
    let (ok, out) = c.apply(&pod("inj", "p7", json!({"palisade.io/exclude-inbound-ports": "eighty"}), json!({})));
    assert!(!ok, "a bad annotation must refuse the pod");
    assert!(out.contains("palisade.io/exclude-inbound-ports"), "{out}");
    assert!(c.kubectl_output(&["get", "pod", "p7", "-n", "inj"]).status.code() != Some(0), "p7 was not stored");

    // The control plane goes away. A pod that asked for the mesh by label, its own or its
    // namespace's, is refused rather than started without it; every other pod is created, so
    // a mesh outage never blocks the rest of the cluster. An annotation alone cannot be
    // selected on and fails open (deploy/webhook.yaml says so).
    cp.proc.kill9();
    for (ns, name, yaml, hook) in [
        ("inj", "q1", pod("inj", "q1", json!({}), json!({})), "namespace.inject.palisade.io"),
        ("plain", "q2", labelled(pod("plain", "q2", json!({}), json!({})), "enabled"), "object.inject.palisade.io"),
    ] {
        let (ok, out) = c.apply(&yaml);
        assert!(!ok, "{ns}/{name} asked for the mesh and must not start without it");
        assert!(out.contains(&format!("failed calling webhook \"{hook}\"")), "{ns}/{name}: {out}");
        assert!(c.kubectl_output(&["get", "pod", name, "-n", ns]).status.code() != Some(0), "{ns}/{name} was stored");
    }
    create(pod("plain", "q3", json!({}), json!({})));
    create(labelled(pod("inj", "q4", json!({}), json!({})), "disabled"));
    create(pod("plain", "q5", json!({"palisade.io/inject": "enabled"}), json!({})));
    for (ns, name) in [("plain", "q3"), ("inj", "q4"), ("plain", "q5")] {
        assert!(init_names(&stored(ns, name)).is_empty(), "{ns}/{name} is created, uninjected");
    }

    c.kubectl(&["delete", "mutatingwebhookconfiguration", "palisade-injector-test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_manifests_apply_and_the_control_plane_runs_on_their_least_privilege_rbac() {
    let c = cluster();
    let dir = tempdir("k8s-deploy");
    c.kubectl(&["apply", "-f", &repo("deploy/namespace.yaml").display().to_string()]);
    c.kubectl(&["apply", "-f", &repo("deploy/control-plane.yaml").display().to_string()]);
    // The real webhook configuration would intercept every other test's pods (and has no
    // reachable Service here): the API server validates it without storing it.
    c.kubectl(&["apply", "--dry-run=server", "-f", &repo("deploy/webhook.yaml").display().to_string()]);
    let rendered = Command::new(tools::helm())
        .args([
            "template",
            "palisade",
            &repo("deploy/helm/palisade").display().to_string(),
            "--namespace",
            "palisade-system",
        ])
        .output()
        .unwrap();
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    let mut dry = Command::new(c.bin.join("kubectl"))
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(["apply", "--dry-run=server", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    dry.stdin.take().unwrap().write_all(&rendered.stdout).unwrap();
    let out = dry.wait_with_output().unwrap();
    assert!(out.status.success(), "the chart's objects are refused: {}", String::from_utf8_lossy(&out.stderr));

    // The control plane with nothing but the deployed ServiceAccount's rights.
    let token = c.token("palisade-system", "palisade-control", "https://kubernetes.default.svc.cluster.local");
    let kubeconfig = dir.join("palisade-control.kubeconfig");
    write_kubeconfig(
        &kubeconfig,
        &c.kubectl(&["config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}"]),
        &token,
    );
    let kube_arg = format!("--kubeconfig={}", kubeconfig.display());
    let (cp, _) = control_plane(c, &dir, "cp-rbac", "palisade-system", &[&kube_arg, "--webhook"]).await;
    let lease = || {
        c.kubectl(&[
            "get",
            "lease",
            "palisade-control-leader",
            "-n",
            "palisade-system",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
    };
    wait_for("the lease taken under least privilege", Duration::from_secs(10), || async { lease() == "cp-rbac" }).await;
    c.namespace("rbac", &[], &["api"]);
    assert_eq!(
        certify(&cp, &c.token("rbac", "api", "palisade")).await.unwrap(),
        "spiffe://cluster.local/ns/rbac/sa/api"
    );
    let (ok, out) = c.apply(
        "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: rbac}\n\
         spec: {action: ALLOW, rules: [{to: [{operation: {methods: [GET]}}]}]}\n",
    );
    assert!(ok, "{out}");
    wait_for("status written under least privilege", Duration::from_secs(10), || async {
        accepted_condition(c, "rbac", "p").is_some_and(|(s, _, _)| s == "True")
    })
    .await;
    // Mutable (a rotation updates it for every replica), holding every generation.
    let secret = c.get_json(&["get", "secret", "palisade-ca", "-n", "palisade-system"]);
    assert_ne!(secret["immutable"], true);
    assert!(secret["data"]["generations.json"].is_string(), "{secret}");
    let log = cp.proc.log_text();
    assert!(!log.contains("forbidden"), "the deployed RBAC lacks a permission the control plane uses:\n{log}");
}

/// The CA Secret's data, each value decoded.
fn ca_secret_data(c: &Cluster, ns: &str) -> (String, BTreeMap<String, String>) {
    use base64::Engine;
    let secret = c.get_json(&["get", "secret", "palisade-ca", "-n", ns]);
    let data = secret["data"].as_object().unwrap();
    let decoded = data
        .iter()
        .map(|(k, v)| {
            let bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
            (k.clone(), String::from_utf8(bytes).unwrap())
        })
        .collect();
    (secret["metadata"]["resourceVersion"].as_str().unwrap().to_string(), decoded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kek_from_its_own_secret_seals_the_ca_secret_and_a_wrong_one_changes_nothing() {
    use base64::Engine;
    let c = cluster();
    let dir = tempdir("k8s-kek");
    let ns = "kek-system";
    c.namespace("kek-app", &[], &["api"]);
    // Written without a KEK, the CA Secret holds its keys in clear (the attack works).
    let (mut cp, _) = control_plane(c, &dir, "cp-kek", ns, &[]).await;
    assert_eq!(
        certify(&cp, &c.token("kek-app", "api", "palisade")).await.unwrap(),
        "spiffe://cluster.local/ns/kek-app/sa/api"
    );
    let root = std::fs::read_to_string(cp.root_pem_path()).unwrap();
    let (_, clear) = ca_secret_data(c, ns);
    assert!(clear["intermediate.key"].contains("PRIVATE KEY"));
    cp.proc.terminate(Duration::from_secs(10));

    let kek = |name: &str, byte: u8| {
        let value = base64::engine::general_purpose::STANDARD.encode([byte; 32]);
        c.kubectl(&["create", "secret", "generic", name, "-n", ns, &format!("--from-literal=kek={value}")]);
    };
    kek("palisade-ca-kek", 7);
    let (cp, _) = control_plane(c, &dir, "cp-kek", ns, &["--ca-kek-secret", "palisade-ca-kek"]).await;
    assert!(cp.proc.log_text().contains("replaced by one with the keys sealed"), "{}", cp.proc.log_text());
    let (_, sealed) = ca_secret_data(c, ns);
    let leftover = c.kubectl_output(&["get", "secret", "palisade-ca-sealing", "-n", ns]);
    assert!(!leftover.status.success(), "the migration's sealed copy is removed when it is done");
    for (k, v) in &sealed {
        assert!(!v.contains("PRIVATE KEY"), "the CA Secret's {k} holds a key in clear");
    }
    for k in ["root.key", "intermediate.key"] {
        assert!(sealed[k].starts_with("palisade-sealed-v1:"), "{k}: {}", sealed[k]);
        let pem_body = clear[k].lines().nth(1).unwrap();
        assert!(!sealed.values().any(|v| v.contains(pem_body)));
    }
    assert_eq!(sealed["root.pem"], clear["root.pem"], "the same root");
    assert_eq!(std::fs::read_to_string(cp.root_pem_path()).unwrap(), root);
    assert_eq!(
        certify(&cp, &c.token("kek-app", "api", "palisade")).await.unwrap(),
        "spiffe://cluster.local/ns/kek-app/sa/api"
    );
    let ControlPlane { mut proc, state, .. } = cp;
    proc.terminate(Duration::from_secs(10));
    for entry in std::fs::read_dir(&state).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(!bytes.windows(11).any(|w| w == b"PRIVATE KEY"), "{} holds a key in clear", path.display());
        }
    }

    // A migration stopped after it deleted the clear Secret and before it wrote the sealed one
    // left the sealed copy: the next start restores it (same CA), not a new CA.
    let secret = c.get_json(&["get", "secret", "palisade-ca", "-n", ns]);
    let copy = json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "immutable": true,
        "metadata": {"name": "palisade-ca-sealing", "namespace": ns}, "data": secret["data"]});
    let (ok, out) = c.kubectl_stdin(&["create", "-f", "-"], &copy.to_string());
    assert!(ok, "{out}");
    c.kubectl(&["delete", "secret", "palisade-ca", "-n", ns]);
    let (cp, _) = control_plane(c, &dir, "cp-kek", ns, &["--ca-kek-secret", "palisade-ca-kek"]).await;
    assert!(cp.proc.log_text().contains("restored the CA Secret from the sealed copy"), "{}", cp.proc.log_text());
    let (version, restored) = ca_secret_data(c, ns);
    assert_eq!(restored, sealed, "the sealed CA came back as it was");
    assert_eq!(std::fs::read_to_string(cp.root_pem_path()).unwrap(), root);
    let gone = c.kubectl_output(&["get", "secret", "palisade-ca-sealing", "-n", ns]);
    assert!(!gone.status.success(), "the sealed copy is removed once restored");
    let ControlPlane { mut proc, .. } = cp;
    proc.terminate(Duration::from_secs(10));

    // A wrong KEK: a clear refusal, and the Secret untouched.
    kek("palisade-ca-kek-wrong", 8);
    let args: Vec<String> = [
        "control",
        "--kubernetes",
        "--namespace",
        ns,
        "--state-dir",
        &dir.join("state-wrong").display().to_string(),
        "--listen",
        &free_addr().to_string(),
        "--admin",
        &free_addr().to_string(),
        "--ca-kek-secret",
        "palisade-ca-kek-wrong",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut wrong =
        Proc::spawn_with_env("cp-wrong-kek", &dir, &args, &[("KUBECONFIG", &c.kubeconfig.display().to_string())]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = wrong.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "a control plane with a wrong KEK started:\n{}", wrong.log_text());
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(!status.success());
    let log = wrong.log_text();
    assert!(
        log.contains("does not open under this key-encryption key")
            && log.contains("is --ca-kek-secret kek-system/palisade-ca-kek-wrong the key-encryption key this Secret was sealed with?"),
        "{log}"
    );
    assert_eq!(ca_secret_data(c, ns), (version, sealed), "a failed start changed the CA Secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_whose_certificate_expired_in_an_outage_attests_again_with_its_token() {
    let c = cluster();
    let dir = tempdir("k8s-expiry");
    c.namespace("exp", &[], &["api"]);
    let next_listen = free_addr();
    let (mut first, _) = control_plane(c, &dir, "cp-exp-1", "exp-system", &["--cert-ttl", "3s"]).await;
    let control = format!("{},{next_listen}", first.listen);
    let sidecar = kube_sidecar(
        &dir,
        &control,
        &first.root_pem_path(),
        &c.token("exp", "api", "palisade"),
        "exp-api",
        None,
        &[],
        &[],
    )
    .await;
    first.proc.kill9();
    let ready = || async { status_of(&format!("http://{}/ready", sidecar.admin)).await };
    wait_for("the certificate to expire with no control plane", Duration::from_secs(10), || async {
        ready().await == Some(503)
    })
    .await;
    // A new replica (same CA, from the Secret) comes up; the expired certificate proves nothing,
    // so the sidecar presents its service-account token again.
    let listen_arg = format!("--listen={next_listen}");
    let (second, _) = control_plane(c, &dir, "cp-exp-2", "exp-system", &["--cert-ttl", "3s", &listen_arg]).await;
    wait_for("the sidecar to recover by itself", Duration::from_secs(20), || async { ready().await == Some(200) })
        .await;
    let ledger =
        Command::new(BIN).args(["status", "certs", "-o", "json", "--state-dir"]).arg(&second.state).output().unwrap();
    let rows: Vec<Value> = serde_json::from_slice(&ledger.stdout).unwrap();
    assert!(
        rows.iter()
            .any(|r| r["spiffe_id"] == "spiffe://cluster.local/ns/exp/sa/api" && r["credential"] == "kubernetes"),
        "re-attested with the token, not renewed: {rows:?}"
    );
    assert!(sidecar.proc.log_text().contains("attesting again"), "{}", sidecar.proc.log_text());
}

/// The management API on Kubernetes: a bearer token, TokenReview, then SubjectAccessReview for
/// the call's verb on its `palisade.io` resource in the control plane's namespace. Each answer
/// matches `kubectl auth can-i` for the same account; a sidecar's token (audience `palisade`)
/// opens nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_answers_exactly_as_cluster_rbac_does() {
    let c = cluster();
    let dir = tempdir("k8s-admin");
    c.namespace("ops", &[], &["revoker", "viewer", "nobody"]);
    let (cp, _) = control_plane(c, &dir, "cp-admin", "admin-system", &[]).await;
    let (ok, out) = c.apply(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: revoke-identities, namespace: admin-system}\n\
         rules: [{apiGroups: [palisade.io], resources: [identities], verbs: [revoke]}]\n\
         ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: revoker, namespace: admin-system}\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: revoke-identities}\n\
         subjects: [{kind: ServiceAccount, name: revoker, namespace: ops}]\n\
         ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: list-sidecars, namespace: admin-system}\n\
         rules: [{apiGroups: [palisade.io], resources: [sidecars], verbs: [list]}]\n\
         ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: viewer, namespace: admin-system}\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: list-sidecars}\n\
         subjects: [{kind: ServiceAccount, name: viewer, namespace: ops}]\n",
    );
    assert!(ok, "{out}");
    // What `kubectl auth can-i VERB RESOURCE.palisade.io -n admin-system --as SA` asks: a
    // SelfSubjectAccessReview as that account. (`kubectl auth can-i` itself sends group "" for a
    // resource no API serves, so it cannot ask about these; the review it would send is sent
    // here with the group, through kubectl and impersonation.)
    let can_i = |sa: &str, verb: &str, resource: &str| {
        let review = json!({
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {"group": "palisade.io", "resource": resource, "verb": verb, "namespace": "admin-system"}},
        });
        let as_sa = format!("--as=system:serviceaccount:ops:{sa}");
        let (ok, out) =
            c.kubectl_stdin(&["create", &as_sa, "--validate=false", "-o", "json", "-f", "-"], &review.to_string());
        assert!(ok, "{out}");
        let answer: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        answer["status"]["allowed"] == true
    };
    let bundle = TrustBundle::from_pem(&std::fs::read_to_string(cp.root_pem_path()).unwrap()).unwrap();
    let control = ControlClient::new(
        &cp.listen.to_string(),
        bundle,
        CertStore::new(),
        palisade::identity::SpiffeId::control_plane("cluster.local").unwrap(),
    );
    let api = |token: String| {
        let control = control.clone();
        async move {
            palisade::control::admin_client::client(
                control.channel().await.unwrap(),
                Some(format!("Bearer {token}").parse().unwrap()),
            )
        }
    };
    let victim = "spiffe://cluster.local/ns/ops/sa/victim";
    let revoke = || palisade::proto::admin::RevokeRequest {
        target: Some(palisade::proto::admin::revoke_request::Target::SpiffeId(victim.into())),
    };
    let mut answers = Vec::new();
    for sa in ["revoker", "viewer", "nobody"] {
        // A token for the API server's own audience, as `kubectl create token` gives by default.
        let mut client = api(c.token("ops", sa, ISSUER)).await;
        let revoked = client.revoke(revoke()).await;
        let listed = client.list_sidecars(palisade::proto::admin::ListSidecarsRequest {}).await;
        for (verb, resource, result) in
            [("revoke", "identities", revoked.map(|_| ())), ("list", "sidecars", listed.map(|_| ()))]
        {
            let expected = can_i(sa, verb, resource);
            match &result {
                Ok(()) => assert!(expected, "{sa} was allowed to {verb} {resource}, kubectl auth can-i says no"),
                Err(s) => {
                    assert!(!expected, "{sa} was refused {verb} {resource}, kubectl auth can-i says yes: {s:?}");
                    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
                    assert!(s.message().contains(&format!("system:serviceaccount:ops:{sa} may not {verb}")), "{s:?}");
                }
            }
            answers.push((sa, verb, result.is_ok()));
        }
    }
    assert_eq!(
        answers,
        vec![
            ("revoker", "revoke", true),
            ("revoker", "list", false),
            ("viewer", "revoke", false),
            ("viewer", "list", true),
            ("nobody", "revoke", false),
            ("nobody", "list", false),
        ]
    );
    // The revocation took effect; the cluster administrator sees it.
    std::fs::write(dir.join(format!("admin-{}.token", cp.listen.port())), ADMIN_TOKEN).unwrap();
    let mut admin = cp.api().await;
    let revoked = admin.list_revocations(palisade::proto::admin::ListRevocationsRequest {}).await.unwrap().into_inner();
    assert_eq!(revoked.spiffe_ids, vec![victim.to_string()]);

    // A sidecar's token (audience `palisade`) and garbage authenticate nobody.
    for token in [c.token("ops", "revoker", "palisade"), "not-a-token".to_string()] {
        let err = api(token).await.revoke(revoke()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    }
    // No token at all.
    let mut bare = palisade::control::admin_client::client(control.channel().await.unwrap(), None);
    let err = bare.list_sidecars(palisade::proto::admin::ListSidecarsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    // Audited, allowed and refused alike.
    let audit = std::fs::read_to_string(cp.state.join("audit.log")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("system:serviceaccount:ops:revoker")
            && l.contains("\"call\":\"Revoke\"")
            && l.contains("\"result\":\"allowed\"")),
        "{audit}"
    );
    assert!(
        audit.lines().any(|l| l.contains("system:serviceaccount:ops:nobody")
            && l.contains("\"call\":\"Revoke\"")
            && l.contains("\"result\":\"refused\"")),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kubernetes_only_the_api_servers_pod_ips_prove_a_registered_address() {
    use palisade::proto::discovery::discovery_client::DiscoveryClient;
    use palisade::proto::discovery::{DiscoveryRequest, Node};
    let c = cluster();
    let dir = tempdir("k8s-endpoint-proof");
    c.namespace("eps", &[], &["orders", "mallory"]);
    let (cp, _) = control_plane(c, &dir, "cp-eps", "eps-system", &[]).await;
    std::fs::write(cp.dir.join(format!("admin-{}.token", cp.listen.port())), ADMIN_TOKEN).unwrap();
    let (ok, out) = c.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: orders-0, namespace: eps, labels: {app: orders},\n\
         annotations: {palisade.io/status: injected}}\nspec: {serviceAccountName: orders, containers: [{name: app, image: example/orders:1}]}\n",
    );
    assert!(ok, "{out}");
    c.kubectl(&[
        "patch",
        "pod",
        "orders-0",
        "-n",
        "eps",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running","podIP":"10.45.0.7","podIPs":[{"ip":"10.45.0.7"}]}}"#,
    ]);
    // A registration over a raw stream, with a certificate of `identity` from the CA.
    let register = |identity: &'static str, addresses: &'static [&'static str]| {
        let cp = &cp;
        async move {
            let store = CertStore::new();
            store.set(mint_client_cert(&cp.state, identity, Duration::from_secs(600)), i64::MAX);
            let bundle = TrustBundle::from_pem(&std::fs::read_to_string(cp.root_pem_path()).unwrap()).unwrap();
            let client = ControlClient::new(
                &cp.listen.to_string(),
                bundle,
                store,
                palisade::identity::SpiffeId::control_plane("cluster.local").unwrap(),
            );
            let mut d = DiscoveryClient::new(client.channel().await.unwrap());
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let node = Node {
                spiffe_id: identity.into(),
                addresses: addresses.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            };
            tx.send(DiscoveryRequest { node: Some(node), ..Default::default() }).await.unwrap();
            let responses = d.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
            (tx, responses)
        }
    };
    let orders = "spiffe://cluster.local/ns/eps/sa/orders";
    let mallory = "spiffe://cluster.local/ns/eps/sa/mallory";
    // Wait until the API server's pod IP is in the table (an observer's snapshots show it).
    let (_observer, mut snapshots) = register(mallory, &[]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = tokio::time::timeout_at(deadline, snapshots.message()).await.expect("the pod IP in the table");
        let snap = resp.unwrap().unwrap().snapshot.unwrap();
        if snap.endpoints.iter().any(|e| e.address == "10.45.0.7:0" && e.spiffe_id == orders) {
            break;
        }
    }
    // Orders may register its pod's IP; not another address, not loopback. Mallory, holding a
    // valid certificate, may not register orders' pod IP.
    let (_o, _or) = register(orders, &["10.45.0.7:0", "10.45.0.8:0", "127.0.0.1:1"]).await;
    let (_m, _mr) = register(mallory, &["10.45.0.7:0"]).await;
    let sidecars = || async { cp.api_json("sidecars").await.as_array().unwrap().clone() };
    wait_for("both registrations judged", Duration::from_secs(10), || async {
        let all = sidecars().await;
        let refused = |id: &str| {
            all.iter()
                .filter(|s| s["spiffe_id"] == id && s["connected"] == true)
                .map(|s| s["refused_addresses"].as_array().map_or(0, |r| r.len()))
                .sum::<usize>()
        };
        refused(orders) == 2 && refused(mallory) == 1
    })
    .await;
    let all = sidecars().await;
    let accepted: Vec<(&str, &str)> = all
        .iter()
        .filter(|s| s["connected"] == true)
        .flat_map(|s| {
            s["addresses"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |a| (s["spiffe_id"].as_str().unwrap(), a.as_str().unwrap()))
        })
        .collect();
    assert_eq!(accepted, [(orders, "10.45.0.7:0")], "{all:#?}");
    let reason =
        all.iter().find(|s| s["spiffe_id"] == mallory && !s["refused_addresses"].as_array().unwrap().is_empty());
    assert!(reason.unwrap()["refused_addresses"][0]["reason"].as_str().unwrap().contains("API server"), "{all:#?}");
}

/// Revokes `identity` through `cp`'s management API, as the cluster's administrator.
fn revoke_through(cp: &ControlPlane, identity: &str) {
    std::fs::write(cp.dir.join(format!("admin-{}.token", cp.listen.port())), ADMIN_TOKEN).unwrap();
    let out = Command::new(BIN)
        .args(["control", "revoke", "--identity", identity])
        .args(cp.server_cli_args())
        .output()
        .unwrap();
    assert!(out.status.success(), "revoke through {}: {}", cp.listen, String::from_utf8_lossy(&out.stderr));
}

/// The service-account path checks revocations like every other: a token the API server
/// accepts earns a revoked identity nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_service_account_gets_no_certificate_for_a_valid_token() {
    let c = cluster();
    let dir = tempdir("k8s-revoked-sa");
    c.namespace("rev", &[], &["api", "other"]);
    let (cp, _) = control_plane(c, &dir, "cp-rev", "rev-system", &[]).await;
    let api = "spiffe://cluster.local/ns/rev/sa/api";
    assert_eq!(certify(&cp, &c.token("rev", "api", "palisade")).await.unwrap(), api);
    revoke_through(&cp, api);
    let s = certify(&cp, &c.token("rev", "api", "palisade")).await.expect_err("a revoked identity was certified");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains(&format!("{api} is revoked")), "{s:?}");
    assert_eq!(
        certify(&cp, &c.token("rev", "other", "palisade")).await.unwrap(),
        "spiffe://cluster.local/ns/rev/sa/other"
    );
}

/// Revocations live in the Kubernetes API: one stored through replica 1's management API is in
/// the shared ConfigMap, reaches replica 2 within a second (its watch, no polling), and replica
/// 2's issuance refuses the identity; a replica started afterwards starts with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_stored_through_one_replica_is_enforced_by_the_other() {
    let c = cluster();
    let dir = tempdir("k8s-shared-revocation");
    let system = "shared-rev-system";
    c.namespace("srev", &[], &["api", "other"]);
    let (one, _) = control_plane(c, &dir, "cp-srev-1", system, &[]).await;
    let (two, _) = control_plane(c, &dir, "cp-srev-2", system, &[]).await;
    let api = "spiffe://cluster.local/ns/srev/sa/api";
    assert_eq!(certify(&two, &c.token("srev", "api", "palisade")).await.unwrap(), api);

    std::fs::write(two.dir.join(format!("admin-{}.token", two.listen.port())), ADMIN_TOKEN).unwrap();
    let api_two = two.api().await;
    revoke_through(&one, api);
    let stored_at = Instant::now();
    wait_for("the revocation in replica 2's state", Duration::from_secs(3), || {
        let mut api_two = api_two.clone();
        async move {
            let list = api_two.list_revocations(palisade::proto::admin::ListRevocationsRequest {}).await.unwrap();
            list.into_inner().spiffe_ids.iter().any(|i| i == api)
        }
    })
    .await;
    let elapsed = stored_at.elapsed();
    assert!(elapsed < Duration::from_secs(1), "the revocation took {elapsed:?} to reach replica 2");
    let cm = c.get_json(&["get", "configmap", "palisade-revocations", "-n", system]);
    assert!(cm["data"]["identities"].as_str().unwrap().lines().any(|l| l == api), "{cm}");
    let s =
        certify(&two, &c.token("srev", "api", "palisade")).await.expect_err("replica 2 certified a revoked identity");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("is revoked"), "{s:?}");
    assert_eq!(
        certify(&two, &c.token("srev", "other", "palisade")).await.unwrap(),
        "spiffe://cluster.local/ns/srev/sa/other"
    );

    // A replica that starts later (an empty state directory) refuses it from its first answer.
    let (three, _) = control_plane(c, &dir, "cp-srev-3", system, &[]).await;
    let s = certify(&three, &c.token("srev", "api", "palisade")).await.expect_err("a new replica forgot a revocation");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
}

/// A workload certificate chain from `cp` for a service-account token.
async fn certify_chain(cp: &ControlPlane, token: &str) -> Result<String, tonic::Status> {
    palisade::tls::install_crypto_provider();
    let bundle = TrustBundle::from_pem(&std::fs::read_to_string(cp.root_pem_path()).unwrap()).unwrap();
    let client = ControlClient::new(
        &cp.listen.to_string(),
        bundle,
        CertStore::new(),
        palisade::identity::SpiffeId::control_plane("cluster.local").unwrap(),
    );
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
    match client.certify(csr.der().to_vec(), Some(Credential::KubernetesToken(token.to_string()))).await {
        Ok(resp) => Ok(resp.certificate_chain_pem),
        Err(palisade::agent::ControlClientError::Status(s)) => Err(s),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    }
}

/// The newest CA generation the CA Secret of `ns` holds: its state and its material.
fn newest_generation(c: &Cluster, ns: &str) -> (u64, String, palisade::identity::CaMaterial) {
    let (_, data) = ca_secret_data(c, ns);
    let all: Vec<Value> = serde_json::from_str(&data["generations.json"]).unwrap();
    let g = all.iter().max_by_key(|g| g["generation"].as_u64().unwrap()).unwrap();
    let field = |k: &str| g[k].as_str().unwrap().to_string();
    let material = palisade::identity::CaMaterial {
        root_cert_pem: field("root_cert_pem"),
        root_key_pem: field("root_key_pem"),
        intermediate_cert_pem: field("intermediate_cert_pem"),
        intermediate_key_pem: field("intermediate_key_pem"),
    };
    (g["generation"].as_u64().unwrap(), field("state"), material)
}

/// The CA set lives in the CA Secret: a rotation started through replica 1 is one operation for
/// the mesh. The new root reaches the sidecars of both replicas without a restart, the leader
/// switches signing, both replicas sign with the new intermediate, and restarting either
/// replica afterwards adopts the Secret as it stands: the old CA does not come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_through_one_replica_completes_for_both_and_survives_their_restarts() {
    let c = cluster();
    let dir = tempdir("k8s-rotate");
    let system = "rotate-system";
    c.namespace("rot", &[], &["one", "two"]);
    let ttl = ["--cert-ttl", "3s"];
    let (one, _) = control_plane(c, &dir, "cp-rot-1", system, &ttl).await;
    let (two, _) = control_plane(c, &dir, "cp-rot-2", system, &ttl).await;
    let old_root = std::fs::read_to_string(one.root_pem_path()).unwrap();
    let (first, _, old) = newest_generation(c, system);
    let app = EchoApp::start().await;
    let sidecar = |cp: &ControlPlane, sa: &'static str| {
        let (control, root, token) = (cp.listen.to_string(), cp.root_pem_path(), c.token("rot", sa, "palisade"));
        let dir = dir.clone();
        async move { kube_sidecar(&dir, &control, &root, &token, &format!("rot-{sa}"), Some(app.addr), &[], &[]).await }
    };
    let sidecars = [sidecar(&one, "one").await, sidecar(&two, "two").await];

    std::fs::write(one.dir.join(format!("admin-{}.token", one.listen.port())), ADMIN_TOKEN).unwrap();
    let out = Command::new(BIN).args(["control", "ca", "rotate"]).args(one.server_cli_args()).output().unwrap();
    assert!(out.status.success(), "ca rotate through replica 1: {}", String::from_utf8_lossy(&out.stderr));
    let (generation, state, new) = newest_generation(c, system);
    assert_eq!((generation, state.as_str()), (first + 1, "next"), "the rotation is stored in the Secret");

    // Before it signs, the new root reaches the sidecars of both replicas: a peer certified by
    // the new CA is accepted by each, without a restart.
    let new_ca = palisade::identity::CertificateAuthority::load(new.clone()).unwrap();
    let probe = certified_by(
        &new_ca,
        "spiffe://cluster.local/ns/rot/sa/probe",
        std::time::SystemTime::now() + Duration::from_secs(600),
    );
    let both_roots = format!("{old_root}{}", new.root_cert_pem);
    for s in &sidecars {
        let inbound = s.inbound.unwrap();
        wait_for(&format!("{} to trust the new root", s.identity), Duration::from_secs(5), || {
            let (probe, roots) = (probe.clone(), both_roots.clone());
            // Any HTTP answer (allowed or denied by policy) means the handshake was accepted.
            async move { mtls_status(inbound, &roots, probe).await.is_some() }
        })
        .await;
    }

    // The leader switches signing once the bundle had time to spread (3s lifetime + 2s): both
    // replicas sign with the new intermediate, and the sidecars renew onto it.
    for cp in [&one, &two] {
        let token = c.token("rot", "one", "palisade");
        let want = new.intermediate_cert_pem.trim().to_string();
        wait_for(&format!("replica {} to sign with the new intermediate", cp.listen), Duration::from_secs(30), || {
            let (token, want) = (token.clone(), want.clone());
            async move { certify_chain(cp, &token).await.is_ok_and(|chain| chain.contains(&want)) }
        })
        .await;
    }
    let (_, state, _) = newest_generation(c, system);
    assert_eq!(state, "active");
    for s in &sidecars {
        let inbound = s.inbound.unwrap();
        wait_for(&format!("{} to present a certificate of the new CA", s.identity), Duration::from_secs(15), || {
            let (probe, root) = (probe.clone(), new.root_cert_pem.clone());
            async move { presented_serial(inbound, &root, Some(probe)).await.is_ok() }
        })
        .await;
    }

    // Restarting either replica adopts the Secret as it stands: the new CA signs, the old one
    // is not active again, and the Secret is unchanged.
    for (name, cp) in [("cp-rot-1", one), ("cp-rot-2", two)] {
        // Killed: the sidecars' open streams would hold a graceful stop for its whole grace.
        let ControlPlane { mut proc, .. } = cp;
        proc.kill9();
        let (again, _) = control_plane(c, &dir, name, system, &ttl).await;
        let chain = certify_chain(&again, &c.token("rot", "two", "palisade")).await.unwrap();
        assert!(chain.contains(new.intermediate_cert_pem.trim()), "{name} signs with the old CA after a restart");
        assert!(!chain.contains(old.intermediate_cert_pem.trim()));
        let (_, data) = ca_secret_data(c, system);
        assert_eq!(data["intermediate.pem"], new.intermediate_cert_pem, "a restart changed the active CA");
        let (_, state, _) = newest_generation(c, system);
        assert_eq!(state, "active");
    }
}

/// Rollout in CRD status: each replica counts the selected sidecars connected to it, and the
/// totals cover every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_status_counts_the_selected_sidecars_of_every_replica_that_run_it() {
    let c = cluster();
    let dir = tempdir("k8s-rollout");
    c.namespace("rollout", &[], &["orders", "web"]);
    let (cp_a, _) = control_plane(c, &dir, "ro-a", "rollout-system", &[]).await;
    let (cp_b, _) = control_plane(c, &dir, "ro-b", "rollout-system", &[]).await;
    let token = c.token("rollout", "orders", "palisade");
    let side = |cp: &ControlPlane, name: &'static str, token: String, labels: &'static [&'static str]| {
        let (control, root, dir) = (cp.listen.to_string(), cp.root_pem_path(), dir.clone());
        async move { kube_sidecar(&dir, &control, &root, &token, name, None, &[], labels).await }
    };
    let _a = side(&cp_a, "rollout-a", token.clone(), &["app=orders"]).await;
    let b = side(&cp_b, "rollout-b", token, &["app=orders"]).await;
    // Not selected: counted nowhere.
    let _web = side(&cp_b, "rollout-web", c.token("rollout", "web", "palisade"), &["app=web"]).await;
    let policy = |path: &str| {
        format!(
            "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: orders, namespace: rollout}}\n\
             spec: {{selector: {{matchLabels: {{app: orders}}}}, action: DENY, rules: [{{to: [{{operation: {{paths: [{path}]}}}}]}}]}}\n"
        )
    };
    let rollout =
        || c.get_json(&["get", "authorizationpolicy", "orders", "-n", "rollout"])["status"]["rollout"].clone();
    let counts = |r: &Value| (r["selected"].as_u64(), r["current"].as_u64(), r["nacked"].as_u64());
    let replica = |r: &Value, name: &str| {
        let e = &r["replicas"][name];
        (e["selected"].as_u64(), e["current"].as_u64(), e["observedGeneration"].as_i64())
    };

    let (ok, out) = c.apply(&policy("/first"));
    assert!(ok, "{out}");
    wait_for("both replicas' sidecars counted as running the policy", Duration::from_secs(15), || async {
        let r = rollout();
        counts(&r) == (Some(2), Some(2), Some(0))
            && replica(&r, "ro-a") == (Some(1), Some(1), Some(1))
            && replica(&r, "ro-b") == (Some(1), Some(1), Some(1))
    })
    .await;

    // An edit is counted again at its new generation, by both replicas.
    let (ok, out) = c.apply(&policy("/second"));
    assert!(ok, "{out}");
    wait_for("the edit counted at generation 2", Duration::from_secs(15), || async {
        let r = rollout();
        counts(&r) == (Some(2), Some(2), Some(0))
            && replica(&r, "ro-a") == (Some(1), Some(1), Some(2))
            && replica(&r, "ro-b") == (Some(1), Some(1), Some(2))
    })
    .await;
    // The printed columns show the totals.
    let printed = c.kubectl(&["get", "authorizationpolicy", "orders", "-n", "rollout"]);
    let header: Vec<&str> = printed.lines().next().unwrap_or("").split_whitespace().collect();
    assert!(header.contains(&"SELECTED") && header.contains(&"CURRENT") && header.contains(&"NACKED"), "{printed}");

    // A sidecar that leaves is no longer counted.
    drop(b);
    wait_for("the departed sidecar uncounted", Duration::from_secs(15), || async {
        let r = rollout();
        counts(&r) == (Some(1), Some(1), Some(0)) && replica(&r, "ro-b") == (Some(0), Some(0), Some(2))
    })
    .await;
}
