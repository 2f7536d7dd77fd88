//! `palisade proxy`: the sidecar.

pub mod app_probe;
pub mod detect;
pub mod h1_pool;
pub mod http;
pub mod inbound;
pub mod init;
pub mod limits;
pub mod original_dst;
pub mod outbound;
pub mod tcp;
pub mod transparent;
pub mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::Ordering;

use ::http::{Method, StatusCode};
use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::agent::ControlClient;
use crate::agent::discovery::{ApplyFn, DiscoveryStatus};
use crate::control::identity_service::control_plane_identity;
use crate::identity::manager::Bootstrap;
use crate::identity::{CertManager, SpiffeId};
use crate::policy::Workload;
use crate::proto::discovery::{Node, Snapshot};
use crate::telemetry::admin::{self, AdminRequest};
use crate::telemetry::metrics::Metrics;
use crate::tls::{CertStore, TrustBundle, config};
use view::MeshView;

pub use outbound::Route;

/// Flags of `palisade proxy`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Control plane gRPC address (host:port), or several separated by commas: replicas are
    /// tried in turn when one cannot be reached.
    #[arg(long, env = "PALISADE_CONTROL", default_value = "127.0.0.1:15010")]
    pub control: String,
    /// PEM roots that anchor the mesh (the control plane writes them to `STATE_DIR/ca/root.pem`).
    #[arg(long, env = "PALISADE_CA_BUNDLE", required_unless_present = "ca_bundle_pem")]
    pub ca_bundle: Option<PathBuf>,
    /// The same roots as PEM text (what the Kubernetes injector passes).
    #[arg(long, env = "PALISADE_CA_BUNDLE_PEM", hide_env_values = true, conflicts_with = "ca_bundle")]
    pub ca_bundle_pem: Option<String>,
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
    #[arg(long, env = "PALISADE_ADMIN", default_value = "127.0.0.1:15020")]
    pub admin: SocketAddr,
    /// Explicit outbound route `LISTEN=TARGET@SPIFFE_ID` (repeatable).
    #[arg(long = "route", value_name = "LISTEN=TARGET@SPIFFE_ID")]
    pub routes: Vec<Route>,
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
    #[arg(long, env = "PALISADE_OUTBOUND", default_value = "127.0.0.1:15001")]
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

/// Runs the sidecar until SIGTERM, Ctrl-C or `POST /shutdown`.
pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    crate::tls::install_crypto_provider();
    let (bundle_pem, bundle_origin) = match (&args.ca_bundle, &args.ca_bundle_pem) {
        (Some(path), _) => (
            std::fs::read_to_string(path).with_context(|| format!("reading CA bundle {}", path.display()))?,
            path.display().to_string(),
        ),
        (None, Some(pem)) => (pem.clone(), "PALISADE_CA_BUNDLE_PEM".to_string()),
        (None, None) => anyhow::bail!("--ca-bundle or PALISADE_CA_BUNDLE_PEM is required"),
    };
    let bundle = TrustBundle::from_pem(&bundle_pem).with_context(|| format!("CA bundle {bundle_origin}"))?;
    let credential = match (&args.token_file, &args.kube_token_file) {
        (Some(path), _) => {
            let token =
                std::fs::read_to_string(path).with_context(|| format!("reading join token {}", path.display()))?;
            Bootstrap::JoinToken(token)
        }
        (None, Some(path)) => {
            std::fs::metadata(path).with_context(|| format!("service-account token {}", path.display()))?;
            Bootstrap::KubernetesTokenFile(path.clone())
        }
        (None, None) => anyhow::bail!("--token-file or --kube-token-file is required"),
    };
    if !args.transparent && args.inbound.is_some() != args.app.is_some() {
        anyhow::bail!("--inbound and --app go together: the inbound side needs an app to forward to");
    }
    if args.transparent && args.pod_ip.is_none() {
        anyhow::bail!("--transparent needs --pod-ip (or POD_IP): the mesh must know where this workload is");
    }

    let metrics = Arc::new(Metrics::new());
    let access_log =
        crate::telemetry::access_log::AccessLog::start(args.access_log.clone()).context("opening the access log")?;
    let certs = CertStore::new();
    let control =
        ControlClient::new(&args.control, bundle.clone(), certs.clone(), control_plane_identity(&args.trust_domain));
    let manager = CertManager::new(certs.clone(), control.clone(), metrics.certs.clone());
    // Roots from Certify responses into the trust bundle (until the snapshot applier owns it).
    let (mut roots, roots_bundle) = (manager.roots(), bundle.clone());
    tokio::spawn(async move {
        while roots.changed().await.is_ok() {
            let pem = roots.borrow_and_update().clone();
            if let Some(pem) = pem
                && let Err(e) = roots_bundle.set_roots(&pem)
            {
                tracing::error!(error = %e, "trust bundle from Certify refused; the previous roots stay");
            }
        }
    });
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let drain = limits::Drain::new(args.limits.max_connections);
    let view = Arc::new(ArcSwap::from_pointee(MeshView::fail_closed()));
    let discovery_status = Arc::new(DiscoveryStatus::default());

    // The admin port comes up first, so an orchestrator sees "not ready" rather than nothing.
    let admin_listener =
        TcpListener::bind(args.admin).await.with_context(|| format!("binding admin {}", args.admin))?;
    {
        let manager = manager.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        let view = view.clone();
        let discovery_status = discovery_status.clone();
        let app_probes = Arc::new(args.app_probes.clone().unwrap_or_default());
        let dump = serde_json::json!({
            "inbound": args.inbound,
            "app": args.app,
            "routes": args.routes,
            "control": args.control,
            "trust_domain": args.trust_domain,
            "limits": args.limits,
            "app_probes": args.app_probes.as_ref().map(|p| p.paths().collect::<Vec<_>>()),
        });
        admin::spawn_on_own_runtime(admin_listener, move |req: AdminRequest| {
            let manager = manager.clone();
            let metrics = metrics.clone();
            let shutdown = shutdown.clone();
            let view = view.clone();
            let discovery_status = discovery_status.clone();
            let app_probes = app_probes.clone();
            let mut dump = dump.clone();
            async move {
                match (req.method.clone(), req.path.as_str()) {
                    (_, path) if path.starts_with(app_probe::PATH_PREFIX) => match app_probes.run(path).await {
                        None => admin::respond(StatusCode::NOT_FOUND, "text/plain", "no such app probe\n"),
                        Some(Ok(())) => admin::respond(StatusCode::OK, "text/plain", "ok\n"),
                        Some(Err(e)) => {
                            tracing::debug!(probe = path, error = %e, "app probe failed");
                            admin::respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{e}\n"))
                        }
                    },
                    (_, "/live") => admin::respond(StatusCode::OK, "text/plain", "ok\n"),
                    (_, "/ready") if !manager.ready() => admin::respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready: no valid workload certificate\n",
                    ),
                    (_, "/ready") if !discovery_status.has_snapshot.load(Ordering::Acquire) => admin::respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready: no configuration received from the control plane yet\n",
                    ),
                    (_, "/ready") => admin::respond(StatusCode::OK, "text/plain", "ready\n"),
                    (_, "/metrics") => admin::respond(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        metrics.render(),
                    ),
                    (_, "/config_dump") => {
                        // Certificate summary only: the private key never leaves the CertStore.
                        dump["certificate"] = serde_json::to_value(manager.info().as_deref()).unwrap_or_default();
                        dump["mesh"] = serde_json::to_value(&**view.load()).unwrap_or_default();
                        dump["discovery"] = serde_json::json!({
                            "connected": discovery_status.connected.load(Ordering::Acquire),
                            "version": discovery_status.version.load().as_str(),
                            "last_nack": discovery_status.last_nack.load().as_str(),
                        });
                        admin::json(StatusCode::OK, &dump)
                    }
                    (Method::POST, "/shutdown") if req.peer.ip().is_loopback() => {
                        shutdown.notify_one();
                        admin::respond(StatusCode::OK, "text/plain", "shutting down\n")
                    }
                    (_, "/shutdown") => {
                        admin::respond(StatusCode::FORBIDDEN, "text/plain", "POST from loopback only\n")
                    }
                    _ => admin::respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
                }
            }
        })?;
    }

    let info = manager.bootstrap(&credential).await.context("obtaining the first workload certificate")?;
    let own_id: SpiffeId = info.spiffe_id.parse()?;
    tracing::info!(spiffe_id = %own_id, serial = %info.serial, "workload identity obtained");
    tokio::spawn(manager.clone().run(credential));

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
    let apply: ApplyFn = {
        let (view, bundle) = (view.clone(), bundle.clone());
        Arc::new(move |version: &str, snap: &Snapshot| {
            let next = MeshView::from_snapshot(version, snap, &workload)?;
            if !snap.trust_bundle_pem.is_empty() {
                bundle.set_roots(&snap.trust_bundle_pem).map_err(|e| e.to_string())?;
            }
            let (ids, serials) = crate::control::discovery::revocation_sets(&snap.revocations);
            bundle.set_revocations(ids, serials);
            view.store(Arc::new(next));
            Ok(())
        })
    };
    tokio::spawn(crate::agent::discovery::run(control.clone(), node, apply, discovery_status.clone()));
    tokio::spawn(crate::agent::telemetry::run(
        control.clone(),
        own_id.to_string(),
        metrics.proxy.peers.clone(),
        manager.events(),
        args.telemetry_interval,
    ));

    let inbound_listen = args.inbound.or(args.transparent.then(|| SocketAddr::from(([0, 0, 0, 0], 15006))));
    if let Some(listen) = inbound_listen {
        let app = args.app;
        let listener = TcpListener::bind(listen).await.with_context(|| format!("binding inbound {listen}"))?;
        let acceptor = TlsAcceptor::from(config::server_config(
            certs.clone(),
            bundle.clone(),
            true,
            &[config::ALPN_H2, config::ALPN_HTTP1, config::ALPN_TCP],
        ));
        let inbound = Arc::new(inbound::Inbound {
            own_id: own_id.clone(),
            app,
            client: inbound::Inbound::app_client(&args.limits, false),
            app_pools: Default::default(),
            h2_client: inbound::Inbound::app_client(&args.limits, true),
            limits: args.limits.clone(),
            drain: drain.clone(),
            metrics: metrics.proxy.clone(),
            handshake_timeout: args.handshake_timeout,
            bundle: bundle.clone(),
            view: view.clone(),
            access_log: access_log.clone(),
            probes: args.probes.clone(),
        });
        tokio::spawn(inbound::serve(listener, acceptor, inbound));
        tracing::info!(%listen, app = ?app, "inbound mTLS listener up");
    }
    if args.transparent {
        let listener =
            TcpListener::bind(args.outbound).await.with_context(|| format!("binding outbound {}", args.outbound))?;
        let t = transparent::Transparent::new(
            args.outbound,
            view.clone(),
            certs.clone(),
            bundle.clone(),
            metrics.proxy.clone(),
            args.limits.clone(),
            drain.clone(),
            access_log.clone(),
        );
        let mut revocations = bundle.revocations_changed();
        let reset = t.clone();
        tokio::spawn(async move {
            while revocations.changed().await.is_ok() {
                reset.reset();
            }
        });
        tokio::spawn(transparent::serve(listener, t));
        tracing::info!(listen = %args.outbound, "transparent outbound listener up");
    }
    for route in &args.routes {
        let listener =
            TcpListener::bind(route.listen).await.with_context(|| format!("binding route {}", route.listen))?;
        let tls =
            config::client_config(certs.clone(), bundle.clone(), Some(route.identity.clone()), &[config::ALPN_H2]);
        let tcp_tls =
            config::client_config(certs.clone(), bundle.clone(), Some(route.identity.clone()), &[config::ALPN_TCP]);
        let out = Arc::new(outbound::Outbound::new(
            route.clone(),
            tls,
            tcp_tls,
            metrics.proxy.clone(),
            args.limits.clone(),
            drain.clone(),
            access_log.clone(),
        ));
        let mut revocations = bundle.revocations_changed();
        let pool = out.clone();
        tokio::spawn(async move {
            while revocations.changed().await.is_ok() {
                pool.reset_pool();
            }
        });
        tokio::spawn(outbound::serve(listener, out));
        tracing::info!(listen = %route.listen, target = %route.target, identity = %route.identity, "outbound route up");
    }

    tokio::select! {
        _ = crate::shutdown_signal() => {}
        _ = shutdown.notified() => {}
    }
    // Drain: stop accepting, let requests in flight finish (idle keep-alive connections close
    // at once), give up after the grace period.
    tracing::info!(open = drain.open(), grace = ?args.limits.drain_timeout, "draining");
    let left = drain.drain(args.limits.drain_timeout).await;
    if left > 0 {
        tracing::warn!(connections = left, "drain timeout: closing connections still open");
    }
    tracing::info!("sidecar stopped");
    Ok(())
}
