//! Test harness: real `palisade` processes on loopback, a real HTTP app, and waits on
//! conditions with deadlines (never sleeps as synchronisation).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

pub const BIN: &str = env!("CARGO_BIN_EXE_palisade");
/// The sidecar binary the injector runs (`palisade proxy` without the rest).
pub const PROXY_BIN: &str = env!("CARGO_BIN_EXE_palisade-proxy");

/// A free loopback port for a child process to bind.
///
/// Ports come from 10000–31999, below the kernel's ephemeral range (32768+), so no outgoing
/// connection can take one between our check and the child's bind; and each is handed out once
/// per test process, so two tests running in parallel never get the same one (asking the kernel
/// for port 0 did both, and a control plane then answered another test's readiness probe).
pub fn free_addr() -> SocketAddr {
    const FIRST: u32 = 10_000;
    const COUNT: u32 = 22_000;
    static NEXT: std::sync::OnceLock<AtomicU64> = std::sync::OnceLock::new();
    // Spread concurrent test processes (other binaries, other checkouts) over the range.
    let next = NEXT.get_or_init(|| AtomicU64::new(u64::from(std::process::id()) * 7919 % u64::from(COUNT)));
    for _ in 0..COUNT {
        let port = FIRST + (next.fetch_add(1, Ordering::Relaxed) % u64::from(COUNT)) as u32;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        if StdListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT)
}

/// Writes a file whole or not at all (a watcher never reads it half-written).
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A path in the repository (manifests, the chart, scripts).
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

pub fn tempdir(tag: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("palisade-test-{tag}-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A child process killed when dropped; its stderr goes to a log file kept for post-mortems.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, dir: &Path, args: &[String]) -> Proc {
        Self::spawn_with_env(name, dir, args, &[])
    }

    /// Like [`spawn`](Self::spawn) with extra environment variables for the child.
    pub fn spawn_with_env(name: &str, dir: &Path, args: &[String], env: &[(&str, &str)]) -> Proc {
        Self::spawn_program(BIN, name, dir, args, env)
    }

    /// A `palisade-proxy` sidecar process with `args`.
    pub fn spawn_proxy(name: &str, dir: &Path, args: &[String]) -> Proc {
        Self::spawn_program(PROXY_BIN, name, dir, args, &[])
    }

    fn spawn_program(program: &str, name: &str, dir: &Path, args: &[String], env: &[(&str, &str)]) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env("PALISADE_LOG", "info")
            .stdout(std::fs::File::create(dir.join(format!("{name}.out"))).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Proc { child, log, name: name.to_string() }
    }

    /// What the process wrote to stdout (the access and decision logs of a sidecar).
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("out")).unwrap_or_default()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait up to `within` for exit; returns the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "{} did not exit within {within:?}\n{}", self.name, self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.name, self.log_text());
        }
    }
}

/// Polls `cond` until it holds or `timeout` passes.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A client that opens one connection per request and keeps none. For tests that count
/// requests: a pooling client may open a spare connection that then idles, and a sidecar
/// rightly tunnels a silent connection as opaque TCP after detection, which counts once more.
pub fn http_client_unpooled() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(HttpConnector::new())
}

/// GET `url` with extra headers; returns status, headers and body text.
pub async fn get(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, http::HeaderMap, String), String> {
    let mut req = http::Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client.request(req.body(Full::new(Bytes::new())).unwrap()).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

pub async fn status_of(url: &str) -> Option<u16> {
    get(&http_client(), url, &[]).await.ok().map(|r| r.0)
}

/// A control plane process with its state directory.
pub struct ControlPlane {
    pub proc: Proc,
    pub dir: PathBuf,
    pub state: PathBuf,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl ControlPlane {
    pub async fn start(dir: &Path, extra: &[&str]) -> ControlPlane {
        Self::start_at(dir, free_addr(), extra).await
    }

    pub async fn start_at(dir: &Path, listen: SocketAddr, extra: &[&str]) -> ControlPlane {
        let state = dir.join("state");
        let admin = free_addr();
        let mut args = vec![
            "control".to_string(),
            "--state-dir".into(),
            state.display().to_string(),
            "--listen".into(),
            listen.to_string(),
            "--admin".into(),
            admin.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        // Most tests are about identity and transport, not policy: let any mesh identity in
        // unless the test sets the default itself.
        if !extra.contains(&"--default-policy") {
            args.extend(["--default-policy".into(), "allow-authenticated".into()]);
        }
        let proc = Proc::spawn(&format!("control-{}", listen.port()), dir, &args);
        wait_for("control plane ready", Duration::from_secs(30), || async {
            status_of(&format!("http://{admin}/ready")).await == Some(200)
        })
        .await;
        ControlPlane { proc, dir: dir.to_path_buf(), state, listen, admin }
    }

    pub fn root_pem_path(&self) -> PathBuf {
        self.state.join("ca/root.pem")
    }

    /// The arguments a sidecar of `sa` starts with: the control plane at `control` (this one,
    /// or whatever a test puts in its place), the mesh roots, a new join token in a file (also
    /// returned), and its admin address.
    pub fn sidecar_args(&self, control: SocketAddr, sa: &str, admin: SocketAddr) -> (Vec<String>, PathBuf) {
        let token = self.dir.join(format!("{sa}-{}.token", rand::random::<u32>()));
        std::fs::write(&token, self.token(&id(sa))).unwrap();
        let args = [
            "--control",
            &control.to_string(),
            "--ca-bundle",
            &self.root_pem_path().display().to_string(),
            "--token-file",
            &token.display().to_string(),
            "--admin",
            &admin.to_string(),
        ]
        .map(String::from)
        .to_vec();
        (args, token)
    }

    /// A join token from the CLI, as an operator would make it.
    pub fn token(&self, identity: &str) -> String {
        let out = Command::new(BIN)
            .args(["control", "token", "create", "--state-dir"])
            .arg(&self.state)
            .args(["--identity", identity])
            .output()
            .unwrap();
        assert!(out.status.success(), "token create failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

impl ControlPlane {
    /// A join token for an administrator's identity (`spiffe://cluster.local/admin/NAME`).
    pub fn admin_token(&self, name: &str) -> String {
        let out = Command::new(BIN)
            .args(["control", "token", "create", "--admin", "--state-dir"])
            .arg(&self.state)
            .args(["--identity", &format!("spiffe://cluster.local/admin/{name}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "token create --admin failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// How tests reach the management API: a bearer token when the test left one in
    /// `DIR/admin-PORT.token` (Kubernetes mode), otherwise an administrator's credentials made
    /// once with `palisade control token create --admin` and `palisade control login`.
    pub fn server_args(&self) -> palisade::control::admin_client::ServerArgs {
        let server = Some(self.listen.to_string());
        let token_file = self.dir.join(format!("admin-{}.token", self.listen.port()));
        if token_file.exists() {
            return palisade::control::admin_client::ServerArgs {
                server,
                credentials: PathBuf::new(),
                token_file: Some(token_file),
                ca_bundle: Some(self.root_pem_path()),
            };
        }
        let credentials = self.dir.join(format!("admin-{}", self.listen.port()));
        if !credentials.join("cert.pem").exists() {
            let token = self.admin_token("tests");
            let out = Command::new(BIN)
                .args(["control", "login", "--server", &self.listen.to_string(), "--token", &token, "--ca-bundle"])
                .arg(self.root_pem_path())
                .arg("--credentials")
                .arg(&credentials)
                .output()
                .unwrap();
            assert!(out.status.success(), "palisade control login failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        palisade::control::admin_client::ServerArgs { server, credentials, token_file: None, ca_bundle: None }
    }

    /// The same, as `palisade` command-line arguments.
    pub fn server_cli_args(&self) -> Vec<String> {
        let a = self.server_args();
        let mut args = vec!["--server".to_string(), a.server.unwrap()];
        match a.token_file {
            Some(t) => args.extend([
                "--token-file".into(),
                t.display().to_string(),
                "--server-ca-bundle".into(),
                a.ca_bundle.unwrap().display().to_string(),
            ]),
            None => args.extend(["--credentials".into(), a.credentials.display().to_string()]),
        }
        args
    }

    /// A connected management-API client.
    pub async fn api(&self) -> palisade::control::admin_client::AdminClient {
        palisade::control::admin_client::connect(&self.server_args()).await.unwrap()
    }

    /// A view of the management API as JSON: `sidecars`, `traffic`, `resource_errors`, `jwks`
    /// (by uri) or `events`.
    pub async fn api_json(&self, view: &str) -> serde_json::Value {
        use palisade::proto::admin::StatusRequest;
        let mut api = self.api().await;
        match view {
            "sidecars" | "traffic" => {
                let report = palisade::control::status::fetch(&mut api).await.unwrap();
                if view == "sidecars" {
                    serde_json::to_value(report.sidecars).unwrap()
                } else {
                    serde_json::to_value(report.traffic).unwrap()
                }
            }
            _ => {
                let status = api.status(StatusRequest {}).await.unwrap().into_inner();
                match view {
                    "resource_errors" => serde_json::json!(status.resource_errors),
                    "jwks" => serde_json::Value::Object(
                        status
                            .jwks
                            .into_iter()
                            .map(|j| {
                                let error = (!j.last_error.is_empty()).then_some(j.last_error);
                                (j.uri, serde_json::json!({"keys": j.keys, "fetched_at": j.fetched_at, "last_error": error}))
                            })
                            .collect(),
                    ),
                    "events" => serde_json::Value::Array(
                        status
                            .certificate_events
                            .into_iter()
                            .map(|e| serde_json::json!({"spiffe_id": e.spiffe_id, "kind": e.kind, "serial": e.serial, "message": e.message}))
                            .collect(),
                    ),
                    other => panic!("no management-API view {other:?}"),
                }
            }
        }
    }
}

/// A sidecar process.
pub struct Sidecar {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub inbound: Option<SocketAddr>,
    pub identity: String,
}

pub fn id(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/test/sa/{sa}")
}

impl Sidecar {
    /// Starts a sidecar for `identity` and waits until it is ready. `inbound_app` gives it an
    /// inbound listener forwarding to that app; `routes` are `LISTEN=TARGET@ID` strings.
    pub async fn start(cp: &ControlPlane, sa: &str, inbound_app: Option<SocketAddr>, routes: &[String]) -> Sidecar {
        let s = Self::spawn(cp, sa, inbound_app, routes, &[]);
        s.wait_ready().await;
        s
    }

    pub fn spawn(
        cp: &ControlPlane,
        sa: &str,
        inbound_app: Option<SocketAddr>,
        routes: &[String],
        extra: &[&str],
    ) -> Sidecar {
        let identity = id(sa);
        let admin = free_addr();
        let (mut args, _) = cp.sidecar_args(cp.listen, sa, admin);
        let inbound = inbound_app.map(|app| {
            let inbound = free_addr();
            args.extend(["--inbound".into(), inbound.to_string(), "--app".into(), app.to_string()]);
            inbound
        });
        for r in routes {
            args.extend(["--route".into(), r.clone()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn_proxy(&format!("sidecar-{sa}"), &cp.dir, &args);
        Sidecar { proc, admin, inbound, identity }
    }

    pub async fn wait_ready(&self) {
        let admin = self.admin;
        wait_for(&format!("sidecar {} ready", self.identity), Duration::from_secs(30), || async move {
            status_of(&format!("http://{admin}/ready")).await == Some(200)
        })
        .await;
    }

    pub async fn metrics(&self) -> String {
        get(&http_client(), &format!("http://{}/metrics", self.admin), &[]).await.map(|r| r.2).unwrap_or_default()
    }

    pub async fn config_dump(&self) -> serde_json::Value {
        let body = get(&http_client(), &format!("http://{}/config_dump", self.admin), &[]).await.unwrap().2;
        serde_json::from_str(&body).unwrap()
    }
}

/// An app that answers every request with a JSON echo of what it received, and counts requests.
pub struct EchoApp {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EchoApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoApp {
    pub async fn start() -> EchoApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        async move {
                            // A slow endpoint: the app takes a second, as real ones do.
                            if req.uri().path().starts_with("/slow") {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                            let mut headers = BTreeMap::new();
                            for (k, v) in req.headers() {
                                headers
                                    .entry(k.as_str().to_string())
                                    .or_insert_with(Vec::new)
                                    .push(v.to_str().unwrap_or("").to_string());
                            }
                            let body = serde_json::json!({
                                "method": req.method().as_str(),
                                "path": req.uri().path(),
                                "query": req.uri().query(),
                                "headers": headers,
                            });
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                                body.to_string(),
                            ))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        EchoApp { addr, hits, task }
    }
}

/// An app that answers every request (HTTP/1.1 or HTTP/2 cleartext) with its name, after
/// `delay_ms` (the app's own latency, what a balancer must notice); `/hang` never in time; and
/// `/flaky...` with 500 while `flaky` is set (what retries mend). The `x-forwarded-client-cert`
/// it received comes back in `x-seen-xfcc`.
pub struct NamedApp {
    pub addr: SocketAddr,
    pub delay_ms: Arc<AtomicU64>,
    pub flaky: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for NamedApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl NamedApp {
    /// The app on a loopback port.
    pub async fn start(name: &'static str) -> NamedApp {
        NamedApp::serving(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), name)
    }

    /// The app on `listener`, wherever it was bound (a network namespace's thread, say), on the
    /// current runtime.
    pub fn serving(listener: tokio::net::TcpListener, name: &'static str) -> NamedApp {
        let addr = listener.local_addr().unwrap();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let flaky = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (delay, fails) = (delay_ms.clone(), flaky.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (delay, fails) = (delay.clone(), fails.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let ms = delay.load(Ordering::SeqCst);
                        let path = req.uri().path();
                        let (hang, flaky) =
                            (path == "/hang", path.starts_with("/flaky") && fails.load(Ordering::SeqCst));
                        let xfcc = req.headers().get("x-forwarded-client-cert").cloned();
                        async move {
                            if hang {
                                tokio::time::sleep(Duration::from_secs(30)).await;
                            }
                            if ms > 0 {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                            }
                            let mut resp = http::Response::new(Full::new(Bytes::from(name)));
                            if flaky {
                                *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                            }
                            if let Some(xfcc) = xfcc {
                                resp.headers_mut().insert("x-seen-xfcc", xfcc);
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        NamedApp { addr, delay_ms, flaky, task }
    }
}

/// Steady HTTP traffic against `url` from two kinds of clients at once: one keep-alive pool and
/// one that opens a new connection per request. Counts successes and failures.
pub struct Traffic {
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub failures: Arc<parking_lot::Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    pub fn start(url: String, every: Duration) -> Traffic {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = vec![];
        for keep_alive in [true, false] {
            let (ok, failed, failures, stop, url) =
                (ok.clone(), failed.clone(), failures.clone(), stop.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                let pooled = http_client();
                let mut tick = tokio::time::interval(every);
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    let res = if keep_alive {
                        get(&pooled, &url, &[]).await
                    } else {
                        get(&http_client(), &url, &[("connection", "close")]).await
                    };
                    match res {
                        Ok((200, _, _)) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        other => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            failures.lock().push(format!("keep_alive={keep_alive}: {other:?}"));
                        }
                    }
                }
            }));
        }
        Traffic { ok, failed, failures, stop, tasks }
    }

    /// Stops and waits for in-flight requests; returns (ok, failed).
    pub async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        (self.ok.load(Ordering::SeqCst), self.failed.load(Ordering::SeqCst), self.failures.lock().clone())
    }
}

/// The serial (hex) of the certificate a server presents, seen through a fresh TLS handshake
/// by a client holding `client_cert`; `None` if the handshake fails.
pub async fn presented_serial(
    addr: SocketAddr,
    bundle_pem: &str,
    client_cert: Option<Arc<rustls::sign::CertifiedKey>>,
) -> Result<String, String> {
    palisade::tls::install_crypto_provider();
    let bundle = palisade::tls::TrustBundle::from_pem(bundle_pem).map_err(|e| e.to_string())?;
    let store = palisade::tls::CertStore::new();
    if let Some(c) = client_cert {
        store.set(c, i64::MAX);
    }
    let cfg = palisade::tls::config::client_config(store, bundle, None, &[b"h2"]);
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(palisade::tls::config::sni(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, conn) = tls.get_ref();
    palisade::tls::peer_identity(conn.peer_certificates()).map(|(_, serial)| serial).map_err(|e| e.to_string())
}

/// An HTTP/1 connection to the sidecar inbound at `addr` by a holder of `client_cert`,
/// trusting `bundle_pem`; `None` when the handshake fails on either side. (With TLS 1.3 the
/// client's handshake completes before the server has judged its certificate: only a request
/// shows that the server accepted it.)
pub async fn mtls_http1(
    addr: SocketAddr,
    bundle_pem: &str,
    client_cert: Arc<rustls::sign::CertifiedKey>,
) -> Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    palisade::tls::install_crypto_provider();
    let bundle = palisade::tls::TrustBundle::from_pem(bundle_pem).ok()?;
    let certs = palisade::tls::CertStore::new();
    certs.set(client_cert, i64::MAX);
    let cfg = palisade::tls::config::client_config(certs, bundle, None, &[b"http/1.1"]);
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let tls = tokio_rustls::TlsConnector::from(cfg).connect(palisade::tls::config::sni(), tcp).await.ok()?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// The status a sidecar inbound answers a GET with, to a holder of `client_cert` (see
/// [`mtls_http1`]); `None` when the connection or the request fails (the certificate refused).
pub async fn mtls_status(
    addr: SocketAddr,
    bundle_pem: &str,
    client_cert: Arc<rustls::sign::CertifiedKey>,
) -> Option<u16> {
    let mut sender = mtls_http1(addr, bundle_pem, client_cert).await?;
    let req = http::Request::get("/").header("host", "probe").body(Full::new(Bytes::new())).unwrap();
    sender.send_request(req).await.ok().map(|r| r.status().as_u16())
}

/// Mints a client certificate for `identity` from the control plane's active CA (read from its
/// store), valid for `ttl`; tests use it to probe inbound listeners.
pub fn mint_client_cert(state: &Path, identity: &str, ttl: Duration) -> Arc<rustls::sign::CertifiedKey> {
    let store = palisade::control::Store::open(state).unwrap();
    let material = store.ca_generations().unwrap().into_iter().find(|g| g.state == "active").unwrap().material;
    let ca = palisade::identity::CertificateAuthority::load(material).unwrap();
    certified_by(&ca, identity, std::time::SystemTime::now() + ttl)
}

pub fn certified_by(
    ca: &palisade::identity::CertificateAuthority,
    identity: &str,
    not_after: std::time::SystemTime,
) -> Arc<rustls::sign::CertifiedKey> {
    let key = rcgen::KeyPair::generate().unwrap();
    let issued = ca
        .sign_workload_valid(
            &identity.parse().unwrap(),
            &key,
            std::time::SystemTime::now() - Duration::from_secs(3600),
            not_after,
            &[],
        )
        .unwrap();
    let chain = palisade::tls::certs_from_pem(&issued.chain_pem).unwrap();
    let sk = palisade::tls::provider()
        .key_provider
        .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
        .unwrap();
    Arc::new(rustls::sign::CertifiedKey::new(chain, sk))
}

/// A counter's value from Prometheus text (sum over series whose line contains `filter`).
pub fn metric(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
