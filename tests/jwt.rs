//! Issue 16, end-user tokens, end to end: a control plane that fetches an issuer's keys from a
//! local HTTPS JWKS server (its own CA, given with `--jwks-ca`), and two real sidecars: `web`
//! calls `orders`, whose sidecar verifies the token before policy and the app see the request.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const ISSUER: &str = "https://issuer.test";
const PARTNER: &str = "https://partner.test";

/// An RSA signing key and its public JWK.
struct RsaKey {
    encoding: EncodingKey,
    n: Vec<u8>,
    e: Vec<u8>,
}

impl RsaKey {
    fn generate() -> RsaKey {
        let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let pkcs8 = key.as_der().unwrap();
        // PrivateKeyInfo { version, algorithm, privateKey OCTET STRING { RSAPrivateKey } }
        let (info, _) = der(pkcs8.as_ref());
        let (_, rest) = der(info);
        let (_, rest) = der(rest);
        let (pkcs1, _) = der(rest);
        let public = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(key.public_key());
        RsaKey { encoding: EncodingKey::from_rsa_der(pkcs1), n: public.n, e: public.e }
    }

    fn jwk(&self, kid: &str) -> Value {
        json!({"kty": "RSA", "kid": kid, "use": "sig", "n": URL_SAFE_NO_PAD.encode(&self.n), "e": URL_SAFE_NO_PAD.encode(&self.e)})
    }

    /// The public key as PEM, the bytes an algorithm-confusion attack keys HMAC with.
    fn public_pem(&self) -> String {
        let components = aws_lc_rs::rsa::PublicKeyComponents { n: self.n.as_slice(), e: self.e.as_slice() };
        let der = components.as_der().unwrap();
        let body = STANDARD.encode(der.as_ref());
        let lines: Vec<&str> = body.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
        format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", lines.join("\n"))
    }

    fn sign(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

/// The contents of the DER element at the start of `input`, and what follows it.
fn der(input: &[u8]) -> (&[u8], &[u8]) {
    let (mut len, mut off) = (usize::from(input[1]), 2);
    if len & 0x80 != 0 {
        let n = len & 0x7f;
        len = input[2..2 + n].iter().fold(0, |acc, b| (acc << 8) | usize::from(*b));
        off = 2 + n;
    }
    (&input[off..off + len], &input[off + len..])
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Claims of a token `issuer` gives alice, patched by `patch` (a null removes a claim).
fn claims(issuer: &str, patch: Value) -> Value {
    let mut c = json!({"iss": issuer, "sub": "alice", "aud": "orders", "exp": now() + 600, "iat": now() - 5,
                       "scope": "orders:read orders:write"});
    for (k, v) in patch.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

/// The issuer's JWKS endpoint: HTTPS on loopback with a CA of its own; what it serves can be
/// changed (a key rotation) or broken (a failing issuer), and it counts its fetches.
struct JwksServer {
    url: String,
    ca_file: PathBuf,
    document: Arc<parking_lot::Mutex<String>>,
    status: Arc<AtomicU16>,
    fetches: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    async fn start(dir: &std::path::Path, document: String) -> JwksServer {
        palisade::tls::install_crypto_provider();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, &ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf.subject_alt_names.push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        let ca_file = dir.join("jwks-ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();

        let der_key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(palisade::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], der_key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let document = Arc::new(parking_lot::Mutex::new(document));
        let status = Arc::new(AtomicU16::new(200));
        let fetches = Arc::new(AtomicU64::new(0));
        let (doc, st, count) = (document.clone(), status.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, doc, st, count) = (acceptor.clone(), doc.clone(), st.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        count.fetch_add(1, Ordering::SeqCst);
                        let status = if req.uri().path() == "/jwks.json" { st.load(Ordering::SeqCst) } else { 404 };
                        let body = doc.lock().clone();
                        async move {
                            let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        JwksServer { url: format!("https://{addr}/jwks.json"), ca_file, document, status, fetches, task }
    }

    fn serve(&self, document: String) {
        *self.document.lock() = document;
    }
}

fn jwks(keys: &[Value]) -> String {
    json!({"keys": keys}).to_string()
}

/// The mesh of these tests: `web` calls `orders` through both sidecars.
struct Mesh {
    _dir: PathBuf,
    cp: ControlPlane,
    issuer: JwksServer,
    app: EchoApp,
    orders: Sidecar,
    _web: Sidecar,
    url: String,
}

/// `orders` trusts two issuers: `ISSUER`, whose keys the control plane fetches from the JWKS
/// server, and `PARTNER`, whose key is inline. A DENY policy requires an `ISSUER` user with the
/// `orders:read` scope on `/orders/*`; everything else is left to the mesh default (any mesh
/// caller).
async fn mesh(issuer_keys: &[Value], partner: &RsaKey) -> Mesh {
    mesh_refreshing_every(issuer_keys, partner, "1s").await
}

/// [`mesh`], with the control plane fetching the issuer's keys every `refresh`.
async fn mesh_refreshing_every(issuer_keys: &[Value], partner: &RsaKey, refresh: &str) -> Mesh {
    let dir = tempdir("jwt");
    let issuer = JwksServer::start(&dir, jwks(issuer_keys)).await;
    let resources = dir.join("resources");
    std::fs::create_dir_all(&resources).unwrap();
    let partner_jwks = jwks(&[partner.jwk("p1")]);
    std::fs::write(
        resources.join("jwt.yaml"),
        format!(
            r#"apiVersion: palisade.io/v1alpha1
kind: RequestAuthentication
metadata: {{name: users, namespace: test}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  jwtRules:
  - issuer: {ISSUER}
    audiences: [orders]
    jwksUri: {url}
    outputClaimToHeaders:
    - {{header: x-jwt-sub, claim: sub}}
    - {{header: x-jwt-scope, claim: scope}}
  - issuer: {PARTNER}
    jwks: '{partner_jwks}'
---
apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: test}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  action: DENY
  rules:
  - from: [{{source: {{notRequestPrincipals: ["{ISSUER}/*"]}}}}]
    to: [{{operation: {{paths: ["/orders/*"]}}}}]
  - to: [{{operation: {{paths: ["/orders/*"]}}}}]
    when: [{{key: "request.auth.claims[scope]", notValues: ["orders:read"]}}]
"#,
            url = issuer.url,
        ),
    )
    .unwrap();
    let (res, ca) = (resources.display().to_string(), issuer.ca_file.display().to_string());
    let cp = ControlPlane::start(&dir, &["--resources", &res, "--jwks-ca", &ca, "--jwks-refresh", refresh]).await;
    let app = EchoApp::start().await;
    // A 64 KiB token must reach the guard to be refused by it, not by the header limit.
    let big_heads = ["--max-header-bytes", "262144"];
    let orders =
        Sidecar::spawn(&cp, "orders", Some(app.addr), &[], &[&["--label", "app=orders"], &big_heads[..]].concat());
    orders.wait_ready().await;
    let route = free_addr();
    let web = Sidecar::spawn(
        &cp,
        "web",
        None,
        &[format!("{route}={}@{}", orders.inbound.unwrap(), id("orders"))],
        &big_heads,
    );
    web.wait_ready().await;
    Mesh { _dir: dir, cp, issuer, app, orders, _web: web, url: format!("http://{route}") }
}

impl Mesh {
    /// GET `path` through both sidecars with `token` as a bearer token (if any) and `headers`.
    async fn call(&self, path: &str, token: Option<&str>, headers: &[(&str, &str)]) -> (u16, http::HeaderMap, String) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(a) = &auth {
            all.push(("authorization", a));
        }
        get(&http_client(), &format!("{}{path}", self.url), &all).await.unwrap()
    }

    async fn wait_until_accepted(&self, token: &str) {
        wait_for("the issuer's keys at the sidecar", Duration::from_secs(20), || async {
            self.call("/public/ping", Some(token), &[]).await.0 == 200
        })
        .await;
    }
}

fn echoed(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not the app's echo ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_token_reaches_the_app_as_claims_and_each_forgery_is_refused_with_401() {
    let (key, other, partner) = (RsaKey::generate(), RsaKey::generate(), RsaKey::generate());
    let m = mesh(&[key.jwk("k1")], &partner).await;
    let valid = key.sign("k1", &claims(ISSUER, json!({})));
    m.wait_until_accepted(&valid).await;

    // The app gets the claims from the sidecar, not the caller, and never the token.
    let (status, _, body) = m.call("/public/a", Some(&valid), &[("x-jwt-sub", "mallory")]).await;
    assert_eq!(status, 200, "{body}");
    let seen = echoed(&body);
    assert_eq!(seen["headers"]["x-jwt-sub"], json!(["alice"]), "{seen}");
    assert_eq!(seen["headers"]["x-jwt-scope"], json!(["orders:read orders:write"]));
    assert!(seen["headers"].get("authorization").is_none(), "forwardOriginalToken is false: {seen}");
    // A token in the query parameter is removed too; the rest of the query stays.
    let (status, _, body) = m.call(&format!("/public/q?page=2&access_token={valid}"), None, &[]).await;
    assert_eq!(status, 200, "{body}");
    let seen = echoed(&body);
    assert_eq!((&seen["path"], &seen["query"]), (&json!("/public/q"), &json!("page=2")), "{seen}");
    assert_eq!(seen["headers"]["x-jwt-sub"], json!(["alice"]));

    // No token: policy decides, and no claim header survives from the caller.
    let (status, _, body) = m.call("/public/b", None, &[("x-jwt-sub", "mallory")]).await;
    assert_eq!(status, 200, "{body}");
    assert!(echoed(&body)["headers"].get("x-jwt-sub").is_none(), "{body}");

    let head = |h: Value| URL_SAFE_NO_PAD.encode(h.to_string());
    let payload = URL_SAFE_NO_PAD.encode(claims(ISSUER, json!({})).to_string());
    let mut hs256 = Header::new(Algorithm::HS256);
    hs256.kid = Some("k1".into());
    let confused = jsonwebtoken::encode(
        &hs256,
        &claims(ISSUER, json!({})),
        &EncodingKey::from_secret(key.public_pem().as_bytes()),
    )
    .unwrap();
    let forgeries: Vec<(&str, String, &str)> = vec![
        ("alg none", format!("{}.{payload}.", head(json!({"alg": "none", "kid": "k1"}))), "disallowed-algorithm"),
        ("HS256 keyed with the RSA public key", confused, "disallowed-algorithm"),
        ("signed by another key", other.sign("k1", &claims(ISSUER, json!({}))), "bad-signature"),
        ("unknown kid", key.sign("k9", &claims(ISSUER, json!({}))), "unknown-kid"),
        ("expired", key.sign("k1", &claims(ISSUER, json!({"exp": now() - 3600}))), "expired"),
        ("nbf in the future", key.sign("k1", &claims(ISSUER, json!({"nbf": now() + 3600}))), "not-yet-valid"),
        ("wrong aud", key.sign("k1", &claims(ISSUER, json!({"aud": "billing"}))), "wrong-audience"),
        ("wrong iss", key.sign("k1", &claims("https://evil.test", json!({}))), "wrong-issuer"),
        ("malformed base64", "abc$$.def.ghi".to_string(), "malformed"),
        ("64 KiB", "a".repeat(64 * 1024), "too-large"),
    ];
    let hits_before = m.app.hits.load(Ordering::SeqCst);
    for (what, token, reason) in &forgeries {
        let (status, headers, body) = m.call("/public/c", Some(token), &[]).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(headers.get("www-authenticate").unwrap(), "Bearer error=\"invalid_token\"", "{what}");
        assert!(body.contains(reason), "{what}: {body}");
    }
    assert_eq!(m.app.hits.load(Ordering::SeqCst), hits_before, "no refused request reached the app");

    // Each reason counted; the valid token verified once and then answered from the cache.
    let metrics = m.orders.metrics().await;
    for (what, _, reason) in &forgeries {
        let series = format!("reason=\"{reason}\"");
        assert!(metric(&metrics, "palisade_guard_refusals_total{guard=\"jwt\"", &series) >= 1.0, "{what}: {metrics}");
    }
    assert!(metric(&metrics, "palisade_jwt_verifications_total", "result=\"verified\"") >= 1.0, "{metrics}");
    assert!(metric(&metrics, "palisade_jwt_verifications_total", "result=\"cached\"") >= 2.0, "{metrics}");

    // The access log names the end user and the refusals' reasons, never a token.
    wait_for("access-log lines", Duration::from_secs(5), || async {
        m.orders.proc.stdout_text().contains("too-large")
    })
    .await;
    let out = m.orders.proc.stdout_text();
    assert!(out.lines().any(|l| l.contains("\"request_principal\":\"https://issuer.test/alice\"")), "{out}");
    assert!(out.lines().any(|l| l.contains("invalid token: expired")), "{out}");
    let log = m.orders.proc.log_text();
    for (what, token, _) in forgeries.iter().filter(|(_, t, _)| t.len() > 20) {
        let signature = token.rsplit('.').next().unwrap();
        let secret = if signature.len() > 20 { signature } else { token.as_str() };
        assert!(!out.contains(secret) && !log.contains(secret), "{what}: a token reached a log");
    }
    assert!(!out.contains(&valid) && !log.contains(&valid), "the valid token reached a log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_at_the_issuer_is_picked_up_and_a_failing_issuer_keeps_the_last_keys() {
    let (old, new, partner) = (RsaKey::generate(), RsaKey::generate(), RsaKey::generate());
    let m = mesh(&[old.jwk("k1")], &partner).await;
    let old_token = old.sign("k1", &claims(ISSUER, json!({})));
    m.wait_until_accepted(&old_token).await;

    // The issuer rotates: a new kid, the old key gone. No process is restarted.
    let new_token = new.sign("k2", &claims(ISSUER, json!({})));
    assert_eq!(m.call("/public/a", Some(&new_token), &[]).await.0, 401, "not yet known");
    m.issuer.serve(jwks(&[new.jwk("k2")]));
    m.wait_until_accepted(&new_token).await;
    let (status, _, body) = m.call("/public/a", Some(&old_token), &[]).await;
    assert_eq!(status, 401, "the removed key no longer verifies: {body}");
    assert!(body.contains("unknown-kid"), "{body}");

    // The issuer fails (an error page, then garbage): the last good keys stay in force.
    m.issuer.status.store(503, Ordering::SeqCst);
    let fetches = m.issuer.fetches.load(Ordering::SeqCst);
    wait_for("two failed fetches", Duration::from_secs(20), || async {
        m.issuer.fetches.load(Ordering::SeqCst) >= fetches + 2
    })
    .await;
    assert_eq!(m.call("/public/b", Some(&new_token), &[]).await.0, 200);
    m.issuer.status.store(200, Ordering::SeqCst);
    m.issuer.serve("<html>not a key set</html>".into());
    let fetches = m.issuer.fetches.load(Ordering::SeqCst);
    wait_for("two more fetches", Duration::from_secs(20), || async {
        m.issuer.fetches.load(Ordering::SeqCst) >= fetches + 2
    })
    .await;
    // A token not seen before, so no cached verification answers for it.
    let fresh = new.sign("k2", &claims(ISSUER, json!({"sub": "bob"})));
    assert_eq!(m.call("/public/c", Some(&fresh), &[]).await.0, 200);
    let status = m.cp.api_json("jwks").await;
    let entry = &status[&m.issuer.url];
    assert_eq!(entry["keys"], 1, "{status}");
    assert!(entry["last_error"].as_str().is_some_and(|e| e.contains("JWKS")), "{status}");
}

/// A token naming a `kid` the sidecar does not have makes the control plane fetch the issuer's
/// keys at once (the refresh interval here is ten minutes), and a flood of such tokens makes
/// it fetch at most once per 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_makes_the_control_plane_fetch_the_keys_at_once_but_not_again_within_30s() {
    let (old, new, newer, partner) = (RsaKey::generate(), RsaKey::generate(), RsaKey::generate(), RsaKey::generate());
    let m = mesh_refreshing_every(&[old.jwk("k1")], &partner, "10m").await;
    m.wait_until_accepted(&old.sign("k1", &claims(ISSUER, json!({})))).await;

    // The issuer rotates; the next scheduled fetch is ten minutes away.
    m.issuer.serve(jwks(&[new.jwk("k2")]));
    let fetches = m.issuer.fetches.load(Ordering::SeqCst);
    let new_token = new.sign("k2", &claims(ISSUER, json!({})));
    let (status, _, body) = m.call("/public/a", Some(&new_token), &[]).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unknown-kid"), "{body}");
    // Picked up in seconds: the refusal itself was the hint.
    wait_for("the rotated key, long before the refresh", Duration::from_secs(5), || async {
        m.call("/public/b", Some(&new_token), &[]).await.0 == 200
    })
    .await;
    assert_eq!(m.issuer.fetches.load(Ordering::SeqCst), fetches + 1, "one fetch for the hint");

    // Rotated again at once, and hammered with its tokens: inside the window no hint fetches,
    // so the newer key stays unknown however many tokens name it.
    m.issuer.serve(jwks(&[newer.jwk("k3")]));
    let until = std::time::Instant::now() + Duration::from_secs(3);
    let mut refused = 0;
    while std::time::Instant::now() < until {
        let token = newer.sign("k3", &claims(ISSUER, json!({"sub": format!("user-{refused}")})));
        let (status, _, body) = m.call("/public/c", Some(&token), &[]).await;
        assert_eq!(status, 401, "within 30 s of the last hinted fetch: {body}");
        assert!(body.contains("unknown-kid"), "{body}");
        refused += 1;
    }
    assert!(refused >= 20, "only {refused} tokens sent");
    assert_eq!(m.issuer.fetches.load(Ordering::SeqCst), fetches + 1, "no fetch inside the window");
    assert_eq!(m.call("/public/d", Some(&new_token), &[]).await.0, 200, "the keys in force stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_requiring_an_end_user_and_a_scope_allows_the_right_token_only() {
    let (key, partner) = (RsaKey::generate(), RsaKey::generate());
    let m = mesh(&[key.jwk("k1")], &partner).await;
    let alice = key.sign("k1", &claims(ISSUER, json!({})));
    m.wait_until_accepted(&alice).await;

    let (status, _, body) = m.call("/orders/7", Some(&alice), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(echoed(&body)["headers"]["x-jwt-sub"], json!(["alice"]));

    let read_only = key.sign("k1", &claims(ISSUER, json!({"sub": "carol", "scope": "orders:read"})));
    assert_eq!(m.call("/orders/7", Some(&read_only), &[]).await.0, 200, "scope as a one-item list");

    let hits = m.app.hits.load(Ordering::SeqCst);
    let no_scope = key.sign("k1", &claims(ISSUER, json!({"sub": "bob", "scope": "profile"})));
    let without_scope = key.sign("k1", &claims(ISSUER, json!({"sub": "dave", "scope": null})));
    // A valid token of the other trusted issuer proves a user, but not one this policy takes.
    let partner_user = partner.sign("p1", &claims(PARTNER, json!({"aud": null})));
    for (what, token) in [
        ("no token", None),
        ("no orders:read scope", Some(&no_scope)),
        ("no scope claim", Some(&without_scope)),
        ("partner user", Some(&partner_user)),
    ] {
        let (status, headers, body) = m.call("/orders/7", token.map(String::as_str), &[]).await;
        assert_eq!(status, 403, "{what}: {body}");
        assert_eq!(headers.get("x-palisade-denied-by").unwrap(), "test/require-jwt", "{what}");
        assert!(body.contains("test/require-jwt"), "{what}: {body}");
    }
    assert_eq!(m.app.hits.load(Ordering::SeqCst), hits, "no refused request reached the app");
    // The partner's token is valid elsewhere: authentication passed, policy refused above.
    assert_eq!(m.call("/public/p", Some(&partner_user), &[]).await.0, 200);
}

/// `palisade policy eval` verifies a token offline with the RequestAuthentication documents
/// next to the policies (inline keys), and refuses an invalid one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_eval_verifies_a_token_with_the_inline_keys_next_to_the_policies() {
    let key = RsaKey::generate();
    let dir = tempdir("jwt-eval");
    std::fs::write(
        dir.join("p.yaml"),
        format!(
            "apiVersion: palisade.io/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: users, namespace: shop}}\n\
             spec:\n  jwtRules:\n  - issuer: {ISSUER}\n    jwks: '{}'\n---\n\
             apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: users, namespace: shop}}\n\
             spec:\n  rules:\n  - from: [{{source: {{requestPrincipals: [\"{ISSUER}/alice\"]}}}}]\n",
            jwks(&[key.jwk("k1")])
        ),
    )
    .unwrap();
    let eval = |jwt: Value| {
        let request = dir.join(format!("r{}.json", rand::random::<u32>()));
        let req = json!({"destination": "spiffe://cluster.local/ns/shop/sa/orders", "destination_port": 8080,
                         "method": "GET", "path": "/", "jwt": jwt});
        std::fs::write(&request, req.to_string()).unwrap();
        let out = std::process::Command::new(BIN)
            .args(["policy", "eval", "--policies"])
            .arg(&dir)
            .arg("--request")
            .arg(&request)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, out) = eval(json!({"token": key.sign("k1", &claims(ISSUER, json!({})))}));
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = eval(json!({"token": key.sign("k1", &claims(ISSUER, json!({"exp": now() - 3600})))}));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("expired"), "{out}");
    let (code, out) = eval(json!({"claims": {"iss": ISSUER, "sub": "mallory"}}));
    assert_eq!(code, Some(1), "{out}");
}
