//! Every listener sheds idle and half-sent connections: a flood larger than the process's file
//! descriptor limit neither starves the data path nor makes an accept loop spin, and a
//! connection that never finishes its request head or TLS handshake is closed after the header
//! timeout (1 s here, `PALISADE_HEADER_TIMEOUT`; `--handshake-timeout` on the data path).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A process's file-descriptor limit in these tests (`prlimit`).
const NOFILE: u32 = 256;
/// More connections than the limit.
const FLOOD: usize = 400;
/// A request line cut short.
const HALF_REQUEST: &[u8] = b"GET /ready HTTP/1.1\r\nHost: adm";
/// The start of a TLS ClientHello whose record header announces 512 bytes that never come.
const HALF_CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x5a];
/// CPU a process may burn while flooded for the window below (a spinning accept loop burns
/// the whole window).
const CPU_BUDGET: f64 = 0.5;
const WINDOW: Duration = Duration::from_secs(2);

/// Spawns `program` under `prlimit --nofile=NOFILE`, with `env`.
fn spawn_limited(name: &str, dir: &Path, program: &str, args: &[String], env: &[(&str, &str)]) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let child = Command::new("prlimit")
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .arg(program)
        .args(args)
        .envs(env.iter().copied())
        .env("PALISADE_LOG", "info")
        .stdout(std::fs::File::create(dir.join(format!("{name}.out"))).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proc { child, log, name: name.to_string() }
}

/// User + system CPU seconds of `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    ticks / hz
}

/// Opens `n` connections to `addr`, half idle and half having sent `partial`. Connections the
/// server closes at once (over its cap) are kept too: they cost nothing.
async fn flood(addr: SocketAddr, n: usize, partial: &[u8]) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for i in 0..n {
        let Ok(Ok(mut tcp)) = tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await else {
            break;
        };
        if i % 2 == 1 {
            let _ = tcp.write_all(partial).await;
        }
        conns.push(tcp);
    }
    assert!(conns.len() >= n * 3 / 4, "the flood itself failed: {} of {n} connected", conns.len());
    conns
}

/// Waits until the server has closed every connection of the flood; panics at the deadline.
async fn all_closed_within(conns: Vec<TcpStream>, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    let waits = conns.into_iter().map(|mut c| async move {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout_at(deadline, c.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue, // an error response (408/400) before the close
                Err(_) => return false,
            }
        }
    });
    let closed = futures_util::future::join_all(waits).await;
    let open = closed.iter().filter(|c| !**c).count();
    assert_eq!(open, 0, "{open} of {} flood connections still held after {within:?}", closed.len());
}

/// `GET /ready` on `admin` from the source address `from`: whether it answered 200.
async fn ready_from(from: &str, admin: SocketAddr) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
    let Ok(Ok(mut tcp)) = tokio::time::timeout(Duration::from_secs(3), socket.connect(admin)).await else {
        return false;
    };
    if tcp.write_all(b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").await.is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_string(&mut reply)).await;
    reply.starts_with("HTTP/1.1 200")
}

/// Runs `requests` (each must succeed) for the CPU window and returns the CPU `pid` burnt.
async fn cpu_while<F, Fut>(pid: u32, mut request: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let before = cpu_seconds(pid);
    let started = Instant::now();
    while started.elapsed() < WINDOW {
        request().await;
        tokio::time::sleep(Duration::from_millis(100)).await; // request pacing, not synchronisation
    }
    cpu_seconds(pid) - before
}

/// `orders` (fd-limited, 1 s timeouts) with an app, and `web` routing to it with a warm pool.
struct Mesh {
    cp: ControlPlane,
    _app: EchoApp,
    orders: Proc,
    orders_admin: SocketAddr,
    orders_inbound: SocketAddr,
    _web: Sidecar,
    route: SocketAddr,
}

async fn mesh(tag: &str) -> Mesh {
    let dir = tempdir(tag);
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = EchoApp::start().await;
    let token = dir.join("orders.token");
    std::fs::write(&token, cp.token(&id("orders"))).unwrap();
    let (orders_admin, orders_inbound) = (free_addr(), free_addr());
    let args: Vec<String> = [
        "--control",
        &cp.listen.to_string(),
        "--ca-bundle",
        cp.root_pem_path().to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "--admin",
        &orders_admin.to_string(),
        "--inbound",
        &orders_inbound.to_string(),
        "--app",
        &app.addr.to_string(),
        "--handshake-timeout",
        "1s",
        // Longer than building a flood takes on a loaded machine: an HTTP/1 connection waiting
        // for its next request is closed after this, so web's pooled connection would be gone
        // before the request made during the flood, and a fresh one refused while flooded.
        "--header-read-timeout",
        "5s",
        "--access-log",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let orders = spawn_limited("orders", &dir, PROXY_BIN, &args, &[("PALISADE_HEADER_TIMEOUT", "1s")]);
    wait_for("orders ready", Duration::from_secs(30), || async {
        status_of(&format!("http://{orders_admin}/ready")).await == Some(200)
    })
    .await;
    let route = free_addr();
    let web = Sidecar::start(&cp, "web", None, &[format!("{route}={orders_inbound}@{}", id("orders"))]).await;
    wait_for("web reaches orders", Duration::from_secs(10), || async {
        status_of(&format!("http://{route}/warm")).await == Some(200)
    })
    .await;
    Mesh { cp, _app: app, orders, orders_admin, orders_inbound, _web: web, route }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_the_sidecar_admin_port_neither_starves_the_app_nor_spins() {
    let m = mesh("listeners-admin").await;
    let pid = m.orders.child.id();
    let conns = flood(m.orders_admin, FLOOD, HALF_REQUEST).await;
    let client = http_client();
    let (route, admin) = (m.route, m.orders_admin);
    let cpu = cpu_while(pid, || async {
        let url = format!("http://{route}/during-flood");
        let got = tokio::time::timeout(Duration::from_secs(3), get(&client, &url, &[]));
        assert_eq!(got.await.map(|r| r.map(|r| r.0)), Ok(Ok(200)), "the app's request through the flooded sidecar");
        // The flood comes from 127.0.0.1; a probe from elsewhere still gets a place.
        assert!(ready_from("127.0.0.2", admin).await, "/ready from another source during the flood");
    })
    .await;
    assert!(cpu < CPU_BUDGET, "the flooded sidecar burnt {cpu:.2} s of CPU in {WINDOW:?}");
    all_closed_within(conns, Duration::from_secs(6)).await;
    let admin = m.orders_admin;
    wait_for("admin answers again", Duration::from_secs(5), || async {
        status_of(&format!("http://{admin}/ready")).await == Some(200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_the_sidecar_inbound_port_neither_starves_pooled_traffic_nor_spins() {
    let m = mesh("listeners-inbound").await;
    let pid = m.orders.child.id();
    let conns = flood(m.orders_inbound, FLOOD, HALF_CLIENT_HELLO).await;
    let client = http_client();
    let route = m.route;
    let cpu = cpu_while(pid, || async {
        let url = format!("http://{route}/during-flood");
        let got = tokio::time::timeout(Duration::from_secs(3), get(&client, &url, &[]));
        assert_eq!(got.await.map(|r| r.map(|r| r.0)), Ok(Ok(200)), "the app's request over web's pooled connection");
    })
    .await;
    assert!(cpu < CPU_BUDGET, "the flooded sidecar burnt {cpu:.2} s of CPU in {WINDOW:?}");
    assert_eq!(status_of(&format!("http://{}/ready", m.orders_admin)).await, Some(200));
    all_closed_within(conns, Duration::from_secs(6)).await;
    // New connections are admitted again: a sidecar that connects afresh is served.
    let route = free_addr();
    let _late = Sidecar::start(&m.cp, "late", None, &[format!("{route}={}@{}", m.orders_inbound, id("orders"))]).await;
    wait_for("a fresh connection to the inbound after the flood", Duration::from_secs(10), || async {
        status_of(&format!("http://{route}/after-flood")).await == Some(200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_the_sidecar_outbound_listener_neither_starves_kept_alive_callers_nor_spins() {
    let dir = tempdir("listeners-outbound");
    let cp = ControlPlane::start(&dir, &[]).await;
    let app = EchoApp::start().await;
    let orders = Sidecar::start(&cp, "orders", Some(app.addr), &[]).await;
    let token = dir.join("web.token");
    std::fs::write(&token, cp.token(&id("web"))).unwrap();
    let (web_admin, route) = (free_addr(), free_addr());
    let args: Vec<String> = [
        "--control",
        &cp.listen.to_string(),
        "--ca-bundle",
        cp.root_pem_path().to_str().unwrap(),
        "--token-file",
        token.to_str().unwrap(),
        "--admin",
        &web_admin.to_string(),
        "--route",
        &format!("{route}={}@{}", orders.inbound.unwrap(), id("orders")),
        "--header-read-timeout",
        "1s",
        // A silent client is tunnelled as opaque TCP after detection; its tunnel idles out. Longer
        // than building the flood takes on a loaded machine, so the caller's kept-alive
        // connection is not closed as idle before its request during the flood (that is a
        // correct close, and the request racing it fails with IncompleteMessage).
        "--idle-timeout",
        "4s",
        "--access-log",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let web = spawn_limited("web", &dir, PROXY_BIN, &args, &[("PALISADE_HEADER_TIMEOUT", "1s")]);
    wait_for("web ready", Duration::from_secs(30), || async {
        status_of(&format!("http://{web_admin}/ready")).await == Some(200)
    })
    .await;
    // The caller's kept-alive connection exists before the flood.
    let client = http_client();
    assert_eq!(get(&client, &format!("http://{route}/warm"), &[]).await.unwrap().0, 200);
    // The caller keeps using it while the flood is built: an HTTP/1 connection that waits for
    // its next request longer than the header-read timeout (1 s here) is rightly closed, and
    // building the flood can take longer than that on a loaded machine.
    let building = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let warm = tokio::spawn({
        let (client, building) = (client.clone(), building.clone());
        async move {
            while building.load(std::sync::atomic::Ordering::Relaxed) {
                let got = get(&client, &format!("http://{route}/while-flooding"), &[]).await.map(|r| r.0);
                assert_eq!(got, Ok(200), "the kept-alive caller while the flood is built");
                tokio::time::sleep(Duration::from_millis(200)).await; // request pacing
            }
        }
    });
    let conns = flood(route, FLOOD, HALF_REQUEST).await;
    building.store(false, std::sync::atomic::Ordering::Relaxed);
    warm.await.expect("the caller's requests while the flood was built");
    let cpu = cpu_while(web.child.id(), || async {
        let url = format!("http://{route}/during-flood");
        let got = tokio::time::timeout(Duration::from_secs(3), get(&client, &url, &[]));
        assert_eq!(got.await.map(|r| r.map(|r| r.0)), Ok(Ok(200)), "the kept-alive caller during the flood");
    })
    .await;
    assert!(cpu < CPU_BUDGET, "the flooded sidecar burnt {cpu:.2} s of CPU in {WINDOW:?}");
    all_closed_within(conns, Duration::from_secs(11)).await;
    wait_for("a fresh caller is served after the flood", Duration::from_secs(5), || async {
        status_of(&format!("http://{route}/after-flood")).await == Some(200)
    })
    .await;
}

/// A control plane under the fd limit with 1 s timeouts and `env`.
async fn limited_control_plane(tag: &str, env: &[(&str, &str)]) -> (Proc, SocketAddr, SocketAddr, std::path::PathBuf) {
    let dir = tempdir(tag);
    let (listen, admin) = (free_addr(), free_addr());
    let state = dir.join("state");
    let args: Vec<String> = [
        "control",
        "--state-dir",
        state.to_str().unwrap(),
        "--listen",
        &listen.to_string(),
        "--admin",
        &admin.to_string(),
        "--default-policy",
        "allow-authenticated",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut env = env.to_vec();
    env.push(("PALISADE_HEADER_TIMEOUT", "1s"));
    let cp = spawn_limited("control", &dir, BIN, &args, &env);
    wait_for("control plane ready", Duration::from_secs(30), || async {
        status_of(&format!("http://{admin}/ready")).await == Some(200)
    })
    .await;
    (cp, listen, admin, dir)
}

/// A sidecar obtains a certificate from the control plane and its first snapshot.
async fn sidecar_joins(dir: &Path, listen: SocketAddr, admin: SocketAddr) {
    let cp = ControlPlane {
        proc: Proc::spawn("noop", dir, &["--version".to_string()]),
        dir: dir.to_path_buf(),
        state: dir.join("state"),
        listen,
        admin,
    };
    let sidecar = Sidecar::spawn(&cp, "late", None, &[], &[]);
    sidecar.wait_ready().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_control_plane_grpc_accept_loop_backs_off_and_recovers() {
    // The cap is set above the descriptor limit on purpose: accepts fail with EMFILE, and the
    // loop must back off rather than spin on a listener that stays readable.
    let (cp, listen, admin, dir) =
        limited_control_plane("listeners-grpc", &[("PALISADE_GRPC_MAX_CONNECTIONS", "100000")]).await;
    let pid = cp.child.id();
    let conns = flood(listen, FLOOD, HALF_CLIENT_HELLO).await;
    let cpu = cpu_while(pid, || async {}).await;
    assert!(cpu < CPU_BUDGET, "the flooded control plane burnt {cpu:.2} s of CPU in {WINDOW:?}");
    all_closed_within(conns, Duration::from_secs(20)).await;
    sidecar_joins(&dir, listen, admin).await;
    let log = std::fs::read_to_string(&cp.log).unwrap();
    assert!(log.contains("accept failed; backing off"), "no sign of EMFILE: the test did not exhaust descriptors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_the_control_plane_admin_port_is_capped_and_timed_out() {
    let (cp, listen, admin, dir) = limited_control_plane("listeners-cp-admin", &[]).await;
    let pid = cp.child.id();
    let conns = flood(admin, FLOOD, HALF_REQUEST).await;
    let cpu = cpu_while(pid, || async {
        assert!(ready_from("127.0.0.2", admin).await, "/ready from another source during the flood");
    })
    .await;
    assert!(cpu < CPU_BUDGET, "the flooded control plane burnt {cpu:.2} s of CPU in {WINDOW:?}");
    // gRPC still has its descriptors while the admin port is flooded.
    sidecar_joins(&dir, listen, admin).await;
    all_closed_within(conns, Duration::from_secs(6)).await;
    assert_eq!(status_of(&format!("http://{admin}/ready")).await, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_closes_half_sent_handshakes_and_sheds_over_its_cap() {
    use palisade::listener::{Listener, ListenerLimits};
    palisade::tls::install_crypto_provider();
    let ca = palisade::identity::CertificateAuthority::load(
        palisade::identity::CaMaterial::generate("cluster.local", 1).unwrap(),
    )
    .unwrap();
    let certs = palisade::tls::CertStore::new();
    certs.set(serving_cert(&ca), i64::MAX);
    // The API server is never asked: every request here fails before injection.
    let client = kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let limits = ListenerLimits {
        max_connections: 32,
        max_per_source: 0,
        header_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(5),
    };
    let roots: palisade::k8s::webhook::Roots = std::sync::Arc::new(String::new);
    let server = tokio::spawn(palisade::k8s::webhook::serve_limited(
        Listener::new(tcp, "webhook", limits),
        certs,
        client,
        Default::default(),
        roots,
    ));
    let started = Instant::now();
    let conns = flood(addr, 200, HALF_CLIENT_HELLO).await;
    all_closed_within(conns, Duration::from_secs(6)).await;
    assert!(started.elapsed() >= Duration::from_millis(900), "closed before the header timeout?");
    // Then a real client is served.
    let mut root_store = rustls::RootCertStore::empty();
    for c in palisade::tls::certs_from_pem(&ca.material().root_cert_pem).unwrap() {
        root_store.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(palisade::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(root_store)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("a real handshake after the flood");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: webhook\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut reply = String::new();
    let _ = tls.read_to_string(&mut reply).await;
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    server.abort();
}

/// A serving certificate for `localhost`, as the control plane's webhook has.
fn serving_cert(ca: &palisade::identity::CertificateAuthority) -> std::sync::Arc<rustls::sign::CertifiedKey> {
    let key = rcgen::KeyPair::generate().unwrap();
    let id = palisade::identity::SpiffeId::control_plane("cluster.local").unwrap();
    let issued = ca.sign_workload(&id, &key, Duration::from_secs(3600), &["localhost".to_string()]).unwrap();
    let chain = palisade::tls::certs_from_pem(&issued.chain_pem).unwrap();
    let key = palisade::tls::provider()
        .key_provider
        .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
        .unwrap();
    std::sync::Arc::new(rustls::sign::CertifiedKey::new(chain, key))
}
