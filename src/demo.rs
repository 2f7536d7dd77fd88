//! `palisade demo`: the whole mesh on one machine, narrated. No root, no network beyond
//! loopback, no Kubernetes. Every component is the real one: the control plane and the three
//! sidecars are child processes of this binary; only the three tiny apps run in this process.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

const POLICIES: &str = include_str!("../examples/demo/policies.yaml");
const FREEZE: &str = include_str!("../examples/demo/freeze.yaml");
const TD: &str = "spiffe://cluster.local/ns/demo/sa";

/// Flags of `palisade demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Keep the state, logs and access logs here instead of a fresh temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Certificate lifetime in the demo mesh (short, so a rotation happens while you watch).
    #[arg(long, default_value = "16s", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
}

struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        }
        for (_, c) in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?)
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn request(client: &HttpClient, method: &str, url: &str) -> anyhow::Result<(u16, String, String)> {
    let req = http::Request::builder().method(method).uri(url).body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req)).await??;
    let status = resp.status().as_u16();
    let by = resp.headers().get("x-palisade-denied-by").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let body = String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned();
    Ok((status, by, body))
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A tiny app: answers with its name, the caller identity its sidecar vouched for, and (for
/// orders) the result of calling payments through its own sidecar.
async fn app(name: &'static str, payments_via: Option<SocketAddr>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let client = client.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let client = client.clone();
                    async move {
                        let caller = req
                            .headers()
                            .get("x-forwarded-client-cert")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.split(';').find_map(|p| p.strip_prefix("URI=")))
                            .unwrap_or("unknown")
                            .to_string();
                        let mut body =
                            serde_json::json!({ "service": name, "path": req.uri().path(), "caller": caller });
                        if let (Some(via), &http::Method::POST) = (payments_via, req.method()) {
                            let charged = request(&client, "POST", &format!("http://{via}/payments/charge")).await;
                            body["payment"] = match charged {
                                Ok((s, _, b)) => {
                                    serde_json::json!({"status": s, "body": serde_json::from_str::<serde_json::Value>(&b).unwrap_or_default()})
                                }
                                Err(e) => serde_json::json!({"error": e.to_string()}),
                            };
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(body.to_string()))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    Ok(addr)
}

fn spawn(children: &mut Children, dir: &Path, name: &str, args: &[String]) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args(args)
        .env("PALISADE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join(format!("{name}.access.log")))?)
        .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    children.0.push((name.to_string(), child));
    Ok(())
}

async fn config_dump(client: &HttpClient, admin: SocketAddr) -> serde_json::Value {
    match request(client, "GET", &format!("http://{admin}/config_dump")).await {
        Ok((200, _, body)) => serde_json::from_str(&body).unwrap_or_default(),
        _ => serde_json::Value::Null,
    }
}

fn step(n: u32, title: &str) {
    println!("\n[{n}] {title}");
}

/// Runs the demo and returns when it has shown everything (or failed, saying where).
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("palisade-demo-{}", std::process::id())),
    };
    let state = dir.join("state");
    let resources = dir.join("resources");
    std::fs::create_dir_all(&resources)?;
    std::fs::write(resources.join("policies.yaml"), POLICIES)?;
    let mut children = Children(Vec::new());
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let exe = std::env::current_exe()?;
    println!("Palisade demo: a control plane and three services (web -> orders -> payments), each behind");
    println!("its own sidecar, on loopback. Logs and access logs: {}", dir.display());

    step(1, "Control plane: creates a root and an intermediate CA, serves identities and policy");
    let (control, control_admin) = (free_addr()?, free_addr()?);
    let s = |v: &str| v.to_string();
    spawn(
        &mut children,
        &dir,
        "control",
        &[
            s("control"),
            s("--state-dir"),
            state.display().to_string(),
            s("--listen"),
            control.to_string(),
            s("--admin"),
            control_admin.to_string(),
            s("--resources"),
            resources.display().to_string(),
            s("--cert-ttl"),
            format!("{}s", args.cert_ttl.as_secs()),
            s("--default-policy"),
            s("deny"),
        ],
    )?;
    wait_until("the control plane", Duration::from_secs(20), || async {
        request(&client, "GET", &format!("http://{control_admin}/ready")).await.is_ok_and(|r| r.0 == 200)
    })
    .await?;
    println!("    listening on {control} (gRPC, TLS); mesh default: deny; certificate lifetime {:?}", args.cert_ttl);

    step(2, "Identities: each sidecar redeems a single-use join token and gets a short-lived certificate");
    let payments_app = app("payments", None).await?;
    let (orders_to_payments, web_to_orders, web_to_payments) = (free_addr()?, free_addr()?, free_addr()?);
    let orders_app = app("orders", Some(orders_to_payments)).await?;
    let (orders_in, payments_in) = (free_addr()?, free_addr()?);
    let mut admins = Vec::new();
    for (sa, inbound, app_addr, routes) in [
        ("payments", Some(payments_in), Some(payments_app), vec![]),
        (
            "orders",
            Some(orders_in),
            Some(orders_app),
            vec![format!("{orders_to_payments}={payments_in}@{TD}/payments")],
        ),
        (
            "web",
            None,
            None,
            vec![
                format!("{web_to_orders}={orders_in}@{TD}/orders"),
                format!("{web_to_payments}={payments_in}@{TD}/payments"),
            ],
        ),
    ] {
        let token = Command::new(&exe)
            .args(["control", "token", "create", "--state-dir"])
            .arg(&state)
            .args(["--identity", &format!("{TD}/{sa}"), "--ttl", "2m"])
            .output()?;
        if !token.status.success() {
            bail!("token create: {}", String::from_utf8_lossy(&token.stderr));
        }
        let token_file = dir.join(format!("{sa}.token"));
        std::fs::write(&token_file, &token.stdout)?;
        let admin = free_addr()?;
        let mut a = vec![
            s("proxy"),
            s("--control"),
            control.to_string(),
            s("--ca-bundle"),
            state.join("ca/root.pem").display().to_string(),
            s("--token-file"),
            token_file.display().to_string(),
            s("--admin"),
            admin.to_string(),
            s("--label"),
            format!("app={sa}"),
            s("--telemetry-interval"),
            s("500ms"),
        ];
        if let (Some(i), Some(app)) = (inbound, app_addr) {
            a.extend([s("--inbound"), i.to_string(), s("--app"), app.to_string()]);
        }
        for r in routes {
            a.extend([s("--route"), r]);
        }
        spawn(&mut children, &dir, sa, &a)?;
        admins.push((sa, admin));
    }
    for (sa, admin) in &admins {
        wait_until(&format!("sidecar {sa}"), Duration::from_secs(20), || async {
            request(&client, "GET", &format!("http://{admin}/ready")).await.is_ok_and(|r| r.0 == 200)
        })
        .await?;
        let dump = config_dump(&client, *admin).await;
        println!(
            "    {:<9} {}  serial {}  (key generated in memory, never on disk)",
            sa,
            dump["certificate"]["spiffe_id"].as_str().unwrap_or("?"),
            dump["certificate"]["serial"].as_str().unwrap_or("?")
        );
    }

    step(3, "An allowed call: web -> orders (plaintext to web's sidecar, mutual TLS between sidecars)");
    let (status, _, body) = request(&client, "GET", &format!("http://{web_to_orders}/orders/42")).await?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    if status != 200 {
        bail!("expected 200 from orders, got {status}: {body}");
    }
    println!(
        "    ALLOWED {status}: orders saw caller {} (verified by its sidecar, allowed by demo/orders-from-web)",
        v["caller"]
    );
    let (status, _, body) = request(&client, "POST", &format!("http://{web_to_orders}/orders")).await?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    println!(
        "    ALLOWED {status}: POST /orders, and orders -> payments answered {} (caller {})",
        v["payment"]["status"], v["payment"]["body"]["caller"]
    );

    step(4, "A denied call: web -> payments directly (only orders may charge)");
    let (status, by, body) = request(&client, "POST", &format!("http://{web_to_payments}/payments/charge")).await?;
    if status != 403 {
        bail!("expected 403 from payments, got {status}: {body}");
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    println!(
        "    DENIED {status} by {by}: {} (request id {})",
        v["reason"].as_str().unwrap_or(""),
        v["request_id"].as_str().unwrap_or("")
    );

    step(5, "A live policy change: a change freeze (DENY POST on orders) lands without a restart");
    std::fs::write(resources.join("freeze.yaml"), FREEZE)?;
    let applied = Instant::now();
    let last = std::sync::Arc::new(parking_lot::Mutex::new((0, String::new(), String::new())));
    wait_until("the freeze to apply", Duration::from_secs(5), || {
        let (client, last) = (client.clone(), last.clone());
        let url = format!("http://{web_to_orders}/orders");
        async move {
            let r = request(&client, "POST", &url).await.unwrap_or_default();
            let denied = r.0 == 403;
            *last.lock() = r;
            denied
        }
    })
    .await?;
    let last = last.lock().clone();
    println!("    DENIED {} by {} after {} ms; reads still pass:", last.0, last.1, applied.elapsed().as_millis());
    let (status, _, _) = request(&client, "GET", &format!("http://{web_to_orders}/orders/42")).await?;
    println!("    ALLOWED {status}: GET /orders/42");
    std::fs::remove_file(resources.join("freeze.yaml"))?;
    wait_until("the freeze to lift", Duration::from_secs(5), || async {
        request(&client, "POST", &format!("http://{web_to_orders}/orders")).await.is_ok_and(|r| r.0 == 200)
    })
    .await?;
    println!("    freeze removed: POST /orders allowed again");

    step(6, "A live certificate rotation: every sidecar renews at half its lifetime, with a fresh key");
    let (_, web_admin) = admins.iter().find(|(sa, _)| *sa == "web").copied().context("web admin")?;
    let before = config_dump(&client, web_admin).await["certificate"]["serial"].as_str().unwrap_or("").to_string();
    let mut failed = 0u32;
    let mut served = 0u32;
    let rotation_deadline = args.cert_ttl * 2;
    let mut after = before.clone();
    let t0 = Instant::now();
    while after == before {
        if t0.elapsed() > rotation_deadline {
            bail!("no renewal within {rotation_deadline:?}");
        }
        match request(&client, "GET", &format!("http://{web_to_orders}/orders/42")).await {
            Ok((200, _, _)) => served += 1,
            _ => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = config_dump(&client, web_admin).await["certificate"]["serial"].as_str().unwrap_or("").to_string();
    }
    println!(
        "    web rotated: serial {before} -> {after} after {:.1}s; {served} requests meanwhile, {failed} failed",
        t0.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} requests failed during rotation");
    }

    step(7, "What the control plane knows (`palisade status`)");
    tokio::time::sleep(Duration::from_millis(700)).await; // one telemetry interval, for the graph
    let report = crate::control::status::fetch(control_admin).await?;
    for line in crate::control::status::render(&report).lines() {
        println!("    {line}");
    }
    let certs = Command::new(&exe).args(["status", "certs", "--limit", "6", "--state-dir"]).arg(&state).output()?;
    println!("\n    certificate ledger (newest first, `palisade status certs`):");
    for line in String::from_utf8_lossy(&certs.stdout).lines() {
        println!("    {line}");
    }

    drop(children);
    println!(
        "\nDone in {:.1}s. Everything above ran for real: TLS 1.3 with client certificates, policy on every request.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
