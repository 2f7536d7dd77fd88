//! Scale by simulation: N lightweight discovery clients against one real control plane.
//!
//! Starts `target/release/palisade control` (build it first with `cargo build --release`),
//! connects N clients — each with its own mTLS identity, its own TLS connection and its own
//! registered address, as a sidecar has — waits until every one runs the same version, then
//! measures two pushes: one AuthorizationPolicy written into the watched resources directory,
//! and one more workload joining (one endpoint added to every sidecar's table). For each: how
//! long each client takes to receive the new version, how long until the control plane shows
//! every ACK, and the control plane's memory.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example discovery_scale -- --clients 5000
//! ```
//!
//! Every client registers one address (`10.a.b.c:15006`), bound to its identity the way an
//! operator binds one (`palisade control token create --address`: a join token carrying the
//! address, redeemed for the client's certificate), so the control plane's prover accepts it and
//! every snapshot carries N endpoints, as in a real mesh.
#![forbid(unsafe_code)]

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::Parser;
use common::{free_addr, http_get, ms, utc_now};
use palisade::agent::ControlClient;
use palisade::proto::discovery::{DiscoveryRequest, Node};
use palisade::tls::{CertStore, TrustBundle};
use parking_lot::Mutex;
use rustls::sign::CertifiedKey;
use tokio::sync::{Semaphore, mpsc};

/// Flags.
#[derive(Parser, Debug)]
struct Args {
    /// How many discovery clients to connect.
    #[arg(long, default_value_t = 5000)]
    clients: usize,
    /// How many clients may be dialling (TCP + TLS + first snapshot) at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// The control plane's `--debounce`.
    #[arg(long, default_value = "100ms")]
    debounce: String,
    /// The `palisade` binary to start.
    #[arg(long, default_value = "target/release/palisade")]
    bin: PathBuf,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 300)]
    phase_timeout: u64,
    /// Where the markdown result is appended (the file name gets the date).
    #[arg(long, default_value = "bench/results")]
    results: PathBuf,
}

const NAMESPACE: &str = "scale";

const POLICY: &str = "apiVersion: palisade.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: scale-allow-web, namespace: scale}
spec:
  selector: {matchLabels: {app: scale}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [\"spiffe://cluster.local/ns/scale/sa/web\"]}}]
    to:   [{operation: {methods: [\"GET\"], paths: [\"/scale/*\"]}}]
";

/// One response a client received.
struct Received {
    version: String,
    at: Instant,
    /// The encoded snapshot or delta.
    size: usize,
}

/// What one client has seen; written by its task, read by the bench.
#[derive(Default)]
struct ClientLog {
    /// Every response received, in order.
    received: Mutex<Vec<Received>>,
}

impl ClientLog {
    /// The version last received (and ACKed); empty before the first.
    fn version(&self) -> String {
        self.received.lock().last().map(|r| r.version.clone()).unwrap_or_default()
    }
}

/// Counters shared by every client task.
#[derive(Default)]
struct Fleet {
    logs: Vec<ClientLog>,
    /// Clients that have received (and ACKed) at least one snapshot.
    synced: AtomicUsize,
    /// Failed dials and broken streams (each retried).
    connect_errors: AtomicU64,
    stream_errors: AtomicU64,
    last_error: Mutex<String>,
}

/// The control plane process, killed on drop.
struct ControlPlane {
    child: Child,
    admin: SocketAddr,
    listen: SocketAddr,
    state: PathBuf,
    log: PathBuf,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControlPlane {
    /// `(VmHWM, VmRSS)` in KiB, from /proc.
    fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    palisade::tls::install_crypto_provider();
    let nofile = raise_nofile(args.clients as u64 + 1024)?;
    if !args.bin.is_file() {
        bail!("{} not found: run `cargo build --release` first, or pass --bin", args.bin.display());
    }

    let dir = std::env::temp_dir().join(format!("palisade-scale-{}", std::process::id()));
    let resources = dir.join("resources");
    std::fs::create_dir_all(&resources)?;
    let mut cp = start_control_plane(&args, &dir, &resources).await?;
    println!("control plane pid {} on {} (admin {}), log {}", cp.child.id(), cp.listen, cp.admin, cp.log.display());

    // Identities and addresses, outside the measurement: one more than the fleet, for the
    // client that joins in the endpoint phase.
    let minted = Instant::now();
    let mut certs = enrol_clients(&cp.state, args.clients + 1)?;
    let mint_time = minted.elapsed();
    println!("enrolled {} clients (certificate and bound address) in {:.1?}", certs.len(), mint_time);
    let bundle_pem = std::fs::read_to_string(cp.state.join("ca/root.pem")).context("reading ca/root.pem")?;
    let control_id = palisade::identity::SpiffeId::control_plane("cluster.local").unwrap();

    let fleet =
        Arc::new(Fleet { logs: (0..=args.clients).map(|_| ClientLog::default()).collect(), ..Default::default() });
    let (hwm_idle, _) = cp.memory_kib();
    let (dialing, listen) = (Arc::new(Semaphore::new(args.connect_concurrency)), cp.listen.to_string());
    let spawn_client = |i: usize, cert: Arc<CertifiedKey>| -> anyhow::Result<()> {
        let bundle = TrustBundle::from_pem(&bundle_pem)?;
        let store = CertStore::new();
        store.set(cert, i64::MAX);
        let client = ControlClient::new(&listen, bundle, store, control_id.clone());
        tokio::spawn(run_client(i, client, fleet.clone(), dialing.clone()));
        Ok(())
    };

    // Connect phase: every client dials, registers its address, receives and ACKs a snapshot;
    // then the mesh settles: every sidecar runs the version with every endpoint.
    let joiner = certs.pop().context("no certificate for the joining client")?;
    let connect_start = Instant::now();
    for (i, cert) in certs.into_iter().enumerate() {
        spawn_client(i, cert)?;
    }
    let timeout = Duration::from_secs(args.phase_timeout);
    wait_until("every client synced", timeout, &mut cp, || fleet.synced.load(Ordering::Acquire) == args.clients)
        .await?;
    let base = wait_settled(&cp, args.clients, timeout).await?;
    let connect_time = connect_start.elapsed();
    let (hwm_connected, rss_connected) = cp.memory_kib();
    println!("connect phase: {} clients run version {base} after {:.2?}", args.clients, connect_time);

    // The policy push: one policy change, written atomically (rename) so the watcher never
    // reads half.
    let policy = measure_push(&fleet, args.clients, &mut cp, timeout, || {
        let tmp = resources.join(".scale-policy.tmp");
        std::fs::write(&tmp, POLICY)?;
        std::fs::rename(&tmp, resources.join("scale-policy.yaml"))?;
        Ok(())
    })
    .await?;
    println!("policy phase: {}", policy.summary());
    // The endpoint push: one more workload joins; every other sidecar learns its address.
    let join = measure_push(&fleet, args.clients, &mut cp, timeout, || spawn_client(args.clients, joiner)).await?;
    println!("endpoint phase: {}", join.summary());

    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_default();
    let rev = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();

    let mut md = String::new();
    writeln!(md, "### Discovery push, {} clients with an endpoint each ({})", args.clients, utc_now())?;
    writeln!(md)?;
    writeln!(
        md,
        "`cargo run --release --example discovery_scale -- --clients {} --connect-concurrency {} --debounce {}` \
         at `{rev}`; {nproc} cores ({cpu}), shared with the clients; RLIMIT_NOFILE {nofile}.",
        args.clients, args.connect_concurrency, args.debounce
    )?;
    writeln!(md)?;
    writeln!(md, "| measure | policy change | one endpoint joins |")?;
    writeln!(md, "| --- | --- | --- |")?;
    writeln!(
        md,
        "| clients (one TLS connection, one identity, one address each) | {} | {} |",
        args.clients, args.clients
    )?;
    writeln!(md, "| endpoints in the table before the push | {} | {} |", args.clients, args.clients)?;
    writeln!(md, "| received by, of {} | {} | {} |", args.clients, policy.latencies.len(), join.latencies.len())?;
    for (name, p) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0)] {
        writeln!(md, "| push latency {name} (change → response received) | {} | {} |", policy.pct(p), join.pct(p))?;
    }
    writeln!(md, "| response size per client, largest | {} | {} |", policy.largest(), join.largest())?;
    writeln!(md, "| every ACK visible in `/v1/sidecars` | {} | {} |", policy.acked(), join.acked())?;
    writeln!(md, "| control plane RSS after the push | {} | {} |", mib(policy.rss), mib(join.rss))?;
    writeln!(md)?;
    writeln!(md, "| measure | value |")?;
    writeln!(md, "| --- | --- |")?;
    writeln!(
        md,
        "| connect phase: all dialled and running one version with every endpoint | {:.2} s |",
        connect_time.as_secs_f64()
    )?;
    writeln!(md, "| control plane RSS, idle before clients | {} |", mib(hwm_idle))?;
    writeln!(md, "| control plane RSS, all connected | {} |", mib(rss_connected))?;
    writeln!(md, "| control plane peak RSS (VmHWM) | {} |", mib(join.hwm.max(hwm_connected)))?;
    writeln!(
        md,
        "| client connection errors (dial / stream, retried) | {} / {} |",
        fleet.connect_errors.load(Ordering::Relaxed),
        fleet.stream_errors.load(Ordering::Relaxed)
    )?;
    writeln!(md, "| clients enrolled (not measured) | {:.1} s |", mint_time.as_secs_f64())?;
    let last_error = fleet.last_error.lock().clone();
    if !last_error.is_empty() {
        writeln!(md, "\nLast client error: `{last_error}`")?;
    }
    for (name, p) in [("policy change", &policy), ("endpoint join", &join)] {
        if let Err(e) = &p.outcome {
            writeln!(md, "\n**Incomplete ({name}):** {e}")?;
        }
    }
    println!("\n{md}");

    std::fs::create_dir_all(&args.results)?;
    let file = args.results.join(format!("discovery-scale-{}.md", &utc_now()[..10]));
    let mut prior = std::fs::read_to_string(&file).unwrap_or_default();
    prior.push_str(&md);
    prior.push('\n');
    std::fs::write(&file, prior)?;
    println!("appended to {}", file.display());
    drop(cp);
    let _ = std::fs::remove_dir_all(&dir);
    policy.outcome.and(join.outcome)
}

/// One push as the first `n` clients saw it.
struct Phase {
    /// From the change to each client's first response with another version, sorted.
    latencies: Vec<Duration>,
    /// Encoded size of each of those responses.
    sizes: Vec<usize>,
    /// From the change until the control plane showed every ACK, if it did.
    all_acked: Option<Duration>,
    outcome: anyhow::Result<()>,
    /// The control plane's `(VmHWM, VmRSS)` in KiB once it was over.
    hwm: u64,
    rss: u64,
}

impl Phase {
    fn pct(&self, p: f64) -> String {
        if self.latencies.is_empty() {
            return "—".into();
        }
        let idx = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        ms(self.latencies[idx.clamp(1, self.latencies.len()) - 1])
    }

    fn largest(&self) -> String {
        self.sizes.iter().max().map_or("—".into(), |b| format!("{b} B"))
    }

    fn acked(&self) -> String {
        self.all_acked.map(ms).unwrap_or_else(|| "not reached".into())
    }

    fn summary(&self) -> String {
        format!(
            "{} received, p50 {} p99 {} max {}, largest response {}, all ACKed {}, RSS {}",
            self.latencies.len(),
            self.pct(50.0),
            self.pct(99.0),
            self.pct(100.0),
            self.largest(),
            self.acked(),
            mib(self.rss)
        )
    }
}

/// Runs `change`, then waits until each of the first `n` clients received a version other than
/// the one it ran, and until the control plane shows them all ACKing it.
async fn measure_push(
    fleet: &Fleet,
    n: usize,
    cp: &mut ControlPlane,
    timeout: Duration,
    change: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Phase> {
    let before: Vec<String> = fleet.logs[..n].iter().map(ClientLog::version).collect();
    let t0 = Instant::now();
    change()?;
    let pushed = |l: &ClientLog, before: &str| {
        l.received
            .lock()
            .iter()
            .find(|r| r.at >= t0 && r.version != before)
            .map(|r| (r.version.clone(), r.at - t0, r.size))
    };
    let received = || fleet.logs.iter().zip(&before).filter(|(l, b)| pushed(l, b).is_some()).count();
    let outcome = wait_until("every client received the new version", timeout, cp, || received() == n).await;
    let (mut latencies, mut sizes, mut version) = (Vec::with_capacity(n), Vec::with_capacity(n), String::new());
    for (l, b) in fleet.logs.iter().zip(&before) {
        if let Some((v, d, size)) = pushed(l, b) {
            version = v;
            latencies.push(d);
            sizes.push(size);
        }
    }
    latencies.sort();
    let all_acked = match outcome {
        Ok(()) => wait_acked(cp, &version, n, timeout).await.map(|_| t0.elapsed()).ok(),
        Err(_) => None,
    };
    let (hwm, rss) = cp.memory_kib();
    Ok(Phase { latencies, sizes, all_acked, outcome, hwm, rss })
}

/// What a client decodes of a `DiscoveryResponse`: its version and nonce, with the snapshot
/// (field 3) or delta (field 4) left as bytes. Ten thousand clients each decoding ten thousand
/// endpoints would measure this process, not the control plane.
#[derive(Clone, PartialEq, prost::Message)]
struct ResponseHead {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(string, tag = "2")]
    nonce: String,
    #[prost(bytes = "bytes", tag = "3")]
    snapshot: bytes::Bytes,
    #[prost(bytes = "bytes", tag = "4")]
    delta: bytes::Bytes,
}

/// One lightweight sidecar: its own connection, its own identity, its own address; ACKs
/// everything; redials on failure with a short jittered backoff, as the agent does.
async fn run_client(i: usize, client: ControlClient, fleet: Arc<Fleet>, dialing: Arc<Semaphore>) {
    let node = Node {
        spiffe_id: client_id(i),
        labels: HashMap::from([("app".to_string(), "scale".to_string())]),
        addresses: vec![client_address(i)],
        ..Default::default()
    };
    let mut counted = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        let permit = dialing.clone().acquire_owned().await.ok();
        let channel = match client.channel().await {
            Ok(c) => c,
            Err(e) => {
                fleet.connect_errors.fetch_add(1, Ordering::Relaxed);
                *fleet.last_error.lock() = e.to_string();
                drop(permit);
                tokio::time::sleep(backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let (tx, rx) = mpsc::channel(4);
        let first =
            DiscoveryRequest { node: Some(node.clone()), version_info: fleet.logs[i].version(), ..Default::default() };
        let result: Result<(), String> = async {
            tx.send(first).await.map_err(|e| e.to_string())?;
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.map_err(|e| e.to_string())?;
            let codec = tonic_prost::ProstCodec::<DiscoveryRequest, ResponseHead>::default();
            let path = http::uri::PathAndQuery::from_static("/palisade.discovery.v1.Discovery/Stream");
            let mut responses = grpc
                .streaming(tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)), path, codec)
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            let mut permit = permit;
            while let Some(resp) = responses.message().await.map_err(|e| e.to_string())? {
                let at = Instant::now();
                let size = resp.snapshot.len() + resp.delta.len();
                fleet.logs[i].received.lock().push(Received { version: resp.version_info.clone(), at, size });
                let ack = DiscoveryRequest {
                    version_info: resp.version_info,
                    response_nonce: resp.nonce,
                    ..Default::default()
                };
                tx.send(ack).await.map_err(|e| e.to_string())?;
                if !counted {
                    counted = true;
                    fleet.synced.fetch_add(1, Ordering::AcqRel);
                }
                // Joined: let the next client dial.
                permit.take();
            }
            Err("stream ended".into())
        }
        .await;
        if let Err(e) = result {
            fleet.stream_errors.fetch_add(1, Ordering::Relaxed);
            *fleet.last_error.lock() = e;
        }
        tokio::time::sleep(backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn client_id(i: usize) -> String {
    format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/client-{i}")
}

/// A pod-like address of its own for every client.
fn client_address(i: usize) -> String {
    format!("10.{}.{}.{}:15006", 1 + (i >> 16), (i >> 8) & 255, i & 255)
}

/// Raises the soft RLIMIT_NOFILE towards `want` (up to the hard limit); returns the new soft limit.
fn raise_nofile(want: u64) -> anyhow::Result<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft >= want {
        return Ok(soft);
    }
    let new = want.min(hard);
    rlimit::Resource::NOFILE.set(new, hard)?;
    if new < want {
        bail!("RLIMIT_NOFILE hard limit {hard} is below the {want} this run needs; raise it (`ulimit -Hn`)");
    }
    Ok(new)
}

async fn start_control_plane(args: &Args, dir: &Path, resources: &Path) -> anyhow::Result<ControlPlane> {
    let listen = free_addr()?;
    let admin = free_addr()?;
    let state = dir.join("state");
    let log = dir.join("control.log");
    // The control plane holds one socket per client: give it room (root may raise the hard
    // limit; anyone else keeps what they have).
    let child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 65536 2>/dev/null || ulimit -n \"$(ulimit -Hn)\"; exec \"$0\" \"$@\"")
        .arg(&args.bin)
        .args(["control", "--state-dir"])
        .arg(&state)
        .args(["--listen", &listen.to_string(), "--admin", &admin.to_string(), "--resources"])
        .arg(resources)
        .args(["--debounce", &args.debounce, "--default-policy", "deny"])
        .env("PALISADE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting the control plane")?;
    let mut cp = ControlPlane { child, admin, listen, state, log };
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(admin, "/ready").await.map(|(s, _)| s) != Some(200) {
        if !cp.alive() || Instant::now() > deadline {
            bail!("control plane not ready; see {}", cp.log.display());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(cp)
}

/// Enrols `n` clients as an operator would: a join token per identity, bound to the client's
/// address, redeemed for a certificate of the store's active CA (recorded in its ledger). The
/// redeemed binding is what lets the control plane's prover accept the address each claims.
fn enrol_clients(state: &Path, n: usize) -> anyhow::Result<Vec<Arc<CertifiedKey>>> {
    let store = palisade::control::Store::open(state)?;
    let ca = active_ca(&store)?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let chunks: Vec<Vec<usize>> = (0..threads).map(|t| (0..n).filter(|i| i % threads == t).collect()).collect();
    let mut out: Vec<Option<Arc<CertifiedKey>>> = vec![None; n];
    let (store, ca) = (&store, &ca);
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|idx| {
                s.spawn(move || -> anyhow::Result<Vec<(usize, Arc<CertifiedKey>)>> {
                    idx.into_iter()
                        .map(|i| {
                            let id = client_id(i).parse()?;
                            let ttl = Duration::from_secs(3600);
                            let token = store.create_bound_join_token(&id, ttl, &[client_address(i)])?;
                            let key = rcgen::KeyPair::generate()?;
                            let issued = store.redeem_join_token::<anyhow::Error>(&token, |id| sign(ca, id, &key))?;
                            Ok((i, certified(&issued, &key)?))
                        })
                        .collect()
                })
            })
            .collect();
        for h in handles {
            let enrolled = h.join().map_err(|_| anyhow::anyhow!("enrolling thread panicked"))??;
            for (i, c) in enrolled {
                out[i] = Some(c);
            }
        }
        Ok(())
    })?;
    Ok(out.into_iter().flatten().collect())
}

fn active_ca(store: &palisade::control::Store) -> anyhow::Result<palisade::identity::CertificateAuthority> {
    let material = store
        .ca_generations()?
        .into_iter()
        .find(|g| g.state == "active")
        .context("no active CA generation in the store")?
        .material;
    Ok(palisade::identity::CertificateAuthority::load(material)?)
}

fn sign(
    ca: &palisade::identity::CertificateAuthority,
    id: &palisade::identity::SpiffeId,
    key: &rcgen::KeyPair,
) -> anyhow::Result<palisade::identity::IssuedCertificate> {
    let now = SystemTime::now();
    Ok(ca.sign_workload_valid(id, key, now - Duration::from_secs(60), now + Duration::from_secs(6 * 3600), &[])?)
}

fn certified(
    issued: &palisade::identity::IssuedCertificate,
    key: &rcgen::KeyPair,
) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = palisade::tls::certs_from_pem(&issued.chain_pem)?;
    let sk = palisade::tls::provider().key_provider.load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()),
    ))?;
    Ok(Arc::new(CertifiedKey::new(chain, sk)))
}

fn mint_one(ca: &palisade::identity::CertificateAuthority, id: &str) -> anyhow::Result<Arc<CertifiedKey>> {
    let key = rcgen::KeyPair::generate()?;
    certified(&sign(ca, &id.parse()?, &key)?, &key)
}

/// A management-API client with an administrator's certificate minted from the store's CA.
async fn admin_api(cp: &ControlPlane) -> anyhow::Result<palisade::control::admin_client::AdminClient> {
    let ca = active_ca(&palisade::control::Store::open(&cp.state)?)?;
    let certs = CertStore::new();
    certs.set(mint_one(&ca, "spiffe://cluster.local/admin/scale")?, i64::MAX);
    let bundle = TrustBundle::from_pem(&std::fs::read_to_string(cp.state.join("ca/root.pem"))?)?;
    let control = palisade::agent::ControlClient::new(
        &cp.listen.to_string(),
        bundle,
        certs,
        palisade::identity::SpiffeId::control_plane("cluster.local")?,
    );
    Ok(palisade::control::admin_client::client(control.channel().await?, None))
}

/// Waits until the management API's sidecar list shows `n` connected sidecars that ACKed
/// `version`; returns how many it saw.
async fn wait_acked(cp: &ControlPlane, version: &str, n: usize, timeout: Duration) -> anyhow::Result<usize> {
    let deadline = Instant::now() + timeout;
    let mut api = admin_api(cp).await?;
    loop {
        let mut count = 0;
        if let Ok(rows) = api.list_sidecars(palisade::proto::admin::ListSidecarsRequest {}).await {
            count = rows.into_inner().sidecars.iter().filter(|r| r.connected && r.acked_version == version).count();
            if count >= n {
                return Ok(count);
            }
        }
        if Instant::now() > deadline {
            bail!("only {count} of {n} sidecars show ACK of {version} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the management API shows `n` connected sidecars that all ACKed the version
/// pushed to them, the same one; returns it.
async fn wait_settled(cp: &ControlPlane, n: usize, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut api = admin_api(cp).await?;
    loop {
        if let Ok(rows) = api.list_sidecars(palisade::proto::admin::ListSidecarsRequest {}).await {
            let rows: Vec<_> = rows.into_inner().sidecars.into_iter().filter(|r| r.connected).collect();
            let version = rows.first().map(|r| r.acked_version.clone()).unwrap_or_default();
            if rows.len() >= n
                && !version.is_empty()
                && rows.iter().all(|r| r.acked_version == version && r.pushed_version == version)
            {
                return Ok(version);
            }
        }
        if Instant::now() > deadline {
            bail!("the {n} sidecars did not settle on one version within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `cond` until it holds, the deadline passes, or the control plane exits.
async fn wait_until(
    what: &str,
    timeout: Duration,
    cp: &mut ControlPlane,
    mut cond: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if !cp.alive() {
            bail!("control plane exited while waiting for {what}; see {}", cp.log.display());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
