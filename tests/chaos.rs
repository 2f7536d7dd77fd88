//! The chaos tier (issue 20): faults under constant load. Each test drives HTTP/1 keep-alive
//! requests, HTTP/1 requests on a new connection each, and gRPC calls over one HTTP/2
//! connection, all at once through a pair of real sidecars, while something breaks; each ends
//! with zero failed requests unless it says otherwise, and prints its load and its result:
//!
//! `chaos <test>: <rate> req/s; sent N, failed F, hung H; p99 X ms (Y ms during the fault)`
//!
//! A request that takes longer than [`HANG`] counts as hung, and a hang is always a failure:
//! a fault may refuse a request, never leave it waiting. The tests of this file run one at a
//! time (they measure latency on a 2-core machine), in about 6 minutes together.

mod common;
mod tools;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use palisade::proto::health::health_check_response::ServingStatus;
use palisade::proto::health::health_client::HealthClient;
use palisade::proto::health::health_server::{Health, HealthServer};
use palisade::proto::health::{HealthCheckRequest, HealthCheckResponse};

/// Longer than any request may take, fault or not.
const HANG: Duration = Duration::from_secs(10);
/// Each generator's interval: 50 requests per second each, 150 in all.
const EVERY: Duration = Duration::from_millis(20);

/// One test at a time: each measures latency.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---- Load ----

#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    failed: AtomicU64,
    hung: AtomicU64,
    /// (start, latency, ok) of every request.
    samples: parking_lot::Mutex<Vec<(Instant, Duration, bool)>>,
    failures: parking_lot::Mutex<Vec<String>>,
}

impl Stats {
    fn record(&self, kind: &str, started: Instant, result: Result<(), String>) {
        let took = started.elapsed();
        self.sent.fetch_add(1, Ordering::SeqCst);
        let ok = result.is_ok();
        if let Err(e) = result {
            self.failed.fetch_add(1, Ordering::SeqCst);
            if e.starts_with("hung") {
                self.hung.fetch_add(1, Ordering::SeqCst);
            }
            self.failures.lock().push(format!("{kind} at +{:?}: {e}", started.elapsed()));
        }
        self.samples.lock().push((started, took, ok));
    }
}

/// What a run of load came to.
#[derive(Debug)]
struct Report {
    sent: u64,
    failed: u64,
    hung: u64,
    p99: Duration,
    p99_fault: Duration,
    failures: Vec<String>,
}

/// Keep-alive HTTP/1, new-connection HTTP/1 and gRPC over one HTTP/2 connection, each every
/// [`EVERY`], through the client sidecar's routes.
struct Load {
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(http_route: SocketAddr, grpc_route: SocketAddr) -> Load {
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for keep_alive in [true, false] {
            let (stats, stop) = (stats.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let pooled = http_client();
                let url = format!("http://{http_route}/chaos");
                let mut tick = tokio::time::interval(EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    let started = Instant::now();
                    let fresh = http_client_unpooled();
                    let call = if keep_alive {
                        get(&pooled, &url, &[])
                    } else {
                        get(&fresh, &url, &[("connection", "close")])
                    };
                    let result = match tokio::time::timeout(HANG, call).await {
                        Err(_) => Err("hung".to_string()),
                        Ok(Ok((200, _, _))) => Ok(()),
                        Ok(Ok((status, headers, _))) => Err(format!(
                            "{status} {:?}",
                            headers.get("x-palisade-error").map(|v| v.to_str().unwrap_or("").to_string())
                        )),
                        Ok(Err(e)) => Err(e),
                    };
                    stats.record(if keep_alive { "keep-alive" } else { "new-connection" }, started, result);
                }
            }));
        }
        let (stats2, stop2) = (stats.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let channel =
                tonic::transport::Endpoint::from_shared(format!("http://{grpc_route}")).unwrap().connect_lazy();
            let mut client = HealthClient::new(channel);
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop2.load(Ordering::SeqCst) {
                tick.tick().await;
                let started = Instant::now();
                let call = client.check(HealthCheckRequest { service: String::new() });
                let result = match tokio::time::timeout(HANG, call).await {
                    Err(_) => Err("hung".to_string()),
                    Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
                    Ok(Ok(r)) => Err(format!("status {}", r.get_ref().status)),
                    Ok(Err(status)) => Err(format!("grpc {:?}: {}", status.code(), status.message())),
                };
                stats2.record("grpc", started, result);
            }
        }));
        Load { stats, stop, tasks }
    }

    fn sent(&self) -> u64 {
        self.stats.sent.load(Ordering::SeqCst)
    }

    /// Waits until `n` more requests have completed (the load is flowing).
    async fn flowing(&self, n: u64) {
        let from = self.sent();
        wait_for("load flowing", Duration::from_secs(30), || async move { self.sent() >= from + n }).await;
    }

    /// Stops, waits for requests in flight, and reports; `fault` is when the fault was on.
    async fn finish(self, name: &str, fault: Option<(Instant, Instant)>) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        let samples = self.stats.samples.lock().clone();
        let p99 = |filter: &dyn Fn(&Instant) -> bool| {
            let mut l: Vec<Duration> = samples.iter().filter(|(s, _, _)| filter(s)).map(|(_, d, _)| *d).collect();
            l.sort();
            l.get((l.len() * 99 / 100).min(l.len().saturating_sub(1))).copied().unwrap_or_default()
        };
        let report = Report {
            sent: self.stats.sent.load(Ordering::SeqCst),
            failed: self.stats.failed.load(Ordering::SeqCst),
            hung: self.stats.hung.load(Ordering::SeqCst),
            p99: p99(&|_| true),
            p99_fault: fault.map(|(from, to)| p99(&|s| *s >= from && *s <= to)).unwrap_or_default(),
            failures: self.stats.failures.lock().clone(),
        };
        let secs = samples.first().map(|(s, _, _)| s.elapsed().as_secs_f64()).unwrap_or(1.0).max(1.0);
        eprintln!(
            "chaos {name}: {:.0} req/s (keep-alive, new-connection and gRPC, {} each); sent {}, failed {}, hung {}; p99 {} ms ({} ms during the fault)",
            report.sent as f64 / secs,
            1000 / EVERY.as_millis(),
            report.sent,
            report.failed,
            report.hung,
            report.p99.as_millis(),
            report.p99_fault.as_millis(),
        );
        report
    }
}

fn assert_no_failures(r: &Report, at_least: u64) {
    assert_eq!(r.failed, 0, "failed requests: {:?}", &r.failures[..r.failures.len().min(10)]);
    assert!(r.sent >= at_least, "the load was not steady: {} requests", r.sent);
}

// ---- Apps and the mesh around them ----

struct HealthApp;

#[tonic::async_trait]
impl Health for HealthApp {
    async fn check(
        &self,
        _: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(HealthCheckResponse { status: ServingStatus::Serving as i32 }))
    }

    type WatchStream = futures_util::stream::Empty<Result<HealthCheckResponse, tonic::Status>>;

    async fn watch(
        &self,
        _: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("watch"))
    }
}

async fn start_grpc_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(HealthServer::new(HealthApp))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

/// The calling side of every test: a client sidecar with two routes, HTTP to the sidecar of
/// `http_sa` at `http_target` and gRPC to a sidecar in front of a gRPC app of its own.
struct Client {
    sidecar: Sidecar,
    grpc_server: Sidecar,
    http_route: SocketAddr,
    grpc_route: SocketAddr,
}

async fn client(cp: &ControlPlane, http_target: SocketAddr, http_sa: &str, extra: &[&str]) -> Client {
    let grpc_server = Sidecar::start(cp, "grpc", Some(start_grpc_app().await), &[]).await;
    let (http_route, grpc_route) = (free_addr(), free_addr());
    let routes = [
        format!("{http_route}={http_target}@{}", id(http_sa)),
        format!("{grpc_route}={}@{}", grpc_server.inbound.unwrap(), id("grpc")),
    ];
    let sidecar = Sidecar::spawn(cp, "client", None, &routes, extra);
    sidecar.wait_ready().await;
    Client { sidecar, grpc_server, http_route, grpc_route }
}

impl Client {
    fn load(&self) -> Load {
        Load::start(self.http_route, self.grpc_route)
    }
}

/// A client (above) and an HTTP server sidecar in front of an echo app.
struct Mesh {
    _http_app: EchoApp,
    http_server: Sidecar,
    client: Client,
}

async fn mesh(cp: &ControlPlane) -> Mesh {
    let http_app = EchoApp::start().await;
    let http_server = Sidecar::start(cp, "web", Some(http_app.addr), &[]).await;
    let client = client(cp, http_server.inbound.unwrap(), "web", &[]).await;
    Mesh { _http_app: http_app, http_server, client }
}

impl Mesh {
    fn sidecars(&self) -> [(&str, &Sidecar); 3] {
        [("client", &self.client.sidecar), ("web", &self.http_server), ("grpc", &self.client.grpc_server)]
    }
}

async fn renewals(s: &Sidecar) -> f64 {
    metric(&s.metrics().await, "palisade_cert_renewals_total", "success")
}

// ---- The faults ----

/// The control plane is killed with SIGKILL every four seconds for two minutes and started
/// again a second later, while certificates live 20 s: sidecars renew in the gaps, and not one
/// request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_killed_every_four_seconds_for_two_minutes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempdir("chaos-kill");
    let args = ["--cert-ttl", "20s"];
    let mut cp = ControlPlane::start(&dir, &args).await;
    let listen = cp.listen;
    let m = mesh(&cp).await;
    let load = m.client.load();
    load.flowing(50).await;
    let before: Vec<f64> = futures_util::future::join_all(m.sidecars().map(|(_, s)| renewals(s))).await;

    let (from, mut kills) = (Instant::now(), 0);
    while from.elapsed() < Duration::from_secs(120) {
        // Up for about three seconds (it takes a moment to start), down for one.
        tokio::time::sleep(Duration::from_secs(3)).await;
        cp.proc.kill9();
        kills += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
        cp = ControlPlane::start_at(&dir, listen, &args).await;
    }
    let to = Instant::now();
    // Every sidecar renewed through the storm: 120 s of 20 s certificates is at least four
    // renewals each, whatever the timing of the kills.
    for ((name, s), before) in m.sidecars().into_iter().zip(before) {
        wait_for(&format!("{name} renewed four times"), Duration::from_secs(30), || async move {
            renewals(s).await >= before + 4.0
        })
        .await;
    }
    let r = load.finish("control_plane_killed_every_four_seconds_for_two_minutes", Some((from, to))).await;
    assert!(kills >= 25, "only {kills} kills");
    assert_no_failures(&r, 10_000);
}

/// A root CA rotation is asked for every second and the policy changes every second, for 90 s,
/// with certificates of 4 s. A rotation cannot go faster than its overlap allows (the new root
/// must reach every sidecar before it signs, and the old one stays trusted until its last
/// certificate has expired, plus a minute: about 70 s here), so the requests made while one is
/// running are refused and the next starts as soon as it completes: one rotation completes and
/// a second takes over. The last policy reaches every sidecar, and not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_and_policy_change_every_second() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempdir("chaos-rotate");
    let resources = dir.join("resources");
    std::fs::create_dir_all(&resources).unwrap();
    let policy = |n: u32| {
        // Two spellings of the same permission, alternating: every version allows the load.
        let path = if n.is_multiple_of(2) { "/chaos" } else { "/chao*" };
        format!(
            "apiVersion: palisade.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: chaos-{n}, namespace: test}}\nspec:\n  action: ALLOW\n  rules:\n  - from: [{{source: {{principals: [\"{}\"]}}}}]\n    to: [{{operation: {{paths: [\"{path}\", \"/grpc.health.v1.Health/*\"]}}}}]\n",
            id("client")
        )
    };
    write_atomically(&resources.join("chaos.yaml"), &policy(0));
    let cp = ControlPlane::start(
        &dir,
        &[
            "--cert-ttl",
            "4s",
            "--resources",
            resources.to_str().unwrap(),
            "--default-policy",
            "deny",
            "--debounce",
            "50ms",
        ],
    )
    .await;
    let m = mesh(&cp).await;
    let load = m.client.load();
    load.flowing(50).await;

    let store = palisade::control::Store::open(&cp.state).unwrap();
    let first_generation = store.ca_generations().unwrap().iter().map(|g| g.generation).max().unwrap();
    let from = Instant::now();
    let mut n = 0;
    while from.elapsed() < Duration::from_secs(90) {
        n += 1;
        write_atomically(&resources.join("chaos.yaml"), &policy(n));
        // Refused while one is running ("already in progress"): then the next second tries again.
        let _ = std::process::Command::new(BIN)
            .args(["control", "ca", "rotate", "--state-dir"])
            .arg(&cp.state)
            .output()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let to = Instant::now();
    // The last policy reached every sidecar.
    let last = format!("chaos-{n}");
    for (name, s) in m.sidecars() {
        let last = last.clone();
        wait_for(&format!("{name} runs {last}"), Duration::from_secs(20), || {
            let last = last.clone();
            async move { s.config_dump().await.to_string().contains(&last) }
        })
        .await;
    }
    let r = load.finish("ca_rotation_and_policy_change_every_second", Some((from, to))).await;
    let generations = store.ca_generations().unwrap();
    let states: Vec<(u32, String)> = generations.iter().map(|g| (g.generation, g.state.clone())).collect();
    let newest = generations.iter().map(|g| g.generation).max().unwrap();
    assert!(newest >= first_generation + 2, "fewer than two rotations started: {states:?}");
    assert!(
        generations.iter().any(|g| g.generation == first_generation && g.state == "retired"),
        "the first rotation did not complete: {states:?}"
    );
    assert!(
        generations.iter().any(|g| g.generation > first_generation && g.state == "active"),
        "no new generation signs: {states:?}"
    );
    assert_no_failures(&r, 10_000);
}

/// Spawns a sidecar whose inbound listener is `inbound`, in front of `app`.
fn sidecar_at(cp: &ControlPlane, sa: &str, inbound: SocketAddr, app: SocketAddr, admin: SocketAddr) -> Proc {
    let (mut args, _) = cp.sidecar_args(cp.listen, sa, admin);
    args.extend(["--inbound".into(), inbound.to_string(), "--app".into(), app.to_string()]);
    Proc::spawn_proxy(&format!("sidecar-{sa}-{}", rand::random::<u16>()), &cp.dir, &args)
}

async fn ready(admin: SocketAddr) {
    wait_for("sidecar ready", Duration::from_secs(30), || async move {
        status_of(&format!("http://{admin}/ready")).await == Some(200)
    })
    .await;
}

/// An HTTP app on a fixed address that can be stopped and started again: `/slow` takes a
/// second.
struct RestartableApp {
    addr: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
    /// `/slow` requests being served.
    slow: Arc<AtomicU64>,
}

impl RestartableApp {
    async fn start(addr: SocketAddr) -> RestartableApp {
        let mut app = RestartableApp { addr, task: None, slow: Arc::new(AtomicU64::new(0)) };
        app.up().await;
        app
    }

    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        let slow = self.slow.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let slow = slow.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let slow = slow.clone();
                        async move {
                            if req.uri().path().starts_with("/slow") {
                                slow.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                slow.fetch_sub(1, Ordering::SeqCst);
                            }
                            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(b"ok"),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        }));
    }

    /// Stops: the listener closes and every connection with it (the JoinSet aborts them).
    async fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

/// The server sidecar drains (SIGTERM) and is started again on the same address, then its app
/// restarts behind it. Requests in flight when the drain starts finish; while either is down,
/// requests are refused at once with a reason (the client sidecar's 502/503), never left
/// waiting; once both are back every request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_drained_and_app_restarted_behind_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempdir("chaos-drain");
    let cp = ControlPlane::start(&dir, &[]).await;
    let mut app = RestartableApp::start(free_addr()).await;
    let (inbound, admin) = (free_addr(), free_addr());
    let mut server = sidecar_at(&cp, "drained", inbound, app.addr, admin);
    ready(admin).await;
    let c = client(&cp, inbound, "drained", &[]).await;
    let (http_route, load) = (c.http_route, c.load());
    load.flowing(50).await;

    // Slow requests in flight when the drain starts.
    let slow: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let started = Instant::now();
                let r =
                    tokio::time::timeout(HANG, get(&http_client_unpooled(), &format!("http://{http_route}/slow"), &[]))
                        .await;
                (started, r)
            })
        })
        .collect();
    let slow_now = app.slow.clone();
    wait_for("the slow requests reached the app", Duration::from_secs(10), || {
        let n = slow_now.load(Ordering::SeqCst);
        async move { n >= 8 }
    })
    .await;
    let fault_from = Instant::now();
    let status = server.terminate(Duration::from_secs(30));
    assert!(status.success(), "the drained sidecar exited with {status}");
    for s in slow {
        let (started, r) = s.await.unwrap();
        let r = r.expect("a request in flight hung through the drain");
        assert!(matches!(r, Ok((200, _, _))), "a request in flight when the drain started failed: {r:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // Down: requests are refused promptly while the sidecar is gone.
    let refused = get(&http_client_unpooled(), &format!("http://{http_route}/chaos"), &[]).await;
    assert!(matches!(&refused, Ok((502 | 503, h, _)) if h.contains_key("x-palisade-error")), "{refused:?}");
    server = sidecar_at(&cp, "drained", inbound, app.addr, admin);
    ready(admin).await;
    // The app restarts behind the sidecar.
    app.down().await;
    let refused = get(&http_client_unpooled(), &format!("http://{http_route}/chaos"), &[]).await;
    assert!(matches!(&refused, Ok((502 | 503, h, _)) if h.contains_key("x-palisade-error")), "{refused:?}");
    app.up().await;
    let fault_to = Instant::now();
    wait_for("requests succeed again", Duration::from_secs(10), || async {
        matches!(get(&http_client_unpooled(), &format!("http://{http_route}/chaos"), &[]).await, Ok((200, _, _)))
    })
    .await;
    load.flowing(200).await;
    let r = load.finish("sidecar_drained_and_app_restarted_behind_it", Some((fault_from, fault_to))).await;
    // Refusals are allowed while the sidecar or the app is down; hangs never are.
    assert_eq!(r.hung, 0, "hung requests: {:?}", &r.failures[..r.failures.len().min(10)]);
    for f in &r.failures {
        assert!(
            f.contains("502") || f.contains("503") || f.contains("Unavailable") || f.contains("connection"),
            "a failure that is not a clean refusal: {f}"
        );
    }
    drop(server);
}

/// Whether this process may create network namespaces and mount file systems (root).
fn is_root() -> bool {
    // The effective uid, from /proc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The control plane's state lives on a 16 MiB tmpfs that fills up: issuance fails with a
/// clear error (no space), the store is not corrupted, every certificate issued before is
/// still in the ledger, and issuance works again by itself once space returns. Sidecars keep
/// serving throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_disk_fills_and_recovers() {
    let _one = ONE_AT_A_TIME.lock().await;
    assert!(is_root(), "this test mounts a tmpfs: run the suite as root (CI does)");
    let dir = tempdir("chaos-disk");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    run("mount", &["-t", "tmpfs", "-o", "size=16m", "chaos-disk", state.to_str().unwrap()]);
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).output();
        }
    }
    let _unmount = Unmount(state.clone());

    // Certificates of 10 s renew about every 5 s: the disk stays full long enough for every
    // sidecar to be refused once, and not so long that one expires.
    let cp = ControlPlane::start(&dir, &["--cert-ttl", "10s"]).await;
    let m = mesh(&cp).await;
    let load = m.client.load();
    load.flowing(50).await;
    let issued_before = ledger_count(&cp.state);

    // Fill the disk.
    let filler = state.join("filler");
    let fault_from = Instant::now();
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .output()
        .unwrap();
    // A renewal fails now, and says why.
    for (name, s) in m.sidecars() {
        wait_for(&format!("{name}: a renewal refused for lack of space"), Duration::from_secs(30), || async move {
            metric(&s.metrics().await, "palisade_cert_renewals_total", "failure") >= 1.0
        })
        .await;
    }
    let log = cp.proc.log_text();
    assert!(
        log.contains("database or disk is full") || log.contains("No space left"),
        "the control plane did not say the disk is full:\n{}",
        &log[log.len().saturating_sub(3000)..]
    );
    // Space returns: issuance recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    let before: Vec<f64> = futures_util::future::join_all(m.sidecars().map(|(_, s)| renewals(s))).await;
    for ((name, s), before) in m.sidecars().into_iter().zip(before) {
        wait_for(&format!("{name} renews after the disk has space"), Duration::from_secs(30), || async move {
            renewals(s).await > before
        })
        .await;
    }
    let fault_to = Instant::now();
    let r = load.finish("control_plane_disk_fills_and_recovers", Some((fault_from, fault_to))).await;
    assert_no_failures(&r, 300);
    // Nothing was lost or corrupted: the store opens, checks whole, and holds every
    // certificate issued before the disk filled.
    drop(cp);
    let store = palisade::control::Store::open(&state).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    assert!(ledger_count(&state) >= issued_before);
}

fn ledger_count(state: &Path) -> usize {
    palisade::control::Store::open(state).unwrap().certificates(None, 1_000_000).unwrap().len()
}

/// A network namespace joined to the host by a veth pair: the host's end is `host_ip`, the
/// namespace's `ns_ip`. Removed on drop.
struct Namespace {
    name: String,
    host_ip: std::net::Ipv4Addr,
    ns_ip: std::net::Ipv4Addr,
}

impl Namespace {
    fn new() -> Namespace {
        assert!(is_root(), "this test makes a network namespace: run the suite as root (CI does)");
        let n = std::process::id() % 200 + 20;
        let name = format!("palchaos{}", std::process::id());
        let (host_ip, ns_ip) =
            (std::net::Ipv4Addr::new(10, 213, n as u8, 1), std::net::Ipv4Addr::new(10, 213, n as u8, 2));
        let (outside, inside) = (format!("pco{n}"), format!("pci{n}"));
        let _ = std::process::Command::new("ip").args(["netns", "del", &name]).output();
        let _ = std::process::Command::new("ip").args(["link", "del", &outside]).output();
        run("ip", &["netns", "add", &name]);
        let ns = Namespace { name, host_ip, ns_ip };
        run("ip", &["link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &ns.name]);
        run("ip", &["addr", "add", &format!("{host_ip}/30"), "dev", &outside]);
        run("ip", &["link", "set", &outside, "up"]);
        run("ip", &["-n", &ns.name, "addr", "add", &format!("{ns_ip}/30"), "dev", &inside]);
        run("ip", &["-n", &ns.name, "link", "set", &inside, "up"]);
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn iptables(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", self.name.as_str(), "iptables", "-w"];
        all.extend_from_slice(args);
        run("ip", &all);
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A sidecar cut off from the control plane (its packets to it dropped, in a network
/// namespace) for longer than its certificate lives: it turns not-ready, its open connections
/// close and requests to it fail closed at once with a reason and a metric on both sides (never
/// hang). When the path returns, its expired certificate proves nothing and its join token is
/// spent: it says so, and serves again as soon as a new token is in its token file, without a
/// restart. Requests on other paths never fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_cut_off_from_the_control_plane_longer_than_its_certificate_lives() {
    let _one = ONE_AT_A_TIME.lock().await;
    tools::netns_tools();
    let ns = Namespace::new();
    let dir = tempdir("chaos-cut");
    let cp_port = free_addr().port();
    let cp = ControlPlane::start_at(&dir, SocketAddr::from((ns.host_ip, cp_port)), &["--cert-ttl", "6s"]).await;
    let app = RestartableApp::start(SocketAddr::from((ns.host_ip, free_addr().port()))).await;
    let (inbound, admin) =
        (SocketAddr::from((ns.ns_ip, free_addr().port())), SocketAddr::from((ns.ns_ip, free_addr().port())));
    // The cut-off sidecar runs in the namespace.
    let (mut args, token) = cp.sidecar_args(cp.listen, "cut", admin);
    args.extend(["--inbound".into(), inbound.to_string(), "--app".into(), app.addr.to_string()]);
    let log = dir.join("sidecar-cut.log");
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, PROXY_BIN])
        .args(&args)
        .env("PALISADE_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let cut = Proc { child, log, name: "sidecar-cut".into() };
    ready(admin).await;
    let c = client(&cp, inbound, "cut", &[]).await;
    let (http_route, load) = (c.http_route, c.load());
    load.flowing(50).await;

    let fault_from = Instant::now();
    let rule = ["OUTPUT", "-d", &ns.host_ip.to_string(), "-p", "tcp", "--dport", &cp_port.to_string(), "-j", "DROP"];
    ns.iptables(&[&["-A"], &rule[..]].concat());
    wait_for("the cut-off sidecar turns not-ready", Duration::from_secs(20), || async move {
        status_of(&format!("http://{admin}/ready")).await == Some(503)
    })
    .await;
    // Its connections made before close once its certificate has lapsed (within a second of
    // the expiry), and every request is refused at once, with the reason; counted on both sides.
    let url = format!("http://{http_route}/chaos");
    wait_for("requests to the cut-off sidecar refused", Duration::from_secs(5), || async {
        !matches!(get(&http_client_unpooled(), &url, &[]).await, Ok((200, _, _)))
    })
    .await;
    // Every connection made before has closed at the expiry (the first refusal came after
    // it): from here on every request is refused.
    let started = Instant::now();
    let refused = get(&http_client_unpooled(), &url, &[]).await;
    assert!(started.elapsed() < Duration::from_secs(5), "a refusal took {:?}", started.elapsed());
    match &refused {
        Ok((502 | 503, h, _)) => assert!(h.contains_key("x-palisade-error"), "{refused:?}"),
        other => panic!("not a clean refusal: {other:?}"),
    }
    wait_for("the client sidecar counts the refused handshakes", Duration::from_secs(10), || async {
        metric(&c.sidecar.metrics().await, "palisade_tls_handshake_failures_total", "outbound") >= 1.0
    })
    .await;
    let cut_metrics = get(&http_client(), &format!("http://{admin}/metrics"), &[]).await.unwrap().2;
    assert!(
        metric(&cut_metrics, "palisade_tls_handshake_failures_total", "no_certificate") >= 1.0,
        "the cut-off sidecar does not say it has no certificate:\n{cut_metrics}"
    );
    // Longer than a certificate lives, then the path returns. The expired certificate proves
    // nothing and the join token was spent at enrolment: the sidecar says so and stays closed
    // (a Kubernetes sidecar re-attests with its projected token by itself, tests/kubernetes.rs).
    let refused_before = metric(
        &get(&http_client(), &format!("http://{admin}/metrics"), &[]).await.unwrap().2,
        "palisade_cert_renewals_total",
        "failure",
    );
    // The fault lasts a whole certificate lifetime (6 s) and a second more.
    tokio::time::sleep_until((fault_from + Duration::from_secs(7)).into()).await;
    ns.iptables(&[&["-D"], &rule[..]].concat());
    let log_path = cut.log.clone();
    wait_for("the sidecar says its join token is spent", Duration::from_secs(20), || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        async move { log.contains("already used") }
    })
    .await;
    let metrics = get(&http_client(), &format!("http://{admin}/metrics"), &[]).await.unwrap().2;
    assert!(metric(&metrics, "palisade_cert_renewals_total", "failure") > refused_before);
    assert_eq!(status_of(&format!("http://{admin}/ready")).await, Some(503));
    // A new join token in its token file: it recovers without a restart.
    write_atomically(&token, &cp.token(&id("cut")));
    let fault_to = Instant::now();
    ready(admin).await;
    wait_for("requests through the cut-off sidecar succeed again", Duration::from_secs(20), || async {
        matches!(get(&http_client_unpooled(), &format!("http://{http_route}/chaos"), &[]).await, Ok((200, _, _)))
    })
    .await;
    load.flowing(200).await;
    let r = load
        .finish(
            "sidecar_cut_off_from_the_control_plane_longer_than_its_certificate_lives",
            Some((fault_from, fault_to)),
        )
        .await;
    assert_eq!(r.hung, 0, "hung requests: {:?}", &r.failures[..r.failures.len().min(10)]);
    for f in &r.failures {
        assert!(
            !f.starts_with("grpc") && (f.contains("502") || f.contains("503")),
            "only requests to the cut-off sidecar may fail, and only cleanly: {f}"
        );
    }
    drop(cut);
}

/// The sidecar's resident memory, peak (VmHWM) and now (VmRSS), in bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    (kib("VmHWM:"), kib("VmRSS:"))
}

/// A flood of new connections, each sending 60 KiB of headers and then nothing, against a
/// sidecar capped at 1,500 connections: its memory stays under the bound its limits imply
/// (connections × (header limit + 32 KiB) + 64 MiB), it is never killed, it keeps serving
/// the steady load on other connections it already holds, and the flood's connections are
/// closed by the header-read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_memory_under_a_flood_of_connections_with_large_headers() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap();
    if soft < 8192 {
        rlimit::Resource::NOFILE.set(8192.min(hard), hard).unwrap();
    }
    let dir = tempdir("chaos-flood");
    let cp = ControlPlane::start(&dir, &[]).await;
    let http_app = EchoApp::start().await;
    let web = Sidecar::start(&cp, "web", Some(http_app.addr), &[]).await;
    const CAP: u64 = 1_500;
    const HEADER_LIMIT: u64 = 64 * 1024;
    let cap = CAP.to_string();
    // A flood connection whose first bytes come later than the detection timeout (100 ms; the
    // flooding test process is slow to write 3,000 of them) is carried as opaque TCP, which the
    // idle timeout closes instead of the header-read timeout: both at 5 s here.
    let limits = ["--max-connections", &cap, "--header-read-timeout", "5s", "--idle-timeout", "5s"];
    let mut c = client(&cp, web.inbound.unwrap(), "web", &limits).await;
    let http_route = c.http_route;
    let pid = c.sidecar.proc.child.id();
    let (_, idle) = memory_of(pid);
    let load = c.load();
    load.flowing(50).await;

    // 3,000 connections, twice the cap, each with 60 KiB of headers and no end of them.
    let header = format!("x-filler: {}\r\n", "a".repeat(590));
    let request = format!("GET /flood HTTP/1.1\r\nhost: flood\r\n{}", header.repeat(100));
    let request: &'static str = Box::leak(request.into_boxed_str());
    let fault_from = Instant::now();
    // Each flood connection ends one of three ways: refused at the door (the kernel's backlog
    // or the sidecar's cap), closed by the sidecar (header-read timeout), or still open after
    // 30 s: a hang, which fails the test. Connections the cap turns away are closed at once;
    // the others get 5 s each, and those queued behind them theirs after: well inside 30 s.
    let flood: Vec<_> = (0..3_000)
        .map(|_| {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Ok(Ok(mut tcp)) = tokio::time::timeout(HANG, tokio::net::TcpStream::connect(http_route)).await
                else {
                    return "refused";
                };
                let _ = tcp.write_all(request.as_bytes()).await;
                let mut buf = [0u8; 1024];
                match tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut buf)).await {
                    Ok(_) => "closed",
                    Err(_) => "hung",
                }
            })
        })
        .collect();
    let (mut closed, mut refused_at_door, mut hung) = (0u64, 0u64, 0u64);
    for f in flood {
        match f.await.unwrap() {
            "closed" => closed += 1,
            "refused" => refused_at_door += 1,
            _ => hung += 1,
        }
    }
    let fault_to = Instant::now();
    let (peak, _) = memory_of(pid);
    assert!(c.sidecar.proc.log_text().len() < 50 << 20, "the flood filled the log");
    load.flowing(100).await;
    let r = load
        .finish("sidecar_memory_under_a_flood_of_connections_with_large_headers", Some((fault_from, fault_to)))
        .await;
    let bound = CAP * (HEADER_LIMIT + 32 * 1024) + (64 << 20);
    eprintln!(
        "chaos flood: sidecar RSS idle {} MiB, peak {} MiB, bound {} MiB; of 3000 flood connections {closed} closed by the sidecar, {refused_at_door} refused at the door, {hung} left open",
        idle >> 20,
        peak >> 20,
        bound >> 20
    );
    assert!(peak < bound, "peak RSS {} MiB over the bound {} MiB", peak >> 20, bound >> 20);
    assert_eq!(hung, 0, "flood connections the sidecar left open past the header-read timeout");
    assert!(closed >= 1_500, "only {closed} flood connections got in: the flood did not reach the cap");
    // Alive (not killed), ready, and the steady load's keep-alive and gRPC connections were
    // served throughout; new connections may be refused while the flood holds every slot.
    assert!(c.sidecar.proc.child.try_wait().unwrap().is_none(), "the flooded sidecar exited");
    assert_eq!(status_of(&format!("http://{}/ready", c.sidecar.admin)).await, Some(200));
    assert_eq!(r.hung, 0, "hung requests: {:?}", &r.failures[..r.failures.len().min(10)]);
    for f in &r.failures {
        assert!(f.starts_with("new-connection"), "a request on an established connection failed: {f}");
    }
}
