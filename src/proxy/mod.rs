//! `palisade proxy`: the sidecar.

pub mod app_probe;
pub mod balance;
pub mod body;
pub mod detect;
pub mod h1_pool;
pub mod http;
pub mod http_route;
pub mod inbound;
pub mod limits;
pub mod original_dst;
pub mod outbound;
pub mod service;
pub mod service_route;
pub mod tcp;
pub mod transparent;
pub mod trust_state;
pub mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ::http::{Method, StatusCode};
use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

use crate::agent::ControlClient;
use crate::agent::discovery::{ApplyFn, DiscoveryStatus};
use crate::identity::manager::Bootstrap;
use crate::identity::{CertManager, SpiffeId};
use crate::policy::Workload;
use crate::ports;
use crate::proto::discovery::Node;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::admin::{self, AdminRequest};
use crate::telemetry::metrics::{Metrics, ProxyMetrics};
use crate::tls::{BundleState, CertStore, config};
use limits::{Drain, Limits};
use trust_state::TrustState;
use view::{SharedView, ViewWriter};

pub use outbound::Route;

/// Flags of `palisade proxy`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Control plane gRPC address (host:port), or several separated by commas: replicas are
    /// tried in turn when one cannot be reached.
    #[arg(long, env = "PALISADE_CONTROL", default_value_t = format!("127.0.0.1:{}", ports::CONTROL_GRPC))]
    pub control: String,
    /// PEM roots that anchor the mesh (the control plane writes them to `STATE_DIR/ca/root.pem`).
    #[arg(long, env = "PALISADE_CA_BUNDLE", required_unless_present = "ca_bundle_pem")]
    pub ca_bundle: Option<PathBuf>,
    /// The same roots as PEM text (what the Kubernetes injector passes).
    #[arg(long, env = "PALISADE_CA_BUNDLE_PEM", hide_env_values = true, conflicts_with = "ca_bundle")]
    pub ca_bundle_pem: Option<String>,
    /// File where the sidecar keeps the newest roots the control plane sent; a restart starts
    /// from it instead of `--ca-bundle`, which may predate a CA rotation (the injector gives
    /// each pod one in a volume only the sidecar mounts).
    #[arg(long, env = "PALISADE_TRUST_STATE")]
    pub trust_state: Option<PathBuf>,
    /// File holding a join token for the first certificate (standalone).
    #[arg(long, env = "PALISADE_TOKEN_FILE", required_unless_present = "kube_token_file")]
    pub token_file: Option<PathBuf>,
    /// File holding a projected service-account token, audience `palisade` (Kubernetes). It is
    /// re-read for every attempt, as the kubelet refreshes it.
    #[arg(long, env = "PALISADE_KUBE_TOKEN_FILE", conflicts_with = "token_file")]
    pub kube_token_file: Option<PathBuf>,
    /// mTLS listener for peer sidecars.
    #[arg(long, env = "PALISADE_INBOUND")]
    pub inbound: Option<SocketAddr>,
    /// The local app that inbound requests go to.
    #[arg(long, env = "PALISADE_APP")]
    pub app: Option<SocketAddr>,
    /// Admin HTTP listener (`/ready`, `/live`, `/metrics`, `/config_dump`, `POST /shutdown`).
    #[arg(long, env = "PALISADE_ADMIN", default_value_t = SocketAddr::from(([127, 0, 0, 1], ports::SIDECAR_ADMIN)))]
    pub admin: SocketAddr,
    /// Explicit outbound route `LISTEN=TARGET@SPIFFE_ID` (repeatable).
    #[arg(long = "route", value_name = "LISTEN=TARGET@SPIFFE_ID")]
    pub routes: Vec<Route>,
    /// Explicit outbound route to a mesh service `LISTEN=NAMESPACE/NAME` (repeatable): each
    /// request goes to one of the `MeshService`'s endpoints, chosen by latency and load, over
    /// mTLS that must prove that endpoint's identity.
    #[arg(long = "service-route", value_name = "LISTEN=NAMESPACE/NAME")]
    pub service_routes: Vec<service::ServiceRoute>,
    /// How long the balancer remembers a latency: an observation's weight falls to 1/e after
    /// this long, so an endpoint that was slow is tried again about this often.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub balancer_decay: Duration,
    /// Trust domain; the control plane must prove `spiffe://<td>/ns/palisade-system/sa/palisade-control`.
    #[arg(long, env = "PALISADE_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Workload label `KEY=VALUE` (repeatable); policies select workloads by label.
    #[arg(long = "label", env = "PALISADE_LABELS", value_delimiter = ',', value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Access and decision log (JSON lines): `stdout`, a file path, or `off`.
    #[arg(long, env = "PALISADE_ACCESS_LOG", default_value = "stdout")]
    pub access_log: crate::telemetry::access_log::LogTarget,
    /// How often counters and certificate events are reported to the control plane.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub telemetry_interval: Duration,
    /// Transparent mode (after `palisade init`): outbound connections arrive redirected on
    /// `--outbound` and go where the app sent them; inbound connections go to
    /// `127.0.0.1:<original port>` unless `--app` is set.
    #[arg(long, env = "PALISADE_TRANSPARENT")]
    pub transparent: bool,
    /// Transparent outbound listener (the REDIRECT target of `palisade init`).
    #[arg(long, env = "PALISADE_OUTBOUND", default_value_t = SocketAddr::from(([127, 0, 0, 1], ports::SIDECAR_OUTBOUND)))]
    pub outbound: SocketAddr,
    /// This workload's pod IP, registered in the endpoint table for every port (transparent mode).
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<std::net::IpAddr>,
    #[command(flatten)]
    pub limits: limits::Limits,
    /// A plain-HTTP kubelet probe `PORT/PATH` let through a STRICT port without mTLS: GET or
    /// HEAD of exactly that path, nothing else (repeatable; the injector sets PALISADE_PROBES).
    #[arg(long = "probe", env = "PALISADE_PROBES", value_delimiter = ',', value_name = "PORT/PATH", value_parser = parse_probe)]
    pub probes: Vec<(u16, String)>,
    /// The app's TCP, gRPC and HTTPS kubelet probes, which the injector rewrites to
    /// `GET /app-health/<container>/<kind>` on the admin port: a JSON map from that path to the
    /// original probe. The sidecar runs the original against the app on 127.0.0.1 and answers
    /// 200 or 503, so the probe proves the app is up, not the sidecar.
    #[arg(long, env = "PALISADE_APP_PROBES", value_name = "JSON", value_parser = app_probe::parse)]
    pub app_probes: Option<app_probe::AppProbes>,
    /// Time allowed for an inbound mTLS handshake.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// Data-path worker threads. Default: the CPUs this process may use (its CPU affinity and
    /// cgroup CPU limit count), so a sidecar limited to one core runs one worker.
    #[arg(long, env = "PALISADE_WORKERS", value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: Option<u16>,
}

impl ProxyArgs {
    /// The runtime the data path runs on (`--workers`). With one worker it is single-threaded,
    /// as Linkerd's proxy is on one core: no handoff between the thread that waits in
    /// `block_on` and a worker, no work-stealing bookkeeping. Measured against a one-worker
    /// multi-threaded runtime in alternating `bench/run` rounds: 4-12 % more requests per second
    /// at saturation, p99 at 1000 req/s within the noise of this machine (docs/benchmarks.md).
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let workers = match self.workers {
            Some(n) => usize::from(n),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let mut builder = if workers == 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(workers);
            b
        };
        builder.enable_all().thread_name("palisade-data").build()
    }
}

fn parse_probe(s: &str) -> Result<(u16, String), String> {
    let (port, path) = s.split_once('/').ok_or_else(|| format!("probe {s:?}: expected PORT/PATH"))?;
    let port = port.parse().map_err(|_| format!("probe {s:?}: {port:?} is not a port"))?;
    Ok((port, format!("/{path}")))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("label {s:?}: expected KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("label {s:?}: empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// What every listener of a sidecar shares: its certificate, its one view of the mesh, and the
/// process-wide limits, drain, metrics and access log.
#[derive(Clone)]
pub struct DataPlane {
    pub certs: Arc<CertStore>,
    pub view: Arc<SharedView>,
    pub metrics: Arc<ProxyMetrics>,
    pub limits: Limits,
    pub drain: Arc<Drain>,
    pub access_log: AccessLog,
}

/// The sidecar's inputs, built once by [`run`] from its flags, and handed to each worker.
struct ProxyInputs {
    args: ProxyArgs,
    credential: Bootstrap,
    control: ControlClient,
    manager: Arc<CertManager>,
    metrics: Arc<Metrics>,
    dp: DataPlane,
    writer: Arc<ViewWriter>,
    discovery: Arc<DiscoveryStatus>,
    shutdown: Arc<Notify>,
    trust_state: Option<Arc<TrustState>>,
}

/// Runs the sidecar until SIGTERM, Ctrl-C or `POST /shutdown`.
pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    crate::tls::install_crypto_provider();
    let inputs = ProxyInputs::from_args(args)?;
    // The admin port comes up first, so an orchestrator sees "not ready" rather than nothing.
    serve_admin(&inputs).await?;
    let own_id = obtain_identity(&inputs).await?;
    start_agent(&inputs, &own_id);
    let ProxyInputs { args, dp, shutdown, .. } = inputs;
    start_listeners(&args, &dp, &own_id).await?;

    tokio::select! {
        _ = crate::shutdown_signal() => {}
        _ = shutdown.notified() => {}
    }
    drain(&dp.drain, args.limits.drain_timeout).await;
    Ok(())
}

impl ProxyInputs {
    /// Checks the flags and builds the shared state; nothing is bound or dialled yet.
    fn from_args(args: ProxyArgs) -> anyhow::Result<Self> {
        let roots = initial_roots(&args)?;
        let trust_state = args.trust_state.clone().map(|path| Arc::new(TrustState::new(path, &roots.pem)));
        let credential = credential(&args)?;
        if !args.transparent && args.inbound.is_some() != args.app.is_some() {
            anyhow::bail!("--inbound and --app go together: the inbound side needs an app to forward to");
        }
        if args.transparent && args.pod_ip.is_none() {
            anyhow::bail!("--transparent needs --pod-ip (or POD_IP): the mesh must know where this workload is");
        }
        let control_id = SpiffeId::control_plane(&args.trust_domain)
            .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?;
        let dropped_lines = prometheus_client::metrics::counter::Counter::default();
        let metrics = Arc::new(Metrics::new(dropped_lines.clone()));
        let access_log = AccessLog::start(args.access_log.clone(), dropped_lines).context("opening the access log")?;
        let certs = CertStore::new();
        let (view, writer) = ViewWriter::new(roots);
        let control = ControlClient::new(&args.control, view.clone(), certs.clone(), control_id);
        let manager = CertManager::new(certs.clone(), control.clone(), metrics.certs.clone());
        let dp = DataPlane {
            certs,
            view,
            metrics: metrics.proxy.clone(),
            limits: args.limits.clone(),
            // Two descriptors per connection (the client's and the upstream's).
            drain: Drain::new(crate::listener::fit_to_fd_limit("data path", args.limits.max_connections, 2)),
            access_log,
        };
        Ok(ProxyInputs {
            args,
            credential,
            control,
            manager,
            metrics,
            dp,
            writer: Arc::new(writer),
            discovery: Arc::new(DiscoveryStatus::default()),
            shutdown: Arc::new(Notify::new()),
            trust_state,
        })
    }
}

/// The roots the sidecar trusts until the control plane sends others: those a previous run
/// kept in `--trust-state`, else `--ca-bundle`.
fn initial_roots(args: &ProxyArgs) -> anyhow::Result<BundleState> {
    if let Some((_, roots)) = args.trust_state.as_deref().and_then(TrustState::read) {
        tracing::info!(path = ?args.trust_state, "starting from the trust roots kept by the previous run");
        return Ok(roots);
    }
    let (pem, origin) = match (&args.ca_bundle, &args.ca_bundle_pem) {
        (Some(path), _) => (
            std::fs::read_to_string(path).with_context(|| format!("reading CA bundle {}", path.display()))?,
            path.display().to_string(),
        ),
        (None, Some(pem)) => (pem.clone(), "PALISADE_CA_BUNDLE_PEM".to_string()),
        (None, None) => anyhow::bail!("--ca-bundle or PALISADE_CA_BUNDLE_PEM is required"),
    };
    BundleState::from_pem(&pem).with_context(|| format!("CA bundle {origin}"))
}

/// The credential that earns the first certificate.
fn credential(args: &ProxyArgs) -> anyhow::Result<Bootstrap> {
    match (&args.token_file, &args.kube_token_file) {
        (Some(path), _) => {
            std::fs::read_to_string(path).with_context(|| format!("reading join token {}", path.display()))?;
            Ok(Bootstrap::JoinTokenFile(path.clone()))
        }
        (None, Some(path)) => {
            std::fs::metadata(path).with_context(|| format!("service-account token {}", path.display()))?;
            Ok(Bootstrap::KubernetesTokenFile(path.clone()))
        }
        (None, None) => anyhow::bail!("--token-file or --kube-token-file is required"),
    }
}

/// The admin port (`/ready`, `/live`, `/metrics`, app probes, and on loopback `/config_dump`
/// and `POST /shutdown`), on its own runtime so a scrape never waits behind the data path.
async fn serve_admin(inputs: &ProxyInputs) -> anyhow::Result<()> {
    let args = &inputs.args;
    let listener = TcpListener::bind(args.admin).await.with_context(|| format!("binding admin {}", args.admin))?;
    let admin = Arc::new(AdminState {
        manager: inputs.manager.clone(),
        metrics: inputs.metrics.clone(),
        shutdown: inputs.shutdown.clone(),
        view: inputs.dp.view.clone(),
        discovery: inputs.discovery.clone(),
        app_probes: args.app_probes.clone().unwrap_or_default(),
        dump: serde_json::json!({
            "inbound": args.inbound,
            "app": args.app,
            "routes": args.routes,
            "service_routes": args.service_routes,
            "control": args.control,
            "trust_domain": args.trust_domain,
            "limits": args.limits,
            "app_probes": args.app_probes.as_ref().map(|p| p.paths().collect::<Vec<_>>()),
        }),
    });
    admin::spawn_on_own_runtime(listener, move |req: AdminRequest| {
        let admin = admin.clone();
        async move { admin.answer(req).await }
    })?;
    Ok(())
}

/// What the admin port reads.
struct AdminState {
    manager: Arc<CertManager>,
    metrics: Arc<Metrics>,
    shutdown: Arc<Notify>,
    view: Arc<SharedView>,
    discovery: Arc<DiscoveryStatus>,
    app_probes: app_probe::AppProbes,
    /// The flags part of `/config_dump`.
    dump: serde_json::Value,
}

impl AdminState {
    async fn answer(&self, req: AdminRequest) -> admin::AdminResponse {
        let text = |status, body: &str| admin::respond(status, "text/plain", body.to_string());
        match (req.method.clone(), req.path.as_str()) {
            (_, path) if path.starts_with(app_probe::PATH_PREFIX) => match self.app_probes.run(path).await {
                None => text(StatusCode::NOT_FOUND, "no such app probe\n"),
                Some(Ok(())) => text(StatusCode::OK, "ok\n"),
                Some(Err(e)) => {
                    tracing::debug!(probe = path, error = %e, "app probe failed");
                    text(StatusCode::SERVICE_UNAVAILABLE, &format!("{e}\n"))
                }
            },
            (_, "/live") => text(StatusCode::OK, "ok\n"),
            (_, "/ready") if !self.manager.ready() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no valid workload certificate\n")
            }
            (_, "/ready") if !self.discovery.has_snapshot.load(Ordering::Acquire) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: no configuration received from the control plane yet\n",
            ),
            (_, "/ready") => text(StatusCode::OK, "ready\n"),
            (_, "/metrics") => admin::respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.render(),
            ),
            (_, "/config_dump") if req.peer.ip().is_loopback() => admin::json(StatusCode::OK, &self.config_dump()),
            (Method::POST, "/shutdown") if req.peer.ip().is_loopback() => {
                self.shutdown.notify_one();
                text(StatusCode::OK, "shutting down\n")
            }
            (_, "/shutdown" | "/config_dump") => text(StatusCode::FORBIDDEN, "from loopback only\n"),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    fn config_dump(&self) -> serde_json::Value {
        let mut dump = self.dump.clone();
        // Certificate summary only: the private key never leaves the CertStore.
        dump["certificate"] = serde_json::to_value(self.manager.info().as_deref()).unwrap_or_default();
        dump["mesh"] = serde_json::to_value(&**self.view.load()).unwrap_or_default();
        dump["discovery"] = serde_json::json!({
            "connected": self.discovery.connected.load(Ordering::Acquire),
            "version": self.discovery.version.load().as_str(),
            "last_nack": self.discovery.last_nack.load().as_str(),
        });
        dump
    }
}

/// Gets the first certificate, then keeps it renewed; the roots that come with each new
/// certificate reach the view through its one writer.
async fn obtain_identity(inputs: &ProxyInputs) -> anyhow::Result<SpiffeId> {
    let manager = &inputs.manager;
    let info = manager.bootstrap(&inputs.credential).await.context("obtaining the first workload certificate")?;
    let own_id: SpiffeId = info.spiffe_id.parse()?;
    tracing::info!(spiffe_id = %own_id, serial = %info.serial, "workload identity obtained");
    tokio::spawn(manager.clone().run(inputs.credential.clone()));
    tokio::spawn(announce_lapse(inputs.dp.certs.clone(), inputs.dp.view.clone()));
    Ok(own_id)
}

/// Once the certificate in service expires without a renewal, has every open connection judge
/// itself again: inbound ones close (nothing may be served under a lapsed identity), outbound
/// pools start afresh (and their handshakes fail until a renewal). One timer for the sidecar,
/// at each certificate's expiry; while lapsed, a check a second until the next certificate.
async fn announce_lapse(certs: Arc<CertStore>, view: Arc<SharedView>) {
    let mut announced = None;
    loop {
        let not_after = certs.not_after();
        if certs.current().is_none() && announced != Some(not_after) {
            tracing::warn!(not_after, "certificate expired without a renewal: closing connections made under it");
            view.recheck_connections();
            announced = Some(not_after);
        }
        let expiry = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).unwrap_or(0));
        let left = expiry.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::from_secs(1));
        // A little past the second it ends: `current` counts whole seconds.
        tokio::time::sleep(left + Duration::from_millis(5)).await;
    }
}

/// The discovery stream (whose snapshots the view writer applies) and the telemetry reporter.
fn start_agent(inputs: &ProxyInputs, own_id: &SpiffeId) {
    let args = &inputs.args;
    let node = Node {
        spiffe_id: own_id.to_string(),
        addresses: match args.pod_ip {
            Some(ip) => vec![SocketAddr::new(ip, 0).to_string()],
            None => args.inbound.iter().map(|a| a.to_string()).collect(),
        },
        labels: args.labels.iter().cloned().collect(),
        proxy_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let workload = Workload { id: own_id.clone(), labels: args.labels.iter().cloned().collect() };
    let writer = inputs.writer.clone();
    let apply: ApplyFn = {
        let writer = writer.clone();
        let (view, trust_state) = (inputs.dp.view.clone(), inputs.trust_state.clone());
        Arc::new(move |version, snap| {
            let applied = writer.apply_snapshot(version, snap, &workload).map_err(|n| n.to_string());
            // Roots are applied even when the policies are refused.
            keep_roots(trust_state.as_deref(), &view);
            applied
        })
    };
    let (view, trust_state) = (inputs.dp.view.clone(), inputs.trust_state.clone());
    let mut roots = inputs.manager.roots();
    tokio::spawn(async move {
        // The roots of the first certificate were published before this task subscribed.
        loop {
            let pem = roots.borrow_and_update().clone();
            if let Some(pem) = pem {
                match writer.apply_roots(&pem) {
                    Ok(()) => keep_roots(trust_state.as_deref(), &view),
                    Err(e) => tracing::error!(error = %e, "roots that came with a certificate refused"),
                }
            }
            if roots.changed().await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(crate::agent::discovery::run(inputs.control.clone(), node, apply, inputs.discovery.clone()));
    tokio::spawn(crate::agent::telemetry::run(crate::agent::telemetry::TelemetryInputs {
        control: inputs.control.clone(),
        spiffe_id: own_id.to_string(),
        stats: inputs.metrics.proxy.peers.clone(),
        events: inputs.manager.events(),
        unknown_kids: crate::telemetry::unknown_kid::UnknownKidHints::global().clone(),
        interval: args.telemetry_interval,
    }));
}

/// Keeps the roots in force in `--trust-state`, if it is set.
fn keep_roots(trust_state: Option<&TrustState>, view: &SharedView) {
    if let Some(state) = trust_state {
        state.keep(&view.load().trust.pem);
    }
}

/// Binds and serves every listener the flags ask for: inbound mTLS, transparent outbound, and
/// each explicit route.
async fn start_listeners(args: &ProxyArgs, dp: &DataPlane, own_id: &SpiffeId) -> anyhow::Result<()> {
    let inbound_listen =
        args.inbound.or(args.transparent.then(|| SocketAddr::from(([0, 0, 0, 0], ports::SIDECAR_INBOUND))));
    if let Some(listen) = inbound_listen {
        let listener = TcpListener::bind(listen).await.with_context(|| format!("binding inbound {listen}"))?;
        let acceptor = TlsAcceptor::from(config::server_config(
            dp.certs.clone(),
            dp.view.clone(),
            true,
            &[config::ALPN_H2, config::ALPN_HTTP1, config::ALPN_TCP],
        ));
        let inbound = inbound::Inbound::new(dp, own_id.clone(), args.app, args.handshake_timeout, args.probes.clone());
        tokio::spawn(inbound::serve(listener, acceptor, Arc::new(inbound)));
        tracing::info!(%listen, app = ?args.app, "inbound mTLS listener up");
    }
    let decay = balance::Decay { period: args.balancer_decay, ..balance::Decay::default() };
    if args.transparent {
        let listener =
            TcpListener::bind(args.outbound).await.with_context(|| format!("binding outbound {}", args.outbound))?;
        let t = transparent::Transparent::new(args.outbound, dp, decay);
        on_revocation(dp, {
            let t = t.clone();
            move || t.reset()
        });
        tokio::spawn(transparent::serve(listener, t));
        tracing::info!(listen = %args.outbound, "transparent outbound listener up");
    }
    for route in &args.routes {
        let listener =
            TcpListener::bind(route.listen).await.with_context(|| format!("binding route {}", route.listen))?;
        let out = Arc::new(outbound::Outbound::new(route.clone(), dp));
        on_revocation(dp, {
            let out = out.clone();
            move || out.reset_pool()
        });
        tokio::spawn(outbound::serve(listener, out));
        tracing::info!(listen = %route.listen, target = %route.target, identity = %route.identity, "outbound route up");
    }
    for route in &args.service_routes {
        let listener =
            TcpListener::bind(route.listen).await.with_context(|| format!("binding service route {}", route.listen))?;
        let out = service_route::ServiceOutbound::new(route.clone(), None, dp, decay);
        on_revocation(dp, {
            let out = out.clone();
            move || out.reset_pools()
        });
        tokio::spawn(service_route::serve(listener, out));
        tracing::info!(listen = %route.listen, service = %route.service, "service route up");
    }
    Ok(())
}

/// Runs `reset` whenever revocations change, so pooled connections to a revoked peer are
/// dropped and every peer is judged afresh by a new handshake.
fn on_revocation(dp: &DataPlane, reset: impl Fn() + Send + 'static) {
    let mut revocations = dp.view.revocations_changed();
    tokio::spawn(async move {
        while revocations.changed().await.is_ok() {
            reset();
        }
    });
}

/// Stops accepting, lets requests in flight finish (idle keep-alive connections close at
/// once), and gives up after the grace period.
async fn drain(drain: &Drain, grace: Duration) {
    tracing::info!(open = drain.open(), ?grace, "draining");
    let left = drain.drain(grace).await;
    if left > 0 {
        tracing::warn!(connections = left, "drain timeout: closing connections still open");
    }
    tracing::info!("sidecar stopped");
}
